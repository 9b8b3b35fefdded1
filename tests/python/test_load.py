"""Bulk loads end to end: reattn-server under mpirun (CPU) with --load-root, driven by the
Python client. A loaded context answers exactly as one given the same K/V through /kv;
progress is reported; a cancelled or failed load (a NaN late in the file) leaves the context
exactly as before (same out, same chunks); every bad input is a clear 4xx that changes
nothing; queries on another context are answered while a load runs.

Loads run in slices of server.load_slice_bytes, set small here so a load takes many slices
(some inside one chunk) and a cancel lands midway."""

import json
import os
import sys
import time
import unittest

import numpy as np

import harness
from harness import ReattnError
from reattn_client import OperationError, safetensors
from reattn_client.tensors import to_wire

REATTENTION = {"sink_tokens": 4, "local_window": 32, "chunk_tokens": 8, "top_k": 2, "max_recall_chunks": 6,
               "final_attention": "gather"}
M = harness.TINY_MODEL
SLICE_BYTES = 2048  # 4 tokens of an F32 file of the tiny model per slice


def kv(tokens, seed, scale=1.0):
    rng = np.random.default_rng(seed)
    shape = (M["layers"], M["kv_heads"], tokens, M["head_dim"])
    return (rng.standard_normal(shape) * scale).astype(np.float32), rng.standard_normal(shape).astype(np.float32)


def write_kv(path, k, v, dtype="F32"):
    kw, _ = to_wire(k, "k", dtype, ndim=4)
    vw, _ = to_wire(v, "v", dtype, ndim=4)
    with open(path, "wb") as f:
        f.write(safetensors.dumps({"k": kw, "v": vw}))
    return path


def queries(seed):
    rng = np.random.default_rng(seed)
    return [(layer, mode, rng.standard_normal((qlen, M["q_heads"], M["head_dim"])).astype(np.float32))
            for layer in range(M["layers"]) for mode, qlen in (("tail", 1), ("tail", 4), ("detached", 3))]


def answers(client, ctx, qs):
    out = []
    for layer, mode, q in qs:
        r = client.query(ctx, layer, q, mode=mode)
        out.append((r.out.copy(), list(r.recalled_chunks)))
    return out


