// The one-exchange variant of the blocked LOBPCG (included by lobpcg.hpp, inside
// namespace lora_da, after its helpers; LobpcgOptions::one_exchange selects it).
// Same iteration, stopping rule and soft locking as lobpcg.hpp, reorganized so
// that each iteration needs the host once: one download of every small product
// (RᵀR, SᵀS, SᵀAS) and one upload of the coefficients it decides. What would
// need the host in between runs on the backend:
//   - soft locking: the residuals become search directions by select_columns,
//     against the thresholds uploaded with the previous coefficients (they depend
//     only on the Ritz values and ||A||_est the host already knows);
//   - W's orthonormalization: two rounds of projection against [X, P], then shifted
//     Cholesky QR (shift 11(nm + m(m+1))u · trace, which keeps the factorization
//     defined for any block up to κ ~ 1/u), projection, Cholesky QR (docs/math.md §5.4).
// The host then orthonormalizes S = [X | P | W] once more in coefficient space,
// from the downloaded SᵀS (Gram–Schmidt twice in the SᵀS inner product), which
// is accurate because the backend already made S orthonormal to rounding level;
// a direction that comes out with squared norm below 1e-2 of the largest is
// dropped (its coefficients would carry the products' rounding). The Rayleigh–Ritz
// step and the P update are those of lobpcg.hpp in that orthonormal basis.
// On the CPU, where a transfer is a copy, this variant is 1.2-1.9x slower than the
// classic one (an extra projection, SᵀS, and the host's coefficient-space pass;
// bench/bench_lobpcg.py --guidance), so the CPU backend keeps the classic one by
// default; on CUDA it replaces the nine blocking transfers of an iteration by one
// download (and one asynchronous upload).

