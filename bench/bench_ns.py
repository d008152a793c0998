"""Newton-Schulz benchmark: the 11-layer record banks, single matrices, one rank's 1/8 share,
a tile-config sweep, and a 300-step training-parity run (kernel NS vs reference NS).

Timing: ours = CUDA-graph replay (``graph_bench_ms``; the kernel path is ~3 launches per NS step + 2-3 prologue
launches per input, and in eager mode Python launch overhead, not the GPU, would be measured). Baselines are
timed with ``bench_ms`` (do_bench) and, where capturable, graph replay too; ``baseline_ms`` is the faster of
the two so the speedup is conservative. TFLOP/s use the full count 4 m^2 n + 2 m^3 per step per matrix
(``tflops_full``) and, for ours, also the count of what the kernels compute, 3 m^2 n + m^3 (``tflops_sym``).
"""
from __future__ import annotations

import math
import time

import torch

from bench.harness import bench_ms, graph_bench_ms, make_row, tflops

import os as _os

# NS_TUNE=1: per-kernel time breakdown + per-kernel tile-config sweep (results file ns-tune-<gpu>)
TUNE = _os.environ.get("NS_TUNE", "0") not in ("", "0")
KERNEL = "ns-tune" if TUNE else "ns"

SET_MLP3 = [(22, 512, 512), (22, 256, 512), (11, 1536, 512), (11, 512, 1536)]
SET_MLP4 = [(22, 512, 512), (22, 256, 512), (11, 2048, 512), (11, 512, 2048)]
# one rank's share when 8 ranks split the MLP3x set: ceil(22/8) = 3, ceil(11/8) = 2 matrices per bank
SHARE8 = [(3, 512, 512), (3, 256, 512), (2, 1536, 512), (2, 512, 1536)]

CONFIGS = {
    "c128_s3": dict(),  # GPU_CONFIG
    "c128_s4": dict(g_stages=4, s_stages=4, u_stages=4),
    "gs64_u128": dict(g_block=64, s_block=64, g_warps=4, s_warps=4),
    "u128x256": dict(u_bn=256, u_stages=3),
    "w4_s4": dict(g_warps=4, s_warps=4, u_warps=4, g_stages=4, s_stages=4, u_stages=4),
}


def _records_ns(G, steps: int = 5):
    """The baseline record's per-matrix code path (bf16, quintic)."""
    a, b, c = (3.4445, -4.7750, 2.0315)
    X = G.bfloat16()
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    tall = G.size(-2) > G.size(-1)
    if tall:
        X = X.mT
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * A @ A
        X = a * X + B @ X
    return X.mT if tall else X


def _flops(shapes, steps=5, symmetric=False):
    from pgolf_kernels.newton_schulz import ns_flops

    return sum(s[0] * ns_flops(s[1], s[2], steps, symmetric) if len(s) == 3 else ns_flops(s[0], s[1], steps, symmetric)
               for s in shapes)


def _mk(shapes, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(s, generator=g, device="cuda", dtype=torch.float32) for s in shapes]


def _graph_or_nan(fn):
    try:
        return graph_bench_ms(fn)
    except Exception as e:  # noqa: BLE001 - a baseline that cannot be captured is timed eagerly only
        print(f"  (graph capture failed: {type(e).__name__}: {str(e)[:120]})")
        torch.cuda.synchronize()
        return math.nan


def _ours(mats, config=None):
    from pgolf_kernels import newton_schulz as nsm

    if config is None:
        return lambda: nsm.newton_schulz_many(mats)
    coeffs = [v for t in nsm.resolve_coefficients("quintic", 5) for v in t]
    return lambda: nsm._ns_packed_impl(mats, coeffs, 1e-7, torch.bfloat16, config)


