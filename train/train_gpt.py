"""Training loop: ``python3 -m train`` (1 process) or ``torchrun --nproc_per_node=N -m train``.

Flow (all settings in ``train/config.py``, every value logged):
  1. distributed set-up from torchrun's env (NCCL on CUDA, gloo on CPU);
  2. data: ``DATA_PATH`` / ``VAL_PATH`` shards, or the offline stdlib fixture (built by rank 0, cached);
  3. model ``GPT`` (fp32 master weights, bf16 autocast on CUDA), ``torch.compile`` on CUDA, DDP if N > 1;
  4. optimizers: Muon (``pgolf_kernels.muon.Muon`` on our Newton-Schulz kernel; ``--reference``: the same
     optimizer with the plain-torch NS; ``muon_impl=torch-banked``: plain-torch NS once per same-shape
     bank) for block matrices, passed as one bank per shape, Adam for the embedding and the scalars;
     Muon momentum warm-up; LR warm-down over the last ``warmdown_frac`` of the run; EMA of the weights;
  5. warm-up steps (compile, autotune) first, then model/optimizer/loader are restored to their initial
     state: warm-up time is reported, not counted;
  6. the loop: stop at ``ITERATIONS`` or when the budget is spent (the log and the summary say which);
     the stop decision is all-reduced (MAX) so every rank stops at the same step; a log line every
     ``LOG_EVERY`` steps; over the last ``QAT_FRAC`` of the run (same clock as the warm-down) the block
     matrices train through int6 fake quantization with a straight-through gradient
     (``pgolf_kernels.qat.int6_qat_linear``, the artifact codec's clip rule; ``--reference``: the
     plain-torch STE);
  7. validation (loss, and BPB when a tokenizer is known) of the raw and EMA weights, reported; the
     artifact takes the EMA weights when ``EMA_DECAY`` > 0, the raw ones otherwise (a fixed rule, so the
     validation set selects nothing); they are quantized into the artifact (int6 matrices, int8
     embedding, fp16 rest, zstd-22; the tokenizer's sha256 and piece count in its metadata), reloaded
     and evaluated again (dequantized ``nn.Linear``, and ``Int6Linear`` codes unless ``--reference``);
  8. the last log line is the ``python3 -m train.eval`` command for the artifact, its val shards and
     tokenizer.
Every input (globs, shard headers, empty shards, val length >= seq_len + 1, tokenizer, token ids <
vocab, numeric ranges) is checked before the model is built (``train/checks.py``); ``python3 -m
train`` reports a bad one as one ``error:`` line with exit code 2 (``--debug``: the traceback).
A JSON summary is written beside the log (``runs/<run_id>/summary.json``) and returned by ``main``.
"""
from __future__ import annotations

import contextlib
import copy
import gc
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from pgolf_kernels.muon import Muon
from pgolf_kernels.newton_schulz import newton_schulz_ref

from .checks import CheckError
from .config import TrainConfig, parse_config
from .data import DistributedTokenLoader, ShardError, load_tokens
from .model import GPT, _flash_attn3


# ------------------------------------------------------------------------------------------ Muon
class BankedTorchMuon(Muon):
    """``MUON_IMPL=torch-banked``: ``pgolf_kernels.muon.Muon`` with its Newton-Schulz replaced by the
    plain-torch ``newton_schulz_ref`` run once per same-shape bank (all matrices of one shape
    stacked into one batched matmul chain): a strong eager baseline for the kernel, and a path that
    never touches Triton. Momentum, scaling, weight decay and the distributed share/all-gather are
    Muon's own."""

    def _ns_local(self, mats: List[torch.Tensor], group) -> List[torch.Tensor]:
        by_shape: Dict[tuple, List[int]] = {}
        for i, m in enumerate(mats):
            by_shape.setdefault(tuple(m.shape[-2:]), []).append(i)
        out: List[Optional[torch.Tensor]] = [None] * len(mats)
        for (r, c), idx in by_shape.items():
            flat = [mats[i].reshape(-1, r, c) for i in idx]
            res = newton_schulz_ref(torch.cat(flat), group["ns_steps"], group["coefficients"], self.eps,
                                    compute_dtype=self.compute_dtype)
            o = 0
            for i, f in zip(idx, flat):
                out[i] = res[o:o + f.shape[0]].reshape(mats[i].shape)
                o += f.shape[0]
        return out


