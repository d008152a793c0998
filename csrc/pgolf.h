#pragma once
#include <torch/extension.h>

namespace pgolf {
// Registers the int-k codec functions (csrc/codec.cpp) on the module.
void bind_codec(pybind11::module_& m);
}  // namespace pgolf
