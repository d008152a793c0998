"""multi_lora_linear / BatchedLoRALinear: fused Triton kernels vs an fp64 autograd oracle.

CPU lane: the kernels run under TRITON_INTERPRET=1 in fp16/fp32 at tiny awkward shapes (T = 1, 7, 63; r = 1, 3, 8;
d and out not multiples of the interpreter's 32-wide tiles; padded rows and rows of length 0). Tolerance: the kernel's
error vs the fp64 oracle must be <= 2x the error of torch's own low-precision path (the reference run in the
activation dtype, adapters cast to it) vs the same oracle. Outputs are NaN-poisoned before the kernels write them.
GPU lane: bf16 at the benchmark shapes, int6 base, compile(fullgraph) vs eager, CUDA-graph replay of
forward + backward + Adam step.
"""
import math
from collections import namedtuple

import pytest
import torch

from pgolf_kernels import _utils, lora
from pgolf_kernels.lora import BatchedLoRALinear, multi_lora_linear, multi_lora_linear_ref, zero_adam_state_
from pgolf_kernels.testing import assert_close_rel, nan_empty
from conftest import draw_seed
from pgolf_kernels._utils import use_triton

try:   # the int6 engineer's QTensor (NamedTuple q/scale/bits); the op duck-types it, so a stand-in also works
    from pgolf_kernels.quant import QTensor as QT
except ImportError:  # pragma: no cover
    QT = namedtuple("QT", "q scale bits")


@pytest.fixture(params=["fused", "split", "gonce", "gonce-split"])
def bwd_strategy(request, monkeypatch):
    """Every backward strategy: dx's base part in the kernel ("fused") or by cuBLAS with the kernel adding the
    LoRA part ("split"), each in one launch or as "G once" (a G pass, then the dx pass reading it)."""
    from pgolf_kernels import lora_triton

    monkeypatch.setitem(lora_triton.BWD_OVERRIDE, "SPLIT", request.param.endswith("split"))
    monkeypatch.setitem(lora_triton.BWD_OVERRIDE, "GONCE", request.param.startswith("gonce"))
    return request.param


@pytest.fixture(autouse=True)
def _nan_outputs(monkeypatch):
    # every buffer the kernels must fully overwrite (y_i, dx) starts as NaN
    monkeypatch.setattr(_utils, "empty", nan_empty)


def _make(B, T, d, outs, r, dtype, device, *, n_adapters=None, quant=(), adapter_dtype=torch.float32, seed=None):
    # seed None: drawn from the global generator, which conftest seeds from the test's id (reproducible)
    g = torch.Generator().manual_seed(seed if seed is not None else int(torch.randint(0, 2 ** 31, (1,))))
    n = n_adapters or B

    def rnd(*s, scale=1.0):
        return (torch.randn(*s, generator=g) * scale)

    x = rnd(B, T, d).to(dtype).to(device)
    bases = []
    for i, o in enumerate(outs):
        if i in quant:
            q = torch.randint(-31, 32, (o, d), generator=g, dtype=torch.int8)
            s = (torch.rand(o, generator=g) * 0.5 + 0.5) / (31 * math.sqrt(d))
            bases.append(QT(q.to(device), s.to(torch.float16).to(device), 6))
        else:
            bases.append(rnd(o, d, scale=d ** -0.5).to(dtype).to(device))
    # B is random (not the zero init) so the LoRA path carries signal of the same order as the base
    As = [rnd(n, r, d, scale=d ** -0.5).to(adapter_dtype).to(device) for _ in outs]
    Bs = [rnd(n, o, r, scale=r ** -0.5).to(adapter_dtype).to(device) for o in outs]
    return x, bases, As, Bs


def _to64(bases):
    out = []
    for b in bases:
        if isinstance(b, QT):
            out.append(QT(b.q, b.scale.double(), b.bits))
        else:
            out.append(b.double())
    return out


def _run(fn, x, bases, As, Bs, dys=None, **kw):
    x = x.detach().requires_grad_()
    As = [a.detach().requires_grad_() for a in As]
    Bs = [b.detach().requires_grad_() for b in Bs]
    ys = fn(x, bases, As, Bs, **kw)
    if dys is None:
        dys = [torch.randn_like(y) for y in ys]
    grads = torch.autograd.grad(ys, [x, *As, *Bs], [d.to(y.dtype) for d, y in zip(dys, ys)])
    return ys, list(grads), dys


def _check_all(x, bases, As, Bs, **kw):
    """Kernel vs fp64 oracle, bounded by 2x the error of torch's low-precision path; returns kernel results."""
    ys, gk, dys = _run(multi_lora_linear, x, bases, As, Bs, **kw)
    kw_ref = {k: v for k, v in kw.items() if k != "deterministic"}
    yb, gb, _ = _run(multi_lora_linear_ref, x, bases, As, Bs, dys=dys, **kw_ref)
    yo, go, _ = _run(multi_lora_linear_ref, x.double(), _to64(bases), [a.double() for a in As],
                     [b.double() for b in Bs], dys=[d.double() for d in dys], **kw_ref)
    ns = len(bases)
    names = [f"y{i}" for i in range(ns)] + ["dx"] + [f"dA{i}" for i in range(ns)] + [f"dB{i}" for i in range(ns)]
    for name, k, b, o in zip(names, list(ys) + gk, list(yb) + gb, list(yo) + go):
        assert k.dtype == b.dtype, f"{name}: dtype {k.dtype} != {b.dtype}"
        assert_close_rel(k, o, b, name=name)
    return ys, gk


# ------------------------------------------------------------------------------------------------ CPU lane + GPU lane
@pytest.mark.parametrize("T,r,lens", [(1, 1, None), (7, 3, [7, 0, 3]), (63, 8, [63, 17, 0]), (63, 3, None)],
                         ids=["T1-r1", "T7-r3-len", "T63-r8-len", "T63-r3"])
def test_forward_backward_matches_oracle(device, act_dtype, T, r, lens, bwd_strategy):
    # dA/dB errors come from the rounding of the few values of g/u per adapter row: at T=1 a 3-row batch gives
    # only 3 independent roundings and the error ratio vs torch's path spreads 0.1..1.7 over seeds; 32 rows keep
    # that statistic stable. d and out cross the 32-wide interpreter tiles with a ragged edge.
    B, d, outs = (32 if T == 1 else 8 if T < 63 else 3), 40, [40, 24]
    x, bases, As, Bs = _make(B, T, d, outs, r, act_dtype, device)
    lengths = torch.tensor((lens * B)[:B], device=device) if lens is not None else None
    _check_all(x, bases, As, Bs, alpha=0.7, lengths=lengths)


def test_padding_semantics(device, act_dtype):
    """Padded rows: y is exactly the base output, no adapter grads; a length-0 row's adapters get exactly zero."""
    B, T, d, outs, r = 3, 20, 40, [40, 24], 3
    x, bases, As, Bs = _make(B, T, d, outs, r, act_dtype, device)
    lengths = torch.tensor([20, 0, 5], device=device)
    ys, g = _check_all(x, bases, As, Bs, lengths=lengths)
    y0 = multi_lora_linear(x, bases, As, [torch.zeros_like(b) for b in Bs])   # LoRA off: base only
    for y, yb in zip(ys, y0):
        assert torch.equal(y[1], yb[1]), "length-0 row must be pure base output"
        assert torch.equal(y[2, 5:], yb[2, 5:]), "padded tail must be pure base output"
        assert not torch.equal(y[2, :5], yb[2, :5]), "valid rows must carry the LoRA delta"
    dA, dB = g[1:1 + len(outs)], g[1 + len(outs):]
    for t in dA + dB:
        assert torch.count_nonzero(t[1]) == 0, "adapter of a length-0 row must get zero grads"
        assert torch.count_nonzero(t[0]) > 0


