#!/usr/bin/env python3
"""A transformers model runs its attention through reattn (reattn_client.hf.attach), end to end.

For each model kind (random weights, built from a config, nothing downloaded):
- llama: the LLaMA-3-8B attention shapes (hidden 4096, 32 query / 8 KV heads, head_dim 128,
  rope_theta 500000) with --layers layers (default 4);
- qwen2: the Qwen2-1.5B shapes (hidden 1536, 12 query / 2 KV heads, head_dim 128, theta 1e6).

1. Parity: a --parity-tokens prompt in --step-tokens steps through a service whose recall keeps
   every chunk, against the model's own eager attention over the same prompt (in --ref-tokens
   passes with its own KV cache), both in --dtype and both compared with an fp32 eager run of the
   same weights. The bf16 run's own distance from fp32 is the measured tolerance: reattn's max
   and mean |logit error| must stay within 2x the model's own (plus 1e-3 of the logit scale), and
   its top-1 agreement with fp32 within 0.05 of the model's own. Checked first: the logits are
   not flat (their spread over the vocabulary is at least 10x the bf16 run's mean error) and the
   --dtype model holds the fp32 model's weights, rounded, with RoPE frequencies kept in fp32 as
   from_pretrained(dtype=...) keeps them (model.to(bf16) would round inv_freq too, and at
   position 6000 that RoPE is a different one: the logits move by more than their own scale).
   Weights: transformers' init (std 0.02) with q_proj and k_proj scaled so that attention
   scores have a std of about --score-std (default 2). The init alone gives 0.0004 * hidden
   (1.6 for llama, 0.6 for qwen2: near-uniform attention over thousands of keys, where a key
   the service missed hardly shows); 4 made the bf16 run itself too noisy to judge by (on a
   CPU run, --shrink 1024,1024,32000: its mean error 1/5 of the logits' spread, top-1 0.56).
   --parity-recall N recalls fewer chunks: a negative control that must FAIL.
2. Speed: a --prompt-tokens random prompt prefilled in --step-tokens steps, then --decode
   tokens decoded greedily one at a time, through a service with the base config's recall;
   reports prefill and decode tokens/s and the time split between the model's own layers
   (wall minus client), the client and HTTP (client minus service) and the service (its
   total_ms).

    python3 bench/model_e2e.py --ranks 2 --prompt-tokens 1048576 --json bench/results/model_e2e.json
    python3 bench/model_e2e.py --tiny      # CPU, tiny shapes, fp32: checks the script end to end
    python3 bench/model_e2e.py --backend cpu --shrink 1024,1024,32000 --ref-tokens 1024 --no-speed  # CPU parity

Exits 77 without torch/transformers or while the server has no /step route; 1 when parity fails."""

import argparse
import json
import os
import platform
import sys
import time

from model_service import REPO, SKIP_EXIT, Service, add_service_args, derived_config, step_route_missing

try:
    import torch
    import transformers
except ImportError as e:
    torch = transformers = None
    MISSING = str(e)

KINDS = {
    # kind: (transformers classes, model shape, base service config)
    "llama": ("LlamaConfig", "LlamaForCausalLM",
              dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                   head_dim=128, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192),
              "llama3-8b.yaml"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM",
              dict(hidden_size=1536, intermediate_size=8960, num_attention_heads=12, num_key_value_heads=2,
                   head_dim=128, vocab_size=151936, rope_theta=1000000.0, max_position_embeddings=32768),
              "qwen2-1.5b.yaml"),
}
TINY_SHAPE = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  vocab_size=101, rope_theta=10000.0, max_position_embeddings=1024)


