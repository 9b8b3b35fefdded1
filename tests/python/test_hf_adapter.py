#!/usr/bin/env python3
"""reattn_client.hf.attach on tiny random-weight transformers models (Llama, Qwen2, Mistral,
built from a config, fp32) against reattn-server under mpirun on the CPU with a recall that
keeps every chunk: the logits of a prompt run in steps through the service equal the model's
own eager attention over the whole prompt, and greedy model.generate() gives the same tokens.
In bf16 (parameters cast, RoPE buffers left fp32 as from_pretrained(dtype=...) leaves them),
the adapter's logits are as close to an fp32 run as the model's own bf16 eager run is.
Skips (exit 77) without torch or transformers, or while the server has no /step route."""

import sys
import unittest

import numpy as np

import harness

try:
    import torch
    import transformers
except ImportError as e:  # CI has neither
    torch = transformers = None
    MISSING = str(e)

M = harness.TINY_MODEL
FULL = {"sink_tokens": 4, "local_window": 32, "chunk_tokens": 8, "top_k": 64, "max_recall_chunks": 64,
        "final_attention": "gather"}


def tiny_config(kind):
    common = dict(vocab_size=101, hidden_size=M["q_heads"] * M["head_dim"], intermediate_size=96,
                  num_hidden_layers=M["layers"], num_attention_heads=M["q_heads"], num_key_value_heads=M["kv_heads"],
                  head_dim=M["head_dim"], max_position_embeddings=M["scope"], rms_norm_eps=1e-6,
                  tie_word_embeddings=False, attn_implementation="eager")
    cls = {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "mistral": "MistralConfig"}[kind]
    config = getattr(transformers, cls)(rope_theta=M["rope_theta"], **common)
    rope = getattr(config, "rope_parameters", None)
    if isinstance(rope, dict):
        rope["rope_theta"] = M["rope_theta"]
    if kind == "mistral":
        config.sliding_window = None
    return config


