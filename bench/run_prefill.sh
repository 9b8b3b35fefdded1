#!/usr/bin/env bash
# One device call for issue 14's step-side goals (items 2 and 4 wired into the worker step):
# builds reattn-bench-grid and test_cuda_backend (-G Ninja, -j16), runs the batch and selection
# GPU tests, then on one GPU (and on two under mpirun when two are visible):
#   (a) 32 decode queries of one 4M-token context as one step vs one query per step
#       (queries/s ratio; goal >= 10x), q rounded to bf16 values as a model's q is;
#   (b) a 1M-token prefill of one LLaMA-3-8B-shaped layer (configs/llama3-8b.yaml) in 4096-token
#       layer steps (append + tail query), total time and the phase split; the merge phase
#       (candidate allgather + selection) at qlen 4096 is read from its last 32 steps (goal <= 1 ms).
# Prints a short table; JSON, CSV and logs go to $OUT (default bench/out).
# Knobs: PREFILL_TOKENS (1M), PREFILL_SAMPLE (1 GPU; 0: time all steps; N: N evenly spaced steps,
# the rest filled synthetically and the total estimated as mean step x steps, marked "estimated"),
# PREFILL_SAMPLE_2GPU (32, to stay within ~4 minutes), BATCH_TOKENS (4M), TESTS (1: the batch and
# selection GPU tests first), TWO_GPU (1 when two GPUs are visible).
set -uo pipefail
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 PYTHONUNBUFFERED=1
OUT=${OUT:-bench/out}
PREFILL_TOKENS=${PREFILL_TOKENS:-1M}
PREFILL_SAMPLE=${PREFILL_SAMPLE:-0}
PREFILL_SAMPLE_2GPU=${PREFILL_SAMPLE_2GPU:-32}
BATCH_TOKENS=${BATCH_TOKENS:-4M}
mkdir -p "$OUT"
LOG="$OUT/run.log"
: >"$LOG"
say() { echo "$@" | tee -a "$LOG"; }
nvidia-smi --query-gpu=index,name,memory.total,clocks.sm,clocks.mem,driver_version --format=csv,noheader | tee -a "$LOG"
GPUS=$(nvidia-smi -L 2>/dev/null | wc -l)
TWO_GPU=${TWO_GPU:-$([ "$GPUS" -ge 2 ] && echo 1 || echo 0)}
t0=$SECONDS
GEN=()
[ -f build-gpu/CMakeCache.txt ] || GEN=(-G Ninja)
TARGETS=(reattn-bench-grid)
[ "${TESTS:-1}" = 1 ] && TARGETS+=(test_cuda_backend)
[ "${TESTS:-1}" = 1 ] && [ "$TWO_GPU" = 1 ] && TARGETS+=(test_cuda_distributed)
if ! { cmake -S . -B build-gpu "${GEN[@]}" -DREATTN_CUDA=ON -DCMAKE_BUILD_TYPE=Release &&
       cmake --build build-gpu -j 16 --target "${TARGETS[@]}"; } >"$OUT/build.log" 2>&1; then
  grep -E "error" "$OUT/build.log" | head -20
  tail -20 "$OUT/build.log"
  exit 1
fi
say "build: $((SECONDS - t0)) s"
tests_rc=skipped
fail=0
if [ "${TESTS:-1}" = 1 ]; then
  build-gpu/tests/test_cuda_backend --gtest_filter='CudaBatch*:CudaBackend.MergeSelect*:CudaSelect*' >"$OUT/tests.log" 2>&1
  tests_rc=$?
  [ "$tests_rc" = 0 ] || fail=1
  grep -E "^\[ +(OK|FAILED|PASSED|SKIPPED) +\]|Failure|Expected|Which is" "$OUT/tests.log" | head -40 | tee -a "$LOG"
  if [ "$TWO_GPU" = 1 ]; then
    mpirun -np 2 --bind-to none -x NCCL_NVLS_ENABLE build-gpu/tests/test_cuda_distributed >"$OUT/tests-2gpu.log" 2>&1
    rc=$?
    [ "$rc" = 0 ] || { tests_rc=$rc; fail=1; }
    grep -E "^(FAIL|PASS) batch|passed, .* failed" "$OUT/tests-2gpu.log" | tee -a "$LOG"
  fi
  say "tests rc=$tests_rc ($((SECONDS - t0)) s)"
fi

