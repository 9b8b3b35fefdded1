// The table of long-running operations (bulk loads, snapshots, restores) behind
// /v1/operations: one record per operation, with an id "op-N", its kind, the context it works
// on, its state (queued -> running -> succeeded | failed | cancelled), its progress and a
// cancel flag. A context with an unfinished operation is busy (busy_with): the handlers refuse
// conflicting requests with 409 naming the operation. Finished records are kept, the oldest
// dropped past kKeptFinished.
// Thread-safety: every method is safe from any thread (one mutex). HTTP threads create records
// and request cancels; only the step loop moves a record through its states.
#pragma once

#include <chrono>
#include <cstdint>
#include <deque>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "common/protocol.h"
#include "common/status.h"

namespace reattn {

enum class OperationKind { kLoad, kSnapshot, kRestore };
enum class OperationState { kQueued, kRunning, kSucceeded, kFailed, kCancelled };

const char* operation_kind_name(OperationKind kind);    // "load", "snapshot", "restore"
const char* operation_state_name(OperationState state);  // "queued", "running", ...
bool is_finished(OperationState state);

// Counts a long operation reports as it goes; units are tokens of the context (all layers of
// a token count once) and bytes read or written by all ranks together.
struct OperationProgress {
  int64_t tokens_done = 0;
  int64_t tokens_total = 0;
  int64_t bytes_done = 0;
};

struct OperationRecord {
  std::string id;                 // "op-N", N from 1
  OperationKind kind = OperationKind::kLoad;
  ContextId context_id = 0;       // 0 while a restore has not made its context yet
  OperationState state = OperationState::kQueued;
  OperationProgress progress;
  double bytes_per_s = 0;         // bytes_done over the time running so far (or in all, once finished)
  std::chrono::system_clock::time_point created, started, finished;  // started/finished: epoch until then
  std::string error;              // failed or cancelled: why, at most kErrorBytes
  bool cancel_requested = false;
};

class OperationTable {
 public:
  static constexpr size_t kKeptFinished = 256;
  static constexpr size_t kErrorBytes = 512;

  // A queued record; returns its id.
  std::string create(OperationKind kind, ContextId context_id, int64_t tokens_total);
  std::optional<OperationRecord> get(const std::string& id) const;
  std::vector<OperationRecord> list() const;  // oldest first
  // NotFound for an unknown id; Conflict once the operation has finished. The step loop sees
  // the flag before the operation's next slice.
  Status request_cancel(const std::string& id);
  bool cancel_requested(const std::string& id) const;
  // The id of the unfinished operation on `context_id`, if any. `queries_too`: only one that
  // also refuses queries (a load or restore: the context's contents are partial).
  std::optional<std::string> busy_with(ContextId context_id, bool queries_too = false) const;
  // Conflict naming the operation when busy_with(context_id, queries_too), else ok.
  Status check_not_busy(ContextId context_id, bool queries_too = false) const;
  // Unfinished operations by (kind, state): queued or running (metrics).
  std::map<std::pair<OperationKind, OperationState>, int64_t> unfinished() const;

  // Step loop only.
  void set_running(const std::string& id);
  void set_context(const std::string& id, ContextId context_id);
  void set_progress(const std::string& id, const OperationProgress& progress);
  // `state` is succeeded, failed or cancelled; `error` is capped.
  void finish(const std::string& id, OperationState state, const std::string& error = "");

 private:
  OperationRecord* find_locked(const std::string& id);
  const OperationRecord* find_locked(const std::string& id) const;
  void drop_old_locked();

  mutable std::mutex mu_;
  std::deque<OperationRecord> records_;  // creation order
  uint64_t next_id_ = 1;
};

}  // namespace reattn
