"""Drop-in speedups for a parameter-golf record script: ``apply(namespace)`` swaps in the package's kernels.

Use it in a record's ``train_gpt.py`` (before ``main()`` builds its optimizers)::

    import pgolf_kernels.patch
    report = pgolf_kernels.patch.apply(globals())
    print(report)

or from outside, on the imported module: ``apply(module)``. ``report.undo()`` restores every replaced name.

Pieces
------
* **muon** - the record's ``Muon`` class is replaced by a subclass that keeps its constructor (so its parameter
  groups, defaults and ``state``), its ``_build`` / ``launch_reduce_scatters`` and its distributed protocol, and
  changes one thing: the orthogonalization. The record calls its Newton-Schulz function once per parameter
  (2-D records) or once per bank; the subclass collects every update of a param group first and orthogonalizes
  them all in ONE ``newton_schulz_many`` call (3 grouped launches per NS step for the whole set). The grain
  matters: measured on one H200, one grouped call over all banks 1.05 ms vs the record's per-bank calls 1.91 ms,
  while our per-bank ``newton_schulz`` was slower (3.05 ms) than the record's own. The schedule is read from the
  record: quintic ``(a, b, c)`` from its NS function's source, or its Polar-Express table ``_PE_COEFFS`` with the
  record's slice rule (``steps`` > len(table) runs the table once); eps from the NS function's default;
  row normalisation (MuonEq-R) exactly as the record computes it (fp32 row norm, divide in bf16).
  Recognised protocols:

  - *round-robin* (2-D params): rank r orthogonalizes params i with i % world == r into a flat bf16 buffer,
    ``all_reduce(SUM)``, every rank applies the sum;
  - *banked* (3-D banks): ``launch_reduce_scatters()`` (the record's own) reduce-scatters bf16 grads; ``step()``
    waits for the shards, runs momentum on the shard (``shard_mom``), orthogonalizes every bank's shard in one
    grouped call, launches one async ``all_gather_into_tensor`` per bank and applies each as it lands.
    Single process: the full banks, momentum in ``state[p]["momentum_buffer"]`` (bf16), as the record.

  The arithmetic around NS (momentum, Nesterov, scale ``max(1, rows/cols) ** 0.5``, decoupled weight decay) is the
  record's, rounded at the same places; in the banked protocol it runs as two fused passes per bank
  (``pgolf_kernels.muon_update``: momentum + Nesterov + MuonEq-R, then decay + update: ~20 instead of ~48 bytes per
  parameter: 1.99x / 1.24x the records' compiled ops, and the whole 2026-03-23 ``Muon.step`` in place, inside its
  training loop, 1.004 vs 2.132 ms on one H200, ``bench/results/records-h200.md``); the NS output differs from the
  record's within bf16 rounding (the kernels round A, B, X once per step and normalise in fp32; against fp64 they are
  2.2-2.8x more accurate than the records' path).
* **ttt** - the records with per-document LoRA TTT (2026-03-17: ``GPT.forward(..., lora)``, 2026-04-29:
  ``GPT.forward_ttt``) compute the head, its LoRA, the soft-cap and a full-vocabulary cross-entropy at every
  position of every window, and then read the loss only inside the window's last ``ttt_chunk_size`` positions
  (their ``_compute_chunk_window`` ends each window at its chunk's end; scoring and the training slice stay inside
  the last chunk). The patched forward runs the record's own forward body on a view of the model whose
  ``final_norm`` keeps those positions, so the head and the loss run on (B, chunk) instead of (B, T) rows, and
  returns the record's (B, T) per-token loss with zeros where it never reads; the losses at the read positions and
  the LoRA gradients are the record's (CPU tests: bitwise, eager; one graph under ``torch.compile(dynamic=True,
  fullgraph=True)``). At 2026-04-29's recipe (chunk 48, window 2048, vocabulary 8192, 64 documents) that is 48
  instead of 2,048 positions of a 512 x 8192 head, a rank-96 head LoRA and an fp32 (64, T, 8192) logit tensor
  (4.3 GB at T = 2048) per step; its effect on the record's TTT wall time is not measured yet. A script whose
  windows or loss differ is refused by name (``strict``) or listed in ``report.skipped["ttt_tail"]``.
  Also, where a record compiles its TTT forward with dynamic shapes (2026-04-29: ``GPT.forward_ttt`` under
  ``torch.compile(dynamic=True)``), ``torch._dynamo.config.specialize_float`` is set (``report.undo()`` restores
  it): with dynamic shapes Dynamo otherwise turns every Python float the forward reads (LoRA scale, soft-cap,
  gains) into a 0-dim float64 graph input, and on CUDA Inductor builds host C++ kernels for them with g++ in every
  process. A CPU trace of that record's ``forward_ttt`` at a tiny config: 251 such inputs over 4 window lengths,
  0 with the switch (5 graphs, 4 with it; ``bench/results/records-ttt-floats-cpu.md``); in this package's eval the cold warm-up was
  136.7-172.8 s before the same switch and 60.1 s after it, on H200s of one image but in different device calls
  and with one more graph change in between (``bench/results/warmup-h200.md``); its effect on this record's own
  warm-up is not measured yet. Compiles with ``dynamic=False`` (the
  records' training) specialize floats already, so they are unchanged. Such a record's ``deserialize`` is also
  wrapped to return the model in eval mode: 2026-04-29's returns it in training mode, its TTT compile warm-up runs
  the TTT forward so (its MLP then takes the fused training kernel, ``if self.training and self.use_fused``), and
  its TTT eval calls ``base_model.eval()`` before the first scored step, so Dynamo's guard on ``training`` compiles
  the whole TTT forward a second time inside the timed eval, for a path the warm-up never needed: on one H200
  (``bench/results/records-h200.md``, 192 documents, cold) that second compile took 168 s of the record's eval
  (its compile time 255.4 -> 423.0 s), and the regional variant's three region graphs were compiled again there (~40 s cold, ~18 s warm). The
  warm-up scores nothing and trains only its own adapters, so the mode it runs in changes no score; every other use
  of ``deserialize`` in the script sets its own mode (``eval_val`` calls ``eval()``). Timed on one H200 with the
  regional compile (192 documents): the eval timer 136.6 -> 90.3 s cold, 102.4 -> 93.2 s warm, no Dynamo frame added
  inside the eval.
  The per-document LoRA
  (``BatchedLinearLoRA``) is left as it is, and the report says why per script. The record adds its deltas
  outside the base projection (``c_q(x) + q_delta``) while ``multi_lora_linear`` computes base and adapter in one
  op, so patching means replacing the attention forward; and what that would buy is small or negative. At rank 96
  (2026-04-29, compiled TTT forward) the op is 1.59x compiled bmm on its own (Q512+V256, B64 T2048, CUDA-graph
  replay), but a whole TTT step at that recipe in this package's engine went only from 111.7 to 107.2 ms
  (``bench/results/profile-ttt-h200.md``: attention and the other targets dominate). At rank 8 (2026-03-17,
  eager TTT) the op is slower without CUDA graphs (1.367 vs 1.035 ms eager bmm, B64 T1024). A script without a
  per-document LoRA (full-model TTT) has nothing to patch.
* **regional_ttt** (on by default where it applies: ``regional_ttt=None``; ``False`` turns it off) - the 2026-04-29 record
  compiles its whole TTT forward (``torch.compile(dynamic=True)`` over ``GPT.forward_ttt``): 11 blocks plus the
  loop repeats unrolled into one graph, forward and backward, which is most of the 97-188 s of compile warm-up the
  records log (more than 265 s cold on one H200 in this package's bench). This piece compiles the per-block bodies
  (``GPT._block_with_lora``, ``GPT._parallel_block_with_lora``) as ``torch.compile(dynamic=True)`` regions that every
  block shares, and runs the rest of the forward (embedding, SmearGate, skip mixes, final norm, head at the last
  chunk) eagerly: the record's own compile of the forward is skipped (``torch.compiler.disable``), so Dynamo traces
  one block per region instead of the whole model. To share one graph, a block sees its LoRA entry and its parallel
  lambda rows at index 0 (the record's slot / block index picks a module from a list, which specialises a graph per
  block) and the regions leave floats unspecialised (each block's ``ln_scale_factor`` is 1/sqrt(layer + 1)).
  The regions take the LoRA parameters as views (``_ParamViews``): the record's eval builds a new
  ``BatchedTTTLoRA(bsz)`` for every batch of fewer than ``ttt_batch_size`` documents (phase ends, the last batch),
  and Dynamo keeps a parameter's shape static, so each new batch size compiled the whole TTT forward again in the
  record (CPU trace, tiny config, batch sizes 6, 3, 2, 1, 5: 3 -> 7 graphs; on the H200 the record child's phase
  1, whose batches hold 2 and 3 documents, added a Dynamo frame and 153 s of compile,
  ``bench/results/logs/records-ttt-0429-regional-h200.txt``) and the regions
  three graphs more each time (6 -> 14); with the views the regions keep their graphs (6 -> 9, all 3 from the
  one-document batch, which Dynamo specialises). At the record's default config (``bench/results/records-ttt-bsz-cpu.md``,
  aot_eager, batch sizes 6, 3, 2, 5): the record 2 -> 5 graphs, 54-64 s of CPU tracing per new size; the regions 3
  graphs throughout, 0.4-1.0 s per later size.
  A CPU trace at a tiny config (4 layers, looping and the parallel lanes on): 3 region graphs (the first block's input
  needs no gradient, the later ones do; the parallel body), no recompile at a second window length, losses and LoRA
  gradients equal to the record's eager forward. Cold compile of the record's TTT warm-up at its default config
  (11 layers, 17 block slots, rank 96) on CPU Inductor, 2 cores, one process each, one after the other:
  83.9 s vs 324.4 s for the record's own (3.9x; 263.1 s in an earlier run on the same machine), and the step that
  follows 10.3 vs 11.6 s (``bench/results/records-ttt-warmup-cpu.md``). On one H200 (``bench/results/records-h200.md``,
  200 synthetic documents, cold caches, one child each): compile warm-up 118.0 vs 267.6 s, wall 271.8 s vs more than
  529 s (the record's child was stopped in phase 2 of 3). On 192 documents (three batches of 64, same artifact):
  cold 252.9 s wall against more than 500 s (the record's child stopped at its limit, 1.98x or more); each on the
  caches its own cold child filled, 203.8 vs 289.4 s (1.42x); val_bpb 2.40624147 against the record's 2.40628095
  (3.9e-5 apart). The steps themselves run at the record's speed (its first batch 88.6 vs 91.6 s): the gain is the
  compile. With the model loaded in eval mode (the TTT piece, above): cold 216.0 s wall, warm 149.1 s, i.e. 1.94x the
  record's warm 289.4 s, val_bpb unchanged (2.40624147). Its GPU test (losses and LoRA gradients against the fp32
  forward under the record's Inductor compile, bounded by eager bf16's error) passed on an H200, so it is on by
  default for a record that compiles its TTT forward with dynamic shapes; a script without that compile (2026-03-17
  runs its TTT eagerly) has nothing to regionalise and is left as it is, unless ``regional_ttt=True`` asks for it
  (refused by name under ``strict``). A script whose block
  bodies read their LoRA other than as ``lora.<list>[slot]`` or the model other than through those attributes is
  refused by name.
* **quant** - not provided: ``quant=True`` is refused under ``strict`` and reported as skipped otherwise, with
  the reason per script. None of the three exports has a seam where the int6 codec is a like-for-like swap:
  2026-03-23's ``quantize_int6_per_row`` picks one clip percentile per tensor and floors every row scale at
  1/31, which the codec's per-row clip search does not (different codes, so different compressed bytes under
  the 16 MB cap); 2026-04-29 exports with GPTQ (Hessian-compensated rounding) + LQER; 2026-03-17 exports int8.

* **compile_cache** (``apply(..., compile_cache=FILE)``, off by default) - torch's own compile-cache bundle
  (``pgolf_kernels.compile_cache``): loaded from FILE at ``apply`` when it exists, so the script's compiles
  (training, the TTT eval's warm-up) become cache hits on a machine with empty caches; otherwise written to FILE at
  exit by rank 0. Dynamo still traces. Not yet timed on a record.

``strict=True`` (default) raises ``PatchError`` naming what was looked for and not found (e.g. a renamed
``Muon`` class, an NS function whose schedule cannot be read); ``strict=False`` applies what fits and lists
the rest in ``report.skipped``.
"""
from __future__ import annotations

