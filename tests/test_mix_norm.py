"""pgolf_kernels.mix_norm: a block's residual mix and RMS norm (xm = m0 ⊙ x + m1 ⊙ x0, h = rms_norm(xm)) and the norm
alone, forward and backward, against the fp64 oracle with torch's own low-precision composition as the bound; every
dispatch path (the kernel under the interpreter on the CPU lane, on the GPU at the records' shapes in bf16), awkward
widths, outputs NaN-filled, gradients through either output alone, bad arguments refused by name,
torch.compile(fullgraph=True), CUDA-graph capture, and the model's switch (the TTT step with ``model.NORM_KERNEL`` on
runs every block through the ops, with the NLL and adapter gradients of the torch norms; its eval on the GPU:
tests/test_fused_residual.py's EVAL_SWITCHES)."""
from __future__ import annotations

import pytest
import torch

from conftest import ACT_DTYPES, BenchSmoke, DEVICE, HAS_CUDA, draw_seed
from pgolf_kernels import _utils
from pgolf_kernels.mix_norm import MixRMSNorm, mix_rms_norm, mix_rms_norm_ref, rms_norm_ref, rms_norm_rows
from pgolf_kernels.testing import assert_close_rel, nan_empty


@pytest.fixture(autouse=True)
def _nan_outputs(monkeypatch):
    monkeypatch.setattr(_utils, "empty", nan_empty)


def _inputs(shape, dtype, seed=None, device=DEVICE):
    g = torch.Generator().manual_seed(draw_seed() if seed is None else seed)
    x, x0, gxm, gh = (torch.randn(shape, generator=g) for _ in range(4))
    # the records' mix: near (1, 0) after training, both terms non-zero here so each gradient is exercised
    mix = torch.stack((1 + 0.3 * torch.randn(shape[-1], generator=g), 0.5 * torch.randn(shape[-1], generator=g)))
    return [t.to(device, dtype) for t in (x, x0, mix, gxm, gh)]


def _run(fn, leaves, gxm, gh):
    xm, h = fn(*leaves)
    loss = (h.to(gh.dtype) * gh).sum() if gxm is None else (xm.to(gxm.dtype) * gxm).sum() + (h.to(gh.dtype) * gh).sum()
    loss.backward()
    return xm, h


def _check_mix(shape, dtype, mix_grad=False, use_xm=True, x0_grad=True):
    x, x0, mix, gxm, gh = _inputs(shape, dtype)
    gxm = gxm if use_xm else None
    need = (True, x0_grad, mix_grad)
    ours = [t.clone().requires_grad_(n) for t, n in zip((x, x0, mix), need)]
    xm, h = _run(mix_rms_norm, ours, gxm, gh)
    base = [t.clone().requires_grad_(n) for t, n in zip((x, x0, mix), need)]
    xm_b, h_b = _run(mix_rms_norm_ref, base, gxm, gh)
    orc = [t.double().requires_grad_(n) for t, n in zip((x, x0, mix), need)]
    xm_o, h_o = _run(mix_rms_norm_ref, orc, None if gxm is None else gxm.double(), gh.double())
    assert_close_rel(xm, xm_o, xm_b, name="xm")
    assert_close_rel(h, h_o, h_b, name="h")
    assert_close_rel(ours[0].grad, orc[0].grad, base[0].grad, name="dx")
    if x0_grad:
        assert_close_rel(ours[1].grad, orc[1].grad, base[1].grad, name="dx0")
    else:
        assert ours[1].grad is None
    if mix_grad:
        # fp32 sums over rows against torch's low-precision ones: the floor covers bf16's rounding of dmix
        assert_close_rel(ours[2].grad, orc[2].grad, base[2].grad, floor=1e-2 if dtype != torch.float32 else 1e-6,
                         name="dmix")
    else:
        assert ours[2].grad is None


