#pragma once
#include <torch/extension.h>

#include <stdexcept>
#include <string>
#include <utility>

namespace pgolf {
// Errors of the compiled part are pybind11 / std exceptions, never c10::Error. On the GPU image (torch
// 2.11.0+cu130 built with GCC 13.3, this extension built with g++ 13.3) a c10::Error leaving a binding
// crashed the process with SIGSEGV -- from our codec and from a minimal load_inline extension alike --
// and so did catching it as c10::ValueError in the binding; there, a std::runtime_error passed through
// as RuntimeError and a c10::Error caught as std::exception inside the extension was handled normally.
// check_value / check_type / check_runtime raise Python ValueError / TypeError / RuntimeError with the
// concatenated message (c10::str), and guarded() turns anything else (a c10::Error from ATen inside a
// call) into RuntimeError with its first line, caught as std::exception.
template <typename... Args>
inline void check_value(bool ok, const Args&... msg) {
  if (!ok) throw pybind11::value_error(c10::str(msg...));
}
template <typename... Args>
inline void check_type(bool ok, const Args&... msg) {
  if (!ok) throw pybind11::type_error(c10::str(msg...));
}
template <typename... Args>
inline void check_runtime(bool ok, const Args&... msg) {
  if (!ok) throw std::runtime_error(c10::str(msg...));
}

template <typename R, typename... Args>
auto guarded(R (*fn)(Args...)) {
  return [fn](Args... args) -> R {
    try {
      return fn(std::forward<Args>(args)...);
    } catch (const pybind11::builtin_exception&) {
      throw;
    } catch (const pybind11::error_already_set&) {
      throw;
    } catch (const std::exception& e) {
      const std::string what = e.what();
      throw std::runtime_error(what.substr(0, what.find('\n')));
    }
  };
}

// Registers the int-k codec functions (csrc/codec.cpp) on the module.
void bind_codec(pybind11::module_& m);
}  // namespace pgolf
