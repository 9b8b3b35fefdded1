"""The reattn HTTP client: one keep-alive connection, numpy in and out.

Not thread-safe: use one Client per thread (each holds its own connection)."""

import json
import os
import time
import urllib.parse
from dataclasses import dataclass, field

import numpy as np

from . import http11, operations, safetensors
from .tensors import WIRE_DTYPES, to_nested, to_wire, to_wire_many

_BINARY = "application/octet-stream"
_TIMING_HEADERS = {  # response header -> timing key, on binary answers
    "X-Reattn-Score-Ms": "score_ms",
    "X-Reattn-Merge-Ms": "merge_ms",
    "X-Reattn-Attention-Ms": "attention_ms",
    "X-Reattn-Total-Ms": "total_ms",
    "X-Reattn-Queue-Ms": "queue_ms",
    "X-Reattn-Append-Ms": "append_ms",
}
_SERVER_MS_HEADER = "X-Reattn-Server-Ms"  # every answer: the service's time, request to answer
_MAX_ERROR_BODY = 2000  # characters of a non-JSON error body kept in the exception
# Client(busy_wait=None): poll this long for each answer on machines of at least this many CPUs
# (bench/NOTES.md, "qlen-1 step overhead": ~0.09 ms less per decode step on the H200 host).
_AUTO_BUSY_WAIT_S = 0.002
_AUTO_BUSY_WAIT_CPUS = 8


class ReattnError(Exception):
    """An error answer from the service (status, code and message from its JSON error body),
    or a transport failure (status 0, code "connection")."""

    def __init__(self, status, code, message, request_id=None):
        super().__init__("reattn: %d %s: %s" % (status, code, message))
        self.status = status
        self.code = code
        self.message = message
        self.request_id = request_id


@dataclass
class AttentionResult:
    """The answer to a query or a layer step.

    out: float32 [qlen, q_heads, head_dim] (with raw_out: as sent, Raw16 for BF16); recalled_chunks: int64 chunk ids, ascending;
    timing: milliseconds by phase (score_ms, merge_ms, attention_ms, total_ms, queue_ms, ...);
    tokens: the layer's length after the call; context_tokens: what every layer has reached
    (steps only); layer: the layer answered; client_ms: the whole call at the client (encoding,
    round trip, decoding)."""
    out: np.ndarray
    recalled_chunks: np.ndarray
    timing: dict
    layer: int
    tokens: int = None
    context_tokens: int = None
    client_ms: float = None
    extra: dict = field(default_factory=dict)


