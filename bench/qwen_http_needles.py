#!/usr/bin/env python3
"""Needles in a long synthetic context, through the service's HTTP endpoint.

Against a running reattn-server (it starts nothing): creates a context, fills it with
--tokens synthetic tokens (POST /v1/contexts/{id}/synthetic, timed) with needles planted at
the given depths, then queries every layer (POST /v1/contexts/{id}/query with synthetic_q)
and records, per layer, the recalled chunks, which needles were found and the latency. Then
a burst of concurrent queries at each --concurrency (queries/s, and the batch sizes the
server's batcher formed). Writes JSON; prints a depth x layer summary last.

Recall rule to keep in mind: each query head keeps its top_k best chunks, and the recall set
is capped at max_recall_chunks, so all needles can be found only when top_k and
max_recall_chunks are at least the number of needles (the script says so when they are not).
Needle i is planted with strength 1 + 0.05 i (common/synthetic.cpp); needles are planted in
depth order, so deeper needles are slightly stronger.

    python3 bench/qwen_http_needles.py --url http://127.0.0.1:8080 --tokens 4M --json out.json

Standard library only.
"""

import argparse
import http.client
import json
import random
import sys
import threading
import time
import urllib.parse

from sizes import parse_tokens  # noqa: E402  (bench/ is the script directory)

DEFAULT_DEPTHS = "1,5,10,25,50,75,90,95,99"


class Http:
    """One keep-alive connection per thread."""

    def __init__(self, url, api_key=None, timeout=1800):
        u = urllib.parse.urlparse(url)
        self.host, self.port = u.hostname, u.port or 80
        self.api_key = api_key
        self.timeout = timeout
        self.conn = None

    def call(self, method, path, body=None):
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = "Bearer " + self.api_key
        data = json.dumps(body).encode() if body is not None else None
        for attempt in range(2):
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            try:
                self.conn.request(method, path, body=data, headers=headers)
                r = self.conn.getresponse()
                text = r.read()
                if r.getheader("Connection", "").lower() == "close":
                    self.conn.close()
                    self.conn = None
                doc = json.loads(text.decode()) if text else {}
                if r.status >= 300:
                    raise RuntimeError("%s %s -> %d %s" % (method, path, r.status, text[:400]))
                return doc
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.conn.close()
                self.conn = None
                if attempt == 1:
                    raise
        raise RuntimeError("unreachable")


def needle_tokens(depths, n, rc):
    """Token positions for the depths (fractions of n), each inside a mid chunk when there is
    one; returns [(depth, token, chunk or None)]."""
    S, C, W = rc["sink_tokens"], rc["chunk_tokens"], rc["local_window"]
    num_chunks = (n - S - W) // C if n - S - W >= C else 0
    out, used = [], set()
    for i, d in enumerate(depths):
        t = int(round(d * n))
        chunk = (t - S) // C if S <= t < S + num_chunks * C else None
        if chunk is not None:
            # Keep each needle in its own chunk (two in one chunk would count once).
            while chunk in used and chunk + 1 < num_chunks:
                chunk += 1
            used.add(chunk)
            t = S + chunk * C + (5 * i + 3) % C
        out.append((d, t, chunk))
    return out


