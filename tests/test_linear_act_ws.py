"""linear_act_ws: the warp-specialized Gluon GEMM with the leaky_relu² epilogue, and its derivative twin
(``linear_act_grad_ws``: dh = (g · W) ⊙ act'(h), W stored (K, N), h read in the epilogue).

CPU lane: the kernel compiled for sm_90a with Triton's bundled ptxas (no GPU: registers, spills, shared memory,
the partitions), and bad input refused by name before any launch. GPU lane (-m gpu, Hopper only): h and y against
the fp64 oracle with the suite's bound (at most 2x the error of torch's own path in the same dtype,
``linear_act_ref``), NaN-filled outputs, tails in M and N, a single tile (the second consumer idle) and the
records' MLP up-projection (131,072 x 512 -> 1536: programs with an odd and an even number of tiles); the
derivative the same way against ``linear_act_grad_ref`` at the records' MLP backward shape (both inside
``mlp_residual``: tests/test_linear_residual.py); ``sum_products_ws`` (Σ_i x_i · w_i per batch row) against fp64 with
the bound of the bmm + baddbmm_ composition, at the merged q / k / v backward's shapes and tails.
"""
import json

import pytest
import torch

from conftest import HAS_CUDA, draw_seed, run_sm90_check
from pgolf_kernels.linear_act import linear_act_ref
from pgolf_kernels.testing import assert_close_rel

hopper = pytest.mark.skipif(not (HAS_CUDA and torch.cuda.get_device_capability()[0] == 9),
                            reason="needs a Hopper GPU (sm_90: wgmma, warp specialization)")


@pytest.mark.parametrize("kw", [dict(act=1), dict(act=2), dict(act=3), dict(act=3, x2=True),
                                dict(act=3, x2=True, pro_act=True), dict(act=0, nsrc=1), dict(act=0, nsrc=4),
                                dict(act=4)], ids=lambda kw: "-".join(f"{k}{v}" for k, v in kw.items()))
def test_compiles_for_sm90_without_spills(kw):
    """The kernels as launched (4 + 4 + 1 warps, maxnreg 168) compile for sm_90a in every epilogue (act 1: h and
    act(h) out; act 2: h read, the derivative out, W (K, N); act 3: the residual read, res + s ⊙ acc out, with and
    without the second product, and with act(h) formed in registers as the A operand; act 0: ``sum_products_ws``,
    the sum loader with one and four sources, W read (K, N) per batch row; act 4: ``linear_rows_ws``, three per-row
    weights, each tile stored into the output of its columns): ptxas accepts them, no spill, no wgmma serialized
    (C7515: the register operand's wgmma waited for in place), shared memory within an H100's 232,448 bytes, the
    warp-specialized partitions present."""
    out = run_sm90_check("import json; from pgolf_kernels.linear_act_ws import compile_stats; "
                         f"print(json.dumps(compile_stats(**{kw!r})))")
    s = json.loads(out.strip().splitlines()[-1])
    assert s["ptxas_rc"] == 0, s["ptxas_err"]
    assert s["spill_bytes"] == 0 and s["regs"] is not None and s["regs"] <= 168, s
    assert 0 < s["smem"] <= 232448, s
    assert s["partitions"] > 0 and s["wgmma"] > 0 and not s["wgmma_serialized"], s


@pytest.mark.parametrize("tile", [0, 2, 3])
def test_every_ring_tile_compiles_for_sm90_without_spills(tile):
    """Each ring tile of ``TILES`` (BK x STAGES) besides the default (``DEFAULT_TILE``, 1: the test above), through
    ``use_tile``, compiles for sm_90a in the residual epilogue with the second product (the stages the adapter's rank
    shares) and the 4-source sum: no spill, no wgmma serialized, shared memory within an H100's 232,448 bytes."""
    out = run_sm90_check("import json; from pgolf_kernels import linear_act_ws as m; "
                         f"m.use_tile(*m.TILES[{tile}]); "
                         "print(json.dumps([m.compile_stats(act=3, x2=True), m.compile_stats(act=0, nsrc=4)]))")
    for s in json.loads(out.strip().splitlines()[-1]):
        assert s["ptxas_rc"] == 0, s["ptxas_err"]
        assert s["spill_bytes"] == 0 and s["regs"] is not None and s["regs"] <= 168, s
        assert 0 < s["smem"] <= 232448, s
        assert s["partitions"] > 0 and s["wgmma"] > 0 and not s["wgmma_serialized"], s


