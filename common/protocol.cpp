#include "common/protocol.h"

#include <cstring>
#include <type_traits>

namespace reattn {
namespace {

constexpr uint32_t kMagic = 0x52414f32;  // "RAO2"

class Writer {
 public:
  template <typename T>
  void put(const T& value) {
    static_assert(std::is_trivially_copyable<T>::value, "plain values only");
    out_.append(reinterpret_cast<const char*>(&value), sizeof(T));
  }
  template <typename T>
  void put_vector(const std::vector<T>& values) {
    put(static_cast<uint64_t>(values.size()));
    out_.append(reinterpret_cast<const char*>(values.data()), values.size() * sizeof(T));
  }
  void put_bytes(const std::string& bytes) {
    put(static_cast<uint64_t>(bytes.size()));
    out_.append(bytes);
  }
  std::string take() { return std::move(out_); }

 private:
  std::string out_;
};

// Reads plain values, failing (and staying failed) once past the end.
class Reader {
 public:
  explicit Reader(const std::string& bytes) : bytes_(bytes) {}
  template <typename T>
  bool get(T* value) {
    if (!ok_ || bytes_.size() - pos_ < sizeof(T)) return ok_ = false;
    std::memcpy(value, bytes_.data() + pos_, sizeof(T));
    pos_ += sizeof(T);
    return true;
  }
  template <typename T>
  bool get_vector(std::vector<T>* values) {
    uint64_t count = 0;
    if (!get(&count) || count > (bytes_.size() - pos_) / sizeof(T)) return ok_ = false;
    values->resize(count);
    std::memcpy(values->data(), bytes_.data() + pos_, count * sizeof(T));
    pos_ += count * sizeof(T);
    return true;
  }
  bool get_bytes(std::string* bytes) {
    uint64_t count = 0;
    if (!get(&count) || count > bytes_.size() - pos_) return ok_ = false;
    bytes->assign(bytes_.data() + pos_, count);
    pos_ += count;
    return true;
  }
  // An enum stored as int32, accepted only in [lo, hi].
  template <typename E>
  bool get_enum(E* value, E lo, E hi) {
    int32_t raw = 0;
    if (!get(&raw) || raw < static_cast<int32_t>(lo) || raw > static_cast<int32_t>(hi)) return ok_ = false;
    *value = static_cast<E>(raw);
    return true;
  }
  bool ok() const { return ok_; }
  bool done() const { return ok_ && pos_ == bytes_.size(); }

