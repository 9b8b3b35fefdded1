// Inputs of the one-shot driver: K/V and q from safetensors files, or a synthetic context.
#pragma once

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "common/synthetic.h"
#include "worker/kv_source.h"

namespace reattn {

struct RunInputs {
  std::unique_ptr<KvSource> kv;
  std::vector<float> q;             // [qlen, H, D]
  int64_t qlen = 0;
  std::optional<SyntheticSpec> synthetic;
};

// --kv K/V file ([layers, Hkv, tokens, D] each) and --q file ([qlen, H, D]).
// Values above max_abs in magnitude are refused (Config::max_stored_value).
Expected<RunInputs> load_file_inputs(const std::string& kv_path, const std::string& q_path, const ModelConfig& model,
                                     float max_abs);
// --synthetic-tokens with --seed and --needles; q from the same generator.
Expected<RunInputs> make_synthetic_inputs(int64_t tokens, uint64_t seed, const std::vector<int64_t>& needles,
                                          int64_t qlen, int layer, const ModelConfig& model);

}  // namespace reattn