def test_ring_tile_switch(monkeypatch):
    """``use_tile`` takes only a (BK, STAGES) of ``TILES`` (refused by name otherwise, the tile unchanged);
    PGOLF_WS_TILE picks one at import by index, TILES[DEFAULT_TILE] when unset, and a bad value is refused by name."""
    from pgolf_kernels import linear_act_ws as m

    assert m.DEFAULT_TILE == 1 and m.TILES[1] == (64, 5)   # the tests above compile the default with every epilogue
    start = (m.BK, m.STAGES)
    with pytest.raises(ValueError, match=r"use_tile: \(bk, stages\) = \(64, 3\): expected one of"):
        m.use_tile(64, 3)
    assert (m.BK, m.STAGES) == start
    try:
        m.use_tile(32, 8)
        assert (m.BK, m.STAGES) == (32, 8)
    finally:
        m.use_tile(*start)
    monkeypatch.delenv("PGOLF_WS_TILE", raising=False)
    assert m._tile_from_env() == m.TILES[m.DEFAULT_TILE]
    monkeypatch.setenv("PGOLF_WS_TILE", "3")
    assert m._tile_from_env() == (128, 2)
    monkeypatch.setenv("PGOLF_WS_TILE", "64x4")
    with pytest.raises(ValueError, match=f"PGOLF_WS_TILE = '64x4': expected {m.DEFAULT_TILE} "):
        m._tile_from_env()


def test_ws_tiles_bench_rows_on_a_cpu():
    """bench.bench_ws_tiles' rows at tiny shapes on the CPU (a stand-in timer): one row per op and tile, the cuBLAS
    stand-ins timed, every Gluon op refused (no Hopper GPU) and so NaN, the tile the process had restored; and
    ``best_tile`` picks the least summed time among complete tiles over the ops the defaults run."""
    import math

    from bench.bench_ws_tiles import best_tile, measure
    from pgolf_kernels import linear_act_ws as m

    start = (m.BK, m.STAGES)
    rows = measure(torch.device("cpu"), 1, 16, lambda fn: (fn(), 1.0)[1], dtype=torch.float32)
    assert len(rows) == 6 * len(m.TILES) and (m.BK, m.STAGES) == start
    assert all(math.isnan(r["ours_ms"]) and r["cublas_ms"] == 1.0 for r in rows)
    assert best_tile(rows) is None
    for r in rows:   # complete timings: tile 2 the fastest in sum, tile 1 the fastest at one op only
        r["ours_ms"] = 1.0 if "BK 32 x 8" in r["case"] else 0.5 if ("BK 64 x 5" in r["case"] and "act B" in r["case"]) \
            else 1.2
    assert best_tile(rows) == 2
    for r in rows:   # a tile slow only at rows (off by default) still wins; counting rows, it does not
        r["ours_ms"] = (3.0 if "rows B" in r["case"] else 0.9) if "BK 64 x 5" in r["case"] else 1.0
    assert best_tile(rows) == 1 and best_tile(rows, ops=("act", "rows")) != 1


