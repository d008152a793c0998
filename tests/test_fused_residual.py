"""``TTTConfig.fused_residual``: the block's two residual sites through ``pgolf_kernels.linear_residual`` (projection,
the o / mlp / down adapters' expand and the scaled residual add in one GEMM) give the scores and adapter gradients of
the op-by-op block (fp32, CPU; the kernel under the interpreter in the CPU lane), through ``rows_nll`` and
``evaluate``."""
import pytest
import torch

from tests.test_fused_mlp import (ALL, EVAL_LENGTHS, KERNEL_MODEL, assert_eval_unchanged, assert_step_unchanged, batch,
                                  step_model)
from train.adapters import DocLoRA
from train.eval_fixtures import tiny_model
from train.forward import rows_nll
from train.ttt_config import TTTConfig

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("targets,backend,tail,n_docs,int6,mlp,qk", [
    (ALL, "bmm", False, 4, False, False, False), (ALL, "kernel", True, 4, True, False, True),
    (("q", "v", "head"), "bmm", False, 4, False, True, False), (("o", "mlp"), "bmm", True, 1, False, False, False),
    (("q", "k", "v", "o", "mlp", "head"), "kernel", True, 4, False, True, True)])
def test_fused_residual_equals_the_composition(targets, backend, tail, n_docs, int6, mlp, qk):
    """Same NLL at every scored position and same gradient of every adapter tensor: every target (o, mlp and down
    through the second product, up through the activation), both backends, the int6 model, the tail block, a shared
    adapter (n_docs 1), with the fused MLP and the fused q / k pass, and the records' targets."""
    model = step_model()
    if int6:
        from pgolf_kernels.int6_linear import convert_linears_to_int6

        convert_linears_to_int6(model)
    cfg = TTTConfig(rank=8, chunk=16, window=64, batch_size=4, alpha=12.0, targets=targets, tail_block=tail,
                    fused_mlp=mlp, fused_qk=qk)
    g_fused = assert_step_unchanged(model, batch(vocab=model.config.vocab_size), cfg, n_docs, backend,
                                    fused_residual=True)
    ad = DocLoRA(model, cfg, n_docs, torch.device("cpu"), backend)
    names = [k for k in ad.A for _ in ad.A[k] + ad.B[k]]
    for t in ("o", "mlp", "down"):  # the adapters the second product carries do get a gradient
        if t in targets:
            assert g_fused[names.index(t)].abs().sum() > 0, t


def test_fused_residual_is_what_the_model_runs(monkeypatch):
    """The option reaches the block: linear_residual runs twice per block (attention and MLP sites); without it,
    never."""
    import pgolf_kernels.linear_residual as lr

    calls = []
    orig = lr.linear_residual
    monkeypatch.setattr(lr, "linear_residual", lambda *a, **k: calls.append(a[2].shape) or orig(*a, **k))
    model = tiny_model(seed=3, num_layers=2)
    for on, n in ((False, 0), (True, 4)):
        cfg = TTTConfig(rank=8, chunk=16, window=64, batch_size=4, targets=("q", "o", "mlp"), fused_residual=on)
        calls.clear()
        rows_nll(model, batch(), DocLoRA(model, cfg, 4, torch.device("cpu"), "bmm"))
        assert len(calls) == n
    assert calls == [torch.Size([64, 64]), torch.Size([64, 128])] * 2   # W_o (d, d), W_down (d, 2d)
    # with the fused MLP, the MLP's site is mlp_residual (the derivative epilogue in its backward)
    mcalls = []
    morig = lr.mlp_residual
    monkeypatch.setattr(lr, "mlp_residual", lambda *a, **k: mcalls.append(1) or morig(*a, **k))
    cfg = TTTConfig(rank=8, chunk=16, window=64, batch_size=4, targets=("q", "o", "mlp"), fused_residual=True,
                    fused_mlp=True)
    calls.clear()
    rows_nll(model, batch(), DocLoRA(model, cfg, 4, torch.device("cpu"), "bmm"))
    assert len(calls) == 2 and len(mcalls) == 2


def test_eval_with_fused_residual_scores_like_without():
    # the wiring through evaluate() on EVAL_LENGTHS (a long one, a 1-token one, a partial chunk) at KERNEL_MODEL; the
    # kernel's math: tests/test_linear_residual.py
    assert_eval_unchanged([dict(fused_residual=True)], lengths=EVAL_LENGTHS, model_kw=KERNEL_MODEL)


