#!/usr/bin/env python3
"""End-to-end tests of reattn-run under mpirun.

  test_run.py --run BIN --mpirun MPIRUN --config tiny.yaml parity
      the same chunk ids and outputs (1e-5 relative) at 1 to 4 ranks, both strategies, both
      owners, for safetensors inputs in F32/F16/BF16 with planted needles and for synthetic ones.
  test_run.py ... parity-span
      the same with --recall span: the same recalled spans and outputs at 1 to 4 ranks.
  test_run.py ... bad CASE
      one bad input: reattn-run must exit non-zero within the timeout with one error line that
      names the problem.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import safetensors_io as st  # noqa: E402

TINY = dict(layers=2, q_heads=4, kv_heads=2, head_dim=16)
ENV = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
           OMPI_MCA_rmaps_base_oversubscribe="1")


def launch(args, np, extra, timeout=120):
    cmd = [args.mpirun, "--oversubscribe", "-np", str(np), args.run] + extra
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=ENV)


def run_ok(args, np, extra):
    proc = launch(args, np, extra)
    if proc.returncode != 0:
        raise AssertionError(f"np={np} {' '.join(extra)} failed ({proc.returncode}):\n{proc.stderr}")
    return json.loads(proc.stdout)


def flat(x):
    if isinstance(x, list):
        for y in x:
            yield from flat(y)
    else:
        yield x


def rel_diff(a, b):
    fa, fb = list(flat(a)), list(flat(b))
    assert len(fa) == len(fb), "output shapes differ"
    scale = max(abs(x) for x in fb) or 1.0
    return max(abs(x - y) for x, y in zip(fa, fb)) / scale


def recalled(got):
    """Chunk ids, or span recall's [first, end) token ranges."""
    return got["recalled_spans"] if "recalled_spans" in got else got["recalled_chunks"]


def check_all_agree(args, base_args, label, expect_chunks=None, expect_tokens=()):
    reference = None
    for np in (1, 2, 3, 4):
        for strategy in ("gather", "partial"):
            for owner in sorted({0, np - 1}):
                got = run_ok(args, np, base_args + ["--final-attention", strategy, "--owner-rank", str(owner)])
                if reference is None:
                    reference = got
                    if expect_chunks is not None:
                        missing = [c for c in expect_chunks if c not in got["recalled_chunks"]]
                        assert not missing, f"{label}: needle chunks {missing} not recalled: {got['recalled_chunks']}"
                    for t in expect_tokens:  # span recall: the needle and its neighbours on both sides
                        for u in (t - 1, t, t + 1):
                            assert any(a <= u < b for a, b in got["recalled_spans"]), f"{label}: token {u} not recalled"
                    continue
                where = f"{label} np={np} {strategy} owner={owner}"
                assert recalled(got) == recalled(reference), \
                    f"{where}: recalled {recalled(got)} != {recalled(reference)}"
                diff = rel_diff(got["out"], reference["out"])
                assert diff <= 1e-5, f"{where}: out differs by {diff:.3g} relative"
    print(f"ok  {label}: {recalled(reference)}")


