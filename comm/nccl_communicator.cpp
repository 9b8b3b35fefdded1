#include "comm/nccl_communicator.h"

#include <mpi.h>

#include <cstdlib>
#include <string>

#include "comm/control.h"
#include "comm/mpi_wait.h"
#include "kernels/cuda/cuda_check.h"

// Issues an NCCL call on a non-blocking communicator: a kFatal Status naming the call,
// file:line, rank and device when it fails; ncclInProgress is waited out (bounded).
#define REATTN_NCCL_ISSUE(statement)                                                         \
  do {                                                                                       \
    const ncclResult_t reattn_nccl_rc_ = (statement);                                        \
    REATTN_RETURN_IF_ERROR(settle(reattn_nccl_rc_, #statement, __FILE__, __LINE__));         \
  } while (0)

namespace reattn {
namespace {

// How long rank 0's roll call after a time-out waits for the other ranks' answers.
constexpr double kRollCallSeconds = 1.0;

// What rank 0 broadcasts: whether it made an id, and the id.
struct Bootstrap {
  int ok = 0;
  ncclUniqueId id{};
};

}  // namespace

Status NcclCommunicator::nccl_status(ncclResult_t rc, const char* statement, const char* file, int line) const {
  std::string message = std::string(statement) + " failed: " + ncclGetErrorString(rc);
  if (comm_) {
    const char* last = ncclGetLastError(comm_);
    if (last && *last) message += std::string(" (") + last + ")";
  }
  message += fault_site(file, line) + ", device " + std::to_string(device_);
  return Status(ErrorCode::kFatal, std::move(message));
}

Status NcclCommunicator::fail(Status why) {
  if (fault_.is_ok()) {
    fault_ = std::move(why);
    // Frees the communicator's resources and unblocks any kernel waiting on a peer.
    if (comm_) (void)ncclCommAbort(comm_);
    comm_ = nullptr;
  }
  return fault_;
}

Status NcclCommunicator::settle(ncclResult_t rc, const char* statement, const char* file, int line) {
  if (rc == ncclSuccess) return Status::ok();
  if (rc != ncclInProgress) return fail(nccl_status(rc, statement, file, line));
  const Deadline deadline(step_deadline_s_);
  PollPacer pacer;
  for (;;) {
    ncclResult_t state = ncclSuccess;
    const ncclResult_t q = ncclCommGetAsyncError(comm_, &state);
    if (q != ncclSuccess) return fail(nccl_status(q, "ncclCommGetAsyncError", file, line));
    if (state == ncclSuccess) return Status::ok();
    if (state != ncclInProgress) return fail(nccl_status(state, statement, file, line));
    if (deadline.passed()) {
      return fail(Status(ErrorCode::kFatal, std::string(statement) + ": not issued within " + deadline.budget() +
                                                 " on rank " + std::to_string(rank_) + " (a peer is dead or hung)"));
    }
    pacer.pause();
  }
}

Status NcclCommunicator::wait_stream(const char* phase) {
  const Deadline deadline(step_deadline_s_);
  PollPacer pacer;
  for (;;) {
    const cudaError_t done = cudaStreamQuery(stream_);
    if (done == cudaSuccess) return Status::ok();
    if (done != cudaErrorNotReady) return fail(cuda_status(done, "cudaStreamQuery(stream)", __FILE__, __LINE__, device_));
    ncclResult_t state = ncclSuccess;
    const ncclResult_t q = ncclCommGetAsyncError(comm_, &state);
    if (q != ncclSuccess) return fail(nccl_status(q, "ncclCommGetAsyncError", __FILE__, __LINE__));
    if (state != ncclSuccess && state != ncclInProgress) return fail(nccl_status(state, phase, __FILE__, __LINE__));
    if (rank_ != 0 && answer_roll_call()) {
      return fail(Status(ErrorCode::kFatal, std::string(phase) + ": called off by rank 0 after a fault"));
    }
    if (deadline.passed()) {
      // NCCL cannot say which peer is missing: ask every rank over MPI.
      std::string who = " (a peer is dead or hung)";
      if (rank_ == 0) {
        const Status missing = roll_call(world_, kRollCallSeconds);
        who = missing.is_ok() ? "; every rank answered the roll call, the collective itself is stuck"
                              : "; " + missing.message();
      }
      return fail(Status(ErrorCode::kFatal, std::string(phase) + ": not complete within " + deadline.budget() +
                                                 " on rank " + std::to_string(rank_) + ", device " +
                                                 std::to_string(device_) + who));
    }
    pacer.pause();
  }
}

Expected<std::unique_ptr<NcclCommunicator>> NcclCommunicator::make(CudaBackend& backend, int rank, int world,
                                                                   const WaitDeadlines& deadlines) {
  std::unique_ptr<NcclCommunicator> comm(new NcclCommunicator());
  comm->rank_ = rank;
  comm->world_ = world;
  comm->device_ = backend.device();
  comm->stream_ = backend.stream();
  comm->step_deadline_s_ = WaitDeadlines::for_rank(deadlines.step_s, rank);
  REATTN_CUDA_CHECK(cudaSetDevice(comm->device_));
  Bootstrap boot;
  Status made;
  if (rank == 0) {
    const ncclResult_t rc = ncclGetUniqueId(&boot.id);
    boot.ok = rc == ncclSuccess ? 1 : 0;
    if (!boot.ok) made = comm->nccl_status(rc, "ncclGetUniqueId(&id)", __FILE__, __LINE__);
  }
  const Deadline setup(WaitDeadlines::for_rank(deadlines.operation_s, rank));
  MPI_Request request = MPI_REQUEST_NULL;
  REATTN_RETURN_IF_ERROR(mpi_status(MPI_Ibcast(&boot, sizeof(boot), MPI_BYTE, 0, MPI_COMM_WORLD, &request),
                                    "MPI_Ibcast(ncclUniqueId)", __FILE__, __LINE__));
  REATTN_RETURN_IF_ERROR(wait_for_collective(request, setup, "broadcast of the NCCL unique id"));
  if (!boot.ok) {
    if (!made.is_ok()) return made;
    return Status(ErrorCode::kFatal, "rank 0 could not make the NCCL unique id (rank " + std::to_string(rank) + ")");
  }
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;
  ncclComm_t handle = nullptr;
  const ncclResult_t rc = ncclCommInitRankConfig(&handle, world, boot.id, rank, &config);
  comm->comm_ = handle;
  if (rc != ncclSuccess && rc != ncclInProgress) {
    return comm->fail(comm->nccl_status(rc, "ncclCommInitRankConfig(&comm, world, id, rank, {blocking=0})", __FILE__,
                                        __LINE__));
  }
  // Creation waits for every rank: bounded by the operation deadline, not the step's.
  PollPacer pacer;
  for (;;) {
    ncclResult_t state = ncclSuccess;
    const ncclResult_t q = ncclCommGetAsyncError(handle, &state);
    if (q != ncclSuccess) return comm->fail(comm->nccl_status(q, "ncclCommGetAsyncError", __FILE__, __LINE__));
    if (state == ncclSuccess) break;
    if (state != ncclInProgress) {
      return comm->fail(comm->nccl_status(state, "ncclCommInitRankConfig", __FILE__, __LINE__));
    }
    if (setup.passed()) {
      return comm->fail(Status(ErrorCode::kFatal, "NCCL communicator not created within " + setup.budget() +
                                                       " on rank " + std::to_string(rank) + " (a peer is dead or hung)"));
    }
    pacer.pause();
  }
  return comm;
}

NcclCommunicator::~NcclCommunicator() {
  if (!comm_) return;
  // A communicator whose peers may be gone is aborted, never waited on.
  if (!fault_.is_ok() || wait_stream("communicator shutdown").code() != ErrorCode::kOk) return;
  (void)ncclCommDestroy(comm_);
}

Status NcclCommunicator::allgather(const void* send, void* recv, size_t bytes_per_rank) {
  if (!fault_.is_ok()) return fault_;
  REATTN_NCCL_ISSUE(ncclAllGather(send, recv, bytes_per_rank, ncclUint8, comm_, stream_));
  return wait_stream("allgather of a step's candidates");
}

Status NcclCommunicator::exchange(const std::vector<Transfer>& sends, const std::vector<Transfer>& recvs) {
  if (!fault_.is_ok()) return fault_;
  std::vector<const Transfer*> self_sends, self_recvs;
  for (const auto* list : {&sends, &recvs}) {
    for (const Transfer& t : *list) {
      if (t.peer < 0 || t.peer >= world_) {
        return internal_error("exchange: peer " + std::to_string(t.peer) + " is outside [0, " +
                              std::to_string(world_) + ")");
      }
    }
  }
  // Nothing to move: nothing to wait for either (the step orders its own work).
  if (sends.empty() && recvs.empty()) return Status::ok();
  bool remote = false;
  for (const Transfer& s : sends) remote = remote || s.peer != rank_;
  for (const Transfer& r : recvs) remote = remote || r.peer != rank_;
  if (remote) {
    REATTN_NCCL_ISSUE(ncclGroupStart());
    for (const Transfer& s : sends) {
      if (s.peer == rank_) continue;
      REATTN_NCCL_ISSUE(ncclSend(s.data, s.bytes, ncclUint8, s.peer, comm_, stream_));
    }
    for (const Transfer& r : recvs) {
      if (r.peer == rank_) continue;
      REATTN_NCCL_ISSUE(ncclRecv(r.data, r.bytes, ncclUint8, r.peer, comm_, stream_));
    }
    REATTN_NCCL_ISSUE(ncclGroupEnd());
  }
  for (const Transfer& s : sends) {
    if (s.peer == rank_) self_sends.push_back(&s);
  }
  for (const Transfer& r : recvs) {
    if (r.peer == rank_) self_recvs.push_back(&r);
  }
  if (self_sends.size() != self_recvs.size()) {
    return internal_error("exchange: " + std::to_string(self_sends.size()) + " sends to self but " +
                          std::to_string(self_recvs.size()) + " receives from self on rank " + std::to_string(rank_));
  }
  for (size_t i = 0; i < self_sends.size(); ++i) {
    if (self_sends[i]->bytes != self_recvs[i]->bytes) {
      return internal_error("exchange: a self transfer of " + std::to_string(self_sends[i]->bytes) +
                            " bytes meets a receive of " + std::to_string(self_recvs[i]->bytes) + " bytes");
    }
    REATTN_CUDA_CHECK(cudaMemcpyAsync(self_recvs[i]->data, self_sends[i]->data, self_sends[i]->bytes,
                                      cudaMemcpyDeviceToDevice, stream_));
  }
  return wait_stream("exchange of a step's final phase");
}

}  // namespace reattn
