"""linear_residual: res + s ⊙ (a · Wᵀ + u · w2ᵀ) in one TMA GEMM (the residual in its epilogue), against fp64.

CPU lane: the kernel under Triton's interpreter (fp16 / fp32) at tiles that leave tails in T, N, K and R, shared and
per-row weights, with and without the second product, NaN-filled outputs; the backward of every input; the custom
op's registration and torch.compile; the drop-in module; bad input refused by name; the default tile compiled for
sm_90a. GPU lane (-m gpu): bf16 at the records' shapes and CUDA-graph replay. Tolerance
(``pgolf_kernels.testing.assert_close_rel``): at most 2x the error of the torch composition in the same dtype
(``linear_residual_ref``) against fp64.
"""
import pytest
import torch

from conftest import DEVICE, HAS_CUDA, draw_seed
from pgolf_kernels import _utils
from pgolf_kernels import linear_act as la
from pgolf_kernels.linear_residual import (ResidualLinear, linear_residual, linear_residual_ref, mlp_residual,
                                          mlp_residual_ref)
from pgolf_kernels.testing import assert_close_rel, nan_empty

# the last: the epilogue on two column halves (linear_act's SUBTILE), 16 wide each
CFGS = [dict(BM=16, BN=16, BK=16, num_warps=4, num_stages=1), dict(BM=16, BN=32, BK=32, num_warps=4, num_stages=1),
        dict(BM=16, BN=32, BK=16, num_warps=4, num_stages=1, SUBTILE=True)]
# (B, T, N, K, R (0: no second product), per-row W): tails in T, N, K and R against 16- and 32-wide tiles
SHAPES = [(3, 37, 40, 24, 8, False), (2, 20, 24, 32, 24, True), (1, 1, 16, 8, 16, False), (2, 33, 8, 16, 0, True)]


@pytest.fixture(autouse=True)
def _nan_outputs(monkeypatch):
    monkeypatch.setattr(_utils, "empty", nan_empty)


def _inputs(B, T, N, K, R, per_row, dtype, device=DEVICE):
    g = torch.Generator().manual_seed(draw_seed())
    res = torch.randn(B, T, N, generator=g).to(device, dtype)
    a = torch.randn(B, T, K, generator=g).to(device, dtype)
    w = (torch.randn(*((B, N, K) if per_row else (N, K)), generator=g) * K ** -0.5).to(device, dtype)
    scale = (0.5 + torch.rand(N, generator=g)).to(device, dtype)
    u = torch.randn(B, T, R, generator=g).to(device, dtype) if R else None
    w2 = (torch.randn(B, N, R, generator=g) * R ** -0.5).to(device, dtype) if R else None
    return res, a, w, scale, u, w2


def _oracle(res, a, w, scale, u, w2):
    d = [t.double() if t is not None else None for t in (res, a, w, scale, u, w2)]
    return linear_residual_ref(*d)


