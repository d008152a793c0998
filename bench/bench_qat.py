"""int6 QAT benchmark: the step-time cost of quantization-aware training with our
fused kernel (pgolf_kernels.qat.int6_qat_linear) vs a plain-torch straight-through estimator.

Order: the train-step rows first (the headline figure), then the per-layer rows while the
budget ``PGOLF_QAT_BENCH_BUDGET_S`` (default 420 s, from the start of ``run``) lasts -- the first
H100 run spent its whole 406 s in the per-shape autotune + compile of the layer rows and printed
nothing. Each row is printed as soon as it is measured.

Rows (bf16 autocast activations, fp32 master weights, as the training driver runs them):
  1. ``layer fwd+bwd`` per block-matrix shape of the 11L d512 MLP3x model, M = tokens per
     micro-batch: forward, then dx and dW (autograd.grad), for
       ours        int6_qat_linear (row-scale pre-pass + fused fake-quant matmul, dx kernel, cuBLAS dW)
       torch_ste   int6_qat_linear_ref, eager (fake-quant as torch elementwise ops, cuBLAS matmuls)
       compiled    torch.compile(int6_qat_linear_ref) (inductor fuses the fake-quant passes)
       no_qat      F.linear on the bf16 weight (the cost floor QAT adds to)
     speedup = torch_ste_ms / ours_ms; vs_compiled and overhead_vs_no_qat are extra columns.
  2. ``row scale`` alone (clip search, the artifact codec's rule) for the same shapes: kernel vs
     compiled torch reference.
  3. ``train step``: the whole 11L d512 GPT (torch.compile'd), forward + backward of one
     micro-batch of 16 x 2048 tokens, QAT off / kernel / torch STE (optimizer step excluded:
     it is the same in all three). This is the headline number: ms/step of QAT with
     our kernel vs the plain-torch STE, and both against no QAT.
Timing: triton.testing.do_bench medians (CUDA events); the train-step rows use 10 timed steps after
3 warm-up steps (compile and autotune excluded).

``python -m bench --only qat [--quick]`` on a GPU. ``PGOLF_BENCH_DEVICE=cpu python -m bench.bench_qat``
is a smoke test of this script on tiny shapes (wall-clock timer, numbers meaningless).
"""
from __future__ import annotations

import json
import os
import sys
import time

import torch
import torch.nn.functional as F

KERNEL = "qat"
_T0 = time.perf_counter()


def _left() -> float:
    return float(os.environ.get("PGOLF_QAT_BENCH_BUDGET_S", "420")) - (time.perf_counter() - _T0)


def _emit(row):
    print(json.dumps(row, default=str), flush=True)
    return row
# (N, K) of the block matrices: c_q/proj 512x512, c_k/c_v 256x512, mlp fc 1536x512, mlp proj 512x1536
SHAPES = [(512, 512), (256, 512), (1536, 512), (512, 1536)]
M_ALL = [16384, 65536, 98304]
M_QUICK = [16384]


def _timer(dev):
    if dev == "cuda":
        from bench.harness import bench_ms

        return lambda f: bench_ms(f, warmup=10, rep=50)

    def cpu_ms(f, n=3):
        f()
        t0 = time.perf_counter()
        for _ in range(n):
            f()
        return 1000 * (time.perf_counter() - t0) / n

    return cpu_ms


def _autocast(dev):
    return torch.autocast(dev, dtype=torch.bfloat16) if dev == "cuda" else torch.autocast("cpu", enabled=False)


def _layer_rows(dev, Ms, timer):
    from bench.harness import make_row, time_all
    from pgolf_kernels.qat import int6_qat_linear, int6_qat_linear_ref, qat_row_scale, qat_row_scale_ref
    from pgolf_kernels.testing import rel_err

    ref_c = torch.compile(int6_qat_linear_ref)
    scale_c = torch.compile(qat_row_scale_ref)
    act = torch.bfloat16 if dev == "cuda" else torch.float32
    rows = []
    for N, K in SHAPES:
        if _left() < 60:  # one shape = autotune of 2 kernels + 2 compiles: ~60 s on the H100
            print(f"bench_qat: budget left {_left():.0f} s, layer rows stop before N{N}_K{K}", flush=True)
            break
        g = torch.Generator().manual_seed(N + 3 * K)
        w = (torch.randn(N, K, generator=g) * 0.02).to(dev).requires_grad_()
        t_s = timer(lambda: qat_row_scale(w))
        t_sc = timer(lambda: scale_c(w.detach()))
        rows.append(_emit(make_row(f"{KERNEL}_row_scale", f"N{N}_K{K} search", t_s, "compiled_ref", t_sc)))
        for M in Ms:
            x = torch.randn(M, K, device=dev, dtype=act, requires_grad=True)
            dy = torch.randn(M, N, device=dev, dtype=act)

            def step(fn):
                def f():
                    with _autocast(dev):
                        y = fn(x, w)
                    return torch.autograd.grad(y, (x, w), dy)
                return f

            fns = {
                "ours": step(lambda a, b: int6_qat_linear(a, b)),
                "torch_ste": step(lambda a, b: int6_qat_linear_ref(a, b)),
                "compiled": step(lambda a, b: ref_c(a, b)),
                "no_qat": step(lambda a, b: F.linear(a, b.to(a.dtype))),
            }
            # correctness of this very case: ours vs the torch STE (same math; ours keeps the
            # codes exact in the forward, so small differences are bf16 rounding)
            go, gr = fns["ours"](), fns["torch_ste"]()
            err_dx, err_dw = rel_err(go[0], gr[0]), rel_err(go[1], gr[1])
            t = time_all(fns, timer, f"N={N} K={K} M={M}")
            rows.append(_emit(make_row(
                f"{KERNEL}_layer", f"N{N}_K{K}_M{M} fwd+bwd", t["ours"], "torch_ste", t["torch_ste"],
                compiled_ms=t["compiled"], no_qat_ms=t["no_qat"],
                vs_compiled=round(t["compiled"] / t["ours"], 3),
                overhead_vs_no_qat=round(t["ours"] / t["no_qat"], 3),
                ste_overhead_vs_no_qat=round(min(t["torch_ste"], t["compiled"]) / t["no_qat"], 3),
                rel_diff_dx=f"{err_dx:.2e}", rel_diff_dw=f"{err_dw:.2e}")))
    return rows