def summarize(xs):
    xs = sorted(xs)
    if not xs:
        return {}
    return {"p50": xs[len(xs) // 2], "p99": xs[min(len(xs) - 1, int(0.99 * len(xs)))], "min": xs[0],
            "mean": sum(xs) / len(xs), "n": len(xs)}


def concurrency_run(url, api_key, ctx, layers, seed, qlen, clients, total):
    """`total` queries from `clients` threads, each to a random layer; queries/s and the
    batch sizes the server formed."""
    lat, batches, errors = [], [], []
    lock = threading.Lock()
    per = max(1, total // clients)

    def worker(k):
        h = Http(url, api_key)
        rng = random.Random(1000 + k)
        for _ in range(per):
            body = {"layer": rng.randrange(layers), "synthetic_q": {"seed": seed, "qlen": qlen}}
            t0 = time.perf_counter()
            try:
                r = h.call("POST", "/v1/contexts/%d/query" % ctx, body)
            except Exception as e:  # noqa: BLE001 - recorded, reported
                with lock:
                    errors.append(str(e))
                continue
            ms = (time.perf_counter() - t0) * 1e3
            with lock:
                lat.append(ms)
                batches.append(r["timing"]["batch_size"])

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"clients": clients, "queries": len(lat), "errors": len(errors), "first_error": errors[:1],
            "wall_s": wall, "queries_per_s": len(lat) / wall if wall > 0 else 0.0,
            "latency_ms": summarize(lat), "batch_size": summarize(batches)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", required=True, help="http://host:port of reattn-server")
    ap.add_argument("--api-key")
    ap.add_argument("--tokens", default="4M", help="context length (K/M suffixes: 2^10, 2^20)")
    ap.add_argument("--depths", default=DEFAULT_DEPTHS, help="needle depths in percent of the context")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--qlen", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3, help="queries per layer (latency samples)")
    ap.add_argument("--concurrency", default="1,8,32", help="client counts for the queries/s burst ('' skips it)")
    ap.add_argument("--burst-queries", type=int, default=256, help="queries per concurrency level")
    ap.add_argument("--keep", action="store_true", help="leave the context in the service")
    ap.add_argument("--json", required=True)
    ap.add_argument("--label", default="")
    a = ap.parse_args()

    h = Http(a.url, a.api_key)
    info = h.call("GET", "/v1/info")
    model, rc = info["model"], info["reattention"]
    n = parse_tokens(a.tokens)
    depths = [float(x) / 100.0 for x in a.depths.split(",")]
    needles = needle_tokens(depths, n, rc)
    mid_needles = [x for x in needles if x[2] is not None]
    expect_all = rc["top_k"] >= len(mid_needles) and rc["max_recall_chunks"] >= len(mid_needles)
    if not expect_all:
        print("qwen_http_needles: note: top_k %d / max_recall_chunks %d < %d needles: only the strongest can be "
              "recalled" % (rc["top_k"], rc["max_recall_chunks"], len(mid_needles)), file=sys.stderr)
    print("qwen_http_needles: %s: %d layers, H=%d Hkv=%d D=%d, %d ranks; %d tokens, needles at %s" % (
        a.url, model["layers"], model["q_heads"], model["kv_heads"], model["head_dim"], info.get("ranks", 0), n,
        [t for _, t, _ in needles]), flush=True)

    doc = {"bench": "qwen_http_needles", "label": a.label, "url": a.url, "info": info, "tokens": n,
           "seed": a.seed, "qlen": a.qlen, "complete": False,
           "needles_planted": [{"depth_pct": d * 100, "token": t, "chunk": c} for d, t, c in needles]}

    def save():
        # Written after every phase, so a run cut off by a time limit still leaves its results.
        with open(a.json, "w") as f:
            json.dump(doc, f, indent=1)

    save()
    ctx = h.call("POST", "/v1/contexts")["id"]
    t0 = time.perf_counter()
    filled = h.call("POST", "/v1/contexts/%d/synthetic" % ctx,
                    {"tokens": n, "seed": a.seed, "needles": [t for _, t, _ in needles]})
    load_s = time.perf_counter() - t0
    kv_bytes = n * model["layers"] * model["kv_heads"] * model["head_dim"] * 2 * 2  # bf16 K and V
    print("qwen_http_needles: filled %d tokens in %.1f s (%.1f GB of bf16 K/V, %.2f GB/s)" % (
        filled["tokens"], load_s, kv_bytes / 1e9, kv_bytes / 1e9 / load_s), flush=True)
    doc.update({"load_s": load_s, "kv_bytes": kv_bytes, "layers": [], "concurrency": []})
    save()

    layers = []
    for layer in range(model["layers"]):
        lat, server, recalled, found = [], [], None, None
        for _ in range(a.repeats):
            t1 = time.perf_counter()
            r = h.call("POST", "/v1/contexts/%d/query" % ctx,
                       {"layer": layer, "synthetic_q": {"seed": a.seed, "qlen": a.qlen}})
            lat.append((time.perf_counter() - t1) * 1e3)
            server.append(r["timing"])
            chunks = sorted(c["chunk"] for c in r["recalled_chunks"])
            if recalled is not None and chunks != recalled:
                raise RuntimeError("layer %d: recalled chunks changed between identical queries" % layer)
            recalled = chunks
        found = [c is not None and c in recalled for _, _, c in needles]
        layers.append({"layer": layer, "recalled_chunks": recalled, "recalled": len(recalled),
                       "needles_found": found, "found": sum(found), "latency_ms": lat,
                       "latency_p50_ms": sorted(lat)[len(lat) // 2],
                       "server_total_ms": sorted(t["total_ms"] for t in server)[len(server) // 2],
                       "server_score_ms": sorted(t["score_ms"] for t in server)[len(server) // 2],
                       "server_merge_ms": sorted(t["merge_ms"] for t in server)[len(server) // 2],
                       "server_attention_ms": sorted(t["attention_ms"] for t in server)[len(server) // 2]})
        doc["layers"] = layers
        save()
        print("  layer %2d: %d/%d needles, %d chunks recalled, %.2f ms (server %.2f ms)" % (
            layer, sum(found), len(mid_needles), len(recalled), layers[-1]["latency_p50_ms"],
            layers[-1]["server_total_ms"]), flush=True)

    bursts = []
    for c in [int(x) for x in a.concurrency.split(",") if x.strip()]:
        b = concurrency_run(a.url, a.api_key, ctx, model["layers"], a.seed, a.qlen, c, a.burst_queries)
        bursts.append(b)
        doc["concurrency"] = bursts
        save()
        print("  %2d clients: %d queries, %.1f queries/s, p50 %.2f ms, mean batch %.1f, %d errors" % (
            c, b["queries"], b["queries_per_s"], b["latency_ms"].get("p50", 0), b["batch_size"].get("mean", 0),
            b["errors"]), flush=True)

    if not a.keep:
        h.call("DELETE", "/v1/contexts/%d" % ctx)

    per_depth = []
    for i, (d, t, c) in enumerate(needles):
        per_depth.append({"depth_pct": d * 100, "token": t, "chunk": c, "in_mid": c is not None,
                          "strength": 1 + 0.05 * i,
                          "layers_found": sum(1 for L in layers if L["needles_found"][i]),
                          "layers": len(layers)})
    all_found = all(L["found"] == len(mid_needles) for L in layers)
    doc.update({"needles": per_depth, "expect_all_recalled": expect_all, "all_needles_found_every_layer": all_found,
                "layers": layers, "concurrency": bursts, "complete": True,
                "latency_p50_ms_all_layers": summarize([x for L in layers for x in L["latency_ms"]]).get("p50")})
    save()

    print("\nneedle recall by depth (%d layers, %d tokens, load %.1f s):" % (len(layers), n, load_s))
    print("  %8s %10s %8s %9s" % ("depth%", "token", "chunk", "layers"))
    for p in per_depth:
        print("  %8.0f %10d %8s %5d/%-3d" % (p["depth_pct"], p["token"], p["chunk"], p["layers_found"], p["layers"]))
    print("all needles found on every layer: %s" % all_found)
    return 0 if all_found or not expect_all else 1


if __name__ == "__main__":
    sys.exit(main())
