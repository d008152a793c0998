"""Lazy loader for the compiled extension ``pgolf_kernels._C``.

Imported only when a codec function needs it, never at package import, so that a
missing or stale build shows up as one clear error at the point of use.
"""
from __future__ import annotations

import functools

import torch

_REBUILD = "rebuild it with `pip install --no-build-isolation -e .` (offline: add --no-deps)"


@functools.lru_cache(maxsize=None)
def load_C():
    """Return the ``pgolf_kernels._C`` module or raise a RuntimeError that says what to do."""
    try:
        from . import _build_info  # written by setup.py
    except ImportError:
        _build_info = None
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
    return _C


def cuda_quantizer_status():
    """``(available, reason)`` for the CUDA quantizer (csrc/cuda) in the loaded ``pgolf_kernels._C``.

    ``reason`` is one line: what was built, or why the CUDA sources are not in this build (recorded by
    setup.py in ``_build_info.CUDA_REASON``) and how to get them.
    """
    C = load_C()
    if getattr(C, "has_cuda", False):
        return True, "pgolf_kernels._C has the CUDA quantizer (csrc/cuda)"
    try:
        from . import _build_info

        why = getattr(_build_info, "CUDA_REASON", None)
    except ImportError:
        why = None
    why = why or "the installed extension predates the CUDA build option"
    return False, (f"pgolf_kernels._C was built without the CUDA quantizer ({why}); to get it, build on a "
                   f"machine with a CUDA build of torch and nvcc ({_REBUILD})")