def test_bad_input_is_refused_by_name():
    from pgolf_kernels.linear_act_ws import linear_act_ws

    x = torch.zeros(8, 16, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="x"):
        linear_act_ws(x.float(), torch.zeros(8, 16))
    with pytest.raises(TypeError, match="w"):
        linear_act_ws(x, torch.zeros(8, 16, dtype=torch.float16))
    with pytest.raises(ValueError, match="w must be"):
        linear_act_ws(x, torch.zeros(8, 24, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="multiples of 8"):
        linear_act_ws(x, torch.zeros(12, 16, dtype=torch.bfloat16))
    w = torch.zeros(8, 16, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"out\[1\] \(h\) must be \(8, 8\)"):
        linear_act_ws(x, w, out=(torch.zeros(8, 8, dtype=torch.bfloat16), torch.zeros(8, 4, dtype=torch.bfloat16)))
    with pytest.raises(TypeError, match=r"out\[0\] \(y\)"):
        linear_act_ws(x, w, out=(torch.zeros(8, 8), torch.zeros(8, 8, dtype=torch.bfloat16)))
    with pytest.raises(ValueError, match="Hopper"):
        linear_act_ws(x, w)


def test_sum_and_rows_bad_input_is_refused_by_name():
    """``sum_products_ws`` and ``linear_rows_ws``: each bad argument refused by name, the device (Hopper) last."""
    from pgolf_kernels.linear_act_ws import linear_rows_ws, sum_products_ws

    bf = torch.bfloat16
    xs = [torch.zeros(2, 8, 16, dtype=bf), torch.zeros(2, 8, 8, dtype=bf)]
    ws = [torch.zeros(2, 16, 24, dtype=bf), torch.zeros(2, 8, 24, dtype=bf)]
    cases = [((xs, ws[:1]), ValueError, "xs and ws must be lists of one length"),
             ((xs * 3, ws * 3), ValueError, "1 to 4 sources"),
             (([xs[0].float()], ws[:1]), TypeError, r"xs\[0\]"),
             ((xs, [ws[0], ws[1].half()]), TypeError, r"ws\[1\]"),
             ((xs, [ws[0], torch.zeros(2, 16, 24, dtype=bf)]), ValueError, r"ws\[1\] \(2, K, 24\)"),
             (([torch.zeros(2, 8, 12, dtype=bf)], [torch.zeros(2, 12, 24, dtype=bf)]), ValueError, "multiple of 8"),
             ((xs, ws, torch.zeros(2, 8, 16, dtype=bf)), ValueError, r"out must be \(2, 8, 24\)"),
             ((xs, ws), ValueError, "Hopper")]
    for args, exc, match in cases:
        with pytest.raises(exc, match=match):
            sum_products_ws(*args)
    x = torch.zeros(2, 8, 64, dtype=bf)
    Es = [torch.zeros(2, 128, 64, dtype=bf), torch.zeros(2, 256, 64, dtype=bf)]
    cases = [((x.float(), Es), TypeError, "x"),
             ((x, Es * 2), ValueError, "1 to 3 per-row weights"),
             ((x, [torch.zeros(2, 96, 64, dtype=bf)]), ValueError, r"Es\[0\] must be \(2, N_i, 64\)"),
             ((x, [Es[0].half()]), TypeError, r"Es\[0\]"),
             ((x, Es, [torch.zeros(2, 8, 128, dtype=bf)]), ValueError, "outs must be a list of 2"),
             ((x, Es, [torch.zeros(2, 8, 128, dtype=bf), torch.zeros(2, 8, 128, dtype=bf)]), ValueError,
              r"outs\[1\] must be \(2, 8, 256\)"),
             ((x, Es), ValueError, "Hopper")]
    for args, exc, match in cases:
        with pytest.raises(exc, match=match):
            linear_rows_ws(*args)


def test_grad_bad_input_is_refused_by_name():
    from pgolf_kernels.linear_act_ws import linear_act_grad_ws

    g = torch.zeros(8, 16, dtype=torch.bfloat16)
    w = torch.zeros(16, 24, dtype=torch.bfloat16)
    h = torch.zeros(8, 24, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="g"):
        linear_act_grad_ws(g.float(), w, h)
    with pytest.raises(TypeError, match="w"):
        linear_act_grad_ws(g, w.half(), h)
    with pytest.raises(ValueError, match=r"w must be \(K = 16, N\)"):
        linear_act_grad_ws(g, torch.zeros(24, 16, dtype=torch.bfloat16), h)
    with pytest.raises(ValueError, match="multiples of 8"):
        linear_act_grad_ws(g, torch.zeros(16, 12, dtype=torch.bfloat16), torch.zeros(8, 12, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"h must be \(8, 24\)"):
        linear_act_grad_ws(g, w, torch.zeros(8, 16, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="out"):
        linear_act_grad_ws(g, w, h, out=torch.zeros(8, 24))
    with pytest.raises(ValueError, match="Hopper"):
        linear_act_grad_ws(g, w, h)


def test_residual_bad_input_is_refused_by_name():
    from pgolf_kernels.linear_act_ws import linear_residual_ws

    bf = dict(dtype=torch.bfloat16)
    res, a, w, s = torch.zeros(2, 128, 128, **bf), torch.zeros(2, 128, 64, **bf), torch.zeros(128, 64, **bf), \
        torch.zeros(128, **bf)
    u, w2 = torch.zeros(2, 128, 16, **bf), torch.zeros(2, 128, 16, **bf)
    with pytest.raises(TypeError, match="a"):
        linear_residual_ws(res, a.float(), w, s)
    with pytest.raises(ValueError, match="a must have 3 dimensions"):
        linear_residual_ws(res, a[0], w, s)
    with pytest.raises(ValueError, match="w must be"):
        linear_residual_ws(res, a, torch.zeros(128, 32, **bf), s)
    with pytest.raises(ValueError, match=r"res must be \(2, 128, 128\)"):
        linear_residual_ws(torch.zeros(2, 64, 128, **bf), a, w, s)
    with pytest.raises(ValueError, match="scale must have N = 128"):
        linear_residual_ws(res, a, w, s[:64])
    with pytest.raises(ValueError, match="u and w2 come together"):
        linear_residual_ws(res, a, w, s, u)
    with pytest.raises(ValueError, match="u must be"):
        linear_residual_ws(res, a, w, s, torch.zeros(2, 128, 12, **bf), torch.zeros(2, 128, 12, **bf))
    with pytest.raises(ValueError, match=r"out must be \(2, 128, 128\)"):
        linear_residual_ws(res, a, w, s, out=res[:1])
    with pytest.raises(ValueError, match="Hopper"):
        linear_residual_ws(res, a, w, s, u, w2)


def _inputs(M, K, N, dtype, scale=0.05):
    g = torch.Generator().manual_seed(draw_seed())
    x = torch.randn(M, K, generator=g).to("cuda", dtype)
    w = (torch.randn(N, K, generator=g) * scale).to("cuda", dtype)
    return x, w


@pytest.mark.gpu
@hopper
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M,K,N", [(128, 64, 128), (300, 512, 1536), (4097, 512, 520), (131072, 512, 1536)])
def test_gpu_matches_fp64(M, K, N, dtype):
    from pgolf_kernels.linear_act_ws import linear_act_ws

    x, w = _inputs(M, K, N, dtype)
    y = torch.full((M, N), float("nan"), device="cuda", dtype=dtype)
    h = torch.full((M, N), float("nan"), device="cuda", dtype=dtype)
    yo, ho = linear_act_ws(x, w, 0.5, out=(y, h))
    assert yo is y and ho is h
    yr, hr = linear_act_ref(x.double(), w.double())
    yb, hb = linear_act_ref(x, w)
    assert_close_rel(h, hr, hb, name=f"h {M}x{K}x{N}")
    assert_close_rel(y, yr, yb, name=f"y {M}x{K}x{N}")


@pytest.mark.gpu
@hopper
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M,K,N", [(128, 64, 128), (300, 512, 1536), (4097, 512, 520), (131072, 512, 1536)])
def test_gpu_grad_matches_fp64(M, K, N, dtype):
    """dh = (g · W) ⊙ act'(h) against fp64 (the product rounded to the dtype first, as the reference rounds it),
    NaN-filled output, tails in M and N, slope 0.5 and 0.3."""
    from pgolf_kernels.linear_act import linear_act_grad_ref
    from pgolf_kernels.linear_act_ws import linear_act_grad_ws

    gen = torch.Generator().manual_seed(draw_seed())
    g = torch.randn(M, K, generator=gen).to("cuda", dtype)
    w = (torch.randn(K, N, generator=gen) * 0.05).to("cuda", dtype)
    h = torch.randn(M, N, generator=gen).to("cuda", dtype)
    for slope in (0.5, 0.3):
        out = torch.full((M, N), float("nan"), device="cuda", dtype=dtype)
        assert linear_act_grad_ws(g, w, h, slope, out=out) is out
        ref = linear_act_grad_ref(g.double(), w.double(), h.double(), slope, w_kn=True)
        base = linear_act_grad_ref(g, w, h, slope, w_kn=True)
        assert_close_rel(out, ref, base, name=f"dh {M}x{K}x{N} slope {slope}")



def _residual_inputs(B, T, K, N, R, dtype):
    """res (B, T, N), a (B, T, K), W (N, K), s (N,), and u (B, T, R), w2 (B, N, R) or None for R 0: seeded, on the
    GPU."""
    gen = torch.Generator().manual_seed(draw_seed())
    res = torch.randn(B, T, N, generator=gen).to("cuda", dtype)
    a = torch.randn(B, T, K, generator=gen).to("cuda", dtype)
    w = (torch.randn(N, K, generator=gen) * K ** -0.5).to("cuda", dtype)
    s = (0.5 + torch.rand(N, generator=gen)).to("cuda", dtype)
    u = torch.randn(B, T, R, generator=gen).to("cuda", dtype) if R else None
    w2 = (torch.randn(B, N, R, generator=gen) * R ** -0.5).to("cuda", dtype) if R else None
    return res, a, w, s, u, w2


@pytest.mark.gpu
@hopper
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,T,K,N,R", [(1, 128, 64, 128, 0), (3, 100, 72, 136, 0), (2, 256, 512, 512, 96),
                                       (3, 384, 1536, 256, 8), (5, 96, 512, 512, 96), (3, 200, 1536, 520, 24),
                                       (64, 2048, 1536, 512, 96), (64, 2048, 512, 512, 0), (64, 48, 512, 512, 96)])
def test_gpu_residual_matches_fp64(B, T, K, N, R, dtype):
    """out = res + s ⊙ (a · Wᵀ + u · w2ᵀ) against fp64 (``linear_residual_ref``'s math) with the suite's bound
    against torch's own composition in the dtype, NaN-filled output: a single tile, tails in M and N and K without
    the second product, rank 96 (R past BK = 64, zero-filled) and rank 8, T not a multiple of the 128-row tile with
    the second product (a batch row's last tile reads the next row's rows and stores only its own; the window buckets
    of 96 and the 48-row tail block) and an N tail with it, the records' MLP-down and attention-output sites
    (64 x 2048)."""
    from pgolf_kernels.linear_act_ws import linear_residual_ws
    from pgolf_kernels.linear_residual import linear_residual_ref

    res, a, w, s, u, w2 = _residual_inputs(B, T, K, N, R, dtype)
    out = torch.full((B, T, N), float("nan"), device="cuda", dtype=dtype)
    assert linear_residual_ws(res, a, w, s, u, w2, out=out) is out
    d = [t.double() if t is not None else None for t in (res, a, w, s, u, w2)]
    assert_close_rel(out, linear_residual_ref(*d), linear_residual_ref(res, a, w, s, u, w2),
                     name=f"out {B}x{T}x{K}->{N} R {R}")


@pytest.mark.gpu
@hopper
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,T,H,N,R", [(1, 128, 64, 128, 0), (3, 100, 200, 136, 8), (5, 96, 1536, 512, 96),
                                       (64, 2048, 1536, 512, 96)])
