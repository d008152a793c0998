"""Batched multi-LoRA projection: one rank-r adapter per document, fused with the frozen base GEMM.

Math (per slice i of a list of slices that share the input x; b = batch row, a = adapter of row b)::

    x   : (B, T, d)            activations (bf16 on GPU; fp16/fp32 allowed)
    W_i : (N_i, d)             frozen base weight, dense, or int6/int8 codes q_i (N_i, d) with row scales s_i (N_i,):
                               W_i[n, k] = s_i[n] * q_i[n, k]
    A_i : (n_adapters, r, d)   B_i : (n_adapters, N_i, r)     (usually fp32 params)
    m   : (B, T)               m[b, t] = 1 if t < lengths[b] else 0 (all ones when lengths is None)

    u_i[b]  = m[b] * (x[b] · A_i[a]ᵀ)                     (T, r)      the "shrink"
    y_i[b]  = x[b] · W_iᵀ + α · u_i[b] · B_i[a]ᵀ          (T, N_i)    base + "expand"

Backward (dy_i = ∂L/∂y_i; the base is frozen, so it gets no gradient)::

    g_i[b]  = m[b] * (dy_i[b] · B_i[a])                   (T, r)      shrink gradient
    dx[b]   = Σ_i dy_i[b] · W_i + α · g_i[b] · A_i[a]     (T, d)
    dB_i[a] += α · dy_i[b]ᵀ · u_i[b]                      (N_i, r)    accumulated in fp32
    dA_i[a] += α · g_i[b]ᵀ · x[b]                         (r, d)      accumulated in fp32

Shrinks (``shrinks``, optional): further adapters S_j (n_adapters, r_j, d) whose shrink alone is wanted, for a LoRA whose
expand runs elsewhere (the TTT engine's o adapter reads the same normed input as q / k / v; its expand is the second
product of the attention's residual GEMM)::

    u_j[b]   = m[b] * (x[b] · S_j[a]ᵀ)                    (T, r_j)    in x.dtype
    dx[b]   += du_j[b] · S_j[a]                           (T, d)      (m applied to du_j first)
    dS_j[a] += du_j[b]ᵀ · x[b]                            (r_j, d)    fp32

On the merged path the du_j · S_j join the slices' dy_i · E_i in the one ``lora_merged.sum_products`` kernel that
forms dx, instead of their own bmm and an add of its (T, d) output into dx.

``lengths`` semantics (documented contract, tested): rows t >= lengths[b] are padding. For them the LoRA delta is
zero (y = base output only; the base GEMM *is* still computed for every row, so y is finite and equals x·Wᵀ there),
their dx is the base part dy·W only, and they contribute nothing to dA or dB. A row with lengths[b] = 0 is a finished
document: pure base output and zero adapter gradients. ``adapter_index[b]`` selects the adapter of batch row b
(default b; n_adapters >= B); several rows may share an adapter, whose gradients then add up.

Design (counted for the benchmark shape B64 T1024 d512, Q 512 + V 256, r8, bf16 x, fp32 adapters):

* Forward, one launch for all slices. A program owns a (b, T-tile, N-tile) output tile. In its K loop over d it
  streams the x tile once and feeds it to two MMAs: the base tile x·Wᵀ (BT×BN) and the shrink x·A_aᵀ (BT×r_pad),
  r padded to a power of two >= 16 for tl.dot and masked. The expand u·B_aᵀ (r_pad deep) is one more MMA in the
  epilogue, added to the base accumulator before the single store of y (int6: the row scale s[n] is applied to the
  base accumulator in the same epilogue). Bytes: x read once (67.1 MB) and y written once (100.7 MB) = 168 MB,
  exactly the base-only F.linear traffic. The eager form (F.linear, x·Aᵀ bmm, ·Bᵀ bmm, add, per slice) moves
  x 2× per slice + u + delta (100.7 MB written and read again) + y read/written by the add: ≈ 0.57 GB in 8 launches
  (+ the fp32->bf16 casts of A and B) vs 168 MB in 1 launch (+ the tiny casts of A_i/B_i to x.dtype, 2 per
  slice, so the kernel's K loop feeds them to the MMA straight from shared memory). The price is recomputing the shrink in every N-tile
  (r_pad/BN = 16/128 = 12.5 % extra MMA work at r <= 16), chosen over a separate shrink launch that would read x
  from HBM a second time (+67 MB, +1 launch).
* Backward, one launch for dx, dA, dB of all slices (plus one memset of a flat fp32 grad buffer). Programs own
  (b, T-range, role): roles 0..DT-1 own a d-tile of dx, role DT owns dB; the DT+1 programs of one document run
  side by side and stream the same dy tiles, so dy comes from HBM once and from L2 after. A dx program's main loop
  over the N_i columns of each slice is dots only: dx += dy·W and g += dy·B_a (the shrink gradient, from the same
  dy tile); then dx += α g·A_a and dA += α gᵀ·x_tile. The dB program recomputes u = x·A_aᵀ for its T-tile (cheaper
  than saving u in the forward: 4.2 MB per slice written + read, and it keeps the forward at base-only traffic)
  and adds dyᵀ·u. Bytes: dy 100.7 + x 67.1 + dx 67.1 = 235 MB in 1 launch + 1 memset. Eager autograd: dy read by
  2 GEMMs per slice (base dx, delta path), g and the delta grads materialized, dx summed across paths and slices,
  fp32 casts of dA/dB: ≈ 1.0 GB in ~20 launches. An int6 base is dequantized to x.dtype for the backward (one
  N_i×d op, 0.5 MB for Q) instead of in every dx tile; the forward keeps the codes in-kernel.
  A second strategy, "split", leaves dx's base part dy·W to cuBLAS and has the same kernel add α g·A into it
  (dy read twice, dx read+written twice). Either strategy can run "G once": a first launch of the dB programs
  also stores α·m·g (x.dtype, (B·T, r)) and a second launch of the dx programs reads it, instead of recomputing g
  in each of the d/BD d-tiles (at r = 96, B64 T2048: g's dots cost 77 of the backward's 277 GFLOP, one pass 19;
  G once does 219, 193 minimal, as dB still recomputes u); the price is a second read of dy and G written and
  read once. Bitwise equal to the one-launch backward in deterministic mode (interpreter test).
  Defaults by measurement (H200, bench/results/lora-h200.md; ``lora_triton.bwd_split`` / ``bwd_g_once``): fused in
  one launch for rank ≤ 32 (0.511 ms fwd+bwd at B64 T1024 r8), G once + split above (1.679 ms at B64 T2048 r96,
  against 1.884 ms fused in one launch).
* Merged weights (``pgolf_kernels.lora_merged``), the default for unpadded rows (``lengths`` None) from T = 1024
  (rank ≤ 32) or T = 512 (rank > 32): E_i[b] = W_i + α B_i[a] A_i[a] is built per row by one Triton launch, then
  every product is a base-shaped batched GEMM on cuBLAS (y = x Eᵀ; dx = dy E; Gt = dyᵀ x; dA, dB from Gt). Above
  those T the per-row E (N_i × d) is cheap next to the T-long GEMMs, and cuBLAS runs them at ~600 TFLOP/s where the
  fused kernels' backward held ~200. H200, fwd+bwd, CUDA-graph replay: 0.398 ms at B64 T1024 r8 (kernels 0.511,
  compiled bmm 0.634) and 0.765 ms at B64 T2048 r96 (kernels 1.666, compiled bmm 1.217); at T256 r8 the kernels win
  (0.152 vs 0.200 ms). ``PGOLF_LORA_MERGED`` = auto / 1 / 0 overrides the rule; the choice is an argument of the
  custom ops, so compiled graphs key on it.
* dA/dB are accumulated in fp32 with atomic adds. ``deterministic=True`` makes each grad element owned by exactly one
  program (no T-split; with adapter_index the kernel writes per-row grads that are reduced in a fixed order), so
  results are bitwise reproducible. The default may split T across programs when B·(d/BD) is below ~2 waves of SMs.
"""
from __future__ import annotations

