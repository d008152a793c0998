"""The record scripts themselves, unmodified vs ``pgolf_kernels.patch.apply``: one process per variant.

Rows (``bench/results/records-<gpu>.json``), cheapest first so the first rows always come back:

1. ``Muon.step`` per record on one GPU: the record's own optimizer class (unmodified, or as patched) over the
   record's matrix parameters at its default model config (2-D matrices of the record's GPT for 2026-03-17;
   the four banks for the banked records), random grads, ``harness.bench_ms`` (median of CUDA-event timings,
   L2 flushed) of ``launch_reduce_scatters(); step()`` after warm-up (which includes the record's
   torch.compile of its NS: 2026-04-29 decorates it, 2026-03-17's main() wraps it, and so does this bench). Peak memory is torch.cuda.max_memory_allocated of the process.
2. Training ms/step (all three): the script's own ``main()`` on synthetic token shards (Zipf ids; the sp1024
   tokenizer for the byte tables, the sp8192 CaseOps one with ``CASEOPS_ENABLED=0`` for 2026-04-29), brief-training env vars (``ITERATIONS=50``, ``WARMDOWN_ITERS=0`` / ``WARMDOWN_FRAC=0``,
   ``WARMUP_STEPS=3``, ``TRAIN_LOG_EVERY=1``, ``VAL_LOSS_EVERY=0``, ``TRAIN_BATCH_TOKENS`` below); ms/step is the
   least-squares slope of the logged ``train_time`` over steps 10-50, noise its residual std per step; each variant
   runs ``PGOLF_RECORDS_REPEATS`` times (default 2, alternating), the row holds the median slope and the
   run-to-run spread. ``Muon.step`` is also timed in place, inside that training loop (``StepTimer``: CUDA events
   around each call, read after the run), median of the steady steps. The run
   stops right after training (at the export function; 2026-04-29 at its last-step validation) - no quantization,
   no TTT. 2026-04-29 compiles 8 fwd+bwd shapes in its own warm-up (``warmup_cu_buckets`` 64-256, with looping off
   and on): a cold child was still in it at 197, 257 and 300 s on an H200, with either varlen stand-in. So by
   default (``PGOLF_RECORDS_TRAIN_ONE_SHAPE=1``) its children skip that warm-up and train with looping on from
   step 0 (``WARMUP_STEPS=0``, ``ENABLE_LOOPING_AT=0``): one input shape on the bench's shards, compiled at the
   first step; the row's case says so, and ``frames_in_fit`` counts any Dynamo compile inside the fitted steps.

The GPU machine has no FlashAttention-3: ``records_env.install_standins`` supplies it (SDPA; varlen on
torch's FlashAttention-2 varlen kernel, or flex_attention with ``PGOLF_VARLEN_STANDIN=flex``), and every row says
which.

3. TTT eval (``PGOLF_RECORDS_PARTS`` with "ttt"; 2026-04-29): the record's ``serialize`` writes its quantized
   artifact of its GPT at initialization, then one process per variant runs the record's own TTT eval on it
   (``TTT_EVAL_ONLY=1``: its compile warm-up on random tokens, then phased LoRA TTT over ``PGOLF_RECORDS_TTT_DOCS``
   synthetic documents, default 192: three batches of the record's 64); the row holds the timed eval, the warm-up, the wall time and val_bpb of
   each. The patch's TTT piece keeps the record's LoRA and specializes the Python floats of its dynamic-shape
   TTT compile (see pgolf_kernels.patch), so the two variants differ in that compile's warm-up. Every TTT child runs on
   empty Inductor and Triton cache folders of its own (a fresh machine). ``patched-cachefile`` (listed twice in
   ``PGOLF_RECORDS_TTT_VARIANTS``) adds the patch's ``compile_cache=FILE``: the first such child writes the file at
   exit, the second loads it (``cache_runs`` in the row). ``patched`` runs the patch's defaults, which on 2026-04-29
   include ``regional_ttt`` (the TTT forward compiled per block instead of as one unrolled graph);
   ``patched-regional`` requires it (``regional_ttt=True``) and ``patched-whole`` turns it off (``False``: the
   record's own whole-forward compile with the rest of the TTT piece).

``PGOLF_RECORDS_MUON_KEYS`` / ``PGOLF_RECORDS_TRAIN_KEYS`` (default all three), ``PGOLF_RECORDS_MUON_PROFILE=1`` (the
``Muon.step`` rows also carry each variant's kernel table, ``kernel_table``), ``PGOLF_RECORDS_MUON_GRAPH=1`` (and its
CUDA-graph replay time, ``graph_ms``: device time without launch gaps), ``PGOLF_RECORDS_MUON_TORCH_PACK=1`` (the
patched step once more with ``PGOLF_NS_FAST_PACK=0``, the torch copy in the NS prologue instead of the Triton pack:
``torch_pack_ms``), ``PGOLF_RECORDS_REPEATS`` (2),
``PGOLF_RECORDS_CHILD_S`` (420 s per training process) and ``PGOLF_RECORDS_BUDGET_S`` (540 s in all) fit the rows to a
device call; ``PGOLF_RECORDS_LOG_DIR`` keeps every child's full output there; training and TTT children print a progress
line (compile counters) every ``PGOLF_RECORDS_HEARTBEAT_S`` seconds (30; 0 = off). ``PGOLF_RECORDS_TRAIN_CACHES=DIR``
keeps the training children's Inductor and Triton caches in DIR after the bench: a 2026-04-29 pair whose cold compile
does not fit one device call fills them in one call and measures on them in the next (the slope over steps 10-50 is
outside the warm-up either way). ``PGOLF_RECORDS_TRAIN_EAGER_MODEL=1`` runs the training children's model eagerly
(``EagerModelTorch``: the record's compile of its model returns it unchanged): no compile warm-up, so a 2026-04-29
pair and its Muon.step in place fit one call; the row's case says the model was eager, and its ms/step is the eager
model's. ``PGOLF_RECORDS_TTT_CACHES=DIR`` does the same for the TTT children, one folder per
variant (``ttt_caches``; the row's ``caches`` / ``baseline_caches`` say cold or warm); a TTT child that times out or
fails is reported in the row's ``variants`` and the other variants' figures are kept. The row's ``artifact_sha256``
(``folder_sha256``) names the artifact, so val_bpb from different device calls are compared only on equal hashes.

Child mode (one process per variant): ``python -m bench.bench_records --child muon|train --key K
--variant record|patched``; it prints one ``RESULT {json}`` line.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from typing import Dict, List, Tuple

import torch

from . import records_env
from .harness import env_flag, run_child

KERNEL = "records"
VARIANTS = ("record", "patched")
TRAIN_KEYS = ("2026-03-17", "2026-03-23", "2026-04-29")
# tokens/step for the brief training runs (the records' defaults are 524,288 and 786,432; halved to fit the
# device budget; per-step costs other than Muon scale with it)
TRAIN_TOKENS = {"2026-03-17": 262_144, "2026-03-23": 393_216, "2026-04-29": 393_216}
TRAIN_SEQ = {"2026-03-17": 1024, "2026-03-23": 2048, "2026-04-29": 2048}
# vocabulary of each record's tokenizer (2026-04-29: sp8192; run with CASEOPS_ENABLED=0 on synthetic sp8192 shards,
# the CaseOps tokenizer supplying its byte tables)
TRAIN_VOCAB = {"2026-03-17": 1024, "2026-03-23": 1024, "2026-04-29": 8192}
CASEOPS_MODEL = "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"
# brief training: ITERATIONS steps, ms/step = slope of train_time over steps TRAIN_FIT[0]..ITERATIONS (the first
# steps hold the records' own compile warm-up)
def env_int(name: str, default: int, lo: int) -> int:
    """An integer setting from the environment, refused by name when it is not an integer >= lo."""
    v = os.environ.get(name, str(default))
    try:
        n = int(v)
    except ValueError:
        n = lo - 1
    if n < lo:
        raise ValueError(f"{name}={v!r}: expected an integer >= {lo}")
    return n


TRAIN_ITERS = env_int("PGOLF_RECORDS_ITERS", 50, 12)  # the slope is fitted over steps 10..ITERS (>= 3 points)
TRAIN_FIT = (10, TRAIN_ITERS)
CHILD_S = float(os.environ.get("PGOLF_RECORDS_CHILD_S", "420"))  # one training or TTT process at most
# training and TTT children print torch.compile's progress this often (stderr; 0 = off): a child killed at its limit
# in the 2026-04-29 warm-up had left only the record's own "warmup_cu_buckets" line, nothing on where it stood
HEARTBEAT_S = env_int("PGOLF_RECORDS_HEARTBEAT_S", 30, 0)


def sp1024_model() -> str:
    env = os.environ.get("PGOLF_SP1024_MODEL")
    if env:
        return env
    return os.path.join(os.path.dirname(records_env.records_dir()), "data", "fineweb_1024_bpe.model")


def tokenizer_for(key: str) -> str:
    """The sentencepiece model a record's brief training run loads (its byte tables; the shards are synthetic)."""
    if TRAIN_VOCAB[key] == 1024:
        return sp1024_model()
    return os.path.join(os.path.dirname(sp1024_model()), "tokenizers", CASEOPS_MODEL)


