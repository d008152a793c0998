"""int6 dequant-matmul benchmark: forward y = x (q s)^T and input gradient dx = dy (q s).

For every weight shape N x K and token count M, in one run, bf16 activations:
  ours          int6_linear / int6_linear_dx (Triton, codes dequantized in registers)
  cublas_bf16   F.linear(x, W_bf16) / dy @ W_bf16 on a cached bf16 weight (the speed of light here)
  deq+linear    dequantize per call, then F.linear / matmul (what the records do at load, per call)
  compiled      torch.compile(dynamic=True) of deq+linear (fused dequant kernel + cuBLAS)

Timing: all four are timed by CUDA-graph replay (``harness.graph_bench_ms``): GPU time without
Python dispatch overhead, as in a captured train/eval step. Inputs are not rotated, so the
operands of cases whose x/y fit the 50-60 MB L2 (M <= ~16384 at K = N = 512) stay L2-resident
for every contestant alike.
FLOPs = 2 M N K. Bytes moved (bf16 = 2 B, codes 1 B, scales 2 B):
  fwd ours   2MK + NK + 2N + 2MN      fwd cuBLAS   2MK + 2NK + 2MN
  dx  ours   2MN + NK + 2N + 2MK      dx  cuBLAS   2MN + 2NK + 2MK
Every row also carries the relative error of ours vs an fp32 GEMM on the exact weights and the
autotuned config: (swap, BM tokens, weight-row tile, weight-col tile, split-K, warps, stages).

``python -m bench --only int6 [--quick]`` (GPU). ``python -m bench.bench_int6 --codec`` (CPU):
codec timings (quantize 36 M params, pack/unpack, bits/param) to bench/results/int6-codec-cpu.md.
"""
from __future__ import annotations

import json
import os
import sys
import time

import torch
import torch.nn.functional as F

KERNEL = "int6"
SHAPES = [(512, 512), (256, 512), (1536, 512), (2048, 512), (512, 1536), (512, 2048), (1024, 512), (8192, 512)]
M_ALL = [1, 16, 64, 256, 1024, 4096, 16384, 65536, 131072]
M_QUICK = [1, 16, 256, 4096, 65536]


def _cfg_str(tuner) -> str:
    c = getattr(tuner, "best_config", None)
    if c is None:
        return ""
    k = c.kwargs
    return f"s{k['SWAP']} {k['BM']}x{k.get('BN')}x{k.get('BK')} sk{k['SPLIT']} w{c.num_warps} st{c.num_stages}"


def _deq_linear(x, q, s):
    return F.linear(x, (q.float() * s.float()[:, None]).to(x.dtype))


def _deq_dx(dy, q, s):
    return dy @ (q.float() * s.float()[:, None]).to(dy.dtype)


def _partial_dump(rows):
    d = os.environ.get("PGOLF_BENCH_RESULTS")
    if d:
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "int6-partial.json"), "w") as f:
            json.dump(rows, f, indent=0)


