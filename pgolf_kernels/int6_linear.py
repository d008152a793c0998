"""Fused int-k dequant-matmul straight from the artifact's codes.

Math (W = q * s[:, None], q int8 codes (N, K), s fp16 (N,), x (..., K), y (..., N)):

    forward   y[m, n]  = s[n] * sum_k x[m, k] * q[n, k]  (+ bias[n])
    backward  dx[m, k] = sum_n dy[m, n] * bf16(q[n, k] * s[n])      (dtype of dy)
              dbias[n] = sum_m dy[m, n];   no gradient for q (integer codes) or scale (frozen).

Forward kernel: the scale is per output column of y, so it factors out of the K reduction. The
code tile is converted int8 -> activation dtype in registers (exact: |q| <= 128 fits the 8-bit
mantissa of bf16), multiplied against x with fp32 accumulation, and scaled once in the epilogue.
It is therefore *more* exact than the reference ``F.linear(x, bf16(q*s))``, whose weight carries a
bf16 rounding (relative 2^-9) that the kernel never makes; the difference between the two is
that rounding, measured in tests/test_int6_linear.py.

dx kernel: the scale is per row of the reduction, so it cannot be factored out; the code tile is
scaled in registers, ``bf16(float(q) * float(s))`` -- bitwise the reference's dequantized weight --
so dx equals ``dy @ bf16(q*s)`` up to fp32 accumulation order.

Both kernels have a "swap-AB" variant (SWAP=1) that computes the transposed tile, with the
converted weight tile as the first MMA operand: for small M the token dimension then sits on the
narrow side of the MMA (Hopper's wgmma needs 64 rows on the first operand, but only 8 columns),
and the first operand may come from registers, so the converted weights need no shared-memory
round trip. Autotuning (keyed on an M bucket, N, K and dtypes) picks SWAP and the tile per shape
from a short list pruned per M bucket.

Large-M dispatch: from ``large_m`` rows on (default ``LARGE_M`` = 1024, see pgolf_kernels/_dequant.py)
both ops dequantize W once per call, bf16(q*s) -- the values the dx kernel forms and the reference
uses -- and call cuBLAS on it; the codes stay the only stored copy. The public ``int6_linear`` takes
that path as plain aten ops (``_large_m_linear``), which torch.compile inlines; the custom ops keep the
same branch for direct ``torch.ops.pgolf`` callers. Measurements and the reasoning behind these choices:
docs/int6_linear.md.

Split-K configs use a cached counter buffer per device: do not run two split launches of the same
kernel concurrently on different streams.

Dispatch (``pgolf_kernels._utils.use_triton``): CUDA -> Triton; CPU -> ``int6_linear_ref``;
CPU + TRITON_INTERPRET=1 -> the Triton kernels in the interpreter with a fixed small config.
Same kernels for bits 5/6/7/8: the bit width only matters to ``validate=True``.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
import triton
import triton.language as tl

from . import _utils
from ._dequant import DEFAULT_LARGE_M, dequant, dequant_aten
from ._utils import (M_BUCKETS, cdiv, check_linear_input, check_tensor, dot_precision, interpret_mode, m_bucket,
                     output_tile, rows_2d, tuner_bench, use_triton)
from .quant import QTensor, check_bits, quantize_rows, validate_codes

__all__ = [
    "int6_linear",
    "int6_linear_dx",
    "int6_linear_ref",
    "int6_linear_dx_ref",
    "dequantize_weight",
    "Int6Linear",
    "convert_linears_to_int6",
]

_ACT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

# Default of ``large_m=`` for ``int6_linear`` / ``Int6Linear`` (read at call time): rows from which the
# ops dequantize once and call cuBLAS; the reason for 1024 is in pgolf_kernels/_dequant.py.
LARGE_M = DEFAULT_LARGE_M


# ---------------------------------------------------------------------------------------------
# references
# ---------------------------------------------------------------------------------------------
def int6_linear_ref(x, q, scale, bias=None) -> torch.Tensor:
    """``F.linear(x, (q.float() * scale.float()[:, None]).to(x.dtype), bias)``."""
    w = (q.float() * scale.float()[:, None]).to(x.dtype)
    return F.linear(x, w, bias)


def int6_linear_dx_ref(dy, q, scale) -> torch.Tensor:
    """``dy @ (q.float() * scale.float()[:, None]).to(dy.dtype)``: dx of ``int6_linear_ref``."""
    w = (q.float() * scale.float()[:, None]).to(dy.dtype)
    return dy @ w


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------
@triton.jit
def _split_range(red, BR: tl.constexpr, SPLIT: tl.constexpr):
    """This program's split (grid axis 1) of a length-``red`` reduction cut in SPLIT: the offsets arange(0, BR) and
    the [lo, hi) it owns, whole BR blocks (the last splits may get fewer or none)."""
    rr = tl.arange(0, BR)
    per = tl.cdiv(tl.cdiv(red, BR), SPLIT) * BR
    lo = tl.program_id(1) * per
    return rr, lo, tl.minimum(red, lo + per)


@triton.jit
def _acc_tile(R: tl.constexpr, C: tl.constexpr, SWAP: tl.constexpr):
    """fp32 zeros for an (R, C) output tile; the swap-AB variant accumulates it transposed, (C, R)."""
    if SWAP:
        acc = tl.zeros((C, R), dtype=tl.float32)
    else:
        acc = tl.zeros((R, C), dtype=tl.float32)
    return acc


@triton.jit
def _out_cols(v, SWAP: tl.constexpr):
    """A vector over the output columns, broadcast along the accumulator's column axis (its rows under SWAP)."""
    if SWAP:
        v2 = v[:, None]
    else:
        v2 = v[None, :]
    return v2


