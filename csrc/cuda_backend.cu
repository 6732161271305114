// CUDA backend of the LOBPCG solver: n-sized data in device memory, products
// by cuBLAS (strided-batched GEMM, TRSM, GEAM), the dense fallback by cuSOLVER
// (syevd). Both libraries are loaded with dlopen on first use, so the module
// imports on machines without CUDA; the CUDA runtime is linked statically.
// All work is queued on the caller's stream (torch.cuda.current_stream()).
// The cuBLAS/cuSOLVER declarations below are our own (their headers are not
// needed to build): opaque handles, the enums' documented values, and the
// C entry points we call.
#include <cuda_runtime.h>
#include <dlfcn.h>

#include <cstdio>
#include <mutex>
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
using Geam = cublasStatus_t (*)(cublasHandle_t, cublasOperation_t, cublasOperation_t, int, int, const T*, const T*, int,
                                const T*, const T*, int, T*, int);
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
  Geam<float> sgeam = nullptr;
  Geam<double> dgeam = nullptr;
  cusolverStatus_t (*cusolver_create)(cusolverDnHandle_t*) = nullptr;
  cusolverStatus_t (*cusolver_destroy)(cusolverDnHandle_t) = nullptr;
  cusolverStatus_t (*cusolver_set_stream)(cusolverDnHandle_t, cudaStream_t) = nullptr;
  SyevdBufferSize<float> ssyevd_size = nullptr;
  SyevdBufferSize<double> dsyevd_size = nullptr;
  Syevd<float> ssyevd = nullptr;
  Syevd<double> dsyevd = nullptr;
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
    bind(cublas, "cublasSgeam", libs.sgeam, libs.error);
    bind(cublas, "cublasDgeam", libs.dgeam, libs.error);
    bind(cusolver, "cusolverDnCreate", libs.cusolver_create, libs.error);
    bind(cusolver, "cusolverDnDestroy", libs.cusolver_destroy, libs.error);
    bind(cusolver, "cusolverDnSetStream", libs.cusolver_set_stream, libs.error);
    bind(cusolver, "cusolverDnSsyevd_bufferSize", libs.ssyevd_size, libs.error);
    bind(cusolver, "cusolverDnDsyevd_bufferSize", libs.dsyevd_size, libs.error);
    bind(cusolver, "cusolverDnSsyevd", libs.ssyevd, libs.error);
    bind(cusolver, "cusolverDnDsyevd", libs.dsyevd, libs.error);
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

// Every status is checked. release() cannot throw: it records the first
// failure instead, and finish(), which ends every successful solve, reports it.
template <typename T>
class CudaBackend final : public Backend<T> {
 public:
  explicit CudaBackend(cudaStream_t stream) : libs_(libraries()), stream_(stream) {
    check_cublas(libs_.cublas_create(&cublas_), "cublasCreate");
    const cublasStatus_t status = libs_.cublas_set_stream(cublas_, stream_);
    if (status != 0) {
      // The destructor does not run when the constructor throws: release the handle here.
      const cublasStatus_t destroyed = libs_.cublas_destroy(cublas_);
      cublas_ = nullptr;
      check_cublas(status, destroyed == 0 ? "cublasSetStream" : "cublasSetStream (and cublasDestroy)");
    }
  }
  // Finds handles still open only when the solve threw (finish() closes them
  // otherwise): the error already propagating is the one reported, so these two
  // statuses are deliberately dropped.
  ~CudaBackend() override {
    if (cusolver_ != nullptr) (void)libs_.cusolver_destroy(cusolver_);
    if (cublas_ != nullptr) (void)libs_.cublas_destroy(cublas_);
  }
  // Ends a successful solve: destroys the handles and reports any failure
  // recorded by a call that could not throw.
  void finish() {
    if (cusolver_ != nullptr) {
      cusolverDnHandle_t handle = cusolver_;
      cusolver_ = nullptr;
      check_cusolver(libs_.cusolver_destroy(handle), "cusolverDnDestroy");
    }
    if (cublas_ != nullptr) {
      cublasHandle_t handle = cublas_;
      cublas_ = nullptr;
      check_cublas(libs_.cublas_destroy(handle), "cublasDestroy");
    }
    check_cuda(deferred_status_, deferred_what_);
  }
  std::string name() const override { return "cuda-cublas-cusolver"; }

