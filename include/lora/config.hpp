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


// ---- Tuning of the Eigen backend's products (backend/eigen/products.hpp) ------
// Every switch that changes which kernel runs lives here, one #ifndef each.

// Products with at most this many tokens (rows of X) split W's rows across
// OpenMP threads themselves: each thread streams its own slice of W through a
// single-threaded Eigen kernel, with no packing barrier. Eigen's own threading
// only pays off for wide GEMMs (and never for GEMV). 0 disables the split.
#ifndef LORA_EIGEN_ROW_SPLIT_MAX_TOKENS
#define LORA_EIGEN_ROW_SPLIT_MAX_TOKENS 64
#endif
// ... and only when W has at least this many elements (smaller products do
// not amortise the parallel region).
#ifndef LORA_EIGEN_ROW_SPLIT_MIN_ELEMENTS
#define LORA_EIGEN_ROW_SPLIT_MIN_ELEMENTS (1 << 18)
#endif
// Token counts served by the register-blocked skinny kernel (skinny.hpp), and
// the shortest dot product (in) worth it: the adapter's expand step, whose
// depth is r, stays with Eigen.
#ifndef LORA_EIGEN_SKINNY_MIN_TOKENS
#define LORA_EIGEN_SKINNY_MIN_TOKENS 2
#endif
// 4096^2, 2 threads (Eigen GEMM / skinny): n = 64 12.6 / 9.1 ms, 96 17.3 /
// 14.5, 128 20.6 / 18.1, 192 33.6 / 30.4 (noisy), 256 37.6 / 38.5.
#ifndef LORA_EIGEN_SKINNY_MAX_TOKENS
#define LORA_EIGEN_SKINNY_MAX_TOKENS 128
#endif
#ifndef LORA_EIGEN_SKINNY_MIN_DEPTH
#define LORA_EIGEN_SKINNY_MIN_DEPTH 256
#endif

// Products C = A B where A has at most this many rows (backward's dX = G W for
// few tokens) use the panel kernel (skinny.hpp); above it Eigen's GEMM was as
// fast or faster (4096^2, 2 threads: 1-8 rows 1.7-5x faster, 16 rows 1.5x,
// 32 equal, 64 Eigen 12 % faster). 0 disables it.
#ifndef LORA_EIGEN_PANEL_MAX_ROWS
#define LORA_EIGEN_PANEL_MAX_ROWS 32
#endif

// ---- Compile time ---------------------------------------------------------------
// LORA_EXTERN_TEMPLATES: the rank-independent product kernels
// (detail::eigen::product_kernels<float> and <double>) are declared extern, so
// a translation unit that includes lora does not compile them. Exactly one TU
// of the program also defines LORA_INSTANTIATE_TEMPLATES and holds them (the
// CMake target lora::kernels is such a TU). Off by default: header-only use
// needs nothing.

namespace lora {
/// Index type for sizes and offsets (signed, like Eigen::Index and PyTorch).
using index_t = long;
}  // namespace lora
