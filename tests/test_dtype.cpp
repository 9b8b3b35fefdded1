#include "common/dtype.h"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <random>
#include <vector>

namespace reattn {
namespace {

float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Checks that `bits` (decoded by `decode`) is the nearest finite neighbour of x >= 0, with ties
// going to the even pattern; the reference is the two adjacent patterns, not a second rounding.
template <typename Decode>
::testing::AssertionResult is_nearest_even(float x, uint16_t bits, uint16_t max_finite, Decode decode) {
  const double r = decode(bits);
  const double err = std::fabs(static_cast<double>(x) - r);
  for (int step : {-1, 1}) {
    const int other = static_cast<int>(bits) + step;
    if (other < 0 || other > max_finite) continue;
    const double other_err = std::fabs(static_cast<double>(x) - decode(static_cast<uint16_t>(other)));
    if (other_err < err || (other_err == err && (bits & 1u) != 0)) {
      return ::testing::AssertionFailure() << "x=" << x << " rounded to 0x" << std::hex << bits
                                           << " but 0x" << other << " is nearer or even";
    }
  }
  return ::testing::AssertionSuccess();
}

TEST(Bf16, RoundsToNearestEven) {
  EXPECT_EQ(float_to_bf16(1.0f), 0x3f80);
  EXPECT_EQ(float_to_bf16(1.0f + std::ldexp(1.0f, -8)), 0x3f80);      // tie, 1.0 is even
  EXPECT_EQ(float_to_bf16(1.0f + 3 * std::ldexp(1.0f, -8)), 0x3f82);  // tie, up to even
  EXPECT_EQ(float_to_bf16(1.0f + std::ldexp(1.0f, -8) + std::ldexp(1.0f, -20)), 0x3f81);
  EXPECT_EQ(float_to_bf16(-2.0f), 0xc000);
  EXPECT_EQ(float_to_bf16(std::numeric_limits<float>::max()), 0x7f80);  // rounds past the top
  EXPECT_EQ(float_to_bf16(INFINITY), 0x7f80);
  EXPECT_TRUE(std::isnan(bf16_to_float(float_to_bf16(NAN))));
  // A NaN whose payload sits only in the low 16 bits must not truncate to infinity.
  EXPECT_TRUE(std::isnan(bf16_to_float(float_to_bf16(bits_to_float(0x7f800001u)))));

  std::mt19937 rng(7);
  std::uniform_int_distribution<uint32_t> any_finite(0, 0x7f7fffffu);
  const auto decode = [](uint16_t b) { return static_cast<double>(bf16_to_float(b)); };
  for (int i = 0; i < 200000; ++i) {
    const float x = bits_to_float(any_finite(rng));
    const uint16_t b = float_to_bf16(x);
    if (b == 0x7f80) continue;  // overflow past max bf16, checked above
    ASSERT_TRUE(is_nearest_even(x, b, 0x7f7f, decode));
    EXPECT_EQ(float_to_bf16(-x), b | 0x8000);
  }
}

TEST(Bf16, RepresentableValuesRoundTripExactly) {
  for (uint32_t b = 0; b < 65536; ++b) {
    const float f = bf16_to_float(static_cast<uint16_t>(b));
    if (std::isnan(f)) {
      EXPECT_TRUE(std::isnan(bf16_to_float(float_to_bf16(f)))) << b;
    } else {
      ASSERT_EQ(float_to_bf16(f), b) << "bits 0x" << std::hex << b;
    }
  }
}

TEST(F16, DecodesKnownPatterns) {
  EXPECT_EQ(f16_to_float(0x0000), 0.0f);
  EXPECT_TRUE(std::signbit(f16_to_float(0x8000)));
  EXPECT_EQ(f16_to_float(0x0001), std::ldexp(1.0f, -24));  // smallest subnormal
  EXPECT_EQ(f16_to_float(0x03ff), 1023 * std::ldexp(1.0f, -24));
  EXPECT_EQ(f16_to_float(0x0400), std::ldexp(1.0f, -14));  // smallest normal
  EXPECT_EQ(f16_to_float(0x3c00), 1.0f);
  EXPECT_EQ(f16_to_float(0x3c01), 1.0009765625f);
  EXPECT_EQ(f16_to_float(0xc000), -2.0f);
  EXPECT_EQ(f16_to_float(0x7bff), 65504.0f);
  EXPECT_EQ(f16_to_float(0x7c00), INFINITY);
  EXPECT_EQ(f16_to_float(0xfc00), -INFINITY);
  EXPECT_TRUE(std::isnan(f16_to_float(0x7e00)));
  EXPECT_TRUE(std::isnan(f16_to_float(0x7c01)));
}

TEST(F16, AllBitPatternsRoundTrip) {
  for (uint32_t h = 0; h < 65536; ++h) {
    const float f = f16_to_float(static_cast<uint16_t>(h));
    const uint32_t exp = (h >> 10) & 0x1f, mant = h & 0x3ff;
    if (exp == 31 && mant != 0) {
      ASSERT_TRUE(std::isnan(f)) << h;
      ASSERT_TRUE(std::isnan(f16_to_float(float_to_f16(f)))) << h;
      continue;
    }
    // Independent decoding in double: subnormals are mant * 2^-24 exactly.
    const double magnitude = exp == 0    ? std::ldexp(static_cast<double>(mant), -24)
                             : exp == 31 ? INFINITY
                                         : std::ldexp(static_cast<double>(mant | 0x400), exp - 25);
    ASSERT_EQ(static_cast<double>(f), (h & 0x8000) ? -magnitude : magnitude) << "bits 0x" << std::hex << h;
    ASSERT_EQ(float_to_f16(f), h) << "bits 0x" << std::hex << h;
  }
}

TEST(F16, RoundsToNearestEven) {
  const float tiny = std::ldexp(1.0f, -24);
  EXPECT_EQ(float_to_f16(1.0009765625f), 0x3c01);                     // exact
  EXPECT_EQ(float_to_f16(1.0f + std::ldexp(1.0f, -11)), 0x3c00);      // tie, 1.0 is even
  EXPECT_EQ(float_to_f16(1.0f + 3 * std::ldexp(1.0f, -11)), 0x3c02);  // tie, up to even
  EXPECT_EQ(float_to_f16(65504.0f), 0x7bff);                          // max finite
  EXPECT_EQ(float_to_f16(65519.996f), 0x7bff);
  EXPECT_EQ(float_to_f16(65520.0f), 0x7c00);  // tie between 65504 and 2^16 goes to infinity
  EXPECT_EQ(float_to_f16(-1e6f), 0xfc00);
  EXPECT_EQ(float_to_f16(1e-8f), 0x0000);  // below half the smallest subnormal
  EXPECT_EQ(float_to_f16(-1e-8f), 0x8000);
  EXPECT_EQ(float_to_f16(3e-8f), 0x0001);
  EXPECT_EQ(float_to_f16(0.5f * tiny), 0x0000);  // tie, 0 is even
  EXPECT_EQ(float_to_f16(1.5f * tiny), 0x0002);  // tie, up to even
  EXPECT_EQ(float_to_f16(1e-5f), 0x00a8);        // subnormal: 167.77 * 2^-24
  // Largest subnormal plus half a step carries into the smallest normal.
  EXPECT_EQ(float_to_f16(1023.5f * tiny), 0x0400);
  EXPECT_EQ(float_to_f16(2047.5f * std::ldexp(1.0f, -11)), 0x3c00);  // carries into the next binade
  EXPECT_EQ(float_to_f16(2.0f - std::ldexp(1.0f, -11)), 0x4000);

  std::mt19937 rng(11);
  // Finite floats up to just below 65520, subnormal range included.
  std::uniform_int_distribution<uint32_t> any(0, 0x477fefffu);
  const auto decode = [](uint16_t b) { return static_cast<double>(f16_to_float(b)); };
  for (int i = 0; i < 200000; ++i) {
    const float x = bits_to_float(any(rng));
    const uint16_t h = float_to_f16(x);
    ASSERT_TRUE(is_nearest_even(x, h, 0x7bff, decode));
    EXPECT_EQ(float_to_f16(-x), h | 0x8000);
  }
}

TEST(Convert, UnalignedBuffersRoundTrip) {
  const std::vector<float> values = {1.0f, -2.5f, 0.1f, 65504.0f, 3e-6f};
  for (DType dtype : {DType::kF32, DType::kF16, DType::kBF16}) {
    // Offset by one byte so the reads and writes are unaligned.
    std::vector<unsigned char> buf(1 + values.size() * dtype_size(dtype));
    convert_from_f32(dtype, values.data(), values.size(), buf.data() + 1);
    std::vector<float> back(values.size());
    convert_to_f32(dtype, buf.data() + 1, values.size(), back.data());
    for (size_t i = 0; i < values.size(); ++i) {
      const float expected = dtype == DType::kF32  ? values[i]
                             : dtype == DType::kF16 ? f16_to_float(float_to_f16(values[i]))
                                                    : bf16_to_float(float_to_bf16(values[i]));
      EXPECT_EQ(back[i], expected) << dtype_name(dtype) << " element " << i;
    }
  }
}

TEST(DTypeNames, ParseAcceptsBothSpellings) {
  for (const char* name : {"F32", "f32", "float32"}) EXPECT_EQ(*parse_dtype(name), DType::kF32) << name;
  for (const char* name : {"F16", "f16"}) EXPECT_EQ(*parse_dtype(name), DType::kF16) << name;
  for (const char* name : {"BF16", "bf16"}) EXPECT_EQ(*parse_dtype(name), DType::kBF16) << name;
  for (DType d : {DType::kF32, DType::kF16, DType::kBF16}) EXPECT_EQ(*parse_dtype(dtype_name(d)), d);
  EXPECT_EQ(dtype_size(DType::kF32), 4u);
  EXPECT_EQ(dtype_size(DType::kF16), 2u);
  EXPECT_EQ(dtype_size(DType::kBF16), 2u);
}

TEST(DTypeNames, ParseRejectsUnknownNamingIt) {
  for (const char* name : {"I64", "", "Bf16x", "F64"}) {
    auto d = parse_dtype(name);
    ASSERT_FALSE(d.is_ok()) << name;
    EXPECT_EQ(d.status().code(), ErrorCode::kInvalidArgument);
    EXPECT_NE(d.status().message().find(std::string("'") + name + "'"), std::string::npos)
        << d.status().message();
  }
}

}  // namespace
}  // namespace reattn
