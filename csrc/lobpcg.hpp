// Blocked LOBPCG for the k smallest (or largest) eigenpairs of a batch of
// symmetric operators of one size n, written once over the backend interface
// (backend.hpp). In LoRA-DA the operator is Ω = −αΔ̂Δ̂ᵀ + βcZ⁻¹ and the wanted
// pairs are its r smallest (docs/math.md: the steps that form Ω and take its
// eigenvectors; §5.3 Ω as an operator; §5.4 this solver, its convergence test
// and the independent check of its results).
//
// Algorithm (per problem; every n-sized step is one batched backend call):
//   block size m = k + guard; the basis S = [X | P | W] (n x 3m) is kept
//   orthonormal, and AS = A S alongside it.
//   X: current Ritz vectors (m), P: previous search directions (<= m columns,
//   orthogonal to X by construction), W: residuals of the not yet converged
//   pairs, projected against [X, P] and orthonormalized by SVQB twice, with
//   numerically dependent directions dropped (this is what makes Rayleigh–Ritz
//   survive rank loss in [X, R, P]).
//   Each iteration: R = AX − XΘ; convergence test; W from R (W ← P W when the
//   operator has a preconditioner P); AW = A W (the one operator application);
//   H = Sᵀ(AS); eigen-decomposition of H restricted to the valid columns;
//   X ← S Y, P ← S Q with Q the part of Y outside X, orthonormalized against Y
//   in coefficient space; AX, AP likewise.
// Soft locking: a wanted pair whose residual meets the threshold below contributes no
// residual direction (but stays in X and in the Rayleigh–Ritz); guard pairs
// always contribute (unless their residual is exactly zero). A problem stops
// (converged) once all of its k wanted pairs meet
//   ||A x_j − θ_j x_j|| <= max(tol * max_{i<m} |θ_i|, 100 eps ||A||_est),
// or (not converged) after max_iter iterations or on stagnation (StagnationWatch);
// ||A||_est = the largest |Ritz value| seen so far (a lower bound of ||A||_2
// that is close to it after the first iterations). The residual is measured
// against the size of the block's own Ritz values, not against ||A||: Ω's
// variance term βcZ⁻¹ can make ||Ω|| many orders of magnitude larger than its
// smallest eigenvalues, and a test relative to ||Ω|| would stop far from the
// wanted eigenvectors; 100 eps ||A||_est is the floor that rounding in the
// n-sized products allows (a dense eigensolver has the same limit). The
// largest principal angle to the exact k-dimensional eigenspace is then at
// most about  sqrt(k) * threshold / (λ_{k+1} − λ_k)  (Davis–Kahan), which is
// the bound the tests check.
// Coefficient-space work (m x m .. 3m x 3m) runs on the host in double for
// every backend; only n-sized data lives in backend memory.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <string>
#include <vector>

#include "backend.hpp"
#include "host_lapack.hpp"

