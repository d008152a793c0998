"""The TTT step's attention: which SDPA backend and which K / V layout a user of this image could pick instead of
the one the engine runs (cuDNN, GQA through ``enable_gqa``, q / k / v in the projections' (B, T, H, D) order).

Shape: the records' TTT step on the default model, 64 rows x 2048 positions, 8 query heads and 4 K / V heads of dim
64, causal, bf16. Each row is one backend x layout, forward + backward to q, k and v (what one block runs per step;
the records' step runs it 11 times), against the engine's choice as the baseline:

* backend: ``SDPBackend.CUDNN_ATTENTION`` / ``FLASH_ATTENTION`` / ``EFFICIENT_ATTENTION`` (``torch.nn.attention``);
* K / V: ``gqa`` (4 heads, ``enable_gqa=True``) or ``expand`` (``repeat_interleave`` to 8 heads before the call);
* layout: ``bthd`` (a transposed view of the projections' output, as the engine passes it) or ``contig``.

TFLOP/s by the FlashAttention convention: forward 4·B·H·T²·D / 2 (causal), backward 2.5x the forward. A backend
that refuses the inputs is reported with its error in the row (``ours_ms`` NaN), not dropped. Every backend's output
and gradients are checked against the engine's choice before it is timed (relative max error < 2e-2). A
FlashAttention-3 build (``flash_attn_interface``, what the records call) is timed too when it is installed.
"""
from __future__ import annotations

from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

from bench.harness import bench_ms, make_row, tflops

KERNEL = "attention-backends"
BASELINE = "CUDNN_ATTENTION-gqa-bthd"


def run(quick: bool = False) -> List[Dict[str, object]]:
    return measure(torch.device("cuda"), 8 if quick else 64, 2048, 8, 4, 64, torch.bfloat16, bench_ms)


def _cases(dev: torch.device):
    from torch.nn.attention import SDPBackend

    backends = ([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
                if dev.type == "cuda" else [SDPBackend.MATH])
    return [(f"{be.name}-{kv}-{lay}", be, kv == "expand", lay == "contig")
            for be in backends for kv in ("gqa", "expand") for lay in ("bthd", "contig")]


def measure(dev, B: int, T: int, Hq: int, Hk: int, D: int, dtype, timer: Callable) -> List[Dict[str, object]]:
    """The rows of ``run`` on any device and sizes (the CPU test runs the math backend at tiny shapes with a
    stand-in timer)."""
    from torch.nn.attention import sdpa_kernel

    g = torch.Generator(device=dev).manual_seed(0)

    def bthd(H):  # the projections' (B, T, H, D) order, seen as (B, H, T, D)
        return torch.randn(B, T, H, D, device=dev, dtype=dtype, generator=g).transpose(1, 2)

    q0, k0, v0, do = bthd(Hq), bthd(Hk), bthd(Hk), bthd(Hq)
    fwd_flops = 4 * B * Hq * T * T * D / 2
    results: Dict[str, Dict[str, object]] = {}
    ref = None
    cases = _cases(dev)
    for name, backend, expand, contig in cases:
        q, k, v = (t.detach().clone() for t in (q0, k0, v0))
        if contig:
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        for t in (q, k, v):
            t.requires_grad_()

        def fwd(q=q, k=k, v=v, backend=backend, expand=expand):
            kk, vv = (k.repeat_interleave(Hq // Hk, 1), v.repeat_interleave(Hq // Hk, 1)) if expand else (k, v)
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, kk, vv, is_causal=True, enable_gqa=not expand)

        def train(q=q, k=k, v=v, fwd=fwd):
            q.grad = k.grad = v.grad = None
            fwd().backward(do)

        try:
            train()
            with torch.no_grad():
                y = fwd()
            out = [y.float(), q.grad.float(), k.grad.float(), v.grad.float()]
        except RuntimeError as e:
            results[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
            continue
        if ref is None:
            ref = out
        err = max(((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item() for a, b in zip(out, ref))
        if not err < 2e-2:
            raise RuntimeError(f"attention {name}: relative max error {err:.3g} against {cases[0][0]} (expected < 2e-2)")
        with torch.no_grad():
            f_ms = timer(fwd)
        results[name] = {"fwd_ms": f_ms, "ms": timer(train), "err": err}
    try:
        import flash_attn_interface  # noqa: F401  (the records' FlashAttention-3; not in every image)
        fa3 = True
    except ImportError:
        fa3 = False
    base = results.get(BASELINE if dev.type == "cuda" else cases[0][0], {})
    base_ms = base.get("ms", float("nan"))
    rows = []
    for name, r in results.items():
        ms = r.get("ms", float("nan"))
        rows.append(make_row(KERNEL, f"{name}: B{B} T{T} Hq{Hq} Hkv{Hk} D{D} causal, fwd+bwd, {str(dtype)[6:]}",
                             ms, BASELINE, base_ms, fwd_ms=r.get("fwd_ms", float("nan")),
                             per_step_ms_11_layers=11 * ms, fwd_tflops=tflops(fwd_flops, r.get("fwd_ms", float("nan"))),
                             fwd_bwd_tflops=tflops(3.5 * fwd_flops, ms), max_rel_err=r.get("err", float("nan")),
                             error=r.get("error", ""), flash_attn_interface=fa3))
    return rows
