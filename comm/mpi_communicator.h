// The data plane over MPI, for backends whose memory is host memory.
#pragma once

#include "comm/communicator.h"

namespace reattn {

class MpiCommunicator final : public Communicator {
 public:
  MpiCommunicator();  // MPI_COMM_WORLD; MPI must be initialised (Control::init)
  const char* name() const override { return "mpi"; }
  int rank() const override { return rank_; }
  int world() const override { return world_; }
  Status allgather(const void* send, void* recv, size_t bytes_per_rank) override;
  Status exchange(const std::vector<Transfer>& sends, const std::vector<Transfer>& recvs) override;

 private:
  int rank_ = 0;
  int world_ = 1;
};

}  // namespace reattn
