"""Build script for pgolf_kernels.

Installs one package, ``pgolf_kernels``. The drivers (``train/``) and benchmarks (``bench/``) are not
installed: they run from a checkout (``python3 -m train``, ``python3 -m bench``).

The GPU kernels of the package are Triton, JIT-compiled per device. The compiled part, ``pgolf_kernels._C``,
is built here through ``torch.utils.cpp_extension`` (pybind11, ninja):

* always: C++ ``csrc/*.cpp`` (the artifact codec: per-row int-k quantization with clip search, the
  container, checksums);
* when torch has CUDA and a CUDA toolkit is found: also ``csrc/cuda/*.cu``, the codec's quantizer on the
  GPU (bit-exact with the C++ one), so a training run quantizes its artifact where the weights are. The
  C++ quantizer stays the fallback: without the CUDA build, ``pgolf_kernels.quant.quantize_rows`` runs on
  the CPU and says why (docs/cuda_build.md).

What was built, and why, goes to ``pgolf_kernels/_build_info.py``; ``python3 -m pgolf_kernels.build_info``
prints it (scripts/install.sh does). torch must already be importable (the extension is built against it):

    pip install --no-build-isolation -e .            # online machine
    pip install --no-build-isolation --no-deps -e .  # offline machine (torch, triton preinstalled)

Environment:
    PGOLF_BUILD_CUDA=auto|1|0  auto (default): build the CUDA sources when possible, else say why not;
                               1: they must build (an error otherwise); 0: never build them.
    CUDA_HOME                  the toolkit to use (default: found from nvcc on PATH or /usr/local/cuda).
    TORCH_CUDA_ARCH_LIST       target GPUs, as for every torch extension (default here: sm_90 + PTX,
                               H100/H200).
    MAX_JOBS                   ninja's parallelism, as for every torch extension.
"""
import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _version() -> str:
    """The one version source: ``__version__`` in pgolf_kernels/__init__.py (read as text: importing the
    package here would need its dependencies at build time)."""
    with open(os.path.join(ROOT, "pgolf_kernels", "__init__.py")) as f:
        m = re.search(r'^__version__ = "([^"]+)"$', f.read(), re.M)
    if m is None:
        raise RuntimeError("pgolf_kernels/__init__.py lacks a line __version__ = \"X.Y.Z\"")
    return m.group(1)


try:
    import torch
    from torch.utils import cpp_extension
except ImportError:  # pragma: no cover - exercised only on a machine without torch
    sys.stderr.write(
        "pgolf_kernels: torch is not importable. Install torch first "
        "(CPU-only host: `pip install torch==2.13.0`), then run "
        "`pip install --no-build-isolation -e .` (see README.md).\n"
    )
    raise


CPU_SOURCES = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
CUDA_SOURCES = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
# -ffp-contract=off: the CUDA quantizer reproduces the C++ one bit for bit, which needs every a*b+c rounded
# twice on the CPU too (x86-64 without -march has no FMA anyway; aarch64 would contract by default).
# -g0: Python's own CFLAGS carry -g, and debug information for torch's headers took a third of each translation unit's
# compile (codec.cpp 35 -> 25 s, g++, 2-core host); nothing here is debugged from the built module
CXX_FLAGS = ["-O3", "-g0", "-std=c++17", "-ffp-contract=off"]
# No --use_fast_math: the kernel's divisions, square roots and denormals must be IEEE like the C++ codec's.
NVCC_FLAGS = ["-O3"]
DEFAULT_ARCH = ["-gencode=arch=compute_90,code=sm_90", "-gencode=arch=compute_90,code=compute_90"]


def _cuda_home():
    """A CUDA toolkit root holding bin/nvcc and include/cuda_runtime.h, or None. torch's own guess takes
    dirname(dirname(which nvcc)), which is wrong when PATH's nvcc is a wrapper script (/usr/local/bin/nvcc)."""
    nvcc = shutil.which("nvcc")
    cands = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), cpp_extension.CUDA_HOME,
             os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else None, "/usr/local/cuda"]
    for home in cands:
        if home and all(os.path.isfile(os.path.join(home, *p)) for p in (("bin", "nvcc"), ("include", "cuda_runtime.h"))):
            return home
    return None


