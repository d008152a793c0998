"""Eval driver: artifact loading and refusal, kernel vs reference parity, deadline fallback,
warm-up on synthetic tokens, CLI report, TTT vs no-TTT, and the GPU-lane parity checks."""
import json
import math
import os

import numpy as np
import pytest
import torch

from train import eval as ev
from train.bpb import ByteLUT
from train.doc_queue import BatchClaimer
from train.eval_fixtures import doc_stream, tiny_model
from train.adapters import DocLoRA
from train.forward import rows_nll
from train.rows import build_rows, split_docs
from train.ttt_config import TTTConfig
from train.warmup import warmup

SP1024 = "fineweb_1024_bpe.model"
SHARD = os.path.join("fineweb_sample", "fineweb_sample200_sp1024_000000.bin")
CFG = TTTConfig(rank=4, chunk=32, window=96, batch_size=4)


pytestmark = pytest.mark.usefixtures("one_thread")

def _tiny_artifact(tmp_path_factory, vocab_size):
    from train.artifact import save_artifact

    m = tiny_model(seed=7, num_layers=1, model_dim=32, num_heads=2, num_kv_heads=1, vocab_size=vocab_size)
    path = str(tmp_path_factory.mktemp("art") / f"tiny{vocab_size}.ptz")
    save_artifact(m, path, code_paths=[], warn=False)
    return path


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    """The sp1024 vocabulary (the CLI tests read FineWeb tokens with it)."""
    return _tiny_artifact(tmp_path_factory, 1024)


# The interpreted kernel-path tests' vocabulary: the head LoRA's N-tiles (BN=32) and its backward's N loop
# scale with it; 300 = 9 full tiles + a masked 12-column tail (1024 cost 21 s per TTT evaluate, 300 15 s).
SMALL_V = 300


@pytest.fixture(scope="module")
def kernel_artifact(tmp_path_factory):
    return _tiny_artifact(tmp_path_factory, SMALL_V)


@pytest.fixture(scope="module")
def small_lut():
    from train.eval_fixtures import synthetic_lut

    return synthetic_lut(SMALL_V)


# One eager TTT evaluate on the kernel path, shared by the parity test and the compile test (each interpreted
# evaluate is most of a test's time on 2 cores). 3 rows -> 2 -> 1 in the first batch (9 ends after one chunk,
# 23 after two), a 2-row second batch. int6_linear.LARGE_M is lowered to 150 so that the steps cross it both
# ways (2 rows x 64 padded positions = 128 below, 3 rows = 192 above): the public int6_linear's aten large-M
# branch and the fused kernels both run.
LARGE_M_DOCS = [40, 23, 9, 31, 5]
LARGE_M_CFG = TTTConfig(rank=2, chunk=16, window=32, batch_size=3)


def _patch_large_m(mp, calls=None):
    import pgolf_kernels.int6_linear as i6

    mp.setattr(i6, "LARGE_M", 150)
    if calls is None:
        return
    orig_large, orig_op = i6._large_m_linear, i6._int6_linear_op

    def large(*a):
        calls["large"] += 1
        return orig_large(*a)

    def op(*a):
        calls["op"] += 1
        return orig_op(*a)

    mp.setattr(i6, "_large_m_linear", large)
    mp.setattr(i6, "_int6_linear_op", op)


@pytest.fixture(scope="module")
def large_m_run(kernel_artifact, small_lut):
    calls = {"large": 0, "op": 0}
    stream = doc_stream(LARGE_M_DOCS, vocab_size=SMALL_V, seed=3)
    with pytest.MonkeyPatch.context() as mp:
        _patch_large_m(mp, calls)
        mk, info = ev.load_model(kernel_artifact, device="cpu")
        eager = ev.evaluate(mk, stream, small_lut, mode="ttt", cfg=LARGE_M_CFG, backend="kernel")
    return dict(model=mk, info=info, eager=eager, calls=calls, stream=stream)


