/* Plain C ABI between the pybind11 module and the solver entry points
 * (the CPU one in solve_cpu.cpp, the CUDA one in cuda_backend.cu).
 * Sizes and strides are 64-bit; the solver narrows sizes to the 32-bit ints of
 * the LP64 BLAS/LAPACK, cuBLAS and cuSOLVER interfaces after checking that they
 * fit (solve.hpp), and computes products of sizes in 64 bits. */
#ifndef LORA_DA_SOLVE_REQUEST_H
#define LORA_DA_SOLVE_REQUEST_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum lora_da_operator_kind { LORA_DA_OPERATOR_DENSE = 0, LORA_DA_OPERATOR_GUIDANCE = 1 };
enum lora_da_dtype { LORA_DA_FLOAT32 = 0, LORA_DA_FLOAT64 = 1 };
/* How the guidance operator is applied: auto = dense on CUDA (when it fits in the
 * free device memory), the operator form on the CPU. */
enum lora_da_omega_form { LORA_DA_OMEGA_AUTO = 0, LORA_DA_OMEGA_OPERATOR = 1, LORA_DA_OMEGA_DENSE = 2 };

struct lora_da_solve_request {
  /* problem (all pointers into memory of the solving device, column-major) */
  int operator_kind;
  int dtype;
  int64_t batch;
  int64_t n;
  const void* matrices; /* dense: batch x n x n, `matrix_stride` elements apart */
  int64_t matrix_stride;
  const void* d_transposed; /* guidance: Dᵀ, d_out x n (ld d_out) per problem; with d_column_major,
                               D itself, n x d_out (ld n) (a column-major torch tensor) */
  int d_column_major;
  int64_t d_out;
  int64_t stride_d;
  const void* z_upper; /* guidance: U with Z = UᵀU, n x n; stride 0 = shared */
  int64_t stride_z;
  double alpha;
  const double* variance_scale; /* host, batch values of c (β folded in) */
  /* guidance, optional preconditioner P = (βcZ⁻¹ + αI)⁻¹ = (I − s M⁻¹)/α, given factored:
   * U_M with M = sI + αZ = U_Mᵀ U_M (n x n per problem, like z_upper; NULL = none) and the
   * host array of the `batch` shifts s (βc, or one value shared by an input group) */
  const void* preconditioner;
  int64_t stride_p;
  const double* preconditioner_shift;
  /* options */
  int64_t k;
  int64_t guard; /* < 0 = default, max(k, 8) */
  int largest;
  int max_iter;
  double tol; /* <= 0 = default for the precision */
  uint64_t seed;
  /* optional start block: initial_cols columns (n x initial_cols column-major per problem,
   * initial_stride elements apart, solver dtype, on the solving device); NULL = random */
  const void* initial;
  int64_t initial_cols;
  int64_t initial_stride;
  uintptr_t stream; /* CUDA stream handle (0 = legacy default stream) */
  int omega_form;   /* guidance: enum lora_da_omega_form */
  int64_t dense_chunk; /* guidance, dense Ω: at most this many problems at once (<= 0 = as many as fit) */
  int one_exchange; /* < 0 = the backend's choice (CUDA yes, CPU no), 0 = no, 1 = yes */
  /* outputs: eigenvectors on the device (batch x n x k), the rest on the host */
  void* eigenvectors;
  double* eigenvalues;    /* batch x k */
  double* residual_norms; /* batch x k */
  int* iterations;        /* batch */
  unsigned char* converged;
  double* norm_estimate; /* batch */
  int dense_fallback;
  int64_t block_size;
  double tol_used;
  int omega_dense;        /* guidance: whether Ω was formed densely */
  int one_exchange_used;  /* whether the one-exchange variant ran */
  int64_t problems_per_chunk; /* problems solved together (the batch, unless the dense Ω did not fit) */
  int64_t downloads;      /* host <-> backend transfers of the solve (Backend::transfers) */
  int64_t uploads;
};

/* Each returns 0 on success, else writes a message and returns nonzero. */
int lora_da_cpu_solve(struct lora_da_solve_request* request, char* message, size_t message_size);
int lora_da_cuda_solve(struct lora_da_solve_request* request, char* message, size_t message_size);
/* Whether the CUDA backend was compiled in (1) or not (0). */
int lora_da_cuda_compiled(void);

#ifdef __cplusplus
}
#endif

#endif
