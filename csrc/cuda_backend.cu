// CUDA backend of the LOBPCG solver: n-sized data in device memory, products
// by cuBLAS (strided-batched GEMM, batched TRSM), Cholesky of the small blocks by
// cuSOLVER (potrfBatched), the dense fallback by cuSOLVER (syevd), block copies
// and the small elementwise steps by the kernels below. Both libraries are loaded
// with dlopen on first use, so the module imports on machines without CUDA; the
// CUDA runtime is linked statically.
// All work is queued on the caller's stream (torch.cuda.current_stream()); the
// solver waits on it only in to_host (one small download per LOBPCG iteration in
// the one-exchange variant, through pinned memory). Memory is stream-ordered
// (cudaMallocAsync/cudaFreeAsync), so releasing a buffer does not wait either.
// cuBLAS/cuSOLVER handles, the pinned staging buffer and its event are cached per
// device in a pool (one context per concurrent solve, never destroyed), so a solve
// neither creates nor destroys a handle (cublasDestroy synchronizes the device).
// The cuBLAS/cuSOLVER declarations below are our own (their headers are not
// needed to build): opaque handles, the enums' documented values, and the
// C entry points we call.
#include <cuda_runtime.h>
#include <dlfcn.h>

#include <algorithm>
#include <cstdio>
#include <map>
#include <memory>
#include <limits>
#include <mutex>
#include <tuple>
#include <string>
#include <vector>

#include "backend.hpp"
#include "solve.hpp"

