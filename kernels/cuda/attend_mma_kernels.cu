// Window attention for query blocks on the tensor cores (mma.sync m16n8k16, flash-attention 2
// style: online softmax in registers, P fed back as the A operand of P·V).
//
// Pass 1 (rotate_keys_kernel): every key of the step's segments (sinks, recalled chunks where
// they lie, local window) is rotated by RoPE at its layout position once, in fp32, and written
// with its value row to a contiguous workspace [Hkv][keys][D] in the compute dtype, with its
// layout position; a query block re-reads each key once per 64 (row, head) pairs, so rotating
// once per step is cheaper than rotating on every load.
//
// Compute dtype: f16 (11-bit mantissa: logits and probabilities 4x closer than in bf16; with bf16
// operands a planted needle's logit error alone reached 1e-2 relative in the output). f16 holds
// only |x| <= 65504, so the f16 pass flags any rotated key, value or scaled q beyond that and a
// bf16 variant (rotate + attend, launched behind it, idle unless flagged) does the step instead.
// Pass 2 (attend_mma_kernel): a CTA of 4 warps takes 64 pairs of one KV head (16 per warp; q
// rotated at the row's position and pre-scaled by log2(e)/sqrt(D) in registers) and one range of
// 64-key tiles, double-buffered through cp.async into swizzled shared memory; keys at layout
// positions >= a row's visible end are masked (causal by layout position). Its partial state
// (normalised out, max, sum) per pair goes to the same split workspace as the scalar kernel and
// is merged by attend_merge_kernel.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <type_traits>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/kernels.h"
#include "kernels/cuda/wgmma.cuh"

namespace reattn::cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kPairs = 16 * kWarps;  // (row, head-in-group) pairs of one CTA
constexpr int kKeys = 64;            // keys per tile
constexpr float kLog2e = 1.4426950408889634f;
constexpr int kRotateSlices = 16;    // CTAs per segment and KV head in the rotation pass

// Total keys over the segments (each CTA sums the short segment list itself).
__device__ __forceinline__ int64_t segment_offset(const KeySegment* segments, int64_t upto) {
  int64_t total = 0;
  for (int64_t s = 0; s < upto; ++s) total += segments[s].tokens;
  return total;
}

template <typename T>
struct Pack;
template <>
struct Pack<__nv_bfloat16> {
  static __device__ __forceinline__ uint32_t two(float a, float b) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
  static __device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};
template <>
struct Pack<__half> {
  static __device__ __forceinline__ uint32_t two(float a, float b) {
    const __half2 v = __floats2half2_rn(a, b);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
  static __device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

template <typename T>
__device__ __forceinline__ float to_float(T x);
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }
template <>
__device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }
template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
  const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem) {
  const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}

constexpr float kF16Max = 65504.0f;

struct RotateParams {
  AttendParams p;
  unsigned* overflow = nullptr;     // set by the f16 pass when a value does not fit f16
  const float* rope_cos = nullptr;  // [positions][D/2]
  const float* rope_sin = nullptr;
  void* k_rot = nullptr;            // [Hkv][capacity][D] storage dtype
  void* v_copy = nullptr;           // [Hkv][capacity][D]
  int* key_position = nullptr;      // [capacity]
  int64_t capacity = 0;             // keys the workspace holds (>= max_position >= keys)
};

