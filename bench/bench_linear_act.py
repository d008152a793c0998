"""``pgolf_kernels.linear_act`` (persistent TMA GEMM, activation or its derivative in the epilogue) against what the
TTT step runs today.

Shapes: the records' TTT step on the default model (d 512, MLP 3x, 4 of 8 kv heads), 64 rows x 2048 positions:
the MLP up-projection (N 1536) and the q (512) and k / v (256) projections, each with one weight per row (the
merged-LoRA weights E[b] of the kernel path) and shared (a target without an adapter); K = 512.

Rows, one process, medians of ``triton.testing.do_bench``:
* forward, per shape: ``cublas`` (the GEMM alone, ``torch.bmm`` / ``F.linear``: the denominator of the GEMM
  efficiency e), ``cublas+act`` (the GEMM, then leaky_relu(h, 0.5)² compiled by Inductor in its default mode: the
  GEMM stays on cuBLAS, the activation is one Triton pass; what the kernel path runs now), and this kernel without
  an epilogue (``ours-none``), with the activation (``ours-act``, scoring) and with h stored too (``ours-act-save``,
  training), for each tile config of ``CONFIGS``;
* the MLP backward's first GEMM, dh = (dy · W_down) ⊙ act'(h): cuBLAS bmm + compiled derivative against the kernel's
  gradient epilogue (W_down read as a (K, N) weight);
* the whole MLP forward + backward: the plain composition under torch.compile (default mode) against
  ``mlp_leaky_sq`` (two fused kernels, the other GEMMs on cuBLAS);
* with ``PGOLF_LINEAR_ACT_WS=1`` (Hopper), the warp-specialized Gluon kernel ``linear_act_ws`` on the MLP
  up-projection against this kernel's default tile (``_ws_rows``).

The question (``docs/STATUS.md``, case (c)): 1.5x over the reference needs GEMMs at e >= 0.73-1.0 of cuBLAS with the
element-wise passes absorbed. ``e_none`` = cublas / ours-none; ``speedup`` = baseline / ours.
"""
from __future__ import annotations

from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

from bench.harness import bench_ms, check_close, env_flag, fwd_bwd, make_row, tflops, time_all

KERNEL = "linear-act"
# (name, N): K = 512, 64 rows x 2048 positions
SHAPES = [("mlp-up", 1536), ("q", 512), ("kv", 256)]
from pgolf_kernels.linear_act import TILE_CONFIGS as CONFIGS  # noqa: E402  (the kernel's own candidates)


def _act(h):
    return F.leaky_relu(h, 0.5).square()


def _act_grad(g, h):
    from pgolf_kernels.linear_act import act_grad_ref  # torch ops: what Inductor compiles for the baseline

    return act_grad_ref(g, h, "leaky_relu_sq", 0.5)


def _configs(label: str, launch: Callable[[dict], torch.Tensor], ref: torch.Tensor) -> Dict[int, str]:
    """Run every tile config once, check it against ``ref`` (relative error < 2e-2, bf16); returns the configs that
    did not run (a config over the SM's shared memory is reported, the others are still timed)."""
    skipped = {}
    for ci, cfg in enumerate(CONFIGS):
        try:
            y = launch(cfg)
        except Exception as e:
            skipped[ci] = f"{type(e).__name__}: {str(e)[:200]}"
            print(f"{label} config {cfg}: {skipped[ci]}", flush=True)
            continue
        check_close(y, ref, f"linear_act config {cfg} on {label}")
    return skipped


def _best(t: Dict[str, float], mode: str, skipped: Dict[int, str], label: str):
    xs = {ci: t[f"ours-{mode}-c{ci}"] for ci in range(len(CONFIGS)) if ci not in skipped}
    xs = {k: v for k, v in xs.items() if v == v}
    if not xs:
        raise RuntimeError(f"linear_act: no tile config ran on {label}: {skipped}")
    ci = min(xs, key=xs.get)
    return xs[ci], CONFIGS[ci]


def run(quick: bool = False) -> List[Dict[str, object]]:
    return measure(torch.device("cuda"), 8 if quick else 64, 2048, 512, SHAPES[:1] if quick else SHAPES, 1536,
                   bench_ms, torch.compile, torch.bfloat16)