namespace lora_da {
namespace {

// ---- cuBLAS / cuSOLVER declarations (ABI as documented) ----
using cublasHandle_t = struct cublasContext*;
using cusolverDnHandle_t = struct cusolverDnContext*;
using cublasStatus_t = int;    // CUBLAS_STATUS_SUCCESS = 0
using cusolverStatus_t = int;  // CUSOLVER_STATUS_SUCCESS = 0
enum cublasOperation_t { CUBLAS_OP_N = 0, CUBLAS_OP_T = 1 };
enum cublasSideMode_t { CUBLAS_SIDE_LEFT = 0, CUBLAS_SIDE_RIGHT = 1 };
enum cublasFillMode_t { CUBLAS_FILL_MODE_LOWER = 0, CUBLAS_FILL_MODE_UPPER = 1 };
enum cublasDiagType_t { CUBLAS_DIAG_NON_UNIT = 0, CUBLAS_DIAG_UNIT = 1 };
enum cusolverEigMode_t { CUSOLVER_EIG_MODE_NOVECTOR = 0, CUSOLVER_EIG_MODE_VECTOR = 1 };

template <typename T>
using GemmStridedBatched = cublasStatus_t (*)(cublasHandle_t, cublasOperation_t, cublasOperation_t, int, int, int,
                                              const T*, const T*, int, long long, const T*, int, long long, const T*,
                                              T*, int, long long, int);
template <typename T>
using Trsm = cublasStatus_t (*)(cublasHandle_t, cublasSideMode_t, cublasFillMode_t, cublasOperation_t,
                                cublasDiagType_t, int, int, const T*, const T*, int, T*, int);
template <typename T>
using TrsmBatched = cublasStatus_t (*)(cublasHandle_t, cublasSideMode_t, cublasFillMode_t, cublasOperation_t,
                                       cublasDiagType_t, int, int, const T*, const T* const*, int, T* const*, int, int);
template <typename T>
using PotrfBatched = cusolverStatus_t (*)(cusolverDnHandle_t, cublasFillMode_t, int, T**, int, int*, int);
template <typename T>
using SyevdBufferSize = cusolverStatus_t (*)(cusolverDnHandle_t, cusolverEigMode_t, cublasFillMode_t, int, const T*,
                                             int, const T*, int*);
template <typename T>
using Syevd = cusolverStatus_t (*)(cusolverDnHandle_t, cusolverEigMode_t, cublasFillMode_t, int, T*, int, T*, T*, int,
                                   int*);

struct CudaLibraries {
  cublasStatus_t (*cublas_create)(cublasHandle_t*) = nullptr;
  cublasStatus_t (*cublas_destroy)(cublasHandle_t) = nullptr;
  cublasStatus_t (*cublas_set_stream)(cublasHandle_t, cudaStream_t) = nullptr;
  GemmStridedBatched<float> sgemm = nullptr;
  GemmStridedBatched<double> dgemm = nullptr;
  Trsm<float> strsm = nullptr;
  Trsm<double> dtrsm = nullptr;
  TrsmBatched<float> strsm_batched = nullptr;
  TrsmBatched<double> dtrsm_batched = nullptr;
  cusolverStatus_t (*cusolver_create)(cusolverDnHandle_t*) = nullptr;
  cusolverStatus_t (*cusolver_destroy)(cusolverDnHandle_t) = nullptr;
  cusolverStatus_t (*cusolver_set_stream)(cusolverDnHandle_t, cudaStream_t) = nullptr;
  SyevdBufferSize<float> ssyevd_size = nullptr;
  SyevdBufferSize<double> dsyevd_size = nullptr;
  Syevd<float> ssyevd = nullptr;
  Syevd<double> dsyevd = nullptr;
  PotrfBatched<float> spotrf_batched = nullptr;
  PotrfBatched<double> dpotrf_batched = nullptr;
  std::string error;
};

void* open_first(const std::vector<const char*>& names, std::string& tried) {
  for (const char* name : names) {
    void* handle = dlopen(name, RTLD_NOW | RTLD_LOCAL);
    if (handle != nullptr) return handle;
    tried += std::string(" ") + name;
  }
  return nullptr;
}

template <typename F>
void bind(void* library, const char* symbol, F& target, std::string& error) {
  target = reinterpret_cast<F>(dlsym(library, symbol));
  if (target == nullptr && error.empty()) error = std::string("symbol ") + symbol + " not found";
}

const CudaLibraries& libraries() {
  static CudaLibraries libs;
  static std::once_flag once;
  std::call_once(once, []() {
    std::string tried;
    // Newest first (cuSOLVER's sonames run one behind cuBLAS's: libcusolver.so.12
    // ships with CUDA 13, .11 with CUDA 11 and 12; .13 is tried last); a copy
    // already loaded by torch is found by its soname.
    void* cublas = open_first({"libcublas.so.13", "libcublas.so.12", "libcublas.so.11", "libcublas.so"}, tried);
    void* cusolver =
        open_first({"libcusolver.so.12", "libcusolver.so.11", "libcusolver.so.13", "libcusolver.so"}, tried);
    if (cublas == nullptr || cusolver == nullptr) {
      libs.error = "could not load cuBLAS/cuSOLVER (tried:" + tried + ")";
      return;
    }
    bind(cublas, "cublasCreate_v2", libs.cublas_create, libs.error);
    bind(cublas, "cublasDestroy_v2", libs.cublas_destroy, libs.error);
    bind(cublas, "cublasSetStream_v2", libs.cublas_set_stream, libs.error);
    bind(cublas, "cublasSgemmStridedBatched", libs.sgemm, libs.error);
    bind(cublas, "cublasDgemmStridedBatched", libs.dgemm, libs.error);
    bind(cublas, "cublasStrsm_v2", libs.strsm, libs.error);
    bind(cublas, "cublasDtrsm_v2", libs.dtrsm, libs.error);
    bind(cublas, "cublasStrsmBatched", libs.strsm_batched, libs.error);
    bind(cublas, "cublasDtrsmBatched", libs.dtrsm_batched, libs.error);
    bind(cusolver, "cusolverDnCreate", libs.cusolver_create, libs.error);
    bind(cusolver, "cusolverDnDestroy", libs.cusolver_destroy, libs.error);
    bind(cusolver, "cusolverDnSetStream", libs.cusolver_set_stream, libs.error);
    bind(cusolver, "cusolverDnSsyevd_bufferSize", libs.ssyevd_size, libs.error);
    bind(cusolver, "cusolverDnDsyevd_bufferSize", libs.dsyevd_size, libs.error);
    bind(cusolver, "cusolverDnSsyevd", libs.ssyevd, libs.error);
    bind(cusolver, "cusolverDnDsyevd", libs.dsyevd, libs.error);
    bind(cusolver, "cusolverDnSpotrfBatched", libs.spotrf_batched, libs.error);
    bind(cusolver, "cusolverDnDpotrfBatched", libs.dpotrf_batched, libs.error);
  });
  if (!libs.error.empty()) throw BackendError(libs.error);
  return libs;
}

void check_cuda(cudaError_t status, const char* what) {
  if (status != cudaSuccess)
    throw BackendError(std::string(what) + " failed: " + cudaGetErrorName(status) + " (" + cudaGetErrorString(status) + ")");
}
void check_cublas(cublasStatus_t status, const char* what) {
  if (status != 0) throw BackendError(std::string(what) + " failed with cuBLAS status " + std::to_string(status));
}
void check_cusolver(cusolverStatus_t status, const char* what) {
  if (status != 0) throw BackendError(std::string(what) + " failed with cuSOLVER status " + std::to_string(status));
}

cublasOperation_t to_op(char trans) { return (trans == 'T' || trans == 't') ? CUBLAS_OP_T : CUBLAS_OP_N; }
cublasFillMode_t to_fill(char uplo) { return (uplo == 'U' || uplo == 'u') ? CUBLAS_FILL_MODE_UPPER : CUBLAS_FILL_MODE_LOWER; }

// ---- Kernels (64-bit indices; grid-stride loops) ----

constexpr int kThreads = 256;

int blocks_for(std::int64_t work) {
  const std::int64_t blocks = (work + kThreads - 1) / kThreads;
  return int(std::max<std::int64_t>(1, std::min<std::int64_t>(blocks, 65535)));
}

// dst[b] = alpha src[b] + beta dst[b] (beta == 0: dst is overwritten, not read).
template <typename T>
__global__ void block_update_kernel(int rows, int cols, T alpha, const T* src, int ld_src, std::int64_t stride_src,
                                    T beta, T* dst, int ld_dst, std::int64_t stride_dst, int count) {
  const std::int64_t per_problem = std::int64_t(rows) * cols;
  const std::int64_t total = per_problem * count;
  for (std::int64_t index = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; index < total;
       index += std::int64_t(gridDim.x) * blockDim.x) {
    const std::int64_t b = index / per_problem;
    const std::int64_t within = index - b * per_problem;
    const std::int64_t j = within / rows;
    const std::int64_t i = within - j * rows;
    const T value = alpha * src[b * stride_src + i + j * ld_src];
    T* target = dst + b * stride_dst + i + j * ld_dst;
    *target = beta == T(0) ? value : value + beta * *target;
  }
}

// Backend::select_columns.
template <typename T>
__global__ void select_columns_kernel(int rows, int cols, const T* src, int ld_src, std::int64_t stride_src,
                                      const T* gram, int ld_gram, std::int64_t stride_gram, const T* threshold,
                                      std::int64_t stride_threshold, int locked, T* dst, int ld_dst,
                                      std::int64_t stride_dst, int count) {
  const std::int64_t per_problem = std::int64_t(rows) * cols;
  const std::int64_t total = per_problem * count;
  for (std::int64_t index = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; index < total;
       index += std::int64_t(gridDim.x) * blockDim.x) {
    const std::int64_t b = index / per_problem;
    const std::int64_t within = index - b * per_problem;
    const std::int64_t j = within / rows;
    const std::int64_t i = within - j * rows;
    const T square = gram[b * stride_gram + j + j * ld_gram];
    const T norm = sqrt(square > T(0) ? square : T(0));
    const bool keep = norm > T(0) && !(j < locked && norm <= threshold[b * stride_threshold]);
    dst[b * stride_dst + i + j * ld_dst] = keep ? src[b * stride_src + i + j * ld_src] / norm : T(0);
  }
}

// Backend::shift_diagonal: one thread per problem (m is a block size, small).
template <typename T>
__global__ void shift_diagonal_kernel(int m, T* a, int lda, std::int64_t stride, T relative, T smallest, int count) {
  for (std::int64_t b = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; b < count;
       b += std::int64_t(gridDim.x) * blockDim.x) {
    T* ab = a + b * stride;
    T trace = 0;
    for (int j = 0; j < m; ++j) trace += ab[j + std::int64_t(j) * lda];
    T shift = relative * trace;
    if (!(shift > T(0))) shift = smallest;
    for (int j = 0; j < m; ++j) ab[j + std::int64_t(j) * lda] += shift;
  }
}

// ---- Per-device contexts (handles, pinned staging), pooled ----

struct CudaContext {
  int device = -1;
  cublasHandle_t cublas = nullptr;
  cusolverDnHandle_t cusolver = nullptr;
  void* pinned = nullptr;  // staging for to_host / from_host
  std::size_t pinned_bytes = 0;
  cudaEvent_t upload_done = nullptr;  // the last upload has finished reading `pinned`
  bool stream_ordered_memory = false;
};

class ContextPool {
 public:
  std::unique_ptr<CudaContext> acquire(const CudaLibraries& libs) {
    int device = 0;
    check_cuda(cudaGetDevice(&device), "cudaGetDevice");
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto& free = free_[device];
      if (!free.empty()) {
        std::unique_ptr<CudaContext> context = std::move(free.back());
        free.pop_back();
        return context;
      }
    }
    auto context = std::make_unique<CudaContext>();
    context->device = device;
    check_cublas(libs.cublas_create(&context->cublas), "cublasCreate");
    check_cuda(cudaEventCreateWithFlags(&context->upload_done, cudaEventDisableTiming), "cudaEventCreate");
    int pools = 0;
    check_cuda(cudaDeviceGetAttribute(&pools, cudaDevAttrMemoryPoolsSupported, device), "cudaDeviceGetAttribute");
    context->stream_ordered_memory = pools != 0;
    return context;
  }
  // Kept for the next solve on this device (handles are never destroyed: destroying one
  // synchronizes the device, and the process keeps at most one per concurrent solve).
  void give_back(std::unique_ptr<CudaContext> context) noexcept {
    if (!context) return;
    try {
      std::lock_guard<std::mutex> lock(mutex_);
      free_[context->device].push_back(std::move(context));
    } catch (...) {  // out of memory growing the list: the context leaks, nothing else
    }
  }

