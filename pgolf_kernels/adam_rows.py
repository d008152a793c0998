"""One Adam / AdamW step over a tensor of stacked adapter rows, fused into one pass (the TTT eval's optimizer).

The eval's per-document optimizer (``train.ttt_optim.BatchedAdam``) steps every adapter row of every target each TTT
step: 320.9 M fp32 parameters at the records' recipe (64 rows, rank 96 on six targets, counted in
``bench/results/step-work-cpu.md``). Written as torch ops (a decay ``mul_``, ``lerp_``, ``mul_``, ``addcmul_``, then
``sqrt``, ``div_``, ``add_``, a product and ``addcdiv_``), that moves about 88 bytes per parameter, 28 GB a step; the
update needs 28 (read p, g, m, v; write p, m, v): 9.0 GB. This op does the same arithmetic in that one pass.

Math, per element of row r (``rows`` = p.shape[0]; ``step`` and ``rbc2`` hold one fp32 value per row, or one for
all rows), in fp32, rounded where the torch ops round::

    p   = p * keep                                   (AdamW's decoupled decay, keep = 1 - lr * wd; skipped at 1)
    m   = lerp(m, g, 1 - b1)                         (torch's lerp: m + w (g - m) for w < 0.5, else g - (g - m)(1 - w))
    v   = v * b2;  v = v + (1 - b2) * g * g
    p   = p + (m * step[r]) / (sqrt(v) / rbc2[r] + eps)

with step[r] = -lr / (1 - b1^t_r) and rbc2[r] = sqrt(1 - b2^t_r) (per-row step counts t_r, computed by the caller).

b1 = 0 (the records' TTT recipe): the lerp gives m = g exactly, so ``m`` may be None and the pass neither reads nor
writes a first moment: 20 bytes per parameter instead of 28 (6.4 GB a step instead of 9.0 at the records' 320.9 M),
the same p and v bit for bit (a test compares them with ``m`` given).
No backward (optimizer state, under ``torch.no_grad``). ``adam_rows_step_ref_`` is those torch ops written out; the
kernel agrees with it up to fused multiply-adds. Dispatch as every op of the package (``_utils``): CUDA -> Triton,
CPU -> the reference, CPU with TRITON_INTERPRET=1 -> the kernel interpreted.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._utils import check, check_tensor, use_triton

__all__ = ["adam_rows_step_", "adam_rows_step_ref_"]

_OP = "adam_rows_step_"


def adam_rows_step_ref_(p: torch.Tensor, g: torch.Tensor, m: Optional[torch.Tensor], v: torch.Tensor,
                        step: torch.Tensor, rbc2: torch.Tensor, b1: float, b2: float, eps: float,
                        keep: float = 1.0) -> None:
    """The torch reference of ``adam_rows_step_``: ``BatchedAdam``'s per-row step written for one tensor (BatchedAdam
    itself keeps the foreach form over all its tensors, the baseline ``--reference`` runs and was measured with).
    ``m`` None (b1 = 0 only): the lerp's result g is used in its place."""
    if keep != 1.0:
        p.mul_(keep)
    if m is None:
        m = g
    else:
        m.lerp_(g, 1 - b1)
    v.mul_(b2)
    v.addcmul_(g, g, value=1 - b2)
    shape = (-1,) + (1,) * (p.dim() - 1)
    denom = v.sqrt().div_(rbc2.view(shape)).add_(eps)
    p.addcdiv_(m * step.view(shape), denom)


@triton.jit
def _adam_rows_kernel(p_ptr, g_ptr, m_ptr, v_ptr, step_ptr, rbc2_ptr, row_numel, w1, b2, c2, eps, keep,
                      DECAY: tl.constexpr, LERP_HI: tl.constexpr, PER_ROW: tl.constexpr, HAS_M: tl.constexpr,
                      BLOCK: tl.constexpr):
    # grid (blocks of a row, rows): the row's step size and bias correction are two scalars per program, not a
    # 64-bit division per element
    row = tl.program_id(1).to(tl.int64)
    col = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = col < row_numel
    offs = row * row_numel + col
    p = tl.load(p_ptr + offs, mask=mask, other=0.0)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0)
    if PER_ROW:
        step = tl.load(step_ptr + row)
        rbc2 = tl.load(rbc2_ptr + row)
    else:
        step = tl.load(step_ptr)
        rbc2 = tl.load(rbc2_ptr)
    if DECAY:
        p = p * keep
    if HAS_M:
        m = tl.load(m_ptr + offs, mask=mask, other=0.0)
        if LERP_HI:  # torch's lerp for a weight >= 0.5 (b1 = 0: m = g exactly)
            m = g - (g - m) * (1.0 - w1)
        else:
            m = m + w1 * (g - m)
    else:  # b1 = 0 without a stored m: the lerp's result
        m = g
    v = v * b2
    v = v + c2 * (g * g)
    den = tl.sqrt_rn(v) / rbc2 + eps
    p = p + (m * step) / den
    tl.store(p_ptr + offs, p, mask=mask)
    if HAS_M:
        tl.store(m_ptr + offs, m, mask=mask)
    tl.store(v_ptr + offs, v, mask=mask)


