// C entry point of the CPU backend.
#include <algorithm>
#include <cstdint>
#include <cstdio>

#include "cpu_backend.hpp"
#include "solve.hpp"

extern "C" int lora_da_cpu_solve(lora_da_solve_request* request, char* message, size_t message_size) {
  return lora_da::guarded_call(
      [&]() {
        // Several problems: one per thread, each with single-threaded BLAS
        // (as many threads as OpenBLAS would use). One problem: OpenBLAS threads.
        const int workers =
            int(std::min<std::int64_t>(request->batch, lora_da::OpenblasThreadsGuard::current()));
        lora_da::OpenblasThreadsGuard threads(workers > 1 ? 1 : lora_da::OpenblasThreadsGuard::current());
        if (request->dtype == LORA_DA_FLOAT64) {
          lora_da::CpuBackend<double> backend(workers);
          lora_da::solve_on_backend(backend, *request);
        } else {
          lora_da::CpuBackend<float> backend(workers);
          lora_da::solve_on_backend(backend, *request);
        }
      },
      message, message_size);
}

#ifndef LORA_DA_WITH_CUDA
extern "C" int lora_da_cuda_solve(lora_da_solve_request*, char* message, size_t message_size) {
  std::snprintf(message, message_size, "lora_da._core was built without the CUDA backend (nvcc was not found)");
  return 1;
}
extern "C" int lora_da_cuda_compiled(void) { return 0; }
#endif
