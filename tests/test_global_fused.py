"""``train.adapters.FusedBase`` / ``base_view``: the phased recipe's global passes through the kernel path's fused ops
(q / k norm and rotary, both residual sites, the fused MLP, the skips) give the NLL and the gradient of every base
weight that the blocks' own torch ops give (fp32, CPU; the kernels under the interpreter in the CPU lane), and the
same weights after a whole ``global_pass``. GPU lane: the same at bf16 on the records' block shapes."""
import copy

import numpy as np
import pytest
import torch

from tests.test_eval_recipe import global_case
from tests.test_fused_mlp import KERNEL_MODEL, batch
from train import adapters
from train.adapters import FusedBase, base_view, fused_choices
from train.eval_fixtures import doc_stream, tiny_model
from train.forward import rows_nll
from train.phased import global_pass
from train.rows import split_docs
from train.scoring import make_state
from train.ttt_config import recipe

pytestmark = pytest.mark.usefixtures("one_thread")


def _nll_and_grads(model, rb, view):
    """NLL of the rows and ∂(Σ masked NLL)/∂p of every floating-point parameter, the model left as it was."""
    params = dict((n, p) for n, p in model.named_parameters() if p.is_floating_point())
    for p in params.values():
        p.requires_grad_(True)
    try:
        nll = rows_nll(model, rb, view)
        (nll * rb.mask).sum().backward()
        return nll.detach(), {n: p.grad.clone() for n, p in params.items() if p.grad is not None}
    finally:
        for p in params.values():
            p.grad = None
            p.requires_grad_(False)


@pytest.mark.parametrize("qk,mlp", [(True, True), (False, False), (True, False), (False, True)])
def test_fused_base_equals_the_blocks_own_ops(qk, mlp, monkeypatch):
    """Every combination of the view's fusions: same NLL at every scored position, and a gradient for every
    parameter the plain forward trains (residual gains, resid_mix, q gain, skip weights, every projection) equal
    within fp32 rounding; the fused ops did run (counted)."""
    import pgolf_kernels.head_norm_rope as hnr
    import pgolf_kernels.linear_residual as lr
    import pgolf_kernels.skip_add as sk
    import train.model as model_mod

    calls = {}
    for mod, name in ((lr, "linear_residual"), (lr, "mlp_residual"), (hnr, "head_norm_rope"), (sk, "skip_add"),
                      (sk, "skip_join"), (sk, "skip_join_inline")):
        def spy(*a, _f=getattr(mod, name), _n=name, **k):
            calls[_n] = calls.get(_n, 0) + 1
            return _f(*a, **k)
        monkeypatch.setattr(mod, name, spy)
    # 2 encoder and 2 decoder blocks: the skips run; KERNEL_MODEL's d 32 / vocab 256 (the interpreted kernels' cost)
    model = tiny_model(seed=3, num_layers=4, **KERNEL_MODEL)
    rb = batch(vocab=model.config.vocab_size)
    plain, g_plain = _nll_and_grads(model, rb, None)
    assert calls == {}
    fused, g_fused = _nll_and_grads(model, rb, FusedBase(qk, True, mlp))
    assert calls.get("linear_residual", 0) == 4 * (1 + (not mlp)) and calls.get("mlp_residual", 0) == 4 * mlp
    # the 2 decoders' joins: inside the blocks (JOIN_FOLD, the default), before them (skip_join) or skip_add alone
    join = ("skip_join_inline" if model_mod.JOIN_FOLD else "skip_join") if model_mod.SKIP_FORK else "skip_add"
    assert calls.get("head_norm_rope", 0) == 8 * qk and calls.get(join, 0) == 2
    m = rb.mask
    torch.testing.assert_close(fused[m], plain[m], rtol=1e-5, atol=1e-5)
    assert sorted(g_fused) == sorted(g_plain)
    for name in ("blocks.0.attn_scale", "blocks.0.mlp_scale", "blocks.0.resid_mix", "blocks.0.attn.q_gain",
                 "skip_weights", "blocks.3.mlp.proj.weight", "blocks.1.attn.c_k.weight"):
        assert name in g_plain and g_plain[name].abs().sum() > 0, name
    for name, g in g_plain.items():
        torch.testing.assert_close(g_fused[name], g, rtol=1e-4, atol=1e-6, msg=lambda s: f"{name}: {s}")