GRID=build-gpu/bench/reattn-bench-grid
CFG=configs/llama3-8b.yaml
run_set() {  # $1: label (1gpu / 2gpu); $2: prefill steps timed (0: all); the rest: launcher prefix
  local tag=$1 sample=$2
  shift 2
  "$@" "$GRID" --config "$CFG" --backend cuda --tokens "$BATCH_TOKENS" --qlen 1 --batch 1,32 --strategy gather --bf16-q \
    --warmup 3 --iters 20 --json "$OUT/batch-$tag.json" --csv "$OUT/batch-$tag.csv" --label "batch $tag" \
    >"$OUT/batch-$tag.log" 2>&1
  local rc=$?
  [ "$rc" = 0 ] || fail=1
  grep -vE "^#\s*$" "$OUT/batch-$tag.log" | tail -4 | tee -a "$LOG"
  say "batch $tag rc=$rc ($((SECONDS - t0)) s)"
  "$@" "$GRID" --config "$CFG" --backend cuda --mode prefill --prefill-tokens "$PREFILL_TOKENS" --prefill-step 4096 \
    --prefill-sample "$sample" --json "$OUT/prefill-$tag.json" --csv "$OUT/prefill-$tag.csv" \
    --label "prefill $tag" >"$OUT/prefill-$tag.log" 2>&1
  rc=$?
  [ "$rc" = 0 ] || fail=1
  grep -E "^# prefill" "$OUT/prefill-$tag.log" | tee -a "$LOG"
  tail -3 "$OUT/prefill-$tag.log" | grep -v "^# prefill" | tee -a "$LOG"
  say "prefill $tag rc=$rc ($((SECONDS - t0)) s)"
  # Same-run baseline of the merge phase: host selection (every query below the threshold) at
  # 4 sampled steps, the last at the full length.
  "$@" "$GRID" --config "$CFG" --backend cuda --mode prefill --prefill-tokens "$PREFILL_TOKENS" --prefill-step 4096 \
    --prefill-sample 4 --device-select-rows 1000000000000 --json "$OUT/prefill-host-$tag.json" \
    --csv "$OUT/prefill-host-$tag.csv" --label "prefill host selection $tag" >"$OUT/prefill-host-$tag.log" 2>&1
  rc=$?
  [ "$rc" = 0 ] || fail=1
  tail -2 "$OUT/prefill-host-$tag.log" | tee -a "$LOG"
  say "prefill host-selection baseline $tag rc=$rc ($((SECONDS - t0)) s)"
}
run_set 1gpu "$PREFILL_SAMPLE"
if [ "$TWO_GPU" = 1 ]; then
  run_set 2gpu "$PREFILL_SAMPLE_2GPU" mpirun -np 2 --bind-to none -x NCCL_NVLS_ENABLE
else
  say "2-GPU runs skipped: $GPUS GPU(s) visible"
fi

python3 - "$OUT" "$TWO_GPU" <<'PY' 2>&1 | tee -a "$LOG"
import csv, json, os, statistics, sys
out = sys.argv[1]
table = []
for tag in ("1gpu", "2gpu") if sys.argv[2] == "1" else ("1gpu",):
    try:
        rows = json.load(open(os.path.join(out, f"batch-{tag}.json")))["rows"]
        by_batch = {r["batch"]: r for r in rows}
        b1, b32 = by_batch[1], by_batch[32]
        table.append((tag, "batch 32 vs 1, qlen 1, %d tokens" % b1["tokens"],
                      "%.0f vs %.0f queries/s = %.2fx (goal >= 10x); p50 %.3f vs %.3f ms, score %.3f vs %.3f ms"
                      % (b32["queries_per_s"], b1["queries_per_s"], b32["queries_per_s"] / b1["queries_per_s"],
                         b32["p50_ms"], b1["p50_ms"], b32["score_ms"], b1["score_ms"])))
    except (OSError, KeyError, ValueError) as e:
        table.append((tag, "batch", "missing (%s)" % e))
    try:
        p = json.load(open(os.path.join(out, f"prefill-{tag}.json")))["prefill"]
        s = p["summary"]
        table.append((tag, "prefill %d tokens, %d-token steps" % (s["tokens"], s["step_tokens"]),
                      "%s%.2f s (%.0f tokens/s): score %.2f, merge %.2f, attn %.2f, append %.2f s; %d/%d steps timed"
                      % ("estimated " if s["estimated"] else "", s["total_s"], s["tokens_per_s"], s["score_s"],
                         s["merge_s"], s["attn_s"], s["append_s"], s["measured_steps"], s["steps"])))
        last = [r["merge_ms"] for r in p["steps"]][-32:]
        table.append((tag, "merge phase at qlen %d (last %d timed steps, up to %d tokens)" % (s["step_tokens"], len(last),
                                                                                         s["tokens"]),
                      "median %.3f ms, max %.3f ms (goal <= 1 ms)" % (statistics.median(last), max(last))))
        host = json.load(open(os.path.join(out, f"prefill-host-{tag}.json")))["prefill"]["steps"]
        device = {r["step"]: r for r in p["steps"]}
        pairs = [(device[h["step"]], h) for h in host if h["step"] in device and h["step"] > 0]
        table.append((tag, "merge phase, device vs host selection (same run)",
                      "; ".join("%d tokens: %.3f vs %.3f ms = %.1fx" % (h["tokens"], d["merge_ms"], h["merge_ms"],
                                                                        h["merge_ms"] / max(d["merge_ms"], 1e-9))
                                for d, h in pairs)))
    except (OSError, KeyError, ValueError) as e:
        table.append((tag, "prefill", "missing (%s)" % e))
w = max(len(t[1]) for t in table)
for tag, what, result in table:
    print("%-5s %-*s  %s" % (tag, w, what, result))
with open(os.path.join(out, "summary.csv"), "w", newline="") as f:
    csv.writer(f).writerows([("gpus", "what", "result")] + table)
PY
say "total: $((SECONDS - t0)) s"
exit $fail
