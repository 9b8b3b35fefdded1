// The step loop on rank 0: pops tasks from the queue, hands their operations to the ranks
// (an OperationRunner: the ServiceLoop in the service, a fake in tests), and completes them.
// A run of queries goes out as one batched StepPlan (one broadcast, one allgather, one final
// phase); other tasks go one at a time, in arrival order. Each task is checked again against
// the registry as it is now (a context may have been deleted or grown since the request was
// read). The registry is updated only after the ranks have applied an operation.
// Long-running operations (coordinator/long_operation.h) start when their task is popped and
// then run one slice after each batch of tasks, or whenever the queue is empty, so queries on
// other contexts are answered between slices; tasks on a context whose operation is running
// get 409 naming it.
// Thread-safety: run() on the thread that makes MPI calls; nothing else is called on it.
#pragma once

#include <deque>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "common/config.h"
#include "common/protocol.h"
#include "coordinator/long_operation.h"
#include "coordinator/metrics.h"
#include "coordinator/registry.h"
#include "coordinator/service_state.h"
#include "coordinator/task_queue.h"

namespace reattn {

class StepLoop {
 public:
  // `post` runs a completion on an HTTP thread, so the step loop formats no large responses
  // (tasks marked answer_on_step_loop complete in place).
  using Post = std::function<void(std::function<void()>)>;

  StepLoop(OperationRunner& ranks, TaskQueue& queue, Registry& registry, Metrics& metrics, ServiceState& state,
           const Config& config, Post post);

  // Serves until the queue is closed and empty (returns ok) or a fault (returns it, after
  // failing every task it holds and every queued one with 503). While idle it sends a
  // heartbeat every server.heartbeat_s, so a dead or hung rank is found without traffic.
  Status run();

 private:
  Status run_queries(std::vector<Task>& tasks);
  Status run_operation(Task& task);
  void complete(Task& task, TaskResult result);
  void observe_step(const StepTiming& timing);
  void fail_queued(const Status& why);
  // Reliability: fails `held` and the queue with 503 naming the fault.
  void fail_all(std::vector<Task>& held, const Status& fault);
  // A task whose client has gone, or that waited longer than server.queue_deadline_s, is
  // answered 503 and never run.
  bool drop_if_expired(Task& task, std::chrono::steady_clock::time_point now);

  // Long-running operations, in the order they started; slices go round-robin.
  struct ActiveOperation {
    std::string id;
    std::shared_ptr<LongOperation> op;
    std::chrono::steady_clock::time_point last_log;
    int logged_tenths = 0;  // progress logged up to this many tenths
  };
  void start_long(Task& task);
  // One slice of the operation at the front (which then goes to the back). A fault is returned.
  Status run_slice();
  // Ends `a` (not yet removed from active_): rolls back unless it succeeded, records it.
  Status end_long(ActiveOperation& a, OperationState state, const std::string& error);
  void log_progress(ActiveOperation& a, bool force);
  // Conflict when a running long operation holds `id` (for a query: one that refuses queries).
  Status check_idle(ContextId id, bool query) const;
  // At shutdown: every running operation is cancelled and rolled back.
  Status cancel_all_long(const std::string& why);

  OperationRunner& ranks_;
  TaskQueue& queue_;
  Registry& registry_;
  Metrics& metrics_;
  ServiceState& state_;
  const Config config_;
  Post post_;
  std::deque<ActiveOperation> active_;
};

}  // namespace reattn