import functools
import inspect
import os
import re
import sys
import types
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

from ._optim import closure_loss, momentum_buffer

__all__ = ["apply", "PatchReport", "PatchError", "muon_schedule"]

NS_FUNCTION = "zeropower_via_newtonschulz5"
PE_TABLE = "_PE_COEFFS"
# multi_lora_linear vs bmm, fwd+bwd of Q512+V256 LoRA on d512, one H200 (bench/results/lora-h200.md,
# profile-ttt-h200.md), the numbers behind the TTT piece's reasons:
#   rank 96, B64 T2048 (the 2026-04-29 TTT shape): 0.765 ms vs 1.217 compiled bmm in graph replay, but one whole
#     TTT step of that recipe 107.2 vs 111.7 ms (compiled, this package's engine)
#   rank 8, B64 T1024 (the 2026-03-17 TTT shape, run eagerly by the record): 1.367 vs 1.035 ms eager bmm, no graph
LARGE_LORA_RANK = 96


class PatchError(LookupError):
    """A record script differs from what a patch piece expects (raised under ``strict=True``)."""


@dataclass
class PatchReport:
    script: str
    patched: Dict[str, str] = field(default_factory=dict)
    skipped: Dict[str, str] = field(default_factory=dict)
    _undo: List[Tuple[dict, str, object]] = field(default_factory=list, repr=False)

    def undo(self) -> None:
        """Restore every name and setting this report replaced (last replaced first)."""
        while self._undo:
            target, name, old = self._undo.pop()
            if name is None:  # an action that reverts itself (e.g. unregistering an exit hook)
                target()
            elif isinstance(target, dict):
                target[name] = old
            else:
                setattr(target, name, old)
        self.patched.clear()

    def __str__(self) -> str:
        lines = [f"pgolf_kernels.patch on {self.script}:"]
        lines += [f"  patched {k}: {v}" for k, v in self.patched.items()]
        lines += [f"  left unpatched {k}: {v}" for k, v in self.skipped.items()]
        return "\n".join(lines)


