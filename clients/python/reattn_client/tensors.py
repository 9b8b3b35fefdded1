"""What the client accepts as a tensor (numpy arrays, nested lists, torch tensors where torch
is installed) and how it goes on the wire (F32, F16 or BF16). torch is never imported here:
a torch tensor is recognised by its type's module, so the package works without torch."""

import numpy as np

from .safetensors import Raw16, bf16_bits_to_float32, float32_to_bf16_bits

WIRE_DTYPES = ("F32", "F16", "BF16")


def _is_torch(x):
    return type(x).__module__.startswith("torch")


def _torch_to_wire(t):
    """A torch tensor -> (numpy array or Raw16, its natural wire dtype). bf16 goes by raw bits."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    name = str(t.dtype)
    if name == "torch.bfloat16":
        import torch  # only reached when the caller already passed a torch tensor
        return Raw16(t.contiguous().view(torch.int16).numpy().view(np.uint16)), "BF16"
    if name == "torch.float16":
        return t.contiguous().numpy(), "F16"
    if name in ("torch.float32", "torch.float64"):
        return t.contiguous().numpy(), "F32"
    raise TypeError("tensor dtype %s is not a float type (want float32, float16 or bfloat16)" % name)


def _checked(x, what, dtype, ndim):
    """x -> (numpy array or Raw16, its natural wire dtype), with dtype and rank checked."""
    if dtype is not None and dtype not in WIRE_DTYPES:
        raise ValueError("%s: dtype %r is not one of %s" % (what, dtype, ", ".join(WIRE_DTYPES)))
    if isinstance(x, Raw16):  # bf16 bit patterns already (numpy has no bfloat16)
        arr, natural = x, "BF16"
    elif _is_torch(x):
        arr, natural = _torch_to_wire(x)
    else:
        arr = np.asarray(x)
        if arr.dtype.kind not in "fiu":
            raise TypeError("%s: expected numbers, got an array of %s" % (what, arr.dtype))
        natural = "F16" if arr.dtype == np.float16 else "F32"
    if ndim is not None and len(arr.shape) != ndim:
        raise ValueError("%s: expected %d dimensions, got shape %s" % (what, ndim, list(arr.shape)))
    return arr, natural


def _converted(arr, want):
    """A checked array -> (numpy array or Raw16 in `want`, want); BF16 from floats is left to
    the caller (None returned) so that several tensors convert in one pass."""
    if isinstance(arr, Raw16):
        if want == "BF16":
            return arr, "BF16"
        arr = bf16_bits_to_float32(arr.bits)
    if want == "BF16":
        return None, "BF16"
    if want == "F16":
        return np.ascontiguousarray(arr, dtype=np.float16), "F16"
    return np.ascontiguousarray(arr, dtype=np.float32), "F32"


def to_wire(x, what, dtype=None, ndim=None):
    """x (numpy array, nested lists, torch tensor or Raw16) -> (numpy array or Raw16, wire
    dtype) ready for safetensors.dumps.

    dtype: None keeps the input's precision (float16 -> F16, torch bfloat16 -> BF16, else F32);
    "F32", "F16" or "BF16" converts. ndim: the rank x must have. `what` names x in errors."""
    return to_wire_many([(x, what)], dtype, ndim)[0]


def to_wire_many(items, dtype=None, ndim=None):
    """[(x, what)] -> [(numpy array or Raw16, wire dtype)], as to_wire of each, where with dtype
    None each tensor after the first goes in the wire dtype of the one before it (a step's k
    follows q, v follows k). Float to BF16 conversions run as one pass over all the tensors
    that need one (a decode step's q, k, v: one set of numpy calls instead of three)."""
    out, pending = [], []
    for x, what in items:
        arr, natural = _checked(x, what, dtype, ndim)
        want = dtype or (out[-1][1] if out else natural)
        wire = _converted(arr, want)
        if wire[0] is None:
            pending.append((len(out), arr))
        out.append(wire)
    if len(pending) == 1:
        i, arr = pending[0]
        out[i] = (Raw16(float32_to_bf16_bits(arr.astype(np.float32, copy=False))), "BF16")
    elif pending:
        flat = np.concatenate([np.asarray(a, dtype=np.float32).reshape(-1) for _, a in pending])
        bits = float32_to_bf16_bits(flat)
        at = 0
        for i, arr in pending:
            out[i] = (Raw16(bits[at:at + arr.size].reshape(arr.shape)), "BF16")
            at += arr.size
    return out


def to_nested(x, what):
    """x -> nested Python lists of floats (for JSON bodies)."""
    arr, _ = to_wire(x, what, dtype="F32")
    return arr.tolist()