// grid (segments, kRotateSlices, Hkv), block 256: one slice of one segment of one KV head (the
// local window's thousands of keys are spread over many CTAs); thread = 8 dims of the first half
// and their 8 partners of the second half of one key. T: storage dtype; TC: compute dtype
// (f16: the primary pass, which also checks the range of keys, values and q; bf16: the fallback,
// idle unless the primary pass flagged an overflow).
template <typename T, typename TC, int D>
__global__ void __launch_bounds__(256) rotate_keys_kernel(const RotateParams rp) {
  constexpr bool kPrimary = std::is_same<TC, __half>::value;
  constexpr int kHalf = D / 2;
  constexpr int kItems = kHalf / 8;  // per key
  if (!kPrimary && *rp.overflow == 0) return;
  const AttendParams& p = rp.p;
  const int64_t s = blockIdx.x;
  const int g = blockIdx.z;
  const KeySegment seg = p.segments[s];
  const int64_t slice = (seg.tokens + gridDim.y - 1) / gridDim.y;
  const int64_t t_begin = blockIdx.y * slice;
  const int64_t t_end = min(seg.tokens, t_begin + slice);
  const int64_t first = segment_offset(p.segments, s);
  const T* k_head = static_cast<const T*>(seg.k) + g * seg.head_stride;
  const T* v_head = static_cast<const T*>(seg.v) + g * seg.head_stride;
  TC* k_out = static_cast<TC*>(rp.k_rot) + (static_cast<int64_t>(g) * rp.capacity + first) * D;
  TC* v_out = static_cast<TC*>(rp.v_copy) + (static_cast<int64_t>(g) * rp.capacity + first) * D;
  bool over = false;
  for (int64_t item = t_begin * kItems + threadIdx.x; item < t_end * kItems; item += blockDim.x) {
    const int64_t t = item / kItems;
    const int d0 = static_cast<int>(item % kItems) * 8;
    const int64_t pos = seg.position + t;
    const uint4 raw1 = __ldg(reinterpret_cast<const uint4*>(k_head + t * D + d0));
    const uint4 raw2 = __ldg(reinterpret_cast<const uint4*>(k_head + t * D + d0 + kHalf));
    const T* x1 = reinterpret_cast<const T*>(&raw1);
    const T* x2 = reinterpret_cast<const T*>(&raw2);
    const float4* cs = reinterpret_cast<const float4*>(rp.rope_cos + pos * kHalf + d0);
    const float4* sn = reinterpret_cast<const float4*>(rp.rope_sin + pos * kHalf + d0);
    const float4 c0 = __ldg(cs), c1 = __ldg(cs + 1), s0 = __ldg(sn), s1 = __ldg(sn + 1);
    const float c[8] = {c0.x, c0.y, c0.z, c0.w, c1.x, c1.y, c1.z, c1.w};
    const float sv[8] = {s0.x, s0.y, s0.z, s0.w, s1.x, s1.y, s1.z, s1.w};
    __align__(16) TC y1[8];
    __align__(16) TC y2[8];
    __align__(16) TC w1[8];
    __align__(16) TC w2[8];
    const uint4 rv1 = __ldg(reinterpret_cast<const uint4*>(v_head + t * D + d0));
    const uint4 rv2 = __ldg(reinterpret_cast<const uint4*>(v_head + t * D + d0 + kHalf));
    const T* v1 = reinterpret_cast<const T*>(&rv1);
    const T* v2 = reinterpret_cast<const T*>(&rv2);
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const float a = to_float(x1[j]), b = to_float(x2[j]);
      const float r1 = a * c[j] - b * sv[j], r2 = b * c[j] + a * sv[j];
      const float u1 = to_float(v1[j]), u2 = to_float(v2[j]);
      over |= fabsf(r1) > kF16Max || fabsf(r2) > kF16Max || fabsf(u1) > kF16Max || fabsf(u2) > kF16Max;
      y1[j] = from_float<TC>(r1);
      y2[j] = from_float<TC>(r2);
      w1[j] = from_float<TC>(u1);
      w2[j] = from_float<TC>(u2);
    }
    *reinterpret_cast<uint4*>(k_out + t * D + d0) = *reinterpret_cast<const uint4*>(y1);
    *reinterpret_cast<uint4*>(k_out + t * D + d0 + kHalf) = *reinterpret_cast<const uint4*>(y2);
    *reinterpret_cast<uint4*>(v_out + t * D + d0) = *reinterpret_cast<const uint4*>(w1);
    *reinterpret_cast<uint4*>(v_out + t * D + d0 + kHalf) = *reinterpret_cast<const uint4*>(w2);
  }
  if constexpr (kPrimary) {
    // q: rotation mixes two dims (|rotated| <= sqrt(2) max|q|), then the log2(e)/sqrt(D) scale.
    const float q_limit = kF16Max * sqrtf(static_cast<float>(D)) / (1.4426950408889634f * 1.41421356f);
    const int64_t q_count = p.qlen * p.q_heads * D;
    const int64_t ctas = static_cast<int64_t>(gridDim.x) * gridDim.y * gridDim.z;
    const int64_t cta = (static_cast<int64_t>(blockIdx.z) * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
    for (int64_t i = cta * blockDim.x + threadIdx.x; i < q_count; i += ctas * blockDim.x) over |= fabsf(p.q[i]) > q_limit;
    if (__syncthreads_or(over) && threadIdx.x == 0) atomicOr(rp.overflow, 1u);
  }
  if (g == 0) {
    for (int64_t t = t_begin + threadIdx.x; t < t_end; t += blockDim.x) {
      rp.key_position[first + t] = static_cast<int>(seg.position + t);
    }
  }
}