SHAPES = [(2, 5, 64), (3, 7, 24), (1, 1, 1), (4, 33), (130, 512), (2, 3, 700)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", ACT_DTYPES + [torch.float32], ids=str)
def test_mix_rms_norm_forward_backward_against_fp64(shape, dtype):
    _check_mix(shape, dtype)


@pytest.mark.parametrize("dtype", ACT_DTYPES + [torch.float32], ids=str)
def test_mix_rms_norm_mix_gradient(dtype):
    _check_mix((3, 9, 40), dtype, mix_grad=True)


def test_mix_rms_norm_gradient_through_h_alone():
    """xm unused after the op (its gradient None in the backward): the gradients come through h only."""
    _check_mix((2, 6, 48), ACT_DTYPES[0], use_xm=False)


@pytest.mark.parametrize("mix_grad", [False, True])
def test_mix_rms_norm_x0_without_gradient(mix_grad):
    """x0 not needing a gradient (a TTT step: the embedding is frozen): the backward writes ∂x only, by either
    backward (the one-pass kernel without the mix's gradient, the torch ops with it)."""
    _check_mix((3, 5, 72), ACT_DTYPES[0], mix_grad=mix_grad, x0_grad=False)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", ACT_DTYPES + [torch.float32], ids=str)
def test_rms_norm_rows_forward_backward_against_fp64(shape, dtype):
    x, _, _, _, gh = _inputs(shape, dtype)
    ours, base, orc = x.clone().requires_grad_(), x.clone().requires_grad_(), x.double().requires_grad_()
    h = rms_norm_rows(ours)
    (h.to(gh.dtype) * gh).sum().backward()
    h_b = rms_norm_ref(base)
    (h_b * gh).sum().backward()
    h_o = rms_norm_ref(orc)
    (h_o * gh.double()).sum().backward()
    assert_close_rel(h, h_o, h_b, name="h")
    assert_close_rel(ours.grad, orc.grad, base.grad, name="dx")


def test_the_norm_is_of_the_stored_xm():
    """h is the norm of the rounded xm the op returns (the tensor its backward reads), not of the unrounded sum."""
    x, x0, mix, _, _ = _inputs((4, 8, 64), ACT_DTYPES[0])
    xm, h = mix_rms_norm(x, x0, mix)
    torch.testing.assert_close(h, rms_norm_rows(xm), rtol=0, atol=0)


def test_mix_rms_norm_module_matches_the_function():
    x, x0, mix, _, _ = _inputs((2, 6, 16), torch.float32)
    m = MixRMSNorm(16).to(DEVICE)
    assert torch.equal(m.resid_mix.detach().cpu(), torch.stack((torch.ones(16), torch.zeros(16))))
    with torch.no_grad():
        m.resid_mix.copy_(mix)
    for a, b in zip(m(x, x0), mix_rms_norm(x, x0, mix)):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="MixRMSNorm: d must be an int >= 1"):
        MixRMSNorm(0)


def _bad(args, match, exc=ValueError, fn=mix_rms_norm):
    with pytest.raises(exc, match=match):
        fn(*args)


def test_refuses_bad_input_by_name():
    x, x0, mix, _, _ = _inputs((2, 3, 8), torch.float32, seed=0, device="cpu")
    _bad((x.long(), x0, mix), "mix_rms_norm: x must have dtype", TypeError)
    _bad((x, x0.half(), mix), "mix_rms_norm: x0 must have dtype", TypeError)
    _bad((x, x0[:, :2], mix), r"mix_rms_norm: x0 must have x's shape \(2, 3, 8\)")
    _bad((x, x0, mix[:, :4]), r"mix_rms_norm: mix must be \(2, d\) = \(2, 8\)")
    _bad((x, x0, mix[0]), "mix_rms_norm: mix must have 2 dimensions")
    _bad((x, x0, mix.half()), "mix_rms_norm: mix must have dtype", TypeError)
    _bad((x.transpose(0, 1), x0.transpose(0, 1), mix), "mix_rms_norm: x must be contiguous")
    _bad((x, x0.transpose(0, 1).contiguous().transpose(0, 1), mix), "mix_rms_norm: x0 must be contiguous")
    _bad((torch.zeros(()), torch.zeros(()), mix), "mix_rms_norm: x must have a last dimension")
    _bad((x.int(),), "rms_norm_rows: x must have dtype", TypeError, fn=rms_norm_rows)
    _bad((x.transpose(0, 1),), "rms_norm_rows: x must be contiguous", fn=rms_norm_rows)
    if HAS_CUDA:
        _bad((x.cuda(), x0, mix.cuda()), "mix_rms_norm: x0 is on cpu but must be on cuda")