import math
import warnings
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import _utils
from ._dequant import DEFAULT_LARGE_M, dequant, dequant_aten
from . import lora_merged
from ._utils import check, check_tensor, use_triton

_OP = "multi_lora_linear"
_FLOAT = (torch.float16, torch.bfloat16, torch.float32)
_INDEX_DTYPES = (torch.int32, torch.int64)


# ----------------------------------------------------------------------------------------------------------------
# input handling
# ----------------------------------------------------------------------------------------------------------------
def _is_quant(base) -> bool:
    """Duck-typed pgolf_kernels.quant.QTensor: an object with .q, .scale, .bits."""
    return (not isinstance(base, torch.Tensor)) and all(hasattr(base, a) for a in ("q", "scale", "bits"))


def _dense_weight(base, dtype: torch.dtype) -> Tensor:
    """The base weight as a dense (N, d) tensor of ``dtype`` (int6: s[n] * q[n, k], computed in fp32 first)."""
    if _is_quant(base):
        return dequant_aten(base.q, base.scale, dtype)
    return base.to(dtype)


def _check_args(x, bases, As, Bs, alpha, lengths, adapter_index, validate: bool, allow_fp64: bool = False,
                shrinks=()):
    fl = _FLOAT + (torch.float64,) if allow_fp64 else _FLOAT
    check_tensor(x, "x", dtype=fl, ndim=3, op=_OP)
    Bsz, T, d = x.shape
    for name, lst in (("bases", bases), ("As", As), ("Bs", Bs)):
        if not isinstance(lst, (list, tuple)):
            raise TypeError(f"{_OP}: {name} must be a list (one entry per slice), got {type(lst).__name__}")
    check(len(bases) >= 1, lambda: f"{_OP}: bases is empty; pass at least one slice")
    check(len(bases) == len(As) == len(Bs),
          lambda: f"{_OP}: bases, As and Bs must have one entry per slice, got {len(bases)}, {len(As)}, {len(Bs)}")
    # not math.isfinite: dynamo cannot trace it (a graph break inside every compiled call)
    check(isinstance(alpha, (int, float)) and -math.inf < alpha < math.inf,
          lambda: f"{_OP}: alpha must be a finite float, got {alpha!r}", TypeError)
    check(1 <= Bsz <= 65535, lambda: f"{_OP}: x batch size must be in [1, 65535], got {Bsz}")
    adt = None
    for i, (base, A, Bm) in enumerate(zip(bases, As, Bs)):
        if _is_quant(base):
            check_tensor(base.q, f"bases[{i}].q", dtype=torch.int8, ndim=2, device=x.device, op=_OP)
            check_tensor(base.scale, f"bases[{i}].scale", dtype=fl, ndim=1, device=x.device, op=_OP)
            N, dw = base.q.shape
            check(base.scale.shape[0] == N,
                  lambda: f"{_OP}: bases[{i}].scale must have shape ({N},) (one scale per output row), got {tuple(base.scale.shape)}")
        else:
            check_tensor(base, f"bases[{i}]", dtype=x.dtype, ndim=2, device=x.device, op=_OP)
            N, dw = base.shape
        check(dw == d, lambda: f"{_OP}: bases[{i}] has in_features {dw} but x has d = {d} (expected shape (out_{i}, {d}))")
        check(N >= 1, lambda: f"{_OP}: bases[{i}] has no output rows")
        check_tensor(A, f"As[{i}]", dtype=fl, ndim=3, device=x.device, op=_OP)
        check_tensor(Bm, f"Bs[{i}]", dtype=fl, ndim=3, device=x.device, op=_OP)
        if adt is None:
            adt = A.dtype
        check(A.dtype == adt and Bm.dtype == adt,
              lambda: f"{_OP}: all adapters must share one dtype; As[0] is {adt} but As[{i}]/Bs[{i}] are {A.dtype}/{Bm.dtype}",
              TypeError)
        n, r, da = A.shape
        check(da == d, lambda: f"{_OP}: As[{i}] has shape {tuple(A.shape)}; expected (n_adapters, r, {d}) to match x's d = {d}")
        check(1 <= r <= 128, lambda: f"{_OP}: As[{i}] rank r = {r} is outside the supported 1..128")
        check(tuple(Bm.shape) == (n, N, r),
              lambda: f"{_OP}: Bs[{i}] has shape {tuple(Bm.shape)}; expected (n_adapters, out_{i}, r) = {(n, N, r)} "
              f"from As[{i}] {tuple(A.shape)} and bases[{i}] ({N}, {d})")
        if adapter_index is None:
            check(n >= Bsz, lambda: f"{_OP}: As[{i}] has {n} adapters but x has B = {Bsz} rows; pass adapter_index "
                            f"or give at least B adapters (row b uses adapter b)")
    n0 = As[0].shape[0]
    for i, A in enumerate(As):
        check(A.shape[0] == n0, lambda: f"{_OP}: all As must have the same n_adapters; As[0] has {n0}, As[{i}] has {A.shape[0]}")
    if not isinstance(shrinks, (list, tuple)):
        raise TypeError(f"{_OP}: shrinks must be a list of (n_adapters, r, d) adapters, got {type(shrinks).__name__}")
    for j, S in enumerate(shrinks):
        check_tensor(S, f"shrinks[{j}]", dtype=adt, ndim=3, device=x.device, op=_OP)
        check(S.shape[0] == n0 and S.shape[2] == d and 1 <= S.shape[1] <= 128,
              lambda: f"{_OP}: shrinks[{j}] has shape {tuple(S.shape)}; expected (n_adapters = {n0}, r in 1..128, d = {d})")
    if lengths is not None:
        check_tensor(lengths, "lengths", dtype=_INDEX_DTYPES, ndim=1, device=x.device, op=_OP)
        check(lengths.shape[0] == Bsz, lambda: f"{_OP}: lengths must have shape ({Bsz},) = (B,), got {tuple(lengths.shape)}")
    if adapter_index is not None:
        check_tensor(adapter_index, "adapter_index", dtype=_INDEX_DTYPES, ndim=1, device=x.device, op=_OP)
        check(adapter_index.shape[0] == Bsz,
              lambda: f"{_OP}: adapter_index must have shape ({Bsz},) = (B,), got {tuple(adapter_index.shape)}")
    if validate and not _capturing_or_compiling():
        # Value checks need a device->host sync (~10 us); they are skipped under torch.compile and CUDA-graph
        # capture, where the kernels clamp instead (lengths to [0, T], adapter_index to [0, n-1]) to stay in bounds.
        if lengths is not None and lengths.numel():
            lo, hi = int(lengths.min()), int(lengths.max())
            check(lo >= 0 and hi <= T, lambda: f"{_OP}: lengths values must be in [0, T] = [0, {T}], got min {lo}, max {hi}")
        if adapter_index is not None and adapter_index.numel():
            lo, hi = int(adapter_index.min()), int(adapter_index.max())
            check(lo >= 0 and hi < n0,
                  lambda: f"{_OP}: adapter_index values must be in [0, n_adapters) = [0, {n0}), got min {lo}, max {hi}")


