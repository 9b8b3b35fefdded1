// reattn-bench-span: span recall against chunk recall on the CUDA backend, in one run, over one
// layer of LLaMA-3-8B shapes (H=32, Hkv=8, D=128, bf16; S=32, W=4096, C=64, top_k=4; chunk
// recall R=32 chunks, span recall s=32 and R=127 tokens, the paper's), decode (qlen 1).
// Per size, one context serves both modes: the scoring kernel alone (events) and its share of
// a read-bandwidth probe measured in the same run, the query end to end through
// KvStore + StepRunner + the communicator, and needle recall as a check. Runs alone or under
// mpirun (one GPU per rank). JSON on rank 0.
#include <mpi.h>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>

#include "bench/decode_setup.h"
#include "bench/event_timing.h"
#include "bench/read_probe.h"
#include "comm/control.h"
#include "comm/make_communicator.h"
#include "common/synthetic.h"
#include "kernels/cuda/cuda_backend.h"
#include "run/mpi_program.h"
#include "worker/kv_store.h"
#include "worker/step.h"

namespace reattn {
namespace {

using bench::median;
using bench::time_events;

Config layer_config(RecallMode recall, FinalAttention strategy) {
  Config c;
  c.model.layers = 1;
  c.model.q_heads = 32;
  c.model.kv_heads = 8;
  c.model.head_dim = 128;
  c.model.rope_theta = 500000.0;
  // LLaMA-3.1's scope and scaling, so that the paper's 127 spans of 32 pass the scope rule
  // with the same 64-token blocks and 4096-token window as chunk recall.
  c.model.scope = 131072;
  c.model.rope_scaling = RopeScaling{RopeScalingType::kLlama3, 8.0, 1.0, 4.0, 8192};
  c.reattention.sink_tokens = 32;
  c.reattention.local_window = 4096;
  c.reattention.chunk_tokens = 64;
  c.reattention.top_k = 4;
  c.reattention.max_recall_chunks = 32;
  c.reattention.recall = recall;
  c.reattention.span_tokens = 32;
  c.reattention.max_recall_tokens = 127;
  c.reattention.final_attention = strategy;
  c.backend.kind = BackendKind::kCuda;
  c.backend.storage_dtype = DType::kBF16;
  c.capacity.tokens_per_rank = int64_t{1} << 27;
  return c;
}

// Both modes over one loaded context of `tokens` tokens.
Expected<nlohmann::json> bench_size(CudaBackend& backend, Communicator& comm, const Control& control,
                                    FinalAttention strategy, int64_t tokens, int repeat, double read_gbps) {
  const Config chunk_cfg = layer_config(RecallMode::kChunk, strategy);
  const ModelConfig& m = chunk_cfg.model;
  const ReattentionConfig& rc = chunk_cfg.reattention;
  const Regions regions = compute_regions(tokens, rc);
  const int rank = control.rank(), world = control.world();
  SyntheticSpec spec;
  spec.seed = 2026;
  // The middle needle sits at a block's last token.
  spec.needles = {regions.chunk_first_token(regions.num_chunks / 7) + 11,
                  regions.chunk_first_token(regions.num_chunks / 2) + rc.chunk_tokens - 1,
                  regions.chunk_first_token(regions.num_chunks - 3) + 40};
  const std::vector<float> q = synthetic_query(spec, m, 0, 1);
  KvStore store(backend, chunk_cfg, rank, world);
  constexpr ContextId kContext = 1;
  REATTN_ASSIGN_OR_RETURN(const double load_s, bench::load_context(backend, store, control, kContext, spec, m, tokens));

  const LayerShard& shard = store.find(kContext)->layers[0];
  REATTN_ASSIGN_OR_RETURN(Buffer q_dev, backend.allocate(q.size() * sizeof(float)));
  REATTN_RETURN_IF_ERROR(backend.upload(q_dev.data(), q.data(), q.size() * sizeof(float)));
  REATTN_ASSIGN_OR_RETURN(Buffer cand, backend.allocate(static_cast<size_t>(m.q_heads) * rc.top_k * sizeof(Candidate)));
  const ScoreParams p =
      bench::mid_score_params(shard, chunk_cfg, regions, rank, world, q_dev.as<float>(), cand.as<Candidate>());
  const double key_bytes = static_cast<double>(p.block_count) * m.kv_heads * rc.chunk_tokens * m.head_dim * 2;

  nlohmann::json doc{{"tokens", tokens}, {"load_s", load_s}, {"key_bytes_per_rank", key_bytes}};
  for (RecallMode recall : {RecallMode::kChunk, RecallMode::kSpan}) {
    const Config cfg = layer_config(recall, strategy);
    REATTN_RETURN_IF_ERROR(cfg.validate());
    const bool span = recall == RecallMode::kSpan;
    REATTN_ASSIGN_OR_RETURN(double kernel_ms, time_events(backend.stream(), 3, repeat, [&]() {
      return span ? backend.score_tokens(p) : backend.score_chunks(p);
    }));
    double slowest_kernel = 0;
    MPI_Reduce(&kernel_ms, &slowest_kernel, 1, MPI_DOUBLE, MPI_MAX, 0, MPI_COMM_WORLD);

    REATTN_ASSIGN_OR_RETURN(const bench::StepTimes steps,
                            bench::time_steps(backend, comm, control, cfg, store, kContext, tokens, q, repeat));
    nlohmann::json needles = nlohmann::json::array();
    bool all_found = true;
    int64_t recalled_tokens = 0;
    if (rank == 0) {
      const QueryResult& res = steps.result;
      for (const auto& [a, b] : res.recalled_spans) recalled_tokens += b - a;
      recalled_tokens += static_cast<int64_t>(res.recalled.size()) * rc.chunk_tokens;
      for (int64_t token : spec.needles) {
        const int64_t chunk = (token - rc.sink_tokens) / rc.chunk_tokens;
        // Span recall also needs the needle's next token (in the next block) recalled.
        const auto in_span = [&](int64_t t) {
          return std::any_of(res.recalled_spans.begin(), res.recalled_spans.end(),
                             [t](const auto& s) { return s.first <= t && t < s.second; });
        };
        const bool found = span ? in_span(token) && in_span(token + 1)
                                : std::binary_search(res.recalled.begin(), res.recalled.end(), chunk);
        all_found = all_found && found;
        needles.push_back({{"token", token}, {"found", found}});
      }
    }
    const double gbps = key_bytes / kernel_ms / 1e6;
    nlohmann::json r{{"score_kernel_ms", kernel_ms},
                     {"score_kernel_ms_slowest_rank", slowest_kernel},
                     {"score_kernel_gb_per_s", gbps},
                     {"score_fraction_of_read_bw", gbps / read_gbps},
                     {"e2e_ms", median(steps.e2e_ms)},
                     {"e2e_min_ms", *std::min_element(steps.e2e_ms.begin(), steps.e2e_ms.end())},
                     {"step_score_ms", median(steps.score_ms)},
                     {"step_candidates_ms", median(steps.candidates_ms)},
                     {"step_attention_ms", median(steps.attention_ms)},
                     {"recalled_tokens", recalled_tokens},
                     {"needles", needles},
                     {"all_needles_found", all_found}};
    if (rank == 0) {
      std::printf("%10lld %5d %8s %6s %10.3f %8.1f%% %10.3f %10.3f %10.3f %9lld %8s\n", static_cast<long long>(tokens),
                  world, final_attention_name(strategy), recall_mode_name(recall), kernel_ms, 100 * gbps / read_gbps,
                  r["step_score_ms"].get<double>(), r["e2e_ms"].get<double>(), r["step_attention_ms"].get<double>(),
                  static_cast<long long>(recalled_tokens), all_found ? "ok" : "MISSED");
      std::fflush(stdout);
    }
    doc[recall_mode_name(recall)] = r;
  }
  if (rank == 0) {
    doc["span_over_chunk_e2e"] = doc["span"]["e2e_ms"].get<double>() / doc["chunk"]["e2e_ms"].get<double>();
    doc["span_over_chunk_score_kernel"] =
        doc["span"]["score_kernel_ms"].get<double>() / doc["chunk"]["score_kernel_ms"].get<double>();
  }
  return doc;
}

Status run(const Control& control, const std::vector<int64_t>& sizes, int repeat, const std::string& strategy_name,
           const std::string& json_path) {
  REATTN_ASSIGN_OR_RETURN(FinalAttention strategy, parse_final_attention(strategy_name));
  const Config cfg = layer_config(RecallMode::kSpan, strategy);
  REATTN_RETURN_IF_ERROR(cfg.validate());
  REATTN_ASSIGN_OR_RETURN(const bench::CudaRank cuda_rank, bench::make_cuda_rank(cfg, control));
  CudaBackend& backend = cuda_rank.cuda();
  cudaDeviceProp prop{};
  REATTN_CUDA_CHECK(cudaGetDeviceProperties(&prop, backend.device()));
  REATTN_ASSIGN_OR_RETURN(nlohmann::json probe, bench::read_bandwidth(backend, size_t{4} << 30));
  const double read_gbps = probe["gb_per_s"].get<double>();
  nlohmann::json out{{"device", prop.name},
                     {"world", control.world()},
                     {"final_attention", strategy_name},
                     {"read_bandwidth_gb_per_s", read_gbps},
                     {"shapes", "H=32 Hkv=8 D=128 bf16; S=32 W=4096 C=64 top_k=4; chunk R=32; span s=32 R=127; qlen 1"},
                     {"sizes", nlohmann::json::array()}};
  if (control.rank() == 0) {
    std::printf("# reattn-bench-span: %s, %d rank(s), read bandwidth %.1f GB/s (measured)\n", prop.name,
                control.world(), read_gbps);
    std::printf("#   tokens ranks strategy recall  score_ms %%read_bw  step_score     e2e_ms    attn_ms  recalled  needles\n");
  }
  for (int64_t tokens : sizes) {
    REATTN_ASSIGN_OR_RETURN(nlohmann::json r, bench_size(backend, *cuda_rank.comm, control, strategy, tokens, repeat, read_gbps));
    out["sizes"].push_back(r);
  }
  return bench::write_json(control, out, json_path);
}

}  // namespace
}  // namespace reattn

int main(int argc, char** argv) {
  using namespace reattn;
  return mpi_main("reattn-bench-span", argc, argv, [](Control& control, int argc, char** argv) {
    std::vector<int64_t> sizes{1048576, 4194304};
    int repeat = 30;
    std::string strategy = "partial";
    std::string json_path = "span.json";
    CLI::App app{"reattn-bench-span: span against chunk recall, LLaMA-3-8B-shaped decode on the CUDA backend"};
    app.add_option("--tokens", sizes, "context sizes")->delimiter(',');
    app.add_option("--repeat", repeat, "timed repetitions (median reported)");
    app.add_option("--final-attention", strategy, "gather or partial")->check(CLI::IsMember({"gather", "partial"}));
    app.add_option("--json", json_path, "where rank 0 writes the results");
    if (const std::optional<int> code = parse_command_line(app, argc, argv, control)) return *code;
    return exit_code("reattn-bench-span", control, run(control, sizes, repeat, strategy, json_path));
  });
}
