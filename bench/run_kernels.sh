#!/usr/bin/env bash
# One device call for issue 14's kernels: build test_cuda_backend and kernel_bench, run the GPU
# tests, the kernel benchmark and its same-run torch baselines, an Nsight Compute profile of
# the query-block scoring kernel, and print a short table. Logs and JSON under $OUT.
# Usage: bench/run_kernels.sh   (TESTS_ONLY=1: build and test only; NCU=0: no profile)
set -uo pipefail
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
LOG="$OUT/run.log"
: >"$LOG"
say() { echo "$@" | tee -a "$LOG"; }
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,driver_version --format=csv,noheader | tee -a "$LOG"
t0=$SECONDS
GEN=()
[ -f build-gpu/CMakeCache.txt ] || GEN=(-G Ninja)
if ! { cmake -S . -B build-gpu "${GEN[@]}" -DREATTN_CUDA=ON -DCMAKE_BUILD_TYPE=Release &&
       cmake --build build-gpu -j "$(nproc)" --target test_cuda_backend kernel_bench; } >"$OUT/build.log" 2>&1; then
  grep -E "error|Error" "$OUT/build.log" | head -20
  tail -20 "$OUT/build.log"
  exit 1
fi
say "build: $((SECONDS - t0)) s"
build-gpu/tests/test_cuda_backend ${GTEST_FILTER:+--gtest_filter=$GTEST_FILTER} >"$OUT/tests.log" 2>&1
tests_rc=$?
grep -E "^\[ +(OK|FAILED|PASSED|SKIPPED) +\]|Failure|Expected|Which is|got \(" "$OUT/tests.log" | head -60 | tee -a "$LOG"
grep -E "^\[ error \]" "$OUT/tests.log" | sort -t: -k2 -g | tail -6 | tee -a "$LOG"
say "tests rc=$tests_rc ($((SECONDS - t0)) s)"
[ "${TESTS_ONLY:-0}" = 1 ] && exit $tests_rc
build-gpu/bench/kernel_bench --json "$OUT/kernels.json" 2>&1 | tee -a "$LOG"
python3 bench/torch_baselines.py --json "$OUT/torch.json" 2>&1 | tee -a "$LOG"
say "bench: $((SECONDS - t0)) s"
if [ "${NCU:-1}" = 1 ] && command -v ncu >/dev/null; then
  ncu --clock-control none -k regex:score_gemm_kernel --launch-skip 2 --launch-count 1 \
    --section SpeedOfLight --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
    --section WarpStateStats --section Occupancy --section LaunchStats \
    build-gpu/bench/kernel_bench --skip-decode --skip-attend --qlens 1024 --repeat 1 >"$OUT/ncu_score.txt" 2>&1
  grep -E "Duration|Compute \(SM\) Throughput|Memory Throughput|L2 Cache Throughput|DRAM Throughput|Executed Ipc|Issue Slots Busy|Registers Per|Achieved Occupancy|Stall|No Eligible|One or More" "$OUT/ncu_score.txt" | head -30 | tee -a "$LOG"
  # The attention kernel at qlen 1024 (launches: qlen 1 scalar; qlen 128 x 3 calls x 2 variants).
  ncu --clock-control none -k regex:attend_mma_kernel --launch-skip 6 --launch-count 1 \
    --section SpeedOfLight --section ComputeWorkloadAnalysis --section WarpStateStats --section Occupancy \
    build-gpu/bench/kernel_bench --skip-decode --skip-score --repeat 1 >"$OUT/ncu_attend.txt" 2>&1
  grep -E "attend_mma_kernel|Duration|Compute \(SM\) Throughput|L2 Cache Throughput|Issue Slots Busy|Registers Per|Achieved Occupancy" "$OUT/ncu_attend.txt" | head -12 | tee -a "$LOG"
  say "ncu: $((SECONDS - t0)) s"
fi
python3 bench/kernel_report.py --kernels "$OUT/kernels.json" --torch "$OUT/torch.json" --out "$OUT" 2>&1 | tee -a "$LOG"
exit $tests_rc