@triton.jit
def _split_reduce(acc, ws_ptr, cnt_ptr, tile_id, pid_s, SPLIT: tl.constexpr):
    """Split-K across programs: every split stores its fp32 partial tile to the workspace and
    bumps the tile's counter; the program that arrives last sums the SPLIT partials (in split
    order, so the result does not depend on arrival order) and returns (True, sum). The counter
    is reset by that program, so the zero-initialised counter buffer is reusable without a memset.
    The tile is acc's shape (transposed under SWAP).
    """
    R: tl.constexpr = acc.shape[0]
    C: tl.constexpr = acc.shape[1]
    rr = tl.arange(0, R)
    cc = tl.arange(0, C)
    offs = rr[:, None] * C + cc[None, :]
    base = ws_ptr + tile_id.to(tl.int64) * (SPLIT * R * C)
    tl.store(base + pid_s * (R * C) + offs, acc)
    tl.debug_barrier()  # all threads' partial stores precede the release below
    old = tl.atomic_add(cnt_ptr + tile_id, 1, sem="acq_rel", scope="gpu")
    last = old == SPLIT - 1
    total = tl.zeros((R, C), dtype=tl.float32)
    if last:
        for i in range(SPLIT):
            # .cg: read from L2, where the other SMs' partials are, not from this SM's L1
            total += tl.load(base + i * (R * C) + offs, cache_modifier=".cg")
        tl.atomic_xchg(cnt_ptr + tile_id, 0)
    return last, total


@triton.jit
def _store_out(ptr, acc, rm, ro, M, n_out, stride, SWAP: tl.constexpr):
    """The (BM, BO) tile [rm, ro] of an (M, n_out) output with row stride ``stride``, cast to its dtype;
    under SWAP ``acc`` holds the tile transposed."""
    if SWAP:
        ptrs = ptr + rm[None, :] * stride + ro[:, None]
        tl.store(ptrs, acc.to(ptr.dtype.element_ty), mask=(rm[None, :] < M) & (ro[:, None] < n_out))
    else:
        ptrs = ptr + rm[:, None] * stride + ro[None, :]
        tl.store(ptrs, acc.to(ptr.dtype.element_ty), mask=(rm[:, None] < M) & (ro[None, :] < n_out))


