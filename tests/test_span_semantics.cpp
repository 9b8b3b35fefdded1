// Span recall's selection rule (common/semantics.h: widen_to_spans, select_spans,
// make_span_layout), the per-rank cut of spans into block pieces and their transfers and segments
// (worker/rank_plan.h), and the llama3 RoPE inverse frequencies against the formula written out here.
#include <gtest/gtest.h>

#include <cmath>

#include "common/semantics.h"
#include "tests/tiny_rc.h"
#include "worker/rank_plan.h"

namespace reattn {
namespace {

// n = 1001 with S = 4, W = 32, C = 8: mid [4, 964).
Regions mid_4_964() { return compute_regions(1001, test::tiny_rc()); }

std::vector<std::pair<int64_t, int64_t>> pairs(const std::vector<TokenRange>& spans) {
  std::vector<std::pair<int64_t, int64_t>> out;
  for (const TokenRange& r : spans) out.push_back({r.first, r.end});
  return out;
}

using Spans = std::vector<std::pair<int64_t, int64_t>>;

TEST(Spans, CentredOnTheKeptToken) {
  EXPECT_EQ(pairs(widen_to_spans({500}, mid_4_964(), 32)), (Spans{{484, 516}}));
  EXPECT_EQ(pairs(widen_to_spans({500}, mid_4_964(), 1)), (Spans{{500, 501}}));
}

TEST(Spans, OddWidthPutsTheExtraTokenAfter) {
  // s = 5: [t - 2, t + 3); s = 7: [t - 3, t + 4).
  EXPECT_EQ(pairs(widen_to_spans({500}, mid_4_964(), 5)), (Spans{{498, 503}}));
  EXPECT_EQ(pairs(widen_to_spans({500}, mid_4_964(), 7)), (Spans{{497, 504}}));
}

TEST(Spans, ClippedToTheMid) {
  EXPECT_EQ(pairs(widen_to_spans({5}, mid_4_964(), 32)), (Spans{{4, 21}}));
  EXPECT_EQ(pairs(widen_to_spans({962}, mid_4_964(), 32)), (Spans{{946, 964}}));
}

TEST(Spans, OverlappingAndTouchingSpansMerge) {
  EXPECT_EQ(pairs(widen_to_spans({300, 306}, mid_4_964(), 8)), (Spans{{296, 310}}));   // overlap
  EXPECT_EQ(pairs(widen_to_spans({300, 308}, mid_4_964(), 8)), (Spans{{296, 312}}));   // touch
  EXPECT_EQ(pairs(widen_to_spans({300, 309}, mid_4_964(), 8)), (Spans{{296, 304}, {305, 313}}));
  EXPECT_EQ(pairs(widen_to_spans({309, 300, 300}, mid_4_964(), 8)), (Spans{{296, 304}, {305, 313}}));  // any order
}

TEST(Spans, ContextsAboveInt32TokensAreRefusedInSpanMode) {
  ReattentionConfig rc = test::tiny_rc();
  EXPECT_TRUE(validate_query(int64_t{1} << 32, 1, QueryMode::kTail, rc).is_ok());
  rc.recall = RecallMode::kSpan;
  const Status st = validate_query(int64_t{1} << 32, 1, QueryMode::kTail, rc);
  EXPECT_FALSE(st.is_ok());
  EXPECT_NE(st.message().find("span recall's limit"), std::string::npos) << st.message();
  EXPECT_TRUE(validate_query(1000, 1, QueryMode::kTail, rc).is_ok());
}

TEST(Spans, NoMidNoSpans) {
  EXPECT_TRUE(widen_to_spans({}, mid_4_964(), 32).empty());
}

TEST(Spans, SelectCapsByVotesThenScoreThenTokenBeforeWidening) {
  ReattentionConfig rc = test::tiny_rc();
  rc.max_recall_tokens = 2;
  rc.span_tokens = 3;
  // Two (row, head) lists of 2: token 100 has two votes; 200 and 50 one each at equal scores,
  // so the smaller token (50) wins the tie for the second place.
  const Candidate topk[] = {{5.0f, 100}, {1.0f, 200}, {4.0f, 100}, {1.0f, 50}};
  const std::vector<TokenRange> spans = select_spans(topk, 2, 2, mid_4_964(), rc);
  EXPECT_EQ(pairs(spans), (Spans{{49, 52}, {99, 102}}));
  const Layout layout = make_span_layout(mid_4_964(), spans);
  EXPECT_EQ(layout.recalled_tokens, 6);
  EXPECT_EQ(layout.local_position(), 4 + 6);
}

TEST(Spans, PiecesFollowTheBlockGridAndTheLayout) {
  SelectedQuery q;
  q.regions = mid_4_964();
  q.spans = {{10, 14}, {18, 30}};  // blocks: [4, 12) [12, 20) [20, 28) [28, 36)
  q.layout = make_span_layout(q.regions, q.spans);
  const std::vector<SpanPiece> pieces = span_pieces(q, test::tiny_rc());
  ASSERT_EQ(pieces.size(), 5u);
  const int64_t want[5][4] = {{0, 6, 2, 4}, {1, 0, 2, 6}, {1, 6, 2, 8}, {2, 0, 8, 10}, {3, 0, 2, 18}};
  for (size_t i = 0; i < pieces.size(); ++i) {
    EXPECT_EQ(pieces[i].block, want[i][0]) << i;
    EXPECT_EQ(pieces[i].skip, want[i][1]) << i;
    EXPECT_EQ(pieces[i].tokens, want[i][2]) << i;
    EXPECT_EQ(pieces[i].position, want[i][3]) << i;
  }
}

// The llama3 rule, as HF transformers states it: wavelengths longer than
// original / low_freq_factor are slowed by `factor`, those shorter than
// original / high_freq_factor kept, and between them
// inv = (1 - smooth) * inv / factor + smooth * inv with
// smooth = (original / wavelength - low) / (high - low).
double llama3_expected(double theta, int dim, int d, double factor, double low, double high, double original) {
  const double inv = std::pow(theta, -2.0 * d / dim);
  const double wavelength = 2 * 3.14159265358979323846 / inv;
  if (wavelength < original / high) return inv;
  if (wavelength > original / low) return inv / factor;
  const double smooth = (original / wavelength - low) / (high - low);
  return (1 - smooth) * inv / factor + smooth * inv;
}

TEST(Rope, Llama3InverseFrequenciesMatchTheFormula) {
  // LLaMA-3.1-8B: theta 500000, D = 128, factor 8, low 1, high 4, original 8192.
  const RopeScaling scaling{RopeScalingType::kLlama3, 8.0, 1.0, 4.0, 8192};
  const std::vector<double> got = rope_inv_freq(128, 500000.0, scaling);
  const std::vector<double> plain = rope_inv_freq(128, 500000.0);
  ASSERT_EQ(got.size(), 64u);
  int kept = 0, slowed = 0, blended = 0;
  for (int d = 0; d < 64; ++d) {
    const double want = llama3_expected(500000.0, 128, d, 8.0, 1.0, 4.0, 8192.0);
    EXPECT_NEAR(got[d], want, 1e-15 * std::max(1.0, want)) << d;
    kept += got[d] == plain[d];
    slowed += std::fabs(got[d] - plain[d] / 8) <= 1e-18;
    blended += got[d] != plain[d] && std::fabs(got[d] - plain[d] / 8) > 1e-18;
  }
  // All three bands occur for these settings.
  EXPECT_GT(kept, 0);
  EXPECT_GT(slowed, 0);
  EXPECT_GT(blended, 0);
  EXPECT_EQ(got[0], 1.0);
  EXPECT_NEAR(got[63], std::pow(500000.0, -126.0 / 128) / 8, 1e-18);
}

TEST(Rope, NoScalingIsThetaPower) {
  const std::vector<double> inv = rope_inv_freq(16, 10000.0);
  for (int d = 0; d < 8; ++d) EXPECT_DOUBLE_EQ(inv[d], std::pow(10000.0, -2.0 * d / 16));
}

}  // namespace
}  // namespace reattn

