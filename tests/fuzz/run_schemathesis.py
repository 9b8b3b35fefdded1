"""Schema fuzzing of reattn-server against its own OpenAPI document (issue 13 part 4).

Starts a CPU reattn-server under mpirun (2 ranks, oversubscribed, the tiny model, an API key),
fills two contexts with synthetic tokens so that generated ids 1 and 2 reach real contexts,
and runs schemathesis against GET /openapi.json with a fixed seed, a bounded number of
examples per operation and a bounded time. Fails on any 5xx, any answer whose status, content
type or body the document does not describe, or a server that stops answering (the job must
still run and /health/live and /health/ready answer 200 afterwards). Exit 77 (CTest skip) when
schemathesis is not importable.

  python3 tests/fuzz/run_schemathesis.py --server build/reattn-server --mpirun mpirun \
      --config configs/tiny.yaml --spec api/openapi.json [--max-examples 25] [--max-time 60] [--seed 1]
"""

import argparse
import json
import os
import struct
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "http"))
import service_client  # noqa: E402

SKIP = 77
# Every built-in check but positive_data_acceptance (a schema-valid body is often refused for
# reasons no static schema states: a layer past the model's, a qlen past the context, an
# out-of-order layer step), plus two of tests/fuzz/schemathesis_hooks.py: safetensors_answer for
# the binary answers schemathesis cannot read, context_lengths for tokens == min(layer_tokens).
CHECKS = ",".join(["not_a_server_error", "status_code_conformance", "content_type_conformance",
                   "response_schema_conformance", "response_headers_conformance", "negative_data_rejection",
                   "missing_required_header", "unsupported_method", "allow_header_conformance", "use_after_free",
                   "ensure_resource_availability", "ignored_auth", "safetensors_answer", "context_lengths"])


def fuzz_config(base_path, directory):
    """The tiny model with a small capacity, so fuzzed synthetic fills stay quick (507 beyond)."""
    with open(base_path) as f:
        text = f.read()
    lines = [l for l in text.splitlines() if not l.startswith("capacity:")]
    lines.append("capacity: {tokens_per_rank: 65536, max_contexts: 64}")
    path = os.path.join(directory, "fuzz.yaml")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def write_kv_file(path, model, tokens):
    """k and v [layers, kv_heads, tokens, head_dim] in F32, small finite values."""
    shape = [model["layers"], model["kv_heads"], tokens, model["head_dim"]]
    count = shape[0] * shape[1] * shape[2] * shape[3]
    data = struct.pack("<%df" % count, *[((i * 37) % 101) / 101.0 - 0.5 for i in range(count)])
    header = json.dumps({name: {"dtype": "F32", "shape": shape, "data_offsets": [i * len(data), (i + 1) * len(data)]}
                         for i, name in enumerate(("k", "v"))}).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header + data + data)


def nested(sizes):
    """Nested arrays of numbers with each level's size range: [(lo, hi), ...]."""
    schema = {"type": "number"}
    for lo, hi in reversed(sizes):
        schema = {"type": "array", "minItems": lo, "maxItems": hi, "items": schema}
    return schema


def specialise(doc, info):
    """The document with the served model's shapes filled in, so that generated JSON tensors
    often fit (a generic nested array of numbers almost never has [qlen][q_heads][head_dim]):
    the fuzzer then reaches the query and the layer step, not only their shape checks. Only
    rules the server enforces are added (negative_data_rejection holds the server to them);
    response schemas are left as they are."""
    m = info["model"]
    rows = (1, 3)
    schemas = doc["components"]["schemas"]
    schemas["QueryRequest"]["properties"]["q"] = nested([rows, (m["q_heads"],) * 2, (m["head_dim"],) * 2])
    step = schemas["StepRequest"]["properties"]
    step["q"] = nested([rows, (m["q_heads"],) * 2, (m["head_dim"],) * 2])
    for name in ("k", "v"):
        step[name] = nested([(m["kv_heads"],) * 2, rows, (m["head_dim"],) * 2])
    for name in ("QueryRequest", "StepRequest"):
        schemas[name]["properties"]["layer"]["maximum"] = m["layers"] - 1
    return doc


