"""Merged-weight strategy of ``multi_lora_linear``: fold each row's adapter into its base weight, then one GEMM.

Math (per slice i, batch row b, adapter a = adapter_index[b]; only without padding, i.e. ``lengths`` is None)::

    E_i[b]   = x.dtype( W_i + α · B_i[a] · A_i[a] )          (N_i, d)   A, B cast to x.dtype, fp32 accumulate,
                                                                        one rounding
    y_i[b]   = x[b] · E_i[b]ᵀ                                (T, N_i)

Backward (the base is frozen; E_i[b] is saved by the forward)::

    dx[b]    = Σ_i dy_i[b] · E_i[b]                          (T, d)
    Gt_i[b]  = dy_i[b]ᵀ · x[b]                               (N_i, d)   the gradient of E_i[b]
    dA_i[a] += α · B_i[a]ᵀ · Gt_i[b]                         (r, d)     fp32 out
    dB_i[a] += α · Gt_i[b] · A_i[a]ᵀ                         (N_i, r)   fp32 out

Equal in exact arithmetic to the low-rank form of ``pgolf_kernels.lora`` (dA = α·gᵀ·x with g = dy·B is
α·Bᵀ·(dyᵀ·x) = α·Bᵀ·Gt; dB = α·dyᵀ·(x·Aᵀ) = α·Gt·Aᵀ).

Why: the low-rank products have an r-wide side (r = 96: N = 96 for the shrink, K = 96 for the expand), shapes on
which neither cuBLAS nor our fused kernels get near the tensor-core peak (H200, B64 T2048 Q512+V256 r96: compiled
bmm 1.237 ms fwd+bwd, our fused kernels 1.662 ms, bench/results/lora-h200.md), while every GEMM here is
base-shaped (K = d or K = T, N = out_i) and runs on cuBLAS. Cost per row, counted at B64 T2048 d512 Q512+V256:

* FLOPs: forward 2·T·d·N (the base GEMM's own) + 2·d·r·N for E; backward 4·T·d·N + 4·d·r·N. All rows at r = 96:
  103 + 5 GFLOP forward, 206 + 10 backward (324 in all) against 341 for the low-rank form; at r = 8 the
  low-rank form needs 220 and this one 310 (E and Gt do not shrink with r).
* Bytes beyond the base GEMMs': E written once and read twice (0.79 MB per row for Q+V), Gt written once and read
  twice (0.79 MB) -- independent of T, so the strategy pays when T is large against d·N/(d+N) = 307.
* E is built by one Triton kernel (``_effective_kernel``: the rank-r product on tensor cores, Wᵀ added in the
  epilogue, A and B cast in registers). Measured (H200, B64 T2048 r96, Q slice): 0.047 ms, against 0.132 ms for
  torch.baddbmm on an expanded Wᵀ, whose broadcast copy alone took 0.072 ms per call.

Precision: E carries the adapter delta at the resolution of W in x.dtype (|error| <= ulp(W)/2 per element), the
same order as the rounding of y on the low-rank path; Gt is rounded to x.dtype before dA/dB (as g and u are on
that path). Tested against the fp64 oracle with the suite's 2x-of-torch's-own-path bound (tests/test_lora.py).

Dispatch (``use_merged``): only without ``lengths`` (padding rows must get the base output alone, which a merged
weight cannot give); from ``MIN_T`` rows per batch row on, or ``MIN_T_LARGE_RANK`` for ranks above
``lora_triton.LARGE_RANK``. ``OVERRIDE`` = True/False forces the choice where it is possible (benches, tests); the
environment variable ``PGOLF_LORA_MERGED`` (auto / 1 / 0) sets it at import.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _utils
from ._utils import check, check_tensor, env_choice, use_triton



def _override_from_env() -> Optional[bool]:
    """PGOLF_LORA_MERGED: unset or "auto" = the rule in ``use_merged``; "1" = merged wherever possible; "0" = never."""
    raw = env_choice("PGOLF_LORA_MERGED", {"auto": "the rule in use_merged", "1": "merged weights wherever lengths "
                                            "is None", "0": "the Triton kernels always"})
    return None if raw == "auto" else raw == "1"


OVERRIDE: Optional[bool] = _override_from_env()
# Thresholds from the bench (H200, fwd+bwd, B64 Q512+V256, bench/results/lora-h200.md, merged vs the kernels'
# defaults): r8 T1024 0.42 vs 0.51 ms; r96 T512 ~0.39 vs 0.51 ms; below that the kernels win or tie (r8 T512,
# r96 T256), as E and Gt cost the same per row while the rows' own work shrinks with T.
MIN_T = 1024
MIN_T_LARGE_RANK = 512


def use_merged(T: int, rank: int, lengths: Optional[Tensor]) -> bool:
    """Whether ``multi_lora_linear`` takes the merged-weight path for a (B, T, d) input at the largest rank.

    Traced by ``torch.compile`` (``torch.compiler.is_compiling()``) at a rank above ``lora_triton.LARGE_RANK``:
    merged at every T, the rule not looked at. Why: comparing a dynamic T with ``MIN_T_LARGE_RANK`` makes Dynamo guard on
    it, and each compiled function that holds the op is compiled twice, once per side. In the records' recipe
    (rank 96, windows 48..2048) that was 2 Dynamo frames more than the reference's (``_block_adapted`` and
    ``_block_tail`` recompiled on "512 <= x.size()[1]") and 9 more Triton builds of the kernels' strategy, inside
    a warm-up of 78.8 s against the reference's 51.4 s (H200, bench/results/warmup-h200.md). Merged costs no more
    there at T 256 (0.285 vs 0.294 ms fwd+bwd, B64 Q512+V256 r96) and 0.69x at T 512 (0.350 vs 0.509 ms,
    bench/results/lora-h200.md); the windows below 256 are a few steps per batch. At rank <= 32 the kernels win at
    T 256 (0.152 vs 0.200 ms) and the rule stays, with its recompile."""
    if lengths is not None:
        return False
    if OVERRIDE is not None:
        return bool(OVERRIDE)
    from .lora_triton import LARGE_RANK

    if rank > LARGE_RANK and torch.compiler.is_compiling():
        return True
    return T >= (MIN_T_LARGE_RANK if rank > LARGE_RANK else MIN_T)


@triton.jit
def _effective_kernel(W, A, Bm, IDX, E, AL, BL, N, D, R, n_adapters, alpha, HAS_IDX: tl.constexpr,
                      BN: tl.constexpr, BD: tl.constexpr, RP: tl.constexpr, LOW: tl.constexpr):
    """E[b, n, k] = W[n, k] + alpha * sum_r B[a, n, r] A[a, r, k], a = IDX[b] (clamped) or b; one (BN, BD) tile
    per program; A and B are cast to E's dtype before the dot (as the torch path casts the adapters). LOW: also
    AL[b] = dtype(alpha * A[a]) (the programs of the first n tile) and BL[b] = dtype(alpha * B[a]) (those of the
    first d tile), the backward's operands, from the tiles already loaded."""
    pn = tl.program_id(0)
    pd = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    a = b
    if HAS_IDX:
        a = tl.minimum(tl.maximum(tl.load(IDX + b).to(tl.int64), 0), n_adapters - 1)
    rn = pn * BN + tl.arange(0, BN)
    rd = pd * BD + tl.arange(0, BD)
    rr = tl.arange(0, RP)
    mn, md, mr = rn < N, rd < D, rr < R
    dt = E.dtype.element_ty
    bt = tl.load(Bm + a * N * R + rn[:, None] * R + rr[None, :], mask=mn[:, None] & mr[None, :], other=0.0)
    at = tl.load(A + a * R * D + rr[:, None] * D + rd[None, :], mask=mr[:, None] & md[None, :], other=0.0)
    if LOW:
        if pn == 0:
            tl.store(AL + b * R * D + rr[:, None] * D + rd[None, :], (at.to(tl.float32) * alpha).to(dt),
                     mask=mr[:, None] & md[None, :])
        if pd == 0:
            tl.store(BL + b * N * R + rn[:, None] * R + rr[None, :], (bt.to(tl.float32) * alpha).to(dt),
                     mask=mn[:, None] & mr[None, :])
    acc = tl.dot(bt.to(dt), at.to(dt))
    w = tl.load(W + rn[:, None] * D + rd[None, :], mask=mn[:, None] & md[None, :], other=0.0).to(tl.float32)
    tl.store(E + b * N * D + rn[:, None] * D + rd[None, :], (w + alpha * acc).to(dt), mask=mn[:, None] & md[None, :])


