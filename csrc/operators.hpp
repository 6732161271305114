// The operators the LOBPCG solver applies, written over the backend interface.
#pragma once

#include <algorithm>
#include <vector>

#include "backend.hpp"

namespace lora_da {

// A batch of dense symmetric matrices A[b] (n x n, `stride` elements apart):
// one batched GEMM per application. Optionally with dense preconditioners
// P[b] (n x n, `stride_p` apart; nullptr = none), also one batched GEMM.
template <typename T>
class DenseSymmetricOperator final : public Operator<T> {
 public:
  DenseSymmetricOperator(Backend<T>& backend, const T* matrices, int n, std::int64_t stride,
                         const T* preconditioners = nullptr, std::int64_t stride_p = 0)
      : backend_(backend), matrices_(matrices), n_(n), stride_(stride), preconditioners_(preconditioners),
        stride_p_(stride_p) {}
  int size() const override { return n_; }
  void apply(const T* v, int ldv, std::int64_t stride_v, T* av, int ldav, std::int64_t stride_av, int cols, T sign,
             const Batch& batch) override {
    if (cols <= 0) return;
    backend_.gemm('N', 'N', n_, cols, n_, sign, matrices_, n_, stride_, v, ldv, stride_v, T(0), av, ldav, stride_av,
                  batch);
  }
  bool precondition(const T* v, int ldv, std::int64_t stride_v, T* out, int ldo, std::int64_t stride_o, int cols,
                    const Batch& batch) override {
    if (preconditioners_ == nullptr || cols <= 0) return false;
    backend_.gemm('N', 'N', n_, cols, n_, T(1), preconditioners_, n_, stride_p_, v, ldv, stride_v, T(0), out, ldo,
                  stride_o, batch);
    return true;
  }

 private:
  Backend<T>& backend_;
  const T* matrices_;
  int n_;
  std::int64_t stride_;
  const T* preconditioners_;
  std::int64_t stride_p_;
};

// LoRA-DA's Initialization Guidance Matrix as an operator (docs/math.md §5.3),
//   Ω v = −α D (Dᵀ v) + c Z⁻¹ v,
// given D (d_in x d_out) and the Cholesky factor of Z, forming neither Ω nor Z⁻¹.
// Column-major storage as handed over from row-major torch tensors:
//   d_transposed = Dᵀ (d_out x n, ld d_out), or with d_column_major D itself
//                  (n x d_out, ld n: a column-major torch tensor, no transposing copy);
//   z_upper      = U with Z = Uᵀ U (n x n, ld n; this is Lᵀ of the lower factor L),
// so Z⁻¹ v = U⁻¹ (U⁻ᵀ v): two triangular solves.
template <typename T>
class LoraDAGuidanceOperator final : public Operator<T> {
 public:
  LoraDAGuidanceOperator(Backend<T>& backend, const T* d_transposed, int n, int d_out, std::int64_t stride_d,
                         const T* z_upper, std::int64_t stride_z, double alpha, std::vector<double> variance_scale,
                         int batch_count, const T* shifted_upper = nullptr, std::int64_t stride_p = 0,
                         std::vector<double> preconditioner_shift = {}, bool d_column_major = false)
      : backend_(backend),
        d_transposed_(d_transposed),
        n_(n),
        d_out_(d_out),
        stride_d_(stride_d),
        z_upper_(z_upper),
        stride_z_(stride_z),
        alpha_(alpha),
        variance_scale_(std::move(variance_scale)),
        scaled_(variance_scale_.size()),
        ones_(variance_scale_.size(), 1.0),
        batch_count_(batch_count),
        shifted_upper_(shifted_upper),
        stride_p_(stride_p),
        shift_(std::move(preconditioner_shift)),
        scaled_shift_(shift_.size()),
        d_column_major_(d_column_major) {
    if (shifted_upper_ != nullptr && int(shift_.size()) != batch_count_)
      throw BackendError("the preconditioner needs one shift per problem");
  }
  int size() const override { return n_; }
  void apply(const T* v, int ldv, std::int64_t stride_v, T* av, int ldav, std::int64_t stride_av, int cols, T sign,
             const Batch& batch) override {
    if (cols <= 0) return;
    ensure_workspace(cols);
    // projection = Dᵀ v   (d_out x cols)
    const char d_op = d_column_major_ ? 'T' : 'N';  // how the stored matrix becomes Dᵀ
    const int ld_d = d_column_major_ ? n_ : d_out_;
    backend_.gemm(d_op, 'N', d_out_, cols, n_, T(1), d_transposed_, ld_d, stride_d_, v, ldv, stride_v, T(0),
                  projection_, d_out_, std::int64_t(d_out_) * workspace_cols_, batch);
    // av = sign c Z⁻¹ v = U⁻¹ (U⁻ᵀ (sign c v))
    backend_.copy_block(n_, cols, v, ldv, stride_v, av, ldav, stride_av, batch);
    for (std::size_t b = 0; b < variance_scale_.size(); ++b) scaled_[b] = double(sign) * variance_scale_[b];
    backend_.trsm_left('U', 'T', n_, cols, scaled_.data(), z_upper_, n_, stride_z_, av, ldav, stride_av, batch);
    backend_.trsm_left('U', 'N', n_, cols, ones_.data(), z_upper_, n_, stride_z_, av, ldav, stride_av, batch);
    // av += −α sign D projection
    backend_.gemm(d_column_major_ ? 'N' : 'T', 'N', n_, cols, d_out_, T(-alpha_ * double(sign)), d_transposed_, ld_d,
                  stride_d_, projection_, d_out_, std::int64_t(d_out_) * workspace_cols_, T(1), av, ldav, stride_av,
                  batch);
  }
  // P = (βcZ⁻¹ + αI)⁻¹ = Z M⁻¹ = (I − βc M⁻¹)/α with M = βcI + αZ = U_Mᵀ U_M: it
  // undoes the wide spread βcZ⁻¹ gives Ω's spectrum where Z is small, and is ≈ I/α
  // where the bias term lives. Applied in factored form, two triangular solves with
  // U_M (the caller factors M once; P is never formed):
  //   out = −(βc/α) U_M⁻¹ U_M⁻ᵀ v + v/α.
  // The subtraction loses absolute accuracy ~ε·‖v‖ where P is small, which a
  // preconditioner tolerates (LOBPCG only uses the directions P gives).
  bool precondition(const T* v, int ldv, std::int64_t stride_v, T* out, int ldo, std::int64_t stride_o, int cols,
                    const Batch& batch) override {
    if (shifted_upper_ == nullptr || cols <= 0) return false;
    backend_.copy_block(n_, cols, v, ldv, stride_v, out, ldo, stride_o, batch);
    for (std::size_t b = 0; b < shift_.size(); ++b) scaled_shift_[b] = -shift_[b] / alpha_;
    backend_.trsm_left('U', 'T', n_, cols, scaled_shift_.data(), shifted_upper_, n_, stride_p_, out, ldo, stride_o,
                       batch);
    backend_.trsm_left('U', 'N', n_, cols, ones_.data(), shifted_upper_, n_, stride_p_, out, ldo, stride_o, batch);
    backend_.add_block(n_, cols, T(1.0 / alpha_), v, ldv, stride_v, T(1), out, ldo, stride_o, batch);
    return true;
  }
  ~LoraDAGuidanceOperator() override { release_workspace(); }
  // Frees the projection workspace (it is made again on the next apply).
  void release_workspace() noexcept {
    if (projection_ != nullptr) backend_.release(projection_);
    projection_ = nullptr;
    workspace_cols_ = 0;
  }

