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
};

// Largest top_k the scoring kernel keeps.
constexpr int kMaxTopK = 32;

// ---- Chunk scoring (score_kernels.cu) ----
struct ScorePlan {
  int warps_per_head = 0;      // scoring warps per KV head; each keeps its own top-k lists
  int pairs_per_pass = 0;      // (row, head-in-group) pairs per pass: their lists and q fragments share shared memory
  size_t shared_bytes = 0;     // dynamic shared memory of the scoring kernel
  size_t workspace_bytes = 0;  // partial lists [Hkv][warps_per_head][qlen*G][top_k] Candidate
};
ScorePlan plan_score(const ScoreParams& p, const DeviceInfo& info);
Status run_score(const ScoreParams& p, DType dtype, const ScorePlan& plan, void* workspace, cudaStream_t stream);

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
  int splits = 0;              // key splits (each takes every splits-th segment)
  int pair_tiles = 0;          // tiles of (row, head-in-group) pairs
  size_t workspace_bytes = 0;  // partial states [splits][Hkv][qlen*G][D + 2] float
};
AttendPlan plan_attend(const AttendParams& p, const DeviceInfo& info);
// rope_cos / rope_sin: [positions > p.max_position][D/2] float tables (build_rope_table).
Status run_attend(const AttendParams& p, DType dtype, const AttendPlan& plan, const float* rope_cos,
                  const float* rope_sin, void* workspace, cudaStream_t stream);

Status run_merge_states(const MergeParams& p, cudaStream_t stream);

// ---- Block packing (pack_kernels.cu) ----
// One launch for all blocks; 16-byte loads and stores where a block's source and
// destination are 16-byte aligned, bytes otherwise.
Status run_pack_blocks(const PackParams& p, cudaStream_t stream);

// cos/sin of position * inv_freq[d] (computed in double) for positions [0, positions), d < D/2.
// inv_freq: device [D/2] double.
Status build_rope_table(const double* inv_freq, int head_dim, int64_t positions, float* cos_table, float* sin_table,
                        cudaStream_t stream);

// Reads `bytes` (a multiple of 16) at `data` once; a bandwidth probe for the benchmark.
Status run_read_probe(const void* data, size_t bytes, unsigned long long* sink, const DeviceInfo& info,
                      cudaStream_t stream);

}  // namespace reattn::cuda