namespace lora_da {

struct LobpcgOptions {
  int k = 1;
  int guard = -1;  // guard vectors beyond k; < 0 = default (see default_guard)
  bool largest = false;
  double tol = -1;  // relative residual tolerance; <= 0 = default for the precision
  int max_iter = 500;
  std::uint64_t seed = 0;
  // Optional start: the first `initial_cols` columns of the start block (n x initial_cols
  // per problem, column-major, `initial_stride` elements apart, on the solving device, of
  // the solver's type); the rest of the block stays random.
  const void* initial = nullptr;
  int initial_cols = 0;
  std::int64_t initial_stride = 0;
  // The variant with one host exchange per iteration (lobpcg_fused.hpp): the search
  // block is orthonormalized on the backend (shifted Cholesky QR) and the
  // Rayleigh–Ritz step reads all small products at once. What the CUDA backend runs.
  bool one_exchange = false;
  // Index of the first problem in the whole request (when a request is solved in
  // chunks): problem b of this call draws its start from stream first_problem + b.
  std::int64_t first_problem = 0;
};

struct LobpcgReport {
  std::vector<double> eigenvalues;     // batch x k, ascending (descending when largest)
  std::vector<double> residual_norms;  // batch x k, ||A x − θ x|| (0 for the dense fallback)
  std::vector<int> iterations;         // batch
  std::vector<unsigned char> converged;
  std::vector<double> norm_estimate;  // batch, ||A||_est
  bool dense_fallback = false;
  int block_size = 0;
  double tol = 0;
  TransferCounts transfers;  // host <-> backend transfers of this solve
};

// Default tolerances (relative residual): 2e-4 for fp32 (about 1.7e3 x its
// machine epsilon 1.19e-7), where rounding in the n-sized products limits the
// attainable residual to ~sqrt(n) eps ||A||; 1e-10 for fp64 (well above its
// floor, and tight enough for angles ~1e-8 / relative gap).
template <typename T>
double default_tolerance() {
  return sizeof(T) == 4 ? 2e-4 : 1e-10;
}

inline int default_guard(int k) { return std::max(k, 8); }

// The residual norm below which a wanted Ritz pair counts as converged (see above).
inline double convergence_threshold(double tol, double wanted_scale, double norm_estimate, double eps) {
  return std::max(tol * wanted_scale, 100.0 * eps * norm_estimate);
}

// Stagnation: a problem stops (not converged) when for a fifth of max_iter (at
// least 50) iterations neither the largest residual of its wanted pairs, in units of its
// threshold, has fallen below 0.9 of its best value, nor the sum of its wanted
// Ritz values (non-increasing: each Rayleigh–Ritz space holds the previous X) has
// fallen by more than rounding (100 k eps ||A||_est). Slow convergence moves one or
// the other: an unpreconditioned problem of condition 1e6 whose residuals sit
// above their start for hundreds of iterations while its Ritz values fall, and
// converges after 1125, is not stopped. A problem stuck above its threshold with
// its Ritz values settled (seen: a SmolLM2 v_proj that from 1 start in 7 sat at
// 1.3-4.2 thresholds in the classic variant) would otherwise run to max_iter; its
// callers treat it as any unconverged problem (LoRA-DA's independent check solves
// it again densely). The window grows with max_iter: a caller that allows many
// iterations gets that much patience (a float32 problem of condition 1e8 whose
// threshold rises with ||A||_est reached it after 599 iterations, with plateaus of
// more than 50).
inline int stagnation_window(int max_iter) { return std::max(50, max_iter / 5); }

class StagnationWatch {
 public:
  StagnationWatch(int batch_count, int window)
      : window_(window),
        best_residual_(batch_count, std::numeric_limits<double>::infinity()),
        best_ritz_sum_(batch_count, std::numeric_limits<double>::infinity()),
        progress_at_(batch_count, 0) {}
  // Records problem b at `iteration`: its largest wanted residual over its threshold
  // and its k wanted Ritz values (rounding of their sum: 100 k eps ||A||_est). True
  // when it has stagnated.
  bool stagnated(int b, int iteration, double residual_in_thresholds, const double* wanted_ritz_values, int k,
                 double eps, double norm_estimate) {
    const double ritz_sum = std::accumulate(wanted_ritz_values, wanted_ritz_values + k, 0.0);
    const double rounding = 100.0 * k * eps * norm_estimate;
    bool progress = false;
    if (!(residual_in_thresholds >= 0.9 * best_residual_[b])) {  // a new best (or the first value)
      best_residual_[b] = residual_in_thresholds;
      progress = true;
    }
    if (!(ritz_sum >= best_ritz_sum_[b] - rounding)) {
      best_ritz_sum_[b] = ritz_sum;
      progress = true;
    }
    if (progress) progress_at_[b] = iteration;
    return iteration - progress_at_[b] >= window_;
  }

