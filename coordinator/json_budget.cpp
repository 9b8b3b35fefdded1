#include "coordinator/json_budget.h"

#include "common/json_shape.h"

namespace reattn {

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
  const JsonShape shape = check_json_shape(body.data(), body.data() + body.size(), {budget.max_depth, budget.max_values});
  switch (shape.problem) {
    case JsonShape::Problem::kNone: return Status::ok();
    case JsonShape::Problem::kTooDeep:
      return invalid_argument("body is nested deeper than " + std::to_string(budget.max_depth) + " levels");
    case JsonShape::Problem::kTooManyValues:
      return invalid_argument("body holds more than " + std::to_string(budget.max_values) +
                              " JSON values, more than this route can need for this model");
    case JsonShape::Problem::kSyntax:
      return invalid_argument("body is not valid JSON (at byte " + std::to_string(shape.syntax_at) +
                              "): " + shape.syntax_error);
  }
  return invalid_argument("body is not valid JSON");
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
