// The final, position-aware attention over [sinks, recalled chunks, local], addressed through
// a list of key segments (no gather copy). Keys are rotated by RoPE at their layout positions
// on the fly; the keys are split across CTAs (each takes every splits-th segment) and the
// splits' partial states are merged by log-sum-exp with merge_state. Also: the owner-side
// merge of partial states, the RoPE cos/sin table, and a read-bandwidth probe.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <climits>
#include <cmath>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/device_utils.cuh"
#include "kernels/cuda/dispatch.cuh"
#include "kernels/cuda/kernels.h"

namespace reattn::cuda {
namespace {

constexpr int kAttendThreads = 256;
constexpr int kPairsPerTile = 16;  // (row, head-in-group) pairs of one CTA
constexpr int kKeysPerTile = 32;   // keys staged in shared memory at once
constexpr int kAttendWarps = kAttendThreads / 32;

struct AttendKernelParams {
  AttendParams p;
  int group = 0;
  int pairs = 0;                 // qlen * G
  int splits = 0;
  const float* rope_cos = nullptr;  // [positions][D/2]
  const float* rope_sin = nullptr;
  float* partial = nullptr;      // [splits][Hkv][pairs][D + 2]: normalised out, max, sum
};

// grid (splits, Hkv, pair_tiles), block kAttendThreads.
template <typename T, int D>
__global__ void __launch_bounds__(kAttendThreads) attend_split_kernel(const AttendKernelParams kp) {
  constexpr int kHalf = D / 2;
  constexpr int kPairStride = kAttendThreads / D;            // pairs between one thread's outputs
  constexpr int kOutPerThread = kPairsPerTile / kPairStride;  // outputs (pair, d) per thread
  constexpr int kPairsPerWarp = kPairsPerTile / kAttendWarps;
  __shared__ float q_rot[kPairsPerTile][D];
  __shared__ float k_rot[kKeysPerTile][D + 1];  // +1: lanes read different keys, conflict-free
  __shared__ __align__(16) float v_tile[kKeysPerTile][D];
  __shared__ float weight[kPairsPerTile][kKeysPerTile];
  __shared__ float alpha[kPairsPerTile];
  __shared__ float final_max[kPairsPerTile];
  __shared__ float final_sum[kPairsPerTile];
  __shared__ int64_t key_position[kKeysPerTile];
  __shared__ int64_t pair_visible_end[kPairsPerTile];

  const AttendParams& p = kp.p;
  const int split = blockIdx.x;
  const int g = blockIdx.y;
  const int pair0 = blockIdx.z * kPairsPerTile;
  const int tile_pairs = min(kPairsPerTile, kp.pairs - pair0);
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const float scale = 1.0f / sqrtf(static_cast<float>(D));

  auto pair_row = [&](int e) {
    return static_cast<int64_t>(e / kp.group) * p.q_heads + g * kp.group + e % kp.group;
  };
  for (int idx = tid; idx < kPairsPerTile * kHalf; idx += kAttendThreads) {
    const int pr = idx / kHalf;
    const int d = idx % kHalf;
    float a = 0.0f, b = 0.0f;
    if (pr < tile_pairs) {
      const int e = pair0 + pr;
      const float* q = p.q + pair_row(e) * D;
      const int64_t pos = p.row_position[e / kp.group];
      const float c = kp.rope_cos[pos * kHalf + d];
      const float sn = kp.rope_sin[pos * kHalf + d];
      a = q[d] * c - q[d + kHalf] * sn;
      b = q[d + kHalf] * c + q[d] * sn;
    }
    q_rot[pr][d] = a;
    q_rot[pr][d + kHalf] = b;
  }
  if (tid < kPairsPerTile) {
    pair_visible_end[tid] = tid < tile_pairs ? p.row_visible_end[(pair0 + tid) / kp.group] : 0;
  }
  float run_max[kPairsPerWarp];
  float run_sum[kPairsPerWarp];
#pragma unroll
  for (int j = 0; j < kPairsPerWarp; ++j) {
    run_max[j] = -INFINITY;
    run_sum[j] = 0.0f;
  }
  float acc[kOutPerThread];
#pragma unroll
  for (int j = 0; j < kOutPerThread; ++j) acc[j] = 0.0f;
  const int d_out = tid % D;
  const int pair_first = tid / D;
  __syncthreads();

  for (int64_t si = split; si < p.segment_count; si += kp.splits) {
    const KeySegment seg = p.segments[si];
    const T* k_head = static_cast<const T*>(seg.k) + g * seg.head_stride;
    const T* v_head = static_cast<const T*>(seg.v) + g * seg.head_stride;
    for (int64_t t0 = 0; t0 < seg.tokens; t0 += kKeysPerTile) {
      const int count = seg.tokens - t0 < kKeysPerTile ? static_cast<int>(seg.tokens - t0) : kKeysPerTile;
      // Keys rotated at their layout positions: each item is 8 dims of the first half and
      // their 8 partners of the second half.
      for (int item = tid; item < kKeysPerTile * (kHalf / 8); item += kAttendThreads) {
        const int t = item / (kHalf / 8);
        const int d0 = (item % (kHalf / 8)) * 8;
        float x1[8], x2[8];
        if (t < count) {
          load8<T>(k_head + (t0 + t) * D + d0, x1);
          load8<T>(k_head + (t0 + t) * D + d0 + kHalf, x2);
          const int64_t pos = seg.position + t0 + t;
          float cs[8], sn[8];
          load8_f32(kp.rope_cos + pos * kHalf + d0, cs);
          load8_f32(kp.rope_sin + pos * kHalf + d0, sn);
#pragma unroll
          for (int j = 0; j < 8; ++j) {
            const float a = x1[j] * cs[j] - x2[j] * sn[j];
            const float b = x2[j] * cs[j] + x1[j] * sn[j];
            x1[j] = a;
            x2[j] = b;
          }
        } else {
#pragma unroll
          for (int j = 0; j < 8; ++j) x1[j] = x2[j] = 0.0f;
        }
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          k_rot[t][d0 + j] = x1[j];
          k_rot[t][d0 + kHalf + j] = x2[j];
        }
      }
      for (int item = tid; item < kKeysPerTile * (D / 8); item += kAttendThreads) {
        const int t = item / (D / 8);
        const int d0 = (item % (D / 8)) * 8;
        float x[8];
        if (t < count) {
          load8<T>(v_head + (t0 + t) * D + d0, x);
        } else {
#pragma unroll
          for (int j = 0; j < 8; ++j) x[j] = 0.0f;
        }
        float4* dst = reinterpret_cast<float4*>(&v_tile[t][d0]);
        dst[0] = make_float4(x[0], x[1], x[2], x[3]);
        dst[1] = make_float4(x[4], x[5], x[6], x[7]);
      }
      if (tid < kKeysPerTile) key_position[tid] = seg.position + t0 + tid;
      __syncthreads();

      // Logits and the online softmax: warp w owns pairs w, w + 8, ...; lane = key.
#pragma unroll
      for (int j = 0; j < kPairsPerWarp; ++j) {
        const int pr = warp + j * kAttendWarps;
        if (pr >= tile_pairs) continue;
        float dot = 0.0f;
#pragma unroll 16
        for (int d = 0; d < D; ++d) dot = fmaf(q_rot[pr][d], k_rot[lane][d], dot);
        const bool visible = lane < count && key_position[lane] < pair_visible_end[pr];
        const float logit = visible ? dot * scale : -INFINITY;
        float tile_max = logit;
#pragma unroll
        for (int off = 16; off >= 1; off /= 2) tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, off));
        const float new_max = fmaxf(run_max[j], tile_max);
        float w = 0.0f;
        float a = 1.0f;
        if (new_max != -INFINITY) {
          w = visible ? expf(logit - new_max) : 0.0f;
          a = expf(run_max[j] - new_max);  // 0 when nothing was visible before
        }
        float tile_sum = w;
#pragma unroll
        for (int off = 16; off >= 1; off /= 2) tile_sum += __shfl_xor_sync(0xffffffffu, tile_sum, off);
        run_sum[j] = run_sum[j] * a + tile_sum;
        run_max[j] = new_max;
        weight[pr][lane] = w;
        if (lane == 0) alpha[pr] = a;
      }
      __syncthreads();