def _capturing_or_compiling() -> bool:
    if torch.compiler.is_compiling():
        return True
    try:
        return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
    except Exception:  # pragma: no cover - no CUDA runtime
        return False


# ----------------------------------------------------------------------------------------------------------------
# pure-torch reference (the semantics oracle)
# ----------------------------------------------------------------------------------------------------------------
def multi_lora_linear_ref(x, bases, As, Bs, *, alpha: float = 1.0, lengths=None, adapter_index=None,
                          deterministic: bool = False, validate: bool = True,
                          compute_dtype: Optional[torch.dtype] = None, check_values: Optional[bool] = None,
                          large_m: Optional[int] = None, shrinks=None) -> List[Tensor]:
    """Pure torch: F.linear + two bmm per slice, differentiable by autograd. See the module docstring for the math.

    ``compute_dtype`` (default x.dtype): the dtype every operand is cast to before the matmuls; the default is
    "torch's own low-precision path" (adapters cast to the activation dtype, as an eager model does), and
    ``compute_dtype=torch.float64`` gives the high-precision oracle. Output dtype is always x.dtype unless
    compute_dtype is wider, in which case outputs stay in compute_dtype. ``deterministic`` is accepted for
    signature parity (torch's path here is deterministic on its own), and so is ``large_m`` (no dispatch here).
    Unlike the fused op, float64 inputs are accepted (that is the oracle).
    """
    validate = _validate_alias(validate, check_values)
    shrinks = [] if shrinks is None else shrinks
    _check_args(x, bases, As, Bs, alpha, lengths, adapter_index, validate, allow_fp64=True, shrinks=shrinks)
    cd = x.dtype if compute_dtype is None else compute_dtype
    out_dtype = cd if compute_dtype is not None else x.dtype
    Bsz, T, d = x.shape
    xc = x.to(cd)
    mask = _mask(xc, lengths)
    outs = []
    for base, A, Bm in zip(bases, As, Bs):
        W = _dense_weight(base, cd)
        if adapter_index is not None:
            A = A[adapter_index.to(torch.int64)]
            Bm = Bm[adapter_index.to(torch.int64)]
        else:
            A, Bm = A[:Bsz], Bm[:Bsz]
        y = F.linear(xc, W)
        u = torch.bmm(xc, A.to(cd).transpose(1, 2))
        if mask is not None:
            u = u * mask
        y = y + alpha * torch.bmm(u, Bm.to(cd).transpose(1, 2))
        outs.append(y.to(out_dtype))
    for S in shrinks:
        S = S[adapter_index.to(torch.int64)] if adapter_index is not None else S[:Bsz]
        u = torch.bmm(xc, S.to(cd).transpose(1, 2))
        outs.append((u if mask is None else u * mask).to(out_dtype))
    return outs