def _namespace(namespace) -> Tuple[dict, str]:
    if isinstance(namespace, types.ModuleType):
        return vars(namespace), namespace.__name__
    if isinstance(namespace, dict):
        return namespace, str(namespace.get("__file__") or namespace.get("__name__") or "<globals>")
    raise TypeError(f"pgolf_kernels.patch.apply: namespace must be a module or a globals() dict, "
                    f"got {type(namespace).__name__}")


def _source(obj) -> str:
    try:
        return inspect.getsource(inspect.unwrap(obj))
    except (OSError, TypeError):
        return ""


# ------------------------------------------------------------------------------------------------------------
# Muon
# ------------------------------------------------------------------------------------------------------------
_QUINTIC_RE = re.compile(r"a\s*,\s*b\s*,\s*c\s*=\s*\(\s*([-+0-9.eE]+)\s*,\s*([-+0-9.eE]+)\s*,\s*([-+0-9.eE]+)\s*\)")


def muon_schedule(ns: dict) -> Tuple[Callable[[int], List[Tuple[float, float, float]]], float, str]:
    """Read the record's NS schedule: (steps -> list of (a, b, c), eps, description). Raises PatchError."""
    fn = ns.get(NS_FUNCTION)
    if not callable(fn):
        raise PatchError(f"looked for the Newton-Schulz function {NS_FUNCTION!r} and did not find it")
    src = _source(fn)
    if not src:
        raise PatchError(f"{NS_FUNCTION}: its source is not readable, so its coefficients cannot be read")
    try:
        eps = float(inspect.signature(inspect.unwrap(fn)).parameters["eps"].default)
    except (KeyError, TypeError, ValueError):
        raise PatchError(f"{NS_FUNCTION}: looked for an 'eps' parameter with a default and did not find it") from None
    if PE_TABLE in src:
        table = ns.get(PE_TABLE)
        if not (isinstance(table, (tuple, list)) and table and all(len(t) == 3 for t in table)):
            raise PatchError(f"{NS_FUNCTION} uses {PE_TABLE}, which was not found as a table of (a, b, c)")
        table = [tuple(float(v) for v in t) for t in table]

        def sched(steps: int):  # the record's rule: _PE_COEFFS[:steps] if steps <= len else the whole table
            return list(table[:steps]) if steps <= len(table) else list(table)

        return sched, eps, f"Polar Express ({PE_TABLE}, {len(table)} tuples)"
    m = _QUINTIC_RE.search(src)
    if m:
        abc = tuple(float(v) for v in m.groups())
        return (lambda steps: [abc] * steps), eps, f"quintic {abc}"
    raise PatchError(f"{NS_FUNCTION}: looked for 'a, b, c = (...)' or {PE_TABLE} in its source and found neither")


def _protocol(cls) -> str:
    step_src = _source(cls.step)
    if hasattr(cls, "launch_reduce_scatters") and hasattr(cls, "_build"):
        if "all_gather_into_tensor" in step_src and "reduce_scatter_tensor" in _source(cls.launch_reduce_scatters):
            return "banked"
        raise PatchError("Muon: has launch_reduce_scatters/_build but not the reduce-scatter -> NS -> "
                         "all_gather_into_tensor protocol")
    if "all_reduce" in step_src and "updates_flat" in step_src:
        return "round_robin"
    raise PatchError("Muon: looked for the round-robin (updates_flat + all_reduce) or the banked "
                     "(launch_reduce_scatters + all_gather_into_tensor) protocol and found neither")


