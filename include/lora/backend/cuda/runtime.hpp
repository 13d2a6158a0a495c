// backend/cuda/runtime.hpp: CUDA and cuBLAS errors as lora::DeviceError, the
// per-thread current stream, and the per-thread cuBLAS handle. nvcc only.
#pragma once

#if !defined(__CUDACC__)
#error "lora/backend/cuda/ is compiled by nvcc only; include <lora/thrust.hpp> from a .cu file."
#endif

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include "../../error.hpp"

namespace lora::cuda {

/// Throws lora::DeviceError naming the call, after clearing CUDA's sticky
/// last error so the next unrelated call does not report this one again.
inline void check(cudaError_t status, const char* call, const char* file, int line) {
  if (status == cudaSuccess) return;
  (void)cudaGetLastError();
  lora::detail::raise<DeviceError>(call, " failed: ", cudaGetErrorName(status), " (", cudaGetErrorString(status),
                              ") at ", file, ":", line);
}

inline void check(cublasStatus_t status, const char* call, const char* file, int line) {
  if (status == CUBLAS_STATUS_SUCCESS) return;
  (void)cudaGetLastError();
  lora::detail::raise<DeviceError>(call, " failed: ", cublasGetStatusName(status), " (", cublasGetStatusString(status),
                              ") at ", file, ":", line);
}

/// A kernel launch: configuration errors surface at once, faults at the next sync.
inline void check_launch(const char* kernel, const char* file, int line) {
  check(cudaGetLastError(), kernel, file, line);
}

}  // namespace lora::cuda

/// Wraps a CUDA runtime or cuBLAS call: LORA_CUDA_CHECK(cudaMemcpy(...)).
#define LORA_CUDA_CHECK(call) ::lora::cuda::check((call), #call, __FILE__, __LINE__)

namespace lora::cuda {

/// The stream this thread's lora calls (Thrust kernels, cuBLAS, fused kernels)
/// run on; the legacy default stream (0) unless a StreamScope says otherwise.
inline cudaStream_t& current_stream() {
  thread_local cudaStream_t stream = nullptr;
  return stream;
}

/// RAII: lora calls on this thread run on `s` until the scope ends.
///   { lora::cuda::StreamScope on(s); layer.forward(X, Y, ws); }
class StreamScope {
 public:
  explicit StreamScope(cudaStream_t s) : previous_(current_stream()) { current_stream() = s; }
  ~StreamScope() { current_stream() = previous_; }
  StreamScope(const StreamScope&) = delete;
  StreamScope& operator=(const StreamScope&) = delete;

 private:
  cudaStream_t previous_;
};

/// This thread's cuBLAS handle (created on first use; cuBLAS handles are not
/// safe to share between threads), bound to the current stream.
inline cublasHandle_t blas_handle() {
  struct holder {
    cublasHandle_t h = nullptr;
    ~holder() {
      if (h) (void)cublasDestroy(h);  // at thread exit; nothing to report to
    }
  };
  thread_local holder handle;
  if (!handle.h) LORA_CUDA_CHECK(cublasCreate(&handle.h));
  LORA_CUDA_CHECK(cublasSetStream(handle.h, current_stream()));
  return handle.h;
}

/// True when a CUDA device can be used (tests skip otherwise).
inline bool device_available() {
  int count = 0;
  const cudaError_t status = cudaGetDeviceCount(&count);
  if (status != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  return count > 0;
}

}  // namespace lora::cuda
