// The exact semantics of ReAttention (DESIGN.md section 2), in one place, shared by every
// backend and every rank: regions, chunk placement, the candidate order and its tie rule,
// the recall selection with its cap, the layout positions, and RoPE frequencies.
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include "common/config.h"

namespace reattn {

// Token regions of a context of n tokens, from n alone.
struct Regions {
  int64_t tokens = 0;      // n
  int64_t sink_end = 0;    // sinks are [0, sink_end) = [0, min(S, n))
  int64_t mid_end = 0;     // mid is [S, mid_end); mid_end == S (or sink_end) when there is no mid
  int64_t num_chunks = 0;  // mid chunks; chunk j covers [S + jC, S + (j+1)C)
  int64_t chunk_tokens = 0;
  int64_t sink_tokens = 0;

  bool has_mid() const { return num_chunks > 0; }
  int64_t local_begin() const { return has_mid() ? mid_end : sink_end; }
  int64_t chunk_first_token(int64_t j) const { return sink_tokens + j * chunk_tokens; }
};

Regions compute_regions(int64_t n, const ReattentionConfig& rc);

// Chunk-grid block j (tokens [S + jC, S + (j+1)C)) lives on rank j mod world.
inline int home_rank(int64_t block, int world) { return static_cast<int>(block % world); }
// Its index among the blocks of its home rank.
inline int64_t home_slot(int64_t block, int world) { return block / world; }
// Blocks of `rank` that are mid chunks: slots [0, count).
inline int64_t mid_slots_on_rank(int64_t num_chunks, int rank, int world) {
  return num_chunks > rank ? (num_chunks - rank + world - 1) / world : 0;
}

// A top-k candidate: the chunk's score for one (row, head). Crosses ranks as raw bytes.
struct Candidate {
  float score;
  int32_t chunk;  // -1: empty slot (fewer chunks than top_k)
};
static_assert(sizeof(Candidate) == 8, "Candidate crosses ranks as 8 bytes");

// The one total order of candidates: higher score first, ties to the smaller chunk id,
// empty slots last. Every backend and every merge uses it.
#if defined(__CUDACC__)
__host__ __device__
#endif
inline bool candidate_before(const Candidate& a, const Candidate& b) {
  if (a.chunk < 0 || b.chunk < 0) return a.chunk >= 0 && b.chunk < 0;
  if (a.score != b.score) return a.score > b.score;
  return a.chunk < b.chunk;
}

// Inserts `c` into the sorted list `top[0..k)` (kept in candidate_before order).
#if defined(__CUDACC__)
__host__ __device__
#endif
inline void topk_insert(Candidate* top, int k, Candidate c) {
  if (!candidate_before(c, top[k - 1])) return;
  int pos = k - 1;
  while (pos > 0 && candidate_before(c, top[pos - 1])) {
    top[pos] = top[pos - 1];
    --pos;
  }
  top[pos] = c;
}

// Merges per-rank candidate lists into the global per-(row, head) top-k.
// gathered: [world][rows][k] (each rank's local top-k); out: [rows][k].
void merge_candidates(const Candidate* gathered, int world, int64_t rows, int k, Candidate* out);

// The recall set U from the per-(row, head) top-k lists [rows][k]: the union, capped at R by
// (count desc, best score desc, chunk asc), returned sorted by chunk ascending. A chunk's
// count is the number of (row, head) whose top-k holds it; its best score is the highest
// score among those choices.
std::vector<int64_t> select_recall(const Candidate* topk, int64_t rows, int k, int64_t max_recall);

// Span recall (reattention.recall: span). A half-open token range [first, end).
struct TokenRange {
  int64_t first = 0;
  int64_t end = 0;
  int64_t tokens() const { return end - first; }
};

// The recalled tokens of span recall from the kept tokens (any order): each t widened to
// [t - s/2, t - s/2 + s), clipped to the mid [S, mid_end); overlapping or touching spans merged.
// Returns the union as ascending, disjoint, non-adjacent ranges.
std::vector<TokenRange> widen_to_spans(const std::vector<int64_t>& kept, const Regions& regions,
                                       int64_t span_tokens);

// The recalled ranges of span recall from the per-(row, head) token top-k lists [rows][k]
// (Candidate::chunk holds the token): select_recall capped at max_recall_tokens, then widened.
std::vector<TokenRange> select_spans(const Candidate* topk, int64_t rows, int k, const Regions& regions,
                                     const ReattentionConfig& rc);

// Where every key sits in the final attention, and where each query row stands.
// The layout is sinks, then the chunks of U in order, then the local tokens; index u is the
// new position.
struct Layout {
  int64_t sink_count = 0;        // keys [0, sink_count) are sinks at positions 0..
  int64_t recalled_tokens = 0;   // |U| * C
  int64_t local_count = 0;       // local tokens, at positions local_position() onward
  int64_t length() const { return sink_count + recalled_tokens + local_count; }
  int64_t recalled_position(int64_t index_in_u, int64_t chunk_tokens) const {
    return sink_count + index_in_u * chunk_tokens;
  }
  int64_t local_position() const { return sink_count + recalled_tokens; }
};

Layout make_layout(const Regions& regions, int64_t recalled_chunks);
// Span recall: the recalled ranges, in order, take layout positions sink_count onward.
Layout make_span_layout(const Regions& regions, const std::vector<TokenRange>& spans);

// Query row i's rotary position and the last layout index it may see (inclusive).
struct RowPosition {
  int64_t position;
  int64_t visible_end;  // keys with layout index < visible_end are visible
};

// tail: row i is the token at real position n - qlen + i; detached: rows stand at L and see
// everything. Requires a valid query (validate_query).
RowPosition row_position(const Regions& regions, const Layout& layout, QueryMode mode,
                         int64_t qlen, int64_t row);

// The one qlen rule, before any context is known: 1 <= qlen <= W in both modes (tail rows
// lie in the local window; detached blocks are held to the same bound, which also bounds
// every step workspace).
Status check_qlen(int64_t qlen, QueryMode mode, const ReattentionConfig& rc);

// Checks a query against a context of n tokens: check_qlen; tail needs qlen <= n; a detached
// query needs n >= 1; span recall needs n <= INT32_MAX.
Status validate_query(int64_t n, int64_t qlen, QueryMode mode, const ReattentionConfig& rc);

// inv_freq[d] = theta^(-2d/D) for d in [0, D/2), in double; with llama3 scaling, the
// long wavelengths (above original_max_positions / low_freq_factor) are divided by `factor`,
// the short ones (below original_max_positions / high_freq_factor) kept, and those between
// interpolated smoothly.
std::vector<double> rope_inv_freq(int head_dim, double theta, const RopeScaling& scaling = RopeScaling{});

// The partial attention state of one (row, head) over some keys: max logit, sum of
// exp(logit - max), and the normalised output. merge_state is the one associative merge
// used by every backend and rank (FA-style split + combine).
#if defined(__CUDACC__)
__host__ __device__
#endif
inline void merge_state(float& m, float& l, float* out, float m2, float l2, const float* out2,
                        int dim) {
  if (l2 == 0.0f) return;
  if (l == 0.0f) {
    m = m2;
    l = l2;
    for (int d = 0; d < dim; ++d) out[d] = out2[d];
    return;
  }
  const float mx = m > m2 ? m : m2;
  const float a = l * expf(m - mx);
  const float b = l2 * expf(m2 - mx);
  const float inv = 1.0f / (a + b);
  for (int d = 0; d < dim; ++d) out[d] = (out[d] * a + out2[d] * b) * inv;
  m = mx;
  l = a + b;
}

}  // namespace reattn

