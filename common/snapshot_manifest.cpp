#include "common/snapshot_manifest.h"

#include <algorithm>
#include <limits>

#include <nlohmann/json.hpp>

#include "common/excerpt.h"
#include "common/json_shape.h"

namespace reattn {
namespace {

using nlohmann::json;
using nlohmann::ordered_json;

// Reads the fields of one JSON object, remembering the first problem.
class Fields {
 public:
  Fields(const json& object, std::string where) : object_(object), where_(std::move(where)) {}

  template <typename T>
  void integer(const char* key, T* out, int64_t lo, int64_t hi) {
    const json* v = find(key);
    if (!v) return;
    if (!v->is_number_integer()) return fail(key, "must be an integer, got " + json_excerpt(*v));
    int64_t x = 0;
    if (v->is_number_unsigned()) {
      const uint64_t u = v->get<uint64_t>();
      if (u > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) return fail(key, "is out of range");
      x = static_cast<int64_t>(u);
    } else {
      x = v->get<int64_t>();
    }
    if (x < lo || x > hi) {
      return fail(key, "must be in [" + std::to_string(lo) + ", " + std::to_string(hi) + "], got " + std::to_string(x));
    }
    *out = static_cast<T>(x);
  }
  void unsigned_integer(const char* key, uint64_t* out) {
    const json* v = find(key);
    if (!v) return;
    if (!v->is_number_unsigned()) return fail(key, "must be a non-negative integer, got " + json_excerpt(*v));
    *out = v->get<uint64_t>();
  }
  void string(const char* key, std::string* out) {
    const json* v = find(key);
    if (!v) return;
    if (!v->is_string()) return fail(key, "must be a string, got " + json_excerpt(*v));
    *out = v->get<std::string>();
  }
  void boolean(const char* key, bool* out) {
    const json* v = find(key);
    if (!v) return;
    if (!v->is_boolean()) return fail(key, "must be true or false, got " + json_excerpt(*v));
    *out = v->get<bool>();
  }
  void integers(const char* key, std::vector<int64_t>* out, size_t count, int64_t hi) {
    const json* v = find(key);
    if (!v) return;
    if (!v->is_array() || v->size() != count) {
      return fail(key, "must be an array of " + std::to_string(count) + " integers, got " + json_excerpt(*v));
    }
    out->clear();
    for (const json& x : *v) {
      if (!x.is_number_integer() || x.get<int64_t>() < 0 || x.get<int64_t>() > hi) {
        return fail(key, "entries must be integers in [0, " + std::to_string(hi) + "], got " + json_excerpt(x));
      }
      out->push_back(x.get<int64_t>());
    }
  }
  const json* array(const char* key) {
    const json* v = find(key);
    if (v && !v->is_array()) {
      fail(key, "must be an array, got " + json_excerpt(*v));
      return nullptr;
    }
    return v;
  }
  const Status& status() const { return status_; }

 private:
  const json* find(const char* key) {
    if (!status_.is_ok()) return nullptr;
    const auto it = object_.find(key);
    if (it == object_.end()) {
      status_ = invalid_argument(where_ + ": '" + key + "' is missing");
      return nullptr;
    }
    return &*it;
  }
  void fail(const char* key, const std::string& why) {
    if (status_.is_ok()) status_ = invalid_argument(where_ + ": '" + key + "' " + why);
  }

