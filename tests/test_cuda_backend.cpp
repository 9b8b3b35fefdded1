// The CUDA backend on one GPU against the CPU backend and the fp64 reference (tests/reference.h):
// random synthetic contexts with planted needles, odd sizes (n not a multiple of C, chunk
// sizes that are not multiples of 32), qlen 1 to 64, tail and detached, bf16 and f16 storage,
// head_dim 64 and 128. Skips where no GPU is visible.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "common/dtype.h"
#include "common/synthetic.h"
#include "kernels/cpu/cpu_backend.h"
#include "kernels/cuda/cuda_backend.h"
#include "kernels/make_backend.h"
#include "tests/cuda_test.h"
#include "tests/harness.h"
#include "tests/reference.h"
#include "worker/kv_store.h"
#include "worker/step.h"

namespace reattn {
namespace {

struct Case {
  int head_dim = 128;
  int q_heads = 8;
  int kv_heads = 2;
  int64_t chunk = 64;
  int64_t sink = 16;
  int64_t window = 200;
  int top_k = 3;
  int64_t recall = 6;
  int64_t n = 3001;
  int64_t qlen = 1;
  QueryMode mode = QueryMode::kTail;
  DType dtype = DType::kBF16;
  uint64_t seed = 1;

  std::string name() const {
    return "D" + std::to_string(head_dim) + " H" + std::to_string(q_heads) + "/" + std::to_string(kv_heads) + " C" +
           std::to_string(chunk) + " n" + std::to_string(n) + " qlen" + std::to_string(qlen) + " " +
           query_mode_name(mode) + " " + dtype_name(dtype);
  }
};

Config make_config(const Case& c) {
  Config cfg;
  cfg.model.layers = 1;
  cfg.model.q_heads = c.q_heads;
  cfg.model.kv_heads = c.kv_heads;
  cfg.model.head_dim = c.head_dim;
  cfg.model.rope_theta = 10000.0;
  cfg.reattention.sink_tokens = c.sink;
  cfg.reattention.local_window = c.window;
  cfg.reattention.chunk_tokens = c.chunk;
  cfg.reattention.top_k = c.top_k;
  cfg.reattention.max_recall_chunks = c.recall;
  cfg.model.scope = c.sink + c.recall * c.chunk + c.window + c.chunk;
  cfg.backend.storage_dtype = c.dtype;
  cfg.backend.threads = 2;
  return cfg;
}

// Needles in the mid (first, middle, last chunk), one among the sinks and one local.
std::vector<int64_t> needles_for(const Case& c) {
  const Regions r = compute_regions(c.n, make_config(c).reattention);
  std::vector<int64_t> needles;
  if (r.num_chunks > 0) {
    needles.push_back(r.chunk_first_token(0) + 3);
    needles.push_back(r.chunk_first_token(r.num_chunks / 2) + c.chunk / 2);
    needles.push_back(r.chunk_first_token(r.num_chunks - 1) + c.chunk - 1);
  }
  needles.push_back(std::min<int64_t>(1, c.n - 1));
  needles.push_back(c.n - 2);
  return needles;
}

test::PipelineResult run_query(Backend& backend, const Config& cfg, const Case& c, const SyntheticSpec& spec,
                               const std::vector<float>& q, FinalAttention strategy) {
  return test::run_synthetic_query(backend, cfg, spec, c.n, q, c.qlen, c.mode, strategy);
}

void check_case(const Case& c) {
  SCOPED_TRACE(c.name());
  const Config cfg = make_config(c);
  ASSERT_TRUE(cfg.validate().is_ok()) << cfg.validate().to_string();
  const SyntheticSpec spec{c.seed, needles_for(c)};
  const std::vector<float> q = synthetic_query(spec, cfg.model, 0, c.qlen);
  const ref::Context ctx = ref::synthetic_context(cfg.model, cfg.reattention, c.n, c.seed, spec.needles, 0);
  const ref::Result want = ref::query(ctx, q, c.qlen, c.mode);

  Expected<std::unique_ptr<Backend>> cuda = make_cuda_backend(cfg, 0);
  ASSERT_TRUE(cuda.is_ok()) << cuda.status().to_string();
  CpuBackend cpu(2);
  // K/V and q are exact in the storage dtype; what remains is the kernels' rounding of
  // rotated operands and probabilities (worst seen on H200: 2.4e-3 bf16, 3e-4 f16).
  const double tol = c.dtype == DType::kBF16 ? 6e-3 : 1e-3;
  for (FinalAttention strategy : {FinalAttention::kGather, FinalAttention::kPartial}) {
    const test::PipelineResult got = run_query(**cuda, cfg, c, spec, q, strategy);
    const test::PipelineResult cpu_got = run_query(cpu, cfg, c, spec, q, strategy);
    ASSERT_TRUE(got.status.is_ok()) << got.status.to_string();
    ASSERT_TRUE(cpu_got.status.is_ok()) << cpu_got.status.to_string();
    EXPECT_EQ(got.recalled, want.recalled);
    EXPECT_EQ(got.recalled, cpu_got.recalled);
    const double err = ref::relative_error(got.out, want.out);
    std::printf("[ error ] %s %s: %.2e\n", c.name().c_str(), strategy == FinalAttention::kGather ? "gather" : "partial",
                err);
    EXPECT_LT(err, tol) << "cuda vs fp64 reference";
    EXPECT_LT(ref::relative_error(cpu_got.out, want.out), 1e-4) << "cpu vs fp64 reference";
  }
}

TEST(CudaBackend, RejectsUnsupportedConfigs) {
  Case c;
  Config cfg = make_config(c);
  cfg.backend.storage_dtype = DType::kF32;
  Expected<std::unique_ptr<Backend>> b = make_cuda_backend(cfg, 0);
  ASSERT_FALSE(b.is_ok());
  EXPECT_NE(b.status().message().find("storage_dtype"), std::string::npos);
  EXPECT_FALSE(cuda_backend_supports(cfg).is_ok());
  EXPECT_TRUE(cuda_backend_supports(make_config(c)).is_ok());
  cfg = make_config(c);
  cfg.model.head_dim = 96;
  b = make_cuda_backend(cfg, 0);
  ASSERT_FALSE(b.is_ok());
  EXPECT_NE(b.status().message().find("head_dim"), std::string::npos);
  cfg = make_config(c);
  cfg.reattention.max_recall_chunks = cuda::kMaxRecallOnDevice + 1;
  const Status recall = cuda_backend_supports(cfg);
  ASSERT_FALSE(recall.is_ok());
  EXPECT_NE(recall.message().find("max_recall_chunks"), std::string::npos);
}

// auto picks cuda exactly when a device is visible; asking for cuda without one, or for a GPU
// the machine does not have, is an error that says so (never a silent fallback to cpu).
TEST(CudaBackend, AutoFollowsTheDevicesAndMissingGpusAreNamed) {
  Config cfg = make_config(Case{});
  cfg.backend.kind = BackendKind::kAuto;
  Expected<std::unique_ptr<Backend>> picked = make_backend(cfg, 0);
  ASSERT_TRUE(picked.is_ok()) << picked.status().to_string();
  EXPECT_STREQ((*picked)->name(), cuda_device_count() > 0 ? "cuda" : "cpu");
  Expected<std::unique_ptr<Backend>> beyond = make_cuda_backend(make_config(Case{}), cuda_device_count());
  ASSERT_FALSE(beyond.is_ok());
  EXPECT_NE(beyond.status().message().find(cuda_device_count() == 0 ? "no CUDA device" : "has no GPU of its own"),
            std::string::npos)
      << beyond.status().message();
}

TEST(CudaBackend, QueryMatchesReferenceBf16D128) {
  SKIP_WITHOUT_GPU();
  for (int64_t qlen : {1, 5, 64}) {
    for (QueryMode mode : {QueryMode::kTail, QueryMode::kDetached}) {
      Case c;
      c.qlen = qlen;
      c.mode = mode;
      c.n = 3001 + qlen;
      c.seed = 10 + qlen;
      check_case(c);
    }
  }
}

TEST(CudaBackend, QueryMatchesReferenceF16D64) {
  SKIP_WITHOUT_GPU();
  for (int64_t qlen : {1, 17}) {
    Case c;
    c.head_dim = 64;
    c.dtype = DType::kF16;
    c.qlen = qlen;
    c.n = 2777;
    c.seed = 20 + qlen;
    check_case(c);
  }
}

TEST(CudaBackend, QueryMatchesReferenceOddShapes) {
  SKIP_WITHOUT_GPU();
  // G = 3 and G = 1, chunk sizes 48 and 20 (not multiples of the 32-key group), no sinks.
  Case a;
  a.q_heads = 6;
  a.kv_heads = 2;
  a.chunk = 48;
  a.qlen = 7;
  a.n = 2501;
  check_case(a);
  Case b;
  b.q_heads = 4;
  b.kv_heads = 4;
  b.chunk = 20;
  b.sink = 0;
  b.qlen = 3;
  b.n = 1999;
  b.mode = QueryMode::kDetached;
  check_case(b);
  // Chunks longer than one 64-key group: the chunk max is carried across groups (64 + a
  // 36-key ragged tail at G = 6; 64 + 64 + 8 with f16 at D = 64).
  Case e;
  e.q_heads = 12;
  e.kv_heads = 2;
  e.chunk = 100;
  e.qlen = 5;
  e.n = 4003;
  check_case(e);
  Case f;
  f.head_dim = 64;
  f.dtype = DType::kF16;
  f.chunk = 136;
  f.qlen = 19;
  f.n = 5011;
  check_case(f);
  // No mid at all: plain causal attention.
  Case d;
  d.n = 150;
  d.qlen = 4;
  check_case(d);
}

TEST(CudaBackend, QueryMatchesReferenceMultiPass) {
  SKIP_WITHOUT_GPU();
  // More (row, head) pairs than one scoring pass holds: 100 rows x G 4 at top_k 3, and
  // 20 rows x G 4 at top_k 16.
  Case a;
  a.qlen = 100;
  a.n = 4099;
  a.seed = 31;
  check_case(a);
  Case b;
  b.qlen = 20;
  b.top_k = 16;
  b.recall = 40;
  b.n = 5003;
  b.seed = 32;
  b.mode = QueryMode::kDetached;
  check_case(b);
}

TEST(CudaBackend, QueryMatchesReferenceQueryBlocks) {
  SKIP_WITHOUT_GPU();
  // Prefill-sized blocks through the whole step: scoring on the gemm kernel.
  Case a;
  a.window = 1024;
  a.qlen = 1000;
  a.n = 5003;
  a.seed = 41;
  check_case(a);
  Case b;
  b.head_dim = 64;
  b.dtype = DType::kF16;
  b.q_heads = 12;
  b.kv_heads = 2;
  b.chunk = 100;
  b.window = 256;
  b.qlen = 128;
  b.n = 4001;
  b.seed = 42;
  b.mode = QueryMode::kDetached;
  check_case(b);
}

// K/V values k/16 for integers k in [-32, 32): exact in bf16, f16 and fp32, so both backends
// score the same keys and differ only in fp32 summation order.
class ExactKvSource final : public Fp32KvSource {
 public:
  ExactKvSource(int64_t tokens, int head_dim) : Fp32KvSource(head_dim), tokens_(tokens), head_dim_(head_dim) {}
  int64_t tokens() const override { return tokens_; }
  void read_f32(int layer, int kv_head, int64_t offset, int64_t count, float* k, float* v) const override {
    for (int64_t t = 0; t < count; ++t) {
      for (int d = 0; d < head_dim_; ++d) {
        uint64_t x = (static_cast<uint64_t>(layer) << 56) ^ (static_cast<uint64_t>(kv_head) << 48) ^
                     (static_cast<uint64_t>(offset + t) << 8) ^ static_cast<uint64_t>(d);
        x *= 0x9e3779b97f4a7c15ull;
        x ^= x >> 29;
        x *= 0xbf58476d1ce4e5b9ull;
        x ^= x >> 32;
        k[t * head_dim_ + d] = static_cast<float>(static_cast<int>(x & 63) - 32) / 16.0f;
        v[t * head_dim_ + d] = static_cast<float>(static_cast<int>((x >> 8) & 63) - 32) / 16.0f;
      }
    }
  }

