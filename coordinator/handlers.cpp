#include "coordinator/handlers.h"

#include <chrono>
#include <cstdio>
#include <random>
#include <utility>

#include "common/excerpt.h"
#include "common/file_roots.h"
#include "common/safetensors.h"
#include "common/tensor_checks.h"
#include "common/semantics.h"
#include "coordinator/json_budget.h"
#include "coordinator/load_operation.h"
#include "coordinator/logging.h"
#include "coordinator/openapi.h"
#include "coordinator/responses.h"

namespace reattn {
namespace {

using nlohmann::json;

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// A client's X-Request-Id is echoed when it is short and printable; otherwise one is made.
bool usable_request_id(const std::string& id) {
  if (id.empty() || id.size() > 128) return false;
  for (char c : id) {
    if (c < 0x21 || c > 0x7e) return false;
  }
  return true;
}

// Errors from parsing a body are the client's (400), whatever code the parser used (a
// missing tensor is NotFound to the safetensors reader).
HttpResponse body_error(const Status& s) { return error_response(400, "invalid_argument", s.message()); }

std::string unknown_context(const RouteMatch& m) { return "context '" + m.id_text + "' not found"; }

HttpResponse openapi_page() {
  HttpResponse r;  // application/json
  r.body = std::string(openapi_document());
  return r;
}

}  // namespace

json context_json(const ContextInfo& c) {
  json layers = json::array();
  for (int64_t n : c.layer_tokens) layers.push_back(n);
  return {{"id", c.id}, {"owner_rank", c.owner_rank}, {"tokens", c.tokens}, {"layer_tokens", layers}};
}

Handlers::Handlers(const Config& config, ServiceInfo info, std::string api_key, Registry& registry, TaskQueue& queue,
                   Metrics& metrics, ServiceState& state)
    : config_(config),
      info_(std::move(info)),
      api_key_(std::move(api_key)),
      registry_(registry),
      queue_(queue),
      metrics_(metrics),
      state_(state) {
  std::random_device rd;
  char prefix[16];
  std::snprintf(prefix, sizeof(prefix), "%08x", rd());
  id_prefix_ = prefix;
}

void Handlers::set_info(ServiceInfo info) {
  std::lock_guard<std::mutex> lock(info_mu_);
  info_ = std::move(info);
}

std::string Handlers::request_id_for(const std::string& given) {
  if (usable_request_id(given)) return given;
  return id_prefix_ + "-" + std::to_string(next_request_++);
}

bool Handlers::authorized(const std::string& authorization) const {
  if (api_key_.empty()) return true;
  const std::string want = "Bearer " + api_key_;
  // Compare in time independent of where the strings differ.
  unsigned diff = authorization.size() != want.size() ? 1u : 0u;
  for (size_t i = 0; i < want.size(); ++i) {
    diff |= static_cast<unsigned char>(want[i]) ^ static_cast<unsigned char>(i < authorization.size() ? authorization[i] : 0);
  }
  return diff == 0;
}

Responder Handlers::finish(const HttpRequest& request, const std::string& route, Responder done) {
  return [this, method = request.method, path = request.path, route, id = request.request_id, peer = request.peer,
          received = request.received, done = std::move(done)](HttpResponse response) {
    response.route = route;
    response.headers.emplace_back("X-Request-Id", id);
    const double seconds = seconds_since(received);
    metrics_.count_request(method, route, response.status, seconds);
    json fields = {{"request_id", id}, {"method", capped(method)}, {"path", capped(path)}, {"route", route},
                   {"status", response.status}, {"ms", seconds * 1e3}, {"peer", peer}};
    if (response.status >= 400) {
      // The error body is small JSON; keep its code in the log line.
      const json body = json::parse(response.body, nullptr, false);
      if (body.is_object() && body.contains("error")) fields["error"] = body["error"];
    }
    log_event(response.status >= 500 ? LogLevel::kWarn : LogLevel::kInfo, "request", fields);
    done(std::move(response));
  };
}

HttpResponse Handlers::reject(const HttpRequest& head, int status, const std::string& code, const std::string& message) {
  HttpRequest request = head;
  request.request_id = request_id_for(head.request_id);
  if (request.received == std::chrono::steady_clock::time_point{}) request.received = std::chrono::steady_clock::now();
  const RouteMatch m = match_route(request.method, request.path);
  HttpResponse out;
  finish(request, m.pattern, [&out](HttpResponse r) { out = std::move(r); })(error_response(status, code, message));
  return out;
}

void Handlers::handle(HttpRequest request, Responder done) {
  request.request_id = request_id_for(request.request_id);
  const RouteMatch m = match_route(request.method, request.path);
  Responder reply = finish(request, m.pattern, std::move(done));
  if (m.error_status == 404) {
    return reply(error_response(404, "not_found", "no route for " + capped(request.method) + " " + capped(request.path)));
  }
  if (m.error_status == 405) {
    HttpResponse r = error_response(405, "method_not_allowed",
                                    capped(request.method) + " is not allowed on " + m.pattern + " (allowed: " + m.allow + ")");
    r.headers.emplace_back("Allow", m.allow);
    return reply(std::move(r));
  }
  if (is_api_route(m.route)) {
    if (!authorized(request.authorization)) {
      HttpResponse r = error_response(401, "unauthorized", "missing or wrong API key (Authorization: Bearer <key>)");
      r.headers.emplace_back("WWW-Authenticate", "Bearer");
      return reply(std::move(r));
    }
    if (!state_.ready()) return reply(error_response(503, "unavailable", state_.reason()));
    const std::string media = content_type_problem(m.route, request.content_type, request.body.size());
    if (!media.empty()) return reply(error_response(415, "unsupported_media_type", media));
    if (Status s = check_json_body(m.route, request, config_); !s.is_ok()) return reply(body_error(s));
  }
  switch (m.route) {
    case Route::kHealthLive: return reply(json_response(200, {{"status", "live"}}));
    case Route::kHealthReady: return reply(health_ready());
    case Route::kMetrics: return reply(metrics_page());
    case Route::kOpenApi: return reply(openapi_page());
    case Route::kInfo: return reply(info());
    case Route::kListContexts: return reply(list_contexts());
    case Route::kGetContext: return reply(get_context(m));
    case Route::kCreateContext: return create_context(request, std::move(reply));
    case Route::kDeleteContext: return delete_context(request, m, std::move(reply));
    case Route::kAppendKv: return append_kv(request, m, std::move(reply));
    case Route::kSynthetic: return synthetic(request, m, std::move(reply));
    case Route::kQuery: return query(request, m, std::move(reply));
    case Route::kLayerStep: return layer_step(request, m, std::move(reply));
    case Route::kLoad: return load(request, m, std::move(reply));
    case Route::kListOperations: return reply(list_operations());
    case Route::kGetOperation: return reply(get_operation(m));
    case Route::kCancelOperation: return reply(cancel_operation(m));
    case Route::kSnapshotContext: return snapshot_context(request, m, std::move(reply));
    case Route::kListSnapshots: return reply(list_snapshots());
    case Route::kDeleteSnapshot: return reply(delete_snapshot(m));
    case Route::kNone: break;
  }
  reply(error_response(404, "not_found", "no route for " + capped(request.method) + " " + capped(request.path)));
}

HttpResponse Handlers::health_ready() const {
  if (state_.ready()) return json_response(200, {{"status", "ready"}});
  return error_response(503, "unavailable", state_.reason());
}

HttpResponse Handlers::metrics_page() const {
  MetricsSnapshot g;
  g.tokens_per_rank = registry_.tokens_per_rank();
  g.queue_depth = queue_.depth();
  g.contexts = registry_.size();
  g.ready = state_.ready();
  for (const auto& [key, count] : registry_.operations().unfinished()) {
    g.operations[{operation_kind_name(key.first), operation_state_name(key.second)}] = count;
  }
  HttpResponse r;
  r.content_type = "text/plain; version=0.0.4; charset=utf-8";
  r.body = metrics_.render(g);
  return r;
}

HttpResponse Handlers::info() const {
  ServiceInfo si;
  {
    std::lock_guard<std::mutex> lock(info_mu_);
    si = info_;
  }
  const ModelConfig& m = config_.model;
  const ReattentionConfig& rc = config_.reattention;
  return json_response(
      200, {{"service", "reattn"},
            {"ranks", si.world},
            {"backend", si.backend},
            {"communicator", si.communicator},
            {"model",
             {{"layers", m.layers},
              {"q_heads", m.q_heads},
              {"kv_heads", m.kv_heads},
              {"head_dim", m.head_dim},
              {"rope_theta", m.rope_theta},
              {"rope_scaling",
               {{"type", rope_scaling_name(m.rope_scaling.type)},
                {"factor", m.rope_scaling.factor},
                {"low_freq_factor", m.rope_scaling.low_freq_factor},
                {"high_freq_factor", m.rope_scaling.high_freq_factor},
                {"original_max_position_embeddings", m.rope_scaling.original_max_positions}}},
              {"scope", m.scope}}},
            {"reattention",
             {{"sink_tokens", rc.sink_tokens},
              {"local_window", rc.local_window},
              {"chunk_tokens", rc.chunk_tokens},
              {"top_k", rc.top_k},
              {"max_recall_chunks", rc.max_recall_chunks},
              {"final_attention", final_attention_name(rc.final_attention)},
              {"recall", recall_mode_name(rc.recall)},
              {"span_tokens", rc.span_tokens},
              {"max_recall_tokens", rc.max_recall_tokens}}},
            {"capacity",
             {{"tokens_per_rank", config_.capacity.tokens_per_rank},
              {"max_contexts", config_.capacity.max_contexts},
              {"tokens_used_per_rank", registry_.tokens_per_rank()},
              {"contexts", registry_.size()}}},
            {"server",
             {{"max_body_bytes", config_.server.max_body_bytes},
              {"queue_depth", config_.server.queue_depth},
              {"max_batch", config_.server.max_batch},
              {"request_timeout_s", config_.server.request_timeout_s},
              {"api_key_required", !api_key_.empty()}}}});
}

HttpResponse Handlers::list_contexts() const {
  json list = json::array();
  for (const ContextInfo& c : registry_.list()) list.push_back(context_json(c));
  return json_response(200, {{"contexts", list}});
}

HttpResponse Handlers::get_context(const RouteMatch& m) const {
  const std::optional<ContextInfo> c = m.id_valid ? registry_.find(m.id) : std::nullopt;
  if (!c) return error_response(404, "not_found", unknown_context(m));
  return json_response(200, context_json(*c));
}

void Handlers::enqueue(Task task, std::function<HttpResponse(const TaskResult&)> respond, Responder done) {
  // The completion must reach `done` even if the push fails; keep a copy for that case.
  auto shared_done = std::make_shared<Responder>(std::move(done));
  task.done = [respond = std::move(respond), shared_done](TaskResult result) {
    if (!result.status.is_ok()) return (*shared_done)(status_response(result.status));
    (*shared_done)(respond(result));
  };
  Expected<uint64_t> pushed = queue_.push(std::move(task));
  if (!pushed) (*shared_done)(status_response(pushed.status()));
}

void Handlers::create_context(const HttpRequest& req, Responder done) {
  Expected<std::string> from_snapshot = parse_create_request(req.body);
  if (!from_snapshot) return done(body_error(from_snapshot.status()));
  if (!from_snapshot->empty()) return restore_context(req, *from_snapshot, std::move(done));
  Task task;
  task.op = CreateContext{};  // the step loop picks the id and owner
  task.request_id = req.request_id;
  task.client_gone = req.client_gone;
  enqueue(std::move(task), [](const TaskResult& r) { return json_response(201, context_json(r.context)); },
          std::move(done));
}

void Handlers::delete_context(const HttpRequest& req, const RouteMatch& m, Responder done) {
  if (auto problem = context_problem(m, false)) return done(std::move(*problem));
  Task task;
  task.op = EraseContext{m.id};
  task.request_id = req.request_id;
  task.client_gone = req.client_gone;
  enqueue(std::move(task),
          [id = m.id](const TaskResult&) { return json_response(200, {{"id", id}, {"deleted", true}}); },
          std::move(done));
}

void Handlers::append_kv(HttpRequest& req, const RouteMatch& m, Responder done) {
  if (auto problem = context_problem(m, false)) return done(std::move(*problem));
  // Up to max_body_bytes: moved, never copied, from here to the ranks.
  auto body = std::make_shared<std::string>(std::move(req.body));
  Expected<int64_t> tokens = check_kv_body(body, config_);
  if (!tokens) return done(body_error(tokens.status()));
  if (Status s = registry_.check_append(m.id, *tokens); !s.is_ok()) return done(status_response(s));
  Task task;
  task.op = AppendKv{m.id, *tokens, std::move(body)};
  task.request_id = req.request_id;
  task.client_gone = req.client_gone;
  enqueue(std::move(task),
          [appended = *tokens](const TaskResult& r) {
            json body = context_json(r.context);
            body["appended"] = appended;
            return json_response(200, body);
          },
          std::move(done));
}

void Handlers::synthetic(const HttpRequest& req, const RouteMatch& m, Responder done) {
  if (auto problem = context_problem(m, false)) return done(std::move(*problem));
  Expected<SyntheticRequest> spec = parse_synthetic_request(req.body);
  if (!spec) return done(body_error(spec.status()));
  if (Status s = registry_.check_append(m.id, spec->tokens); !s.is_ok()) return done(status_response(s));
  const int64_t appended = spec->tokens;
  Task task;
  task.op = AppendSynthetic{m.id, spec->tokens, spec->seed, std::move(spec->needles)};
  task.request_id = req.request_id;
  task.client_gone = req.client_gone;
  enqueue(std::move(task),
          [appended](const TaskResult& r) {
            json body = context_json(r.context);
            body["appended"] = appended;
            return json_response(200, body);
          },
          std::move(done));
}

void Handlers::query(const HttpRequest& req, const RouteMatch& m, Responder done) {
  if (auto problem = context_problem(m, true)) return done(std::move(*problem));
  Expected<QueryRequest> q = parse_query_request(req.body, req.content_type, req.query_string, config_);
  if (!q) return done(body_error(q.status()));
  if (Status s = registry_.check_query(m.id, q->qlen, q->mode, q->layer); !s.is_ok()) return done(status_response(s));
  const int layer = q->layer;
  const QueryMode mode = q->mode;
  const int64_t qlen = q->qlen;
  QueryPlan query;
  query.context_id = m.id;
  query.qlen = qlen;
  query.layer = layer;
  query.mode = mode;
  StepPlan plan;
  plan.queries.push_back(query);
  plan.q = std::move(q->q);
  Task task;
  task.op = std::move(plan);
  task.request_id = req.request_id;
  task.client_gone = req.client_gone;
  task.answer_on_step_loop = answer_on_step_loop(wants_binary(req.accept), qlen, config_.model);
  enqueue(std::move(task),
          [this, id = m.id, layer, mode, qlen, binary = wants_binary(req.accept), out_dtype = q->out_dtype](
              const TaskResult& r) {
            return attention_response({{"context_id", id},
                                       {"layer", layer},
                                       {"mode", query_mode_name(mode)},
                                       {"tokens", r.context.layer_length(layer)}},
                                      r, qlen, config_, binary, out_dtype);
          },
          std::move(done));
}

void Handlers::layer_step(HttpRequest& req, const RouteMatch& m, Responder done) {
  if (auto problem = context_problem(m, false)) return done(std::move(*problem));
  // A safetensors body is moved, never copied, from here to the ranks (q, k, v are views of it).
  Expected<StepRequest> step = parse_step_request(std::make_shared<std::string>(std::move(req.body)),
                                                  req.content_type, req.query_string, config_);
  if (!step) return done(body_error(step.status()));
  if (Status s = registry_.check_layer_step(m.id, step->layer, step->qlen); !s.is_ok()) {
    return done(status_response(s));
  }
  const int layer = step->layer;
  const int64_t qlen = step->qlen;
  Task task;
  task.op = LayerStep{m.id, layer, 0, qlen, std::move(step->tensors)};
  task.request_id = req.request_id;
  task.client_gone = req.client_gone;
  task.answer_on_step_loop = answer_on_step_loop(wants_binary(req.accept), qlen, config_.model);
  enqueue(std::move(task),
          [this, id = m.id, layer, qlen, binary = wants_binary(req.accept), out_dtype = step->out_dtype](
              const TaskResult& r) {
            return attention_response({{"context_id", id},
                                       {"layer", layer},
                                       {"tokens", r.context.layer_length(layer)},
                                       {"context_tokens", r.context.tokens}},
                                      r, qlen, config_, binary, out_dtype);
          },
          std::move(done));
}

std::optional<HttpResponse> Handlers::context_problem(const RouteMatch& m, bool query) const {
  if (!m.id_valid || !registry_.find(m.id)) return error_response(404, "not_found", unknown_context(m));
  if (Status s = registry_.operations().check_not_busy(m.id, query); !s.is_ok()) return status_response(s);
  return std::nullopt;
}

void Handlers::load(const HttpRequest& req, const RouteMatch& m, Responder done) {
  if (auto problem = context_problem(m, false)) return done(std::move(*problem));
  Expected<LoadRequest> asked = parse_load_request(req.body);
  if (!asked) return done(body_error(asked.status()));
  Expected<std::string> path = resolve_under_root(config_.server.load_root, asked->path, "server.load_root (--load-root)");
  if (!path) return done(status_response(path.status()));
  // The header only (pread): its data is read by the ranks, slice by slice.
  Expected<SafetensorsFile> file = SafetensorsFile::open_header(*path);
  if (!file) {
    // Named as the client named it: the server's directories are not echoed.
    std::string why = file.status().message();
    for (size_t at = why.find(*path); at != std::string::npos; at = why.find(*path)) why.replace(at, path->size(), "file");
    return done(body_error(invalid_argument("file '" + capped(asked->path) + "': " + why)));
  }
  Expected<KvTensors> kv = kv_tensors(*file, config_.model);
  if (!kv) return done(body_error(Status(kv.status().code(), "file '" + capped(asked->path) + "': " + kv.status().message())));
  if (kv->tokens < 1) return done(body_error(invalid_argument("file '" + capped(asked->path) + "' holds no tokens")));
  if (Status s = registry_.check_append(m.id, kv->tokens); !s.is_ok()) return done(status_response(s));
  const int64_t bytes_per_token = static_cast<int64_t>(kv->k.bytes + kv->v.bytes) / kv->tokens;
  OperationTable& table = registry_.operations();
  const std::string id = table.create(OperationKind::kLoad, m.id, kv->tokens);
  Task task;
  task.request_id = req.request_id;
  task.operation_id = id;
  task.long_operation = std::make_shared<LoadOperation>(config_, m.id, *path, kv->tokens, bytes_per_token);
  if (Expected<uint64_t> pushed = queue_.push(std::move(task)); !pushed) {
    table.finish(id, OperationState::kFailed, pushed.status().message());
    return done(status_response(pushed.status()));
  }
  json body = operation_json(*table.get(id));
  body["operation"] = id;
  HttpResponse r = json_response(202, body);
  r.headers.emplace_back("Location", "/v1/operations/" + id);
  done(std::move(r));
}

HttpResponse Handlers::list_operations() const {
  json list = json::array();
  for (const OperationRecord& r : registry_.operations().list()) list.push_back(operation_json(r));
  return json_response(200, {{"operations", list}});
}

HttpResponse Handlers::get_operation(const RouteMatch& m) const {
  const std::optional<OperationRecord> r = registry_.operations().get(m.id_text);
  if (!r) return error_response(404, "not_found", "operation '" + m.id_text + "' not found");
  return json_response(200, operation_json(*r));
}

HttpResponse Handlers::cancel_operation(const RouteMatch& m) {
  // id_text is capped: an id longer than the cap is no operation's.
  if (Status s = registry_.operations().request_cancel(m.id_text); !s.is_ok()) return status_response(s);
  const std::optional<OperationRecord> r = registry_.operations().get(m.id_text);
  if (!r) return error_response(404, "not_found", "operation '" + m.id_text + "' not found");
  // The step loop ends it before its next slice; the record says when.
  return json_response(202, operation_json(*r));
}

}  // namespace reattn
