#!/usr/bin/env python3
"""What a per-layer step costs a client beyond the service's own work: qlen-1 steps
(POST /v1/contexts/{id}/step, safetensors in, safetensors out) on one LLaMA-3-8B-shaped layer
(32 query heads, 8 KV heads, head_dim 128) holding --tokens synthetic tokens, timed on the
client over loopback keep-alive HTTP and compared, step by step, with the service's times
from the answer's headers: X-Reattn-Append-Ms (the k/v append on every rank) plus
X-Reattn-Total-Ms (the query step). "added" = client time - (append + total): HTTP, parsing,
the queue, the broadcast of the step, the reply.

    python3 bench/step_overhead.py --server build/reattn-server --ranks 2 --backend cuda --tokens 1M

Python 3 standard library only; the service helpers come from tests/http/service_client.py.
Prints one JSON object (and writes it with --json)."""

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "http"))
import service_client as sc  # noqa: E402


def tokens_arg(text):
    text = text.strip().upper()
    scale = {"K": 1 << 10, "M": 1 << 20}.get(text[-1:], 1)
    return int(text[:-1] if scale > 1 else text) * scale


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100.0 * (len(xs) - 1))))]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--server", required=True, help="reattn-server binary")
    ap.add_argument("--mpirun", default="mpirun")
    ap.add_argument("--ranks", type=int, default=1)
    ap.add_argument("--backend", default="auto", choices=["cpu", "cuda", "auto"])
    ap.add_argument("--tokens", type=tokens_arg, default=tokens_arg("1M"), help="context length before the steps")
    ap.add_argument("--steps", type=int, default=200, help="timed steps (after --warmup)")
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--json", help="write the result here too")
    args = ap.parse_args()

    H, G, D = 32, 8, 128
    tmp = tempfile.mkdtemp(prefix="reattn-step-")
    config = os.path.join(tmp, "config.yaml")
    with open(config, "w") as f:
        f.write("model: {layers: 1, q_heads: %d, kv_heads: %d, head_dim: %d, rope_theta: 500000, scope: 8192}\n" % (H, G, D))
        f.write("reattention: {sink_tokens: 32, local_window: 4096, chunk_tokens: 64, top_k: 4, max_recall_chunks: 32}\n")
        f.write("backend: {kind: %s, storage_dtype: bf16}\n" % args.backend)
        f.write("capacity: {tokens_per_rank: %d}\n" % (args.tokens + args.steps + args.warmup + (1 << 16)))
        f.write("server: {request_timeout_s: 600}\n")
    svc = sc.Service(argparse.Namespace(mpirun=args.mpirun, server=args.server), config,
                     os.path.join(tmp, "server.log"), ranks=args.ranks)
    try:
        svc.wait_ready(timeout=300)
        cl = svc.client(timeout=3600)
        ctx = cl.request("POST", "/v1/contexts", {}).json()["id"]
        t0 = time.perf_counter()
        r = cl.request("POST", "/v1/contexts/%d/synthetic" % ctx, {"tokens": args.tokens, "seed": 1})
        if r.status != 200:
            raise SystemExit("synthetic fill failed: %d %s" % (r.status, r.body[:300]))
        fill_s = time.perf_counter() - t0
        rng = sc.new_rng(3)
        octet = "application/octet-stream"
        client_ms, service_ms, added_ms, step_ms, append_ms = [], [], [], [], []
        for i in range(args.warmup + args.steps):
            q = [[[rng.gauss(0.0, 1.0) for _ in range(D)] for _ in range(H)]]
            kv = [[[sc.bf16_round(rng.uniform(-1.0, 1.0)) for _ in range(D)]] for _ in range(G)]
            body = sc.safetensors_bytes([("q", "F32", [1, H, D], sc.pack_values("F32", sc.flatten(q))),
                                         ("k", "BF16", [G, 1, D], sc.pack_values("BF16", sc.flatten(kv))),
                                         ("v", "BF16", [G, 1, D], sc.pack_values("BF16", sc.flatten(kv)))])
            t = time.perf_counter()
            r = cl.request("POST", "/v1/contexts/%d/step?layer=0" % ctx, body, content_type=octet,
                           headers={"Accept": octet})
            ms = (time.perf_counter() - t) * 1e3
            if r.status != 200:
                raise SystemExit("step %d failed: %d %s" % (i, r.status, r.body[:300]))
            if i < args.warmup:
                continue
            total, append = float(r.header("X-Reattn-Total-Ms")), float(r.header("X-Reattn-Append-Ms"))
            client_ms.append(ms)
            step_ms.append(total)
            append_ms.append(append)
            service_ms.append(total + append)
            added_ms.append(ms - total - append)
        info = cl.request("GET", "/v1/info").json()
        result = {
            "tokens": args.tokens, "ranks": args.ranks, "backend": info.get("backend"), "steps": len(client_ms),
            "fill_s": fill_s,
            "client_ms_p50": statistics.median(client_ms), "client_ms_p90": pct(client_ms, 90),
            "service_ms_p50": statistics.median(service_ms),
            "query_step_ms_p50": statistics.median(step_ms), "append_ms_p50": statistics.median(append_ms),
            "added_ms_p50": statistics.median(added_ms), "added_ms_p90": pct(added_ms, 90),
            "host": platform.node(), "cpus": os.cpu_count(),
        }
        print(json.dumps(result, indent=1))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
    finally:
        svc.kill()


if __name__ == "__main__":
    main()
