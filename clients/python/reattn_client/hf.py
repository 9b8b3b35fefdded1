"""Run a transformers Llama, Qwen2 or Mistral model's attention through reattn.

    from reattn_client import Client, hf
    client = Client("http://127.0.0.1:8080")
    ctx = client.create_context()["id"]
    session = hf.attach(model, client, ctx)
    out = model.generate(input_ids, max_new_tokens=32)   # prefill and decode through reattn

`attach` replaces each decoder layer's attention `forward` (on the instance) with one that
projects q, k, v, sends them to the service un-rotated (the service applies RoPE at its
layout positions: DESIGN.md section 2), and feeds the answer to `o_proj`; the model's own
rotary embedding, attention kernel, mask and KV cache are not used, so the model holds no
KV cache. It also wraps `model.forward` so a call with more tokens than the service's
`local_window` runs as consecutive steps of at most that many tokens.

Written against transformers 5.x (the attention modules' q_proj/k_proj/v_proj/o_proj,
head_dim and layer_idx, which 4.4x-5.x share). One sequence (batch 1) per context; the
context holds everything the model has seen, so a new prompt needs a new context
(`session.context_id = ...`). Not thread-safe (one client connection)."""

import functools
import time
import warnings

import numpy as np

SUPPORTED = ("LlamaAttention", "Qwen2Attention", "MistralAttention")
# torch dtype name -> safetensors dtype name, for the wire and for `out`.
_WIRE_NAMES = {"torch.float32": "F32", "torch.float16": "F16", "torch.bfloat16": "BF16"}
# Room in the pinned answer buffer beyond `out`: the header and recalled_chunks (int64 each).
_ANSWER_SLACK_BYTES = 4 << 20


class _PinnedStaging:
    """Pinned host memory reused by every step of a model on a GPU: q, k and v are copied from
    the GPU straight into the request body's memory, and the answer is received into pinned
    memory that `out` is copied to the GPU from. No pageable copies and no allocation per step
    (a 4096-token step moves ~80 MiB each way at the LLaMA-3-8B shapes)."""

    def __init__(self, torch, tokens, q_heads, kv_heads, head_dim, wire, out):
        self.torch, self.wire, self.out = torch, wire, out
        self.q_size, self.kv_size = tokens * q_heads * head_dim, tokens * kv_heads * head_dim
        self.send = torch.empty(self.q_size + 2 * self.kv_size, dtype=wire, pin_memory=True)
        out_bytes = self.q_size * torch.empty(0, dtype=out).element_size()
        self.recv = torch.empty(out_bytes + _ANSWER_SLACK_BYTES, dtype=torch.uint8, pin_memory=True)
        self.recv_np = self.recv.numpy()
        self.recv_at = self.recv_np.ctypes.data
        self.pending = None  # an event after the last copy out of `recv`

    def stage(self, q, k, v):
        """q [qlen, H, D], k and v [Hkv, qlen, D] on the GPU -> the same in pinned memory."""
        nq, nkv = q.numel(), k.numel()
        qh = self.send[:nq].view(q.shape)
        kh = self.send[self.q_size:self.q_size + nkv].view(k.shape)
        vh = self.send[self.q_size + self.kv_size:self.q_size + self.kv_size + nkv].view(v.shape)
        for host, dev in ((qh, q), (kh, k), (vh, v)):
            host.copy_(dev.to(self.wire), non_blocking=True)
        # The socket reads the body next: the copies (queued on q's device's stream, whichever
        # device is current) must have landed; and the answer is received into `recv` next:
        # the previous answer's copy out of it (perhaps to another device) must be done.
        self.torch.cuda.current_stream(q.device).synchronize()
        if self.pending is not None:
            self.pending.synchronize()
            self.pending = None
        return qh, kh, vh

    def out_on(self, out, device):
        """The answer's `out` (a view of recv when it fit there) -> a tensor on `device`."""
        torch = self.torch
        arr = out.bits if hasattr(out, "bits") else out
        at = arr.ctypes.data - self.recv_at
        if 0 <= at and at + arr.nbytes <= self.recv_np.nbytes:
            host = self.recv[at:at + arr.nbytes].view(self.out)
            on_device = host.to(device, non_blocking=True)
            self.pending = torch.cuda.Event()
            self.pending.record(torch.cuda.current_stream(on_device.device))
            return on_device
        # It did not fit (an unusually long recalled_chunks): an ordinary copy.
        if hasattr(out, "bits"):
            host = torch.from_numpy(np.ascontiguousarray(arr).view(np.int16)).view(torch.bfloat16)
        else:
            host = torch.from_numpy(np.ascontiguousarray(arr))
        return host.to(device=device, dtype=self.out)