def _select(t: Tensor, adapter_index: Optional[Tensor], rows: int) -> Tensor:
    """The adapter of every batch row: rows 0..B-1, or adapter_index clamped to [0, n) (as the kernels clamp)."""
    if adapter_index is None:
        return t[:rows]
    return t.index_select(0, adapter_index.clamp(0, t.shape[0] - 1))


def effective_weight_ref(W: Tensor, A: Tensor, Bm: Tensor, alpha: float, adapter_index: Optional[Tensor],
                         rows: int) -> Tensor:
    """Torch reference of E, (rows, N, d) in W.dtype: W + α·B·A per row (baddbmm on the expanded W)."""
    dt = W.dtype
    A_, B_ = _select(A, adapter_index, rows), _select(Bm, adapter_index, rows)
    return torch.baddbmm(W.unsqueeze(0).expand(rows, -1, -1), B_.to(dt), A_.to(dt), alpha=alpha)


# The GPU tile of ``_effective_kernel`` (r padded to a power of two >= 16 for tl.dot, at most 128: the op's rank
# limit); ``EFFECTIVE_CONFIGS`` are the candidates ``bench.bench_effective_weight`` times. 64 x 128 x 4 warps by
# measurement (H100, bench/results/effective-weight-h100.md, rows 64, d 512, r 96): 0.0417 vs 0.0539 ms at N 512 and
# 0.0263 vs 0.0324 ms at N 256 against 128 x 128 x 8 warps, the fastest of the 7 at both; in the records' step
# (profile-ttt-h100.md measurement 10) the kernel's 33 launches 1.25 -> 0.98 ms
EFFECTIVE_CONFIG = dict(BN=64, BD=128, num_warps=4)
EFFECTIVE_CONFIGS = [dict(BN=128, BD=128, num_warps=8), dict(BN=64, BD=128, num_warps=4),
                     dict(BN=64, BD=128, num_warps=8), dict(BN=128, BD=64, num_warps=4), dict(BN=64, BD=64, num_warps=4),
                     dict(BN=32, BD=128, num_warps=4), dict(BN=128, BD=256, num_warps=8)]


