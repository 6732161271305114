// pybind11 module lora_da._core: the compiled core's entry points.
// Tensors cross as raw pointers (tensor.data_ptr()) plus shapes and dtypes, so
// the module links neither libtorch nor the CUDA libraries.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "solve_request.h"

#ifndef LORA_DA_VERSION
#define LORA_DA_VERSION "0.0.0"
#endif

namespace py = pybind11;

namespace {

int parse_dtype(const std::string& dtype) {
  if (dtype == "float64") return LORA_DA_FLOAT64;
  if (dtype == "float32") return LORA_DA_FLOAT32;
  throw py::value_error("dtype must be 'float32' or 'float64', got '" + dtype + "'");
}

// Runs the request on `device` ("cpu" or "cuda") and packs the report.
py::dict run_request(lora_da_solve_request& request, const std::string& device) {
  if (request.batch < 1 || request.n < 1) throw py::value_error("empty batch or n < 1");
  if (request.k < 1 || request.k > request.n) throw py::value_error("k must lie in [1, n]");
  if (request.max_iter < 0) throw py::value_error("max_iter must be >= 0");
  const std::size_t pairs = std::size_t(request.batch) * request.k;
  std::vector<double> eigenvalues(pairs), residual_norms(pairs), norm_estimate(request.batch);
  std::vector<int> iterations(request.batch);
  std::vector<unsigned char> converged(request.batch);
  request.eigenvalues = eigenvalues.data();
  request.residual_norms = residual_norms.data();
  request.iterations = iterations.data();
  request.converged = converged.data();
  request.norm_estimate = norm_estimate.data();
  char message[1024] = {0};
  int status;
  std::string backend;
  {
    py::gil_scoped_release release;
    if (device == "cpu") {
      status = lora_da_cpu_solve(&request, message, sizeof(message));
      backend = "lobpcg/cpu-openblas";
    } else if (device == "cuda") {
      status = lora_da_cuda_solve(&request, message, sizeof(message));
      backend = "lobpcg/cuda-cublas-cusolver";
    } else {
      throw std::invalid_argument("device must be 'cpu' or 'cuda'");
    }
  }
  if (status != 0) throw std::runtime_error(std::string("lora_da LOBPCG failed: ") + message);
  py::dict out;
  out["eigenvalues"] = eigenvalues;
  out["residual_norms"] = residual_norms;
  out["iterations"] = iterations;
  out["converged"] = std::vector<bool>(converged.begin(), converged.end());
  out["norm_estimate"] = norm_estimate;
  out["dense_fallback"] = request.dense_fallback != 0;
  out["block_size"] = request.block_size;
  out["tol"] = request.tol_used;
  out["backend"] = request.dense_fallback ? backend + " (dense fallback)" : backend;
  return out;
}

void set_options(lora_da_solve_request& request, int k, int guard, bool largest, double tol, int max_iter,
                 std::uint64_t seed, std::uintptr_t stream, std::uintptr_t eigenvectors) {
  request.k = k;
  request.guard = guard;
  request.largest = largest ? 1 : 0;
  request.tol = tol;
  request.max_iter = max_iter;
  request.seed = seed;
  request.stream = stream;
  request.eigenvectors = reinterpret_cast<void*>(eigenvectors);
}

}  // namespace

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
        info["cuda"] = lora_da_cuda_compiled() != 0;
        info["blas"] = std::string("scipy-openblas32");
        return info;
      },
      "How this build of lora_da._core was configured.");

  m.def(
      "lobpcg_dense",
      [](std::uintptr_t matrices, int batch, int n, std::int64_t matrix_stride, const std::string& dtype, int k,
         int guard, bool largest, double tol, int max_iter, std::uint64_t seed, std::uintptr_t eigenvectors,
         const std::string& device, std::uintptr_t stream) {
        lora_da_solve_request request{};
        request.operator_kind = LORA_DA_OPERATOR_DENSE;
        request.dtype = parse_dtype(dtype);
        request.batch = batch;
        request.n = n;
        request.matrices = reinterpret_cast<const void*>(matrices);
        request.matrix_stride = matrix_stride;
        set_options(request, k, guard, largest, tol, max_iter, seed, stream, eigenvectors);
        return run_request(request, device);
      },
      py::arg("matrices"), py::arg("batch"), py::arg("n"), py::arg("matrix_stride"), py::arg("dtype"), py::arg("k"),
      py::arg("guard"), py::arg("largest"), py::arg("tol"), py::arg("max_iter"), py::arg("seed"),
      py::arg("eigenvectors"), py::arg("device"), py::arg("stream"),
      "Batched LOBPCG on dense symmetric matrices given by address (contiguous, batch x n x n). "
      "Eigenvectors are written to `eigenvectors` as batch x k x n (row-major), i.e. n x k column-major.");

  m.def(
      "lobpcg_guidance",
      [](std::uintptr_t d_transposed, int batch, int n, int d_out, std::int64_t stride_d, std::uintptr_t z_upper,
         std::int64_t stride_z, double alpha, const std::vector<double>& variance_scale, const std::string& dtype,
         int k, int guard, bool largest, double tol, int max_iter, std::uint64_t seed, std::uintptr_t eigenvectors,
         const std::string& device, std::uintptr_t stream, std::uintptr_t preconditioner, std::int64_t stride_p,
         const std::vector<double>& preconditioner_shift, bool d_column_major, std::uintptr_t initial,
         int initial_cols, std::int64_t initial_stride) {
        if (int(variance_scale.size()) != batch) throw py::value_error("variance_scale needs one value per problem");
        if (preconditioner != 0 && int(preconditioner_shift.size()) != batch)
          throw py::value_error("preconditioner_shift needs one value per problem");
        lora_da_solve_request request{};
        request.operator_kind = LORA_DA_OPERATOR_GUIDANCE;
        request.dtype = parse_dtype(dtype);
        request.batch = batch;
        request.n = n;
        request.d_transposed = reinterpret_cast<const void*>(d_transposed);
        request.d_column_major = d_column_major ? 1 : 0;
        request.d_out = d_out;
        request.stride_d = stride_d;
        request.z_upper = reinterpret_cast<const void*>(z_upper);
        request.stride_z = stride_z;
        request.alpha = alpha;
        request.variance_scale = variance_scale.data();
        request.preconditioner = reinterpret_cast<const void*>(preconditioner);
        request.stride_p = stride_p;
        request.preconditioner_shift = preconditioner_shift.empty() ? nullptr : preconditioner_shift.data();
        set_options(request, k, guard, largest, tol, max_iter, seed, stream, eigenvectors);
        if (initial_cols < 0) throw py::value_error("initial_cols must be >= 0");
        request.initial = reinterpret_cast<const void*>(initial);
        request.initial_cols = initial == 0 ? 0 : initial_cols;
        request.initial_stride = initial_stride;
        return run_request(request, device);
      },
      py::arg("d_transposed"), py::arg("batch"), py::arg("n"), py::arg("d_out"), py::arg("stride_d"),
      py::arg("z_upper"), py::arg("stride_z"), py::arg("alpha"), py::arg("variance_scale"), py::arg("dtype"),
      py::arg("k"), py::arg("guard"), py::arg("largest"), py::arg("tol"), py::arg("max_iter"), py::arg("seed"),
      py::arg("eigenvectors"), py::arg("device"), py::arg("stream"), py::arg("preconditioner") = 0,
      py::arg("stride_p") = 0, py::arg("preconditioner_shift") = std::vector<double>{},
      py::arg("d_column_major") = false, py::arg("initial") = 0, py::arg("initial_cols") = 0,
      py::arg("initial_stride") = 0,
      "Batched LOBPCG on Ω v = −α D(Dᵀv) + c Z⁻¹v. Pointers: D as a row-major batch x n x d_out tensor "
      "(= Dᵀ column-major; with d_column_major, a batch of column-major n x d_out matrices), the lower Cholesky factor L of Z as a row-major n x n tensor (= Lᵀ column-major); "
      "optional preconditioner (I − s M⁻¹)/α from the lower Cholesky factor of M = sI + αZ (same layout as L) "
      "and one shift s per problem.");
}
