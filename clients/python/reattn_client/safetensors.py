"""A minimal safetensors writer and reader over numpy (the format: an 8-byte little-endian
header length, a JSON header {name: {dtype, shape, data_offsets}}, then the raw tensors).

numpy has no bfloat16: BF16 tensors travel as their raw 16-bit patterns (`Raw16`), and
`read` widens them to float32 (exactly: every bf16 value is an f32 value)."""

import json
import struct

import numpy as np

# safetensors dtype name -> numpy dtype (little-endian), for the dtypes numpy holds natively.
_NUMPY_DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
}
_BF16 = "BF16"
_MAX_HEADER_BYTES = 100 * 1024 * 1024


class Raw16:
    """A BF16 tensor as its raw bit patterns: `bits` is a uint16 array of the tensor's shape."""

    def __init__(self, bits):
        self.bits = np.ascontiguousarray(bits, dtype=np.uint16)

    @property
    def shape(self):
        return self.bits.shape


# Typed operands: with a Python int each numpy call first works out the int's type, which
# costs more than the arithmetic on a decode step's few thousand values.
_U32_1, _U32_16, _U32_7FFF = np.uint32(1), np.uint32(16), np.uint32(0x7FFF)


def float32_to_bf16_bits(x):
    """float32 values -> bf16 bit patterns (uint16), rounded to nearest even; NaN stays NaN."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    u = x.view(np.uint32)
    # In 32 bits: only NaNs with the sign bit set can wrap past 2^32, and NaNs are redone below.
    rounded = np.right_shift(u, _U32_16)
    np.bitwise_and(rounded, _U32_1, out=rounded)
    np.add(rounded, _U32_7FFF, out=rounded)
    np.add(rounded, u, out=rounded)
    np.right_shift(rounded, _U32_16, out=rounded)
    bits = rounded.astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        bits[nan] = ((u[nan] >> 16) | 0x40).astype(np.uint16)
    return bits


def bf16_bits_to_float32(bits):
    """bf16 bit patterns (uint16) -> float32, exactly."""
    b = np.ascontiguousarray(bits, dtype=np.uint16)
    return (b.astype(np.uint32) << 16).view(np.float32)


def _dtype_name(array):
    for name, dt in _NUMPY_DTYPES.items():
        if array.dtype == dt or array.dtype == dt.newbyteorder("="):
            return name
    raise TypeError("safetensors: numpy dtype %s has no safetensors name here (use float32, float16, "
                    "int64, int32, ... or Raw16 for bf16)" % array.dtype)


# Encoded headers by (name, dtype, shape) of every tensor: a model sends the same shapes
# every step. Bounded: cleared when full.
_HEADER_CACHE = {}
_HEADER_CACHE_SIZE = 256


def _encoded_header(layout):
    """layout: ((name, dtype, shape, nbytes), ...) -> the 8-byte length and the JSON header."""
    head = _HEADER_CACHE.get(layout)
    if head is None:
        header, offset = {}, 0
        for name, dtype, shape, nbytes in layout:
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * ((8 - len(text) % 8) % 8)  # keeps the tensors 8-byte aligned
        head = struct.pack("<Q", len(text)) + text
        if len(_HEADER_CACHE) >= _HEADER_CACHE_SIZE:
            _HEADER_CACHE.clear()
        _HEADER_CACHE[layout] = head
    return head


def dumps_parts(tensors):
    """tensors: {name: numpy array or Raw16} (insertion order kept) -> the safetensors bytes
    as a list of buffers (the header, then each tensor's own memory where it is contiguous
    little-endian already): what a socket can send without joining them. The buffers alias
    the arrays: send them before changing those."""
    layout, blobs = [], []
    for name, t in tensors.items():
        if isinstance(t, Raw16):
            dtype, a, shape = _BF16, t.bits.astype("<u2", copy=False), t.shape
        else:
            a = np.asarray(t)
            dtype, shape = _dtype_name(a), a.shape
            a = np.ascontiguousarray(a, dtype=_NUMPY_DTYPES[dtype])
        raw = memoryview(np.ascontiguousarray(a).reshape(-1).view(np.uint8))
        layout.append((str(name), dtype, tuple(int(s) for s in shape), raw.nbytes))
        blobs.append(raw)
    return [_encoded_header(tuple(layout))] + blobs


def dumps(tensors):
    """tensors: {name: numpy array or Raw16} (insertion order kept) -> safetensors bytes."""
    return b"".join(dumps_parts(tensors))


# Decoded headers by their bytes (an answer of the same shapes has the same header). Bounded:
# headers up to _CACHED_HEADER_BYTES, cleared when full.
_DECODED_CACHE = {}
_CACHED_HEADER_BYTES = 4096


def _decoded_header(text):
    """The JSON header's bytes -> [(name, dtype, shape, begin, end, count, itemsize)]; raises
    ValueError naming what is malformed."""
    entries = _DECODED_CACHE.get(text)
    if entries is not None:
        return entries
    try:
        header = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ValueError("safetensors: header is not JSON: %s" % e) from None
    if not isinstance(header, dict):
        raise ValueError("safetensors: header is not a JSON object")
    entries = []
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = meta["dtype"], [int(s) for s in meta["shape"]], meta["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ValueError("safetensors: tensor %r lacks dtype, shape or data_offsets" % name) from None
        if dtype == _BF16:
            itemsize = 2
        elif dtype in _NUMPY_DTYPES:
            itemsize = _NUMPY_DTYPES[dtype].itemsize
        else:
            raise ValueError("safetensors: tensor %r has unsupported dtype %r" % (name, dtype))
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        entries.append((name, dtype, shape, begin, end, count, itemsize))
    if len(text) <= _CACHED_HEADER_BYTES:
        if len(_DECODED_CACHE) >= _HEADER_CACHE_SIZE:
            _DECODED_CACHE.clear()
        _DECODED_CACHE[text] = entries
    return entries


def loads(data, widen_bf16=True):
    """safetensors bytes -> {name: numpy array}; BF16 comes back as float32 (widen_bf16=False:
    as a Raw16 of its bits, a view like the other tensors).
    A writable buffer (a bytearray) is used in place: the arrays are views of it. A read-only
    one (bytes) is copied, so the arrays are always writable. Raises ValueError naming what
    is malformed."""
    data = memoryview(data).cast("B")
    if len(data) < 8:
        raise ValueError("safetensors: %d bytes, shorter than the 8-byte header length" % len(data))
    (hlen,) = struct.unpack("<Q", data[:8])
    if hlen > min(_MAX_HEADER_BYTES, len(data) - 8):
        raise ValueError("safetensors: header length %d exceeds the %d bytes that follow" % (hlen, len(data) - 8))
    body = data[8 + hlen:]
    out = {}
    for name, dtype, shape, begin, end, count, itemsize in _decoded_header(bytes(data[8:8 + hlen])):
        if not (0 <= begin <= end <= len(body)) or end - begin != count * itemsize:
            raise ValueError("safetensors: tensor %r: data_offsets [%s, %s] do not fit shape %s of %s in %d bytes"
                             % (name, begin, end, shape, dtype, len(body)))
        raw = body[begin:end]
        if dtype == _BF16 and widen_bf16:
            arr = bf16_bits_to_float32(np.frombuffer(raw, dtype="<u2")).reshape(shape)
        elif dtype == _BF16:
            bits = np.frombuffer(raw, dtype="<u2").reshape(shape)
            arr = Raw16(bits.copy() if data.readonly else bits)
        else:
            arr = np.frombuffer(raw, dtype=_NUMPY_DTYPES[dtype]).reshape(shape)
            if data.readonly:
                arr = arr.copy()
        out[name] = arr
    return out
