// Multi-rank tests, run by CTest under `mpirun -np 1..4`: the full pipeline with chunks
// striped over the ranks and the owner on the first or last rank, both final-attention
// strategies, against the fp64 reference (which every rank count must match, so all rank
// counts agree). Any mismatch fails the process with a non-zero exit.
#include <gtest/gtest.h>

#include <random>

#include "comm/mpi_communicator.h"
#include "common/synthetic.h"
#include "kernels/cpu/cpu_backend.h"
#include "tests/batch_check.h"
#include "tests/harness.h"

namespace reattn {
namespace {

Config config_for(int q_heads, int kv_heads, int top_k, int64_t max_recall) {
  Config c;
  c.model = ModelConfig{2, q_heads, kv_heads, 16, 10000.0, 4096, {}};
  c.reattention.sink_tokens = 4;
  c.reattention.local_window = 32;
  c.reattention.chunk_tokens = 8;
  c.reattention.top_k = top_k;
  c.reattention.max_recall_chunks = max_recall;
  c.backend.threads = 1;
  return c;
}

struct Case {
  int64_t n;
  int64_t qlen;
  QueryMode mode;
  std::vector<int64_t> needles;
  int top_k;
  int64_t max_recall;
};

class Distributed : public ::testing::TestWithParam<Case> {};

TEST_P(Distributed, MatchesReferenceForEveryStrategyAndOwner) {
  const Case& c = GetParam();
  const Config config = config_for(4, 2, c.top_k, c.max_recall);
  CpuBackend backend(1);
  MpiCommunicator comm;
  const ref::Context ctx = ref::synthetic_context(config.model, config.reattention, c.n, 1234 + c.n, c.needles, 1);
  const std::vector<float> q = synthetic_query(SyntheticSpec{1234 + static_cast<uint64_t>(c.n), c.needles},
                                               config.model, 1, c.qlen);
  const ref::Result want = comm.rank() == 0 ? ref::query(ctx, q, c.qlen, c.mode) : ref::Result{};
  std::vector<float> first_out;
  for (FinalAttention strategy : {FinalAttention::kGather, FinalAttention::kPartial}) {
    for (int owner : {0, comm.world() - 1}) {
      for (bool pieces : {false, true}) {
        test::PipelineCase pc;
        pc.layer = 1;
        pc.mode = c.mode;
        pc.strategy = strategy;
        pc.owner_rank = owner;
        if (pieces) pc.append_pieces = {c.n / 3, 1, c.n - c.n / 3 - 1};
        const test::PipelineResult got = test::run_pipeline(backend, comm, config, ctx, q, c.qlen, pc);
        ASSERT_TRUE(got.status.is_ok()) << got.status.to_string();
        if (comm.rank() != 0) continue;
        SCOPED_TRACE(std::string(final_attention_name(strategy)) + " owner " + std::to_string(owner));
        EXPECT_EQ(got.recalled, want.recalled);
        EXPECT_LT(ref::relative_error(got.out, want.out), 1e-5);
        if (first_out.empty()) first_out = got.out;
        double diff = 0, scale = 0;
        for (size_t i = 0; i < got.out.size(); ++i) {
          diff = std::max(diff, static_cast<double>(std::fabs(got.out[i] - first_out[i])));
          scale = std::max(scale, static_cast<double>(std::fabs(first_out[i])));
        }
        EXPECT_LE(diff, 1e-5 * scale);
      }
    }
  }
  if (comm.rank() == 0) {
    for (int64_t token : c.needles) {
      const int64_t chunk = (token - 4) / 8;
      EXPECT_TRUE(std::binary_search(want.recalled.begin(), want.recalled.end(), chunk)) << "needle " << token;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(
    Cases, Distributed,
    ::testing::Values(Case{43, 1, QueryMode::kTail, {}, 2, 6},          // no mid
                      Case{44, 2, QueryMode::kTail, {}, 2, 6},          // one chunk
                      Case{45, 32, QueryMode::kTail, {}, 2, 6},         // qlen = W
                      Case{83, 5, QueryMode::kTail, {}, 2, 6},          // partial last chunk
                      Case{1001, 3, QueryMode::kTail, {100, 600}, 2, 6},
                      Case{1001, 16, QueryMode::kTail, {}, 4, 3},       // R cap
                      Case{777, 9, QueryMode::kDetached, {50, 400}, 2, 6},
                      Case{2003, 1, QueryMode::kTail, {17, 1900}, 2, 6}));

// A batch mixing contexts, layers, qlens and modes (plus a query of an unknown context and one
// above the window) gives exactly what each query gives alone, with big blocks selected by
// Backend::merge_select, by the host, or split between them; the ok ones also match the fp64
// reference.
TEST(DistributedBatch, MatchesEachQueryAlone) {
  const Config config = config_for(4, 2, 2, 6);
  CpuBackend backend(1);
  MpiCommunicator comm;
  const int last = comm.world() - 1;
  const std::vector<test::BatchContext> contexts = {
      {1001, 0, SyntheticSpec{11, {100, 600}}}, {777, last, SyntheticSpec{12, {50, 400}}}, {40, 0, SyntheticSpec{13, {}}}};
  const std::vector<test::BatchQuery> queries = {
      {0, 0, 3, QueryMode::kTail},  {1, 1, 17, QueryMode::kDetached}, {0, 1, 1, QueryMode::kTail},
      {0, 0, 32, QueryMode::kTail}, {1, 1, 1, QueryMode::kTail},      {-1, 0, 2, QueryMode::kTail},
      {2, 0, 5, QueryMode::kTail},  {0, 0, 1, QueryMode::kDetached},   {1, 0, 33, QueryMode::kTail}};
  const std::vector<bool> want_ok = {true, true, true, true, true, false, true, true, false};
  test::expect_batch_matches_alone(backend, comm, config, contexts, queries, want_ok, {1, 64, int64_t{1} << 40});
}

}  // namespace
}  // namespace reattn

