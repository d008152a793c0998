"""Configuration of per-document LoRA test-time training (``--mode ttt``), validated on construction.

The default is the seeds' recipe (rank 8 on Q/V and the head, chunk 256, window 1024, Adam). ``RECIPES``
names complete settings: ``records`` is the 2026-04-29 record's recipe (its ``train_gpt.py``
hyperparameters and ``BatchedTTTLoRA``): rank 96, LoRA scale alpha/rank = 144/96, adapters on
q, k, v, o, mlp and the head, chunk 48, window 2048, 64 documents per batch, AdamW lr 1e-4 with
betas (0, 0.999), eps 1e-10, weight decay 1.0, A kept across document resets, and phased TTT (the
2000 longest documents in 3 phases, each followed by a global SGD pass on the base weights over
every document scored so far: one step per chunk of 32,768 targets in sequences of 2048, lr 1e-3
cosine over the chunks, momentum 0.9, gradient clip 1.0).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional, Tuple

# Adapter targets. q, k, v: the attention input projections (input: the normed block input n).
# o: a LoRA from n added to the attention block's output (before attn_scale), as the record's
# ``o_loras`` (it reads n, not the attention output). mlp: a LoRA from the normed MLP input added to the
# MLP output (the record's ``mlp_loras``). up / down: LoRAs on the MLP's own projections (up: input the
# normed MLP input, added to fc's output before the activation; down: input the activation, added to
# proj's output). head: the LM head.
TARGETS = ("q", "k", "v", "o", "mlp", "up", "down", "head")
MAX_RANK = 128
OPTIMIZERS = ("adam", "adamw")
GRAPH_CAPTURE = ("ahead", "first-use")  # TTTConfig.graph_capture


@dataclass
class AdamSettings:
    """The adapters' Adam hyperparameters, shared by ``TTTConfig`` and ``chunked.ChunkedConfig`` (each
    validates them in its own ``__post_init__``): peak lr, betas (beta1, beta2) and eps."""

    lr: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8


@dataclass
class TTTConfig(AdamSettings):
    rank: int = 8
    targets: Tuple[str, ...] = ("q", "v", "head")
    chunk: int = 256
    window: int = 1024
    batch_size: int = 64
    seed: int = 1234
    # True: score each chunk from its own no-grad forward, then run a second forward with grad for
    # the update (the literal two-pass recipe). False (default): score from the detached NLL of the
    # training forward itself -- the same values before any update, one forward instead of two
    # (tested equal in tests/test_compliance.py).
    separate_score_pass: bool = False
    # "batch": whole batches of batch_size documents, reset together (the seeds' loop); "rolling": rows
    # refilled with new documents as documents finish (ttt_rolling), same per-document computation
    schedule: str = "batch"
    # replay every TTT step from a CUDA graph of its shape bucket (train.graphs): the non-strict ledger; a global
    # pass (phased TTT) trains the base weights in place, so the graphs stay, and are captured again only when a pass
    # replaced tensors they read (the first pass on an int6 model).
    # On a CPU device the same bucketed steps run eagerly (logged and reported; the CLI refuses the flag there)
    cuda_graphs: bool = False
    # the CUDA graphs' window buckets: multiples of this many positions (None: max(chunk, window / 8), 256 for the
    # records' chunk 48 / window 2048). Finer buckets pad less but need more graphs, each warmed and captured
    # (~0.26 s apiece on an H200, records' recipe); the records' 1/8 share under the batch schedule, counted on the CPU
    # (python3 -m bench.schedule_work): 256 -> 256.2 M replayed positions over 22 buckets, 96 -> 243.2 M over 37,
    # 48 -> 240.0 M over 58 (235.4 M real)
    graph_window_step: Optional[int] = None
    # when each CUDA graph is captured: "ahead" (before the first scored step: one synthetic warm step per graph, then
    # the capture) or "first-use" (at the first step of its bucket and kind, which runs without a graph and is that
    # graph's warm step: no synthetic step, train.graphs). The records' 1/8 share spent 17.2-20.4 s on the 119
    # synthetic warm steps ahead (H200); first-use is not yet timed on its own on a GPU
    graph_capture: str = "ahead"
    # a (bucket, kind) that the plan meets in fewer steps than this is not captured: its steps run the same body
    # without a graph. Why: on the records' 1/8 share 22 of the 64 planned graphs serve 3 steps or fewer (13 serve
    # one) (python3 -m bench.schedule_work); preparing one cost 0.19-0.22 s (warm step + capture, H200), a step
    # without its graph costs at most its host time more, and a whole compiled step without graphs took 0.066 s
    # in the warm-up's second pass. 1: every planned graph is captured
    graph_min_steps: int = 3
    # the adapters' optimizer step in one pass per parameter (pgolf_kernels.adam_rows: 28 bytes of traffic per
    # parameter instead of ~88 for the torch ops; the records' recipe steps 320.9 M fp32 parameters every TTT step,
    # 9.0 GB instead of ~28 GB). None: on for the kernel path, off for --reference (the baseline's plain torch ops)
    fused_optimizer: Optional[bool] = None
    # the MLP as pgolf_kernels.linear_act.mlp_leaky_sq: leaky_relu(h)² in the up-projection's epilogue and its
    # derivative in the backward's first GEMM, with the up / down adapters merged into per-row weights
    # E = W + s·B·A (an int6 model's MLP codes dequantized per call; up and down both adapted or neither). None: on
    # for the kernel path when the MLP carries an adapter (the records' recipe: the "mlp" target; or up and down
    # both) and its shapes allow, off otherwise (the seeds' recipe) and for --reference. Measured in the records' TTT
    # step (H100, bench/results/profile-ttt-h100.md measurement 5): GPU time 92.65 -> 89.01 ms per step; its eval
    # scores as the unfused MLP's on a GPU (tests/test_fused_mlp.py, H100)
    fused_mlp: Optional[bool] = None
    # q and k's per-head RMSNorm, q_gain and rotary in one pass each (pgolf_kernels.head_norm_rope: x read once,
    # the rotated tile written once, in the projections' (B, T, H, D) order). None: on for the kernel path when the
    # head dim is twice a power of two, off for --reference (the baseline's plain torch ops). Measured in the
    # records' TTT step (H100, bench/results/profile-ttt-h100.md): 112.81 -> 103.32 ms
    fused_qk: Optional[bool] = None
    # the block's two residual sites as pgolf_kernels.linear_residual: x + scale ⊙ (proj(y) + s·(h Aᵀ) Bᵀ) in one GEMM
    # with the o / mlp adapters' expand in the same accumulator and the residual add in its epilogue (the projection's
    # output and the LoRA delta are never written). None: on for the kernel path where model_dim, the MLP width and
    # the rank are multiples of 8, off for --reference. Measured in the records' TTT step (H100,
    # bench/results/profile-ttt-h100.md measurement 3): 100.48 -> 97.62 ms
    fused_residual: Optional[bool] = None
    # LoRA scale: delta = (alpha / rank) * (x A^T) B^T; None = scale 1 (the seeds' adapters)
    alpha: Optional[float] = None
    # "adam": Adam (L2-free); "adamw": Adam with decoupled weight decay p <- p * (1 - lr * wd) first
    optimizer: str = "adam"
    weight_decay: float = 0.0
    # keep A across document resets (only B is zeroed): an adapter row's A carries over from the
    # documents that row held before (so a document's scores then depend on its batch mates' history)
    warm_start_a: bool = False
    # the last block at the scored positions only (GPT.hidden(..., keep=)): K and V still see the whole window,
    # the last block's attention queries, output projection and MLP and the head run on the chunk's C positions
    # instead of the window's T (records' recipe: 48 of up to 2,048; ~80 % of one block of 11 fewer FLOPs). Same scores
    # and gradients up to rounding (CPU and GPU tests). H200, records' recipe: 111.06 -> 106.33 ms per full step; on in
    # that recipe, off by default: it compiles one more function, which the seeds' recipe would not win back
    # (docs/drivers.md)
    tail_block: bool = False
    # phased TTT (train.phased): the phase_docs longest documents in `phases` phases, a global SGD pass
    # on the base weights after each; 0 phases = off
    phases: int = 0
    phase_docs: int = 0
    global_lr: float = 1e-3
    global_momentum: float = 0.9
    global_clip: float = 1.0          # max global grad norm; 0 = no clipping
    global_seq_len: int = 2048        # training sequence: a piece of one document (never crosses a BOS)
    global_batch_seqs: int = 32       # sequences per micro-batch of a step (memory only: one step per chunk)
    global_chunk_tokens: int = 32768  # one SGD step per chunk of this many targets (cosine lr over the chunks)
    # True (the record): phase p's global pass trains on every document scored in phases 0..p;
    # False: on phase p's documents only
    phase_cumulative: bool = True

    def __post_init__(self):
        bad = [t for t in self.targets if t not in TARGETS]
        if bad or not self.targets:
            raise ValueError(f"targets: unknown or empty {bad or list(self.targets)}; expected a non-empty subset "
                             f"of {','.join(TARGETS)}")
        if len(set(self.targets)) != len(self.targets):
            raise ValueError(f"targets: {list(self.targets)} names a target twice")
        if not 1 <= self.rank <= MAX_RANK:
            raise ValueError(f"rank: {self.rank}; expected an integer in [1, {MAX_RANK}]")
        if self.alpha is not None and not (self.alpha > 0 and math.isfinite(self.alpha)):
            raise ValueError(f"alpha: {self.alpha}; expected a finite number > 0 (scale = alpha / rank)")
        if not 0 < self.chunk <= self.window:
            raise ValueError(f"need 0 < chunk ({self.chunk}) <= window ({self.window})")
        if self.schedule not in ("batch", "rolling"):
            raise ValueError(f"TTT schedule must be 'batch' or 'rolling', got {self.schedule!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size: {self.batch_size}; expected >= 1")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer: {self.optimizer!r}; expected one of {', '.join(OPTIMIZERS)}")
        for name in ("lr", "weight_decay", "global_lr", "global_momentum", "global_clip"):
            v = getattr(self, name)
            if not (v >= 0 and math.isfinite(v)):
                raise ValueError(f"{name}: {v}; expected a finite number >= 0")
        if self.weight_decay > 0 and self.optimizer != "adamw":
            raise ValueError(f"weight_decay: {self.weight_decay} needs optimizer 'adamw' (decoupled decay), "
                             f"got {self.optimizer!r}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError(f"beta1, beta2: ({self.beta1}, {self.beta2}); expected each in [0, 1)")
        if not self.eps > 0:
            raise ValueError(f"eps: {self.eps}; expected > 0")
        gws = self.graph_window_step
        if gws is not None and (isinstance(gws, bool) or not isinstance(gws, int) or not 1 <= gws <= self.window):
            raise ValueError(f"graph_window_step: {gws!r}; expected None or a whole number of positions in "
                             f"1..window ({self.window})")
        gms = self.graph_min_steps
        if isinstance(gms, bool) or not isinstance(gms, int) or gms < 1:
            raise ValueError(f"graph_min_steps: {gms!r}; expected a whole number of steps >= 1 (1: capture every "
                             f"planned graph)")
        if self.fused_optimizer not in (None, True, False):
            raise ValueError(f"fused_optimizer: {self.fused_optimizer!r}; expected None (auto), True or False")
        if self.fused_mlp is not None and not isinstance(self.fused_mlp, bool):
            raise ValueError(f"fused_mlp: {self.fused_mlp!r}; expected None (auto), True or False")
        if self.fused_residual is not None and not isinstance(self.fused_residual, bool):
            raise ValueError(f"fused_residual: {self.fused_residual!r}; expected None (auto), True or False")
        if self.fused_qk is not None and not isinstance(self.fused_qk, bool):
            raise ValueError(f"fused_qk: {self.fused_qk!r}; expected None (auto), True or False")
        if self.fused_mlp and (("up" in self.targets) != ("down" in self.targets)):
            raise ValueError(f"fused_mlp: needs both 'up' and 'down' in targets or neither (the fused MLP merges both "
                             f"adapters into per-row weights), got targets {tuple(self.targets)}")
        if self.graph_capture not in GRAPH_CAPTURE:
            raise ValueError(f"graph_capture: {self.graph_capture!r}; expected one of {', '.join(GRAPH_CAPTURE)}")
        if not isinstance(self.tail_block, bool):
            raise ValueError(f"tail_block: {self.tail_block!r}; expected True or False")
        if self.phases < 0 or self.phase_docs < 0:
            raise ValueError(f"phases ({self.phases}) and phase_docs ({self.phase_docs}) must be >= 0")
        if self.phases > 0 and self.phase_docs < self.phases:
            raise ValueError(f"phase_docs: {self.phase_docs}; expected >= phases ({self.phases}), every phase needs "
                             f"a document")
        for name in ("global_seq_len", "global_batch_seqs", "global_chunk_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: {getattr(self, name)}; expected >= 1")

    @property
    def scale(self) -> float:
        """The LoRA output scale: alpha / rank, or 1 without alpha."""
        return 1.0 if self.alpha is None else float(self.alpha) / self.rank


RECIPES = {
    "seeds": dict(window=1024),
    "records": dict(rank=96, alpha=144.0, targets=("q", "k", "v", "o", "mlp", "head"), chunk=48, window=2048,
                    batch_size=64, optimizer="adamw", lr=1e-4, beta1=0.0, beta2=0.999, eps=1e-10, weight_decay=1.0,
                    warm_start_a=True, phases=3, phase_docs=2000, global_lr=1e-3, global_momentum=0.9,
                    global_clip=1.0, global_seq_len=2048, global_batch_seqs=32, global_chunk_tokens=32768,
                    phase_cumulative=True,
                    # the eval's own settings for this recipe, as case (c) was measured (H200): the last block at
                    # the scored chunk (111.06 -> 106.33 ms per step) and window buckets every 96 positions
                    # (243.2 M replayed positions on the 1/8 share against 256.2 M at the default 256)
                    tail_block=True, graph_window_step=96),
}


def recipe(name: str, **overrides) -> TTTConfig:
    """The named recipe's TTTConfig, with ``overrides`` (fields set explicitly) applied on top."""
    if name not in RECIPES:
        raise ValueError(f"recipe: {name!r}; expected one of {', '.join(RECIPES)}")
    fields = {f.name for f in dataclasses.fields(TTTConfig)}
    unknown = set(overrides) - fields
    if unknown:
        raise ValueError(f"recipe overrides: unknown fields {sorted(unknown)}")
    merged = {**RECIPES[name], **overrides}
    merged["graph_window_step"] = fit_window_step(merged.get("graph_window_step"),
                                                  merged.get("window", TTTConfig.window),
                                                  given="graph_window_step" in overrides)
    return TTTConfig(**merged)


def fit_window_step(step: Optional[int], window: int, *, given: bool) -> Optional[int]:
    """The CUDA graphs' window-bucket step for ``window``: a recipe's step belongs to the recipe's own window, so
    one above a smaller window given later falls back to the default rule (None); a step the user gave is kept
    as given (``TTTConfig`` then refuses it by name if it does not fit)."""
    if given or step is None or step <= window:
        return step
    return None
