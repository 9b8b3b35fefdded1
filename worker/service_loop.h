// The per-rank loop of the service. Rank 0 (the coordinator) submits each Operation
// (common/protocol.h): it is broadcast, and every rank applies it to its KV shard in the same
// order: create or erase a context, append K/V (a safetensors body, or synthetic tokens), run
// a step of queries, a phase of a bulk load (worker/kv_load.h), a slice of a snapshot or restore
// (worker/snapshot_worker.h), or shut down. Outcomes are agreed across ranks (Control::agree), so every
// rank reports the same Status and a failed operation changes nothing on any rank.
// Ranks other than 0 only loop on the broadcast (serve) until the shutdown operation.
// Thread-safety: a ServiceLoop is used by one thread only, the one that makes MPI calls
// (Control is MPI_THREAD_SERIALIZED): call every method only from the step loop's thread.
#pragma once

#include "comm/communicator.h"
#include "comm/control.h"
#include "common/protocol.h"
#include "worker/kv_load.h"
#include "worker/kv_store.h"
#include "worker/snapshot_worker.h"
#include "worker/step.h"

namespace reattn {

class ServiceLoop final : public OperationRunner {
 public:
  ServiceLoop(const Control& control, Backend& backend, Communicator& comm, const Config& config,
              StepOptions step_options = {});

  // Rank 0 only: broadcasts `op` and applies it here as every other rank does (rank 0 never
  // decodes what it sent). A non-ok return is a fatal fault; a failed operation is reported
  // in result->status.
  Status submit(const Operation& op, OperationResult* result) override;

  // Ranks other than 0: receive and apply operations until Shutdown (returns ok) or a fault
  // (including rank 0 silent for longer than the control plane's idle limit).
  Status serve();

  // Rank 0, between operations: checks that every rank still answers (Control::heartbeat).
  Status heartbeat() override { return control_.heartbeat(); }

  const KvStore& store() const { return store_; }

 private:
  // Every rank, same order. Returns a fault; the operation's outcome goes to result->status.
  Status apply(const Operation& op, OperationResult* result);
  Status apply_create(const CreateContext& op, OperationResult* result);
  Status apply_erase(const EraseContext& op, OperationResult* result);
  Status apply_append_kv(const AppendKv& op, OperationResult* result);
  Status apply_synthetic(const AppendSynthetic& op, OperationResult* result);
  Status apply_step(const StepPlan& plan, OperationResult* result);
  Status apply_layer_step(const LayerStep& op, OperationResult* result);
  Status apply_load(const LoadKv& op, OperationResult* result);
  // only_layer < 0: every layer.
  Status apply_append(ContextId id, const KvSource* source, const Status& source_status, OperationResult* result,
                      int only_layer = -1);

  const Control& control_;
  Config config_;
  KvStore store_;
  KvLoads loads_;
  SnapshotWorker snapshots_;  // snapshot and restore slices
  StepRunner runner_;
};

}  // namespace reattn
