#!/usr/bin/env python3
"""Checks reattn-bench-grid's CSV and JSON (after running it under mpirun, with --bench): one row per grid point (tokens x strategy x qlen x
batch), every column present and numeric where it should be, latencies positive and ordered
(p50 <= p99), and needles_ok true everywhere. Exits non-zero naming the first problem.
Standard library only.

    check_grid_output.py --csv out.csv --json out.json --tokens 4K,16K --qlen 1,16 \
        --batch 1,4 --strategy gather,partial --ranks 2 \
        [--bench build/reattn-bench-grid --mpirun mpirun --config configs/tiny.yaml --iters 3]
"""

import argparse
import csv
import itertools
import json
import os
import subprocess
import sys
import time

from sizes import parse_tokens  # noqa: E402  (bench/ is the script directory)

COLUMNS = ["tokens", "ranks", "strategy", "qlen", "batch", "p50_ms", "p99_ms", "score_ms", "merge_ms", "attn_ms",
           "keys_GBps", "pct_read_bw", "queries_per_s", "needles_ok"]
POSITIVE = ["p50_ms", "p99_ms", "score_ms", "keys_GBps", "pct_read_bw", "queries_per_s"]


def fail(msg):
    print("check_grid_output: FAIL: " + msg)
    sys.exit(1)


def check_row(where, row, ranks):
    for c in COLUMNS:
        if c not in row or row[c] in (None, ""):
            fail("%s: column %s missing" % (where, c))
    if str(row["needles_ok"]).lower() != "true":
        fail("%s: needles_ok is %s" % (where, row["needles_ok"]))
    if int(row["ranks"]) != ranks:
        fail("%s: ranks %s, expected %d" % (where, row["ranks"], ranks))
    for c in POSITIVE:
        if not float(row[c]) > 0:
            fail("%s: %s = %s, expected > 0" % (where, c, row[c]))
    for c in ("merge_ms", "attn_ms"):
        if float(row[c]) < 0:
            fail("%s: %s = %s is negative" % (where, c, row[c]))
    if float(row["p50_ms"]) > float(row["p99_ms"]):
        fail("%s: p50 %s > p99 %s" % (where, row["p50_ms"], row["p99_ms"]))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--csv", required=True)
    ap.add_argument("--json", required=True)
    ap.add_argument("--tokens", required=True)
    ap.add_argument("--qlen", required=True)
    ap.add_argument("--batch", required=True)
    ap.add_argument("--strategy", required=True)
    ap.add_argument("--ranks", type=int, required=True)
    ap.add_argument("--bench", help="run this reattn-bench-grid first, writing --csv and --json")
    ap.add_argument("--mpirun", default="mpirun")
    ap.add_argument("--config")
    ap.add_argument("--iters", default="3")
    a = ap.parse_args()
    if a.bench:
        cmd = [a.mpirun, "-np", str(a.ranks), "--oversubscribe", a.bench, "--config", a.config, "--tokens", a.tokens,
               "--qlen", a.qlen, "--batch", a.batch, "--strategy", a.strategy, "--warmup", "1", "--iters", a.iters,
               "--csv", a.csv, "--json", a.json, "--label", "ctest bench_cpu_smoke"]
        env = dict(os.environ)
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        t0 = time.time()
        p = subprocess.run(cmd, env=env, timeout=240)
        print("check_grid_output: %s exited %d after %.1f s" % (" ".join(cmd), p.returncode, time.time() - t0))
        if p.returncode != 0:
            fail("reattn-bench-grid exited %d" % p.returncode)
    expected = set(itertools.product([parse_tokens(t) for t in a.tokens.split(",")], a.strategy.split(","),
                                     [int(q) for q in a.qlen.split(",")], [int(b) for b in a.batch.split(",")]))

    with open(a.csv, newline="") as f:
        rows = list(csv.DictReader(f))
    missing = [c for c in COLUMNS if rows and c not in rows[0]]
    if missing:
        fail("CSV lacks columns %s" % missing)
    got = set()
    for i, r in enumerate(rows):
        check_row("CSV row %d" % (i + 1), r, a.ranks)
        got.add((int(r["tokens"]), r["strategy"], int(r["qlen"]), int(r["batch"])))
    if got != expected or len(rows) != len(expected):
        fail("CSV grid points %s, expected %s" % (sorted(got), sorted(expected)))

    with open(a.json) as f:
        doc = json.load(f)
    for key in ("device", "backend", "ranks", "read_bw_gbs", "columns", "contexts", "rows"):
        if key not in doc:
            fail("JSON lacks %s" % key)
    if [c for c in COLUMNS if c not in doc["columns"]]:
        fail("JSON columns %s lack some of %s" % (doc["columns"], COLUMNS))
    if doc["ranks"] != a.ranks or not doc["read_bw_gbs"] > 0:
        fail("JSON ranks %s / read_bw_gbs %s" % (doc["ranks"], doc["read_bw_gbs"]))
    jgot = set()
    for i, r in enumerate(doc["rows"]):
        check_row("JSON row %d" % (i + 1), r, a.ranks)
        if len(r.get("latency_ms", [])) != r.get("iters"):
            fail("JSON row %d: %d latencies for %s iters" % (i + 1, len(r.get("latency_ms", [])), r.get("iters")))
        jgot.add((r["tokens"], r["strategy"], r["qlen"], r["batch"]))
    if jgot != expected or len(doc["rows"]) != len(expected):
        fail("JSON grid points %s, expected %s" % (sorted(jgot), sorted(expected)))
    if len(doc["contexts"]) != len({t for t, _, _, _ in expected}):
        fail("JSON contexts: %d, expected one per size" % len(doc["contexts"]))
    print("check_grid_output: ok: %d rows, every column, needles recalled everywhere" % len(rows))


if __name__ == "__main__":
    main()
