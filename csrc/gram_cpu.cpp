// lora_da._core.accumulate_gram_lower: Z += Xᵀ Y on Z's lower triangle, on the host,
// with OpenBLAS's triangle-only products (?syrk when Y is X, ?gemmt otherwise).
//
// The statistics pass accumulates the input factor Z = Σ_t m_t a_t a_tᵀ (docs/math.md
// §2) once per batch and group; Z is symmetric, so only one triangle is computed and the
// other is mirrored once at the end of the pass. In float64 (the default accumulator,
// §5.6) the panel products torch makes for that triangle also compute part of the other
// one; these calls compute exactly the triangle, at GEMM speed.
//
// Layouts (row-major, as torch hands them): Z is dim x dim; X and Y are rows x dim,
// contiguous. Row-major Z's lower triangle is column-major Z's upper one, and a row-major
// rows x dim matrix is a column-major dim x rows one, so the call is, column-major,
// C(upper) += Y_cm · X_cmᵀ with C = Z, i.e. Z[i, j] += Σ_t y_ti x_tj for j <= i. The pass
// calls it with Y = X (?syrk) or Y = diag(m) X, the rows scaled by their token weights
// (?gemmt); either way the sum is symmetric in i and j, so one triangle holds all of it.
#include <pybind11/pybind11.h>

#include <cstddef>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>

#include "cpu_backend.hpp"

extern "C" {
void scipy_dsyrk_(const char* uplo, const char* trans, const int* n, const int* k, const double* alpha,
                  const double* a, const int* lda, const double* beta, double* c, const int* ldc, std::size_t,
                  std::size_t);
void scipy_ssyrk_(const char* uplo, const char* trans, const int* n, const int* k, const float* alpha,
                  const float* a, const int* lda, const float* beta, float* c, const int* ldc, std::size_t,
                  std::size_t);
void scipy_dgemmt_(const char* uplo, const char* transa, const char* transb, const int* n, const int* k,
                   const double* alpha, const double* a, const int* lda, const double* b, const int* ldb,
                   const double* beta, double* c, const int* ldc, std::size_t, std::size_t, std::size_t);
void scipy_sgemmt_(const char* uplo, const char* transa, const char* transb, const int* n, const int* k,
                   const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                   const float* beta, float* c, const int* ldc, std::size_t, std::size_t, std::size_t);
}

namespace py = pybind11;

namespace {

template <typename T>
void gram_lower(T* z, const T* rows, const T* weighted_rows, int num_rows, int dim) {
  const char upper = 'U', no = 'N', yes = 'T';
  const T one = 1;
  if (weighted_rows == nullptr || weighted_rows == rows) {
    if constexpr (sizeof(T) == 8) {
      scipy_dsyrk_(&upper, &no, &dim, &num_rows, &one, rows, &dim, &one, z, &dim, 1, 1);
    } else {
      scipy_ssyrk_(&upper, &no, &dim, &num_rows, &one, rows, &dim, &one, z, &dim, 1, 1);
    }
    return;
  }
  if constexpr (sizeof(T) == 8) {
    scipy_dgemmt_(&upper, &no, &yes, &dim, &num_rows, &one, weighted_rows, &dim, rows, &dim, &one, z, &dim, 1, 1, 1);
  } else {
    scipy_sgemmt_(&upper, &no, &yes, &dim, &num_rows, &one, weighted_rows, &dim, rows, &dim, &one, z, &dim, 1, 1, 1);
  }
}

void accumulate_gram_lower(std::uintptr_t input_factor_sum, std::uintptr_t rows, std::uintptr_t weighted_rows,
                           std::int64_t num_rows, std::int64_t dim, const std::string& dtype, int threads) {
  constexpr std::int64_t max_int = std::numeric_limits<int>::max();
  if (dim < 1 || dim > max_int) throw py::value_error("accumulate_gram_lower: dim must be in [1, 2^31 - 1], got " + std::to_string(dim));
  if (num_rows < 0 || num_rows > max_int) {
    throw py::value_error("accumulate_gram_lower: num_rows must be in [0, 2^31 - 1], got " + std::to_string(num_rows));
  }
  if (threads < 1) throw py::value_error("accumulate_gram_lower: threads must be >= 1, got " + std::to_string(threads));
  if (input_factor_sum == 0 || rows == 0) throw py::value_error("accumulate_gram_lower: null input_factor_sum or rows");
  if (dtype != "float32" && dtype != "float64") {
    throw py::value_error("accumulate_gram_lower: dtype must be 'float32' or 'float64', got '" + dtype + "'");
  }
  if (num_rows == 0) return;
  py::gil_scoped_release release;  // the products take long; nothing here touches Python objects
  lora_da::OpenblasThreadsGuard guard(threads);
  if (dtype == "float64") {
    gram_lower(reinterpret_cast<double*>(input_factor_sum), reinterpret_cast<const double*>(rows),
               reinterpret_cast<const double*>(weighted_rows), static_cast<int>(num_rows), static_cast<int>(dim));
  } else {
    gram_lower(reinterpret_cast<float*>(input_factor_sum), reinterpret_cast<const float*>(rows),
               reinterpret_cast<const float*>(weighted_rows), static_cast<int>(num_rows), static_cast<int>(dim));
  }
}

}  // namespace

void register_gram(py::module_& m) {
  m.def("accumulate_gram_lower", &accumulate_gram_lower, py::arg("input_factor_sum"), py::arg("rows"),
        py::arg("weighted_rows"), py::arg("num_rows"), py::arg("dim"), py::arg("dtype"), py::arg("threads"),
        "input_factor_sum[i, j] += Σ_t weighted_rows[t, i] rows[t, j] for j <= i (row-major lower triangle with "
        "the diagonal; the strictly upper triangle is not touched). Addresses of contiguous row-major host "
        "tensors of one dtype ('float32' or 'float64'): input_factor_sum dim x dim, rows and weighted_rows "
        "num_rows x dim (weighted_rows 0 = rows itself). threads: OpenBLAS threads for the call.");
}
