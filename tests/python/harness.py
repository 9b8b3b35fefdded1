"""Shared by the Python client tests: command-line options, a reattn-server under mpirun on
the CPU with a config written by the test, the step-route probe, and a unittest runner whose
exit code tells CTest about skips (1 on any failure, else 77 when anything skipped)."""

import argparse
import os
import sys
import tempfile
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(REPO, "clients", "python"))
sys.path.insert(0, os.path.join(REPO, "tests", "http"))

import service_client  # noqa: E402  (tests/http: mpirun start-up, kill on exit)

from reattn_client import Client, ReattnError  # noqa: E402

SKIP_EXIT = 77
ARGS = None  # the parsed options, set by main()
TMP = None   # the run's TempDir, set by main()

# The tiny model of configs/tiny.yaml (2 layers, 4 query / 2 KV heads, head_dim 16).
TINY_MODEL = {"layers": 2, "q_heads": 4, "kv_heads": 2, "head_dim": 16, "rope_theta": 10000, "scope": 1024}


def options(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--server", required=True, help="build/reattn-server")
    p.add_argument("--mpirun", default="mpirun")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--keep", action="store_true", help="keep the temporary folder with configs and logs")
    args, rest = p.parse_known_args(argv)
    return args, rest


def flow(d):
    """A dict as a one-line YAML flow mapping."""
    return "{" + ", ".join("%s: %s" % (k, v) for k, v in d.items()) + "}"


def write_config(path, reattention, model=None, server=None):
    """A CPU config (the CPU backend stores K/V in f32) with the given reattention section."""
    text = "model: %s\nreattention: %s\nbackend: {kind: cpu}\ncapacity: {tokens_per_rank: 1048576, max_contexts: 64}\n" % (
        flow(model or TINY_MODEL), flow(reattention))
    if server:
        text += "server: %s\n" % flow(server)
    with open(path, "w") as f:
        f.write(text)
    return path


class Server:
    """reattn-server under mpirun with a config; `client()` gives a reattn_client.Client."""

    def __init__(self, args, tmp, name, reattention, model=None, server=None, extra=(), api_key=None):
        config = write_config(os.path.join(tmp, name + ".yaml"), reattention, model, server)
        self.svc = service_client.Service(args, config, os.path.join(tmp, name + ".log"), ranks=args.ranks,
                                          extra=list(extra), api_key=api_key)
        try:
            self.svc.wait_ready()
        except Exception:
            self.svc.kill()
            raise
        self.url = "http://127.0.0.1:%d" % self.svc.port
        self.log_path = self.svc.log_path

    def client(self, **kw):
        return Client(self.url, **kw)

    def stop(self):
        self.svc.kill()


def step_route_missing(client, context_id):
    """True when the server has no /step route yet (a 404 for a context that exists).
    Sends a malformed step (an empty JSON object), which a server with the route rejects with
    400 and without appending anything."""
    try:
        client.request("POST", "/v1/contexts/%d/step?layer=0" % context_id, body=b"{}")
    except ReattnError as e:
        return e.status == 404 and "no route" in e.message
    return False


def step_server(name, reattention):
    """A Server (and its client) for tests of the per-layer step; unittest.SkipTest while the
    server has no /step route."""
    server = Server(ARGS, TMP.path, name, reattention)
    client = server.client()
    probe = client.create_context()["id"]
    missing = step_route_missing(client, probe)
    client.delete_context(probe)
    if missing:
        client.close()
        server.stop()
        raise unittest.SkipTest("reattn-server has no POST /v1/contexts/{id}/step route yet (404 'no route'); "
                                "these tests run once the per-layer step lands")
    return server, client


class TempDir:
    def __init__(self, keep):
        self.keep = keep
        self.path = tempfile.mkdtemp(prefix="reattn-pytest-")

    def cleanup(self):
        if self.keep:
            print("kept %s" % self.path, flush=True)
            return
        import shutil
        shutil.rmtree(self.path, ignore_errors=True)


def main(test_classes):
    """Parses the options, runs the TestCase classes in a temporary folder; returns the exit code."""
    global ARGS, TMP
    ARGS, _ = options()
    TMP = TempDir(ARGS.keep)
    try:
        return run(test_classes)
    finally:
        TMP.cleanup()


def run(test_classes):
    """Runs the TestCase classes; returns the process exit code."""
    suite = unittest.TestSuite()
    loader = unittest.TestLoader()
    for cls in test_classes:
        suite.addTests(loader.loadTestsFromTestCase(cls))
    result = unittest.TextTestRunner(verbosity=2, stream=sys.stdout).run(suite)
    if result.failures or result.errors or result.unexpectedSuccesses:
        return 1
    # A class skipped in setUpClass counts as one skip and runs no test.
    skipped = len(result.skipped)
    passed = max(result.testsRun - sum(1 for t, _ in result.skipped if isinstance(t, unittest.TestCase)), 0)
    print("%d passed, 0 failed, %d skipped" % (passed, skipped), flush=True)
    # Any skip shows as a skipped CTest (SKIP_RETURN_CODE), so a missing route or package is seen.
    return SKIP_EXIT if skipped else 0
