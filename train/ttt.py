"""Legal score-first evaluation: flat / sliding windows and per-document batched LoRA TTT.

Vocabulary. The validation stream ``tok`` (N tokens) is a concatenation of documents ``[BOS] + text``.
A *sequence* is a span of the stream starting at stream index ``s`` with ``n`` targets: target
``t in [0, n)`` is the token at stream index ``s + 1 + t``, predicted from ``tok[s : s + 1 + t]``.

* per-document modes: one sequence per document (``s`` = its BOS), so BOS tokens are never targets
  and no context crosses a document boundary; N - n_docs targets.
* flat / sliding modes: the whole stream is one sequence (``s = 0``), as in the baseline's eval;
  N - 1 targets (BOS targets add loss and 0 bytes).

Every mode is a list of *rows*. A row scores the targets ``[a, b)`` of one sequence from the window
of inputs ``tok[s + w : s + b]`` with ``w = max(0, b - window)``; the scored targets sit at window
positions ``a - w ... b - w - 1`` (the window's tail). Rows are independent unless TTT links them.

* flat:    chunks of ``window`` targets (every target sees the context since its window start).
* sliding: the first chunk has ``window`` targets, then chunks of ``stride``: every target after the
           first window has at least ``window - stride`` tokens of context.
* ttt:     chunks of ``chunk`` targets per document, ``window`` of context; documents sorted by length
           (longest first) in batches of ``batch_size``; for chunk c of every document of a batch:
           forward the windows, **score** the chunk's targets (recorded in the ``ScoreLedger`` and
           summed into the BPB), then one Adam step on
               L = sum_docs mean_{t in chunk} NLL_t        (docs whose last chunk this is excluded)
           on per-document LoRA adapters (A: Kaiming-uniform from a hash of the document's id, B: 0;
           reset in place per batch, Adam state too). Summing per-document means keeps documents
           independent: the gradient of document i's adapters depends on document i only, Adam is
           elementwise and its step count is the chunk index, and the initial adapter depends only
           on the document, so a document's scores do not depend on the batch size, its batch mates
           or the rank that processed it (tested: batch sizes 1/3/4, 1 vs 2 ranks).
* chunked: the stream (as in flat / sliding) cut into chunks of 2K-64K targets; per chunk, its sliding
           rows are scored with ONE shared Q/V LoRA, then that adapter trains on the scored chunk for
           several epochs (never on the last chunk); see ``chunked_ttt``.

Legality is structural: the score of a chunk is taken from the forward pass that precedes the
update computed from it (the update only ever uses losses already recorded), each target is
recorded exactly once (``ScoreLedger`` raises or counts a violation on a second record), and the
training step asserts that every target in its loss was recorded before. The scoring forward and
the training forward are the same pass (the NLL is detached for scoring before ``backward``), which
is the same math as a separate no-grad forward followed by a training forward, at half the cost.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .bpb import BPBAccumulator, ByteLUT

BOS_ID = 1


class LegalityError(RuntimeError):
    """A target was scored twice, never scored, or trained on before it was scored."""


# ------------------------------------------------------------------------------------------- ledger
class ScoreLedger:
    """Counts how often every stream position was scored, on the device, without host syncs.

    ``record(pos, mask)`` adds 1 to ``count[pos]`` for the masked positions and counts a violation
    for any position whose count is now != 1 (scored before, or twice in this call).
    ``require_scored(pos, mask)`` counts a violation for any masked position never recorded
    (used by the training step on the targets of its loss). ``strict=True`` raises at once (tests);
    otherwise ``check()`` raises at the end of the eval (one sync). ``keep_nll=True`` also keeps the
    recorded NLL per position (tests compare scores across runs).
    """

    def __init__(self, n_positions: int, device="cpu", *, strict: bool = False, keep_nll: bool = False):
        self.n = int(n_positions)
        self.device = torch.device(device)
        # slot n is a sink for masked-out entries (no data-dependent shapes, hence no syncs)
        self.count = torch.zeros(self.n + 1, dtype=torch.int32, device=self.device)
        self.double_scored = torch.zeros((), dtype=torch.int64, device=self.device)
        self.trained_unscored = torch.zeros((), dtype=torch.int64, device=self.device)
        self.strict = strict
        self.nll = torch.full((self.n + 1,), float("nan"), dtype=torch.float64, device=self.device) if keep_nll else None
        self.n_records = 0
        self.n_train_checks = 0
        # multi-rank chunked TTT: counts of the chunks already scored on *every* rank (all-reduced per
        # chunk by ``publish``) so that ``require_scored`` sees scores taken by other ranks; None = local counts
        self.published: Optional[torch.Tensor] = None

    def _idx(self, pos: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.where(mask, pos, torch.full_like(pos, self.n)).reshape(-1)

    def record(self, pos: torch.Tensor, mask: torch.Tensor, nll: Optional[torch.Tensor] = None) -> None:
        idx = self._idx(pos, mask)
        m = mask.reshape(-1)
        self.count.index_add_(0, idx, m.to(torch.int32))
        bad = ((self.count[idx] != 1) & m).sum()
        self.double_scored += bad
        if self.nll is not None and nll is not None:
            self.nll[idx[m]] = nll.detach().reshape(-1)[m].to(torch.float64)
        self.n_records += 1
        if self.strict and int(bad):
            raise LegalityError(f"{int(bad)} target(s) scored more than once (record #{self.n_records})")

    def publish(self, lo: int, hi: int) -> None:
        """All-reduce the counts of positions [lo, hi) into ``published`` (the other ranks' scores of a
        chunk become visible to ``require_scored``). No-op without an initialized multi-rank group."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return
        if self.published is None:
            self.published = torch.zeros_like(self.count)
        buf = self.count[lo:hi].clone()
        dist.all_reduce(buf)
        self.published[lo:hi] = buf

    def require_scored(self, pos: torch.Tensor, mask: torch.Tensor) -> None:
        idx = self._idx(pos, mask)
        m = mask.reshape(-1)
        seen = self.count if self.published is None else self.published
        bad = ((seen[idx] == 0) & m).sum()
        self.trained_unscored += bad
        self.n_train_checks += 1
        if self.strict and int(bad):
            raise LegalityError(f"training step #{self.n_train_checks} uses {int(bad)} target(s) not scored yet")

    def all_reduce(self) -> None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            for t in (self.count, self.double_scored, self.trained_unscored):
                dist.all_reduce(t)

    def check(self, expected: Optional[torch.Tensor] = None) -> Dict[str, int]:
        """Raise LegalityError on any violation; ``expected`` (bool, n) = positions that must be
        scored exactly once (coverage). Returns counts for the report."""
        c = self.count[: self.n]
        info = {"double_scored": int(self.double_scored), "trained_unscored": int(self.trained_unscored),
                "scored": int((c > 0).sum())}
        if expected is not None:
            exp = expected.to(c.device)
            info["missing"] = int(((c == 0) & exp).sum())
            info["unexpected"] = int(((c > 0) & ~exp).sum())
            info["multi"] = int((c > 1).sum())
        bad = {k: v for k, v in info.items() if k != "scored" and v}
        if bad:
            raise LegalityError(f"score ledger violations: {bad}")
        return info


