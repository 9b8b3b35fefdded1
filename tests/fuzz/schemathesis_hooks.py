"""schemathesis hooks (loaded through SCHEMATHESIS_HOOKS by run_schemathesis.py).

Checks: safetensors_answer (binary answers are well-formed) and context_lengths (a context's
tokens is min(layer_tokens)). A before_call hook asks for binary answers on half the queries and
steps. And bodies for
application/octet-stream that are safetensors files, most of them nearly right for the served
model, so the fuzzer reaches the K/V append, the binary query and the binary layer step instead
of stopping at the first byte. One strategy serves the three routes (schemathesis keys body
strategies by media type): each draw is a kv, a query or a step body, whole or broken in one
way (truncated, a lying header length, overlapping or out-of-range offsets, a missing or extra
tensor, a wrong dtype, dimension or value, a header that is not JSON).

The model's shape comes from REATTN_FUZZ_MODEL, JSON {"layers", "q_heads", "kv_heads", "head_dim"}.
"""

import json
import math
import os
import random
import struct
import zlib

import schemathesis
from hypothesis import strategies as st

MODEL = json.loads(os.environ.get("REATTN_FUZZ_MODEL", '{"layers": 2, "q_heads": 4, "kv_heads": 2, "head_dim": 16}'))

DTYPES = {"F32": ("<f", 4), "F16": ("<e", 2), "BF16": (None, 2), "I64": ("<q", 8), "F64": ("<d", 8), "U8": ("<B", 1)}
BREAKS = ["none", "none", "none", "truncate", "header_length", "offsets_overlap", "offsets_past_end", "missing_tensor",
          "extra_tensor", "not_json", "metadata", "negative_dim", "huge_dims", "odd_dtype", "poison_value", "huge_row",
          "kv_dtype_mismatch", "empty"]


def _pack(dtype, values):
    fmt, size = DTYPES[dtype]
    if dtype == "BF16":
        return b"".join(struct.pack("<H", struct.unpack("<I", struct.pack("<f", v))[0] >> 16) for v in values)
    if dtype == "F16":  # finite values past f16's range become +-inf, as a cast would make them
        return b"".join(struct.pack("<e", v if abs(v) <= 65504 or v != v else math.copysign(math.inf, v))
                        for v in values)
    if dtype in ("I64", "U8"):
        return b"".join(struct.pack(fmt, int(abs(v) * 10) % 200) for v in values)
    return b"".join(struct.pack(fmt, v) for v in values)


def _file(tensors, header_extra=None):
    header, data = {}, b""
    for name, dtype, shape, raw in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    if header_extra:
        header.update(header_extra)
    text = json.dumps(header).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    return header, text, data


