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
// The CUDA twin of quantize_rows (csrc/cuda/quantize.cu): same codes and fp16 scales, bit for bit.
std::vector<at::Tensor> quantize_rows_cuda(const at::Tensor& w, int64_t bits, bool search);
#endif
}  // namespace pgolf
