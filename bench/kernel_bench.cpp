// kernel_bench: the CUDA backend's scoring and window-attention operations alone, on one GPU,
// at LLaMA-3.1-8B layer shapes (H=32, Hkv=8, D=128, bf16, C=64), timed with events (median).
//  - score: score_chunks over `tokens` mid keys for each qlen; TFLOP/s = 2*qlen*H*keys*D / t,
//    and at qlen 1 the share of the read-bandwidth probe; storage-exact q (one pass) and fp32 q
//    (three parts); for small blocks both scoring kernels.
//  - attend: attend over sinks + recalled chunks + the local window (the default config's
//    6,176 keys) for tail query blocks of qlen rows, causal by layout position.
// Keys are random (not zeros), one buffer set; JSON to --json. Baselines: bench/torch_baselines.py.
#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "bench/event_timing.h"
#include "common/dtype.h"
#include "kernels/cuda/cuda_backend.h"
#include "kernels/cuda/cuda_check.h"

namespace reattn {
namespace {

constexpr int kH = 32, kHkv = 8, kD = 128;
constexpr int64_t kC = 64;


// Random bf16 bits (values in about [-2, 2]) from a 64-bit LCG: one 64 MiB pattern, rotated per page.
std::vector<uint16_t> random_bf16(size_t count, uint64_t seed) {
  std::vector<uint16_t> v(count);
  uint64_t x = seed * 0x9e3779b97f4a7c15ull + 1;
  for (uint16_t& e : v) {
    x = x * 6364136223846793005ull + 1442695040888963407ull;
    e = float_to_bf16(static_cast<float>(static_cast<int32_t>(x >> 32)) * (2.0f / 2147483648.0f));
  }
  return v;
}

struct KeyPages {
  std::vector<Buffer> pages;
  Buffer table;
  int64_t blocks = 0;
  int64_t blocks_per_page = 0;
};

Expected<KeyPages> make_pages(CudaBackend& gpu, int64_t blocks) {
  KeyPages kp;
  kp.blocks = blocks;
  kp.blocks_per_page = 256;
  const size_t block_bytes = static_cast<size_t>(kHkv) * kC * kD * 2;
  const size_t page_bytes = block_bytes * kp.blocks_per_page;
  const std::vector<uint16_t> pattern = random_bf16(page_bytes / 2 + 4096, 7);
  std::vector<const void*> ptrs;
  for (int64_t first = 0; first < blocks; first += kp.blocks_per_page) {
    Expected<Buffer> page = gpu.allocate(page_bytes);
    if (!page.is_ok()) return page.status();
    const size_t shift = static_cast<size_t>(first / kp.blocks_per_page) * 8 % 4096;
    REATTN_RETURN_IF_ERROR(gpu.upload(page->data(), pattern.data() + shift, page_bytes));
    ptrs.push_back(page->data());
    kp.pages.push_back(std::move(page).value());
  }
  Expected<Buffer> table = gpu.allocate(ptrs.size() * sizeof(void*));
  if (!table.is_ok()) return table.status();
  REATTN_RETURN_IF_ERROR(gpu.upload(table->data(), ptrs.data(), ptrs.size() * sizeof(void*)));
  kp.table = std::move(table).value();
  REATTN_RETURN_IF_ERROR(gpu.synchronize());
  return kp;
}

Expected<Buffer> upload_q(CudaBackend& gpu, int64_t qlen, bool exact, uint64_t seed) {
  std::mt19937 rng(static_cast<uint32_t>(seed));
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> q(static_cast<size_t>(qlen) * kH * kD);
  for (float& x : q) x = exact ? bf16_to_float(float_to_bf16(normal(rng))) : normal(rng);
  Expected<Buffer> buf = gpu.allocate(q.size() * sizeof(float));
  if (!buf.is_ok()) return buf.status();
  REATTN_RETURN_IF_ERROR(gpu.upload(buf->data(), q.data(), q.size() * sizeof(float)));
  return buf;
}

Expected<nlohmann::json> bench_score(CudaBackend& gpu, int64_t tokens, const std::vector<int64_t>& qlens,
                                     double read_gbps, int repeat) {
  const int64_t blocks = tokens / kC;
  Expected<KeyPages> pages = make_pages(gpu, blocks);
  if (!pages.is_ok()) return pages.status();
  nlohmann::json rows = nlohmann::json::array();
  const double key_bytes = static_cast<double>(blocks) * kHkv * kC * kD * 2;
  for (int64_t qlen : qlens) {
    Expected<Buffer> out = gpu.allocate(static_cast<size_t>(qlen) * kH * 4 * sizeof(Candidate));
    if (!out.is_ok()) return out.status();
    for (bool exact : {true, false}) {
      if (!exact && qlen != 1024 && qlen != 1 && qlen != 32) continue;
      Expected<Buffer> q = upload_q(gpu, qlen, exact, 11 + qlen);
      if (!q.is_ok()) return q.status();
      ScoreParams p;
      p.k_pages = pages->table.as<const void* const>();
      p.blocks_per_page = pages->blocks_per_page;
      p.block_count = blocks;
      p.q = q->as<float>();
      p.qlen = qlen;
      p.q_heads = kH;
      p.kv_heads = kHkv;
      p.head_dim = kD;
      p.chunk_tokens = kC;
      p.top_k = 4;
      p.out = out->as<Candidate>();
      std::vector<cuda::ScoreKernel> kernels{cuda::ScoreKernel::kWarp, cuda::ScoreKernel::kGemm};
      if (qlen > 64) kernels = {cuda::ScoreKernel::kGemm};
      for (cuda::ScoreKernel kernel : kernels) {
        const cuda::ScorePlan plan = cuda::plan_score(p, gpu.device_info(), kernel);
        Expected<Buffer> ws = gpu.allocate(std::max<size_t>(plan.workspace_bytes, 16));
        if (!ws.is_ok()) return ws.status();
        const int reps = qlen >= 1024 ? std::max(3, repeat / 4) : repeat;
        Expected<double> ms = bench::time_events(gpu.stream(), 2, reps, [&] {
          return cuda::run_score(p, DType::kBF16, plan, ws->data(), gpu.stream());
        });
        if (!ms.is_ok()) return ms.status();
        const double flop = 2.0 * qlen * kH * static_cast<double>(blocks * kC) * kD;
        nlohmann::json row = {{"tokens", tokens},
                              {"qlen", qlen},
                              {"q", exact ? "bf16-exact" : "fp32"},
                              {"kernel", plan.kernel == cuda::ScoreKernel::kGemm ? "gemm" : "warp"},
                              {"ms", *ms},
                              {"tflops", flop / (*ms * 1e-3) / 1e12},
                              {"key_gbps", key_bytes / (*ms * 1e-3) / 1e9},
                              {"read_share", key_bytes / (*ms * 1e-3) / 1e9 / read_gbps},
                              {"key_splits", plan.key_splits},
                              {"pair_tiles", plan.pair_tiles}};
        std::printf("[score] tokens=%lld qlen=%lld q=%s kernel=%s: %.3f ms, %.1f TFLOP/s, keys %.0f GB/s (%.1f%% of read probe)\n",
                    static_cast<long long>(tokens), static_cast<long long>(qlen), exact ? "bf16-exact" : "fp32",
                    row["kernel"].get<std::string>().c_str(), *ms, row["tflops"].get<double>(),
                    row["key_gbps"].get<double>(), 100.0 * row["read_share"].get<double>());
        std::fflush(stdout);
        rows.push_back(row);
      }
    }
  }
  return rows;
}

// Attention over the default layout: 32 sinks, 32 recalled chunks of 64 (scattered over the
// pages), a 4,096-token local window holding the qlen tail rows at its end.
Expected<nlohmann::json> bench_attend(CudaBackend& gpu, const std::vector<int64_t>& qlens, int repeat) {
  const int64_t sinks = 32, recalled = 32, window = 4096;
  Expected<KeyPages> kpages = make_pages(gpu, 2048);
  Expected<KeyPages> vpages = make_pages(gpu, 2048);
  if (!kpages.is_ok()) return kpages.status();
  if (!vpages.is_ok()) return vpages.status();
  const size_t block_elems = static_cast<size_t>(kHkv) * kC * kD;
  auto block_ptr = [&](const KeyPages& kp, int64_t b) {
    return static_cast<const char*>(kp.pages[b / kp.blocks_per_page].data()) +
           (b % kp.blocks_per_page) * block_elems * 2;
  };
  // Sinks and the window are contiguous [Hkv, tokens, D] buffers; chunks are blocks [Hkv, C, D].
  const std::vector<uint16_t> pattern = random_bf16(static_cast<size_t>(kHkv) * (window + sinks) * kD * 2, 3);
  Expected<Buffer> local_k = gpu.allocate(kHkv * window * kD * 2), local_v = gpu.allocate(kHkv * window * kD * 2);
  Expected<Buffer> sink_k = gpu.allocate(kHkv * sinks * kD * 2), sink_v = gpu.allocate(kHkv * sinks * kD * 2);
  if (!local_k.is_ok() || !local_v.is_ok() || !sink_k.is_ok() || !sink_v.is_ok()) {
    return Status(ErrorCode::kCapacity, "attend bench: allocation failed");
  }
  REATTN_RETURN_IF_ERROR(gpu.upload(local_k->data(), pattern.data(), kHkv * window * kD * 2));
  REATTN_RETURN_IF_ERROR(gpu.upload(local_v->data(), pattern.data() + 4096, kHkv * window * kD * 2));
  REATTN_RETURN_IF_ERROR(gpu.upload(sink_k->data(), pattern.data() + 77, kHkv * sinks * kD * 2));
  REATTN_RETURN_IF_ERROR(gpu.upload(sink_v->data(), pattern.data() + 999, kHkv * sinks * kD * 2));
  std::vector<KeySegment> segments;
  segments.push_back(KeySegment{sink_k->data(), sink_v->data(), sinks, sinks * kD, 0});
  for (int64_t j = 0; j < recalled; ++j) {
    const int64_t b = (j * 61 + 5) % 2048;
    segments.push_back(KeySegment{block_ptr(*kpages, b), block_ptr(*vpages, b), kC, kC * kD, sinks + j * kC});
  }
  const int64_t local_pos = sinks + recalled * kC;
  segments.push_back(KeySegment{local_k->data(), local_v->data(), window, window * kD, local_pos});
  const int64_t L = local_pos + window;
  Expected<Buffer> seg_dev = gpu.allocate(segments.size() * sizeof(KeySegment));
  if (!seg_dev.is_ok()) return seg_dev.status();
  REATTN_RETURN_IF_ERROR(gpu.upload(seg_dev->data(), segments.data(), segments.size() * sizeof(KeySegment)));
  nlohmann::json rows = nlohmann::json::array();
  for (int64_t qlen : qlens) {
    Expected<Buffer> q = upload_q(gpu, qlen, true, 5 + qlen);
    if (!q.is_ok()) return q.status();
    std::vector<int64_t> position(qlen), visible(qlen);
    for (int64_t i = 0; i < qlen; ++i) {
      position[i] = L - qlen + i;
      visible[i] = position[i] + 1;
    }
    Expected<Buffer> pos_dev = gpu.allocate(qlen * 8), vis_dev = gpu.allocate(qlen * 8);
    Expected<Buffer> out = gpu.allocate(qlen * kH * kD * 4), mx = gpu.allocate(qlen * kH * 4),
                     sm = gpu.allocate(qlen * kH * 4);
    if (!pos_dev.is_ok() || !vis_dev.is_ok() || !out.is_ok() || !mx.is_ok() || !sm.is_ok()) {
      return Status(ErrorCode::kCapacity, "attend bench: allocation failed");
    }
    REATTN_RETURN_IF_ERROR(gpu.upload(pos_dev->data(), position.data(), qlen * 8));
    REATTN_RETURN_IF_ERROR(gpu.upload(vis_dev->data(), visible.data(), qlen * 8));
    AttendParams p;
    p.segments = seg_dev->as<const KeySegment>();
    p.segment_count = static_cast<int64_t>(segments.size());
    p.q = q->as<float>();
    p.row_position = pos_dev->as<int64_t>();
    p.row_visible_end = vis_dev->as<int64_t>();
    p.qlen = qlen;
    p.q_heads = kH;
    p.kv_heads = kHkv;
    p.head_dim = kD;
    p.rope_theta = 500000.0;
    p.max_position = L;
    p.out = out->as<float>();
    p.row_max = mx->as<float>();
    p.row_sum = sm->as<float>();
    Expected<double> ms = bench::time_events(gpu.stream(), 2, repeat, [&] { return gpu.attend(p); });
    if (!ms.is_ok()) return ms.status();
    // Causal FLOPs actually needed: each row sees position + 1 keys; 4*D per (row, head, key).
    double keys_seen = 0;
    for (int64_t i = 0; i < qlen; ++i) keys_seen += static_cast<double>(visible[i]);
    const double flop = 4.0 * kD * kH * keys_seen;
    nlohmann::json row = {{"qlen", qlen}, {"keys", L}, {"ms", *ms}, {"tflops", flop / (*ms * 1e-3) / 1e12}};
    std::printf("[attend] qlen=%lld keys=%lld: %.3f ms, %.1f TFLOP/s\n", static_cast<long long>(qlen),
                static_cast<long long>(L), *ms, row["tflops"].get<double>());
    std::fflush(stdout);
    rows.push_back(row);
  }
  return rows;
}

// Device merge + recall selection for a block of `rows` (row, head) rows, top_k 4, from `world`
// ranks' lists over `chunks` chunk ids (random lists; timing only, the tests check the result).
Expected<nlohmann::json> bench_select(CudaBackend& gpu, int64_t rows, int world, int64_t chunks, int repeat) {
  const int k = 4;
  std::mt19937_64 rng(9);
  std::vector<Candidate> gathered(static_cast<size_t>(world) * rows * k);
  for (int64_t i = 0; i < static_cast<int64_t>(gathered.size()) / k; ++i) {
    Candidate* list = gathered.data() + i * k;
    for (int s = 0; s < k; ++s) {
      list[s] = Candidate{static_cast<float>(rng() % 100000) / 1000.0f, static_cast<int32_t>(rng() % chunks)};
    }
    std::sort(list, list + k, [](const Candidate& a, const Candidate& b) { return candidate_before(a, b); });
    for (int s = 1; s < k; ++s) {  // distinct chunks within a list
      if (list[s].chunk == list[s - 1].chunk) list[s].chunk = -1;
    }
    std::sort(list, list + k, [](const Candidate& a, const Candidate& b) { return candidate_before(a, b); });
  }
  Expected<Buffer> g_dev = gpu.allocate(gathered.size() * sizeof(Candidate));
  Expected<Buffer> merged = gpu.allocate(rows * k * sizeof(Candidate));
  Expected<Buffer> recall = gpu.allocate(64 * sizeof(int64_t));
  const size_t ws_bytes = cuda::merge_select_workspace_bytes(chunks);
  Expected<Buffer> ws = gpu.allocate(ws_bytes);
  if (!g_dev.is_ok() || !merged.is_ok() || !recall.is_ok() || !ws.is_ok()) {
    return Status(ErrorCode::kCapacity, "select bench: allocation failed");
  }
  REATTN_RETURN_IF_ERROR(gpu.upload(g_dev->data(), gathered.data(), gathered.size() * sizeof(Candidate)));
  cuda::MergeSelectParams p;
  p.gathered = g_dev->as<const Candidate>();
  p.world = world;
  p.rows = rows;
  p.top_k = k;
  p.num_chunks = chunks;
  p.max_recall = 32;
  p.merged = merged->as<Candidate>();
  p.recall = recall->as<int64_t>();
  p.recall_count = recall->as<int64_t>() + 32;
  Expected<double> ms = bench::time_events(gpu.stream(), 2, repeat, [&] {
    return cuda::run_merge_select(p, ws->data(), ws_bytes, gpu.stream());
  });
  if (!ms.is_ok()) return ms.status();
  std::printf("[select] rows=%lld world=%d chunks=%lld candidates=%lld: %.3f ms\n", static_cast<long long>(rows), world,
              static_cast<long long>(chunks), static_cast<long long>(gathered.size()), *ms);
  return nlohmann::json{{"rows", rows}, {"world", world}, {"chunks", chunks}, {"ms", *ms}};
}

int run(int argc, char** argv) {
  CLI::App app{"kernel_bench: scoring and attention kernels on one GPU"};
  std::string json_path;
  int64_t tokens = int64_t{1} << 20;
  int64_t decode_tokens = int64_t{4} << 20;
  std::string qlen_list = "1,16,64,128,1024,4096";
  int repeat = 20;
  bool skip_decode = false, skip_attend = false, skip_score = false;
  app.add_option("--json", json_path, "JSON output");
  app.add_option("--tokens", tokens, "mid keys for the query-block scoring runs");
  app.add_option("--decode-tokens", decode_tokens, "mid keys for the qlen-1 bandwidth run");
  app.add_option("--qlens", qlen_list, "comma-separated qlens for scoring");
  app.add_option("--repeat", repeat, "timed repetitions");
  app.add_flag("--skip-decode", skip_decode, "no qlen-1 bandwidth run");
  app.add_flag("--skip-attend", skip_attend, "no attention runs");
  app.add_flag("--skip-score", skip_score, "no query-block scoring runs");
  CLI11_PARSE(app, argc, argv);
  std::vector<int64_t> qlens;
  for (size_t at = 0; at < qlen_list.size();) {
    const size_t comma = qlen_list.find(',', at);
    qlens.push_back(std::stoll(qlen_list.substr(at, comma - at)));
    at = comma == std::string::npos ? qlen_list.size() : comma + 1;
  }
  Config cfg;
  cfg.model.q_heads = kH;
  cfg.model.kv_heads = kHkv;
  cfg.model.head_dim = kD;
  cfg.backend.storage_dtype = DType::kBF16;
  Expected<std::unique_ptr<Backend>> made = make_cuda_backend(cfg, 0);
  if (!made.is_ok()) {
    std::fprintf(stderr, "%s\n", made.status().to_string().c_str());
    return 1;
  }
  auto& gpu = static_cast<CudaBackend&>(**made);
  nlohmann::json report;
  cudaDeviceProp prop{};
  (void)cudaGetDeviceProperties(&prop, gpu.device());
  report["device"] = prop.name;
  // Read-bandwidth probe over 4 GiB.
  {
    const size_t bytes = size_t{4} << 30;
    Expected<Buffer> buf = gpu.allocate(bytes);
    Expected<Buffer> sink = gpu.allocate(64);
    if (!buf.is_ok() || !sink.is_ok()) return 1;
    (void)cudaMemsetAsync(buf->data(), 0x5a, bytes, gpu.stream());
    Expected<double> ms = bench::time_events(gpu.stream(), 2, 10, [&] {
      return cuda::run_read_probe(buf->data(), bytes, sink->as<unsigned long long>(), gpu.device_info(), gpu.stream());
    });
    if (!ms.is_ok()) return 1;
    report["read_gbps"] = bytes / (*ms * 1e-3) / 1e9;
    std::printf("[probe] read %.0f GB/s\n", report["read_gbps"].get<double>());
  }
  const double read_gbps = report["read_gbps"];
  auto fail = [](const Status& s) {
    std::fprintf(stderr, "kernel_bench: %s\n", s.to_string().c_str());
    return 1;
  };
  if (!skip_decode) {
    // qlen 32: a batch of 32 decode queries of one context scored as one block of rows.
    Expected<nlohmann::json> decode = bench_score(gpu, decode_tokens, {1, 32}, read_gbps, repeat);
    if (!decode.is_ok()) return fail(decode.status());
    report["score_decode"] = *decode;
  }
  if (!skip_score) {
    Expected<nlohmann::json> blocks = bench_score(gpu, tokens, qlens, read_gbps, repeat);
    if (!blocks.is_ok()) return fail(blocks.status());
    report["score"] = *blocks;
  }
  if (!skip_attend) {
    Expected<nlohmann::json> attend = bench_attend(gpu, {1, 128, 1024, 4096}, repeat);
    if (!attend.is_ok()) return fail(attend.status());
    report["attend"] = *attend;
  }
  report["select"] = nlohmann::json::array();
  for (const auto& [rows, world, chunks] : {std::tuple<int64_t, int, int64_t>{4096 * 32, 1, 16384},
                                            std::tuple<int64_t, int, int64_t>{4096 * 32, 2, 65536},
                                            std::tuple<int64_t, int, int64_t>{32, 1, 65536}}) {
    Expected<nlohmann::json> sel = bench_select(gpu, rows, world, chunks, repeat);
    if (!sel.is_ok()) return fail(sel.status());
    report["select"].push_back(*sel);
  }
  if (!json_path.empty()) std::ofstream(json_path) << report.dump(2) << "\n";
  return 0;
}

}  // namespace
}  // namespace reattn

int main(int argc, char** argv) { return reattn::run(argc, argv); }
