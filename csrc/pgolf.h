#pragma once
// ATen and torch's pybind11 casters, not <torch/extension.h> (which adds the C++ frontend, torch/all.h): a
// translation unit's headers took 12 s against 24 s to compile (g++, 2-core host), and the codec is built at install
// and again by every code pack that extracts itself
#include <ATen/ATen.h>
#include <torch/csrc/utils/pybind.h>

#include <stdexcept>
#include <string>
#include <utility>

namespace pgolf {
// Errors of the compiled part reach Python as ValueError / TypeError / RuntimeError with a one-line message,
// and no C++ exception type but pybind11::error_already_set crosses a binding: guarded() catches everything
// inside the extension, sets the Python error itself and throws error_already_set, which pybind11's
// dispatcher handles before any exception translator (a c10::Error through a binding crashed a load_inline
// module on the GPU image; the crashes of this extension there came from a private static C++ runtime in it,
// see setup.py STATIC_RUNTIME_FLAGS). check_value / check_type / check_runtime throw with the concatenated
// message (c10::str); guarded() keeps the first line of anything else (a c10::Error from ATen inside a call,
// with its C++ stack trace).
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

[[noreturn]] inline void raise_python(PyObject* type, const char* what) {
  const std::string msg = what;
  PyErr_SetString(type, msg.substr(0, msg.find('\n')).c_str());
  throw pybind11::error_already_set();
}

template <typename R, typename... Args>
auto guarded(R (*fn)(Args...)) {
  return [fn](Args... args) -> R {
    try {
      return fn(std::forward<Args>(args)...);
    } catch (const pybind11::error_already_set&) {
      throw;
    } catch (const pybind11::value_error& e) {
      raise_python(PyExc_ValueError, e.what());
    } catch (const pybind11::type_error& e) {
      raise_python(PyExc_TypeError, e.what());
    } catch (const std::exception& e) {
      raise_python(PyExc_RuntimeError, e.what());
    } catch (...) {
      raise_python(PyExc_RuntimeError, "pgolf_kernels._C: unknown C++ exception");
    }
  };
}

// Registers the int-k codec functions (csrc/codec.cpp) on the module.
void bind_codec(pybind11::module_& m);
}  // namespace pgolf
