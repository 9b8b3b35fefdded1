#!/usr/bin/env python3
"""Performance model of one ReAttention query step, fitted to the measured 1- and 2-GPU runs
(bench/results/scaling-*.json from bench/run_scaling.sh), checked against them, and projected
to 8, 16 and 64 GPUs over NVLink and InfiniBand. bench/NOTES.md ("Performance model") explains
each term. Writes bench/results/projection.json and prints the fit, its residuals, the
projection and the capacity tables.

    /usr/bin/python3 bench/perf_model.py [--results bench/results/scaling-nvidia-h200.json]

Step latency (ms), for P ranks, n tokens, b queries of qlen rows in one step:
  t = t_ctrl + t_score + t_merge + t_final
  t_ctrl  = c0 + c1*[P>1]*log2(P) + c2*b*qlen      plan broadcast (MPI), reply handling
  t_score = s0 + b*(s1 + max(K_rank/(eff*BW), qlen*G*keys_rank/R_pair))
  t_merge = allgather(P, cand_bytes(b)) + m0 + m1*b*qlen  candidate allgather + host selection
  t_final = a0 + b*(a1 + a2*(qlen-1))              owner's windowed attention (sinks+R chunks+W)
          + gather:  b*(msgs*alpha_msg + bytes_remote/B_link)   chunk K/V to the owner
          + partial: [P>1]*(x0 + b*peers*(x1 + state_bytes/B_link)) (out,max,sum) to the owner
  allgather(P, m) = g0 + (P-1)*(alpha_hop + m/B_link)         ring, one hop per step
K_rank: bytes of mid keys on the busiest rank; BW: measured per-GPU read bandwidth.
"""

import argparse
import json
import math
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))

# Link figures the projection assumes (not measured here, except where noted).
LINKS = {
    "nvlink": {
        "what": "NVLink 4 (H100/H200 SXM): 18 links, 450 GB/s per direction per GPU (datasheet); "
                "the model uses the allgather bandwidth and per-hop latency measured between the two "
                "H200s of the run (NCCL, NVLS off) instead of the datasheet figure",
        "datasheet_gbs": 450.0,
    },
    "infiniband": {
        "what": "InfiniBand NDR, one 400 Gb/s NIC per GPU: 50 GB/s per direction per GPU line rate, and "
                "5 us more per hop or message than the NVLink figures measured here (NIC, switch; assumed, "
                "typical of NDR fabrics; no multi-node run was made)",
        "gbs": 50.0,
        "extra_alpha_us": 5.0,
    },
    "gpus_per_node": 8,
}

# HBM per GPU (bytes) as the driver reports it; H200 from nvidia-smi in the run (143771 MiB),
# H100 SXM 80 GB nominal (81559 MiB as nvidia-smi reports it on H100 80GB HBM3; not measured here).
HBM = {"H200": 143771 * 2**20, "H100": 81559 * 2**20}

MODELS = {
    "llama3.1-8b": {"layers": 32, "q_heads": 32, "kv_heads": 8, "head_dim": 128},
    "qwen2-1.5b": {"layers": 28, "q_heads": 12, "kv_heads": 2, "head_dim": 128},
}
RC = {"sink_tokens": 32, "local_window": 4096, "chunk_tokens": 64, "top_k": 4, "max_recall_chunks": 32}
ESIZE = 2  # bf16


def num_chunks(n, rc=RC):
    S, W, C = rc["sink_tokens"], rc["local_window"], rc["chunk_tokens"]
    return (n - S - W) // C if n - S - W >= C else 0


def chunks_on_busiest_rank(n, P, rc=RC):
    return math.ceil(num_chunks(n, rc) / P)


def rel_lstsq(A, y, scale=None):
    """Least squares on relative errors (each equation divided by its measured value, or by
    `scale`, e.g. the row's whole latency), so the long qlen-128 steps do not drown the
    sub-millisecond ones."""
    A, y = np.asarray(A, float), np.asarray(y, float)
    w = 1.0 / np.maximum(np.abs(y if scale is None else np.asarray(scale, float)), 1e-3)
    sol, *_ = np.linalg.lstsq(A * w[:, None], y * w, rcond=None)
    return sol


