"""``pgolf_kernels.lora_merged.sum_products``: the merged-weight backward's input gradient dx = Σ_i dy_i · E_i over
the q / k / v slices in one kernel, against what the backward ran before it (cuBLAS: one bmm, then an accumulating
``baddbmm_`` per further slice) and against one cuBLAS bmm over the slices concatenated along K (the speed of light
of the same GEMM, paid for with a copy of the dy_i that the step does not have).

Shapes: the records' TTT step (64 rows x 2048 positions, d 512; q 512, k 256, v 256 outputs) and its tail-sized
windows (the 48-position chunk); bf16. Medians of ``triton.testing.do_bench``; TFLOP/s count 2·B·T·N·ΣK.
"""
from __future__ import annotations

from typing import Dict, List

import torch

from bench.harness import bench_ms, check_close, make_row, tflops, time_all

KERNEL = "merged-dx"
SLICES = (512, 256, 256)
D = 512


def measure(dev, B: int, Ts, slices, d: int, timer, dtype) -> List[Dict[str, object]]:
    """The rows of ``run`` on any device and sizes (the CPU test runs it under the interpreter, tiny shapes)."""
    from pgolf_kernels.lora_merged import _kernel_fits, sum_products, sum_products_ref

    g = torch.Generator(device=dev).manual_seed(0)
    rows = []
    for T in Ts:
        dys = [torch.randn(B, T, k, device=dev, dtype=dtype, generator=g) for k in slices]
        Es = [torch.randn(B, k, d, device=dev, dtype=dtype, generator=g) * k ** -0.5 for k in slices]
        if not _kernel_fits(dys, Es):
            raise RuntimeError(f"{KERNEL}: the kernel's domain does not hold at B{B} T{T} {slices} on {dev}")
        ref = sum_products_ref(dys, Es)
        check_close(sum_products(dys, Es), ref, f"sum_products B{B} T{T}")
        dy_cat, E_cat = torch.cat(dys, 2), torch.cat(Es, 1)
        t = time_all({"ours": lambda: sum_products(dys, Es), "bmm+baddbmm": lambda: sum_products_ref(dys, Es),
                      "bmm-concat": lambda: torch.bmm(dy_cat, E_cat)}, timer, f"T{T}")
        flops = 2.0 * B * T * d * sum(slices)
        rows.append(make_row(KERNEL, f"dx over {len(slices)} slices (K {'+'.join(map(str, slices))}): B{B} T{T} N{d}, "
                             f"{str(dtype)[6:]}", t["ours"], "cuBLAS bmm + baddbmm_ per further slice",
                             t["bmm+baddbmm"], concat_bmm_ms=t["bmm-concat"], ours_tflops=tflops(flops, t["ours"]),
                             baseline_tflops=tflops(flops, t["bmm+baddbmm"]),
                             concat_bmm_tflops=tflops(flops, t["bmm-concat"])))
        del dys, Es, dy_cat, E_cat
    return rows


def run(quick: bool = False):
    return measure(torch.device("cuda"), 8 if quick else 64, (2048, 48), SLICES, D, bench_ms, torch.bfloat16)
