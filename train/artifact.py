"""The submission artifact: quantized weights + config, compressed; bytes = model file + code.

Storage policy (per tensor of the model's state dict):
  * 2-D weights inside the blocks (c_q, c_k, c_v, proj, mlp fc / proj): int6 codes in [-31, 31],
    one per int8 byte, with one fp16 scale per output row (``pgolf_kernels.quant.quantize_rows``,
    clip chosen by reconstruction-MSE search): w ~ q * scale[:, None].
  * embeddings (``tok_emb.weight``, ``lm_head.weight`` if untied): int8 codes, per-row fp16 scale.
  * everything else (gains, scales, residual mixes, skip weights: a few thousand values): fp16.
The entries and a ``meta`` dict (model config, format tag) go through ``pack_artifact`` (zstd-22).
The codes are computed on the weights' GPU when ``pgolf_kernels._C`` has the CUDA quantizer (bit-exact with
the C++ one), else on the CPU; ``save_artifact`` reports which, and where its time went.

Artifact bytes as the challenge counts them = compressed model file + the bytes of the code a
submission ships. The code is every file of this repository that the training entry (``python3 -m train``)
and the eval entry (``python3 -m train.eval``) import, found by walking their import statements
(``code_paths_for_entry``), plus the C++ sources of the compiled codec when it is imported and the recipe that
builds it (``BUILD_FILES``); it ships, and is counted, as one self-extracting file (``train.code_pack``), the
form the records ship their ``train_gpt.py`` in: ~210 KB instead of ~650 KB of files.
"""
from __future__ import annotations

import ast
import functools
import glob
import os
import threading
import time
from typing import Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn as nn

from .model import GPT, GPTConfig

ARTIFACT_FORMAT = "pgolf-train-artifact/1"
SIZE_LIMIT = 16_000_000
MATRIX_BITS = 6
EMBED_BITS = 8
CODEC_NAME = "pgolf_kernels.quant"
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------- codec
def _codec():
    """The artifact codec, ``pgolf_kernels.quant`` (C++ clip search + zstd container), with its compiled
    extension loaded: a missing or stale build raises one RuntimeError naming the rebuild command here,
    before any quantization work. Callers use it by name (``codec.quantize_rows``, ``codec.pack_artifact``...)."""
    from pgolf_kernels import quant
    from pgolf_kernels._ext import load_C

    load_C()
    return quant


# ---------------------------------------------------------------- policy
def matrix_names(model: GPT) -> List[str]:
    return [n for n, _ in model.matrix_params()]


def embedding_names(model: GPT) -> List[str]:
    return [n for n, _ in model.embedding_params()]


def _coarsen(qt, w: torch.Tensor, mult: float):
    """Re-quantize ``w`` on a grid ``mult`` times coarser than ``qt``'s (same code range, no extra
    clipping: the clip range grows with the step). Fewer distinct codes -> fewer bytes after zstd."""
    QTensor = type(qt)
    qmax = 2 ** (int(qt.bits) - 1) - 1
    s = (qt.scale.float() * mult).clamp(max=60000.0).half()
    sf = s.float()
    safe = torch.where(sf == 0, torch.ones_like(sf), sf)
    q = torch.round(w.float() / safe[:, None]).clamp(-qmax, qmax)
    q = torch.where(sf[:, None] == 0, torch.zeros_like(q), q)
    return QTensor(q.to(torch.int8).contiguous(), s, qt.bits)


def quantize_device(state: Dict[str, torch.Tensor]) -> Tuple[torch.device, str]:
    """Where the artifact's matrices are quantized, and a one-line why for the log: on the weights' GPU when
    they sit on one and ``pgolf_kernels._C`` has the CUDA quantizer (bit-exact with the C++ one, so the
    artifact's bytes do not depend on the choice), else on the CPU (C++ codec)."""
    from pgolf_kernels._ext import cuda_quantizer_status

    gpu = next((t.device for t in state.values() if t.device.type == "cuda"), None)
    if gpu is None:
        return torch.device("cpu"), "cpu (C++ codec): the weights are on the CPU"
    ok, why = cuda_quantizer_status()
    if ok:
        return gpu, f"{gpu} (CUDA quantizer, csrc/cuda)"
    return torch.device("cpu"), f"cpu (C++ codec), the weights are on {gpu} but {why}"