class Session:
    """What attach() installed, with the time spent per part since the last reset_timing():
    client_ms (round trips seen by the client, including the service), service_ms (the
    service's own total_ms), steps (layer steps sent)."""

    def __init__(self, model, client, context_id, step_tokens, dtype):
        self.model = model
        self.client = client
        self.context_id = context_id
        self.step_tokens = step_tokens
        self.dtype = dtype
        self._restore = []
        self._staging = None
        self.reset_timing()

    def reset_timing(self):
        self.client_ms = 0.0
        self.service_ms = 0.0
        self.steps = 0

    def detach(self):
        """Puts back the model's own attention and forward."""
        for obj, name, old in reversed(self._restore):
            if old is None:
                delattr(obj, name)
            else:
                setattr(obj, name, old)
        self._restore = []


def _rope_theta(config):
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and "rope_theta" in params:
        return float(params["rope_theta"]), params.get("rope_type", "default")
    scaling = getattr(config, "rope_scaling", None) or {}
    return float(getattr(config, "rope_theta", 10000.0)), scaling.get("rope_type", scaling.get("type", "default"))


def _decoder_layers(model):
    for path in ("model.layers", "layers"):
        obj = model
        try:
            for name in path.split("."):
                obj = getattr(obj, name)
            return list(obj)
        except AttributeError:
            continue
    raise ValueError("reattn.hf.attach: %s has no decoder layers at .model.layers or .layers" % type(model).__name__)


def _check_shapes(model, service_model, layers):
    config = model.config
    d = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    mine = {"layers": len(layers), "q_heads": config.num_attention_heads,
            "kv_heads": getattr(config, "num_key_value_heads", config.num_attention_heads), "head_dim": d}
    wrong = ["%s: model %s, service %s" % (k, v, service_model.get(k)) for k, v in mine.items()
             if service_model.get(k) != v]
    if wrong:
        raise ValueError("reattn.hf.attach: the model does not match the service's model shape (%s)" % "; ".join(wrong))
    theta, rope_type = _rope_theta(config)
    if abs(theta - float(service_model["rope_theta"])) > 1e-6 * theta:
        raise ValueError("reattn.hf.attach: rope_theta: model %g, service %g (the service applies RoPE)"
                         % (theta, service_model["rope_theta"]))
    if rope_type not in (None, "default"):
        warnings.warn("reattn.hf.attach: the model's rope_type is %r; the service applies plain RoPE "
                      "(theta %g) at layout positions" % (rope_type, theta))
    return mine


def _attention_forward(session, attn, layer, q_heads, kv_heads, head_dim):
    def forward(hidden_states, *args, **kwargs):
        import torch
        batch, qlen, _ = hidden_states.shape
        if batch != 1:
            raise ValueError("reattn.hf: batch size %d; a context holds one sequence (batch 1)" % batch)
        h = hidden_states[0]
        q = attn.q_proj(h).view(qlen, q_heads, head_dim)
        k = attn.k_proj(h).view(qlen, kv_heads, head_dim).transpose(0, 1)
        v = attn.v_proj(h).view(qlen, kv_heads, head_dim).transpose(0, 1)
        model_dtype = str(hidden_states.dtype)
        out_name = _WIRE_NAMES.get(model_dtype, "F32")
        if hidden_states.is_cuda and model_dtype in _WIRE_NAMES and qlen <= session.step_tokens:
            staging = _staging_for(session, torch, hidden_states.dtype, q_heads, kv_heads, head_dim)
            # The copy to the host waits for the model's own kernels: keep that out of client_ms.
            q, k, v = staging.stage(q, k, v)
            t0 = time.perf_counter()
            r = session.client.step(session.context_id, layer, q, k, v, out_dtype=out_name,
                                     into=staging.recv_np, raw_out=True)
            session.client_ms += (time.perf_counter() - t0) * 1e3
            out = staging.out_on(r.out, hidden_states.device)
        else:
            q, k, v = q.cpu(), k.cpu(), v.cpu()
            t0 = time.perf_counter()
            r = session.client.step(session.context_id, layer, q, k, v, dtype=session.dtype, out_dtype=out_name)
            session.client_ms += (time.perf_counter() - t0) * 1e3
            out = torch.from_numpy(np.ascontiguousarray(r.out)).to(device=hidden_states.device,
                                                                   dtype=hidden_states.dtype)
        session.service_ms += r.timing.get("total_ms", 0.0)
        session.steps += 1
        return attn.o_proj(out.reshape(1, qlen, q_heads * head_dim)), None

    return forward


