// Bounds on a JSON text's shape, checked in one constant-memory SAX pass before a DOM is
// built: a DOM costs tens of bytes per value (100 MiB of "[" would take ~8 GB), so a request
// body, a safetensors header or a snapshot manifest is refused first if it nests too deep or
// holds too many values. Callers word the refusal for what they read. Thread-safe (no state).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace reattn {

struct JsonShapeLimits {
  int max_depth = 16;
  uint64_t max_values = uint64_t{8} << 20;  // scalars, keys and containers together
};

struct JsonShape {
  enum class Problem { kNone, kTooDeep, kTooManyValues, kSyntax };
  Problem problem = Problem::kNone;
  size_t syntax_at = 0;      // kSyntax: the byte the parser stopped at
  std::string syntax_error;  // kSyntax: the parser's message, capped
};

// The first bound crossed, or the syntax error, scanning `[begin, end)` once.
JsonShape check_json_shape(const char* begin, const char* end, const JsonShapeLimits& limits = {});

// A bound crossed, as a phrase for a file's header or manifest ("nests deeper than 16 levels",
// "holds more than 8388608 JSON values"); "" within bounds or on a syntax error, which the
// parser that follows reports in its own words.
std::string json_shape_refusal(const JsonShape& shape, const JsonShapeLimits& limits = {});

}  // namespace reattn