def test_gpu_residual_with_act_prologue_matches_fp64(B, T, H, N, R, dtype):
    """``pre_act``: out = res + s ⊙ (dtype(leaky_relu(h, slope)²) · Wᵀ + u · w2ᵀ) with the activation formed from each
    h tile in registers, against fp64 of the same math (act(h) rounded to the dtype as ``linear_act_ref`` rounds
    it), slopes 0.5 and 0.3, NaN-filled output; tails in M, N and K (H 200), T not a multiple of the tile, the
    records' MLP down-projection (64 x 2048, H 1536, rank 96)."""
    from pgolf_kernels.linear_act import act_ref
    from pgolf_kernels.linear_act_ws import linear_residual_ws
    from pgolf_kernels.linear_residual import linear_residual_ref

    res, h, w, s, u, w2 = _residual_inputs(B, T, H, N, R, dtype)
    for slope in (0.5, 0.3):
        a = act_ref(h, "leaky_relu_sq", slope)
        out = torch.full((B, T, N), float("nan"), device="cuda", dtype=dtype)
        assert linear_residual_ws(res, h, w, s, u, w2, out=out, pre_act=slope) is out
        d = [t.double() if t is not None else None for t in (res, a, w, s, u, w2)]
        assert_close_rel(out, linear_residual_ref(*d), linear_residual_ref(res, a, w, s, u, w2),
                         name=f"out {B}x{T}x{H}->{N} R {R} slope {slope}")