def _make_muon(ns: dict, base: type, protocol: str, sched, eps: float) -> type:
    from .muon_update import decay_add_, momentum_update
    from .newton_schulz import newton_schulz_many

    def orthogonalize(updates: List[torch.Tensor], steps: int,
                      row_sumsq: Optional[List[torch.Tensor]] = None) -> List[torch.Tensor]:
        coeffs = sched(steps)
        if not coeffs:
            return [u.bfloat16() for u in updates]
        # same-shape inputs are stacked first: newton_schulz_many spends 2-3 small prologue launches per input
        # tensor, i.e. ~160 for the 54 matrices of the 2026-03-17 model vs ~12 for its 4 shapes
        by_shape: Dict[tuple, List[int]] = {}
        for i, u in enumerate(updates):
            by_shape.setdefault(tuple(u.shape), []).append(i)
        if len(by_shape) == len(updates):
            return newton_schulz_many(updates, len(coeffs), coeffs, eps, compute_dtype=torch.bfloat16,
                                      row_sumsq=row_sumsq)
        stacked = [torch.stack([updates[i] for i in idx]) if len(idx) > 1 else updates[idx[0]]
                   for idx in by_shape.values()]
        # a stack's rows are its members' rows in order, and so are its sums of squares
        sums = None if row_sumsq is None else [torch.cat([row_sumsq[i] for i in idx]) if len(idx) > 1
                                               else row_sumsq[idx[0]] for idx in by_shape.values()]
        outs = newton_schulz_many(stacked, len(coeffs), coeffs, eps, compute_dtype=torch.bfloat16, row_sumsq=sums)
        res: List[Optional[torch.Tensor]] = [None] * len(updates)
        for idx, o in zip(by_shape.values(), outs):
            for j, i in enumerate(idx):
                res[i] = o[j] if len(idx) > 1 else o
        return res

    def _dist():
        return ns.get("dist", torch.distributed)  # the record's own module (tests may shim it)

    if protocol == "round_robin":

        @torch.no_grad()
        def step(self, closure=None):
            loss = closure_loss(closure)
            dist = _dist()
            distributed = dist.is_available() and dist.is_initialized()
            world_size = dist.get_world_size() if distributed else 1
            rank = dist.get_rank() if distributed else 0
            for group in self.param_groups:
                params = group["params"]
                if not params:
                    continue
                lr, momentum = group["lr"], group["momentum"]
                steps, nesterov = group["backend_steps"], group["nesterov"]
                # the record's per-parameter ops, as foreach launches (same elementwise arithmetic): ~400 small
                # launches for the 54 matrices of the 2026-03-17 model become ~10
                numels = [int(p.numel()) for p in params]
                updates_flat = torch.zeros(sum(numels), device=params[0].device, dtype=torch.bfloat16)
                views = updates_flat.split(numels)
                mine = [i for i, p in enumerate(params) if i % world_size == rank and p.grad is not None]
                if mine:
                    grads = [params[i].grad for i in mine]
                    bufs = [momentum_buffer(self.state[params[i]], params[i].grad) for i in mine]
                    torch._foreach_mul_(bufs, momentum)  # buf.mul_(momentum).add_(g)
                    torch._foreach_add_(bufs, grads)
                    # g.add(buf, alpha=momentum) with Nesterov, else the raw gradient (as the record)
                    upd = torch._foreach_add(grads, bufs, alpha=momentum) if nesterov else grads
                    outs = orthogonalize(upd, steps)
                    dst = [views[i].view(o.shape) for i, o in zip(mine, outs)]
                    torch._foreach_copy_(dst, outs)
                    # the record's g *= max(1, rows / cols) ** 0.5, in bf16
                    torch._foreach_mul_(dst, [max(1, o.size(0) / o.size(1)) ** 0.5 for o in outs])
                if distributed:
                    dist.all_reduce(updates_flat, op=dist.ReduceOp.SUM)
                # p.add_(slice.to(p.dtype), alpha=-lr): one cast of the flat buffer per param dtype
                for dt in {p.dtype for p in params}:
                    idx = [i for i, p in enumerate(params) if p.dtype == dt]
                    cast = updates_flat.to(dt).split(numels)
                    torch._foreach_add_([params[i] for i in idx], [cast[i].view_as(params[i]) for i in idx],
                                        alpha=-lr)
            return loss

    else:

        def _apply(p, upd, lr, wd, scale):
            # the record's p.data.mul_(1 - lr * wd) (when wd > 0) and p.add_(upd.to(p.dtype), alpha=-lr * scale)
            # in one pass (pgolf_kernels.muon_update)
            decay_add_(p.data, upd.contiguous(), lr, wd if wd > 0.0 else 0.0, scale)

        @torch.no_grad()
        def step(self, closure=None):
            loss = closure_loss(closure)
            if not self._built:
                self._build()
            dist = _dist()
            for group in self.param_groups:
                lr, momentum = group["lr"], group["momentum"]
                steps, nesterov = group["backend_steps"], group["nesterov"]
                wd = group.get("weight_decay", 0.0)
                row_normalize = group.get("row_normalize", False)
                sharded = self._distributed and hasattr(self, "_rs_futures")
                metas, updates, sums = [], [], []
                for idx, m in enumerate(self._bank_meta):
                    p = m["p"]
                    if p.grad is None:
                        continue
                    if sharded and self._rs_futures[idx] is not None:
                        self._rs_futures[idx].wait()
                        g, buf = m["shard"], m["shard_mom"]
                    else:  # the record's g = p.grad.bfloat16() and a bf16 buffer; the kernel rounds g itself
                        g = p.grad.contiguous()
                        buf = momentum_buffer(self.state[p], g, dtype=torch.bfloat16)
                    # the record's buf.mul_(momentum).add_(g), g.add(buf, alpha=momentum) with Nesterov (else buf)
                    # and MuonEq-R (fp32 row norms clamped at 1e-7, divided in bf16), in one pass: ~10 instead of
                    # ~22 bytes per parameter of the bank (pgolf_kernels.muon_update)
                    # the same pass also writes each row's sum of squares of the update: the NS prologue takes
                    # the banks' norms from them instead of reading every bank once more (46 us of norm passes
                    # in the 2026-04-29 step on an H200)
                    update, ss = momentum_update(g, buf, momentum, nesterov, 1e-07 if row_normalize else None,
                                                 row_sumsq=True)
                    metas.append(m)
                    updates.append(update)
                    sums.append(ss)
                orth = orthogonalize(updates, steps, sums) if updates else []
                if sharded:  # one async all-gather per bank; apply each as it lands
                    handles = [dist.all_gather_into_tensor(m["full_update"], o.contiguous(), async_op=True)
                               for m, o in zip(metas, orth)]
                    for m, h in zip(metas, handles):
                        h.wait()
                        _apply(m["p"], m["full_update"][: m["B"]], lr, wd, m["scale"])
                else:
                    for m, o in zip(metas, orth):
                        _apply(m["p"], o, lr, wd, m["scale"])
                if hasattr(self, "_rs_futures"):
                    del self._rs_futures
            return loss

    cls = type(base.__name__, (base,), {
        "step": step,
        "__doc__": f"{base.__name__} with every update of a param group orthogonalized in one grouped "
                   f"newton_schulz_many call (pgolf_kernels.patch, {protocol} protocol).",
        "__module__": base.__module__,
        "__qualname__": base.__qualname__,
        "_pgolf_patched": True,
        "_pgolf_base": base,
    })
    return cls


