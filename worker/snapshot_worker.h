// The ranks' side of snapshots and restores: the slices of common/protocol.h's SnapshotContext
// and RestoreContext, applied on every rank in the same order. Between slices it keeps the
// files a snapshot in progress is writing (by temporary directory) and the snapshot a restore
// in progress reads (by context). Every outcome is agreed (Control::agree), so all ranks report
// the same Status; a failed slice is undone by the operation's rollback (kAbort, or kClose and
// an erase).
// Checksums: a restore's kOpen verifies every file's crc32 before anything changes, file f on
// rank f mod world (each file read once, the reading spread over the ranks).
// Call only from the step loop's thread.
#pragma once

#include <map>
#include <memory>
#include <string>

#include "comm/control.h"
#include "common/protocol.h"
#include "worker/kv_store.h"
#include "worker/snapshot_files.h"

namespace reattn {

class SnapshotWorker {
 public:
  SnapshotWorker(const Control& control, Backend& backend, KvStore& store, const Config& config);

  // A non-ok return is a fault; the slice's outcome goes to result->status.
  Status apply(const SnapshotContext& op, OperationResult* result);
  Status apply(const RestoreContext& op, OperationResult* result);

 private:
  Status write(const SnapshotContext& op, OperationResult* result);
  Status publish(const SnapshotContext& op, OperationResult* result);
  Status abort(const SnapshotContext& op, OperationResult* result);
  Status open(const RestoreContext& op, OperationResult* result);
  Status restore_layer(const RestoreContext& op, OperationResult* result);
  // `local` agreed into result->status; a fault returned.
  Status agree_into(const Status& local, OperationResult* result);
  std::string path(const std::string& leaf) const;

  const Control& control_;
  Backend& backend_;
  KvStore& store_;
  const Config config_;
  std::map<std::string, std::unique_ptr<SnapshotFileWriter>> writers_;  // by temporary directory
  std::map<ContextId, std::unique_ptr<SnapshotReader>> readers_;        // by the context restored into
};

}  // namespace reattn
