// Chunk scoring for query blocks (many (row, head) pairs) as a fused GEMM on Hopper's wgmma:
// a CTA holds 128 pairs of one KV head (two consumer warpgroups of 64) as the A operand in
// shared memory, streams the keys of a range of its rank's chunk slots through a cp.async
// pipeline as 128-key B tiles, and reduces each 64x128 fp32 score tile in registers to chunk
// maxima and a running per-pair top-k (shared memory). No per-token score leaves the SM.
//
// q is split into hi + mid + lo parts of the storage dtype (exact for fp32 q, as in the warp
// kernel); a CTA whose q is exactly representable (mid == 0 everywhere, e.g. a model's bf16 q)
// multiplies only the hi part: one pass instead of three, decided on the device.
//
// Key tiles are whole chunks: a chunk of C <= 128 tokens takes columns [qC, qC + C) of a tile
// that holds floor(128 / C) chunks; a chunk of C > 128 tokens spans ceil(C / 128) tiles and its
// maximum is carried across them. Columns past the chunks are zero-filled and never read.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/kernels.h"
#include "kernels/cuda/wgmma.cuh"

namespace reattn::cuda {
namespace {

constexpr int kTileKeys = 128;    // N of a tile: key rows per pipeline stage
constexpr int kTilePairs = 128;   // M of a CTA: 64 pairs per consumer warpgroup
constexpr int kThreads = 256;     // two warpgroups; every thread also issues the tile loads
constexpr int kStages = 3;        // key tiles in flight
constexpr int kParts = 3;         // hi, mid, lo of q
constexpr int kMaxChunksPerTile = kTileKeys / kMinGemmChunkTokens;
constexpr int kPtrRing = 4;       // tile address entries, computed one iteration before use (>= kStages + 1)

struct GemmKernelParams {
  ScoreParams p;
  int group = 0;              // G
  int pairs = 0;              // qlen * G
  int key_splits = 0;
  int64_t slots_per_split = 0;
  int chunks_per_tile = 1;    // whole chunks per tile (C <= 128), else 1
  int tiles_per_chunk = 1;    // tiles per chunk (C > 128), else 1
  Candidate* partial = nullptr;  // [Hkv][key_splits][pairs][top_k]
};

template <int D>
struct GemmLayout {
  static constexpr int kKBlocks = D / 64;
  static constexpr int kPartBytes = kKBlocks * kTilePairs * 128;
  static constexpr int kStageBytes = kKBlocks * kTileKeys * 128;
  static constexpr int kQBytes = kParts * kPartBytes;
  static constexpr int kKeysOffset = kQBytes;
  static constexpr int kListsOffset = kKeysOffset + kStages * kStageBytes;
  // after the lists: row_map [kTileKeys] int, tile_rows [kPtrRing][kMaxChunksPerTile] int,
  // tile_ptr [kPtrRing][kMaxChunksPerTile] pointer
  static constexpr size_t bytes(int top_k) {
    return 1024 + kListsOffset + static_cast<size_t>(kTilePairs) * top_k * sizeof(Candidate) + kTileKeys * 4 +
           kPtrRing * kMaxChunksPerTile * (4 + 8) + 16;
  }
};

template <typename T>
struct Split;
template <>
struct Split<__nv_bfloat16> {
  static __device__ __forceinline__ uint16_t part(float x, float& rest) {
    const __nv_bfloat16 h = __float2bfloat16_rn(x);
    rest = x - __bfloat162float(h);
    return __bfloat16_as_ushort(h);
  }
};
template <>
struct Split<__half> {
  static __device__ __forceinline__ uint16_t part(float x, float& rest) {
    const __half h = __float2half_rn(x);
    rest = x - __half2float(h);
    return __half_as_ushort(h);
  }
};

// Max over this thread's columns of the fragment in [lo, hi), rows r and r + 8.
template <int kJLo, int kJHi>
__device__ __forceinline__ void columns_max_static(const float (&acc)[64], float& m0, float& m1) {
#pragma unroll
  for (int j = kJLo; j < kJHi; ++j) {
    m0 = fmaxf(m0, fmaxf(acc[4 * j], acc[4 * j + 1]));
    m1 = fmaxf(m1, fmaxf(acc[4 * j + 2], acc[4 * j + 3]));
  }
}

__device__ __forceinline__ void columns_max(const float (&acc)[64], int lo, int hi, int t, float& m0, float& m1) {
#pragma unroll
  for (int j = 0; j < 16; ++j) {
#pragma unroll
    for (int b = 0; b < 2; ++b) {
      const int col = 8 * j + 2 * t + b;
      if (col >= lo && col < hi) {
        m0 = fmaxf(m0, acc[4 * j + b]);
        m1 = fmaxf(m1, acc[4 * j + 2 + b]);
      }
    }
  }
}

// grid (pair tiles, key splits, Hkv), block kThreads, 1 CTA per SM. kSeg: 64 when C == 64,
// 128 when C is a multiple of 128 (reductions over compile-time columns), 0 otherwise.
template <typename T, int D, int kSeg>
__global__ void __launch_bounds__(kThreads, 1) score_gemm_kernel(const __grid_constant__ GemmKernelParams kp) {
  using L = GemmLayout<D>;
  constexpr int kUnits = D / 8;                 // 16-byte units per key row
  constexpr int kRowsPerPass = kThreads / kUnits;
  constexpr int kLoadsPerThread = kTileKeys / kRowsPerPass;
  extern __shared__ uint8_t score_gemm_smem_raw[];
  uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(score_gemm_smem_raw) + 1023) & ~uintptr_t{1023});
  const ScoreParams& p = kp.p;
  const int k = p.top_k;
  uint8_t* q_smem = smem;
  uint8_t* key_smem = smem + L::kKeysOffset;
  Candidate* lists = reinterpret_cast<Candidate*>(smem + L::kListsOffset);
  int* row_map = reinterpret_cast<int*>(lists + kTilePairs * k);
  int* tile_rows = row_map + kTileKeys;
  const T** tile_ptr = reinterpret_cast<const T**>(
      (reinterpret_cast<uintptr_t>(tile_rows + kPtrRing * kMaxChunksPerTile) + 7) & ~uintptr_t{7});

