"""Newton-Schulz orthogonalization (Muon's inner loop): grouped, symmetric Triton kernels + torch reference.

Math (one matrix G of shape (r, c); m = min(r, c), n = max(r, c)):

    X_0 = G / (||G||_F + eps)              (Frobenius norm per matrix, computed in fp32)
    X_0 <- X_0^T  if r > c                 (so X is "wide", m <= n, and the Gram below is m x m)
    for (a, b, c) in schedule:             (one tuple per step)
        A = X X^T                          (m x m, symmetric)
        B = b A + c A A                    (m x m, symmetric: A and A A commute)
        X = a X + B X                      (m x n)
    return X^T if r > c else X             (shape (r, c), compute dtype = bf16 by default)

FLOPs per step on a wide X (m x n): 4 m^2 n + 2 m^3 on the full count (2 m^2 n Gram, 2 m^3 A A,
2 m^2 n for B X); the kernels compute only one triangle of A and of A A, i.e. 3 m^2 n + m^3.

Kernels (three launches per step, each *grouped* over every matrix of every shape in the call):
  * ``_ns_gram_kernel``:   tiles (i <= j) of A = X X^T; the off-diagonal tile is stored twice (mirror).
  * ``_ns_square_kernel``: tiles (i <= j) of A A; epilogue B = b A + c A A (fp32), mirrored store.
  * ``_ns_update_kernel``: all tiles of X' = a X + B X (fp32 epilogue); the last step writes the output
    in the caller's orientation (transposed tiles for r > c), so there is no unpack pass.
A work list of (matrix, tile) items is built once per shape signature and cached; one program per item,
so edge tiles are masked and no program works on padding. Tiles: 128x128 (BK 64, 8 warps, 3 stages), or
64x64 when a call has fewer 128x128 update tiles than the GPU has SMs (``tiles="auto"``, the default).
Prologue: torch fp32 norm per input (or, with ``row_sumsq``, the sum of the per-row sums of squares that the pass
writing the input already computed), then a Triton pack kernel that scales, casts and transposes 64x64 tiles in
registers into the packed workspace (``FAST_PACK``, the default; ``PGOLF_NS_FAST_PACK=0`` in the environment falls back
to one torch scale/cast/transpose copy per input, bitwise equal).
Measured on one H200 (bench/results/ns-h200.md): whole 11-layer MLP3x set 0.753 ms with the Triton pack (the
default; 417 TFLOP/s on the full count), 0.850 ms with the torch copy, vs torch.compile over banks 1.196 ms.
Operands are the compute dtype (bf16 on GPU), accumulation is fp32; A, B, X are rounded once per step (torch's own path rounds 5 times per step:
A, A A, c A A, b A + c A A, B X, a X + B X).

Edge cases (documented behaviour, tested):
  * a zero matrix stays exactly zero (X_0 = 0 / eps = 0, and every step maps 0 to 0);
  * a tiny norm gives no NaN (eps keeps the division finite);
  * NaN or Inf anywhere in a matrix -> that matrix's output is NaN (other matrices of the call are not
    affected); pass ``validate=True`` to get a ValueError instead (costs one device sync);
  * ||G||_F must be finite in fp32 (< ~1.8e19), otherwise the norm overflows and the output is NaN.

Dispatch (see ``_utils``): CUDA -> kernels; CPU -> reference; CPU + TRITON_INTERPRET=1 -> kernels in the
interpreter, except for a bf16 compute dtype, which triton 3.6's interpreter computes wrongly, so CPU bf16
always uses the reference. fp64 compute is reference-only (it is the oracle).
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import triton
import triton.language as tl

from . import _utils
from ._utils import cdiv, env_choice, interpret_mode, load_tile, use_triton

__all__ = [
    "QUINTIC",
    "POLAR_EXPRESS",
    "newton_schulz",
    "newton_schulz_ref",
    "newton_schulz_many",
    "resolve_coefficients",
    "ns_flops",
]

QUINTIC: Tuple[float, float, float] = (3.4445, -4.7750, 2.0315)
# Per-step "Polar Express" tuples (modded-nanogpt; used by the newest parameter-golf records).
POLAR_EXPRESS: List[Tuple[float, float, float]] = [
    (8.1566, -22.4833, 15.8788),
    (4.0429, -2.8089, 0.5000),
    (3.8917, -2.7725, 0.5061),
    (3.2858, -2.3681, 0.4645),
    (2.3465, -1.7098, 0.4232),
]

_OP = "newton_schulz"
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

Coefficients = Union[str, Sequence[Sequence[float]]]


# ----------------------------------------------------------------------------------------------------
# argument handling
# ----------------------------------------------------------------------------------------------------
def resolve_coefficients(coefficients: Coefficients, steps: int) -> List[Tuple[float, float, float]]:
    """The per-step (a, b, c) schedule.

    ``"quintic"``: QUINTIC every step. ``"polar_express"`` or a list of (a, b, c): step k uses tuple k;
    a schedule shorter than ``steps`` repeats its last tuple (modded-nanogpt's rule), a longer one is cut.
    """
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise TypeError(f"{_OP}: steps must be an int, got {type(steps).__name__}")
    if steps < 0:
        raise ValueError(f"{_OP}: steps must be >= 0, got {steps}")
    if isinstance(coefficients, str):
        key = coefficients.lower().replace("-", "_")
        if key == "quintic":
            sched = [QUINTIC]
        elif key == "polar_express":
            sched = list(POLAR_EXPRESS)
        else:
            raise ValueError(f"{_OP}: coefficients must be 'quintic', 'polar_express' or a list of (a, b, c); got {coefficients!r}")
    else:
        try:
            sched = [tuple(float(v) for v in t) for t in coefficients]
        except TypeError:
            raise TypeError(f"{_OP}: coefficients must be 'quintic', 'polar_express' or a list of (a, b, c) tuples, "
                            f"got {type(coefficients).__name__}") from None
        if not sched or any(len(t) != 3 for t in sched):
            raise ValueError(f"{_OP}: coefficients must be a non-empty list of 3-tuples (a, b, c), got {coefficients!r}")
        if not all(math.isfinite(v) for t in sched for v in t):
            raise ValueError(f"{_OP}: coefficients must be finite, got {coefficients!r}")
    out = [tuple(sched[min(k, len(sched) - 1)]) for k in range(steps)]
    return [(float(a), float(b), float(c)) for a, b, c in out]


def _check_matrix(G, name: str) -> None:
    if not isinstance(G, torch.Tensor):
        raise TypeError(f"{_OP}: {name} must be a torch.Tensor, got {type(G).__name__}")
    if G.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{_OP}: {name} must have a floating dtype (float16, bfloat16, float32 or float64), "
                        f"got {str(G.dtype).replace('torch.', '')}")
    if G.dim() < 2:
        raise ValueError(f"{_OP}: {name} must have at least 2 dimensions (..., m, n), got shape {tuple(G.shape)}")
    if G.shape[-2] == 0 or G.shape[-1] == 0:
        raise ValueError(f"{_OP}: {name} must have non-empty matrix dims, got shape {tuple(G.shape)}")


def _check_common(eps, compute_dtype) -> None:
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not (eps >= 0.0) or not math.isfinite(eps):
        raise ValueError(f"{_OP}: eps must be a finite float >= 0, got {eps!r}")
    if compute_dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{_OP}: compute_dtype must be float16, bfloat16, float32 or float64, got {compute_dtype!r}")


def _validate_finite(mats: Sequence[torch.Tensor]) -> None:
    for i, G in enumerate(mats):
        if not bool(torch.isfinite(G).all()):
            raise ValueError(f"{_OP}: input {i} (shape {tuple(G.shape)}) contains NaN or Inf "
                             "(validate=True; with validate=False that matrix's output would be NaN)")


def ns_flops(m: int, n: int, steps: int = 5, symmetric: bool = False) -> int:
    """FLOPs of ``steps`` iterations on one matrix: full count 4 m^2 n + 2 m^3 per step (m <= n after the
    transpose), or 3 m^2 n + m^3 when one triangle of the Gram and of A A is computed."""
    m, n = min(m, n), max(m, n)
    per = 3 * m * m * n + m ** 3 if symmetric else 4 * m * m * n + 2 * m ** 3
    return per * steps


# ----------------------------------------------------------------------------------------------------
# pure-torch reference (the records' code path; semantics oracle)
# ----------------------------------------------------------------------------------------------------
def newton_schulz_ref(G: torch.Tensor, steps: int = 5, coefficients: Coefficients = "quintic", eps: float = 1e-7,
                      *, compute_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The records' torch Newton-Schulz (every op in ``compute_dtype``, default bf16), batched over leading dims.

    X = G.to(dt); X /= ||X||_F + eps (per matrix); transpose to wide; per step A = X X^T,
    B = b A + c A @ A, X = a X + B @ X; transpose back. ``compute_dtype=torch.float64`` gives the oracle.
    """
    _check_matrix(G, "G")
    _check_common(eps, compute_dtype)
    sched = resolve_coefficients(coefficients, steps)
    X = G.to(compute_dtype)
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + eps)
    transposed = G.shape[-2] > G.shape[-1]
    if transposed:
        X = X.mT
    for a, b, c in sched:
        A = X @ X.mT
        B = b * A + c * A @ A  # the records' expression: (c * A) @ A
        X = a * X + B @ X
    if transposed:
        X = X.mT
    return X.contiguous()