def test_sum_fits_and_rows_fits_domain():
    """``sum_fits``: 1-4 sources of one 16-bit dtype, contiguous, on an sm_90 device only (a CPU tensor never);
    ``rows_fits``: the same for 1-3 per-row weights whose widths are multiples of the 128-column tile."""
    from pgolf_kernels.linear_act_ws import rows_fits, sum_fits

    x = torch.zeros(2, 8, 64, dtype=torch.bfloat16)
    Es = [torch.zeros(2, 128, 64, dtype=torch.bfloat16)]
    assert not rows_fits(x, Es)                       # CPU
    assert not rows_fits(x, Es * 4) and not rows_fits(x, [])

    xs = [torch.zeros(2, 8, k, dtype=torch.bfloat16) for k in (16, 8)]
    ws = [torch.zeros(2, k, 16, dtype=torch.bfloat16) for k in (16, 8)]
    assert not sum_fits(xs, ws)                       # CPU
    assert not sum_fits(xs * 3, ws * 3)               # 6 sources
    assert not sum_fits([], [])


def test_kernels_do_not_specialize_on_batch_rows():
    """The three Gluon kernels take B (batch rows) unspecialized and every other int argument specialized: one binary
    serves every CUDA-graph row bucket (59, 54, 1 rows as 64), T's divisibility still reaches the compiler."""
    from pgolf_kernels.linear_act_ws import _linear_act_ws_kernel, _rows_ws_kernel, _sum_ws_kernel

    for kernel in (_linear_act_ws_kernel, _sum_ws_kernel, _rows_ws_kernel):
        params = {p.name: p for p in kernel.params}
        assert params["B"].do_not_specialize, kernel.fn.__name__
        assert not params["T"].do_not_specialize and not params["N"].do_not_specialize, kernel.fn.__name__
        assert [p.name for p in kernel.params if p.do_not_specialize] == ["B"], kernel.fn.__name__


