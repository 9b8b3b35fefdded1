#!/usr/bin/env python3
"""A tiny numpy decoder runs forward passes (chunked prefill, then one-token decode steps)
with its attention going through reattn's per-layer step (reattn_client.Client.step) against
reattn-server under mpirun on the CPU, and its logits are compared with numpy references:

- recall large enough to keep every chunk: the logits equal the same model with plain causal
  RoPE attention over the whole sequence at real positions, run in one pass;
- a small recall: the logits and the recalled chunks of every step equal a numpy ReAttention
  (DESIGN.md section 2) applied per layer with the same step schedule.

Skips (exit 77) when the server has no /step route yet."""

import sys
import unittest

import numpy as np

import harness
import reference
from tiny_decoder import ReferenceAttention, ServiceAttention, TinyDecoder, run_schedule
from reattn_client import ReattnError

M = harness.TINY_MODEL
# Every chunk recalled: 4 + 64*8 + 32 + 8 = 556 <= scope 1024.
FULL = {"sink_tokens": 4, "local_window": 32, "chunk_tokens": 8, "top_k": 64, "max_recall_chunks": 64,
        "final_attention": "gather"}
# A small recall: 2 chunks per (row, head), at most 3 per step.
SMALL = {"sink_tokens": 4, "local_window": 32, "chunk_tokens": 8, "top_k": 2, "max_recall_chunks": 3,
         "final_attention": "partial"}
RTOL, ATOL = 1e-4, 1e-4  # fp32 attention in the service vs float64 references, two layers deep


def ref_cfg(reattention):
    cfg = dict(reattention)
    cfg["rope_theta"] = M["rope_theta"]
    return cfg


def assert_close(test, got, want, what):
    err = np.abs(got - want)
    bound = ATOL + RTOL * np.abs(want)
    worst = np.unravel_index(np.argmax(err - bound), err.shape)
    test.assertTrue(np.all(err <= bound), "%s: max |diff| %.3g at %s (got %.6g, want %.6g)"
                    % (what, err.max(), worst, got[worst], want[worst]))


