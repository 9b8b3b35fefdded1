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


def to_wire(x, what, dtype=None, ndim=None):
    """x (numpy array, nested lists, torch tensor or Raw16) -> (numpy array or Raw16, wire
    dtype) ready for safetensors.dumps.

    dtype: None keeps the input's precision (float16 -> F16, torch bfloat16 -> BF16, else F32);
    "F32", "F16" or "BF16" converts. ndim: the rank x must have. `what` names x in errors."""
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
    shape = arr.shape
    if ndim is not None and len(shape) != ndim:
        raise ValueError("%s: expected %d dimensions, got shape %s" % (what, ndim, list(shape)))
    want = dtype or natural
    if isinstance(arr, Raw16):
        if want == "BF16":
            return arr, "BF16"
        arr = bf16_bits_to_float32(arr.bits)
    if want == "BF16":
        return Raw16(float32_to_bf16_bits(arr.astype(np.float32, copy=False))), "BF16"
    if want == "F16":
        return np.ascontiguousarray(arr, dtype=np.float16), "F16"
    return np.ascontiguousarray(arr, dtype=np.float32), "F32"


def to_nested(x, what):
    """x -> nested Python lists of floats (for JSON bodies)."""
    arr, _ = to_wire(x, what, dtype="F32")
    return arr.tolist()
