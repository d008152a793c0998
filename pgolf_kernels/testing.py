"""Test helpers shared by tests/ and bench/ (importable by users' own tests too).

* ``nan_empty`` / ``nan_like``: output buffers poisoned with NaN, so an element a kernel
  forgot to write fails every comparison.
* ``rel_err``: ||a - ref||_F / ||ref||_F computed in float64.
* ``assert_close_rel``: tolerance *derived* from torch's own low-precision path: the
  kernel's error against a high-precision reference must be at most ``factor`` times
  the error of the baseline (e.g. torch's bf16 F.linear) against the same reference,
  plus a tiny floor for the case where the baseline is exact. This is flash-attention's
  rule (factor 2); a hand-picked atol is not used.
"""
from __future__ import annotations

import math
from typing import Optional

import torch


def nan_empty(shape, dtype=torch.float32, device="cpu") -> torch.Tensor:
    t = torch.empty(shape, dtype=dtype, device=device)
    if t.dtype.is_floating_point:
        t.fill_(float("nan"))
    return t


def nan_like(t: torch.Tensor) -> torch.Tensor:
    return nan_empty(t.shape, t.dtype, t.device)


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative Frobenius error in float64; inf if ``a`` has any NaN/Inf."""
    a64 = a.detach().to(torch.float64)
    r64 = ref.detach().to(torch.float64)
    if not torch.isfinite(a64).all():
        return math.inf
    denom = r64.norm().item()
    num = (a64 - r64).norm().item()
    if denom == 0.0:
        return num
    return num / denom


def assert_close_rel(
    out: torch.Tensor,
    ref: torch.Tensor,
    baseline: Optional[torch.Tensor] = None,
    *,
    factor: float = 2.0,
    floor: float = 1e-6,
    name: str = "output",
) -> float:
    """Assert rel_err(out, ref) <= factor * rel_err(baseline, ref) + floor. Returns the error.

    ``ref`` should be a float32/float64 computation on the same (already rounded) inputs,
    ``baseline`` the same computation done the way torch would do it in the low precision
    (e.g. bf16 F.linear). With no baseline, the bound is just ``floor``.
    """
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    err = rel_err(out, ref)
    base = rel_err(baseline, ref) if baseline is not None else 0.0
    bound = factor * base + floor
    assert err <= bound, (
        f"{name}: relative error {err:.3e} exceeds bound {bound:.3e} "
        f"(= {factor} x baseline error {base:.3e} + {floor:.1e})"
    )
    return err


def seeded_generator(seed: Optional[int] = None) -> torch.Generator:
    """A CPU generator seeded with ``seed``, or else with a draw from torch's global generator (which the test
    suite seeds from each test's id), so a run is reproducible whenever the global seed is."""
    g = torch.Generator()
    g.manual_seed(seed if seed is not None else int(torch.randint(0, 2**31, (1,))))
    return g
