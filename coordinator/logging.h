// JSON-lines logs (spdlog): one object per line on stderr,
//   {"ts":"2026-11-21T23:05:01.123456Z","level":"info","rank":0,"msg":"...", ...fields}
// Requests carry "request_id". Secrets (the API key) are never passed here.
// Logging never blocks the caller: lines go to a bounded queue that one background thread
// writes to stderr; when the queue is full (stderr slow, or a pipe nobody reads) the oldest
// line is dropped and counted (dropped_log_lines, the metric reattn_log_lines_dropped_total).
// Thread-safety: init_logging once at start-up, before other threads; the rest from any thread.
#pragma once

#include <cstdint>
#include <string>

#include <nlohmann/json.hpp>

namespace reattn {

enum class LogLevel { kDebug, kInfo, kWarn, kError };

// Lines the queue holds before it drops the oldest.
constexpr size_t kLogQueueLines = 8192;

// Sets up the process-wide logger for this rank. `level`: "debug", "info", "warn", "error".
void init_logging(int rank, const std::string& level = "info");

// `fields` (a JSON object) are added next to "msg".
void log_event(LogLevel level, const std::string& msg, const nlohmann::json& fields = nlohmann::json::object());

// Lines dropped since start-up because the queue was full.
uint64_t dropped_log_lines();

// Waits up to `max_seconds` for the queued lines to be written (before the process ends).
void flush_logs(double max_seconds);

}  // namespace reattn
