#include "coordinator/step_loop.h"

#include <algorithm>
#include <chrono>
#include <tuple>
#include <utility>

#include "coordinator/logging.h"

namespace reattn {
namespace {

double ms_between(std::chrono::steady_clock::time_point a, std::chrono::steady_clock::time_point b) {
  return std::chrono::duration<double, std::milli>(b - a).count();
}

Status missing(ContextId id) { return not_found("context " + std::to_string(id) + " not found"); }

}  // namespace

ContextInfo restored_context(ContextInfo planned, const std::vector<int64_t>& layer_tokens) {
  planned.layer_tokens = layer_tokens;
  planned.tokens = layer_tokens.empty() ? 0 : *std::min_element(layer_tokens.begin(), layer_tokens.end());
  return planned;
}

namespace {

}  // namespace

StepLoop::StepLoop(OperationRunner& ranks, TaskQueue& queue, Registry& registry, Metrics& metrics, ServiceState& state,
                   const Config& config, Post post)
    : ranks_(ranks),
      queue_(queue),
      registry_(registry),
      metrics_(metrics),
      state_(state),
      config_(config),
      post_(std::move(post)) {}

void StepLoop::observe_step(const StepTiming& timing) {
  metrics_.observe_phase("score", timing.score_ms / 1e3);
  metrics_.observe_phase("merge", timing.candidates_ms / 1e3);
  metrics_.observe_phase("attention", timing.attention_ms / 1e3);
  metrics_.observe_phase("total", timing.total_ms / 1e3);
}

void StepLoop::complete(Task& task, TaskResult result) {
  if (!task.done) return;
  post_([done = std::move(task.done), r = std::move(result)]() mutable { done(std::move(r)); });
}

void StepLoop::fail_queued(const Status& why) {
  queue_.close();
  for (;;) {
    std::vector<Task> rest = queue_.pop_batch(1 << 20, std::chrono::milliseconds(0));
    if (rest.empty()) break;
    for (Task& t : rest) {
      TaskResult r;
      r.status = why;
      complete(t, std::move(r));
    }
  }
}

void StepLoop::fail_all(std::vector<Task>& held, const Status& fault) {
  state_.set_faulted(fault.message());
  log_event(LogLevel::kError, "fault in the step loop", {{"error", fault.to_string()}});
  const Status unavailable(ErrorCode::kUnavailable, "the service hit a fault: " + fault.message());
  for (Task& t : held) {
    TaskResult r;
    r.status = unavailable;
    complete(t, std::move(r));
  }
  fail_queued(unavailable);
}

bool StepLoop::drop_if_expired(Task& task, std::chrono::steady_clock::time_point now) {
  const double waited_s = ms_between(task.enqueued, now) / 1e3;
  const bool gone = task.client_gone && task.client_gone->load();
  if (!gone && waited_s <= config_.server.queue_deadline_s) return false;
  TaskResult r;
  r.status = Status(ErrorCode::kUnavailable,
                    gone ? std::string("the client closed its connection before the request ran; it was not run")
                         : "the request waited " + std::to_string(static_cast<int64_t>(waited_s)) +
                               " s in the queue, over server.queue_deadline_s; it was not run");
  log_event(LogLevel::kInfo, "request dropped", {{"request_id", task.request_id}, {"client_gone", gone},
                                                 {"queued_s", waited_s}});
  r.queue_ms = waited_s * 1e3;
  complete(task, std::move(r));
  return true;
}

Status StepLoop::run() {
  const size_t max_batch = static_cast<size_t>(config_.server.max_batch);
  const auto heartbeat_every = std::chrono::duration<double>(config_.server.heartbeat_s);
  auto last_contact = std::chrono::steady_clock::now();
  for (;;) {
    std::vector<Task> tasks = queue_.pop_batch(max_batch, std::chrono::milliseconds(100));
    if (tasks.empty()) {
      if (queue_.closed() && queue_.depth() == 0) return Status::ok();
      if (std::chrono::steady_clock::now() - last_contact < heartbeat_every) continue;
      if (const Status fault = ranks_.heartbeat(); !fault.is_ok()) {
        fail_all(tasks, fault);
        return fault;
      }
      last_contact = std::chrono::steady_clock::now();
      continue;
    }
    const Status fault = is_query(tasks.front()) ? run_queries(tasks) : run_operation(tasks.front());
    last_contact = std::chrono::steady_clock::now();
    if (!fault.is_ok()) {
      fail_all(tasks, fault);
      return fault;
    }
  }
}

Status StepLoop::run_queries(std::vector<Task>& tasks) {
  const auto start = std::chrono::steady_clock::now();
  StepPlan plan;
  plan.strategy = config_.reattention.final_attention;
  plan.reply_rank = 0;
  std::vector<Task*> planned;
  std::vector<ContextInfo> contexts;
  for (Task& t : tasks) {
    if (drop_if_expired(t, start)) continue;
    const StepPlan& asked = std::get<StepPlan>(t.op);
    // The context as it is now: deleted or grown since the request was checked.
    const std::optional<ContextInfo> ctx =
        asked.queries.size() == 1 ? registry_.find(asked.queries[0].context_id) : std::nullopt;
    Status s = asked.queries.size() != 1 ? internal_error("a query task holds " + std::to_string(asked.queries.size()) +
                                                          " queries, not one")
               : !ctx ? missing(asked.queries[0].context_id)
                      : registry_.check_query(ctx->id, asked.queries[0].qlen, asked.queries[0].mode,
                                              asked.queries[0].layer);
    if (!s.is_ok()) {
      TaskResult r;
      r.status = s;
      r.queue_ms = ms_between(t.enqueued, start);
      complete(t, std::move(r));
      continue;
    }
    QueryPlan query = asked.queries[0];
    query.tokens = ctx->layer_length(query.layer);
    query.owner_rank = ctx->owner_rank;
    append_query(plan, query, asked.q.data(), asked.q.size());
    planned.push_back(&t);
    contexts.push_back(*ctx);
  }
  if (planned.empty()) return Status::ok();

  OperationResult result;
  REATTN_RETURN_IF_ERROR(ranks_.submit(plan, &result));
  if (result.queries.size() != planned.size()) {
    return Status(ErrorCode::kFatal, "query step returned " + std::to_string(result.queries.size()) +
                                         " results for " + std::to_string(planned.size()) + " queries");
  }
  metrics_.observe_batch(planned.size());
  observe_step(result.timing);
  log_event(LogLevel::kDebug, "query step",
            {{"queries", planned.size()}, {"total_ms", result.timing.total_ms}, {"queue_depth", queue_.depth()}});
  for (size_t i = 0; i < planned.size(); ++i) {
    Task& t = *planned[i];
    TaskResult r;
    r.status = result.queries[i].status;
    r.context = contexts[i];
    r.query = std::move(result.queries[i]);
    r.timing = result.timing;
    r.queue_ms = ms_between(t.enqueued, start);
    r.batch_size = planned.size();
    metrics_.observe_phase("queue", r.queue_ms / 1e3);
    complete(t, std::move(r));
  }
  return Status::ok();
}

Status StepLoop::run_operation(Task& task) {
  const auto start = std::chrono::steady_clock::now();
  if (drop_if_expired(task, start)) return Status::ok();
  TaskResult r;
  r.queue_ms = ms_between(task.enqueued, start);
  std::optional<ContextInfo> ctx;
  auto* create = std::get_if<CreateContext>(&task.op);
  auto* restore = std::get_if<RestoreContext>(&task.op);
  if (create || restore) {
    Expected<ContextInfo> planned = registry_.plan_create();
    if (!planned) {
      r.status = planned.status();
      complete(task, std::move(r));
      return Status::ok();
    }
    ctx = *planned;
    if (create) *create = CreateContext{ctx->id, ctx->owner_rank};
    if (restore) std::tie(restore->context_id, restore->owner_rank) = std::make_pair(ctx->id, ctx->owner_rank);
  } else {
    const ContextId id = operation_context(task.op);
    ctx = registry_.find(id);
    if (!ctx) {
      r.status = missing(id);
    } else if (const auto* append = std::get_if<AppendKv>(&task.op)) {
      r.status = registry_.check_append(id, append->tokens);
    } else if (const auto* synthetic = std::get_if<AppendSynthetic>(&task.op)) {
      r.status = registry_.check_append(id, synthetic->tokens);
    } else if (auto* step = std::get_if<LayerStep>(&task.op)) {
      r.status = registry_.check_layer_step(id, step->layer, step->qlen);
      if (r.status.is_ok()) step->layer_tokens = ctx->layer_length(step->layer);
    }
  }
  if (!r.status.is_ok()) {
    complete(task, std::move(r));
    return Status::ok();
  }
  OperationResult result;
  REATTN_RETURN_IF_ERROR(ranks_.submit(task.op, &result));
  r.status = result.status;
  r.context = *ctx;
  if (std::holds_alternative<CreateContext>(task.op)) {
    if (result.status.is_ok()) {
      registry_.insert(*ctx);
      r.context = *registry_.find(ctx->id);
    }
  } else if (restore) {
    if (result.status.is_ok()) {
      registry_.insert(restored_context(*ctx, result.layer_tokens));
      r.context = *registry_.find(ctx->id);
    }
  } else if (std::holds_alternative<SnapshotContext>(task.op)) {
    r.manifest = std::move(result.manifest);
  } else if (std::holds_alternative<EraseContext>(task.op)) {
    if (result.status.is_ok() || result.status.code() == ErrorCode::kNotFound) registry_.erase(ctx->id);
  } else if (const auto* step = std::get_if<LayerStep>(&task.op)) {
    if (result.status.is_ok()) {
      registry_.set_layer_tokens(ctx->id, step->layer, result.tokens);
      r.context = *registry_.find(ctx->id);
      r.query = result.queries.empty() ? QueryResult{} : std::move(result.queries[0]);
      r.timing = result.timing;
      r.batch_size = 1;
      observe_step(result.timing);
    }
    if (result.context_dropped) registry_.erase(ctx->id);
  } else {
    if (result.status.is_ok()) {
      registry_.set_tokens(ctx->id, result.tokens);
      r.context.tokens = result.tokens;
    }
    if (result.context_dropped) registry_.erase(ctx->id);
  }
  log_event(result.status.is_ok() ? LogLevel::kInfo : LogLevel::kWarn, "operation",
            {{"request_id", task.request_id},
             {"op", operation_name(task.op)},
             {"context_id", ctx->id},
             {"owner_rank", ctx->owner_rank},
             {"tokens", r.context.tokens},
             {"status", result.status.to_string()},
             {"ms", ms_between(start, std::chrono::steady_clock::now())}});
  complete(task, std::move(r));
  return Status::ok();
}

}  // namespace reattn
