// CPU backend: the batched operations of backend.hpp as loops over the batch
// (spread over the worker threads, see cpu_backend.hpp) calling scipy-openblas32
// BLAS/LAPACK.
#include "cpu_backend.hpp"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <thread>
#include <cstring>
#include <string>
#include <vector>

#include "host_lapack.hpp"

extern "C" {
void scipy_openblas_set_num_threads(int);
int scipy_openblas_get_num_threads(void);
}

namespace lora_da {

// Only a change is made: setting the count costs a call into OpenBLAS's pool each time,
// which the statistics pass (hundreds of calls per batch, csrc/gram_cpu.cpp) would pay.
OpenblasThreadsGuard::OpenblasThreadsGuard(int threads) : previous_(scipy_openblas_get_num_threads()) {
  if (threads != previous_) scipy_openblas_set_num_threads(threads);
}
OpenblasThreadsGuard::~OpenblasThreadsGuard() {
  if (scipy_openblas_get_num_threads() != previous_) scipy_openblas_set_num_threads(previous_);
}
int OpenblasThreadsGuard::current() { return scipy_openblas_get_num_threads(); }

template <typename T>
template <typename Body>
void CpuBackend<T>::for_each_problem(const Batch& batch, Body&& body) {
  std::vector<int> problems;
  for (int p = 0; p < batch.count; ++p)
    if (batch.is_active(p)) problems.push_back(p);
  run_on_workers(int(problems.size()), workers_, [&](int i) { body(problems[i]); });
}

namespace {

template <typename T>
void syevd_typed(int n, T* a, int lda, T* w,
                 void (*routine)(const char*, const char*, const int*, T*, const int*, T*, T*, const int*, int*,
                                 const int*, int*, std::size_t, std::size_t)) {
  if (n == 0) return;
  const char jobz = 'V', uplo = 'L';
  int info = 0, lwork = -1, liwork = -1, iwork_query = 0;
  T work_query = 0;
  routine(&jobz, &uplo, &n, a, &lda, w, &work_query, &lwork, &iwork_query, &liwork, &info, 1, 1);
  if (info != 0) throw BackendError("LAPACK ?syevd workspace query failed, info=" + std::to_string(info));
  lwork = std::max(1, int(work_query));
  liwork = std::max(1, iwork_query);
  std::vector<T> work(lwork);
  std::vector<int> iwork(liwork);
  routine(&jobz, &uplo, &n, a, &lda, w, work.data(), &lwork, iwork.data(), &liwork, &info, 1, 1);
  if (info != 0) {
    throw BackendError("LAPACK ?syevd failed (n=" + std::to_string(n) + "), info=" + std::to_string(info) +
                       (info > 0 ? ": the eigensolver did not converge (non-finite input?)" : ": illegal argument"));
  }
}

}  // namespace

void host_gemm(char ta, char tb, int m, int n, int k, double alpha, const double* a, int lda, const double* b, int ldb,
               double beta, double* c, int ldc) {
  if (m == 0 || n == 0) return;
  scipy_dgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc, 1, 1);
}
void host_gemm(char ta, char tb, int m, int n, int k, float alpha, const float* a, int lda, const float* b, int ldb,
               float beta, float* c, int ldc) {
  if (m == 0 || n == 0) return;
  scipy_sgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc, 1, 1);
}
void host_trsm_left(char uplo, char trans, int m, int n, double alpha, const double* a, int lda, double* b, int ldb) {
  const char side = 'L', diag = 'N';
  if (m == 0 || n == 0) return;
  scipy_dtrsm_(&side, &uplo, &trans, &diag, &m, &n, &alpha, a, &lda, b, &ldb, 1, 1, 1, 1);
}
void host_trsm_left(char uplo, char trans, int m, int n, float alpha, const float* a, int lda, float* b, int ldb) {
  const char side = 'L', diag = 'N';
  if (m == 0 || n == 0) return;
  scipy_strsm_(&side, &uplo, &trans, &diag, &m, &n, &alpha, a, &lda, b, &ldb, 1, 1, 1, 1);
}
void host_trsm_right_upper(int m, int n, const double* a, int lda, double* b, int ldb) {
  const char side = 'R', uplo = 'U', trans = 'N', diag = 'N';
  const double one = 1.0;
  if (m == 0 || n == 0) return;
  scipy_dtrsm_(&side, &uplo, &trans, &diag, &m, &n, &one, a, &lda, b, &ldb, 1, 1, 1, 1);
}
void host_trsm_right_upper(int m, int n, const float* a, int lda, float* b, int ldb) {
  const char side = 'R', uplo = 'U', trans = 'N', diag = 'N';
  const float one = 1.0f;
  if (m == 0 || n == 0) return;
  scipy_strsm_(&side, &uplo, &trans, &diag, &m, &n, &one, a, &lda, b, &ldb, 1, 1, 1, 1);
}
int host_potrf_upper(int n, double* a, int lda) {
  const char uplo = 'U';
  int info = 0;
  if (n > 0) scipy_dpotrf_(&uplo, &n, a, &lda, &info, 1);
  return info;
}
int host_potrf_upper(int n, float* a, int lda) {
  const char uplo = 'U';
  int info = 0;
  if (n > 0) scipy_spotrf_(&uplo, &n, a, &lda, &info, 1);
  return info;
}
void host_syevd(int n, double* a, int lda, double* w) { syevd_typed<double>(n, a, lda, w, scipy_dsyevd_); }
void host_syevd(int n, float* a, int lda, float* w) { syevd_typed<float>(n, a, lda, w, scipy_ssyevd_); }

