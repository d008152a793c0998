"""Training loop: ``python3 -m train`` (1 process) or ``torchrun --nproc_per_node=N -m train``.

Flow (all settings in ``train/config.py``, every value logged):
  1. distributed set-up from torchrun's env (NCCL on CUDA, gloo on CPU);
  2. data: ``DATA_PATH`` / ``VAL_PATH`` shards, or the offline stdlib fixture (built by rank 0, cached);
  3. model ``GPT`` (fp32 master weights, bf16 autocast on CUDA), ``torch.compile`` on CUDA, DDP if N > 1;
  4. optimizers: Muon (``pgolf_kernels.muon.Muon`` on our Newton-Schulz kernel; ``--reference``: the same
     optimizer with the plain-torch NS) for block matrices, passed as one bank per shape, Adam for the
     embedding and the scalars; Muon momentum warm-up; LR warm-down over the last ``warmdown_frac`` of
     the wall-clock budget; EMA of the weights;
  5. warm-up steps (compile, autotune) first, then model/optimizer/loader are restored to their initial
     state: warm-up time is reported, not counted;
  6. the loop: stop at ``ITERATIONS`` or when the budget is spent; the stop decision is all-reduced (MAX)
     so every rank stops at the same step; a log line every ``LOG_EVERY`` steps; over the last
     ``QAT_FRAC`` of the run (same clock as the warm-down) the block matrices train through int6
     fake quantization with a straight-through gradient (``pgolf_kernels.qat.int6_qat_linear``, the
     artifact codec's clip rule; ``--reference``: the plain-torch STE);
  7. validation (loss, and BPB when a tokenizer is known) of the raw and EMA weights; the better one is
     quantized into the artifact (int6 matrices, int8 embedding, fp16 rest, zstd-22), reloaded and
     evaluated again (dequantized bf16 ``nn.Linear``, and ``Int6Linear`` codes unless ``--reference``).
A JSON summary is written beside the log (``runs/<run_id>/summary.json``) and returned by ``main``.
"""
from __future__ import annotations

import contextlib
import copy
import gc
import json
import math
import os
import sys
import time
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .config import TrainConfig, parse_config
from .data import DistributedTokenLoader, load_tokens
from .model import GPT, _flash_attn3


# ------------------------------------------------------------------------------------------ NS / Muon
def newton_schulz_torch(G: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Plain-torch quintic Newton-Schulz on a (..., m, n) stack: X <- aX + (bA + cA^2)X, A = XX^T,
    (a, b, c) = (3.4445, -4.7750, 2.0315), X0 = G/(||G||_F + eps), transposed so m <= n. bf16 on CUDA
    (as the records), fp32 on CPU (bf16 matmuls are slow there)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.to(torch.bfloat16 if G.is_cuda else torch.float32)
    transposed = X.size(-2) > X.size(-1)
    if transposed:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + eps)
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    if transposed:
        X = X.mT
    return X


class FallbackMuon(torch.optim.Optimizer):
    """Muon with plain-torch NS batched per same-shape bank: the ``MUON_IMPL=torch-banked`` baseline
    (a strong eager competitor to the kernel), and the stand-in when ``pgolf_kernels.muon`` is missing.

    Per parameter: buf = momentum*buf + g; u = g + momentum*buf (Nesterov) or buf; same-shape
    parameters are stacked into one bank and orthogonalized together; with a process group, bank
    slot i is computed by rank i % W and the updates are summed across ranks (others hold zeros).
    p <- p*(1 - lr*wd) - lr * max(1, rows/cols)^0.5 * NS(u).
    """

    def __init__(self, params, lr=0.02, momentum=0.95, nesterov=True, weight_decay=0.0, ns_steps=5,
                 process_group=None, **unused):
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                                      ns_steps=ns_steps))
        self.pg = process_group

    @torch.no_grad()
    def step(self):
        world = dist.get_world_size(self.pg) if (self.pg is not None and dist.is_initialized()) else 1
        rank = dist.get_rank(self.pg) if world > 1 else 0
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            by_shape: Dict[tuple, List[torch.Tensor]] = {}
            for p in params:
                by_shape.setdefault(tuple(p.shape), []).append(p)
            for shape, ps in by_shape.items():
                us = []
                for p in ps:
                    st = self.state[p]
                    if "momentum_buffer" not in st:
                        st["momentum_buffer"] = torch.zeros_like(p.grad)
                    buf = st["momentum_buffer"]
                    buf.mul_(group["momentum"]).add_(p.grad)
                    us.append(p.grad.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf)
                mine = list(range(rank, len(ps), world))
                out = torch.zeros((len(ps),) + shape, device=ps[0].device, dtype=torch.float32)
                if mine:
                    out[mine] = newton_schulz_torch(torch.stack([us[i] for i in mine]), group["ns_steps"]).float()
                if world > 1:
                    dist.all_reduce(out, group=self.pg)
                scale = max(1.0, shape[0] / shape[1]) ** 0.5
                for i, p in enumerate(ps):
                    if group["weight_decay"]:
                        p.mul_(1 - group["lr"] * group["weight_decay"])
                    p.add_(out[i].to(p.dtype), alpha=-group["lr"] * scale)


