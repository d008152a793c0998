"""``pgolf_kernels.linear_act`` (persistent TMA GEMM, activation in the epilogue) against what the TTT step runs today.

Shapes: the records' TTT step on the default model (d 512, MLP 3x, 4 of 8 kv heads), 64 rows x 2048 positions:
the MLP up-projection (N 1536) and the q (512) and k / v (256) projections, each with one weight per row (the
merged-LoRA weights E[b] of the kernel path) and shared (a target without an adapter); K = 512.

Contestants, one process, medians of ``triton.testing.do_bench``:
* ``cublas``: the GEMM alone (``torch.bmm`` / ``F.linear``): the denominator of the GEMM efficiency e;
* ``cublas+act``: the GEMM, then leaky_relu(h, 0.5)² as Inductor compiles it (torch.compile, default mode: the
  GEMM stays on cuBLAS, the activation is one Triton pass), what the kernel path runs now;
* ``ours-none`` / ``ours-act`` / ``ours-act-save``: this kernel without an epilogue, with the activation (scoring:
  y only), and with the activation plus h stored (training), for each tile config of ``CONFIGS``.

The question (``docs/STATUS.md``, case (c)): 1.5x over the reference needs GEMMs at e >= 0.73-1.0 of cuBLAS with
the element-wise passes absorbed. ``e_none`` = cublas / ours-none; ``act_speedup`` = (cublas+act) / ours-act.
"""
from __future__ import annotations

from typing import Dict, List

import torch
import torch.nn.functional as F

from bench.harness import bench_ms, make_row, tflops, time_all

KERNEL = "linear-act"
# (name, N): K = 512, 64 rows x 2048 positions
SHAPES = [("mlp-up", 1536), ("q", 512), ("kv", 256)]
CONFIGS = [dict(BM=128, BN=128, BK=64, num_warps=8, num_stages=3),
           dict(BM=128, BN=256, BK=64, num_warps=8, num_stages=3),
           dict(BM=128, BN=128, BK=64, num_warps=4, num_stages=4),
           dict(BM=64, BN=256, BK=64, num_warps=4, num_stages=4)]


def _act(h):
    return F.leaky_relu(h, 0.5).square()


def run(quick: bool = False) -> List[Dict[str, object]]:
    from pgolf_kernels import linear_act as mod

    dev = torch.device("cuda")
    B, T, K = (8 if quick else 64), 2048, 512
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(B, T, K, device=dev, dtype=torch.bfloat16, generator=g)
    gemm_act = torch.compile(lambda a, w: _act(torch.bmm(a, w.transpose(1, 2))))
    lin_act = torch.compile(lambda a, w: _act(F.linear(a, w)))
    rows = []
    for name, N in (SHAPES[:1] if quick else SHAPES):
        for per_row in (True, False):
            w = torch.randn(*((B, N, K) if per_row else (N, K)), device=dev, dtype=torch.bfloat16, generator=g) * 0.05
            # correctness on these exact inputs before any timing: y against torch's own composition
            y_ref = _act(torch.bmm(x, w.transpose(1, 2)) if per_row else F.linear(x, w))
            fns = {"cublas": (lambda: torch.bmm(x, w.transpose(1, 2))) if per_row else (lambda: F.linear(x, w)),
                   "cublas+act": (lambda: gemm_act(x, w)) if per_row else (lambda: lin_act(x, w))}
            skipped = {}
            for ci, cfg in enumerate(CONFIGS):
                try:
                    y, _ = mod._launch(x, w, "leaky_relu_sq", 0.5, False, cfg)
                except Exception as e:  # a tile config over the SM's shared memory: say so, time the others
                    skipped[ci] = f"{type(e).__name__}: {str(e)[:200]}"
                    print(f"{name} per_row={per_row} config {cfg}: {skipped[ci]}", flush=True)
                    continue
                err = ((y.float() - y_ref.float()).norm() / y_ref.float().norm()).item()
                if not err < 2e-2:
                    raise RuntimeError(f"linear_act config {cfg}: relative error {err:.3g} against torch on {name}")
                for mode, act, save in (("none", "none", False), ("act", "leaky_relu_sq", False),
                                        ("act-save", "leaky_relu_sq", True)):
                    fns[f"ours-{mode}-c{ci}"] = (lambda c=cfg, a=act, s=save: mod._launch(x, w, a, 0.5, s, c))
            t = time_all(fns, bench_ms, f"{name} per_row={per_row}")
            flops = 2.0 * B * T * N * K

            def best(mode):
                xs = {ci: t[f"ours-{mode}-c{ci}"] for ci in range(len(CONFIGS)) if ci not in skipped}
                if not xs:
                    raise RuntimeError(f"linear_act: no tile config ran on {name}: {skipped}")
                ci = min(xs, key=lambda k: xs[k] if xs[k] == xs[k] else float("inf"))
                return xs[ci], ci

            none_ms, none_c = best("none")
            act_ms, act_c = best("act")
            save_ms, save_c = best("act-save")
            rows.append(make_row(
                KERNEL, f"{name}: B{B} T{T} K{K} N{N}, {'per-row weights' if per_row else 'shared weight'}, bf16",
                act_ms, "cuBLAS GEMM + compiled leaky_relu(h, 0.5)^2", t["cublas+act"],
                cublas_ms=t["cublas"], ours_none_ms=none_ms, ours_act_save_ms=save_ms,
                e_none=t["cublas"] / none_ms, act_speedup=t["cublas+act"] / act_ms,
                act_save_speedup=t["cublas+act"] / save_ms, cublas_tflops=tflops(flops, t["cublas"]),
                ours_none_tflops=tflops(flops, none_ms), config_none=CONFIGS[none_c], config_act=CONFIGS[act_c],
                config_act_save=CONFIGS[save_c],
                all_ms={k: round(v, 4) for k, v in t.items()}, configs_skipped=skipped))
            del w
    return rows