def make_muon(params, cfg: TrainConfig, process_group):
    """One param group per shape (a 'bank'). ``--reference``: Muon on the torch reference NS
    (``use_kernel=False``, no Triton); ``muon_impl=torch-banked``: ``BankedTorchMuon``."""
    by_shape: Dict[tuple, list] = {}
    for p in params:
        by_shape.setdefault(tuple(p.shape), []).append(p)
    groups = [dict(params=ps) for ps in by_shape.values()]
    # NS in bf16 on CUDA (records); fp32 on CPU, where bf16 matmuls are slow and the kernel is not used
    cdt = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    kw = dict(lr=cfg.matrix_lr, momentum=cfg.muon_momentum, nesterov=True, weight_decay=cfg.muon_weight_decay,
              ns_steps=cfg.muon_ns_steps, coefficients="quintic", row_normalize=False, process_group=process_group,
              compute_dtype=cdt)
    if cfg.muon_impl == "torch-banked":
        return BankedTorchMuon(groups, use_kernel=False, **kw), "torch-banked-ns"
    opt = Muon(groups, use_kernel=not cfg.reference, **kw)
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


# ------------------------------------------------------------------------------------------ set-up
@dataclass
class Run:
    """What set-up hands to the loop and to finalize."""

    cfg: TrainConfig
    t_start: float
    world: int
    rank: int
    local_rank: int
    device: torch.device
    cuda: bool
    distributed: bool
    master: bool
    pg: object
    run_id: str
    run_dir: str
    log: Logger
    train_pattern: str = ""
    val_pattern: str = ""
    tok_path: str = ""
    tokenizer: Optional[dict] = None  # identity recorded in the artifact: sha256, pieces, name
    lut: object = None
    grad_accum: int = 1
    micro_tokens: int = 0
    val_tokens: Optional[torch.Tensor] = None
    loader: Optional[DistributedTokenLoader] = None
    base: Optional[GPT] = None
    model: object = None
    muon: object = None
    muon_kind: str = ""
    optimizers: list = field(default_factory=list)
    qat_mode: str = "kernel"
    qat_clip: object = "search"
    warm_s: float = 0.0


def setup_distributed(cfg: TrainConfig, t_start: float) -> Run:
    """Rank / device from torchrun's env (NCCL on CUDA, gloo on CPU), run folder and logger."""
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
    run_id = cfg.run_id or time.strftime("%Y%m%d-%H%M%S") + ("-ref" if cfg.reference else "")
    run_dir = os.path.join(cfg.runs_dir, run_id)
    if master:
        os.makedirs(run_dir, exist_ok=True)
    log = Logger(os.path.join(run_dir, "train.log"), master)
    log(f"== train: {' '.join(sys.argv)}")
    log(f"torch {torch.__version__}, device {torch.cuda.get_device_name(device) if cuda else 'cpu'}, "
        f"world {world}, backend {dist.get_backend() if distributed else 'none'}, "
        f"threads {torch.get_num_threads()}")
    return Run(cfg=cfg, t_start=t_start, world=world, rank=rank, local_rank=local_rank, device=device, cuda=cuda,
               distributed=distributed, master=master, pg=dist.group.WORLD if distributed else None, run_id=run_id,
               run_dir=run_dir, log=log, qat_mode="reference" if cfg.reference else "kernel",
               qat_clip=cfg.qat_clip_value())


def batch_geometry(cfg: TrainConfig, world: int):
    """-> (grad_accum, micro_tokens): each rank's share of a step cut into micro-batches of at most
    ``max_micro_tokens``, each a whole number of sequences."""
    if cfg.train_batch_tokens % (world * cfg.seq_len):
        raise CheckError("--train-batch-tokens", cfg.train_batch_tokens,
                         f"a multiple of world size x --seq-len = {world} x {cfg.seq_len} = {world * cfg.seq_len}")
    tokens_per_rank = cfg.train_batch_tokens // world
    grad_accum = max(1, math.ceil(tokens_per_rank / cfg.max_micro_tokens))
    while tokens_per_rank % (grad_accum * cfg.seq_len):
        grad_accum += 1
    return grad_accum, tokens_per_rank // grad_accum


