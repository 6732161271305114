// pybind11 module lora_da._core: the compiled core's entry points.
// For now it reports how it was built; the solver bindings join it later.
#include <pybind11/pybind11.h>

#include <string>

#ifndef LORA_DA_VERSION
#define LORA_DA_VERSION "0.0.0"
#endif

namespace py = pybind11;

PYBIND11_MODULE(_core, m) {
  m.doc() = "lora-da compiled core";
  m.def(
      "build_info",
      []() {
        py::dict info;
        info["version"] = std::string(LORA_DA_VERSION);
        info["compiler"] = std::string(
#if defined(__clang__)
            "clang " __clang_version__
#elif defined(__GNUC__)
            "gcc " __VERSION__
#else
            "unknown"
#endif
        );
        info["cuda"] = false;
        return info;
      },
      "How this build of lora_da._core was configured.");
}
