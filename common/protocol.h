// The contract between rank 0 (the coordinator) and every rank: context ids, the operations
// rank 0 broadcasts (create, erase, append K/V, synthetic fill, a step of queries, shutdown),
// the plan of a query step, and what an operation or query produced. One bounds-checked
// codec turns an operation into bytes and back. Plain data: no backend, no MPI.
// Thread-safety: values only; the functions keep no state.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <variant>
#include <vector>

#include "common/config.h"
#include "common/dtype.h"
#include "common/status.h"

namespace reattn {

using ContextId = uint64_t;

// One query of a step. Crosses ranks field by field (encode_operation).
struct QueryPlan {
  ContextId context_id = 0;
  int64_t tokens = 0;      // n, the layer's length as the coordinator saw it; every rank checks it
  int64_t qlen = 0;
  int64_t q_offset = 0;    // floats into StepPlan::q
  int32_t layer = 0;
  QueryMode mode = QueryMode::kTail;
  int32_t owner_rank = 0;
};

// A batch of queries run as one step: one broadcast, one allgather, one final phase.
struct StepPlan {
  FinalAttention strategy = FinalAttention::kGather;
  int32_t reply_rank = 0;
  std::vector<QueryPlan> queries;
  std::vector<float> q;    // the queries' rows, each [qlen, H, D] pre-RoPE, at q_offset
};

// Appends `query` (whose q_offset indexes `q`) to `plan`, moving its rows behind the plan's.
void append_query(StepPlan& plan, QueryPlan query, const float* q, size_t q_floats);
// The same from q in `dtype`, converted into the plan.
void append_query(StepPlan& plan, QueryPlan query, DType dtype, const void* q, size_t q_values);

struct StepTiming {
  double score_ms = 0;      // local chunk scoring and top-k
  double candidates_ms = 0; // candidate allgather and recall selection (reported as "merge_ms")
  double attention_ms = 0;  // chunk or state exchange, windowed attention, state merge, reply
  double total_ms = 0;      // the query step: score + candidates + attention
  double append_ms = 0;     // a layer step: appending its k/v on every rank, before the query step
  // A long operation's slice, on rank 0: its own share of the work, the wait for the other
  // ranks' outcome, and (a load) the time its reads of the file took, summed over threads.
  double local_ms = 0;
  double wait_ms = 0;
  double read_ms = 0;
};

struct QueryResult {
  Status status;
  std::vector<int64_t> recalled;  // chunk ids, ascending (chunk recall)
  std::vector<std::pair<int64_t, int64_t>> recalled_spans;  // span recall: [first, end) tokens, ascending
  std::vector<float> out;         // [qlen, H, D] fp32
};

// ---- Operations, broadcast from rank 0 and applied by every rank in the same order ----
struct CreateContext {
  ContextId context_id = 0;
  int32_t owner_rank = 0;
};
struct EraseContext {
  ContextId context_id = 0;
};
// A safetensors body with k and v [layers, Hkv, tokens, D]. Rank 0 checked its shapes and
// values when the request arrived; the bytes follow the encoded operation as their own
// broadcast (so the body is never copied into the message).
struct AppendKv {
  ContextId context_id = 0;
  int64_t tokens = 0;
  std::shared_ptr<std::string> body;
};
// Tokens [n, n + tokens) of the synthetic context `seed`; needles are absolute positions.
struct AppendSynthetic {
  ContextId context_id = 0;
  int64_t tokens = 0;
  uint64_t seed = 0;
  std::vector<int64_t> needles;
};
struct Shutdown {};
// The q, k and v of a layer step as the client sent them (F32, F16 or BF16, pre-RoPE): byte
// ranges of one shared buffer, the request's body itself (a JSON request's values are laid
// out in one such buffer). It follows the encoded operation as its own broadcast, so on rank 0
// it is never copied, and each value is converted once, where it is used.
struct StepTensors {
  std::shared_ptr<std::string> body;
  DType q_dtype = DType::kF32;   // q [qlen, H, D] at q_offset
  DType kv_dtype = DType::kF32;  // k, v [Hkv, qlen, D] at k_offset, v_offset
  uint64_t q_offset = 0;
  uint64_t k_offset = 0;
  uint64_t v_offset = 0;
  const char* at(uint64_t offset) const { return body->data() + offset; }
  // Whether q, k and v of these sizes lie inside the body.
  bool fit(uint64_t q_values, uint64_t kv_values) const;
};

// One layer of a model's forward pass: appends k and v to layer `layer` only, then runs the
// tail query whose rows are those tokens. Rank 0 checked the order rule (check_layer_step)
// and the tensors' shapes and values; every rank checks that the layer holds `layer_tokens`
// before it and that the tensors fit the body.
struct LayerStep {
  ContextId context_id = 0;
  int32_t layer = 0;
  int64_t layer_tokens = 0;  // the layer's length before the step
  int64_t qlen = 0;
  StepTensors tensors;
};

// One step of a bulk load from a safetensors file that every rank maps and reads itself (k and
// v [layers, Hkv, tokens, D], as /kv takes them), run by rank 0 as a long-running operation:
// kBegin opens and checks the file and keeps what a rollback needs, each kSlice appends file
// tokens [offset, offset + count) to every layer (each rank reads only the blocks it holds and
// checks their values), kCommit forgets the kept state, kAbort puts the context back exactly as
// it was at kBegin (after any slices, on every rank).
enum class LoadPhase : int32_t { kBegin, kSlice, kCommit, kAbort };
struct LoadKv {
  ContextId context_id = 0;
  LoadPhase phase = LoadPhase::kBegin;
  std::string path;            // kBegin: the file's real path; each rank checks it is under server.load_root
  int64_t file_tokens = 0;     // kBegin: tokens the file holds, as rank 0 read its header
  int64_t context_tokens = 0;  // kBegin: the context's length before the load; every rank checks it
  int64_t offset = 0;          // kSlice
  int64_t count = 0;           // kSlice; kBegin: the first slice's (read ahead from the start)
};

// A snapshot runs as slices (coordinator/snapshot_operations.h): kWrite slices append layers
// [first_layer, end_layer) of the context to every rank's file in <snapshot_dir>/<tmp>/ (the
// first one creates it); kPublish closes the files, and rank 0 writes the manifest (`created`
// its UTC time) and renames the directory to <snapshot_dir>/<name>; kAbort (the rollback)
// drops the files. The context is only read (worker/snapshot_worker.h).
enum class SnapshotPhase : int32_t { kWrite, kPublish, kAbort };
struct SnapshotContext {
  ContextId context_id = 0;
  SnapshotPhase phase = SnapshotPhase::kWrite;
  std::string name;
  std::string tmp;
  std::string created;
  int32_t first_layer = 0;
  int32_t end_layer = 0;
};
// A restore into the new context `context_id`, as slices: kOpen checks the snapshot
// <snapshot_dir>/<name> (its manifest text, as rank 0 read it) on every rank, verifies the
// files' checksums and makes the empty context owned by `owner_rank`; kLayer appends layer
// `layer` from the files; kClose lets the files go (last, and in a rollback before the erase).
enum class RestorePhase : int32_t { kOpen, kLayer, kClose };
struct RestoreContext {
  ContextId context_id = 0;
  RestorePhase phase = RestorePhase::kOpen;
  int32_t owner_rank = 0;
  std::string name;
  std::string manifest;  // kOpen only
  int32_t layer = 0;     // kLayer
};

using Operation = std::variant<CreateContext, EraseContext, AppendKv, AppendSynthetic, StepPlan, Shutdown, LayerStep,
                               LoadKv, SnapshotContext, RestoreContext>;

// "create", "erase", "append_kv", "synthetic", "query_step", "shutdown", "layer_step", "load_kv",
// "snapshot", "restore".
const char* operation_name(const Operation& op);
// The context an operation names (0 for a step or shutdown).
ContextId operation_context(const Operation& op);

// AppendKv's and LayerStep's body is not in the bytes: it travels as the next broadcast.
std::string encode_operation(const Operation& op);
// Every count, enum and length is range-checked; anything malformed is an error.
Expected<Operation> decode_operation(const std::string& bytes);

// What an operation did; `status` is the same on every rank.
struct OperationResult {
  Status status;
  int64_t tokens = 0;                 // the context's length afterwards (create, append, synthetic;
                                      // a layer step: that layer's)
  bool context_dropped = false;       // an append failed on some ranks only: the context was erased everywhere
  std::vector<QueryResult> queries;   // a step or layer step, on its reply rank: one per query
  StepTiming timing;                  // a step
  std::vector<int64_t> layer_tokens;  // a restore slice: each layer's length afterwards
  std::string manifest;               // a snapshot's kPublish, on rank 0: the manifest it published
  int64_t bytes = 0;                  // a snapshot's kWrite, on rank 0: bytes all ranks wrote
};

// Runs operations on every rank (rank 0 side). The step loop depends on this, not on MPI,
// so a test can drive it with a fake.
class OperationRunner {
 public:
  virtual ~OperationRunner() = default;
  // Broadcasts `op` and applies it on every rank. A non-ok return is a fatal fault (the
  // ranks can no longer agree); a failed operation is reported in result->status.
  virtual Status submit(const Operation& op, OperationResult* result) = 0;
  // Between operations: a fault unless every rank answers within the step deadline.
  virtual Status heartbeat() { return Status::ok(); }
};

}  // namespace reattn
