"""head_norm_rope: per-head RMSNorm + gain + rotary in one pass, forward and backward, against an fp64 oracle.

CPU lane: the kernels under Triton's interpreter (fp16 / fp32) on shapes that leave a tail in T, with and without a
gain, NaN-filled outputs; the custom ops' registration and torch.compile(fullgraph=True); the module; that the
reference is the model's own composition (eps included); bad input. GPU lane (-m gpu): bf16 at the records' q and k
shapes and CUDA-graph replay. Tolerance (``pgolf_kernels.testing.assert_close_rel``): at most 2x the error of the
composition computed op by op in the same dtype (``head_norm_rope_ref``) against fp64.
"""
import pytest
import torch

from conftest import BenchSmoke, DEVICE, HAS_CUDA, draw_seed
from pgolf_kernels import _utils
from pgolf_kernels import head_norm_rope as mod
from pgolf_kernels.head_norm_rope import HeadNormRope, default_eps, head_norm_rope, head_norm_rope_ref
from pgolf_kernels.testing import assert_close_rel, nan_empty

# (B, T, heads, head_dim): 64-row tiles, T = 150 gives three with a tail, the others one partial tile; head_dim 2 is
# the smallest
SHAPES = [(1, 150, 2, 16), (2, 37, 3, 16), (1, 20, 2, 64), (3, 5, 4, 8), (1, 16, 1, 2)]


@pytest.fixture(autouse=True)
def _nan_outputs(monkeypatch):
    monkeypatch.setattr(_utils, "empty", nan_empty)


def _inputs(B, T, H, D, dtype, device=DEVICE, gain=True):
    g = torch.Generator().manual_seed(draw_seed())
    x = (torch.randn(B, T, H * D, generator=g) * 2.0).to(device, dtype)
    theta = torch.outer(torch.arange(T, dtype=torch.float32), 10000.0 ** (-torch.arange(0, D, 2) / D))
    cos, sin = theta.cos().to(device, dtype)[None, None], theta.sin().to(device, dtype)[None, None]
    gn = (torch.rand(H, generator=g) + 0.5).to(device, dtype) if gain else None
    return x, cos, sin, gn


def _oracle(x, cos, sin, H, gain):
    """The composition in fp64 from the same (rounded) inputs, with the eps the op uses for x.dtype."""
    return head_norm_rope_ref(x.double(), cos.double(), sin.double(), H, None if gain is None else gain.double(),
                              eps=default_eps(x.dtype))


def _dgain_floor(x, cos, sin, H, dy):
    """The rounding floor of dgain_h = Σ_{b,t,d} dy ⊙ rope(r·x) (an fp32 sum whose order differs from torch's): the
    summation bound eps·Σ|terms| relative to |Σ terms|, largest over heads, times 4. A sum that nearly cancels (a
    head of 1 x 16 x 2 values drew 1.4e-6 against a 1.2e-6 bound) has a large relative error for any summation
    order; the baseline's own order can be lucky."""
    t = dy.double() * head_norm_rope_ref(x.double(), cos.double(), sin.double(), H, eps=default_eps(x.dtype))
    cond = t.abs().sum((0, 2, 3)) / t.sum((0, 2, 3)).abs().clamp_min(1e-300)
    return 4 * torch.finfo(torch.float32).eps * float(cond.max())


def _kernel_lane(x):
    if not _utils.use_triton(x):
        pytest.skip("needs TRITON_INTERPRET=1 or CUDA: this test runs the kernels")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("gain", [True, False])
def test_forward_matches_fp64(shape, dtype, gain):
    B, T, H, D = shape
    x, cos, sin, g = _inputs(B, T, H, D, dtype, gain=gain)
    _kernel_lane(x)
    y = mod._fwd_launch(x, cos, sin, g, H, default_eps(dtype))
    assert y.shape == (B, H, T, D) and y.dtype == dtype and y.is_contiguous()
    assert_close_rel(y, _oracle(x, cos, sin, H, g), head_norm_rope_ref(x, cos, sin, H, g), name="y")
    yt = mod._fwd_launch(x, cos, sin, g, H, default_eps(dtype), "bthd")  # the (B, T, H, D) order: same values
    assert yt.shape == (B, T, H, D) and yt.is_contiguous() and torch.equal(yt.transpose(1, 2), y)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("gain", [True, False])
