// Span recall on the CUDA backend (one GPU) against the CPU backend and the fp64 reference:
// token top-k scoring (score_tokens), attention over recalled token ranges at their layout
// positions, llama3 RoPE scaling in the GPU's RoPE table, and copy_ranges. Odd sizes: blocks
// that are no multiple of 64 keys, odd span widths, spans clipped at the mid's ends and across
// blocks, G = 1 and G > 1, bf16 and f16, head_dim 64 and 128, tail and detached.
// Skips where no GPU is visible.
#include <gtest/gtest.h>

#include <algorithm>
#include <string>
#include <vector>

#include "common/synthetic.h"
#include "kernels/cpu/cpu_backend.h"
#include "kernels/cuda/cuda_backend.h"
#include "tests/cuda_test.h"
#include "tests/harness.h"
#include "tests/reference.h"

namespace reattn {
namespace {

struct SpanCase {
  int head_dim = 128;
  int q_heads = 8;
  int kv_heads = 2;
  int64_t chunk = 64;
  int64_t n = 3001;
  int64_t qlen = 1;
  int top_k = 3;
  int64_t span = 32;
  int64_t max_tokens = 20;
  QueryMode mode = QueryMode::kTail;
  DType dtype = DType::kBF16;
  bool llama3 = false;

  std::string name() const {
    return "D" + std::to_string(head_dim) + " H" + std::to_string(q_heads) + "/" + std::to_string(kv_heads) + " C" +
           std::to_string(chunk) + " n" + std::to_string(n) + " qlen" + std::to_string(qlen) + " k" +
           std::to_string(top_k) + " s" + std::to_string(span) + " R" + std::to_string(max_tokens) + " " +
           query_mode_name(mode) + " " + dtype_name(dtype) + (llama3 ? " llama3" : "");
  }
};

Config make_config(const SpanCase& c) {
  Config cfg;
  cfg.model.layers = 1;
  cfg.model.q_heads = c.q_heads;
  cfg.model.kv_heads = c.kv_heads;
  cfg.model.head_dim = c.head_dim;
  cfg.model.rope_theta = c.llama3 ? 500000.0 : 10000.0;
  if (c.llama3) cfg.model.rope_scaling = RopeScaling{RopeScalingType::kLlama3, 8.0, 1.0, 4.0, 256};
  cfg.reattention.sink_tokens = 16;
  cfg.reattention.local_window = 200;
  cfg.reattention.chunk_tokens = c.chunk;
  cfg.reattention.top_k = c.top_k;
  cfg.reattention.recall = RecallMode::kSpan;
  cfg.reattention.span_tokens = c.span;
  cfg.reattention.max_recall_tokens = c.max_tokens;
  cfg.model.scope = 16 + c.max_tokens * c.span + 200 + c.chunk;
  cfg.backend.storage_dtype = c.dtype;
  cfg.backend.threads = 2;
  return cfg;
}

// Needles at the mid's first and last token (clipped spans), at a block's last token (a span
// across blocks), and two close together (overlapping spans).
std::vector<int64_t> needles_for(const SpanCase& c) {
  const Regions r = compute_regions(c.n, make_config(c).reattention);
  if (r.num_chunks == 0) return {};
  const int64_t middle = r.chunk_first_token(r.num_chunks / 2);
  return {r.chunk_first_token(0), middle - 1, middle + 5, r.mid_end - 1};
}

test::PipelineResult run_query(Backend& backend, const Config& cfg, const SpanCase& c, const SyntheticSpec& spec,
                               const std::vector<float>& q, FinalAttention strategy) {
  return test::run_synthetic_query(backend, cfg, spec, c.n, q, c.qlen, c.mode, strategy);
}

void check_case(const SpanCase& c) {
  SCOPED_TRACE(c.name());
  const Config cfg = make_config(c);
  ASSERT_TRUE(cfg.validate().is_ok()) << cfg.validate().to_string();
  const SyntheticSpec spec{7 + static_cast<uint64_t>(c.n), needles_for(c)};
  const std::vector<float> q = synthetic_query(spec, cfg.model, 0, c.qlen);
  const ref::Context ctx = ref::synthetic_context(cfg.model, cfg.reattention, c.n, spec.seed, spec.needles, 0);
  const ref::Result want = ref::query(ctx, q, c.qlen, c.mode);
  Expected<std::unique_ptr<Backend>> cuda = make_cuda_backend(cfg, 0);
  ASSERT_TRUE(cuda.is_ok()) << cuda.status().to_string();
  CpuBackend cpu(2);
  // Query blocks (qlen > 1) attend on the tensor cores with q and the probabilities rounded to
  // f16 (2^-11 each): measured up to 1.3e-3 in f16 storage (detached, qlen 64, H200).
  const double tol = c.dtype == DType::kBF16 ? 6e-3 : (c.qlen > 1 ? 2e-3 : 1e-3);
  for (FinalAttention strategy : {FinalAttention::kGather, FinalAttention::kPartial}) {
    const test::PipelineResult got = run_query(**cuda, cfg, c, spec, q, strategy);
    const test::PipelineResult cpu_got = run_query(cpu, cfg, c, spec, q, strategy);
    ASSERT_TRUE(got.status.is_ok()) << got.status.to_string();
    ASSERT_TRUE(cpu_got.status.is_ok()) << cpu_got.status.to_string();
    EXPECT_FALSE(want.spans.empty());
    EXPECT_EQ(got.recalled_spans, want.spans);
    EXPECT_EQ(got.recalled_spans, cpu_got.recalled_spans);
    EXPECT_LT(ref::relative_error(got.out, want.out), tol) << "cuda vs fp64 reference";
    EXPECT_LT(ref::relative_error(cpu_got.out, want.out), 1e-4) << "cpu vs fp64 reference";
  }
}

TEST(CudaSpan, MatchesReference) {
  SKIP_WITHOUT_GPU();
  std::vector<SpanCase> cases;
  SpanCase c;
  cases.push_back(c);                                       // decode, bf16, D128, G=4
  c.qlen = 16; c.span = 7; cases.push_back(c);              // odd span, prefill-sized block
  c.qlen = 64; c.mode = QueryMode::kDetached; c.dtype = DType::kF16; cases.push_back(c);
  c = SpanCase{}; c.head_dim = 64; c.q_heads = 4; c.kv_heads = 4; c.chunk = 40; c.n = 2477; cases.push_back(c);  // G=1, C=40
  c = SpanCase{}; c.top_k = 6; c.max_tokens = 5; c.qlen = 3; cases.push_back(c);   // the cap binds
  c = SpanCase{}; c.chunk = 24; c.span = 33; c.n = 1999; c.qlen = 5; cases.push_back(c);  // spans over several blocks
  c = SpanCase{}; c.llama3 = true; c.qlen = 4; cases.push_back(c);  // llama3 RoPE table
  for (const SpanCase& s : cases) check_case(s);
}

// copy_ranges against a host copy: ranges of odd sizes and alignments into one buffer.
TEST(CudaSpan, CopyRangesMatchesHost) {
  SKIP_WITHOUT_GPU();
  Config cfg = make_config(SpanCase{});
  Expected<std::unique_ptr<Backend>> cuda = make_cuda_backend(cfg, 0);
  ASSERT_TRUE(cuda.is_ok()) << cuda.status().to_string();
  Backend& b = **cuda;
  std::vector<unsigned char> src(1 << 20);
  for (size_t i = 0; i < src.size(); ++i) src[i] = static_cast<unsigned char>(i * 131 + (i >> 9));
  Expected<Buffer> dsrc = b.allocate(src.size());
  ASSERT_TRUE(dsrc.is_ok());
  ASSERT_TRUE(b.upload(dsrc->data(), src.data(), src.size()).is_ok());
  const int64_t pieces[][2] = {{0, 256}, {4096, 40000}, {3, 17}, {123456, 1}, {700000, 300000}, {16, 16}};
  std::vector<CopyRange> ranges;
  std::vector<unsigned char> want;
  int64_t max_bytes = 0;
  for (const auto& p : pieces) {
    ranges.push_back({dsrc->as<char>() + p[0], static_cast<int64_t>(want.size()), p[1]});
    want.insert(want.end(), src.begin() + p[0], src.begin() + p[0] + p[1]);
    max_bytes = std::max(max_bytes, p[1]);
  }
  Expected<Buffer> dranges = b.allocate(ranges.size() * sizeof(CopyRange));
  Expected<Buffer> ddst = b.allocate(want.size());
  ASSERT_TRUE(dranges.is_ok() && ddst.is_ok());
  ASSERT_TRUE(b.upload(dranges->data(), ranges.data(), ranges.size() * sizeof(CopyRange)).is_ok());
  CopyRangesParams p;
  p.ranges = dranges->as<const CopyRange>();
  p.count = static_cast<int64_t>(ranges.size());
  p.max_range_bytes = max_bytes;
  p.dst = ddst->data();
  ASSERT_TRUE(b.copy_ranges(p).is_ok());
  std::vector<unsigned char> got(want.size());
  ASSERT_TRUE(b.download(got.data(), ddst->data(), got.size()).is_ok());
  EXPECT_TRUE(got == want);
}

}  // namespace
}  // namespace reattn
