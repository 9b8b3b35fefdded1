#!/usr/bin/env python3
"""Bulk-load throughput (POST /v1/contexts/{id}/load) and what a load costs the queries of
other contexts, in one run of a reattn-server under mpirun:

  1. writes a BF16 safetensors file (k, v [layers, kv_heads, tokens, head_dim], LLaMA-3-8B
     shapes by default: 128 KiB per token) into a load root on local disk;
  2. fills another context with synthetic tokens and times back-to-back one-row queries on it
     with no load running (the baseline);
  3. starts the load and times the same queries while it runs, until it finishes;
  4. reports the load's GB/s (file bytes over the load's wall time, in total and per rank:
     each rank reads only the blocks it holds, about 1/ranks of the file) and the queries'
     p50/p99 latency during the load against the baseline, as a ratio.

    python3 bench/load_throughput.py --server build/reattn-server --ranks 2 [--backend cuda]

The file was just written, so it is read from the page cache unless --drop-caches (root, and
a kernel that allows it) empties that first; the result says which. Needs numpy and the
Python client (clients/python)."""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "http"))
sys.path.insert(0, os.path.join(HERE, "..", "clients", "python"))
import service_client as sc  # noqa: E402
from reattn_client import Client  # noqa: E402
from reattn_client.safetensors import Raw16, dumps_parts  # noqa: E402


def write_file(path, layers, kv_heads, tokens, dim):
    """A BF16 k and v of finite values (magnitudes up to about 8), written in one pass."""
    rng = np.random.default_rng(0)
    pattern = rng.integers(0, 1 << 16, size=1 << 20, dtype=np.uint16)
    pattern = (pattern & 0x807F) | (((pattern >> 7) % 30 + 100) << 7).astype(np.uint16)  # finite exponents
    n = layers * kv_heads * tokens * dim
    bits = np.resize(pattern, n).reshape(layers, kv_heads, tokens, dim)
    parts = dumps_parts({"k": Raw16(bits), "v": Raw16(bits)})
    with open(path, "wb") as f:
        for p in parts:
            f.write(p)
    return os.path.getsize(path)


def percentile(values, p):
    return float(np.percentile(np.asarray(values), p)) if values else float("nan")


def file_system(path):
    out = subprocess.run(["df", "-T", path], capture_output=True, text=True).stdout.splitlines()
    return out[-1].split()[1] if len(out) > 1 else "unknown"


def drop_caches():
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


