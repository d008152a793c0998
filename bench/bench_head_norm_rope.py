"""``pgolf_kernels.head_norm_rope`` (per-head RMSNorm + gain + rotary of q / k, one pass) against what the TTT step
runs today: the model's composition (``head_norm_rope_ref``: reshape, ``F.rms_norm``, ``* q_gain``, rotary,
transpose) under torch.compile (default mode: Inductor's fused passes, as in the compiled step) and eager.

Shapes: the records' TTT step on the default model, 64 rows x 2048 positions, head dim 64: q (8 heads, with the
q gain) and k (4 heads). Rows, one process, medians of ``triton.testing.do_bench``: forward alone (scoring) and
forward + backward to x and the gain (training), with GB/s of the bytes the op must move (x read and the output
written; backward: dy and x read, dx written). The forward + backward rows are also timed from CUDA-graph replay
(``graph_ms``, ``baseline_graph_ms``): as eager calls they are host-bound (autograd and custom-op dispatch). One more row times the path the op sits on: q / k preparation, causal
SDPA with 8 q and 4 kv heads, and the output back to (B, T, H·D), forward + backward, the composition compiled
against the op in either output layout (``"bthd"``, the TTT engine's: cuDNN writes its output in q's order, so the
last reshape is a view).
"""
from __future__ import annotations

from typing import Dict, List

import torch
import torch.nn.functional as F

from bench.harness import bench_ms, check_close, fwd_bwd, gbps, graph_bench_ms, make_row, time_all

KERNEL = "head-norm-rope"
# (name, heads, gain): head dim 64, 64 rows x 2048 positions
SHAPES = [("q", 8, True), ("k", 4, False)]


def run(quick: bool = False) -> List[Dict[str, object]]:
    return measure(torch.device("cuda"), 8 if quick else 64, 2048, 64, SHAPES, bench_ms, torch.compile,
                   torch.bfloat16, graph_timer=graph_bench_ms)


def measure(dev, B: int, T: int, D: int, shapes, timer, compile_fn, dtype, graph_timer=None) -> List[Dict[str, object]]:
    """The rows of ``run`` on any device and sizes (the CPU test runs it under the interpreter at tiny shapes with a
    stand-in timer, so the bench's wiring and its correctness check are tested before a GPU call)."""
    from pgolf_kernels.head_norm_rope import head_norm_rope, head_norm_rope_ref

    g = torch.Generator(device=dev).manual_seed(0)
    theta = torch.outer(torch.arange(T, device=dev, dtype=torch.float32),
                        10000.0 ** (-torch.arange(0, D, 2, device=dev, dtype=torch.float32) / D))
    cos, sin = theta.cos().to(dtype)[None, None], theta.sin().to(dtype)[None, None]
    compiled = compile_fn(head_norm_rope_ref, dynamic=False)
    rows = []
    for name, H, has_gain in shapes:
        x = torch.randn(B, T, H * D, device=dev, dtype=dtype, generator=g)
        gain = (torch.rand(H, device=dev, generator=g) + 0.5).to(dtype) if has_gain else None
        dy = torch.randn(B, H, T, D, device=dev, dtype=dtype, generator=g)
        ref = head_norm_rope_ref(x, cos, sin, H, gain)
        got = head_norm_rope(x, cos, sin, H, gain)
        check_close(got, ref, f"head_norm_rope on {name}")
        fwd = {"ours": lambda: head_norm_rope(x, cos, sin, H, gain, validate=False),
               "compiled": lambda: compiled(x, cos, sin, H, gain),
               "eager": lambda: head_norm_rope_ref(x, cos, sin, H, gain)}
        xs = x.detach().clone().requires_grad_()
        gs = gain.detach().clone().requires_grad_() if has_gain else None
        args = (xs, cos, sin, H, gs)
        train = {"ours": fwd_bwd(lambda *a: head_norm_rope(*a, validate=False), args, dy),
                 "compiled": fwd_bwd(compiled, args, dy), "eager": fwd_bwd(head_norm_rope_ref, args, dy)}
        tf = time_all(fwd, timer, f"{name} forward")
        tt = time_all(train, timer, f"{name} forward+backward")
        nbytes = x.numel() * x.element_size()
        label = f"{name}: B{B} T{T} heads {H} x {D}{', gain' if has_gain else ''}, {str(dtype)[6:]}"
        rows.append(make_row(KERNEL, f"{label}, forward", tf["ours"], "torch.compile of the composition",
                             tf["compiled"], eager_ms=tf["eager"], eager_speedup=tf["eager"] / tf["ours"],
                             ours_gbps=gbps(2 * nbytes, tf["ours"]), compiled_gbps=gbps(2 * nbytes, tf["compiled"])))
        rows.append(make_row(KERNEL, f"{label}, forward + backward", tt["ours"], "torch.compile of the composition",
                             tt["compiled"], eager_ms=tt["eager"], eager_speedup=tt["eager"] / tt["ours"],
                             ours_gbps=gbps(5 * nbytes, tt["ours"]), compiled_gbps=gbps(5 * nbytes, tt["compiled"]),
                             **_graph_cols(train, graph_timer, f"{name} forward+backward", 5 * nbytes)))
    rows.append(_attention_row(dev, B, T, D, shapes, cos, sin, g, timer, compile_fn, dtype, graph_timer))
    return rows