struct MmaParams {
  AttendParams p;
  int group = 0;
  int pairs = 0;
  int splits = 0;
  const float* rope_cos = nullptr;
  const float* rope_sin = nullptr;
  const void* k_rot = nullptr;
  const void* v_copy = nullptr;
  const int* key_position = nullptr;
  int64_t capacity = 0;
  const unsigned* overflow = nullptr;
  float* partial = nullptr;  // [splits][Hkv][pairs][D + 2]
};

// Byte offset of 16-byte unit `unit` of key row `row` in a [kKeys][D] tile: units XOR-swizzled by
// row % 8, so that ldmatrix's 8 rows of one unit column hit 8 different bank groups.
template <int D>
__device__ __forceinline__ uint32_t tile_offset(int row, int unit) {
  return static_cast<uint32_t>(row * D * 2 + ((unit ^ (row & 7)) << 4));
}

// grid (pair tiles, Hkv, splits), block kThreads. T: the compute dtype (f16: primary; bf16: the
// fallback, which works only when the f16 pass flagged an overflow).
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) attend_mma_kernel(const MmaParams mp) {
  if ((*mp.overflow != 0) == std::is_same<T, __half>::value) return;
  constexpr int kUnits = D / 8;                 // 16-byte units per row
  constexpr int kTileBytes = kKeys * D * 2;
  constexpr int kKSteps = D / 16;
  constexpr int kHalf = D / 2;
  extern __shared__ __align__(128) uint8_t attend_smem[];
  uint8_t* k_tiles = attend_smem;                        // [2][kKeys][D]
  uint8_t* v_tiles = attend_smem + 2 * kTileBytes;       // [2][kKeys][D]
  int* pos_tiles = reinterpret_cast<int*>(attend_smem + 4 * kTileBytes);  // [2][kKeys]

  const AttendParams& p = mp.p;
  const int tid = threadIdx.x;
  const int warp = tid >> 5;
  const int lane = tid & 31;
  const int gq = lane >> 2;  // fragment row group
  const int tq = lane & 3;
  const int g = blockIdx.y;
  const int split = blockIdx.z;
  const int64_t keys = segment_offset(p.segments, p.segment_count);
  const int64_t tiles = (keys + kKeys - 1) / kKeys;
  const int64_t tile_begin = tiles * split / mp.splits;
  const int64_t tile_end = tiles * (split + 1) / mp.splits;

  // This thread's two pairs (fragment rows gq and gq + 8 of the warp's 16).
  int64_t vis_end[2];
  int64_t q_row[2];
  bool valid[2];
  for (int r = 0; r < 2; ++r) {
    const int e = blockIdx.x * kPairs + warp * 16 + gq + 8 * r;
    valid[r] = e < mp.pairs;
    const int ee = valid[r] ? e : 0;
    const int64_t i = ee / mp.group;
    q_row[r] = i * p.q_heads + g * mp.group + ee % mp.group;
    vis_end[r] = valid[r] ? p.row_visible_end[i] : 0;
  }
  // q rotated at the row's position, scaled by log2(e)/sqrt(D), as A fragments.
  uint32_t qa[kKSteps][4];
  {
    const float scale = kLog2e / sqrtf(static_cast<float>(D));
#pragma unroll
    for (int kk = 0; kk < kKSteps; ++kk) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {    // dims kk*16 + 2tq (+8 for h = 1)
#pragma unroll
        for (int r = 0; r < 2; ++r) {  // rows gq, gq + 8
          float y[2] = {0.0f, 0.0f};
          if (valid[r]) {
            const int64_t pos = p.row_position[(blockIdx.x * kPairs + warp * 16 + gq + 8 * r) / mp.group];
            const float* q = p.q + q_row[r] * D;
#pragma unroll
            for (int u = 0; u < 2; ++u) {
              const int d = kk * 16 + 2 * tq + 8 * h + u;
              const int dh = d % kHalf;
              const float c = mp.rope_cos[pos * kHalf + dh];
              const float s = mp.rope_sin[pos * kHalf + dh];
              y[u] = d < kHalf ? q[d] * c - q[d + kHalf] * s : q[d] * c + q[d - kHalf] * s;
              y[u] *= scale;
            }
          }
          qa[kk][2 * h + r] = Pack<T>::two(y[0], y[1]);
        }
      }
    }
  }
  int64_t warp_min_end = min(valid[0] ? vis_end[0] : LLONG_MAX, valid[1] ? vis_end[1] : LLONG_MAX);
  int64_t warp_max_end = max(vis_end[0], vis_end[1]);
