#include "worker/service_loop.h"

#include <chrono>
#include <memory>
#include <string>
#include <type_traits>
#include <utility>

#include "common/safetensors.h"
#include "common/synthetic.h"

namespace reattn {
namespace {

bool is_fault(const Status& s) { return s.code() == ErrorCode::kFatal; }

// The bytes that follow an operation as their own broadcast (an append's or a layer step's
// body), or null.
std::shared_ptr<std::string> trailing_body(const Operation& op) {
  if (const auto* append = std::get_if<AppendKv>(&op)) return append->body;
  if (const auto* step = std::get_if<LayerStep>(&op)) return step->tensors.body;
  return nullptr;
}

bool has_trailing_body(const Operation& op) {
  return std::holds_alternative<AppendKv>(op) || std::holds_alternative<LayerStep>(op);
}

}  // namespace

ServiceLoop::ServiceLoop(const Control& control, Backend& backend, Communicator& comm, const Config& config,
                         StepOptions step_options)
    : control_(control),
      config_(config),
      store_(backend, config, control.rank(), control.world()),
      loads_(store_, config),
      snapshots_(control, backend, store_, config),
      runner_(backend, comm, config, store_, step_options) {}

Status ServiceLoop::submit(const Operation& op, OperationResult* result) {
  if (control_.rank() != 0) return internal_error("ServiceLoop::submit called on rank " + std::to_string(control_.rank()));
  // Alone, rank 0 applies the operation from the request's own buffers: nothing to encode.
  if (control_.world() > 1) {
    const std::shared_ptr<std::string> body = trailing_body(op);
    if (has_trailing_body(op) && !body) return internal_error(std::string(operation_name(op)) + ": no body");
    std::string bytes = encode_operation(op);
    REATTN_RETURN_IF_ERROR(control_.broadcast(bytes, 0));
    // The body follows as its own broadcast, sent from the request's buffer.
    if (body) REATTN_RETURN_IF_ERROR(control_.broadcast(*body, 0));
  }
  return apply(op, result);
}

Status ServiceLoop::serve() {
  for (;;) {
    std::string bytes;
    REATTN_RETURN_IF_ERROR(control_.next_operation(bytes));
    Expected<Operation> op = decode_operation(bytes);
    // Rank 0 sent the same bytes to everyone; a message that does not decode is a bug.
    if (!op) return Status(ErrorCode::kFatal, op.status().message());
    if (has_trailing_body(*op)) REATTN_RETURN_IF_ERROR(control_.broadcast(*trailing_body(*op), 0));
    if (std::holds_alternative<Shutdown>(*op)) return Status::ok();
    OperationResult result;
    REATTN_RETURN_IF_ERROR(apply(*op, &result));
  }
}

Status ServiceLoop::apply(const Operation& op, OperationResult* result) {
  *result = OperationResult{};
  return std::visit(
      [&](const auto& o) -> Status {
        using T = std::decay_t<decltype(o)>;
        if constexpr (std::is_same_v<T, CreateContext>) return apply_create(o, result);
        if constexpr (std::is_same_v<T, EraseContext>) return apply_erase(o, result);
        if constexpr (std::is_same_v<T, AppendKv>) return apply_append_kv(o, result);
        if constexpr (std::is_same_v<T, AppendSynthetic>) return apply_synthetic(o, result);
        if constexpr (std::is_same_v<T, StepPlan>) return apply_step(o, result);
        if constexpr (std::is_same_v<T, Shutdown>) return Status::ok();
        if constexpr (std::is_same_v<T, LayerStep>) return apply_layer_step(o, result);
        if constexpr (std::is_same_v<T, LoadKv>) return apply_load(o, result);
        if constexpr (std::is_same_v<T, SnapshotContext>) return snapshots_.apply(o, result);
        if constexpr (std::is_same_v<T, RestoreContext>) return snapshots_.apply(o, result);
      },
      op);
}

Status ServiceLoop::apply_create(const CreateContext& op, OperationResult* result) {
  const bool existed = store_.find(op.context_id) != nullptr;
  const Status agreed = control_.agree(store_.create(op.context_id, op.owner_rank));
  if (is_fault(agreed)) return agreed;
  if (!agreed.is_ok() && !existed && store_.find(op.context_id)) {
    // Made on some ranks only (an allocation failed elsewhere): undo it where it was made.
    (void)store_.erase(op.context_id);
  }
  result->status = agreed;
  return Status::ok();
}

Status ServiceLoop::apply_erase(const EraseContext& op, OperationResult* result) {
  const Status agreed = control_.agree(store_.erase(op.context_id));
  if (is_fault(agreed)) return agreed;
  result->status = agreed;
  return Status::ok();
}

Status ServiceLoop::apply_append_kv(const AppendKv& op, OperationResult* result) {
  // Every rank reads the same bytes (shared, not copied); each then writes only the blocks it
  // holds. Rank 0 checked the values when the request arrived: here only the header and shapes.
  Expected<SafetensorsFile> file = SafetensorsFile::parse_shared(op.body, "kv body");
  if (!file) return apply_append(op.context_id, nullptr, file.status(), result);
  Expected<SafetensorsKvSource> source = SafetensorsKvSource::make(std::move(*file), config_.model);
  Status ready = source.status();
  if (source && source->tokens() != op.tokens) {
    ready = internal_error("append_kv: the body holds " + std::to_string(source->tokens()) + " tokens, the plan " +
                           std::to_string(op.tokens));
  }
  return apply_append(op.context_id, ready.is_ok() ? &*source : nullptr, ready, result);
}

Status ServiceLoop::apply_synthetic(const AppendSynthetic& op, OperationResult* result) {
  const ContextShard* ctx = store_.find(op.context_id);
  const int64_t first = ctx ? ctx->tokens : 0;
  Status check = Status::ok();
  if (!ctx) {
    check = not_found("context " + std::to_string(op.context_id) + " not found");
  } else if (op.tokens < 1) {
    check = invalid_argument("tokens: must be >= 1, got " + std::to_string(op.tokens));
  } else {
    for (size_t i = 0; i < op.needles.size() && check.is_ok(); ++i) {
      if (op.needles[i] < first || op.needles[i] >= first + op.tokens) {
        check = invalid_argument("needles[" + std::to_string(i) + "]: token " + std::to_string(op.needles[i]) +
                                 " is outside this append's tokens [" + std::to_string(first) + ", " +
                                 std::to_string(first + op.tokens) + ")");
      }
    }
  }
  SyntheticKvSource source(SyntheticSpec{op.seed, op.needles}, config_.model, first, check.is_ok() ? op.tokens : 0);
  return apply_append(op.context_id, check.is_ok() ? &source : nullptr, check, result);
}

Status ServiceLoop::apply_append(ContextId id, const KvSource* source, const Status& source_status,
                                 OperationResult* result, int only_layer) {
  // Phase 1: every rank has a valid source (the same bytes or spec, so normally all or none).
  const Status ready = control_.agree(source_status);
  if (is_fault(ready)) return ready;
  if (!ready.is_ok()) {
    result->status = ready;
    return Status::ok();
  }
  const ContextShard* ctx = store_.find(id);
  const std::vector<int64_t> before = ctx ? ctx->layer_tokens : std::vector<int64_t>{};
  // Phase 2: the append. Its capacity check is the same computation on every rank.
  const Status appended = control_.agree(store_.append(id, *source, only_layer));
  if (is_fault(appended)) return appended;
  if (appended.is_ok()) {
    ctx = store_.find(id);
    result->tokens = only_layer < 0 ? ctx->tokens : ctx->layer_tokens[only_layer];
    return Status::ok();
  }
  // Phase 3: if the append went through on some ranks only, the context's ranks disagree on
  // its length; it cannot be rolled back, so it is erased everywhere.
  ctx = store_.find(id);
  const bool unchanged = ctx == nullptr || ctx->layer_tokens == before;
  const Status consistent =
      control_.agree(unchanged ? Status::ok() : internal_error("append applied on rank " + std::to_string(control_.rank())));
  if (is_fault(consistent)) return consistent;
  result->status = appended;
  if (!consistent.is_ok()) {
    if (ctx) (void)store_.erase(id);
    result->context_dropped = true;
    result->status = internal_error(appended.message() + "; the append had gone through on some ranks, so context " +
                                    std::to_string(id) + " was dropped");
  }
  return Status::ok();
}

Status ServiceLoop::apply_layer_step(const LayerStep& op, OperationResult* result) {
  const ModelConfig& m = config_.model;
  const ContextShard* ctx = store_.find(op.context_id);
  Status check = Status::ok();
  if (!ctx) {
    check = not_found("context " + std::to_string(op.context_id) + " not found");
  } else if (op.layer < 0 || op.layer >= m.layers || !ctx->resident[op.layer]) {
    check = invalid_argument("layer " + std::to_string(op.layer) + " is not held");
  } else if (ctx->layer_tokens[op.layer] != op.layer_tokens) {
    check = internal_error("layer " + std::to_string(op.layer) + " of context " + std::to_string(op.context_id) +
                           " differs between ranks");
  } else if (op.qlen < 1 || !op.tensors.fit(static_cast<uint64_t>(op.qlen) * m.q_heads * m.head_dim,
                                             static_cast<uint64_t>(op.qlen) * m.kv_heads * m.head_dim)) {
    check = internal_error("layer step: q, k, v of qlen " + std::to_string(op.qlen) + " do not fit the body");
  }
  const LayerStepKvSource source(op, m.head_dim);
  const auto t_append = std::chrono::steady_clock::now();
  REATTN_RETURN_IF_ERROR(apply_append(op.context_id, check.is_ok() ? &source : nullptr, check, result, op.layer));
  const double append_ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t_append).count();
  if (!result->status.is_ok()) return Status::ok();
  // The tail query over the layer as it now is: its rows are the tokens just appended.
  StepPlan plan;
  plan.strategy = config_.reattention.final_attention;
  plan.reply_rank = 0;
  QueryPlan query;
  query.context_id = op.context_id;
  query.tokens = result->tokens;
  query.qlen = op.qlen;
  query.layer = op.layer;
  query.mode = QueryMode::kTail;
  query.owner_rank = store_.find(op.context_id)->owner_rank;
  append_query(plan, query, op.tensors.q_dtype, op.tensors.at(op.tensors.q_offset),
               static_cast<size_t>(op.qlen) * m.q_heads * m.head_dim);
  const int64_t tokens = result->tokens;
  REATTN_RETURN_IF_ERROR(apply_step(plan, result));
  result->tokens = tokens;
  result->timing.append_ms = append_ms;
  if (control_.rank() == plan.reply_rank && !result->queries.empty()) result->status = result->queries[0].status;
  return Status::ok();
}