def parity(args):
    tmp = tempfile.mkdtemp(prefix="reattn-parity-")
    dirs = st.unit_directions(TINY["kv_heads"], TINY["head_dim"], 5)
    for dtype, tokens, qlen, mode in (("F32", 1001, 3, "tail"), ("F16", 517, 1, "tail"), ("BF16", 900, 5, "detached")):
        needles = [150, tokens * 7 // 10]
        chunks = [(t - 4) // 8 for t in needles]
        kv, q = os.path.join(tmp, f"kv_{dtype}.safetensors"), os.path.join(tmp, f"q_{dtype}.safetensors")
        st.make_kv(kv, TINY["layers"], TINY["kv_heads"], tokens, TINY["head_dim"], dtype, seed=tokens,
                   needles=needles, needle_dir=dirs)
        st.make_q(q, qlen, TINY["q_heads"], TINY["head_dim"], dtype, seed=qlen, direction=dirs, group=2)
        check_all_agree(args, ["--config", args.config, "--kv", kv, "--q", q, "--layer", "1", "--mode", mode],
                        f"{dtype} n={tokens} qlen={qlen} {mode}", chunks)
    check_all_agree(args, ["--config", args.config, "--synthetic-tokens", "3001", "--seed", "9", "--needles",
                           "100,2500", "--qlen", "4", "--layer", "0"], "synthetic n=3001",
                    [(100 - 4) // 8, (2500 - 4) // 8])


def parity_span(args):
    tmp = tempfile.mkdtemp(prefix="reattn-parity-span-")
    dirs = st.unit_directions(TINY["kv_heads"], TINY["head_dim"], 5)
    tokens = 1001
    needles = [4 + 8 * 20 + 7, 700]  # the first at a block's last token: its span crosses blocks and ranks
    kv, q = os.path.join(tmp, "kv.safetensors"), os.path.join(tmp, "q.safetensors")
    st.make_kv(kv, TINY["layers"], TINY["kv_heads"], tokens, TINY["head_dim"], "F32", seed=tokens, needles=needles,
               needle_dir=dirs)
    st.make_q(q, 3, TINY["q_heads"], TINY["head_dim"], "F32", seed=3, direction=dirs, group=2)
    check_all_agree(args, ["--config", args.config, "--recall", "span", "--kv", kv, "--q", q, "--layer", "1"],
                    f"span F32 n={tokens} qlen=3", expect_tokens=needles)
    check_all_agree(args, ["--config", args.config, "--recall", "span", "--synthetic-tokens", "3001", "--seed", "9",
                           "--needles", "100,2500", "--qlen", "4", "--layer", "0", "--mode", "detached"],
                    "span synthetic n=3001 detached", expect_tokens=[100, 2500])


BAD_CASES = {}


def bad_case(keyword):
    def register(fn):
        BAD_CASES[fn.__name__] = (fn, keyword)
        return fn
    return register


def good_kv(tmp, **kw):
    path = os.path.join(tmp, "kv.safetensors")
    st.make_kv(path, TINY["layers"], TINY["kv_heads"], kw.get("tokens", 200), TINY["head_dim"])
    return path


def good_q(tmp, qlen=2):
    path = os.path.join(tmp, "q.safetensors")
    st.make_q(path, qlen, TINY["q_heads"], TINY["head_dim"])
    return path


@bad_case("cannot open")
def missing_kv_file(tmp, config):
    return ["--config", config, "--kv", os.path.join(tmp, "absent.safetensors"), "--q", good_q(tmp), "--layer", "0"]


@bad_case("header")
def corrupt_kv_file(tmp, config):
    path = os.path.join(tmp, "kv.safetensors")
    with open(path, "wb") as f:
        f.write(b"\xff" * 8 + b"this is not a safetensors file")
    return ["--config", config, "--kv", path, "--q", good_q(tmp), "--layer", "0"]


@bad_case("past the data section")
def truncated_kv_file(tmp, config):
    path = good_kv(tmp)
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) - 100])
    return ["--config", config, "--kv", path, "--q", good_q(tmp), "--layer", "0"]


@bad_case("tensor 'k' not found")
def wrong_tensor_names(tmp, config):
    path = os.path.join(tmp, "kv.safetensors")
    st.make_kv(path, 2, 2, 100, 16, names=("key", "value"))
    return ["--config", config, "--kv", path, "--q", good_q(tmp), "--layer", "0"]


@bad_case("does not match")
def kv_shape_mismatch(tmp, config):
    path = os.path.join(tmp, "kv.safetensors")
    st.make_kv(path, 2, 3, 100, 16)
    return ["--config", config, "--kv", path, "--q", good_q(tmp), "--layer", "0"]


@bad_case("tensor 'q': shape")
def q_shape_mismatch(tmp, config):
    path = os.path.join(tmp, "q.safetensors")
    st.make_q(path, 2, 4, 8)
    return ["--config", config, "--kv", good_kv(tmp), "--q", path, "--layer", "0"]


@bad_case("non-finite")
def nan_in_q(tmp, config):
    path = os.path.join(tmp, "q.safetensors")
    st.write(path, [("q", "F32", (1, 4, 16), [float("nan")] + [0.5] * 63)])
    return ["--config", config, "--kv", good_kv(tmp), "--q", path, "--layer", "0"]


@bad_case("non-finite")
def inf_in_kv(tmp, config):
    path = os.path.join(tmp, "kv.safetensors")
    n = 2 * 2 * 50 * 16
    st.write(path, [("k", "F32", (2, 2, 50, 16), [0.1] * (n - 1) + [float("inf")]),
                    ("v", "F32", (2, 2, 50, 16), [0.1] * n)])
    return ["--config", config, "--kv", path, "--q", good_q(tmp), "--layer", "0"]


@bad_case("unknown dtype 'I64'")
def unknown_dtype(tmp, config):
    path = os.path.join(tmp, "kv.safetensors")
    n = 2 * 2 * 50 * 16
    st.write(path, [("k", "F32", (2, 2, 50, 16), [0.1] * n), ("v", "F32", (2, 2, 50, 16), [0.1] * n)],
             header_override=lambda h: h["k"].update(dtype="I64"))
    return ["--config", config, "--kv", path, "--q", good_q(tmp), "--layer", "0"]


@bad_case("--layer: 2 is outside [0, 2)")
def layer_out_of_range(tmp, config):
    return ["--config", config, "--kv", good_kv(tmp), "--q", good_q(tmp), "--layer", "2"]


@bad_case("exceeds reattention.local_window 32")
def qlen_above_window(tmp, config):
    return ["--config", config, "--kv", good_kv(tmp), "--q", good_q(tmp, qlen=33), "--layer", "0"]


def write_config(tmp, text):
    path = os.path.join(tmp, "bad.yaml")
    with open(path, "w") as f:
        f.write(text)
    return path


@bad_case("does not divide")
def bad_config_kv_heads(tmp, config):
    path = write_config(tmp, "model: {layers: 2, q_heads: 4, kv_heads: 3, head_dim: 16, scope: 1024}\n")
    return ["--config", path, "--synthetic-tokens", "100", "--layer", "0"]


@bad_case("exceeds model.scope")
def bad_config_scope(tmp, config):
    path = write_config(tmp, "model: {layers: 2, q_heads: 4, kv_heads: 2, head_dim: 16, scope: 90}\n"
                             "reattention: {sink_tokens: 4, local_window: 32, chunk_tokens: 8, top_k: 2,"
                             " max_recall_chunks: 6}\n")
    return ["--config", path, "--synthetic-tokens", "100", "--layer", "0"]


@bad_case("unknown key")
def bad_config_unknown_key(tmp, config):
    path = write_config(tmp, "model: {layers: 2, q_heads: 4, kv_heads: 2, head_dim: 16, scope: 1024}\n"
                             "reattention: {topk: 2}\n")
    return ["--config", path, "--synthetic-tokens", "100", "--layer", "0"]


@bad_case("above the f16 storage limit 65504")
def value_above_f16_limit(tmp, config):
    path = write_config(tmp, "model: {layers: 2, q_heads: 4, kv_heads: 2, head_dim: 16, scope: 1024}\n"
                             "reattention: {sink_tokens: 4, local_window: 32, chunk_tokens: 8, top_k: 2,"
                             " max_recall_chunks: 6}\nbackend: {kind: cuda, storage_dtype: f16}\n")
    kv = os.path.join(tmp, "kv.safetensors")
    n = 2 * 2 * 50 * 16
    st.write(kv, [("k", "F32", (2, 2, 50, 16), [0.1] * (n - 1) + [70000.0]), ("v", "F32", (2, 2, 50, 16), [0.1] * n)])
    return ["--config", path, "--kv", kv, "--q", good_q(tmp), "--layer", "0"]


@bad_case("needles[1]")
def needle_outside_context(tmp, config):
    return ["--config", config, "--synthetic-tokens", "100", "--needles", "5,100", "--layer", "0"]


def bad(args, case):
    fn, keyword = BAD_CASES[case]
    tmp = tempfile.mkdtemp(prefix="reattn-bad-")
    extra = fn(tmp, args.config)
    proc = launch(args, 2, extra, timeout=60)
    ours = [line for line in proc.stderr.splitlines() if line.startswith("reattn-run")]
    assert proc.returncode != 0, f"{case}: exit code 0 (stdout: {proc.stdout[:200]})"
    assert proc.stdout.strip() == "", f"{case}: printed a result: {proc.stdout[:200]}"
    assert len(ours) == 1, f"{case}: expected one error line, got: {proc.stderr}"
    assert ours[0].startswith("reattn-run: error: "), f"{case}: {ours[0]}"
    assert keyword in ours[0], f"{case}: '{keyword}' not in: {ours[0]}"
    print(f"ok  {case}: {ours[0]}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True)
    p.add_argument("--mpirun", required=True)
    p.add_argument("--config", required=True)
    sub = p.add_subparsers(dest="what", required=True)
    sub.add_parser("parity")
    sub.add_parser("parity-span")
    b = sub.add_parser("bad")
    b.add_argument("case", choices=sorted(BAD_CASES))
    sub.add_parser("list-bad")
    args = p.parse_args()
    if args.what == "parity":
        parity(args)
    elif args.what == "parity-span":
        parity_span(args)
    elif args.what == "bad":
        bad(args, args.case)
    else:
        print("\n".join(sorted(BAD_CASES)))


if __name__ == "__main__":
    main()
