"""Where one per-document TTT step spends its time (a profiling tool, not a benchmark row).

One step = the eval driver's inner loop body (``train.schedules.ttt_batch``): forward over 64 windows (seeds: 1024
positions, records: 2048) with grad, score the last chunk of targets of each row (256 / 48), backward to the
adapters, the recipe's optimizer (Adam / AdamW).
Variants: kernel path (int6 codes + fused multi-LoRA; a phased recipe's codes dequantized at load, as the eval's
CLI does) and ``--reference`` path (bf16 weights + bmm),
each eager and with the eval driver's ``--compile`` (``train.forward.compile_rows_nll``); a ``-tail`` suffix runs the
step with ``TTTConfig.tail_block`` (the last block at the scored chunk only); ``-fused`` / ``-torchopt`` set the
adapters' optimizer (``TTTConfig.fused_optimizer`` on / off; without either, as the eval's auto: fused on the kernel
path, torch ops on the reference), so the optimizer's share and the LoRA kernels' share of a difference come apart. Prints ms/step (median of CUDA-synchronized steps) and a
torch.profiler table of the top CUDA kernels per variant, so the split between GEMMs, attention,
elementwise passes and host overhead (wall minus GPU-busy) is measured, not guessed.

    python3 -m bench.profile_ttt [--recipe seeds|records] [--batch 64] [--window W] [--chunk C] [--rank R]
                                 [--steps 10] [--new-shapes N] [--out DIR]

Each variant also reports GPU time by kernel category over all its kernels (``categories_ms``: attention, gemm,
optimizer, triton, elementwise, other) and by pass group (``groups_ms``, ``PASS_GROUPS``: what could remove the time,
as in docs/STATUS.md's ledger: q / k norm + rotary, MLP activation, block norms, LoRA, index, copies, ...);
``--new-shapes N`` adds the first-step cost of N unmet (rows, window) shapes; ``--sites`` names the op that launched
each top kernel.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import statistics
import tempfile
import time
import traceback

import numpy as np
import torch


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _setup(reference: bool, path: str, cfg, device, identity: bool = True):
    from train import eval as ev
    from train.adapters import DocLoRA, identity_rows_for
    from train.ttt_optim import optimizer_for

    model, _ = ev.load_model(path, reference=reference, device=device)
    # as the eval's CLI: a phased recipe's int6 codes are dequantized at load (--unfreeze-int6 load), so the kernel
    # path's step runs on dense weights there (before, measurements 1-6 of profile-ttt-h100.md ran it on the codes)
    ev.unfreeze_at_load(model, "ttt", cfg)
    # the batch schedule's row maps are the prefix 0..R-1, as every step here sets them (arange); identity False
    # (variant suffix -rowmap): the row map read as any map would be (the rolling schedule's gathers and index_add)
    ad = DocLoRA(model, cfg, cfg.batch_size, device, "bmm" if reference else "kernel",
                 identity_rows=identity and identity_rows_for(cfg))
    opt = optimizer_for(ad.params, cfg, backend=ad.backend)  # fused on the kernel path, torch ops for the reference
    return model, ad, opt


def _rows(stream_len_doc: int, n_docs: int, cfg, device, seed=0):
    from train.rows import build_rows

    g = torch.Generator().manual_seed(seed)
    docs = torch.randint(4, 1024, (n_docs, stream_len_doc), generator=g)
    docs[:, 0] = 1
    stream = docs.reshape(-1).to(device)
    s = np.arange(n_docs, dtype=np.int64) * stream_len_doc
    a = np.full(n_docs, cfg.window - cfg.chunk, dtype=np.int64)  # chunk ending at the window: L = window
    b = a + cfg.chunk
    return build_rows(stream, np.stack([s, a, b], 1), cfg.window, 64)


def _step_fn(model, ad, opt, compiled: bool, mode=None):
    from train.forward import compile_rows_nll, rows_nll

    compile_rows_nll(model, compiled, mode=mode)  # the eval driver's --compile (regional: blocks + head)
    ad.set_rows(torch.arange(ad.n_docs, device=ad.params[0].device))

    def step(rb):
        nll = rows_nll(model, rb, ad)
        w = rb.mask.float() / rb.mask.sum(1, keepdim=True).clamp_min(1)
        (nll * w).sum().backward()
        opt.step()
        return nll

    return step


def _time(step, rb, n: int):
    for _ in range(3):
        step(rb)
    _sync()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        step(rb)
        _sync()
        ts.append((time.perf_counter() - t) * 1e3)
    return statistics.median(ts)


# kernel categories by name, first match wins (Inductor's fused kernels start "triton_" whatever they fuse; the
# package's own Triton kernels are plain "_..._kernel" names; PyTorch's own kernels live in at::native): the top-18
# table of the records' step covered 66.7 of its 98.1 GPU-ms, so the rest of the split was not known
CATEGORIES = (("triton", lambda n: n.startswith("triton")),
              ("attention", lambda n: any(k in n for k in ("sdpa", "flash", "fmha", "cudnn"))),
              ("gemm", lambda n: any(k in n for k in ("nvjet", "gemm", "cutlass", "xmma", "cublas"))),
              ("optimizer", lambda n: "multi_tensor_apply" in n),
              ("elementwise", lambda n: "at::native" in n),
              ("triton", lambda n: "::" not in n and n.endswith("_kernel")))


def _first_match(table, name: str) -> str:
    """The label of the first (label, match) of ``table`` whose match takes the lowercased name, else "other"."""
    low = name.lower()
    return next((label for label, match in table if match(low)), "other")


def kernel_category(name: str) -> str:
    """The category of a CUDA kernel by its name (``CATEGORIES``; "other" when none matches)."""
    return _first_match(CATEGORIES, name)


# the step's kernels grouped by what could remove their time (the ledger of docs/STATUS.md, measurement 6), first
# match wins: Inductor names a fused kernel after the ops it fuses, so q / k preparation shows as rms_norm with the
# rotary's cat / slice, the MLP's activation as leaky_relu, the block norms and residual mixes as rms_norm without
# them; the package's kernels by their names (linear_act's GEMM with its activation epilogue counts as a GEMM)
PASS_GROUPS = (("attention", lambda n: kernel_category(n) == "attention"),
               ("gemm", lambda n: kernel_category(n) == "gemm" or "linear_act" in n),
               ("optimizer", lambda n: "adam_rows" in n or "multi_tensor_apply" in n),
               ("qk_norm_rope", lambda n: "head_norm_rope" in n or (n.startswith("triton") and "rms_norm" in n
                                                                   and ("cat" in n or "slice" in n))),
               ("mlp_act", lambda n: "leaky_relu" in n),
               ("norm_residual", lambda n: n.startswith("triton") and "rms_norm" in n),
               ("lora", lambda n: "lora" in n or "effective_kernel" in n),
               ("index", lambda n: "index" in n),
               ("copy", lambda n: any(k in n for k in ("clone", "transpose", "copy", "memcpy", "memset"))))


def pass_group(name: str) -> str:
    """The group of a CUDA kernel by its name (``PASS_GROUPS``; "other" when none matches)."""
    return _first_match(PASS_GROUPS, name)


def _profile(step, rb, top: int):
    from torch.profiler import ProfilerActivity, profile

    _sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        for _ in range(3):
            step(rb)
        _sync()
        wall = (time.perf_counter() - t) / 3 * 1e3
    ev = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy = sum(e.self_device_time_total for e in ev) / 3 / 1e3
    ev.sort(key=lambda e: -e.self_device_time_total)
    rows = [(e.key[:90], e.self_device_time_total / 3 / 1e3, e.count // 3) for e in ev[:top]]
    cats: dict = {}
    groups: dict = {}
    for e in ev:
        for d, key in ((cats, kernel_category(e.key)), (groups, pass_group(e.key))):
            d[key] = d.get(key, 0.0) + e.self_device_time_total / 3 / 1e3

    def tidy(d):
        return {k: round(v, 3) for k, v in sorted(d.items(), key=lambda kv: -kv[1])}

    return wall, busy, rows, tidy(cats), tidy(groups)


def launch_sites(events, names, per_kernel: int = 3) -> dict:
    """{kernel name[:90]: [[site, ms], ...]} for the kernels named in ``names``: the CPU op that launched each (the
    op whose ``kernels`` hold it, with its input shapes where recorded) and, when it runs inside one, the package's
    custom op around it (``pgolf::...``), by total device ms, at most ``per_kernel`` sites each. Why: by name alone
    an ATen kernel (``elementwise_kernel``, ``indexFuncLargeIndex``) does not say which op of the step launched it;
    the kernel path ran 6.2 ms of them against the reference's 3.3 (``profile-ttt-h100.md``, measurement 2)."""
    acc: dict = {}
    for e in events:
        for k in getattr(e, "kernels", None) or ():
            name = k.name[:90]
            if name not in names:
                continue
            shapes = [list(sh) for sh in (getattr(e, "input_shapes", None) or []) if sh]
            site = e.name + (f" {shapes}" if shapes else "")
            p = getattr(e, "cpu_parent", None)
            while p is not None:
                if p.name.startswith("pgolf::"):
                    site += f" in {p.name}"
                    break
                p = getattr(p, "cpu_parent", None)
            d = acc.setdefault(name, {})
            d[site] = d.get(site, 0.0) + k.duration / 1e3
    return {n: [[site, round(ms, 3)] for site, ms in sorted(d.items(), key=lambda kv: -kv[1])[:per_kernel]]
            for n, d in acc.items()}


