#include "coordinator/step_loop.h"

#include <chrono>
#include <utility>

#include "common/excerpt.h"
#include "coordinator/logging.h"

namespace reattn {
namespace {

double ms_between(std::chrono::steady_clock::time_point a, std::chrono::steady_clock::time_point b) {
  return std::chrono::duration<double, std::milli>(b - a).count();
}

Status missing(ContextId id) { return not_found("context " + std::to_string(id) + " not found"); }

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
  // A long operation that will never start (the service faulted): its record says why.
  if (task.long_operation && !result.status.is_ok()) {
    registry_.operations().finish(task.operation_id, OperationState::kFailed, result.status.message());
  }
  if (!task.done) return;
  if (task.answer_on_step_loop) return task.done(std::move(result));
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
  for (const ActiveOperation& a : active_) registry_.operations().finish(a.id, OperationState::kFailed, unavailable.message());
  active_.clear();
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
  const std::chrono::microseconds busy_poll(config_.server.busy_poll_us);
  auto last_contact = std::chrono::steady_clock::now();
  bool worked = false;  // the last round ran tasks: poll for the next one before sleeping
  for (;;) {
    // While a long operation runs, the queue is only looked at, not waited on (nor polled).
    const bool idle_wait = active_.empty();
    std::vector<Task> tasks =
        queue_.pop_batch(max_batch, std::chrono::milliseconds(idle_wait ? 100 : 0),
                         worked && idle_wait ? busy_poll : std::chrono::microseconds(0));
    worked = !tasks.empty();
    if (tasks.empty() && active_.empty()) {
      if (queue_.closed() && queue_.depth() == 0) return Status::ok();
      if (std::chrono::steady_clock::now() - last_contact < heartbeat_every) continue;
      if (const Status fault = ranks_.heartbeat(); !fault.is_ok()) {
        fail_all(tasks, fault);
        return fault;
      }
      last_contact = std::chrono::steady_clock::now();
      continue;
    }
    Status fault = Status::ok();
    if (!tasks.empty()) {
      if (tasks.front().long_operation) {
        start_long(tasks.front());
      } else {
        fault = is_query(tasks.front()) ? run_queries(tasks) : run_operation(tasks.front());
      }
    }
    if (fault.is_ok() && !active_.empty()) {
      fault = queue_.closed() ? cancel_all_long("the service is shutting down") : run_slice();
    }
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
    if (s.is_ok()) s = check_idle(ctx->id, true);
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
  if (auto* create = std::get_if<CreateContext>(&task.op)) {
    Expected<ContextInfo> planned = registry_.plan_create();
    if (!planned) {
      r.status = planned.status();
      complete(task, std::move(r));
      return Status::ok();
    }
    ctx = *planned;
    *create = CreateContext{ctx->id, ctx->owner_rank};
  } else {
    const ContextId id = operation_context(task.op);
    ctx = registry_.find(id);
    if (!ctx) {
      r.status = missing(id);
    } else if (Status busy = check_idle(id, false); !busy.is_ok()) {
      r.status = busy;
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
      r.context = *registry_.find(ctx->id);  // every layer's new length, not only `tokens`
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

// ---- Long-running operations ----

Status StepLoop::check_idle(ContextId id, bool query) const {
  for (const ActiveOperation& a : active_) {
    const std::optional<OperationRecord> r = registry_.operations().get(a.id);
    if (!r || r->context_id != id || (query && !a.op->refuses_queries())) continue;
    return Status(ErrorCode::kConflict, "context " + std::to_string(id) + " is busy with " +
                                            operation_kind_name(a.op->kind()) + " operation " + a.id);
  }
  return Status::ok();
}

void StepLoop::start_long(Task& task) {
  OperationTable& table = registry_.operations();
  const std::string& id = task.operation_id;
  const char* kind = operation_kind_name(task.long_operation->kind());
  if (table.cancel_requested(id)) {
    table.finish(id, OperationState::kCancelled, "cancelled before it started");
    metrics_.count_operation(kind, "cancelled");
    return;
  }
  const std::optional<OperationRecord> record = table.get(id);
  Status s = record && record->context_id != 0 ? check_idle(record->context_id, false) : Status::ok();
  if (s.is_ok()) s = task.long_operation->start(registry_);
  if (!s.is_ok()) {
    table.finish(id, OperationState::kFailed, s.message());
    metrics_.count_operation(kind, "failed");
    log_event(LogLevel::kWarn, "operation failed", {{"operation", id}, {"kind", kind}, {"error", s.to_string()}});
    return;
  }
  table.set_running(id);
  table.set_progress(id, task.long_operation->progress());
  log_event(LogLevel::kInfo, "operation started",
            {{"operation", id}, {"kind", kind}, {"request_id", task.request_id},
             {"tokens_total", task.long_operation->progress().tokens_total}});
  active_.push_back({id, std::move(task.long_operation), std::chrono::steady_clock::now(), 0});
}

void StepLoop::log_progress(ActiveOperation& a, bool force) {
  // One line per tenth of the work, or every few seconds on a slow one.
  const OperationProgress p = a.op->progress();
  const int tenths = p.tokens_total > 0 ? static_cast<int>(10 * p.tokens_done / p.tokens_total) : 0;
  const auto now = std::chrono::steady_clock::now();
  if (!force && tenths <= a.logged_tenths && now - a.last_log < std::chrono::seconds(5)) return;
  a.logged_tenths = tenths;
  a.last_log = now;
  const std::optional<OperationRecord> r = registry_.operations().get(a.id);
  log_event(LogLevel::kInfo, "operation progress",
            {{"operation", a.id},
             {"kind", operation_kind_name(a.op->kind())},
             {"tokens_done", p.tokens_done},
             {"tokens_total", p.tokens_total},
             {"percent", p.tokens_total > 0 ? 100.0 * p.tokens_done / p.tokens_total : 0.0},
             {"bytes_done", p.bytes_done},
             {"bytes_per_s", r ? r->bytes_per_s : 0.0}});
}

Status StepLoop::run_slice() {
  // The operation stays in active_ until it has ended, so a fault on the way fails its record.
  ActiveOperation& a = active_.front();
  const auto end = [this](OperationState state, const std::string& error) {
    REATTN_RETURN_IF_ERROR(end_long(active_.front(), state, error));
    active_.pop_front();
    return Status::ok();
  };
  OperationTable& table = registry_.operations();
  // Complete first: a cancel that comes after the last slice (a load's commit, a snapshot's
  // publish) is too late, the ranks keep what it did.
  const std::optional<Operation> slice = a.op->next_slice();
  if (!slice) return end(OperationState::kSucceeded, "");
  if (table.cancel_requested(a.id)) return end(OperationState::kCancelled, "cancelled by request");
  OperationResult result;
  const auto started = std::chrono::steady_clock::now();
  REATTN_RETURN_IF_ERROR(ranks_.submit(*slice, &result));
  // Each slice holds up the queries queued behind it: its time, at debug level.
  log_event(LogLevel::kDebug, "operation slice",
            {{"operation", a.id}, {"kind", operation_kind_name(a.op->kind())}, {"slice", operation_name(*slice)},
             {"status", result.status.to_string()}, {"ms", ms_between(started, std::chrono::steady_clock::now())},
             {"rank0_ms", result.timing.local_ms}, {"wait_ms", result.timing.wait_ms},
             {"rank0_read_ms", result.timing.read_ms}});
  const int64_t bytes_before = a.op->progress().bytes_done;
  const Status s = a.op->on_slice_done(*slice, result, registry_);
  const OperationProgress p = a.op->progress();
  table.set_progress(a.id, p);
  metrics_.add_operation_bytes(operation_kind_name(a.op->kind()), p.bytes_done - bytes_before);
  if (!s.is_ok()) return end(OperationState::kFailed, s.message());
  log_progress(a, false);
  // Round robin: the next slice is the next operation's.
  active_.push_back(std::move(active_.front()));
  active_.pop_front();
  return Status::ok();
}

Status StepLoop::end_long(ActiveOperation& a, OperationState state, const std::string& error) {
  OperationTable& table = registry_.operations();
  std::string why = error;
  if (state != OperationState::kSucceeded) {
    for (const Operation& undo : a.op->rollback()) {
      OperationResult result;
      REATTN_RETURN_IF_ERROR(ranks_.submit(undo, &result));
      if (result.status.is_ok()) continue;
      // The ranks could not put the context back: it is dropped rather than left inconsistent.
      const ContextId id = operation_context(undo);
      OperationResult erased;
      REATTN_RETURN_IF_ERROR(ranks_.submit(EraseContext{id}, &erased));
      registry_.erase(id);
      why += "; the rollback failed (" + result.status.message() + "), so context " + std::to_string(id) +
             " was dropped";
      break;
    }
    a.op->on_rolled_back(registry_);
  }
  table.set_progress(a.id, a.op->progress());
  table.finish(a.id, state, why);
  metrics_.count_operation(operation_kind_name(a.op->kind()), operation_state_name(state));
  log_progress(a, true);
  log_event(state == OperationState::kSucceeded ? LogLevel::kInfo : LogLevel::kWarn, "operation finished",
            {{"operation", a.id},
             {"kind", operation_kind_name(a.op->kind())},
             {"state", operation_state_name(state)},
             {"error", capped(why, OperationTable::kErrorBytes)}});
  return Status::ok();
}

Status StepLoop::cancel_all_long(const std::string& why) {
  while (!active_.empty()) {
    const bool complete = !active_.front().op->next_slice();
    REATTN_RETURN_IF_ERROR(
        end_long(active_.front(), complete ? OperationState::kSucceeded : OperationState::kCancelled, complete ? "" : why));
    active_.pop_front();
  }
  return Status::ok();
}

}  // namespace reattn
