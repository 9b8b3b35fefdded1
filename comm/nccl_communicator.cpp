#include "comm/nccl_communicator.h"

#include <mpi.h>

#include <cstdlib>
#include <string>

#include "comm/control.h"
#include "kernels/cuda/cuda_check.h"

namespace reattn {
namespace {

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

Expected<std::unique_ptr<NcclCommunicator>> NcclCommunicator::make(CudaBackend& backend, int rank, int world) {
  std::unique_ptr<NcclCommunicator> comm(new NcclCommunicator());
  comm->rank_ = rank;
  comm->world_ = world;
  comm->device_ = backend.device();
  comm->stream_ = backend.stream();
  REATTN_CUDA_CHECK(cudaSetDevice(comm->device_));
  Bootstrap boot;
  Status made;
  if (rank == 0) {
    const ncclResult_t rc = ncclGetUniqueId(&boot.id);
    boot.ok = rc == ncclSuccess ? 1 : 0;
    if (!boot.ok) made = comm->nccl_status(rc, "ncclGetUniqueId(&id)", __FILE__, __LINE__);
  }
  REATTN_MPI_CHECK(MPI_Bcast(&boot, sizeof(boot), MPI_BYTE, 0, MPI_COMM_WORLD));
  if (!boot.ok) {
    if (!made.is_ok()) return made;
    return Status(ErrorCode::kFatal, "rank 0 could not make the NCCL unique id (rank " + std::to_string(rank) + ")");
  }
  ncclComm_t handle = nullptr;
  const ncclResult_t rc = ncclCommInitRank(&handle, world, boot.id, rank);
  if (rc != ncclSuccess) return comm->nccl_status(rc, "ncclCommInitRank(&comm, world, id, rank)", __FILE__, __LINE__);
  comm->comm_ = handle;
  return comm;
}

NcclCommunicator::~NcclCommunicator() {
  if (comm_) {
    (void)cudaStreamSynchronize(stream_);
    (void)ncclCommDestroy(comm_);
  }
}

Status NcclCommunicator::allgather(const void* send, void* recv, size_t bytes_per_rank) {
  REATTN_NCCL_CHECK(ncclAllGather(send, recv, bytes_per_rank, ncclUint8, comm_, stream_));
  return Status::ok();
}

Status NcclCommunicator::exchange(const std::vector<Transfer>& sends, const std::vector<Transfer>& recvs) {
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
    REATTN_NCCL_CHECK(ncclGroupStart());
    for (const Transfer& s : sends) {
      if (s.peer == rank_) continue;
      REATTN_NCCL_CHECK(ncclSend(s.data, s.bytes, ncclUint8, s.peer, comm_, stream_));
    }
    for (const Transfer& r : recvs) {
      if (r.peer == rank_) continue;
      REATTN_NCCL_CHECK(ncclRecv(r.data, r.bytes, ncclUint8, r.peer, comm_, stream_));
    }
    REATTN_NCCL_CHECK(ncclGroupEnd());
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
  REATTN_CUDA_CHECK(cudaStreamSynchronize(stream_));
  return Status::ok();
}

}  // namespace reattn
