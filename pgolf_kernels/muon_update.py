"""The element-wise halves of a Muon step, each fused into one pass over a parameter bank.

A banked Muon step (the record scripts' ``ParallelMuon``: a few 3-D banks, 26 M parameters in all for the
2026-03-23 model) spends, around its Newton-Schulz call, six element-wise torch ops per bank; each reads and
writes the whole bank (about 48 bytes per parameter in all: grad cast, momentum ``mul_`` and ``add_``, the
Nesterov ``add``, decay ``mul_``, the update's cast and ``add_``). The two ops here do the same arithmetic in
two passes of about 10 bytes per parameter each.

``momentum_update(grad, buf, momentum, nesterov, row_eps=None)`` (``buf`` updated in place, returns ``u``):

    g   = grad rounded to buf's dtype                       (the records' ``p.grad.bfloat16()``)
    buf = (buf * momentum) + g                              (each product / sum rounded to buf's dtype, as
                                                             torch's ``buf.mul_(momentum).add_(g)``)
    u   = g + momentum * buf   if nesterov else buf         (one rounding, as ``g.add(buf, alpha=momentum)``)
    u   = u / r,  r = max(||u_row||_2, row_eps) rounded to buf's dtype      (only when row_eps is given:
                                                             MuonEq-R, ``u / u.float().norm(-1).clamp_min(eps)``)
    ss  = sum_c u[row, c]^2 in fp32 of the final (rounded) u, one value per row   (only with ``row_sumsq=True``:
                                                             Newton-Schulz's Frobenius norm without another pass
                                                             over the bank, ``newton_schulz_many(row_sumsq=...)``)

``decay_add_(p, u, lr, weight_decay, scale)`` (``p`` updated in place):

    p = p * (1 - lr * weight_decay)                         (rounded to p's dtype; skipped when weight_decay = 0)
    p = p + (-lr * scale) * u                               (u cast to p's dtype first, as ``p.add_(u.to(p.dtype),
                                                             alpha=-lr * scale)``)

Shapes: ``grad``, ``buf`` and ``u``: the same shape (..., C), rows = numel / C; ``p`` and ``u`` of one numel.
No backward (optimizer state, under ``torch.no_grad``). The torch references ``momentum_update_ref`` /
``decay_add_ref`` are those ops written out; the kernels round at the same places, so on the GPU they agree
with them up to the order of the row-norm sum (and fused multiply-adds). Dispatch as every op of the package
(``_utils``): CUDA -> Triton, CPU -> the reference, CPU with TRITON_INTERPRET=1 -> the kernel interpreted
(but for bf16 tensors, which the interpreter rounds wrongly: the reference).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._utils import check, check_tensor, use_triton

__all__ = ["momentum_update", "momentum_update_ref", "row_sumsq_ref", "decay_add_", "decay_add_ref"]

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_OP_M, _OP_D = "momentum_update", "decay_add_"


# ----------------------------------------------------------------------------------------------- references
def momentum_update_ref(grad: torch.Tensor, buf: torch.Tensor, momentum: float, nesterov: bool = True,
                        row_eps: Optional[float] = None, *, row_sumsq: bool = False):
    """The torch ops the kernel fuses (module docstring); ``buf`` is updated in place. Returns u, or (u, ss)
    with ``row_sumsq``."""
    g = grad.to(buf.dtype)
    buf.mul_(momentum).add_(g)
    u = g.add(buf, alpha=momentum) if nesterov else buf.clone()
    if row_eps is not None:
        u = u / u.float().norm(dim=-1, keepdim=True).clamp_min(row_eps).to(u.dtype)
    if row_sumsq:
        return u, row_sumsq_ref(u)
    return u


def row_sumsq_ref(u: torch.Tensor) -> torch.Tensor:
    """(rows,) fp32: sum of squares of each row (last dim) of u, from u's values in fp32."""
    C = u.shape[-1] if u.dim() else 1
    return u.float().reshape(-1, C).square().sum(dim=1)


def decay_add_ref(p: torch.Tensor, u: torch.Tensor, lr: float, weight_decay: float, scale: float) -> None:
    """The torch ops the kernel fuses (module docstring); ``p`` is updated in place."""
    if weight_decay != 0.0:
        p.mul_(1.0 - lr * weight_decay)
    p.add_(u.reshape(p.shape).to(p.dtype), alpha=-lr * scale)


