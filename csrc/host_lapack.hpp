// Host BLAS/LAPACK from the scipy-openblas32 wheel (LP64 ints; every symbol
// carries the `scipy_` prefix; Fortran hidden string lengths at the end).
// Declared here ourselves so that no header of that wheel is needed.
#pragma once

#include <cstddef>
#include <vector>

extern "C" {
void scipy_dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                  const double* alpha, const double* a, const int* lda, const double* b, const int* ldb,
                  const double* beta, double* c, const int* ldc, std::size_t, std::size_t);
void scipy_sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
                  const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
                  const int* ldc, std::size_t, std::size_t);
void scipy_dsyrk_(const char* uplo, const char* trans, const int* n, const int* k, const double* alpha,
                  const double* a, const int* lda, const double* beta, double* c, const int* ldc, std::size_t,
                  std::size_t);
void scipy_dtrsm_(const char* side, const char* uplo, const char* transa, const char* diag, const int* m,
                  const int* n, const double* alpha, const double* a, const int* lda, double* b, const int* ldb,
                  std::size_t, std::size_t, std::size_t, std::size_t);
void scipy_strsm_(const char* side, const char* uplo, const char* transa, const char* diag, const int* m,
                  const int* n, const float* alpha, const float* a, const int* lda, float* b, const int* ldb,
                  std::size_t, std::size_t, std::size_t, std::size_t);
void scipy_dsyevd_(const char* jobz, const char* uplo, const int* n, double* a, const int* lda, double* w,
                   double* work, const int* lwork, int* iwork, const int* liwork, int* info, std::size_t,
                   std::size_t);
void scipy_ssyevd_(const char* jobz, const char* uplo, const int* n, float* a, const int* lda, float* w, float* work,
                   const int* lwork, int* iwork, const int* liwork, int* info, std::size_t, std::size_t);
void scipy_dpotrf_(const char* uplo, const int* n, double* a, const int* lda, int* info, std::size_t);
void scipy_spotrf_(const char* uplo, const int* n, float* a, const int* lda, int* info, std::size_t);
}

namespace lora_da {

// Eigen-decomposition of a small dense symmetric matrix held on the host in
// double (column-major, lower triangle read): eigenvalues ascending into
// `values`, eigenvectors overwrite `matrix`. Throws BackendError on failure.
void host_symmetric_eig(int n, double* matrix, int ld, double* values);

// Typed wrappers used by the CPU backend.
void host_gemm(char ta, char tb, int m, int n, int k, double alpha, const double* a, int lda, const double* b, int ldb,
               double beta, double* c, int ldc);
void host_gemm(char ta, char tb, int m, int n, int k, float alpha, const float* a, int lda, const float* b, int ldb,
               float beta, float* c, int ldc);
void host_trsm_left(char uplo, char trans, int m, int n, double alpha, const double* a, int lda, double* b, int ldb);
void host_trsm_left(char uplo, char trans, int m, int n, float alpha, const float* a, int lda, float* b, int ldb);
void host_trsm_right_upper(int m, int n, const double* a, int lda, double* b, int ldb);
void host_trsm_right_upper(int m, int n, const float* a, int lda, float* b, int ldb);
int host_potrf_upper(int n, double* a, int lda);  // LAPACK info
int host_potrf_upper(int n, float* a, int lda);
void host_syevd(int n, double* a, int lda, double* w);
void host_syevd(int n, float* a, int lda, float* w);

}  // namespace lora_da
