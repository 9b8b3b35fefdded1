#include "coordinator/requests.h"

#include <algorithm>
#include <cctype>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <functional>
#include <map>

#include <nlohmann/json.hpp>

#include "common/excerpt.h"
#include "common/safetensors.h"
#include "common/semantics.h"
#include "common/snapshot_manifest.h"
#include "common/synthetic.h"
#include "common/tensor_checks.h"

namespace reattn {
namespace {

using nlohmann::json;

constexpr size_t kMaxNeedles = 1024;
// A step body's header bytes sent on to the other ranks with its tensors, at most.
constexpr uint64_t kMaxForwardedStepHeaderBytes = 64 * 1024;

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

// A 3-D tensor as nested JSON arrays of finite numbers, `dims` its dimensions (one may be
// free, e.g. qlen: its size is taken from the first array at that depth and held to).
// Errors name the element ("k[1][0]: ...") and the expected shape.
Status read_nested(const json& x, const std::string& name, std::initializer_list<Dim> dims, float max_abs,
                   std::vector<float>* out, int64_t* free_size) {
  const std::vector<Dim> d(dims);
  std::string shape;
  for (const Dim& dim : d) shape += "[" + std::string(dim.name) + (dim.size >= 0 ? "=" + std::to_string(dim.size) : "") + "]";
  std::vector<int64_t> want(d.size());
  for (size_t i = 0; i < d.size(); ++i) want[i] = d[i].size;
  const std::function<Status(const json&, size_t, const std::string&)> walk = [&](const json& v, size_t depth,
                                                                                   const std::string& where) -> Status {
    if (depth == d.size()) {
      if (!v.is_number()) return invalid_argument(where + ": expected a number, got " + type_of(v));
      const double value = v.get<double>();
      const float f = static_cast<float>(value);
      if (!std::isfinite(value) || !std::isfinite(f)) {
        return invalid_argument(where + ": " + json_excerpt(v) + " is not a finite fp32 value");
      }
      if (std::fabs(f) > max_abs) {
        return invalid_argument(where + ": " + json_excerpt(v) + " is above " + stored_value_limit(max_abs));
      }
      out->push_back(f);
      return Status::ok();
    }
    if (!v.is_array()) return invalid_argument(where + ": expected nested arrays " + shape + ", got " + type_of(v));
    if (want[depth] < 0) {
      want[depth] = static_cast<int64_t>(v.size());
      *free_size = want[depth];
    }
    if (static_cast<int64_t>(v.size()) != want[depth]) {
      return invalid_argument(where + ": expected " + std::to_string(want[depth]) + " entries (" + d[depth].name +
                              ") " + shape + ", got " + std::to_string(v.size()));
    }
    for (size_t i = 0; i < v.size(); ++i) {
      REATTN_RETURN_IF_ERROR(walk(v[i], depth + 1, where + "[" + std::to_string(i) + "]"));
    }
    return Status::ok();
  };
  return walk(x, 0, name);
}

// q as nested arrays [qlen][H][D] of finite numbers.
Status read_nested_q(const json& q, const ModelConfig& model, float max_abs, QueryRequest* out) {
  return read_nested(q, "q", {{"qlen"}, {"q_heads", model.q_heads}, {"head_dim", model.head_dim}}, max_abs, &out->q,
                     &out->qlen);
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

// ?layer=N of a safetensors body.
Expected<int> layer_from_url(const std::map<std::string, std::string>& params, const ModelConfig& model) {
  const auto layer_it = params.find("layer");
  if (layer_it == params.end()) {
    return invalid_argument("layer: missing (a safetensors body takes it from the URL: ?layer=N)");
  }
  int64_t layer = 0;
  const std::string& text = layer_it->second;
  const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), layer);
  if (ec != std::errc() || end != text.data() + text.size()) {
    return invalid_argument("layer: expected an integer, got '" + capped(text) + "'");
  }
  REATTN_RETURN_IF_ERROR(check_layer(layer, model));
  return static_cast<int>(layer);
}

// ?out_dtype=F32|F16|BF16 of a safetensors body (default F32), spelt exactly so.
Expected<DType> out_dtype_from_url(const std::map<std::string, std::string>& params) {
  const auto it = params.find("out_dtype");
  if (it == params.end()) return DType::kF32;
  for (DType d : {DType::kF32, DType::kF16, DType::kBF16}) {
    if (it->second == dtype_name(d)) return d;
  }
  return invalid_argument("out_dtype: expected F32, F16 or BF16, got '" + capped(it->second) + "'");
}

Expected<QueryRequest> parse_safetensors_query(const std::string& body, const std::string& query_string,
                                               const Config& config) {
  QueryRequest req;
  const auto params = parse_query_string(query_string);
  for (const auto& [key, value] : params) {
    if (key != "layer" && key != "mode" && key != "out_dtype") {
      return invalid_argument("unknown query parameter '" + capped(key) + "'");
    }
  }
  REATTN_ASSIGN_OR_RETURN(req.layer, layer_from_url(params, config.model));
  REATTN_ASSIGN_OR_RETURN(req.out_dtype, out_dtype_from_url(params));
  if (params.count("mode")) {
    REATTN_ASSIGN_OR_RETURN(req.mode, parse_query_mode(params.at("mode")));
  }

  REATTN_ASSIGN_OR_RETURN(SafetensorsFile file, SafetensorsFile::parse_borrowed(body, "query body"));
  REATTN_ASSIGN_OR_RETURN(TensorView q, file.get("q"));
  REATTN_RETURN_IF_ERROR(check_tensor_names(file, {"q"}, "a query body"));
  const ModelConfig& m = config.model;
  REATTN_RETURN_IF_ERROR(check_shape(q, {{"qlen"}, {"q_heads", m.q_heads}, {"head_dim", m.head_dim}}));
  REATTN_RETURN_IF_ERROR(check_storable(q, config.max_stored_value()));
  req.qlen = q.shape[0];
  REATTN_RETURN_IF_ERROR(check_qlen(req.qlen, req.mode, config.reattention));
  req.q = q.to_f32();
  return req;
}

Status check_step_qlen(const StepRequest& req, int64_t kv_qlen, const ReattentionConfig& rc) {
  if (kv_qlen != req.qlen) {
    return invalid_argument("k, v: " + std::to_string(kv_qlen) + " tokens, but q has " + std::to_string(req.qlen) +
                            " rows (qlen must agree)");
  }
  return check_qlen(req.qlen, QueryMode::kTail, rc);
}

Expected<StepRequest> parse_json_step(const std::string& body, const Config& config) {
  REATTN_ASSIGN_OR_RETURN(json doc, parse_json_object(body));
  REATTN_RETURN_IF_ERROR(check_keys(doc, {"layer", "q", "k", "v"}));
  for (const char* key : {"layer", "q", "k", "v"}) {
    if (!doc.contains(key)) return invalid_argument(std::string(key) + ": missing");
  }
  const ModelConfig& m = config.model;
  StepRequest req;
  REATTN_ASSIGN_OR_RETURN(int64_t layer, get_integer(doc, "layer", INT32_MIN, INT32_MAX));
  REATTN_RETURN_IF_ERROR(check_layer(layer, m));
  req.layer = static_cast<int>(layer);
  const float max_abs = config.max_stored_value();
  int64_t k_len = -1, v_len = -1;
  std::vector<float> q, k, v;
  REATTN_RETURN_IF_ERROR(
      read_nested(doc["q"], "q", {{"qlen"}, {"q_heads", m.q_heads}, {"head_dim", m.head_dim}}, max_abs, &q, &req.qlen));
  REATTN_RETURN_IF_ERROR(
      read_nested(doc["k"], "k", {{"kv_heads", m.kv_heads}, {"qlen"}, {"head_dim", m.head_dim}}, max_abs, &k, &k_len));
  REATTN_RETURN_IF_ERROR(
      read_nested(doc["v"], "v", {{"kv_heads", m.kv_heads}, {"qlen"}, {"head_dim", m.head_dim}}, max_abs, &v, &v_len));
  // q, k, v in F32, back to back in one buffer.
  auto bytes = std::make_shared<std::string>();
  for (const std::vector<float>* t : {&q, &k, &v}) {
    bytes->append(reinterpret_cast<const char*>(t->data()), t->size() * sizeof(float));
  }
  req.tensors = StepTensors{std::move(bytes), DType::kF32, DType::kF32, 0, q.size() * sizeof(float),
                            (q.size() + k.size()) * sizeof(float)};
  if (k_len != v_len) {
    return invalid_argument("k, v: k has " + std::to_string(k_len) + " tokens, v " + std::to_string(v_len));
  }
  REATTN_RETURN_IF_ERROR(check_step_qlen(req, k_len, config.reattention));
  return req;
}

Expected<StepRequest> parse_safetensors_step(std::shared_ptr<std::string> body, const std::string& query_string,
                                             const Config& config) {
  StepRequest req;
  const auto params = parse_query_string(query_string);
  for (const auto& [key, value] : params) {
    if (key != "layer" && key != "out_dtype") return invalid_argument("unknown query parameter '" + capped(key) + "'");
  }
  REATTN_ASSIGN_OR_RETURN(req.layer, layer_from_url(params, config.model));
  REATTN_ASSIGN_OR_RETURN(req.out_dtype, out_dtype_from_url(params));
  REATTN_ASSIGN_OR_RETURN(SafetensorsFile file, SafetensorsFile::parse_borrowed(*body, "step body"));
  const ModelConfig& m = config.model;
  REATTN_ASSIGN_OR_RETURN(TensorView q, file.get("q"));
  REATTN_ASSIGN_OR_RETURN(TensorView k, file.get("k"));
  REATTN_ASSIGN_OR_RETURN(TensorView v, file.get("v"));
  REATTN_RETURN_IF_ERROR(check_tensor_names(file, {"q", "k", "v"}, "a step body"));
  REATTN_RETURN_IF_ERROR(check_shape(q, {{"qlen"}, {"q_heads", m.q_heads}, {"head_dim", m.head_dim}}));
  for (const TensorView* t : {&k, &v}) {
    REATTN_RETURN_IF_ERROR(check_shape(*t, {{"kv_heads", m.kv_heads}, {"qlen"}, {"head_dim", m.head_dim}}));
  }
  if (k.shape != v.shape || k.dtype != v.dtype) {
    return invalid_argument("tensors 'k' " + shape_string(k.shape) + " " + dtype_name(k.dtype) + " and 'v' " +
                            shape_string(v.shape) + " " + dtype_name(v.dtype) + " differ; send both alike");
  }
  req.qlen = q.shape[0];
  REATTN_RETURN_IF_ERROR(check_step_qlen(req, k.shape[1], config.reattention));
  for (const TensorView* t : {&q, &k, &v}) REATTN_RETURN_IF_ERROR(check_storable(*t, config.max_stored_value()));
  const auto offset = [base = body->data()](const TensorView& t) {
    return static_cast<uint64_t>(reinterpret_cast<const char*>(t.data) - base);
  };
  uint64_t q_at = offset(q), k_at = offset(k), v_at = offset(v);
  // The body goes to every rank as it is: a header padded far beyond its tensors (a large
  // __metadata__) is not sent on; the tensors are copied out of it instead.
  const uint64_t first = std::min({q_at, k_at, v_at});
  if (first > kMaxForwardedStepHeaderBytes) {
    body = std::make_shared<std::string>(body->data() + first, body->size() - first);
    q_at -= first;
    k_at -= first;
    v_at -= first;
  }
  req.tensors = StepTensors{std::move(body), q.dtype, k.dtype, q_at, k_at, v_at};
  return req;
}

// A JSON body (no query parameters) or a safetensors body (parameters in the URL), parsed by
// from_safetensors() (which holds the body as it needs it: borrowed or shared).
template <typename T, typename FromSafetensors>
Expected<T> parse_either(const std::string& body, const std::string& content_type, const std::string& query_string,
                         const Config& config, Expected<T> (*from_json)(const std::string&, const Config&),
                         FromSafetensors from_safetensors) {
  if (is_json_body(body, content_type)) {
    if (!query_string.empty()) return invalid_argument("query parameters are only read with a safetensors body");
    return from_json(body, config);
  }
  return from_safetensors();
}

}  // namespace