# ----------------------------------------------------------------------------------------------------------------
# public entry point
# ----------------------------------------------------------------------------------------------------------------
def multi_lora_linear(x, bases, As, Bs, *, alpha: float = 1.0, lengths=None, adapter_index=None,
                      deterministic: bool = False, validate: bool = True, check_values: Optional[bool] = None,
                      large_m: int = DEFAULT_LARGE_M, shrinks=None) -> List[Tensor]:
    """y_i = x·W_iᵀ + α·m·(x·A_i[a]ᵀ)·B_i[a]ᵀ for every slice i, as a list of (B, T, out_i) tensors in x.dtype,
    followed by u_j = m·(x·S_j[a]ᵀ), (B, T, r_j), for every adapter S_j of ``shrinks``.

    Args:
        x: (B, T, d) activations. bases: list of (out_i, d) tensors of x.dtype, or QTensor-like objects with
        ``.q`` int8 (out_i, d), ``.scale`` (out_i,), ``.bits``. As: list of (n_adapters, r, d); Bs: list of
        (n_adapters, out_i, r) (one dtype for all, fp32 usually). alpha: LoRA scale. lengths: optional int (B,),
        rows t >= lengths[b] are padding (see the module docstring for exactly what that means).
        adapter_index: optional int (B,), batch row b uses adapter adapter_index[b] (default b).
        deterministic: bitwise-reproducible adapter gradients (no T-split of the fp32 reductions).
        validate: verify lengths/adapter_index ranges eagerly (one host sync; skipped under compile/capture).
        check_values: deprecated spelling of ``validate``.
        large_m: from B*T >= large_m rows on, int6 bases are dequantized once per call and the kernel runs on the
        dense tile (default 1024, see pgolf_kernels/_dequant.py).
        shrinks: optional list of (n_adapters, r_j, d) adapters (the As' dtype) whose shrink alone is returned, with
        gradients to x and to them (module docstring).

    CUDA tensors run the fused Triton kernels (custom op ``pgolf::multi_lora_fwd``/``_bwd`` with fake and
    autograd registrations, so torch.compile(fullgraph=True) and CUDA graphs work); CPU tensors run the reference
    unless TRITON_INTERPRET=1.
    """
    validate = _validate_alias(validate, check_values)
    shrinks = [] if shrinks is None else shrinks
    _check_args(x, bases, As, Bs, alpha, lengths, adapter_index, validate, shrinks=shrinks)
    check(isinstance(large_m, int) and not isinstance(large_m, bool) and large_m >= 1,
          lambda: f"{_OP}: large_m must be a positive int, got {large_m!r}")
    if not use_triton(x):
        return multi_lora_linear_ref(x, bases, As, Bs, alpha=alpha, lengths=lengths, adapter_index=adapter_index,
                                     validate=False, shrinks=shrinks)
    return _fused(x, bases, As, Bs, float(alpha), lengths, adapter_index, bool(deterministic), large_m, list(shrinks))


def _validate_alias(validate: bool, check_values: Optional[bool]) -> bool:
    """``check_values=`` is the deprecated spelling of ``validate=`` (every op spells the eager value check
    ``validate``); it still works, with a DeprecationWarning outside torch.compile."""
    if check_values is None:
        return validate
    if not torch.compiler.is_compiling():
        warnings.warn(f"{_OP}: check_values= is deprecated; use validate=", DeprecationWarning, stacklevel=3)
    return bool(check_values)


def _fused(x, bases, As, Bs, alpha, lengths, adapter_index, deterministic, large_m, shrinks) -> List[Tensor]:
    # One custom-op call per base kind (dense or quantized: the kernel's W pointer has one element type); the shrinks
    # go with the first call
    kinds = [_is_quant(b) for b in bases]
    outs: List[Optional[Tensor]] = [None] * len(bases)
    us: List[Tensor] = []
    for quant in (False, True):
        idx = [i for i, k in enumerate(kinds) if k == quant]
        if not idx:
            continue
        ws = [bases[i].q if quant else bases[i] for i in idx]
        scales = [bases[i].scale for i in idx] if quant else []
        As_, Bs_ = [As[i] for i in idx], [Bs[i] for i in idx]
        # the strategy is chosen here, outside the op, and passed in: under torch.compile it becomes a constant of
        # the traced graph (and Dynamo guards on lora_merged.OVERRIDE), so a cached graph is never replayed for
        # the other strategy's output layout (the fake cannot see a choice made inside the op)
        sh, shrinks = shrinks, []
        ys = _fwd_op(x, ws, scales, As_, Bs_, sh, alpha, lengths, adapter_index, deterministic, large_m,
                     _merged(x, As_, lengths))[: len(idx) + len(sh)]   # then the u_j; merged path: the E_i follow
        for i, y in zip(idx, ys):
            outs[i] = y
        us += ys[len(idx):]
    return outs + us  # type: ignore[operator]


