#!/usr/bin/env bash
# The decode section of bench/run_gpu.sh: build the CUDA backend, run its tests (1 GPU, and 2 GPUs under mpirun when
# there are two), time the decode benchmark and torch's full-attention baseline, and print a
# table. Logs and JSON go to $OUT (default bench/out). Usage: bench/run_decode.sh [TOKENS]
# (TESTS_ONLY=1: build and run the GPU tests only).
set -uo pipefail
cd "$(dirname "$0")/.."
# NVLink multicast stays off everywhere (it can take a shared host's GPUs out of service).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 PYTHONUNBUFFERED=1
OUT=${OUT:-bench/out}
TOKENS=${1:-262144,1048576,4194304}
mkdir -p "$OUT"
LOG="$OUT/run.log"
: >"$LOG"
say() { echo "$@" | tee -a "$LOG"; }

nvidia-smi --query-gpu=index,name,memory.total,clocks.sm,clocks.mem,driver_version --format=csv | tee -a "$LOG"
GPUS=$(nvidia-smi -L | wc -l)
MPIRUN=(mpirun -np 2 --bind-to none -x NCCL_NVLS_ENABLE)

t0=$SECONDS
# Keep the generator of an existing build-gpu (another run may have configured it).
GEN=()
[ -f build-gpu/CMakeCache.txt ] || GEN=(-G Ninja)
if ! { cmake -S . -B build-gpu "${GEN[@]}" -DREATTN_CUDA=ON -DCMAKE_BUILD_TYPE=Release &&
       cmake --build build-gpu -j "$(nproc)" --target test_cuda_backend test_cuda_distributed reattn-bench-decode; } \
     >"$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"
  exit 1
fi
say "build: $((SECONDS - t0)) s"

TESTS="$OUT/tests.log"
: >"$TESTS"
build-gpu/tests/test_cuda_backend 2>&1 | tee -a "$TESTS" | grep -E "^\[  (PASSED|FAILED|  OK|SKIPPED) |FAILED|Failure|error" | tee -a "$LOG"
one_rc=${PIPESTATUS[0]}
two_rc=skipped
if [ "$GPUS" -ge 2 ]; then
  "${MPIRUN[@]}" build-gpu/tests/test_cuda_distributed 2>&1 | tee -a "$TESTS" | tail -14 | tee -a "$LOG"
  two_rc=${PIPESTATUS[0]}
fi
say "tests: 1-GPU rc=$one_rc, 2-GPU rc=$two_rc ($((SECONDS - t0)) s)"
if [ "${TESTS_ONLY:-0}" = 1 ]; then
  [ "$one_rc" = 0 ] && { [ "$two_rc" = skipped ] || [ "$two_rc" = 0 ]; }
  exit
fi

python3 bench/torch_sdpa.py --tokens "$TOKENS" --json "$OUT/torch.json" 2>&1 | tee -a "$LOG"
build-gpu/bench/reattn-bench-decode --tokens "$TOKENS" --json "$OUT/bench1.json" 2>&1 | tee -a "$LOG"
TWO=()
if [ "$GPUS" -ge 2 ]; then
  "${MPIRUN[@]}" build-gpu/bench/reattn-bench-decode --tokens "$TOKENS" --json "$OUT/bench2.json" 2>&1 | tee -a "$LOG"
  "${MPIRUN[@]}" build-gpu/bench/reattn-bench-decode --tokens "$TOKENS" --final-attention partial \
    --json "$OUT/bench2p.json" 2>&1 | tee -a "$LOG"
  TWO=(--two "$OUT/bench2.json" --two-partial "$OUT/bench2p.json")
fi
say "bench done ($((SECONDS - t0)) s)"
python3 bench/report.py --one "$OUT/bench1.json" "${TWO[@]}" --torch "$OUT/torch.json" \
  --tests "1-GPU rc=$one_rc, 2-GPU rc=$two_rc" --out "$OUT" 2>&1 | tee -a "$LOG"
# The timings are kept either way; a failed GPU test fails the script.
[ "$one_rc" = 0 ] && { [ "$two_rc" = skipped ] || [ "$two_rc" = 0 ]; }
