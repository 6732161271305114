// lora_da._core.cholesky_lower / cholesky_solve: batched Cholesky factorization and solves
// on the host with OpenBLAS (LAPACK ?potrf, BLAS ?trsm), for LoRA-DA's float64 preparation
// (docs/math.md §3 step 1, §5.3): Z = L Lᵀ per input group, M = βcI + αZ for the
// preconditioner, and Δ = Z⁻¹ Gᵀ diag(1/(y+λ)). Measured on the 2-core AMD machine this
// project is developed on, torch's batched calls (MKL) took 1.6-3x as long for the same
// float64 work at SmolLM2's shapes (bench/bench_host_linalg.py).
//
// Layouts (as torch hands them, row-major): each matrix of the batch is n x n with leading
// dimension n, consecutive matrices `stride` elements apart (0: one matrix for all). A
// row-major matrix is its transpose column-major, so row-major L (lower) is column-major
// U = Lᵀ (upper): the factorization runs ?potrf('U') in place and the solves use U.
// Right-hand sides: each problem's B is n x nrhs column-major (ld n) — a row-major nrhs x n
// tensor such as a stacked G — solved in place: B ← Z⁻¹ B = U⁻¹ (U⁻ᵀ B).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstddef>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "cpu_backend.hpp"
#include "host_lapack.hpp"  // the scipy_-prefixed OpenBLAS symbols


namespace py = pybind11;

