#include "common/dtype.h"

#include <algorithm>
#include <cmath>

namespace reattn {

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::kF32: return "F32";
    case DType::kF16: return "F16";
    case DType::kBF16: return "BF16";
  }
  return "?";
}

Expected<DType> parse_dtype(const std::string& name) {
  if (name == "F32" || name == "f32" || name == "float32") return DType::kF32;
  if (name == "F16" || name == "f16" || name == "float16") return DType::kF16;
  if (name == "BF16" || name == "bf16" || name == "bfloat16") return DType::kBF16;
  return invalid_argument("unknown dtype '" + name + "' (expected F32, F16 or BF16)");
}

float f16_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t mant = h & 0x3ffu;
  float magnitude;
  if (exp == 0) {
    magnitude = std::ldexp(static_cast<float>(mant), -24);
  } else if (exp == 31) {
    magnitude = mant == 0 ? INFINITY : NAN;
  } else {
    magnitude = std::ldexp(static_cast<float>(mant | 0x400u), static_cast<int>(exp) - 25);
  }
  uint32_t u;
  std::memcpy(&u, &magnitude, 4);
  u |= sign;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

uint16_t float_to_f16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const float a = std::fabs(f);
  if (std::isnan(f)) return sign | 0x7e00u;
  if (a >= 65520.0f) return sign | 0x7c00u;  // rounds to infinity
  if (a < std::ldexp(1.0f, -14)) {
    // Subnormal: value = mant * 2^-24, rounded to nearest even.
    const float scaled = a * 16777216.0f;  // 2^24
    return sign | static_cast<uint16_t>(std::nearbyint(scaled));
  }
  int e;
  const float m = std::frexp(a, &e);  // a = m * 2^e, m in [0.5, 1)
  // 11 significant bits: mantissa in [1024, 2048).
  float scaled = std::nearbyint(m * 2048.0f);
  if (scaled >= 2048.0f) {
    scaled = 1024.0f;
    ++e;
  }
  const int exp = e - 1 + 15;
  if (exp >= 31) return sign | 0x7c00u;
  return sign | static_cast<uint16_t>((exp << 10) | (static_cast<uint32_t>(scaled) - 1024u));
}

void convert_to_f32(DType dtype, const void* src, size_t count, float* dst) {
  const auto* bytes = static_cast<const unsigned char*>(src);
  // memcpy with a null pointer is undefined even for 0 bytes, and empty vectors have null data().
  if (dtype == DType::kF32) {
    if (count > 0) std::memcpy(dst, bytes, count * 4);
    return;
  }
  for (size_t i = 0; i < count; ++i) {
    uint16_t bits;
    std::memcpy(&bits, bytes + 2 * i, 2);
    dst[i] = dtype == DType::kBF16 ? bf16_to_float(bits) : f16_to_float(bits);
  }
}

void convert_from_f32(DType dtype, const float* src, size_t count, void* dst) {
  auto* bytes = static_cast<unsigned char*>(dst);
  if (dtype == DType::kF32) {
    if (count > 0) std::memcpy(bytes, src, count * 4);
    return;
  }
  for (size_t i = 0; i < count; ++i) {
    const uint16_t bits = dtype == DType::kBF16 ? float_to_bf16(src[i]) : float_to_f16(src[i]);
    std::memcpy(bytes + 2 * i, &bits, 2);
  }
}

void convert(DType from, const void* src, size_t count, DType to, void* dst) {
  if (from == to) {
    if (count > 0) std::memcpy(dst, src, count * dtype_size(from));
    return;
  }
  if (from == DType::kF32) return convert_from_f32(to, static_cast<const float*>(src), count, dst);
  if (to == DType::kF32) return convert_to_f32(from, src, count, static_cast<float*>(dst));
  // f16 <-> bf16 through fp32, a piece at a time.
  constexpr size_t kPiece = 4096;
  float buf[kPiece];
  for (size_t done = 0; done < count; done += kPiece) {
    const size_t n = std::min(kPiece, count - done);
    convert_to_f32(from, static_cast<const unsigned char*>(src) + done * 2, n, buf);
    convert_from_f32(to, buf, n, static_cast<unsigned char*>(dst) + done * 2);
  }
}

}  // namespace reattn