def effective_weight(W: Tensor, A: Tensor, Bm: Tensor, alpha: float, adapter_index: Optional[Tensor],
                     rows: int, config: Optional[dict] = None, low: Optional[Tuple[Tensor, Tensor]] = None) -> Tensor:
    """E = W + α·B[a]·A[a] per batch row, (rows, N, d) in W.dtype. W (N, d) dense; A (n, r, d); Bm (n, N, r).
    ``config``: the GPU tile (BN, BD, num_warps; default ``EFFECTIVE_CONFIG``). ``low``: contiguous (rows, r, d) and
    (rows, N, r) tensors of W.dtype that also receive W.dtype(α·A[a]) and W.dtype(α·B[a]) (``_scaled_copy``'s
    values: the backward's operands, written by the same launch)."""
    if low is not None:   # the kernel writes them through raw pointers: their layout is checked, not assumed
        shapes = ((rows, A.shape[1], W.shape[1]), (rows, W.shape[0], A.shape[1]))
        for name, t, shape in zip(("low[0]", "low[1]"), low, shapes):
            check_tensor(t, name, dtype=W.dtype, ndim=3, device=W.device, contiguous=True, op="effective_weight")
            check(tuple(t.shape) == shape, lambda: f"effective_weight: {name} must be {shape}, got {tuple(t.shape)}")
    if not use_triton(W):
        if low is not None:
            low[0].copy_(_scaled_copy(_select(A, adapter_index, rows), alpha, W.dtype))
            low[1].copy_(_scaled_copy(_select(Bm, adapter_index, rows), alpha, W.dtype))
        return effective_weight_ref(W, A, Bm, alpha, adapter_index, rows)
    N, D = W.shape
    r = A.shape[1]
    E = _utils.empty((rows, N, D), W.dtype, W.device)
    cfg = dict(config) if config else dict(EFFECTIVE_CONFIG) if W.is_cuda else dict(BN=32, BD=32, num_warps=4)
    BN, BD = cfg["BN"], cfg["BD"]
    grid = (triton.cdiv(N, BN), triton.cdiv(D, BD), rows)
    idx = adapter_index if adapter_index is not None else E
    AL, BL = low if low is not None else (E, E)
    _effective_kernel[grid](W.contiguous(), A.contiguous(), Bm.contiguous(), idx, E, AL, BL, N, D, r, A.shape[0],
                            float(alpha), HAS_IDX=adapter_index is not None, BN=BN, BD=BD,
                            RP=max(16, triton.next_power_of_2(r)), LOW=low is not None, num_warps=cfg["num_warps"])
    return E


