#include "comm/mpi_communicator.h"

#include <mpi.h>

#include <climits>
#include <cstring>
#include <string>

#include "comm/control.h"
#include "comm/mpi_wait.h"

namespace reattn {
namespace {

// Point-to-point tags of the data plane (the control plane uses its own).
constexpr int kExchangeTag = 0;
constexpr int kAllgatherTag = 1;

Status check_count(size_t bytes, const char* what) {
  if (bytes > static_cast<size_t>(INT_MAX)) {
    return internal_error(std::string(what) + ": " + std::to_string(bytes) + " bytes exceed one MPI message");
  }
  return Status::ok();
}

}  // namespace

MpiCommunicator::MpiCommunicator(double step_deadline_s) {
  MPI_Comm_rank(MPI_COMM_WORLD, &rank_);
  MPI_Comm_size(MPI_COMM_WORLD, &world_);
  deadline_s_ = WaitDeadlines::for_rank(step_deadline_s, rank_);
}

Status MpiCommunicator::finish(Status s) {
  if (s.code() == ErrorCode::kFatal && fault_.is_ok()) fault_ = s;
  return s;
}

Status MpiCommunicator::allgather(const void* send, void* recv, size_t bytes_per_rank) {
  if (!fault_.is_ok()) return fault_;
  REATTN_RETURN_IF_ERROR(check_count(bytes_per_rank, "allgather"));
  const int count = static_cast<int>(bytes_per_rank);
  char* out = static_cast<char*>(recv);
  std::memcpy(out + rank_ * bytes_per_rank, send, bytes_per_rank);
  // Point to point rather than MPI_Iallgather, so a rank that never sends is named.
  std::vector<MPI_Request> requests;
  std::vector<int> peers;
  requests.reserve(2 * world_);
  peers.reserve(2 * world_);
  Status s = Status::ok();
  for (int r = 0; r < world_ && s.is_ok(); ++r) {
    if (r == rank_) continue;
    requests.emplace_back(MPI_REQUEST_NULL);
    peers.push_back(r);
    s = mpi_status(MPI_Irecv(out + r * bytes_per_rank, count, MPI_BYTE, r, kAllgatherTag, MPI_COMM_WORLD,
                             &requests.back()),
                   "MPI_Irecv", __FILE__, __LINE__);
  }
  for (int r = 0; r < world_ && s.is_ok(); ++r) {
    if (r == rank_) continue;
    requests.emplace_back(MPI_REQUEST_NULL);
    peers.push_back(r);
    s = mpi_status(MPI_Isend(send, count, MPI_BYTE, r, kAllgatherTag, MPI_COMM_WORLD, &requests.back()), "MPI_Isend", __FILE__, __LINE__);
  }
  if (!s.is_ok()) return finish(Status(ErrorCode::kFatal, "allgather of a step: " + s.message()));
  return finish(wait_for_peers(requests, peers, Deadline(deadline_s_), "allgather of a step's candidates"));
}

Status MpiCommunicator::exchange(const std::vector<Transfer>& sends, const std::vector<Transfer>& recvs) {
  if (!fault_.is_ok()) return fault_;
  // Check every transfer before posting any, so a refusal leaves no request in flight.
  for (const auto* list : {&sends, &recvs}) {
    for (const Transfer& t : *list) {
      REATTN_RETURN_IF_ERROR(check_count(t.bytes, "exchange"));
      if (t.peer < 0 || t.peer >= world_) return internal_error("exchange: peer " + std::to_string(t.peer) + " is not a rank");
    }
  }
  std::vector<MPI_Request> requests;
  std::vector<int> peers;
  requests.reserve(sends.size() + recvs.size());
  peers.reserve(sends.size() + recvs.size());
  Status s = Status::ok();
  // Messages between one pair of ranks match in the order they are listed (same tag).
  for (const Transfer& r : recvs) {
    if (!s.is_ok()) break;
    requests.emplace_back(MPI_REQUEST_NULL);
    peers.push_back(r.peer);
    s = mpi_status(MPI_Irecv(r.data, static_cast<int>(r.bytes), MPI_BYTE, r.peer, kExchangeTag, MPI_COMM_WORLD,
                             &requests.back()),
                   "MPI_Irecv", __FILE__, __LINE__);
  }
  for (const Transfer& t : sends) {
    if (!s.is_ok()) break;
    requests.emplace_back(MPI_REQUEST_NULL);
    peers.push_back(t.peer);
    s = mpi_status(MPI_Isend(t.data, static_cast<int>(t.bytes), MPI_BYTE, t.peer, kExchangeTag, MPI_COMM_WORLD,
                             &requests.back()),
                   "MPI_Isend", __FILE__, __LINE__);
  }
  if (!s.is_ok()) return finish(Status(ErrorCode::kFatal, "exchange of a step: " + s.message()));
  return finish(wait_for_peers(requests, peers, Deadline(deadline_s_), "exchange of a step's final phase"));
}

}  // namespace reattn