#pragma unroll
  for (int off = 16; off >= 1; off /= 2) {
    warp_min_end = min(warp_min_end, __shfl_xor_sync(0xffffffffu, warp_min_end, off));
    warp_max_end = max(warp_max_end, __shfl_xor_sync(0xffffffffu, warp_max_end, off));
  }

  const T* k_src = static_cast<const T*>(mp.k_rot) + static_cast<int64_t>(g) * mp.capacity * D;
  const T* v_src = static_cast<const T*>(mp.v_copy) + static_cast<int64_t>(g) * mp.capacity * D;
  auto load_tile = [&](int64_t tile, int buf) {
    if (tile < tile_end) {
      const int64_t key0 = tile * kKeys;
#pragma unroll
      for (int i = 0; i < kKeys * kUnits / kThreads; ++i) {
        const int item = tid + i * kThreads;
        const int row = item / kUnits;
        const int unit = item % kUnits;
        const bool in = key0 + row < keys;
        const int64_t key = in ? key0 + row : 0;
        const uint32_t off = tile_offset<D>(row, unit);
        sm90::cp_async_16(k_tiles + buf * kTileBytes + off, k_src + key * D + unit * 8, in ? 16 : 0);
        sm90::cp_async_16(v_tiles + buf * kTileBytes + off, v_src + key * D + unit * 8, in ? 16 : 0);
      }
      if (tid < kKeys) pos_tiles[buf * kKeys + tid] = key0 + tid < keys ? mp.key_position[key0 + tid] : INT_MAX;
    }
    sm90::cp_async_commit();
  };

  float o[D / 8][4];
#pragma unroll
  for (int d = 0; d < D / 8; ++d) o[d][0] = o[d][1] = o[d][2] = o[d][3] = 0.0f;
  float m[2] = {-INFINITY, -INFINITY};
  float l[2] = {0.0f, 0.0f};  // this lane's partial sums (quad-reduced at the end)

  load_tile(tile_begin, 0);
  for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
    const int buf = static_cast<int>((tile - tile_begin) & 1);
    load_tile(tile + 1, buf ^ 1);
    sm90::cp_async_wait<1>();
    __syncthreads();
    const uint8_t* ks = k_tiles + buf * kTileBytes;
    const uint8_t* vs = v_tiles + buf * kTileBytes;
    const int* ps = pos_tiles + buf * kKeys;
    // Tile bounds of layout positions (padding keys are INT_MAX and never visible).
    int pmin = min(ps[lane], ps[lane + 32]);
    int pmax = max(ps[lane] == INT_MAX ? INT_MIN : ps[lane], ps[lane + 32] == INT_MAX ? INT_MIN : ps[lane + 32]);