def expect(cond, what):
    if not cond:
        raise AssertionError(what)


def check_value_limit(c, info):
    m = info["model"]
    r = c.request("POST", "/v1/contexts")
    if r.status == 507:  # the fuzzer filled max_contexts; the unit tests cover the rule too
        return
    expect(r.status == 201, "create: %d %s" % (r.status, r.body[:200]))
    cid = r.json()["id"]
    r = c.request("POST", "/v1/contexts/%d/synthetic" % cid, {"tokens": 100, "seed": 3})
    expect(r.status == 200, "synthetic: %d %s" % (r.status, r.body[:200]))
    big = [[[-3e38] * m["head_dim"] for _ in range(m["q_heads"])]]
    r = c.request("POST", "/v1/contexts/%d/query" % cid, {"layer": 0, "q": big})
    expect(r.status == 400 and b"finite in fp32" in r.body, "query with q = -3e38: %d %s" % (r.status, r.body[:300]))
    k = [[[3e38] * m["head_dim"]] for _ in range(m["kv_heads"])]
    q = [[[1.0] * m["head_dim"] for _ in range(m["q_heads"])]]
    r = c.request("POST", "/v1/contexts/%d/step" % cid, {"layer": 0, "q": q, "k": k, "v": k})
    expect(r.status == 400 and b"k[0][0][0]" in r.body, "step with k = 3e38: %d %s" % (r.status, r.body[:300]))
    r = c.request("GET", "/v1/contexts/%d" % cid)
    expect(r.json()["layer_tokens"] == [100] * m["layers"], "the refused step changed the context: %s" % r.body)
    r = c.request("POST", "/v1/contexts/%d/query" % cid, {"layer": 0, "q": q, "mode": "detached"})
    expect(r.status == 200 and None not in r.json()["out"][0][0], "query after: %d %s" % (r.status, r.body[:300]))
    c.request("DELETE", "/v1/contexts/%d" % cid)
    c.close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--server", required=True)
    ap.add_argument("--mpirun", required=True)
    ap.add_argument("--config", required=True)
    ap.add_argument("--spec", required=True, help="api/openapi.json, to compare with what the server serves")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--max-examples", type=int, default=25, help="per operation and phase")
    ap.add_argument("--max-time", type=int, default=60, help="seconds for the whole schemathesis run")
    ap.add_argument("--seed", type=int, default=1, help="schemathesis --seed: the same seed draws the same cases")
    ap.add_argument("--phases", default="examples,coverage,fuzzing,stateful", help="schemathesis phases")
    ap.add_argument("--workers", type=int, default=1, help="concurrent schemathesis workers")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs, reports)")
    args = ap.parse_args()

    try:
        import schemathesis  # noqa: F401
        version = schemathesis.__version__
    except ImportError:
        print("SKIP: schemathesis is not importable (pip install schemathesis)")
        return SKIP

    work = tempfile.mkdtemp(prefix="reattn-fuzz-")
    key = "fuzz-key-1"
    key_path = os.path.join(work, "api.key")
    with open(key_path, "w") as f:
        f.write(key + "\n")
    config = fuzz_config(args.config, work)
    # Loads enabled, with one real file (written once the model is known), so fuzzed loads
    # reach the path checks and the example's load runs while other requests arrive.
    load_root = os.path.join(work, "loads")
    os.makedirs(load_root)
    svc = service_client.Service(args, config, os.path.join(work, "server.log"), ranks=args.ranks,
                                 extra=["--api-key-file", key_path, "--load-root", load_root], api_key=key)
    failed = False
    try:
        svc.wait_ready()
        c = svc.client()
        # The document is served as the file says, without the key.
        r = c.request("GET", "/openapi.json", auth=False)
        expect(r.status == 200, "GET /openapi.json: %d" % r.status)
        with open(args.spec, "rb") as f:
            expect(r.body == f.read(), "GET /openapi.json differs from %s" % args.spec)
        for i in range(2):
            r = c.request("POST", "/v1/contexts")
            expect(r.status == 201, "create: %d %s" % (r.status, r.body[:200]))
            cid = r.json()["id"]
            r = c.request("POST", "/v1/contexts/%d/synthetic" % cid, {"tokens": 2000, "seed": 7 + i, "needles": [500]})
            expect(r.status == 200, "synthetic: %d %s" % (r.status, r.body[:200]))
        c.close()

        info = c.request("GET", "/v1/info").json()
        write_kv_file(os.path.join(load_root, "kv.safetensors"), info["model"], tokens=200)
        with open(args.spec) as f:
            spec_path = os.path.join(work, "openapi.model.json")
            with open(spec_path, "w") as out:
                json.dump(specialise(json.load(f), info), out)
        base = "http://127.0.0.1:%d" % svc.port
        here = os.path.dirname(os.path.abspath(__file__))
        settings = os.path.join(here, "schemathesis.toml")
        env = dict(service_client.mpi_env(), SCHEMATHESIS_HOOKS="schemathesis_hooks",
                   PYTHONPATH=here + os.pathsep + os.environ.get("PYTHONPATH", ""),
                   REATTN_FUZZ_MODEL=json.dumps({k: info["model"][k] for k in ("layers", "q_heads", "kv_heads", "head_dim")}))
        cmd = [sys.executable, "-m", "schemathesis.cli", "--config-file", settings, "run", spec_path,
               "--url", base,
               "--checks", CHECKS,
               "--max-examples", str(args.max_examples),
               "--max-time", str(args.max_time),
               "--seed", str(args.seed),
               "--workers", str(args.workers),
               "--phases", args.phases,
               "--request-timeout", "30",
               "--header", "Authorization: Bearer " + key,
               "--suppress-health-check", "all",
               "--output-sanitize", "false",  # the key is this test's own; "tokens" fields stay readable
               "--report", "junit", "--report-dir", os.path.join(work, "report")]
        print("schemathesis %s: %s" % (version, " ".join(cmd).replace(key, "<key>")), flush=True)
        t0 = time.time()
        rc = subprocess.call(cmd, cwd=work, env=env)
        print("schemathesis exit %d after %.1f s" % (rc, time.time() - t0), flush=True)
        if rc != 0:
            failed = True
            print("FAIL: schemathesis found problems (above)")

        # What fuzzing found, replayed: finite values whose q.k overflows fp32 made NaN answers and
        # a layer step with them poisoned the context; now a 400 naming the limit, nothing changed.
        check_value_limit(svc.client(), info)

        # Still serving: the job runs and every rank answers a step.
        expect(svc.proc.poll() is None, "the server job exited during the fuzz run (%s)" % svc.proc.returncode)
        c = svc.client()
        r = c.request("GET", "/health/live")
        expect(r.status == 200, "/health/live after the run: %d" % r.status)
        r = c.request("GET", "/health/ready")
        expect(r.status == 200, "/health/ready after the run: %d %s" % (r.status, r.body[:200]))
        r = c.request("POST", "/v1/contexts")
        if r.status == 201:
            cid = r.json()["id"]
            r = c.request("POST", "/v1/contexts/%d/synthetic" % cid, {"tokens": 100, "seed": 1})
            expect(r.status == 200, "synthetic after the run: %d %s" % (r.status, r.body[:200]))
            r = c.request("POST", "/v1/contexts/%d/query" % cid, {"layer": 0, "synthetic_q": {"seed": 1}})
            expect(r.status == 200, "query after the run: %d %s" % (r.status, r.body[:200]))
        else:
            expect(r.status == 507, "create after the run: %d %s" % (r.status, r.body[:200]))
        c.close()
    except AssertionError as e:
        failed = True
        print("FAIL: %s" % e)
    finally:
        svc.kill()
        if failed or args.keep:
            print("work directory (server log, reports): %s" % work)
            if failed:
                with open(os.path.join(work, "server.log"), "rb") as f:
                    tail = f.read()[-4000:].decode(errors="replace")
                print("server log tail:\n" + tail)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
