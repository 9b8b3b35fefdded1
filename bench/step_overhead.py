#!/usr/bin/env python3
"""What the Python client and HTTP add to a qlen-1 layer step: one layer of a model's shapes
(default LLaMA-3-8B: 32 query / 8 KV heads, head_dim 128), a context filled with --tokens
synthetic tokens, then --iters steps of one token each, timed at the client (round trip over
loopback keep-alive HTTP, reattn_client.Client.step) and inside the service (its total_ms),
in the same run. Also the qlen-1 query route and the step with JSON bodies, for comparison.

    python3 bench/step_overhead.py --ranks 1 --tokens 1048576 --json bench/results/step_overhead.json
    python3 bench/step_overhead.py --tiny          # CPU, tiny model: checks the script runs

Prints one line per variant (p50/p90/p99 of client ms, service total ms, and the per-call
difference); exits 77 when the server has no /step route."""

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

from model_service import REPO, SKIP_EXIT, Service, add_service_args, derived_config, percentile, step_route_missing


def stats(values):
    return {"p50": percentile(values, 50), "p90": percentile(values, 90), "p99": percentile(values, 99),
            "mean": float(np.mean(values)) if values else float("nan")}


def measure(client, ctx, shape, variant, iters, warmup, dtype, rng):
    """Runs warmup + iters calls of one variant; returns per-call client and service ms."""
    q_heads, kv_heads, head_dim = shape
    client_ms, service_ms, append_ms = [], [], []
    for i in range(warmup + iters):
        q = rng.standard_normal((1, q_heads, head_dim)).astype(np.float32)
        if variant == "query":
            r = client.query(ctx, 0, q, mode="tail", binary=True, dtype=dtype)
        else:
            k = rng.standard_normal((kv_heads, 1, head_dim)).astype(np.float32)
            v = rng.standard_normal((kv_heads, 1, head_dim)).astype(np.float32)
            r = client.step(ctx, 0, q, k, v, binary=(variant == "step_binary"), dtype=dtype)
        if i >= warmup:
            client_ms.append(r.client_ms)
            service_ms.append(r.timing.get("total_ms", float("nan")))
            append_ms.append(r.timing.get("append_ms", 0.0))
    # added: everything outside the query step's total_ms (the step's k/v append included);
    # added_beyond_append: also without the append, which is service work too.
    added = [c - s for c, s in zip(client_ms, service_ms)]
    beyond = [a - x for a, x in zip(added, append_ms)]
    return {"client_ms": stats(client_ms), "service_total_ms": stats(service_ms), "append_ms": stats(append_ms),
            "added_ms": stats(added), "added_beyond_append_ms": stats(beyond), "calls": iters}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_service_args(p)
    p.add_argument("--config", default=os.path.join(REPO, "configs", "llama3-8b.yaml"),
                   help="base config; the benchmark serves one layer of its model")
    p.add_argument("--tokens", type=int, default=1048576)
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--dtype", default="BF16", choices=["F32", "F16", "BF16"])
    p.add_argument("--json", help="write the results here")
    p.add_argument("--tiny", action="store_true", help="tiny model, few tokens and calls, CPU backend")
    args = p.parse_args()
    if args.tiny:
        args.config = os.path.join(REPO, "configs", "tiny.yaml")
        args.tokens, args.backend = 5000, "cpu"
        args.iters, args.warmup = min(args.iters, 20), min(args.warmup, 3)

    config = derived_config(args.config, model={"layers": 1})
    m = config["model"]
    shape = (m["q_heads"], m["kv_heads"], m["head_dim"])
    service = Service(args, "step_overhead", config)
    try:
        client = service.client()
        if step_route_missing(client):
            print("step_overhead: the server has no /step route yet; skipped", flush=True)
            return SKIP_EXIT
        info = client.info()
        rng = np.random.default_rng(0)
        results = {}
        for variant in ("step_binary", "query", "step_json"):
            ctx = client.create_context()["id"]
            t0 = time.perf_counter()
            client.synthetic(ctx, args.tokens, seed=1)
            fill_s = time.perf_counter() - t0
            iters = args.iters if variant != "step_json" else max(1, args.iters // 5)
            results[variant] = measure(client, ctx, shape, variant, iters, args.warmup, args.dtype, rng)
            results[variant]["fill_s"] = fill_s
            client.delete_context(ctx)
            r = results[variant]
            print("%-12s tokens %d  client p50 %.3f ms p99 %.3f | service total p50 %.3f ms | added p50 %.3f ms "
                  "p90 %.3f p99 %.3f | append p50 %.3f, added beyond it p50 %.3f"
                  % (variant, args.tokens, r["client_ms"]["p50"], r["client_ms"]["p99"], r["service_total_ms"]["p50"],
                     r["added_ms"]["p50"], r["added_ms"]["p90"], r["added_ms"]["p99"], r["append_ms"]["p50"],
                     r["added_beyond_append_ms"]["p50"]), flush=True)
        report = {"benchmark": "step_overhead", "tokens": args.tokens, "qlen": 1, "dtype": args.dtype,
                  "model": m, "ranks": info.get("ranks"), "backend": info.get("backend", {}),
                  "host": platform.node(), "results": results,
                  "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        for variant, r in results.items():
            for part in ("client_ms", "service_total_ms", "added_ms", "added_beyond_append_ms"):
                if not all(np.isfinite(v) for v in r[part].values()):
                    print("step_overhead: %s %s has no finite timing: %s" % (variant, part, r[part]))
                    return 1
        if args.json:
            os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
            with open(args.json, "w") as f:
                json.dump(report, f, indent=1)
        return 0
    finally:
        service.stop()


if __name__ == "__main__":
    sys.exit(main())