Expected<StepRequest> parse_step_request(std::shared_ptr<std::string> body, const std::string& content_type,
                                         const std::string& query_string, const Config& config) {
  const std::string& text = *body;  // kept alive by `body` until the safetensors parse takes it
  return parse_either<StepRequest>(text, content_type, query_string, config, parse_json_step,
                                   [&] { return parse_safetensors_step(std::move(body), query_string, config); });
}

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
  return parse_either<QueryRequest>(body, content_type, query_string, config, parse_json_query,
                                    [&] { return parse_safetensors_query(body, query_string, config); });
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

Expected<LoadRequest> parse_load_request(const std::string& body) {
  REATTN_ASSIGN_OR_RETURN(json doc, parse_json_object(body));
  REATTN_RETURN_IF_ERROR(check_keys(doc, {"path", "format"}));
  if (!doc.contains("path")) return invalid_argument("path: missing");
  const json& path = doc["path"];
  if (!path.is_string()) return invalid_argument("path: expected a string, got " + type_of(path));
  LoadRequest req;
  req.path = path.get<std::string>();
  if (req.path.empty() || req.path.size() > 4096) {
    return invalid_argument("path: expected 1 to 4096 bytes, got " + std::to_string(req.path.size()));
  }
  if (doc.contains("format")) {
    const json& f = doc["format"];
    if (!f.is_string() || f.get<std::string>() != "safetensors") {
      return invalid_argument("format: the only format is \"safetensors\", got " + json_excerpt(f));
    }
  }
  return req;
}

