"""The per-document TTT optimizer: Adam / AdamW over stacked adapter rows, reset in place."""
from __future__ import annotations

import math
from typing import List

import numpy as np
import torch


class BatchedAdam:
    """Adam, or AdamW with ``weight_decay`` > 0 (PyTorch's formulas), over a fixed list of tensors,
    reset in place.

    p *= 1 - lr*wd (decoupled decay, AdamW; skipped for wd = 0);
    m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;  p -= lr/(1-b1^t) * m / (sqrt(v/(1-b2^t)) + eps).
    b1 = 0 is allowed (m = g, no bias correction needed: 1 - 0^t = 1). Elementwise, so stacking every
    document's adapter rows in one tensor is per-document Adam.
    """

    def __init__(self, params: List[torch.Tensor], lr: float, betas=(0.9, 0.95), eps: float = 1e-8,
                 per_row: bool = False, weight_decay: float = 0.0, fused: bool = False):
        """``per_row``: every parameter's dim 0 is the adapter row, and each row keeps its own step
        count t (bias corrections per row), so rows can be reset independently (``reset_rows``).
        ``fused``: each parameter's whole update in one pass (``pgolf_kernels.adam_rows``: 28 bytes of traffic per
        parameter instead of ~88 for the torch ops, 20 with b1 = 0, which keeps no first moment: ``m`` is then an
        empty list; fp32 parameters), the same formula."""
        self.params = params
        self.lr, self.b1, self.b2, self.eps = lr, betas[0], betas[1], eps
        self.weight_decay = float(weight_decay)
        self.fused = bool(fused)
        if self.fused and any(p.dtype != torch.float32 for p in params):
            raise ValueError(f"BatchedAdam(fused=True): expected fp32 parameters, got "
                             f"{sorted({str(p.dtype) for p in params})}")
        if self.fused and not all(p.is_contiguous() and p.dim() >= 1 for p in params):
            raise ValueError(f"BatchedAdam(fused=True): expected contiguous parameters of at least 1 dimension, got "
                             f"shapes {[tuple(p.shape) for p in params]}, contiguous "
                             f"{[p.is_contiguous() for p in params]}")
        if self.fused and params:
            # the hyperparameters through the op's own checks, on empty tensors (no work): each step then calls it
            # with validate=False, its state checked here once (the checks took ~15 us a call on a CPU host, ~1.7 ms
            # of host time per step over the records' 112 adapter tensors)
            from pgolf_kernels.adam_rows import adam_rows_step_

            e, one = params[0].new_empty(0), params[0].new_ones(1)
            adam_rows_step_(e, e, e, e, one, one, b1=self.b1, b2=self.b2, eps=self.eps,
                            keep=1.0 - self.lr * self.weight_decay)
        # fused with b1 = 0: no first moment is kept (m = g; adam_rows_step_ with m=None moves 20 bytes per
        # parameter instead of 28, and the records' 320.9 M-parameter recipe holds 1.28 GB less)
        self.m = [] if self.fused and self.b1 == 0 else [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.t = 0
        self.row_t = None
        if per_row:
            rows = {p.shape[0] if p.dim() else None for p in params}
            if len(rows) != 1 or None in rows:
                raise ValueError(f"BatchedAdam(per_row=True): every parameter needs the same dim 0 (the adapter "
                                 f"row), got {[tuple(p.shape) for p in params]}")
            self.row_t = torch.zeros(params[0].shape[0], dtype=torch.float64, device=params[0].device)

    @torch.no_grad()
    def reset(self) -> None:
        for bufs in (self.m, self.v):
            if bufs:  # m is empty when fused with b1 = 0 (the foreach op refuses an empty list)
                torch._foreach_zero_(bufs)
        self.t = 0
        if self.row_t is not None:
            self.row_t.zero_()

    @torch.no_grad()
    def reset_rows(self, rows) -> None:
        if self.row_t is None:
            raise ValueError("BatchedAdam.reset_rows needs per_row=True")
        rows = torch.as_tensor(np.asarray(rows, dtype=np.int64)).to(self.row_t.device)
        for buf in self.m + self.v:
            buf.index_fill_(0, rows, 0.0)
        self.row_t.index_fill_(0, rows, 0.0)

    @torch.no_grad()
    def step(self) -> None:
        ps = [p for p in self.params if p.grad is not None]
        if not ps:
            return
        idx = [i for i, p in enumerate(self.params) if p.grad is not None]
        m = [self.m[i] for i in idx] if self.m else [None] * len(idx)
        v = [self.v[i] for i in idx]
        g = [p.grad for p in ps]
        if self.fused:  # what can change between steps, checked before any state moves (torch's own .grad
            for p, gi in zip(ps, g):  # assignment already refuses another dtype, shape or device)
                if not gi.is_contiguous():
                    raise ValueError(f"BatchedAdam(fused=True): a gradient must be contiguous; got strides "
                                     f"{gi.stride()} for shape {tuple(gi.shape)}")
        self.t += 1
        if self.fused:
            self._step_fused(ps, m, v, g)
            return
        if self.weight_decay:
            torch._foreach_mul_(ps, 1.0 - self.lr * self.weight_decay)
        if self.row_t is not None:
            self._step_per_row(ps, m, v, g)
            return
        torch._foreach_lerp_(m, g, 1 - self.b1)
        torch._foreach_mul_(v, self.b2)
        torch._foreach_addcmul_(v, g, g, value=1 - self.b2)
        bc1 = 1 - self.b1 ** self.t
        bc2 = 1 - self.b2 ** self.t
        denom = torch._foreach_sqrt(v)
        torch._foreach_div_(denom, math.sqrt(bc2))
        torch._foreach_add_(denom, self.eps)
        torch._foreach_addcdiv_(ps, m, denom, value=-self.lr / bc1)
        for p in ps:
            p.grad = None

    def _step_per_row(self, ps, m, v, g) -> None:
        """The same formula with t, 1-b1^t and 1-b2^t per row (broadcast over each row's elements)."""
        step, rbc2 = self._row_scales()
        torch._foreach_lerp_(m, g, 1 - self.b1)
        torch._foreach_mul_(v, self.b2)
        torch._foreach_addcmul_(v, g, g, value=1 - self.b2)
        for p, mi, vi in zip(ps, m, v):
            shape = (-1,) + (1,) * (p.dim() - 1)
            denom = vi.sqrt().div_(rbc2.view(shape)).add_(self.eps)
            p.addcdiv_(mi * step.view(shape), denom)
        for p in ps:
            p.grad = None

    def _row_scales(self):
        """Count one more step on every row: (-lr / (1 - b1^t), sqrt(1 - b2^t)) per row, fp32 (rows,) on the device."""
        self.row_t += 1
        return (-self.lr / (1 - self.b1 ** self.row_t)).float(), (1 - self.b2 ** self.row_t).sqrt().float()

    def _step_fused(self, ps, m, v, g) -> None:
        """``step`` in one ``adam_rows_step_`` pass per parameter: the per-row (or batch-wide) step sizes and bias
        corrections as device vectors, the rest in the kernel."""
        from pgolf_kernels.adam_rows import adam_rows_step_

        if self.row_t is not None:
            step, rbc2 = self._row_scales()
        else:
            dev = ps[0].device
            step = torch.full((1,), -self.lr / (1 - self.b1 ** self.t), dtype=torch.float32, device=dev)
            rbc2 = torch.full((1,), math.sqrt(1 - self.b2 ** self.t), dtype=torch.float32, device=dev)
        keep = 1.0 - self.lr * self.weight_decay
        for p, mi, vi, gi in zip(ps, m, v, g):  # p, m, v and the scalars checked in __init__, g in step
            adam_rows_step_(p, gi, mi, vi, step, rbc2, b1=self.b1, b2=self.b2, eps=self.eps, keep=keep,
                            validate=False)
        for p in ps:
            p.grad = None


def optimizer_for(params: List[torch.Tensor], cfg, per_row: bool = False, backend: str = "bmm") -> BatchedAdam:
    """The per-document optimizer a ``TTTConfig`` names (Adam, or AdamW with its weight decay). Fused
    (``BatchedAdam(fused=True)``) as ``cfg.fused_optimizer`` says; its default (None) fuses it on the kernel path
    (``backend`` "kernel") and keeps the torch ops for ``--reference`` ("bmm"), the baseline as a user writes it."""
    wd = cfg.weight_decay if cfg.optimizer == "adamw" else 0.0
    fused = backend == "kernel" if cfg.fused_optimizer is None else cfg.fused_optimizer
    return BatchedAdam(params, cfg.lr, (cfg.beta1, cfg.beta2), cfg.eps, per_row=per_row, weight_decay=wd, fused=fused)