# ------------------------------------------------------------------------------ loading
def test_load_refuses_bad_artifacts(artifact, tmp_path):
    blob = open(artifact, "rb").read()
    with pytest.raises(ev.ArtifactLoadError, match="not found"):
        ev.load_model(str(tmp_path / "missing.ptz"), device="cpu")
    empty = tmp_path / "empty.ptz"
    empty.write_bytes(b"")
    with pytest.raises(ev.ArtifactLoadError, match="empty"):
        ev.load_model(str(empty), device="cpu")
    trunc = tmp_path / "trunc.ptz"
    trunc.write_bytes(blob[: len(blob) * 2 // 3])
    with pytest.raises(ev.ArtifactLoadError, match="refused"):
        ev.load_model(str(trunc), device="cpu", reference=True)
    bad = bytearray(blob)
    bad[len(bad) // 2] ^= 0x5A
    corrupt = tmp_path / "corrupt.ptz"
    corrupt.write_bytes(bytes(bad))
    with pytest.raises(ev.ArtifactLoadError, match="refused"):
        ev.load_model(str(corrupt), device="cpu", reference=True)
    junk = tmp_path / "junk.ptz"
    junk.write_bytes(b"\x00" * 4096)
    with pytest.raises(ev.ArtifactLoadError):
        ev.load_model(str(junk), device="cpu")


def test_kernel_path_keeps_int6_codes_and_matches_reference(large_m_run, kernel_artifact, small_lut):
    """int6 model (Int6Linear codes, Triton interpreter on CPU) vs dequantized reference: same BPB, with steps
    on both sides of LARGE_M (fused int6 kernel and the aten large-M branch)."""
    from pgolf_kernels.int6_linear import Int6Linear
    from pgolf_kernels._utils import interpret_mode

    mk, info, eager, stream = large_m_run["model"], large_m_run["info"], large_m_run["eager"], large_m_run["stream"]
    mr, _ = ev.load_model(kernel_artifact, device="cpu", reference=True)
    assert isinstance(mk.blocks[0].attn.c_q, Int6Linear)
    assert isinstance(mr.blocks[0].attn.c_q, torch.nn.Linear)
    assert info["artifact_bytes"] == os.path.getsize(kernel_artifact)
    if interpret_mode():  # the CPU lane: Triton (interpreter) paths are live
        calls = large_m_run["calls"]
        assert calls["large"] > 0 and calls["op"] > 0, calls  # both sides of LARGE_M were exercised
    rr = ev.evaluate(mr, stream, small_lut, mode="ttt", cfg=LARGE_M_CFG, backend="bmm")
    assert eager["targets"] == rr["targets"] == stream.numel() - len(LARGE_M_DOCS)
    # fp32 on CPU, only summation order differs: measured 9.3e-10 relative apart, while a 1 % error in the
    # large-M weights moves this BPB by 1.9e-6: bound 1e-7
    assert abs(eager["val_bpb"] - rr["val_bpb"]) < 1e-7 * rr["val_bpb"], (eager["val_bpb"], rr["val_bpb"])


_GRAPH_INPUTS: list = []
_GRAPHS: list = []


def _recording_aot_eager(gm, example_inputs):
    """aot_eager that keeps every graph's example inputs in _GRAPH_INPUTS and counts the graphs in _GRAPHS."""
    _GRAPH_INPUTS.extend(example_inputs)
    _GRAPHS.append(gm)
    return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)


def _compiled_matches(m, stream, lut, cfg, backend, eager, monkeypatch):
    from train.forward import compile_rows_nll, is_compiled

    if not torch.cuda.is_available():
        # CPU lane: dynamo + AOT autograd (guards, dynamic shapes, the custom ops' fake impls and autograd)
        # with aot_eager, as the other CPU-lane compile tests; inductor's C++ codegen is not what the GPU
        # runs and cost 150 s + 105 s for these two tests on a cold cache (2 cores). Inductor on the GPU:
        # test_gpu_compiled_forward_matches_eager.
        import functools

        monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=_recording_aot_eager))
    _GRAPH_INPUTS.clear()
    _GRAPHS.clear()
    compile_rows_nll(m)
    try:
        comp = ev.evaluate(m, stream, lut, mode="ttt", cfg=cfg, backend=backend)
        assert is_compiled(m)
    finally:
        compile_rows_nll(m, enable=False)
    assert not is_compiled(m)
    # no Python float of the forward became a 0-dim float64 graph input: on the GPU inductor turns one into a
    # host C++ kernel (g++ and a vector-ISA probe in every eval's warm-up)
    if not torch.cuda.is_available():
        scalars = [x for x in _GRAPH_INPUTS if isinstance(x, torch.Tensor) and x.dim() == 0 and x.dtype == torch.float64]
        assert _GRAPH_INPUTS and not scalars, scalars
        # every graph costs warm-up: the adapted block (block 0 too: its input enters as a leaf that requires
        # grad, where a variant of its own made this 3) and the adapted head, all with grad (score-only steps too:
        # a grad-free adapter variant made this 4 here); shapes are dynamic, so 1-row and short steps add none.
        # The kernel path's steps here cross its lowered large-M threshold both ways: one block graph per branch
        assert len(_GRAPHS) == (2 if backend == "bmm" else 3), len(_GRAPHS)
    assert comp["targets"] == eager["targets"] == stream.numel() - 5 and comp["legality"]["multi"] == 0
    # fp32 on CPU: fusion changes only rounding order
    assert abs(comp["val_bpb"] - eager["val_bpb"]) < 1e-5 * eager["val_bpb"], (comp["val_bpb"], eager["val_bpb"])


def test_compiled_forward_matches_eager_reference(kernel_artifact, small_lut, monkeypatch):
    """compile_rows_nll (what the driver's --compile attaches): same ledger, same BPB as eager, with
    batches whose live rows and window lengths change step to step (dynamic shapes, 1-row steps)."""
    stream = doc_stream(LARGE_M_DOCS, vocab_size=SMALL_V, seed=3)
    m, _ = ev.load_model(kernel_artifact, device="cpu", reference=True)
    eager = ev.evaluate(m, stream, small_lut, mode="ttt", cfg=LARGE_M_CFG, backend="bmm")
    _compiled_matches(m, stream, small_lut, LARGE_M_CFG, "bmm", eager, monkeypatch)


def test_compiled_forward_matches_eager_kernel_large_m(large_m_run, small_lut, monkeypatch):
    """As above on the kernel path, the steps crossing the lowered LARGE_M both ways under one dynamic-shape
    compile (this also covers the all-fused-kernel steps: the 1- and 2-row ones)."""
    _patch_large_m(monkeypatch)
    _compiled_matches(large_m_run["model"], large_m_run["stream"], small_lut, LARGE_M_CFG, "kernel",
                      large_m_run["eager"], monkeypatch)


