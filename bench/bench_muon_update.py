"""The element-wise passes of a banked Muon step (``pgolf_kernels.muon_update``) against what a record runs
instead: its own torch ops (eager, as in its ``Muon.step``) and the same ops under ``torch.compile``.

Per bank set (the 2026-03-23 and 2026-04-29 records' banks, fp32 params and grads, bf16 momentum): one
"step" = for every bank, momentum (+ Nesterov, + MuonEq-R where the record has it) and decay + update with a
stand-in update of the bank's shape (the NS in between is not timed here: ``bench_ns`` times it). Timing: CUDA-
graph replay of the whole set (``graph_bench_ms``), the same for every contestant. GB/s counts the bytes the
fused passes must move (grad 4 + buf 2 + 2 + u 2 per parameter, then p 4 + 4 + u 2): what the torch ops move is
about 2.4x that.
"""
from __future__ import annotations

from typing import Dict, List

import torch

from bench.harness import gbps, graph_bench_ms, make_row, time_all

KERNEL = "muon-update"
SETS = {
    "2026-03-23 banks (MLP 3x), quintic, no MuonEq-R": ([(22, 512, 512), (22, 256, 512), (11, 1536, 512),
                                                        (11, 512, 1536)], False),
    "2026-04-29 banks (MLP 4x), MuonEq-R": ([(22, 512, 512), (22, 256, 512), (11, 2048, 512), (11, 512, 2048)], True),
}
MOMENTUM, LR, WD = 0.95, 0.02, 0.04


def _record_ops(p, grad, buf, upd, row_norm):
    """The records' per-bank ops (2026-04-29 ``Muon.step``, single process: ``g = p.grad.bfloat16()``, momentum,
    Nesterov, MuonEq-R, decay, cast + add), which the package's torch references write out op for op."""
    from pgolf_kernels.muon_update import decay_add_ref, momentum_update_ref

    u = momentum_update_ref(grad, buf, MOMENTUM, True, 1e-07 if row_norm else None)
    decay_add_ref(p.data, upd, LR, WD, 1.0)
    return u


def _fused(p, grad, buf, upd, row_norm):
    from pgolf_kernels.muon_update import decay_add_, momentum_update

    u = momentum_update(grad, buf, MOMENTUM, True, 1e-07 if row_norm else None)
    decay_add_(p.data, upd, LR, WD, 1.0)
    return u


def run(quick: bool = False) -> List[Dict[str, object]]:
    dev = torch.device("cuda")
    rows = []
    compiled = torch.compile(_record_ops)
    for label, (shapes, row_norm) in SETS.items():
        g = torch.Generator(device=dev).manual_seed(0)
        banks = [dict(p=torch.randn(s, device=dev, generator=g), grad=torch.randn(s, device=dev, generator=g),
                      buf=torch.zeros(s, device=dev, dtype=torch.bfloat16),
                      upd=torch.randn(s, device=dev, generator=g).bfloat16()) for s in shapes]
        n = sum(b["p"].numel() for b in banks)

        def step(fn):
            return lambda: [fn(b["p"], b["grad"], b["buf"], b["upd"], row_norm) for b in banks]

        t = time_all({"fused": step(_fused), "record": step(_record_ops), "compiled": step(compiled)},
                     graph_bench_ms, label)
        base = min(t["record"], t["compiled"])
        rows.append(make_row(KERNEL, f"{label}: {n / 1e6:.1f} M params", t["fused"],
                             "record ops (eager / torch.compile, faster)", base, record_ms=t["record"],
                             compiled_ms=t["compiled"], fused_gbps=gbps(20 * n, t["fused"]),
                             speedup_vs_eager=t["record"] / t["fused"]))
    return rows