def setup_data(run: Run) -> None:
    """Shards (or the fixture), tokenizer and val tokens, every input checked before the model exists:
    globs match, headers are valid, no shard is empty, the val set holds >= seq_len + 1 tokens, the
    tokenizer parses and fits the vocabulary, val ids < vocab (train ids: per shard as the loader
    reads it)."""
    from . import checks

    cfg, log = run.cfg, run.log
    run.grad_accum, run.micro_tokens = batch_geometry(cfg, run.world)
    tok_path = cfg.tokenizer_path
    if tok_path:  # before the fixture is built (a sentencepiece training run)
        run.tokenizer = checks.tokenizer("--tokenizer-path", tok_path, cfg.vocab_size)
    if cfg.data_path:
        train_arg, val_arg = "--data-path", "--val-path"
        run.train_pattern, run.val_pattern = cfg.data_path, cfg.val_path
    else:
        from .fixture import build_fixture

        train_arg = val_arg = "the fixture (--fixture-text)"
        files = [p for p in cfg.fixture_text.split(",") if p] or None
        for f in files or ():
            if not os.path.isfile(f):
                raise CheckError("--fixture-text", f, "comma-separated existing text/.jsonl files (not found)")
        fixture_info = None
        if run.master:
            fixture_info = build_fixture(os.path.join(cfg.runs_dir, "fixture"), files,
                                         vocab_size=min(cfg.vocab_size, 1024), include_sources=cfg.fixture_sources,
                                         log=log)
        if run.distributed:
            obj = [fixture_info if run.master else None]
            dist.broadcast_object_list(obj, src=0)
            fixture_info = obj[0]
        run.train_pattern, run.val_pattern = fixture_info["train_pattern"], fixture_info["val_pattern"]
        tok_path = tok_path or fixture_info["tokenizer"]
        log(f"data: fixture ({fixture_info['source']}, {'cached' if fixture_info.get('cached') else 'built'}): "
            f"{fixture_info['n_train_tokens']:,} train / {fixture_info['n_val_tokens']:,} val tokens, tokenizer {tok_path}")
    checks.shards(train_arg, run.train_pattern, min_tokens=2, what="train shards")
    val_shards = checks.shards(val_arg, run.val_pattern, min_tokens=cfg.seq_len + 1,
                               what=f"val shards (>= --seq-len + 1 = {cfg.seq_len + 1} tokens for one window)")
    run.tok_path = tok_path
    if tok_path:
        run.tokenizer = run.tokenizer or checks.tokenizer("--tokenizer-path", tok_path, cfg.vocab_size)
        from .bpb import ByteLUT

        run.lut = ByteLUT.from_sentencepiece(tok_path, vocab_size=cfg.vocab_size)
    log("config:")
    for line in cfg.describe():
        log(line)
    log(f"  (resolved) train_pattern = {run.train_pattern!r}, val_pattern = {run.val_pattern!r}, tokenizer = {tok_path!r}"
        + (f" (sha256 {run.tokenizer['sha256'][:12]}, {run.tokenizer['pieces']} pieces)" if run.tokenizer else ""))
    log(f"batch: {cfg.train_batch_tokens:,} tokens/step = {run.world} ranks x {run.grad_accum} micro-steps x "
        f"{run.micro_tokens // cfg.seq_len} x {cfg.seq_len}")
    run.val_tokens = load_tokens(run.val_pattern, cfg.val_max_tokens or None)
    checks.token_ids(val_arg, run.val_pattern, run.val_tokens, cfg.vocab_size,
                     source=val_shards[0][0] if len(val_shards) == 1 else f"the {len(val_shards)} val shards")
    try:  # reads the first train shard and checks its ids; later shards are checked as the loader reaches them
        run.loader = DistributedTokenLoader(run.train_pattern, run.rank, run.world, run.device,
                                            vocab_size=cfg.vocab_size)
    except ShardError as e:
        raise CheckError(train_arg, run.train_pattern, f"train shards with token ids < --vocab-size; {e}") from None


