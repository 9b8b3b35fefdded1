#!/usr/bin/env python3
"""What the Python client and HTTP add to a qlen-1 layer step: one layer of a model's shapes
(default LLaMA-3-8B: 32 query / 8 KV heads, head_dim 128), a context filled with --tokens
synthetic tokens, then --iters steps of one token each, timed at the client (round trip over
loopback keep-alive HTTP, reattn_client.Client.step) and inside the service, in the same run.
Also the qlen-1 query route and the step with JSON bodies, for comparison.

The in-service step time is what the service reports for the whole step: its k/v append
(X-Reattn-Append-Ms) plus its query (X-Reattn-Total-Ms). What the client and HTTP add is the
client's time minus that (issue 10's goal: <= 0.3 ms for step_binary at 1M tokens), split by
X-Reattn-Server-Ms (the service's time from the complete request to its answer) into the
service's own overhead outside the step (parse, queue, format) and what lies outside the
service (the client's encode and decode, measured alone here too, and the transport with its
thread wake-ups, whose floor is measured as the same bytes' round trip to a peer process that
answers at once).

    python3 bench/step_overhead.py --ranks 1 --tokens 1048576 --json bench/results/step_overhead.json
    python3 bench/step_overhead.py --tiny          # CPU, tiny model: checks the script runs

Prints one line per variant (p50s of the parts above); exits 77 when the server has no /step
route."""

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

from model_service import REPO, SKIP_EXIT, Service, add_service_args, derived_config, percentile, step_route_missing


GOAL_MS = 0.3  # issue 10: added per qlen-1 step at the client


def stats(values):
    return {"p50": percentile(values, 50), "p90": percentile(values, 90), "p99": percentile(values, 99),
            "mean": float(np.mean(values)) if values else float("nan")}


def step_inputs(shape, rng):
    q_heads, kv_heads, head_dim = shape
    return (rng.standard_normal((1, q_heads, head_dim)).astype(np.float32),
            rng.standard_normal((kv_heads, 1, head_dim)).astype(np.float32),
            rng.standard_normal((kv_heads, 1, head_dim)).astype(np.float32))


def measure(client, ctx, shape, variant, iters, warmup, dtype, rng):
    """Runs warmup + iters calls of one variant; returns per-call client and service ms."""
    calls = []
    for i in range(warmup + iters):
        q, k, v = step_inputs(shape, rng)
        if variant == "query":
            r = client.query(ctx, 0, q, mode="tail", binary=True, dtype=dtype)
        else:
            r = client.step(ctx, 0, q, k, v, binary=(variant == "step_binary"), dtype=dtype)
        if i >= warmup:
            calls.append((r.client_ms, r.timing.get("total_ms", float("nan")), r.timing.get("append_ms", 0.0),
                          r.timing.get("server_ms", float("nan"))))
    client_ms, total, append, server = (list(x) for x in zip(*calls))
    step = [t + a for t, a in zip(total, append)]  # the whole step in the service
    return {"client_ms": stats(client_ms), "service_total_ms": stats(total), "append_ms": stats(append),
            "service_step_ms": stats(step), "server_ms": stats(server),
            "added_ms": stats([c - s for c, s in zip(client_ms, step)]),
            "server_outside_step_ms": stats([sv - s for sv, s in zip(server, step)]),
            "outside_server_ms": stats([c - sv for c, sv in zip(client_ms, server)]), "calls": iters}


# A peer process that answers every HTTP request at once with `argv[1]` bytes of body: the
# transport floor (loopback TCP, both processes' wake-ups, the client's HTTP code).
_PEER = r"""
import socket, sys
ls = socket.socket()
ls.bind(("127.0.0.1", 0))
ls.listen(1)
print(ls.getsockname()[1], flush=True)
c, _ = ls.accept()
c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
n = int(sys.argv[1])
reply = b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: %d\r\n\r\n" % n + bytes(n)
buf = b""
while True:
    while b"\r\n\r\n" not in buf:
        d = c.recv(1 << 16)
        if not d:
            sys.exit(0)
        buf += d
    head, _, buf = buf.partition(b"\r\n\r\n")
    length = int([l.split(b":")[1] for l in head.split(b"\r\n") if l.lower().startswith(b"content-length")][0])
    while len(buf) < length:
        d = c.recv(1 << 16)
        if not d:
            sys.exit(0)
        buf += d
    buf = buf[length:]
    c.sendall(reply)
"""


