"""pgolf_kernels.muon_update: the fused momentum / decay passes of a Muon step against their torch references
and an fp64 computation (CPU lane: the kernels under the interpreter, fp32/fp16 storage; GPU lane: bf16 too)."""
import pytest
import torch

from pgolf_kernels.muon_update import decay_add_, decay_add_ref, momentum_update, momentum_update_ref, row_sumsq_ref

from conftest import DEVICE, HAS_CUDA

DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if HAS_CUDA else [])
# (..., C): one column tile, a ragged tile, a row of one, rows longer than the kernel's 2048-column tile
SHAPES = [(3, 5, 64), (4, 130), (1, 1), (2, 3000)] + ([(11, 1536, 512), (22, 256, 512)] if HAS_CUDA else [])
# on a CUDA host every test here is a GPU-lane test (``pytest -m gpu``): the kernels compiled, bf16, record shapes
pytestmark = [pytest.mark.gpu] if HAS_CUDA else []


def _ulp(dtype):
    return torch.finfo(dtype).eps


def _inputs(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    grad = torch.randn(shape, generator=g).to(DEVICE)
    buf = (0.5 * torch.randn(shape, generator=g)).to(DEVICE, dtype)
    return grad, buf


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nesterov,row_eps", [(True, None), (False, None), (True, 1e-7)])
def test_momentum_update_matches_reference_and_fp64(shape, dtype, nesterov, row_eps):
    # a seed from the case itself (not hash(): str hashing changes between processes)
    seed = sum(shape) * 10 + DTYPES.index(dtype) * 3 + int(nesterov) + (0 if row_eps is None else 2)
    grad, buf = _inputs(shape, dtype, seed)
    b_ref, b_k = buf.clone(), buf.clone()
    u_ref = momentum_update_ref(grad, b_ref, 0.95, nesterov, row_eps)
    u_k = momentum_update(grad, b_k, 0.95, nesterov, row_eps)
    assert u_k.shape == buf.shape and u_k.dtype == dtype and torch.isfinite(u_k).all()
    # same roundings at the same places: equal but for the row-norm sum's order (a few ulp of the row's scale)
    tol = dict(rtol=4 * _ulp(dtype), atol=4 * _ulp(dtype) * float(u_ref.abs().max()))
    torch.testing.assert_close(b_k, b_ref, rtol=2 * _ulp(dtype), atol=2 * _ulp(dtype))
    torch.testing.assert_close(u_k, u_ref, **tol)
    # fp64 math without intermediate rounding: both within a few roundings of the storage dtype
    g64, b64 = grad.double().to(dtype).double(), buf.double()
    b64 = b64 * 0.95 + g64
    u64 = g64 + 0.95 * b64 if nesterov else b64
    if row_eps:
        u64 = u64 / u64.norm(dim=-1, keepdim=True).clamp_min(row_eps)
    scale = u64.abs().max().clamp_min(1e-30)
    for u in (u_k, u_ref):
        assert float((u.double() - u64).abs().max() / scale) < 8 * _ulp(dtype)
    assert float((b_k.double() - b64).abs().max() / b64.abs().max()) < 4 * _ulp(dtype)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("row_eps", [None, 1e-7])
def test_row_sumsq_is_the_same_pass_over_the_final_update(shape, dtype, row_eps):
    """row_sumsq=True: the same u and buf as without it (bitwise: the flag only adds a store), and ss = each row's
    sum of squares of that u, against an fp64 sum (the kernel sums fp32 squares in its own order: a few fp32 ulp
    of the row's sum); single-tile rows and rows longer than one 2048-column tile both."""
    seed = sum(shape) * 10 + DTYPES.index(dtype) * 3 + (0 if row_eps is None else 2)
    grad, buf = _inputs(shape, dtype, seed)
    b1, b2 = buf.clone(), buf.clone()
    u1 = momentum_update(grad, b1, 0.95, True, row_eps)
    u2, ss = momentum_update(grad, b2, 0.95, True, row_eps, row_sumsq=True)
    assert torch.equal(u1, u2) and torch.equal(b1, b2)
    C = shape[-1]
    assert ss.dtype == torch.float32 and ss.shape == (u2.numel() // C,) and torch.isfinite(ss).all()
    ss64 = u2.double().reshape(-1, C).square().sum(1)
    torch.testing.assert_close(ss.double(), ss64, rtol=4 * C * _ulp(torch.float32), atol=0.0)
    torch.testing.assert_close(row_sumsq_ref(u2).double(), ss64, rtol=4 * C * _ulp(torch.float32), atol=0.0)
    b3 = buf.clone()
    u3, ss3 = momentum_update_ref(grad, b3, 0.95, True, row_eps, row_sumsq=True)
    torch.testing.assert_close(ss3.double(), ss64, rtol=4 * C * _ulp(dtype) + 4 * C * _ulp(torch.float32), atol=1e-30)


@pytest.mark.parametrize("dtype,udtype", [(torch.float32, torch.float32), (torch.float32, torch.float16),
                                          (torch.float16, torch.float32)]
                         + ([(torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16)] if HAS_CUDA else []))
@pytest.mark.parametrize("weight_decay", [0.0, 0.04])
@pytest.mark.parametrize("n", [1, 1000, 5000])
def test_decay_add_matches_reference_and_fp64(dtype, udtype, weight_decay, n):
    g = torch.Generator().manual_seed(n + int(weight_decay * 100))
    p = torch.randn(n, generator=g).to(DEVICE, dtype)
    u = torch.randn(n, generator=g).to(DEVICE, udtype).reshape(1, n)  # another shape, the same numel
    p_ref, p_k = p.clone(), p.clone()
    decay_add_ref(p_ref, u, 0.02, weight_decay, 1.5)
    decay_add_(p_k, u, 0.02, weight_decay, 1.5)
    torch.testing.assert_close(p_k, p_ref, rtol=2 * _ulp(dtype), atol=2 * _ulp(dtype))
    want = p.double() * (1 - 0.02 * weight_decay) - 0.03 * u.reshape(n).to(dtype).double()
    assert float((p_k.double() - want).abs().max() / want.abs().max()) < 4 * _ulp(dtype)


def test_refusals_name_the_argument():
    buf = torch.zeros(4, 8, device=DEVICE)
    cases = [
        (lambda: momentum_update(torch.zeros(4, 8, dtype=torch.int32, device=DEVICE), buf, 0.9), TypeError, "grad"),
        (lambda: momentum_update(torch.zeros(4, 9, device=DEVICE), buf, 0.9), ValueError, "grad must have buf's"),
        (lambda: momentum_update(torch.zeros(8, 4, device=DEVICE).t(), buf, 0.9), ValueError, "grad must be contig"),
        (lambda: momentum_update(torch.zeros(4, 8, device=DEVICE), buf, 1.0), ValueError, "momentum must be"),
        (lambda: momentum_update(torch.zeros(4, 8, device=DEVICE), buf, 0.9, row_eps=0.0), ValueError, "row_eps"),
        (lambda: momentum_update(torch.zeros(4, 8, device=DEVICE), buf, 0.9, row_sumsq=1), ValueError, "row_sumsq"),
        (lambda: decay_add_(buf, torch.zeros(31, device=DEVICE), 0.1), ValueError, "u must have p's 32"),
        (lambda: decay_add_(buf, torch.zeros(32, device=DEVICE), -0.1), ValueError, "lr must be"),
        (lambda: decay_add_(buf.t(), torch.zeros(32, device=DEVICE), 0.1), ValueError, "p must be contiguous"),
    ]
    for fn, exc, match in cases:
        with pytest.raises(exc, match=match):
            fn()


def test_compiles_without_graph_breaks():
    """Custom ops with fake implementations: torch.compile(fullgraph=True) traces a step through both."""
    grad, buf = _inputs((4, 64), torch.float32, seed=7)
    p = torch.randn(4, 64, device=DEVICE)

    def step(p, grad, buf):
        u, ss = momentum_update(grad, buf, 0.9, True, 1e-7, row_sumsq=True)
        decay_add_(p, u, 0.01, 0.1, 1.0)
        return p, ss

    p_ref, b_ref = p.clone(), buf.clone()
    _, ss_ref = step(p_ref, grad, b_ref)
    _, ss = torch.compile(step, fullgraph=True, backend="aot_eager")(p, grad, buf)
    torch.testing.assert_close(ss, ss_ref)
    torch.testing.assert_close(p, p_ref)
    torch.testing.assert_close(buf, b_ref)


@pytest.mark.skipif(HAS_CUDA, reason="the CPU lane's dispatch (interpreter) only")
def test_cpu_dispatch_interprets_fp32_and_leaves_bf16_to_the_reference(monkeypatch):
    """fp32/fp16 on the CPU lane run the kernel under the interpreter (the reference is not called); bf16,
    which the interpreter rounds wrongly, runs the reference."""
    from pgolf_kernels import muon_update as mu

    calls = []
    real = mu.momentum_update_ref
    monkeypatch.setattr(mu, "momentum_update_ref", lambda *a: calls.append(a[1].dtype) or real(*a))
    for dtype in (torch.float32, torch.bfloat16):
        grad, buf = _inputs((2, 16), dtype, seed=3)
        momentum_update(grad, buf, 0.9)
    assert calls == [torch.bfloat16]