 private:
  int64_t tokens_;
  int head_dim_;
};

TEST(CudaBackend, ScoreChunksMatchesCpu) {
  SKIP_WITHOUT_GPU();
  Case c;
  c.qlen = 33;
  c.n = 20011;
  c.top_k = 5;
  const Config cfg = make_config(c);
  Expected<std::unique_ptr<Backend>> cuda = make_cuda_backend(cfg, 0);
  ASSERT_TRUE(cuda.is_ok()) << cuda.status().to_string();
  CpuBackend cpu(2);
  std::mt19937 rng(3);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> q(static_cast<size_t>(c.qlen) * c.q_heads * c.head_dim);
  for (float& x : q) x = normal(rng);
  const Regions regions = compute_regions(c.n, cfg.reattention);
  const int64_t rows = c.qlen * c.q_heads;
  std::vector<std::vector<Candidate>> lists;
  for (Backend* b : {static_cast<Backend*>(cuda->get()), static_cast<Backend*>(&cpu)}) {
    KvStore store(*b, cfg, 0, 1);
    ASSERT_TRUE(store.create(1, 0, {0}).is_ok());
    ASSERT_TRUE(store.append(1, ExactKvSource(c.n, c.head_dim)).is_ok());
    Expected<Buffer> q_dev = b->allocate(q.size() * sizeof(float));
    Expected<Buffer> out = b->allocate(rows * c.top_k * sizeof(Candidate));
    ASSERT_TRUE(q_dev.is_ok() && out.is_ok());
    ASSERT_TRUE(b->upload(q_dev->data(), q.data(), q.size() * sizeof(float)).is_ok());
    const LayerShard& shard = store.find(1)->layers[0];
    ScoreParams p;
    p.k_pages = shard.k_page_table.as<const void* const>();
    p.blocks_per_page = KvStore::kBlocksPerPage;
    p.block_count = regions.num_chunks;
    p.q = q_dev->as<float>();
    p.qlen = c.qlen;
    p.q_heads = c.q_heads;
    p.kv_heads = c.kv_heads;
    p.head_dim = c.head_dim;
    p.chunk_tokens = c.chunk;
    p.top_k = c.top_k;
    p.out = out->as<Candidate>();
    const Status st = b->score_chunks(p);
    ASSERT_TRUE(st.is_ok()) << st.to_string();
    std::vector<Candidate> host(rows * c.top_k);
    ASSERT_TRUE(b->download(host.data(), out->data(), host.size() * sizeof(Candidate)).is_ok());
    lists.push_back(host);
  }
  int id_mismatches = 0;
  for (int64_t i = 0; i < rows * c.top_k; ++i) {
    const Candidate g = lists[0][i], w = lists[1][i];
    ASSERT_GE(g.chunk, 0);
    const float tol = 1e-4f * (1.0f + std::fabs(w.score));
    ASSERT_NEAR(g.score, w.score, tol) << "rank slot " << i;
    // Chunk ids may differ only where two scores tie within fp32 accumulation error.
    if (g.chunk != w.chunk) ++id_mismatches;
  }
  EXPECT_LE(id_mismatches, 2);
}

// ---- Chunk scoring (warp kernel for few pairs, wgmma kernel for query blocks) against an fp64
// reference of the chunk scores, over the shapes of issue 14: qlen 1 .. 4096, G 1/4/6, D 64/128,
// chunks of 16, 64, 100, 128 and longer than a tile, bf16/f16 storage, fp32 and storage-exact q.
struct ScoreCase {
  int64_t qlen = 1;
  int q_heads = 8;
  int kv_heads = 2;
  int head_dim = 128;
  int64_t chunk = 64;
  int64_t blocks = 24;       // chunk slots on this "rank"
  DType dtype = DType::kBF16;
  bool exact_q = false;      // q rounded to the storage dtype (one pass) or fp32 (three parts)
  int top_k = 4;
  int64_t id_stride = 1;
  int64_t id_offset = 0;
  uint64_t seed = 1;

