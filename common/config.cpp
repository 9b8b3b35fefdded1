// Parsing, validation and printing of the configuration. The only file that includes yaml-cpp.
#include "common/config.h"

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cctype>
#include <charconv>
#include <cmath>
#include <exception>
#include <filesystem>
#include <fstream>
#include <limits>
#include <locale>
#include <set>
#include <sstream>
#include <utility>

namespace reattn {

const char* final_attention_name(FinalAttention f) {
  switch (f) {
    case FinalAttention::kGather: return "gather";
    case FinalAttention::kPartial: return "partial";
  }
  return "?";
}

Expected<FinalAttention> parse_final_attention(const std::string& name) {
  if (name == "gather") return FinalAttention::kGather;
  if (name == "partial") return FinalAttention::kPartial;
  return invalid_argument("unknown final attention '" + name + "' (expected gather or partial)");
}

const char* query_mode_name(QueryMode m) {
  switch (m) {
    case QueryMode::kTail: return "tail";
    case QueryMode::kDetached: return "detached";
  }
  return "?";
}

Expected<QueryMode> parse_query_mode(const std::string& name) {
  if (name == "tail") return QueryMode::kTail;
  if (name == "detached") return QueryMode::kDetached;
  return invalid_argument("unknown query mode '" + name + "' (expected tail or detached)");
}

const char* backend_kind_name(BackendKind b) {
  switch (b) {
    case BackendKind::kAuto: return "auto";
    case BackendKind::kCpu: return "cpu";
    case BackendKind::kCuda: return "cuda";
  }
  return "?";
}

Expected<BackendKind> parse_backend_kind(const std::string& name) {
  if (name == "auto") return BackendKind::kAuto;
  if (name == "cpu") return BackendKind::kCpu;
  if (name == "cuda") return BackendKind::kCuda;
  return invalid_argument("unknown backend kind '" + name + "' (expected auto, cpu or cuda)");
}

const char* recall_mode_name(RecallMode r) {
  switch (r) {
    case RecallMode::kChunk: return "chunk";
    case RecallMode::kSpan: return "span";
  }
  return "?";
}

Expected<RecallMode> parse_recall_mode(const std::string& name) {
  if (name == "chunk") return RecallMode::kChunk;
  if (name == "span") return RecallMode::kSpan;
  return invalid_argument("unknown recall '" + name + "' (expected chunk or span)");
}

const char* rope_scaling_name(RopeScalingType t) {
  switch (t) {
    case RopeScalingType::kNone: return "none";
    case RopeScalingType::kLlama3: return "llama3";
  }
  return "?";
}

Expected<RopeScalingType> parse_rope_scaling(const std::string& name) {
  if (name == "none") return RopeScalingType::kNone;
  if (name == "llama3") return RopeScalingType::kLlama3;
  return invalid_argument("unknown rope scaling type '" + name + "' (expected none or llama3)");
}

namespace {

constexpr bool kRequired = true;

bool parse_integer(const std::string& text, int64_t* out) {
  const char* last = text.data() + text.size();
  const auto [end, ec] = std::from_chars(text.data(), last, *out);
  return ec == std::errc() && end == last;
}

bool parse_number(const std::string& text, double* out) {
  std::istringstream in(text);
  in.imbue(std::locale::classic());
  return (in >> *out) && (in >> std::ws).eof();
}

// Shortest of 15 or 17 significant digits that reads back exactly; independent of the locale.
std::string format_number(double value) {
  std::string text;
  for (int precision : {15, 17}) {
    std::ostringstream out;
    out.imbue(std::locale::classic());
    out.precision(precision);
    out << value;
    text = out.str();
    double back = 0;
    if (parse_number(text, &back) && back == value) break;
  }
  return text;
}

std::string describe(const YAML::Node& node) {
  if (!node.IsDefined() || node.IsNull()) return "nothing";
  if (node.IsScalar()) return "'" + node.Scalar() + "'";
  return node.IsSequence() ? "a sequence" : "a mapping";
}

std::string expected(const char* what, const YAML::Node& node) {
  return std::string("expected ") + what + ", got " + describe(node);
}

// Each returns an empty string on success, otherwise what was wrong with the value.
std::string to_value(const YAML::Node& node, int64_t* out) {
  if (!node.IsScalar() || !parse_integer(node.Scalar(), out)) return expected("an integer", node);
  return {};
}

std::string to_value(const YAML::Node& node, int* out) {
  int64_t wide = 0;
  if (!node.IsScalar() || !parse_integer(node.Scalar(), &wide)) return expected("an integer", node);
  if (wide < std::numeric_limits<int>::min() || wide > std::numeric_limits<int>::max()) {
    return expected("an integer in [-2147483648, 2147483647]", node);
  }
  *out = static_cast<int>(wide);
  return {};
}

std::string to_value(const YAML::Node& node, double* out) {
  if (!node.IsScalar() || !parse_number(node.Scalar(), out)) return expected("a number", node);
  return {};
}

// An empty value ("key:" or "key: ~") reads as the empty string.
std::string to_value(const YAML::Node& node, std::string* out) {
  if (node.IsNull()) {
    out->clear();
  } else if (node.IsScalar()) {
    *out = node.Scalar();
  } else {
    return expected("a string", node);
  }
  return {};
}

template <typename T>
std::string to_named(const YAML::Node& node, T* out, Expected<T> (*parse)(const std::string&)) {
  if (!node.IsScalar()) return expected("a name", node);
  Expected<T> parsed = parse(node.Scalar());
  if (!parsed) return parsed.status().message();
  *out = *parsed;
  return {};
}

std::string to_value(const YAML::Node& node, FinalAttention* out) {
  return to_named(node, out, parse_final_attention);
}
std::string to_value(const YAML::Node& node, BackendKind* out) {
  return to_named(node, out, parse_backend_kind);
}
std::string to_value(const YAML::Node& node, DType* out) { return to_named(node, out, parse_dtype); }
std::string to_value(const YAML::Node& node, RecallMode* out) { return to_named(node, out, parse_recall_mode); }
std::string to_value(const YAML::Node& node, RopeScalingType* out) {
  return to_named(node, out, parse_rope_scaling);
}
// A nested section, read by its own SectionReader.
std::string to_value(const YAML::Node& node, YAML::Node* out) {
  *out = node;
  return {};
}

// Reads the keys of one section. Unknown and duplicate keys are reported before bad values,
// so a misspelt key reads as such rather than as a missing one.
class SectionReader {
 public:
  SectionReader(const YAML::Node& node, std::string section)
      : node_(node), section_(std::move(section)) {
    if (node_.IsDefined() && !node_.IsMap() && !node_.IsNull()) {
      fail(section_ + ": " + expected("a mapping", node_));
    }
  }