def test_lora_kernel_backend_matches_bmm():
    m = tiny_model(seed=2, num_layers=1, model_dim=32, num_heads=2, num_kv_heads=1)
    stream = doc_stream([50, 30, 20], seed=4)
    starts, ns = split_docs(stream)
    cfg = TTTConfig(rank=2, chunk=16, window=32, batch_size=3)
    outs = {}
    for be in ("bmm", "kernel"):
        ad = DocLoRA(m, cfg, 3, "cpu", be)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in ad.params:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        rb = build_rows(stream, np.stack([starts, [16, 16, 0], [32, 30, 16]], 1), cfg.window)
        ad.set_rows(torch.tensor([0, 2, 1]))
        nll = rows_nll(m, rb, ad)
        nll[rb.mask].sum().backward()
        outs[be] = (nll.detach(), [p.grad.clone() for p in ad.params], ad.backend)
    assert outs["kernel"][2] == "kernel", "pgolf_kernels.lora.multi_lora_linear not importable"
    torch.testing.assert_close(outs["kernel"][0], outs["bmm"][0], rtol=1e-4, atol=1e-4)
    for gk, gb in zip(outs["kernel"][1], outs["bmm"][1]):
        torch.testing.assert_close(gk, gb, rtol=1e-3, atol=1e-5)


# ------------------------------------------------------------------------------ deadline
class FakeClock:
    def __init__(self, step):
        self.t, self.step = 0.0, step

    def __call__(self):
        self.t += self.step
        return self.t


def test_deadline_falls_back_to_base_model(lut):
    m = tiny_model(seed=1)
    stream = doc_stream([200, 150, 120, 90, 60, 40, 30, 20, 10, 5], seed=2)
    base = ev.evaluate(m, stream, lut, mode="base", cfg=CFG, backend="bmm")
    full = ev.evaluate(m, stream, lut, mode="ttt", cfg=CFG, backend="bmm")
    logs = []
    # no time at all: every document is scored by the base model, identical to mode=base
    none = ev.evaluate(m, stream, lut, mode="ttt", cfg=CFG, backend="bmm", budget_s=0.0,
                       rates={"ttt_pos_per_s": 1e3, "base_pos_per_s": 1e4}, log=logs.append)
    assert none["docs_ttt"] == 0 and none["docs_no_ttt_deadline"] == 10
    assert none["val_bpb"] == pytest.approx(base["val_bpb"], rel=1e-12)
    assert any("deadline" in s for s in logs)
    # some time: each clock() call advances 1 s; the first batch fits, later ones do not
    # some time: each clock() call advances 1 s (about 3 calls per batch); batches of 2 documents, the
    # first few fit in the 12 s budget, the later ones do not
    cfg2 = TTTConfig(rank=4, chunk=32, window=96, batch_size=2)
    part = ev.evaluate(m, stream, lut, mode="ttt", cfg=cfg2, backend="bmm", budget_s=12.0,
                       rates={"ttt_pos_per_s": 1e3, "base_pos_per_s": 1e9}, clock=FakeClock(1.0), log=logs.append)
    assert 0 < part["docs_ttt"] < 10 and part["docs_ttt"] + part["docs_no_ttt_deadline"] == 10
    assert part["targets"] == full["targets"] == base["targets"]
    assert full["val_bpb"] <= part["val_bpb"] <= base["val_bpb"]
    assert part["legality"]["missing"] == 0


def test_deadline_with_rolling_schedule(lut):
    """Rolling schedule: batches claimed after the deadline are base-scored, the rest get TTT; every
    target is still scored exactly once."""
    m = tiny_model(seed=1)
    stream = doc_stream([200, 150, 120, 90, 60, 40, 30, 20, 10, 5], seed=2)
    full = ev.evaluate(m, stream, lut, mode="ttt", cfg=CFG, backend="bmm")
    cfg2 = TTTConfig(rank=4, chunk=32, window=96, batch_size=2, schedule="rolling")
    # the fake clock advances 1 s per call and the rolling schedule reads it about once per claimed batch
    part = ev.evaluate(m, stream, lut, mode="ttt", cfg=cfg2, backend="bmm", budget_s=5.0,
                       rates={"ttt_pos_per_s": 1e3, "base_pos_per_s": 1e9}, clock=FakeClock(1.0), log=lambda *a: None)
    assert 0 < part["docs_ttt"] < 10 and part["docs_ttt"] + part["docs_no_ttt_deadline"] == 10
    assert part["targets"] == full["targets"] and part["legality"]["missing"] == 0


def test_ttt_lowers_bpb_vs_base(lut):
    """Documents that repeat their own frequent tokens: per-document adaptation must pay off."""
    m = tiny_model(seed=4)
    stream = doc_stream([400, 380, 350, 300], seed=9)
    cfg = TTTConfig(rank=4, chunk=32, window=96, batch_size=4, lr=0.01)
    base = ev.evaluate(m, stream, lut, mode="base", cfg=cfg, backend="bmm")
    ttt = ev.evaluate(m, stream, lut, mode="ttt", cfg=cfg, backend="bmm")
    assert ttt["val_bpb"] < base["val_bpb"] - 0.01, (ttt["val_bpb"], base["val_bpb"])