def measure(dev, B: int, T: int, K: int, shapes, H: int, timer, compile_fn, dtype) -> List[Dict[str, object]]:
    """The rows of ``run`` on any device and sizes (the CPU test runs it under the interpreter at tiny shapes with a
    stand-in timer, so the bench's wiring and checks are tested before a GPU call)."""
    from pgolf_kernels import linear_act as mod

    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(B, T, K, device=dev, dtype=dtype, generator=g)
    gemm_act = compile_fn(lambda a, w: _act(torch.bmm(a, w.transpose(1, 2))))
    lin_act = compile_fn(lambda a, w: _act(F.linear(a, w)))
    rows = []
    for name, N in shapes:
        for per_row in (True, False):
            label = f"{name} per_row={per_row}"
            w = torch.randn(*((B, N, K) if per_row else (N, K)), device=dev, dtype=dtype, generator=g) * 0.05
            y_ref = _act(torch.bmm(x, w.transpose(1, 2)) if per_row else F.linear(x, w))
            skipped = _configs(label, lambda c: mod._launch(x, w, "leaky_relu_sq", 0.5, False, c)[0], y_ref)
            fns = {"cublas": (lambda: torch.bmm(x, w.transpose(1, 2))) if per_row else (lambda: F.linear(x, w)),
                   "cublas+act": (lambda: gemm_act(x, w)) if per_row else (lambda: lin_act(x, w))}
            for ci, cfg in enumerate(CONFIGS):
                if ci in skipped:
                    continue
                for mode, act, save in (("none", "none", False), ("act", "leaky_relu_sq", False),
                                        ("act-save", "leaky_relu_sq", True)):
                    fns[f"ours-{mode}-c{ci}"] = (lambda c=cfg, a=act, s=save: mod._launch(x, w, a, 0.5, s, c))
            t = time_all(fns, timer, label)
            flops = 2.0 * B * T * N * K
            none_ms, none_cfg = _best(t, "none", skipped, label)
            act_ms, act_cfg = _best(t, "act", skipped, label)
            save_ms, save_cfg = _best(t, "act-save", skipped, label)
            rows.append(make_row(
                KERNEL, f"{name} forward: B{B} T{T} K{K} N{N}, {'per-row weights' if per_row else 'shared weight'}, "
                f"{str(dtype)[6:]}", act_ms, "cuBLAS GEMM + compiled leaky_relu(h, 0.5)^2", t["cublas+act"],
                cublas_ms=t["cublas"], ours_none_ms=none_ms, ours_act_save_ms=save_ms, e_none=t["cublas"] / none_ms,
                act_save_speedup=t["cublas+act"] / save_ms, cublas_tflops=tflops(flops, t["cublas"]),
                ours_none_tflops=tflops(flops, none_ms), config_none=none_cfg, config_act=act_cfg,
                config_act_save=save_cfg, all_ms={k: round(v, 4) for k, v in t.items()}, configs_skipped=skipped))
            del w
    rows += _mlp_rows(mod, x, B, T, K, H, g, timer, compile_fn)
    if env_flag("PGOLF_LINEAR_ACT_WS"):
        rows += _ws_rows(mod, x, H, g, timer, compile_fn)
    return rows


def _ws_rows(mod, x, N, g, timer, compile_fn) -> List[Dict[str, object]]:
    """``PGOLF_LINEAR_ACT_WS=1`` (Hopper): the warp-specialized Gluon kernel (``pgolf_kernels.linear_act_ws``,
    experimental) on the MLP up-projection with a shared weight and h stored, against this kernel's default tile in
    the same epilogue and against cuBLAS + the compiled activation. Opt-in: a synchronisation bug in a
    warp-specialized kernel hangs rather than fails, and a hang must not cost the other rows (the lane's ``ws``
    stage runs ``tests/test_linear_act_ws.py -m gpu`` under a timeout first)."""
    from pgolf_kernels.linear_act_ws import linear_act_ws

    x2 = x.reshape(-1, x.shape[-1])
    M, K = x2.shape
    w = torch.randn(N, K, device=x.device, dtype=x.dtype, generator=g) * 0.05
    y_ref = _act(F.linear(x2, w))
    check_close(linear_act_ws(x2, w)[0], y_ref, "linear_act_ws on the MLP up-projection")
    lin_act = compile_fn(lambda a, ww: _act(F.linear(a, ww)))
    cfg = mod.default_config(M, N, K, True, x.dtype)
    t = time_all({"ws": lambda: linear_act_ws(x2, w), "ours-act-save": lambda: mod._launch(x2, w, "leaky_relu_sq", 0.5,
                                                                                             True, cfg),
                  "cublas+act": lambda: lin_act(x2, w), "cublas": lambda: F.linear(x2, w)}, timer, "ws")
    flops = 2.0 * M * N * K
    return [make_row(KERNEL, f"mlp-up forward, warp-specialized Gluon kernel (h stored): M{M} K{K} N{N}, shared weight, "
                     f"{str(x.dtype)[6:]}", t["ws"], "linear_act's default tile, the same epilogue", t["ours-act-save"],
                     cublas_act_ms=t["cublas+act"], cublas_ms=t["cublas"], ws_tflops=tflops(flops, t["ws"]),
                     ours_tflops=tflops(flops, t["ours-act-save"]), cublas_tflops=tflops(flops, t["cublas"]),
                     config=cfg)]


