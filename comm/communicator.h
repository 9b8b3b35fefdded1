// The data plane between ranks: collectives and grouped point-to-point transfers over
// buffers in backend memory. MPI implements it for the cpu backend (host memory), NCCL for
// cuda (device memory). Every rank calls each operation in the same order; call only from
// the step loop's thread.
#pragma once

#include <cstddef>
#include <vector>

#include "common/status.h"

namespace reattn {

class Communicator {
 public:
  struct Transfer {
    int peer = 0;
    void* data = nullptr;
    size_t bytes = 0;
  };

  virtual ~Communicator() = default;
  virtual const char* name() const = 0;
  virtual int rank() const = 0;
  virtual int world() const = 0;

  // recv: [world][bytes_per_rank]; rank r's send lands at r * bytes_per_rank.
  virtual Status allgather(const void* send, void* recv, size_t bytes_per_rank) = 0;
  // All sends and receives of one phase, issued as one group. A transfer to or from this
  // rank itself is a local copy; both sides must list it.
  virtual Status exchange(const std::vector<Transfer>& sends, const std::vector<Transfer>& recvs) = 0;
};

}  // namespace reattn