# ------------------------------------------------------------------------------------------------------------
# children
# ------------------------------------------------------------------------------------------------------------
def _matrix_params(ns, key, device):
    h = ns.Hyperparameters()
    if key == "2026-03-17":
        model = ns.GPT(vocab_size=h.vocab_size, num_layers=h.num_layers, model_dim=h.model_dim,
                       num_heads=h.num_heads, num_kv_heads=h.num_kv_heads, mlp_mult=h.mlp_mult,
                       tie_embeddings=h.tie_embeddings, tied_embed_init_std=h.tied_embed_init_std,
                       logit_softcap=h.logit_softcap, rope_base=h.rope_base, qk_gain_init=h.qk_gain_init).to(device)
        pats = ns.CONTROL_TENSOR_NAME_PATTERNS
        return [p for n, p in model.blocks.named_parameters() if p.ndim == 2 and not any(s in n for s in pats)]
    L, d = h.num_layers, h.model_dim
    kv = h.num_kv_heads * (d // h.num_heads)
    hid = int(h.mlp_mult * d)
    shapes = [(2 * L, d, d), (2 * L, kv, d), (L, hid, d), (L, d, hid)]
    return [torch.nn.Parameter(torch.randn(s, device=device) * 0.02) for s in shapes]


def _muon_kwargs(ns, key):
    h = ns.Hyperparameters()
    kw = dict(lr=h.matrix_lr, momentum=h.muon_momentum, backend_steps=h.muon_backend_steps)
    if key != "2026-03-17":
        kw["weight_decay"] = h.muon_wd
    if key == "2026-04-29":
        kw["row_normalize"] = h.muon_row_normalize
    return kw


def _flat(report) -> str:
    """The report on one line (table cells)."""
    return "; ".join(line.strip() for line in str(report).splitlines()[1:])


def child_muon(key: str, variant: str) -> Dict[str, object]:
    from . import harness
    from pgolf_kernels.patch import apply

    ns = records_env.load_record(key)
    if key == "2026-03-17":  # its main() wraps the NS in torch.compile before building the optimizer
        ns.zeropower_via_newtonschulz5 = torch.compile(ns.zeropower_via_newtonschulz5)
    report = _flat(apply(ns, ttt=False)) if variant == "patched" else "unmodified"
    dev = torch.device("cuda")
    torch.manual_seed(0)
    params = _matrix_params(ns, key, dev)
    opt = ns.Muon(params, **_muon_kwargs(ns, key))
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3

    def step():
        if hasattr(opt, "launch_reduce_scatters"):
            opt.launch_reduce_scatters()
        opt.step()

    for _ in range(10):  # includes the record's torch.compile of its NS (2026-04-29)
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    ms = harness.bench_ms(step, warmup=10, rep=100)
    shapes = sorted({tuple(p.shape) for p in params})
    out = dict(ms=ms, peak_mb=torch.cuda.max_memory_allocated() / 2**20, n_params=len(params),
               shapes=str(shapes), patch=report)
    if env_flag("PGOLF_RECORDS_MUON_PROFILE"):
        out["kernels"] = kernel_table(step)
    if env_flag("PGOLF_RECORDS_MUON_GRAPH"):
        # device time without the host's launch gaps (an isolated step is host-bound: ~0.95 ms of gaps in both
        # variants on the H200); last, as a failed capture may leave the stream unusable
        try:
            out["graph_ms"] = harness.graph_bench_ms(step, n_inner=5, reps=20)
        except Exception as e:  # noqa: BLE001 - reported in the row, not fatal to it
            out["graph_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    return out


def kernel_table(fn, steps: int = 5, top: int = 12) -> List[list]:
    """Where one call of ``fn`` spends its GPU time: torch.profiler over ``steps`` calls, the ``top`` kernels by
    device time as [name (80 chars), us per call, launches per call], then ["(all kernels)", us, launches]."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        us = getattr(e, "device_time_total", None)
        if us is None:
            us = e.cuda_time_total
        if us > 0:
            rows.append([e.key[:80], round(us / steps, 1), round(e.count / steps, 2)])
    rows.sort(key=lambda r: -r[1])
    return rows[:top] + [["(all kernels)", round(sum(r[1] for r in rows), 1), round(sum(r[2] for r in rows), 2)]]


class _StopAfterTraining(Exception):
    pass


# where a training child stops: the first call after the last training step. 2026-04-29 validates at its last step
# (eval_val, with its compiled forward_logits: one more whole-model compile) before it serializes, so it stops there
STOP_AT = {"2026-03-17": "quantize_state_dict_int8", "2026-03-23": "_unbank_state_dict", "2026-04-29": "eval_val"}

# PGOLF_RECORDS_TRAIN_ONE_SHAPE=1 (default): with its model compiled, 2026-04-29 trains from step 0 with its layer
# looping on (ENABLE_LOOPING_AT=0, the configuration of the last 65 % of a record run) and without its compile
# warm-up (WARMUP_STEPS=0), so its fullgraph, dynamic=False model meets one input shape instead of the warm-up's 8
# (4 cu_seqlens buckets x looping off/on): cold children spent 197-400 s in that warm-up on an H200 and never reached
# a step. The bench's shards hold 27-53 segments per 49,152-token micro-batch over the first 400 micro-batches (one
# bucket of the record's 64; tests/test_patch.py checks it), and the rotary cache it would have filled costs one more
# compile at the second micro-step, both before the fitted steps; each child reports the Dynamo frames compiled inside
# the fitted steps (``frames_in_fit``), which must be 0 for the slope to be a steady step. 0: the record's own warm-up.
TRAIN_ONE_SHAPE = env_flag("PGOLF_RECORDS_TRAIN_ONE_SHAPE", True)


def train_env(key: str) -> Dict[str, str]:
    """The extra settings of a training child of record ``key`` (see TRAIN_ONE_SHAPE)."""
    if key == "2026-04-29" and TRAIN_ONE_SHAPE and not TRAIN_EAGER_MODEL:
        return dict(WARMUP_STEPS="0", ENABLE_LOOPING_AT="0")
    return {}

# PGOLF_RECORDS_TRAIN_EAGER_MODEL=1: the training children run the record's model eagerly: its torch.compile of an
# nn.Module or of a module's bound method (2026-04-29: the GPT and its forward_logits) returns them unchanged; the
# script's other compiles (its Newton-Schulz, compiled at import) stay. Why: 2026-04-29's compile warm-up (8 fwd+bwd
# shapes, fullgraph) outran 197-400 s per child on an H200, so neither its training ms/step nor its Muon.step in place
# was measured. Eager, the loop starts at once and Muon.step is timed in place as before (CUDA events around each
# call); the row's ms/step is then the eager model's, not the target's, and its case says so.
TRAIN_EAGER_MODEL = env_flag("PGOLF_RECORDS_TRAIN_EAGER_MODEL")


class EagerModelTorch:
    """``torch`` for a record module, except that ``torch.compile`` of an ``nn.Module`` or of a module's bound method
    returns it unchanged (the model runs eagerly); every other attribute, and every other compile, is torch's."""

    def __init__(self, torch_module):
        self.__dict__["_torch"] = torch_module

    def __getattr__(self, name):
        return getattr(self._torch, name)

    def __setattr__(self, name, value):
        raise AttributeError(f"EagerModelTorch: setting torch.{name} through the record's torch is not supported")

    def compile(self, model=None, *args, **kwargs):
        if isinstance(getattr(model, "__self__", model), self._torch.nn.Module):
            return model
        return self._torch.compile(model, *args, **kwargs)


def _write_shards(d: str, vocab: int) -> None:
    from train.data import write_shard
    from train.synthetic import synthetic_tokens

    os.makedirs(d, exist_ok=True)
    write_shard(os.path.join(d, "fineweb_train_000000.bin"), synthetic_tokens(12_000, 24_000_000, vocab, seed=1))
    write_shard(os.path.join(d, "fineweb_val_000000.bin"), synthetic_tokens(200, 262_145, vocab, seed=2))


class StepTimer:
    """Times every call of ``cls.step`` in place (the optimizer inside the record's own training loop): CUDA
    events around each call on a GPU, read once at the end, so no host sync is added to the loop;
    ``time.perf_counter`` elsewhere. ``undo()`` restores the class."""

    def __init__(self, cls: type):
        if not isinstance(cls, type) or not callable(getattr(cls, "step", None)):
            raise TypeError(f"StepTimer: cls must be a class with a step() method, got {cls!r}")
        self.cls, self.orig, self.calls = cls, cls.__dict__.get("step"), []
        self.frames: List[int] = []  # Dynamo frames compiled in this process before each call
        orig, cuda = cls.step, torch.cuda.is_available()
        from torch._dynamo.utils import counters

        def step(opt, *a, **k):
            self.frames.append(int(counters["frames"].get("ok", 0)))
            if cuda:
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                out = orig(opt, *a, **k)
                e.record()
                self.calls.append((s, e))
            else:
                t = time.perf_counter()
                out = orig(opt, *a, **k)
                self.calls.append(1e3 * (time.perf_counter() - t))
            return out

        cls.step = step

    def ms(self, last: int) -> Dict[str, float]:
        """Median and spread (ms) of the last ``last`` calls (the steady steps; the first ones hold the compile)."""
        if last < 1:
            raise ValueError(f"StepTimer.ms: last = {last}: expected at least 1 call")
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        xs = [c if isinstance(c, float) else c[0].elapsed_time(c[1]) for c in self.calls[-last:]]
        if not xs:
            return dict(ms=float("nan"), calls=0)
        return dict(ms=float(statistics.median(xs)), min_ms=min(xs), max_ms=max(xs), calls=len(self.calls))

    def frames_since(self, call: int):
        """Dynamo frames compiled from the start of call ``call`` (0-based, counting any warm-up calls) until now;
        None when there were not that many calls."""
        from torch._dynamo.utils import counters

        if call < 0:
            raise ValueError(f"StepTimer.frames_since: call = {call}: expected >= 0")
        if len(self.frames) <= call:
            return None
        return int(counters["frames"].get("ok", 0)) - self.frames[call]

    def undo(self) -> None:
        if self.orig is None:
            del self.cls.step
        else:
            self.cls.step = self.orig


def _record_env(key: str, data_dir: str, **extra: str) -> None:
    """The scripts read their settings from the environment when imported: the brief-training set-up (no
    warm-down: WARMDOWN_ITERS for 2026-03-17/23, WARMDOWN_FRAC for 2026-04-29; ``PGOLF_RECORDS_ITERS`` steps,
    ``PGOLF_RECORDS_WARMUP_STEPS`` compile warm-up steps, default 3), then ``extra``."""
    os.environ.update(DATA_PATH=data_dir, TOKENIZER_PATH=tokenizer_for(key), ITERATIONS=str(TRAIN_ITERS),
                      WARMDOWN_ITERS="0", WARMDOWN_FRAC="0", CASEOPS_ENABLED="0", VOCAB_SIZE=str(TRAIN_VOCAB[key]),
                      WARMUP_STEPS=os.environ.get("PGOLF_RECORDS_WARMUP_STEPS", "3"), TRAIN_LOG_EVERY="1",
                      VAL_LOSS_EVERY="0", MAX_WALLCLOCK_SECONDS="0", TRAIN_BATCH_TOKENS=str(TRAIN_TOKENS[key]),
                      TRAIN_SEQ_LEN=str(TRAIN_SEQ[key]), SEED="1337")
    os.environ.update(extra)


# TTT eval (2026-04-29 only: its phased LoRA TTT is the one the drop-in targets). The record's own run settings
# (its README) where the synthetic set-up allows: SmearGate and the sparse attention gate on, 7-bit embeddings,
# 3 phases over the first 4 % of the documents (2,000 of 50,000); lzma instead of brotli and no pyminify (neither
# is installed on the GPU image), CaseOps off (no CaseOps shards).
TTT_KEYS = ("2026-04-29",)
# TTT only: the patch plus compile_cache=PGOLF_RECORDS_COMPILE_CACHE; list it twice (the first child writes the file at
# exit, the second, on empty cache folders of its own, loads it)
# patched-regional: apply(..., regional_ttt=True); patched-whole: regional_ttt=False (the record's own compile of its
# whole TTT forward, with the rest of the TTT piece)
TTT_EXTRA_VARIANTS = ("patched-cachefile", "patched-regional", "patched-whole")
# 192 = three of the record's 64-document TTT batches: a batch of another size makes the record compile its whole TTT
# forward again (~150 s on an H200; the 200-document share had a batch of 8), which a share of the official set
# pays once per rank, not once per batch; with 192 a cold pair fits two device calls
TTT_DOCS = env_int("PGOLF_RECORDS_TTT_DOCS", 192, 1)
# TTT children log why Dynamo compiles again (stderr, in their .err log) unless TORCH_LOGS is set: both variants
# compiled inside the eval on an H200 after their warm-up (the record 168 s, the regions ~40 s cold), which a CPU
# trace of the eval's window lengths does not reproduce
TTT_CHILD_ENV = {"TORCH_LOGS": os.environ.get("TORCH_LOGS") or "recompiles"}
# > 0: each variant first runs once cold on a val shard of this many documents (its compile warm-up, cold caches),
# then on the TTT_DOCS share with those caches (the timed eval, warm-up from warm caches). Why: a cold 2026-04-29
# record child did not finish warm-up + 500 documents within ~500 s of one device call, which left no number at all
TTT_COLD_DOCS = env_int("PGOLF_RECORDS_TTT_COLD_DOCS", 0, 0)


def _ttt_env(art_dir: str, **extra: str) -> Dict[str, str]:
    return dict(ARTIFACT_DIR=art_dir, COMPRESSOR="lzma", SMEAR_GATE_ENABLED="1", SPARSE_ATTN_GATE_ENABLED="1",
                EMBED_BITS="7", PHASED_TTT_NUM_PHASES="3", PHASED_TTT_PREFIX_DOCS=str(max(3, TTT_DOCS * 2 // 50)),
                **extra)


def _write_ttt_shards(d: str, vocab: int, docs: int = 0) -> None:
    """A calibration train shard (GPTQ) and a val shard of ``docs`` (default TTT_DOCS) documents of the official
    mean length."""
    from train.data import write_shard
    from train.synthetic import OFFICIAL_DOCS, OFFICIAL_TOKENS, synthetic_tokens

    os.makedirs(d, exist_ok=True)
    write_shard(os.path.join(d, "fineweb_train_000000.bin"), synthetic_tokens(2_000, 4_000_000, vocab, seed=1))
    write_shard(os.path.join(d, "fineweb_val_000000.bin"),
                synthetic_tokens(docs or TTT_DOCS, (docs or TTT_DOCS) * OFFICIAL_TOKENS // OFFICIAL_DOCS, vocab, seed=3))


def child_ttt_artifact(key: str, data_dir: str, art_dir: str) -> Dict[str, object]:
    """The record's quantized artifact of its GPT at initialization, written by its own ``serialize`` (GPTQ on
    calibration batches of the synthetic train shard)."""
    _record_env(key, data_dir, **_ttt_env(art_dir, RUN_ID="bench_ttt_artifact"))
    os.makedirs(art_dir, exist_ok=True)
    ns = records_env.load_record(key)
    ns._compressed_code_size = lambda code: (len(code.encode()), len(code.encode()))  # pyminify: not installed
    h = ns.Hyperparameters()
    ns.set_logging_hparams(h)
    torch.manual_seed(0)
    model = ns.GPT(h).to(torch.device("cuda")).bfloat16()
    ns.restore_fp32_params(model)
    t0 = time.time()
    with open(records_env.record_path(key)) as f:
        _, quant_bytes = ns.serialize(h, model, f.read())
    return dict(serialize_s=time.time() - t0, quant_bytes=int(quant_bytes), artifact_sha256=folder_sha256(art_dir))


def folder_sha256(folder: str) -> str:
    """sha256 over the files of ``folder`` (names and bytes, sorted; the bench's own ``made.json`` left out): TTT rows
    from different device calls or machines compare val_bpb only when their artifacts hash the same."""
    import hashlib

    if not os.path.isdir(folder):  # a missing folder would hash as empty and match every other missing one
        raise FileNotFoundError(f"folder_sha256: folder {folder!r} does not exist")
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(folder)):
        for name in sorted(files):
            if name == "made.json" and root == folder:
                continue
            path = os.path.join(root, name)
            h.update(os.path.relpath(path, folder).encode() + b"\0")
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()


def child_ttt(key: str, variant: str, data_dir: str, art_dir: str) -> Dict[str, object]:
    """The record's own TTT eval (``TTT_EVAL_ONLY=1``: load the artifact, its compile warm-up on random tokens,
    then ``eval_val_ttt_phased`` over the val shard), unmodified or patched; its log lines are parsed by the
    parent (``ttt_times``)."""
    from pgolf_kernels.patch import apply

    _record_env(key, data_dir, **_ttt_env(art_dir, TTT_EVAL_ONLY="1", RUN_ID=f"bench_ttt_{variant}"))
    t0 = time.time()
    ns = records_env.load_record(key)
    # patched-cachefile: the patch plus compile_cache=FILE (loaded when an earlier child wrote it, else written at exit)
    cache = {"compile_cache": os.environ["PGOLF_RECORDS_COMPILE_CACHE"]} if variant == "patched-cachefile" else {}
    # patched: the patch's defaults (regional_ttt on where it applies); patched-whole: the record's whole-forward
    # compile with the rest of the TTT piece; patched-regional: regional_ttt required
    opts = dict(cache, regional_ttt={"patched-regional": True, "patched-whole": False}.get(variant))
    report = _flat(apply(ns, **opts)) if variant != "record" else "unmodified"
    os.chdir(tempfile.mkdtemp(prefix="rec_ttt_"))
    ns.main()
    return dict(wall_s=time.time() - t0, peak_mb=torch.cuda.max_memory_allocated() / 2**20, patch=report)


_TTT_RE = re.compile(r"quantized_ttt_phased val_loss:([0-9.]+) val_bpb:([0-9.]+) eval_time:(\d+)ms")
_TTT_WARM_RE = re.compile(r"ttt_lora:compile warmup done \(([0-9.]+)s\)")


def ttt_times(log: str) -> Dict[str, float]:
    """From a 2026-04-29 TTT log: the timed eval (eval_s, val_loss, val_bpb) and its compile warm-up (warmup_s)."""
    m = _TTT_RE.search(log)
    if m is None:
        raise RuntimeError("no 'quantized_ttt_phased val_loss:... val_bpb:... eval_time:...ms' line in the log")
    w = _TTT_WARM_RE.search(log)
    return dict(val_loss=float(m.group(1)), val_bpb=float(m.group(2)), eval_s=int(m.group(3)) / 1e3,
                warmup_s=float(w.group(1)) if w else float("nan"))


def child_train(key: str, variant: str, data_dir: str) -> Dict[str, object]:
    from pgolf_kernels.patch import apply

    _record_env(key, data_dir, RUN_ID=f"bench_{variant}", **train_env(key))
    ns = records_env.load_record(key)
    report = _flat(apply(ns)) if variant == "patched" else "unmodified"
    if TRAIN_EAGER_MODEL:
        ns.torch = EagerModelTorch(torch)

    def stop(*a, **k):
        raise _StopAfterTraining()

    setattr(ns, STOP_AT[key], stop)
    timer = StepTimer(ns.Muon)  # every record builds its matrix optimizer as ns.Muon (the patched one when patched)
    work = tempfile.mkdtemp(prefix="rec_")
    os.chdir(work)
    os.makedirs("logs", exist_ok=True)
    t0 = time.time()
    try:
        ns.main()
        stopped = False
    except _StopAfterTraining:
        stopped = True
    muon = timer.ms(max(1, TRAIN_ITERS - TRAIN_FIT[0]))
    return dict(stopped_after_training=stopped, wall_s=time.time() - t0,
                peak_mb=torch.cuda.max_memory_allocated() / 2**20, patch=report, muon_step_ms=muon["ms"],
                # the fitted steps are the last ones (a record's compile warm-up steps call Muon.step too)
                muon_step_calls=muon["calls"],
                frames_in_fit=timer.frames_since(max(0, len(timer.frames) - (TRAIN_ITERS - TRAIN_FIT[0]))),
                settings={k: os.environ[k] for k in ("WARMUP_STEPS", "ENABLE_LOOPING_AT") if k in os.environ})


def heartbeat_line(elapsed_s: float) -> str:
    """One progress line of a child: seconds since it started and torch.compile's work so far (Dynamo frames
    compiled, FX graphs compiled or loaded from the cache, compile seconds). A child killed at its limit leaves these
    in its log, so the log says whether it was compiling, loading compiled graphs or running steps."""
    from train.warmup import compile_cache_counts

    c = compile_cache_counts()
    fx = {k.split(".", 1)[1]: int(v) for k, v in c.items() if k.startswith("inductor.fxgraph_cache_")}
    return (f"[child {elapsed_s:.0f} s] dynamo frames {c['dynamo_frames']}, fx graphs "
            f"{', '.join(f'{k} {v}' for k, v in sorted(fx.items())) or 'none'}, compile {c['compile_s.frame']:.1f} s")


def start_heartbeat(every_s: float) -> None:
    """Print ``heartbeat_line`` to stderr every ``every_s`` seconds from a daemon thread (0: off)."""
    if every_s <= 0:
        return
    import threading

    t0 = time.time()

    def beat():
        while True:
            time.sleep(every_s)
            try:
                print(heartbeat_line(time.time() - t0), file=sys.stderr, flush=True)
            except Exception as e:  # a progress line must never take the child down
                print(f"[child] heartbeat failed: {e}", file=sys.stderr, flush=True)
                return

    threading.Thread(target=beat, name="pgolf-heartbeat", daemon=True).start()


def _child_main(argv) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", choices=["muon", "train", "ttt-artifact", "ttt"], required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--variant", choices=VARIANTS + TTT_EXTRA_VARIANTS, default="record")
    ap.add_argument("--data", default="")
    ap.add_argument("--artifact", default="")
    a = ap.parse_args(argv)
    if a.child in ("train", "ttt"):  # the long children: their compile warm-ups outran 197-400 s before
        start_heartbeat(HEARTBEAT_S)
    if a.child == "muon":
        res = child_muon(a.key, a.variant)
    elif a.child == "train":
        res = child_train(a.key, a.variant, a.data)
    elif a.child == "ttt-artifact":
        res = child_ttt_artifact(a.key, a.data, a.artifact)
    else:
        res = child_ttt(a.key, a.variant, a.data, a.artifact)
    print("RESULT " + json.dumps(res), flush=True)
    return 0


# ------------------------------------------------------------------------------------------------------------
# parent
# ------------------------------------------------------------------------------------------------------------
_STEP_RE = re.compile(r"step:(\d+)/\d+ train_loss:([0-9.]+) .*?train_time:([0-9.]+)ms")
# 2026-04-29: "12/50 train_loss: 6.1234 train_time: 0.1m tok/s: 812345" -- the time in tenths of a minute, so the
# step time is taken from tok/s = step * tokens_per_step / elapsed (a cumulative rate, printed to the token)
_STEP_RE_RATE = re.compile(r"(?m)^(\d+)/\d+ train_loss: ([0-9.]+) train_time: [0-9.]+m tok/s: (\d+)")


def train_points(log: str, tokens_per_step: int):
    """[(step, train loss, elapsed ms)] from a record's training log (either format above)."""
    pts = [(int(s), float(l), float(t)) for s, l, t in _STEP_RE.findall(log)]
    if not pts:
        pts = [(int(s), float(l), 1e3 * int(s) * tokens_per_step / int(r)) for s, l, r in _STEP_RE_RATE.findall(log)
               if int(r) > 0]
    return pts


def _spawn(args: List[str], timeout: float, caches: str = "", **env_extra: str):
    """One child process; ``caches``: a folder for its own (empty) Inductor and Triton caches, as on a fresh machine.
    ``PGOLF_RECORDS_LOG_DIR``: where its output files stay (default: a temp folder)."""
    cmd = [sys.executable, "-m", "bench.bench_records"] + args
    env = dict(os.environ, PYTHONUNBUFFERED="1", **env_extra)
    if caches:
        env.update(TORCHINDUCTOR_CACHE_DIR=os.path.join(caches, "inductor"), TRITON_CACHE_DIR=os.path.join(caches, "triton"))
    t0 = time.time()
    log_dir = os.environ.get("PGOLF_RECORDS_LOG_DIR") or tempfile.mkdtemp(prefix="rec_child_")
    name = "-".join(a.lstrip("-") for a in args if "/" not in a)
    rc, out, err = run_child(cmd, timeout, log_dir, name, env=env, cwd=records_env.REPO_ROOT)
    if rc is None:
        # say how far the child got (compile, warm-up or steps): a bare timeout left nothing to act on
        def tail(x):
            return "\n".join(x.splitlines()[-15:])
        raise RuntimeError(f"child {' '.join(args)} timed out after {timeout:.0f} s; last output:\n{tail(out)}\n"
                           f"{tail(err)}")
    print(f"child {' '.join(args)}: rc {rc}, {time.time() - t0:.1f} s wall", flush=True)
    res = None
    for line in out.splitlines():
        if line.startswith("RESULT "):
            res = json.loads(line[len("RESULT "):])
    if res is None:
        raise RuntimeError(f"child {' '.join(args)} failed (rc {rc}):\n{out[-3000:]}\n{err[-3000:]}")
    return res, out


def slope_ms(log: str, lo: int = 10, hi: int = 50, tokens_per_step: int = 0):
    """Least-squares slope (ms/step) of train_time over steps lo..hi, the residual std (ms), the number of points,
    the last logged train loss, and the median and the largest per-step increment (ms; logged steps apart by
    more than one are divided by their distance). The elapsed time is cumulative, so one stalled step lifts every
    later point: the least-squares slope then moves by a share of the stall and the residual std grows (a run of
    the 2026-04-29 script: 596.4 ms/step with residual std 80 ms, against 582.4 ms and 2.2 ms for its repeat),
    while the median increment stays the steady step time."""
    every = train_points(log, tokens_per_step)
    pts = [(s, t) for s, _, t in every if lo <= s <= hi]
    if len(pts) < 3:
        raise RuntimeError(f"only {len(pts)} logged steps in [{lo}, {hi}]")
    x = torch.tensor([p[0] for p in pts], dtype=torch.float64)
    y = torch.tensor([p[1] for p in pts], dtype=torch.float64)
    xm, ym = x.mean(), y.mean()
    b = ((x - xm) * (y - ym)).sum() / ((x - xm) ** 2).sum()
    resid = y - (ym + b * (x - xm))
    last_loss = every[-1][1]
    inc = [(t1 - t0) / (s1 - s0) for (s0, t0), (s1, t1) in zip(pts, pts[1:]) if s1 > s0]
    return float(b), float(resid.std()), len(pts), last_loss, float(statistics.median(inc)), float(max(inc))


def _save(rows):
    from . import harness

    harness.save_results(KERNEL, rows, notes=records_env.standin_note())


def _median_of(runs: List[tuple], field: str) -> float:
    xs = [r[0][field] for r in runs if r[0].get(field) is not None]
    return float(statistics.median(xs)) if xs else float("nan")


def _train_row(key: str, runs: Dict[str, List[tuple]]) -> Dict[str, object]:
    """One training row from ``runs[variant] = [(child result, (slope, resid std, points, last loss)), ...]``:
    medians over runs of the per-run slopes; ``run_spread_ms`` = max - min of one variant's slopes (the
    run-to-run noise a difference must beat)."""
    from . import harness

    def med(v, i):
        return float(statistics.median(r[1][i] for r in runs[v]))

    def spread(v):
        xs = [r[1][0] for r in runs[v]]
        return max(xs) - min(xs) if len(xs) > 1 else float("nan")

    po, ro = runs["patched"][0][0], runs["record"][0][0]
    eager = ", the model eager (PGOLF_RECORDS_TRAIN_EAGER_MODEL=1: its torch.compile bypassed)" if TRAIN_EAGER_MODEL else ""
    if train_env(key):
        eager = ", one compiled shape: " + ", ".join(f"{k}={v}" for k, v in train_env(key).items())
    return harness.make_row(
        KERNEL, f"{key} train ms/step (slope steps {TRAIN_FIT[0]}-{TRAIN_ITERS}, {TRAIN_TOKENS[key]} tokens/step{eager})",
        med("patched", 0), "record train ms/step", med("record", 0), runs=len(runs["patched"]),
        slopes_ms=[round(r[1][0], 2) for r in runs["patched"]], baseline_slopes_ms=[round(r[1][0], 2) for r in runs["record"]],
        run_spread_ms=spread("patched"), baseline_run_spread_ms=spread("record"), noise_ms=med("patched", 1),
        baseline_noise_ms=med("record", 1),
        # per run, the median per-step increment (the steady step, blind to a stall) and the largest one (a stall)
        step_median_ms=[round(r[1][4], 2) for r in runs["patched"]],
        baseline_step_median_ms=[round(r[1][4], 2) for r in runs["record"]],
        step_max_ms=[round(r[1][5], 1) for r in runs["patched"]],
        baseline_step_max_ms=[round(r[1][5], 1) for r in runs["record"]],
        **steady_verdict([r[1][4] for r in runs["patched"]], [r[1][4] for r in runs["record"]]),
        steps_fit=runs["patched"][0][1][2], train_loss_last=med("patched", 3),
        baseline_train_loss_last=med("record", 3), peak_mb=po["peak_mb"], baseline_peak_mb=ro["peak_mb"],
        # Muon.step timed in place, inside the training loop (median of the steady steps of each run's median)
        muon_step_ms=_median_of(runs["patched"], "muon_step_ms"),
        baseline_muon_step_ms=_median_of(runs["record"], "muon_step_ms"),
        patch=po["patch"], attention=records_env.standin_note(),
        # Dynamo frames compiled inside the fitted steps, the most of any run (0: the slope is a steady step)
        frames_in_fit=_most_of(runs["patched"], "frames_in_fit"),
        baseline_frames_in_fit=_most_of(runs["record"], "frames_in_fit"), settings=po.get("settings", {}))


def steady_verdict(patched: List[float], record: List[float]) -> Dict[str, object]:
    """The training target ("never slower") decided on the steady step: per variant the median over runs of each
    run's median per-step increment (a stalled step moves a least-squares slope by a share of the stall, not this),
    ``steady_delta_ms`` = patched - record, ``steady_noise_ms`` = the larger max - min of one variant's per-run
    values (the run-to-run noise; 0 with one run each), and ``not_slower`` = delta <= noise."""
    p, r = float(statistics.median(patched)), float(statistics.median(record))
    noise = max(max(x) - min(x) for x in (patched, record))
    delta = p - r
    return dict(steady_ms=round(p, 2), baseline_steady_ms=round(r, 2), steady_speedup=r / p,
                steady_delta_ms=round(delta, 2), steady_noise_ms=round(noise, 2), not_slower=bool(delta <= noise))


def _most_of(runs: List[tuple], field: str):
    xs = [r[0][field] for r in runs if r[0].get(field) is not None]
    return max(xs) if xs else None


def _muon_extras(r: Dict[str, Dict[str, object]]) -> Dict[str, object]:
    """The optional columns of a Muon.step row from its children's results (``r[variant]``): kernel tables, graph
    replay times or capture errors, and the torch-prologue child's time and kernels."""
    out: Dict[str, object] = {}
    for prefix, v in (("", "patched"), ("baseline_", "record"), ("torch_pack_", "torch_pack")):
        res = r.get(v, {})
        if v == "torch_pack" and res:
            out["torch_pack_ms"] = res["ms"]
        for k in ("kernels", "graph_ms", "graph_error"):
            if k in res:
                out[prefix + k] = res[k]
    return out


def run(quick: bool = False) -> List[Dict[str, object]]:
    """Env: ``PGOLF_RECORDS_PARTS`` (default "muon,train"; "ttt" adds the TTT eval rows), ``PGOLF_RECORDS_TRAIN_KEYS`` (default both training
    records), ``PGOLF_RECORDS_REPEATS`` (training runs per variant, default 2, alternating record / patched so a
    drift of the machine hits both), ``PGOLF_RECORDS_BUDGET_S`` (default 540: no child is started that would not
    fit)."""
    from . import harness

    miss = records_env.missing_reason()
    if miss:
        raise RuntimeError(miss)
    parts = os.environ.get("PGOLF_RECORDS_PARTS", "muon,train").split(",")
    budget = float(os.environ.get("PGOLF_RECORDS_BUDGET_S", "540"))
    t0 = time.time()
    rows: List[Dict[str, object]] = []
    muon_keys = [k for k in os.environ.get("PGOLF_RECORDS_MUON_KEYS", ",".join(records_env.RECORDS)).split(",") if k]
    bad = [k for k in muon_keys if k not in records_env.RECORDS]
    if bad:
        raise ValueError(f"PGOLF_RECORDS_MUON_KEYS: unknown {bad}; expected a comma list of {tuple(records_env.RECORDS)}")
    for key in (muon_keys if "muon" in parts else ()):
        r = {v: _spawn(["--child", "muon", "--key", key, "--variant", v], 300)[0] for v in VARIANTS}
        if env_flag("PGOLF_RECORDS_MUON_TORCH_PACK"):  # the patched step once more, NS prologue in torch
            r["torch_pack"] = _spawn(["--child", "muon", "--key", key, "--variant", "patched"], 300,
                                     PGOLF_NS_FAST_PACK="0")[0]
        rows.append(harness.make_row(KERNEL, f"{key} Muon.step (1 GPU, record's default model)", r["patched"]["ms"],
                                     "record Muon.step", r["record"]["ms"], peak_mb=r["patched"]["peak_mb"],
                                     baseline_peak_mb=r["record"]["peak_mb"], shapes=r["patched"]["shapes"],
                                     patch=r["patched"]["patch"], attention=records_env.standin_note(),
                                     **_muon_extras(r)))
        print(harness.markdown_table(rows[-1:]), flush=True)
        _save(rows)
    if quick:
        return rows
    if "train" in parts:
        _train_rows(rows, budget, t0)
    if "ttt" in parts:
        _ttt_rows(rows, budget, t0)
    return rows


def _ttt_rows(rows: List[Dict[str, object]], budget: float, t0: float) -> None:
    """TTT eval of each TTT_KEYS record on TTT_DOCS synthetic documents: one artifact (the record's serialize),
    then one process per variant in ``PGOLF_RECORDS_TTT_VARIANTS`` (default "record,patched"; "patched-cachefile" may
    repeat), each on empty Inductor and Triton cache folders of its own (a fresh machine: the warm-up is the record's
    cold compile). ``PGOLF_RECORDS_COMPILE_CACHE``: the patched-cachefile file (default: in the bench's temp folder).
    ``PGOLF_RECORDS_TTT_ARTIFACT``: a folder that keeps the artifact, so that a later device call running the other
    variant reuses it (default: the bench's temp folder). ``PGOLF_RECORDS_TTT_COLD_DOCS`` (> 0): each variant's cold
    warm-up first, on that many documents, then the share on the caches it filled (``TTT_COLD_DOCS``)."""
    from . import harness

    variants = [v for v in os.environ.get("PGOLF_RECORDS_TTT_VARIANTS", ",".join(VARIANTS)).split(",") if v]
    bad = [v for v in variants if v not in VARIANTS + TTT_EXTRA_VARIANTS]
    if bad:
        raise ValueError(f"PGOLF_RECORDS_TTT_VARIANTS: unknown {bad}; expected a comma list of "
                         f"{VARIANTS + TTT_EXTRA_VARIANTS}")
    with tempfile.TemporaryDirectory() as d:
        cache_file = os.environ.get("PGOLF_RECORDS_COMPILE_CACHE") or os.path.join(d, "ttt.compile-cache")
        for key in TTT_KEYS:
            data = os.path.join(d, f"ttt-{key}")
            art = os.path.join(os.environ.get("PGOLF_RECORDS_TTT_ARTIFACT") or d, f"art-{key}")
            _write_ttt_shards(data, TRAIN_VOCAB[key])
            data_cold = os.path.join(d, f"ttt-cold-{key}")
            if TTT_COLD_DOCS > 0:
                _write_ttt_shards(data_cold, TRAIN_VOCAB[key], docs=TTT_COLD_DOCS)
            res: Dict[str, Dict[str, object]] = {}
            cache_runs: List[Dict[str, object]] = []
            try:
                made = _ttt_artifact(key, data, art, budget - (time.time() - t0))
                for v in variants:
                    left = budget - (time.time() - t0)
                    if left < 90:
                        print(f"ttt {key} {v}: skipped, {left:.0f} s of the budget left", flush=True)
                        continue
                    had_file = os.path.isfile(cache_file)
                    (caches, state), cold = ttt_caches(d, key, v), {}
                    try:
                        if TTT_COLD_DOCS > 0:  # the cold warm-up on a few documents, then the share on its caches
                            out, log = _spawn(["--child", "ttt", "--key", key, "--variant", v, "--data", data_cold,
                                               "--artifact", art], min(CHILD_S, left), caches=caches,
                                              PGOLF_RECORDS_COMPILE_CACHE=cache_file, **TTT_CHILD_ENV)
                            t = ttt_times(log)
                            cold = dict(cold_warmup_s=t["warmup_s"], cold_wall_s=out["wall_s"],
                                        cold_docs=TTT_COLD_DOCS)
                            print(f"ttt {key} {v}: cold warm-up {t['warmup_s']:.1f} s ({out['wall_s']:.1f} s wall "
                                  f"on {TTT_COLD_DOCS} docs)", flush=True)
                            left = budget - (time.time() - t0)
                        out, log = _spawn(["--child", "ttt", "--key", key, "--variant", v, "--data", data,
                                           "--artifact", art], min(CHILD_S, left), caches=caches,
                                          PGOLF_RECORDS_COMPILE_CACHE=cache_file, **TTT_CHILD_ENV)
                        times = ttt_times(log)  # a log without the record's TTT line is this variant's failure too
                    except RuntimeError as e:  # one variant's timeout or failure keeps the others' figures
                        print(f"ttt {key} {v}: {e}", flush=True)
                        res[v] = dict(failed=str(e).splitlines()[0][:300], caches=state)
                        continue
                    got = dict(out, **times, **cold, caches=state)
                    if v == "patched-cachefile":
                        size = os.path.getsize(cache_file) if os.path.isfile(cache_file) else 0
                        got["compile_cache"] = f"{'loaded' if had_file else 'wrote'} {size:,} bytes"
                        cache_runs.append({k: got.get(k) for k in ("compile_cache", "warmup_s", "eval_s", "wall_s",
                                                                   "val_bpb")})
                    else:
                        res[v] = got
            except Exception as e:  # keep what was measured
                print(f"ttt {key}: {e}", flush=True)
                continue
            if not res and not cache_runs:
                continue
            nan = float("nan")
            # the row's "ours": the regional variant when it ran, else the plain patch; every variant's figures
            # stay in ``variants`` (a call may run one variant only: the row then holds NaN for the other)
            ours = next((v for v in ("patched-regional", "patched", "patched-whole") if v in res), "patched")
            p, r = res.get(ours, {}), res.get("record", {})
            rows.append(harness.make_row(
                KERNEL, f"{key} TTT eval ({TTT_DOCS} synthetic docs, phased, the record's own eval loop; {ours})",
                1e3 * p.get("eval_s", nan), "record TTT eval", 1e3 * r.get("eval_s", nan), docs=TTT_DOCS,
                variant=ours, wall_speedup=r.get("wall_s", nan) / p.get("wall_s", nan),
                variants={v: {k: res[v][k] for k in ("warmup_s", "eval_s", "wall_s", "val_bpb", "peak_mb", "caches",
                                                     "failed") if k in res[v]} for v in res},
                caches=p.get("caches", ""), baseline_caches=r.get("caches", ""),
                val_bpb=p.get("val_bpb", nan), baseline_val_bpb=r.get("val_bpb", nan),
                warmup_s=p.get("warmup_s", nan), baseline_warmup_s=r.get("warmup_s", nan),
                **({} if TTT_COLD_DOCS <= 0 else dict(
                    cold_warmup_s=p.get("cold_warmup_s", nan), baseline_cold_warmup_s=r.get("cold_warmup_s", nan),
                    cold_wall_s=p.get("cold_wall_s", nan), baseline_cold_wall_s=r.get("cold_wall_s", nan),
                    cold_docs=TTT_COLD_DOCS, warm_note="warmup_s / wall_s: the share's child, on the caches its "
                                                       "cold child filled")),
                wall_s=p.get("wall_s", nan), baseline_wall_s=r.get("wall_s", nan),
                peak_mb=p.get("peak_mb", nan), baseline_peak_mb=r.get("peak_mb", nan),
                artifact_bytes=made["quant_bytes"], serialize_s=made["serialize_s"],
                artifact_sha256=made.get("artifact_sha256", ""),
                patch=p.get("patch", "not run"), attention=records_env.standin_note(), cache_runs=cache_runs,
                setup="artifact of the record's GPT at initialization (its serialize: GPTQ, lzma), "
                      "SMEAR_GATE_ENABLED=1 SPARSE_ATTN_GATE_ENABLED=1 EMBED_BITS=7 PHASED_TTT_NUM_PHASES=3, "
                      "CaseOps off"))
            print(harness.markdown_table(rows[-1:]), flush=True)
            _save(rows)


def ttt_caches(tmp: str, key: str, variant: str) -> Tuple[str, str]:
    """(the TTT child's Inductor/Triton cache folder, "cold" or "warm (...)"): a fresh folder under ``tmp`` (a fresh
    machine), or with ``PGOLF_RECORDS_TTT_CACHES=DIR`` the kept folder ``DIR/ttt-<key>-<variant>``, so that a child
    whose cold compile does not fit one device call (the 2026-04-29 record's own: stopped at 529 s on an H200, in
    phase 2 of 3) fills it in one call and finishes on it in the next; the row says which it was."""
    from .harness import env_folder

    root = env_folder("PGOLF_RECORDS_TTT_CACHES")
    if not root:
        return tempfile.mkdtemp(dir=tmp), "cold"
    folder = os.path.join(root, f"ttt-{key}-{variant}")
    os.makedirs(folder, exist_ok=True)
    n = sum(len(files) for _, _, files in os.walk(folder))
    return folder, "cold" if n == 0 else f"warm ({n} cache files from an earlier child)"


def _ttt_artifact(key: str, data: str, art: str, left: float) -> Dict[str, object]:
    """The record's artifact in ``art``: reused when an earlier bench wrote it there (``made.json`` beside it; the
    synthetic shards are the same for the same TTT_DOCS), else written by the artifact child (64 s on an H200)."""
    made_file = os.path.join(art, "made.json")
    if os.path.isfile(made_file):
        with open(made_file) as f:
            made = json.load(f)
        if made.get("docs") == TTT_DOCS:
            print(f"ttt {key}: artifact reused from {art}", flush=True)
            return made
    made, _ = _spawn(["--child", "ttt-artifact", "--key", key, "--data", data, "--artifact", art], min(CHILD_S, left))
    made["docs"] = TTT_DOCS
    os.makedirs(art, exist_ok=True)
    with open(made_file, "w") as f:
        json.dump(made, f)
    return made


def train_caches() -> str:
    """``PGOLF_RECORDS_TRAIN_CACHES``: a folder for the training children's Inductor and Triton caches, kept after the
    bench, so that a later bench process on the same machine (a second device call) starts them on warm caches;
    "" (default): torch's default cache folders."""
    from .harness import env_folder

    return env_folder("PGOLF_RECORDS_TRAIN_CACHES")


def _train_rows(rows: List[Dict[str, object]], budget: float, t0: float) -> None:
    from . import harness

    keys = [k for k in os.environ.get("PGOLF_RECORDS_TRAIN_KEYS", ",".join(TRAIN_KEYS)).split(",") if k]
    repeats = env_int("PGOLF_RECORDS_REPEATS", 2, 1)
    caches = train_caches()
    if caches:
        print(f"train: Inductor and Triton caches in {caches} "
              f"({'warm: ' + str(len(os.listdir(caches))) + ' entries' if os.listdir(caches) else 'empty'})", flush=True)
    with tempfile.TemporaryDirectory() as d:
        for v in sorted({TRAIN_VOCAB[k] for k in keys}):
            _write_shards(os.path.join(d, f"sp{v}"), v)
        for key in keys:
            runs: Dict[str, List[tuple]] = {v: [] for v in VARIANTS}
            for rep in range(repeats):
                for v in VARIANTS:
                    left = budget - (time.time() - t0)
                    if left < 90:
                        print(f"train {key} {v} run {rep + 1}: skipped, {left:.0f} s of the budget left", flush=True)
                        continue
                    try:
                        out, log = _spawn(["--child", "train", "--key", key, "--variant", v, "--data",
                                           os.path.join(d, f"sp{TRAIN_VOCAB[key]}")], min(CHILD_S, left),
                                          caches=caches)
                        runs[v].append((out, slope_ms(log, TRAIN_FIT[0], TRAIN_ITERS, TRAIN_TOKENS[key])))
                    except Exception as e:  # keep the rows already measured
                        print(f"train {key} {v}: {e}", flush=True)
            if all(runs[v] for v in VARIANTS):
                rows.append(_train_row(key, runs))
                print(harness.markdown_table(rows[-1:]), flush=True)
                _save(rows)


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
