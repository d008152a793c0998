"""int6 QAT (pgolf_kernels.qat): row-scale pre-pass, fused fake-quant matmul (fwd + dx), STE
gradients, custom-op registration, the training model's switch, bad input.

CPU lane: kernels in Triton's interpreter, fp16/fp32, small awkward shapes, NaN-filled outputs.
GPU lane (-m gpu): bf16 at training shapes through the autotuner, torch.compile.

Tolerance rule (pgolf_kernels.testing.assert_close_rel): error against an fp64 computation on the
exact fake-quantized weights fq(W) must be <= 2x the error of torch's own low-precision path
F.linear(x, fq(W).to(dtype)) against the same reference.
"""

import os
import zlib

import pytest
import torch
import torch.nn.functional as F

import pgolf_kernels.qat as mod
from pgolf_kernels.qat import (
    fake_quant_ref,
    int6_qat_linear,
    int6_qat_linear_ref,
    qat_row_scale,
    qat_row_scale_ref,
)
from pgolf_kernels.quant import quantize_rows
from pgolf_kernels import _utils
from pgolf_kernels.testing import assert_close_rel, nan_empty, rel_err

HAS_CUDA = torch.cuda.is_available()
SHAPES = [(1, 40, 72), (17, 33, 50), (5, 70, 64)]  # (M, N, K): tails in every dimension of the 16x32x32 tile


@pytest.fixture(autouse=True)
def _nan_outputs(monkeypatch):
    monkeypatch.setattr(_utils, "empty", nan_empty)


def _gen():
    """A generator seeded from the running test's id (parameters included): every run draws the same
    values, so a failure reproduces; different tests and parametrizations still draw different ones."""
    s = zlib.crc32(os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0].encode())
    return torch.Generator().manual_seed(s)


