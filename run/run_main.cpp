// reattn-run: the one-shot driver. Loads (or synthesises) one context across the MPI ranks,
// runs one query through the full pipeline, and prints one JSON object on rank 0:
// {"recalled_chunks": [ids], "out": [qlen][H][D], ...}. Errors: one line on stderr, exit 1.
#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <iostream>

#include "comm/control.h"
#include "comm/make_communicator.h"
#include "common/output_json.h"
#include "kernels/make_backend.h"
#include "run/mpi_program.h"
#include "run/run_inputs.h"
#include "worker/step.h"

namespace reattn {
namespace {

struct RunOptions {
  std::string config_path;
  std::string kv_path;
  std::string q_path;
  int64_t synthetic_tokens = 0;
  uint64_t seed = 0;
  std::vector<int64_t> needles;
  int64_t qlen = 1;
  int layer = 0;
  std::string mode = "tail";
  std::string final_attention;
  std::string recall;
  std::string backend;
  int owner_rank = 0;
  int repeat = 1;
  bool summary = false;
};

nlohmann::ordered_json needle_report(const std::vector<int64_t>& needles, const Regions& regions,
                                     const QueryResult& result) {
  const std::vector<int64_t>& recalled = result.recalled;
  nlohmann::ordered_json list = nlohmann::ordered_json::array();
  int found = 0;
  for (int64_t token : needles) {
    nlohmann::ordered_json n{{"token", token}};
    bool hit = true;
    if (token < regions.sink_end) {
      n["region"] = "sink";
    } else if (token >= regions.local_begin()) {
      n["region"] = "local";
    } else {
      const int64_t chunk = (token - regions.sink_tokens) / regions.chunk_tokens;
      n["region"] = "mid";
      n["chunk"] = chunk;
      hit = std::binary_search(recalled.begin(), recalled.end(), chunk) ||
            std::any_of(result.recalled_spans.begin(), result.recalled_spans.end(),
                        [token](const auto& span) { return span.first <= token && token < span.second; });
    }
    n["found"] = hit;
    found += hit;
    list.push_back(n);
  }
  return {{"planted", list}, {"found", found}, {"all_found", found == static_cast<int>(needles.size())}};
}

// Runs the job; every failure is agreed across ranks so all of them stop together.
Status run(const Control& control, const RunOptions& opt) {
  const auto t0 = std::chrono::steady_clock::now();
  REATTN_ASSIGN_OR_RETURN(Config config, [&]() -> Expected<Config> {
    REATTN_ASSIGN_OR_RETURN(Config c, load_config_file(opt.config_path));
    if (!opt.recall.empty()) {
      REATTN_ASSIGN_OR_RETURN(c.reattention.recall, parse_recall_mode(opt.recall));
      REATTN_RETURN_IF_ERROR(c.validate());  // span recall has its own scope rule
    }
    if (!opt.final_attention.empty()) {
      REATTN_ASSIGN_OR_RETURN(c.reattention.final_attention, parse_final_attention(opt.final_attention));
    }
    if (!opt.backend.empty()) {
      REATTN_ASSIGN_OR_RETURN(c.backend.kind, parse_backend_kind(opt.backend));
    }
    return c;
  }());
  const ModelConfig& model = config.model;
  REATTN_ASSIGN_OR_RETURN(QueryMode mode, parse_query_mode(opt.mode));
  if (opt.layer < 0 || opt.layer >= model.layers) {
    return invalid_argument("--layer: " + std::to_string(opt.layer) + " is outside [0, " +
                            std::to_string(model.layers) + ") for this model");
  }
  if (opt.owner_rank < 0 || opt.owner_rank >= control.world()) {
    return invalid_argument("--owner-rank: " + std::to_string(opt.owner_rank) + " is outside [0, " +
                            std::to_string(control.world()) + ")");
  }
  if (opt.repeat < 1) return invalid_argument("--repeat: must be >= 1, got " + std::to_string(opt.repeat));

  Expected<RunInputs> inputs =
      opt.synthetic_tokens > 0
          ? make_synthetic_inputs(opt.synthetic_tokens, opt.seed, opt.needles, opt.qlen, opt.layer, model)
          : load_file_inputs(opt.kv_path, opt.q_path, model, config.max_stored_value());
  REATTN_RETURN_IF_ERROR(control.agree(inputs.status()));
  const int64_t tokens = inputs->kv->tokens();
  REATTN_RETURN_IF_ERROR(validate_query(tokens, inputs->qlen, mode, config.reattention));

  Expected<std::unique_ptr<Backend>> backend = make_backend(config, control.local_rank());
  REATTN_RETURN_IF_ERROR(control.agree(backend.status()));
  Expected<std::unique_ptr<Communicator>> communicator = make_communicator(**backend, control);
  REATTN_RETURN_IF_ERROR(control.agree(communicator.status()));
  Communicator& comm = **communicator;
  KvStore store(**backend, config, control.rank(), control.world());
  constexpr ContextId kContext = 1;
  REATTN_RETURN_IF_ERROR(control.agree(store.create(kContext, opt.owner_rank, {opt.layer})));
  REATTN_RETURN_IF_ERROR(control.agree(store.append(kContext, *inputs->kv)));
  const double load_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();

  StepPlan plan;
  plan.strategy = config.reattention.final_attention;
  plan.reply_rank = 0;
  QueryPlan qp;
  qp.context_id = kContext;
  qp.tokens = tokens;
  qp.qlen = inputs->qlen;
  qp.layer = opt.layer;
  qp.mode = mode;
  qp.owner_rank = opt.owner_rank;
  plan.queries.push_back(qp);
  plan.q = inputs->q;

  StepRunner runner(**backend, comm, config, store);
  std::vector<QueryResult> results;
  std::vector<StepTiming> timings(opt.repeat);
  for (int r = 0; r < opt.repeat; ++r) {
    const Status step = runner.run(plan, &results, &timings[r]);
    if (!step.is_ok()) {
      std::fprintf(stderr, "reattn-run: fatal on rank %d: %s\n", control.rank(), step.to_string().c_str());
      control.abort(3);
    }
  }
  if (control.rank() != 0) return Status::ok();
  const QueryResult& result = results.at(0);
  REATTN_RETURN_IF_ERROR(result.status);

  std::sort(timings.begin(), timings.end(), [](const StepTiming& a, const StepTiming& b) { return a.total_ms < b.total_ms; });
  const StepTiming& median = timings[timings.size() / 2];
  const int64_t H = model.q_heads, D = model.head_dim;
  const Regions regions = compute_regions(tokens, config.reattention);
  nlohmann::ordered_json doc{
      {"recalled_chunks", result.recalled},
      {"out", nested_output<nlohmann::ordered_json>(result.out, inputs->qlen, H, D)},
      {"tokens", tokens},
      {"layer", opt.layer},
      {"mode", query_mode_name(mode)},
      {"final_attention", final_attention_name(config.reattention.final_attention)},
      {"ranks", control.world()},
      {"backend", (*backend)->name()},
      {"timing_ms",
       {{"load", load_ms},
        {"score", median.score_ms},
        {"merge", median.candidates_ms},
        {"attention", median.attention_ms},
        {"total", median.total_ms},
        {"repeats", opt.repeat}}}};
  if (config.reattention.recall == RecallMode::kSpan) {
    // Span recall: [first, end) token ranges instead of chunk ids.
    doc.erase("recalled_chunks");
    doc["recalled_spans"] = result.recalled_spans;
    doc["recall"] = "span";
  }
  if (inputs->synthetic) doc["needles"] = needle_report(inputs->synthetic->needles, regions, result);
  if (opt.summary) doc.erase("out");
  std::cout << doc.dump(opt.summary ? 2 : -1) << std::endl;
  return Status::ok();
}

}  // namespace
}  // namespace reattn

