// Candidate merge and recall selection on the device (DESIGN.md section 2, issue 14 item 4),
// for blocks of many rows: the per-rank top-k lists after the allgather are merged per
// (row, head) in candidate_before order, every merged candidate votes for its chunk (count, best
// score), and the recall set is the first max_recall chunks by (count desc, best score desc,
// chunk asc), returned ascending: the same function as merge_candidates + select_recall.
//
// Votes: one atomicAdd per candidate on the chunk's count and one atomicMax on its best score
// (as an order-preserving unsigned key). Ranking: a stable radix sort (CUB, from the CUDA
// toolkit) of the chunks, in ascending id order, by the 64-bit key count << 32 | best, descending:
// equal keys keep ascending ids, which is the tie rule. The first max_recall ids are sorted
// ascending by one CTA.
#include <cub/device/device_radix_sort.cuh>

#include <algorithm>
#include <cstdint>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/kernels.h"

namespace reattn::cuda {
namespace {

constexpr int kFinalThreads = 1024;
constexpr int kFinalMax = static_cast<int>(kMaxRecallOnDevice);

// Order-preserving map of floats onto unsigned ints (larger float -> larger key).
__device__ __forceinline__ uint32_t ordered_key(float x) {
  const uint32_t u = __float_as_uint(x);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

struct VoteParams {
  MergeSelectParams p;
  uint32_t* count = nullptr;      // [num_chunks]
  uint32_t* best = nullptr;       // [num_chunks] ordered_key of the best score
  uint32_t* voted = nullptr;      // chunks with a vote
};

// One thread per (row, head): merge the ranks' lists, write the merged list, vote.
__global__ void __launch_bounds__(128) merge_vote_kernel(const VoteParams vp) {
  const MergeSelectParams& p = vp.p;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= p.rows) return;
  const int k = p.top_k;
  const int64_t rank_stride = p.rank_stride > 0 ? p.rank_stride : p.rows * k;
  Candidate top[kMaxTopK];
  for (int s = 0; s < k; ++s) top[s] = Candidate{0.0f, -1};
  for (int rank = 0; rank < p.world; ++rank) {
    const Candidate* list = p.gathered + rank * rank_stride + row * k;
    for (int s = 0; s < k && list[s].chunk >= 0; ++s) topk_insert(top, k, list[s]);
  }
  for (int s = 0; s < k; ++s) {
    if (p.merged) p.merged[row * k + s] = top[s];
    const Candidate c = top[s];
    if (c.chunk < 0 || c.chunk >= p.num_chunks) continue;
    if (atomicAdd(vp.count + c.chunk, 1u) == 0u) atomicAdd(vp.voted, 1u);
    atomicMax(vp.best + c.chunk, ordered_key(c.score));
  }
}

// keys[c] = count << 32 | best (0 for a chunk without votes), ids[c] = c.
__global__ void __launch_bounds__(256) rank_keys_kernel(const uint32_t* count, const uint32_t* best, int64_t n,
                                                        uint64_t* keys, int32_t* ids) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= n) return;
  keys[c] = count[c] ? (static_cast<uint64_t>(count[c]) << 32) | best[c] : 0u;
  ids[c] = static_cast<int32_t>(c);
}

// One CTA: the first min(max_recall, voted) ranked ids, sorted ascending (bitonic in shared memory).
__global__ void __launch_bounds__(kFinalThreads) final_sort_kernel(const int32_t* ranked, const uint32_t* voted,
                                                                   int64_t max_recall, int64_t* recall,
                                                                   int64_t* recall_count) {
  __shared__ int32_t ids[kFinalMax];
  const int n = static_cast<int>(std::min<int64_t>(max_recall, *voted));
  int size = 1;
  while (size < n) size <<= 1;
  for (int i = threadIdx.x; i < size; i += blockDim.x) ids[i] = i < n ? ranked[i] : INT32_MAX;
  __syncthreads();
  for (int k = 2; k <= size; k <<= 1) {
    for (int j = k >> 1; j > 0; j >>= 1) {
      for (int i = threadIdx.x; i < size; i += blockDim.x) {
        const int partner = i ^ j;
        if (partner > i) {
          const bool up = (i & k) == 0;
          const int32_t a = ids[i], b = ids[partner];
          if ((a > b) == up) {
            ids[i] = b;
            ids[partner] = a;
          }
        }
      }
      __syncthreads();
    }
  }
  for (int i = threadIdx.x; i < n; i += blockDim.x) recall[i] = ids[i];
  if (threadIdx.x == 0) *recall_count = n;
}