def _patch_muon(ns: dict, report: PatchReport) -> None:
    base = ns.get("Muon")
    if not (isinstance(base, type) and issubclass(base, torch.optim.Optimizer)):
        found = sorted(k for k, v in ns.items() if isinstance(v, type) and issubclass(v, torch.optim.Optimizer)
                       and v.__module__ == ns.get("__name__"))
        raise PatchError(f"looked for the optimizer class 'Muon' (a torch.optim.Optimizer) and did not find it; "
                         f"optimizer classes defined in the script: {found or 'none'}")
    if getattr(base, "_pgolf_patched", False):
        raise PatchError("Muon is already patched (call report.undo() first)")
    params = inspect.signature(base.__init__).parameters
    for name in ("lr", "momentum", "backend_steps"):
        if name not in params:
            raise PatchError(f"Muon.__init__: looked for the parameter {name!r} and did not find it "
                             f"(signature: {list(params)[1:]})")
    protocol = _protocol(base)
    sched, eps, desc = muon_schedule(ns)
    cls = _make_muon(ns, base, protocol, sched, eps)
    report._undo.append((ns, "Muon", base))
    ns["Muon"] = cls
    report.patched["muon"] = (f"Muon ({protocol} protocol) -> one grouped newton_schulz_many call per param group, "
                              f"{desc}, eps {eps:g}")


# ------------------------------------------------------------------------------------------------------------
# TTT
# ------------------------------------------------------------------------------------------------------------
def _has_doc_lora(ns: dict) -> bool:
    """The script runs per-document LoRA TTT (its batched LoRA classes are defined)."""
    return isinstance(ns.get("BatchedLinearLoRA"), type) or isinstance(ns.get("BatchedTTTLoRA"), type)


def _ttt_reason(ns: dict) -> str:
    has_lora = isinstance(ns.get("BatchedLinearLoRA"), type)
    if not _has_doc_lora(ns):
        return "no per-document LoRA TTT in this script (no BatchedLinearLoRA / BatchedTTTLoRA): nothing to patch"
    if not has_lora:
        raise PatchError("BatchedTTTLoRA found but looked for its adapter class 'BatchedLinearLoRA' and did not find it")
    hp = ns.get("Hyperparameters")
    rank = getattr(hp, "ttt_lora_rank", None)
    outside = ("the record adds its deltas outside the base projection (base(x) + delta), so using "
               "multi_lora_linear would mean replacing its attention forward")
    if isinstance(rank, int) and rank >= LARGE_LORA_RANK:
        return (f"LoRA rank {rank}: {outside}, for a small gain: multi_lora_linear is 1.59x compiled bmm on its own "
                f"(0.765 vs 1.217 ms, B64 T2048 r96, one H200) but one whole TTT step of this recipe went from "
                f"111.7 to only 107.2 ms with it; the record's BatchedLinearLoRA is kept")
    return (f"LoRA rank {rank}: the record's TTT runs eagerly, where multi_lora_linear is slower than its bmm "
            "(fwd+bwd 1.367 vs 1.035 ms, B64 T1024 r8, one H200, no CUDA graph), and " + outside + "; the "
            "record's BatchedLinearLoRA is kept")


class _TailView:
    """A record GPT seen by its own TTT forward with ``final_norm`` keeping only the positions ``idx`` (the last
    chunk of the window): every other attribute is the model's (read live, so flags such as ``looping_active`` stay
    current). The forward's head, its LoRA, the soft-cap and the cross-entropy then run on (B, chunk) positions instead
    of (B, T)."""

    def __init__(self, model, idx):
        self._pgolf_model = model
        self._pgolf_idx = idx

    def final_norm(self, x):
        # RMSNorm is per position: normalising the kept positions only is the same as selecting afterwards
        B, _, d = x.shape
        return self._pgolf_model.final_norm(torch.gather(x, 1, self._pgolf_idx.view(1, -1, 1).expand(B, -1, d)))

    def __getattr__(self, name):
        return getattr(self._pgolf_model, name)


def _ttt_forward(ns: dict):
    """(class, name of its per-document TTT forward, the chunk size) when the record's TTT reads its per-token loss
    only inside the last ``ttt_chunk_size`` positions of each window, else raises PatchError naming what differs.

    Why that holds: the records' ``_compute_chunk_window`` ends every window at its chunk's end
    (``win_start = max(0, chunk_end - eval_seq_len)``), the batch's common context is the full chunk's window, and
    a document's last, shorter chunk still ends at or before that context's end and starts at or after its last
    ``chunk_size`` positions; the scoring (``_accumulate_bpb``) and the training slice
    (``ptl[:, chunk_offset : chunk_offset + chunk_size]``) read nothing else."""
    gpt = ns.get("GPT")
    if not isinstance(gpt, type):
        raise PatchError("looked for the record's model class 'GPT' and did not find it")
    name = "forward_ttt" if callable(getattr(gpt, "forward_ttt", None)) else "forward"
    src = _source(getattr(gpt, name))
    if name == "forward" and not re.search(r"def forward\(self,[^)]*\blora\b", src):
        raise PatchError("looked for GPT.forward_ttt or a GPT.forward taking 'lora' (the per-document TTT forward) "
                         "and found neither")
    for need in ("self.final_norm(x)", "target_ids.reshape(-1)", 'reduction="none"'):
        if need not in src:
            raise PatchError(f"looked for {need!r} in GPT.{name} (the per-token loss after the final norm) and did "
                             f"not find it")
    win = _source(ns.get("_compute_chunk_window")) if callable(ns.get("_compute_chunk_window")) else ""
    if "win_start = max(0, chunk_end - eval_seq_len)" not in win:
        raise PatchError("looked for _compute_chunk_window with windows that end at their chunk's end "
                         "('win_start = max(0, chunk_end - eval_seq_len)') and did not find it")
    chunk = getattr(ns.get("Hyperparameters"), "ttt_chunk_size", None)
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise PatchError(f"looked for an integer Hyperparameters.ttt_chunk_size >= 1, found {chunk!r}")
    return gpt, name, chunk