@triton.jit(do_not_specialize=["M_BUCKET", "CFG_MASK"])
def _fwd_kernel(
    x_ptr, q_ptr, s_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr,
    M, N, K, stride_xm, stride_qn, stride_ym,
    M_BUCKET, CFG_MASK,  # autotune key only (see _allowed)
    HAS_BIAS: tl.constexpr, PREC: tl.constexpr, SWAP: tl.constexpr, SPLIT: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, EVEN_K: tl.constexpr,
):
    pid = tl.program_id(0)
    # n fastest: the whole code matrix (<= 4 MB for the 8192x512 head) stays L2-resident
    rm, rn, rm_l, rn_l = output_tile(pid, M, N, BM, BN)
    rk, k_lo, k_hi = _split_range(K, BK, SPLIT)  # split index: program_id(1)
    x_ptrs = x_ptr + rm_l[:, None] * stride_xm + (k_lo + rk)[None, :]
    q_ptrs = q_ptr + rn_l[:, None] * stride_qn + (k_lo + rk)[None, :]
    acc = _acc_tile(BM, BN, SWAP)
    for k0 in range(k_lo, k_hi, BK):
        # loads written out, not through _utils.load_tile: inlined in this loop, the call's debug-scope labels
        # made ptxas schedule some configs differently (sm_90 SASS of SWAP=1 SPLIT=8 BM=64: same 1656 instructions,
        # other registers and order; scripts/kernel_sass.py compiles every config)
        if EVEN_K:
            xt = tl.load(x_ptrs)
            qt = tl.load(q_ptrs)
        else:
            km = (rk[None, :] + k0) < K
            xt = tl.load(x_ptrs, mask=km, other=0.0)
            qt = tl.load(q_ptrs, mask=km, other=0)
        w = qt.to(xt.dtype)  # exact for |q| <= 256 in bf16/fp16/fp32
        if SWAP:
            acc = tl.dot(w, tl.trans(xt), acc, input_precision=PREC)
        else:
            acc = tl.dot(xt, tl.trans(w), acc, input_precision=PREC)
        x_ptrs += BK
        q_ptrs += BK
    do_store = True
    if SPLIT > 1:
        do_store, acc = _split_reduce(acc, ws_ptr, cnt_ptr, pid, tl.program_id(1), SPLIT)
    if do_store:
        acc = acc * _out_cols(tl.load(s_ptr + rn_l).to(tl.float32), SWAP)
        if HAS_BIAS:
            acc += _out_cols(tl.load(b_ptr + rn_l).to(tl.float32), SWAP)
        _store_out(y_ptr, acc, rm, rn, M, N, stride_ym, SWAP)


@triton.jit(do_not_specialize=["M_BUCKET", "CFG_MASK"])
def _dx_kernel(
    dy_ptr, q_ptr, s_ptr, dx_ptr, ws_ptr, cnt_ptr,
    M, N, K, stride_dym, stride_qn, stride_dxm,
    M_BUCKET, CFG_MASK,  # autotune key only (see _allowed)
    PREC: tl.constexpr, SWAP: tl.constexpr, SPLIT: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, EVEN_N: tl.constexpr,
):
    # dx (M, K) = dy (M, N) @ Wd (N, K); BM tokens, BK output columns (over K), BN reduction (over N)
    pid = tl.program_id(0)
    rm, rk, rm_l, rk_l = output_tile(pid, M, K, BM, BK)
    rn, n_lo, n_hi = _split_range(N, BN, SPLIT)  # split index: program_id(1)
    dy_ptrs = dy_ptr + rm_l[:, None] * stride_dym + (n_lo + rn)[None, :]
    q_ptrs = q_ptr + (n_lo + rn)[:, None].to(tl.int64) * stride_qn + rk_l[None, :]
    s_ptrs = s_ptr + n_lo + rn
    acc = _acc_tile(BM, BK, SWAP)
    for n0 in range(n_lo, n_hi, BN):
        if EVEN_N:  # written out for the reason given in _fwd_kernel
            dyt = tl.load(dy_ptrs)
            qt = tl.load(q_ptrs)
            s = tl.load(s_ptrs).to(tl.float32)
        else:
            nm = (rn + n0) < N
            dyt = tl.load(dy_ptrs, mask=nm[None, :], other=0.0)
            qt = tl.load(q_ptrs, mask=nm[:, None], other=0)
            s = tl.load(s_ptrs, mask=nm, other=0.0).to(tl.float32)
        # bf16(q * s) exactly as the reference dequantizes (q*s is exact in fp32: 8 + 11 bits).
        # int8 -> fp32 without conversion instructions: u = q + 128 in [0, 255] (flip the sign
        # bit of the byte), then the fp32 whose bits are 0x4B000000 | u is 2^23 + u exactly, so
        # subtracting 2^23 + 128 gives q. The plain cast cost two CVTs per code (s8->s16->f32);
        # on H200 dx ran at 0.5x cuBLAS with the 16/clk/SM conversion pipe as the limiter.
        u = (qt.to(tl.uint8, bitcast=True).to(tl.uint32) ^ 0x80) | 0x4B000000
        qf = u.to(tl.float32, bitcast=True) - 8388736.0
        w = (qf * s[:, None]).to(dyt.dtype)
        if SWAP:
            acc = tl.dot(tl.trans(w), tl.trans(dyt), acc, input_precision=PREC)
        else:
            acc = tl.dot(dyt, w, acc, input_precision=PREC)
        dy_ptrs += BN
        q_ptrs += BN * stride_qn
        s_ptrs += BN
    do_store = True
    if SPLIT > 1:
        do_store, acc = _split_reduce(acc, ws_ptr, cnt_ptr, pid, tl.program_id(1), SPLIT)
    if do_store:
        _store_out(dx_ptr, acc, rm, rk, M, K, stride_dxm, SWAP)