def _mlp_rows(mod, x, B, T, d, H, g, timer, compile_fn) -> List[Dict[str, object]]:
    """The MLP backward's dh GEMM and the whole MLP fwd + bwd, per-row weights (the kernel path's merged LoRA)."""
    rows = []
    w_up = torch.randn(B, H, d, device=x.device, dtype=x.dtype, generator=g) * 0.04
    w_dn = torch.randn(B, d, H, device=x.device, dtype=x.dtype, generator=g) * 0.02
    dy = torch.randn(B, T, d, device=x.device, dtype=x.dtype, generator=g)
    h = torch.bmm(x, w_up.transpose(1, 2))
    label = "mlp dh"
    dh_ref = _act_grad(torch.bmm(dy, w_dn), h)
    skipped = _configs(label, lambda c: mod._launch(dy, w_dn, "leaky_relu_sq_grad", 0.5, False, c, aux=h,
                                                     w_kn=True)[0], dh_ref)
    dh_c = compile_fn(lambda a, w, hh: _act_grad(torch.bmm(a, w), hh))
    fns = {"cublas": lambda: torch.bmm(dy, w_dn), "cublas+act": lambda: dh_c(dy, w_dn, h)}
    for ci, cfg in enumerate(CONFIGS):
        if ci not in skipped:
            fns[f"ours-grad-c{ci}"] = (lambda c=cfg: mod._launch(dy, w_dn, "leaky_relu_sq_grad", 0.5, False, c,
                                                                 aux=h, w_kn=True))
    t = time_all(fns, timer, label)
    grad_ms, grad_cfg = _best(t, "grad", skipped, label)
    rows.append(make_row(KERNEL, f"mlp backward dh = (dy W_down) * act'(h): B{B} T{T} K{d} N{H}, per-row weights, "
                         f"{str(x.dtype)[6:]}", grad_ms, "cuBLAS bmm + compiled derivative", t["cublas+act"], cublas_ms=t["cublas"],
                         e_grad=t["cublas"] / grad_ms, config=grad_cfg,
                         all_ms={k: round(v, 4) for k, v in t.items()}, configs_skipped=skipped))

    xs = x.detach().clone().requires_grad_()
    wu, wd = w_up.clone().requires_grad_(), w_dn.clone().requires_grad_()
    plain = compile_fn(lambda a, u, v: torch.bmm(_act(torch.bmm(a, u.transpose(1, 2))), v.transpose(1, 2)))

    t = time_all({"compiled": fwd_bwd(plain, (xs, wu, wd), dy),
                  "ours": fwd_bwd(lambda a, u, v: mod.mlp_leaky_sq(a, u, v, validate=False), (xs, wu, wd), dy)},
                 timer, "mlp fwd+bwd")
    flops = 2.0 * B * T * d * H * 2 * 3  # two GEMMs forward, each twice more backward (dx and dW)
    rows.append(make_row(KERNEL, f"mlp forward + backward: B{B} T{T} d{d} H{H}, per-row weights (dx, dW_up, dW_down), "
                         f"{str(x.dtype)[6:]}", t["ours"], "torch.compile of the plain MLP (default mode)", t["compiled"],
                         ours_tflops=tflops(flops, t["ours"]), baseline_tflops=tflops(flops, t["compiled"])))
    return rows
