// backend/cuda/blas.hpp: row-major products through cuBLAS (column-major) by
// the transposition trick: a row-major [r, c] buffer read column-major is its
// transpose, so C = op(A) op(B) is computed as C^T = op(B)^T op(A)^T with the
// operands swapped and no copy. fp32 and fp64 use cublasSgemm / cublasDgemm;
// fp16 and bf16 storage use cublasGemmEx with fp32 accumulation. nvcc only.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "../../config.hpp"
#include "runtime.hpp"

namespace lora::cuda {

/// Element types cuBLAS multiplies here.
template <class T>
inline constexpr bool blas_type_v = std::is_same_v<T, float> || std::is_same_v<T, double> ||
                                    std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>;

namespace blas_detail {
template <class T>
constexpr cudaDataType_t data_type() {
  if constexpr (std::is_same_v<T, __half>)
    return CUDA_R_16F;
  else
    return CUDA_R_16BF;
}
inline cublasOperation_t op(bool transposed) { return transposed ? CUBLAS_OP_T : CUBLAS_OP_N; }
}  // namespace blas_detail

/// Row-major C (m, n) = beta C + alpha op(A) op(B), op(A) (m, k), op(B) (k, n).
/// A is stored row-major with rows lda apart ([m, k], or [k, m] when ta);
/// likewise B. Runs on the current stream. Accumulates in fp32 for 16-bit T;
/// alpha and beta are fp32 then (fp64 for double).
template <class T, class S>
void gemm(bool ta, bool tb, index_t m, index_t n, index_t k, S alpha, const T* a, index_t lda, const T* b,
          index_t ldb, S beta, T* c, index_t ldc) {
  static_assert(blas_type_v<T>, "lora::cuda::gemm: T must be float, double, __half or __nv_bfloat16");
  if (m == 0 || n == 0) return;
  cublasHandle_t h = blas_handle();
  // Column-major C^T (n, m) = op(B)^T (n, k) op(A)^T (k, m).
  const int cm = static_cast<int>(n), cn = static_cast<int>(m), ck = static_cast<int>(k);
  if constexpr (std::is_same_v<T, float>) {
    const float al = static_cast<float>(alpha), be = static_cast<float>(beta);
    LORA_CUDA_CHECK(cublasSgemm(h, blas_detail::op(tb), blas_detail::op(ta), cm, cn, ck, &al, b, static_cast<int>(ldb), a,
                                static_cast<int>(lda), &be, c, static_cast<int>(ldc)));
  } else if constexpr (std::is_same_v<T, double>) {
    const double al = static_cast<double>(alpha), be = static_cast<double>(beta);
    LORA_CUDA_CHECK(cublasDgemm(h, blas_detail::op(tb), blas_detail::op(ta), cm, cn, ck, &al, b, static_cast<int>(ldb), a,
                                static_cast<int>(lda), &be, c, static_cast<int>(ldc)));
  } else {
    const float al = static_cast<float>(alpha), be = static_cast<float>(beta);
    constexpr cudaDataType_t type = blas_detail::data_type<T>();
    LORA_CUDA_CHECK(cublasGemmEx(h, blas_detail::op(tb), blas_detail::op(ta), cm, cn, ck, &al, b, type, static_cast<int>(ldb),
                                 a, type, static_cast<int>(lda), &be, c, type, static_cast<int>(ldc),
                                 CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  }
}

}  // namespace lora::cuda