@pytest.mark.parametrize("layout", ["bhtd", "bthd"])
def test_backward_matches_fp64(shape, dtype, gain, layout):
    B, T, H, D = shape
    x, cos, sin, g = _inputs(B, T, H, D, dtype, gain=gain)
    _kernel_lane(x)
    gen = torch.Generator().manual_seed(draw_seed())
    dy = torch.randn(B, H, T, D, generator=gen).to(DEVICE, dtype)
    xs = x.clone().requires_grad_()
    gs = g.clone().requires_grad_() if gain else None
    head_norm_rope(xs, cos, sin, H, gs, layout=layout).backward(dy)
    x64 = x.double().requires_grad_()
    g64 = g.double().requires_grad_() if gain else None
    head_norm_rope_ref(x64, cos.double(), sin.double(), H, g64, eps=default_eps(dtype)).backward(dy.double())
    xb = x.clone().requires_grad_()
    gb = g.clone().requires_grad_() if gain else None
    head_norm_rope_ref(xb, cos, sin, H, gb).backward(dy)
    assert xs.grad.dtype == dtype and xs.grad.shape == x.shape
    assert_close_rel(xs.grad, x64.grad, xb.grad, name="dx")
    if gain:
        assert gs.grad.dtype == dtype
        assert_close_rel(gs.grad, g64.grad, gb.grad, name="dgain",
                         floor=max(1e-6, _dgain_floor(x, cos, sin, H, dy)))


def test_backward_reads_dy_in_either_order():
    """The backward kernel takes dy's strides: a gradient in (B, H, T, D) or (B, T, H, D) order gives the same dx
    bitwise, with no copy needed for either."""
    B, T, H, D = 2, 70, 2, 16
    x, cos, sin, g = _inputs(B, T, H, D, torch.float32)
    _kernel_lane(x)
    dy = torch.randn(B, H, T, D, generator=torch.Generator().manual_seed(draw_seed())).to(DEVICE)
    e = default_eps(x.dtype)
    want = mod._bwd_launch(dy, x, cos, sin, g, H, e, True)
    for layout, d in (("bthd", dy.transpose(1, 2).contiguous()), ("bthd", dy.transpose(1, 2)),
                      ("bhtd", dy.transpose(1, 2).contiguous().transpose(1, 2))):
        got = mod._bwd_launch(d, x, cos, sin, g, H, e, True, layout)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (layout, d.stride())


def test_eps_reaches_the_kernels():
    """fp32 inputs with an RMS of ~2e-4 (mean square ~4e-8, of the order of eps = 1.2e-7): a kernel that dropped or
    changed eps would be ~50 % off, forward and backward."""
    x, cos, sin, g = _inputs(2, 19, 2, 16, torch.float32)
    _kernel_lane(x)
    x = x * 1e-4
    y = mod._fwd_launch(x, cos, sin, g, 2, default_eps(x.dtype))
    assert_close_rel(y, _oracle(x, cos, sin, 2, g), head_norm_rope_ref(x, cos, sin, 2, g), name="y")
    dy = torch.randn(2, 2, 19, 16, generator=torch.Generator().manual_seed(draw_seed())).to(DEVICE)
    dx, dg = mod._bwd_launch(dy, x, cos, sin, g, 2, default_eps(x.dtype), True)
    x64, g64 = x.double().requires_grad_(), g.double().requires_grad_()
    head_norm_rope_ref(x64, cos.double(), sin.double(), 2, g64, eps=default_eps(x.dtype)).backward(dy.double())
    xb, gb = x.clone().requires_grad_(), g.clone().requires_grad_()
    head_norm_rope_ref(xb, cos, sin, 2, gb).backward(dy)
    assert_close_rel(dx, x64.grad, xb.grad, name="dx")
    assert_close_rel(dg, g64.grad, gb.grad, name="dgain", floor=max(1e-6, _dgain_floor(x, cos, sin, 2, dy)))


