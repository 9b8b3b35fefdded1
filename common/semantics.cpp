#include "common/semantics.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <map>

namespace reattn {

Regions compute_regions(int64_t n, const ReattentionConfig& rc) {
  Regions r;
  r.tokens = n;
  r.chunk_tokens = rc.chunk_tokens;
  r.sink_tokens = rc.sink_tokens;
  r.sink_end = std::min(rc.sink_tokens, n);
  const int64_t span = n - rc.sink_tokens - rc.local_window;
  if (span >= rc.chunk_tokens) {
    r.num_chunks = span / rc.chunk_tokens;
    r.mid_end = rc.sink_tokens + r.num_chunks * rc.chunk_tokens;
  } else {
    r.num_chunks = 0;
    r.mid_end = r.sink_end;
  }
  return r;
}

void merge_candidates(const Candidate* gathered, int world, int64_t rows, int k, Candidate* out) {
  for (int64_t row = 0; row < rows; ++row) {
    Candidate* top = out + row * k;
    for (int s = 0; s < k; ++s) top[s] = Candidate{0.0f, -1};
    for (int rank = 0; rank < world; ++rank) {
      const Candidate* list = gathered + (static_cast<int64_t>(rank) * rows + row) * k;
      for (int s = 0; s < k && list[s].chunk >= 0; ++s) topk_insert(top, k, list[s]);
    }
  }
}

std::vector<int64_t> select_recall(const Candidate* topk, int64_t rows, int k, int64_t max_recall) {
  struct Votes {
    int64_t count = 0;
    float best = -INFINITY;
  };
  std::map<int32_t, Votes> votes;
  for (int64_t i = 0; i < rows * k; ++i) {
    if (topk[i].chunk < 0) continue;
    Votes& v = votes[topk[i].chunk];
    ++v.count;
    v.best = std::max(v.best, topk[i].score);
  }
  std::vector<std::pair<int32_t, Votes>> ranked(votes.begin(), votes.end());
  if (static_cast<int64_t>(ranked.size()) > max_recall) {
    std::sort(ranked.begin(), ranked.end(), [](const auto& a, const auto& b) {
      if (a.second.count != b.second.count) return a.second.count > b.second.count;
      if (a.second.best != b.second.best) return a.second.best > b.second.best;
      return a.first < b.first;
    });
    ranked.resize(max_recall);
  }
  std::vector<int64_t> recall;
  recall.reserve(ranked.size());
  for (const auto& entry : ranked) recall.push_back(entry.first);
  std::sort(recall.begin(), recall.end());
  return recall;
}

std::vector<TokenRange> widen_to_spans(const std::vector<int64_t>& kept, const Regions& regions,
                                       int64_t span_tokens) {
  std::vector<int64_t> sorted = kept;
  std::sort(sorted.begin(), sorted.end());
  const int64_t mid_first = regions.sink_tokens;
  std::vector<TokenRange> spans;
  for (int64_t t : sorted) {
    const int64_t first = std::max(mid_first, t - span_tokens / 2);
    const int64_t end = std::min(regions.mid_end, t - span_tokens / 2 + span_tokens);
    if (first >= end) continue;
    // Sorted by t, so first is non-decreasing: merge into the last range when they meet.
    if (!spans.empty() && first <= spans.back().end) {
      spans.back().end = std::max(spans.back().end, end);
    } else {
      spans.push_back({first, end});
    }
  }
  return spans;
}

std::vector<TokenRange> select_spans(const Candidate* topk, int64_t rows, int k, const Regions& regions,
                                     const ReattentionConfig& rc) {
  return widen_to_spans(select_recall(topk, rows, k, rc.max_recall_tokens), regions, rc.span_tokens);
}

Layout make_span_layout(const Regions& regions, const std::vector<TokenRange>& spans) {
  Layout layout = make_layout(regions, 0);
  for (const TokenRange& r : spans) layout.recalled_tokens += r.tokens();
  return layout;
}

Layout make_layout(const Regions& regions, int64_t recalled_chunks) {
  Layout layout;
  layout.sink_count = regions.sink_end;
  layout.recalled_tokens = recalled_chunks * regions.chunk_tokens;
  layout.local_count = regions.tokens - regions.local_begin();
  return layout;
}

RowPosition row_position(const Regions& regions, const Layout& layout, QueryMode mode,
                         int64_t qlen, int64_t row) {
  if (mode == QueryMode::kDetached) return {layout.length(), layout.length()};
  const int64_t real = regions.tokens - qlen + row;
  // Without a mid, positions are real positions; a row may then sit among the sinks.
  const int64_t position = real < regions.local_begin()
                               ? real
                               : layout.local_position() + (real - regions.local_begin());
  return {position, position + 1};
}

Status check_qlen(int64_t qlen, QueryMode mode, const ReattentionConfig& rc) {
  if (qlen < 1) return invalid_argument("q: qlen must be >= 1, got " + std::to_string(qlen));
  if (qlen > rc.local_window) {
    return invalid_argument("q: qlen " + std::to_string(qlen) + " exceeds reattention.local_window " +
                            std::to_string(rc.local_window) + " in " + query_mode_name(mode) + " mode");
  }
  return Status::ok();
}

Status validate_query(int64_t n, int64_t qlen, QueryMode mode, const ReattentionConfig& rc) {
  REATTN_RETURN_IF_ERROR(check_qlen(qlen, mode, rc));
  // Span recall's candidates carry the token as an int32.
  if (rc.recall == RecallMode::kSpan && n > INT32_MAX) {
    return invalid_argument("context of " + std::to_string(n) + " tokens is above span recall's limit of " +
                            std::to_string(INT32_MAX) + " tokens");
  }
  if (mode == QueryMode::kDetached) {
    if (n < 1) return invalid_argument("context is empty: a query needs at least one token");
    return Status::ok();
  }
  if (qlen > n) {
    return invalid_argument("q: qlen " + std::to_string(qlen) + " exceeds the context's " +
                            std::to_string(n) + " tokens in tail mode");
  }
  return Status::ok();
}

std::vector<double> rope_inv_freq(int head_dim, double theta, const RopeScaling& scaling) {
  std::vector<double> inv(head_dim / 2);
  for (int d = 0; d < head_dim / 2; ++d) inv[d] = std::pow(theta, -2.0 * d / head_dim);
  if (scaling.type != RopeScalingType::kLlama3) return inv;
  const double original = static_cast<double>(scaling.original_max_positions);
  const double low_freq_wavelen = original / scaling.low_freq_factor;
  const double high_freq_wavelen = original / scaling.high_freq_factor;
  for (double& f : inv) {
    const double wavelen = 2.0 * M_PI / f;
    if (wavelen > low_freq_wavelen) {
      f /= scaling.factor;
    } else if (wavelen >= high_freq_wavelen) {
      const double smooth =
          (original / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor);
      f = (1.0 - smooth) * f / scaling.factor + smooth * f;
    }
  }
  return inv;
}

}  // namespace reattn

