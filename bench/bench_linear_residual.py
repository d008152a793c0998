"""``pgolf_kernels.linear_residual`` (a block's residual site in one TMA GEMM: projection, a LoRA's expand and the
scaled residual add in its epilogue) against the torch composition the TTT step runs without it.

Shapes: the records' TTT step on the default model (d 512, MLP 3x), 64 rows x 2048 positions, rank 96: the attention
site (o-projection, K 512) and the MLP site (down-projection, K 1536), shared base weights.

Rows, one process, medians of ``triton.testing.do_bench``:
* forward of each site, per tile config of ``linear_act.TILE_CONFIGS``: against ``res + s * (F.linear(a, W) +
  bmm(u, w2ᵀ))`` under torch.compile (default mode: the GEMMs on cuBLAS, the sum one Triton pass) and against the
  projection's GEMM alone on cuBLAS (``e`` = its time over ours: our GEMM, with the expand and the epilogue, against
  cuBLAS's bare GEMM); on an sm_90 GPU also the warp-specialized Gluon kernel (``linear_act_ws.linear_residual_ws``,
  what ``linear_residual.RES_WS`` runs: ``gluon_ws_ms`` and ``ws_speedup`` = the best tile's time over its);
* forward + backward of each site (gradients to the residual, the input, u and w2; W and s frozen, as in TTT);
* the MLP site with the MLP (``mlp_residual``: activation in the up-projection's epilogue, its derivative in the
  backward's first GEMM) forward + backward against the compiled composition.
"""
from __future__ import annotations

from typing import Dict, List

import torch
import torch.nn.functional as F

from bench.harness import bench_ms, check_close, fwd_bwd, make_row, tflops, time_all

KERNEL = "linear-residual"
# (site, K): N = d = 512
SITES = [("attention o", 512), ("mlp down", 1536)]
RANK = 96


def run(quick: bool = False) -> List[Dict[str, object]]:
    return measure(torch.device("cuda"), 8 if quick else 64, 2048, 512, SITES, RANK, bench_ms, torch.compile,
                   torch.bfloat16)


def _plain(res, a, w, s, u, w2):
    return res + s * (F.linear(a, w) + torch.bmm(u, w2.transpose(1, 2)))


def _plain_mlp(res, x, w_up, w_dn, s, u, w2):
    return res + s * (F.linear(F.leaky_relu(F.linear(x, w_up), 0.5).square(), w_dn) + torch.bmm(u, w2.transpose(1, 2)))