# ----------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------
# Work-list row layout (int64, 8 columns): x_off, a_off, m, n, ti, tj, out_off, transposed
_ROW = 8


@triton.jit
def _dot_loop(pa, pb, step_b, red, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, EVEN: tl.constexpr,
              IEEE: tl.constexpr):
    """fp32 (BM, BN) sum over k < red of tile(pa)[:, k] * tile(pb)[k, :]: pa points at a (BM, BK) tile with unit
    stride along k, pb at a (BK, BN) tile whose k step is ``step_b`` elements. EVEN: red % BK == 0 (no masks)."""
    rk = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k in range(0, red, BK):
        xa = load_tile(pa, rk[None, :] < red - k, EVEN)
        xb = load_tile(pb, rk[:, None] < red - k, EVEN)
        if IEEE:
            acc = tl.dot(xa, xb, acc, input_precision="ieee")
        else:
            acc = tl.dot(xa, xb, acc)
        pa += BK
        pb += step_b
    return acc


@triton.jit
def _item_off(row, col: tl.constexpr, EVEN: tl.constexpr):
    """Column ``col`` of a work-list row: an element offset (64-aligned when EVEN: the plan aligns every matrix)."""
    v = tl.load(row + col)
    if EVEN:
        v = tl.multiple_of(v, 64)
    return v


