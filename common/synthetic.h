// Synthetic contexts for demos, tests and benchmarks: K/V and queries from a counter-based
// generator keyed by (seed, layer, head, token), so any rank can make any block on its own
// and a test can regenerate it. Planted needles give a known answer: a needle token's key
// points along its KV head's query direction, so every query head of that group scores the
// needle's chunk far above the rest.
#pragma once

#include <cstdint>
#include <vector>

#include "common/config.h"

namespace reattn {

struct SyntheticSpec {
  uint64_t seed = 0;
  std::vector<int64_t> needles;  // token positions; needle i is planted with strength 1+0.05*i
};

// Checks needles against a context of `tokens` tokens (each in [0, tokens)), naming the bad one.
Status validate_needles(const std::vector<int64_t>& needles, int64_t tokens);

// K and V of one token of one KV head, [D] each. Values are uniform on [-2, 2) and, like the
// needle keys and queries, exactly representable in bf16 and f16 (so every storage dtype
// holds the same numbers).
void synthetic_kv(const SyntheticSpec& spec, const ModelConfig& model, int layer, int kv_head,
                  int64_t token, float* k, float* v);

// A query block [qlen, H, D]: each head points along its group's needle direction plus noise.
std::vector<float> synthetic_query(const SyntheticSpec& spec, const ModelConfig& model, int layer,
                                   int64_t qlen);

// The unit needle direction of (layer, kv_head), [D].
std::vector<float> needle_direction(uint64_t seed, const ModelConfig& model, int layer, int kv_head);

}  // namespace reattn
