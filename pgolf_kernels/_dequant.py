"""Dequantization of int-k codes, shared by the ops that take quantized weights (``int6_linear``, ``lora``).

Math: W[n, k] = dtype(float32(q[n, k]) * float32(s[n])), q int8 (N, K) codes, s (N,) row scales. The value is
rounded once, to the activation dtype; the dx kernel of ``int6_linear`` forms the same values in registers, and
the pure-torch references use the same expression, so every path that dequantizes sees bitwise one W.

Large-M rule: a GEMM with M >= ``large_m`` rows runs as one dequantization pass into an (N, K) temporary plus
cuBLAS, instead of a kernel that converts the code tile in every K step of every output tile. Why the default is
1024: at M = 1024, N = K = 512 the fused int6 kernels take 9.0 (fwd) / 12.1 (dx) us against cuBLAS 3.7 / 3.7 us
(H200, bench/results/int6-h200.md), a margin the 0.25-0.8 MB dequantization pass stays inside; below 1024 the
fused kernels are within 0.5-1 us of cuBLAS and never materialize W. The ops take ``large_m=`` as an argument.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _utils
from ._utils import cdiv, use_triton

DEFAULT_LARGE_M = 1024


@triton.jit
def _dequant_kernel(q_ptr, s_ptr, out_ptr, N, K, stride_q, stride_o, BN: tl.constexpr, BK: tl.constexpr):
    """out[n, k] = dtype(float(q[n, k]) * float(s[n])): bitwise ``dequant_aten``."""
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    rk = tl.program_id(1) * BK + tl.arange(0, BK)
    m = (rn[:, None] < N) & (rk[None, :] < K)
    q = tl.load(q_ptr + rn[:, None] * stride_q + rk[None, :], mask=m, other=0)
    s = tl.load(s_ptr + rn, mask=rn < N, other=0.0)
    w = q.to(tl.float32) * s.to(tl.float32)[:, None]
    tl.store(out_ptr + rn[:, None] * stride_o + rk[None, :], w.to(out_ptr.dtype.element_ty), mask=m)


def dequant_aten(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``dtype(float(q) * float(scale)[:, None])`` as aten ops (traceable by torch.compile)."""
    return (q.to(torch.float32) * scale.to(torch.float32)[:, None]).to(dtype)


def dequant(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(N, K) ``dtype`` weight from contiguous int8 codes q (N, K) and row scales (N,), without argument checks
    (callers validated q and scale): one Triton pass on CUDA / under TRITON_INTERPRET=1, aten ops otherwise."""
    N, K = q.shape
    if not use_triton(q):
        return dequant_aten(q, scale, dtype)
    out = _utils.empty((N, K), dtype, q.device)
    BN, BK = 32, 128
    _dequant_kernel[(cdiv(N, BN), cdiv(K, BK))](q, scale, out, N, K, q.stride(0), out.stride(0), BN=BN, BK=BK)
    return out
