// The snapshot routes of Handlers (handlers.h): snapshot a context, restore one into a new
// context (POST /v1/contexts {"from_snapshot": NAME}), list and delete snapshots. A snapshot
// and a restore are long-running operations (202 and an operation id; GET /v1/operations/{op}
// reports progress, DELETE cancels): the step loop runs their slices on the ranks between
// query steps (coordinator/snapshot_operations.h). The catalog answers listing and deletion,
// and holds a snapshot's name while an operation uses it.
#include <ctime>

#include "coordinator/handlers.h"
#include "coordinator/requests.h"
#include "coordinator/responses.h"
#include "coordinator/snapshot_operations.h"

namespace reattn {
namespace {

using nlohmann::json;

std::string utc_now() {
  const std::time_t now = std::time(nullptr);
  std::tm tm{};
  gmtime_r(&now, &tm);
  char text[32];
  std::strftime(text, sizeof(text), "%Y-%m-%dT%H:%M:%SZ", &tm);
  return text;
}

json snapshot_json(const SnapshotManifest& m) {
  return {{"name", m.name},
          {"context_id", m.context_id},
          {"tokens", m.tokens()},
          {"layer_tokens", m.layer_tokens},
          {"layers", m.layers},
          {"bytes", m.total_bytes()},
          {"ranks", m.world},
          {"dtype", dtype_name(m.dtype)},
          {"created", m.created}};
}

// Queues a long-running operation and answers 202 with its record (Location:
// /v1/operations/<id>), or 503 when the queue is full (the record then failed).
HttpResponse start_operation(Registry& registry, TaskQueue& queue, const HttpRequest& req, OperationKind kind,
                             ContextId context_id, int64_t tokens_total, std::shared_ptr<LongOperation> op,
                             json extra) {
  const std::string id = registry.operations().create(kind, context_id, tokens_total);
  Task task;
  task.request_id = req.request_id;
  task.long_operation = std::move(op);
  task.operation_id = id;
  Expected<uint64_t> pushed = queue.push(std::move(task));
  if (!pushed) {
    registry.operations().finish(id, OperationState::kFailed, pushed.status().message());
    return status_response(pushed.status());
  }
  json body = operation_json(*registry.operations().get(id));
  body["operation"] = id;
  body.update(extra);
  HttpResponse r = json_response(202, body);
  r.headers.emplace_back("Location", "/v1/operations/" + id);
  return r;
}

}  // namespace

void Handlers::snapshot_context(const HttpRequest& req, const RouteMatch& m, Responder done) {
  if (!snapshots_ || !snapshots_->enabled()) return done(status_response(SnapshotCatalog::off()));
  if (auto problem = context_problem(m, false)) return done(std::move(*problem));
  Expected<std::string> name = parse_snapshot_request(req.body);
  if (!name) return done(error_response(400, "invalid_argument", name.status().message()));
  std::string tmp;
  if (!snapshots_->hold_new(*name, &tmp)) {
    return done(status_response(
        Status(ErrorCode::kConflict, "snapshot '" + *name + "' already exists (or is being written)")));
  }
  const std::optional<ContextInfo> ctx = registry_.find(m.id);
  // From here the operation holds the name: released when it is destroyed, however it ends.
  auto op = std::make_shared<SnapshotOperation>(*snapshots_, m.id, *name, tmp, utc_now(), config_.model.layers);
  done(start_operation(registry_, queue_, req, OperationKind::kSnapshot, m.id, ctx ? ctx->charged_tokens() : 0,
                       std::move(op), {{"name", *name}}));
}

void Handlers::restore_context(const HttpRequest& req, const std::string& name, Responder done) {
  if (!snapshots_) return done(status_response(SnapshotCatalog::off()));
  Expected<StoredSnapshot> stored = snapshots_->read(name);
  if (!stored) return done(status_response(stored.status()));
  // The ranks check the storage dtype (the backend's); the shape and placement here, at once.
  if (Status s = check_manifest_fits(stored->manifest, config_, stored->manifest.dtype); !s.is_ok()) {
    return done(status_response(s));
  }
  const ContextId id = registry_.reserve_id();
  const int64_t tokens = stored->manifest.tokens();
  snapshots_->hold_existing(name);
  auto op = std::make_shared<RestoreOperation>(*snapshots_, std::move(*stored), id);
  done(start_operation(registry_, queue_, req, OperationKind::kRestore, id, tokens, std::move(op),
                       {{"context_id", id}, {"restored_from", name}}));
}

HttpResponse Handlers::list_snapshots() const {
  if (!snapshots_ || !snapshots_->enabled()) return status_response(SnapshotCatalog::off());
  json list = json::array();
  for (const StoredSnapshot& s : snapshots_->list()) list.push_back(snapshot_json(s.manifest));
  return json_response(200, {{"snapshots", list}});
}

HttpResponse Handlers::delete_snapshot(const RouteMatch& m) {
  if (!snapshots_ || !snapshots_->enabled()) return status_response(SnapshotCatalog::off());
  const Status s = snapshots_->remove(m.id_text);
  if (!s.is_ok()) return status_response(s);
  return json_response(200, {{"name", m.id_text}, {"deleted", true}});
}

}  // namespace reattn
