#include "comm/mpi_wait.h"

#include <set>

#include "comm/control.h"

namespace reattn {
namespace {

std::string rank_list(const std::set<int>& ranks) {
  std::string out;
  size_t i = 0;
  for (int r : ranks) {
    if (i > 0) out += i + 1 == ranks.size() ? " and " : ", ";
    out += std::to_string(r);
    ++i;
  }
  return (ranks.size() == 1 ? "rank " : "ranks ") + out;
}

}  // namespace

Status wait_for_peers(std::vector<MPI_Request>& requests, const std::vector<int>& peers, const Deadline& deadline,
                      const std::string& phase) {
  PollPacer pacer;
  for (;;) {
    bool all_done = true;
    for (size_t i = 0; i < requests.size(); ++i) {
      if (requests[i] == MPI_REQUEST_NULL) continue;
      int done = 0;
      const int rc = MPI_Test(&requests[i], &done, MPI_STATUS_IGNORE);
      if (rc != MPI_SUCCESS) {
        return Status(ErrorCode::kFatal,
                      phase + ": with rank " + std::to_string(peers[i]) + ": " + mpi_status(rc, "MPI_Test", __FILE__, __LINE__).message());
      }
      all_done = all_done && done;
    }
    if (all_done) return Status::ok();
    if (deadline.passed()) break;
    pacer.pause();
  }
  std::set<int> owed;
  for (size_t i = 0; i < requests.size(); ++i) {
    if (requests[i] == MPI_REQUEST_NULL) continue;
    owed.insert(peers[i]);
  }
  // The requests stay posted: the caller treats this as a fault and makes no further MPI
  // calls that could progress them (the job ends).
  return Status(ErrorCode::kFatal,
                phase + ": " + rank_list(owed) + " did not answer within " + deadline.budget() + " (dead or hung)");
}

Status wait_for_collective(MPI_Request& request, const Deadline& deadline, const std::string& phase) {
  PollPacer pacer;
  for (;;) {
    int done = 0;
    const int rc = MPI_Test(&request, &done, MPI_STATUS_IGNORE);
    if (rc != MPI_SUCCESS) return Status(ErrorCode::kFatal, phase + ": " + mpi_status(rc, "MPI_Test", __FILE__, __LINE__).message());
    if (done) return Status::ok();
    if (deadline.passed()) {
      return Status(ErrorCode::kFatal,
                    phase + ": not complete within " + deadline.budget() + " (a rank is dead or hung)");
    }
    pacer.pause();
  }
}

}  // namespace reattn
