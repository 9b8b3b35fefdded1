"""Writes safetensors files with the standard library only (tests run where numpy may be absent)."""
import json
import math
import random
import struct

_FORMATS = {"F32": ("<f", 4), "F16": ("<e", 2)}


def _encode(values, dtype):
    if dtype == "BF16":
        out = bytearray()
        for x in values:
            bits = struct.unpack("<I", struct.pack("<f", x))[0]
            if math.isnan(x):
                out += struct.pack("<H", (bits >> 16) | 0x40)
                continue
            bits += 0x7FFF + ((bits >> 16) & 1)
            out += struct.pack("<H", (bits >> 16) & 0xFFFF)
        return bytes(out)
    fmt, _ = _FORMATS[dtype]
    return b"".join(struct.pack(fmt, x) for x in values)


def serialize(tensors, header_override=None):
    """tensors: list of (name, dtype, shape, flat values or raw bytes)."""
    header, blobs, offset = {}, [], 0
    for name, dtype, shape, values in tensors:
        data = values if isinstance(values, (bytes, bytearray)) else _encode(values, dtype)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    if header_override:
        header_override(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(blobs)


def write(path, tensors, header_override=None):
    with open(path, "wb") as f:
        f.write(serialize(tensors, header_override))


def random_values(count, rng, scale=1.0):
    return [rng.uniform(-scale, scale) for _ in range(count)]


def make_kv(path, layers, kv_heads, tokens, head_dim, dtype="F32", seed=0, needles=(), needle_dir=None,
            names=("k", "v")):
    """K/V [layers, kv_heads, tokens, head_dim]; needle tokens' keys point along needle_dir[g]."""
    rng = random.Random(seed)
    k = random_values(layers * kv_heads * tokens * head_dim, rng)
    v = random_values(len(k), rng)
    for layer in range(layers):
        for g in range(kv_heads):
            for i, t in enumerate(needles):
                base = ((layer * kv_heads + g) * tokens + t) * head_dim
                for d in range(head_dim):
                    k[base + d] = 8.0 * (1 + 0.1 * i) * needle_dir[g][d]
    shape = (layers, kv_heads, tokens, head_dim)
    write(path, [(names[0], dtype, shape, k), (names[1], dtype, shape, v)])


def make_q(path, qlen, q_heads, head_dim, dtype="F32", seed=1, direction=None, group=1):
    rng = random.Random(seed)
    q = random_values(qlen * q_heads * head_dim, rng, 0.3)
    if direction is not None:
        for i in range(qlen):
            for h in range(q_heads):
                for d in range(head_dim):
                    q[(i * q_heads + h) * head_dim + d] += 2.0 * direction[h // group][d]
    write(path, [("q", dtype, (qlen, q_heads, head_dim), q)])


def unit_directions(count, dim, seed):
    rng = random.Random(seed)
    dirs = []
    for _ in range(count):
        v = [rng.gauss(0, 1) for _ in range(dim)]
        norm = math.sqrt(sum(x * x for x in v))
        dirs.append([x / norm for x in v])
    return dirs
