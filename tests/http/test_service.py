#!/usr/bin/env python3
"""End-to-end tests of reattn-server: the service under mpirun (2 ranks, CPU) on a free
loopback port. Drives every endpoint; compares query answers with reattn-run on the same
data; sends each bad input and checks status, error body, that nothing changed, and that a
good query still returns the same answer; a bounded load test; queue-full (503); SIGTERM drain.
Exits non-zero on any failed check. Servers are always killed at the end."""

import argparse
import json
import math
import os
import signal
import socket
import struct
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import service_client as sc  # noqa: E402

API_KEY = "e2e-secret-key-7f3a"


class Checks:
    def __init__(self):
        self.passed = 0
        self.failed = []

    def check(self, ok, what):
        if ok:
            self.passed += 1
        else:
            self.failed.append(what)
            print("FAIL: " + what, flush=True)
        return ok

    def error(self, r, status, code, what):
        """r is an error response with `status` and {"error": {"code": code, "message": ...}}."""
        ok = r.status == status
        body = None
        try:
            body = r.json()
        except ValueError:
            pass
        ok = ok and isinstance(body, dict) and isinstance(body.get("error"), dict)
        ok = ok and body["error"].get("code") == code and isinstance(body["error"].get("message"), str)
        ok = ok and len(body["error"]["message"]) > 0
        return self.check(ok, "%s: want %d %s, got %d %s" % (what, status, code, r.status, r.body[:300]))


def make_config(base_path, out_path, capacity, server, backend="cpu"):
    """The base config's model and reattention sections, with the test's backend, capacity
    and server sections."""
    with open(base_path) as f:
        keep = [l for l in f.read().splitlines() if l.startswith("model:") or l.startswith("reattention:")]
    if len(keep) != 2:
        raise RuntimeError("%s: expected one-line 'model:' and 'reattention:' sections" % base_path)

    def flow(d):
        return "{" + ", ".join("%s: %s" % (k, v) for k, v in d.items()) + "}"

    text = "\n".join(keep) + "\nbackend: {kind: %s}\ncapacity: %s\nserver: %s\n" % (backend, flow(capacity),
                                                                                       flow(server))
    with open(out_path, "w") as f:
        f.write(text)
    return out_path


def max_abs_diff(a, b):
    fa, fb = sc.flatten(a), sc.flatten(b)
    if len(fa) != len(fb):
        return math.inf
    return max((abs(x - y) for x, y in zip(fa, fb)), default=0.0)


def same_answer(got, want, tol=1e-5):
    """got: a service answer; want: {"recalled": [ids], "out": nested}."""
    ids = [c["chunk"] for c in got["recalled_chunks"]]
    return ids == want["recalled"] and max_abs_diff(got["out"], want["out"]) <= tol


