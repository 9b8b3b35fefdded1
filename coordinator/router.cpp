#include "coordinator/router.h"

#include <algorithm>
#include <charconv>
#include <cstdint>
#include <vector>

namespace reattn {
namespace {

struct Entry {
  const char* method;
  const char* pattern;
  Route route;
};

const Entry kRoutes[] = {
    {"GET", "/health/live", Route::kHealthLive},
    {"GET", "/health/ready", Route::kHealthReady},
    {"GET", "/metrics", Route::kMetrics},
    {"GET", "/v1/info", Route::kInfo},
    {"POST", "/v1/contexts", Route::kCreateContext},
    {"GET", "/v1/contexts", Route::kListContexts},
    {"GET", "/v1/contexts/{id}", Route::kGetContext},
    {"DELETE", "/v1/contexts/{id}", Route::kDeleteContext},
    {"POST", "/v1/contexts/{id}/kv", Route::kAppendKv},
    {"POST", "/v1/contexts/{id}/synthetic", Route::kSynthetic},
    {"POST", "/v1/contexts/{id}/query", Route::kQuery},
    {"POST", "/v1/contexts/{id}/step", Route::kLayerStep},
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

// Whether `path` fits `pattern`; the {id} segment goes to *id.
bool fits(const std::string& pattern, const std::vector<std::string>& parts, std::string* id) {
  const std::vector<std::string> want = split(pattern);
  if (want.size() != parts.size()) return false;
  for (size_t i = 0; i < want.size(); ++i) {
    if (want[i] == "{id}") {
      if (parts[i].empty()) return false;
      *id = parts[i];
    } else if (want[i] != parts[i]) {
      return false;
    }
  }
  return true;
}

}  // namespace

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
  for (const Entry& e : kRoutes) {
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
    uint64_t value = 0;
    const char* end = m.id_text.data() + m.id_text.size();
    const auto [last, ec] = std::from_chars(m.id_text.data(), end, value);
    m.id_valid = ec == std::errc() && last == end && value > 0;
    m.id = value;
  }
  return m;
}

bool is_api_route(Route route) {
  switch (route) {
    case Route::kHealthLive:
    case Route::kHealthReady:
    case Route::kMetrics:
    case Route::kNone:
      return false;
    default:
      return true;
  }
}

}  // namespace reattn
