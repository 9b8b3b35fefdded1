"""Helpers for the reattn-server end-to-end tests (Python 3 standard library only):
starting the service under mpirun, HTTP calls, and writing safetensors blobs."""

import http.client
import json
import os
import random
import signal
import socket
import struct
import subprocess
import time


def free_port():
    """A loopback port that was free a moment ago (bind port 0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mpi_env():
    env = dict(os.environ)
    # Open MPI refuses to run as root without these (CI containers run as root).
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    return env


# ---------------------------------------------------------------- safetensors


def bf16_round(x):
    """x rounded (by truncation) to a value that bf16, f16-range aside, and f32 hold exactly."""
    bits = struct.unpack("<I", struct.pack("<f", x))[0] & 0xFFFF0000
    return struct.unpack("<f", struct.pack("<I", bits))[0]


def f32_round(x):
    return struct.unpack("<f", struct.pack("<f", x))[0]


def pack_values(dtype, values):
    n = len(values)
    if dtype == "F32":
        return struct.pack("<%df" % n, *values)
    if dtype == "F16":
        return struct.pack("<%de" % n, *values)
    if dtype == "BF16":
        out = bytearray()
        for v in values:
            bits = struct.unpack("<I", struct.pack("<f", v))[0]
            out += struct.pack("<H", bits >> 16)
        return bytes(out)
    raise ValueError(dtype)


def safetensors_bytes(tensors):
    """tensors: list of (name, dtype, shape, raw bytes)."""
    header, data = {}, b""
    for name, dtype, shape, raw in tensors:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    text = json.dumps(header).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    return struct.pack("<Q", len(text)) + text + data


def read_safetensors(blob):
    """{name: (dtype, shape, values)} of a safetensors blob (F32, BF16, F16, I64)."""
    n = struct.unpack("<Q", blob[:8])[0]
    header = json.loads(blob[8:8 + n])
    data = blob[8 + n:]
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        a, b = t["data_offsets"]
        raw = data[a:b]
        fmt = {"F32": "f", "I64": "q", "F16": "e"}.get(t["dtype"])
        if fmt:
            size = struct.calcsize(fmt)
            values = list(struct.unpack("<%d%s" % (len(raw) // size, fmt), raw))
        else:  # BF16
            values = [struct.unpack("<f", struct.pack("<I", x << 16))[0]
                      for x in struct.unpack("<%dH" % (len(raw) // 2), raw)]
        out[name] = (t["dtype"], t["shape"], values)
    return out


def unflatten(values, shape):
    if len(shape) == 1:
        return list(values)
    step = len(values) // shape[0]
    return [unflatten(values[i * step:(i + 1) * step], shape[1:]) for i in range(shape[0])]


def flatten(nested):
    out = []
    stack = [nested]
    while stack:
        x = stack.pop()
        if isinstance(x, list):
            stack.extend(reversed(x))
        else:
            out.append(x)
    return out


def random_kv(rng, layers, kv_heads, tokens, dim):
    """k, v as nested lists [layers][kv_heads][tokens][dim] of bf16-exact values."""
    def one():
        return [[[[bf16_round(rng.uniform(-1.0, 1.0)) for _ in range(dim)] for _ in range(tokens)]
                 for _ in range(kv_heads)] for _ in range(layers)]
    return one(), one()


def kv_slice(kv, begin, end):
    return [[head[begin:end] for head in layer] for layer in kv]


def kv_body(k, v, dtype="F32"):
    shape = [len(k), len(k[0]), len(k[0][0]), len(k[0][0][0])]
    return safetensors_bytes([("k", dtype, shape, pack_values(dtype, flatten(k))),
                              ("v", dtype, shape, pack_values(dtype, flatten(v)))])


def random_q(rng, qlen, heads, dim, scale=1.0):
    return [[[f32_round(scale * rng.gauss(0.0, 1.0)) for _ in range(dim)] for _ in range(heads)]
            for _ in range(qlen)]


def q_body(q, dtype="F32"):
    shape = [len(q), len(q[0]), len(q[0][0])]
    return safetensors_bytes([("q", dtype, shape, pack_values(dtype, flatten(q)))])


# ---------------------------------------------------------------- HTTP


class Response:
    def __init__(self, status, headers, body):
        self.status = status
        self.headers = headers
        self.body = body

    def json(self):
        return json.loads(self.body.decode())

    def header(self, name):
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None


class Client:
    """One keep-alive connection; reconnects when the server closed it."""

    def __init__(self, port, api_key=None, timeout=60):
        self.port = port
        self.api_key = api_key
        self.timeout = timeout
        self.conn = None

    def close(self):
        if self.conn:
            self.conn.close()
            self.conn = None

    def request(self, method, path, body=None, headers=None, auth=True, content_type=None):
        hdrs = dict(headers or {})
        if auth and self.api_key and "Authorization" not in hdrs:
            hdrs["Authorization"] = "Bearer " + self.api_key
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
            hdrs.setdefault("Content-Type", "application/json")
        elif isinstance(body, str):
            body = body.encode()
            hdrs.setdefault("Content-Type", "application/json")
        if content_type:
            hdrs["Content-Type"] = content_type
        for attempt in range(2):
            if self.conn is None:
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
            try:
                self.conn.request(method, path, body=body, headers=hdrs)
                r = self.conn.getresponse()
                data = r.read()
                if r.getheader("Connection", "").lower() == "close":
                    self.close()
                return Response(r.status, r.getheaders(), data)
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                # A keep-alive connection the server closed between requests: retry once.
                self.close()
                if attempt == 1:
                    raise
        raise RuntimeError("unreachable")


# ---------------------------------------------------------------- the service


def _die_with_parent():
    """In the child before exec: SIGKILL it if the test process dies (e.g. a CTest timeout),
    so no server outlives its test. Linux only; elsewhere a no-op."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def add_job_args(parser, ranks=2):
    """The command-line options that pick the job a benchmark starts: --server (the binary),
    --mpirun, --ranks and --backend (the config's backend kind)."""
    parser.add_argument("--server", required=True, help="reattn-server binary")
    parser.add_argument("--mpirun", default="mpirun")
    parser.add_argument("--ranks", type=int, default=ranks)
    parser.add_argument("--backend", default="cpu", choices=["cpu", "cuda", "auto"])