  T* allocate(std::size_t count) override {
    void* data = nullptr;
    check_cuda(cudaMalloc(&data, std::max<std::size_t>(count, 1) * sizeof(T)), "cudaMalloc");
    cudaError_t status = cudaMemsetAsync(data, 0, std::max<std::size_t>(count, 1) * sizeof(T), stream_);
    if (status != cudaSuccess) {
      record_cuda(cudaFree(data), "cudaFree");  // the memset failure is the error reported
      check_cuda(status, "cudaMemsetAsync");
    }
    return static_cast<T*>(data);
  }
  void release(T* data) noexcept override {
    if (data == nullptr) return;
    record_cuda(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");  // the stream may still use it
    record_cuda(cudaFree(data), "cudaFree");
  }
  void to_host(double* host, const T* data, std::size_t count) override {
    std::vector<T> staging(count);
    check_cuda(cudaMemcpyAsync(staging.data(), data, count * sizeof(T), cudaMemcpyDeviceToHost, stream_),
               "cudaMemcpyAsync (device to host)");
    check_cuda(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
    for (std::size_t i = 0; i < count; ++i) host[i] = double(staging[i]);
  }
  void from_host(T* data, const double* host, std::size_t count) override {
    std::vector<T> staging(host, host + count);
    check_cuda(cudaMemcpyAsync(data, staging.data(), count * sizeof(T), cudaMemcpyHostToDevice, stream_),
               "cudaMemcpyAsync (host to device)");
    check_cuda(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");  // staging dies here
  }
  void copy_block(int rows, int cols, const T* src, int ld_src, std::int64_t stride_src, T* dst, int ld_dst,
                  std::int64_t stride_dst, const Batch& batch) override {
    if (rows == 0 || cols == 0) return;
    for (int b = 0; b < batch.count; ++b) {  // every problem (see backend.hpp)
      const T* s = src + b * stride_src;
      T* d = dst + b * stride_dst;
      if (s == d && ld_src == ld_dst) continue;
      check_cuda(cudaMemcpy2DAsync(d, std::size_t(ld_dst) * sizeof(T), s, std::size_t(ld_src) * sizeof(T),
                                   std::size_t(rows) * sizeof(T), cols, cudaMemcpyDeviceToDevice, stream_),
                 "cudaMemcpy2DAsync");
    }
  }
  void gemm(char trans_a, char trans_b, int m, int n, int k, T alpha, const T* a, int lda, std::int64_t stride_a,
            const T* b, int ldb, std::int64_t stride_b, T beta, T* c, int ldc, std::int64_t stride_c,
            const Batch& batch) override {
    if (m == 0 || n == 0 || batch.count == 0) return;
    auto routine = gemm_routine();
    check_cublas(routine(cublas_, to_op(trans_a), to_op(trans_b), m, n, k, &alpha, a, lda, stride_a, b, ldb, stride_b,
                         &beta, c, ldc, stride_c, batch.count),
                 "cublas?gemmStridedBatched");
  }
  void add_block(int rows, int cols, T alpha, const T* src, int ld_src, std::int64_t stride_src, T beta, T* dst,
                 int ld_dst, std::int64_t stride_dst, const Batch& batch) override {
    if (rows == 0 || cols == 0) return;
    auto routine = geam_routine();
    for (int p = 0; p < batch.count; ++p) {  // every problem (see backend.hpp); in place: C = B
      T* d = dst + p * stride_dst;
      check_cublas(routine(cublas_, CUBLAS_OP_N, CUBLAS_OP_N, rows, cols, &alpha, src + p * stride_src, ld_src, &beta, d,
                           ld_dst, d, ld_dst),
                   "cublas?geam");
    }
  }
  void trsm_left(char uplo, char trans, int m, int n, const double* alpha_per_problem, const T* a, int lda,
                 std::int64_t stride_a, T* b, int ldb, std::int64_t stride_b, const Batch& batch) override {
    if (m == 0 || n == 0) return;
    auto routine = trsm_routine();
    for (int p = 0; p < batch.count; ++p) {
      T alpha = T(alpha_per_problem[p]);
      check_cublas(routine(cublas_, CUBLAS_SIDE_LEFT, to_fill(uplo), to_op(trans), CUBLAS_DIAG_NON_UNIT, m, n, &alpha,
                           a + p * stride_a, lda, b + p * stride_b, ldb),
                   "cublas?trsm");
    }
  }
  void syevd(int n, T* a, int lda, std::int64_t stride_a, T* w, std::int64_t stride_w, const Batch& batch) override {
    if (n == 0) return;
    if (cusolver_ == nullptr) {
      check_cusolver(libs_.cusolver_create(&cusolver_), "cusolverDnCreate");
      check_cusolver(libs_.cusolver_set_stream(cusolver_, stream_), "cusolverDnSetStream");
    }
    int lwork = 0;
    check_cusolver(size_routine()(cusolver_, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_LOWER, n, a, lda, w, &lwork),
                   "cusolverDn?syevd_bufferSize");
    DeviceBuffer<T> work(*this, std::size_t(std::max(lwork, 1)));
    int* info_device = nullptr;
    check_cuda(cudaMalloc(reinterpret_cast<void**>(&info_device), sizeof(int) * std::size_t(batch.count)),
               "cudaMalloc");
    try {
      for (int p = 0; p < batch.count; ++p)
        check_cusolver(syevd_routine()(cusolver_, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_LOWER, n,
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

 private:
  GemmStridedBatched<T> gemm_routine() const;
  Trsm<T> trsm_routine() const;
  Geam<T> geam_routine() const;
  SyevdBufferSize<T> size_routine() const;
  Syevd<T> syevd_routine() const;

  // Keeps the first failure of a call that could not throw (see finish()); no
  // allocation here, finish() builds the message.
  void record_cuda(cudaError_t status, const char* what) noexcept {
    if (status == cudaSuccess || deferred_status_ != cudaSuccess) return;
    deferred_status_ = status;
    deferred_what_ = what;
  }

  const CudaLibraries& libs_;
  cudaStream_t stream_;
  cublasHandle_t cublas_ = nullptr;
  cusolverDnHandle_t cusolver_ = nullptr;
  cudaError_t deferred_status_ = cudaSuccess;
  const char* deferred_what_ = "";
};

template <> GemmStridedBatched<float> CudaBackend<float>::gemm_routine() const { return libs_.sgemm; }
template <> GemmStridedBatched<double> CudaBackend<double>::gemm_routine() const { return libs_.dgemm; }
template <> Trsm<float> CudaBackend<float>::trsm_routine() const { return libs_.strsm; }
template <> Trsm<double> CudaBackend<double>::trsm_routine() const { return libs_.dtrsm; }
template <> Geam<float> CudaBackend<float>::geam_routine() const { return libs_.sgeam; }
template <> Geam<double> CudaBackend<double>::geam_routine() const { return libs_.dgeam; }
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