def measure(dev, B: int, T: int, d: int, sites, R: int, timer, compile_fn, dtype) -> List[Dict[str, object]]:
    """The rows of ``run`` on any device and sizes (the CPU test runs it under the interpreter at tiny shapes with a
    stand-in timer)."""
    from pgolf_kernels.linear_act import TILE_CONFIGS, _launch
    from pgolf_kernels.linear_residual import linear_residual, mlp_residual

    g = torch.Generator(device=dev).manual_seed(0)

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, device=dev, dtype=dtype, generator=g) * scale

    res, u, s = rnd(B, T, d), rnd(B, T, R), 0.5 + torch.rand(d, device=dev, generator=g).to(dtype)
    w2 = rnd(B, d, R, scale=R ** -0.5)
    dy = rnd(B, T, d)
    plain = compile_fn(_plain)
    rows = []
    for site, K in sites:
        a, w = rnd(B, T, K), rnd(d, K, scale=K ** -0.5)
        ref = _plain(res, a, w, s, u, w2)
        fns = {"compiled": lambda: plain(res, a, w, s, u, w2), "cublas-gemm": lambda: F.linear(a, w)}
        skipped = {}
        for ci, cfg in enumerate(TILE_CONFIGS):
            try:
                y = _launch(a, w, "residual", 0.0, False, cfg, aux=res, x2=u, w2=w2, scale=s)[0]
            except Exception as e:  # a config over the SM's shared memory: reported, the others still timed
                skipped[ci] = f"{type(e).__name__}: {str(e)[:200]}"
                continue
            check_close(y, ref, f"linear_residual config {cfg} on {site}")
            fns[f"ours-c{ci}"] = (lambda c=cfg: _launch(a, w, "residual", 0.0, False, c, aux=res, x2=u, w2=w2,
                                                        scale=s))
        if a.is_cuda:
            from pgolf_kernels.linear_act_ws import linear_residual_ws, residual_fits

            if residual_fits(a, w, u):
                check_close(linear_residual_ws(res, a, w, s, u, w2), ref, f"linear_residual_ws on {site}")
                fns["gluon-ws"] = lambda: linear_residual_ws(res, a, w, s, u, w2)
        t = time_all(fns, timer, site)
        ours = {k: v for k, v in t.items() if k.startswith("ours-") and v == v}
        if not ours:
            raise RuntimeError(f"linear_residual: no tile config ran on {site}: {skipped}")
        best = min(ours, key=ours.get)
        flops = 2.0 * B * T * d * (K + R)
        rows.append(make_row(KERNEL, f"{site} site forward: B{B} T{T} K{K} N{d} rank {R}, shared W, {str(dtype)[6:]}",
                             t[best], "torch.compile of res + s * (F.linear + bmm)", t["compiled"],
                             cublas_gemm_ms=t["cublas-gemm"], e=t["cublas-gemm"] / t[best],
                             ours_tflops=tflops(flops, t[best]), config=TILE_CONFIGS[int(best[6:])],
                             **({"gluon_ws_ms": t["gluon-ws"], "ws_speedup": t[best] / t["gluon-ws"],
                                 "ws_tflops": tflops(flops, t["gluon-ws"])} if "gluon-ws" in t else {}),
                             all_ms={k: round(v, 4) for k, v in t.items()}, configs_skipped=skipped))
        ins = [t_.clone().requires_grad_() for t_ in (res, a, u, w2)]
        t = time_all({"compiled": fwd_bwd(lambda r, x, uu, ww: plain(r, x, w, s, uu, ww), ins, dy),
                      "ours": fwd_bwd(lambda r, x, uu, ww: linear_residual(r, x, w, s, uu, ww, validate=False),
                                      ins, dy)}, timer, f"{site} fwd+bwd")
        rows.append(make_row(KERNEL, f"{site} site forward + backward (grads to res, a, u, w2): B{B} T{T} K{K} N{d} "
                             f"rank {R}, {str(dtype)[6:]}", t["ours"], "torch.compile of the composition",
                             t["compiled"]))
        del a, w, ins
    H = 3 * d
    x, w_up, w_dn = rnd(B, T, d), rnd(H, d, scale=d ** -0.5), rnd(d, H, scale=H ** -0.5)
    check_close(mlp_residual(res, x, w_up, w_dn, s, 0.5, u, w2), _plain_mlp(res, x, w_up, w_dn, s, u, w2),
                "mlp_residual")
    plain_mlp = compile_fn(_plain_mlp)
    ins = [t_.clone().requires_grad_() for t_ in (res, x, u, w2)]
    t = time_all({"compiled": fwd_bwd(lambda r, xx, uu, ww: plain_mlp(r, xx, w_up, w_dn, s, uu, ww), ins, dy),
                  "ours": fwd_bwd(lambda r, xx, uu, ww: mlp_residual(r, xx, w_up, w_dn, s, 0.5, uu, ww,
                                                                      validate=False), ins, dy)},
                 timer, "mlp site fwd+bwd")
    rows.append(make_row(KERNEL, f"mlp site with the MLP, forward + backward (grads to res, x, u, w2): B{B} T{T} d{d} "
                         f"H{H} rank {R}, shared W, {str(dtype)[6:]}", t["ours"], "torch.compile of the composition",
                         t["compiled"]))
    return rows
