"""Merged-weight strategy of ``multi_lora_linear``: fold each row's adapter into its base weight, then one GEMM.

Math (per slice i, batch row b, adapter a = adapter_index[b]; only without padding, i.e. ``lengths`` is None)::

    E_i[b]   = x.dtype( W_iᵀ + α · A_i[a]ᵀ · B_i[a]ᵀ )      (d, N_i)   A, B cast to x.dtype, fp32 accumulate,
                                                                        one rounding (cuBLAS baddbmm epilogue)
    y_i[b]   = x[b] · E_i[b]                                 (T, N_i)

Backward (the base is frozen; E_i[b] is recomputed, not saved: 50 MB at B64 d512 Q512+V256)::

    dx[b]    = Σ_i dy_i[b] · E_i[b]ᵀ                         (T, d)
    G_i[b]   = x[b]ᵀ · dy_i[b]                               (d, N_i)   the gradient of E_i[b]
    dA_i[a] += α · B_i[a]ᵀ · G_i[b]ᵀ                         (r, d)     fp32 out
    dB_i[a] += α · G_i[b]ᵀ · A_i[a]ᵀ                         (N_i, r)   fp32 out

Equal in exact arithmetic to the low-rank form of ``pgolf_kernels.lora`` (dA = α·gᵀ·x with g = dy·B is
α·Bᵀ·(dyᵀ·x) = α·Bᵀ·Gᵀ; dB = α·dyᵀ·(x·Aᵀ) = α·Gᵀ·Aᵀ).

Why: the low-rank products have an r-wide side (r = 96: N = 96 for the shrink, K = 96 for the expand), shapes on
which neither cuBLAS nor our fused kernels get near the tensor-core peak (H200, B64 T2048 Q512+V256 r96: compiled
bmm 1.227 ms fwd+bwd, our fused kernels 1.679 ms, bench/results/lora-h200.md), while every GEMM here is
base-shaped (K = d or K = T, N = out_i). Cost per row, counted at B64 T2048 d512 Q512+V256:

* FLOPs: forward 2·T·d·N (the base GEMM's own) + 2·d·r·N for E; backward 4·T·d·N + 6·d·r·N. All rows at r = 96:
  103 + 5 GFLOP forward, 206 + 14 backward (329 in all) against 341 for the low-rank form; at r = 8 the
  low-rank form needs 220 and this one 310 (E and G do not shrink with r).
* Bytes beyond the base GEMM's: E written and read twice per direction (0.79 MB per row and slice pair) and G
  (0.79 MB per row, bf16) -- independent of T, so the strategy pays when T is large against d·N/(d+N) = 307.

Precision: E carries the adapter delta at bf16 resolution of W (|error| <= ulp(W)/2 per element), the same order
as the bf16 rounding of y on the low-rank path; G is rounded to x.dtype before dA/dB (as g and u are on that path).
Tested against the fp64 oracle with the suite's 2x-of-torch's-bf16-path bound (tests/test_lora.py).

Dispatch (``use_merged``): only without ``lengths`` (padding rows must get the base output alone, which a merged
weight cannot give), and from ``MIN_T`` rows per batch row on. ``OVERRIDE`` = True/False forces the choice where
it is possible (benches, tests); the environment variable ``PGOLF_LORA_MERGED`` (auto / 1 / 0) sets it at import.
"""
from __future__ import annotations

import os
from typing import List, Optional, Tuple

import torch
from torch import Tensor



def _override_from_env() -> Optional[bool]:
    """PGOLF_LORA_MERGED: unset or "auto" = the rule in ``use_merged``; "1" = merged wherever possible; "0" = never."""
    raw = os.environ.get("PGOLF_LORA_MERGED", "auto")
    if raw not in ("auto", "0", "1"):
        raise ValueError(f"PGOLF_LORA_MERGED = {raw!r}: expected auto (the default rule), 1 (merged weights "
                         f"wherever lengths is None) or 0 (the Triton kernels always)")
    return None if raw == "auto" else raw == "1"


