// pybind11 module pgolf_kernels._C: the compiled (CPU) part of the package.
// Every C++ source in csrc/ declares its functions in pgolf.h; this file binds them.
#include <torch/extension.h>

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
}