def build_model(run: Run) -> None:
    """GPT (fp32 master weights), torch.compile on CUDA, DDP if N > 1; Muon for the block matrices,
    Adam for the embedding and the scalars."""
    cfg, log = run.cfg, run.log
    torch.manual_seed(cfg.seed)
    gcfg = cfg.gpt_config()
    base = GPT(gcfg).to(run.device)
    log(f"model: {base.num_params():,} params; {gcfg.to_dict()}")
    use_compile = cfg.compile == "1" or (cfg.compile == "auto" and run.cuda)
    model = torch.compile(base, dynamic=False) if use_compile else base
    if run.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[run.local_rank] if run.cuda else None, broadcast_buffers=False)
    muon, muon_kind = make_muon([p for _, p in base.matrix_params()], cfg, run.pg)
    adam_groups = [dict(params=[p for _, p in base.embedding_params()], lr=cfg.embed_lr, base_lr=cfg.embed_lr),
                   dict(params=[p for _, p in base.scalar_params()], lr=cfg.scalar_lr, base_lr=cfg.scalar_lr)]
    adam = torch.optim.Adam(adam_groups, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps, fused=run.cuda)
    for g in muon.param_groups:
        g["base_lr"] = cfg.matrix_lr
    run.base, run.model, run.muon, run.muon_kind, run.optimizers = base, model, muon, muon_kind, [muon, adam]
    log(f"optim: Muon={muon_kind} on {sum(p.numel() for _, p in base.matrix_params()):,} matrix params in "
        f"{len(muon.param_groups)} banks; Adam on {sum(p.numel() for g in adam_groups for p in g['params']):,}; "
        f"compile={use_compile}; attention={'FA3' if (run.cuda and _flash_attn3()) else 'SDPA'}")


def _sync(run: Run):
    if run.cuda:
        torch.cuda.synchronize(run.device)


def train_step(run: Run, step: int, elapsed_s: float) -> torch.Tensor:
    """One optimizer step (grad accumulation over micro-batches, LR / momentum schedules, clip)."""
    cfg = run.cfg
    loss_acc = torch.zeros((), device=run.device)
    for m in range(run.grad_accum):
        x, y = run.loader.next_batch(run.micro_tokens, cfg.seq_len)
        sync_ctx = run.model.no_sync() if (run.distributed and m < run.grad_accum - 1) else contextlib.nullcontext()
        with sync_ctx:
            with _autocast(run.device):
                loss = run.model(x, y).mean()
            (loss / run.grad_accum).backward()
        loss_acc += loss.detach()
    mult = lr_multiplier(cfg, step, elapsed_s)
    for opt in run.optimizers:
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * mult
    for g in run.muon.param_groups:
        g["momentum"] = muon_momentum(cfg, step)
    if cfg.grad_clip_norm > 0:
        torch.nn.utils.clip_grad_norm_(run.base.parameters(), cfg.grad_clip_norm)
    for opt in run.optimizers:
        opt.step()
    for opt in run.optimizers:
        opt.zero_grad(set_to_none=True)
    return loss_acc / run.grad_accum


def warm_up(run: Run) -> None:
    """Warm-up steps (compile, autotune), then model / optimizers / loader restored to their initial
    state: the time is reported, not counted."""
    cfg = run.cfg
    if cfg.warmup_steps <= 0:
        return
    base = run.base
    init_model = copy.deepcopy(base.state_dict())
    init_opts = [copy.deepcopy(o.state_dict()) for o in run.optimizers]
    _sync(run)
    t0 = time.perf_counter()
    for s in range(cfg.warmup_steps):
        # with QAT on, the second half of the warm-up runs the QAT graph, so its compile and
        # autotuning also happen before the clock starts
        if cfg.qat_frac > 0 and cfg.warmup_steps >= 2 and s == cfg.warmup_steps // 2:
            base.set_qat(run.qat_mode, 6, run.qat_clip)
        train_step(run, s, 0.0)
    base.set_qat(None)
    _sync(run)
    run.warm_s = time.perf_counter() - t0
    base.load_state_dict(init_model)
    for o, st in zip(run.optimizers, init_opts):
        o.load_state_dict(st)
    run.loader.reset()
    run.log(f"warm-up: {cfg.warmup_steps} steps (compile + autotune) took {run.warm_s:.1f} s, excluded from the "
            "budget; model, optimizers and loader restored")


