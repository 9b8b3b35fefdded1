#!/usr/bin/env bash
# One device call for the bulk path of a layer step (issue 10): builds reattn-server and
# reattn-copy-probe (build-gpu), measures this machine's copy ceilings (memcpy, MPI
# point-to-point between two ranks, loopback TCP), then bench/prefill_overhead.py with 4096-token
# steps on 1 and on 2 ranks (the time outside the service, split by the server's log), and the
# qlen-1 step at 1M tokens on one GPU, the adapter's tests, and with E2E_TOKENS=N the LLaMA-shaped
# model through reattn on 2 ranks (parity, then an N-token prompt). Summary in $OUT/prefill_path.log, every log in
# $OUT/prefill_path_logs.tgz.   Usage: bash bench/run_prefill_path.sh   (on nvidia-h200-x2)
set -uo pipefail
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 PYTHONUNBUFFERED=1
OUT=${OUT:-bench/out}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
L="$OUT/logs"
mkdir -p "$L"
LOG="$OUT/prefill_path.log"
: >"$LOG"
say() { echo "$@" | tee -a "$LOG"; }
t0=$SECONDS
if ! { cmake -S . -B build-gpu -G Ninja -DREATTN_CUDA=ON -DCMAKE_BUILD_TYPE=Release &&
       cmake --build build-gpu -j "$(nproc)" --target reattn-server reattn-copy-probe; } >"$L/build.log" 2>&1; then
  grep -E "error" "$L/build.log" | head -20
  exit 1
fi
python3 -m pip install -q --no-deps --no-build-isolation ./clients/python >"$L/pip.log" 2>&1 ||
  export PYTHONPATH="$PWD/clients/python${PYTHONPATH:+:$PYTHONPATH}"
say "build: $((SECONDS - t0)) s; $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1) x$(nvidia-smi -L | wc -l)"
say "mpi btl: $(ompi_info 2>/dev/null | grep -E 'MCA btl' | awk '{print $3}' | tr '\n' ' ')"
say "copy probe (2 ranks): $(timeout 60 mpirun -np 2 build-gpu/bench/reattn-copy-probe --mib 64 --reps 10 2>&1 | tail -1)"
say "loopback tcp: $(timeout 60 python3 bench/loopback_probe.py --mib 64 --reps 8 2>&1 | tail -1)"
for ranks in 1 2; do
  timeout 120 python3 bench/prefill_overhead.py --server build-gpu/reattn-server --backend cuda --ranks $ranks \
    --qlen 4096 --calls 8 --logs "$L/prefill_r$ranks" >"$L/prefill_r$ranks.log" 2>&1
  say "prefill step, $ranks rank(s): rc=$? $(tail -2 "$L/prefill_r$ranks.log" | tr '\n' ' ')"
done
timeout 100 python3 bench/step_overhead.py --server build-gpu/reattn-server --ranks 1 --tokens 1048576 \
  --variants step_binary --logs "$L/step_server" --json "$OUT/step_overhead.json" >"$L/step_overhead.log" 2>&1
say "qlen-1 step, 1 rank, 1M tokens: rc=$? $(grep -vE '^\{' "$L/step_overhead.log" | tail -3 | tr '\n' ' ')"
timeout 200 python3 tests/python/test_hf_adapter.py --server build-gpu/reattn-server >"$L/hf_adapter.log" 2>&1
say "hf adapter tests (the pinned GPU path too): rc=$? $(tail -1 "$L/hf_adapter.log")"
if [ "${E2E_TOKENS:-0}" -gt 0 ]; then
  timeout 300 python3 bench/model_e2e.py --server build-gpu/reattn-server --ranks 2 --kinds llama \
    --prompt-tokens "$E2E_TOKENS" --progress 16 --json "$OUT/model_e2e_llama.json" >"$L/model_e2e.log" 2>&1
  say "model e2e, 2 ranks, $E2E_TOKENS tokens: rc=$? $(tail -7 "$L/model_e2e.log")"
fi
say "done: $((SECONDS - t0)) s"
tar -C "$OUT" -czf "$OUT/prefill_path_logs.tgz" logs && rm -rf "$L"
