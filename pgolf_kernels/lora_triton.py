"""Triton kernels behind ``pgolf_kernels.lora.multi_lora_linear`` (math and design: see that module's docstring).

Up to ``MAX_SLICES`` slices go into one launch: the slice's pointers/sizes are separate kernel arguments and each
slice's tile body is inlined behind a branch on the program's tile index (forward) or a compile-time unrolled loop
(backward), so Q and V of one layer are one forward launch and one backward launch.
"""
from __future__ import annotations

import itertools
from typing import List, NamedTuple, Optional

import torch
import triton
import triton.language as tl

from . import _utils
from ._utils import cdiv, dot_precision, interpret_mode

MAX_SLICES = 4

# Tuning hooks (bench/bench_lora.py sweeps them): keys BT/BN/BK (forward), BT/BN/BD/BK (backward), num_warps,
# num_stages, and for the backward PPS = target programs per SM when splitting T (non-deterministic mode).
FWD_OVERRIDE: dict = {}
BWD_OVERRIDE: dict = {}


def _rpad(r: int) -> int:
    # tl.dot needs every tile dim a power of two and >= 16; ranks 1..128 pad to 16..128, masked.
    return max(16, triton.next_power_of_2(r))


# ----------------------------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _fwd_tile(X, Y, W, S, A, Bm, b, a, L, t0, nt, T, D, N, R, alpha,
              HAS_SCALE: tl.constexpr, BT: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, RP: tl.constexpr,
              IP: tl.constexpr):
    offs_t = t0 + tl.arange(0, BT)
    offs_n = nt * BN + tl.arange(0, BN)
    offs_r = tl.arange(0, RP)
    offs_k = tl.arange(0, BK)
    tmask = offs_t < T
    nmask = offs_n < N
    rmask = offs_r < R
    rows = b.to(tl.int64) * T + offs_t                       # int64: B*T*N_i can pass 2^31 for an LM-head slice
    arow = a.to(tl.int64) * R + offs_r
    dt = X.dtype.element_ty
    acc = tl.zeros((BT, BN), dtype=tl.float32)
    u = tl.zeros((BT, RP), dtype=tl.float32)
    for k0 in range(0, D, BK):
        kk = k0 + offs_k
        kmask = kk < D
        xb = tl.load(X + rows[:, None] * D + kk[None, :], mask=tmask[:, None] & kmask[None, :], other=0.0)
        wb = tl.load(W + offs_n[:, None].to(tl.int64) * D + kk[None, :], mask=nmask[:, None] & kmask[None, :],
                     other=0).to(dt)                         # int8 codes are exact in fp16/bf16 (|q| <= 128)
        ab = tl.load(A + arow[:, None] * D + kk[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0).to(dt)
        acc = tl.dot(xb, tl.trans(wb), acc, input_precision=IP)
        u = tl.dot(xb, tl.trans(ab), u, input_precision=IP)   # the shrink rides on the same x tile
    if HAS_SCALE:
        s = tl.load(S + offs_n, mask=nmask, other=0.0).to(tl.float32)
        acc = acc * s[None, :]
    u = tl.where((offs_t < L)[:, None], u * alpha, 0.0)      # padded rows: no LoRA delta
    bb = tl.load(Bm + (a.to(tl.int64) * N + offs_n)[:, None] * R + offs_r[None, :],
                 mask=nmask[:, None] & rmask[None, :], other=0.0).to(dt)
    acc = tl.dot(u.to(dt), tl.trans(bb), acc, input_precision=IP)   # the expand, in the epilogue
    tl.store(Y + rows[:, None] * N + offs_n[None, :], acc.to(Y.dtype.element_ty),
             mask=tmask[:, None] & nmask[None, :])


@triton.jit
def _fwd_kernel(X, LEN, IDX,
                Y0, W0, S0, A0, B0, N0, R0,
                Y1, W1, S1, A1, B1, N1, R1,
                Y2, W2, S2, A2, B2, N2, R2,
                Y3, W3, S3, A3, B3, N3, R3,
                C1, C2, C3, T, D, n_adapters, NT, TT, alpha,
                NS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_LEN: tl.constexpr, HAS_IDX: tl.constexpr,
                BT: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, RP: tl.constexpr, IP: tl.constexpr):
    # program -> (b, T-tile, N-tile); N-tiles fastest so the programs sharing an x tile run together (L2 reuse)
    pid = tl.program_id(0)
    nt = pid % NT
    rest = pid // NT
    t0 = (rest % TT) * BT
    b = rest // TT
    if HAS_IDX:
        a = tl.minimum(tl.maximum(tl.load(IDX + b).to(tl.int32), 0), n_adapters - 1)  # clamp: stay in bounds
    else:
        a = b
    if HAS_LEN:
        L = tl.minimum(tl.maximum(tl.load(LEN + b).to(tl.int32), 0), T)
    else:
        L = T
    if nt < C1:
        _fwd_tile(X, Y0, W0, S0, A0, B0, b, a, L, t0, nt, T, D, N0, R0, alpha, HAS_SCALE, BT, BN, BK, RP, IP)
    if NS > 1:
        if (nt >= C1) & (nt < C2):
            _fwd_tile(X, Y1, W1, S1, A1, B1, b, a, L, t0, nt - C1, T, D, N1, R1, alpha, HAS_SCALE, BT, BN, BK, RP, IP)
    if NS > 2:
        if (nt >= C2) & (nt < C3):
            _fwd_tile(X, Y2, W2, S2, A2, B2, b, a, L, t0, nt - C2, T, D, N2, R2, alpha, HAS_SCALE, BT, BN, BK, RP, IP)
    if NS > 3:
        if nt >= C3:
            _fwd_tile(X, Y3, W3, S3, A3, B3, b, a, L, t0, nt - C3, T, D, N3, R3, alpha, HAS_SCALE, BT, BN, BK, RP, IP)


def _fwd_config(T: int, RP: int, dtype: torch.dtype = torch.bfloat16):
    if interpret_mode():
        # small tiles so the CPU tests cross tile and mask boundaries at tiny shapes (overridable: a test runs the
        # GPU tile sizes through the interpreter too)
        return _override(dict(BT=16, BN=32, BK=32), dict(), FWD_OVERRIDE)
    BT = 128 if T > 64 else 64
    # BN=256 measured 1.27x faster than 128 at B64 T1024 r8 and 1.11x at T2048 r96 on H200: half the
    # shrink recomputation and more MMA work per byte of x. 3 stages of (x 16 KB + W 32 KB + A RP*64*2 B) fit in
    # 227 KB of smem up to RP=128, but the u accumulator at RP >= 64 costs registers: 2 stages there.
    # fp32 at RP > 32 (tf32x3 dots, pipelined through shared memory) holds twice the bytes per stage: BN=256 needed
    # 245,760 B at RP=64 and 262,144 B at RP=128 (> 232,448: "out of resource" at the first rank-40 fp32 launch on
    # an H100), BN=128 needs 147,456 / 163,840 B (``sm90_check``)
    BN = 128 if dtype == torch.float32 and RP > LARGE_RANK else 256
    meta, launch = dict(BT=BT, BN=BN, BK=64), dict(num_warps=8, num_stages=3 if RP <= 32 else 2)
    return _override(meta, launch, FWD_OVERRIDE)


def _override(meta, launch, ov):
    meta = dict(meta, **{k: v for k, v in ov.items() if k in meta})
    launch = dict(launch, **{k: v for k, v in ov.items() if k in ("num_warps", "num_stages")})
    return meta, launch


class _Geometry(NamedTuple):
    B: int          # documents
    T: int          # tokens per document
    D: int          # model dim d
    RP: int         # rank padded for tl.dot (``_rpad`` of the largest slice rank)
    meta: dict      # tile sizes (constexpr kernel arguments)
    launch: dict    # num_warps / num_stages
    TT: int         # T tiles


def _geometry(x, As, config) -> Optional[_Geometry]:
    """What both launchers start with, or None for an empty x (nothing to launch)."""
    Bsz, T, D = x.shape
    if Bsz == 0 or T == 0:
        return None
    RP = _rpad(max(A.shape[1] for A in As))
    meta, launch = config(T, RP, x.dtype)
    return _Geometry(Bsz, T, D, RP, meta, launch, cdiv(T, meta["BT"]))


def _slot_args(per_slice: List[list]) -> list:
    """The kernel arguments of the MAX_SLICES slots: slice i's in slot i, the unused slots repeating the last
    slice's (never executed: NS is constexpr)."""
    assert 1 <= len(per_slice) <= MAX_SLICES
    return [a for i in range(MAX_SLICES) for a in per_slice[min(i, len(per_slice) - 1)]]


def lora_fwd(x, ws, scales, As, Bs, alpha: float, lengths, adapter_index, outs: List[torch.Tensor]) -> None:
    """Write y_i into ``outs[i]`` (contiguous (B, T, N_i)) for a group of <= MAX_SLICES slices of one base kind."""
    g = _geometry(x, As, _fwd_config)
    if g is None:
        return
    tiles = [cdiv(w.shape[0], g.meta["BN"]) for w in ws]
    cum = list(itertools.accumulate(tiles))
    NT = cum[-1]
    C = (cum + [NT] * MAX_SLICES)[:MAX_SLICES]
    has_scale = len(scales) > 0
    args = _slot_args([[outs[j], ws[j], scales[j] if has_scale else x, As[j], Bs[j], ws[j].shape[0], As[j].shape[1]]
                       for j in range(len(ws))])
    grid = (g.B * g.TT * NT,)
    _fwd_kernel[grid](x, lengths if lengths is not None else x, adapter_index if adapter_index is not None else x,
                      *args, C[0], C[1], C[2], g.T, g.D, As[0].shape[0], NT, g.TT, float(alpha),
                      NS=len(ws), HAS_SCALE=has_scale, HAS_LEN=lengths is not None, HAS_IDX=adapter_index is not None,
                      RP=g.RP, IP=lora_dot_precision(x.dtype, g.RP), **g.meta, **g.launch)


# ----------------------------------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _bwd_dx_slice(acc, X, DY, W, A, Bm, DA, G, b, a, ga, t0, L, pid_d, T, D, N, R, alpha,
                  BASE: tl.constexpr, G_IN: tl.constexpr, BT: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
                  RP: tl.constexpr, IP: tl.constexpr):
    """dx role, one slice, one T-tile: acc += dy W (if BASE) + alpha m (dy B_a) A_a[:, d-tile]; dA += alpha g^T x.
    G_IN: the scaled, masked shrink gradient alpha m g comes from G ((B*T, R), x.dtype, written by the G pass) instead
    of being recomputed from dy in this d-tile."""
    offs_t = t0 + tl.arange(0, BT)
    offs_d = pid_d * BD + tl.arange(0, BD)
    offs_r = tl.arange(0, RP)
    tmask = offs_t < T
    valid = offs_t < L                      # L <= T, so valid rows are in range
    dmask = offs_d < D
    rmask = offs_r < R
    rows = b.to(tl.int64) * T + offs_t
    dt = X.dtype.element_ty
    g = tl.zeros((BT, RP), dtype=tl.float32)
    # the main loop is dots only (no branches, no atomics) so it software-pipelines like a plain GEMM K loop
    if BASE or not G_IN:
        for n0 in range(0, N, BN):
            offs_n = n0 + tl.arange(0, BN)
            nmask = offs_n < N
            dyb = tl.load(DY + rows[:, None] * N + offs_n[None, :], mask=tmask[:, None] & nmask[None, :], other=0.0)
            if BASE:
                wb = tl.load(W + offs_n[:, None].to(tl.int64) * D + offs_d[None, :],
                             mask=nmask[:, None] & dmask[None, :], other=0.0)
                acc = tl.dot(dyb, wb.to(dt), acc, input_precision=IP)
            if not G_IN:
                bb = tl.load(Bm + (a.to(tl.int64) * N + offs_n)[:, None] * R + offs_r[None, :],
                             mask=nmask[:, None] & rmask[None, :], other=0.0)
                g = tl.dot(dyb, bb.to(dt), g, input_precision=IP)    # shrink gradient from the same dy tile
    if t0 < L:                                               # whole tile padded -> no adapter work
        if G_IN:   # rows >= L were stored as 0 by the G pass; columns >= R are masked to 0 here
            g_lp = tl.load(G + rows[:, None] * R + offs_r[None, :], mask=tmask[:, None] & rmask[None, :], other=0.0)
        else:
            g_lp = tl.where(valid[:, None], g * alpha, 0.0).to(dt)
        ab = tl.load(A + (a.to(tl.int64) * R + offs_r)[:, None] * D + offs_d[None, :],
                     mask=rmask[:, None] & dmask[None, :], other=0.0)
        acc = tl.dot(g_lp, ab.to(dt), acc, input_precision=IP)
        xb = tl.load(X + rows[:, None] * D + offs_d[None, :], mask=tmask[:, None] & dmask[None, :], other=0.0)
        dap = tl.dot(tl.trans(g_lp), xb, input_precision=IP)    # (RP, BD) = alpha g^T x
        tl.atomic_add(DA + (ga.to(tl.int64) * R + offs_r)[:, None] * D + offs_d[None, :], dap,
                      mask=rmask[:, None] & dmask[None, :], sem="relaxed")
    return acc