_fwd_heur = triton.heuristics({"EVEN_K": lambda a: a["K"] % a["BK"] == 0})(_fwd_kernel)
_dx_heur = triton.heuristics({"EVEN_N": lambda a: a["N"] % a["BN"] == 0})(_dx_kernel)

# Tuples (SWAP, BM, T_out, T_red, SPLIT, num_warps, num_stages): BM tiles the tokens, T_out the
# output dim (fwd: BN over N; dx: BK over K), T_red the reduction (fwd: BK over K; dx: BN over N),
# SPLIT splits the reduction across programs (see _fwd_cfg_dict/_dx_cfg_dict). Kept short: every config
# is a compile (~1 s each on an H200) and each autotune key benchmarks only its bucket's
# 2-4 candidates. Split-K exists for small M: fwd with N=512, K=2048 has only 8 output tiles of
# 64 rows, and dx of the 8192x512 head reduces over 8192 rows into 8 tiles, so one program per
# tile would stream 128-512 KB alone; SPLIT=8 spreads that over 8x more SMs.
_CONFIGS = [
    (1, 16, 64, 128, 1, 4, 4),    # 0  M <= 16
    (1, 16, 64, 128, 8, 4, 3),    # 1  M <= 16, split-K 8
    (1, 32, 64, 128, 1, 4, 4),    # 2
    (1, 64, 64, 128, 1, 4, 4),    # 3
    (1, 64, 64, 128, 4, 4, 3),    # 4  split-K 4
    (1, 64, 128, 128, 1, 4, 3),   # 5
    (0, 128, 128, 64, 1, 4, 4),   # 6  classic tile, 2 CTAs/SM (96-106 KB smem)
    (1, 128, 128, 64, 1, 4, 4),   # 7
    (0, 128, 256, 64, 1, 8, 3),   # 8  big tiles for large M
    (0, 256, 128, 64, 1, 8, 3),   # 9  (was a SWAP 256x128 8-warp tile: on H200 it returned ~2x the
                                  #     rounding error on some M >= 16384 cases, so it is gone)
    (1, 16, 64, 256, 1, 4, 2),    # 10 M <= 64, half the loop trips (latency-bound regime)
    (0, 128, 128, 64, 4, 4, 3),   # 11 M ~ 1024 with a long reduction (dx of the 8192-row head)
]
# candidate configs per M bucket (keys: _utils.M_BUCKETS)
_BUCKETS = dict(zip(M_BUCKETS, ([0, 1, 3, 10], [2, 3, 4, 10], [3, 4, 5, 7], [5, 6, 7, 11], [6, 7, 8, 9, 11], [6, 7, 8, 9])))
_SMS = 132  # H100/H200 SXM; split-K only pays when the un-split grid leaves SMs idle


def _fwd_cfg_dict(c) -> Dict[str, int]:
    return {"SWAP": c[0], "BM": c[1], "BN": c[2], "BK": c[3], "SPLIT": c[4]}


def _dx_cfg_dict(c) -> Dict[str, int]:
    return {"SWAP": c[0], "BM": c[1], "BK": c[2], "BN": c[3], "SPLIT": c[4]}


def _allowed(M: int, n_out: int, red: int):
    """Indices of the configs tried for this shape: the M bucket's list, minus split-K configs
    when the un-split grid already has >= 132 tiles (the split only adds workspace traffic then).

    No minimum reduction length per split: on H200 dx of N=1536 (12 trips of 128 rows) at M=1
    took 6.3 us with SPLIT=8 and 15.8 us once splits with < 2 trips each were pruned, and even
    N=512 (4 trips, half the splits empty) was faster split: 5.0 vs 6.5 us. (``red``, the
    reduction length, is therefore unused; it stays in the signature for the call sites.)"""
    out = []
    for i in _BUCKETS[m_bucket(M)]:
        c = _CONFIGS[i]
        if c[4] > 1 and cdiv(M, c[1]) * cdiv(n_out, c[2]) >= _SMS:
            continue
        out.append(i)
    return out