def test_strided_input_read_in_place():
    """x may be a strided view whose rows have unit stride, e.g. the q slice of a fused QKV projection's output
    (B, T, 3·H·D)[..., :H·D]: forward and backward (dx comes back contiguous) equal those of the same values
    copied, bitwise."""
    x, cos, sin, g = _inputs(2, 21, 2, 16, torch.float32)
    _kernel_lane(x)
    big = torch.zeros(2, 21, 3 * 32, device=DEVICE)
    big[..., 32:64] = x
    view = big[..., 32:64]
    assert not view.is_contiguous() and view.stride(-1) == 1
    dy = torch.randn(2, 2, 21, 16, generator=torch.Generator().manual_seed(draw_seed())).to(DEVICE)
    outs = []
    for src in (view, x):
        leaf = big.clone().requires_grad_() if src is view else x.clone().requires_grad_()
        inp = leaf[..., 32:64] if src is view else leaf
        y = head_norm_rope(inp, cos, sin, 2, g)
        y.backward(dy)
        outs.append((y, leaf.grad[..., 32:64] if src is view else leaf.grad))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    dx = mod._bwd_launch(dy, view, cos, sin, g, 2, default_eps(x.dtype), True)[0]
    assert dx.is_contiguous() and torch.equal(dx, outs[1][1])
    # validate=False skips the stride check: an x without unit stride along its rows is copied, not misread
    xt = x.transpose(1, 2).contiguous().transpose(1, 2)
    assert torch.equal(head_norm_rope(xt, cos, sin, 2, g, validate=False), outs[1][0])


def test_reference_is_the_models_composition():
    """head_norm_rope_ref with eps=None computes what train.model's attention computes: F.rms_norm without an eps
    (the default the op's eps must equal), the gain, apply_rotary. Inputs with a tiny RMS make eps matter."""
    from train.model import apply_rotary, rms_norm

    B, T, H, D = 2, 9, 3, 16
    for dtype in (torch.float16, torch.float32, torch.bfloat16):
        x, cos, sin, g = _inputs(B, T, H, D, dtype, device="cpu")
        x = x * 1e-4  # mean square ~4e-8, of the order of the fp32 eps 1.2e-7 (the fp16 eps would swamp it)
        q = rms_norm(x.reshape(B, T, H, D).transpose(1, 2)) * g[None, :, None, None]
        want = apply_rotary(q, cos, sin)
        assert torch.equal(head_norm_rope_ref(x, cos, sin, H, g), want), dtype
        assert not torch.equal(head_norm_rope_ref(x, cos, sin, H, g, eps=torch.finfo(torch.float16).eps), want)


def test_default_eps_is_rms_norms():
    x = torch.full((1, 8), 1e-4, dtype=torch.float16)
    ms = x.double().square().mean()
    got = torch.nn.functional.rms_norm(x, (8,)).double()
    want = (x.double() / (ms + default_eps(torch.float16)).sqrt()).to(torch.float16).double()
    assert torch.equal(got, want) and default_eps(torch.float16) == torch.finfo(torch.float32).eps