  const json& object_;
  std::string where_;
  Status status_;
};

bool name_char(char c, bool first) {
  const bool alnum = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9');
  return alnum || (!first && (c == '.' || c == '_' || c == '-'));
}

constexpr int64_t kMaxTokens = int64_t{1} << 40;

}  // namespace

int64_t SnapshotManifest::tokens() const {
  return layer_tokens.empty() ? 0 : *std::min_element(layer_tokens.begin(), layer_tokens.end());
}

uint64_t SnapshotManifest::total_bytes() const {
  uint64_t total = 0;
  for (const SnapshotFile& f : files) total += f.bytes;
  return total;
}

Status check_snapshot_name(const std::string& name) {
  if (name.empty() || name.size() > 64) {
    return invalid_argument("snapshot name must be 1 to 64 characters, got " + std::to_string(name.size()));
  }
  for (size_t i = 0; i < name.size(); ++i) {
    if (!name_char(name[i], i == 0)) {
      return invalid_argument("snapshot name '" + capped(name, 64) +
                              "' must match [A-Za-z0-9][A-Za-z0-9._-]{0,63} (no path characters)");
    }
  }
  return Status::ok();
}

std::string snapshot_file_name(int rank) { return "rank-" + std::to_string(rank) + ".safetensors"; }

int64_t home_blocks_held(int64_t layer_tokens, int64_t sink_tokens, int64_t chunk_tokens, int rank, int world) {
  if (layer_tokens <= sink_tokens) return 0;
  const int64_t blocks = (layer_tokens - sink_tokens + chunk_tokens - 1) / chunk_tokens;
  return blocks > rank ? (blocks - rank + world - 1) / world : 0;
}

SnapshotFile expected_snapshot_file(const SnapshotManifest& m, int rank) {
  SnapshotFile f;
  f.file = snapshot_file_name(rank);
  f.rank = rank;
  f.sinks = rank == m.owner_rank;
  for (int64_t n : m.layer_tokens) {
    f.layer_blocks.push_back(home_blocks_held(n, m.sink_tokens, m.chunk_tokens, rank, m.world));
  }
  return f;
}

std::string encode_manifest(const SnapshotManifest& m) {
  ordered_json files = ordered_json::array();
  for (const SnapshotFile& f : m.files) {
    files.push_back({{"file", f.file},
                     {"rank", f.rank},
                     {"bytes", f.bytes},
                     {"crc32", f.crc32},
                     {"layer_blocks", f.layer_blocks},
                     {"sinks", f.sinks}});
  }
  ordered_json doc = {
      {"format", "reattn-snapshot"},
      {"format_version", m.format_version},
      {"name", m.name},
      {"created", m.created},
      {"model", {{"layers", m.layers}, {"kv_heads", m.kv_heads}, {"head_dim", m.head_dim}, {"dtype", dtype_name(m.dtype)}}},
      {"reattention",
       {{"sink_tokens", m.sink_tokens}, {"chunk_tokens", m.chunk_tokens}, {"local_window", m.local_window}}},
      {"context",
       {{"id", m.context_id}, {"owner_rank", m.owner_rank}, {"world", m.world}, {"layer_tokens", m.layer_tokens}}},
      {"files", files}};
  return doc.dump(2) + "\n";
}

Expected<SnapshotManifest> decode_manifest(const std::string& text, const std::string& origin) {
  // A manifest holds a few values per layer and file: bounded before its DOM is built.
  if (const std::string why = json_shape_refusal(check_json_shape(text.data(), text.data() + text.size()));
      !why.empty()) {
    return invalid_argument(origin + ": " + why);
  }
  const json doc = json::parse(text, nullptr, false);
  if (doc.is_discarded() || !doc.is_object()) return invalid_argument(origin + ": not a JSON object");
  SnapshotManifest m;
  std::string format;
  Fields top(doc, origin);
  top.string("format", &format);
  top.integer("format_version", &m.format_version, 0, 1 << 20);
  REATTN_RETURN_IF_ERROR(top.status());
  if (format != "reattn-snapshot") return invalid_argument(origin + ": 'format' must be \"reattn-snapshot\"");
  if (m.format_version != kSnapshotFormatVersion) {
    return invalid_argument(origin + ": format_version " + std::to_string(m.format_version) +
                            " is not the one this build reads (" + std::to_string(kSnapshotFormatVersion) + ")");
  }
  top.string("name", &m.name);
  top.string("created", &m.created);
  REATTN_RETURN_IF_ERROR(top.status());
  REATTN_RETURN_IF_ERROR(check_snapshot_name(m.name));
  for (const char* section : {"model", "reattention", "context"}) {
    if (!doc.contains(section) || !doc[section].is_object()) {
      return invalid_argument(origin + ": '" + section + "' must be an object");
    }
  }
  Fields model(doc["model"], origin + ": model");
  std::string dtype;
  model.integer("layers", &m.layers, 1, 1 << 16);
  model.integer("kv_heads", &m.kv_heads, 1, 1 << 16);
  model.integer("head_dim", &m.head_dim, 1, 1 << 16);
  model.string("dtype", &dtype);
  REATTN_RETURN_IF_ERROR(model.status());
  Expected<DType> parsed = parse_dtype(dtype);
  if (!parsed) return invalid_argument(origin + ": model.dtype: " + parsed.status().message());
  m.dtype = *parsed;
  Fields rc(doc["reattention"], origin + ": reattention");
  rc.integer("sink_tokens", &m.sink_tokens, 0, kMaxTokens);
  rc.integer("chunk_tokens", &m.chunk_tokens, 1, kMaxTokens);
  rc.integer("local_window", &m.local_window, 0, kMaxTokens);
  REATTN_RETURN_IF_ERROR(rc.status());
  Fields ctx(doc["context"], origin + ": context");
  ctx.unsigned_integer("id", &m.context_id);
  ctx.integer("world", &m.world, 1, 1 << 16);
  ctx.integer("owner_rank", &m.owner_rank, 0, 1 << 16);
  ctx.integers("layer_tokens", &m.layer_tokens, static_cast<size_t>(m.layers), kMaxTokens);
  REATTN_RETURN_IF_ERROR(ctx.status());
  if (m.owner_rank >= m.world) {
    return invalid_argument(origin + ": context.owner_rank " + std::to_string(m.owner_rank) + " is outside [0, " +
                            std::to_string(m.world) + ")");
  }
  const json* files = top.array("files");
  REATTN_RETURN_IF_ERROR(top.status());
  if (files->size() != static_cast<size_t>(m.world)) {
    return invalid_argument(origin + ": 'files' must list one file per rank (" + std::to_string(m.world) + "), got " +
                            std::to_string(files->size()));
  }
  for (int r = 0; r < m.world; ++r) {
    const json& entry = (*files)[r];
    const std::string where = origin + ": files[" + std::to_string(r) + "]";
    if (!entry.is_object()) return invalid_argument(where + " must be an object");
    SnapshotFile f;
    Fields fields(entry, where);
    int64_t crc = 0;
    fields.string("file", &f.file);
    fields.integer("rank", &f.rank, 0, 1 << 16);
    fields.unsigned_integer("bytes", &f.bytes);
    fields.integer("crc32", &crc, 0, 0xffffffffll);
    fields.integers("layer_blocks", &f.layer_blocks, static_cast<size_t>(m.layers), kMaxTokens);
    fields.boolean("sinks", &f.sinks);
    REATTN_RETURN_IF_ERROR(fields.status());
    f.crc32 = static_cast<uint32_t>(crc);
    const SnapshotFile want = expected_snapshot_file(m, r);
    if (f.file != want.file || f.rank != r || f.layer_blocks != want.layer_blocks || f.sinks != want.sinks) {
      return invalid_argument(where + " does not match the context's layer lengths and owner (want file '" +
                              want.file + "', rank " + std::to_string(r) + ")");
    }
    m.files.push_back(std::move(f));
  }
  return m;
}

Status check_manifest_fits(const SnapshotManifest& m, const Config& config, DType storage_dtype) {
  std::string diffs;
  const auto differ = [&](const char* what, const std::string& theirs, const std::string& ours) {
    if (theirs == ours) return;
    diffs += (diffs.empty() ? "" : ", ") + std::string(what) + " " + theirs + " (this service: " + ours + ")";
  };
  differ("model.layers", std::to_string(m.layers), std::to_string(config.model.layers));
  differ("model.kv_heads", std::to_string(m.kv_heads), std::to_string(config.model.kv_heads));
  differ("model.head_dim", std::to_string(m.head_dim), std::to_string(config.model.head_dim));
  differ("storage dtype", dtype_name(m.dtype), dtype_name(storage_dtype));
  differ("reattention.sink_tokens", std::to_string(m.sink_tokens), std::to_string(config.reattention.sink_tokens));
  differ("reattention.chunk_tokens", std::to_string(m.chunk_tokens), std::to_string(config.reattention.chunk_tokens));
  if (diffs.empty()) return Status::ok();
  return invalid_argument("snapshot '" + m.name + "' does not fit this service: " + diffs);
}

}  // namespace reattn
