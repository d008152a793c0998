// Per-row arithmetic of the int-k codec's clip search, written once for host and device so the CUDA
// kernel (quantize.cu) reproduces csrc/codec.cpp bit for bit. Every float/double operation below is the
// exact IEEE operation codec.cpp performs, in the same order:
//  * device: explicit round-to-nearest intrinsics (__fadd_rn, __fmul_rn, __dadd_rn...) so nvcc cannot
//    contract a*b+c into an FMA (one rounding instead of codec.cpp's two: a different error sum);
//  * sums keep codec.cpp's order: fp32 partial sums of 256 consecutive elements, added in order into a
//    double; the row's mean/variance as sequential double sums over the row. One thread owns each
//    sequential sum; the parallelism is over (candidate clip, 256-element chunk) pairs.
// No ATen here: the host side compiles with any C++ compiler (without FP contraction, -ffp-contract=off,
// as setup.py builds codec.cpp); tests/test_quant_cuda.py runs it against the C++ codec on the CPU lane.
#pragma once
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define PG_HD __host__ __device__ __forceinline__
#else
#define PG_HD inline
#endif

namespace pgolf {
namespace rowq {

constexpr int kChunk = 256;       // codec.cpp's fp32 partial-sum length
constexpr int kFractions = 17;    // clip = absmax * f
constexpr int kStdMultiples = 6;  // clip = k * std
constexpr int kCands = 1 + kFractions + kStdMultiples;  // candidate 0 is absmax itself

// One IEEE operation each, rounded to nearest; on the device as an intrinsic that nvcc never fuses.
#ifdef __CUDA_ARCH__
#define PG_OP(name, T, intrinsic, expr) \
  PG_HD T name(T a, T b) { return intrinsic(a, b); }
#else
#define PG_OP(name, T, intrinsic, expr) \
  PG_HD T name(T a, T b) { return expr; }
#endif
PG_OP(fadd, float, __fadd_rn, a + b)
PG_OP(fsub, float, __fsub_rn, a - b)
PG_OP(fmul, float, __fmul_rn, a * b)
PG_OP(fdiv, float, __fdiv_rn, a / b)
PG_OP(dadd, double, __dadd_rn, a + b)
PG_OP(dmul, double, __dmul_rn, a * b)
PG_OP(ddiv, double, __ddiv_rn, a / b)
#undef PG_OP
PG_HD double dsub(double a, double b) { return dadd(a, -b); }
PG_HD double dsqrt(double a) {
#ifdef __CUDA_ARCH__
  return __dsqrt_rn(a);
#else
  return std::sqrt(a);
#endif
}

// codec.cpp's round_even: (v + 1.5*2^23) - 1.5*2^23, round-half-even for |v| < 2^22.
PG_HD float round_even(float v) { return fsub(fadd(v, 12582912.0f), 12582912.0f); }

// std::min(std::max(v, -qmax), qmax), spelled as the std:: templates evaluate it.
PG_HD float clamp_q(float v, float qmax) {
  const float lo = (v < -qmax) ? -qmax : v;
  return (qmax < lo) ? qmax : lo;
}

// fp16 round-to-nearest-even of x, back as float (c10::Half(x) in codec.cpp).
PG_HD float to_half_float(float x) { return __half2float(__float2half_rn(x)); }

// Candidate c's clip. Same values and order as codec.cpp's kFractions / kStdMultiples.
PG_HD float candidate_clip(int c, float amax, float sd) {
  const float frac[kFractions] = {1.0f, 0.985f, 0.97f, 0.955f, 0.94f, 0.92f, 0.9f, 0.88f, 0.86f,
                                  0.83f, 0.8f,   0.76f, 0.72f,  0.67f, 0.62f, 0.56f, 0.5f};
  const float mult[kStdMultiples] = {2.5f, 3.0f, 3.5f, 4.0f, 5.0f, 6.0f};
  if (c == 0) return amax;
  return c <= kFractions ? fmul(amax, frac[c - 1]) : fmul(sd, mult[c - 1 - kFractions]);
}

// The fp16 scale candidate c tries, or 0 when codec.cpp's consider() skips it before measuring
// (clip not in (0, absmax), or a scale that rounds to 0). Candidate 0 (absmax) is never skipped.
PG_HD float candidate_scale(int c, float amax, float sd, float qmax) {
  const float clip = candidate_clip(c, amax, sd);
  if (c > 0 && (!(clip > 0.0f) || clip >= amax)) return 0.0f;
  return to_half_float(fdiv(clip, qmax));
}

// fp32 sum of squared errors over w[0..n) (n <= kChunk) for scale s > 0: one codec.cpp `part`.
PG_HD float chunk_sse(const float* w, int n, float s, float qmax) {
  const float inv = fdiv(1.0f, s);
  float part = 0.0f;
  for (int j = 0; j < n; ++j) {
    const float v = clamp_q(fmul(w[j], inv), qmax);
    const float e = fsub(w[j], fmul(round_even(v), s));
    part = fadd(part, fmul(e, e));
  }
  return part;
}

// Row standard deviation as codec.cpp computes it: sequential double sums, population variance.
PG_HD float row_std(const float* w, int64_t K) {
  double sum = 0.0, sumsq = 0.0;
  for (int64_t j = 0; j < K; ++j) {
    const double x = double(w[j]);
    sum = dadd(sum, x);
    sumsq = dadd(sumsq, dmul(x, x));
  }
  const double mean = ddiv(sum, double(K));
  const double v = dsub(ddiv(sumsq, double(K)), dmul(mean, mean));
  const double var = (0.0 < v) ? v : 0.0;  // std::max(0.0, v)
  return static_cast<float>(dsqrt(var));   // double -> float rounds to nearest on both sides
}

// One candidate's error: its chunk partials part[0..nchunk) added in chunk order into a double, as
// codec.cpp's row_sse does (its trailing `acc + part` is the last chunk's add).
PG_HD double sse_from_parts(const float* part, int64_t nchunk) {
  double acc = 0.0;
  for (int64_t k = 0; k < nchunk; ++k) acc = dadd(acc, double(part[k]));
  return acc;
}

// codec.cpp's selection: absmax first, then every measured candidate in order; strictly lower
// error wins (ties keep the earlier, larger clip); a scale equal to the current best is skipped.
PG_HD float select_scale(const float* scale, const double* sse) {
  float best_s = scale[0];
  double best = sse[0];
  for (int c = 1; c < kCands; ++c) {
    if (scale[c] == 0.0f || scale[c] == best_s) continue;
    if (sse[c] < best) {
      best = sse[c];
      best_s = scale[c];
    }
  }
  return best_s;
}

}  // namespace rowq
}  // namespace pgolf
