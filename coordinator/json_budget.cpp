#include "coordinator/json_budget.h"

#include <nlohmann/json.hpp>

#include "common/excerpt.h"

namespace reattn {
namespace {

// Counts values and depth; stops the parse at the first limit crossed.
class Counter {
 public:
  explicit Counter(const JsonBudget& budget) : budget_(budget) {}

  bool null() { return value(); }
  bool boolean(bool) { return value(); }
  bool number_integer(int64_t) { return value(); }
  bool number_unsigned(uint64_t) { return value(); }
  bool number_float(double, const std::string&) { return value(); }
  bool string(std::string&) { return value(); }
  bool binary(nlohmann::json::binary_t&) { return value(); }
  bool key(std::string&) { return value(); }
  bool start_object(size_t) { return open(); }
  bool start_array(size_t) { return open(); }
  bool end_object() { return close(); }
  bool end_array() { return close(); }
  bool parse_error(size_t position, const std::string&, const nlohmann::detail::exception& e) {
    problem_ = "body is not valid JSON (at byte " + std::to_string(position) + "): " + capped(e.what());
    return false;
  }

  const std::string& problem() const { return problem_; }

 private:
  bool value() {
    if (++values_ <= budget_.max_values) return true;
    problem_ = "body holds more than " + std::to_string(budget_.max_values) +
               " JSON values, more than this route can need for this model";
    return false;
  }
  bool open() {
    if (++depth_ > budget_.max_depth) {
      problem_ = "body is nested deeper than " + std::to_string(budget_.max_depth) + " levels";
      return false;
    }
    return value();
  }
  bool close() {
    --depth_;
    return true;
  }

  const JsonBudget& budget_;
  uint64_t values_ = 0;
  int depth_ = 0;
  std::string problem_;
};

}  // namespace

JsonBudget json_budget(Route route, const Config& config) {
  JsonBudget b;
  // Room for the fixed keys of each body next to its arrays.
  constexpr uint64_t kKeys = 64;
  switch (route) {
    case Route::kCreateContext:
    case Route::kLoad:
    case Route::kSnapshotContext: b.max_values = kKeys; break;
    case Route::kSynthetic: b.max_values = kKeys + (uint64_t{1} << 20); break;  // needles: one per token at most
    case Route::kQuery: {
      const ModelConfig& m = config.model;
      const uint64_t rows = static_cast<uint64_t>(config.reattention.local_window);
      // q [qlen <= local_window][q_heads][head_dim]: numbers plus one array per row and head.
      b.max_values = kKeys + rows * static_cast<uint64_t>(m.q_heads) * (static_cast<uint64_t>(m.head_dim) + 1) + rows;
      break;
    }
    case Route::kLayerStep: {
      // q [qlen][q_heads][head_dim] and k, v with kv_heads each, qlen <= local_window.
      const ModelConfig& m = config.model;
      const uint64_t rows = static_cast<uint64_t>(config.reattention.local_window);
      const uint64_t heads = static_cast<uint64_t>(m.q_heads) + 2 * static_cast<uint64_t>(m.kv_heads);
      b.max_values = kKeys + rows * heads * (static_cast<uint64_t>(m.head_dim) + 1) + 3 * rows + 3 * 64;
      break;
    }
    default: b.max_values = 0; break;
  }
  return b;
}

Status check_json_budget(const std::string& body, const JsonBudget& budget) {
  Counter counter(budget);
  const bool ok = nlohmann::json::sax_parse(body, &counter, nlohmann::json::input_format_t::json, false);
  if (ok) return Status::ok();
  return invalid_argument(counter.problem().empty() ? "body is not valid JSON" : counter.problem());
}

}  // namespace reattn

namespace reattn {

Status check_json_body(Route route, const HttpRequest& request, const Config& config) {
  if (request.body.empty() || request.content_type.find("json") == std::string::npos) return Status::ok();
  const JsonBudget budget = json_budget(route, config);
  if (budget.max_values == 0) return Status::ok();
  return check_json_budget(request.body, budget);
}

}  // namespace reattn
