#!/usr/bin/env bash
# One device call for the qlen-1 step overhead (issue 10, item 2) on one GPU: builds
# reattn-server and test_cuda_backend (build-gpu), runs the CUDA backend tests, then
# bench/step_overhead.py at 1M tokens of one LLaMA-3-8B layer: as configured, then with single
# changes (the step loop's polling off, the client's busy wait, one HTTP thread). BASE=DIR also builds the checkout at DIR
# (DIR/build-base) and runs its own bench/step_overhead.py first: a baseline in the same run.
# JSON and the summary under $OUT, every log (the servers' too) in $OUT/step_overhead_logs.tgz.
# Usage: [BASE=DIR] [TOKENS=N] bash bench/run_step_overhead.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 PYTHONUNBUFFERED=1
OUT=${OUT:-bench/out}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
TOKENS=${TOKENS:-1048576}
L="$OUT/logs"
mkdir -p "$L"
LOG="$OUT/step_overhead_summary.log"
: >"$LOG"
say() { echo "$@" | tee -a "$LOG"; }
t0=$SECONDS
build() {  # build DIR TARGET...
  local dir=$1
  shift
  cmake -S . -B "$dir" -G Ninja -DREATTN_CUDA=ON -DCMAKE_BUILD_TYPE=Release && cmake --build "$dir" -j "$(nproc)" --target "$@"
}
if ! build build-gpu reattn-server test_cuda_backend >"$L/build.log" 2>&1; then
  grep -E "error" "$L/build.log" | head -20
  tail -20 "$L/build.log"
  exit 1
fi
if [ -n "${BASE:-}" ] && ! (cd "$BASE" && build build-base reattn-server) >"$L/build-base.log" 2>&1; then
  say "the baseline at $BASE did not build; no baseline: $(grep -m3 error "$L/build-base.log")"
  BASE=
fi
say "build: $((SECONDS - t0)) s"
timeout 100 build-gpu/tests/test_cuda_backend >"$L/test_cuda_backend.log" 2>&1
tests_rc=$?
say "test_cuda_backend: rc=$tests_rc $(grep -E '^\[  (PASSED|FAILED|SKIPPED) ' "$L/test_cuda_backend.log" | tr '\n' ' ') $((SECONDS - t0)) s"
grep -E '^\[  FAILED  \]' "$L/test_cuda_backend.log" | tee -a "$LOG"
if [ -n "${BASE:-}" ]; then
  (cd "$BASE" && timeout 75 python3 bench/step_overhead.py --server build-base/reattn-server --ranks 1 \
     --tokens "$TOKENS" --logs "$L/server_base" --json "$OUT/step_overhead_base.json") >"$L/step_overhead_base.log" 2>&1
  say "base ($BASE): $(grep -E '^(step_binary|query) ' "$L/step_overhead_base.log")"
fi
# The configuration as shipped (all routes), then single changes to it on step_binary alone:
# the step loop's polling off, the client's busy wait on, one HTTP thread, and the last two.
run() {  # run NAME ARGS...
  local name=$1
  shift
  timeout 75 python3 bench/step_overhead.py --server build-gpu/reattn-server --ranks 1 --tokens "$TOKENS" "$@" \
    --logs "$L/server_$name" --json "$OUT/step_overhead_$name.json" >"$L/step_overhead_$name.log" 2>&1
  say "$name ($*): rc=$? $(grep -vE '^\{' "$L/step_overhead_$name.log" | tail -4)"
}
run default
run poll_off --variants step_binary --busy-poll-us 0
run client_wait --variants step_binary --client-busy-wait 0.002
run one_thread --variants step_binary --http-threads 1
run one_thread_client_wait --variants step_binary --http-threads 1 --client-busy-wait 0.002
say "done: $((SECONDS - t0)) s"
tar -C "$OUT" -czf "$OUT/step_overhead_logs.tgz" logs && rm -rf "$L"
[ "$tests_rc" = 0 ]
