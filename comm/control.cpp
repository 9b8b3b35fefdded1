#include "comm/control.h"

#include <mpi.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>

namespace reattn {

Status mpi_status(int rc, const char* statement, const char* file, int line) {
  if (rc == MPI_SUCCESS) return Status::ok();
  char text[MPI_MAX_ERROR_STRING];
  int len = 0;
  MPI_Error_string(rc, text, &len);
  return Status(ErrorCode::kFatal, std::string(statement) + " failed: " + std::string(text, len) + fault_site(file, line));
}

Expected<Control> Control::init(int* argc, char*** argv) {
  // The one place the environment is set, at start-up (every binary starts here): NVLink
  // multicast (NVLS) stays off, whatever the caller's environment says; on shared hosts it
  // can take every GPU out of service.
  setenv("NCCL_NVLS_ENABLE", "0", 1);
  int provided = 0;
  REATTN_MPI_CHECK(MPI_Init_thread(argc, argv, MPI_THREAD_SERIALIZED, &provided));
  MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
  Control control;
  control.owns_mpi_ = true;
  MPI_Comm_rank(MPI_COMM_WORLD, &control.rank_);
  MPI_Comm_size(MPI_COMM_WORLD, &control.world_);
  record_process_rank(control.rank_);
  MPI_Comm node;
  REATTN_MPI_CHECK(MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, control.rank_, MPI_INFO_NULL, &node));
  MPI_Comm_rank(node, &control.local_rank_);
  MPI_Comm_free(&node);
  return control;
}

Control::Control(Control&& other) noexcept
    : owns_mpi_(other.owns_mpi_), rank_(other.rank_), world_(other.world_), local_rank_(other.local_rank_) {
  other.owns_mpi_ = false;
}

Control::~Control() {
  if (owns_mpi_) MPI_Finalize();
}

Status Control::broadcast(std::string& bytes, int root) const {
  uint64_t size = bytes.size();
  REATTN_MPI_CHECK(MPI_Bcast(&size, 1, MPI_UINT64_T, root, MPI_COMM_WORLD));
  bytes.resize(size);
  size_t done = 0;
  // MPI counts are ints: send in pieces below 2 GiB.
  while (done < size) {
    const int piece = static_cast<int>(std::min<uint64_t>(size - done, 1u << 30));
    REATTN_MPI_CHECK(MPI_Bcast(&bytes[done], piece, MPI_BYTE, root, MPI_COMM_WORLD));
    done += piece;
  }
  return Status::ok();
}

Status Control::agree(const Status& local) const {
  int mine = local.is_ok() ? world_ : rank_;
  int first = world_;
  REATTN_MPI_CHECK(MPI_Allreduce(&mine, &first, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD));
  if (first == world_) return Status::ok();
  int code = static_cast<int>(local.code());
  REATTN_MPI_CHECK(MPI_Bcast(&code, 1, MPI_INT, first, MPI_COMM_WORLD));
  std::string message = local.message();
  REATTN_RETURN_IF_ERROR(broadcast(message, first));
  return Status(static_cast<ErrorCode>(code), message);
}

Status Control::barrier() const {
  REATTN_MPI_CHECK(MPI_Barrier(MPI_COMM_WORLD));
  return Status::ok();
}

void Control::abort(int code) const {
  MPI_Abort(MPI_COMM_WORLD, code);
  std::abort();
}

}  // namespace reattn
