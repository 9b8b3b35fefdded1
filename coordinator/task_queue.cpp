#include "coordinator/task_queue.h"

#include <algorithm>
#include <thread>
#include <utility>

namespace reattn {

TaskQueue::TaskQueue(size_t capacity) : capacity_(capacity) {}

Expected<uint64_t> TaskQueue::push(Task task) {
  uint64_t id = 0;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (closed_) return Status(ErrorCode::kUnavailable, "the service is shutting down");
    if (tasks_.size() >= capacity_) {
      return Status(ErrorCode::kUnavailable, "the request queue is full (" + std::to_string(capacity_) +
                                                 " waiting, server.queue_depth); retry later");
    }
    id = next_id_++;
    task.id = id;
    task.enqueued = std::chrono::steady_clock::now();
    tasks_.push_back(std::move(task));
    ready_or_closed_.store(true, std::memory_order_release);
  }
  ready_.notify_one();
  return id;
}

std::vector<Task> TaskQueue::pop_batch(size_t max_queries, std::chrono::milliseconds wait,
                                       std::chrono::microseconds spin) {
  const auto start = std::chrono::steady_clock::now();
  const auto spin_until = start + std::min<std::chrono::microseconds>(spin, wait);
  while (!ready_or_closed_.load(std::memory_order_acquire) && std::chrono::steady_clock::now() < spin_until) {
    std::this_thread::yield();
  }
  std::unique_lock<std::mutex> lock(mu_);
  ready_.wait_until(lock, start + wait, [this] { return !tasks_.empty() || closed_; });
  std::vector<Task> out;
  if (tasks_.empty()) return out;
  if (!is_query(tasks_.front())) {
    out.push_back(std::move(tasks_.front()));
    tasks_.pop_front();
  } else {
    // Queries arriving together go out as one step; a non-query task ends the run so that
    // every task sees the effects of those pushed before it.
    while (!tasks_.empty() && is_query(tasks_.front()) && out.size() < max_queries) {
      out.push_back(std::move(tasks_.front()));
      tasks_.pop_front();
    }
  }
  ready_or_closed_.store(!tasks_.empty() || closed_, std::memory_order_release);
  return out;
}

void TaskQueue::close() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    closed_ = true;
    ready_or_closed_.store(true, std::memory_order_release);
  }
  ready_.notify_all();
}

bool TaskQueue::closed() const {
  std::lock_guard<std::mutex> lock(mu_);
  return closed_;
}

size_t TaskQueue::depth() const {
  std::lock_guard<std::mutex> lock(mu_);
  return tasks_.size();
}

}  // namespace reattn
