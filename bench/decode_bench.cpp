// reattn-bench-decode: one layer of LLaMA-3.1-8B shapes (H=32, Hkv=8, D=128, bf16) on the CUDA
// backend, at the token counts given, qlen 1. Per size: the query end to end through
// KvStore + StepRunner + the communicator (NCCL), the scoring kernel alone (events), needle
// recall as a check, and device memory; once: a read-bandwidth probe. Runs alone or under
// mpirun (one GPU per rank; the context is sharded as in the service). JSON on rank 0.
#include <mpi.h>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <iostream>

#include "bench/decode_setup.h"
#include "bench/event_timing.h"
#include "bench/read_probe.h"
#include "comm/control.h"
#include "comm/make_communicator.h"
#include "common/synthetic.h"
#include "kernels/cuda/cuda_backend.h"
#include "kernels/cuda/cuda_check.h"
#include "run/mpi_program.h"
#include "worker/kv_store.h"
#include "worker/step.h"

namespace reattn {
namespace {

using bench::read_bandwidth;


Config llama_layer_config(const std::string& final_attention) {
  Config c;
  c.model.layers = 1;
  c.model.q_heads = 32;
  c.model.kv_heads = 8;
  c.model.head_dim = 128;
  c.model.rope_theta = 500000.0;
  c.model.scope = 8192;
  c.reattention.sink_tokens = 32;
  c.reattention.local_window = 4096;
  c.reattention.chunk_tokens = 64;
  c.reattention.top_k = 4;
  c.reattention.max_recall_chunks = 32;
  c.reattention.final_attention = final_attention == "partial" ? FinalAttention::kPartial : FinalAttention::kGather;
  c.backend.kind = BackendKind::kCuda;
  c.backend.storage_dtype = DType::kBF16;
  c.capacity.tokens_per_rank = int64_t{1} << 27;
  return c;
}

size_t device_used_bytes() {
  size_t free_bytes = 0, total = 0;
  if (cudaMemGetInfo(&free_bytes, &total) != cudaSuccess) return 0;
  return total - free_bytes;
}


Expected<nlohmann::json> bench_size(CudaBackend& backend, Communicator& comm, const Control& control, const Config& cfg,
                                    int64_t tokens, int repeat) {
  const ModelConfig& m = cfg.model;
  const ReattentionConfig& rc = cfg.reattention;
  const Regions regions = compute_regions(tokens, rc);
  const int rank = control.rank(), world = control.world();
  SyntheticSpec spec;
  spec.seed = 2026;
  spec.needles = {regions.chunk_first_token(regions.num_chunks / 7) + 11, regions.chunk_first_token(regions.num_chunks / 2),
                  regions.chunk_first_token(regions.num_chunks - 3) + 63};
  const std::vector<float> q = synthetic_query(spec, m, 0, 1);

  backend.reset_peak_allocated_bytes();
  const size_t used_before = device_used_bytes();
  const size_t alloc_before = backend.allocated_bytes();
  KvStore store(backend, cfg, rank, world);
  constexpr ContextId kContext = 1;
  REATTN_ASSIGN_OR_RETURN(const double load_s, bench::load_context(backend, store, control, kContext, spec, m, tokens));

  // End to end: the whole step on every rank, timed on rank 0 (owner and reply rank).
  REATTN_ASSIGN_OR_RETURN(const bench::StepTimes steps,
                          bench::time_steps(backend, comm, control, cfg, store, kContext, tokens, q, repeat));
  const std::vector<double>& e2e_ms = steps.e2e_ms;
  nlohmann::json needles = nlohmann::json::array();
  bool all_found = true;
  if (rank == 0) {
    for (int64_t token : spec.needles) {
      const int64_t chunk = (token - rc.sink_tokens) / rc.chunk_tokens;
      const bool found = std::binary_search(steps.result.recalled.begin(), steps.result.recalled.end(), chunk);
      all_found = all_found && found;
      needles.push_back({{"token", token}, {"chunk", chunk}, {"found", found}});
    }
  }

  // The scoring kernel alone, on this rank's mid chunks.
  const LayerShard& shard = store.find(kContext)->layers[0];
  REATTN_ASSIGN_OR_RETURN(Buffer q_dev, backend.allocate(q.size() * sizeof(float)));
  REATTN_RETURN_IF_ERROR(backend.upload(q_dev.data(), q.data(), q.size() * sizeof(float)));
  REATTN_ASSIGN_OR_RETURN(Buffer cand, backend.allocate(static_cast<size_t>(m.q_heads) * rc.top_k * sizeof(Candidate)));
  const ScoreParams p = bench::mid_score_params(shard, cfg, regions, rank, world, q_dev.as<float>(), cand.as<Candidate>());
  REATTN_ASSIGN_OR_RETURN(double kernel_ms, bench::time_events(backend.stream(), 3, repeat, [&]() { return backend.score_chunks(p); }));
  const double key_bytes = static_cast<double>(p.block_count) * m.kv_heads * rc.chunk_tokens * m.head_dim * 2;

  const double kv_bytes = static_cast<double>(tokens_charged(tokens, 0, rank, world, rc)) * m.kv_heads * m.head_dim * 2 * 2;
  const size_t peak_alloc = backend.peak_allocated_bytes() - alloc_before;
  const size_t used_after = device_used_bytes();
  nlohmann::json doc{
      {"tokens", tokens},
      {"rank", rank},
      {"world", world},
      {"load_s", load_s},
      {"e2e_ms", bench::median(e2e_ms)},
      {"e2e_min_ms", *std::min_element(e2e_ms.begin(), e2e_ms.end())},
      {"step_score_ms", bench::median(steps.score_ms)},
      {"step_merge_ms", bench::median(steps.candidates_ms)},
      {"step_attention_ms", bench::median(steps.attention_ms)},
      {"score_kernel_ms", kernel_ms},
      {"score_key_bytes", key_bytes},
      {"score_kernel_gb_per_s", key_bytes / kernel_ms / 1e6},
      {"kv_bytes", kv_bytes},
      {"peak_alloc_bytes", peak_alloc},
      {"alloc_overhead", (peak_alloc - kv_bytes) / kv_bytes},
      {"device_used_delta_bytes", used_after - used_before},
      {"recalled", rank == 0 ? nlohmann::json(steps.result.recalled) : nlohmann::json()},
      {"needles", needles},
      {"all_needles_found", all_found}};
  return doc;
}

Status run(const Control& control, const std::vector<int64_t>& sizes, int repeat, const std::string& strategy,
           const std::string& json_path) {
  const Config cfg = llama_layer_config(strategy);
  REATTN_RETURN_IF_ERROR(cfg.validate());
  REATTN_ASSIGN_OR_RETURN(const bench::CudaRank cuda_rank, bench::make_cuda_rank(cfg, control));
  CudaBackend& backend = cuda_rank.cuda();
  cudaDeviceProp prop{};
  REATTN_CUDA_CHECK(cudaGetDeviceProperties(&prop, backend.device()));

  nlohmann::json out{{"device", prop.name}, {"world", control.world()}, {"final_attention", strategy},
                     {"sizes", nlohmann::json::array()}};
  REATTN_ASSIGN_OR_RETURN(out["read_bandwidth"], read_bandwidth(backend, size_t{4} << 30));
  for (int64_t tokens : sizes) {
    REATTN_ASSIGN_OR_RETURN(nlohmann::json r, bench_size(backend, *cuda_rank.comm, control, cfg, tokens, repeat));
    // Every rank's kernel time (the slowest bounds the step).
    double mine = r["score_kernel_ms"].get<double>();
    double slowest = 0;
    MPI_Reduce(&mine, &slowest, 1, MPI_DOUBLE, MPI_MAX, 0, MPI_COMM_WORLD);
    r["score_kernel_ms_slowest_rank"] = slowest;
    if (control.rank() == 0) {
      std::fprintf(stderr, "[bench] world=%d tokens=%lld e2e=%.3f ms score_kernel=%.3f ms (%.0f GB/s) needles=%s\n",
                   control.world(), static_cast<long long>(tokens), r["e2e_ms"].get<double>(),
                   r["score_kernel_ms"].get<double>(), r["score_kernel_gb_per_s"].get<double>(),
                   r["all_needles_found"].get<bool>() ? "found" : "MISSED");
    }
    out["sizes"].push_back(r);
  }
  out["peak_alloc_bytes"] = backend.peak_allocated_bytes();
  return bench::write_json(control, out, json_path);
}

}  // namespace
}  // namespace reattn

int main(int argc, char** argv) {
  using namespace reattn;
  return mpi_main("reattn-bench-decode", argc, argv, [](Control& control, int argc, char** argv) {
    std::vector<int64_t> sizes{262144, 1048576, 4194304};
    int repeat = 30;
    std::string strategy = "gather";
    std::string json_path = "bench.json";
    CLI::App app{"reattn-bench-decode: LLaMA-3.1-8B-shaped decode on the CUDA backend"};
    app.add_option("--tokens", sizes, "context sizes")->delimiter(',');
    app.add_option("--repeat", repeat, "timed repetitions (median reported)");
    app.add_option("--final-attention", strategy, "gather or partial")->check(CLI::IsMember({"gather", "partial"}));
    app.add_option("--json", json_path, "where rank 0 writes the results");
    if (const std::optional<int> code = parse_command_line(app, argc, argv, control)) return *code;
    return exit_code("reattn-bench-decode", control, run(control, sizes, repeat, strategy, json_path));
  });
}