def test_global_pass_under_the_view_moves_the_weights_as_without_it(lut):
    """A whole global pass (3 SGD steps with momentum and clipping): the weights after it equal the plain pass's."""
    m, stream, _, cfg, rows = global_case()
    m2 = copy.deepcopy(m)
    infos = []
    for model, view in ((m, None), (m2, FusedBase(True, True, True))):
        st = make_state(stream, lut)
        st.ledger.count[:] = 1  # every target "scored" (the math here; legality: tests/test_compliance.py)
        infos.append(global_pass(model, stream, rows, cfg, st, view=view))
    assert infos[0]["steps"] == infos[1]["steps"] >= 3
    before = tiny_model(seed=3)
    for (name, a), b, b0 in zip(m.named_parameters(), m2.parameters(), before.parameters()):
        if name == "blocks.0.attn_scale":
            assert not torch.equal(a, b0)       # the pass did move the weights
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=lambda s: f"{name}: {s}")


def test_base_view_follows_the_path_and_the_switch(monkeypatch):
    """With GLOBAL_FUSED on the kernel path gets the fusions its TTT steps use; the reference, a config without
    fused_residual and GLOBAL_FUSED off (the default) get None; a view without fused_residual is refused by name."""
    monkeypatch.setattr(adapters, "GLOBAL_FUSED", True)
    model = tiny_model(seed=0)
    cfg = recipe("records")
    view = base_view(model, cfg, "kernel", "cpu")
    assert isinstance(view, FusedBase)
    assert (view.fused_qk, view.fused_residual, view.fused_mlp) == fused_choices(model, cfg, "kernel")
    assert view.layer(0) is view.layer(5) and view.layer(0).fused_mlp == view.fused_mlp
    assert base_view(model, cfg, "bmm", "cpu") is None
    from dataclasses import replace

    assert base_view(model, replace(cfg, fused_residual=False), "kernel", "cpu") is None
    monkeypatch.setattr(adapters, "GLOBAL_FUSED", False)
    assert base_view(model, cfg, "kernel", "cpu") is None
    with pytest.raises(ValueError, match="FusedBase: needs fused_residual"):
        FusedBase(True, False, True)


def test_profile_global_per_step_figures():
    """bench.profile_global._per_step: profile_ttt's figures over whole passes, divided by the steps of a pass (a CPU
    stand-in pass: no CUDA kernels, so zero GPU time; the wall is positive)."""
    from bench.profile_global import _per_step

    wall, busy, table, cats, groups = _per_step(lambda: torch.ones(64).cumsum(0), 4, 5)
    assert wall > 0 and busy == 0 and table == [] and cats == {} and groups == {}


def test_profile_global_refuses_bad_arguments():
    from bench.profile_global import main

    with pytest.raises(SystemExit, match="--variants"):
        main(["--variants", "kernel,bogus"])
    with pytest.raises(SystemExit, match="--chunks must be >= 2"):
        main(["--chunks", "1"])


@pytest.mark.gpu
@pytest.mark.parametrize("mlp", [True, False])
def test_gpu_fused_base_at_the_records_block_shapes(mlp):
    """On the GPU, bf16, the records' block (d 512, 8 / 4 heads, MLP 3x; the Gluon kernels where they run), rows of up
    to 300 positions: NLL and every base weight's gradient under ``FusedBase`` against an fp32 run of the plain
    blocks, within 3x the error of the plain blocks in bf16 (torch's own path)."""
    from pgolf_kernels.testing import assert_close_rel

    model = tiny_model(seed=7, num_layers=4, model_dim=512, num_heads=8, num_kv_heads=4, mlp_mult=3,
                       seq_len=2048).cuda()
    stream = doc_stream([300, 1, 77, 140], seed=11)
    starts, _ = split_docs(stream)
    rows = np.array([[starts[0], 200, 300], [starts[1], 0, 1], [starts[2], 10, 77], [starts[3], 0, 140]])
    from train.rows import build_rows

    rb = build_rows(stream.cuda(), rows, 256)
    oracle, g_oracle = _nll_and_grads(model, rb, None)
    bf = model.to(torch.bfloat16)
    plain, g_plain = _nll_and_grads(bf, rb, None)
    fused, g_fused = _nll_and_grads(bf, rb, FusedBase(True, True, mlp))
    m = rb.mask
    assert_close_rel(fused[m].double(), oracle[m].double(), plain[m].double(), factor=3.0, name="nll")
    assert sorted(g_fused) == sorted(g_plain) == sorted(g_oracle)
    for name in g_oracle:
        assert_close_rel(g_fused[name].double(), g_oracle[name].double(), g_plain[name].double(), factor=3.0,
                         floor=1e-5, name=name)