def test_warmup_uses_synthetic_tokens_and_measures_rates(lut, monkeypatch):
    m = tiny_model(seed=1)
    seen = []
    import train.schedules as sched_mod
    import train.scoring as scoring_mod

    real = scoring_mod.build_rows

    def spy(stream, rows, window, pad_to=1, **kw):
        seen.append(stream.detach().cpu().clone())
        return real(stream, rows, window, pad_to, **kw)

    for mod in (sched_mod, scoring_mod):  # every caller of build_rows on the warm-up's paths
        monkeypatch.setattr(mod, "build_rows", spy)
    rates = warmup(m, lut, CFG, "bmm", "cpu", n_docs=4, doc_len=100)
    assert rates["ttt_pos_per_s"] > 0 and rates["base_pos_per_s"] > 0
    # the main synthetic batch, the full-window step's documents (window + chunk) and the small-batch shape sweep
    # (7 streams), all built by warmup itself: uniform random tokens in [4, V) after a BOS
    assert len(seen) > 8
    for s in seen:
        bos = (s == 1).nonzero().flatten()
        lens = torch.diff(torch.cat([bos, torch.tensor([s.numel()])])) - 1
        assert bos[0] == 0 and set(lens.tolist()) <= {100, 40, CFG.window + CFG.chunk} and bool((s[s != 1] >= 4).all())
    import inspect

    assert "tokens" not in inspect.signature(warmup).parameters


@pytest.mark.parametrize("graphs", [True, False])
def test_warmup_first_calls_the_forward_at_the_largest_shape(lut, monkeypatch, graphs):
    """warmup's first call of the forward is one TTT step with every adapter row and full windows, the largest shape
    of the warm-up (a compiled dynamic-shape graph keeps its first call's size hints and autotuned kernel configs),
    on synthetic tokens, timed in the rates; then the passes; with graphs, every step padded to a graph bucket."""
    import train.schedules as sched_mod

    shapes = []
    real = sched_mod.rows_nll

    def spy(model, rb, adapter=None):
        shapes.append(tuple(rb.x.shape))
        return real(model, rb, adapter)

    monkeypatch.setattr(sched_mod, "rows_nll", spy)
    rates = warmup(tiny_model(seed=1), lut, CFG, "bmm", "cpu", n_docs=4, doc_len=100, graphs=graphs)
    assert shapes[0][0] == CFG.batch_size and shapes[0][1] >= CFG.window
    assert shapes[0] == max(shapes, key=lambda s: s[0] * s[1]) and len(shapes) > 2
    assert rates["full_window_step_s"] > 0
    if graphs:  # every step padded to a CUDA-graph bucket, the shapes the graphs' preparation meets again
        from train.graphs import graph_buckets

        rb, lb = graph_buckets(CFG.batch_size, CFG.window, CFG.chunk, CFG.graph_window_step)
        assert all(R in rb and L in lb for R, L in shapes), (shapes, rb, lb)
        assert shapes[0] == (rb[-1], lb[-1])


def test_warmup_for_graphs_runs_ttt_passes_only(lut, monkeypatch):
    """graphs=True (the eval's --cuda-graphs): no shape sweep and no adapter-less scoring (the graphs' preparation
    warms every replayed bucket; the base scorer serves only the deadline fallback); the deadline still gets
    both rates, the base one standing in from the TTT rate and flagged so."""
    import train.warmup as wu

    calls = []
    monkeypatch.setattr(wu, "_warm_shapes", lambda *a, **k: calls.append("sweep"))
    monkeypatch.setattr(wu, "score_rows", lambda *a, **k: calls.append("score_rows"))
    m = tiny_model(seed=1)
    rates = warmup(m, lut, CFG, "bmm", "cpu", n_docs=4, doc_len=100, graphs=True)
    assert calls == []
    assert rates["base_pos_per_s"] == rates["ttt_pos_per_s"] > 0 and rates["base_rate_from_ttt"] is True
    assert {"ttt_pass0_s", "ttt_pass1_s"} <= set(rates) and "warm_shapes_s" not in rates
    rates = warmup(m, lut, CFG, "bmm", "cpu", n_docs=4, doc_len=100)
    assert calls.count("sweep") == 1 and calls.count("score_rows") == 2 and "base_rate_from_ttt" not in rates


def test_batch_claimer_static_share_and_counter():
    c = BatchClaimer(7, share=(1, 3))
    assert [c.next() for _ in range(4)] == [1, 4, None, None]

    class Store:  # the torch.distributed store contract: add returns the new value
        v = 0

        def add(self, key, n):
            self.v += n
            return self.v

    s = Store()
    a, b = BatchClaimer(3, store=s), BatchClaimer(3, store=s)
    got = [a.next(), b.next(), b.next(), a.next(), b.next()]
    assert got == [0, 1, 2, None, None]


