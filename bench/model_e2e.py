#!/usr/bin/env python3
"""A transformers model runs its attention through reattn (reattn_client.hf.attach), end to end.

For each model kind (random weights, built from a config, nothing downloaded):
- llama: the LLaMA-3-8B attention shapes (hidden 4096, 32 query / 8 KV heads, head_dim 128,
  rope_theta 500000) with --layers layers (default 4);
- qwen2: the Qwen2-1.5B shapes (hidden 1536, 12 query / 2 KV heads, head_dim 128, theta 1e6).

1. Parity: a --parity-tokens prompt in --step-tokens steps through a service whose recall keeps
   every chunk; the logits are compared with the model's own eager attention over the whole
   prompt in one pass, both against an fp32 eager run of the same weights: reattn's error must
   stay within 2x the model's own --dtype error (plus 1e-3 of the logit scale).
2. Speed: a --prompt-tokens random prompt prefilled in --step-tokens steps, then --decode
   tokens decoded greedily one at a time, through a service with the base config's recall;
   reports prefill and decode tokens/s and the time split between the model's own layers
   (wall minus client), the client and HTTP (client minus service) and the service (its
   total_ms).

    python3 bench/model_e2e.py --ranks 2 --prompt-tokens 1048576 --json bench/results/model_e2e.json
    python3 bench/model_e2e.py --tiny      # CPU, tiny shapes, fp32: checks the script end to end

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


def build_model(kind, shape, layers, dtype, device, seed):
    config_cls, model_cls, _, _ = KINDS[kind]
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(num_hidden_layers=layers, rms_norm_eps=1e-6,
                                               tie_word_embeddings=False, attn_implementation="eager", **shape)
    rope = getattr(config, "rope_parameters", None)
    if isinstance(rope, dict):
        rope["rope_theta"] = shape["rope_theta"]
    with torch.device(device):
        model = getattr(transformers, model_cls)(config)
    return model.to(dtype).eval()


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
        rc["top_k"] = chunks if args.tiny else min(chunks, 32)  # the cuda backend keeps at most 32
        rc["max_recall_chunks"] = chunks
        if chunks > rc["top_k"] or s + chunks * c + w + c > model["scope"]:
            raise SystemExit("model_e2e: --parity-tokens %d needs %d recalled chunks; lower it (cuda top_k <= 32, "
                             "scope %d)" % (args.parity_tokens, chunks, model["scope"]))
    return config


def max_abs(a, b):
    return (a.float() - b.float()).abs().max().item()


def parity(kind, shape, layers, args, device, dtype):
    from reattn_client import hf
    service = Service(args, "%s_parity" % kind, service_config(kind, shape, layers, args, full_recall=True))
    try:
        client = service.client()
        if step_route_missing(client):
            return None
        model = build_model(kind, shape, layers, dtype, device, seed=1)
        gen = torch.Generator().manual_seed(2)
        ids = torch.randint(0, shape["vocab_size"], (1, args.parity_tokens), generator=gen).to(device)
        keep = min(args.parity_tokens, 256)  # compare the last positions' logits (memory)
        with torch.no_grad():
            own = model(ids, logits_to_keep=keep).logits
            fp32 = build_model(kind, shape, layers, torch.float32, device, seed=1)
            truth = fp32(ids, logits_to_keep=keep).logits
            del fp32
            ctx = client.create_context()["id"]
            session = hf.attach(model, client, ctx, step_tokens=args.step_tokens)
            got = model(ids, logits_to_keep=keep).logits
            session.detach()
            client.delete_context(ctx)
        scale = truth.abs().max().item()
        err_reattn, err_own = max_abs(got, truth), max_abs(own, truth)
        bound = 2.0 * err_own + 1e-3 * scale
        top1 = (got.argmax(-1) == own.argmax(-1)).float().mean().item()
        ok = err_reattn <= bound
        print("%s parity: %d tokens in %d-token steps | max |logit err| vs fp32: reattn %.4g, model's own eager %.4g, "
              "bound %.4g -> %s | top-1 agreement with own eager %.3f"
              % (kind, args.parity_tokens, args.step_tokens, err_reattn, err_own, bound, "ok" if ok else "FAIL", top1),
              flush=True)
        return {"tokens": args.parity_tokens, "max_err_reattn": err_reattn, "max_err_own_eager": err_own,
                "bound": bound, "logit_scale": scale, "top1_agreement": top1, "ok": ok}
    finally:
        service.stop()


def speed(kind, shape, layers, args, device, dtype):
    from reattn_client import hf
    service = Service(args, "%s_speed" % kind, service_config(kind, shape, layers, args, full_recall=False))
    try:
        client = service.client()
        model = build_model(kind, shape, layers, dtype, device, seed=3)
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
        par = parity(kind, shape, args.layers, args, device, dtype)
        if par is None:
            print("model_e2e: the server has no /step route yet; skipped", flush=True)
            return SKIP_EXIT
        failed |= not par["ok"]
        report["kinds"][kind] = {"shape": shape, "parity": par, "speed": speed(kind, shape, args.layers, args, device,
                                                                               dtype)}
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
