// The small backend interface the blocked LOBPCG solver (lobpcg.hpp) is
// written against. A backend owns the memory that the n-sized data lives in
// (host memory for the CPU backend, device memory for CUDA) and provides the
// few dense operations the algorithm needs on it, each batched over many
// same-size problems with a fixed stride between consecutive problems.
//
// Conventions: every matrix is column-major (BLAS/LAPACK order); a batch of
// matrices is `count` matrices `stride` elements apart (stride 0 = one matrix
// shared by all problems). Work for problems whose `active` flag is 0 may be
// skipped by a backend (the CPU backend does; the CUDA backend computes every
// problem and relies on the algorithm making such work a no-op).
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace lora_da {

// Which problems of a batch an operation must compute.
struct Batch {
  int count = 0;
  const unsigned char* active = nullptr;  // host array of `count` flags; nullptr = all active
  bool is_active(int problem) const { return active == nullptr || active[problem] != 0; }
};

// Raised for any failed BLAS/LAPACK/CUDA status; the bindings turn it into a
// Python RuntimeError carrying the message.
class BackendError : public std::runtime_error {
 public:
  explicit BackendError(const std::string& what) : std::runtime_error(what) {}
};

template <typename T>
class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string name() const = 0;

  // Zero-initialized storage for `count` elements, and its release.
  virtual T* allocate(std::size_t count) = 0;
  virtual void release(T* data) noexcept = 0;

  // Transfers between backend memory (element type T) and host doubles.
  virtual void to_host(double* host, const T* data, std::size_t count) = 0;
  virtual void from_host(T* data, const double* host, std::size_t count) = 0;

  // dst[b](0:rows, 0:cols) = src[b](0:rows, 0:cols) for active problems b.
  virtual void copy_block(int rows, int cols, const T* src, int ld_src, std::int64_t stride_src, T* dst, int ld_dst,
                          std::int64_t stride_dst, const Batch& batch) = 0;

  // dst[b](0:rows, 0:cols) = alpha src[b] + beta dst[b] for active problems b.
  virtual void add_block(int rows, int cols, T alpha, const T* src, int ld_src, std::int64_t stride_src, T beta,
                         T* dst, int ld_dst, std::int64_t stride_dst, const Batch& batch) = 0;

  // C[b] = alpha op(A[b]) op(B[b]) + beta C[b]   (op = 'N' or 'T').
  virtual void gemm(char trans_a, char trans_b, int m, int n, int k, T alpha, const T* a, int lda, std::int64_t stride_a,
                    const T* b, int ldb, std::int64_t stride_b, T beta, T* c, int ldc, std::int64_t stride_c,
                    const Batch& batch) = 0;

  // B[b] = alpha[b] op(A[b])^{-1} B[b], A triangular ('U'/'L'), solved from the left.
  virtual void trsm_left(char uplo, char trans, int m, int n, const double* alpha_per_problem, const T* a, int lda,
                         std::int64_t stride_a, T* b, int ldb, std::int64_t stride_b, const Batch& batch) = 0;

  // Dense symmetric eigensolver (lower triangle read): eigenvalues ascending
  // into w[b], eigenvectors overwrite A[b]. Used for the dense fallback when
  // n < 5 (k + guard) (lobpcg.hpp).
  virtual void syevd(int n, T* a, int lda, std::int64_t stride_a, T* w, std::int64_t stride_w, const Batch& batch) = 0;

  // Blocks until queued work is finished (no-op on the CPU).
  virtual void synchronize() = 0;
};

// RAII buffer in backend memory.
template <typename T>
class DeviceBuffer {
 public:
  DeviceBuffer(Backend<T>& backend, std::size_t count) : backend_(backend), data_(backend.allocate(count)) {}
  ~DeviceBuffer() { backend_.release(data_); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  T* get() const { return data_; }

 private:
  Backend<T>& backend_;
  T* data_;
};

// A batch of symmetric linear operators v -> A[b] v of one size n.
template <typename T>
class Operator {
 public:
  virtual ~Operator() = default;
  virtual int size() const = 0;
  // AV[b] = sign * A[b] V[b] for the first `cols` columns (n x cols, leading dims given).
  virtual void apply(const T* v, int ldv, std::int64_t stride_v, T* av, int ldav, std::int64_t stride_av, int cols,
                     T sign, const Batch& batch) = 0;
  // Optional symmetric positive definite preconditioner: out[b] = P[b] V[b]. Returns false
  // (and writes nothing) when the operator has none.
  virtual bool precondition(const T* /*v*/, int /*ldv*/, std::int64_t /*stride_v*/, T* /*out*/, int /*ldo*/,
                            std::int64_t /*stride_o*/, int /*cols*/, const Batch& /*batch*/) {
    return false;
  }
};

}  // namespace lora_da