def _quantize_entries(model: GPT, state: Dict[str, torch.Tensor], device: torch.device):
    """State dict -> (entries per the storage policy at the codec's MSE-optimal step, fp32 block matrices on
    ``device`` for ``_at_step``). Codes stay on ``device``; the fp16 tensors go to the CPU."""
    codec = _codec()
    backend = "cuda" if device.type == "cuda" else "cpu"
    mats, embs = set(matrix_names(model)), set(embedding_names(model))
    entries, weights = {}, {}
    for name, t in state.items():
        t = t.detach()
        if name in mats or name in embs:
            w = t.to(device=device, dtype=torch.float32).contiguous()
            bits = MATRIX_BITS if name in mats else EMBED_BITS
            entries[name] = codec.quantize_rows(w, bits=bits, clip="search", backend=backend)
            if name in mats:
                weights[name] = w
        else:
            entries[name] = t.to("cpu").to(torch.float16).contiguous()
    return entries, weights


def _at_step(entries: dict, weights: Dict[str, torch.Tensor], step_mult: float) -> dict:
    """``entries`` with the block matrices (``weights``) coarsened by ``step_mult`` (1.0: unchanged)."""
    if step_mult == 1.0:
        return entries
    return {n: _coarsen(v, weights[n], step_mult) if n in weights else v for n, v in entries.items()}


def quantize_model(model: GPT, state: Optional[Dict[str, torch.Tensor]] = None, step_mult: float = 1.0):
    """State dict (default: the model's) -> entries dict per the storage policy, on the CPU.

    ``step_mult`` > 1 coarsens the int6 grid of the block matrices by that factor (used by
    ``save_artifact`` to fit the byte budget; 1.0 = the codec's MSE-optimal clip search). Quantized where
    ``quantize_device`` says (the same codes either way)."""
    state = state if state is not None else model.state_dict()
    entries, weights = _quantize_entries(model, state, quantize_device(state)[0])
    out = _at_step(entries, weights, step_mult)
    return {n: (v.to("cpu") if hasattr(v, "bits") else v) for n, v in out.items()}


# ---------------------------------------------------------------- code bytes
# The entry points a submission runs: training (``python3 -m train``) and evaluation (``python3 -m train.eval``).
DRIVER_ENTRIES = ("train", "train.eval")
# Compiled extensions have no .py file to walk; importing one ships its sources.
EXTENSION_SOURCES = {"pgolf_kernels._C": ("csrc/*.cpp", "csrc/*.h", "csrc/cuda/*.cu", "csrc/cuda/*.cuh")}
# what builds them where the code pack is extracted (``setup.py build_ext --inplace``)
BUILD_FILES = ("setup.py", "pyproject.toml")
# written by that build (git-ignored; it describes the machine that built it): imported, but not shipped
GENERATED_FILES = ("pgolf_kernels/_build_info.py",)


def _module_file(name: str, root: str) -> Optional[str]:
    """The file under ``root`` that ``import name`` executes (package __init__ or module), or None."""
    base = os.path.join(root, *name.split("."))
    for cand in (os.path.join(base, "__init__.py"), base + ".py"):
        if os.path.isfile(cand):
            return cand
    return None


