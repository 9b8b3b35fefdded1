#include "coordinator/operations.h"

#include "common/excerpt.h"

namespace reattn {

const char* operation_kind_name(OperationKind kind) {
  switch (kind) {
    case OperationKind::kLoad: return "load";
    case OperationKind::kSnapshot: return "snapshot";
    case OperationKind::kRestore: return "restore";
  }
  return "unknown";
}

const char* operation_state_name(OperationState state) {
  switch (state) {
    case OperationState::kQueued: return "queued";
    case OperationState::kRunning: return "running";
    case OperationState::kSucceeded: return "succeeded";
    case OperationState::kFailed: return "failed";
    case OperationState::kCancelled: return "cancelled";
  }
  return "unknown";
}

bool is_finished(OperationState state) {
  return state == OperationState::kSucceeded || state == OperationState::kFailed || state == OperationState::kCancelled;
}

namespace {

// A snapshot reads the context as it is: queries may go on. A load or restore is filling it.
bool refuses_queries(OperationKind kind) { return kind != OperationKind::kSnapshot; }

}  // namespace

std::string OperationTable::create(OperationKind kind, ContextId context_id, int64_t tokens_total) {
  std::lock_guard<std::mutex> lock(mu_);
  OperationRecord r;
  r.id = "op-" + std::to_string(next_id_++);
  r.kind = kind;
  r.context_id = context_id;
  r.progress.tokens_total = tokens_total;
  r.created = std::chrono::system_clock::now();
  records_.push_back(r);
  drop_old_locked();
  return r.id;
}

OperationRecord* OperationTable::find_locked(const std::string& id) {
  for (OperationRecord& r : records_) {
    if (r.id == id) return &r;
  }
  return nullptr;
}

const OperationRecord* OperationTable::find_locked(const std::string& id) const {
  return const_cast<OperationTable*>(this)->find_locked(id);
}

std::optional<OperationRecord> OperationTable::get(const std::string& id) const {
  std::lock_guard<std::mutex> lock(mu_);
  const OperationRecord* r = find_locked(id);
  if (!r) return std::nullopt;
  return *r;
}

std::vector<OperationRecord> OperationTable::list() const {
  std::lock_guard<std::mutex> lock(mu_);
  return {records_.begin(), records_.end()};
}

Status OperationTable::request_cancel(const std::string& id) {
  std::lock_guard<std::mutex> lock(mu_);
  OperationRecord* r = find_locked(id);
  if (!r) return not_found("operation '" + capped(id) + "' not found");
  if (is_finished(r->state)) {
    return Status(ErrorCode::kConflict,
                  "operation " + r->id + " has already finished (" + operation_state_name(r->state) + ")");
  }
  r->cancel_requested = true;
  return Status::ok();
}

bool OperationTable::cancel_requested(const std::string& id) const {
  std::lock_guard<std::mutex> lock(mu_);
  const OperationRecord* r = find_locked(id);
  return r && r->cancel_requested;
}

std::optional<std::string> OperationTable::busy_with(ContextId context_id, bool queries_too) const {
  std::lock_guard<std::mutex> lock(mu_);
  for (const OperationRecord& r : records_) {
    if (r.context_id != context_id || is_finished(r.state)) continue;
    if (queries_too && !refuses_queries(r.kind)) continue;
    return r.id;
  }
  return std::nullopt;
}

Status OperationTable::check_not_busy(ContextId context_id, bool queries_too) const {
  const std::optional<std::string> op = busy_with(context_id, queries_too);
  if (!op) return Status::ok();
  const std::optional<OperationRecord> r = get(*op);
  const char* kind = r ? operation_kind_name(r->kind) : "operation";
  return Status(ErrorCode::kConflict, "context " + std::to_string(context_id) + " is busy with " + kind +
                                          " operation " + *op + " (GET /v1/operations/" + *op + ")");
}

std::map<std::pair<OperationKind, OperationState>, int64_t> OperationTable::unfinished() const {
  std::lock_guard<std::mutex> lock(mu_);
  std::map<std::pair<OperationKind, OperationState>, int64_t> out;
  for (const OperationRecord& r : records_) {
    if (!is_finished(r.state)) ++out[{r.kind, r.state}];
  }
  return out;
}

void OperationTable::set_running(const std::string& id) {
  std::lock_guard<std::mutex> lock(mu_);
  if (OperationRecord* r = find_locked(id)) {
    r->state = OperationState::kRunning;
    r->started = std::chrono::system_clock::now();
  }
}

void OperationTable::set_context(const std::string& id, ContextId context_id) {
  std::lock_guard<std::mutex> lock(mu_);
  if (OperationRecord* r = find_locked(id)) r->context_id = context_id;
}

namespace {

void update_rate(OperationRecord& r, std::chrono::system_clock::time_point now) {
  const double seconds = std::chrono::duration<double>(now - r.started).count();
  r.bytes_per_s = seconds > 0 ? static_cast<double>(r.progress.bytes_done) / seconds : 0;
}

}  // namespace

void OperationTable::set_progress(const std::string& id, const OperationProgress& progress) {
  std::lock_guard<std::mutex> lock(mu_);
  if (OperationRecord* r = find_locked(id)) {
    r->progress = progress;
    update_rate(*r, std::chrono::system_clock::now());
  }
}

void OperationTable::finish(const std::string& id, OperationState state, const std::string& error) {
  std::lock_guard<std::mutex> lock(mu_);
  OperationRecord* r = find_locked(id);
  if (!r || is_finished(r->state)) return;
  const auto now = std::chrono::system_clock::now();
  if (r->state == OperationState::kQueued) r->started = now;
  r->state = state;
  r->finished = now;
  r->error = capped(error, kErrorBytes);
  update_rate(*r, now);
  drop_old_locked();
}

void OperationTable::drop_old_locked() {
  size_t finished = 0;
  for (const OperationRecord& r : records_) finished += is_finished(r.state) ? 1 : 0;
  for (auto it = records_.begin(); finished > kKeptFinished && it != records_.end();) {
    if (is_finished(it->state)) {
      it = records_.erase(it);
      --finished;
    } else {
      ++it;
    }
  }
}

}  // namespace reattn
