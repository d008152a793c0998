"""Per-document LoRA adapters of the TTT eval (``DocLoRA``) and their deterministic initialization.

Why not ``pgolf_kernels.lora.BatchedLoRALinear``: that Module is one bank of adapters for the slices
of one layer, initialized from the global RNG. The eval needs (1) adapters for every layer AND the
head in one object, handed to each transformer block as a per-layer view without an index
(``DocLoRA.layer(i)``), so the 11 blocks share one compiled graph (``train.forward.compile_rows_nll``);
(2) an initial adapter that is a function of the document's id alone (a counter-based hash,
``_hash_uniform``), so a document's scores do not depend on its batch, row or rank; (3) rows reset one
by one (rolling schedule). Both use the same op, ``pgolf_kernels.lora.multi_lora_linear``, for the
fused path, so the math lives in one place.
"""
from __future__ import annotations

import importlib.util
import math
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .ttt_config import TTTConfig


def resolve_lora_backend(name: str, device) -> Tuple[Optional[Callable], str, str]:
    """-> (op or None, backend name, reason). ``name`` 'bmm': torch.bmm on gathered adapters.
    'kernel': ``pgolf_kernels.lora.multi_lora_linear``. The one accepted reason to run 'bmm' when
    'kernel' was asked for is a CUDA device without Triton installed (the fused kernels cannot be
    built there); the reason is returned for the log and the report. Any other failure to import the
    op (a broken kernel module) raises: a broken kernel must show up as an error, never as "slower".
    """
    if name not in ("kernel", "bmm"):
        raise ValueError(f"LoRA backend must be 'kernel' or 'bmm', got {name!r}")
    if name == "bmm":
        return None, "bmm", "requested"
    if torch.device(device).type == "cuda" and importlib.util.find_spec("triton") is None:
        return None, "bmm", "kernel requested but Triton is not installed: LoRA deltas run as torch.bmm"
    from pgolf_kernels.lora import multi_lora_linear

    return multi_lora_linear, "kernel", "requested"