@st.composite
def safetensors_body(draw):
    kind = draw(st.sampled_from(["kv", "query", "step"]))
    rows = draw(st.integers(min_value=0, max_value=6))  # tokens or qlen
    dtype = draw(st.sampled_from(["F32", "F32", "F16", "BF16"]))
    brk = draw(st.sampled_from(BREAKS))
    rng = random.Random(draw(st.integers(min_value=0, max_value=2**32 - 1)))
    m = MODEL
    # A dimension is off by one now and then.
    def dim(size):
        return size if rng.random() > 0.1 else max(0, size + rng.choice([-1, 1]))
    if kind == "kv":
        shapes = {n: [dim(m["layers"]), dim(m["kv_heads"]), rows, dim(m["head_dim"])] for n in ("k", "v")}
    elif kind == "query":
        shapes = {"q": [rows, dim(m["q_heads"]), dim(m["head_dim"])]}
    else:
        shapes = {"q": [rows, dim(m["q_heads"]), dim(m["head_dim"])]}
        shapes.update({n: [dim(m["kv_heads"]), rows, dim(m["head_dim"])] for n in ("k", "v")})
    tensors = []
    for name, shape in shapes.items():
        count = 1
        for s in shape:
            count *= s
        values = [rng.uniform(-2.0, 2.0) for _ in range(count)]
        if brk == "poison_value" and values:
            values[rng.randrange(len(values))] = rng.choice([float("nan"), float("inf"), -float("inf"), 1e6, 70000.0])
        if brk == "huge_row" and values:
            # A whole head_dim row near fp32's largest: finite, but its dot products overflow.
            at = rng.randrange(len(values)) // shape[-1] * shape[-1]
            values[at:at + shape[-1]] = [rng.choice([3e38, -3e38])] * shape[-1]
        d = dtype
        if brk == "odd_dtype" and name == rng.choice(list(shapes)):
            d = rng.choice(["I64", "F64", "U8"])
        if brk == "kv_dtype_mismatch" and name == "v":
            d = "F16" if dtype != "F16" else "F32"
        tensors.append([name, d, shape, _pack(d, values)])
    extra = None
    if brk == "missing_tensor" and tensors:
        tensors.pop(rng.randrange(len(tensors)))
    elif brk == "extra_tensor":
        tensors.append(["w", "F32", [2], _pack("F32", [1.0, 2.0])])
    elif brk == "metadata":
        extra = {"__metadata__": {"format": "pt", "note": "x" * rng.randrange(0, 64)}}
    elif brk == "negative_dim" and tensors:
        tensors[0][2] = [-1] + tensors[0][2][1:]
    elif brk == "huge_dims" and tensors:
        tensors[0][2] = [2**62, 2**62] + tensors[0][2][2:]
    header, text, data = _file(tensors, extra)
    if brk == "offsets_overlap" and len(header) > 1:
        text = text.replace(b'"data_offsets": [0,', b'"data_offsets": [4,', 1)
    elif brk == "offsets_past_end":
        text = json.dumps({n: dict(t, data_offsets=[t["data_offsets"][0], t["data_offsets"][1] + 64])
                           if isinstance(t, dict) and "data_offsets" in t else t for n, t in header.items()}).encode()
    elif brk == "not_json":
        text = b"{" + text[1:len(text) // 2]
    blob = struct.pack("<Q", len(text)) + text + data
    if brk == "header_length":
        blob = struct.pack("<Q", rng.choice([0, 1, len(text) + 1, len(blob), 2**63, 2**64 - 1])) + blob[8:]
    elif brk == "truncate" and len(blob) > 1:
        blob = blob[:rng.randrange(len(blob))]
    elif brk == "empty":
        blob = b""
    return blob


schemathesis.openapi.media_type("application/octet-stream", safetensors_body())


def _header(response, name):
    value = response.headers.get(name.lower())
    return value[0] if isinstance(value, list) and value else value


@schemathesis.check
def safetensors_answer(ctx, response, case):
    """A 200 answer in application/octet-stream (query or layer step with that Accept) is a
    well-formed safetensors file: exactly `out` F32 [qlen, q_heads, head_dim] with finite values,
    `recalled_chunks` I64 [chunks] ascending and, in span mode, `recalled_spans` I64 [spans, 2];
    offsets that tile the data; the timing headers as numbers."""
    if response.status_code != 200 or not (_header(response, "content-type") or "").startswith("application/octet-stream"):
        return None
    blob = response.content or b""
    assert len(blob) >= 8, "binary answer of %d bytes" % len(blob)
    n = struct.unpack("<Q", blob[:8])[0]
    assert 8 + n <= len(blob), "header length %d past the answer's %d bytes" % (n, len(blob))
    header = json.loads(blob[8:8 + n])
    data = blob[8 + n:]
    names = set(header) - {"__metadata__"}
    assert names in ({"out", "recalled_chunks"}, {"out", "recalled_chunks", "recalled_spans"}), "tensors %s" % sorted(names)
    spans = sorted(tuple(t["data_offsets"]) for name, t in header.items() if name in names)
    end = 0
    for a, b in spans:
        assert a == end and b >= a, "data_offsets %s do not tile the data" % spans
        end = b
    assert end == len(data), "tensors cover %d of %d data bytes" % (end, len(data))
    out = header["out"]
    assert out["dtype"] == "F32" and len(out["shape"]) == 3, "out: %s %s" % (out["dtype"], out["shape"])
    assert out["shape"][1:] == [MODEL["q_heads"], MODEL["head_dim"]] and out["shape"][0] >= 1, "out shape %s" % out["shape"]
    a, b = out["data_offsets"]
    assert b - a == 4 * out["shape"][0] * out["shape"][1] * out["shape"][2], "out holds %d bytes" % (b - a)
    values = struct.unpack("<%df" % ((b - a) // 4), data[a:b])
    assert all(math.isfinite(v) for v in values), "out holds a non-finite value"
    chunks = header["recalled_chunks"]
    assert chunks["dtype"] == "I64" and len(chunks["shape"]) == 1, "recalled_chunks: %s %s" % (chunks["dtype"], chunks["shape"])
    a, b = chunks["data_offsets"]
    ids = struct.unpack("<%dq" % ((b - a) // 8), data[a:b])
    assert len(ids) == chunks["shape"][0] and list(ids) == sorted(set(ids)) and all(i >= 0 for i in ids), \
        "recalled_chunks %s" % (ids,)
    if "recalled_spans" in header:
        t = header["recalled_spans"]
        assert t["dtype"] == "I64" and len(t["shape"]) == 2 and t["shape"][1] == 2, "recalled_spans %s" % t
    for name in ("X-Reattn-Score-Ms", "X-Reattn-Merge-Ms", "X-Reattn-Attention-Ms", "X-Reattn-Total-Ms",
                 "X-Reattn-Queue-Ms", "X-Reattn-Append-Ms"):
        float(_header(response, name))
    return None


@schemathesis.hook
def before_call(ctx, case, **kwargs):
    """Half the queries and layer steps ask for the binary answer (Accept is no OpenAPI
    parameter, so schemathesis never varies it). Which half follows from the case's body, so
    the same seed sends the same requests."""
    if case.method.upper() != "POST" or not case.path.endswith(("/query", "/step")):
        return None
    if zlib.crc32(repr(case.body).encode()) % 2 == 0:
        if case.headers is None:
            case.headers = {}
        case.headers.setdefault("Accept", "application/octet-stream")
    return None


def _contexts(body):
    """The context objects of a JSON answer: the answer itself, or the entries of a list."""
    if isinstance(body, dict) and "layer_tokens" in body:
        yield body
    if isinstance(body, dict) and isinstance(body.get("contexts"), list):
        yield from (c for c in body["contexts"] if isinstance(c, dict))


@schemathesis.check
def context_lengths(ctx, response, case):
    """A context's "tokens" is what every layer has reached: min(layer_tokens), one length per
    model layer (a rule of DESIGN.md section 5 that no schema states)."""
    if response.status_code >= 300 or not (_header(response, "content-type") or "").startswith("application/json"):
        return None
    body = json.loads(response.content or b"null")
    for c in _contexts(body):
        lengths = c.get("layer_tokens")
        assert isinstance(lengths, list) and len(lengths) == MODEL["layers"], "layer_tokens %s" % (lengths,)
        assert c.get("tokens") == min(lengths), "tokens %s but layer_tokens %s" % (c.get("tokens"), lengths)
    return None
