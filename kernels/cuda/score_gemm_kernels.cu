// Chunk scoring for query blocks (many (row, head) pairs) as a fused GEMM on Hopper's wgmma:
// a CTA holds 128 pairs of one KV head (two consumer warpgroups of 64) as the A operand in
// shared memory, streams the keys of a range of its rank's chunk slots through a cp.async
// pipeline as 128-key B tiles, and reduces each 64x128 fp32 score tile in registers to chunk
// maxima and a running per-pair top-k (shared memory). No per-token score leaves the SM.
//
// q is split into hi + mid + lo parts of the storage dtype (exact for fp32 q, as in the warp
// kernel). Two variants are launched back to back: the one-pass variant (hi part only, five key
// stages) and the three-part variant (three key stages); each CTA checks on the device whether
// its pairs' q is exactly representable in the storage dtype (e.g. a model's bf16 q) and only
// the matching variant's CTA does the work, the other returns after reading q.
//
// Pipeline (every thread issues its share of each tile's cp.async loads; no warp roles):
// iteration t waits for tile t's keys (one barrier), queues the loads of tile t + stages - 2,
// issues tile t's wgmma into one of two accumulator sets, waits for tile t - 1's wgmma (one
// group stays in flight) and reduces that tile to chunk maxima and top-k inserts while tile t's
// wgmma runs.
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
#include "kernels/cuda/device_utils.cuh"
#include "kernels/cuda/kernels.h"
#include "kernels/cuda/wgmma.cuh"

