#!/usr/bin/env python3
"""Fault-injection tests of reattn-server (README "Reliability"): one scenario per run, each
bounded in time. The service runs under mpirun (2 or 3 ranks, CPU by default) with short
deadlines; the test kills, stops or starves a rank, or sends hostile input, and checks the
exact status every client gets, that readiness and liveness say the right thing, and that the
job ends non-zero within a bounded time (or, for hostile input, that it still answers and
nothing changed). Exits 0 when every check passed, 1 otherwise, 77 when skipped.
Python 3 standard library only.

    python3 tests/faults/test_faults.py worker_kill_load --server build/reattn-server \
        --config configs/tiny.yaml [--backend cuda --config tests/http/tiny_d64.yaml] [--keep]

Scenarios: see SCENARIOS at the end (CTest runs each as faults_<name>)."""

import argparse
import json
import os
import re
import resource
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "http"))
import service_client as sc  # noqa: E402
from test_service import Checks  # noqa: E402

SKIP = 77

# Deadlines the scenarios run with (seconds): short, so each scenario ends in seconds.
STEP_S = 2.0
OPERATION_S = 4.0
HEARTBEAT_S = 0.5
DRAIN_S = 8.0
# Rank 0 keeps answering this long after a fault before it ends the job (server_main.cpp).
FAULT_LINGER_S = 2.0
# Open MPI's mpirun, once a rank has died, waits this long before it signals the others, and
# as long again before it exits (README "Reliability": set it above the deadlines).
SIGKILL_TIMEOUT_S = 7


def error_of(r):
    """(code, message) of an error response, or (None, body excerpt)."""
    try:
        e = r.json()["error"]
        return e["code"], e["message"]
    except (ValueError, KeyError, TypeError):
        return None, r.body[:200]


def children_of(pid):
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % d) as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                out.append(int(d))
        except (OSError, IndexError, ValueError):
            pass
    return out


