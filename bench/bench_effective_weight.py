"""``pgolf_kernels.lora_merged.effective_weight``: the merged-weight strategy's per-row weights E[b] = W + α·B[b]·A[b]
(one Triton launch reading the fp32 adapters in place, A and B cast in registers), each tile config of
``lora_merged.EFFECTIVE_CONFIGS`` against the default (``EFFECTIVE_CONFIG``) and against the torch composition
(``effective_weight_ref``: baddbmm on the expanded W, after the adapters' casts).

Shapes: the records' TTT step (64 rows, d 512, rank 96) for the q (N 512) and k / v (N 256) slices, bf16 W and E,
fp32 adapters; the step builds one E per slice and layer (33 launches per step, 1.16 ms on an H100 in
bench/results/profile-ttt-h100.md measurement 8). Medians of ``triton.testing.do_bench``; GB/s count E written once,
W read once and A, B read once (fp32).
"""
from __future__ import annotations

from typing import Dict, List

import torch

from bench.harness import bench_ms, check_close, gbps, make_row, time_all

KERNEL = "effective-weight"


def measure(dev, rows: int, d: int, outs, r: int, timer, dtype, configs=None) -> List[Dict[str, object]]:
    """The rows of ``run`` on any device and sizes (the CPU test runs it under the interpreter, tiny shapes)."""
    from pgolf_kernels import lora_merged as M

    configs = list(M.EFFECTIVE_CONFIGS if configs is None else configs)
    default = dict(M.EFFECTIVE_CONFIG)
    gen = torch.Generator(device=dev).manual_seed(0)
    out = []
    for N in outs:
        W = (torch.randn(N, d, device=dev, generator=gen) * d ** -0.5).to(dtype)
        A = torch.randn(rows, r, d, device=dev, generator=gen) * d ** -0.5
        Bm = torch.randn(rows, N, r, device=dev, generator=gen) * r ** -0.5
        ref = M.effective_weight_ref(W, A, Bm, 0.5, None, rows)
        fns = {"torch": lambda: M.effective_weight_ref(W, A, Bm, 0.5, None, rows)}
        for i, cfg in enumerate(configs):
            check_close(M.effective_weight(W, A, Bm, 0.5, None, rows, cfg), ref, f"{KERNEL} N{N} {cfg}")
            fns[f"c{i}"] = (lambda cfg=cfg: M.effective_weight(W, A, Bm, 0.5, None, rows, cfg))
        t = time_all(fns, timer, f"N{N}")
        nbytes = rows * N * d * W.element_size() + N * d * W.element_size() + (A.numel() + Bm.numel()) * 4
        base = t[f"c{configs.index(default)}"] if default in configs else float("nan")
        for i, cfg in enumerate(configs):
            out.append(make_row(KERNEL, f"E = W + α·B·A: rows {rows}, N {N}, d {d}, r {r}, {str(dtype)[6:]}, tile {cfg}",
                                t[f"c{i}"], f"the default tile {default}", base, torch_ms=t["torch"],
                                ours_gbps=gbps(nbytes, t[f"c{i}"]), default=cfg == default))
    return out


def run(quick: bool = False):
    return measure(torch.device("cuda"), 8 if quick else 64, 512, (512, 256), 96, bench_ms, torch.bfloat16)
