"""Per-head RMSNorm, gain and rotary embedding of q or k in one pass: the attention's input preparation.

Math (x the projection's output (B, T, H·D), viewed per head as x[b, t, h] of length D; P = D / 2; the
rotary tables cos, sin are (T, P); g (H,) an optional per-head gain, 1 without)::

    r       = (mean_d x² + eps)^(-1/2)                            fp32 (the row's RMS over the head's D values)
    n       = g_h · r · x                                          (D,)
    y[:P]   = n[:P] ⊙ cos_t + n[P:] ⊙ sin_t                        rotate the pairs (n[i], n[P + i]) by angle θ_t,i
    y[P:]   = n[P:] ⊙ cos_t − n[:P] ⊙ sin_t
    out[b, h, t] = x.dtype(y)                                     (B, H, T, D), one rounding; in memory contiguous
                                                                   ("bhtd") or as (B, T, H, D) ("bthd", see below)

Backward (dy = ∂L/∂out, (B, H, T, D); the rotation's transpose, then the RMSNorm's Jacobian)::

    dn[:P]  = dy[:P] ⊙ cos_t − dy[P:] ⊙ sin_t
    dn[P:]  = dy[:P] ⊙ sin_t + dy[P:] ⊙ cos_t
    dx      = g_h · r · (dn − x · r² · (Σ_d dn ⊙ x) / D)          (B, T, H·D), x's layout
    dg_h    = Σ_{b, t, d} r · x ⊙ dn                               fp32 partial sums per program, added in a fixed
                                                                   order

It is the composition of this package's model (``train.model.CausalSelfAttention``: ``rms_norm`` over the head dim,
``* q_gain`` for q, ``apply_rotary`` over the whole head dim, the (B, T, H, D) -> (B, H, T, D) transpose for SDPA),
computed in fp32 from x's values and rounded once, where the composition rounds after each op. (The 2026-04-29
record rotates only the first 16 of its 64 head dims; that partial rotary is not covered.) ``eps`` defaults to what
``F.rms_norm`` uses without one: the fp32 machine epsilon for 16- and 32-bit inputs (its accumulation type's).

Why: in the records' TTT step (64 × 2048 positions, 8 q heads and 4 k heads of 64), Inductor compiles this
composition into separate reduction and point-wise passes; on one H200 (kernel path, measurement 6 of
``bench/results/profile-ttt-h200.md``) the forward's point-wise passes over q and k took 3.35 + 1.06 ms per step
and the backward's 1.56 ms, moving ~0.27 GB per layer at ~0.8-1.3 TB/s. One program here reads a (BLOCK_T, D)
tile of one head once, keeps the row's RMS in registers and writes the rotated tile once: x read once and out
written once (q: 2 × 134 MB per layer). Measured on an H100 (``bench/results/head-norm-rope-h100.md``): q forward
0.099 ms against 0.145 ms for the composition under torch.compile (2.7 TB/s), q forward + backward 0.683 vs 0.764 ms,
k forward + backward 0.426 vs 0.369 ms (slower; these forward + backward rows were timed as eager calls, which
look host-bound), the attention path (q / k prep, causal SDPA and the output reshape, forward + backward) 3.32 vs
3.68 ms; inside the records' TTT step (``profile-ttt-h100.md``) the
kernel path went from 112.81 to 103.32 ms per step. The TTT engine runs it by default on the kernel path
(``TTTConfig.fused_qk`` None: auto; ``--fused-qk on|off``).

Dispatch: CUDA -> the Triton kernels; CPU -> the torch reference, or the kernels under TRITON_INTERPRET=1 (the CPU
test lane), as every op of the package.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _utils
from ._utils import check, check_tensor, use_triton

_OP = "head_norm_rope"
_FLOAT = (torch.float16, torch.bfloat16, torch.float32)


def default_eps(dtype: torch.dtype) -> float:
    """The eps ``F.rms_norm`` adds when given none: the machine epsilon of its accumulation type (fp32 for 16-bit
    inputs, checked by ``tests/test_head_norm_rope.py`` against torch)."""
    return torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps


def _tables(cos: Tensor, sin: Tensor, T: int, P: int) -> Tuple[Tensor, Tensor]:
    """The rotary tables as contiguous (T, P) views ((1, 1, T, P) as ``train.model.Rotary`` returns them)."""
    return cos.reshape(T, P).contiguous(), sin.reshape(T, P).contiguous()


def head_norm_rope_ref(x: Tensor, cos: Tensor, sin: Tensor, num_heads: int, gain: Optional[Tensor] = None,
                       eps: Optional[float] = None) -> Tensor:
    """Torch reference, the record models' composition op by op (each op rounds to x.dtype):
    ``rms_norm`` over the head dim, ``* gain``, the rotary of ``train.model.apply_rotary``; (B, H, T, D) out."""
    B, T, HD = x.shape
    D = HD // num_heads
    P = D // 2
    q = x.reshape(B, T, num_heads, D).transpose(1, 2)
    q = torch.nn.functional.rms_norm(q, (D,), eps=default_eps(x.dtype) if eps is None else eps)
    if gain is not None:
        q = q * gain.to(x.dtype)[None, :, None, None]
    c, s = (t.reshape(1, 1, T, P).to(x.dtype) for t in (cos, sin))
    q1, q2 = q[..., :P], q[..., P:]
    return torch.cat((q1 * c + q2 * s, q2 * c - q1 * s), dim=-1).contiguous()


@triton.jit
def _tile(X, COS, SIN, T, sxb, sxt, sob, soh, sot, eps, P: tl.constexpr, BT: tl.constexpr):
    """Program (t-tile, h, b)'s rows: both halves of x (fp32), the tables, each row's r = (mean x² + eps)^(-1/2),
    the row mask, and the offsets of this tile in x and in the output (strides sob, soh, sot of its b, h, t)."""
    pt = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    rt = pt * BT + tl.arange(0, BT)
    rp = tl.arange(0, P)
    m2 = (rt < T)[:, None]
    rt64 = rt[:, None].to(tl.int64)
    xo = b * sxb + rt64 * sxt + h * (2 * P) + rp[None, :]
    x1 = tl.load(X + xo, mask=m2, other=0.0).to(tl.float32)
    x2 = tl.load(X + xo + P, mask=m2, other=0.0).to(tl.float32)
    to = rt[:, None] * P + rp[None, :]
    c = tl.load(COS + to, mask=m2, other=0.0).to(tl.float32)
    s = tl.load(SIN + to, mask=m2, other=0.0).to(tl.float32)
    r = 1.0 / tl.sqrt((tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / (2 * P) + eps)
    ho = b * sob + h * soh + rt64 * sot + rp[None, :]
    return x1, x2, c, s, r, m2, rt64, ho


@triton.jit(do_not_specialize=["T"])
def _head_norm_rope_fwd_kernel(X, COS, SIN, G, Y, T, sxb, sxt, sob, soh, sot, eps, HAS_GAIN: tl.constexpr,
                               P: tl.constexpr, BT: tl.constexpr):
    """One (BT, D) tile of head h of batch row b: both halves loaded once, the RMS, gain and rotation in fp32."""
    x1, x2, c, s, r, m2, rt64, yo = _tile(X, COS, SIN, T, sxb, sxt, sob, soh, sot, eps, P, BT)
    if HAS_GAIN:
        r = r * tl.load(G + tl.program_id(1)).to(tl.float32)
    n1 = x1 * r[:, None]
    n2 = x2 * r[:, None]
    dt = Y.dtype.element_ty
    tl.store(Y + yo, (n1 * c + n2 * s).to(dt), mask=m2)
    tl.store(Y + yo + P, (n2 * c - n1 * s).to(dt), mask=m2)


# T and n_tiles not specialized (masks and the partial sums' row, not alignment): one build per gain variant, not one
# per class of window length; case (c)'s warm-up built this kernel 4 times (H200, bench/results/warmup-h200.md)
@triton.jit(do_not_specialize=["T", "n_tiles"])
def _head_norm_rope_bwd_kernel(DY, X, COS, SIN, G, DX, DG, T, H, sxb, sxt, sob, soh, sot, sdb, sdt, n_tiles, eps,
                               HAS_GAIN: tl.constexpr, NEED_DG: tl.constexpr, P: tl.constexpr, BT: tl.constexpr):
    """dx of one (BT, D) tile of head h (dx contiguous (B, T, H·D); x may be batch- or row-strided), and this tile's
    share of dg_h (DG[b, tile, h], fp32)."""
    x1, x2, c, s, r, m2, rt64, yo = _tile(X, COS, SIN, T, sxb, sxt, sob, soh, sot, eps, P, BT)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    d1 = tl.load(DY + yo, mask=m2, other=0.0).to(tl.float32)
    d2 = tl.load(DY + yo + P, mask=m2, other=0.0).to(tl.float32)
    dn1 = d1 * c - d2 * s                                             # the rotation's transpose
    dn2 = d1 * s + d2 * c
    dot = tl.sum(dn1 * x1, 1) + tl.sum(dn2 * x2, 1)                  # Σ_d dn ⊙ x per row
    g = 1.0
    if HAS_GAIN:
        g = tl.load(G + h).to(tl.float32)
    if NEED_DG:
        tl.store(DG + (b * n_tiles + tl.program_id(0)) * H + h, tl.sum(r * dot, 0))
    k = (r * r * dot / (2 * P))[:, None]
    gr = (g * r)[:, None]
    do = b * sdb + rt64 * sdt + h * (2 * P) + tl.arange(0, P)[None, :]
    dt = DX.dtype.element_ty
    tl.store(DX + do, (gr * (dn1 - x1 * k)).to(dt), mask=m2)
    tl.store(DX + do + P, (gr * (dn2 - x2 * k)).to(dt), mask=m2)


# 64 rows x head_dim per program: 4,096 values per operand at the records' head dim 64 (4 warps on a GPU). The CPU
# lane's interpreter costs per program, not per element: 64 rows ran the fused-qk eval test in 13.8 s, 16 rows in 41.6 s
_BT = 64


def _rows_unit_stride(x: Tensor) -> Tensor:
    """x itself when each row's H·D values are contiguous (the kernels take its batch and position strides), else a
    contiguous copy (``validate=False`` callers skip the check that refuses such an x)."""
    return x if x.shape[2] <= 1 or x.stride(2) == 1 else x.contiguous()


def _out_shape(B: int, T: int, H: int, D: int, layout: str) -> Tuple[int, int, int, int]:
    """The op's own output: (B, H, T, D) for ``"bhtd"``, (B, T, H, D) for ``"bthd"``, contiguous either way."""
    return (B, H, T, D) if layout == "bhtd" else (B, T, H, D)