def alive(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def seconds_until_gone(pid, t0, timeout):
    """Seconds from t0 until process `pid` is gone, or None if it outlives `timeout`."""
    while time.time() - t0 < timeout:
        if not alive(pid):
            return time.time() - t0
        time.sleep(0.05)
    return None


def cpu_seconds(pid):
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mb(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return -1.0


class Fixture:
    def __init__(self, args):
        self.args = args
        self.tmp = tempfile.mkdtemp(prefix="reattn-faults-")
        self.c = Checks()
        self.services = []

    def config(self, name, server=None, capacity=None):
        srv = {"step_deadline_s": STEP_S, "operation_deadline_s": OPERATION_S, "heartbeat_s": HEARTBEAT_S,
               "drain_deadline_s": DRAIN_S, "queue_deadline_s": 20, "request_timeout_s": 10, "http_threads": 4}
        srv.update(server or {})
        cap = {"tokens_per_rank": 1000000, "max_contexts": 16}
        cap.update(capacity or {})
        with open(self.args.config) as f:
            keep = [l for l in f.read().splitlines() if l.startswith("model:") or l.startswith("reattention:")]

        def flow(d):
            return "{" + ", ".join("%s: %s" % (k, v) for k, v in d.items()) + "}"

        path = os.path.join(self.tmp, name + ".yaml")
        with open(path, "w") as f:
            f.write("\n".join(keep) + "\nbackend: {kind: %s}\ncapacity: %s\nserver: %s\n" %
                    (self.args.backend, flow(cap), flow(srv)))
        return path

    def start(self, name, ranks=2, server=None, extra=(), api_key=None, nofile=None):
        """The service under mpirun. Open MPI ends the job when a rank dies; its SIGTERM and
        SIGKILL to the others come only after odls_base_sigkill_timeout, so the service's own
        deadlines are what the test sees."""
        cfg = self.config(name, server)
        svc = Service(self.args, cfg, os.path.join(self.tmp, name + ".log"), ranks, extra, api_key, nofile)
        self.services.append(svc)
        return svc

    def finish(self):
        for s in self.services:
            s.kill()
        c = self.c
        print("%d checks passed, %d failed" % (c.passed, len(c.failed)), flush=True)
        if c.failed:
            for s in self.services:
                if os.path.exists(s.log_path):
                    print("---- last lines of %s" % s.log_path)
                    with open(s.log_path, "rb") as f:
                        print(b"\n".join(f.read().splitlines()[-25:]).decode(errors="replace"))
            return 1
        if not self.args.keep:
            shutil.rmtree(self.tmp, ignore_errors=True)
        return 0


class Service(sc.Service):
    def __init__(self, args, config_path, log_path, ranks, extra, api_key, nofile):
        self.args = args
        self.port = sc.free_port()
        self.log_path = log_path
        self.api_key = api_key
        cmd = [args.mpirun, "-np", str(ranks), "--oversubscribe", args.server, "--config", config_path,
               "--listen", "127.0.0.1:%d" % self.port] + list(extra)
        env = sc.mpi_env()
        env["OMPI_MCA_odls_base_sigkill_timeout"] = str(SIGKILL_TIMEOUT_S)
        self.log = open(log_path, "wb")

        def pre():
            sc._die_with_parent()
            if nofile:
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                     env=env, start_new_session=True, preexec_fn=pre)
        self.rank0_pid = None
        self.t_exit = None

    def ranks(self, world):
        """Pids of the ranks (children of mpirun), rank 0 first (it listens on the port)."""
        deadline = time.time() + 20
        while time.time() < deadline:
            pids = [p for p in children_of(self.proc.pid) if alive(p)]
            if len(pids) == world:
                break
            time.sleep(0.05)
        r0 = self.rank0_pid or self.find_rank0(pids)
        return [r0] + sorted(p for p in pids if p != r0)

    def find_rank0(self, pids):
        inode_re = re.compile(r"socket:\[(\d+)\]")
        listen_inodes = set()
        with open("/proc/net/tcp") as f:
            for line in f.readlines()[1:]:
                parts = line.split()
                if int(parts[1].split(":")[1], 16) == self.port and parts[3] == "0A":
                    listen_inodes.add(parts[9])
        for p in pids:
            try:
                for fd in os.listdir("/proc/%d/fd" % p):
                    m = inode_re.match(os.readlink("/proc/%d/fd/%s" % (p, fd)))
                    if m and m.group(1) in listen_inodes:
                        return p
            except OSError:
                pass
        raise RuntimeError("no rank listens on port %d" % self.port)

    def wait(self, timeout):
        rc = sc.Service.wait(self, timeout)
        if rc is not None and self.t_exit is None:
            self.t_exit = time.time()
        return rc

    def kill(self):
        for p in children_of(self.proc.pid):  # a stopped rank cannot die of SIGTERM
            try:
                os.kill(p, signal.SIGCONT)
            except OSError:
                pass
        sc.Service.kill(self)


# ---------------------------------------------------------------- helpers


def make_context(cl, tokens=2000, seed=5):
    r = cl.request("POST", "/v1/contexts")
    ctx = r.json()
    r = cl.request("POST", "/v1/contexts/%d/synthetic" % ctx["id"], body={"tokens": tokens, "seed": seed})
    if r.status != 200:
        raise RuntimeError("synthetic: %d %s" % (r.status, r.body[:200]))
    return ctx["id"]


def query_body():
    return {"layer": 0, "synthetic_q": {"seed": 7, "qlen": 4}}


class Load:
    """`n` clients sending queries back to back until stopped; records every outcome."""

    def __init__(self, svc, ctx, n, timeout):
        self.svc, self.ctx, self.timeout = svc, ctx, timeout
        self.stop = threading.Event()
        self.results = []  # (t_sent, t_answered, status or exception, body)
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.client) for _ in range(n)]
        for t in self.threads:
            t.start()

    def client(self):
        cl = self.svc.client(timeout=self.timeout)
        while not self.stop.is_set():
            t0 = time.time()
            try:
                r = cl.request("POST", "/v1/contexts/%d/query" % self.ctx, body=query_body())
                out = (t0, time.time(), r.status, r.body)
            except Exception as e:  # noqa: BLE001 - every outcome is recorded and judged
                out = (t0, time.time(), e, b"")
                cl.close()
                time.sleep(0.05)
            with self.lock:
                self.results.append(out)
            if isinstance(out[2], int) and out[2] == 503:
                time.sleep(0.05)

    def finish(self):
        self.stop.set()
        for t in self.threads:
            t.join(self.timeout + 5)


# Polls /health/live in a separate process (so the test's own threads do not delay it) until
# its stdin closes, then prints the slowest answer in seconds (99 for a failed one).
LIVE_PROBE = r"""
import http.client, sys, threading, time
port, pause = int(sys.argv[1]), float(sys.argv[2])
worst, count, done = 0.0, 0, threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
conn = None
while not done.is_set():
    t0 = time.time()
    try:
        conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", "/health/live")
        ok = conn.getresponse().read() and True
    except OSError:
        ok, conn = False, None
    worst = max(worst, time.time() - t0 if ok else 99.0)
    count += 1
    if count == 1:
        print("ready", flush=True)
    time.sleep(pause)
print(worst, count, flush=True)
"""


