// The planning half of a step (worker/rank_plan.h) without a backend: who sends which chunk
// blocks and states to whom, the segments and positions of each attention call, the outputs'
// way to the reply rank; and, over every rank of random steps, that what is sent is received.
#include <gtest/gtest.h>

#include <random>

#include "worker/rank_plan.h"
#include "tests/tiny_rc.h"

namespace reattn {
namespace {

using Kind = SegmentSource::Kind;

using test::tiny_rc;

SelectedQuery selected(int64_t n, int owner, int64_t qlen, std::vector<int64_t> recalled) {
  SelectedQuery q;
  q.ok = true;
  q.owner_rank = owner;
  q.qlen = qlen;
  q.regions = compute_regions(n, tiny_rc());
  q.recalled = std::move(recalled);
  q.layout = make_layout(q.regions, static_cast<int64_t>(q.recalled.size()));
  return q;
}

constexpr int kHeads = 2;
constexpr int kDim = 4;

// n = 4 + 8*8 + 32 + 5: 8 mid chunks (0..7), local region 37 tokens from token 68.
TEST(RankPlan, GatherSendsRemoteChunksToTheOwnerInUOrder) {
  const ReattentionConfig rc = tiny_rc();
  const int64_t n = 4 + 8 * 8 + 32 + 5;
  const std::vector<SelectedQuery> qs{selected(n, 1, 2, {0, 1, 2, 4, 5})};
  // Homes on 3 ranks: 0->0, 1->1, 2->2, 4->1, 5->2.
  const RankPlan r0 = plan_rank(qs, FinalAttention::kGather, 0, 3, 0, kHeads, kDim, rc);
  EXPECT_EQ(r0.send_chunks[1], (std::vector<std::pair<size_t, int64_t>>{{0, 0}}));
  EXPECT_TRUE(r0.calls.empty());  // not the owner: nothing to attend in gather
  EXPECT_EQ(r0.staging_blocks, 0u);
  EXPECT_EQ(r0.reply_offset[0], 0u);
  EXPECT_EQ(r0.reply_floats, 2u * kHeads * kDim);  // the owner (1) sends its output here

  const RankPlan r1 = plan_rank(qs, FinalAttention::kGather, 1, 3, 0, kHeads, kDim, rc);
  EXPECT_EQ(r1.recv_blocks, (std::vector<size_t>{2, 0, 4}));
  EXPECT_EQ(r1.recv_first, (std::vector<size_t>{0, 2, 2}));
  EXPECT_EQ(r1.staging_blocks, 6u);
  ASSERT_EQ(r1.calls.size(), 1u);
  const std::vector<SegmentSource>& s = r1.segments;
  ASSERT_GE(s.size(), 6u);
  EXPECT_EQ(s[0].kind, Kind::kSinks);
  EXPECT_EQ(s[0].tokens, 4);
  // U = {0, 1, 2, 4, 5} at positions 4, 12, 20, 28, 36.
  EXPECT_EQ(s[1].kind, Kind::kStaging);
  EXPECT_EQ(s[1].block, 0);  // rank 0's message, slot 0
  EXPECT_EQ(s[1].position, 4);
  EXPECT_EQ(s[2].kind, Kind::kHomeBlock);
  EXPECT_EQ(s[2].block, 1);
  EXPECT_EQ(s[2].position, 12);
  EXPECT_EQ(s[3].kind, Kind::kStaging);
  EXPECT_EQ(s[3].block, 2);  // rank 2's message starts at slot 2
  EXPECT_EQ(s[4].kind, Kind::kHomeBlock);
  EXPECT_EQ(s[4].block, 4);
  EXPECT_EQ(s[5].kind, Kind::kStaging);
  EXPECT_EQ(s[5].block, 4);
  EXPECT_EQ(s[5].position, 36);
  // The local region: tokens [68, 105) from the ring, at positions 44.., split at block ends.
  int64_t local = 0, position = 44;
  for (size_t g = 6; g < s.size(); ++g) {
    EXPECT_EQ(s[g].kind, Kind::kRing);
    EXPECT_EQ(s[g].position, position);
    position += s[g].tokens;
    local += s[g].tokens;
  }
  EXPECT_EQ(local, 37);
  // Tail rows: the last two tokens, at the last two layout positions, causal.
  EXPECT_EQ(r1.row_info, (std::vector<int64_t>{79, 80, 80, 81}));
}

TEST(RankPlan, PartialSendsStatesOnlyFromRanksHoldingRecalledChunks) {
  const ReattentionConfig rc = tiny_rc();
  const int64_t n = 4 + 8 * 8 + 32 + 5;
  const std::vector<SelectedQuery> qs{selected(n, 0, 1, {1, 2, 5})};  // homes 1, 2, 1 on 4 ranks
  const RankPlan owner = plan_rank(qs, FinalAttention::kPartial, 0, 4, 0, kHeads, kDim, rc);
  EXPECT_EQ(owner.partial_peers[0], (std::vector<int>{1, 2}));
  EXPECT_EQ(owner.state_floats, 3u * kHeads * (kDim + 2));
  EXPECT_FALSE(owner.sends_state[0]);
  const RankPlan r1 = plan_rank(qs, FinalAttention::kPartial, 1, 4, 0, kHeads, kDim, rc);
  EXPECT_TRUE(r1.sends_state[0]);
  ASSERT_EQ(r1.calls.size(), 1u);
  ASSERT_EQ(r1.segments.size(), 2u);  // chunks 1 and 5, at their layout positions
  EXPECT_EQ(r1.segments[0].position, 4);
  EXPECT_EQ(r1.segments[1].position, 20);
  const RankPlan r3 = plan_rank(qs, FinalAttention::kPartial, 3, 4, 0, kHeads, kDim, rc);
  EXPECT_FALSE(r3.sends_state[0]);
  EXPECT_TRUE(r3.calls.empty());
}

TEST(RankPlan, FailedQueriesTakeNoPart) {
  std::vector<SelectedQuery> qs{selected(200, 1, 1, {0, 1, 2})};
  qs[0].ok = false;
  for (FinalAttention f : {FinalAttention::kGather, FinalAttention::kPartial}) {
    for (int rank = 0; rank < 3; ++rank) {
      const RankPlan p = plan_rank(qs, f, rank, 3, 0, kHeads, kDim, tiny_rc());
      EXPECT_TRUE(p.calls.empty());
      EXPECT_EQ(p.state_floats, 0u);
      EXPECT_EQ(p.staging_blocks, 0u);
      EXPECT_EQ(p.reply_floats, 0u);
    }
  }
}

// Over random batches and every rank: each owner receives exactly the blocks and states
// the other ranks send it, and every recalled chunk is attended once, at its U position.
TEST(RankPlan, WhatIsSentIsReceivedOnEveryRank) {
  std::mt19937 rng(5);
  const ReattentionConfig rc = tiny_rc();
  for (int trial = 0; trial < 200; ++trial) {
    const int world = 1 + static_cast<int>(rng() % 5);
    std::vector<SelectedQuery> qs;
    const int nq = 1 + static_cast<int>(rng() % 4);
    for (int i = 0; i < nq; ++i) {
      const int64_t n = 4 + 8 * static_cast<int64_t>(rng() % 20) + 32 + static_cast<int64_t>(rng() % 8);
      const Regions regions = compute_regions(n, rc);
      std::vector<int64_t> u;
      for (int64_t j = 0; j < regions.num_chunks; ++j) {
        if (rng() % 3 == 0 && static_cast<int64_t>(u.size()) < rc.max_recall_chunks) u.push_back(j);
      }
      qs.push_back(selected(n, static_cast<int>(rng() % world), 1 + static_cast<int64_t>(rng() % 3), u));
      qs.back().ok = rng() % 5 != 0;
    }
    for (FinalAttention f : {FinalAttention::kGather, FinalAttention::kPartial}) {
      std::vector<RankPlan> plans;
      for (int r = 0; r < world; ++r) plans.push_back(plan_rank(qs, f, r, world, 0, kHeads, kDim, rc));
      for (int owner = 0; owner < world; ++owner) {
        for (int sender = 0; sender < world; ++sender) {
          EXPECT_EQ(2 * plans[sender].send_chunks[owner].size(), sender == owner ? 0u : plans[owner].recv_blocks[sender]);
        }
      }
      for (size_t i = 0; i < qs.size(); ++i) {
        if (!qs[i].ok) continue;
        size_t chunk_segments = 0;
        for (int r = 0; r < world; ++r) {
          for (const AttentionCall& c : plans[r].calls) {
            if (c.query != i) continue;
            for (size_t g = 0; g < c.segment_count; ++g) {
              const Kind k = plans[r].segments[c.segment_first + g].kind;
              chunk_segments += k == Kind::kHomeBlock || k == Kind::kStaging;
            }
          }
          if (f == FinalAttention::kPartial && r != qs[i].owner_rank) {
            const auto& peers = plans[qs[i].owner_rank].partial_peers[i];
            EXPECT_EQ(plans[r].sends_state[i], std::find(peers.begin(), peers.end(), r) != peers.end());
          }
        }
        EXPECT_EQ(chunk_segments, qs[i].recalled.size());
      }
    }
  }
}

}  // namespace
}  // namespace reattn