def _nvcc_version(home):
    """'13.0' from `nvcc --version` ("... release 13.0, V13.0.88"), or None when it does not run."""
    try:
        out = subprocess.run([os.path.join(home, "bin", "nvcc"), "--version"], capture_output=True, text=True,
                             timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else None


def _cuda_plan():
    """-> (build the CUDA sources?, why, toolkit root or None). PGOLF_BUILD_CUDA=1 turns a no into an error."""
    mode = os.environ.get("PGOLF_BUILD_CUDA", "auto").strip().lower()
    if mode not in ("auto", "1", "0"):
        raise SystemExit(f"pgolf_kernels: PGOLF_BUILD_CUDA must be auto, 1 or 0, got {mode!r}")
    home = None
    if mode == "0":
        reason = "PGOLF_BUILD_CUDA=0"
    elif not CUDA_SOURCES:
        reason = "there are no CUDA sources in csrc/cuda"
    elif torch.version.cuda is None:
        reason = f"torch {torch.__version__} is a CPU-only build (torch.version.cuda is None)"
    else:
        home = _cuda_home()
        nvcc = _nvcc_version(home) if home else None
        if home is None:
            reason = "no CUDA toolkit found (set CUDA_HOME, or put the toolkit's nvcc on PATH)"
        elif nvcc is None or nvcc.split(".")[0] != torch.version.cuda.split(".")[0]:
            # torch refuses a different major version at build time; say so here instead of failing there
            reason = f"nvcc {home}/bin/nvcc is CUDA {nvcc}, torch {torch.__version__} is built for CUDA {torch.version.cuda}"
        else:
            return True, f"torch {torch.__version__} (CUDA {torch.version.cuda}), nvcc {nvcc} at {home}", home
    if mode == "1":
        raise SystemExit(f"pgolf_kernels: PGOLF_BUILD_CUDA=1 but the CUDA sources cannot be built: {reason}")
    return False, reason, None


# The CUDA plan (_extensions) and the link command with the static-runtime flags dropped from it (BuildExt).
# _build_info.py is written only when an extension is built: `setup.py --version` and other metadata calls
# must not overwrite the installed build's record.
_PLAN = []    # [built with CUDA?, why]
_LINKER = []  # [link command, flags dropped]


def _write_build_info(cuda: bool, reason: str):
    path = os.path.join(ROOT, "pgolf_kernels", "_build_info.py")
    with open(path, "w") as f:
        f.write("# Generated by setup.py; records what pgolf_kernels._C was built against.\n")
        f.write(f"TORCH_VERSION = {torch.__version__!r}\n")
        f.write(f"CUDA_BUILT = {cuda!r}  # csrc/cuda/*.cu compiled into pgolf_kernels._C\n")
        f.write(f"CUDA_REASON = {reason!r}\n")
        if _LINKER:
            f.write(f"LINKER = {_LINKER[0]!r}  # sysconfig's link command, less {_LINKER[1]}\n")


def _cpu_extension():
    return cpp_extension.CppExtension(name="pgolf_kernels._C", sources=CPU_SOURCES, extra_compile_args={"cxx": CXX_FLAGS})


def _extensions():
    cuda, reason, home = _cuda_plan()
    _PLAN[:] = [cuda, reason]
    print(f"pgolf_kernels: {'building' if cuda else 'not building'} the CUDA quantizer: {reason}")
    if not cuda:
        return [_cpu_extension()]
    os.environ["CUDA_HOME"] = home
    cpp_extension.CUDA_HOME = home  # read when the toolkit's include/lib paths are joined
    arch = [] if os.environ.get("TORCH_CUDA_ARCH_LIST") else DEFAULT_ARCH
    ext = cpp_extension.CUDAExtension(name="pgolf_kernels._C", sources=CPU_SOURCES + CUDA_SOURCES,
                                      define_macros=[("PGOLF_WITH_CUDA", None)],
                                      extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS + arch})
    ext.pgolf_cuda = True
    return [ext]


# Flags that would link a private copy of the C++ runtime into pgolf_kernels._C. Next to torch's shared
# libstdc++ in one process, two runtimes crash any C++ exception: on the GPU image (Python 3.12 venv, torch
# 2.11.0+cu130) the extension came out with __cxa_throw and __gxx_personality_v0 defined inside it, and every
# error it raised (a NaN row, bits=99) was a SIGSEGV, while a load_inline module on the same machine raised
# normally. The link command comes from Python's sysconfig (LDSHARED, LDFLAGS), which this build does not
# control; these flags are dropped from it and the command is recorded in _build_info.LINKER. A compiler that
# finds no libstdc++.so (no development symlink) would take libstdc++.a as well: then the runtime's own
# libstdc++.so.6 is named on the link line (_shared_libstdcxx).
STATIC_RUNTIME_FLAGS = ("-static", "-static-libstdc++", "-static-libgcc")


