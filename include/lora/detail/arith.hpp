// detail/arith.hpp: a product that is rounded before it is used.
// GCC contracts a * b + c into one FMA by default (-ffp-contract=fast) and does
// so differently in different inlining contexts, so the "same" formula can
// differ by an ulp between the Eigen and Thrust paths, or between -O0 and -O3.
// Where results must be bit-identical across backends (random fills, dropout,
// bitsandbytes' scale reconstruction), the product leaves the compiler's view
// through an empty asm (__fmul_rn / __dmul_rn in CUDA device code).
#pragma once

#include "../config.hpp"

namespace lora::detail {

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

}  // namespace lora::detail