def _sites(step, rb, names) -> dict:
    """``launch_sites`` of one profiled step with input shapes recorded (apart from ``_profile``: recording shapes
    costs host time, which must not enter the step's timing); ms per step."""
    from torch.profiler import ProfilerActivity, profile

    _sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        step(rb)
        _sync()
    return launch_sites(prof.events(), set(names))


# H200 SXM data-sheet peaks (dense bf16 tensor-core FLOP/s, HBM3e bytes/s): a lower bound on time, not a rate any
# kernel here reaches (cuBLAS bf16 at K = 512, M >= 65,536: 519-784 TFLOP/s, int6-h200.md; cuDNN attention of the
# records' step: ~400 forward / ~375 backward, step-work-cpu.md)
PEAK_FLOPS = 989e12
PEAK_BYTES = 4.8e12
# bytes of memory traffic per adapter parameter in one optimizer step, fp32 state: Adam / AdamW read the parameter,
# its gradient and two moments (16) and write the parameter and the moments (12)
OPT_BYTES_PER_PARAM = 28


def _attention_flops(q_shape, k_shape, causal: bool, grad: bool) -> tuple:
    """(forward, backward) FLOPs of one attention call: 2 matmuls of B*Hq*Sq*Sk*D MACs forward (QK^T and PV), half of
    the score matrix when causal with Sq = Sk (the kernels skip the masked tiles; the diagonal's half tile is
    counted), and 5 backward (S recomputed, dV, dP, dQ, dK: 2.5x the forward), as FlashAttention counts them."""
    B, H, Sq, D = q_shape
    Sk = k_shape[-2]
    frac = (Sk + 1) / (2 * Sk) if causal and Sq == Sk else 1.0
    fwd = 4.0 * B * H * Sq * Sk * D * frac
    return fwd, 2.5 * fwd if grad else 0.0