def _staging_for(session, torch, model_dtype, q_heads, kv_heads, head_dim):
    """The session's pinned buffers, made on the first GPU step (again if the dtype changed)."""
    wire = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}.get(session.dtype) or model_dtype
    st = session._staging
    if st is None or st.wire != wire or st.out != model_dtype:
        st = session._staging = _PinnedStaging(torch, session.step_tokens, q_heads, kv_heads, head_dim, wire,
                                               model_dtype)
    return st


def _check_mask(mask):
    import torch
    if mask is not None and isinstance(mask, torch.Tensor) and mask.dim() == 2 and not bool(mask.all()):
        raise ValueError("reattn.hf: padding in attention_mask; a context holds one unpadded sequence")


def _chunked_forward(session, original):
    """model.forward that drops the mask (the service orders keys itself) and splits calls
    longer than step_tokens into consecutive calls. Keeps the original's signature visible
    (generate() reads it, e.g. for logits_to_keep)."""

    @functools.wraps(original)
    def forward(*args, **kwargs):
        import torch
        if args:
            if len(args) > 1 or "input_ids" in kwargs:
                raise TypeError("reattn.hf: pass only input_ids positionally")
            kwargs["input_ids"] = args[0]
        if kwargs.get("labels") is not None:
            raise ValueError("reattn.hf: labels are not supported (the service answers forward passes only)")
        _check_mask(kwargs.get("attention_mask"))
        kwargs["attention_mask"] = None
        key = "input_ids" if kwargs.get("input_ids") is not None else "inputs_embeds"
        x = kwargs[key]
        total = x.shape[1]
        if total <= session.step_tokens:
            return original(**kwargs)
        keep = kwargs.get("logits_to_keep", 0)
        if not isinstance(keep, int):
            raise ValueError("reattn.hf: logits_to_keep as indices is not supported with more than %d tokens"
                             % session.step_tokens)
        outs = []
        for begin in range(0, total, session.step_tokens):
            end = min(begin + session.step_tokens, total)
            part = dict(kwargs)
            part[key] = x[:, begin:end]
            for name in ("position_ids", "cache_position"):
                value = kwargs.get(name)
                if isinstance(value, torch.Tensor) and value.shape[-1] == total:
                    part[name] = value[..., begin:end]
            if keep:
                # This part's share of the last `keep` positions (at least one: 0 means all).
                part["logits_to_keep"] = min(end - begin, max(1, keep - (total - end)))
            outs.append(original(**part))
        last = outs[-1]
        for field in ("logits", "last_hidden_state"):
            if getattr(last, field, None) is not None:
                joined = torch.cat([getattr(o, field) for o in outs], dim=1)
                setattr(last, field, joined[:, -keep:] if keep else joined)
        return last

    return forward


def attach(model, client, context_id, step_tokens=None, dtype=None):
    """Makes `model` (a transformers Llama, Qwen2 or Mistral, for causal LM or the base model)
    run every layer's attention through reattn's per-layer step on `context_id`.

    step_tokens: most tokens per step (default and maximum: the service's local_window).
    dtype: q/k/v on the wire ("F32", "F16", "BF16"; default: the model's own dtype).
    Returns a Session (timing counters; detach() undoes the changes). Raises ValueError when
    the model's shape or rope_theta differs from the service's."""
    info = client.info()
    layers = _decoder_layers(model)
    shape = _check_shapes(model, info["model"], layers)
    window = int(info["reattention"]["local_window"])
    step_tokens = min(int(step_tokens or window), window)
    if dtype is not None and dtype not in ("F32", "F16", "BF16"):
        raise ValueError("reattn.hf.attach: dtype %r is not one of F32, F16, BF16" % (dtype,))
    session = Session(model, client, context_id, step_tokens, dtype)
    for index, layer in enumerate(layers):
        attn = getattr(layer, "self_attn", None)
        if attn is None or type(attn).__name__ not in SUPPORTED:
            session.detach()
            raise ValueError("reattn.hf.attach: layer %d attention is %s; supported: %s"
                             % (index, type(attn).__name__, ", ".join(SUPPORTED)))
        session._restore.append((attn, "forward", attn.__dict__.get("forward")))
        attn.forward = _attention_forward(session, attn, getattr(attn, "layer_idx", index), shape["q_heads"],
                                          shape["kv_heads"], shape["head_dim"])
    session._restore.append((model, "forward", model.__dict__.get("forward")))
    model.forward = _chunked_forward(session, model.forward)
    return session