def _graph_cols(fns: Dict[str, object], graph_timer, label: str, nbytes: float = 0.0) -> Dict[str, float]:
    """Device time of the ours / compiled contestants from CUDA-graph replay: the forward + backward rows timed as
    eager calls look host-bound (on an H100 the q row read 0.683 ms, where the profiled TTT step's two kernels took
    3.81 ms over 22 q and 22 k launches, ~0.23 ms per q pair if split by head count; ``profile-ttt-h100.md``); the
    compiled, captured step pays only the device time."""
    if graph_timer is None:
        return {}
    t = time_all({k: fns[k] for k in ("ours", "compiled")}, graph_timer, f"{label} (graph replay)")
    cols = dict(graph_ms=t["ours"], baseline_graph_ms=t["compiled"], graph_speedup=t["compiled"] / t["ours"])
    if nbytes:
        cols.update(graph_gbps=gbps(nbytes, t["ours"]))
    return cols


def _attention_row(dev, B, T, D, shapes, cos, sin, g, timer, compile_fn, dtype, graph_timer=None) -> Dict[str, object]:
    """q / k prep + causal GQA SDPA + (B, T, H·D) output, forward + backward to the three projections' outputs."""
    from pgolf_kernels.head_norm_rope import head_norm_rope, head_norm_rope_ref

    (_, Hq, _), (_, Hk, _) = shapes[0], shapes[1]
    q, k, v = (torch.randn(B, T, H * D, device=dev, dtype=dtype, generator=g).requires_grad_()
               for H in (Hq, Hk, Hk))
    gain = (torch.rand(Hq, device=dev, generator=g) + 0.5).to(dtype)
    dout = torch.randn(B, T, Hq * D, device=dev, dtype=dtype, generator=g)

    def path(prep):
        def f(q, k, v):
            o = F.scaled_dot_product_attention(prep(q, Hq, gain), prep(k, Hk, None),
                                               v.view(B, T, Hk, D).transpose(1, 2), is_causal=True, enable_gqa=True)
            return o.transpose(1, 2).reshape(B, T, Hq * D)
        return f

    fns = {"compiled": compile_fn(path(lambda x, H, gn: head_norm_rope_ref(x, cos, sin, H, gn)), dynamic=False)}
    for layout in ("bhtd", "bthd"):
        fns[layout] = path(lambda x, H, gn, lo=layout: head_norm_rope(x, cos, sin, H, gn, layout=lo, validate=False))
    ref = fns["compiled"](q, k, v)
    for layout in ("bhtd", "bthd"):
        got = fns[layout](q, k, v)
        check_close(got, ref, f"head_norm_rope attention path ({layout})")

    train = {name: fwd_bwd(f, (q, k, v), dout) for name, f in fns.items()}
    t = time_all(train, timer, "attention path")
    return make_row(KERNEL, f"q/k prep + causal SDPA ({Hq} q / {Hk} kv heads) + output reshape, forward + backward: "
                    f"B{B} T{T} D{D}, {str(dtype)[6:]}", t["bthd"], "torch.compile of the composition + SDPA",
                    t["compiled"], ours_bhtd_ms=t["bhtd"], bhtd_speedup=t["compiled"] / t["bhtd"],
                    **_graph_cols(dict(train, ours=train["bthd"]), graph_timer, "attention path"))
