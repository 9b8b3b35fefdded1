#include "common/synthetic.h"

#include <algorithm>
#include <cmath>
#include <string>

#include "common/dtype.h"

namespace reattn {
namespace {

enum Stream : uint64_t { kKey = 1, kValue = 2, kQuery = 3, kDirection = 4 };

uint64_t mix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

uint64_t key_of(uint64_t seed, uint64_t stream, uint64_t layer, uint64_t head, uint64_t token) {
  uint64_t h = mix(seed ^ (stream << 56));
  h = mix(h ^ layer);
  h = mix(h ^ head);
  return mix(h ^ token);
}

// Uniform on [-2, 2) in steps of 1/32: 7 significant bits, so bf16, f16 and fp32 storage
// all hold exactly the same values.
float uniform_unit(uint64_t key, int d) {
  const uint64_t bits = mix(key + static_cast<uint64_t>(d) * 0x632be59bd9b4e019ull);
  const int q = static_cast<int>(bits >> 57) - 64;  // [-64, 64)
  return static_cast<float>(q) * (1.0f / 32.0f);
}

// Rounds to bf16 and flushes magnitudes below f16's smallest normal (2^-14) to zero: the
// result is exact in bf16, f16 and fp32.
float storage_exact(float x) {
  const float b = bf16_to_float(float_to_bf16(x));
  return std::fabs(b) < 6.103515625e-05f ? 0.0f : b;
}

}  // namespace

Status validate_needles(const std::vector<int64_t>& needles, int64_t tokens) {
  for (size_t i = 0; i < needles.size(); ++i) {
    if (needles[i] < 0 || needles[i] >= tokens) {
      return invalid_argument("needles[" + std::to_string(i) + "]: token " + std::to_string(needles[i]) +
                              " is outside the context's " + std::to_string(tokens) + " tokens");
    }
  }
  return Status::ok();
}

std::vector<float> needle_direction(uint64_t seed, const ModelConfig& model, int layer, int kv_head) {
  const uint64_t key = key_of(seed, kDirection, layer, kv_head, 0);
  std::vector<float> dir(model.head_dim);
  double norm = 0.0;
  for (int d = 0; d < model.head_dim; ++d) {
    dir[d] = uniform_unit(key, d);
    norm += static_cast<double>(dir[d]) * dir[d];
  }
  const double inv = norm > 0.0 ? 1.0 / std::sqrt(norm) : 0.0;
  for (float& x : dir) x = static_cast<float>(x * inv);
  return dir;
}

void synthetic_kv(const SyntheticSpec& spec, const ModelConfig& model, int layer, int kv_head,
                  int64_t token, float* k, float* v) {
  const int dim = model.head_dim;
  const uint64_t kkey = key_of(spec.seed, kKey, layer, kv_head, token);
  const uint64_t vkey = key_of(spec.seed, kValue, layer, kv_head, token);
  for (int d = 0; d < dim; ++d) {
    k[d] = uniform_unit(kkey, d);
    v[d] = uniform_unit(vkey, d);
  }
  const auto it = std::find(spec.needles.begin(), spec.needles.end(), token);
  if (it == spec.needles.end()) return;
  const double strength = 2.0 * std::sqrt(static_cast<double>(dim)) *
                          (1.0 + 0.05 * static_cast<double>(it - spec.needles.begin()));
  const std::vector<float> dir = needle_direction(spec.seed, model, layer, kv_head);
  for (int d = 0; d < dim; ++d) k[d] = storage_exact(static_cast<float>(strength * dir[d]));
}

std::vector<float> synthetic_query(const SyntheticSpec& spec, const ModelConfig& model, int layer,
                                   int64_t qlen) {
  const int dim = model.head_dim;
  const float scale = std::sqrt(static_cast<float>(dim));
  std::vector<float> q(static_cast<size_t>(qlen) * model.q_heads * dim);
  for (int g = 0; g < model.kv_heads; ++g) {
    const std::vector<float> dir = needle_direction(spec.seed, model, layer, g);
    for (int64_t i = 0; i < qlen; ++i) {
      for (int h = g * model.group_size(); h < (g + 1) * model.group_size(); ++h) {
        const uint64_t key = key_of(spec.seed, kQuery, layer, h, i);
        float* row = q.data() + (i * model.q_heads + h) * dim;
        for (int d = 0; d < dim; ++d) row[d] = storage_exact(scale * dir[d] + 0.5f * uniform_unit(key, d));
      }
    }
  }
  return q;
}

}  // namespace reattn
