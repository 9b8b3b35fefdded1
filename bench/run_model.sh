#!/usr/bin/env bash
# One device call for the model path (issue 10) and the append path (issue 9) on the GPU
# machine: the transformers adapter's tests, a random-weight LLaMA-3-8B-shaped and a
# Qwen2-1.5B-shaped model through reattn (parity with the model's own eager attention, a long
# prompt prefilled in 4096-token steps, 64 decoded tokens), the qlen-1 step overhead at the
# client, and the append throughput of a 64 MiB BF16 body. Needs build-gpu (bench/run_gpu.sh
# builds it; BUILD=1 here builds it too). Logs and JSON under $OUT.
# Usage: bench/run_model.sh [PROMPT_TOKENS]   (default 1048576; RANKS=2 on two GPUs)
set -uo pipefail
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 PYTHONUNBUFFERED=1
OUT=${OUT:-bench/out}
PROMPT=${1:-1048576}
RANKS=${RANKS:-1}
SERVER=build-gpu/reattn-server
mkdir -p "$OUT"
LOG="$OUT/model.log"
: >"$LOG"
say() { echo "$@" | tee -a "$LOG"; }
t0=$SECONDS
if [ "${BUILD:-0}" = 1 ]; then
  { cmake -S . -B build-gpu -G Ninja -DREATTN_CUDA=ON -DCMAKE_BUILD_TYPE=Release &&
    cmake --build build-gpu -j "$(nproc)" --target reattn-server; } >"$OUT/build-model.log" 2>&1 ||
    { tail -30 "$OUT/build-model.log"; exit 1; }
fi
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$LOG"
python3 -m pip install -q --no-deps --no-build-isolation ./clients/python >"$OUT/pip.log" 2>&1 ||
  export PYTHONPATH="$PWD/clients/python${PYTHONPATH:+:$PYTHONPATH}"
python3 tests/python/test_hf_adapter.py --server "$SERVER" >"$OUT/hf_adapter.log" 2>&1
hf_rc=$?
say "hf adapter tests: rc=$hf_rc ($(tail -1 "$OUT/hf_adapter.log")) $((SECONDS - t0)) s"
timeout 330 python3 bench/model_e2e.py --server "$SERVER" --ranks "$RANKS" --kinds llama --prompt-tokens "$PROMPT" \
  --progress 64 --json "$OUT/model_e2e_llama.json" 2>&1 | tee "$OUT/model_e2e_llama.log" | tail -20 | tee -a "$LOG"
timeout 150 python3 bench/model_e2e.py --server "$SERVER" --ranks "$RANKS" --kinds qwen2 --prompt-tokens $((PROMPT / 4)) \
  --progress 0 --json "$OUT/model_e2e_qwen2.json" 2>&1 | tee "$OUT/model_e2e_qwen2.log" | tail -12 | tee -a "$LOG"
say "model e2e: $((SECONDS - t0)) s"
timeout 120 python3 bench/step_overhead.py --server "$SERVER" --ranks "$RANKS" --tokens 1048576 \
  --json "$OUT/step_overhead.json" 2>&1 | tee "$OUT/step_overhead.log" | tail -12 | tee -a "$LOG"
timeout 90 python3 bench/append_throughput.py --server "$SERVER" --ranks "$RANKS" --backend cuda \
  --json "$OUT/append_gpu.json" 2>&1 | tee "$OUT/append.log" | tail -4 | tee -a "$LOG"
say "done: $((SECONDS - t0)) s"
[ "$hf_rc" = 0 ]
