"""The CUDA quantizer (csrc/cuda/quantize.cu) against the C++ codec (csrc/codec.cpp): bit-exact codes and scales.

* GPU lane: every bit width, both clip rules, awkward shapes and values; the same refusals; ``quantize_rows``
  dispatch; an artifact written from GPU weights is byte-identical to one written from CPU weights. Skipped
  (with the reason) without a CUDA device or when the build has no CUDA quantizer for a stated reason; a
  build that tried CUDA and failed is a failure, not a skip.
* CPU lane: ``backend=`` dispatch and its errors/warnings; the kernel's arithmetic (csrc/cuda/row_math.cuh)
  compiled for the host by g++ and driven with the kernel's work split, one thread after another, must give
  the C++ codec's codes and scales (catches the two drifting apart without a GPU).
"""
import ctypes
import glob
import os
import shutil
import subprocess
import types
import warnings

import pytest
import torch

from conftest import draw_seed
from pgolf_kernels import quant
from pgolf_kernels._ext import load_C

BITS = [5, 6, 7, 8]
CLIPS = ["absmax", "search"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_CUDA = torch.cuda.is_available()


def _seed():
    return torch.Generator().manual_seed(draw_seed())


def _cases(g):
    """(name, float32 CPU matrix): shapes around the 256-element chunk and the 128-thread block, and values
    that hit the codec's edges (zero rows, constant rows, one spike, heavy tails, huge and tiny scales,
    fp32 subnormals whose scale rounds to 0 in fp16)."""
    out = []
    for n, k in [(1, 1), (1, 7), (3, 31), (2, 127), (5, 255), (4, 256), (3, 257), (7, 513), (64, 512),
                 (33, 1536), (16, 2048), (9, 3001), (2, 5000)]:
        w = torch.randn(n, k, generator=g) * 0.02
        out.append((f"gauss{n}x{k}", w))
        heavy = w / (torch.rand(n, k, generator=g) + 0.05).sqrt()
        idx = torch.randint(0, k, (n, 2), generator=g)
        heavy.scatter_(1, idx, heavy.abs().amax(1, keepdim=True).repeat(1, 2) * 4)
        out.append((f"heavy{n}x{k}", heavy))
        mags = torch.tensor([1e-40, 1e-30, 1e-7, 1e-6, 1e-3, 1.0, 1e3, 1e5])
        odd = torch.randn(n, k, generator=g) * mags[torch.randint(0, len(mags), (n,), generator=g)][:, None]
        odd[0] = 0.0
        if n > 2:
            odd[1] = 0.5  # constant row: std 0, the k*std clips are skipped
            odd[2] = 0.0
            odd[2, k // 2] = -3.0  # a single spike
        out.append((f"edges{n}x{k}", odd))
    return out


def _same(a, b):
    """Codes and scales equal bit for bit (scales compared as raw fp16 bits)."""
    return (torch.equal(a.q.cpu(), b.q.cpu()) and a.scale.dtype == b.scale.dtype == torch.float16
            and torch.equal(a.scale.cpu().view(torch.int16), b.scale.cpu().view(torch.int16)))


# ---- GPU lane ----------------------------------------------------------------------------------
@pytest.fixture
def cuda_kernel():
    """Skips without a CUDA device or a CUDA quantizer (saying why); fails when the build tried and failed."""
    if not HAS_CUDA:
        pytest.skip("GPU lane: no CUDA device on this machine")
    ok, why = quant.cuda_quantizer_status()
    if not ok:
        if "the CUDA build failed" in why:
            pytest.fail(why)
        pytest.skip(why)
    return load_C()


@pytest.mark.gpu
@pytest.mark.parametrize("clip", CLIPS)
@pytest.mark.parametrize("bits", BITS)
def test_cuda_matches_cpu_bit_for_bit(cuda_kernel, bits, clip):
    g = _seed()
    for name, w in _cases(g):
        cpu = quant.quantize_rows(w, bits, clip, backend="cpu")
        gpu = quant.quantize_rows(w.cuda(), bits, clip)
        assert gpu.q.is_cuda and gpu.scale.is_cuda and gpu.bits == bits, name
        assert _same(cpu, gpu), f"{name}: bits={bits} clip={clip}"


@pytest.mark.gpu
def test_cuda_matches_cpu_at_model_scale(cuda_kernel):
    """20,000 heavy-tailed rows: the clip search's argmin is sensitive to the error sums' last bits on ~1 row
    in 10^5 (measured: summing in 128-element chunks instead of 256 changed one row's scale), so this is the
    case that can see a reduction-order difference."""
    g = _seed()
    w = torch.randn(20_000, 512, generator=g) * 0.02
    w = w / (torch.rand(20_000, 512, generator=g) + 0.05).sqrt()
    for bits in (5, 6):
        assert _same(quant.quantize_rows(w, bits, backend="cpu"), quant.quantize_rows(w.cuda(), bits)), bits
    emb = torch.randn(1024, 512, generator=g) * 0.3  # the tied embedding's shape, int8
    assert _same(quant.quantize_rows(emb, 8, backend="cpu"), quant.quantize_rows(emb.cuda(), 8))


@pytest.mark.gpu
def test_cuda_refuses_like_cpu(cuda_kernel):
    g = _seed()
    for bits in BITS:
        for clip in CLIPS:
            w = torch.randn(50, 300, generator=g)
            for r, v in ((40, float("nan")), (17, float("inf")), (33, 1e9), (45, -float("inf"))):
                w[r, 7] = v
            msgs = []
            for dev in ("cpu", "cuda"):
                with pytest.raises(ValueError, match="row 17 of w has a NaN/Inf") as e:
                    quant.quantize_rows(w.to(dev), bits, clip, backend=dev)
                msgs.append(str(e.value))
            assert msgs[0] == msgs[1]
    big = torch.full((2, 9), 1e9)  # scale 1e9/qmax overflows fp16 in every bit width
    with pytest.raises(ValueError, match="row 0 .* overflows fp16"):
        quant.quantize_rows(big.cuda(), 8)


@pytest.mark.gpu
def test_cuda_dtypes_devices_and_empty(cuda_kernel):
    g = _seed()
    w = torch.randn(40, 96, generator=g) * 0.05
    ref = quant.quantize_rows(w, 6, backend="cpu")
    for dt in (torch.float16, torch.bfloat16, torch.float64):
        x = w.to(dt)
        assert _same(quant.quantize_rows(x, 6, backend="cpu"), quant.quantize_rows(x.cuda(), 6)), dt
    t = w.cuda().t().contiguous().t()  # non-contiguous view: copied, same codes
    assert _same(ref, quant.quantize_rows(t, 6))
    on_cpu = quant.quantize_rows(w, 6, backend="cuda")  # CPU input, GPU work, CPU result
    assert not on_cpu.q.is_cuda and _same(ref, on_cpu)
    for n, k in ((0, 5), (3, 0)):
        e = quant.quantize_rows(torch.empty(n, k).cuda(), 6)
        assert e.q.shape == (n, k) and e.scale.shape == (n,) and e.q.is_cuda
        assert torch.equal(e.scale.cpu(), quant.quantize_rows(torch.empty(n, k), 6).scale)


@pytest.mark.gpu
def test_auto_backend_uses_the_kernel_for_cuda_tensors(cuda_kernel, monkeypatch):
    def no_cpu(*a, **k):
        raise AssertionError("the C++ (CPU) quantizer ran for a CUDA tensor")

    w = torch.randn(8, 64, device="cuda")
    monkeypatch.setattr(cuda_kernel, "quantize_rows", no_cpu)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        qt = quant.quantize_rows(w, 6)
    assert qt.q.is_cuda


@pytest.mark.gpu
def test_artifact_from_gpu_weights_is_byte_identical(cuda_kernel, tmp_path):
    from train import artifact as art
    from train.model import GPT, GPTConfig

    torch.manual_seed(draw_seed())
    m = GPT(GPTConfig(vocab_size=256, num_layers=2, model_dim=128, num_heads=4, num_kv_heads=2))
    with torch.no_grad():
        for _, p in m.matrix_params():
            p.normal_(0, 0.02)
    a, b = str(tmp_path / "cpu.ptz"), str(tmp_path / "gpu.ptz")
    info_c = art.save_artifact(m, a, code_paths=[], level=3, limit=200_000)
    info_g = art.save_artifact(m.cuda(), b, code_paths=[], level=3, limit=200_000)
    assert info_c["quantize"].startswith("cpu") and info_g["quantize"].startswith("cuda"), (info_c, info_g)
    assert info_g["step_mult"] > 1.0  # the limit makes the fit re-grid on the GPU too
    with open(a, "rb") as fa, open(b, "rb") as fb:
        assert fa.read() == fb.read()


# ---- CPU lane ----------------------------------------------------------------------------------
def test_backend_argument_is_checked():
    w = torch.randn(4, 8)
    with pytest.raises(ValueError, match="backend must be one of"):
        quant.quantize_rows(w, 6, backend="gpu")


def test_cpu_backend_and_cpu_tensors_use_the_codec_silently():
    w = torch.randn(4, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a = quant.quantize_rows(w, 6)
        b = quant.quantize_rows(w, 6, backend="cpu")
    assert _same(a, b) and not a.q.is_cuda


def test_missing_kernel_cuda_backend_raises_and_auto_warns(monkeypatch):
    """Without the CUDA quantizer: backend='cuda' is an error naming the rebuild, backend='auto' on a CUDA
    tensor quantizes on the CPU with a RuntimeWarning that says why (the stand-in tensor only has a device)."""
    why = "pgolf_kernels._C was built without the CUDA quantizer (stated reason); to get it, build ..."
    monkeypatch.setattr(quant, "cuda_quantizer_status", lambda: (False, why))
    fake = types.SimpleNamespace(device=torch.device("cuda", 0))
    with pytest.raises(RuntimeError, match=r"backend='cuda' but pgolf_kernels\._C was built without the CUDA"):
        quant.quantize_backend(fake, "cuda")
    with pytest.raises(RuntimeError, match="backend='cuda'"):
        quant.quantize_rows(torch.randn(3, 4), 6, backend="cuda")
    with pytest.warns(RuntimeWarning, match=r"w is on cuda:0, quantizing it on the CPU: .*stated reason"):
        assert quant.quantize_backend(fake, "auto") == "cpu"
    assert quant.quantize_backend(fake, "cpu") == "cpu"
    assert quant.quantize_backend(torch.randn(2, 2), "auto") == "cpu"


def test_status_matches_the_build_info():
    from pgolf_kernels import _build_info as bi

    ok, why = quant.cuda_quantizer_status()
    assert ok == bool(getattr(load_C(), "has_cuda", False)) == bi.CUDA_BUILT, why
    assert why.strip() and "\n" not in why
    if not ok:
        assert bi.CUDA_REASON in why


def test_artifact_quantize_device_says_where_and_why(monkeypatch):
    from pgolf_kernels import _ext
    from train import artifact as art

    dev, where = art.quantize_device({"w": torch.zeros(2, 2)})
    assert dev.type == "cpu" and where == "cpu (C++ codec): the weights are on the CPU"
    gpu_state = {"w": types.SimpleNamespace(device=torch.device("cuda", 0))}
    monkeypatch.setattr(_ext, "cuda_quantizer_status", lambda: (False, "no kernel: the stated reason"))
    dev, where = art.quantize_device(gpu_state)
    assert dev.type == "cpu" and "the weights are on cuda:0 but no kernel: the stated reason" in where
    monkeypatch.setattr(_ext, "cuda_quantizer_status", lambda: (True, "built"))
    dev, where = art.quantize_device(gpu_state)
    assert dev == torch.device("cuda", 0) and where.startswith("cuda:0 (CUDA quantizer")


# The kernel's per-row work (quantize_rows_kernel in csrc/cuda/quantize.cu), run serially on the host with
# the same row_math.cuh functions and the same split into (candidate, chunk) items and phases.
_EMULATOR = r"""
#include "row_math.cuh"
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>
using namespace pgolf::rowq;
static const int T = 128;
static void measure(int64_t it, const float* x, int64_t K, int64_t nchunk, float amax, float sd, float qmax,
                    float* part) {
  const int c = int(it / nchunk);
  const int64_t k = it % nchunk;
  const float s = candidate_scale(c, amax, sd, qmax);
  if (s > 0.0f) part[it] = chunk_sse(x + k * kChunk, int(K - k * kChunk < kChunk ? K - k * kChunk : kChunk), s, qmax);
}
extern "C" int64_t emulate(const float* w, int64_t N, int64_t K, int bits, int search, int8_t* q, uint16_t* sc) {
  const float qmax = float((1 << (bits - 1)) - 1);
  const int64_t nchunk = (K + kChunk - 1) / kChunk;
  std::vector<float> part(kCands * nchunk);
  int64_t bad = N;
  for (int64_t row = 0; row < N; ++row) {
    std::fill(part.begin(), part.end(), std::nanf(""));  // reading an item nobody wrote shows as a NaN error
    const float* x = w + row * K;
    int finite = 1;
    float amax = 0.0f;
    for (int64_t j = 0; j < K; ++j) { finite &= std::isfinite(x[j]) ? 1 : 0; amax = std::fmax(amax, std::fabs(x[j])); }
    float best = 0.0f;
    if (!finite || fdiv(amax, qmax) > 65504.0f) {
      if (row < bad) bad = row;
    } else {
      best = to_half_float(fdiv(amax, qmax));
      if (search && best > 0.0f) {
        const int64_t n_abs = (1 + kFractions) * nchunk;
        const float sd = row_std(x, K);
        for (int tid = 1; tid < T; ++tid)
          for (int64_t it = tid - 1; it < n_abs; it += T - 1) measure(it, x, K, nchunk, amax, 0.0f, qmax, part.data());
        for (int tid = 0; tid < T; ++tid)
          for (int64_t it = n_abs + tid; it < kCands * nchunk; it += T) measure(it, x, K, nchunk, amax, sd, qmax, part.data());
        float cs[kCands];
        double ce[kCands];
        for (int c = 0; c < kCands; ++c) {
          cs[c] = candidate_scale(c, amax, sd, qmax);
          ce[c] = cs[c] > 0.0f ? sse_from_parts(part.data() + c * nchunk, nchunk) : 0.0;
        }
        best = select_scale(cs, ce);
      }
    }
    const __half h = __float2half_rn(best);
    std::memcpy(sc + row, &h, 2);
    const float inv = best > 0.0f ? fdiv(1.0f, best) : 0.0f;
    for (int64_t j = 0; j < K; ++j)
      q[row * K + j] = best > 0.0f ? static_cast<int8_t>(round_even(clamp_q(fmul(x[j], inv), qmax))) : int8_t(0);
  }
  return bad;
}
"""


def _cuda_include():
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    homes += sorted(glob.glob("/usr/local/cuda-*"))
    return next((os.path.join(h, "include") for h in homes if h and os.path.isfile(os.path.join(h, "include", "cuda_fp16.h"))), None)


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    cxx, inc = shutil.which("g++"), _cuda_include()
    if cxx is None or inc is None:
        pytest.skip(f"host emulation of the CUDA quantizer needs g++ and cuda_fp16.h (g++: {cxx}, CUDA include: {inc})")
    d = tmp_path_factory.mktemp("emu")
    src, lib = d / "emu.cpp", d / "emu.so"
    src.write_text(_EMULATOR)
    # -ffp-contract=off as setup.py builds codec.cpp: no fused a*b+c on either side
    cmd = [cxx, "-O2", "-std=c++17", "-ffp-contract=off", "-shared", "-fPIC", f"-I{ROOT}/csrc/cuda", f"-I{inc}",
           str(src), "-o", str(lib)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    so = ctypes.CDLL(str(lib))
    so.emulate.restype = ctypes.c_int64
    so.emulate.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int, ctypes.c_int,
                           ctypes.c_void_p, ctypes.c_void_p]

    def run(w, bits, search):
        w = w.contiguous()
        q = torch.full(w.shape, 99, dtype=torch.int8)
        s = torch.full((w.shape[0],), float("nan"), dtype=torch.float16)
        bad = so.emulate(w.data_ptr(), w.shape[0], w.shape[1], bits, int(search), q.data_ptr(), s.data_ptr())
        return quant.QTensor(q, s, bits), bad

    return run


@pytest.mark.parametrize("bits", BITS)
def test_kernel_arithmetic_on_the_host_matches_the_codec(emulator, bits):
    g = _seed()
    for name, w in _cases(g):
        for clip in CLIPS:
            got, bad = emulator(w, bits, clip == "search")
            assert bad == w.shape[0], name
            assert _same(quant.quantize_rows(w, bits, clip), got), f"{name}: bits={bits} clip={clip}"
    w = torch.randn(30, 70, generator=g)
    w[21, 3], w[9, 0] = float("nan"), 1e9
    with pytest.raises(ValueError, match="row 9 of w"):
        quant.quantize_rows(w, bits)
    assert emulator(w, bits, True)[1] == 9