class Service:
    """reattn-server under mpirun: started, waited for, stopped, always killed at the end."""

    def __init__(self, args, config_path, log_path, ranks=2, extra=(), api_key=None):
        self.args = args
        self.port = free_port()
        self.log_path = log_path
        self.api_key = api_key
        cmd = [args.mpirun, "-np", str(ranks), "--oversubscribe", args.server, "--config", config_path,
               "--listen", "127.0.0.1:%d" % self.port] + list(extra)
        self.log = open(log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=mpi_env(),
                                     start_new_session=True, preexec_fn=_die_with_parent)
        self.rank0_pid = None

    def client(self, **kw):
        kw.setdefault("api_key", self.api_key)
        return Client(self.port, **kw)

    def log_lines(self):
        with open(self.log_path, "rb") as f:
            text = f.read().decode(errors="replace")
        out = []
        for line in text.splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                out.append({"raw": line})
        return out

    def wait_ready(self, timeout=90):
        """Polls /health/ready; returns the statuses seen before 200."""
        seen = []
        deadline = time.time() + timeout
        c = Client(self.port, timeout=5)
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("server exited with %s during start-up; log: %s" % (self.proc.returncode, self.log_path))
            try:
                r = c.request("GET", "/health/ready")
                if r.status == 200:
                    break
                seen.append((r.status, r.body))
            except OSError:
                c.close()
            time.sleep(0.05)
        else:
            raise RuntimeError("server not ready after %ds; log: %s" % (timeout, self.log_path))
        c.close()
        for rec in self.log_lines():
            if rec.get("msg") == "listening" and rec.get("rank") == 0:
                self.rank0_pid = rec["pid"]
        return seen

    def terminate_rank0(self):
        os.kill(self.rank0_pid, signal.SIGTERM)

    def wait(self, timeout):
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self):
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=30)
        if self.rank0_pid:
            try:
                os.kill(self.rank0_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.log.close()


def reattn_run(args, config_path, extra, ranks=2):
    """The one-shot driver's JSON answer for the same data."""
    cmd = [args.mpirun, "-np", str(ranks), "--oversubscribe", args.run, "--config", config_path] + list(extra)
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=mpi_env(), timeout=120)
    if p.returncode != 0:
        raise RuntimeError("reattn-run failed (%d): %s" % (p.returncode, p.stderr.decode(errors="replace")))
    lines = [l for l in p.stdout.decode().splitlines() if l.startswith("{")]
    return json.loads(lines[-1])


def new_rng(seed):
    return random.Random(seed)


def run_suite(suite, steps, tmp, keep):
    """Runs `steps` (callables) of a test suite with `.c` (its checks: passed, failed, check) and
    `.services`; a crash is a failed check; every service is killed at the end. Prints the
    summary (and the services' last log lines on failure), removes `tmp` unless something
    failed or `keep`; returns the exit code."""
    t0 = time.time()
    try:
        for step in steps:
            step()
    except (Exception, SystemExit) as e:  # noqa: BLE001 - any crash of the test is a failure
        import traceback
        traceback.print_exc()
        suite.c.check(False, "test crashed: %r" % e)
    finally:
        for s in suite.services:
            s.kill()
    c = suite.c
    print("%d checks passed, %d failed in %.1fs (work dir %s)" % (c.passed, len(c.failed), time.time() - t0, tmp))
    if c.failed:
        for s in suite.services:
            print("---- last lines of %s" % s.log_path)
            with open(s.log_path, "rb") as f:
                print(b"\n".join(f.read().splitlines()[-15:]).decode(errors="replace"))
    elif not keep:
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    return 1 if c.failed else 0