namespace reattn::cuda {
namespace {

constexpr int kTileKeys = 128;    // N of a tile: key rows per pipeline stage
constexpr int kTilePairs = 128;   // M of a CTA: 64 pairs per consumer warpgroup
constexpr int kThreads = 256;     // two warpgroups; every thread also issues the tile loads
constexpr int kParts = 3;         // hi, mid, lo of q
constexpr int kMaxChunksPerTile = kTileKeys / kMinGemmChunkTokens;
constexpr int kPtrRing = 4;       // tile address entries (written one iteration before their loads)

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

// Shared memory of one variant: q parts, key stages, then the lists and the tile tables.
template <int D, bool kSplitQ>
struct GemmLayout {
  static constexpr int kParts = kSplitQ ? 3 : 1;
  static constexpr int kStages = kSplitQ ? 3 : 5;
  static constexpr int kKBlocks = D / 64;
  static constexpr int kPartBytes = kKBlocks * kTilePairs * 128;
  static constexpr int kStageBytes = kKBlocks * kTileKeys * 128;
  static constexpr int kKeysOffset = kParts * kPartBytes;
  static constexpr int kListsOffset = kKeysOffset + kStages * kStageBytes;
  // after the lists: row_map [kTileKeys] int, tile_rows [kPtrRing][kMaxChunksPerTile] int,
  // tile_ptr [kPtrRing][kMaxChunksPerTile] pointer
  static constexpr size_t bytes(int top_k) {
    return 1024 + kListsOffset + static_cast<size_t>(kTilePairs) * top_k * sizeof(Candidate) + kTileKeys * 4 +
           kPtrRing * kMaxChunksPerTile * (4 + 8) + 16;
  }
};

// Max over the fragment's columns of n8-groups [kJLo, kJHi), rows r and r + 8, as a tree.
template <int kJLo, int kJHi>
__device__ __forceinline__ void columns_max_static(const float (&acc)[64], float& m0, float& m1) {
  constexpr int kN = kJHi - kJLo;
  float a[kN], b[kN];
#pragma unroll
  for (int j = 0; j < kN; ++j) {
    a[j] = fmaxf(acc[4 * (kJLo + j)], acc[4 * (kJLo + j) + 1]);
    b[j] = fmaxf(acc[4 * (kJLo + j) + 2], acc[4 * (kJLo + j) + 3]);
  }
#pragma unroll
  for (int w = kN / 2; w >= 1; w /= 2) {
#pragma unroll
    for (int j = 0; j < w; ++j) {
      a[j] = fmaxf(a[j], a[j + w]);
      b[j] = fmaxf(b[j], b[j + w]);
    }
  }
  m0 = a[0];
  m1 = b[0];
}

// Runtime column range [lo, hi); select-based, no branch on the accumulators.
__device__ __forceinline__ void columns_max(const float (&acc)[64], int lo, int hi, int t, float& m0, float& m1) {
  m0 = -INFINITY;
  m1 = -INFINITY;
#pragma unroll
  for (int j = 0; j < 16; ++j) {
#pragma unroll
    for (int b = 0; b < 2; ++b) {
      const int col = 8 * j + 2 * t + b;
      const bool in = col >= lo && col < hi;
      m0 = fmaxf(m0, in ? acc[4 * j + b] : -INFINITY);
      m1 = fmaxf(m1, in ? acc[4 * j + 2 + b] : -INFINITY);
    }
  }
}

__device__ __forceinline__ void quad_max(float& m0, float& m1) {
  m0 = fmaxf(m0, __shfl_xor_sync(0xffffffffu, m0, 1));
  m1 = fmaxf(m1, __shfl_xor_sync(0xffffffffu, m1, 1));
  m0 = fmaxf(m0, __shfl_xor_sync(0xffffffffu, m0, 2));
  m1 = fmaxf(m1, __shfl_xor_sync(0xffffffffu, m1, 2));
}

// grid (pair tiles, key splits, Hkv), block kThreads, 1 CTA per SM. kSeg: 64 when C == 64,
// 128 when C is a multiple of 128 (static chunk columns, overlapped reduction), 0 otherwise
// (runtime columns, reduced after the wait). kSplitQ: the three-part variant.
template <typename T, int D, int kSeg, bool kSplitQ>
__global__ void __launch_bounds__(kThreads, 1) score_gemm_kernel(const __grid_constant__ GemmKernelParams kp) {
  using L = GemmLayout<D, kSplitQ>;
  constexpr int kStages = L::kStages;
  constexpr int kAhead = kStages - 2;           // tiles loaded ahead of the one being multiplied
  constexpr int kUnits = D / 8;                 // 16-byte units per key row
  constexpr int kRowsPerPass = kThreads / kUnits;
  constexpr int kLoadsPerThread = kTileKeys / kRowsPerPass;
  constexpr bool kStatic = kSeg != 0;
  constexpr int kTileChunks = kSeg == 64 ? 2 : 1;
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
  const int tiles = static_cast<int>(tpc > 1 ? slots * tpc : (slots + cpt - 1) / cpt);

  // q of the CTA's pairs, split and swizzled; pairs past the end are zero rows.
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
    uint16_t parts[kParts][8];
#pragma unroll
    for (int u = 0; u < 8; ++u) {
      float r1, r2, r3;
      parts[0][u] = split_part<T>(x[u], r1);
      parts[1][u] = split_part<T>(r1, r2);
      parts[2][u] = split_part<T>(r2, r3);
      inexact |= r1 != 0.0f;
    }
    const uint32_t off = sm90::swizzle_offset(row, unit, kTilePairs);
#pragma unroll
    for (int part = 0; part < L::kParts; ++part) {
      const uint16_t* v = parts[part];
      *reinterpret_cast<uint4*>(q_smem + part * L::kPartBytes + off) =
          make_uint4(v[0] | (uint32_t{v[1]} << 16), v[2] | (uint32_t{v[3]} << 16), v[4] | (uint32_t{v[5]} << 16),
                     v[6] | (uint32_t{v[7]} << 16));
    }
  }
  // The other variant takes CTAs whose q does not match this one.
  if ((__syncthreads_or(inexact) != 0) != kSplitQ) return;

