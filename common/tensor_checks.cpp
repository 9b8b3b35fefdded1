#include "common/tensor_checks.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "common/excerpt.h"

namespace reattn {
namespace {

float decode_f32(const unsigned char* p) {
  float x;
  std::memcpy(&x, p, 4);
  return x;
}
float decode_bf16(const unsigned char* p) {
  uint16_t b;
  std::memcpy(&b, p, 2);
  return bf16_to_float(b);
}
float decode_f16(const unsigned char* p) {
  uint16_t b;
  std::memcpy(&b, p, 2);
  return f16_to_float(b);
}

// The largest magnitude (the value's bits without the sign) that is finite and <= max_abs, in
// each encoding: finite values order like their magnitude bits, and Inf and NaN lie above all.
uint32_t f32_limit(float max_abs) {
  const float limit = std::fmin(max_abs, std::numeric_limits<float>::max());
  uint32_t bits;
  std::memcpy(&bits, &limit, 4);
  return bits & 0x7FFFFFFFu;
}
uint16_t bf16_limit(float max_abs) { return static_cast<uint16_t>(f32_limit(max_abs) >> 16); }
uint16_t f16_limit(float max_abs) {
  uint16_t lo = 0, hi = 0x7BFF;  // 0x7BFF: the largest finite f16 (65504)
  if (f16_to_float(hi) <= max_abs) return hi;
  while (lo + 1 < hi) {  // invariant: f16(lo) <= max_abs < f16(hi)
    const uint16_t mid = static_cast<uint16_t>((lo + hi) / 2);
    (f16_to_float(mid) <= max_abs ? lo : hi) = mid;
  }
  return lo;
}

// The first index in [0, count) whose magnitude bits are above `limit` (not storable), or -1;
// `bad` gets its value. A block at a time, branch-free (the scan vectorizes: a decode step's
// q, k and v are checked on the request's path); the index is searched only in a failing block.
template <typename Bits, float (*Decode)(const unsigned char*)>
int64_t first_unstorable(const unsigned char* data, int64_t count, Bits limit, float* bad) {
  constexpr Bits kMagnitude = std::numeric_limits<Bits>::max() >> 1;  // all bits but the sign
  constexpr int64_t kBlock = 256;
  const auto magnitude = [&](int64_t i) {
    Bits x;
    std::memcpy(&x, data + i * sizeof(Bits), sizeof(Bits));
    return static_cast<Bits>(x & kMagnitude);
  };
  for (int64_t first = 0; first < count; first += kBlock) {
    const int64_t end = std::min(count, first + kBlock);
    Bits largest = 0;
    for (int64_t i = first; i < end; ++i) largest = std::max(largest, magnitude(i));
    if (largest <= limit) continue;
    for (int64_t i = first; i < end; ++i) {
      if (magnitude(i) > limit) {
        *bad = Decode(data + i * sizeof(Bits));
        return i;
      }
    }
  }
  return -1;
}

// Strict protocol: a K/V body holds exactly 'k' and 'v', in one dtype.
Status check_kv_tensor_set(const SafetensorsFile& file, const TensorView& k, const TensorView& v) {
  REATTN_RETURN_IF_ERROR(check_tensor_names(file, {"k", "v"}, "a K/V body"));
  if (k.dtype != v.dtype) {
    return invalid_argument(std::string("tensors 'k' (") + dtype_name(k.dtype) + ") and 'v' (" + dtype_name(v.dtype) +
                            ") differ in dtype; send both in one dtype");
  }
  return Status::ok();
}

}  // namespace

Status check_tensor_names(const SafetensorsFile& file, std::initializer_list<const char*> names, const char* what) {
  std::string list;
  for (const char* n : names) list += std::string(list.empty() ? "'" : ", '") + n + "'";
  for (const std::string& name : file.names()) {
    bool known = false;
    for (const char* n : names) known = known || name == n;
    if (!known) return invalid_argument("unexpected tensor '" + capped(name) + "': " + what + " holds exactly " + list);
  }
  return Status::ok();
}

std::string shape_string(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

Status check_shape(const TensorView& tensor, std::initializer_list<Dim> dims) {
  bool fits = tensor.shape.size() == dims.size();
  std::string want = "[";
  size_t i = 0;
  for (const Dim& d : dims) {
    want += std::string(i ? ", " : "") + d.name;
    if (d.size >= 0) want += "=" + std::to_string(d.size);
    if (fits && d.size >= 0) fits = tensor.shape[i] == d.size;
    ++i;
  }
  if (fits) return Status::ok();
  return invalid_argument("tensor '" + tensor.name + "': shape " + shape_string(tensor.shape) + " does not match " +
                          want + "]");
}

Status check_storable(const TensorView& tensor, float max_abs) {
  const int64_t n = tensor.numel();
  float bad = 0;
  int64_t at = -1;
  switch (tensor.dtype) {
    case DType::kF32: at = first_unstorable<uint32_t, decode_f32>(tensor.data, n, f32_limit(max_abs), &bad); break;
    case DType::kBF16: at = first_unstorable<uint16_t, decode_bf16>(tensor.data, n, bf16_limit(max_abs), &bad); break;
    case DType::kF16: at = first_unstorable<uint16_t, decode_f16>(tensor.data, n, f16_limit(max_abs), &bad); break;
  }
  if (at < 0) return Status::ok();
  if (!std::isfinite(bad)) {
    return invalid_argument("tensor '" + tensor.name + "' holds a non-finite value (" + std::to_string(bad) +
                            ") at flat index " + std::to_string(at));
  }
  return invalid_argument("tensor '" + tensor.name + "' holds " + std::to_string(bad) + " at flat index " +
                          std::to_string(at) + ", above " + stored_value_limit(max_abs));
}

std::string stored_value_limit(float max_abs) {
  if (max_abs == 65504.0f) return "the f16 storage limit 65504";
  int exponent = 0;
  const float mantissa = std::frexp(max_abs, &exponent);
  const std::string value = std::to_string(static_cast<long long>(std::min(max_abs, 9.2e18f)));
  if (mantissa != 0.5f) return "the limit " + value;
  return "the limit 2^" + std::to_string(exponent - 1) + " = " + value + " that keeps q.k finite in fp32";
}

Expected<KvTensors> kv_tensors(const SafetensorsFile& file, const ModelConfig& model) {
  KvTensors kv;
  REATTN_ASSIGN_OR_RETURN(kv.k, file.get("k"));
  REATTN_ASSIGN_OR_RETURN(kv.v, file.get("v"));
  REATTN_RETURN_IF_ERROR(check_kv_tensor_set(file, kv.k, kv.v));
  for (const TensorView* t : {&kv.k, &kv.v}) {
    REATTN_RETURN_IF_ERROR(
        check_shape(*t, {{"layers", model.layers}, {"kv_heads", model.kv_heads}, {"tokens"}, {"head_dim", model.head_dim}}));
  }
  if (kv.k.shape != kv.v.shape) {
    return invalid_argument("tensors 'k' " + shape_string(kv.k.shape) + " and 'v' " + shape_string(kv.v.shape) +
                            " differ in shape");
  }
  if (kv.k.shape[2] < 1) return invalid_argument("tensor 'k': holds no tokens");
  kv.tokens = kv.k.shape[2];
  return kv;
}

}  // namespace reattn
