#include "coordinator/requests.h"

#include <algorithm>
#include <cctype>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <map>

#include <nlohmann/json.hpp>

#include "common/excerpt.h"
#include "common/safetensors.h"
#include "common/semantics.h"
#include "common/synthetic.h"
#include "common/tensor_checks.h"

namespace reattn {
namespace {

using nlohmann::json;

constexpr size_t kMaxNeedles = 1024;

std::string lower(std::string s) {
  for (char& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

std::string type_of(const json& j) {
  if (j.is_number_integer() || j.is_number_unsigned()) return "an integer";
  if (j.is_number_float()) return "a number";
  return std::string("a ") + j.type_name();
}

Expected<json> parse_json_object(const std::string& body) {
  json doc = json::parse(body, nullptr, /*allow_exceptions=*/false);
  if (doc.is_discarded()) return invalid_argument("body is not valid JSON");
  if (!doc.is_object()) return invalid_argument("body: expected a JSON object, got " + type_of(doc));
  return doc;
}

// Rejects keys the endpoint does not know: a misspelt field must not be silently ignored.
Status check_keys(const json& doc, std::initializer_list<const char*> known) {
  for (const auto& item : doc.items()) {
    bool ok = false;
    for (const char* k : known) ok = ok || item.key() == k;
    if (!ok) return invalid_argument("unknown field '" + capped(item.key()) + "'");
  }
  return Status::ok();
}

Expected<int64_t> get_integer(const json& doc, const char* key, int64_t lo, int64_t hi) {
  const json& v = doc.at(key);
  if (!v.is_number_integer()) return invalid_argument(std::string(key) + ": expected an integer, got " + type_of(v));
  if (v.is_number_unsigned() && v.get<uint64_t>() > static_cast<uint64_t>(hi)) {
    return invalid_argument(std::string(key) + ": must be in [" + std::to_string(lo) + ", " + std::to_string(hi) +
                            "], got " + json_excerpt(v));
  }
  const int64_t x = v.get<int64_t>();
  if (x < lo || x > hi) {
    return invalid_argument(std::string(key) + ": must be in [" + std::to_string(lo) + ", " + std::to_string(hi) +
                            "], got " + std::to_string(x));
  }
  return x;
}

std::map<std::string, std::string> parse_query_string(const std::string& qs) {
  std::map<std::string, std::string> out;
  size_t pos = 0;
  while (pos <= qs.size() && !qs.empty()) {
    const size_t amp = std::min(qs.find('&', pos), qs.size());
    const std::string item = qs.substr(pos, amp - pos);
    const size_t eq = item.find('=');
    if (!item.empty()) out[item.substr(0, eq)] = eq == std::string::npos ? "" : item.substr(eq + 1);
    pos = amp + 1;
  }
  return out;
}

Status check_layer(int64_t layer, const ModelConfig& model) {
  if (layer < 0 || layer >= model.layers) {
    return invalid_argument("layer: " + std::to_string(layer) + " is outside [0, " + std::to_string(model.layers) +
                            ") for this model");
  }
  return Status::ok();
}

// q as nested arrays [qlen][H][D] of finite numbers.
Status read_nested_q(const json& q, const ModelConfig& model, float max_abs, QueryRequest* out) {
  const int64_t H = model.q_heads, D = model.head_dim;
  const std::string shape = "[qlen][q_heads=" + std::to_string(H) + "][head_dim=" + std::to_string(D) + "]";
  if (!q.is_array()) return invalid_argument("q: expected nested arrays " + shape + ", got " + type_of(q));
  out->qlen = static_cast<int64_t>(q.size());
  out->q.reserve(static_cast<size_t>(out->qlen * H * D));
  for (int64_t i = 0; i < out->qlen; ++i) {
    const json& row = q[i];
    if (!row.is_array() || static_cast<int64_t>(row.size()) != H) {
      return invalid_argument("q[" + std::to_string(i) + "]: expected " + std::to_string(H) + " heads " + shape +
                              ", got " + (row.is_array() ? std::to_string(row.size()) + " entries" : type_of(row)));
    }
    for (int64_t h = 0; h < H; ++h) {
      const json& vec = row[h];
      if (!vec.is_array() || static_cast<int64_t>(vec.size()) != D) {
        return invalid_argument("q[" + std::to_string(i) + "][" + std::to_string(h) + "]: expected " +
                                std::to_string(D) + " numbers " + shape + ", got " +
                                (vec.is_array() ? std::to_string(vec.size()) + " entries" : type_of(vec)));
      }
      for (int64_t d = 0; d < D; ++d) {
        const json& x = vec[d];
        const std::string where = "q[" + std::to_string(i) + "][" + std::to_string(h) + "][" + std::to_string(d) + "]";
        if (!x.is_number()) return invalid_argument(where + ": expected a number, got " + type_of(x));
        const double value = x.get<double>();
        const float f = static_cast<float>(value);
        if (!std::isfinite(value) || !std::isfinite(f)) {
          return invalid_argument(where + ": " + json_excerpt(x) + " is not a finite fp32 value");
        }
        if (std::fabs(f) > max_abs) {
          return invalid_argument(where + ": " + json_excerpt(x) + " is above the f16 storage limit " +
                                  std::to_string(static_cast<int>(max_abs)));
        }
        out->q.push_back(f);
      }
    }
  }
  return Status::ok();
}

Expected<QueryRequest> parse_json_query(const std::string& body, const Config& config) {
  REATTN_ASSIGN_OR_RETURN(json doc, parse_json_object(body));
  REATTN_RETURN_IF_ERROR(check_keys(doc, {"layer", "q", "mode", "synthetic_q"}));
  QueryRequest req;
  if (!doc.contains("layer")) return invalid_argument("layer: missing");
  REATTN_ASSIGN_OR_RETURN(int64_t layer, get_integer(doc, "layer", INT32_MIN, INT32_MAX));
  REATTN_RETURN_IF_ERROR(check_layer(layer, config.model));
  req.layer = static_cast<int>(layer);
  if (doc.contains("mode")) {
    if (!doc["mode"].is_string()) return invalid_argument("mode: expected a string, got " + type_of(doc["mode"]));
    REATTN_ASSIGN_OR_RETURN(req.mode, parse_query_mode(doc["mode"].get<std::string>()));
  }
  const bool has_q = doc.contains("q"), has_syn = doc.contains("synthetic_q");
  if (has_q == has_syn) return invalid_argument("give exactly one of q and synthetic_q");
  if (has_q) {
    REATTN_RETURN_IF_ERROR(read_nested_q(doc["q"], config.model, config.max_stored_value(), &req));
  } else {
    const json& syn = doc["synthetic_q"];
    if (!syn.is_object()) return invalid_argument("synthetic_q: expected an object {seed, qlen}, got " + type_of(syn));
    REATTN_RETURN_IF_ERROR(check_keys(syn, {"seed", "qlen"}));
    uint64_t seed = 0;
    if (syn.contains("seed")) {
      if (!syn["seed"].is_number_integer() || (!syn["seed"].is_number_unsigned() && syn["seed"].get<int64_t>() < 0)) {
        return invalid_argument("synthetic_q.seed: expected an integer >= 0, got " + json_excerpt(syn["seed"]));
      }
      seed = syn["seed"].get<uint64_t>();
    }
    int64_t qlen = 1;
    if (syn.contains("qlen")) {
      REATTN_ASSIGN_OR_RETURN(qlen, get_integer(syn, "qlen", 1, config.reattention.local_window));
    }
    req.qlen = qlen;
    req.q = synthetic_query(SyntheticSpec{seed, {}}, config.model, req.layer, qlen);
  }
  REATTN_RETURN_IF_ERROR(check_qlen(req.qlen, req.mode, config.reattention));
  return req;
}

Expected<QueryRequest> parse_safetensors_query(const std::string& body, const std::string& query_string,
                                               const Config& config) {
  QueryRequest req;
  const auto params = parse_query_string(query_string);
  for (const auto& [key, value] : params) {
    if (key != "layer" && key != "mode") return invalid_argument("unknown query parameter '" + capped(key) + "'");
  }
  const auto layer_it = params.find("layer");
  if (layer_it == params.end()) {
    return invalid_argument("layer: missing (a safetensors query body takes it from the URL: ?layer=N)");
  }
  int64_t layer = 0;
  const std::string& text = layer_it->second;
  const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), layer);
  if (ec != std::errc() || end != text.data() + text.size()) {
    return invalid_argument("layer: expected an integer, got '" + capped(text) + "'");
  }
  REATTN_RETURN_IF_ERROR(check_layer(layer, config.model));
  req.layer = static_cast<int>(layer);
  if (params.count("mode")) {
    REATTN_ASSIGN_OR_RETURN(req.mode, parse_query_mode(params.at("mode")));
  }

  REATTN_ASSIGN_OR_RETURN(SafetensorsFile file, SafetensorsFile::parse(body, "query body"));
  REATTN_ASSIGN_OR_RETURN(TensorView q, file.get("q"));
  const ModelConfig& m = config.model;
  REATTN_RETURN_IF_ERROR(check_shape(q, {{"qlen"}, {"q_heads", m.q_heads}, {"head_dim", m.head_dim}}));
  REATTN_RETURN_IF_ERROR(check_storable(q, config.max_stored_value()));
  req.qlen = q.shape[0];
  REATTN_RETURN_IF_ERROR(check_qlen(req.qlen, req.mode, config.reattention));
  req.q = q.to_f32();
  return req;
}

}  // namespace

bool is_json_body(const std::string& body, const std::string& content_type) {
  const std::string ct = lower(content_type);
  if (ct.find("json") != std::string::npos) return true;
  if (ct.find("octet-stream") != std::string::npos || ct.find("safetensors") != std::string::npos) return false;
  for (char c : body) {
    if (!std::isspace(static_cast<unsigned char>(c))) return c == '{' || c == '[';
  }
  return true;
}

Expected<QueryRequest> parse_query_request(const std::string& body, const std::string& content_type,
                                           const std::string& query_string, const Config& config) {
  if (is_json_body(body, content_type)) {
    if (!query_string.empty()) return invalid_argument("query parameters are only read with a safetensors body");
    return parse_json_query(body, config);
  }
  return parse_safetensors_query(body, query_string, config);
}

Expected<SyntheticRequest> parse_synthetic_request(const std::string& body) {
  REATTN_ASSIGN_OR_RETURN(json doc, parse_json_object(body));
  REATTN_RETURN_IF_ERROR(check_keys(doc, {"tokens", "seed", "needles"}));
  SyntheticRequest req;
  if (!doc.contains("tokens")) return invalid_argument("tokens: missing");
  REATTN_ASSIGN_OR_RETURN(req.tokens, get_integer(doc, "tokens", 1, INT64_MAX));
  if (doc.contains("seed")) {
    const json& s = doc["seed"];
    if (!s.is_number_integer() || (!s.is_number_unsigned() && s.get<int64_t>() < 0)) {
      return invalid_argument("seed: expected an integer >= 0, got " + json_excerpt(s));
    }
    req.seed = s.get<uint64_t>();
  }
  if (doc.contains("needles")) {
    const json& n = doc["needles"];
    if (!n.is_array()) return invalid_argument("needles: expected an array of token positions, got " + type_of(n));
    if (n.size() > kMaxNeedles) {
      return invalid_argument("needles: at most " + std::to_string(kMaxNeedles) + ", got " + std::to_string(n.size()));
    }
    for (size_t i = 0; i < n.size(); ++i) {
      if (!n[i].is_number_integer() || (!n[i].is_number_unsigned() && n[i].get<int64_t>() < 0) ||
          (n[i].is_number_unsigned() && n[i].get<uint64_t>() > static_cast<uint64_t>(INT64_MAX))) {
        return invalid_argument("needles[" + std::to_string(i) + "]: expected a token position >= 0, got " +
                                json_excerpt(n[i]));
      }
      req.needles.push_back(n[i].get<int64_t>());
    }
  }
  return req;
}

Expected<int64_t> check_kv_body(std::shared_ptr<const std::string> body, const Config& config) {
  REATTN_ASSIGN_OR_RETURN(SafetensorsFile file, SafetensorsFile::parse_shared(std::move(body), "kv body"));
  REATTN_ASSIGN_OR_RETURN(KvTensors kv, kv_tensors(file, config.model));
  REATTN_RETURN_IF_ERROR(check_storable(kv.k, config.max_stored_value()));
  REATTN_RETURN_IF_ERROR(check_storable(kv.v, config.max_stored_value()));
  return kv.tokens;
}

Status check_create_body(const std::string& body) {
  bool blank = true;
  for (char c : body) blank = blank && std::isspace(static_cast<unsigned char>(c));
  if (blank) return Status::ok();
  REATTN_ASSIGN_OR_RETURN(json doc, parse_json_object(body));
  return check_keys(doc, {});
}

}  // namespace reattn