OVERRIDE: Optional[bool] = _override_from_env()
# From T = 512 on: the per-row costs of E and G (above) are then <= 1/3 of the activation traffic (d·N/(d+N)
# = 307 at Q512+V256); re-decided from the bench sweep (bench/bench_lora.py, MERGED rows).
MIN_T = 512


def use_merged(T: int, lengths: Optional[Tensor]) -> bool:
    """Whether ``multi_lora_linear`` takes the merged-weight path for a (B, T, d) input."""
    if lengths is not None:
        return False
    if OVERRIDE is not None:
        return bool(OVERRIDE)
    return T >= MIN_T


def _select(t: Tensor, adapter_index: Optional[Tensor], rows: int) -> Tensor:
    """The adapter of every batch row: rows 0..B-1, or adapter_index clamped to [0, n) (as the kernels clamp)."""
    if adapter_index is None:
        return t[:rows]
    return t.index_select(0, adapter_index.clamp(0, t.shape[0] - 1))


def _mm32(a: Tensor, b: Tensor) -> Tensor:
    """bmm with an fp32 result: cuBLAS accumulates in fp32 and stores fp32 (no rounding to the input dtype)."""
    if a.is_cuda and a.dtype in (torch.float16, torch.bfloat16):
        return torch.bmm(a, b, out_dtype=torch.float32)
    return torch.bmm(a.float(), b.float())


def effective_weight(W: Tensor, A: Tensor, Bm: Tensor, alpha: float) -> Tensor:
    """E = Wᵀ + α·Aᵀ·Bᵀ in W.dtype, (rows, d, N): W (N, d) dense; A (rows, r, d), Bm (rows, N, r) already
    selected per row. One baddbmm: the expanded Wᵀ is copied into the result, then the GEMM adds α·Aᵀ·Bᵀ in its
    fp32 epilogue and rounds once."""
    dt = W.dtype
    Wt = W.t().unsqueeze(0).expand(A.shape[0], -1, -1)
    return torch.baddbmm(Wt, A.to(dt).transpose(1, 2), Bm.to(dt).transpose(1, 2), alpha=alpha)


def forward(x: Tensor, Ws: List[Tensor], As: List[Tensor], Bs: List[Tensor], alpha: float,
            adapter_index: Optional[Tensor]) -> List[Tensor]:
    """y_i = x · E_i per row, as contiguous (B, T, N_i) tensors of x.dtype. Ws dense (N_i, d) of x.dtype."""
    rows = x.shape[0]
    return [torch.bmm(x, effective_weight(W, _select(A, adapter_index, rows), _select(Bm, adapter_index, rows),
                                          alpha))
            for W, A, Bm in zip(Ws, As, Bs)]


def backward(x: Tensor, dys: List[Tensor], Ws: List[Tensor], As: List[Tensor], Bs: List[Tensor], alpha: float,
             adapter_index: Optional[Tensor], need_dx: bool
             ) -> Tuple[Optional[Tensor], List[Tensor], List[Tensor]]:
    """(dx or None, per-row dA_i (B, r, d) fp32, per-row dB_i (B, N_i, r) fp32): the gradients of each batch row's
    own adapter, before any reduction over rows that share one."""
    rows = x.shape[0]
    dt = x.dtype
    xt = x.transpose(1, 2)
    dx: Optional[Tensor] = None
    dAs, dBs = [], []
    for W, A, Bm, dy in zip(Ws, As, Bs, dys):
        A_, B_ = _select(A, adapter_index, rows), _select(Bm, adapter_index, rows)
        if need_dx:
            Et = effective_weight(W, A_, B_, alpha).transpose(1, 2)
            dx = torch.bmm(dy, Et) if dx is None else dx.baddbmm_(dy, Et)
        G = torch.bmm(xt, dy)                                   # (B, d, N) in x.dtype
        dA = _mm32(B_.to(dt).transpose(1, 2), G.transpose(1, 2))   # (B, r, d)
        dB = _mm32(G.transpose(1, 2), A_.to(dt).transpose(1, 2))   # (B, N, r)
        if alpha != 1.0:
            dA.mul_(alpha)
            dB.mul_(alpha)
        dAs.append(dA)
        dBs.append(dB)
    return dx, dAs, dBs