# ------------------------------------------------------------------------------------ planning
def split_docs(tokens: torch.Tensor, bos_id: int = BOS_ID) -> Tuple[np.ndarray, np.ndarray]:
    """Document starts (BOS stream indices) and target counts. A stream not starting with BOS gets a
    first document starting at 0. Documents with no targets are dropped."""
    t = tokens.detach().cpu().numpy() if isinstance(tokens, torch.Tensor) else np.asarray(tokens)
    starts = np.flatnonzero(t == bos_id)
    if t.size and (starts.size == 0 or starts[0] != 0):
        starts = np.concatenate([[0], starts])
    ends = np.concatenate([starts[1:], [t.size]])
    n = ends - starts - 1
    keep = n > 0
    return starts[keep].astype(np.int64), n[keep].astype(np.int64)


def chunk_bounds(n: int, chunk: int, first: Optional[int] = None) -> List[Tuple[int, int]]:
    """[a, b) chunks covering [0, n): the first of ``first`` (default ``chunk``) targets, then ``chunk``."""
    out, a = [], 0
    step = first or chunk
    while a < n:
        b = min(n, a + step)
        out.append((a, b))
        a, step = b, chunk
    return out


def plan_rows(starts: Sequence[int], ns: Sequence[int], chunk: int, window: int,
              first: Optional[int] = None) -> np.ndarray:
    """All rows (s, a, b) of independent chunked scoring (flat, sliding, per-doc no-TTT)."""
    if chunk > window or (first or chunk) > window:
        raise ValueError(f"chunk ({first or chunk}) must not exceed window ({window})")
    starts = np.asarray(starts, dtype=np.int64).reshape(-1)
    ns = np.asarray(ns, dtype=np.int64).reshape(-1)
    if first is not None and first != chunk:
        rows = [(s, a, b) for s, n in zip(starts, ns) for a, b in chunk_bounds(int(n), chunk, first)]
        return np.asarray(rows, dtype=np.int64).reshape(-1, 3)
    # vectorized (1.3 M rows for the official set at chunk 48): chunk c of a sequence = [cC, min((c+1)C, n))
    k = -(-ns // chunk)
    seq = np.repeat(np.arange(ns.size), k)
    c = np.arange(int(k.sum()), dtype=np.int64) - np.repeat(np.cumsum(k) - k, k)
    a = c * chunk
    b = np.minimum(a + chunk, ns[seq])
    return np.stack([starts[seq], a, b], 1)


def plan_doc_batches(ns: np.ndarray, batch_size: int) -> List[np.ndarray]:
    """Document indices sorted by target count, longest first (balances ranks: the longest work is
    claimed first and the short tail evens out the finish), cut into batches of ``batch_size``."""
    order = np.argsort(-ns, kind="stable")
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


# ---------------------------------------------------------------------------- row forward
@dataclass
class RowBatch:
    """Device tensors for one forward over R rows (see module docstring)."""

    x: torch.Tensor      # (R, L) int64 window inputs (0-padded past each row's length)
    sel: torch.Tensor    # (R, C) window positions of the scored targets (clamped)
    y: torch.Tensor      # (R, C) int64 scored targets
    pos: torch.Tensor    # (R, C) stream positions of the scored targets
    mask: torch.Tensor   # (R, C) bool: slot holds a real target


def build_rows(stream: torch.Tensor, rows: np.ndarray, window: int, pad_to: int = 1, min_size: int = 1) -> RowBatch:
    """rows (R, 3) = (s, a, b) on the host -> device RowBatch (one small host->device copy).

    ``min_size``: at least that many rows and score slots (padding rows / slots are masked out). The
    eval uses 2: a compiled forward specializes sizes 0 and 1, so a 1-row or 1-target step would
    otherwise recompile every block mid-eval (measured on the H200: ~15-25 s per variant)."""
    n_real = len(rows)
    if n_real < min_size:
        rows = np.concatenate([rows, np.repeat(rows[:1], min_size - n_real, 0)])
    s, a, b = rows[:, 0], rows[:, 1], rows[:, 2]
    w = np.maximum(0, b - window)
    L = int((b - w).max())
    L = -(-L // pad_to) * pad_to
    C = max(int((b - a).max()), min_size)
    meta = torch.from_numpy(np.stack([s + w, b - w, a - w, b - a, s + 1 + a], 1))
    dev = stream.device
    if dev.type == "cuda":
        meta = meta.pin_memory().to(dev, non_blocking=True)
    else:
        meta = meta.to(dev)
    base, ln, off, cnt, p0 = meta.unbind(1)
    ar_L = torch.arange(L, device=dev)
    ar_C = torch.arange(C, device=dev)
    valid = ar_L[None] < ln[:, None]
    gi = torch.where(valid, base[:, None] + ar_L[None], 0)
    x = torch.where(valid, stream[gi], 0)
    mask = ar_C[None] < cnt[:, None]
    if n_real < len(rows):
        mask[n_real:] = False
    sel = torch.where(mask, off[:, None] + ar_C[None], 0)
    pos = torch.where(mask, p0[:, None] + ar_C[None], 0)
    y = torch.where(mask, stream[pos], 0)
    return RowBatch(x, sel, y, pos, mask)


def head_nll(model, h: torch.Tensor, sel: torch.Tensor, y: torch.Tensor, adapter=None) -> torch.Tensor:
    """NLL (R, C) fp32 of targets y at window positions sel, from the full soft-capped softmax.

    Same math as ``GPT.forward(..., target_ids)`` restricted to the scored positions (the head and
    the cross-entropy are computed only where a score is taken: 1/4 of the window at chunk 256).
    """
    d = h.size(-1)
    hs = torch.gather(h, 1, sel[..., None].expand(-1, -1, d))
    if adapter is not None:
        raw = adapter.head(hs, model)
    else:
        raw = F.linear(hs, model.head_weight().to(hs.dtype))
    logits = raw.float()
    cap = model.config.logit_softcap
    if cap > 0:
        logits = cap * torch.tanh(logits / cap)
    nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1), reduction="none")
    return nll.view(y.shape)


def _row_forward(model, x, sel, y, adapter):
    return head_nll(model, model.hidden(x, adapter), sel, y, adapter)


def rows_nll(model, rb: RowBatch, adapter=None) -> torch.Tensor:
    """NLL (R, C) of a RowBatch: eager, or the compiled forward that ``compile_rows_nll`` attached."""
    fwd = getattr(model, "_pgolf_rows_nll", None) or _row_forward
    return fwd(model, rb.x, rb.sel, rb.y, adapter)