  template <typename T>
  void read(const char* key, T* out, bool required = false) {
    known_.insert(key);
    const YAML::Node& node = node_;  // the const operator[] never inserts
    const bool is_map = node.IsDefined() && node.IsMap();
    const YAML::Node value = is_map ? node[key] : YAML::Node();
    if (!is_map || !value.IsDefined()) {
      if (required) fail(path(key) + ": required key is missing");
      return;
    }
    const std::string error = to_value(value, out);
    if (!error.empty()) fail(path(key) + ": " + error);
  }

  Status finish() const {
    if (node_.IsDefined() && node_.IsMap()) {
      std::set<std::string> seen;
      for (const auto& entry : node_) {
        const std::string key = entry.first.Scalar();
        if (!known_.count(key)) return invalid_argument("unknown key '" + path(key) + "'");
        if (!seen.insert(key).second) return invalid_argument("duplicate key '" + path(key) + "'");
      }
    }
    return error_;
  }

 private:
  std::string path(const std::string& key) const { return section_ + "." + key; }
  void fail(std::string message) {
    if (error_.is_ok()) error_ = invalid_argument(std::move(message));
  }

  YAML::Node node_;
  std::string section_;
  std::set<std::string> known_;
  Status error_;
};

Expected<Config> parse_config(const YAML::Node& root) {
  if (!root.IsMap() && !root.IsNull()) {
    return invalid_argument(expected("a mapping of sections at the top level", root));
  }
  static const std::set<std::string> kSections = {"model", "reattention", "backend", "capacity",
                                                  "server"};
  std::set<std::string> seen;
  for (const auto& entry : root) {
    const std::string name = entry.first.Scalar();
    if (!kSections.count(name)) return invalid_argument("unknown section '" + name + "'");
    if (!seen.insert(name).second) return invalid_argument("duplicate section '" + name + "'");
  }
  if (!seen.count("model")) return invalid_argument("missing section 'model'");

  Config c;
  SectionReader model(root["model"], "model");
  model.read("layers", &c.model.layers, kRequired);
  model.read("q_heads", &c.model.q_heads, kRequired);
  model.read("kv_heads", &c.model.kv_heads, kRequired);
  model.read("head_dim", &c.model.head_dim, kRequired);
  model.read("rope_theta", &c.model.rope_theta);
  model.read("scope", &c.model.scope, kRequired);
  YAML::Node rope_scaling;
  model.read("rope_scaling", &rope_scaling);
  REATTN_RETURN_IF_ERROR(model.finish());
  SectionReader scaling(rope_scaling, "model.rope_scaling");
  scaling.read("type", &c.model.rope_scaling.type, rope_scaling.IsDefined() && !rope_scaling.IsNull());
  scaling.read("factor", &c.model.rope_scaling.factor);
  scaling.read("low_freq_factor", &c.model.rope_scaling.low_freq_factor);
  scaling.read("high_freq_factor", &c.model.rope_scaling.high_freq_factor);
  scaling.read("original_max_position_embeddings", &c.model.rope_scaling.original_max_positions);
  REATTN_RETURN_IF_ERROR(scaling.finish());

  SectionReader reattention(root["reattention"], "reattention");
  reattention.read("sink_tokens", &c.reattention.sink_tokens);
  reattention.read("local_window", &c.reattention.local_window);
  reattention.read("chunk_tokens", &c.reattention.chunk_tokens);
  reattention.read("top_k", &c.reattention.top_k);
  reattention.read("max_recall_chunks", &c.reattention.max_recall_chunks);
  reattention.read("final_attention", &c.reattention.final_attention);
  reattention.read("recall", &c.reattention.recall);
  reattention.read("span_tokens", &c.reattention.span_tokens);
  reattention.read("max_recall_tokens", &c.reattention.max_recall_tokens);
  REATTN_RETURN_IF_ERROR(reattention.finish());

  SectionReader backend(root["backend"], "backend");
  backend.read("kind", &c.backend.kind);
  backend.read("storage_dtype", &c.backend.storage_dtype);
  backend.read("threads", &c.backend.threads);
  REATTN_RETURN_IF_ERROR(backend.finish());

  SectionReader capacity(root["capacity"], "capacity");
  capacity.read("tokens_per_rank", &c.capacity.tokens_per_rank);
  capacity.read("max_contexts", &c.capacity.max_contexts);
  REATTN_RETURN_IF_ERROR(capacity.finish());

  SectionReader server(root["server"], "server");
  server.read("listen", &c.server.listen);
  server.read("max_body_bytes", &c.server.max_body_bytes);
  server.read("api_key_file", &c.server.api_key_file);
  server.read("queue_depth", &c.server.queue_depth);
  server.read("max_batch", &c.server.max_batch);
  server.read("http_threads", &c.server.http_threads);
  server.read("request_timeout_s", &c.server.request_timeout_s);
  server.read("step_deadline_s", &c.server.step_deadline_s);
  server.read("operation_deadline_s", &c.server.operation_deadline_s);
  server.read("heartbeat_s", &c.server.heartbeat_s);
  server.read("queue_deadline_s", &c.server.queue_deadline_s);
  server.read("drain_deadline_s", &c.server.drain_deadline_s);
  server.read("max_connections", &c.server.max_connections);
  server.read("busy_poll_us", &c.server.busy_poll_us);
  server.read("load_root", &c.server.load_root);
  server.read("load_slice_bytes", &c.server.load_slice_bytes);
  server.read("snapshot_dir", &c.server.snapshot_dir);
  REATTN_RETURN_IF_ERROR(server.finish());

  REATTN_RETURN_IF_ERROR(c.validate());
  return c;
}

}  // namespace

namespace {

Status check_rope_scaling(const RopeScaling& rs) {
  if (rs.type == RopeScalingType::kNone) return Status::ok();
  const struct {
    const char* key;
    double value;
  } positive[] = {{"factor", rs.factor},
                  {"low_freq_factor", rs.low_freq_factor},
                  {"high_freq_factor", rs.high_freq_factor},
                  {"original_max_position_embeddings", static_cast<double>(rs.original_max_positions)}};
  for (const auto& p : positive) {
    if (!(p.value > 0) || !std::isfinite(p.value)) {
      return invalid_argument(std::string("model.rope_scaling.") + p.key + ": must be finite and > 0, got " +
                              format_number(p.value));
    }
  }
  if (!(rs.high_freq_factor > rs.low_freq_factor)) {
    return invalid_argument("model.rope_scaling.high_freq_factor: must be above low_freq_factor " +
                            format_number(rs.low_freq_factor) + ", got " + format_number(rs.high_freq_factor));
  }
  return Status::ok();
}

}  // namespace

Status Config::validate() const {
  const ReattentionConfig& r = reattention;
  struct Minimum {
    const char* key;
    int64_t value;
    int64_t min;
  };
  const Minimum minimums[] = {
      {"model.layers", model.layers, 1},
      {"model.q_heads", model.q_heads, 1},
      {"model.kv_heads", model.kv_heads, 1},
      {"model.head_dim", model.head_dim, 1},
      {"model.scope", model.scope, 1},
      {"reattention.sink_tokens", r.sink_tokens, 0},
      {"reattention.local_window", r.local_window, 1},
      {"reattention.chunk_tokens", r.chunk_tokens, 1},
      {"reattention.top_k", r.top_k, 1},
      {"reattention.max_recall_chunks", r.max_recall_chunks, 1},
      {"reattention.span_tokens", r.span_tokens, 1},
      {"reattention.max_recall_tokens", r.max_recall_tokens, 1},
      {"backend.threads", backend.threads, 0},
      {"capacity.tokens_per_rank", capacity.tokens_per_rank, 1},
      {"capacity.max_contexts", capacity.max_contexts, 1},
      {"server.max_body_bytes", server.max_body_bytes, 1},
      {"server.queue_depth", server.queue_depth, 1},
      {"server.max_batch", server.max_batch, 1},
      {"server.http_threads", server.http_threads, 1},
      {"server.request_timeout_s", server.request_timeout_s, 1},
      {"server.max_connections", server.max_connections, 1},
      {"server.busy_poll_us", server.busy_poll_us, -1},
      {"server.load_slice_bytes", server.load_slice_bytes, 1},
  };
  // Capacity sums over ranks; keep it far from int64 overflow.
  if (capacity.tokens_per_rank > (int64_t{1} << 40)) {
    return invalid_argument("capacity.tokens_per_rank: must be <= 2^40, got " + std::to_string(capacity.tokens_per_rank));
  }
  for (const Minimum& m : minimums) {
    if (m.value < m.min) {
      return invalid_argument(std::string(m.key) + ": must be >= " + std::to_string(m.min) +
                              ", got " + std::to_string(m.value));
    }
  }
  if (server.busy_poll_us > 1000000) {
    return invalid_argument("server.busy_poll_us: must be <= 1000000 (1 s), got " +
                            std::to_string(server.busy_poll_us));
  }
  if (model.head_dim % 2 != 0) {
    return invalid_argument("model.head_dim: must be even, got " + std::to_string(model.head_dim));
  }
  if (model.q_heads % model.kv_heads != 0) {
    return invalid_argument("model.kv_heads: " + std::to_string(model.kv_heads) +
                            " does not divide model.q_heads " + std::to_string(model.q_heads));
  }
  const std::pair<const char*, double> deadlines[] = {
      {"server.step_deadline_s", server.step_deadline_s},
      {"server.operation_deadline_s", server.operation_deadline_s},
      {"server.heartbeat_s", server.heartbeat_s},
      {"server.queue_deadline_s", server.queue_deadline_s},
      {"server.drain_deadline_s", server.drain_deadline_s},
  };
  for (const auto& [key, seconds] : deadlines) {
    if (!(seconds > 0) || !std::isfinite(seconds) || seconds > 86400) {
      return invalid_argument(std::string(key) + ": must be a number of seconds in (0, 86400], got " +
                              format_number(seconds));
    }
  }
  if (!(model.rope_theta > 0) || !std::isfinite(model.rope_theta)) {
    return invalid_argument("model.rope_theta: must be finite and > 0, got " +
                            format_number(model.rope_theta));
  }
  REATTN_RETURN_IF_ERROR(check_rope_scaling(model.rope_scaling));
  // The scope rule; overflow-checked: a huge value must not wrap round and pass.
  const bool spans = r.recall == RecallMode::kSpan;
  const int64_t recall_count = spans ? r.max_recall_tokens : r.max_recall_chunks;
  const int64_t recall_width = spans ? r.span_tokens : r.chunk_tokens;
  int64_t span = 0;
  const bool overflow = __builtin_mul_overflow(recall_count, recall_width, &span) ||
                        __builtin_add_overflow(span, r.sink_tokens, &span) ||
                        __builtin_add_overflow(span, r.local_window, &span) ||
                        __builtin_add_overflow(span, r.chunk_tokens, &span);
  if (overflow || span > model.scope) {
    const std::string terms = spans ? "max_recall_tokens*span_tokens" : "max_recall_chunks*chunk_tokens";
    return invalid_argument("reattention (recall: " + std::string(recall_mode_name(r.recall)) +
                            "): sink_tokens + " + terms + " + local_window + chunk_tokens = " +
                            std::to_string(r.sink_tokens) + " + " + std::to_string(recall_count) + "*" +
                            std::to_string(recall_width) + " + " + std::to_string(r.local_window) + " + " +
                            std::to_string(r.chunk_tokens) + " = " +
                            (overflow ? std::string("(overflows int64)") : std::to_string(span)) +
                            " exceeds model.scope " + std::to_string(model.scope));
  }
  if (!parse_listen(server.listen)) {
    return invalid_argument("server.listen: expected host:port with port 0..65535 (0: any free port), got '" +
                            server.listen + "'");
  }
  return Status::ok();
}

Expected<ListenAddress> parse_listen(const std::string& listen) {
  const auto bad = [&] {
    return invalid_argument("listen: expected host:port with port 0..65535 (0: any free port), got '" + listen + "'");
  };
  const size_t colon = listen.rfind(':');
  if (colon == std::string::npos || colon == 0) return bad();
  const std::string port = listen.substr(colon + 1);
  if (port.empty() || port.size() > 5 || port.find_first_not_of("0123456789") != std::string::npos) return bad();
  ListenAddress out;
  out.port = std::stoi(port);
  if (out.port > 65535) return bad();
  out.host = listen.substr(0, colon);
  if (out.host.size() >= 2 && out.host.front() == '[' && out.host.back() == ']') {
    out.host = out.host.substr(1, out.host.size() - 2);
  }
  if (out.host == "localhost") out.host = "127.0.0.1";
  return out;
}

float Config::max_stored_value() const {
  const bool gpu_f16 = backend.kind != BackendKind::kCpu && backend.storage_dtype == DType::kF16;
  if (gpu_f16) return 65504.0f;
  // B = 2^e with 2 + log2(head_dim) + 2e <= 127: products and their sums keep a factor 2 of room.
  int log2_dim = 0;
  while ((int64_t{1} << log2_dim) < std::max(model.head_dim, 1)) ++log2_dim;
  return std::ldexp(1.0f, (125 - log2_dim) / 2);
}

std::string Config::to_yaml() const {
  std::string dtype = dtype_name(backend.storage_dtype);
  for (char& ch : dtype) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));

  YAML::Emitter out;
  auto section = [&](const char* name) {
    out << YAML::Key << name << YAML::Value << YAML::BeginMap;
  };
  auto put = [&](const char* key, const auto& value) { out << YAML::Key << key << YAML::Value << value; };
  // Quoted so that names like "null" or "" read back as the same string.
  auto put_string = [&](const char* key, const std::string& value) {
    out << YAML::Key << key << YAML::Value << YAML::DoubleQuoted << value;
  };

  out << YAML::BeginMap;
  section("model");
  put("layers", model.layers);
  put("q_heads", model.q_heads);
  put("kv_heads", model.kv_heads);
  put("head_dim", model.head_dim);
  put("rope_theta", format_number(model.rope_theta));
  put("scope", model.scope);
  if (model.rope_scaling.type != RopeScalingType::kNone) {
    section("rope_scaling");
    put("type", rope_scaling_name(model.rope_scaling.type));
    put("factor", format_number(model.rope_scaling.factor));
    put("low_freq_factor", format_number(model.rope_scaling.low_freq_factor));
    put("high_freq_factor", format_number(model.rope_scaling.high_freq_factor));
    put("original_max_position_embeddings", model.rope_scaling.original_max_positions);
    out << YAML::EndMap;
  }
  out << YAML::EndMap;

  section("reattention");
  put("sink_tokens", reattention.sink_tokens);
  put("local_window", reattention.local_window);
  put("chunk_tokens", reattention.chunk_tokens);
  put("top_k", reattention.top_k);
  put("max_recall_chunks", reattention.max_recall_chunks);
  put("final_attention", final_attention_name(reattention.final_attention));
  put("recall", recall_mode_name(reattention.recall));
  put("span_tokens", reattention.span_tokens);
  put("max_recall_tokens", reattention.max_recall_tokens);
  out << YAML::EndMap;

  section("backend");
  put("kind", backend_kind_name(backend.kind));
  put("storage_dtype", dtype);
  put("threads", backend.threads);
  out << YAML::EndMap;

  section("capacity");
  put("tokens_per_rank", capacity.tokens_per_rank);
  put("max_contexts", capacity.max_contexts);
  out << YAML::EndMap;

  section("server");
  put_string("listen", server.listen);
  put("max_body_bytes", server.max_body_bytes);
  put_string("api_key_file", server.api_key_file);
  put("queue_depth", server.queue_depth);
  put("max_batch", server.max_batch);
  put("http_threads", server.http_threads);
  put("request_timeout_s", server.request_timeout_s);
  put("step_deadline_s", format_number(server.step_deadline_s));
  put("operation_deadline_s", format_number(server.operation_deadline_s));
  put("heartbeat_s", format_number(server.heartbeat_s));
  put("queue_deadline_s", format_number(server.queue_deadline_s));
  put("drain_deadline_s", format_number(server.drain_deadline_s));
  put("max_connections", server.max_connections);
  put("busy_poll_us", server.busy_poll_us);
  put_string("load_root", server.load_root);
  put("load_slice_bytes", server.load_slice_bytes);
  put_string("snapshot_dir", server.snapshot_dir);
  out << YAML::EndMap;
  out << YAML::EndMap;
  return std::string(out.c_str()) + "\n";
}

Expected<Config> load_config_string(const std::string& yaml_text, const std::string& origin) {
  Expected<Config> config = [&]() -> Expected<Config> {
    try {
      return parse_config(YAML::Load(yaml_text));
    } catch (const std::exception& e) {  // yaml-cpp reports syntax errors by throwing
      return invalid_argument(e.what());
    }
  }();
  if (!config) return invalid_argument(origin + ": " + config.status().message());
  return config;
}

Expected<Config> load_config_file(const std::string& path) {
  std::error_code ec;
  if (std::filesystem::is_directory(path, ec)) {
    return invalid_argument("config file '" + path + "' is a directory");
  }
  std::ifstream in(path, std::ios::binary);
  if (!in) return invalid_argument("cannot open config file '" + path + "'");
  std::ostringstream text;
  text << in.rdbuf();
  if (in.bad()) return invalid_argument("cannot read config file '" + path + "'");
  return load_config_string(text.str(), path);
}

}  // namespace reattn
