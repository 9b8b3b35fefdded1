"""For the model benchmarks (bench/model_e2e.py, bench/step_overhead.py): a reattn-server under
mpirun with a config derived from a base YAML (model and reattention sections overridden),
or an already running one named by --url."""

import os
import sys
import tempfile

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, "clients", "python"))
sys.path.insert(0, os.path.join(REPO, "tests", "http"))
sys.path.insert(0, os.path.join(REPO, "tests", "python"))

import service_client  # noqa: E402  (tests/http: mpirun start-up, kill on exit)
from harness import step_route_missing as _step_route_missing  # noqa: E402

from reattn_client import Client  # noqa: E402

SKIP_EXIT = 77


def add_service_args(p):
    p.add_argument("--url", help="an already running reattn-server (its config must match the model)")
    p.add_argument("--server", default=os.path.join(REPO, "build", "reattn-server"))
    p.add_argument("--mpirun", default="mpirun")
    p.add_argument("--ranks", type=int, default=1)
    p.add_argument("--backend", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--logs", default=None, help="folder for configs and server logs (default: a temporary one)")


def derived_config(base_path, model=None, reattention=None, backend=None):
    """The base YAML with the given keys of its model / reattention / backend sections replaced."""
    with open(base_path) as f:
        config = yaml.safe_load(f)
    for section, values in (("model", model), ("reattention", reattention), ("backend", backend)):
        if values:
            config.setdefault(section, {}).update(values)
    return config


class Service:
    """reattn-server under mpirun (or the --url one); client() gives a reattn_client.Client."""

    def __init__(self, args, name, config):
        self.svc = None
        if args.url:
            self.url = args.url
            return
        folder = args.logs or tempfile.mkdtemp(prefix="reattn-bench-")
        os.makedirs(folder, exist_ok=True)
        config_path = os.path.join(folder, name + ".yaml")
        config.setdefault("backend", {})["kind"] = args.backend
        with open(config_path, "w") as f:
            yaml.safe_dump(config, f, default_flow_style=None, sort_keys=False)
        # NVLink multicast stays off (it can take a shared host's GPUs out of service).
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
        # Ranks not pinned to one core each: rank 0's HTTP threads are part of what is measured.
        os.environ.setdefault("OMPI_MCA_hwloc_base_binding_policy", "none")
        self.svc = service_client.Service(args, config_path, os.path.join(folder, name + ".log"), ranks=args.ranks)
        try:
            self.svc.wait_ready(timeout=300)
        except Exception:
            self.svc.kill()
            raise
        self.url = "http://127.0.0.1:%d" % self.svc.port

    def client(self, **kw):
        return Client(self.url, **kw)

    def stop(self):
        if self.svc is not None:
            self.svc.kill()


def step_route_missing(client):
    """True when the server has no /step route yet (then the benchmarks exit 77)."""
    ctx = client.create_context()["id"]
    try:
        return _step_route_missing(client, ctx)
    finally:
        client.delete_context(ctx)


def percentile(values, p):
    s = sorted(values)
    if not s:
        return float("nan")
    i = min(len(s) - 1, max(0, int(round(p / 100.0 * (len(s) - 1)))))
    return s[i]
