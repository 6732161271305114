// lora_da._core.gram_lower_accumulate: Z's lower triangle += AᵀA on the host with OpenBLAS's
// dsyrk, for the statistics pass (docs/math.md §2, §5.5): the float64 accumulation of the
// input factor that the default precision needs (§5.6). dsyrk computes one triangle at
// GEMM speed, which torch (no syrk) can only approach with panels of GEMMs: one SmolLM2
// batch of 1024 rows, 0.66 s against 0.84 s on 2 Intel cores (bench/bench_kfac_cpu.py).
//
// Layouts (row-major, as torch hands them): A is rows x d with leading dimension d, which is
// column-major d x rows (Aᵀ); Z is d x d row-major, whose lower triangle is the column-major
// upper one. So the call is dsyrk('U', 'N', d, rows, 1, Aᵀ, d, 1, Z, d) on that view. Entries
// strictly above Z's diagonal (row-major) are not touched.
//
// Threads: OpenBLAS runs single-threaded inside each call (its own pool would spin on the
// cores that torch's threads need next, as in cholesky_cpu.cpp); with `threads` > 1 the
// triangle is cut into q x q blocks (q = threads): q diagonal dsyrk blocks and q(q−1)/2
// off-diagonal dgemm blocks (twice the work each), spread by an OpenMP loop. The core links
// libgomp by its soname, so inside a torch process it shares torch's OpenMP runtime and runs
// on torch's own, still-spinning worker threads: threads of our own (std::thread) had to
// share a core with them right after every torch operation and lost the gain (0.96 s
// against 0.87 s for the panels per SmolLM2 batch; 0.70 s on the OpenMP threads).
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "cpu_backend.hpp"
#include "host_lapack.hpp"  // the scipy_-prefixed OpenBLAS symbols

namespace py = pybind11;

namespace {

constexpr std::int64_t kMaxInt = std::numeric_limits<int>::max();

struct Block {
  int row, col, rows, cols;  // column-major block of Z: rows [row, row + rows), cols [col, col + cols)
};

void gram_lower_accumulate(std::uintptr_t gram, std::uintptr_t rows, std::int64_t num_rows, std::int64_t d,
                           int threads) {
  const std::string name = "gram_lower_accumulate";
  if (d < 1 || d > kMaxInt) throw py::value_error(name + ": d must be in [1, 2^31 - 1], got " + std::to_string(d));
  if (num_rows < 0 || num_rows > kMaxInt)
    throw py::value_error(name + ": num_rows must be in [0, 2^31 - 1], got " + std::to_string(num_rows));
  if (threads < 1) throw py::value_error(name + ": threads must be >= 1, got " + std::to_string(threads));
  if (num_rows == 0) return;
  if (gram == 0 || rows == 0) throw py::value_error(name + ": null gram or rows");
  double* z = reinterpret_cast<double*>(gram);
  const double* a = reinterpret_cast<const double*>(rows);
  const int n = static_cast<int>(d), k = static_cast<int>(num_rows);
  // q blocks per side, none narrower than 64 columns; one block (one call) for small work
  const bool small = double(n) * n * k < 1e7;
  const int q = small ? 1 : std::max(1, std::min(threads, n / 64));
  std::vector<Block> blocks;
  auto edge = [&](int i) { return static_cast<int>(std::int64_t(n) * i / q); };
  for (int i = 0; i < q; ++i)
    for (int j = i + 1; j < q; ++j)  // off-diagonal first: the larger tasks
      blocks.push_back({edge(i), edge(j), edge(i + 1) - edge(i), edge(j + 1) - edge(j)});
  for (int i = 0; i < q; ++i) blocks.push_back({edge(i), edge(i), edge(i + 1) - edge(i), edge(i + 1) - edge(i)});
  py::gil_scoped_release release;
  lora_da::OpenblasThreadsGuard guard(1);
  const double one = 1.0;
  const char upper = 'U', no_trans = 'N', trans = 'T';
  const int count = static_cast<int>(blocks.size());
#pragma omp parallel for num_threads(q) schedule(dynamic, 1)
  for (int index = 0; index < count; ++index) {
    const Block& b = blocks[static_cast<std::size_t>(index)];
    double* c = z + b.row + std::int64_t(b.col) * n;
    if (b.row == b.col) {
      scipy_dsyrk_(&upper, &no_trans, &b.rows, &k, &one, a + b.row, &n, &one, c, &n, 1, 1);
    } else {  // Z[rows, cols] += Aᵀ[rows, :] (Aᵀ[cols, :])ᵀ
      scipy_dgemm_(&no_trans, &trans, &b.rows, &b.cols, &k, &one, a + b.row, &n, a + b.col, &n, &one, c, &n, 1, 1);
    }
  }
}

}  // namespace

void register_gram(py::module_& m) {
  m.def("gram_lower_accumulate", &gram_lower_accumulate, py::arg("gram"), py::arg("rows"), py::arg("num_rows"),
        py::arg("d"), py::arg("threads"),
        "In place, float64: the lower triangle (diagonal included) of the row-major d x d matrix at `gram` "
        "+= AᵀA, A the row-major num_rows x d matrix at `rows` (leading dimension d); entries above the "
        "diagonal are not touched. threads: workers (each running single-threaded OpenBLAS).");
}