  for (int i = tid; i < kTilePairs * k; i += kThreads) lists[i] = Candidate{0.0f, -1};
  // Tile row -> (chunk within the tile) << 16 | token within the tile's part of the chunk; -1: padding.
  if constexpr (!kStatic) {
    for (int r = tid; r < kTileKeys; r += kThreads) {
      if (tpc > 1) {
        row_map[r] = r;
      } else {
        const int chunk = r / static_cast<int>(C);
        row_map[r] = chunk < cpt ? (chunk << 16) | (r % static_cast<int>(C)) : -1;
      }
    }
  }
  // Address of chunk `c` of tile `tile` (its first key row in this tile) and its valid rows.
  // 32-bit arithmetic (slots < 2^31): one warp computes these every iteration, and the CTA's
  // next barrier waits for it.
  const auto slot_begin = static_cast<uint32_t>(s_begin);
  const auto slot_end = static_cast<uint32_t>(s_end);
  const auto per_page = static_cast<uint32_t>(p.blocks_per_page);
  const auto head_elems = static_cast<uint32_t>(C * D);
  auto fill_tile_entry = [&](int tile, int c) {
    uint32_t slot;
    int token0, rows;
    if (tpc > 1) {
      const uint32_t chunk = static_cast<uint32_t>(tile) / static_cast<uint32_t>(tpc);
      slot = slot_begin + chunk;
      token0 = (tile - static_cast<int>(chunk) * tpc) * kTileKeys;
      rows = min(kTileKeys + 0, static_cast<int>(C) - token0);
    } else {
      slot = slot_begin + static_cast<uint32_t>(tile) * cpt + c;
      token0 = 0;
      rows = static_cast<int>(C);
    }
    const T* ptr = nullptr;
    if (tile < tiles && slot < slot_end) {
      const uint32_t page = slot / per_page;
      const uint32_t in_page = slot - page * per_page;
      ptr = static_cast<const T*>(p.k_pages[page]) +
            static_cast<size_t>(in_page * p.kv_heads + g) * head_elems + static_cast<size_t>(token0) * D;
    } else {
      rows = 0;
    }
    tile_ptr[(tile % kPtrRing) * kMaxChunksPerTile + c] = ptr;
    tile_rows[(tile % kPtrRing) * kMaxChunksPerTile + c] = rows;
  };
  const int entry_chunks = tpc > 1 ? 1 : cpt;
  for (int i = tid; i < (kAhead + 1) * entry_chunks; i += kThreads) fill_tile_entry(i / entry_chunks, i % entry_chunks);
  __syncthreads();

  // This thread's rows of a tile: r = tid / kUnits + i * kRowsPerPass, 16-byte unit tid % kUnits.
  const int unit = tid % kUnits;
  auto load_tile = [&](int tile) {
    if (tile < tiles) {
      uint8_t* stage = key_smem + (tile % kStages) * L::kStageBytes;
      const int e = (tile % kPtrRing) * kMaxChunksPerTile;
      if constexpr (kStatic) {
        // Whole chunks fill the tile: row r is token r % kSeg of chunk r / kSeg (kSeg 64), or
        // token r of the tile's part (kSeg 128); a slot past the range is zero-filled.
        const T* base[kTileChunks];
#pragma unroll
        for (int c = 0; c < kTileChunks; ++c) base[c] = tile_ptr[e + c];
#pragma unroll
        for (int i = 0; i < kLoadsPerThread; ++i) {
          const int r = tid / kUnits + i * kRowsPerPass;
          const int c = kSeg == 64 ? (i * kRowsPerPass) / 64 : 0;  // r / 64: rows of one thread stay within 64-row halves
          const int tok = kSeg == 64 ? r % 64 : r;
          const T* chunk_base = base[c];
          const void* src = chunk_base ? static_cast<const void*>(chunk_base + tok * D + unit * 8) : p.q;
          sm90::cp_async_16(stage + sm90::swizzle_offset(r, unit, kTileKeys), src, chunk_base ? 16 : 0);
        }
      } else {
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
    }
    sm90::cp_async_commit();
  };

  // The warpgroup's 64 pairs: fragment rows row0 and row0 + 8; lane t4 == 0 owns the top-k inserts
  // and keeps each list's k-th score (-inf while the list is not full) to skip most inserts.
  const int row0 = wg * 64 + warp * 16 + (lane >> 2);
  const bool pair_valid0 = pair0 + row0 < kp.pairs;
  const bool pair_valid1 = pair0 + row0 + 8 < kp.pairs;
  float thr0 = -INFINITY, thr1 = -INFINITY;
  float carry0 = -INFINITY, carry1 = -INFINITY;  // max of a chunk that spans tiles, so far

  const uint64_t desc_a = sm90::smem_descriptor(q_smem + wg * 64 * 128);
  const uint64_t desc_b = sm90::smem_descriptor(key_smem);
  auto issue_mma = [&](float(&acc)[64], int tile) {
    const uint32_t stage_off = static_cast<uint32_t>((tile % kStages) * L::kStageBytes) >> 4;
    sm90::fence_registers(acc);
    sm90::wgmma_fence();
#pragma unroll
    for (int part = 0; part < L::kParts; ++part) {
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        const uint32_t a_off = (part * L::kPartBytes + (kk / 4) * kTilePairs * 128 + (kk % 4) * 32) >> 4;
        const uint32_t b_off = ((kk / 4) * kTileKeys * 128 + (kk % 4) * 32) >> 4;
        sm90::wgmma_m64n128k16<T>(acc, desc_a + a_off, desc_b + stage_off + b_off, (part | kk) != 0);
      }
    }
    sm90::wgmma_commit();
  };

