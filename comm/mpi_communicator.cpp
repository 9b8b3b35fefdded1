#include "comm/mpi_communicator.h"

#include <mpi.h>

#include <climits>
#include <cstring>
#include <string>

#include "comm/control.h"

namespace reattn {
namespace {

Status check_count(size_t bytes, const char* what) {
  if (bytes > static_cast<size_t>(INT_MAX)) {
    return internal_error(std::string(what) + ": " + std::to_string(bytes) + " bytes exceed one MPI message");
  }
  return Status::ok();
}

}  // namespace

MpiCommunicator::MpiCommunicator() {
  MPI_Comm_rank(MPI_COMM_WORLD, &rank_);
  MPI_Comm_size(MPI_COMM_WORLD, &world_);
}

Status MpiCommunicator::allgather(const void* send, void* recv, size_t bytes_per_rank) {
  REATTN_RETURN_IF_ERROR(check_count(bytes_per_rank, "allgather"));
  const int count = static_cast<int>(bytes_per_rank);
  REATTN_MPI_CHECK(MPI_Allgather(send, count, MPI_BYTE, recv, count, MPI_BYTE, MPI_COMM_WORLD));
  return Status::ok();
}

Status MpiCommunicator::exchange(const std::vector<Transfer>& sends, const std::vector<Transfer>& recvs) {
  // Check every transfer before posting any, so a refusal leaves no request in flight.
  for (const auto* list : {&sends, &recvs}) {
    for (const Transfer& t : *list) {
      REATTN_RETURN_IF_ERROR(check_count(t.bytes, "exchange"));
      if (t.peer < 0 || t.peer >= world_) return internal_error("exchange: peer " + std::to_string(t.peer) + " is not a rank");
    }
  }
  std::vector<MPI_Request> requests;
  requests.reserve(sends.size() + recvs.size());
  // Messages between one pair of ranks match in the order they are listed (same tag).
  for (const Transfer& r : recvs) {
    requests.emplace_back();
    REATTN_MPI_CHECK(MPI_Irecv(r.data, static_cast<int>(r.bytes), MPI_BYTE, r.peer, 0, MPI_COMM_WORLD, &requests.back()));
  }
  for (const Transfer& s : sends) {
    requests.emplace_back();
    REATTN_MPI_CHECK(MPI_Isend(s.data, static_cast<int>(s.bytes), MPI_BYTE, s.peer, 0, MPI_COMM_WORLD, &requests.back()));
  }
  REATTN_MPI_CHECK(MPI_Waitall(static_cast<int>(requests.size()), requests.data(), MPI_STATUSES_IGNORE));
  return Status::ok();
}

}  // namespace reattn
