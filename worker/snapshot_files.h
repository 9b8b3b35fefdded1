// A rank's snapshot file: writing this rank's blocks of a context, and reading a snapshot's
// files back as a KvSource on any number of ranks.
//
// File layout (safetensors, tensors in this order, in the storage dtype):
//   layers.<l>.k, layers.<l>.v        [blocks, Hkv, C, D]: home blocks rank, rank + world, ...
//                                     of layer l in slot order (absent when it holds none)
//   layers.<l>.sink_k, .sink_v        [Hkv, S, D]: the owner's file only (absent when S = 0)
// Token rows past a layer's length (the tail of its last block or of the sinks) are zero.
// The crc32 (zlib) of the whole file is computed while it is written.
// Call only from the step loop's thread (the writer reads backend memory).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "common/safetensors.h"
#include "common/snapshot_manifest.h"
#include "worker/kv_source.h"
#include "worker/kv_store.h"

namespace reattn {

// "layers.<l>.<what>" (what: k, v, sink_k, sink_v).
std::string snapshot_tensor_name(int layer, const char* what);

// Writes this rank's blocks of one context to `<dir>/rank-<rank>.safetensors` (created, never
// overwritten) a few layers at a time, so a snapshot runs in slices between query steps; the
// context must not change in between (its operation keeps it busy). Backend memory goes to
// the host through a staging buffer of at most `staging_bytes`. Errors name the file and the
// system error ("File too large", "No space left on device": kCapacity). The file is removed
// unless finish() succeeded.
class SnapshotFileWriter {
 public:
  // Creates the file and writes its header (the layout of every layer, from `ctx` as it is).
  static Expected<std::unique_ptr<SnapshotFileWriter>> create(const KvStore& store, Backend& backend,
                                                              const Config& config, const ContextShard& ctx,
                                                              const std::string& dir, int rank, int world,
                                                              size_t staging_bytes = size_t{64} << 20);
  ~SnapshotFileWriter();
  // Layers [first, end), in order, continuing where the last call stopped. Returns bytes written.
  Expected<uint64_t> write_layers(const ContextShard& ctx, int first, int end);
  // After the last layer: fsync and close; the file's entry for the manifest.
  Expected<SnapshotFile> finish();

 private:
  struct File;
  SnapshotFileWriter(const KvStore& store, Backend& backend, const Config& config, int rank, int world);
  const KvStore& store_;
  Backend& backend_;
  const Config config_;
  int rank_;
  int world_;
  int next_layer_ = 0;
  SnapshotFile entry_;
  std::vector<char> staging_;
  size_t staging_blocks_ = 0;
  std::unique_ptr<File> file_;
};

// The whole file at once (create, every layer, finish).
Expected<SnapshotFile> write_snapshot_file(const KvStore& store, Backend& backend, const Config& config,
                                           const ContextShard& ctx, const std::string& dir, int rank, int world,
                                           size_t staging_bytes = size_t{64} << 20);

// Crash-safe publication on the rank that writes the manifest: writes `manifest.json` into
// `tmp_dir`, fsyncs it and the directory, renames `tmp_dir` to `final_dir` (which must not
// exist) and fsyncs their parent.
Status publish_snapshot(const std::string& tmp_dir, const std::string& final_dir, const SnapshotManifest& manifest);

// Reads a whole file and checks its size and crc32 against the manifest's entry; the error
// names the file (missing, truncated, or corrupt).
Status verify_snapshot_file(const std::string& dir, const SnapshotFile& file);

// A complete snapshot's files, mapped read-only, their tensors checked against the manifest
// (shapes and dtype). read() is const and thread-safe.
class SnapshotReader {
 public:
  static Expected<SnapshotReader> open(const std::string& dir, SnapshotManifest manifest);
  const SnapshotManifest& manifest() const { return manifest_; }
  // K and V of tokens [first, first + count) of `layer`, KV head `kv_head`, in `dtype`:
  // [count, D] each. The range lies within the layer's length.
  void read(int layer, int kv_head, int64_t first, int64_t count, DType dtype, void* k, void* v) const;
  // InvalidArgument naming a file that is no longer as long as the manifest says (cut short
  // under the mapping, reading it would kill the rank with SIGBUS). Before every read slice.
  Status check_unchanged() const;

 private:
  struct LayerTensors {
    const unsigned char* k = nullptr;  // [blocks, Hkv, C, D] or [Hkv, S, D]
    const unsigned char* v = nullptr;
  };
  SnapshotManifest manifest_;
  std::vector<SafetensorsFile> files_;           // [world at snapshot]
  std::vector<std::shared_ptr<const int>> fds_;  // [world at snapshot]: each file held open (fstat)
  std::vector<std::string> paths_;
  std::vector<std::vector<LayerTensors>> blocks_;  // [file][layer]
  std::vector<LayerTensors> sinks_;              // [layer], from the owner's file
};

// One layer of a snapshot, as appended to an empty context (offset = token).
class SnapshotKvSource final : public KvSource {
 public:
  SnapshotKvSource(const SnapshotReader& reader, int layer) : reader_(reader), layer_(layer) {}
  int64_t tokens() const override { return reader_.manifest().layer_tokens[layer_]; }
  void read(int layer, int kv_head, int64_t offset, int64_t count, DType dtype, void* k, void* v) const override {
    reader_.read(layer, kv_head, offset, count, dtype, k, v);
  }

 private:
  const SnapshotReader& reader_;
  int layer_;
};

}  // namespace reattn
