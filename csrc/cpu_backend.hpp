// CPU backend of the LOBPCG solver (host memory, scipy-openblas32 BLAS/LAPACK).
#pragma once

#include "backend.hpp"

namespace lora_da {

template <typename T>
class CpuBackend final : public Backend<T> {
 public:
  std::string name() const override { return "cpu-openblas"; }
  T* allocate(std::size_t count) override;
  void release(T* data) noexcept override;
  void to_host(double* host, const T* data, std::size_t count) override;
  void from_host(T* data, const double* host, std::size_t count) override;
  void copy_block(int rows, int cols, const T* src, int ld_src, std::int64_t stride_src, T* dst, int ld_dst,
                  std::int64_t stride_dst, const Batch& batch) override;
  void gemm(char trans_a, char trans_b, int m, int n, int k, T alpha, const T* a, int lda, std::int64_t stride_a,
            const T* b, int ldb, std::int64_t stride_b, T beta, T* c, int ldc, std::int64_t stride_c,
            const Batch& batch) override;
  void trsm_left(char uplo, char trans, int m, int n, const double* alpha_per_problem, const T* a, int lda,
                 std::int64_t stride_a, T* b, int ldb, std::int64_t stride_b, const Batch& batch) override;
  void syevd(int n, T* a, int lda, std::int64_t stride_a, T* w, std::int64_t stride_w, const Batch& batch) override;
  void synchronize() override {}
};

extern template class CpuBackend<float>;
extern template class CpuBackend<double>;

}  // namespace lora_da