@pytest.mark.gpu
@hopper
def test_gpu_one_binary_for_every_row_count():
    """sum_products_ws at 64, 59 and 1 batch rows (divisible by 16, not, and 1: three binaries if B were specialized)
    with the same sources: at most one new binary in the kernel's cache, and each output against fp64."""
    from pgolf_kernels.linear_act_ws import _sum_ws_kernel, sum_products_ws
    from pgolf_kernels.lora_merged import sum_products_ref

    g = torch.Generator().manual_seed(draw_seed())
    dev = torch.device("cuda", torch.cuda.current_device())

    def binaries():
        return sum(len(c[0]) for d, c in _sum_ws_kernel.device_caches.items() if d == dev.index)

    before = None
    for B in (64, 59, 1):
        xs = [torch.randn(B, 96, k, generator=g).to("cuda", torch.float16) for k in (512, 96)]
        ws = [(torch.randn(B, k, 512, generator=g) * k ** -0.5).to("cuda", torch.float16) for k in (512, 96)]
        out = torch.full((B, 96, 512), float("nan"), device="cuda", dtype=torch.float16)
        sum_products_ws(xs, ws, out=out)
        oracle = sum(torch.bmm(x.double(), w.double()) for x, w in zip(xs, ws))
        assert_close_rel(out, oracle, sum_products_ref(xs, ws), name=f"sum {B} rows")
        before = binaries() if before is None else before
    assert binaries() == before, f"{binaries() - before} more binaries for 59 and 1 rows than for 64"


@pytest.mark.gpu
@hopper
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,T,ks,N", [(1, 128, [64], 128), (3, 130, [512, 256, 256, 96], 512), (5, 48, [512], 512),
                                      (2, 300, [96, 8], 136), (64, 2048, [512, 256, 256, 96], 512),
                                      (64, 2048, [512, 256, 256], 512)])
def test_gpu_sum_products_ws_matches_fp64(B, T, ks, N, dtype):
    """y[b] = Σ_i x_i[b] · w_i[b] against fp64 with the suite's bound against the bmm + baddbmm_ composition
    (``lora_merged.sum_products_ref``), NaN-filled output: a single tile, the merged q / k / v backward's sources with
    the o shrink's (K 96: past BK the x columns are zero-filled and the w rows are the next batch row's), T not a
    multiple of 128 (the 96-step window buckets' kind, the 48-row tail block), an N tail, the records' 64 x 2048."""
    from pgolf_kernels.linear_act_ws import sum_fits, sum_products_ws
    from pgolf_kernels.lora_merged import sum_products_ref

    g = torch.Generator().manual_seed(draw_seed())
    xs = [torch.randn(B, T, k, generator=g).to("cuda", dtype) for k in ks]
    ws = [(torch.randn(B, k, N, generator=g) * k ** -0.5).to("cuda", dtype) for k in ks]
    assert sum_fits(xs, ws)
    out = torch.full((B, T, N), float("nan"), device="cuda", dtype=dtype)
    assert sum_products_ws(xs, ws, out=out) is out
    oracle = sum(torch.bmm(x.double(), w.double()) for x, w in zip(xs, ws))
    assert_close_rel(out, oracle, sum_products_ref(xs, ws), name=f"sum {B}x{T} {ks} -> {N}")