Status ServiceLoop::apply_load(const LoadKv& op, OperationResult* result) {
  Status local = Status::ok();
  const auto started = std::chrono::steady_clock::now();
  double read_ms = 0;
  switch (op.phase) {
    case LoadPhase::kBegin: local = loads_.begin(op); break;
    case LoadPhase::kSlice: local = loads_.slice(op, &read_ms); break;
    case LoadPhase::kCommit: loads_.commit(op.context_id); break;
    case LoadPhase::kAbort: local = loads_.abort(op.context_id); break;
  }
  const auto done = std::chrono::steady_clock::now();
  const Status agreed = control_.agree(local);
  result->timing.local_ms = std::chrono::duration<double, std::milli>(done - started).count();
  result->timing.wait_ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - done).count();
  result->timing.read_ms = read_ms;
  if (is_fault(agreed)) return agreed;
  // A begin that failed somewhere is undone where it went through (it changed nothing there).
  if (op.phase == LoadPhase::kBegin && !agreed.is_ok()) (void)loads_.abort(op.context_id);
  result->status = agreed;
  if (const ContextShard* ctx = store_.find(op.context_id)) result->tokens = ctx->tokens;
  return Status::ok();
}

Status ServiceLoop::apply_step(const StepPlan& plan, OperationResult* result) {
  const Status step = runner_.run(plan, &result->queries, &result->timing);
  if (!step.is_ok()) return Status(ErrorCode::kFatal, "query step failed: " + step.to_string());
  return Status::ok();
}

}  // namespace reattn