class Client:
    """A session with one reattn service.

    url: "http://host:port" (a path prefix is kept). api_key: sent as a Bearer token; defaults
    to $REATTN_API_KEY. retries: how many times a 503 that carries Retry-After is retried
    (waiting Retry-After seconds, at most max_retry_wait each) before ReattnError is raised.
    busy_wait: seconds to poll the socket for the start of each answer before sleeping on it
    (0: sleep at once). A decode step's answer then needs no thread wake-up, at the cost of one
    busy core while it is computed. None (auto): 0.002 on a machine of 8 or more CPUs, 0 on a
    smaller one, where the polling would take a core from the service itself."""

    def __init__(self, url="http://127.0.0.1:8080", api_key=None, timeout=120.0, retries=5,
                 max_retry_wait=10.0, busy_wait=None):
        parsed = urllib.parse.urlsplit(url if "://" in url else "http://" + url)
        if parsed.scheme not in ("http", "https"):
            raise ValueError("reattn: url scheme must be http or https, got %r" % parsed.scheme)
        if not parsed.hostname:
            raise ValueError("reattn: url %r has no host" % url)
        self.scheme = parsed.scheme
        self.host = parsed.hostname
        self.port = parsed.port or (443 if parsed.scheme == "https" else 80)
        self.prefix = parsed.path.rstrip("/")
        self.api_key = api_key if api_key is not None else os.environ.get("REATTN_API_KEY") or None
        self.timeout = timeout
        self.retries = int(retries)
        self.max_retry_wait = float(max_retry_wait)
        if busy_wait is None:
            busy_wait = _AUTO_BUSY_WAIT_S if (os.cpu_count() or 1) >= _AUTO_BUSY_WAIT_CPUS else 0.0
        self.busy_wait = max(0.0, float(busy_wait))
        self._conn = None

    # ------------------------------------------------------------ transport

    def close(self):
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _send_once(self, method, path, body, headers, into=None):
        """One request on the kept connection; a connection the server had closed while idle
        is reopened once (the request never reached the server then)."""
        for attempt in (0, 1):
            if self._conn is None:
                self._conn = http11.Connection(self.host, self.port, self.timeout, tls=self.scheme == "https",
                                               busy_wait=self.busy_wait)
            try:
                return self._conn.roundtrip(method, self.prefix + path, headers, body, into=into)
            except http11.Closed as e:
                self._conn.close()
                if attempt == 1:
                    raise ReattnError(0, "connection", "%s %s: %s" % (method, path, e)) from None
            except (OSError, ValueError) as e:
                self._conn.close()
                raise ReattnError(0, "connection", "%s %s to %s:%d: %s" % (method, path, self.host, self.port, e)) from None
        raise AssertionError("unreachable")

    def request(self, method, path, body=None, content_type=None, accept=None, auth=True, into=None):
        """Sends one request (retrying 503 + Retry-After); returns (response, body bytes) for
        a 2xx answer and raises ReattnError for any other. into: a writable buffer the 2xx
        answer's body is received into when it fits (then returned as a memoryview of it)."""
        headers = {}
        if body is not None:
            headers["Content-Type"] = content_type or "application/json"
        if accept:
            headers["Accept"] = accept
        if auth and self.api_key:
            headers["Authorization"] = "Bearer " + self.api_key
        tries = 0
        while True:
            r, data = self._send_once(method, path, body, headers, into)
            if 200 <= r.status < 300:
                return r, data
            retry_after = r.getheader("Retry-After")
            if r.status == 503 and retry_after is not None and tries < self.retries:
                tries += 1
                time.sleep(min(_seconds(retry_after), self.max_retry_wait))
                continue
            raise _error_from(r, data, method, path)

    def _json(self, method, path, payload=None, auth=True):
        body = None if payload is None else json.dumps(payload).encode()
        _, data = self.request(method, path, body=body, auth=auth)
        return json.loads(data.decode()) if data else {}

    # ------------------------------------------------------------ service

    def live(self):
        """True when /health/live answers 200."""
        try:
            self.request("GET", "/health/live", auth=False)
            return True
        except ReattnError:
            return False

    def ready(self):
        """True when every rank is up (/health/ready answers 200); no retry on 503."""
        retries, self.retries = self.retries, 0
        try:
            self.request("GET", "/health/ready", auth=False)
            return True
        except ReattnError:
            return False
        finally:
            self.retries = retries

    def wait_ready(self, timeout=120.0, interval=0.1):
        deadline = time.monotonic() + timeout
        while not self.ready():
            if time.monotonic() > deadline:
                raise ReattnError(0, "timeout", "service at %s:%d not ready after %.0fs" % (self.host, self.port, timeout))
            time.sleep(interval)

    def info(self):
        """GET /v1/info: model shape, ranks, capacity, config."""
        return self._json("GET", "/v1/info")

    def metrics(self):
        """GET /metrics parsed: {metric name: [(labels dict, value), ...]}."""
        _, data = self.request("GET", "/metrics", auth=False)
        return parse_metrics(data.decode())

    # ------------------------------------------------------------ contexts

    def create_context(self):
        """POST /v1/contexts -> {"id", "owner_rank", "tokens", ...}."""
        return self._json("POST", "/v1/contexts", {})

    def context(self, context_id):
        """GET /v1/contexts/{id} -> {"id", "owner_rank", "tokens", "layer_tokens", ...}."""
        return self._json("GET", "/v1/contexts/%d" % int(context_id))

    def contexts(self):
        """GET /v1/contexts -> list of context dicts."""
        return self._json("GET", "/v1/contexts")["contexts"]

    def delete_context(self, context_id):
        return self._json("DELETE", "/v1/contexts/%d" % int(context_id))

    def append(self, context_id, k, v, dtype=None):
        """Appends tokens to every layer: k, v [layers, kv_heads, tokens, head_dim] (pre-RoPE).
        dtype: "F32", "F16" or "BF16" on the wire (default: the inputs' own precision)."""
        (kw, _), (vw, _) = to_wire_many([(k, "k"), (v, "v")], dtype, ndim=4)
        if kw.shape != vw.shape:
            raise ValueError("append: k shape %s != v shape %s" % (list(kw.shape), list(vw.shape)))
        body = safetensors.dumps_parts({"k": kw, "v": vw})
        _, data = self.request("POST", "/v1/contexts/%d/kv" % int(context_id), body=body, content_type=_BINARY)
        return json.loads(data.decode())

    def synthetic(self, context_id, tokens, seed, needles=()):
        """Fills `tokens` synthetic tokens generated on the ranks (needles: token positions)."""
        return self._json("POST", "/v1/contexts/%d/synthetic" % int(context_id),
                          {"tokens": int(tokens), "seed": int(seed), "needles": [int(t) for t in needles]})

    # ------------------------------------------------------------ long-running operations

    def load(self, context_id, path, format="safetensors"):
        """Starts a bulk load into a context: the ranks read `path`, a safetensors file with k
        and v [layers, kv_heads, tokens, head_dim] under the server's --load-root, themselves.
        Returns the operation's record ({"id": "op-N", "state", "tokens_total", ...}); wait on
        it with wait_operation."""
        return self._json("POST", "/v1/contexts/%d/load" % int(context_id), {"path": str(path), "format": format})

    def operation(self, op_id):
        """GET /v1/operations/{op}: state, tokens_done/total, bytes_done, bytes_per_s, error."""
        return self._json("GET", "/v1/operations/%s" % urllib.parse.quote(str(op_id), safe=""))

    def operations(self):
        """GET /v1/operations: every operation the service still reports, oldest first."""
        return self._json("GET", "/v1/operations")["operations"]

    def cancel_operation(self, op_id):
        """DELETE /v1/operations/{op}: asks the service to cancel (a load is rolled back).
        Returns the record; 409 (ReattnError) once it has finished."""
        return self._json("DELETE", "/v1/operations/%s" % urllib.parse.quote(str(op_id), safe=""))

    def wait_operation(self, op_id, progress=False, timeout=None, interval=0.2):
        """Polls until the operation finishes and returns its final record; raises
        OperationError if it failed or was cancelled. progress=True shows a tqdm bar when tqdm
        is installed (plain lines on stderr otherwise)."""
        return operations.wait(self, op_id, progress=progress, timeout=timeout, interval=interval)

    # ------------------------------------------------------------ snapshots

    def snapshot(self, context_id, name, wait=True, progress=False, timeout=None):
        """Snapshots a context under the server's snapshot directory as `name` (a long-running
        operation: queries on the context go on, appends get 409 meanwhile). wait=True waits for
        it (wait_operation; OperationError if it fails) and returns the snapshot's entry as
        snapshots() lists it; wait=False returns the operation's record ({"operation": "op-N"})."""
        rec = self._json("POST", "/v1/contexts/%d/snapshot" % int(context_id), {"name": str(name)})
        if not wait:
            return rec
        self.wait_operation(rec["operation"], progress=progress, timeout=timeout)
        for s in self.snapshots():
            if s["name"] == name:
                return s
        raise ReattnError(404, "not_found", "snapshot %r succeeded but is not listed" % name)

    def snapshots(self):
        """GET /v1/snapshots: every complete snapshot (name, context_id, tokens, layers, bytes,
        ranks, dtype, created), by name."""
        return self._json("GET", "/v1/snapshots")["snapshots"]

    def delete_snapshot(self, name):
        """DELETE /v1/snapshots/{name}; 409 while an operation uses it."""
        return self._json("DELETE", "/v1/snapshots/%s" % urllib.parse.quote(str(name), safe=""))

    def restore(self, name, wait=True, progress=False, timeout=None):
        """Restores snapshot `name` into a new context, on however many ranks the service runs.
        wait=True waits for the operation and returns the new context (as context()); wait=False
        returns the operation's record, whose context_id is the new context's id."""
        rec = self._json("POST", "/v1/contexts", {"from_snapshot": str(name)})
        if not wait:
            return rec
        self.wait_operation(rec["operation"], progress=progress, timeout=timeout)
        return self.context(rec["context_id"])

    # ------------------------------------------------------------ attention

    def query(self, context_id, layer, q, mode="tail", binary=True, dtype=None, out_dtype=None, into=None,
              raw_out=False):
        """Queries one layer: q [qlen, q_heads, head_dim] (pre-RoPE). binary: q goes as a
        safetensors body and the answer is asked for in safetensors (False: JSON both ways).
        out_dtype, into, raw_out: as for step()."""
        t0 = time.perf_counter()
        path = "/v1/contexts/%d/query" % int(context_id)
        if binary:
            qw, _ = to_wire(q, "q", dtype, ndim=3)
            body = safetensors.dumps_parts({"q": qw})
            path += "?layer=%d&mode=%s%s" % (int(layer), urllib.parse.quote(mode), _out_dtype_param(out_dtype))
            return self._attention(t0, path, body, _BINARY, layer, into=into, raw_out=raw_out)
        _json_only(out_dtype, into, raw_out)
        body = json.dumps({"layer": int(layer), "q": to_nested(q, "q"), "mode": mode}).encode()
        return self._attention(t0, path, body, "application/json", layer, accept=None)

    def step(self, context_id, layer, q, k, v, binary=True, dtype=None, out_dtype=None, into=None, raw_out=False):
        """One layer of a forward pass: appends k, v [kv_heads, qlen, head_dim] to `layer` and
        answers the tail query q [qlen, q_heads, head_dim] whose rows are those tokens (all
        pre-RoPE). Layer 0 first, then 1, ...: the service answers 409 out_of_order otherwise.

        dtype: the wire dtype of q, k, v (None: the inputs' own). out_dtype: "F32" (the
        default), "F16" or "BF16": the service rounds `out` to it and sends it so (half the
        bytes back). into: a writable buffer (e.g. a pinned numpy view) the answer is received
        into when it fits; the result's arrays are then views of it, valid until it is reused.
        raw_out: `out` as sent (float16/float32, or Raw16 bits for BF16) instead of float32."""
        t0 = time.perf_counter()
        path = "/v1/contexts/%d/step" % int(context_id)
        if binary:
            (qw, _), (kw, _), (vw, _) = to_wire_many([(q, "q"), (k, "k"), (v, "v")], dtype, ndim=3)
            body = safetensors.dumps_parts({"q": qw, "k": kw, "v": vw})
            path += "?layer=%d%s" % (int(layer), _out_dtype_param(out_dtype))
            return self._attention(t0, path, body, _BINARY, layer, into=into, raw_out=raw_out)
        _json_only(out_dtype, into, raw_out)
        payload = {"layer": int(layer), "q": to_nested(q, "q"), "k": to_nested(k, "k"), "v": to_nested(v, "v")}
        return self._attention(t0, path, json.dumps(payload).encode(), "application/json", layer, accept=None)

    def _attention(self, t0, path, body, content_type, layer, accept=_BINARY, into=None, raw_out=False):
        """Sends a query or step body and decodes the answer (safetensors or JSON, whichever
        came); client_ms runs from t0, when the caller began encoding, to the decoded result."""
        r, data = self.request("POST", path, body=body, content_type=content_type, accept=accept,
                               into=_checked_into(into))
        if (r.getheader("Content-Type") or "").startswith(_BINARY):
            result = _binary_result(r, data, layer, raw_out)
        else:
            result = _json_result(json.loads(bytes(data).decode()), layer)
        server_ms = r.getheader(_SERVER_MS_HEADER)
        if server_ms is not None:
            result.timing["server_ms"] = float(server_ms)
        result.client_ms = (time.perf_counter() - t0) * 1e3
        return result


