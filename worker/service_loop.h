// The per-rank loop of the service. Rank 0 (the coordinator) turns each unit of work into an
// Operation, broadcasts it, and every rank applies it to its KV shard in the same order:
// create or erase a context, append K/V (a safetensors body, or synthetic tokens), run a batch
// of queries as one step, or shut down. Outcomes are agreed across ranks (Control::agree), so
// every rank reports the same Status and a failed operation changes nothing on any rank.
// Ranks other than 0 only loop on the broadcast (serve) until the shutdown operation.
// Thread-safety: a ServiceLoop is used by one thread only, the one that makes MPI calls
// (Control is MPI_THREAD_SERIALIZED): call every method only from the step loop's thread.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "comm/communicator.h"
#include "comm/control.h"
#include "worker/kv_store.h"
#include "worker/step.h"

namespace reattn {

enum class OperationKind : int32_t {
  kCreate = 1,      // context_id, owner_rank
  kErase = 2,       // context_id
  kAppendKv = 3,    // context_id, payload: safetensors bytes with k, v [layers, Hkv, tokens, D]
  kSynthetic = 4,   // context_id, tokens, seed, needles: tokens [n, n + tokens) of the synthetic context
  kQueryBatch = 5,  // payload: encode_step(StepPlan)
  kShutdown = 6,
};

const char* operation_kind_name(OperationKind kind);

// One unit of work, broadcast from rank 0 as bytes.
struct Operation {
  OperationKind kind = OperationKind::kShutdown;
  ContextId context_id = 0;
  int32_t owner_rank = 0;
  int64_t tokens = 0;             // kSynthetic: tokens to add
  uint64_t seed = 0;              // kSynthetic
  std::vector<int64_t> needles;   // kSynthetic: absolute token positions, inside the append
  std::string payload;            // kAppendKv, kQueryBatch
};

std::string encode_operation(const Operation& op);
Expected<Operation> decode_operation(const std::string& bytes);

// What an operation did; `status` is the same on every rank.
struct OperationResult {
  Status status;
  int64_t tokens = 0;                 // the context's length afterwards (create, append, synthetic)
  bool context_dropped = false;       // an append failed on some ranks only: the context was erased everywhere
  std::vector<QueryResult> queries;   // kQueryBatch, on rank 0: one per query of the plan
  StepTiming timing;                  // kQueryBatch
};

class ServiceLoop {
 public:
  ServiceLoop(const Control& control, Backend& backend, Communicator& comm, const Config& config);

  // Rank 0 only: broadcasts `op` and applies it here as every other rank does.
  // A non-ok return is a communicator or device fault (unrecoverable); a failed operation is
  // reported in result->status.
  Status submit(const Operation& op, OperationResult* result);

  // Ranks other than 0: receive and apply operations until kShutdown (returns ok) or a fault
  // (including rank 0 silent for longer than the control plane's idle limit).
  Status serve();

  // Rank 0, between operations: checks that every rank still answers (Control::heartbeat).
  Status heartbeat() { return control_.heartbeat(); }

  const KvStore& store() const { return store_; }

 private:
  // Every rank, same order. Returns a fault; the operation's outcome goes to result->status.
  Status apply(const Operation& op, OperationResult* result);
  Status apply_create(const Operation& op, OperationResult* result);
  Status apply_append(const Operation& op, const KvSource* source, const Status& source_status,
                      OperationResult* result);
  Status apply_query_batch(const Operation& op, OperationResult* result);

  const Control& control_;
  Config config_;
  KvStore store_;
  StepRunner runner_;
};

}  // namespace reattn
