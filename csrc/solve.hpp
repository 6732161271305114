// Runs one lora_da_solve_request on a given backend (shared by CPU and CUDA).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <limits>
#include <memory>
#include <cmath>
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

// Copies a chunk's report into the request's output arrays at problem `first`.
inline void store_report(const LobpcgReport& report, std::int64_t first, std::int64_t k,
                         lora_da_solve_request& request) {
  std::copy(report.eigenvalues.begin(), report.eigenvalues.end(), request.eigenvalues + first * k);
  std::copy(report.residual_norms.begin(), report.residual_norms.end(), request.residual_norms + first * k);
  std::copy(report.iterations.begin(), report.iterations.end(), request.iterations + first);
  std::copy(report.converged.begin(), report.converged.end(), request.converged + first);
  std::copy(report.norm_estimate.begin(), report.norm_estimate.end(), request.norm_estimate + first);
  request.dense_fallback = report.dense_fallback ? 1 : 0;
  request.block_size = report.block_size;
  request.tol_used = report.tol;
  request.downloads += report.transfers.downloads;
  request.uploads += report.transfers.uploads;
}

// How many problems of `batch` fit together with dense Ω (and P) in `available`
// bytes (0 = no limit known): Ω, P, the solver's blocks (about 12 m n elements)
// and the forming workspace, with a fifth of the memory left free.
inline std::int64_t dense_problems_that_fit(std::size_t available, std::int64_t batch, std::int64_t n,
                                            std::int64_t d_out, std::int64_t block, bool preconditioner,
                                            std::int64_t chunk_cols, std::size_t element) {
  if (available == 0) return batch;
  const double per_problem = double(element) * (double(n) * n * (preconditioner ? 2 : 1) + 12.0 * block * n +
                                                double(d_out) * chunk_cols);
  const double fit = std::floor(0.8 * double(available) / per_problem);
  return std::int64_t(std::min<double>(double(batch), std::max(0.0, fit)));
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
  // Off the host, the variant with one exchange per iteration (lobpcg_fused.hpp).
  options.one_exchange = request.one_exchange < 0 ? !backend.shares_host_memory() : request.one_exchange != 0;
  request.one_exchange_used = options.one_exchange ? 1 : 0;
  request.downloads = request.uploads = 0;
  request.omega_dense = 0;
  request.problems_per_chunk = batch;
  T* eigenvectors = static_cast<T*>(request.eigenvectors);
  const std::int64_t k = options.k;
  if (request.operator_kind == LORA_DA_OPERATOR_DENSE) {
    DenseSymmetricOperator<T> op(backend, static_cast<const T*>(request.matrices), n, request.matrix_stride);
    store_report(lobpcg(backend, op, batch, options, eigenvectors), 0, k, request);
    return;
  }
  if (request.operator_kind != LORA_DA_OPERATOR_GUIDANCE) throw BackendError("unknown operator kind");
  const bool preconditioned = request.preconditioner != nullptr;
  if (preconditioned) {
    if (request.preconditioner_shift == nullptr) throw BackendError("the preconditioner needs its shifts");
    if (!(request.alpha > 0)) throw BackendError("the preconditioner needs alpha > 0");
  }
  const int d_out = blas_int(request.d_out, "d_out");
  const std::int64_t block = std::min<std::int64_t>(n, std::int64_t(options.k) + (options.guard < 0 ? default_guard(options.k) : options.guard));
  const int chunk_cols = std::min(n, 1024);
  bool dense = request.omega_form == LORA_DA_OMEGA_DENSE ||
               (request.omega_form == LORA_DA_OMEGA_AUTO && !backend.shares_host_memory());
  std::int64_t per_chunk = batch;
  if (dense) {
    per_chunk = dense_problems_that_fit(backend.available_memory(), batch, n, d_out, block, preconditioned,
                                        chunk_cols, sizeof(T));
    if (request.dense_chunk > 0) per_chunk = std::min<std::int64_t>(per_chunk, request.dense_chunk);
    if (per_chunk < 1) {
      if (request.omega_form == LORA_DA_OMEGA_DENSE) per_chunk = 1;  // asked for: try it one problem at a time
      else dense = false, per_chunk = batch;                          // auto: the operator form
    }
  }
  request.omega_dense = dense ? 1 : 0;
  request.problems_per_chunk = per_chunk;
  const std::int64_t nn = std::int64_t(n) * n;
  for (std::int64_t first = 0; first < batch; first += per_chunk) {
    const int count = int(std::min<std::int64_t>(per_chunk, batch - first));
    LobpcgOptions chunk_options = options;
    chunk_options.first_problem = first;
    if (options.initial != nullptr)
      chunk_options.initial = static_cast<const T*>(options.initial) + first * options.initial_stride;
    std::vector<double> scale(request.variance_scale + first, request.variance_scale + first + count);
    std::vector<double> shift;
    if (preconditioned) shift.assign(request.preconditioner_shift + first, request.preconditioner_shift + first + count);
    const T* preconditioner =
        preconditioned ? static_cast<const T*>(request.preconditioner) + first * request.stride_p : nullptr;
    LoraDAGuidanceOperator<T> op(backend, static_cast<const T*>(request.d_transposed) + first * request.stride_d, n,
                                 d_out, request.stride_d, static_cast<const T*>(request.z_upper) + first * request.stride_z,
                                 request.stride_z, request.alpha, std::move(scale), count, preconditioner,
                                 request.stride_p, std::move(shift), request.d_column_major != 0);
    T* chunk_vectors = eigenvectors + first * std::int64_t(n) * k;
    if (!dense) {
      store_report(lobpcg(backend, op, count, chunk_options, chunk_vectors), first, k, request);
      continue;
    }
    // Ω (and P) formed once for the chunk; then every application is one batched GEMM.
    DeviceBuffer<T> omega(backend, std::size_t(nn) * count);
    std::unique_ptr<DeviceBuffer<T>> dense_preconditioner;
    if (preconditioned) dense_preconditioner = std::make_unique<DeviceBuffer<T>>(backend, std::size_t(nn) * count);
    form_dense(backend, op, count, omega.get(), preconditioned ? dense_preconditioner->get() : nullptr, chunk_cols);
    op.release_workspace();
    DenseSymmetricOperator<T> dense_op(backend, omega.get(), n, nn,
                                       preconditioned ? dense_preconditioner->get() : nullptr, nn);
    store_report(lobpcg(backend, dense_op, count, chunk_options, chunk_vectors), first, k, request);
  }
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
