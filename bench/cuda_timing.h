// Timing helpers of the CUDA benchmarks: event-timed repetitions on the backend's stream and
// a read-bandwidth probe (the baseline every kernel figure is a share of).
#pragma once

#include <cuda_runtime_api.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <vector>

#include "kernels/cuda/cuda_backend.h"
#include "kernels/cuda/cuda_check.h"

namespace reattn::bench {

inline double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0.0 : v[v.size() / 2];
}

// Times `fn` (queued on `stream`) with events, `repeat` times after `warmup`; median ms.
template <typename Fn>
inline Expected<double> time_events(cudaStream_t stream, int warmup, int repeat, Fn fn) {
  cudaEvent_t start, stop;
  REATTN_CUDA_CHECK(cudaEventCreate(&start));
  REATTN_CUDA_CHECK(cudaEventCreate(&stop));
  std::vector<double> ms;
  for (int r = 0; r < warmup + repeat; ++r) {
    REATTN_CUDA_CHECK(cudaEventRecord(start, stream));
    REATTN_RETURN_IF_ERROR(fn());
    REATTN_CUDA_CHECK(cudaEventRecord(stop, stream));
    REATTN_CUDA_CHECK(cudaEventSynchronize(stop));
    float t = 0;
    REATTN_CUDA_CHECK(cudaEventElapsedTime(&t, start, stop));
    if (r >= warmup) ms.push_back(t);
  }
  (void)cudaEventDestroy(start);
  (void)cudaEventDestroy(stop);
  return median(ms);
}

inline Expected<nlohmann::json> read_bandwidth(CudaBackend& backend, size_t bytes) {
  REATTN_ASSIGN_OR_RETURN(Buffer buf, backend.allocate(bytes));
  REATTN_ASSIGN_OR_RETURN(Buffer sink, backend.allocate(sizeof(unsigned long long)));
  REATTN_CUDA_CHECK(cudaMemsetAsync(buf.data(), 0x5a, bytes, backend.stream()));
  REATTN_CUDA_CHECK(cudaMemsetAsync(sink.data(), 0, sizeof(unsigned long long), backend.stream()));
  REATTN_ASSIGN_OR_RETURN(double ms, time_events(backend.stream(), 3, 20, [&]() {
    return cuda::run_read_probe(buf.data(), bytes, sink.as<unsigned long long>(), backend.device_info(), backend.stream());
  }));
  return nlohmann::json{{"bytes", bytes}, {"ms", ms}, {"gb_per_s", bytes / ms / 1e6}};
}

}  // namespace reattn::bench
