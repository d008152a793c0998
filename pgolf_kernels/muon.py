"""Muon optimizer on top of the grouped Newton-Schulz kernels.

Per parameter p (a 2-D matrix, or a 3-D bank whose [i] slices are independent matrices), with gradient g:

    buf  <- momentum * buf + g                                   (momentum buffer, p's dtype)
    u    <- g + momentum * buf   if nesterov else buf
    u    <- u / max(||u_row||_2, eps) per row                    (only with row_normalize=True, "MuonEq-R")
    o    <- NS(u)                                                (per matrix slice; newton_schulz, bf16)
    p    <- p * (1 - lr * weight_decay)                          (decoupled weight decay)
    p    <- p - lr * max(1, rows / cols) ** 0.5 * o              (rows, cols = p.shape[-2:], the records' scale)

Single process: all matrices of a param group go through ``newton_schulz_many`` (3 grouped launches per
NS step for the whole group). Under ``torch.distributed`` (initialized, world size > 1): matrices are
grouped by shape; for each shape group every rank orthogonalizes a contiguous 1/world share
(ceil-divided; short shares are zero-padded in the gathered buffer, no NS work is spent on pads) and starts
an async all-gather, then moves on to the next group, so communication overlaps the next group's NS.
Every rank must hold the same gradients (e.g. after DDP's all-reduce) and keeps the full momentum state;
since the kernels compute each matrix independently of the rest of the launch, the distributed update is
bitwise the single-process update on the kernel path.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch
import torch.distributed as dist

from ._optim import closure_loss, momentum_buffer
from .newton_schulz import newton_schulz_many, resolve_coefficients

__all__ = ["Muon", "muon_reference_step"]


def _shape_scale(p: torch.Tensor) -> float:
    return max(1.0, p.shape[-2] / p.shape[-1]) ** 0.5


def _row_normalize(u: torch.Tensor, eps: float) -> torch.Tensor:
    return u / u.norm(dim=-1, keepdim=True).clamp_min(eps)


class Muon(torch.optim.Optimizer):
    """Muon: momentum + Newton-Schulz orthogonalized updates (see module docstring for the formulas).

    Args:
        params: 2-D matrices or 3-D banks (iterable of tensors or of param-group dicts).
        lr, momentum, nesterov, weight_decay: as in the formulas above (weight decay is decoupled).
        ns_steps, coefficients: Newton-Schulz schedule ("quintic", "polar_express", or a list of (a, b, c)).
        row_normalize: normalize each row of the update to unit L2 norm before NS.
        use_kernel: False forces the torch reference NS (the records' code path).
        process_group: group for the sharded NS + all-gather (default: the world group when initialized).
        compute_dtype: NS compute dtype (bf16; fp16/fp32 for tests on the CPU interpreter).
        eps: NS normalization eps (and the row-normalization floor).
    """

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True,
                 weight_decay: float = 0.0, ns_steps: int = 5, coefficients="quintic", row_normalize: bool = False,
                 use_kernel: bool = True, process_group=None, *, compute_dtype: torch.dtype = torch.bfloat16,
                 eps: float = 1e-7):
        if not (isinstance(lr, (int, float)) and lr >= 0.0):
            raise ValueError(f"Muon: lr must be a float >= 0, got {lr!r}")
        if not (isinstance(momentum, (int, float)) and 0.0 <= momentum < 1.0):
            raise ValueError(f"Muon: momentum must be in [0, 1), got {momentum!r}")
        if not (isinstance(weight_decay, (int, float)) and weight_decay >= 0.0):
            raise ValueError(f"Muon: weight_decay must be a float >= 0, got {weight_decay!r}")
        resolve_coefficients(coefficients, ns_steps)  # raises on a bad schedule
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, ns_steps=ns_steps,
                        coefficients=coefficients, row_normalize=row_normalize)
        super().__init__(params, defaults)
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                if p.dim() not in (2, 3):
                    raise ValueError(f"Muon: param_groups[{gi}]['params'][{pi}] must be a 2-D matrix or a 3-D bank "
                                     f"of matrices, got shape {tuple(p.shape)} (use AdamW for vectors/scalars)")
                if not p.dtype.is_floating_point:
                    raise TypeError(f"Muon: param_groups[{gi}]['params'][{pi}] must be floating point, got {p.dtype}")
        self.use_kernel = bool(use_kernel)
        self.process_group = process_group
        self.compute_dtype = compute_dtype
        self.eps = float(eps)

    # -- NS dispatch ---------------------------------------------------------------------------------
    def _world(self) -> Tuple[int, int]:
        if not (dist.is_available() and dist.is_initialized()):
            return 1, 0
        return dist.get_world_size(self.process_group), dist.get_rank(self.process_group)

    def _ns_local(self, mats: List[torch.Tensor], group) -> List[torch.Tensor]:
        # tiles="large": the same tile config for a rank's share and for the whole set (bitwise equal updates)
        return newton_schulz_many(mats, group["ns_steps"], group["coefficients"], self.eps,
                                  compute_dtype=self.compute_dtype, use_kernel=self.use_kernel, tiles="large")

    def _orthogonalize(self, updates: List[torch.Tensor], group) -> List[torch.Tensor]:
        world, rank = self._world()
        if world == 1:
            return self._ns_local(updates, group)
        # shape groups of single matrices, in first-appearance order
        groups: Dict[Tuple[int, int], List[Tuple[int, int]]] = {}
        for ti, u in enumerate(updates):
            r, c = u.shape[-2], u.shape[-1]
            for si in range(u.numel() // (r * c)):
                groups.setdefault((r, c), []).append((ti, si))
        results = [torch.empty(u.shape, dtype=self.compute_dtype, device=u.device) for u in updates]
        pending = []
        backend = dist.get_backend(self.process_group)
        for (r, c), members in groups.items():
            K = len(members)
            per = -(-K // world)
            lo, hi = min(rank * per, K), min((rank + 1) * per, K)
            dev = updates[0].device
            local_out = torch.zeros((per, r, c), dtype=self.compute_dtype, device=dev)
            if hi > lo:
                mine = torch.stack([updates[ti].reshape(-1, r, c)[si] for ti, si in members[lo:hi]])
                local_out[: hi - lo] = self._ns_local([mine], group)[0]
            gathered = torch.empty((world * per, r, c), dtype=self.compute_dtype, device=dev)
            if backend == "nccl":
                work = dist.all_gather_into_tensor(gathered, local_out, group=self.process_group, async_op=True)
            else:  # gloo: no all_gather_into_tensor and no bf16/int16; move the raw bytes (a pure copy)
                chunks = list(gathered.view(torch.uint8).chunk(world))
                work = dist.all_gather(chunks, local_out.view(torch.uint8), group=self.process_group, async_op=True)
            pending.append((work, gathered, members))  # next group's NS overlaps this all-gather
        for work, gathered, members in pending:
            work.wait()
            for k, (ti, si) in enumerate(members):
                results[ti].view(-1, *results[ti].shape[-2:])[si].copy_(gathered[k])
        return results

    # -- step --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            lr, mom, wd = group["lr"], group["momentum"], group["weight_decay"]
            grads = [p.grad for p in params]
            bufs = [momentum_buffer(self.state[p], p) for p in params]
            torch._foreach_mul_(bufs, mom)
            torch._foreach_add_(bufs, grads)
            updates = torch._foreach_add(grads, bufs, alpha=mom) if group["nesterov"] else list(bufs)
            if group["row_normalize"]:
                updates = [_row_normalize(u, self.eps) for u in updates]
            orth = self._orthogonalize(updates, group)
            if wd != 0.0:
                torch._foreach_mul_(params, 1.0 - lr * wd)
            for p, o in zip(params, orth):
                p.add_(o.to(p.dtype), alpha=-lr * _shape_scale(p))
        return loss


@torch.no_grad()
def muon_reference_step(params, states: Dict[int, torch.Tensor], lr=0.02, momentum=0.95, nesterov=True,
                        weight_decay=0.0, ns_steps=5, coefficients="quintic", row_normalize=False, eps=1e-7,
                        compute_dtype=torch.bfloat16, ns=None):
    """A plain per-matrix loop of the records' Muon step (semantics oracle for tests).

    ``states`` maps id(p) -> momentum buffer (created on first use); ``ns`` defaults to the torch reference NS.
    """
    from .newton_schulz import newton_schulz_ref

    ns = ns or (lambda x: newton_schulz_ref(x, ns_steps, coefficients, eps, compute_dtype=compute_dtype))
    for p in params:
        if p.grad is None:
            continue
        g = p.grad
        buf = states.setdefault(id(p), torch.zeros_like(p))
        buf.mul_(momentum).add_(g)
        u = g + momentum * buf if nesterov else buf.clone()
        mats = u.reshape(-1, *u.shape[-2:])
        outs = []
        for i in range(mats.shape[0]):
            x = mats[i]
            if row_normalize:
                x = _row_normalize(x, eps)
            outs.append(ns(x))
        o = torch.stack(outs).reshape(p.shape)
        if weight_decay:
            p.mul_(1.0 - lr * weight_decay)
        p.add_(o.to(p.dtype), alpha=-lr * _shape_scale(p))
