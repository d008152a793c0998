"""Ahead-of-time compiled regional functions, saved to a folder and loaded by later processes (``--precompiled``).

``compile_rows_nll`` compiles four regional functions (block and head, with and without an adapter). With a
warm compile cache a process still re-traces them with Dynamo: 3.8 s of Dynamo tracing and ~14 s of warm-up in
a warm eval of the seeds' config on the H200 (``bench/results/eval-h200.md``). ``torch.compile(...).aot_compile``
traces and compiles once for given example inputs and packages the result (bytecode, guards, Inductor code)
so that a later process loads it without tracing; on 2 CPU cores a compiled adapted block with its backward
loaded in 3.4 s (imports included) and its first call took 0.01 s, equal to eager within 2.4e-7, on another
model instance and other (dynamic) shapes.

``Precompiled(fn, folder, name)`` stands in for ``torch.compile(fn, dynamic=True)``: each call runs the first
saved variant whose guards accept the arguments (grad mode, which inputs require grad, size-1 specializations);
when none does, it compiles a new variant ahead of time for these arguments, saves it and runs it. Files are
named by a fingerprint of everything a variant depends on beyond its guards (the function, the source of the
model, adapter and forward modules, the model config, torch's version and the device type), so a file is
never run for code or a model it was not made for. A variant whose guards never pass is not an error: the
function then compiles another one (at most ``MAX_VARIANTS``, then it falls back to the lazy
``torch.compile``, counted in ``stats``).
"""
from __future__ import annotations

import contextlib
import functools
import glob
import hashlib
import json
import os
import time
from typing import Callable, Dict, List

import torch

MAX_VARIANTS = 8  # 4 were met in a TTT eval with a separate score pass (grad / no-grad x block 0 / others)
_SOURCES = ("model.py", "adapters.py", "forward.py", "precompiled.py")


@functools.lru_cache(maxsize=1)
def unsupported_reason() -> str:
    """Why this torch cannot save and load compiled variants ('' when it can): it needs
    ``torch.compile(...).aot_compile`` and ``torch.compiler.load_compiled_function`` (torch 2.13 has both;
    torch 2.11 has neither: its compiled function raised AttributeError on ``aot_compile`` on the H200)."""
    missing = [n for n, ok in (("torch.compile(...).aot_compile", hasattr(torch.compile(_identity), "aot_compile")),
                               ("torch.compiler.load_compiled_function",
                                hasattr(torch.compiler, "load_compiled_function"))) if not ok]
    return f"torch {torch.__version__} lacks {' and '.join(missing)}" if missing else ""


def _identity(x):
    return x


def fingerprint(name: str, model, device) -> str:
    """Hex digest of what a saved variant depends on beyond its guards."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"fingerprint: name = {name!r}: expected the function's name (a non-empty str)")
    if not hasattr(model, "config"):
        raise TypeError(f"fingerprint: model must be a train.model.GPT (with .config), got {type(model).__name__}")
    h = hashlib.sha256()
    here = os.path.dirname(os.path.abspath(__file__))
    for src in _SOURCES:
        with open(os.path.join(here, src), "rb") as f:
            h.update(f.read())
    cfg = model.config.to_dict() if hasattr(model.config, "to_dict") else vars(model.config)
    h.update(json.dumps(dict(name=name, config=cfg, torch=torch.__version__, device=torch.device(device).type),
                        sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


# instance attributes compile_rows_nll sets on the model and its blocks (closures): the saved guard state pickles
# the modules it guards, and a closure cannot be pickled
_OVERRIDES = ("forward", "_pgolf_rows_nll")


@contextlib.contextmanager
def _plain_modules(args):
    """The modules among ``args`` (and their submodules) without compile_rows_nll's instance overrides, for the
    duration of an ahead-of-time compile; restored after."""
    saved = []
    for a in args:
        if isinstance(a, torch.nn.Module):
            for m in a.modules():
                for k in _OVERRIDES:
                    if k in m.__dict__:
                        saved.append((m, k, m.__dict__.pop(k)))
    try:
        yield
    finally:
        for m, k, v in saved:
            m.__dict__[k] = v


class Precompiled:
    """``torch.compile(fn, dynamic=True)`` with ahead-of-time compiled variants saved under ``folder`` (see the
    module docstring). ``stats``: variants loaded, compiled and saved, and calls that fell back to the lazy
    compile."""

    def __init__(self, fn: Callable, folder: str, name: str, key: str):
        if not isinstance(folder, str) or not folder:
            raise ValueError(f"precompiled: folder = {folder!r}: expected a folder path")
        if not callable(fn):
            raise TypeError(f"precompiled: fn must be callable, got {type(fn).__name__}")
        why = unsupported_reason()
        if why:
            raise RuntimeError(f"precompiled: {why}; run without --precompiled (the compile caches still apply)")
        os.makedirs(folder, exist_ok=True)
        self.fn, self.folder, self.prefix = fn, folder, f"{name}-{key}"
        self.variants: List[object] = []
        self.lazy = None
        self.stats: Dict[str, float] = dict(loaded=0, compiled=0, fallback_calls=0, load_s=0.0, compile_s=0.0)
        t = time.perf_counter()
        for path in sorted(glob.glob(os.path.join(folder, f"{self.prefix}-*.aot"))):
            try:
                with open(path, "rb") as f:
                    self.variants.append(torch.compiler.load_compiled_function(f))
            except Exception as e:  # noqa: BLE001 - any unreadable file: one line naming it, before any work
                raise RuntimeError(f"precompiled: {path} could not be loaded ({type(e).__name__}: "
                                   f"{' '.join(str(e).split())[:200]}); delete it to compile that variant again") from e
        self.stats["loaded"] = len(self.variants)
        self.stats["load_s"] = time.perf_counter() - t

    def __call__(self, *args):
        for v in self.variants:
            if v.guard_check(*args):
                # its compiled function without a second guard check (calling the variant checks again); a torch
                # without that attribute gets the checked call
                return getattr(v, "fn", v)(*args)
        if len(self.variants) >= MAX_VARIANTS:
            self.stats["fallback_calls"] += 1
            if self.lazy is None:
                self.lazy = torch.compile(self.fn, dynamic=True)
            return self.lazy(*args)
        t = time.perf_counter()
        with _plain_modules(args):
            v = torch.compile(self.fn, fullgraph=True, dynamic=True).aot_compile((args, {}))
        path = os.path.join(self.folder, f"{self.prefix}-{len(self.variants)}.aot")
        tmp = f"{path}.tmp{os.getpid()}"
        v.save_compiled_function(tmp)
        os.replace(tmp, path)  # a reader never sees half a file
        self.variants.append(v)
        self.stats["compiled"] += 1
        self.stats["compile_s"] += time.perf_counter() - t
        return v(*args)
