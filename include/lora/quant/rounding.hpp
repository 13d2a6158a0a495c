// quant/rounding.hpp: an fp32 product that is rounded before it is used.
// GCC contracts a * b + c into an FMA in C++ by default (-ffp-contract=fast),
// even through a double round trip or vector intrinsics, and Clang does within
// an expression. Bit-exact formats (bitsandbytes' scale reconstruction,
// torch.linspace) need the two roundings, so the product leaves the compiler's
// view through an empty asm (or __fmul_rn on CUDA devices, volatile elsewhere).
#pragma once

#include "lora/config.hpp"
#include "lora/detail/arith.hpp"

namespace lora::detail {

/// a * b rounded to fp32, never fused with a following add.
LORA_HOST_DEVICE inline float fp32_mul_unfused(float a, float b) { return mul_unfused(a, b); }

}  // namespace lora::detail
