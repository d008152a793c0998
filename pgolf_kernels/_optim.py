"""The parts of ``torch.optim.Optimizer.step`` that every optimizer of the package writes the same way
(``muon.Muon`` and the record-script Muon that ``patch`` builds)."""
from __future__ import annotations

import torch


def closure_loss(closure):
    """The loss of ``step(closure)``: the closure evaluated with autograd on (``step`` itself runs under
    ``torch.no_grad``), or None without a closure."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def momentum_buffer(state: dict, like: torch.Tensor, dtype=None) -> torch.Tensor:
    """``state["momentum_buffer"]`` of one parameter, created as zeros shaped like ``like`` (typed like it, or
    ``dtype``) on first use."""
    if "momentum_buffer" not in state:
        state["momentum_buffer"] = torch.zeros_like(like, dtype=dtype)
    return state["momentum_buffer"]