def step_work(step, rb) -> dict:
    """The work of one call of ``step(rb)``, counted while it runs eagerly: GEMM FLOPs (``aten.mm`` / ``addmm`` /
    ``bmm`` / ``baddbmm``, by ``torch.utils.flop_counter``, forward and backward), attention FLOPs (every
    ``F.scaled_dot_product_attention`` call, ``_attention_flops``: causal-aware, which the flop counter is not) and
    the calls' shapes. Custom ops (the package's Triton kernels) are not seen by the counter: count the reference
    path's step, the same math, and divide it by each variant's time for its achieved rate."""
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    calls = []
    sdpa = F.scaled_dot_product_attention

    def counting(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, *args, **kwargs):
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        calls.append((tuple(q.shape), tuple(k.shape), bool(is_causal), attn_mask is not None, grad))
        if kwargs.pop("enable_gqa", False) and k.size(-3) != q.size(-3):
            # the flop counter's cuDNN / flash formulas assert equal q and k/v heads (a GQA step on CUDA stopped
            # there): repeat the k/v heads, the same attention; its FLOPs are counted above, not by the counter
            rep = q.size(-3) // k.size(-3)
            k, v = k.repeat_interleave(rep, dim=-3), v.repeat_interleave(rep, dim=-3)
        return sdpa(q, k, v, attn_mask, dropout_p, is_causal, *args, **kwargs)

    F.scaled_dot_product_attention = counting
    try:
        with FlopCounterMode(display=False) as fc:
            step(rb)
    finally:
        F.scaled_dot_product_attention = sdpa
    gemm = {str(op).split(".")[-1]: n for op, n in fc.get_flop_counts().get("Global", {}).items()
            if "attention" not in str(op) and "flash" not in str(op)}
    fwd = bwd = 0.0
    for q, k, causal, masked, grad in calls:
        f, b = _attention_flops(q, k, causal and not masked, grad)
        fwd, bwd = fwd + f, bwd + b
    return {"gemm_flop": float(sum(gemm.values())), "gemm_by_op": {k: float(v) for k, v in gemm.items()},
            "attention_fwd_flop": fwd, "attention_bwd_flop": bwd,
            "attention_calls": [dict(q=list(q), k=list(k), causal=c, masked=m) for q, k, c, m, _ in calls[:2]]
            + ([{"more_calls": len(calls) - 2}] if len(calls) > 2 else [])}


def work_floor(work: dict, adapter_params: int, *, scale: float = 1.0) -> dict:
    """Lower bounds on one step's time (ms) from its counted work (``step_work``), ``scale``d (rows counted on a
    smaller batch: the work is linear in rows), at the data-sheet peaks: GEMMs and attention at ``PEAK_FLOPS``,
    the optimizer's ``OPT_BYTES_PER_PARAM`` per adapter parameter at ``PEAK_BYTES``. Element-wise passes (norms,
    rotary, activations, residuals) are not bounded here: fused into the GEMMs they cost no extra traffic."""
    g, a = work["gemm_flop"] * scale, (work["attention_fwd_flop"] + work["attention_bwd_flop"]) * scale
    opt_bytes = OPT_BYTES_PER_PARAM * adapter_params
    ms = {"gemm": g / PEAK_FLOPS * 1e3, "attention": a / PEAK_FLOPS * 1e3, "optimizer": opt_bytes / PEAK_BYTES * 1e3}
    return {"gemm_tflop": round(g / 1e12, 3), "attention_tflop": round(a / 1e12, 3),
            "optimizer_gb": round(opt_bytes / 1e9, 3), "adapter_params": int(adapter_params),
            "floor_ms_at_peak": {k: round(v, 2) for k, v in ms.items()}, "floor_ms_total": round(sum(ms.values()), 2)}


def _at_window(cfg, window: int):
    """``cfg`` at a smaller ``window``: the recipe's graph window step (records: 96) is dropped where it exceeds
    the window, as ``ttt_config.recipe`` does (``--first-call 64x64`` on the records' recipe stopped there)."""
    from train.ttt_config import fit_window_step

    return dataclasses.replace(cfg, window=window,
                               graph_window_step=fit_window_step(cfg.graph_window_step, window, given=False))