#pragma unroll
    for (int off = 16; off >= 1; off /= 2) {
      pmin = min(pmin, __shfl_xor_sync(0xffffffffu, pmin, off));
      pmax = max(pmax, __shfl_xor_sync(0xffffffffu, pmax, off));
    }
    const bool any_visible = pmin < warp_max_end;
    const bool all_visible = pmax < warp_min_end && tile * kKeys + kKeys <= keys;
    if (any_visible) {
      // S = q k^T: 16 x 64 per warp, in log2 units.
      float sacc[kKeys / 8][4];
#pragma unroll
      for (int j = 0; j < kKeys / 8; ++j) sacc[j][0] = sacc[j][1] = sacc[j][2] = sacc[j][3] = 0.0f;
#pragma unroll
      for (int kk = 0; kk < kKSteps; ++kk) {
#pragma unroll
        for (int j = 0; j < kKeys / 8; j += 2) {
          // matrices: keys 8j.. dims kk*16 (+8), keys 8(j+1).. dims kk*16 (+8)
          const int row = 8 * j + (lane & 7) + ((lane >> 4) << 3);
          const int unit = 2 * kk + ((lane >> 3) & 1);
          uint32_t b[4];
          ldmatrix_x4(b, ks + tile_offset<D>(row, unit));
          Pack<T>::mma(sacc[j], qa[kk], b[0], b[1]);
          Pack<T>::mma(sacc[j + 1], qa[kk], b[2], b[3]);
        }
      }
      if (!all_visible) {
#pragma unroll
        for (int j = 0; j < kKeys / 8; ++j) {
#pragma unroll
          for (int u = 0; u < 2; ++u) {
            const int kp = ps[8 * j + 2 * tq + u];
            if (kp >= vis_end[0]) sacc[j][u] = -INFINITY;
            if (kp >= vis_end[1]) sacc[j][2 + u] = -INFINITY;
          }
        }
      }
      // Online softmax per row.
      float alpha[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float mx = -INFINITY;
#pragma unroll
        for (int j = 0; j < kKeys / 8; ++j) mx = fmaxf(mx, fmaxf(sacc[j][2 * r], sacc[j][2 * r + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float m_new = fmaxf(m[r], mx);
        const float m_use = m_new == -INFINITY ? 0.0f : m_new;
        alpha[r] = exp2f(m[r] - m_use);  // 0 when nothing was visible before
        float sum = 0.0f;
#pragma unroll
        for (int j = 0; j < kKeys / 8; ++j) {
          sacc[j][2 * r] = exp2f(sacc[j][2 * r] - m_use);
          sacc[j][2 * r + 1] = exp2f(sacc[j][2 * r + 1] - m_use);
          sum += sacc[j][2 * r] + sacc[j][2 * r + 1];
        }
        l[r] = l[r] * alpha[r] + sum;
        m[r] = m_new;
      }
#pragma unroll
      for (int d = 0; d < D / 8; ++d) {
        o[d][0] *= alpha[0];
        o[d][1] *= alpha[0];
        o[d][2] *= alpha[1];
        o[d][3] *= alpha[1];
      }
      // O += P V: P's accumulator fragments are the A fragments of 16-key steps.
#pragma unroll
      for (int s = 0; s < kKeys / 16; ++s) {
        const uint32_t pa[4] = {Pack<T>::two(sacc[2 * s][0], sacc[2 * s][1]), Pack<T>::two(sacc[2 * s][2], sacc[2 * s][3]),
                                Pack<T>::two(sacc[2 * s + 1][0], sacc[2 * s + 1][1]),
                                Pack<T>::two(sacc[2 * s + 1][2], sacc[2 * s + 1][3])};
#pragma unroll
        for (int d = 0; d < D / 8; d += 2) {
          // matrices (transposed): keys 16s.. (+8) of dims 8d.., then of dims 8(d+1)..
          const int row = 16 * s + (lane & 7) + (((lane >> 3) & 1) << 3);
          const int unit = d + (lane >> 4);
          uint32_t b[4];
          ldmatrix_x4_trans(b, vs + tile_offset<D>(row, unit));
          Pack<T>::mma(o[d], pa, b[0], b[1]);
          Pack<T>::mma(o[d + 1], pa, b[2], b[3]);
        }
      }
    }
    __syncthreads();  // the buffer is reloaded next iteration
  }
  sm90::cp_async_wait<0>();

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
  }
  const float ln2 = 0.6931471805599453f;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (!valid[r]) continue;
    const int e = blockIdx.x * kPairs + warp * 16 + gq + 8 * r;
    // One split: the final state goes straight to out/row_max/row_sum (no merge pass).
    const bool direct = mp.splits == 1;
    float* dst = direct ? p.out + q_row[r] * D
                        : mp.partial + ((static_cast<int64_t>(split) * p.kv_heads + g) * mp.pairs + e) * (D + 2);
    const float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
#pragma unroll
    for (int d = 0; d < D / 8; ++d) {
      *reinterpret_cast<float2*>(dst + 8 * d + 2 * tq) = make_float2(o[d][2 * r] * inv, o[d][2 * r + 1] * inv);
    }
    if (tq == 0) {
      const float row_max = l[r] > 0.0f ? m[r] * ln2 : -INFINITY;
      if (direct) {
        p.row_max[q_row[r]] = row_max;
        p.row_sum[q_row[r]] = l[r];
      } else {
        dst[D] = row_max;
        dst[D + 1] = l[r];
      }
    }
  }
}