def _patch_ttt_tail(ns: dict, report: PatchReport) -> str:
    """Replace the record's TTT forward by one that computes the head and the loss at the last chunk positions only
    and returns the record's (B, T) per-token loss with zeros where the record never reads. Returns the report."""
    gpt, name, chunk = _ttt_forward(ns)
    orig = getattr(gpt, name)
    if getattr(orig, "_pgolf_tail", False):
        raise PatchError(f"GPT.{name} is already patched")

    def forward(self, input_ids, target_ids, lora=None, *args, **kwargs):
        T = input_ids.shape[1]
        # the record's training forward, and a window shorter than a chunk: as it is. A window of exactly one chunk
        # takes the tail path (the tail is then the whole window): with `T <= chunk` the record's warm-up at
        # T = chunk and then T = 2048 compiled two dynamic-shape graphs instead of the record's one (CPU trace of
        # the 2026-04-29 model)
        if lora is None or T < chunk:
            return orig(self, input_ids, target_ids, lora, *args, **kwargs)
        # positions T - chunk .. T - 1 as an index tensor, not as a slice: a slice starting at T - chunk, which is 0
        # when the first call has T = chunk (the record's warm-up does), made Dynamo specialize T to that value
        B = input_ids.shape[0]
        idx = torch.arange(chunk, device=input_ids.device) + (T - chunk)
        tail = orig(_TailView(self, idx), input_ids, target_ids.gather(1, idx.expand(B, -1)), lora, *args, **kwargs)
        return tail.new_zeros(B, T).scatter(1, idx.expand(B, -1), tail)

    forward._pgolf_tail = True
    forward.__wrapped__ = orig  # inspect.unwrap finds the record's own forward (the regional piece reads its source)
    forward.__doc__ = (f"GPT.{name} of the record, with the head and loss at the last {chunk} positions only "
                       f"(pgolf_kernels.patch).")
    report._undo.append((gpt, name, orig))
    setattr(gpt, name, forward)
    return (f"GPT.{name}: the head, its LoRA, the soft-cap and the cross-entropy run at the last {chunk} positions "
            f"of each window (ttt_chunk_size), the only ones the record's scoring and training read; the others "
            f"of the (B, T) loss it returns are 0")


def _compiles_ttt_dynamic(ns: dict) -> bool:
    """The script compiles a TTT forward with dynamic shapes: its GPT has ``forward_ttt`` and its source compiles
    with ``dynamic=True`` (2026-04-29 compiles ``forward_ttt`` so; 2026-03-17 runs its TTT eagerly)."""
    gpt = ns.get("GPT")
    if not (isinstance(gpt, type) and callable(getattr(gpt, "forward_ttt", None))):
        return False
    fn = ns.get("train_and_eval")
    return callable(fn) and re.search(r"torch\.compile\([^)]*dynamic\s*=\s*True", _source(fn)) is not None


def _patch_ttt_eval_mode(ns: dict, report: PatchReport) -> str:
    """Load the record's model in eval mode, the mode its TTT eval runs in (see the module docstring)."""
    fn = ns.get("deserialize")
    if not callable(fn):
        raise PatchError("looked for deserialize (the function that loads the model the TTT eval runs on) and did "
                         "not find it")
    if getattr(fn, "_pgolf_eval_mode", False):
        raise PatchError("deserialize is already patched")

    @functools.wraps(fn)
    def deserialize(*args, **kwargs):
        model = fn(*args, **kwargs)
        return model.eval() if isinstance(model, torch.nn.Module) else model

    deserialize._pgolf_eval_mode = True
    report._undo.append((ns, "deserialize", fn))
    ns["deserialize"] = deserialize
    return ("deserialize returns the model in eval mode: the record's TTT warm-up had compiled its TTT forward in "
            "training mode (its MLP's fused training kernel) and its TTT eval, which calls eval(), compiled it again "
            "inside the timed eval")


# the regional TTT compile (apply(..., regional_ttt=None or True))
LORA_LISTS = ("q_loras", "k_loras", "v_loras", "o_loras", "mlp_loras")
# the block methods of the record's TTT forward that become compiled regions, and the model attributes each may read
# (indexed by its block argument); 2026-04-29 has both
REGION_METHODS = {"_block_with_lora": (), "_parallel_block_with_lora": ("blocks", "parallel_resid_lambdas",
                                                                        "parallel_post_lambdas")}
# the regions' torch.compile backend: Inductor, as the record's own TTT compile (tests swap in a counting backend)
REGION_BACKEND = "inductor"


class _SlotLoRA:
    """The record's batched LoRA (``BatchedTTTLoRA``) as one block sees it: each adapter list holds that block's
    entry only, read at slot 0. With the record's slot index the compiled region would be specialised (one graph)
    per block, since the index picks a module from a list."""

    def __init__(self, lora, slot: int):
        for name in LORA_LISTS:
            m = getattr(lora, name, None)
            setattr(self, name, None if m is None else (_ParamViews(m[slot]),))


