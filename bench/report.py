"""Combines the bench JSONs of one device run into one results file and prints the table.
Usage: report.py --one bench1.json [--two bench2.json] --torch torch.json --out DIR"""
import argparse
import json
import os
import re


def load(path):
    if path and os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--one", required=True)
    ap.add_argument("--two")
    ap.add_argument("--two-partial")
    ap.add_argument("--torch", required=True)
    ap.add_argument("--tests", default="")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    one, two, tor = load(args.one), load(args.two), load(args.torch)
    two_p = load(args.two_partial)
    two_p_by_n = {s["tokens"]: s for s in (two_p or {}).get("sizes", [])}
    device = (one or {}).get("device", "unknown")
    slug = re.sub(r"[^A-Za-z0-9]+", "-", device).strip("-").lower()
    bw = one["read_bandwidth"]["gb_per_s"]
    torch_by_n = {s["tokens"]: s for s in (tor or {}).get("sizes", [])}
    two_by_n = {s["tokens"]: s for s in (two or {}).get("sizes", [])}
    rows = []
    print(f"device: {device}; measured read bandwidth {bw:.0f} GB/s")
    print(f"{'tokens':>8} | {'floor ms':>8} | {'score kern ms':>13} | {'GB/s':>6} | {'%BW':>5} | {'e2e ms':>7} | "
          f"{'sdpa ms':>7} | {'e2e/sdpa':>8} | {'2gpu e2e':>8} | {'2gpu part':>9} | {'2gpu kern':>9} | {'alloc ovh':>9} | needles")
    for s in one["sizes"]:
        n = s["tokens"]
        floor_ms = s["score_key_bytes"] / bw / 1e6
        sdpa = torch_by_n.get(n, {}).get("sdpa_ms")
        t2 = two_by_n.get(n)
        row = {
            "tokens": n,
            "key_read_floor_ms": floor_ms,
            "score_kernel_ms": s["score_kernel_ms"],
            "score_kernel_gb_per_s": s["score_kernel_gb_per_s"],
            "score_kernel_fraction_of_read_bw": s["score_kernel_gb_per_s"] / bw,
            "e2e_ms": s["e2e_ms"],
            "e2e_breakdown_ms": {"score": s["step_score_ms"], "merge": s["step_merge_ms"],
                                 "attention": s["step_attention_ms"]},
            "torch_sdpa_ms": sdpa,
            "e2e_over_sdpa": s["e2e_ms"] / sdpa if sdpa else None,
            "kv_bytes": s["kv_bytes"],
            "peak_alloc_bytes": s["peak_alloc_bytes"],
            "alloc_overhead": s["alloc_overhead"],
            "device_used_delta_bytes": s["device_used_delta_bytes"],
            "load_s": s["load_s"],
            "all_needles_found": s["all_needles_found"],
            "two_gpu": None if not t2 else {
                "e2e_ms": t2["e2e_ms"], "score_kernel_ms": t2["score_kernel_ms"],
                "score_kernel_ms_slowest_rank": t2.get("score_kernel_ms_slowest_rank"),
                "all_needles_found": t2["all_needles_found"], "rank0_alloc_overhead": t2["alloc_overhead"]},
        }
        tp = two_p_by_n.get(n)
        if row["two_gpu"] is not None and tp:
            row["two_gpu"]["partial_e2e_ms"] = tp["e2e_ms"]
            row["two_gpu"]["partial_all_needles_found"] = tp["all_needles_found"]
        rows.append(row)
        fmt = lambda x, f: (f % x) if x is not None else "-"
        print(f"{n:>8} | {floor_ms:8.3f} | {s['score_kernel_ms']:13.3f} | {s['score_kernel_gb_per_s']:6.0f} | "
              f"{100 * s['score_kernel_gb_per_s'] / bw:4.0f}% | {s['e2e_ms']:7.3f} | {fmt(sdpa, '%7.3f')} | "
              f"{fmt(row['e2e_over_sdpa'], '%8.2f')} | {fmt(t2 and t2['e2e_ms'], '%8.3f')} | "
              f"{fmt(tp and tp['e2e_ms'], '%9.3f')} | "
              f"{fmt(t2 and t2['score_kernel_ms_slowest_rank'], '%9.3f')} | {100 * s['alloc_overhead']:8.2f}% | "
              f"{'found' if s['all_needles_found'] else 'MISSED'}")
    result = {"device": device, "read_bandwidth_gb_per_s": bw, "read_bandwidth": one["read_bandwidth"],
              "shapes": "LLaMA-3.1-8B one layer: H=32, Hkv=8, D=128, bf16, qlen 1, C=64, S=32, W=4096, top_k 4, R 32",
              "final_attention": one.get("final_attention"), "torch": (tor or {}).get("torch"),
              "tests": args.tests, "sizes": rows}
    path = os.path.join(args.out, f"decode-{slug}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
