"""``pgolf_kernels.skip_add`` (the U-Net skip x + w ⊙ s, one pass each way) against what the TTT step runs without
it: ``torch.addcmul`` and its autograd (the backward's w ⊙ g a broadcast ``mul``), eager as ``GPT.hidden`` runs it,
and the same composition under torch.compile.

Shape: the records' TTT step, 64 rows x 2048 positions x d 512, bf16. Rows, one process: forward (medians of
``triton.testing.do_bench``) and forward + backward to x and s (CUDA-graph replay: eager calls of a 0.1 ms op are
host-bound), with GB/s of the bytes the op must move (forward: x and s read, out written; backward: g read, ∂s
written; ∂x is g itself).
"""
from __future__ import annotations

from typing import Dict, List

import torch

from bench.harness import bench_ms, check_close, fwd_bwd, gbps, graph_bench_ms, make_row, time_all

KERNEL = "skip-add"


def run(quick: bool = False) -> List[Dict[str, object]]:
    return measure(torch.device("cuda"), 8 if quick else 64, 2048, 512, bench_ms, torch.compile, torch.bfloat16,
                   graph_timer=graph_bench_ms)


def measure(dev, B: int, T: int, d: int, timer, compile_fn, dtype, graph_timer=None) -> List[Dict[str, object]]:
    """The rows of ``run`` on any device and sizes (the CPU test runs it under the interpreter at a tiny shape with
    stand-in timers)."""
    from pgolf_kernels.skip_add import skip_add, skip_add_ref

    g = torch.Generator(device=dev).manual_seed(0)
    x, s, dy = (torch.randn(B, T, d, device=dev, dtype=dtype, generator=g) for _ in range(3))
    w = (torch.rand(d, device=dev, generator=g) + 0.5).to(dtype)
    compiled = compile_fn(skip_add_ref, dynamic=False)
    check_close(skip_add(x, w, s), skip_add_ref(x, w, s), "skip_add")
    fwd = {"ours": lambda: skip_add(x, w, s, validate=False), "compiled": lambda: compiled(x, w, s),
           "eager": lambda: skip_add_ref(x, w, s)}
    xs, ss = (t.detach().clone().requires_grad_() for t in (x, s))
    train = {"ours": fwd_bwd(lambda a, b, c: skip_add(a, b, c, validate=False), (xs, w, ss), dy),
             "compiled": fwd_bwd(compiled, (xs, w, ss), dy), "eager": fwd_bwd(skip_add_ref, (xs, w, ss), dy)}
    tf = time_all(fwd, timer, "forward")
    nbytes = x.numel() * x.element_size()
    label = f"B{B} T{T} d{d}, {str(dtype)[6:]}"
    rows = [make_row(KERNEL, f"{label}, forward", tf["ours"], "torch.addcmul (eager, as GPT.hidden)", tf["eager"],
                     compiled_ms=tf["compiled"], compiled_speedup=tf["compiled"] / tf["ours"],
                     ours_gbps=gbps(3 * nbytes, tf["ours"]), eager_gbps=gbps(3 * nbytes, tf["eager"]))]
    if graph_timer is not None:
        tt = time_all(train, graph_timer, "forward+backward (graph replay)")
        rows.append(make_row(KERNEL, f"{label}, forward + backward (CUDA-graph replay)", tt["ours"],
                             "torch.addcmul + autograd (eager, as GPT.hidden)", tt["eager"],
                             compiled_ms=tt["compiled"], compiled_speedup=tt["compiled"] / tt["ours"],
                             ours_gbps=gbps(5 * nbytes, tt["ours"]), eager_gbps=gbps(5 * nbytes, tt["eager"])))
    return rows
