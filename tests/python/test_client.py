#!/usr/bin/env python3
"""reattn_client against reattn-server under mpirun (CPU, an API key): contexts, appends in
F32/F16/BF16, synthetic fill, queries (JSON and binary) checked against the numpy
ReAttention reference, errors as ReattnError, the API key from the environment, metrics.
Transport behaviour (503 + Retry-After retried a bounded number of times, one kept
connection) against a small in-process HTTP server. The safetensors codec without a server."""

import http.server
import json
import os
import sys
import threading
import time
import unittest

import numpy as np

import harness
import reference
from reattn_client import Client, ReattnError, safetensors

API_KEY = "client-test-key-41c7"
M = harness.TINY_MODEL
RECALL = {"sink_tokens": 4, "local_window": 32, "chunk_tokens": 8, "top_k": 2, "max_recall_chunks": 6,
          "final_attention": "gather"}


def rand_kv(rng, tokens, scale=1.0):
    shape = (M["layers"], M["kv_heads"], tokens, M["head_dim"])
    return ((rng.standard_normal(shape) * scale).astype(np.float32),
            rng.standard_normal(shape).astype(np.float32))


class Codec(unittest.TestCase):
    def test_round_trip(self):
        rng = np.random.default_rng(0)
        a = rng.standard_normal((2, 3, 5)).astype(np.float32)
        b = rng.standard_normal((7,)).astype(np.float16)
        ids = np.array([3, 1, 4], dtype=np.int64)
        back = safetensors.loads(safetensors.dumps({"a": a, "b": b, "ids": ids}))
        np.testing.assert_array_equal(back["a"], a)
        np.testing.assert_array_equal(back["b"], b)
        self.assertEqual(back["b"].dtype, np.float16)
        np.testing.assert_array_equal(back["ids"], ids)

    def test_bf16(self):
        x = np.array([1.0, -2.5, 3.140625, 1.00390625, 65504.0, 1e-3], dtype=np.float32)
        bits = safetensors.float32_to_bf16_bits(x)
        back = safetensors.loads(safetensors.dumps({"x": safetensors.Raw16(bits)}))["x"]
        np.testing.assert_array_equal(back[:3], x[:3])        # exact in bf16
        self.assertEqual(back[3], 1.0)                          # 1 + 2^-8 rounds to even
        self.assertTrue(np.all(np.abs(back - x) <= np.abs(x) * 2.0 ** -8))

    def test_malformed(self):
        good = safetensors.dumps({"a": np.zeros((2, 2), np.float32)})
        for bad, why in [(good[:5], "shorter"), (good[:-4], "do not fit"),
                         (b"\xff" * 8 + good[8:], "header length"),
                         (good.replace(b'"F32"', b'"F99"'), "unsupported dtype")]:
            with self.assertRaises(ValueError) as e:
                safetensors.loads(bad)
            self.assertIn(why, str(e.exception))


class FakeService(http.server.BaseHTTPRequestHandler):
    """Answers 503 + Retry-After for the first `busy` requests, then 200 {"ok": true};
    counts requests and connections."""
    protocol_version = "HTTP/1.1"
    state = {"busy": 0, "requests": 0, "connections": set(), "auth": []}

    def do_GET(self):
        s = self.state
        s["requests"] += 1
        s["connections"].add(self.client_address)
        s["auth"].append(self.headers.get("Authorization"))
        if self.path == "/chunked":  # a chunked body with an extension and a trailer
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.wfile.write(b"5;x=1\r\nhello\r\n7\r\n, world\r\n0\r\nX-Trailer: 1\r\n\r\n")
            return
        if self.path == "/close":   # answers, then closes the connection
            self.close_connection = True
            body, status, extra = b'{"closed":true}', 200, [("Connection", "close")]
        elif s["busy"] > 0:
            s["busy"] -= 1
            body, status, extra = b'{"error":{"code":"queue_full","message":"queue full (2 waiting)"}}', 503, [
                ("Retry-After", "0")]
        else:
            body, status, extra = b'{"ok":true}', 200, []
        self.send_response(status)
        for k, v in [("Content-Type", "application/json"), ("Content-Length", str(len(body)))] + extra:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