 private:
  const std::string& bytes_;
  size_t pos_ = 0;
  bool ok_ = true;
};

template <typename... Ts>
struct Overloaded : Ts... {
  using Ts::operator()...;
};
template <typename... Ts>
Overloaded(Ts...) -> Overloaded<Ts...>;

void write_step(Writer& w, const StepPlan& plan) {
  w.put(static_cast<int32_t>(plan.strategy));
  w.put(plan.reply_rank);
  w.put(static_cast<uint64_t>(plan.queries.size()));
  for (const QueryPlan& q : plan.queries) {
    w.put(q.context_id);
    w.put(q.tokens);
    w.put(q.qlen);
    w.put(q.q_offset);
    w.put(q.layer);
    w.put(static_cast<int32_t>(q.mode));
    w.put(q.owner_rank);
  }
  w.put_vector(plan.q);
}

bool read_step(Reader& r, StepPlan* plan) {
  uint64_t count = 0;
  if (!r.get_enum(&plan->strategy, FinalAttention::kGather, FinalAttention::kPartial) || !r.get(&plan->reply_rank) ||
      !r.get(&count)) {
    return false;
  }
  constexpr size_t kQueryBytes = 4 * 8 + 3 * 4;
  // A count the remaining bytes cannot hold is refused before anything is allocated.
  if (count > (1u << 30) / kQueryBytes) return false;
  plan->queries.resize(count);
  for (QueryPlan& q : plan->queries) {
    if (!r.get(&q.context_id) || !r.get(&q.tokens) || !r.get(&q.qlen) || !r.get(&q.q_offset) || !r.get(&q.layer) ||
        !r.get_enum(&q.mode, QueryMode::kTail, QueryMode::kDetached) || !r.get(&q.owner_rank)) {
      return false;
    }
  }
  return r.get_vector(&plan->q);
}

}  // namespace

void append_query(StepPlan& plan, QueryPlan query, const float* q, size_t q_floats) {
  query.q_offset = static_cast<int64_t>(plan.q.size());
  plan.q.insert(plan.q.end(), q, q + q_floats);
  plan.queries.push_back(query);
}

void append_query(StepPlan& plan, QueryPlan query, DType dtype, const void* q, size_t q_values) {
  query.q_offset = static_cast<int64_t>(plan.q.size());
  plan.q.resize(plan.q.size() + q_values);
  convert_to_f32(dtype, q, q_values, plan.q.data() + query.q_offset);
  plan.queries.push_back(query);
}

bool StepTensors::fit(uint64_t q_values, uint64_t kv_values) const {
  if (!body) return false;
  const auto inside = [&](uint64_t offset, uint64_t bytes) {
    return offset <= body->size() && bytes <= body->size() - offset;
  };
  const uint64_t kv_bytes = kv_values * dtype_size(kv_dtype);
  return inside(q_offset, q_values * dtype_size(q_dtype)) && inside(k_offset, kv_bytes) && inside(v_offset, kv_bytes);
}

const char* operation_name(const Operation& op) {
  static const char* const kNames[] = {"create",     "erase",    "append_kv", "synthetic", "query_step",
                                       "shutdown",   "layer_step", "load_kv", "snapshot", "restore"};
  static_assert(std::variant_size<Operation>::value == 10, "a name per operation");
  return kNames[op.index()];
}

ContextId operation_context(const Operation& op) {
  return std::visit(Overloaded{[](const CreateContext& o) { return o.context_id; },
                               [](const EraseContext& o) { return o.context_id; },
                               [](const AppendKv& o) { return o.context_id; },
                               [](const AppendSynthetic& o) { return o.context_id; },
                               [](const StepPlan&) { return ContextId{0}; },
                               [](const Shutdown&) { return ContextId{0}; },
                               [](const LayerStep& o) { return o.context_id; },
                               [](const LoadKv& o) { return o.context_id; },
                               [](const SnapshotContext& o) { return o.context_id; },
                               [](const RestoreContext& o) { return o.context_id; }},
                    op);
}

std::string encode_operation(const Operation& op) {
  Writer w;
  w.put(kMagic);
  w.put(static_cast<int32_t>(op.index()));
  std::visit(Overloaded{[&](const CreateContext& o) {
                          w.put(o.context_id);
                          w.put(o.owner_rank);
                        },
                        [&](const EraseContext& o) { w.put(o.context_id); },
                        [&](const AppendKv& o) {
                          w.put(o.context_id);
                          w.put(o.tokens);
                        },
                        [&](const AppendSynthetic& o) {
                          w.put(o.context_id);
                          w.put(o.tokens);
                          w.put(o.seed);
                          w.put_vector(o.needles);
                        },
                        [&](const StepPlan& plan) { write_step(w, plan); },
                        [&](const Shutdown&) {},
                        [&](const LayerStep& o) {
                          w.put(o.context_id);
                          w.put(o.layer);
                          w.put(o.layer_tokens);
                          w.put(o.qlen);
                          w.put(static_cast<int32_t>(o.tensors.q_dtype));
                          w.put(static_cast<int32_t>(o.tensors.kv_dtype));
                          w.put(o.tensors.q_offset);
                          w.put(o.tensors.k_offset);
                          w.put(o.tensors.v_offset);
                        },
                        [&](const LoadKv& o) {
                          w.put(o.context_id);
                          w.put(static_cast<int32_t>(o.phase));
                          w.put_bytes(o.path);
                          w.put(o.file_tokens);
                          w.put(o.context_tokens);
                          w.put(o.offset);
                          w.put(o.count);
                        },
                        [&](const SnapshotContext& o) {
                          w.put(o.context_id);
                          w.put(static_cast<int32_t>(o.phase));
                          w.put_bytes(o.name);
                          w.put_bytes(o.tmp);
                          w.put_bytes(o.created);
                          w.put(o.first_layer);
                          w.put(o.end_layer);
                        },
                        [&](const RestoreContext& o) {
                          w.put(o.context_id);
                          w.put(static_cast<int32_t>(o.phase));
                          w.put(o.owner_rank);
                          w.put_bytes(o.name);
                          w.put_bytes(o.manifest);
                          w.put(o.layer);
                        }},
             op);
  return w.take();
}

Expected<Operation> decode_operation(const std::string& bytes) {
  Reader r(bytes);
  uint32_t magic = 0;
  int32_t index = -1;
  const auto malformed = [] { return internal_error("operation: malformed message"); };
  if (!r.get(&magic) || magic != kMagic || !r.get(&index)) return malformed();
  Operation op;
  switch (index) {
    case 0: {
      CreateContext o;
      r.get(&o.context_id) && r.get(&o.owner_rank);
      op = o;
      break;
    }
    case 1: {
      EraseContext o;
      r.get(&o.context_id);
      op = o;
      break;
    }
    case 2: {
      AppendKv o;
      r.get(&o.context_id) && r.get(&o.tokens);
      o.body = std::make_shared<std::string>();  // filled by the next broadcast
      op = std::move(o);
      break;
    }
    case 3: {
      AppendSynthetic o;
      r.get(&o.context_id) && r.get(&o.tokens) && r.get(&o.seed) && r.get_vector(&o.needles);
      op = std::move(o);
      break;
    }
    case 4: {
      StepPlan plan;
      read_step(r, &plan);
      op = std::move(plan);
      break;
    }
    case 5:
      op = Shutdown{};
      break;
    case 6: {
      LayerStep o;
      r.get(&o.context_id) && r.get(&o.layer) && r.get(&o.layer_tokens) && r.get(&o.qlen) &&
          r.get_enum(&o.tensors.q_dtype, DType::kF32, DType::kBF16) &&
          r.get_enum(&o.tensors.kv_dtype, DType::kF32, DType::kBF16) && r.get(&o.tensors.q_offset) &&
          r.get(&o.tensors.k_offset) && r.get(&o.tensors.v_offset);
      o.tensors.body = std::make_shared<std::string>();  // filled by the next broadcast
      op = std::move(o);
      break;
    }
    case 7: {
      LoadKv o;
      r.get(&o.context_id) && r.get_enum(&o.phase, LoadPhase::kBegin, LoadPhase::kAbort) && r.get_bytes(&o.path) &&
          r.get(&o.file_tokens) && r.get(&o.context_tokens) && r.get(&o.offset) && r.get(&o.count);
      op = std::move(o);
      break;
    }
    case 8: {
      SnapshotContext o;
      r.get(&o.context_id) && r.get_enum(&o.phase, SnapshotPhase::kWrite, SnapshotPhase::kAbort) &&
          r.get_bytes(&o.name) && r.get_bytes(&o.tmp) && r.get_bytes(&o.created) && r.get(&o.first_layer) &&
          r.get(&o.end_layer);
      op = std::move(o);
      break;
    }
    case 9: {
      RestoreContext o;
      r.get(&o.context_id) && r.get_enum(&o.phase, RestorePhase::kOpen, RestorePhase::kClose) &&
          r.get(&o.owner_rank) && r.get_bytes(&o.name) && r.get_bytes(&o.manifest) && r.get(&o.layer);
      op = std::move(o);
      break;
    }
    default:
      return malformed();
  }
  if (!r.done()) return malformed();
  return op;
}

}  // namespace reattn