  std::string name() const {
    return "qlen" + std::to_string(qlen) + " H" + std::to_string(q_heads) + "/" + std::to_string(kv_heads) + " D" +
           std::to_string(head_dim) + " C" + std::to_string(chunk) + " blocks" + std::to_string(blocks) + " " +
           dtype_name(dtype) + (exact_q ? " exact-q" : " fp32-q") + " k" + std::to_string(top_k);
  }
};

float round_to(DType dtype, float x) {
  return dtype == DType::kBF16 ? bf16_to_float(float_to_bf16(x)) : f16_to_float(float_to_f16(x));
}

void check_scores(const ScoreCase& c) {
  SCOPED_TRACE(c.name());
  Case base;
  base.head_dim = c.head_dim;
  base.q_heads = c.q_heads;
  base.kv_heads = c.kv_heads;
  base.dtype = c.dtype;
  base.chunk = c.chunk;
  base.top_k = c.top_k;
  Expected<std::unique_ptr<Backend>> made = make_cuda_backend(make_config(base), 0);
  ASSERT_TRUE(made.is_ok()) << made.status().to_string();
  Backend& gpu = **made;
  const int D = c.head_dim, Hkv = c.kv_heads, H = c.q_heads, G = H / Hkv;
  const int64_t C = c.chunk;
  // Keys [blocks][Hkv][C][D] in pages of 5 blocks (slots cross pages), values rounded to storage.
  constexpr int64_t kBlocksPerPage = 5;
  std::mt19937 rng(static_cast<uint32_t>(c.seed));
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const size_t block_elems = static_cast<size_t>(Hkv) * C * D;
  std::vector<float> keys(static_cast<size_t>(c.blocks) * block_elems);
  for (float& x : keys) x = round_to(c.dtype, normal(rng));
  std::vector<float> q(static_cast<size_t>(c.qlen) * H * D);
  for (float& x : q) x = c.exact_q ? round_to(c.dtype, normal(rng)) : normal(rng);

  const int64_t pages = (c.blocks + kBlocksPerPage - 1) / kBlocksPerPage;
  std::vector<Buffer> page_buffers;
  std::vector<const void*> page_ptrs;
  std::vector<uint16_t> bits(kBlocksPerPage * block_elems);
  for (int64_t pg = 0; pg < pages; ++pg) {
    const int64_t first = pg * kBlocksPerPage;
    const int64_t count = std::min(kBlocksPerPage, c.blocks - first);
    convert_from_f32(c.dtype, keys.data() + first * block_elems, count * block_elems, bits.data());
    Expected<Buffer> page = gpu.allocate(kBlocksPerPage * block_elems * 2);
    ASSERT_TRUE(page.is_ok());
    ASSERT_TRUE(gpu.upload(page->data(), bits.data(), count * block_elems * 2).is_ok());
    page_ptrs.push_back(page->data());
    page_buffers.push_back(std::move(page).value());
  }
  Expected<Buffer> table = gpu.allocate(page_ptrs.size() * sizeof(void*));
  Expected<Buffer> q_dev = gpu.allocate(q.size() * sizeof(float));
  const int64_t rows = c.qlen * H;
  Expected<Buffer> out = gpu.allocate(rows * c.top_k * sizeof(Candidate));
  ASSERT_TRUE(table.is_ok() && q_dev.is_ok() && out.is_ok());
  ASSERT_TRUE(gpu.upload(table->data(), page_ptrs.data(), page_ptrs.size() * sizeof(void*)).is_ok());
  ASSERT_TRUE(gpu.upload(q_dev->data(), q.data(), q.size() * sizeof(float)).is_ok());
  // Poison: every slot must be written.
  std::vector<Candidate> got(rows * c.top_k, Candidate{12345.0f, 7777777});
  ASSERT_TRUE(gpu.upload(out->data(), got.data(), got.size() * sizeof(Candidate)).is_ok());
  ScoreParams p;
  p.k_pages = table->as<const void* const>();
  p.blocks_per_page = kBlocksPerPage;
  p.block_count = c.blocks;
  p.chunk_id_stride = c.id_stride;
  p.chunk_id_offset = c.id_offset;
  p.q = q_dev->as<float>();
  p.qlen = c.qlen;
  p.q_heads = H;
  p.kv_heads = Hkv;
  p.head_dim = D;
  p.chunk_tokens = C;
  p.top_k = c.top_k;
  p.out = out->as<Candidate>();
  const Status st = gpu.score_chunks(p);
  ASSERT_TRUE(st.is_ok()) << st.to_string();
  ASSERT_TRUE(gpu.download(got.data(), out->data(), got.size() * sizeof(Candidate)).is_ok());

  // fp64 reference: every chunk's score for every (row, head), in parallel over rows.
  std::vector<double> ref(static_cast<size_t>(rows) * c.blocks);
  auto score_rows = [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int h = static_cast<int>(r % H);
      const float* qr = q.data() + r * D;
      for (int64_t b = 0; b < c.blocks; ++b) {
        const float* kb = keys.data() + b * block_elems + static_cast<size_t>(h / G) * C * D;
        double best = -INFINITY;
        for (int64_t t = 0; t < C; ++t) {
          double dot = 0.0;
          for (int d = 0; d < D; ++d) dot += static_cast<double>(qr[d]) * kb[t * D + d];
          best = std::max(best, dot);
        }
        ref[r * c.blocks + b] = best;
      }
    }
  };
  const int threads = std::max(1u, std::min(16u, std::thread::hardware_concurrency()));
  std::vector<std::thread> pool;
  for (int w = 0; w < threads; ++w) pool.emplace_back(score_rows, rows * w / threads, rows * (w + 1) / threads);
  for (std::thread& t : pool) t.join();