@triton.jit
def _item(items, EVEN: tl.constexpr):
    """This program's work-list row and its matrix: (row, x_off, a_off, m, n); EVEN: every m, n of the launch is a
    multiple of the blocks and of 64 (a kernel that does not use x_off or n leaves their loads dead)."""
    row = items + tl.program_id(0) * 8
    x_off = _item_off(row, 0, EVEN)
    a_off = _item_off(row, 1, EVEN)
    m = tl.load(row + 2).to(tl.int32)
    n = tl.load(row + 3).to(tl.int32)
    if EVEN:
        n = tl.multiple_of(n, 64)
        m = tl.multiple_of(m, 64)
    return row, x_off, a_off, m, n


@triton.jit
def _item_tile(row, rows, cols, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """Tile (ti, tj) of the row: (ti, tj, rm, rn, rk, rm % rows, rn % cols). The wrapped indices serve the loads
    (edge rows are computed on valid data but never stored), the plain ones the masked stores."""
    ti = tl.load(row + 4).to(tl.int32)
    tj = tl.load(row + 5).to(tl.int32)
    rm = ti * BM + tl.arange(0, BM)
    rn = tj * BN + tl.arange(0, BN)
    return ti, tj, rm, rn, tl.arange(0, BK), rm % rows, rn % cols


@triton.jit
def _load(base, off, rm, rn, rows, cols):
    """Tile [rm, rn] of the row-major (rows x cols) matrix at base + off (0 outside)."""
    msk = (rm[:, None] < rows) & (rn[None, :] < cols)
    return tl.load(base + off + rm[:, None].to(tl.int64) * cols + rn[None, :], mask=msk, other=0.0)


@triton.jit
def _store(base, off, val, rm, rn, rows, cols):
    """val into tile [rm, rn] of the row-major (rows x cols) matrix at base + off."""
    msk = (rm[:, None] < rows) & (rn[None, :] < cols)
    tl.store(base + off + rm[:, None].to(tl.int64) * cols + rn[None, :], val, mask=msk)


@triton.jit
def _store_t(base, off, val, rm, rn, rows, cols):
    """val^T into tile [rn, rm] of the row-major (cols x rows) matrix at base + off: the transpose of ``_store``."""
    mskt = (rn[:, None] < cols) & (rm[None, :] < rows)
    tl.store(base + off + rn[:, None].to(tl.int64) * rows + rm[None, :], tl.trans(val), mask=mskt)


@triton.jit
def _ns_gram_kernel(X, A, items, BLOCK: tl.constexpr, BK: tl.constexpr, EVEN: tl.constexpr,
                    IEEE: tl.constexpr):
    """Tile (ti <= tj) of A = X X^T for one matrix (X: m x n row-major at X + x_off; A: m x m)."""
    row, x_off, a_off, m, n = _item(items, EVEN)
    ti, tj, rm, rn, rk, rm_l, rn_l = _item_tile(row, m, m, BLOCK, BLOCK, BK)
    pa = X + x_off + rm_l[:, None].to(tl.int64) * n + rk[None, :]
    pb = X + x_off + rn_l[None, :].to(tl.int64) * n + rk[:, None]
    acc = _dot_loop(pa, pb, BK, n, BLOCK, BLOCK, BK, EVEN, IEEE)
    val = acc.to(A.dtype.element_ty)
    # stores written out, not through _store / _store_t: with those calls too, ptxas scheduled the 64x64 EVEN=0
    # variant differently (sm_90 SASS: same 2656 instructions, 128 in another order)
    msk = (rm[:, None] < m) & (rn[None, :] < m)
    tl.store(A + a_off + rm[:, None].to(tl.int64) * m + rn[None, :], val, mask=msk)
    if ti != tj:  # mirror: A[rn, rm] = tile^T
        mskt = (rn[:, None] < m) & (rm[None, :] < m)
        tl.store(A + a_off + rn[:, None].to(tl.int64) * m + rm[None, :], tl.trans(val), mask=mskt)


@triton.jit
def _ns_square_kernel(A, Bm, items, b, c, BLOCK: tl.constexpr, BK: tl.constexpr, EVEN: tl.constexpr,
                      IEEE: tl.constexpr):
    """Tile (ti <= tj) of B = b A + c A A (A symmetric m x m, both triangles stored)."""
    row, x_off, a_off, m, n = _item(items, EVEN)
    ti, tj, rm, rn, rk, rm_l, rn_l = _item_tile(row, m, m, BLOCK, BLOCK, BK)
    pa = A + a_off + rm_l[:, None].to(tl.int64) * m + rk[None, :]          # A[rm, k]
    pb = A + a_off + rk[:, None].to(tl.int64) * m + rn_l[None, :]          # A[k, rn]
    acc = _dot_loop(pa, pb, BK * m, m, BLOCK, BLOCK, BK, EVEN, IEEE)
    # one offset tile for the load of A and the store of B (they share a_off), not _load + _store: with a base
    # pointer each, the 64-bit address math doubled (sm_90 SASS at 128x128 tiles: 96 -> 224 IMAD.WIDE)
    msk = (rm[:, None] < m) & (rn[None, :] < m)
    p_ij = rm[:, None].to(tl.int64) * m + rn[None, :]
    aij = tl.load(A + a_off + p_ij, mask=msk, other=0.0).to(tl.float32)
    val = (b * aij + c * acc).to(Bm.dtype.element_ty)
    tl.store(Bm + a_off + p_ij, val, mask=msk)
    if ti != tj:
        _store_t(Bm, a_off, val, rm, rn, m, m)


@triton.jit
def _ns_update_kernel(X, Bm, Y, items, a, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                      EVEN: tl.constexpr, FINAL: tl.constexpr, IEEE: tl.constexpr):
    """Tile (ti, tj) of Y = a X + B X (X: m x n, B: m x m). FINAL: Y is the output buffer, written in the
    caller's orientation (transposed when the row's flag says the input was tall)."""
    row, x_off, a_off, m, n = _item(items, EVEN)
    ti, tj, rm, rn, rk, rm_l, rn_l = _item_tile(row, m, n, BM, BN, BK)
    pa = Bm + a_off + rm_l[:, None].to(tl.int64) * m + rk[None, :]         # B[rm, k]
    pb = X + x_off + rk[:, None].to(tl.int64) * n + rn_l[None, :]          # X[k, rn]
    acc = _dot_loop(pa, pb, BK * n, m, BM, BN, BK, EVEN, IEEE)
    xij = _load(X, x_off, rm, rn, m, n).to(tl.float32)
    val = (a * xij + acc).to(Y.dtype.element_ty)
    if FINAL:
        out_off = _item_off(row, 6, EVEN)
        if tl.load(row + 7) != 0:  # caller's matrix is n x m: element (rm, rn) of wide X goes to [rn, rm]
            _store_t(Y, out_off, val, rm, rn, m, n)
        else:
            _store(Y, out_off, val, rm, rn, m, n)
    else:
        _store(Y, x_off, val, rm, rn, m, n)


@triton.jit
def _ns_pack_kernel(G, X, den, r, c, s_b, s_r, s_c, x_base, eps, TRANS: tl.constexpr, FROM_SUMSQ: tl.constexpr,
                    BR: tl.constexpr, BC: tl.constexpr):
    """X[b] = G[b] / den[b] cast to X's dtype, stored wide: (r x c), or its transpose (c x r) if TRANS.
    IEEE division (div_rn) + round-to-nearest cast: bitwise what torch.div(G, den, out=X) writes.
    FROM_SUMSQ: den[b] holds ||G[b]||_F^2 and the divisor is sqrt_rn(den[b]) + eps (torch's sqrt and add)."""
    b = tl.program_id(1)
    n_tc = tl.cdiv(c, BC)
    tr = tl.program_id(0) // n_tc
    tc = tl.program_id(0) % n_tc
    rr = tr * BR + tl.arange(0, BR)
    cc = tc * BC + tl.arange(0, BC)
    msk = (rr[:, None] < r) & (cc[None, :] < c)
    src = G + b.to(tl.int64) * s_b + rr[:, None].to(tl.int64) * s_r + cc[None, :].to(tl.int64) * s_c
    g = tl.load(src, mask=msk, other=0.0).to(tl.float32)
    d = tl.load(den + b)
    if FROM_SUMSQ:
        d = tl.math.sqrt_rn(d) + eps
    val = tl.math.div_rn(g, tl.zeros_like(g) + d).to(X.dtype.element_ty)
    base = X + x_base + b.to(tl.int64) * r * c
    if TRANS:  # wide X[b] is c x r: element (rr, cc) goes to [cc, rr]
        _store_t(base, 0, val, rr, cc, r, c)
    else:
        _store(base, 0, val, rr, cc, r, c)


# ----------------------------------------------------------------------------------------------------
# launch planning
# ----------------------------------------------------------------------------------------------------
# Tile configs. GPU: 128x128 output tiles, BK=64 (H100/H200 wgmma-friendly; K is 256..2048 here, so
# 4..32 k-iterations). Interpreter: 16x16 tiles so tiny test shapes still have several tiles per matrix
# (odd shapes hit the masked edges and the mirrored off-diagonal path).
GPU_CONFIG: Dict[str, int] = dict(g_block=128, g_bk=64, g_warps=8, g_stages=3,
                                  s_block=128, s_bk=64, s_warps=8, s_stages=3,
                                  u_bm=128, u_bn=128, u_bk=64, u_warps=8, u_stages=3)
# 64x64 tiles for launches with few 128x128 update tiles (fewer than the GPU has SMs): measured on H200
# (bench/results/ns-tune-h200.md) single 512x512 0.0733 ms vs 0.1129 ms with 128-tiles, single 1536x512
# 0.0993 vs 0.1394 ms; the 1/8 share (264 such tiles) is better with 128-tiles (0.2329 vs 0.2487 ms).
SMALL_GPU_CONFIG: Dict[str, int] = dict(g_block=64, g_bk=64, g_warps=4, g_stages=3,
                                        s_block=64, s_bk=64, s_warps=4, s_stages=3,
                                        u_bm=64, u_bn=64, u_bk=64, u_warps=4, u_stages=3)
INTERP_CONFIG: Dict[str, int] = dict(g_block=16, g_bk=16, g_warps=4, g_stages=1,
                                     s_block=16, s_bk=16, s_warps=4, s_stages=1,
                                     u_bm=16, u_bn=16, u_bk=16, u_warps=4, u_stages=1)

_ALIGN = 64  # elements; keeps every matrix 128-byte aligned in the packed workspaces
_PLAN_CACHE: Dict[tuple, "_Plan"] = {}


def _align(x: int) -> int:
    return (x + _ALIGN - 1) // _ALIGN * _ALIGN


class _Plan:
    """Packed layout + work lists for one shape signature (built once, cached)."""

    def __init__(self, shapes: Tuple[Tuple[int, ...], ...], device: torch.device, cfg: Dict[str, int]):
        self.entries = []  # (count, r, c, m, n, trans, x_off, a_off, out_off)
        x_tot = a_tot = o_tot = 0
        for shp in shapes:
            r, c = shp[-2], shp[-1]
            count = 1
            for d in shp[:-2]:
                count *= d
            m, n = min(r, c), max(r, c)
            x_tot, a_tot, o_tot = _align(x_tot), _align(a_tot), _align(o_tot)
            self.entries.append((count, r, c, m, n, r > c, x_tot, a_tot, o_tot))
            x_tot += count * m * n
            a_tot += count * m * m
            o_tot += count * r * c
        self.x_total, self.a_total, self.out_total = x_tot, a_tot, o_tot
        # per-matrix items; ordered by descending K (work per tile) so the long tiles start first, matrices
        # kept contiguous for L2 reuse of their operands
        g_items, s_items, u_items = [], [], []
        gb, sb, bm, bn = cfg["g_block"], cfg["s_block"], cfg["u_bm"], cfg["u_bn"]
        for (count, r, c, m, n, trans, xo, ao, oo) in self.entries:
            for j in range(count):
                x_off, a_off, out_off = xo + j * m * n, ao + j * m * m, oo + j * r * c
                tg = cdiv(m, gb)
                for ti in range(tg):
                    for tj in range(ti, tg):
                        g_items.append((n, (x_off, a_off, m, n, ti, tj, out_off, int(trans))))
                ts = cdiv(m, sb)
                for ti in range(ts):
                    for tj in range(ti, ts):
                        s_items.append((m, (x_off, a_off, m, n, ti, tj, out_off, int(trans))))
                for ti in range(cdiv(m, bm)):
                    for tj in range(cdiv(n, bn)):
                        u_items.append((m, (x_off, a_off, m, n, ti, tj, out_off, int(trans))))

        def table(items):
            items.sort(key=lambda t: -t[0])  # stable: matrices stay contiguous within one K
            t = torch.tensor([it[1] for it in items], dtype=torch.int64).reshape(-1, _ROW)
            return t.to(device)

        self.g_items, self.s_items, self.u_items = table(g_items), table(s_items), table(u_items)
        ms = [e[3] for e in self.entries]
        ns = [e[4] for e in self.entries]
        # EVEN: no K masks and 64-aligned hints are valid (benchmark shapes: m, n multiples of 128)
        blocks = (gb, sb, bm, bn, cfg["g_bk"], cfg["s_bk"], cfg["u_bk"], 64)
        self.even = all(v % blk == 0 for v in ms + ns for blk in blocks)


def _get_plan(shapes, device, cfg) -> _Plan:
    key = (shapes, str(device), tuple(sorted(cfg.items())))
    plan = _PLAN_CACHE.get(key)
    if plan is None:
        plan = _Plan(shapes, device, cfg)
        _PLAN_CACHE[key] = plan
    return plan


_SM_COUNT: Dict[int, int] = {}


def _default_config(device: torch.device, shapes=(), tiles: str = "auto") -> Dict[str, int]:
    """Interpreter: INTERP_CONFIG. GPU: GPU_CONFIG, or SMALL_GPU_CONFIG when ``tiles="auto"`` and the call has
    fewer 128x128 update tiles than the GPU has SMs (``tiles="large"`` pins GPU_CONFIG: Muon does, so that a
    rank's share and the whole set run the same tiles and the sharded update stays bitwise the single one)."""
    if device.type == "cpu":
        return dict(INTERP_CONFIG)
    if tiles == "auto":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        if idx not in _SM_COUNT:
            _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
        n_tiles = 0
        for shp in shapes:
            cnt = 1
            for d in shp[:-2]:
                cnt *= d
            m, n = sorted(shp[-2:])
            n_tiles += cnt * cdiv(m, GPU_CONFIG["u_bm"]) * cdiv(n, GPU_CONFIG["u_bn"])
        if n_tiles < _SM_COUNT[idx]:
            return dict(SMALL_GPU_CONFIG)
    return dict(GPU_CONFIG)


def _packed_size(shapes: Sequence[Sequence[int]]) -> int:
    tot = 0
    for shp in shapes:
        tot = _align(tot)
        cnt = 1
        for d in shp:
            cnt *= d
        tot += cnt
    return tot


# Triton pack kernel for the prologue, the default. Why: torch.div's element-wise copy from the transposed (tall) bank
# reads with a 2 KB stride (~0.8 TB/s); the kernel transposes 64x64 tiles in registers. Measured on H200
# (torch.profiler, bench/results/records-h200.md): in the patched 2026-04-29 Muon.step the copy took 160.7 us, the
# pack 32.2 us (1,117 -> 989 us of device time per step); the whole 11-layer MLP3x NS set 0.850 -> 0.753 ms
# (bench/results/ns-h200.md). Output is bitwise the torch path's. PGOLF_NS_FAST_PACK=0 selects the torch copy.
def _fast_pack_from_env() -> bool:
    return env_choice("PGOLF_NS_FAST_PACK", {"1": "Triton pack", "0": "torch copy"}) == "1"


FAST_PACK = _fast_pack_from_env()


def _pack_inputs(mats: List[torch.Tensor], plan: "_Plan", X: torch.Tensor, eps: float,
                 fast: Optional[bool] = None, sumsq: Sequence[torch.Tensor] = ()) -> None:
    """Prologue: per input, the fp32 Frobenius norm of each matrix, then one fused scale + cast + transpose
    copy into the packed wide workspace X (3 small launches per input tensor; a 3-D bank is one input).
    torch's norm is deterministic (an atomics-based Triton reduction would not be, and Muon's sharded
    update must equal the single-process one bitwise). ``sumsq`` (``newton_schulz_many(row_sumsq=...)``): each
    input's per-row sums of squares, already computed by the pass that wrote the input; the norm is then the
    square root of their per-matrix sum (a (count, r) sum instead of a pass over the input)."""
    fast = FAST_PACK if fast is None else fast
    for i, (G, (count, r, c, m, n, trans, xo, ao, oo)) in enumerate(zip(mats, plan.entries)):
        if count == 0:
            continue
        g3 = G.reshape(count, r, c)
        if sumsq:
            ssq = sumsq[i].view(count, r).sum(dim=1)
        else:
            ssq = None
            nrm = torch.linalg.vector_norm(g3, dim=(-2, -1), keepdim=True, dtype=torch.float32).add_(eps)
        if fast:
            br = bc = 16 if interpret_mode() and G.device.type == "cpu" else 64
            grid = (cdiv(r, br) * cdiv(c, bc), count)
            _ns_pack_kernel[grid](g3, X, nrm if ssq is None else ssq, r, c, g3.stride(0), g3.stride(1), g3.stride(2),
                                  xo, float(eps), TRANS=trans, FROM_SUMSQ=ssq is not None, BR=br, BC=bc, num_warps=4)
            continue
        if ssq is not None:
            nrm = ssq.sqrt().add_(eps).view(count, 1, 1)
        dst = X[xo:xo + count * m * n].view(count, m, n)
        torch.div(g3.mT if trans else g3, nrm, out=dst)


def _ns_packed_impl(mats: List[torch.Tensor], coeffs: List[float], eps: float, compute_dtype: torch.dtype,
                    config: Optional[Dict[str, int]] = None, tiles: str = "auto",
                    sumsq: Sequence[torch.Tensor] = ()) -> torch.Tensor:
    """Kernel path: returns one flat buffer holding every output (caller's shapes, aligned offsets)."""
    device = mats[0].device
    shapes = tuple(tuple(int(s) for s in G.shape) for G in mats)
    if config:
        cfg = dict(GPU_CONFIG) if device.type != "cpu" else dict(INTERP_CONFIG)
        cfg.update(config)
    else:
        cfg = _default_config(device, shapes, tiles)
    plan = _get_plan(shapes, device, cfg)
    dt = compute_dtype
    out = _utils.empty((plan.out_total,), dt, device)
    if plan.out_total == 0:
        return out
    sched = [tuple(coeffs[i:i + 3]) for i in range(0, len(coeffs), 3)]
    X = _utils.empty((plan.x_total,), dt, device)
    _pack_inputs(mats, plan, X, eps, sumsq=sumsq)
    if not sched:
        for G, (count, r, c, m, n, trans, xo, ao, oo) in zip(mats, plan.entries):
            if count:
                src = X[xo:xo + count * m * n].view(count, m, n)
                out[oo:oo + count * r * c].view(count, r, c).copy_(src.mT if trans else src)
        return out
    A = _utils.empty((plan.a_total,), dt, device)
    Bm = _utils.empty((plan.a_total,), dt, device)
    X2 = _utils.empty((plan.x_total,), dt, device)
    ieee = dt == torch.float32
    ng, ns_, nu = plan.g_items.shape[0], plan.s_items.shape[0], plan.u_items.shape[0]
    if ng == 0:  # only zero-sized batches
        return out
    for step, (a, b, c) in enumerate(sched):
        final = step == len(sched) - 1
        _ns_gram_kernel[(ng,)](X, A, plan.g_items, BLOCK=cfg["g_block"], BK=cfg["g_bk"], EVEN=plan.even,
                               IEEE=ieee, num_warps=cfg["g_warps"], num_stages=cfg["g_stages"])
        _ns_square_kernel[(ns_,)](A, Bm, plan.s_items, b, c, BLOCK=cfg["s_block"], BK=cfg["s_bk"],
                                  EVEN=plan.even, IEEE=ieee, num_warps=cfg["s_warps"], num_stages=cfg["s_stages"])
        Y = out if final else X2
        _ns_update_kernel[(nu,)](X, Bm, Y, plan.u_items, a, BM=cfg["u_bm"], BN=cfg["u_bn"], BK=cfg["u_bk"],
                                 EVEN=plan.even, FINAL=final, IEEE=ieee, num_warps=cfg["u_warps"],
                                 num_stages=cfg["u_stages"])
        X, X2 = X2, X
    return out


def _ns_packed_ref(mats, coeffs, eps, compute_dtype) -> torch.Tensor:
    shapes = [tuple(G.shape) for G in mats]
    out = torch.empty(_packed_size(shapes), dtype=compute_dtype, device=mats[0].device)
    sched = [tuple(coeffs[i:i + 3]) for i in range(0, len(coeffs), 3)]
    off = 0
    for G in mats:
        off = _align(off)
        k = G.numel()
        if k:
            out[off:off + k].view(G.shape).copy_(
                newton_schulz_ref(G, len(sched), sched or "quintic", eps, compute_dtype=compute_dtype))
        off += k
    return out


def _kernel_ok(t: torch.Tensor, compute_dtype: torch.dtype) -> bool:
    if not use_triton(t) or compute_dtype not in _KERNEL_DTYPES:
        return False
    if t.device.type == "cpu" and compute_dtype == torch.bfloat16:
        return False  # triton 3.6's interpreter computes bf16 dots wrongly; use the reference
    return True


@torch.library.custom_op("pgolf::newton_schulz_packed", mutates_args=())
def _ns_packed_op(mats: List[torch.Tensor], coeffs: List[float], eps: float, compute_dtype: torch.dtype,
                  use_kernel: bool, tiles: str, sumsq: List[torch.Tensor]) -> torch.Tensor:
    """All inputs orthogonalized; outputs packed in one flat buffer (see ``_packed_size``). ``sumsq``: per-row
    sums of squares of every input, or empty (the kernel path computes the norms; the reference always does)."""
    if use_kernel and _kernel_ok(mats[0], compute_dtype):
        return _ns_packed_impl(mats, coeffs, eps, compute_dtype, tiles=tiles, sumsq=sumsq)
    return _ns_packed_ref(mats, coeffs, eps, compute_dtype)


@_ns_packed_op.register_fake
def _(mats, coeffs, eps, compute_dtype, use_kernel, tiles, sumsq):
    return mats[0].new_empty(_packed_size([G.shape for G in mats]), dtype=compute_dtype)


def _prepare(mats: Sequence[torch.Tensor], steps, coefficients, eps, compute_dtype, validate, tiles="auto"):
    if not isinstance(mats, (list, tuple)) or len(mats) == 0:
        raise TypeError(f"{_OP}: mats must be a non-empty list of tensors, got {type(mats).__name__}")
    for i, G in enumerate(mats):
        _check_matrix(G, f"mats[{i}]" if len(mats) > 1 else "G")
        if G.device != mats[0].device:
            raise ValueError(f"{_OP}: mats[{i}] is on {G.device} but mats[0] is on {mats[0].device}; "
                             "all matrices must be on one device")
    _check_common(eps, compute_dtype)
    if tiles not in ("auto", "large"):
        raise ValueError(f"{_OP}: tiles must be 'auto' or 'large', got {tiles!r}")
    sched = resolve_coefficients(coefficients, steps)
    if validate:
        _validate_finite(mats)
    return [v for t in sched for v in t]


def _check_row_sumsq(mats: List[torch.Tensor], row_sumsq, validate: bool) -> List[torch.Tensor]:
    if row_sumsq is None:
        return []
    op = "newton_schulz_many"
    if isinstance(row_sumsq, torch.Tensor) or not isinstance(row_sumsq, (list, tuple)) or len(row_sumsq) != len(mats):
        got = len(row_sumsq) if isinstance(row_sumsq, (list, tuple)) else type(row_sumsq).__name__
        raise TypeError(f"{op}: row_sumsq must be None or a list of {len(mats)} tensors (one per input), got {got}")
    for i, (G, s) in enumerate(zip(mats, row_sumsq)):
        rows = G.numel() // G.shape[-1]
        if (not isinstance(s, torch.Tensor) or s.dtype != torch.float32 or s.shape != (rows,)
                or not s.is_contiguous() or s.device != G.device):
            got = (f"{str(s.dtype).replace('torch.', '')} {tuple(s.shape)} on {s.device}"
                   f"{'' if s.is_contiguous() else ', not contiguous'}" if isinstance(s, torch.Tensor)
                   else type(s).__name__)
            raise ValueError(f"{op}: row_sumsq[{i}] must be a contiguous float32 tensor of shape ({rows},) on "
                             f"{G.device} (the per-row sums of squares of mats[{i}], shape {tuple(G.shape)}), got {got}")
        if validate:
            # muon_update.row_sumsq_ref's sum, written out: importing muon_update here would add its bytes to
            # the submission code of every script that imports newton_schulz (train/artifact.py counts imports)
            ref = G.detach().float().reshape(rows, -1).square().sum(dim=1)
            if not torch.allclose(s, ref, rtol=1e-3, atol=1e-30):
                raise ValueError(f"{op}: row_sumsq[{i}] does not hold the per-row sums of squares of mats[{i}] "
                                 f"(largest relative difference {float(((s - ref).abs() / ref.clamp_min(1e-30)).max()):.3g}; "
                                 "validate=True)")
    return list(row_sumsq)


def newton_schulz(G: torch.Tensor, steps: int = 5, coefficients: Coefficients = "quintic", eps: float = 1e-7, *,
                  compute_dtype: torch.dtype = torch.bfloat16, validate: bool = False,
                  use_kernel: bool = True, tiles: str = "auto") -> torch.Tensor:
    """Orthogonalize G (..., m, n) (2-D or batched) with ``steps`` Newton-Schulz iterations.

    Returns a contiguous tensor of G's shape in ``compute_dtype`` (bf16). See the module docstring for
    the math, the schedule rules (``resolve_coefficients``) and the NaN/Inf behaviour (``validate``).
    ``use_kernel=False`` forces the torch reference; ``tiles`` see ``_default_config``.
    """
    coeffs = _prepare([G], steps, coefficients, eps, compute_dtype, validate, tiles)
    flat = _ns_packed_op([G], coeffs, float(eps), compute_dtype, bool(use_kernel), tiles, [])
    return flat.view(G.shape)


def newton_schulz_many(mats: List[torch.Tensor], steps: int = 5, coefficients: Coefficients = "quintic",
                       eps: float = 1e-7, *, compute_dtype: torch.dtype = torch.bfloat16, validate: bool = False,
                       use_kernel: bool = True, tiles: str = "auto",
                       row_sumsq: Optional[Sequence[torch.Tensor]] = None) -> List[torch.Tensor]:
    """``[newton_schulz(G) for G in mats]`` in 3 grouped launches per step for the whole list (plus 2-3
    small prologue launches per input tensor). Matrices of any shapes and batch dims may be mixed.
    Returned tensors are views into one packed buffer (contiguous, each with its input's shape).

    ``row_sumsq``: for each input G, a contiguous fp32 tensor of shape (G.numel() // G.shape[-1],) holding the sum
    of squares of every row (last dim) of G -- what ``muon_update.momentum_update(..., row_sumsq=True)`` returns
    beside the update it writes. The prologue then takes each matrix's norm from them instead of reading G once
    more (the 2026-04-29 banks: 46 us of four norm passes on an H200). The values are trusted as given
    (``validate=True`` checks them against the inputs, one device sync)."""
    if isinstance(mats, torch.Tensor) or not isinstance(mats, (list, tuple)):
        raise TypeError(f"newton_schulz_many: mats must be a list or tuple of tensors, got {type(mats).__name__} "
                        "(for one tensor call newton_schulz)")
    coeffs = _prepare(list(mats), steps, coefficients, eps, compute_dtype, validate, tiles)
    sumsq = _check_row_sumsq(list(mats), row_sumsq, validate)
    flat = _ns_packed_op(list(mats), coeffs, float(eps), compute_dtype, bool(use_kernel), tiles, sumsq)
    outs, off = [], 0
    for G in mats:
        off = _align(off)
        k = G.numel()
        outs.append(flat[off:off + k].view(G.shape))
        off += k
    return outs
