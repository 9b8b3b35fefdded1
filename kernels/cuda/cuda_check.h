// Status-returning checks for CUDA runtime calls: a failed call becomes a kDevice Status
// (kCapacity for an allocation that did not fit) naming the statement, file:line and device.
// Plain C++: included by .cu and .cpp files alike.
#pragma once

#include <cuda_runtime_api.h>

#include <string>

#include "common/status.h"

namespace reattn {

// Status of a CUDA runtime return code. `device` < 0: the current device is looked up.
inline Status cuda_status(cudaError_t rc, const char* statement, const char* file, int line, int device = -1) {
  if (rc == cudaSuccess) return Status::ok();
  // Clears a non-sticky error so that the next call does not report it again.
  (void)cudaGetLastError();
  if (device < 0 && cudaGetDevice(&device) != cudaSuccess) device = -1;
  std::string message = std::string(statement) + " failed: " + cudaGetErrorName(rc) + " (" +
                        cudaGetErrorString(rc) + ") at " + file + ":" + std::to_string(line) + " on device " +
                        std::to_string(device);
  const ErrorCode code = rc == cudaErrorMemoryAllocation ? ErrorCode::kCapacity : ErrorCode::kFatal;
  return Status(code, std::move(message));
}

}  // namespace reattn

// Returns a Status from the enclosing function when a CUDA runtime call fails.
#define REATTN_CUDA_CHECK(statement)                                                       \
  do {                                                                                     \
    const cudaError_t reattn_cuda_rc_ = (statement);                                       \
    if (reattn_cuda_rc_ != cudaSuccess) {                                                  \
      return ::reattn::cuda_status(reattn_cuda_rc_, #statement, __FILE__, __LINE__);       \
    }                                                                                      \
  } while (0)

// After a kernel launch: the launch error, if any.
#define REATTN_CUDA_CHECK_LAUNCH(kernel_name)                                              \
  do {                                                                                     \
    const cudaError_t reattn_cuda_rc_ = cudaGetLastError();                                \
    if (reattn_cuda_rc_ != cudaSuccess) {                                                  \
      return ::reattn::cuda_status(reattn_cuda_rc_, "launch of " kernel_name, __FILE__, __LINE__); \
    }                                                                                      \
  } while (0)
