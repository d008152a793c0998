// int-k weight codec for parameter-golf artifacts.
//
//  * quantize_rows: per-row symmetric quantization of a float32 (N, K) matrix to b-bit codes
//    (b in 5..8), q in [-(2^(b-1)-1), 2^(b-1)-1] stored one per int8 byte, and a per-row fp16
//    scale s with W ~= q * s[:, None]. With search=true each row tries a grid of clip values
//    (fractions of the row's absmax and k*std) and keeps the one with the lowest reconstruction
//    MSE, measured with the *fp16-rounded* scale that will actually be stored. The absmax clip is
//    always a candidate and ties keep it, so the search is never worse than plain absmax.
//    csrc/cuda/quantize.cu is its GPU twin, bit-exact with it: any change to the arithmetic, the
//    candidate grid or the summation order here must be made in csrc/cuda/row_math.cuh too
//    (tests/test_quant_cuda.py checks the two agree, on the CPU lane as well).
//  * pack_payload / split_payload: the uncompressed artifact container (magic, version, header
//    length, data length, JSON header, 16-byte aligned raw blobs). zstd and the JSON live in
//    Python (pgolf_kernels/quant.py); all bounds checks of the binary layout live here.
//  * checksum64: a 4-lane 64-bit multiply/rotate hash over the payload (integrity, not security).
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "codec.h"
#include "pgolf.h"

