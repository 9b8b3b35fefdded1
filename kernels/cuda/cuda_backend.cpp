#include "kernels/cuda/cuda_backend.h"

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "common/semantics.h"
#include "kernels/cuda/cuda_check.h"

namespace reattn {

int cuda_device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return count;
}

Status cuda_backend_supports(const Config& config) {
  const DType dtype = config.backend.storage_dtype;
  if (dtype != DType::kBF16 && dtype != DType::kF16) {
    return invalid_argument(std::string("backend.storage_dtype: the cuda backend stores KV as bf16 or f16, got ") +
                            dtype_name(dtype));
  }
  if (config.model.head_dim != 64 && config.model.head_dim != 128) {
    return invalid_argument("model.head_dim: the cuda backend supports 64 or 128, got " +
                            std::to_string(config.model.head_dim));
  }
  if (config.reattention.max_recall_chunks > cuda::kMaxRecallOnDevice) {
    return invalid_argument("reattention.max_recall_chunks: the cuda backend selects at most " +
                            std::to_string(cuda::kMaxRecallOnDevice) + ", got " +
                            std::to_string(config.reattention.max_recall_chunks));
  }
  if (config.reattention.top_k > cuda::kMaxTopK) {
    return invalid_argument("reattention.top_k: the cuda backend keeps at most " + std::to_string(cuda::kMaxTopK) +
                            ", got " + std::to_string(config.reattention.top_k));
  }
  return Status::ok();
}

Expected<std::unique_ptr<Backend>> make_cuda_backend(const Config& config, int local_rank) {
  REATTN_RETURN_IF_ERROR(cuda_backend_supports(config));
  const DType dtype = config.backend.storage_dtype;
  const int count = cuda_device_count();
  if (count == 0) return Status(ErrorCode::kFatal, "backend 'cuda': no CUDA device is visible");
  if (local_rank < 0 || local_rank >= count) {
    return Status(ErrorCode::kFatal, "backend 'cuda': local rank " + std::to_string(local_rank) +
                                          " has no GPU of its own (" + std::to_string(count) + " visible)");
  }
  std::unique_ptr<CudaBackend> backend(new CudaBackend());
  backend->dtype_ = dtype;
  backend->info_.device = local_rank;
  REATTN_CUDA_CHECK(cudaSetDevice(local_rank));
  cudaDeviceProp prop{};
  REATTN_CUDA_CHECK(cudaGetDeviceProperties(&prop, local_rank));
  backend->info_.sm_count = prop.multiProcessorCount;
  backend->info_.max_shared_per_block = prop.sharedMemPerBlockOptin;
  backend->info_.compute_major = prop.major;
  backend->info_.compute_minor = prop.minor;
  REATTN_CUDA_CHECK(cudaStreamCreateWithFlags(&backend->stream_, cudaStreamNonBlocking));
  REATTN_CUDA_CHECK(cudaMallocHost(reinterpret_cast<void**>(&backend->ring_), CudaBackend::kRingBytes));
  // With unified addressing the pinned ring is mapped into the device's address space too:
  // upload_pieces' kernel reads it there. Without, upload_pieces copies piece by piece.
  if (prop.unifiedAddressing && prop.canMapHostMemory) {
    void* mapped = nullptr;
    if (cudaHostGetDevicePointer(&mapped, backend->ring_, 0) == cudaSuccess) {
      backend->ring_device_ = static_cast<char*>(mapped);
    } else {
      (void)cudaGetLastError();
    }
  }
  REATTN_CUDA_CHECK(cudaEventCreateWithFlags(&backend->ring_done_, cudaEventDisableTiming));
  return std::unique_ptr<Backend>(std::move(backend));
}

CudaBackend::~CudaBackend() {
  if (stream_) (void)cudaStreamSynchronize(stream_);
  for (void* scratch : {score_ws_, attend_ws_, select_ws_, rope_ws_}) {
    if (scratch) (void)cudaFree(scratch);
  }
  if (ring_done_) (void)cudaEventDestroy(ring_done_);
  if (ring_) (void)cudaFreeHost(ring_);
  if (stream_) (void)cudaStreamDestroy(stream_);
}

Expected<Buffer> CudaBackend::allocate(size_t bytes) {
  void* data = nullptr;
  REATTN_CUDA_CHECK(cudaMalloc(&data, bytes == 0 ? 1 : bytes));
  sizes_[data] = bytes;
  live_bytes_ += bytes;
  peak_bytes_ = std::max(peak_bytes_, live_bytes_);
  return Buffer(this, data, bytes);
}