class LoadTests(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.root = os.path.join(harness.TMP.path, "root")
        os.makedirs(cls.root, exist_ok=True)
        cls.server = harness.Server(harness.ARGS, harness.TMP.path, "load", REATTENTION,
                                    server={"load_slice_bytes": SLICE_BYTES}, extra=["--load-root", cls.root])
        cls.client = cls.server.client()
        cls.qs = queries(7)

    @classmethod
    def tearDownClass(cls):
        cls.client.close()
        cls.server.stop()

    def path(self, name):
        return os.path.join(self.root, name)

    def context_with(self, k, v, dtype="F32"):
        ctx = self.client.create_context()["id"]
        if k.shape[2]:
            self.client.append(ctx, k, v, dtype=dtype)
        return ctx

    def start_load(self, ctx, name):
        r, data = self.client.request("POST", "/v1/contexts/%d/load" % ctx,
                                      body=json.dumps({"path": name, "format": "safetensors"}).encode())
        self.assertEqual(r.status, 202)
        rec = json.loads(data.decode())
        self.assertEqual(r.getheader("Location"), "/v1/operations/" + rec["operation"])
        self.assertEqual(rec["id"], rec["operation"])
        self.assertEqual(rec["kind"], "load")
        self.assertEqual(rec["context_id"], ctx)
        return rec

    def test_a_load_answers_exactly_as_the_same_kv_through_kv(self):
        for dtype in ("F32", "BF16"):
            with self.subTest(dtype=dtype):
                k0, v0 = kv(301, 1)
                k1, v1 = kv(1003, 2)
                write_kv(self.path("kv_%s.safetensors" % dtype), k1, v1, dtype)
                loaded = self.context_with(k0, v0, dtype)
                appended = self.context_with(k0, v0, dtype)
                self.client.append(appended, k1, v1, dtype=dtype)
                rec = self.start_load(loaded, "kv_%s.safetensors" % dtype)
                self.assertEqual(rec["tokens_total"], 1003)
                final = self.client.wait_operation(rec["id"], timeout=120)
                self.assertEqual(final["state"], "succeeded")
                self.assertEqual(final["tokens_done"], 1003)
                self.assertEqual(final["progress"], 1.0)
                esize = 4 if dtype == "F32" else 2
                self.assertEqual(final["bytes_done"], 2 * k1.size * esize)
                self.assertGreater(final["bytes_per_s"], 0)
                self.assertIsNone(final["error"])
                self.assertEqual(self.client.context(loaded)["layer_tokens"], [1304, 1304])
                for (out_l, ch_l), (out_a, ch_a) in zip(answers(self.client, loaded, self.qs),
                                                        answers(self.client, appended, self.qs)):
                    np.testing.assert_array_equal(out_l, out_a)
                    self.assertEqual(ch_l, ch_a)
                # The context takes ordinary appends again afterwards.
                self.client.append(loaded, *kv(5, 3))
        m = self.client.metrics()
        ok = [v for labels, v in m.get("reattn_operations_total", []) if labels == {"kind": "load", "state": "succeeded"}]
        self.assertTrue(ok and ok[0] >= 2, m.get("reattn_operations_total"))
        loaded_bytes = [v for labels, v in m.get("reattn_operation_bytes_total", []) if labels == {"kind": "load"}]
        self.assertTrue(loaded_bytes and loaded_bytes[0] > 0)

    def test_a_cancelled_load_leaves_the_context_as_before_and_reports_progress(self):
        k0, v0 = kv(333, 4)
        write_kv(self.path("long.safetensors"), *kv(40000, 5))
        ctx = self.context_with(k0, v0)
        before = answers(self.client, ctx, self.qs)
        rec = self.start_load(ctx, "long.safetensors")
        seen = self.wait_for_progress(rec["id"])
        self.assertGreaterEqual(seen["tokens_done"], 200)
        self.assertLess(seen["tokens_done"], seen["tokens_total"])
        self.assertEqual(self.client.cancel_operation(rec["id"])["cancel_requested"], True)
        with self.assertRaises(OperationError) as e:
            self.client.wait_operation(rec["id"], timeout=120)
        self.assertEqual(e.exception.operation["state"], "cancelled")
        with self.assertRaises(ReattnError) as again:  # finished: 409
            self.client.cancel_operation(rec["id"])
        self.assertEqual(again.exception.status, 409)
        self.assert_unchanged(ctx, 333, before)
        # The log tells the story too: progress lines, then the end.
        lines = [json.loads(l) for l in open(self.server.log_path, errors="replace") if l.startswith("{")]
        mine = [l for l in lines if l.get("operation") == rec["id"]]
        self.assertTrue(any(l.get("msg") == "operation progress" and l.get("tokens_done", 0) > 0 for l in mine), mine[:5])
        self.assertTrue(any(l.get("msg") == "operation finished" and l.get("state") == "cancelled" for l in mine))

    def test_a_nan_late_in_the_file_fails_the_load_and_leaves_the_context_as_before(self):
        k0, v0 = kv(290, 6)
        k1, v1 = kv(700, 7)
        k1[1, 1, 650, 5] = np.nan
        write_kv(self.path("nan.safetensors"), k1, v1)
        ctx = self.context_with(k0, v0)
        before = answers(self.client, ctx, self.qs)
        rec = self.start_load(ctx, "nan.safetensors")
        with self.assertRaises(OperationError) as e:
            self.client.wait_operation(rec["id"], timeout=120)
        final = e.exception.operation
        self.assertEqual(final["state"], "failed")
        self.assertIn("non-finite", final["error"])
        self.assertIn("layer 1, kv head 1", final["error"])
        self.assertGreater(final["tokens_done"], 0)  # it failed midway, not at the start
        self.assert_unchanged(ctx, 290, before)

    def test_a_file_replaced_by_a_shorter_one_midway_fails_the_load_cleanly(self):
        k0, v0 = kv(120, 20)
        write_kv(self.path("moving.safetensors"), *kv(40000, 21))
        ctx = self.context_with(k0, v0)
        before = answers(self.client, ctx, self.qs)
        rec = self.start_load(ctx, "moving.safetensors")
        self.wait_for_progress(rec["id"])
        # Renamed over: the ranks' mappings keep the old file, whose path now names a shorter one.
        write_kv(self.path("short.safetensors"), *kv(10, 22))
        os.replace(self.path("short.safetensors"), self.path("moving.safetensors"))
        with self.assertRaises(OperationError) as e:
            self.client.wait_operation(rec["id"], timeout=120)
        self.assertEqual(e.exception.operation["state"], "failed")
        self.assertIn("truncated", e.exception.operation["error"])
        self.assert_unchanged(ctx, 120, before)

    def test_queries_on_another_context_are_answered_during_a_load(self):
        other = self.context_with(*kv(200, 8))
        write_kv(self.path("long2.safetensors"), *kv(40000, 9))
        target = self.context_with(*kv(100, 10))
        rec = self.start_load(target, "long2.safetensors")
        self.wait_for_progress(rec["id"])
        answered_while_running = 0
        q = self.qs[0][2]
        for _ in range(20):
            self.client.query(other, 0, q)  # raises unless it is answered
            if self.client.operation(rec["id"])["state"] == "running":
                answered_while_running += 1
        self.assertGreater(answered_while_running, 0)
        # The context being loaded refuses what would see or change partial contents.
        for call in (lambda: self.client.query(target, 0, q), lambda: self.client.append(target, *kv(3, 11)),
                     lambda: self.client.synthetic(target, 8, 1), lambda: self.client.delete_context(target),
                     lambda: self.client.load(target, "long2.safetensors")):
            with self.assertRaises(ReattnError) as e:
                call()
            self.assertEqual(e.exception.status, 409)
            self.assertIn(rec["id"], e.exception.message)
        self.client.cancel_operation(rec["id"])
        with self.assertRaises(OperationError):
            self.client.wait_operation(rec["id"], timeout=120)
        self.assertEqual(self.client.context(target)["tokens"], 100)

    def test_bad_inputs_are_clear_4xx_and_change_nothing(self):
        ctx = self.context_with(*kv(50, 12))
        write_kv(self.path("good.safetensors"), *kv(20, 13))
        good = open(self.path("good.safetensors"), "rb").read()
        with open(self.path("truncated.safetensors"), "wb") as f:
            f.write(good[:len(good) - 100])
        write_kv(self.path("layers.safetensors"), *[np.zeros((3, 2, 20, 16), np.float32)] * 2)
        write_kv(self.path("head_dim.safetensors"), *[np.zeros((2, 2, 20, 8), np.float32)] * 2)
        with open(self.path("int.safetensors"), "wb") as f:
            f.write(safetensors.dumps({"k": np.zeros((2, 2, 20, 16), np.int32), "v": np.zeros((2, 2, 20, 16), np.int32)}))
        outside = os.path.join(harness.TMP.path, "outside.safetensors")
        write_kv(outside, *kv(20, 14))
        link = self.path("link.safetensors")
        if not os.path.lexists(link):
            os.symlink(outside, link)
        os.makedirs(self.path("adir"), exist_ok=True)
        cases = [
            ({"path": "../outside.safetensors"}, 403, "'..'"),
            ({"path": "link.safetensors"}, 403, "outside"),
            ({"path": outside}, 403, "outside"),
            ({"path": "missing.safetensors"}, 400, "no such file"),
            ({"path": "adir"}, 400, "not a regular file"),
            ({"path": "truncated.safetensors"}, 400, "truncated.safetensors"),
            ({"path": "layers.safetensors"}, 400, "layers"),
            ({"path": "head_dim.safetensors"}, 400, "head_dim"),
            ({"path": "int.safetensors"}, 400, "dtype"),
            ({"path": "good.safetensors", "format": "npy"}, 400, "format"),
            ({"path": "good.safetensors", "paht": 1}, 400, "paht"),
            ({"path": ""}, 400, "path"),
            ({"path": 3}, 400, "path"),
            ({}, 400, "path"),
        ]
        ops_before = len(self.client.operations())
        for body, status, words in cases:
            with self.subTest(body=body):
                with self.assertRaises(ReattnError) as e:
                    self.client._json("POST", "/v1/contexts/%d/load" % ctx, body)
                self.assertEqual(e.exception.status, status, e.exception.message)
                self.assertIn(words, e.exception.message)
                if not str(body.get("path", "")).startswith("/"):
                    self.assertNotIn(harness.TMP.path, e.exception.message)  # server paths are not echoed
        with self.assertRaises(ReattnError) as e:
            self.client.load(987654, "good.safetensors")
        self.assertEqual(e.exception.status, 404)
        for bad_id in ("op-0", "op-999999", "x" * 300):
            with self.assertRaises(ReattnError) as e:
                self.client.operation(bad_id)
            self.assertEqual(e.exception.status, 404)
            self.assertLess(len(e.exception.message), 300)
        self.assertEqual(len(self.client.operations()), ops_before)
        self.assertEqual(self.client.context(ctx)["tokens"], 50)

    def test_wait_operation_progress_prints_without_tqdm(self):
        write_kv(self.path("small.safetensors"), *kv(64, 15))
        ctx = self.context_with(*kv(10, 16))
        rec = self.client.load(ctx, "small.safetensors")
        final = self.client.wait_operation(rec["id"], progress=True, timeout=120)
        self.assertEqual(final["state"], "succeeded")
        self.assertEqual(self.client.context(ctx)["tokens"], 74)

    def test_wait_operation_shows_a_tqdm_bar_when_tqdm_is_importable(self):
        bars = []

        class FakeBar:
            def __init__(self, total, **kw):
                self.total, self.n, self.closed = total, 0, False
                bars.append(self)

            def update(self, k):
                self.n += k

            def set_postfix_str(self, text, refresh=True):
                self.postfix = text

            def close(self):
                self.closed = True

        fake = type(sys)("tqdm")
        fake.tqdm = FakeBar
        saved = sys.modules.get("tqdm")
        sys.modules["tqdm"] = fake
        try:
            write_kv(self.path("bar.safetensors"), *kv(96, 18))
            ctx = self.context_with(*kv(10, 19))
            final = self.client.wait_operation(self.client.load(ctx, "bar.safetensors")["id"], progress=True, timeout=120)
        finally:
            if saved is None:
                del sys.modules["tqdm"]
            else:
                sys.modules["tqdm"] = saved
        self.assertEqual(final["state"], "succeeded")
        self.assertEqual(len(bars), 1)
        self.assertEqual((bars[0].total, bars[0].n, bars[0].closed), (96, 96, True))
        self.assertIn("succeeded", bars[0].postfix)

    # ---- helpers

    def wait_for_progress(self, op_id, tokens=200):
        """The operation's record once it has loaded `tokens` (past the owner's ring of the
        local window, which the load overwrites and a rollback must put back)."""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            rec = self.client.operation(op_id)
            if rec["state"] == "running" and rec["tokens_done"] >= tokens:
                return rec
            self.assertNotIn(rec["state"], ("succeeded", "failed", "cancelled"), rec)
            time.sleep(0.005)
        self.fail("no progress on %s within 60 s" % op_id)

    def assert_unchanged(self, ctx, tokens, before):
        self.assertEqual(self.client.context(ctx)["layer_tokens"], [tokens] * M["layers"])
        for (out_b, ch_b), (out_a, ch_a) in zip(before, answers(self.client, ctx, self.qs)):
            np.testing.assert_array_equal(out_a, out_b)
            self.assertEqual(ch_a, ch_b)
        # And it grows normally again.
        self.client.append(ctx, *kv(9, 17))
        self.assertEqual(self.client.context(ctx)["tokens"], tokens + 9)


class LoadsDisabledTests(unittest.TestCase):
    def test_without_a_load_root_loads_are_refused(self):
        server = harness.Server(harness.ARGS, harness.TMP.path, "noload", REATTENTION)
        try:
            with server.client() as client:
                ctx = client.create_context()["id"]
                with self.assertRaises(ReattnError) as e:
                    client.load(ctx, "kv.safetensors")
                self.assertEqual(e.exception.status, 403)
                self.assertIn("load_root", e.exception.message)
                self.assertEqual(client.operations(), [])
        finally:
            server.stop()


if __name__ == "__main__":
    sys.exit(harness.main([LoadTests, LoadsDisabledTests]))
