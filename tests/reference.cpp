#include "tests/reference.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <tuple>
#include <utility>

#include "common/synthetic.h"

namespace reattn::ref {
namespace {

// softmax(q·k/√D)·v over the given keys, with RoPE at the given positions.
void attend(const Context& ctx, const float* q, int64_t q_position, int g, const std::vector<int64_t>& tokens,
            const std::vector<int64_t>& positions, double* out) {
  const int D = ctx.model.head_dim;
  const int half = D / 2;
  auto rope = [&](const double* x, int64_t pos, std::vector<double>& y) {
    y.resize(D);
    for (int d = 0; d < half; ++d) {
      const double angle = static_cast<double>(pos) * inv_freq(ctx.model, d);
      y[d] = x[d] * std::cos(angle) - x[d + half] * std::sin(angle);
      y[d + half] = x[d + half] * std::cos(angle) + x[d] * std::sin(angle);
    }
  };
  std::vector<double> qd(q, q + D), qr, kr;
  rope(qd.data(), q_position, qr);
  std::vector<double> logits(tokens.size());
  double mx = -INFINITY;
  for (size_t u = 0; u < tokens.size(); ++u) {
    rope(&ctx.k[(g * ctx.n + tokens[u]) * D], positions[u], kr);
    double s = 0;
    for (int d = 0; d < D; ++d) s += qr[d] * kr[d];
    logits[u] = s / std::sqrt(static_cast<double>(D));
    mx = std::max(mx, logits[u]);
  }
  double sum = 0;
  std::fill(out, out + D, 0.0);
  for (size_t u = 0; u < tokens.size(); ++u) {
    const double w = std::exp(logits[u] - mx);
    sum += w;
    for (int d = 0; d < D; ++d) out[d] += w * ctx.v[(g * ctx.n + tokens[u]) * D + d];
  }
  for (int d = 0; d < D; ++d) out[d] /= sum;
}

// Span recall's selection: the top_k mid tokens per (row, head), votes, the cap, and the
// widened spans as a mask over the mid.
void select_tokens(const Context& ctx, const std::vector<float>& q, int64_t qlen, int64_t mid_begin, int64_t mid_end,
                   Result& res, std::vector<bool>& recalled_mask) {
  const int H = ctx.model.q_heads, G = ctx.model.q_heads / ctx.model.kv_heads, D = ctx.model.head_dim;
  const int64_t n = ctx.n, mid = mid_end - mid_begin;
  res.token_scores.assign(static_cast<size_t>(qlen) * H * mid, 0.0);
  std::map<int64_t, std::pair<int64_t, double>> votes;  // token -> (count, best score)
  for (int64_t i = 0; i < qlen; ++i) {
    for (int h = 0; h < H; ++h) {
      std::vector<std::pair<double, int64_t>> ranked;
      for (int64_t t = mid_begin; t < mid_end; ++t) {
        double s = 0;
        for (int d = 0; d < D; ++d) s += static_cast<double>(q[(i * H + h) * D + d]) * ctx.k[((h / G) * n + t) * D + d];
        res.token_scores[(i * H + h) * mid + (t - mid_begin)] = s;
        ranked.push_back({-s, t});  // ascending: best score first, then the smaller token
      }
      std::sort(ranked.begin(), ranked.end());
      for (int64_t r = 0; r < std::min<int64_t>(ctx.rc.top_k, mid); ++r) {
        auto it = votes.emplace(ranked[r].second, std::make_pair(0, -INFINITY)).first;
        it->second.first += 1;
        it->second.second = std::max(it->second.second, -ranked[r].first);
      }
    }
  }
  std::vector<std::tuple<int64_t, double, int64_t>> order;  // (-count, -best, token): ascending is the rank
  for (auto& [t, cb] : votes) order.push_back({-cb.first, -cb.second, t});
  std::sort(order.begin(), order.end());
  if (static_cast<int64_t>(order.size()) > ctx.rc.max_recall_tokens) order.resize(ctx.rc.max_recall_tokens);
  recalled_mask.assign(n, false);
  const int64_t s = ctx.rc.span_tokens;
  for (auto& o : order) {
    const int64_t t = std::get<2>(o);
    res.kept.push_back(t);
    for (int64_t u = t - s / 2; u < t - s / 2 + s; ++u) {
      if (u >= mid_begin && u < mid_end) recalled_mask[u] = true;
    }
  }
  std::sort(res.kept.begin(), res.kept.end());
  for (int64_t t = mid_begin; t < mid_end; ++t) {
    if (!recalled_mask[t]) continue;
    if (!res.spans.empty() && res.spans.back().second == t) {
      res.spans.back().second = t + 1;
    } else {
      res.spans.push_back({t, t + 1});
    }
  }
}

}  // namespace

double inv_freq(const ModelConfig& model, int d) {
  const double base = 1.0 / std::pow(model.rope_theta, 2.0 * d / model.head_dim);
  const RopeScaling& rs = model.rope_scaling;
  if (rs.type != RopeScalingType::kLlama3) return base;
  // Wavelength in positions; long ones are stretched by `factor`, short ones kept, and the
  // band between blends the two linearly in original_max_positions / wavelength.
  const double wavelength = 2.0 * M_PI / base;
  const double ratio = static_cast<double>(rs.original_max_positions) / wavelength;
  if (ratio < rs.low_freq_factor) return base / rs.factor;
  if (ratio > rs.high_freq_factor) return base;
  const double blend = (ratio - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor);
  return base * (blend + (1.0 - blend) / rs.factor);
}

Result query(const Context& ctx, const std::vector<float>& q, int64_t qlen, QueryMode mode) {
  const int64_t S = ctx.rc.sink_tokens, W = ctx.rc.local_window, C = ctx.rc.chunk_tokens;
  const int H = ctx.model.q_heads, G = ctx.model.q_heads / ctx.model.kv_heads, D = ctx.model.head_dim;
  const int64_t n = ctx.n;
  const int64_t chunks = (n - S - W >= C) ? (n - S - W) / C : 0;
  const int64_t mid_begin = S, mid_end = S + chunks * C;
  Result res;
  res.num_chunks = chunks;

  std::vector<bool> span_mask;
  if (ctx.rc.recall == RecallMode::kSpan) select_tokens(ctx, q, qlen, mid_begin, mid_end, res, span_mask);
  // Scores and per-(row, head) top-k (chunk recall).
  const int64_t chunk_count = ctx.rc.recall == RecallMode::kSpan ? 0 : chunks;
  res.scores.assign(static_cast<size_t>(qlen) * H * chunk_count, 0.0);
  std::map<int64_t, std::tuple<int64_t, double>> votes;  // chunk -> (count, best score)
  for (int64_t i = 0; i < qlen; ++i) {
    for (int h = 0; h < H; ++h) {
      const int g = h / G;
      std::vector<std::pair<double, int64_t>> ranked;
      for (int64_t j = 0; j < chunk_count; ++j) {
        double best = -INFINITY;
        for (int64_t t = mid_begin + j * C; t < mid_begin + (j + 1) * C; ++t) {
          double s = 0;
          for (int d = 0; d < D; ++d) s += static_cast<double>(q[(i * H + h) * D + d]) * ctx.k[(g * n + t) * D + d];
          best = std::max(best, s);
        }
        res.scores[(i * H + h) * chunks + j] = best;
        ranked.push_back({best, j});
      }
      std::sort(ranked.begin(), ranked.end(), [](auto& a, auto& b) {
        return a.first != b.first ? a.first > b.first : a.second < b.second;
      });
      for (int64_t r = 0; r < std::min<int64_t>(ctx.rc.top_k, chunk_count); ++r) {
        auto& [count, best] = votes.emplace(ranked[r].second, std::make_tuple(0, -INFINITY)).first->second;
        ++count;
        best = std::max(best, ranked[r].first);
      }
    }
  }
  std::vector<std::tuple<int64_t, double, int64_t>> order;  // (count, best, chunk)
  for (auto& [j, cb] : votes) order.push_back({std::get<0>(cb), std::get<1>(cb), j});
  std::sort(order.begin(), order.end(), [](auto& a, auto& b) {
    if (std::get<0>(a) != std::get<0>(b)) return std::get<0>(a) > std::get<0>(b);
    if (std::get<1>(a) != std::get<1>(b)) return std::get<1>(a) > std::get<1>(b);
    return std::get<2>(a) < std::get<2>(b);
  });
  if (static_cast<int64_t>(order.size()) > ctx.rc.max_recall_chunks) order.resize(ctx.rc.max_recall_chunks);
  for (auto& o : order) res.recalled.push_back(std::get<2>(o));
  std::sort(res.recalled.begin(), res.recalled.end());

  // Layout: sinks, recalled chunks, local; positions 0..L-1.
  std::vector<int64_t> tokens;
  for (int64_t t = 0; t < std::min(S, n); ++t) tokens.push_back(t);
  for (int64_t j : res.recalled) {
    for (int64_t t = mid_begin + j * C; t < mid_begin + (j + 1) * C; ++t) tokens.push_back(t);
  }
  for (int64_t t = mid_begin; t < mid_end && !span_mask.empty(); ++t) {
    if (span_mask[t]) tokens.push_back(t);
  }
  const int64_t local_begin = chunks > 0 ? mid_end : std::min(S, n);
  for (int64_t t = local_begin; t < n; ++t) tokens.push_back(t);
  const int64_t L = static_cast<int64_t>(tokens.size());

  res.out.assign(static_cast<size_t>(qlen) * H * D, 0.0);
  for (int64_t i = 0; i < qlen; ++i) {
    int64_t qpos = L, visible = L;
    if (mode == QueryMode::kTail) {
      const int64_t real = n - qlen + i;
      const auto at = std::find(tokens.begin(), tokens.end(), real);
      qpos = at - tokens.begin();
      visible = qpos + 1;
    }
    std::vector<int64_t> vis_tokens(tokens.begin(), tokens.begin() + visible);
    std::vector<int64_t> positions(visible);
    for (int64_t u = 0; u < visible; ++u) positions[u] = u;
    for (int h = 0; h < H; ++h) {
      attend(ctx, &q[(i * H + h) * D], qpos, h / G, vis_tokens, positions, &res.out[(i * H + h) * D]);
    }
  }
  return res;
}

std::vector<double> causal_attention(const Context& ctx, const std::vector<float>& q, int64_t qlen, QueryMode mode) {
  const int H = ctx.model.q_heads, G = ctx.model.q_heads / ctx.model.kv_heads, D = ctx.model.head_dim;
  std::vector<double> out(static_cast<size_t>(qlen) * H * D);
  for (int64_t i = 0; i < qlen; ++i) {
    const int64_t pos = mode == QueryMode::kTail ? ctx.n - qlen + i : ctx.n;
    const int64_t visible = mode == QueryMode::kTail ? pos + 1 : ctx.n;
    std::vector<int64_t> tokens(visible);
    for (int64_t t = 0; t < visible; ++t) tokens[t] = t;
    for (int h = 0; h < H; ++h) attend(ctx, &q[(i * H + h) * D], pos, h / G, tokens, tokens, &out[(i * H + h) * D]);
  }
  return out;
}

Context synthetic_context(const ModelConfig& model, const ReattentionConfig& rc, int64_t n, uint64_t seed,
                          const std::vector<int64_t>& needles, int layer) {
  Context ctx{model, rc, n, {}, {}};
  const int D = model.head_dim;
  ctx.k.resize(static_cast<size_t>(model.kv_heads) * n * D);
  ctx.v.resize(ctx.k.size());
  const SyntheticSpec spec{seed, needles};
  std::vector<float> k(D), v(D);
  for (int g = 0; g < model.kv_heads; ++g) {
    for (int64_t t = 0; t < n; ++t) {
      synthetic_kv(spec, model, layer, g, t, k.data(), v.data());
      std::copy(k.begin(), k.end(), ctx.k.begin() + (g * n + t) * D);
      std::copy(v.begin(), v.end(), ctx.v.begin() + (g * n + t) * D);
    }
  }
  return ctx;
}

double relative_error(const std::vector<float>& got, const std::vector<double>& want) {
  if (got.size() != want.size()) return INFINITY;
  double err = 0, scale = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    if (!std::isfinite(got[i])) return INFINITY;
    err = std::max(err, std::fabs(got[i] - want[i]));
    scale = std::max(scale, std::fabs(want[i]));
  }
  return scale > 0 ? err / scale : err;
}

}  // namespace reattn::ref
