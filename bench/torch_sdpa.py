"""Full-attention decode baseline: torch F.scaled_dot_product_attention(..., enable_gqa=True)
over one layer of LLaMA-3.1-8B shapes (32 q heads, 8 kv heads, D=128, bf16), qlen 1, at the
given context sizes. Median of CUDA-event timings; writes JSON."""
import argparse
import json

import torch
import torch.nn.functional as F

from cuda_timing import time_ms


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="262144,1048576,4194304")
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    dev = torch.device("cuda")
    out = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "sizes": []}
    gen = torch.Generator(device=dev).manual_seed(0)
    for n in [int(x) for x in args.tokens.split(",")]:
        k = torch.randn(1, 8, n, 128, dtype=torch.bfloat16, device=dev, generator=gen)
        v = torch.randn(1, 8, n, 128, dtype=torch.bfloat16, device=dev, generator=gen)
        q = torch.randn(1, 32, 1, 128, dtype=torch.bfloat16, device=dev, generator=gen)
        fn = lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        ms = time_ms(fn, 5, args.repeat)
        kv_bytes = 2 * k.numel() * k.element_size()
        out["sizes"].append({"tokens": n, "sdpa_ms": ms, "kv_bytes": kv_bytes, "kv_gb_per_s": kv_bytes / ms / 1e6})
        print(f"[torch] tokens={n} sdpa={ms:.3f} ms ({kv_bytes / ms / 1e6:.0f} GB/s over K+V)", flush=True)
        del k, v, q
        torch.cuda.empty_cache()
    with open(args.json, "w") as f:
        json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
