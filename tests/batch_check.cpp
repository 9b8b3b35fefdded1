#include "tests/batch_check.h"

#include <gtest/gtest.h>

#include <string>

namespace reattn::test {

void expect_batch_matches_alone(Backend& backend, Communicator& comm, const Config& config,
                                const std::vector<BatchContext>& contexts, const std::vector<BatchQuery>& queries,
                                const std::vector<bool>& want_ok, const std::vector<int64_t>& device_select_rows) {
  ASSERT_EQ(want_ok.size(), queries.size());
  for (FinalAttention strategy : {FinalAttention::kGather, FinalAttention::kPartial}) {
    for (int64_t device_rows : device_select_rows) {
      const BatchRun run = run_batch_and_alone(backend, comm, config, contexts, queries, strategy, StepOptions{device_rows});
      ASSERT_TRUE(run.status.is_ok()) << run.status.to_string();
      if (comm.rank() != 0) continue;
      ASSERT_EQ(run.batch.size(), queries.size());
      ASSERT_EQ(run.alone.size(), queries.size());
      for (size_t i = 0; i < queries.size(); ++i) {
        SCOPED_TRACE(std::string(final_attention_name(strategy)) + " device_select_rows " +
                     std::to_string(device_rows) + " query " + std::to_string(i));
        const QueryResult& got = run.batch[i];
        const QueryResult& one = run.alone[i];
        EXPECT_EQ(got.status.is_ok(), want_ok[i]) << got.status.to_string();
        EXPECT_EQ(one.status.is_ok(), want_ok[i]) << one.status.to_string();
        if (!want_ok[i]) continue;
        EXPECT_EQ(got.recalled, one.recalled);
        EXPECT_EQ(got.recalled_spans, one.recalled_spans);
        EXPECT_EQ(got.out, one.out);
        const BatchQuery& bq = queries[i];
        const BatchContext& bc = contexts[bq.context];
        const ref::Context ctx =
            ref::synthetic_context(config.model, config.reattention, bc.n, bc.spec.seed, bc.spec.needles, bq.layer);
        const ref::Result want = ref::query(ctx, run.q[i], bq.qlen, bq.mode);
        EXPECT_EQ(got.recalled, want.recalled);
        EXPECT_EQ(got.recalled_spans, want.spans);
        EXPECT_LT(ref::relative_error(got.out, want.out), 1e-5);
      }
    }
  }
}

}  // namespace reattn::test