def test_fused_residual_refusals_and_option():
    from train.eval import _parse

    with pytest.raises(ValueError, match=r"fused_residual: 'yes'; expected None \(auto\), True or False"):
        TTTConfig(fused_residual="yes")
    model = tiny_model(seed=3, num_layers=2)
    with pytest.raises(ValueError, match=r"fused_residual: needs model_dim \(64\), the MLP width \(128\) and the rank "
                                         r"\(4\) multiples of 8"):
        DocLoRA(model, TTTConfig(rank=4, fused_residual=True, targets=ALL), 2, torch.device("cpu"), "bmm")
    base = ["--artifact", "a", "--val", "v", "--tokenizer", "t"]
    assert _parse(base + ["--fused-residual", "on"]).ttt_cfg.fused_residual is True
    assert _parse(base + ["--fused-residual", "off"]).ttt_cfg.fused_residual is False
    assert _parse(base).ttt_cfg.fused_residual is None


@pytest.mark.parametrize("backend,rank,want", [("kernel", 8, True), ("bmm", 8, False), ("kernel", 4, False)])
def test_fused_residual_auto(backend, rank, want):
    """auto (None): on for the kernel path where model_dim, the MLP width and the rank are multiples of 8, off for the
    reference and for a rank of 4 (no refusal under auto); on / off as given."""
    model = tiny_model(seed=3, num_layers=2)
    cfg = TTTConfig(rank=rank, targets=ALL)
    assert DocLoRA(model, cfg, 2, torch.device("cpu"), backend).fused_residual is want
    if rank % 8 == 0:
        for given in (True, False):
            cfg = TTTConfig(rank=rank, targets=ALL, fused_residual=given)
            assert DocLoRA(model, cfg, 2, torch.device("cpu"), backend).fused_residual is given


@pytest.mark.gpu
def test_gpu_eval_with_fused_residual_scores_like_without():
    """On the GPU (the TMA kernels themselves): evaluate() with fused_residual, eager and with CUDA graphs, against
    the unfused eval: same targets and ledger, BPB within 1e-4."""
    assert_eval_unchanged([dict(fused_residual=True, cuda_graphs=g, graph_min_steps=1) for g in (False, True)],
                          device="cuda", backend="kernel", rel=1e-4)


@pytest.mark.gpu
def test_gpu_eval_with_mlp_residual_scores_like_without():
    """On the GPU: evaluate() with the fused MLP at the residual site (``mlp_residual``: the activation's derivative
    in the GEMM epilogue), eager and with CUDA graphs, against the unfused eval. Four documents (one longer than the
    window, a 1-token one, partial chunks): all eleven, after the case above in one test, ran past a 150 s limit."""
    assert_eval_unchanged([dict(fused_residual=True, fused_mlp=True, cuda_graphs=g, graph_min_steps=1)
                           for g in (False, True)], lengths=[300, 1, 77, 140], device="cuda", backend="kernel",
                          rel=1e-4)


