"""linear_act_ws: the warp-specialized Gluon GEMM with the leaky_relu² epilogue, and its derivative twin
(``linear_act_grad_ws``: dh = (g · W) ⊙ act'(h), W stored (K, N), h read in the epilogue).

CPU lane: the kernel compiled for sm_90a with Triton's bundled ptxas (no GPU: registers, spills, shared memory,
the partitions), and bad input refused by name before any launch. GPU lane (-m gpu, Hopper only): h and y against
the fp64 oracle with the suite's bound (at most 2x the error of torch's own path in the same dtype,
``linear_act_ref``), NaN-filled outputs, tails in M and N, a single tile (the second consumer idle) and the
records' MLP up-projection (131,072 x 512 -> 1536: programs with an odd and an even number of tiles); the
derivative the same way against ``linear_act_grad_ref`` at the records' MLP backward shape (both inside
``mlp_residual``: tests/test_linear_residual.py).
"""
import json

import pytest
import torch

from conftest import HAS_CUDA, draw_seed, run_sm90_check
from pgolf_kernels.linear_act import linear_act_ref
from pgolf_kernels.testing import assert_close_rel

hopper = pytest.mark.skipif(not (HAS_CUDA and torch.cuda.get_device_capability()[0] == 9),
                            reason="needs a Hopper GPU (sm_90: wgmma, warp specialization)")


@pytest.mark.parametrize("act", [1, 2])
def test_compiles_for_sm90_without_spills(act):
    """The kernel as launched (4 + 4 + 1 warps, maxnreg 168) compiles for sm_90a in both epilogues (act 1: h and
    act(h) out; act 2: h read, the derivative out, W (K, N)): ptxas accepts it, no spill, shared memory within an
    H100's 232,448 bytes, the warp-specialized partitions present."""
    out = run_sm90_check("import json; from pgolf_kernels.linear_act_ws import compile_stats; "
                         f"print(json.dumps(compile_stats(act={act})))")
    s = json.loads(out.strip().splitlines()[-1])
    assert s["ptxas_rc"] == 0, s["ptxas_err"]
    assert s["spill_bytes"] == 0 and s["regs"] is not None and s["regs"] <= 168, s
    assert 0 < s["smem"] <= 232448, s
    assert s["partitions"] > 0 and s["wgmma"] > 0, s


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