def _groups(n: int):
    from .lora_triton import MAX_SLICES

    return [list(range(i, min(n, i + MAX_SLICES))) for i in range(0, n, MAX_SLICES)]


def _grad_rows(x, As, adapter_index, deterministic) -> Tuple[int, bool]:
    """(rows of the fp32 grad buffers, whether the kernel adds straight into adapter rows)."""
    if adapter_index is not None and deterministic:
        return x.shape[0], False   # per-batch-row grads, reduced in a fixed order afterwards
    return As[0].shape[0], True


def _flat_sizes(x, ws, As, rows, shrinks=()):
    """Sizes of the fp32 grad buffer's parts: dA_0, dB_0, dA_1, dB_1, ..., then dS_0, dS_1, ..."""
    d = x.shape[2]
    sizes = []
    for w, A in zip(ws, As):
        r = A.shape[1]
        sizes += [rows * r * d, rows * w.shape[0] * r]
    return sizes + [rows * S.shape[1] * d for S in shrinks]


def _shrink_rows(S: Tensor, adapter_index: Optional[Tensor], rows: int, dtype: torch.dtype) -> Tensor:
    """Each batch row's shrink adapter in the activation dtype, (rows, r, d) contiguous."""
    return lora_merged._select(S, adapter_index, rows).to(dtype).contiguous()


def _mask(x: Tensor, lengths: Optional[Tensor]) -> Optional[Tensor]:
    """m[b, t] = t < lengths[b] as (B, T, 1) in x.dtype, or None without lengths."""
    if lengths is None:
        return None
    T = x.shape[1]
    return (torch.arange(T, device=x.device)[None, :] < lengths.to(torch.int64)[:, None]).to(x.dtype)[..., None]


@torch.library.custom_op("pgolf::multi_lora_fwd", mutates_args=())
def _fwd_op(x: Tensor, ws: List[Tensor], scales: List[Tensor], As: List[Tensor], Bs: List[Tensor],
            shrinks: List[Tensor], alpha: float, lengths: Optional[Tensor], adapter_index: Optional[Tensor],
            deterministic: bool, large_m: int, merged: bool) -> List[Tensor]:
    # large_m has no schema default on purpose: the dispatcher drops arguments equal to their default, and the
    # tensor-list autograd wrapper then expects one gradient fewer than the backward below returns (same for merged)
    from . import lora_triton as K

    x = x.contiguous()
    Bsz, T, _ = x.shape
    check(not (merged and lengths is not None), lambda: f"{_OP}: merged=True needs lengths=None (padded rows run "
                                                        f"the kernels)")
    m = _mask(x, lengths)
    us = [torch.bmm(x, _shrink_rows(S, adapter_index, Bsz, x.dtype).transpose(1, 2)) for S in shrinks]
    us = us if m is None else [u * m for u in us]
    if merged:
        # outputs: the y_i, the u_j, then the E_i the backward reads (saved, not recomputed: 0.07 ms per call at B64
        # T2048 r96 Q+V on H200) and its α·A_i, α·B_i copies (lora_merged.low_copies); the fake mirrors this layout
        low = lora_merged.low_copies(x, ws, As)
        ys, Es = lora_merged.forward(x, _dense_all(ws, scales, x.dtype), As, Bs, alpha, adapter_index, low)
        return ys + us + Es + low
    outs = [_utils.empty((Bsz, T, w.shape[0]), x.dtype, x.device) for w in ws]
    # adapters cast to the activation dtype once here (0.26 M elements per slice at B64 r8 d512) rather than in
    # every K step of every tile: the in-loop cast forced a register->smem round trip per step in the kernel
    Ac, Bc = _lp(As, x.dtype), _lp(Bs, x.dtype)
    if scales and Bsz * T >= large_m:
        # Large M: one dequantization pass per call beats converting the int6 tile in every K step of every
        # tile (H200, B64 T1024 r8 Q+V: fwd 0.195 ms with the int6 base vs 0.156 ms with a bf16 base,
        # bench/results/lora-h200.md). The dense tile is bf16(q*s), the values the backward already uses.
        ws = [dequant(w, sc, x.dtype) for w, sc in zip(ws, scales)]
        scales = []
    for g in _groups(len(ws)):
        K.lora_fwd(x, [ws[i].contiguous() for i in g], [scales[i].contiguous() for i in g] if scales else [],
                   [Ac[i] for i in g], [Bc[i] for i in g], alpha, lengths, adapter_index, [outs[i] for i in g])
    return outs + us


def _merged(x, As, lengths) -> bool:
    return lora_merged.use_merged(x.shape[1], max(A.shape[1] for A in As), lengths)


def _dense_all(ws, scales, dtype):
    """Dense x.dtype bases: int6 codes dequantized once (bf16(q*s)), dense bases made contiguous."""
    return [dequant(w, scales[i], dtype) if scales else w.contiguous() for i, w in enumerate(ws)]


def _lp(ts, dtype):
    return [t.to(dtype).contiguous() for t in ts]


