// Two (or more) ranks under mpirun, one GPU each: the CUDA backend with the NCCL communicator
// against the CPU backend with MPI on the same ranks, and against the fp64 reference, for both
// final-attention strategies, both owners, tail and detached queries, qlen 1 to 64, odd n.
// Prints "N passed, M failed" on rank 0 and exits non-zero on any mismatch (on every rank).
// Without a GPU per rank it prints a skip line and exits 77 (CTest's SKIP_RETURN_CODE).
// `--recall span` runs the same cases in span recall (token top-k widened to spans).
#include <mpi.h>

#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "comm/control.h"
#include "comm/make_communicator.h"
#include "comm/mpi_communicator.h"
#include "common/synthetic.h"
#include "kernels/cpu/cpu_backend.h"
#include "kernels/cuda/cuda_backend.h"
#include "run/mpi_program.h"
#include "tests/harness.h"
#include "tests/reference.h"
#include "worker/kv_store.h"
#include "worker/step.h"

namespace reattn {
namespace {

struct Case {
  int64_t n;
  int64_t qlen;
  QueryMode mode;
  FinalAttention strategy;
  int owner;
  DType dtype;
};

Config make_config(DType dtype, RecallMode recall) {
  Config cfg;
  cfg.model.layers = 1;
  cfg.model.q_heads = 8;
  cfg.model.kv_heads = 2;
  cfg.model.head_dim = 128;
  cfg.model.rope_theta = 500000.0;
  cfg.reattention.sink_tokens = 16;
  cfg.reattention.local_window = 300;
  cfg.reattention.chunk_tokens = 64;
  cfg.reattention.top_k = 3;
  cfg.reattention.max_recall_chunks = 5;
  cfg.model.scope = 16 + 5 * 64 + 300 + 64;
  if (recall == RecallMode::kSpan) {
    cfg.reattention.recall = recall;
    cfg.reattention.span_tokens = 31;  // odd; spans cross blocks and so ranks
    cfg.reattention.max_recall_tokens = 7;
    cfg.model.scope = 16 + 7 * 31 + 300 + 64;
  }
  cfg.backend.storage_dtype = dtype;
  cfg.backend.threads = 2;
  return cfg;
}

// One query on every rank, run twice; the result lands on rank 0. The last 5 tokens come in a
// second append.
test::PipelineResult run_query(Backend& backend, Communicator& comm, const Config& cfg, const Case& c,
                               const SyntheticSpec& spec, const std::vector<float>& q) {
  const SyntheticKvSource head(spec, cfg.model, 0, c.n - 5), tail(spec, cfg.model, c.n - 5, 5);
  test::PipelineCase pc;
  pc.mode = c.mode;
  pc.strategy = c.strategy;
  pc.owner_rank = c.owner;
  pc.repeats = 2;
  return test::run_pipeline(backend, comm, cfg, {&head, &tail}, q, c.qlen, pc);
}

std::string join(const std::vector<int64_t>& v) {
  std::string s;
  for (int64_t x : v) s += (s.empty() ? "" : ",") + std::to_string(x);
  return s;
}

std::string join(const std::vector<std::pair<int64_t, int64_t>>& v) {
  std::string s;
  for (const auto& [a, b] : v) s += (s.empty() ? "" : ",") + std::to_string(a) + "-" + std::to_string(b);
  return s;
}

// Contexts owned by rank 0 and the last rank; queries mixing them, both layers, qlen 1 to 200,
// tail and detached, and a decode batch. On rank 0, *why names the first mismatch.
Status run_batch_case(const Control& control, FinalAttention strategy, int64_t device_rows, std::string* why) {
  Config cfg = make_config(DType::kBF16, RecallMode::kChunk);
  cfg.model.layers = 2;
  std::vector<test::BatchContext> contexts;
  for (const auto& [n, owner] : {std::pair<int64_t, int>{5003, 0}, {4501, control.world() - 1}}) {
    const Regions regions = compute_regions(n, cfg.reattention);
    contexts.push_back({n, owner,
                        SyntheticSpec{static_cast<uint64_t>(n),
                                      {regions.chunk_first_token(1) + 7, regions.chunk_first_token(regions.num_chunks / 2 + 1),
                                       regions.chunk_first_token(regions.num_chunks - 2) + 63}}});
  }
  std::vector<test::BatchQuery> queries = {{0, 0, 64, QueryMode::kTail},    {1, 0, 1, QueryMode::kTail},
                                           {0, 1, 9, QueryMode::kDetached}, {1, 1, 200, QueryMode::kTail},
                                           {0, 0, 1, QueryMode::kDetached}};
  for (int b = 0; b < 8; ++b) queries.push_back({1, 0, 1, QueryMode::kTail});
  Expected<std::unique_ptr<Backend>> cuda = make_cuda_backend(cfg, control.local_rank());
  REATTN_RETURN_IF_ERROR(control.agree(cuda.status()));
  Expected<std::unique_ptr<Communicator>> nccl = make_communicator(**cuda, control);
  REATTN_RETURN_IF_ERROR(control.agree(nccl.status()));
  const test::BatchRun gpu =
      test::run_batch_and_alone(**cuda, **nccl, cfg, contexts, queries, strategy, StepOptions{device_rows});
  REATTN_RETURN_IF_ERROR(control.agree(gpu.status));
  CpuBackend cpu(cfg.backend.threads);
  MpiCommunicator mpi;
  const test::BatchRun host = test::run_batch_and_alone(cpu, mpi, cfg, contexts, queries, strategy, StepOptions{device_rows});
  REATTN_RETURN_IF_ERROR(control.agree(host.status));
  if (control.rank() != 0) return Status::ok();
  for (size_t i = 0; i < queries.size() && why->empty(); ++i) {
    const test::BatchQuery& bq = queries[i];
    const test::BatchContext& bc = contexts[bq.context];
    const ref::Context ctx =
        ref::synthetic_context(cfg.model, cfg.reattention, bc.n, bc.spec.seed, bc.spec.needles, bq.layer);
    const ref::Result want = ref::query(ctx, gpu.q[i], bq.qlen, bq.mode);
    const QueryResult &got = gpu.batch[i], &one = gpu.alone[i], &cpu_got = host.batch[i];
    const std::string q = "query " + std::to_string(i) + ": ";
    if (!got.status.is_ok() || !one.status.is_ok() || !cpu_got.status.is_ok()) {
      *why = q + got.status.to_string() + " / " + one.status.to_string() + " / " + cpu_got.status.to_string();
    } else if (got.recalled != want.recalled || one.recalled != want.recalled || cpu_got.recalled != want.recalled) {
      *why = q + "recalled batch [" + join(got.recalled) + "] alone [" + join(one.recalled) + "] cpu [" +
             join(cpu_got.recalled) + "] ref [" + join(want.recalled) + "]";
    } else if (!(ref::relative_error(got.out, std::vector<double>(one.out.begin(), one.out.end())) < 1e-6)) {
      *why = q + "batch and alone outputs differ";
    } else if (!(ref::relative_error(got.out, want.out) < 6e-3)) {
      *why = q + "relative error " + std::to_string(ref::relative_error(got.out, want.out));
    }
  }
  return Status::ok();
}

int run_all(const Control& control, RecallMode recall) {
  int passed = 0, failed = 0;
  std::vector<Case> cases;
  for (FinalAttention strategy : {FinalAttention::kGather, FinalAttention::kPartial}) {
    for (int owner = 0; owner < std::min(2, control.world()); ++owner) {
      cases.push_back({4099, 1, QueryMode::kTail, strategy, owner, DType::kBF16});
      cases.push_back({5003, 64, QueryMode::kTail, strategy, owner, DType::kBF16});
      cases.push_back({4501, 9, QueryMode::kDetached, strategy, owner, DType::kF16});
    }
  }
  for (size_t ci = 0; ci < cases.size(); ++ci) {
    const Case& c = cases[ci];
    const Config cfg = make_config(c.dtype, recall);
    const Regions regions = compute_regions(c.n, cfg.reattention);
    const SyntheticSpec spec{100 + ci,
                             {regions.chunk_first_token(1) + 7, regions.chunk_first_token(regions.num_chunks / 2 + 1),
                              regions.chunk_first_token(regions.num_chunks - 2) + 63}};
    const std::vector<float> q = synthetic_query(spec, cfg.model, 0, c.qlen);

    Expected<std::unique_ptr<Backend>> cuda = make_cuda_backend(cfg, control.local_rank());
    Status st = control.agree(cuda.status());
    test::PipelineResult gpu, host;
    if (st.is_ok()) {
      Expected<std::unique_ptr<Communicator>> nccl = make_communicator(**cuda, control);
      st = control.agree(nccl.status());
      if (st.is_ok()) {
        gpu = run_query(**cuda, **nccl, cfg, c, spec, q);
        st = control.agree(gpu.status);
      }
    }
    if (st.is_ok()) {
      CpuBackend cpu(cfg.backend.threads);
      MpiCommunicator mpi;
      host = run_query(cpu, mpi, cfg, c, spec, q);
      st = control.agree(host.status);
    }
    bool ok = st.is_ok();
    std::string why = st.is_ok() ? "" : st.to_string();
    if (ok && control.rank() == 0) {
      const ref::Context ctx = ref::synthetic_context(cfg.model, cfg.reattention, c.n, spec.seed, spec.needles, 0);
      const ref::Result want = ref::query(ctx, q, c.qlen, c.mode);
      // The same bound as the one-GPU test (worst seen on 2x H200: 4.7e-6).
      const double tol = c.dtype == DType::kBF16 ? 6e-3 : 1e-3;
      const double err = ref::relative_error(gpu.out, want.out);
      const double cpu_err = ref::relative_error(host.out, want.out);
      if (gpu.recalled_spans != want.spans || gpu.recalled_spans != host.recalled_spans) {
        ok = false;
        why = "spans cuda [" + join(gpu.recalled_spans) + "] cpu [" + join(host.recalled_spans) + "] ref [" +
              join(want.spans) + "]";
      } else if (gpu.recalled != want.recalled || gpu.recalled != host.recalled) {
        ok = false;
        why = "recalled cuda [" + join(gpu.recalled) + "] cpu [" + join(host.recalled) + "] ref [" +
              join(want.recalled) + "]";
      } else if (!(err < tol)) {
        ok = false;
        why = "cuda relative error " + std::to_string(err) + " >= " + std::to_string(tol);
      } else if (!(cpu_err < 1e-4)) {
        ok = false;
        why = "cpu relative error " + std::to_string(cpu_err);
      }
      std::printf("%s case %zu: n=%lld qlen=%lld %s %s owner=%d %s err=%.2e%s%s\n", ok ? "PASS" : "FAIL", ci,
                  static_cast<long long>(c.n), static_cast<long long>(c.qlen), query_mode_name(c.mode),
                  final_attention_name(c.strategy), c.owner, dtype_name(c.dtype), err, ok ? "" : " : ",
                  why.c_str());
      std::fflush(stdout);
    }
    int flag = ok ? 1 : 0;
    MPI_Bcast(&flag, 1, MPI_INT, 0, MPI_COMM_WORLD);
    (flag ? passed : failed)++;
    if (!st.is_ok()) break;  // a device fault: stop
  }
  // Batches: the GPUs (NCCL) running a mixed batch as one step against each query alone, the
  // CPU backend's batch (MPI) and the reference; selection on the device, or on the host.
  // (Chunk recall: span selection always runs on the host.)
  for (FinalAttention strategy : {FinalAttention::kGather, FinalAttention::kPartial}) {
    if (recall != RecallMode::kChunk) break;
    for (int64_t device_rows : {int64_t{1}, int64_t{1} << 40}) {
      std::string why;
      const Status st = run_batch_case(control, strategy, device_rows, &why);
      const bool ok = st.is_ok() && why.empty();
      if (control.rank() == 0) {
        std::printf("%s batch %s device_select_rows=%lld%s%s\n", ok ? "PASS" : "FAIL", final_attention_name(strategy),
                    static_cast<long long>(device_rows), ok ? "" : " : ", st.is_ok() ? why.c_str() : st.to_string().c_str());
        std::fflush(stdout);
      }
      int flag = ok ? 1 : 0;
      MPI_Bcast(&flag, 1, MPI_INT, 0, MPI_COMM_WORLD);
      (flag ? passed : failed)++;
      if (!st.is_ok()) break;
    }
  }
  if (control.rank() == 0) std::printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}

}  // namespace
}  // namespace reattn

int main(int argc, char** argv) {
  using namespace reattn;
  return mpi_main("test_cuda_distributed", argc, argv, [](Control& control, int argc, char** argv) {
    int gpus = cuda_device_count();
    int enough = gpus > control.local_rank() ? 1 : 0;
    int all_enough = 0;
    MPI_Allreduce(&enough, &all_enough, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
    if (!all_enough) {
      if (control.rank() == 0) std::printf("SKIPPED: not every rank has a GPU of its own (rank 0 sees %d)\n", gpus);
      return 77;
    }
    const bool span = argc > 2 && std::string(argv[1]) == "--recall" && std::string(argv[2]) == "span";
    return run_all(control, span ? RecallMode::kSpan : RecallMode::kChunk);
  });
}
