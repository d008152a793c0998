"""A compile-cache file: torch.compile's caches of one process, saved to one file and loaded by a process on a machine
whose own caches are empty. Used by the eval driver (``--compile-cache FILE``) and by ``pgolf_kernels.patch.apply(...,
compile_cache=FILE)`` for a record script's own compiles.

What it holds is torch's "mega-cache" (``torch.compiler.save_cache_artifacts``): the Inductor FX-graph, AOTAutograd,
Triton-kernel and autotuning entries this process compiled or loaded. ``load_cache_artifacts`` puts them into the
local caches before the first compile, so later compiles become cache hits (Dynamo still traces: the file holds
no guards or bytecode). Torch keys each entry by its own version, the Triton version and the GPU, so a file made
with another torch, Triton or GPU loads but its entries miss: torch's compile counters say so.

Why: with empty caches the eval's warm-up spent 15.8 s compiling 2 Dynamo frames / 4 FX graphs on the H200, and 3.2 s
with warm ones (``bench/results/eval-h200.md``). On the 2-core CPU machine (torch 2.13) a process with empty cache
folders and the 1.24 MB file of a tiny model's TTT eval hit all 4 FX graphs and both AOTAutograd entries, and scored
the same to the last bit; but there the hits still rebuilt Inductor's C++ kernels from source (cpp_build 29.7 s of a
24.8 s eval's compile, threads overlapping; 32.8 s without the file), so on a CPU the file saves little. On CUDA the
kernels are Triton binaries: the GPU test (a second process on empty cache folders loads the file and hits) passes on
the H200; what the file saves in seconds is what ``bench warmup``'s ``seeds-ref-cachefile`` case measures (not yet
timed).

Format: the bytes ``save_cache_artifacts`` returns, unchanged (torch's own serialization), written to ``FILE.tmp``
and renamed, so a killed process leaves no half-written file.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Dict

__all__ = ["CompileCacheError", "check_compile_cache_path", "load_compile_cache", "save_compile_cache"]


class CompileCacheError(ValueError):
    """A compile-cache path or file that cannot be used: ``<arg> = <value>: expected <what>``, one line."""

    def __init__(self, arg: str, value, expected: str):
        self.arg, self.value, self.expected = arg, value, expected
        super().__init__(f"{arg} = {value!r}: expected {expected}")


def check_compile_cache_path(path, arg: str = "compile_cache") -> bool:
    """Refuse a path that cannot be a compile-cache file, before anything is loaded or compiled; returns whether it
    exists (and will be loaded) or not (and will be written). ``CompileCacheError`` naming ``arg``."""
    def bad(expected):
        return CompileCacheError(arg, path, expected)

    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise bad("a file path")
    path = os.fspath(path)
    if os.path.isdir(path):
        raise bad("a file, not a folder")
    if os.path.exists(path):
        if not os.path.isfile(path):
            raise bad("a regular file")
        if os.path.getsize(path) == 0:
            raise bad("a compile-cache file written by an earlier run (this one is empty: delete it to write a new one)")
        if not os.access(path, os.R_OK):
            raise bad("a readable file")
        return True
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise bad(f"a path in an existing folder (no folder {parent})")
    if not os.access(parent, os.W_OK):
        raise bad(f"a path in a writable folder ({parent} is not)")
    return False


def _entries(info) -> Dict[str, int]:
    """{kind: count} of a ``CacheInfo`` (e.g. inductor, aot_autograd, triton_*, autotune)."""
    arts = getattr(info, "artifacts", None) or {}
    return {str(k): len(v) for k, v in arts.items() if v}


def load_compile_cache(path: str, arg: str = "compile_cache") -> Dict[str, object]:
    """Load the file at ``path`` into this process's compile caches; returns {path, loaded_bytes, entries, load_s}. A
    file that torch cannot read raises ``CompileCacheError`` naming ``arg``."""
    import torch

    if not check_compile_cache_path(path, arg):
        raise CompileCacheError(arg, path, "an existing compile-cache file (this path does not exist)")
    path = os.fspath(path)
    t = time.perf_counter()
    with open(path, "rb") as f:
        blob = f.read()
    why = "torch read nothing from it"
    # torch logs a corrupt blob's traceback and returns None; the one line below says it instead
    quiet = logging.getLogger("torch.compiler._cache")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        info = torch.compiler.load_cache_artifacts(blob)
    except Exception as e:  # noqa: BLE001 - torch raises several types for a foreign or truncated blob
        info, why = None, f"{type(e).__name__}: {str(e)[:200]}"
    finally:
        quiet.setLevel(level)
    if info is None:
        raise CompileCacheError(arg, path, f"a compile-cache file this torch can read ({why}; delete it to write a new "
                                           f"one)")
    return dict(path=path, loaded_bytes=len(blob), entries=_entries(info), load_s=round(time.perf_counter() - t, 3))


def save_compile_cache(path: str, arg: str = "compile_cache") -> Dict[str, object]:
    """Write what this process compiled or loaded to ``path`` (atomically); returns {path, saved_bytes, entries,
    save_s}, with saved_bytes 0 when torch has nothing to save (nothing was compiled). A path that cannot be written
    raises ``CompileCacheError`` naming ``arg``."""
    import torch

    check_compile_cache_path(path, arg)
    path = os.fspath(path)
    t = time.perf_counter()
    art = torch.compiler.save_cache_artifacts()
    if art is None:
        return dict(path=path, saved_bytes=0, entries={}, save_s=round(time.perf_counter() - t, 3))
    blob, info = art
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(blob)
    os.replace(tmp, path)
    return dict(path=path, saved_bytes=len(blob), entries=_entries(info), save_s=round(time.perf_counter() - t, 3))