  const int tid = threadIdx.x;
  const int wg = tid >> 7;
  const int warp = (tid >> 5) & 3;
  const int lane = tid & 31;
  const int t4 = lane & 3;
  const int pair0 = blockIdx.x * kTilePairs;
  const int split = blockIdx.y;
  const int g = blockIdx.z;
  const int64_t C = p.chunk_tokens;
  const int cpt = kp.chunks_per_tile;
  const int tpc = kp.tiles_per_chunk;
  const int64_t s_begin = split * kp.slots_per_split;
  const int64_t s_end = std::min<int64_t>(p.block_count, s_begin + kp.slots_per_split);
  const int64_t slots = std::max<int64_t>(0, s_end - s_begin);
  const int64_t tiles = tpc > 1 ? slots * tpc : (slots + cpt - 1) / cpt;

  // q parts of the CTA's pairs, swizzled; pairs past the end are zero rows.
  bool inexact = false;
  for (int item = tid; item < kTilePairs * kUnits; item += kThreads) {
    const int row = item / kUnits;
    const int unit = item % kUnits;
    const int e = pair0 + row;
    float x[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
    if (e < kp.pairs) {
      const float* q = p.q + (static_cast<int64_t>(e / kp.group) * p.q_heads + g * kp.group + e % kp.group) * D + unit * 8;
      const float4 a = __ldg(reinterpret_cast<const float4*>(q));
      const float4 b = __ldg(reinterpret_cast<const float4*>(q) + 1);
      x[0] = a.x, x[1] = a.y, x[2] = a.z, x[3] = a.w, x[4] = b.x, x[5] = b.y, x[6] = b.z, x[7] = b.w;
    }
    uint16_t hi[8], mid[8], lo[8];
#pragma unroll
    for (int u = 0; u < 8; ++u) {
      float r1, r2, r3;
      hi[u] = Split<T>::part(x[u], r1);
      mid[u] = Split<T>::part(r1, r2);
      lo[u] = Split<T>::part(r2, r3);
      inexact |= r1 != 0.0f;
    }
    const uint32_t off = sm90::swizzle_offset(row, unit, kTilePairs);
    const uint16_t* parts[kParts] = {hi, mid, lo};
#pragma unroll
    for (int part = 0; part < kParts; ++part) {
      const uint16_t* v = parts[part];
      *reinterpret_cast<uint4*>(q_smem + part * L::kPartBytes + off) =
          make_uint4(v[0] | (uint32_t{v[1]} << 16), v[2] | (uint32_t{v[3]} << 16), v[4] | (uint32_t{v[5]} << 16),
                     v[6] | (uint32_t{v[7]} << 16));
    }
  }
  for (int i = tid; i < kTilePairs * k; i += kThreads) lists[i] = Candidate{0.0f, -1};
  // Tile row -> (chunk within the tile) << 16 | token within the tile's part of the chunk; -1: padding.
  for (int r = tid; r < kTileKeys; r += kThreads) {
    if (tpc > 1) {
      row_map[r] = r;
    } else {
      const int chunk = r / static_cast<int>(C);
      row_map[r] = chunk < cpt ? (chunk << 16) | (r % static_cast<int>(C)) : -1;
    }
  }
  // Address of chunk `c` of tile `tile` (its first key row in this tile) and its valid rows.
  auto fill_tile_entry = [&](int64_t tile, int c) {
    int64_t slot, token0;
    int rows;
    if (tpc > 1) {
      slot = s_begin + tile / tpc;
      token0 = (tile % tpc) * kTileKeys;
      rows = static_cast<int>(std::min<int64_t>(kTileKeys, C - token0));
    } else {
      slot = s_begin + tile * cpt + c;
      token0 = 0;
      rows = static_cast<int>(C);
    }
    const T* ptr = nullptr;
    if (tile < tiles && slot < s_end) {
      ptr = static_cast<const T*>(p.k_pages[slot / p.blocks_per_page]) +
            ((slot % p.blocks_per_page) * p.kv_heads + g) * C * D + token0 * D;
    } else {
      rows = 0;
    }
    tile_ptr[(tile % kPtrRing) * kMaxChunksPerTile + c] = ptr;
    tile_rows[(tile % kPtrRing) * kMaxChunksPerTile + c] = rows;
  };
  const int entry_chunks = tpc > 1 ? 1 : cpt;
  for (int i = tid; i < kStages * entry_chunks; i += kThreads) fill_tile_entry(i / entry_chunks, i % entry_chunks);
  sm90::fence_proxy_async();
  const bool split_q = __syncthreads_or(inexact) != 0;

  auto load_tile = [&](int64_t tile) {
    if (tile < tiles) {
      uint8_t* stage = key_smem + (tile % kStages) * L::kStageBytes;
      const int e = static_cast<int>(tile % kPtrRing) * kMaxChunksPerTile;
      const int unit = tid % kUnits;
#pragma unroll
      for (int i = 0; i < kLoadsPerThread; ++i) {
        const int r = tid / kUnits + i * kRowsPerPass;
        const int m = row_map[r];
        const void* src = p.q;  // any valid address; nothing is read when bytes == 0
        int bytes = 0;
        if (m >= 0) {
          const int c = m >> 16;
          const int tok = m & 0xffff;
          if (tok < tile_rows[e + c]) {
            src = tile_ptr[e + c] + static_cast<int64_t>(tok) * D + unit * 8;
            bytes = 16;
          }
        }
        sm90::cp_async_16(stage + sm90::swizzle_offset(r, unit, kTileKeys), src, bytes);
      }
    }
    sm90::cp_async_commit();
  };

  // The warpgroup's 64 pairs: rows r0 and r0 + 8 of its fragment; lane t4 == 0 owns the top-k inserts.
  const int row0 = wg * 64 + warp * 16 + (lane >> 2);
  const bool pair_valid0 = pair0 + row0 < kp.pairs;
  const bool pair_valid1 = pair0 + row0 + 8 < kp.pairs;
  float carry0 = -INFINITY, carry1 = -INFINITY;  // max of a chunk that spans tiles, so far

  auto issue_mma = [&](float(&acc)[64], int64_t tile, auto parts_tag) {
    constexpr int kUsedParts = decltype(parts_tag)::value;
    const uint8_t* stage = key_smem + (tile % kStages) * L::kStageBytes;
    sm90::fence_registers(acc);
    sm90::wgmma_fence();
#pragma unroll
    for (int part = 0; part < kUsedParts; ++part) {
      const uint8_t* a = q_smem + part * L::kPartBytes + wg * 64 * 128;
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        const int kb = kk / 4;
        const int within = (kk % 4) * 32;
        const uint64_t da = sm90::smem_descriptor(a + kb * kTilePairs * 128 + within);
        const uint64_t db = sm90::smem_descriptor(stage + kb * kTileKeys * 128 + within);
        sm90::wgmma_m64n128k16<T>(acc, da, db, (part | kk) != 0);
      }
    }
    sm90::wgmma_commit();
  };