  int failures = 0;
  std::string first_failure;
  auto fail = [&](const std::string& what) {
    if (failures++ == 0) first_failure = what;
  };
  const int k = c.top_k;
  std::vector<int64_t> order(c.blocks);
  for (int64_t r = 0; r < rows; ++r) {
    const double* sr = ref.data() + r * c.blocks;
    for (int64_t b = 0; b < c.blocks; ++b) order[b] = b;
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return sr[a] > sr[b]; });
    for (int s = 0; s < k; ++s) {
      const Candidate g = got[r * k + s];
      const std::string where = "row " + std::to_string(r / H) + " head " + std::to_string(r % H) + " rank " +
                                std::to_string(s) + ": got (" + std::to_string(g.score) + ", " +
                                std::to_string(g.chunk) + ")";
      if (s >= c.blocks) {
        if (g.chunk != -1) fail(where + ", want an empty slot");
        continue;
      }
      const double want = sr[order[s]];
      // fp32 accumulation of D products of storage-dtype keys and (split) fp32 q.
      const double tol = 2e-4 * (1.0 + std::fabs(want));
      if (!(std::fabs(g.score - want) <= tol)) {
        fail(where + ", want score " + std::to_string(want));
        continue;
      }
      const int64_t slot = (g.chunk - c.id_offset) / c.id_stride;
      if (g.chunk < 0 || (g.chunk - c.id_offset) % c.id_stride != 0 || slot >= c.blocks ||
          !(std::fabs(sr[slot] - g.score) <= tol)) {
        fail(where + ": not that chunk's score");
        continue;
      }
      // Away from ties, the id is the reference's.
      const bool clear = (s == 0 || sr[order[s - 1]] - want > 2 * tol) &&
                         (s + 1 >= c.blocks || want - sr[order[s + 1]] > 2 * tol);
      if (clear && slot != order[s]) fail(where + ", want chunk slot " + std::to_string(order[s]));
    }
  }
  EXPECT_EQ(failures, 0) << first_failure;
}

TEST(CudaScore, DecodeAndSmallBlocks) {
  SKIP_WITHOUT_GPU();
  ScoreCase a;  // qlen 1: the warp kernel
  a.blocks = 300;
  check_scores(a);
  ScoreCase b;  // 20 pairs: the gemm kernel, one CTA of 128 pairs per KV head, many key splits
  b.qlen = 5;
  b.blocks = 700;
  b.exact_q = true;
  b.id_stride = 3;
  b.id_offset = 2;
  check_scores(b);
}

TEST(CudaScore, QueryBlocksQlen17) {
  SKIP_WITHOUT_GPU();
  ScoreCase a;
  a.qlen = 17;
  a.blocks = 400;
  check_scores(a);
  ScoreCase b;
  b.qlen = 17;
  b.q_heads = 12;
  b.kv_heads = 2;
  b.head_dim = 64;
  b.chunk = 100;
  b.dtype = DType::kF16;
  b.exact_q = true;
  b.blocks = 60;
  check_scores(b);
}

TEST(CudaScore, QueryBlocksQlen128) {
  SKIP_WITHOUT_GPU();
  ScoreCase a;
  a.qlen = 128;
  a.q_heads = 4;
  a.kv_heads = 4;
  a.chunk = 16;
  a.exact_q = true;
  a.blocks = 90;
  check_scores(a);
  ScoreCase b;
  b.qlen = 128;
  b.head_dim = 64;
  b.chunk = 128;
  b.dtype = DType::kF16;
  b.blocks = 21;
  b.top_k = 7;
  check_scores(b);
}

TEST(CudaScore, QueryBlocksQlen1000) {
  SKIP_WITHOUT_GPU();
  ScoreCase a;
  a.qlen = 1000;
  a.q_heads = 6;
  a.kv_heads = 1;
  a.chunk = 100;
  a.blocks = 13;
  check_scores(a);
  ScoreCase b;
  b.qlen = 1000;
  b.chunk = 64;
  b.dtype = DType::kF16;
  b.exact_q = true;
  b.blocks = 19;
  check_scores(b);
  ScoreCase d;
  d.qlen = 1000;
  d.q_heads = 2;
  d.kv_heads = 2;
  d.chunk = 128;
  d.exact_q = true;
  d.top_k = 16;
  d.blocks = 23;
  check_scores(d);
}