def fused_choices(model, cfg: TTTConfig, backend: str) -> Tuple[bool, bool, bool]:
    """(fused_qk, fused_residual, fused_mlp) of a TTT forward on ``backend`` ("kernel" or "bmm", as resolved by
    ``resolve_lora_backend``): the config's True / False where the model allows it (refused by name where it does
    not), else (None, auto) the kernel path's choice. ``DocLoRA`` and ``base_view`` both ask here, so the global
    passes run the fused ops the TTT steps run."""
    mc = model.config
    d = mc.model_dim
    hd = d // mc.num_heads
    hidden = mc.mlp_mult * d
    qk_ok = hd % 2 == 0 and (hd // 2) & (hd // 2 - 1) == 0   # head_norm_rope's rotary halves: a power of two
    if cfg.fused_qk and not qk_ok:
        raise ValueError(f"fused_qk: needs the head dim ({hd}) twice a power of two (pgolf_kernels.head_norm_rope)")
    # auto (None): the kernel path takes it where the head dim allows; the reference keeps the torch ops
    fused_qk = bool(cfg.fused_qk) if cfg.fused_qk is not None else (backend == "kernel" and qk_ok)
    res_ok = not (d % 8 or hidden % 8 or cfg.rank % 8)  # the kernel's TMA row strides: 16 bytes at 2-byte dtypes
    if cfg.fused_residual and not res_ok:
        raise ValueError(f"fused_residual: needs model_dim ({d}), the MLP width ({hidden}) and the rank "
                         f"({cfg.rank}) multiples of 8 (pgolf_kernels.linear_residual)")
    # auto (None): the kernel path takes it where the shapes allow; the reference keeps the torch ops
    fused_residual = (bool(cfg.fused_residual) if cfg.fused_residual is not None
                      else (backend == "kernel" and res_ok))
    mlps = [m for m in model.modules() if hasattr(m, "fc") and hasattr(m, "proj") and hasattr(m, "slope")]
    bad = [type(l).__name__ for m in mlps for l in (m.fc, m.proj)
           if not (_is_int6(l) or isinstance(getattr(l, "weight", None), torch.Tensor))]
    strides_ok = not (d % 8 or hidden % 8)  # the kernels' TMA row strides: 16 bytes at 2-byte activations
    if cfg.fused_mlp and (not mlps or bad):
        raise ValueError(f"fused_mlp: needs the model's MLP projections as dense weights (.weight) or int6 "
                         f"codes (.q, .scale); found {bad or 'no MLP'}")
    if cfg.fused_mlp and not strides_ok:
        raise ValueError(f"fused_mlp: needs model_dim ({d}) and the MLP width ({hidden}) multiples of 8")
    # auto (None): the kernel path takes it where it was measured to pay, a step whose MLP carries an adapter
    # (the records' recipe: the "mlp" target; or up and down both) and where the model allows; the reference
    # keeps the torch ops, and so does an MLP without adapters (the seeds' recipe: not measured). Its eval matched
    # the unfused MLP's on a GPU (tests/test_fused_mlp.py, H100, logs/gpu-tests-fused-mlp-kernel-graphs-h100.txt)
    up, down = "up" in cfg.targets, "down" in cfg.targets
    mlp_ok = bool(mlps) and not bad and strides_ok and up == down
    fused_mlp = (bool(cfg.fused_mlp) if cfg.fused_mlp is not None
                 else (backend == "kernel" and mlp_ok and ("mlp" in cfg.targets or up)))
    return fused_qk, fused_residual, fused_mlp


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


LAYER_TARGETS = ("q", "k", "v", "o", "mlp", "up", "down")


def _o_fold_from_env() -> bool:
    """PGOLF_O_FOLD: unset or "1" = the o adapter's shrink inside the q / k / v op (``_DocLoRALayer.qkv_o``), its input
    gradient summed with theirs in one kernel; "0" = its own bmm at the attention's residual site."""
    from pgolf_kernels._utils import env_choice

    return env_choice("PGOLF_O_FOLD", {"1": "the o shrink inside the q / k / v op", "0": "the o shrink as its own "
                                       "bmm"}) == "1"


# On by default: in the records' step on an H200 (bench/results/profile-ttt-h200.md, measurement 10) the shrink
# gradients' bmm du · A 0.97 -> 0.48 ms and the RMSNorm backward that summed it 1.56 -> 1.23 ms, against
# sum_products 2.94 -> 3.43 ms and the o adapter's dA in fp32 (+0.47 ms, where its bf16 bmm had taken ~0.41): about
# -0.26 ms, the precision of dx and dA_o up (fp32 sums, one rounding); its eval scored as without it, eager and
# under CUDA graphs (GPU test, H200). Counted before (H100, measurement 12): ~0.8 ms
O_FOLD: bool = _o_fold_from_env()

_KERNEL_TARGETS = ("q", "k", "v")  # fused with their base projection by multi_lora_linear (and the head)


class DocLoRA:
    """Per-document LoRA on any of q, k, v, o, mlp, up, down (every layer) and the LM head, one adapter
    row per document (targets: ``train.ttt_config.TARGETS``).

    delta(x) = s * (x @ A[doc]^T) @ B[doc]^T with s = alpha / rank (1 without alpha), A (n_docs, r, in)
    Kaiming-uniform (bound 1/sqrt(in)), B (n_docs, out, r) zero, so a reset adapter is exactly the
    base model. Inputs: q/k/v/o read the normed block input, mlp/up the normed MLP input, down the
    MLP activation, head the final-normed hidden state (as the record's ``BatchedTTTLoRA``).
    Parameters are fp32; the products run in the activation dtype. ``rows`` (R,) maps the forward's
    rows to adapter rows.

    backend 'bmm' (the ``--reference`` path): torch.bmm on gathered adapters. backend 'kernel':
    ``pgolf_kernels.lora.multi_lora_linear`` fused with the base projections (int6 codes or bf16) for
    q, k, v and the head; o, mlp, up and down run as bmm on either backend (``bmm_targets``), except that with
    ``fused_residual`` the o, mlp and down adapters' expand runs inside the residual sites' GEMM
    (``pgolf_kernels.linear_residual``). ``identity_rows``: every row map is the prefix 0..R-1 (the batch
    schedule), read as such (no gathers, no index_add).
    ``self.backend`` says which runs and ``self.backend_reason`` why (``resolve_lora_backend``).

    ``cfg.warm_start_a``: ``reset`` keeps A (only B and the gradients are cleared) once A was
    initialized; ``invalidate_a()`` makes the next reset draw A afresh (after the base weights moved).
    """

    def __init__(self, model, cfg: TTTConfig, n_docs: int, device, backend: str = "bmm",
                 identity_rows: bool = False):
        mc = model.config
        d = mc.model_dim
        hd = d // mc.num_heads
        hidden = mc.mlp_mult * d
        dims = {"q": (d, mc.num_heads * hd), "k": (d, mc.num_kv_heads * hd), "v": (d, mc.num_kv_heads * hd),
                "o": (d, d), "mlp": (d, d), "up": (d, hidden), "down": (hidden, d), "head": (d, mc.vocab_size)}
        self.cfg = cfg
        self.n_docs = n_docs
        self.scale = cfg.scale
        self.layer_targets = [t for t in LAYER_TARGETS if t in cfg.targets]
        self.A: Dict[str, List[torch.Tensor]] = {}
        self.B: Dict[str, List[torch.Tensor]] = {}
        for t in self.layer_targets + (["head"] if "head" in cfg.targets else []):
            n = 1 if t == "head" else mc.num_layers
            din, dout = dims[t]
            self.A[t] = [torch.empty(n_docs, cfg.rank, din, device=device) for _ in range(n)]
            self.B[t] = [torch.empty(n_docs, dout, cfg.rank, device=device) for _ in range(n)]
        self.params = [p for k in self.A for p in self.A[k] + self.B[k]]
        for p in self.params:
            p.requires_grad_(True)
        self.rows: Optional[torch.Tensor] = None
        # identity_rows: every row map given to set_rows is the prefix 0..R-1, so row b is adapter row b: no gather
        # of the adapters and no index_add of their gradients. The batch schedule's maps always are
        # (rows.batch_steps: documents sorted longest first, the live ones a shrinking prefix; schedules._ttt_step
        # and graphs.StepGraphs.stage check each map on the host). Off unless asked: the eval and its warm-up turn it
        # on for the batch schedule (``identity_rows_for``). Measured cost of the row map in the records' step on
        # the kernel path (H100, profile-ttt-h100.md measurement 3): 1.29 ms of index_add and 0.58 ms of gathers
        # per step in the LoRA backward alone
        self.identity_rows = bool(identity_rows) and n_docs >= 2
        self._kernel, self.backend, self.backend_reason = resolve_lora_backend(backend, device)
        self.bmm_targets = [t for t in self.layer_targets if t not in _KERNEL_TARGETS or self._kernel is None]
        self._A_list = [a for k in self.A for a in self.A[k]]
        self._B_list = [b for k in self.B for b in self.B[k]]
        self._device = torch.device(device)
        self.fused_qk, self.fused_residual, self.fused_mlp = fused_choices(model, cfg, self.backend)
        # element index of every A entry: A tensor i owns [off_i, off_i + r*in_i), off_i = sum_{j<i} (r*in_j + 1);
        # tensors of one input size form a group initialized by one hash call
        sizes = [a[0].numel() for a in self._A_list]
        offs = np.concatenate([[0], np.cumsum(np.asarray(sizes) + 1)[:-1]]).astype(np.int64)
        self._groups = []  # (indices into _A_list, elem (n_g, 1, r*in), bound)
        for size in sorted(set(sizes)):
            idx = [i for i, z in enumerate(sizes) if z == size]
            elem = (torch.as_tensor(offs[idx], device=device)[:, None, None]
                    + torch.arange(size, device=device)[None, None, :])
            self._groups.append((idx, elem, 1.0 / math.sqrt(self._A_list[idx[0]].shape[-1])))
        # warm-start A: which rows hold a draw since the last invalidate_a (kept by later resets), and the id each
        # row's draw came from (redraw_a restores them)
        self._a_drawn = np.zeros(n_docs, dtype=bool)
        self._a_row_ids = np.full(n_docs, -1, dtype=np.int64)
        self._layers = [_DocLoRALayer(self, {t: self.A[t][i] for t in self.layer_targets},
                                      {t: self.B[t][i] for t in self.layer_targets}) for i in range(mc.num_layers)]
        self.reset(np.arange(n_docs))

    def _draw_a(self, ids: torch.Tensor, rows: Optional[torch.Tensor] = None) -> None:
        """A = bound * (2u - 1), u = hash(seed, doc id, element): all rows (``rows`` None, ids of every
        row) or the given rows."""
        for idx, elem, bound in self._groups:
            u = _hash_uniform(ids, elem, int(self.cfg.seed))  # (n_g, len(ids), r*in) in [0, 1)
            u.mul_(2 * bound).sub_(bound)
            tgt = [self._A_list[i] for i in idx]
            if rows is None:
                torch._foreach_copy_(tgt, [t.view_as(tgt[0]) for t in u.unbind(0)])
            else:
                for a, t in zip(tgt, u.unbind(0)):
                    a.index_copy_(0, rows, t.view(-1, *a.shape[1:]))

    @torch.no_grad()
    def reset(self, doc_ids) -> None:
        """In place, for adapter rows 0..len(doc_ids)-1 holding documents ``doc_ids`` (any unique
        int ids < 2^31, e.g. the documents' BOS stream positions): A = bound * (2u - 1) with
        u = hash(seed, doc id, element) in [0, 1), bound = 1/sqrt(in) (Kaiming-uniform, a = sqrt(5));
        B = 0 (a reset adapter is exactly the base model); gradients cleared. With warm-start A, A is
        drawn only on the first reset (and after ``invalidate_a``); a row that ``reset_rows`` drew keeps its A too.

        Without warm-start, the initial adapter of a document depends only on the document and the
        seed -- not on the batch, its size, the row, or the rank -- so a document's scores are the same
        however the documents are batched or distributed (tested). About 15 launches per reset, no
        allocation of parameters (the hash temporaries come from the caching allocator).
        """
        if not (self.cfg.warm_start_a and self._a_drawn.all()):
            di = np.asarray(doc_ids, dtype=np.int64).reshape(-1)
            ids = np.concatenate([di, -1 - np.arange(self.n_docs - di.size)])  # padding rows: distinct dummies
            self._draw_a(torch.from_numpy(ids).to(self._device, non_blocking=True))
            self._a_row_ids[:], self._a_drawn[:] = ids, True
        torch._foreach_zero_(self._B_list)
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def reset_rows(self, rows, doc_ids) -> None:
        """``reset`` for some adapter rows only (the rolling schedule refills rows one by one): row
        rows[j] gets document doc_ids[j]'s initial adapter, the same values ``reset`` would give it. With warm-start
        A, a row that holds a draw keeps it; one that does not (after ``invalidate_a``) draws from its document's
        id and keeps that A for its later documents, as the batch schedule's rows keep theirs."""
        rows_np, ids_np = np.asarray(rows, dtype=np.int64).reshape(-1), np.asarray(doc_ids, dtype=np.int64).reshape(-1)
        if rows_np.size != ids_np.size:
            raise ValueError(f"reset_rows: rows ({rows_np.size}) and doc_ids ({ids_np.size}) must have the same length")
        if rows_np.size and (rows_np.min() < 0 or rows_np.max() >= self.n_docs or np.unique(rows_np).size != rows_np.size):
            raise ValueError(f"reset_rows: rows must be distinct adapter rows in [0, {self.n_docs}), got {rows_np.tolist()}")
        rows = torch.from_numpy(rows_np).to(self._device)
        new = ~self._a_drawn[rows_np] if self.cfg.warm_start_a else np.ones(rows_np.size, dtype=bool)
        if new.any():
            self._draw_a(torch.from_numpy(ids_np[new]).to(self._device), rows if new.all()
                         else torch.from_numpy(rows_np[new]).to(self._device))
            self._a_row_ids[rows_np[new]], self._a_drawn[rows_np[new]] = ids_np[new], True
        for b in self._B_list:
            b.index_fill_(0, rows, 0.0)

    def invalidate_a(self) -> None:
        """The next reset draws A afresh even with warm-start A (the record rebuilds its adapters after
        every global pass on the base weights)."""
        self._a_drawn[:] = False

    @torch.no_grad()
    def redraw_a(self) -> None:
        """With warm-start A already drawn: A again as that draw made it, after steps that trained it and must leave
        no trace (the synthetic warm steps of the CUDA graphs' preparation), so the eval goes on from the adapters it
        would have had without them. Rows without a draw draw at their next reset anyway and are left as they are."""
        if self.cfg.warm_start_a and self._a_drawn.any():
            rows = np.flatnonzero(self._a_drawn)
            ids = torch.from_numpy(self._a_row_ids[rows]).to(self._device)
            self._draw_a(ids, None if rows.size == self.n_docs else torch.from_numpy(rows).to(self._device))

    def set_rows(self, rows: Optional[torch.Tensor]) -> None:
        """The adapter row of each forward row (R,), or None (row b is adapter b, R = n_docs). With
        ``identity_rows`` the map must be the prefix 0..R-1 (its values are not read: the caller checks it)."""
        self.rows = rows

    def _sel(self, p: torch.Tensor, dtype, n: int) -> torch.Tensor:
        """The adapters of the forward's n rows, in ``dtype``."""
        if self.rows is not None:
            p = p[:n] if self.identity_rows else p.index_select(0, self.rows)
        return p.to(dtype)

    def check_row_map(self, row_map: np.ndarray) -> None:
        """With ``identity_rows``, refuse a host row map that is not the prefix 0..R-1 (it would be read as one)."""
        if self.identity_rows and not np.array_equal(row_map, np.arange(len(row_map))):
            raise RuntimeError(f"DocLoRA(identity_rows=True): row map {np.asarray(row_map).tolist()[:16]} is not the "
                               f"prefix 0..{len(row_map) - 1} (the batch schedule's maps always are)")

    def _shared(self) -> bool:
        # one adapter for every row (chunked TTT): no per-row gather needed
        return self.n_docs == 1 and self.rows is None

    def _delta(self, x, A, B):
        """s * (x A^T) B^T per row (the LoRA delta of one target)."""
        if self._shared():  # (x A0^T) B0^T: two plain GEMMs, autograd sums the rows' gradients
            y = F.linear(F.linear(x, A[0].to(x.dtype)), B[0].to(x.dtype))
        else:
            n = x.shape[0]
            y = torch.bmm(torch.bmm(x, self._sel(A, x.dtype, n).transpose(1, 2)), self._sel(B, x.dtype, n).transpose(1, 2))
        return y if self.scale == 1.0 else y * self.scale

    def _index(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """adapter_index for the kernel: the row map, or zeros (n_adapters = 1) for a shared adapter."""
        if self._shared() and x.shape[0] > 1:
            return torch.zeros(x.shape[0], dtype=torch.int64, device=x.device)
        return None if self.identity_rows else self.rows

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
            return self._kernel(h, [W.to(h.dtype)], self.A["head"], self.B["head"], alpha=self.scale,
                                adapter_index=self._index(h), validate=False)[0]
        return F.linear(h, W.to(h.dtype)) + self._delta(h, self.A["head"][0], self.B["head"][0])


class _DocLoRALayer:
    """One block's adapters of a ``DocLoRA`` (``parent`` holds the row map and the backend)."""

    def __init__(self, parent: DocLoRA, A: Dict[str, torch.Tensor], B: Dict[str, torch.Tensor]):
        self.parent, self.A, self.B = parent, A, B

    def qkv(self, h: torch.Tensor, attn):
        return self.qkv_o(h, attn, fold=False)[:3]

    def qkv_o(self, h: torch.Tensor, attn, fold: bool = True):
        """(q, k, v, u_o): the projections of h with their adapters, and the o adapter's shrink u_o = h · A_o[row]ᵀ
        when it ran inside the q / k / v op (``O_FOLD``, the kernel backend, per-row adapters), else None (the
        attention's residual site forms it). Inside the op, the backward adds du_o · A_o to the input gradient in the
        merged path's one ``sum_products`` with the q / k / v slices (``multi_lora_linear``'s ``shrinks``)."""
        ad = self.parent
        mods = {"q": attn.c_q, "k": attn.c_k, "v": attn.c_v}
        ts = [t for t in ad.layer_targets if t in mods]
        if ad._kernel is not None and ts:
            bases = [_base_weight(mods[t], h.dtype) for t in ts]
            fold = fold and O_FOLD and "o" in self.A and not ad._shared()
            # validate=False: the range check of adapter_index is a host sync per call (rows are
            # built by the driver from the batch's own document indices, in range by construction)
            outs = ad._kernel(h, bases, [self.A[t] for t in ts], [self.B[t] for t in ts], alpha=ad.scale,
                              adapter_index=ad._index(h), validate=False, shrinks=[self.A["o"]] if fold else None)
            res = dict(zip(ts, outs))
            return tuple(res[t] if t in res else mods[t](h) for t in ("q", "k", "v")) + (
                outs[len(ts)] if fold else None,)
        return tuple(self._lin(t, h, mods[t]) for t in ("q", "k", "v")) + (None,)

    def _lin(self, t: str, x: torch.Tensor, mod) -> torch.Tensor:
        y = mod(x)
        return y + self.parent._delta(x, self.A[t], self.B[t]) if t in self.A else y

    def _add(self, t: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y + self.parent._delta(x, self.A[t], self.B[t]) if t in self.A else y

    def attn_out(self, h: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return self._add("o", h, a)

    def up(self, m: torch.Tensor, fc) -> torch.Tensor:
        return self._lin("up", m, fc)

    def down(self, a: torch.Tensor, proj) -> torch.Tensor:
        return self._lin("down", a, proj)

    def mlp_out(self, m: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self._add("mlp", m, y)

    @property
    def fused_mlp(self) -> bool:
        return self.parent.fused_mlp

    @property
    def fused_qk(self) -> bool:
        return self.parent.fused_qk

    @property
    def fused_residual(self) -> bool:
        return self.parent.fused_residual

    def _expand_pair(self, t: str, x: torch.Tensor, u: Optional[torch.Tensor] = None
                     ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Target t's LoRA as the second product of ``linear_residual``: u = x · A[row]ᵀ (B, T, r) and
        w2 = s · B[row] (B, out, r), both in x.dtype (s folded into the cast copy of B, as ``_row_grads`` does).
        ``u`` given (formed elsewhere from the same x, per-row adapters): only w2 is formed."""
        ad = self.parent
        if ad._shared():
            u = F.linear(x, self.A[t][0].to(x.dtype))
            B0 = self.B[t][0] * ad.scale if ad.scale != 1.0 else self.B[t][0]
            w2 = B0.to(x.dtype).expand(x.shape[0], -1, -1).contiguous()
            return u, w2
        if u is None:
            u = torch.bmm(x, ad._sel(self.A[t], x.dtype, x.shape[0]).transpose(1, 2))
        Bs = ad._sel(self.B[t], torch.float32, x.shape[0])
        # inside the compiled block Inductor makes the scale and the cast one pass (lora_merged._scaled_copy does it
        # by hand for the eager custom op)
        return u, (Bs * ad.scale if ad.scale != 1.0 else Bs).to(x.dtype)

    def _residual(self, x: torch.Tensor, a: torch.Tensor, W: torch.Tensor, scale: torch.Tensor,
                  loras) -> torch.Tensor:
        """x + scale ⊙ (a · Wᵀ + Σ lora expands) by ``pgolf_kernels.linear_residual`` (several LoRAs: their u and w2
        concatenated along the rank)."""
        from pgolf_kernels.linear_residual import linear_residual

        u = w2 = None
        if loras:
            u = loras[0][0] if len(loras) == 1 else torch.cat([p[0] for p in loras], -1)
            w2 = loras[0][1] if len(loras) == 1 else torch.cat([p[1] for p in loras], -1)
            u, w2 = u.contiguous(), w2.contiguous()
        return linear_residual(x.contiguous(), a.contiguous(), W.contiguous(), scale.to(x.dtype).contiguous(), u, w2,
                               validate=False)

    def attn_residual(self, x: torch.Tensor, h: torch.Tensor, y: torch.Tensor, proj, scale,
                      u_o: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x + scale ⊙ (proj(y) + LoRA_o(h)): the attention's residual site in one kernel (``fused_residual``);
        y is the attention output before its projection, h the normed block input the o adapter reads; ``u_o`` its
        shrink h · A_oᵀ where ``qkv_o`` formed it."""
        loras = [self._expand_pair("o", h, u_o)] if "o" in self.A else []
        return self._residual(x, y, _dense_weight(proj, x.dtype), scale, loras)

    def mlp_residual(self, x: torch.Tensor, m: torch.Tensor, mod, scale) -> torch.Tensor:
        """x + scale ⊙ (MLP(m) + LoRA_mlp(m)): the MLP's residual site with its down-projection in one kernel
        (``fused_residual``). Unfused MLP: the activation leaky_relu(up(m))² from the torch ops, then the down
        adapter (a LoRA of the activation) and the mlp adapter (of m) both in the second product. With
        ``fused_mlp``: ``pgolf_kernels.linear_residual.mlp_residual`` (the activation in the up-projection's epilogue,
        its derivative in the backward's first GEMM), the up / down adapters merged into per-row weights as ``mlp``
        merges them, the mlp adapter in the second product."""
        if self.fused_mlp:
            from pgolf_kernels.linear_residual import mlp_residual

            W_up, W_dn = _dense_weight(mod.fc, m.dtype), _dense_weight(mod.proj, m.dtype)
            if "up" in self.A:  # TTTConfig: up and down both adapted, or neither
                W_up, W_dn = self._merged("up", W_up), self._merged("down", W_dn)
            u, w2 = self._expand_pair("mlp", m) if "mlp" in self.A else (None, None)
            return mlp_residual(x.contiguous(), m.contiguous(), W_up.contiguous(), W_dn.contiguous(),
                                scale.to(x.dtype).contiguous(), float(mod.slope),
                                None if u is None else u.contiguous(), None if w2 is None else w2.contiguous(),
                                validate=False)
        act = F.leaky_relu(self.up(m, mod.fc), mod.slope).square()
        loras = [self._expand_pair(t, src) for t, src in (("down", act), ("mlp", m)) if t in self.A]
        return self._residual(x, act, _dense_weight(mod.proj, x.dtype), scale, loras)

    def _merged(self, t: str, W: torch.Tensor) -> torch.Tensor:
        """W + s·B·A for target t: (out, in) for a shared adapter, else (R, out, in), one per forward row, by
        ``pgolf_kernels.lora_merged.merged_weight`` (one launch reading the fp32 adapters of the rows in place, as
        the q / k / v merged path builds its E; gradients to A and B)."""
        from pgolf_kernels.lora_merged import merged_weight

        ad = self.parent
        if ad._shared():
            return torch.addmm(W, self.B[t][0].to(W.dtype), self.A[t][0].to(W.dtype), alpha=ad.scale)
        return merged_weight(W, self.A[t], self.B[t], ad.scale, ad.rows)

    def mlp(self, m: torch.Tensor, mod) -> torch.Tensor:
        """The MLP of ``mod`` (``train.model.MLP``) with its up / down adapters, through ``mlp_leaky_sq``: same
        function as ``down(act(up(m)))`` up to rounding (the adapters merged into per-row weights, as
        ``pgolf_kernels.lora_merged`` does for q, k, v)."""
        from pgolf_kernels.linear_act import mlp_leaky_sq

        W_up, W_dn = _dense_weight(mod.fc, m.dtype), _dense_weight(mod.proj, m.dtype)
        if "up" in self.A:  # TTTConfig: up and down both adapted, or neither
            W_up, W_dn = self._merged("up", W_up), self._merged("down", W_dn)
        return mlp_leaky_sq(m.contiguous(), W_up.contiguous(), W_dn.contiguous(), float(mod.slope), validate=False)


class FusedBase:
    """The base model's blocks through the kernel path's fused ops, with no adapter: the view the phased recipe's
    global passes run under (``base_view``), gradients to every base weight. q / k norm and rotary through
    ``head_norm_rope`` (``fused_qk``), the two residual sites through ``linear_residual`` / ``mlp_residual``
    (``fused_residual``; the activation in the up-projection's epilogue with ``fused_mlp``), the decoder skips
    through ``skip_add``: the ops of a TTT step, whose backward also forms ∂W, ∂s and the q gain's gradient where
    the weights require them. The same function as the blocks without a view, up to rounding (tests/test_global_fused.py).
    Every block gets the one view (it holds no per-layer state), so one compiled block serves all layers."""

    layer_targets = ()   # no adapter: _DocLoRALayer's adapter terms drop out, its qkv_o runs the plain projections
    _kernel = None

    def __init__(self, fused_qk: bool, fused_residual: bool, fused_mlp: bool):
        if not fused_residual:
            raise ValueError("FusedBase: needs fused_residual (the view replaces the blocks' residual sites)")
        self.fused_qk, self.fused_residual, self.fused_mlp = bool(fused_qk), True, bool(fused_mlp)
        self._layer = _DocLoRALayer(self, {}, {})   # no targets: every adapter term of its methods drops out

    def layer(self, i: int) -> "_DocLoRALayer":
        return self._layer

    def head(self, h: torch.Tensor, model) -> torch.Tensor:
        return F.linear(h, model.head_weight().to(h.dtype))


def _global_fused_from_env() -> bool:
    """PGOLF_GLOBAL_FUSED: "1" = the kernel path's global passes run under ``FusedBase`` (``base_view``); unset or
    "0" = the blocks' own torch ops, as ``--reference``."""
    from pgolf_kernels._utils import env_choice

    return env_choice("PGOLF_GLOBAL_FUSED", {"0": "global passes through the torch ops",
                                             "1": "global passes through the fused ops"}) == "1"


# Off by measurement (H100, bench.profile_global, bench/results/profile-global-h100.md): one SGD step of the records'
# global pass (16 x 2048 targets) took 29.53 GPU-ms under the view against 31.67 without it, but 55.49 against 33.26
# ms of wall: the pass runs without CUDA graphs, and the fused ops' host side (the Gluon launches, their TMA
# descriptors) is longer than the step's GPU work there
GLOBAL_FUSED: bool = _global_fused_from_env()


def base_view(model, cfg: TTTConfig, backend: str, device) -> Optional[FusedBase]:
    """The view a global pass runs the model under: ``FusedBase`` with the fused ops a TTT step on ``backend`` would
    use (``fused_choices``), or None (the blocks' own ops) on the reference path, without ``fused_residual`` or with
    ``GLOBAL_FUSED`` off."""
    if not GLOBAL_FUSED:
        return None
    qk, residual, mlp = fused_choices(model, cfg, resolve_lora_backend(backend, device)[1])
    return FusedBase(qk, residual, mlp) if residual else None


def identity_rows_for(cfg: TTTConfig) -> bool:
    """Whether the eval's per-document adapters run with ``DocLoRA(identity_rows=True)``: for the batch schedule,
    whose row maps are always the prefix 0..R-1. The eval and its warm-up ask the same, so their compiled graphs
    agree."""
    return cfg.schedule == "batch"


def _is_int6(mod) -> bool:
    """An ``Int6Linear`` (codes and row scales, no dense weight)."""
    return all(hasattr(mod, a) for a in ("q", "scale", "bits")) and not hasattr(mod, "weight")


def _dense_weight(mod, dtype) -> torch.Tensor:
    """A projection's weight in ``dtype``: the dense weight, or an int6 layer's codes dequantized, dtype(q · s), the
    values its own forward multiplies by (aten ops: traced into the compiled block, one pass of N x K)."""
    if _is_int6(mod):
        from pgolf_kernels._dequant import dequant_aten

        return dequant_aten(mod.q, mod.scale, dtype)
    return _base_weight(mod, dtype)


def _base_weight(mod, dtype):
    """The base weight of a projection for multi_lora_linear: an ``Int6Linear``'s codes as a
    ``QTensor`` (never dequantized in memory), else the dense weight in the activation dtype."""
    if _is_int6(mod):
        from pgolf_kernels.quant import QTensor

        return QTensor(mod.q, mod.scale, int(mod.bits))
    return mod.weight if mod.weight.dtype == dtype else mod.weight.to(dtype)