def tiny_model(kind, seed):
    torch.manual_seed(seed)
    config = tiny_config(kind)
    model = getattr(transformers, {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                                   "mistral": "MistralForCausalLM"}[kind])(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(4.0)  # sharper attention, so a wrong key shows in the logits
    return model.eval().float()


class TorchTensors(unittest.TestCase):
    """torch tensors go on the wire in their own precision; bf16 by its raw bits."""

    def setUp(self):
        if torch is None:
            self.skipTest("torch not installed (%s)" % MISSING)

    def test_wire_dtypes(self):
        from reattn_client import safetensors
        from reattn_client.tensors import to_wire
        x = torch.randn(3, 4, 5)
        for t, want in [(x, "F32"), (x.double(), "F32"), (x.half(), "F16"), (x.bfloat16(), "BF16")]:
            arr, dtype = to_wire(t, "x")
            self.assertEqual(dtype, want, str(t.dtype))
            back = safetensors.loads(safetensors.dumps({"x": arr}))["x"]
            np.testing.assert_array_equal(back.astype(np.float32), t.float().numpy())
        bits = safetensors.float32_to_bf16_bits(x.numpy())
        np.testing.assert_array_equal(bits, x.bfloat16().view(torch.int16).numpy().view(np.uint16))
        with self.assertRaises(TypeError):
            to_wire(torch.ones(2, dtype=torch.int64), "x")


class Adapter(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        if torch is None:
            raise unittest.SkipTest("torch/transformers not installed (%s); the adapter tests need both" % MISSING)
        from reattn_client import hf  # noqa: F401  (imports torch lazily)
        cls.server, cls.client = harness.step_server("adapter", FULL)

    @classmethod
    def tearDownClass(cls):
        cls.client.close()
        cls.server.stop()

    def check_kind(self, kind):
        from reattn_client import hf
        model = tiny_model(kind, seed=3)
        ids = torch.randint(0, 101, (1, 100), generator=torch.Generator().manual_seed(5))
        with torch.no_grad():
            want = model(ids).logits
            want_gen = model.generate(ids[:, :70], max_new_tokens=8, do_sample=False)
        ctx = self.client.create_context()["id"]
        session = hf.attach(model, self.client, ctx)
        try:
            with torch.no_grad():
                got = model(ids).logits                          # 100 tokens: steps of 32, 32, 32, 4
            self.assertEqual(got.shape, want.shape)
            err = (got - want).abs().max().item()
            self.assertLess(err, 2e-4 * max(1.0, want.abs().max().item()), "%s logits max |diff| %g" % (kind, err))
            self.assertEqual(self.client.context(ctx)["tokens"], 100)
            self.assertEqual(session.steps, 4 * M["layers"])
            ctx2 = self.client.create_context()["id"]
            session.context_id = ctx2
            with torch.no_grad():
                got_gen = model.generate(ids[:, :70], max_new_tokens=8, do_sample=False)
            self.assertEqual(got_gen.tolist(), want_gen.tolist(), kind)
            # The prompt and every generated token but the last went through the service.
            self.assertEqual(self.client.context(ctx2)["tokens"], 70 + 8 - 1)
            self.client.delete_context(ctx2)
        finally:
            session.detach()
            self.client.delete_context(ctx)
        with torch.no_grad():
            self.assertTrue(torch.equal(model(ids).logits, want), "detach() restores the model's own attention")

    def test_llama(self):
        self.check_kind("llama")

    def test_qwen2(self):
        self.check_kind("qwen2")

    def test_mistral(self):
        self.check_kind("mistral")

    def through_service(self, model, ids):
        """The model's float logits for `ids` with its attention through a new context (then
        detached and deleted), and the adapter's session."""
        from reattn_client import hf
        ctx = self.client.create_context()["id"]
        session = hf.attach(model, self.client, ctx)
        try:
            with torch.no_grad():
                return model(ids).logits.float(), session
        finally:
            session.detach()
            self.client.delete_context(ctx)

    def test_bf16_llama(self):
        fp32 = tiny_model("llama", seed=3)
        model = tiny_model("llama", seed=3)
        for p in model.parameters():
            p.data = p.data.bfloat16()
        self.assertEqual(model.model.rotary_emb.inv_freq.dtype, torch.float32)
        ids = torch.randint(0, 101, (1, 100), generator=torch.Generator().manual_seed(6))
        with torch.no_grad():
            truth = fp32(ids).logits
            own = model(ids).logits.float()
        got, _ = self.through_service(model, ids)
        err_own, err = (own - truth).abs().max().item(), (got - truth).abs().max().item()
        self.assertGreater(err_own, 0.0, "the bf16 run differs from fp32")
        self.assertLessEqual(err, 2.0 * err_own + 1e-3 * truth.abs().max().item(),
                             "reattn bf16 max |err| %g vs the model's own bf16 eager %g" % (err, err_own))

        def top1(a):
            return (a.argmax(-1) == truth.argmax(-1)).float().mean().item()
        self.assertGreaterEqual(top1(got), top1(own) - 0.05)

    def test_gpu_pinned_path(self):
        """On a GPU the adapter copies q/k/v into pinned request memory and receives `out`
        (in the model's dtype) into pinned memory: fp32 logits equal the model's own, bf16
        ones are as close to fp32 as the model's own bf16 run."""
        if not torch.cuda.is_available():
            self.skipTest("no CUDA device")
        # The last GPU: with two, the model is not on the current device (cuda:0), so its copies
        # run on another device's stream than the current one.
        device = "cuda:%d" % (torch.cuda.device_count() - 1)
        ids = torch.randint(0, 101, (1, 100), generator=torch.Generator().manual_seed(7)).to(device)
        truth = None
        for dtype in (torch.float32, torch.bfloat16):
            model = tiny_model("llama", seed=3).to(device, dtype)
            with torch.no_grad():
                own = model(ids).logits.float()
            truth = own if truth is None else truth
            got, session = self.through_service(model, ids)
            self.assertIsNotNone(session._staging, "the pinned path ran")
            self.assertEqual(session._staging.out, dtype)
            err, scale = (got - truth).abs().max().item(), max(1.0, truth.abs().max().item())
            if dtype == torch.float32:
                self.assertLess(err, 2e-4 * scale, "fp32 logits max |diff| %g" % err)
            else:
                err_own = (own - truth).abs().max().item()
                self.assertLessEqual(err, 2.0 * err_own + 1e-3 * scale, "bf16 %g vs own %g" % (err, err_own))

    def test_shape_mismatch_is_refused(self):
        from reattn_client import hf
        config = tiny_config("llama")
        config.num_key_value_heads = 4
        model = transformers.LlamaForCausalLM(config)
        with self.assertRaises(ValueError) as e:
            hf.attach(model, self.client, 1)
        self.assertIn("kv_heads", str(e.exception))


if __name__ == "__main__":
    sys.exit(harness.main([TorchTensors, Adapter]))