def _cfg_mask(ok) -> int:
    return sum(1 << i for i in ok)


def _prune(configs, named_args, **kwargs):
    # The candidate set travels in the autotune key (CFG_MASK), so a config tuned for one M is
    # only reused for an M with the same candidate set, whose split workspace was sized for it.
    mask = named_args["CFG_MASK"]
    return [c for i, c in enumerate(configs) if (mask >> i) & 1]



def _mk_configs(to_dict):
    return [triton.Config(to_dict(c), num_warps=c[5], num_stages=c[6]) for c in _CONFIGS]


_fwd_tuned = triton.autotune(
    configs=_mk_configs(_fwd_cfg_dict), key=["M_BUCKET", "CFG_MASK", "N", "K"],
    prune_configs_by={"early_config_prune": _prune}, do_bench=tuner_bench, cache_results=True,
)(_fwd_heur)
_dx_tuned = triton.autotune(
    configs=_mk_configs(_dx_cfg_dict), key=["M_BUCKET", "CFG_MASK", "N", "K"],
    prune_configs_by={"early_config_prune": _prune}, do_bench=tuner_bench, cache_results=True,
)(_dx_heur)
# per kernel: (autotuned, fixed-config launcher, config tuple -> meta, meta name of the output dim's tile)
_KERNELS = {"fwd": (_fwd_tuned, _fwd_heur, _fwd_cfg_dict, "BN"), "dx": (_dx_tuned, _dx_heur, _dx_cfg_dict, "BK")}

# Interpreter default: small tiles keep the CPU lane fast; tests pass others explicitly, or set
# _INTERP_AUTOTUNE to drive the real autotuner (with a stub timer) through the interpreter.
_INTERP_CFG = (1, 16, 32, 32, 1, 4, 1)
_INTERP_AUTOTUNE = False

# Split-K counters: one int32 per output tile, zero between launches (the last split of a tile
# resets it). Kept per (device, kernel) so the buffer is allocated once, before any CUDA-graph
# capture that replays it. Split configs run only while the un-split grid has < 132 tiles.
_COUNTERS: Dict[tuple, torch.Tensor] = {}
_MAX_SPLIT_TILES = 1 << 13


def _counters(device, which: str, tiles: int) -> torch.Tensor:
    key = (str(device), which)
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < tiles:
        buf = torch.zeros(max(tiles, _MAX_SPLIT_TILES), dtype=torch.int32, device=device)
        _COUNTERS[key] = buf
    return buf


def _split_workspace(M, n_out, device, which, cands):
    """fp32 workspace + counters big enough for every split config in ``cands`` (the forced
    config, or the autotuner's candidate set). Non-split launches get 1-element dummies."""
    ws_elems, tiles = 1, 1
    for c in cands:
        if c[4] > 1:
            t = cdiv(M, c[1]) * cdiv(n_out, c[2])  # c[2] tiles the output: N (fwd) or K (dx)
            ws_elems = max(ws_elems, t * c[4] * c[1] * c[2])
            tiles = max(tiles, t)
    ws = torch.empty(ws_elems, dtype=torch.float32, device=device)
    return ws, _counters(device, which, tiles)



def _launch(which, a2, n_out, red, pointers, sizes, kw, config):
    """One launch of the ``which`` ("fwd" / "dx") kernel for the (M, red) activations a2 and an (M, n_out)
    output: the autotuned kernel over the M bucket's candidates, or ``config`` (a _CONFIGS tuple; on CPU under
    the interpreter ``_INTERP_CFG`` unless given). The split-K workspace and counters are sized here."""
    tuned, heur, cfg_dict, out_tile = _KERNELS[which]
    M = a2.shape[0]
    if config is None and interpret_mode() and not a2.is_cuda and not _INTERP_AUTOTUNE:
        config = _INTERP_CFG
    ok = _allowed(M, n_out, red)
    cands = [_CONFIGS[i] for i in ok] if config is None else [config]
    ws, cnt = _split_workspace(M, n_out, a2.device, which, cands)
    args = (*pointers, ws, cnt, *sizes, m_bucket(M), _cfg_mask(ok))

    def grid(meta):
        return (cdiv(M, meta["BM"]) * cdiv(n_out, meta[out_tile]), meta["SPLIT"])

    if config is None:
        tuned[grid](*args, **kw)
    else:
        d = cfg_dict(config)
        heur[grid(d)](*args, **kw, **d, num_warps=config[5], num_stages=config[6])