# ------------------------------------------------------------------------------------------ loop
def stop_reason(cfg: TrainConfig, step: int, elapsed_s: float) -> Optional[str]:
    """Why the run stops after ``step`` steps, or None to go on."""
    if step >= cfg.iterations:
        return f"iterations: {step} of --iterations {cfg.iterations} done"
    if cfg.max_wallclock_seconds > 0 and elapsed_s >= cfg.max_wallclock_seconds:
        return (f"wall clock: {elapsed_s:.1f} s >= --max-wallclock-seconds {cfg.max_wallclock_seconds:g} after "
                f"{step} of {cfg.iterations} steps")
    return None


def train_loop(run: Run) -> dict:
    """Steps until ``ITERATIONS`` or the budget (all-reduced so every rank stops at the same step),
    QAT over the last ``QAT_FRAC``, EMA of the weights. Returns the loop's record."""
    cfg, log, base = run.cfg, run.log, run.base
    ema = [p.detach().float().clone() for p in base.parameters()] if cfg.ema_decay > 0 else None
    params = list(base.parameters())
    global_tokens = cfg.train_batch_tokens
    step = 0
    stop_flag = torch.zeros(2, device=run.device)
    _sync(run)
    t_train0 = time.perf_counter()
    t_log, step_log = t_train0, 0
    losses_logged = []
    qat_start = None
    qat_next = qat_active(cfg, 0, 0.0)
    reason = None
    while True:
        elapsed = time.perf_counter() - t_train0
        if qat_start is None and qat_next:
            n_qat = base.set_qat(run.qat_mode, 6, run.qat_clip)
            qat_start = step
            log(f"qat: step {step}: {n_qat} block matrices now train through int6 fake quantization "
                f"({'pgolf_kernels.qat.int6_qat_linear' if run.qat_mode == 'kernel' else 'plain-torch STE'}, "
                f"clip {run.qat_clip!r}; {run_fraction_left(cfg, step, elapsed):.3f} of the run left)")
        last_loss = train_step(run, step, elapsed)
        step += 1
        if ema is not None:
            with torch.no_grad():
                torch._foreach_lerp_(ema, [p.detach().float() for p in params], 1.0 - cfg.ema_decay)
        _sync(run)
        elapsed = time.perf_counter() - t_train0
        reason = stop_reason(cfg, step, elapsed)
        stop = reason is not None
        qat_next = qat_active(cfg, step, elapsed)
        if run.distributed:
            # every rank stops, and switches QAT on, at the same step (one all-reduce for both)
            stop_flag.copy_(torch.tensor([1.0 if stop else 0.0, 1.0 if qat_next else 0.0]))
            dist.all_reduce(stop_flag, op=dist.ReduceOp.MAX)
            stop_v, qat_v = stop_flag.tolist()
            if stop_v and not stop:
                reason = f"another rank reached the wall clock (--max-wallclock-seconds {cfg.max_wallclock_seconds:g})"
            stop, qat_next = bool(stop_v), bool(qat_v)
        if step % cfg.log_every == 0 or stop or step == 1:
            now = time.perf_counter()
            ms = 1000 * (now - t_log) / max(1, step - step_log)
            lv = float(last_loss)
            losses_logged.append((step, lv))
            tok_s = global_tokens / (ms / 1000)
            eta = (cfg.iterations - step) * ms / 1000
            if cfg.max_wallclock_seconds > 0:
                eta = min(eta, max(0.0, cfg.max_wallclock_seconds - elapsed))
            log(f"step {step}/{cfg.iterations} loss {lv:.4f} {ms:.1f} ms/step {tok_s:,.0f} tok/s "
                f"({tok_s / run.world:,.0f}/gpu) lr_mult {lr_multiplier(cfg, step, elapsed):.3f} "
                f"elapsed {elapsed:.1f}s ETA {eta:.0f}s")
            t_log, step_log = now, step
        if cfg.val_every and step % cfg.val_every == 0 and not stop:
            log(f"step {step} " + _fmt_eval(_evaluate(run, base)))
        if stop:
            break
    _sync(run)
    train_s = time.perf_counter() - t_train0
    base.set_qat(None)  # evaluations below see the float weights (pre-quant) or the artifact
    log(f"stop: {reason}")
    return dict(steps=step, train_s=train_s, losses=losses_logged, qat_start=qat_start, ema=ema, stop_reason=reason)