def test_padded_rows_do_not_leak_into_grads(device):
    """Changing x and dy in padded positions changes nothing but the base part of dx there."""
    B, T, d, outs, r = 2, 18, 40, [40], 3
    x, bases, As, Bs = _make(B, T, d, outs, r, torch.float16, device)
    lengths = torch.tensor([9, 18], device=device)
    dys = [torch.randn(B, T, outs[0], device=device)]
    # deterministic: on a GPU the default mode's atomic adds may land in a different order run to run
    _, g1, _ = _run(multi_lora_linear, x, bases, As, Bs, dys=dys, lengths=lengths, deterministic=True)
    x2, dys2 = x.clone(), [dys[0].clone()]
    x2[0, 9:] = torch.randn_like(x2[0, 9:])
    dys2[0][0, 9:] = torch.randn_like(dys2[0][0, 9:])
    _, g2, _ = _run(multi_lora_linear, x2, bases, As, Bs, dys=dys2, lengths=lengths, deterministic=True)
    for a, b in zip(g1[1:], g2[1:]):
        assert torch.equal(a, b)
    assert torch.equal(g1[0][:, :9], g2[0][:, :9]) and torch.equal(g1[0][1], g2[0][1])


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_adapter_index(device, deterministic, bwd_strategy):
    """Rows share adapters (duplicates in adapter_index); n_adapters > B; grads add up per adapter."""
    B, T, d, outs, r = 4, 9, 40, [40, 24], 3
    x, bases, As, Bs = _make(B, T, d, outs, r, torch.float16, device, n_adapters=5)
    idx = torch.tensor([3, 0, 3, 1], device=device)
    lengths = torch.tensor([9, 4, 0, 9], device=device)
    _, g = _check_all(x, bases, As, Bs, adapter_index=idx, lengths=lengths, deterministic=deterministic)
    for t in g[1:]:
        assert torch.count_nonzero(t[2]) == 0 and torch.count_nonzero(t[4]) == 0   # unused adapters


def test_deterministic_bitwise(device, act_dtype):
    B, T, d, outs, r = 2, 63, 40, [40, 24], 8
    x, bases, As, Bs = _make(B, T, d, outs, r, act_dtype, device, seed=1)
    dys = [torch.randn(B, T, o, device=device) for o in outs]
    _, g1, _ = _run(multi_lora_linear, x, bases, As, Bs, dys=dys, deterministic=True)
    _, g2, _ = _run(multi_lora_linear, x, bases, As, Bs, dys=dys, deterministic=True)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


@pytest.mark.skipif(torch.cuda.is_available(), reason="bitwise across strategies: the interpreter's dots only")
def test_g_once_equals_the_one_launch_backward_bitwise(monkeypatch):
    """Deterministic mode: "G once" stores the very alpha m g the one-launch dx programs form (same dots, same order)
    and adds it in the same place, so dx, dA and dB are bitwise those of the one-launch backward; padded rows and a
    wholly padded T-tile included (their G rows are never read: the buffer starts NaN)."""
    from pgolf_kernels import lora_triton

    B, T, d, outs, r = 3, 40, 48, [40, 24], 5
    x, bases, As, Bs = _make(B, T, d, outs, r, torch.float32, "cpu", seed=11)
    dys = [torch.randn(B, T, o, generator=torch.Generator().manual_seed(12)) for o in outs]
    lengths = torch.tensor([40, 13, 0])
    got = {}
    for g_once in (False, True):
        monkeypatch.setitem(lora_triton.BWD_OVERRIDE, "GONCE", g_once)
        got[g_once] = _run(multi_lora_linear, x, bases, As, Bs, dys=dys, lengths=lengths, deterministic=True)[1]
    for a, b in zip(got[False], got[True]):
        assert torch.equal(a, b)


def test_int6_base_and_mixed_slices(device, act_dtype, bwd_strategy):
    """Quantized (codes + row scale) and dense bases in one call; 5 slices = two kernel groups."""
    B, T, d, r = 2, 7, 40, 3
    outs = [40, 24, 32, 8, 16]
    x, bases, As, Bs = _make(B, T, d, outs, r, act_dtype, device, quant=(0, 3))
    _check_all(x, bases, As, Bs, alpha=2.0, lengths=torch.tensor([7, 2], device=device))


def test_int6_base_large_m_path(device, monkeypatch):
    """B*T >= large_m: int6 bases are dequantized once per call and run as dense bases; below it the forward
    keeps the codes (only the backward dequantizes)."""
    B, T, d, r = 2, 7, 40, 3
    x, bases, As, Bs = _make(B, T, d, [40, 24], r, torch.float16, device, quant=(0,))
    calls = []
    orig = lora.dequant
    monkeypatch.setattr(lora, "dequant", lambda *a, **k: calls.append(1) or orig(*a, **k))
    lengths = torch.tensor([7, 2], device=device)
    with torch.no_grad():
        multi_lora_linear(x, bases, As, Bs, alpha=2.0, lengths=lengths, large_m=B * T + 1)
    assert calls == [], "below large_m the forward must keep the int6 codes"
    _check_all(x, bases, As, Bs, alpha=2.0, lengths=lengths, large_m=B * T)
    if use_triton(x):
        assert calls, "the fused forward must take the dequantized path at B*T >= large_m"
    with pytest.raises(ValueError, match="large_m must be a positive int"):
        multi_lora_linear(x, bases, As, Bs, large_m=0)


def test_check_values_is_a_deprecated_alias_of_validate(device):
    x, bases, As, Bs = _make(2, 3, 8, [8], 2, torch.float32, device, seed=1)
    bad = torch.tensor([3, 9], device=device)  # > T = 3
    with pytest.raises(ValueError, match="lengths values must be in"):
        multi_lora_linear(x, bases, As, Bs, lengths=bad)
    with pytest.warns(DeprecationWarning, match="use validate="):
        with pytest.raises(ValueError, match="lengths values must be in"):
            multi_lora_linear(x, bases, As, Bs, lengths=bad, check_values=True)
    with pytest.warns(DeprecationWarning, match="use validate="):
        ys = multi_lora_linear(x, bases, As, Bs, check_values=False)
    assert torch.equal(ys[0], multi_lora_linear(x, bases, As, Bs, validate=False)[0])


def test_fp32_activations_and_no_dx(device, bwd_strategy):
    B, T, d, outs, r = 2, 7, 40, [24], 8
    x, bases, As, Bs = _make(B, T, d, outs, r, torch.float32, device)
    _check_all(x, bases, As, Bs)
    # x without grad: the kernel skips dx; adapter grads unchanged
    As_ = [a.clone().requires_grad_() for a in As]
    Bs_ = [b.clone().requires_grad_() for b in Bs]
    dy = torch.randn(B, T, outs[0], device=device)
    ys = multi_lora_linear(x, bases, As_, Bs_, deterministic=True)
    gA, gB = torch.autograd.grad(ys, [As_[0], Bs_[0]], [dy])
    _, g, _ = _run(multi_lora_linear, x, bases, As, Bs, dys=[dy], deterministic=True)
    torch.testing.assert_close(gA, g[1], rtol=0, atol=0)
    torch.testing.assert_close(gB, g[2], rtol=0, atol=0)


def test_module_reset_and_adam_state(device):
    torch.manual_seed(0)
    n, d, outs, r = 4, 40, [40, 24], 3
    m = BatchedLoRALinear(n, d, outs, r, alpha=0.5, device=device)
    bound = 1 / math.sqrt(d)
    for A, Bm in zip(m.A, m.B):
        assert A.dtype == torch.float32 and A.abs().max() <= bound and A.std() > bound / 3
        assert torch.count_nonzero(Bm) == 0
    with torch.no_grad():
        for Bm in m.B:
            Bm.normal_()
    x, bases, _, _ = _make(n, 7, d, outs, r, torch.float16, device)
    ys = m(x, bases, lengths=torch.tensor([7, 7, 3, 0], device=device))
    ref = multi_lora_linear_ref(x, bases, list(m.A), list(m.B), alpha=0.5,
                                lengths=torch.tensor([7, 7, 3, 0], device=device))
    for y, yr in zip(ys, ref):
        assert_close_rel(y, yr.double(), yr, factor=1.0, floor=1e-2)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2, betas=(0.9, 0.95))
    sum(y.float().square().sum() for y in m(x, bases)).backward()
    opt.step()
    before_A = [A.detach().clone() for A in m.A]
    before_B = [Bm.detach().clone() for Bm in m.B]
    ptrs = [p.data_ptr() for p in m.parameters()]
    m.reset(torch.tensor([1, 3], device=device))
    m.reset(torch.tensor([False, False, False, True], device=device))
    assert [p.data_ptr() for p in m.parameters()] == ptrs, "reset must be in place"
    for A, Bm, A0, B0 in zip(m.A, m.B, before_A, before_B):
        assert torch.equal(A[[0, 2]], A0[[0, 2]]) and torch.equal(Bm[[0, 2]], B0[[0, 2]])
        assert torch.count_nonzero(Bm[[1, 3]]) == 0
        assert not torch.equal(A[1], A0[1]) and A[[1, 3]].abs().max() <= bound
    zero_adam_state_(opt, m.parameters(), rows=torch.tensor([1, 3], device=device))
    for p in m.parameters():
        st = opt.state[p]
        assert torch.count_nonzero(st["exp_avg"][[1, 3]]) == 0 and torch.count_nonzero(st["exp_avg_sq"][[1, 3]]) == 0
        assert torch.count_nonzero(st["exp_avg"][0]) > 0 and float(st["step"]) == 1
    zero_adam_state_(opt, m.parameters(), rows=torch.tensor([True, False, False, False], device=device))
    assert torch.count_nonzero(opt.state[m.A[0]]["exp_avg"][0]) == 0
    zero_adam_state_(opt, m.parameters())
    for p in m.parameters():
        assert torch.count_nonzero(opt.state[p]["exp_avg_sq"]) == 0 and float(opt.state[p]["step"]) == 0
    m.reset()
    assert all(torch.count_nonzero(Bm) == 0 for Bm in m.B)


