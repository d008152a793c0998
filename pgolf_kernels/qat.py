"""int-k quantization-aware training (QAT) fused into the int6 matmul path.

Math (W (N, K) float master weights, x (..., K), b = bits, qmax = 2^(b-1) - 1, 31 for int6):

    s[n]      = fp16( clip[n] / qmax )                          per-row scale from the CURRENT W
    q[n, k]   = round_half_even( clamp(W[n, k] * (1 / s[n]), -qmax, qmax) )    (0 where s[n] = 0)
    fq(W)     = q * s[:, None]
    forward   y  = x @ fq(W)^T (+ bias)      computed as  y[m, n] = s[n] * sum_k x[m, k] q[n, k]
    backward  (straight-through estimator; s is a stop-gradient constant, as in the records' QAT)
              dx = dy @ fq(W)              (fq(W) rounded to dy's dtype once, like int6_linear_dx)
              dW = dy^T x                  (mask_clipped=True: dW = 0 where |W * (1/s)| > qmax)
              dbias = sum_m dy

Row clip (``clip=``), matching the artifact codec (``pgolf_kernels.quant.quantize_rows``, C++):
  * ``"search"`` (default): the codec's own rule -- absmax/qmax and 23 smaller candidates (17
    fractions of absmax, 6 multiples of the row std, the same constants as csrc/codec.cpp), each
    rounded to fp16, keeping the one with the lowest sum of squared reconstruction errors
    (ties keep the earlier, absmax first). The only differences from the codec: fp32 row sums
    (the codec sums in float64) and a two-pass fp32 std (the codec: float64 E[w^2] - E[w]^2), so
    near-ties between two candidates can resolve the other way (tests/test_qat.py measures how
    often on fresh random rows and that the SSE of both picks then agrees to 1e-5 relative).
    With it the weights QAT trains through are, up to those near-ties, the weights the artifact
    will hold for the same W.
  * ``"absmax"``: s = fp16(max|W_row| / qmax) (the codec's ``clip="absmax"``; never clips).
  * a float k > 0: clip = min(k * std(row), max|W_row|) -- one of the codec's candidates only.
Rows with a NaN/Inf weight get s = NaN, so their output columns are NaN (in both paths).

Kernels (Triton; one pre-pass + the two matmuls, nothing else touches W):
  * ``_row_scale_kernel``: one read of W (from L2 after the first candidate) per candidate;
    writes s (N,) fp32 (the fp16-rounded value). W of the 11L d512 model is 26.5 M values, so
    the search costs ~24 reads of 106 MB of L2-resident-per-tile fp32 -- estimated well under
    1 ms per step on an H100 (the row-scale pass alone has not been timed on a GPU yet).
  * ``_qat_fwd_kernel``: loads fp32/bf16 W tiles, forms the codes in registers
    (multiply by 1/s, clamp, round-half-even by the 1.5*2^23 trick as csrc/codec.cpp does), dots
    the exact integer codes (exact in bf16/fp16) against x with fp32 accumulation and applies s in
    the epilogue. As in int6_linear this is *more* exact than the reference F.linear(x,
    bf16(fq(W))), which rounds fq(W) to bf16.
  * ``_qat_dx_kernel``: same in-register quantization, then bf16(q * s) (bitwise the reference's
    weight), dot with dy.
  * dW = dy^T x is one cuBLAS GEMM (torch), plus a fused where() for the optional mask.
No split-K / swap-AB variants: QAT runs at training shapes (M = tokens per micro-batch, >= 4096).

Measured cost (H100, bench/results/qat-h100.md; 11L d512 model, one 16 x 2048 micro-batch fwd+bwd):
compiled, 58.4 ms/step with QAT on this kernel vs 30.7 ms without QAT (+27.6 ms, +90 %); eager,
91.9 ms vs 568.4 ms with the plain-torch STE (``int6_qat_linear_ref``) vs 69.8 ms without QAT. The
compiled plain-torch STE did not finish compiling in 305 s, so how it compares compiled is unknown.
At the driver's default ``--qat-frac 0.15`` the measured cost is about +13 % of the run's step time.

Dispatch as every op of the package: CUDA -> Triton, CPU -> the pure-torch reference math,
CPU + TRITON_INTERPRET=1 -> the kernels in Triton's interpreter. ``int6_qat_linear_ref`` is the
pure-torch STE reference (also what the training driver runs with ``--reference``).
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import _utils
from ._utils import (cdiv, check_linear_input, check_tensor, dot_precision, interpret_mode, load_tile, m_bucket,
                     output_tile, rows_2d, tuner_bench, use_triton)
from .quant import check_bits

__all__ = [
    "int6_qat_linear",
    "int6_qat_linear_ref",
    "qat_row_scale",
    "qat_row_scale_ref",
    "fake_quant_ref",
    "CODEC_FRACTIONS",
    "CODEC_STD_MULTIPLES",
]

# The clip candidates of csrc/codec.cpp (kFractions of absmax, kStdMultiples of the row std).
# Duplicated here on purpose (the kernel needs them as a tensor); tests/test_qat.py checks that the
# "search" rule picks the codec's scale, which would fail if the two lists drifted apart.
CODEC_FRACTIONS = (1.0, 0.985, 0.97, 0.955, 0.94, 0.92, 0.9, 0.88, 0.86,
                   0.83, 0.8, 0.76, 0.72, 0.67, 0.62, 0.56, 0.5)
CODEC_STD_MULTIPLES = (2.5, 3.0, 3.5, 4.0, 5.0, 6.0)

_X_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_W_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MODE_ABSMAX, _MODE_STD, _MODE_SEARCH = 0, 1, 2
_MAGIC = 12582912.0  # 1.5 * 2^23: (v + M) - M rounds |v| < 2^22 to the nearest integer, ties to even


def _qmax(bits: int) -> int:
    return (1 << (bits - 1)) - 1


def _parse_clip(clip, op: str):
    """-> (mode, k)."""
    if isinstance(clip, str):
        if clip == "search":
            return _MODE_SEARCH, 0.0
        if clip == "absmax":
            return _MODE_ABSMAX, 0.0
        raise ValueError(f"{op}: clip must be 'search', 'absmax' or a positive float (std multiple), got {clip!r}")
    if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not clip > 0 or clip != clip or clip == float("inf"):
        raise ValueError(f"{op}: clip must be 'search', 'absmax' or a positive finite float (std multiple), got {clip!r}")
    return _MODE_STD, float(clip)



# ---------------------------------------------------------------------------------------------
# references
# ---------------------------------------------------------------------------------------------
def qat_row_scale_ref(w: torch.Tensor, bits: int = 6, clip: Union[str, float] = "search") -> torch.Tensor:
    """Per-row scale (N,) fp32 holding fp16 values, by the rule in the module docstring (pure torch,
    sequential over the candidates exactly as csrc/codec.cpp). No gradient."""
    op = "qat_row_scale_ref"
    check_bits(bits, op)
    mode, k = _parse_clip(clip, op)
    qmax = float(_qmax(bits))
    w = w.detach().float()
    amax = w.abs().amax(dim=1)
    finite = torch.isfinite(w).all(dim=1)
    best_s = (amax / qmax).half().float()
    if mode != _MODE_ABSMAX:
        sd = w.double().std(dim=1, unbiased=False).float() if w.shape[1] > 0 else torch.zeros_like(amax)
    if mode == _MODE_STD:
        best_s = (torch.minimum(sd * k, amax) / qmax).half().float()
    elif mode == _MODE_SEARCH and w.shape[1] > 0:
        best = _sse_ref(w, best_s, qmax)
        cands = [(amax, f) for f in CODEC_FRACTIONS] + [(sd, m) for m in CODEC_STD_MULTIPLES]
        for base, f in cands:
            clip_v = base * f
            s = (clip_v / qmax).half().float()
            ok = (clip_v > 0) & (clip_v < amax) & (s != 0) & (s != best_s)
            e = _sse_ref(w, s, qmax)
            upd = ok & (e < best)
            best = torch.where(upd, e, best)
            best_s = torch.where(upd, s, best_s)
    return torch.where(finite, best_s, torch.full_like(best_s, float("nan")))


def _codes_ref(w32: torch.Tensor, s: torch.Tensor, qmax: float) -> torch.Tensor:
    inv = torch.where(s > 0, 1.0 / s, torch.zeros_like(s))
    return torch.round((w32 * inv[:, None]).clamp(-qmax, qmax))


def _sse_ref(w32, s, qmax):
    # fp32 errors summed in float64 (the codec: fp32 partials of 256, float64 across them)
    e = w32 - _codes_ref(w32, s, qmax) * s[:, None]
    return (e.double() * e.double()).sum(dim=1)


def fake_quant_ref(w: torch.Tensor, s: torch.Tensor, bits: int = 6) -> torch.Tensor:
    """fq(W) = clamp(round(W * (1/s)), -qmax, qmax) * s in fp32 (exact: |q| <= 127, s fp16-valued);
    rows with s = NaN give NaN."""
    qmax = float(_qmax(bits))
    w32 = w.detach().float()
    fq = _codes_ref(w32, s, qmax) * s[:, None]
    return torch.where(torch.isnan(s)[:, None], torch.full_like(fq, float("nan")), fq)


def int6_qat_linear_ref(x, w, bias=None, bits: int = 6, clip: Union[str, float] = "search",
                        mask_clipped: bool = False) -> torch.Tensor:
    """Pure-torch STE reference: ``F.linear(x, fq(W).to(x.dtype), bias)`` whose gradient w.r.t. W
    is the straight-through ``dy^T x`` (times the in-range mask with ``mask_clipped``).

    The STE is written as ``fq + (w' - w'.detach())`` with ``w' = W`` (or ``W`` masked to the
    in-range elements): its value is exactly fq (w' - w'.detach() is 0 for finite W), its
    derivative is 1 (or the mask), and torch.compile fuses it into one elementwise kernel."""
    op = "int6_qat_linear_ref"
    check_bits(bits, op)
    qmax = float(_qmax(bits))
    s = qat_row_scale_ref(w, bits, clip)
    fq = fake_quant_ref(w, s, bits)
    w32 = w.float()
    if mask_clipped:
        inv = torch.where(s > 0, 1.0 / s, torch.zeros_like(s))
        inside = (w32.detach() * inv[:, None]).abs() <= qmax
        w32 = torch.where(inside, w32, torch.zeros_like(w32))
    w_hat = fq + (w32 - w32.detach())
    return F.linear(x, w_hat.to(x.dtype), bias)


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------
@triton.jit
def _round_even(v):
    return (v + 12582912.0) - 12582912.0


@triton.jit
def _row_block(w_ptr, rn, rmask, k0, K, stride_wn, BK: tl.constexpr):
    """Columns [k0, k0 + BK) of the rows rn of W as fp32 (0 outside), and their mask."""
    rk = k0 + tl.arange(0, BK)
    m = rmask[:, None] & (rk[None, :] < K)
    return tl.load(w_ptr + rn[:, None].to(tl.int64) * stride_wn + rk[None, :], mask=m, other=0.0).to(tl.float32), m


@triton.jit
def _sse_rows(w_ptr, rn, rmask, K, stride_wn, s, QMAX: tl.constexpr, BK: tl.constexpr):
    inv = tl.where(s > 0, tl.math.div_rn(tl.full(s.shape, 1.0, tl.float32), tl.where(s > 0, s, 1.0)), 0.0)
    acc = tl.zeros(s.shape, dtype=tl.float32)
    for k0 in range(0, K, BK):
        w, m = _row_block(w_ptr, rn, rmask, k0, K, stride_wn, BK)
        v = tl.minimum(tl.maximum(w * inv[:, None], -QMAX), QMAX)
        e = w - _round_even(v) * s[:, None]
        acc += tl.sum(e * e, axis=1)
    return acc


@triton.jit
def _row_scale_kernel(w_ptr, s_ptr, cand_ptr, N, K, stride_wn, CLIP_K,
                      QMAX: tl.constexpr, MODE: tl.constexpr, NF: tl.constexpr, NC: tl.constexpr,
                      BR: tl.constexpr, BK: tl.constexpr):
    pid = tl.program_id(0)
    rn = pid * BR + tl.arange(0, BR)
    rmask = rn < N
    amax = tl.zeros((BR,), dtype=tl.float32)
    tot = tl.zeros((BR,), dtype=tl.float32)
    bad = tl.zeros((BR,), dtype=tl.int32)
    for k0 in range(0, K, BK):
        w, m = _row_block(w_ptr, rn, rmask, k0, K, stride_wn, BK)
        aw = tl.abs(w)
        amax = tl.maximum(amax, tl.max(tl.where(aw == aw, aw, 0.0), axis=1))
        tot += tl.sum(w, axis=1)
        bad += tl.sum(((aw != aw) | (aw == float("inf"))).to(tl.int32), axis=1)
    best_s = tl.math.div_rn(amax, tl.full((BR,), QMAX, tl.float32)).to(tl.float16).to(tl.float32)
    if MODE != 0:
        mean = tot / K
        var = tl.zeros((BR,), dtype=tl.float32)
        for k0 in range(0, K, BK):
            w, m = _row_block(w_ptr, rn, rmask, k0, K, stride_wn, BK)
            d = tl.where(m, w - mean[:, None], 0.0)
            var += tl.sum(d * d, axis=1)
        sd = tl.sqrt_rn(var / K)
        if MODE == 1:
            clip = tl.minimum(sd * CLIP_K, amax)
            best_s = tl.math.div_rn(clip, tl.full((BR,), QMAX, tl.float32)).to(tl.float16).to(tl.float32)
        else:
            best = _sse_rows(w_ptr, rn, rmask, K, stride_wn, best_s, QMAX, BK)
            for i in range(NC):
                f = tl.load(cand_ptr + i)
                base = tl.where(i < NF, amax, sd)
                clip = base * f
                s = tl.math.div_rn(clip, tl.full((BR,), QMAX, tl.float32)).to(tl.float16).to(tl.float32)
                ok = (clip > 0) & (clip < amax) & (s != 0) & (s != best_s)
                e = _sse_rows(w_ptr, rn, rmask, K, stride_wn, s, QMAX, BK)
                upd = ok & (e < best)
                best = tl.where(upd, e, best)
                best_s = tl.where(upd, s, best_s)
    best_s = tl.where(bad > 0, float("nan"), best_s)
    tl.store(s_ptr + rn, best_s, mask=rmask)


@triton.jit
def _qat_fwd_kernel(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym, M_BUCKET,
                    QMAX: tl.constexpr, HAS_BIAS: tl.constexpr, PREC: tl.constexpr,
                    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, EVEN_K: tl.constexpr):
    rm, rn, rm_l, rn_l = output_tile(tl.program_id(0), M, N, BM, BN)  # n fastest: W stays L2-resident
    rk = tl.arange(0, BK)
    s = tl.load(s_ptr + rn_l)
    inv = tl.where(s > 0, tl.math.div_rn(tl.full((BN,), 1.0, tl.float32), tl.where(s > 0, s, 1.0)), 0.0)
    x_ptrs = x_ptr + rm_l[:, None].to(tl.int64) * stride_xm + rk[None, :]
    w_ptrs = w_ptr + rn_l[:, None].to(tl.int64) * stride_wn + rk[None, :]
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        km = (rk[None, :] + k0) < K
        xt = load_tile(x_ptrs, km, EVEN_K)
        wt = load_tile(w_ptrs, km, EVEN_K)
        v = tl.minimum(tl.maximum(wt.to(tl.float32) * inv[:, None], -QMAX), QMAX)
        q = _round_even(v).to(xt.dtype)  # integer codes |q| <= 127: exact in bf16/fp16
        acc = tl.dot(xt, tl.trans(q), acc, input_precision=PREC)
        x_ptrs += BK
        w_ptrs += BK
    acc = acc * s[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn_l).to(tl.float32)[None, :]
    y_ptrs = y_ptr + rm[:, None].to(tl.int64) * stride_ym + rn[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def _qat_dx_kernel(dy_ptr, w_ptr, s_ptr, dx_ptr, M, N, K, stride_dym, stride_wn, stride_dxm, M_BUCKET,
                   QMAX: tl.constexpr, PREC: tl.constexpr,
                   BM: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr, EVEN_N: tl.constexpr):
    # dx (M, K) = dy (M, N) @ fq(W) (N, K): BM tokens x BK output columns, reduction over N in BN
    rm, rk, rm_l, rk_l = output_tile(tl.program_id(0), M, K, BM, BK)
    rn = tl.arange(0, BN)
    dy_ptrs = dy_ptr + rm_l[:, None].to(tl.int64) * stride_dym + rn[None, :]
    w_ptrs = w_ptr + rn[:, None].to(tl.int64) * stride_wn + rk_l[None, :]
    s_ptrs = s_ptr + rn
    acc = tl.zeros((BM, BK), dtype=tl.float32)
    for n0 in range(0, N, BN):
        # loads written out, not through _utils.load_tile (as _qat_fwd_kernel does): inlined in this loop, the call's
        # debug-scope labels made ptxas schedule the BM=16 and BM=32 configs differently (sm_90 SASS at BM=32: 1760
        # instead of 1768 instructions, another order; scripts/kernel_sass.py compiles every config)
        if EVEN_N:
            dyt = tl.load(dy_ptrs)
            wt = tl.load(w_ptrs)
            s = tl.load(s_ptrs)
        else:
            nm = (rn + n0) < N
            dyt = tl.load(dy_ptrs, mask=nm[None, :], other=0.0)
            wt = tl.load(w_ptrs, mask=nm[:, None], other=0.0)
            s = tl.load(s_ptrs, mask=nm, other=0.0)
        inv = tl.where(s > 0, tl.math.div_rn(tl.full((BN,), 1.0, tl.float32), tl.where(s > 0, s, 1.0)), 0.0)
        v = tl.minimum(tl.maximum(wt.to(tl.float32) * inv[:, None], -QMAX), QMAX)
        # q * s is exact in fp32 (<= 7 + 11 significant bits); one rounding to dy's dtype, as the
        # reference's fq(W).to(dtype)
        wq = (_round_even(v) * s[:, None]).to(dyt.dtype)
        acc = tl.dot(dyt, wq, acc, input_precision=PREC)
        dy_ptrs += BN
        w_ptrs += BN * stride_wn
        s_ptrs += BN
    dx_ptrs = dx_ptr + rm[:, None].to(tl.int64) * stride_dxm + rk[None, :]
    tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rk[None, :] < K))


# (BM, B_out, B_red, warps, stages): fp32 W tiles are 2x the bytes of bf16 ones, so the stage
# counts are chosen to stay under ~200 KB of shared memory (H100/H200: 227 KB per block).
_CONFIGS = [
    (128, 128, 64, 4, 3),   # 0: x 16 KB + W 32 KB per stage
    (128, 128, 32, 4, 4),   # 1
    (64, 128, 64, 4, 3),    # 2
    (128, 64, 64, 4, 4),    # 3
    (256, 128, 32, 8, 3),   # 4: large M
    (32, 64, 128, 4, 3),    # 5: small M (eval-sized calls)
    (16, 64, 128, 4, 3),    # 6
]
_INTERP_CFG = (16, 32, 32, 4, 1)  # small tiles, so the CPU-lane shapes have tails in M, N and K


def _prune(configs, named_args, **kwargs):
    M = named_args["M_BUCKET"]
    small = [c for c in configs if c.kwargs["BM"] <= 64]
    return small if M <= 64 else [c for c in configs if c.kwargs["BM"] >= 64]



_fwd_heur = triton.heuristics({"EVEN_K": lambda a: a["K"] % a["BK"] == 0})(_qat_fwd_kernel)
_dx_heur = triton.heuristics({"EVEN_N": lambda a: a["N"] % a["BN"] == 0})(_qat_dx_kernel)
_fwd_tuned = triton.autotune(
    configs=[triton.Config({"BM": c[0], "BN": c[1], "BK": c[2]}, num_warps=c[3], num_stages=c[4]) for c in _CONFIGS],
    key=["M_BUCKET", "N", "K"], prune_configs_by={"early_config_prune": _prune}, do_bench=tuner_bench,
    cache_results=True)(_fwd_heur)
_dx_tuned = triton.autotune(
    configs=[triton.Config({"BM": c[0], "BK": c[1], "BN": c[2]}, num_warps=c[3], num_stages=c[4]) for c in _CONFIGS],
    key=["M_BUCKET", "N", "K"], prune_configs_by={"early_config_prune": _prune}, do_bench=tuner_bench,
    cache_results=True)(_dx_heur)

_CANDS = {}


def _cands(device) -> torch.Tensor:
    key = str(device)
    t = _CANDS.get(key)
    if t is None:
        t = torch.tensor(CODEC_FRACTIONS + CODEC_STD_MULTIPLES, dtype=torch.float32, device=device)
        _CANDS[key] = t
    return t



def _launch_row_scale(w, out, bits, mode, k):
    N, K = w.shape
    # rows per program: the candidate loop re-reads each row ~24 times, so tiles stay small
    # enough to hit L1/L2 (BR x BK fp32 = 32 KB at 16 x 512)
    BR = 16
    BK = min(512, max(16, triton.next_power_of_2(max(K, 1))))
    _row_scale_kernel[(cdiv(N, BR),)](w, out, _cands(w.device), N, K, w.stride(0), float(k),
                                      QMAX=_qmax(bits), MODE=mode, NF=len(CODEC_FRACTIONS),
                                      NC=len(CODEC_FRACTIONS) + len(CODEC_STD_MULTIPLES), BR=BR, BK=BK,
                                      num_warps=4)
    return out


def _launch(kernels, names, grid, args, kw, x2, config):
    """One matmul launch: the autotuned kernel, or ``config`` (BM, B_out, B_red, warps, stages) -- on CPU under the
    interpreter ``_INTERP_CFG`` unless given. ``names``: the kernel's meta names of BM, B_out, B_red; ``grid``:
    meta dict -> grid."""
    tuned, heur = kernels
    if config is None and interpret_mode() and not x2.is_cuda:
        config = _INTERP_CFG
    if config is None:
        tuned[grid](*args, **kw)
    else:
        meta = dict(zip(names, config[:3]))
        heur[grid(meta)](*args, **kw, **meta, num_warps=config[3], num_stages=config[4])


def _launch_fwd(x2, w, s, bias, out, bits, config=None):
    M, K = x2.shape
    N = w.shape[0]
    args = (x2, w, s, bias if bias is not None else s, out, M, N, K, x2.stride(0), w.stride(0), out.stride(0), m_bucket(M))
    kw = dict(QMAX=_qmax(bits), HAS_BIAS=bias is not None, PREC=dot_precision(x2.dtype))
    _launch((_fwd_tuned, _fwd_heur), ("BM", "BN", "BK"), lambda m: (cdiv(M, m["BM"]) * cdiv(N, m["BN"]),),
            args, kw, x2, config)
    return out


def _launch_dx(dy2, w, s, out, bits, config=None):
    M, N = dy2.shape
    K = w.shape[1]
    args = (dy2, w, s, out, M, N, K, dy2.stride(0), w.stride(0), out.stride(0), m_bucket(M))
    kw = dict(QMAX=_qmax(bits), PREC=dot_precision(dy2.dtype))
    _launch((_dx_tuned, _dx_heur), ("BM", "BK", "BN"), lambda m: (cdiv(M, m["BM"]) * cdiv(K, m["BK"]),),
            args, kw, dy2, config)
    return out


# ---------------------------------------------------------------------------------------------
# argument checks
# ---------------------------------------------------------------------------------------------
def _check_w(w, op, device=None):
    check_tensor(w, "w", dtype=_W_DTYPES, ndim=2, device=device, op=op)
    if w.shape[1] == 0:
        raise ValueError(f"{op}: w must have at least one column (K >= 1), got shape {tuple(w.shape)}")
    if w.stride(1) != 1:
        raise ValueError(f"{op}: w must be row-major (stride 1 along K), got strides {w.stride()}; call .contiguous()")


def _check_s(s, w, op):
    check_tensor(s, "s", dtype=torch.float32, ndim=1, device=w.device, op=op)
    if s.shape[0] != w.shape[0] or (s.numel() > 0 and s.stride(0) != 1):
        raise ValueError(f"{op}: s must be a contiguous ({w.shape[0]},) = (w.shape[0],) tensor, got shape {tuple(s.shape)}")


def _check_x(x, w, bias, op, name="x"):
    check_tensor(x, name, dtype=_X_DTYPES, device=w.device, op=op)
    check_linear_input(x, bias, "w", w.shape[0], w.shape[1], op, name)



# ---------------------------------------------------------------------------------------------
# custom ops
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("pgolf::qat_row_scale", mutates_args=())
def _row_scale_op(w: torch.Tensor, bits: int, mode: int, k: float) -> torch.Tensor:
    _check_w(w, "qat_row_scale")
    out = _utils.empty((w.shape[0],), torch.float32, w.device)
    if w.shape[0] == 0:
        return out
    if use_triton(w):
        _launch_row_scale(w, out, bits, mode, k)
    else:
        clip = "search" if mode == _MODE_SEARCH else ("absmax" if mode == _MODE_ABSMAX else k)
        out.copy_(qat_row_scale_ref(w, bits, clip))
    return out


@_row_scale_op.register_fake
def _(w, bits, mode, k):
    return w.new_empty((w.shape[0],), dtype=torch.float32)


@torch.library.custom_op("pgolf::int6_qat_linear", mutates_args=())
def _qat_op(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, bias: Optional[torch.Tensor], bits: int,
            mask_clipped: bool) -> torch.Tensor:
    op = "int6_qat_linear"
    _check_w(w, op)
    _check_x(x, w, bias, op)
    _check_s(s, w, op)
    N, K = w.shape
    x2 = rows_2d(x, K)
    out = _utils.empty((x2.shape[0], N), x.dtype, x.device)
    if x2.shape[0] > 0 and N > 0:
        if use_triton(x2):
            _launch_fwd(x2, w, s, bias, out, bits)
        else:
            out.copy_(F.linear(x2, fake_quant_ref(w, s, bits).to(x.dtype), bias))
    return out.reshape(*x.shape[:-1], N)


@_qat_op.register_fake
def _(x, w, s, bias, bits, mask_clipped):
    return x.new_empty((*x.shape[:-1], w.shape[0]))


@torch.library.custom_op("pgolf::int6_qat_linear_dx", mutates_args=())
def _qat_dx_op(dy: torch.Tensor, w: torch.Tensor, s: torch.Tensor, bits: int) -> torch.Tensor:
    op = "int6_qat_linear_dx"
    _check_w(w, op)
    check_tensor(dy, "dy", dtype=_X_DTYPES, device=w.device, op=op)
    if dy.dim() < 1 or dy.shape[-1] != w.shape[0]:
        raise ValueError(f"{op}: dy's last dim must equal N = w.shape[0] = {w.shape[0]}, got dy of shape {tuple(dy.shape)}")
    _check_s(s, w, op)
    N, K = w.shape
    dy2 = rows_2d(dy, N)
    out = _utils.empty((dy2.shape[0], K), dy.dtype, dy.device)
    if dy2.shape[0] > 0 and K > 0:
        if use_triton(dy2) and N > 0:
            _launch_dx(dy2, w, s, out, bits)
        else:
            out.copy_(dy2 @ fake_quant_ref(w, s, bits).to(dy.dtype))
    return out.reshape(*dy.shape[:-1], K)


@_qat_dx_op.register_fake
def _(dy, w, s, bits):
    return dy.new_empty((*dy.shape[:-1], w.shape[1]))


def _setup_context(ctx, inputs, output):
    x, w, s, bias, bits, mask_clipped = inputs
    ctx.save_for_backward(x, w, s)
    ctx.bits = bits
    ctx.mask_clipped = mask_clipped
    ctx.has_bias = bias is not None


def _backward(ctx, dy):
    x, w, s = ctx.saved_tensors
    dx = dw = dbias = None
    if ctx.needs_input_grad[0]:
        dx = _qat_dx_op(dy, w, s, ctx.bits)
    if ctx.needs_input_grad[1]:
        N, K = w.shape
        dy2, x2 = dy.reshape(-1, N), x.reshape(-1, K)
        # one GEMM in the activations' dtype (fp32 accumulation), as autocast's nn.Linear does
        dw = (dy2.t() @ x2).to(w.dtype)
        if ctx.mask_clipped:
            inv = torch.where(s > 0, 1.0 / s, torch.zeros_like(s))
            inside = (w.float() * inv[:, None]).abs() <= _qmax(ctx.bits)
            dw = torch.where(inside, dw, torch.zeros_like(dw))
    if ctx.has_bias and ctx.needs_input_grad[3]:
        dbias = dy.reshape(-1, dy.shape[-1]).sum(0)
    return dx, dw, None, dbias, None, None


_qat_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# public functions
# ---------------------------------------------------------------------------------------------
def qat_row_scale(w: torch.Tensor, bits: int = 6, clip: Union[str, float] = "search") -> torch.Tensor:
    """Per-row QAT scale (N,) fp32 (fp16-representable values) of the current ``w`` (N, K); see the
    module docstring for the rule. No gradient (a stop-gradient constant of the STE)."""
    op = "qat_row_scale"
    check_bits(bits, op)
    mode, k = _parse_clip(clip, op)
    _check_w(w, op)
    return _row_scale_op(w.detach(), bits, mode, k)


def int6_qat_linear(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor] = None, bits: int = 6,
                    clip: Union[str, float] = "search", mask_clipped: bool = False) -> torch.Tensor:
    """``y = x @ fq(W)^T (+ bias)`` with int-``bits`` fake-quantized weights and a straight-through
    gradient (module docstring). x: (..., K) bf16/fp16/fp32 (under autocast: cast to the autocast
    dtype first, as nn.Linear would be); w: (N, K) fp32/bf16/fp16, row-major, the trainable master
    weight; bias: (N,) or None (cast to x's dtype). Returns (..., N) in x's dtype. Gradients:
    dx = dy @ fq(W), dW = dy^T x (zeroed where |W| exceeds the clip if ``mask_clipped``), dbias.
    """
    op = "int6_qat_linear"
    check_bits(bits, op)
    mode, k = _parse_clip(clip, op)
    if not isinstance(mask_clipped, bool):
        raise TypeError(f"{op}: mask_clipped must be a bool, got {type(mask_clipped).__name__}")
    _check_w(w, op)
    check_tensor(x, "x", dtype=_X_DTYPES, device=w.device, op=op)
    if torch.is_autocast_enabled(x.device.type):
        x = x.to(torch.get_autocast_dtype(x.device.type))
    if bias is not None and isinstance(bias, torch.Tensor) and bias.dtype != x.dtype and bias.dtype.is_floating_point:
        bias = bias.to(x.dtype)
    _check_x(x, w, bias, op)
    s = _row_scale_op(w.detach(), bits, mode, k)
    return _qat_op(x, w, s, bias, bits, mask_clipped)
