"""linear_act_ws: the warp-specialized Gluon GEMM with the leaky_relu² epilogue (experimental, opt-in).

CPU lane: the kernel compiled for sm_90a with Triton's bundled ptxas (no GPU: registers, spills, shared memory,
the partitions), and bad input refused by name before any launch. GPU lane (-m gpu, Hopper only): h and y against
the fp64 oracle with the suite's bound (at most 2x the error of torch's own path in the same dtype,
``linear_act_ref``), NaN-filled outputs, tails in M and N, a single tile (the second consumer idle) and the
records' MLP up-projection (131,072 x 512 -> 1536: programs with an odd and an even number of tiles).
"""
import json

import pytest
import torch

from conftest import HAS_CUDA, draw_seed, run_sm90_check
from pgolf_kernels.linear_act import linear_act_ref
from pgolf_kernels.testing import assert_close_rel

hopper = pytest.mark.skipif(not (HAS_CUDA and torch.cuda.get_device_capability()[0] == 9),
                            reason="needs a Hopper GPU (sm_90: wgmma, warp specialization)")


def test_compiles_for_sm90_without_spills():
    """The kernel as launched (4 + 4 + 1 warps, maxnreg 168) compiles for sm_90a: ptxas accepts it, no spill,
    shared memory within an H100's 232,448 bytes, the warp-specialized partitions present."""
    out = run_sm90_check("import json; from pgolf_kernels.linear_act_ws import compile_stats; "
                         "print(json.dumps(compile_stats()))")
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
