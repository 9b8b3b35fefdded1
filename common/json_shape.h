// Bounds on a JSON text's shape, checked in one constant-memory SAX pass before a DOM is
// built: a DOM costs tens of bytes per value (100 MiB of "[" would take ~8 GB), so a header or
// manifest read from a client or from disk is refused first if it nests too deep or holds too
// many values. Thread-safe (no state).
#pragma once

#include <cstdint>
#include <string>

namespace reattn {

struct JsonShapeLimits {
  int max_depth = 16;
  uint64_t max_values = uint64_t{8} << 20;
};

// "" when `text` stays within `limits` (or is not JSON at all: the parser reports that), else
// why not: "nests deeper than 16 levels", "holds more than 8388608 JSON values".
std::string json_shape_problem(const char* begin, const char* end, const JsonShapeLimits& limits = {});

}  // namespace reattn
