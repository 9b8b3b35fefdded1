// A snapshot of one context on disk: the directory `<snapshot_dir>/<name>/` holds one
// safetensors file per rank of the job that wrote it (`rank-<r>.safetensors`: that rank's home
// blocks of every layer, and the owner's sinks) and `manifest.json`, written last. A snapshot
// is complete iff `<name>/manifest.json` exists (it is written in `.tmp-<name>-<tag>/` and the
// directory renamed into place). This file is the manifest's codec and the checks around it:
// the snapshot name rule, whether a snapshot fits a config, and which blocks each file holds.
// Plain data and pure functions; thread-safe.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "common/config.h"
#include "common/dtype.h"
#include "common/status.h"

namespace reattn {

constexpr int kSnapshotFormatVersion = 1;
constexpr const char* kSnapshotManifestFile = "manifest.json";
constexpr const char* kSnapshotTmpPrefix = ".tmp-";

// One rank's file. It holds home blocks j = rank, rank + world, ... of every layer (slot
// j / world is row j / world of the layer's tensors) and, on the owner, the sinks.
struct SnapshotFile {
  std::string file;                 // "rank-<r>.safetensors", inside the snapshot directory
  int rank = 0;
  uint64_t bytes = 0;               // the whole file
  uint32_t crc32 = 0;               // zlib crc32 of the whole file
  std::vector<int64_t> layer_blocks;  // [layers]: home blocks held per layer
  bool sinks = false;
};

struct SnapshotManifest {
  int format_version = kSnapshotFormatVersion;
  std::string name;
  std::string created;              // UTC, ISO 8601 ("2026-11-30T19:04:05Z")
  // The model shape and storage dtype the blocks were written in.
  int layers = 0;
  int kv_heads = 0;
  int head_dim = 0;
  DType dtype = DType::kF32;
  // The reattention config that decides placement (block grid) and regions.
  int64_t sink_tokens = 0;
  int64_t chunk_tokens = 0;
  int64_t local_window = 0;
  // The context as snapshotted.
  int world = 1;                    // ranks of the job that wrote it (one file each)
  int owner_rank = 0;
  uint64_t context_id = 0;
  std::vector<int64_t> layer_tokens;  // [layers]
  std::vector<SnapshotFile> files;    // [world], by rank

  // What every layer has reached (the shortest layer), as the registry reports it.
  int64_t tokens() const;
  uint64_t total_bytes() const;
};

// `[A-Za-z0-9][A-Za-z0-9._-]{0,63}`: never a path, never hidden, never "." or "..".
Status check_snapshot_name(const std::string& name);
std::string snapshot_file_name(int rank);

// Home blocks of a layer of `layer_tokens` tokens that rank `rank` of `world` holds: the
// chunk-grid blocks j (partial last block included) with j mod world == rank.
int64_t home_blocks_held(int64_t layer_tokens, int64_t sink_tokens, int64_t chunk_tokens, int rank, int world);
// The manifest's expected file for `rank` (everything but bytes and crc32).
SnapshotFile expected_snapshot_file(const SnapshotManifest& m, int rank);

// Pretty-printed JSON (stable key order).
std::string encode_manifest(const SnapshotManifest& m);
// Strict: every field present with the right type and in range, the files agree with the
// layer lengths (expected_snapshot_file); errors name `origin` and the field.
Expected<SnapshotManifest> decode_manifest(const std::string& text, const std::string& origin);

// InvalidArgument naming every way the snapshot differs from what this service stores
// (model shape, storage dtype, sink_tokens, chunk_tokens), or ok.
Status check_manifest_fits(const SnapshotManifest& m, const Config& config, DType storage_dtype);

}  // namespace reattn