  auto insert = [&](int row, float score, int64_t slot) {
    const auto chunk = static_cast<int32_t>(slot * p.chunk_id_stride + p.chunk_id_offset);
    topk_insert(lists + row * k, k, Candidate{score, chunk});
  };
  auto quad_max = [](float& m0, float& m1) {
    m0 = fmaxf(m0, __shfl_xor_sync(0xffffffffu, m0, 1));
    m0 = fmaxf(m0, __shfl_xor_sync(0xffffffffu, m0, 2));
    m1 = fmaxf(m1, __shfl_xor_sync(0xffffffffu, m1, 1));
    m1 = fmaxf(m1, __shfl_xor_sync(0xffffffffu, m1, 2));
  };

  // Compile-time chunk columns (kSeg 64 or 128): the chunk maxima of the previous tile are
  // computed without branches while the current tile's wgmma runs (a branch there would make
  // ptxas serialise the wgmma), and inserted into the top-k lists after the wait.
  // kMaxima[c][r]: chunk c of the tile, fragment row r (0: row0, 1: row0 + 8).
  constexpr int kTileChunks = kSeg == 64 ? 2 : 1;
  auto tile_maxima = [&](const float(&acc)[64], int64_t tile, float(&m)[kTileChunks][2]) {
    if constexpr (kSeg == 64) {
      m[0][0] = m[0][1] = m[1][0] = m[1][1] = -INFINITY;
      columns_max_static<0, 8>(acc, m[0][0], m[0][1]);
      columns_max_static<8, 16>(acc, m[1][0], m[1][1]);
      quad_max(m[0][0], m[0][1]);
      quad_max(m[1][0], m[1][1]);
    } else {
      m[0][0] = m[0][1] = -INFINITY;
      columns_max_static<0, 16>(acc, m[0][0], m[0][1]);
      quad_max(m[0][0], m[0][1]);
      // A chunk of several tiles: its maximum so far.
      const bool first_part = tile % tpc == 0;
      carry0 = first_part ? m[0][0] : fmaxf(carry0, m[0][0]);
      carry1 = first_part ? m[0][1] : fmaxf(carry1, m[0][1]);
      m[0][0] = carry0;
      m[0][1] = carry1;
    }
  };
  auto insert_maxima = [&](const float(&m)[kTileChunks][2], int64_t tile) {
    if (t4 != 0 || tile < 0 || tile >= tiles) return;
#pragma unroll
    for (int c = 0; c < kTileChunks; ++c) {
      int64_t slot = s_begin + tile * cpt + c;
      if (tpc > 1) {
        if (tile % tpc != tpc - 1) return;
        slot = s_begin + tile / tpc;
      }
      if (slot >= s_end) return;
      if (pair_valid0) insert(row0, m[c][0], slot);
      if (pair_valid1) insert(row0 + 8, m[c][1], slot);
    }
  };