def _evaluate(run: Run, model) -> dict:
    return evaluate(model, run.val_tokens, run.cfg.seq_len, run.cfg.val_batch_tokens, run.device, run.rank,
                    run.world, run.lut)


# ------------------------------------------------------------------------------------------ finalize
EMA_RULE = ("artifact weights: the EMA when --ema-decay > 0, else the raw weights (a fixed rule: the "
            "validation set never chooses them)")


def eval_argv(apath: str, val_pattern: str, tok_path: str) -> List[str]:
    """``python3 -m train.eval``'s arguments that score the artifact with the val set and tokenizer it was trained
    with (one place for the printed eval command and the background cache warm-up, whose compiled graphs must be
    the ones that command will ask for)."""
    return ["--artifact", apath, "--val", val_pattern, "--tokenizer", tok_path or "TOKENIZER.model"]


def eval_command(apath: str, val_pattern: str, tok_path: str) -> str:
    """The exact command that scores the artifact with the val set and tokenizer it was trained with."""
    import shlex

    return " ".join(shlex.quote(c) for c in ["python3", "-m", "train.eval", *eval_argv(apath, val_pattern, tok_path)])


# launcher variables the background eval warm-up must not inherit: it is one plain process, not a rank
_DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "MASTER_ADDR",
             "MASTER_PORT", "TORCHELASTIC_RUN_ID")


def start_eval_warmup(run: Run):
    """``--warm-eval-caches``: write the initial weights' artifact (zstd-1, no size fit: only its shapes matter) and
    start ``python3 -m train.eval <the printed command's arguments> --warmup-only`` in the background, on this
    process's device, logging to ``<run_dir>/eval_warmup.log``. Why: the eval's compile warm-up is the largest part
    of its time to the first score (52.4 s cold vs 24.5 s with warm caches for the seeds' config on the H200,
    bench/results/eval-h200.md), and torch's FX-graph / AOTAutograd caches key on graphs and shapes, not weight
    values (a CPU check: the warm-up of a differently seeded tiny model hit all 4 FX graphs, 32.8 s -> 4.0 s).
    Returns (process, log path, report path), or None (not asked for, not the master rank, a CPU run or no
    tokenizer)."""
    cfg = run.cfg
    if not (cfg.warm_eval_caches and run.master):
        return None
    if not run.cuda:
        # the eval's --compile auto is off on a CPU: its warm-up fills no cache (on 2 CPU cores the printed
        # command's warm-up alone took 285 s for the tiny test model, all of it interpreted kernels)
        run.log("eval warm-up: not started (a CPU eval compiles nothing, so there are no caches to warm)")
        return None
    if not run.tok_path:
        run.log("eval warm-up: not started (no tokenizer: the eval command needs --tokenizer)")
        return None
    from .artifact import save_artifact

    apath = os.path.join(run.run_dir, "eval_warmup_init.ptz")
    save_artifact(run.base, apath, code_paths=[], warn=False, fit=False, level=1,
                  extra_meta=dict(tokenizer=run.tokenizer))
    log_path, rep_path, cache_path = (os.path.join(run.run_dir, n) for n in ("eval_warmup.log", "eval_warmup.json",
                                                                             "eval.compile-cache"))
    # the same compiles also go into one file (pgolf_kernels/compile_cache.py), for an eval on a machine with empty caches
    argv = [sys.executable, "-m", "train.eval", *eval_argv(apath, run.val_pattern, run.tok_path), "--warmup-only",
            "--json", rep_path, "--device", str(run.device), "--compile-cache", cache_path]
    env = {k: v for k, v in os.environ.items() if k not in _DIST_ENV}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    with open(log_path, "w") as f:
        proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=root)
    run.log(f"eval warm-up: started in the background (pid {proc.pid}, log {log_path})")
    return proc, log_path, rep_path