def _shared_libstdcxx(cxx):
    """Extra link inputs that make ``cxx`` link the shared libstdc++: none where it finds libstdc++.so, else
    the absolute path of libstdc++.so.6 (Linux only)."""
    def where(name):
        try:
            out = subprocess.run([cxx, f"-print-file-name={name}"], capture_output=True, text=True, timeout=60).stdout
        except (OSError, subprocess.SubprocessError):
            return None
        out = out.strip()
        return out if os.path.isabs(out) and os.path.exists(out) else None

    if not sys.platform.startswith("linux") or where("libstdc++.so"):
        return []
    so6 = where("libstdc++.so.6")
    return [os.path.realpath(so6)] if so6 else []


class BuildExt(cpp_extension.BuildExtension):
    """With PGOLF_BUILD_CUDA=auto, a CUDA build that fails (compiler, toolkit/torch mismatch) falls back to
    the C++-only extension, and the failure is recorded as the reason in _build_info.py: install.sh prints
    it, and tests/test_quant_cuda.py fails on a GPU machine whose build tried CUDA and could not. The link
    always uses the shared C++ runtime (STATIC_RUNTIME_FLAGS)."""

    def build_extensions(self):
        dropped = []
        for attr in ("linker_so", "linker_so_cxx", "compiler_cxx"):
            cmd = getattr(self.compiler, attr, None)
            if isinstance(cmd, list):
                dropped += [a for a in cmd if a in STATIC_RUNTIME_FLAGS]
                setattr(self.compiler, attr, [a for a in cmd if a not in STATIC_RUNTIME_FLAGS])
        cxx = (self.compiler.compiler_cxx or ["c++"])[0]
        extra = _shared_libstdcxx(cxx)
        for ext in self.extensions:
            ext.extra_link_args = list(ext.extra_link_args or []) + extra
        linker = " ".join((getattr(self.compiler, "linker_so_cxx", None) or self.compiler.linker_so or []) + extra)
        _LINKER[:] = [linker, sorted(set(dropped))]
        _write_build_info(*_PLAN)
        return super().build_extensions()

    def build_extension(self, ext):
        if not getattr(ext, "pgolf_cuda", False):
            return super().build_extension(ext)
        try:
            return super().build_extension(ext)
        except Exception as e:  # noqa: BLE001 - any build error; PGOLF_BUILD_CUDA=1 re-raises it
            if os.environ.get("PGOLF_BUILD_CUDA", "auto").strip() == "1":
                raise
            first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")
            first = first if len(first) <= 100 else first[:100] + "..."
            reason = (f"the CUDA build failed ({type(e).__name__}: {first}); PGOLF_BUILD_CUDA=1 pip install -v ... "
                      f"shows the compiler's output")
            sys.stderr.write(f"pgolf_kernels: {reason}; building the C++ codec only\n")
            _write_build_info(False, reason)
            cpu = _cpu_extension()  # its sources, include/library paths and libraries (no cudart, c10_cuda...)
            for attr in ("sources", "include_dirs", "library_dirs", "libraries", "runtime_library_dirs"):
                setattr(ext, attr, list(getattr(cpu, attr)))
            ext.define_macros = [m for m in ext.define_macros if m[0] != "PGOLF_WITH_CUDA"]
            ext.pgolf_cuda = False
            return super().build_extension(ext)


setup(
    name="pgolf_kernels",
    version=_version(),
    description="Fused Triton kernels (int6 dequant-matmul, batched multi-LoRA, Newton-Schulz/Muon) "
    "and a C++ int-k artifact codec for parameter-golf-style tiny LM training and evaluation",
    packages=["pgolf_kernels"],
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "triton>=3.2",
        "pybind11>=2.12",
        "ninja",
        "zstandard>=0.22",
    ],
    extras_require={"test": ["pytest>=8"]},
    ext_modules=_extensions(),
    cmdclass={"build_ext": BuildExt.with_options(use_ninja=True)},
    zip_safe=False,
)
