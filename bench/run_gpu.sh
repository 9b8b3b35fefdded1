#!/usr/bin/env bash
# The GPU machine in one call: build every CUDA target once (build-gpu), run every GPU test
# (one GPU; two under mpirun when two are visible, with the fault-injection tests on the NCCL
# path), then the benchmarks, each against baselines it measures in the same run, and print a
# short table. Each section keeps its own logs and JSON under $OUT/<section>; everything is
# also packed into $OUT/results.tgz (the device tool returns at most 8 files).
#   bash bench/run_gpu.sh                      # all sections
#   SECTIONS="tests prefill span" bash bench/run_gpu.sh
# Sections: tests, decode (bench/run_decode.sh), kernels (bench/run_kernels.sh: kernel goals
# and Nsight Compute), span (bench/run_span.sh), prefill (bench/run_prefill.sh), model
# (bench/run_model.sh: transformers through the service, step overhead, append throughput).
set -uo pipefail
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 PYTHONUNBUFFERED=1
OUT=${OUT:-bench/out}
SECTIONS=${SECTIONS:-tests decode span prefill model}
mkdir -p "$OUT"
LOG="$OUT/summary.log"
: >"$LOG"
say() { echo "$@" | tee -a "$LOG"; }
nvidia-smi --query-gpu=index,name,memory.total,clocks.sm,clocks.mem,driver_version --format=csv,noheader | tee -a "$LOG"
GPUS=$(nvidia-smi -L 2>/dev/null | wc -l)
t0=$SECONDS
declare -A RC

GEN=()
[ -f build-gpu/CMakeCache.txt ] || GEN=(-G Ninja)
if ! { cmake -S . -B build-gpu "${GEN[@]}" -DREATTN_CUDA=ON -DCMAKE_BUILD_TYPE=Release &&
       cmake --build build-gpu -j "$(nproc)"; } >"$OUT/build.log" 2>&1; then
  grep -E "error" "$OUT/build.log" | head -20
  tail -20 "$OUT/build.log"
  exit 1
fi
say "build: $((SECONDS - t0)) s"

for section in $SECTIONS; do
  s0=$SECONDS
  mkdir -p "$OUT/$section"
  case "$section" in
    tests)
      # One GPU here; the 2-GPU parity tests run in the span section, the NCCL fault tests
      # (two GPUs, about 80 s) with FAULTS=1.
      EXCLUDE='distributed|faults'
      [ "${FAULTS:-0}" = 1 ] && EXCLUDE='distributed'
      (cd build-gpu && timeout 300 ctest -R 'cuda' -E "$EXCLUDE" --output-on-failure) >"$OUT/tests/ctest.log" 2>&1
      RC[tests]=$?
      grep -E "Test +#|tests passed|tests failed" "$OUT/tests/ctest.log" | tee -a "$LOG" ;;
    decode) OUT="$OUT/decode" timeout 300 bash bench/run_decode.sh >"$OUT/decode/stdout.log" 2>&1; RC[decode]=$?
      tail -12 "$OUT/decode/stdout.log" | tee -a "$LOG" ;;
    kernels) OUT="$OUT/kernels" timeout 400 bash bench/run_kernels.sh >"$OUT/kernels/stdout.log" 2>&1; RC[kernels]=$?
      tail -30 "$OUT/kernels/stdout.log" | tee -a "$LOG" ;;
    span) OUT="$OUT/span" timeout 300 bash bench/run_span.sh "${SPAN_TOKENS:-1048576,4194304}" >"$OUT/span/stdout.log" 2>&1
      RC[span]=$?
      tail -12 "$OUT/span/stdout.log" | tee -a "$LOG" ;;
    prefill) OUT="$OUT/prefill" TESTS=0 timeout 300 bash bench/run_prefill.sh >"$OUT/prefill/stdout.log" 2>&1
      RC[prefill]=$?
      tail -20 "$OUT/prefill/stdout.log" | tee -a "$LOG" ;;
    model) OUT="$OUT/model" timeout 500 bash bench/run_model.sh "${MODEL_PROMPT_TOKENS:-262144}" >"$OUT/model/stdout.log" 2>&1
      RC[model]=$?
      tail -14 "$OUT/model/stdout.log" | tee -a "$LOG" ;;
    *) say "unknown section '$section'"; RC[$section]=2 ;;
  esac
  say "== $section: rc=${RC[$section]} ($((SECONDS - s0)) s)"
  tar czf "$OUT/results.tgz" -C "$OUT" --exclude results.tgz . 2>/dev/null
done
say "total: $((SECONDS - t0)) s"
fail=0
for section in "${!RC[@]}"; do [ "${RC[$section]}" = 0 ] || fail=1; done
exit $fail
