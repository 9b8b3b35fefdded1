// The check-macro family for calls into CUDA, NCCL and MPI: each failed call returns (never
// exits) a kFatal Status naming the statement, the library's error text, file:line and the
// rank (and device, where there is one). The status functions live with their library:
// cuda_status (kernels/cuda/cuda_check.h), NcclCommunicator::nccl_status, mpi_status
// (comm/control.h); each includes fault_site().
#pragma once

#include <string>

#include "common/status.h"

namespace reattn {

// Records this process's MPI rank for fault messages; called once, at start-up.
void record_process_rank(int rank);
// " at file:line on rank R" (R is "?" before record_process_rank).
std::string fault_site(const char* file, int line);

}  // namespace reattn

// Returns status_fn(rc, "statement", file, line) from the enclosing function when
// `statement` does not return `ok`.
#define REATTN_CHECK_CALL_(status_fn, ok, statement)                       \
  do {                                                                     \
    const auto reattn_rc_ = (statement);                                   \
    if (reattn_rc_ != (ok)) return status_fn(reattn_rc_, #statement, __FILE__, __LINE__); \
  } while (0)

// CUDA runtime calls; after a kernel launch, REATTN_CUDA_CHECK_LAUNCH("kernel name").
#define REATTN_CUDA_CHECK(statement) REATTN_CHECK_CALL_(::reattn::cuda_status, cudaSuccess, statement)
#define REATTN_CUDA_CHECK_LAUNCH(kernel_name)                                                      \
  do {                                                                                             \
    const cudaError_t reattn_rc_ = cudaGetLastError();                                             \
    if (reattn_rc_ != cudaSuccess) return ::reattn::cuda_status(reattn_rc_, "launch of " kernel_name, __FILE__, __LINE__); \
  } while (0)
// NCCL calls, inside NcclCommunicator (nccl_status knows the communicator).
#define REATTN_NCCL_CHECK(statement) REATTN_CHECK_CALL_(nccl_status, ncclSuccess, statement)
// MPI calls (MPI_ERRORS_RETURN is set at start-up).
#define REATTN_MPI_CHECK(statement) REATTN_CHECK_CALL_(::reattn::mpi_status, MPI_SUCCESS, statement)
