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

// How often the solver moved data between host and backend memory (the
// backend interface counts these itself, see Backend::to_host/from_host).
struct TransferCounts {
  std::int64_t downloads = 0;  // to_host calls: each one blocks until the backend's queued work is done
  std::int64_t uploads = 0;    // from_host calls (asynchronous on CUDA)
};

template <typename T>
class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string name() const = 0;

  // Zero-initialized storage for `count` elements, and its release.
  virtual T* allocate(std::size_t count) = 0;
  virtual void release(T* data) noexcept = 0;
  // Bytes of backend memory still free (for sizing the dense Ω path); the CPU
  // backend reports none known (0 = no limit known).
  virtual std::size_t available_memory() { return 0; }
  // Whether backend memory is host memory (a transfer is a copy, not a round trip).
  virtual bool shares_host_memory() const { return false; }

  // Transfers between backend memory (element type T) and host doubles, counted.
  // to_host blocks until the data (and all work queued before it) is there;
  // from_host may return before the copy is done (the backend stages the data).
  void to_host(double* host, const T* data, std::size_t count) {
    ++transfers_.downloads;
    download(host, data, count);
  }
  void from_host(T* data, const double* host, std::size_t count) {
    ++transfers_.uploads;
    upload(data, host, count);
  }
  const TransferCounts& transfers() const { return transfers_; }

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

  // ---- Small-block steps of the one-exchange LOBPCG (lobpcg_fused.hpp), all on backend memory ----

  // Residual columns to search directions: dst[b](:, j) = src[b](:, j) / ||src_j||, or 0 when
  // ||src_j|| = 0 or when j < locked and ||src_j|| <= threshold[b * stride_threshold]
  // (soft locking), with ||src_j||² read from gram[b](j, j).
  virtual void select_columns(int rows, int cols, const T* src, int ld_src, std::int64_t stride_src, const T* gram,
                              int ld_gram, std::int64_t stride_gram, const T* threshold,
                              std::int64_t stride_threshold, int locked, T* dst, int ld_dst, std::int64_t stride_dst,
                              const Batch& batch) = 0;
  // a[b] += s_b I with s_b = relative · trace(a[b]) (the smallest normal T when that is not > 0).
  virtual void shift_diagonal(int m, T* a, int lda, std::int64_t stride, double relative, const Batch& batch) = 0;
  // In-place Cholesky a[b] = Uᵀ U of the upper triangle (the strict lower triangle is left as is).
  // A failure (not positive definite: non-finite input) throws BackendError, at once or at the
  // next to_host.
  virtual void cholesky_upper(int m, T* a, int lda, std::int64_t stride, const Batch& batch) = 0;
  // b[b] = b[b] U[b]⁻¹, U upper triangular m x m (the strict lower triangle is not read).
  virtual void trsm_right_upper(int rows, int m, const T* u, int ldu, std::int64_t stride_u, T* b, int ldb,
                                std::int64_t stride_b, const Batch& batch) = 0;

  // Blocks until queued work is finished (no-op on the CPU).
  virtual void synchronize() = 0;

 protected:
  virtual void download(double* host, const T* data, std::size_t count) = 0;
  virtual void upload(T* data, const double* host, std::size_t count) = 0;

 private:
  TransferCounts transfers_;
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
