// Runs one lora_da_solve_request on a given backend (shared by CPU and CUDA).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <limits>
#include <string>
#include <vector>

#include "backend.hpp"
#include "lobpcg.hpp"
#include "operators.hpp"
#include "solve_request.h"

namespace lora_da {

// A size of the request as the int that the LP64 BLAS/LAPACK, cuBLAS and
// cuSOLVER interfaces take (the bindings check the same limits first).
inline int blas_int(std::int64_t value, const char* name) {
  if (value < 0 || value > std::numeric_limits<int>::max())
    throw BackendError(std::string(name) + "=" + std::to_string(value) +
                       " does not fit the 32-bit BLAS size range [0, " +
                       std::to_string(std::numeric_limits<int>::max()) + "]");
  return int(value);
}

template <typename T>
void solve_on_backend(Backend<T>& backend, lora_da_solve_request& request) {
  const int n = blas_int(request.n, "n");
  const int batch = blas_int(request.batch, "batch");
  LobpcgOptions options;
  options.k = blas_int(request.k, "k");
  options.guard = request.guard < 0 ? -1 : blas_int(request.guard, "guard");
  options.largest = request.largest != 0;
  options.tol = request.tol;
  options.max_iter = request.max_iter;
  options.seed = request.seed;
  options.initial = request.initial;
  options.initial_cols = blas_int(request.initial_cols, "initial_cols");
  options.initial_stride = request.initial_stride;
  LobpcgReport report;
  T* eigenvectors = static_cast<T*>(request.eigenvectors);
  if (request.operator_kind == LORA_DA_OPERATOR_DENSE) {
    DenseSymmetricOperator<T> op(backend, static_cast<const T*>(request.matrices), n, request.matrix_stride);
    report = lobpcg(backend, op, batch, options, eigenvectors);
  } else if (request.operator_kind == LORA_DA_OPERATOR_GUIDANCE) {
    std::vector<double> scale(request.variance_scale, request.variance_scale + batch);
    std::vector<double> shift;
    if (request.preconditioner != nullptr) {
      if (request.preconditioner_shift == nullptr) throw BackendError("the preconditioner needs its shifts");
      if (!(request.alpha > 0)) throw BackendError("the preconditioner needs alpha > 0");
      shift.assign(request.preconditioner_shift, request.preconditioner_shift + batch);
    }
    LoraDAGuidanceOperator<T> op(backend, static_cast<const T*>(request.d_transposed), n,
                                 blas_int(request.d_out, "d_out"), request.stride_d,
                                 static_cast<const T*>(request.z_upper), request.stride_z, request.alpha,
                                 std::move(scale), batch, static_cast<const T*>(request.preconditioner),
                                 request.stride_p, std::move(shift), request.d_column_major != 0);
    report = lobpcg(backend, op, batch, options, eigenvectors);
  } else {
    throw BackendError("unknown operator kind");
  }
  std::copy(report.eigenvalues.begin(), report.eigenvalues.end(), request.eigenvalues);
  std::copy(report.residual_norms.begin(), report.residual_norms.end(), request.residual_norms);
  std::copy(report.iterations.begin(), report.iterations.end(), request.iterations);
  std::copy(report.converged.begin(), report.converged.end(), request.converged);
  std::copy(report.norm_estimate.begin(), report.norm_estimate.end(), request.norm_estimate);
  request.dense_fallback = report.dense_fallback ? 1 : 0;
  request.block_size = report.block_size;
  request.tol_used = report.tol;
}

// Calls `body`, turning any exception into (nonzero, message).
template <typename Body>
int guarded_call(Body&& body, char* message, std::size_t message_size) {
  try {
    body();
    return 0;
  } catch (const std::exception& error) {
    std::snprintf(message, message_size, "%s", error.what());
  } catch (...) {
    std::snprintf(message, message_size, "unknown error in the lora_da solver");
  }
  return 1;
}

}  // namespace lora_da