def finish_eval_warmup(run: Run, started, timeout_s: float = 600.0) -> Optional[dict]:
    """Wait for ``start_eval_warmup``'s process (the eval must not start before its caches are written) and return
    its outcome for the summary: exit code, and its warm-up seconds from its report."""
    if started is None:
        return None
    proc, log_path, rep_path = started
    try:
        rc = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        rc = proc.wait()
        run.log(f"eval warm-up: still running after {timeout_s:.0f} s more, stopped (log {log_path})")
    out = {"rc": rc, "log": log_path}
    if rc == 0 and os.path.isfile(rep_path):
        with open(rep_path) as f:
            rep = json.load(f)
        cache = rep.get("compile_cache_file") or {}
        out.update(warmup_s=rep.get("warmup_s"), wall_s=rep.get("wall_s"), compiled=rep.get("compiled"),
                   compile_cache_file=cache)
        run.log(f"eval warm-up: done (warm-up {rep.get('warmup_s', 0):.1f} s, {rep.get('wall_s', 0):.1f} s wall, "
                f"{'compiled' if rep.get('compiled') else 'not compiled'}): the eval below starts with its caches"
                + (f"; on a machine with empty caches add --compile-cache {cache['path']} ({cache['saved_bytes']:,} "
                   f"bytes)" if cache.get("saved_bytes") else ""))
    else:
        run.log(f"eval warm-up: exited {rc}; the eval compiles as usual (log {log_path})")
    return out