def _checked_into(into):
    """`into` as a writable byte view, checked before anything is sent (a bad one found while
    the answer is read would leave a step applied and its answer lost)."""
    if into is None:
        return None
    try:
        view = memoryview(into).cast("B")
    except TypeError:
        raise ValueError("into: expected a C-contiguous buffer (a bytearray or a contiguous numpy array)") from None
    if view.readonly:
        raise ValueError("into: the buffer is read-only")
    return view


def _out_dtype_param(out_dtype):
    if out_dtype is None:
        return ""
    if out_dtype not in WIRE_DTYPES:
        raise ValueError("out_dtype %r is not one of %s" % (out_dtype, ", ".join(WIRE_DTYPES)))
    return "&out_dtype=" + out_dtype


def _json_only(out_dtype, into, raw_out):
    if out_dtype is not None or into is not None or raw_out:
        raise ValueError("out_dtype, into and raw_out need binary=True (a JSON answer is parsed into new lists)")


# ---------------------------------------------------------------- answers


def _seconds(retry_after):
    try:
        return max(0.0, float(retry_after))
    except ValueError:
        return 1.0  # an HTTP date instead of seconds: wait a second


def _error_from(r, data, method, path):
    request_id = r.getheader("X-Request-Id")
    try:
        err = json.loads(data.decode())["error"]
        return ReattnError(r.status, str(err.get("code", "")), str(err.get("message", "")), request_id)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        text = data[:_MAX_ERROR_BODY].decode(errors="replace")
        return ReattnError(r.status, "http_%d" % r.status, "%s %s: %s" % (method, path, text), request_id)