def transport_floor(shape, dtype, iters, busy_wait, rng):
    """Round trips of a step_binary request's bytes, and an answer of its size, to _PEER."""
    import subprocess
    from reattn_client import http11, safetensors
    from reattn_client.tensors import to_wire_many
    q, k, v = step_inputs(shape, rng)
    (qw, _), (kw, _), (vw, _) = to_wire_many([(q, "q"), (k, "k"), (v, "v")], dtype, ndim=3)
    body = safetensors.dumps_parts({"q": qw, "k": kw, "v": vw})
    answer = len(safetensors.dumps({"out": q, "recalled_chunks": np.arange(32, dtype=np.int64)}))
    peer = subprocess.Popen([sys.executable, "-c", _PEER, str(answer)], stdout=subprocess.PIPE)
    try:
        port = int(peer.stdout.readline())
        conn = http11.Connection("127.0.0.1", port, 30, busy_wait=busy_wait)
        headers = {"Content-Type": "application/octet-stream", "Accept": "application/octet-stream"}
        times = []
        for i in range(iters + 20):
            t0 = time.perf_counter()
            conn.roundtrip("POST", "/v1/contexts/1/step?layer=0", headers, body)
            if i >= 20:
                times.append((time.perf_counter() - t0) * 1e3)
        conn.close()
        return stats(times)
    finally:
        peer.kill()
        peer.wait()