  auto insert = [&](int row, float score, int64_t slot, float& thr) {
    if (!(score > thr)) return;
    const auto chunk = static_cast<int32_t>(slot * p.chunk_id_stride + p.chunk_id_offset);
    Candidate* list = lists + row * k;
    topk_insert(list, k, Candidate{score, chunk});
    thr = list[k - 1].chunk < 0 ? -INFINITY : list[k - 1].score;
  };

  // Static columns: chunk maxima of a tile, branch-free (computed while the next wgmma runs).
  auto tile_maxima = [&](const float(&acc)[64], int tile, float(&m)[kTileChunks][2]) {
    if constexpr (kSeg == 64) {
      columns_max_static<0, 8>(acc, m[0][0], m[0][1]);
      columns_max_static<8, 16>(acc, m[1][0], m[1][1]);
      quad_max(m[0][0], m[0][1]);
      quad_max(m[1][0], m[1][1]);
    } else {
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
  auto insert_maxima = [&](const float(&m)[kTileChunks][2], int tile) {
    if (t4 != 0 || tile < 0 || tile >= tiles) return;
#pragma unroll
    for (int c = 0; c < kTileChunks; ++c) {
      int64_t slot = s_begin + static_cast<int64_t>(tile) * cpt + c;
      if (tpc > 1) {
        if (tile % tpc != tpc - 1) return;
        slot = s_begin + tile / tpc;
      }
      if (slot >= s_end) return;
      if (pair_valid0) insert(row0, m[c][0], slot, thr0);
      if (pair_valid1) insert(row0 + 8, m[c][1], slot, thr1);
    }
  };

  // Runtime columns: reduced after the wait.
  auto epilogue_generic = [&](const float(&acc)[64], int tile) {
    if (tpc > 1) {
      const int64_t slot = s_begin + tile / tpc;
      const int part = tile % tpc;
      float m0, m1;
      columns_max(acc, 0, static_cast<int>(std::min<int64_t>(kTileKeys, C - int64_t{part} * kTileKeys)), t4, m0, m1);
      quad_max(m0, m1);
      carry0 = part == 0 ? m0 : fmaxf(carry0, m0);
      carry1 = part == 0 ? m1 : fmaxf(carry1, m1);
      if (part == tpc - 1 && t4 == 0) {
        if (pair_valid0) insert(row0, carry0, slot, thr0);
        if (pair_valid1) insert(row0 + 8, carry1, slot, thr1);
      }
      return;
    }
    for (int c = 0; c < cpt; ++c) {
      const int64_t slot = s_begin + static_cast<int64_t>(tile) * cpt + c;
      if (slot >= s_end) break;
      float m0, m1;
      columns_max(acc, c * static_cast<int>(C), (c + 1) * static_cast<int>(C), t4, m0, m1);
      quad_max(m0, m1);
      if (t4 == 0) {
        if (pair_valid0) insert(row0, m0, slot, thr0);
        if (pair_valid1) insert(row0 + 8, m1, slot, thr1);
      }
    }
  };

  // Prologue: tiles 0 .. kAhead-1 in flight.
  for (int s = 0; s < kAhead; ++s) load_tile(s);
  // Iteration t: tile t has landed (cp.async groups: kAhead + t committed, tile t is group t).
  auto stage_wait = [&](int tile) {
    if constexpr (kAhead > 1) {
      sm90::cp_async_wait<kAhead - 1>();
    } else {
      sm90::cp_async_wait<0>();
    }
    sm90::fence_proxy_async();
    __syncthreads();
    // Stage of tile t + kAhead held tile t - 2, whose wgmma every warpgroup waited for before this barrier.
    load_tile(tile + kAhead);
    for (int i = tid; i < entry_chunks; i += kThreads) fill_tile_entry(tile + kAhead + 1, i);
  };
  float acc_a[64];
  if constexpr (kStatic) {
    // Two tiles per trip, A = tile t, B = tile t + 1 (an odd count ends with one empty tile of
    // zero-filled keys, never reduced): B of the previous trip is inserted while A's wgmma runs,
    // A is reduced while B's runs ("issue A, issue B, wait for A" keeps ptxas from serialising;
    // one group left in flight across the loop's back edge would not).
    float acc_b[64];
#pragma unroll
    for (int i = 0; i < 64; ++i) acc_b[i] = 0.0f;
    float m[kTileChunks][2];
    for (int tile = 0; tile < tiles; tile += 2) {
      stage_wait(tile);
      // B's maxima are read before A is issued: ptxas does not see that the previous trip's
      // wait retired B and would stall A otherwise.
      tile_maxima(acc_b, tile - 1, m);
      issue_mma(acc_a, tile);
      insert_maxima(m, tile - 1);
      stage_wait(tile + 1);
      issue_mma(acc_b, tile + 1);
      sm90::wgmma_wait<1>();
      sm90::fence_registers(acc_a);
      tile_maxima(acc_a, tile, m);
      insert_maxima(m, tile);
      sm90::wgmma_wait<0>();
      sm90::fence_registers(acc_b);
    }
    if (tiles > 0 && tiles % 2 == 0) {
      tile_maxima(acc_b, tiles - 1, m);
      insert_maxima(m, tiles - 1);
    }
  } else {
    for (int tile = 0; tile < tiles; ++tile) {
      stage_wait(tile);
      issue_mma(acc_a, tile);
      sm90::wgmma_wait<0>();
      sm90::fence_registers(acc_a);
      epilogue_generic(acc_a, tile);
    }
  }
  sm90::cp_async_wait<0>();
  __syncthreads();

  Candidate* out = kp.partial + (static_cast<int64_t>(g) * kp.key_splits + split) * kp.pairs * k;
  const int valid_pairs = min(kTilePairs + 0, kp.pairs - pair0);
  for (int i = tid; i < valid_pairs * k; i += kThreads) out[static_cast<int64_t>(pair0) * k + i] = lists[i];
}

template <typename T, int D, int kSeg, bool kSplitQ>
Status launch_variant(const GemmKernelParams& kp, const ScorePlan& plan, cudaStream_t stream) {
  const auto kernel = score_gemm_kernel<T, D, kSeg, kSplitQ>;
  const size_t bytes = GemmLayout<D, kSplitQ>::bytes(kp.p.top_k);
  REATTN_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  const dim3 grid(plan.pair_tiles, plan.key_splits, kp.p.kv_heads);
  kernel<<<grid, kThreads, bytes, stream>>>(kp);
  REATTN_CUDA_CHECK_LAUNCH("score_gemm_kernel");
  return Status::ok();
}

template <typename T, int D, int kSeg>
Status launch_gemm(const GemmKernelParams& kp, const ScorePlan& plan, cudaStream_t stream) {
  REATTN_RETURN_IF_ERROR((launch_variant<T, D, kSeg, false>(kp, plan, stream)));
  return launch_variant<T, D, kSeg, true>(kp, plan, stream);
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
  return head_dim == 128 ? std::max(GemmLayout<128, false>::bytes(top_k), GemmLayout<128, true>::bytes(top_k))
                         : std::max(GemmLayout<64, false>::bytes(top_k), GemmLayout<64, true>::bytes(top_k));
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
