#include "worker/kv_load.h"

#include <sys/stat.h>

#include <mutex>
#include <string>
#include <utility>

#include "common/file_roots.h"
#include "common/tensor_checks.h"

namespace reattn {
namespace {

// File tokens [first, first + count) of a mapped file, with each value range checked
// (check_storable) as it is read: only the blocks a rank holds are ever read or checked.
class CheckedFileSlice final : public KvSource {
 public:
  CheckedFileSlice(const SafetensorsKvSource& file, int64_t first, int64_t count, int head_dim, float max_abs)
      : file_(file), first_(first), count_(count), head_dim_(head_dim), max_abs_(max_abs) {}
  int64_t tokens() const override { return count_; }
  void read(int layer, int kv_head, int64_t offset, int64_t count, DType dtype, void* k, void* v) const override {
    const KvTensors& kv = file_.tensors();
    const int64_t token = first_ + offset;
    for (const TensorView* t : {&kv.k, &kv.v}) {
      const int64_t element = ((static_cast<int64_t>(layer) * t->shape[1] + kv_head) * kv.tokens + token) * head_dim_;
      TensorView part{t->name, t->dtype, {count, head_dim_}, t->data + element * dtype_size(t->dtype),
                      static_cast<size_t>(count * head_dim_) * dtype_size(t->dtype)};
      const Status s = check_storable(part, max_abs_);
      if (!s.is_ok()) {
        note(invalid_argument("the file's values at layer " + std::to_string(layer) + ", kv head " +
                              std::to_string(kv_head) + ", tokens [" + std::to_string(token) + ", " +
                              std::to_string(token + count) + "): " + s.message()));
      }
    }
    file_.read(layer, kv_head, token, count, dtype, k, v);
  }
  // The first problem any read found.
  Status problem() const {
    std::lock_guard<std::mutex> lock(mu_);
    return problem_;
  }

 private:
  // Reads run on several threads at once: the first problem is kept under a lock.
  void note(Status s) const {
    std::lock_guard<std::mutex> lock(mu_);
    if (problem_.is_ok()) problem_ = std::move(s);
  }

  const SafetensorsKvSource& file_;
  int64_t first_;
  int64_t count_;
  int head_dim_;
  float max_abs_;
  mutable std::mutex mu_;
  mutable Status problem_;
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
  REATTN_ASSIGN_OR_RETURN(SafetensorsFile file, SafetensorsFile::open(path));
  REATTN_ASSIGN_OR_RETURN(SafetensorsKvSource source, SafetensorsKvSource::make(std::move(file), config_.model));
  if (source.tokens() != op.file_tokens) {
    return invalid_argument("the file holds " + std::to_string(source.tokens()) + " tokens on this rank, " +
                            std::to_string(op.file_tokens) + " when the load was requested (it changed)");
  }
  REATTN_ASSIGN_OR_RETURN(KvCheckpoint checkpoint, store_.checkpoint(op.context_id));
  struct stat st{};
  if (::stat(path.c_str(), &st) != 0) return invalid_argument("the load file vanished as it was opened");
  loads_[op.context_id] =
      Load{std::make_unique<SafetensorsKvSource>(std::move(source)), std::move(checkpoint), path, st.st_size};
  return Status::ok();
}

Status KvLoads::slice(const LoadKv& op) {
  const auto it = loads_.find(op.context_id);
  if (it == loads_.end()) return internal_error("no load under way on context " + std::to_string(op.context_id));
  const SafetensorsKvSource& file = *it->second.file;
  // Reading a mapped file that was cut short would kill the rank (SIGBUS): check its size first.
  struct stat st{};
  if (::stat(it->second.path.c_str(), &st) != 0 || st.st_size < it->second.file_bytes) {
    return invalid_argument("the load file was removed or truncated while it was being loaded");
  }
  if (op.offset < 0 || op.count < 1 || op.offset > file.tokens() - op.count) {
    return internal_error("load slice [" + std::to_string(op.offset) + ", +" + std::to_string(op.count) +
                          ") is outside the file's " + std::to_string(file.tokens()) + " tokens");
  }
  const CheckedFileSlice slice(file, op.offset, op.count, config_.model.head_dim, config_.max_stored_value());
  // The owner copies into its ring only the blocks that are there at the end of the whole load.
  const int64_t load_end = it->second.checkpoint.tokens + file.tokens();
  REATTN_RETURN_IF_ERROR(store_.append(op.context_id, slice, -1, load_end));
  return slice.problem();
}

Status KvLoads::abort(ContextId id) {
  const auto it = loads_.find(id);
  if (it == loads_.end()) return Status::ok();
  const Status restored = store_.restore(it->second.checkpoint);
  loads_.erase(it);
  return restored;
}

}  // namespace reattn
