// CPU backend of the LOBPCG solver (host memory, scipy-openblas32 BLAS/LAPACK).
#pragma once

#include <algorithm>
#include <atomic>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

#include "backend.hpp"

namespace lora_da {

// Runs body(i) for every i in [0, count) on up to `workers` threads (the calling one
// included), each taking the next index; the first exception is rethrown once all are done.
template <typename Body>
void run_on_workers(int count, int workers, Body&& body) {
  const int threads = std::min(workers, count);
  if (threads <= 1) {
    for (int i = 0; i < count; ++i) body(i);
    return;
  }
  std::atomic<int> next{0};
  std::exception_ptr failure;
  std::mutex failure_mutex;
  auto work = [&]() {
    for (int i = next++; i < count; i = next++) {
      try {
        body(i);
      } catch (...) {
        std::lock_guard<std::mutex> lock(failure_mutex);
        if (!failure) failure = std::current_exception();
      }
    }
  };
  std::vector<std::thread> pool;
  for (int t = 1; t < threads; ++t) pool.emplace_back(work);
  work();
  for (auto& thread : pool) thread.join();
  if (failure) std::rethrow_exception(failure);
}

// Problems of a batch run concurrently on `workers` threads, each calling
// single-threaded BLAS (OpenBLAS's own threading is inefficient for the tall,
// skinny products LOBPCG makes); with one worker OpenBLAS threads each call.
template <typename T>
class CpuBackend final : public Backend<T> {
 public:
  explicit CpuBackend(int workers = 1) : workers_(workers < 1 ? 1 : workers) {}
  std::string name() const override { return "cpu-openblas"; }
  bool shares_host_memory() const override { return true; }
  T* allocate(std::size_t count) override;
  void release(T* data) noexcept override;
  void copy_block(int rows, int cols, const T* src, int ld_src, std::int64_t stride_src, T* dst, int ld_dst,
                  std::int64_t stride_dst, const Batch& batch) override;
  void add_block(int rows, int cols, T alpha, const T* src, int ld_src, std::int64_t stride_src, T beta, T* dst,
                 int ld_dst, std::int64_t stride_dst, const Batch& batch) override;
  void gemm(char trans_a, char trans_b, int m, int n, int k, T alpha, const T* a, int lda, std::int64_t stride_a,
            const T* b, int ldb, std::int64_t stride_b, T beta, T* c, int ldc, std::int64_t stride_c,
            const Batch& batch) override;
  void trsm_left(char uplo, char trans, int m, int n, const double* alpha_per_problem, const T* a, int lda,
                 std::int64_t stride_a, T* b, int ldb, std::int64_t stride_b, const Batch& batch) override;
  void syevd(int n, T* a, int lda, std::int64_t stride_a, T* w, std::int64_t stride_w, const Batch& batch) override;
  void select_columns(int rows, int cols, const T* src, int ld_src, std::int64_t stride_src, const T* gram,
                      int ld_gram, std::int64_t stride_gram, const T* threshold, std::int64_t stride_threshold,
                      int locked, T* dst, int ld_dst, std::int64_t stride_dst, const Batch& batch) override;
  void shift_diagonal(int m, T* a, int lda, std::int64_t stride, double relative, const Batch& batch) override;
  void cholesky_upper(int m, T* a, int lda, std::int64_t stride, const Batch& batch) override;
  void trsm_right_upper(int rows, int m, const T* u, int ldu, std::int64_t stride_u, T* b, int ldb,
                        std::int64_t stride_b, const Batch& batch) override;
  void synchronize() override {}

 protected:
  void download(double* host, const T* data, std::size_t count) override;
  void upload(T* data, const double* host, std::size_t count) override;

 private:
  template <typename Body>
  void for_each_problem(const Batch& batch, Body&& body);
  int workers_;
};

// Sets OpenBLAS to `threads` threads for its lifetime (restoring the previous count).
class OpenblasThreadsGuard {
 public:
  explicit OpenblasThreadsGuard(int threads);
  ~OpenblasThreadsGuard();
  OpenblasThreadsGuard(const OpenblasThreadsGuard&) = delete;
  OpenblasThreadsGuard& operator=(const OpenblasThreadsGuard&) = delete;
  static int current();

 private:
  int previous_;
};

extern template class CpuBackend<float>;
extern template class CpuBackend<double>;

}  // namespace lora_da