@_fwd_op.register_fake
def _fwd_fake(x, ws, scales, As, Bs, shrinks, alpha, lengths, adapter_index, deterministic, large_m, merged):
    ys = [x.new_empty((x.shape[0], x.shape[1], w.shape[0])) for w in ws]
    ys += [x.new_empty((x.shape[0], x.shape[1], S.shape[1])) for S in shrinks]
    if merged:
        ys += [x.new_empty((x.shape[0], w.shape[0], x.shape[2])) for w in ws]
        for w, A in zip(ws, As):
            ys += [x.new_empty((x.shape[0], A.shape[1], x.shape[2])), x.new_empty((x.shape[0], w.shape[0], A.shape[1]))]
    return ys


@torch.library.custom_op("pgolf::multi_lora_bwd", mutates_args=())
def _bwd_op(x: Tensor, dys: List[Tensor], dus: List[Tensor], ws: List[Tensor], scales: List[Tensor],
            As: List[Tensor], Bs: List[Tensor], shrinks: List[Tensor], alpha: float, lengths: Optional[Tensor],
            adapter_index: Optional[Tensor], deterministic: bool, need_dx: bool, merged: bool,
            effs: List[Tensor]) -> Tuple[Tensor, Tensor]:
    """Returns (dx or an empty tensor, one flat fp32 buffer [dA_0, dB_0, dA_1, dB_1, ..., dS_0, ...] of grad rows).
    ``merged``: the forward's strategy; ``effs``: its E_i and α·A_i, α·B_i copies on the merged path (empty: rebuilt
    here); ``dus``: the gradients of the shrinks' outputs."""
    from . import lora_triton as K

    x = x.contiguous()
    rows, by_index = _grad_rows(x, As, adapter_index, deterministic)
    sizes = _flat_sizes(x, ws, As, rows, shrinks)
    # one memset for every grad buffer, except where every element is written below: the merged path with one grad
    # row per batch row, row b's grads straight into row b (the records' step: 60 MB of fp32 zeros per layer,
    # 0.21 ms per step on an H100, profile-ttt-h100.md measurement 5)
    overwritten = merged and adapter_index is None and rows == x.shape[0]
    flat = (_utils.empty((sum(sizes),), torch.float32, x.device) if overwritten
            else torch.zeros(sum(sizes), dtype=torch.float32, device=x.device))
    parts = flat.split(sizes)
    d = x.shape[2]
    dAs = [parts[2 * i].view(rows, A.shape[1], d) for i, A in enumerate(As)]
    dBs = [parts[2 * i + 1].view(rows, w.shape[0], A.shape[1]) for i, (w, A) in enumerate(zip(ws, As))]
    dSs = [parts[2 * len(ws) + j].view(rows, S.shape[1], d) for j, S in enumerate(shrinks)]
    m = _mask(x, lengths)
    dus = [du.to(x.dtype).contiguous() if m is None else (du.to(x.dtype) * m).contiguous() for du in dus]
    Ss = [_shrink_rows(S, adapter_index, x.shape[0], x.dtype) for S in shrinks]
    # The backward takes the base as a dense x.dtype weight: an int6 base is dequantized here, s[n] * q[n, k]
    # rounded once to x.dtype (N_i x d, 0.5 MB for a 512x512 slice), exactly the values the kernel would form.
    Wd = _dense_all(ws, scales, x.dtype)
    dys = [dy.to(x.dtype).contiguous() for dy in dys]
    if merged:
        Bsz = x.shape[0]
        # effs: the forward's E_i, then its α·A_i, α·B_i copies (empty: E rebuilt here, the copies made per use)
        Es = list(effs[:len(ws)]) if effs else [lora_merged.effective_weight(w, A, Bm, alpha, adapter_index, Bsz)
                                                for w, A, Bm in zip(Wd, As, Bs)]
        low = list(effs[len(ws):]) if effs else None
        # row b's grads go straight to grad row b (adapter_index None: adapters >= B get none; deterministic with
        # an index: per-row grads, reduced below in a fixed order); shared adapters are summed by index_add_
        direct = not (by_index and adapter_index is not None)
        outA = [t[:Bsz] if direct else None for t in dAs]
        outB = [t[:Bsz] if direct else None for t in dBs]
        mdx, mdA, mdB = lora_merged.backward(x, dys, Es, As, Bs, alpha, adapter_index, need_dx, outA, outB,
                                             dus, Ss, low=low)
        mdS = _shrink_grads(x, dus, [t[:Bsz] if direct else None for t in dSs])
        if not direct:
            for dst, src in zip(dAs + dBs + dSs, mdA + mdB + mdS):
                lora_merged.add_rows(dst, adapter_index, src)
        return (mdx if need_dx else x.new_empty(0)), flat
    dx = _utils.empty(x.shape, x.dtype, x.device) if need_dx else x.new_empty(0)
    Ac, Bc = _lp(As, x.dtype), _lp(Bs, x.dtype)
    split = K.bwd_split(max(A.shape[1] for A in As))
    if need_dx and split:
        # "split" strategy: dx = sum_i dy_i W_i by cuBLAS, the kernel adds alpha g_i A_i into it
        dx2 = dx.view(-1, d)
        torch.mm(dys[0].view(-1, dys[0].shape[-1]), Wd[0], out=dx2)
        for i in range(1, len(ws)):
            dx2.addmm_(dys[i].view(-1, dys[i].shape[-1]), Wd[i])
    for gi, g in enumerate(_groups(len(ws))):
        dxg = None
        if need_dx:
            dxg = dx if (gi == 0 or split) else torch.empty_like(dx)
        K.lora_bwd(x, [dys[i] for i in g], [Wd[i] for i in g], [Ac[i] for i in g], [Bc[i] for i in g], alpha,
                   lengths, adapter_index, [dAs[i] for i in g], [dBs[i] for i in g], dxg, deterministic, by_index,
                   base_in_kernel=not split)
        if need_dx and gi > 0 and not split:
            dx.add_(dxg)
    if shrinks:
        if need_dx:
            for du, S in zip(dus, Ss):
                dx.baddbmm_(du, S)
        # the kernels add their grads straight into adapter rows (by_index) or into per-row rows: the same here
        idx = adapter_index if adapter_index is not None else torch.arange(x.shape[0], device=x.device)
        for dst, src in zip(dSs, _shrink_grads(x, dus, [None] * len(dus))):
            if by_index:
                lora_merged.add_rows(dst, idx, src)
            else:
                dst[:x.shape[0]].add_(src)
    return dx, flat


