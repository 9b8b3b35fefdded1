#include "worker/kv_load.h"

#include <sys/stat.h>

#include <memory>
#include <string>
#include <utility>

#include "common/file_roots.h"

namespace reattn {
namespace {

// File tokens [first, first + count) of a load's file (read, and checked, by the file source).
class FileSlice final : public KvSource {
 public:
  FileSlice(const FileKvSource& file, int64_t first, int64_t count) : file_(file), first_(first), count_(count) {}
  int64_t tokens() const override { return count_; }
  void read(int layer, int kv_head, int64_t offset, int64_t count, DType dtype, void* k, void* v) const override {
    file_.read(layer, kv_head, first_ + offset, count, dtype, k, v);
  }

 private:
  const FileKvSource& file_;
  int64_t first_;
  int64_t count_;
};

}  // namespace

Status KvLoads::begin(const LoadKv& op) {
  if (loads_.count(op.context_id)) {
    return internal_error("context " + std::to_string(op.context_id) + " already has a load under way");
  }
  const ContextShard* ctx = store_.find(op.context_id);
  if (!ctx) return not_found("context " + std::to_string(op.context_id) + " not found");
  if (ctx->tokens != op.context_tokens) {
    return internal_error("context " + std::to_string(op.context_id) + " holds " + std::to_string(ctx->tokens) +
                          " tokens here, rank 0 saw " + std::to_string(op.context_tokens));
  }
  REATTN_ASSIGN_OR_RETURN(const std::string path, resolve_under_root(config_.server.load_root, op.path, "server.load_root"));
  REATTN_ASSIGN_OR_RETURN(std::unique_ptr<FileKvSource> source,
                          FileKvSource::open(path, config_.model, config_.max_stored_value()));
  if (source->tokens() != op.file_tokens) {
    return invalid_argument("the file holds " + std::to_string(source->tokens()) + " tokens on this rank, " +
                            std::to_string(op.file_tokens) + " when the load was requested (it changed)");
  }
  REATTN_ASSIGN_OR_RETURN(KvCheckpoint checkpoint, store_.checkpoint(op.context_id));
  // The first slice's reads start now, while queries run before it.
  source->read_ahead(0, op.count);
  const int64_t bytes = source->file_bytes();
  loads_[op.context_id] = Load{std::move(source), std::move(checkpoint), path, bytes};
  return Status::ok();
}

Status KvLoads::slice(const LoadKv& op, double* read_ms) {
  const auto it = loads_.find(op.context_id);
  if (it == loads_.end()) return internal_error("no load under way on context " + std::to_string(op.context_id));
  const FileKvSource& file = *it->second.file;
  // A file replaced, cut short or rewritten since the last slice fails here, by name; one cut
  // short during this slice, in the reads (a short pread: FileKvSource).
  struct stat st{};
  if (::stat(it->second.path.c_str(), &st) != 0 || st.st_size < it->second.file_bytes) {
    return invalid_argument("the load file was removed or truncated while it was being loaded");
  }
  REATTN_RETURN_IF_ERROR(file.unchanged());
  if (op.offset < 0 || op.count < 1 || op.offset > file.tokens() - op.count) {
    return internal_error("load slice [" + std::to_string(op.offset) + ", +" + std::to_string(op.count) +
                          ") is outside the file's " + std::to_string(file.tokens()) + " tokens");
  }
  const FileSlice slice(file, op.offset, op.count);
  // The owner copies into its ring only the blocks that are there at the end of the whole load.
  const int64_t load_end = it->second.checkpoint.tokens + file.tokens();
  const double read_before = file.read_ms();
  const Status appended = store_.append(op.context_id, slice, -1, load_end);
  if (read_ms) *read_ms = file.read_ms() - read_before;
  REATTN_RETURN_IF_ERROR(appended);
  // A failed slice is followed by the load's abort, which puts the context back.
  REATTN_RETURN_IF_ERROR(file.problem());
  // The next slice's reads start now, while queries run between the slices.
  file.read_ahead(op.offset + op.count, op.count);
  return Status::ok();
}

Status KvLoads::abort(ContextId id) {
  const auto it = loads_.find(id);
  if (it == loads_.end()) return Status::ok();
  const Status restored = store_.restore(it->second.checkpoint);
  loads_.erase(it);
  return restored;
}

}  // namespace reattn
