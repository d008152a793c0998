#pragma once
#include <torch/extension.h>

#include <stdexcept>
#include <utility>

namespace pgolf {
// Wraps a function for m.def so that no c10::Error reaches pybind11's exception translators: on the GPU
// image (torch 2.11.0+cu130 built with GCC 13.3, extension built with g++ 13.3) every c10::Error thrown
// through a binding -- ours or a minimal load_inline one -- crashed the process with SIGSEGV, while a
// std::runtime_error passed through as RuntimeError. c10::ValueError becomes pybind11::value_error
// (Python ValueError), c10::TypeError pybind11::type_error, any other c10::Error std::runtime_error
// (RuntimeError); the message is the first line without the C++ backtrace.
template <typename R, typename... Args>
auto guarded(R (*fn)(Args...)) {
  return [fn](Args... args) -> R {
    try {
      return fn(std::forward<Args>(args)...);
    } catch (const c10::ValueError& e) {
      throw pybind11::value_error(e.what_without_backtrace());
    } catch (const c10::TypeError& e) {
      throw pybind11::type_error(e.what_without_backtrace());
    } catch (const c10::Error& e) {
      throw std::runtime_error(e.what_without_backtrace());
    }
  };
}

// Registers the int-k codec functions (csrc/codec.cpp) on the module.
void bind_codec(pybind11::module_& m);
}  // namespace pgolf