def _bhtd_strides(out: Tensor, layout: str) -> Tuple[int, int, int]:
    """The strides of b, h and t in the op's output (or in a gradient of its shape)."""
    return (out.stride(0), out.stride(1), out.stride(2)) if layout == "bhtd" else \
        (out.stride(0), out.stride(2), out.stride(1))


def _fwd_launch(x: Tensor, cos: Tensor, sin: Tensor, gain: Optional[Tensor], num_heads: int, eps: float,
                layout: str = "bhtd") -> Tensor:
    x = _rows_unit_stride(x)
    B, T, HD = x.shape
    P = HD // num_heads // 2
    c, s = _tables(cos, sin, T, P)
    y = _utils.empty(_out_shape(B, T, num_heads, 2 * P, layout), x.dtype, x.device)
    grid = (triton.cdiv(T, _BT), num_heads, B)
    _head_norm_rope_fwd_kernel[grid](x, c, s, gain if gain is not None else c, y, T, x.stride(0), x.stride(1),
                                     *_bhtd_strides(y, layout), float(eps), HAS_GAIN=gain is not None, P=P, BT=_BT,
                                     num_warps=4)
    return y


def _bwd_launch(dy: Tensor, x: Tensor, cos: Tensor, sin: Tensor, gain: Optional[Tensor], num_heads: int,
                eps: float, need_dg: bool, layout: str = "bhtd") -> Tuple[Tensor, Tensor]:
    x = _rows_unit_stride(x)
    B, T, HD = x.shape
    P = HD // num_heads // 2
    c, s = _tables(cos, sin, T, P)
    if dy.stride(-1) != 1:  # read in place in any order with unit stride along D (the kernel takes its strides)
        dy = dy.contiguous()
    dx = _utils.empty(x.shape, x.dtype, x.device)  # contiguous, whatever x's strides
    n_tiles = triton.cdiv(T, _BT)
    part = _utils.empty((B, n_tiles, num_heads), torch.float32, x.device) if need_dg else c
    _head_norm_rope_bwd_kernel[(n_tiles, num_heads, B)](
        dy, x, c, s, gain if gain is not None else c, dx, part, T, num_heads, x.stride(0), x.stride(1),
        *_bhtd_strides(dy, layout), dx.stride(0), dx.stride(1), n_tiles, float(eps), HAS_GAIN=gain is not None,
        NEED_DG=need_dg, P=P, BT=_BT, num_warps=4)
    dg = part.sum((0, 1)).to(gain.dtype) if need_dg else x.new_empty(0)
    return dx, dg


