"""int-k weight codec and the artifact container.

Format of a quantized matrix (``QTensor``)
------------------------------------------
``W (N, K) ~= q * scale[:, None]`` with ``q`` int8 codes in ``[-(2^(b-1)-1), 2^(b-1)-1]``
(b = 5, 6, 7, 8: [-15, 15], [-31, 31], [-63, 63], [-127, 127]), one code per byte, and
``scale`` fp16 per output row. One byte per code is deliberate: the int8 container compresses
to ~3.4 bits/param with zstd-22, better than bit-packing before compression.

Quantization (C++, ``csrc/codec.cpp``): per row, ``s = fp16(clip / qmax)``,
``q = round_half_even(clamp(w / s, -qmax, qmax))``. ``clip="absmax"`` uses ``clip = max|w|``;
``clip="search"`` also tries a grid of smaller clips (fractions of absmax and k*std) and keeps the
one with the lowest ``sum_k (w_k - q_k s)^2`` computed with the stored fp16 scale, so it is never
worse than absmax. Rows run in parallel (``at::parallel_for``): a 36 M-parameter model
(70,312 x 512) quantizes in 0.78 s with the search (0.08 s absmax) on 2 CPU cores.

The same quantizer exists in CUDA (``csrc/cuda/quantize.cu``, built when torch has CUDA and a toolkit
is found), bit-exact with the C++ one: same codes, same fp16 scales, same refused rows. Where it runs
(``quantize_rows(..., backend=)``): ``"auto"`` follows ``w``'s device; a CUDA tensor with an extension
built without the CUDA quantizer is quantized on the CPU, with a RuntimeWarning naming the reason and
the rebuild command (once per call site). ``"cuda"`` demands the kernel (RuntimeError without it) and
``"cpu"`` forces the C++ path. Either way the result lands on ``w``'s device.

Artifact container (``pack_artifact`` / ``unpack_artifact``)
----------------------------------------------------------
::

    outer frame (48 bytes, little-endian), then the zstd frame:
      0  magic  b"PGOLFZ\\x00\\x01"      8  u64 compressed length      16 u64 payload (raw) length
      24 u64 checksum64(payload)        32 u64 checksum64(zstd frame) 40 u64 checksum64(bytes 0..39)
    (the compressed bytes get their own checksum because some zstd header bits, e.g. the
    window size, can flip without changing the decompressed bytes)
    payload (csrc/codec.cpp: pack_payload/split_payload):
      magic "PGOLFQC\\0", u32 version, u32 header length, u64 data length, JSON header,
      16-byte aligned raw blobs (tensor bytes; a QTensor is two blobs, codes then scale).

The JSON header lists every entry (name, kind, dtype, shape, bits, blob sizes) and the user's
``meta``; blobs follow in header order, so entries cannot overlap while every size is >= 0. Any
corruption, truncation, foreign file, checksum mismatch, duplicate entry name or negative size
raises ``ArtifactError`` saying which check failed; round trips are bit-exact.
"""
from __future__ import annotations

import json
import struct
import warnings
from typing import Dict, NamedTuple, Optional, Tuple, Union

import torch

from ._ext import cuda_quantizer_status, load_C

__all__ = [
    "QTensor",
    "quantize_rows",
    "quantize_backend",
    "dequantize",
    "dequantize_rows",
    "validate_codes",
    "code_range",
    "ArtifactError",
    "pack_artifact",
    "unpack_artifact",
    "quantize_rows_ref",
]

SUPPORTED_BITS = (5, 6, 7, 8)