class Transport(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeService)
        cls.thread = threading.Thread(target=cls.httpd.serve_forever, daemon=True)
        cls.thread.start()
        cls.url = "http://127.0.0.1:%d" % cls.httpd.server_address[1]

    @classmethod
    def tearDownClass(cls):
        cls.httpd.shutdown()
        cls.httpd.server_close()

    def setUp(self):
        FakeService.state.update(busy=0, requests=0, connections=set(), auth=[])

    def test_503_retried_then_answered(self):
        FakeService.state["busy"] = 2
        c = Client(self.url, retries=3)
        _, body = c.request("GET", "/v1/info")
        self.assertEqual(body, b'{"ok":true}')
        self.assertEqual(FakeService.state["requests"], 3)
        c.close()

    def test_503_retries_are_bounded(self):
        FakeService.state["busy"] = 100
        c = Client(self.url, retries=2)
        with self.assertRaises(ReattnError) as e:
            c.request("GET", "/v1/info")
        self.assertEqual((e.exception.status, e.exception.code), (503, "queue_full"))
        self.assertIn("queue full", e.exception.message)
        self.assertEqual(FakeService.state["requests"], 3)
        c.close()

    def test_one_kept_connection(self):
        c = Client(self.url)
        for _ in range(20):
            c.request("GET", "/v1/info")
        self.assertEqual(FakeService.state["requests"], 20)
        self.assertEqual(len(FakeService.state["connections"]), 1)
        c.close()

    def test_chunked_body_and_connection_close(self):
        c = Client(self.url)
        self.assertEqual(c.request("GET", "/chunked")[1], b"hello, world")
        self.assertEqual(c.request("GET", "/close")[1], b'{"closed":true}')
        self.assertEqual(c.request("GET", "/v1/info")[1], b'{"ok":true}')  # on a new connection
        self.assertEqual(len(FakeService.state["connections"]), 2)
        c.close()

    def test_api_key_from_argument_or_environment(self):
        old = os.environ.get("REATTN_API_KEY")
        try:
            os.environ["REATTN_API_KEY"] = "from-env"
            Client(self.url).request("GET", "/v1/info")
            Client(self.url, api_key="from-arg").request("GET", "/v1/info")
            del os.environ["REATTN_API_KEY"]
            Client(self.url).request("GET", "/v1/info")
        finally:
            if old is not None:
                os.environ["REATTN_API_KEY"] = old
        self.assertEqual(FakeService.state["auth"], ["Bearer from-env", "Bearer from-arg", None])

    def test_unreachable_service(self):
        c = Client("http://127.0.0.1:1", retries=0, timeout=5)
        with self.assertRaises(ReattnError) as e:
            c.info()
        self.assertEqual((e.exception.status, e.exception.code), (0, "connection"))


