// The data plane over NCCL, for the cuda backend (device memory). Bootstrapped over MPI:
// rank 0 makes the ncclUniqueId and broadcasts it; each rank uses the device of its backend
// (device = local rank). Every operation is queued on the backend's one stream.
// The communicator is non-blocking (ncclConfig_t::blocking = 0): its creation and every
// operation are polled (ncclCommGetAsyncError, cudaStreamQuery) against a deadline; on a time
// out or an asynchronous error the communicator is aborted (ncclCommAbort) and every later
// call fails at once with that fault (NCCL's async-error protocol; PyTorch's NCCL watchdog).
// Call only from the step loop's thread.
#pragma once

#include <nccl.h>

#include <memory>

#include "comm/communicator.h"
#include "comm/deadline.h"
#include "kernels/cuda/cuda_backend.h"

namespace reattn {

class NcclCommunicator final : public Communicator {
 public:
  // Collective over MPI_COMM_WORLD (MPI must be initialised): every rank calls it together,
  // and every rank gets an error if rank 0 could not make the unique id. Creation is bounded
  // by the operation deadline, each operation by the step deadline.
  static Expected<std::unique_ptr<NcclCommunicator>> make(CudaBackend& backend, int rank, int world,
                                                          const WaitDeadlines& deadlines);
  ~NcclCommunicator() override;
  NcclCommunicator(const NcclCommunicator&) = delete;
  NcclCommunicator& operator=(const NcclCommunicator&) = delete;

  const char* name() const override { return "nccl"; }
  int rank() const override { return rank_; }
  int world() const override { return world_; }
  // Complete when it returns (polled against the step deadline).
  Status allgather(const void* send, void* recv, size_t bytes_per_rank) override;
  // One NCCL group of sends and receives (self transfers are device copies, paired in the
  // order listed); complete when it returns.
  Status exchange(const std::vector<Transfer>& sends, const std::vector<Transfer>& recvs) override;

 private:
  NcclCommunicator() = default;
  Status nccl_status(ncclResult_t rc, const char* statement, const char* file, int line) const;
  // An enqueue's return code: ncclInProgress is polled until the call has been issued.
  Status settle(ncclResult_t rc, const char* statement, const char* file, int line);
  // Polls until the stream has drained; aborts the communicator on a time-out or an error.
  Status wait_stream(const char* phase);
  // Records the first fault and aborts the communicator.
  Status fail(Status why);

  ncclComm_t comm_ = nullptr;
  cudaStream_t stream_ = nullptr;
  int rank_ = 0;
  int world_ = 1;
  int device_ = 0;
  double step_deadline_s_ = 600;
  Status fault_;
};

}  // namespace reattn