TEST(CudaScore, QueryBlocksQlen4096) {
  SKIP_WITHOUT_GPU();
  ScoreCase a;
  a.qlen = 4096;
  a.q_heads = 4;
  a.kv_heads = 1;
  a.exact_q = true;
  a.blocks = 17;
  check_scores(a);
  ScoreCase b;
  b.qlen = 4096;
  b.q_heads = 2;
  b.kv_heads = 2;
  b.head_dim = 64;
  b.chunk = 16;
  b.dtype = DType::kF16;
  b.blocks = 45;
  check_scores(b);
}

TEST(CudaScore, ChunksLongerThanATile) {
  SKIP_WITHOUT_GPU();
  ScoreCase a;  // 256 = two full tiles per chunk
  a.qlen = 300;
  a.chunk = 256;
  a.blocks = 9;
  check_scores(a);
  ScoreCase b;  // 136 = a full tile and 8 rows
  b.qlen = 40;
  b.head_dim = 64;
  b.chunk = 136;
  b.dtype = DType::kF16;
  b.exact_q = true;
  b.blocks = 11;
  check_scores(b);
}

// ---- Device candidate merge + recall selection against merge_candidates + select_recall, with
// many ties: few chunks (vote-count ties) and scores from a small set (best-score ties).
void check_merge_select(int world, int64_t rows, int k, int64_t num_chunks, const std::vector<int64_t>& caps,
                        uint64_t seed) {
  SCOPED_TRACE("world " + std::to_string(world) + " rows " + std::to_string(rows) + " k " + std::to_string(k) +
               " chunks " + std::to_string(num_chunks));
  Case base;
  Expected<std::unique_ptr<Backend>> made = make_cuda_backend(make_config(base), 0);
  ASSERT_TRUE(made.is_ok()) << made.status().to_string();
  auto& gpu = static_cast<CudaBackend&>(**made);
  std::mt19937_64 rng(seed);
  std::vector<Candidate> gathered(static_cast<size_t>(world) * rows * k);
  for (int rank = 0; rank < world; ++rank) {
    std::vector<int32_t> mine;
    for (int64_t c = rank; c < num_chunks; c += world) mine.push_back(static_cast<int32_t>(c));
    for (int64_t row = 0; row < rows; ++row) {
      Candidate* list = gathered.data() + (static_cast<int64_t>(rank) * rows + row) * k;
      std::shuffle(mine.begin(), mine.end(), rng);
      const int filled = std::min<int>(static_cast<int>(mine.size()), row % 7 == 0 ? k / 2 : k);
      for (int s = 0; s < k; ++s) {
        list[s] = s < filled ? Candidate{static_cast<float>(static_cast<int>(rng() % 9) - 4) / 8.0f, mine[s]}
                             : Candidate{0.0f, -1};
      }
      std::sort(list, list + k, [](const Candidate& a, const Candidate& b) { return candidate_before(a, b); });
    }
  }
  std::vector<Candidate> want_merged(rows * k);
  merge_candidates(gathered.data(), world, rows, k, want_merged.data());
  Expected<Buffer> g_dev = gpu.allocate(gathered.size() * sizeof(Candidate));
  Expected<Buffer> merged = gpu.allocate(want_merged.size() * sizeof(Candidate));
  const int64_t max_cap = *std::max_element(caps.begin(), caps.end());
  Expected<Buffer> recall = gpu.allocate((max_cap + 1) * sizeof(int64_t));
  Expected<Buffer> ws = gpu.allocate(cuda::merge_select_workspace_bytes(num_chunks));
  ASSERT_TRUE(g_dev.is_ok() && merged.is_ok() && recall.is_ok() && ws.is_ok());
  ASSERT_TRUE(gpu.upload(g_dev->data(), gathered.data(), gathered.size() * sizeof(Candidate)).is_ok());
  for (int64_t cap : caps) {
    SCOPED_TRACE("max_recall " + std::to_string(cap));
    cuda::MergeSelectParams p;
    p.gathered = g_dev->as<const Candidate>();
    p.world = world;
    p.rows = rows;
    p.top_k = k;
    p.num_chunks = num_chunks;
    p.max_recall = cap;
    p.merged = merged->as<Candidate>();
    p.recall = recall->as<int64_t>();
    p.recall_count = recall->as<int64_t>() + max_cap;
    const Status st = cuda::run_merge_select(p, ws->data(), ws->bytes(), gpu.stream());
    ASSERT_TRUE(st.is_ok()) << st.to_string();
    std::vector<Candidate> got_merged(rows * k);
    std::vector<int64_t> got(max_cap + 1, -7);
    ASSERT_TRUE(gpu.download(got_merged.data(), merged->data(), got_merged.size() * sizeof(Candidate)).is_ok());
    ASSERT_TRUE(gpu.download(got.data(), recall->data(), got.size() * sizeof(int64_t)).is_ok());
    int merged_mismatches = 0;
    for (size_t i = 0; i < got_merged.size(); ++i) {
      merged_mismatches += got_merged[i].chunk != want_merged[i].chunk || got_merged[i].score != want_merged[i].score;
    }
    EXPECT_EQ(merged_mismatches, 0);
    const std::vector<int64_t> want = select_recall(want_merged.data(), rows, k, cap);
    ASSERT_EQ(got[max_cap], static_cast<int64_t>(want.size()));
    EXPECT_EQ(std::vector<int64_t>(got.begin(), got.begin() + static_cast<int64_t>(want.size())), want);
  }
}

TEST(CudaSelect, MatchesMergeAndSelectRecall) {
  SKIP_WITHOUT_GPU();
  check_merge_select(1, 4096 * 8, 4, 300, {1, 32, 299, 4096}, 1);
  check_merge_select(3, 1000, 5, 61, {7, 32}, 2);
  check_merge_select(2, 17, 16, 5000, {32, 100}, 3);
  check_merge_select(4, 0, 4, 10, {3}, 4);
}