# ------------------------------------------------------------------------------ CLI
def test_cli_end_to_end_on_fineweb_sample(artifact, shared_data, tmp_path):
    out = tmp_path / "rep.json"
    rep = ev.main(["--artifact", artifact, "--val", os.path.join(shared_data, SHARD),
                   "--tokenizer", os.path.join(shared_data, SP1024), "--reference", "--max-docs", "6",
                   "--rank", "2", "--chunk", "64", "--window", "128", "--batch-size", "4",
                   "--device", "cpu", "--json", str(out)])
    saved = json.load(open(out))
    for k in ("val_loss", "val_bpb", "targets", "bytes", "load_s", "warmup_s", "score_s", "timed_eval_s",
              "wall_s", "docs_ttt", "docs_no_ttt_deadline", "legality"):
        assert k in saved, k
    assert saved["docs"] == 6 and saved["docs_ttt"] == 6 and saved["docs_no_ttt_deadline"] == 0
    toks = ev.load_val_tokens(os.path.join(shared_data, SHARD))
    six = ev.docs_prefix(toks, 6)
    assert rep["targets"] == six.numel() - 6
    lut = ByteLUT.from_sentencepiece(os.path.join(shared_data, SP1024))
    want = int(lut.target_bytes(six[:-1], six[1:])[six[1:] != 1].sum())
    assert rep["bytes"] == want
    assert math.isfinite(rep["val_bpb"]) and rep["val_bpb"] > 0
    assert rep["wall_s"] >= rep["load_s"] + rep["warmup_s"]


def test_cli_refuses_tokenizer_without_byte_fallback(artifact, shared_data):
    from train.bpb import TokenizerError

    with pytest.raises(TokenizerError):
        ev.main(["--artifact", artifact, "--val", os.path.join(shared_data, SHARD), "--tokenizer",
                 os.path.join(shared_data, "tokenizers", "nonofficial_fineweb_1024_bpe_no_byte_fallback.model"),
                 "--device", "cpu", "--no-warmup"])


# ------------------------------------------------------------------------------ GPU lane
@pytest.mark.gpu
def test_gpu_cli_at_its_defaults(artifact, shared_data):
    """The CLI on CUDA at its defaults (compiled, CUDA graphs): the start-up threads (CUDA context, compiler
    imports, code-bytes walk) and the compile workers started after the checks; a complete, legal report whose
    load split names every part, compile workers included."""
    rep = ev.main(["--artifact", artifact, "--val", os.path.join(shared_data, SHARD),
                   "--tokenizer", os.path.join(shared_data, SP1024), "--reference", "--max-docs", "6",
                   "--rank", "2", "--chunk", "64", "--window", "128", "--batch-size", "4"])
    assert rep["docs_ttt"] == 6 and math.isfinite(rep["val_bpb"]) and rep["legality"]["multi"] == 0
    assert list(rep["load_parts"]) == ["checks", "compile_imports", "compile_workers", "model", "compile_setup",
                                       "tokenizer", "sync"]
    assert rep["cuda_graphs"]["captured"] and rep["submission_bytes"] > 0
    # the compile counters at the end include the warm-up's
    assert rep["compile_cache_end"]["dynamo_frames"] >= rep["warmup_rates"]["dynamo_frames"] >= 1


