"""linear_act: the persistent TMA GEMM with the activation in its epilogue, against an fp64 oracle.

CPU lane: the kernel under Triton's interpreter (fp16 / fp32), shared and per-row weights, tiles that leave
tails in every dimension, NaN-filled outputs, the saved pre-activation, the backward, the custom op's
registration, the drop-in module, bad input. GPU lane (-m gpu): bf16 at the records' MLP shapes and CUDA-graph
replay. Tolerance (``pgolf_kernels.testing.assert_close_rel``): at most 2x the error of torch's own path in the
same dtype (``linear_act_ref``: matmul, then the activation in fp32) against fp64.
"""
import pytest
import torch
import torch.nn.functional as F
from triton.runtime.errors import OutOfResources

from conftest import ACT_DTYPES, DEVICE, HAS_CUDA, draw_seed
from pgolf_kernels import _utils
from pgolf_kernels import linear_act as mod
from pgolf_kernels.linear_act import (LeakyReLUSquaredMLP, LinearLeakyReLUSquared, linear_act, linear_act_grad,
                                     linear_act_grad_ref, linear_act_ref, mlp_leaky_sq, mlp_leaky_sq_ref)
from pgolf_kernels.testing import assert_close_rel, nan_empty

# explicit interpreter tiles: 16 x 16 x 16 leaves tails in T and N; 16 x 32 x 32 has BK > K for K = 24
# the last: the epilogue on two column halves (linear_act's SUBTILE), 16 wide each
CFGS = [dict(BM=16, BN=16, BK=16, num_warps=4, num_stages=1), dict(BM=16, BN=32, BK=32, num_warps=4, num_stages=1),
        dict(BM=16, BN=32, BK=16, num_warps=4, num_stages=1, SUBTILE=True)]
# (B or None for a 2-D x, T, N, K, per-row weights)
SHAPES = [(None, 37, 40, 24, False), (3, 33, 24, 16, True), (2, 20, 8, 32, False), (1, 1, 16, 8, True)]


@pytest.fixture(autouse=True)
def _nan_outputs(monkeypatch):
    monkeypatch.setattr(_utils, "empty", nan_empty)


def _inputs(B, T, N, K, per_row, dtype, device=DEVICE, scale=0.3):
    g = torch.Generator().manual_seed(draw_seed())
    x = torch.randn(*((B, T, K) if B else (T, K)), generator=g).to(device, dtype)
    w = (torch.randn(*((B, N, K) if per_row else (N, K)), generator=g) * scale).to(device, dtype)
    return x, w


def _oracle(x, w, act="leaky_relu_sq", slope=0.5):
    y, h = linear_act_ref(x.double(), w.double(), act, slope)
    return y, h


