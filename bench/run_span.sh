#!/usr/bin/env bash
# Span recall on the GPU machine, in one call (about 3-4 minutes on 2x H200): build the span
# CUDA tests and benchmark, run the span tests on one GPU and the two-GPU parity test in both
# recall modes, then time span against chunk recall for decode (qlen 1) at 1M and 4M tokens of
# one LLaMA-3-8B-shaped layer, on one GPU and on two: the scoring kernel alone and its share of
# a read-bandwidth probe measured in the same run, the step's score phase, and the query end to
# end. Prints a table; logs and JSON go to $OUT (default bench/out-span).
# The CUDA architecture is the one kernels/cuda/CMakeLists.txt sets (Hopper).
# Usage: bash bench/run_span.sh [TOKENS]   (default 1048576,4194304; BENCH_TWO=0: no 2-GPU timing)
set -uo pipefail
cd "$(dirname "$0")/.."
# NVLink multicast stays off everywhere (it can take a shared host's GPUs out of service).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
OUT=${OUT:-bench/out-span}
TOKENS=${1:-1048576,4194304}
mkdir -p "$OUT"
LOG="$OUT/run.log"
: >"$LOG"
say() { echo "$@" | tee -a "$LOG"; }

nvidia-smi --query-gpu=index,name,memory.total,clocks.sm,clocks.mem,driver_version --format=csv | tee -a "$LOG"
GPUS=$(nvidia-smi -L | wc -l)
MPIRUN=(mpirun -np 2 --bind-to none -x NCCL_NVLS_ENABLE)

t0=$SECONDS
B=${BUILD_DIR:-build-gpu}
GEN=()
[ -f "$B/CMakeCache.txt" ] || GEN=(-G Ninja)
if ! timeout 240 cmake -S . -B "$B" "${GEN[@]}" -DREATTN_CUDA=ON -DCMAKE_BUILD_TYPE=Release >"$OUT/build.log" 2>&1 ||
   ! timeout 240 cmake --build "$B" -j "$(nproc)" --target test_cuda_span test_cuda_distributed reattn-bench-span \
     >>"$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log" | tee -a "$LOG"
  exit 1
fi
say "build: $((SECONDS - t0)) s"

TESTS="$OUT/tests.log"
: >"$TESTS"
timeout 120 "$B"/tests/test_cuda_span 2>&1 | tee -a "$TESTS" |
  grep -E "^\[  (PASSED|FAILED|  OK|SKIPPED) |FAILED|Failure|error|Expected|Which is|actual" | head -40 | tee -a "$LOG"
one_rc=${PIPESTATUS[0]}
two_span_rc=skipped
two_chunk_rc=skipped
if [ "$GPUS" -ge 2 ]; then
  timeout 120 "${MPIRUN[@]}" "$B"/tests/test_cuda_distributed --recall span 2>&1 | tee -a "$TESTS" | tail -14 | tee -a "$LOG"
  two_span_rc=${PIPESTATUS[0]}
  timeout 120 "${MPIRUN[@]}" "$B"/tests/test_cuda_distributed 2>&1 | tee -a "$TESTS" | tail -3 | tee -a "$LOG"
  two_chunk_rc=${PIPESTATUS[0]}
fi
say "tests: 1-GPU span rc=$one_rc, 2-GPU span rc=$two_span_rc, 2-GPU chunk rc=$two_chunk_rc ($((SECONDS - t0)) s)"

timeout 120 "$B"/bench/reattn-bench-span --tokens "$TOKENS" --json "$OUT/span1.json" 2>&1 | tee -a "$LOG"
bench1_rc=${PIPESTATUS[0]}
bench2_rc=skipped
if [ "$GPUS" -ge 2 ] && [ "${BENCH_TWO:-1}" = 1 ]; then
  timeout 120 "${MPIRUN[@]}" "$B"/bench/reattn-bench-span --tokens "$TOKENS" --json "$OUT/span2.json" 2>&1 |
    grep -v "^NCCL version" | tee -a "$LOG"
  bench2_rc=${PIPESTATUS[0]}
fi
say "bench: 1-GPU rc=$bench1_rc, 2-GPU rc=$bench2_rc ($((SECONDS - t0)) s)"

# The summary: per size and GPU count, span against chunk recall.
python3 - "$OUT" <<'PY' 2>&1 | tee -a "$LOG"
import json, os, sys
out = sys.argv[1]
rows = []
for name in ("span1.json", "span2.json"):
    path = os.path.join(out, name)
    if not os.path.exists(path):
        continue
    d = json.load(open(path))
    for s in d["sizes"]:
        c, p = s["chunk"], s["span"]
        rows.append({"gpus": d["world"], "tokens": s["tokens"], "read_bw_gb_per_s": d["read_bandwidth_gb_per_s"],
                     "chunk_score_kernel_ms": c["score_kernel_ms"], "span_score_kernel_ms": p["score_kernel_ms"],
                     "chunk_pct_read_bw": 100 * c["score_fraction_of_read_bw"],
                     "span_pct_read_bw": 100 * p["score_fraction_of_read_bw"],
                     "chunk_step_score_ms": c["step_score_ms"], "span_step_score_ms": p["step_score_ms"],
                     "chunk_query_ms": c["e2e_ms"], "span_query_ms": p["e2e_ms"],
                     "span_over_chunk_query": s["span_over_chunk_e2e"],
                     "needles": c["all_needles_found"] and p["all_needles_found"]})
print("\n| GPUs | tokens | score kernel chunk / span (ms) | % of read BW chunk / span | step score chunk / span (ms) | query chunk / span (ms) | span/chunk query | needles |")
print("|---|---|---|---|---|---|---|---|")
for r in rows:
    print("| %d | %dK | %.3f / %.3f | %.1f%% / %.1f%% | %.3f / %.3f | %.3f / %.3f | %.3f | %s |" % (
        r["gpus"], r["tokens"] // 1024, r["chunk_score_kernel_ms"], r["span_score_kernel_ms"], r["chunk_pct_read_bw"],
        r["span_pct_read_bw"], r["chunk_step_score_ms"], r["span_step_score_ms"], r["chunk_query_ms"],
        r["span_query_ms"], r["span_over_chunk_query"], "ok" if r["needles"] else "MISSED"))
json.dump({"rows": rows}, open(os.path.join(out, "span-summary.json"), "w"), indent=2)
PY
say "total: $((SECONDS - t0)) s"
[ "$one_rc" = 0 ] && { [ "$two_span_rc" = skipped ] || [ "$two_span_rc" = 0 ]; } && [ "$bench1_rc" = 0 ]
