#!/usr/bin/env python3
"""The bulk path of a layer step: steps of --qlen tokens at the LLaMA-3-8B attention shapes
(one layer, bf16 q/k/v sent as raw bits, as the transformers adapter sends them; answer out
F32), timed at the client and inside the service (total_ms, append_ms) in the same run.
What is outside them is the HTTP transfer, the client's encoding and decoding and the
server's body read, parse and answer. On a CPU use a small qlen (qlen 4096 attention is slow
there; the bytes per token are the same). With --logs, the server's log splits the time
outside the service further: the request's own time in the server ("request" lines) and the
step loop's ("operation" lines).

    python3 bench/prefill_overhead.py --backend cpu --qlen 256 --calls 6
    python3 bench/prefill_overhead.py --backend cuda --qlen 4096 --calls 12 --logs bench/out/prefill_overhead"""
import argparse, os, sys
sys.path.insert(0, os.path.join(os.getcwd(), "bench"))
import numpy as np
from model_service import REPO, Service, add_service_args, derived_config
from reattn_client.safetensors import Raw16, float32_to_bf16_bits
p = argparse.ArgumentParser(); add_service_args(p)
p.add_argument("--qlen", type=int, default=4096); p.add_argument("--calls", type=int, default=6)
a = p.parse_args()
cfg = derived_config(os.path.join(REPO, "configs", "llama3-8b.yaml"), model={"layers": 1},
                     reattention={"local_window": max(4096, a.qlen)})
svc = Service(a, "tput", cfg)
try:
    c = svc.client(); ctx = c.create_context()["id"]; rng = np.random.default_rng(0)
    q = Raw16(float32_to_bf16_bits(rng.standard_normal((a.qlen, 32, 128)).astype(np.float32)))
    k = Raw16(float32_to_bf16_bits(rng.standard_normal((8, a.qlen, 128)).astype(np.float32)))
    rows = []
    for i in range(a.calls):
        r = c.step(ctx, 0, q, k, k)
        rows.append((r.client_ms, r.timing["total_ms"], r.timing.get("append_ms", float("nan"))))
    rows = rows[1:]
    cm = np.median([x[0] for x in rows]); tm = np.median([x[1] for x in rows]); am = np.median([x[2] for x in rows])
    mb = (a.qlen * 48 * 128 * 2 + a.qlen * 32 * 128 * 4) / 2**20
    print("qlen %d body+answer %.1f MiB: client %.1f ms, service total %.1f, outside total %.1f ms (%.0f MiB/s); "
          "append %.1f, outside total+append %.1f ms" % (a.qlen, mb, cm, tm, cm - tm, mb / ((cm - tm) / 1e3), am, cm - tm - am))
    if a.logs:  # the server's own view: request (parse, queue, answer) and operation (step loop)
        import glob, json
        ms = {"request": [], "operation": []}
        for path in glob.glob(os.path.join(a.logs, "*.log")):
            for line in open(path, errors="replace"):
                if '"layer_step"' in line or '/step"' in line:
                    try:
                        e = json.loads(line)
                    except ValueError:
                        continue
                    if e.get("msg") in ms:
                        ms[e["msg"]].append(e["ms"])
        if ms["request"] and ms["operation"]:
            rq, op = np.median(ms["request"][1:] or ms["request"]), np.median(ms["operation"][1:] or ms["operation"])
            print("server log: request %.1f ms, operation %.1f ms -> parse+queue+answer %.1f ms, step loop beyond "
                  "total+append %.1f ms, client+transfer %.1f ms" % (rq, op, rq - op, op - tm - am, cm - rq))
finally:
    svc.stop()