def _launch_fwd(x2, q, scale, bias, out, config=None):
    """y (M, N) = x2 (M, K) @ (q*s)^T (+ bias) into ``out``. ``config``: a _CONFIGS tuple or None."""
    M, K = x2.shape
    N = q.shape[0]
    _launch("fwd", x2, N, K, (x2, q, scale, bias if bias is not None else scale, out),
            (M, N, K, x2.stride(0), q.stride(0), out.stride(0)),
            dict(HAS_BIAS=bias is not None, PREC=dot_precision(x2.dtype)), config)
    return out


def _launch_dx(dy2, q, scale, out, config=None):
    """dx (M, K) = dy2 (M, N) @ bf16(q*s) into ``out``."""
    M, N = dy2.shape
    K = q.shape[1]
    _launch("dx", dy2, K, N, (dy2, q, scale, out), (M, N, K, dy2.stride(0), q.stride(0), out.stride(0)),
            dict(PREC=dot_precision(dy2.dtype)), config)
    return out


# ---------------------------------------------------------------------------------------------
# large-M path: one-pass dequantization + cuBLAS
# ---------------------------------------------------------------------------------------------
def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """(N, K) ``dtype`` tensor ``dtype(float(q) * float(scale)[:, None])`` (one Triton pass on CUDA /
    under TRITON_INTERPRET=1; torch ops otherwise): bitwise the reference's dequantized weight.

    q: int8 (N, K) contiguous codes; scale: fp16 (N,); dtype: bf16 / fp16 / fp32."""
    op = "dequantize_weight"
    _check_weight(q, scale, op, q.device)
    if dtype not in _ACT_DTYPES:
        raise TypeError(f"{op}: dtype must be bfloat16, float16 or float32, got {dtype}")
    return dequant(q, scale, dtype)


def _use_large_m(M: int, t: torch.Tensor, large_m: int) -> bool:
    return M >= large_m and use_triton(t)


def _large_m_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """The large-M path of ``int6_linear`` as plain aten ops: ``x2 @ bf16(q*s)^T (+ bias)``.

    Same values as the custom op's large-M branch (the weight is ``dtype(float(q) * float(s))``, the
    GEMM is torch.mm / addmm on the same operands), but traceable: under torch.compile inductor fuses
    the dequantization into one elementwise kernel and calls the GEMM from its generated code, and
    autograd forms dx = dy @ W with the same W. Why: on the H100 the eval's TTT step through the
    custom ops kept the GPU as busy as the bf16 reference (51.6 vs 52.3 ms) but took 62.8 vs 57.9 ms,
    with 26.8 vs 8.1 ms of host time not hidden behind the GPU (bench/results/profile-ttt-h100.md);
    one int6_linear fwd+bwd costs ~205 us more Python than F.linear's on a CPU host (custom-op
    dispatch), and a step makes 44 of them. Autocast is off inside, as in the custom op: the GEMM
    runs in x's dtype whatever the caller's autocast state."""
    N, K = q.shape
    with torch.autocast(x.device.type, enabled=False):
        w = dequant_aten(q, scale, x.dtype)
        x2 = x.reshape(-1, K)
        y = torch.mm(x2, w.t()) if bias is None else torch.addmm(bias, x2, w.t())
    return y.reshape(*x.shape[:-1], N)


# ---------------------------------------------------------------------------------------------
# argument checks
# ---------------------------------------------------------------------------------------------
def _check_weight(q, scale, op, device):
    check_tensor(q, "q", dtype=torch.int8, ndim=2, device=device, op=op)
    if not q.is_contiguous():
        raise ValueError(f"{op}: q must be contiguous (row-major int8 codes), got strides {q.stride()}; call .contiguous()")
    check_tensor(scale, "scale", dtype=torch.float16, ndim=1, device=device, op=op)
    if scale.shape[0] != q.shape[0]:
        raise ValueError(f"{op}: scale must have shape ({q.shape[0]},) = (q.shape[0],), got {tuple(scale.shape)}")
    if scale.stride(0) != 1:
        raise ValueError(f"{op}: scale must be contiguous, got stride {scale.stride()}")