def run(quick: bool = False):
    from bench.harness import gbps, graph_bench_ms, make_row, tflops, time_all
    from pgolf_kernels import int6_linear as mod
    from pgolf_kernels.quant import quantize_rows
    from pgolf_kernels.testing import rel_err

    deadline = float(os.environ.get("PGOLF_BENCH_DEADLINE", "inf"))  # epoch seconds; skip what won't fit
    Ms = M_QUICK if quick else M_ALL
    dev = os.environ.get("PGOLF_BENCH_DEVICE", "cuda")  # "cpu" only for a smoke test of this script
    fwd_c = torch.compile(_deq_linear, dynamic=True)
    dx_c = torch.compile(_deq_dx, dynamic=True)
    rows = []
    for N, K in SHAPES:
        g = torch.Generator().manual_seed(N * 7 + K)
        qt = quantize_rows(torch.randn(N, K, generator=g) * 0.02, 6)
        q, s = qt.q.to(dev), qt.scale.to(dev)
        w32 = q.float() * s.float()[:, None]
        wbf = w32.bfloat16()
        for M in Ms:
            if time.time() > deadline:
                print(f"deadline reached: skipping N={N} K={K} M={M}", flush=True)
                continue
            x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
            dy = torch.randn(M, N, device=dev, dtype=torch.bfloat16)
            # first eager calls: autotune, compile, and the correctness numbers of this very case
            y = mod.int6_linear(x, q, s)
            cfg_f = _cfg_str(mod._fwd_tuned)
            dx = mod.int6_linear_dx(dy, q, s)
            cfg_d = _cfg_str(mod._dx_tuned)
            err_f = rel_err(y, x.float() @ w32.T)
            err_d = rel_err(dx, dy.float() @ wbf.float())
            err_fb = rel_err(F.linear(x, wbf), x.float() @ w32.T)
            fwd_c(x, q, s)
            dx_c(dy, q, s)
            del y, dx
            # CUDA-graph replay everywhere: do_bench on the eager op measured Python dispatch
            # (custom op + autotuner + launcher, ~70-100 us/call on the H200 host) up to M=16384,
            # not the kernel. Fewer replays where one call is >= 0.1 ms.
            big = M * max(N, K) >= (1 << 26)
            timer = (lambda f: graph_bench_ms(f, n_inner=4, reps=10)) if big else graph_bench_ms
            method = "cuda-graph"
            for direction in ("fwd", "dx"):
                if direction == "fwd":
                    fns = {
                        "ours": lambda: mod.int6_linear(x, q, s),
                        "cublas_bf16": lambda: F.linear(x, wbf),
                        "deq+linear": lambda: _deq_linear(x, q, s),
                        "compiled": lambda: fwd_c(x, q, s),
                    }
                    b_ours = 2 * M * K + N * K + 2 * N + 2 * M * N
                    b_cub = 2 * M * K + 2 * N * K + 2 * M * N
                    err, cfg = err_f, cfg_f
                else:
                    fns = {
                        "ours": lambda: mod.int6_linear_dx(dy, q, s),
                        "cublas_bf16": lambda: dy @ wbf,
                        "deq+linear": lambda: _deq_dx(dy, q, s),
                        "compiled": lambda: dx_c(dy, q, s),
                    }
                    b_ours = 2 * M * N + N * K + 2 * N + 2 * M * K
                    b_cub = 2 * M * N + 2 * N * K + 2 * M * K
                    err, cfg = err_d, cfg_d
                t = time_all(fns, timer, f"{direction} N={N} K={K} M={M}")
                flops = 2.0 * M * N * K
                rows.append(
                    make_row(
                        f"{KERNEL}_{direction}", f"N{N}_K{K}_M{M}", t["ours"], "cublas_bf16", t["cublas_bf16"],
                        ours_us=t["ours"] * 1e3, cublas_us=t["cublas_bf16"] * 1e3,
                        deq_us=t["deq+linear"] * 1e3, compiled_us=t["compiled"] * 1e3,
                        vs_deq=round(t["deq+linear"] / t["ours"], 3), vs_compiled=round(t["compiled"] / t["ours"], 3),
                        tflops=tflops(flops, t["ours"]), tflops_cublas=tflops(flops, t["cublas_bf16"]),
                        gbps=gbps(b_ours, t["ours"]), bytes=b_ours, bytes_cublas=b_cub,
                        rel_err=f"{err:.2e}", **({"rel_err_torch_bf16": f"{err_fb:.2e}"} if direction == "fwd" else {}),
                        config=cfg, timing=method,
                    )
                )
                r = rows[-1]
                print(f"{direction:3s} N={N:5d} K={K:5d} M={M:6d} ours {t['ours']*1e3:9.2f}us cublas {t['cublas_bf16']*1e3:9.2f}us "
                      f"deq {t['deq+linear']*1e3:9.2f}us comp {t['compiled']*1e3:9.2f}us x{r['speedup']:.2f} "
                      f"{r['tflops']:.0f}TF err {err:.1e} [{cfg}]", flush=True)
            del x, dy
            _partial_dump(rows)
    return rows


def codec_rows():
    """CPU codec numbers on this machine (threads = torch.get_num_threads())."""
    from bench.harness import make_row
    from pgolf_kernels.quant import pack_artifact, quantize_rows, unpack_artifact

    rows = []
    nthr = torch.get_num_threads()
    w = torch.randn(70_312, 512) * 0.02  # 36.0 M params, d=512 rows like the records' matrices
    t0 = time.perf_counter()
    qs = quantize_rows(w, 6, "search")
    ts = time.perf_counter() - t0
    t0 = time.perf_counter()
    qa = quantize_rows(w, 6, "absmax")
    ta = time.perf_counter() - t0
    mse_s = ((qs.q.float() * qs.scale.float()[:, None] - w) ** 2).mean().item()
    mse_a = ((qa.q.float() * qa.scale.float()[:, None] - w) ** 2).mean().item()
    rows.append(make_row("int6_codec", f"quantize 36.0M params clip=search ({nthr} threads)", ts * 1e3,
                         "clip=absmax", ta * 1e3, mse_ratio_search_vs_absmax=mse_s / mse_a))
    for level in (3, 22):
        t0 = time.perf_counter()
        blob = pack_artifact({"w": qs}, level=level)
        tp = time.perf_counter() - t0
        t0 = time.perf_counter()
        unpack_artifact(blob)
        tu = time.perf_counter() - t0
        rows.append(make_row("int6_codec", f"pack 36.0M int6 params zstd-{level}", tp * 1e3, "unpack", tu * 1e3,
                             bits_per_param=len(blob) * 8 / w.numel(), artifact_bytes=len(blob)))
    return rows


if __name__ == "__main__":
    if "--codec" in sys.argv:
        from bench.harness import markdown_table

        rows = codec_rows()
        out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "int6-codec-cpu.md")
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with open(out, "w") as f:
            f.write(f"# int6 codec on a CPU host ({os.cpu_count()} cores, torch {torch.__version__})\n\n")
            f.write("Gaussian rows (std 0.02) stand in for weights; ms columns are wall time.\n\n")
            f.write(markdown_table(rows))
        print(markdown_table(rows))
