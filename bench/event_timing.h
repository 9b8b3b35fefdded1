// CUDA-event timing for the GPU benchmarks: median of `repeat` timed calls after `warmup`.
#pragma once

#include <cuda_runtime_api.h>

#include <algorithm>
#include <vector>

#include "common/status.h"
#include "kernels/cuda/cuda_check.h"

namespace reattn::bench {

inline double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0.0 : v[v.size() / 2];
}

// Times `fn` (work queued on `stream`, returning a Status) with events; median milliseconds.
template <typename Fn>
Expected<double> time_events(cudaStream_t stream, int warmup, int repeat, Fn fn) {
  cudaEvent_t start, stop;
  REATTN_CUDA_CHECK(cudaEventCreate(&start));
  REATTN_CUDA_CHECK(cudaEventCreate(&stop));
  std::vector<double> ms;
  Status status = Status::ok();
  for (int r = 0; r < warmup + repeat && status.is_ok(); ++r) {
    float t = 0;
    status = cuda_status(cudaEventRecord(start, stream), "cudaEventRecord", __FILE__, __LINE__);
    if (status.is_ok()) status = fn();
    if (status.is_ok()) status = cuda_status(cudaEventRecord(stop, stream), "cudaEventRecord", __FILE__, __LINE__);
    if (status.is_ok()) status = cuda_status(cudaEventSynchronize(stop), "cudaEventSynchronize", __FILE__, __LINE__);
    if (status.is_ok()) status = cuda_status(cudaEventElapsedTime(&t, start, stop), "cudaEventElapsedTime", __FILE__, __LINE__);
    if (status.is_ok() && r >= warmup) ms.push_back(t);
  }
  (void)cudaEventDestroy(start);
  (void)cudaEventDestroy(stop);
  if (!status.is_ok()) return status;
  return median(ms);
}

}  // namespace reattn::bench
