#!/usr/bin/env python3
"""Snapshots and restore end to end: reattn-server under mpirun on the CPU.

1. 2 ranks: two contexts (synthetic with needles; an uploaded K/V body), their answers to a set
   of queries (tail and detached, several layers and lengths); snapshots of both; a restore on
   the same ranks answers identically. Bad input: names with path characters, unknown
   snapshots and contexts, an existing name, a snapshot of another model / chunk size, a
   truncated, corrupt or missing file: each a clear 4xx naming the problem, nothing changed.
2. kill -9 of the whole job; a stale temporary directory and an incomplete snapshot are left
   behind; a restart with --restore on 3 ranks brings both contexts back under their ids and
   they answer identically; the stale directory is gone, the incomplete one never listed.
3. --restore on 1 rank with span recall answers as a fresh 2-rank span service holding the same
   tokens.
4. Disk full: a server whose file-size limit (ulimit -f) is below a rank's file fails the
   snapshot with 507 naming the file, leaves no snapshot and no temporary directory, the
   context unchanged; a small snapshot then succeeds.
Exits non-zero on any failed check."""

import argparse
import json
import os
import random
import resource
import shutil
import signal
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import service_client as sc  # noqa: E402
from test_service import Checks, make_config, max_abs_diff  # noqa: E402

QUERIES = [(layer, mode, qlen, seed) for layer in (0, 1) for mode, qlen in (("tail", 1), ("tail", 4), ("detached", 3))
           for seed in (11,)]


def answers(cl, ctx):
    """Every query of QUERIES against context `ctx`: [(layer, mode, qlen, answer JSON)]."""
    out = []
    for layer, mode, qlen, seed in QUERIES:
        r = cl.request("POST", "/v1/contexts/%d/query" % ctx,
                       {"layer": layer, "mode": mode, "synthetic_q": {"seed": seed + layer, "qlen": qlen}})
        if r.status != 200:
            raise RuntimeError("query of context %d failed: %d %s" % (ctx, r.status, r.body[:300]))
        out.append(r.json())
    return out


FINISHED = ("succeeded", "failed", "cancelled")


def wait_operation(cl, r, timeout=120):
    """r: a 202 answer naming an operation; polls it until it finishes; its last record."""
    op = r.json()["operation"]
    deadline = time.time() + timeout
    while time.time() < deadline:
        rec = cl.request("GET", "/v1/operations/%s" % op).json()
        if rec["state"] in FINISHED:
            return rec
        time.sleep(0.01)
    raise RuntimeError("operation %s not finished after %ds" % (op, timeout))


def same_answers(got, want, tol=1e-5):
    """(ok, why): the same recalled chunks and spans, out within tol."""
    if len(got) != len(want):
        return False, "%d answers, want %d" % (len(got), len(want))
    for i, (g, w) in enumerate(zip(got, want)):
        for key in ("recalled_chunks", "recalled_spans", "tokens"):
            if g.get(key) != w.get(key):
                return False, "query %d: %s %s, want %s" % (i, key, str(g.get(key))[:200], str(w.get(key))[:200])
        d = max_abs_diff(g["out"], w["out"])
        if d > tol:
            return False, "query %d: out differs by %g" % (i, d)
    return True, ""