      // out[pair][d] = out * alpha + sum_t w[pair][t] * v[t][d].
#pragma unroll
      for (int j = 0; j < kOutPerThread; ++j) {
        const int pr = pair_first + j * kPairStride;
        if (pr < tile_pairs) {
          float o = acc[j] * alpha[pr];
#pragma unroll 8
          for (int t = 0; t < kKeysPerTile; ++t) o = fmaf(weight[pr][t], v_tile[t][d_out], o);
          acc[j] = o;
        }
      }
      __syncthreads();
    }
  }
  if (lane == 0) {
#pragma unroll
    for (int j = 0; j < kPairsPerWarp; ++j) {
      final_max[warp + j * kAttendWarps] = run_max[j];
      final_sum[warp + j * kAttendWarps] = run_sum[j];
    }
  }
  __syncthreads();
#pragma unroll
  for (int j = 0; j < kOutPerThread; ++j) {
    const int pr = pair_first + j * kPairStride;
    if (pr >= tile_pairs) continue;
    float* dst = kp.partial + ((static_cast<int64_t>(split) * p.kv_heads + g) * kp.pairs + pair0 + pr) * (D + 2);
    const float sum = final_sum[pr];
    dst[d_out] = sum > 0.0f ? acc[j] / sum : 0.0f;
    if (d_out == 0) {
      dst[D] = final_max[pr];
      dst[D + 1] = sum;
    }
  }
}