class Model:
    def __init__(self, m=MODELS["llama3.1-8b"], rc=RC):
        self.m, self.rc = m, rc
        self.block_bytes = m["kv_heads"] * rc["chunk_tokens"] * m["head_dim"] * ESIZE
        self.p = {}

    # --- terms ---------------------------------------------------------------------------------
    def key_bytes_rank(self, n, P):
        return chunks_on_busiest_rank(n, P, self.rc) * self.block_bytes

    def keys_rank(self, n, P):  # key vectors (per KV head) the busiest rank scores
        return chunks_on_busiest_rank(n, P, self.rc) * self.rc["chunk_tokens"] * self.m["kv_heads"]

    def cand_bytes(self, b, qlen):
        return b * (8 + qlen * self.m["q_heads"] * self.rc["top_k"] * 8)

    def state_bytes(self, qlen):
        return qlen * self.m["q_heads"] * (self.m["head_dim"] + 2) * 4

    def link(self, P):
        """(alpha_hop_us, bandwidth_gbs) of the slowest hop of a ring over P GPUs."""
        if P <= LINKS["gpus_per_node"]:
            return self.p["alpha_hop_us"], self.p["link_gbs"]
        return self.p["alpha_hop_us"] + LINKS["infiniband"]["extra_alpha_us"], LINKS["infiniband"]["gbs"]

    def allgather_ms(self, P, m):
        if P == 1:
            return self.p["g0_us"] / 1e3
        alpha, bw = self.link(P)
        return (self.p["g0_us"] + (P - 1) * (alpha + m / (bw * 1e3))) / 1e3

    def remote_chunk_msgs(self, P):
        R = self.rc["max_recall_chunks"]
        return 2.0 * R * (P - 1) / P  # K and V of each recalled chunk not on the owner

    def gather_ms(self, P, b):
        if P == 1:
            return 0.0
        msgs = self.remote_chunk_msgs(P)
        nbytes = msgs * self.block_bytes
        off = self.off_node_fraction(P)
        # Chunks from other nodes share the owner's NIC; those from its own node come over NVLink.
        xfer = max(nbytes * off / (LINKS["infiniband"]["gbs"] * 1e6), nbytes * (1 - off) / (self.p["link_gbs"] * 1e6))
        alpha = self.p["alpha_msg_us"] + off * LINKS["infiniband"]["extra_alpha_us"]
        return b * (msgs * alpha / 1e3 + xfer)

    @staticmethod
    def off_node_fraction(P):
        """Share of the other ranks that sit on another node than the owner."""
        n = LINKS["gpus_per_node"]
        return 0.0 if P <= n else (P - n) / (P - 1)

    def partial_ms(self, P, b, qlen):
        if P == 1:
            return 0.0
        peers = min(P - 1, self.rc["max_recall_chunks"])
        off = self.off_node_fraction(P)
        per_peer_us = self.p["x1_us"] + off * LINKS["infiniband"]["extra_alpha_us"]
        bw = LINKS["infiniband"]["gbs"] if off > 0 else self.p["link_gbs"]
        return self.p["x0_ms"] + b * peers * (per_peer_us / 1e3 + self.state_bytes(qlen) / (bw * 1e6))

    def terms(self, n, P, b, qlen, strategy, read_bw_gbs):
        p, G = self.p, self.m["q_heads"] // self.m["kv_heads"]
        mem = self.key_bytes_rank(n, P) / (p["eff"] * read_bw_gbs * 1e6)
        compute = qlen * G * self.keys_rank(n, P) / (p["r_pair_g"] * 1e6) if qlen > 1 else 0.0
        t_score = p["s0"] + b * (p["s1"] + max(mem, compute))
        t_merge = self.allgather_ms(P, self.cand_bytes(b, qlen)) + p["m0"] + p["m1"] * b * qlen
        t_final = p["a0"] + b * (p["a1"] + p["a2"] * (qlen - 1))
        t_final += self.gather_ms(P, b) if strategy == "gather" else self.partial_ms(P, b, qlen)
        t_ctrl = p["c0"] + p["c1"] * (math.log2(P) if P > 1 else 0) + p["c2"] * b * qlen
        return {"ctrl": t_ctrl, "score": t_score, "merge": t_merge, "final": t_final,
                "total": t_ctrl + t_score + t_merge + t_final}

    # --- fit -----------------------------------------------------------------------------------
    def fit(self, rows, probes, read_bw):
        """rows: qlen-1 and qlen>1 rows of the runs; probes: {P: [comm probe points]}."""
        p = self.p
        # Collectives from the probe: g0 = the 1-rank call (launch + sync); per-hop latency and
        # link bandwidth from a least-squares line through the 2-rank points.
        p["g0_us"] = min(c["allgather_us"] for c in probes[1])
        xs = np.array([c["bytes_per_rank"] for c in probes[2]], float)
        ys = np.array([c["allgather_us"] for c in probes[2]], float)
        A = np.stack([np.ones_like(xs), xs], 1)
        (icpt, slope), *_ = np.linalg.lstsq(A, ys, rcond=None)
        p["alpha_hop_us"] = icpt - p["g0_us"]
        p["link_gbs"] = 1.0 / slope / 1e3

        q1 = [r for r in rows if r["qlen"] == 1]
        # Score phase, qlen 1: s0 + b*s1 + b*K_rank/(eff*BW).
        A = np.array([[1.0, r["batch"], r["batch"] * self.key_bytes_rank(r["tokens"], r["ranks"]) / (read_bw[r["ranks"]] * 1e6)]
                      for r in q1])
        y = np.array([r["score_ms"] for r in q1])
        s0, s1, inv_eff = rel_lstsq(A, y)
        p.update(s0=s0, s1=s1, eff=1.0 / inv_eff)
        # Compute term for qlen > 1: score - s0 - b*s1 = b*qlen*G*keys/R_pair.
        G = self.m["q_heads"] // self.m["kv_heads"]
        qn = [r for r in rows if r["qlen"] > 1]
        if qn:
            x = np.array([r["batch"] * r["qlen"] * G * self.keys_rank(r["tokens"], r["ranks"]) / 1e6 for r in qn])
            yq = np.array([r["score_ms"] - s0 - r["batch"] * s1 for r in qn])
            p["r_pair_g"] = float(x @ x / (x @ yq))  # pair-key dot products per ms, /1e6 -> G per s
        # Merge: allgather model + m0 + m1*b*qlen.
        A = np.array([[1.0, r["batch"] * r["qlen"]] for r in rows])
        y = np.array([r["merge_ms"] - self.allgather_ms(r["ranks"], self.cand_bytes(r["batch"], r["qlen"])) for r in rows])
        p["m0"], p["m1"] = rel_lstsq(A, y)
        # Owner's attention: 1-rank rows (both strategies are the same there).
        one = [r for r in rows if r["ranks"] == 1]
        A = np.array([[1.0, r["batch"], r["batch"] * (r["qlen"] - 1)] for r in one])
        p["a0"], p["a1"], p["a2"] = rel_lstsq(A, np.array([r["attn_ms"] for r in one]))
        # gather: per-message cost from the 2-rank rows (transfer time at the link bandwidth removed).
        g2 = [r for r in q1 if r["ranks"] > 1 and r["strategy"] == "gather"]
        msgs = self.remote_chunk_msgs(2)
        xfer = msgs * self.block_bytes / (p["link_gbs"] * 1e6)
        per_query = np.array([(r["attn_ms"] - p["a0"] - p["a1"] * r["batch"]) / r["batch"] for r in g2])
        p["alpha_msg_us"] = float(max(0.0, (np.median(per_query) - xfer) / msgs * 1e3))
        # partial: x0 + b*(x1 + state/B) with one peer.
        pp = [r for r in q1 if r["ranks"] > 1 and r["strategy"] == "partial"]
        A = np.array([[1.0, r["batch"]] for r in pp])
        y = np.array([r["attn_ms"] - p["a0"] - p["a1"] * r["batch"] - r["batch"] * self.state_bytes(1) / (p["link_gbs"] * 1e6)
                      for r in pp])
        x0, x1 = rel_lstsq(A, y, scale=[r["p50_ms"] for r in pp])
        p["x0_ms"], p["x1_us"] = float(x0), float(x1 * 1e3)
        # Control: p50 - the step's phases.
        A = np.array([[1.0, math.log2(r["ranks"]) if r["ranks"] > 1 else 0.0, r["batch"] * r["qlen"]] for r in rows])
        y = np.array([r["p50_ms"] - r["score_ms"] - r["merge_ms"] - r["attn_ms"] for r in rows])
        p["c0"], p["c1"], p["c2"] = rel_lstsq(A, y, scale=[r["p50_ms"] for r in rows])
        for k in list(p):
            p[k] = float(p[k])
        return p


