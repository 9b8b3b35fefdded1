// Position-agnostic chunk scoring: one pass over the rank's mid keys. Each warp streams whole
// chunks of one KV head, computes the raw dot product of every key with every (row, query
// head) of the group on the tensor cores (fp32 q split exactly into three parts, fp32
// accumulation), keeps the per-chunk max in registers and the per-(row, head) top-k in
// shared memory; no per-token score reaches device memory. A second small kernel merges the
// warps' lists into the per-(row, head) top-k in candidate_before order.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/device_utils.cuh"
#include "kernels/cuda/dispatch.cuh"
#include "kernels/cuda/kernels.h"

namespace reattn::cuda {
namespace {

constexpr int kScoreWarps = 4;         // warps per CTA
constexpr int kPairTile = 4;           // (row, head) pairs computed together in registers
constexpr int kWarpsPerSm = 8;         // resident scoring warps per SM (2 CTAs; registers and shared memory allow it)
constexpr size_t kListBytesPerWarp = 8 << 10;
constexpr size_t kFragmentBytesPerCta = 64 << 10;  // q B fragments of one pass, all warps

struct ScoreKernelParams {
  ScoreParams p;
  int group = 0;             // G
  int pairs = 0;             // qlen * G
  int warps_per_head = 0;
  int pairs_per_pass = 0;
  Candidate* partial = nullptr;  // [Hkv][warps_per_head][pairs][top_k]
};

// Tensor-core scoring with fp32 q. q is split into three parts of the storage dtype
// (hi + mid + lo: 3 x 8 mantissa bits cover fp32's 24 for bf16; 3 x 11 for f16, where parts
// below f16's subnormal range lose their last bits), each part multiplies the 16-bit keys
// exactly, and the mma accumulates in fp32: the score is an fp32-accumulated dot of the fp32 q
// with the stored keys, as an FMA loop would give, in another summation order.
template <typename T>
struct MmaOps;

template <>
struct MmaOps<__nv_bfloat16> {
  // c[16x8] += a[16x16] * b[16x8], fp32 accumulation.
  static __device__ __forceinline__ void mma(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                             uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
};

template <>
struct MmaOps<__half> {
  static __device__ __forceinline__ void mma(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                             uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
};

__device__ __forceinline__ uint32_t word(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// Dim permutation shared by the A (keys) and B (q) fragments of m16n8k16: lane (qg, qt) =
// (lane / 4, lane % 4) loads 16 bytes = dims [32j + 8qt, 32j + 8qt + 8) of its key rows, which
// feed k-steps 2j (first 4 dims) and 2j + 1 (last 4). Within k-step (j, h), fragment k index
// 2qt + u is dim 32j + 8qt + 4h + u and 2qt + 8 + u is dim 32j + 8qt + 4h + 2 + u: a dot
// product does not care which k holds which dim as long as A and B agree.
//
// B columns (n) of one tile of 4 pairs: n-tile 0 column 2p + {0, 1} = pair p's {hi, mid}
// part; n-tile 1 column 2p = pair p's lo part, 2p + 1 zero. So the C fragment of lane
// (qg, qt) holds pair qt's three partial scores for keys qg and qg + 8.
template <typename T, int D>
__device__ __forceinline__ void build_q_fragments(const ScoreKernelParams& kp, int g, int pair_base, int pairs_left,
                                                  uint32_t (&b)[D / 16][2][2]) {
  const int lane = threadIdx.x & 31;
  const int qg = lane >> 2;
  const int qt = lane & 3;
  const int p = qg >> 1;
  const int which = qg & 1;
  const bool valid = p < pairs_left;
  const float* q = nullptr;
  if (valid) {
    const int e = pair_base + p;
    q = kp.p.q + (static_cast<int64_t>(e / kp.group) * kp.p.q_heads + g * kp.group + e % kp.group) * D;
  }
#pragma unroll
  for (int j = 0; j < D / 32; ++j) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float x[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      if (valid) {
        const float4 v = __ldg(reinterpret_cast<const float4*>(q + 32 * j + 8 * qt + 4 * h));
        x[0] = v.x;
        x[1] = v.y;
        x[2] = v.z;
        x[3] = v.w;
      }
      uint32_t hi[4], mid[4], lo[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        float r1, r2, r3;
        hi[u] = split_part<T>(x[u], r1);
        mid[u] = split_part<T>(r1, r2);
        lo[u] = split_part<T>(r2, r3);
      }
      const int s = 2 * j + h;
      if (which == 0) {
        b[s][0][0] = hi[0] | (hi[1] << 16);
        b[s][0][1] = hi[2] | (hi[3] << 16);
        b[s][1][0] = lo[0] | (lo[1] << 16);
        b[s][1][1] = lo[2] | (lo[3] << 16);
      } else {
        b[s][0][0] = mid[0] | (mid[1] << 16);
        b[s][0][1] = mid[2] | (mid[3] << 16);
        b[s][1][0] = 0u;
        b[s][1][1] = 0u;
      }
    }
  }
}

// Shared memory of one scoring CTA, from the start of its dynamic shared memory:
//   fragments [tiles_per_pass][D/16][32 lanes] uint4  q B fragments of the pass, shared by the warps
//   lists     [kScoreWarps][pairs_per_pass][top_k] Candidate
//   chunk_max [kScoreWarps][pairs_per_pass] float  running max of the chunk being scored
__host__ __device__ constexpr size_t fragment_bytes(int pairs_per_pass, int head_dim) {
  return static_cast<size_t>((pairs_per_pass + kPairTile - 1) / kPairTile) * (head_dim / 16) * 32 * sizeof(uint4);
}

// grid (ceil(warps_per_head / kScoreWarps), Hkv); block kScoreWarps warps. Each warp takes
// chunk slots w, w + warps_per_head, ... of KV head blockIdx.y. Per pass, the CTA first builds
// the q fragments of all the pass's pair tiles into shared memory; then per chunk each warp
// loads every group of 64 keys ONCE (16 KB for D=128: 32 loads of 16 bytes per lane, all in
// flight before the first mma) and runs it against every tile: per tile and 16 keys, 2 mma per
// 16 dims, a warp max over the group, carried across the chunk's groups in shared memory; at
// chunk end one top-k insert per pair into the warp's lists.
template <typename T, int D>
__global__ void __launch_bounds__(kScoreWarps * 32) score_chunks_kernel(const ScoreKernelParams kp) {
  constexpr int kSteps = D / 16;
  constexpr int kLoads = D / 32;   // 16-byte loads per key row per lane
  constexpr int kRowTiles = 4;     // 16-key m-tiles per group of 64 keys
  extern __shared__ uint4 score_smem[];
  const ScoreParams& p = kp.p;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int qg = lane >> 2;
  const int qt = lane & 3;
  const int g = blockIdx.y;
  const int w = blockIdx.x * kScoreWarps + warp;
  // Warps past warps_per_head still build fragments and meet the CTA's barriers.
  const bool active = w < kp.warps_per_head;
  const int k = p.top_k;
  const int64_t C = p.chunk_tokens;
  uint4* fragments = score_smem;
  Candidate* lists_all = reinterpret_cast<Candidate*>(reinterpret_cast<char*>(score_smem) +
                                                      fragment_bytes(kp.pairs_per_pass, D));
  Candidate* lists = lists_all + static_cast<size_t>(warp) * kp.pairs_per_pass * k;
  float* chunk_max = reinterpret_cast<float*>(lists_all + static_cast<size_t>(kScoreWarps) * kp.pairs_per_pass * k) +
                     warp * kp.pairs_per_pass;
  Candidate* partial = kp.partial + (static_cast<int64_t>(g) * kp.warps_per_head + w) * kp.pairs * k;

  for (int pass0 = 0; pass0 < kp.pairs; pass0 += kp.pairs_per_pass) {
    const int pass_pairs = min(kp.pairs_per_pass, kp.pairs - pass0);
    const int tiles = (pass_pairs + kPairTile - 1) / kPairTile;
    __syncthreads();  // the previous pass's fragments are no longer read
    for (int t = warp; t < tiles; t += kScoreWarps) {
      uint32_t b[kSteps][2][2];
      build_q_fragments<T, D>(kp, g, pass0 + t * kPairTile, pass_pairs - t * kPairTile, b);
#pragma unroll
      for (int s = 0; s < kSteps; ++s) {
        fragments[(t * kSteps + s) * 32 + lane] = make_uint4(b[s][0][0], b[s][0][1], b[s][1][0], b[s][1][1]);
      }
    }
    for (int i = lane; i < pass_pairs * k; i += 32) lists[i] = Candidate{0.0f, -1};
    __syncthreads();
    if (!active) continue;
    for (int64_t slot = w; slot < p.block_count; slot += kp.warps_per_head) {
      const T* keys = static_cast<const T*>(p.k_pages[slot / p.blocks_per_page]) +
                      ((slot % p.blocks_per_page) * p.kv_heads + g) * C * D;
      const auto chunk = static_cast<int32_t>(slot * p.chunk_id_stride + p.chunk_id_offset);
      for (int64_t base = 0; base < C; base += 16 * kRowTiles) {
        const bool full = base + 16 * kRowTiles <= C;
        uint4 rows[kRowTiles][2][kLoads];
        // Whole groups take the branch-free path, so that every load is in flight before
        // the first mma; only a chunk's ragged tail (C not a multiple of 64) is predicated.
        if (full) {
#pragma unroll
          for (int i = 0; i < kRowTiles; ++i) {
#pragma unroll
            for (int r = 0; r < 2; ++r) {
              const T* row = keys + (base + 16 * i + 8 * r + qg) * D + 8 * qt;
#pragma unroll
              for (int j = 0; j < kLoads; ++j) rows[i][r][j] = __ldg(reinterpret_cast<const uint4*>(row + 32 * j));
            }
          }
        } else {
#pragma unroll
          for (int i = 0; i < kRowTiles; ++i) {
#pragma unroll
            for (int r = 0; r < 2; ++r) {
              const int64_t key = base + 16 * i + 8 * r + qg;
#pragma unroll
              for (int j = 0; j < kLoads; ++j) {
                rows[i][r][j] = make_uint4(0u, 0u, 0u, 0u);
                if (key < C) rows[i][r][j] = __ldg(reinterpret_cast<const uint4*>(keys + key * D + 32 * j + 8 * qt));
              }
            }
          }
        }
        for (int t = 0; t < tiles; ++t) {
          const uint4* frag = fragments + t * kSteps * 32 + lane;
          float c0[kRowTiles][4], c1[kRowTiles][4];
#pragma unroll
          for (int i = 0; i < kRowTiles; ++i) {
#pragma unroll
            for (int u = 0; u < 4; ++u) c0[i][u] = c1[i][u] = 0.0f;
          }
          // k-steps outer, row tiles inner: 8 independent accumulators; each score still sums
          // its k-steps in order 0, 1, ..., so the result is v4's bit for bit.
#pragma unroll
          for (int j = 0; j < kLoads; ++j) {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              const uint4 bq = frag[(2 * j + h) * 32];
#pragma unroll
              for (int i = 0; i < kRowTiles; ++i) {
                const uint32_t a0 = word(rows[i][0][j], 2 * h);
                const uint32_t a1 = word(rows[i][1][j], 2 * h);
                const uint32_t a2 = word(rows[i][0][j], 2 * h + 1);
                const uint32_t a3 = word(rows[i][1][j], 2 * h + 1);
                MmaOps<T>::mma(c0[i], a0, a1, a2, a3, bq.x, bq.y);
                MmaOps<T>::mma(c1[i], a0, a1, a2, a3, bq.z, bq.w);
              }
            }
          }
          float best = -INFINITY;  // pair qt of tile t, over this lane's key rows
#pragma unroll
          for (int i = 0; i < kRowTiles; ++i) {
            const int64_t key = base + 16 * i + qg;
            const float score_lo = (c0[i][0] + c0[i][1]) + c1[i][0];
            const float score_hi = (c0[i][2] + c0[i][3]) + c1[i][2];
            if (full || key < C) best = fmaxf(best, score_lo);
            if (full || key + 8 < C) best = fmaxf(best, score_hi);
          }
          best = fmaxf(best, __shfl_xor_sync(0xffffffffu, best, 4));
          best = fmaxf(best, __shfl_xor_sync(0xffffffffu, best, 8));
          best = fmaxf(best, __shfl_xor_sync(0xffffffffu, best, 16));
          const int e = t * kPairTile + lane;
          if (lane < kPairTile && e < pass_pairs) chunk_max[e] = base == 0 ? best : fmaxf(chunk_max[e], best);
        }
      }
      __syncwarp();
      for (int e = lane; e < pass_pairs; e += 32) topk_insert(lists + static_cast<size_t>(e) * k, k, Candidate{chunk_max[e], chunk});
      __syncwarp();
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
  // Small passes fit the default 48 KB; raise the limit only past it.
  if (plan.shared_bytes > (48u << 10)) {
    REATTN_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           static_cast<int>(plan.shared_bytes)));
  }
  const dim3 grid((plan.warps_per_head + kScoreWarps - 1) / kScoreWarps, kp.p.kv_heads);
  kernel<<<grid, kScoreWarps * 32, plan.shared_bytes, stream>>>(kp);
  REATTN_CUDA_CHECK_LAUNCH("score_chunks_kernel");
  return Status::ok();
}

}  // namespace

namespace {

ScorePlan plan_warp(const ScoreParams& p, const DeviceInfo& info) {
  ScorePlan plan;
  plan.kernel = ScoreKernel::kWarp;
  const int group = p.q_heads / p.kv_heads;
  const int pairs = static_cast<int>(p.qlen) * group;
  const int64_t target = (static_cast<int64_t>(info.sm_count) * kWarpsPerSm + p.kv_heads - 1) / p.kv_heads;
  plan.warps_per_head = static_cast<int>(std::min<int64_t>(target, p.block_count));
  const size_t list_bytes = static_cast<size_t>(p.top_k) * sizeof(Candidate);
  // A pass is bounded by its lists (kListBytesPerWarp per warp) and by its q fragments
  // (kFragmentBytesPerCta, whole tiles), so that two CTAs fit an SM.
  const size_t tile_bytes = fragment_bytes(kPairTile, p.head_dim);
  const size_t max_fragment_pairs = std::max<size_t>(1, kFragmentBytesPerCta / tile_bytes) * kPairTile;
  plan.pairs_per_pass = static_cast<int>(
      std::max<size_t>(1, std::min({static_cast<size_t>(pairs), kListBytesPerWarp / list_bytes, max_fragment_pairs})));
  plan.shared_bytes = fragment_bytes(plan.pairs_per_pass, p.head_dim) +
                      static_cast<size_t>(kScoreWarps) * plan.pairs_per_pass * (list_bytes + sizeof(float));
  plan.workspace_bytes = static_cast<size_t>(p.kv_heads) * plan.warps_per_head * pairs * list_bytes;
  return plan;
}

// One CTA per SM. Key splits: the fewest that fill the device's waves to >= 90% (CTAs of one
// key range run side by side, so their shared key tiles come from L2), each split keeping at
// least a few tiles of keys.
ScorePlan plan_gemm(const ScoreParams& p, const DeviceInfo& info) {
  ScorePlan plan;
  plan.kernel = ScoreKernel::kGemm;
  const int group = p.q_heads / p.kv_heads;
  const int64_t pairs = p.qlen * group;
  plan.pair_tiles = static_cast<int>((pairs + score_gemm_pairs_per_cta() - 1) / score_gemm_pairs_per_cta());
  const int64_t base = static_cast<int64_t>(p.kv_heads) * plan.pair_tiles;
  const int64_t slots_per_tile = std::max(1, score_gemm_chunks_per_tile(p.chunk_tokens));
  const int64_t max_splits = std::max<int64_t>(1, p.block_count / (8 * slots_per_tile));
  int64_t splits = 1;
  for (int64_t s = 1; s <= std::min<int64_t>(max_splits, 256); ++s) {
    const int64_t ctas = base * s;
    const int64_t waves = (ctas + info.sm_count - 1) / info.sm_count;
    splits = s;
    if (static_cast<double>(ctas) / static_cast<double>(waves * info.sm_count) >= 0.9) break;
  }
  plan.slots_per_split = (p.block_count + splits - 1) / splits;
  plan.key_splits = static_cast<int>(std::max<int64_t>(1, (p.block_count + plan.slots_per_split - 1) / plan.slots_per_split));
  plan.warps_per_head = plan.key_splits;
  plan.shared_bytes = score_gemm_shared_bytes(p.head_dim, p.top_k);
  plan.workspace_bytes =
      static_cast<size_t>(p.kv_heads) * plan.key_splits * pairs * p.top_k * sizeof(Candidate);
  return plan;
}

bool gemm_supported(const ScoreParams& p, const DeviceInfo& info) {
  return info.compute_major == 9 && info.compute_minor == 0 && (p.head_dim == 64 || p.head_dim == 128) &&
         p.chunk_tokens >= kMinGemmChunkTokens && p.block_count > 0 &&
         score_gemm_shared_bytes(p.head_dim, p.top_k) <= info.max_shared_per_block;
}

}  // namespace

ScorePlan plan_score(const ScoreParams& p, const DeviceInfo& info) {
  const int64_t pairs = p.qlen * (p.q_heads / p.kv_heads);
  const bool gemm = pairs >= kMinGemmPairs && gemm_supported(p, info);
  return gemm ? plan_gemm(p, info) : plan_warp(p, info);
}

ScorePlan plan_score(const ScoreParams& p, const DeviceInfo& info, ScoreKernel force) {
  return force == ScoreKernel::kGemm && gemm_supported(p, info) ? plan_gemm(p, info) : plan_warp(p, info);
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
  if (plan.kernel == ScoreKernel::kGemm) {
    REATTN_RETURN_IF_ERROR(run_score_gemm(p, dtype, plan, kp.partial, stream));
  } else if (plan.warps_per_head > 0) {
    REATTN_RETURN_IF_ERROR(dispatch_dtype_head_dim(dtype, p.head_dim, "score_chunks", [&](auto element, auto dim) {
      return launch_score<typename decltype(element)::type, decltype(dim)::value>(kp, plan, stream);
    }));
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