TEST(CudaBackend, MergeStatesMatchesCpu) {
  SKIP_WITHOUT_GPU();
  Case c;
  const Config cfg = make_config(c);
  Expected<std::unique_ptr<Backend>> cuda = make_cuda_backend(cfg, 0);
  ASSERT_TRUE(cuda.is_ok());
  CpuBackend cpu(1);
  const int64_t rows = 37, count = 3, D = c.head_dim;
  std::mt19937 rng(5);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> part_out(count * rows * D), part_max(count * rows), part_sum(count * rows);
  std::vector<float> out(rows * D), row_max(rows), row_sum(rows);
  for (float& x : part_out) x = normal(rng);
  for (size_t i = 0; i < part_max.size(); ++i) {
    part_max[i] = 3.0f * normal(rng);
    part_sum[i] = i % 7 == 0 ? 0.0f : 1.0f + std::fabs(normal(rng)) * 10.0f;
  }
  for (float& x : out) x = normal(rng);
  for (int64_t r = 0; r < rows; ++r) {
    row_max[r] = r % 5 == 0 ? -INFINITY : normal(rng);
    row_sum[r] = r % 5 == 0 ? 0.0f : 2.0f;
  }
  std::vector<std::vector<float>> results;
  for (Backend* b : {static_cast<Backend*>(cuda->get()), static_cast<Backend*>(&cpu)}) {
    auto put = [&](const std::vector<float>& v) {
      Expected<Buffer> buf = b->allocate(v.size() * sizeof(float));
      EXPECT_TRUE(buf.is_ok());
      EXPECT_TRUE(b->upload(buf->data(), v.data(), v.size() * sizeof(float)).is_ok());
      return std::move(buf).value();
    };
    Buffer po = put(part_out), pm = put(part_max), ps = put(part_sum), o = put(out), m = put(row_max), s = put(row_sum);
    MergeParams p;
    p.partial_out = po.as<float>();
    p.partial_max = pm.as<float>();
    p.partial_sum = ps.as<float>();
    p.count = count;
    p.rows = rows;
    p.head_dim = static_cast<int>(D);
    p.out = o.as<float>();
    p.row_max = m.as<float>();
    p.row_sum = s.as<float>();
    ASSERT_TRUE(b->merge_states(p).is_ok());
    std::vector<float> all(rows * D + 2 * rows);
    ASSERT_TRUE(b->download(all.data(), o.data(), rows * D * sizeof(float)).is_ok());
    ASSERT_TRUE(b->download(all.data() + rows * D, m.data(), rows * sizeof(float)).is_ok());
    ASSERT_TRUE(b->download(all.data() + rows * D + rows, s.data(), rows * sizeof(float)).is_ok());
    results.push_back(all);
  }
  for (size_t i = 0; i < results[0].size(); ++i) {
    const float g = results[0][i], w = results[1][i];
    if (std::isinf(w)) {
      EXPECT_EQ(g, w) << i;
    } else {
      EXPECT_NEAR(g, w, 1e-5f * (1.0f + std::fabs(w))) << i;
    }
  }
}

TEST(CudaBackend, PackBlocksMatchesCpu) {
  SKIP_WITHOUT_GPU();
  Case c;
  const Config cfg = make_config(c);
  Expected<std::unique_ptr<Backend>> cuda = make_cuda_backend(cfg, 0);
  ASSERT_TRUE(cuda.is_ok()) << cuda.status().to_string();
  Backend& gpu = **cuda;
  CpuBackend cpu(2);
  std::mt19937_64 rng(7);
  struct Shape {
    size_t block_bytes;
    int64_t count;
    bool aligned;
  };
  // 128 KiB = one [Hkv 8, C 64, D 128] bf16 block; 4100: a partial last vector; 70000
  // blocks: more than one grid row per block.
  for (const Shape& sh : {Shape{131072, 64, true}, Shape{131072, 5, false}, Shape{4100, 37, true},
                          Shape{48, 70000, true}, Shape{3, 100, false}}) {
    SCOPED_TRACE("block_bytes " + std::to_string(sh.block_bytes) + " count " + std::to_string(sh.count));
    const size_t pool_bytes = sh.block_bytes * 16 + 64;
    std::vector<unsigned char> pool(pool_bytes);
    for (unsigned char& b : pool) b = static_cast<unsigned char>(rng());
    std::vector<size_t> offset(sh.count);
    for (size_t& o : offset) {
      o = rng() % (pool_bytes - sh.block_bytes - 16);
      o = sh.aligned ? o / 16 * 16 : o;
    }
    std::vector<std::vector<unsigned char>> packed;
    for (Backend* b : {&gpu, static_cast<Backend*>(&cpu)}) {
      Expected<Buffer> src_pool = b->allocate(pool_bytes);
      Expected<Buffer> list = b->allocate(sh.count * sizeof(void*));
      Expected<Buffer> dst = b->allocate(sh.count * sh.block_bytes);
      ASSERT_TRUE(src_pool.is_ok() && list.is_ok() && dst.is_ok());
      ASSERT_TRUE(b->upload(src_pool->data(), pool.data(), pool_bytes).is_ok());
      std::vector<const void*> src(sh.count);
      for (int64_t i = 0; i < sh.count; ++i) src[i] = src_pool->as<const char>() + offset[i];
      ASSERT_TRUE(b->upload(list->data(), src.data(), src.size() * sizeof(void*)).is_ok());
      PackParams p;
      p.src = list->as<const void* const>();
      p.count = sh.count;
      p.block_bytes = sh.block_bytes;
      p.dst = dst->data();
      const Status st = b->pack_blocks(p);
      ASSERT_TRUE(st.is_ok()) << st.to_string();
      std::vector<unsigned char> host(sh.count * sh.block_bytes);
      ASSERT_TRUE(b->download(host.data(), dst->data(), host.size()).is_ok());
      packed.push_back(std::move(host));
    }
    ASSERT_EQ(packed[0].size(), packed[1].size());
    size_t first_diff = packed[0].size();
    for (size_t i = 0; i < packed[0].size() && first_diff == packed[0].size(); ++i) {
      if (packed[0][i] != packed[1][i]) first_diff = i;
    }
    EXPECT_EQ(first_diff, packed[0].size()) << "first differing byte";
  }
}

