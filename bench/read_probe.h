// The read-bandwidth probe of the GPU benchmarks: every kernel figure is a share of what this
// measures on the same device in the same run.
#pragma once

#include <nlohmann/json.hpp>

#include "bench/event_timing.h"
#include "kernels/cuda/cuda_backend.h"
#include "kernels/cuda/cuda_check.h"

namespace reattn::bench {

// Reads `bytes` of device memory once per call; {bytes, ms (median of 20), gb_per_s}.
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