void CudaBackend::release(void* data) {
  const auto it = sizes_.find(data);
  if (it != sizes_.end()) {
    live_bytes_ -= it->second;
    sizes_.erase(it);
  }
  // Work queued on the stream may still read the buffer.
  (void)cudaStreamSynchronize(stream_);
  (void)cudaFree(data);
}

Status CudaBackend::upload(void* dst, const void* host_src, size_t bytes) {
  if (bytes == 0) return Status::ok();
  if (bytes <= kRingBytes / 4) {
    // Step-sized data (q, flags, segments): copy into the pinned ring, then an asynchronous
    // DMA; the caller's buffer is free at once and the copy stays ordered on the stream.
    REATTN_ASSIGN_OR_RETURN(char* slot, ring_slot(bytes));
    std::memcpy(slot, host_src, bytes);
    REATTN_CUDA_CHECK(cudaMemcpyAsync(dst, slot, bytes, cudaMemcpyHostToDevice, stream_));
    REATTN_CUDA_CHECK(cudaEventRecord(ring_done_, stream_));
    return Status::ok();
  }
  REATTN_CUDA_CHECK(cudaMemcpyAsync(dst, host_src, bytes, cudaMemcpyHostToDevice, stream_));
  // From pageable memory the copy returns once the source is staged; from pinned memory it
  // does not, so wait there for the caller's buffer to be free again.
  cudaPointerAttributes attr{};
  if (cudaPointerGetAttributes(&attr, host_src) == cudaSuccess && attr.type == cudaMemoryTypeHost) {
    REATTN_CUDA_CHECK(cudaStreamSynchronize(stream_));
  }
  (void)cudaGetLastError();
  return Status::ok();
}

Expected<char*> CudaBackend::ring_slot(size_t bytes) {
  const size_t size = (bytes + 255) / 256 * 256;
  if (ring_head_ + size > kRingBytes) {
    REATTN_CUDA_CHECK(cudaEventSynchronize(ring_done_));
    ring_head_ = 0;
  }
  char* slot = ring_ + ring_head_;
  ring_head_ += size;
  return slot;
}

Status CudaBackend::upload_pieces(const void* host_src, size_t bytes, const UploadPiece* pieces, int64_t count) {
  REATTN_RETURN_IF_ERROR(check_upload_pieces(bytes, pieces, count));
  if (count == 0) return Status::ok();
  const size_t table_bytes = (static_cast<size_t>(count) * sizeof(UploadPiece) + 255) / 256 * 256;
  if (!ring_device_ || table_bytes + bytes > kRingBytes / 4) {
    // Large, or the ring is not mapped: a copy per piece.
    for (int64_t i = 0; i < count; ++i) {
      REATTN_RETURN_IF_ERROR(upload(pieces[i].dst, static_cast<const char*>(host_src) + pieces[i].src_offset,
                                    static_cast<size_t>(pieces[i].bytes)));
    }
    return Status::ok();
  }
  REATTN_ASSIGN_OR_RETURN(char* slot, ring_slot(table_bytes + bytes));
  std::memcpy(slot, pieces, count * sizeof(UploadPiece));
  std::memcpy(slot + table_bytes, host_src, bytes);
  int64_t max_piece = 0;
  for (int64_t i = 0; i < count; ++i) max_piece = std::max(max_piece, pieces[i].bytes);
  const size_t at = static_cast<size_t>(slot - ring_);
  REATTN_RETURN_IF_ERROR(cuda::run_scatter_pieces(reinterpret_cast<const UploadPiece*>(ring_device_ + at), count,
                                                  ring_device_ + at + table_bytes, max_piece, stream_));
  REATTN_CUDA_CHECK(cudaEventRecord(ring_done_, stream_));
  return Status::ok();
}

Status CudaBackend::download(void* host_dst, const void* src, size_t bytes) {
  if (bytes == 0) return Status::ok();
  REATTN_CUDA_CHECK(cudaMemcpyAsync(host_dst, src, bytes, cudaMemcpyDeviceToHost, stream_));
  REATTN_CUDA_CHECK(cudaStreamSynchronize(stream_));
  return Status::ok();
}

Status CudaBackend::copy(void* dst, const void* src, size_t bytes) {
  if (bytes == 0) return Status::ok();
  REATTN_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, stream_));
  return Status::ok();
}

Status CudaBackend::synchronize() {
  REATTN_CUDA_CHECK(cudaStreamSynchronize(stream_));
  return Status::ok();
}