namespace {

constexpr std::int64_t kMaxInt = std::numeric_limits<int>::max();

void check_sizes(const char* what, std::int64_t batch, std::int64_t n, std::int64_t stride, int threads) {
  const std::string name(what);
  if (batch < 0) throw py::value_error(name + ": batch must be >= 0, got " + std::to_string(batch));
  if (n < 1 || n > kMaxInt) throw py::value_error(name + ": n must be in [1, 2^31 - 1], got " + std::to_string(n));
  if (stride < 0) throw py::value_error(name + ": strides must be >= 0, got " + std::to_string(stride));
  if (threads < 1) throw py::value_error(name + ": threads must be >= 1, got " + std::to_string(threads));
}

bool is_float64(const char* what, const std::string& dtype) {
  if (dtype == "float64") return true;
  if (dtype == "float32") return false;
  throw py::value_error(std::string(what) + ": dtype must be 'float32' or 'float64', got '" + dtype + "'");
}

template <typename T>
int potrf_upper(int n, T* a) {
  const char upper = 'U';
  int info = 0;
  if constexpr (sizeof(T) == 8) {
    scipy_dpotrf_(&upper, &n, a, &n, &info, 1);
  } else {
    scipy_spotrf_(&upper, &n, a, &n, &info, 1);
  }
  return info;
}

template <typename T>
void trsm_upper(char trans, int n, int nrhs, const T* u, T* b) {
  const char left = 'L', upper = 'U', non_unit = 'N';
  const T one = 1;
  if constexpr (sizeof(T) == 8) {
    scipy_dtrsm_(&left, &upper, &trans, &non_unit, &n, &nrhs, &one, u, &n, b, &n, 1, 1, 1, 1);
  } else {
    scipy_strsm_(&left, &upper, &trans, &non_unit, &n, &nrhs, &one, u, &n, b, &n, 1, 1, 1, 1);
  }
}

// In place, per matrix: the lower Cholesky factor L in the lower triangle (row-major), zeros
// above it. Returns LAPACK's info per matrix (0: done; i > 0: the leading minor of order i is
// not positive definite, the matrix is left partly factored).
// OpenBLAS runs single-threaded inside each call and the problems are spread over `workers`
// threads of our own: OpenBLAS's own pool would keep spinning after each call, on the cores
// that torch's OpenMP threads need for the work that follows (docs/math.md §5.5). One problem
// alone gets OpenBLAS's threads instead.

// In place, per matrix: the lower Cholesky factor L in the lower triangle (row-major), zeros
// above it. Returns LAPACK's info per matrix (0: done; i > 0: the leading minor of order i is
// not positive definite, the matrix is left partly factored).
template <typename T>
std::vector<int> factor_batch(T* matrices, std::int64_t batch, int n, std::int64_t stride, int threads) {
  std::vector<int> info(static_cast<std::size_t>(batch), 0);
  const int workers = batch > 1 ? threads : 1;
  lora_da::OpenblasThreadsGuard guard(batch > 1 ? 1 : threads);
  lora_da::run_on_workers(static_cast<int>(batch), workers, [&](int b) {
    T* a = matrices + std::int64_t(b) * stride;
    info[static_cast<std::size_t>(b)] = potrf_upper(n, a);
    for (int i = 0; i < n; ++i)  // row-major strictly upper = column-major strictly lower: not read by potrf('U')
      for (int j = i + 1; j < n; ++j) a[std::int64_t(i) * n + j] = T(0);
  });
  return info;
}

template <typename T>
void solve_batch(const T* factors, std::int64_t factor_stride, T* rhs, std::int64_t rhs_stride, std::int64_t batch, int n,
                 int nrhs, int threads) {
  const int workers = batch > 1 ? threads : 1;
  lora_da::OpenblasThreadsGuard guard(batch > 1 ? 1 : threads);
  lora_da::run_on_workers(static_cast<int>(batch), workers, [&](int b) {
    const T* u = factors + std::int64_t(b) * factor_stride;
    T* x = rhs + std::int64_t(b) * rhs_stride;
    trsm_upper('T', n, nrhs, u, x);  // U⁻ᵀ B (= L⁻¹ B)
    trsm_upper('N', n, nrhs, u, x);  // U⁻¹ (…)
  });
}

std::vector<int> cholesky_lower(std::uintptr_t matrices, std::int64_t batch, std::int64_t n, std::int64_t stride,
                                const std::string& dtype, int threads) {
  check_sizes("cholesky_lower", batch, n, stride, threads);
  const bool wide = is_float64("cholesky_lower", dtype);
  if (batch == 0) return {};
  if (matrices == 0) throw py::value_error("cholesky_lower: null matrices");
  if (batch > 1 && stride < n * n) {
    throw py::value_error("cholesky_lower: in place, the matrices must not overlap (stride " + std::to_string(stride) +
                          " < n*n = " + std::to_string(n * n) + ")");
  }
  if (batch > kMaxInt) throw py::value_error("cholesky_lower: batch must be < 2^31, got " + std::to_string(batch));
  py::gil_scoped_release release;
  const int size = static_cast<int>(n);
  return wide ? factor_batch(reinterpret_cast<double*>(matrices), batch, size, stride, threads)
              : factor_batch(reinterpret_cast<float*>(matrices), batch, size, stride, threads);
}

void cholesky_solve(std::uintptr_t factors, std::int64_t factor_stride, std::uintptr_t rhs, std::int64_t rhs_stride,
                    std::int64_t batch, std::int64_t n, std::int64_t nrhs, const std::string& dtype, int threads) {
  check_sizes("cholesky_solve", batch, n, factor_stride, threads);
  if (rhs_stride < 0) throw py::value_error("cholesky_solve: strides must be >= 0, got " + std::to_string(rhs_stride));
  if (nrhs < 0 || nrhs > kMaxInt) throw py::value_error("cholesky_solve: nrhs must be in [0, 2^31 - 1], got " + std::to_string(nrhs));
  const bool wide = is_float64("cholesky_solve", dtype);
  if (batch == 0 || nrhs == 0) return;
  if (factors == 0 || rhs == 0) throw py::value_error("cholesky_solve: null factors or rhs");
  if (batch > 1 && rhs_stride < n * nrhs) {
    throw py::value_error("cholesky_solve: in place, the right-hand sides must not overlap (stride " +
                          std::to_string(rhs_stride) + " < n*nrhs = " + std::to_string(n * nrhs) + ")");
  }
  if (batch > kMaxInt) throw py::value_error("cholesky_solve: batch must be < 2^31, got " + std::to_string(batch));
  py::gil_scoped_release release;
  const int size = static_cast<int>(n), cols = static_cast<int>(nrhs);
  if (wide) {
    solve_batch(reinterpret_cast<const double*>(factors), factor_stride, reinterpret_cast<double*>(rhs), rhs_stride,
                batch, size, cols, threads);
  } else {
    solve_batch(reinterpret_cast<const float*>(factors), factor_stride, reinterpret_cast<float*>(rhs), rhs_stride, batch,
                size, cols, threads);
  }
}

}  // namespace

void register_cholesky(py::module_& m) {
  m.def("cholesky_lower", &cholesky_lower, py::arg("matrices"), py::arg("batch"), py::arg("n"), py::arg("stride"),
        py::arg("dtype"), py::arg("threads"),
        "In place: each symmetric positive definite n x n row-major matrix (its lower triangle read) becomes its "
        "lower Cholesky factor L, zeros above the diagonal. matrices: address; stride: elements between matrices "
        "(>= n*n); dtype 'float32' or 'float64'; threads: OpenBLAS threads. Returns LAPACK's info per matrix "
        "(0 = factored; i > 0: not positive definite at order i, the matrix is then partly overwritten).");
  m.def("cholesky_solve", &cholesky_solve, py::arg("factors"), py::arg("factor_stride"), py::arg("rhs"),
        py::arg("rhs_stride"), py::arg("batch"), py::arg("n"), py::arg("nrhs"), py::arg("dtype"), py::arg("threads"),
        "In place: B <- (L Lᵀ)⁻¹ B per problem, with L the row-major lower factors of cholesky_lower (factor_stride "
        "elements apart, 0 = one factor for all) and each B n x nrhs column-major (ld n; a row-major nrhs x n "
        "tensor), rhs_stride elements apart (>= n*nrhs).");
}