class Suite:
    def __init__(self, args, tmp):
        self.args = args
        self.tmp = tmp
        self.c = Checks()
        self.services = []

    def path(self, name):
        return os.path.join(self.tmp, name)

    def start(self, config, log, extra=(), api_key=None):
        s = sc.Service(self.args, config, self.path(log), extra=extra, api_key=api_key)
        self.services.append(s)
        return s

    # ------------------------------------------------------------ main service

    def run_main(self):
        c = self.c
        a = self.args
        config = make_config(a.config, self.path("main.yaml"),
                             {"tokens_per_rank": 200000, "max_contexts": 12},
                             {"max_body_bytes": 67108864, "queue_depth": 256, "max_batch": 32,
                              "http_threads": 4, "request_timeout_s": 2}, self.args.backend)
        key_file = self.path("api.key")
        with open(key_file, "w") as f:
            f.write(API_KEY + "\n")
        svc = self.start(config, "main.log", extra=["--api-key-file", key_file, "--max-body-bytes", "1048576"],
                         api_key=API_KEY)
        t0 = time.time()
        seen = svc.wait_ready()
        print("server ready in %.1fs (503s while starting: %d)" % (time.time() - t0, len(seen)), flush=True)
        for status, body in seen:
            c.check(status == 503 and json.loads(body)["error"]["code"] == "unavailable",
                    "readiness while starting: %d %s" % (status, body[:200]))
        cl = svc.client()
        anon = svc.client(api_key=None)

        # Health, metrics, info, auth.
        c.check(anon.request("GET", "/health/live").status == 200, "GET /health/live")
        c.check(anon.request("GET", "/health/ready").status == 200, "GET /health/ready")
        c.check(anon.request("GET", "/metrics").status == 200, "GET /metrics without a key")
        c.error(anon.request("GET", "/v1/info"), 401, "unauthorized", "no API key")
        c.error(anon.request("GET", "/v1/info", headers={"Authorization": "Bearer wrong"}), 401, "unauthorized",
                "wrong API key")
        c.error(anon.request("GET", "/v1/contexts", headers={"Authorization": API_KEY}), 401, "unauthorized",
                "API key without Bearer")
        info = cl.request("GET", "/v1/info")
        c.check(info.status == 200, "GET /v1/info")
        info = info.json()
        c.check(info["ranks"] == 2, "info ranks == 2")
        c.check(info["server"]["max_body_bytes"] == 1048576, "--max-body-bytes overrides the config file")
        c.check(info["server"]["api_key_required"] is True, "info says a key is required")
        m, rc = info["model"], info["reattention"]
        L, H, G, D = m["layers"], m["q_heads"], m["kv_heads"], m["head_dim"]
        S, W, C = rc["sink_tokens"], rc["local_window"], rc["chunk_tokens"]

        # Contexts: owners balanced.
        ra = cl.request("POST", "/v1/contexts")
        rb = cl.request("POST", "/v1/contexts", body={})
        c.check(ra.status == 201 and rb.status == 201, "POST /v1/contexts: %d %d" % (ra.status, rb.status))
        ctx_a, ctx_b = ra.json(), rb.json()
        c.check({ctx_a["owner_rank"], ctx_b["owner_rank"]} == {0, 1}, "owners balanced: %s %s" % (ctx_a, ctx_b))

        # K/V uploads: context A in two appends (F32, then BF16), context B in one.
        rng = sc.new_rng(1)
        n_a, split_a, n_b = 300, 200, 257
        k_a, v_a = sc.random_kv(rng, L, G, n_a, D)
        k_b, v_b = sc.random_kv(rng, L, G, n_b, D)
        r = cl.request("POST", "/v1/contexts/%d/kv" % ctx_a["id"],
                       body=sc.kv_body(sc.kv_slice(k_a, 0, split_a), sc.kv_slice(v_a, 0, split_a), "F32"),
                       content_type="application/octet-stream")
        c.check(r.status == 200 and r.json()["tokens"] == split_a, "append 1 to A: %d %s" % (r.status, r.body[:200]))
        r = cl.request("POST", "/v1/contexts/%d/kv" % ctx_a["id"],
                       body=sc.kv_body(sc.kv_slice(k_a, split_a, n_a), sc.kv_slice(v_a, split_a, n_a), "BF16"),
                       content_type="application/octet-stream")
        c.check(r.status == 200 and r.json()["tokens"] == n_a, "append 2 to A: %d %s" % (r.status, r.body[:200]))
        r = cl.request("POST", "/v1/contexts/%d/kv" % ctx_b["id"], body=sc.kv_body(k_b, v_b, "F32"),
                       content_type="application/octet-stream")
        c.check(r.status == 200 and r.json()["tokens"] == n_b, "append to B: %d %s" % (r.status, r.body[:200]))
        kv_files = {ctx_a["id"]: self.path("kv_a.safetensors"), ctx_b["id"]: self.path("kv_b.safetensors")}
        with open(kv_files[ctx_a["id"]], "wb") as f:
            f.write(sc.kv_body(k_a, v_a, "F32"))
        with open(kv_files[ctx_b["id"]], "wb") as f:
            f.write(sc.kv_body(k_b, v_b, "F32"))

        # Queries, compared with reattn-run on the same data.
        cases = [  # (context, layer, mode, qlen, body form)
            (ctx_a, 1, "tail", 3, "json"),
            (ctx_a, 0, "detached", 2, "safetensors"),
            (ctx_b, 1, "tail", 1, "json"),
            (ctx_b, 0, "detached", 4, "json"),
        ]
        self.requests = []  # (path, body, content_type, expected) for the load test
        for i, (ctx, layer, mode, qlen, form) in enumerate(cases):
            q = sc.random_q(rng, qlen, H, D, scale=2.0)
            q_file = self.path("q%d.safetensors" % i)
            with open(q_file, "wb") as f:
                f.write(sc.q_body(q))
            if form == "json":
                path, body, ct = "/v1/contexts/%d/query" % ctx["id"], {"layer": layer, "q": q, "mode": mode}, None
            else:
                path = "/v1/contexts/%d/query?layer=%d&mode=%s" % (ctx["id"], layer, mode)
                body, ct = sc.q_body(q), "application/octet-stream"
            r = cl.request("POST", path, body=body, content_type=ct)
            if not c.check(r.status == 200, "query case %d: %d %s" % (i, r.status, r.body[:300])):
                continue
            got = r.json()
            want = sc.reattn_run(a, config, ["--kv", kv_files[ctx["id"]], "--q", q_file, "--layer", str(layer),
                                             "--mode", mode, "--owner-rank", str(ctx["owner_rank"])])
            ids = [x["chunk"] for x in got["recalled_chunks"]]
            c.check(ids == want["recalled_chunks"], "case %d recalled %s vs reattn-run %s" % (i, ids, want["recalled_chunks"]))
            c.check(all(x["first_token"] == S + x["chunk"] * C and x["last_token"] == S + (x["chunk"] + 1) * C - 1
                        for x in got["recalled_chunks"]), "case %d chunk token ranges" % i)
            diff = max_abs_diff(got["out"], want["out"])
            c.check(diff <= 1e-5, "case %d out differs from reattn-run by %g" % (i, diff))
            c.check(len(got["out"]) == qlen and len(got["out"][0]) == H and len(got["out"][0][0]) == D,
                    "case %d out shape" % i)
            c.check(all(k in got["timing"] for k in ("score_ms", "merge_ms", "attention_ms", "total_ms", "queue_ms")),
                    "case %d timing fields" % i)
            self.requests.append((path, body, ct, {"recalled": ids, "out": got["out"]}))

        # A synthetic context with needles, compared with reattn-run --synthetic-tokens.
        rc_ = cl.request("POST", "/v1/contexts")
        ctx_c = rc_.json()
        n_c, needles = 3000, [700, 2100]
        r = cl.request("POST", "/v1/contexts/%d/synthetic" % ctx_c["id"],
                       body={"tokens": n_c, "seed": 11, "needles": needles})
        c.check(r.status == 200 and r.json()["tokens"] == n_c, "synthetic: %d %s" % (r.status, r.body[:200]))
        path = "/v1/contexts/%d/query" % ctx_c["id"]
        body = {"layer": 1, "synthetic_q": {"seed": 11, "qlen": 2}}
        r = cl.request("POST", path, body=body)
        if c.check(r.status == 200, "synthetic query: %d %s" % (r.status, r.body[:300])):
            got = r.json()
            want = sc.reattn_run(a, config, ["--synthetic-tokens", str(n_c), "--seed", "11", "--needles",
                                             ",".join(map(str, needles)), "--qlen", "2", "--layer", "1",
                                             "--owner-rank", str(ctx_c["owner_rank"])])
            ids = [x["chunk"] for x in got["recalled_chunks"]]
            c.check(ids == want["recalled_chunks"], "synthetic recalled %s vs reattn-run %s" % (ids, want["recalled_chunks"]))
            c.check(max_abs_diff(got["out"], want["out"]) <= 1e-5, "synthetic out equals reattn-run's")
            c.check(all((t - S) // C in ids for t in needles), "needles %s recalled in %s" % (needles, ids))
            c.check(want["needles"]["all_found"], "reattn-run finds the needles")
            self.requests.append((path, body, None, {"recalled": ids, "out": got["out"]}))

        self.layer_steps(cl, info)

        # Listing, one context, metrics, request ids.
        r = cl.request("GET", "/v1/contexts")
        listed = {x["id"]: x for x in r.json()["contexts"]}
        c.check(r.status == 200 and listed.get(ctx_a["id"], {}).get("tokens") == n_a and
                listed.get(ctx_b["id"], {}).get("tokens") == n_b and listed.get(ctx_c["id"], {}).get("tokens") == n_c,
                "GET /v1/contexts: %s" % r.body[:300])
        r = cl.request("GET", "/v1/contexts/%d" % ctx_b["id"])
        c.check(r.status == 200 and r.json() == {"id": ctx_b["id"], "owner_rank": ctx_b["owner_rank"], "tokens": n_b,
                                                 "layer_tokens": [n_b] * L},
                "GET /v1/contexts/{id}: %s" % r.body[:200])
        r = cl.request("GET", "/health/ready", headers={"X-Request-Id": "e2e-echo-1"})
        c.check(r.header("X-Request-Id") == "e2e-echo-1", "X-Request-Id echoed")
        c.check(bool(cl.request("GET", "/health/live").header("X-Request-Id")), "X-Request-Id made up when absent")
        metrics = self.metrics(cl)
        c.check(sum(metrics["kv"].values()) == n_a + n_b + n_c, "kv tokens per rank sum to the tokens: %s" % metrics["kv"])
        c.check(all(metrics["kv"].get(str(r_), 0) > 0 for r_ in range(2)), "both ranks store tokens")
        for phase in ("score", "merge", "attention", "queue"):
            c.check(('reattn_step_phase_seconds_count{phase="%s"}' % phase) in metrics["text"],
                    "metrics: %s latency histogram" % phase)
        c.check('reattn_http_requests_total{method="POST",route="/v1/contexts/{id}/query",status="200"}'
                in metrics["text"], "metrics: requests by route and status")
        c.check("reattn_queue_depth 0" in metrics["text"], "metrics: queue depth")

        self.ctx = (ctx_a, ctx_b, ctx_c)
        self.good = self.requests[0]
        self.bad_inputs(svc, cl, ctx_a, info)
        self.slow_client(svc, cl)
        self.load_test(svc)

        # Delete frees everything on every rank.
        for ctx in (ctx_a, ctx_b, ctx_c):
            r = cl.request("DELETE", "/v1/contexts/%d" % ctx["id"])
            c.check(r.status == 200, "DELETE context %d: %d" % (ctx["id"], r.status))
            c.error(cl.request("GET", "/v1/contexts/%d" % ctx["id"]), 404, "not_found", "GET after DELETE")
            c.error(cl.request("DELETE", "/v1/contexts/%d" % ctx["id"]), 404, "not_found", "DELETE twice")
        metrics = self.metrics(cl)
        c.check(sum(metrics["kv"].values()) == 0 and "reattn_contexts 0" in metrics["text"],
                "no tokens stored after deleting: %s" % metrics["kv"])

        # The key never reaches the logs; every line is JSON with a rank.
        lines = svc.log_lines()
        with open(svc.log_path, "rb") as f:
            c.check(API_KEY.encode() not in f.read(), "the API key is never logged")
        c.check(all("raw" in l or ("rank" in l and "level" in l) for l in lines), "log lines carry rank and level")
        json_lines = [l for l in lines if "raw" not in l]
        c.check(len(json_lines) > 0 and len(json_lines) >= 0.99 * len(lines), "logs are JSON lines")
        c.check(any(l.get("request_id") == "e2e-echo-1" for l in json_lines), "logs carry the request id")

        # SIGTERM to rank 0: every rank exits 0.
        svc.terminate_rank0()
        rc_exit = svc.wait(60)
        c.check(rc_exit == 0, "main service exit status after SIGTERM: %s" % rc_exit)

    def metrics(self, cl):
        text = cl.request("GET", "/metrics").body.decode()
        kv = {}
        for line in text.splitlines():
            if line.startswith("reattn_kv_tokens{"):
                rank = line.split('rank="')[1].split('"')[0]
                kv[rank] = int(line.split()[-1])
        return {"text": text, "kv": kv}

    def snapshot(self, cl):
        return (cl.request("GET", "/v1/contexts").json(), self.metrics(cl)["kv"])

    # ------------------------------------------------------------ per-layer steps

    def layer_steps(self, cl, info):
        """A forward pass through POST /v1/contexts/{id}/step, layer by layer, gives what appending
        the same K/V to every layer and querying each layer's tail gives; layers differ in length
        mid-pass; out-of-order and bad steps are refused and change nothing."""
        c = self.c
        m, rc = info["model"], info["reattention"]
        L, H, G, D = m["layers"], m["q_heads"], m["kv_heads"], m["head_dim"]
        W = rc["local_window"]
        rng = sc.new_rng(21)
        octet = "application/octet-stream"
        stepped = cl.request("POST", "/v1/contexts").json()
        reference = cl.request("POST", "/v1/contexts").json()
        spath = "/v1/contexts/%d/step" % stepped["id"]
        n0 = 150
        k0, v0 = sc.random_kv(rng, L, G, n0, D)
        for ctx in (stepped, reference):
            r = cl.request("POST", "/v1/contexts/%d/kv" % ctx["id"], body=sc.kv_body(k0, v0), content_type=octet)
            c.check(r.status == 200, "layer steps: prefix append: %d %s" % (r.status, r.body[:200]))

        def kv3(qlen):  # [G][qlen][D], bf16-exact
            return [[[sc.bf16_round(rng.uniform(-1.0, 1.0)) for _ in range(D)] for _ in range(qlen)] for _ in range(G)]

        def st_body(q, k, v, dtype="F32"):
            return sc.safetensors_bytes([("q", "F32", [len(q), H, D], sc.pack_values("F32", sc.flatten(q))),
                                         ("k", dtype, [G, len(k[0]), D], sc.pack_values(dtype, sc.flatten(k))),
                                         ("v", dtype, [G, len(v[0]), D], sc.pack_values(dtype, sc.flatten(v)))])

        n = n0
        for pass_no, (qlen, form) in enumerate([(5, "json"), (1, "binary"), (3, "json")]):
            ks, vs, qs, outs = [], [], [], []
            for layer in range(L):
                q, k, v = sc.random_q(rng, qlen, H, D, scale=2.0), kv3(qlen), kv3(qlen)
                ks.append(k)
                vs.append(v)
                qs.append(q)
                if form == "json":
                    r = cl.request("POST", spath, body={"layer": layer, "q": q, "k": k, "v": v})
                    if not c.check(r.status == 200, "step pass %d layer %d: %d %s" % (pass_no, layer, r.status, r.body[:300])):
                        return
                    got = r.json()
                    c.check(got["layer"] == layer and got["tokens"] == n + qlen and
                            got["context_tokens"] == (n + qlen if layer == L - 1 else n),
                            "step pass %d layer %d: tokens %s" % (pass_no, layer, {k_: got[k_] for k_ in ("tokens", "context_tokens")}))
                    outs.append(([x["chunk"] for x in got["recalled_chunks"]], got["out"]))
                else:
                    r = cl.request("POST", spath + "?layer=%d" % layer, body=st_body(q, k, v, "BF16"),
                                   content_type=octet, headers={"Accept": octet})
                    if not c.check(r.status == 200 and r.header("Content-Type") == octet,
                                   "binary step layer %d: %d %s" % (layer, r.status, r.body[:200])):
                        return
                    tensors = sc.read_safetensors(r.body)
                    c.check(tensors["out"][0] == "F32" and tensors["out"][1] == [qlen, H, D] and
                            tensors["recalled_chunks"][0] == "I64", "binary step: tensor dtypes and shapes")
                    c.check(all(r.header(h) is not None for h in ("X-Reattn-Score-Ms", "X-Reattn-Merge-Ms",
                                                                   "X-Reattn-Attention-Ms", "X-Reattn-Total-Ms",
                                                                   "X-Reattn-Queue-Ms")), "binary step: timing headers")
                    outs.append((tensors["recalled_chunks"][2], sc.unflatten(tensors["out"][2], [qlen, H, D])))
                if layer == 0 and L > 1:
                    ctx_now = cl.request("GET", "/v1/contexts/%d" % stepped["id"]).json()
                    c.check(ctx_now["tokens"] == n and ctx_now["layer_tokens"] == [n + qlen] + [n] * (L - 1),
                            "mid-pass lengths: %s" % ctx_now)
                    before = self.snapshot(cl)
                    for what, path, body, ct in [
                            ("a second step at layer 0", spath, {"layer": 0, "q": q, "k": k, "v": v}, None),
                            # qlen + 1 rows: layer 1 cannot take them while layer 0 is qlen ahead
                            ("a step at layer 1 of another length", spath,
                             {"layer": 1, "q": q + q[:1], "k": [h + h[:1] for h in k], "v": [h + h[:1] for h in v]},
                             None),
                            ("an append to all layers", "/v1/contexts/%d/kv" % stepped["id"],
                             sc.kv_body(*sc.random_kv(rng, L, G, 2, D)), octet)]:
                        r = cl.request("POST", path, body=body, content_type=ct)
                        c.error(r, 409, "out_of_order", "mid-pass: " + what)
                        c.check("%d" % n in r.body.decode() and "%d" % (n + qlen) in r.body.decode(),
                                "mid-pass: %s names both lengths: %s" % (what, r.body[:300]))
                        c.check(self.snapshot(cl) == before, "mid-pass: %s changed nothing" % what)
            # The reference: the same K/V appended to every layer, then each layer's tail query.
            r = cl.request("POST", "/v1/contexts/%d/kv" % reference["id"], body=sc.kv_body(ks, vs), content_type=octet)
            c.check(r.status == 200, "reference append pass %d: %d %s" % (pass_no, r.status, r.body[:200]))
            n += qlen
            for layer in range(L):
                r = cl.request("POST", "/v1/contexts/%d/query" % reference["id"],
                               body={"layer": layer, "q": qs[layer], "mode": "tail"})
                if not c.check(r.status == 200, "reference query: %d %s" % (r.status, r.body[:200])):
                    continue
                want = r.json()
                ids = [x["chunk"] for x in want["recalled_chunks"]]
                c.check(outs[layer][0] == ids, "pass %d layer %d: recalled %s, append+query %s" % (pass_no, layer, outs[layer][0], ids))
                diff = max_abs_diff(outs[layer][1], want["out"])
                c.check(diff <= 1e-5, "pass %d layer %d: out differs from append+query by %g" % (pass_no, layer, diff))
        ctx_now = cl.request("GET", "/v1/contexts/%d" % stepped["id"]).json()
        c.check(ctx_now["tokens"] == n and ctx_now["layer_tokens"] == [n] * L, "after the passes: %s" % ctx_now)
        # The query route answers binary too.
        q = sc.random_q(rng, 2, H, D)
        r = cl.request("POST", "/v1/contexts/%d/query" % reference["id"], body={"layer": 0, "q": q},
                       headers={"Accept": octet})
        j = cl.request("POST", "/v1/contexts/%d/query" % reference["id"], body={"layer": 0, "q": q}).json()
        if c.check(r.status == 200 and r.header("Content-Type") == octet, "binary query: %d" % r.status):
            t = sc.read_safetensors(r.body)
            c.check(t["recalled_chunks"][2] == [x["chunk"] for x in j["recalled_chunks"]] and
                    max_abs_diff(sc.unflatten(t["out"][2], [2, H, D]), j["out"]) == 0, "binary query equals JSON")

        # Bad steps: each names the field, and nothing changes.
        q1, k1, v1 = sc.random_q(rng, 1, H, D), kv3(1), kv3(1)
        good = {"layer": 0, "q": q1, "k": k1, "v": v1}

        def body(**kw):
            d = dict(good)
            d.update(kw)
            return d
        bad_dtype = sc.safetensors_bytes([("q", "F32", [1, H, D], sc.pack_values("F32", sc.flatten(q1))),
                                          ("k", "I8", [G, 1, D], b"\0" * (G * D)),
                                          ("v", "I8", [G, 1, D], b"\0" * (G * D))])
        nan_k = st_body(q1, [[[float("nan")] + row[1:] for row in h] for h in k1], v1)
        before = self.snapshot(cl)
        for what, path, b, ct, status, code, names in [
                ("q with a head too few", spath, body(q=[q1[0][:-1]]), None, 400, "invalid_argument", "q[0]"),
                ("k with a kv head too many", spath, body(k=k1 + k1[:1]), None, 400, "invalid_argument", "kv_heads"),
                ("v with a short head_dim", spath, body(v=[[row[:-1] for row in h] for h in v1]), None, 400,
                 "invalid_argument", "v[0][0]"),
                ("k and v longer than q", spath, body(k=[h * 2 for h in k1], v=[h * 2 for h in v1]), None, 400,
                 "invalid_argument", "qlen"),
                ("qlen over the window", spath, body(q=q1 * (W + 1), k=[h * (W + 1) for h in k1],
                                                     v=[h * (W + 1) for h in v1]), None, 400, "invalid_argument",
                 "local_window"),
                ("q that is Inf in fp32", spath, json.dumps(good).replace(repr(q1[0][0][0]), "1e39", 1), None, 400,
                 "invalid_argument", "q[0][0][0]"),
                ("NaN in a safetensors k", spath + "?layer=0", nan_k, octet, 400, "invalid_argument", "'k'"),
                ("unknown dtype", spath + "?layer=0", bad_dtype, octet, 400, "invalid_argument", "I8"),
                ("layer out of range", spath, body(layer=L), None, 400, "invalid_argument", "layer"),
                ("missing v", spath, {"layer": 0, "q": q1, "k": k1}, None, 400, "invalid_argument", "v"),
                ("step on an unknown context", "/v1/contexts/999999/step", good, None, 404, "not_found", "999999"),
                ("step at layer 1 before layer 0", spath, body(layer=1), None, 409, "out_of_order", "%d" % n)]:
            r = cl.request("POST", path, body=b, content_type=ct)
            if c.error(r, status, code, "bad step: " + what):
                c.check(names in r.json()["error"]["message"], "bad step: %s names %s: %s" % (what, names, r.body[:300]))
            c.check(self.snapshot(cl) == before, "bad step: %s changed nothing" % what)
        r = cl.request("POST", spath, body=good)
        c.check(r.status == 200 and r.json()["tokens"] == n + 1, "a good step after the bad ones: %d %s" % (r.status, r.body[:200]))
        for ctx in (stepped, reference):
            c.check(cl.request("DELETE", "/v1/contexts/%d" % ctx["id"]).status == 200, "delete the step contexts")
        print("layer steps: 3 passes over %d layers, bad steps checked" % L, flush=True)

    # ------------------------------------------------------------ bad inputs

    def bad_inputs(self, svc, cl, ctx, info):
        c = self.c
        m = info["model"]
        L, H, D = m["layers"], m["q_heads"], m["head_dim"]
        G = m["kv_heads"]
        W = info["reattention"]["local_window"]
        qpath = "/v1/contexts/%d/query" % ctx["id"]
        kvpath = "/v1/contexts/%d/kv" % ctx["id"]
        synpath = "/v1/contexts/%d/synthetic" % ctx["id"]
        rng = sc.new_rng(5)
        q1 = sc.random_q(rng, 1, H, D)
        good_q = json.dumps({"layer": 0, "q": q1})
        empty = cl.request("POST", "/v1/contexts").json()  # a context with no tokens
        before = self.snapshot(cl)

        def qbody(**kw):
            d = {"layer": 0, "q": q1}
            d.update(kw)
            return d

        def kv(tokens=4, layers=L, dtype="F32", values=None, names=("k", "v")):
            shape = [layers, G, tokens, D]
            n = layers * G * tokens * D
            vals = values if values is not None else [0.5] * n
            raw = sc.pack_values(dtype, vals) if dtype in ("F32", "F16", "BF16") else b"\0" * (8 * n)
            return sc.safetensors_bytes([(names[0], dtype, shape, raw), (names[1], dtype, shape, raw)])

        nan_q = sc.safetensors_bytes([("q", "F32", [1, H, D], sc.pack_values("F32", [float("nan")] + [0.0] * (H * D - 1)))])
        i32_q = sc.safetensors_bytes([("q", "I32", [1, H, D], b"\0" * (4 * H * D))])
        good_kv = kv()
        octet = "application/octet-stream"
        deep = "[" * 70000 + "]" * 70000

        def raw_st(header):  # a safetensors body with a hand-written header and no data
            h = header.encode()
            return struct.pack("<Q", len(h)) + h

        cases = [
            # (what, method, path, body, content type, status, code)
            ("malformed JSON", "POST", qpath, '{"layer": 0, "q": [', None, 400, "invalid_argument"),
            ("JSON array body", "POST", qpath, "[1, 2]", None, 400, "invalid_argument"),
            ("unknown field", "POST", qpath, qbody(extra=1), None, 400, "invalid_argument"),
            ("missing layer", "POST", qpath, {"q": q1}, None, 400, "invalid_argument"),
            ("missing q", "POST", qpath, {"layer": 0}, None, 400, "invalid_argument"),
            ("q with too few heads", "POST", qpath, qbody(q=[q1[0][:-1]]), None, 400, "invalid_argument"),
            ("q with a short row", "POST", qpath, qbody(q=[[q1[0][0][:-1]] + q1[0][1:]]), None, 400, "invalid_argument"),
            ("q not nested", "POST", qpath, qbody(q=sc.flatten(q1)), None, 400, "invalid_argument"),
            ("q with a string", "POST", qpath, qbody(q=[[["x"] * D] * H]), None, 400, "invalid_argument"),
            ("q empty", "POST", qpath, qbody(q=[]), None, 400, "invalid_argument"),
            ("NaN in q", "POST", qpath, good_q.replace(repr(q1[0][0][0]), "NaN", 1), None, 400, "invalid_argument"),
            ("Infinity in q", "POST", qpath, good_q.replace(repr(q1[0][0][0]), "1e999", 1), None, 400, "invalid_argument"),
            ("q over fp32 range", "POST", qpath, good_q.replace(repr(q1[0][0][0]), "1e39", 1), None, 400, "invalid_argument"),
            ("layer out of range", "POST", qpath, qbody(layer=L), None, 400, "invalid_argument"),
            ("negative layer", "POST", qpath, qbody(layer=-1), None, 400, "invalid_argument"),
            ("fractional layer", "POST", qpath, qbody(layer=0.5), None, 400, "invalid_argument"),
            ("layer as a string", "POST", qpath, qbody(layer="0"), None, 400, "invalid_argument"),
            ("unknown mode", "POST", qpath, qbody(mode="sideways"), None, 400, "invalid_argument"),
            ("tail qlen over the local window", "POST", qpath, qbody(q=q1 * (W + 1)), None, 400, "invalid_argument"),
            ("tail query longer than the context", "POST", "/v1/contexts/%d/query" % empty["id"], qbody(q=q1 * 2),
             None, 400, "invalid_argument"),
            ("NaN in a safetensors q", "POST", qpath + "?layer=0", nan_q, octet, 400, "invalid_argument"),
            ("I32 safetensors q", "POST", qpath + "?layer=0", i32_q, octet, 400, "invalid_argument"),
            ("safetensors q without a layer", "POST", qpath, sc.q_body(q1), octet, 400, "invalid_argument"),
            ("safetensors q, layer out of range", "POST", qpath + "?layer=%d" % L, sc.q_body(q1), octet, 400,
             "invalid_argument"),
            ("safetensors q with a wrong shape", "POST", qpath + "?layer=0", sc.q_body([q1[0][:-1]]), octet, 400,
             "invalid_argument"),
            ("corrupt kv body", "POST", kvpath, b"\x13\x00\x00\x00\x00\x00\x00\x00{not json at all}", octet, 400,
             "invalid_argument"),
            ("random kv body", "POST", kvpath, bytes(range(256)) * 4, octet, 400, "invalid_argument"),
            ("truncated kv body", "POST", kvpath, good_kv[:-7], octet, 400, "invalid_argument"),
            ("kv header length past the end", "POST", kvpath, b"\xff" * 8 + good_kv[8:], octet, 400, "invalid_argument"),
            ("empty kv body", "POST", kvpath, b"", octet, 400, "invalid_argument"),
            ("kv with the wrong layer count", "POST", kvpath, kv(layers=L + 1), octet, 400, "invalid_argument"),
            ("kv in F64", "POST", kvpath, kv(dtype="F64"), octet, 400, "invalid_argument"),
            ("kv with a NaN", "POST", kvpath, kv(values=[float("nan")] + [0.5] * (L * G * 4 * D - 1)), octet, 400,
             "invalid_argument"),
            ("kv with an Inf", "POST", kvpath, kv(values=[0.5] * (L * G * 4 * D - 1) + [float("inf")]), octet, 400,
             "invalid_argument"),
            ("kv without v", "POST", kvpath, kv(names=("k", "w")), octet, 400, "invalid_argument"),
            ("synthetic with 0 tokens", "POST", synpath, {"tokens": 0}, None, 400, "invalid_argument"),
            ("synthetic tokens as a string", "POST", synpath, {"tokens": "many"}, None, 400, "invalid_argument"),
            ("synthetic needle before the append", "POST", synpath, {"tokens": 10, "needles": [3]}, None, 400,
             "invalid_argument"),
            ("synthetic needle after the append", "POST", synpath, {"tokens": 10, "needles": [10 ** 9]}, None, 400,
             "invalid_argument"),
            ("synthetic negative needle", "POST", synpath, {"tokens": 10, "needles": [-1]}, None, 400,
             "invalid_argument"),
            ("synthetic negative seed", "POST", synpath, {"tokens": 10, "seed": -3}, None, 400, "invalid_argument"),
            ("create with a bad body", "POST", "/v1/contexts", "{oops", None, 400, "invalid_argument"),
            # ~140 KB requests that once killed the job: quoting a deeply nested value in the error
            # serialized it recursively and overflowed rank 0's stack.
            ("synthetic seed nested 70,000 deep", "POST", synpath, '{"tokens": 10, "seed": %s}' % deep, None, 400,
             "invalid_argument"),
            ("synthetic needle nested 70,000 deep", "POST", synpath, '{"tokens": 10, "needles": [%s]}' % deep, None,
             400, "invalid_argument"),
            ("synthetic_q seed nested 70,000 deep", "POST", qpath,
             '{"layer": 0, "synthetic_q": {"seed": %s}}' % deep, None, 400, "invalid_argument"),
            ("safetensors dtype nested 70,000 deep", "POST", kvpath, raw_st('{"k":{"dtype":%s}}' % deep), octet, 400,
             "invalid_argument"),
            ("safetensors shape nested 70,000 deep", "POST", kvpath,
             raw_st('{"k":{"dtype":"F32","shape":%s,"data_offsets":[0,0]}}' % deep), octet, 400, "invalid_argument"),
            ("safetensors data_offsets nested 70,000 deep", "POST", kvpath,
             raw_st('{"k":{"dtype":"F32","shape":[0],"data_offsets":%s}}' % deep), octet, 400, "invalid_argument"),
            ("a 200 KB unknown field", "POST", synpath, '{"tokens": 10, "%s": 1}' % ("x" * 200000), None, 400,
             "invalid_argument"),
            ("query unknown context", "POST", "/v1/contexts/999999/query", qbody(), None, 404, "not_found"),
            ("kv to unknown context", "POST", "/v1/contexts/999999/kv", good_kv, octet, 404, "not_found"),
            ("synthetic on unknown context", "POST", "/v1/contexts/999999/synthetic", {"tokens": 5}, None, 404,
             "not_found"),
            ("get unknown context", "GET", "/v1/contexts/999999", None, None, 404, "not_found"),
            ("delete unknown context", "DELETE", "/v1/contexts/999999", None, None, 404, "not_found"),
            ("non-numeric context id", "GET", "/v1/contexts/abc", None, None, 404, "not_found"),
            ("unknown route", "GET", "/v2/models", None, None, 404, "not_found"),
            ("unknown sub-route", "POST", "/v1/contexts/%d/bogus" % ctx["id"], "{}", None, 404, "not_found"),
            ("wrong method on contexts", "PUT", "/v1/contexts", "{}", None, 405, "method_not_allowed"),
            ("wrong method on query", "GET", qpath, None, None, 405, "method_not_allowed"),
            ("wrong method on health", "POST", "/health/live", "", None, 405, "method_not_allowed"),
            ("body over the limit", "POST", kvpath, b"\0" * (1048576 + 1), octet, 413, "payload_too_large"),
            ("capacity: more tokens than all ranks hold", "POST", synpath, {"tokens": 1000000}, None, 507,
             "capacity_exhausted"),
            ("capacity: one rank over its share", "POST", synpath, {"tokens": 399000}, None, 507, "capacity_exhausted"),
        ]
        for what, method, path, body, ct, status, code in cases:
            r = cl.request(method, path, body=body, content_type=ct)
            c.error(r, status, code, what)
            c.check(len(r.body) < 2048, "%s: the error body is short (%d bytes)" % (what, len(r.body)))
            if status == 405:
                c.check(bool(r.header("Allow")), "%s: Allow header" % what)
            if status == 413:
                c.check("1048576" in r.json()["error"]["message"], "413 names the limit: %s" % r.body[:200])
            c.check(self.snapshot(cl) == before, "%s changed nothing" % what)
        # max_contexts: fill up, 507, then give them back.
        made = []
        for _ in range(20):
            r = cl.request("POST", "/v1/contexts")
            if r.status != 201:
                break
            made.append(r.json()["id"])
        c.error(r, 507, "capacity_exhausted", "creating more than capacity.max_contexts")
        for cid in made:
            c.check(cl.request("DELETE", "/v1/contexts/%d" % cid).status == 200, "delete filler context")
        c.check(cl.request("DELETE", "/v1/contexts/%d" % empty["id"]).status == 200, "delete the empty context")
        # The same good query gives the same answer as before the bad ones.
        path, body, ct, want = self.good
        r = cl.request("POST", path, body=body, content_type=ct)
        c.check(r.status == 200 and same_answer(r.json(), want, tol=0.0), "the good query after bad inputs")
        c.check(cl.request("GET", "/health/ready").status == 200, "still ready after bad inputs")
        print("bad inputs: %d cases" % len(cases), flush=True)

    # ------------------------------------------------------------ slow clients

    def slow_client(self, svc, cl):
        c = self.c
        s = socket.create_connection(("127.0.0.1", svc.port), timeout=15)
        t0 = time.time()
        s.sendall(b"POST /v1/contexts HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789")
        closed = False
        try:
            while s.recv(4096):
                pass
            closed = True
        except ConnectionResetError:
            closed = True
        except socket.timeout:
            closed = False
        elapsed = time.time() - t0
        s.close()
        c.check(closed and elapsed < 2 + 5, "a slow client is cut off after the request timeout (%.1fs)" % elapsed)
        # Expect: 100-continue (curl sends it for larger bodies): the interim response comes first.
        s = socket.create_connection(("127.0.0.1", svc.port), timeout=15)
        s.sendall(b"POST /v1/contexts HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + API_KEY.encode() +
                  b"\r\nContent-Type: application/json\r\nExpect: 100-continue\r\nContent-Length: 2\r\nConnection: close\r\n\r\n")
        interim = s.recv(4096)
        s.sendall(b"{}")
        rest = b""
        while True:
            data = s.recv(4096)
            if not data:
                break
            rest += data
        s.close()
        c.check(interim.startswith(b"HTTP/1.1 100"), "Expect: 100-continue gets 100 first: %r" % interim[:40])
        c.check((interim + rest).count(b"HTTP/1.1 201") == 1, "then the real response: %r" % rest[:60])
        made = json.loads((interim + rest).split(b"\r\n\r\n")[-1])
        c.check(cl.request("DELETE", "/v1/contexts/%d" % made["id"]).status == 200, "delete the 100-continue context")
        c.check(cl.request("GET", "/health/ready").status == 200, "still serving after a slow client")

    # ------------------------------------------------------------ load

    def load_test(self, svc):
        c = self.c
        total, clients = self.args.load_queries, self.args.load_clients
        stats = self.load_round(svc, total, clients)
        # Batching needs queries to arrive while a step runs: on a loaded 2-core machine one round
        # can go by without overlap, so up to two more rounds look for it (a service that never
        # batches fails all three).
        rounds = 1
        while stats["max_batch"] <= 1 and rounds < 3 and not stats["errors"]:
            more = self.load_round(svc, total, clients)
            rounds += 1
            stats["max_batch"] = more["max_batch"]
            stats["errors"] += more["errors"]
        c.check(stats["max_batch"] > 1, "load test: concurrent queries were batched (largest %d in %d round(s))"
                % (stats["max_batch"], rounds))

    def load_round(self, svc, total, clients):
        """`total` queries from `clients` threads, every answer checked; returns the counts."""
        c = self.c
        lock = threading.Lock()
        stats = {"ok": 0, "errors": [], "max_batch": 0, "answered": set()}
        counter = iter(range(total))

        def worker():
            cl = svc.client(timeout=120)
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    break
                path, body, ct, want = self.requests[i % len(self.requests)]
                rid = "load-%d" % i
                try:
                    r = cl.request("POST", path, body=body, content_type=ct, headers={"X-Request-Id": rid})
                    ok = r.status == 200 and r.header("X-Request-Id") == rid
                    got = r.json() if r.status == 200 else None
                    ok = ok and same_answer(got, want)
                    err = None if ok else "%s: %d %s" % (rid, r.status, r.body[:200])
                except Exception as e:  # noqa: BLE001 - every failure is counted
                    got, err = None, "%s: %r" % (rid, e)
                with lock:
                    if err:
                        stats["errors"].append(err)
                    else:
                        stats["ok"] += 1
                        stats["answered"].add(i)
                        stats["max_batch"] = max(stats["max_batch"], got["timing"]["batch_size"])
            cl.close()

        t0 = time.time()
        threads = [threading.Thread(target=worker) for _ in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.time() - t0
        self.load_report = (total, clients, len(stats["errors"]), elapsed, stats["max_batch"])
        print("load: %d queries from %d clients in %.2fs (%.0f/s), %d errors, largest batch %d" %
              (total, clients, elapsed, total / elapsed, len(stats["errors"]), stats["max_batch"]), flush=True)
        for e in stats["errors"][:5]:
            print("  load error: " + e, flush=True)
        c.check(not stats["errors"], "load test: no errors (%d)" % len(stats["errors"]))
        c.check(stats["ok"] == total and len(stats["answered"]) == total, "load test: nothing lost")
        return stats

    # ------------------------------------------------------------ queue full, drain

    def run_drain(self):
        c = self.c
        config = make_config(self.args.config, self.path("drain.yaml"),
                             {"tokens_per_rank": 1000000, "max_contexts": 4},
                             {"queue_depth": 3, "max_batch": 1, "http_threads": 4, "request_timeout_s": 5},
                             self.args.backend)
        svc = self.start(config, "drain.log")
        svc.wait_ready()
        cl = svc.client()
        ctx = cl.request("POST", "/v1/contexts").json()
        r = cl.request("POST", "/v1/contexts/%d/synthetic" % ctx["id"], body={"tokens": 300000, "seed": 3})
        c.check(r.status == 200, "large synthetic context: %d %s" % (r.status, r.body[:200]))
        path = "/v1/contexts/%d/query" % ctx["id"]
        body = {"layer": 0, "synthetic_q": {"seed": 3, "qlen": 32}}
        cl.request("POST", path, body=body)  # warm-up: the first step of a backend may set up its workspace
        r = cl.request("POST", path, body=body)
        c.check(r.status == 200, "slow query: %d" % r.status)
        want = r.json()
        want = {"recalled": [x["chunk"] for x in want["recalled_chunks"]], "out": want["out"]}
        step_ms = r.json()["timing"]["total_ms"]

        def burst(n, results, barrier=None):
            def one(k):
                cl_ = svc.client(timeout=120)
                if barrier:
                    barrier.wait()
                try:
                    results[k] = cl_.request("POST", path, body=body)
                except Exception as e:  # noqa: BLE001
                    results[k] = e
                cl_.close()
            threads = [threading.Thread(target=one, args=(k,)) for k in range(n)]
            for t in threads:
                t.start()
            return threads

        # Queue full: 24 at once against a queue of 3.
        results = [None] * 24
        for t in burst(24, results, threading.Barrier(24)):
            t.join()
        full = [r for r in results if isinstance(r, sc.Response) and r.status == 503]
        good = [r for r in results if isinstance(r, sc.Response) and r.status == 200]
        c.check(len(full) + len(good) == 24, "queue full: every request answered 200 or 503: %s" %
                [getattr(r, "status", r) for r in results])
        # Only a slow step reliably leaves requests waiting (the cpu backend at this size).
        slow = step_ms >= 20
        c.check(len(full) >= 1 or not slow, "queue full: some requests got 503 (%d)" % len(full))
        for r in full[:3]:
            c.error(r, 503, "unavailable", "queue full")
            c.check(r.header("Retry-After") is not None, "queue full: Retry-After")
        c.check(all(same_answer(r.json(), want) for r in good), "queue full: the accepted queries are right")
        print("queue full: %d of 24 refused with 503 (step %.0f ms)" % (len(full), step_ms), flush=True)

        # Drain: queries in flight when SIGTERM arrives still finish; readiness turns 503.
        results = [None] * 3
        threads = burst(3, results)
        time.sleep(min(0.5, max(0.02, step_ms / 2000.0)))
        svc.terminate_rank0()
        time.sleep(0.05)
        probe = svc.client(api_key=None)
        try:
            r = probe.request("GET", "/health/ready")
            c.error(r, 503, "unavailable", "readiness while draining")
            r = probe.request("POST", "/v1/contexts")
            c.error(r, 503, "unavailable", "new work while draining")
        except OSError as e:
            # With a fast step the drain may be over (and the listener closed) already.
            c.check(not slow, "the listener answers while draining: %r" % e)
        for t in threads:
            t.join()
        c.check(all(isinstance(r, sc.Response) and r.status == 200 and same_answer(r.json(), want) for r in results),
                "in-flight queries finish during the drain: %s" % [getattr(r, "status", r) for r in results])
        rc_exit = svc.wait(60)
        c.check(rc_exit == 0, "drained service exit status: %s" % rc_exit)
        lines = svc.log_lines()
        drain = [l for l in lines if l.get("msg") == "draining"]
        c.check(bool(drain), "rank 0 logged the drain")
        c.check({l.get("rank") for l in lines if l.get("msg") == "shut down"} == {0, 1}, "every rank shut down")
        if drain:
            print("drain: %d queued at SIGTERM, all answered" % drain[0].get("queued", -1), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--server", required=True, help="reattn-server binary")
    p.add_argument("--run", required=True, help="reattn-run binary")
    p.add_argument("--mpirun", default="mpirun")
    p.add_argument("--config", required=True, help="a config whose model and reattention sections are used")
    p.add_argument("--load-queries", type=int, default=2000)
    p.add_argument("--load-clients", type=int, default=16)
    p.add_argument("--backend", default="cpu", choices=["cpu", "cuda"],
                   help="backend of the service and of reattn-run (the same on both)")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs, data)")
    args = p.parse_args()

    def stop(signo, frame):  # SIGTERM/SIGINT to the test: unwind so the servers are killed
        raise SystemExit("test stopped by signal %d" % signo)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    tmp = tempfile.mkdtemp(prefix="reattn-http-")
    suite = Suite(args, tmp)
    return sc.run_suite(suite, [suite.run_main, suite.run_drain], tmp, args.keep)

if __name__ == "__main__":
    sys.exit(main())
