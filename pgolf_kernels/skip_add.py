"""The record models' U-Net skip, ``out = x + w ⊙ s``, forward and backward each in one vectorized pass.

Math (x, s (..., d) of one dtype; w (d,) in that dtype, the caller's cast of its fp32 skip weight)::

    out = dtype(x + w · s)            fp32 inside, one rounding (as torch.addcmul)

Backward (g = ∂L/∂out)::

    ∂x = g                            the same tensor, no pass
    ∂s = dtype(w ⊙ g)                 one pass
    ∂w = Σ_rows fp32(g ⊙ s)           only when w needs a gradient (torch ops: the global SGD pass, not a TTT step)

Why: ``train.model.GPT.hidden`` adds each encoder output to a decoder input outside the compiled blocks. In the
records' TTT step on an H100 (bench/results/profile-ttt-h100.md, measurement 12; 64 x 2048 x 512 bf16) torch's
kernels for it took 0.999 ms for the 5 ``addcmul`` (0.200 ms each for 403 MB: 2.0 TB/s) and 0.866 ms for the 5
products w ⊙ g of the backward (0.173 ms each for 268 MB: 1.55 TB/s): with a broadcast (d,) operand aten's
element-wise kernel leaves its vectorized path. Here each program streams ``BLOCK_R`` whole rows with w loaded once.

A U-Net through the op pays two more passes in the backward: the encoder output e feeds the next encoder block and
the skip, so autograd sums its two gradients (one ``add_`` pass, 0.13 ms per skip in that step, after the 0.09 ms
product w ⊙ g). ``skip_fork`` / ``skip_join`` hand the skip over as ``ScaledSkip`` (e stored unscaled, standing for
w ⊙ e) and form e's gradient in one pass::

    skip_fork(e, w) -> (a, ScaledSkip(t, w))      a = e, t = e (views: no pass)
    skip_join(x, ScaledSkip(t, w)) = x + w ⊙ t    one pass (as ``skip_add``)
    ∂x = g,  ∂t = g                               no pass: t stands for w ⊙ e, so its gradient is unscaled
    ∂e = ∂a + w ⊙ ∂t                              one pass (the fork's backward: ``skip_add`` applied to gradients)
    ∂w = Σ_rows fp32(∂t ⊙ e)                      the fork's, only when w needs a gradient (torch ops)

The pair is the composition ``addcmul(x, w, e)`` with e also used elsewhere; e's two gradients meet in the fork's
backward instead of autograd's sum, so autograd's add_ pass goes: in the records' step on an H100 the 5 add_ passes
took 0.646 ms and the skip kernel 0.17 ms more with the fork, the step's GPU time outside attention 0.45 ms less
(``train.model.SKIP_FORK``, on by default; bench/results/profile-ttt-h100.md measurement 18).

``skip_join_inline`` is the join as torch ops with the same gradients, for inside a ``torch.compile`` region: there
Inductor fuses x + w ⊙ t into the pass that reads x next (a decoder block's residual mix and norm), so the join's own
pass (0.121 ms in that step, 403 MB) becomes one more read of t in a pass that reads x and x0 anyway
(``train.model.JOIN_FOLD``, on by default: in that step on an H100 the 5 join passes, 0.601 ms, went and the
mix + norm took 0.151 ms more, the step's GPU time outside attention 0.48 ms less; profile-ttt-h100.md measurement 19).

Dispatch as every op of the package (``_utils``): CUDA -> Triton, CPU -> the reference, CPU with TRITON_INTERPRET=1
-> the kernel interpreted. ``skip_add_ref`` is the torch composition.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _utils
from ._utils import check, check_tensor, use_triton

__all__ = ["skip_add", "skip_add_ref", "UNetSkip", "ScaledSkip", "skip_fork", "skip_join", "skip_join_inline"]

_OP = "skip_add"
_FLOATS = (torch.bfloat16, torch.float16, torch.float32)


def skip_add_ref(x: Tensor, w: Tensor, s: Tensor) -> Tensor:
    """The torch composition (what ``GPT.hidden`` writes): ``torch.addcmul(x, w, s)``."""
    return torch.addcmul(x, w, s)


@triton.jit
def _skip_kernel(X, W, S, Y, M, D, HAS_X: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Y = (X +) W ⊙ S over BLOCK_R rows of D columns per program (HAS_X False: the backward's w ⊙ g)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < M) & (cols[None, :] < D)
    offs = rows[:, None] * D + cols[None, :]
    w = tl.load(W + cols, mask=cols < D, other=0.0).to(tl.float32)
    y = w[None, :] * tl.load(S + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_X:
        y += tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


def _launch(x: Optional[Tensor], w: Tensor, s: Tensor) -> Tensor:
    d = s.shape[-1]
    M = s.numel() // d
    y = _utils.empty(s.shape, s.dtype, s.device)
    block_d = triton.next_power_of_2(d)
    # 16 KB of each operand per program at d 512 in bf16 (16 rows): 8,192 programs for the records' 131,072 rows
    block_r = max(1, min(16, 8192 // block_d)) if s.is_cuda else 4
    _skip_kernel[(triton.cdiv(M, block_r),)](s if x is None else x, w, s, y, M, d, HAS_X=x is not None,
                                             BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4)
    return y


@torch.library.custom_op("pgolf::skip_scale", mutates_args=())
def _scale_op(w: Tensor, g: Tensor) -> Tensor:
    """w ⊙ g (the backward's ∂s)."""
    if use_triton(g):
        return _launch(None, w, g)
    return g * w


@_scale_op.register_fake
def _scale_fake(w, g):
    return torch.empty_like(g)


@torch.library.custom_op("pgolf::skip_add", mutates_args=())
def _op(x: Tensor, w: Tensor, s: Tensor) -> Tensor:
    if use_triton(x):
        return _launch(x, w, s)
    return skip_add_ref(x, w, s)


@_op.register_fake
def _op_fake(x, w, s):
    return torch.empty_like(x)


def _setup(ctx, inputs, output):
    x, w, s = inputs
    ctx.save_for_backward(w, s if ctx.needs_input_grad[1] else None)


def _backward(ctx, g: Tensor):
    w, s = ctx.saved_tensors
    need = ctx.needs_input_grad
    g = g.contiguous()
    ds = _scale_op(w, g) if need[2] else None
    dw = (g.float() * s.float()).reshape(-1, g.shape[-1]).sum(0).to(w.dtype) if need[1] else None
    return (g if need[0] else None), dw, ds


_op.register_autograd(_backward, setup_context=_setup)


def skip_add(x: Tensor, w: Tensor, s: Tensor, *, validate: bool = True) -> Tensor:
    """``x + w ⊙ s`` (x, s (..., d) contiguous, one dtype of bf16 / fp16 / fp32; w (d,) of that dtype), with
    gradients to all three; one kernel each way. ``validate=False`` skips the argument checks (a caller whose
    tensors match by construction)."""
    if validate:
        check_tensor(x, "x", dtype=_FLOATS, op=_OP)
        check(x.dim() >= 1 and x.shape[-1] >= 1, lambda: f"{_OP}: x must have a last dimension d >= 1, got "
                                                          f"{tuple(x.shape)}")
        check_tensor(s, "s", dtype=x.dtype, device=x.device, op=_OP)
        check(s.shape == x.shape, lambda: f"{_OP}: s must have x's shape {tuple(x.shape)}, got {tuple(s.shape)}")
        check_tensor(w, "w", dtype=x.dtype, ndim=1, device=x.device, op=_OP)
        check(w.shape[0] == x.shape[-1], lambda: f"{_OP}: w must be (d,) = ({x.shape[-1]},), got {tuple(w.shape)}")
        check(x.is_contiguous() and s.is_contiguous() and w.is_contiguous(),
              lambda: f"{_OP}: x, s and w must be contiguous, got strides {x.stride()}, {s.stride()}, {w.stride()}")
    return _op(x, w, s)


class ScaledSkip(NamedTuple):
    """An encoder output held for ``skip_join``: ``t`` (..., d) stands for ``w ⊙ e`` but holds e unscaled (a view,
    no pass); ``w`` (d,). Only ``skip_join`` reads it: t's gradient is the unscaled one the fork expects."""
    t: Tensor
    w: Tensor


class _Fork(torch.autograd.Function):
    """(e, w) -> (e, e) as views; backward ∂e = ∂a + w ⊙ ∂t in one pass, ∂w = Σ ∂t ⊙ e (see the module docstring)."""

    @staticmethod
    def forward(ctx, e, w):
        # a gradient that never comes (a skip no decoder pops) stays None instead of a zero tensor and a pass
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(w, e if ctx.needs_input_grad[1] else None)
        return e.view_as(e), e.view_as(e)

    @staticmethod
    def backward(ctx, ga, gt):
        w, e = ctx.saved_tensors
        if gt is None:
            return ga, None
        gt = gt.contiguous()
        if ga is None:
            de = _scale_op(w, gt)
        else:
            # skip_add's kernel on the gradients: ga + w ⊙ gt, fp32 inside, rounded once
            de = _op(ga.contiguous(), w, gt)
        dw = (gt.float() * e.float()).reshape(-1, gt.shape[-1]).sum(0).to(w.dtype) if ctx.needs_input_grad[1] else None
        return de, dw


class _Join(torch.autograd.Function):
    """(x, t, w) -> x + w ⊙ t; backward ∂x = ∂t = g (t stands for w ⊙ e: its fork scales)."""

    @staticmethod
    def forward(ctx, x, t, w):
        return _op(x, w, t)

    @staticmethod
    def backward(ctx, g):
        return g, g, None


class _JoinInline(_Join):
    """``_Join`` as torch ops: x + w ⊙ t (torch.addcmul); its backward (∂x = ∂t = g)."""

    @staticmethod
    def forward(ctx, x, t, w):
        return torch.addcmul(x, w, t)


def skip_fork(e: Tensor, w: Tensor, *, validate: bool = True) -> Tuple[Tensor, ScaledSkip]:
    """``e`` for the next block and ``ScaledSkip`` for ``skip_join``: together ``x + w ⊙ e`` with e's two gradients
    summed in one pass (module docstring). e (..., d) contiguous, bf16 / fp16 / fp32; w (d,) of e's dtype. The
    ScaledSkip must reach ``skip_join`` and nothing else."""
    if validate:
        check_tensor(e, "e", dtype=_FLOATS, op="skip_fork")
        check(e.dim() >= 1 and e.shape[-1] >= 1 and e.is_contiguous(),
              lambda: f"skip_fork: e must be contiguous with a last dimension d >= 1, got shape {tuple(e.shape)} "
                      f"strides {e.stride()}")
        check_tensor(w, "w", dtype=e.dtype, ndim=1, device=e.device, op="skip_fork")
        check(w.shape[0] == e.shape[-1] and w.is_contiguous(),
              lambda: f"skip_fork: w must be contiguous (d,) = ({e.shape[-1]},), got {tuple(w.shape)}")
    a, t = _Fork.apply(e, w)
    return a, ScaledSkip(t, w)


def _check_join(x: Tensor, skip: ScaledSkip, op: str) -> None:
    check(isinstance(skip, ScaledSkip), lambda: f"{op}: skip must be the ScaledSkip of skip_fork, got "
                                                f"{type(skip).__name__}")
    check_tensor(x, "x", dtype=skip.t.dtype, device=skip.t.device, op=op)
    check(x.shape == skip.t.shape and x.is_contiguous(),
          lambda: f"{op}: x must be contiguous with the skip's shape {tuple(skip.t.shape)}, got "
                  f"{tuple(x.shape)} strides {x.stride()}")


def skip_join(x: Tensor, skip: ScaledSkip, *, validate: bool = True) -> Tensor:
    """``x + w ⊙ e`` for the ``ScaledSkip(e, w)`` of ``skip_fork``, one pass each way; x of e's shape and dtype."""
    if validate:
        _check_join(x, skip, "skip_join")
    return _Join.apply(x, skip.t, skip.w)


def skip_join_inline(x: Tensor, skip: ScaledSkip, *, validate: bool = True) -> Tensor:
    """``skip_join`` as torch ops (``torch.addcmul``, no kernel), with its gradients (∂x = ∂t = g, the fork scales):
    for inside a ``torch.compile`` region, where Inductor fuses the join into the pass that reads its output next.
    Eager it is addcmul's two passes; ``skip_join`` is the one-pass form outside compiled code."""
    if validate:
        _check_join(x, skip, "skip_join_inline")
    return _JoinInline.apply(x, skip.t, skip.w)


class UNetSkip(torch.nn.Module):
    """A U-Net skip with its own weight (d,), initialized to ones as the records' ``skip_weights``:
    ``forward(x, s) = x + weight ⊙ s`` through ``skip_add`` (the weight cast to x's dtype)."""

    def __init__(self, d: int):
        super().__init__()
        check(isinstance(d, int) and not isinstance(d, bool) and d >= 1, lambda: f"UNetSkip: d must be an int >= 1, "
                                                                               f"got {d!r}")
        self.weight = torch.nn.Parameter(torch.ones(d))

    def forward(self, x: Tensor, s: Tensor) -> Tensor:
        return skip_add(x, self.weight.to(x.dtype), s)