def _shrink_grads(x: Tensor, dus: List[Tensor], outs: List[Optional[Tensor]]) -> List[Tensor]:
    """Per-row fp32 dS_j = du_jᵀ · x (rows, r_j, d), into ``outs[j]`` where given."""
    return [lora_merged._mm32(du.transpose(1, 2), x, o) for du, o in zip(dus, outs)]


@_bwd_op.register_fake
def _bwd_fake(x, dys, dus, ws, scales, As, Bs, shrinks, alpha, lengths, adapter_index, deterministic, need_dx, merged,
              effs):
    rows, _ = _grad_rows(x, As, adapter_index, deterministic)
    dx = x.new_empty(x.shape) if need_dx else x.new_empty(0)
    return dx, x.new_empty((sum(_flat_sizes(x, ws, As, rows, shrinks)),), dtype=torch.float32)


def _fwd_setup(ctx, inputs, output):
    x, ws, scales, As, Bs, shrinks, alpha, lengths, adapter_index, deterministic, _large_m, merged = inputs
    ctx.ns, ctx.nscale, ctx.nsh, ctx.merged = len(ws), len(scales), len(shrinks), merged
    ctx.alpha, ctx.deterministic = alpha, deterministic
    ctx.need_dx = bool(ctx.needs_input_grad[0])
    Es = list(output[len(ws) + len(shrinks):])   # the merged path's E_i and α·A_i, α·B_i (none on the kernel path)
    ctx.neff = len(Es)
    if Es:
        ctx.mark_non_differentiable(*Es)
    ctx.save_for_backward(x, lengths, adapter_index, *ws, *scales, *As, *Bs, *shrinks, *Es)


def _fwd_backward(ctx, dys):
    x, lengths, adapter_index, *rest = ctx.saved_tensors
    ns, nsc, nsh, ne = ctx.ns, ctx.nscale, ctx.nsh, ctx.neff
    ws, scales = rest[:ns], rest[ns:ns + nsc]
    As, Bs = rest[ns + nsc:2 * ns + nsc], rest[2 * ns + nsc:3 * ns + nsc]
    Ss = rest[3 * ns + nsc:3 * ns + nsc + nsh]
    Es = rest[3 * ns + nsc + nsh:3 * ns + nsc + nsh + ne]
    dus = [x.new_zeros((x.shape[0], x.shape[1], S.shape[1])) if g is None else g
           for g, S in zip(dys[ns:ns + nsh], Ss)]
    dys = [x.new_zeros((x.shape[0], x.shape[1], w.shape[0])) if g is None else g for g, w in zip(dys, ws)]
    dx, flat = _bwd_op(x, dys, dus, list(ws), list(scales), list(As), list(Bs), list(Ss), ctx.alpha, lengths,
                       adapter_index, ctx.deterministic, ctx.need_dx, ctx.merged, list(Es))
    rows, by_index = _grad_rows(x, As, adapter_index, ctx.deterministic)
    parts = flat.split(_flat_sizes(x, ws, As, rows, Ss))
    d = x.shape[2]
    dAs, dBs = [], []
    for i, (w, A, Bm) in enumerate(zip(ws, As, Bs)):
        gA = parts[2 * i].view(rows, A.shape[1], d)
        gB = parts[2 * i + 1].view(rows, w.shape[0], A.shape[1])
        if not by_index:
            # deterministic reduction of per-row grads onto adapters: a one-hot matmul in fp64 (cuBLAS fp64 is
            # deterministic, and fp64 sums of <= B fp32 terms do not depend on order at fp32 output precision)
            # (n, B) one-hot built by comparison: F.one_hot would sync to validate indices (breaks graph capture)
            onehot = (torch.arange(A.shape[0], device=x.device)[:, None] == adapter_index[None, :]).to(torch.float64)
            gA = (onehot @ gA.reshape(rows, -1).double()).view(A.shape)
            gB = (onehot @ gB.reshape(rows, -1).double()).view(Bm.shape)
        dAs.append(gA.to(A.dtype))
        dBs.append(gB.to(Bm.dtype))
    dSs = []
    for j, S in enumerate(Ss):
        gS = parts[2 * ns + j].view(rows, S.shape[1], d)
        if not by_index:
            onehot = (torch.arange(S.shape[0], device=x.device)[:, None] == adapter_index[None, :]).to(torch.float64)
            gS = (onehot @ gS.reshape(rows, -1).double()).view(S.shape)
        dSs.append(gS.to(S.dtype))
    return ((dx if ctx.need_dx else None), [None] * ns, [None] * nsc, dAs, dBs, dSs, None, None, None, None, None,
            None)


_fwd_op.register_autograd(_fwd_backward, setup_context=_fwd_setup)


