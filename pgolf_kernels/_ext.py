"""Lazy loader for the compiled extension ``pgolf_kernels._C``.

Imported only when a codec function needs it, never at package import, so that a
missing or stale build shows up as one clear error at the point of use.
"""
from __future__ import annotations

import ctypes
import functools
import os
import warnings

import torch

_REBUILD = "rebuild it with `pip install --no-build-isolation -e .` (offline: add --no-deps)"


@functools.lru_cache(maxsize=None)
def load_C():
    """Return the ``pgolf_kernels._C`` module or raise a RuntimeError that says what to do."""
    _build_info = _build_info_module()
    try:
        from . import _C  # noqa: F401
    except ImportError as e:
        built = getattr(_build_info, "TORCH_VERSION", None)
        if built is not None and built != torch.__version__:
            raise RuntimeError(
                f"pgolf_kernels._C was built against torch {built} but torch {torch.__version__} is "
                f"imported; {_REBUILD}. (original error: {e})"
            ) from e
        raise RuntimeError(
            f"pgolf_kernels._C (the C++ codec) is not importable: {e}. Build it: {_REBUILD}."
        ) from e
    built_so = _C.built_with_torch()
    here = torch.__version__.split("+")[0]
    if built_so != "unknown" and built_so != here:
        raise RuntimeError(
            f"pgolf_kernels._C was built against torch {built_so} but torch {torch.__version__} is "
            f"imported; {_REBUILD}."
        )
    shared, where = cxx_runtime(_C.__file__)
    if shared is False:
        # the extension still works; its error paths do not (see cxx_runtime)
        warnings.warn(f"pgolf_kernels._C: {where}", RuntimeWarning, stacklevel=2)
    return _C


class _DlInfo(ctypes.Structure):
    _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
                ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]


@functools.lru_cache(maxsize=None)
def cxx_runtime(so_path: str):
    """``(shared, where)``: whether the compiled module ``so_path`` (already loaded) throws C++ exceptions
    through the process's shared C++ runtime. ``shared`` is False when ``__cxa_throw`` resolves inside the
    module itself: a private copy of the runtime linked in statically, next to torch's libstdc++ in the same
    process -- there any C++ exception raised in the module crashed the process with SIGSEGV instead of reaching
    Python (setup.py's ``STATIC_RUNTIME_FLAGS``). None when this cannot be told (no ``dladdr``)."""
    try:
        libc = ctypes.CDLL(None)
        addr = ctypes.cast(getattr(ctypes.CDLL(so_path), "__cxa_throw"), ctypes.c_void_p).value
        info = _DlInfo()
        if not libc.dladdr(ctypes.c_void_p(addr), ctypes.byref(info)) or not info.dli_fname:
            return None, "__cxa_throw: dladdr found no library"
        lib = info.dli_fname.decode()
    except (OSError, AttributeError) as e:
        return None, f"the C++ runtime could not be located ({type(e).__name__}: {e})"
    if os.path.realpath(lib) == os.path.realpath(so_path):
        linker = getattr(_build_info_module(), "LINKER", "not recorded")
        return False, (f"{os.path.basename(so_path)} carries its own copy of the C++ runtime (__cxa_throw is defined "
                       f"in it, not taken from the process's libstdc++): any error it raises would crash the "
                       f"process instead of raising. Link command: {linker}; relink with a shared libstdc++ "
                       f"({_REBUILD})")
    return True, f"shared C++ runtime ({lib})"


def _build_info_module():
    """``pgolf_kernels._build_info`` (written by setup.py), or None."""
    try:
        from . import _build_info

        return _build_info
    except ImportError:
        return None


def cuda_quantizer_status():
    """``(available, reason)`` for the CUDA quantizer (csrc/cuda) in the loaded ``pgolf_kernels._C``.

    ``reason`` is one line: what was built, or why the CUDA sources are not in this build (recorded by
    setup.py in ``_build_info.CUDA_REASON``) and how to get them.
    """
    C = load_C()
    if getattr(C, "has_cuda", False):
        return True, "pgolf_kernels._C has the CUDA quantizer (csrc/cuda)"
    why = getattr(_build_info_module(), "CUDA_REASON", None) or "the installed extension predates the CUDA build option"
    return False, (f"pgolf_kernels._C was built without the CUDA quantizer ({why}); to get it, build on a "
                   f"machine with a CUDA build of torch and nvcc ({_REBUILD})")