def test_bad_inputs(device):
    B, T, d, outs, r = 2, 5, 16, [16, 8], 2
    x, bases, As, Bs = _make(B, T, d, outs, r, torch.float16, device)
    f = multi_lora_linear
    with pytest.raises(TypeError, match="x must have dtype"):
        f(x.to(torch.int32), bases, As, Bs)
    with pytest.raises(ValueError, match="x must have 3 dimensions"):
        f(x[0], bases, As, Bs)
    with pytest.raises(TypeError, match=r"bases\[1\] must have dtype float16"):
        f(x, [bases[0], bases[1].float()], As, Bs)
    with pytest.raises(ValueError, match=r"bases\[0\] has in_features 8 but x has d = 16"):
        f(x, [bases[0][:, :8], bases[1]], As, Bs)
    with pytest.raises(ValueError, match=r"As\[0\] has shape \(2, 2, 8\)"):
        f(x, bases, [As[0][..., :8], As[1]], Bs)
    with pytest.raises(ValueError, match=r"Bs\[1\] has shape .* expected \(n_adapters, out_1, r\)"):
        f(x, bases, As, [Bs[0], Bs[1][..., :1]])
    with pytest.raises(ValueError, match="As\\[0\\] has 1 adapters but x has B = 2"):
        f(x, bases, [As[0][:1], As[1][:1]], [Bs[0][:1], Bs[1][:1]])
    with pytest.raises(ValueError, match="rank r = 129"):
        f(x, bases[:1], [torch.zeros(B, 129, d, device=device)], [torch.zeros(B, 16, 129, device=device)])
    with pytest.raises(TypeError, match="share one dtype"):
        f(x, bases, [As[0], As[1].half()], Bs)
    with pytest.raises(ValueError, match="one entry per slice"):
        f(x, bases, As[:1], Bs)
    with pytest.raises(ValueError, match="As\\[0\\] is on meta"):
        f(x, bases, [As[0].to("meta"), As[1]], Bs)
    with pytest.raises(TypeError, match="lengths must have dtype int32 or int64"):
        f(x, bases, As, Bs, lengths=torch.ones(B, device=device))
    with pytest.raises(ValueError, match=r"lengths must have shape \(2,\)"):
        f(x, bases, As, Bs, lengths=torch.ones(3, dtype=torch.int64, device=device))
    with pytest.raises(ValueError, match=r"lengths values must be in \[0, T\] = \[0, 5\]"):
        f(x, bases, As, Bs, lengths=torch.tensor([6, 1], device=device))
    with pytest.raises(ValueError, match=r"lengths values must be in"):
        f(x, bases, As, Bs, lengths=torch.tensor([-1, 1], device=device))
    with pytest.raises(ValueError, match=r"adapter_index values must be in \[0, n_adapters\) = \[0, 2\)"):
        f(x, bases, As, Bs, adapter_index=torch.tensor([0, 2], device=device))
    with pytest.raises(TypeError, match=r"bases\[0\].q must have dtype int8"):
        f(x, [QT(bases[0].to(torch.int16), torch.ones(16, device=device), 6), bases[1]], As, Bs)
    with pytest.raises(ValueError, match=r"bases\[0\].scale must have shape \(16,\)"):
        f(x, [QT(bases[0].to(torch.int8), torch.ones(8, device=device), 6), bases[1]], As, Bs)
    with pytest.raises(TypeError, match="alpha must be a finite float"):
        f(x, bases, As, Bs, alpha=float("nan"))


def test_reference_compiles_fullgraph_cpu():
    """The pure-torch path (CPU dispatch without the interpreter is the reference) traces with fullgraph."""
    torch._dynamo.reset()
    x, bases, As, Bs = _make(2, 5, 16, [16], 2, torch.float32, "cpu", seed=0)
    fn = torch.compile(lambda x, As, Bs: multi_lora_linear_ref(x, bases, As, Bs, alpha=0.5, validate=False),
                       fullgraph=True, backend="eager")
    torch.testing.assert_close(fn(x, As, Bs)[0], multi_lora_linear_ref(x, bases, As, Bs, alpha=0.5)[0])


# ------------------------------------------------------------------------------------------------ GPU lane
SHAPES = [(64, 256, 8), (8, 512, 96), (4, 300, 128), (8, 257, 1)]


@pytest.mark.gpu
@pytest.mark.parametrize("B,T,r", SHAPES, ids=[f"B{b}-T{t}-r{r}" for b, t, r in SHAPES])
def test_gpu_bf16_shapes(B, T, r, bwd_strategy):
    x, bases, As, Bs = _make(B, T, 512, [512, 256], r, torch.bfloat16, "cuda")
    lengths = torch.randint(0, T + 1, (B,), device="cuda")
    lengths[0] = 0
    lengths[-1] = T
    _check_all(x, bases, As, Bs, lengths=lengths)
    _check_all(x, bases, As, Bs, lengths=lengths, deterministic=True)


@pytest.mark.gpu
@pytest.mark.parametrize("d", [640, 768])
def test_gpu_int6_base_other_d(d, bwd_strategy):
    x, bases, As, Bs = _make(8, 200, d, [d, 128, 256], 16, torch.bfloat16, "cuda", quant=(0, 1))
    _check_all(x, bases, As, Bs, alpha=0.5, lengths=torch.randint(0, 201, (8,), device="cuda"))


@pytest.mark.gpu
def test_gpu_deterministic_bitwise_bench_shape():
    x, bases, As, Bs = _make(64, 256, 512, [512, 256], 8, torch.bfloat16, "cuda", seed=3)
    dys = [torch.randn(64, 256, o, device="cuda", dtype=torch.bfloat16) for o in (512, 256)]
    _, g1, _ = _run(multi_lora_linear, x, bases, As, Bs, dys=dys, deterministic=True)
    _, g2, _ = _run(multi_lora_linear, x, bases, As, Bs, dys=dys, deterministic=True)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))


def _ttt_setup(seed=0):
    torch.manual_seed(seed)
    B, T, d, outs, r = 8, 128, 512, [512, 256], 8
    m = BatchedLoRALinear(B, d, outs, r, device="cuda", deterministic=True)   # bitwise-comparable runs
    with torch.no_grad():
        for Bm in m.B:
            Bm.normal_(0, 0.1)
    bases = [torch.randn(o, d, device="cuda", dtype=torch.bfloat16) * d ** -0.5 for o in outs]
    x = torch.randn(B, T, d, device="cuda", dtype=torch.bfloat16)
    tgt = torch.randn(B, T, sum(outs), device="cuda")
    lengths = torch.tensor([128, 100, 0, 5, 128, 64, 1, 127], device="cuda")
    return m, bases, x, tgt, lengths


def _loss(m, bases, x, tgt, lengths):
    ys = m(x, bases, lengths=lengths)
    return (torch.cat([y.float() for y in ys], -1) - tgt).square().mean()


@pytest.fixture(params=["kernels", "merged"])
def ttt_path(request, monkeypatch):
    """The kernels with padded rows, or the merged-weight path (forced; it runs without lengths only)."""
    from pgolf_kernels import lora_merged

    monkeypatch.setattr(lora_merged, "OVERRIDE", request.param == "merged")
    return request.param


