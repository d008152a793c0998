// quantize_rows on the GPU: the CUDA twin of csrc/codec.cpp's per-row int-k quantizer, bit-exact with it
// (same int8 codes, same fp16 scales, same refused rows; row_math.cuh holds the shared arithmetic).
//
// One 128-thread block per row. The clip search measures 24 candidate scales; each candidate's error is
// codec.cpp's sum of fp32 partial sums over 256-element chunks, so the work items are (candidate, chunk)
// pairs, one thread each, written to a global scratch buffer (24 floats per 256 weights: 13.5 MB for the
// 36 M-parameter default model) and then added in chunk order by one thread per candidate. The row's std
// (needed only by the 6 k*std candidates) is a sequential double sum that thread 0 computes while the
// other threads measure the 18 absmax-fraction candidates.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>  // c10, not ATen/cuda/CUDAContext.h: that one needs the cuSPARSE/cuBLAS headers

#include "../codec.h"
#include "row_math.cuh"

namespace pgolf {
namespace {
using namespace rowq;

constexpr int kThreads = 128;  // 4 warps: a 512-wide row has 2 chunks x 24 candidates = 48 work items

__device__ float block_max(float v, float* red) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = v;
  __syncthreads();
  v = red[0];
  for (int i = 1; i < kThreads / 32; ++i) v = fmaxf(v, red[i]);
  return v;  // max is exact in any order
}

// Work item `it` = (candidate it / nchunk, chunk it % nchunk): that chunk's fp32 error partial.
__device__ void measure(int64_t it, const float* x, int64_t K, int64_t nchunk, float amax, float sd,
                        float qmax, float* part) {
  const int c = int(it / nchunk);
  const int64_t k = it % nchunk;
  const float s = candidate_scale(c, amax, sd, qmax);
  if (s > 0.0f) {
    const int n = int(K - k * kChunk < kChunk ? K - k * kChunk : kChunk);
    part[it] = chunk_sse(x + k * kChunk, n, s, qmax);
  }
}

__global__ void __launch_bounds__(kThreads)
quantize_rows_kernel(const float* __restrict__ w, int64_t K, float qmax, bool search,
                     int8_t* __restrict__ q, __half* __restrict__ scale, float* __restrict__ scratch,
                     unsigned long long* __restrict__ bad) {
  __shared__ float red[kThreads / 32];
  __shared__ float cand_s[kCands];
  __shared__ double cand_e[kCands];
  __shared__ float row_sd;
  const int64_t row = blockIdx.x;
  const int tid = threadIdx.x;
  const float* x = w + row * K;

  int finite = 1;
  float amax = 0.0f;
  for (int64_t j = tid; j < K; j += kThreads) {
    const float v = x[j];
    finite &= isfinite(v) ? 1 : 0;
    amax = fmaxf(amax, fabsf(v));
  }
  finite = __syncthreads_and(finite);
  amax = block_max(amax, red);

  float best = 0.0f;  // a refused row gets scale 0 and zero codes, as in codec.cpp
  if (!finite || fdiv(amax, qmax) > 65504.0f) {
    if (tid == 0) atomicMin(bad, static_cast<unsigned long long>(row));
  } else {
    best = to_half_float(fdiv(amax, qmax));
    // A zero absmax scale makes every smaller clip's scale 0 too (fp16 rounding is monotonic), and
    // codec.cpp skips those: its search cannot move off 0, so there is nothing to measure.
    if (search && best > 0.0f) {
      const int64_t nchunk = (K + kChunk - 1) / kChunk;
      float* part = scratch + row * kCands * nchunk;  // [candidate][chunk]
      const int64_t n_abs = (1 + kFractions) * nchunk;
      if (tid == 0) {
        row_sd = row_std(x, K);
      } else {
        for (int64_t it = tid - 1; it < n_abs; it += kThreads - 1)
          measure(it, x, K, nchunk, amax, 0.0f, qmax, part);
      }
      __syncthreads();
      const float sd = row_sd;
      for (int64_t it = n_abs + tid; it < kCands * nchunk; it += kThreads)
        measure(it, x, K, nchunk, amax, sd, qmax, part);
      __syncthreads();
      if (tid < kCands) {
        const float s = candidate_scale(tid, amax, sd, qmax);
        cand_s[tid] = s;
        cand_e[tid] = s > 0.0f ? sse_from_parts(part + tid * nchunk, nchunk) : 0.0;
      }
      __syncthreads();
      best = select_scale(cand_s, cand_e);  // every thread: same inputs, same answer
    }
  }
  if (tid == 0) scale[row] = __float2half_rn(best);
  int8_t* qr = q + row * K;
  const float inv = best > 0.0f ? fdiv(1.0f, best) : 0.0f;
  for (int64_t j = tid; j < K; j += kThreads)
    qr[j] = best > 0.0f ? static_cast<int8_t>(round_even(clamp_q(fmul(x[j], inv), qmax))) : int8_t(0);
}

}  // namespace

int64_t cuda_chunk_count(int64_t K) noexcept { return (K + kChunk - 1) / kChunk; }
int64_t cuda_candidates() noexcept { return kCands; }

const char* cuda_error_text(int err) noexcept { return cudaGetErrorString(static_cast<cudaError_t>(err)); }

// No TORCH_CHECK, no allocation, nothing that throws: see codec.h (the wrapper in codec.cpp does all that).
int quantize_rows_cuda_launch(const at::Tensor& w, float qmax, bool search, at::Tensor& q, at::Tensor& s,
                              at::Tensor& scratch, at::Tensor& bad) noexcept {
  const int64_t N = w.size(0), K = w.size(1);
  const int device = w.get_device();
  int prev = 0;
  cudaGetDevice(&prev);
  cudaSetDevice(device);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  quantize_rows_kernel<<<unsigned(N), kThreads, 0, stream>>>(
      w.data_ptr<float>(), K, qmax, search, q.data_ptr<int8_t>(),
      reinterpret_cast<__half*>(s.data_ptr<at::Half>()), scratch.data_ptr<float>(),
      reinterpret_cast<unsigned long long*>(bad.data_ptr<int64_t>()));
  const int err = static_cast<int>(cudaGetLastError());
  cudaSetDevice(prev);
  return err;
}

}  // namespace pgolf