 private:
  void ensure_workspace(int cols) {
    if (cols <= workspace_cols_) return;
    if (projection_ != nullptr) backend_.release(projection_);
    projection_ = nullptr;
    projection_ = backend_.allocate(std::size_t(d_out_) * cols * batch_count_);
    workspace_cols_ = cols;
  }

  Backend<T>& backend_;
  const T* d_transposed_;
  int n_, d_out_;
  std::int64_t stride_d_;
  const T* z_upper_;
  std::int64_t stride_z_;
  double alpha_;
  std::vector<double> variance_scale_, scaled_, ones_;
  int batch_count_;
  const T* shifted_upper_;
  std::int64_t stride_p_;
  std::vector<double> shift_, scaled_shift_;
  bool d_column_major_;
  T* projection_ = nullptr;
  int workspace_cols_ = 0;
};

// Forms sign·A[b] (and P[b] when `preconditioners` is given and the operator has
// one) as dense n x n matrices by applying the operator to the columns of the
// identity, `chunk` columns at a time (the operator's own arithmetic, so the dense
// matrix is the operator to rounding; it is symmetric to rounding only).
template <typename T>
void form_dense(Backend<T>& backend, Operator<T>& op, int batch_count, T* matrices, T* preconditioners, int chunk) {
  const int n = op.size();
  const std::int64_t nn = std::int64_t(n) * n;
  chunk = std::max(1, std::min(chunk, n));
  Batch all{batch_count, nullptr};
  DeviceBuffer<T> identity(backend, std::size_t(n) * chunk);
  std::vector<double> host(std::size_t(n) * chunk);
  for (int first = 0; first < n; first += chunk) {
    const int cols = std::min(chunk, n - first);
    std::fill(host.begin(), host.end(), 0.0);
    for (int j = 0; j < cols; ++j) host[std::size_t(first + j) + std::size_t(j) * n] = 1.0;
    backend.from_host(identity.get(), host.data(), host.size());
    op.apply(identity.get(), n, 0, matrices + std::int64_t(first) * n, n, nn, cols, T(1), all);
    if (preconditioners != nullptr)
      op.precondition(identity.get(), n, 0, preconditioners + std::int64_t(first) * n, n, nn, cols, all);
  }
}

}  // namespace lora_da