class Suite:
    def __init__(self, args, tmp):
        self.args = args
        self.tmp = tmp
        self.c = Checks()
        self.services = []
        self.snapdir = os.path.join(tmp, "snapshots")
        self.kv = None

    def path(self, name):
        return os.path.join(self.tmp, name)

    def config(self, name, recall="chunk", snapdir=None, layers=None):
        path = make_config(self.args.config, self.path(name + ".yaml"),
                           {"tokens_per_rank": 400000, "max_contexts": 16},
                           {"request_timeout_s": 30, "snapshot_dir": snapdir or self.snapdir})
        with open(path) as f:
            text = f.read()
        if recall != "chunk":
            text = text.replace("reattention: {", "reattention: {recall: %s, " % recall)
        if layers:
            text = text.replace("layers: 2,", "layers: %d," % layers)
        with open(path, "w") as f:
            f.write(text)
        return path

    def snapshot(self, cl, ctx, name, want_state="succeeded"):
        """POST a snapshot: 202 with an operation and Location; its final record."""
        c = self.c
        r = cl.request("POST", "/v1/contexts/%d/snapshot" % ctx, {"name": name})
        if not c.check(r.status == 202, "snapshot %s: %d %s" % (name, r.status, r.body[:300])):
            return None
        body = r.json()
        c.check(body["kind"] == "snapshot" and body["name"] == name and body["context_id"] == ctx and
                r.header("Location") == "/v1/operations/" + body["operation"], "snapshot answer: %s" % body)
        rec = wait_operation(cl, r)
        c.check(rec["state"] == want_state, "snapshot %s: %s, want %s" % (name, rec, want_state))
        return rec

    def restore(self, cl, name, want_state="succeeded"):
        """POST /v1/contexts {from_snapshot}: 202, the new context's id; (id, final record)."""
        c = self.c
        r = cl.request("POST", "/v1/contexts", {"from_snapshot": name})
        if not c.check(r.status == 202, "restore %s: %d %s" % (name, r.status, r.body[:300])):
            return None, None
        body = r.json()
        c.check(body["kind"] == "restore" and body["restored_from"] == name and body["context_id"] > 0,
                "restore answer: %s" % body)
        rec = wait_operation(cl, r)
        c.check(rec["state"] == want_state, "restore %s: %s, want %s" % (name, rec, want_state))
        return body["context_id"], rec

    def start(self, config, log, ranks, extra=(), fsize=None):
        if fsize is None:
            s = sc.Service(self.args, config, self.path(log), ranks=ranks, extra=extra)
        else:
            # The whole job under a file-size limit: a rank's write past it fails with EFBIG.
            # Open MPI's shared-memory files would hit the limit too: TCP between the ranks
            # and PMIx's hash store instead.
            limit = resource.getrlimit(resource.RLIMIT_FSIZE)
            saved = dict(os.environ)
            os.environ.update({"OMPI_MCA_btl": "self,tcp", "PMIX_MCA_gds": "hash"})
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, limit[1]))
            try:
                s = sc.Service(self.args, config, self.path(log), ranks=ranks, extra=extra)
            finally:
                resource.setrlimit(resource.RLIMIT_FSIZE, limit)
                os.environ.clear()
                os.environ.update(saved)
        self.services.append(s)
        s.wait_ready()
        return s

    def fill(self, cl):
        """Context 1: 3000 synthetic tokens with needles; context 2: 300 uploaded tokens."""
        c = self.c
        r = cl.request("POST", "/v1/contexts")
        c.check(r.status == 201 and r.json()["id"] == 1, "create context 1: %d %s" % (r.status, r.body[:200]))
        r = cl.request("POST", "/v1/contexts/1/synthetic", {"tokens": 3000, "seed": 5, "needles": [700, 2100]})
        c.check(r.status == 200, "synthetic: %d %s" % (r.status, r.body[:200]))
        r = cl.request("POST", "/v1/contexts")
        c.check(r.status == 201 and r.json()["id"] == 2, "create context 2: %d %s" % (r.status, r.body[:200]))
        if self.kv is None:
            info = cl.request("GET", "/v1/info").json()["model"]
            k, v = sc.random_kv(random.Random(3), info["layers"], info["kv_heads"], 300, info["head_dim"])
            self.kv = sc.kv_body(k, v)
        r = cl.request("POST", "/v1/contexts/2/kv", self.kv, content_type="application/octet-stream")
        c.check(r.status == 200, "kv upload: %d %s" % (r.status, r.body[:200]))

    def unchanged(self, cl, contexts, snapshots, what):
        c = self.c
        got = cl.request("GET", "/v1/contexts").json()["contexts"]
        c.check(got == contexts, "%s: contexts changed: %s" % (what, str(got)[:300]))
        got = sorted(s["name"] for s in cl.request("GET", "/v1/snapshots").json()["snapshots"])
        c.check(got == snapshots, "%s: snapshots %s, want %s" % (what, got, snapshots))
        stale = [n for n in os.listdir(self.snapdir) if n.startswith(".")]
        c.check(not stale, "%s: temporary directories left: %s" % (what, stale))

    def copy_snapshot(self, src, name, edit=None):
        """A copy of snapshot `src` named `name`, its manifest changed by edit(manifest)."""
        dst = os.path.join(self.snapdir, name)
        shutil.copytree(os.path.join(self.snapdir, src), dst)
        with open(os.path.join(dst, "manifest.json")) as f:
            m = json.load(f)
        m["name"] = name
        if edit:
            edit(m)
        with open(os.path.join(dst, "manifest.json"), "w") as f:
            json.dump(m, f)
        return dst

    # ------------------------------------------------------------ 1: two ranks

    def run_first(self):
        c = self.c
        svc = self.start(self.config("chunk"), "first.log", 2)
        cl = svc.client()
        self.fill(cl)
        want = {1: answers(cl, 1), 2: answers(cl, 2)}
        c.check(any(ch["chunk"] for a in want[1] for ch in a["recalled_chunks"]), "queries recall chunks")
        for ctx, name in ((1, "ctx-one"), (2, "ctx.two_b")):
            t0 = time.time()
            rec = self.snapshot(cl, ctx, name)
            if rec:
                c.check(rec["bytes_done"] > 0 and rec["tokens_done"] == rec["tokens_total"], "progress: %s" % rec)
                print("snapshot %s: %d bytes in %.2fs" % (name, rec["bytes_done"], time.time() - t0), flush=True)
        listed = cl.request("GET", "/v1/snapshots").json()["snapshots"]
        c.check([s["name"] for s in listed] == ["ctx-one", "ctx.two_b"], "listed: %s" % listed)
        c.check(listed[0]["tokens"] == 3000 and listed[0]["layers"] == 2 and listed[1]["tokens"] == 300 and
                listed[0]["ranks"] == 2 and listed[0]["context_id"] == 1, "listed: %s" % listed)
        files = sorted(os.listdir(os.path.join(self.snapdir, "ctx-one")))
        c.check(files == ["manifest.json", "rank-0.safetensors", "rank-1.safetensors"], "snapshot files: %s" % files)
        # Snapshotting froze nothing for good: the context still takes appends and answers the same.
        c.check(same_answers(answers(cl, 1), want[1])[0], "context 1 after its snapshot")

        # Restore on the same ranks: a new context, identical answers.
        ctx, rec = self.restore(cl, "ctx-one")
        if ctx:
            c.check(ctx == 3 and rec["tokens_done"] == 3000 and rec["bytes_done"] > 0, "restore record: %s" % rec)
            got = cl.request("GET", "/v1/contexts/3").json()
            c.check(got["tokens"] == 3000 and got["layer_tokens"] == [3000, 3000], "restored context: %s" % got)
            same, why = same_answers(answers(cl, 3), want[1], tol=0.0)
            c.check(same, "restored context answers as the original (same ranks): " + why)
        self.bad_inputs(cl)
        r = cl.request("DELETE", "/v1/contexts/3")
        c.check(r.status == 200, "delete the restored context: %d" % r.status)
        # A context that goes on growing after its snapshot: the snapshot keeps what it held.
        r = cl.request("POST", "/v1/contexts/2/synthetic", {"tokens": 10, "seed": 1})
        c.check(r.status == 200, "append after snapshot: %d %s" % (r.status, r.body[:200]))
        self.want = want
        # kill -9 of the whole job (mpirun and every rank).
        os.killpg(svc.proc.pid, signal.SIGKILL)
        svc.proc.wait(timeout=30)
        svc.kill()

    def bad_inputs(self, cl):
        c = self.c
        contexts = cl.request("GET", "/v1/contexts").json()["contexts"]
        snapshots = ["ctx-one", "ctx.two_b"]

        def refused(r, status, code, words, what, extra=()):
            ok = c.error(r, status, code, what)
            if ok:
                msg = r.json()["error"]["message"]
                for w in words:
                    c.check(w in msg, "%s: message %r lacks %r" % (what, msg, w))
            self.unchanged(cl, contexts, sorted(snapshots + list(extra)), what)

        def chunk16(m):  # a snapshot written with 16-token chunks: its files hold other blocks
            m["reattention"]["chunk_tokens"] = 16
            for f in m["files"]:
                f["layer_blocks"] = [max(0, -(-(n - m["reattention"]["sink_tokens"]) // 16) - f["rank"] + 1) // 2
                                     for n in m["context"]["layer_tokens"]]

        for name in ("", "../escape", "a/b", ".hidden", "x" * 65, "a b", "-x", "é"):
            refused(cl.request("POST", "/v1/contexts/1/snapshot", {"name": name}), 400, "invalid_argument",
                    ["name"], "snapshot named %r" % name)
            refused(cl.request("POST", "/v1/contexts", {"from_snapshot": name}), 400, "invalid_argument",
                    ["from_snapshot"], "restore of %r" % name)
        refused(cl.request("POST", "/v1/contexts/1/snapshot", {"name": 7}), 400, "invalid_argument", ["name"],
                "a name that is not a string")
        refused(cl.request("POST", "/v1/contexts/1/snapshot", {}), 400, "invalid_argument", ["name: missing"],
                "no name")
        refused(cl.request("POST", "/v1/contexts/1/snapshot", {"name": "x", "path": "/tmp"}), 400,
                "invalid_argument", ["path"], "an unknown field")
        refused(cl.request("POST", "/v1/contexts/1/snapshot", b"name=x", content_type="text/plain"), 415,
                "unsupported_media_type", [], "a form body")
        refused(cl.request("POST", "/v1/contexts/1/snapshot", {"name": "ctx-one"}), 409, "conflict", ["ctx-one"],
                "an existing name")
        refused(cl.request("POST", "/v1/contexts/99/snapshot", {"name": "new"}), 404, "not_found", ["99"],
                "an unknown context")
        refused(cl.request("POST", "/v1/contexts", {"from_snapshot": "nope"}), 404, "not_found", ["nope"],
                "an unknown snapshot")
        refused(cl.request("DELETE", "/v1/snapshots/nope"), 404, "not_found", ["nope"], "delete an unknown snapshot")
        refused(cl.request("DELETE", "/v1/snapshots/..%2Fx"), 400, "invalid_argument", ["snapshot name"],
                "delete with path characters")

        # Snapshots of another model or chunk size: 400 at once, naming the difference.
        for name, edit, words in (("othermodel", lambda m: m["model"].update(head_dim=32), ["model.head_dim 32"]),
                                  ("otherchunk", chunk16, ["reattention.chunk_tokens 16"])):
            d = self.copy_snapshot("ctx-one", name, edit)
            refused(cl.request("POST", "/v1/contexts", {"from_snapshot": name}), 400, "invalid_argument", words,
                    "restore of snapshot '%s'" % name, extra=[name])
            shutil.rmtree(d)
        # Another storage dtype (the ranks know theirs) or damaged files: the restore operation
        # fails naming the problem, and its context is gone again.
        cases = [
            ("otherdtype", lambda m: m["model"].update(dtype="BF16"), None, ["storage dtype BF16"]),
            ("truncated", None, lambda d: os.truncate(os.path.join(d, "rank-1.safetensors"), 1000),
             ["rank-1.safetensors", "truncated"]),
            ("corrupt", None, lambda d: flip_byte(os.path.join(d, "rank-0.safetensors")),
             ["rank-0.safetensors", "corrupt"]),
            ("missing", None, lambda d: os.remove(os.path.join(d, "rank-1.safetensors")),
             ["rank-1.safetensors", "cannot be read"]),
        ]
        for name, edit, damage, words in cases:
            d = self.copy_snapshot("ctx-one", name, edit)
            if damage:
                damage(d)
            ctx, rec = self.restore(cl, name, want_state="failed")
            if rec:
                for w in words:
                    c.check(w in (rec["error"] or ""), "restore of '%s': error %r lacks %r" % (name, rec["error"], w))
                r = cl.request("GET", "/v1/contexts/%d" % ctx)
                c.check(r.status == 404, "the failed restore's context %d is gone: %d" % (ctx, r.status))
            self.unchanged(cl, contexts, sorted(snapshots + [name]), "restore of snapshot '%s'" % name)
            shutil.rmtree(d)
        # Deleted while nothing holds it: gone from the list and the disk.
        self.copy_snapshot("ctx-one", "doomed")
        r = cl.request("DELETE", "/v1/snapshots/doomed")
        c.check(r.status == 200 and r.json() == {"name": "doomed", "deleted": True}, "delete: %d %s" % (r.status, r.body))
        c.check(not os.path.exists(os.path.join(self.snapdir, "doomed")), "deleted snapshot's directory is gone")
        self.unchanged(cl, contexts, snapshots, "after the bad inputs")

    # ------------------------------------------------------------ 2: kill -9, restart on 3 ranks

    def run_restart(self):
        c = self.c
        stale = os.path.join(self.snapdir, ".tmp-crashed-1")
        os.makedirs(stale)
        with open(os.path.join(stale, "rank-0.safetensors"), "wb") as f:
            f.write(b"\0" * 4096)
        incomplete = os.path.join(self.snapdir, "incomplete")
        shutil.copytree(os.path.join(self.snapdir, "ctx-one"), incomplete)
        os.remove(os.path.join(incomplete, "manifest.json"))
        # A second snapshot of context 1: restored too, under a new id.
        self.copy_snapshot("ctx-one", "ctx-one-again")
        svc = self.start(self.config("chunk3"), "restart3.log", 3, extra=["--restore"])
        cl = svc.client()
        c.check(not os.path.exists(stale), "a stale temporary directory is removed at start-up")
        listed = [s["name"] for s in cl.request("GET", "/v1/snapshots").json()["snapshots"]]
        c.check(listed == ["ctx-one", "ctx-one-again", "ctx.two_b"], "an incomplete snapshot is not listed: %s" % listed)
        contexts = {x["id"]: x for x in cl.request("GET", "/v1/contexts").json()["contexts"]}
        c.check(sorted(contexts) == [1, 2, 3], "restored under their ids, a second of context 1 under a new one: %s"
                % sorted(contexts))
        if 3 in contexts:
            same, why = same_answers(answers(cl, 3), self.want[1])
            c.check(same, "the second snapshot of context 1, restored as context 3: %s" % why)
            c.check(cl.request("DELETE", "/v1/contexts/3").status == 200, "delete context 3")
        r = cl.request("DELETE", "/v1/snapshots/ctx-one-again")
        c.check(r.status == 200, "delete ctx-one-again: %d" % r.status)
        c.check(contexts.get(1, {}).get("tokens") == 3000 and contexts.get(2, {}).get("tokens") == 300,
                "restored lengths (the append after the snapshot is not in it): %s" % contexts)
        for ctx in (1, 2):
            same, why = same_answers(answers(cl, ctx), self.want[ctx])
            c.check(same, "context %d after kill -9 and --restore on 3 ranks: %s" % (ctx, why))
        restored = [l for l in svc.log_lines() if l.get("msg") == "snapshot restored"]
        c.check(len(restored) == 3 and all("gb_per_s" in l for l in restored), "restores logged: %s" % restored)
        progress = [l for l in svc.log_lines() if l.get("msg") == "restore progress"]
        c.check(len(progress) >= 2 and progress[-1]["tokens_done"] == progress[-1]["tokens_total"],
                "restore progress logged: %s" % progress[-3:])
        # A new context gets an id above the restored ones.
        r = cl.request("POST", "/v1/contexts")
        c.check(r.status == 201 and r.json()["id"] == 4, "next id after a restore: %s" % r.body[:200])
        shutil.rmtree(incomplete)
        svc.kill()

    # ------------------------------------------------------------ 3: 1 rank, span recall

    def run_span(self):
        c = self.c
        fresh = self.start(self.config("span2", recall="span"), "span2.log", 2)
        cl = fresh.client()
        self.fill(cl)
        want = {1: answers(cl, 1), 2: answers(cl, 2)}
        c.check(all(a["recalled_spans"] for a in want[1]), "span answers recall spans")
        fresh.kill()
        svc = self.start(self.config("span1", recall="span"), "span1.log", 1, extra=["--restore"])
        cl = svc.client()
        for ctx in (1, 2):
            same, why = same_answers(answers(cl, ctx), want[ctx])
            c.check(same, "context %d restored on 1 rank, span recall: %s" % (ctx, why))
        svc.kill()

    # ------------------------------------------------------------ 4: disk full

    def run_disk_full(self):
        c = self.c
        snapdir = self.path("small-disk")
        self.snapdir = snapdir
        os.makedirs(snapdir)
        # 8000 tokens of the tiny model: 4 MB in all, 2 MB per rank file, over a 512 KiB limit.
        svc = self.start(self.config("full", snapdir=snapdir), "full.log", 2, extra=["--log-level", "warn"],
                         fsize=512 * 1024)
        cl = svc.client()
        cl.request("POST", "/v1/contexts")
        r = cl.request("POST", "/v1/contexts/1/synthetic", {"tokens": 8000, "seed": 2})
        c.check(r.status == 200, "synthetic: %d" % r.status)
        before = answers(cl, 1)
        contexts = cl.request("GET", "/v1/contexts").json()["contexts"]
        rec = self.snapshot(cl, 1, "big", want_state="failed")
        if rec:
            msg = rec["error"] or ""
            c.check("rank-" in msg and "File too large" in msg, "disk full names the file and the error: %r" % msg)
        self.unchanged(cl, contexts, [], "after the disk filled")
        c.check(not os.path.exists(os.path.join(snapdir, "big")), "no snapshot directory after the disk filled")
        c.check(same_answers(answers(cl, 1), before, tol=0.0)[0], "context unchanged after the failed snapshot")
        # The service goes on: a small context's snapshot fits.
        cl.request("POST", "/v1/contexts")
        cl.request("POST", "/v1/contexts/2/synthetic", {"tokens": 100, "seed": 2})
        self.snapshot(cl, 2, "small")
        svc.kill()

    # ------------------------------------------------------------ 5: cancel, busy

    def run_cancel(self):
        """24 layers, so a snapshot and a restore each run 25+ slices: cancelled midway, they
        leave nothing behind; while one runs, appends to its context get 409."""
        c = self.c
        self.snapdir = self.path("cancel-snapshots")
        os.makedirs(self.snapdir)
        svc = self.start(self.config("cancel", layers=24), "cancel.log", 2)
        cl = svc.client()
        cl.request("POST", "/v1/contexts")
        r = cl.request("POST", "/v1/contexts/1/synthetic", {"tokens": 20000, "seed": 4})
        c.check(r.status == 200, "synthetic: %d" % r.status)
        before = cl.request("GET", "/v1/contexts").json()["contexts"]
        r = cl.request("POST", "/v1/contexts/1/snapshot", {"name": "cancelled"})
        c.check(r.status == 202, "snapshot to cancel: %d" % r.status)
        op = r.json()["operation"]
        busy = cl.request("POST", "/v1/contexts/1/synthetic", {"tokens": 1, "seed": 4})
        during = cl.request("POST", "/v1/contexts/1/query", {"layer": 3, "synthetic_q": {"seed": 2, "qlen": 1}})
        d = cl.request("DELETE", "/v1/operations/%s" % op)
        c.check(d.status == 202, "cancel: %d %s" % (d.status, d.body[:200]))
        rec = wait_operation(cl, r)
        c.check(rec["state"] == "cancelled", "snapshot cancelled midway: %s" % rec)
        if rec["state"] == "cancelled":
            c.check(busy.status == 409 and op in busy.json()["error"]["message"],
                    "append while the snapshot runs: %d %s" % (busy.status, busy.body[:200]))
            c.check(during.status == 200, "a query while the snapshot runs: %d %s" % (during.status, during.body[:200]))
        self.unchanged(cl, before, [], "after a cancelled snapshot")
        # The whole snapshot, then a restore cancelled midway.
        self.snapshot(cl, 1, "whole")
        r = cl.request("POST", "/v1/contexts", {"from_snapshot": "whole"})
        ctx = r.json().get("context_id")
        q = cl.request("POST", "/v1/contexts/%s/query" % ctx, {"layer": 0, "synthetic_q": {"seed": 1, "qlen": 1}})
        d = cl.request("DELETE", "/v1/operations/%s" % r.json().get("operation"))
        rec = wait_operation(cl, r)
        c.check(rec["state"] == "cancelled", "restore cancelled midway: %s" % rec)
        if rec["state"] == "cancelled":
            c.check(q.status in (404, 409), "a query on the context being restored: %d %s" % (q.status, q.body[:200]))
        self.unchanged(cl, before, ["whole"], "after a cancelled restore")
        c.check(cl.request("GET", "/v1/contexts/%s" % ctx).status == 404, "the cancelled restore's context is gone")
        r = cl.request("POST", "/v1/contexts/1/synthetic", {"tokens": 8, "seed": 4})
        c.check(r.status == 200, "the context takes appends again: %d %s" % (r.status, r.body[:200]))
        svc.kill()


def flip_byte(path):
    with open(path, "r+b") as f:
        f.seek(-7, os.SEEK_END)
        b = f.read(1)
        f.seek(-7, os.SEEK_END)
        f.write(bytes([b[0] ^ 0x40]))


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--server", required=True, help="reattn-server binary")
    p.add_argument("--mpirun", default="mpirun")
    p.add_argument("--config", required=True, help="a config whose model and reattention sections are used")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs, snapshots)")
    args = p.parse_args()

    def stop(signo, frame):
        raise SystemExit("test stopped by signal %d" % signo)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    tmp = tempfile.mkdtemp(prefix="reattn-snapshots-")
    suite = Suite(args, tmp)
    return sc.run_suite(suite, [suite.run_first, suite.run_restart, suite.run_span, suite.run_disk_full,
                                suite.run_cancel], tmp, args.keep)

if __name__ == "__main__":
    sys.exit(main())