namespace pgolf {

void check_quantize_args(const at::Tensor& w, int64_t bits, at::DeviceType device) {
  check_value(bits >= 2 && bits <= 8, "quantize_rows: bits must be in 2..8, got ", bits);
  check_type(w.scalar_type() == at::kFloat, "quantize_rows: w must be float32, got ",
             w.scalar_type());
  check_value(w.dim() == 2, "quantize_rows: w must be 2-D (N, K), got ", w.dim(), " dims");
  check_value(w.device().type() == device, "quantize_rows: w must be on the ",
              device == at::kCPU ? "CPU" : "CUDA device", ", got ", w.device());
  check_value(w.is_contiguous(), "quantize_rows: w must be contiguous");
}

void check_rows_finite(int64_t bad_row, int64_t N, float qmax) {
  check_value(bad_row >= N, "quantize_rows: row ", bad_row,
              " of w has a NaN/Inf or an absmax whose scale (absmax/", qmax,
              ") overflows fp16");
}

namespace {
// The start of both quantize_rows wrappers: the argument checks, then w's (N, K), the largest code qmax and the
// outputs on w's device: codes q (N, K) int8 left unset, scales s (N,) fp16 zero. The zero is what a K = 0
// matrix returns (both wrappers stop there); otherwise both quantizers write every row's scale, refused rows
// included (a 2N-byte memset, nothing next to the rows' quantization).
struct QuantizeOutputs {
  int64_t N, K;
  float qmax;
  at::Tensor q, s;
};

QuantizeOutputs quantize_outputs(const at::Tensor& w, int64_t bits, at::DeviceType device) {
  check_quantize_args(w, bits, device);
  const int64_t N = w.size(0), K = w.size(1);
  return {N, K, float((1 << (bits - 1)) - 1), at::empty({N, K}, w.options().dtype(at::kChar)),
          at::zeros({N}, w.options().dtype(at::kHalf))};
}
}  // namespace

#ifdef PGOLF_WITH_CUDA
std::vector<at::Tensor> quantize_rows_cuda(const at::Tensor& w, int64_t bits, bool search) {
  auto [N, K, qmax, q, s] = quantize_outputs(w, bits, at::kCUDA);
  if (N == 0 || K == 0) return {q, s};
  check_value(N <= std::numeric_limits<int32_t>::max(), "quantize_rows: w has ", N,
              " rows, more than one CUDA grid holds (2^31 - 1)");
  auto scratch = at::empty({search ? N * cuda_candidates() * cuda_chunk_count(K) : 1}, w.options());
  auto bad = at::full({1}, N, w.options().dtype(at::kLong));  // lowest refused row; N = none
  const int err = quantize_rows_cuda_launch(w, qmax, search, q, s, scratch, bad);
  check_runtime(err == 0, "quantize_rows: the CUDA kernel did not launch: ", cuda_error_text(err));
  check_rows_finite(bad.item<int64_t>(), N, qmax);
  return {q, s};
}
#endif

namespace {

// Round-half-to-even for |v| < 2^22 without a libm call, so the inner loops vectorize:
// adding and subtracting 1.5 * 2^23 pushes the fraction bits out under the default rounding
// mode (the build uses -O3 without -ffast-math, so the compiler keeps both operations).
inline float round_even(float v) {
  const float magic = 12582912.0f;  // 1.5 * 2^23
  return (v + magic) - magic;
}

// Sum of squared reconstruction errors of one row for scale s (the fp16 value, as float).
// Codes are clamp(round(w / s), -qmax, qmax); clamping before rounding is equivalent because
// qmax is an integer.
double row_sse(const float* w, int64_t K, float s, float qmax) {
  if (s == 0.0f) {
    double acc = 0.0;
    for (int64_t j = 0; j < K; ++j) acc += double(w[j]) * double(w[j]);
    return acc;
  }
  const float inv = 1.0f / s;
  double acc = 0.0;
  float part = 0.0f;  // fp32 partial sums of 256 elements keep the loop vectorized
  for (int64_t j = 0; j < K; ++j) {
    float v = w[j] * inv;
    v = std::min(std::max(v, -qmax), qmax);
    const float e = w[j] - round_even(v) * s;
    part += e * e;
    if ((j & 255) == 255) {
      acc += part;
      part = 0.0f;
    }
  }
  return acc + part;
}

// fp16 rounding of a positive float (round to nearest even), returned as float.
inline float to_half_float(float x) { return static_cast<float>(static_cast<c10::Half>(x)); }

// Clip candidates as fractions of absmax. Trained rows (K = 512..2048) are near-Gaussian with
// absmax ~3.2-3.6 std and occasional outliers; the grid reaches down to 0.5*absmax so a row
// with one large outlier can clip it, and the k*std candidates below cover heavy tails.
constexpr float kFractions[] = {1.0f, 0.985f, 0.97f, 0.955f, 0.94f, 0.92f, 0.9f, 0.88f, 0.86f,
                                0.83f, 0.8f, 0.76f, 0.72f, 0.67f, 0.62f, 0.56f, 0.5f};
constexpr float kStdMultiples[] = {2.5f, 3.0f, 3.5f, 4.0f, 5.0f, 6.0f};

void quantize_one_row(const float* w, int64_t K, float qmax, bool search, int8_t* q_out,
                      c10::Half* s_out) {
  float amax = 0.0f;
  double sum = 0.0, sumsq = 0.0;
  for (int64_t j = 0; j < K; ++j) {
    const float a = std::fabs(w[j]);
    amax = std::max(amax, a);
    sum += w[j];
    sumsq += double(w[j]) * double(w[j]);
  }
  float best_s = to_half_float(amax / qmax);
  if (search && amax > 0.0f) {
    double best = row_sse(w, K, best_s, qmax);
    const double mean = sum / double(K);
    const double var = std::max(0.0, sumsq / double(K) - mean * mean);
    const float sd = static_cast<float>(std::sqrt(var));
    auto consider = [&](float clip) {
      if (!(clip > 0.0f) || clip >= amax) return;
      const float s = to_half_float(clip / qmax);
      if (s == 0.0f || s == best_s) return;
      const double e = row_sse(w, K, s, qmax);
      if (e < best) {  // strict: ties keep the earlier (larger) clip, absmax first
        best = e;
        best_s = s;
      }
    };
    for (float f : kFractions) consider(amax * f);
    for (float k : kStdMultiples) consider(sd * k);
  }
  *s_out = static_cast<c10::Half>(best_s);
  if (best_s == 0.0f) {  // all-zero row (or absmax below fp16's smallest subnormal * qmax)
    std::memset(q_out, 0, size_t(K));
    return;
  }
  const float inv = 1.0f / best_s;
  for (int64_t j = 0; j < K; ++j) {
    float v = std::min(std::max(w[j] * inv, -qmax), qmax);
    q_out[j] = static_cast<int8_t>(round_even(v));
  }
}

std::vector<at::Tensor> quantize_rows(const at::Tensor& w, int64_t bits, bool search) {
  const QuantizeOutputs out = quantize_outputs(w, bits, at::kCPU);
  // plain locals, not a structured binding: the parallel_for lambda below captures them (C++20 only for bindings)
  const int64_t N = out.N, K = out.K;
  const float qmax = out.qmax;
  if (N == 0 || K == 0) return {out.q, out.s};
  const float* wp = w.data_ptr<float>();
  int8_t* qp = out.q.data_ptr<int8_t>();
  c10::Half* sp = out.s.data_ptr<c10::Half>();
  // Non-finite values would silently poison a row's scale; refuse them, naming the lowest such row
  // (the same row whatever the thread split, and the row the CUDA kernel names).
  std::atomic<int64_t> bad{N};
  // ~64K elements per task: enough work to amortize scheduling, many tasks for 2-16 cores.
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(K, 1));
  at::parallel_for(0, N, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* row = wp + r * K;
      bool finite = true;
      float amax = 0.0f;
      for (int64_t j = 0; j < K; ++j) {
        finite &= std::isfinite(row[j]);
        amax = std::max(amax, std::fabs(row[j]));
      }
      if (!finite || amax / qmax > 65504.0f) {
        int64_t cur = bad.load();
        while (r < cur && !bad.compare_exchange_weak(cur, r)) {
        }
        std::memset(qp + r * K, 0, size_t(K));
        sp[r] = c10::Half(0.0f);
        continue;
      }
      quantize_one_row(row, K, qmax, search, qp + r * K, sp + r);
    }
  });
  check_rows_finite(bad.load(), N, qmax);
  return {out.q, out.s};
}

