#include "coordinator/logging.h"

#include <spdlog/sinks/stdout_sinks.h>
#include <spdlog/spdlog.h>

#include <memory>

namespace reattn {

void init_logging(int rank, const std::string& level) {
  auto logger = spdlog::stderr_logger_mt("reattn");
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

}  // namespace reattn
