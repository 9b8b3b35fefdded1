// The whole query path on one rank (cpu backend, loopback communicator) against the plain
// fp64 reference: regions around the mid threshold, the partial last chunk, ties, the R cap,
// G = 1, 2, 4, detached mode, full recall, incremental appends and capacity.
#include <gtest/gtest.h>

#include <random>

#include "common/synthetic.h"
#include "kernels/cpu/cpu_backend.h"
#include "tests/harness.h"

namespace reattn {
namespace {

Config tiny_config(int q_heads = 4, int kv_heads = 2, int head_dim = 16) {
  Config c;
  c.model = ModelConfig{2, q_heads, kv_heads, head_dim, 10000.0, 1024, {}};
  c.reattention.sink_tokens = 4;
  c.reattention.local_window = 32;
  c.reattention.chunk_tokens = 8;
  c.reattention.top_k = 2;
  c.reattention.max_recall_chunks = 6;
  c.backend.threads = 2;
  return c;
}

std::vector<float> random_q(const ModelConfig& m, int64_t qlen, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> u(-1.5f, 1.5f);
  std::vector<float> q(static_cast<size_t>(qlen) * m.q_heads * m.head_dim);
  for (float& x : q) x = u(rng);
  return q;
}

class Pipeline : public ::testing::TestWithParam<FinalAttention> {
 protected:
  test::PipelineResult run(const Config& config, const ref::Context& ctx, const std::vector<float>& q, int64_t qlen,
                           QueryMode mode, std::vector<int64_t> pieces = {}) {
    test::PipelineCase c;
    c.layer = 1;
    c.mode = mode;
    c.strategy = GetParam();
    c.append_pieces = std::move(pieces);
    return test::run_pipeline(backend_, comm_, config, ctx, q, qlen, c);
  }

  // Runs and checks against the reference: same chunk ids, output within fp32 error.
  void expect_matches_reference(const Config& config, int64_t n, int64_t qlen, QueryMode mode, uint64_t seed) {
    SCOPED_TRACE("n=" + std::to_string(n) + " qlen=" + std::to_string(qlen) + " mode=" + query_mode_name(mode));
    const ref::Context ctx = ref::synthetic_context(config.model, config.reattention, n, seed, {}, 1);
    const std::vector<float> q = random_q(config.model, qlen, seed + 1);
    const test::PipelineResult got = run(config, ctx, q, qlen, mode);
    ASSERT_TRUE(got.status.is_ok()) << got.status.to_string();
    const ref::Result want = ref::query(ctx, q, qlen, mode);
    EXPECT_EQ(got.recalled, want.recalled);
    EXPECT_LT(ref::relative_error(got.out, want.out), 1e-5);
  }

