// Position-agnostic chunk scoring: one pass over the rank's mid keys. Each warp streams whole
// chunks of one KV head, computes the raw dot product of every key with every (row, query
// head) of the group, keeps the per-chunk max in registers and the per-(row, head) top-k in
// shared memory; no per-token score reaches device memory. A second small kernel merges the
// warps' lists into the per-(row, head) top-k in candidate_before order.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/device_utils.cuh"
#include "kernels/cuda/kernels.h"

namespace reattn::cuda {
namespace {

constexpr int kScoreWarps = 4;         // warps per CTA
constexpr int kPairTile = 4;           // (row, head) pairs computed together in registers
constexpr int kWarpsPerSm = 8;         // resident scoring warps per multiprocessor (about 205 registers each)
constexpr size_t kListBytesPerWarp = 8 << 10;

struct ScoreKernelParams {
  ScoreParams p;
  int group = 0;             // G
  int pairs = 0;             // qlen * G
  int warps_per_head = 0;
  int pairs_per_pass = 0;
  Candidate* partial = nullptr;  // [Hkv][warps_per_head][pairs][top_k]
};

// One step of reduce_scatter: lanes HALF apart swap halves of v and add.
template <int HALF, int L>
__device__ __forceinline__ void reduce_scatter_step(float (&v)[L], int s) {
  if constexpr (HALF >= 1) {
    const bool upper = (s & HALF) != 0;
#pragma unroll
    for (int j = 0; j < HALF; ++j) {
      const float send = upper ? v[j] : v[j + HALF];
      const float keep = upper ? v[j + HALF] : v[j];
      v[j] = keep + __shfl_xor_sync(0xffffffffu, send, HALF);
    }
    reduce_scatter_step<HALF / 2, L>(v, s);
  }
}

// Sums v over the L lanes of a key group so that the lane with slice s ends with the full
// sum of element s (a reduce-scatter: L-1 shuffles for L values instead of L*log2(L)).
template <int L>
__device__ __forceinline__ float reduce_scatter(float (&v)[L], int s) {
  reduce_scatter_step<L / 2, L>(v, s);
  return v[0];
}

// The q slices [pair][8 dims at slice s] of pairs [t0, t0 + kPairTile) of the pass starting
// at pair pass0; pairs past the pass are zero.
template <int D>
__device__ __forceinline__ void load_q_tile(const ScoreKernelParams& kp, int g, int s, int pass0, int t0,
                                            int pass_pairs, float (&q)[kPairTile][8]) {
#pragma unroll
  for (int r = 0; r < kPairTile; ++r) {
    if (t0 + r < pass_pairs) {
      const int e = pass0 + t0 + r;
      const int64_t row = static_cast<int64_t>(e / kp.group) * kp.p.q_heads + g * kp.group + e % kp.group;
      load8_f32(kp.p.q + row * D + s * 8, q[r]);
    } else {
#pragma unroll
      for (int d = 0; d < 8; ++d) q[r][d] = 0.0f;
    }
  }
}

// grid (ceil(warps_per_head / kScoreWarps), Hkv); block kScoreWarps warps.
// Lane layout for one 32-key group of a chunk: L = D/8 lanes per key, each holding 8 dims
// (one 16-byte load), 32/L keys per warp-wide load, L loads per group.
template <typename T, int D>
__global__ void __launch_bounds__(kScoreWarps * 32) score_chunks_kernel(const ScoreKernelParams kp) {
  constexpr int L = D / 8;
  constexpr int kKeysPerLoad = 32 / L;
  extern __shared__ Candidate lists_smem[];  // [kScoreWarps][pairs_per_pass][top_k]
  const ScoreParams& p = kp.p;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int g = blockIdx.y;
  const int w = blockIdx.x * kScoreWarps + warp;
  if (w >= kp.warps_per_head) return;
  const int k = p.top_k;
  const int s = lane % L;
  const int sub = lane / L;
  const int64_t C = p.chunk_tokens;
  Candidate* lists = lists_smem + static_cast<size_t>(warp) * kp.pairs_per_pass * k;
  Candidate* partial = kp.partial + (static_cast<int64_t>(g) * kp.warps_per_head + w) * kp.pairs * k;

  for (int pass0 = 0; pass0 < kp.pairs; pass0 += kp.pairs_per_pass) {
    const int pass_pairs = min(kp.pairs_per_pass, kp.pairs - pass0);
    for (int i = lane; i < pass_pairs * k; i += 32) lists[i] = Candidate{0.0f, -1};
    __syncwarp();
    // The first tile's q stays in registers across chunks (the whole pass when qlen*G <= 4).
    float q_first[kPairTile][8];
    load_q_tile<D>(kp, g, s, pass0, 0, pass_pairs, q_first);
    for (int64_t slot = w; slot < p.block_count; slot += kp.warps_per_head) {
      const T* keys = static_cast<const T*>(p.k_pages[slot / p.blocks_per_page]) +
                      ((slot % p.blocks_per_page) * p.kv_heads + g) * C * D;
      const auto chunk = static_cast<int32_t>(slot * p.chunk_id_stride + p.chunk_id_offset);
      for (int t0 = 0; t0 < pass_pairs; t0 += kPairTile) {
        float q[kPairTile][8];
        if (t0 == 0) {
#pragma unroll
          for (int r = 0; r < kPairTile; ++r) {
#pragma unroll
            for (int d = 0; d < 8; ++d) q[r][d] = q_first[r][d];
          }
        } else {
          load_q_tile<D>(kp, g, s, pass0, t0, pass_pairs, q);
        }
        float best[kPairTile];
#pragma unroll
        for (int r = 0; r < kPairTile; ++r) best[r] = -INFINITY;
        for (int64_t base = 0; base < C; base += 32) {
          const bool full = base + 32 <= C;
          float part[kPairTile][L];
#pragma unroll
          for (int it = 0; it < L; ++it) {
            const int64_t key = base + it * kKeysPerLoad + sub;
            float x[8];
            if (full || key < C) {
              load8<T>(keys + key * D + s * 8, x);
            } else {
#pragma unroll
              for (int d = 0; d < 8; ++d) x[d] = 0.0f;
            }
#pragma unroll
            for (int r = 0; r < kPairTile; ++r) {
              float acc = 0.0f;
#pragma unroll
              for (int d = 0; d < 8; ++d) acc = fmaf(q[r][d], x[d], acc);
              part[r][it] = acc;
            }
          }
          const bool valid = base + s * kKeysPerLoad + sub < C;
#pragma unroll
          for (int r = 0; r < kPairTile; ++r) {
            const float dot = reduce_scatter<L>(part[r], s);
            if (valid) best[r] = fmaxf(best[r], dot);
          }
        }
#pragma unroll
        for (int r = 0; r < kPairTile; ++r) {
#pragma unroll
          for (int offset = 16; offset >= 1; offset /= 2) {
            best[r] = fmaxf(best[r], __shfl_xor_sync(0xffffffffu, best[r], offset));
          }
        }
        float mine = best[0];
#pragma unroll
        for (int r = 1; r < kPairTile; ++r) mine = lane == r ? best[r] : mine;
        if (lane < kPairTile && t0 + lane < pass_pairs) {
          topk_insert(lists + static_cast<size_t>(t0 + lane) * k, k, Candidate{mine, chunk});
        }
        __syncwarp();
      }
    }
    for (int i = lane; i < pass_pairs * k; i += 32) partial[static_cast<size_t>(pass0) * k + i] = lists[i];
    __syncwarp();
  }
}

struct MergeListsParams {
  const Candidate* partial = nullptr;  // [Hkv][warps_per_head][pairs][top_k]
  int warps_per_head = 0;
  int pairs = 0;
  int group = 0;
  int q_heads = 0;
  int64_t rows = 0;                    // qlen * H
  int top_k = 0;
  Candidate* out = nullptr;            // [rows][top_k]
};

// One warp per output (row, head): each lane folds every 32nd warp list, then a butterfly
// over the lanes merges disjoint lists. grid ceil(rows / 4), block 128.
__global__ void __launch_bounds__(128) merge_lists_kernel(const MergeListsParams mp) {
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * 4 + (threadIdx.x >> 5);
  if (row >= mp.rows) return;
  const int k = mp.top_k;
  const int64_t i = row / mp.q_heads;
  const int h = static_cast<int>(row % mp.q_heads);
  const int g = h / mp.group;
  const int e = static_cast<int>(i) * mp.group + h % mp.group;
  Candidate top[kMaxTopK];
  for (int s = 0; s < k; ++s) top[s] = Candidate{0.0f, -1};
  for (int w = lane; w < mp.warps_per_head; w += 32) {
    const Candidate* list = mp.partial + ((static_cast<int64_t>(g) * mp.warps_per_head + w) * mp.pairs + e) * k;
    for (int s = 0; s < k; ++s) {
      const Candidate c = list[s];
      if (c.chunk < 0 || !candidate_before(c, top[k - 1])) break;
      topk_insert(top, k, c);
    }
  }
  for (int offset = 16; offset >= 1; offset /= 2) {
    Candidate other[kMaxTopK];
    for (int s = 0; s < k; ++s) {
      other[s].score = __shfl_xor_sync(0xffffffffu, top[s].score, offset);
      other[s].chunk = __shfl_xor_sync(0xffffffffu, top[s].chunk, offset);
    }
    for (int s = 0; s < k; ++s) {
      if (other[s].chunk < 0 || !candidate_before(other[s], top[k - 1])) break;
      topk_insert(top, k, other[s]);
    }
  }
  if (lane == 0) {
    for (int s = 0; s < k; ++s) mp.out[row * k + s] = top[s];
  }
}

template <typename T, int D>
Status launch_score(const ScoreKernelParams& kp, const ScorePlan& plan, cudaStream_t stream) {
  const auto kernel = score_chunks_kernel<T, D>;
  REATTN_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(plan.shared_bytes)));
  const dim3 grid((plan.warps_per_head + kScoreWarps - 1) / kScoreWarps, kp.p.kv_heads);
  kernel<<<grid, kScoreWarps * 32, plan.shared_bytes, stream>>>(kp);
  REATTN_CUDA_CHECK_LAUNCH("score_chunks_kernel");
  return Status::ok();
}

}  // namespace

