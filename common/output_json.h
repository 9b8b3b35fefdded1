// A query's output [qlen, H, D] (fp32, row-major) as nested JSON arrays [qlen][H][D], the form
// both reattn-run and the HTTP API return.
#pragma once

#include <cstdint>
#include <vector>

namespace reattn {

template <typename Json>
Json nested_output(const std::vector<float>& out, int64_t qlen, int64_t heads, int64_t dim) {
  Json rows = Json::array();
  for (int64_t i = 0; i < qlen; ++i) {
    Json row = Json::array();
    for (int64_t h = 0; h < heads; ++h) {
      const float* v = out.data() + (i * heads + h) * dim;
      row.push_back(std::vector<float>(v, v + dim));
    }
    rows.push_back(std::move(row));
  }
  return rows;
}

}  // namespace reattn
