// The HTTP API's handlers: a parsed request in, a response out. They never touch a socket and
// never throw. Requests that change or read the KV cache become tasks on the step loop's
// queue; their response is made when the task completes. Everything else (health, metrics,
// info, the context table) is answered at once from the registry and metrics.
// Every response carries X-Request-Id and is counted and logged (JSON lines) here.
// Thread-safety: handle and reject are called from any HTTP thread.
#pragma once

#include <atomic>
#include <mutex>
#include <optional>
#include <string>

#include "common/config.h"
#include "coordinator/http_types.h"
#include "coordinator/metrics.h"
#include "coordinator/registry.h"
#include "coordinator/requests.h"
#include "coordinator/router.h"
#include "coordinator/service_state.h"
#include "coordinator/snapshot_catalog.h"
#include "coordinator/task_queue.h"

namespace reattn {

// What /v1/info reports besides the config.
struct ServiceInfo {
  int world = 1;
  std::string backend;        // "cpu", "cuda"
  std::string communicator;   // "mpi", "nccl"
};

class Handlers {
 public:
  // `api_key` empty: no key is required.
  Handlers(const Config& config, ServiceInfo info, std::string api_key, Registry& registry, TaskQueue& queue,
           Metrics& metrics, ServiceState& state);

  // A complete request; `done` is called exactly once, now or when its task completes.
  void handle(HttpRequest request, Responder done);
  // The response to a request the server refused before reading it (413, malformed HTTP).
  HttpResponse reject(const HttpRequest& head, int status, const std::string& code, const std::string& message);

  void set_info(ServiceInfo info);
  // Before serving: the snapshot directory's catalog (snapshot routes answer 404 without one).
  void set_snapshots(SnapshotCatalog* snapshots) { snapshots_ = snapshots; }

 private:
  // Wraps `done`: adds X-Request-Id, counts, logs.
  Responder finish(const HttpRequest& request, const std::string& route, Responder done);
  std::string request_id_for(const std::string& given);
  bool authorized(const std::string& authorization) const;

  HttpResponse health_ready() const;
  HttpResponse metrics_page() const;
  HttpResponse info() const;
  HttpResponse list_contexts() const;
  HttpResponse get_context(const RouteMatch& m) const;
  void create_context(const HttpRequest& req, Responder done);
  void delete_context(const HttpRequest& req, const RouteMatch& m, Responder done);
  void append_kv(HttpRequest& req, const RouteMatch& m, Responder done);  // takes the body
  void synthetic(const HttpRequest& req, const RouteMatch& m, Responder done);
  void query(const HttpRequest& req, const RouteMatch& m, Responder done);
  void layer_step(HttpRequest& req, const RouteMatch& m, Responder done);
  // A bulk load: checks the file's header at once, answers 202 with the operation.
  void load(const HttpRequest& req, const RouteMatch& m, Responder done);
  // The long-running operations' table (/v1/operations).
  HttpResponse list_operations() const;
  HttpResponse get_operation(const RouteMatch& m) const;
  HttpResponse cancel_operation(const RouteMatch& m);
  // 404 unknown context or 409 busy with a long-running operation; nullopt when neither.
  std::optional<HttpResponse> context_problem(const RouteMatch& m, bool query) const;
  // Snapshots (snapshot_handlers.cpp).
  void snapshot_context(const HttpRequest& req, const RouteMatch& m, Responder done);
  void restore_context(const HttpRequest& req, const std::string& name, Responder done);
  HttpResponse list_snapshots() const;
  HttpResponse delete_snapshot(const RouteMatch& m);
  // Pushes a task whose result `respond` turns into the response; 503 when the queue is full.
  void enqueue(Task task, std::function<HttpResponse(const TaskResult&)> respond, Responder done);

  const Config config_;
  mutable std::mutex info_mu_;
  ServiceInfo info_;
  const std::string api_key_;
  Registry& registry_;
  TaskQueue& queue_;
  Metrics& metrics_;
  ServiceState& state_;
  SnapshotCatalog* snapshots_ = nullptr;
  std::string id_prefix_;
  std::atomic<uint64_t> next_request_{1};
};

// JSON of a context: {"id", "owner_rank", "tokens" (what every layer has reached),
// "layer_tokens" (each layer's length)}.
nlohmann::json context_json(const ContextInfo& c);

}  // namespace reattn