def test_bthd_layout_is_the_projections_order_and_sdpa_keeps_it():
    """layout="bthd": a (B, H, T, D) view over (B, T, H, D) memory with the values of the default layout; dx through
    attention against fp64 (that SDPA's output then needs no copy is the GPU lane's test below)."""
    B, T, H, D = 2, 70, 2, 16
    x, cos, sin, g = _inputs(B, T, H, D, torch.float32)
    _kernel_lane(x)
    y = head_norm_rope(x, cos, sin, H, g, layout="bthd")
    assert y.shape == (B, H, T, D) and y.transpose(1, 2).is_contiguous()
    assert torch.equal(y, head_norm_rope(x, cos, sin, H, g))
    xs = x.clone().requires_grad_()
    q = head_norm_rope(xs, cos, sin, H, g, layout="bthd")
    k = head_norm_rope(xs, cos, sin, H, layout="bthd")
    v = xs.view(B, T, H, D).transpose(1, 2)
    o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    o.transpose(1, 2).reshape(B, T, H * D).square().sum().backward()
    x64 = x.double().requires_grad_()
    q64 = head_norm_rope_ref(x64, cos.double(), sin.double(), H, g.double(), eps=default_eps(x.dtype))
    k64 = head_norm_rope_ref(x64, cos.double(), sin.double(), H, eps=default_eps(x.dtype))
    o64 = torch.nn.functional.scaled_dot_product_attention(q64, k64, x64.view(B, T, H, D).transpose(1, 2),
                                                           is_causal=True)
    o64.square().sum().backward()
    xb = x.clone().requires_grad_()
    ob = torch.nn.functional.scaled_dot_product_attention(head_norm_rope_ref(xb, cos, sin, H, g),
                                                          head_norm_rope_ref(xb, cos, sin, H),
                                                          xb.view(B, T, H, D).transpose(1, 2), is_causal=True)
    ob.square().sum().backward()
    assert_close_rel(xs.grad, x64.grad, xb.grad, name="dx through attention")


def test_public_function_dispatch_and_no_grad_path():
    """The public function: output equal to the kernel launch (same eps), and under no_grad no graph is kept."""
    x, cos, sin, g = _inputs(2, 19, 2, 16, torch.float32)
    _kernel_lane(x)
    with torch.no_grad():
        y = head_norm_rope(x, cos, sin, 2, g)
    assert y.grad_fn is None
    assert torch.equal(y, mod._fwd_launch(x, cos, sin, g, 2, default_eps(x.dtype)))


def test_custom_ops_registered_and_opcheck():
    x, cos, sin, g = _inputs(1, 17, 2, 8, torch.float32)
    _kernel_lane(x)
    dy = torch.randn(1, 2, 17, 8, generator=torch.Generator().manual_seed(draw_seed())).to(DEVICE)
    for layout, d in (("bhtd", dy), ("bthd", dy.transpose(1, 2).contiguous())):
        torch.library.opcheck(torch.ops.pgolf.head_norm_rope, (x, cos, sin, g, 2, 1e-6, layout),
                              test_utils=("test_schema", "test_faketensor"))
        torch.library.opcheck(torch.ops.pgolf.head_norm_rope_bwd, (d, x, cos, sin, g, 2, 1e-6, True, layout),
                              test_utils=("test_schema", "test_faketensor"))


def test_compile_fullgraph_forward_backward():
    x, cos, sin, g = _inputs(2, 18, 2, 8, torch.float32)
    _kernel_lane(x)

    def f(x, g):
        return head_norm_rope(x, cos, sin, 2, g, validate=False).square().sum()

    xe, ge = x.clone().requires_grad_(), g.clone().requires_grad_()
    f(xe, ge).backward()
    xc, gc = x.clone().requires_grad_(), g.clone().requires_grad_()
    torch.compile(f, fullgraph=True, backend="aot_eager")(xc, gc).backward()
    assert torch.allclose(xc.grad, xe.grad, rtol=1e-5, atol=1e-6) and torch.allclose(gc.grad, ge.grad, rtol=1e-5)


