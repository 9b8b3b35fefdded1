#!/usr/bin/env python3
"""PNG plots from the committed scaling results (bench/results/), into bench/plots/:
strong and weak scaling (latency vs GPUs, ideal lines, the model's projection), the latency
split, queries/s vs batch, the qlen sweep, and needle recall per depth x layer.

    /usr/bin/python3 bench/plot_scaling.py [--device nvidia-h200]

Needs matplotlib (Debian: apt-get install python3-matplotlib).
"""

import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
M = 1 << 20


def rows_of(doc):
    out = []
    for run in doc["runs"]:
        for r in run["rows"]:
            out.append(dict(r, run=run["label"]))
    return out


def pick(rows, **kw):
    """The rows matching kw; the 'main' runs win over the qlen sweep for the same point."""
    found = [r for r in rows if all(r[k] == v for k, v in kw.items())]
    found.sort(key=lambda r: not r["run"].startswith("main"))
    return found


def one(rows, **kw):
    found = pick(rows, **kw)
    return found[0] if found else None


def strong_weak(rows, proj, device, out):
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = {"gather": "tab:blue", "partial": "tab:orange"}
    for s in ("gather", "partial"):
        pts = [(P, one(rows, tokens=4 * M, ranks=P, strategy=s, qlen=1, batch=1)) for P in (1, 2)]
        pts = [(P, r["p50_ms"]) for P, r in pts if r]
        a.plot([p for p, _ in pts], [t for _, t in pts], "o-", color=colors[s], label="%s, measured" % s)
        mp = [(p["gpus"], p["ms"]["%s_b1" % s]) for p in proj["projection"] if p["tokens"] == 4 * M and p["ms"]["%s_b1" % s]]
        a.plot([p for p, _ in mp], [t for _, t in mp], "x--", color=colors[s], alpha=0.6, label="%s, model" % s)
    base = one(rows, tokens=4 * M, ranks=1, strategy="partial", qlen=1, batch=1)["p50_ms"]
    gp = [1, 2, 8, 16, 64]
    a.plot(gp, [base / p for p in gp], "k:", label="ideal (1 GPU / P)")
    a.set_xscale("log", base=2)
    a.set_yscale("log")
    a.set_xticks(gp, [str(p) for p in gp])
    a.set_xlabel("GPUs")
    a.set_ylabel("query step p50 (ms)")
    a.set_title("strong scaling: 4M tokens, one LLaMA-8B layer, qlen 1")
    a.legend(fontsize=8)
    a.grid(alpha=0.3)

    for per_gpu, marker in ((2 * M, "o"), (4 * M, "s")):
        for s in ("gather", "partial"):
            pts = [(P, one(rows, tokens=per_gpu * P, ranks=P, strategy=s, qlen=1, batch=1)) for P in (1, 2)]
            pts = [(P, r["p50_ms"]) for P, r in pts if r]
            b.plot([p for p, _ in pts], [t for _, t in pts], marker + "-", color=colors[s],
                   label="%dM/GPU, %s" % (per_gpu // M, s))
        ideal = one(rows, tokens=per_gpu, ranks=1, strategy="partial", qlen=1, batch=1)["p50_ms"]
        b.plot([1, 2], [ideal, ideal], "k:", alpha=0.6)
    b.set_xticks([1, 2])
    b.set_xlabel("GPUs")
    b.set_ylabel("query step p50 (ms)")
    b.set_ylim(bottom=0)
    b.set_title("weak scaling (dotted: ideal = 1-GPU time)")
    b.legend(fontsize=8)
    b.grid(alpha=0.3)
    fig.suptitle(device, fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "scaling.png"), dpi=120)
    plt.close(fig)


def split(rows, device, out):
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, batch in zip(axes, (1, 32)):
        labels, parts = [], {"score": [], "merge": [], "attention": [], "other": []}
        for P in (1, 2):
            for s in ("gather", "partial"):
                r = one(rows, tokens=4 * M, ranks=P, strategy=s, qlen=1, batch=batch)
                if not r:
                    continue
                labels.append("%d GPU%s\n%s" % (P, "s" if P > 1 else "", s))
                parts["score"].append(r["score_ms"])
                parts["merge"].append(r["merge_ms"])
                parts["attention"].append(r["attn_ms"])
                parts["other"].append(max(0.0, r["p50_ms"] - r["score_ms"] - r["merge_ms"] - r["attn_ms"]))
        bottom = [0.0] * len(labels)
        for name, vals in parts.items():
            ax.bar(labels, vals, bottom=bottom, label=name)
            bottom = [x + y for x, y in zip(bottom, vals)]
        ax.set_ylabel("ms (medians; other = p50 - phases)")
        ax.set_title("4M tokens, batch %d: where the step goes" % batch)
        ax.legend(fontsize=8)
    fig.suptitle(device, fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "latency_split.png"), dpi=120)
    plt.close(fig)