 private:
  std::mutex mutex_;
  std::map<int, std::vector<std::unique_ptr<CudaContext>>> free_;
};

ContextPool& context_pool() {
  static ContextPool* pool = new ContextPool();  // never destroyed (used until the process exits)
  return *pool;
}

// Every status is checked. release() cannot throw: it records the first
// failure instead, and finish(), which ends every successful solve, reports it.
template <typename T>
class CudaBackend final : public Backend<T> {
 public:
  explicit CudaBackend(cudaStream_t stream) : libs_(libraries()), stream_(stream) {
    context_ = context_pool().acquire(libs_);
    cublasStatus_t cublas_status = libs_.cublas_set_stream(context_->cublas, stream_);
    cusolverStatus_t cusolver_status =
        context_->cusolver != nullptr ? libs_.cusolver_set_stream(context_->cusolver, stream_) : 0;
    if (cublas_status != 0 || cusolver_status != 0) {
      // The destructor does not run when the constructor throws: give the context back here.
      context_pool().give_back(std::move(context_));
      check_cublas(cublas_status, "cublasSetStream");
      check_cusolver(cusolver_status, "cusolverDnSetStream");
    }
  }
  // Returns the context to the pool. When the solve threw, the stream may still use the
  // pinned buffer: wait for it first (statuses dropped: the error propagating is reported).
  ~CudaBackend() override {
    if (!finished_) {
      (void)cudaStreamSynchronize(stream_);
      for (auto& entry : pointer_arrays_) (void)cudaFree(entry.second);
      if (info_device_ != nullptr) (void)cudaFree(info_device_);
      if (info_host_ != nullptr) (void)cudaFreeHost(info_host_);
    }
    context_pool().give_back(std::move(context_));
  }
  // Ends a successful solve: frees what the solve allocated for itself and reports any
  // failure recorded by a call that could not throw.
  void finish() {
    check_pending_info();
    check_cuda(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
    for (auto& entry : pointer_arrays_) check_cuda(cudaFree(entry.second), "cudaFree");
    pointer_arrays_.clear();
    if (info_device_ != nullptr) check_cuda(cudaFree(info_device_), "cudaFree");
    if (info_host_ != nullptr) check_cuda(cudaFreeHost(info_host_), "cudaFreeHost");
    info_device_ = nullptr;
    info_host_ = nullptr;
    finished_ = true;
    check_cuda(deferred_status_, deferred_what_);
  }
  std::string name() const override { return "cuda-cublas-cusolver"; }

  T* allocate(std::size_t count) override {
    void* data = nullptr;
    const std::size_t bytes = std::max<std::size_t>(count, 1) * sizeof(T);
    if (context_->stream_ordered_memory)
      check_cuda(cudaMallocAsync(&data, bytes, stream_), "cudaMallocAsync");
    else
      check_cuda(cudaMalloc(&data, bytes), "cudaMalloc");
    cudaError_t status = cudaMemsetAsync(data, 0, bytes, stream_);
    if (status != cudaSuccess) {
      release(static_cast<T*>(data));  // the memset failure is the error reported
      check_cuda(status, "cudaMemsetAsync");
    }
    return static_cast<T*>(data);
  }
  void release(T* data) noexcept override {
    if (data == nullptr) return;
    if (context_->stream_ordered_memory) {
      record_cuda(cudaFreeAsync(data, stream_), "cudaFreeAsync");
    } else {
      record_cuda(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");  // the stream may still use it
      record_cuda(cudaFree(data), "cudaFree");
    }
  }
  std::size_t available_memory() override {
    std::size_t free_bytes = 0, total_bytes = 0;
    check_cuda(cudaMemGetInfo(&free_bytes, &total_bytes), "cudaMemGetInfo");
    return std::max<std::size_t>(free_bytes, 1);
  }
  void copy_block(int rows, int cols, const T* src, int ld_src, std::int64_t stride_src, T* dst, int ld_dst,
                  std::int64_t stride_dst, const Batch& batch) override {
    if (src == dst && ld_src == ld_dst && stride_src == stride_dst) return;
    update_block(rows, cols, T(1), src, ld_src, stride_src, T(0), dst, ld_dst, stride_dst, batch);
  }
  void add_block(int rows, int cols, T alpha, const T* src, int ld_src, std::int64_t stride_src, T beta, T* dst,
                 int ld_dst, std::int64_t stride_dst, const Batch& batch) override {
    update_block(rows, cols, alpha, src, ld_src, stride_src, beta, dst, ld_dst, stride_dst, batch);
  }
  void gemm(char trans_a, char trans_b, int m, int n, int k, T alpha, const T* a, int lda, std::int64_t stride_a,
            const T* b, int ldb, std::int64_t stride_b, T beta, T* c, int ldc, std::int64_t stride_c,
            const Batch& batch) override {
    if (m == 0 || n == 0 || batch.count == 0) return;
    check_cublas(gemm_routine()(context_->cublas, to_op(trans_a), to_op(trans_b), m, n, k, &alpha, a, lda, stride_a, b,
                                ldb, stride_b, &beta, c, ldc, stride_c, batch.count),
                 "cublas?gemmStridedBatched");
  }
  // Used by the operator form and when forming Ω (each problem has its own alpha).
  void trsm_left(char uplo, char trans, int m, int n, const double* alpha_per_problem, const T* a, int lda,
                 std::int64_t stride_a, T* b, int ldb, std::int64_t stride_b, const Batch& batch) override {
    if (m == 0 || n == 0) return;
    for (int p = 0; p < batch.count; ++p) {
      T alpha = T(alpha_per_problem[p]);
      check_cublas(trsm_routine()(context_->cublas, CUBLAS_SIDE_LEFT, to_fill(uplo), to_op(trans),
                                  CUBLAS_DIAG_NON_UNIT, m, n, &alpha, a + p * stride_a, lda, b + p * stride_b, ldb),
                   "cublas?trsm");
    }
  }
  void select_columns(int rows, int cols, const T* src, int ld_src, std::int64_t stride_src, const T* gram,
                      int ld_gram, std::int64_t stride_gram, const T* threshold, std::int64_t stride_threshold,
                      int locked, T* dst, int ld_dst, std::int64_t stride_dst, const Batch& batch) override {
    if (rows == 0 || cols == 0 || batch.count == 0) return;
    select_columns_kernel<T><<<blocks_for(std::int64_t(rows) * cols * batch.count), kThreads, 0, stream_>>>(
        rows, cols, src, ld_src, stride_src, gram, ld_gram, stride_gram, threshold, stride_threshold, locked, dst,
        ld_dst, stride_dst, batch.count);
    check_cuda(cudaGetLastError(), "select_columns_kernel launch");
  }
  void shift_diagonal(int m, T* a, int lda, std::int64_t stride, double relative, const Batch& batch) override {
    if (m == 0 || batch.count == 0) return;
    shift_diagonal_kernel<T><<<blocks_for(batch.count), kThreads, 0, stream_>>>(
        m, a, lda, stride, T(relative), std::numeric_limits<T>::min(), batch.count);
    check_cuda(cudaGetLastError(), "shift_diagonal_kernel launch");
  }
  // potrfBatched's info goes to device memory; to_host reads it with the data it downloads
  // (no wait of its own) and throws for a problem that was active.
  void cholesky_upper(int m, T* a, int lda, std::int64_t stride, const Batch& batch) override {
    if (m == 0 || batch.count == 0) return;
    ensure_cusolver();
    if (info_slots_used_ == kInfoSlots) check_pending_info();  // more than the slots between two downloads
    if (info_device_ == nullptr) {
      check_cuda(cudaMalloc(reinterpret_cast<void**>(&info_device_), sizeof(int) * kInfoSlots * batch.count), "cudaMalloc");
      check_cuda(cudaMallocHost(reinterpret_cast<void**>(&info_host_), sizeof(int) * kInfoSlots * batch.count),
                 "cudaMallocHost");
      info_count_ = batch.count;
    }
    if (batch.count > info_count_) throw BackendError("cholesky_upper: batch larger than the first call's");
    T** pointers = pointer_array(a, stride, batch.count);
    check_cusolver(potrf_routine()(context_->cusolver, CUBLAS_FILL_MODE_UPPER, m, pointers, lda,
                                   info_device_ + std::size_t(info_slots_used_) * info_count_, batch.count),
                   "cusolverDn?potrfBatched");
    info_active_[info_slots_used_].assign(batch.count, 1);
    for (int p = 0; p < batch.count; ++p) info_active_[info_slots_used_][p] = batch.is_active(p) ? 1 : 0;
    ++info_slots_used_;
  }
  void trsm_right_upper(int rows, int m, const T* u, int ldu, std::int64_t stride_u, T* b, int ldb,
                        std::int64_t stride_b, const Batch& batch) override {
    if (rows == 0 || m == 0 || batch.count == 0) return;
    const T one = T(1);
    T** u_pointers = pointer_array(const_cast<T*>(u), stride_u, batch.count);
    T** b_pointers = pointer_array(b, stride_b, batch.count);
    check_cublas(trsm_batched_routine()(context_->cublas, CUBLAS_SIDE_RIGHT, CUBLAS_FILL_MODE_UPPER, CUBLAS_OP_N,
                                        CUBLAS_DIAG_NON_UNIT, rows, m, &one, u_pointers, ldu, b_pointers, ldb,
                                        batch.count),
                 "cublas?trsmBatched");
  }
  void syevd(int n, T* a, int lda, std::int64_t stride_a, T* w, std::int64_t stride_w, const Batch& batch) override {
    if (n == 0) return;
    ensure_cusolver();
    int lwork = 0;
    check_cusolver(size_routine()(context_->cusolver, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_LOWER, n, a, lda, w,
                                  &lwork),
                   "cusolverDn?syevd_bufferSize");
    DeviceBuffer<T> work(*this, std::size_t(std::max(lwork, 1)));
    int* info_device = nullptr;
    check_cuda(cudaMalloc(reinterpret_cast<void**>(&info_device), sizeof(int) * std::size_t(batch.count)),
               "cudaMalloc");
    try {
      for (int p = 0; p < batch.count; ++p)
        check_cusolver(syevd_routine()(context_->cusolver, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_LOWER, n,
                                       a + p * stride_a, lda, w + p * stride_w, work.get(), lwork, info_device + p),
                       "cusolverDn?syevd");
      std::vector<int> info(batch.count);
      check_cuda(cudaMemcpyAsync(info.data(), info_device, sizeof(int) * std::size_t(batch.count),
                                 cudaMemcpyDeviceToHost, stream_),
                 "cudaMemcpyAsync (info)");
      check_cuda(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
      for (int p = 0; p < batch.count; ++p)
        if (info[p] != 0)
          throw BackendError("cusolverDn?syevd failed on problem " + std::to_string(p) + ", info=" + std::to_string(info[p]));
    } catch (...) {
      record_cuda(cudaFree(info_device), "cudaFree");  // the error being rethrown is the one reported
      throw;
    }
    check_cuda(cudaFree(info_device), "cudaFree");
  }
  void synchronize() override { check_cuda(cudaStreamSynchronize(stream_), "cudaStreamSynchronize"); }

 protected:
  // One copy into the pinned buffer and one wait (which also covers the pending potrf infos).
  void download(double* host, const T* data, std::size_t count) override {
    if (count == 0) return;
    ensure_pinned(count * sizeof(T));
    check_cuda(cudaMemcpyAsync(context_->pinned, data, count * sizeof(T), cudaMemcpyDeviceToHost, stream_),
               "cudaMemcpyAsync (device to host)");
    const int slots = info_slots_used_;
    if (slots > 0)
      check_cuda(cudaMemcpyAsync(info_host_, info_device_, sizeof(int) * std::size_t(slots) * info_count_,
                                 cudaMemcpyDeviceToHost, stream_),
                 "cudaMemcpyAsync (potrf info)");
    check_cuda(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
    info_slots_used_ = 0;
    check_info(slots);
    const T* staged = static_cast<const T*>(context_->pinned);
    for (std::size_t i = 0; i < count; ++i) host[i] = double(staged[i]);
  }
  // Converted into the pinned buffer and copied asynchronously; the next transfer waits
  // for this copy only if it has not finished (the event).
  void upload(T* data, const double* host, std::size_t count) override {
    if (count == 0) return;
    ensure_pinned(count * sizeof(T));
    check_cuda(cudaEventSynchronize(context_->upload_done), "cudaEventSynchronize");
    T* staged = static_cast<T*>(context_->pinned);
    for (std::size_t i = 0; i < count; ++i) staged[i] = T(host[i]);
    check_cuda(cudaMemcpyAsync(data, staged, count * sizeof(T), cudaMemcpyHostToDevice, stream_),
               "cudaMemcpyAsync (host to device)");
    check_cuda(cudaEventRecord(context_->upload_done, stream_), "cudaEventRecord");
  }

 private:
  static constexpr int kInfoSlots = 8;

  GemmStridedBatched<T> gemm_routine() const;
  Trsm<T> trsm_routine() const;
  TrsmBatched<T> trsm_batched_routine() const;
  PotrfBatched<T> potrf_routine() const;
  SyevdBufferSize<T> size_routine() const;
  Syevd<T> syevd_routine() const;

  void update_block(int rows, int cols, T alpha, const T* src, int ld_src, std::int64_t stride_src, T beta, T* dst,
                    int ld_dst, std::int64_t stride_dst, const Batch& batch) {
    if (rows == 0 || cols == 0 || batch.count == 0) return;  // every problem (see backend.hpp)
    block_update_kernel<T><<<blocks_for(std::int64_t(rows) * cols * batch.count), kThreads, 0, stream_>>>(
        rows, cols, alpha, src, ld_src, stride_src, beta, dst, ld_dst, stride_dst, batch.count);
    check_cuda(cudaGetLastError(), "block_update_kernel launch");
  }
  void ensure_cusolver() {
    if (context_->cusolver != nullptr) return;
    check_cusolver(libs_.cusolver_create(&context_->cusolver), "cusolverDnCreate");
    check_cusolver(libs_.cusolver_set_stream(context_->cusolver, stream_), "cusolverDnSetStream");
  }
  // The pinned staging buffer holds at least `bytes` (grown, after any upload using it is done).
  void ensure_pinned(std::size_t bytes) {
    if (bytes <= context_->pinned_bytes) return;
    check_cuda(cudaEventSynchronize(context_->upload_done), "cudaEventSynchronize");
    if (context_->pinned != nullptr) {
      void* old = context_->pinned;
      context_->pinned = nullptr;
      context_->pinned_bytes = 0;
      check_cuda(cudaFreeHost(old), "cudaFreeHost");
    }
    const std::size_t size = std::max<std::size_t>(bytes, 1 << 20);
    check_cuda(cudaMallocHost(&context_->pinned, size), "cudaMallocHost");
    context_->pinned_bytes = size;
  }
  // Device arrays of the problems' addresses base + p * stride (cuBLAS/cuSOLVER batched
  // calls take these), made once per (base, stride, count) for the solve.
  T** pointer_array(T* base, std::int64_t stride, int count) {
    const auto key = std::make_tuple(static_cast<const void*>(base), stride, count);
    auto found = pointer_arrays_.find(key);
    if (found != pointer_arrays_.end()) return static_cast<T**>(found->second);
    std::vector<T*> host(count);
    for (int p = 0; p < count; ++p) host[p] = base + p * stride;
    void* device = nullptr;
    check_cuda(cudaMalloc(&device, sizeof(T*) * std::size_t(count)), "cudaMalloc");
    pointer_arrays_[key] = device;
    check_cuda(cudaMemcpyAsync(device, host.data(), sizeof(T*) * std::size_t(count), cudaMemcpyHostToDevice, stream_),
               "cudaMemcpyAsync (pointer array)");
    check_cuda(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");  // `host` dies here; once per array
    return static_cast<T**>(device);
  }
  void check_pending_info() {
    const int slots = info_slots_used_;
    if (slots == 0) return;
    check_cuda(cudaMemcpyAsync(info_host_, info_device_, sizeof(int) * std::size_t(slots) * info_count_,
                               cudaMemcpyDeviceToHost, stream_),
               "cudaMemcpyAsync (potrf info)");
    check_cuda(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
    info_slots_used_ = 0;
    check_info(slots);
  }
  void check_info(int slots) {
    for (int slot = 0; slot < slots; ++slot)
      for (int p = 0; p < info_count_ && p < int(info_active_[slot].size()); ++p) {
        const int info = info_host_[std::size_t(slot) * info_count_ + p];
        if (info != 0 && info_active_[slot][p])
          throw BackendError("Cholesky factorization of a search block failed (problem " + std::to_string(p) +
                             ", info=" + std::to_string(info) + "): the operator may be non-finite");
      }
  }

  // Keeps the first failure of a call that could not throw (see finish()); no
  // allocation here, finish() builds the message.
  void record_cuda(cudaError_t status, const char* what) noexcept {
    if (status == cudaSuccess || deferred_status_ != cudaSuccess) return;
    deferred_status_ = status;
    deferred_what_ = what;
  }

  const CudaLibraries& libs_;
  cudaStream_t stream_;
  std::unique_ptr<CudaContext> context_;
  std::map<std::tuple<const void*, std::int64_t, int>, void*> pointer_arrays_;
  int* info_device_ = nullptr;
  int* info_host_ = nullptr;
  int info_count_ = 0;
  int info_slots_used_ = 0;
  std::vector<unsigned char> info_active_[kInfoSlots];
  bool finished_ = false;
  cudaError_t deferred_status_ = cudaSuccess;
  const char* deferred_what_ = "";
};

template <> GemmStridedBatched<float> CudaBackend<float>::gemm_routine() const { return libs_.sgemm; }
template <> GemmStridedBatched<double> CudaBackend<double>::gemm_routine() const { return libs_.dgemm; }
template <> Trsm<float> CudaBackend<float>::trsm_routine() const { return libs_.strsm; }
template <> Trsm<double> CudaBackend<double>::trsm_routine() const { return libs_.dtrsm; }
template <> TrsmBatched<float> CudaBackend<float>::trsm_batched_routine() const { return libs_.strsm_batched; }
template <> TrsmBatched<double> CudaBackend<double>::trsm_batched_routine() const { return libs_.dtrsm_batched; }
template <> PotrfBatched<float> CudaBackend<float>::potrf_routine() const { return libs_.spotrf_batched; }
template <> PotrfBatched<double> CudaBackend<double>::potrf_routine() const { return libs_.dpotrf_batched; }
template <> SyevdBufferSize<float> CudaBackend<float>::size_routine() const { return libs_.ssyevd_size; }
template <> SyevdBufferSize<double> CudaBackend<double>::size_routine() const { return libs_.dsyevd_size; }
template <> Syevd<float> CudaBackend<float>::syevd_routine() const { return libs_.ssyevd; }
template <> Syevd<double> CudaBackend<double>::syevd_routine() const { return libs_.dsyevd; }

}  // namespace
}  // namespace lora_da

extern "C" int lora_da_cuda_solve(lora_da_solve_request* request, char* message, size_t message_size) {
  return lora_da::guarded_call(
      [&]() {
        cudaStream_t stream = reinterpret_cast<cudaStream_t>(request->stream);
        if (request->dtype == LORA_DA_FLOAT64) {
          lora_da::CudaBackend<double> backend(stream);
          lora_da::solve_on_backend(backend, *request);
          backend.finish();
        } else {
          lora_da::CudaBackend<float> backend(stream);
          lora_da::solve_on_backend(backend, *request);
          backend.finish();
        }
      },
      message, message_size);
}

extern "C" int lora_da_cuda_compiled(void) { return 1; }
