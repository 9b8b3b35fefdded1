#include "coordinator/router.h"

#include <algorithm>
#include <charconv>
#include <cstdint>
#include <iterator>
#include <vector>

#include "common/excerpt.h"

namespace reattn {
namespace {

const RouteEntry kRoutes[] = {
    {"GET", "/health/live", Route::kHealthLive},
    {"GET", "/health/ready", Route::kHealthReady},
    {"GET", "/metrics", Route::kMetrics},
    {"GET", "/openapi.json", Route::kOpenApi},
    {"GET", "/v1/info", Route::kInfo},
    {"POST", "/v1/contexts", Route::kCreateContext},
    {"GET", "/v1/contexts", Route::kListContexts},
    {"GET", "/v1/contexts/{id}", Route::kGetContext},
    {"DELETE", "/v1/contexts/{id}", Route::kDeleteContext},
    {"POST", "/v1/contexts/{id}/kv", Route::kAppendKv},
    {"POST", "/v1/contexts/{id}/synthetic", Route::kSynthetic},
    {"POST", "/v1/contexts/{id}/query", Route::kQuery},
    {"POST", "/v1/contexts/{id}/step", Route::kLayerStep},
    {"POST", "/v1/contexts/{id}/load", Route::kLoad},
    {"GET", "/v1/operations", Route::kListOperations},
    {"GET", "/v1/operations/{op}", Route::kGetOperation},
    {"DELETE", "/v1/operations/{op}", Route::kCancelOperation},
    {"POST", "/v1/contexts/{id}/snapshot", Route::kSnapshotContext},
    {"GET", "/v1/snapshots", Route::kListSnapshots},
    {"DELETE", "/v1/snapshots/{name}", Route::kDeleteSnapshot},
};

std::vector<std::string> split(const std::string& path) {
  std::vector<std::string> parts;
  size_t pos = 1;
  while (pos <= path.size()) {
    const size_t slash = std::min(path.find('/', pos), path.size());
    parts.push_back(path.substr(pos, slash - pos));
    pos = slash + 1;
  }
  return parts;
}

// Whether `path` fits `pattern`; the {id}, {op} or {name} segment goes to *id.
bool fits(const std::string& pattern, const std::vector<std::string>& parts, std::string* id) {
  const std::vector<std::string> want = split(pattern);
  if (want.size() != parts.size()) return false;
  for (size_t i = 0; i < want.size(); ++i) {
    if (want[i] == "{id}" || want[i] == "{op}" || want[i] == "{name}") {
      if (parts[i].empty()) return false;
      *id = parts[i];
    } else if (want[i] != parts[i]) {
      return false;
    }
  }
  return true;
}

}  // namespace

const std::vector<RouteEntry>& route_table() {
  static const std::vector<RouteEntry> table(std::begin(kRoutes), std::end(kRoutes));
  return table;
}

RouteMatch match_route(const std::string& method, const std::string& path) {
  RouteMatch m;
  m.pattern = "unmatched";
  if (path.empty() || path[0] != '/') {
    m.error_status = 404;
    return m;
  }
  // One trailing slash is forgiven ("/v1/contexts/").
  std::string p = path;
  if (p.size() > 1 && p.back() == '/') p.pop_back();
  const std::vector<std::string> parts = split(p);
  for (const RouteEntry& e : kRoutes) {
    std::string id;
    if (!fits(e.pattern, parts, &id)) continue;
    m.pattern = e.pattern;
    m.id_text = id;
    if (method == e.method) {
      m.route = e.route;
      m.error_status = 0;
      m.allow.clear();
      break;
    }
    m.error_status = 405;
    m.allow += (m.allow.empty() ? "" : ", ") + std::string(e.method);
  }
  if (m.pattern == "unmatched") m.error_status = 404;
  if (m.error_status == 0 && !m.id_text.empty()) {
    // Canonical ids only: "01" or "+1" is not context 1.
    uint64_t value = 0;
    const char* end = m.id_text.data() + m.id_text.size();
    const auto [last, ec] = std::from_chars(m.id_text.data(), end, value);
    m.id_valid = ec == std::errc() && last == end && value > 0 && m.id_text[0] != '0';
    m.id = value;
  }
  m.id_text = capped(m.id_text);
  return m;
}

namespace {

// "application/json; charset=utf-8" -> "application/json"
std::string media_type(const std::string& content_type) {
  std::string out;
  for (char c : content_type.substr(0, content_type.find(';'))) {
    if (c == ' ' || c == '\t') continue;
    out += static_cast<char>(c >= 'A' && c <= 'Z' ? c - 'A' + 'a' : c);
  }
  return out;
}

}  // namespace

std::string content_type_problem(Route route, const std::string& content_type, size_t body_bytes) {
  const char* want = nullptr;
  switch (route) {
    case Route::kCreateContext:
      if (body_bytes == 0) return "";
      want = "application/json";
      break;
    case Route::kSynthetic:
    case Route::kLoad:
    case Route::kSnapshotContext: want = "application/json"; break;
    case Route::kAppendKv: want = "application/octet-stream"; break;
    case Route::kQuery:
    case Route::kLayerStep: want = "application/json or application/octet-stream"; break;
    default: return "";
  }
  const std::string type = media_type(content_type);
  const bool json = type == "application/json";
  const bool binary = type == "application/octet-stream";
  const bool either = route == Route::kQuery || route == Route::kLayerStep;
  const bool fits = either ? json || binary : route == Route::kAppendKv ? binary : json;
  if (fits) return "";
  return "Content-Type " + (content_type.empty() ? std::string("missing") : "'" + capped(content_type, 64) + "'") +
         ": this route takes " + want;
}

bool is_api_route(Route route) {
  switch (route) {
    case Route::kHealthLive:
    case Route::kHealthReady:
    case Route::kMetrics:
    case Route::kOpenApi:
    case Route::kNone:
      return false;
    default:
      return true;
  }
}

}  // namespace reattn
