// A rank's side of bulk loads (LoadKv, common/protocol.h): each rank opens the safetensors file
// itself and reads (pread, never a mapping: FileKvSource) only the blocks it holds, slice by
// slice, checking their values as they are read; a checkpoint taken at the start puts the context back on abort.
// Call only from the step loop's thread (like the KvStore it writes to).
#pragma once

#include <map>
#include <memory>
#include <string>

#include "common/config.h"
#include "common/protocol.h"
#include "worker/kv_source.h"
#include "worker/kv_store.h"

namespace reattn {

class KvLoads {
 public:
  KvLoads(KvStore& store, const Config& config) : store_(store), config_(config) {}

  // Each returns this rank's outcome; the caller agrees it across ranks.
  // kBegin: resolves the path under server.load_root, opens the file, checks its header against
  // the model and op.file_tokens, the context's length against op.context_tokens, and takes
  // the checkpoint.
  Status begin(const LoadKv& op);
  // kSlice: appends file tokens [op.offset, op.offset + op.count) to every layer. A value that
  // cannot be stored fails it (the context is then left for abort to put back). read_ms: the
  // time its reads of the file took, summed over the threads that read.
  Status slice(const LoadKv& op, double* read_ms = nullptr);
  // kCommit: the load stays; its file and checkpoint are released.
  void commit(ContextId id) { loads_.erase(id); }
  // kAbort: the context as it was at kBegin (nothing to do where kBegin did not get as far).
  Status abort(ContextId id);

 private:
  struct Load {
    std::unique_ptr<FileKvSource> file;
    KvCheckpoint checkpoint;
    std::string path;     // the file's real path
    int64_t file_bytes;   // its size when it was opened
  };

  KvStore& store_;
  const Config config_;
  std::map<ContextId, Load> loads_;
};

}  // namespace reattn
