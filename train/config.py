"""Every setting of the training driver: environment variable ``NAME`` or CLI flag ``--name``.

Precedence: CLI flag > environment variable (upper-case field name, e.g. ``MAX_WALLCLOCK_SECONDS``)
> preset > field default. ``PRESET=auto`` (default) means ``full`` on a CUDA machine and ``tiny``
on CPU; a preset only fills fields that were not set explicitly. Every value actually used is
written to the log at start-up (``TrainConfig.describe``).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from .model import GPTConfig

HELP: Dict[str, str] = {}


def _f(default, help_: str):
    return field(default=default, metadata={"help": help_})


def _model(name: str, help_: str):
    """A field of ``train.model.GPTConfig``, with its default."""
    return _f(GPTConfig.__dataclass_fields__[name].default, help_)


# the GPTConfig fields the training driver sets (TrainConfig.gpt_config)
MODEL_FIELDS = ("vocab_size", "num_layers", "model_dim", "num_heads", "num_kv_heads", "mlp_mult", "seq_len",
                "logit_softcap", "rope_base", "bigram_buckets")


@dataclass
class TrainConfig:
    # --- run
    preset: str = _f("auto", "auto | full | tiny: full = record model (GPU), tiny = CPU smoke size")
    run_id: str = _f("", "name of the run folder under runs_dir (default: timestamp)")
    runs_dir: str = _f("runs", "where logs, fixture cache and artifacts go")
    seed: int = _f(1337, "torch / loader seed")
    reference: bool = _f(False, "plain torch ops instead of pgolf_kernels (reference Newton-Schulz in Muon)")
    muon_impl: str = _f("auto", "auto: pgolf_kernels.muon.Muon (Triton NS; torch NS with --reference) | "
                        "torch-banked: plain-torch NS batched per same-shape bank (a strong eager baseline)")
    compile: str = _f("auto", "torch.compile the model: auto (on for CUDA) | 1 | 0")
    debug: bool = _f(False, "show the full traceback on an input error (default: one 'error:' line, exit code 2)")
    # --- data
    data_path: str = _f("", "glob of train shards; empty -> build the stdlib fixture (no downloads)")
    val_path: str = _f("", "glob of val shards (required with data_path)")
    tokenizer_path: str = _f("", "sentencepiece .model for BPB (byte LUT); empty -> val loss only")
    fixture_sources: bool = _f(False, "fixture: add stdlib module sources to the docstrings (~10x text)")
    fixture_text: str = _f("", "fixture: comma-separated text/.jsonl files instead of the stdlib")
    val_max_tokens: int = _f(0, "evaluate on the first N val tokens only (0 = all)")
    # --- model: GPTConfig's fields, with its defaults (one place for the record model's shape)
    vocab_size: int = _model("vocab_size", "vocabulary size")
    num_layers: int = _model("num_layers", "transformer blocks")
    model_dim: int = _model("model_dim", "model width d")
    num_heads: int = _model("num_heads", "query heads")
    num_kv_heads: int = _model("num_kv_heads", "key/value heads (GQA)")
    mlp_mult: int = _model("mlp_mult", "MLP hidden = mlp_mult * d")
    seq_len: int = _model("seq_len", "training sequence length")
    logit_softcap: float = _model("logit_softcap", "logits = c * tanh(logits / c)")
    rope_base: float = _model("rope_base", "RoPE base")
    # Default per preset. tiny (CPU): 4096 rows -- stdlib fixture, 500 steps, post-int6 val_bpb 1.9445 -> 1.8583
    # (seed 1337) and 1.9467 -> 1.8589 (seed 7); 2048 rows gave 1.8858 (seed 1337). full (the record model): OFF,
    # because the table does not fit the byte budget there: 4096 x 512 int8 rows cost 1.94 MB of zstd-3 artifact
    # (2048 rows: 0.97 MB) and, measured on a 2-core CPU with a Gaussian-initialized default model, the
    # artifact with the table is 16,101,868 bytes even at the coarsest int6 grid the fit allows (step_mult 4.0),
    # against 15,648,940 bytes at step_mult 2.31 without it. Turn it on (--bigram-buckets N) with a smaller model
    # or when your trained weights leave the room.
    bigram_buckets: int = _f(0, "BigramHash embedding rows (hash of input ids t-1, t, added to the token "
                             "embedding; 2048-4096 typical); 0 = off. Default: off for the full preset (the "
                             "table does not fit the 16 MB artifact with the record model), 4096 for tiny")
    # --- batch / budget
    train_batch_tokens: int = _f(786_432, "tokens per optimizer step, all ranks together")
    max_micro_tokens: int = _f(98_304, "max tokens per rank per forward/backward (48 x 2048); more -> grad accumulation")
    iterations: int = _f(20_000, "max optimizer steps")
    max_wallclock_seconds: float = _f(600.0, "training budget (s), warm-up excluded; 0 = none")
    warmup_steps: int = _f(20, "compile/warm-up steps run first, then model/optimizer/loader are reset; excluded but reported")
    log_every: int = _f(50, "log line every N steps")
    val_every: int = _f(0, "validate every N steps (0 = only at the end)")
    val_batch_tokens: int = _f(262_144, "tokens per rank per validation forward")
    # --- optimizers
    matrix_lr: float = _f(0.025, "Muon learning rate (block matrices)")
    muon_momentum: float = _f(0.95, "Muon momentum after warm-up")
    muon_momentum_warmup_start: float = _f(0.85, "Muon momentum at step 0")
    muon_momentum_warmup_steps: int = _f(500, "steps of linear momentum warm-up")
    muon_ns_steps: int = _f(5, "Newton-Schulz iterations")
    muon_weight_decay: float = _f(0.0, "decoupled weight decay on Muon params")
    embed_lr: float = _f(0.035, "Adam lr for the (tied) embedding")
    scalar_lr: float = _f(0.025, "Adam lr for gains / scales / mixes / skip weights")
    adam_beta1: float = _f(0.9, "Adam beta1")
    adam_beta2: float = _f(0.95, "Adam beta2")
    adam_eps: float = _f(1e-8, "Adam eps")
    warmdown_frac: float = _f(0.5, "LR decays linearly to 0 over the last fraction of the run (wall clock or iterations, whichever ends first)")
    grad_clip_norm: float = _f(0.0, "clip global grad norm (0 = off)")
    ema_decay: float = _f(0.997, "EMA of weights (0 = off); eval + artifact use the EMA")
    # measured (CPU, stdlib fixture, tiny preset, 500 steps, QAT = last 75): int6 round-trip gap (post - pre
    # val_bpb) +0.0021 -> +0.0003 (seed 1337), +0.0011 -> +0.0008 (seed 7; EMA weights chosen), +0.0011 ->
    # +0.0005 (seed 7, EMA off); post-quant val_bpb moved -0.0010 / +0.0007 / +0.0005: seed noise at this size
    qat_frac: float = _f(0.15, "int6 quantization-aware training over the last fraction of the run (same clock as the "
                         "warm-down: wall clock or iterations, whichever ends first): block matrices run through "
                         "pgolf_kernels.qat.int6_qat_linear (--reference: the plain-torch STE); 0 = off")
    qat_clip: str = _f("search", "QAT per-row clip: search (the artifact codec's rule) | absmax | a std multiple, e.g. 3.5")
    # --- artifact / eval
    artifact: bool = _f(True, "write the int6 artifact and evaluate before/after quantization")
    warm_eval_caches: bool = _f(False, "while training runs, one background `python3 -m train.eval --warmup-only` "
                                "on the initial weights' artifact fills this machine's compile caches for the eval "
                                "command printed at the end (compiled graphs depend on the model config and eval "
                                "options, not on weight values), so that eval starts with warm caches")
    int6_eval: bool = _f(True, "also evaluate the artifact through Int6Linear (kernel path)")

    # fields the tiny preset overrides when not set explicitly
    # 2 idle CPU cores: ~0.17 s per 2,048-token step for this 0.72 M-param model (+0.52 M BigramHash
    # table rows, a gather) -> 500 steps in ~86 s
    # (val loss 3.25 -> ~3.1 nats on the stdlib fixture); a busy machine stops earlier on the 90 s budget
    TINY = dict(num_layers=4, model_dim=128, num_heads=4, num_kv_heads=2, seq_len=256, bigram_buckets=4096,
                train_batch_tokens=2048,
                max_micro_tokens=2048, iterations=500, max_wallclock_seconds=90.0, warmup_steps=2, log_every=20,
                val_batch_tokens=8192, matrix_lr=0.03, embed_lr=0.05, scalar_lr=0.03,
                muon_momentum_warmup_steps=50, ema_decay=0.95)

    def gpt_config(self):
        return GPTConfig(**{name: getattr(self, name) for name in MODEL_FIELDS})

    def qat_clip_value(self):
        """``qat_clip`` as ``pgolf_kernels.qat`` takes it: 'search' | 'absmax' | float."""
        return self.qat_clip if self.qat_clip in ("search", "absmax") else float(self.qat_clip)

    def describe(self) -> List[str]:
        return [f"  {f.name} = {getattr(self, f.name)!r}" for f in dataclasses.fields(self)]


def _parse_bool(s: str) -> bool:
    v = str(s).strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {s!r}")


def _convert(f: dataclasses.Field, raw: str):
    t = f.type if isinstance(f.type, type) else {"int": int, "float": float, "bool": bool, "str": str}[f.type]
    if t is bool:
        return _parse_bool(raw)
    return t(raw)


def parse_config(argv: Optional[List[str]] = None, env: Optional[Dict[str, str]] = None,
                 cuda: Optional[bool] = None) -> TrainConfig:
    env = dict(os.environ) if env is None else env
    fields = [f for f in dataclasses.fields(TrainConfig)]
    from .checks import OneLineArgumentParser

    ap = OneLineArgumentParser(prog="python3 -m train", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields:
        flag = "--" + f.name.replace("_", "-")
        if f.type in (bool, "bool"):
            ap.add_argument(flag, nargs="?", const="1", default=None, help=f.metadata["help"] + " (env " + f.name.upper() + ")")
        else:
            ap.add_argument(flag, default=None, help=f.metadata["help"] + f" (env {f.name.upper()}, default {f.default!r})")
    args = ap.parse_args(argv)
    values, explicit = {}, set()
    for f in fields:
        raw = getattr(args, f.name)
        if raw is None and f.name.upper() in env:
            raw = env[f.name.upper()]
        if raw is not None:
            try:
                values[f.name] = _convert(f, raw)
            except ValueError as e:
                ap.error(f"{f.name}: {e}")
            explicit.add(f.name)
    cfg = TrainConfig(**values)
    if cfg.preset not in ("auto", "full", "tiny"):
        ap.error(f"preset must be auto, full or tiny, got {cfg.preset!r}")
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    preset = cfg.preset if cfg.preset != "auto" else ("full" if cuda else "tiny")
    cfg.preset = preset
    if preset == "tiny":
        for k, v in TrainConfig.TINY.items():
            if k not in explicit:
                setattr(cfg, k, v)
    if cfg.muon_impl not in ("auto", "torch-banked"):
        ap.error(f"muon_impl must be auto or torch-banked, got {cfg.muon_impl!r}")
    if cfg.compile not in ("auto", "0", "1"):
        ap.error(f"compile must be auto, 0 or 1, got {cfg.compile!r}")
    if not 0.0 <= cfg.qat_frac <= 1.0:
        ap.error(f"qat_frac must be in [0, 1] (0 = off), got {cfg.qat_frac!r}")
    if cfg.qat_clip not in ("search", "absmax"):
        try:
            ok = float(cfg.qat_clip) > 0
        except ValueError:
            ok = False
        if not ok:
            ap.error(f"qat_clip must be search, absmax or a positive std multiple, got {cfg.qat_clip!r}")
    if cfg.bigram_buckets < 0:
        ap.error(f"bigram_buckets must be >= 0 (0 = off), got {cfg.bigram_buckets}")
    if cfg.data_path and not cfg.val_path:
        ap.error("--val-path is required when --data-path is given")
    from .checks import CheckError

    try:
        check_ranges(cfg)
    except CheckError as e:
        ap.error(str(e))
    return cfg


def check_ranges(cfg: TrainConfig) -> None:
    """Every numeric setting in its meaningful range (``checks.CheckError`` naming the flag otherwise)."""
    from .checks import CheckError
    from .checks import float_range as fr
    from .checks import int_range as ir

    ir("--vocab-size", cfg.vocab_size, 2, 65536, "token ids are uint16")
    for name in ("num_layers", "model_dim", "num_heads", "num_kv_heads", "mlp_mult", "seq_len", "train_batch_tokens",
                 "max_micro_tokens", "iterations", "log_every", "val_batch_tokens", "muon_ns_steps"):
        ir("--" + name.replace("_", "-"), getattr(cfg, name), 1)
    for name in ("warmup_steps", "val_every", "val_max_tokens", "muon_momentum_warmup_steps"):
        ir("--" + name.replace("_", "-"), getattr(cfg, name), 0)
    if cfg.model_dim % cfg.num_heads:
        raise CheckError("--num-heads", cfg.num_heads, f"a divisor of --model-dim = {cfg.model_dim}")
    if cfg.num_heads % cfg.num_kv_heads:
        raise CheckError("--num-kv-heads", cfg.num_kv_heads, f"a divisor of --num-heads = {cfg.num_heads}")
    if cfg.val_max_tokens and cfg.val_max_tokens < cfg.seq_len + 1:
        ir("--val-max-tokens", cfg.val_max_tokens, cfg.seq_len + 1, what="0 (all) or at least --seq-len + 1 tokens")
    fr("--max-wallclock-seconds", cfg.max_wallclock_seconds, 0.0, what="training seconds; 0 = no budget")
    for name in ("matrix_lr", "embed_lr", "scalar_lr", "muon_weight_decay", "grad_clip_norm"):
        fr("--" + name.replace("_", "-"), getattr(cfg, name), 0.0)
    for name in ("muon_momentum", "muon_momentum_warmup_start", "adam_beta1", "adam_beta2", "ema_decay"):
        fr("--" + name.replace("_", "-"), getattr(cfg, name), 0.0, 1.0, hi_open=True)
    fr("--adam-eps", cfg.adam_eps, 0.0, lo_open=True)
    fr("--warmdown-frac", cfg.warmdown_frac, 0.0, 1.0)
    fr("--logit-softcap", cfg.logit_softcap, 0.0, lo_open=True)
    fr("--rope-base", cfg.rope_base, 1.0, lo_open=True)