void host_symmetric_eig(int n, double* matrix, int ld, double* values) { host_syevd(n, matrix, ld, values); }

template <typename T>
T* CpuBackend<T>::allocate(std::size_t count) {
  T* data = static_cast<T*>(std::calloc(std::max<std::size_t>(count, 1), sizeof(T)));
  if (data == nullptr) throw BackendError("out of host memory allocating " + std::to_string(count * sizeof(T)) + " bytes");
  return data;
}

template <typename T>
void CpuBackend<T>::release(T* data) noexcept {
  std::free(data);
}

template <typename T>
void CpuBackend<T>::download(double* host, const T* data, std::size_t count) {
  for (std::size_t i = 0; i < count; ++i) host[i] = double(data[i]);
}

template <typename T>
void CpuBackend<T>::upload(T* data, const double* host, std::size_t count) {
  for (std::size_t i = 0; i < count; ++i) data[i] = T(host[i]);
}

template <typename T>
void CpuBackend<T>::copy_block(int rows, int cols, const T* src, int ld_src, std::int64_t stride_src, T* dst,
                               int ld_dst, std::int64_t stride_dst, const Batch& batch) {
  for_each_problem(batch, [&](int b) {
    const T* s = src + b * stride_src;
    T* d = dst + b * stride_dst;
    if (s == d && ld_src == ld_dst) return;
    for (int j = 0; j < cols; ++j) std::memmove(d + std::int64_t(j) * ld_dst, s + std::int64_t(j) * ld_src, sizeof(T) * rows);
  });
}

template <typename T>
void CpuBackend<T>::add_block(int rows, int cols, T alpha, const T* src, int ld_src, std::int64_t stride_src, T beta,
                              T* dst, int ld_dst, std::int64_t stride_dst, const Batch& batch) {
  for_each_problem(batch, [&](int b) {
    const T* s = src + b * stride_src;
    T* d = dst + b * stride_dst;
    for (int j = 0; j < cols; ++j) {
      const T* sj = s + std::int64_t(j) * ld_src;
      T* dj = d + std::int64_t(j) * ld_dst;
      for (int i = 0; i < rows; ++i) dj[i] = alpha * sj[i] + beta * dj[i];
    }
  });
}