namespace reattn {
namespace {

// Span recall's transfers (gather): n = 4 + 8*8 + 32 + 5, mid [4, 68) in blocks of 8 striped
// over 2 ranks (block b on rank b % 2), owner 0. Spans [10, 14) and [18, 30): pieces in blocks
// 0 (6..8, rank 0), 1 (0..2 and 6..8, rank 1), 2 (0..8, rank 0), 3 (0..2, rank 1).
TEST(SpanRankPlan, GatherSendsExactlyTheRangesAndStagesThemInOrder) {
  const ReattentionConfig rc = test::tiny_rc();
  SelectedQuery q;
  q.ok = true;
  q.owner_rank = 0;
  q.qlen = 1;
  q.regions = compute_regions(4 + 8 * 8 + 32 + 5, rc);
  q.spans = {{10, 14}, {18, 30}};
  q.layout = make_span_layout(q.regions, q.spans);
  const std::vector<SelectedQuery> qs{q};
  using Kind = SegmentSource::Kind;

  const RankPlan sender = plan_rank(qs, FinalAttention::kGather, 1, 2, 0, 2, 4, rc);
  // Pieces 1, 2 and 4 (of 0..4) live on rank 1 and go to the owner, in piece order.
  EXPECT_EQ(sender.send_chunks[0], (std::vector<std::pair<size_t, int64_t>>{{0, 1}, {0, 2}, {0, 4}}));
  EXPECT_TRUE(sender.calls.empty());

  const RankPlan owner = plan_rank(qs, FinalAttention::kGather, 0, 2, 0, 2, 4, rc);
  EXPECT_EQ(owner.recv_blocks, (std::vector<size_t>{0, 2 * (2 + 2 + 2)}));  // token rows, K and V
  EXPECT_EQ(owner.staging_blocks, 12u);
  ASSERT_EQ(owner.calls.size(), 1u);
  const std::vector<SegmentSource>& s = owner.segments;
  ASSERT_GE(s.size(), 6u);
  EXPECT_EQ(s[0].kind, Kind::kSinks);
  // block 0 tokens 6..8 at layout 4; staged 2 tokens at 6 (row 0); staged 2 at 8 (row 4);
  // block 2 at 10; staged 2 at 18 (row 8).
  const struct {
    Kind kind;
    int64_t block, skip, tokens, position;
  } want[] = {{Kind::kHomeBlock, 0, 6, 2, 4},
              {Kind::kStagedRange, 0, 0, 2, 6},
              {Kind::kStagedRange, 4, 0, 2, 8},
              {Kind::kHomeBlock, 2, 0, 8, 10},
              {Kind::kStagedRange, 8, 0, 2, 18}};
  for (size_t i = 0; i < 5; ++i) {
    SCOPED_TRACE(i);
    EXPECT_EQ(s[1 + i].kind, want[i].kind);
    EXPECT_EQ(s[1 + i].block, want[i].block);
    EXPECT_EQ(s[1 + i].skip, want[i].skip);
    EXPECT_EQ(s[1 + i].tokens, want[i].tokens);
    EXPECT_EQ(s[1 + i].position, want[i].position);
  }
  EXPECT_EQ(s[6].kind, Kind::kRing);
  EXPECT_EQ(s[6].position, 4 + 16);  // the local region after 16 recalled tokens
}

TEST(SpanRankPlan, PartialStatesComeFromTheRanksThatHoldPieces) {
  const ReattentionConfig rc = test::tiny_rc();
  SelectedQuery q;
  q.ok = true;
  q.owner_rank = 0;
  q.qlen = 1;
  q.regions = compute_regions(4 + 8 * 8 + 32 + 5, rc);
  q.spans = {{12, 20}};  // block 1 only: rank 1 of 3
  q.layout = make_span_layout(q.regions, q.spans);
  const RankPlan owner = plan_rank({q}, FinalAttention::kPartial, 0, 3, 0, 2, 4, rc);
  EXPECT_EQ(owner.partial_peers[0], (std::vector<int>{1}));
  EXPECT_TRUE(plan_rank({q}, FinalAttention::kPartial, 1, 3, 0, 2, 4, rc).sends_state[0]);
  EXPECT_FALSE(plan_rank({q}, FinalAttention::kPartial, 2, 3, 0, 2, 4, rc).sends_state[0]);
}

}  // namespace
}  // namespace reattn
