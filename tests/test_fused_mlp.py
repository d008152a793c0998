"""``TTTConfig.fused_mlp``: the TTT step's MLP through ``pgolf_kernels.linear_act.mlp_leaky_sq`` (adapters merged into
per-row weights, activation and its derivative in GEMM epilogues) gives the scores and adapter gradients of the
unfused MLP (fp32, CPU; the kernels under the interpreter in the CPU lane), through ``rows_nll`` and ``evaluate``."""
import dataclasses

import numpy as np
import pytest
import torch

from train.adapters import DocLoRA
from train.eval_fixtures import doc_stream, tiny_model
from train.forward import rows_nll
from train.rows import build_rows, split_docs
from train.ttt_config import TTTConfig

pytestmark = pytest.mark.usefixtures("one_thread")

ALL = ("q", "k", "v", "o", "mlp", "up", "down", "head")


def _nll_and_grads(model, rb, cfg, n_docs, backend, seed=0):
    ad = DocLoRA(model, cfg, n_docs, rb.x.device, backend)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ad.params:  # non-zero B: every LoRA path contributes
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    nll = rows_nll(model, rb, ad)
    (nll * rb.mask).sum().backward()
    return nll.detach(), [p.grad.clone() for p in ad.params]


# The fused-op step tests' model: tiny_model at d 32 (MLP 64, head dim 8) and a vocabulary of 256 (the head
# adapter's N), every op still over several interpreter tiles. The interpreter's cost grows with both: the int6,
# fused-q/k, fused-residual kernel case took 37 s at d 64 / vocab 1024, 30 s at vocab 256, 14 s at both (2 CPU
# cores); the bmm cases run the fused ops' kernels too. d 64 / vocab 1024 stay in the *_is_what_the_model_runs,
# layout and compiled-step tests.
KERNEL_MODEL = dict(model_dim=32, vocab_size=256)


def step_model(**kw):
    """tiny_model(seed=3, num_layers=2) at KERNEL_MODEL's sizes for a fused-op step test (either backend)."""
    return tiny_model(seed=3, num_layers=2, **KERNEL_MODEL, **kw)


def batch(window=64, vocab=1024, device="cpu"):
    """Four documents' rows (token ids below ``vocab``, on ``device``): mid-document chunks, a chunk at a document's
    start, a 9-token document."""
    stream = doc_stream([70, 40, 100, 9], seed=5, vocab_size=vocab).to(device)
    starts, _ = split_docs(stream)
    rows = np.array([[starts[0], 32, 48], [starts[1], 16, 32], [starts[2], 80, 96], [starts[3], 0, 9]])
    return build_rows(stream, rows, window)


def assert_step_unchanged(model, rb, cfg, n_docs, backend, plain=None, **changes):
    """The step's NLL at every scored position and every adapter gradient with ``cfg`` changed by ``changes``, against
    ``cfg`` itself (or ``plain``, its (nll, grads) computed before): equal within fp32 rounding. Returns the grads."""
    # the fusions a test names, not the kernel path's auto
    cfg = dataclasses.replace(cfg, fused_qk=bool(cfg.fused_qk), fused_residual=bool(cfg.fused_residual),
                              fused_mlp=bool(cfg.fused_mlp))
    plain, g_plain = plain if plain is not None else _nll_and_grads(model, rb, cfg, n_docs, backend)
    fused, g_fused = _nll_and_grads(model, rb, dataclasses.replace(cfg, **changes), n_docs, backend)
    m = rb.mask
    torch.testing.assert_close(fused[m], plain[m], rtol=1e-5, atol=1e-5)
    assert len(g_fused) == len(g_plain)
    for a, b in zip(g_fused, g_plain):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    return g_fused


@pytest.mark.parametrize("targets,backend,tail,n_docs,int6", [(ALL, "bmm", False, 4, False), (ALL, "kernel", True, 4, True),
                                                              (("q", "v", "head"), "bmm", False, 4, False),
                                                              (ALL, "bmm", False, 1, False)])
