"""The warp-specialized Gluon kernels of ``pgolf_kernels.linear_act_ws`` per ring tile (``linear_act_ws.TILES``: BK x
STAGES of the operand ring; the 128 x 128 consumer tile fixed), at the shapes of the records' TTT step, against the
default tile (``TILES[DEFAULT_TILE]``) and against cuBLAS's bare GEMM of the same FLOPs (no epilogue: the speed of light the
fusions give up), in one process.

Ops (bf16; 64 rows x 2048 positions, d 512, MLP 1536, adapter rank 96, q / k / v 512 / 256 / 256):

* ``act``: ``linear_act_ws``, the MLP up-projection with h and leaky_relu(h)² stored (131,072 x 512 -> 1536);
* ``act_grad``: ``linear_act_grad_ws``, its backward's derivative GEMM (131,072 x 512 -> 1536, h read);
* ``res_o``: ``linear_residual_ws``, the attention output's residual site with its adapter (K 512 + 96 -> 512);
* ``res_mlp``: the MLP down-projection's residual site (K 1536 + 96 -> 512);
* ``sum``: ``sum_products_ws``, the merged backward's dx over q / k / v and the o shrink (K 512 + 256 + 256 + 96);
* ``rows``: ``linear_rows_ws``, the merged q / k / v forward (N 512 + 256 + 256 per row).

Each tile's output is checked against a torch composition before it is timed (``harness.check_close``). Medians of
``triton.testing.do_bench``; TFLOP/s count the GEMMs' 2·M·N·K.

    python3 -m bench --only ws_tiles       # bench/results/ws-tiles-<gpu>.{json,md}
"""
from __future__ import annotations

import glob
import json
import math
import os
import sys
from typing import Callable, Dict, List, Optional, Tuple

import torch

from bench.harness import bench_ms, check_close, make_row, tflops, time_all

KERNEL = "ws-tiles"
B, T, D, H, R = 64, 2048, 512, 1536, 96
SLICES = (512, 256, 256)
SLOPE = 0.5


def _ops(dev, B: int, T: int, dtype) -> Dict[str, Tuple[Callable, Callable, Callable, float]]:
    """name -> (ours, reference, cuBLAS bare GEMMs, FLOPs), on seeded random inputs."""
    from pgolf_kernels import linear_act_ws as ws

    g = torch.Generator(device=dev).manual_seed(0)

    def rn(*shape, scale=1.0):
        return torch.randn(*shape, device=dev, dtype=dtype, generator=g) * scale

    M = B * T
    x, w_up = rn(M, D), rn(H, D, scale=D ** -0.5)
    gy, w_kn, h0 = rn(M, D), rn(D, H, scale=D ** -0.5), rn(M, H)
    res, a, w_o, s = rn(B, T, D), rn(B, T, D), rn(D, D, scale=D ** -0.5), rn(D, scale=0.5)
    u, w2 = rn(B, T, R), rn(B, D, R, scale=R ** -0.5)
    am, w_dn = rn(B, T, H), rn(D, H, scale=H ** -0.5)
    dys = [rn(B, T, n) for n in SLICES] + [rn(B, T, R)]
    Es = [rn(B, n, D, scale=n ** -0.5) for n in SLICES] + [rn(B, R, D, scale=R ** -0.5)]
    xq = rn(B, T, D)
    Ef = [rn(B, n, D, scale=D ** -0.5) for n in SLICES]

    def act_ref():
        hh = x @ w_up.t()
        hf = hh.float()
        return torch.where(hf > 0, hf, SLOPE * hf).square().to(dtype)

    def grad_ref():
        hf = h0.float()
        return ((gy @ w_kn).float() * 2.0 * torch.where(hf > 0, hf, SLOPE * SLOPE * hf)).to(dtype)

    def res_ref(aa, ww):
        acc = (aa @ ww.t()).float() + torch.bmm(u, w2.transpose(1, 2)).float()
        return (res.float() + s.float() * acc).to(dtype)

    def sum_ref():
        return sum(torch.bmm(d, E).float() for d, E in zip(dys, Es)).to(dtype)

    return {
        "act": (lambda: ws.linear_act_ws(x, w_up, SLOPE)[0], act_ref, lambda: x @ w_up.t(), 2.0 * M * D * H),
        "act_grad": (lambda: ws.linear_act_grad_ws(gy, w_kn, h0, SLOPE), grad_ref, lambda: gy @ w_kn,
                     2.0 * M * D * H),
        "res_o": (lambda: ws.linear_residual_ws(res, a, w_o, s, u, w2), lambda: res_ref(a, w_o),
                  lambda: (a @ w_o.t(), torch.bmm(u, w2.transpose(1, 2))), 2.0 * M * D * (D + R)),
        "res_mlp": (lambda: ws.linear_residual_ws(res, am, w_dn, s, u, w2), lambda: res_ref(am, w_dn),
                    lambda: (am @ w_dn.t(), torch.bmm(u, w2.transpose(1, 2))), 2.0 * M * D * (H + R)),
        "sum": (lambda: ws.sum_products_ws(dys, Es), sum_ref, lambda: [torch.bmm(d, E) for d, E in zip(dys, Es)],
                2.0 * M * D * (sum(SLICES) + R)),
        "rows": (lambda: ws.linear_rows_ws(xq, Ef), lambda: torch.cat([torch.bmm(xq, E.transpose(1, 2)) for E in Ef], 2),
                 lambda: [torch.bmm(xq, E.transpose(1, 2)) for E in Ef], 2.0 * M * D * sum(SLICES)),
    }


