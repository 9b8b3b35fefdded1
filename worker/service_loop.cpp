#include "worker/service_loop.h"

#include <cstring>
#include <memory>
#include <string>
#include <utility>

#include "common/safetensors.h"
#include "common/synthetic.h"

namespace reattn {
namespace {

constexpr uint32_t kOperationMagic = 0x52414f31;  // "RAO1"

template <typename T>
void put(std::string& out, const T& value) {
  out.append(reinterpret_cast<const char*>(&value), sizeof(T));
}

// Reads plain values from a byte string, failing once past the end.
class Reader {
 public:
  explicit Reader(const std::string& bytes) : bytes_(bytes) {}
  template <typename T>
  bool get(T* value) {
    if (bytes_.size() - pos_ < sizeof(T)) return false;
    std::memcpy(value, bytes_.data() + pos_, sizeof(T));
    pos_ += sizeof(T);
    return true;
  }
  bool get_bytes(size_t count, std::string* out) {
    if (bytes_.size() - pos_ < count) return false;
    out->assign(bytes_.data() + pos_, count);
    pos_ += count;
    return true;
  }
  bool done() const { return pos_ == bytes_.size(); }

 private:
  const std::string& bytes_;
  size_t pos_ = 0;
};

// Faults end the job; anything else is the operation's own outcome.
bool is_fault(const Status& s) { return s.code() == ErrorCode::kDevice; }

}  // namespace

const char* operation_kind_name(OperationKind kind) {
  switch (kind) {
    case OperationKind::kCreate: return "create";
    case OperationKind::kErase: return "erase";
    case OperationKind::kAppendKv: return "append_kv";
    case OperationKind::kSynthetic: return "synthetic";
    case OperationKind::kQueryBatch: return "query_batch";
    case OperationKind::kShutdown: return "shutdown";
  }
  return "?";
}

std::string encode_operation(const Operation& op) {
  std::string out;
  out.reserve(64 + op.needles.size() * 8 + op.payload.size());
  put(out, kOperationMagic);
  put(out, static_cast<int32_t>(op.kind));
  put(out, op.context_id);
  put(out, op.owner_rank);
  put(out, op.tokens);
  put(out, op.seed);
  put(out, static_cast<uint64_t>(op.needles.size()));
  out.append(reinterpret_cast<const char*>(op.needles.data()), op.needles.size() * sizeof(int64_t));
  put(out, static_cast<uint64_t>(op.payload.size()));
  out.append(op.payload);
  return out;
}

Expected<Operation> decode_operation(const std::string& bytes) {
  Reader in(bytes);
  Operation op;
  uint32_t magic = 0;
  int32_t kind = 0;
  uint64_t needles = 0, payload = 0;
  const auto malformed = [] { return internal_error("operation: malformed message"); };
  if (!in.get(&magic) || magic != kOperationMagic || !in.get(&kind) || !in.get(&op.context_id) ||
      !in.get(&op.owner_rank) || !in.get(&op.tokens) || !in.get(&op.seed) || !in.get(&needles)) {
    return malformed();
  }
  if (kind < static_cast<int32_t>(OperationKind::kCreate) || kind > static_cast<int32_t>(OperationKind::kShutdown)) {
    return malformed();
  }
  op.kind = static_cast<OperationKind>(kind);
  if (needles > bytes.size() / sizeof(int64_t)) return malformed();
  op.needles.resize(needles);
  for (auto& n : op.needles) {
    if (!in.get(&n)) return malformed();
  }
  if (!in.get(&payload) || !in.get_bytes(payload, &op.payload) || !in.done()) return malformed();
  return op;
}

ServiceLoop::ServiceLoop(const Control& control, Backend& backend, Communicator& comm, const Config& config)
    : control_(control),
      config_(config),
      store_(backend, config, control.rank(), control.world()),
      runner_(backend, comm, config, store_) {}

Status ServiceLoop::submit(const Operation& op, OperationResult* result) {
  if (control_.rank() != 0) return internal_error("ServiceLoop::submit called on rank " + std::to_string(control_.rank()));
  std::string bytes = encode_operation(op);
  REATTN_RETURN_IF_ERROR(control_.broadcast(bytes, 0));
  return apply(op, result);
}

Status ServiceLoop::serve() {
  for (;;) {
    std::string bytes;
    REATTN_RETURN_IF_ERROR(control_.next_operation(bytes));
    Expected<Operation> op = decode_operation(bytes);
    // Rank 0 sent the same bytes to everyone; a message that does not decode is a bug.
    if (!op) return Status(ErrorCode::kDevice, op.status().message());
    if (op->kind == OperationKind::kShutdown) return Status::ok();
    OperationResult result;
    REATTN_RETURN_IF_ERROR(apply(*op, &result));
  }
}

Status ServiceLoop::apply(const Operation& op, OperationResult* result) {
  *result = OperationResult{};
  switch (op.kind) {
    case OperationKind::kShutdown:
      return Status::ok();
    case OperationKind::kCreate:
      return apply_create(op, result);
    case OperationKind::kErase: {
      const Status agreed = control_.agree(store_.erase(op.context_id));
      if (is_fault(agreed)) return agreed;
      result->status = agreed;
      return Status::ok();
    }
    case OperationKind::kAppendKv: {
      // Every rank parses the same bytes; each then writes only the blocks it holds.
      Expected<SafetensorsFile> file = SafetensorsFile::parse(op.payload, "kv body");
      if (!file) return apply_append(op, nullptr, file.status(), result);
      Expected<SafetensorsKvSource> source = SafetensorsKvSource::make(*file, config_.model, config_.max_stored_value());
      return apply_append(op, source ? &*source : nullptr, source.status(), result);
    }
    case OperationKind::kSynthetic: {
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
      return apply_append(op, check.is_ok() ? &source : nullptr, check, result);
    }
    case OperationKind::kQueryBatch:
      return apply_query_batch(op, result);
  }
  return internal_error("operation: unknown kind");
}

Status ServiceLoop::apply_create(const Operation& op, OperationResult* result) {
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

Status ServiceLoop::apply_append(const Operation& op, const KvSource* source, const Status& source_status,
                                 OperationResult* result) {
  // Phase 1: every rank has a valid source (the same bytes or spec, so normally all or none).
  const Status ready = control_.agree(source_status);
  if (is_fault(ready)) return ready;
  if (!ready.is_ok()) {
    result->status = ready;
    return Status::ok();
  }
  const ContextShard* ctx = store_.find(op.context_id);
  const int64_t before = ctx ? ctx->tokens : -1;
  // Phase 2: the append. Its capacity check is the same computation on every rank.
  const Status appended = control_.agree(store_.append(op.context_id, *source));
  if (is_fault(appended)) return appended;
  if (appended.is_ok()) {
    result->tokens = store_.find(op.context_id)->tokens;
    return Status::ok();
  }
  // Phase 3: if the append went through on some ranks only, the context's ranks disagree on
  // its length; it cannot be rolled back, so it is erased everywhere.
  ctx = store_.find(op.context_id);
  const bool unchanged = ctx == nullptr || ctx->tokens == before;
  const Status consistent =
      control_.agree(unchanged ? Status::ok() : internal_error("append applied on rank " + std::to_string(control_.rank())));
  if (is_fault(consistent)) return consistent;
  result->status = appended;
  if (!consistent.is_ok()) {
    if (ctx) (void)store_.erase(op.context_id);
    result->context_dropped = true;
    result->status = internal_error(appended.message() + "; the append had gone through on some ranks, so context " +
                                    std::to_string(op.context_id) + " was dropped");
  }
  return Status::ok();
}

Status ServiceLoop::apply_query_batch(const Operation& op, OperationResult* result) {
  Expected<StepPlan> plan = decode_step(op.payload);
  // The plan is the same bytes on every rank, so this fails on all or none.
  if (!plan) return Status(ErrorCode::kDevice, plan.status().message());
  const Status step = runner_.run(*plan, &result->queries, &result->timing);
  if (!step.is_ok()) return Status(ErrorCode::kDevice, "query step failed: " + step.to_string());
  return Status::ok();
}

}  // namespace reattn
