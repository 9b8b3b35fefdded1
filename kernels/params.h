// Plain parameter structs of the backend operations. Pointers live in backend memory
// (host memory for the cpu backend, device memory for cuda) unless marked "host"; all are
// null by default. Shapes are in the comments.
#pragma once

#include <cstddef>
#include <cstdint>

#include "common/semantics.h"

namespace reattn {

// Position-agnostic chunk scoring and the per-(row, head) local top-k.
// Block slot s of the rank is global chunk s * chunk_id_stride + chunk_id_offset.
struct ScoreParams {
  const void* const* k_pages = nullptr;  // [pages] -> [blocks_per_page, Hkv, C, D] storage dtype
  int64_t blocks_per_page = 0;
  int64_t block_count = 0;               // slots [0, block_count) are scored
  int64_t chunk_id_stride = 1;
  int64_t chunk_id_offset = 0;
  const float* q = nullptr;              // [qlen, H, D], pre-RoPE
  int64_t qlen = 0;
  int q_heads = 0;
  int kv_heads = 0;
  int head_dim = 0;
  int64_t chunk_tokens = 0;
  int top_k = 0;
  Candidate* out = nullptr;              // [qlen, H, top_k], candidate_before order
  // score_tokens only: token t of chunk j is token first_token + j * chunk_tokens + t (S), and
  // the candidates' `chunk` field holds that token.
  int64_t first_token = 0;
};

// A run of keys of one block-like buffer [Hkv, head_stride/D, D], at consecutive layout
// positions starting at `position`.
struct KeySegment {
  const void* k = nullptr;    // storage dtype
  const void* v = nullptr;
  int64_t tokens = 0;
  int64_t head_stride = 0;    // elements between KV heads
  int64_t position = 0;       // layout position of the segment's first key
};

// Windowed attention with RoPE at layout positions over a list of key segments, producing
// the partial state (out, max, sum) of each (row, head) over those keys.
struct AttendParams {
  const KeySegment* segments = nullptr;  // [segment_count]
  int64_t segment_count = 0;
  const float* q = nullptr;              // [qlen, H, D], pre-RoPE
  const int64_t* row_position = nullptr;     // [qlen] rotary position of each row
  const int64_t* row_visible_end = nullptr;  // [qlen] keys at layout positions < this are visible
  int64_t qlen = 0;
  int q_heads = 0;
  int kv_heads = 0;
  int head_dim = 0;
  double rope_theta = 10000.0;
  RopeScaling rope_scaling;              // inverse frequencies: rope_inv_freq(D, theta, scaling)
  int64_t max_position = 0;              // every position above is < max_position
  float* out = nullptr;                  // [qlen, H, D] normalised partial output
  float* row_max = nullptr;              // [qlen, H] max logit (scaled by 1/sqrt(D))
  float* row_sum = nullptr;              // [qlen, H] sum of exp(logit - max); 0 = no visible key
};

// Owner-side merge of partial states: states [count][qlen*H] of (out[D], max, sum) folded
// into the running state `out`/`row_max`/`row_sum` ([qlen*H] rows).
struct MergeParams {
  const float* partial_out = nullptr;    // [count, rows, D]
  const float* partial_max = nullptr;    // [count, rows]
  const float* partial_sum = nullptr;    // [count, rows]
  int64_t count = 0;
  int64_t rows = 0;                      // qlen * H
  int head_dim = 0;
  float* out = nullptr;                  // [rows, D]
  float* row_max = nullptr;              // [rows]
  float* row_sum = nullptr;              // [rows]
};

// Copies `count` blocks of `block_bytes` each, from anywhere in backend memory, into one
// contiguous buffer: block b lands at dst + b * block_bytes (e.g. chunk K/V into one message).
struct PackParams {
  const void* const* src = nullptr;  // [count] block addresses; the array is in backend memory too
  int64_t count = 0;
  size_t block_bytes = 0;
  void* dst = nullptr;               // [count, block_bytes]; must not overlap any source block
};

// One piece of a scattered upload: `bytes` from the host buffer at src_offset to `dst`, in
// backend memory (e.g. one KV head's rows of an appended token, to its home block or the ring).
struct UploadPiece {
  void* dst = nullptr;
  int64_t src_offset = 0;
  int64_t bytes = 0;
};

// Candidate merge and recall selection for the rows of one query after the candidate
// allgather: merge_candidates + select_recall (common/semantics.h), exact tie rule included.
// Rank r's list of (row, head) i is at gathered + r * rank_stride + i * top_k.
struct MergeSelectParams {
  const Candidate* gathered = nullptr;  // [world] blocks of [rows][top_k], candidate_before order per list
  int world = 1;
  int64_t rank_stride = 0;              // candidates between ranks' blocks; 0: rows * top_k
  int64_t rows = 0;                     // (row, head) rows: qlen * H
  int top_k = 0;
  int64_t num_chunks = 0;               // chunk ids are in [0, num_chunks)
  int64_t max_recall = 0;               // R
  Candidate* merged = nullptr;          // [rows][top_k] merged lists (optional: null skips them)
  int64_t* recall = nullptr;            // [max_recall] recalled chunk ids, ascending
  int64_t* recall_count = nullptr;      // [1] |U|
};

}  // namespace reattn

namespace reattn {

// One piece of a CopyRangesParams list: `bytes` from `src` to dst + dst_offset.
struct CopyRange {
  const void* src = nullptr;
  int64_t dst_offset = 0;
  int64_t bytes = 0;
};

// Copies `count` byte ranges of any sizes from anywhere in backend memory into one buffer
// (span recall: a rank's recalled token ranges, per KV head, into one message for the owner).
struct CopyRangesParams {
  const CopyRange* ranges = nullptr;  // [count], in backend memory
  int64_t count = 0;
  int64_t max_range_bytes = 0;        // the largest ranges[i].bytes (host-known; sizes a launch)
  void* dst = nullptr;                // must not overlap any source range
};

}  // namespace reattn
