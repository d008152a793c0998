// pybind11 module pgolf_kernels._C: the compiled part of the package (C++; CUDA when built with it).
// The C++ sources declare their functions in pgolf.h and codec.h; this file binds them.
#include <torch/version.h>

#include "codec.h"
#include "pgolf.h"

namespace {
// Lets Python compare the torch the .so was compiled against with the one imported
// (a mismatch usually shows as an undefined-symbol ImportError before we get here,
// but a same-ABI different-version build should still be reported).
std::string built_with_torch() {
#ifdef TORCH_VERSION_MAJOR
  return std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) + "." +
         std::to_string(TORCH_VERSION_PATCH);
#else
  return "unknown";
#endif
}
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "pgolf_kernels compiled helpers (int-k codec, checksums)";
  m.def("built_with_torch", &built_with_torch, "torch version this extension was compiled against");
  pgolf::bind_codec(m);
#ifdef PGOLF_WITH_CUDA
  // setup.py defines PGOLF_WITH_CUDA when it compiles csrc/cuda/*.cu into this module
  m.attr("has_cuda") = true;
  m.def("quantize_rows_cuda", pgolf::guarded(&pgolf::quantize_rows_cuda), pybind11::arg("w"), pybind11::arg("bits"),
        pybind11::arg("search"),
        "quantize_rows for a contiguous float32 (N, K) CUDA matrix, on its device: the same codes and "
        "fp16 scales as the CPU codec, bit for bit.");
#else
  m.attr("has_cuda") = false;
#endif
}