def _case(name, shapes, baselines, rows, extra_note="", config=None):
    mats = _mk(shapes)
    ours_fn = _ours(mats, config)
    ours_fn()
    torch.cuda.synchronize()
    ours_g = graph_bench_ms(ours_fn)
    ours_e = bench_ms(ours_fn)
    f_full, f_sym = _flops(shapes), _flops(shapes, symmetric=True)
    for bname, bfn in baselines:
        t0 = time.time()
        bfn(mats)
        torch.cuda.synchronize()
        b_e = bench_ms(lambda: bfn(mats), warmup=5, rep=50)
        b_g = _graph_or_nan(lambda: bfn(mats)) if "eager loop" not in bname else math.nan
        b = min(b_e, b_g) if not math.isnan(b_g) else b_e
        rows.append(make_row(KERNEL, name, ours_g, bname, b, ours_eager_ms=ours_e, baseline_dobench_ms=b_e,
                             baseline_graph_ms=b_g, tflops_full=tflops(f_full, ours_g),
                             tflops_sym=tflops(f_sym, ours_g), baseline_tflops_full=tflops(f_full, b),
                             gflop_full=f_full / 1e9, note=extra_note))
        print(f"  {name:32s} ours {ours_g:.4f} ms (eager {ours_e:.4f}) | {bname}: {b:.4f} ms "
              f"({time.time() - t0:.1f}s)", flush=True)
    return ours_g


# ------------------------------------------------------------------------------------- training parity
def _parity_run(use_kernel: bool, seed: int, steps: int = 300, device: str = "cuda"):
    """Tiny MLP language model on a fixed random bigram source; Muon on the hidden matrices (a 3-D bank of 3
    square 256x256 layers + a 2-D 256x1024 up and a 1024x256 down projection), Adam on embedding/head."""
    from pgolf_kernels.muon import Muon

    torch.manual_seed(seed)
    V, D, T, Bsz = 256, 256, 64, 32
    gsrc = torch.Generator(device=device).manual_seed(1234)  # the data source is the same for every run
    trans = torch.softmax(torch.randn(V, V, device=device, generator=gsrc) * 3.0, dim=-1)
    emb = torch.nn.Parameter(torch.randn(V, D, device=device) * 0.5)
    bank = torch.nn.Parameter(torch.randn(3, D, D, device=device) / D ** 0.5)
    up = torch.nn.Parameter(torch.randn(4 * D, D, device=device) / D ** 0.5)
    down = torch.nn.Parameter(torch.randn(D, 4 * D, device=device) / (4 * D) ** 0.5)
    head = torch.nn.Parameter(torch.randn(V, D, device=device) / D ** 0.5)
    muon = Muon([bank, up, down], lr=0.02, momentum=0.95, weight_decay=0.0, use_kernel=use_kernel)
    adam = torch.optim.Adam([emb, head], lr=3e-3, betas=(0.9, 0.95))
    gdata = torch.Generator(device=device).manual_seed(seed + 777)
    curve = []
    for step in range(steps):
        x = torch.randint(0, V, (Bsz * T,), device=device, generator=gdata)
        y = torch.multinomial(trans[x], 1, generator=gdata).squeeze(1)
        h = torch.nn.functional.rms_norm(emb[x], (D,))
        for i in range(3):
            h = h + torch.relu(torch.nn.functional.rms_norm(h, (D,)) @ bank[i].T)
        h = h + torch.relu(torch.nn.functional.rms_norm(h, (D,)) @ up.T).square() @ down.T
        logits = torch.nn.functional.rms_norm(h, (D,)) @ head.T
        loss = torch.nn.functional.cross_entropy(logits.float(), y)
        loss.backward()
        muon.step()
        adam.step()
        muon.zero_grad(set_to_none=True)
        adam.zero_grad(set_to_none=True)
        curve.append(loss.item())
    return curve


def _parity(rows):
    t0 = time.time()
    k0 = _parity_run(True, 0)
    r0 = _parity_run(False, 0)
    r1 = _parity_run(False, 1)
    k1 = _parity_run(True, 1)

    def tail(c):  # mean of the last 20 steps (single-step losses are noisy)
        return sum(c[-20:]) / 20

    every = lambda c: [round(v, 4) for v in c[::25]] + [round(c[-1], 4)]  # noqa: E731
    print(f"  parity: kernel seed0 {tail(k0):.4f} seed1 {tail(k1):.4f} | reference seed0 {tail(r0):.4f} "
          f"seed1 {tail(r1):.4f} ({time.time() - t0:.1f}s)", flush=True)
    rows.append(dict(kernel=KERNEL, case="training parity 300 steps (tiny MLP LM, Muon)", ours_ms=0.0,
                     baseline="reference NS", baseline_ms=0.0, speedup=1.0,
                     kernel_final_loss_seed0=round(tail(k0), 4), kernel_final_loss_seed1=round(tail(k1), 4),
                     ref_final_loss_seed0=round(tail(r0), 4), ref_final_loss_seed1=round(tail(r1), 4),
                     seed_noise=round(abs(tail(r0) - tail(r1)), 4), kernel_vs_ref_seed0=round(abs(tail(k0) - tail(r0)), 4),
                     curve_kernel_seed0_every25=every(k0), curve_ref_seed0_every25=every(r0),
                     note="final loss = mean of the last 20 steps; seed changes init and data"))


