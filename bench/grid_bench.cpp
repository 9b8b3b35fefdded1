// reattn-bench-grid: the service's own per-rank path (ServiceLoop: create, synthetic fill, query
// batches as one StepPlan each), minus HTTP, timed over a grid of context sizes, qlen, batch
// (queries of one shared context in one step) and final-attention strategy. Runs under
// mpirun with any number of ranks; rank 0 submits the operations as the coordinator does, the
// other ranks serve. Prints nccl-tests-style rows on rank 0 and writes CSV and JSON.
//
//   mpirun -np N reattn-bench-grid --config configs/llama3-8b.yaml --tokens 1M,4M --qlen 1,16
//       --batch 1,8,32 --strategy gather,partial --csv out.csv --json out.json
//
// Columns: latency of the whole query-batch operation on rank 0 (broadcast of the plan, score,
// candidate allgather and selection, final attention, reply), p50 and p99 over --iters steps;
// score/merge/attn: rank 0's StepTiming phases (medians); keys_GBps: bytes of every mid key the
// step read, summed over ranks and over the batch (each query of a batch scans the keys again)
// divided by the score phase; %read_bw: that over ranks x the measured per-rank read bandwidth;
// queries_per_s: batch / p50; needles_ok: every planted needle recalled by every query of
// every timed step.
//
// --mode prefill: a model ingesting a context: layer steps (POST .../step without HTTP) of
// --prefill-step tokens (append k/v to layer 0, then the tail query whose rows are those
// tokens) until --prefill-tokens, with bf16-exact q (a model's q). Per step: wall time of the
// operation on rank 0 and its phases (score, merge = candidate allgather + selection, attn;
// append = wall - step total: plan broadcast, k/v append, q copy). --prefill-sample N times
// N evenly spaced steps and fills the tokens between them with synthetic appends; the total is
// then estimated as the mean sampled step x steps (printed as such).
#include <mpi.h>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "comm/control.h"
#include "comm/make_communicator.h"
#include "common/dtype.h"
#include "common/semantics.h"
#include "common/synthetic.h"
#include "kernels/make_backend.h"
#include "run/mpi_program.h"
#include "worker/service_loop.h"

#if defined(REATTN_HAVE_CUDA)
#include <cuda_runtime_api.h>

#include "kernels/cuda/cuda_backend.h"
#include "kernels/cuda/kernels.h"
#endif

