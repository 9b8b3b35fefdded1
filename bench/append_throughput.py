#!/usr/bin/env python3
"""Append throughput of POST /v1/contexts/{id}/kv: a BF16 safetensors body (64 MiB by default:
512 tokens of LLaMA-3-8B shapes, 32 layers x 8 KV heads x 128 dims, k and v) sent again and
again to one context of a reattn-server under mpirun, timed per request on the client over
loopback keep-alive HTTP. Prints one JSON object (and writes it with --json).

    python3 bench/append_throughput.py --server build/reattn-server --ranks 2 --backend cpu

Python 3 standard library only; the service helpers come from tests/http/service_client.py."""

import argparse
import json
import os
import platform
import statistics
import struct
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "http"))
import service_client as sc  # noqa: E402


def bf16_block(count):
    """`count` finite bf16 values (magnitudes about 2^-27 .. 2^3), deterministic."""
    out = bytearray(2 * count)
    x = 0x9E3779B9
    for i in range(count):
        x = (x * 1103515245 + 12345) & 0xFFFFFFFF
        sign = (x >> 31) & 1
        exponent = 100 + (x >> 16) % 30
        mantissa = x & 0x7F
        struct.pack_into("<H", out, 2 * i, (sign << 15) | (exponent << 7) | mantissa)
    return bytes(out)


def kv_body(layers, kv_heads, tokens, dim):
    n = layers * kv_heads * tokens * dim
    block = bf16_block(1 << 16)
    raw = (block * (2 * n // len(block) + 1))[: 2 * n]
    shape = [layers, kv_heads, tokens, dim]
    return sc.safetensors_bytes([("k", "BF16", shape, raw), ("v", "BF16", shape, raw)])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sc.add_job_args(ap)
    ap.add_argument("--tokens", type=int, default=512, help="tokens per append (512: a 64 MiB body)")
    ap.add_argument("--iters", type=int, default=8, help="timed appends (after one warm-up)")
    ap.add_argument("--json", help="write the result here too")
    ap.add_argument("--label", default="", help="free text stored with the result (e.g. the commit)")
    args = ap.parse_args()

    layers, q_heads, kv_heads, dim = 32, 32, 8, 128
    body = kv_body(layers, kv_heads, args.tokens, dim)
    tmp = tempfile.mkdtemp(prefix="reattn-append-")
    config = os.path.join(tmp, "config.yaml")
    with open(config, "w") as f:
        f.write("model: {layers: %d, q_heads: %d, kv_heads: %d, head_dim: %d, rope_theta: 500000, scope: 8192}\n"
                % (layers, q_heads, kv_heads, dim))
        f.write("reattention: {sink_tokens: 32, local_window: 4096, chunk_tokens: 64, top_k: 4, max_recall_chunks: 32}\n")
        f.write("backend: {kind: %s, storage_dtype: bf16}\n" % args.backend)
        f.write("capacity: {tokens_per_rank: 8388608}\n")
        f.write("server: {max_body_bytes: %d, request_timeout_s: 300}\n" % (len(body) + (1 << 20)))
    svc = sc.Service(argparse.Namespace(mpirun=args.mpirun, server=args.server), config,
                     os.path.join(tmp, "server.log"), ranks=args.ranks)
    try:
        svc.wait_ready(timeout=300)
        cl = svc.client(timeout=600)
        r = cl.request("POST", "/v1/contexts", {})
        assert r.status == 201, r.body
        ctx = r.json()["id"]
        seconds = []
        for i in range(args.iters + 1):
            t0 = time.perf_counter()
            r = cl.request("POST", "/v1/contexts/%d/kv" % ctx, body, content_type="application/octet-stream")
            dt = time.perf_counter() - t0
            if r.status != 200:
                raise SystemExit("append %d failed: %d %s" % (i, r.status, r.body[:300]))
            if i > 0:
                seconds.append(dt)
        info = cl.request("GET", "/v1/info").json()
        mib = len(body) / (1 << 20)
        med = statistics.median(seconds)
        result = {
            "body_bytes": len(body),
            "tokens_per_append": args.tokens,
            "ranks": args.ranks,
            "backend": info.get("backend"),
            "appends": len(seconds),
            "median_s": med,
            "min_s": min(seconds),
            "median_MiB_per_s": mib / med,
            "best_MiB_per_s": mib / min(seconds),
            "host": platform.node(),
            "cpus": os.cpu_count(),
            "label": args.label,
        }
        print(json.dumps(result, indent=1))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
    finally:
        svc.kill()


if __name__ == "__main__":
    main()
