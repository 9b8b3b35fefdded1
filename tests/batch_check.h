// The check shared by the multi-rank batch tests: a step of many queries gives exactly what
// each query gives alone.
#pragma once

#include <vector>

#include "tests/harness.h"

namespace reattn::test {

// For both final-attention strategies and each of `device_select_rows`, runs `queries` as one
// step and each as a step of its own (every rank calls it). On rank 0 it expects query i to be
// ok exactly when want_ok[i], and every ok query to give the same recalled chunks, spans and
// output in the batch as alone, and to match the fp64 reference (outputs within 1e-5).
void expect_batch_matches_alone(Backend& backend, Communicator& comm, const Config& config,
                                const std::vector<BatchContext>& contexts, const std::vector<BatchQuery>& queries,
                                const std::vector<bool>& want_ok, const std::vector<int64_t>& device_select_rows);

}  // namespace reattn::test
