// The CUDA backend: KV cache and step workspaces in GPU memory (cudaMalloc, no managed
// memory), every operation on one stream of the device `local_rank`. Storage dtype bf16 or
// f16 (fp32 accumulation); head_dim 64 or 128. Call only from the step loop's thread.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <memory>
#include <unordered_map>

#include "kernels/backend.h"
#include "kernels/cuda/kernels.h"

namespace reattn {

// CUDA devices visible to this process; 0 when there is no driver or no GPU (never fails).
int cuda_device_count();

// Whether the CUDA backend supports the config's shapes and storage dtype (bf16/f16,
// head_dim 64 or 128, top_k <= cuda::kMaxTopK); the error names the key. Needs no GPU.
Status cuda_backend_supports(const Config& config);

Expected<std::unique_ptr<Backend>> make_cuda_backend(const Config& config, int local_rank);

class CudaBackend final : public Backend {
 public:
  ~CudaBackend() override;
  const char* name() const override { return "cuda"; }
  DType storage_dtype() const override { return dtype_; }
  bool host_memory() const override { return false; }

  Expected<Buffer> allocate(size_t bytes) override;
  void release(void* data) override;
  // The host buffer may be reused as soon as this returns; ordered with later work.
  Status upload(void* dst, const void* host_src, size_t bytes) override;
  // Complete when it returns.
  Status download(void* host_dst, const void* src, size_t bytes) override;
  Status copy(void* dst, const void* src, size_t bytes) override;
  // Small lists: the pieces and their bytes go into the pinned ring and one kernel reads them
  // from there (mapped host memory) and writes every piece; no host wait.
  Status upload_pieces(const void* host_src, size_t bytes, const UploadPiece* pieces, int64_t count) override;
  Status synchronize() override;

  Status score_chunks(const ScoreParams& p) override;
  Status attend(const AttendParams& p) override;
  Status merge_states(const MergeParams& p) override;
  Status pack_blocks(const PackParams& p) override;
  Status score_tokens(const ScoreParams& p) override;
  Status copy_ranges(const CopyRangesParams& p) override;
  Status merge_select(const MergeSelectParams& p) override;

  // The one stream every operation of this backend runs on (the communicator uses it too).
  cudaStream_t stream() const { return stream_; }
  int device() const { return info_.device; }
  const cuda::DeviceInfo& device_info() const { return info_; }
  // Bytes allocated through allocate() (live now, and the most at any time).
  size_t allocated_bytes() const { return live_bytes_; }
  size_t peak_allocated_bytes() const { return peak_bytes_; }
  // Starts a new peak measurement from what is live now.
  void reset_peak_allocated_bytes() { peak_bytes_ = live_bytes_; }

 private:
  friend Expected<std::unique_ptr<Backend>> make_cuda_backend(const Config& config, int local_rank);
  CudaBackend() = default;
  // Grows a scratch allocation (not counted as KV) only when a larger size is asked for.
  Status ensure_scratch(void** ptr, size_t* capacity, size_t bytes);
  // `bytes` (at most kRingBytes / 4) of the pinned ring, free once the work queued before
  // it has finished; record ring_done_ after the work that reads it.
  Expected<char*> ring_slot(size_t bytes);
  // The RoPE cos/sin table covering positions [0, positions) for (theta, scaling, head_dim).
  Status ensure_rope_table(double theta, const RopeScaling& scaling, int head_dim, int64_t positions);

  DType dtype_ = DType::kBF16;
  cuda::DeviceInfo info_;
  cudaStream_t stream_ = nullptr;
  std::unordered_map<void*, size_t> sizes_;
  size_t live_bytes_ = 0;
  size_t peak_bytes_ = 0;

  // Small uploads go through a pinned ring (truly asynchronous copies); the ring is reused
  // from its start once every copy recorded in ring_done_ has finished.
  static constexpr size_t kRingBytes = 4u << 20;
  char* ring_ = nullptr;
  char* ring_device_ = nullptr;  // the ring as the device addresses it; null: not mapped
  size_t ring_head_ = 0;
  cudaEvent_t ring_done_ = nullptr;

  void* score_ws_ = nullptr;
  size_t score_ws_bytes_ = 0;
  void* attend_ws_ = nullptr;
  size_t attend_ws_bytes_ = 0;
  void* select_ws_ = nullptr;
  size_t select_ws_bytes_ = 0;
  void* rope_ws_ = nullptr;  // [positions][D/2] cos, then sin, then inv_freq [D/2] double
  size_t rope_ws_bytes_ = 0;
  double rope_theta_ = 0.0;
  RopeScaling rope_scaling_;
  int rope_dim_ = 0;
  int64_t rope_positions_ = 0;
};

}  // namespace reattn
