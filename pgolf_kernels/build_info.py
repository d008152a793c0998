"""``python3 -m pgolf_kernels.build_info``: what the installed build contains.

pip hides setup.py's own output, so scripts/install.sh calls this to say what was built (with or without
the CUDA quantizer, and why) and to load the extension once (a stale .so fails here, with the rebuild
command).
"""
from __future__ import annotations

import sys


def main() -> int:
    import torch

    import pgolf_kernels
    from pgolf_kernels._ext import cuda_quantizer_status, cxx_runtime, load_C

    try:
        from pgolf_kernels import _build_info as bi
    except ImportError:
        print("pgolf_kernels: no build info (the package was not installed through setup.py)")
        return 1
    C = load_C()
    print(f"pgolf_kernels {pgolf_kernels.__version__}: C++ extension pgolf_kernels._C built against torch "
          f"{bi.TORCH_VERSION} and loads with torch {torch.__version__}")
    shared, where = cxx_runtime(C.__file__)
    print(f"pgolf_kernels: C++ runtime: {'WARNING: ' if shared is False else ''}{where}")
    print(f"pgolf_kernels: link command: {getattr(bi, 'LINKER', 'not recorded')}")
    print("pgolf_kernels: GPU kernels are Triton, compiled on first use per device")
    cuda, why = cuda_quantizer_status()
    if cuda:
        print(f"pgolf_kernels: CUDA quantizer built (csrc/cuda: artifact quantization on the GPU): "
              f"{getattr(bi, 'CUDA_REASON', '')}")
    else:
        print(f"pgolf_kernels: CUDA quantizer NOT built, the artifact is quantized on the CPU: {why}")
    if getattr(bi, "CUDA_BUILT", False) != cuda:
        print(f"pgolf_kernels: the build info says CUDA_BUILT={getattr(bi, 'CUDA_BUILT', None)} but the loaded "
              f"extension {'has' if cuda else 'lacks'} the CUDA quantizer: a stale build; rebuild it")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