class _ParamViews:
    """One of the record's LoRA modules (``BatchedLinearLoRA``) with its parameters passed as views: its own forward
    on ``A.view_as(A)`` / ``B.view_as(B)`` (no copy; the gradients reach the parameters), any other attribute the
    module's. Why: Dynamo keeps a ``nn.Parameter``'s shape static even under ``dynamic=True``, and the record's eval
    builds a new ``BatchedTTTLoRA(bsz)`` for every batch of fewer than ``ttt_batch_size`` documents (its phases, its
    last batch), so each new batch size compiled the regions again (CPU trace, tiny config, batch sizes 6, 3, 2, 1, 5:
    6 -> 14 region graphs; with views 6 -> 9, the rest from the size-1 batch that Dynamo specialises)."""

    def __init__(self, mod):
        self._pgolf_mod = mod
        for name, prm in mod.named_parameters(recurse=False):
            setattr(self, name, prm.view_as(prm))

    def __getattr__(self, name):
        return getattr(self._pgolf_mod, name)

    def __call__(self, *args, **kwargs):
        return type(self._pgolf_mod).forward(self, *args, **kwargs)


class _BlockSelf:
    """The record's model as one parallel block sees it: the block list and the per-block lambda rows hold that
    block's entry only, read at index 0 (an int index into a module list would specialise the region per block);
    every other attribute is the model's."""

    def __init__(self, model, idx: int):
        self._pgolf_model = model
        self.blocks = (model.blocks[idx],)
        # copies, not views: a view's storage offset is a symbol of the dynamic region, and Dynamo's duck sizing
        # tied it to any input size of the same value (CPU trace: offset 6, row 3 of the (blocks, 2) table, and a
        # 6-document batch), so a later batch size recompiled the region; the copy is a few elements and carries
        # the gradient
        self.parallel_resid_lambdas = model.parallel_resid_lambdas[idx:idx + 1].clone()
        self.parallel_post_lambdas = model.parallel_post_lambdas[idx:idx + 1].clone()

    def __getattr__(self, name):
        return getattr(self._pgolf_model, name)


def _region_checks(gpt) -> List[str]:
    """The block methods to compile as regions, after checking that each reads its LoRA only through
    ``lora.<list>[slot]`` (or ``lora.<list> is not None``) and the model only through the attributes
    ``REGION_METHODS`` allows, indexed by its block argument; raises PatchError naming what differs."""
    fwd = inspect.unwrap(getattr(gpt, "forward_ttt"))
    fsrc = _source(fwd)
    found = []
    for name, model_attrs in REGION_METHODS.items():
        fn = getattr(gpt, name, None)
        if fn is None:
            continue
        src = _source(fn)
        params = list(inspect.signature(fn).parameters)
        if "lora" not in params or "slot" not in params:
            raise PatchError(f"looked for GPT.{name}(..., lora, slot, ...) and found the parameters {params}")
        for attr, tail in re.findall(r"\blora\.(\w+)(\[\w+\]| is not None| is None)?", src):
            if attr not in LORA_LISTS or tail not in ("[slot]", " is not None", " is None"):
                raise PatchError(f"GPT.{name} reads lora.{attr}{tail}; the regional compile expects only "
                                 f"lora.<{'|'.join(LORA_LISTS)}>[slot]")
        used = set(re.findall(r"\bself\.(\w+)", src))
        if used - set(model_attrs):
            raise PatchError(f"GPT.{name} reads self.{sorted(used - set(model_attrs))[0]}; the regional compile "
                             f"expects {list(model_attrs) or 'no model attribute'}")
        if model_attrs and params[1] != "block_idx":
            raise PatchError(f"looked for GPT.{name}(self, block_idx, ...) and found the parameters {params}")
        if f"self.{name}(" not in fsrc:
            raise PatchError(f"GPT.forward_ttt does not call self.{name}(...): nothing would be compiled there")
        found.append(name)
    if "_block_with_lora" not in found:
        raise PatchError("looked for GPT._block_with_lora (the TTT forward's per-block body) and did not find it")
    return found


def _patch_ttt_regional(ns: dict, report: PatchReport) -> str:
    """Compile the record's TTT forward per block instead of as one unrolled graph (see the module docstring)."""
    gpt = ns.get("GPT")
    if not _compiles_ttt_dynamic(ns):
        raise PatchError("looked for a TTT forward that the script compiles with torch.compile(dynamic=True) "
                         "(GPT.forward_ttt) and did not find it: the regional compile replaces that compile")
    names = _region_checks(gpt)
    import torch._dynamo

    for name in names:
        orig = getattr(gpt, name)
        parallel = bool(REGION_METHODS[name])
        state: Dict[str, Callable] = {}
        # positions of lora and slot among the method's arguments after self (_region_checks found both names)
        params = list(inspect.signature(orig).parameters)[1:]
        where = (params.index("lora"), params.index("slot"))

        def region(self, *args, _orig=orig, _state=state, _parallel=parallel, _where=where):
            fn = _state.get("fn")
            if fn is None:  # compiled at the first call, inside the record's warm-up, not at apply
                fn = _state["fn"] = torch.compile(_orig, dynamic=True, backend=REGION_BACKEND)
            li, si = _where
            args = list(args)
            args[li], args[si] = _SlotLoRA(args[li], args[si]), 0
            if _parallel:
                self, args[0] = _BlockSelf(self, args[0]), 0
            # floats unspecialised here: each block's ln_scale_factor differs (1/sqrt(layer + 1)), so specialised
            # floats would compile one graph per block, which is what this piece removes
            with torch._dynamo.config.patch(specialize_float=False):
                return fn(self, *args)

        region.__wrapped__ = orig
        region._pgolf_region = True
        report._undo.append((gpt, name, orig))
        setattr(gpt, name, region)
    fwd = gpt.forward_ttt
    report._undo.append((gpt, "forward_ttt", fwd))
    outer = torch.compiler.disable(fwd, recursive=True)
    outer.__wrapped__ = fwd
    setattr(gpt, "forward_ttt", outer)
    return (f"GPT.forward_ttt compiled per block: {', '.join('GPT.' + n for n in names)} each one "
            f"torch.compile(dynamic=True) region shared by every block (the block's LoRA entry and lambda rows "
            f"passed at index 0, floats unspecialised), the rest of the forward (embedding, skips, head) eager; the "
            f"record's own compile of the whole forward is skipped (torch.compiler.disable)")