  // Any other chunk size: runtime column ranges, reduced after the wait.
  auto epilogue_generic = [&](const float(&acc)[64], int64_t tile) {
    if (tpc > 1) {
      const int64_t slot = s_begin + tile / tpc;
      const int64_t part = tile % tpc;
      float m0 = -INFINITY, m1 = -INFINITY;
      columns_max(acc, 0, static_cast<int>(std::min<int64_t>(kTileKeys, C - part * kTileKeys)), t4, m0, m1);
      quad_max(m0, m1);
      carry0 = part == 0 ? m0 : fmaxf(carry0, m0);
      carry1 = part == 0 ? m1 : fmaxf(carry1, m1);
      if (part == tpc - 1 && t4 == 0) {
        if (pair_valid0) insert(row0, carry0, slot);
        if (pair_valid1) insert(row0 + 8, carry1, slot);
      }
      return;
    }
    for (int c = 0; c < cpt; ++c) {
      const int64_t slot = s_begin + tile * cpt + c;
      if (slot >= s_end) break;
      float m0 = -INFINITY, m1 = -INFINITY;
      columns_max(acc, c * static_cast<int>(C), (c + 1) * static_cast<int>(C), t4, m0, m1);
      quad_max(m0, m1);
      if (t4 == 0) {
        if (pair_valid0) insert(row0, m0, slot);
        if (pair_valid1) insert(row0 + 8, m1, slot);
      }
    }
  };

