// Span recall (reattention.recall: span) through the full pipeline, run by CTest under
// `mpirun -np 1..4`: blocks striped over the ranks, the owner on the first or last rank, both
// final-attention strategies, tail and detached, against the fp64 reference, at the odd
// cases of the recall rule (spans clipped at the mid's ends, overlapping and touching spans,
// spans across a block and so a rank boundary, odd span widths, the cap binding with tied
// votes, G = 1 and G > 1) and with llama3 RoPE scaling. Any mismatch fails the process.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>

#include "comm/mpi_communicator.h"
#include "common/synthetic.h"
#include "kernels/cpu/cpu_backend.h"
#include "tests/batch_check.h"
#include "tests/harness.h"

namespace reattn {
namespace {

// S = 4, W = 32, C = 8; the mid of n tokens is [4, 4 + 8 * floor((n - 36) / 8)).
Config span_config(int q_heads, int kv_heads, int top_k, int64_t span_tokens, int64_t max_recall_tokens) {
  Config c;
  c.model = ModelConfig{2, q_heads, kv_heads, 16, 10000.0, 8192, {}};
  c.reattention.sink_tokens = 4;
  c.reattention.local_window = 32;
  c.reattention.chunk_tokens = 8;
  c.reattention.top_k = top_k;
  c.reattention.recall = RecallMode::kSpan;
  c.reattention.span_tokens = span_tokens;
  c.reattention.max_recall_tokens = max_recall_tokens;
  c.backend.threads = 1;
  return c;
}

bool token_recalled(const std::vector<std::pair<int64_t, int64_t>>& spans, int64_t t) {
  return std::any_of(spans.begin(), spans.end(), [t](const auto& s) { return s.first <= t && t < s.second; });
}

struct SpanCase {
  const char* name;
  int q_heads, kv_heads;
  int64_t n, qlen;
  QueryMode mode;
  std::vector<int64_t> needles;
  int top_k;
  int64_t span_tokens, max_recall_tokens;
  bool llama3 = false;
};
void PrintTo(const SpanCase& c, std::ostream* os) { *os << c.name; }

class SpanDistributed : public ::testing::TestWithParam<SpanCase> {};

TEST_P(SpanDistributed, MatchesReferenceForEveryStrategyAndOwner) {
  const SpanCase& c = GetParam();
  Config config = span_config(c.q_heads, c.kv_heads, c.top_k, c.span_tokens, c.max_recall_tokens);
  if (c.llama3) {
    config.model.rope_theta = 500000.0;
    config.model.rope_scaling = RopeScaling{RopeScalingType::kLlama3, 8.0, 1.0, 4.0, 64};
  }
  ASSERT_TRUE(config.validate().is_ok()) << config.validate().to_string();
  CpuBackend backend(1);
  MpiCommunicator comm;
  const uint64_t seed = 4321 + static_cast<uint64_t>(c.n);
  const ref::Context ctx = ref::synthetic_context(config.model, config.reattention, c.n, seed, c.needles, 1);
  const std::vector<float> q = synthetic_query(SyntheticSpec{seed, c.needles}, config.model, 1, c.qlen);
  const ref::Result want = comm.rank() == 0 ? ref::query(ctx, q, c.qlen, c.mode) : ref::Result{};
  for (FinalAttention strategy : {FinalAttention::kGather, FinalAttention::kPartial}) {
    for (int owner : {0, comm.world() - 1}) {
      test::PipelineCase pc;
      pc.layer = 1;
      pc.mode = c.mode;
      pc.strategy = strategy;
      pc.owner_rank = owner;
      pc.append_pieces = {c.n / 3, 1, c.n - c.n / 3 - 1};
      const test::PipelineResult got = test::run_pipeline(backend, comm, config, ctx, q, c.qlen, pc);
      ASSERT_TRUE(got.status.is_ok()) << got.status.to_string();
      if (comm.rank() != 0) continue;
      SCOPED_TRACE(std::string(c.name) + ": " + final_attention_name(strategy) + " owner " + std::to_string(owner));
      EXPECT_TRUE(got.recalled.empty());
      EXPECT_EQ(got.recalled_spans, want.spans);
      EXPECT_LT(ref::relative_error(got.out, want.out), 1e-5);
    }
  }
  if (comm.rank() != 0) return;
  EXPECT_LE(static_cast<int64_t>(want.kept.size()), c.max_recall_tokens);
  if (std::string(c.name).find("cap binding") != std::string::npos) {
    EXPECT_EQ(static_cast<int64_t>(want.kept.size()), c.max_recall_tokens) << "the cap does not bind";
  }
  // Every needle in the mid was kept (the cap allowing), and so recalled with its neighbours.
  const int64_t mid_end = 4 + 8 * std::max<int64_t>(0, (c.n - 36) / 8);
  for (int64_t t : c.needles) {
    if (t < 4 || t >= mid_end || static_cast<int64_t>(c.needles.size()) > c.max_recall_tokens) continue;
    EXPECT_TRUE(std::binary_search(want.kept.begin(), want.kept.end(), t)) << "needle " << t;
    EXPECT_TRUE(token_recalled(want.spans, t)) << "needle " << t;
  }
}

INSTANTIATE_TEST_SUITE_P(
    Cases, SpanDistributed,
    ::testing::Values(
        // n = 1001: mid [4, 964), blocks of 8 from token 4.
        SpanCase{"clipped at the mid's start and end", 4, 2, 1001, 3, QueryMode::kTail, {5, 962}, 2, 32, 127},
        SpanCase{"overlapping and touching spans", 4, 2, 1001, 2, QueryMode::kTail, {300, 306, 338}, 4, 32, 127},
        SpanCase{"span across blocks, odd s", 4, 2, 1001, 1, QueryMode::kTail, {107, 500}, 2, 7, 127},
        SpanCase{"odd s = 5, detached", 4, 2, 777, 4, QueryMode::kDetached, {51, 400}, 2, 5, 127},
        SpanCase{"cap binding with tied votes, G = 1", 2, 2, 1001, 3, QueryMode::kTail, {}, 4, 9, 3},
        SpanCase{"cap binding, G = 3", 6, 2, 1001, 2, QueryMode::kTail, {200, 700}, 4, 8, 5},
        SpanCase{"G = 1 detached", 2, 2, 2003, 1, QueryMode::kDetached, {17, 1900}, 2, 32, 127},
        SpanCase{"qlen = W, one block of mid", 4, 2, 45, 32, QueryMode::kTail, {}, 2, 32, 127},
        SpanCase{"no mid", 4, 2, 43, 1, QueryMode::kTail, {}, 2, 32, 127},
        SpanCase{"llama3 rope scaling", 4, 2, 1001, 3, QueryMode::kTail, {100, 600}, 2, 16, 127, true}),
    [](const ::testing::TestParamInfo<SpanCase>& info) { return "case" + std::to_string(info.index); });

// A needle at the last token of a block: span recall keeps its neighbours on both sides; chunk
// recall keeps its block but loses the tokens after it, which lie in the next block.
TEST(SpanVersusChunk, NeedleAtTheLastTokenOfABlock) {
  constexpr int64_t kNeedle = 4 + 8 * 40 + 7;  // last token of block 40
  Config span = span_config(4, 2, 2, 8, 127);
  Config chunk = span;
  chunk.reattention.recall = RecallMode::kChunk;
  chunk.reattention.max_recall_chunks = 6;
  CpuBackend backend(1);
  MpiCommunicator comm;
  const int64_t n = 1001;
  const std::vector<int64_t> needles = {kNeedle};
  const ref::Context ctx = ref::synthetic_context(span.model, span.reattention, n, 99, needles, 1);
  const std::vector<float> q = synthetic_query(SyntheticSpec{99, needles}, span.model, 1, 1);
  test::PipelineCase pc;
  pc.layer = 1;
  pc.strategy = FinalAttention::kPartial;
  const test::PipelineResult by_span = test::run_pipeline(backend, comm, span, ctx, q, 1, pc);
  const test::PipelineResult by_chunk = test::run_pipeline(backend, comm, chunk, ctx, q, 1, pc);
  ASSERT_TRUE(by_span.status.is_ok()) << by_span.status.to_string();
  ASSERT_TRUE(by_chunk.status.is_ok()) << by_chunk.status.to_string();
  if (comm.rank() != 0) return;
  for (int64_t t = kNeedle - 4; t < kNeedle + 4; ++t) EXPECT_TRUE(token_recalled(by_span.recalled_spans, t)) << t;
  EXPECT_TRUE(std::binary_search(by_chunk.recalled.begin(), by_chunk.recalled.end(), 40));
  EXPECT_FALSE(std::binary_search(by_chunk.recalled.begin(), by_chunk.recalled.end(), 41));
}

// A batch of span-mode queries on one context and layer (one score block: different qlens, tail
// and detached) plus one on the other layer gives exactly what each query gives alone, and the
// fp64 reference. Span selection runs on the host whatever device_select_rows says.
TEST(SpanBatch, MatchesEachQueryAlone) {
  const Config config = span_config(4, 2, 2, 16, 127);
  CpuBackend backend(1);
  MpiCommunicator comm;
  const std::vector<test::BatchContext> contexts = {{1001, comm.world() - 1, SyntheticSpec{21, {100, 600}}}};
  const std::vector<test::BatchQuery> queries = {{0, 1, 3, QueryMode::kTail},     {0, 1, 1, QueryMode::kDetached},
                                                 {0, 1, 17, QueryMode::kTail},    {0, 0, 2, QueryMode::kTail},
                                                 {0, 1, 5, QueryMode::kDetached}, {0, 1, 32, QueryMode::kTail}};
  test::expect_batch_matches_alone(backend, comm, config, contexts, queries, std::vector<bool>(queries.size(), true),
                                    {1, int64_t{1} << 40});
}

}  // namespace
}  // namespace reattn