struct SplitMergeParams {
  const float* partial = nullptr;  // [splits][Hkv][pairs][D + 2]
  int splits = 0;
  int kv_heads = 0;
  int pairs = 0;
  int group = 0;
  int q_heads = 0;
  float* out = nullptr;            // [qlen, H, D]
  float* row_max = nullptr;        // [qlen, H]
  float* row_sum = nullptr;
};

// One warp per (KV head, pair); lane owns D/32 consecutive dims. The log-sum-exp merge of the
// splits in one pass (the closed form of folding merge_state over them): lanes first read the
// splits' (max, sum) in parallel, then every lane sums its dims over the splits with
// independent loads. grid ceil(Hkv*pairs/4), block 128.
template <int D>
__global__ void __launch_bounds__(128) attend_merge_kernel(const SplitMergeParams mp) {
  constexpr int kDims = D / 32;
  const int lane = threadIdx.x & 31;
  const int64_t item = static_cast<int64_t>(blockIdx.x) * 4 + (threadIdx.x >> 5);
  if (item >= static_cast<int64_t>(mp.kv_heads) * mp.pairs) return;
  const int g = static_cast<int>(item / mp.pairs);
  const int e = static_cast<int>(item % mp.pairs);
  const int64_t split_stride = static_cast<int64_t>(mp.kv_heads) * mp.pairs * (D + 2);
  const float* base = mp.partial + (static_cast<int64_t>(g) * mp.pairs + e) * (D + 2);
  // Global max over the splits that saw a key.
  float m = -INFINITY;
  for (int s = lane; s < mp.splits; s += 32) {
    const float* src = base + s * split_stride;
    if (src[D + 1] > 0.0f) m = fmaxf(m, src[D]);
  }
#pragma unroll
  for (int off = 16; off >= 1; off /= 2) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
  float l = 0.0f;
  float out[kDims];
#pragma unroll
  for (int d = 0; d < kDims; ++d) out[d] = 0.0f;
  if (m != -INFINITY) {
    for (int s0 = 0; s0 < mp.splits; s0 += 32) {
      // Split s0 + lane's weight sum * exp(max - m), shared through the warp.
      float weight = 0.0f;
      if (s0 + lane < mp.splits) {
        const float* src = base + (s0 + lane) * split_stride;
        const float sum = src[D + 1];
        if (sum > 0.0f) weight = sum * expf(src[D] - m);
      }
      const int count = min(32, mp.splits - s0);
      for (int j = 0; j < count; ++j) {
        const float w = __shfl_sync(0xffffffffu, weight, j);
        if (w == 0.0f) continue;
        const float* src = base + (s0 + j) * split_stride + lane * kDims;
#pragma unroll
        for (int d = 0; d < kDims; ++d) out[d] = fmaf(w, src[d], out[d]);
        l += w;
      }
    }
    const float inv = 1.0f / l;
#pragma unroll
    for (int d = 0; d < kDims; ++d) out[d] *= inv;
  }
  const int64_t row = static_cast<int64_t>(e / mp.group) * mp.q_heads + g * mp.group + e % mp.group;
#pragma unroll
  for (int d = 0; d < kDims; ++d) mp.out[row * D + lane * kDims + d] = out[d];
  if (lane == 0) {
    mp.row_max[row] = m;
    mp.row_sum[row] = l;
  }
}

// One warp per row: folds partial states [count][rows] into the running state, in order.
template <int D>
__global__ void __launch_bounds__(128) merge_states_kernel(const MergeParams p) {
  constexpr int kDims = D / 32;
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * 4 + (threadIdx.x >> 5);
  if (row >= p.rows) return;
  float m = p.row_max[row];
  float l = p.row_sum[row];
  float out[kDims];
#pragma unroll
  for (int d = 0; d < kDims; ++d) out[d] = p.out[row * D + lane * kDims + d];
  for (int64_t c = 0; c < p.count; ++c) {
    const int64_t src = c * p.rows + row;
    merge_state(m, l, out, p.partial_max[src], p.partial_sum[src], p.partial_out + src * D + lane * kDims, kDims);
  }
  __syncwarp();
#pragma unroll
  for (int d = 0; d < kDims; ++d) p.out[row * D + lane * kDims + d] = out[d];
  if (lane == 0) {
    p.row_max[row] = m;
    p.row_sum[row] = l;
  }
}

