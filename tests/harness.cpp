#include "tests/harness.h"

namespace reattn::test {

void ContextSource::read_f32(int layer, int kv_head, int64_t offset, int64_t count, float* k, float* v) const {
  (void)layer;
  const int D = ctx_.model.head_dim;
  const size_t base = (static_cast<size_t>(kv_head) * ctx_.n + first_ + offset) * D;
  for (int64_t i = 0; i < count * D; ++i) {
    k[i] = static_cast<float>(ctx_.k[base + i]);
    v[i] = static_cast<float>(ctx_.v[base + i]);
  }
}

Status LoopbackCommunicator::exchange(const std::vector<Transfer>& sends, const std::vector<Transfer>& recvs) {
  if (sends.size() != recvs.size()) return internal_error("loopback exchange: sends and receives differ in count");
  for (size_t i = 0; i < sends.size(); ++i) {
    if (sends[i].bytes != recvs[i].bytes) return internal_error("loopback exchange: size mismatch");
    REATTN_RETURN_IF_ERROR(backend_.copy(recvs[i].data, sends[i].data, sends[i].bytes));
  }
  return backend_.synchronize();
}

PipelineResult run_pipeline(Backend& backend, Communicator& comm, const Config& config, const ref::Context& ctx,
                            const std::vector<float>& q, int64_t qlen, const PipelineCase& c) {
  std::vector<int64_t> pieces = c.append_pieces;
  if (pieces.empty()) pieces.push_back(ctx.n);
  std::vector<ContextSource> sources;
  int64_t first = 0;
  for (int64_t count : pieces) {
    sources.emplace_back(ctx, c.layer, first, count);
    first += count;
  }
  std::vector<const KvSource*> appends;
  for (const ContextSource& s : sources) appends.push_back(&s);
  return run_pipeline(backend, comm, config, appends, q, qlen, c);
}

PipelineResult run_pipeline(Backend& backend, Communicator& comm, const Config& config,
                            const std::vector<const KvSource*>& appends, const std::vector<float>& q, int64_t qlen,
                            const PipelineCase& c) {
  PipelineResult result;
  KvStore store(backend, config, comm.rank(), comm.world());
  constexpr ContextId kId = 7;
  result.status = store.create(kId, c.owner_rank, {c.layer});
  if (!result.status.is_ok()) return result;
  int64_t first = 0;
  for (const KvSource* source : appends) {
    result.status = store.append(kId, *source);
    if (!result.status.is_ok()) return result;
    first += source->tokens();
  }
  StepPlan plan;
  plan.strategy = c.strategy;
  QueryPlan qp;
  qp.context_id = kId;
  qp.tokens = first;
  qp.qlen = qlen;
  qp.layer = c.layer;
  qp.mode = c.mode;
  qp.owner_rank = c.owner_rank;
  plan.queries.push_back(qp);
  plan.q = q;
  StepRunner runner(backend, comm, config, store);
  std::vector<QueryResult> results;
  for (int rep = 0; rep < c.repeats && result.status.is_ok(); ++rep) result.status = runner.run(plan, &results, nullptr);
  if (!result.status.is_ok() || comm.rank() != 0) return result;
  result.status = results[0].status;
  result.recalled = results[0].recalled;
  result.recalled_spans = results[0].recalled_spans;
  result.out = results[0].out;
  return result;
}

PipelineResult run_synthetic_query(Backend& backend, const Config& config, const SyntheticSpec& spec, int64_t n,
                                   const std::vector<float>& q, int64_t qlen, QueryMode mode,
                                   FinalAttention strategy) {
  LoopbackCommunicator comm(backend);
  const int64_t first = n > 37 ? n - 37 : n;
  const SyntheticKvSource head(spec, config.model, 0, first), tail(spec, config.model, first, n - first);
  std::vector<const KvSource*> appends{&head};
  if (first < n) appends.push_back(&tail);
  PipelineCase pc;
  pc.mode = mode;
  pc.strategy = strategy;
  pc.repeats = 2;
  return run_pipeline(backend, comm, config, appends, q, qlen, pc);
}

BatchRun run_batch_and_alone(Backend& backend, Communicator& comm, const Config& config,
                             const std::vector<BatchContext>& contexts, const std::vector<BatchQuery>& queries,
                             FinalAttention strategy, StepOptions options) {
  BatchRun run;
  KvStore store(backend, config, comm.rank(), comm.world());
  for (size_t c = 0; c < contexts.size() && run.status.is_ok(); ++c) {
    const ContextId id = 100 + c;
    run.status = store.create(id, contexts[c].owner_rank);
    if (run.status.is_ok()) {
      run.status = store.append(id, SyntheticKvSource(contexts[c].spec, config.model, 0, contexts[c].n));
    }
  }
  if (!run.status.is_ok()) return run;
  StepPlan batch;
  batch.strategy = strategy;
  std::vector<StepPlan> alone;
  for (size_t i = 0; i < queries.size(); ++i) {
    const BatchQuery& bq = queries[i];
    const bool known = bq.context >= 0;
    // Rows [i, i + qlen) of a longer block: every query's rows differ, all point at the needles.
    const SyntheticSpec spec = known ? contexts[bq.context].spec : SyntheticSpec{};
    const std::vector<float> rows = synthetic_query(spec, config.model, bq.layer, bq.qlen + static_cast<int64_t>(i));
    const size_t row_floats = static_cast<size_t>(config.model.q_heads) * config.model.head_dim;
    run.q.emplace_back(rows.begin() + i * row_floats, rows.end());
    QueryPlan qp;
    qp.context_id = known ? 100 + bq.context : 999;
    qp.tokens = known ? contexts[bq.context].n : 1;
    qp.qlen = bq.qlen;
    qp.layer = bq.layer;
    qp.mode = bq.mode;
    qp.owner_rank = known ? contexts[bq.context].owner_rank : 0;
    append_query(batch, qp, run.q.back().data(), run.q.back().size());
    StepPlan one;
    one.strategy = strategy;
    append_query(one, qp, run.q.back().data(), run.q.back().size());
    alone.push_back(std::move(one));
  }
  StepRunner runner(backend, comm, config, store, options);
  std::vector<QueryResult> results;
  run.status = runner.run(batch, &results, nullptr);
  if (!run.status.is_ok()) return run;
  run.batch = results;
  for (const StepPlan& plan : alone) {
    run.status = runner.run(plan, &results, nullptr);
    if (!run.status.is_ok()) return run;
    if (comm.rank() == 0) run.alone.push_back(results[0]);
  }
  return run;
}

}  // namespace reattn::test
