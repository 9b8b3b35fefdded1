"""Table of issue 14's kernel goals from one run: kernel_bench's JSON and torch_baselines.py's
JSON (same GPU, same call). Writes kernels.csv next to them and prints the table."""
import argparse
import csv
import json
import os


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kernels", required=True)
    ap.add_argument("--torch", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    k = json.load(open(args.kernels))
    t = json.load(open(args.torch))
    mm = {r["qlen"]: r for r in t.get("matmul", [])}
    sd = {r["qlen"]: r for r in t.get("sdpa", [])}
    rows = []
    print(f"device {k['device']}; read probe {k['read_gbps']:.0f} GB/s; torch {t['torch']}")
    print("| what | qlen | q | kernel | ms | TFLOP/s | vs torch matmul | % read BW |")
    print("|---|---|---|---|---|---|---|---|")
    for r in k.get("score_decode", []) + k.get("score", []):
        base = mm.get(r["qlen"])
        ratio = r["tflops"] / base["tflops"] if base else None
        base_tflops = base["tflops"] if base else 0.0
        rows.append({"what": f"score {r['tokens']} keys", "qlen": r["qlen"], "q": r["q"], "kernel": r["kernel"],
                     "ms": r["ms"], "tflops": r["tflops"], "vs_torch": ratio, "read_share": r["read_share"]})
        print(f"| score {r['tokens'] >> 20}M keys | {r['qlen']} | {r['q']} | {r['kernel']} | {r['ms']:.3f} | "
              f"{r['tflops']:.1f} | {'' if ratio is None else f'{ratio:.2f}x (torch {base_tflops:.0f})'} | "
              f"{100 * r['read_share']:.1f}% |")
    print("| what | qlen | keys | ms | TFLOP/s (causal) | torch flash full / lower-right causal ms | ratio to full |")
    print("|---|---|---|---|---|---|---|")
    for r in k.get("attend", []):
        base = sd.get(r["qlen"])
        ratio = r["ms"] / base["full_ms"] if base else None
        causal = base.get("causal_ms") if base else None
        rows.append({"what": "attend", "qlen": r["qlen"], "q": "bf16-exact", "kernel": "attend", "ms": r["ms"],
                     "tflops": r["tflops"], "vs_torch": ratio, "read_share": None})
        base_txt = "" if not base else f"{base['full_ms']:.3f} / {causal:.3f}" if causal else f"{base['full_ms']:.3f} / -"
        print(f"| attend | {r['qlen']} | {r['keys']} | {r['ms']:.3f} | {r['tflops']:.1f} | {base_txt} | "
              f"{'' if ratio is None else f'{ratio:.2f}x'} |")
    dec = k.get("score_decode", [])
    one = [r for r in dec if r["qlen"] == 1 and r["kernel"] == "warp" and r["q"] == "bf16-exact"]
    for r in dec:
        if r["qlen"] == 32 and one:
            ratio = 32 * one[0]["ms"] / r["ms"]
            print(f"batch of 32 decode queries scored as one block ({r['kernel']}, q {r['q']}): {r['ms']:.3f} ms vs "
                  f"{one[0]['ms']:.3f} ms for one: {ratio:.1f}x the queries/s of batch 1 (scoring kernel only)")
    for r in k.get("select", []):
        print(f"device merge + recall selection: {r['rows']} rows x top_k 4 from {r['world']} rank(s), "
              f"{r['chunks']} chunks: {r['ms']:.3f} ms")
    with open(os.path.join(args.out, "kernels.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0].keys()) if rows else ["what"])
        w.writeheader()
        w.writerows(rows)


if __name__ == "__main__":
    main()