def _new_shapes(step, ad, cfg, dev, batch: int, window: int, n: int, top: int):
    """What a step pays the first time it meets a (rows, window) shape, as each new CUDA-graph bucket's first step
    does: ``n`` shapes the variant has not met (rows and window shrinking by 5 and 64 per shape), each stepped
    twice (``first_ms``, ``second_ms``), then one more first call under torch.profiler with the top host (CPU) ops
    by self time. Why: the records' 1/8 share warmed its 119 graphs at 0.17 s per step against 0.066 s for a
    compiled step of the warm-up's second pass; this splits that difference (bench/results/eval-h200.md)."""
    from torch.profiler import ProfilerActivity, profile

    out, cpu_top = [], []
    for i in range(n + 1):
        R, L = max(2, batch - 5 * (i + 1)), max(cfg.chunk + 64, window - 64 * (i + 1))
        rb = _rows(L + 1, R, _at_window(cfg, L), dev, seed=10 + i)
        ad.set_rows(torch.arange(R, device=dev))
        if i == n:
            _sync()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                step(rb)
                _sync()
            ev = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
            cpu_top = [(e.key[:90], e.self_cpu_time_total / 1e3, e.count) for e in ev[:top]]
            break
        ms = []
        for _ in range(2):
            _sync()
            t = time.perf_counter()
            step(rb)
            _sync()
            ms.append((time.perf_counter() - t) * 1e3)
        out.append({"rows": R, "window": L, "first_ms": round(ms[0], 2), "second_ms": round(ms[1], 2)})
    ad.set_rows(torch.arange(ad.n_docs, device=dev))
    return out, cpu_top


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="seeds", help="train.ttt_config recipe (seeds, records); the options "
                   "below override its values")
    p.add_argument("--batch", type=int, default=None, help="documents per step (default 64)")
    p.add_argument("--window", type=int, default=None)
    p.add_argument("--chunk", type=int, default=None)
    p.add_argument("--rank", type=int, default=None)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--top", type=int, default=18)
    p.add_argument("--variants", default="kernel-eager,reference-eager,kernel-compile,reference-compile",
                   help="comma list of (kernel|reference)-(eager|compile)[-tail][-fused|-torchopt][-mlp|-nomlp][-qk|-noqk]"
                        "[-res|-nores][-rowmap][-t128][-dxk][-b0][-ws][-gws][-sgn][-skp][-fk][-jf][-nrm][-of][-rws][-dact][-sws][-qws][-kbh|-qkbh][-effN][-wtN][-autotune]; -tail: TTTConfig.tail_block; -fused / -torchopt: the adapters' optimizer "
                        "fused / torch ops (default: as the eval's auto); -mlp / -nomlp: TTTConfig.fused_mlp on / off (default: as the eval's auto, on for the kernel path when "
                        "the MLP carries an adapter); -qk / -noqk: "
                        "TTTConfig.fused_qk on / off (default: as the eval's auto, on for the kernel path); -res / -nores: "
                        "TTTConfig.fused_residual on / off (default: as the eval's auto, on for the kernel path); -rowmap: the adapters read the row map as any map (no "
                        "identity_rows, as the rolling schedule); -t128: linear_act's derivative and residual epilogues on "
                        "the 128 x 128 x 4-warp tile (their default before the split-epilogue tile) for a before / after "
                        "in one process; -dxk: the merged q / k / v backward's dx in one Triton kernel "
                        "(lora_merged.DX_KERNEL; default: as PGOLF_MERGED_DX sets it); -b0: block 0 in a compiled graph of its own, "
                        "without its input gradient (train.forward.BLOCK0_LEAF off; default: as PGOLF_BLOCK0_LEAF sets it); "
                        "-ws: mlp_residual's up-projection on the warp-specialized Gluon kernel (linear_residual.MLP_UP_WS; "
                        "default: as PGOLF_MLP_UP_WS sets it); -gws: linear_act_grad (the MLP backward's derivative GEMM) on "
                        "the warp-specialized Gluon kernel (linear_act.GRAD_WS; default: as PGOLF_ACT_GRAD_WS sets it); -sgn: mlp_residual keeps act(h) and h's signs instead of h "
                        "(linear_residual.MLP_SIGNS; default: as PGOLF_MLP_SIGNS sets it); -skp: the U-Net skips through "
                        "pgolf_kernels.skip_add (train.model.SKIP_KERNEL; default: as PGOLF_SKIP_ADD sets it); -fk: the skips' encoder outputs through skip_fork (their two gradients summed in the pass that applies w, not by autograd after skip_add's product pass; train.model.SKIP_FORK on; default: as PGOLF_SKIP_FORK sets it); -jf: with the fork, each decoder's join inside its compiled block, fused into its residual mix (train.model.JOIN_FOLD on; default: as PGOLF_JOIN_FOLD sets it); -nrm: the blocks' "
                        "residual mix and norms through pgolf_kernels.mix_norm (train.model.NORM_KERNEL; default: as "
                        "PGOLF_NORM_KERNEL sets it); -of: the o adapter's "
                        "shrink inside the q / k / v op (train.adapters.O_FOLD; default: as PGOLF_O_FOLD sets it); -rws: the residual sites' GEMM "
                        "on the warp-specialized Gluon kernel (linear_residual.RES_WS; default: as PGOLF_RES_WS sets it); -dact: mlp_residual "
                        "with act(h) formed in the down-projection's A operand (linear_residual.MLP_DOWN_ACT; default: as "
                        "PGOLF_MLP_DOWN_ACT sets it); -sws: the merged backward's dx (sum_products) on the "
                        "warp-specialized Gluon kernel (lora_merged.SUM_WS; default: as PGOLF_SUM_WS sets it); -qws: the merged q / k / v "
                        "forward in one launch of it (lora_merged.QKV_WS; default: as PGOLF_QKV_WS sets it); -kbh / -qkbh: k / q and k "
                        "written in (B, H, T, D) order by the fused q / k pass (train.model.QK_LAYOUT k-bhtd / bhtd; default: as "
                        "PGOLF_QK_LAYOUT sets it); -effN: the merged weights' tile "
                        "lora_merged.EFFECTIVE_CONFIGS[N] (default: EFFECTIVE_CONFIG); -wtN: the Gluon kernels' ring "
                        "tile linear_act_ws.TILES[N] (default: as PGOLF_WS_TILE sets it); -autotune: "
                        "torch.compile mode max-autotune-no-cudagraphs (compile only)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", default=None, help="directory for profile_ttt.json")
    p.add_argument("--new-shapes", type=int, default=0,
                   help="after each variant, time its first and second step on this many (rows, window) shapes it has "
                        "not met, and profile the host side of one more first step (default 0: off)")
    p.add_argument("--first-call", default=None, metavar="ROWSxWINDOW",
                   help="call each variant's step first on this smaller shape (e.g. 64x64, the eval warm-up's first "
                        "step before it ran a full-window step first), then time the full one: a compiled "
                        "dynamic-shape graph keeps its first call's size hints and autotuned kernel configs")
    p.add_argument("--work-rows", type=int, default=0,
                   help="count the step's work (GEMM and attention FLOPs, the optimizer's bytes) on this many rows of "
                        "the reference path's eager step, scaled to --batch, with its floor at the data-sheet peaks "
                        "and each variant's achieved rate (default 0: off)")
    p.add_argument("--sites", action="store_true",
                   help="after each variant's profile, one more profiled step with input shapes recorded: which CPU "
                        "op (and which of the package's custom ops around it) launched each of the --top kernels")
    p.add_argument("--work-only", action="store_true", help="count the work (--work-rows, default --batch) and stop: "
                   "no variant is timed (runs on a CPU: the counts do not depend on the device)")
    a = p.parse_args(argv)
    if a.new_shapes < 0:
        raise SystemExit(f"profile_ttt: --new-shapes: {a.new_shapes}; expected an integer >= 0")
    if a.work_rows < 0:
        raise SystemExit(f"profile_ttt: --work-rows: {a.work_rows}; expected an integer >= 0")
    first_call = None
    if a.first_call is not None:
        parts = a.first_call.lower().split("x")
        if len(parts) != 2 or not all(x.isdigit() and int(x) >= 2 for x in parts):
            raise SystemExit(f"profile_ttt: --first-call: {a.first_call!r}; expected ROWSxWINDOW, each >= 2 (e.g. 64x64)")
        first_call = (int(parts[0]), int(parts[1]))
    from pgolf_kernels.lora_merged import EFFECTIVE_CONFIGS

    for v in a.variants.split(","):  # refused before the artifact is built
        if _variant(v) is not None and (_variant(v)["eff"] or 0) >= len(EFFECTIVE_CONFIGS):
            raise SystemExit(f"profile_ttt: --variants: {v!r}: lora_merged.EFFECTIVE_CONFIGS has "
                             f"{len(EFFECTIVE_CONFIGS)} tiles (-eff0 .. -eff{len(EFFECTIVE_CONFIGS) - 1})")
        if _variant(v) is not None and _variant(v)["wt"] is not None:
            from pgolf_kernels.linear_act_ws import TILES

            if _variant(v)["wt"] >= len(TILES):
                raise SystemExit(f"profile_ttt: --variants: {v!r}: linear_act_ws.TILES has {len(TILES)} tiles "
                                 f"(-wt0 .. -wt{len(TILES) - 1})")
        if _variant(v) is None:
            raise SystemExit(f"profile_ttt: --variants: {v!r}; expected (kernel|reference)-(eager|compile)[-tail]"
                             f"[-fused|-torchopt][-mlp|-nomlp][-qk|-noqk][-res|-nores][-rowmap][-t128][-dxk][-b0][-ws][-gws][-sgn][-skp][-fk][-jf][-nrm][-of][-rws][-dact][-sws][-qws][-kbh|-qkbh][-effN][-wtN][-autotune], suffixes "
                             f"in that order "
                             f"(-autotune "
                             f"with compile only)")
    if a.device == "cuda" and not torch.cuda.is_available() and not a.work_only:
        raise SystemExit("profile_ttt: needs a CUDA GPU (--device cpu is a smoke test of this script only)")
    from bench.bench_eval import build_artifact
    from train.ttt_config import recipe

    dev = a.device
    given = dict(rank=a.rank, chunk=a.chunk, window=a.window, batch_size=a.batch)
    over = {k: v for k, v in given.items() if v is not None}
    over.setdefault("batch_size", 64)
    cfg = recipe(a.recipe, **over)
    a.batch, a.window, a.chunk, a.rank = cfg.batch_size, cfg.window, cfg.chunk, cfg.rank
    if a.work_only:
        a.work_rows = a.work_rows or a.batch
        dev = a.device if a.device != "cuda" or torch.cuda.is_available() else "cpu"
    if a.work_rows > a.batch:
        raise SystemExit(f"profile_ttt: --work-rows: {a.work_rows}; expected at most --batch ({a.batch})")
    if first_call and not (first_call[0] <= a.batch and cfg.chunk < first_call[1] <= a.window):
        raise SystemExit(f"profile_ttt: --first-call: {a.first_call!r}; expected at most --batch ({a.batch}) rows and "
                         f"a window in ({cfg.chunk}, {a.window}]")
    tmp = tempfile.mkdtemp()
    path = os.path.join(tmp, "model.ptz")
    build_artifact(path, None, train_steps=0, device=dev)
    rb = _rows(a.window + 1, a.batch, cfg, dev)
    out = {"gpu": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "torch": torch.__version__,
           "first_call": list(first_call) if first_call else None,
           "recipe": a.recipe, "batch": a.batch, "window": a.window, "chunk": a.chunk, "rank": a.rank,
           "targets": list(cfg.targets), "optimizer": cfg.optimizer, "variants": {}}
    if a.work_rows:
        out["work"] = {}
        for tail in sorted({_variant(v)["tail"] for v in a.variants.split(",")}):
            out["work"]["tail" if tail else "full"] = _count_work(path, cfg, tail, a.work_rows, dev)
        if a.work_only:
            _save(out, a.out)
            return out
    from pgolf_kernels import linear_act, linear_residual, lora_merged
    from train import forward as fwd_mod
    from train import adapters as adapters_mod
    from train import model as model_mod

    # suffix -> (module, switch, the value it sets); without the suffix a switch keeps the value the process started
    # with (its environment variable's)
    switches = {"dxk": (lora_merged, "DX_KERNEL", True), "b0": (fwd_mod, "BLOCK0_LEAF", False),
                "ws": (linear_residual, "MLP_UP_WS", True), "sgn": (linear_residual, "MLP_SIGNS", True),
                "gws": (linear_act, "GRAD_WS", True), "skp": (model_mod, "SKIP_KERNEL", True),
                "fk": (model_mod, "SKIP_FORK", True), "jf": (model_mod, "JOIN_FOLD", True), "nrm": (model_mod, "NORM_KERNEL", True),
                "of": (adapters_mod, "O_FOLD", True), "rws": (linear_residual, "RES_WS", True),
                "dact": (linear_residual, "MLP_DOWN_ACT", True), "sws": (lora_merged, "SUM_WS", True),
                "qws": (lora_merged, "QKV_WS", True), "kbh": (model_mod, "QK_LAYOUT", "k-bhtd"),
                "qkbh": (model_mod, "QK_LAYOUT", "bhtd")}
    started = {k: getattr(m, name) for k, (m, name, _) in switches.items()}
    eff_default = dict(lora_merged.EFFECTIVE_CONFIG)
    ws_mod = None   # linear_act_ws (it needs Gluon): imported for a -wtN variant only; its tile restored at the end
    ws_start = None
    for v in a.variants.split(","):
        var = _variant(v)
        path_kind, mode = var["path"], var["mode"]
        # -tail: TTTConfig.tail_block (the last block at the scored chunk only); -fused / -torchopt: the optimizer
        cfg_v = dataclasses.replace(cfg, tail_block=var["tail"], fused_optimizer=var["fused"], fused_mlp=var["mlp"],
                                    fused_qk=var["qk"], fused_residual=var["res"])
        linear_act.TILE_OVERRIDE.clear()
        linear_act.TILE_OVERRIDE.update({a: linear_act.TILE_CONFIGS[T128_CONFIG] for a in T128_EPILOGUES}
                                        if var["t128"] else {})
        for k, (m, name, _) in switches.items():   # two suffixes may set one switch: all back first
            setattr(m, name, started[k])
        for k, (m, name, value) in switches.items():
            if var[k]:
                setattr(m, name, value)
        lora_merged.EFFECTIVE_CONFIG = (dict(eff_default) if var["eff"] is None
                                        else dict(lora_merged.EFFECTIVE_CONFIGS[var["eff"]]))
        if var["wt"] is not None and ws_mod is None:
            from pgolf_kernels import linear_act_ws as ws_mod

            ws_start = (ws_mod.BK, ws_mod.STAGES)
        if ws_mod is not None:
            ws_mod.use_tile(*(ws_start if var["wt"] is None else ws_mod.TILES[var["wt"]]))
        model, ad, opt = _setup(path_kind == "reference", path, cfg_v, dev, identity=not var["rowmap"])
        step = _step_fn(model, ad, opt, mode == "compile",
                        mode="max-autotune-no-cudagraphs" if var["autotune"] else None)
        t = time.perf_counter()
        try:
            if first_call:  # the compile happens here, at the small shape; the full one follows
                R, L = first_call
                ad.set_rows(torch.arange(R, device=dev))
                step(_rows(L + 1, R, _at_window(cfg_v, L), dev, seed=7))
                ad.set_rows(torch.arange(ad.n_docs, device=dev))
            step(rb)
            _sync()
        except Exception as e:  # report and go on: one variant failing must not hide the others
            print(f"[{v}] FAILED: {type(e).__name__}: {str(e)[:800]}", flush=True)
            traceback.print_exc()
            out["variants"][v] = {"error": f"{type(e).__name__}: {e}"[:2000]}
            continue
        first = time.perf_counter() - t
        ms = _time(step, rb, a.steps)
        wall, busy, rows, cats, groups = _profile(step, rb, a.top)
        sites = _sites(step, rb, [r[0] for r in rows]) if a.sites else {}
        print(f"\n[{v}] first call {first:.1f} s; step {ms:.2f} ms (median of {a.steps}); profiled wall {wall:.2f} ms, "
              f"GPU busy {busy:.2f} ms; by category (ms): {cats}; by pass group (ms): {groups}", flush=True)
        for k, t_ms, c in rows:
            print(f"  {t_ms:8.3f} ms  x{c:<4d} {k}")
            for site, s_ms in sites.get(k, []):
                print(f"  {'':>8}     {s_ms:8.3f} ms  from {site[:200]}")
        out["variants"][v] = {"first_call_s": first, "step_ms": ms, "profiled_wall_ms": wall, "gpu_busy_ms": busy,
                              "top": rows, "categories_ms": cats, "groups_ms": groups, "fused_optimizer": opt.fused,
                              "fused_mlp": ad.fused_mlp, "fused_qk": ad.fused_qk,
                              "fused_residual": ad.fused_residual, "identity_rows": ad.identity_rows,
                              "linear_act_tiles": dict(linear_act.TILE_OVERRIDE),
                              "merged_dx_kernel": lora_merged.DX_KERNEL, "block0_leaf": fwd_mod.BLOCK0_LEAF,
                              "mlp_up_ws": linear_residual.MLP_UP_WS, "mlp_signs": linear_residual.MLP_SIGNS,
                              "act_grad_ws": linear_act.GRAD_WS, "skip_kernel": model_mod.SKIP_KERNEL, "skip_fork": model_mod.SKIP_FORK, "join_fold": model_mod.JOIN_FOLD, "norm_kernel": model_mod.NORM_KERNEL, "o_fold": adapters_mod.O_FOLD, "res_ws": linear_residual.RES_WS, "mlp_down_act": linear_residual.MLP_DOWN_ACT, "sum_ws": lora_merged.SUM_WS, "qkv_ws": lora_merged.QKV_WS, "qk_layout": model_mod.QK_LAYOUT,
                              "effective_config": dict(lora_merged.EFFECTIVE_CONFIG)}
        if a.sites:
            out["variants"][v]["sites"] = sites
        work = out.get("work", {}).get("tail" if var["tail"] else "full")
        if work:  # the reference step's work over this variant's time: comparable across variants
            fl = work["floor"]
            rate = {"step_tflop_per_s": round((fl["gemm_tflop"] + fl["attention_tflop"]) / ms * 1e3, 1)}
            if cats.get("attention"):
                rate["attention_tflop_per_s"] = round(fl["attention_tflop"] / cats["attention"] * 1e3, 1)
            if cats.get("gemm") and mode == "compile" and path_kind == "reference" and not var["autotune"]:
                # its GEMMs are all cuBLAS (the kernel path's and an autotuned one's are partly Triton)
                rate["gemm_tflop_per_s"] = round(fl["gemm_tflop"] / cats["gemm"] * 1e3, 1)
            out["variants"][v]["achieved"] = rate
            print(f"[{v}] achieved on the reference step's work: {rate}", flush=True)
        if a.new_shapes:
            shapes, cpu_top = _new_shapes(step, ad, cfg_v, dev, a.batch, a.window, a.new_shapes, a.top)
            print(f"[{v}] new shapes (first / second step ms): "
                  + ", ".join(f"{d['rows']}x{d['window']} {d['first_ms']}/{d['second_ms']}" for d in shapes))
            for k, t_ms, c in cpu_top:
                print(f"  host {t_ms:8.3f} ms  x{c:<4d} {k}")
            out["variants"][v].update(new_shapes=shapes, new_shape_host_top=cpu_top)
        del model, ad, opt, step
        if dev == "cuda":
            torch.cuda.empty_cache()
    linear_act.TILE_OVERRIDE.clear()
    for k, (m, name, _) in switches.items():
        setattr(m, name, started[k])
    lora_merged.EFFECTIVE_CONFIG = eff_default
    if ws_mod is not None:
        ws_mod.use_tile(*ws_start)
    _save(out, a.out)
    return out