def build_model(kind, shape, layers, dtype, device, seed, score_std):
    """Random weights from `seed`, built in fp32; the parameters (only) cast to `dtype`."""
    config_cls, model_cls, _, _ = KINDS[kind]
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(num_hidden_layers=layers, rms_norm_eps=1e-6,
                                               tie_word_embeddings=False, attn_implementation="eager", **shape)
    rope = getattr(config, "rope_parameters", None)
    if isinstance(rope, dict):
        rope["rope_theta"] = shape["rope_theta"]
    with torch.device(device):
        model = getattr(transformers, model_cls)(config)
    # q.k / sqrt(D) has std init_std^2 * hidden for RMS-normed inputs; scale q and k to reach score_std.
    sharpen = (score_std / (config.initializer_range ** 2 * shape["hidden_size"])) ** 0.5
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(sharpen)
            p.data = p.data.to(dtype)
    # Buffers (the rotary inv_freq) stay fp32, as from_pretrained(dtype=...) leaves them.
    for name, b in model.named_buffers():
        if b.is_floating_point() and b.dtype != torch.float32:
            raise SystemExit("model_e2e: buffer %s is %s, not fp32" % (name, b.dtype))
    return model.eval()


def own_logits(model, ids, keep, chunk):
    """The model's own eager attention over `ids`, `chunk` tokens a pass with its own KV cache;
    the last `keep` positions' logits in fp32."""
    cache = transformers.DynamicCache(config=model.config)
    total = ids.shape[1]
    for begin in range(0, total, chunk):
        end = min(begin + chunk, total)
        out = model(ids[:, begin:end], past_key_values=cache, use_cache=True,
                    logits_to_keep=min(end - begin, max(1, keep - (total - end))))
        if end > total - keep:
            yield out.logits.float()