@pytest.mark.gpu
def test_gpu_compile_fullgraph_matches_eager(ttt_path):
    """Module forward under torch.compile(fullgraph=True, inductor) + backward through the registered autograd:
    with the same dy and deterministic grads, compiled equals eager bitwise."""
    torch._dynamo.reset()
    m, bases, x, tgt, lengths = _ttt_setup()
    lengths = lengths if ttt_path == "kernels" else None
    dys = [torch.randn(x.shape[0], x.shape[1], o, device="cuda", dtype=torch.bfloat16) for o in m.outs]

    def run(fn):
        xx = x.clone().requires_grad_()
        ys = fn(xx)
        return list(ys) + list(torch.autograd.grad(ys, [xx, *m.parameters()], dys))

    eager = run(lambda xx: m(xx, bases, lengths=lengths))
    comp = run(torch.compile(lambda xx: m(xx, bases, lengths=lengths), fullgraph=True))
    for a, b in zip(comp, eager):
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_gpu_cuda_graph_fwd_bwd_adam_step(ttt_path):
    m, bases, x, tgt, lengths = _ttt_setup()
    lengths = lengths if ttt_path == "kernels" else None
    opt = torch.optim.Adam(m.parameters(), lr=1e-2, betas=(0.9, 0.95), capturable=True)
    m2, _, _, _, _ = _ttt_setup()
    opt2 = torch.optim.Adam(m2.parameters(), lr=1e-2, betas=(0.9, 0.95), capturable=True)

    def step(mod, o):
        o.zero_grad(set_to_none=False)
        loss = _loss(mod, bases, x, tgt, lengths)
        loss.backward()
        o.step()
        return loss

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):   # warm-up: allocates grads and Adam state
            step(m, opt)
            step(m2, opt2)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        static_loss = step(m, opt)
    for _ in range(3):
        g.replay()
        eager_loss = step(m2, opt2)
        torch.cuda.synchronize()
        torch.testing.assert_close(static_loss, eager_loss, rtol=1e-5, atol=0)
    for p, q in zip(m.parameters(), m2.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    # reset + zero_adam_state_ between documents inside the captured world: no allocation, still replayable
    m.reset(torch.tensor([2, 5], device="cuda"))
    zero_adam_state_(opt, m.parameters(), rows=torch.tensor([2, 5], device="cuda"))
    g.replay()
    torch.cuda.synchronize()
    assert torch.isfinite(static_loss)


def test_fused_op_traces_fullgraph(device):
    """Dynamo + AOT autograd through the custom ops (fake impls, autograd registration) with no graph break;
    aot_eager runs the real kernels (interpreter on CPU), so compiled == eager bitwise in deterministic mode."""
    torch._dynamo.reset()
    x, bases, As, Bs = _make(2, 7, 40, [40, 24], 3, torch.float16, device, seed=0)
    lengths = torch.tensor([7, 3], device=device)
    idx = torch.tensor([1, 1], device=device)
    dys = [torch.randn(2, 7, o, device=device, dtype=torch.float16) for o in (40, 24)]

    def f(x, As, Bs):
        return multi_lora_linear(x, bases, As, Bs, alpha=0.5, lengths=lengths, adapter_index=idx,
                                 deterministic=True)

    backend = "inductor" if device == "cuda" else "aot_eager"
    fc = torch.compile(f, fullgraph=True, backend=backend)
    ye, ge, _ = _run(lambda x, b, A, B: f(x, A, B), x, bases, As, Bs, dys=dys)
    yc, gc, _ = _run(lambda x, b, A, B: fc(x, A, B), x, bases, As, Bs, dys=dys)
    for a, b in zip(list(yc) + gc, list(ye) + ge):
        assert torch.equal(a, b)


def test_gpu_tile_sizes_in_interpreter(device, monkeypatch, bwd_strategy):
    """The tile sizes the GPU uses (forward 128x256x64, backward 128x128x128), run through the interpreter on CPU
    (on a GPU: the real kernels) at a shape with ragged T, d and out edges and padded rows."""
    from pgolf_kernels import lora_triton

    monkeypatch.setattr(lora_triton, "FWD_OVERRIDE", dict(BT=128, BN=256, BK=64))
    monkeypatch.setitem(lora_triton.BWD_OVERRIDE, "BT", 128)
    monkeypatch.setitem(lora_triton.BWD_OVERRIDE, "BN", 128)
    monkeypatch.setitem(lora_triton.BWD_OVERRIDE, "BD", 128)
    monkeypatch.setitem(lora_triton.BWD_OVERRIDE, "BK", 64)
    x, bases, As, Bs = _make(2, 130, 136, [264, 72], 8, torch.float16, device, quant=(1,))
    _check_all(x, bases, As, Bs, alpha=0.5, lengths=torch.tensor([130, 70], device=device))


def test_kernels_compile_for_sm90():
    """Triton's compiler + bundled ptxas build the default forward and backward kernels for sm_90a on this machine
    (no GPU needed), with their loops software-pipelined: catches GPU-only compile errors in the CPU lane."""
    from conftest import run_sm90_check

    run_sm90_check("from pgolf_kernels.sm90_check import fwd_stats, bwd_stats\n"
                   "for s in (fwd_stats(RP=16), fwd_stats(RP=16, quant=True), bwd_stats(RP=16), bwd_stats(RP=16, split=True),\n"
                   "          bwd_stats(RP=16, phase=1), bwd_stats(RP=16, phase=2)):\n"
                   "    assert s['async_copies'] > 0 and s['wgmma'] > 0, s\n"
                   "    print(s)\n")


def test_opcheck_custom_ops(device):
    """torch.library.opcheck: schema, autograd registration, fake (meta) impl and AOT dispatch of both ops."""
    x, bases, As, Bs = _make(2, 7, 40, [40, 24], 3, torch.float16, device, seed=0, quant=(1,))
    lengths = torch.tensor([7, 3], device=device)
    ws = [bases[0], bases[1].q]
    scales_q = [bases[1].scale]
    # one op call per base kind: the dense slice alone, then the quantized one alone
    S = torch.randn(As[0].shape[0], 8, 40, generator=torch.Generator().manual_seed(1)).to(device)
    torch.library.opcheck(lora._fwd_op, (x.requires_grad_(), ws[:1], [], [As[0].requires_grad_()],
                                         [Bs[0].requires_grad_()], [S.requires_grad_()], 0.5, lengths, None, False,
                                         1024, False))
    torch.library.opcheck(lora._fwd_op, (x, ws[1:], scales_q, [As[1]], [Bs[1]], [], 0.5, lengths,
                                         torch.tensor([1, 1], device=device), False, 14, False))  # 14 = B*T: large-M branch
    torch.library.opcheck(lora._fwd_op, (x, ws[:1], [], [As[0]], [Bs[0]], [S], 0.5, None, None, False, 1024, True))
    dys = [torch.randn(2, 7, o, dtype=torch.float16, device=device) for o in (40, 24)]
    du = torch.randn(2, 7, 8, dtype=torch.float16, device=device)
    torch.library.opcheck(lora._bwd_op, (x.detach(), dys[:1], [du], ws[:1], [], [As[0].detach()], [Bs[0].detach()],
                                         [S.detach()], 0.5, lengths, torch.tensor([1, 1], device=device), True, True,
                                         False, []))


def test_backward_strategy_defaults_by_rank_class(monkeypatch):
    """The measured defaults: fused one-launch backward up to rank 32, G once + split above; an override wins."""
    from pgolf_kernels import lora_triton as K

    monkeypatch.setattr(K, "BWD_OVERRIDE", {})
    assert (K.bwd_split(8), K.bwd_g_once(8)) == (False, False)
    assert (K.bwd_split(K.LARGE_RANK), K.bwd_g_once(K.LARGE_RANK)) == (False, False)
    assert (K.bwd_split(96), K.bwd_g_once(96)) == (True, True)
    monkeypatch.setattr(K, "BWD_OVERRIDE", {"SPLIT": False, "GONCE": False})
    assert (K.bwd_split(96), K.bwd_g_once(96)) == (False, False)


# ------------------------------------------------------------------------------------------------ merged-weight strategy
@pytest.fixture
def merged(monkeypatch):
    """Force the merged-weight strategy (lora_merged) and make the Triton kernels unreachable, so a test proves the
    merged path ran rather than a silent kernel call."""
    from pgolf_kernels import lora_merged, lora_triton

    def _no_kernel(*a, **k):
        raise AssertionError("the Triton LoRA kernel ran although the merged-weight strategy was forced")

    monkeypatch.setattr(lora_merged, "OVERRIDE", True)
    monkeypatch.setattr(lora_triton, "lora_fwd", _no_kernel)
    monkeypatch.setattr(lora_triton, "lora_bwd", _no_kernel)


@pytest.mark.parametrize("B,T,r,n,idx,alpha", [(3, 9, 3, None, None, 0.7), (4, 33, 8, 5, [3, 0, 3, 1], 1.0),
                                                (32, 1, 1, None, None, 2.0), (3, 17, 6, 1, [0, 0, 0], 0.5),
                                                (3, 9, 3, 5, None, 0.7)],
                         ids=["plain", "index-dup", "T1-r1", "shared-adapter", "more-adapters"])
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_merged_matches_oracle(device, act_dtype, merged, B, T, r, n, idx, alpha, deterministic):
    """Merged weights vs the fp64 oracle (2x bound of torch's own path), with duplicate adapter rows, unused adapters,
    a single shared adapter, an int6 slice, and d/out off the power-of-two grid. T1 takes 32 rows: with fewer, dA/dB
    rest on a handful of roundings and the error ratio against torch's path is noise (see the oracle test above)."""
    d, outs = 40, [40, 24, 16]
    x, bases, As, Bs = _make(B, T, d, outs, r, act_dtype, device, n_adapters=n, quant=(2,), seed=B * 100 + T)
    ai = torch.tensor(idx, device=device) if idx is not None else None
    _, g = _check_all(x, bases, As, Bs, alpha=alpha, adapter_index=ai, deterministic=deterministic)
    if idx is not None and n > max(idx) + 1:
        for t in g[1:]:
            assert torch.count_nonzero(t[max(idx) + 1:]) == 0   # unused adapters get no gradient
    if idx is None and n is not None and n > B:
        # adapters past the batch rows get no gradient (their grad rows are the zero-filled ones; with one adapter
        # per batch row the buffer is not zero-filled, and the NaN-filled allocation shows any element left unwritten)
        for t in g[1:]:
            assert torch.count_nonzero(t[B:]) == 0


def test_merged_deterministic_bitwise(device, merged):
    x, bases, As, Bs = _make(4, 33, 40, [40, 24], 8, torch.float16, device, n_adapters=3, seed=5)
    idx = torch.tensor([2, 0, 2, 1], device=device)
    dys = [torch.randn(4, 33, o, generator=torch.Generator().manual_seed(6)).to(device) for o in (40, 24)]
    _, g1, _ = _run(multi_lora_linear, x, bases, As, Bs, dys=dys, adapter_index=idx, deterministic=True)
    _, g2, _ = _run(multi_lora_linear, x, bases, As, Bs, dys=dys, adapter_index=idx, deterministic=True)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))


