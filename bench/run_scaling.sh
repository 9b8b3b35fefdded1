#!/usr/bin/env bash
# One device call on nvidia-h200-x2 (must end inside ~9 minutes): build reattn-bench-grid and
# reattn-server, then
#   1. reattn-bench-grid on 1 GPU and on 2 GPUs, one layer of LLaMA-3.1-8B shapes: 64K..4M tokens
#      (8M on 2 GPUs), qlen 1, batch 1/8/32, gather and partial: strong scaling (4M on 1 and 2
#      GPUs), weak scaling (2M and 4M per GPU), the 4M LLaMA layer, queries/s per batch;
#   2. reattn-server on 2 GPUs with Qwen2-1.5B shapes (bench/configs/qwen2-1.5b-2gpu.yaml):
#      a 4M-token context of all 28 layers, needles at 9 depths, every layer queried over HTTP
#      (bench/qwen_http_needles.py), then concurrent-client bursts;
#   3. the qlen sweep (1/16/128, batch 1/8, gather and partial) at 1M tokens on 1 and 2 GPUs (last: skipped if
#      the time is short).
# Every phase runs under a time limit taken from what is left of the budget; a phase that
# fails is logged and the rest still run. Results in $OUT (default bench/out): scaling.csv,
# scaling.json, qwen-needles.json, run.log, logs.tar.gz. A short table is printed last.
#
# DRY_RUN=1 runs the same logic on the CPU backend with tiny shapes and small sizes, using an
# existing build in $BUILD (no cmake), for checking the script without a GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
# NVLink multicast stays off everywhere (it can take a shared host's GPUs out of service).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 PYTHONUNBUFFERED=1
OUT=${OUT:-bench/out}
BUILD=${BUILD:-build-gpu}
BUDGET_S=${BUDGET_S:-555}
DRY_RUN=${DRY_RUN:-0}
mkdir -p "$OUT"
LOGS="$OUT/logs"
mkdir -p "$LOGS"
LOG="$OUT/run.log"
: >"$LOG"
say() { echo "$@" | tee -a "$LOG"; }
left() { echo $((BUDGET_S - SECONDS)); }

if [ "$DRY_RUN" = 1 ]; then
  LLAMA=configs/tiny.yaml
  QWEN=bench/configs/tiny-needles.yaml
  MAIN_TOKENS_1=16K,64K
  MAIN_TOKENS_2=16K,64K,128K
  QLEN_TOKENS=64K
  QLENS=1,16,32   # tiny's local window is 32
  QWEN_TOKENS=256K
  ITERS=5
  WARMUP=1
  EXTRA=(--backend cpu)
  MPI=(mpirun --oversubscribe --bind-to none)
else
  LLAMA=configs/llama3-8b.yaml
  QWEN=bench/configs/qwen2-1.5b-2gpu.yaml
  MAIN_TOKENS_1=64K,256K,1M,2M,4M
  MAIN_TOKENS_2=64K,256K,1M,2M,4M,8M
  QLEN_TOKENS=1M
  QLENS=1,16,128
  QWEN_TOKENS=4M
  ITERS=30
  WARMUP=5
  EXTRA=(--backend cuda)
  MPI=(mpirun --bind-to none -x NCCL_NVLS_ENABLE -x NCCL_DEBUG)
  export NCCL_DEBUG=WARN
fi

if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=index,name,memory.total,clocks.sm,clocks.mem,driver_version --format=csv | tee -a "$LOG"
fi
say "host: $(nproc) cores; budget ${BUDGET_S} s; dry run: $DRY_RUN"

if [ "$DRY_RUN" != 1 ]; then
  GEN=()
  [ -f "$BUILD/CMakeCache.txt" ] || GEN=(-G Ninja)
  if ! { cmake -S . -B "$BUILD" "${GEN[@]}" -DREATTN_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DCMAKE_BUILD_TYPE=Release \
           -DBUILD_TESTING=OFF &&
         cmake --build "$BUILD" -j "$(nproc)" --target reattn-bench-grid reattn-server; } >"$LOGS/build.log" 2>&1; then
    tail -40 "$LOGS/build.log"
    tar -C "$OUT" -czf "$OUT/logs.tar.gz" logs && rm -rf "$LOGS"
    exit 1
  fi
