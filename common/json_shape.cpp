#include "common/json_shape.h"

#include <nlohmann/json.hpp>

namespace reattn {
namespace {

// Stops at the first value past either bound (then `why` says which).
class Shape final : public nlohmann::json_sax<nlohmann::json> {
 public:
  explicit Shape(const JsonShapeLimits& limits) : limits_(limits) {}
  std::string why;
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
  bool parse_error(std::size_t, const std::string&, const nlohmann::detail::exception&) override { return false; }

 private:
  bool value() {
    if (++values_ <= limits_.max_values) return true;
    why = "holds more than " + std::to_string(limits_.max_values) + " JSON values";
    return false;
  }
  bool open() {
    if (++depth_ > limits_.max_depth) {
      why = "nests deeper than " + std::to_string(limits_.max_depth) + " levels";
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

std::string json_shape_problem(const char* begin, const char* end, const JsonShapeLimits& limits) {
  Shape shape(limits);
  nlohmann::json::sax_parse(begin, end, &shape, nlohmann::json::input_format_t::json, false);
  return shape.why;
}

}  // namespace reattn