class LiveProbe:
    """/health/live polled from another process (started when its first answer came);
    stop() returns the slowest answer in seconds, and `count` the probes made."""

    def __init__(self, svc, pause=0.01):
        self.proc = subprocess.Popen([sys.executable, "-c", LIVE_PROBE, str(svc.port), str(pause)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.proc.stdout.readline()
        self.count = 0

    def stop(self):
        out, _ = self.proc.communicate("", timeout=30)
        try:
            worst, self.count = out.split()
            self.count = int(self.count)
            return float(worst)
        except ValueError:
            return 99.0


def check_job_fails(c, svc, t_fault, what):
    """The job exits non-zero within mpirun's two sigkill timeouts (plus slack) of the fault."""
    rc = svc.wait(2 * SIGKILL_TIMEOUT_S + 8)
    c.check(rc is not None and rc != 0, "%s: the job exits non-zero (rc %s, %.1f s after the fault)" %
            (what, rc, (svc.t_exit or time.time()) - t_fault))


def poll_ready_503(svc, want, timeout):
    """Polls /health/ready until a 503 whose message contains `want`; returns (time, message)
    or (None, last seen)."""
    probe = svc.client(api_key=None, timeout=2)
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        try:
            r = probe.request("GET", "/health/ready")
            code, msg = error_of(r)
            last = (r.status, msg)
            if r.status == 503 and want in str(msg):
                return time.time(), msg
        except OSError as e:
            last = repr(e)
            probe.close()
        time.sleep(0.02)
    return None, last


# ---------------------------------------------------------------- scenarios


def scenario_worker_kill(fx, under_load, signo=signal.SIGKILL, ranks=2):
    c = fx.c
    if fx.args.backend == "cuda":
        ranks = 2  # one rank per GPU
    what = "%s of rank 1 %s" % ("kill -9" if signo == signal.SIGKILL else "SIGSTOP", "under load" if under_load else "idle")
    svc = fx.start("worker_fault", ranks=ranks)
    svc.wait_ready()
    pids = svc.ranks(ranks)
    cl = svc.client()
    ctx = make_context(cl)
    r = cl.request("POST", "/v1/contexts/%d/query" % ctx, body=query_body())
    c.check(r.status == 200, "a query before the fault: %d" % r.status)
    load = Load(svc, ctx, 4, timeout=STEP_S * 4 + 10) if under_load else None
    if load:
        time.sleep(1.0)
    t_fault = time.time()
    os.kill(pids[1], signo)
    # A create sent while the rank is gone: answered, never run later.
    late = {}

    def late_create():
        try:
            late["r"] = svc.client(timeout=STEP_S * 4 + 10).request("POST", "/v1/contexts")
        except Exception as e:  # noqa: BLE001
            late["r"] = e
        late["t"] = time.time()

    tl = threading.Thread(target=late_create)
    if under_load:
        # The create is queued behind the work that meets the fault: a step's collective
        # (step deadline) or an operation's broadcast or agreement (operation deadline).
        tl.start()
        bound = max(STEP_S, OPERATION_S) + 1.5
    else:
        # Idle: only the heartbeat can find the fault; the create comes after.
        bound = HEARTBEAT_S + STEP_S + 1.5
    t_seen, msg = poll_ready_503(svc, "rank 1", bound + 2)
    if not under_load:
        tl.start()
    c.check(t_seen is not None, "%s: readiness 503 naming rank 1 (got %r)" % (what, msg))
    if t_seen:
        c.check(t_seen - t_fault <= bound, "%s: readiness 503 within %.1f s (took %.2f s): %s" %
                (what, bound, t_seen - t_fault, msg))
        live = svc.client(api_key=None, timeout=2)
        try:
            t0 = time.time()
            r = live.request("GET", "/health/live")
            c.check(r.status == 200 and time.time() - t0 < 0.5, "%s: liveness answers 200 after the fault" % what)
            r = live.request("GET", "/v1/contexts/%d" % ctx)
            code, m = error_of(r)
            c.check(r.status == 503 and code == "unavailable" and "rank 1" in m,
                    "%s: a new /v1 request gets 503 naming rank 1: %d %s" % (what, r.status, m))
        except OSError as e:
            c.check(False, "%s: liveness after the fault: %r" % (what, e))
    tl.join(STEP_S * 4 + 15)
    lr = late.get("r")
    code, m = error_of(lr) if isinstance(lr, sc.Response) else (None, repr(lr))
    c.check(isinstance(lr, sc.Response) and lr.status == 503 and code == "unavailable" and "rank 1" in m,
            "%s: a create sent after the fault gets 503 naming rank 1: %s %s" %
            (what, getattr(lr, "status", lr), m))
    if load:
        load.finish()
        after = [x for x in load.results if x[1] >= t_fault]
        # Once rank 0 has lingered and stops, a new connection may be refused: only requests
        # sent before that must have an HTTP answer.
        t_closing = (t_seen or t_fault) + FAULT_LINGER_S - 0.2

        def acceptable(x):
            if x[2] == 200:
                return True
            if x[2] == 503:
                return "rank 1" in str(error_of(sc.Response(503, [], x[3]))[1])
            return not isinstance(x[2], int) and x[0] >= t_closing

        bad = [x for x in after if not acceptable(x)]
        answered_503 = [x for x in after if x[2] == 503]
        c.check(len(answered_503) >= 1, "%s: requests in flight got 503 (%d of %d after the fault)" %
                (what, len(answered_503), len(after)))
        c.check(not bad, "%s: every request in flight or queued got 200 or 503 naming rank 1 (bad: %s)" %
                (what, [(round(x[0] - t_fault, 2), x[2] if isinstance(x[2], int) else repr(x[2]), x[3][:120])
                        for x in bad[:5]]))
        slow = [x for x in after if isinstance(x[2], int) and x[1] - max(x[0], t_fault) > bound + 0.5]
        c.check(not slow, "%s: every answer came within %.1f s of the fault" % (what, bound + 0.5))
    check_job_fails(c, svc, t_fault, what)
    if signo == signal.SIGSTOP:
        # (After a rank dies, Open MPI's mpirun no longer forwards the others' output.)
        lines = svc.log_lines()
        fault = [l for l in lines if l.get("msg") == "fault in the step loop" and l.get("rank") == 0]
        c.check(bool(fault) and "rank 1" in fault[0].get("error", ""),
                "%s: rank 0 logged the fault naming rank 1: %s" % (what, fault[0].get("error") if fault else None))
    time.sleep(0.2)
    c.check(not any(alive(p) for p in pids), "%s: every rank is gone" % what)


def scenario_rank0_kill(fx):
    c = fx.c
    svc = fx.start("rank0_kill", ranks=3)
    svc.wait_ready()
    pids = svc.ranks(3)
    t0 = time.time()
    os.kill(pids[0], signal.SIGKILL)
    rc = svc.wait(30)
    c.check(rc is not None and rc != 0, "kill -9 of rank 0: the job exits non-zero (rc %s) in %.1f s" %
            (rc, time.time() - t0))
    time.sleep(0.2)
    c.check(not any(alive(p) for p in pids[1:]), "kill -9 of rank 0: no worker rank outlives it")


def scenario_rank0_stop(fx):
    """Rank 0 hangs (SIGSTOP): the workers hear no operation or heartbeat and end the job."""
    c = fx.c
    svc = fx.start("rank0_stop")
    svc.wait_ready()
    pids = svc.ranks(2)
    t0 = time.time()
    os.kill(pids[0], signal.SIGSTOP)
    # A worker's idle limit: 2 x (heartbeat + step deadline) + 3 s (comm/deadline.h).
    limit = 2 * (HEARTBEAT_S + STEP_S) + 3
    t_worker = seconds_until_gone(pids[1], t0, limit + 5)
    c.check(t_worker is not None and t_worker <= limit + 3,
            "SIGSTOP of rank 0: the worker ended %s s after it (idle limit %.1f s)" %
            ("%.1f" % t_worker if t_worker else "not", limit))
    check_job_fails(c, svc, t0, "SIGSTOP of rank 0")
    why = [l for l in svc.log_lines() if l.get("rank") == 1 and l.get("level") == "error"]
    c.check(any("rank 0" in l.get("error", "") for l in why),
            "SIGSTOP of rank 0: the worker logged that rank 0 went silent: %s" % [l.get("error") for l in why])


def scenario_drain_hung_worker(fx):
    c = fx.c
    # Heartbeats rarer than the drain: the drain itself must find the hung rank.
    svc = fx.start("drain_hung", server={"heartbeat_s": 60})
    svc.wait_ready()
    pids = svc.ranks(2)
    cl = svc.client()
    ctx = make_context(cl)
    os.kill(pids[1], signal.SIGSTOP)
    t0 = time.time()
    os.kill(pids[0], signal.SIGTERM)
    probe = svc.client(api_key=None, timeout=2)
    time.sleep(0.2)
    try:
        r = probe.request("GET", "/health/ready")
        c.check(r.status == 503, "SIGTERM with a hung worker: readiness 503 while draining: %d" % r.status)
        r = probe.request("GET", "/health/live")
        c.check(r.status == 200, "SIGTERM with a hung worker: liveness 200 while draining")
        r = svc.client(timeout=5).request("POST", "/v1/contexts/%d/query" % ctx, body=query_body())
        c.check(r.status == 503, "SIGTERM with a hung worker: new work gets 503: %d" % r.status)
    except OSError as e:
        c.check(False, "SIGTERM with a hung worker: the listener answers while draining: %r" % e)
    # Rank 0 ends the job within the drain deadline; mpirun then takes up to two of its
    # sigkill timeouts to end a rank that ignores SIGTERM (README "Reliability").
    t_rank0 = seconds_until_gone(pids[0], t0, DRAIN_S + 5)
    c.check(t_rank0 is not None and t_rank0 <= DRAIN_S + 1,
            "SIGTERM with a hung worker: rank 0 ended %s s after SIGTERM (drain deadline %.0f s)" %
            ("%.1f" % t_rank0 if t_rank0 else "not", DRAIN_S))
    check_job_fails(c, svc, t0, "SIGTERM with a hung worker")
    lines = svc.log_lines()
    why = [l for l in lines if l.get("rank") == 0 and l.get("level") == "error"]
    c.check(any("rank 1" in json.dumps(l) or "drain deadline" in l.get("msg", "") for l in why),
            "SIGTERM with a hung worker: rank 0 logged why it ended: %s" % [l.get("msg") for l in why])


def scenario_stderr_unread(fx):
    """Nobody reads the ranks' stderr (mpirun stopped, as after a rank died): logging must
    not block serving."""
    c = fx.c
    svc = fx.start("stderr_unread")
    svc.wait_ready()
    # mpirun forwards the ranks' output; stopped, it reads none of it and the pipes fill.
    os.kill(svc.proc.pid, signal.SIGSTOP)
    try:
        n = 12000  # more lines than the log queue holds (8192)
        probe = LiveProbe(svc, pause=0.02)
        answered = [0]

        def sender(k):
            cl = svc.client(timeout=10)
            for i in range(n // 4):
                try:
                    if cl.request("GET", "/v1/contexts/%d" % (1000 + i)).status == 404:
                        answered[0] += 1
                except OSError:
                    cl.close()

        ts = [threading.Thread(target=sender, args=(k,)) for k in range(4)]
        t0 = time.time()
        for t in ts:
            t.start()
        for t in ts:
            t.join(120)
        took = time.time() - t0
        worst = probe.stop()
        c.check(answered[0] == n, "stderr unread: all %d logged requests answered (%d) in %.1f s" %
                (n, answered[0], took))
        c.check(worst < 1.0, "stderr unread: /health/live answered throughout, slowest %.0f ms" % (worst * 1e3))
        m = svc.client(api_key=None, timeout=5).request("GET", "/metrics").body.decode()
        dropped = re.search(r"^reattn_log_lines_dropped_total (\d+)", m, re.M)
        c.check(dropped is not None and int(dropped.group(1)) > 0,
                "stderr unread: dropped lines are counted: %s" % (dropped.group(0) if dropped else None))
    finally:
        os.kill(svc.proc.pid, signal.SIGCONT)


# ---------------------------------------------------------------- hostile input

API_KEY = "faults-key-5c1d"


def raw_request(port, head, body=b"", timeout=10):
    """Sends `head` (the request line and headers, CRLF-separated, without the blank line)
    and `body` on a new connection; returns (status, body bytes)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(head.encode() + b"\r\n\r\n" + body)
        data = b""
        while True:
            try:
                chunk = s.recv(65536)
            except (ConnectionResetError, socket.timeout):
                break
            if not chunk:
                break
            data += chunk
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else None
    return status, data.split(b"\r\n\r\n", 1)[1] if b"\r\n\r\n" in data else b""


def state_of(cl, ctx):
    """What a bad request must not change: the context table and one query's answer."""
    contexts = cl.request("GET", "/v1/contexts").json()
    r = cl.request("POST", "/v1/contexts/%d/query" % ctx, body=query_body())
    return json.dumps(contexts, sort_keys=True), r.status, answer_of(r.body)


def answer_of(body):
    """A query answer without its timing."""
    try:
        d = json.loads(body)
    except ValueError:
        return body
    d.pop("timing", None)
    return json.dumps(d, sort_keys=True)


def request_series(metrics_text):
    return [l for l in metrics_text.splitlines() if l.startswith("reattn_http_requests_total{")]


def start_hostile(fx, name, server=None, nofile=None):
    key_file = os.path.join(fx.tmp, "api_key")
    with open(key_file, "w") as f:
        f.write(API_KEY + "\n")
    svc = fx.start(name, extra=["--api-key-file", key_file], api_key=API_KEY, server=server, nofile=nofile)
    svc.wait_ready()
    return svc


def scenario_hostile_inputs(fx):
    c = fx.c
    svc = start_hostile(fx, "hostile")
    cl = svc.client()
    ctx = make_context(cl)
    before = state_of(cl, ctx)
    c.check(before[1] == 200, "hostile: the good query answers 200")
    port = svc.port
    auth = "Authorization: Bearer " + API_KEY
    qpath = "/v1/contexts/%d/query" % ctx
    kvpath = "/v1/contexts/%d/kv" % ctx
    synpath = "/v1/contexts/%d/synthetic" % ctx
    info = cl.request("GET", "/v1/info").json()
    L, G, D = info["model"]["layers"], info["model"]["kv_heads"], info["model"]["head_dim"]

    def kv_tensor(name, dtype, tokens=2):
        n = L * G * tokens * D
        return (name, dtype, [L, G, tokens, D], sc.pack_values(dtype, [0.25] * n))

    good_json = json.dumps(query_body())
    cases = [
        # (what, method, path, headers, body, status, code, words in the message)
        ("create as text/plain", "POST", "/v1/contexts", {"Content-Type": "text/plain"}, "{}", 415,
         "unsupported_media_type", "application/json"),
        ("create as a form", "POST", "/v1/contexts", {"Content-Type": "application/x-www-form-urlencoded"}, "a=1",
         415, "unsupported_media_type", "application/json"),
        ("synthetic as multipart", "POST", synpath, {"Content-Type": "multipart/form-data; boundary=zz"},
         '{"tokens": 8}', 415, "unsupported_media_type", "application/json"),
        ("query as text/plain", "POST", qpath, {"Content-Type": "text/plain;charset=UTF-8"}, good_json, 415,
         "unsupported_media_type", "application/json or application/octet-stream"),
        ("kv as application/json", "POST", kvpath, {"Content-Type": "application/json"},
         sc.safetensors_bytes([kv_tensor("k", "F32"), kv_tensor("v", "F32")]), 415, "unsupported_media_type",
         "application/octet-stream"),
        ("kv with k F32 and v BF16", "POST", kvpath, {"Content-Type": "application/octet-stream"},
         sc.safetensors_bytes([kv_tensor("k", "F32"), kv_tensor("v", "BF16")]), 400, "invalid_argument",
         "differ in dtype"),
        ("kv with an extra tensor", "POST", kvpath, {"Content-Type": "application/octet-stream"},
         sc.safetensors_bytes([kv_tensor("k", "F32"), kv_tensor("v", "F32"), kv_tensor("extra", "F32")]), 400,
         "invalid_argument", "unexpected tensor 'extra'"),
        ("kv with trailing bytes", "POST", kvpath, {"Content-Type": "application/octet-stream"},
         sc.safetensors_bytes([kv_tensor("k", "F32"), kv_tensor("v", "F32")]) + b"\0" * 16, 400,
         "invalid_argument", "16 trailing bytes"),
        ("context id with a leading zero", "GET", "/v1/contexts/0%d" % ctx, {}, None, 404, "not_found", "not found"),
        ("context id with a sign", "POST", "/v1/contexts/+%d/query" % ctx, {"Content-Type": "application/json"},
         good_json, 404, "not_found", "not found"),
        ("a 60 KB context id", "GET", "/v1/contexts/" + "1" * 60000, {}, None, 404, "not_found", "not found"),
        ("a 10 MB unknown key", "POST", synpath, {"Content-Type": "application/json"},
         '{"tokens": 8, "%s": 1}' % ("k" * (10 << 20)), 400, "invalid_argument", "unknown"),
        ("a query body deeper than a query", "POST", qpath, {"Content-Type": "application/json"},
         '{"layer": 0, "q": ' + "[" * 40 + "]" * 40 + "}", 400, "invalid_argument", "nested deeper"),
    ]
    for what, method, path, headers, body, status, code, words in cases:
        r = cl.request(method, path, body=body, headers=headers)
        got_code, msg = error_of(r)
        c.check(r.status == status and got_code == code and words in str(msg),
                "%s: want %d %s naming '%s', got %d %s" % (what, status, code, words, r.status, r.body[:200]))
        c.check(len(r.body) < 2048, "%s: the error body is short (%d bytes)" % (what, len(r.body)))
    # Transfer and content codings, on raw connections (http.client would set its own).
    body = b'{"layer": 0, "synthetic_q": {"seed": 7, "qlen": 4}}'
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    for what, extra, payload, status in [
        ("Transfer-Encoding: gzip, chunked", "Transfer-Encoding: gzip, chunked", chunked, 501),
        ("Transfer-Encoding: gzip", "Transfer-Encoding: gzip", body, 501),
        ("Content-Encoding: gzip", "Content-Encoding: gzip\r\nContent-Length: %d" % len(body), body, 415),
        ("Transfer-Encoding: chunked (accepted)", "Transfer-Encoding: chunked", chunked, 200),
    ]:
        st, rb = raw_request(port, "POST %s HTTP/1.1\r\nHost: x\r\n%s\r\nContent-Type: application/json\r\n%s\r\n"
                             "Connection: close" % (qpath, auth, extra), payload)
        c.check(st == status, "%s: want %d, got %s %s" % (what, status, st, rb[:160]))
        if status == 200 and st == 200:
            c.check(answer_of(rb) == before[2], "%s: the same answer as before" % what)
    # Metrics cardinality: bogus methods on known and unknown paths, and 401s.
    m0 = svc.client(api_key=None).request("GET", "/metrics").body.decode()
    n_bogus = 2000
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        f = s.makefile("rb")
        for i in range(n_bogus):
            path = "/v1/contexts" if i % 2 else "/nowhere-%d" % i
            s.sendall(("M%dX %s HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n" % (i, path)).encode())
            line = f.readline()
            length = 0
            while True:
                h = f.readline()
                if h in (b"\r\n", b""):
                    break
                if h.lower().startswith(b"content-length:"):
                    length = int(h.split(b":")[1])
            f.read(length)
            if not line.startswith(b"HTTP/1.1 40"):
                c.check(False, "bogus method %d: answered %r" % (i, line))
                break
    for i in range(50):
        svc.client(api_key=None).request("GET", "/v1/contexts/%d" % i)  # 401
    m1 = svc.client(api_key=None).request("GET", "/metrics").body.decode()
    s0, s1 = request_series(m0), request_series(m1)
    c.check(len(s1) - len(s0) <= 4, "metrics: %d bogus methods and 50 401s added %d series (at most 4)" %
            (n_bogus, len(s1) - len(s0)))
    c.check(len(m1) < 2 * len(m0), "metrics: the page stays small (%d -> %d bytes)" % (len(m0), len(m1)))
    c.check('method="other"' in m1, "metrics: unknown methods count as method=\"other\"")
    # The log line of the 60 KB id is capped too.
    long_lines = [l for l in svc.log_lines() if len(json.dumps(l)) > 4096]
    c.check(not long_lines, "logs: no line over 4 KB (%d)" % len(long_lines))
    after = state_of(cl, ctx)
    c.check(after == before, "hostile input changed nothing (contexts and the good query's answer)")
    c.check(cl.request("GET", "/health/ready").status == 200, "hostile input: still ready")


def scenario_hostile_memory(fx):
    """Two 60 MB JSON query bodies at once: refused before a DOM is built, with bounded memory,
    while /health/live keeps answering."""
    c = fx.c
    svc = start_hostile(fx, "hostile_memory")
    cl = svc.client()
    ctx = make_context(cl)
    before = state_of(cl, ctx)
    pid = svc.ranks(2)[0]
    rss0 = peak_rss_mb(pid)
    body = b'{"layer": 0, "q": [' + b"0," * (30 << 20) + b"0]}"
    results = [None] * 2

    def send(k):
        try:
            results[k] = svc.client(timeout=60).request("POST", "/v1/contexts/%d/query" % ctx, body=body,
                                                        content_type="application/json")
        except Exception as e:  # noqa: BLE001
            results[k] = e

    probe = LiveProbe(svc)
    ts = [threading.Thread(target=send, args=(k,)) for k in range(2)]
    t0 = time.time()
    for t in ts:
        t.start()
    for t in ts:
        t.join(90)
    took = time.time() - t0
    # The bodies are refused within a fraction of a second: keep probing for a second in all,
    # so the probe count does not depend on how fast this machine refused them.
    time.sleep(max(0.0, 1.0 - took))
    worst = probe.stop()
    for k, r in enumerate(results):
        code, msg = error_of(r) if isinstance(r, sc.Response) else (None, repr(r))
        c.check(isinstance(r, sc.Response) and r.status == 400 and "JSON values" in str(msg),
                "60 MB JSON body %d: 400 naming the value budget: %s %s" % (k, getattr(r, "status", r), msg))
    rss1 = peak_rss_mb(pid)
    c.check(rss1 - rss0 < 600, "60 MB JSON bodies x2: rank 0 peak memory grew %.0f MB (%.0f -> %.0f; under 600)" %
            (rss1 - rss0, rss0, rss1))
    c.check(worst < 0.1 and probe.count >= 5, "60 MB JSON bodies: /health/live answered within 100 ms "
            "throughout (%d probes, slowest %.1f ms)" % (probe.count, worst * 1e3))
    print("60 MB x2 refused in %.1f s; peak RSS %.0f -> %.0f MB; slowest of %d liveness probes %.1f ms" %
          (took, rss0, rss1, probe.count, worst * 1e3), flush=True)
    c.check(state_of(cl, ctx) == before, "60 MB JSON bodies changed nothing")


def scenario_connection_flood(fx):
    c = fx.c
    # A connection cap below the descriptor limit: one more connection gets 503.
    svc = start_hostile(fx, "flood_cap", server={"max_connections": 32})
    held = []
    for _ in range(40):
        try:
            held.append(socket.create_connection(("127.0.0.1", svc.port), timeout=5))
        except OSError:
            break
    time.sleep(0.3)
    refused = select.select(held, [], [], 0)[0]
    c.check(len(held) - len(refused) <= 32 and len(refused) >= 6,
            "connection cap: %d of %d connections held, %d refused (cap 32; connections of the start-up "
            "probes may still be closing)" % (len(held) - len(refused), len(held), len(refused)))
    st = rb = None
    for _ in range(3):  # a start-up probe's connection closing late can free one slot
        st, rb = raw_request(svc.port, "GET /health/live HTTP/1.1\r\nHost: x\r\nConnection: close")
        if st == 503:
            break
    c.check(st == 503 and b"max_connections" in rb, "connection cap: one more connection gets 503 naming "
            "server.max_connections: %s %s" % (st, rb[:120]))
    for s in held:
        s.close()
    time.sleep(0.3)
    st, _ = raw_request(svc.port, "GET /health/live HTTP/1.1\r\nHost: x\r\nConnection: close")
    c.check(st == 200, "connection cap: liveness answers once the flood is gone: %s" % st)
    svc.kill()

    # Out of descriptors (EMFILE): the accept loop backs off instead of spinning.
    svc = start_hostile(fx, "flood_emfile", server={"max_connections": 100000}, nofile=256)
    pid = svc.ranks(2)[0]
    held = []
    for _ in range(400):
        try:
            held.append(socket.create_connection(("127.0.0.1", svc.port), timeout=5))
        except OSError:
            break
    time.sleep(0.5)
    cpu0, t0 = cpu_seconds(pid), time.time()
    time.sleep(2.0)
    busy = (cpu_seconds(pid) - cpu0) / (time.time() - t0)
    c.check(busy < 0.3, "EMFILE: rank 0 uses %.0f%% of a core while out of descriptors (under 30%%)" % (busy * 100))
    for s in held:
        s.close()
    deadline = time.time() + 5
    st = None
    while time.time() < deadline:
        try:
            st, _ = raw_request(svc.port, "GET /health/live HTTP/1.1\r\nHost: x\r\nConnection: close", timeout=2)
            if st == 200:
                break
        except OSError:
            pass
        time.sleep(0.1)
    c.check(st == 200, "EMFILE: liveness answers within 5 s once descriptors are free: %s" % st)
    cl = svc.client()
    c.check(cl.request("GET", "/v1/contexts").status == 200, "EMFILE: the API answers again")


def scenario_dropped_requests(fx):
    """A request whose client has gone, or that waited past server.queue_deadline_s, is answered
    503 and never run. Rank 1 is stopped for a moment (shorter than every deadline) so requests
    queue up behind a create that is in flight."""
    c = fx.c
    svc = fx.start("dropped", server={"queue_deadline_s": 0.5})
    svc.wait_ready()
    pids = svc.ranks(2)
    cl = svc.client()
    n0 = len(cl.request("GET", "/v1/contexts").json()["contexts"])
    out = {}

    def create(key):
        try:
            out[key] = svc.client(timeout=20).request("POST", "/v1/contexts")
        except Exception as e:  # noqa: BLE001
            out[key] = e

    os.kill(pids[1], signal.SIGSTOP)
    try:
        blocker = threading.Thread(target=create, args=("in_flight",))
        blocker.start()
        time.sleep(0.2)  # the step loop has taken it and waits for rank 1
        # A client that sends a create and leaves at once.
        with socket.create_connection(("127.0.0.1", svc.port), timeout=5) as s:
            s.sendall(b"POST /v1/contexts HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        waiting = threading.Thread(target=create, args=("queued",))
        waiting.start()
        time.sleep(0.8)
    finally:
        os.kill(pids[1], signal.SIGCONT)
    blocker.join(20)
    waiting.join(20)
    r = out.get("in_flight")
    c.check(isinstance(r, sc.Response) and r.status == 201, "the create in flight while rank 1 paused completes: %s" %
            getattr(r, "status", r))
    r = out.get("queued")
    code, msg = error_of(r) if isinstance(r, sc.Response) else (None, repr(r))
    c.check(isinstance(r, sc.Response) and r.status == 503 and "queue_deadline_s" in str(msg),
            "a create queued past server.queue_deadline_s gets 503 naming it: %s %s" % (getattr(r, "status", r), msg))
    time.sleep(0.3)
    n1 = len(cl.request("GET", "/v1/contexts").json()["contexts"])
    c.check(n1 == n0 + 1, "only the create in flight ran: %d contexts before, %d after (want %d)" % (n0, n1, n0 + 1))
    dropped = [l for l in svc.log_lines() if l.get("msg") == "request dropped"]
    c.check(any(l.get("client_gone") for l in dropped), "the create whose client left was dropped: %s" % dropped)
    c.check(cl.request("GET", "/health/ready").status == 200, "still ready after the pause")


SCENARIOS = {
    "worker_kill_idle": lambda fx: scenario_worker_kill(fx, under_load=False),
    "worker_kill_load": lambda fx: scenario_worker_kill(fx, under_load=True, ranks=3),
    "worker_stop_load": lambda fx: scenario_worker_kill(fx, under_load=True, signo=signal.SIGSTOP),
    "rank0_kill": scenario_rank0_kill,
    "rank0_stop": scenario_rank0_stop,
    "drain_hung_worker": scenario_drain_hung_worker,
    "stderr_unread": scenario_stderr_unread,
    "hostile_inputs": scenario_hostile_inputs,
    "hostile_memory": scenario_hostile_memory,
    "connection_flood": scenario_connection_flood,
    "dropped_requests": scenario_dropped_requests,
}


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("scenario", choices=sorted(SCENARIOS))
    p.add_argument("--server", required=True, help="reattn-server binary")
    p.add_argument("--mpirun", default="mpirun")
    p.add_argument("--config", required=True, help="a config whose model and reattention sections are used")
    p.add_argument("--backend", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--keep", action="store_true", help="keep the work directory (configs, logs)")
    args = p.parse_args()
    if args.backend == "cuda":
        gpus = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True) if shutil.which("nvidia-smi") else None
        if gpus is None or gpus.returncode != 0 or gpus.stdout.count("GPU ") < 2:
            print("skipped: the cuda backend scenarios need 2 GPUs")
            return SKIP

    def stop(signo, frame):
        raise SystemExit("test stopped by signal %d" % signo)

    signal.signal(signal.SIGTERM, stop)
    fx = Fixture(args)
    t0 = time.time()
    try:
        SCENARIOS[args.scenario](fx)
    except (Exception, SystemExit) as e:  # noqa: BLE001 - a crash of the test is a failure
        import traceback
        traceback.print_exc()
        fx.c.check(False, "test crashed: %r" % e)
    rc = fx.finish()
    print("%s: %.1f s" % (args.scenario, time.time() - t0))
    return rc


if __name__ == "__main__":
    sys.exit(main())