@pytest.mark.gpu
def test_gpu_compile_cache_file_on_empty_caches(artifact, shared_data, tmp_path):
    """--compile-cache on CUDA through the CLI: a --warmup-only process (synthetic tokens) writes the file; an eval in
    a process whose Inductor and Triton cache folders are empty loads it, and its warm-up compiles from hits only."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    f = str(tmp_path / "eval.compile-cache")
    base = ["--artifact", artifact, "--val", os.path.join(shared_data, SHARD), "--tokenizer",
            os.path.join(shared_data, SP1024), "--reference", "--max-docs", "6", "--rank", "2", "--chunk", "64",
            "--window", "128", "--batch-size", "4", "--compile-cache", f]
    reps = []
    for i, extra in enumerate((["--warmup-only"], [])):
        env = dict(os.environ, PYTHONPATH=root, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / f"ind{i}"),
                   TRITON_CACHE_DIR=str(tmp_path / f"tri{i}"))
        out = str(tmp_path / f"rep{i}.json")
        r = subprocess.run([sys.executable, "-m", "train.eval", *base, *extra, "--json", out], cwd=root, env=env,
                           capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
        with open(out) as fh:
            reps.append(json.load(fh))
    made, used = reps
    assert made["compile_cache_file"]["saved_bytes"] > 0 and made["warmup_rates"]["inductor.fxgraph_cache_miss"] >= 1
    assert used["compile_cache_file"]["loaded_bytes"] == os.path.getsize(f)
    assert used["warmup_rates"].get("inductor.fxgraph_cache_miss", 0) == 0, used["warmup_rates"]
    assert used["warmup_rates"]["inductor.fxgraph_cache_hit"] >= 1 and math.isfinite(used["val_bpb"])
    assert "compile_cache_file" in used["load_parts"] and "compile_cache_file" not in made["load_parts"]


@pytest.mark.gpu
def test_gpu_kernel_vs_reference_bpb_parity(tmp_path):
    """bf16 on the GPU: the int6 + multi-LoRA path and the dequantized bf16 + bmm path agree on BPB
    within 1e-4 (TTT included) on a small model and a few hundred documents."""
    from train.artifact import save_artifact

    m = tiny_model(seed=5, num_layers=4, model_dim=256, num_heads=4, num_kv_heads=2)
    path = str(tmp_path / "small.ptz")
    save_artifact(m, path, code_paths=[], warn=False)
    V = 1024
    lut = ByteLUT(torch.ones(V, dtype=torch.int16), torch.zeros(V, dtype=torch.bool), torch.zeros(V, dtype=torch.bool))
    g = np.random.default_rng(0)
    stream = doc_stream(g.integers(20, 1500, 200).tolist(), seed=3).cuda()
    cfg = TTTConfig()
    mk, _ = ev.load_model(path, device="cuda")
    mr, _ = ev.load_model(path, device="cuda", reference=True)
    rk = ev.evaluate(mk, stream, lut, cfg=cfg, backend="kernel")
    rr = ev.evaluate(mr, stream, lut, cfg=cfg, backend="bmm")
    assert rk["lora_backend"] == "kernel"
    # The 1e-4 is stated for real BPBs (~1-2.4 on FineWeb; the bench's fixture row measured
    # 2.7e-5 there). This random tiny model with a 1-byte-per-token LUT scores BPB ~15, so the bound is
    # taken relative: 1e-5 x BPB. Seen on an H200: |diff| 1.02e-4 at BPB 15.29 (6.7e-6 relative); the
    # gap is the reference rounding dequantized W to bf16, which the int6 kernel never does.
    diff = abs(rk["val_bpb"] - rr["val_bpb"])
    assert diff < 1e-5 * rr["val_bpb"], (rk["val_bpb"], rr["val_bpb"])


def test_bench_helpers_smoke_on_cpu(tmp_path, shared_data, monkeypatch):
    """bench/bench_eval.py's artifact builder, timed eval and row builder on a tiny model (CPU), so
    the single GPU run does not fail on plumbing."""
    import bench.bench_eval as be
    from train.eval_fixtures import tiny_config

    monkeypatch.setenv("PGOLF_BENCH_RESULTS", str(tmp_path))
    path = str(tmp_path / "b.ptz")
    # one training step of B32 x T1024 (the plumbing; each step is ~3 s of one CPU core)
    info = be.build_artifact(path, shared_data, train_steps=1, cfg=tiny_config(num_layers=1, model_dim=32,
                                                                                num_heads=2, num_kv_heads=1),
                             device="cpu")
    assert info["train_steps"] == 1 and info["bytes_model"] > 0
    toks, starts = be._fineweb(shared_data)
    held = toks[starts[197]:]
    lut = ByteLUT.from_sentencepiece(os.path.join(shared_data, SP1024))
    cfg = TTTConfig(rank=2, chunk=64, window=128, batch_size=2)
    # compile=False: eval_once's compile flag only calls compile_rows_nll, which the compile tests above cover;
    # compiled here it cost ~10 s of dynamo tracing per call, and minutes of inductor C++ builds on a cold cache
    kw = dict(reference=True, device="cpu", compile=False)
    k = be.eval_once(path, held, lut, cfg, share=(0, 2), **kw)
    r = be.eval_once(path, held, lut, cfg, share=(0, 2), warm=False, **kw)
    b = be.eval_once(path, held, lut, cfg, mode="base", warm=False, **kw)
    row = be._row("smoke", k, r, no_ttt_val_bpb=b["val_bpb"])
    assert row["kernel"] == "eval" and row["baseline"] == "reference" and row["docs"] == 2
    assert row["val_bpb"] == pytest.approx(row["ref_val_bpb"], rel=1e-9)
    assert {"tokens", "load_s", "warmup_s", "score_s", "speedup"} <= set(row)
    row2 = be._row("smoke-noref", k, None)
    assert math.isnan(row2["baseline_ms"])
    assert os.path.isfile(tmp_path / "eval-partial.jsonl")


def test_batched_adam_matches_torch_adam_and_resets_in_place(steps_match):
    from train.ttt_optim import BatchedAdam

    g = torch.Generator().manual_seed(0)
    p1 = [torch.randn(3, 4, 5, generator=g).requires_grad_() for _ in range(2)]
    p2 = [p.detach().clone().requires_grad_() for p in p1]
    ours = BatchedAdam(p1, 0.01, (0.9, 0.95), 1e-8)
    ref = torch.optim.Adam(p2, lr=0.01, betas=(0.9, 0.95), eps=1e-8)
    ptrs = [t.data_ptr() for t in ours.m + ours.v + p1]
    for rnd in range(2):
        steps_match(ours, ref, p1, p2, g)
        ours.reset()  # new batch: moments and step count from zero, same buffers
        ref = torch.optim.Adam(p2, lr=0.01, betas=(0.9, 0.95), eps=1e-8)
        assert ours.t == 0 and all(float(t.abs().sum()) == 0 for t in ours.m + ours.v)
    assert ptrs == [t.data_ptr() for t in ours.m + ours.v + p1]


def test_doclora_reset_is_in_place_and_keyed_by_document():
    m = tiny_model(seed=2, num_layers=1, model_dim=32, num_heads=2, num_kv_heads=1)
    ad = DocLoRA(m, CFG, 4, "cpu", "bmm")
    ptrs = [p.data_ptr() for p in ad.params]
    ad.reset([10, 20, 30])
    first = [p.detach().clone() for p in ad.params]
    with torch.no_grad():
        for p in ad.params:
            p.add_(1.0)
    ad.reset([10, 20, 30])
    assert ptrs == [p.data_ptr() for p in ad.params]  # in place
    for a, b in zip(first, ad.params):
        assert torch.equal(a, b)
    for k in ad.B:  # B = 0: a reset adapter is exactly the base model
        assert all(float(b.abs().sum()) == 0 for b in ad.B[k])
    ad.reset([30, 99])  # document 30 moves to row 0: same init there
    for k in ad.A:
        for a in ad.A[k]:
            i = [p.data_ptr() for p in ad.params].index(a.data_ptr())
            assert torch.equal(a[0], first[i][2])
            assert not torch.equal(a[1], first[i][1])
    # Kaiming-uniform bound 1/sqrt(d) and roughly uniform
    a = ad.A["q"][0]
    bound = 1 / math.sqrt(32)
    assert float(a.abs().max()) <= bound
    u = torch.cat([a.flatten() for lst in ad.A.values() for a in lst]) / bound
    assert abs(float(u.mean())) < 0.05 and abs(float(u.var()) - 1 / 3) < 0.03
    # layers, targets and rows all differ
    assert not torch.equal(ad.A["q"][0][0], ad.A["v"][0][0])
    assert not torch.equal(ad.A["q"][0][0], ad.A["q"][0][1])


def test_vectorized_plans_match_the_definition():
    from train.rows import chunk_bounds, plan_rows, ttt_positions

    rng = np.random.default_rng(0)
    for _ in range(100):
        ns = rng.integers(0, 3000, rng.integers(1, 20))
        st = rng.integers(0, 10 ** 6, ns.size)
        C = int(rng.integers(1, 300))
        W = int(rng.integers(C, 2500))
        want = np.asarray([(s, a, b) for s, n in zip(st, ns) for a, b in chunk_bounds(int(n), C)],
                          dtype=np.int64).reshape(-1, 3)
        assert np.array_equal(plan_rows(st, ns, C, W), want)
        assert ttt_positions(ns, C, W) == sum(b - max(0, b - W) for n in ns for a, b in chunk_bounds(int(n), C))
    with pytest.raises(ValueError, match="window"):
        plan_rows([0], [10], 64, 32)


def _gpu_kernel_model(tmp_path, seed):
    """A 2-layer d128 model through an artifact onto the GPU kernel path, and a 1-byte-per-token LUT."""
    from train.artifact import save_artifact

    m = tiny_model(seed=seed, num_layers=2, model_dim=128, num_heads=2, num_kv_heads=1)
    path = str(tmp_path / f"gpu{seed}.ptz")
    save_artifact(m, path, code_paths=[], warn=False)
    mk, _ = ev.load_model(path, device="cuda")
    V = m.config.vocab_size
    lut = ByteLUT(torch.ones(V, dtype=torch.int16), torch.zeros(V, dtype=torch.bool), torch.zeros(V, dtype=torch.bool))
    return mk, lut


@pytest.mark.gpu
def test_gpu_kernel_path_coverage_and_document_isolation(tmp_path):
    """On the GPU kernel path (int6 codes + fused multi-LoRA, bf16): every mode covers every target
    once, and a document's TTT scores do not move when every other document (its batch mates
    included) is replaced -- a cross-row leak in a kernel's adapter_index / row handling would."""
    from train.rows import split_docs

    mk, lut = _gpu_kernel_model(tmp_path, seed=8)
    V = lut.vocab_size
    lengths = [700, 650, 640, 600, 90, 33, 1, 300, 299]
    stream = doc_stream(lengths, seed=6).cuda()
    cfg = TTTConfig(rank=8, chunk=64, window=256, batch_size=4)
    for mode in ("ttt", "base", "flat", "sliding"):
        rep = ev.evaluate(mk, stream, lut, mode=mode, cfg=cfg, stride=48, backend="kernel")
        n_t = stream.numel() - (len(lengths) if mode in ("ttt", "base") else 1)
        assert rep["targets"] == n_t and rep["legality"]["missing"] == 0 and rep["legality"]["multi"] == 0
    rep0, st0 = ev.evaluate(mk, stream, lut, cfg=cfg, backend="kernel", keep_nll=True, return_state=True)
    assert rep0["lora_backend"] == "kernel"
    starts, ns = split_docs(stream.cpu())
    k = 1  # a long document: its batch has 3 mates
    s, e = int(starts[k]), int(starts[k] + ns[k] + 1)
    pert = stream.clone()
    other = torch.ones_like(pert, dtype=torch.bool)
    other[s:e] = False
    other &= pert != 1
    pert[other] = torch.randint(4, V, (int(other.sum()),), device="cuda")
    _, st1 = ev.evaluate(mk, pert, lut, cfg=cfg, backend="kernel", keep_nll=True, return_state=True)
    a, b = st0.ledger.nll[s + 1:e], st1.ledger.nll[s + 1:e]
    # fp32 atomics in the adapter gradients may reorder sums: allow float noise, nothing more
    assert (a - b).abs().max().item() < 1e-3
    oth = other & ~torch.isnan(st0.ledger.nll[:-1])
    assert (st0.ledger.nll[:-1][oth] - st1.ledger.nll[:-1][oth]).abs().max().item() > 0.1