@pytest.mark.parametrize("cfg", CFGS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("act", ["leaky_relu_sq", "none"])
def test_forward_matches_fp64(shape, dtype, cfg, act):
    B, T, N, K, per_row = shape
    x, w = _inputs(B, T, N, K, per_row, dtype)
    if not _utils.use_triton(x):
        pytest.skip("needs TRITON_INTERPRET=1 or CUDA: this test runs the kernel")
    y, h = mod._launch(x, w, act, 0.5, True, cfg)
    yr, hr = _oracle(x, w, act)
    yb, hb = linear_act_ref(x, w, act, 0.5)
    assert y.shape == yr.shape and y.dtype == dtype
    assert_close_rel(h, hr, hb, name="h")
    assert_close_rel(y, yr, yb, name="y")


def test_the_bench_tile_configs_on_tails():
    """Every tile config bench.bench_linear_act times on the GPU, on a shape that leaves a tail in T, N and K."""
    from bench.bench_linear_act import CONFIGS

    x, w = _inputs(2, 130, 264, 72, True, torch.float16)
    if not _utils.use_triton(x):
        pytest.skip("needs TRITON_INTERPRET=1 or CUDA: this test runs the kernel")
    yr, hr = _oracle(x, w)
    yb, hb = linear_act_ref(x, w)
    for cfg in CONFIGS:
        y, h = mod._launch(x, w, "leaky_relu_sq", 0.5, True, cfg)
        assert_close_rel(h, hr, hb, name=f"h {cfg}")
        assert_close_rel(y, yr, yb, name=f"y {cfg}")


def test_the_bench_tile_configs_on_tails_in_the_derivative_epilogue():
    """Every tile config of ``TILE_CONFIGS`` (split epilogue and two programs per SM included) in the derivative
    epilogue as the MLP's backward launches it (W read as (K, N)), tails in T, N and K: the GPU lane's numeric check
    of a candidate at its real tile size before it may become a default."""
    g, w = _inputs(2, 130, 264, 72, True, torch.float16)
    w = w.transpose(-1, -2).contiguous()
    h = torch.randn(2, 130, 264, generator=torch.Generator().manual_seed(draw_seed())).to(DEVICE, torch.float16)
    if not _utils.use_triton(g):
        pytest.skip("needs TRITON_INTERPRET=1 or CUDA: this test runs the kernel")
    ref = linear_act_grad_ref(g.double(), w.double(), h.double(), 0.5, True)
    base = linear_act_grad_ref(g, w, h, 0.5, True)
    too_big = []
    for cfg in mod.TILE_CONFIGS:
        try:
            dh = mod._launch(g, w, "leaky_relu_sq_grad", 0.5, False, cfg, aux=h, w_kn=True)[0]
        except OutOfResources:
            # a candidate over the SM's shared memory with this epilogue (128 x 256 unsplit: 278,568 B > 232,448)
            # cannot launch on the GPU; the bench reports it as skipped. The default must not be one of them.
            too_big.append(cfg)
            continue
        assert_close_rel(dh, ref, base, name=f"dh {cfg}")
    assert mod.GRAD_CONFIG not in too_big and len(too_big) < len(mod.TILE_CONFIGS) - 1, too_big


def test_the_bench_runs_and_checks_on_tiny_shapes():
    """bench.bench_linear_act's rows at tiny shapes (a stand-in timer, no compile): every contestant runs, every tile
    config passes its correctness check, and the rows carry the figures the docs cite."""
    from bench.bench_linear_act import measure

    if DEVICE != "cpu" or not _utils.interpret_mode():
        pytest.skip("the CPU lane's smoke run of the bench (the GPU runs the bench itself)")
    calls = []
    rows = measure(torch.device("cpu"), 2, 40, 16, [("up", 24)], 24, lambda f: (calls.append(f()), 1.0)[1],
                   lambda f: f, torch.float16)
    assert [r["case"].split(":")[0] for r in rows] == ["up forward", "up forward", "mlp backward dh = (dy W_down) * act'(h)",
                                                       "mlp forward + backward"]
    assert rows[0]["e_none"] == 1.0 and rows[0]["configs_skipped"] == {} and rows[2]["e_grad"] == 1.0
    n = len(mod.TILE_CONFIGS)
    assert len(calls) == 2 * (2 + 3 * n) + 2 + n + 2


def test_the_bench_refuses_the_warp_specialized_rows_off_hopper(monkeypatch):
    """PGOLF_LINEAR_ACT_WS=1 adds the Gluon kernel's rows; off a Hopper GPU they stop with the op's own refusal,
    after the other rows ran, not with a compiler error."""
    from bench.bench_linear_act import measure

    if DEVICE != "cpu" or not _utils.interpret_mode():
        pytest.skip("the CPU lane's smoke run of the bench (the GPU runs the bench itself)")
    monkeypatch.setenv("PGOLF_LINEAR_ACT_WS", "1")
    with pytest.raises(ValueError, match="Hopper"):
        measure(torch.device("cpu"), 2, 40, 16, [("up", 24)], 24, lambda f: (f(), 1.0)[1], lambda f: f, torch.float16)


def test_the_public_function_and_its_default_config():
    x, w = _inputs(2, 70, 24, 16, True, torch.float16)
    y = linear_act(x, w, slope=0.25)
    yr, _ = _oracle(x, w, slope=0.25)
    assert_close_rel(y, yr, linear_act_ref(x, w, slope=0.25)[0], name="y")
    assert linear_act(x, w, save_pre=False).shape == (2, 70, 24)


@pytest.mark.parametrize("per_row", [False, True])
def test_backward_matches_fp64(per_row):
    dtype = torch.float32 if DEVICE == "cpu" else torch.bfloat16
    x, w = _inputs(3, 21, 24, 16, per_row, dtype)
    dy = torch.randn(3, 21, 24, generator=torch.Generator().manual_seed(draw_seed())).to(DEVICE, dtype)
    xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
    linear_act(xs, ws).backward(dy)
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    _oracle(x64, w64)[0].backward(dy.double())
    xb, wb = x.clone().requires_grad_(), w.clone().requires_grad_()
    h = torch.matmul(xb, wb.transpose(-1, -2))
    F.leaky_relu(h, 0.5).square().backward(dy)
    assert_close_rel(xs.grad, x64.grad, xb.grad, name="dx")
    assert_close_rel(ws.grad, w64.grad, wb.grad, name="dw")


def test_backward_without_saved_pre_activation_is_refused():
    x, w = _inputs(None, 8, 16, 8, False, torch.float32)
    xs = x.clone().requires_grad_()
    y = linear_act(xs, w, save_pre=False)
    with pytest.raises(RuntimeError, match="linear_act: the backward of act='leaky_relu_sq' needs h"):
        y.sum().backward()


def test_kernel_compiles_for_sm90_in_every_epilogue():
    """Triton's compiler + bundled ptxas build the default tile config of each dtype for sm_90a on this machine (no
    GPU needed) in each epilogue: TMA copies and within the SM's shared memory (fp32's 16-bit config needed 262,168 B
    and failed to launch on an H100); 16-bit also with async wgmma and no spills (fp32 "ieee" dots run on FMAs)."""
    from conftest import run_sm90_check

    run_sm90_check("import torch\n"
                   "from pgolf_kernels.linear_act import default_config\n"
                   "from pgolf_kernels.sm90_check import linear_act_stats\n"
                   "for dt, tdt in (('bf16', torch.bfloat16), ('fp16', torch.float16), ('fp32', torch.float32)):\n"
                   "    for kw in (dict(act=0), dict(act=1), dict(act=1, save=True), dict(act=2, w_kn=True), dict(act=1, per_row=False)):\n"
                   "        cfg = default_config(2048, 1536, 512, True, tdt, 'leaky_relu_sq_grad' if kw['act'] == 2 else 'none')\n"
                   "        s = linear_act_stats(dtype=dt, **cfg, **kw)\n"
                   "        assert s['tma_copies'] > 0 and s['fits_smem'], (dt, kw, s)\n"
                   "        assert dt == 'fp32' or (s['async_wgmma'] and s['spill_bytes'] == 0), (dt, kw, s)\n")


def test_custom_op_registration():
    x, w = _inputs(2, 16, 16, 8, True, torch.float32)
    torch.library.opcheck(torch.ops.pgolf.linear_act.default, (x, w, "leaky_relu_sq", 0.5, True),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_compiles_fullgraph_forward_and_backward():
    """torch.compile(fullgraph=True) traces through the op (fake impl, registered autograd) without a graph break."""
    x, w = _inputs(2, 16, 16, 8, True, torch.float32)
    xs = x.clone().requires_grad_()

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(a, b):
        return linear_act(a, b).sum()

    f(xs, w).backward()
    xe = x.clone().requires_grad_()
    linear_act(xe, w).sum().backward()
    assert torch.allclose(xs.grad, xe.grad)


def test_module_drop_in():
    g = torch.Generator().manual_seed(draw_seed())
    fc = torch.nn.Linear(16, 24, bias=False)
    with torch.no_grad():
        fc.weight.copy_(torch.randn(24, 16, generator=g) * 0.3)
    fc = fc.to(DEVICE, torch.float32)
    m = LinearLeakyReLUSquared.from_linear(fc)
    x = torch.randn(4, 9, 16, generator=g).to(DEVICE)
    ref = F.leaky_relu(fc(x), 0.5).square()
    assert_close_rel(m(x), F.leaky_relu(F.linear(x.double(), fc.weight.double()), 0.5).square(), ref, name="module")
    assert m.weight is fc.weight
    with pytest.raises(ValueError, match="bias-free"):
        LinearLeakyReLUSquared.from_linear(torch.nn.Linear(4, 8))


@pytest.mark.parametrize("args,kwargs,exc,msg", [
    (((8, 16), (16, 16)), dict(act="gelu"), ValueError, r"linear_act: act must be one of \('none', 'leaky_relu_sq'\), got 'gelu'"),
    (((8, 16), (16, 16)), dict(slope=float("nan")), ValueError, "linear_act: slope must be a finite float"),
    (((8, 16), (16, 16)), dict(slope=float("inf")), ValueError, "linear_act: slope must be a finite float"),
    (((8, 16), (16, 24)), {}, ValueError, r"linear_act: w must have shape \(N, K\) or with a leading B, with K = x.shape\[-1\] = 16"),
    (((2, 8, 16), (3, 16, 16)), {}, ValueError, "linear_act: a per-row w needs x of shape"),
    (((8, 12), (16, 12)), {}, ValueError, "linear_act: the TMA kernel needs K and N multiples of 8"),
    (((16,), (16, 16)), {}, ValueError, "linear_act: x must have 2 or 3 dimensions"),
])
def test_bad_input_is_refused_by_name(args, kwargs, exc, msg):
    x = torch.randn(*args[0], dtype=torch.float16)
    w = torch.randn(*args[1], dtype=torch.float16)
    if not _utils.use_triton(x) and "TMA" in msg:
        pytest.skip("the TMA alignment check applies only where the kernel runs")
    with pytest.raises(exc, match=msg):
        linear_act(x, w, **kwargs)


def test_dtype_and_layout_refusals():
    x = torch.randn(8, 16, dtype=torch.float16)
    with pytest.raises(TypeError, match="linear_act: w must have dtype float16, got float32"):
        linear_act(x, torch.randn(16, 16))
    with pytest.raises(ValueError, match="linear_act: w is on meta but must be on cpu"):
        linear_act(x, torch.empty(16, 16, dtype=torch.float16, device="meta"))
    with pytest.raises(ValueError, match="mlp_leaky_sq: w_down is on meta but must be on cpu"):
        mlp_leaky_sq(x, torch.randn(16, 16, dtype=torch.float16), torch.empty(16, 16, dtype=torch.float16, device="meta"))
    with pytest.raises(TypeError, match="linear_act_grad: h must have dtype float16, got float32"):
        linear_act_grad(x, torch.randn(16, 16, dtype=torch.float16), torch.randn(8, 16))
    if _utils.use_triton(x):
        with pytest.raises(ValueError, match="linear_act: x, w must all be contiguous"):
            linear_act(torch.randn(16, 8, dtype=torch.float16).t(), torch.randn(16, 16, dtype=torch.float16))


@pytest.mark.parametrize("cfg", CFGS)
@pytest.mark.parametrize("w_kn", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_grad_epilogue_matches_fp64(shape, dtype, w_kn, cfg):
    """dh = (g · Wᵀ) ⊙ act'(h) (or g · W for a (K, N) weight) against fp64, h straddling 0 (both branches)."""
    B, T, N, K, per_row = shape
    g, w = _inputs(B, T, N, K, per_row, dtype)
    if w_kn:
        w = w.transpose(-1, -2).contiguous()
    h = torch.randn(*g.shape[:-1], N, generator=torch.Generator().manual_seed(draw_seed())).to(DEVICE, dtype)
    if not _utils.use_triton(g):
        pytest.skip("needs TRITON_INTERPRET=1 or CUDA: this test runs the kernel")
    dh = mod._launch(g, w, "leaky_relu_sq_grad", 0.5, False, cfg, aux=h, w_kn=w_kn)[0]
    ref = linear_act_grad_ref(g.double(), w.double(), h.double(), 0.5, w_kn)
    assert_close_rel(dh, ref, linear_act_grad_ref(g, w, h, 0.5, w_kn), name="dh")
    if cfg == mod.default_config(T, N, K, g.is_cuda, g.dtype, "leaky_relu_sq_grad"):  # the public function runs this very config: same bits
        assert torch.equal(dh, linear_act_grad(g, w, h, w_kn=w_kn))


@pytest.mark.parametrize("per_row", [False, True])
def test_mlp_forward_and_backward_match_fp64(per_row):
    """The fused MLP (activation in the up-projection's epilogue, its derivative in the backward's first GEMM)
    against fp64 autograd of the plain composition; the baseline error is torch's own path in the same dtype."""
    dtype = torch.float32 if DEVICE == "cpu" else torch.bfloat16
    gen = torch.Generator().manual_seed(draw_seed())
    B, T, d, H = 3, 21, 16, 40
    x = torch.randn(B, T, d, generator=gen).to(DEVICE, dtype)
    w_up = (torch.randn(*((B, H, d) if per_row else (H, d)), generator=gen) * 0.3).to(DEVICE, dtype)
    w_dn = (torch.randn(*((B, d, H) if per_row else (d, H)), generator=gen) * 0.3).to(DEVICE, dtype)
    dy = torch.randn(B, T, d, generator=gen).to(DEVICE, dtype)
    leaves = [t.clone().requires_grad_() for t in (x, w_up, w_dn)]
    y = mlp_leaky_sq(*leaves)
    y.backward(dy)
    l64 = [t.double().requires_grad_() for t in (x, w_up, w_dn)]
    y64 = mlp_leaky_sq_ref(*l64)
    y64.backward(dy.double())
    lb = [t.clone().requires_grad_() for t in (x, w_up, w_dn)]
    yb = torch.matmul(F.leaky_relu(torch.matmul(lb[0], lb[1].transpose(-1, -2)), 0.5).square(), lb[2].transpose(-1, -2))
    yb.backward(dy)
    assert_close_rel(y, y64, yb, name="y")
    for name, a, r, b in zip(("dx", "dw_up", "dw_down"), leaves, l64, lb):
        assert_close_rel(a.grad, r.grad, b.grad, name=name)


def test_mlp_compiles_fullgraph_and_registers():
    gen = torch.Generator().manual_seed(draw_seed())
    x = torch.randn(2, 16, 8, generator=gen).to(DEVICE, torch.float32)
    w_up = torch.randn(16, 8, generator=gen).to(DEVICE) * 0.3
    w_dn = torch.randn(8, 16, generator=gen).to(DEVICE) * 0.3
    torch.library.opcheck(torch.ops.pgolf.mlp_leaky_sq.default, (x, w_up, w_dn, 0.5),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    torch.library.opcheck(torch.ops.pgolf.linear_act_grad.default, (x, w_dn, torch.randn(2, 16, 16).to(DEVICE), 0.5, True),
                          test_utils=("test_schema", "test_faketensor"))
    xs, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
    f = torch.compile(lambda a: mlp_leaky_sq(a, w_up, w_dn).square().sum(), fullgraph=True, backend="aot_eager")
    f(xs).backward()
    mlp_leaky_sq(xe, w_up, w_dn).square().sum().backward()
    assert torch.allclose(xs.grad, xe.grad)


def test_mlp_module_drop_in_and_refusals():
    gen = torch.Generator().manual_seed(draw_seed())
    fc, proj = torch.nn.Linear(16, 40, bias=False), torch.nn.Linear(40, 16, bias=False)
    with torch.no_grad():
        fc.weight.copy_(torch.randn(40, 16, generator=gen) * 0.3)
        proj.weight.copy_(torch.randn(16, 40, generator=gen) * 0.3)
    fc, proj = fc.to(DEVICE), proj.to(DEVICE)
    m = LeakyReLUSquaredMLP(fc, proj)
    x = torch.randn(4, 9, 16, generator=gen).to(DEVICE)
    plain = proj(F.leaky_relu(fc(x), 0.5).square())
    oracle = mlp_leaky_sq_ref(x.double(), fc.weight.double(), proj.weight.double())
    assert_close_rel(m(x), oracle, plain, name="module")
    with pytest.raises(ValueError, match="bias-free fc and proj"):
        LeakyReLUSquaredMLP(torch.nn.Linear(16, 40), proj)
    with pytest.raises(ValueError, match=r"proj.in_features \(24\) must equal fc.out_features \(40\)"):
        LeakyReLUSquaredMLP(fc, torch.nn.Linear(24, 16, bias=False))
    with pytest.raises(ValueError, match=r"mlp_leaky_sq: w_down must have shape \(d_out, H\) with H = w_up.shape\[-2\] = 40"):
        mlp_leaky_sq(x, fc.weight, fc.weight)
    h = torch.randn(4, 9, 40)
    with pytest.raises(ValueError, match=r"linear_act_grad: h must have shape \(4, 9, 24\)"):
        linear_act_grad(torch.randn(4, 9, 16), torch.randn(24, 16), h)
    with pytest.raises(ValueError, match=r"linear_act_grad: w must have shape \(K, N\)"):
        linear_act_grad(torch.randn(4, 9, 16), torch.randn(40, 16), h, w_kn=True)


# ---- GPU lane -----------------------------------------------------------------------------------------------
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (Hopper: TMA)")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("N,K", [(1536, 512), (512, 512), (2048, 512)])
def test_gpu_records_shapes_bf16(per_row, N, K):
    x, w = _inputs(4, 2048 - 48, N, K, per_row, torch.bfloat16, scale=0.05)
    y, h = mod._launch(x, w, "leaky_relu_sq", 0.5, True)
    yr, hr = _oracle(x, w)
    yb, hb = linear_act_ref(x, w)
    assert_close_rel(h, hr, hb, name="h")
    assert_close_rel(y, yr, yb, name="y")


def test_one_compile_key_for_every_shape(monkeypatch):
    """The persistent stride (NUM_PROGS, a compile-time constant) is the same for every shape, so a new shape is no
    new compile; the grid shrinks to the tile count instead, and a shape with fewer tiles than the stride (one tile
    per program) still matches the oracle."""
    x0, _ = _inputs(1, 8, 8, 8, False, torch.float32)
    if not _utils.use_triton(x0):
        pytest.skip("needs TRITON_INTERPRET=1 or CUDA: this test runs the kernel")
    real, seen = mod._linear_act_kernel, []

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                seen.append((grid[0], kw["NUM_PROGS"], kw["BM"], kw["BN"]))
                return real[grid](*args, **kw)
            return launch

    monkeypatch.setattr(mod, "_linear_act_kernel", Spy())
    cfg = dict(BM=16, BN=16, BK=16, num_warps=4, num_stages=1)
    for B, T, N, K in [(1, 5, 16, 8), (1, 20, 16, 8), (2, 40, 48, 16)]:  # 1, 2 and 18 tiles
        x, w = _inputs(B, T, N, K, False, torch.float32)
        y, h = mod._launch(x, w, "leaky_relu_sq", 0.5, True, cfg)
        yr, hr = _oracle(x, w)
        yb, hb = linear_act_ref(x, w)
        assert_close_rel(y, yr, yb, name=f"y {B}x{T}x{N}")
    strides = {s for _, s, _, _ in seen}
    assert len(strides) == 1, f"NUM_PROGS followed the shape: {seen}"
    stride = strides.pop()
    tiles = [B * -(-T // 16) * -(-N // 16) for B, T, N, _ in [(1, 5, 16, 8), (1, 20, 16, 8), (2, 40, 48, 16)]]
    assert [g for g, _, _, _ in seen] == [min(t, stride) for t in tiles]


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("B,T,N", [(1, 48, 512), (1, 96, 1536), (3, 200, 512)])
def test_gpu_shapes_with_fewer_tiles_than_sms(B, T, N):
    """Grid below the stride on the GPU: one tile per program, the same stride as the large shapes."""
    x, w = _inputs(B, T, N, 512, False, torch.bfloat16, scale=0.05)
    y, h = mod._launch(x, w, "leaky_relu_sq", 0.5, True)
    yr, hr = _oracle(x, w)
    yb, hb = linear_act_ref(x, w)
    assert_close_rel(h, hr, hb, name="h")
    assert_close_rel(y, yr, yb, name="y")


@pytest.mark.gpu
@gpu
def test_gpu_cuda_graph_replay_equals_eager():
    x, w = _inputs(2, 512, 1536, 512, True, torch.bfloat16, scale=0.05)
    eager = linear_act(x, w)
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        linear_act(x, w)
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(g):
        out = linear_act(x, w)
    x.copy_(x.flip(1))
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, linear_act(x, w)) and not torch.equal(out, eager)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("per_row", [False, True])
def test_gpu_mlp_records_shape_bf16(per_row):
    """The records' MLP (d 512, H 1536) at 4 rows x 2000 positions, forward and backward against fp64."""
    gen = torch.Generator().manual_seed(draw_seed())
    B, T, d, H = 4, 2000, 512, 1536
    x = torch.randn(B, T, d, generator=gen).to(DEVICE, torch.bfloat16)
    w_up = (torch.randn(*((B, H, d) if per_row else (H, d)), generator=gen) * 0.04).to(DEVICE, torch.bfloat16)
    w_dn = (torch.randn(*((B, d, H) if per_row else (d, H)), generator=gen) * 0.02).to(DEVICE, torch.bfloat16)
    dy = torch.randn(B, T, d, generator=gen).to(DEVICE, torch.bfloat16)
    leaves = [t.clone().requires_grad_() for t in (x, w_up, w_dn)]
    mlp_leaky_sq(*leaves).backward(dy)
    l64 = [t.double().requires_grad_() for t in (x, w_up, w_dn)]
    mlp_leaky_sq_ref(*l64).backward(dy.double())
    lb = [t.clone().requires_grad_() for t in (x, w_up, w_dn)]
    torch.matmul(F.leaky_relu(torch.matmul(lb[0], lb[1].transpose(-1, -2)), 0.5).square(),
                 lb[2].transpose(-1, -2)).backward(dy)
    for name, a, r, b in zip(("dx", "dw_up", "dw_down"), leaves, l64, lb):
        assert_close_rel(a.grad, r.grad, b.grad, name=name)


def test_default_config_refuses_unknown_act_and_dtype():
    with pytest.raises(ValueError, match="default_config: act must be one of"):
        mod.default_config(64, 64, 64, True, torch.bfloat16, "relu")
    with pytest.raises(TypeError, match="default_config: dtype must be bfloat16, float16 or float32"):
        mod.default_config(64, 64, 64, True, torch.int8)
    assert mod.default_config(64, 64, 64, True, torch.float16, "leaky_relu_sq_grad") == mod.GRAD_CONFIG


def test_tile_override_replaces_the_16bit_default_of_its_epilogue_only(monkeypatch):
    """``TILE_OVERRIDE`` (how bench.profile_ttt times a tile inside a whole step): the 16-bit GPU tile of the epilogue
    it names; other epilogues, fp32 and the interpreter keep theirs."""
    t128 = dict(BM=128, BN=128, BK=64, num_warps=4, num_stages=4)
    assert t128 != mod.GRAD_CONFIG
    monkeypatch.setitem(mod.TILE_OVERRIDE, "residual", t128)
    assert mod.default_config(2048, 512, 512, True, torch.bfloat16, "residual") == t128
    assert mod.default_config(2048, 512, 512, True, torch.bfloat16, "leaky_relu_sq_grad") == mod.GRAD_CONFIG
    assert mod.default_config(2048, 512, 512, True, torch.float32, "residual") == mod.FP32_CONFIG
    assert mod.default_config(2048, 512, 512, False, torch.float16, "residual")["BM"] == 16


def _unspecialized(kernel) -> set:
    """The arguments a @triton.jit kernel does not specialize on (compiled: its params; interpreter: its kwargs)."""
    if hasattr(kernel, "params"):
        return {p.name for p in kernel.params if p.do_not_specialize}
    return set(kernel.kwargs.get("do_not_specialize") or ())


def test_row_and_window_counts_are_not_compile_keys():
    """B and T bound the tile loop only: not specialized, so a new row or window bucket is no new Triton build. The
    head norm + RoPE kernels likewise for T (and the backward's tile count)."""
    from pgolf_kernels import head_norm_rope as hnr

    assert {"B", "T"} <= _unspecialized(mod._linear_act_kernel)
    assert "T" in _unspecialized(hnr._head_norm_rope_fwd_kernel)
    assert {"T", "n_tiles"} <= _unspecialized(hnr._head_norm_rope_bwd_kernel)


def test_pack_signs_roundtrip_and_bit_order():
    """``pack_signs``: bit j of byte c is column 8c + j, h > 0 (0 and -0 are not positive); ``unpack_signs`` inverts
    it exactly."""
    h = torch.tensor([[1.0, -1.0, 0.0, -0.0, 2.0, 3.0, -4.0, 5.0, -1.0, -1.0, -1.0, -1.0, -1.0, -1.0, -1.0, 7.0]])
    s = mod.pack_signs(h)
    assert s.dtype == torch.uint8 and s.tolist() == [[1 + 16 + 32 + 128, 128]]
    g = torch.randn(3, 5, 48, generator=torch.Generator().manual_seed(draw_seed()))
    assert torch.equal(mod.unpack_signs(mod.pack_signs(g)), g > 0)
    with pytest.raises(ValueError, match=r"pack_signs: h's last dim must be a multiple of 8.*\(3, 5, 12\)"):
        mod.pack_signs(g[..., :12])
    with pytest.raises(TypeError, match="signs"):
        mod.unpack_signs(g)


@pytest.mark.parametrize("slope", [0.5, 0.0, 1.5])
def test_act_grad_from_signs_matches_fp64(slope):
    """act'(h) recovered from a = act(h) (rounded to the dtype) and h's signs, against fp64 from h itself, within the
    suite's bound of torch's path that keeps h in the dtype."""
    gen = torch.Generator().manual_seed(draw_seed())
    h = torch.randn(4, 33, 40, generator=gen).to(torch.float16)
    dy = torch.randn(4, 33, 40, generator=gen).to(torch.float16)
    a = mod.act_ref(h, "leaky_relu_sq", slope)
    oracle = mod.act_grad_ref(dy.double(), h.double(), "leaky_relu_sq", slope)
    got = mod.act_grad_from_signs_ref(dy, a, mod.pack_signs(h), slope)
    assert_close_rel(got, oracle, mod.act_grad_ref(dy, h, "leaky_relu_sq", slope), name=f"dh slope {slope}")


@pytest.mark.parametrize("cfg", CFGS)
@pytest.mark.parametrize("shape", [s for s in SHAPES if s[2] % 8 == 0])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_signs_epilogues_match_fp64(shape, dtype, cfg):
    """The kernel's signs epilogues (NaN-filled outputs): the forward's act(h) and packed signs against the fp64
    composition (signs exact where |h| is not at rounding level), and the derivative from act(h) and the signs
    (W read as (K, N), as the MLP's backward reads W_down) against fp64 from h itself."""
    B, T, N, K, per_row = shape
    x, w = _inputs(B, T, N, K, per_row, dtype)
    if not _utils.use_triton(x):
        pytest.skip("needs TRITON_INTERPRET=1 or CUDA: this test runs the kernel")
    signs = _utils.empty(x.shape[:-1] + (N // 8,), torch.uint8, x.device)
    a = mod._launch(x, w, "leaky_relu_sq_signs", 0.5, False, cfg, signs=signs)[0]
    ar, hr = _oracle(x, w)
    assert_close_rel(a, ar, linear_act_ref(x, w, "leaky_relu_sq", 0.5)[0], name="a")
    clear = hr.abs() > 1e-3
    assert torch.equal(mod.unpack_signs(signs)[clear], (hr > 0)[clear])
    gen = torch.Generator().manual_seed(draw_seed())
    g = torch.randn(*x.shape[:-1], 24, generator=gen).to(DEVICE, dtype)
    wd = (torch.randn(24, N, generator=gen) * 0.3).to(DEVICE, dtype)        # (K, N): W_down's layout
    dh = mod._launch(g, wd, "leaky_relu_sq_grad_signs", 0.5, False, cfg, aux=a, w_kn=True, signs=signs)[0]
    oracle = linear_act_grad_ref(g.double(), wd.double(), hr, 0.5, True)
    hb = linear_act_ref(x, w, "leaky_relu_sq", 0.5)[1]
    assert_close_rel(dh, oracle, linear_act_grad_ref(g, wd, hb, 0.5, True), name="dh")
    assert torch.equal(dh, mod._grad_signs_op(g, wd, a, signs, 0.5, True)) or cfg != mod.default_config(
        T, N, 24, g.is_cuda, dtype, "leaky_relu_sq_grad_signs")


def test_signs_ops_registration():
    """``linear_act_grad_signs`` is a custom op with a fake (opcheck), and ``linear_act_signs`` returns uint8 signs
    of width N / 8 on every dispatch path."""
    x, w = _inputs(2, 9, 16, 8, False, torch.float32)
    a, s = mod.linear_act_signs(x, w, 0.5)
    assert a.shape == (2, 9, 16) and s.shape == (2, 9, 2) and s.dtype == torch.uint8
    g = torch.randn(2, 9, 8, generator=torch.Generator().manual_seed(draw_seed())).to(DEVICE)
    torch.library.opcheck(mod._grad_signs_op, (g, w.transpose(0, 1).contiguous(), a, s, 0.5, True))
    with pytest.raises(ValueError, match=r"linear_act_signs: w's N \(12\) must be a multiple of 8"):
        mod.linear_act_signs(x, w[:12], 0.5)
    with pytest.raises(ValueError, match="linear_act_signs: slope must be >= 0"):
        mod.linear_act_signs(x, w, -0.5)
    with pytest.raises(TypeError, match="w"):
        mod.linear_act_signs(x, w.double(), 0.5)
    with pytest.raises(ValueError, match="w must have shape"):
        mod.linear_act_signs(x, w[:, :4].contiguous(), 0.5)


def test_signs_epilogues_compile_for_sm90():
    """The signs epilogues at their default tile (the split 128 x 256 tile) for sm_90a: TMA copies, async wgmma, no
    spills, within shared memory (measured here: 182,296 B forward, 213,032 B derivative)."""
    from conftest import run_sm90_check

    run_sm90_check("import torch\n"
                   "from pgolf_kernels.linear_act import default_config\n"
                   "from pgolf_kernels.sm90_check import linear_act_stats\n"
                   "for act, name, kw in ((3, 'leaky_relu_sq_signs', {}), (4, 'leaky_relu_sq_grad_signs', dict(w_kn=True))):\n"
                   "    for per_row in (False, True):\n"
                   "        cfg = default_config(2048, 1536, 512, True, torch.bfloat16, name)\n"
                   "        s = linear_act_stats(act=act, per_row=per_row, **cfg, **kw)\n"
                   "        assert s['tma_copies'] > 0 and s['fits_smem'], (act, s)\n"
                   "        assert s['async_wgmma'] and s['spill_bytes'] == 0, (act, s)\n")