// ---- checksum -------------------------------------------------------------------------------
inline uint64_t rotl(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }
constexpr uint64_t P1 = 0x9E3779B185EBCA87ULL;
constexpr uint64_t P2 = 0xC2B2AE3D27D4EB4FULL;
constexpr uint64_t P3 = 0x165667B19E3779F9ULL;

inline uint64_t load64(const uint8_t* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return v;
}

// Four independent lanes over 32-byte stripes (so it runs at memory speed), then a tail by
// 8-byte words and bytes, then an avalanche. The length is mixed in, so a truncated buffer
// whose prefix matches still hashes differently.
uint64_t checksum64_raw(const uint8_t* p, size_t n, uint64_t seed) {
  const uint8_t* end = p + n;
  uint64_t h;
  if (n >= 32) {
    uint64_t v[4] = {seed + P1 + P2, seed + P2, seed, seed - P1};
    const uint8_t* limit = end - 32;
    do {
      for (int i = 0; i < 4; ++i) {
        v[i] = rotl(v[i] + load64(p + 8 * i) * P2, 31) * P1;
      }
      p += 32;
    } while (p <= limit);
    h = rotl(v[0], 1) + rotl(v[1], 7) + rotl(v[2], 12) + rotl(v[3], 18);
    for (int i = 0; i < 4; ++i) h = (h ^ (rotl(v[i] * P2, 31) * P1)) * P1 + P3;
  } else {
    h = seed + P3;
  }
  h += uint64_t(n);
  while (p + 8 <= end) {
    h ^= rotl(load64(p) * P2, 31) * P1;
    h = rotl(h, 27) * P1 + P3;
    p += 8;
  }
  while (p < end) {
    h ^= uint64_t(*p) * P3;
    h = rotl(h, 11) * P1;
    ++p;
  }
  h ^= h >> 33;
  h *= P2;
  h ^= h >> 29;
  h *= P3;
  h ^= h >> 32;
  return h;
}

uint64_t checksum64(const pybind11::bytes& data) {
  char* buf = nullptr;
  Py_ssize_t len = 0;
  if (PyBytes_AsStringAndSize(data.ptr(), &buf, &len) != 0) throw pybind11::error_already_set();
  uint64_t h;
  {
    pybind11::gil_scoped_release nogil;
    h = checksum64_raw(reinterpret_cast<const uint8_t*>(buf), size_t(len), 0x7067'6F6C'6600ULL);
  }
  return h;
}

// ---- payload container ----------------------------------------------------------------------
// Layout (little-endian):
//   0  : 8-byte magic "PGOLFQC\0"
//   8  : u32 version (=1)
//   12 : u32 header length H
//   16 : u64 data length D
//   24 : H bytes of header (UTF-8 JSON, written by quant.py)
//   pad to a multiple of 16 from the start, then D bytes of data: the blobs in order, each
//   starting at a 16-byte aligned offset relative to the data start (zero padding between).
// Total length = align16(24 + H) + D exactly; anything else is refused.
constexpr char kMagic[8] = {'P', 'G', 'O', 'L', 'F', 'Q', 'C', '\0'};
constexpr uint32_t kVersion = 1;
constexpr size_t kFixed = 24;
inline size_t align16(size_t x) { return (x + 15) & ~size_t(15); }

