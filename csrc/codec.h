// Declarations shared by the CPU codec (codec.cpp) and the CUDA quantizer (cuda/quantize.cu).
// ATen only (no pybind11), so nvcc compiles it as it is.
#pragma once
#include <ATen/ATen.h>

#include <vector>

namespace pgolf {
// quantize_rows' argument checks (bits in 2..8, contiguous float32 2-D on `device`): one error line each.
void check_quantize_args(const at::Tensor& w, int64_t bits, at::DeviceType device);
// Raises the codec's ValueError for refused row `bad_row` (the lowest one; N = none refused).
void check_rows_finite(int64_t bad_row, int64_t N, float qmax);
#ifdef PGOLF_WITH_CUDA
// The CUDA twin of quantize_rows: same codes and fp16 scales, bit for bit. The wrapper (codec.cpp, host
// compiler) checks the arguments, allocates and raises every error (with pgolf.h's checks: no c10::Error
// may leave the extension); the launcher it calls (cuda/quantize.cu) never throws and returns the
// launch's cudaError_t as an int (0 = success).
std::vector<at::Tensor> quantize_rows_cuda(const at::Tensor& w, int64_t bits, bool search);
int quantize_rows_cuda_launch(const at::Tensor& w, float qmax, bool search, at::Tensor& q, at::Tensor& s,
                              at::Tensor& scratch, at::Tensor& bad) noexcept;
const char* cuda_error_text(int err) noexcept;
int64_t cuda_chunk_count(int64_t K) noexcept;  // scratch floats per row = 24 candidates x this
int64_t cuda_candidates() noexcept;
#endif
}  // namespace pgolf
