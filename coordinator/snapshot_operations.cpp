#include "coordinator/snapshot_operations.h"

#include <algorithm>

#include "common/dtype.h"

namespace reattn {
namespace {

// Bytes the files hold for one layer (blocks and sinks, k and v, every file).
int64_t layer_bytes(const SnapshotManifest& m, int layer) {
  const int64_t row = static_cast<int64_t>(m.head_dim) * static_cast<int64_t>(dtype_size(m.dtype));
  int64_t bytes = 0;
  for (const SnapshotFile& f : m.files) {
    bytes += 2 * f.layer_blocks[layer] * m.kv_heads * m.chunk_tokens * row;
    if (f.sinks) bytes += 2 * m.kv_heads * m.sink_tokens * row;
  }
  return bytes;
}

int64_t longest(const std::vector<int64_t>& layer_tokens) {
  return layer_tokens.empty() ? 0 : *std::max_element(layer_tokens.begin(), layer_tokens.end());
}

}  // namespace

// ---- snapshot ----

SnapshotOperation::SnapshotOperation(SnapshotCatalog& catalog, ContextId context_id, std::string name, std::string tmp,
                                     std::string created, int layers, int layers_per_slice)
    : catalog_(catalog),
      context_id_(context_id),
      name_(std::move(name)),
      tmp_(std::move(tmp)),
      created_(std::move(created)),
      layers_(layers),
      layers_per_slice_(std::max(1, layers_per_slice)) {}

SnapshotOperation::~SnapshotOperation() { catalog_.release(name_); }

SnapshotContext SnapshotOperation::slice(SnapshotPhase phase) const {
  SnapshotContext s;
  s.context_id = context_id_;
  s.phase = phase;
  s.name = name_;
  s.tmp = tmp_;
  s.created = created_;
  return s;
}

Status SnapshotOperation::start(Registry& registry) {
  const std::optional<ContextInfo> ctx = registry.find(context_id_);
  if (!ctx) return not_found("context " + std::to_string(context_id_) + " not found");
  progress_.tokens_total = ctx->charged_tokens();
  return Status::ok();
}

std::optional<Operation> SnapshotOperation::next_slice() {
  if (next_layer_ < layers_) {
    SnapshotContext s = slice(SnapshotPhase::kWrite);
    s.first_layer = next_layer_;
    s.end_layer = std::min(layers_, next_layer_ + layers_per_slice_);
    return s;
  }
  if (!published_) return slice(SnapshotPhase::kPublish);
  return std::nullopt;
}

Status SnapshotOperation::on_slice_done(const Operation& op, const OperationResult& result, Registry&) {
  const auto& s = std::get<SnapshotContext>(op);
  if (!result.status.is_ok()) return result.status;
  if (s.phase == SnapshotPhase::kWrite) {
    next_layer_ = s.end_layer;
    progress_.bytes_done += result.bytes;
    progress_.tokens_done = progress_.tokens_total * next_layer_ / std::max(1, layers_);
  } else if (s.phase == SnapshotPhase::kPublish) {
    published_ = true;
    manifest_ = result.manifest;
  }
  return Status::ok();
}

std::vector<Operation> SnapshotOperation::rollback() {
  std::vector<Operation> undo;
  if (!published_) undo.emplace_back(slice(SnapshotPhase::kAbort));
  return undo;
}

// ---- restore ----

RestoreOperation::RestoreOperation(SnapshotCatalog& catalog, StoredSnapshot stored, ContextId context_id)
    : catalog_(catalog), stored_(std::move(stored)), context_id_(context_id) {
  progress_.tokens_total = longest(stored_.manifest.layer_tokens);
}

RestoreOperation::~RestoreOperation() { catalog_.release(stored_.manifest.name); }

RestoreContext RestoreOperation::slice(RestorePhase phase) const {
  RestoreContext s;
  s.context_id = context_id_;
  s.phase = phase;
  s.owner_rank = owner_rank_;
  s.name = stored_.manifest.name;
  return s;
}

Status RestoreOperation::start(Registry& registry) {
  REATTN_ASSIGN_OR_RETURN(const ContextInfo planned, registry.plan_create(context_id_));
  owner_rank_ = planned.owner_rank;
  // In the registry from now on (empty, busy with this operation), so that a create or
  // another restore planned before this one's first slice counts it (max_contexts, owners).
  registry.insert(ContextInfo{context_id_, owner_rank_, 0});
  return Status::ok();
}

std::optional<Operation> RestoreOperation::next_slice() {
  if (!opened_) {
    RestoreContext s = slice(RestorePhase::kOpen);
    s.manifest = stored_.text;
    return s;
  }
  if (next_layer_ < stored_.manifest.layers) {
    RestoreContext s = slice(RestorePhase::kLayer);
    s.layer = next_layer_;
    return s;
  }
  if (!closed_) return slice(RestorePhase::kClose);
  return std::nullopt;
}

Status RestoreOperation::on_slice_done(const Operation& op, const OperationResult& result, Registry& registry) {
  const auto& s = std::get<RestoreContext>(op);
  if (!result.status.is_ok()) return result.status;
  switch (s.phase) {
    case RestorePhase::kOpen:
      opened_ = true;
      for (size_t layer = 0; layer < result.layer_tokens.size(); ++layer) {
        registry.set_layer_tokens(context_id_, static_cast<int>(layer), result.layer_tokens[layer]);
      }
      break;
    case RestorePhase::kLayer:
      next_layer_ = s.layer + 1;
      registry.set_layer_tokens(context_id_, s.layer, result.layer_tokens[s.layer]);
      progress_.bytes_done += layer_bytes(stored_.manifest, s.layer);
      progress_.tokens_done = progress_.tokens_total * next_layer_ / std::max(1, stored_.manifest.layers);
      break;
    case RestorePhase::kClose:
      closed_ = true;
      break;
  }
  return Status::ok();
}

std::vector<Operation> RestoreOperation::rollback() {
  // The files let go first: an erase that fails is answered by the step loop with another.
  std::vector<Operation> undo;
  undo.emplace_back(slice(RestorePhase::kClose));
  if (opened_) undo.emplace_back(EraseContext{context_id_});
  return undo;
}

void RestoreOperation::on_rolled_back(Registry& registry) { registry.erase(context_id_); }

Status run_operation_now(LongOperation& op, OperationRunner& ranks, Registry& registry, Status* outcome,
                         const std::function<void(const OperationProgress&)>& after_slice,
                         const std::function<bool()>& stop) {
  // As the step loop: an operation that cannot start ran nothing and has nothing to undo.
  *outcome = op.start(registry);
  if (!outcome->is_ok()) return Status::ok();
  while (outcome->is_ok()) {
    const std::optional<Operation> slice = op.next_slice();
    if (!slice) return Status::ok();
    if (stop && stop()) {
      *outcome = Status(ErrorCode::kUnavailable, "the service is shutting down");
      break;
    }
    OperationResult result;
    REATTN_RETURN_IF_ERROR(ranks.submit(*slice, &result));
    *outcome = op.on_slice_done(*slice, result, registry);
    if (after_slice) after_slice(op.progress());
  }
  for (const Operation& undo : op.rollback()) {
    OperationResult result;
    REATTN_RETURN_IF_ERROR(ranks.submit(undo, &result));
  }
  op.on_rolled_back(registry);
  return Status::ok();
}

}  // namespace reattn