def test_merged_dispatch_rule(monkeypatch):
    """Merged only without padding (lengths None), from MIN_T rows on (MIN_T_LARGE_RANK above LARGE_RANK); an
    override cannot lift the padding rule."""
    from pgolf_kernels import lora_merged as M
    from pgolf_kernels.lora_triton import LARGE_RANK

    monkeypatch.setattr(M, "OVERRIDE", None)
    lens = torch.tensor([3])
    assert M.use_merged(M.MIN_T, 8, None) and not M.use_merged(M.MIN_T - 1, 8, None)
    assert M.use_merged(M.MIN_T_LARGE_RANK, LARGE_RANK + 1, None)
    assert not M.use_merged(M.MIN_T_LARGE_RANK - 1, LARGE_RANK + 1, None)
    assert not M.use_merged(M.MIN_T_LARGE_RANK, LARGE_RANK, None) or M.MIN_T <= M.MIN_T_LARGE_RANK
    assert not M.use_merged(4 * M.MIN_T, 8, lens)
    monkeypatch.setattr(M, "OVERRIDE", False)
    assert not M.use_merged(4 * M.MIN_T, 96, None)
    monkeypatch.setattr(M, "OVERRIDE", True)
    assert M.use_merged(1, 1, None) and not M.use_merged(1, 1, lens)


@pytest.mark.parametrize("rank,frames,merged_small", [(96, 1, True), (8, 2, False)])
def test_merged_dispatch_under_compile_with_a_dynamic_window(monkeypatch, rank, frames, merged_small):
    """Under torch.compile with a dynamic T, above LARGE_RANK the choice does not look at T: one compiled frame for a
    short and a long window, both merged (the records' blocks had recompiled on "512 <= x.size()[1]"). At rank 8 the
    T rule stays: the short window takes the kernels, the long one the merged weights, and Dynamo compiles twice."""
    from torch._dynamo.testing import CompileCounter

    from pgolf_kernels import lora_merged as M

    monkeypatch.setattr(M, "OVERRIDE", None)

    def f(x):
        return x * 2 if M.use_merged(x.shape[1], rank, None) else x * 3

    torch._dynamo.reset()
    cnt = CompileCounter()
    g = torch.compile(f, backend=cnt, dynamic=True)
    short, long = torch.ones(1, 64), torch.ones(1, 4 * M.MIN_T)
    assert torch.equal(g(short), short * (2 if merged_small else 3)) and torch.equal(g(long), long * 2)
    assert cnt.frame_count == frames, cnt.frame_count
    assert not M.use_merged(64, rank, None)  # eager: the T rule at every rank
    torch._dynamo.reset()


def test_merged_op_no_dx_and_opcheck(device, merged):
    """need_dx False (x without grad), the saved E_i and α·A_i, α·B_i copies against rebuilt ones, and the custom
    ops' registrations (schema, fake with those outputs, autograd) on the merged path."""
    x, bases, As, Bs = _make(2, 9, 40, [40, 24], 3, torch.float16, device, seed=8)
    A_ = [a.detach().requires_grad_() for a in As]
    ys = multi_lora_linear(x, bases, A_, Bs)
    (gA,) = torch.autograd.grad(sum(y.float().sum() for y in ys), [A_[1]])
    assert gA.shape == As[1].shape and torch.isfinite(gA).all()
    outs = lora._fwd_op(x, bases, [], As, Bs, [], 0.5, None, None, False, 1024, True)
    # the y_i, the E_i, then each adapter's α·A and α·B copies in x.dtype (the backward's operands), exactly as the
    # separate scaled copy makes them
    assert len(outs) == 8 and outs[2].shape == (2, 40, 40) and outs[3].shape == (2, 24, 40)
    from pgolf_kernels.lora_merged import _scaled_copy

    for i in range(2):
        assert torch.equal(outs[4 + 2 * i], _scaled_copy(As[i], 0.5, x.dtype))
        assert torch.equal(outs[5 + 2 * i], _scaled_copy(Bs[i], 0.5, x.dtype))
    dys = [torch.randn(2, 9, o, generator=torch.Generator().manual_seed(9)).to(torch.float16).to(device)
           for o in (40, 24)]
    saved = lora._bwd_op(x, dys, [], bases, [], As, Bs, [], 0.5, None, None, False, True, True, outs[2:])
    rebuilt = lora._bwd_op(x, dys, [], bases, [], As, Bs, [], 0.5, None, None, False, True, True, [])
    assert all(torch.equal(a, b) for a, b in zip(saved, rebuilt))
    torch.library.opcheck(lora._bwd_op, (x, dys, [], bases, [], As, Bs, [], 0.5, None,
                                         torch.tensor([1, 0], device=device), True, True, True, outs[2:]))
    torch.library.opcheck(lora._fwd_op, (x.detach().requires_grad_(), bases, [],
                                         [a.detach().requires_grad_() for a in As], Bs, [], 0.5, None, None, False, 1024,
                                         True))


def test_effective_weight_kernel_matches_reference(device):
    """The E kernel against torch's baddbmm reference: with and without adapter_index (clamped like the kernels),
    rank not a power of two, N and d across the tile edges; exact up to one rounding of the same fp32 value; and the
    α·A, α·B copies the same launch writes for the backward (``low``)."""
    from pgolf_kernels import lora_merged as M

    g = torch.Generator().manual_seed(21)
    W = torch.randn(70, 40, generator=g).to(torch.float16).to(device)
    A = torch.randn(3, 5, 40, generator=g).to(device)
    Bm = torch.randn(3, 70, 5, generator=g).to(device)
    for idx in (None, torch.tensor([2, 0, 2, 7], device=device)):
        rows = 3 if idx is None else 4
        got = M.effective_weight(W, A, Bm, 0.3, idx, rows)
        ref = M.effective_weight_ref(W, A, Bm, 0.3, idx, rows)
        oracle = W.double() + 0.3 * torch.bmm(M._select(Bm, idx, rows).to(W.dtype).double(),
                                              M._select(A, idx, rows).to(W.dtype).double())
        assert_close_rel(got, oracle, ref, name="E")
        # with the backward's α·A[a], α·B[a] copies from the same launch (NaN-filled first): exactly the scaled copy's
        low = (torch.full((rows, 5, 40), float("nan"), dtype=W.dtype, device=device),
               torch.full((rows, 70, 5), float("nan"), dtype=W.dtype, device=device))
        assert torch.equal(M.effective_weight(W, A, Bm, 0.3, idx, rows, low=low), got)
        assert torch.equal(low[0], M._scaled_copy(M._select(A, idx, rows), 0.3, W.dtype))
        assert torch.equal(low[1], M._scaled_copy(M._select(Bm, idx, rows), 0.3, W.dtype))
    # a low tensor of the wrong shape or dtype is refused by name (the kernel writes through raw pointers)
    with pytest.raises(ValueError, match=r"low\[1\] must be \(3, 70, 5\)"):
        M.effective_weight(W, A, Bm, 0.3, None, 3, low=(low[0][:3], low[0][:3]))
    with pytest.raises(TypeError, match=r"low\[0\]"):
        M.effective_weight(W, A, Bm, 0.3, None, 3, low=(low[0][:3].float(), low[1][:3]))


