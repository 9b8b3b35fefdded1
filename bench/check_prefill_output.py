#!/usr/bin/env python3
"""Runs reattn-bench-grid --mode prefill under mpirun and checks its JSON and CSV: the timed
steps are the sampled ones, each step's context length is (step + 1) x step tokens, every timed
step recalled at most max_recall_chunks chunks (and some once a mid exists), times are positive,
and the summary adds up. Exits non-zero naming the first problem. Standard library only.

    check_prefill_output.py --bench build/bench/reattn-bench-grid --mpirun mpirun --ranks 2 \
        --config configs/tiny.yaml --tokens 2048 --step 32 --sample 5 --json out.json --csv out.csv
"""

import argparse
import csv
import json
import subprocess
import sys


def fail(msg):
    print("check_prefill_output: FAIL: " + msg)
    sys.exit(1)


def main():
    ap = argparse.ArgumentParser()
    for name in ("--bench", "--mpirun", "--config", "--json", "--csv"):
        ap.add_argument(name, required=True)
    ap.add_argument("--ranks", type=int, required=True)
    ap.add_argument("--tokens", type=int, required=True)
    ap.add_argument("--step", type=int, required=True)
    ap.add_argument("--sample", type=int, required=True)
    a = ap.parse_args()
    cmd = [a.mpirun, "--oversubscribe", "-np", str(a.ranks), a.bench, "--config", a.config, "--backend", "cpu",
           "--mode", "prefill", "--prefill-tokens", str(a.tokens), "--prefill-step", str(a.step),
           "--prefill-sample", str(a.sample), "--json", a.json, "--csv", a.csv]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    print(run.stdout[-3000:])
    if run.returncode != 0:
        fail("bench exited %d: %s" % (run.returncode, run.stderr[-2000:]))
    doc = json.load(open(a.json))
    p, r = doc["prefill"], doc["reattention"]
    s, steps = p["summary"], p["steps"]
    count = a.tokens // a.step
    if s["steps"] != count or s["measured_steps"] != min(a.sample, count) or len(steps) != s["measured_steps"]:
        fail("steps %s, measured %s, rows %d; expected %d and %d" % (s["steps"], s["measured_steps"], len(steps), count,
                                                                     min(a.sample, count)))
    if steps[-1]["step"] != count - 1 or s["estimated"] != (a.sample < count):
        fail("the last step is not timed, or 'estimated' is wrong")
    mid_from = r["sink_tokens"] + r["local_window"] + r["chunk_tokens"]
    for row in steps:
        where = "step %d" % row["step"]
        if row["tokens"] != (row["step"] + 1) * a.step:
            fail("%s: tokens %d" % (where, row["tokens"]))
        if not (row["wall_ms"] > 0 and row["score_ms"] >= 0 and row["merge_ms"] >= 0 and row["attn_ms"] > 0):
            fail("%s: times %s" % (where, row))
        if row["recalled"] > r["max_recall_chunks"] or (row["tokens"] >= mid_from and row["recalled"] == 0):
            fail("%s: recalled %d chunks" % (where, row["recalled"]))
    parts = s["score_s"] + s["merge_s"] + s["attn_s"] + s["append_s"]
    if not (s["total_s"] > 0 and abs(parts - s["total_s"]) <= 1e-6 + 1e-6 * s["total_s"]):
        fail("total %s is not the sum of its phases %s" % (s["total_s"], parts))
    if len(list(csv.DictReader(open(a.csv)))) != len(steps):
        fail("CSV rows differ from the JSON's steps")
    print("check_prefill_output: OK (%d of %d steps timed)" % (len(steps), count))


if __name__ == "__main__":
    main()
