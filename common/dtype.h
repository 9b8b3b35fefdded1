// Element types of tensors that cross the API (safetensors) and of KV storage, and the
// exact conversions between them and fp32.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>

#include "common/status.h"

namespace reattn {

enum class DType { kF32, kF16, kBF16 };

// "F32", "F16", "BF16" (the safetensors spelling).
const char* dtype_name(DType dtype);
// Accepts the safetensors spelling, and the lower-case config spelling ("bf16").
Expected<DType> parse_dtype(const std::string& name);
inline size_t dtype_size(DType dtype) { return dtype == DType::kF32 ? 4 : 2; }

inline float bf16_to_float(uint16_t bits) {
  uint32_t u = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Round to nearest even; NaN stays NaN.
inline uint16_t float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

float f16_to_float(uint16_t bits);
uint16_t float_to_f16(float f);

// Converts `count` elements of `dtype` at `src` (any alignment, little-endian) to fp32.
void convert_to_f32(DType dtype, const void* src, size_t count, float* dst);
// Converts `count` fp32 values to `dtype` at `dst`.
void convert_from_f32(DType dtype, const float* src, size_t count, void* dst);
// Converts `count` elements from one dtype to another; a plain copy when they are the same.
void convert(DType from, const void* src, size_t count, DType to, void* dst);

}  // namespace reattn
