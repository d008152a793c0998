"""The TTT eval's adapter optimizer step (``train.ttt_optim.BatchedAdam``, per row, AdamW beta1 = 0 as the records'
recipe) fused (``pgolf_kernels.adam_rows``: one pass per parameter) against the torch ops the ``--reference`` path
runs (eager, and the same step under ``torch.compile``).

Parameters: the adapters ``train.adapters.DocLoRA`` builds for the default 11-layer model (d 512, 8 / 4 heads) at
64 rows: the records' recipe (rank 96 on q, k, v, o, mlp and the head: 320.9 M fp32 parameters) and the seeds'
(rank 8 on q, v and the head: 10.9 M). Timing: CUDA-graph replay of one whole step (the eval replays it inside each
captured TTT step). GB/s counts the bytes per parameter the update must move: 28 (read p, g, m, v; write p, m, v),
or 20 with beta1 = 0, where the fused step keeps no first moment (m = g).
"""
from __future__ import annotations

from typing import Dict, List

import torch

from bench.harness import gbps, graph_bench_ms, make_row, time_all

KERNEL = "ttt-optim"


def _adapters(recipe_name: str, dev):
    from train.adapters import DocLoRA
    from train.model import GPT, GPTConfig
    from train.ttt_config import recipe

    cfg = recipe(recipe_name, batch_size=64)
    model = GPT(GPTConfig()).to(dev)
    return DocLoRA(model, cfg, cfg.batch_size, dev, "bmm"), cfg


def run(quick: bool = False) -> List[Dict[str, object]]:
    from train.ttt_optim import BatchedAdam

    dev = torch.device("cuda")
    rows = []
    for name in (("seeds",) if quick else ("records", "seeds")):
        ad, cfg = _adapters(name, dev)
        wd = cfg.weight_decay if cfg.optimizer == "adamw" else 0.0
        n = sum(p.numel() for p in ad.params)
        need = 20 if cfg.beta1 == 0 else 28   # bytes per parameter (module docstring)
        g = torch.Generator(device=dev).manual_seed(0)
        for p in ad.params:
            p.grad = torch.randn(p.shape, device=dev, generator=g)

        grads = [p.grad for p in ad.params]

        def make(fused: bool, compiled: bool = False):
            opt = BatchedAdam(ad.params, cfg.lr, (cfg.beta1, cfg.beta2), cfg.eps, per_row=True, weight_decay=wd,
                              fused=fused)
            opt_step = torch.compile(opt.step) if compiled else opt.step

            def step():
                for p, gr in zip(ad.params, grads):  # the step clears .grad: hand the same gradients back
                    p.grad = gr
                opt_step()
            return step

        fused, torch_ops, compiled = make(True), make(False), make(False, compiled=True)
        t = time_all({"fused": fused, "torch": torch_ops, "compiled": compiled}, graph_bench_ms, name)
        base = min(t["torch"], t["compiled"])
        rows.append(make_row(KERNEL, f"{name} recipe adapters, 64 rows: {n / 1e6:.1f} M fp32 params, "
                             f"{cfg.optimizer} beta1 {cfg.beta1}", t["fused"],
                             "BatchedAdam torch ops (eager / torch.compile, faster)", base, torch_ms=t["torch"],
                             compiled_ms=t["compiled"], fused_gbps=gbps(need * n, t["fused"]),
                             torch_gbps_of_needed=gbps(need * n, t["torch"]), params=n,
                             bytes_per_param=need))
        del ad
        torch.cuda.empty_cache()
    return rows
