"""A tiny Llama-style decoder in numpy (embeddings, RMSNorm, q/k/v/o projections, SwiGLU MLP,
random weights) whose attention is pluggable, so one forward pass can run its attention
through reattn's per-layer step or through a numpy reference.

An attention backend is called once per layer, in layer order, with the new tokens'
pre-RoPE q [qlen, H, D], k [Hkv, qlen, D], v [Hkv, qlen, D] (float32) and returns
out [qlen, H, D]."""

import numpy as np

import reference


class TinyDecoder:
    def __init__(self, layers, q_heads, kv_heads, head_dim, vocab=97, ffn=96, seed=0, qk_scale=1.0):
        rng = np.random.default_rng(seed)
        self.layers, self.q_heads, self.kv_heads, self.head_dim = layers, q_heads, kv_heads, head_dim
        hidden = q_heads * head_dim
        self.hidden = hidden

        def w(*shape, scale=1.0):
            return rng.standard_normal(shape) * scale / np.sqrt(shape[0])

        self.embed = rng.standard_normal((vocab, hidden))
        self.blocks = []
        for _ in range(layers):
            self.blocks.append({
                "norm1": 1.0 + 0.1 * rng.standard_normal(hidden),
                "wq": w(hidden, q_heads * head_dim, scale=qk_scale),
                "wk": w(hidden, kv_heads * head_dim, scale=qk_scale),
                "wv": w(hidden, kv_heads * head_dim),
                "wo": w(q_heads * head_dim, hidden),
                "norm2": 1.0 + 0.1 * rng.standard_normal(hidden),
                "w_gate": w(hidden, ffn),
                "w_up": w(hidden, ffn),
                "w_down": w(ffn, hidden),
            })
        self.norm = 1.0 + 0.1 * rng.standard_normal(hidden)
        self.lm_head = w(hidden, vocab)

    @staticmethod
    def rms_norm(x, weight, eps=1e-6):
        return x / np.sqrt((x * x).mean(axis=-1, keepdims=True) + eps) * weight

    def forward(self, tokens, attention):
        """tokens [T] -> logits [T, vocab] (float64); attention(layer, q, k, v) -> out."""
        x = self.embed[np.asarray(tokens)]
        t = x.shape[0]
        for layer, b in enumerate(self.blocks):
            h = self.rms_norm(x, b["norm1"])
            q = (h @ b["wq"]).reshape(t, self.q_heads, self.head_dim).astype(np.float32)
            k = (h @ b["wk"]).reshape(t, self.kv_heads, self.head_dim).transpose(1, 0, 2).astype(np.float32)
            v = (h @ b["wv"]).reshape(t, self.kv_heads, self.head_dim).transpose(1, 0, 2).astype(np.float32)
            out = np.asarray(attention(layer, np.ascontiguousarray(q), np.ascontiguousarray(k),
                                       np.ascontiguousarray(v)), dtype=np.float64)
            x = x + out.reshape(t, -1) @ b["wo"]
            h = self.rms_norm(x, b["norm2"])
            gate = h @ b["w_gate"]
            x = x + (gate / (1.0 + np.exp(-gate)) * (h @ b["w_up"])) @ b["w_down"]
        return self.rms_norm(x, self.norm) @ self.lm_head


class ReferenceAttention:
    """Keeps each layer's pre-RoPE K/V (as the service does) and answers tail rows with the
    numpy reference: mode "causal" (real positions) or "reattention" (DESIGN section 2)."""

    def __init__(self, layers, mode, cfg):
        self.mode, self.cfg = mode, cfg
        self.k = [None] * layers
        self.v = [None] * layers
        self.recalled = []  # (layer, chunk ids) per call, in call order

    def __call__(self, layer, q, k, v):
        self.k[layer] = k if self.k[layer] is None else np.concatenate([self.k[layer], k], axis=1)
        self.v[layer] = v if self.v[layer] is None else np.concatenate([self.v[layer], v], axis=1)
        if self.mode == "causal":
            return reference.causal(q, self.k[layer], self.v[layer], self.cfg["rope_theta"])
        out, ids = reference.reattention(q, self.k[layer], self.v[layer], self.cfg)
        self.recalled.append((layer, list(ids)))
        return out


class ServiceAttention:
    """Each layer's attention is one reattn layer step on `context_id`."""

    def __init__(self, client, context_id, binary=True):
        self.client, self.context_id, self.binary = client, context_id, binary
        self.recalled = []
        self.results = []

    def __call__(self, layer, q, k, v):
        r = self.client.step(self.context_id, layer, q, k, v, binary=self.binary)
        self.recalled.append((layer, [int(j) for j in r.recalled_chunks]))
        self.results.append(r)
        return r.out


def run_schedule(model, tokens, attention, prefill_steps, decode_tokens):
    """Prefill `tokens` in steps of the given sizes, then feed `decode_tokens` one at a time.
    Returns the logits of every token, [len(tokens) + len(decode_tokens), vocab]."""
    assert sum(prefill_steps) == len(tokens)
    logits, at = [], 0
    for size in prefill_steps:
        logits.append(model.forward(tokens[at:at + size], attention))
        at += size
    for tok in decode_tokens:
        logits.append(model.forward([tok], attention))
    return np.concatenate(logits, axis=0)
