// Runs one query through the real pipeline (KvStore + StepRunner on a backend and a
// communicator), for the unit, multi-rank and GPU tests.
#pragma once

#include <vector>

#include "comm/communicator.h"
#include "common/synthetic.h"
#include "tests/reference.h"
#include "worker/step.h"

namespace reattn::test {

// K/V of a reference context as a KvSource (one layer, tokens [first, first + count)).
class ContextSource final : public Fp32KvSource {
 public:
  ContextSource(const ref::Context& ctx, int layer, int64_t first, int64_t count)
      : Fp32KvSource(ctx.model.head_dim), ctx_(ctx), layer_(layer), first_(first), count_(count) {}
  int64_t tokens() const override { return count_; }
  void read_f32(int layer, int kv_head, int64_t offset, int64_t count, float* k, float* v) const override;

 private:
  const ref::Context& ctx_;
  int layer_;
  int64_t first_;
  int64_t count_;
};

struct PipelineResult {
  Status status;
  std::vector<int64_t> recalled;
  std::vector<std::pair<int64_t, int64_t>> recalled_spans;  // span recall
  std::vector<float> out;
};

struct PipelineCase {
  int layer = 0;
  QueryMode mode = QueryMode::kTail;
  FinalAttention strategy = FinalAttention::kGather;
  int owner_rank = 0;
  std::vector<int64_t> append_pieces;  // token counts of successive appends; empty: one append
  int repeats = 1;                     // steps run; the last one's result counts (warm workspaces)
};

// Every rank calls it; the result is meaningful on rank 0. The context is created holding
// c.layer and filled by `appends` in order.
PipelineResult run_pipeline(Backend& backend, Communicator& comm, const Config& config,
                            const std::vector<const KvSource*>& appends, const std::vector<float>& q, int64_t qlen,
                            const PipelineCase& c);
// The same over a reference context, appended in c.append_pieces.
PipelineResult run_pipeline(Backend& backend, Communicator& comm, const Config& config, const ref::Context& ctx,
                            const std::vector<float>& q, int64_t qlen, const PipelineCase& c);

// One query over a synthetic context of n tokens through KvStore + StepRunner on a single rank
// (LoopbackCommunicator), run twice (the second step reuses the warm workspaces); the context is
// appended in two pieces so that the local-window ring is written across appends.
PipelineResult run_synthetic_query(Backend& backend, const Config& config, const SyntheticSpec& spec, int64_t n,
                                   const std::vector<float>& q, int64_t qlen, QueryMode mode,
                                   FinalAttention strategy);

// Batches: synthetic contexts (every layer resident) and one step mixing their queries.
struct BatchContext {
  int64_t n = 0;
  int owner_rank = 0;
  SyntheticSpec spec;
};
struct BatchQuery {
  int context = 0;  // index into the contexts; -1: a context that does not exist
  int layer = 0;
  int64_t qlen = 1;
  QueryMode mode = QueryMode::kTail;
};
struct BatchRun {
  Status status;                    // a fault (device, communicator, store)
  std::vector<QueryResult> batch;   // rank 0: the queries run as one step
  std::vector<QueryResult> alone;   // rank 0: each query as a step of its own
  std::vector<std::vector<float>> q;  // each query's rows [qlen, H, D]
};
// Every rank calls it. Query i's rows are rows [i, i + qlen) of synthetic_query(its context's
// spec, layer, qlen + i).
BatchRun run_batch_and_alone(Backend& backend, Communicator& comm, const Config& config,
                             const std::vector<BatchContext>& contexts, const std::vector<BatchQuery>& queries,
                             FinalAttention strategy, StepOptions options);

// A world of one rank, for tests without MPI: collectives are copies through the backend.
class LoopbackCommunicator final : public Communicator {
 public:
  explicit LoopbackCommunicator(Backend& backend) : backend_(backend) {}
  const char* name() const override { return "loopback"; }
  int rank() const override { return 0; }
  int world() const override { return 1; }
  Status allgather(const void* send, void* recv, size_t bytes) override { return backend_.copy(recv, send, bytes); }
  Status exchange(const std::vector<Transfer>& sends, const std::vector<Transfer>& recvs) override;

 private:
  Backend& backend_;
};

}  // namespace reattn::test