def make_muon(params, cfg: TrainConfig, process_group, log):
    """One param group per shape (a 'bank'), our Muon unless it is missing (then the fallback)."""
    by_shape: Dict[tuple, list] = {}
    for p in params:
        by_shape.setdefault(tuple(p.shape), []).append(p)
    groups = [dict(params=ps) for ps in by_shape.values()]
    kw = dict(lr=cfg.matrix_lr, momentum=cfg.muon_momentum, nesterov=True, weight_decay=cfg.muon_weight_decay,
              ns_steps=cfg.muon_ns_steps)
    if cfg.muon_impl == "torch-banked":
        return FallbackMuon(groups, process_group=process_group, **kw), "torch-banked-ns"
    try:
        from pgolf_kernels.muon import Muon
    except ImportError as e:
        log(f"optim: pgolf_kernels.muon not importable ({e}); using FallbackMuon (plain-torch NS)")
        return FallbackMuon(groups, process_group=process_group, **kw), "fallback-torch-ns"
    # NS in bf16 on CUDA (records); fp32 on CPU, where bf16 matmuls are slow and the kernel is not used
    cdt = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    opt = Muon(groups, coefficients="quintic", row_normalize=False, use_kernel=not cfg.reference,
               process_group=process_group, compute_dtype=cdt, **kw)
    kernel = not cfg.reference and torch.cuda.is_available()  # CPU tensors dispatch to the torch reference
    return opt, ("pgolf_kernels.muon[triton-ns]" if kernel else "pgolf_kernels.muon[torch-ns]")


# ------------------------------------------------------------------------------------------ helpers
class Logger:
    def __init__(self, path: Optional[str], master: bool):
        self.master = master
        self.f = open(path, "a") if (path and master) else None

    def __call__(self, msg: str = ""):
        if not self.master:
            return
        print(msg, flush=True)
        if self.f:
            self.f.write(msg + "\n")
            self.f.flush()


def run_fraction_left(cfg: TrainConfig, step: int, elapsed_s: float) -> float:
    """Fraction of the run left: the smaller of the wall-clock fraction (when a budget is set) and
    the iteration fraction, i.e. measured against whichever limit comes first."""
    frac_left = max(0.0, 1.0 - step / max(1, cfg.iterations))
    if cfg.max_wallclock_seconds > 0:
        frac_left = min(frac_left, max(0.0, 1.0 - elapsed_s / cfg.max_wallclock_seconds))
    return frac_left


def lr_multiplier(cfg: TrainConfig, step: int, elapsed_s: float) -> float:
    """1 until the warm-down window, then linear to 0 at the end of the run (``run_fraction_left``),
    so the LR reaches 0 at whichever limit comes first."""
    if cfg.warmdown_frac <= 0:
        return 1.0
    return min(1.0, run_fraction_left(cfg, step, elapsed_s) / cfg.warmdown_frac)


def qat_active(cfg: TrainConfig, step: int, elapsed_s: float) -> bool:
    """QAT covers the last ``qat_frac`` of the run, on the same clock as the warm-down."""
    # 1e-9: 1 - 85/100 is 0.15000000000000002 in floats; step 85 of 100 starts the last 15 %
    return cfg.qat_frac > 0 and run_fraction_left(cfg, step, elapsed_s) <= cfg.qat_frac + 1e-9