def load_rows(path):
    doc = json.load(open(path))
    rows, probes, read_bw, device = [], {}, {}, None
    for run in doc["runs"]:
        device = run["device"]
        P = run["ranks"]
        read_bw.setdefault(P, [])
        read_bw[P].append(min(run["read_bw_gbs_per_rank"]))
        if run.get("comm_probe"):
            probes[P] = run["comm_probe"]
        for r in run["rows"]:
            rows.append(dict(r, run=run["label"]))
    return rows, probes, {P: float(np.median(v)) for P, v in read_bw.items()}, device


def residual_table(model, rows, read_bw, title):
    out = []
    print("\n%s" % title)
    print("  %-9s %9s %2s %8s %4s %5s %9s %9s %7s" % ("run", "tokens", "P", "strategy", "qlen", "batch", "measured", "model", "error"))
    for r in rows:
        t = model.terms(r["tokens"], r["ranks"], r["batch"], r["qlen"], r["strategy"], read_bw[r["ranks"]])["total"]
        err = (t - r["p50_ms"]) / r["p50_ms"]
        out.append({"run": r["run"], "tokens": r["tokens"], "ranks": r["ranks"], "strategy": r["strategy"], "qlen": r["qlen"],
                    "batch": r["batch"], "measured_p50_ms": r["p50_ms"], "model_ms": t, "rel_error": err})
        print("  %-9s %9d %2d %8s %4d %5d %9.3f %9.3f %+6.1f%%" % (r["run"], r["tokens"], r["ranks"], r["strategy"], r["qlen"],
                                                             r["batch"], r["p50_ms"], t, 100 * err))
    errs = [abs(o["rel_error"]) for o in out]
    print("  |error|: median %.1f%%, max %.1f%% over %d rows" % (100 * float(np.median(errs)), 100 * max(errs), len(errs)))
    return out


