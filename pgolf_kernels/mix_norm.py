"""A block's input: the residual mix and the RMS norm in one pass, ``xm = m0 ⊙ x + m1 ⊙ x0``, ``h = rms_norm(xm)``.

Math (x, x0 (..., d) of one dtype; mix (2, d) of that dtype, the caller's cast of its fp32 ``resid_mix``)::

    xm = dtype(m0 · x + m1 · x0)              fp32 inside, one rounding
    r  = 1 / sqrt(mean_d(xm²) + eps)          fp32, of the rounded xm; eps = the fp32 machine epsilon
    h  = dtype(xm · r)                         (F.rms_norm without weight or eps, as the model calls it)

``rms_norm_rows(x)`` is the norm alone (xm = x: the MLP's input norm). Both return r (fp32, x.shape[:-1]) to the
backward only.

Backward (gxm = ∂L/∂xm from xm's other uses, gh = ∂L/∂h), fp32: ``mix_rms_norm``'s in one pass (a second Triton
kernel) while the mix needs no gradient (a TTT step), in torch ops otherwise; ``rms_norm_rows``'s in torch ops, traced
into the compiled backward, where Inductor adds the residual stream's gradient in the same pass::

    n    = xm · r
    g    = gxm + r · (gh − n · mean_d(gh ⊙ n))
    ∂x   = dtype(m0 ⊙ g)        ∂x0 = dtype(m1 ⊙ g)
    ∂mix = [Σ_rows g ⊙ x, Σ_rows g ⊙ x0]       only when mix needs a gradient (a global pass, not a TTT step)

Why it exists, and why it is off: it was built on a miscount. In the records' TTT step (64 x 2048 x 512, bf16) the
mix + norm took 0.174 ms a block and the MLP input's norm 0.087 ms on an H100; counted as 268 and 134 MB that read
as 1.54 TB/s against head_norm_rope's 2.8-2.9 TB/s. They move 537 MB (x, x0 read; xm, h written) and 268 MB: ~3.1
TB/s, Inductor's passes were already at the memory's rate. Measured since on an H100 (bench/results/mix-norm-h100.md):
this op forward 0.183 vs 0.185 ms compiled, forward + backward 0.405 vs 0.406 ms, and the step's GPU time unchanged
(``train.model.NORM_KERNEL``, off). Kept as a tested one-pass form of the two norms for callers outside a compiled
region (eager: the forward 0.592 ms of torch ops). Each program reads ``BLOCK_R`` whole rows once, keeps their sums
of squares in registers and writes xm and h once; the backward reads xm, r, ∂h and ∂xm once and writes ∂x (and ∂x0).

Dispatch as every op of the package (``_utils``): CUDA -> Triton, CPU -> the reference, CPU with TRITON_INTERPRET=1
-> the kernel interpreted. ``mix_rms_norm_ref`` and ``rms_norm_ref`` are the torch compositions.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from . import _utils
from ._utils import check, check_tensor, use_triton

__all__ = ["mix_rms_norm", "mix_rms_norm_ref", "rms_norm_rows", "rms_norm_ref", "MixRMSNorm", "NORM_CONFIG",
           "NORM_CONFIGS"]

_FLOATS = (torch.bfloat16, torch.float16, torch.float32)
_EPS = torch.finfo(torch.float32).eps   # what F.rms_norm uses without eps for 16- and 32-bit inputs

# The GPU tile: whole rows per program (BLOCK_R) and warps. 8 rows x 512 columns (4,096 elements, as
# head_norm_rope's 64 x 64 tile that streams at 2.8 TB/s) x 4 warps: 16,384 programs for the records' 131,072 rows.
# ``NORM_CONFIGS`` are the candidates ``bench.bench_mix_norm`` times.
NORM_CONFIG = dict(ROWS=8, num_warps=4)
NORM_CONFIGS = [dict(ROWS=8, num_warps=4), dict(ROWS=4, num_warps=4), dict(ROWS=16, num_warps=4),
                dict(ROWS=16, num_warps=8), dict(ROWS=2, num_warps=2), dict(ROWS=1, num_warps=4)]


def mix_rms_norm_ref(x: Tensor, x0: Tensor, mix: Tensor) -> Tuple[Tensor, Tensor]:
    """The torch composition (what ``train.model.Block`` writes): ``xm = mix[0] * x + mix[1] * x0``, ``rms_norm(xm)``."""
    xm = mix[0] * x + mix[1] * x0
    return xm, F.rms_norm(xm, (xm.shape[-1],))


def rms_norm_ref(x: Tensor) -> Tensor:
    """``F.rms_norm`` over the last dimension, no weight, the default eps."""
    return F.rms_norm(x, (x.shape[-1],))


@triton.jit
def _mix_norm_kernel(X, X0, MIX, XM, H, R, M, D, eps, HAS_MIX: tl.constexpr, BLOCK_R: tl.constexpr,
                     BLOCK_D: tl.constexpr):
    """XM = MIX[0] ⊙ X + MIX[1] ⊙ X0 (HAS_MIX; else XM is X, not written), R = rsqrt(mean(XM²) + eps), H = XM · R over
    BLOCK_R rows of D columns per program."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    mask = (rows[:, None] < M) & cmask[None, :]
    offs = rows[:, None] * D + cols[None, :]
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_MIX:
        m0 = tl.load(MIX + cols, mask=cmask, other=0.0).to(tl.float32)
        m1 = tl.load(MIX + D + cols, mask=cmask, other=0.0).to(tl.float32)
        x0 = tl.load(X0 + offs, mask=mask, other=0.0).to(tl.float32)
        xm = (m0[None, :] * x + m1[None, :] * x0).to(XM.dtype.element_ty)
        tl.store(XM + offs, xm, mask=mask)
        x = xm.to(tl.float32)   # the norm of the stored (rounded) xm: the tensor the backward reads
    r = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / D + eps)
    tl.store(H + offs, (x * r[:, None]).to(H.dtype.element_ty), mask=mask)
    tl.store(R + rows, r, mask=rows < M)


