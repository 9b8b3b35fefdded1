#include "comm/control.h"

#include <mpi.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

#include "comm/mpi_wait.h"

namespace reattn {
namespace {

// Point-to-point tags of the agreement (the data plane uses its own).
constexpr int kVoteTag = 7001;
constexpr int kVerdictTag = 7002;
// Point-to-point tags of a broadcast: its size, then its bytes.
constexpr int kSizeTag = 7003;
constexpr int kBytesTag = 7004;
// Point-to-point tags of a gather: the size, then the bytes, from each rank to rank 0.
constexpr int kGatherSizeTag = 7005;
constexpr int kGatherBytesTag = 7006;
// The most bytes one rank may contribute to a gather.
constexpr uint64_t kMaxGatherBytes = uint64_t{1} << 20;

// One rank's outcome, or rank 0's verdict: a fixed size, so each is one message.
struct Vote {
  int32_t code = 0;
  int32_t length = 0;
  char text[2040] = {};

  static Vote of(const Status& s) {
    Vote v;
    v.code = static_cast<int32_t>(s.code());
    const std::string& m = s.message();
    const char kEllipsis[] = "\xE2\x80\xA6";  // "…"
    if (m.size() <= sizeof(text)) {
      v.length = static_cast<int32_t>(m.size());
      std::memcpy(v.text, m.data(), m.size());
    } else {
      const size_t keep = sizeof(text) - (sizeof(kEllipsis) - 1);
      std::memcpy(v.text, m.data(), keep);
      std::memcpy(v.text + keep, kEllipsis, sizeof(kEllipsis) - 1);
      v.length = static_cast<int32_t>(sizeof(text));
    }
    return v;
  }
  Status status() const {
    if (code == 0) return Status::ok();
    return Status(static_cast<ErrorCode>(code), std::string(text, std::clamp<int32_t>(length, 0, sizeof(text))));
  }
};

}  // namespace

namespace {

std::string mpi_error_text(int rc) {
  char text[MPI_MAX_ERROR_STRING];
  int len = 0;
  MPI_Error_string(rc, text, &len);
  return std::string(text, len);
}

}  // namespace

Status mpi_status(int rc, const char* statement, const char* file, int line) {
  if (rc == MPI_SUCCESS) return Status::ok();
  return Status(ErrorCode::kFatal, std::string(statement) + " failed: " + mpi_error_text(rc) + fault_site(file, line));
}

Status mpi_status(int rc, const char* what) {
  if (rc == MPI_SUCCESS) return Status::ok();
  int rank = -1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  return Status(ErrorCode::kFatal, std::string(what) + " failed: " + mpi_error_text(rc) + " on rank " + std::to_string(rank));
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
    : owns_mpi_(other.owns_mpi_),
      rank_(other.rank_),
      world_(other.world_),
      local_rank_(other.local_rank_),
      deadlines_(other.deadlines_),
      fault_(other.fault_) {
  other.owns_mpi_ = false;
}

Control::~Control() {
  // After a fault MPI_Finalize could wait for a rank that never comes.
  if (owns_mpi_ && fault_->is_ok()) MPI_Finalize();
}

Status Control::fault() const { return *fault_; }

Status Control::poison(Status fault) const {
  if (fault_->is_ok()) *fault_ = Status(ErrorCode::kFatal, fault.message());
  return *fault_;
}

Status Control::broadcast_for(std::string& bytes, int root, const Deadline& deadline, const std::string& phase) const {
  if (!fault_->is_ok()) return *fault_;
  if (world_ == 1) return Status::ok();
  // Point to point from the root rather than MPI_Ibcast, so a rank that does not take its
  // copy is named. MPI counts are ints: the bytes go in pieces below 2 GiB.
  constexpr uint64_t kPiece = uint64_t{1} << 30;
  uint64_t size = bytes.size();
  std::vector<MPI_Request> requests;
  std::vector<int> peers;
  Status s = Status::ok();
  if (rank_ == root) {
    for (int r = 0; r < world_ && s.is_ok(); ++r) {
      if (r == root) continue;
      requests.emplace_back(MPI_REQUEST_NULL);
      peers.push_back(r);
      s = mpi_status(MPI_Isend(&size, 1, MPI_UINT64_T, r, kSizeTag, MPI_COMM_WORLD, &requests.back()), "MPI_Isend", __FILE__, __LINE__);
      for (uint64_t done = 0; done < size && s.is_ok(); done += kPiece) {
        const int piece = static_cast<int>(std::min(size - done, kPiece));
        requests.emplace_back(MPI_REQUEST_NULL);
        peers.push_back(r);
        s = mpi_status(MPI_Isend(&bytes[done], piece, MPI_BYTE, r, kBytesTag, MPI_COMM_WORLD, &requests.back()),
                       "MPI_Isend", __FILE__, __LINE__);
      }
    }
  } else {
    requests.assign(1, MPI_REQUEST_NULL);
    peers.assign(1, root);
    s = mpi_status(MPI_Irecv(&size, 1, MPI_UINT64_T, root, kSizeTag, MPI_COMM_WORLD, &requests[0]), "MPI_Irecv", __FILE__, __LINE__);
    if (s.is_ok()) s = wait_for_peers(requests, peers, deadline, phase);
    if (!s.is_ok()) return poison(s);
    bytes.resize(size);
    requests.clear();
    peers.clear();
    for (uint64_t done = 0; done < size && s.is_ok(); done += kPiece) {
      const int piece = static_cast<int>(std::min(size - done, kPiece));
      requests.emplace_back(MPI_REQUEST_NULL);
      peers.push_back(root);
      s = mpi_status(MPI_Irecv(&bytes[done], piece, MPI_BYTE, root, kBytesTag, MPI_COMM_WORLD, &requests.back()),
                     "MPI_Irecv", __FILE__, __LINE__);
    }
  }
  if (s.is_ok()) s = wait_for_peers(requests, peers, deadline, phase);
  if (!s.is_ok()) return poison(s);
  return Status::ok();
}

Status Control::broadcast(std::string& bytes, int root) const {
  return broadcast_for(bytes, root, Deadline(WaitDeadlines::for_rank(deadlines_.operation_s, rank_)),
                       "broadcast of an operation");
}

Status Control::agree_for(const Status& local, double seconds, const std::string& phase) const {
  if (!fault_->is_ok()) return *fault_;
  if (world_ == 1) return local;
  const Deadline deadline(WaitDeadlines::for_rank(seconds, rank_));
  if (rank_ != 0) {
    Vote mine = Vote::of(local), verdict;
    std::vector<MPI_Request> requests(2, MPI_REQUEST_NULL);
    Status s = mpi_status(MPI_Irecv(&verdict, sizeof(Vote), MPI_BYTE, 0, kVerdictTag, MPI_COMM_WORLD, &requests[0]),
                          "MPI_Irecv", __FILE__, __LINE__);
    if (s.is_ok()) {
      s = mpi_status(MPI_Isend(&mine, sizeof(Vote), MPI_BYTE, 0, kVoteTag, MPI_COMM_WORLD, &requests[1]), "MPI_Isend", __FILE__, __LINE__);
    }
    if (s.is_ok()) s = wait_for_peers(requests, {0, 0}, deadline, phase);
    if (!s.is_ok()) return poison(s);
    return verdict.status();
  }
  // Rank 0: every rank's outcome, then the lowest failing rank's to everyone.
  std::vector<Vote> votes(world_);
  votes[0] = Vote::of(local);
  std::vector<MPI_Request> requests(world_ - 1, MPI_REQUEST_NULL);
  std::vector<int> peers(world_ - 1);
  Status s = Status::ok();
  for (int r = 1; r < world_ && s.is_ok(); ++r) {
    peers[r - 1] = r;
    s = mpi_status(MPI_Irecv(&votes[r], sizeof(Vote), MPI_BYTE, r, kVoteTag, MPI_COMM_WORLD, &requests[r - 1]),
                   "MPI_Irecv", __FILE__, __LINE__);
  }
  if (s.is_ok()) s = wait_for_peers(requests, peers, deadline, phase);
  if (!s.is_ok()) return poison(s);
  Vote verdict;
  for (const Vote& v : votes) {
    if (v.code != 0) {
      verdict = v;
      break;
    }
  }
  for (int r = 1; r < world_ && s.is_ok(); ++r) {
    s = mpi_status(MPI_Isend(&verdict, sizeof(Vote), MPI_BYTE, r, kVerdictTag, MPI_COMM_WORLD, &requests[r - 1]),
                   "MPI_Isend", __FILE__, __LINE__);
  }
  if (s.is_ok()) s = wait_for_peers(requests, peers, deadline, phase);
  if (!s.is_ok()) return poison(s);
  return verdict.status();
}

Status Control::agree(const Status& local) const {
  return agree_for(local, deadlines_.operation_s, "agreement on an operation's outcome");
}

Status Control::barrier() const { return agree_for(Status::ok(), deadlines_.operation_s, "barrier"); }

Status Control::gather(const std::string& local, std::vector<std::string>* all) const {
  if (!fault_->is_ok()) return *fault_;
  if (local.size() > kMaxGatherBytes) return internal_error("gather: " + std::to_string(local.size()) + " bytes is over the limit");
  if (rank_ == 0) all->assign(world_, std::string());
  if (rank_ == 0) (*all)[0] = local;
  if (world_ == 1) return Status::ok();
  const Deadline deadline(WaitDeadlines::for_rank(deadlines_.operation_s, rank_));
  const std::string phase = "gather to rank 0";
  if (rank_ != 0) {
    uint64_t size = local.size();
    std::vector<MPI_Request> requests(2, MPI_REQUEST_NULL);
    Status s = mpi_status(MPI_Isend(&size, 1, MPI_UINT64_T, 0, kGatherSizeTag, MPI_COMM_WORLD, &requests[0]),
                          "MPI_Isend", __FILE__, __LINE__);
    if (s.is_ok()) {
      s = mpi_status(MPI_Isend(local.data(), static_cast<int>(size), MPI_BYTE, 0, kGatherBytesTag, MPI_COMM_WORLD,
                               &requests[1]),
                     "MPI_Isend", __FILE__, __LINE__);
    }
    if (s.is_ok()) s = wait_for_peers(requests, {0, 0}, deadline, phase);
    return s.is_ok() ? s : poison(s);
  }
  std::vector<uint64_t> sizes(world_, 0);
  std::vector<MPI_Request> requests(world_ - 1, MPI_REQUEST_NULL);
  std::vector<int> peers(world_ - 1);
  Status s = Status::ok();
  for (int r = 1; r < world_ && s.is_ok(); ++r) {
    peers[r - 1] = r;
    s = mpi_status(MPI_Irecv(&sizes[r], 1, MPI_UINT64_T, r, kGatherSizeTag, MPI_COMM_WORLD, &requests[r - 1]),
                   "MPI_Irecv", __FILE__, __LINE__);
  }
  if (s.is_ok()) s = wait_for_peers(requests, peers, deadline, phase);
  for (int r = 1; r < world_ && s.is_ok(); ++r) {
    if (sizes[r] > kMaxGatherBytes) {
      s = Status(ErrorCode::kFatal, "gather: rank " + std::to_string(r) + " sent " + std::to_string(sizes[r]) + " bytes");
      break;
    }
    (*all)[r].resize(sizes[r]);
    s = mpi_status(MPI_Irecv(&(*all)[r][0], static_cast<int>(sizes[r]), MPI_BYTE, r, kGatherBytesTag, MPI_COMM_WORLD,
                             &requests[r - 1]),
                   "MPI_Irecv", __FILE__, __LINE__);
  }
  if (s.is_ok()) s = wait_for_peers(requests, peers, deadline, phase);
  return s.is_ok() ? s : poison(s);
}

Status Control::heartbeat() const {
  if (rank_ != 0) return internal_error("Control::heartbeat called on rank " + std::to_string(rank_));
  std::string empty;
  REATTN_RETURN_IF_ERROR(broadcast_for(empty, 0, Deadline(deadlines_.step_s), "heartbeat"));
  return agree_for(Status::ok(), deadlines_.step_s, "heartbeat");
}

Status Control::next_operation(std::string& bytes) const {
  if (rank_ == 0) return internal_error("Control::next_operation called on rank 0");
  for (;;) {
    const Deadline idle(deadlines_.idle_limit_s());
    REATTN_RETURN_IF_ERROR(broadcast_for(bytes, 0, idle, "waiting for rank 0's next operation or heartbeat"));
    // An operation is never empty: an empty broadcast is rank 0's heartbeat.
    if (!bytes.empty()) return Status::ok();
    REATTN_RETURN_IF_ERROR(agree_for(Status::ok(), deadlines_.step_s, "heartbeat"));
  }
}

void Control::abort(int code) const {
  // MPI_Abort asks the launcher to end every rank; Open MPI's can block for ever when the
  // launcher is already ending the job (after a rank died). This rank ends regardless.
  std::thread([code] {
    std::this_thread::sleep_for(std::chrono::seconds(2));
    std::_Exit(code);
  }).detach();
  MPI_Abort(MPI_COMM_WORLD, code);
  std::_Exit(code);
}

}  // namespace reattn