@triton.jit
def _bwd_db_slice(X, DY, A, Bm, DB, G, b, a, ga, t0, L, T, D, N, R, alpha, G_OUT: tl.constexpr,
                  BT: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, RP: tl.constexpr, IP: tl.constexpr):
    """dB role, one slice, one T-tile: u = alpha m x A_a^T (recomputed), dB_a += dy^T u. G_OUT: also the shrink
    gradient g = dy B_a from the same dy tiles, stored as alpha m g in x.dtype into G ((B*T, R)) for the dx pass (the
    value the dx role would form itself)."""
    if t0 < L:
        offs_t = t0 + tl.arange(0, BT)
        offs_r = tl.arange(0, RP)
        offs_k = tl.arange(0, BK)
        tmask = offs_t < T
        rmask = offs_r < R
        rows = b.to(tl.int64) * T + offs_t
        arow = a.to(tl.int64) * R + offs_r
        dt = X.dtype.element_ty
        u = tl.zeros((BT, RP), dtype=tl.float32)
        for k0 in range(0, D, BK):
            kk = k0 + offs_k
            kmask = kk < D
            xb = tl.load(X + rows[:, None] * D + kk[None, :], mask=tmask[:, None] & kmask[None, :], other=0.0)
            ab = tl.load(A + arow[:, None] * D + kk[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
            u = tl.dot(xb, tl.trans(ab.to(dt)), u, input_precision=IP)
        u_lp = tl.where((offs_t < L)[:, None], u * alpha, 0.0).to(dt)
        g = tl.zeros((BT, RP), dtype=tl.float32)
        for n0 in range(0, N, BN):
            offs_n = n0 + tl.arange(0, BN)
            nmask = offs_n < N
            dyb = tl.load(DY + rows[:, None] * N + offs_n[None, :], mask=tmask[:, None] & nmask[None, :], other=0.0)
            dbp = tl.dot(tl.trans(dyb), u_lp, input_precision=IP)   # (BN, RP) = alpha dy^T u
            tl.atomic_add(DB + (ga.to(tl.int64) * N + offs_n)[:, None] * R + offs_r[None, :], dbp,
                          mask=nmask[:, None] & rmask[None, :], sem="relaxed")
            if G_OUT:
                bb = tl.load(Bm + (a.to(tl.int64) * N + offs_n)[:, None] * R + offs_r[None, :],
                             mask=nmask[:, None] & rmask[None, :], other=0.0)
                g = tl.dot(dyb, bb.to(dt), g, input_precision=IP)
        if G_OUT:
            g_lp = tl.where((offs_t < L)[:, None], g * alpha, 0.0).to(dt)
            tl.store(G + rows[:, None] * R + offs_r[None, :], g_lp, mask=tmask[:, None] & rmask[None, :])


@triton.jit
def _bwd_kernel(X, DX, LEN, IDX,
                DY0, W0, A0, B0, DA0, DB0, G0, N0, R0,
                DY1, W1, A1, B1, DA1, DB1, G1, N1, R1,
                DY2, W2, A2, B2, DA2, DB2, G2, N2, R2,
                DY3, W3, A3, B3, DA3, DB3, G3, N3, R3,
                T, D, n_adapters, TT, TSPLIT, DT, alpha,
                NS: tl.constexpr, HAS_LEN: tl.constexpr, HAS_IDX: tl.constexpr, GRAD_IDX: tl.constexpr,
                COMPUTE_DX: tl.constexpr, BASE: tl.constexpr, LOAD_DX: tl.constexpr, PHASE: tl.constexpr,
                BT: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BK: tl.constexpr, RP: tl.constexpr,
                IP: tl.constexpr):
    # program -> (b, T-split, role). PHASE 0 (one launch): roles 0..DT-1 own a d-tile of dx (and dA), role DT owns
    # dB; roles fastest: the DT+1 programs of one document stream the same dy tiles at the same time, so dy comes
    # from HBM once. "G once" (two launches): PHASE 1 has only the dB role, which also stores alpha m g into G;
    # PHASE 2 has only the DT dx roles, which read g from G instead of recomputing it in every d-tile.
    NR = DT + 1 if PHASE == 0 else (1 if PHASE == 1 else DT)
    pid = tl.program_id(0)
    role = pid % NR
    rest = pid // NR
    ts = rest % TSPLIT
    b = rest // TSPLIT
    if HAS_IDX:
        a = tl.minimum(tl.maximum(tl.load(IDX + b).to(tl.int32), 0), n_adapters - 1)
    else:
        a = b
    if GRAD_IDX:
        ga = a        # grads go straight to the adapter's rows (atomics from every row that uses it)
    else:
        ga = b        # per-batch-row grad rows (deterministic mode with adapter_index; reduced afterwards)
    if HAS_LEN:
        L = tl.minimum(tl.maximum(tl.load(LEN + b).to(tl.int32), 0), T)
    else:
        L = T
    per = tl.cdiv(TT, TSPLIT)
    tt_end = tl.minimum(ts * per + per, TT)
    if PHASE == 1:
        role = DT   # the one role of the G pass is the dB role
    if role < DT:
        offs_d = role * BD + tl.arange(0, BD)
        for tt in range(ts * per, tt_end):
            t0 = tt * BT
            offs_t = t0 + tl.arange(0, BT)
            rows = b.to(tl.int64) * T + offs_t
            dx_ptr = DX + rows[:, None] * D + offs_d[None, :]
            dx_mask = (offs_t < T)[:, None] & (offs_d < D)[None, :]
            if LOAD_DX:
                acc = tl.load(dx_ptr, mask=dx_mask, other=0.0).to(tl.float32)   # base part from cuBLAS
            else:
                acc = tl.zeros((BT, BD), dtype=tl.float32)
            acc = _bwd_dx_slice(acc, X, DY0, W0, A0, B0, DA0, G0, b, a, ga, t0, L, role, T, D, N0, R0,
                                alpha, BASE, PHASE == 2, BT, BN, BD, RP, IP)
            if NS > 1:
                acc = _bwd_dx_slice(acc, X, DY1, W1, A1, B1, DA1, G1, b, a, ga, t0, L, role, T, D, N1, R1,
                                    alpha, BASE, PHASE == 2, BT, BN, BD, RP, IP)
            if NS > 2:
                acc = _bwd_dx_slice(acc, X, DY2, W2, A2, B2, DA2, G2, b, a, ga, t0, L, role, T, D, N2, R2,
                                    alpha, BASE, PHASE == 2, BT, BN, BD, RP, IP)
            if NS > 3:
                acc = _bwd_dx_slice(acc, X, DY3, W3, A3, B3, DA3, G3, b, a, ga, t0, L, role, T, D, N3, R3,
                                    alpha, BASE, PHASE == 2, BT, BN, BD, RP, IP)
            if COMPUTE_DX:
                tl.store(dx_ptr, acc.to(DX.dtype.element_ty), mask=dx_mask)
    else:
        for tt in range(ts * per, tt_end):
            t0 = tt * BT
            _bwd_db_slice(X, DY0, A0, B0, DB0, G0, b, a, ga, t0, L, T, D, N0, R0, alpha, PHASE == 1,
                          BT, BN, BK, RP, IP)
            if NS > 1:
                _bwd_db_slice(X, DY1, A1, B1, DB1, G1, b, a, ga, t0, L, T, D, N1, R1, alpha, PHASE == 1,
                              BT, BN, BK, RP, IP)
            if NS > 2:
                _bwd_db_slice(X, DY2, A2, B2, DB2, G2, b, a, ga, t0, L, T, D, N2, R2, alpha, PHASE == 1,
                              BT, BN, BK, RP, IP)
            if NS > 3:
                _bwd_db_slice(X, DY3, A3, B3, DB3, G3, b, a, ga, t0, L, T, D, N3, R3, alpha, PHASE == 1,
                              BT, BN, BK, RP, IP)


# Backward strategy: "fused" (dx = dy W inside the kernel, dy read once for dx, g and dB) or "split" (dx's base part
# dy W by cuBLAS, the kernel adds alpha g A into it and does dA/dB).
# "G once" (either strategy): the shrink gradient g = dy B_a is computed once per T-tile, by the dB programs in a first
# launch (stored as alpha m g, x.dtype, (B*T, r) per slice), and read by the dx programs of a second launch, instead of
# recomputed in each of the d/BD d-tiles. At rank 96 (B64 T2048, d 512, Q512 + V256) g's dots cost 77 of the backward's
# 277 GFLOP where one pass costs 19 (G once: 219; the minimal count is 193, dB still recomputes u), at the price of a
# second read of dy (201 MB) and G written and read (2 x 25 MB).
# Defaults per rank class, chosen by measurement (H200, CUDA-graph timing of fwd+bwd, bench/results/lora-h200.md):
#   rank <= 32: fused, one launch: 0.511 ms at B64 T1024 r8 (G once 0.542, split 0.619, G once + split 0.532);
#   rank  > 32: G once + split: 1.679 ms at B64 T2048 r96 (fused one launch 1.884, G once 1.831, split 2.119).
LARGE_RANK = 32
DEFAULT_BWD_SPLIT = False
DEFAULT_BWD_G_ONCE = False
DEFAULT_BWD_SPLIT_LARGE = True
DEFAULT_BWD_G_ONCE_LARGE = True


def lora_dot_precision(dtype: torch.dtype, RP: int) -> str:
    """``input_precision`` of the LoRA kernels' dots: ``_utils.dot_precision`` (fp32 "ieee"), except fp32 at padded
    rank RP > 32, which takes "tf32x3" (three TF32 tensor-core products, ~fp32 accuracy). Why: "ieee" dots run on
    FMAs with every operand tile in registers, and at RP = 128 the backward spilled 177-319 KB per thread and took
    93 s (G pass) and 612 s (dx pass) to compile for sm_90a, the forward 96 s (``sm90_check``, CPU host); with
    "tf32x3" 16 s, 40 s and 13 s. The fp32 rank-96 eval test ran past a 310 s limit inside that compile (H100)."""
    return "tf32x3" if dtype == torch.float32 and RP > LARGE_RANK else dot_precision(dtype)


def bwd_split(rank: int) -> bool:
    """Whether the backward leaves dx's base part to cuBLAS, for adapters of max rank ``rank``."""
    return bool(BWD_OVERRIDE.get("SPLIT", DEFAULT_BWD_SPLIT_LARGE if rank > LARGE_RANK else DEFAULT_BWD_SPLIT))


def bwd_g_once(rank: int) -> bool:
    """Whether the backward computes the shrink gradient once per T-tile (two launches), for max rank ``rank``."""
    return bool(BWD_OVERRIDE.get("GONCE", DEFAULT_BWD_G_ONCE_LARGE if rank > LARGE_RANK else DEFAULT_BWD_G_ONCE))


def _bwd_config(T: int, RP: int, dtype: torch.dtype = torch.bfloat16):
    if interpret_mode():
        return _override(dict(BT=16, BN=32, BD=32, BK=32), dict(), BWD_OVERRIDE)
    BT = 128 if T > 64 else 64
    # BT=128 with 8 warps measured 1.8x faster than BT=64 with 4 warps on H200 (B64 T1024 r8, measured
    # when dB was computed inside the dx programs' main loop).
    # acc (BT x BD) + g (BT x RP) fp32 in registers: at RP >= 64 halve BN to keep the dy/B tiles small.
    BN = 128 if RP <= 32 else 64
    # the same tiles in fp32: the G-once passes need at most 229,376 B of shared memory there (RP=128, sm90_check)
    return _override(dict(BT=BT, BN=BN, BD=128, BK=64), dict(num_warps=8, num_stages=2), BWD_OVERRIDE)


def _num_sms(dev: torch.device) -> int:
    if dev.type == "cuda":
        return torch.cuda.get_device_properties(dev).multi_processor_count
    return 4   # interpreter: a small "machine" so CPU tests exercise the T-split path


def lora_bwd(x, dys, ws, As, Bs, alpha: float, lengths, adapter_index, dAs, dBs, dx: Optional[torch.Tensor],
             deterministic: bool, grad_by_index: bool, base_in_kernel: bool) -> None:
    """Accumulate alpha-scaled adapter grads into the zeroed fp32 ``dAs``/``dBs`` and write ``dx`` (if not None).

    ``ws`` are dense (N_i, d) weights of x.dtype. With ``base_in_kernel=False`` the caller has already written
    dx = sum_i dy_i W_i into ``dx`` and the kernel adds the LoRA part to it."""
    g = _geometry(x, As, _bwd_config)
    if g is None:
        return
    DT = cdiv(g.D, g.meta["BD"])
    if deterministic:
        tsplit = 1   # each dA/dB element has exactly one writer program, adding in its fixed T order
    else:
        # aim at >= PPS programs per SM: PPS=8 measured 8 % faster than 2 on H200 (B64 T1024 r8, measured when dB
        # was computed inside the dx programs' main loop)
        pps = BWD_OVERRIDE.get("PPS", 8)
        tsplit = max(1, min(g.TT, cdiv(pps * _num_sms(x.device), g.B * (DT + 1))))
    g_once = bwd_g_once(max(A.shape[1] for A in As))
    # "G once": alpha m g of every slice, (B*T, r_i) in x.dtype; rows of wholly padded T-tiles are never written or read
    Gs = [_utils.empty((g.B * g.T, A.shape[1]), x.dtype, x.device) if g_once else x for A in As]
    args = _slot_args([[dys[j], ws[j], As[j], Bs[j], dAs[j], dBs[j], Gs[j], ws[j].shape[0], As[j].shape[1]]
                       for j in range(len(ws))])
    # (phase, roles per (b, T-split)): one launch of DT dx roles + the dB role, or the G pass then the dx pass
    for phase, roles in (((1, 1), (2, DT)) if g_once else ((0, DT + 1),)):
        _bwd_kernel[(g.B * tsplit * roles,)](
            x, dx if dx is not None else x, lengths if lengths is not None else x,
            adapter_index if adapter_index is not None else x,
            *args, g.T, g.D, As[0].shape[0], g.TT, tsplit, DT, float(alpha),
            NS=len(ws), HAS_LEN=lengths is not None, HAS_IDX=adapter_index is not None,
            GRAD_IDX=grad_by_index, COMPUTE_DX=dx is not None, BASE=dx is not None and base_in_kernel,
            LOAD_DX=dx is not None and not base_in_kernel, PHASE=phase, RP=g.RP,
            IP=lora_dot_precision(x.dtype, g.RP), **g.meta, **g.launch)