namespace detail {

// Gram–Schmidt (two rounds) of the candidate columns of S, in the inner product
// given by gram = SᵀS (s x s, ld s): returns the coefficient vectors (s each) of
// the kept, orthonormal directions, in candidate order; `kept_of_first` counts
// those that came from the first `first_count` candidates.
inline std::vector<double> coefficient_gram_schmidt(int s, const double* gram, const std::vector<int>& candidates,
                                                    int first_count, double drop, int& kept, int& kept_of_first) {
  double scale = 0;
  for (int c : candidates) scale = std::max(scale, gram[c + std::size_t(c) * s]);
  std::vector<double> basis, t(s), gt(s), dots;
  kept = 0;
  kept_of_first = 0;
  if (!(scale > 0) || !std::isfinite(scale)) return basis;
  auto apply_gram = [&]() {  // gt = gram t, column by column (t is sparse in the first rounds)
    std::fill(gt.begin(), gt.end(), 0.0);
    for (int j = 0; j < s; ++j) {
      if (t[j] == 0.0) continue;
      const double* column = gram + std::size_t(j) * s;
      for (int i = 0; i < s; ++i) gt[i] += column[i] * t[j];
    }
  };
  for (std::size_t position = 0; position < candidates.size(); ++position) {
    const int c = candidates[position];
    if (!(gram[c + std::size_t(c) * s] > 0)) continue;  // an unused (zero) column
    std::fill(t.begin(), t.end(), 0.0);
    t[c] = 1.0;
    for (int round = 0; round < 2; ++round) {
      apply_gram();
      dots.assign(kept, 0.0);
      for (int l = 0; l < kept; ++l) {
        const double* q = basis.data() + std::size_t(l) * s;
        for (int i = 0; i < s; ++i) dots[l] += q[i] * gt[i];
      }
      for (int l = 0; l < kept; ++l) {
        const double* q = basis.data() + std::size_t(l) * s;
        for (int i = 0; i < s; ++i) t[i] -= dots[l] * q[i];
      }
    }
    apply_gram();
    double norm2 = 0;
    for (int i = 0; i < s; ++i) norm2 += t[i] * gt[i];
    if (!(norm2 > drop * scale)) continue;
    const double inverse = 1.0 / std::sqrt(norm2);
    for (int i = 0; i < s; ++i) basis.push_back(t[i] * inverse);
    ++kept;
    if (int(position) < first_count) ++kept_of_first;
  }
  return basis;
}

template <typename T>
void lobpcg_one_exchange(Backend<T>& backend, Operator<T>& op, int batch_count, const LobpcgOptions& options,
                         T* eigenvectors, int m, double tol, T sign, LobpcgReport& report) {
  const int n = op.size();
  const int k = options.k;
  const int s = 3 * m;
  const std::int64_t stride_basis = std::int64_t(n) * s;
  const std::int64_t stride_pair = std::int64_t(n) * 2 * m;
  const std::int64_t stride_block = std::int64_t(n) * m;
  // Small buffers per problem. Download: RᵀR (m x m) | SᵀS (s x s) | SᵀAS (s x s).
  // Upload: K = [coefficients of X | of P] (s x 2m, ld s) | diag(Θ) (m x m) | threshold.
  // Work: projection coefficients (2m x m) | Gram of W (m x m).
  const std::int64_t mm = std::int64_t(m) * m, ss = std::int64_t(s) * s;
  const std::int64_t stride_down = mm + 2 * ss;
  const std::int64_t theta_at = std::int64_t(s) * 2 * m, threshold_at = theta_at + mm;
  const std::int64_t stride_up = threshold_at + 1;
  const std::int64_t stride_work = 3 * mm;

  DeviceBuffer<T> basis(backend, std::size_t(stride_basis) * batch_count);
  DeviceBuffer<T> applied(backend, std::size_t(stride_basis) * batch_count);
  DeviceBuffer<T> next_basis(backend, std::size_t(stride_pair) * batch_count);
  DeviceBuffer<T> next_applied(backend, std::size_t(stride_pair) * batch_count);
  DeviceBuffer<T> residual(backend, std::size_t(stride_block) * batch_count);
  DeviceBuffer<T> scratch(backend, std::size_t(stride_block) * batch_count);
  DeviceBuffer<T> down(backend, std::size_t(stride_down) * batch_count);
  DeviceBuffer<T> up(backend, std::size_t(stride_up) * batch_count);
  DeviceBuffer<T> work(backend, std::size_t(stride_work) * batch_count);

  T* const x_slot = basis.get();
  T* const w_slot = basis.get() + std::int64_t(2) * m * n;
  T* const aw_slot = applied.get() + std::int64_t(2) * m * n;
  T* const gram_w = work.get() + 2 * mm;

  std::vector<double> theta(std::size_t(batch_count) * m, 0.0);
  std::vector<int> p_count(batch_count, 0);
  std::vector<unsigned char> x_valid(batch_count, 0), running(batch_count, 1);
  std::vector<double> host_down(std::size_t(stride_down) * batch_count);
  std::vector<double> host_up(std::size_t(stride_up) * batch_count, 0.0);
  Batch active{batch_count, running.data()};
  const double eps = std::numeric_limits<T>::epsilon();
  const double unit_roundoff = eps / 2;
  const double first_shift =
      std::min(1.0, 11.0 * (double(n) * m + double(m) * (m + 1)) * unit_roundoff);  // shifted Cholesky QR
  const double second_shift = 2.0 * m * unit_roundoff;  // keeps zero (soft-locked) columns defined
  const double coefficient_drop = 1e-2;

  auto project_w = [&]() {  // W −= [X, P]([X, P]ᵀ W)
    backend.gemm('T', 'N', 2 * m, m, n, T(1), basis.get(), n, stride_basis, w_slot, n, stride_basis, T(0), work.get(),
                 2 * m, stride_work, active);
    backend.gemm('N', 'N', n, m, 2 * m, T(-1), basis.get(), n, stride_basis, work.get(), 2 * m, stride_work, T(1),
                 w_slot, n, stride_basis, active);
  };
  auto cholesky_qr_w = [&](double shift) {
    backend.gemm('T', 'N', m, m, n, T(1), w_slot, n, stride_basis, w_slot, n, stride_basis, T(0), gram_w, m,
                 stride_work, active);
    backend.shift_diagonal(m, gram_w, m, stride_work, shift, active);
    backend.cholesky_upper(m, gram_w, m, stride_work, active);
    backend.trsm_right_upper(n, m, gram_w, m, stride_work, w_slot, n, stride_basis, active);
  };
  // W orthonormal and orthogonal to [X, P] (to rounding), AW, and the products the host reads.
  auto search_block_and_products = [&]() {
    project_w();
    project_w();
    cholesky_qr_w(first_shift);
    project_w();
    cholesky_qr_w(second_shift);
    op.apply(w_slot, n, stride_basis, aw_slot, n, stride_basis, m, sign, active);
    backend.gemm('T', 'N', s, s, n, T(1), basis.get(), n, stride_basis, basis.get(), n, stride_basis, T(0),
                 down.get() + mm, s, stride_down, active);
    backend.gemm('T', 'N', s, s, n, T(1), basis.get(), n, stride_basis, applied.get(), n, stride_basis, T(0),
                 down.get() + mm + ss, s, stride_down, active);
    backend.to_host(host_down.data(), down.get(), host_down.size());
  };

  // Rayleigh–Ritz of problem b from its downloaded products: writes K, diag(Θ) and the
  // next soft-locking threshold into its upload slot.
  auto rayleigh_ritz = [&](int b) {
    const double* gram = host_down.data() + std::size_t(b) * stride_down + mm;
    const double* projected = gram + ss;
    double* kb = host_up.data() + std::size_t(b) * stride_up;
    std::fill(kb, kb + stride_up, 0.0);
    for (std::int64_t i = 0; i < 2 * ss; ++i)
      if (!std::isfinite(gram[i]))
        throw BackendError("LOBPCG: non-finite values in the Rayleigh quotient (problem " +
                           std::to_string(options.first_problem + b) + ")");
    std::vector<int> candidates;
    if (x_valid[b])
      for (int j = 0; j < m; ++j) candidates.push_back(j);
    const int x_candidates = int(candidates.size());
    for (int j = 0; j < p_count[b]; ++j) candidates.push_back(m + j);
    for (int j = 0; j < m; ++j) candidates.push_back(2 * m + j);
    int v = 0, x_kept = 0;
    const std::vector<double> t =
        coefficient_gram_schmidt(s, gram, candidates, x_candidates, coefficient_drop, v, x_kept);
    if (v < m)
      throw BackendError("LOBPCG: the search space lost rank (" + std::to_string(v) + " < block " +
                         std::to_string(m) + " directions); the operator may be non-finite");
    // h = tᵀ (SᵀAS) t, symmetrized
    std::vector<double> ht(std::size_t(s) * v), h(std::size_t(v) * v), values(v);
    host_gemm('N', 'N', s, v, s, 1.0, projected, s, t.data(), s, 0.0, ht.data(), s);
    host_gemm('T', 'N', v, v, s, 1.0, t.data(), s, ht.data(), s, 0.0, h.data(), v);
    for (int j = 0; j < v; ++j)
      for (int i = 0; i < j; ++i) {
        const double mean = 0.5 * (h[i + std::size_t(j) * v] + h[j + std::size_t(i) * v]);
        h[i + std::size_t(j) * v] = h[j + std::size_t(i) * v] = mean;
      }
    host_symmetric_eig(v, h.data(), v, values.data());
    for (int j = 0; j < v; ++j) report.norm_estimate[b] = std::max(report.norm_estimate[b], std::fabs(values[j]));
    for (int j = 0; j < m; ++j) theta[std::size_t(b) * m + j] = values[j];
    // Q = Y with the old-X coordinates zeroed, orthogonalized against Y (twice), orthonormalized.
    std::vector<double> q, q_gram, transform(std::size_t(m) * m);
    p_coefficients(v, m, h.data(), x_kept, q, q_gram);
    const int kept = x_valid[b] ? svqb_transform(m, q_gram.data(), 1e-24, transform.data()) : 0;
    // K = t [Y | Q T_q] in S coordinates
    for (int j = 0; j < m + kept; ++j) {
      std::vector<double> column(v, 0.0);
      if (j < m) {
        for (int i = 0; i < v; ++i) column[i] = h[i + std::size_t(j) * v];
      } else {
        for (int l = 0; l < m; ++l) {
          const double factor = transform[l + std::size_t(j - m) * m];
          for (int i = 0; i < v; ++i) column[i] += q[i + std::size_t(l) * v] * factor;
        }
      }
      for (int i = 0; i < v; ++i) {
        if (column[i] == 0.0) continue;
        for (int l = 0; l < s; ++l) kb[l + std::size_t(j) * s] += t[l + std::size_t(i) * s] * column[i];
      }
    }
    p_count[b] = kept;
    x_valid[b] = 1;
    double wanted_scale = 0;
    for (int j = 0; j < m; ++j) {
      kb[theta_at + j + std::int64_t(j) * m] = theta[std::size_t(b) * m + j];
      wanted_scale = std::max(wanted_scale, std::fabs(theta[std::size_t(b) * m + j]));
    }
    // the threshold as the backend compares it (in T)
    kb[threshold_at] = double(T(convergence_threshold(tol, wanted_scale, report.norm_estimate[b], eps)));
  };
  auto keep_block = [&](int b) {  // a stopped problem: K keeps X and P as they are
    double* kb = host_up.data() + std::size_t(b) * stride_up;
    std::fill(kb, kb + stride_up, 0.0);
    for (int j = 0; j < 2 * m; ++j) kb[j + std::size_t(j) * s] = 1.0;
  };

  // Start: the start block (lobpcg.hpp) as W, X and P empty.
  fill_start_block(backend, options, n, m, batch_count, scratch.get(), w_slot, stride_basis);
  search_block_and_products();
  for (int b = 0; b < batch_count; ++b) rayleigh_ritz(b);
  backend.from_host(up.get(), host_up.data(), host_up.size());

  StagnationWatch watch(batch_count, stagnation_window(options.max_iter));
  for (int iteration = 0;; ++iteration) {
    // [X | P] ← S K, [AX | AP] ← AS K
    backend.gemm('N', 'N', n, 2 * m, s, T(1), basis.get(), n, stride_basis, up.get(), s, stride_up, T(0),
                 next_basis.get(), n, stride_pair, active);
    backend.gemm('N', 'N', n, 2 * m, s, T(1), applied.get(), n, stride_basis, up.get(), s, stride_up, T(0),
                 next_applied.get(), n, stride_pair, active);
    backend.copy_block(n, 2 * m, next_basis.get(), n, stride_pair, basis.get(), n, stride_basis, active);
    backend.copy_block(n, 2 * m, next_applied.get(), n, stride_pair, applied.get(), n, stride_basis, active);
    // R = AX − XΘ, RᵀR, W from R (soft locking), W ← P W
    backend.copy_block(n, m, applied.get(), n, stride_basis, residual.get(), n, stride_block, active);
    backend.gemm('N', 'N', n, m, m, T(-1), x_slot, n, stride_basis, up.get() + theta_at, m, stride_up, T(1),
                 residual.get(), n, stride_block, active);
    backend.gemm('T', 'N', m, m, n, T(1), residual.get(), n, stride_block, residual.get(), n, stride_block, T(0),
                 down.get(), m, stride_down, active);
    backend.select_columns(n, m, residual.get(), n, stride_block, down.get(), m, stride_down, up.get() + threshold_at,
                           stride_up, k, w_slot, n, stride_basis, active);
    if (op.precondition(w_slot, n, stride_basis, scratch.get(), n, stride_block, m, active))
      backend.copy_block(n, m, scratch.get(), n, stride_block, w_slot, n, stride_basis, active);
    search_block_and_products();  // the one exchange of the iteration (download ...)

    bool any_running = false;
    for (int b = 0; b < batch_count; ++b) {
      if (!running[b]) {
        keep_block(b);
        continue;
      }
      const double* rr = host_down.data() + std::size_t(b) * stride_down;
      double wanted_scale = 0;
      for (int j = 0; j < m; ++j) wanted_scale = std::max(wanted_scale, std::fabs(theta[std::size_t(b) * m + j]));
      const double threshold = convergence_threshold(tol, wanted_scale, report.norm_estimate[b], eps);
      bool all_wanted = true;
      double worst = 0;  // the largest wanted residual, in thresholds
      for (int j = 0; j < k; ++j) {
        const double norm = std::sqrt(std::max(0.0, rr[j + std::size_t(j) * m]));
        report.residual_norms[std::size_t(b) * k + j] = norm;
        all_wanted = all_wanted && norm <= threshold;
        worst = std::max(worst, norm / threshold);
      }
      report.iterations[b] = iteration;
      if (all_wanted || iteration >= options.max_iter || watch.stagnated(b, iteration, worst, &theta[std::size_t(b) * m], k, eps, report.norm_estimate[b])) {
        report.converged[b] = all_wanted;
        running[b] = 0;
        keep_block(b);
        continue;
      }
      any_running = true;
      rayleigh_ritz(b);
    }
    if (!any_running) break;
    backend.from_host(up.get(), host_up.data(), host_up.size());  // (... and upload)
  }

  for (int b = 0; b < batch_count; ++b)
    for (int j = 0; j < k; ++j) report.eigenvalues[std::size_t(b) * k + j] = double(sign) * theta[std::size_t(b) * m + j];
  Batch all{batch_count, nullptr};
  backend.copy_block(n, k, x_slot, n, stride_basis, eigenvectors, n, std::int64_t(n) * k, all);
  backend.synchronize();
}

}  // namespace detail