namespace reattn {
namespace {

using Clock = std::chrono::steady_clock;
using json = nlohmann::json;

struct GridOptions {
  std::string config_path;
  std::vector<std::string> tokens_text{"64K", "256K"};
  std::vector<int64_t> qlens{1};
  std::vector<int> batches{1};
  std::vector<std::string> strategy_names{"gather", "partial"};
  std::string backend;          // overrides backend.kind when set
  int layers_resident = 1;      // model.layers is cut to this (0: the config's)
  int warmup = 3;
  int iters = 20;
  uint64_t seed = 2026;
  double read_bw_gbs = 0;       // 0: measure
  double read_probe_gib = 0;    // 0: 4 GiB on cuda, 0.25 GiB on cpu
  std::string csv_path;
  std::string json_path;
  std::string label;            // free text stored in the JSON
  bool comm_probe = false;      // time the communicator's allgather and send/recv by size
  int64_t device_select_rows = 0;  // 0: the step's default (StepOptions)
  bool bf16_q = false;          // grid: q rounded to bf16 values (a model's q; one-pass scoring)
  std::string mode = "grid";    // grid | prefill
  std::string prefill_tokens_text = "1M";
  int64_t prefill_step = 4096;
  int prefill_sample = 0;       // 0: time every step
};

// "64K" = 65536, "4M" = 4194304, "1G" = 2^30; plain integers as they are.
Expected<int64_t> parse_tokens(const std::string& text) {
  if (text.empty()) return invalid_argument("--tokens: empty entry");
  int64_t unit = 1;
  std::string digits = text;
  const char last = static_cast<char>(std::toupper(static_cast<unsigned char>(text.back())));
  if (last == 'K' || last == 'M' || last == 'G') {
    unit = last == 'K' ? (int64_t{1} << 10) : last == 'M' ? (int64_t{1} << 20) : (int64_t{1} << 30);
    digits = text.substr(0, text.size() - 1);
  }
  if (digits.empty() || digits.size() > 12 || digits.find_first_not_of("0123456789") != std::string::npos) {
    return invalid_argument("--tokens: expected an integer with an optional K/M/G suffix, got '" + text + "'");
  }
  const int64_t value = std::stoll(digits) * unit;
  if (value < 1) return invalid_argument("--tokens: must be >= 1, got '" + text + "'");
  return value;
}

// Nearest-rank percentile of unsorted samples.
double percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0.0;
  std::sort(v.begin(), v.end());
  const size_t rank = static_cast<size_t>(std::ceil(p / 100.0 * static_cast<double>(v.size())));
  return v[std::min(v.size() - 1, rank == 0 ? 0 : rank - 1)];
}

// ---------------------------------------------------------------- read bandwidth

volatile uint64_t g_read_sink = 0;

// Host memory: every hardware thread sums its slice of a buffer; bytes read / wall time of
// the slowest pass (median of 5).
double host_read_bandwidth_gbs(size_t bytes) {
  const size_t count = bytes / sizeof(uint64_t);
  std::vector<uint64_t> buf(count);
  for (size_t i = 0; i < count; ++i) buf[i] = i * 0x9e3779b97f4a7c15ull;
  const unsigned threads = std::max(1u, std::thread::hardware_concurrency());
  std::vector<double> ms;
  std::atomic<uint64_t> sink{0};  // keeps the sums alive
  for (int pass = 0; pass < 6; ++pass) {
    const auto t0 = Clock::now();
    std::vector<std::thread> pool;
    for (unsigned t = 0; t < threads; ++t) {
      pool.emplace_back([&, t] {
        const size_t begin = count * t / threads, end = count * (t + 1) / threads;
        uint64_t a = 0, b = 0, c = 0, d = 0;
        size_t i = begin;
        for (; i + 4 <= end; i += 4) {
          a += buf[i];
          b += buf[i + 1];
          c += buf[i + 2];
          d += buf[i + 3];
        }
        for (; i < end; ++i) a += buf[i];
        sink += a + b + c + d;
      });
    }
    for (std::thread& th : pool) th.join();
    if (pass > 0) ms.push_back(std::chrono::duration<double, std::milli>(Clock::now() - t0).count());
  }
  g_read_sink = sink.load();
  return static_cast<double>(count * sizeof(uint64_t)) / percentile(ms, 50) / 1e6;
}

#if defined(REATTN_HAVE_CUDA)
// Device memory: the backend's read probe (16-byte loads over the whole buffer), timed with
// events, median of 20 after 3 warm-up passes.
Expected<double> device_read_bandwidth_gbs(CudaBackend& backend, size_t bytes) {
  REATTN_ASSIGN_OR_RETURN(Buffer data, backend.allocate(bytes));
  REATTN_ASSIGN_OR_RETURN(Buffer sink, backend.allocate(sizeof(unsigned long long)));
  cudaStream_t stream = backend.stream();
  // Not zeros: the probe must read real data.
  if (cudaMemsetAsync(data.data(), 0x3c, bytes, stream) != cudaSuccess ||
      cudaMemsetAsync(sink.data(), 0, sizeof(unsigned long long), stream) != cudaSuccess) {
    return Status(ErrorCode::kFatal, "read probe: cudaMemsetAsync failed");
  }
  cudaEvent_t start = nullptr, stop = nullptr;
  if (cudaEventCreate(&start) != cudaSuccess || cudaEventCreate(&stop) != cudaSuccess) {
    return Status(ErrorCode::kFatal, "read probe: cudaEventCreate failed");
  }
  std::vector<double> ms;
  Status status = Status::ok();
  for (int pass = 0; pass < 23 && status.is_ok(); ++pass) {
    cudaEventRecord(start, stream);
    status = cuda::run_read_probe(data.data(), bytes, sink.as<unsigned long long>(), backend.device_info(), stream);
    cudaEventRecord(stop, stream);
    float t = 0;
    if (status.is_ok() && (cudaEventSynchronize(stop) != cudaSuccess || cudaEventElapsedTime(&t, start, stop) != cudaSuccess)) {
      status = Status(ErrorCode::kFatal, "read probe: event timing failed");
    }
    if (pass >= 3) ms.push_back(t);
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  REATTN_RETURN_IF_ERROR(status);
  return static_cast<double>(bytes) / percentile(ms, 50) / 1e6;
}

std::string cuda_device_name(const CudaBackend& backend) {
  cudaDeviceProp prop{};
  return cudaGetDeviceProperties(&prop, backend.device()) == cudaSuccess ? std::string(prop.name) : "cuda";
}
#endif

// This rank's read bandwidth in GB/s and a name for its device.
Expected<std::pair<double, std::string>> measure_read_bandwidth(Backend& backend, const GridOptions& opt) {
  const std::string cpu_name = "cpu (" + std::to_string(std::thread::hardware_concurrency()) + " threads)";
#if defined(REATTN_HAVE_CUDA)
  if (std::string(backend.name()) == "cuda") {
    auto& cuda = static_cast<CudaBackend&>(backend);
    const size_t bytes = static_cast<size_t>((opt.read_probe_gib > 0 ? opt.read_probe_gib : 4.0) * (1 << 30));
    if (opt.read_bw_gbs > 0) return std::make_pair(opt.read_bw_gbs, cuda_device_name(cuda));
    REATTN_ASSIGN_OR_RETURN(double gbs, device_read_bandwidth_gbs(cuda, bytes & ~size_t{4095}));
    return std::make_pair(gbs, cuda_device_name(cuda));
  }
#endif
  (void)backend;
  if (opt.read_bw_gbs > 0) return std::make_pair(opt.read_bw_gbs, cpu_name);
  const size_t bytes = static_cast<size_t>((opt.read_probe_gib > 0 ? opt.read_probe_gib : 0.25) * (1 << 30));
  return std::make_pair(host_read_bandwidth_gbs(bytes), cpu_name);
}

// ---------------------------------------------------------------- collectives

// Every rank together: the communicator's allgather (bytes per rank) and a ring send/recv
// (each rank sends to rank+1 and receives from rank-1), each synchronized; median of 20 after
// 3 warm-up calls, the slowest rank's. For fitting latency + bytes / bandwidth.
Expected<json> probe_collectives(Backend& backend, Communicator& comm) {
  const int world = comm.world(), rank = comm.rank();
  json out = json::array();
  for (size_t bytes : {size_t{8}, size_t{1} << 10, size_t{8} << 10, size_t{64} << 10, size_t{512} << 10,
                       size_t{4} << 20, size_t{32} << 20}) {
    REATTN_ASSIGN_OR_RETURN(Buffer send, backend.allocate(bytes));
    REATTN_ASSIGN_OR_RETURN(Buffer recv, backend.allocate(bytes * world));
    std::vector<double> ag, p2p;
    for (int it = 0; it < 23; ++it) {
      MPI_Barrier(MPI_COMM_WORLD);
      auto t0 = Clock::now();
      REATTN_RETURN_IF_ERROR(comm.allgather(send.data(), recv.data(), bytes));
      REATTN_RETURN_IF_ERROR(backend.synchronize());
      const double ag_ms = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
      MPI_Barrier(MPI_COMM_WORLD);
      t0 = Clock::now();
      const std::vector<Communicator::Transfer> sends{{(rank + 1) % world, send.data(), bytes}};
      const std::vector<Communicator::Transfer> recvs{{(rank + world - 1) % world, recv.data(), bytes}};
      REATTN_RETURN_IF_ERROR(comm.exchange(sends, recvs));
      REATTN_RETURN_IF_ERROR(backend.synchronize());
      const double p2p_ms = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
      if (it >= 3) {
        ag.push_back(ag_ms);
        p2p.push_back(p2p_ms);
      }
    }
    double mine[2] = {percentile(ag, 50), percentile(p2p, 50)}, slowest[2] = {0, 0};
    MPI_Allreduce(mine, slowest, 2, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
    out.push_back({{"bytes_per_rank", bytes}, {"allgather_us", slowest[0] * 1e3}, {"sendrecv_us", slowest[1] * 1e3}});
  }
  return out;
}

// ---------------------------------------------------------------- the grid (rank 0)

struct Row {
  int64_t tokens = 0;
  int ranks = 0;
  std::string strategy;
  int64_t qlen = 0;
  int batch = 0;
  double p50_ms = 0, p99_ms = 0, mean_ms = 0, min_ms = 0;
  double score_ms = 0, merge_ms = 0, attn_ms = 0, step_total_ms = 0;
  double key_bytes = 0;  // per step, all ranks, all queries of the batch
  double keys_gbps = 0, pct_read_bw = 0, queries_per_s = 0;
  bool needles_ok = false;
  double load_s = 0;
};

const char* kCsvHeader =
    "tokens,ranks,strategy,qlen,batch,p50_ms,p99_ms,score_ms,merge_ms,attn_ms,keys_GBps,pct_read_bw,queries_per_s,"
    "needles_ok,mean_ms,min_ms,step_total_ms,key_bytes,load_s,iters";

std::string csv_line(const Row& r, int iters) {
  char buf[512];
  std::snprintf(buf, sizeof(buf), "%lld,%d,%s,%lld,%d,%.4f,%.4f,%.4f,%.4f,%.4f,%.2f,%.2f,%.2f,%s,%.4f,%.4f,%.4f,%.0f,%.3f,%d",
                static_cast<long long>(r.tokens), r.ranks, r.strategy.c_str(), static_cast<long long>(r.qlen), r.batch,
                r.p50_ms, r.p99_ms, r.score_ms, r.merge_ms, r.attn_ms, r.keys_gbps, r.pct_read_bw, r.queries_per_s,
                r.needles_ok ? "true" : "false", r.mean_ms, r.min_ms, r.step_total_ms, r.key_bytes, r.load_s, iters);
  return buf;
}

json row_json(const Row& r) {
  return json{{"tokens", r.tokens},       {"ranks", r.ranks},         {"strategy", r.strategy},
              {"qlen", r.qlen},           {"batch", r.batch},         {"p50_ms", r.p50_ms},
              {"p99_ms", r.p99_ms},       {"mean_ms", r.mean_ms},     {"min_ms", r.min_ms},
              {"score_ms", r.score_ms},   {"merge_ms", r.merge_ms},   {"attn_ms", r.attn_ms},
              {"step_total_ms", r.step_total_ms}, {"key_bytes", r.key_bytes}, {"keys_GBps", r.keys_gbps},
              {"pct_read_bw", r.pct_read_bw}, {"queries_per_s", r.queries_per_s}, {"needles_ok", r.needles_ok},
              {"load_s", r.load_s}};
}

void print_header() {
  std::printf("#\n# %10s %5s %8s %5s %5s %9s %9s %9s %9s %9s %10s %8s %11s %7s\n", "tokens", "ranks", "strategy", "qlen",
              "batch", "p50_ms", "p99_ms", "score_ms", "merge_ms", "attn_ms", "keys_GBps", "%read_bw", "queries/s",
              "needles");
  std::fflush(stdout);
}

void print_row(const Row& r) {
  std::printf("  %10lld %5d %8s %5lld %5d %9.3f %9.3f %9.3f %9.3f %9.3f %10.1f %8.1f %11.1f %7s\n",
              static_cast<long long>(r.tokens), r.ranks, r.strategy.c_str(), static_cast<long long>(r.qlen), r.batch,
              r.p50_ms, r.p99_ms, r.score_ms, r.merge_ms, r.attn_ms, r.keys_gbps, r.pct_read_bw, r.queries_per_s,
              r.needles_ok ? "ok" : "MISSED");
  std::fflush(stdout);
}

// Submits one operation and turns a failed outcome into an error naming the step.
Status submit_checked(ServiceLoop& loop, const Operation& op, OperationResult* result, const std::string& what) {
  REATTN_RETURN_IF_ERROR(loop.submit(op, result));
  if (!result->status.is_ok()) return Status(result->status.code(), what + ": " + result->status.message());
  return Status::ok();
}

// Needles at 10%, 50% and 90% of the mid (at most top_k of them: each query head recalls its
// top_k best chunks, so more could not all be found).
std::vector<int64_t> plant_needles(const Regions& regions, const ReattentionConfig& rc) {
  std::vector<int64_t> needles;
  if (regions.num_chunks < 3) return needles;
  const double depths[] = {0.1, 0.5, 0.9};
  const int count = std::min(3, rc.top_k);
  for (int i = 0; i < count; ++i) {
    const int64_t chunk = static_cast<int64_t>(depths[i] * static_cast<double>(regions.num_chunks - 1));
    needles.push_back(regions.chunk_first_token(chunk) + (7 * i + 3) % rc.chunk_tokens);
  }
  return needles;
}

Status run_grid(const Control& control, ServiceLoop& loop, const Config& cfg, const GridOptions& opt,
                const std::vector<int64_t>& token_sizes, const std::vector<FinalAttention>& strategies,
                double read_bw_per_rank, json* doc) {
  const ModelConfig& m = cfg.model;
  const ReattentionConfig& rc = cfg.reattention;
  const int world = control.world();
  const double esize = static_cast<double>(dtype_size(cfg.backend.storage_dtype));
  std::unique_ptr<std::FILE, int (*)(std::FILE*)> csv(nullptr, &std::fclose);
  if (!opt.csv_path.empty()) {
    csv.reset(std::fopen(opt.csv_path.c_str(), "w"));
    if (!csv) return invalid_argument("--csv: cannot write " + opt.csv_path);
    std::fprintf(csv.get(), "%s\n", kCsvHeader);
  }
  print_header();
  ContextId next_id = 1;
  for (int64_t tokens : token_sizes) {
    const Regions regions = compute_regions(tokens, rc);
    const ContextId id = next_id++;
    OperationResult result;
    REATTN_RETURN_IF_ERROR(submit_checked(loop, CreateContext{id, 0}, &result, "create context"));

    const AppendSynthetic fill{id, tokens, opt.seed, plant_needles(regions, rc)};
    const auto t_load = Clock::now();
    REATTN_RETURN_IF_ERROR(submit_checked(loop, fill, &result, "synthetic fill of " + std::to_string(tokens) + " tokens"));
    const double load_s = std::chrono::duration<double>(Clock::now() - t_load).count();
    std::vector<int64_t> needle_chunks;
    for (int64_t t : fill.needles) needle_chunks.push_back((t - rc.sink_tokens) / rc.chunk_tokens);
    std::printf("# context %llu: %lld tokens, %lld mid chunks, loaded in %.2f s, needles at chunks",
                static_cast<unsigned long long>(id), static_cast<long long>(tokens),
                static_cast<long long>(regions.num_chunks), load_s);
    for (int64_t c : needle_chunks) std::printf(" %lld", static_cast<long long>(c));
    std::printf("\n");
    (*doc)["contexts"].push_back({{"tokens", tokens}, {"num_chunks", regions.num_chunks}, {"load_s", load_s},
                                  {"needle_tokens", fill.needles}, {"needle_chunks", needle_chunks}});

    for (FinalAttention strategy : strategies) {
      for (int64_t qlen : opt.qlens) {
        std::vector<float> q = synthetic_query(SyntheticSpec{opt.seed, {}}, m, 0, qlen);
        if (opt.bf16_q) {
          for (float& x : q) x = bf16_to_float(float_to_bf16(x));
        }
        for (int batch : opt.batches) {
          // One step = `batch` queries of this context, each with its own copy of the rows
          // (as separate requests would bring them).
          StepPlan plan;
          plan.strategy = strategy;
          plan.reply_rank = 0;
          for (int b = 0; b < batch; ++b) {
            QueryPlan qp;
            qp.context_id = id;
            qp.tokens = tokens;
            qp.qlen = qlen;
            qp.q_offset = static_cast<int64_t>(plan.q.size());
            qp.layer = 0;
            qp.mode = QueryMode::kTail;
            qp.owner_rank = 0;
            plan.queries.push_back(qp);
            plan.q.insert(plan.q.end(), q.begin(), q.end());
          }
          const Operation query = std::move(plan);

          std::vector<double> lat, score, merge, attn, total;
          bool needles_ok = true;
          for (int it = 0; it < opt.warmup + opt.iters; ++it) {
            const auto t0 = Clock::now();
            REATTN_RETURN_IF_ERROR(loop.submit(query, &result));
            const double ms = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
            if (result.queries.size() != static_cast<size_t>(batch)) {
              return internal_error("query step returned " + std::to_string(result.queries.size()) + " results for " +
                                    std::to_string(batch) + " queries");
            }
            for (const QueryResult& qr : result.queries) {
              REATTN_RETURN_IF_ERROR(qr.status);
              for (int64_t c : needle_chunks) {
                needles_ok = needles_ok && std::binary_search(qr.recalled.begin(), qr.recalled.end(), c);
              }
            }
            if (it < opt.warmup) continue;
            lat.push_back(ms);
            score.push_back(result.timing.score_ms);
            merge.push_back(result.timing.candidates_ms);
            attn.push_back(result.timing.attention_ms);
            total.push_back(result.timing.total_ms);
          }
          Row r;
          r.tokens = tokens;
          r.ranks = world;
          r.strategy = final_attention_name(strategy);
          r.qlen = qlen;
          r.batch = batch;
          r.p50_ms = percentile(lat, 50);
          r.p99_ms = percentile(lat, 99);
          r.min_ms = *std::min_element(lat.begin(), lat.end());
          double sum = 0;
          for (double x : lat) sum += x;
          r.mean_ms = sum / static_cast<double>(lat.size());
          r.score_ms = percentile(score, 50);
          r.merge_ms = percentile(merge, 50);
          r.attn_ms = percentile(attn, 50);
          r.step_total_ms = percentile(total, 50);
          r.key_bytes = static_cast<double>(regions.num_chunks) * static_cast<double>(rc.chunk_tokens) * m.kv_heads *
                        m.head_dim * esize * batch;
          r.keys_gbps = r.score_ms > 0 ? r.key_bytes / r.score_ms / 1e6 : 0;
          r.pct_read_bw = read_bw_per_rank > 0 ? 100.0 * r.keys_gbps / (world * read_bw_per_rank) : 0;
          r.queries_per_s = r.p50_ms > 0 ? 1000.0 * batch / r.p50_ms : 0;
          r.needles_ok = needles_ok && !needle_chunks.empty();
          r.load_s = load_s;
          print_row(r);
          if (csv) {
            std::fprintf(csv.get(), "%s\n", csv_line(r, opt.iters).c_str());
            std::fflush(csv.get());
          }
          json rj = row_json(r);
          rj["iters"] = opt.iters;
          rj["latency_ms"] = lat;
          (*doc)["rows"].push_back(rj);
        }
      }
    }
    REATTN_RETURN_IF_ERROR(submit_checked(loop, EraseContext{id}, &result, "erase context"));
  }
  return Status::ok();
}

// ---------------------------------------------------------------- prefill (rank 0)

// Fills `data` with values in [-1, 1) from a 64-bit LCG (cheap: a step's k/v is 8M floats).
void fill_uniform(std::vector<float>& data, uint64_t seed) {
  uint64_t x = seed * 0x9e3779b97f4a7c15ull + 1;
  for (float& f : data) {
    x = x * 6364136223846793005ull + 1442695040888963407ull;
    f = static_cast<float>(static_cast<int64_t>(x >> 40) - (int64_t{1} << 23)) / static_cast<float>(int64_t{1} << 23);
  }
}

// `scratch` refilled from `seed`, as bf16 bytes.
std::string bf16_bytes(std::vector<float>& scratch, uint64_t seed) {
  fill_uniform(scratch, seed);
  std::string bytes(scratch.size() * sizeof(uint16_t), '\0');
  auto* out = reinterpret_cast<uint16_t*>(bytes.data());
  for (size_t i = 0; i < scratch.size(); ++i) out[i] = float_to_bf16(scratch[i]);
  return bytes;
}

Status run_prefill(ServiceLoop& loop, const Config& cfg, const GridOptions& opt, int64_t total_tokens, json* doc) {
  const ModelConfig& m = cfg.model;
  const int64_t step = opt.prefill_step;
  const int64_t steps = total_tokens / step;
  if (step < 1 || step > cfg.reattention.local_window || steps < 1) {
    return invalid_argument("--prefill-step: need 1 <= step <= local_window and at least one step");
  }
  // Which steps are timed: all, or `sample` evenly spaced ones (the last always).
  std::vector<bool> timed(steps, opt.prefill_sample <= 0);
  if (opt.prefill_sample > 0) {
    const int64_t n = std::min<int64_t>(opt.prefill_sample, steps);
    for (int64_t i = 0; i < n; ++i) timed[(steps - 1) - i * (steps - 1) / std::max<int64_t>(n - 1, 1)] = true;
  }
  const ContextId id = 1000;
  OperationResult result;
  REATTN_RETURN_IF_ERROR(submit_checked(loop, CreateContext{id, 0}, &result, "create context"));
  // A model's q is bf16: round once, so the scoring takes its one-pass path.
  std::vector<float> kv(static_cast<size_t>(m.kv_heads) * step * m.head_dim);
  std::vector<float> q(static_cast<size_t>(step) * m.q_heads * m.head_dim);
  fill_uniform(q, opt.seed);
  for (float& x : q) x = bf16_to_float(float_to_bf16(x));
  std::printf("# prefill: %lld tokens in %lld steps of %lld (layer 0; %s)\n", static_cast<long long>(steps * step),
              static_cast<long long>(steps), static_cast<long long>(step),
              opt.prefill_sample > 0 ? "sampled steps, the rest filled synthetically" : "every step timed");
  std::printf("# %6s %10s %9s %9s %9s %9s %9s %7s\n", "step", "tokens", "wall_ms", "append_ms", "score_ms", "merge_ms",
              "attn_ms", "|U|");
  json rows = json::array();
  double wall_sum = 0, score_sum = 0, merge_sum = 0, attn_sum = 0, append_sum = 0, untimed_fill_s = 0;
  int64_t measured = 0, pending_fill = 0, n = 0;
  for (int64_t s = 0; s < steps; ++s) {
    if (!timed[s]) {
      pending_fill += step;
      n += step;
      continue;
    }
    if (pending_fill > 0) {
      const auto t_fill = Clock::now();
      REATTN_RETURN_IF_ERROR(submit_checked(loop, AppendSynthetic{id, pending_fill, opt.seed, {}}, &result, "fill"));
      untimed_fill_s += std::chrono::duration<double>(Clock::now() - t_fill).count();
      pending_fill = 0;
    }
    LayerStep ls;
    ls.context_id = id;
    ls.layer = 0;
    ls.layer_tokens = n;
    ls.qlen = step;
    // q in F32, then k and v as a model sends them: bf16 [Hkv, step, D], in one body.
    auto body = std::make_shared<std::string>(reinterpret_cast<const char*>(q.data()), q.size() * sizeof(float));
    const uint64_t k_at = body->size();
    *body += bf16_bytes(kv, opt.seed + 2 * s + 1);
    const uint64_t v_at = body->size();
    *body += bf16_bytes(kv, opt.seed + 2 * s + 2);
    ls.tensors = StepTensors{std::move(body), DType::kF32, DType::kBF16, 0, k_at, v_at};
    const Operation op = std::move(ls);
    const auto t0 = Clock::now();
    REATTN_RETURN_IF_ERROR(submit_checked(loop, op, &result, "layer step " + std::to_string(s)));
    const double wall = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
    if (result.queries.size() != 1) return internal_error("layer step: no query result on rank 0");
    n += step;
    const StepTiming& t = result.timing;
    const double append_ms = wall - t.total_ms;
    wall_sum += wall;
    score_sum += t.score_ms;
    merge_sum += t.candidates_ms;
    attn_sum += t.attention_ms;
    append_sum += append_ms;
    ++measured;
    const size_t recalled = result.queries[0].recalled.size();
    std::printf("  %6lld %10lld %9.2f %9.2f %9.2f %9.3f %9.2f %7zu\n", static_cast<long long>(s),
                static_cast<long long>(n), wall, append_ms, t.score_ms, t.candidates_ms, t.attention_ms, recalled);
    std::fflush(stdout);
    rows.push_back({{"step", s}, {"tokens", n}, {"wall_ms", wall}, {"append_ms", append_ms}, {"score_ms", t.score_ms},
                    {"merge_ms", t.candidates_ms}, {"attn_ms", t.attention_ms}, {"step_total_ms", t.total_ms},
                    {"recalled", recalled}});
  }
  REATTN_RETURN_IF_ERROR(submit_checked(loop, EraseContext{id}, &result, "erase context"));
  // Every step timed: the sums are the total; sampled: the mean step times the step count.
  const double scale = static_cast<double>(steps) / static_cast<double>(measured);
  json summary{{"tokens", steps * step}, {"step_tokens", step}, {"steps", steps}, {"measured_steps", measured},
               {"estimated", measured != steps}, {"total_s", wall_sum * scale / 1e3},
               {"score_s", score_sum * scale / 1e3}, {"merge_s", merge_sum * scale / 1e3},
               {"attn_s", attn_sum * scale / 1e3}, {"append_s", append_sum * scale / 1e3},
               {"untimed_fill_s", untimed_fill_s}, {"mean_step_ms", wall_sum / measured},
               {"mean_merge_ms", merge_sum / measured}, {"tokens_per_s", steps * step / (wall_sum * scale / 1e3)}};
  std::printf("# prefill %s: %.2f s for %lld tokens (%.0f tokens/s): score %.2f s, merge %.2f s, attn %.2f s, "
              "append %.2f s; mean step %.1f ms, mean merge %.3f ms\n",
              measured != steps ? "(estimated from the sampled steps)" : "total", summary["total_s"].get<double>(),
              static_cast<long long>(steps * step), summary["tokens_per_s"].get<double>(), summary["score_s"].get<double>(),
              summary["merge_s"].get<double>(), summary["attn_s"].get<double>(), summary["append_s"].get<double>(),
              summary["mean_step_ms"].get<double>(), summary["mean_merge_ms"].get<double>());
  (*doc)["prefill"] = {{"summary", summary}, {"steps", rows}};
  if (!opt.csv_path.empty()) {
    std::ofstream csv(opt.csv_path);
    csv << "step,tokens,wall_ms,append_ms,score_ms,merge_ms,attn_ms,step_total_ms,recalled\n";
    for (const json& r : rows) {
      csv << r["step"] << "," << r["tokens"] << "," << r["wall_ms"] << "," << r["append_ms"] << "," << r["score_ms"]
          << "," << r["merge_ms"] << "," << r["attn_ms"] << "," << r["step_total_ms"] << "," << r["recalled"] << "\n";
    }
    if (!csv) return invalid_argument("--csv: cannot write " + opt.csv_path);
  }
  return Status::ok();
}

// Every rank: config, backend, communicator, read bandwidth; then rank 0 drives the grid and
// the others serve until it sends shutdown.
int run(const Control& control, const GridOptions& opt) {
  const int rank = control.rank();
  const auto fail = [&](const std::string& what, const Status& s) {
    if (rank == 0) std::fprintf(stderr, "reattn-bench-grid: %s: %s\n", what.c_str(), s.to_string().c_str());
    return 1;
  };
  std::vector<int64_t> token_sizes;
  std::vector<FinalAttention> strategies;
  Status parsed = Status::ok();
  for (const std::string& t : opt.tokens_text) {
    Expected<int64_t> v = parse_tokens(t);
    if (!v) parsed = v.status();
    else token_sizes.push_back(*v);
  }
  for (const std::string& s : opt.strategy_names) {
    Expected<FinalAttention> f = parse_final_attention(s);
    if (!f) parsed = invalid_argument("--strategy: " + f.status().message());
    else strategies.push_back(*f);
  }
  for (int64_t q : opt.qlens) {
    if (q < 1) parsed = invalid_argument("--qlen: must be >= 1, got " + std::to_string(q));
  }
  for (int b : opt.batches) {
    if (b < 1) parsed = invalid_argument("--batch: must be >= 1, got " + std::to_string(b));
  }
  if (opt.iters < 1 || opt.warmup < 0) parsed = invalid_argument("--iters must be >= 1 and --warmup >= 0");
  const bool prefill = opt.mode == "prefill";
  if (!prefill && opt.mode != "grid") parsed = invalid_argument("--mode: expected grid or prefill, got '" + opt.mode + "'");
  int64_t prefill_tokens = 0;
  if (prefill) {
    Expected<int64_t> v = parse_tokens(opt.prefill_tokens_text);
    if (!v) parsed = v.status();
    else prefill_tokens = *v;
    token_sizes.assign(1, prefill_tokens);  // sizes the capacity below
  } else if (token_sizes.empty()) {
    parsed = invalid_argument("--tokens: at least one size");
  }
  if (!parsed.is_ok()) return fail("bad arguments", parsed);

  Expected<Config> loaded = load_config_file(opt.config_path);
  Status s = control.agree(loaded.status());
  if (!s.is_ok()) return fail("config", s);
  Config cfg = *loaded;
  // One layer by default: the query touches one layer, and the others would only take memory.
  if (opt.layers_resident > 0 && opt.layers_resident < cfg.model.layers) cfg.model.layers = opt.layers_resident;
  if (!opt.backend.empty()) {
    Expected<BackendKind> kind = parse_backend_kind(opt.backend);
    if (!kind) return fail("--backend", kind.status());
    cfg.backend.kind = *kind;
  }
  // The bench holds one context at a time; room for the largest one on any rank.
  const int64_t largest = *std::max_element(token_sizes.begin(), token_sizes.end());
  cfg.capacity.tokens_per_rank = std::max(cfg.capacity.tokens_per_rank, largest + 2 * cfg.reattention.local_window +
                                                                            cfg.reattention.sink_tokens +
                                                                            4 * cfg.reattention.chunk_tokens);
  for (int64_t q : opt.qlens) {
    if (q > cfg.reattention.local_window) {
      return fail("--qlen", invalid_argument("qlen " + std::to_string(q) + " is above reattention.local_window " +
                                             std::to_string(cfg.reattention.local_window) + " (tail queries)"));
    }
  }
  if (s = control.agree(cfg.validate()); !s.is_ok()) return fail("config", s);

  Expected<std::unique_ptr<Backend>> backend = make_backend(cfg, control.local_rank());
  if (s = control.agree(backend.status()); !s.is_ok()) return fail("backend", s);
  // The cpu backend stores fp32 whatever the config says: count the bytes it really reads.
  if ((*backend)->host_memory()) cfg.backend.storage_dtype = (*backend)->storage_dtype();
  Expected<std::unique_ptr<Communicator>> comm = make_communicator(**backend, control);
  if (s = control.agree(comm.status()); !s.is_ok()) return fail("communicator", s);

  Expected<std::pair<double, std::string>> bw = measure_read_bandwidth(**backend, opt);
  if (s = control.agree(bw.status()); !s.is_ok()) return fail("read bandwidth", s);
  const int world = control.world();
  std::vector<double> bw_all(world, 0.0);
  double mine = bw->first;
  MPI_Gather(&mine, 1, MPI_DOUBLE, bw_all.data(), 1, MPI_DOUBLE, 0, MPI_COMM_WORLD);
  // Host threads may be shared between ranks: on the cpu backend every rank's probe saw the
  // same memory system, so the smallest is the fair per-rank figure.
  const double read_bw = *std::min_element(bw_all.begin(), bw_all.end());

  json comm_probe = json::array();
  if (opt.comm_probe) {
    Expected<json> probed = probe_collectives(**backend, **comm);
    if (s = control.agree(probed.status()); !s.is_ok()) return fail("collective probe", s);
    comm_probe = *probed;
  }

  StepOptions step_options;
  if (opt.device_select_rows > 0) step_options.device_select_rows = opt.device_select_rows;
  ServiceLoop loop(control, **backend, **comm, cfg, step_options);
  if (rank != 0) {
    s = loop.serve();
    if (!s.is_ok()) {
      std::fprintf(stderr, "reattn-bench-grid: rank %d: %s\n", rank, s.to_string().c_str());
      control.abort(1);
    }
    return 0;
  }

  json doc{{"bench", "reattn-bench-grid"},
           {"label", opt.label},
           {"device", bw->second},
           {"backend", (*backend)->name()},
           {"ranks", world},
           {"config_path", opt.config_path},
           {"model", {{"layers_resident", cfg.model.layers}, {"q_heads", cfg.model.q_heads}, {"kv_heads", cfg.model.kv_heads},
                      {"head_dim", cfg.model.head_dim}, {"storage_dtype", dtype_name(cfg.backend.storage_dtype)}}},
           {"reattention", {{"sink_tokens", cfg.reattention.sink_tokens}, {"local_window", cfg.reattention.local_window},
                            {"chunk_tokens", cfg.reattention.chunk_tokens}, {"top_k", cfg.reattention.top_k},
                            {"max_recall_chunks", cfg.reattention.max_recall_chunks}}},
           {"read_bw_gbs_per_rank", bw_all},
           {"read_bw_gbs", read_bw},
           {"read_bw_measured", opt.read_bw_gbs <= 0},
           {"communicator", (*comm)->name()},
           {"comm_probe", comm_probe},
           {"warmup", opt.warmup},
           {"bf16_q", opt.bf16_q},
           {"device_select_rows", step_options.device_select_rows},
           {"iters", opt.iters},
           {"columns", json::array()},
           {"contexts", json::array()},
           {"rows", json::array()}};
  {
    std::string header = kCsvHeader;
    size_t pos = 0;
    while (pos <= header.size()) {
      const size_t comma = header.find(',', pos);
      doc["columns"].push_back(header.substr(pos, comma == std::string::npos ? std::string::npos : comma - pos));
      if (comma == std::string::npos) break;
      pos = comma + 1;
    }
  }
  std::printf("# reattn-bench-grid: %s, backend %s, %d rank(s), read bandwidth %.1f GB/s per rank (%s)\n", bw->second.c_str(),
              (*backend)->name(), world, read_bw, opt.read_bw_gbs > 0 ? "given" : "measured");
  for (const json& c : comm_probe) {
    std::printf("# %s: %9zu B per rank: allgather %8.1f us, send/recv %8.1f us\n", (*comm)->name(),
                c["bytes_per_rank"].get<size_t>(), c["allgather_us"].get<double>(), c["sendrecv_us"].get<double>());
  }
  std::printf("# model: %d layer(s) resident, H=%d Hkv=%d D=%d %s; S=%lld W=%lld C=%lld top_k=%d R=%lld; warmup %d, iters %d\n",
              cfg.model.layers, cfg.model.q_heads, cfg.model.kv_heads, cfg.model.head_dim,
              dtype_name(cfg.backend.storage_dtype), static_cast<long long>(cfg.reattention.sink_tokens),
              static_cast<long long>(cfg.reattention.local_window), static_cast<long long>(cfg.reattention.chunk_tokens),
              cfg.reattention.top_k, static_cast<long long>(cfg.reattention.max_recall_chunks), opt.warmup, opt.iters);
  const Status grid = prefill ? run_prefill(loop, cfg, opt, prefill_tokens, &doc)
                              : run_grid(control, loop, cfg, opt, token_sizes, strategies, read_bw, &doc);
  if (grid.code() == ErrorCode::kFatal) {
    // A device or communicator fault: the other ranks may not take another broadcast.
    std::fprintf(stderr, "reattn-bench-grid: fault: %s\n", grid.to_string().c_str());
    control.abort(1);
  }

  // The other ranks leave serve() on shutdown, whatever happened here.
  OperationResult ignored;
  if (Status down = loop.submit(Shutdown{}, &ignored); !down.is_ok()) {
    std::fprintf(stderr, "reattn-bench-grid: shutdown: %s\n", down.to_string().c_str());
    control.abort(1);
  }
  if (!grid.is_ok()) return fail("grid", grid);
  if (!opt.json_path.empty()) {
    std::ofstream f(opt.json_path);
    f << doc.dump(1) << "\n";
    if (!f) return fail("--json", invalid_argument("cannot write " + opt.json_path));
  }
  return 0;
}

}  // namespace
}  // namespace reattn

int main(int argc, char** argv) {
  using namespace reattn;
  return mpi_main("reattn-bench-grid", argc, argv, [](Control& control, int argc, char** argv) {
    GridOptions opt;
    CLI::App app{"reattn-bench-grid: the service's step path over a grid of context sizes, qlen, batch and strategy"};
    app.add_option("--config", opt.config_path, "model and ReAttention config (YAML)")->required();
    app.add_option("--tokens", opt.tokens_text, "context sizes, e.g. 64K,1M,4M (K=2^10, M=2^20)")->delimiter(',');
    app.add_option("--qlen", opt.qlens, "query rows per query")->delimiter(',');
    app.add_option("--batch", opt.batches, "queries of the shared context per step")->delimiter(',');
    app.add_option("--strategy", opt.strategy_names, "final attention: gather, partial")->delimiter(',');
    app.add_option("--backend", opt.backend, "override backend.kind: auto, cpu, cuda");
    app.add_option("--layers-resident", opt.layers_resident,
                   "layers held (0: all of the config's); queries use layer 0");
    app.add_option("--warmup", opt.warmup, "untimed steps per grid point");
    app.add_option("--iters", opt.iters, "timed steps per grid point");
    app.add_option("--seed", opt.seed, "synthetic context and query seed");
    app.add_option("--read-bw-gbs", opt.read_bw_gbs, "per-rank read bandwidth in GB/s (default: measure it)");
    app.add_option("--read-probe-gib", opt.read_probe_gib,
                   "buffer of the read-bandwidth probe (default 4 on cuda, 0.25 on cpu)");
    app.add_option("--csv", opt.csv_path, "CSV output (rank 0)");
    app.add_option("--json", opt.json_path, "JSON output (rank 0)");
    app.add_option("--label", opt.label, "free text stored in the JSON");
    app.add_option("--device-select-rows", opt.device_select_rows,
                   "queries of at least this many (row, head) rows select on the device (default: the step's)");
    app.add_flag("--bf16-q", opt.bf16_q, "grid: round q to bf16 values, as a model's q is");
    app.add_option("--mode", opt.mode, "grid (query batches over a grid) or prefill (layer steps over one context)");
    app.add_option("--prefill-tokens", opt.prefill_tokens_text, "prefill: context length, e.g. 1M");
    app.add_option("--prefill-step", opt.prefill_step, "prefill: tokens per layer step (<= local_window)");
    app.add_option("--prefill-sample", opt.prefill_sample, "prefill: time this many evenly spaced steps (0: all)");
    app.add_flag("--comm-probe", opt.comm_probe, "time allgather and send/recv from 8 B to 32 MiB per rank first");
    if (const std::optional<int> code = parse_command_line(app, argc, argv, control)) return *code;
    return run(control, opt);
  });
}