def compile_rows_nll(model, enable: bool = True) -> None:
    """Regional torch.compile for every later ``rows_nll`` on ``model`` (scoring and TTT steps, both
    backends): each transformer ``Block`` and the head/NLL are compiled; embedding, skips and the
    final norm stay eager (a handful of ops). ``enable=False`` undoes it.

    Why regional: the 11 blocks share one compiled code (adapters reach a block as a per-layer view,
    ``DocLoRA.layer(i)``, not as an index), so compile time is one block's, not the model's; a
    whole-model compile took 52 s (reference) / 116 s (kernels) per graph variant on the H200, and
    the eval needs several (grad / no-grad, adapter / none). Dynamic shapes without duck sizing: rows
    and window length change every step, and a window of 512 or 1024 positions must not be
    specialized just because it equals d_model or the vocabulary size.
    Why compile at all: eager, a B64 x 1024 TTT step on the H200 spent ~50 of its 86 GPU-ms in ~900
    unfused elementwise kernels (RMSNorm, RoPE, residual mixes, LeakyReLU^2); the reference step took
    85.4 ms eager, 41.7 ms with a whole-model compile, 45.7 ms with this regional one (kernel path
    49.4 ms), whose first call compiled in 3-48 s instead of 52-116 s (bench/results/profile-ttt-h200.md).
    """
    if not (hasattr(model, "hidden") and hasattr(model, "blocks") and len(model.blocks) > 0):
        raise TypeError(f"compile_rows_nll: model must be a train.model.GPT (with .hidden and .blocks), "
                        f"got {type(model).__name__}")
    blocks = list(model.blocks)
    if not enable:
        for b in blocks:
            b.__dict__.pop("forward", None)
        model.__dict__.pop("_pgolf_rows_nll", None)
        return
    import types

    import torch._dynamo
    import torch.fx.experimental._config as fx_config

    fx_config.use_duck_shape = False
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 32))
    # Separate compiled functions with and without an adapter: one cache entry's guards never see the
    # other kind (torch 2.13 crashed building a recompile reason for an adapter-less call against an
    # adapter graph's aliasing guard). Graph variants left: grad / no-grad, and block 0's input not
    # requiring grad.
    plain = torch.compile(_block_plain, dynamic=True)
    adapted = torch.compile(_block_adapted, dynamic=True)
    head_plain = torch.compile(_head_plain, dynamic=True)
    head_adapted = torch.compile(_head_adapted, dynamic=True)

    def block_forward(self, x, x0, adapter=None):
        if x is x0:  # block 0: an aliasing guard would otherwise split off a graph for it
            x0 = x0.clone()
        return plain(self, x, x0) if adapter is None else adapted(self, x, x0, adapter)

    for b in blocks:
        b.forward = types.MethodType(block_forward, b)

    def fwd(model, x, sel, y, adapter):
        h = model.hidden(x, adapter)
        return head_plain(model, h, sel, y) if adapter is None else head_adapted(model, h, sel, y, adapter)

    model.__dict__["_pgolf_rows_nll"] = fwd


def _block_plain(block, x, x0):
    return type(block).forward(block, x, x0, None)


def _block_adapted(block, x, x0, adapter):
    return type(block).forward(block, x, x0, adapter)


def _head_plain(model, h, sel, y):
    return head_nll(model, h, sel, y, None)


def _head_adapted(model, h, sel, y, adapter):
    return head_nll(model, h, sel, y, adapter)


# ---------------------------------------------------------------------------------- adapters
@dataclass
class TTTConfig:
    rank: int = 8
    targets: Tuple[str, ...] = ("q", "v", "head")
    chunk: int = 256
    window: int = 1024
    batch_size: int = 64
    lr: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    seed: int = 1234
    # True: score each chunk from its own no-grad forward, then run a second forward with grad for
    # the update (the literal two-pass recipe). False (default): score from the detached NLL of the
    # training forward itself -- the same values before any update, one forward instead of two
    # (tested equal in tests/test_compliance.py).
    separate_score_pass: bool = False
    # "batch": whole batches of batch_size documents, reset together (the seeds' loop); "rolling": rows
    # refilled with new documents as documents finish (ttt_rolling), same per-document computation
    schedule: str = "batch"

    def __post_init__(self):
        bad = set(self.targets) - {"q", "k", "v", "head"}
        if bad:
            raise ValueError(f"TTT targets must be among q, k, v, head; got {sorted(bad)}")
        if not 0 < self.chunk <= self.window:
            raise ValueError(f"need 0 < chunk ({self.chunk}) <= window ({self.window})")
        if self.schedule not in ("batch", "rolling"):
            raise ValueError(f"TTT schedule must be 'batch' or 'rolling', got {self.schedule!r}")
        if self.rank < 1 or self.batch_size < 1:
            raise ValueError(f"rank ({self.rank}) and batch_size ({self.batch_size}) must be >= 1")


def _lora_backend(name: str):
    """'kernel' -> pgolf_kernels.lora.multi_lora_linear if importable, else None (reference bmm)."""
    if name != "kernel":
        return None
    try:
        from pgolf_kernels.lora import multi_lora_linear  # noqa: F401

        return multi_lora_linear
    except Exception:
        return None


_M32 = 0xFFFFFFFF


def _hash_uniform(ids: torch.Tensor, elem: torch.Tensor, seed: int) -> torch.Tensor:
    """Counter-based uniforms in [0, 1) (float32, 24-bit resolution): shape (n_A, len(ids), E).

    x = (id * 0x9E3779B1 + elem * 0x85EBCA6B + seed) mod 2^32, then two rounds of the
    xorshift-multiply mixer x = ((x >> 16) ^ x) * 0x45D9F3B mod 2^32 and a final x ^= x >> 16.
    All products stay below 2^63 (ids < 2^31, elem < 2^31, multipliers < 2^32), so int64 torch
    arithmetic is exact on every device.
    """
    x = ids.view(1, -1, 1) % (1 << 31) * 0x9E3779B1
    x = x + (elem * 0x85EBCA6B + (seed * 0x27D4EB2F) % (1 << 31))
    x.bitwise_and_(_M32)
    for _ in range(2):
        x.bitwise_xor_(x >> 16)
        x.mul_(0x45D9F3B)
        x.bitwise_and_(_M32)
    x.bitwise_xor_(x >> 16)
    return (x >> 8).to(torch.float32).mul_(1.0 / (1 << 24))