Status CudaBackend::ensure_scratch(void** ptr, size_t* capacity, size_t bytes) {
  if (*capacity >= bytes && *ptr) return Status::ok();
  const size_t grown = std::max<size_t>((bytes + (1 << 20) - 1) >> 20 << 20, 1 << 20);
  if (*ptr) {
    REATTN_CUDA_CHECK(cudaStreamSynchronize(stream_));
    REATTN_CUDA_CHECK(cudaFree(*ptr));
    live_bytes_ -= *capacity;
    *ptr = nullptr;
    *capacity = 0;
  }
  REATTN_CUDA_CHECK(cudaMalloc(ptr, grown));
  *capacity = grown;
  live_bytes_ += grown;
  peak_bytes_ = std::max(peak_bytes_, live_bytes_);
  return Status::ok();
}

Status CudaBackend::ensure_rope_table(double theta, const RopeScaling& scaling, int head_dim, int64_t positions) {
  const RopeScaling& s = rope_scaling_;
  const bool same_scaling = s.type == scaling.type && s.factor == scaling.factor &&
                            s.low_freq_factor == scaling.low_freq_factor &&
                            s.high_freq_factor == scaling.high_freq_factor &&
                            s.original_max_positions == scaling.original_max_positions;
  if (rope_ws_ && theta == rope_theta_ && same_scaling && head_dim == rope_dim_ && positions <= rope_positions_) {
    return Status::ok();
  }
  const int half = head_dim / 2;
  const int64_t rows = (std::max<int64_t>(positions, 1) + 4095) / 4096 * 4096;
  const size_t table_bytes = static_cast<size_t>(rows) * half * sizeof(float);
  REATTN_RETURN_IF_ERROR(ensure_scratch(&rope_ws_, &rope_ws_bytes_, 2 * table_bytes + half * sizeof(double)));
  auto* cos_table = static_cast<float*>(rope_ws_);
  auto* sin_table = reinterpret_cast<float*>(static_cast<char*>(rope_ws_) + table_bytes);
  auto* inv_freq = reinterpret_cast<double*>(static_cast<char*>(rope_ws_) + 2 * table_bytes);
  const std::vector<double> host_inv = rope_inv_freq(head_dim, theta, scaling);
  REATTN_RETURN_IF_ERROR(upload(inv_freq, host_inv.data(), host_inv.size() * sizeof(double)));
  REATTN_RETURN_IF_ERROR(cuda::build_rope_table(inv_freq, head_dim, rows, cos_table, sin_table, stream_));
  rope_theta_ = theta;
  rope_scaling_ = scaling;
  rope_dim_ = head_dim;
  rope_positions_ = rows;
  return Status::ok();
}

Status CudaBackend::score_chunks(const ScoreParams& p) {
  const cuda::ScorePlan plan = cuda::plan_score(p, info_);
  REATTN_RETURN_IF_ERROR(ensure_scratch(&score_ws_, &score_ws_bytes_, plan.workspace_bytes));
  return cuda::run_score(p, dtype_, plan, score_ws_, stream_);
}

Status CudaBackend::attend(const AttendParams& p) {
  REATTN_RETURN_IF_ERROR(ensure_rope_table(p.rope_theta, p.rope_scaling, p.head_dim, p.max_position + 1));
  const cuda::AttendPlan plan = cuda::plan_attend(p, info_);
  REATTN_RETURN_IF_ERROR(ensure_scratch(&attend_ws_, &attend_ws_bytes_, plan.workspace_bytes));
  const int half = p.head_dim / 2;
  const size_t table_bytes = static_cast<size_t>(rope_positions_) * half * sizeof(float);
  const auto* cos_table = static_cast<const float*>(rope_ws_);
  const auto* sin_table = reinterpret_cast<const float*>(static_cast<const char*>(rope_ws_) + table_bytes);
  return cuda::run_attend(p, dtype_, plan, cos_table, sin_table, attend_ws_, stream_);
}

Status CudaBackend::score_tokens(const ScoreParams& p) {
  const cuda::ScorePlan plan = cuda::plan_score_tokens(p, info_);
  REATTN_RETURN_IF_ERROR(ensure_scratch(&score_ws_, &score_ws_bytes_, plan.workspace_bytes));
  return cuda::run_score_tokens(p, dtype_, plan, score_ws_, stream_);
}

Status CudaBackend::copy_ranges(const CopyRangesParams& p) { return cuda::run_copy_ranges(p, stream_); }

Status CudaBackend::merge_states(const MergeParams& p) { return cuda::run_merge_states(p, stream_); }

Status CudaBackend::pack_blocks(const PackParams& p) { return cuda::run_pack_blocks(p, stream_); }

Status CudaBackend::merge_select(const MergeSelectParams& p) {
  REATTN_RETURN_IF_ERROR(ensure_scratch(&select_ws_, &select_ws_bytes_, cuda::merge_select_workspace_bytes(p.num_chunks)));
  return cuda::run_merge_select(p, select_ws_, select_ws_bytes_, stream_);
}

}  // namespace reattn