@torch.library.custom_op("pgolf::adam_rows_step", mutates_args=("p", "m", "v"))
def _adam_rows_op(p: torch.Tensor, g: torch.Tensor, m: Optional[torch.Tensor], v: torch.Tensor, step: torch.Tensor,
                  rbc2: torch.Tensor, b1: float, b2: float, eps: float, keep: float) -> None:
    if not use_triton(p):
        adam_rows_step_ref_(p, g, m, v, step, rbc2, b1, b2, eps, keep)
        return
    n = p.numel()
    if n:
        block = 1024
        per_row = step.numel() > 1
        rows = p.shape[0] if per_row else 1
        row_numel = n // rows
        _adam_rows_kernel[(triton.cdiv(row_numel, block), rows)](
            p, g, p if m is None else m, v, step, rbc2, row_numel, 1.0 - b1, b2, 1.0 - b2, eps, keep,
            DECAY=keep != 1.0, LERP_HI=(1.0 - b1) >= 0.5, PER_ROW=per_row, HAS_M=m is not None, BLOCK=block,
            num_warps=4)


@_adam_rows_op.register_fake
def _(p, g, m, v, step, rbc2, b1, b2, eps, keep):
    return None


def adam_rows_step_(p: torch.Tensor, g: torch.Tensor, m: Optional[torch.Tensor], v: torch.Tensor, step: torch.Tensor,
                    rbc2: torch.Tensor, *, b1: float, b2: float, eps: float, keep: float = 1.0,
                    validate: bool = True) -> None:
    """One Adam / AdamW step of ``p`` (rows, ...) in place, with its moments ``m`` and ``v`` (module docstring).
    ``p``, ``g``, ``m``, ``v``: fp32, contiguous, one shape, one device; ``m`` may be None when b1 = 0 (no first
    moment is kept: m = g). ``step`` and ``rbc2``: fp32 of ``rows``
    elements (each row its own step count) or of 1 (one for all rows). ``keep`` = 1 - lr * weight_decay.
    ``validate=False`` skips the argument checks (~15 us of host time per call on a CPU host, ~1.7 ms per step over
    the records' 112 adapter tensors): for a caller that checked its own state once (``train.ttt_optim.BatchedAdam``)."""
    if validate:
        _check(p, g, m, v, step, rbc2, b1, b2, eps, keep)
    _adam_rows_op(p, g, m, v, step, rbc2, float(b1), float(b2), float(eps), float(keep))


def _check(p, g, m, v, step, rbc2, b1, b2, eps, keep) -> None:
    check_tensor(p, "p", dtype=torch.float32, contiguous=True, op=_OP)
    check(p.dim() >= 1, f"{_OP}: p must have at least 1 dimension (rows, ...), got a 0-dim tensor")
    check(m is not None or b1 == 0, lambda: f"{_OP}: m may be None only with b1 = 0 (then m = g), got b1 = {b1!r}")
    for name, t in (("g", g), ("m", m), ("v", v)):
        if t is None:
            continue
        check_tensor(t, name, dtype=torch.float32, device=p.device, contiguous=True, op=_OP)
        check(t.shape == p.shape, lambda: f"{_OP}: {name} must have p's shape {tuple(p.shape)}, got {tuple(t.shape)}")
    for name, t in (("step", step), ("rbc2", rbc2)):
        check_tensor(t, name, dtype=torch.float32, device=p.device, contiguous=True, op=_OP)
        check(t.numel() in (1, p.shape[0]), lambda: f"{_OP}: {name} must hold one value per row of p "
                                                    f"({p.shape[0]}) or one for all, got {t.numel()}")
    check(step.numel() == rbc2.numel(), lambda: f"{_OP}: step and rbc2 must have one length (per row, or 1), got "
                                                f"{step.numel()} and {rbc2.numel()}")
    # one program row per adapter row: CUDA's second grid dimension holds at most 65,535
    check(step.numel() == 1 or p.shape[0] <= 65535,
          lambda: f"{_OP}: per-row steps need p.shape[0] <= 65535 rows, got {p.shape[0]}")
    for name, val, lo, hi in (("b1", b1, 0.0, 1.0), ("b2", b2, 0.0, 1.0)):
        check(isinstance(val, (int, float)) and not isinstance(val, bool) and lo <= val < hi,
              lambda: f"{_OP}: {name} must be a float in [0, 1), got {val!r}")
    check(isinstance(eps, (int, float)) and eps > 0, lambda: f"{_OP}: eps must be a float > 0, got {eps!r}")
    check(isinstance(keep, (int, float)) and 0.0 < keep <= 1.0,
          lambda: f"{_OP}: keep (1 - lr * weight_decay) must be in (0, 1], got {keep!r}")