@pytest.mark.gpu
def test_gpu_compiled_forward_matches_eager(tmp_path):
    """compile_rows_nll with inductor (what --compile runs on the GPU) on the int6 + fused multi-LoRA path, bf16:
    same targets and BPB as eager, with live rows and window lengths changing step to step. The CPU lane runs
    the same check through aot_eager."""
    from train.forward import compile_rows_nll

    mk, lut = _gpu_kernel_model(tmp_path, seed=7)
    stream = doc_stream([700, 650, 90, 33, 1, 300, 299], seed=3).cuda()
    cfg = TTTConfig(rank=8, chunk=64, window=256, batch_size=3)
    eager = ev.evaluate(mk, stream, lut, cfg=cfg, backend="kernel")
    compile_rows_nll(mk)
    try:
        comp = ev.evaluate(mk, stream, lut, cfg=cfg, backend="kernel")
    finally:
        compile_rows_nll(mk, enable=False)
    assert comp["lora_backend"] == "kernel" and comp["targets"] == eager["targets"] and comp["legality"]["multi"] == 0
    # bf16: inductor keeps fused elementwise chains in fp32 where eager rounds each op to bf16; not yet measured
    # on a GPU, bound set at 1e-3 relative (a lost adapter update or a wrong row moves this BPB by far more)
    assert abs(comp["val_bpb"] - eager["val_bpb"]) < 1e-3 * eager["val_bpb"], (comp["val_bpb"], eager["val_bpb"])


