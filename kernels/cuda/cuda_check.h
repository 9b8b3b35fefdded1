// The status of a CUDA runtime call for the check macros (common/check.h): a failed call
// becomes a kFatal Status (kCapacity for an allocation that did not fit) naming the
// statement, file:line, rank and device. Plain C++: included by .cu and .cpp files alike.
#pragma once

#include <cuda_runtime_api.h>

#include <string>

#include "common/check.h"

namespace reattn {

// Status of a CUDA runtime return code. `device` < 0: the current device is looked up.
inline Status cuda_status(cudaError_t rc, const char* statement, const char* file, int line, int device = -1) {
  if (rc == cudaSuccess) return Status::ok();
  // Clears a non-sticky error so that the next call does not report it again.
  (void)cudaGetLastError();
  if (device < 0 && cudaGetDevice(&device) != cudaSuccess) device = -1;
  std::string message = std::string(statement) + " failed: " + cudaGetErrorName(rc) + " (" +
                        cudaGetErrorString(rc) + ")" + fault_site(file, line) + ", device " + std::to_string(device);
  const ErrorCode code = rc == cudaErrorMemoryAllocation ? ErrorCode::kCapacity : ErrorCode::kFatal;
  return Status(code, std::move(message));
}

}  // namespace reattn
