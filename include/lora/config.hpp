// lora: low-rank adaptation as a C++ template library.
// config.hpp: the LORA_* macros every header relies on. Each switch is one
// documented #ifndef block so users can override it before including lora.
#pragma once

#define LORA_VERSION_MAJOR 0
#define LORA_VERSION_MINOR 1
#define LORA_VERSION_PATCH 0
#define LORA_VERSION_STRING "0.1.0"

// Functions that must run both on the host and inside CUDA kernels. Empty for a
// plain C++ compiler, so the same functors run on Thrust's OMP and CPP systems.
#ifndef LORA_HOST_DEVICE
#if defined(__CUDACC__) || defined(__HIPCC__)
#define LORA_HOST_DEVICE __host__ __device__
#else
#define LORA_HOST_DEVICE
#endif
#endif

#ifndef LORA_FORCE_INLINE
#if defined(_MSC_VER)
#define LORA_FORCE_INLINE __forceinline
#else
#define LORA_FORCE_INLINE inline __attribute__((always_inline))
#endif
#endif

// Internal invariants (not user input: user input throws lora::error). Off in
// release builds like assert().
#ifndef LORA_ASSERT
#include <cassert>
#define LORA_ASSERT(cond) assert(cond)
#endif

namespace lora {
/// Index type for sizes and offsets (signed, like Eigen::Index and PyTorch).
using index_t = long;
}  // namespace lora
