// lora_da._core.build_info(): how this build of the compiled core was configured.
// The values come from compile definitions that CMakeLists.txt sets on this file
// alone (so changing them recompiles nothing else); `cuda` is read from the
// backend object actually linked in (solve_cpu.cpp or cuda_backend.cu).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdlib>
#include <string>
#include <vector>

#include "solve_request.h"

#ifndef LORA_DA_VERSION
#define LORA_DA_VERSION "0.0.0"
#endif
#ifndef LORA_DA_BUILD_CUDA_REQUESTED
#define LORA_DA_BUILD_CUDA_REQUESTED "unknown"
#endif
#ifndef LORA_DA_BUILD_CUDA_ARCHITECTURES
#define LORA_DA_BUILD_CUDA_ARCHITECTURES ""
#endif
#ifndef LORA_DA_BUILD_CUDA_COMPILER
#define LORA_DA_BUILD_CUDA_COMPILER ""
#endif
#ifndef LORA_DA_BUILD_CXX_COMPILER
#define LORA_DA_BUILD_CXX_COMPILER "unknown"
#endif
#ifndef LORA_DA_BUILD_TYPE
#define LORA_DA_BUILD_TYPE "unknown"
#endif
#ifndef LORA_DA_BUILD_BLAS_VERSION
#define LORA_DA_BUILD_BLAS_VERSION ""
#endif
#ifndef LORA_DA_BUILD_PYTHON
#define LORA_DA_BUILD_PYTHON ""
#endif

namespace py = pybind11;

namespace {

// "80,90" -> {80, 90}; an empty string -> {}.
std::vector<int> architectures(const std::string& text) {
  std::vector<int> values;
  std::size_t start = 0;
  while (start < text.size()) {
    std::size_t end = text.find(',', start);
    if (end == std::string::npos) end = text.size();
    if (end > start) values.push_back(std::atoi(text.substr(start, end - start).c_str()));
    start = end + 1;
  }
  return values;
}

// An empty compile-time string is None in Python.
py::object text_or_none(const char* text) {
  if (text[0] == '\0') return py::none();
  return py::str(text);
}

py::dict build_info() {
  py::dict info;
  info["version"] = std::string(LORA_DA_VERSION);
  info["cuda"] = lora_da_cuda_compiled() != 0;
  info["cuda_requested"] = std::string(LORA_DA_BUILD_CUDA_REQUESTED);  // AUTO, ON or OFF
  info["cuda_architectures"] = architectures(LORA_DA_BUILD_CUDA_ARCHITECTURES);
  info["cuda_compiler"] = text_or_none(LORA_DA_BUILD_CUDA_COMPILER);   // e.g. "NVIDIA 13.0.88"
  info["cuda_runtime"] = lora_da_cuda_compiled() != 0 ? py::object(py::str("static")) : py::object(py::none());
  info["cxx_compiler"] = std::string(LORA_DA_BUILD_CXX_COMPILER);      // e.g. "GNU 12.2.0"
  info["build_type"] = std::string(LORA_DA_BUILD_TYPE);
  info["blas"] = std::string("scipy-openblas32");
  info["blas_version"] = text_or_none(LORA_DA_BUILD_BLAS_VERSION);
  info["python"] = text_or_none(LORA_DA_BUILD_PYTHON);  // the Python version it was built for
  return info;
}

}  // namespace

void register_build_info(py::module_& m) {
  m.def("build_info", &build_info,
        "How this build of lora_da._core was configured: cuda (the CUDA backend is compiled in), "
        "cuda_requested (LORA_DA_CUDA: AUTO, ON or OFF), cuda_architectures, cuda_compiler, "
        "cuda_runtime, cxx_compiler, build_type, blas, blas_version, python, version.");
}