// Backend::merge_select with ranks' lists apart (the step's receive buffer: a header and other
// queries' lists between them): the CUDA backend against the CPU backend, many score ties.
TEST(CudaBackend, MergeSelectMatchesCpuWithRankStride) {
  SKIP_WITHOUT_GPU();
  Case c;
  const Config cfg = make_config(c);
  Expected<std::unique_ptr<Backend>> cuda = make_cuda_backend(cfg, 0);
  ASSERT_TRUE(cuda.is_ok()) << cuda.status().to_string();
  CpuBackend cpu(2);
  std::mt19937_64 rng(11);
  const int world = 3, k = 4;
  const int64_t rows = 4096 * 8, num_chunks = 5000, R = 32, lead = 37, stride = rows * k + 101;
  std::vector<Candidate> gathered(static_cast<size_t>(world) * stride + lead, Candidate{0.0f, -1});
  for (int r = 0; r < world; ++r) {
    for (int64_t row = 0; row < rows; ++row) {
      // k distinct chunks of rank r (as a rank's scoring produces), scores with many ties.
      Candidate* list = gathered.data() + lead + r * stride + row * k;
      for (int s = 0; s < k;) {
        const auto chunk = static_cast<int32_t>((rng() % (num_chunks / world)) * world + r);
        if (std::any_of(list, list + k, [&](const Candidate& c) { return c.chunk == chunk; })) continue;
        topk_insert(list, k, Candidate{static_cast<float>(rng() % 64) / 8.0f, chunk});
        ++s;
      }
    }
  }
  std::vector<std::vector<int64_t>> got;
  for (Backend* b : {static_cast<Backend*>(cuda->get()), static_cast<Backend*>(&cpu)}) {
    Expected<Buffer> in = b->allocate(gathered.size() * sizeof(Candidate));
    Expected<Buffer> out = b->allocate((R + 1) * sizeof(int64_t));
    ASSERT_TRUE(in.is_ok() && out.is_ok());
    ASSERT_TRUE(b->upload(in->data(), gathered.data(), gathered.size() * sizeof(Candidate)).is_ok());
    MergeSelectParams p;
    p.gathered = in->as<const Candidate>() + lead;
    p.world = world;
    p.rank_stride = stride;
    p.rows = rows;
    p.top_k = k;
    p.num_chunks = num_chunks;
    p.max_recall = R;
    p.recall_count = out->as<int64_t>();
    p.recall = p.recall_count + 1;
    const Status st = b->merge_select(p);
    ASSERT_TRUE(st.is_ok()) << st.to_string();
    std::vector<int64_t> host(R + 1);
    ASSERT_TRUE(b->download(host.data(), out->data(), host.size() * sizeof(int64_t)).is_ok());
    got.emplace_back(host.begin() + 1, host.begin() + 1 + host[0]);
  }
  EXPECT_EQ(got[0].size(), static_cast<size_t>(R));
  EXPECT_EQ(got[0], got[1]);
}

// A batch mixing contexts, layers, qlens (1 to the window, a decode batch of one context) and
// modes, selected on the device, on the host or both: each query gets what it gets alone, and
// the fp64 reference's recall set. Needles fill every head's top_k, so the selections are clear
// of ties whichever scoring kernel (warp for one row, gemm for a block) ran.
TEST(CudaBatch, MatchesEachQueryAlone) {
  SKIP_WITHOUT_GPU();
  Case c;
  c.window = 300;
  c.recall = 5;
  Config cfg = make_config(c);
  cfg.model.layers = 2;
  Expected<std::unique_ptr<Backend>> cuda = make_cuda_backend(cfg, 0);
  ASSERT_TRUE(cuda.is_ok()) << cuda.status().to_string();
  test::LoopbackCommunicator comm(**cuda);
  std::vector<test::BatchContext> contexts;
  for (int64_t n : {5003, 4099, 200}) {
    const Regions regions = compute_regions(n, cfg.reattention);
    SyntheticSpec spec{static_cast<uint64_t>(n), {}};
    if (regions.num_chunks > 4) {
      spec.needles = {regions.chunk_first_token(1) + 7, regions.chunk_first_token(regions.num_chunks / 2 + 1),
                      regions.chunk_first_token(regions.num_chunks - 2) + 63};
    }
    contexts.push_back({n, 0, spec});
  }
  std::vector<test::BatchQuery> queries = {{0, 0, 17, QueryMode::kTail},  {1, 1, 300, QueryMode::kTail},
                                           {0, 1, 1, QueryMode::kTail},   {0, 0, 128, QueryMode::kDetached},
                                           {2, 0, 5, QueryMode::kTail},   {1, 1, 64, QueryMode::kDetached},
                                           {-1, 0, 1, QueryMode::kTail}};
  for (int b = 0; b < 12; ++b) queries.push_back({1, 0, 1, QueryMode::kTail});  // a decode batch
  for (int64_t device_rows : {int64_t{1}, int64_t{2048}, int64_t{1} << 40}) {
    const test::BatchRun run = test::run_batch_and_alone(**cuda, comm, cfg, contexts, queries,
                                                         FinalAttention::kGather, StepOptions{device_rows});
    ASSERT_TRUE(run.status.is_ok()) << run.status.to_string();
    ASSERT_EQ(run.batch.size(), queries.size());
    for (size_t i = 0; i < queries.size(); ++i) {
      SCOPED_TRACE("device_select_rows " + std::to_string(device_rows) + " query " + std::to_string(i));
      const QueryResult& got = run.batch[i];
      const QueryResult& one = run.alone[i];
      const test::BatchQuery& bq = queries[i];
      EXPECT_EQ(got.status.is_ok(), bq.context >= 0) << got.status.to_string();
      if (bq.context < 0) continue;
      const test::BatchContext& bc = contexts[bq.context];
      const ref::Context ctx =
          ref::synthetic_context(cfg.model, cfg.reattention, bc.n, bc.spec.seed, bc.spec.needles, bq.layer);
      const ref::Result want = ref::query(ctx, run.q[i], bq.qlen, bq.mode);
      EXPECT_EQ(got.recalled, want.recalled);
      EXPECT_EQ(got.recalled, one.recalled);
      EXPECT_LT(ref::relative_error(got.out, std::vector<double>(one.out.begin(), one.out.end())), 1e-6);
      EXPECT_LT(ref::relative_error(got.out, want.out), 6e-3);
    }
  }
}