def batch_qps(rows, qwen, device, out):
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.4), gridspec_kw={"width_ratios": [1.35, 1]})
    for tokens, ls in ((1 * M, "-"), (4 * M, "--")):
        for P in (1, 2):
            for s in ("partial", "gather"):
                pts = [one(rows, tokens=tokens, ranks=P, strategy=s, qlen=1, batch=bb) for bb in (1, 8, 32)]
                pts = [r for r in pts if r]
                if not pts:
                    continue
                a.plot([r["batch"] for r in pts], [r["queries_per_s"] for r in pts], "o" + ls,
                       label="%dM, %d GPU%s, %s" % (tokens // M, P, "s" if P > 1 else "", s))
    a.set_xscale("log", base=2)
    a.set_xticks([1, 8, 32], ["1", "8", "32"])
    a.set_xlabel("queries of one shared context per step (batch)")
    a.set_ylabel("queries/s (batch / p50)")
    a.set_title("reattn-bench-grid: one LLaMA-8B layer, qlen 1")
    a.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    a.grid(alpha=0.3)
    if qwen and qwen.get("concurrency"):
        c = qwen["concurrency"]
        b.plot([x["clients"] for x in c], [x["queries_per_s"] for x in c], "o-", label="queries/s")
        b2 = b.twinx()
        b2.plot([x["clients"] for x in c], [x["batch_size"].get("mean", 0) for x in c], "s--", color="tab:red",
                label="mean batch formed")
        b2.set_ylabel("mean batch the server formed", color="tab:red")
        b.set_xscale("log", base=2)
        b.set_xticks([x["clients"] for x in c], [str(x["clients"]) for x in c])
        b.set_xlabel("concurrent HTTP clients")
        b.set_ylabel("queries/s")
        b.set_title("HTTP, Qwen2-1.5B shapes, 4M tokens, 2 GPUs")
        b.grid(alpha=0.3)
    fig.suptitle(device, fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "batch_qps.png"), dpi=120)
    plt.close(fig)


def qlen_plot(rows, device, out):
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for P in (1, 2):
        for s in ("gather", "partial"):
            pts = [one(rows, tokens=1 * M, ranks=P, strategy=s, qlen=q, batch=1) for q in (1, 16, 128)]
            pts = [r for r in pts if r]
            ax.plot([r["qlen"] for r in pts], [r["p50_ms"] for r in pts], "o-",
                    label="%d GPU%s, %s" % (P, "s" if P > 1 else "", s))
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks([1, 16, 128], ["1", "16", "128"])
    ax.set_xlabel("qlen (query rows)")
    ax.set_ylabel("query step p50 (ms)")
    ax.set_title("1M tokens, one LLaMA-8B layer, batch 1\n%s" % device, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "qlen.png"), dpi=120)
    plt.close(fig)


def needles(qwen, out):
    layers = qwen["layers"]
    depths = [n["depth_pct"] for n in qwen["needles"]]
    grid = [[1 if L["needles_found"][i] else 0 for L in layers] for i in range(len(depths))]
    fig, ax = plt.subplots(figsize=(10, 3.6))
    ax.imshow(grid, aspect="auto", cmap="RdYlGn", vmin=0, vmax=1, interpolation="nearest")
    ax.set_yticks(range(len(depths)), ["%g%%" % d for d in depths])
    ax.set_xticks(range(len(layers)), [str(L["layer"]) for L in layers], fontsize=7)
    ax.set_xlabel("layer")
    ax.set_ylabel("needle depth")
    found = sum(map(sum, grid))
    ax.set_title("needles recalled over HTTP: %d of %d (green = found); %d tokens of Qwen2-1.5B shapes on 2 GPUs, "
                 "loaded in %.1f s" % (found, len(depths) * len(layers), qwen["tokens"], qwen["load_s"]), fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "needles.png"), dpi=120)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="nvidia-h200")
    ap.add_argument("--results", default=os.path.join(HERE, "results"))
    ap.add_argument("--out", default=os.path.join(HERE, "plots"))
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    doc = json.load(open(os.path.join(a.results, "scaling-%s.json" % a.device)))
    proj = json.load(open(os.path.join(a.results, "projection.json")))
    qpath = os.path.join(a.results, "qwen-needles-%s.json" % a.device)
    qwen = json.load(open(qpath)) if os.path.exists(qpath) else None
    rows = rows_of(doc)
    device = "%s x%d (bench/results/scaling-%s.json)" % (doc["runs"][0]["device"], max(r["ranks"] for r in doc["runs"]),
                                                        a.device)
    strong_weak(rows, proj, device, a.out)
    split(rows, device, a.out)
    batch_qps(rows, qwen, device, a.out)
    qlen_plot(rows, device, a.out)
    if qwen:
        needles(qwen, a.out)
    print("wrote %s" % ", ".join(sorted(os.listdir(a.out))))


if __name__ == "__main__":
    main()
