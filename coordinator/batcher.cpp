#include "coordinator/batcher.h"

#include <chrono>
#include <utility>

#include "coordinator/logging.h"

namespace reattn {
namespace {

double ms_between(std::chrono::steady_clock::time_point a, std::chrono::steady_clock::time_point b) {
  return std::chrono::duration<double, std::milli>(b - a).count();
}

}  // namespace

Batcher::Batcher(ServiceLoop& loop, TaskQueue& queue, Registry& registry, Metrics& metrics, ServiceState& state,
                 const Config& config, Post post)
    : loop_(loop),
      queue_(queue),
      registry_(registry),
      metrics_(metrics),
      state_(state),
      config_(config),
      post_(std::move(post)) {}

void Batcher::complete(Task& task, TaskResult result) {
  if (!task.done) return;
  post_([done = std::move(task.done), r = std::move(result)]() mutable { done(std::move(r)); });
}

void Batcher::fail_queued(const Status& why) {
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

void Batcher::fail_all(std::vector<Task>& held, const Status& fault) {
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

bool Batcher::drop_if_expired(Task& task, std::chrono::steady_clock::time_point now) {
  const double waited_s = ms_between(task.enqueued, now) / 1e3;
  if (waited_s <= config_.server.queue_deadline_s) return false;
  TaskResult r;
  r.status = Status(ErrorCode::kUnavailable, "the request waited " + std::to_string(static_cast<int64_t>(waited_s)) +
                                                 " s in the queue, over server.queue_deadline_s; it was not run");
  r.queue_ms = waited_s * 1e3;
  complete(task, std::move(r));
  return true;
}

Status Batcher::run() {
  const size_t max_batch = static_cast<size_t>(config_.server.max_batch);
  const auto heartbeat_every = std::chrono::duration<double>(config_.server.heartbeat_s);
  auto last_contact = std::chrono::steady_clock::now();
  for (;;) {
    std::vector<Task> tasks = queue_.pop_batch(max_batch, std::chrono::milliseconds(100));
    if (tasks.empty()) {
      if (queue_.closed() && queue_.depth() == 0) return Status::ok();
      if (std::chrono::steady_clock::now() - last_contact < heartbeat_every) continue;
      if (const Status fault = loop_.heartbeat(); !fault.is_ok()) {
        fail_all(tasks, fault);
        return fault;
      }
      last_contact = std::chrono::steady_clock::now();
      continue;
    }
    const Status fault = tasks.front().kind == TaskKind::kQuery ? run_queries(tasks) : run_operation(tasks.front());
    last_contact = std::chrono::steady_clock::now();
    if (!fault.is_ok()) {
      fail_all(tasks, fault);
      return fault;
    }
  }
}

Status Batcher::run_queries(std::vector<Task>& tasks) {
  const auto start = std::chrono::steady_clock::now();
  StepPlan plan;
  plan.strategy = config_.reattention.final_attention;
  plan.reply_rank = 0;
  std::vector<Task*> planned;
  std::vector<ContextInfo> contexts;
  for (Task& t : tasks) {
    if (drop_if_expired(t, start)) continue;
    // The context as it is now: deleted or grown since the request was checked.
    const std::optional<ContextInfo> ctx = registry_.find(t.context_id);
    Status s = ctx ? registry_.check_query(t.context_id, t.query.qlen, t.query.mode)
                   : not_found("context " + std::to_string(t.context_id) + " not found");
    if (!s.is_ok()) {
      TaskResult r;
      r.status = s;
      r.queue_ms = ms_between(t.enqueued, start);
      complete(t, std::move(r));
      continue;
    }
    QueryPlan qp;
    qp.context_id = ctx->id;
    qp.tokens = ctx->tokens;
    qp.qlen = t.query.qlen;
    qp.q_offset = static_cast<int64_t>(plan.q.size());
    qp.layer = t.query.layer;
    qp.mode = static_cast<int32_t>(t.query.mode);
    qp.owner_rank = ctx->owner_rank;
    plan.queries.push_back(qp);
    plan.q.insert(plan.q.end(), t.query.q.begin(), t.query.q.end());
    planned.push_back(&t);
    contexts.push_back(*ctx);
  }
  if (planned.empty()) return Status::ok();

  Operation op;
  op.kind = OperationKind::kQueryBatch;
  op.payload = encode_step(plan);
  OperationResult result;
  REATTN_RETURN_IF_ERROR(loop_.submit(op, &result));
  if (result.queries.size() != planned.size()) {
    return internal_error("query step returned " + std::to_string(result.queries.size()) + " results for " +
                          std::to_string(planned.size()) + " queries");
  }
  metrics_.observe_batch(planned.size());
  metrics_.observe_phase("score", result.timing.score_ms / 1e3);
  metrics_.observe_phase("merge", result.timing.merge_ms / 1e3);
  metrics_.observe_phase("attention", result.timing.attention_ms / 1e3);
  metrics_.observe_phase("total", result.timing.total_ms / 1e3);
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

Status Batcher::run_operation(Task& task) {
  const auto start = std::chrono::steady_clock::now();
  if (drop_if_expired(task, start)) return Status::ok();
  TaskResult r;
  r.queue_ms = ms_between(task.enqueued, start);
  Operation op;
  op.context_id = task.context_id;
  std::optional<ContextInfo> ctx = registry_.find(task.context_id);
  const Status missing = not_found("context " + std::to_string(task.context_id) + " not found");
  switch (task.kind) {
    case TaskKind::kCreate: {
      Expected<ContextInfo> planned = registry_.plan_create();
      if (!planned) {
        r.status = planned.status();
        complete(task, std::move(r));
        return Status::ok();
      }
      ctx = *planned;
      op.kind = OperationKind::kCreate;
      op.context_id = ctx->id;
      op.owner_rank = ctx->owner_rank;
      break;
    }
    case TaskKind::kErase:
      op.kind = OperationKind::kErase;
      break;
    case TaskKind::kAppendKv:
      op.kind = OperationKind::kAppendKv;
      op.payload = std::move(task.kv_body);
      if (ctx) r.status = registry_.check_append(ctx->id, task.kv_tokens);
      break;
    case TaskKind::kSynthetic:
      op.kind = OperationKind::kSynthetic;
      op.tokens = task.synthetic.tokens;
      op.seed = task.synthetic.seed;
      op.needles = task.synthetic.needles;
      if (ctx) r.status = registry_.check_append(ctx->id, task.synthetic.tokens);
      break;
    case TaskKind::kQuery:
      return internal_error("a query reached run_operation");
  }
  if (!ctx) r.status = missing;
  if (!r.status.is_ok()) {
    complete(task, std::move(r));
    return Status::ok();
  }
  OperationResult result;
  REATTN_RETURN_IF_ERROR(loop_.submit(op, &result));
  r.status = result.status;
  r.context = *ctx;
  switch (task.kind) {
    case TaskKind::kCreate:
      if (result.status.is_ok()) registry_.insert(*ctx);
      break;
    case TaskKind::kErase:
      if (result.status.is_ok() || result.status.code() == ErrorCode::kNotFound) registry_.erase(ctx->id);
      break;
    default:
      if (result.status.is_ok()) {
        registry_.set_tokens(ctx->id, result.tokens);
        r.context.tokens = result.tokens;
      }
      if (result.context_dropped) registry_.erase(ctx->id);
      break;
  }
  log_event(result.status.is_ok() ? LogLevel::kInfo : LogLevel::kWarn, "operation",
            {{"request_id", task.request_id},
             {"op", operation_kind_name(op.kind)},
             {"context_id", ctx->id},
             {"owner_rank", ctx->owner_rank},
             {"tokens", r.context.tokens},
             {"status", result.status.to_string()},
             {"ms", ms_between(start, std::chrono::steady_clock::now())}});
  complete(task, std::move(r));
  return Status::ok();
}

}  // namespace reattn
