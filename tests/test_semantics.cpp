// The shared semantics (common/semantics.h): regions, placement, candidate order, merge,
// recall selection with its cap, layout positions, query checks.
#include <gtest/gtest.h>

#include "common/semantics.h"
#include "tests/tiny_rc.h"

namespace reattn {
namespace {

using test::tiny_rc;

TEST(Regions, NoMidBelowThreshold) {
  const ReattentionConfig rc = tiny_rc();
  const Regions r = compute_regions(4 + 32 + 8 - 1, rc);  // n - S - W = C - 1
  EXPECT_FALSE(r.has_mid());
  EXPECT_EQ(r.num_chunks, 0);
  EXPECT_EQ(r.sink_end, 4);
  EXPECT_EQ(r.local_begin(), 4);
}

TEST(Regions, OneChunkAtThreshold) {
  const Regions r = compute_regions(4 + 32 + 8, tiny_rc());
  EXPECT_EQ(r.num_chunks, 1);
  EXPECT_EQ(r.mid_end, 12);
  EXPECT_EQ(r.local_begin(), 12);
  EXPECT_EQ(r.tokens - r.local_begin(), 32);
}

TEST(Regions, PartialLastChunkStaysLocal) {
  const Regions r = compute_regions(4 + 32 + 8 * 5 + 3, tiny_rc());
  EXPECT_EQ(r.num_chunks, 5);
  EXPECT_EQ(r.mid_end, 44);
  EXPECT_EQ(r.tokens - r.local_begin(), 35);  // between W and W + C - 1
  EXPECT_EQ(r.chunk_first_token(2), 20);
}

TEST(Regions, FewerTokensThanSinks) {
  const Regions r = compute_regions(3, tiny_rc());
  EXPECT_EQ(r.sink_end, 3);
  EXPECT_EQ(r.num_chunks, 0);
  EXPECT_EQ(r.local_begin(), 3);
  EXPECT_EQ(make_layout(r, 0).length(), 3);
}

TEST(Regions, LocalRegionAlwaysBetweenWAndWPlusC) {
  const ReattentionConfig rc = tiny_rc();
  for (int64_t n = 4 + 32 + 8; n < 400; ++n) {
    const Regions r = compute_regions(n, rc);
    const int64_t local = n - r.local_begin();
    ASSERT_GE(local, rc.local_window) << n;
    ASSERT_LE(local, rc.local_window + rc.chunk_tokens - 1) << n;
  }
}

TEST(Placement, StripedSlots) {
  EXPECT_EQ(home_rank(7, 3), 1);
  EXPECT_EQ(home_slot(7, 3), 2);
  // 10 chunks over 4 ranks: 3, 3, 2, 2.
  EXPECT_EQ(mid_slots_on_rank(10, 0, 4), 3);
  EXPECT_EQ(mid_slots_on_rank(10, 1, 4), 3);
  EXPECT_EQ(mid_slots_on_rank(10, 2, 4), 2);
  EXPECT_EQ(mid_slots_on_rank(10, 3, 4), 2);
  EXPECT_EQ(mid_slots_on_rank(2, 3, 4), 0);
}

TEST(Placement, TokensChargedSumToContext) {
  const ReattentionConfig rc = tiny_rc();
  for (int world : {1, 2, 3, 4}) {
    for (int64_t n : {0, 3, 4, 11, 12, 13, 100, 1001}) {
      int64_t total = 0;
      for (int r = 0; r < world; ++r) total += tokens_charged(n, world - 1, r, world, rc);
      EXPECT_EQ(total, n) << "world " << world << " n " << n;
    }
  }
}

TEST(Candidates, OrderPrefersScoreThenSmallerChunkThenEmptyLast) {
  EXPECT_TRUE(candidate_before({2.0f, 9}, {1.0f, 0}));
  EXPECT_TRUE(candidate_before({1.0f, 3}, {1.0f, 5}));
  EXPECT_FALSE(candidate_before({1.0f, 5}, {1.0f, 3}));
  EXPECT_TRUE(candidate_before({-100.0f, 5}, {0.0f, -1}));
  EXPECT_FALSE(candidate_before({0.0f, -1}, {-100.0f, 5}));
}

TEST(Candidates, TopkInsertKeepsBestK) {
  Candidate top[3] = {{0, -1}, {0, -1}, {0, -1}};
  for (Candidate c : {Candidate{1, 4}, Candidate{5, 2}, Candidate{1, 1}, Candidate{3, 7}, Candidate{0.5f, 0}}) {
    topk_insert(top, 3, c);
  }
  EXPECT_EQ(top[0].chunk, 2);
  EXPECT_EQ(top[1].chunk, 7);
  EXPECT_EQ(top[2].chunk, 1);  // tie at 1.0 goes to the smaller id
}

TEST(Candidates, MergeAcrossRanksIsGlobalTopk) {
  // 2 ranks, 1 row, k = 2. Rank 1 holds a tie with rank 0's best.
  const Candidate gathered[] = {{4, 0}, {2, 2}, {4, 1}, {3, 3}};
  Candidate out[2];
  merge_candidates(gathered, 2, 1, 2, out);
  EXPECT_EQ(out[0].chunk, 0);
  EXPECT_EQ(out[1].chunk, 1);
}

TEST(Candidates, MergeSkipsEmptySlots) {
  const Candidate gathered[] = {{4, 0}, {0, -1}, {0, -1}, {0, -1}};
  Candidate out[2];
  merge_candidates(gathered, 2, 1, 2, out);
  EXPECT_EQ(out[0].chunk, 0);
  EXPECT_EQ(out[1].chunk, -1);
}

TEST(Recall, UnionSortedAscending) {
  const Candidate topk[] = {{9, 7}, {8, 2}, {9, 2}, {1, 5}};  // 2 rows, k = 2
  EXPECT_EQ(select_recall(topk, 2, 2, 10), (std::vector<int64_t>{2, 5, 7}));
}

TEST(Recall, CapRanksByCountThenBestScoreThenChunk) {
  // Chunk 4 chosen 3 times; 9 twice (best 1.0); 6 twice (best 7.0); 1 and 3 once each with
  // equal best scores (tie to the smaller id).
  const Candidate topk[] = {{5, 4}, {1, 9}, {5, 4}, {1, 9}, {5, 4}, {7, 6},
                            {2, 6}, {3, 1}, {3, 3}, {0.5f, -1}};
  EXPECT_EQ(select_recall(topk, 5, 2, 1), (std::vector<int64_t>{4}));
  EXPECT_EQ(select_recall(topk, 5, 2, 2), (std::vector<int64_t>{4, 6}));
  EXPECT_EQ(select_recall(topk, 5, 2, 3), (std::vector<int64_t>{4, 6, 9}));
  EXPECT_EQ(select_recall(topk, 5, 2, 4), (std::vector<int64_t>{1, 4, 6, 9}));
  EXPECT_EQ(select_recall(topk, 5, 2, 5), (std::vector<int64_t>{1, 3, 4, 6, 9}));
}

TEST(Layout, TailRowsStandAtTheirLayoutPositions) {
  const ReattentionConfig rc = tiny_rc();
  const Regions r = compute_regions(100, rc);  // 8 chunks, local [68, 100)
  ASSERT_EQ(r.num_chunks, 8);
  const Layout layout = make_layout(r, 3);
  EXPECT_EQ(layout.length(), 4 + 24 + 32);
  EXPECT_EQ(layout.recalled_position(1, rc.chunk_tokens), 12);
  const RowPosition last = row_position(r, layout, QueryMode::kTail, 4, 3);
  EXPECT_EQ(last.position, layout.length() - 1);
  EXPECT_EQ(last.visible_end, layout.length());
  const RowPosition first = row_position(r, layout, QueryMode::kTail, 4, 0);
  EXPECT_EQ(first.position, layout.length() - 4);
  const RowPosition detached = row_position(r, layout, QueryMode::kDetached, 4, 0);
  EXPECT_EQ(detached.position, layout.length());
  EXPECT_EQ(detached.visible_end, layout.length());
}

TEST(Layout, WithoutMidPositionsAreReal) {
  const Regions r = compute_regions(20, tiny_rc());
  const Layout layout = make_layout(r, 0);
  for (int64_t i = 0; i < 20; ++i) EXPECT_EQ(row_position(r, layout, QueryMode::kTail, 20, i).position, i);
}

TEST(Queries, ValidateNamesTheProblem) {
  const ReattentionConfig rc = tiny_rc();
  EXPECT_TRUE(validate_query(100, 32, QueryMode::kTail, rc).is_ok());
  const Status too_long = validate_query(100, 33, QueryMode::kTail, rc);
  EXPECT_FALSE(too_long.is_ok());
  EXPECT_NE(too_long.message().find("local_window"), std::string::npos);
  EXPECT_TRUE(validate_query(100, 32, QueryMode::kDetached, rc).is_ok());
  EXPECT_TRUE(validate_query(5, 32, QueryMode::kDetached, rc).is_ok());  // detached rows need not fit n
  const Status detached_too_long = validate_query(100, 33, QueryMode::kDetached, rc);
  EXPECT_NE(detached_too_long.message().find("detached"), std::string::npos);
  EXPECT_FALSE(validate_query(5, 6, QueryMode::kTail, rc).is_ok());
  EXPECT_FALSE(validate_query(0, 1, QueryMode::kDetached, rc).is_ok());
  EXPECT_FALSE(validate_query(10, 0, QueryMode::kTail, rc).is_ok());
}

TEST(Merge, StateMergeMatchesOneSoftmax) {
  // Two halves of a softmax over logits {1, 2} and {3}, values 1-d.
  float m = 2.0f, l = std::exp(1.0f - 2.0f) + 1.0f;
  float out[1] = {(std::exp(-1.0f) * 10.0f + 1.0f * 20.0f) / l};
  const float m2 = 3.0f, l2 = 1.0f, out2[1] = {30.0f};
  merge_state(m, l, out, m2, l2, out2, 1);
  const double e1 = std::exp(1.0), e2 = std::exp(2.0), e3 = std::exp(3.0);
  EXPECT_NEAR(out[0], (e1 * 10 + e2 * 20 + e3 * 30) / (e1 + e2 + e3), 1e-4);
  EXPECT_FLOAT_EQ(m, 3.0f);
}

TEST(Merge, EmptyStateIsIdentity) {
  float m = 1.0f, l = 2.0f, out[2] = {3.0f, 4.0f};
  const float other[2] = {100.0f, 100.0f};
  merge_state(m, l, out, -INFINITY, 0.0f, other, 2);
  EXPECT_EQ(out[0], 3.0f);
  EXPECT_EQ(l, 2.0f);
}

}  // namespace
}  // namespace reattn