# ------------------------------------------------------------------------------------------- tuning
G_CANDS = {  # (BLOCK, BK, warps, stages) for the symmetric Gram / square kernels
    "128/64/w8/s3": (128, 64, 8, 3), "128/64/w4/s3": (128, 64, 4, 3), "128/64/w8/s2": (128, 64, 8, 2),
    "128/128/w8/s2": (128, 128, 8, 2), "128/32/w4/s4": (128, 32, 4, 4), "64/64/w4/s3": (64, 64, 4, 3),
}
U_CANDS = {  # (BM, BN, BK, warps, stages) for the update kernel
    "128x128/64/w8/s3": (128, 128, 64, 8, 3), "128x128/64/w4/s3": (128, 128, 64, 4, 3),
    "128x256/64/w8/s3": (128, 256, 64, 8, 3), "256x128/64/w8/s3": (256, 128, 64, 8, 3),
    "128x128/128/w8/s2": (128, 128, 128, 8, 2), "128x64/64/w4/s3": (128, 64, 64, 4, 3),
    "64x128/64/w4/s4": (64, 128, 64, 4, 4),
}
SMALL_CFG = dict(g_block=64, g_bk=64, g_warps=4, g_stages=3, s_block=64, s_bk=64, s_warps=4, s_stages=3,
                 u_bm=64, u_bn=64, u_bk=64, u_warps=4, u_stages=3)


def _kernel_ms(shapes, kind, cfg):
    """Graph-replay ms of ONE launch of one NS kernel over the whole packed set, with tile config cfg."""
    from pgolf_kernels import newton_schulz as nsm

    full = dict(nsm.GPU_CONFIG)
    full.update(cfg)
    dev = torch.device("cuda")
    plan = nsm._get_plan(tuple(shapes), dev, full)
    X = torch.randn(plan.x_total, device=dev).mul_(0.02).bfloat16()
    A = torch.randn(plan.a_total, device=dev).mul_(0.02).bfloat16()
    Bm = torch.randn(plan.a_total, device=dev).mul_(0.02).bfloat16()
    Y = torch.empty_like(X)
    if kind == "gram":
        fn = lambda: nsm._ns_gram_kernel[(plan.g_items.shape[0],)](  # noqa: E731
            X, A, plan.g_items, BLOCK=full["g_block"], BK=full["g_bk"], EVEN=plan.even, IEEE=False,
            num_warps=full["g_warps"], num_stages=full["g_stages"])
    elif kind == "square":
        fn = lambda: nsm._ns_square_kernel[(plan.s_items.shape[0],)](  # noqa: E731
            A, Bm, plan.s_items, -4.775, 2.0315, BLOCK=full["s_block"], BK=full["s_bk"], EVEN=plan.even,
            IEEE=False, num_warps=full["s_warps"], num_stages=full["s_stages"])
    else:
        fn = lambda: nsm._ns_update_kernel[(plan.u_items.shape[0],)](  # noqa: E731
            X, Bm, Y, plan.u_items, 3.4445, BM=full["u_bm"], BN=full["u_bn"], BK=full["u_bk"], EVEN=plan.even,
            FINAL=False, IEEE=False, num_warps=full["u_warps"], num_stages=full["u_stages"])
    fn()
    torch.cuda.synchronize()
    return graph_bench_ms(fn)