def test_eval_with_mlp_residual_keeping_signs_scores_like_without(monkeypatch):
    """``linear_residual.MLP_SIGNS`` on (the backward's act' from act(h) and h's packed signs): evaluate() with the
    fused MLP at the residual site scores as the unfused eval (CPU; the kernels under the interpreter in the CPU
    lane)."""
    import pgolf_kernels.linear_residual as lr

    monkeypatch.setattr(lr, "MLP_SIGNS", True)
    calls = []
    real = lr.linear_act_signs
    monkeypatch.setattr(lr, "linear_act_signs", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    assert_eval_unchanged([dict(fused_residual=True, fused_mlp=True)], lengths=[90, 1, 40], model_kw=KERNEL_MODEL)
    assert calls   # the eval's MLP ran through the signs path


def test_o_fold_equals_the_composition(monkeypatch):
    """``adapters.O_FOLD``: the o adapter's shrink inside the q / k / v op (``multi_lora_linear``'s ``shrinks``) in
    every block whose o adapter reads h itself (block 0 here; the tail block reads the kept positions: its own bmm),
    with the records' targets on the kernel backend: same NLL and adapter gradients as the op-by-op block."""
    tail = True
    import pgolf_kernels.lora as lora
    import train.adapters as adapters

    monkeypatch.setattr(adapters, "O_FOLD", True)
    calls = []
    real = lora.multi_lora_linear
    monkeypatch.setattr(adapters, "resolve_lora_backend", lambda name, dev: (
        lambda *a, **k: (calls.append(len(k.get("shrinks") or [])), real(*a, **k))[1], "kernel", "test"))
    model = step_model()
    cfg = TTTConfig(rank=8, chunk=16, window=64, batch_size=4, alpha=12.0, targets=("q", "k", "v", "o", "mlp", "head"),
                    tail_block=tail, fused_mlp=True, fused_qk=True)
    assert_step_unchanged(model, batch(vocab=model.config.vocab_size), cfg, 4, "kernel", fused_residual=True)
    # q / k / v of each block in the fused run and the composition, then the head: the fused run's full-window
    # blocks carried the o shrink
    assert calls.count(1) == (1 if tail else 2)


def test_eval_with_o_fold_and_skip_kernel_scores_like_without(monkeypatch):
    """evaluate() on the kernel backend with ``adapters.O_FOLD`` (the o shrink inside the q / k / v op),
    ``model.SKIP_KERNEL`` (the U-Net skips through ``skip_add``), ``model.SKIP_FORK`` (their encoder outputs
    through ``skip_fork``) and ``model.JOIN_FOLD`` (each decoder joining its skip in its block) on scores as the unfused eval (CPU; the kernels under the interpreter in the CPU lane: two
    short documents, ~46 s per eval with three)."""
    import train.adapters as adapters
    import train.model as model_mod

    monkeypatch.setattr(adapters, "O_FOLD", True)
    monkeypatch.setattr(model_mod, "SKIP_KERNEL", True)
    monkeypatch.setattr(model_mod, "SKIP_FORK", True)
    monkeypatch.setattr(model_mod, "JOIN_FOLD", True)
    assert_eval_unchanged([dict(fused_residual=True)], lengths=[40, 1], backend="kernel", model_kw=KERNEL_MODEL)


# the switches the kernel path's eval has besides its options: (module, name, the value tested)
EVAL_SWITCHES = {"MLP_SIGNS": ("pgolf_kernels.linear_residual", "MLP_SIGNS", True),
                 "MLP_UP_WS": ("pgolf_kernels.linear_residual", "MLP_UP_WS", True),
                 "GRAD_WS": ("pgolf_kernels.linear_act", "GRAD_WS", True), "O_FOLD": ("train.adapters", "O_FOLD", True),
                 "SKIP_KERNEL": ("train.model", "SKIP_KERNEL", True), "SKIP_FORK": ("train.model", "SKIP_FORK", True),
                 "JOIN_FOLD": ("train.model", "JOIN_FOLD", True),
                 "NORM_KERNEL": ("train.model", "NORM_KERNEL", True),
                 "RES_WS": ("pgolf_kernels.linear_residual", "RES_WS", True),
                 "MLP_DOWN_ACT": ("pgolf_kernels.linear_residual", "MLP_DOWN_ACT", True),
                 "SUM_WS": ("pgolf_kernels.lora_merged", "SUM_WS", True),
                 "QKV_WS": ("pgolf_kernels.lora_merged", "QKV_WS", True),
                 "QK_LAYOUT_K": ("train.model", "QK_LAYOUT", "k-bhtd"), "QK_LAYOUT": ("train.model", "QK_LAYOUT", "bhtd")}


@pytest.mark.gpu
@pytest.mark.parametrize("switch", sorted(EVAL_SWITCHES))
def test_gpu_eval_with_mlp_residual_switches_scores_like_without(monkeypatch, switch):
    """On the GPU: evaluate() with ``mlp_residual`` and one switch on (``MLP_SIGNS``: h's signs kept instead
    of h; ``MLP_UP_WS``: the up-projection on the warp-specialized Gluon kernel; ``linear_act.GRAD_WS``: the
    backward's derivative GEMM on it; ``adapters.O_FOLD``: the o shrink inside the q / k / v op;
    ``model.SKIP_KERNEL``: the U-Net skips through ``skip_add``; ``model.SKIP_FORK``: their encoder outputs through
    ``skip_fork``; ``model.JOIN_FOLD``: each decoder's join inside its block; ``model.NORM_KERNEL``: the blocks' residual mix and
    norms through ``mix_norm``; ``linear_residual.RES_WS``: the residual sites' GEMM on
    the Gluon kernel; ``linear_residual.MLP_DOWN_ACT``: act(h) formed in that kernel's A operand; ``lora_merged.SUM_WS``:
    the merged backward's dx on it; ``lora_merged.QKV_WS``: the merged q / k / v forward in one launch of it;
    ``model.QK_LAYOUT``: k, or q and k, in (B, H, T, D)
    order), eager and with CUDA graphs (the kernels captured), against the unfused eval: same targets and ledger, BPB
    within 1e-4. Each switch is set to its tested value (its default is on for most: the test then pins it)."""
    import importlib

    gluon = ("MLP_UP_WS", "GRAD_WS", "RES_WS", "MLP_DOWN_ACT", "SUM_WS", "QKV_WS")
    if switch in gluon and torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon kernel is sm_90 only")
    mod, name, value = EVAL_SWITCHES[switch]
    monkeypatch.setattr(importlib.import_module(mod), name, value)
    # with the fused q / k pass too (the kernel path's default, and what QK_LAYOUT acts on)
    assert_eval_unchanged([dict(fused_residual=True, fused_mlp=True, fused_qk=True, cuda_graphs=g, graph_min_steps=1)
                           for g in (False, True)], lengths=[300, 1, 77, 140], device="cuda", backend="kernel",
                          rel=1e-4)