class DocLoRA:
    """Per-document LoRA on Q/K/V (every layer) and the LM head, one adapter row per document.

    delta(x) = (x @ A[doc]^T) @ B[doc]^T, A (n_docs, r, in) Kaiming-uniform (bound 1/sqrt(in)),
    B (n_docs, out, r) zero, so a reset adapter is exactly the base model. Parameters are fp32; the
    products run in the activation dtype. ``rows`` (R,) maps the forward's rows to adapter rows.

    backend 'bmm' (the ``--reference`` path): torch.bmm on gathered adapters. backend 'kernel':
    ``pgolf_kernels.lora.multi_lora_linear`` fused with the base projections (int6 codes or bf16),
    falling back to 'bmm' when the kernel module is absent (``self.backend`` says which ran).
    """

    def __init__(self, model, cfg: TTTConfig, n_docs: int, device, backend: str = "bmm"):
        mc = model.config
        d = mc.model_dim
        hd = d // mc.num_heads
        outs = {"q": mc.num_heads * hd, "k": mc.num_kv_heads * hd, "v": mc.num_kv_heads * hd}
        self.cfg = cfg
        self.n_docs = n_docs
        self.layer_targets = [t for t in ("q", "k", "v") if t in cfg.targets]
        self.A: Dict[str, List[torch.Tensor]] = {}
        self.B: Dict[str, List[torch.Tensor]] = {}
        for t in self.layer_targets:
            self.A[t] = [torch.empty(n_docs, cfg.rank, d, device=device) for _ in range(mc.num_layers)]
            self.B[t] = [torch.empty(n_docs, outs[t], cfg.rank, device=device) for _ in range(mc.num_layers)]
        if "head" in cfg.targets:
            self.A["head"] = [torch.empty(n_docs, cfg.rank, d, device=device)]
            self.B["head"] = [torch.empty(n_docs, mc.vocab_size, cfg.rank, device=device)]
        self.params = [p for k in self.A for p in self.A[k] + self.B[k]]
        for p in self.params:
            p.requires_grad_(True)
        self.rows: Optional[torch.Tensor] = None
        self._kernel = _lora_backend(backend)
        self.backend = "kernel" if self._kernel is not None else "bmm"
        self._A_list = [a for k in self.A for a in self.A[k]]
        self._B_list = [b for k in self.B for b in self.B[k]]
        self._device = torch.device(device)
        # element index of every A entry, (n_A, 1, r*d): all A tensors share the shape (n_docs, r, d)
        n_a, rd = len(self._A_list), cfg.rank * d
        self._elem = (torch.arange(n_a, device=device)[:, None, None] * (rd + 1)
                      + torch.arange(rd, device=device)[None, None, :])
        self._bound = 1.0 / math.sqrt(d)
        self._layers = [_DocLoRALayer(self, {t: self.A[t][i] for t in self.layer_targets},
                                      {t: self.B[t][i] for t in self.layer_targets}) for i in range(mc.num_layers)]
        self.reset(np.arange(n_docs))

    @torch.no_grad()
    def reset(self, doc_ids) -> None:
        """In place, for adapter rows 0..len(doc_ids)-1 holding documents ``doc_ids`` (any unique
        int ids < 2^31, e.g. the documents' BOS stream positions): A = bound * (2u - 1) with
        u = hash(seed, doc id, element) in [0, 1), bound = 1/sqrt(d) (Kaiming-uniform, a = sqrt(5));
        B = 0 (a reset adapter is exactly the base model); gradients cleared.

        The initial adapter of a document depends only on the document and the seed -- not on the
        batch, its size, the row, or the rank -- so a document's scores are the same however the
        documents are batched or distributed (tested). About 15 launches per reset, no allocation
        of parameters (the hash temporaries come from the caching allocator).
        """
        ids = torch.full((self.n_docs,), -1, dtype=torch.int64)
        di = torch.as_tensor(np.asarray(doc_ids, dtype=np.int64))
        ids[: di.numel()] = di
        ids[di.numel():] = -1 - torch.arange(self.n_docs - di.numel())  # padding rows: distinct dummies
        ids = ids.to(self._device, non_blocking=True)
        u = _hash_uniform(ids, self._elem, int(self.cfg.seed))  # (n_A, n_docs, r*d) in [0, 1)
        u.mul_(2 * self._bound).sub_(self._bound)
        torch._foreach_copy_(self._A_list, [t.view_as(self._A_list[0]) for t in u.unbind(0)])
        torch._foreach_zero_(self._B_list)
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def reset_rows(self, rows, doc_ids) -> None:
        """``reset`` for some adapter rows only (the rolling schedule refills rows one by one): row
        rows[j] gets document doc_ids[j]'s initial adapter, the same values ``reset`` would give it."""
        rows_np, ids_np = np.asarray(rows, dtype=np.int64).reshape(-1), np.asarray(doc_ids, dtype=np.int64).reshape(-1)
        if rows_np.size != ids_np.size:
            raise ValueError(f"reset_rows: rows ({rows_np.size}) and doc_ids ({ids_np.size}) must have the same length")
        if rows_np.size and (rows_np.min() < 0 or rows_np.max() >= self.n_docs or np.unique(rows_np).size != rows_np.size):
            raise ValueError(f"reset_rows: rows must be distinct adapter rows in [0, {self.n_docs}), got {rows_np.tolist()}")
        rows = torch.from_numpy(rows_np).to(self._device)
        ids = torch.from_numpy(ids_np).to(self._device)
        u = _hash_uniform(ids, self._elem, int(self.cfg.seed))  # (n_A, len(rows), r*d)
        u.mul_(2 * self._bound).sub_(self._bound)
        for a, t in zip(self._A_list, u.unbind(0)):
            a.index_copy_(0, rows, t.view(-1, *a.shape[1:]))
        for b in self._B_list:
            b.index_fill_(0, rows, 0.0)

    def set_rows(self, rows: Optional[torch.Tensor]) -> None:
        self.rows = rows

    def _sel(self, p: torch.Tensor, dtype) -> torch.Tensor:
        p = p if self.rows is None else p.index_select(0, self.rows)
        return p.to(dtype)

    def _shared(self) -> bool:
        # one adapter for every row (chunked TTT): no per-row gather needed
        return self.n_docs == 1 and self.rows is None

    def _delta(self, x, A, B):
        if self._shared():  # (x A0^T) B0^T: two plain GEMMs, autograd sums the rows' gradients
            return F.linear(F.linear(x, A[0].to(x.dtype)), B[0].to(x.dtype))
        return torch.bmm(torch.bmm(x, self._sel(A, x.dtype).transpose(1, 2)), self._sel(B, x.dtype).transpose(1, 2))

    def _index(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """adapter_index for the kernel: the row map, or zeros (n_adapters = 1) for a shared adapter."""
        if self._shared() and x.shape[0] > 1:
            return torch.zeros(x.shape[0], dtype=torch.int64, device=x.device)
        return self.rows

    def layer(self, i: int) -> "_DocLoRALayer":
        """Block i's view (the model's per-layer adapter hook): holds that layer's tensors, no index,
        so one compiled block serves every layer (``compile_rows_nll``)."""
        return self._layers[i]

    def qkv(self, i: int, h: torch.Tensor, attn):
        return self._layers[i].qkv(h, attn)

    def head(self, h: torch.Tensor, model) -> torch.Tensor:
        W = model.head_weight()
        if "head" not in self.A:
            return F.linear(h, W.to(h.dtype))
        if self._kernel is not None:
            return self._kernel(h, [W.to(h.dtype)], self.A["head"], self.B["head"], adapter_index=self._index(h),
                                check_values=False)[0]
        return F.linear(h, W.to(h.dtype)) + self._delta(h, self.A["head"][0], self.B["head"][0])


class _DocLoRALayer:
    """One block's Q/K/V adapters of a ``DocLoRA`` (``parent`` holds the row map and the backend)."""

    def __init__(self, parent: DocLoRA, A: Dict[str, torch.Tensor], B: Dict[str, torch.Tensor]):
        self.parent, self.A, self.B = parent, A, B

    def qkv(self, h: torch.Tensor, attn):
        ad = self.parent
        mods = {"q": attn.c_q, "k": attn.c_k, "v": attn.c_v}
        ts = ad.layer_targets
        if ad._kernel is not None:
            bases = [_base_weight(mods[t], h.dtype) for t in ts]
            # check_values=False: the range check of adapter_index is a host sync per call (rows are
            # built by the driver from the batch's own document indices, in range by construction)
            outs = ad._kernel(h, bases, [self.A[t] for t in ts], [self.B[t] for t in ts],
                              adapter_index=ad._index(h), check_values=False)
            res = dict(zip(ts, outs))
            return tuple(res[t] if t in res else mods[t](h) for t in ("q", "k", "v"))
        out = []
        for t in ("q", "k", "v"):
            y = mods[t](h)
            if t in self.A:
                y = y + ad._delta(h, self.A[t], self.B[t])
            out.append(y)
        return tuple(out)


def _base_weight(mod, dtype):
    """The base weight of a projection for multi_lora_linear: an ``Int6Linear``'s codes as a
    ``QTensor`` (never dequantized in memory), else the dense weight in the activation dtype."""
    if all(hasattr(mod, a) for a in ("q", "scale", "bits")) and not hasattr(mod, "weight"):
        from pgolf_kernels.quant import QTensor

        return QTensor(mod.q, mod.scale, int(mod.bits))
    return mod.weight if mod.weight.dtype == dtype else mod.weight.to(dtype)


class BatchedAdam:
    """Adam (PyTorch's formula, no weight decay) over a fixed list of tensors, reset in place.

    m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;  p -= lr/(1-b1^t) * m / (sqrt(v/(1-b2^t)) + eps).
    Elementwise, so stacking every document's adapter rows in one tensor is per-document Adam.
    """

    def __init__(self, params: List[torch.Tensor], lr: float, betas=(0.9, 0.95), eps: float = 1e-8,
                 per_row: bool = False):
        """``per_row``: every parameter's dim 0 is the adapter row, and each row keeps its own step
        count t (bias corrections per row), so rows can be reset independently (``reset_rows``)."""
        self.params = params
        self.lr, self.b1, self.b2, self.eps = lr, betas[0], betas[1], eps
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.t = 0
        self.row_t = None
        if per_row:
            rows = {p.shape[0] if p.dim() else None for p in params}
            if len(rows) != 1 or None in rows:
                raise ValueError(f"BatchedAdam(per_row=True): every parameter needs the same dim 0 (the adapter "
                                 f"row), got {[tuple(p.shape) for p in params]}")
            self.row_t = torch.zeros(params[0].shape[0], dtype=torch.float64, device=params[0].device)

    @torch.no_grad()
    def reset(self) -> None:
        torch._foreach_zero_(self.m)
        torch._foreach_zero_(self.v)
        self.t = 0
        if self.row_t is not None:
            self.row_t.zero_()

    @torch.no_grad()
    def reset_rows(self, rows) -> None:
        if self.row_t is None:
            raise ValueError("BatchedAdam.reset_rows needs per_row=True")
        rows = torch.as_tensor(np.asarray(rows, dtype=np.int64)).to(self.row_t.device)
        for buf in self.m + self.v:
            buf.index_fill_(0, rows, 0.0)
        self.row_t.index_fill_(0, rows, 0.0)

    @torch.no_grad()
    def step(self) -> None:
        ps = [p for p in self.params if p.grad is not None]
        if not ps:
            return
        idx = [i for i, p in enumerate(self.params) if p.grad is not None]
        m = [self.m[i] for i in idx]
        v = [self.v[i] for i in idx]
        g = [p.grad for p in ps]
        self.t += 1
        if self.row_t is not None:
            self._step_per_row(ps, m, v, g)
            return
        torch._foreach_lerp_(m, g, 1 - self.b1)
        torch._foreach_mul_(v, self.b2)
        torch._foreach_addcmul_(v, g, g, value=1 - self.b2)
        bc1 = 1 - self.b1 ** self.t
        bc2 = 1 - self.b2 ** self.t
        denom = torch._foreach_sqrt(v)
        torch._foreach_div_(denom, math.sqrt(bc2))
        torch._foreach_add_(denom, self.eps)
        torch._foreach_addcdiv_(ps, m, denom, value=-self.lr / bc1)
        for p in ps:
            p.grad = None

    def _step_per_row(self, ps, m, v, g) -> None:
        """The same formula with t, 1-b1^t and 1-b2^t per row (broadcast over each row's elements)."""
        self.row_t += 1
        torch._foreach_lerp_(m, g, 1 - self.b1)
        torch._foreach_mul_(v, self.b2)
        torch._foreach_addcmul_(v, g, g, value=1 - self.b2)
        step = (-self.lr / (1 - self.b1 ** self.row_t)).float()   # (rows,)
        rbc2 = (1 - self.b2 ** self.row_t).sqrt().float()          # (rows,)
        for p, mi, vi in zip(ps, m, v):
            shape = (-1,) + (1,) * (p.dim() - 1)
            denom = vi.sqrt().div_(rbc2.view(shape)).add_(self.eps)
            p.addcdiv_(mi * step.view(shape), denom)
        for p in ps:
            p.grad = None


# ------------------------------------------------------------------------------------ scorer
@dataclass
class EvalState:
    """What a scoring pass accumulates (one per rank; all-reduced at the end)."""

    acc: BPBAccumulator
    ledger: ScoreLedger
    bytes_at: torch.Tensor  # (N,) bytes of the target at each stream position
    docs_ttt: int = 0
    docs_base: int = 0
    steps: int = 0
    positions: int = 0      # window positions run through the model (work measure)


def stream_bytes_table(stream: torch.Tensor, lut: ByteLUT) -> torch.Tensor:
    """bytes_at[p] = bytes of target tok[p] after tok[p-1] (p >= 1; bytes_at[0] = 0), int16."""
    lut = lut.to(stream.device)
    out = torch.zeros_like(stream, dtype=torch.int16)
    if stream.numel() > 1:
        out[1:] = lut.target_bytes(stream[:-1], stream[1:]).to(torch.int16)
    return out


def make_state(stream: torch.Tensor, lut: ByteLUT, *, strict=False, keep_nll=False) -> EvalState:
    return EvalState(BPBAccumulator(stream.device), ScoreLedger(stream.numel(), stream.device, strict=strict,
                                                                   keep_nll=keep_nll),
                     stream_bytes_table(stream, lut))


def _score(st: EvalState, rb: RowBatch, nll: torch.Tensor) -> None:
    """The only place a score is taken: ledger first, then the BPB sums."""
    st.ledger.record(rb.pos, rb.mask, nll)
    st.acc.add(nll, st.bytes_at[rb.pos], rb.mask)


@torch.no_grad()
def score_rows(model, stream: torch.Tensor, rows: np.ndarray, window: int, st: EvalState,
               max_positions: int = 1 << 16, pad_to: int = 64, adapter=None) -> None:
    """Score independent rows (flat, sliding, per-doc no-TTT, a chunk of chunked TTT) in batches of
    <= max_positions window positions (65,536 = the seeds' 64 docs x 1024: fits with room on an 80 GB
    GPU). ``adapter``: a shared adapter (chunked TTT) applied to every row, or None (base model)."""
    if len(rows) == 0:
        return
    spans = rows[:, 2] - np.maximum(0, rows[:, 2] - window)  # window length of each row
    order = np.argsort(-spans, kind="stable")  # similar lengths together: little padding
    i = 0
    while i < len(order):
        L = int(spans[order[i]])
        n = max(1, max_positions // max(L, 1))
        idx = order[i:i + n]
        rb = build_rows(stream, rows[idx], window, pad_to, min_size=2)
        nll = rows_nll(model, rb, adapter)
        _score(st, rb, nll)
        st.steps += 1
        st.positions += int(rb.x.numel())
        i += n


def _ttt_step(model, stream: torch.Tensor, rows: np.ndarray, row_map: np.ndarray, train_rows: np.ndarray,
              cfg: TTTConfig, adapter: DocLoRA, opt: BatchedAdam, st: EvalState, pad_to: int,
              train_hook: Optional[Callable]) -> None:
    """One score-first step: forward the rows (s, a, b), score them, then one Adam step on the rows
    marked in ``train_rows`` (documents whose last chunk this is are never trained on).
    ``row_map[j]``: adapter row of rows[j]. Rows and slots are padded to >= 2 (see build_rows): a lone
    row gets a masked padding row on another adapter row (its loss weight and gradient are 0)."""
    dev = stream.device
    min_size = 2 if adapter.n_docs >= 2 else 1
    rb = build_rows(stream, rows, cfg.window, pad_to, min_size=min_size)
    if len(row_map) < rb.x.shape[0]:
        row_map = np.concatenate([row_map, [1 if row_map[0] != 1 else 0]])
        train_rows = np.concatenate([train_rows, [False]])
    do_train = bool(train_rows.any())
    # always a row map (also when it is the identity): one compiled graph for every step
    adapter.set_rows(torch.from_numpy(np.ascontiguousarray(row_map)).to(dev, non_blocking=True))
    if cfg.separate_score_pass:
        with torch.no_grad():
            _score(st, rb, rows_nll(model, rb, adapter))
        if do_train:
            nll = rows_nll(model, rb, adapter)
    else:
        with torch.set_grad_enabled(do_train):
            nll = rows_nll(model, rb, adapter)
        _score(st, rb, nll)  # scored from this forward, before any update that uses it
    st.steps += 1
    st.positions += int(rb.x.numel())
    if do_train:
        tmask = rb.mask & torch.from_numpy(train_rows).to(dev, non_blocking=True)[:, None]
        st.ledger.require_scored(rb.pos, tmask)
        w = tmask.float() / tmask.sum(1, keepdim=True).clamp_min(1)
        loss = (nll * w).sum()
        if train_hook is not None:
            train_hook(rb, tmask, loss)
        loss.backward()
        opt.step()


def ttt_batch(model, stream: torch.Tensor, starts: np.ndarray, ns: np.ndarray, docs: np.ndarray,
              cfg: TTTConfig, adapter: DocLoRA, opt: BatchedAdam, st: EvalState, batch_index: int = 0,
              pad_to: int = 64, train_hook: Optional[Callable] = None) -> None:
    """Score-first TTT over one batch of documents (indices ``docs`` into starts/ns; documents sorted
    longest first). ``batch_index`` only labels the batch (logs, tests): a document's adapter init is
    keyed by its own BOS position, so results do not depend on batching."""
    s = starts[docs]
    adapter.reset(s)
    opt.reset()
    n = ns[docs]
    n_chunks = -(-n // cfg.chunk)
    for c in range(int(n_chunks.max())):
        live = np.flatnonzero(n_chunks > c)  # documents with targets left (sorted: a prefix shrinking)
        a = np.full(live.size, c * cfg.chunk, dtype=np.int64)
        b = np.minimum(a + cfg.chunk, n[live])
        _ttt_step(model, stream, np.stack([s[live], a, b], 1), live, n_chunks[live] > c + 1, cfg, adapter, opt,
                  st, pad_to, train_hook)
    adapter.set_rows(None)
    st.docs_ttt += len(docs)


def ttt_rolling(model, stream: torch.Tensor, starts: np.ndarray, ns: np.ndarray, claim: Callable[[], Optional[np.ndarray]],
                cfg: TTTConfig, adapter: DocLoRA, opt: BatchedAdam, st: EvalState, pad_to: int = 64,
                refill_below: float = 0.5, train_hook: Optional[Callable] = None) -> None:
    """Score-first TTT with rows refilled as documents finish (``--schedule rolling``).

    Same per-document computation as ``ttt_batch`` -- each document's adapter row is reset to its own
    initial adapter and its own Adam state (``opt`` must be ``per_row``: step count per row), its
    chunk k is scored then trained at Adam step k+1, its gradient depends on its own loss only -- but
    a row is given the next document (from ``claim()``, which returns a batch of document indices or
    None when there are no more) once fewer than ``refill_below`` x rows are live. Why: with whole
    batches, the 64 longest documents of a share left 333 sequential steps with few live rows, 37 of
    68 s of a 1/8 share on the H200 (bench/results/eval-h200.md); here those steps carry other
    documents too. Windows of fresh documents are padded to the longest row of the step.
    """
    if opt.row_t is None:
        raise ValueError("ttt_rolling needs BatchedAdam(..., per_row=True)")
    R = adapter.n_docs
    slot_doc = np.full(R, -1, dtype=np.int64)
    slot_c = np.zeros(R, dtype=np.int64)
    n_chunks = -(-ns // cfg.chunk)
    queue: List[int] = []
    exhausted = False
    adapter.reset(np.zeros(0, dtype=np.int64))
    opt.reset()
    while True:
        live = np.flatnonzero(slot_doc >= 0)
        if not exhausted and live.size < max(1.0, refill_below * R):
            free = np.flatnonzero(slot_doc < 0)
            while len(queue) < free.size and not exhausted:
                docs = claim()
                if docs is None:
                    exhausted = True
                else:
                    queue.extend(int(d) for d in docs)
            take = min(free.size, len(queue))
            if take:
                rows, new = free[:take], np.asarray(queue[:take], dtype=np.int64)
                del queue[:take]
                slot_doc[rows], slot_c[rows] = new, 0
                adapter.reset_rows(rows, starts[new])
                opt.reset_rows(rows)
                live = np.flatnonzero(slot_doc >= 0)
        if live.size == 0:
            break
        d, c = slot_doc[live], slot_c[live]
        a = c * cfg.chunk
        b = np.minimum(a + cfg.chunk, ns[d])
        _ttt_step(model, stream, np.stack([starts[d], a, b], 1), live, n_chunks[d] > c + 1, cfg, adapter, opt,
                  st, pad_to, train_hook)
        slot_c[live] += 1
        done = live[slot_c[live] >= n_chunks[d]]
        slot_doc[done] = -1
        st.docs_ttt += int(done.size)
    adapter.set_rows(None)


def ttt_positions(ns: np.ndarray, chunk: int, window: int, first: Optional[int] = None) -> int:
    """Window positions the chunked scoring of sequences with ``ns`` targets runs (work estimate):
    sum over chunks of min(chunk end, window)."""
    ns = np.asarray(ns, dtype=np.int64).reshape(-1)
    if first is not None and first != chunk:
        return int(sum(b - max(0, b - window) for n in ns for a, b in chunk_bounds(int(n), chunk, first)))
    k = -(-ns // chunk)                      # chunks per sequence
    m = np.minimum(k - 1, window // chunk)   # full chunks j = 1..k-1 whose end j*C is still <= window
    full = chunk * m * (m + 1) // 2 + (k - 1 - m) * window
    return int((full + np.minimum(ns, window)).sum())


# ------------------------------------------------------------------------------ chunked TTT
@dataclass
class ChunkedConfig:
    """Chunked score-first TTT (PR #550 style), see ``chunked_ttt``.

    chunk_tokens: targets per chunk (2,048-65,536; the records' 32,768). rank: the shared LoRA's rank
    (1-8). epochs: training passes over each scored chunk. lr: Adam's peak lr, cosine-decayed to 0 over
    all training steps of the eval. window / stride: scoring context and stride (sliding windows as in
    ``--mode sliding``; stride = window is flat scoring); window None = the model's seq_len.
    train_len: training window (None = the model's seq_len). batch_seqs: training windows per
    optimizer step (32 x 2048 as in the records: one step per epoch of a 32,768-token chunk).
    """

    chunk_tokens: int = 32768
    rank: int = 8
    epochs: int = 3
    lr: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    window: Optional[int] = None
    stride: int = 64
    train_len: Optional[int] = None
    batch_seqs: int = 32
    targets: Tuple[str, ...] = ("q", "v")
    seed: int = 1234

    def __post_init__(self):
        if not 2048 <= self.chunk_tokens <= 65536:
            raise ValueError(f"chunk_tokens must be in [2048, 65536], got {self.chunk_tokens}")
        if not 1 <= self.rank <= 8:
            raise ValueError(f"rank (the shared LoRA's rank) must be in [1, 8], got {self.rank}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if not (self.lr >= 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a finite number >= 0, got {self.lr}")
        if self.batch_seqs < 1:
            raise ValueError(f"batch_seqs must be >= 1, got {self.batch_seqs}")
        bad = set(self.targets) - {"q", "k", "v"}
        if bad or not self.targets:
            raise ValueError(f"chunked TTT targets must be a non-empty subset of q, k, v; got {self.targets}")
        for name in ("window", "train_len"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"{name} must be >= 1 (or None for the model's seq_len), got {v}")
        if self.stride < 1 or (self.window is not None and self.stride > self.window):
            raise ValueError(f"stride must be in [1, window], got stride {self.stride}, window {self.window}")

    def resolved(self, model) -> "ChunkedConfig":
        """window / train_len filled in from the model's seq_len; stride capped at the window."""
        import dataclasses

        sl = int(model.config.seq_len)
        w = self.window or sl
        return dataclasses.replace(self, window=w, train_len=self.train_len or sl, stride=min(self.stride, w))


def chunked_plan(n_targets: int, chunk: int, window: int, stride: int) -> List[Tuple[int, int, np.ndarray]]:
    """[(c0, c1, rows)] for the chunks [c0, c1) of the targets 0..n-1 of the stream-as-one-sequence.

    rows (R, 3) = (0, a, b): the sliding-window rows (first row ``window`` targets, then ``stride``)
    cut at the chunk boundaries, so no row straddles two chunks. A row keeps its window ending at its
    own end b, so every target still has >= window - stride tokens of context (when chunk and window
    are multiples of stride, no row is cut and the contexts are exactly those of ``--mode sliding``).
    """
    n = int(n_targets)
    if n <= 0:
        return []
    bnd = np.unique(np.concatenate([[0], np.arange(window, n, stride), np.arange(chunk, n, chunk), [n]]))
    a, b = bnd[:-1], bnd[1:]
    rows = np.stack([np.zeros_like(a), a, b], 1).astype(np.int64)
    c0s = np.arange(0, n, chunk)
    cut = np.searchsorted(a, c0s)
    out = []
    for i, c0 in enumerate(c0s):
        hi = cut[i + 1] if i + 1 < len(cut) else len(rows)
        out.append((int(c0), int(min(n, c0 + chunk)), rows[cut[i]:hi]))
    return out


def chunk_train_batches(c0: int, c1: int, train_len: int, batch_seqs: int) -> List[np.ndarray]:
    """Training windows of chunk [c0, c1): rows (0, a, b) with [a, b) consecutive pieces of
    ``train_len`` targets (the last one shorter; its window still reaches ``train_len`` back), in
    batches of ``batch_seqs`` rows (one optimizer step each)."""
    a = np.arange(c0, c1, train_len, dtype=np.int64)
    rows = np.stack([np.zeros_like(a), a, np.minimum(a + train_len, c1)], 1)
    return [rows[i:i + batch_seqs] for i in range(0, len(rows), batch_seqs)]


def cosine_lr(lr: float, step: int, total: int) -> float:
    """lr * (1 + cos(pi * step / total)) / 2 for step 0..total-1: starts at lr, decays towards 0."""
    return lr * 0.5 * (1.0 + math.cos(math.pi * step / max(total, 1)))


def _all_reduce_grads(params: List[torch.Tensor]) -> None:
    """Sum the gradients over ranks (one flat all-reduce); a rank without windows contributes zeros."""
    import torch.distributed as dist

    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    dist.all_reduce(flat)
    o = 0
    for p in params:
        k = p.numel()
        p.grad = flat[o:o + k].view_as(p)
        o += k


def chunked_ttt(model, stream: torch.Tensor, cc: ChunkedConfig, st: EvalState, *, backend: str = "bmm",
                rank: int = 0, world: int = 1, deadline: Optional[float] = None, clock=None,
                log=print, train_hook: Optional[Callable] = None, pad_to: int = 64) -> Dict[str, object]:
    """Chunked score-first TTT over the stream-as-one-sequence (targets = stream positions 1..N-1).

    For chunk c = 0, 1, ..., K-1 (targets [c0, c1)):
      1. **score**: every target of the chunk, once, under no-grad with the current shared adapter
         (sliding rows of ``chunked_plan``; recorded in the ledger and summed into the BPB);
      2. **train** (c < K-1 only: the last chunk is never trained on): ``epochs`` passes over the
         chunk's training windows; per batch of windows one Adam step on
             L = mean_{targets t of the batch} NLL_t
         with lr_k = cosine_lr(lr, k, total_steps), k counting steps over the whole eval.
    The adapter is ONE rank-r LoRA on ``targets`` (Q/V) of every layer shared by every row
    (``DocLoRA`` with n_docs = 1: plain GEMMs on the bmm path, ``multi_lora_linear`` with
    adapter_index = 0 on the kernel path), A Kaiming-uniform (hash init), B = 0.
    Multi-epoch is legal here because every training target was scored in step 1 before any epoch:
    each step's targets pass ``ledger.require_scored`` first, and scores are taken only in step 1.

    Multi-rank (``world`` > 1, torch.distributed initialized): the chunks stay sequential (the adapter
    is shared); rank r scores rows r, r+W, ... of each chunk (rows cost about the same), the chunk's
    ledger counts are all-reduced (``ledger.publish``) so the training check sees every rank's
    scores, and in each training step rank r runs windows r, r+W, ... of the batch, divides its NLL
    sum by the batch's global target count and the gradients are summed by one all-reduce: every
    rank applies the same Adam step to the same adapter. The deadline decision is all-reduced (MAX)
    so that all ranks stop training together.

    Deadline: before training chunk c, if the estimated training time of chunk c (rate measured on
    earlier chunks) plus the scoring of the remaining chunks does not fit, training stops for good;
    the remaining chunks are scored with the adapter as it is (still legal, still every target once).
    """
    import torch.distributed as dist

    clock = clock or __import__("time").perf_counter
    dev = stream.device
    cc = cc.resolved(model)
    n = stream.numel() - 1
    plan = chunked_plan(n, cc.chunk_tokens, cc.window, cc.stride)
    tcfg = TTTConfig(rank=cc.rank, targets=tuple(cc.targets), chunk=1, window=max(cc.window, cc.train_len),
                     batch_size=1, lr=cc.lr, beta1=cc.beta1, beta2=cc.beta2, eps=cc.eps, seed=cc.seed)
    adapter = DocLoRA(model, tcfg, 1, dev, backend)
    adapter.reset([0])
    opt = BatchedAdam(adapter.params, cc.lr, (cc.beta1, cc.beta2), cc.eps)
    batches = [chunk_train_batches(c0, c1, cc.train_len, cc.batch_seqs) for c0, c1, _ in plan]
    total = cc.epochs * sum(len(b) for b in batches[:-1])
    step = 0
    trained = 0
    stop_training = False
    score_rate = train_rate = None  # window positions / s, measured
    dist_on = world > 1 and dist.is_available() and dist.is_initialized()
    for c, (c0, c1, rows) in enumerate(plan):
        t = clock()
        mine = rows[rank::world]
        score_rows(model, stream, mine, cc.window, st, pad_to=pad_to, adapter=adapter)
        _sync_dev(dev)
        pos = float(np.sum(rows[:, 2] - np.maximum(0, rows[:, 2] - cc.window))) / world
        score_rate = pos / max(clock() - t, 1e-9)
        if c == len(plan) - 1:
            break  # the last chunk is never trained on
        st.ledger.publish(c0 + 1, c1 + 1)  # stream positions of targets c0..c1-1
        if not stop_training and deadline is not None:
            now = clock()
            tpos = cc.epochs * -(-(c1 - c0) // cc.train_len) * cc.train_len / world  # full windows: an upper bound
            rest = sum(float(np.sum(r[:, 2] - np.maximum(0, r[:, 2] - cc.window))) for _, _, r in plan[c + 1:]) / world
            need = (tpos / train_rate if train_rate else 0.0) + 1.25 * rest / score_rate
            flag = torch.tensor([1.0 if now + need > deadline else 0.0], device=dev)
            if dist_on:
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if float(flag) > 0:
                stop_training = True
                log(f"[eval] deadline: training stops before chunk {c} of {len(plan)}; the remaining chunks are "
                    f"scored with the adapter as trained so far")
        if stop_training:
            continue
        t = clock()
        tpos = 0
        for _ in range(cc.epochs):
            for b in batches[c]:
                mine = b[rank::world]
                n_glob = int((b[:, 2] - b[:, 1]).sum())
                opt.lr = cosine_lr(cc.lr, step, total)
                if len(mine):
                    rb = build_rows(stream, mine, cc.train_len, pad_to)
                    st.ledger.require_scored(rb.pos, rb.mask)  # every target of the loss was scored before
                    nll = rows_nll(model, rb, adapter)
                    loss = (nll * rb.mask).sum() / n_glob
                    if train_hook is not None:
                        train_hook(rb, rb.mask, loss)
                    loss.backward()
                    tpos += int(rb.x.numel())
                if dist_on:
                    _all_reduce_grads(adapter.params)
                opt.step()
                step += 1
                st.steps += 1
        _sync_dev(dev)
        st.positions += tpos
        train_rate = tpos / max(clock() - t, 1e-9)
        trained += 1
    return {"chunks": len(plan), "chunks_trained": trained, "train_steps": step, "total_train_steps": total,
            "lora_backend": adapter.backend, "chunk_tokens": cc.chunk_tokens, "epochs": cc.epochs,
            "lora_rank": cc.rank, "window": cc.window, "stride": cc.stride, "train_len": cc.train_len,
            "batch_seqs": cc.batch_seqs, "lr": cc.lr}


def _sync_dev(dev) -> None:
    if torch.device(dev).type == "cuda":
        torch.cuda.synchronize(dev)
