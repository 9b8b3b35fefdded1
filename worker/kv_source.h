// Where appended K/V come from: a safetensors file or body, or the synthetic generator.
// A source is read per (layer, KV head, token range), so each rank reads only the blocks it
// holds.
#pragma once

#include <cstdint>
#include <limits>

#include "common/safetensors.h"
#include "common/synthetic.h"

namespace reattn {

class KvSource {
 public:
  virtual ~KvSource() = default;
  // Tokens this append adds.
  virtual int64_t tokens() const = 0;
  // K and V of tokens [offset, offset + count) of the append, [count, D] fp32 each. Called
  // from several threads at once: implementations keep no mutable state.
  virtual void read(int layer, int kv_head, int64_t offset, int64_t count, float* k, float* v) const = 0;
};

// `k` and `v` of a safetensors file: [layers, Hkv, tokens, D] each, F32/F16/BF16.
class SafetensorsKvSource final : public KvSource {
 public:
  // Checks names, dtypes, shapes against the model, and that every value is finite and at
  // most `max_abs` in magnitude (Config::max_stored_value).
  static Expected<SafetensorsKvSource> make(const SafetensorsFile& file, const ModelConfig& model,
                                            float max_abs = std::numeric_limits<float>::max());
  int64_t tokens() const override { return tokens_; }
  void read(int layer, int kv_head, int64_t offset, int64_t count, float* k, float* v) const override;

 private:
  TensorView k_;
  TensorView v_;
  int64_t tokens_ = 0;
  int kv_heads_ = 0;
  int head_dim_ = 0;
};

// Tokens [first_token, first_token + count) of a synthetic context.
class SyntheticKvSource final : public KvSource {
 public:
  SyntheticKvSource(SyntheticSpec spec, ModelConfig model, int64_t first_token, int64_t count)
      : spec_(std::move(spec)), model_(model), first_token_(first_token), count_(count) {}
  int64_t tokens() const override { return count_; }
  void read(int layer, int kv_head, int64_t offset, int64_t count, float* k, float* v) const override;

 private:
  SyntheticSpec spec_;
  ModelConfig model_;
  int64_t first_token_;
  int64_t count_;
};

// Checks that every value of a tensor is finite and at most `max_abs` in magnitude, naming
// the tensor and the first bad index.
Status check_finite(const TensorView& tensor, float max_abs = std::numeric_limits<float>::max());

}  // namespace reattn