def test_compiles_fullgraph():
    x, x0, mix, gxm, gh = _inputs((2, 5, 32), ACT_DTYPES[0])

    def f(a, b, c):
        xm, h = mix_rms_norm(a, b, c, validate=False)
        return xm * 2, rms_norm_rows(h * 3, validate=False)

    cf = torch.compile(f, fullgraph=True, dynamic=True)
    leaves = [t.clone().requires_grad_(i != 2) for i, t in enumerate((x, x0, mix))]
    base = [t.clone().requires_grad_(i != 2) for i, t in enumerate((x, x0, mix))]
    for fn, ls in ((cf, leaves), (f, base)):
        xm, h = fn(*ls)
        ((xm * gxm).sum() + (h * gh).sum()).float().backward()
    torch.testing.assert_close(cf(*leaves)[1], f(*base)[1], rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(leaves[0].grad, base[0].grad, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(leaves[1].grad, base[1].grad, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("backend,tail,compiled", [("bmm", False, True), ("kernel", True, False)])
def test_step_with_norm_kernel_equals_the_torch_norms(monkeypatch, backend, tail, compiled):
    """The TTT step with ``model.NORM_KERNEL`` on (residual sites fused): the NLL at every scored position and every
    adapter gradient as with the torch mix and norms, within fp32 rounding (tests.test_fused_mlp.assert_step_unchanged,
    the tiny model at d 32, both backends, with and without the tail block), once under the eval's regional compile
    (``compile_rows_nll``: the ops traced without a graph break); the mix moved off its (1, 0) start so x0's term
    counts."""
    import torch._dynamo as dynamo

    from train.forward import compile_rows_nll

    import pgolf_kernels.mix_norm as mod
    import train.model as model_mod
    from tests.test_fused_mlp import ALL, _nll_and_grads, assert_step_unchanged, batch, step_model
    from train.ttt_config import TTTConfig

    model = step_model()
    g = torch.Generator().manual_seed(draw_seed())
    with torch.no_grad():
        for b in model.blocks:
            b.resid_mix.add_(0.3 * torch.randn(b.resid_mix.shape, generator=g))
    cfg = TTTConfig(rank=8, chunk=16, window=64, batch_size=4, alpha=12.0, targets=ALL, tail_block=tail,
                    fused_qk=False, fused_residual=True, fused_mlp=False)
    rb = batch(cfg.window, model.config.vocab_size)
    plain = _nll_and_grads(model, rb, cfg, 4, backend)
    calls = []
    for name in ("_mix_op", "_norm_op"):
        real = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _r=real, _n=name: calls.append(_n) or _r(*a))
    monkeypatch.setattr(model_mod, "NORM_KERNEL", True)
    if compiled:
        compile_rows_nll(model, True)
        dynamo.utils.counters.clear()
    try:
        assert_step_unchanged(model, rb, cfg, 4, backend, plain=plain)
    finally:
        if compiled:
            compile_rows_nll(model, False)
    n = len(model.blocks)
    if compiled:  # traced: the ops run inside the compiled graph (the counting wrappers are traced once)
        assert dict(dynamo.utils.counters["graph_break"]) == {}
        assert calls.count("_mix_op") >= 1 and calls.count("_norm_op") >= 1, calls
    else:
        assert calls.count("_mix_op") == n and calls.count("_norm_op") == n, calls


def test_kernels_compile_for_sm90_with_16_byte_accesses():
    """Triton's compiler + bundled ptxas build the forward (mix + norm, norm alone) and backward (with and without ∂x0)
    for sm_90a on this machine (no GPU needed), as a launch at the records' shapes specializes them: no spills, every
    access to the (rows, d) tensors 16 bytes wide (4 loads or stores per tensor a thread at 8 rows x 512, 4 warps)."""
    from conftest import run_sm90_check

    run_sm90_check("from pgolf_kernels.sm90_check import mix_norm_stats\n"
                   "for kw, ld, st in ((dict(), 8, 8), (dict(has_mix=False), 4, 4), (dict(bwd=True), 12, 4),\n"
                   "                   (dict(bwd=True, need_dx0=True), 12, 8), (dict(bwd=True, has_gxm=False), 8, 4)):\n"
                   "    s = mix_norm_stats(**kw)\n"
                   "    assert s['spill_bytes'] == 0 and s['ld_b16'] == 0 and s['st_b16'] == 0, (kw, s)\n"
                   "    assert (s['ld_v4'], s['st_v4']) == (ld, st), (kw, s)\n")


gpu = pytest.mark.skipif(not HAS_CUDA, reason="GPU lane: needs a CUDA device")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("mix_grad", [False, True])
def test_gpu_records_shape_bf16(mix_grad):
    """The records' TTT step's block input: 64 rows x 2048 positions x 512, bf16."""
    _check_mix((64, 2048, 512), torch.bfloat16, mix_grad=mix_grad)


@pytest.mark.gpu
@gpu
def test_gpu_every_tile_candidate():
    """Each of ``NORM_CONFIGS`` (the bench's candidates) against the oracle at the records' width."""
    from pgolf_kernels import mix_norm

    x, x0, mix, _, _ = _inputs((8, 300, 512), torch.bfloat16)
    xm_o, h_o = mix_rms_norm_ref(x.double(), x0.double(), mix.double())
    xm_b, h_b = mix_rms_norm_ref(x, x0, mix)
    gh = torch.randn_like(x)
    xm0, _, r0 = mix_norm._launch(x, x0, mix)
    # the backward's oracle on the op's own xm and r (fp64), and torch's low-precision composition as the bound
    n = xm0.double() * r0.double()[..., None]
    g_o = r0.double()[..., None] * (gh.double() - n * (gh.double() * n).mean(-1, keepdim=True))
    g_b = mix_norm._norm_grad(xm0, r0, gh).to(x.dtype)
    for cfg in mix_norm.NORM_CONFIGS:
        xm, h, r = mix_norm._launch(x, x0, mix, cfg)
        assert_close_rel(xm, xm_o, xm_b, name=f"xm {cfg}")
        assert_close_rel(h, h_o, h_b, name=f"h {cfg}")
        assert torch.isfinite(r).all(), cfg
        dx, dx0 = mix_norm._launch_bwd(xm0, r0, gh, None, mix, True, cfg)
        assert_close_rel(dx, mix[0].double() * g_o, mix[0] * g_b, name=f"dx {cfg}")
        assert_close_rel(dx0, mix[1].double() * g_o, mix[1] * g_b, name=f"dx0 {cfg}")


@pytest.mark.gpu
@gpu
def test_gpu_cuda_graph_replay_equals_eager():
    x, x0, mix, _, _ = _inputs((4, 256, 512), torch.bfloat16)
    mix_rms_norm(x, x0, mix)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = mix_rms_norm(x, x0, mix)
    x.copy_(x.flip(1))
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(out, mix_rms_norm(x, x0, mix)):
        assert torch.equal(a, b)


def test_the_bench_runs_and_checks_on_a_tiny_shape():
    """bench.bench_mix_norm's rows at a tiny shape (stand-in timers and compile): every contestant runs, the
    correctness check passes, the rows carry the figures the docs cite."""
    from bench.bench_mix_norm import measure

    smoke = BenchSmoke()
    rows = measure(torch.device("cpu"), 2, 8, 32, smoke.timer, smoke.compile, torch.float32,
                   graph_timer=smoke.graph_timer, configs=[None])
    calls, graph_calls = smoke.calls, smoke.graph_calls
    assert [r["case"] for r in rows] == ["B2 T8 d32, float32, mix + norm, forward",
                                         "B2 T8 d32, float32, norm, forward",
                                         "B2 T8 d32, float32, mix + norm, forward + backward (CUDA-graph replay)"]
    assert len(calls) == 6 and len(graph_calls) == 3
    assert all(r["speedup"] == 1.0 and r["compiled_speedup"] == 1.0 and r["ours_gbps"] > 0 for r in rows)