int main(int argc, char** argv) {
  using namespace reattn;
  return mpi_main("reattn-run", argc, argv, [](Control& control, int argc, char** argv) {
    RunOptions opt;
    CLI::App app{
        "reattn-run: one ReAttention query over a context sharded across the MPI ranks.\n"
        "Prints one JSON object on rank 0: {\"recalled_chunks\": [...], \"out\": [qlen][H][D], ...}"};
    app.add_option("--config", opt.config_path, "YAML config (model shape, reattention settings)")->required();
    auto* kv =
        app.add_option("--kv", opt.kv_path, "safetensors file with k and v, each [layers, kv_heads, tokens, head_dim]");
    auto* q = app.add_option("--q", opt.q_path, "safetensors file with q [qlen, q_heads, head_dim]");
    auto* syn = app.add_option("--synthetic-tokens", opt.synthetic_tokens,
                               "make a synthetic context of this many tokens instead of --kv/--q");
    app.add_option("--seed", opt.seed, "seed of the synthetic context")->needs(syn);
    app.add_option("--needles", opt.needles, "token positions of planted needles (synthetic)")
        ->delimiter(',')
        ->needs(syn);
    app.add_option("--qlen", opt.qlen, "query rows (synthetic)")->needs(syn);
    app.add_option("--layer", opt.layer, "layer to query")->required();
    app.add_option("--mode", opt.mode, "tail (rows are the last qlen tokens) or detached")
        ->check(CLI::IsMember({"tail", "detached"}));
    app.add_option("--final-attention", opt.final_attention, "gather or partial (default: the config's)")
        ->check(CLI::IsMember({"gather", "partial"}));
    app.add_option("--recall", opt.recall, "chunk or span (default: the config's)")
        ->check(CLI::IsMember({"chunk", "span"}));
    app.add_option("--backend", opt.backend, "auto, cpu or cuda (default: the config's)")
        ->check(CLI::IsMember({"auto", "cpu", "cuda"}));
    app.add_option("--owner-rank", opt.owner_rank, "rank that owns the context (default 0)");
    app.add_option("--repeat", opt.repeat, "run the query this many times and report the median time");
    app.add_flag("--summary", opt.summary, "print the recalled chunks, needles and timing, without out, indented");
    kv->needs(q)->excludes(syn);
    q->needs(kv);
    app.callback([&opt] {
      if (opt.synthetic_tokens == 0 && opt.kv_path.empty()) {
        throw CLI::RequiredError("give --kv and --q, or --synthetic-tokens");
      }
    });
    if (const std::optional<int> code = parse_command_line(app, argc, argv, control)) return *code;
    const Status status = run(control, opt);
    if (!status.is_ok()) {
      if (control.rank() == 0) std::fprintf(stderr, "reattn-run: error: %s\n", status.message().c_str());
      return 1;
    }
    return 0;
  });
}
