"""``pgolf_kernels.mix_norm`` (a block's residual mix and RMS norm in one pass, and the norm alone) against what the
TTT step runs without it: the torch composition of ``train.model.Block`` (``mix[0] * x + mix[1] * x0``, then
``F.rms_norm``) under torch.compile, as the step compiles it, and eager.

Shape: the records' TTT step, 64 rows x 2048 positions x d 512, bf16. Rows, one process: the forward of the mix +
norm and of the norm alone (medians of ``triton.testing.do_bench``), each tile of ``mix_norm.NORM_CONFIGS`` on the
mix + norm (column ``configs_ms``), and the mix + norm's forward + backward to x and x0 (CUDA-graph replay), with GB/s
of the bytes each must move (mix + norm forward: x and x0 read, xm and h written; norm: x read, h written; forward +
backward: those, then ∂xm and ∂h read with xm, ∂x and ∂x0 written).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch

from bench.harness import bench_ms, check_close, gbps, graph_bench_ms, make_row, time_all

KERNEL = "mix-norm"


def run(quick: bool = False) -> List[Dict[str, object]]:
    from pgolf_kernels.mix_norm import NORM_CONFIGS

    return measure(torch.device("cuda"), 8 if quick else 64, 2048, 512, bench_ms, torch.compile, torch.bfloat16,
                   graph_timer=graph_bench_ms, configs=NORM_CONFIGS)


def measure(dev, B: int, T: int, d: int, timer, compile_fn, dtype, graph_timer=None,
            configs: Sequence[Optional[dict]] = (None,)) -> List[Dict[str, object]]:
    """The rows of ``run`` on any device and sizes (the CPU test runs it under the interpreter at a tiny shape with
    stand-in timers). ``configs``: the tiles timed on the mix + norm forward (None: the default)."""
    from pgolf_kernels import mix_norm
    from pgolf_kernels.mix_norm import mix_rms_norm, mix_rms_norm_ref, rms_norm_ref, rms_norm_rows

    g = torch.Generator(device=dev).manual_seed(0)
    x, x0, gxm, gh = (torch.randn(B, T, d, device=dev, dtype=dtype, generator=g) for _ in range(4))
    mix = torch.stack((1 + 0.3 * torch.randn(d, device=dev, generator=g),
                       0.5 * torch.randn(d, device=dev, generator=g))).to(dtype)
    compiled = compile_fn(mix_rms_norm_ref, dynamic=False)
    compiled_norm = compile_fn(rms_norm_ref, dynamic=False)
    for got, want, what in zip(mix_rms_norm(x, x0, mix), mix_rms_norm_ref(x, x0, mix), ("xm", "h")):
        check_close(got, want, f"mix_rms_norm {what}")
    check_close(rms_norm_rows(x), rms_norm_ref(x), "rms_norm_rows")
    nbytes = x.numel() * x.element_size()
    label = f"B{B} T{T} d{d}, {str(dtype)[6:]}"
    base = "the torch composition under torch.compile (as the step compiles it)"

    tf = time_all({"ours": lambda: mix_rms_norm(x, x0, mix, validate=False), "compiled": lambda: compiled(x, x0, mix),
                   "eager": lambda: mix_rms_norm_ref(x, x0, mix)}, timer, "mix + norm forward")
    tiles = {}
    for cfg in configs:
        if cfg is not None:
            tiles[str(cfg)] = time_all({"t": lambda c=cfg: mix_norm._launch(x, x0, mix, c)}, timer, str(cfg))["t"]
    rows = [make_row(KERNEL, f"{label}, mix + norm, forward", tf["ours"], base, tf["compiled"],
                     eager_ms=tf["eager"], compiled_speedup=tf["compiled"] / tf["ours"],
                     ours_gbps=gbps(4 * nbytes, tf["ours"]), compiled_gbps=gbps(4 * nbytes, tf["compiled"]),
                     configs_ms=tiles)]
    tn = time_all({"ours": lambda: rms_norm_rows(x, validate=False), "compiled": lambda: compiled_norm(x),
                   "eager": lambda: rms_norm_ref(x)}, timer, "norm forward")
    rows.append(make_row(KERNEL, f"{label}, norm, forward", tn["ours"], base, tn["compiled"], eager_ms=tn["eager"],
                         compiled_speedup=tn["compiled"] / tn["ours"], ours_gbps=gbps(2 * nbytes, tn["ours"]),
                         compiled_gbps=gbps(2 * nbytes, tn["compiled"])))
    if graph_timer is not None:
        xs, x0s = (t.detach().clone().requires_grad_() for t in (x, x0))

        def train(f):
            def go():
                xs.grad = x0s.grad = None
                xm, h = f(xs, x0s, mix)
                torch.autograd.backward((xm, h), (gxm, gh))
            return go

        tt = time_all({"ours": train(lambda a, b, c: mix_rms_norm(a, b, c, validate=False)),
                       "compiled": train(compiled), "eager": train(mix_rms_norm_ref)}, graph_timer,
                      "mix + norm forward + backward (graph replay)")
        rows.append(make_row(KERNEL, f"{label}, mix + norm, forward + backward (CUDA-graph replay)", tt["ours"], base,
                             tt["compiled"], eager_ms=tt["eager"], compiled_speedup=tt["compiled"] / tt["ours"],
                             ours_gbps=gbps(9 * nbytes, tt["ours"]), compiled_gbps=gbps(9 * nbytes, tt["compiled"])))
    return rows
