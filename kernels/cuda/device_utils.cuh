// Device helpers shared by the CUDA kernels: 16-byte loads of storage-dtype vectors into fp32, and
// the exact split of an fp32 value into storage-dtype parts.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace reattn::cuda {

// 8 consecutive elements (16 bytes, 16-byte aligned) of the storage dtype, as fp32.
template <typename T>
__device__ __forceinline__ void load8(const T* src, float (&out)[8]);

template <>
__device__ __forceinline__ void load8<__nv_bfloat16>(const __nv_bfloat16* src, float (&out)[8]) {
  const uint4 raw = __ldg(reinterpret_cast<const uint4*>(src));
  const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    out[2 * i] = __uint_as_float(w[i] << 16);
    out[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
  }
}

template <>
__device__ __forceinline__ void load8<__half>(const __half* src, float (&out)[8]) {
  const uint4 raw = __ldg(reinterpret_cast<const uint4*>(src));
  const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    __half2 h;
    memcpy(&h, &w[i], 4);
    const float2 f = __half22float2(h);
    out[2 * i] = f.x;
    out[2 * i + 1] = f.y;
  }
}

// 8 consecutive floats (32 bytes, 16-byte aligned).
__device__ __forceinline__ void load8_f32(const float* src, float (&out)[8]) {
  const float4 a = __ldg(reinterpret_cast<const float4*>(src));
  const float4 b = __ldg(reinterpret_cast<const float4*>(src) + 1);
  out[0] = a.x;
  out[1] = a.y;
  out[2] = a.z;
  out[3] = a.w;
  out[4] = b.x;
  out[5] = b.y;
  out[6] = b.z;
  out[7] = b.w;
}

// The storage-dtype value nearest to x (its bits); `rest` gets what it misses (exactly, in fp32).
// Three such parts (hi, mid, lo) hold an fp32 q for the tensor-core scoring kernels.
template <typename T>
__device__ __forceinline__ uint16_t split_part(float x, float& rest);

template <>
__device__ __forceinline__ uint16_t split_part<__nv_bfloat16>(float x, float& rest) {
  const __nv_bfloat16 h = __float2bfloat16_rn(x);
  rest = x - __bfloat162float(h);
  return __bfloat16_as_ushort(h);
}

template <>
__device__ __forceinline__ uint16_t split_part<__half>(float x, float& rest) {
  const __half h = __float2half_rn(x);
  rest = x - __half2float(h);
  return __half_as_ushort(h);
}

}  // namespace reattn::cuda