def _imported_names(path: str, name: str) -> List[str]:
    """Absolute names of every module ``path`` (module ``name``) may import: each import statement in the file,
    function-local and conditional ones included (over-counting a lazy import is the safe side of a size
    limit); ``from X import y`` also names ``X.y`` in case y is a submodule."""
    is_pkg = os.path.basename(path) == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), filename=path)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                if node.level > 1:
                    parts = parts[: len(parts) - (node.level - 1)]
                mod = ".".join(parts + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.append(mod)
            out += [f"{mod}.{a.name}" for a in node.names if a.name != "*"]
    return out


def code_paths_for_entry(module: str, root: Optional[str] = None) -> List[str]:
    """Files of the repository at ``root`` (default: this repo) that ``python3 -m <module>`` imports: the
    entry module (its ``__main__.py`` for a package), every parent package's ``__init__.py``, and the
    transitive closure of their import statements restricted to modules that resolve to a file under
    ``root`` (third-party imports resolve nowhere there and are not counted). An imported compiled
    extension counts its sources (``EXTENSION_SOURCES``). Sorted absolute paths."""
    root = os.path.abspath(root or _ROOT)
    start = _module_file(module, root)
    if start is None:
        raise ValueError(f"code_paths_for_entry: module {module!r} is not a module or package under {root}")
    todo = [module]
    if start.endswith("__init__.py") and os.path.isfile(os.path.join(os.path.dirname(start), "__main__.py")):
        todo.append(module + ".__main__")
    seen, files = set(), set()
    while todo:
        name = todo.pop()
        if not name or name in seen:
            continue
        seen.add(name)
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # importing a.b.c runs a and a.b first
        for pattern in EXTENSION_SOURCES.get(name, ()):
            files.update(glob.glob(os.path.join(root, pattern)))
        path = _module_file(name, root)
        if path is None or path in files:
            continue
        files.add(path)
        todo += _imported_names(path, name)
    return sorted(os.path.abspath(p) for p in files)


def code_bytes_for_entry(module: str, root: Optional[str] = None) -> int:
    """Bytes of ``code_paths_for_entry(module, root)``: what shipping that entry point's code costs."""
    return code_bytes(code_paths_for_entry(module, root))


def default_code_paths() -> List[str]:
    """The code a submission ships with the weights: the union of the import graphs of the training and
    the eval entry points (``DRIVER_ENTRIES``). The walk parses ~40 files (0.3-0.7 s on 2 cores) and the
    repo's sources do not change under a running process, so it is done once per process; the byte
    count (``code_bytes``) is read fresh each time."""
    return list(_driver_code_paths())


_WALK_LOCK = threading.Lock()


def _driver_code_paths() -> Tuple[str, ...]:
    with _WALK_LOCK:  # a second caller waits for a walk in progress (``prefetch_code_paths``) instead of repeating it
        return _walk_driver_code_paths()


@functools.lru_cache(maxsize=1)
def _walk_driver_code_paths() -> Tuple[str, ...]:
    return tuple(sorted(set().union(*(code_paths_for_entry(m) for m in DRIVER_ENTRIES))))


def prefetch_code_paths() -> threading.Thread:
    """Start the import-graph walk of ``default_code_paths`` in a daemon thread, so that a later
    ``submission_bytes`` finds it done: the eval starts it before decoding the artifact, whose zstd
    decompression and GPU copies release the interpreter lock (the walk alone took 0.8 s of the eval's load
    on 2 cores). A failure surfaces again, by name, in the caller's own ``default_code_paths()``."""
    def walk():
        try:
            _driver_code_paths()
        except Exception:  # noqa: BLE001 - the foreground call repeats the walk and raises
            pass

    t = threading.Thread(target=lambda: (walk(), _prefetch_pack()), name="pgolf-code-paths", daemon=True)
    t.start()
    return t


def _prefetch_pack() -> None:
    try:
        code_pack_bytes()  # xz releases the interpreter lock: the pack is made beside the eval's artifact decode
    except Exception:  # noqa: BLE001 - the foreground call repeats it and raises
        pass


def code_bytes(paths: Iterable[str]) -> int:
    """Bytes of the files ``paths`` as they are (the unpacked size; ``code_pack_bytes`` is what is counted)."""
    return sum(os.path.getsize(p) for p in paths)


def _default_shipped() -> List[str]:
    skip = {os.path.join(_ROOT, *f.split("/")) for f in GENERATED_FILES}
    return [p for p in default_code_paths() if p not in skip] + [os.path.join(_ROOT, f) for f in BUILD_FILES]


def submission_code_files(code_paths: Optional[Iterable[str]] = None) -> Dict[str, bytes]:
    """``{relative path: bytes}`` of the code a submission ships: ``default_code_paths()`` less ``GENERATED_FILES``,
    and ``BUILD_FILES``, relative to the repository; or exactly ``code_paths``, relative to the repository (or to
    their common folder when they lie outside it)."""
    from .code_pack import files_of

    if code_paths is None:
        return files_of(_default_shipped(), _ROOT)
    paths = [os.path.abspath(p) for p in code_paths]
    if not paths:
        return {}  # no code counted (tests, scratch artifacts)
    inside = all(not os.path.relpath(p, _ROOT).startswith("..") for p in paths)
    return files_of(paths, _ROOT if inside else os.path.commonpath([os.path.dirname(p) for p in paths]))


_PACKS: Dict[Tuple, Tuple[bytes, int, int]] = {}
_PACK_LOCK = threading.Lock()


def _packed(code_paths: Optional[Iterable[str]]) -> Tuple[bytes, int, int]:
    """(the packed file, number of files, their unpacked bytes) of ``submission_code_files(code_paths)``, kept per
    process for unchanged files (sizes and modification times): packing the drivers takes ~0.21 s on 2 cores
    (bench/results/code-pack-cpu.md) and the eval asks at load."""
    from .code_pack import has_module, pack

    if isinstance(code_paths, (str, bytes, os.PathLike)):
        raise TypeError(f"code_paths: expected a list of file paths (or None for the drivers' code), got one path "
                        f"{code_paths!r}")
    paths = tuple(os.path.abspath(p) for p in code_paths) if code_paths is not None else None
    if paths == ():
        return b"", 0, 0  # no code: nothing to pack

    def stamp(p):
        try:
            st = os.stat(p)
            return (p, st.st_size, st.st_mtime_ns)
        except OSError:
            return (p,)  # files_of below refuses it by name

    key = (paths is None,) + tuple(stamp(p) for p in (paths if paths is not None else _default_shipped()))
    with _PACK_LOCK:
        if key not in _PACKS:
            files = submission_code_files(paths)
            _PACKS.clear()
            _PACKS[key] = (pack(files, [e for e in DRIVER_ENTRIES if has_module(files, e)]), len(files),
                           sum(len(v) for v in files.values()))
        return _PACKS[key]


def code_pack_bytes(code_paths: Optional[Iterable[str]] = None) -> bytes:
    """The self-extracting file (``train.code_pack.pack``) of ``submission_code_files(code_paths)``, entries
    ``DRIVER_ENTRIES`` (those it holds); empty for ``code_paths=[]``. This is the code a submission ships and what
    its byte count charges."""
    return _packed(code_paths)[0]


def submission_bytes(model_path: str, code_paths: Optional[Iterable[str]] = None) -> dict:
    """What a submission of the artifact at ``model_path`` pays: ``dict(bytes_model, bytes_code, bytes_code_files,
    bytes_total, limit, ok)``: code = the packed file of ``default_code_paths()`` and ``BUILD_FILES`` unless
    ``code_paths`` are given (``bytes_code_files``: the same files unpacked). The drivers' size checks call this,
    so both count code + model against ``SIZE_LIMIT``."""
    nb_model = os.path.getsize(model_path)
    data, _, raw = _packed(code_paths)
    total = nb_model + len(data)
    return dict(bytes_model=nb_model, bytes_code=len(data), bytes_code_files=raw, bytes_total=total,
                limit=SIZE_LIMIT, ok=total <= SIZE_LIMIT)


def save_artifact(model: GPT, path: str, code_paths: Optional[Iterable[str]] = None,
                  state: Optional[Dict[str, torch.Tensor]] = None, extra_meta: Optional[dict] = None,
                  level: int = 22, warn: bool = True, fit: bool = True, limit: Optional[int] = None) -> dict:
    """Quantize + compress ``model`` (or ``state``, e.g. EMA weights) to ``path``.

    With ``fit`` (default), when the MSE-optimal int6 codes would make model + code exceed ``limit``
    (default 16,000,000), the int6 grid of the block matrices is coarsened by the smallest factor
    ``step_mult`` in [1, 4] that fits (bisection on zstd-3 sizes, then the real zstd-``level`` pack;
    Gaussian-like weights cost ~5.4 bits/param at the MSE-optimal step, 26.5 M of them ~18 MB, so the
    default model needs this unless training made its rows heavy-tailed). ``step_mult`` is logged in
    meta and the result; the quantization gap it costs shows in the after-quantization eval.
    Quantization runs once, where ``quantize_device`` says (the weights' GPU with the CUDA quantizer).
    Returns ``dict(bytes_model, bytes_code, bytes_total, codec, code_files, bytes_code_files, step_mult, quantize,
    seconds, packs)`` (``bytes_code``: the packed code, ``submission_code_files``; ``bytes_code_files``: those files
    unpacked): ``quantize`` says where the codes were computed and why, ``seconds`` splits the wall time
    (quantize, coarsen, pack_fit = the zstd-3 fit packs, pack = the zstd-``level`` packs) and ``packs``
    counts both kinds of pack; prints a loud warning when ``bytes_total`` still exceeds the limit.
    """
    codec = _codec()
    limit = SIZE_LIMIT if limit is None else int(limit)
    code, n_code_files, raw_code = _packed(code_paths)
    nb_code = len(code)
    state = {k: v.detach() for k, v in (state if state is not None else model.state_dict()).items()}
    device, where = quantize_device(state)
    meta = {"format": ARTIFACT_FORMAT, "config": model.config.to_dict(), "codec": CODEC_NAME,
            "matrix_bits": MATRIX_BITS, "embed_bits": EMBED_BITS}
    if extra_meta:
        meta.update(extra_meta)
    secs = dict(quantize=0.0, coarsen=0.0, pack_fit=0.0, pack=0.0)

    def timed(key, fn, *args):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        out = fn(*args)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        secs[key] += time.perf_counter() - t0
        return out

    # The clip search runs once: every step_mult tried below re-grids these codes' weights (_coarsen),
    # it does not re-search (measured on 2 shared CPU cores: 10 searches were 14-31 s of a 115-268 s write).
    entries, weights = timed("quantize", _quantize_entries, model, state, device)
    packs = dict(fit=0, final=0)

    def build(mult, lvl, final=False):
        ents = timed("coarsen", _at_step, entries, weights, mult)
        packs["final" if final else "fit"] += 1
        return timed("pack" if final else "pack_fit", codec.pack_artifact, ents, dict(meta, step_mult=mult), lvl)

    mult = 1.0
    target = limit - nb_code
    # zstd-22 on 26 M int8 codes takes ~20 s single-threaded; decide with zstd-3 (within ~0.5 %) first
    if fit and len(build(1.0, 3)) > target * 0.995:
        lo, hi = 1.0, 4.0
        if len(build(hi, 3)) > target * 0.995:
            mult = hi  # cannot fit even at 4x: keep the coarsest and warn below
        else:
            for _ in range(7):  # 3/2^7 = 0.023 resolution on the factor
                mid = 0.5 * (lo + hi)
                if len(build(mid, 3)) <= target * 0.995:
                    hi = mid
                else:
                    lo = mid
            mult = hi
    blob = build(mult, level, final=True)
    while fit and len(blob) > target and mult < 4.0:
        mult = min(4.0, mult * 1.02)
        blob = build(mult, level, final=True)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as f:
        f.write(blob)
    info = dict(bytes_model=len(blob), bytes_code=nb_code, bytes_total=len(blob) + nb_code, codec=CODEC_NAME,
                code_files=n_code_files, bytes_code_files=raw_code,
                step_mult=round(mult, 4), quantize=where,
                seconds={k: round(v, 3) for k, v in secs.items()}, packs=packs)
    if warn and info["bytes_total"] > limit:
        bar = "!" * 78
        print(f"{bar}\n!! ARTIFACT TOO LARGE: {info['bytes_total']:,} bytes > {limit:,} "
              f"(model {len(blob):,} + code {nb_code:,}); this would not be a valid submission\n{bar}", flush=True)
    return info


# the last decoded artifact, keyed by the file's identity: the eval decodes an artifact twice, once in its
# argument checks (config and tokenizer, before any expensive work) and once to build the model, and one
# decode of the default model's artifact took 1.7-1.9 s of the eval's ~8.5 s load on the H200 host
_LAST: Dict[str, object] = {}


def _file_key(path: str) -> Tuple:
    st = os.stat(path)
    return (os.path.realpath(path), st.st_size, st.st_mtime_ns, st.st_ino)


def load_artifact(path: str) -> Tuple[GPTConfig, dict, dict]:
    """-> (GPTConfig, entries, meta). Raises FileNotFoundError / ValueError on a bad file.
    A second call on an unchanged file (same path, size, mtime and inode) returns the first call's
    decode; callers must not modify the entries."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"artifact not found: {path}")
    key = _file_key(path)
    if _LAST.get("key") == key:
        return _LAST["value"]  # type: ignore[return-value]
    with open(path, "rb") as f:
        blob = f.read()
    entries, meta = _codec().unpack_artifact(blob)
    if not isinstance(meta, dict) or meta.get("format") != ARTIFACT_FORMAT:
        raise ValueError(f"{path}: not a train artifact (meta format {meta.get('format') if isinstance(meta, dict) else meta!r}, "
                         f"expected {ARTIFACT_FORMAT!r})")
    value = (GPTConfig.from_dict(meta["config"]), entries, meta)
    _LAST.clear()
    _LAST.update(key=key, value=value)
    return value


def _is_q(v) -> bool:
    return hasattr(v, "q") and hasattr(v, "scale") and hasattr(v, "bits")


def model_from_artifact(path: str, int6: bool = True, device=None, dtype: Optional[torch.dtype] = None) -> GPT:
    """Rebuild the model from an artifact.

    ``int6=True``: block matrices become ``pgolf_kernels.int6_linear.Int6Linear`` holding the stored
    codes (the kernel path). ``int6=False``: every matrix is dequantized to ``dtype`` values in plain
    ``nn.Linear`` (the reference path). Non-matrix tensors are dequantized / upcast either way.
    ``dtype`` defaults to bf16 on CUDA, fp32 on CPU (where the dequantized weights are exact).
    """
    cfg, entries, meta = load_artifact(path)
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    codec = _codec()
    # built, initialized and dequantized where the weights will live: on the CPU the default model's
    # random init took 0.8 s, its dequantization 1.6 s and the state-dict copy 0.8 s, all thrown away
    # or repeated on a GPU that does each in milliseconds
    with torch.device(device):
        model = GPT(cfg)
    mats = set(matrix_names(model))
    state, codes = {}, {}
    for name, v in entries.items():
        if _is_q(v):
            codes[name] = qt = v.to(device)
            # q * scale is exact in fp32 (|q| <= 127, fp16 scale); bf16 rounds it (8-bit mantissa)
            state[name] = codec.dequantize(qt, dtype=torch.float32).to(dtype)
        else:
            state[name] = v.to(device=device, dtype=dtype)
    model.load_state_dict(state, strict=True)
    model = model.to(device=device, dtype=dtype)
    if int6:
        from pgolf_kernels.int6_linear import Int6Linear

        for name in mats:
            mod_name = name.rsplit(".", 1)[0]
            parent_name, attr = mod_name.rsplit(".", 1)
            parent = model.get_submodule(parent_name)
            qt = codes[name]
            new = Int6Linear.from_codes(qt.q, qt.scale, bias=None, bits=int(qt.bits))
            setattr(parent, attr, new)
    model.eval()
    return model