# ----------------------------------------------------------------------------------------------- kernels
@triton.jit
def _momentum_tile(g_ptr, b_ptr, off, m, momentum, NESTEROV: tl.constexpr):
    """buf = buf * momentum + g (stored, rounded as torch's two ops) for the elements ``off`` under mask ``m``;
    returns u in buf's dtype (g + momentum * buf with Nesterov, else buf)."""
    dt = b_ptr.dtype.element_ty
    g = tl.load(g_ptr + off, mask=m, other=0.0).to(dt).to(tl.float32)
    b = tl.load(b_ptr + off, mask=m, other=0.0).to(tl.float32)
    b = (b * momentum).to(dt).to(tl.float32)
    b = (b + g).to(dt)
    tl.store(b_ptr + off, b, mask=m)
    if NESTEROV:
        u = (g + momentum * b.to(tl.float32)).to(dt)
    else:
        u = b
    return u


@triton.jit
def _momentum_kernel(g_ptr, b_ptr, u_ptr, ss_ptr, C, momentum, row_eps, NESTEROV: tl.constexpr,
                     ROW_NORM: tl.constexpr, WRITE_SS: tl.constexpr, SINGLE: tl.constexpr, BLOCK_C: tl.constexpr):
    # one program per row. SINGLE (C <= BLOCK_C, every record bank: C = 512 or 2048): the row stays in registers,
    # one read of g and buf, one write of buf and u. Longer rows go in tiles of BLOCK_C, and the row norm then
    # needs a second pass that reads u back (4 more bytes per element in bf16).
    row = tl.program_id(0).to(tl.int64)
    dt = b_ptr.dtype.element_ty
    if SINGLE:
        cols = tl.arange(0, BLOCK_C)
        m = cols < C
        off = row * C + cols
        u = _momentum_tile(g_ptr, b_ptr, off, m, momentum, NESTEROV)
        if ROW_NORM:
            uf = u.to(tl.float32)
            r = tl.maximum(tl.sqrt(tl.sum(uf * uf, axis=0)), row_eps).to(dt).to(tl.float32)
            u = (uf / r).to(dt)
        tl.store(u_ptr + off, u, mask=m)
        if WRITE_SS:
            v = u.to(tl.float32)
            tl.store(ss_ptr + row, tl.sum(v * v, axis=0))
    else:
        ss = tl.zeros([BLOCK_C], dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            m = cols < C
            off = row * C + cols
            u = _momentum_tile(g_ptr, b_ptr, off, m, momentum, NESTEROV)
            tl.store(u_ptr + off, u, mask=m)
            if ROW_NORM or WRITE_SS:
                uf = u.to(tl.float32)
                ss += uf * uf
        if ROW_NORM:
            r = tl.maximum(tl.sqrt(tl.sum(ss, axis=0)), row_eps).to(dt).to(tl.float32)
            tl.debug_barrier()  # the second pass reads back the row's u, which other threads of the program stored
            ss2 = tl.zeros([BLOCK_C], dtype=tl.float32)
            for c0 in range(0, C, BLOCK_C):
                cols = c0 + tl.arange(0, BLOCK_C)
                m = cols < C
                off = row * C + cols
                u = tl.load(u_ptr + off, mask=m, other=0.0).to(tl.float32)
                v = (u / r).to(dt)
                tl.store(u_ptr + off, v, mask=m)
                if WRITE_SS:
                    vf = v.to(tl.float32)
                    ss2 += vf * vf
            if WRITE_SS:
                tl.store(ss_ptr + row, tl.sum(ss2, axis=0))
        elif WRITE_SS:
            tl.store(ss_ptr + row, tl.sum(ss, axis=0))


@triton.jit
def _decay_add_kernel(p_ptr, u_ptr, n, keep, alpha, DECAY: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    dt = p_ptr.dtype.element_ty
    p = tl.load(p_ptr + offs, mask=m, other=0.0)
    if DECAY:
        p = (p.to(tl.float32) * keep).to(dt)
    u = tl.load(u_ptr + offs, mask=m, other=0.0).to(dt).to(tl.float32)
    tl.store(p_ptr + offs, (p.to(tl.float32) + alpha * u).to(dt), mask=m)


# ----------------------------------------------------------------------------------------------- custom ops
def _kernel_ok(*ts: torch.Tensor) -> bool:
    # triton 3.6's interpreter rounds bf16 wrongly (a record-shaped bank's momentum was off by 10 % in one
    # element of 512): interpreted bf16 runs the reference, as newton_schulz's dispatch does
    if not use_triton(ts[0]):
        return False
    return ts[0].device.type != "cpu" or all(t.dtype != torch.bfloat16 for t in ts)


@torch.library.custom_op("pgolf::muon_momentum_update", mutates_args=("buf",))
def _momentum_op(grad: torch.Tensor, buf: torch.Tensor, momentum: float, nesterov: bool,
                 row_eps: Optional[float], row_sumsq: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """(u, ss); ss has one fp32 value per row with ``row_sumsq``, else no elements."""
    C = buf.shape[-1]
    rows = buf.numel() // C if C else 0
    if not _kernel_ok(buf, grad):
        u = momentum_update_ref(grad, buf, momentum, nesterov, row_eps)
        return u, row_sumsq_ref(u) if row_sumsq else buf.new_empty((0,), dtype=torch.float32)
    u = torch.empty_like(buf)
    ss = buf.new_empty((rows if row_sumsq else 0,), dtype=torch.float32)
    if rows:
        block_c = min(triton.next_power_of_2(C), 2048)
        _momentum_kernel[(rows,)](grad, buf, u, ss, C, float(momentum), float(row_eps or 0.0),
                                  NESTEROV=bool(nesterov), ROW_NORM=row_eps is not None, WRITE_SS=bool(row_sumsq),
                                  SINGLE=C <= block_c, BLOCK_C=block_c, num_warps=4 if block_c >= 512 else 1)
    return u, ss


@_momentum_op.register_fake
def _(grad, buf, momentum, nesterov, row_eps, row_sumsq):
    C = buf.shape[-1]
    rows = buf.numel() // C if C else 0
    return torch.empty_like(buf), buf.new_empty((rows if row_sumsq else 0,), dtype=torch.float32)


@torch.library.custom_op("pgolf::muon_decay_add", mutates_args=("p",))
def _decay_add_op(p: torch.Tensor, u: torch.Tensor, lr: float, weight_decay: float, scale: float) -> None:
    if not _kernel_ok(p, u):
        decay_add_ref(p, u, lr, weight_decay, scale)
        return
    n = p.numel()
    if n:
        block = 1024
        _decay_add_kernel[(triton.cdiv(n, block),)](p, u, n, 1.0 - lr * weight_decay, -lr * scale,
                                                     DECAY=weight_decay != 0.0, BLOCK=block, num_warps=4)


@_decay_add_op.register_fake
def _(p, u, lr, weight_decay, scale):
    return None


# ----------------------------------------------------------------------------------------------- public API
def momentum_update(grad: torch.Tensor, buf: torch.Tensor, momentum: float, nesterov: bool = True,
                    row_eps: Optional[float] = None, *, row_sumsq: bool = False):
    """Momentum (and Nesterov, and MuonEq-R row normalization with ``row_eps``) in one pass; ``buf`` is updated
    in place; returns the update u in buf's dtype and shape, or ``(u, ss)`` with ``row_sumsq=True``: ss (rows,)
    fp32, each row's sum of squares of u (rows = numel / C), written by the same pass (module docstring)."""
    check_tensor(buf, "buf", dtype=_FLOATS, contiguous=True, op=_OP_M)
    check_tensor(grad, "grad", dtype=_FLOATS, device=buf.device, contiguous=True, op=_OP_M)
    check(grad.shape == buf.shape, lambda: f"{_OP_M}: grad must have buf's shape {tuple(buf.shape)}, "
                                           f"got {tuple(grad.shape)}")
    check(buf.dim() >= 1, f"{_OP_M}: buf must have at least 1 dimension (..., C), got a 0-dim tensor")
    check(isinstance(momentum, (int, float)) and not isinstance(momentum, bool) and 0.0 <= momentum < 1.0,
          lambda: f"{_OP_M}: momentum must be a float in [0, 1), got {momentum!r}")
    check(row_eps is None or (isinstance(row_eps, (int, float)) and row_eps > 0.0),
          lambda: f"{_OP_M}: row_eps must be None or a float > 0, got {row_eps!r}")
    check(isinstance(row_sumsq, bool), lambda: f"{_OP_M}: row_sumsq must be a bool, got {row_sumsq!r}")
    u, ss = _momentum_op(grad, buf, float(momentum), bool(nesterov), None if row_eps is None else float(row_eps),
                         bool(row_sumsq))
    return (u, ss) if row_sumsq else u


def decay_add_(p: torch.Tensor, u: torch.Tensor, lr: float, weight_decay: float = 0.0, scale: float = 1.0) -> None:
    """``p = p * (1 - lr * weight_decay) - lr * scale * u`` in one pass, rounded as the torch ops (module
    docstring); ``u`` may have another shape of the same numel (e.g. a bank's gathered update)."""
    check_tensor(p, "p", dtype=_FLOATS, contiguous=True, op=_OP_D)
    check_tensor(u, "u", dtype=_FLOATS, device=p.device, contiguous=True, op=_OP_D)
    check(u.numel() == p.numel(), lambda: f"{_OP_D}: u must have p's {p.numel()} elements, got {u.numel()} "
                                          f"(shape {tuple(u.shape)})")
    for name, v in (("lr", lr), ("weight_decay", weight_decay), ("scale", scale)):
        check(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0.0,
              lambda name=name, v=v: f"{_OP_D}: {name} must be a float >= 0, got {v!r}")
    _decay_add_op(p, u, float(lr), float(weight_decay), float(scale))