fi
say "build: $SECONDS s"
BENCH="$BUILD/bench/reattn-bench-grid"
SERVER="$BUILD/reattn-server"

# bench NAME NP SECONDS ITERS ARGS...: one reattn-bench-grid grid; CSV/JSON into $LOGS/NAME.*
bench() {
  local name=$1 np=$2 limit=$3 iters=$4
  shift 4
  if [ "$limit" -lt 20 ]; then
    say "[$name] skipped: ${limit} s left"
    return 1
  fi
  say "[$name] mpirun -np $np reattn-bench-grid $* (limit ${limit} s, at ${SECONDS} s)"
  timeout -k 10 "$limit" "${MPI[@]}" -np "$np" "$BENCH" "${EXTRA[@]}" --warmup "$WARMUP" --iters "$iters" \
    --csv "$LOGS/$name.csv" --json "$LOGS/$name.json" --label "$name" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  say "[$name] rc=$rc at ${SECONDS} s"
  return "$rc"
}

# 1. The main grid: 1 GPU, then 2 GPUs. Reserve time for the HTTP run and the qlen sweep.
MAIN=(--config "$LLAMA" --layers-resident 1 --qlen 1 --batch 1,8,32 --strategy gather,partial --comm-probe)
bench main-1gpu 1 $(( $(left) - 250 > 150 ? 150 : $(left) - 250 )) "$ITERS" "${MAIN[@]}" --tokens "$MAIN_TOKENS_1"
bench main-2gpu 2 $(( $(left) - 180 > 130 ? 130 : $(left) - 180 )) "$ITERS" "${MAIN[@]}" --tokens "$MAIN_TOKENS_2"

