#!/usr/bin/env python3
"""Snapshot and restore throughput, in one run of a reattn-server under mpirun:

  1. fills a context with --tokens synthetic tokens of the config's model (Qwen2-1.5B shapes
     by default: 28 layers, 2 KV heads, head_dim 128) and records the answers to a few queries;
  2. snapshots it (every rank writes its own file, rank 0 the manifest) and times the operation
     from the request to its end;
  3. restores the snapshot into a new context and times that the same way; the restored
     context must answer the queries exactly as the original (same chunks, same out);
  4. reports GB/s of snapshot bytes (all files) over each operation's wall time, in total and
     per rank (each rank writes, and reads back, about 1/ranks of the bytes), and names the
     snapshot directory's file system (df -T);
  5. the baseline, in the same run and directory: `ranks` dd processes at once, each writing
     1/ranks of the snapshot's bytes (8 MiB blocks, conv=fsync) and reading them back; the
     snapshot and restore rates are also given as ratios to these.

    python3 bench/snapshot_throughput.py --server build/reattn-server --ranks 2 --tokens 65536 [--backend cuda]

The CPU backend stores K/V in f32 (4 bytes a value), the CUDA backend in the config's storage
dtype (bf16: 2). The restore reads files that were just written, from the page cache unless
--drop-caches (root, and a kernel that allows it) empties it first; the result says which.
Needs numpy, PyYAML and the Python client (clients/python)."""

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "http"))
sys.path.insert(0, os.path.join(HERE, "..", "clients", "python"))
import service_client as sc  # noqa: E402
from load_throughput import drop_caches  # noqa: E402  (bench/: the same page-cache drop)
from reattn_client import Client  # noqa: E402


def df_line(path):
    """`df -T path`'s line for the file system holding path: (type, the whole line)."""
    out = subprocess.run(["df", "-T", path], capture_output=True, text=True).stdout.splitlines()
    if len(out) < 2:
        return "unknown", ""
    return out[-1].split()[1], out[-1]