def test_fused_mlp_equals_the_unfused_mlp(targets, backend, tail, n_docs, int6):
    """Same NLL at every scored position and same gradient of every adapter tensor: per-row merged adapters (up and
    down adapted), the base weights shared (neither adapted), one adapter shared by every row (n_docs 1), and the
    kernel path's int6 model (its MLP codes dequantized per call)."""
    model = step_model()
    if int6:
        from pgolf_kernels.int6_linear import convert_linears_to_int6

        convert_linears_to_int6(model)
    cfg = TTTConfig(rank=4, chunk=16, window=64, batch_size=4, alpha=8.0, targets=targets, tail_block=tail)
    rb = batch(cfg.window, model.config.vocab_size)
    g_fused = assert_step_unchanged(model, rb, cfg, n_docs, backend, fused_mlp=True)
    if "up" in targets:  # the up / down adapters get a gradient through the merged weights
        ad = DocLoRA(model, cfg, n_docs, rb.x.device, backend)
        i_up = [k for k in ad.A for _ in ad.A[k] + ad.B[k]].index("up")
        assert g_fused[i_up].abs().sum() > 0


def test_fused_mlp_is_what_the_model_runs():
    """The option reaches the MLP: with it, the adapter's mlp() is called (a planted failure there shows)."""
    model = tiny_model(seed=3, num_layers=2)
    stream = doc_stream([70, 40], seed=5)
    starts, _ = split_docs(stream)
    rb = build_rows(stream, np.array([[starts[0], 32, 48], [starts[1], 16, 32]]), 64)
    cfg = TTTConfig(rank=4, chunk=16, window=64, batch_size=2, targets=ALL, fused_mlp=True)
    ad = DocLoRA(model, cfg, 2, torch.device("cpu"), "bmm")
    calls = []
    orig = type(ad.layer(0)).mlp
    try:
        type(ad.layer(0)).mlp = lambda self, m, mod: calls.append(1) or orig(self, m, mod)
        rows_nll(model, rb, ad)
    finally:
        type(ad.layer(0)).mlp = orig
    assert len(calls) == 2


# The CPU lane's eval-wiring tests (the kernels' math has its own tests): a document longer than the window (96: its
# last chunk's context is cut), a 1-token one and a partial chunk, on the tiny model at KERNEL_MODEL's sizes (MLP 64:
# the fused paths' multiples of 8 hold; the vocabulary is the head adapter's N); every GEMM still spans several
# interpreter tiles. Measured on 2 CPU cores: the fused-residual eval took 64 s on [300, 1, 77, 140] at d 64, 25 s on these
# lengths, 13 s on these lengths at d 32; the kernel-backend O_FOLD eval on [40, 1] 28 s at d 64 / vocab 1024, 18 s
# at d 32 / vocab 256.
EVAL_LENGTHS = [110, 1, 40]


def assert_eval_unchanged(changes, lengths=None, device="cpu", backend="bmm", rel=1e-5, model_kw=None):
    """evaluate() of the tiny model (``model_kw``: its tiny_config changes) with ``tests.test_graphs.RECORDS_LIKE``
    changed by each dict of TTTConfig fields in ``changes``, against RECORDS_LIKE itself: same targets and ledger, BPB
    within ``rel`` (relative)."""
    from tests.test_graphs import LENGTHS, RECORDS_LIKE, _lut
    from train.eval import evaluate

    model_kw = model_kw or {}
    vocab = tiny_model(seed=3, **model_kw).config.vocab_size
    stream = doc_stream(LENGTHS if lengths is None else lengths, vocab_size=vocab, seed=5).to(device)
    lut = _lut(vocab)
    # the fusions a test names, not the kernel path's auto
    base = dataclasses.replace(RECORDS_LIKE, fused_qk=False, fused_residual=False, fused_mlp=False)
    ref = evaluate(tiny_model(seed=3, **model_kw).to(device), stream, lut, mode="ttt", cfg=base, backend=backend)
    for ch in changes:
        rep = evaluate(tiny_model(seed=3, **model_kw).to(device), stream, lut, mode="ttt",
                       cfg=dataclasses.replace(base, **ch), backend=backend)
        assert rep["targets"] == ref["targets"] and rep["legality"] == ref["legality"], ch
        assert abs(rep["val_bpb"] - ref["val_bpb"]) < rel * ref["val_bpb"], (ch, rep["val_bpb"], ref["val_bpb"])