  CpuBackend backend_{2};
  test::LoopbackCommunicator comm_{backend_};
};

TEST_P(Pipeline, AroundTheMidThreshold) {
  const Config config = tiny_config();
  const int64_t threshold = 4 + 32 + 8;  // the first n with a mid chunk
  for (int64_t n : {threshold - 1, threshold, threshold + 1}) {
    expect_matches_reference(config, n, 1, QueryMode::kTail, 11);
    expect_matches_reference(config, n, 32, QueryMode::kTail, 12);
    expect_matches_reference(config, n, 3, QueryMode::kDetached, 13);
  }
}

TEST_P(Pipeline, PartialLastChunkAndLongContexts) {
  const Config config = tiny_config();
  for (int64_t n : {4 + 32 + 8 * 5 + 3, 301, 1001}) {
    expect_matches_reference(config, n, 1, QueryMode::kTail, 21);
    expect_matches_reference(config, n, 7, QueryMode::kTail, 22);
    expect_matches_reference(config, n, 32, QueryMode::kDetached, 23);
  }
}

TEST_P(Pipeline, FewerTokensThanSinks) {
  const Config config = tiny_config();
  expect_matches_reference(config, 3, 2, QueryMode::kTail, 31);
  expect_matches_reference(config, 1, 1, QueryMode::kDetached, 32);
}

TEST_P(Pipeline, GroupSizesOneTwoFour) {
  for (auto [h, kv] : {std::pair{2, 2}, std::pair{4, 2}, std::pair{8, 2}, std::pair{4, 1}}) {
    SCOPED_TRACE("q_heads=" + std::to_string(h) + " kv_heads=" + std::to_string(kv));
    expect_matches_reference(tiny_config(h, kv), 517, 5, QueryMode::kTail, 41);
  }
}

TEST_P(Pipeline, HeadDim64) { expect_matches_reference(tiny_config(4, 2, 64), 400, 3, QueryMode::kTail, 51); }

TEST_P(Pipeline, RecallCapKeepsR) {
  Config config = tiny_config();
  config.reattention.top_k = 5;
  config.reattention.max_recall_chunks = 3;
  const ref::Context ctx = ref::synthetic_context(config.model, config.reattention, 700, 61, {}, 1);
  const std::vector<float> q = random_q(config.model, 8, 62);
  const test::PipelineResult got = run(config, ctx, q, 8, QueryMode::kTail);
  ASSERT_TRUE(got.status.is_ok()) << got.status.to_string();
  const ref::Result want = ref::query(ctx, q, 8, QueryMode::kTail);
  EXPECT_EQ(got.recalled.size(), 3u);
  EXPECT_EQ(got.recalled, want.recalled);
  EXPECT_LT(ref::relative_error(got.out, want.out), 1e-5);
}

TEST_P(Pipeline, TiesGoToTheSmallerChunk) {
  Config config = tiny_config();
  config.reattention.top_k = 1;
  ref::Context ctx = ref::synthetic_context(config.model, config.reattention, 300, 71, {}, 1);
  const std::vector<float> q = random_q(config.model, 1, 72);
  // Make chunks 9 and 3 exact copies of the best chunk for every head: three-way exact tie.
  const int64_t S = 4, C = 8, D = 16;
  const int64_t best = 17;
  for (int g = 0; g < config.model.kv_heads; ++g) {
    for (int64_t t = 0; t < C; ++t) {
      for (int64_t d = 0; d < D; ++d) {
        const double big = (d == 0 ? 40.0 : 0.0) * (q[(g * 2) * D] > 0 ? 1 : -1);
        const size_t src = (g * ctx.n + S + best * C + t) * D + d;
        ctx.k[src] = big;
        ctx.k[(g * ctx.n + S + 9 * C + t) * D + d] = big;
        ctx.k[(g * ctx.n + S + 3 * C + t) * D + d] = big;
      }
    }
  }
  const test::PipelineResult got = run(config, ctx, q, 1, QueryMode::kTail);
  ASSERT_TRUE(got.status.is_ok()) << got.status.to_string();
  const ref::Result want = ref::query(ctx, q, 1, QueryMode::kTail);
  EXPECT_EQ(got.recalled, want.recalled);
  EXPECT_TRUE(std::find(got.recalled.begin(), got.recalled.end(), 3) != got.recalled.end());
  EXPECT_TRUE(std::find(got.recalled.begin(), got.recalled.end(), best) == got.recalled.end());
  EXPECT_TRUE(std::find(got.recalled.begin(), got.recalled.end(), 9) == got.recalled.end());
  EXPECT_LT(ref::relative_error(got.out, want.out), 1e-5);
}

TEST_P(Pipeline, FullRecallEqualsCausalAttention) {
  Config config = tiny_config();
  config.model.scope = 1 << 20;
  config.reattention.top_k = 1000;
  config.reattention.max_recall_chunks = 1000;
  for (auto [n, qlen, mode] : {std::tuple{517, 9, QueryMode::kTail}, std::tuple{300, 4, QueryMode::kDetached}}) {
    const ref::Context ctx = ref::synthetic_context(config.model, config.reattention, n, 81, {}, 1);
    const std::vector<float> q = random_q(config.model, qlen, 82);
    const test::PipelineResult got = run(config, ctx, q, qlen, mode);
    ASSERT_TRUE(got.status.is_ok()) << got.status.to_string();
    const int64_t chunks = compute_regions(n, config.reattention).num_chunks;
    ASSERT_EQ(static_cast<int64_t>(got.recalled.size()), chunks);
    EXPECT_LT(ref::relative_error(got.out, ref::causal_attention(ctx, q, qlen, mode)), 1e-5);
  }
}

TEST_P(Pipeline, NeedlesAreRecalled) {
  const Config config = tiny_config();
  const std::vector<int64_t> needles = {123, 777};
  const ref::Context ctx = ref::synthetic_context(config.model, config.reattention, 1000, 91, needles, 1);
  const SyntheticSpec spec{91, needles};
  const std::vector<float> q = synthetic_query(spec, config.model, 1, 4);
  const test::PipelineResult got = run(config, ctx, q, 4, QueryMode::kTail);
  ASSERT_TRUE(got.status.is_ok()) << got.status.to_string();
  EXPECT_EQ(got.recalled, (std::vector<int64_t>{(123 - 4) / 8, (777 - 4) / 8}));
  EXPECT_LT(ref::relative_error(got.out, ref::query(ctx, q, 4, QueryMode::kTail).out), 1e-5);
}

TEST_P(Pipeline, AppendsInPiecesEqualOneAppend) {
  const Config config = tiny_config();
  const ref::Context ctx = ref::synthetic_context(config.model, config.reattention, 611, 101, {}, 1);
  const std::vector<float> q = random_q(config.model, 6, 102);
  const test::PipelineResult whole = run(config, ctx, q, 6, QueryMode::kTail);
  const test::PipelineResult pieces = run(config, ctx, q, 6, QueryMode::kTail, {1, 2, 5, 8, 33, 1, 200, 61, 300});
  ASSERT_TRUE(whole.status.is_ok() && pieces.status.is_ok());
  EXPECT_EQ(whole.recalled, pieces.recalled);
  EXPECT_EQ(whole.out, pieces.out);  // bit-identical: the same keys in the same places
}

INSTANTIATE_TEST_SUITE_P(Strategies, Pipeline, ::testing::Values(FinalAttention::kGather, FinalAttention::kPartial),
                         [](const auto& info) { return std::string(final_attention_name(info.param)); });

TEST(Store, CapacityRefusesAndChangesNothing) {
  Config config = tiny_config();
  config.capacity.tokens_per_rank = 100;
  CpuBackend backend(1);
  KvStore store(backend, config, 0, 1);
  ASSERT_TRUE(store.create(1, 0).is_ok());
  const ref::Context ctx = ref::synthetic_context(config.model, config.reattention, 150, 5, {}, 0);
  ASSERT_TRUE(store.append(1, test::ContextSource(ctx, 0, 0, 90)).is_ok());
  const Status full = store.append(1, test::ContextSource(ctx, 0, 90, 20));
  EXPECT_EQ(full.code(), ErrorCode::kCapacity);
  EXPECT_NE(full.message().find("capacity.tokens_per_rank 100"), std::string::npos) << full.message();
  EXPECT_EQ(store.find(1)->tokens, 90);
  EXPECT_TRUE(store.append(1, test::ContextSource(ctx, 0, 90, 10)).is_ok());
  EXPECT_EQ(store.tokens_charged_to(0), 100);
  EXPECT_TRUE(store.erase(1).is_ok());
  EXPECT_EQ(store.tokens_charged_to(0), 0);
  EXPECT_EQ(store.erase(1).code(), ErrorCode::kNotFound);
}

// Layer steps: one layer at a time, charged once per token (by the longest layer); an append
// to every layer waits until the layers are level again.
TEST(Store, LayerAppendsKeepPerLayerLengthsAndChargeOnce) {
  Config config = tiny_config();
  config.capacity.tokens_per_rank = 100;
  CpuBackend backend(1);
  KvStore store(backend, config, 0, 1);
  ASSERT_TRUE(store.create(1, 0).is_ok());
  const ref::Context ctx = ref::synthetic_context(config.model, config.reattention, 150, 5, {}, 0);
  ASSERT_TRUE(store.append(1, test::ContextSource(ctx, 0, 0, 60), 0).is_ok());
  EXPECT_EQ(store.find(1)->layer_tokens, (std::vector<int64_t>{60, 0}));
  EXPECT_EQ(store.find(1)->tokens, 60);
  EXPECT_EQ(store.append(1, test::ContextSource(ctx, 0, 60, 5)).code(), ErrorCode::kOutOfOrder);
  ASSERT_TRUE(store.append(1, test::ContextSource(ctx, 0, 0, 60), 1).is_ok());
  EXPECT_EQ(store.find(1)->layer_tokens, (std::vector<int64_t>{60, 60}));
  EXPECT_EQ(store.tokens_charged_to(0), 60);
  ASSERT_TRUE(store.append(1, test::ContextSource(ctx, 0, 60, 30), 0).is_ok());
  EXPECT_EQ(store.tokens_charged_to(0), 90);
  const Status full = store.append(1, test::ContextSource(ctx, 0, 90, 20), 0);  // 110 > 100
  EXPECT_EQ(full.code(), ErrorCode::kCapacity);
  EXPECT_EQ(store.find(1)->layer_tokens, (std::vector<int64_t>{90, 60}));
  ASSERT_TRUE(store.append(1, test::ContextSource(ctx, 0, 60, 30), 1).is_ok());  // within the longest layer
  EXPECT_EQ(store.tokens_charged_to(0), 90);
  EXPECT_EQ(store.append(1, test::ContextSource(ctx, 0, 0, 1), 2).code(), ErrorCode::kInvalidArgument);
}

TEST(Store, BadQueriesFailAloneInABatch) {
  const Config config = tiny_config();
  CpuBackend backend(1);
  test::LoopbackCommunicator comm(backend);
  KvStore store(backend, config, 0, 1);
  ASSERT_TRUE(store.create(1, 0).is_ok());
  const ref::Context ctx = ref::synthetic_context(config.model, config.reattention, 200, 5, {}, 0);
  ASSERT_TRUE(store.append(1, test::ContextSource(ctx, 0, 0, 200)).is_ok());
  StepPlan plan;
  const std::vector<float> q = random_q(config.model, 2, 9);
  plan.q = q;
  plan.q.insert(plan.q.end(), q.begin(), q.end());
  QueryPlan good{1, 200, 2, 0, 0, QueryMode::kTail, 0};
  QueryPlan unknown{2, 200, 2, 0, 0, QueryMode::kTail, 0};
  QueryPlan bad_layer{1, 200, 2, static_cast<int64_t>(q.size()), 5, QueryMode::kTail, 0};
  plan.queries = {good, unknown, bad_layer, good};
  StepRunner runner(backend, comm, config, store);
  std::vector<QueryResult> results;
  ASSERT_TRUE(runner.run(plan, &results, nullptr).is_ok());
  ASSERT_EQ(results.size(), 4u);
  EXPECT_TRUE(results[0].status.is_ok());
  EXPECT_EQ(results[1].status.code(), ErrorCode::kNotFound);
  EXPECT_EQ(results[2].status.code(), ErrorCode::kInvalidArgument);
  EXPECT_EQ(results[0].out, results[3].out);
  const ref::Result want = ref::query(ctx, q, 2, QueryMode::kTail);
  EXPECT_EQ(results[0].recalled, want.recalled);
  EXPECT_LT(ref::relative_error(results[0].out, want.out), 1e-5);
}

TEST(StepPlan, EncodeDecodeRoundTrip) {
  StepPlan plan;
  plan.strategy = FinalAttention::kPartial;
  plan.reply_rank = 1;
  plan.queries = {QueryPlan{3, 100, 2, 0, 1, QueryMode::kDetached, 0}};
  plan.q = {1.0f, 2.0f, 3.0f};
  const Expected<Operation> decoded = decode_operation(encode_operation(plan));
  ASSERT_TRUE(decoded.is_ok());
  const StepPlan* back = std::get_if<StepPlan>(&*decoded);
  ASSERT_NE(back, nullptr);
  EXPECT_EQ(back->strategy, FinalAttention::kPartial);
  EXPECT_EQ(back->reply_rank, 1);
  EXPECT_EQ(back->queries[0].context_id, 3u);
  EXPECT_EQ(back->queries[0].mode, QueryMode::kDetached);
  EXPECT_EQ(back->q, plan.q);
  EXPECT_FALSE(decode_operation("garbage").is_ok());
}

}  // namespace
}  // namespace reattn

