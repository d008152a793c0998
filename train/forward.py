"""The scoring forward: NLL of a ``RowBatch``'s scored targets, eager or regionally compiled.

``rows_nll(model, rows, adapter)`` runs ``model.hidden`` over the rows' windows and the head and
soft-capped full-softmax cross-entropy at the scored positions only (``head_nll``);
``compile_rows_nll(model)`` swaps in compiled blocks and a compiled head for every later call.
"""
from __future__ import annotations

import threading
from typing import Optional

import torch
import torch.nn.functional as F

from .rows import RowBatch


def head_nll(model, h: torch.Tensor, sel: torch.Tensor, y: torch.Tensor, adapter=None) -> torch.Tensor:
    """NLL (R, C) fp32 of targets y at window positions sel, from the full soft-capped softmax.

    Same math as ``GPT.forward(..., target_ids)`` restricted to the scored positions (the head and
    the cross-entropy are computed only where a score is taken: 1/4 of the window at chunk 256).
    """
    d = h.size(-1)
    # sel None: h holds the scored positions already (GPT.hidden(..., keep=sel))
    hs = h if sel is None else torch.gather(h, 1, sel[..., None].expand(-1, -1, d))
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


def tail_block(adapter) -> bool:
    """Whether a TTT forward runs its last block at the scored positions only (``TTTConfig.tail_block``)."""
    return adapter is not None and bool(getattr(getattr(adapter, "cfg", None), "tail_block", False))


def _row_forward(model, x, sel, y, adapter):
    if tail_block(adapter):
        return head_nll(model, model.hidden(x, adapter, keep=sel), None, y, adapter)
    return head_nll(model, model.hidden(x, adapter), sel, y, adapter)


def _block0_leaf_from_env() -> bool:
    """PGOLF_BLOCK0_LEAF: "1" (default) = block 0's input enters a TTT step as a leaf that requires grad, so block 0
    runs the compiled graph of blocks 1-10; "0" = it does not, and block 0 gets a graph of its own."""
    from pgolf_kernels._utils import env_choice

    return env_choice("PGOLF_BLOCK0_LEAF", {"1": "block 0 shares the blocks' graph, its input gradient formed",
                                            "0": "a graph of its own, no input gradient"}) == "1"


BLOCK0_LEAF: bool = _block0_leaf_from_env()

_LOCAL = threading.local()


def set_thread_eager(on: bool) -> bool:
    """While on, ``rows_nll`` and the blocks' forwards run eagerly on the calling thread even where
    ``compile_rows_nll`` is attached; other threads are not affected. Returns the previous setting. Why:
    ``--overlap-compile`` attaches the compile from a background thread and traces it there while the main thread
    scores with eager steps, and two threads must not be inside Dynamo at once (``train.overlap``)."""
    if not isinstance(on, bool):
        raise TypeError(f"set_thread_eager: on: expected a bool, got {type(on).__name__}")
    before = getattr(_LOCAL, "eager", False)
    _LOCAL.eager = on
    return before


def _eager_here() -> bool:
    return getattr(_LOCAL, "eager", False)


def rows_nll(model, rb: RowBatch, adapter=None) -> torch.Tensor:
    """NLL (R, C) of a RowBatch: eager, or the compiled forward that ``compile_rows_nll`` attached (eager on a
    thread with ``set_thread_eager(True)``)."""
    fwd = None if _eager_here() else getattr(model, "_pgolf_rows_nll", None)
    return (fwd or _row_forward)(model, rb.x, rb.sel, rb.y, adapter)


def is_compiled(model) -> bool:
    """Whether ``compile_rows_nll`` is in effect on ``model``."""
    return "_pgolf_rows_nll" in model.__dict__


