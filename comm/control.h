// The control plane over MPI (host memory): process start-up, step plans broadcast from the
// coordinator, and agreement on errors so that a failure on one rank is reported by all and
// hangs none. Every wait has a deadline (WaitDeadlines): a dead or hung rank ends in a kFatal
// Status naming the rank (where one can be named) and the phase, and every later call fails
// at once with that same fault (the communicator is poisoned; the job must end).
// Call only from the thread that runs the step loop.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "comm/deadline.h"
#include "common/check.h"

namespace reattn {

class Control {
 public:
  // MPI_Init_thread (serialized) with errors returned, not fatal. Also pins
  // NCCL_NVLS_ENABLE=0 in the environment before anything reads it.
  static Expected<Control> init(int* argc, char*** argv);
  Control(Control&& other) noexcept;
  Control& operator=(Control&&) = delete;
  ~Control();  // MPI_Finalize (skipped after a fault: a peer may never join it)

  int rank() const { return rank_; }
  int world() const { return world_; }
  int local_rank() const { return local_rank_; }

  // Before the first operation, on every rank alike (the config's deadlines).
  void set_deadlines(const WaitDeadlines& deadlines) { deadlines_ = deadlines; }
  const WaitDeadlines& deadlines() const { return deadlines_; }

  // `bytes` on root is sent; on the others it is replaced. Operation deadline.
  Status broadcast(std::string& bytes, int root) const;
  // Every rank returns the same Status: ok when all were ok, else the lowest failing rank's.
  // Rank 0 collects every rank's outcome and sends the verdict back, so a rank that does not
  // answer within the operation deadline is named.
  Status agree(const Status& local) const;
  Status barrier() const;
  // Rank 0 receives every rank's `local` into (*all)[rank] (its own included); the others send
  // theirs and leave `all` alone. Small messages (a snapshot file's size and checksum).
  // Operation deadline, the silent rank named.
  Status gather(const std::string& local, std::vector<std::string>* all) const;

  // Rank 0, when idle: a round trip with every rank within the step deadline, so a dead or
  // hung rank is found before a request needs it. The others answer it in next_operation.
  Status heartbeat() const;
  // Ranks other than 0: waits for rank 0's next broadcast (answering heartbeats meanwhile);
  // a fault when rank 0 is silent for longer than deadlines().idle_limit_s().
  Status next_operation(std::string& bytes) const;

  // The fault that poisoned this rank's control plane, or ok.
  Status fault() const;
  // Ends every rank of the job (after an unrecoverable fault): MPI_Abort, and this rank exits
  // with `code` within 2 s whatever MPI_Abort does.
  [[noreturn]] void abort(int code) const;

 private:
  Control() = default;
  Status poison(Status fault) const;
  Status broadcast_for(std::string& bytes, int root, const Deadline& deadline, const std::string& phase) const;
  Status agree_for(const Status& local, double seconds, const std::string& phase) const;

  bool owns_mpi_ = false;
  int rank_ = 0;
  int world_ = 1;
  int local_rank_ = 0;
  WaitDeadlines deadlines_;
  // Set once, by the first wait that fails; shared by moved-from copies.
  std::shared_ptr<Status> fault_ = std::make_shared<Status>();
};

// Status of an MPI call for REATTN_MPI_CHECK (common/check.h): kFatal naming the statement,
// the MPI error string, file:line and rank.
Status mpi_status(int rc, const char* statement, const char* file, int line);
// The same, as a value, where a caller collects statuses instead of returning at once.
Status mpi_status(int rc, const char* what);

}  // namespace reattn