def _json_result(d, layer):
    ids = np.array([c["chunk"] for c in d.get("recalled_chunks", [])], dtype=np.int64)
    return AttentionResult(out=np.asarray(d["out"], dtype=np.float32), recalled_chunks=ids,
                           timing=dict(d.get("timing", {})), layer=int(d.get("layer", layer)),
                           tokens=d.get("tokens"), context_tokens=d.get("context_tokens"),
                           extra={k: d[k] for k in d if k not in ("out", "recalled_chunks", "timing")})


def _binary_result(r, data, layer, raw_out=False):
    try:
        tensors = safetensors.loads(data, widen_bf16=not raw_out)
    except ValueError as e:
        raise ReattnError(r.status, "bad_response", "binary answer: %s" % e) from None
    if "out" not in tensors:
        raise ReattnError(r.status, "bad_response", "binary answer has no 'out' tensor (has %s)" % sorted(tensors))
    timing = {}
    for header, key in _TIMING_HEADERS.items():
        value = r.getheader(header)
        if value is not None:
            timing[key] = float(value)

    def int_header(name):
        value = r.getheader(name)
        return int(value) if value is not None else None

    out = tensors["out"]
    return AttentionResult(out=out if raw_out else out.astype(np.float32, copy=False),
                           recalled_chunks=tensors.get("recalled_chunks", np.zeros(0, np.int64)).astype(np.int64),
                           timing=timing, layer=layer, tokens=int_header("X-Reattn-Tokens"),
                           context_tokens=int_header("X-Reattn-Context-Tokens"))


def parse_metrics(text):
    """Prometheus text exposition -> {name: [(labels dict, value), ...]} (comments skipped)."""
    out = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        labels = {}
        name = head
        if "{" in head:
            name, _, rest = head.partition("{")
            for part in _split_labels(rest.rstrip("}")):
                key, _, val = part.partition("=")
                labels[key.strip()] = val.strip().strip('"')
        try:
            out.setdefault(name, []).append((labels, float(value)))
        except ValueError:
            continue
    return out


def _split_labels(text):
    parts, cur, quoted = [], "", False
    for ch in text:
        if ch == '"':
            quoted = not quoted
        if ch == "," and not quoted:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if cur:
        parts.append(cur)
    return parts