def test_build_rows_min_size_pads_with_masked_rows_and_slots():
    """min_size=2 (the eval's setting): a 1-row, 1-target batch becomes 2 x 2 with only (0, 0) real."""
    stream = doc_stream([40, 9], seed=2)
    starts, ns = split_docs(stream)
    one = np.array([[starts[0], 10, 11]])
    rb1, rb2 = build_rows(stream, one, 32), build_rows(stream, one, 32, min_size=2)
    assert rb1.x.shape[0] == 1 and rb1.mask.shape == (1, 1)
    assert rb2.x.shape[0] == 2 and rb2.mask.shape == (2, 2)
    assert rb2.mask.tolist() == [[True, False], [False, False]]
    assert torch.equal(rb2.x[0, :rb1.x.shape[1]], rb1.x[0]) and rb2.pos[0, 0] == rb1.pos[0, 0]
    assert rb2.y[0, 0] == rb1.y[0, 0]


def test_rolling_schedule_kernel_backend_matches_batch(kernel_artifact, small_lut):
    """--schedule rolling on the int6 + fused multi-LoRA path (interpreter on CPU; the fused q / k pass on, as
    --fused-qk auto turns it on for the kernel path): same BPB as batches. The
    batch side runs on the dequantized reference (bmm), 1e-9 relative from the kernel path in fp32 (see the
    parity test above), so one interpreted evaluate suffices."""
    import dataclasses

    mk, _ = ev.load_model(kernel_artifact, device="cpu")
    mr, _ = ev.load_model(kernel_artifact, device="cpu", reference=True)
    stream = doc_stream([40, 23, 9, 31, 5, 17], vocab_size=SMALL_V, seed=6)
    cfg = TTTConfig(rank=2, chunk=16, window=32, batch_size=2)
    rb = ev.evaluate(mr, stream, small_lut, mode="ttt", cfg=cfg, backend="bmm")
    rr = ev.evaluate(mk, stream, small_lut, mode="ttt", cfg=dataclasses.replace(cfg, schedule="rolling"),
                     backend="kernel")
    assert rr["schedule"] == "rolling" and rr["lora_backend"] == "kernel"
    # --fused-qk auto: the kernel path's q / k through head_norm_rope, the reference's through the torch ops
    assert rr["fused_qk"] is True and rb["fused_qk"] is False
    assert rr["targets"] == rb["targets"] and rr["docs_ttt"] == rb["docs_ttt"] == 6
    assert abs(rr["val_bpb"] - rb["val_bpb"]) < 1e-5 * rb["val_bpb"], (rr["val_bpb"], rb["val_bpb"])


def test_compile_cache_counts_reports_frames_and_phase_times():
    """The warm-up report's compile statistics: frames compiled and the seconds of each compile phase."""
    from train.warmup import _COMPILE_PHASES, compile_cache_counts

    before = compile_cache_counts()
    f = torch.compile(lambda x: (x.sin() * 2).relu().sum(), dynamic=True, backend="aot_eager")
    f(torch.randn(10))
    after = compile_cache_counts()
    assert after["dynamo_frames"] == before["dynamo_frames"] + 1
    assert {f"compile_s.{n}" for n, _ in _COMPILE_PHASES} <= set(after)
    assert after["compile_s.frame"] > before["compile_s.frame"] and after["compile_s.tracing"] > 0


def test_cuda_library_warm_draws_no_random_numbers_and_is_quiet():
    """``_start_cuda`` (the thread that loads the CUDA libraries beside the artifact decode) draws no random numbers
    (the eval's own draws stay as without it) and never raises; on a machine without CUDA it runs its ops on the
    CPU, where the final synchronize fails quietly."""
    before = torch.get_rng_state()
    ev._start_cuda(torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), before)
    ev._start_cuda(torch.device("cuda", 7) if not torch.cuda.is_available() else torch.device("cuda", 1000))
