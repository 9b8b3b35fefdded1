// Snapshot and restore as long-running operations (coordinator/long_operation.h), run by the
// step loop slice by slice between query steps:
//   snapshot: kWrite of `layers_per_slice` layers at a time on every rank, then kPublish (the
//             manifest, the rename); rollback kAbort (the files and temporary directory go).
//             Queries on the context go on meanwhile; appends, steps and deletes get 409.
//   restore:  kOpen (checks, checksums, the empty context), kLayer per layer, kClose; rollback
//             kClose and the context erased. The context is in the registry (empty) from
//             start(), so creates count it; queries on it get 409 until done.
// Each holds its snapshot's name in the catalog for as long as it exists (released in its
// destructor, however the operation ends), so the name is not taken twice or deleted under it.
// Thread-safety: as LongOperation (the step loop's thread), once queued.
#pragma once

#include <functional>
#include <memory>
#include <string>

#include "coordinator/long_operation.h"
#include "coordinator/snapshot_catalog.h"

namespace reattn {

class SnapshotOperation final : public LongOperation {
 public:
  // `catalog` holds `name` already (hold_new gave `tmp`).
  SnapshotOperation(SnapshotCatalog& catalog, ContextId context_id, std::string name, std::string tmp,
                    std::string created, int layers, int layers_per_slice = 1);
  ~SnapshotOperation() override;

  OperationKind kind() const override { return OperationKind::kSnapshot; }
  Status start(Registry& registry) override;
  std::optional<Operation> next_slice() override;
  Status on_slice_done(const Operation& slice, const OperationResult& result, Registry& registry) override;
  OperationProgress progress() const override { return progress_; }
  std::vector<Operation> rollback() override;

  // The manifest published (JSON), once succeeded.
  const std::string& manifest() const { return manifest_; }

 private:
  SnapshotContext slice(SnapshotPhase phase) const;

  SnapshotCatalog& catalog_;
  const ContextId context_id_;
  const std::string name_, tmp_, created_;
  const int layers_;
  const int layers_per_slice_;
  int next_layer_ = 0;
  bool published_ = false;
  bool done_ = false;
  std::string manifest_;
  OperationProgress progress_;
};

class RestoreOperation final : public LongOperation {
 public:
  // Into the new context `context_id` (reserved, or a restored context's own id at start-up);
  // `catalog` holds `stored`'s name already (hold_existing).
  RestoreOperation(SnapshotCatalog& catalog, StoredSnapshot stored, ContextId context_id);
  ~RestoreOperation() override;

  OperationKind kind() const override { return OperationKind::kRestore; }
  Status start(Registry& registry) override;
  std::optional<Operation> next_slice() override;
  Status on_slice_done(const Operation& slice, const OperationResult& result, Registry& registry) override;
  OperationProgress progress() const override { return progress_; }
  std::vector<Operation> rollback() override;
  void on_rolled_back(Registry& registry) override;

 private:
  RestoreContext slice(RestorePhase phase) const;

  SnapshotCatalog& catalog_;
  const StoredSnapshot stored_;
  const ContextId context_id_;
  int owner_rank_ = 0;
  bool opened_ = false;   // the ranks made the context
  bool closed_ = false;
  int next_layer_ = 0;
  OperationProgress progress_;
};

// Runs `op` to its end on the ranks now, outside the step loop (start-up --restore): its
// slices, and its rollback on failure; `after_slice` (if any) sees its progress after each
// slice; `stop` (if any) true before a slice ends it there, rolled back, as Unavailable (the
// service is shutting down). A non-ok return is a fault; the outcome goes to *outcome.
Status run_operation_now(LongOperation& op, OperationRunner& ranks, Registry& registry, Status* outcome,
                         const std::function<void(const OperationProgress&)>& after_slice = {},
                         const std::function<bool()>& stop = {});

}  // namespace reattn