def _check_fwd(x, q, scale, bias, op="int6_linear"):
    check_tensor(x, "x", dtype=_ACT_DTYPES, op=op)
    _check_weight(q, scale, op, x.device)
    check_linear_input(x, bias, "q", q.shape[0], q.shape[1], op)


def _check_dx(dy, q, scale, op="int6_linear_dx"):
    check_tensor(dy, "dy", dtype=_ACT_DTYPES, op=op)
    if dy.dim() < 1:
        raise ValueError(f"{op}: dy must have at least 1 dimension (..., N)")
    _check_weight(q, scale, op, dy.device)
    if dy.shape[-1] != q.shape[0]:
        raise ValueError(f"{op}: dy's last dim must equal N = q.shape[0] = {q.shape[0]}, got dy of shape {tuple(dy.shape)}")



# ---------------------------------------------------------------------------------------------
# custom ops
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("pgolf::int6_linear", mutates_args=())
def _int6_linear_op(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor],
                    large_m: int = DEFAULT_LARGE_M) -> torch.Tensor:
    _check_fwd(x, q, scale, bias)
    N, K = q.shape
    x2 = rows_2d(x, K)
    out = _utils.empty((x2.shape[0], N), x.dtype, x.device)
    if x2.shape[0] > 0:
        if _use_large_m(x2.shape[0], x2, large_m):
            w = dequant(q, scale, x.dtype)
            if bias is None:
                torch.mm(x2, w.t(), out=out)
            else:
                torch.addmm(bias, x2, w.t(), out=out)
        elif use_triton(x2):
            _launch_fwd(x2, q, scale, bias, out)
        else:
            out.copy_(int6_linear_ref(x2, q, scale, bias))
    return out.reshape(*x.shape[:-1], N)


@_int6_linear_op.register_fake
def _(x, q, scale, bias, large_m=DEFAULT_LARGE_M):
    return x.new_empty((*x.shape[:-1], q.shape[0]))


@torch.library.custom_op("pgolf::int6_linear_dx", mutates_args=())
def _int6_linear_dx_op(dy: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                       large_m: int = DEFAULT_LARGE_M) -> torch.Tensor:
    _check_dx(dy, q, scale)
    N, K = q.shape
    dy2 = rows_2d(dy, N)
    out = _utils.empty((dy2.shape[0], K), dy.dtype, dy.device)
    if dy2.shape[0] > 0:
        if _use_large_m(dy2.shape[0], dy2, large_m):
            torch.mm(dy2, dequant(q, scale, dy.dtype), out=out)
        elif use_triton(dy2):
            _launch_dx(dy2, q, scale, out)
        else:
            out.copy_(int6_linear_dx_ref(dy2, q, scale))
    return out.reshape(*dy.shape[:-1], K)


@_int6_linear_dx_op.register_fake
def _(dy, q, scale, large_m=DEFAULT_LARGE_M):
    return dy.new_empty((*dy.shape[:-1], q.shape[1]))


def _setup_context(ctx, inputs, output):
    x, q, scale, bias, large_m = inputs
    ctx.save_for_backward(q, scale)
    ctx.has_bias = bias is not None
    ctx.large_m = large_m


def _backward(ctx, dy):
    q, scale = ctx.saved_tensors
    dx = _int6_linear_dx_op(dy, q, scale, ctx.large_m) if ctx.needs_input_grad[0] else None
    dbias = None
    if ctx.has_bias and ctx.needs_input_grad[3]:
        dbias = dy.reshape(-1, dy.shape[-1]).sum(0)
    return dx, None, None, dbias, None


_int6_linear_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# public functions
# ---------------------------------------------------------------------------------------------

def _resolve_large_m(large_m: Optional[int], op: str) -> int:
    if large_m is None:
        return LARGE_M
    if not isinstance(large_m, int) or isinstance(large_m, bool) or large_m < 1:
        raise ValueError(f"{op}: large_m must be a positive int (rows from which W is dequantized once and "
                         f"cuBLAS runs), got {large_m!r}")
    return large_m


