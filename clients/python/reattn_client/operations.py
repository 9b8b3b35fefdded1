"""Waiting on a long-running operation (a bulk load, snapshot or restore): polls
GET /v1/operations/{op} until it finishes, showing progress when asked (a tqdm bar when tqdm
is importable, else a plain line every few seconds on stderr)."""

import sys
import time


class OperationError(Exception):
    """An operation that ended failed or cancelled; `operation` is its final record."""

    def __init__(self, operation):
        super().__init__("reattn: operation %s %s: %s" % (operation.get("id"), operation.get("state"),
                                                          operation.get("error")))
        self.operation = operation


FINISHED = ("succeeded", "failed", "cancelled")


class _Progress:
    """tqdm over tokens when available, else text lines at most every `every` seconds."""

    def __init__(self, op_id, every=2.0):
        self.op_id = op_id
        self.every = every
        self.last_line = 0.0
        self.bar = None
        try:
            from tqdm import tqdm  # optional dependency
        except ImportError:
            tqdm = None
        self.tqdm = tqdm

    def update(self, rec):
        total, done = rec.get("tokens_total") or 0, rec.get("tokens_done") or 0
        rate = "%.1f MB/s" % ((rec.get("bytes_per_s") or 0) / 1e6)
        if self.tqdm is not None:
            if self.bar is None:
                self.bar = self.tqdm(total=total, unit="tok", unit_scale=True, desc="%s %s" % (rec.get("kind"), self.op_id))
            self.bar.update(done - self.bar.n)
            self.bar.set_postfix_str("%s %s" % (rec.get("state"), rate), refresh=False)
            return
        now = time.monotonic()
        if now - self.last_line >= self.every or rec.get("state") in FINISHED:
            self.last_line = now
            pct = 100.0 * done / total if total else 0.0
            print("%s %s: %s %d/%d tokens (%.0f%%), %s" % (rec.get("kind"), self.op_id, rec.get("state"), done, total,
                                                           pct, rate), file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def wait(client, op_id, progress=False, timeout=None, interval=0.2):
    """Polls until the operation finishes; returns its final record when it succeeded, raises
    OperationError when it failed or was cancelled, and ReattnError(code "timeout") after
    `timeout` seconds (None: no limit)."""
    from .client import ReattnError
    deadline = None if timeout is None else time.monotonic() + timeout
    bar = _Progress(op_id) if progress else None
    try:
        while True:
            rec = client.operation(op_id)
            if bar:
                bar.update(rec)
            if rec.get("state") in FINISHED:
                if rec["state"] != "succeeded":
                    raise OperationError(rec)
                return rec
            if deadline is not None and time.monotonic() > deadline:
                raise ReattnError(0, "timeout", "operation %s still %s after %.0fs" % (op_id, rec.get("state"), timeout))
            time.sleep(interval)
    finally:
        if bar:
            bar.close()