def _tune(rows, deadline):
    from pgolf_kernels import newton_schulz as nsm
    from pgolf_kernels.testing import rel_err

    shapes = SET_MLP3
    f_sym = {"gram": 0, "square": 0, "update": 0}
    for s in shapes:
        cnt, (m, n) = s[0], sorted(s[1:])
        f_sym["gram"] += cnt * m * m * n            # one triangle of 2 m^2 n
        f_sym["square"] += cnt * m ** 3             # one triangle of 2 m^3
        f_sym["update"] += cnt * 2 * m * m * n
    # prologue alone (norm + scaled/transposed cast copy for the 4 banks)
    mats = _mk(shapes)
    plan = nsm._get_plan(tuple(tuple(g.shape) for g in mats), torch.device("cuda"), dict(nsm.GPU_CONFIG))
    Xw = torch.empty(plan.x_total, device="cuda", dtype=torch.bfloat16)
    pro = graph_bench_ms(lambda: nsm._pack_inputs(mats, plan, Xw, 1e-7, fast=False))
    rows.append(make_row(KERNEL, "breakdown: prologue (norm + pack), MLP3x set", pro, "-", pro))
    print(f"  prologue {pro:.4f} ms", flush=True)
    pro_f = graph_bench_ms(lambda: nsm._pack_inputs(mats, plan, Xw, 1e-7, fast=True))
    rows.append(make_row(KERNEL, "breakdown: prologue with Triton pack (FAST_PACK), MLP3x set", pro_f, "torch prologue", pro))
    print(f"  prologue FAST_PACK {pro_f:.4f} ms", flush=True)
    best = {}
    for kind, cands in (("gram", G_CANDS), ("square", G_CANDS), ("update", U_CANDS)):
        for name, t in cands.items():
            if time.time() > deadline - 25:
                print("  tune stopped: time guard", flush=True)
                break
            if kind == "update":
                cfg = dict(u_bm=t[0], u_bn=t[1], u_bk=t[2], u_warps=t[3], u_stages=t[4])
            else:
                p = "g" if kind == "gram" else "s"
                cfg = {f"{p}_block": t[0], f"{p}_bk": t[1], f"{p}_warps": t[2], f"{p}_stages": t[3]}
            try:
                ms = _kernel_ms(shapes, kind, cfg)
            except Exception as e:  # noqa: BLE001 - e.g. out of shared memory: reported, not fatal
                print(f"  {kind} {name} failed: {type(e).__name__}: {str(e)[:160]}", flush=True)
                continue
            tf = tflops(f_sym[kind], ms)
            rows.append(make_row(KERNEL, f"kernel {kind} {name}, MLP3x set, 1 launch", ms, "-", ms,
                                 tflops_sym=tf, config=str(cfg)))
            print(f"  {kind:6s} {name:20s} {ms:.4f} ms  {tf:.0f} TFLOP/s (computed flops)", flush=True)
            if kind not in best or ms < best[kind][0]:
                best[kind] = (ms, cfg)
    combo = {}
    for kind in best:
        combo.update(best[kind][1])
    # whole set with the best per-kernel combination vs the default, outputs compared
    mats = _mk(shapes)
    coeffs = [v for t in nsm.resolve_coefficients("quintic", 5) for v in t]
    out_def = nsm._ns_packed_impl(mats, coeffs, 1e-7, torch.bfloat16, None)
    for cname, cfg in (("default", {}), ("best per-kernel combo", combo)):
        fn = lambda cfg=cfg: nsm._ns_packed_impl(mats, coeffs, 1e-7, torch.bfloat16, cfg)  # noqa: E731
        out = fn()
        torch.cuda.synchronize()
        ms = graph_bench_ms(fn)
        rows.append(make_row(KERNEL, f"whole MLP3x set, {cname}", ms, "-", ms, tflops_full=tflops(_flops(shapes), ms),
                             tflops_sym=tflops(_flops(shapes, symmetric=True), ms), config=str(cfg),
                             rel_diff_vs_default=rel_err(out, out_def), bitwise_equal_default=bool(torch.equal(out, out_def))))
        print(f"  whole set {cname}: {ms:.4f} ms  cfg={cfg} equal_default={torch.equal(out, out_def)}", flush=True)
    # small tiles for launches with few tiles (singles, one rank's share)
    for cname, shp in (("single 512x512", [(512, 512)]), ("single 1536x512", [(1536, 512)]),
                       ("1/8 share of MLP3x set", SHARE8)):
        m2 = _mk(shp)
        for tname, cfg in (("default", {}), ("64-tiles", SMALL_CFG), ("best combo", combo)):
            fn = lambda cfg=cfg, m2=m2: nsm._ns_packed_impl(m2, coeffs, 1e-7, torch.bfloat16, cfg)  # noqa: E731
            fn()
            torch.cuda.synchronize()
            ms = graph_bench_ms(fn)
            rows.append(make_row(KERNEL, f"{cname}, {tname}", ms, "-", ms, tflops_full=tflops(_flops(shp), ms),
                                 config=str(cfg)))
            print(f"  {cname} {tname}: {ms:.4f} ms", flush=True)
    return rows