# -t128: the epilogues that read a (BM, BN) tile (derivative, residual) on 128 x 128 x 4 warps x 4 stages, their
# default before linear_act.GRAD_CONFIG became the split-epilogue 128 x 256 tile: the before of that change
T128_EPILOGUES = ("leaky_relu_sq_grad", "residual")
T128_CONFIG = 2   # linear_act.TILE_CONFIGS[2]: 128 x 128 x 64, 4 warps, 4 stages
_SUFFIXES = ("tail", "fused", "torchopt", "mlp", "nomlp", "qk", "noqk", "res", "nores", "rowmap", "t128", "dxk", "b0",
             "ws", "gws", "sgn", "skp", "fk", "jf", "nrm", "of", "rws", "dact", "sws", "qws", "kbh", "qkbh", "eff", "wt", "autotune")  # the order a variant's suffixes must come in


def _variant(v: str):
    """'(kernel|reference)-(eager|compile)[-tail][-fused|-torchopt][-mlp|-nomlp][-qk|-noqk][-res|-nores][-rowmap][-t128][-dxk][-b0][-ws][-gws][-sgn][-skp][-fk][-jf][-nrm][-of][-rws][-dact][-sws][-qws][-kbh|-qkbh][-effN][-wtN][-autotune]'
    -> dict(path, mode, tail, fused, mlp, qk, res, rowmap, t128, dxk, b0, ws, gws, sgn, skp, fk, jf, nrm, of, rws, dact, sws, qws, kbh, qkbh, eff, wt, autotune) (fused, mlp, qk, res: True / False / None = the
    eval's auto; mlp: TTTConfig.fused_mlp; res: TTTConfig.fused_residual; rowmap: DocLoRA without identity_rows; t128:
    ``linear_act.TILE_CONFIGS[T128_CONFIG]`` for ``T128_EPILOGUES`` in ``linear_act.TILE_OVERRIDE``; dxk:
    ``lora_merged.DX_KERNEL`` on, the merged backward's dx through ``sum_products``; b0: ``train.forward.BLOCK0_LEAF``
    off; ws: ``linear_residual.MLP_UP_WS`` on; gws: ``linear_act.GRAD_WS`` on; sgn: ``linear_residual.MLP_SIGNS`` on; skp: ``train.model.SKIP_KERNEL`` on; fk: ``train.model.SKIP_FORK`` on; jf: ``train.model.JOIN_FOLD`` on; nrm: ``train.model.NORM_KERNEL`` on; of: ``train.adapters.O_FOLD`` on; rws: ``linear_residual.RES_WS`` on; dact: ``linear_residual.MLP_DOWN_ACT`` on; sws: ``lora_merged.SUM_WS`` on; qws: ``lora_merged.QKV_WS`` on; kbh / qkbh: ``train.model.QK_LAYOUT``
    "k-bhtd" / "bhtd"; eff: an index into ``lora_merged.EFFECTIVE_CONFIGS``, None = the
    default tile; wt: an index into ``linear_act_ws.TILES``, None = the tile the process started with), or None
    when ``v`` is not of that form."""
    parts = v.split("-")
    if len(parts) < 2 or parts[0] not in ("kernel", "reference") or parts[1] not in ("eager", "compile"):
        return None
    suf = parts[2:]
    eff = [x for x in suf if re.fullmatch(r"eff[0-9]", x)]   # -effN: lora_merged.EFFECTIVE_CONFIGS[N]
    if "eff" in suf or {"kbh", "qkbh"} <= set(suf):   # -kbh and -qkbh set one switch: one of them
        return None
    wt = [x for x in suf if re.fullmatch(r"wt[0-9]", x)]     # -wtN: linear_act_ws.TILES[N]
    if "wt" in suf:
        return None
    suf = ["eff" if x in eff else "wt" if x in wt else x for x in suf]
    order = [_SUFFIXES.index(x) if x in _SUFFIXES else -1 for x in suf]
    if -1 in order or order != sorted(set(order)) or ("fused" in suf and "torchopt" in suf) \
            or ("mlp" in suf and "nomlp" in suf) or ("qk" in suf and "noqk" in suf) or ("res" in suf and "nores" in suf) \
            or (parts[1] == "eager" and "autotune" in suf):
        return None
    def on_off(on: str, off: str):  # the pair's switch: True / False, None (the eval's auto) when neither is named
        return True if on in suf else False if off in suf else None

    return {"path": parts[0], "mode": parts[1], "tail": "tail" in suf, "fused": on_off("fused", "torchopt"),
            "mlp": on_off("mlp", "nomlp"), "qk": on_off("qk", "noqk"), "res": on_off("res", "nores"),
            "rowmap": "rowmap" in suf, "t128": "t128" in suf, "dxk": "dxk" in suf, "b0": "b0" in suf,
            "ws": "ws" in suf, "gws": "gws" in suf, "sgn": "sgn" in suf, "skp": "skp" in suf, "fk": "fk" in suf, "jf": "jf" in suf, "nrm": "nrm" in suf, "of": "of" in suf, "rws": "rws" in suf, "dact": "dact" in suf, "sws": "sws" in suf, "qws": "qws" in suf, "kbh": "kbh" in suf, "qkbh": "qkbh" in suf,
            "eff": int(eff[0][3:]) if eff else None, "wt": int(wt[0][2:]) if wt else None,
            "autotune": "autotune" in suf}