// Workspace layout: count, best [num_chunks] u32; voted u32 (padded to 256); keys [2][num_chunks]
// u64; ids [2][num_chunks] i32; CUB's temporary storage.
struct Layout {
  size_t count = 0, best = 0, voted = 0, keys = 0, ids = 0, temp = 0, temp_bytes = 0, total = 0;
};

size_t align256(size_t x) { return (x + 255) / 256 * 256; }

Layout layout_for(int64_t num_chunks) {
  Layout l;
  const size_t n = static_cast<size_t>(std::max<int64_t>(num_chunks, 1));
  l.count = 0;
  l.best = align256(l.count + n * 4);
  l.voted = align256(l.best + n * 4);
  l.keys = align256(l.voted + 4);
  l.ids = align256(l.keys + 2 * n * 8);
  l.temp = align256(l.ids + 2 * n * 4);
  size_t temp_bytes = 0;
  cub::DeviceRadixSort::SortPairsDescending(static_cast<void*>(nullptr), temp_bytes, static_cast<const uint64_t*>(nullptr),
                                            static_cast<uint64_t*>(nullptr), static_cast<const int32_t*>(nullptr),
                                            static_cast<int32_t*>(nullptr), static_cast<int64_t>(n));
  l.temp_bytes = temp_bytes;
  l.total = l.temp + temp_bytes;
  return l;
}

}  // namespace

size_t merge_select_workspace_bytes(int64_t num_chunks) { return layout_for(num_chunks).total; }

Status run_merge_select(const MergeSelectParams& p, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  if (p.top_k < 1 || p.top_k > kMaxTopK) {
    return invalid_argument("merge_select: top_k " + std::to_string(p.top_k) + " is outside [1, " +
                            std::to_string(kMaxTopK) + "]");
  }
  if (p.max_recall < 0 || p.max_recall > kFinalMax) {
    return invalid_argument("merge_select: max_recall " + std::to_string(p.max_recall) + " is outside [0, " +
                            std::to_string(kFinalMax) + "]");
  }
  if (p.num_chunks < 0 || p.num_chunks > INT32_MAX || p.world < 1 || p.rows < 0 ||
      (p.rank_stride != 0 && p.rank_stride < p.rows * p.top_k)) {
    return invalid_argument("merge_select: num_chunks, world, rows or rank_stride out of range");
  }
  const Layout l = layout_for(p.num_chunks);
  if (workspace_bytes < l.total) {
    return invalid_argument("merge_select: workspace of " + std::to_string(workspace_bytes) + " bytes, " +
                            std::to_string(l.total) + " needed");
  }
  char* ws = static_cast<char*>(workspace);
  VoteParams vp;
  vp.p = p;
  vp.count = reinterpret_cast<uint32_t*>(ws + l.count);
  vp.best = reinterpret_cast<uint32_t*>(ws + l.best);
  vp.voted = reinterpret_cast<uint32_t*>(ws + l.voted);
  REATTN_CUDA_CHECK(cudaMemsetAsync(ws, 0, l.keys, stream));  // count, best, voted
  if (p.rows > 0) {
    merge_vote_kernel<<<static_cast<unsigned>((p.rows + 127) / 128), 128, 0, stream>>>(vp);
    REATTN_CUDA_CHECK_LAUNCH("merge_vote_kernel");
  }
  const int64_t n = std::max<int64_t>(p.num_chunks, 1);
  auto* keys = reinterpret_cast<uint64_t*>(ws + l.keys);
  auto* ids = reinterpret_cast<int32_t*>(ws + l.ids);
  rank_keys_kernel<<<static_cast<unsigned>((n + 255) / 256), 256, 0, stream>>>(vp.count, vp.best, p.num_chunks, keys,
                                                                                ids);
  REATTN_CUDA_CHECK_LAUNCH("rank_keys_kernel");
  size_t temp_bytes = l.temp_bytes;
  REATTN_CUDA_CHECK(cub::DeviceRadixSort::SortPairsDescending(ws + l.temp, temp_bytes, keys, keys + n, ids, ids + n,
                                                              p.num_chunks, 0, 64, stream));
  final_sort_kernel<<<1, kFinalThreads, 0, stream>>>(ids + n, vp.voted, p.max_recall, p.recall, p.recall_count);
  REATTN_CUDA_CHECK_LAUNCH("final_sort_kernel");
  return Status::ok();
}

}  // namespace reattn::cuda