def service_config(kind, shape, layers, args, full_recall):
    base = os.path.join(REPO, "configs", "tiny.yaml" if args.tiny else KINDS[kind][3])
    model = {"layers": layers, "q_heads": shape["num_attention_heads"], "kv_heads": shape["num_key_value_heads"],
             "head_dim": shape["head_dim"], "rope_theta": shape["rope_theta"],
             "scope": shape["max_position_embeddings"]}
    config = derived_config(base, model=model)
    # A 4096-token step of LLaMA-3-8B shapes in bf16 is a 48 MiB body.
    config.setdefault("server", {})["max_body_bytes"] = 256 * 1024 * 1024
    rc = config["reattention"]
    if full_recall:
        # Every mid chunk of the parity prompt recalled: top_k and the cap cover them all.
        s, w, c = rc["sink_tokens"], rc["local_window"], rc["chunk_tokens"]
        chunks = max(1, (args.parity_tokens - s - w) // c)
        if args.parity_recall:
            chunks = min(chunks, args.parity_recall)  # a negative control: the check must then fail
        rc["top_k"] = chunks if args.tiny else min(chunks, 32)  # the cuda backend keeps at most 32
        rc["max_recall_chunks"] = chunks
        if chunks > rc["top_k"] or s + chunks * c + w + c > model["scope"]:
            raise SystemExit("model_e2e: --parity-tokens %d needs %d recalled chunks; lower it (cuda top_k <= 32, "
                             "scope %d)" % (args.parity_tokens, chunks, model["scope"]))
    return config


def top1(a, b):
    return (a.argmax(-1) == b.argmax(-1)).float().mean().item()


def same_weights(low, fp32):
    """True when every parameter of `low` is the fp32 model's, rounded to low's dtype."""
    ref = dict(fp32.named_parameters())
    return all(torch.equal(p, ref[name].to(p.dtype)) for name, p in low.named_parameters())


def parity(kind, shape, layers, args, device, dtype):
    from reattn_client import hf
    service = Service(args, "%s_parity" % kind, service_config(kind, shape, layers, args, full_recall=True))
    try:
        client = service.client()
        if step_route_missing(client):
            return None
        gen = torch.Generator().manual_seed(2)
        ids = torch.randint(0, shape["vocab_size"], (1, args.parity_tokens), generator=gen).to(device)
        keep = min(args.parity_tokens, 256)  # compare the last positions' logits (memory)
        ref_tokens = args.ref_tokens or args.parity_tokens
        with torch.no_grad():
            fp32 = build_model(kind, shape, layers, torch.float32, device, 1, args.score_std)
            truth = torch.cat(list(own_logits(fp32, ids, keep, ref_tokens)), dim=1)
            model = build_model(kind, shape, layers, dtype, device, 1, args.score_std)
            weights_ok = same_weights(model, fp32)
            del fp32
            own = torch.cat(list(own_logits(model, ids, keep, ref_tokens)), dim=1)
            ctx = client.create_context()["id"]
            session = hf.attach(model, client, ctx, step_tokens=args.step_tokens)
            got = model(ids, logits_to_keep=keep).logits.float()
            session.detach()
            client.delete_context(ctx)
        scale = truth.abs().max().item()
        spread = truth.std(dim=-1).mean().item()  # the logits' spread over the vocabulary
        top2 = truth.topk(2, dim=-1).values
        gap = (top2[..., 0] - top2[..., 1]).median().item()
        err_r, err_o = (got - truth).abs(), (own - truth).abs()
        r = {"tokens": args.parity_tokens, "step_tokens": args.step_tokens, "ref_tokens": ref_tokens,
             "score_std": args.score_std, "logit_scale": scale, "logit_spread": spread, "median_top2_gap": gap,
             "max_err_reattn": err_r.max().item(), "mean_err_reattn": err_r.mean().item(),
             "max_err_own": err_o.max().item(), "mean_err_own": err_o.mean().item(),
             "max_diff_reattn_own": (got - own).abs().max().item(),
             "top1_reattn_fp32": top1(got, truth), "top1_own_fp32": top1(own, truth), "top1_reattn_own": top1(got, own),
             "weights_match": weights_ok}
        r["max_bound"] = 2.0 * r["max_err_own"] + 1e-3 * scale
        r["mean_bound"] = 2.0 * r["mean_err_own"] + 1e-3 * spread
        r["not_flat"] = spread >= 10.0 * r["mean_err_own"] and gap > r["mean_err_own"]
        r["ok"] = (weights_ok and r["not_flat"] and r["max_err_reattn"] <= r["max_bound"]
                   and r["mean_err_reattn"] <= r["mean_bound"] and r["top1_reattn_fp32"] >= r["top1_own_fp32"] - 0.05)
        print("%s parity: %d tokens in %d-token steps | logits: max |.| %.3g, spread %.3g, median top-1 gap %.3g "
              "(not flat: %s) | |logit err| vs fp32 max/mean: reattn %.4g/%.4g, model's own %s eager %.4g/%.4g, "
              "bound %.4g/%.4g | top-1 agreement with fp32: reattn %.3f, own %.3f; reattn with own %.3f | "
              "weights match: %s -> %s"
              % (kind, args.parity_tokens, args.step_tokens, scale, spread, gap, r["not_flat"], r["max_err_reattn"],
                 r["mean_err_reattn"], args.dtype, r["max_err_own"], r["mean_err_own"], r["max_bound"],
                 r["mean_bound"], r["top1_reattn_fp32"], r["top1_own_fp32"], r["top1_reattn_own"], weights_ok,
                 "ok" if r["ok"] else "FAIL"), flush=True)
        return r
    finally:
        service.stop()


def speed(kind, shape, layers, args, device, dtype):
    from reattn_client import hf
    service = Service(args, "%s_speed" % kind, service_config(kind, shape, layers, args, full_recall=False))
    try:
        client = service.client()
        model = build_model(kind, shape, layers, dtype, device, 3, args.score_std)
        ctx = client.create_context()["id"]
        session = hf.attach(model, client, ctx, step_tokens=args.step_tokens)
        gen = torch.Generator().manual_seed(4)
        prompt = torch.randint(0, shape["vocab_size"], (1, args.prompt_tokens), generator=gen)
        sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
        with torch.no_grad():
            session.reset_timing()
            t0 = time.perf_counter()
            for begin in range(0, args.prompt_tokens, session.step_tokens):
                part = prompt[:, begin:begin + session.step_tokens].to(device)
                logits = model(part, use_cache=False, logits_to_keep=1).logits
                done = begin + part.shape[1]
                if args.progress and (done // session.step_tokens) % args.progress == 0:
                    print("  %s prefill %d / %d tokens, %.1f s" % (kind, done, args.prompt_tokens,
                                                                  time.perf_counter() - t0), flush=True)
            sync()
            prefill_s = time.perf_counter() - t0
            prefill = (session.client_ms / 1e3, session.service_ms / 1e3, session.steps)
            session.reset_timing()
            token = logits[:, -1].argmax(-1, keepdim=True)
            t0 = time.perf_counter()
            for _ in range(args.decode):
                token = model(token, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            sync()
            decode_s = time.perf_counter() - t0
            decode = (session.client_ms / 1e3, session.service_ms / 1e3, session.steps)
        info = client.context(ctx)
        session.detach()
        client.delete_context(ctx)

        def split(wall, part):
            client_s, service_s, steps = part
            return {"wall_s": wall, "model_s": wall - client_s, "client_http_s": client_s - service_s,
                    "service_s": service_s, "steps": steps}

        out = {"prompt_tokens": args.prompt_tokens, "decode_tokens": args.decode, "step_tokens": session.step_tokens,
               "context_tokens_after": info["tokens"],
               "prefill_tok_per_s": args.prompt_tokens / prefill_s, "decode_tok_per_s": args.decode / decode_s,
               "prefill": split(prefill_s, prefill), "decode": split(decode_s, decode)}
        for phase in ("prefill", "decode"):
            p = out[phase]
            print("%s %s: %.1f tok/s | wall %.2f s = model %.2f + client/HTTP %.2f + service %.2f (%d steps)"
                  % (kind, phase, out[phase + "_tok_per_s"], p["wall_s"], p["model_s"], p["client_http_s"],
                     p["service_s"], p["steps"]), flush=True)
        return out
    finally:
        service.stop()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_service_args(p)
    p.add_argument("--kinds", default="llama,qwen2")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--parity-tokens", type=int, default=6144)
    p.add_argument("--prompt-tokens", type=int, default=1048576)
    p.add_argument("--step-tokens", type=int, default=4096)
    p.add_argument("--ref-tokens", type=int, default=0,
                   help="tokens per pass of the model's own eager reference (default: the whole prompt)")
    p.add_argument("--score-std", type=float, default=2.0, help="attention scores' std the q/k init is scaled to")
    p.add_argument("--shrink", default=None, metavar="HIDDEN,INTERMEDIATE,VOCAB",
                   help="smaller hidden/intermediate/vocab sizes, same attention shapes (a CPU run)")
    p.add_argument("--no-speed", action="store_true", help="parity only")
    p.add_argument("--parity-recall", type=int, default=0,
                   help="recall at most this many chunks in the parity run (default: all; fewer should FAIL)")
    p.add_argument("--decode", type=int, default=64)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--device", default=None, help="torch device (default: cuda when available)")
    p.add_argument("--progress", type=int, default=16, help="print prefill progress every N steps (0: never)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU in fp32 (a functional check)")
    args = p.parse_args()
    if torch is None:
        print("model_e2e: needs torch and transformers (%s); skipped" % MISSING, flush=True)
        return SKIP_EXIT
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    if args.tiny:
        args.layers, args.parity_tokens, args.prompt_tokens = 2, 100, 300
        args.step_tokens, args.decode, args.dtype, args.backend = 32, 8, "float32", "cpu"
        device, dtype = "cpu", torch.float32
    report = {"benchmark": "model_e2e", "device": device, "dtype": args.dtype, "layers": args.layers,
              "ranks": args.ranks, "host": platform.node(), "torch": torch.__version__,
              "transformers": transformers.__version__, "gpu": torch.cuda.get_device_name(0)
              if device.startswith("cuda") else None, "kinds": {},
              "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    failed = False
    for kind in args.kinds.split(","):
        shape = dict(TINY_SHAPE) if args.tiny else dict(KINDS[kind][2])
        if args.shrink:
            shape.update(zip(("hidden_size", "intermediate_size", "vocab_size"), map(int, args.shrink.split(","))))
        par = parity(kind, shape, args.layers, args, device, dtype)
        if par is None:
            print("model_e2e: the server has no /step route yet; skipped", flush=True)
            return SKIP_EXIT
        failed |= not par["ok"]
        report["kinds"][kind] = {"shape": shape, "parity": par}
        if not args.no_speed:
            report["kinds"][kind]["speed"] = speed(kind, shape, args.layers, args, device, dtype)
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