pybind11::bytes pack_payload(const pybind11::bytes& header, const std::vector<at::Tensor>& blobs) {
  char* hbuf = nullptr;
  Py_ssize_t hlen = 0;
  if (PyBytes_AsStringAndSize(header.ptr(), &hbuf, &hlen) != 0) throw pybind11::error_already_set();
  check_value(uint64_t(hlen) < (uint64_t(1) << 32), "pack_payload: header too large");
  size_t data_len = 0;
  for (size_t i = 0; i < blobs.size(); ++i) {
    const auto& b = blobs[i];
    check_type(b.scalar_type() == at::kByte && b.dim() == 1 && b.is_contiguous() &&
               b.device().is_cpu(),
               "pack_payload: blob ", i, " must be a contiguous 1-D uint8 CPU tensor");
    data_len = align16(data_len) + size_t(b.numel());
  }
  const size_t start = align16(kFixed + size_t(hlen));
  const size_t total = start + data_len;
  std::string out(total, '\0');
  char* o = out.data();
  std::memcpy(o, kMagic, 8);
  const uint32_t ver = kVersion, hl = uint32_t(hlen);
  const uint64_t dl = data_len;
  std::memcpy(o + 8, &ver, 4);
  std::memcpy(o + 12, &hl, 4);
  std::memcpy(o + 16, &dl, 8);
  std::memcpy(o + kFixed, hbuf, size_t(hlen));
  size_t off = 0;
  for (const auto& b : blobs) {
    off = align16(off);
    if (b.numel() > 0) std::memcpy(o + start + off, b.data_ptr<uint8_t>(), size_t(b.numel()));
    off += size_t(b.numel());
  }
  return pybind11::bytes(out);
}

// Returns (header bytes, data start offset, data length); ValueError naming the broken field.
pybind11::tuple split_payload(const pybind11::bytes& payload) {
  char* buf = nullptr;
  Py_ssize_t len = 0;
  if (PyBytes_AsStringAndSize(payload.ptr(), &buf, &len) != 0) throw pybind11::error_already_set();
  const size_t n = size_t(len);
  check_value(n >= kFixed, "payload truncated: ", n, " bytes, the fixed header alone is ",
              kFixed);
  check_value(std::memcmp(buf, kMagic, 8) == 0,
              "payload magic mismatch: not a pgolf container");
  uint32_t ver, hl;
  uint64_t dl;
  std::memcpy(&ver, buf + 8, 4);
  std::memcpy(&hl, buf + 12, 4);
  std::memcpy(&dl, buf + 16, 8);
  check_value(ver == kVersion, "payload version ", ver, " is not supported (expected ",
              kVersion, ")");
  const size_t start = align16(kFixed + size_t(hl));
  check_value(start <= n, "payload truncated: header of ", hl, " bytes runs past the end (",
              n, " bytes)");
  check_value(dl <= uint64_t(n - start) && start + size_t(dl) == n,
              "payload length mismatch: header says ", dl, " data bytes, found ", n - start);
  return pybind11::make_tuple(pybind11::bytes(buf + kFixed, hl), pybind11::int_(start),
                              pybind11::int_(dl));
}

}  // namespace

void bind_codec(pybind11::module_& m) {
  m.def("quantize_rows", guarded(&quantize_rows), pybind11::arg("w"), pybind11::arg("bits"),
        pybind11::arg("search"),
        "Per-row symmetric b-bit quantization of a contiguous float32 (N, K) CPU matrix. "
        "Returns [q int8 (N, K), scale fp16 (N,)] with W ~= q * scale[:, None]; search=True "
        "keeps the clip with the lowest reconstruction MSE (absmax included, ties keep it).");
  m.def("checksum64", guarded(&checksum64), pybind11::arg("data"), "64-bit integrity hash of a bytes object");
  m.def("pack_payload", guarded(&pack_payload), pybind11::arg("header"), pybind11::arg("blobs"),
        "Serialize header bytes and uint8 blobs into the container payload (see codec.cpp).");
  m.def("split_payload", guarded(&split_payload), pybind11::arg("payload"),
        "Validate a container payload; returns (header bytes, data start, data length).");
}

}  // namespace pgolf