def finalize(run: Run, rec: dict) -> dict:
    """Evaluate raw and EMA weights, put the rule-chosen ones into the artifact, reload and evaluate
    it, write ``summary.json``, print the eval command."""
    cfg, log, base = run.cfg, run.log, run.base
    step, train_s, world = rec["steps"], rec["train_s"], run.world
    global_tokens = cfg.train_batch_tokens
    ms_step = 1000 * train_s / step
    tps = global_tokens * step / train_s
    log(f"train: {step} steps in {train_s:.1f} s ({ms_step:.1f} ms/step, {tps:,.0f} tok/s, {tps / world:,.0f} tok/s/gpu); "
        f"warm-up {run.warm_s:.1f} s excluded; peak mem "
        f"{(torch.cuda.max_memory_allocated(run.device) / 2**30) if run.cuda else 0:.1f} GiB")
    qat_start = rec["qat_start"]
    summary = dict(run_id=run.run_id, run_dir=run.run_dir, reference=cfg.reference, muon=run.muon_kind, world_size=world,
                   device=torch.cuda.get_device_name(run.device) if run.cuda else "cpu", steps=step,
                   stop_reason=rec["stop_reason"], train_seconds=train_s, eval_warmup=rec.get("eval_warmup"),
                   warmup_seconds=run.warm_s, ms_per_step=ms_step, tokens_per_step=global_tokens, tokens_per_s=tps,
                   tokens_per_s_per_gpu=tps / world, first_loss=rec["losses"][0][1],
                   final_train_loss=rec["losses"][-1][1], losses=rec["losses"], params=base.num_params(),
                   config=dataclass_dict(cfg), tokenizer=run.tokenizer,
                   qat=dict(frac=cfg.qat_frac, mode=run.qat_mode if cfg.qat_frac > 0 else None, clip=run.qat_clip,
                            start_step=qat_start, steps=(step - qat_start) if qat_start is not None else 0))

    # ---- evaluation of raw and EMA weights (reported); the artifact takes the fixed rule's choice
    r_raw = _evaluate(run, base)
    log("eval raw weights: " + _fmt_eval(r_raw))
    summary["val_raw"] = r_raw
    best, best_name = r_raw, "raw"
    ema = rec["ema"]
    if ema is not None:
        params = list(base.parameters())
        with torch.no_grad():
            for p, e in zip(params, ema):
                p.copy_(e.to(p.dtype))
        best = summary["val_ema"] = _evaluate(run, base)
        best_name = "ema"
        log("eval EMA weights: " + _fmt_eval(best))
    summary["weights"] = best_name
    summary["weights_rule"] = EMA_RULE
    summary["val_prequant"] = best
    log(f"{EMA_RULE}: {best_name}")

    if cfg.artifact:
        _artifact(run, summary, best, best_name, step)
    summary["total_seconds"] = time.time() - run.t_start
    if run.master:
        with open(os.path.join(run.run_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1, default=str)
    log(f"done in {summary['total_seconds']:.1f} s; summary {os.path.join(run.run_dir, 'summary.json')}")
    if cfg.artifact:
        log("evaluate the artifact with:\n  " + summary["eval_command"]
            + ("" if run.tok_path else "\n  (no tokenizer was given: pass the one the shards were made with)"))
    return summary


def _artifact(run: Run, summary: dict, best: dict, best_name: str, step: int) -> None:
    from .artifact import code_pack_bytes, model_from_artifact, save_artifact

    cfg, log = run.cfg, run.log
    apath = os.path.join(run.run_dir, "model.int6.ptz")
    if run.master:
        t_q = time.time()
        info = save_artifact(run.base, apath, extra_meta=dict(run_id=run.run_id, steps=step, weights=best_name,
                                                               tokenizer=run.tokenizer))
        # the code as it ships and is counted: one self-extracting file (train.code_pack)
        cpath = os.path.join(run.run_dir, "submission_code.py")
        with open(cpath, "wb") as f:
            f.write(code_pack_bytes())
        info["code_path"] = cpath
        log(f"artifact: {apath}: model {info['bytes_model']:,} + code {info['bytes_code']:,} "
            f"({cpath}: {info['code_files']} files, {info['bytes_code_files']:,} bytes unpacked) = "
            f"{info['bytes_total']:,} bytes (limit 16,000,000; codec {info['codec']}; "
            f"int6 step x{info['step_mult']}; {time.time() - t_q:.1f} s)\n  artifact quantized on {info['quantize']}; "
            f"seconds {info['seconds']} over {info['packs']} zstd packs")
    else:
        info = None
    if run.distributed:
        obj = [info]
        dist.broadcast_object_list(obj, src=0)
        info = obj[0]
    summary["artifact"] = dict(path=apath, **info)
    summary["eval_command"] = eval_command(apath, run.val_pattern, run.tok_path)
    q_ref = model_from_artifact(apath, int6=False, device=run.device)
    r_q = _evaluate(run, q_ref)
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
            q6 = model_from_artifact(apath, int6=True, device=run.device)
        except ImportError as e:
            log(f"eval artifact (Int6Linear): skipped, pgolf_kernels.int6_linear not importable ({e})")
        else:
            r_6 = _evaluate(run, q6)
            log("eval artifact (Int6Linear codes): " + _fmt_eval(r_6))
            summary["val_quant_int6"] = r_6
            del q6


# ------------------------------------------------------------------------------------------ main
def main(argv: Optional[List[str]] = None) -> dict:
    """Set-up (every input checked before the model is built), warm-up, loop, finalize."""
    cfg = parse_config(argv)
    run = setup_distributed(cfg, time.time())
    try:
        setup_data(run)
        build_model(run)
        warm_up(run)
        warming = start_eval_warmup(run)  # after the training warm-up: the two compiles do not share the CPU
        try:
            rec = train_loop(run)
        except BaseException:
            if warming is not None:  # no orphan left behind a failed run
                warming[0].kill()
            raise
        rec["eval_warmup"] = finish_eval_warmup(run, warming)
        summary = finalize(run, rec)
    except BaseException:
        if run.distributed:  # no barrier: the other ranks may not reach one
            dist.destroy_process_group()
        raise
    if run.distributed:
        # Free DDP (its reducer holds gloo work objects) while the interpreter is alive: left to interpreter
        # finalization, the 2-rank gloo run aborted at exit ("terminate called without an active
        # exception", SIGABRT, no Python frame) in ~1 of 10 runs on a loaded 2-core CPU.
        run.model = None
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()
    return summary


def cli(argv: Optional[List[str]] = None) -> int:
    """``python3 -m train``: input errors as one ``error:`` line and exit code 2 (``--debug``: traceback)."""
    from .checks import run_cli

    return run_cli(main, argv)


def dataclass_dict(cfg) -> dict:
    import dataclasses

    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}


if __name__ == "__main__":
    cli()