class QueryLoop:
    """One-row queries on a context, back to back on their own connection, until stopped."""

    def __init__(self, url, ctx, q):
        self.client = Client(url, timeout=600)
        self.ctx, self.q = ctx, q
        self.ms = []
        self.errors = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self):
        while not self.stop.is_set():
            t0 = time.perf_counter()
            try:
                self.client.query(self.ctx, 0, self.q)
            except Exception as e:  # a refused query is a failure of the benchmark
                self.errors.append(str(e))
                return
            self.ms.append((time.perf_counter() - t0) * 1e3)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sc.add_job_args(ap)
    ap.add_argument("--tokens", type=int, default=8192, help="tokens in the file (8192: 1 GiB at the default shapes)")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--other-tokens", type=int, default=16384, help="synthetic tokens of the queried context")
    ap.add_argument("--slice-bytes", type=int, default=64 << 20, help="server.load_slice_bytes")
    ap.add_argument("--baseline-s", type=float, default=5.0, help="seconds of queries with no load")
    ap.add_argument("--dir", default=None, help="where the load root goes (default: a new folder under /tmp)")
    ap.add_argument("--drop-caches", action="store_true", help="empty the page cache before the load")
    ap.add_argument("--json", help="write the result here too")
    ap.add_argument("--label", default="")
    args = ap.parse_args()

    tmp = tempfile.mkdtemp(prefix="reattn-load-", dir=args.dir)
    root = os.path.join(tmp, "root")
    os.makedirs(root)
    path = os.path.join(root, "kv.safetensors")
    t0 = time.perf_counter()
    file_bytes = write_file(path, args.layers, args.kv_heads, args.tokens, args.head_dim)
    write_s = time.perf_counter() - t0
    q_heads = args.kv_heads * 4
    config = os.path.join(tmp, "config.yaml")
    with open(config, "w") as f:
        f.write("model: {layers: %d, q_heads: %d, kv_heads: %d, head_dim: %d, rope_theta: 500000, scope: 8192}\n"
                % (args.layers, q_heads, args.kv_heads, args.head_dim))
        f.write("reattention: {sink_tokens: 32, local_window: 4096, chunk_tokens: 64, top_k: 4, max_recall_chunks: 32}\n")
        f.write("backend: {kind: %s, storage_dtype: bf16}\n" % args.backend)
        f.write("capacity: {tokens_per_rank: 8388608}\n")
        f.write("server: {load_slice_bytes: %d, request_timeout_s: 300}\n" % args.slice_bytes)
    svc = sc.Service(argparse.Namespace(mpirun=args.mpirun, server=args.server), config,
                     os.path.join(tmp, "server.log"), ranks=args.ranks, extra=["--load-root", root, "--log-level", "debug"])
    try:
        svc.wait_ready(timeout=300)
        url = "http://127.0.0.1:%d" % svc.port
        cl = Client(url, timeout=600)
        other = cl.create_context()["id"]
        cl.synthetic(other, args.other_tokens, seed=1)
        target = cl.create_context()["id"]
        q = np.random.default_rng(2).standard_normal((1, q_heads, args.head_dim)).astype(np.float32)

        base = QueryLoop(url, other, q)
        base.thread.start()
        time.sleep(args.baseline_s)
        base.stop.set()
        base.thread.join()

        dropped = drop_caches() if args.drop_caches else False
        during = QueryLoop(url, other, q)
        during.thread.start()
        t0 = time.perf_counter()
        op = cl.load(target, "kv.safetensors")
        rec = cl.wait_operation(op["id"], timeout=3600, interval=0.05)
        load_s = time.perf_counter() - t0
        during.stop.set()
        during.thread.join()
        if base.errors or during.errors:
            raise SystemExit("queries failed: %s" % (base.errors + during.errors)[:3])
        assert cl.context(target)["tokens"] == args.tokens

        total_gbs = file_bytes / load_s / 1e9
        result = {
            "bench": "load_throughput",
            "label": args.label,
            "host": platform.node(),
            "backend": args.backend,
            "ranks": args.ranks,
            "shape": {"layers": args.layers, "kv_heads": args.kv_heads, "head_dim": args.head_dim, "dtype": "BF16"},
            "file_system": file_system(root),
            "load_root": root,
            "page_cache": "dropped before the load" if dropped else "warm (file just written)",
            "file_tokens": args.tokens,
            "file_bytes": file_bytes,
            "file_write_s": round(write_s, 3),
            "slice_bytes": args.slice_bytes,
            "load_s": round(load_s, 4),
            "load_gb_per_s_total": round(total_gbs, 3),
            "load_gb_per_s_per_rank": round(total_gbs / args.ranks, 3),
            "server_bytes_per_s": rec["bytes_per_s"],
            "query_context_tokens": args.other_tokens,
            "queries_baseline": len(base.ms),
            "queries_during_load": len(during.ms),
            "query_ms_baseline": {"p50": round(percentile(base.ms, 50), 3), "p99": round(percentile(base.ms, 99), 3)},
            "query_ms_during_load": {"p50": round(percentile(during.ms, 50), 3),
                                     "p99": round(percentile(during.ms, 99), 3)},
        }
        result["query_p99_ratio_during_vs_baseline"] = round(
            result["query_ms_during_load"]["p99"] / result["query_ms_baseline"]["p99"], 2)
        result["query_ms_during_load"]["max"] = round(max(during.ms), 3) if during.ms else None
        # What a query waits behind: the load's slices as the server timed them (debug log).
        slices, parts = {}, {}
        for e in svc.log_lines():
            if e.get("msg") == "operation slice" and e.get("operation") == op["id"]:
                slices.setdefault(e.get("slice", "?"), []).append(e["ms"])
                for key in ("rank0_ms", "wait_ms", "rank0_read_ms"):  # rank 0's share, the wait for the others
                    if key in e:
                        parts.setdefault(key, []).append(round(e[key], 1))
        result["slice_ms"] = {name: {"count": len(v), "p50": round(percentile(v, 50), 3),
                                     "p99": round(percentile(v, 99), 3), "max": round(max(v), 3)}
                              for name, v in slices.items()}
        # In order (the first is the load's begin, the last its commit): where the slow ones fall.
        result["slice_ms_in_order"] = {name: [round(x, 1) for x in v] for name, v in slices.items()}
        result["slice_parts_in_order"] = parts
        text = json.dumps(result, indent=2)
        print(text)
        if args.json:
            with open(args.json, "w") as f:
                f.write(text + "\n")
    finally:
        svc.kill()
        os.remove(path)


if __name__ == "__main__":
    main()
