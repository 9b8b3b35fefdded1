// What the one-query decode benchmarks (reattn-bench-decode, reattn-bench-span) share: the
// CUDA backend and communicator of a rank, a synthetic context loaded on every rank, the
// step of one tail query timed end to end, the scoring kernel's parameters over this rank's
// mid, and rank 0's JSON file.
#pragma once

#include <nlohmann/json.hpp>

#include <chrono>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "comm/control.h"
#include "comm/make_communicator.h"
#include "common/synthetic.h"
#include "kernels/cuda/cuda_backend.h"
#include "worker/kv_store.h"
#include "worker/step.h"

namespace reattn::bench {

// This rank's CUDA backend and communicator for `cfg` (every rank agrees on failure).
struct CudaRank {
  std::unique_ptr<Backend> backend;
  std::unique_ptr<Communicator> comm;
  CudaBackend& cuda() const { return static_cast<CudaBackend&>(*backend); }
};
inline Expected<CudaRank> make_cuda_rank(const Config& cfg, const Control& control) {
  Expected<std::unique_ptr<Backend>> made = make_cuda_backend(cfg, control.local_rank());
  REATTN_RETURN_IF_ERROR(control.agree(made.status()));
  Expected<std::unique_ptr<Communicator>> comm = make_communicator(**made, control);
  REATTN_RETURN_IF_ERROR(control.agree(comm.status()));
  CudaRank r;
  r.backend = std::move(*made);
  r.comm = std::move(*comm);
  return r;
}

// Creates `context` (owner rank 0, layer 0) and appends the synthetic tokens [0, tokens) on
// every rank; the seconds until every rank holds them.
inline Expected<double> load_context(Backend& backend, KvStore& store, const Control& control, ContextId context,
                                     const SyntheticSpec& spec, const ModelConfig& m, int64_t tokens) {
  const auto t0 = std::chrono::steady_clock::now();
  REATTN_RETURN_IF_ERROR(control.agree(store.create(context, 0, {0})));
  REATTN_RETURN_IF_ERROR(control.agree(store.append(context, SyntheticKvSource(spec, m, 0, tokens))));
  REATTN_RETURN_IF_ERROR(backend.synchronize());
  REATTN_RETURN_IF_ERROR(control.barrier());
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// One tail query of one row over `context` as a step: 3 untimed steps, then `repeat` timed
// ones (wall time on this rank, each after a barrier) with their StepTiming; `result` is the
// last step's answer on rank 0.
struct StepTimes {
  std::vector<double> e2e_ms, score_ms, candidates_ms, attention_ms;
  QueryResult result;
};
inline Expected<StepTimes> time_steps(Backend& backend, Communicator& comm, const Control& control, const Config& cfg,
                                      const KvStore& store, ContextId context, int64_t tokens,
                                      const std::vector<float>& q, int repeat) {
  StepPlan plan;
  plan.strategy = cfg.reattention.final_attention;
  QueryPlan qp;
  qp.context_id = context;
  qp.tokens = tokens;
  qp.qlen = 1;
  qp.mode = QueryMode::kTail;
  plan.queries.push_back(qp);
  plan.q = q;
  StepRunner runner(backend, comm, cfg, store);
  std::vector<QueryResult> results;
  StepTimes t;
  for (int r = 0; r < 3 + repeat; ++r) {
    REATTN_RETURN_IF_ERROR(control.barrier());
    StepTiming timing;
    const auto t0 = std::chrono::steady_clock::now();
    REATTN_RETURN_IF_ERROR(runner.run(plan, &results, &timing));
    const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    if (r < 3) continue;
    t.e2e_ms.push_back(ms);
    t.score_ms.push_back(timing.score_ms);
    t.candidates_ms.push_back(timing.candidates_ms);
    t.attention_ms.push_back(timing.attention_ms);
  }
  if (control.rank() == 0) {
    t.result = results.at(0);
    REATTN_RETURN_IF_ERROR(t.result.status);
  }
  return t;
}

// The scoring kernel's parameters for one row `q` (backend memory) over this rank's mid slots
// of layer 0, candidates into `out` [H, top_k].
inline ScoreParams mid_score_params(const LayerShard& shard, const Config& cfg, const Regions& regions, int rank,
                                    int world, const float* q, Candidate* out) {
  ScoreParams p;
  p.k_pages = shard.k_page_table.as<const void* const>();
  p.blocks_per_page = KvStore::kBlocksPerPage;
  p.block_count = mid_slots_on_rank(regions.num_chunks, rank, world);
  p.chunk_id_stride = world;
  p.chunk_id_offset = rank;
  p.q = q;
  p.qlen = 1;
  p.q_heads = cfg.model.q_heads;
  p.kv_heads = cfg.model.kv_heads;
  p.head_dim = cfg.model.head_dim;
  p.chunk_tokens = cfg.reattention.chunk_tokens;
  p.top_k = cfg.reattention.top_k;
  p.out = out;
  p.first_token = cfg.reattention.sink_tokens;
  return p;
}

// Rank 0 writes `doc` to `path`.
inline Status write_json(const Control& control, const nlohmann::json& doc, const std::string& path) {
  if (control.rank() != 0) return Status::ok();
  std::ofstream f(path);
  f << doc.dump(2) << "\n";
  if (!f) return invalid_argument("--json: cannot write " + path);
  return Status::ok();
}

}  // namespace reattn::bench
