// Span recall on the GPU: position-agnostic scoring of single tokens with the per-(row, head)
// token top-k, and the copy of recalled token ranges into one message (gather).
// Scoring is one pass over the rank's mid keys, like chunk scoring: each warp streams whole
// blocks of one KV head and computes the raw dot product of every key with every (row, query
// head) of the group on the tensor cores (fp32 q split exactly into three storage-dtype
// parts, fp32 accumulation). Each warp keeps its top-k lists in shared memory with the k-th
// score as a threshold per pair; a key enters a list only when it reaches the threshold,
// which after the first keys is rare, so the pass stays bound by the key reads. A second
// kernel merges the warps' lists in candidate_before order.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <type_traits>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/device_utils.cuh"
#include "kernels/cuda/dispatch.cuh"
#include "kernels/cuda/kernels.h"

namespace reattn::cuda {
namespace {

constexpr int kWarps = 4;          // warps per CTA
constexpr int kPairTile = 4;       // (row, head) pairs per mma tile
constexpr int kWarpsPerSm = 8;     // resident scoring warps per SM
constexpr size_t kListBytesPerWarp = 8 << 10;
constexpr size_t kFragmentBytesPerCta = 64 << 10;

struct TokenScoreParams {
  ScoreParams p;
  int group = 0;             // G
  int pairs = 0;             // qlen * G
  int warps_per_head = 0;
  int pairs_per_pass = 0;
  Candidate* partial = nullptr;  // [Hkv][warps_per_head][pairs][top_k]
};

// The tensor-core product of the storage dtype T (__nv_bfloat16 or __half).
template <typename T>
struct Mma {
  static constexpr bool kHalf = std::is_same<T, __half>::value;
  // c[16x8] += a[16x16] * b[16x8], fp32 accumulation.
  static __device__ __forceinline__ void run(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                             uint32_t b0, uint32_t b1) {
    if constexpr (kHalf) {
      asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                   : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                   : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
    } else {
      asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                   : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                   : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
    }
  }
};

__device__ __forceinline__ uint32_t word_of(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// The B fragment of one tile of 4 pairs for k-step s: lane (qg, qt) = (lane / 4, lane % 4)
// covers dims [32j + 8qt + 4h, +4) (s = 2j + h), the same dims its A fragment loads of the keys.
// n-tile 0 column 2p + {0, 1} is pair p's {hi, mid} part; n-tile 1 column 2p is pair p's lo
// part. So the C fragment of lane (qg, qt) holds pair qt's three partial scores for keys qg
// and qg + 8.
template <typename T, int D>
__device__ __forceinline__ void q_fragments(const TokenScoreParams& kp, int g, int pair_base, int pairs_left,
                                            uint4 (&out)[D / 16]) {
  const int lane = threadIdx.x & 31;
  const int qt = lane & 3;
  const int p = (lane >> 2) >> 1;
  const bool second = ((lane >> 2) & 1) != 0;
  const bool valid = p < pairs_left;
  const float* q = nullptr;
  if (valid) {
    const int e = pair_base + p;
    q = kp.p.q + (static_cast<int64_t>(e / kp.group) * kp.p.q_heads + g * kp.group + e % kp.group) * D;
  }
#pragma unroll
  for (int s = 0; s < D / 16; ++s) {
    float x[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    if (valid) {
      const float4 v = __ldg(reinterpret_cast<const float4*>(q + 32 * (s / 2) + 8 * qt + 4 * (s % 2)));
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
    out[s] = second ? make_uint4(mid[0] | (mid[1] << 16), mid[2] | (mid[3] << 16), 0u, 0u)
                    : make_uint4(hi[0] | (hi[1] << 16), hi[2] | (hi[3] << 16), lo[0] | (lo[1] << 16),
                                 lo[2] | (lo[3] << 16));
  }
}

__host__ __device__ constexpr size_t token_fragment_bytes(int pairs_per_pass, int head_dim) {
  return static_cast<size_t>((pairs_per_pass + kPairTile - 1) / kPairTile) * (head_dim / 16) * 32 * sizeof(uint4);
}

// The k-th score of a list as the entry threshold (-inf while the list has an empty slot).
__device__ __forceinline__ float threshold_of(const Candidate* list, int k) {
  return list[k - 1].chunk < 0 ? -INFINITY : list[k - 1].score;
}

// Shared memory: fragments [tiles][D/16][32] uint4, lists [kWarps][pairs_per_pass][top_k],
// thresholds [kWarps][pairs_per_pass] float.
// grid (ceil(warps_per_head / kWarps), Hkv). Warp w takes block slots w, w + warps_per_head, ...
// of KV head blockIdx.y, 64 keys at a time (every load in flight before the first mma).
template <typename T, int D>
__global__ void __launch_bounds__(kWarps * 32) score_tokens_kernel(const TokenScoreParams kp) {
  constexpr int kSteps = D / 16;
  constexpr int kLoads = D / 32;
  constexpr int kRowTiles = 4;
  extern __shared__ uint4 token_smem[];
  const ScoreParams& p = kp.p;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int qg = lane >> 2;
  const int qt = lane & 3;
  const int g = blockIdx.y;
  const int w = blockIdx.x * kWarps + warp;
  const bool active = w < kp.warps_per_head;
  const int k = p.top_k;
  const int64_t C = p.chunk_tokens;
  uint4* fragments = token_smem;
  Candidate* lists_all =
      reinterpret_cast<Candidate*>(reinterpret_cast<char*>(token_smem) + token_fragment_bytes(kp.pairs_per_pass, D));
  Candidate* lists = lists_all + static_cast<size_t>(warp) * kp.pairs_per_pass * k;
  float* thresholds =
      reinterpret_cast<float*>(lists_all + static_cast<size_t>(kWarps) * kp.pairs_per_pass * k) + warp * kp.pairs_per_pass;
  Candidate* partial = kp.partial + (static_cast<int64_t>(g) * kp.warps_per_head + w) * kp.pairs * k;

  for (int pass0 = 0; pass0 < kp.pairs; pass0 += kp.pairs_per_pass) {
    const int pass_pairs = min(kp.pairs_per_pass, kp.pairs - pass0);
    const int tiles = (pass_pairs + kPairTile - 1) / kPairTile;
    __syncthreads();
    for (int t = warp; t < tiles; t += kWarps) {
      uint4 b[kSteps];
      q_fragments<T, D>(kp, g, pass0 + t * kPairTile, pass_pairs - t * kPairTile, b);
#pragma unroll
      for (int s = 0; s < kSteps; ++s) fragments[(t * kSteps + s) * 32 + lane] = b[s];
    }
    for (int i = lane; i < pass_pairs * k; i += 32) lists[i] = Candidate{0.0f, -1};
    for (int i = lane; i < pass_pairs; i += 32) thresholds[i] = -INFINITY;
    __syncthreads();
    if (!active) continue;
    for (int64_t slot = w; slot < p.block_count; slot += kp.warps_per_head) {
      const T* keys = static_cast<const T*>(p.k_pages[slot / p.blocks_per_page]) +
                      ((slot % p.blocks_per_page) * p.kv_heads + g) * C * D;
      const int64_t first = p.first_token + (slot * p.chunk_id_stride + p.chunk_id_offset) * C;
      for (int64_t base = 0; base < C; base += 16 * kRowTiles) {
        const bool full = base + 16 * kRowTiles <= C;
        uint4 rows[kRowTiles][2][kLoads];
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
#pragma unroll
          for (int j = 0; j < kLoads; ++j) {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              const uint4 bq = frag[(2 * j + h) * 32];
#pragma unroll
              for (int i = 0; i < kRowTiles; ++i) {
                const uint32_t a0 = word_of(rows[i][0][j], 2 * h);
                const uint32_t a1 = word_of(rows[i][1][j], 2 * h);
                const uint32_t a2 = word_of(rows[i][0][j], 2 * h + 1);
                const uint32_t a3 = word_of(rows[i][1][j], 2 * h + 1);
                Mma<T>::run(c0[i], a0, a1, a2, a3, bq.x, bq.y);
                Mma<T>::run(c1[i], a0, a1, a2, a3, bq.z, bq.w);
              }
            }
          }
          // Lane (qg, qt): pair e's scores of keys base + 16i + qg (lo) and + 8 (hi).
          const int e = t * kPairTile + qt;
          const bool pair_ok = e < pass_pairs;
          const float threshold = pair_ok ? thresholds[e] : INFINITY;
          bool wants = false;
#pragma unroll
          for (int i = 0; i < kRowTiles; ++i) {
            const int64_t key = base + 16 * i + qg;
            const float lo = (c0[i][0] + c0[i][1]) + c1[i][0];
            const float hi = (c0[i][2] + c0[i][3]) + c1[i][2];
            wants |= (full || key < C) && lo >= threshold;
            wants |= (full || key + 8 < C) && hi >= threshold;
          }
          // Rare after the first keys: the lanes that have a candidate insert one at a time.
          unsigned pending = __ballot_sync(0xffffffffu, wants);
          while (pending) {
            const int src = __ffs(pending) - 1;
            pending &= pending - 1;
            if (lane == src) {
              Candidate* list = lists + static_cast<size_t>(e) * k;
#pragma unroll
              for (int i = 0; i < kRowTiles; ++i) {
#pragma unroll
                for (int half = 0; half < 2; ++half) {
                  const int64_t key = base + 16 * i + 8 * half + qg;
                  const float score = half == 0 ? (c0[i][0] + c0[i][1]) + c1[i][0] : (c0[i][2] + c0[i][3]) + c1[i][2];
                  if ((full || key < C) && score >= thresholds[e]) {
                    topk_insert(list, k, Candidate{score, static_cast<int32_t>(first + key)});
                    thresholds[e] = threshold_of(list, k);
                  }
                }
              }
            }
            __syncwarp();
          }
        }
      }
    }
    __syncwarp();
    for (int i = lane; i < pass_pairs * k; i += 32) partial[static_cast<size_t>(pass0) * k + i] = lists[i];
    __syncwarp();
  }
}

struct TokenMergeParams {
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
// merges the lanes' lists. grid ceil(rows / 4), block 128.
__global__ void __launch_bounds__(128) merge_token_lists_kernel(const TokenMergeParams mp) {
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * 4 + (threadIdx.x >> 5);
  if (row >= mp.rows) return;
  const int k = mp.top_k;
  const int h = static_cast<int>(row % mp.q_heads);
  const int e = static_cast<int>(row / mp.q_heads) * mp.group + h % mp.group;
  const int g = h / mp.group;
  Candidate top[kMaxTopK];
  for (int s = 0; s < k; ++s) top[s] = Candidate{0.0f, -1};
  for (int w = lane; w < mp.warps_per_head; w += 32) {
    const Candidate* list = mp.partial + ((static_cast<int64_t>(g) * mp.warps_per_head + w) * mp.pairs + e) * k;
    for (int s = 0; s < k && list[s].chunk >= 0; ++s) topk_insert(top, k, list[s]);
  }
  for (int offset = 16; offset >= 1; offset /= 2) {
    Candidate other[kMaxTopK];
    for (int s = 0; s < k; ++s) {
      other[s].score = __shfl_xor_sync(0xffffffffu, top[s].score, offset);
      other[s].chunk = __shfl_xor_sync(0xffffffffu, top[s].chunk, offset);
    }
    for (int s = 0; s < k && other[s].chunk >= 0; ++s) topk_insert(top, k, other[s]);
  }
  if (lane == 0) {
    for (int s = 0; s < k; ++s) mp.out[row * k + s] = top[s];
  }
}

template <typename T, int D>
Status launch_score_tokens(const TokenScoreParams& kp, const ScorePlan& plan, cudaStream_t stream) {
  const auto kernel = score_tokens_kernel<T, D>;
  if (plan.shared_bytes > (48u << 10)) {
    REATTN_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           static_cast<int>(plan.shared_bytes)));
  }
  const dim3 grid((plan.warps_per_head + kWarps - 1) / kWarps, kp.p.kv_heads);
  kernel<<<grid, kWarps * 32, plan.shared_bytes, stream>>>(kp);
  REATTN_CUDA_CHECK_LAUNCH("score_tokens_kernel");
  return Status::ok();
}

constexpr int kCopyThreads = 256;
constexpr size_t kCopyTileBytes = size_t{kCopyThreads} * 4 * 16;  // 16 KiB
constexpr unsigned kMaxGridY = 65535;

// grid (tiles of the largest range, min(count, kMaxGridY)). Tile blockIdx.x of ranges
// blockIdx.y, blockIdx.y + gridDim.y, ...; 16-byte vectors where aligned, bytes otherwise.
__global__ void __launch_bounds__(kCopyThreads) copy_ranges_kernel(const CopyRangesParams p) {
  const size_t tile_begin = static_cast<size_t>(blockIdx.x) * kCopyTileBytes;
  for (int64_t r = blockIdx.y; r < p.count; r += gridDim.y) {
    const CopyRange range = p.ranges[r];
    const size_t bytes = static_cast<size_t>(range.bytes);
    if (tile_begin >= bytes) continue;
    const size_t tile_end = min(tile_begin + kCopyTileBytes, bytes);
    const char* src = static_cast<const char*>(range.src);
    char* dst = static_cast<char*>(p.dst) + range.dst_offset;
    size_t done = tile_begin;
    if (((reinterpret_cast<uintptr_t>(src) | reinterpret_cast<uintptr_t>(dst)) & 15) == 0) {
      const size_t vectors = (tile_end - tile_begin) / 16;
      const auto* s = reinterpret_cast<const uint4*>(src + tile_begin);
      auto* d = reinterpret_cast<uint4*>(dst + tile_begin);
      for (size_t i = threadIdx.x; i < vectors; i += kCopyThreads) d[i] = s[i];
      done = tile_begin + vectors * 16;
    }
    for (size_t i = done + threadIdx.x; i < tile_end; i += kCopyThreads) dst[i] = src[i];
  }
}

}  // namespace

ScorePlan plan_score_tokens(const ScoreParams& p, const DeviceInfo& info) {
  ScorePlan plan;
  const int group = p.q_heads / p.kv_heads;
  const int pairs = static_cast<int>(p.qlen) * group;
  const int64_t target = (static_cast<int64_t>(info.sm_count) * kWarpsPerSm + p.kv_heads - 1) / p.kv_heads;
  plan.warps_per_head = static_cast<int>(std::min<int64_t>(target, p.block_count));
  const size_t list_bytes = static_cast<size_t>(p.top_k) * sizeof(Candidate);
  const size_t tile_bytes = token_fragment_bytes(kPairTile, p.head_dim);
  const size_t max_fragment_pairs = std::max<size_t>(1, kFragmentBytesPerCta / tile_bytes) * kPairTile;
  plan.pairs_per_pass = static_cast<int>(
      std::max<size_t>(1, std::min({static_cast<size_t>(pairs), kListBytesPerWarp / list_bytes, max_fragment_pairs})));
  plan.shared_bytes = token_fragment_bytes(plan.pairs_per_pass, p.head_dim) +
                      static_cast<size_t>(kWarps) * plan.pairs_per_pass * (list_bytes + sizeof(float));
  plan.workspace_bytes = static_cast<size_t>(p.kv_heads) * plan.warps_per_head * pairs * list_bytes;
  return plan;
}

Status run_score_tokens(const ScoreParams& p, DType dtype, const ScorePlan& plan, void* workspace,
                        cudaStream_t stream) {
  if (p.top_k < 1 || p.top_k > kMaxTopK) {
    return invalid_argument("score_tokens: top_k " + std::to_string(p.top_k) + " is outside [1, " +
                            std::to_string(kMaxTopK) + "] on the cuda backend");
  }
  TokenScoreParams kp;
  kp.p = p;
  kp.group = p.q_heads / p.kv_heads;
  kp.pairs = static_cast<int>(p.qlen) * kp.group;
  kp.warps_per_head = plan.warps_per_head;
  kp.pairs_per_pass = plan.pairs_per_pass;
  kp.partial = static_cast<Candidate*>(workspace);
  if (plan.warps_per_head > 0) {
    REATTN_RETURN_IF_ERROR(dispatch_dtype_head_dim(dtype, p.head_dim, "score_tokens", [&](auto element, auto dim) {
      return launch_score_tokens<typename decltype(element)::type, decltype(dim)::value>(kp, plan, stream);
    }));
  }
  TokenMergeParams mp;
  mp.partial = kp.partial;
  mp.warps_per_head = plan.warps_per_head;
  mp.pairs = kp.pairs;
  mp.group = kp.group;
  mp.q_heads = p.q_heads;
  mp.rows = p.qlen * p.q_heads;
  mp.top_k = p.top_k;
  mp.out = p.out;
  merge_token_lists_kernel<<<static_cast<unsigned>((mp.rows + 3) / 4), 128, 0, stream>>>(mp);
  REATTN_CUDA_CHECK_LAUNCH("merge_token_lists_kernel");
  return Status::ok();
}

Status run_copy_ranges(const CopyRangesParams& p, cudaStream_t stream) {
  if (p.count < 0) return invalid_argument("copy_ranges: count " + std::to_string(p.count) + " is negative");
  if (p.count == 0 || p.max_range_bytes <= 0) return Status::ok();
  if (!p.ranges || !p.dst) return invalid_argument("copy_ranges: null range list or destination");
  const size_t tiles = (static_cast<size_t>(p.max_range_bytes) + kCopyTileBytes - 1) / kCopyTileBytes;
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(std::min<int64_t>(p.count, kMaxGridY)));
  copy_ranges_kernel<<<grid, kCopyThreads, 0, stream>>>(p);
  REATTN_CUDA_CHECK_LAUNCH("copy_ranges_kernel");
  return Status::ok();
}

}  // namespace reattn::cuda
