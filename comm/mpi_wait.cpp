#include "comm/mpi_wait.h"

#include <set>

#include "comm/control.h"

namespace reattn {
namespace {

// Point-to-point tags of the roll call (control plane and data plane use their own).
constexpr int kRollCallTag = 7101;
constexpr int kRollAnswerTag = 7102;

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

namespace reattn {

Status roll_call(int world, double seconds) {
  const Deadline deadline(seconds);
  std::vector<int> calls(world, 1), answers(world, 0);
  std::vector<MPI_Request> requests;
  std::vector<int> peers;
  for (int r = 1; r < world; ++r) {
    requests.emplace_back(MPI_REQUEST_NULL);
    peers.push_back(r);
    MPI_Irecv(&answers[r], 1, MPI_INT, r, kRollAnswerTag, MPI_COMM_WORLD, &requests.back());
    requests.emplace_back(MPI_REQUEST_NULL);
    peers.push_back(r);
    MPI_Isend(&calls[r], 1, MPI_INT, r, kRollCallTag, MPI_COMM_WORLD, &requests.back());
  }
  const Status s = wait_for_peers(requests, peers, deadline, "roll call");
  // The buffers must outlive requests that never complete (the job ends after this).
  if (!s.is_ok()) {
    new std::vector<int>(std::move(calls));
    new std::vector<int>(std::move(answers));
  }
  return s;
}

bool answer_roll_call() {
  int pending = 0;
  if (MPI_Iprobe(0, kRollCallTag, MPI_COMM_WORLD, &pending, MPI_STATUS_IGNORE) != MPI_SUCCESS || !pending) return false;
  int call = 0, answer = 1;
  MPI_Recv(&call, 1, MPI_INT, 0, kRollCallTag, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
  MPI_Send(&answer, 1, MPI_INT, 0, kRollAnswerTag, MPI_COMM_WORLD);
  return true;
}

}  // namespace reattn