def _row_grads(Gt: Tensor, A: Tensor, Bm: Tensor, alpha: float, adapter_index: Optional[Tensor], rows: int,
               dA_out: Optional[Tensor] = None, dB_out: Optional[Tensor] = None,
               low: Optional[Tuple[Tensor, Tensor]] = None) -> Tuple[Tensor, Tensor]:
    """Per-row adapter gradients from Gt = ∂L/∂E (rows, N, d) in the activation dtype: dA = α·B[a]ᵀ·Gt (rows, r, d)
    and dB = α·Gt·A[a]ᵀ (rows, N, r), fp32, before any reduction over rows that share an adapter. ``low``: the
    (α·A[a], α·B[a]) copies in Gt's dtype when the forward made them (``effective_weight(low=...)``)."""
    dt = Gt.dtype
    # alpha is folded into the x.dtype copies of B (for dA) and A (for dB): no scaling pass over the fp32 grads
    if low is not None:
        Al, Bl = low
    else:
        Bl = _scaled_copy(_select(Bm, adapter_index, rows), alpha, dt)
        Al = _scaled_copy(_select(A, adapter_index, rows), alpha, dt)
    return _mm32(Bl.transpose(1, 2), Gt, dA_out), _mm32(Gt, Al.transpose(1, 2), dB_out)


def _scaled_copy(t: Tensor, alpha: float, dt: torch.dtype) -> Tensor:
    """dt(alpha * t) in one pass (the product in t's dtype, rounded once to dt, as (t * alpha).to(dt) rounds it): the
    scale and the cast had been two passes over the adapters, 0.43 ms per records' step on an H100 for the scale
    alone (profile-ttt-h100.md measurement 3)."""
    if alpha == 1.0:
        return t.to(dt)
    return torch.mul(t, alpha, out=torch.empty(t.shape, dtype=dt, device=t.device))


def add_rows(dst: Tensor, adapter_index: Tensor, src: Tensor) -> Tensor:
    """dst[a] += src[b] for every row b with a = adapter_index[b] clamped to [0, n) as the kernels clamp: per-row
    gradients summed into the adapters they came from (rows sharing an adapter add up). dst (n, ...) and src
    (rows, ...) of one dtype and device, adapter_index (rows,) int64 / int32. Returns dst."""
    op = "add_rows"
    check_tensor(src, "src", dtype=dst.dtype, ndim=dst.dim(), device=dst.device, op=op)
    check_tensor(adapter_index, "adapter_index", dtype=(torch.int64, torch.int32), ndim=1, device=dst.device, op=op)
    check(adapter_index.shape[0] == src.shape[0] and src.shape[1:] == dst.shape[1:],
          lambda: f"{op}: src must be (rows, {', '.join(map(str, dst.shape[1:]))}) with rows = adapter_index's "
                  f"{adapter_index.shape[0]}, got {tuple(src.shape)}")
    return dst.index_add_(0, adapter_index.clamp(0, dst.shape[0] - 1), src)


# rows come from the tensors (adapter_index's length, else every adapter), not an int argument: under torch.compile
# a row count passed as an int would specialize the graph on it
def _rows_of(A: Tensor, adapter_index: Optional[Tensor]) -> int:
    return A.shape[0] if adapter_index is None else adapter_index.shape[0]


@torch.library.custom_op("pgolf::merged_weight", mutates_args=())
def _merged_op(W: Tensor, A: Tensor, Bm: Tensor, alpha: float, adapter_index: Optional[Tensor]) -> Tensor:
    return effective_weight(W, A, Bm, alpha, adapter_index, _rows_of(A, adapter_index))


@_merged_op.register_fake
def _merged_fake(W, A, Bm, alpha, adapter_index):
    return W.new_empty((_rows_of(A, adapter_index),) + tuple(W.shape))


def _merged_setup(ctx, inputs, output):
    W, A, Bm, alpha, adapter_index = inputs
    ctx.alpha, ctx.has_idx = alpha, adapter_index is not None
    ctx.save_for_backward(A, Bm, adapter_index)


def _merged_backward(ctx, gE):
    A, Bm, idx = ctx.saved_tensors
    idx = idx if ctx.has_idx else None
    dA_r, dB_r = _row_grads(gE.contiguous(), A, Bm, ctx.alpha, idx, gE.shape[0])
    if idx is None:  # row b is adapter b
        grads = [g.to(p.dtype) for p, g in ((A, dA_r), (Bm, dB_r))]
    else:  # rows that share an adapter add up (as index_select's own backward does); adapters of no row get 0
        grads = [add_rows(torch.zeros(p.shape, dtype=torch.float32, device=p.device), idx, g).to(p.dtype)
                 for p, g in ((A, dA_r), (Bm, dB_r))]
    dW = gE.sum(0) if ctx.needs_input_grad[0] else None
    return dW, grads[0], grads[1], None, None