namespace reattn {

int64_t tokens_charged(int64_t n, int owner, int rank, int world, const ReattentionConfig& rc) {
  int64_t charged = rank == owner ? std::min(rc.sink_tokens, n) : 0;
  const int64_t grid_tokens = n - rc.sink_tokens;
  if (grid_tokens <= 0) return charged;
  const int64_t full_blocks = grid_tokens / rc.chunk_tokens;
  charged += mid_slots_on_rank(full_blocks, rank, world) * rc.chunk_tokens;
  const int64_t tail = grid_tokens % rc.chunk_tokens;
  if (tail > 0 && home_rank(full_blocks, world) == rank) charged += tail;
  return charged;
}

Status check_capacity(const std::vector<int64_t>& charged, int64_t n0, int64_t n1, int owner,
                      const ReattentionConfig& rc, int64_t tokens_per_rank) {
  const int world = static_cast<int>(charged.size());
  const int64_t appending = n1 - n0;
  // Larger than any rank could take: also keeps n1 from overflowing below.
  if (appending > tokens_per_rank * static_cast<int64_t>(world)) {
    return Status(ErrorCode::kCapacity, "appending " + std::to_string(appending) + " tokens is over the capacity of " +
                                            std::to_string(tokens_per_rank) + " tokens per rank on " +
                                            std::to_string(world) + " ranks");
  }
  for (int r = 0; r < world; ++r) {
    const int64_t after =
        charged[r] - tokens_charged(n0, owner, r, world, rc) + tokens_charged(n1, owner, r, world, rc);
    if (after > tokens_per_rank) {
      return Status(ErrorCode::kCapacity, "appending " + std::to_string(appending) + " tokens would put " +
                                              std::to_string(after) + " tokens on rank " + std::to_string(r) +
                                              ", above capacity.tokens_per_rank " + std::to_string(tokens_per_rank));
    }
  }
  return Status::ok();
}

Status check_layers_level(const std::vector<int64_t>& layer_tokens) {
  for (size_t l = 1; l < layer_tokens.size(); ++l) {
    if (layer_tokens[l] != layer_tokens[0]) {
      return Status(ErrorCode::kOutOfOrder, "a forward pass is under way: layer 0 holds " +
                                                std::to_string(layer_tokens[0]) + " tokens, layer " + std::to_string(l) +
                                                " holds " + std::to_string(layer_tokens[l]) +
                                                "; finish it (step every layer) before appending to all layers");
    }
  }
  return Status::ok();
}

Status check_layer_step(const std::vector<int64_t>& layer_tokens, int layer, int64_t qlen) {
  const int layers = static_cast<int>(layer_tokens.size());
  if (layer < 0 || layer >= layers) {
    return invalid_argument("layer: " + std::to_string(layer) + " is outside [0, " + std::to_string(layers) + ")");
  }
  if (layer == 0) {
    for (int l = 1; l < layers; ++l) {
      if (layer_tokens[l] != layer_tokens[0]) {
        return Status(ErrorCode::kOutOfOrder,
                      "a step at layer 0 starts a forward pass, but the last one is not finished: layer 0 holds " +
                          std::to_string(layer_tokens[0]) + " tokens, layer " + std::to_string(l) + " holds " +
                          std::to_string(layer_tokens[l]));
      }
    }
    return Status::ok();
  }
  if (layer_tokens[layer - 1] != layer_tokens[layer] + qlen) {
    return Status(ErrorCode::kOutOfOrder,
                  "a step of " + std::to_string(qlen) + " tokens at layer " + std::to_string(layer) + " needs layer " +
                      std::to_string(layer - 1) + " to hold " + std::to_string(layer_tokens[layer] + qlen) +
                      " tokens (layer " + std::to_string(layer) + " holds " + std::to_string(layer_tokens[layer]) +
                      "), but it holds " + std::to_string(layer_tokens[layer - 1]));
  }
  return Status::ok();
}

}  // namespace reattn