def run(quick: bool = False):
    import os

    rows = []
    t_start = time.time()
    # optional parts (parity, sweep) are skipped past this wall-clock deadline (the GPU run has a hard limit)
    deadline = float(os.environ.get("NS_BENCH_DEADLINE", t_start + 170))
    # 10 static bank shapes + 4 per-matrix shapes on one code object: above dynamo's default limit of 8,
    # past which it would silently run the baseline eagerly
    for knob in ("cache_size_limit", "recompile_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 64)
    if TUNE:
        return _tune(rows, deadline)
    eager_loop = ("per-matrix eager loop (records)", lambda ms: [_records_ns(g[i]) for g in ms for i in range(g.shape[0])])
    ns_c = torch.compile(_records_ns, dynamic=False)
    compiled_loop = ("per-matrix torch.compile", lambda ms: [ns_c(g[i]) for g in ms for i in range(g.shape[0])])
    compiled_banks = ("torch.compile 3-D banks", lambda ms: [ns_c(g) for g in ms])

    # 1. whole MLP3x set: every baseline
    _case("11L MLP3x set (66 mats, 5 steps)", SET_MLP3, [compiled_banks, eager_loop, compiled_loop], rows)
    # 1b. the same with the torch copy in the prologue instead of the Triton pack (FAST_PACK, the default)
    from pgolf_kernels import newton_schulz as nsm

    fast = nsm.FAST_PACK
    nsm.FAST_PACK = False
    try:
        _case("11L MLP3x set, torch-copy prologue", SET_MLP3, [compiled_banks], rows)
        _case("1/8 share of MLP3x set, torch-copy prologue", SHARE8, [compiled_banks], rows)
    finally:
        nsm.FAST_PACK = fast
    # 2. one rank's 1/8 share
    _case("1/8 share of MLP3x set (10 mats)", SHARE8, [compiled_banks], rows)
    # 3. MLP4x set
    _case("11L MLP4x set (66 mats, 5 steps)", SET_MLP4, [compiled_banks], rows)
    # 4. single matrices
    single_eager = ("eager (records)", lambda ms: _records_ns(ms[0]))
    single_comp = ("torch.compile", lambda ms: ns_c(ms[0]))
    _case("single 512x512", [(512, 512)], [single_comp, single_eager], rows)
    _case("single 1536x512", [(1536, 512)], [single_comp, single_eager], rows)
    print(f"  main cases done at {time.time() - t_start:.0f}s", flush=True)
    # 5. training parity
    if not quick and time.time() < deadline - 30:
        _parity(rows)
    else:
        print("  parity skipped: time guard", flush=True)
    # 6. tile-config sweep on the whole MLP3x set (ours only; baseline = compiled banks measured above)
    base = next(r for r in rows if r["baseline"].startswith("torch.compile 3-D"))
    for cname, cfg in CONFIGS.items():
        if quick or time.time() > deadline - 8:
            print(f"  sweep stopped at {cname}: time guard", flush=True)
            break
        try:
            mats = _mk(SET_MLP3)
            fn = _ours(mats, cfg)
            fn()
            torch.cuda.synchronize()
            ms = graph_bench_ms(fn)
            rows.append(make_row(KERNEL, f"sweep {cname}: MLP3x set", ms, base["baseline"], base["baseline_ms"],
                                 tflops_full=tflops(_flops(SET_MLP3), ms), tflops_sym=tflops(_flops(SET_MLP3, symmetric=True), ms),
                                 config=str(cfg)))
            print(f"  sweep {cname}: {ms:.4f} ms", flush=True)
        except Exception as e:  # noqa: BLE001 - a config that fails to compile is reported, not fatal
            print(f"  sweep {cname} failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
    return rows
