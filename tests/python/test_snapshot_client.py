"""Snapshots through the Python client: reattn-server under mpirun (CPU) with --snapshot-dir.
snapshot() and restore() wait on their operations; a restored context answers every query
exactly as the original (same out, same chunks); snapshots() lists what was written;
delete_snapshot() removes it; an existing name is 409, an unknown snapshot 404, a name with path
characters 400; restoring a damaged file raises OperationError naming the file, and no context
is left behind."""

import os
import sys
import unittest

import numpy as np

import harness
from harness import ReattnError
from reattn_client import OperationError

REATTENTION = {"sink_tokens": 4, "local_window": 32, "chunk_tokens": 8, "top_k": 2, "max_recall_chunks": 6,
               "final_attention": "gather"}
M = harness.TINY_MODEL


def queries(seed):
    rng = np.random.default_rng(seed)
    return [(layer, mode, rng.standard_normal((qlen, M["q_heads"], M["head_dim"])).astype(np.float32))
            for layer in range(M["layers"]) for mode, qlen in (("tail", 1), ("tail", 4), ("detached", 3))]


def answers(client, ctx, qs):
    return [(r.out.copy(), list(r.recalled_chunks)) for r in (client.query(ctx, l, q, mode=m) for l, m, q in qs)]


class SnapshotClientTests(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.dir = os.path.join(harness.TMP.path, "snapshots")
        cls.server = harness.Server(harness.ARGS, harness.TMP.path, "snap", REATTENTION,
                                    extra=["--snapshot-dir", cls.dir])
        cls.client = cls.server.client()

    @classmethod
    def tearDownClass(cls):
        cls.client.close()
        cls.server.stop()

    def test_snapshot_restore_delete(self):
        c = self.client
        ctx = c.create_context()["id"]
        c.synthetic(ctx, 2000, seed=3, needles=[500])
        qs = queries(1)
        want = answers(c, ctx, qs)
        snap = c.snapshot(ctx, "client-snap", progress=True)
        self.assertEqual(snap["context_id"], ctx)
        self.assertEqual(snap["tokens"], 2000)
        self.assertEqual(snap["ranks"], harness.ARGS.ranks)
        self.assertIn("client-snap", [s["name"] for s in c.snapshots()])
        restored = c.restore("client-snap")
        self.assertNotEqual(restored["id"], ctx)
        self.assertEqual(restored["tokens"], 2000)
        got = answers(c, restored["id"], qs)
        for (go, gc), (wo, wc) in zip(got, want):
            self.assertEqual(gc, wc)
            np.testing.assert_array_equal(go, wo)
        rec = c.restore("client-snap", wait=False)
        final = c.wait_operation(rec["operation"])
        self.assertEqual(final["state"], "succeeded")
        self.assertEqual(c.delete_snapshot("client-snap"), {"name": "client-snap", "deleted": True})
        self.assertNotIn("client-snap", [s["name"] for s in c.snapshots()])

    def test_errors(self):
        c = self.client
        ctx = c.create_context()["id"]
        c.synthetic(ctx, 100, seed=1)
        c.snapshot(ctx, "taken")
        with self.assertRaises(ReattnError) as e:
            c.snapshot(ctx, "taken")
        self.assertEqual((e.exception.status, e.exception.code), (409, "conflict"))
        with self.assertRaises(ReattnError) as e:
            c.restore("absent")
        self.assertEqual(e.exception.status, 404)
        self.assertIn("absent", e.exception.message)
        with self.assertRaises(ReattnError) as e:
            c.snapshot(ctx, "../up")
        self.assertEqual(e.exception.status, 400)
        with self.assertRaises(ReattnError) as e:
            c.delete_snapshot("absent")
        self.assertEqual(e.exception.status, 404)
        # A damaged file: the restore operation fails, naming it.
        path = os.path.join(self.dir, "taken", "rank-0.safetensors")
        with open(path, "r+b") as f:
            f.seek(-3, os.SEEK_END)
            byte = f.read(1)
            f.seek(-3, os.SEEK_END)
            f.write(bytes([byte[0] ^ 1]))
        before = c.contexts()
        with self.assertRaises(OperationError) as e:
            c.restore("taken")
        self.assertIn("rank-0.safetensors", str(e.exception))
        self.assertEqual(c.contexts(), before)


if __name__ == "__main__":
    sys.exit(harness.main([SnapshotClientTests]))
