"""int6_linear: Triton forward / dx kernels vs fp64/fp32 references, autograd, custom-op
registration, module + converter, bad input.

CPU lane: the kernels run in Triton's interpreter (fp16/fp32, tiny awkward shapes, explicit
configs covering both SWAP variants and K/N tails). GPU lane (-m gpu): every benchmark shape at
every benchmark M in bf16, every autotune config on an awkward shape with NaN-filled outputs,
fp16, torch.compile(fullgraph=True) and CUDA-graph capture.

Tolerance rule (pgolf_kernels.testing.assert_close_rel): error vs a high-precision reference on
the exact weights q*s must be <= 2x the error of torch's own low-precision path,
F.linear(x, (q*s).to(dtype)), against the same reference.
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import draw_seed
import pgolf_kernels.int6_linear as mod
from pgolf_kernels.int6_linear import (
    Int6Linear,
    convert_linears_to_int6,
    int6_linear,
    int6_linear_dx,
    int6_linear_dx_ref,
    int6_linear_ref,
)
from pgolf_kernels.quant import quantize_rows
from pgolf_kernels import _utils
from pgolf_kernels.testing import assert_close_rel, nan_empty, rel_err

HAS_CUDA = torch.cuda.is_available()
# explicit interpreter configs: (SWAP, BM, BN, BK, SPLIT, warps, stages). The third has BK=64 > K
# for some shapes and BN=16, so tails in every dimension are exercised; the last two split the
# reduction (3 splits of a 4-5 step loop leave one split short or empty).
INTERP_CFGS = [(1, 16, 32, 32, 1, 4, 1), (0, 16, 32, 32, 1, 4, 1), (1, 16, 16, 64, 1, 4, 1),
               (1, 16, 32, 16, 3, 4, 1), (0, 16, 16, 16, 2, 4, 1)]
SMALL_SHAPES = [(1, 40, 72), (3, 33, 64), (17, 70, 50)]  # (M, N, K): none a multiple of the block


@pytest.fixture(autouse=True)
def _nan_outputs(monkeypatch):
    # every output buffer the ops allocate starts as NaN: an unwritten element fails the test
    monkeypatch.setattr(_utils, "empty", nan_empty)


def _gen():
    return torch.Generator().manual_seed(draw_seed())


def _weights(g, n, k, bits=6, device="cpu"):
    qt = quantize_rows(torch.randn(n, k, generator=g) * 0.05, bits)
    return qt.q.to(device), qt.scale.to(device)


def _w64(q, s):
    return q.double() * s.double()[:, None]


# ---- CPU lane: kernels in the interpreter (or on the GPU when present) -------------------------
@pytest.mark.parametrize("cfg", INTERP_CFGS, ids=lambda c: f"swap{c[0]}_bm{c[1]}_bn{c[2]}_bk{c[3]}_split{c[4]}")
@pytest.mark.parametrize("shape", SMALL_SHAPES, ids=lambda s: "M%d_N%d_K%d" % s)
@pytest.mark.parametrize("kind", ["fwd", "dx"])
def test_kernel_configs(device, kind, cfg, shape):
    M, N, K = shape
    g = _gen()
    dt = torch.float16
    q, s = _weights(g, N, K, device=device)
    if kind == "fwd":
        x = torch.randn(M, K, generator=g).to(device, dt)
        b = torch.randn(N, generator=g).to(device, dt)
        out = nan_empty((M, N), dt, device)
        mod._launch_fwd(x, q, s, b, out, cfg)
        ref = x.double() @ _w64(q, s).T + b.double()
        base = int6_linear_ref(x, q, s, b)  # torch's fp16 path: weight rounded to fp16, fp16 GEMM
    else:
        dy = torch.randn(M, N, generator=g).to(device, dt)
        out = nan_empty((M, K), dt, device)
        mod._launch_dx(dy, q, s, out, cfg)
        ref = dy.double() @ _w64(q, s).to(dt).double()  # the kernel's weight is bitwise fp16(q*s)
        base = int6_linear_dx_ref(dy, q, s)
    err = assert_close_rel(out, ref, base, name="y" if kind == "fwd" else "dx")
    print(f"rel err {err:.2e} (torch fp16 path {rel_err(base, ref):.2e})")


@pytest.mark.skipif(HAS_CUDA, reason="CPU lane: drives the autotuner through the interpreter")
@pytest.mark.parametrize("M", [3, 40, 200], ids=lambda m: f"M{m}")
def test_autotuner_every_candidate_in_interpreter(M, monkeypatch):
    # The real autotune path (bucket pruning, split-K workspace sizing, GPU tile configs) with a
    # stub timer that NaN-fills the output, runs the candidate once and checks it against fp64.
    g = _gen()
    N, K = 70, 200  # K % 128 and N % 64 != 0: tails; split-K configs see uneven/empty splits
    q, s = _weights(g, N, K)
    x = torch.randn(M, K, generator=g).half()
    dy = torch.randn(M, N, generator=g).half()
    outs = []
    monkeypatch.setattr(_utils, "empty", lambda shape, dtype, device: outs.append(nan_empty(shape, dtype, device)) or outs[-1])
    monkeypatch.setattr(mod, "_INTERP_AUTOTUNE", True)
    checked = []

    def stub(ref, base):
        def bench(fn, quantiles):
            out = outs[-1]
            out.fill_(float("nan"))
            fn()
            assert_close_rel(out, ref, base, name=f"candidate {len(checked)}")
            checked.append(1)
            return [float(len(checked))] * 3  # first candidate "wins"
        return bench

    for tuner, ref, base, call in [
        (mod._fwd_tuned, x.double() @ _w64(q, s).T, int6_linear_ref(x, q, s), lambda: int6_linear(x, q, s)),
        (mod._dx_tuned, dy.double() @ _w64(q, s).half().double(), int6_linear_dx_ref(dy, q, s), lambda: int6_linear_dx(dy, q, s)),
    ]:
        # do_bench is a cached_property on triton's Autotuner: patch the instance dict
        monkeypatch.setitem(tuner.__dict__, "do_bench", stub(ref, base))
        monkeypatch.setattr(tuner, "cache", {})
        n0 = len(checked)
        y = call()
        n_cands = len(mod._allowed(M, N, K) if tuner is mod._fwd_tuned else mod._allowed(M, K, N))
        assert len(checked) - n0 == n_cands >= 3
        assert_close_rel(y, ref, base, name="tuned")
        # the candidate set is part of the key: a config is reused only for the same set
        assert any(mod._cfg_mask(mod._allowed(M, N, K)) in k or mod._cfg_mask(mod._allowed(M, K, N)) in k for k in tuner.cache)


def test_split_workspace_covers_every_candidate():
    # the workspace a launch allocates must hold every split config the tuner may pick for it
    for M in [1, 16, 17, 64, 100, 256, 300, 1024, 4096, 5000]:
        for n_out, red in [(512, 512), (70, 200), (8192, 512), (512, 8192), (4096, 1024)]:
            ok = mod._allowed(M, n_out, red)
            assert ok and set(ok) <= set(mod._BUCKETS[_utils.m_bucket(M)])
            ws, cnt = mod._split_workspace(M, n_out, "cpu", "test", [mod._CONFIGS[i] for i in ok])
            for i in ok:
                c = mod._CONFIGS[i]
                if c[4] > 1:
                    tiles = -(-M // c[1]) * -(-n_out // c[2])
                    assert tiles < mod._SMS
                    assert ws.numel() >= tiles * c[4] * c[1] * c[2] and cnt.numel() >= tiles
                    assert (cnt == 0).all()


@pytest.mark.parametrize("bits", [5, 7, 8])
def test_other_bit_widths_and_full_int8_range(device, bits):
    g = _gen()
    M, N, K = 5, 36, 48
    if bits == 8:  # every int8 value incl. -128, which only raw codes can hold
        q = torch.randint(-128, 128, (N, K), generator=g, dtype=torch.int8).to(device)
        s = (torch.rand(N, generator=g) * 0.01 + 1e-3).half().to(device)
    else:
        q, s = _weights(g, N, K, bits=bits, device=device)
    x = torch.randn(M, K, generator=g).to(device, torch.float32)
    y = int6_linear(x, q, s, bits=bits)
    ref = x.double() @ _w64(q, s).T
    # fp32 activations: products exact (ieee dot), fp32 accumulation only
    assert_close_rel(y, ref, int6_linear_ref(x, q, s), name="y fp32")
    dy = torch.randn(M, N, generator=g).to(device, torch.float32)
    assert_close_rel(int6_linear_dx(dy, q, s), dy.double() @ _w64(q, s), int6_linear_dx_ref(dy, q, s), name="dx fp32")


def test_autograd_leading_dims_noncontiguous(device):
    g = _gen()
    N, K = 24, 40
    dt = torch.float16
    q, s = _weights(g, N, K, device=device)
    x0 = torch.randn(K, 3, 2, generator=g).to(device, dt)
    x = x0.permute(2, 1, 0).requires_grad_()  # (2, 3, K), non-contiguous; grad flows to a leaf
    x.retain_grad()
    b = torch.randn(N, generator=g).to(device, dt).requires_grad_()
    y = int6_linear(x, q, s, b)
    assert y.shape == (2, 3, N) and y.dtype == dt
    dy = torch.randn(2, 3, N, generator=g).to(device, dt)
    y.backward(dy)
    # fp64 reference autograd on the exact weights
    x64 = x.detach().double().requires_grad_()
    b64 = b.detach().double().requires_grad_()
    F.linear(x64, _w64(q, s), b64).backward(dy.double())
    # torch's own fp16 path for the baseline error
    xb = x.detach().clone().requires_grad_()
    bb = b.detach().clone().requires_grad_()
    int6_linear_ref(xb, q, s, bb).backward(dy)
    assert_close_rel(x.grad, x64.grad, xb.grad, name="dx")
    assert_close_rel(b.grad, b64.grad, bb.grad, name="dbias")


def test_backward_with_expanded_grad(device):
    # y.sum().backward() hands the op a stride-0 dy; the dx path must make it contiguous
    g = _gen()
    q, s = _weights(g, 20, 36, device=device)
    x = torch.randn(4, 36, generator=g).to(device, torch.float32).requires_grad_()
    int6_linear(x, q, s).sum().backward()
    ref = torch.ones(4, 20, dtype=torch.float64, device=device) @ _w64(q, s)
    assert_close_rel(x.grad, ref, int6_linear_dx_ref(torch.ones(4, 20, device=device), q, s), name="dx")


def test_empty_batch(device):
    g = _gen()
    q, s = _weights(g, 8, 16, device=device)
    y = int6_linear(torch.zeros(0, 16, device=device, dtype=torch.float16), q, s)
    assert y.shape == (0, 8)
    assert int6_linear_dx(torch.zeros(2, 0, 8, device=device, dtype=torch.float16), q, s).shape == (2, 0, 16)


def test_dispatch_paths(device, monkeypatch):
    g = _gen()
    q, s = _weights(g, 20, 36, device=device)
    x = torch.randn(3, 36, generator=g).to(device, torch.float16)
    calls = []
    orig = mod._launch_fwd
    monkeypatch.setattr(mod, "_launch_fwd", lambda *a, **k: calls.append(1) or orig(*a, **k))
    y_kernel = int6_linear(x, q, s)
    assert calls, "CUDA or TRITON_INTERPRET=1 must run the Triton kernel"
    # plain CPU (no interpreter): the pure-torch reference, bit for bit
    monkeypatch.setattr(mod, "use_triton", lambda t: False)
    calls.clear()
    y_ref = int6_linear(x, q, s)
    assert not calls
    assert torch.equal(y_ref, int6_linear_ref(x, q, s))
    assert_close_rel(y_kernel, x.double() @ _w64(q, s).T, y_ref)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", [(1, 5), (33, 130), (70, 257)], ids=lambda s: "N%d_K%d" % s)
def test_dequantize_weight_bitwise(device, dtype, shape):
    g = _gen()
    q, s = _weights(g, *shape, device=device)
    w = mod.dequantize_weight(q, s, dtype)  # NaN-filled buffer: every element must be written
    assert w.dtype == dtype and w.shape == shape
    assert torch.equal(w, (q.float() * s.float()[:, None]).to(dtype))


def test_dequantize_weight_bad_input(device):
    g = _gen()
    q, s = _weights(g, 8, 16, device=device)
    with pytest.raises(TypeError, match="q must have dtype int8"):
        mod.dequantize_weight(q.float(), s)
    with pytest.raises(ValueError, match="q must have 2 dimensions"):
        mod.dequantize_weight(q[None], s)
    with pytest.raises(ValueError, match="scale must have shape"):
        mod.dequantize_weight(q, s[:4])
    with pytest.raises(TypeError, match="scale must have dtype float16"):
        mod.dequantize_weight(q, s.float())
    with pytest.raises(ValueError, match="q must be contiguous"):
        mod.dequantize_weight(q.t(), s)
    with pytest.raises(TypeError, match="dtype must be"):
        mod.dequantize_weight(q, s, torch.int32)


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_large_m_path(device, monkeypatch, bias):
    """M >= LARGE_M: one dequantization + torch.mm instead of the fused kernels, fwd and dx."""
    g = _gen()
    M, N, K = 37, 41, 70
    q, s = _weights(g, N, K, device=device)
    x = torch.randn(M, K, generator=g).to(device, torch.float16).requires_grad_(True)
    b = (torch.randn(N, generator=g) * 0.1).to(device, torch.float16) if bias else None
    fused = []
    orig_fwd, orig_dx = mod._launch_fwd, mod._launch_dx
    monkeypatch.setattr(mod, "_launch_fwd", lambda *a, **k: fused.append("fwd") or orig_fwd(*a, **k))
    monkeypatch.setattr(mod, "_launch_dx", lambda *a, **k: fused.append("dx") or orig_dx(*a, **k))
    monkeypatch.setattr(mod, "LARGE_M", M)  # this M takes the large-M path; M - 1 would not
    y = int6_linear(x, q, s, b)
    dy = torch.randn(M, N, generator=g).to(device, torch.float16)
    (dx,) = torch.autograd.grad(y, x, dy)
    if mod.use_triton(x):
        assert fused == [], "M >= LARGE_M must not launch the fused kernels"
    w64 = _w64(q, s)
    ref = x.detach().double() @ w64.T + (b.double() if bias else 0)
    assert_close_rel(y, ref, int6_linear_ref(x.detach(), q, s, b), name="y")
    assert_close_rel(dx, dy.double() @ w64, int6_linear_dx_ref(dy, q, s), name="dx")
    monkeypatch.setattr(mod, "LARGE_M", M + 1)
    y2 = int6_linear(x.detach(), q, s, b)
    if mod.use_triton(x):
        assert fused == ["fwd"], "M < LARGE_M must run the fused kernel"
    assert_close_rel(y2, ref, int6_linear_ref(x.detach(), q, s, b), name="y fused")


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_large_m_public_path_is_inlined(device, monkeypatch, bias):
    """At M >= LARGE_M the public int6_linear is plain aten ops (no custom-op dispatch per call) with
    bitwise the values of the custom op's own large-M branch, fwd and dx; compiled, no pgolf op is
    left in the graph."""
    g = _gen()
    M, N, K = 37, 41, 70
    q, s = _weights(g, N, K, device=device)
    x = torch.randn(M, K, generator=g).to(device, torch.float16).requires_grad_(True)
    b = (torch.randn(N, generator=g) * 0.1).to(device, torch.float16) if bias else None
    dy = torch.randn(M, N, generator=g).to(device, torch.float16)
    ops = []
    orig = mod._int6_linear_op
    monkeypatch.setattr(mod, "_int6_linear_op", lambda *a: ops.append(1) or orig(*a))
    y = int6_linear(x, q, s, b, large_m=M)  # the argument, not the module default, decides
    (dx,) = torch.autograd.grad(y, x, dy)
    y_op = torch.ops.pgolf.int6_linear(x, q, s, b, M)  # the custom op, its large-M branch
    (dx_op,) = torch.autograd.grad(y_op, x, dy)
    if not mod.use_triton(x):
        assert ops == [1], "without Triton the public function must go through the op (reference path)"
        return
    assert ops == [], "M >= LARGE_M must not dispatch the custom op"
    assert torch.equal(y, y_op) and torch.equal(dx, dx_op)
    w64 = _w64(q, s)
    assert_close_rel(y, x.detach().double() @ w64.T + (b.double() if bias else 0), int6_linear_ref(x.detach(), q, s, b),
                     name="y")
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    torch._dynamo.reset()
    cf = torch.compile(lambda t: int6_linear(t, q, s, b, large_m=M), fullgraph=True, backend=backend)
    yc = cf(x)
    assert torch.equal(yc, y)
    assert graphs and not any("pgolf" in gr for gr in graphs), "compiled large-M graph still calls a pgolf op"
    torch._dynamo.reset()


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "1024"])
def test_large_m_must_be_a_positive_int(bad):
    q, s = _weights(_gen(), 8, 16)
    with pytest.raises(ValueError, match="large_m must be a positive int"):
        int6_linear(torch.randn(2, 16), q, s, large_m=bad)


def test_opcheck_registration(device):
    g = _gen()
    q, s = _weights(g, 16, 32, device=device)
    x = torch.randn(2, 3, 32, generator=g).to(device, torch.float32).requires_grad_()
    b = torch.randn(16, generator=g).to(device, torch.float32).requires_grad_()
    torch.library.opcheck(torch.ops.pgolf.int6_linear.default, (x, q, s, b))
    torch.library.opcheck(torch.ops.pgolf.int6_linear_dx.default, (torch.randn(5, 16, device=device), q, s))


def test_compile_fullgraph_aot_eager(device):
    # fake impl + autograd registration let dynamo/AOTAutograd trace one graph (no breaks)
    g = _gen()
    q, s = _weights(g, 16, 32, device=device)
    b = torch.randn(16, generator=g).to(device)

    def f(x):
        return int6_linear(x, q, s, b).square().sum()

    x = torch.randn(4, 32, generator=g).to(device).requires_grad_()
    f(x).backward()
    gx = x.grad.clone()
    x.grad = None
    torch._dynamo.reset()
    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    cf(x).backward()
    torch.testing.assert_close(x.grad, gx, rtol=1e-5, atol=1e-6)


def test_bad_input_messages(device):
    g = _gen()
    q, s = _weights(g, 8, 16, device=device)
    x = torch.randn(2, 16, generator=g).to(device, torch.float32)
    cases = [
        (lambda: int6_linear(x, q.int(), s), TypeError, "q must have dtype int8"),
        (lambda: int6_linear(x, q.float(), s), TypeError, "q must have dtype int8"),
        (lambda: int6_linear(x, q, s.float()), TypeError, "scale must have dtype float16"),
        (lambda: int6_linear(x, q, s[:4]), ValueError, r"scale must have shape \(8,\)"),
        (lambda: int6_linear(x, q, s[None]), ValueError, "scale must have 1 dimensions"),
        (lambda: int6_linear(x[:, :15], q, s), ValueError, "x's last dim must equal K"),
        (lambda: int6_linear(x.long(), q, s), TypeError, "x must have dtype"),
        (lambda: int6_linear(torch.tensor(1.0, device=device), q, s), ValueError, "x must have at least 1"),
        (lambda: int6_linear(x, q.t().contiguous().t(), s), ValueError, "q must be contiguous"),
        (lambda: int6_linear(x, q[None], s), ValueError, "q must have 2 dimensions"),
        (lambda: int6_linear(x, q, s, torch.zeros(7, device=device)), ValueError, r"bias must have shape \(8,\)"),
        (lambda: int6_linear(x, q, s, torch.zeros(8, device=device, dtype=torch.float16)), TypeError, "bias must have dtype float32"),
        (lambda: int6_linear(x, q, s, bits=4), ValueError, "bits must be one of"),
        (lambda: int6_linear(x, q, s.clone().requires_grad_()), ValueError, "scale is a frozen"),
        (lambda: int6_linear(x, q * 3, s, bits=6, validate=True), ValueError, r"q has codes in .* outside \[-32, 31\]"),
        (lambda: int6_linear_dx(x, q, s), ValueError, "dy's last dim must equal N"),
        (lambda: int6_linear(x.cpu() if device != "cpu" else x.to("meta"), q, s), ValueError, "q is on"),
    ]
    for fn, exc, pat in cases:
        with pytest.raises(exc, match=pat):
            fn()
    int6_linear(x, q, s, bits=6, validate=True)  # in range: no error


# ---- module + converter ---------------------------------------------------------------------
def test_int6linear_from_linear_and_state_dict(device):
    torch.manual_seed(draw_seed())
    lin = nn.Linear(40, 24).to(device)
    m = Int6Linear.from_linear(lin, bits=6)
    qt = quantize_rows(lin.weight.detach(), 6)
    assert torch.equal(m.q, qt.q) and torch.equal(m.scale, qt.scale)
    assert (m.in_features, m.out_features, m.bits) == (40, 24, 6)
    assert set(m.state_dict()) == {"q", "scale", "bias"}
    m2 = Int6Linear(40, 24, bias=True, bits=6).to(device)
    m2.load_state_dict(m.state_dict())
    x = torch.randn(3, 40, device=device)
    y = m(x)
    assert torch.equal(m2(x), y)
    # the quantized layer is close to the float one (int6 error, not kernel error)
    assert rel_err(y, lin(x)) < 0.05
    assert_close_rel(y, x.double() @ _w64(m.q, m.scale).T + lin.bias.double(), int6_linear_ref(x, m.q, m.scale, lin.bias))
    m3 = Int6Linear.from_codes(m.q, m.scale, None, bits=6)
    assert m3.bias is None and "bias=False" in repr(m3)
    with pytest.raises(ValueError, match="outside"):
        Int6Linear.from_codes(m.q * 4, m.scale, bits=5)
    with pytest.raises(TypeError, match="nn.Linear"):
        Int6Linear.from_linear(nn.Conv1d(2, 2, 1))


def test_convert_linears_with_filter(device):
    torch.manual_seed(draw_seed())

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 16)
            self.up = nn.Linear(16, 32)
            self.down = nn.Linear(32, 16, bias=False)
            self.head = nn.Linear(16, 10)
            self.norm = nn.LayerNorm(16)

        def forward(self, t):
            h = self.emb(t)
            h = h + self.down(F.relu(self.up(self.norm(h))))
            return self.head(h)

    model = Block().to(device)
    t = torch.randint(0, 10, (2, 5), device=device)
    y_float = model(t)
    convert_linears_to_int6(model, filter=lambda name, m: name != "head", bits=6)
    assert isinstance(model.up, Int6Linear) and isinstance(model.down, Int6Linear)
    assert type(model.head) is nn.Linear and type(model.emb) is nn.Embedding and type(model.norm) is nn.LayerNorm
    assert model.down.bias is None
    y = model(t)
    assert rel_err(y, y_float) < 0.05
    convert_linears_to_int6(model, bits=5)  # default filter: the rest
    assert isinstance(model.head, Int6Linear) and model.head.bits == 5


# ---- GPU lane ---------------------------------------------------------------------------------
BENCH_SHAPES = [(512, 512), (256, 512), (1536, 512), (2048, 512), (512, 1536), (512, 2048), (1024, 512), (8192, 512)]
BENCH_M = [1, 16, 64, 256, 1024, 4096, 16384, 65536, 131072]


@pytest.mark.gpu
@pytest.mark.parametrize("NK", BENCH_SHAPES, ids=lambda s: "N%d_K%d" % s)
def test_gpu_bench_shapes_bf16(NK):
    N, K = NK
    g = _gen()
    q, s = _weights(g, N, K, device="cuda")
    w32 = q.float() * s.float()[:, None]  # exact weights
    wbf = w32.bfloat16()
    worst = {"y_vs_exact": 0.0, "y_rounding_floor": 0.0, "y_vs_bf16ref": 0.0, "dx_vs_ref": 0.0}
    for M in BENCH_M:
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        y = int6_linear(x, q, s)
        ref = x.float() @ w32.T  # fp32 GEMM (TF32 off by default) on the exact weights
        base = F.linear(x, wbf)  # torch's bf16 path = int6_linear_ref
        assert_close_rel(y, ref, base, name=f"y M={M}")
        # Measured on H200 over all 8 shapes x 9 M (bench/results/logs/int6-gpu-tests-h200.txt): y vs exact
        # 1.67-1.74e-3 (= the floor), y vs F.linear(x, bf16(q*s)) 2.59-2.95e-3, dx 1.67-1.72e-3.
        # Tight check: y is fp32-accumulated and rounded once to bf16, so its error must sit at
        # the floor set by rounding the exact result to bf16 (x1.1 for accumulation-order ties).
        # On H200 this caught a tile config that returned 2.3x the floor on some large-M cases.
        e_y, floor = rel_err(y, ref), rel_err(ref.bfloat16(), ref)
        if M < mod.LARGE_M:
            assert e_y <= 1.1 * floor, f"M={M}: y error {e_y:.3e} vs bf16 rounding floor {floor:.3e}"
        else:
            # the large-M path is cuBLAS on bf16(q*s), i.e. torch's own bf16 path: it carries W's rounding
            assert rel_err(y, base) <= 0.5 * rel_err(base, ref), f"M={M}: large-M path is not cuBLAS on bf16(q*s)"
        worst["y_vs_exact"] = max(worst["y_vs_exact"], e_y)
        worst["y_rounding_floor"] = max(worst["y_rounding_floor"], floor)
        worst["y_vs_bf16ref"] = max(worst["y_vs_bf16ref"], rel_err(y, base))
        del ref, base
        dy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
        dx = int6_linear_dx(dy, q, s)
        dref = dy.float() @ wbf.float()  # the kernel's weight is bitwise bf16(q*s)
        assert_close_rel(dx, dref, dy @ wbf, name=f"dx M={M}")
        e_dx, dfloor = rel_err(dx, dref), rel_err(dref.bfloat16(), dref)
        assert e_dx <= 1.1 * dfloor, f"M={M}: dx error {e_dx:.3e} vs bf16 rounding floor {dfloor:.3e}"
        worst["dx_vs_ref"] = max(worst["dx_vs_ref"], e_dx)
        del x, y, dy, dx, dref
    print(f"N={N} K={K} worst relative errors over M: " + ", ".join(f"{k} {v:.2e}" for k, v in worst.items()))


@pytest.mark.gpu
@pytest.mark.parametrize("idx", range(len(mod._CONFIGS)))
def test_gpu_every_config_awkward_shape(idx):
    cfg = mod._CONFIGS[idx]
    g = _gen()
    M, N, K = 100, 200, 192  # K % 128 != 0, N % 64/128 != 0, M % 16.. != 0
    q, s = _weights(g, N, K, device="cuda")
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(N, device="cuda", dtype=torch.bfloat16)
    y = nan_empty((M, N), torch.bfloat16, "cuda")
    mod._launch_fwd(x, q, s, b, y, cfg)
    w32 = q.float() * s.float()[:, None]
    ref = x.float() @ w32.T + b.float()
    assert_close_rel(y, ref, F.linear(x, w32.bfloat16(), b), name="y")
    assert rel_err(y, ref) <= 1.1 * rel_err(ref.bfloat16(), ref)  # at the bf16 rounding floor
    dy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    dx = nan_empty((M, K), torch.bfloat16, "cuda")
    mod._launch_dx(dy, q, s, dx, cfg)
    dref = dy.float() @ w32.bfloat16().float()
    assert_close_rel(dx, dref, dy @ w32.bfloat16(), name="dx")
    assert rel_err(dx, dref) <= 1.1 * rel_err(dref.bfloat16(), dref)


@pytest.mark.gpu
def test_gpu_full_int8_range_bf16():
    # bits=8 codes incl. -128 through the bf16 kernels (the dx kernel's bit-trick dequant)
    g = _gen()
    q = torch.randint(-128, 128, (1536, 512), generator=g, dtype=torch.int8).cuda()
    s = (torch.rand(1536, generator=g) * 1e-3 + 1e-4).half().cuda()
    w32 = q.float() * s.float()[:, None]
    x = torch.randn(40, 512, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(40, 1536, device="cuda", dtype=torch.bfloat16)
    ref = x.float() @ w32.T
    assert rel_err(int6_linear(x, q, s, bits=8), ref) <= 1.1 * rel_err(ref.bfloat16(), ref)
    dref = dy.float() @ w32.bfloat16().float()
    assert rel_err(int6_linear_dx(dy, q, s), dref) <= 1.1 * rel_err(dref.bfloat16(), dref)


@pytest.mark.gpu
def test_gpu_fp16_autotuned_with_grads():
    g = _gen()
    q, s = _weights(g, 1536, 512, device="cuda")
    x = torch.randn(4, 17, 512, device="cuda", dtype=torch.float16, requires_grad=True)
    b = torch.randn(1536, device="cuda", dtype=torch.float16, requires_grad=True)
    y = int6_linear(x, q, s, b)
    dy = torch.randn_like(y)
    y.backward(dy)
    w32 = q.float() * s.float()[:, None]
    assert_close_rel(y, x.float() @ w32.T + b.float(), int6_linear_ref(x, q, s, b), name="y")
    assert_close_rel(x.grad, dy.float() @ w32.half().float(), dy @ w32.half(), name="dx")
    torch.testing.assert_close(b.grad, dy.sum((0, 1)))


@pytest.mark.gpu
def test_gpu_compile_fullgraph_matches_eager():
    torch.manual_seed(draw_seed())
    model = nn.Sequential(nn.Linear(512, 1536), nn.ReLU(), nn.Linear(1536, 512)).cuda()
    convert_linears_to_int6(model)
    x = torch.randn(8, 256, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def step(m, x):
        return m(x).float().square().mean()

    loss = step(model, x)
    loss.backward()
    g_eager = x.grad.clone()
    x.grad = None
    torch._dynamo.reset()
    cstep = torch.compile(step, fullgraph=True)
    closs = cstep(model, x)
    closs.backward()
    torch.testing.assert_close(closs, loss, rtol=1e-4, atol=0)
    # bias grads in bf16 and the ReLU mask make the compiled/eager graphs differ by bf16 rounding
    assert rel_err(x.grad, g_eager) < 1e-2


@pytest.mark.gpu
def test_gpu_cuda_graph_capture():
    g = _gen()
    q, s = _weights(g, 1536, 512, device="cuda")
    x = torch.randn(256, 512, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(256, 1536, device="cuda", dtype=torch.bfloat16)
    # warm up (autotune + compile) before capture, on a side stream as CUDA graphs require
    st = torch.cuda.Stream()
    st.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(st):
        int6_linear(x, q, s)
        int6_linear_dx(dy, q, s)
    torch.cuda.current_stream().wait_stream(st)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = int6_linear(x, q, s)
        dx = int6_linear_dx(dy, q, s)
    x.copy_(torch.randn_like(x))
    dy.copy_(torch.randn_like(dy))
    graph.replay()
    torch.cuda.synchronize()
    w32 = q.float() * s.float()[:, None]
    assert_close_rel(y, x.float() @ w32.T, F.linear(x, w32.bfloat16()), name="y (graph)")
    assert_close_rel(dx, dy.float() @ w32.bfloat16().float(), dy @ w32.bfloat16(), name="dx (graph)")
