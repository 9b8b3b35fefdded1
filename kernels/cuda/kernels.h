// Launchers of the CUDA kernels (plain C++ declarations; the kernels live in the .cu files).
// Each op is planned on the host (grid and workspace size, no device access), then run on
// one stream into a caller-owned workspace. Nothing above these launchers knows about grids.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "common/dtype.h"
#include "common/status.h"
#include "kernels/params.h"

namespace reattn::cuda {

// What the launchers need to know about the device.
struct DeviceInfo {
  int device = 0;
  int sm_count = 1;
  size_t max_shared_per_block = 48 << 10;  // opt-in limit, bytes
  int compute_major = 0;                   // compute capability; the gemm kernels need 9 (sm_90a)
  int compute_minor = 0;
};

// Largest top_k the scoring kernel keeps.
constexpr int kMaxTopK = 32;

// ---- Chunk scoring (score_kernels.cu: warp kernel for few pairs, e.g. decode; the list merge;
// score_gemm_kernels.cu: wgmma kernel for query blocks) ----
enum class ScoreKernel { kWarp, kGemm };
struct ScorePlan {
  ScoreKernel kernel = ScoreKernel::kWarp;
  int warps_per_head = 0;      // partial top-k lists per KV head (warp kernel: one per warp; gemm: one per key split)
  int pairs_per_pass = 0;      // warp kernel: (row, head-in-group) pairs per pass (lists and q fragments in shared memory)
  int pair_tiles = 0;          // gemm kernel: CTAs of 128 pairs per KV head
  int key_splits = 0;          // gemm kernel: chunk-slot ranges per KV head (== warps_per_head)
  int64_t slots_per_split = 0;
  size_t shared_bytes = 0;     // dynamic shared memory of the scoring kernel
  size_t workspace_bytes = 0;  // partial lists [Hkv][warps_per_head][qlen*G][top_k] Candidate
};
// Picks the gemm kernel for blocks of at least kMinGemmPairs pairs per KV head (chunks of at
// least kMinGemmChunkTokens tokens, on an sm_90 device), the warp kernel otherwise; `force`
// picks one (benchmarks).
constexpr int kMinGemmPairs = 16;
constexpr int kMinGemmChunkTokens = 16;
ScorePlan plan_score(const ScoreParams& p, const DeviceInfo& info);
ScorePlan plan_score(const ScoreParams& p, const DeviceInfo& info, ScoreKernel force);
Status run_score(const ScoreParams& p, DType dtype, const ScorePlan& plan, void* workspace, cudaStream_t stream);

// The gemm kernel's pieces (score_gemm_kernels.cu), for plan_score/run_score.
size_t score_gemm_shared_bytes(int head_dim, int top_k);
int score_gemm_pairs_per_cta();
int score_gemm_chunks_per_tile(int64_t chunk_tokens);
int score_gemm_tiles_per_chunk(int64_t chunk_tokens);
// Writes partial lists [Hkv][plan.key_splits][qlen*G][top_k] (merged by run_score).
Status run_score_gemm(const ScoreParams& p, DType dtype, const ScorePlan& plan, Candidate* partial,
                      cudaStream_t stream);

// ---- Span recall (span_score_kernels.cu) ----
// Token scoring with the per-(row, head) token top-k; the plan's fields mean what they mean
// for chunk scoring.
ScorePlan plan_score_tokens(const ScoreParams& p, const DeviceInfo& info);
Status run_score_tokens(const ScoreParams& p, DType dtype, const ScorePlan& plan, void* workspace,
                        cudaStream_t stream);
// One launch for all ranges; 16-byte vectors where a range's ends are aligned.
Status run_copy_ranges(const CopyRangesParams& p, cudaStream_t stream);

// ---- Windowed attention and state merge (attend_kernels.cu) ----
struct AttendPlan {
  bool mma = false;            // tensor-core kernel (query blocks) instead of the scalar one
  int splits = 0;              // key splits (scalar: every splits-th segment; mma: ranges of 64-key tiles)
  int pair_tiles = 0;          // tiles of (row, head-in-group) pairs
  int64_t key_capacity = 0;    // mma: keys the rotated copy holds (max_position)
  size_t rotated_offset = 0;   // mma: byte offset of the rotated K, V copies and key positions
  size_t workspace_bytes = 0;  // partial states [splits][Hkv][qlen*G][D + 2] float (+ mma: rotated copies)
};
// The mma kernel takes blocks of at least kMinMmaAttendPairs (row, head) pairs per KV head.
constexpr int kMinMmaAttendPairs = 64;
AttendPlan plan_attend(const AttendParams& p, const DeviceInfo& info);
// The tensor-core attention (attend_mma_kernels.cu): rotates the step's keys once into the
// workspace, then writes the split partial states that run_attend merges.
int attend_mma_pairs_per_cta();
int attend_mma_keys_per_tile();
Status run_attend_mma(const AttendParams& p, DType dtype, const AttendPlan& plan, const float* rope_cos,
                      const float* rope_sin, void* workspace, cudaStream_t stream);
// rope_cos / rope_sin: [positions > p.max_position][D/2] float tables (build_rope_table).
Status run_attend(const AttendParams& p, DType dtype, const AttendPlan& plan, const float* rope_cos,
                  const float* rope_sin, void* workspace, cudaStream_t stream);

Status run_merge_states(const MergeParams& p, cudaStream_t stream);

// ---- Candidate merge and recall selection on the device (select_kernels.cu) ----
// MergeSelectParams (kernels/params.h): the same function as merge_candidates + select_recall,
// for blocks of many rows without a host round trip (the step calls it through
// Backend::merge_select for big queries).
using reattn::MergeSelectParams;
// Largest max_recall the device selection takes (its final sort is in shared memory).
constexpr int64_t kMaxRecallOnDevice = 4096;
size_t merge_select_workspace_bytes(int64_t num_chunks);
Status run_merge_select(const MergeSelectParams& p, void* workspace, size_t workspace_bytes, cudaStream_t stream);

// ---- Block packing (pack_kernels.cu) ----
// One launch for all blocks; 16-byte loads and stores where a block's source and
// destination are 16-byte aligned, bytes otherwise.
Status run_pack_blocks(const PackParams& p, cudaStream_t stream);
// Writes pieces[i].bytes from src + pieces[i].src_offset to pieces[i].dst, one launch for all;
// `pieces` and `src` may be mapped host memory (read once each). max_piece_bytes sizes the grid.
Status run_scatter_pieces(const UploadPiece* pieces, int64_t count, const char* src, int64_t max_piece_bytes,
                          cudaStream_t stream);

// cos/sin of position * inv_freq[d] (computed in double) for positions [0, positions), d < D/2.
// inv_freq: device [D/2] double.
Status build_rope_table(const double* inv_freq, int head_dim, int64_t positions, float* cos_table, float* sin_table,
                        cudaStream_t stream);

// Reads `bytes` (a multiple of 16) at `data` once; a bandwidth probe for the benchmark.
Status run_read_probe(const void* data, size_t bytes, unsigned long long* sink, const DeviceInfo& info,
                      cudaStream_t stream);

}  // namespace reattn::cuda