def test_eval_with_fused_mlp_scores_like_without():
    # the wiring (the kernels' math: tests/test_linear_act.py) on EVAL_LENGTHS at KERNEL_MODEL
    assert_eval_unchanged([dict(fused_mlp=True)], lengths=EVAL_LENGTHS, model_kw=KERNEL_MODEL)


def test_fused_mlp_refusals_and_option():
    from train.eval import _parse

    with pytest.raises(ValueError, match="fused_mlp: needs both 'up' and 'down' in targets or neither"):
        TTTConfig(fused_mlp=True, targets=("q", "up"))
    with pytest.raises(ValueError, match=r"fused_mlp: 'yes'; expected None \(auto\), True or False"):
        TTTConfig(fused_mlp="yes")
    model = tiny_model(seed=3, num_layers=2)
    model.blocks[1].mlp.proj = torch.nn.Identity()
    with pytest.raises(ValueError, match=r"fused_mlp: needs the model's MLP projections as dense weights \(.weight\) "
                                         r"or int6 codes \(.q, .scale\); found \['Identity'\]"):
        DocLoRA(model, TTTConfig(fused_mlp=True, targets=ALL), 2, torch.device("cpu"), "bmm")
    # auto leaves such a model on the torch MLP instead of refusing it
    assert DocLoRA(model, TTTConfig(targets=ALL), 2, torch.device("cpu"), "kernel").fused_mlp is False
    base = ["--artifact", "a", "--val", "v", "--tokenizer", "t"]
    assert _parse(base + ["--fused-mlp", "on"]).ttt_cfg.fused_mlp is True
    assert _parse(base + ["--fused-mlp", "off"]).ttt_cfg.fused_mlp is False
    assert _parse(base).ttt_cfg.fused_mlp is None


def test_fused_mlp_auto_is_on_for_the_kernel_path_when_the_mlp_is_adapted():
    """auto (None): the kernel path whose MLP carries an adapter (the records' "mlp" target, where it was measured to
    pay; or up and down) runs the fused MLP; the reference, the kernel path with no MLP adapter (the seeds' recipe)
    and one with only one of up / down do not; an explicit True / False wins over the rule."""
    model = tiny_model(seed=3, num_layers=2)
    cpu = torch.device("cpu")
    records = ("q", "k", "v", "o", "mlp", "head")
    assert DocLoRA(model, TTTConfig(targets=records), 2, cpu, "kernel").fused_mlp is True
    assert DocLoRA(model, TTTConfig(targets=ALL), 2, cpu, "kernel").fused_mlp is True
    assert DocLoRA(model, TTTConfig(targets=("q", "up", "down")), 2, cpu, "kernel").fused_mlp is True
    assert DocLoRA(model, TTTConfig(targets=records), 2, cpu, "bmm").fused_mlp is False
    assert DocLoRA(model, TTTConfig(targets=("q", "v", "head")), 2, cpu, "kernel").fused_mlp is False
    assert DocLoRA(model, TTTConfig(targets=("mlp", "up")), 2, cpu, "kernel").fused_mlp is False
    assert DocLoRA(model, TTTConfig(targets=records, fused_mlp=False), 2, cpu, "kernel").fused_mlp is False
    assert DocLoRA(model, TTTConfig(targets=("q", "v"), fused_mlp=True), 2, cpu, "bmm").fused_mlp is True


@pytest.mark.gpu
def test_gpu_eval_with_fused_mlp_scores_like_without():
    """On the GPU (the TMA kernels themselves): evaluate() with fused_mlp, eager and with CUDA graphs, against the
    unfused eval: same targets and ledger, BPB within 1e-4."""
    assert_eval_unchanged([dict(fused_mlp=True, cuda_graphs=g, graph_min_steps=1) for g in (False, True)],
                          device="cuda", backend="kernel", rel=1e-4)