  // Prologue: tiles 0 .. kStages-2 in flight; the address entries of tiles < kStages are ready.
  __syncthreads();
  for (int s = 0; s < kStages - 1; ++s) load_tile(s);

  // Iteration `tile`: wait for its keys, queue the loads of tile + kStages - 1, issue its
  // (asynchronous) mma. Compile-time chunk columns: reduce the previous tile from the other
  // accumulator set meanwhile (two sets, swapped by unrolling by two; an odd tile count runs one
  // empty tile of zero-filled keys). Otherwise: wait, then reduce this tile.
  auto stage_wait = [&](int64_t tile) {
    sm90::cp_async_wait<kStages - 2>();
    sm90::fence_proxy_async();
    __syncthreads();
    load_tile(tile + kStages - 1);
    for (int i = tid; i < entry_chunks; i += kThreads) fill_tile_entry(tile + kStages, i);
  };
  float acc_a[64];
  auto run = [&](auto parts_tag) {
    if constexpr (kSeg != 0) {
      float acc_b[64];
#pragma unroll
      for (int i = 0; i < 64; ++i) acc_b[i] = 0.0f;
      float m[kTileChunks][2];
      auto iteration = [&](float(&acc)[64], float(&prev)[64], int64_t tile) {
        stage_wait(tile);
        issue_mma(acc, tile, parts_tag);
        tile_maxima(prev, tile - 1, m);
        sm90::wgmma_wait<0>();
        sm90::fence_registers(acc);
        insert_maxima(m, tile - 1);
      };
      for (int64_t tile = 0; tile < tiles; tile += 2) {
        iteration(acc_a, acc_b, tile);
        iteration(acc_b, acc_a, tile + 1);
      }
      if (tiles > 0 && tiles % 2 == 0) {  // odd: reduced inside the empty tile
        tile_maxima(acc_b, tiles - 1, m);
        insert_maxima(m, tiles - 1);
      }
    } else {
      for (int64_t tile = 0; tile < tiles; ++tile) {
        stage_wait(tile);
        issue_mma(acc_a, tile, parts_tag);
        sm90::wgmma_wait<0>();
        sm90::fence_registers(acc_a);
        epilogue_generic(acc_a, tile);
      }
    }
  };
  if (split_q) {
    run(std::integral_constant<int, kParts>{});
  } else {
    run(std::integral_constant<int, 1>{});
  }
  sm90::cp_async_wait<0>();
  __syncthreads();