namespace reattn {

// KV tokens charged to `rank` for a context of n tokens owned by `owner`: the tokens of the
// blocks homed there, plus the sinks on the owner. Every rank can compute it for any rank,
// so capacity checks agree without communication.
int64_t tokens_charged(int64_t n, int owner, int rank, int world, const ReattentionConfig& rc);

// The order rule of per-layer steps: a forward pass appends `qlen` tokens to layer 0, then
// to layer 1, and so on. A step at layer 0 needs every layer at the same length; a step at
// layer l > 0 needs length(l - 1) == length(l) + qlen. OutOfOrder otherwise, naming both
// lengths. A whole-context append (every layer at once) needs every layer at the same length.
Status check_layer_step(const std::vector<int64_t>& layer_tokens, int layer, int64_t qlen);
Status check_layers_level(const std::vector<int64_t>& layer_tokens);

// The one capacity rule: growing a context owned by `owner` from n0 to n1 tokens, with
// `charged[r]` tokens charged to rank r now (all contexts, this one at n0), fits when no rank
// ends above `tokens_per_rank`. Capacity otherwise, naming the rank.
Status check_capacity(const std::vector<int64_t>& charged, int64_t n0, int64_t n1, int owner,
                      const ReattentionConfig& rc, int64_t tokens_per_rank);

// Blocks the owner keeps in its local-window replica ring: enough that the local region
// (at most W + C - 1 tokens, block-aligned start) never wraps onto itself.
inline int64_t ring_blocks(const ReattentionConfig& rc) {
  return (rc.local_window + 2 * rc.chunk_tokens - 1) / rc.chunk_tokens + 1;
}

}  // namespace reattn