# ------------------------------------------------------------------------------------------------------------
def _compile_cache(path: str, exists: bool, report: PatchReport) -> None:
    """The ``compile_cache`` piece of ``apply``: load the file now, or write this process's caches there at exit."""
    import atexit

    from . import compile_cache as cc

    if exists:
        got = cc.load_compile_cache(path, "compile_cache")
        report.patched["compile_cache"] = (f"{got['loaded_bytes']:,} bytes of torch compile caches loaded from {path} "
                                           f"({got['entries']}) in {got['load_s']:.1f} s: the script's compiles "
                                           f"of the same graphs on this torch, Triton and GPU are cache hits")
        return

    def write() -> None:
        if int(os.environ.get("RANK", "0")) != 0:
            return
        out = cc.save_compile_cache(path)
        print(f"pgolf_kernels.patch: {out['saved_bytes']:,} bytes of torch compile caches written to {path} "
              f"({out['entries']})", file=sys.stderr, flush=True)

    atexit.register(write)
    report._undo.append((lambda: atexit.unregister(write), None, None))
    report.patched["compile_cache"] = (f"{path} does not exist yet: this process's torch compile caches are written "
                                       f"there at exit (rank 0); a later run with it compiles from cache hits")


def apply(namespace, *, muon: bool = True, ttt: bool = True, quant: bool = False, strict: bool = True,
          compile_cache=None, regional_ttt: Optional[bool] = None) -> PatchReport:
    """Patch a record script's module (or its ``globals()``) in place; returns a ``PatchReport``.

    strict=True: a piece whose target is missing or unrecognised raises ``PatchError`` (nothing is replaced);
    strict=False: it is listed in ``report.skipped`` with the reason and the other pieces still apply.

    compile_cache: a file path (``pgolf_kernels.compile_cache``). When the file exists, torch's compile caches are
    loaded from it now, before the script compiles anything, so its compiles (training, its TTT eval's warm-up)
    become cache hits on a machine whose own caches are empty; when it does not, this process's compile caches are
    written there at exit (by rank 0, from the RANK variable). A bad path or a foreign file raises
    ``CompileCacheError`` before anything is patched.

    regional_ttt (part of ``ttt``): the record's TTT forward compiled per block instead of as one unrolled graph
    (see the module docstring), for a shorter compile warm-up. None (default): on where the script compiles its TTT
    forward with dynamic shapes (2026-04-29), nothing to do elsewhere (2026-03-17 runs its TTT eagerly); True: required
    (refused by name under ``strict`` where there is no such compile); False: the record's whole-forward compile.
    """
    for name, flag in (("muon", muon), ("ttt", ttt), ("quant", quant), ("strict", strict)):
        if not isinstance(flag, bool):  # a string such as "0" would be truthy and switch the piece on
            raise TypeError(f"apply: {name} must be True or False, got {flag!r}")
    if regional_ttt is not None and not isinstance(regional_ttt, bool):
        raise TypeError(f"apply: regional_ttt must be True, False or None (on where it applies), got {regional_ttt!r}")
    if regional_ttt and not ttt:
        raise ValueError("apply: regional_ttt=True needs ttt=True (it is part of the TTT piece)")
    ns, script = _namespace(namespace)
    cache_exists = None
    if compile_cache is not None:
        from .compile_cache import check_compile_cache_path

        cache_exists = check_compile_cache_path(compile_cache, "compile_cache")
    report = PatchReport(script=script)
    pieces = []
    if muon:
        pieces.append(("muon", lambda: _patch_muon(ns, report)))
    if ttt:
        def _ttt():
            why = _ttt_reason(ns)
            if not _has_doc_lora(ns):
                report.skipped["ttt"] = why
                return
            done = []

            def part(key: str, fn) -> None:  # one part of the piece: strict raises, else the rest still applies
                try:
                    done.append(fn(ns, report))
                except PatchError as e:
                    if strict:
                        raise
                    report.skipped[key] = str(e)

            part("ttt_tail", _patch_ttt_tail)
            if _compiles_ttt_dynamic(ns):
                import torch._dynamo

                report._undo.append((torch._dynamo.config, "specialize_float", torch._dynamo.config.specialize_float))
                torch._dynamo.config.specialize_float = True
                done.append("torch._dynamo.config.specialize_float = True for the record's TTT compile "
                            "(GPT.forward_ttt, dynamic shapes): its Python floats become constants, not "
                            "0-dim float64 graph inputs with host C++ kernels")
                part("ttt_eval_mode", _patch_ttt_eval_mode)
            if regional_ttt or (regional_ttt is None and _compiles_ttt_dynamic(ns)):
                part("ttt_regional", _patch_ttt_regional)
            if done:
                report.patched["ttt"] = "; ".join(done + [why])
            else:
                report.skipped["ttt"] = why
        pieces.append(("ttt", _ttt))
    if quant:
        def _quant():
            if callable(ns.get("quantize_int6_per_row")):
                why = ("its quantize_int6_per_row picks one clip percentile per tensor and floors row scales at "
                       "1/clip_range; the codec's per-row clip search has no floor, so codes and compressed bytes "
                       "would differ from the record's")
            elif callable(ns.get("quantize_state_dict_int8")) and not callable(ns.get("gptq_quantize_weight")):
                why = "its export is int8 (quantize_state_dict_int8), not int6"
            elif callable(ns.get("gptq_quantize_weight")):
                why = "its export is GPTQ (Hessian-compensated rounding), not a per-row int6 rounding"
            else:
                why = "no int6 per-row quantizer found in the script (looked for quantize_int6_per_row)"
            raise PatchError(f"the quant piece (int6 export through pgolf_kernels.quant) is not provided: {why}")
        pieces.append(("quant", _quant))
    if compile_cache is not None:
        pieces.append(("compile_cache", lambda: _compile_cache(os.fspath(compile_cache), cache_exists, report)))
    try:
        for name, fn in pieces:
            try:
                fn()
            except PatchError as e:
                if strict:
                    raise PatchError(f"pgolf_kernels.patch ({name}) on {script}: {e}") from None
                report.skipped[name] = str(e)
    except BaseException:
        report.undo()
        raise
    return report