@triton.jit
def _mix_norm_bwd_kernel(XM, R, GH, GXM, MIX, DX, DX0, M, D, HAS_GXM: tl.constexpr, NEED_DX0: tl.constexpr,
                         BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """g = R · (GH − n · mean(GH ⊙ n)) (+ GXM), n = XM · R; DX = MIX[0] ⊙ g (and DX0 = MIX[1] ⊙ g) over BLOCK_R rows."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    mask = (rows[:, None] < M) & cmask[None, :]
    offs = rows[:, None] * D + cols[None, :]
    r = tl.load(R + rows, mask=rows < M, other=0.0)
    n = tl.load(XM + offs, mask=mask, other=0.0).to(tl.float32) * r[:, None]
    gh = tl.load(GH + offs, mask=mask, other=0.0).to(tl.float32)
    g = r[:, None] * (gh - n * (tl.sum(gh * n, axis=1) / D)[:, None])
    if HAS_GXM:
        g += tl.load(GXM + offs, mask=mask, other=0.0).to(tl.float32)
    m0 = tl.load(MIX + cols, mask=cmask, other=0.0).to(tl.float32)
    tl.store(DX + offs, (m0[None, :] * g).to(DX.dtype.element_ty), mask=mask)
    if NEED_DX0:
        m1 = tl.load(MIX + D + cols, mask=cmask, other=0.0).to(tl.float32)
        tl.store(DX0 + offs, (m1[None, :] * g).to(DX0.dtype.element_ty), mask=mask)


def _tile_rows(x: Tensor, block_d: int, cfg: dict) -> int:
    # the tile's rows at d 512 (fewer where d is wider: the elements per program stay at most ROWS x 512); 4 rows in
    # the interpreter (the CPU lane)
    return max(1, min(cfg["ROWS"], cfg["ROWS"] * 512 // block_d)) if x.is_cuda else 4


def _launch(x: Tensor, x0: Optional[Tensor], mix: Optional[Tensor], config: Optional[dict] = None):
    d = x.shape[-1]
    M = x.numel() // d
    x = x.contiguous()
    h = _utils.empty(x.shape, x.dtype, x.device)
    r = _utils.empty(x.shape[:-1], torch.float32, x.device)
    xm = _utils.empty(x.shape, x.dtype, x.device) if mix is not None else x
    block_d = triton.next_power_of_2(d)
    cfg = dict(NORM_CONFIG if config is None else config)
    rows = _tile_rows(x, block_d, cfg)
    _mix_norm_kernel[(triton.cdiv(M, rows),)](
        x, x if x0 is None else x0.contiguous(), x if mix is None else mix.contiguous(), xm, h, r, M, d, _EPS,
        HAS_MIX=mix is not None, BLOCK_R=rows, BLOCK_D=block_d, num_warps=cfg["num_warps"])
    return xm, h, r


def _launch_bwd(xm: Tensor, r: Tensor, gh: Tensor, gxm: Optional[Tensor], mix: Tensor, need_dx0: bool,
                config: Optional[dict] = None) -> Tuple[Tensor, Optional[Tensor]]:
    d = xm.shape[-1]
    M = xm.numel() // d
    gh = gh.contiguous()
    dx = _utils.empty(xm.shape, xm.dtype, xm.device)
    dx0 = _utils.empty(xm.shape, xm.dtype, xm.device) if need_dx0 else None
    block_d = triton.next_power_of_2(d)
    cfg = dict(NORM_CONFIG if config is None else config)
    rows = _tile_rows(xm, block_d, cfg)
    _mix_norm_bwd_kernel[(triton.cdiv(M, rows),)](
        xm, r, gh, gh if gxm is None else gxm.contiguous(), mix.contiguous(), dx, dx if dx0 is None else dx0, M, d,
        HAS_GXM=gxm is not None, NEED_DX0=need_dx0, BLOCK_R=rows, BLOCK_D=block_d, num_warps=cfg["num_warps"])
    return dx, dx0


def _norm_ref_with_r(xm: Tensor) -> Tuple[Tensor, Tensor]:
    r = torch.rsqrt(xm.float().square().mean(-1) + _EPS)
    return (xm.float() * r[..., None]).to(xm.dtype), r


@torch.library.custom_op("pgolf::mix_rms_norm", mutates_args=())
def _mix_op(x: Tensor, x0: Tensor, mix: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    if use_triton(x):
        return _launch(x, x0, mix)
    xm = (mix[0].float() * x.float() + mix[1].float() * x0.float()).to(x.dtype)
    return (xm, *_norm_ref_with_r(xm))


@_mix_op.register_fake
def _mix_fake(x, x0, mix):
    return torch.empty_like(x), torch.empty_like(x), x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("pgolf::rms_norm_rows", mutates_args=())
def _norm_op(x: Tensor) -> Tuple[Tensor, Tensor]:
    if use_triton(x):
        _, h, r = _launch(x, None, None)
        return h, r
    return _norm_ref_with_r(x)


@_norm_op.register_fake
def _norm_fake(x):
    return torch.empty_like(x), x.new_empty(x.shape[:-1], dtype=torch.float32)


def _norm_grad(xm: Tensor, r: Tensor, gh: Tensor) -> Tensor:
    """fp32 ∂L/∂xm through the norm: r · (gh − n · mean_d(gh ⊙ n)), n = xm · r."""
    n = xm.float() * r[..., None]
    g = gh.float()
    return r[..., None] * (g - n * (g * n).mean(-1, keepdim=True))


def _mix_grad(xm: Tensor, r: Tensor, gh: Tensor, gxm: Optional[Tensor]) -> Tensor:
    """fp32 ∂L/∂xm in all: the norm's term plus xm's own gradient (when given). The torch form of the backward
    kernel's g."""
    g = _norm_grad(xm, r, gh)
    return g if gxm is None else g + gxm.float()


@torch.library.custom_op("pgolf::mix_rms_norm_bwd", mutates_args=())
def _mix_bwd_op(xm: Tensor, r: Tensor, gh: Tensor, gxm: Optional[Tensor], mix: Tensor,
                need_dx0: bool) -> List[Tensor]:
    """[∂x] or [∂x, ∂x0] (need_dx0) of ``mix_rms_norm`` from ∂h and (when given) ∂xm: the backward's one pass."""
    if use_triton(xm):
        dx, dx0 = _launch_bwd(xm, r, gh, gxm, mix, need_dx0)
        return [dx, dx0] if need_dx0 else [dx]
    g, m = _mix_grad(xm, r, gh, gxm), mix.float()
    return [(m[0] * g).to(xm.dtype)] + ([(m[1] * g).to(xm.dtype)] if need_dx0 else [])


@_mix_bwd_op.register_fake
def _mix_bwd_fake(xm, r, gh, gxm, mix, need_dx0):
    return [torch.empty_like(xm) for _ in range(2 if need_dx0 else 1)]


def _mix_setup(ctx, inputs, output):
    x, x0, mix = inputs
    xm, _, r = output
    keep = ctx.needs_input_grad[2]
    ctx.save_for_backward(xm, r, mix, x if keep else None, x0 if keep else None)


def _mix_backward(ctx, gxm: Optional[Tensor], gh: Optional[Tensor], _gr):
    xm, r, mix, x, x0 = ctx.saved_tensors
    need = ctx.needs_input_grad
    if gh is None:  # h unused: only xm's gradient, no norm term
        gh = torch.zeros_like(xm)
    if not need[2]:
        # a TTT step (the base's mix frozen): one pass, ∂x0 only when x0 needs it
        out = _mix_bwd_op(xm, r, gh, gxm, mix, bool(need[1]))
        return (out[0] if need[0] else None), (out[1] if need[1] else None), None
    # the mix trained too (a global pass through FusedBase): its row sums need g itself, so torch ops here
    g, m = _mix_grad(xm, r, gh, gxm), mix.float()
    d = g.shape[-1]
    g2 = g.reshape(-1, d)
    dmix = torch.stack(((g2 * x.reshape(-1, d).float()).sum(0),
                        (g2 * x0.reshape(-1, d).float()).sum(0))).to(mix.dtype)
    return ((m[0] * g).to(xm.dtype) if need[0] else None), ((m[1] * g).to(xm.dtype) if need[1] else None), dmix


_mix_op.register_autograd(_mix_backward, setup_context=_mix_setup)


def _norm_setup(ctx, inputs, output):
    (x,) = inputs
    _, r = output
    ctx.save_for_backward(x, r)


def _norm_backward(ctx, gh: Optional[Tensor], _gr):
    x, r = ctx.saved_tensors
    if gh is None:
        return None
    return _norm_grad(x, r, gh).to(x.dtype)


_norm_op.register_autograd(_norm_backward, setup_context=_norm_setup)


def _check_x(x: Tensor, op: str) -> None:
    check_tensor(x, "x", dtype=_FLOATS, op=op)
    check(x.dim() >= 1 and x.shape[-1] >= 1, lambda: f"{op}: x must have a last dimension d >= 1, got "
                                                      f"{tuple(x.shape)}")
    check(x.is_contiguous(), lambda: f"{op}: x must be contiguous, got strides {x.stride()}")


def mix_rms_norm(x: Tensor, x0: Tensor, mix: Tensor, *, validate: bool = True) -> Tuple[Tensor, Tensor]:
    """``(xm, h)``: ``xm = mix[0] ⊙ x + mix[1] ⊙ x0`` and ``h = rms_norm(xm)`` (x, x0 (..., d) contiguous, one dtype
    of bf16 / fp16 / fp32; mix (2, d) of that dtype), with gradients to all three; one kernel forward.
    ``validate=False`` skips the argument checks (a caller whose tensors match by construction)."""
    if validate:
        op = "mix_rms_norm"
        _check_x(x, op)
        check_tensor(x0, "x0", dtype=x.dtype, device=x.device, op=op)
        check(x0.shape == x.shape, lambda: f"{op}: x0 must have x's shape {tuple(x.shape)}, got {tuple(x0.shape)}")
        check(x0.is_contiguous(), lambda: f"{op}: x0 must be contiguous, got strides {x0.stride()}")
        check_tensor(mix, "mix", dtype=x.dtype, ndim=2, device=x.device, op=op)
        check(tuple(mix.shape) == (2, x.shape[-1]), lambda: f"{op}: mix must be (2, d) = (2, {x.shape[-1]}), got "
                                                            f"{tuple(mix.shape)}")
    xm, h, _ = _mix_op(x, x0, mix)
    return xm, h


def rms_norm_rows(x: Tensor, *, validate: bool = True) -> Tensor:
    """``F.rms_norm(x, (d,))`` (x (..., d) contiguous, bf16 / fp16 / fp32), one kernel forward, its gradient to x."""
    if validate:
        _check_x(x, "rms_norm_rows")
    h, _ = _norm_op(x)
    return h


class MixRMSNorm(torch.nn.Module):
    """A block's input mix with its own ``resid_mix`` (2, d), initialized as the records' (ones, zeros):
    ``forward(x, x0) = (xm, rms_norm(xm))`` with ``xm = resid_mix[0] ⊙ x + resid_mix[1] ⊙ x0`` (the mix cast to x's
    dtype), through ``mix_rms_norm``."""

    def __init__(self, d: int):
        super().__init__()
        check(isinstance(d, int) and not isinstance(d, bool) and d >= 1, lambda: f"MixRMSNorm: d must be an int >= 1, "
                                                                               f"got {d!r}")
        self.resid_mix = torch.nn.Parameter(torch.stack((torch.ones(d), torch.zeros(d))))

    def forward(self, x: Tensor, x0: Tensor) -> Tuple[Tensor, Tensor]:
        return mix_rms_norm(x, x0, self.resid_mix.to(x.dtype))