  Candidate* out = kp.partial + (static_cast<int64_t>(g) * kp.key_splits + split) * kp.pairs * k;
  const int valid_pairs = min(kTilePairs + 0, kp.pairs - pair0);
  for (int i = tid; i < valid_pairs * k; i += kThreads) out[static_cast<int64_t>(pair0) * k + i] = lists[i];
}

template <typename T, int D, int kSeg>
Status launch_gemm(const GemmKernelParams& kp, const ScorePlan& plan, cudaStream_t stream) {
  const auto kernel = score_gemm_kernel<T, D, kSeg>;
  REATTN_CUDA_CHECK(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(plan.shared_bytes)));
  const dim3 grid(plan.pair_tiles, plan.key_splits, kp.p.kv_heads);
  kernel<<<grid, kThreads, plan.shared_bytes, stream>>>(kp);
  REATTN_CUDA_CHECK_LAUNCH("score_gemm_kernel");
  return Status::ok();
}

template <typename T, int D>
Status launch_gemm_for_chunk(const GemmKernelParams& kp, const ScorePlan& plan, cudaStream_t stream) {
  const int64_t C = kp.p.chunk_tokens;
  if (C == 64) return launch_gemm<T, D, 64>(kp, plan, stream);
  if (C % 128 == 0) return launch_gemm<T, D, 128>(kp, plan, stream);
  return launch_gemm<T, D, 0>(kp, plan, stream);
}

}  // namespace

size_t score_gemm_shared_bytes(int head_dim, int top_k) {
  return head_dim == 128 ? GemmLayout<128>::bytes(top_k) : GemmLayout<64>::bytes(top_k);
}

int score_gemm_pairs_per_cta() { return kTilePairs; }

int score_gemm_chunks_per_tile(int64_t chunk_tokens) {
  return chunk_tokens <= kTileKeys ? static_cast<int>(kTileKeys / chunk_tokens) : 1;
}

int score_gemm_tiles_per_chunk(int64_t chunk_tokens) {
  return static_cast<int>((chunk_tokens + kTileKeys - 1) / kTileKeys);
}

Status run_score_gemm(const ScoreParams& p, DType dtype, const ScorePlan& plan, Candidate* partial,
                      cudaStream_t stream) {
  GemmKernelParams kp;
  kp.p = p;
  kp.group = p.q_heads / p.kv_heads;
  kp.pairs = static_cast<int>(p.qlen) * kp.group;
  kp.key_splits = plan.key_splits;
  kp.slots_per_split = plan.slots_per_split;
  kp.chunks_per_tile = score_gemm_chunks_per_tile(p.chunk_tokens);
  kp.tiles_per_chunk = score_gemm_tiles_per_chunk(p.chunk_tokens);
  kp.partial = partial;
  const bool bf16 = dtype == DType::kBF16;
  if (p.head_dim == 128) {
    return bf16 ? launch_gemm_for_chunk<__nv_bfloat16, 128>(kp, plan, stream)
                : launch_gemm_for_chunk<__half, 128>(kp, plan, stream);
  }
  return bf16 ? launch_gemm_for_chunk<__nv_bfloat16, 64>(kp, plan, stream)
              : launch_gemm_for_chunk<__half, 64>(kp, plan, stream);
}

}  // namespace reattn::cuda