def _step_rows(dev, compiled: bool, modes):
    """One train step (fwd + bwd) of the whole model per QAT mode in ``modes`` ("off", "kernel",
    "reference" = plain-torch STE); modes not run are NaN in the row."""
    from bench.harness import make_row
    from train.model import GPT, GPTConfig

    if dev == "cuda":
        cfg, B, T = GPTConfig(), 16, 2048
    else:
        cfg, B, T = GPTConfig(num_layers=2, model_dim=64, num_heads=2, num_kv_heads=1, seq_len=64), 2, 64
    torch.manual_seed(0)
    model = GPT(cfg).to(dev)
    cmodel = torch.compile(model, dynamic=False) if compiled else model
    x = torch.randint(0, cfg.vocab_size, (B, T), device=dev)
    y = torch.randint(0, cfg.vocab_size, (B, T), device=dev)
    n_warm, n_time = (3, 10) if dev == "cuda" else (1, 2)

    def run_steps(n):
        for _ in range(n):
            with _autocast(dev):
                loss = cmodel(x, y).mean()
            loss.backward()
            model.zero_grad(set_to_none=True)
        if dev == "cuda":
            torch.cuda.synchronize()

    nan = float("nan")
    ms = {"off": nan, "kernel": nan, "reference": nan}
    first_s = dict(ms)
    for mode in modes:
        model.set_qat(None if mode == "off" else mode)
        t0 = time.perf_counter()
        run_steps(n_warm)  # compile (one graph per mode) + autotune
        first_s[mode] = time.perf_counter() - t0
        t0 = time.perf_counter()
        run_steps(n_time)
        ms[mode] = 1000 * (time.perf_counter() - t0) / n_time
        print(f"bench_qat: train step ({'compiled' if compiled else 'eager'}) qat={mode}: {ms[mode]:.2f} ms/step "
              f"(first {n_warm} steps incl. compile/autotune {first_s[mode]:.1f} s)", flush=True)
    model.set_qat(None)
    case = f"{cfg.num_layers}L d{cfg.model_dim} B{B} T{T} fwd+bwd " + ("compiled" if compiled else "eager")
    return [_emit(make_row(f"{KERNEL}_train_step", case, ms["kernel"], "torch_ste", ms["reference"],
                           no_qat_ms=ms["off"], qat_cost_ours_ms=ms["kernel"] - ms["off"],
                           qat_cost_torch_ste_ms=ms["reference"] - ms["off"],
                           first_steps_s_off=first_s["off"], first_steps_s_ours=first_s["kernel"],
                           first_steps_s_torch_ste=first_s["reference"]))]


def run(quick: bool = False):
    from bench.harness import env_flag

    dev = os.environ.get("PGOLF_BENCH_DEVICE", "cuda")
    timer = _timer(dev)
    Ms = (M_QUICK if quick else M_ALL) if dev == "cuda" else [64]
    # PGOLF_QAT_STEP: "eager", "compiled" or both (comma list, default "compiled"); PGOLF_QAT_STEP_MODES:
    # which of off,kernel,reference to time (the first H100 run: the compiled plain-torch STE graph was
    # still compiling after 195 s, so it can be given a call of its own)
    modes = os.environ.get("PGOLF_QAT_STEP_MODES", "off,kernel,reference").split(",")
    rows = []
    for kind in os.environ.get("PGOLF_QAT_STEP", "compiled").split(","):
        rows += _step_rows(dev, kind == "compiled" and dev == "cuda", modes)
    if env_flag("PGOLF_QAT_LAYER_ROWS", True):
        rows += _layer_rows(dev, Ms, timer)
    return rows


if __name__ == "__main__":
    from bench.harness import markdown_table

    if os.environ.get("PGOLF_BENCH_DEVICE", "cuda") == "cuda" and not torch.cuda.is_available():
        print("bench_qat: no CUDA GPU; set PGOLF_BENCH_DEVICE=cpu for a smoke run of the script")
        sys.exit(0)
    print(markdown_table(run(quick="--quick" in sys.argv)))
