"""``pgolf_kernels.linear_residual.rank_grad``: the gradient of a residual site's second-product weight,
∂w2[b] = s ⊙ (g[b]ᵀ · u[b]) (B, N, R), a reduction over T into a (N, R) = (512, 96) tile per row in the records'
TTT step, where one cuBLAS bmm ran it at ~107 TFLOP/s (0.12 ms per call, 20 calls per step: 2.4 of the step's
87.7 GPU-ms on an H100, bench/results/profile-ttt-h100.md). Rows: ``rank_grad`` with T cut into S slices (fp32
partials, one rounding) against S = 1 (one bmm, the formula the backward used before), and the same product in
the other orientation, (u[b]ᵀ · g[b])ᵀ.

Shapes: 64 rows x 2048 positions, N 512, R 96 (the records' o / mlp adapters); bf16. Medians of
``triton.testing.do_bench``; TFLOP/s count 2·B·T·N·R; GB/s count the bytes of g and u read once.
"""
from __future__ import annotations

from typing import Dict, List

import torch

from bench.harness import bench_ms, check_close, gbps, make_row, tflops, time_all

KERNEL = "rank-grad"
SPLITS = (2, 4, 8, 16)


def measure(dev, B: int, T: int, N: int, R: int, timer, dtype, splits=SPLITS) -> List[Dict[str, object]]:
    """The rows of ``run`` on any device and sizes (the CPU test runs it at tiny shapes)."""
    from pgolf_kernels.linear_residual import rank_grad

    gen = torch.Generator(device=dev).manual_seed(0)
    g = torch.randn(B, T, N, device=dev, dtype=dtype, generator=gen)
    u = torch.randn(B, T, R, device=dev, dtype=dtype, generator=gen)
    s = torch.rand(N, device=dev, dtype=dtype, generator=gen) + 0.5
    ref = (torch.bmm(g.double().transpose(1, 2), u.double()) * s.double()[None, :, None]).to(dtype)
    fns = {"S1": lambda: rank_grad(g, u, s, 1),
           "uT-g": lambda: torch.bmm(u.transpose(1, 2), g).transpose(1, 2) * s[None, :, None]}
    for S in splits:
        fns[f"S{S}"] = (lambda S=S: rank_grad(g, u, s, S))
    for name, fn in fns.items():
        check_close(fn(), ref, f"{KERNEL} {name} B{B} T{T}")
    t = time_all(fns, timer, f"T{T}")
    flops, nbytes = 2.0 * B * T * N * R, (g.numel() + u.numel()) * g.element_size()
    rows = []
    for name in fns:
        if name == "S1":
            continue
        what = f"T in {name[1:]} slices" if name.startswith("S") else "(uᵀ·g)ᵀ, one bmm"
        rows.append(make_row(KERNEL, f"s ⊙ (gᵀ·u), {what}: B{B} T{T} N{N} R{R}, {str(dtype)[6:]}", t[name],
                             "one bmm (S = 1)", t["S1"], ours_tflops=tflops(flops, t[name]),
                             baseline_tflops=tflops(flops, t["S1"]), ours_gbps=gbps(nbytes, t[name])))
    return rows


def run(quick: bool = False):
    return measure(torch.device("cuda"), 8 if quick else 64, 2048, 512, 96, bench_ms, torch.bfloat16)
