// quant/rounding.hpp: an fp32 product that is rounded before it is used.
// GCC contracts a * b + c into an FMA in C++ by default (-ffp-contract=fast),
// even through a double round trip or vector intrinsics, and Clang does within
// an expression. Bit-exact formats (bitsandbytes' scale reconstruction,
// torch.linspace) need the two roundings, so the product leaves the compiler's
// view through an empty asm (or __fmul_rn on CUDA devices, volatile elsewhere).
#pragma once

#include "lora/config.hpp"

namespace lora::detail {

/// a * b rounded to fp32, never fused with a following add.
LORA_HOST_DEVICE inline float fp32_mul_unfused(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#elif defined(__GNUC__)  // GCC and Clang
  float p = a * b;
  __asm__("" : "+r"(p));
  return p;
#else
  volatile float p = a * b;
  return p;
#endif
}

}  // namespace lora::detail