def measure(dev, B: int, T: int, timer, dtype=torch.bfloat16) -> List[Dict[str, object]]:
    """One row per (op, tile): the tile's ms against the default tile's and cuBLAS's (``run``'s rows; the CPU test
    checks the rows' form with a stub timer)."""
    from pgolf_kernels import linear_act_ws as ws

    start = (ws.BK, ws.STAGES)
    ops = _ops(dev, B, T, dtype)
    times: Dict[Tuple[str, Tuple[int, int]], float] = {}
    cublas = time_all({name: op[2] for name, op in ops.items()}, timer, "cuBLAS")
    try:
        for tile in ws.TILES:
            ws.use_tile(*tile)
            for name, (ours, ref, _, _) in ops.items():
                try:
                    out = ours()
                    check_close(torch.cat(out, 2) if isinstance(out, list) else out, ref(), f"{name} at tile {tile}")
                    times[(name, tile)] = timer(ours)
                except Exception as e:   # a tile that does not build or is off is a row with its reason
                    print(f"{name} at tile {tile}: {type(e).__name__}: {str(e)[:300]}", flush=True)
                    times[(name, tile)] = float("nan")
    finally:
        ws.use_tile(*start)
    rows = []
    default = ws.TILES[ws.DEFAULT_TILE]
    for name, (_, _, _, flops) in ops.items():
        base = times[(name, default)]
        for tile in ws.TILES:
            t = times[(name, tile)]
            rows.append(make_row(KERNEL, f"{name} B{B} T{T}, BK {tile[0]} x {tile[1]} stages", t,
                                 f"default tile (BK {default[0]} x {default[1]} stages)", base,
                                 cublas_ms=cublas[name], vs_cublas=round(cublas[name] / t, 4) if t == t else float("nan"),
                                 ours_tflops=tflops(flops, t), cublas_tflops=tflops(flops, cublas[name])))
    return rows


def run(quick: bool = False):
    return measure(torch.device("cuda"), 8 if quick else B, T, bench_ms)


# the ops the kernel path's defaults run (rows: linear_rows_ws, behind lora_merged.QKV_WS, off)
DEFAULT_OPS = ("act", "act_grad", "res_o", "res_mlp", "sum")


def best_tile(rows: List[Dict[str, object]], ops=DEFAULT_OPS) -> Optional[int]:
    """The index into ``linear_act_ws.TILES`` of the tile with the least time summed over the ``ops`` of ``rows`` (a
    tile with any of them failed or unchecked, NaN, is out); None when none is complete. Why not every op: on an H200
    (ws-tiles-h200.md) BK 64 x 5 stages was the fastest at every default op but 1.5x slower at ``rows``, which the
    defaults do not run, and the records' step agreed with the first (profile-ttt-h200.md measurement 12)."""
    from pgolf_kernels.linear_act_ws import TILES

    total = {}
    for i, (bk, st) in enumerate(TILES):
        ms = [r["ours_ms"] for r in rows if str(r["case"]).endswith(f"BK {bk} x {st} stages")
              and str(r["case"]).split(" ")[0] in ops]
        if ms and all(math.isfinite(m) for m in ms):
            total[i] = sum(ms)
    return min(total, key=total.get) if total else None


if __name__ == "__main__":   # python3 -m bench.bench_ws_tiles DIR: best_tile of DIR's ws-tiles-*.json ("" when none)
    found = sorted(glob.glob(os.path.join(sys.argv[1] if len(sys.argv) > 1 else ".", f"{KERNEL}-*.json")))
    best = best_tile(json.load(open(found[-1]))["rows"]) if found else None
    print("" if best is None else best)
