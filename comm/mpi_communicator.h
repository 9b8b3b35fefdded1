// The data plane over MPI, for backends whose memory is host memory. Every transfer is
// non-blocking and polled against the step deadline; a peer that does not answer in time is
// named in a kFatal Status, and every later call fails at once with that fault.
#pragma once

#include "comm/communicator.h"
#include "comm/deadline.h"

namespace reattn {

class MpiCommunicator final : public Communicator {
 public:
  // MPI_COMM_WORLD; MPI must be initialised (Control::init). `step_deadline_s`: the longest
  // one collective may take on rank 0 (other ranks wait WaitDeadlines::kPeerFactor times longer).
  explicit MpiCommunicator(double step_deadline_s = 600);
  const char* name() const override { return "mpi"; }
  int rank() const override { return rank_; }
  int world() const override { return world_; }
  Status allgather(const void* send, void* recv, size_t bytes_per_rank) override;
  Status exchange(const std::vector<Transfer>& sends, const std::vector<Transfer>& recvs) override;

 private:
  Status finish(Status s);

  int rank_ = 0;
  int world_ = 1;
  double deadline_s_ = 600;
  Status fault_;
};

}  // namespace reattn
