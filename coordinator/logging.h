// JSON-lines logs (spdlog): one object per line on stderr,
//   {"ts":"2026-11-21T23:05:01.123456Z","level":"info","rank":0,"msg":"...", ...fields}
// Requests carry "request_id". Secrets (the API key) are never passed here.
// Thread-safety: init_logging once at start-up, before other threads; log_event from any thread.
#pragma once

#include <string>

#include <nlohmann/json.hpp>

namespace reattn {

enum class LogLevel { kDebug, kInfo, kWarn, kError };

// Sets up the process-wide logger for this rank. `level`: "debug", "info", "warn", "error".
void init_logging(int rank, const std::string& level = "info");

// `fields` (a JSON object) are added next to "msg".
void log_event(LogLevel level, const std::string& msg, const nlohmann::json& fields = nlohmann::json::object());

}  // namespace reattn