# 2. Qwen2-1.5B shapes over HTTP on 2 GPUs.
qwen_limit=$(( $(left) - 20 > 220 ? 220 : $(left) - 20 ))
if [ "$qwen_limit" -ge 60 ]; then
  PORT=18080
  say "[qwen] reattn-server -np 2 --config $QWEN (limit ${qwen_limit} s, at ${SECONDS} s)"
  setsid "${MPI[@]}" -np 2 --oversubscribe "$SERVER" --config "$QWEN" --listen "127.0.0.1:$PORT" "${EXTRA[@]}" \
    >"$LOGS/server.log" 2>&1 &
  MPIRUN_PID=$!
  MEMWATCH_PID=
  if command -v nvidia-smi >/dev/null; then
    (while sleep 3; do echo "$SECONDS $(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | tr '\n' ' ')"; done) \
      >"$LOGS/gpu-mem.log" 2>&1 &
    MEMWATCH_PID=$!
  fi
  ready=0
  for _ in $(seq 1 240); do
    if python3 -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:$PORT/health/ready', timeout=2)" 2>/dev/null; then
      ready=1
      break
    fi
    kill -0 "$MPIRUN_PID" 2>/dev/null || break
    sleep 0.5
  done
  say "[qwen] ready=$ready at ${SECONDS} s"
  if [ "$ready" = 1 ]; then
    timeout -k 5 $(( qwen_limit - 30 )) python3 bench/qwen_http_needles.py --url "http://127.0.0.1:$PORT" \
      --tokens "$QWEN_TOKENS" --repeats 3 --concurrency 1,8,32 --burst-queries 256 \
      --json "$OUT/qwen-needles.json" --label "qwen2-1.5b shapes, 2 ranks" 2>&1 | tee -a "$LOG"
    say "[qwen] rc=${PIPESTATUS[0]} at ${SECONDS} s"
  fi
  # Stop: SIGTERM to rank 0 (its pid is in the "listening" log line) drains and exits 0.
  RANK0=$(python3 -c "
import json, sys
for line in open('$LOGS/server.log', errors='replace'):
    try:
        r = json.loads(line)
    except ValueError:
        continue
    if r.get('msg') == 'listening' and r.get('rank') == 0:
        print(r['pid']); break" 2>/dev/null)
  [ -n "$RANK0" ] && kill -TERM "$RANK0" 2>/dev/null
  for _ in $(seq 1 60); do kill -0 "$MPIRUN_PID" 2>/dev/null || break; sleep 0.5; done
  if kill -0 "$MPIRUN_PID" 2>/dev/null; then
    say "[qwen] server did not stop in 30 s; killing its process group"
    kill -KILL -- "-$MPIRUN_PID" 2>/dev/null
  fi
  wait "$MPIRUN_PID" 2>/dev/null
  say "[qwen] server exit=$? at ${SECONDS} s"
  if [ -n "$MEMWATCH_PID" ]; then
    kill "$MEMWATCH_PID" 2>/dev/null
    say "[qwen] peak GPU memory used (MiB, per GPU): $(awk '{for (i = 2; i <= NF; ++i) if ($i > m[i]) m[i] = $i} END {for (i = 2; i in m; ++i) printf "%s ", m[i]}' "$LOGS/gpu-mem.log")"
  fi
else
  say "[qwen] skipped: ${qwen_limit} s left"
fi

# 3. qlen sweep at one size.
QLEN=(--config "$LLAMA" --layers-resident 1 --tokens "$QLEN_TOKENS" --qlen "$QLENS" --batch 1,8 --strategy gather,partial)
bench qlen-1gpu 1 $(( ($(left) - 15) / 2 )) $(( ITERS / 2 )) "${QLEN[@]}"
bench qlen-2gpu 2 $(( $(left) - 15 )) $(( ITERS / 2 )) "${QLEN[@]}"

# Collect: one CSV and one JSON with every run; the rest of the logs in one tarball.
python3 - "$LOGS" "$OUT" <<'EOF' 2>&1 | tee -a "$LOG"
import csv, glob, json, os, sys
logs, out = sys.argv[1], sys.argv[2]
runs, rows, header = [], [], None
for name in ("main-1gpu", "main-2gpu", "qlen-1gpu", "qlen-2gpu"):
    j, c = os.path.join(logs, name + ".json"), os.path.join(logs, name + ".csv")
    if os.path.exists(j):
        runs.append(json.load(open(j)))
    if os.path.exists(c):
        with open(c, newline="") as f:
            r = csv.reader(f)
            h = next(r, None)
            header = header or (["run"] + h if h else None)
            rows += [[name] + x for x in r]
if header:
    with open(os.path.join(out, "scaling.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
json.dump({"runs": runs}, open(os.path.join(out, "scaling.json"), "w"), indent=1)
print("collected %d runs, %d rows" % (len(runs), len(rows)))

# The short table (sizes from 1M up), then the HTTP run.
if header:
    i = {k: header.index(k) for k in header}
    print("\n%-10s %9s %5s %8s %5s %5s %9s %9s %9s %8s %10s %7s" % ("run", "tokens", "ranks", "strategy", "qlen", "batch",
          "p50_ms", "p99_ms", "score_ms", "%readbw", "queries/s", "needles"))
    for r in rows:
        if r[0].startswith("main") and int(r[i["tokens"]]) < (1 << 20):
            continue
        print("%-10s %9s %5s %8s %5s %5s %9s %9s %9s %8s %10s %7s" % (r[0], r[i["tokens"]], r[i["ranks"]], r[i["strategy"]],
              r[i["qlen"]], r[i["batch"]], r[i["p50_ms"]], r[i["p99_ms"]], r[i["score_ms"]], r[i["pct_read_bw"]],
              r[i["queries_per_s"]], r[i["needles_ok"]]))
q = os.path.join(out, "qwen-needles.json")
if os.path.exists(q):
    d = json.load(open(q))
    print("\nqwen: %d tokens x %d layers queried, load %s s; complete: %s; all needles on every layer: %s; p50 %s ms" % (
        d["tokens"], len(d.get("layers", [])), d.get("load_s"), d.get("complete"), d.get("all_needles_found_every_layer"),
        d.get("latency_p50_ms_all_layers")))
    print("  depth%: " + " ".join("%g:%d/%d" % (n["depth_pct"], n["layers_found"], n["layers"]) for n in d.get("needles", [])))
    for b in d.get("concurrency", []):
        print("  %2d clients: %.1f queries/s, mean batch %.1f" % (b["clients"], b["queries_per_s"], b["batch_size"].get("mean", 0)))
EOF
tar -C "$OUT" -czf "$OUT/logs.tar.gz" logs && rm -rf "$LOGS"
say "done at ${SECONDS} s; files: $(ls "$OUT" | tr '\n' ' ')"
