#!/usr/bin/env python3
"""A context survives kill -9 of the whole job: the check that issue 13 asks for once on GPUs
(CTest runs the CPU one, tests/http/test_snapshots.py, with more cases).

reattn-server under mpirun (--ranks, --backend) with a snapshot directory; one context filled
with --tokens synthetic tokens of a config's model (needles included); its answers to a set of
queries (tail and detached, two layers, binary: exact f32 `out` and chunk ids); a snapshot;
SIGKILL to mpirun and every rank; a restart with --restore; the context is back under its id,
with its length, and answers exactly as before. Prints one line per phase (with the snapshot's
and the restore's GB/s); exits 1 on any difference.

    python3 bench/restore_after_kill.py --server build-gpu/reattn-server --backend cuda --ranks 2 \\
        --config configs/qwen2-1.5b.yaml --tokens 262144"""

import argparse
import os
import shutil
import signal
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "http"))
import service_client as sc  # noqa: E402
from reattn_client import Client  # noqa: E402


def answers(client, ctx, model, rng_seed=7):
    """(layer, mode, qlen) -> (out, recalled chunk ids) for a fixed set of queries."""
    rng = np.random.default_rng(rng_seed)
    got = {}
    for layer in (0, model["layers"] - 1):
        for mode, qlen in (("tail", 1), ("tail", 16), ("detached", 4)):
            q = rng.standard_normal((qlen, model["q_heads"], model["head_dim"])).astype(np.float32)
            r = client.query(ctx, layer, q, mode=mode)
            got[(layer, mode, qlen)] = (np.asarray(r.out, dtype=np.float32), [int(c) for c in r.recalled_chunks])
    return got


def server_config(base_path, out_path, backend, tokens):
    """The base config's model and reattention (and storage dtype), with this run's backend and capacity."""
    import yaml
    with open(base_path) as f:
        base = yaml.safe_load(f)
    config = {"model": base["model"], "reattention": base.get("reattention", {}),
              "backend": dict(base.get("backend", {}), kind=backend),
              "capacity": {"tokens_per_rank": max(1 << 20, 2 * tokens), "max_contexts": 16}}
    with open(out_path, "w") as f:
        yaml.safe_dump(config, f)
    return out_path, config["model"]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sc.add_job_args(p)
    p.add_argument("--config", default=os.path.join(HERE, "..", "configs", "tiny.yaml"))
    p.add_argument("--tokens", type=int, default=20000)
    p.add_argument("--dir", default=None, help="work directory (default: a new one under /tmp)")
    args = p.parse_args()

    work = args.dir or tempfile.mkdtemp(prefix="reattn-kill9-")
    snapdir = os.path.join(work, "snapshots")
    os.makedirs(snapdir, exist_ok=True)
    config, model = server_config(args.config, os.path.join(work, "server.yaml"), args.backend, args.tokens)
    extra = ["--snapshot-dir", snapdir]
    fails = 0
    svc = sc.Service(args, config, os.path.join(work, "first.log"), ranks=args.ranks, extra=extra)
    try:
        svc.wait_ready(timeout=300)
        cl = Client("http://127.0.0.1:%d" % svc.port, timeout=600)
        ctx = cl.create_context()["id"]
        needles = [args.tokens // 3, args.tokens // 2]
        cl.synthetic(ctx, args.tokens, seed=5, needles=needles)
        want = answers(cl, ctx, model)
        t0 = time.perf_counter()
        snap = cl.snapshot(ctx, "kill9", timeout=600)
        snap_s = time.perf_counter() - t0
        gb = snap.get("bytes", 0) / 1e9
        print("snapshot: %d tokens, %.2f GB in %.2f s (%.2f GB/s over %d ranks)"
              % (args.tokens, gb, snap_s, gb / snap_s, args.ranks), flush=True)
        os.killpg(svc.proc.pid, signal.SIGKILL)  # the whole job: mpirun and every rank
        svc.proc.wait(timeout=60)
        print("killed the job with SIGKILL", flush=True)
    finally:
        svc.kill()

    t0 = time.perf_counter()
    again = sc.Service(args, config, os.path.join(work, "restart.log"), ranks=args.ranks, extra=extra + ["--restore"])
    try:
        again.wait_ready(timeout=600)
        restore_s = time.perf_counter() - t0
        cl = Client("http://127.0.0.1:%d" % again.port, timeout=600)
        info = cl.context(ctx)
        print("restart with --restore: ready in %.2f s (start-up included; %.2f GB/s); context %d: %d tokens"
              % (restore_s, gb / restore_s, ctx, info["tokens"]), flush=True)
        if info["tokens"] != args.tokens:
            print("FAIL: the context has %d tokens, want %d" % (info["tokens"], args.tokens))
            fails += 1
        got = answers(cl, ctx, model)
        for key, (out, chunks) in want.items():
            g_out, g_chunks = got[key]
            same = g_chunks == chunks and g_out.shape == out.shape and np.array_equal(g_out, out)
            if not same:
                diff = float(np.max(np.abs(g_out - out))) if g_out.shape == out.shape else float("inf")
                print("FAIL: query %s differs after the restore: chunks %s vs %s, max |out diff| %g"
                      % (key, g_chunks, chunks, diff))
                fails += 1
        print("%d queries after kill -9 and --restore: %s" % (len(want), "identical" if not fails else "DIFFERENT"))
    finally:
        again.kill()
    if not args.dir:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
