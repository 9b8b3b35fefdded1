// The control plane over MPI (host memory): process start-up, step plans broadcast from the
// coordinator, and agreement on errors so that a failure on one rank is reported by all and
// hangs none. Call only from the thread that runs the step loop.
#pragma once

#include <string>

#include "common/check.h"

namespace reattn {

class Control {
 public:
  // MPI_Init_thread (serialized) with errors returned, not fatal. Also pins
  // NCCL_NVLS_ENABLE=0 in the environment before anything reads it.
  static Expected<Control> init(int* argc, char*** argv);
  Control(Control&& other) noexcept;
  Control& operator=(Control&&) = delete;
  ~Control();  // MPI_Finalize

  int rank() const { return rank_; }
  int world() const { return world_; }
  int local_rank() const { return local_rank_; }

  // `bytes` on root is sent; on the others it is replaced.
  Status broadcast(std::string& bytes, int root) const;
  // Every rank returns the same Status: ok when all were ok, else the lowest failing rank's.
  Status agree(const Status& local) const;
  Status barrier() const;
  // Ends every rank of the job (after an unrecoverable fault).
  [[noreturn]] void abort(int code) const;

 private:
  Control() = default;
  bool owns_mpi_ = false;
  int rank_ = 0;
  int world_ = 1;
  int local_rank_ = 0;
};

// Status of an MPI call for REATTN_MPI_CHECK (common/check.h): kFatal naming the statement,
// the MPI error string, file:line and rank.
Status mpi_status(int rc, const char* statement, const char* file, int line);

}  // namespace reattn