template <typename T>
void CpuBackend<T>::gemm(char trans_a, char trans_b, int m, int n, int k, T alpha, const T* a, int lda,
                         std::int64_t stride_a, const T* b, int ldb, std::int64_t stride_b, T beta, T* c, int ldc,
                         std::int64_t stride_c, const Batch& batch) {
  for_each_problem(batch, [&](int p) {
    host_gemm(trans_a, trans_b, m, n, k, alpha, a + p * stride_a, lda, b + p * stride_b, ldb, beta, c + p * stride_c,
              ldc);
  });
}

template <typename T>
void CpuBackend<T>::trsm_left(char uplo, char trans, int m, int n, const double* alpha_per_problem, const T* a,
                              int lda, std::int64_t stride_a, T* b, int ldb, std::int64_t stride_b,
                              const Batch& batch) {
  for_each_problem(batch, [&](int p) {
    host_trsm_left(uplo, trans, m, n, T(alpha_per_problem[p]), a + p * stride_a, lda, b + p * stride_b, ldb);
  });
}

template <typename T>
void CpuBackend<T>::syevd(int n, T* a, int lda, std::int64_t stride_a, T* w, std::int64_t stride_w,
                          const Batch& batch) {
  for_each_problem(batch, [&](int p) { host_syevd(n, a + p * stride_a, lda, w + p * stride_w); });
}

template <typename T>
void CpuBackend<T>::select_columns(int rows, int cols, const T* src, int ld_src, std::int64_t stride_src,
                                   const T* gram, int ld_gram, std::int64_t stride_gram, const T* threshold,
                                   std::int64_t stride_threshold, int locked, T* dst, int ld_dst,
                                   std::int64_t stride_dst, const Batch& batch) {
  for_each_problem(batch, [&](int b) {
    const T limit = threshold[b * stride_threshold];
    for (int j = 0; j < cols; ++j) {
      const T square = gram[b * stride_gram + j + std::int64_t(j) * ld_gram];
      const T norm = std::sqrt(std::max(square, T(0)));
      const bool keep = norm > T(0) && !(j < locked && norm <= limit);
      const T scale = keep ? T(1) / norm : T(0);
      const T* s = src + b * stride_src + std::int64_t(j) * ld_src;
      T* d = dst + b * stride_dst + std::int64_t(j) * ld_dst;
      for (int i = 0; i < rows; ++i) d[i] = scale * s[i];
    }
  });
}

template <typename T>
void CpuBackend<T>::shift_diagonal(int m, T* a, int lda, std::int64_t stride, double relative, const Batch& batch) {
  for_each_problem(batch, [&](int b) {
    T* ab = a + b * stride;
    T trace = 0;
    for (int j = 0; j < m; ++j) trace += ab[j + std::int64_t(j) * lda];
    T shift = T(relative) * trace;
    if (!(shift > T(0))) shift = std::numeric_limits<T>::min();
    for (int j = 0; j < m; ++j) ab[j + std::int64_t(j) * lda] += shift;
  });
}

template <typename T>
void CpuBackend<T>::cholesky_upper(int m, T* a, int lda, std::int64_t stride, const Batch& batch) {
  for_each_problem(batch, [&](int b) {
    const int info = host_potrf_upper(m, a + b * stride, lda);
    if (info != 0)
      throw BackendError("Cholesky factorization of a search block failed (problem " + std::to_string(b) +
                         ", info=" + std::to_string(info) + "): the operator may be non-finite");
  });
}

template <typename T>
void CpuBackend<T>::trsm_right_upper(int rows, int m, const T* u, int ldu, std::int64_t stride_u, T* b, int ldb,
                                     std::int64_t stride_b, const Batch& batch) {
  for_each_problem(batch, [&](int p) { host_trsm_right_upper(rows, m, u + p * stride_u, ldu, b + p * stride_b, ldb); });
}

template class CpuBackend<float>;
template class CpuBackend<double>;

}  // namespace lora_da