def compile_rows_nll(model, enable: bool = True, precompiled: Optional[str] = None, only=None,
                     mode: Optional[str] = None) -> dict:
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

    ``precompiled``: a folder of ahead-of-time compiled variants of the four functions (``train.precompiled``):
    loaded when present, else compiled on first use and saved there, so a later process skips Dynamo's tracing.
    Returns the ``Precompiled`` objects by name (their ``stats``), or {} without a folder.
    ``only``: names of the functions to compile (of ``COMPILED_FUNCTIONS``); the others run eagerly. The eval's
    ``--parallel-compile`` children each compile one of them, filling the compile caches in parallel.
    ``mode``: torch.compile's mode (``COMPILE_MODES``; None: its default). ``max-autotune-no-cudagraphs`` lets
    Inductor time Triton GEMM templates against cuBLAS and fuse the element-wise work that follows a GEMM into the
    template chosen (a profiling experiment, ``bench.profile_ttt``'s ``-autotune`` variants: at d = 512 the step's
    element-wise passes move more bytes per position than its GEMMs take time). Modes with CUDA graphs of Inductor's
    own are refused: the eval captures its steps itself (``train.graphs``).
    """
    if not (hasattr(model, "hidden") and hasattr(model, "blocks") and len(model.blocks) > 0):
        raise TypeError(f"compile_rows_nll: model must be a train.model.GPT (with .hidden and .blocks), "
                        f"got {type(model).__name__}")
    blocks = list(model.blocks)
    if not enable:
        for b in blocks:
            b.__dict__.pop("forward", None)
        model.__dict__.pop("_pgolf_rows_nll", None)
        return {}
    import types

    dynamo_settings()
    # Separate compiled functions with and without an adapter: one cache entry's guards never see the
    # other kind (torch 2.13 crashed building a recompile reason for an adapter-less call against an
    # adapter graph's aliasing guard). Graph variants left: grad / no-grad, and block 0's input not
    # requiring grad.
    fns = dict(block_plain=_block_plain, block_adapted=_block_adapted, head_plain=_head_plain,
               head_adapted=_head_adapted, block_tail=_block_tail)
    if only is not None:
        bad = sorted(set(only) - set(fns))
        if bad or not only:
            raise ValueError(f"compile_rows_nll: only = {sorted(only)!r}: expected a non-empty subset of {sorted(fns)}")
    if only is not None and precompiled is not None:
        raise ValueError("compile_rows_nll: only= and precompiled= do not go together (a folder holds all functions)")
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile_rows_nll: mode = {mode!r}: expected one of {COMPILE_MODES} (modes with Inductor's "
                         f"own CUDA graphs are not: the eval captures its steps itself)")
    if mode is not None and precompiled is not None:
        raise ValueError("compile_rows_nll: mode= and precompiled= do not go together (a precompiled folder holds "
                         "default-mode functions)")
    opts = dict(dynamic=True, **({"mode": mode} if mode else {}))
    if only is not None:
        made = {n: (torch.compile(f, **opts) if n in only else f) for n, f in fns.items()}
    elif precompiled is not None:
        from .precompiled import Precompiled, fingerprint

        dev = next(model.parameters()).device
        made = {n: Precompiled(f, precompiled, n, fingerprint(n, model, dev)) for n, f in fns.items()}
    else:
        made = {n: torch.compile(f, **opts) for n, f in fns.items()}
    plain, adapted, head_plain, head_adapted, tail = (made[n] for n in fns)

    def block_forward(self, x, x0, adapter=None, rope=None, keep=None, skip=None):
        if _eager_here():
            return type(self).forward(self, x, x0, adapter, rope, keep, skip)
        if skip is not None:  # a decoder's join inside its block (model.JOIN_FOLD): an adapter's step only
            return tail(self, x, x0, adapter, rope, keep, skip) if keep is not None else adapted(self, x, x0, adapter,
                                                                                               rope, skip)
        if keep is not None:  # the last block at the scored positions (TTTConfig.tail_block): its own function
            return tail(self, x, x0, adapter, rope, keep)
        if x is x0:  # block 0: an aliasing guard would otherwise split off a graph for it
            if BLOCK0_LEAF and adapter is not None and torch.is_grad_enabled() and not x.requires_grad:
                # and a requires_grad guard would split off another (forward + backward) for block 0's
                # input, the only block input that does not require grad in a TTT step: as a leaf that
                # does, block 0 runs the graph of blocks 1-10. Cost: block 0's backward also forms the
                # gradient of its input (one d x 2d GEMM of the step's ~90; the leaf dies with the step).
                # Gain: one Dynamo frame and two FX graphs fewer to compile (5 -> 4 frames, CPU trace).
                x = x.detach().requires_grad_(True)
            else:
                x0 = x0.clone()
        return plain(self, x, x0, rope) if adapter is None else adapted(self, x, x0, adapter, rope)

    for b in blocks:
        b.forward = types.MethodType(block_forward, b)

    def fwd(model, x, sel, y, adapter):
        if tail_block(adapter):
            return head_adapted(model, model.hidden(x, adapter, keep=sel), None, y, adapter)
        h = model.hidden(x, adapter)
        return head_plain(model, h, sel, y) if adapter is None else head_adapted(model, h, sel, y, adapter)

    model.__dict__["_pgolf_rows_nll"] = fwd
    return made if precompiled is not None else {}


# torch.compile modes compile_rows_nll takes (None: torch's default)
COMPILE_MODES = (None, "default", "max-autotune-no-cudagraphs")


def _block_plain(block, x, x0, rope):
    return type(block).forward(block, x, x0, None, rope)


def _block_adapted(block, x, x0, adapter, rope, skip=None):
    return type(block).forward(block, x, x0, adapter, rope, None, skip)


def _block_tail(block, x, x0, adapter, rope, keep, skip=None):
    return type(block).forward(block, x, x0, adapter, rope, keep, skip)


def _head_plain(model, h, sel, y):
    return head_nll(model, h, sel, y, None)


def _head_adapted(model, h, sel, y, adapter):
    return head_nll(model, h, sel, y, adapter)


def dynamo_settings() -> None:
    """The Dynamo / FX settings ``compile_rows_nll`` compiles under. Called on every thread that compiles or runs the
    compiled forward: from torch 2.12 on, torch._dynamo.config is per thread (pytorch/pytorch#186537), so a
    background compile (``train.overlap``) and the main thread that later runs its graphs each set them."""
    import torch._dynamo
    import torch.fx.experimental._config as fx_config

    fx_config.use_duck_shape = False
    # Python floats read in the forward (the MLP's leaky slope, the logit soft-cap, the LoRA scale) are
    # constants of the run: specialize them. Unspecialized (torch's default), each became a 0-dim float64
    # CPU input that inductor converted with a host C++ kernel, so every eval process ran g++ and
    # inductor's vector-ISA probe under file locks: a cProfile of a warm-cache eval on the H200 spent 37.2 s
    # of its 117.4 s waiting on subprocesses and 28.7 s in file locks (bench/results/logs/warmup-profile-h200.txt)
    if hasattr(torch._dynamo.config, "specialize_float"):  # a torch without the switch is left as it is
        torch._dynamo.config.specialize_float = True
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 32))
