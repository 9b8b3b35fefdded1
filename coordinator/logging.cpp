#include "coordinator/logging.h"

#include <spdlog/async.h>
#include <spdlog/sinks/stdout_sinks.h>
#include <spdlog/spdlog.h>

#include <chrono>
#include <memory>
#include <thread>

namespace reattn {

void init_logging(int rank, const std::string& level) {
  // One writer thread; a full queue drops its oldest line rather than block the caller
  // (an HTTP thread or the step loop).
  spdlog::init_thread_pool(kLogQueueLines, 1);
  auto sink = std::make_shared<spdlog::sinks::stderr_sink_mt>();
  auto logger = std::make_shared<spdlog::async_logger>("reattn", sink, spdlog::thread_pool(),
                                                       spdlog::async_overflow_policy::overrun_oldest);
  // The message part is the rest of a JSON object (see log_event), so every line is one object.
  logger->set_pattern("{\"ts\":\"%Y-%m-%dT%H:%M:%S.%fZ\",\"level\":\"%l\",\"rank\":" + std::to_string(rank) + ",%v}",
                      spdlog::pattern_time_type::utc);
  logger->set_level(spdlog::level::from_str(level));
  logger->flush_on(spdlog::level::trace);
  spdlog::set_default_logger(logger);
}

void log_event(LogLevel level, const std::string& msg, const nlohmann::json& fields) {
  static const spdlog::level::level_enum kLevels[] = {spdlog::level::debug, spdlog::level::info, spdlog::level::warn,
                                                      spdlog::level::err};
  nlohmann::json line = nlohmann::json::object();
  line["msg"] = msg;
  if (fields.is_object()) {
    for (const auto& item : fields.items()) line[item.key()] = item.value();
  }
  const std::string text = line.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  // Strip the braces: the pattern supplies them around ts, level and rank.
  spdlog::log(kLevels[static_cast<int>(level)], "{}", std::string_view(text).substr(1, text.size() - 2));
}

uint64_t dropped_log_lines() {
  const auto pool = spdlog::thread_pool();
  return pool ? pool->overrun_counter() : 0;
}

void flush_logs(double max_seconds) {
  const auto pool = spdlog::thread_pool();
  if (!pool) return;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(max_seconds);
  while (pool->queue_size() > 0 && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
}

}  // namespace reattn