def test_kernels_compile_for_sm90_with_16_byte_accesses():
    """Triton's compiler + bundled ptxas build both kernels for sm_90a on this machine (no GPU needed), as a launch at
    the records' shapes specializes them: no spills, and every access to x, y, dy, dx and the tables 16 bytes wide
    (the one 2-byte load is the gain)."""
    from conftest import run_sm90_check

    run_sm90_check("from pgolf_kernels.sm90_check import head_norm_rope_stats\n"
                   "for kw in (dict(), dict(gain=False), dict(bwd=True), dict(bwd=True, gain=False, need_dg=False)):\n"
                   "    s = head_norm_rope_stats(**kw)\n"
                   "    assert s['spill_bytes'] == 0 and s['st_b16'] == 0, (kw, s)\n"
                   "    assert s['ld_b16'] == int(kw.get('gain', True)), (kw, s)\n"
                   "    assert s['ld_v4'] == (12 if kw.get('bwd') else 8) and s['st_v4'] == 4, (kw, s)\n")


def test_module_holds_the_gain():
    x, cos, sin, _ = _inputs(2, 17, 2, 16, torch.float32)
    _kernel_lane(x)
    m = HeadNormRope(2, 16, gain=True, gain_init=1.5, device=DEVICE)
    y = m(x, cos, sin)
    assert torch.equal(y, head_norm_rope(x, cos, sin, 2, torch.full((2,), 1.5, device=DEVICE)))
    y.sum().backward()
    assert m.gain.grad is not None and m.gain.grad.shape == (2,) and torch.isfinite(m.gain.grad).all()
    assert HeadNormRope(2, 16).gain is None


def test_the_bench_runs_and_checks_on_tiny_shapes():
    """bench.bench_head_norm_rope's rows at tiny shapes (a stand-in timer and compile): every contestant runs, the
    correctness check passes, the rows carry the figures the docs cite."""
    from bench.bench_head_norm_rope import measure

    smoke = BenchSmoke()
    rows = measure(torch.device("cpu"), 2, 20, 16, [("q", 2, True), ("k", 1, False)], smoke.timer, smoke.compile,
                   torch.float32, graph_timer=smoke.graph_timer)
    calls, graph_calls = smoke.calls, smoke.graph_calls
    assert [r["case"] for r in rows] == [
        "q: B2 T20 heads 2 x 16, gain, float32, forward", "q: B2 T20 heads 2 x 16, gain, float32, forward + backward",
        "k: B2 T20 heads 1 x 16, float32, forward", "k: B2 T20 heads 1 x 16, float32, forward + backward",
        "q/k prep + causal SDPA (2 q / 1 kv heads) + output reshape, forward + backward: B2 T20 D16, float32"]
    assert all(r["speedup"] == 1.0 for r in rows) and all(r["ours_gbps"] > 0 for r in rows[:4])
    assert rows[4]["bhtd_speedup"] == 1.0 and len(calls) == 15
    # forward + backward rows and the attention path: ours and compiled also from graph replay
    assert [i for i, r in enumerate(rows) if "graph_ms" in r] == [1, 3, 4] and len(graph_calls) == 6
    assert all(rows[i]["graph_speedup"] == 1.0 and rows[i]["baseline_graph_ms"] == 0.5 for i in (1, 3, 4))


def _bad(x, cos, sin, H=2, g=None, eps=None, match=""):
    with pytest.raises((TypeError, ValueError), match=match):
        head_norm_rope(x, cos, sin, H, g, eps=eps)


def test_bad_input_refused_by_name():
    x, cos, sin, g = _inputs(1, 8, 2, 16, torch.float32, device="cpu")
    _bad(x.to(torch.int32), cos, sin, match="x must have dtype")
    _bad(x[0], cos, sin, match="x must have 3 dimensions")
    _bad(x.transpose(1, 2).contiguous().transpose(1, 2), cos, sin, match="x must have unit stride in its last dim")
    _bad(x, cos, sin, H=3, match="num_heads")
    _bad(x, cos, sin, H=0, match="num_heads must be an int >= 1")
    _bad(x, cos, sin, H=2.0, match="num_heads must be an int")
    _bad(torch.zeros(1, 8, 24), torch.zeros(8, 6), torch.zeros(8, 6), H=2, match="twice a power of two")
    _bad(x, cos[..., :4], sin, match="cos must be the rotary table of shape")
    _bad(x, cos, sin[..., :7, :], match="sin must be the rotary table of shape")
    _bad(x, cos, sin, g=g[:1], match=r"gain must have shape \(num_heads,\)")
    _bad(x, cos, sin, g=g.to(torch.int64), match="gain must have dtype")
    _bad(x, cos, sin, eps=-1.0, match="eps must be a finite float")
    _bad(x, cos, sin, eps=float("nan"), match="eps must be a finite float")
    with pytest.raises(ValueError, match="layout must be one of bhtd, bthd, got 'bshd'"):
        head_norm_rope(x, cos, sin, 2, layout="bshd")
    if HAS_CUDA:
        _bad(x.cuda(), cos, sin, match="cos is on cpu but must be on cuda")