_merged_op.register_autograd(_merged_backward, setup_context=_merged_setup)


def merged_weight(W: Tensor, A: Tensor, Bm: Tensor, alpha: float, adapter_index: Optional[Tensor] = None) -> Tensor:
    """``effective_weight`` (E = W + α·B[a]·A[a] per batch row, one Triton launch reading A and B as stored) with
    gradients to A and B (and W): dA[a] += α·B[a]ᵀ·∂L/∂E[b], dB[a] += α·∂L/∂E[b]·A[a]ᵀ, dW = Σ_b ∂L/∂E[b]. A custom
    op, so torch.compile traces it (the TTT engine's fused MLP merges its up / down adapters through it).
    W (N, d) bf16 / fp16 / fp32; A (n, r, d), Bm (n, N, r) float; adapter_index None (n rows, row b uses adapter b)
    or (rows,) int64 / int32, clamped to [0, n) as the kernels clamp. Returns (rows, N, d) in W's dtype."""
    op = "merged_weight"
    fl = (torch.float16, torch.bfloat16, torch.float32)
    check_tensor(W, "W", dtype=fl, ndim=2, op=op)
    check_tensor(A, "A", dtype=fl, ndim=3, device=W.device, op=op)
    check_tensor(Bm, "Bm", dtype=fl, ndim=3, device=W.device, op=op)
    N, d = W.shape
    check(A.shape[2] == d and Bm.shape[1] == N and Bm.shape[0] == A.shape[0] and Bm.shape[2] == A.shape[1],
          lambda: f"{op}: A must be (n, r, d = {d}) and Bm (n, N = {N}, r) with the same n and r, got A "
                  f"{tuple(A.shape)}, Bm {tuple(Bm.shape)}")
    check(isinstance(alpha, (int, float)) and -float("inf") < alpha < float("inf"),
          lambda: f"{op}: alpha must be a finite float, got {alpha!r}", TypeError)
    if adapter_index is not None:
        check_tensor(adapter_index, "adapter_index", dtype=(torch.int64, torch.int32), ndim=1, device=W.device, op=op)
    return _merged_op(W, A, Bm, float(alpha), adapter_index)