class References(unittest.TestCase):
    """The references agree with each other where DESIGN section 2 says they must (no server):
    full-recall ReAttention in prefill steps = causal attention in one pass; a small recall
    differs."""

    def test_full_recall_reattention_is_causal_attention(self):
        rng = np.random.default_rng(1)
        model = TinyDecoder(M["layers"], M["q_heads"], M["kv_heads"], M["head_dim"], seed=2, qk_scale=2.0)
        tokens = list(rng.integers(0, 97, 120))
        steps = [32, 32, 32, 24]
        one_pass = model.forward(tokens, ReferenceAttention(M["layers"], "causal", ref_cfg(FULL)))
        chunked = run_schedule(model, tokens, ReferenceAttention(M["layers"], "causal", ref_cfg(FULL)), steps, [])
        full = ReferenceAttention(M["layers"], "reattention", ref_cfg(FULL))
        by_recall = run_schedule(model, tokens, full, steps, [])
        np.testing.assert_allclose(chunked, one_pass, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(by_recall, one_pass, rtol=1e-9, atol=1e-9)
        self.assertTrue(any(ids for _, ids in full.recalled), "a mid region existed")
        small = run_schedule(model, tokens, ReferenceAttention(M["layers"], "reattention", ref_cfg(SMALL)), steps, [])
        self.assertGreater(np.abs(small - one_pass).max(), 1e-2)


class StepModel(unittest.TestCase):
    reattention = None

    @classmethod
    def setUpClass(cls):
        cls.server, cls.client = harness.step_server(cls.__name__, cls.reattention)

    @classmethod
    def tearDownClass(cls):
        cls.client.close()
        cls.server.stop()

    def model(self, seed):
        return TinyDecoder(M["layers"], M["q_heads"], M["kv_heads"], M["head_dim"], seed=seed, qk_scale=2.0)

    def case(self, seed, steps, decode_tokens):
        """A model and random tokens: a prompt of sum(steps) tokens and decode_tokens more."""
        rng = np.random.default_rng(seed)
        return (self.model(seed=seed + 1), list(rng.integers(0, 97, sum(steps))),
                list(rng.integers(0, 97, decode_tokens)))

    def through_service(self, model, prompt, steps, decode, json_decode=True):
        ctx = self.client.create_context()["id"]
        attn = ServiceAttention(self.client, ctx)
        logits = [run_schedule(model, prompt, attn, steps, [])]
        attn.binary = not json_decode  # decode steps with JSON bodies both ways
        logits.append(run_schedule(model, [], attn, [], decode))
        info = self.client.context(ctx)
        n = len(prompt) + len(decode)
        self.assertEqual(info["tokens"], n, "context tokens after the passes: %s" % info)
        self.assertEqual(info["layer_tokens"], [n] * M["layers"], "every layer's length: %s" % info)
        for r in attn.results:
            self.assertEqual(r.out.dtype, np.float32)
            self.assertIn("total_ms", r.timing)
        return np.concatenate(logits, axis=0), attn, ctx


class FullRecall(StepModel):
    reattention = FULL

    def test_logits_equal_causal_attention(self):
        steps = [32, 32, 32, 30, 24]
        model, prompt, decode = self.case(11, steps, 6)
        got, _, ctx = self.through_service(model, prompt, steps, decode)
        # The whole sequence in one pass, causal RoPE attention at real positions.
        want = model.forward(prompt + decode, ReferenceAttention(M["layers"], "causal", ref_cfg(FULL)))
        assert_close(self, got, want, "logits, full recall vs causal attention")
        self.client.delete_context(ctx)

    def test_out_of_order_steps_are_refused_and_change_nothing(self):
        model = self.model(seed=6)
        ctx = self.client.create_context()["id"]
        h = model.embed[[1, 2, 3]]
        b = model.blocks[0]
        q = (h @ b["wq"]).reshape(3, M["q_heads"], M["head_dim"]).astype(np.float32)
        k = (h @ b["wk"]).reshape(3, M["kv_heads"], M["head_dim"]).transpose(1, 0, 2).astype(np.float32).copy()
        v = k * 0.5
        # Layer 1 before layer 0.
        with self.assertRaises(ReattnError) as e:
            self.client.step(ctx, 1, q, k, v)
        self.assertEqual((e.exception.status, e.exception.code), (409, "out_of_order"), str(e.exception))
        self.assertEqual(self.client.context(ctx)["layer_tokens"], [0, 0])
        self.client.step(ctx, 0, q, k, v)
        # Layer 0 again: it already holds 3 more tokens than layer 1.
        with self.assertRaises(ReattnError) as e:
            self.client.step(ctx, 0, q, k, v)
        self.assertEqual((e.exception.status, e.exception.code), (409, "out_of_order"), str(e.exception))
        # Layer 1 with a different qlen than layer 0 got.
        with self.assertRaises(ReattnError) as e:
            self.client.step(ctx, 1, q[:2], k[:, :2], v[:, :2])
        self.assertIn(e.exception.status, (400, 409), str(e.exception))
        info = self.client.context(ctx)
        self.assertEqual((info["layer_tokens"], info["tokens"]), ([3, 0], 0), str(info))
        # The refused steps changed nothing: the pass completes and the context is usable.
        r = self.client.step(ctx, 1, q, k, v)
        self.assertEqual(r.out.shape, (3, M["q_heads"], M["head_dim"]))
        info = self.client.context(ctx)
        self.assertEqual((info["layer_tokens"], info["tokens"]), ([3, 3], 3), str(info))
        self.client.delete_context(ctx)

    def test_bad_step_changes_nothing(self):
        ctx = self.client.create_context()["id"]
        rng = np.random.default_rng(3)
        q = rng.standard_normal((40, M["q_heads"], M["head_dim"])).astype(np.float32)
        k = rng.standard_normal((M["kv_heads"], 40, M["head_dim"])).astype(np.float32)
        with self.assertRaises(ReattnError) as e:   # qlen 40 > local_window 32
            self.client.step(ctx, 0, q, k, k)
        self.assertEqual(e.exception.status, 400, str(e.exception))
        with self.assertRaises(ReattnError) as e:   # k with 3 KV heads
            self.client.step(ctx, 0, q[:4], rng.standard_normal((3, 4, M["head_dim"])), k[:, :4])
        self.assertEqual(e.exception.status, 400, str(e.exception))
        with self.assertRaises(ReattnError) as e:   # NaN in q
            bad = q[:4].copy()
            bad[1, 2, 3] = np.nan
            self.client.step(ctx, 0, bad, k[:, :4], k[:, :4])
        self.assertEqual(e.exception.status, 400, str(e.exception))
        with self.assertRaises(ReattnError) as e:   # layer out of range
            self.client.step(ctx, M["layers"], q[:4], k[:, :4], k[:, :4])
        self.assertEqual(e.exception.status, 400, str(e.exception))
        with self.assertRaises(ReattnError) as e:   # unknown context
            self.client.step(ctx + 1000, 0, q[:4], k[:, :4], k[:, :4])
        self.assertEqual(e.exception.status, 404, str(e.exception))
        self.assertEqual(self.client.context(ctx)["layer_tokens"], [0, 0])
        self.client.delete_context(ctx)


class SmallRecall(StepModel):
    reattention = SMALL

    def test_logits_equal_numpy_reattention(self):
        steps = [32, 32, 32, 32, 32, 10]
        model, prompt, decode = self.case(21, steps, 5)
        got, attn, ctx = self.through_service(model, prompt, steps, decode)
        ref = ReferenceAttention(M["layers"], "reattention", ref_cfg(SMALL))
        want = run_schedule(model, prompt, ref, steps, decode)
        self.assertEqual(attn.recalled, ref.recalled, "recalled chunks per (step, layer)")
        assert_close(self, got, want, "logits, small recall vs numpy ReAttention")
        # The recall left chunks out, so the check above is not plain causal attention again.
        s, c = SMALL["sink_tokens"], SMALL["chunk_tokens"]
        n = len(prompt) + len(decode)
        mid_chunks = (reference.regions(n, s, SMALL["local_window"], c)[1] - s) // c
        self.assertLessEqual(len(attn.recalled[-1][1]), SMALL["max_recall_chunks"])
        self.assertLess(len(attn.recalled[-1][1]), mid_chunks)
        causal = model.forward(prompt + decode, ReferenceAttention(M["layers"], "causal", ref_cfg(SMALL)))
        self.assertGreater(np.abs(got[-len(decode):] - causal[-len(decode):]).max(), 1e-2,
                           "small recall should change the decode logits")
        self.client.delete_context(ctx)


if __name__ == "__main__":
    sys.exit(harness.main([References, FullRecall, SmallRecall]))