def _bwd_ref(dy: Tensor, x: Tensor, cos: Tensor, sin: Tensor, gain: Optional[Tensor], num_heads: int, eps: float,
             need_dg: bool, layout: str = "bhtd") -> Tuple[Tensor, Tensor]:
    """The backward's formulas in fp32 torch ops (the CPU path without the interpreter); dy in the op's output
    shape."""
    B, T, HD = x.shape
    D = HD // num_heads
    P = D // 2
    xf = x.float().reshape(B, T, num_heads, D).transpose(1, 2)
    d = (dy if layout == "bhtd" else dy.transpose(1, 2)).float()
    c, s = (t.reshape(1, 1, T, P).float() for t in (cos, sin))
    dn = torch.cat((d[..., :P] * c - d[..., P:] * s, d[..., :P] * s + d[..., P:] * c), -1)
    r = torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    dot = (dn * xf).sum(-1, keepdim=True)
    g = gain.float()[None, :, None, None] if gain is not None else 1.0
    dx = (g * r * (dn - xf * r * r * dot / D)).transpose(1, 2).reshape(B, T, HD).to(x.dtype)
    dg = (r * dot).sum((0, 2, 3)).to(gain.dtype) if need_dg else x.new_empty(0)
    return dx, dg


@torch.library.custom_op("pgolf::head_norm_rope", mutates_args=())
def _op(x: Tensor, cos: Tensor, sin: Tensor, gain: Optional[Tensor], num_heads: int, eps: float,
        layout: str) -> Tensor:
    """The output contiguous in ``layout``'s order ((B, H, T, D) or (B, T, H, D)); ``head_norm_rope`` returns the
    second as its (B, H, T, D) view."""
    if use_triton(x):
        return _fwd_launch(x, cos, sin, gain, num_heads, eps, layout)
    y = head_norm_rope_ref(x, cos, sin, num_heads, gain, eps)
    return y if layout == "bhtd" else y.transpose(1, 2).contiguous()