struct RopeTableParams {
  const double* inv_freq = nullptr;
  int half = 0;
  int64_t positions = 0;
  float* cos_table = nullptr;
  float* sin_table = nullptr;
};

__global__ void rope_table_kernel(const RopeTableParams rp) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= rp.positions * rp.half) return;
  const int64_t pos = idx / rp.half;
  const int d = static_cast<int>(idx % rp.half);
  const double angle = static_cast<double>(pos) * rp.inv_freq[d];
  rp.cos_table[idx] = static_cast<float>(cos(angle));
  rp.sin_table[idx] = static_cast<float>(sin(angle));
}

struct ReadProbeParams {
  const uint4* data = nullptr;
  size_t count = 0;  // uint4 elements
  unsigned long long* sink = nullptr;
};

__global__ void __launch_bounds__(256) read_probe_kernel(const ReadProbeParams rp) {
  uint32_t acc = 0;
  const size_t stride = static_cast<size_t>(gridDim.x) * blockDim.x;
  size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  for (; i + 3 * stride < rp.count; i += 4 * stride) {
    const uint4 a = __ldg(rp.data + i);
    const uint4 b = __ldg(rp.data + i + stride);
    const uint4 c = __ldg(rp.data + i + 2 * stride);
    const uint4 d = __ldg(rp.data + i + 3 * stride);
    acc ^= a.x ^ a.y ^ a.z ^ a.w ^ b.x ^ b.y ^ b.z ^ b.w ^ c.x ^ c.y ^ c.z ^ c.w ^ d.x ^ d.y ^ d.z ^ d.w;
  }
  for (; i < rp.count; i += stride) {
    const uint4 a = __ldg(rp.data + i);
    acc ^= a.x ^ a.y ^ a.z ^ a.w;
  }
  if (acc == 0x9e3779b9u) atomicXor(rp.sink, 1ull);  // keeps the loads; almost never taken
}

template <int D>
Status launch_split_merge(const AttendParams& p, const AttendPlan& plan, const float* partial, cudaStream_t stream) {
  SplitMergeParams mp;
  mp.partial = partial;
  mp.splits = plan.splits;
  mp.kv_heads = p.kv_heads;
  mp.group = p.q_heads / p.kv_heads;
  mp.pairs = static_cast<int>(p.qlen) * mp.group;
  mp.q_heads = p.q_heads;
  mp.out = p.out;
  mp.row_max = p.row_max;
  mp.row_sum = p.row_sum;
  const int64_t items = static_cast<int64_t>(mp.kv_heads) * mp.pairs;
  attend_merge_kernel<D><<<static_cast<unsigned>((items + 3) / 4), 128, 0, stream>>>(mp);
  REATTN_CUDA_CHECK_LAUNCH("attend_merge_kernel");
  return Status::ok();
}

template <typename T, int D>
Status launch_attend(const AttendKernelParams& kp, const AttendPlan& plan, cudaStream_t stream) {
  const dim3 grid(plan.splits, kp.p.kv_heads, plan.pair_tiles);
  attend_split_kernel<T, D><<<grid, kAttendThreads, 0, stream>>>(kp);
  REATTN_CUDA_CHECK_LAUNCH("attend_split_kernel");
  return launch_split_merge<D>(kp.p, plan, kp.partial, stream);
}

Status launch_split_merge_for(const AttendParams& p, const AttendPlan& plan, const float* partial,
                              cudaStream_t stream) {
  if (p.head_dim == 128) return launch_split_merge<128>(p, plan, partial, stream);
  if (p.head_dim == 64) return launch_split_merge<64>(p, plan, partial, stream);
  return invalid_argument("attend: head_dim " + std::to_string(p.head_dim) +
                          " is not supported by the cuda backend (64 or 128)");
}

}  // namespace