@pytest.mark.gpu
@hopper
def test_gpu_sum_products_dispatches_to_the_gluon_kernel(monkeypatch):
    """``lora_merged.SUM_WS`` on: ``sum_products`` runs ``sum_products_ws`` (counted) with the same result bound."""
    import pgolf_kernels.linear_act_ws as ws_mod
    from pgolf_kernels import lora_merged as M

    calls = []
    real = ws_mod.sum_products_ws
    monkeypatch.setattr(ws_mod, "sum_products_ws", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    monkeypatch.setattr(M, "SUM_WS", True)
    g = torch.Generator().manual_seed(draw_seed())
    xs = [torch.randn(4, 200, k, generator=g).to("cuda", torch.bfloat16) for k in (512, 256, 256)]
    ws = [(torch.randn(4, k, 512, generator=g) * k ** -0.5).to("cuda", torch.bfloat16) for k in (512, 256, 256)]
    y = M.sum_products(xs, ws)
    assert calls == [1]
    oracle = sum(torch.bmm(x.double(), w.double()) for x, w in zip(xs, ws))
    assert_close_rel(y, oracle, M.sum_products_ref(xs, ws), name="sum_products with SUM_WS")


def _rows_inputs(B, T, K, ns, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, K, generator=g).to("cuda", dtype)
    Es = [(torch.randn(B, n, K, generator=g) * K ** -0.5).to("cuda", dtype) for n in ns]
    return x, Es


@pytest.mark.gpu
@hopper
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,T,K,ns", [(1, 128, 64, [128]), (3, 130, 512, [512, 256, 256]), (5, 48, 512, [512, 256, 256]),
                                      (2, 300, 72, [128, 256]), (64, 2048, 512, [512, 256, 256])])
def test_gpu_linear_rows_ws_matches_fp64(B, T, K, ns, dtype):
    """[x · E_iᵀ per batch row] for 1-3 per-row weights in one launch against fp64 with the suite's bound against
    cuBLAS's bmm per slice, NaN-filled outputs: a single tile, the merged q / k / v forward's slices (512, 256, 256)
    with T not a multiple of 128 (the window buckets of 96, the 48-row tail block), two slices with a K tail, the
    records' 64 x 2048."""
    from pgolf_kernels.linear_act_ws import linear_rows_ws, rows_fits

    x, Es = _rows_inputs(B, T, K, ns, dtype, draw_seed())
    assert rows_fits(x, Es)
    outs = [torch.full((B, T, n), float("nan"), device="cuda", dtype=dtype) for n in ns]
    ys = linear_rows_ws(x, Es, outs=outs)
    assert all(y is o for y, o in zip(ys, outs))
    for i, (y, E) in enumerate(zip(ys, Es)):
        assert_close_rel(y, torch.bmm(x.double(), E.double().transpose(1, 2)), torch.bmm(x, E.transpose(1, 2)),
                         name=f"y{i} {B}x{T}x{K} -> {ns}")


@pytest.mark.gpu
@hopper
def test_gpu_merged_forward_dispatches_to_the_gluon_kernel(monkeypatch):
    """``lora_merged.QKV_WS`` on: the merged forward's q / k / v products come from one ``linear_rows_ws`` launch
    (counted), within the bound of one bmm per slice."""
    import pgolf_kernels.linear_act_ws as ws_mod
    from pgolf_kernels import lora_merged as M

    calls = []
    real = ws_mod.linear_rows_ws
    monkeypatch.setattr(ws_mod, "linear_rows_ws", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    g = torch.Generator().manual_seed(draw_seed())
    x = torch.randn(4, 200, 512, generator=g).to("cuda", torch.bfloat16)
    Ws = [(torch.randn(n, 512, generator=g) * 0.05).to("cuda", torch.bfloat16) for n in (512, 256, 256)]
    As = [torch.randn(4, 8, 512, generator=g).cuda() * 0.05 for _ in Ws]
    Bs = [torch.randn(4, W.shape[0], 8, generator=g).cuda() * 0.05 for W in Ws]
    monkeypatch.setattr(M, "QKV_WS", True)
    ys, Es = M.forward(x, Ws, As, Bs, 0.5, None)
    assert calls == [1]
    for y, E in zip(ys, Es):
        assert_close_rel(y, torch.bmm(x.double(), E.double().transpose(1, 2)), torch.bmm(x, E.transpose(1, 2)),
                         name="merged forward with QKV_WS")