ScorePlan plan_score(const ScoreParams& p, const DeviceInfo& info) {
  ScorePlan plan;
  const int group = p.q_heads / p.kv_heads;
  const int pairs = static_cast<int>(p.qlen) * group;
  const int64_t target = (static_cast<int64_t>(info.sm_count) * kWarpsPerSm + p.kv_heads - 1) / p.kv_heads;
  plan.warps_per_head = static_cast<int>(std::min<int64_t>(target, p.block_count));
  const size_t list_bytes = static_cast<size_t>(p.top_k) * sizeof(Candidate);
  plan.pairs_per_pass = static_cast<int>(std::max<size_t>(1, std::min<size_t>(pairs, kListBytesPerWarp / list_bytes)));
  plan.shared_bytes = static_cast<size_t>(kScoreWarps) * plan.pairs_per_pass * list_bytes;
  plan.workspace_bytes = static_cast<size_t>(p.kv_heads) * plan.warps_per_head * pairs * list_bytes;
  return plan;
}

Status run_score(const ScoreParams& p, DType dtype, const ScorePlan& plan, void* workspace, cudaStream_t stream) {
  if (p.top_k < 1 || p.top_k > kMaxTopK) {
    return invalid_argument("score_chunks: top_k " + std::to_string(p.top_k) + " is outside [1, " +
                            std::to_string(kMaxTopK) + "] on the cuda backend");
  }
  ScoreKernelParams kp;
  kp.p = p;
  kp.group = p.q_heads / p.kv_heads;
  kp.pairs = static_cast<int>(p.qlen) * kp.group;
  kp.warps_per_head = plan.warps_per_head;
  kp.pairs_per_pass = plan.pairs_per_pass;
  kp.partial = static_cast<Candidate*>(workspace);
  if (plan.warps_per_head > 0) {
    const bool bf16 = dtype == DType::kBF16;
    if (dtype != DType::kBF16 && dtype != DType::kF16) return invalid_argument("score_chunks: storage dtype must be bf16 or f16");
    if (p.head_dim == 128) {
      REATTN_RETURN_IF_ERROR((bf16 ? launch_score<__nv_bfloat16, 128>(kp, plan, stream)
                                   : launch_score<__half, 128>(kp, plan, stream)));
    } else if (p.head_dim == 64) {
      REATTN_RETURN_IF_ERROR((bf16 ? launch_score<__nv_bfloat16, 64>(kp, plan, stream)
                                   : launch_score<__half, 64>(kp, plan, stream)));
    } else {
      return invalid_argument("score_chunks: head_dim " + std::to_string(p.head_dim) +
                              " is not supported by the cuda backend (64 or 128)");
    }
  }
  MergeListsParams mp;
  mp.partial = kp.partial;
  mp.warps_per_head = plan.warps_per_head;
  mp.pairs = kp.pairs;
  mp.group = kp.group;
  mp.q_heads = p.q_heads;
  mp.rows = p.qlen * p.q_heads;
  mp.top_k = p.top_k;
  mp.out = p.out;
  const auto blocks = static_cast<unsigned>((mp.rows + 3) / 4);
  merge_lists_kernel<<<blocks, 128, 0, stream>>>(mp);
  REATTN_CUDA_CHECK_LAUNCH("merge_lists_kernel");
  return Status::ok();
}

}  // namespace reattn::cuda