@pytest.mark.parametrize("cfg", CFGS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_kernel_matches_fp64(shape, dtype, cfg):
    B, T, N, K, R, per_row = shape
    args = _inputs(B, T, N, K, R, per_row, dtype)
    if not _utils.use_triton(args[1]):
        pytest.skip("needs TRITON_INTERPRET=1 or CUDA: this test runs the kernel")
    res, a, w, scale, u, w2 = args
    y = la._launch(a, w, "residual", 0.0, False, cfg, aux=res, x2=u, w2=w2, scale=scale)[0]
    assert y.shape == res.shape and y.dtype == dtype
    assert_close_rel(y, _oracle(*args), linear_residual_ref(*args), name="out")


def test_every_bench_tile_config_on_tails():
    """Every tile config of ``linear_act.TILE_CONFIGS`` (split epilogue and two programs per SM included) in the
    residual epilogue with the LoRA's second product, tails in T, N, K and R: the GPU lane's numeric check of a
    candidate at its real tile size before it may become a default."""
    args = _inputs(2, 130, 264, 72, 24, False, torch.float16)
    if not _utils.use_triton(args[1]):
        pytest.skip("needs TRITON_INTERPRET=1 or CUDA: this test runs the kernel")
    res, a, w, scale, u, w2 = args
    for cfg in la.TILE_CONFIGS:
        y = la._launch(a, w, "residual", 0.0, False, cfg, aux=res, x2=u, w2=w2, scale=scale)[0]
        assert_close_rel(y, _oracle(*args), linear_residual_ref(*args), name=f"out {cfg}")


def test_the_public_function_with_its_default_config():
    args = _inputs(2, 70, 24, 16, 8, False, torch.float16)
    assert_close_rel(linear_residual(*args), _oracle(*args), linear_residual_ref(*args), name="out")
    assert la.default_config(2048, 512, 512, True, torch.bfloat16, "residual") == la.GRAD_CONFIG


@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("R", [0, 8])
def test_backward_of_every_input_matches_fp64(per_row, R):
    dtype = torch.float32 if DEVICE == "cpu" else torch.bfloat16
    args = _inputs(3, 21, 24, 16, R, per_row, dtype)
    g = torch.randn(3, 21, 24, generator=torch.Generator().manual_seed(draw_seed())).to(DEVICE, dtype)
    ours = [t.clone().requires_grad_() if t is not None else None for t in args]
    linear_residual(*ours).backward(g)
    o64 = [t.double().requires_grad_() if t is not None else None for t in args]
    _oracle(*o64).backward(g.double())
    base = [t.clone().requires_grad_() if t is not None else None for t in args]
    linear_residual_ref(*base).backward(g)
    for name, o, r, b in zip(("res", "a", "w", "scale", "u", "w2"), ours, o64, base):
        if o is not None:
            assert_close_rel(o.grad, r.grad, b.grad, name=f"d{name}")


def test_frozen_weight_and_scale_get_no_gradient_work():
    """The TTT engine's case: W and s frozen; only res, a, u and w2 get gradients (and they still match fp64)."""
    res, a, w, scale, u, w2 = _inputs(2, 9, 16, 8, 8, False, torch.float32)
    ours = [t.clone().requires_grad_() for t in (res, a, u, w2)]
    linear_residual(ours[0], ours[1], w, scale, ours[2], ours[3]).sum().backward()
    o64 = [t.double().requires_grad_() for t in (res, a, u, w2)]
    linear_residual_ref(o64[0], o64[1], w.double(), scale.double(), o64[2], o64[3]).sum().backward()
    for o, r in zip(ours, o64):
        torch.testing.assert_close(o.grad.double(), r.grad, rtol=1e-5, atol=1e-5)
    assert w.grad is None and scale.grad is None


def test_custom_op_registration():
    args = _inputs(2, 16, 16, 8, 8, True, torch.float32)
    torch.library.opcheck(torch.ops.pgolf.linear_residual.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    args = _inputs(2, 16, 16, 8, 0, False, torch.float32)
    torch.library.opcheck(torch.ops.pgolf.linear_residual.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_compiles_fullgraph_forward_and_backward():
    res, a, w, scale, u, w2 = _inputs(2, 16, 16, 8, 8, False, torch.float32)
    grads = []
    for compiled in (False, True):
        ins = [t.clone().requires_grad_() for t in (res, a, u, w2)]

        def f(r, x, uu, ww):
            return (linear_residual(r, x, w, scale, uu, ww) ** 2).sum()

        fn = torch.compile(f, fullgraph=True, backend="aot_eager") if compiled else f
        fn(*ins).backward()
        grads.append([t.grad for t in ins])
    for e, c in zip(*grads):
        torch.testing.assert_close(c, e)


def test_module_drop_in():
    g = torch.Generator().manual_seed(draw_seed())
    proj = torch.nn.Linear(16, 24, bias=False)
    with torch.no_grad():
        proj.weight.copy_(torch.randn(24, 16, generator=g) * 0.25)
    proj = proj.to(DEVICE, torch.float32)
    scale = torch.nn.Parameter((0.5 + torch.rand(24, generator=g)).to(DEVICE))
    m = ResidualLinear(proj, scale)
    res, a = torch.randn(3, 5, 24, generator=g).to(DEVICE), torch.randn(3, 5, 16, generator=g).to(DEVICE)
    ref = res + scale * proj(a)
    oracle = res.double() + scale.double() * torch.nn.functional.linear(a.double(), proj.weight.double())
    assert_close_rel(m(res, a), oracle, ref, name="module")
    assert m.proj is proj and m.scale is scale
    with pytest.raises(ValueError, match="bias-free"):
        ResidualLinear(torch.nn.Linear(4, 8), torch.ones(8))
    with pytest.raises(ValueError, match=r"scale must have proj.out_features = 8 elements, got \(4,\)"):
        ResidualLinear(torch.nn.Linear(4, 8, bias=False), torch.ones(4))


def _bad_cases():
    ok = _inputs(2, 8, 16, 8, 8, False, torch.float32, device="cpu")
    res, a, w, scale, u, w2 = ok
    return [
        ((res, a.double(), w, scale, u, w2), TypeError, "linear_residual: a must have dtype"),
        ((res, a[0], w, scale, u, w2), ValueError, "linear_residual: a must have 3 dimensions"),
        ((res, a, w[:, :4], scale, u, w2), ValueError, r"w must be \(N, K = 8\) or \(B = 2, N, K = 8\)"),
        ((res, a, w.half(), scale, u, w2), TypeError, "linear_residual: w must have dtype float32"),
        ((res[:, :, :8], a, w, scale, u, w2), ValueError, r"res must have shape \(B, T, N\) = \(2, 8, 16\)"),
        ((res, a, w, scale[:8], u, w2), ValueError, "scale must have N = 16 elements, got 8"),
        ((res, a, w, scale, u, None), ValueError, "u and w2 come together"),
        ((res, a, w, scale, u[:, :4], w2), ValueError, r"u must be \(B, T, R\) = \(2, 8, R\)"),
        ((res, a, w, scale, u, w2[:, :, :4]), ValueError, r"w2 \(B, N, R\) = \(2, 16, R\)"),
    ]


@pytest.mark.parametrize("args,exc,msg", _bad_cases())
def test_bad_input_is_refused_by_name(args, exc, msg):
    with pytest.raises(exc, match=msg):
        linear_residual(*args)


def test_tma_layout_refusals():
    """Where the kernel runs (interpreter or GPU): 16-byte row strides and contiguity, refused by name."""
    res, a, w, scale, u, w2 = _inputs(2, 8, 16, 8, 8, False, torch.float16)
    if not _utils.use_triton(a):
        pytest.skip("needs TRITON_INTERPRET=1 or CUDA: the layout rules are the TMA kernel's")
    u6, w26 = u[:, :, :6].contiguous(), w2[:, :, :6].contiguous()
    with pytest.raises(ValueError, match=r"K, N and R multiples of 8 for float16 .* got K = 8, N = 16, R = 6"):
        linear_residual(res, a, w, scale, u6, w26)
    with pytest.raises(ValueError, match="every tensor argument must be contiguous for the TMA kernel"):
        linear_residual(res.transpose(0, 1).contiguous().transpose(0, 1), a, w, scale, u, w2)


def test_default_tile_compiles_for_sm90():
    """The default tile with the residual epilogue and the second product, built for sm_90a on this machine: TMA
    copies, async wgmma, no spills, within shared memory (bf16 and fp16)."""
    from conftest import run_sm90_check

    run_sm90_check("import torch\n"
                   "from pgolf_kernels.linear_act import default_config\n"
                   "from pgolf_kernels.sm90_check import linear_act_stats\n"
                   "for dt, tdt in (('bf16', torch.bfloat16), ('fp16', torch.float16)):\n"
                   "    for per_row in (False, True):\n"
                   "        cfg = default_config(2048, 512, 512, True, tdt, 'residual')\n"
                   "        s = linear_act_stats(dtype=dt, act=0, res=True, x2=True, per_row=per_row, **cfg)\n"
                   "        assert s['tma_copies'] > 0 and s['fits_smem'], (dt, s)\n"
                   "        assert s['async_wgmma'] and s['spill_bytes'] == 0, (dt, s)\n")


def _mlp_inputs(B, T, d, H, R, per_row, dtype, device=DEVICE):
    g = torch.Generator().manual_seed(draw_seed())
    lead = (B,) if per_row else ()
    res = torch.randn(B, T, d, generator=g).to(device, dtype)
    x = torch.randn(B, T, d, generator=g).to(device, dtype)
    w_up = (torch.randn(*lead, H, d, generator=g) * d ** -0.5).to(device, dtype)
    w_down = (torch.randn(*lead, d, H, generator=g) * H ** -0.5).to(device, dtype)
    scale = (0.5 + torch.rand(d, generator=g)).to(device, dtype)
    u = torch.randn(B, T, R, generator=g).to(device, dtype) if R else None
    w2 = (torch.randn(B, d, R, generator=g) * R ** -0.5).to(device, dtype) if R else None
    return res, x, w_up, w_down, scale, u, w2


def _check_mlp_residual(args, g, slope=0.5):
    """mlp_residual's output and the gradient of every input (None skipped) against the fp64 composition, with 2x
    the error of the torch composition in the inputs' dtype as the bound."""
    def run(fn, ts):
        out = fn(*ts[:5], slope, *ts[5:])
        out.backward(g.to(out.dtype))
        return out

    ours, o64, base = ([t.clone().requires_grad_() if t is not None else None for t in args],
                       [t.double().requires_grad_() if t is not None else None for t in args],
                       [t.clone().requires_grad_() if t is not None else None for t in args])
    assert_close_rel(run(mlp_residual, ours), run(mlp_residual_ref, o64), run(mlp_residual_ref, base), name="out")
    for name, o, r, b in zip(("res", "x", "w_up", "w_down", "scale", "u", "w2"), ours, o64, base):
        if o is not None:
            assert_close_rel(o.grad, r.grad, b.grad, name=f"d{name}")


def _mlp_oracle(res, x, w_up, w_down, scale, u, w2, slope=0.5):
    d = [t.double() if t is not None else None for t in (res, x, w_up, w_down, scale, u, w2)]
    return mlp_residual_ref(d[0], d[1], d[2], d[3], d[4], slope, d[5], d[6])


@pytest.mark.parametrize("per_row,R", [(False, 8), (True, 16), (False, 0)])
def test_mlp_residual_forward_and_backward_match_fp64(per_row, R):
    """Forward and the gradient of every input (the activation's derivative in the GEMM epilogue, s folded into
    W_down) against fp64, with 2x the torch composition's error as the bound."""
    dtype = torch.float32 if DEVICE == "cpu" else torch.bfloat16
    args = _mlp_inputs(2, 19, 16, 40, R, per_row, dtype)
    g = torch.randn(2, 19, 16, generator=torch.Generator().manual_seed(draw_seed())).to(DEVICE, dtype)

    _check_mlp_residual(args, g)


def test_mlp_residual_registration_and_compile():
    args = _mlp_inputs(2, 16, 16, 24, 8, True, torch.float32)
    res, x, w_up, w_down, scale, u, w2 = args
    torch.library.opcheck(torch.ops.pgolf.mlp_residual.default, (res, x, w_up, w_down, scale, 0.5, u, w2),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    grads = []
    for compiled in (False, True):
        ins = [t.clone().requires_grad_() for t in (res, x, u, w2)]

        def f(r, xx, uu, ww):
            return (mlp_residual(r, xx, w_up, w_down, scale, 0.5, uu, ww) ** 2).sum()

        fn = torch.compile(f, fullgraph=True, backend="aot_eager") if compiled else f
        fn(*ins).backward()
        grads.append([t.grad for t in ins])
    for e, c in zip(*grads):
        torch.testing.assert_close(c, e)


def test_mlp_residual_refuses_bad_input_by_name():
    res, x, w_up, w_down, scale, u, w2 = _mlp_inputs(2, 8, 16, 24, 8, False, torch.float32, device="cpu")
    cases = [((res, x[0], w_up, w_down, scale), ValueError, "mlp_residual: x must have 3 dimensions"),
             ((res, x, w_up, w_down[:, :8], scale), ValueError, r"w_down must be \(N, K = 24\) or \(B = 2, N, K = 24\)"),
             ((res, x, w_up, w_down[None].expand(2, -1, -1), scale), ValueError,
              r"w_down must have w_up's number of dimensions \(2\)"),
             ((res[..., :8], x, w_up, w_down, scale), ValueError, r"res must have shape \(B, T, N\) = \(2, 8, 16\)"),
             ((res, x, w_up, w_down, scale.double()), TypeError, "mlp_residual: scale must have dtype float32"),
             ((res, x, w_up[:, :8], w_down, scale), ValueError, "linear_act: w must have shape")]
    for args, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            mlp_residual(*args)
    with pytest.raises(ValueError, match="mlp_residual: u and w2 come together"):
        mlp_residual(res, x, w_up, w_down, scale, 0.5, u, None)


@pytest.mark.gpu
@pytest.mark.parametrize("K,per_row", [(512, False), (1536, False), (1536, True)])
def test_gpu_records_shapes_bf16(K, per_row):
    """The records' residual sites at 8 rows x 2048 (o: K 512; the MLP's down-projection: K 1536, shared or per-row
    merged weights), rank 96, bf16; then a CUDA-graph replay equals the eager call bit for bit."""
    args = _inputs(8, 2048, 512, K, 96, per_row, torch.bfloat16, device="cuda")
    y = linear_residual(*args)
    assert_close_rel(y, _oracle(*args), linear_residual_ref(*args), name="out")
    out = torch.empty_like(y)
    linear_residual(*args)  # warm
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out.copy_(linear_residual(*args))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, y)


@pytest.mark.gpu
@pytest.mark.parametrize("per_row", [False, True])
def test_gpu_mlp_residual_records_shape_bf16(per_row):
    """The records' MLP residual site (d 512, H 1536, rank 96) at 4 rows x 2048, bf16: forward and every gradient
    against fp64 (the derivative epilogue's kernel runs here)."""
    args = _mlp_inputs(4, 2048, 512, 1536, 96, per_row, torch.bfloat16, device="cuda")
    g = torch.randn(4, 2048, 512, device="cuda", dtype=torch.bfloat16)
    _check_mlp_residual(args, g)


def test_the_bench_runs_and_checks_on_tiny_shapes():
    """bench.bench_linear_residual's rows at tiny shapes (a stand-in timer, no compile): every contestant runs and
    passes its correctness check, every tile config runs, and the rows carry the figures the docs cite."""
    from bench.bench_linear_residual import measure

    if DEVICE != "cpu" or not _utils.interpret_mode():
        pytest.skip("the CPU lane's smoke run of the bench (the GPU runs the bench itself)")
    calls = []
    rows = measure(torch.device("cpu"), 2, 24, 16, [("o", 16), ("down", 48)], 8,
                   lambda f: (calls.append(f()), 1.0)[1], lambda f: f, torch.float16)
    assert [r["case"].split(":")[0] for r in rows] == [
        "o site forward", "o site forward + backward (grads to res, a, u, w2)", "down site forward",
        "down site forward + backward (grads to res, a, u, w2)", "mlp site with the MLP, forward + backward (grads to "
        "res, x, u, w2)"]
    assert rows[0]["e"] == 1.0 and rows[0]["configs_skipped"] == {} and len(rows[0]["all_ms"]) == 2 + len(la.TILE_CONFIGS)
    assert len(calls) == 2 * (2 + len(la.TILE_CONFIGS) + 2) + 2


def test_mlp_up_ws_domain_keeps_the_cpu_and_per_row_weights_on_linear_act():
    """The Gluon kernel runs on sm_90 only, for one shared 16-bit weight: a CPU tensor, fp32 or a per-row weight stay
    on ``_linear_act_kernel`` whatever ``MLP_UP_WS`` says."""
    from pgolf_kernels import linear_residual as LR

    x = torch.zeros(2, 8, 16, dtype=torch.bfloat16)
    assert not LR._ws_fits(x, torch.zeros(24, 16, dtype=torch.bfloat16))            # CPU
    if HAS_CUDA:
        xc = x.cuda()
        assert not LR._ws_fits(xc.float(), torch.zeros(24, 16, device="cuda"))      # fp32
        assert not LR._ws_fits(xc, torch.zeros(2, 24, 16, dtype=torch.bfloat16, device="cuda"))   # per-row


def test_act_grad_ws_domain_keeps_the_rest_on_linear_act():
    """``linear_act.GRAD_WS`` applies where the Gluon derivative runs only: a CPU tensor, a weight stored (N, K), a
    per-row weight, fp32 or a non-contiguous h stay on ``_linear_act_kernel`` (or the reference) whatever it says."""
    from pgolf_kernels import linear_act as LA

    g = torch.zeros(2, 8, 16, dtype=torch.bfloat16)
    w, h = torch.zeros(16, 24, dtype=torch.bfloat16), torch.zeros(2, 8, 24, dtype=torch.bfloat16)
    assert not LA._grad_ws_fits(g, w, h, True)                                              # CPU
    if HAS_CUDA:
        gc, wc, hc = g.cuda(), w.cuda(), h.cuda()
        assert not LA._grad_ws_fits(gc, wc, hc, False)                                      # W stored (N, K)
        assert not LA._grad_ws_fits(gc, wc.expand(2, 16, 24), hc, True)                     # per-row W
        assert not LA._grad_ws_fits(gc.float(), wc.float(), hc.float(), True)               # fp32
        assert not LA._grad_ws_fits(gc, wc, hc.transpose(0, 1), True)                       # h not contiguous


def test_res_ws_domain_keeps_the_rest_on_linear_act():
    """``linear_residual.RES_WS`` applies where the Gluon residual runs only (``linear_act_ws.residual_fits``): a CPU
    tensor, fp32, a per-row weight or a rank not a multiple of 8 stay on ``_linear_act_kernel``; any T and N (the
    records' 48-row tail block, the window buckets of 96) run on it."""
    from pgolf_kernels.linear_act_ws import residual_fits

    a = torch.zeros(2, 256, 64, dtype=torch.bfloat16)
    w, u = torch.zeros(128, 64, dtype=torch.bfloat16), torch.zeros(2, 256, 8, dtype=torch.bfloat16)
    assert not residual_fits(a, w) and not residual_fits(a, w, u)                         # CPU
    if not HAS_CUDA:
        return
    a, w, u = a.cuda(), w.cuda(), u.cuda()
    assert not residual_fits(a.float(), w.float())                                        # fp32
    assert not residual_fits(a, w.expand(2, 128, 64))                                     # per-row W
    assert not residual_fits(a, w, u[..., :4])                                            # rank 4
    if torch.cuda.get_device_capability()[0] == 9:
        assert residual_fits(a, w, u) and residual_fits(a[:, :48], w, u[:, :48]) and residual_fits(a, w[:120], u)


def test_mlp_down_act_plumbing_matches_fp64(monkeypatch):
    """``MLP_DOWN_ACT``'s path through ``mlp_residual`` on a CPU, with the Gluon kernel (sm_90 only) replaced by its
    math (act(h) rounded to the dtype, then ``linear_residual_ref``): the op keeps h and an empty act(h), its fake
    agrees under torch.compile, and the output and every gradient (W_down's and s's from act(h) recomputed in the
    backward) match fp64. The kernel itself: the GPU tests (test_linear_act_ws.py, and the switch above)."""
    from pgolf_kernels import linear_act_ws as WS
    from pgolf_kernels import linear_residual as LR
    from pgolf_kernels.linear_act import act_ref

    calls = []

    def math(res, h, w, s, u=None, w2=None, out=None, pre_act=None):
        calls.append(pre_act)
        return linear_residual_ref(res, act_ref(h, "leaky_relu_sq", pre_act), w, s, u, w2)

    monkeypatch.setattr(WS, "linear_residual_ws", math)
    monkeypatch.setattr(LR, "MLP_DOWN_ACT", True)
    monkeypatch.setattr(LR, "_down_act_fits", lambda *a: True)
    monkeypatch.setattr(LR, "use_triton", lambda t: True)
    args = _mlp_inputs(2, 24, 16, 48, 8, False, torch.float32, device="cpu")
    g = torch.randn(2, 24, 16, generator=torch.Generator().manual_seed(draw_seed()))
    _check_mlp_residual(args, g, slope=0.3)
    assert calls == [0.3]
    out, a, h = LR._mlp_op(*args[:5], 0.5, *args[5:], False, True)
    assert a.numel() == 0 and h.shape == (2, 24, 48)
    y = torch.compile(lambda *t: LR._mlp_op(*t, 0.5, args[5], args[6], False, True)[0], fullgraph=True,
                      backend="aot_eager")(*args[:5])
    torch.testing.assert_close(y, out)


@pytest.mark.gpu
@pytest.mark.parametrize("module,switch,fn", [("linear_residual", "MLP_UP_WS", "linear_act_ws"),
                                              ("linear_act", "GRAD_WS", "linear_act_grad_ws"),
                                              ("linear_residual", "RES_WS", "linear_residual_ws"),
                                              ("linear_residual", "MLP_DOWN_ACT", "linear_residual_ws")])
def test_gpu_mlp_residual_on_the_ws_kernel(monkeypatch, module, switch, fn):
    """The Gluon kernel inside ``mlp_residual`` (``linear_residual.MLP_UP_WS``: the up-projection;
    ``linear_act.GRAD_WS``: the backward's derivative GEMM; ``linear_residual.RES_WS``: the down-projection with the
    second product and the residual; ``linear_residual.MLP_DOWN_ACT``: that down-projection with act(h) formed from h
    in registers, h from cuBLAS): the records' MLP residual site (d 512, H 1536, rank 96, shared weights) at 4 rows
    x 2048 calls it once, and the output and every gradient (W_down's and s's from act(h) recomputed) match
    fp64."""
    import importlib

    from pgolf_kernels import linear_act_ws as WS

    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the warp-specialized Gluon kernel is sm_90 only")
    monkeypatch.setattr(importlib.import_module(f"pgolf_kernels.{module}"), switch, True)
    calls = []
    real = getattr(WS, fn)
    monkeypatch.setattr(WS, fn, lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    torch.manual_seed(draw_seed())
    args = _mlp_inputs(4, 2048, 512, 1536, 96, False, torch.bfloat16, device="cuda")
    g = torch.randn(4, 2048, 512, device="cuda", dtype=torch.bfloat16)
    _check_mlp_residual(args, g)
    assert calls == [1]


@pytest.mark.parametrize("per_row", [False, True])
def test_mlp_residual_keeping_signs_matches_fp64(monkeypatch, per_row):
    """``MLP_SIGNS`` on: the op keeps act(h) and h's packed signs (uint8, H / 8 per row) instead of h, its backward
    takes act' from them (``linear_act_grad_signs``, called once); the output and every gradient match fp64; a
    negative slope keeps h (the signs cannot give act' there)."""
    from pgolf_kernels import linear_residual as LR

    monkeypatch.setattr(LR, "MLP_SIGNS", True)
    calls = []
    real = LR._grad_signs_op
    monkeypatch.setattr(LR, "_grad_signs_op", lambda *a: (calls.append(a[3].dtype), real(*a))[1])
    dtype = torch.float32 if DEVICE == "cpu" and not _utils.interpret_mode() else torch.float16
    if DEVICE == "cuda":
        dtype = torch.bfloat16
    args = _mlp_inputs(2, 24, 16, 48, 8, per_row, dtype)
    g = torch.randn(2, 24, 16, generator=torch.Generator().manual_seed(draw_seed())).to(DEVICE, dtype)
    _check_mlp_residual(args, g)
    assert calls == [torch.uint8]
    calls.clear()
    mlp_residual(*[t.detach().requires_grad_() for t in args[:5]], -0.5, *args[5:]).sum().backward()
    assert calls == []


def test_mlp_residual_signs_op_registration():
    """The op with ``signs=True``: its fake gives the uint8 (B, T, H / 8) third output (opcheck), and
    ``torch.compile(fullgraph=True)`` takes it forward and backward."""
    from pgolf_kernels import linear_residual as LR

    args = _mlp_inputs(2, 8, 16, 48, 8, False, torch.float32)
    torch.library.opcheck(LR._mlp_op, (*args[:5], 0.5, *args[5:], True))
    outs = LR._mlp_op(*args[:5], 0.5, *args[5:], True)
    assert outs[2].dtype == torch.uint8 and outs[2].shape == (2, 8, 6)


@pytest.mark.gpu
def test_gpu_mlp_residual_keeping_signs_records_shape(monkeypatch):
    """``MLP_SIGNS`` on at the records' MLP residual site (d 512, H 1536, rank 96) at 4 rows x 2048, bf16: output and
    every gradient against fp64 (the eval with it on, eager and with CUDA graphs:
    ``tests/test_fused_residual.py::test_gpu_eval_with_mlp_residual_switches_scores_like_without``)."""
    from pgolf_kernels import linear_residual as LR

    monkeypatch.setattr(LR, "MLP_SIGNS", True)
    args = _mlp_inputs(4, 2048, 512, 1536, 96, False, torch.bfloat16, device="cuda")
    g = torch.randn(4, 2048, 512, device="cuda", dtype=torch.bfloat16)
    _check_mlp_residual(args, g)