def _mm32(a: Tensor, b: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """bmm with an fp32 result: cuBLAS accumulates in fp32 and stores fp32 (no rounding to the input dtype)."""
    if a.is_cuda and a.dtype in (torch.float16, torch.bfloat16):
        return torch.bmm(a, b, out_dtype=torch.float32, out=out) if out is not None \
            else torch.bmm(a, b, out_dtype=torch.float32)
    r = torch.bmm(a.float(), b.float())
    return out.copy_(r) if out is not None else r


def low_copies(x: Tensor, Ws: List[Tensor], As: List[Tensor]) -> List[Tensor]:
    """Empty (B, r_i, d) and (B, N_i, r_i) tensors of x.dtype per adapter, flat [AL_0, BL_0, AL_1, ...]: where
    ``forward(low=...)`` writes α·A and α·B for the backward."""
    B, d = x.shape[0], x.shape[2]
    out = []
    for W, A in zip(Ws, As):
        out += [_utils.empty((B, A.shape[1], d), x.dtype, x.device),
                _utils.empty((B, W.shape[0], A.shape[1]), x.dtype, x.device)]
    return out


def _qkv_ws_from_env() -> bool:
    """PGOLF_QKV_WS: "1" = the merged forward's products x · E_iᵀ (the q / k / v slices) in one launch of the
    warp-specialized Gluon kernel where it runs (``linear_act_ws.rows_fits``); unset or "0" = one cuBLAS bmm per
    slice."""
    return env_choice("PGOLF_QKV_WS", {"0": "one bmm per slice", "1": "one Gluon launch for every slice"}) == "1"


# Off by measurement. Why it was tried: in the records' step on an H100 (bench/results/profile-ttt-h100.md, measurement
# 13) the k and v bmm (N 256, 22 launches) ran at ~440 TFLOP/s and q's (N 512, 11) at ~575: 3.03 ms for 1.51 TFLOP,
# against ~607 TFLOP/s for the same Gluon design in sum_products_ws. Measured (measurement 16, H100): the Triton group
# +3.09 ms, cuBLAS -3.01 ms, the step 83.19 -> 83.43 GPU-ms; its GPU tests and the eval with it pass
QKV_WS: bool = _qkv_ws_from_env()


# The backward's α·A and α·B copies in x.dtype come from the effective-weight launch, which loads both anyway: in the
# records' step on an H200 (profile-ttt-h200.md, measurement 10) 66 separate scaled copies (aten::mul with a bf16
# output) had taken 0.54 ms
def forward(x: Tensor, Ws: List[Tensor], As: List[Tensor], Bs: List[Tensor], alpha: float,
            adapter_index: Optional[Tensor], low: Optional[List[Tensor]] = None) -> Tuple[List[Tensor], List[Tensor]]:
    """(y_i = x · E_iᵀ as contiguous (B, T, N_i) tensors of x.dtype, the E_i (B, N_i, d) for the backward): one bmm
    per slice, or with ``QKV_WS`` (``PGOLF_QKV_WS=1``) one ``linear_act_ws.linear_rows_ws`` launch for all of them
    where it runs. Ws dense (N_i, d) of x.dtype. ``low``: ``low_copies``'s tensors, filled with α·A_i and α·B_i per row."""
    rows = x.shape[0]
    Es = [effective_weight(W, A, Bm, alpha, adapter_index, rows,
                           low=None if low is None else (low[2 * i], low[2 * i + 1]))
          for i, (W, A, Bm) in enumerate(zip(Ws, As, Bs))]
    if QKV_WS and x.is_cuda:
        from .linear_act_ws import linear_rows_ws, rows_fits

        if rows_fits(x, Es):
            return linear_rows_ws(x, Es, validate=False), Es
    return [torch.bmm(x, E.transpose(1, 2)) for E in Es], Es


@triton.jit
def _acc_product(acc, x_desc, w_desc, b, om, on, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                 PRECISION: tl.constexpr):
    """acc += x[b, om:om+BM, :K] · w[b, :K, on:on+BN] (TMA zero-fills past K, T and N)."""
    for kk in range(tl.cdiv(K, BK)):
        a = x_desc.load([b, om, kk * BK]).reshape(BM, BK)
        w = w_desc.load([b, kk * BK, on]).reshape(BK, BN)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
    return acc


# B and T only bound the tile loop (the descriptors carry the addresses): no compile per row or window count
@triton.jit(do_not_specialize=["B", "T"])
def _sum_products_kernel(y_desc, x0_desc, w0_desc, x1_desc, w1_desc, x2_desc, w2_desc, x3_desc, w3_desc, B, T, N,
                         K0, K1, K2, K3, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, NSRC: tl.constexpr,
                         NUM_PROGS: tl.constexpr, PRECISION: tl.constexpr):
    """y[b] = Σ_{i < NSRC} x_i[b] · w_i[b] over persistent (b, m, n) tiles, n fastest, one fp32 accumulator per
    tile and one rounding at the store."""
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(T, BM)
    tiles_n = tl.cdiv(N, BN)
    total = B * tiles_m * tiles_n
    for t in tl.range(pid, total, NUM_PROGS, flatten=True):
        b = t // (tiles_m * tiles_n)
        rem = t % (tiles_m * tiles_n)
        om = (rem // tiles_n) * BM
        on = (rem % tiles_n) * BN
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        acc = _acc_product(acc, x0_desc, w0_desc, b, om, on, K0, BM, BN, BK, PRECISION)
        if NSRC > 1:
            acc = _acc_product(acc, x1_desc, w1_desc, b, om, on, K1, BM, BN, BK, PRECISION)
        if NSRC > 2:
            acc = _acc_product(acc, x2_desc, w2_desc, b, om, on, K2, BM, BN, BK, PRECISION)
        if NSRC > 3:
            acc = _acc_product(acc, x3_desc, w3_desc, b, om, on, K3, BM, BN, BK, PRECISION)
        y_desc.store([b, om, on], acc.to(y_desc.dtype).reshape(1, BM, BN))


# 16-bit GPU tile: linear_act's 128 x 256 x 64 (8 warps, 3 stages); the loops of the sources run one after the other,
# so their stages share one shared-memory allocation (214,016 B with 3 sources, sm90_check). fp32 ("ieee" dots, for
# references): 64 x 64 x 32 x 4 warps, the largest without register spills (64 x 128: 12-40 B). Four sources: the
# q / k / v slices and an adapter's shrink gradient du · A (``lora.multi_lora_linear``'s ``shrinks``)
SUM_CONFIG = dict(BM=128, BN=256, BK=64, num_warps=8, num_stages=3)
SUM_CONFIG_FP32 = dict(BM=64, BN=64, BK=32, num_warps=4, num_stages=3)
MAX_SOURCES = 4


def _dx_kernel_from_env() -> bool:
    """PGOLF_MERGED_DX: unset or "kernel" = the merged backward's dx through ``sum_products``; "cublas" = one bmm
    and a ``baddbmm_`` per further slice."""
    return env_choice("PGOLF_MERGED_DX", {"kernel": "sum_products", "cublas": "bmm + baddbmm_"}) == "kernel"


# On by default: on an H100 the kernel passes the GPU lane at the records' shapes and takes 0.274 ms against 0.428 ms
# for bmm + baddbmm_ at B64 T2048 (1.57x, bench/results/merged-dx-h100.md); the records' TTT step's GPU time drops
# from 88.93 to 87.72 ms (bench/results/profile-ttt-h100.md).
DX_KERNEL: bool = _dx_kernel_from_env()


def _sum_ws_from_env() -> bool:
    """PGOLF_SUM_WS: unset or "1" = ``sum_products`` on the warp-specialized Gluon kernel where it runs
    (``linear_act_ws.sum_fits``: 16-bit, sm_90, K_i and N multiples of 8); "0" = the Triton kernel."""
    return env_choice("PGOLF_SUM_WS", {"1": "the warp-specialized Gluon kernel", "0": "the Triton kernel"}) == "1"


# On by default: in the records' step on an H100 (bench/results/profile-ttt-h100.md, measurements 15 and 16) its 12
# launches took 2.724 against 3.383 ms (~607 against ~489 TFLOP/s) and the step's GPU time fell 82.30 -> 81.56 and
# 83.19 -> 82.60 ms on two machines; its GPU tests against fp64 and the eval with it (eager and under CUDA graphs,
# tests/test_fused_residual.py, BPB within 1e-4 of the unfused eval) pass there
SUM_WS: bool = _sum_ws_from_env()


def sum_products_ref(xs: List[Tensor], ws: List[Tensor]) -> Tensor:
    """Torch reference of ``sum_products``: bmm, then ``baddbmm_`` per further source (each rounded to the dtype)."""
    y = torch.bmm(xs[0], ws[0])
    for x, w in zip(xs[1:], ws[1:]):
        y.baddbmm_(x, w)
    return y


def _kernel_fits(xs: List[Tensor], ws: List[Tensor]) -> bool:
    """The Triton kernel's domain: 1..MAX_SOURCES sources, contiguous, 16-byte rows (TMA), Hopper or the interpreter."""
    x0 = xs[0]
    if not use_triton(x0) or not 1 <= len(xs) <= MAX_SOURCES:
        return False
    item = x0.element_size()
    if not all(t.is_contiguous() and t.shape[-1] * item % 16 == 0 for t in list(xs) + list(ws)):
        return False
    return not x0.is_cuda or torch.cuda.get_device_capability(x0.device)[0] >= 9


def sum_products(xs: List[Tensor], ws: List[Tensor], config: Optional[dict] = None, *, validate: bool = True) -> Tensor:
    """y[b] = Σ_i xs[i][b] · ws[i][b] for xs[i] (B, T, K_i) and ws[i] (B, K_i, N) of one dtype: the merged
    backward's dx = Σ_i dy_i · E_i over the q / k / v slices in one kernel (fp32 accumulation across every source,
    one rounding), against one bmm and an accumulating ``baddbmm_`` per further source, each of which reads and
    writes the whole (B, T, N) output again: in the records' TTT step (H100, bench/results/profile-ttt-h100.md,
    measurement 7) the k and v ``baddbmm_`` (K 256) took 3.17 ms per step for 756 GFLOP (238 TFLOP/s) against 1.29
    ms for q's bmm (K 512, 756 GFLOP). The merged backward calls it while ``DX_KERNEL`` is on (the default;
    ``PGOLF_MERGED_DX=cublas`` turns it off). Outside the kernel's domain (``_kernel_fits``: more than 4 sources, rows not
    16-byte multiples, a GPU before Hopper, a CPU without the interpreter) the reference runs. With ``SUM_WS``
    (the default; ``PGOLF_SUM_WS=0`` turns it off) and no ``config``, ``linear_act_ws.sum_products_ws`` runs where it fits. ``validate=False``
    skips the argument checks (the merged backward, whose dy_i and E_i match by construction)."""
    op = "sum_products"
    check(len(xs) == len(ws) and len(xs) > 0, lambda: f"{op}: xs and ws must be non-empty lists of one length, got "
                                                      f"{len(xs)} and {len(ws)}")
    x0 = xs[0]
    Bsz, T = x0.shape[0], x0.shape[1]
    N = ws[0].shape[-1]
    for i, (x, w) in enumerate(zip(xs, ws) if validate else ()):
        check_tensor(x, f"xs[{i}]", dtype=x0.dtype, ndim=3, device=x0.device, op=op)
        check_tensor(w, f"ws[{i}]", dtype=x0.dtype, ndim=3, device=x0.device, op=op)
        check(x.shape[:2] == x0.shape[:2] and w.shape == (Bsz, x.shape[2], N),
              lambda: f"{op}: xs[{i}] must be (B = {Bsz}, T = {T}, K_i) and ws[{i}] (B, K_i, N = {N}), got "
                      f"{tuple(x.shape)} and {tuple(w.shape)}")
    if SUM_WS and x0.is_cuda and config is None:
        from .linear_act_ws import sum_fits, sum_products_ws

        if sum_fits(xs, ws):
            return sum_products_ws(xs, ws, validate=False)
    if not _kernel_fits(xs, ws):
        return sum_products_ref(xs, ws)
    from triton.tools.tensor_descriptor import TensorDescriptor

    from .linear_act import _num_programs

    if config is not None:
        cfg = dict(config)
    elif x0.is_cuda:
        cfg = dict(SUM_CONFIG_FP32 if x0.dtype == torch.float32 else SUM_CONFIG)
    else:  # the interpreter: small tiles, the tests' tails
        cfg = dict(BM=16, BN=16, BK=16, num_warps=4, num_stages=1)
    BM, BN, BK = cfg["BM"], cfg["BN"], cfg["BK"]
    y = _utils.empty((Bsz, T, N), x0.dtype, x0.device)
    descs, ks = [], []
    for x, w in zip(xs, ws):
        K = x.shape[2]
        descs += [TensorDescriptor(x, [Bsz, T, K], [T * K, K, 1], [1, BM, BK]),
                  TensorDescriptor(w, [Bsz, K, N], [K * N, N, 1], [1, BK, BN])]
        ks.append(K)
    n = len(xs)
    descs += descs[:2] * (MAX_SOURCES - n)        # unused slots (NSRC masks them out at compile time)
    ks += [0] * (MAX_SOURCES - n)
    stride, grid = _num_programs(x0.device, Bsz * triton.cdiv(T, BM) * triton.cdiv(N, BN))
    _sum_products_kernel[(grid,)](TensorDescriptor(y, [Bsz, T, N], [T * N, N, 1], [1, BM, BN]), *descs, Bsz, T, N,
                                  *ks, BM=BM, BN=BN, BK=BK, NSRC=n, NUM_PROGS=stride,
                                  PRECISION="ieee" if x0.dtype == torch.float32 else "tf32",
                                  num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return y


def backward(x: Tensor, dys: List[Tensor], Es: List[Tensor], As: List[Tensor], Bs: List[Tensor], alpha: float,
             adapter_index: Optional[Tensor], need_dx: bool, dA_out: List[Optional[Tensor]],
             dB_out: List[Optional[Tensor]], dus: List[Tensor] = (), Ss: List[Tensor] = (),
             low: Optional[List[Tensor]] = None) -> Tuple[Optional[Tensor], List[Tensor], List[Tensor]]:
    """(dx or None, per-row dA_i (B, r, d) fp32, per-row dB_i (B, N_i, r) fp32): the gradients of each batch row's
    own adapter, before any reduction over rows that share one; written into dA_out[i] / dB_out[i] where given
    (contiguous (B, ...) fp32 views), else into new tensors. ``dus`` / ``Ss``: shrink-only adapters' output gradients
    (B, T, r_j) and per-row weights (B, r_j, d), whose du_j · S_j join dx's sum. ``low``: the forward's α·A_i and
    α·B_i copies (``low_copies``' order), else made here."""
    rows = x.shape[0]
    dx: Optional[Tensor] = None
    dAs, dBs = [], []
    if need_dx:
        srcs, wts = list(dys) + list(dus), list(Es) + list(Ss)
        dx = sum_products(srcs, wts, validate=False) if DX_KERNEL else sum_products_ref(srcs, wts)
    for i, (E, A, Bm, dy) in enumerate(zip(Es, As, Bs, dys)):
        Gt = torch.bmm(dy.transpose(1, 2), x)                         # (B, N, d) in x.dtype
        dA, dB = _row_grads(Gt, A, Bm, alpha, adapter_index, rows, dA_out[i], dB_out[i],
                            None if not low else (low[2 * i], low[2 * i + 1]))
        dAs.append(dA)                                                 # (B, r, d)
        dBs.append(dB)                                                 # (B, N, r)
    return dx, dAs, dBs
