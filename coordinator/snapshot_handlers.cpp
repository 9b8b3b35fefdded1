// The snapshot routes of Handlers (handlers.h): snapshot a context, restore one into a new
// context (POST /v1/contexts {"from_snapshot": NAME}), list and delete snapshots. Writing and
// reading the files is the ranks' work (SnapshotContext, RestoreContext on the step loop);
// the catalog answers listing and deletion, and holds a snapshot's name while an operation
// uses it (released when the response is made, whatever it is).
#include <ctime>

#include "coordinator/handlers.h"
#include "coordinator/requests.h"

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

// Calls `done` after releasing the catalog's hold on `name`.
Responder releasing(SnapshotCatalog* catalog, std::string name, Responder done) {
  return [catalog, name = std::move(name), done = std::move(done)](HttpResponse r) {
    catalog->release(name);
    done(std::move(r));
  };
}

}  // namespace

void Handlers::snapshot_context(const HttpRequest& req, const RouteMatch& m, Responder done) {
  if (!snapshots_ || !snapshots_->enabled()) return done(status_response(SnapshotCatalog::off()));
  if (!m.id_valid || !registry_.find(m.id)) {
    return done(error_response(404, "not_found", "context '" + m.id_text + "' not found"));
  }
  Expected<std::string> name = parse_snapshot_request(req.body);
  if (!name) return done(error_response(400, "invalid_argument", name.status().message()));
  std::string tmp;
  if (!snapshots_->hold_new(*name, &tmp)) {
    return done(error_response(409, "conflict", "snapshot '" + *name + "' already exists (or is being written)"));
  }
  Task task;
  task.op = SnapshotContext{m.id, *name, tmp, utc_now()};
  task.request_id = req.request_id;
  task.client_gone = req.client_gone;
  enqueue(std::move(task),
          [](const TaskResult& r) {
            Expected<SnapshotManifest> manifest = decode_manifest(r.manifest, "the published manifest");
            if (!manifest) return status_response(manifest.status());
            return json_response(201, snapshot_json(*manifest));
          },
          releasing(snapshots_, *name, std::move(done)));
}

void Handlers::restore_context(const HttpRequest& req, const std::string& name, Responder done) {
  if (!snapshots_) return done(status_response(SnapshotCatalog::off()));
  Expected<StoredSnapshot> stored = snapshots_->read(name);
  if (!stored) return done(status_response(stored.status()));
  // The ranks check the storage dtype (the backend's); the shape and placement here, at once.
  if (Status s = check_manifest_fits(stored->manifest, config_, stored->manifest.dtype); !s.is_ok()) {
    return done(status_response(s));
  }
  snapshots_->hold_existing(name);
  Task task;
  task.op = RestoreContext{0, 0, name, std::move(stored->text)};  // the step loop picks the id and owner
  task.request_id = req.request_id;
  task.client_gone = req.client_gone;
  enqueue(std::move(task),
          [name](const TaskResult& r) {
            json body = context_json(r.context);
            body["restored_from"] = name;
            return json_response(201, body);
          },
          releasing(snapshots_, name, std::move(done)));
}

HttpResponse Handlers::list_snapshots() const {
  if (!snapshots_ || !snapshots_->enabled()) return status_response(SnapshotCatalog::off());
  json list = json::array();
  for (const StoredSnapshot& s : snapshots_->list()) list.push_back(snapshot_json(s.manifest));
  return json_response(200, {{"snapshots", list}});
}

HttpResponse Handlers::delete_snapshot(const RouteMatch& m) {
  if (!snapshots_ || !snapshots_->enabled()) return status_response(SnapshotCatalog::off());
  bool busy = false;
  const Status s = snapshots_->remove(m.id_text, &busy);
  if (busy) return error_response(409, "conflict", s.message());
  if (!s.is_ok()) return status_response(s);
  return json_response(200, {{"name", m.id_text}, {"deleted", true}});
}

}  // namespace reattn