gpu = pytest.mark.skipif(not HAS_CUDA, reason="GPU lane: needs a CUDA device")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("H,gain", [(8, True), (4, False)])
def test_gpu_records_shapes_bf16(H, gain):
    """The records' q (8 heads, with q_gain) and k (4 heads) at 4 rows x 2048 positions, forward and backward."""
    B, T, D = 4, 2048, 64
    x, cos, sin, g = _inputs(B, T, H, D, torch.bfloat16, gain=gain)
    assert_close_rel(head_norm_rope(x, cos, sin, H, g), _oracle(x, cos, sin, H, g),
                     head_norm_rope_ref(x, cos, sin, H, g), name="y")
    dy = torch.randn(B, H, T, D, generator=torch.Generator().manual_seed(draw_seed())).to(DEVICE, torch.bfloat16)
    xs = x.clone().requires_grad_()
    head_norm_rope(xs, cos, sin, H, g).backward(dy)
    x64 = x.double().requires_grad_()
    head_norm_rope_ref(x64, cos.double(), sin.double(), H, None if g is None else g.double(),
                       eps=default_eps(x.dtype)).backward(dy.double())
    xb = x.clone().requires_grad_()
    head_norm_rope_ref(xb, cos, sin, H, g).backward(dy)
    assert_close_rel(xs.grad, x64.grad, xb.grad, name="dx")


@pytest.mark.gpu
@gpu
def test_gpu_cudnn_sdpa_output_in_bthd_order_needs_no_copy():
    """The reason for layout="bthd": cuDNN's SDPA (the backend of the TTT step on H100 / H200) writes its output in
    q's order, so with q, k and v in (B, T, H, D) order the attention output's (B, T, H·D) view is free (same storage,
    contiguous), and its backward runs."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    B, T, Hq, Hk, D = 2, 256, 8, 4, 64
    xq, cos, sin, g = _inputs(B, T, Hq, D, torch.bfloat16)
    xk, _, _, _ = _inputs(B, T, Hk, D, torch.bfloat16, gain=False)
    xq.requires_grad_()
    v = torch.randn(B, T, Hk * D, device=DEVICE, dtype=torch.bfloat16)
    q = head_norm_rope(xq, cos, sin, Hq, g, layout="bthd")
    k = head_norm_rope(xk, cos, sin, Hk, layout="bthd")
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v.view(B, T, Hk, D).transpose(1, 2),
                                                             is_causal=True, enable_gqa=True)
        flat = o.transpose(1, 2).reshape(B, T, Hq * D)
        assert flat.data_ptr() == o.data_ptr() and o.transpose(1, 2).is_contiguous()
        flat.float().square().sum().backward()
    assert xq.grad is not None and torch.isfinite(xq.grad).all()


@pytest.mark.gpu
@gpu
def test_gpu_cuda_graph_replay_equals_eager():
    x, cos, sin, g = _inputs(2, 512, 8, 64, torch.bfloat16)
    eager = head_norm_rope(x, cos, sin, 8, g)
    graph = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        head_norm_rope(x, cos, sin, 8, g)
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(graph):
        out = head_norm_rope(x, cos, sin, 8, g)
    x.copy_(x.flip(1))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, head_norm_rope(x, cos, sin, 8, g)) and not torch.equal(out, eager)
