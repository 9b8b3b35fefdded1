#include "common/json_shape.h"

#include <nlohmann/json.hpp>

#include "common/excerpt.h"

namespace reattn {
namespace {

// Counts values and depth; stops the parse at the first bound crossed.
class Counter final : public nlohmann::json_sax<nlohmann::json> {
 public:
  explicit Counter(const JsonShapeLimits& limits) : limits_(limits) {}
  JsonShape shape;
  bool null() override { return value(); }
  bool boolean(bool) override { return value(); }
  bool number_integer(number_integer_t) override { return value(); }
  bool number_unsigned(number_unsigned_t) override { return value(); }
  bool number_float(number_float_t, const string_t&) override { return value(); }
  bool string(string_t&) override { return value(); }
  bool binary(binary_t&) override { return value(); }
  bool start_object(std::size_t) override { return open(); }
  bool key(string_t&) override { return value(); }
  bool end_object() override { return close(); }
  bool start_array(std::size_t) override { return open(); }
  bool end_array() override { return close(); }
  bool parse_error(std::size_t position, const std::string&, const nlohmann::detail::exception& e) override {
    shape.problem = JsonShape::Problem::kSyntax;
    shape.syntax_at = position;
    shape.syntax_error = capped(e.what());
    return false;
  }

 private:
  bool value() {
    if (++values_ <= limits_.max_values) return true;
    shape.problem = JsonShape::Problem::kTooManyValues;
    return false;
  }
  bool open() {
    if (++depth_ > limits_.max_depth) {
      shape.problem = JsonShape::Problem::kTooDeep;
      return false;
    }
    return value();
  }
  bool close() {
    --depth_;
    return true;
  }
  JsonShapeLimits limits_;
  int depth_ = 0;
  uint64_t values_ = 0;
};

}  // namespace

JsonShape check_json_shape(const char* begin, const char* end, const JsonShapeLimits& limits) {
  Counter counter(limits);
  nlohmann::json::sax_parse(begin, end, &counter, nlohmann::json::input_format_t::json, false);
  return counter.shape;
}

std::string json_shape_refusal(const JsonShape& shape, const JsonShapeLimits& limits) {
  switch (shape.problem) {
    case JsonShape::Problem::kTooDeep: return "nests deeper than " + std::to_string(limits.max_depth) + " levels";
    case JsonShape::Problem::kTooManyValues:
      return "holds more than " + std::to_string(limits.max_values) + " JSON values";
    default: return "";
  }
}

}  // namespace reattn
