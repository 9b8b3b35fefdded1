// The cpu backend: the multi-threaded (OpenMP) reference kernels over host memory, fp32
// storage. Deterministic: results do not depend on the thread count.
#pragma once

#include "kernels/backend.h"

namespace reattn {

class CpuBackend final : public Backend {
 public:
  explicit CpuBackend(int threads);  // 0: all hardware threads

  const char* name() const override { return "cpu"; }
  DType storage_dtype() const override { return DType::kF32; }
  bool host_memory() const override { return true; }

  Expected<Buffer> allocate(size_t bytes) override;
  void release(void* data) override;
  Status upload(void* dst, const void* host_src, size_t bytes) override;
  Status download(void* host_dst, const void* src, size_t bytes) override;
  Status copy(void* dst, const void* src, size_t bytes) override;
  Status upload_pieces(const void* host_src, size_t bytes, const UploadPiece* pieces, int64_t count) override;
  Status synchronize() override { return Status::ok(); }

  Status score_chunks(const ScoreParams& p) override;
  Status attend(const AttendParams& p) override;
  Status merge_states(const MergeParams& p) override;
  Status pack_blocks(const PackParams& p) override;
  Status score_tokens(const ScoreParams& p) override;
  Status copy_ranges(const CopyRangesParams& p) override;
  Status merge_select(const MergeSelectParams& p) override;

 private:
  int threads_;
};

}  // namespace reattn