def client_work(shape, dtype, iters, rng):
    """The client's own work per step_binary call, without a socket: encoding q, k, v into the
    request body, and decoding an answer of the step's shapes (out F32, 32 recalled chunks)."""
    from reattn_client import http11, safetensors
    from reattn_client.client import _binary_result
    from reattn_client.tensors import to_wire_many
    q, k, v = step_inputs(shape, rng)
    answer = safetensors.dumps({"out": q, "recalled_chunks": np.arange(32, dtype=np.int64)})
    headers = [("Content-Type", "application/octet-stream")] + [
        ("X-Reattn-%s-Ms" % p, "0.1") for p in ("Score", "Merge", "Attention", "Total", "Queue", "Append", "Server")]
    encode, decode = [], []
    for _ in range(iters):
        t0 = time.perf_counter()
        (qw, _), (kw, _), (vw, _) = to_wire_many([(q, "q"), (k, "k"), (v, "v")], dtype, ndim=3)
        safetensors.dumps_parts({"q": qw, "k": kw, "v": vw})
        t1 = time.perf_counter()
        _binary_result(http11.Response(200, "OK", headers), bytearray(answer), 0)
        t2 = time.perf_counter()
        encode.append((t1 - t0) * 1e3)
        decode.append((t2 - t1) * 1e3)
    return {"encode_ms": stats(encode), "decode_ms": stats(decode)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_service_args(p)
    p.add_argument("--config", default=os.path.join(REPO, "configs", "llama3-8b.yaml"),
                   help="base config; the benchmark serves one layer of its model")
    p.add_argument("--tokens", type=int, default=1048576)
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--dtype", default="BF16", choices=["F32", "F16", "BF16"])
    p.add_argument("--busy-poll-us", type=int, default=None,
                   help="server.busy_poll_us for the service (default: the config's, auto)")
    p.add_argument("--http-threads", type=int, default=None, help="server.http_threads (default: the config's)")
    p.add_argument("--variants", default="step_binary,query,step_json",
                   help="comma-separated: step_binary (the issue's), query, step_json")
    p.add_argument("--client-busy-wait", type=float, default=None,
                   help="reattn_client.Client(busy_wait=...): seconds to poll for each answer before sleeping "
                        "(default: the client's auto)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--tiny", action="store_true", help="tiny model, few tokens and calls, CPU backend")
    args = p.parse_args()
    if args.tiny:
        args.config = os.path.join(REPO, "configs", "tiny.yaml")
        args.tokens, args.backend = 5000, "cpu"
        args.iters, args.warmup = min(args.iters, 20), min(args.warmup, 3)

    config = derived_config(args.config, model={"layers": 1})
    if args.busy_poll_us is not None:
        config.setdefault("server", {})["busy_poll_us"] = args.busy_poll_us
    if args.http_threads is not None:
        config.setdefault("server", {})["http_threads"] = args.http_threads
    variants = [v for v in args.variants.split(",") if v]
    if not variants or any(v not in ("step_binary", "query", "step_json") for v in variants):
        p.error("--variants: a comma-separated list of step_binary, query, step_json; got %r" % args.variants)
    m = config["model"]
    shape = (m["q_heads"], m["kv_heads"], m["head_dim"])
    service = Service(args, "step_overhead", config)
    try:
        client = service.client(busy_wait=args.client_busy_wait)
        if step_route_missing(client):
            print("step_overhead: the server has no /step route yet; skipped", flush=True)
            return SKIP_EXIT
        info = client.info()
        rng = np.random.default_rng(0)
        results = {}
        for variant in variants:
            ctx = client.create_context()["id"]
            t0 = time.perf_counter()
            client.synthetic(ctx, args.tokens, seed=1)
            fill_s = time.perf_counter() - t0
            iters = args.iters if variant != "step_json" else max(1, args.iters // 5)
            results[variant] = measure(client, ctx, shape, variant, iters, args.warmup, args.dtype, rng)
            results[variant]["fill_s"] = fill_s
            client.delete_context(ctx)
            r = results[variant]
            print("%-12s tokens %d  client p50 %.3f ms p99 %.3f | service step p50 %.3f ms (append %.3f + query %.3f) "
                  "| added p50 %.3f ms p90 %.3f p99 %.3f (goal %.1f) = server outside the step %.3f + outside the "
                  "server %.3f" % (variant, args.tokens, r["client_ms"]["p50"], r["client_ms"]["p99"],
                                   r["service_step_ms"]["p50"], r["append_ms"]["p50"], r["service_total_ms"]["p50"],
                                   r["added_ms"]["p50"], r["added_ms"]["p90"], r["added_ms"]["p99"], GOAL_MS,
                                   r["server_outside_step_ms"]["p50"], r["outside_server_ms"]["p50"]), flush=True)
        work = client_work(shape, args.dtype, max(args.iters, 100), rng)
        floor = transport_floor(shape, args.dtype, max(args.iters, 100), client.busy_wait, rng)
        print("client alone (no socket): encode p50 %.3f ms, decode p50 %.3f ms; round trip of the same bytes to a "
              "peer process that answers at once: p50 %.3f ms" % (work["encode_ms"]["p50"], work["decode_ms"]["p50"],
                                                                  floor["p50"]), flush=True)
        work["transport_floor_ms"] = floor
        report = {"benchmark": "step_overhead", "tokens": args.tokens, "qlen": 1, "dtype": args.dtype,
                  "model": m, "ranks": info.get("ranks"), "backend": info.get("backend", {}),
                  "busy_poll_us": config.get("server", {}).get("busy_poll_us", "auto"),
                  "client_busy_wait_s": client.busy_wait,
                  "http_threads": config.get("server", {}).get("http_threads", "config"),
                  "host": platform.node(), "goal_added_ms": GOAL_MS, "results": results, "client_alone": work,
                  "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        for variant, r in results.items():
            for part in ("client_ms", "service_step_ms", "added_ms"):
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