def dd_baseline(directory, total_bytes, ranks, drop):
    """`ranks` dd processes at once, each writing then reading total_bytes/ranks (8 MiB blocks,
    the write with conv=fsync; the page cache dropped before the read when `drop`, as for the
    restore): (write GB/s, read GB/s) over all of them."""
    block = 8 << 20
    count = max(1, total_bytes // ranks // block)
    paths = [os.path.join(directory, "dd-%d" % r) for r in range(ranks)]
    rates = []
    for i, cmd in enumerate((lambda p: ["dd", "if=/dev/zero", "of=" + p, "bs=%d" % block, "count=%d" % count,
                                        "conv=fsync"],
                             lambda p: ["dd", "if=" + p, "of=/dev/null", "bs=%d" % block])):
        if i == 1 and drop:
            drop_caches()
        t0 = time.perf_counter()
        procs = [subprocess.Popen(cmd(p), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for p in paths]
        for pr in procs:
            pr.wait()
        rates.append(count * block * ranks / (time.perf_counter() - t0) / 1e9)
    for p in paths:
        os.remove(p)
    return rates[0], rates[1]


def answers(cl, ctx, queries):
    out = []
    for layer, q in queries:
        r = cl.query(ctx, layer, q, mode="detached")
        out.append((r.out.copy(), list(r.recalled_chunks)))
    return out


def timed_operation(cl, start):
    """Runs start() (which answers an operation's record) and waits for it; (seconds, record)."""
    t0 = time.perf_counter()
    op = start()
    rec = cl.wait_operation(op["operation"], timeout=7200, interval=0.02)
    return time.perf_counter() - t0, rec, op


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sc.add_job_args(ap)
    ap.add_argument("--config", default=os.path.join(HERE, "..", "configs", "qwen2-1.5b.yaml"),
                    help="the model and reattention sections are used (default: Qwen2-1.5B)")
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--dir", default=None, help="where the snapshot directory goes (default: a new folder under /tmp)")
    ap.add_argument("--drop-caches", action="store_true", help="empty the page cache before the restore")
    ap.add_argument("--keep", action="store_true", help="keep the snapshot and the server log")
    ap.add_argument("--json", help="write the result here too")
    ap.add_argument("--label", default="")
    args = ap.parse_args()

    with open(args.config) as f:
        base = yaml.safe_load(f)
    model = base["model"]
    tmp = tempfile.mkdtemp(prefix="reattn-snapshot-bench-", dir=args.dir)
    snapdir = os.path.join(tmp, "snapshots")
    config = os.path.join(tmp, "config.yaml")
    backend = dict(base.get("backend") or {}, kind=args.backend)
    with open(config, "w") as f:
        yaml.safe_dump({"model": model, "reattention": base["reattention"], "backend": backend,
                        "capacity": {"tokens_per_rank": max(args.tokens, 1 << 20), "max_contexts": 8},
                        "server": {"request_timeout_s": 600, "operation_deadline_s": 3600,
                                   "snapshot_dir": snapdir}}, f)
    svc = sc.Service(argparse.Namespace(mpirun=args.mpirun, server=args.server), config,
                     os.path.join(tmp, "server.log"), ranks=args.ranks)
    try:
        svc.wait_ready(timeout=600)
        cl = Client("http://127.0.0.1:%d" % svc.port, timeout=3600)
        info = cl.info()
        ctx = cl.create_context()["id"]
        t0 = time.perf_counter()
        cl.synthetic(ctx, args.tokens, seed=7, needles=[args.tokens // 3])
        fill_s = time.perf_counter() - t0
        rng = np.random.default_rng(3)
        queries = [(layer, rng.standard_normal((1, model["q_heads"], model["head_dim"])).astype(np.float32))
                   for layer in (0, model["layers"] - 1)]
        want = answers(cl, ctx, queries)

        snap_s, snap_rec, _ = timed_operation(cl, lambda: cl.snapshot(ctx, "bench", wait=False))
        if snap_rec["state"] != "succeeded":
            raise SystemExit("snapshot failed: %s" % snap_rec)
        listed = [s for s in cl.snapshots() if s["name"] == "bench"][0]
        snap_bytes = listed["bytes"]

        dropped = drop_caches() if args.drop_caches else False
        restore_s, restore_rec, op = timed_operation(cl, lambda: cl.restore("bench", wait=False))
        if restore_rec["state"] != "succeeded":
            raise SystemExit("restore failed: %s" % restore_rec)
        got = answers(cl, op["context_id"], queries)
        identical = all(gc == wc and np.array_equal(go, wo) for (go, gc), (wo, wc) in zip(got, want))
        if not identical:
            raise SystemExit("the restored context answers differently")

        cl.delete_context(op["context_id"])
        cl.delete_context(ctx)
        dd_write, dd_read = dd_baseline(snapdir, snap_bytes, args.ranks, dropped)
        fs_type, fs_line = df_line(snapdir)
        per_token = snap_bytes / args.tokens
        result = {
            "bench": "snapshot_throughput",
            "label": args.label,
            "host": platform.node(),
            "backend": info["backend"],
            "ranks": args.ranks,
            "model": {k: model[k] for k in ("layers", "kv_heads", "head_dim")},
            "storage_dtype": listed["dtype"],
            "tokens": args.tokens,
            "snapshot_bytes": snap_bytes,
            "snapshot_bytes_per_token": round(per_token, 1),
            "file_system": fs_type,
            "df": fs_line,
            "snapshot_dir": snapdir,
            "fill_s": round(fill_s, 3),
            "snapshot_s": round(snap_s, 3),
            "snapshot_gb_per_s_total": round(snap_bytes / snap_s / 1e9, 3),
            "snapshot_gb_per_s_per_rank": round(snap_bytes / snap_s / 1e9 / args.ranks, 3),
            "snapshot_server_bytes_per_s": snap_rec["bytes_per_s"],
            "restore_page_cache": "dropped before the restore" if dropped else "warm (files just written)",
            "restore_s": round(restore_s, 3),
            "restore_gb_per_s_total": round(snap_bytes / restore_s / 1e9, 3),
            "restore_gb_per_s_per_rank": round(snap_bytes / restore_s / 1e9 / args.ranks, 3),
            "restore_server_bytes_per_s": restore_rec["bytes_per_s"],
            "restored_answers_identical": identical,
            "baseline_dd_write_fsync_gb_per_s_total": round(dd_write, 3),
            "baseline_dd_read_gb_per_s_total": round(dd_read, 3),
            "snapshot_vs_dd_write": round(snap_bytes / snap_s / 1e9 / dd_write, 2),
            "restore_vs_dd_read": round(snap_bytes / restore_s / 1e9 / dd_read, 2),
        }
        text = json.dumps(result, indent=2)
        print(fs_line)
        print(text)
        if args.json:
            with open(args.json, "w") as f:
                f.write(text + "\n")
    finally:
        svc.kill()
        if args.keep:
            print("kept %s" % tmp, file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
