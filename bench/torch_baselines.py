"""Same-run baselines for bench/kernel_bench.cpp (issue 14), on the same GPU:
- scoring: torch.matmul of one KV head's [qlen*G, D] x [D, n] in bf16 (cuBLAS; writes the
  [qlen*G, n] scores, which the fused kernel never does), G=4, D=128, n = --tokens;
- attention: torch flash SDPA (SDPBackend.FLASH_ATTENTION), 32 heads, D=128, bf16, qlen query
  rows over --keys keys (the default layout: 32 sinks + 32 chunks of 64 + 4096 local = 6176),
  without a mask and with the lower-right causal mask (the tail block's own mask).
Median of CUDA-event timings; JSON to --json."""
import argparse
import json

import torch
import torch.nn.functional as F

from torch.nn.attention import SDPBackend, sdpa_kernel

from cuda_timing import time_ms


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=1 << 20)
    ap.add_argument("--keys", type=int, default=6176)
    ap.add_argument("--score-qlens", default="128,1024,4096")
    ap.add_argument("--attend-qlens", default="128,1024,4096")
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    out = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "matmul": [], "sdpa": []}
    G, D = 4, 128
    keys = torch.randn(D, args.tokens, dtype=torch.bfloat16, device=dev, generator=gen)
    for qlen in [int(x) for x in args.score_qlens.split(",")]:
        a = torch.randn(qlen * G, D, dtype=torch.bfloat16, device=dev, generator=gen)
        c = torch.empty(qlen * G, args.tokens, dtype=torch.bfloat16, device=dev)
        ms = time_ms(lambda: torch.matmul(a, keys, out=c), 3, args.repeat)
        tflops = 2.0 * qlen * G * D * args.tokens / (ms * 1e-3) / 1e12
        out["matmul"].append({"qlen": qlen, "pairs": qlen * G, "tokens": args.tokens, "ms_per_kv_head": ms,
                              "tflops": tflops})
        print(f"[torch matmul] qlen={qlen} [{qlen * G}x{D}]x[{D}x{args.tokens}] bf16: {ms:.3f} ms per KV head, "
              f"{tflops:.0f} TFLOP/s", flush=True)
        del a, c
        torch.cuda.empty_cache()
    del keys
    L = args.keys
    k = torch.randn(1, 32, L, D, dtype=torch.bfloat16, device=dev, generator=gen)
    v = torch.randn(1, 32, L, D, dtype=torch.bfloat16, device=dev, generator=gen)
    for qlen in [int(x) for x in args.attend_qlens.split(",")]:
        q = torch.randn(1, 32, qlen, D, dtype=torch.bfloat16, device=dev, generator=gen)
        row = {"qlen": qlen, "keys": L}
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            row["full_ms"] = time_ms(lambda: F.scaled_dot_product_attention(q, k, v), 3, args.repeat)
            try:
                from torch.nn.attention.bias import causal_lower_right
                mask = causal_lower_right(qlen, L)
                row["causal_ms"] = time_ms(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask), 3,
                                           args.repeat)
            except Exception as e:  # the flash backend may not take this mask in this version
                row["causal_error"] = str(e)[:200]
        out["sdpa"].append(row)
        print(f"[torch sdpa flash] qlen={qlen} keys={L} heads=32: full {row['full_ms']:.3f} ms, "
              f"lower-right causal {row.get('causal_ms', float('nan')):.3f} ms", flush=True)
    with open(args.json, "w") as f:
        json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
