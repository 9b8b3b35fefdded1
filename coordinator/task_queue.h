// The bounded, id-keyed queue between the HTTP threads and the one step loop (llama.cpp's
// server_queue / server_response split): HTTP threads push tasks, each with a completion that
// receives its result; the step loop pops them in arrival order, a run of consecutive queries
// as one batch, any other task alone.
// Thread-safety: push, close, depth and closed from any thread; pop_batch only from the step loop.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "common/protocol.h"
#include "coordinator/registry.h"

namespace reattn {
class LongOperation;  // coordinator/long_operation.h
}

namespace reattn {

struct TaskResult {
  Status status;
  ContextInfo context;        // create: the new context; others: the context afterwards
  QueryResult query;          // a query
  StepTiming timing;          // a query: the step it ran in
  double queue_ms = 0;        // from push to the start of its step
  size_t batch_size = 0;      // a query: queries in its step
};

struct Task {
  uint64_t id = 0;            // set by push
  std::string request_id;
  // What the ranks are to do. A query is a StepPlan of one query; the step loop fills in the
  // context's length and owner and batches it with the queries queued behind it.
  Operation op;
  std::chrono::steady_clock::time_point enqueued;
  // Set by the HTTP side when the client closes its connection first: the task is dropped.
  std::shared_ptr<const std::atomic<bool>> client_gone;
  // Called once with the result, on an HTTP thread (the step loop posts it there).
  std::function<void(TaskResult)> done;
  // A small answer (a decode step's, in binary): `done` runs on the step loop itself, which
  // formats and sends it at once; the hand-off to an HTTP thread would cost a wake-up.
  bool answer_on_step_loop = false;
  // Set: the task starts this long-running operation (`op` is unused); its record is
  // `operation_id` in the registry's OperationTable. Its client was answered 202 already.
  std::shared_ptr<LongOperation> long_operation;
  std::string operation_id;
};

// Whether a task is a query (batched with its neighbours) rather than an operation alone.
inline bool is_query(const Task& task) {
  return !task.long_operation && std::holds_alternative<StepPlan>(task.op);
}

class TaskQueue {
 public:
  explicit TaskQueue(size_t capacity);

  // Unavailable when `capacity` tasks are waiting, or after close(). Returns the task's id.
  Expected<uint64_t> push(Task task);
  // Waits up to `wait` for a task, then takes either the first task alone (not a query) or
  // the run of consecutive queries at the front, at most `max_queries`. Empty when none came.
  // The first `spin` of the wait polls (yielding the CPU between looks) instead of sleeping,
  // so a task pushed then starts without a thread wake-up.
  std::vector<Task> pop_batch(size_t max_queries, std::chrono::milliseconds wait,
                              std::chrono::microseconds spin = std::chrono::microseconds(0));
  // No new tasks; those queued are still popped.
  void close();
  bool closed() const;
  size_t depth() const;

 private:
  const size_t capacity_;
  mutable std::mutex mu_;
  std::condition_variable ready_;
  std::deque<Task> tasks_;
  uint64_t next_id_ = 1;
  bool closed_ = false;
  // tasks_.size() or closed_, for polling without the lock; written under it.
  std::atomic<bool> ready_or_closed_{false};
};

}  // namespace reattn