def muon_momentum(cfg: TrainConfig, step: int) -> float:
    if cfg.muon_momentum_warmup_steps <= 0:
        return cfg.muon_momentum
    t = min(1.0, step / cfg.muon_momentum_warmup_steps)
    return (1 - t) * cfg.muon_momentum_warmup_start + t * cfg.muon_momentum


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(model, val_tokens: torch.Tensor, seq_len: int, batch_tokens: int, device, rank: int, world: int,
             lut=None) -> dict:
    """Mean NLL over every target of the val stream cut into non-overlapping ``seq_len`` windows
    (the challenge's plain eval), split across ranks; BPB via the byte LUT when given."""
    from .bpb import BPBAccumulator

    model.eval()
    n_win = (val_tokens.numel() - 1) // seq_len
    if n_win < 1:
        raise ValueError(f"validation set has {val_tokens.numel()} tokens, fewer than seq_len+1={seq_len + 1}")
    lo, hi = n_win * rank // world, n_win * (rank + 1) // world
    bs = max(1, batch_tokens // seq_len)
    acc = BPBAccumulator(device)
    lut_d = lut.to(device) if lut is not None else None
    for w0 in range(lo, hi, bs):
        w1 = min(hi, w0 + bs)
        span = val_tokens[w0 * seq_len:w1 * seq_len + 1].to(device=device, dtype=torch.int64)
        x = span[:-1].view(w1 - w0, seq_len)
        y = span[1:].view(w1 - w0, seq_len)
        with _autocast(device):
            nll = model(x, y)
        nbytes = lut_d.target_bytes(x, y) if lut_d is not None else torch.zeros_like(nll)
        acc.add(nll, nbytes)
    acc.all_reduce()
    model.train()
    return dict(val_loss=acc.val_loss, val_bpb=(acc.bpb if lut is not None else None), val_targets=acc.n_targets)


def _fmt_eval(r: dict) -> str:
    s = f"val_loss {r['val_loss']:.4f}"
    if r.get("val_bpb") is not None:
        s += f" val_bpb {r['val_bpb']:.4f}"
    return s


# ------------------------------------------------------------------------------------------ main
def main(argv: Optional[List[str]] = None) -> dict:
    cfg = parse_config(argv)
    t_start = time.time()
    # ---- distributed
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    distributed = world > 1
    if distributed:
        dist.init_process_group(backend="nccl" if cuda else "gloo", device_id=device if cuda else None)
    master = rank == 0
    pg = dist.group.WORLD if distributed else None

    run_id = cfg.run_id or time.strftime("%Y%m%d-%H%M%S") + ("-ref" if cfg.reference else "")
    run_dir = os.path.join(cfg.runs_dir, run_id)
    if master:
        os.makedirs(run_dir, exist_ok=True)
    log = Logger(os.path.join(run_dir, "train.log"), master)
    log(f"== train: {' '.join(sys.argv)}")
    log(f"torch {torch.__version__}, device {torch.cuda.get_device_name(device) if cuda else 'cpu'}, "
        f"world {world}, backend {dist.get_backend() if distributed else 'none'}, "
        f"threads {torch.get_num_threads()}")

    # ---- data
    lut = None
    tok_path = cfg.tokenizer_path
    if cfg.data_path:
        train_pattern, val_pattern = cfg.data_path, cfg.val_path
        fixture_info = None
    else:
        from .fixture import build_fixture

        files = [p for p in cfg.fixture_text.split(",") if p] or None
        if master:
            fixture_info = build_fixture(os.path.join(cfg.runs_dir, "fixture"), files, vocab_size=min(cfg.vocab_size, 1024),
                                         include_sources=cfg.fixture_sources, log=log)
        if distributed:
            obj = [fixture_info if master else None]
            dist.broadcast_object_list(obj, src=0)
            fixture_info = obj[0]
        train_pattern, val_pattern = fixture_info["train_pattern"], fixture_info["val_pattern"]
        tok_path = tok_path or fixture_info["tokenizer"]
        log(f"data: fixture ({fixture_info['source']}, {'cached' if fixture_info.get('cached') else 'built'}): "
            f"{fixture_info['n_train_tokens']:,} train / {fixture_info['n_val_tokens']:,} val tokens, tokenizer {tok_path}")
    if tok_path:
        try:
            from .bpb import ByteLUT

            lut = ByteLUT.from_sentencepiece(tok_path, vocab_size=cfg.vocab_size)
        except ImportError:
            log("bpb: train/bpb.py not available; reporting val loss only")
    log("config:")
    for line in cfg.describe():
        log(line)
    log(f"  (resolved) train_pattern = {train_pattern!r}, val_pattern = {val_pattern!r}, tokenizer = {tok_path!r}")

    # ---- batch geometry
    tokens_per_rank = cfg.train_batch_tokens // world
    if cfg.train_batch_tokens % (world * cfg.seq_len):
        raise ValueError(f"train_batch_tokens={cfg.train_batch_tokens} must be a multiple of world*seq_len={world * cfg.seq_len}")
    grad_accum = max(1, math.ceil(tokens_per_rank / cfg.max_micro_tokens))
    while tokens_per_rank % (grad_accum * cfg.seq_len):
        grad_accum += 1
    micro_tokens = tokens_per_rank // grad_accum
    log(f"batch: {cfg.train_batch_tokens:,} tokens/step = {world} ranks x {grad_accum} micro-steps x "
        f"{micro_tokens // cfg.seq_len} x {cfg.seq_len}")

    val_tokens = load_tokens(val_pattern, cfg.val_max_tokens or None)
    loader = DistributedTokenLoader(train_pattern, rank, world, device)

    # ---- model + optimizers
    torch.manual_seed(cfg.seed)
    gcfg = cfg.gpt_config()
    base = GPT(gcfg).to(device)
    log(f"model: {base.num_params():,} params; {gcfg.to_dict()}")
    use_compile = cfg.compile == "1" or (cfg.compile == "auto" and cuda)
    model = torch.compile(base, dynamic=False) if use_compile else base
    if distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[local_rank] if cuda else None, broadcast_buffers=False)
    muon, muon_kind = make_muon([p for _, p in base.matrix_params()], cfg, pg, log)
    adam_groups = [dict(params=[p for _, p in base.embedding_params()], lr=cfg.embed_lr, base_lr=cfg.embed_lr),
                   dict(params=[p for _, p in base.scalar_params()], lr=cfg.scalar_lr, base_lr=cfg.scalar_lr)]
    adam = torch.optim.Adam(adam_groups, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps, fused=cuda)
    for g in muon.param_groups:
        g["base_lr"] = cfg.matrix_lr
    optimizers = [muon, adam]
    log(f"optim: Muon={muon_kind} on {sum(p.numel() for _, p in base.matrix_params()):,} matrix params in "
        f"{len(muon.param_groups)} banks; Adam on {sum(p.numel() for g in adam_groups for p in g['params']):,}; "
        f"compile={use_compile}; attention={'FA3' if (cuda and _flash_attn3()) else 'SDPA'}")

    def train_step(step: int, elapsed_s: float):
        loss_acc = torch.zeros((), device=device)
        for m in range(grad_accum):
            x, y = loader.next_batch(micro_tokens, cfg.seq_len)
            sync_ctx = model.no_sync() if (distributed and m < grad_accum - 1) else contextlib.nullcontext()
            with sync_ctx:
                with _autocast(device):
                    loss = model(x, y).mean()
                (loss / grad_accum).backward()
            loss_acc += loss.detach()
        mult = lr_multiplier(cfg, step, elapsed_s)
        for opt in optimizers:
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * mult
        for g in muon.param_groups:
            g["momentum"] = muon_momentum(cfg, step)
        if cfg.grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(base.parameters(), cfg.grad_clip_norm)
        for opt in optimizers:
            opt.step()
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        return loss_acc / grad_accum

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    qat_mode = "reference" if cfg.reference else "kernel"
    qat_clip = cfg.qat_clip_value()

    # ---- warm-up (compile), then restore the initial state
    warm_s = 0.0
    if cfg.warmup_steps > 0:
        init_model = copy.deepcopy(base.state_dict())
        init_opts = [copy.deepcopy(o.state_dict()) for o in optimizers]
        sync()
        t0 = time.perf_counter()
        for s in range(cfg.warmup_steps):
            # with QAT on, the second half of the warm-up runs the QAT graph, so its compile and
            # autotuning also happen before the clock starts
            if cfg.qat_frac > 0 and cfg.warmup_steps >= 2 and s == cfg.warmup_steps // 2:
                base.set_qat(qat_mode, 6, qat_clip)
            train_step(s, 0.0)
        base.set_qat(None)
        sync()
        warm_s = time.perf_counter() - t0
        base.load_state_dict(init_model)
        for o, st in zip(optimizers, init_opts):
            o.load_state_dict(st)
        loader.reset()
        del init_model, init_opts
        log(f"warm-up: {cfg.warmup_steps} steps (compile + autotune) took {warm_s:.1f} s, excluded from the budget; "
            "model, optimizers and loader restored")

    ema = None
    if cfg.ema_decay > 0:
        ema = [p.detach().float().clone() for p in base.parameters()]
    params = list(base.parameters())

    # ---- training loop
    global_tokens = cfg.train_batch_tokens
    step, train_s = 0, 0.0
    stop_flag = torch.zeros(2, device=device)
    sync()
    t_train0 = time.perf_counter()
    t_log, step_log = t_train0, 0
    losses_logged = []
    qat_start = None
    qat_next = qat_active(cfg, 0, 0.0)
    while True:
        elapsed = time.perf_counter() - t_train0
        if qat_start is None and qat_next:
            n_qat = base.set_qat(qat_mode, 6, qat_clip)
            qat_start = step
            log(f"qat: step {step}: {n_qat} block matrices now train through int6 fake quantization "
                f"({'pgolf_kernels.qat.int6_qat_linear' if qat_mode == 'kernel' else 'plain-torch STE'}, clip {qat_clip!r}; "
                f"{run_fraction_left(cfg, step, elapsed):.3f} of the run left)")
        last_loss = train_step(step, elapsed)
        step += 1
        if ema is not None:
            with torch.no_grad():
                torch._foreach_lerp_(ema, [p.detach().float() for p in params], 1.0 - cfg.ema_decay)
        sync()
        elapsed = time.perf_counter() - t_train0
        stop = step >= cfg.iterations or (cfg.max_wallclock_seconds > 0 and elapsed >= cfg.max_wallclock_seconds)
        qat_next = qat_active(cfg, step, elapsed)
        if distributed:
            # every rank stops, and switches QAT on, at the same step (one all-reduce for both)
            stop_flag.copy_(torch.tensor([1.0 if stop else 0.0, 1.0 if qat_next else 0.0]))
            dist.all_reduce(stop_flag, op=dist.ReduceOp.MAX)
            stop_v, qat_v = stop_flag.tolist()
            stop, qat_next = bool(stop_v), bool(qat_v)
        if step % cfg.log_every == 0 or stop or step == 1:
            now = time.perf_counter()
            ms = 1000 * (now - t_log) / max(1, step - step_log)
            lv = float(last_loss)
            losses_logged.append((step, lv))
            tok_s = global_tokens / (ms / 1000)
            left_steps = cfg.iterations - step
            eta = left_steps * ms / 1000
            if cfg.max_wallclock_seconds > 0:
                eta = min(eta, max(0.0, cfg.max_wallclock_seconds - elapsed))
            log(f"step {step}/{cfg.iterations} loss {lv:.4f} {ms:.1f} ms/step {tok_s:,.0f} tok/s "
                f"({tok_s / world:,.0f}/gpu) lr_mult {lr_multiplier(cfg, step, elapsed):.3f} "
                f"elapsed {elapsed:.1f}s ETA {eta:.0f}s")
            t_log, step_log = now, step
        if cfg.val_every and step % cfg.val_every == 0 and not stop:
            log(f"step {step} " + _fmt_eval(evaluate(base, val_tokens, cfg.seq_len, cfg.val_batch_tokens, device, rank, world, lut)))
        if stop:
            break
    sync()
    train_s = time.perf_counter() - t_train0
    base.set_qat(None)  # evaluations below see the float weights (pre-quant) or the artifact
    ms_step = 1000 * train_s / step
    tps = global_tokens * step / train_s
    log(f"train: {step} steps in {train_s:.1f} s ({ms_step:.1f} ms/step, {tps:,.0f} tok/s, {tps / world:,.0f} tok/s/gpu); "
        f"warm-up {warm_s:.1f} s excluded; peak mem "
        f"{(torch.cuda.max_memory_allocated(device) / 2**30) if cuda else 0:.1f} GiB")
    summary = dict(run_id=run_id, run_dir=run_dir, reference=cfg.reference, muon=muon_kind, world_size=world,
                   device=torch.cuda.get_device_name(device) if cuda else "cpu", steps=step, train_seconds=train_s,
                   warmup_seconds=warm_s, ms_per_step=ms_step, tokens_per_step=global_tokens, tokens_per_s=tps,
                   tokens_per_s_per_gpu=tps / world, first_loss=losses_logged[0][1], final_train_loss=losses_logged[-1][1],
                   losses=losses_logged, params=base.num_params(), config=dataclass_dict(cfg),
                   qat=dict(frac=cfg.qat_frac, mode=qat_mode if cfg.qat_frac > 0 else None, clip=qat_clip,
                            start_step=qat_start, steps=(step - qat_start) if qat_start is not None else 0))

    # ---- evaluation: raw and EMA weights; the better one goes into the artifact
    r_raw = evaluate(base, val_tokens, cfg.seq_len, cfg.val_batch_tokens, device, rank, world, lut)
    log("eval raw weights: " + _fmt_eval(r_raw))
    summary["val_raw"] = r_raw
    best, best_name = r_raw, "raw"
    if ema is not None:
        raw_copy = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, e in zip(params, ema):
                p.copy_(e.to(p.dtype))
        r_ema = evaluate(base, val_tokens, cfg.seq_len, cfg.val_batch_tokens, device, rank, world, lut)
        log("eval EMA weights: " + _fmt_eval(r_ema))
        summary["val_ema"] = r_ema
        if r_ema["val_loss"] <= r_raw["val_loss"]:
            best, best_name = r_ema, "ema"
        else:
            with torch.no_grad():
                for p, c in zip(params, raw_copy):
                    p.copy_(c)
        del raw_copy
    summary["weights"] = best_name
    summary["val_prequant"] = best
    log(f"artifact weights: {best_name}")

    if cfg.artifact:
        from .artifact import model_from_artifact, save_artifact

        apath = os.path.join(run_dir, "model.int6.ptz")
        if master:
            t_q = time.time()
            info = save_artifact(base, apath, extra_meta=dict(run_id=run_id, steps=step, weights=best_name))
            log(f"artifact: {apath}: model {info['bytes_model']:,} + code {info['bytes_code']:,} "
                f"({info['code_files']} files) = {info['bytes_total']:,} bytes (limit 16,000,000; codec {info['codec']}; "
                f"int6 step x{info['step_mult']}; {time.time() - t_q:.1f} s)")
        else:
            info = None
        if distributed:
            obj = [info]
            dist.broadcast_object_list(obj, src=0)
            info = obj[0]
        summary["artifact"] = dict(path=apath, **info)
        q_ref = model_from_artifact(apath, int6=False, device=device)
        r_q = evaluate(q_ref, val_tokens, cfg.seq_len, cfg.val_batch_tokens, device, rank, world, lut)
        log("eval artifact (dequantized, nn.Linear): " + _fmt_eval(r_q)
            + f"  [quant gap {r_q['val_loss'] - best['val_loss']:+.4f} nats]")
        summary["val_quant"] = r_q
        summary["quant_gap_loss"] = r_q["val_loss"] - best["val_loss"]
        if r_q.get("val_bpb") is not None and best.get("val_bpb") is not None:
            summary["quant_gap_bpb"] = r_q["val_bpb"] - best["val_bpb"]
            log(f"int6 round-trip gap: {summary['quant_gap_bpb']:+.4f} bpb")
        del q_ref
        if cfg.int6_eval and not cfg.reference:
            try:
                q6 = model_from_artifact(apath, int6=True, device=device)
            except ImportError as e:
                log(f"eval artifact (Int6Linear): skipped, pgolf_kernels.int6_linear not importable ({e})")
            else:
                r_6 = evaluate(q6, val_tokens, cfg.seq_len, cfg.val_batch_tokens, device, rank, world, lut)
                log("eval artifact (Int6Linear codes): " + _fmt_eval(r_6))
                summary["val_quant_int6"] = r_6
                del q6
    summary["total_seconds"] = time.time() - t_start
    if master:
        with open(os.path.join(run_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1, default=str)
    log(f"done in {summary['total_seconds']:.1f} s; summary {os.path.join(run_dir, 'summary.json')}")
    if distributed:
        # Free DDP (its reducer holds gloo work objects) while the interpreter is alive: left to interpreter
        # finalization, the 2-rank gloo run aborted at exit ("terminate called without an active
        # exception", SIGABRT, no Python frame) in ~1 of 10 runs on the loaded 2-core CPU machine.
        model = None  # noqa: F841
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()
    return summary


def dataclass_dict(cfg) -> dict:
    import dataclasses

    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}


if __name__ == "__main__":
    main()
