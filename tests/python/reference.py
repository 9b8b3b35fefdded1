"""Plain numpy (float64) attention references for the Python tests: causal RoPE attention at
real positions, and ReAttention exactly as DESIGN.md section 2 states it (chunk recall, tail
rows). Written from the design text, independently of the C++ code."""

import numpy as np


def rope(x, positions, theta):
    """Half-split RoPE: x [..., T, D] rotated at positions [T]; inv_freq = theta^(-2d/D)."""
    d = x.shape[-1]
    half = d // 2
    inv_freq = theta ** (-2.0 * np.arange(half, dtype=np.float64) / d)
    angles = np.asarray(positions, dtype=np.float64)[:, None] * inv_freq[None, :]  # [T, half]
    cos = np.cos(np.concatenate([angles, angles], axis=-1))
    sin = np.sin(np.concatenate([angles, angles], axis=-1))
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def attend(q, k, v, q_pos, k_pos, visible_end, theta):
    """q [qlen, H, D]; k, v [Hkv, L, D] (pre-RoPE); q rotated at q_pos [qlen], k at k_pos [L];
    row i sees keys [0, visible_end[i]). Returns out [qlen, H, D] (float64)."""
    qlen, heads, d = q.shape
    kv_heads = k.shape[0]
    group = heads // kv_heads
    qr = rope(np.transpose(q, (1, 0, 2)).astype(np.float64), q_pos, theta)  # [H, qlen, D]
    kr = rope(k.astype(np.float64), k_pos, theta)                           # [Hkv, L, D]
    out = np.zeros((qlen, heads, d))
    cols = np.arange(k.shape[1])
    for h in range(heads):
        g = h // group
        s = qr[h] @ kr[g].T / np.sqrt(d)                                    # [qlen, L]
        s = np.where(cols[None, :] < np.asarray(visible_end)[:, None], s, -np.inf)
        s -= s.max(axis=1, keepdims=True)
        p = np.exp(s)
        p /= p.sum(axis=1, keepdims=True)
        out[:, h, :] = p @ v[g].astype(np.float64)
    return out


def causal(q, k, v, theta):
    """Tail rows at real positions over all n keys: row i is token n - qlen + i."""
    n, qlen = k.shape[1], q.shape[0]
    rows = np.arange(n - qlen, n)
    return attend(q, k, v, rows, np.arange(n), rows + 1, theta)


def regions(n, sinks, window, chunk):
    """(sink end, mid end m): sinks [0, min(S, n)), mid [S, m), local [m, n)."""
    s = min(sinks, n)
    if n - sinks - window >= chunk:
        return s, sinks + ((n - sinks - window) // chunk) * chunk
    return s, s


def recall(q, k, sinks, mid_end, chunk, top_k, max_recall):
    """The recalled chunk ids U (ascending) for tail rows q [qlen, H, D] over k [Hkv, n, D]."""
    qlen, heads, _ = q.shape
    group = heads // k.shape[0]
    chunks = (mid_end - sinks) // chunk
    votes, best = {}, {}
    for i in range(qlen):
        for h in range(heads):
            keys = k[h // group, sinks:mid_end].astype(np.float64).reshape(chunks, chunk, -1)
            score = (keys @ q[i, h].astype(np.float64)).max(axis=1)           # [chunks]
            order = sorted(range(chunks), key=lambda j: (-score[j], j))[:top_k]
            for j in order:
                votes[j] = votes.get(j, 0) + 1
                best[j] = max(best.get(j, -np.inf), score[j])
    ranked = sorted(votes, key=lambda j: (-votes[j], -best[j], j))[:max_recall]
    return sorted(ranked)


def reattention(q, k, v, cfg):
    """DESIGN section 2, tail mode: (out [qlen, H, D], recalled chunk ids).
    cfg: sink_tokens, local_window, chunk_tokens, top_k, max_recall_chunks, rope_theta."""
    n, qlen = k.shape[1], q.shape[0]
    s, c = cfg["sink_tokens"], cfg["chunk_tokens"]
    sink_end, mid_end = regions(n, s, cfg["local_window"], c)
    if mid_end == sink_end:
        return causal(q, k, v, cfg["rope_theta"]), []
    u = recall(q, k, s, mid_end, c, cfg["top_k"], cfg["max_recall_chunks"])
    layout = list(range(sink_end))
    for j in u:
        layout += range(s + j * c, s + (j + 1) * c)
    local_start = len(layout)
    layout += range(mid_end, n)
    rows = np.arange(n - qlen, n)
    row_pos = local_start + (rows - mid_end)
    out = attend(q, k[:, layout], v[:, layout], row_pos, np.arange(len(layout)), row_pos + 1, cfg["rope_theta"])
    return out, u
