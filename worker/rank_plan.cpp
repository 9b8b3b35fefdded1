#include "worker/rank_plan.h"

#include <algorithm>

namespace reattn {
namespace {

// The key segments of query i on `rank`, appended to plan->segments.
void plan_segments(const SelectedQuery& q, bool gather, int rank, int world, const ReattentionConfig& rc,
                   std::vector<size_t>& recv_slot, RankPlan* plan) {
  using Kind = SegmentSource::Kind;
  const bool is_owner = rank == q.owner_rank;
  const int64_t C = rc.chunk_tokens;
  if (is_owner && q.layout.sink_count > 0) {
    plan->segments.push_back({Kind::kSinks, 0, 0, q.layout.sink_count, 0});
  }
  for (const SpanPiece& piece : span_pieces(q, rc)) {
    const int home = home_rank(piece.block, world);
    if (home == rank && (is_owner || !gather)) {
      plan->segments.push_back({Kind::kHomeBlock, piece.block, piece.skip, piece.tokens, piece.position});
    } else if (gather && is_owner) {
      const size_t row = recv_slot[home];
      recv_slot[home] += 2 * piece.tokens;
      plan->segments.push_back({Kind::kStagedRange, static_cast<int64_t>(row), 0, piece.tokens, piece.position});
    }
  }
  for (size_t u = 0; u < q.recalled.size(); ++u) {
    const int64_t j = q.recalled[u];
    const int home = home_rank(j, world);
    const int64_t position = q.layout.recalled_position(static_cast<int64_t>(u), C);
    if (home == rank && (is_owner || !gather)) {
      plan->segments.push_back({Kind::kHomeBlock, j, 0, C, position});
    } else if (gather && is_owner) {
      const size_t slot = recv_slot[home];
      recv_slot[home] += 2;
      plan->segments.push_back({Kind::kStaging, static_cast<int64_t>(slot), 0, C, position});
    }
  }
  if (!is_owner) return;
  // The local region [local_begin, n), block by block from the ring.
  const int64_t begin = q.regions.local_begin();
  for (int64_t t = begin; t < q.regions.tokens;) {
    const int64_t block = (t - rc.sink_tokens) / C;
    const int64_t block_first = rc.sink_tokens + block * C;
    const int64_t end = std::min(q.regions.tokens, block_first + C);
    plan->segments.push_back({Kind::kRing, block, t - block_first, end - t, q.layout.local_position() + (t - begin)});
    t = end;
  }
}

}  // namespace

std::vector<SpanPiece> span_pieces(const SelectedQuery& q, const ReattentionConfig& rc) {
  std::vector<SpanPiece> pieces;
  const int64_t C = rc.chunk_tokens;
  int64_t position = q.layout.sink_count;
  for (const TokenRange& range : q.spans) {
    for (int64_t t = range.first; t < range.end;) {
      const int64_t block = (t - rc.sink_tokens) / C;
      const int64_t block_first = rc.sink_tokens + block * C;
      const int64_t end = std::min(range.end, block_first + C);
      pieces.push_back({block, t - block_first, end - t, position});
      position += end - t;
      t = end;
    }
  }
  return pieces;
}

RankPlan plan_rank(const std::vector<SelectedQuery>& queries, FinalAttention strategy, int rank, int world,
                   int reply_rank, int q_heads, int head_dim, const ReattentionConfig& rc) {
  const bool gather = strategy == FinalAttention::kGather;
  const size_t nq = queries.size();
  const size_t state_per_row = static_cast<size_t>(head_dim) + 2;
  RankPlan plan;
  plan.send_chunks.resize(world);
  plan.recv_blocks.assign(world, 0);
  plan.recv_first.assign(world, 0);
  plan.partial_peers.resize(nq);
  plan.sends_state.assign(nq, false);
  plan.state_offset.assign(nq, 0);
  plan.reply_offset.assign(nq, 0);

  // Who sends what to whom, and where each query's states live.
  for (size_t i = 0; i < nq; ++i) {
    const SelectedQuery& q = queries[i];
    if (!q.ok) continue;
    const int owner = q.owner_rank;
    const int64_t rows = q.qlen * q_heads;
    std::vector<bool> has_chunk(world, false);
    for (int64_t j : q.recalled) has_chunk[home_rank(j, world)] = true;
    const std::vector<SpanPiece> pieces = span_pieces(q, rc);
    for (const SpanPiece& piece : pieces) has_chunk[home_rank(piece.block, world)] = true;
    if (!gather) {
      if (rank == owner) {
        for (int r = 0; r < world; ++r) {
          if (r != owner && has_chunk[r]) plan.partial_peers[i].push_back(r);
        }
      } else {
        plan.sends_state[i] = has_chunk[rank];
      }
    }
    plan.state_offset[i] = plan.state_floats;
    plan.state_floats += (1 + plan.partial_peers[i].size()) * rows * state_per_row;
    if (!gather) continue;
    for (size_t u = 0; u < pieces.size(); ++u) {
      const int home = home_rank(pieces[u].block, world);
      if (home == owner) continue;
      if (rank == owner) plan.recv_blocks[home] += 2 * pieces[u].tokens;
      if (rank == home) plan.send_chunks[owner].push_back({i, static_cast<int64_t>(u)});
    }
    for (int64_t j : q.recalled) {
      const int home = home_rank(j, world);
      if (home == owner) continue;
      if (rank == owner) plan.recv_blocks[home] += 2;
      if (rank == home) plan.send_chunks[owner].push_back({i, j});
    }
  }
  for (int r = 0; r < world; ++r) {
    plan.recv_first[r] = plan.staging_blocks;
    plan.staging_blocks += plan.recv_blocks[r];
  }

  // The attention calls: both sides walk queries and chunks in the same order, so the
  // staging slots follow the senders' message order.
  std::vector<size_t> recv_slot = plan.recv_first;
  for (size_t i = 0; i < nq; ++i) {
    const SelectedQuery& q = queries[i];
    if (!q.ok) continue;
    const size_t first = plan.segments.size();
    plan_segments(q, gather, rank, world, rc, recv_slot, &plan);
    if (plan.segments.size() == first && rank != q.owner_rank) continue;
    plan.calls.push_back({i, first, plan.segments.size() - first, plan.row_info.size()});
    for (int64_t r = 0; r < q.qlen; ++r) {
      plan.row_info.push_back(row_position(q.regions, q.layout, q.mode, q.qlen, r).position);
    }
    for (int64_t r = 0; r < q.qlen; ++r) {
      plan.row_info.push_back(row_position(q.regions, q.layout, q.mode, q.qlen, r).visible_end);
    }
  }

  // Outputs owned elsewhere land on the reply rank.
  if (rank == reply_rank) {
    for (size_t i = 0; i < nq; ++i) {
      if (!queries[i].ok || queries[i].owner_rank == rank) continue;
      plan.reply_offset[i] = plan.reply_floats;
      plan.reply_floats += queries[i].qlen * q_heads * head_dim;
    }
  }
  return plan;
}

}  // namespace reattn