def int6_linear(x, q, scale, bias=None, bits: int = 6, validate: bool = False,
                large_m: Optional[int] = None) -> torch.Tensor:
    """``y = x @ (q * scale[:, None])^T (+ bias)`` from int8 codes, without a bf16 copy of W.

    x: (..., K) bf16/fp16/fp32; q: int8 (N, K) contiguous codes; scale: fp16 (N,); bias: (N,) in
    x's dtype or None. Returns (..., N) in x's dtype. Differentiable in x (dx = dy @ bf16(q*s), its
    own kernel) and bias (sum of dy); q and scale are frozen (a scale that requires grad is an
    error; int8 q cannot require grad). ``validate=True`` also checks that the codes lie in
    ``quant.code_range(bits)`` (one reduction over q: a debug call, off by default).
    ``large_m``: from this many rows of x on (fwd) / of dy (dx), W is dequantized once and cuBLAS
    runs the GEMM; default ``LARGE_M`` = 1024 (see pgolf_kernels/_dequant.py for why).
    """
    op = "int6_linear"
    check_bits(bits, op)
    _check_fwd(x, q, scale, bias, op)
    if q.requires_grad:  # unreachable for int8 today; kept so a future float-code path stays frozen
        raise ValueError(f"{op}: q (integer codes) cannot receive a gradient; pass q.detach()")
    if scale.requires_grad:
        raise ValueError(f"{op}: scale is a frozen quantization parameter and gets no gradient; pass scale.detach()")
    if validate:
        validate_codes(q, bits, name="q", op=op)
    large_m = _resolve_large_m(large_m, op)
    if _use_large_m(x.numel() // max(q.shape[1], 1), x, large_m):
        return _large_m_linear(x, q, scale, bias)
    return _int6_linear_op(x, q, scale, bias, large_m)


def int6_linear_dx(dy, q, scale, large_m: Optional[int] = None) -> torch.Tensor:
    """``dx = dy @ bf16(q * scale[:, None])``: dy (..., N) -> dx (..., K) in dy's dtype."""
    _check_dx(dy, q, scale)
    return _int6_linear_dx_op(dy, q, scale, _resolve_large_m(large_m, "int6_linear_dx"))


# ---------------------------------------------------------------------------------------------
# module
# ---------------------------------------------------------------------------------------------
class Int6Linear(nn.Module):
    """Linear layer with frozen int-k codes: ``y = int6_linear(x, q, scale, bias)``.

    Buffers ``q`` (int8, (out, in)) and ``scale`` (fp16, (out,)) are saved in the state_dict;
    ``bias`` (optional) is an ordinary parameter, cast to x's dtype in forward.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, bits: int = 6, device=None):
        super().__init__()
        check_bits(bits, "Int6Linear")
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.bits = bits
        self.register_buffer("q", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.zeros(out_features, dtype=torch.float16, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device))
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_codes(cls, q: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor] = None, bits: int = 6) -> "Int6Linear":
        _check_weight(q, scale, "Int6Linear.from_codes", q.device)
        validate_codes(q, bits, name="q", op="Int6Linear.from_codes")
        m = cls(q.shape[1], q.shape[0], bias=bias is not None, bits=bits, device=q.device)
        m.q.copy_(q)
        m.scale.copy_(scale)
        if bias is not None:
            m.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
        return m

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int = 6, clip: str = "search") -> "Int6Linear":
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"Int6Linear.from_linear: expected nn.Linear, got {type(linear).__name__}")
        qt = quantize_rows(linear.weight.detach(), bits=bits, clip=clip)
        return cls.from_codes(qt.q, qt.scale, linear.bias, bits=bits)

    @classmethod
    def from_qtensor(cls, qt: QTensor, bias: Optional[torch.Tensor] = None) -> "Int6Linear":
        return cls.from_codes(qt.q, qt.scale, bias, bits=qt.bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.bias
        if b is not None and b.dtype != x.dtype:
            b = b.to(x.dtype)
        return int6_linear(x, self.q, self.scale, b, self.bits)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, bits={self.bits}"


def convert_linears_to_int6(model: nn.Module, filter=None, bits: int = 6, clip: str = "search") -> nn.Module:
    """Replace (in place) every ``nn.Linear`` (subclasses included) for which ``filter(name, module)``
    is true (default: all) with ``Int6Linear.from_linear``; other modules are left untouched.
    Returns ``model``."""
    check_bits(bits, "convert_linears_to_int6")
    targets = []
    for name, mod in model.named_modules():
        for cname, child in mod.named_children():
            full = f"{name}.{cname}" if name else cname
            if isinstance(child, nn.Linear) and (filter is None or filter(full, child)):
                targets.append((mod, cname, child))
    for parent, cname, child in targets:
        setattr(parent, cname, Int6Linear.from_linear(child, bits=bits, clip=clip))
    return model
