// detail/arith.hpp: scalar arithmetic shared by every device kernel (the Thrust
// functors and the hand-written CUDA kernels): the accumulation type, the BLAS
// store rule, a product that is rounded before it is used, and a multiply-add
// that is rounded once.
//
// The rounded product: GCC contracts a * b + c into one FMA by default
// (-ffp-contract=fast) and does so differently in different inlining contexts,
// so the "same" formula can differ by an ulp between the Eigen and Thrust
// paths, or between -O0 and -O3.
// Where results must be bit-identical across backends (random fills, dropout,
// bitsandbytes' scale reconstruction), the product leaves the compiler's view
// through an empty asm (__fmul_rn / __dmul_rn in CUDA device code).
#pragma once

#include <cmath>
#include <type_traits>

#include "../config.hpp"

namespace lora::detail {

/// Accumulation type: fp32 for fp32 and for 16-bit storage, fp64 for fp64.
template <class T>
struct accumulator {
  using type = float;
};
template <>
struct accumulator<double> {
  using type = double;
};
template <class T>
using accum_t = typename accumulator<std::remove_const_t<T>>::type;

/// BLAS store: beta == 0 overwrites without reading (a NaN already in the
/// destination must not leak), otherwise d = beta d + v.
template <class T, class A>
LORA_HOST_DEVICE inline void store(T& d, A v, A beta) {
  d = beta == A(0) ? static_cast<T>(v) : static_cast<T>(beta * static_cast<A>(d) + v);
}

/// a * b rounded to T, never fused with a following add or subtract.
template <class T>
LORA_HOST_DEVICE inline T mul_unfused(T a, T b) {
#if defined(__CUDA_ARCH__)
  if constexpr (sizeof(T) == 4)
    return __fmul_rn(a, b);
  else
    return __dmul_rn(a, b);
#elif defined(__GNUC__)  // GCC and Clang
  T p = a * b;
  __asm__("" : "+r"(p));
  return p;
#else
  volatile T p = a * b;
  return p;
#endif
}

/// a * b + c rounded once (IEEE fusedMultiplyAdd) on every path, FMA hardware
/// or not: what ATen's AVX2 / AVX-512 kernels compute for add(alpha), lerp and
/// addcmul, which the optimizers reproduce.
template <class T>
LORA_HOST_DEVICE inline T fma_rn(T a, T b, T c) {
#if defined(__CUDA_ARCH__)
  if constexpr (sizeof(T) == 4)
    return __fmaf_rn(a, b, c);
  else
    return __fma_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

}  // namespace lora::detail