// Backend::upload_pieces: pieces of one host buffer (odd sizes and alignments, one larger than
// a kernel tile, many small ones, and a list too large for the pinned ring) against the CPU
// backend's memcpy per piece.
TEST(CudaBackend, UploadPiecesMatchesCpu) {
  SKIP_WITHOUT_GPU();
  Case c;
  const Config cfg = make_config(c);
  Expected<std::unique_ptr<Backend>> cuda = make_cuda_backend(cfg, 0);
  ASSERT_TRUE(cuda.is_ok()) << cuda.status().to_string();
  Backend& gpu = **cuda;
  CpuBackend cpu(2);
  std::mt19937_64 rng(11);
  struct Shape {
    int64_t count;
    int64_t max_bytes;
    bool aligned;
  };
  for (const Shape& sh : {Shape{32, 256, true}, Shape{7, 40000, true}, Shape{300, 100, false},
                          Shape{2, 3 << 20, true}, Shape{1, 1, false}}) {
    SCOPED_TRACE("count " + std::to_string(sh.count) + " max_bytes " + std::to_string(sh.max_bytes));
    std::vector<unsigned char> src(static_cast<size_t>(sh.count * sh.max_bytes + 64));
    for (unsigned char& b : src) b = static_cast<unsigned char>(rng());
    // Pieces of the source, each to its own region of the pool (regions apart, so no overlap).
    const int64_t region = (sh.max_bytes + 64) / 16 * 16;
    std::vector<UploadPiece> layout(sh.count);
    for (int64_t i = 0; i < sh.count; ++i) {
      UploadPiece& p = layout[i];
      p.bytes = 1 + static_cast<int64_t>(rng() % sh.max_bytes);
      p.src_offset = static_cast<int64_t>(rng() % (src.size() - p.bytes + 1));
      p.dst = reinterpret_cast<void*>(i * region + (sh.aligned ? 0 : static_cast<int64_t>(rng() % 16)));
      if (sh.aligned) p.src_offset = std::min<int64_t>(p.src_offset / 16 * 16, src.size() - p.bytes);
    }
    const size_t pool_bytes = static_cast<size_t>(sh.count * region + 16);
    std::vector<std::vector<unsigned char>> pools;
    for (Backend* b : {&gpu, static_cast<Backend*>(&cpu)}) {
      Expected<Buffer> pool = b->allocate(pool_bytes);
      ASSERT_TRUE(pool.is_ok());
      const std::vector<unsigned char> poison(pool_bytes, 0xA5);
      ASSERT_TRUE(b->upload(pool->data(), poison.data(), pool_bytes).is_ok());
      std::vector<UploadPiece> pieces = layout;
      for (UploadPiece& p : pieces) p.dst = pool->as<char>() + reinterpret_cast<intptr_t>(p.dst);
      const Status st = b->upload_pieces(src.data(), src.size(), pieces.data(), static_cast<int64_t>(pieces.size()));
      ASSERT_TRUE(st.is_ok()) << st.to_string();
      std::vector<unsigned char> host(pool_bytes);
      ASSERT_TRUE(b->download(host.data(), pool->data(), pool_bytes).is_ok());
      pools.push_back(std::move(host));
    }
    EXPECT_TRUE(pools[0] == pools[1]) << "the CUDA backend's pool differs from the CPU backend's";
    // Every piece landed (the CPU pool is the plain memcpy of each).
    for (const UploadPiece& p : layout) {
      const size_t at = reinterpret_cast<uintptr_t>(p.dst);
      ASSERT_EQ(std::memcmp(pools[0].data() + at, src.data() + p.src_offset, p.bytes), 0);
    }
  }
  // A piece outside the source is refused, naming it, and writes nothing.
  Expected<Buffer> dst = gpu.allocate(64);
  ASSERT_TRUE(dst.is_ok());
  std::vector<unsigned char> src(64, 1);
  const UploadPiece bad[] = {{dst->data(), 0, 32}, {dst->data(), 40, 32}};
  const Status refused = gpu.upload_pieces(src.data(), src.size(), bad, 2);
  EXPECT_EQ(refused.code(), ErrorCode::kInvalidArgument);
  EXPECT_NE(refused.message().find("piece 1"), std::string::npos) << refused.message();
}

// A context appended a token at a time (a decode: each token through the small-append path,
// to its home block and the owner's ring) holds the same bytes as one appended at once.
TEST(CudaBackend, TokenByTokenAppendMatchesBulkAppend) {
  SKIP_WITHOUT_GPU();
  Case c;
  c.n = 700;
  c.window = 130;
  const Config cfg = make_config(c);
  Expected<std::unique_ptr<Backend>> cuda = make_cuda_backend(cfg, 0);
  ASSERT_TRUE(cuda.is_ok()) << cuda.status().to_string();
  const ModelConfig& m = cfg.model;
  const ReattentionConfig& rc = cfg.reattention;
  const SyntheticSpec spec{5, {3, 200}};
  KvStore bulk(**cuda, cfg, 0, 1), steps(**cuda, cfg, 0, 1);
  ASSERT_TRUE(bulk.create(1, 0).is_ok());
  ASSERT_TRUE(steps.create(1, 0).is_ok());
  ASSERT_TRUE(bulk.append(1, SyntheticKvSource(spec, m, 0, c.n)).is_ok());
  // Single tokens, with a few longer steps between them that start and end inside blocks.
  for (int64_t t = 0; t < c.n;) {
    const int64_t count = std::min<int64_t>(c.n - t, t % 97 == 5 ? 37 : 1);
    const Status st = steps.append(1, SyntheticKvSource(spec, m, t, count), 0);
    ASSERT_TRUE(st.is_ok()) << st.to_string();
    t += count;
  }
  const size_t esize = dtype_size((*cuda)->storage_dtype());
  const size_t row = m.head_dim * esize;
  const auto read_row = [&](const void* base, int64_t index) {
    std::vector<unsigned char> out(row);
    EXPECT_TRUE((*cuda)->download(out.data(), static_cast<const char*>(base) + index * row, row).is_ok());
    return out;
  };
  const LayerShard& a = bulk.find(1)->layers[0];
  const LayerShard& b = steps.find(1)->layers[0];
  const int64_t last_block = (c.n - 1 - rc.sink_tokens) / rc.chunk_tokens;
  for (int64_t t = 0; t < c.n; ++t) {
    for (int g = 0; g < m.kv_heads; ++g) {
      for (bool values : {false, true}) {
        SCOPED_TRACE("token " + std::to_string(t) + " head " + std::to_string(g) + (values ? " v" : " k"));
        if (t < rc.sink_tokens) {
          const Buffer& sa = values ? a.sink_v : a.sink_k;
          const Buffer& sb = values ? b.sink_v : b.sink_k;
          ASSERT_EQ(read_row(sa.data(), g * rc.sink_tokens + t), read_row(sb.data(), g * rc.sink_tokens + t));
          continue;
        }
        const int64_t block = (t - rc.sink_tokens) / rc.chunk_tokens;
        const int64_t at = g * rc.chunk_tokens + (t - rc.sink_tokens) % rc.chunk_tokens;
        ASSERT_EQ(read_row(bulk.home_block(a, values, block), at), read_row(steps.home_block(b, values, block), at));
        if (block > last_block - ring_blocks(rc)) {
          ASSERT_EQ(read_row(bulk.ring_block(a, values, block), at), read_row(steps.ring_block(b, values, block), at));
        }
      }
    }
  }
}

}  // namespace
}  // namespace reattn