 private:
  int window_;
  std::vector<double> best_residual_, best_ritz_sum_;
  std::vector<int> progress_at_;
};

namespace detail {

// Deterministic standard normal numbers: splitmix64 + Box–Muller (fully
// specified, so the same seed gives the same start on every platform).
class NormalStream {
 public:
  explicit NormalStream(std::uint64_t seed) : state_(seed) {}
  double next() {
    if (has_spare_) {
      has_spare_ = false;
      return spare_;
    }
    double u1 = (double(next_u64() >> 11) + 0.5) * (1.0 / 9007199254740992.0);
    double u2 = (double(next_u64() >> 11) + 0.5) * (1.0 / 9007199254740992.0);
    double radius = std::sqrt(-2.0 * std::log(u1));
    spare_ = radius * std::sin(6.283185307179586 * u2);
    has_spare_ = true;
    return radius * std::cos(6.283185307179586 * u2);
  }

 private:
  std::uint64_t next_u64() {
    std::uint64_t z = (state_ += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
  }
  std::uint64_t state_;
  double spare_ = 0;
  bool has_spare_ = false;
};

// The P direction's coefficients in Rayleigh-Ritz coordinates: Q = H (v x m, ld v)
// with its first `zeroed_rows` rows (the old X's coordinates) set to 0, then made
// orthogonal to H's columns by two rounds of Gram-Schmidt; also Q's Gram matrix
// (m x m, ld m). Shared by both LOBPCG variants.
inline void p_coefficients(int v, int m, const double* h, int zeroed_rows, std::vector<double>& q,
                           std::vector<double>& q_gram) {
  q.assign(std::size_t(v) * m, 0.0);
  for (int j = 0; j < m; ++j)
    for (int i = zeroed_rows; i < v; ++i) q[i + std::size_t(j) * v] = h[i + std::size_t(j) * v];
  for (int round = 0; round < 2; ++round)
    for (int j = 0; j < m; ++j)
      for (int l = 0; l < m; ++l) {
        double dot = 0;
        for (int i = 0; i < v; ++i) dot += h[i + std::size_t(l) * v] * q[i + std::size_t(j) * v];
        for (int i = 0; i < v; ++i) q[i + std::size_t(j) * v] -= dot * h[i + std::size_t(l) * v];
      }
  q_gram.assign(std::size_t(m) * m, 0.0);
  for (int j = 0; j < m; ++j)
    for (int l = 0; l < m; ++l) {
      double dot = 0;
      for (int i = 0; i < v; ++i) dot += q[i + std::size_t(l) * v] * q[i + std::size_t(j) * v];
      q_gram[l + std::size_t(j) * m] = dot;
    }
}

// SVQB (Stathopoulos & Wu): given the Gram matrix G (w x w, ld w) of a block V,
// writes T (w x w, ld w) with V T orthonormal; the kept columns come first and
// dropped ones are zero. A direction is dropped when its eigenvalue of the
// diagonally scaled Gram matrix is below `drop` (relative to 1) — numerically
// dependent on the others — or its column norm is zero. Returns the kept count.
inline int svqb_transform(int w, const double* gram, double drop, double* transform) {
  std::fill(transform, transform + std::size_t(w) * w, 0.0);
  if (w == 0) return 0;
  std::vector<double> scale(w), scaled(std::size_t(w) * w), values(w);
  double max_diag = 0;
  for (int i = 0; i < w; ++i) max_diag = std::max(max_diag, gram[i + std::size_t(i) * w]);
  if (!(max_diag > 0) || !std::isfinite(max_diag)) return 0;
  for (int i = 0; i < w; ++i) {
    double d = gram[i + std::size_t(i) * w];
    // Columns whose squared norm is zero (or below 1e-300 of the largest) are unused slots:
    // scale 0 makes their scaled Gram row and column zero, so SVQB drops them.
    scale[i] = d > max_diag * 1e-300 && d > 0 ? 1.0 / std::sqrt(d) : 0.0;
  }
  for (int j = 0; j < w; ++j)
    for (int i = 0; i < w; ++i) {
      double gij = 0.5 * (gram[i + std::size_t(j) * w] + gram[j + std::size_t(i) * w]);
      scaled[i + std::size_t(j) * w] = scale[i] * gij * scale[j];
    }
  host_symmetric_eig(w, scaled.data(), w, values.data());
  int kept = 0;
  for (int j = w - 1; j >= 0; --j) {  // largest first: best conditioned directions
    if (!(values[j] > drop)) continue;
    double inv_sqrt = 1.0 / std::sqrt(values[j]);
    for (int i = 0; i < w; ++i) transform[i + std::size_t(kept) * w] = scale[i] * scaled[i + std::size_t(j) * w] * inv_sqrt;
    ++kept;
  }
  return kept;
}

// Start block in the W slot: seeded random columns (problem b draws from its own
// stream, so a problem's start does not depend on the rest of the batch), the
// first of them replaced by the caller's start vectors when given. `scratch`
// holds n x m per problem.
template <typename T>
void fill_start_block(Backend<T>& backend, const LobpcgOptions& options, int n, int m, int batch_count, T* scratch,
                      T* w_slot, std::int64_t stride_basis) {
  const std::int64_t stride_block = std::int64_t(n) * m;
  Batch all{batch_count, nullptr};
  std::vector<double> start(std::size_t(stride_block) * batch_count);
  for (int b = 0; b < batch_count; ++b) {
    const std::uint64_t problem = std::uint64_t(options.first_problem) + std::uint64_t(b);
    NormalStream normal(options.seed * 0x2545F4914F6CDD1DULL + problem * 0x9E3779B97F4A7C15ULL + 1);
    for (std::int64_t i = 0; i < stride_block; ++i) start[std::size_t(b) * stride_block + i] = normal.next();
  }
  backend.from_host(scratch, start.data(), start.size());
  backend.copy_block(n, m, scratch, n, stride_block, w_slot, n, stride_basis, all);
  if (options.initial != nullptr && options.initial_cols > 0)
    backend.copy_block(n, std::min(options.initial_cols, m), static_cast<const T*>(options.initial), n,
                       options.initial_stride, w_slot, n, stride_basis, all);
}

}  // namespace detail

#include "lobpcg_fused.hpp"  // NOLINT: the one-exchange variant, written over the helpers above

// Solves the batch; writes the k eigenvectors of problem b into
// eigenvectors + b * n * k (n x k, column-major). Throws BackendError.
template <typename T>
LobpcgReport lobpcg(Backend<T>& backend, Operator<T>& op, int batch_count, const LobpcgOptions& options,
                    T* eigenvectors) {
  const int n = op.size();
  const int k = options.k;
  if (k < 1 || k > n) throw BackendError("k must lie in [1, n]");
  if (batch_count < 1) throw BackendError("empty batch");
  const T sign = options.largest ? T(-1) : T(1);  // largest of A = smallest of −A
  const double tol = options.tol > 0 ? options.tol : default_tolerance<T>();
  const int guard = options.guard >= 0 ? options.guard : default_guard(k);
  // Dense below n = 5 (k + guard): there the basis [X, P, W] nearly fills the
  // space, LOBPCG gains nothing and loses robustness (seen stagnating with
  // widely spread spectra), and a dense solve is cheap. In 64 bits: k + guard
  // may exceed the int range; past the test it is at most n / 5.
  const std::int64_t wanted_block = std::int64_t(k) + guard;
  const int block = std::int64_t(n) < 5 * wanted_block ? 0 : int(wanted_block);

  LobpcgReport report;
  report.tol = tol;
  report.eigenvalues.assign(std::size_t(batch_count) * k, 0.0);
  report.residual_norms.assign(std::size_t(batch_count) * k, 0.0);
  report.iterations.assign(batch_count, 0);
  report.converged.assign(batch_count, 0);
  report.norm_estimate.assign(batch_count, 0.0);
  Batch all{batch_count, nullptr};

  const TransferCounts before = backend.transfers();
  if (block < k) {
    // Small n (see above): solve densely.
    report.dense_fallback = true;
    report.block_size = n;
    const std::int64_t nn = std::int64_t(n) * n;
    DeviceBuffer<T> identity(backend, std::size_t(nn) * batch_count), dense(backend, std::size_t(nn) * batch_count),
        values(backend, std::size_t(n) * batch_count);
    std::vector<double> host_identity(std::size_t(nn) * batch_count, 0.0);
    for (int b = 0; b < batch_count; ++b)
      for (int i = 0; i < n; ++i) host_identity[b * nn + i + std::int64_t(i) * n] = 1.0;
    backend.from_host(identity.get(), host_identity.data(), host_identity.size());
    op.apply(identity.get(), n, nn, dense.get(), n, nn, n, sign, all);
    backend.syevd(n, dense.get(), n, nn, values.get(), n, all);
    std::vector<double> host_values(std::size_t(n) * batch_count);
    backend.to_host(host_values.data(), values.get(), host_values.size());
    backend.copy_block(n, k, dense.get(), n, nn, eigenvectors, n, std::int64_t(n) * k, all);
    for (int b = 0; b < batch_count; ++b) {
      double norm = 0;
      for (int i = 0; i < n; ++i) norm = std::max(norm, std::fabs(host_values[std::size_t(b) * n + i]));
      for (int j = 0; j < k; ++j) report.eigenvalues[std::size_t(b) * k + j] = double(sign) * host_values[std::size_t(b) * n + j];
      report.converged[b] = 1;
      report.norm_estimate[b] = norm;
    }
    backend.synchronize();
    report.transfers.downloads = backend.transfers().downloads - before.downloads;
    report.transfers.uploads = backend.transfers().uploads - before.uploads;
    return report;
  }

  const int m = block;
  const int s = 3 * m;
  report.block_size = m;
  if (options.one_exchange) {
    detail::lobpcg_one_exchange(backend, op, batch_count, options, eigenvectors, m, tol, sign, report);
    report.transfers.downloads = backend.transfers().downloads - before.downloads;
    report.transfers.uploads = backend.transfers().uploads - before.uploads;
    return report;
  }
  const std::int64_t stride_basis = std::int64_t(n) * s;  // S, AS: n x 3m
  const std::int64_t stride_pair = std::int64_t(n) * 2 * m;  // next [X | P]
  const std::int64_t stride_block = std::int64_t(n) * m;
  const std::int64_t stride_small = std::int64_t(s) * s;

  DeviceBuffer<T> basis(backend, std::size_t(stride_basis) * batch_count);
  DeviceBuffer<T> applied(backend, std::size_t(stride_basis) * batch_count);
  DeviceBuffer<T> next_basis(backend, std::size_t(stride_pair) * batch_count);
  DeviceBuffer<T> next_applied(backend, std::size_t(stride_pair) * batch_count);
  DeviceBuffer<T> residual(backend, std::size_t(stride_block) * batch_count);
  DeviceBuffer<T> scratch(backend, std::size_t(stride_block) * batch_count);
  DeviceBuffer<T> small(backend, std::size_t(stride_small) * batch_count);

  T* const x_slot = basis.get();                       // columns [0, m)
  T* const w_slot = basis.get() + std::int64_t(2) * m * n;  // columns [2m, 3m)
  T* const aw_slot = applied.get() + std::int64_t(2) * m * n;

  std::vector<double> theta(std::size_t(batch_count) * m, 0.0);
  std::vector<double> residual_norm(std::size_t(batch_count) * m, 0.0);
  std::vector<int> p_count(batch_count, 0), w_count(batch_count, 0);
  std::vector<unsigned char> x_valid(batch_count, 0), running(batch_count, 1);
  std::vector<double> host_small(std::size_t(stride_small) * batch_count);
  Batch active{batch_count, running.data()};
  const double eps = std::numeric_limits<T>::epsilon();
  // SVQB drop threshold on the scaled Gram eigenvalues: directions whose
  // relative size is below ~sqrt(100 eps) would carry only rounding noise.
  const double svqb_drop = 100.0 * eps;

  auto gram_of_w_to_host = [&]() {
    backend.gemm('T', 'N', m, m, n, T(1), w_slot, n, stride_basis, w_slot, n, stride_basis, T(0), small.get(), m,
                 std::int64_t(m) * m, active);
    backend.to_host(host_small.data(), small.get(), std::size_t(m) * m * batch_count);
  };

  // Orthonormalizes W against [X, P] and itself (two rounds of projection + SVQB).
  auto orthonormalize_w = [&]() {
    for (int round = 0; round < 2; ++round) {
      // coefficients C = [X, P]ᵀ W (2m x m) in `small`, then W −= [X, P] C.
      backend.gemm('T', 'N', 2 * m, m, n, T(1), basis.get(), n, stride_basis, w_slot, n, stride_basis, T(0),
                   small.get(), 2 * m, stride_small, active);
      backend.gemm('N', 'N', n, m, 2 * m, T(-1), basis.get(), n, stride_basis, small.get(), 2 * m, stride_small, T(1),
                   w_slot, n, stride_basis, active);
      gram_of_w_to_host();
      std::vector<double> transforms(std::size_t(m) * m * batch_count, 0.0);
      for (int b = 0; b < batch_count; ++b) {
        if (!running[b]) continue;
        w_count[b] = detail::svqb_transform(m, host_small.data() + std::size_t(b) * m * m,
                                            svqb_drop, transforms.data() + std::size_t(b) * m * m);
      }
      backend.from_host(small.get(), transforms.data(), transforms.size());
      backend.gemm('N', 'N', n, m, m, T(1), w_slot, n, stride_basis, small.get(), m, std::int64_t(m) * m, T(0),
                   scratch.get(), n, stride_block, active);
      backend.copy_block(n, m, scratch.get(), n, stride_block, w_slot, n, stride_basis, active);
    }
  };

  auto max_w_count = [&]() {
    int width = 0;
    for (int b = 0; b < batch_count; ++b)
      if (running[b]) width = std::max(width, w_count[b]);
    return width;
  };

  // Rayleigh–Ritz on S = [X | P | W]; updates X, P, AX, AP, θ.
  auto rayleigh_ritz = [&]() {
    backend.gemm('T', 'N', s, s, n, T(1), basis.get(), n, stride_basis, applied.get(), n, stride_basis, T(0),
                 small.get(), s, stride_small, active);
    backend.to_host(host_small.data(), small.get(), host_small.size());
    std::vector<double> coefficients(std::size_t(stride_small) * batch_count, 0.0);  // K = [Y | Q], ld s
    for (int b = 0; b < batch_count; ++b) {
      double* kb = coefficients.data() + std::size_t(b) * stride_small;
      if (!running[b]) {  // keep X and P unchanged (the CUDA backend computes every problem)
        for (int j = 0; j < 2 * m; ++j) kb[j + std::size_t(j) * s] = 1.0;
        continue;
      }
      const double* hb = host_small.data() + std::size_t(b) * stride_small;
      std::vector<int> index;
      if (x_valid[b])
        for (int j = 0; j < m; ++j) index.push_back(j);
      for (int j = 0; j < p_count[b]; ++j) index.push_back(m + j);
      for (int j = 0; j < w_count[b]; ++j) index.push_back(2 * m + j);
      const int v = int(index.size());
      if (v < m)
        throw BackendError("LOBPCG: the search space lost rank (" + std::to_string(v) + " < block " +
                           std::to_string(m) + " directions); the operator may be non-finite");
      std::vector<double> h(std::size_t(v) * v), values(v);
      for (int j = 0; j < v; ++j)
        for (int i = 0; i < v; ++i) {
          double hij = hb[index[i] + std::size_t(index[j]) * s], hji = hb[index[j] + std::size_t(index[i]) * s];
          h[i + std::size_t(j) * v] = 0.5 * (hij + hji);
        }
      for (double value : h)
        if (!std::isfinite(value)) throw BackendError("LOBPCG: non-finite values in the Rayleigh quotient (problem " + std::to_string(b) + ")");
      host_symmetric_eig(v, h.data(), v, values.data());
      for (int j = 0; j < v; ++j) report.norm_estimate[b] = std::max(report.norm_estimate[b], std::fabs(values[j]));
      for (int j = 0; j < m; ++j) theta[std::size_t(b) * m + j] = values[j];
      // Y = first m eigenvectors (v x m, compressed coordinates).
      // Q = Y with the X rows zeroed, orthogonalized against Y, orthonormalized.
      std::vector<double> q, gram, transform(std::size_t(m) * m);
      detail::p_coefficients(v, m, h.data(), x_valid[b] ? m : 0, q, gram);
      // The coefficients are exact to double rounding: drop only directions
      // below 1e-24 in scaled Gram (i.e. relative size < 1e-12).
      int kept = (x_valid[b] ? detail::svqb_transform(m, gram.data(), 1e-24, transform.data()) : 0);
      for (int j = 0; j < m; ++j)
        for (int i = 0; i < v; ++i) kb[index[i] + std::size_t(j) * s] = h[i + std::size_t(j) * v];
      for (int j = 0; j < kept; ++j)
        for (int i = 0; i < v; ++i) {
          double value = 0;
          for (int l = 0; l < m; ++l) value += q[i + std::size_t(l) * v] * transform[l + std::size_t(j) * m];
          kb[index[i] + std::size_t(m + j) * s] = value;
        }
      p_count[b] = kept;
      x_valid[b] = 1;
    }
    backend.from_host(small.get(), coefficients.data(), coefficients.size());
    backend.gemm('N', 'N', n, 2 * m, s, T(1), basis.get(), n, stride_basis, small.get(), s, stride_small, T(0),
                 next_basis.get(), n, stride_pair, active);
    backend.gemm('N', 'N', n, 2 * m, s, T(1), applied.get(), n, stride_basis, small.get(), s, stride_small, T(0),
                 next_applied.get(), n, stride_pair, active);
    backend.copy_block(n, 2 * m, next_basis.get(), n, stride_pair, basis.get(), n, stride_basis, active);
    backend.copy_block(n, 2 * m, next_applied.get(), n, stride_pair, applied.get(), n, stride_basis, active);
  };

  // Residuals R = AX − XΘ and their norms (from diag RᵀR).
  auto compute_residuals = [&]() {
    backend.copy_block(n, m, applied.get(), n, stride_basis, residual.get(), n, stride_block, active);
    std::vector<double> diagonal(std::size_t(m) * m * batch_count, 0.0);
    for (int b = 0; b < batch_count; ++b)
      for (int j = 0; j < m; ++j) diagonal[std::size_t(b) * m * m + j + std::size_t(j) * m] = theta[std::size_t(b) * m + j];
    backend.from_host(small.get(), diagonal.data(), diagonal.size());
    backend.gemm('N', 'N', n, m, m, T(-1), x_slot, n, stride_basis, small.get(), m, std::int64_t(m) * m, T(1),
                 residual.get(), n, stride_block, active);
    backend.gemm('T', 'N', m, m, n, T(1), residual.get(), n, stride_block, residual.get(), n, stride_block, T(0),
                 small.get(), m, std::int64_t(m) * m, active);
    backend.to_host(host_small.data(), small.get(), std::size_t(m) * m * batch_count);
    for (int b = 0; b < batch_count; ++b) {
      if (!running[b]) continue;
      for (int j = 0; j < m; ++j)
        residual_norm[std::size_t(b) * m + j] = std::sqrt(std::max(0.0, host_small[std::size_t(b) * m * m + j + std::size_t(j) * m]));
    }
  };

  {
    detail::fill_start_block(backend, options, n, m, batch_count, scratch.get(), w_slot, stride_basis);
    orthonormalize_w();
    op.apply(w_slot, n, stride_basis, aw_slot, n, stride_basis, max_w_count(), sign, active);
    rayleigh_ritz();
  }

  StagnationWatch watch(batch_count, stagnation_window(options.max_iter));
  int iteration = 0;
  for (;; ++iteration) {
    compute_residuals();
    bool any_running = false;
    std::vector<double> selection(std::size_t(m) * m * batch_count, 0.0);
    for (int b = 0; b < batch_count; ++b) {
      if (!running[b]) continue;
      double wanted_scale = 0;
      for (int j = 0; j < m; ++j) wanted_scale = std::max(wanted_scale, std::fabs(theta[std::size_t(b) * m + j]));
      const double threshold = convergence_threshold(tol, wanted_scale, report.norm_estimate[b], eps);
      bool all_wanted = true;
      double worst = 0;  // the largest wanted residual, in thresholds
      for (int j = 0; j < k; ++j) {
        all_wanted = all_wanted && residual_norm[std::size_t(b) * m + j] <= threshold;
        worst = std::max(worst, residual_norm[std::size_t(b) * m + j] / threshold);
      }
      report.iterations[b] = iteration;
      for (int j = 0; j < k; ++j) report.residual_norms[std::size_t(b) * k + j] = residual_norm[std::size_t(b) * m + j];
      if (all_wanted || iteration >= options.max_iter || watch.stagnated(b, iteration, worst, &theta[std::size_t(b) * m], k, eps, report.norm_estimate[b])) {
        report.converged[b] = all_wanted;
        running[b] = 0;
        continue;
      }
      any_running = true;
      // Soft locking: the residuals of converged wanted pairs are left out;
      // the others (and every guard pair) with a nonzero residual become W's
      // columns, normalized.
      double* eb = selection.data() + std::size_t(b) * m * m;
      int column = 0;
      for (int j = 0; j < m; ++j) {
        double norm = residual_norm[std::size_t(b) * m + j];
        if (j < k && norm <= threshold) continue;
        if (!(norm > 0)) continue;
        eb[j + std::size_t(column) * m] = 1.0 / norm;
        ++column;
      }
    }
    if (!any_running) break;
    backend.from_host(small.get(), selection.data(), selection.size());
    backend.gemm('N', 'N', n, m, m, T(1), residual.get(), n, stride_block, small.get(), m, std::int64_t(m) * m, T(0),
                 w_slot, n, stride_basis, active);
    // Preconditioned directions W ← P W (when the operator has P; soft-locked columns stay zero).
    if (op.precondition(w_slot, n, stride_basis, scratch.get(), n, stride_block, m, active))
      backend.copy_block(n, m, scratch.get(), n, stride_block, w_slot, n, stride_basis, active);
    orthonormalize_w();
    op.apply(w_slot, n, stride_basis, aw_slot, n, stride_basis, max_w_count(), sign, active);
    rayleigh_ritz();
  }

  for (int b = 0; b < batch_count; ++b)
    for (int j = 0; j < k; ++j) report.eigenvalues[std::size_t(b) * k + j] = double(sign) * theta[std::size_t(b) * m + j];
  backend.copy_block(n, k, x_slot, n, stride_basis, eigenvectors, n, std::int64_t(n) * k, all);
  backend.synchronize();
  report.transfers.downloads = backend.transfers().downloads - before.downloads;
  report.transfers.uploads = backend.transfers().uploads - before.uploads;
  return report;
}

}  // namespace lora_da
