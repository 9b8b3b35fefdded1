// Checks of tensors that arrive from users (HTTP bodies, files): shapes against the model,
// and whether every value can be stored (finite, and within the f16 limit when the KV cache
// is stored as f16). Each error names the tensor, and the index or dimension that is wrong.
// Thread-safe (no state).
#pragma once

#include <cstdint>
#include <initializer_list>
#include <limits>
#include <string>
#include <vector>

#include "common/config.h"
#include "common/safetensors.h"

namespace reattn {

// One dimension of an expected shape: `size` < 0 takes any size (e.g. "qlen").
struct Dim {
  const char* name;
  int64_t size = -1;
};

// "[2, 4, 16]"
std::string shape_string(const std::vector<int64_t>& shape);

// InvalidArgument naming the first tensor of `file` that is not one of `names` (the strict
// protocol: no extra tensors), e.g. check_tensor_names(file, {"q"}, "a query body").
Status check_tensor_names(const SafetensorsFile& file, std::initializer_list<const char*> names, const char* what);

// InvalidArgument unless `tensor` has exactly these dimensions:
// "tensor 'q': shape [2, 3, 16] does not match [qlen, q_heads=4, head_dim=16]".
Status check_shape(const TensorView& tensor, std::initializer_list<Dim> dims);

// InvalidArgument unless every value is finite and at most `max_abs` in magnitude
// (Config::max_stored_value), naming the tensor and the first bad flat index. One pass.
Status check_storable(const TensorView& tensor, float max_abs = std::numeric_limits<float>::max());

// What the limit `max_abs` (Config::max_stored_value) is, for error messages:
// "the f16 storage limit 65504", "the limit 2^60 = 1152921504606846976 that keeps q.k finite in fp32".
std::string stored_value_limit(float max_abs);

// k and v of an appended K/V body, each [layers, Hkv, tokens, D] (shapes checked, values not).
struct KvTensors {
  TensorView k;
  TensorView v;
  int64_t tokens = 0;
};
Expected<KvTensors> kv_tensors(const SafetensorsFile& file, const ModelConfig& model);

}  // namespace reattn