# ----------------------------------------------------------------------------------------------------------------
# module + optimizer helper
# ----------------------------------------------------------------------------------------------------------------
class BatchedLoRALinear(nn.Module):
    """A bank of per-document rank-r adapters for slices that share one input (e.g. Q and V of one layer).

    Parameters ``A[i]`` (n_adapters, r, d) and ``B[i]`` (n_adapters, out_i, r), fp32 by default. ``reset(rows)``
    re-initializes in place (A Kaiming-uniform with fan_in = d, i.e. U(-1/sqrt(d), 1/sqrt(d)); B zero) so a TTT loop
    allocates nothing per batch; pair it with ``zero_adam_state_``. ``forward(x, bases, lengths=None,
    adapter_index=None)`` returns the list of y_i (see ``multi_lora_linear``).
    """

    def __init__(self, n_adapters: int, d: int, outs: Sequence[int], rank: int, *, alpha: float = 1.0,
                 deterministic: bool = False, dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        check(n_adapters >= 1 and d >= 1 and rank >= 1 and len(outs) >= 1 and all(o >= 1 for o in outs),
              f"BatchedLoRALinear: need n_adapters, d, rank >= 1 and a non-empty outs list, got "
              f"n_adapters={n_adapters}, d={d}, outs={list(outs)}, rank={rank}")
        self.n_adapters, self.d, self.outs, self.rank = n_adapters, d, list(outs), rank
        self.alpha, self.deterministic = float(alpha), deterministic
        self.A = nn.ParameterList([nn.Parameter(torch.empty(n_adapters, rank, d, dtype=dtype, device=device))
                                   for _ in outs])
        self.B = nn.ParameterList([nn.Parameter(torch.empty(n_adapters, o, rank, dtype=dtype, device=device))
                                   for o in outs])
        self._scratch: Optional[Tensor] = None
        self.reset()

    @torch.no_grad()
    def reset(self, rows=None) -> None:
        """Re-initialize adapters in place: all rows (rows=None), or the rows given as an int index tensor / list
        or a bool mask of length n_adapters. A ~ U(-1/sqrt(d), 1/sqrt(d)) (Kaiming-uniform, a=sqrt(5)), B = 0."""
        bound = 1.0 / math.sqrt(self.d)
        if rows is None:
            for A in self.A:
                A.uniform_(-bound, bound)
            for Bm in self.B:
                Bm.zero_()
            return
        rows = torch.as_tensor(rows, device=self.A[0].device)
        if rows.dtype == torch.bool:
            check(rows.shape == (self.n_adapters,),
                  f"BatchedLoRALinear.reset: a bool rows mask must have shape ({self.n_adapters},), got {tuple(rows.shape)}")
            sel = rows.view(-1, 1, 1)
            for A, Bm in zip(self.A, self.B):
                scratch = self._scratch_like(A)
                scratch.uniform_(-bound, bound)
                torch.where(sel, scratch, A, out=A)
                Bm.masked_fill_(sel, 0.0)
            return
        check(rows.dtype in _INDEX_DTYPES and rows.dim() == 1,
              f"BatchedLoRALinear.reset: rows must be None, a 1-D int index tensor or a bool mask, got "
              f"{rows.dtype} with shape {tuple(rows.shape)}", TypeError)
        for A, Bm in zip(self.A, self.B):
            k = rows.shape[0]
            scratch = self._scratch_like(A)[:k]
            scratch.uniform_(-bound, bound)
            A.index_copy_(0, rows, scratch)
            Bm.index_fill_(0, rows, 0.0)

    def _scratch_like(self, A: Tensor) -> Tensor:
        # One persistent buffer (allocated on the first partial reset), so later resets allocate nothing.
        if self._scratch is None or self._scratch.shape != A.shape or self._scratch.device != A.device \
                or self._scratch.dtype != A.dtype:
            self._scratch = torch.empty_like(A)
        return self._scratch

    def forward(self, x, bases, lengths=None, adapter_index=None) -> List[Tensor]:
        check(len(bases) == len(self.outs),
              f"BatchedLoRALinear: got {len(bases)} bases for {len(self.outs)} slices")
        return multi_lora_linear(x, list(bases), list(self.A), list(self.B), alpha=self.alpha, lengths=lengths,
                                 adapter_index=adapter_index, deterministic=self.deterministic)


@torch.no_grad()
def zero_adam_state_(optimizer: torch.optim.Optimizer, params, rows=None) -> None:
    """Zero Adam/AdamW moments of ``params`` in place: exp_avg, exp_avg_sq (and max_exp_avg_sq) for the given rows
    (dim 0; int index tensor/list or bool mask), or entirely when rows is None, in which case the per-parameter
    ``step`` is zeroed too (a shared step cannot be reset per row: with rows given it is left alone). Parameters
    without state yet (no step taken) are skipped. Allocation-free for rows=None and for tensor rows on the
    parameter's device."""
    for p in params:
        st = optimizer.state.get(p)
        if not st:
            continue
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            buf = st.get(key)
            if not isinstance(buf, torch.Tensor):
                continue
            if rows is None:
                buf.zero_()
            else:
                r = torch.as_tensor(rows, device=buf.device)
                if r.dtype == torch.bool:
                    buf.masked_fill_(r.view(-1, *([1] * (buf.dim() - 1))), 0.0)
                else:
                    buf.index_fill_(0, r, 0.0)
        if rows is None and isinstance(st.get("step"), torch.Tensor):
            st["step"].zero_()
        elif rows is None and "step" in st:
            st["step"] = 0