class Routes(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        key_file = os.path.join(harness.TMP.path, "api.key")
        with open(key_file, "w") as f:
            f.write(API_KEY + "\n")
        cls.server = harness.Server(harness.ARGS, harness.TMP.path, "routes", RECALL, extra=["--api-key-file", key_file])
        cls.c = cls.server.client(api_key=API_KEY)

    @classmethod
    def tearDownClass(cls):
        cls.c.close()
        cls.server.stop()

    def test_info_and_health(self):
        info = self.c.info()
        self.assertEqual(info["ranks"], harness.ARGS.ranks)
        for key in ("layers", "q_heads", "kv_heads", "head_dim"):
            self.assertEqual(info["model"][key], M[key])
        self.assertTrue(self.c.live())
        self.assertTrue(self.c.ready())

    def test_api_key(self):
        with self.assertRaises(ReattnError) as e:
            self.server.client(api_key="wrong").info()
        self.assertEqual((e.exception.status, e.exception.code), (401, "unauthorized"))
        old = os.environ.get("REATTN_API_KEY")
        os.environ["REATTN_API_KEY"] = API_KEY
        try:
            self.assertEqual(self.server.client().info()["ranks"], harness.ARGS.ranks)
        finally:
            if old is None:
                del os.environ["REATTN_API_KEY"]
            else:
                os.environ["REATTN_API_KEY"] = old

    def test_contexts(self):
        a = self.c.create_context()
        b = self.c.create_context()
        self.assertNotEqual(a["id"], b["id"])
        self.assertEqual(self.c.context(a["id"])["tokens"], 0)
        ids = {x["id"] for x in self.c.contexts()}
        self.assertTrue({a["id"], b["id"]} <= ids)
        self.c.delete_context(b["id"])
        self.assertNotIn(b["id"], {x["id"] for x in self.c.contexts()})
        with self.assertRaises(ReattnError) as e:
            self.c.context(b["id"])
        self.assertEqual((e.exception.status, e.exception.code), (404, "not_found"))
        self.assertIn(str(b["id"]), e.exception.message)
        self.c.delete_context(a["id"])

    def test_append_and_query_match_reference(self):
        rng = np.random.default_rng(7)
        ctx = self.c.create_context()["id"]
        k1, v1 = rand_kv(rng, 100, scale=2.0)
        k2, v2 = rand_kv(rng, 60, scale=2.0)
        k2 = k2.astype(np.float16)                        # goes as F16
        r = self.c.append(ctx, k1, v1)
        self.assertEqual(r["tokens"], 100)
        r = self.c.append(ctx, k2, v2.astype(np.float16))
        self.assertEqual(r["tokens"], 160)
        k3, v3 = rand_kv(rng, 40, scale=2.0)
        r = self.c.append(ctx, k3, v3, dtype="BF16")     # rounded to bf16 on the way
        self.assertEqual(r["tokens"], 200)
        k3 = safetensors.bf16_bits_to_float32(safetensors.float32_to_bf16_bits(k3))
        v3 = safetensors.bf16_bits_to_float32(safetensors.float32_to_bf16_bits(v3))
        k = np.concatenate([k1, k2.astype(np.float32), k3], axis=2)
        v = np.concatenate([v1, v2.astype(np.float16).astype(np.float32), v3], axis=2)
        cfg = dict(RECALL, rope_theta=M["rope_theta"])
        for layer, qlen, binary in [(0, 3, True), (1, 1, False), (1, 5, True)]:
            q = (rng.standard_normal((qlen, M["q_heads"], M["head_dim"])) * 2).astype(np.float32)
            got = self.c.query(ctx, layer, q, binary=binary)
            want, ids = reference.reattention(q, k[layer], v[layer], cfg)
            self.assertEqual(list(got.recalled_chunks), ids, "layer %d qlen %d" % (layer, qlen))
            self.assertEqual(got.out.shape, (qlen, M["q_heads"], M["head_dim"]))
            np.testing.assert_allclose(got.out, want, rtol=1e-4, atol=1e-5)
            self.assertGreater(got.timing["total_ms"], 0)
            # The service's time for the request holds the step's.
            self.assertGreaterEqual(got.timing["server_ms"], got.timing["total_ms"])
            self.assertGreater(got.client_ms, 0)
            # A client that polls for its answers reads the same answer.
            with self.server.client(api_key=API_KEY, busy_wait=0.05) as polling:
                again = polling.query(ctx, layer, q, binary=binary)
            self.assertEqual(list(again.recalled_chunks), ids)
            np.testing.assert_array_equal(again.out, got.out)
        self.c.delete_context(ctx)

    def test_out_dtype_into_and_raw_out(self):
        """out_dtype rounds `out` on the service (half the bytes back); `into` receives the
        answer in the caller's buffer (the result's arrays are views of it); raw_out keeps
        `out` as sent. Each gives the same values as the F32 answer, rounded."""
        rng = np.random.default_rng(11)
        ctx = self.c.create_context()["id"]
        k, v = rand_kv(rng, 96, scale=2.0)
        self.c.append(ctx, k, v)
        q = (rng.standard_normal((4, M["q_heads"], M["head_dim"])) * 2).astype(np.float32)
        full = self.c.query(ctx, 1, q)
        bf16 = safetensors.bf16_bits_to_float32(safetensors.float32_to_bf16_bits(full.out))
        got = self.c.query(ctx, 1, q, out_dtype="BF16")
        np.testing.assert_array_equal(got.out, bf16)
        self.assertEqual(got.out.dtype, np.float32)
        self.assertEqual(list(got.recalled_chunks), list(full.recalled_chunks))
        half = self.c.query(ctx, 1, q, out_dtype="F16", raw_out=True)
        self.assertEqual(half.out.dtype, np.float16)
        np.testing.assert_array_equal(half.out, full.out.astype(np.float16))
        buf = np.zeros(1 << 16, np.uint8)
        raw = self.c.query(ctx, 1, q, out_dtype="BF16", into=buf, raw_out=True)
        self.assertIsInstance(raw.out, safetensors.Raw16)
        self.assertTrue(np.shares_memory(raw.out.bits, buf))
        np.testing.assert_array_equal(safetensors.bf16_bits_to_float32(raw.out.bits), bf16)
        small = self.c.query(ctx, 1, q, into=np.zeros(16, np.uint8))  # too small: an answer of its own
        np.testing.assert_array_equal(small.out, full.out)
        # A layer step takes the same: its answer in BF16, received into the buffer.
        kk, vv = rand_kv(rng, 2, scale=2.0)
        qq = (rng.standard_normal((2, M["q_heads"], M["head_dim"])) * 2).astype(np.float32)
        step = self.c.step(ctx, 0, qq, kk[0], vv[0], out_dtype="BF16", into=buf, raw_out=True)
        self.assertTrue(np.shares_memory(step.out.bits, buf))
        self.assertEqual(step.out.shape, (2, M["q_heads"], M["head_dim"]))
        with self.assertRaises(ValueError):
            self.c.query(ctx, 1, q, binary=False, out_dtype="BF16")
        with self.assertRaises(ValueError):
            self.c.query(ctx, 1, q, out_dtype="F64")
        for bad in ("F8", "bf16", ""):              # the service names the parameter; exact spellings
            with self.assertRaises(ReattnError) as e:
                self.c.request("POST", "/v1/contexts/%d/query?layer=1&out_dtype=%s" % (ctx, bad),
                               body=safetensors.dumps({"q": q}), content_type="application/octet-stream")
            self.assertEqual(e.exception.status, 400, bad)
            self.assertIn("out_dtype", e.exception.message)
        # A buffer that cannot take the answer is refused before anything is sent: the step
        # is not applied.
        before = self.c.context(ctx)["layer_tokens"]
        with self.assertRaises(ValueError):
            self.c.step(ctx, 0, qq[:1], kk[0][:, :1], vv[0][:, :1], into=np.zeros(1 << 16, np.uint8)[::2])
        with self.assertRaises(ValueError):
            self.c.step(ctx, 0, qq[:1], kk[0][:, :1], vv[0][:, :1], into=b"read-only")
        self.assertEqual(self.c.context(ctx)["layer_tokens"], before)
        self.c.delete_context(ctx)

    def test_f16_out_saturates(self):
        """Stored values may exceed F16's range; an F16 `out` saturates at +-65504 (binary and
        JSON answers alike) instead of turning into inf or null."""
        ctx = self.c.create_context()["id"]
        k, v = rand_kv(np.random.default_rng(12), 40)
        v[:] = 1e6
        v[:, 1] = -1e6
        self.c.append(ctx, k, v)
        q = np.ones((1, M["q_heads"], M["head_dim"]), np.float32)
        r = self.c.query(ctx, 0, q, out_dtype="F16", raw_out=True)
        self.assertEqual(r.out.dtype, np.float16)
        self.assertTrue(np.isfinite(r.out).all())
        self.assertEqual(float(np.abs(r.out).max()), 65504.0)
        _, data = self.c.request("POST", "/v1/contexts/%d/query?layer=0&out_dtype=F16" % ctx,
                                 body=safetensors.dumps({"q": q}), content_type="application/octet-stream",
                                 accept="application/json")
        out = np.array(json.loads(bytes(data).decode())["out"], dtype=np.float64)
        self.assertTrue(np.isfinite(out).all())
        np.testing.assert_array_equal(out, r.out.astype(np.float64))
        self.c.delete_context(ctx)

    def test_bad_append_raises_and_changes_nothing(self):
        ctx = self.c.create_context()["id"]
        k, v = rand_kv(np.random.default_rng(1), 10)
        with self.assertRaises(ValueError):          # caught in the client: shapes differ
            self.c.append(ctx, k, v[:, :, :5])
        with self.assertRaises(ReattnError) as e:    # the service: 3 KV heads
            bad = np.zeros((M["layers"], 3, 10, M["head_dim"]), np.float32)
            self.c.append(ctx, bad, bad)
        self.assertEqual(e.exception.status, 400)
        self.assertIn("k", e.exception.message)
        with self.assertRaises(ReattnError) as e:    # NaN
            k[0, 0, 0, 0] = np.nan
            self.c.append(ctx, k, v)
        self.assertEqual(e.exception.status, 400)
        self.assertEqual(self.c.context(ctx)["tokens"], 0)
        self.c.delete_context(ctx)

    def test_synthetic_and_metrics(self):
        ctx = self.c.create_context()["id"]
        r = self.c.synthetic(ctx, 5000, seed=3, needles=[1234])
        self.assertEqual(r["tokens"], 5000)
        q = np.random.default_rng(2).standard_normal((1, M["q_heads"], M["head_dim"])).astype(np.float32)
        got = self.c.query(ctx, 0, q, mode="detached")
        self.assertEqual(got.out.shape, (1, M["q_heads"], M["head_dim"]))
        m = self.c.metrics()
        contexts = m["reattn_contexts"][0][1]
        self.assertGreaterEqual(contexts, 1)
        kv = sum(value for _, value in m["reattn_kv_tokens"])
        self.assertGreaterEqual(kv, 5000)
        self.assertTrue(any(lbl.get("route") for lbl, _ in m["reattn_http_requests_total"]))
        self.c.delete_context(ctx)


class Polling(unittest.TestCase):
    """server.busy_poll_us (auto on a GPU backend, off on the CPU one, so forced here): the
    step loop and the HTTP I/O thread poll before they sleep. Answers are the same as without
    polling, keep-alive requests back to back and after a pause are served, and the server
    stops when asked."""

    def test_polling_server_answers_alike(self):
        rng = np.random.default_rng(5)
        k, v = rand_kv(rng, 64, scale=2.0)
        q = (rng.standard_normal((3, M["q_heads"], M["head_dim"])) * 2).astype(np.float32)
        answers = []
        for name, poll in (("poll_off", 0), ("poll_on", 2000)):
            server = harness.Server(harness.ARGS, harness.TMP.path, name, RECALL,
                                    server={"busy_poll_us": poll, "http_threads": 1})
            try:
                with server.client() as c:
                    ctx = c.create_context()["id"]
                    c.append(ctx, k, v)
                    got = [c.query(ctx, 1, q).out for _ in range(3)]
                    time.sleep(0.05)                  # past the polling window: asleep, then woken
                    got.append(c.query(ctx, 1, q).out)
                    step = c.step(ctx, 0, q[:1], k[0][:, :1], v[0][:, :1])
                    got.append(step.out)
                    answers.append(got)
                # SIGTERM: drained and ended, polling threads included.
                server.svc.terminate_rank0()
                self.assertEqual(server.svc.wait(30), 0, "%s: the job ends on SIGTERM" % name)
            finally:
                server.stop()
        for off, on in zip(*answers):
            np.testing.assert_array_equal(off, on)


if __name__ == "__main__":
    sys.exit(harness.main([Codec, Transport, Routes, Polling]))