namespace reattn {
namespace {

TEST(Synthetic, ValuesAreExactInEveryStorageDtypeAndRegenerate) {
  const Config config = tiny_config(4, 2, 64);
  const SyntheticSpec spec{5, {10, 300}};
  std::vector<float> k(64), v(64), k2(64), v2(64);
  for (int64_t token : {0, 10, 299, 300, 5000}) {
    synthetic_kv(spec, config.model, 1, 1, token, k.data(), v.data());
    synthetic_kv(spec, config.model, 1, 1, token, k2.data(), v2.data());
    EXPECT_EQ(k, k2);
    for (float x : k) {
      EXPECT_EQ(bf16_to_float(float_to_bf16(x)), x);
      EXPECT_EQ(f16_to_float(float_to_f16(x)), x);
    }
  }
  for (float x : synthetic_query(spec, config.model, 1, 3)) {
    EXPECT_EQ(bf16_to_float(float_to_bf16(x)), x);
    EXPECT_EQ(f16_to_float(float_to_f16(x)), x);
  }
  // A needle key points along its group's query direction and stands far above noise.
  synthetic_kv(spec, config.model, 1, 1, 300, k.data(), v.data());
  const std::vector<float> dir = needle_direction(5, config.model, 1, 1);
  double along = 0;
  for (int d = 0; d < 64; ++d) along += k[d] * dir[d];
  EXPECT_GT(along, 15.0);
}

}  // namespace
}  // namespace reattn