def fits_one_gpu(n, P, layers, m, hbm, reserve):
    per_token = layers * m["kv_heads"] * m["head_dim"] * ESIZE * 2
    return math.ceil(n / P) * per_token + reserve <= hbm


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default=os.path.join(HERE, "results", "scaling-nvidia-h200.json"))
    ap.add_argument("--qwen", default=os.path.join(HERE, "results", "qwen-needles-nvidia-h200.json"))
    ap.add_argument("--out", default=os.path.join(HERE, "results", "projection.json"))
    a = ap.parse_args()

    rows, probes, read_bw, device = load_rows(a.results)
    rows = [r for r in rows if r["tokens"] >= (1 << 20)]  # below 1M the kernel's ramp-up dominates
    model = Model()
    params = model.fit(rows, probes, read_bw)
    print("device: %s; read bandwidth per GPU: %s GB/s" % (device, {P: round(v) for P, v in read_bw.items()}))
    print("fitted parameters (rows with >= 1M tokens, 1 and 2 GPUs):")
    for k, v in params.items():
        print("  %-14s %.4g" % (k, v))
    resid = residual_table(model, sorted(rows, key=lambda r: (r["run"], r["tokens"], r["strategy"], r["qlen"], r["batch"])),
                           read_bw, "fit residuals (model vs measured p50, every row used in the fit):")

    # Out-of-sample: fit on contexts of at most 2M tokens, predict the 4M and 8M rows.
    small = [r for r in rows if r["tokens"] <= (2 << 20)]
    large = [r for r in rows if r["tokens"] > (2 << 20)]
    held = Model()
    held.fit(small, probes, read_bw)
    hold = residual_table(held, sorted(large, key=lambda r: (r["run"], r["tokens"], r["strategy"], r["batch"])), read_bw,
                          "hold-out check: fitted on <= 2M-token contexts only, predicting the 4M and 8M rows:")

    # Projection: one layer of LLaMA-3.1-8B shapes, qlen 1.
    bw = read_bw[1]
    reserve = 2.0 * 2**30  # CUDA context, NCCL, workspaces, ring: 1.5-2.0 GiB measured in the 4M Qwen run
    proj = []
    print("\nprojection: one layer of LLaMA-3.1-8B shapes, qlen 1, per-GPU read bandwidth %.0f GB/s (H200, measured);"
          " ms per step; '-' = one layer does not fit in H200 HBM;\n'32 layers' = one decode token's 32 layer"
          " queries in sequence (partial, batch 1), where all 32 layers fit" % bw)
    print("  %8s %4s %-7s %9s %9s %9s %9s %11s %11s" % ("tokens", "GPUs", "link", "gather b1", "partial b1", "gather b32",
                                                         "partial b32", "score b1", "32 layers"))
    for n in (4 << 20, 16 << 20, 64 << 20):
        for P in (1, 2, 4, 8, 16, 64):
            link = "nvlink" if P <= LINKS["gpus_per_node"] else "ib"
            ok = fits_one_gpu(n, P, 1, model.m, HBM["H200"], reserve)
            res = {}
            for s in ("gather", "partial"):
                for b in (1, 32):
                    res["%s_b%d" % (s, b)] = model.terms(n, P, b, 1, s, bw) if ok else None
            full = fits_one_gpu(n, P, model.m["layers"], model.m, HBM["H200"], reserve)
            per_token = model.m["layers"] * res["partial_b1"]["total"] if full else None
            proj.append({"tokens": n, "gpus": P, "link": link, "fits_one_layer_h200": ok,
                         "ms": {k: (v["total"] if v else None) for k, v in res.items()},
                         "terms_partial_b1": res["partial_b1"], "terms_gather_b1": res["gather_b1"],
                         "full_model_decode_token_ms_partial": per_token})
            f = lambda v: ("%9.3f" % v["total"]) if v else "%9s" % "-"  # noqa: E731
            print("  %8s %4d %-7s %s %s %s %s %11s %11s" % (
                "%dM" % (n >> 20), P, link, f(res["gather_b1"]), f(res["partial_b1"]), f(res["gather_b32"]),
                f(res["partial_b32"]), ("%.3f" % res["partial_b1"]["score"]) if ok else "-",
                ("%.1f ms" % per_token) if per_token else "-"))

    # Weak scaling at 2M tokens per GPU (the runs of 4 and 8 GPUs that no lent machine could make).
    weak = []
    print("\nweak scaling projection: 2M tokens per GPU, one LLaMA-3.1-8B layer, qlen 1, batch 1 (ms; efficiency ="
          " 1-GPU time / P-GPU time)")
    print("  %4s %8s %9s %9s %7s %7s" % ("GPUs", "tokens", "gather", "partial", "eff g", "eff p"))
    base = {s: model.terms(2 << 20, 1, 1, 1, s, bw)["total"] for s in ("gather", "partial")}
    for P in (1, 2, 4, 8, 16, 64):
        n = P * (2 << 20)
        t = {s: model.terms(n, P, 1, 1, s, bw)["total"] for s in ("gather", "partial")}
        weak.append({"gpus": P, "tokens": n, "ms": t, "efficiency": {s: base[s] / t[s] for s in t}})
        print("  %4d %7dM %9.3f %9.3f %6.0f%% %6.0f%%" % (P, n >> 20, t["gather"], t["partial"],
                                                      100 * base["gather"] / t["gather"],
                                                      100 * base["partial"] / t["partial"]))

    # Capacity: tokens whose K/V fit, per layer and for the whole model.
    cap = []
    print("\ncapacity (bf16 K/V, %.1f GiB per GPU reserved): tokens that fit" % (reserve / 2**30))
    print("  %-12s %-5s %4s %14s %14s" % ("model", "GPU", "GPUs", "one layer", "all layers"))
    for name, m in MODELS.items():
        for gpu in ("H200", "H100"):
            for P in (1, 2, 8, 16, 64):
                per_layer_token = m["kv_heads"] * m["head_dim"] * ESIZE * 2
                free = HBM[gpu] - reserve
                one = int(free // per_layer_token) * P
                full = int(free // (per_layer_token * m["layers"])) * P
                cap.append({"model": name, "gpu": gpu, "gpus": P, "tokens_one_layer": one, "tokens_all_layers": full})
                print("  %-12s %-5s %4d %13.1fM %13.1fM" % (name, gpu, P, one / 2**20, full / 2**20))

    check = None
    if os.path.exists(a.qwen):
        q = json.load(open(a.qwen))
        qm = Model(MODELS["qwen2-1.5b"], dict(RC, top_k=q["info"]["reattention"]["top_k"],
                                                  max_recall_chunks=q["info"]["reattention"]["max_recall_chunks"]))
        qm.p = dict(params)
        pred_score = qm.terms(q["tokens"], 2, 1, 1, "partial", read_bw[2])["score"]
        meas_score = float(np.median([L["server_score_ms"] for L in q["layers"]]))
        check = {"qwen_score_model_ms": pred_score, "qwen_score_measured_ms": meas_score}
        print("\ncross-check on the Qwen2-1.5B HTTP run (4M tokens, 2 GPUs, Hkv=2): score phase model %.3f ms, "
              "measured %.3f ms (%.2fx)" % (pred_score, meas_score, meas_score / pred_score))

    doc = {"weak_scaling_2m_per_gpu": weak, "device": device, "read_bw_gbs": read_bw, "links": LINKS, "hbm_bytes": HBM, "reserve_bytes": reserve,
           "model_shapes": MODELS, "reattention": RC, "parameters": params, "residuals": resid, "holdout": hold,
           "projection": proj, "capacity": cap, "qwen_check": check,
           "source": os.path.relpath(a.results, os.path.dirname(HERE))}
    with open(a.out, "w") as f:
        json.dump(doc, f, indent=1)
    print("\nwrote %s" % a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