template <typename T, typename TC, int D>
Status launch_pass(const MmaParams& mp, const AttendPlan& plan, cudaStream_t stream) {
  RotateParams rp;
  rp.p = mp.p;
  rp.overflow = const_cast<unsigned*>(mp.overflow);
  rp.rope_cos = mp.rope_cos;
  rp.rope_sin = mp.rope_sin;
  rp.k_rot = const_cast<void*>(mp.k_rot);
  rp.v_copy = const_cast<void*>(mp.v_copy);
  rp.key_position = const_cast<int*>(mp.key_position);
  rp.capacity = mp.capacity;
  if (mp.p.segment_count > 0) {
    // The bf16 fallback runs only after an overflow: one CTA per segment and head keeps its
    // usually empty launch short.
    const unsigned slices = std::is_same<TC, __half>::value ? kRotateSlices : 1;
    const dim3 rgrid(static_cast<unsigned>(mp.p.segment_count), slices, mp.p.kv_heads);
    rotate_keys_kernel<T, TC, D><<<rgrid, 256, 0, stream>>>(rp);
    REATTN_CUDA_CHECK_LAUNCH("rotate_keys_kernel");
  }
  const auto kernel = attend_mma_kernel<TC, D>;
  const size_t smem = 4 * kKeys * D * 2 + 2 * kKeys * sizeof(int);
  REATTN_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  const dim3 grid(plan.pair_tiles, mp.p.kv_heads, plan.splits);
  kernel<<<grid, kThreads, smem, stream>>>(mp);
  REATTN_CUDA_CHECK_LAUNCH("attend_mma_kernel");
  return Status::ok();
}

template <typename T, int D>
Status launch(const MmaParams& mp, const AttendPlan& plan, cudaStream_t stream) {
  REATTN_CUDA_CHECK(cudaMemsetAsync(const_cast<unsigned*>(mp.overflow), 0, sizeof(unsigned), stream));
  REATTN_RETURN_IF_ERROR((launch_pass<T, __half, D>(mp, plan, stream)));
  return launch_pass<T, __nv_bfloat16, D>(mp, plan, stream);
}

}  // namespace

int attend_mma_pairs_per_cta() { return kPairs; }
int attend_mma_keys_per_tile() { return kKeys; }

Status run_attend_mma(const AttendParams& p, DType dtype, const AttendPlan& plan, const float* rope_cos,
                      const float* rope_sin, void* workspace, cudaStream_t stream) {
  MmaParams mp;
  mp.p = p;
  mp.group = p.q_heads / p.kv_heads;
  mp.pairs = static_cast<int>(p.qlen) * mp.group;
  mp.splits = plan.splits;
  mp.rope_cos = rope_cos;
  mp.rope_sin = rope_sin;
  mp.capacity = plan.key_capacity;
  char* ws = static_cast<char*>(workspace);
  mp.partial = reinterpret_cast<float*>(ws);
  const size_t kv_bytes = static_cast<size_t>(p.kv_heads) * plan.key_capacity * p.head_dim * 2;
  mp.k_rot = ws + plan.rotated_offset;
  mp.v_copy = ws + plan.rotated_offset + kv_bytes;
  mp.key_position = reinterpret_cast<const int*>(ws + plan.rotated_offset + 2 * kv_bytes);
  mp.overflow = reinterpret_cast<const unsigned*>(ws + plan.rotated_offset + 2 * kv_bytes +
                                                  plan.key_capacity * sizeof(int));
  const bool bf16 = dtype == DType::kBF16;
  if (p.head_dim == 128) {
    return bf16 ? launch<__nv_bfloat16, 128>(mp, plan, stream) : launch<__half, 128>(mp, plan, stream);
  }
  return bf16 ? launch<__nv_bfloat16, 64>(mp, plan, stream) : launch<__half, 64>(mp, plan, stream);
}

}  // namespace reattn::cuda