Expected<std::string> parse_create_request(const std::string& body) {
  bool blank = true;
  for (char c : body) blank = blank && std::isspace(static_cast<unsigned char>(c));
  if (blank) return std::string();
  REATTN_ASSIGN_OR_RETURN(json doc, parse_json_object(body));
  REATTN_RETURN_IF_ERROR(check_keys(doc, {"from_snapshot"}));
  if (!doc.contains("from_snapshot")) return std::string();
  if (!doc["from_snapshot"].is_string()) {
    return invalid_argument("from_snapshot: expected a string, got " + type_of(doc["from_snapshot"]));
  }
  const std::string name = doc["from_snapshot"].get<std::string>();
  if (Status s = check_snapshot_name(name); !s.is_ok()) return invalid_argument("from_snapshot: " + s.message());
  return name;
}

Expected<std::string> parse_snapshot_request(const std::string& body) {
  REATTN_ASSIGN_OR_RETURN(json doc, parse_json_object(body));
  REATTN_RETURN_IF_ERROR(check_keys(doc, {"name"}));
  if (!doc.contains("name")) return invalid_argument("name: missing");
  if (!doc["name"].is_string()) return invalid_argument("name: expected a string, got " + type_of(doc["name"]));
  const std::string name = doc["name"].get<std::string>();
  if (Status s = check_snapshot_name(name); !s.is_ok()) return invalid_argument("name: " + s.message());
  return name;
}

}  // namespace reattn