def _weights(g, n, k):
    """Trained-like rows: Gaussian, a few heavy-tailed rows and single outliers, one all-zero row."""
    w = torch.randn(n, k, generator=g) * 0.05
    w[::5] *= torch.rand(n, 1, generator=g)[::5] * 3
    t = torch.distributions.StudentT(3.0).sample((k,)) * 0.02
    w[1] = t
    idx = torch.randint(0, k, (n // 3 + 1,), generator=g)
    w[torch.arange(0, n, 3), idx[: len(range(0, n, 3))]] *= 8
    w[2] = 0.0
    return w


def _sse(w, s, bits=6):
    return (w.double() - fake_quant_ref(w, s, bits).double()).square().sum(1)


def _near_tie_ok(w, s_a, s_b, bits=6, rel=1e-5):
    """Rows where two scale choices differ must be near-ties of the reconstruction error."""
    diff = s_a != s_b
    if diff.any():
        ea, eb = _sse(w[diff], s_a[diff], bits), _sse(w[diff], s_b[diff], bits)
        assert torch.allclose(ea, eb, rtol=rel, atol=0), f"non-tie scale mismatch: {ea} vs {eb}"
    return int(diff.sum())


# ---------------------------------------------------------------------------------------------- scales
@pytest.mark.parametrize("clip", ["absmax", 3.0, "search"])
@pytest.mark.parametrize("nk", [(37, 70), (9, 600)])  # K=600 > the 512-column block: two K chunks
def test_row_scale_kernel_vs_ref(clip, nk):
    w = _weights(_gen(), *nk)
    s = qat_row_scale(w, 6, clip)
    r = qat_row_scale_ref(w, 6, clip)
    assert s.dtype == torch.float32 and torch.equal(s.half().float(), s), "scales must be fp16 values"
    if clip == "absmax":
        assert torch.equal(s, r)  # max is order-independent: bitwise
    elif clip == 3.0:
        # fp32 two-pass std vs the reference's float64 std: at most one fp16 step apart
        assert ((s - r).abs() <= r.abs() * 2.0**-10).all()
    else:
        assert _near_tie_ok(w, s, r) <= max(1, nk[0] // 10)
    assert s[2] == 0  # all-zero row


@pytest.mark.parametrize("bits", [5, 6, 8])
def test_search_matches_artifact_codec(bits):
    # the QAT grid is the artifact's grid: same scale as the C++ codec's clip search (near-ties aside)
    w = _weights(_gen(), 64, 256)
    codec = quantize_rows(w, bits, "search").scale.float()
    ref = qat_row_scale_ref(w, bits, "search")
    kern = qat_row_scale(w, bits, "search")
    n_ref, n_kern = _near_tie_ok(w, ref, codec, bits), _near_tie_ok(w, kern, codec, bits)
    assert n_ref <= 3 and n_kern <= 3, (n_ref, n_kern)
    # and the codes are the codec's codes wherever the scale agrees
    same = kern == codec
    q_codec = quantize_rows(w, bits, "search").q.float()
    assert torch.equal((fake_quant_ref(w, kern, bits) / kern.clamp_min(1e-30)[:, None]).round()[same & (kern > 0)],
                       q_codec[same & (kern > 0)])


def test_nonfinite_rows_give_nan_scale_and_nan_columns():
    g = _gen()
    w = _weights(g, 12, 40)
    w[4, 7] = float("nan")
    w[6, 1] = float("inf")
    for clip in ("search", "absmax", 2.5):
        s, r = qat_row_scale(w, 6, clip), qat_row_scale_ref(w, 6, clip)
        assert torch.isnan(s[[4, 6]]).all() and torch.isnan(r[[4, 6]]).all()
        assert torch.isfinite(s[[0, 1, 2, 3, 5]]).all()
    y = int6_qat_linear(torch.randn(3, 40, generator=g), w)
    assert torch.isnan(y[:, [4, 6]]).all() and torch.isfinite(y[:, [0, 1, 2, 3, 5, 7]]).all()


# ---------------------------------------------------------------------------------------------- forward
@pytest.mark.parametrize("M,N,K", SHAPES[:2])
def test_forward_codes_bitwise(M, N, K):
    # x = identity (fp32, ieee dot): y = fq(W)^T exactly, so this checks every in-register code
    w = _weights(_gen(), N, K)
    y = int6_qat_linear(torch.eye(K), w)
    assert torch.equal(y, fake_quant_ref(w, qat_row_scale_ref(w), 6).t())


@pytest.mark.parametrize("M,N,K,bias", [SHAPES[0] + (True,), SHAPES[1] + (False,), SHAPES[2] + (True,)])
def test_forward_fp16_vs_fp64(M, N, K, bias):
    g = _gen()
    w = _weights(g, N, K)
    x = torch.randn(2, M, K, generator=g).half()
    b = torch.randn(N, generator=g).half() if bias else None
    fq = fake_quant_ref(w, qat_row_scale_ref(w), 6)
    ref64 = x.double() @ fq.double().t() + (b.double() if bias else 0)
    torch_lp = F.linear(x.float(), fq.half().float(), b.float() if bias else None).half()  # fp16 weights + output
    out = int6_qat_linear(x, w, b)
    assert out.dtype == torch.float16 and out.shape == (2, M, N)
    assert_close_rel(out, ref64, torch_lp, name="qat fwd fp16")
    ref = int6_qat_linear_ref(x.float(), w, b.float() if bias else None)  # the STE reference's value
    assert_close_rel(ref, ref64, torch_lp, name="qat ref fwd")


def test_forward_bf16_weights_and_bits():
    g = _gen()
    w = _weights(g, 24, 40).bfloat16()
    x = torch.randn(7, 40, generator=g)
    for bits in (5, 7, 8):
        out = int6_qat_linear(x, w, bits=bits, clip="absmax")
        fq = fake_quant_ref(w, qat_row_scale_ref(w, bits, "absmax"), bits)
        assert_close_rel(out, x.double() @ fq.double().t(), floor=1e-6, name=f"bits={bits}")
        assert fq.abs().div(qat_row_scale_ref(w, bits, "absmax").clamp_min(1e-30)[:, None]).max() <= 2 ** (bits - 1) - 1


# ---------------------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("M,N,K,mask_clipped", [SHAPES[1] + (False,), SHAPES[2] + (True,)])
def test_gradients_equal_ste_reference(M, N, K, mask_clipped):
    g = _gen()
    w0 = _weights(g, N, K)
    x0 = torch.randn(M, K, generator=g)
    b0 = torch.randn(N, generator=g)
    dy = torch.randn(M, N, generator=g)
    clip = 2.5  # clips the outliers, so the mask has zeros to check
    grads = []
    for fn in (int6_qat_linear, int6_qat_linear_ref):
        x, w, b = (t.clone().requires_grad_() for t in (x0, w0, b0))
        y = fn(x, w, b, clip=clip, mask_clipped=mask_clipped)
        y.backward(dy)
        grads.append((y.detach(), x.grad, w.grad, b.grad))
    (yk, dxk, dwk, dbk), (yr, dxr, dwr, dbr) = grads
    s = qat_row_scale_ref(w0, 6, clip)
    fq = fake_quant_ref(w0, s, 6).double()
    # STE, in fp64: dx = dy fq(W), dW = dy^T x (masked), db = sum dy
    dx64 = dy.double() @ fq
    dw64 = dy.double().t() @ x0.double()
    inside = (w0 * torch.where(s > 0, 1 / s, torch.zeros_like(s))[:, None]).abs() <= 31
    if mask_clipped:
        assert (~inside).any(), "test needs clipped weights"
        dw64 = torch.where(inside, dw64, torch.zeros_like(dw64))
    for name, k, r, ex in (("dx", dxk, dxr, dx64), ("dW", dwk, dwr, dw64), ("db", dbk, dbr, dy.double().sum(0))):
        assert_close_rel(r, ex, floor=2e-6, name=f"reference {name}")
        assert_close_rel(k, ex, floor=2e-6, name=f"kernel {name}")
    if mask_clipped:
        assert (dwk[~inside] == 0).all() and (dwr[~inside] == 0).all()
    assert torch.equal(yk, yr) or (yk - yr).abs().max() < 1e-5 * yr.abs().max()


def test_fp16_dx_and_frozen_inputs():
    g = _gen()
    w = _weights(g, 33, 50).requires_grad_()
    x = torch.randn(4, 9, 50, generator=g).half().requires_grad_()
    dy = torch.randn(4, 9, 33, generator=g).half()
    int6_qat_linear(x, w).backward(dy)
    fq = fake_quant_ref(w, qat_row_scale_ref(w), 6)
    ex = dy.double() @ fq.double()
    base = (dy.float() @ fq.half().float()).half()
    assert_close_rel(x.grad, ex, base, name="dx fp16")
    assert w.grad.dtype == torch.float32 and w.grad.shape == w.shape
    # x without grad: only dW
    w.grad = None
    int6_qat_linear(x.detach(), w).sum().backward()
    assert w.grad is not None


def test_empty_batch():
    w = _weights(_gen(), 8, 16).requires_grad_()
    y = int6_qat_linear(torch.zeros(0, 16), w)
    assert y.shape == (0, 8)
    y.sum().backward()
    assert torch.equal(w.grad, torch.zeros_like(w))


# ---------------------------------------------------------------------------------------------- registration
def test_opcheck_registration():
    g = _gen()
    w = _weights(g, 12, 20)
    x = torch.randn(3, 20, generator=g)
    s = qat_row_scale(w)
    torch.library.opcheck(torch.ops.pgolf.qat_row_scale.default, (w, 6, 2, 0.0))
    torch.library.opcheck(torch.ops.pgolf.int6_qat_linear.default, (x.requires_grad_(), w.requires_grad_(), s, None, 6, False))
    torch.library.opcheck(torch.ops.pgolf.int6_qat_linear_dx.default, (torch.randn(3, 12, generator=g), w.detach(), s, 6))


# ---------------------------------------------------------------------------------------------- bad input
def test_bad_input():
    w = torch.randn(8, 16)
    x = torch.randn(2, 16)
    with pytest.raises(ValueError, match="bits"):
        int6_qat_linear(x, w, bits=4)
    with pytest.raises(ValueError, match="clip"):
        int6_qat_linear(x, w, clip="mse")
    with pytest.raises(ValueError, match="clip"):
        int6_qat_linear(x, w, clip=-1.0)
    with pytest.raises(TypeError, match="w must have dtype"):
        int6_qat_linear(x, w.to(torch.int8))
    with pytest.raises(ValueError, match="w must have 2"):
        int6_qat_linear(x, w[0])
    with pytest.raises(ValueError, match="row-major"):
        int6_qat_linear(torch.randn(2, 8), w.t())
    with pytest.raises(ValueError, match="last dim"):
        int6_qat_linear(torch.randn(2, 15), w)
    with pytest.raises(TypeError, match="x must have dtype"):
        int6_qat_linear(x.long(), w)
    with pytest.raises(ValueError, match="bias must have shape"):
        int6_qat_linear(x, w, torch.zeros(7))
    with pytest.raises(TypeError, match="mask_clipped"):
        int6_qat_linear(x, w, mask_clipped=1)
    with pytest.raises(ValueError, match="bits"):
        qat_row_scale(w, bits=9)
    with pytest.raises(ValueError, match="at least one column"):
        qat_row_scale(torch.zeros(4, 0))


# ---------------------------------------------------------------------------------------------- model switch
def test_model_qat_switch_trains_through_artifact_grid():
    """set_qat makes every block matrix use fq(W); with clip='search' that is the artifact's
    dequantized matrix (train.artifact.quantize_model) up to near-tie rows."""
    from train.artifact import quantize_model
    from train.model import GPT, GPTConfig

    torch.manual_seed(1234)
    m = GPT(GPTConfig(vocab_size=64, num_layers=1, model_dim=32, num_heads=2, num_kv_heads=1, seq_len=16))
    with torch.no_grad():
        for _, p in m.matrix_params():
            p.normal_(0, 0.05)
    ents = quantize_model(m)
    n_rows = n_diff = 0
    grids = {}
    for name, p in m.matrix_params():
        art = ents[name].q.float() * ents[name].scale.float()[:, None]
        s = qat_row_scale_ref(p, 6, "search")
        n_diff += _near_tie_ok(p.detach(), s, ents[name].scale.float())
        n_rows += p.shape[0]
        same = s == ents[name].scale.float()
        fq = fake_quant_ref(p, s, 6)
        assert torch.equal(fq[same], art[same])
        # the QAT weights are off the float weights (the grid moves every row) and on the artifact grid:
        # at most 63 distinct codes per row, each value an integer multiple of the row's stored scale
        assert not torch.equal(fq, p.detach()) and bool((fq != p.detach()).any(dim=1).all())
        codes = fq / s[:, None]
        assert torch.equal(codes, codes.round()) and float(codes.abs().max()) <= 31
        grids[name] = fq
    assert n_diff <= n_rows // 100 + 1
    x = torch.randint(0, 64, (2, 16))
    y = torch.randint(0, 64, (2, 16))
    ref_loss = m(x, y).mean()
    assert m.set_qat("reference") == 6  # 6 matrices per block
    # each switched layer computes x @ fq(W)^T: the forward runs on the grid, not on W (an identical fp32
    # loss is possible, so the loss is not the witness of the switch)
    for name, mod_ in m.named_modules():
        if name + ".weight" in grids:
            xi = torch.randn(3, mod_.in_features, generator=torch.Generator().manual_seed(5))
            out = mod_(xi)
            assert_close_rel(out, xi @ grids[name + ".weight"].T, floor=1e-6, name=f"{name} on the grid")
            assert rel_err(out, xi @ mod_.weight.detach().T) > 1e-4  # and not on the float weights
    l_ref = m(x, y).mean()
    l_ref.backward()
    g_ref = [p.grad.clone() for _, p in m.matrix_params()]
    m.zero_grad()
    m.set_qat("kernel")
    l_k = m(x, y).mean()
    l_k.backward()
    g_k = [p.grad.clone() for _, p in m.matrix_params()]
    assert abs(l_k.item() - l_ref.item()) < 1e-5
    for a, b in zip(g_k, g_ref):
        assert_close_rel(a, b, floor=1e-5, name="model dW kernel vs reference")
    m.set_qat(None)
    assert torch.equal(m(x, y).mean(), ref_loss)
    with pytest.raises(ValueError, match="mode"):
        m.set_qat("fast")


def test_driver_qat_schedule_and_flags():
    from train.config import parse_config
    from train.train_gpt import qat_active, run_fraction_left

    cfg = parse_config(["--iterations", "100", "--max-wallclock-seconds", "0"], env={}, cuda=False)
    assert cfg.qat_frac == 0.15 and cfg.qat_clip_value() == "search"
    on = [s for s in range(100) if qat_active(cfg, s, 0.0)]
    assert on[0] == 85 and on[-1] == 99 and len(on) == 15
    # wall clock first: 90 % of the budget gone at step 10 -> on
    cfg2 = parse_config(["--iterations", "100", "--max-wallclock-seconds", "100"], env={}, cuda=False)
    assert qat_active(cfg2, 10, 90.0) and not qat_active(cfg2, 10, 80.0)
    assert run_fraction_left(cfg2, 10, 90.0) == pytest.approx(0.1)
    off = parse_config(["--qat-frac", "0"], env={}, cuda=False)
    assert not any(qat_active(off, s, 0.0) for s in range(off.iterations))
    assert parse_config(["--qat-clip", "3.5"], env={}, cuda=False).qat_clip_value() == 3.5
    for bad in (["--qat-frac", "1.5"], ["--qat-clip", "mse"], ["--qat-clip", "-2"]):
        with pytest.raises(SystemExit):
            parse_config(bad, env={}, cuda=False)


# ---------------------------------------------------------------------------------------------- GPU lane
@pytest.mark.gpu
@pytest.mark.parametrize("M,N,K", [(4096, 1536, 512), (8192, 512, 1536), (24, 512, 512), (3000, 1000, 333)])
def test_gpu_bf16_training_shapes(M, N, K):
    g = _gen()
    w = (_weights(g, N, K)).cuda().requires_grad_()
    x = torch.randn(M, K, generator=g).cuda().bfloat16().requires_grad_()
    dy = torch.randn(M, N, generator=g).cuda().bfloat16()
    y = int6_qat_linear(x, w)
    y.backward(dy)
    s = qat_row_scale_ref(w.detach().cpu()).cuda()
    assert torch.equal(qat_row_scale(w), s) or _near_tie_ok(w.detach().cpu(), qat_row_scale(w).cpu(), s.cpu()) <= N // 100
    fq = fake_quant_ref(w, qat_row_scale(w), 6)
    ref64 = x.double() @ fq.double().t()
    assert_close_rel(y, ref64, F.linear(x, fq.bfloat16()), name="gpu fwd")
    dx64 = dy.double() @ fq.double()
    assert_close_rel(x.grad, dx64, dy @ fq.bfloat16(), name="gpu dx")
    assert_close_rel(w.grad, dy.double().t() @ x.double(), (dy.t() @ x).float(), name="gpu dW")


@pytest.mark.gpu
@pytest.mark.parametrize("N,K", [(1536, 512), (333, 1000)])
def test_gpu_codes_bitwise(N, K):
    # the in-register rounding ((v + 1.5*2^23) - 1.5*2^23) must survive GPU codegen: x = I, fp32
    w = _weights(_gen(), N, K).cuda()
    s = qat_row_scale(w)
    y = int6_qat_linear(torch.eye(K, device="cuda"), w)
    assert torch.equal(y, fake_quant_ref(w, s, 6).t())
    assert _near_tie_ok(w.cpu(), s.cpu(), quantize_rows(w.cpu(), 6, "search").scale.float()) <= N // 100


@pytest.mark.gpu
def test_gpu_compile_fullgraph():
    g = _gen()
    w = _weights(g, 512, 512).cuda().requires_grad_()
    x = torch.randn(2048, 512, generator=g).cuda().bfloat16()

    def f(x, w):
        return int6_qat_linear(x, w).float().square().mean()

    cf = torch.compile(f, fullgraph=True)
    le = f(x, w)
    ge, = torch.autograd.grad(le, w)
    lc = cf(x, w)
    gc, = torch.autograd.grad(lc, w)
    assert torch.allclose(le, lc, rtol=1e-3) and torch.allclose(ge, gc, rtol=1e-2, atol=1e-6)