class QTensor(NamedTuple):
    """A row-quantized matrix: ``W ~= q.float() * scale.float()[:, None]``.

    q: int8 (N, K) contiguous codes in [-(2^(b-1)-1), 2^(b-1)-1]; scale: fp16 (N,); bits: 5..8.
    """

    q: torch.Tensor
    scale: torch.Tensor
    bits: int

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    def dequantize(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        return dequantize(self, dtype)

    def to(self, device) -> "QTensor":
        return QTensor(self.q.to(device), self.scale.to(device), self.bits)


class ArtifactError(ValueError):
    """A blob is not a valid pgolf artifact (corrupt, truncated, foreign, bad checksum)."""


def check_bits(bits, op: str) -> int:
    """Validate a code bit width (5, 6, 7 or 8); raise ValueError naming ``op`` otherwise."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in SUPPORTED_BITS:
        raise ValueError(f"{op}: bits must be one of {SUPPORTED_BITS}, got {bits!r}")
    return bits


def code_range(bits: int) -> Tuple[int, int]:
    """Inclusive range of codes accepted for ``bits``: [-2^(b-1), 2^(b-1)-1].

    The quantizer writes the symmetric range [-(2^(b-1)-1), 2^(b-1)-1]; the extra negative code
    (-32 for int6) is accepted because older QAT exports in the records use [-32, 31].
    """
    check_bits(bits, "code_range")
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def validate_codes(q: torch.Tensor, bits: int, name: str = "q", op: str = "validate_codes") -> None:
    """Debug check (one min/max reduction): int8 codes inside ``code_range(bits)``."""
    check_bits(bits, op)
    if not isinstance(q, torch.Tensor) or q.dtype != torch.int8:
        got = q.dtype if isinstance(q, torch.Tensor) else type(q).__name__
        raise TypeError(f"{op}: {name} must be an int8 tensor of codes, got {got}")
    if q.numel() == 0:
        return
    lo, hi = code_range(bits)
    qmin, qmax = int(q.min()), int(q.max())
    if qmin < lo or qmax > hi:
        raise ValueError(
            f"{op}: {name} has codes in [{qmin}, {qmax}], outside [{lo}, {hi}] for bits={bits}"
        )


BACKENDS = ("auto", "cpu", "cuda")


def quantize_backend(w: torch.Tensor, backend: str = "auto", op: str = "quantize_rows") -> str:
    """Where ``quantize_rows(w, backend=backend)`` runs: ``"cuda"`` or ``"cpu"`` (see the module doc).

    ``"auto"`` with a CUDA ``w`` and no CUDA quantizer in the build warns (RuntimeWarning, the reason and
    the rebuild command) and answers ``"cpu"``; ``"cuda"`` without it raises RuntimeError.
    """
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "cpu" or (backend == "auto" and w.device.type != "cuda"):
        return "cpu"
    ok, why = cuda_quantizer_status()
    if not ok and backend == "cuda":
        raise RuntimeError(f"{op}: backend='cuda' but {why}")
    if not ok:
        warnings.warn(f"{op}: w is on {w.device}, quantizing it on the CPU: {why}", RuntimeWarning, stacklevel=3)
        return "cpu"
    if w.device.type != "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"{op}: backend='cuda' needs a CUDA device and torch sees none")
    return "cuda"


def quantize_rows(w: torch.Tensor, bits: int = 6, clip: str = "search", backend: str = "auto") -> QTensor:
    """Quantize each row of a 2-D float matrix ``w`` (N, K) to ``bits``-bit codes.

    Returns ``QTensor(q int8 (N, K), scale fp16 (N,), bits)`` on ``w``'s device. ``clip="search"`` picks
    the per-row clip with the lowest reconstruction MSE among absmax and a grid of smaller clips;
    ``clip="absmax"`` uses absmax. ``backend``: ``"auto"`` (``w``'s device), ``"cpu"`` (C++ codec, ``w``
    copied to the CPU as float32) or ``"cuda"`` (the CUDA kernel, on ``w``'s GPU or the current one);
    both give the same codes and scales bit for bit (module doc). Raises ValueError for NaN/Inf rows or a
    scale that overflows fp16, naming the lowest such row.
    """
    op = "quantize_rows"
    check_bits(bits, op)
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{op}: w must be a torch.Tensor, got {type(w).__name__}")
    if not w.dtype.is_floating_point:
        raise TypeError(f"{op}: w must be a floating-point tensor, got {w.dtype}")
    if w.dim() != 2:
        raise ValueError(f"{op}: w must be 2-D (N, K), got shape {tuple(w.shape)}")
    if clip not in ("search", "absmax"):
        raise ValueError(f"{op}: clip must be 'search' or 'absmax', got {clip!r}")
    C = load_C()
    if quantize_backend(w, backend, op) == "cuda":
        dev = w.device if w.device.type == "cuda" else torch.device("cuda", torch.cuda.current_device())
        fn, w32 = C.quantize_rows_cuda, w.detach().to(device=dev, dtype=torch.float32).contiguous()
    else:
        fn, w32 = C.quantize_rows, w.detach().to(device="cpu", dtype=torch.float32).contiguous()
    # the extension raises one-line ValueError (refused rows, bad arguments) / RuntimeError (a CUDA fault) itself
    q, s = fn(w32, bits, clip == "search")
    return QTensor(q.to(w.device), s.to(w.device), bits)


def quantize_rows_ref(w: torch.Tensor, bits: int = 6) -> QTensor:
    """Pure-torch absmax quantizer (reference for the C++ ``clip="absmax"`` path).

    Codes are ``round_half_even(clamp(w * (1/s), -qmax, qmax))`` with ``1/s`` one fp32 division,
    as the C++ and CUDA codec and the QAT fake-quant compute them. ``w / s`` is not the same
    function: the two round differently at near-ties (seed 406604096, int8: w/s = 17.4999981
    gives 17, w*(1/s) rounds to 17.5 and gives 18)."""
    qmax = float((1 << (bits - 1)) - 1)
    w32 = w.detach().float()
    s = (w32.abs().amax(dim=1) / qmax).half()
    sf = s.float()
    safe = torch.where(sf == 0, torch.ones_like(sf), sf)
    inv = 1.0 / safe  # fp32 reciprocal, then a multiply: the codec's arithmetic
    q = torch.round((w32 * inv[:, None]).clamp(-qmax, qmax))
    q = torch.where(sf[:, None] == 0, torch.zeros_like(q), q)
    return QTensor(q.to(torch.int8).contiguous(), s, bits)


def dequantize(qt: QTensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``(q.float() * scale.float()[:, None]).to(dtype)``: one rounding, from the exact fp32 product."""
    op = "dequantize"
    if not isinstance(qt, QTensor):
        raise TypeError(f"{op}: qt must be a QTensor (q, scale, bits), got {type(qt).__name__}")
    if not isinstance(qt.q, torch.Tensor) or qt.q.dtype != torch.int8 or qt.q.dim() != 2:
        got = f"{qt.q.dtype}, shape {tuple(qt.q.shape)}" if isinstance(qt.q, torch.Tensor) else type(qt.q).__name__
        raise TypeError(f"{op}: qt.q must be a 2-D int8 tensor of codes, got {got}")
    if not isinstance(qt.scale, torch.Tensor) or qt.scale.shape != (qt.q.shape[0],):
        got = tuple(qt.scale.shape) if isinstance(qt.scale, torch.Tensor) else type(qt.scale).__name__
        raise ValueError(f"{op}: qt.scale must have shape ({qt.q.shape[0]},) = (q.shape[0],), got {got}")
    if qt.scale.device != qt.q.device:
        raise ValueError(f"{op}: qt.scale is on {qt.scale.device} but qt.q is on {qt.q.device}")
    return (qt.q.float() * qt.scale.float()[:, None]).to(dtype)


dequantize_rows = dequantize  # name used by pgolf_kernels.__init__'s lazy table

# ---- artifact container ---------------------------------------------------------------------
_OUTER_MAGIC = b"PGOLFZ\x00\x01"
_OUTER = struct.Struct("<8sQQQQQ")  # magic, comp len, raw len, csum(raw), csum(comp), csum(header)
_FORMAT = "pgolf-artifact"
_FORMAT_VERSION = 1
_DTYPES: Dict[str, torch.dtype] = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


def _raw_bytes(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().to("cpu").contiguous()
    return t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)


def pack_artifact(
    entries: Dict[str, Union[torch.Tensor, QTensor]], meta: Optional[dict] = None, level: int = 22
) -> bytes:
    """Serialize tensors and QTensors (+ a JSON-able ``meta``) into a zstd-compressed artifact.

    Plain tensors keep dtype and shape exactly (any float/int/bool dtype above, any shape, 0-dim
    and empty included); QTensors keep codes, fp16 scales and bits. Returns the artifact bytes.
    """
    import zstandard

    op = "pack_artifact"
    if not isinstance(entries, dict):
        raise TypeError(f"{op}: entries must be a dict name -> Tensor | QTensor, got {type(entries).__name__}")
    if meta is None:
        meta = {}
    if not isinstance(meta, dict):
        raise TypeError(f"{op}: meta must be a dict, got {type(meta).__name__}")
    try:
        json.dumps(meta, allow_nan=True)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{op}: meta must be JSON-serializable: {e}") from e
    if not isinstance(level, int) or not 1 <= level <= 22:
        raise ValueError(f"{op}: level must be an int in 1..22, got {level!r}")
    header_entries = []
    blobs = []
    for name, v in entries.items():
        if not isinstance(name, str):
            raise TypeError(f"{op}: entry names must be str, got {type(name).__name__}")
        if isinstance(v, QTensor):
            check_bits(v.bits, op)
            if v.q.dtype != torch.int8 or v.q.dim() != 2:
                raise TypeError(f"{op}: entry {name!r}: QTensor.q must be 2-D int8, got {v.q.dtype} {tuple(v.q.shape)}")
            if v.scale.dtype != torch.float16 or tuple(v.scale.shape) != (v.q.shape[0],):
                raise TypeError(
                    f"{op}: entry {name!r}: QTensor.scale must be fp16 of shape ({v.q.shape[0]},), "
                    f"got {v.scale.dtype} {tuple(v.scale.shape)}"
                )
            validate_codes(v.q, v.bits, name=f"entry {name!r} codes", op=op)
            qb, sb = _raw_bytes(v.q), _raw_bytes(v.scale)
            header_entries.append(
                {"name": name, "kind": "q", "bits": v.bits, "shape": list(v.q.shape), "nbytes": [qb.numel(), sb.numel()]}
            )
            blobs += [qb, sb]
        elif isinstance(v, torch.Tensor):
            if v.dtype not in _DTYPE_NAMES:
                raise TypeError(f"{op}: entry {name!r} has unsupported dtype {v.dtype}; supported: {sorted(_DTYPES)}")
            b = _raw_bytes(v)
            header_entries.append(
                {"name": name, "kind": "t", "dtype": _DTYPE_NAMES[v.dtype], "shape": list(v.shape), "nbytes": [b.numel()]}
            )
            blobs.append(b)
        else:
            raise TypeError(f"{op}: entry {name!r} must be a torch.Tensor or QTensor, got {type(v).__name__}")
    header = json.dumps(
        {"format": _FORMAT, "version": _FORMAT_VERSION, "entries": header_entries, "meta": meta},
        separators=(",", ":"),
    ).encode("utf-8")
    C = load_C()
    payload = C.pack_payload(header, blobs)
    comp = zstandard.ZstdCompressor(level=level, write_checksum=False, write_content_size=True).compress(payload)
    head = _OUTER.pack(_OUTER_MAGIC, len(comp), len(payload), C.checksum64(payload), C.checksum64(comp), 0)
    head = head[:40] + struct.pack("<Q", C.checksum64(head[:40]))
    return head + comp


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def unpack_artifact(blob: bytes) -> Tuple[Dict[str, Union[torch.Tensor, QTensor]], dict]:
    """Inverse of ``pack_artifact``: returns (entries on CPU, meta). Raises ArtifactError."""
    import zstandard

    if isinstance(blob, (bytearray, memoryview)):
        blob = bytes(blob)
    if not isinstance(blob, bytes):
        raise TypeError(f"unpack_artifact: blob must be bytes, got {type(blob).__name__}")
    if blob[: len(_OUTER_MAGIC)] != _OUTER_MAGIC[: len(blob)]:
        raise ArtifactError(f"not a pgolf artifact: magic {blob[:8]!r} != {_OUTER_MAGIC!r}")
    if len(blob) < _OUTER.size:
        raise ArtifactError(f"artifact truncated: {len(blob)} bytes, shorter than the {_OUTER.size}-byte frame header")
    _, clen, rlen, csum, ccsum, hsum = _OUTER.unpack_from(blob)
    C = load_C()
    if C.checksum64(blob[:40]) != hsum:
        raise ArtifactError("artifact frame header is corrupt (header checksum mismatch)")
    have = len(blob) - _OUTER.size
    if have < clen:
        raise ArtifactError(f"artifact truncated: frame says {clen} compressed bytes, only {have} present")
    if have > clen:
        raise ArtifactError(f"artifact has {have - clen} unexpected trailing bytes after the compressed data")
    comp = blob[_OUTER.size :]
    if C.checksum64(comp) != ccsum:
        raise ArtifactError("artifact compressed data checksum mismatch (data corrupted)")
    try:
        payload = zstandard.ZstdDecompressor().decompress(comp, max_output_size=rlen)
    except zstandard.ZstdError as e:
        raise ArtifactError(f"artifact compressed data is corrupt (zstd: {e})") from e
    if len(payload) != rlen:
        raise ArtifactError(f"artifact payload is {len(payload)} bytes after decompression, frame says {rlen}")
    if C.checksum64(payload) != csum:
        raise ArtifactError("artifact payload checksum mismatch (data corrupted)")
    try:
        header_b, start, dlen = C.split_payload(payload)
    except (ValueError, RuntimeError) as e:
        raise ArtifactError(f"artifact payload is malformed: {str(e).splitlines()[0]}") from e
    try:
        header = json.loads(header_b.decode("utf-8"))
        if header.get("format") != _FORMAT or header.get("version") != _FORMAT_VERSION:
            raise ArtifactError(f"artifact header format/version {header.get('format')}/{header.get('version')} not supported")
        ents, meta = header["entries"], header["meta"]
    except ArtifactError:
        raise
    except Exception as e:  # json errors, missing keys
        raise ArtifactError(f"artifact header is malformed: {e}") from e
    buf = bytearray(payload)  # one writable buffer; tensors are views into it
    out: Dict[str, Union[torch.Tensor, QTensor]] = {}
    off = 0

    def take(nbytes: int, dtype: torch.dtype, shape, what: str) -> torch.Tensor:
        # Blobs are laid out back to back (16-byte aligned) in header order, so each entry's bytes
        # start at or after the previous entry's end: with non-negative sizes no two entries can
        # overlap. A negative size or dimension would move the cursor backwards onto an earlier
        # entry's bytes (or make numel * esize match a negative nbytes), so both are refused here.
        nonlocal off
        if not _is_count(nbytes) or not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise ArtifactError(f"artifact entry {what}: size {nbytes!r} / shape {shape!r} must be non-negative integers")
        off = (off + 15) & ~15
        numel = 1
        for d in shape:
            numel *= int(d)
        esize = torch.empty((), dtype=dtype).element_size()
        if nbytes != numel * esize or off + nbytes > dlen:
            raise ArtifactError(f"artifact entry {what}: {nbytes} bytes do not fit shape {shape} {dtype} / data section")
        t = torch.frombuffer(buf, dtype=dtype, count=numel, offset=start + off) if numel else torch.empty(0, dtype=dtype)
        off += nbytes
        return t.reshape(shape)

    seen = set()
    try:
        for e in ents:
            name = e["name"]
            if not isinstance(name, str):
                raise ArtifactError(f"artifact entry name {name!r} is not a string")
            if name in seen:  # a second entry would silently replace the first one's tensor
                raise ArtifactError(f"artifact has a duplicate entry name {name!r}")
            seen.add(name)
            if e["kind"] == "q":
                bits = check_bits(e["bits"], "unpack_artifact")
                n, k = e["shape"]
                q = take(e["nbytes"][0], torch.int8, [n, k], repr(name))
                s = take(e["nbytes"][1], torch.float16, [n], repr(name) + " scale")
                validate_codes(q, bits, name=f"entry {name!r} codes", op="unpack_artifact")
                out[name] = QTensor(q, s, bits)
            elif e["kind"] == "t":
                out[name] = take(e["nbytes"][0], _DTYPES[e["dtype"]], e["shape"], repr(name))
            else:
                raise ArtifactError(f"artifact entry {name!r} has unknown kind {e['kind']!r}")
    except ArtifactError:
        raise
    except Exception as e:
        raise ArtifactError(f"artifact header entry is malformed: {type(e).__name__}: {e}") from e
    if ((off + 15) & ~15) < dlen and off != dlen:
        raise ArtifactError(f"artifact data section has {dlen - off} unused bytes")
    return out, meta
