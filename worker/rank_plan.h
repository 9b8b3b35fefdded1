// The planning half of a step on one rank: once the recall set of every query is known, who
// sends which chunk blocks or attention states to whom, where they land, which key segments
// each attention call reads and at which layout positions, and where each output goes.
// Pure functions of plain values (no backend, no communicator, no addresses): StepRunner
// turns the plan into transfers and kernel calls, and tests check it directly.
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

#include "common/config.h"
#include "common/semantics.h"

namespace reattn {

// One query of the step as every rank knows it after selection.
struct SelectedQuery {
  bool ok = false;                 // passed its checks on every rank
  int owner_rank = 0;
  int64_t qlen = 0;
  QueryMode mode = QueryMode::kTail;
  Regions regions;
  std::vector<int64_t> recalled;   // U, ascending (chunk recall)
  std::vector<TokenRange> spans;   // the recalled ranges, ascending (span recall)
  Layout layout;
};

// Span recall: a recalled range cut at chunk-grid block boundaries, so that it lives on one
// home rank: tokens [skip, skip + tokens) of block `block`, at layout position `position`.
struct SpanPiece {
  int64_t block = 0;
  int64_t skip = 0;
  int64_t tokens = 0;
  int64_t position = 0;
};
std::vector<SpanPiece> span_pieces(const SelectedQuery& q, const ReattentionConfig& rc);

// Where the keys of one segment come from; StepRunner resolves it to K/V addresses.
struct SegmentSource {
  enum class Kind {
    kSinks,      // the owner's sinks [Hkv, S, D]
    kHomeBlock,  // chunk-grid block `block` in this rank's home pages
    kStaging,    // a block received from another rank: K at staging slot `block`, V at `block` + 1
    kRing,       // chunk-grid block `block` in the owner's local-window ring, from token `skip`
    kStagedRange,  // span recall: a range received from another rank, at staging token row
                   // `block`: K [Hkv, tokens, D], then V [Hkv, tokens, D]
  };
  Kind kind = Kind::kSinks;
  int64_t block = 0;
  int64_t skip = 0;      // kRing, kHomeBlock: tokens of the block before the segment's first key
  int64_t tokens = 0;    // keys in the segment
  int64_t position = 0;  // layout position of its first key
};

// One windowed-attention call: a query's segments on this rank.
struct AttentionCall {
  size_t query = 0;
  size_t segment_first = 0;
  size_t segment_count = 0;
  size_t rows_first = 0;  // into RankPlan::row_info: qlen positions, then qlen visible ends
};

struct RankPlan {
  // gather: per owner rank, the (query, chunk) blocks this rank sends it, in message order
  // (queries in step order, chunks in U order; each is a K block then a V block).
  // Span recall: (query, index into span_pieces) instead, each piece K then V [Hkv, tokens, D].
  std::vector<std::vector<std::pair<size_t, int64_t>>> send_chunks;
  // gather: per sender rank, the K/V blocks (two per chunk) this rank receives from it and
  // the staging slot where that sender's message starts. Span recall counts token rows
  // (one token's K or V over all KV heads) instead of blocks.
  std::vector<size_t> recv_blocks;
  std::vector<size_t> recv_first;
  size_t staging_blocks = 0;

  // partial: per query, on its owner, the ranks whose states it receives (in slot order 1..).
  std::vector<std::vector<int>> partial_peers;
  // partial: per query, whether this rank (not the owner) sends its state to the owner.
  std::vector<bool> sends_state;

  // Per query: offset (floats) of its states: slot 0 this rank's own, then one per peer,
  // each [rows] x (out D, max, sum).
  std::vector<size_t> state_offset;
  size_t state_floats = 0;

  std::vector<SegmentSource> segments;
  std::vector<AttentionCall> calls;
  std::vector<int64_t> row_info;

  // On the reply rank: per query owned elsewhere, offset (floats) of its output [rows, D].
  std::vector<size_t> reply_offset;
  size_t reply_floats = 0;
};

// The plan of `rank` for these queries. `q_heads` and `head_dim` size the states and outputs.
RankPlan plan_rank(const std::vector<SelectedQuery>& queries, FinalAttention strategy, int rank, int world,
                   int reply_rank, int q_heads, int head_dim, const ReattentionConfig& rc);

}  // namespace reattn