def _save(out: dict, where) -> None:
    if where:
        os.makedirs(where, exist_ok=True)
        with open(os.path.join(where, "profile_ttt.json"), "w") as f:
            json.dump(out, f, indent=1)


def _count_work(path: str, cfg, tail: bool, rows: int, dev) -> dict:
    """``step_work`` of the reference path's eager step on ``rows`` of the batch's rows (the step's work is linear in
    rows), with ``work_floor`` scaled to the whole batch."""
    cfg_w = dataclasses.replace(cfg, tail_block=tail, batch_size=rows)
    model, ad, opt = _setup(True, path, cfg_w, dev)
    step = _step_fn(model, ad, opt, False)
    t = time.perf_counter()
    work = step_work(step, _rows(cfg.window + 1, rows, cfg_w, dev))
    n_params = sum(p.numel() for p in ad.params) * cfg.batch_size // rows
    floor = work_floor(work, n_params, scale=cfg.batch_size / rows)
    print(f"[work{' tail' if tail else ''}] {cfg.batch_size} rows x {cfg.window} (counted on {rows} rows in "
          f"{time.perf_counter() - t:.1f} s): GEMM {floor['gemm_tflop']} TFLOP, attention {floor['attention_tflop']} "
          f"TFLOP, optimizer {floor['optimizer_gb']} GB; at the data-sheet peaks >= {floor['floor_ms_total']} ms "
          f"{floor['floor_ms_at_peak']}", flush=True)
    del model, ad, opt, step
    return dict(work, rows_counted=rows, floor=floor)


if __name__ == "__main__":
    main()