AttendPlan plan_attend(const AttendParams& p, const DeviceInfo& info) {
  AttendPlan plan;
  const int group = p.q_heads / p.kv_heads;
  const int64_t pairs = p.qlen * group;
  const size_t state_bytes = static_cast<size_t>(p.kv_heads) * pairs * (p.head_dim + 2) * sizeof(float);
  if (pairs >= kMinMmaAttendPairs && (p.head_dim == 64 || p.head_dim == 128) && p.max_position < INT32_MAX) {
    // About two CTAs of 64 pairs per multiprocessor, each over a range of at least 4 key tiles.
    plan.mma = true;
    plan.pair_tiles = static_cast<int>((pairs + attend_mma_pairs_per_cta() - 1) / attend_mma_pairs_per_cta());
    const int64_t ctas = static_cast<int64_t>(p.kv_heads) * plan.pair_tiles;
    const int64_t key_tiles = (p.max_position + attend_mma_keys_per_tile() - 1) / attend_mma_keys_per_tile();
    const int64_t wanted = (2 * static_cast<int64_t>(info.sm_count) + ctas - 1) / ctas;
    plan.splits = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(wanted, key_tiles / 4)));
    plan.key_capacity = std::max<int64_t>(p.max_position, 1);
    plan.rotated_offset = (plan.splits * state_bytes + 255) / 256 * 256;
    const size_t kv_bytes = static_cast<size_t>(p.kv_heads) * plan.key_capacity * p.head_dim * 2;
    plan.workspace_bytes = plan.rotated_offset + 2 * kv_bytes + plan.key_capacity * sizeof(int) + sizeof(unsigned);
    return plan;
  }
  plan.pair_tiles = static_cast<int>((pairs + kPairsPerTile - 1) / kPairsPerTile);
  const int64_t ctas_per_split = static_cast<int64_t>(p.kv_heads) * plan.pair_tiles;
  // About four CTAs per multiprocessor: each takes a few segments, so the step's short
  // attention is latency-bound and wants many small CTAs.
  const int64_t wanted = (4 * static_cast<int64_t>(info.sm_count) + ctas_per_split - 1) / ctas_per_split;
  plan.splits = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(wanted, p.segment_count)));
  plan.workspace_bytes = plan.splits * state_bytes;
  return plan;
}

Status run_attend(const AttendParams& p, DType dtype, const AttendPlan& plan, const float* rope_cos,
                  const float* rope_sin, void* workspace, cudaStream_t stream) {
  AttendKernelParams kp;
  kp.p = p;
  kp.group = p.q_heads / p.kv_heads;
  kp.pairs = static_cast<int>(p.qlen) * kp.group;
  kp.splits = plan.splits;
  kp.rope_cos = rope_cos;
  kp.rope_sin = rope_sin;
  kp.partial = static_cast<float*>(workspace);
  if (plan.mma) {
    REATTN_RETURN_IF_ERROR(run_attend_mma(p, dtype, plan, rope_cos, rope_sin, workspace, stream));
    // One split writes the final state itself.
    return plan.splits == 1 ? Status::ok() : launch_split_merge_for(p, plan, kp.partial, stream);
  }
  return dispatch_dtype_head_dim(dtype, p.head_dim, "attend", [&](auto element, auto dim) {
    return launch_attend<typename decltype(element)::type, decltype(dim)::value>(kp, plan, stream);
  });
}

Status run_merge_states(const MergeParams& p, cudaStream_t stream) {
  if (p.rows == 0 || p.count == 0) return Status::ok();
  const auto blocks = static_cast<unsigned>((p.rows + 3) / 4);
  REATTN_RETURN_IF_ERROR(dispatch_head_dim(p.head_dim, "merge_states", [&](auto dim) {
    merge_states_kernel<decltype(dim)::value><<<blocks, 128, 0, stream>>>(p);
    return Status::ok();
  }));
  REATTN_CUDA_CHECK_LAUNCH("merge_states_kernel");
  return Status::ok();
}

Status build_rope_table(const double* inv_freq, int head_dim, int64_t positions, float* cos_table, float* sin_table,
                        cudaStream_t stream) {
  RopeTableParams rp;
  rp.inv_freq = inv_freq;
  rp.half = head_dim / 2;
  rp.positions = positions;
  rp.cos_table = cos_table;
  rp.sin_table = sin_table;
  const int64_t items = positions * rp.half;
  rope_table_kernel<<<static_cast<unsigned>((items + 255) / 256), 256, 0, stream>>>(rp);
  REATTN_CUDA_CHECK_LAUNCH("rope_table_kernel");
  return Status::ok();
}

Status run_read_probe(const void* data, size_t bytes, unsigned long long* sink, const DeviceInfo& info,
                      cudaStream_t stream) {
  ReadProbeParams rp;
  rp.data = static_cast<const uint4*>(data);
  rp.count = bytes / sizeof(uint4);
  rp.sink = sink;
  read_probe_kernel<<<info.sm_count * 8, 256, 0, stream>>>(rp);
  REATTN_CUDA_CHECK_LAUNCH("read_probe_kernel");
  return Status::ok();
}

}  // namespace reattn::cuda