def test_merged_weight_gradients_match_fp64(device):
    """merged_weight (E with autograd) against the fp64 baddbmm reference: values, and the gradients of A, B and W,
    with rows that share an adapter (their gradients add up), an out-of-range index (clamped), and without an index;
    the custom op's schema, fake and autograd registration."""
    from pgolf_kernels import lora_merged as M

    g = torch.Generator().manual_seed(22)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    W = torch.randn(70, 40, generator=g).to(device, dtype)
    A = torch.randn(3, 5, 40, generator=g).to(device)
    Bm = torch.randn(3, 70, 5, generator=g).to(device)
    for idx in (None, torch.tensor([2, 0, 2, 7], device=device)):
        rows = 3 if idx is None else 4
        gE = torch.randn(rows, 70, 40, generator=g).to(device, dtype)
        leaves = [t.clone().requires_grad_() for t in (W, A, Bm)]
        E = M.merged_weight(*leaves, 0.3, idx)
        E.backward(gE)
        l64 = [t.double().requires_grad_() for t in (W, A, Bm)]
        E64 = M.effective_weight_ref(*l64, 0.3, idx, rows)
        E64.backward(gE.double())
        lb = [t.clone().requires_grad_() for t in (W, A, Bm)]
        M.effective_weight_ref(lb[0], lb[1], lb[2], 0.3, idx, rows).backward(gE)
        assert_close_rel(E, E64, M.effective_weight_ref(W, A, Bm, 0.3, idx, rows), name="E")
        for name, a, r, b in zip(("dW", "dA", "dB"), leaves, l64, lb):
            assert a.grad.dtype == a.dtype
            assert_close_rel(a.grad, r.grad, b.grad, name=name)
        torch.library.opcheck(torch.ops.pgolf.merged_weight, (W, A.requires_grad_(), Bm, 0.3, idx),
                              test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
        A.requires_grad_(False)
    bad = [((W.to(torch.int32), A, Bm, 0.3, None), "W must have dtype"),
           ((W, A[0], Bm, 0.3, None), "A must have 3 dimensions"),
           ((W, A, Bm[:, :60], 0.3, None), r"A must be \(n, r, d = 40\) and Bm \(n, N = 70, r\)"),
           ((W, A, Bm, float("nan"), None), "alpha must be a finite float"),
           ((W, A, Bm, 0.3, torch.tensor([[0, 1]], device=device)), "adapter_index must have 1 dimensions"),
           ((W, A, Bm, 0.3, torch.tensor([0.0, 1.0, 2.0], device=device)), "adapter_index must have dtype")]
    for args, match in bad:
        with pytest.raises((TypeError, ValueError), match=match):
            M.merged_weight(*args)


@pytest.mark.gpu
@pytest.mark.parametrize("B,T,r", [(64, 512, 8), (8, 1024, 96), (4, 600, 128), (16, 2048, 96)],
                         ids=["B64-T512-r8", "B8-T1024-r96", "B4-T600-r128", "B16-T2048-r96"])
def test_gpu_merged_shapes(B, T, r, merged):
    x, bases, As, Bs = _make(B, T, 512, [512, 256], r, torch.bfloat16, "cuda", n_adapters=B + 3)
    _check_all(x, bases, As, Bs, alpha=0.5)
    idx = torch.randint(0, B + 3, (B,), device="cuda")
    _check_all(x, bases, As, Bs, adapter_index=idx)
    _check_all(x, bases, As, Bs, adapter_index=idx, deterministic=True)


@pytest.mark.gpu
def test_gpu_default_dispatch_takes_merged_at_long_rows(monkeypatch):
    """Without an override, T >= MIN_T and no lengths runs the merged path (the Triton kernels are unreachable)."""
    from pgolf_kernels import lora_merged, lora_triton

    monkeypatch.setattr(lora_merged, "OVERRIDE", None)
    monkeypatch.setattr(lora_triton, "lora_fwd", None)
    monkeypatch.setattr(lora_triton, "lora_bwd", None)
    x, bases, As, Bs = _make(8, lora_merged.MIN_T, 512, [512, 256], 8, torch.bfloat16, "cuda")
    _check_all(x, bases, As, Bs)


def test_compiled_strategy_switch_recompiles(device, monkeypatch):
    """The merged/kernel choice is part of what torch.compile caches: flipping it between two compiles (a new
    process with PGOLF_LORA_MERGED set differently sees the same on-disk AOTAutograd/FX caches) must give a graph
    for the new choice, not replay the old one's output layout (the merged op returns the E_i after the y_i)."""
    from pgolf_kernels import lora_merged

    if device == "cpu" and not _utils.use_triton(torch.empty(0)):
        pytest.skip("CPU without TRITON_INTERPRET=1 runs the reference, which has no strategies")
    x, bases, As, Bs = _make(2, 9, 40, [40, 24], 3, torch.float16 if device == "cpu" else torch.bfloat16, device,
                             seed=31)
    dys = [torch.randn(2, 9, o, generator=torch.Generator().manual_seed(32)).to(x.dtype).to(device) for o in (40, 24)]

    def step(x, As, Bs):
        return multi_lora_linear(x, bases, As, Bs, alpha=0.5, validate=False)

    # the fp64 oracle and torch's own low-precision path bound the error, as in every oracle test here
    yb, gb, _ = _run(multi_lora_linear_ref, x, bases, As, Bs, dys=dys, alpha=0.5)
    yo, go, _ = _run(multi_lora_linear_ref, x.double(), _to64(bases), [a.double() for a in As],
                     [b.double() for b in Bs], dys=[d.double() for d in dys], alpha=0.5)
    for choice in (True, False, True):
        monkeypatch.setattr(lora_merged, "OVERRIDE", choice)
        torch._dynamo.reset()   # a fresh Dynamo, as in a new process; the AOT/FX caches stay
        xs = x.detach().requires_grad_()
        A_ = [a.detach().requires_grad_() for a in As]
        B_ = [b.detach().requires_grad_() for b in Bs]
        ys = torch.compile(step, fullgraph=True)(xs, A_, B_)
        gs = torch.autograd.grad(ys, [xs, *A_, *B_], dys)
        assert len(ys) == 2 and all(y.shape == r.shape for y, r in zip(ys, yo))
        for k, (got, o, base) in enumerate(zip(list(ys) + list(gs), list(yo) + go, list(yb) + gb)):
            assert_close_rel(got, o, base, name=f"merged={choice} output {k}")


def test_dot_precision_rule():
    """fp32 keeps true fp32 products up to rank 32 and takes three TF32 products above it (the "ieee" dots at padded
    rank 128 took up to 612 s to compile for sm_90a); 16-bit operands run plain tensor-core dots."""
    from pgolf_kernels.lora_triton import lora_dot_precision

    assert [lora_dot_precision(torch.float32, rp) for rp in (16, 32, 64, 128)] == ["ieee", "ieee", "tf32x3", "tf32x3"]
    assert {lora_dot_precision(dt, rp) for dt in (torch.bfloat16, torch.float16) for rp in (16, 128)} == {"tf32"}


def test_add_rows_sums_shared_rows_and_refuses_by_name():
    """lora_merged.add_rows: rows sharing an adapter add up, an out-of-range index clamps as the kernels do; wrong
    dtype, index dtype and row count are refused naming the argument."""
    from conftest import draw_seed
    from pgolf_kernels.lora_merged import add_rows

    g = torch.Generator().manual_seed(draw_seed())
    src = torch.randn(4, 3, 2, generator=g)
    dst = add_rows(torch.zeros(3, 3, 2), torch.tensor([2, 0, 2, 7]), src)
    torch.testing.assert_close(dst, torch.stack([src[1], torch.zeros(3, 2), src[0] + src[2] + src[3]]))
    with pytest.raises(TypeError, match="add_rows: src must have dtype"):
        add_rows(torch.zeros(3, 3, 2), torch.tensor([0, 1, 2, 0]), src.double())
    with pytest.raises(TypeError, match="add_rows: adapter_index must have dtype"):
        add_rows(torch.zeros(3, 3, 2), torch.tensor([0.0, 1.0, 2.0, 0.0]), src)
    with pytest.raises(ValueError, match=r"add_rows: src must be \(rows, 3, 2\) with rows = adapter_index's 3"):
        add_rows(torch.zeros(3, 3, 2), torch.tensor([0, 1, 2]), src)


def test_merged_backward_scaled_adapter_copy_is_the_two_op_composition_bit_for_bit():
    """lora_merged's one-pass dt(alpha * t) equals (t * alpha).to(dt) bit for bit (the product rounded once in fp32,
    then to dt), for every activation dtype and for alpha 1 (a plain cast)."""
    from conftest import draw_seed
    from pgolf_kernels.lora_merged import _scaled_copy

    t = torch.randn(4, 24, 40, generator=torch.Generator().manual_seed(draw_seed()))
    for dt in (torch.bfloat16, torch.float16, torch.float32):
        for alpha in (0.375, 1.0, 12.0 / 96):
            assert torch.equal(_scaled_copy(t, alpha, dt), (t * alpha).to(dt)), (dt, alpha)


def test_default_tiles_compile_for_sm90_within_shared_memory():
    """The fused LoRA kernels' default tiles at the large-rank strategy (``_fwd_config`` at padded rank 64 and 128
    in fp32, 128 in bf16; ``_bwd_config``'s split + G-once passes at 128, the largest) compile for sm_90a on this
    machine (no GPU) within the SM's shared memory. fp32 there takes tf32x3 dots pipelined through shared memory: its
    forward at the 16-bit tile needed 245,760 / 262,144 B and failed at its first launch on an H100."""
    from conftest import run_sm90_check

    run_sm90_check("import torch\n"
                   "from pgolf_kernels import lora_triton as K\n"
                   "from pgolf_kernels.sm90_check import SMEM_LIMIT, bwd_stats, fwd_stats\n"
                   "for dt, tdt, rps in (('fp32', torch.float32, (64, 128)), ('bf16', torch.bfloat16, (128,))):\n"
                   "    for RP in rps:\n"
                   "        meta, launch = K._fwd_config(2048, RP, tdt)\n"
                   "        s = fwd_stats(RP=RP, dtype=dt, BT=meta['BT'], BN=meta['BN'], BK=meta['BK'], **launch)\n"
                   "        assert s['smem'] <= SMEM_LIMIT, ('fwd', dt, RP, meta, s)\n"
                   "    meta, launch = K._bwd_config(2048, 128, tdt)\n"
                   "    for phase in (1, 2):\n"
                   "        s = bwd_stats(RP=128, dtype=dt, split=True, phase=phase, **meta, **launch)\n"
                   "        assert s['smem'] <= SMEM_LIMIT, ('bwd', dt, phase, meta, s)\n")


def _sum_inputs(B, T, ks, N, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(B, T, k, generator=g).to(device, dtype) for k in ks]
    ws = [(torch.randn(B, k, N, generator=g) * k ** -0.5).to(device, dtype) for k in ks]
    return xs, ws


@pytest.mark.parametrize("ks,N,T", [([40], 24, 9), ([40, 24], 24, 33), ([40, 24, 16], 40, 37), ([16, 16, 16], 8, 1),
                                    ([40, 24, 16, 24], 24, 21)],
                         ids=["one", "two", "three-tails", "T1", "four"])
def test_sum_products_matches_fp64(device, ks, N, T):
    """The merged backward's dx (Σ_i x_i · w_i per row, one kernel) against fp64, bound 2x the error of the
    bmm + baddbmm_ composition it replaces; tails in T, K and N against the interpreter's 16-wide tiles, output
    NaN-filled first."""
    from pgolf_kernels import lora_merged as M

    dtype = torch.float32 if device == "cpu" and not use_triton(torch.empty(0)) else torch.float16
    xs, ws = _sum_inputs(3, T, ks, N, dtype, device, seed=len(ks) * 10 + T)
    if not M._kernel_fits(xs, ws):
        pytest.skip("needs TRITON_INTERPRET=1 or a Hopper GPU: this test runs the kernel")
    y = M.sum_products(xs, ws)
    oracle = sum(torch.bmm(x.double(), w.double()) for x, w in zip(xs, ws))
    assert_close_rel(y, oracle, M.sum_products_ref(xs, ws), name=f"sum_products {ks}")


def test_sum_products_domain_and_refusals(device):
    """Outside the kernel's domain (a fifth source; K not a 16-byte multiple) the composition runs, with its result;
    mismatched shapes and dtypes are refused by name before any work."""
    from pgolf_kernels import lora_merged as M

    xs, ws = _sum_inputs(2, 8, [16, 16, 16, 16, 16], 16, torch.float32, device, seed=3)
    assert not M._kernel_fits(xs, ws) and M._kernel_fits(xs[:4], ws[:4]) == use_triton(xs[0])
    torch.testing.assert_close(M.sum_products(xs, ws), M.sum_products_ref(xs, ws))
    odd_x, odd_w = _sum_inputs(2, 8, [3], 16, torch.float32, device, seed=4)
    assert not M._kernel_fits(odd_x, odd_w)
    torch.testing.assert_close(M.sum_products(odd_x, odd_w), M.sum_products_ref(odd_x, odd_w))
    bad = [((xs[:1], ws[:2]), "xs and ws must be non-empty lists of one length"),
           (([], []), "xs and ws must be non-empty lists of one length"),
           ((xs[:2], [ws[0], ws[1][:, :, :8]]), r"ws\[1\] \(B, K_i, N = 16\)"),
           ((xs[:2], [ws[0], ws[1].double()]), r"sum_products: ws\[1\] must have dtype float32"),
           (([xs[0], xs[1][:1]], ws[:2]), r"xs\[1\] must be \(B = 2, T = 8, K_i\)")]
    for args, match in bad:
        with pytest.raises((TypeError, ValueError), match=match):
            M.sum_products(*args)


@pytest.mark.gpu
def test_gpu_sum_products_records_shapes():
    """The records' q / k / v slices (K 512, 256, 256 -> N 512; and the o adapter's shrink gradient, K 96) at
    64 x 2048 in bf16 and tail shapes, against fp64."""
    from pgolf_kernels import lora_merged as M

    for B, T, ks in ((64, 2048, [512, 256, 256]), (64, 2048, [512, 256, 256, 96]), (3, 130, [512, 256, 256, 96]),
                     (5, 48, [512])):
        xs, ws = _sum_inputs(B, T, ks, 512, torch.bfloat16, "cuda", seed=T)
        assert M._kernel_fits(xs, ws)
        oracle = sum(torch.bmm(x.double(), w.double()) for x, w in zip(xs, ws))
        assert_close_rel(M.sum_products(xs, ws), oracle, M.sum_products_ref(xs, ws), name=f"B{B} T{T} {ks}")


def test_merged_backward_sums_every_dense_slice_in_one_call(device, merged, monkeypatch):
    """Three dense slices (q / k / v as in the records' step) on the merged path: with ``DX_KERNEL`` dx comes from
    one ``sum_products`` over all three (the kernel where it fits), without it from cuBLAS; every output and gradient
    matches fp64 either way."""
    from pgolf_kernels import lora_merged as M

    calls = []
    real = M.sum_products
    monkeypatch.setattr(M, "sum_products", lambda xs, ws, **k: (calls.append(len(xs)), real(xs, ws, **k))[1])
    x, bases, As, Bs = _make(3, 17, 40, [40, 24, 16], 4, torch.float16, device, seed=17)
    monkeypatch.setattr(M, "DX_KERNEL", True)
    _check_all(x, bases, As, Bs, alpha=0.7)
    assert calls == [3]
    monkeypatch.setattr(M, "DX_KERNEL", False)   # PGOLF_MERGED_DX=cublas: the kernel not called
    _check_all(x, bases, As, Bs, alpha=0.7)
    assert calls == [3]


def test_merged_dx_bench_runs_and_checks_on_tiny_shapes():
    """bench.bench_merged_dx's rows at tiny shapes (a stand-in timer): every contestant runs, ours passes its check."""
    from bench.bench_merged_dx import measure

    if torch.cuda.is_available() or not _utils.interpret_mode():
        pytest.skip("the CPU lane's smoke run of the bench (the GPU runs the bench itself)")
    calls = []
    rows = measure(torch.device("cpu"), 2, (19, 3), (16, 8, 8), 24, lambda f: (calls.append(f()), 1.0)[1],
                   torch.float16)
    assert [r["case"].split(":")[0] for r in rows] == ["dx over 3 slices (K 16+8+8)"] * 2
    assert len(calls) == 6 and rows[0]["speedup"] == 1.0 and rows[0]["concat_bmm_ms"] == 1.0


def test_sum_products_tiles_compile_for_sm90():
    """The kernel's GPU tiles, built for sm_90a on this machine: 16-bit (1, 3 and 4 sources) with TMA copies and
    async wgmma, fp32's, all without register spills and within shared memory."""
    from conftest import run_sm90_check

    run_sm90_check("from pgolf_kernels.lora_merged import SUM_CONFIG, SUM_CONFIG_FP32\n"
                   "from pgolf_kernels.sm90_check import sum_products_stats\n"
                   "for n in (1, 3, 4):\n"
                   "    s = sum_products_stats(n, 'bf16', **SUM_CONFIG)\n"
                   "    assert s['tma_copies'] > 0 and s['async_wgmma'] and s['fits_smem'], s\n"
                   "    assert s['spill_bytes'] == 0, s\n"
                   "s = sum_products_stats(3, 'fp32', **SUM_CONFIG_FP32)\n"
                   "assert s['tma_copies'] > 0 and s['fits_smem'] and s['spill_bytes'] == 0, s\n")


def test_effective_weight_every_bench_config_matches_fp64(device, monkeypatch):
    """Every tile of ``lora_merged.EFFECTIVE_CONFIGS`` against the fp64 oracle (tails in N and d, r not a power of
    two, NaN-filled output memory): on a GPU each at its real size, under the interpreter two small tiles."""
    from conftest import draw_seed
    from pgolf_kernels import lora_merged as M

    gen = torch.Generator().manual_seed(draw_seed())
    W = torch.randn(140, 72, generator=gen).to(torch.float16).to(device)
    if not use_triton(W):
        pytest.skip("the Triton kernel runs on a GPU or under TRITON_INTERPRET=1")
    A = torch.randn(3, 12, 72, generator=gen).to(device)
    Bm = torch.randn(3, 140, 12, generator=gen).to(device)
    ref = M.effective_weight_ref(W, A, Bm, 0.3, None, 3)
    oracle = W.double() + 0.3 * torch.bmm(Bm.to(W.dtype).double(), A.to(W.dtype).double())
    configs = (M.EFFECTIVE_CONFIGS if device == "cuda"
               else [dict(BN=16, BD=32, num_warps=4), dict(BN=32, BD=16, num_warps=4)])
    monkeypatch.setattr(_utils, "empty", nan_empty)
    for cfg in configs:
        E = M.effective_weight(W, A, Bm, 0.3, None, 3, cfg)
        assert_close_rel(E, oracle, ref, name=f"E {cfg}")
    assert M.EFFECTIVE_CONFIG in M.EFFECTIVE_CONFIGS


def test_effective_weight_bench_runs_and_checks_on_tiny_shapes():
    """bench.bench_effective_weight's rows at tiny shapes (a stand-in timer): every config passes its check."""
    from bench.bench_effective_weight import measure

    if torch.cuda.is_available() or not _utils.interpret_mode():
        pytest.skip("the CPU lane's smoke run of the bench (the GPU runs the bench itself)")
    cfgs = [dict(BN=16, BD=32, num_warps=4), dict(BN=32, BD=32, num_warps=4)]
    rows = measure(torch.device("cpu"), 2, 32, (24,), 8, lambda fn: (fn(), 1.0)[1], torch.float16, configs=cfgs)
    assert len(rows) == 2 and all("E = W + α·B·A" in r["case"] for r in rows)


# ------------------------------------------------------------------------------------------------ shrink-only adapters
def _run_shrinks(fn, x, bases, As, Bs, Ss, dys=None, **kw):
    x = x.detach().requires_grad_()
    As, Bs, Ss = ([t.detach().requires_grad_() for t in ts] for ts in (As, Bs, Ss))
    outs = fn(x, bases, As, Bs, shrinks=Ss, **kw)
    if dys is None:
        g = torch.Generator().manual_seed(draw_seed())
        dys = [torch.randn(o.shape, generator=g).to(o.device) for o in outs]
    grads = torch.autograd.grad(outs, [x, *As, *Bs, *Ss], [d.to(o.dtype) for d, o in zip(dys, outs)])
    return list(outs), list(grads), dys


@pytest.mark.parametrize("path", ["merged", "kernels", "merged-index", "kernels-index-det"])
def test_shrinks_match_the_oracle(device, path, monkeypatch):
    """``shrinks``: u_j = m·(x·S_j[a]ᵀ) returned after the y_i, with dx += du_j·S_j[a] (on the merged path inside the
    one sum_products that forms dx) and dS_j from du_jᵀ·x; outputs and every gradient against fp64, bounded by 2x the
    error of the torch composition; with padding (kernels), an adapter index, and deterministic grads."""
    from pgolf_kernels import lora_merged as M

    calls = []
    real = M.sum_products
    monkeypatch.setattr(M, "sum_products", lambda xs, ws, **k: (calls.append(len(xs)), real(xs, ws, **k))[1])
    monkeypatch.setattr(M, "DX_KERNEL", True)
    merged = path.startswith("merged")
    monkeypatch.setattr(M, "OVERRIDE", merged)
    dtype = torch.float16 if use_triton(torch.empty(0, device=device)) else torch.float32
    B, T, d = 3, 19, 40
    x, bases, As, Bs = _make(B, T, d, [40, 24, 16], 4, dtype, device, n_adapters=4)
    g = torch.Generator().manual_seed(draw_seed())
    Ss = [(torch.randn(4, 8, d, generator=g) * d ** -0.5).to(device)]
    kw = dict(alpha=0.7)
    if "index" in path:
        kw["adapter_index"] = torch.tensor([2, 0, 2], device=device)
    if not merged:
        kw["lengths"] = torch.tensor([19, 5, 0], device=device)
    det = dict(deterministic=True) if "det" in path else {}
    outs, gk, dys = _run_shrinks(multi_lora_linear, x, bases, As, Bs, Ss, **kw, **det)
    ob, gb, _ = _run_shrinks(multi_lora_linear_ref, x, bases, As, Bs, Ss, dys=dys, **kw)
    oo, go, _ = _run_shrinks(multi_lora_linear_ref, x.double(), _to64(bases), [a.double() for a in As],
                             [b.double() for b in Bs], [s.double() for s in Ss], dys=[t.double() for t in dys], **kw)
    names = ["y0", "y1", "y2", "u0", "dx"] + [f"d{p}{i}" for p in "AB" for i in range(3)] + ["dS0"]
    assert len(outs) == 4 and outs[3].shape == (B, T, 8)
    for name, k, b, o in zip(names, outs + gk, ob + gb, oo + go):
        assert k.dtype == b.dtype, f"{name}: dtype {k.dtype} != {b.dtype}"
        assert_close_rel(k, o, b, name=name)
    if "lengths" in kw:
        assert torch.count_nonzero(outs[3][2]) == 0 and torch.count_nonzero(outs[3][1, 5:]) == 0
    if "adapter_index" in kw:   # adapters 1 and 3 are used by no row: their shrink gets no gradient
        assert torch.count_nonzero(gk[-1][1]) == 0 and torch.count_nonzero(gk[-1][3]) == 0
    assert calls == ([4] if merged else [])


def test_shrinks_refused_by_name(device):
    x, bases, As, Bs = _make(2, 5, 40, [40], 4, torch.float32, device, seed=5)
    good = torch.zeros(2, 8, 40, device=device)
    bad = [(good[:, :, :8], r"shrinks\[0\] has shape \(2, 8, 8\); expected \(n_adapters = 2, r in 1..128, d = 40\)"),
           (good[:1], r"shrinks\[0\] has shape \(1, 8, 40\)"),
           (good.double(), r"shrinks\[0\] must have dtype float32"),
           (good[0], r"shrinks\[0\] must have 3 dimensions")]
    for S, match in bad:
        with pytest.raises((TypeError, ValueError), match=match):
            multi_lora_linear(x, bases, As, Bs, shrinks=[S])
    with pytest.raises(TypeError, match="shrinks must be a list"):
        multi_lora_linear(x, bases, As, Bs, shrinks=good)