@_op.register_fake
def _op_fake(x, cos, sin, gain, num_heads, eps, layout):
    B, T, HD = x.shape
    return x.new_empty(_out_shape(B, T, num_heads, HD // num_heads, layout))


@torch.library.custom_op("pgolf::head_norm_rope_bwd", mutates_args=())
def _bwd_op(dy: Tensor, x: Tensor, cos: Tensor, sin: Tensor, gain: Optional[Tensor], num_heads: int, eps: float,
            need_dg: bool, layout: str) -> Tuple[Tensor, Tensor]:
    """(dx, dg or an empty tensor); dy in the forward op's output shape."""
    if use_triton(x):
        return _bwd_launch(dy, x, cos, sin, gain, num_heads, eps, need_dg, layout)
    return _bwd_ref(dy, x, cos, sin, gain, num_heads, eps, need_dg, layout)


@_bwd_op.register_fake
def _bwd_fake(dy, x, cos, sin, gain, num_heads, eps, need_dg, layout):
    return torch.empty_like(x), (gain.new_empty(gain.shape) if need_dg else x.new_empty(0))


def _setup(ctx, inputs, output):
    x, cos, sin, gain, num_heads, eps, layout = inputs
    ctx.num_heads, ctx.eps, ctx.layout, ctx.has_gain = num_heads, eps, layout, gain is not None
    ctx.save_for_backward(x, cos, sin, gain)


def _backward(ctx, dy):
    x, cos, sin, gain = ctx.saved_tensors
    need_dg = ctx.has_gain and ctx.needs_input_grad[3]
    dx, dg = _bwd_op(dy, x, cos, sin, gain, ctx.num_heads, ctx.eps, need_dg, ctx.layout)
    return (dx if ctx.needs_input_grad[0] else None), None, None, (dg if need_dg else None), None, None, None


_op.register_autograd(_backward, setup_context=_setup)


LAYOUTS = ("bhtd", "bthd")


def check_args(x, cos, sin, num_heads, gain=None, eps=None, layout="bhtd") -> None:
    """Refuse bad input by name before any launch."""
    check(layout in LAYOUTS, lambda: f"{_OP}: layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    check_tensor(x, "x", dtype=_FLOAT, ndim=3, op=_OP)
    # unit stride along each row's H·D values; the batch and position strides are free (a slice of a fused QKV
    # projection's output is read in place)
    check(x.shape[2] <= 1 or x.stride(2) == 1,
          lambda: f"{_OP}: x must have unit stride in its last dim (a row's H·D values contiguous), got strides "
                  f"{x.stride()}; call .contiguous() first")
    check(isinstance(num_heads, int) and not isinstance(num_heads, bool) and num_heads >= 1,
          lambda: f"{_OP}: num_heads must be an int >= 1, got {num_heads!r}", TypeError)
    B, T, HD = x.shape
    check(HD % num_heads == 0, lambda: f"{_OP}: x's last dim ({HD}) must be num_heads ({num_heads}) x head_dim")
    D = HD // num_heads
    P = D // 2
    check(D % 2 == 0 and P >= 1 and (P & (P - 1)) == 0,
          lambda: f"{_OP}: head_dim = {D} (x's last dim / num_heads) must be twice a power of two (2, 4, ..., 64, 128, "
                  f"...): the kernels rotate its two halves as power-of-two tiles")
    for name, t in (("cos", cos), ("sin", sin)):
        check_tensor(t, name, dtype=_FLOAT, device=x.device, op=_OP)
        check(t.dim() >= 2 and t.shape[-2:] == (T, P) and t.numel() == T * P,
              lambda: f"{_OP}: {name} must be the rotary table of shape (T, head_dim/2) = ({T}, {P}) (leading dims of "
                      f"size 1 allowed), got {tuple(t.shape)}")
    if gain is not None:
        check_tensor(gain, "gain", dtype=_FLOAT, ndim=1, device=x.device, op=_OP)
        check(gain.shape[0] == num_heads, lambda: f"{_OP}: gain must have shape (num_heads,) = ({num_heads},), "
                                                  f"got {tuple(gain.shape)}")
    check(eps is None or (isinstance(eps, (int, float)) and 0 <= eps < math.inf),
          lambda: f"{_OP}: eps must be a finite float >= 0 or None, got {eps!r}", TypeError)


def head_norm_rope(x: Tensor, cos: Tensor, sin: Tensor, num_heads: int, gain: Optional[Tensor] = None, *,
                   eps: Optional[float] = None, layout: str = "bhtd", validate: bool = True) -> Tensor:
    """RMSNorm over each head's D values of ``x`` (B, T, num_heads·D), unit stride in its last dim, times ``gain[h]``
    when given, then the rotary embedding with tables ``cos``, ``sin`` (T, D/2) (or (1, 1, T, D/2)); returns
    (B, num_heads, T, D) in x's dtype (bf16, fp16 or fp32). Differentiable in x and gain. ``eps`` (default: as
    ``F.rms_norm``'s) is added to the mean square.

    ``layout``: the memory order of the result. ``"bhtd"`` (default): contiguous. ``"bthd"``: a (B, H, T, D) view of a
    contiguous (B, T, H, D) tensor, the order of the projection's own output (``x.view(B, T, H, D).transpose(1, 2)``,
    as v usually reaches attention). cuDNN's SDPA allocates its output in q's order (ATen's
    ``alloc_with_matching_layout``), so with ``"bthd"`` the usual ``y.transpose(1, 2).reshape(B, T, H·D)`` after
    attention is a view instead of a copy, and the gradients come back in that order too."""
    if validate:
        check_args(x, cos, sin, num_heads, gain, eps, layout)
    e = default_eps(x.dtype) if eps is None else float(eps)
    y = _op(x, cos, sin, gain, int(num_heads), e, layout)
    return y if layout == "bhtd" else y.transpose(1, 2)


class HeadNormRope(torch.nn.Module):
    """Drop-in for the attention's ``rms_norm(q) * gain`` + ``apply_rotary`` on (B, T, H·D) projections: holds the
    optional per-head gain (``gain=True``: a learned (num_heads,) parameter initialized to ``gain_init``)."""

    def __init__(self, num_heads: int, head_dim: int, gain: bool = False, gain_init: float = 1.0,
                 eps: Optional[float] = None, layout: str = "bhtd", device=None):
        super().__init__()
        self.num_heads, self.head_dim, self.eps, self.layout = num_heads, head_dim, eps, layout
        self.gain = torch.nn.Parameter(torch.full((num_heads,), float(gain_init), device=device)) if gain else None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        g = self.gain.to(x.dtype) if self.gain is not None else None
        return head_norm_rope(x, cos, sin, self.num_heads, g, eps=self.eps, layout=self.layout)
