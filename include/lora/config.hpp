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

// Internal invariants (not user input: user input throws lora::Error). Off in
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
// few tokens) use lora's kernels: fp32 the micro-kernel over B in place
// (microkernel.hpp, skinny_nn), double the panel kernel (skinny.hpp). 4096^2,
// 2 threads, fp32 against the panel kernel: 1 row 1.4x faster, 16 rows 1.6-1.9x,
// 32 rows 1.3-1.8x. 0 disables it.
#ifndef LORA_EIGEN_PANEL_MAX_ROWS
#define LORA_EIGEN_PANEL_MAX_ROWS 32
#endif

// fp32 products with many tokens over a plain W (the forward's Y = X W^T past
// the skinny kernel's tokens, the backward's dX = G W past the panel kernel's
// rows), with W at least this many rows and columns, go to lora's micro-kernel
// with W packed per call (microkernel.hpp: gemm_nt_plain, gemm_nn_plain)
// instead of Eigen's GEMM. 4096^2, 2 threads, Eigen's time / lora's: forward
// n = 129..1024 0.96-1.25x, 8192^2 n = 256 1.17x; backward n = 33..128
// 1.2-1.3x, 256..1024 1.03-1.05x, 8192^2 n = 256 1.2x. Smaller products (the
// adapter's X A^T, H B^T) stay with Eigen.
#ifndef LORA_EIGEN_MICROKERNEL_MIN_SIZE
#define LORA_EIGEN_MICROKERNEL_MIN_SIZE 256
#endif
// The forward's tokens from which such a product leaves the skinny kernel (one
// pass over W per 64 tokens, nothing packed) for the micro-kernel (W packed
// once per call). 2 threads, one process, skinny / micro-kernel ms: 4096^2
// n = 64 10.3-10.5 / 11.2, 80 13.4-14.1 / 12.5-13.1, 96 16.5-17.0 / 14.5-15.1,
// 128 21.5-21.6 / 19.1-19.8; 8192^2 n = 80 64.7 / 58.7, 128 111 / 85.
#ifndef LORA_EIGEN_MICROKERNEL_MIN_TOKENS
#define LORA_EIGEN_MICROKERNEL_MIN_TOKENS 72
#endif

// fp32 products C = A B with A between these depths (columns) and C at least
// this many elements are rank updates (merge's W += s B A, the backward's
// dX += s (G B) A) and go to the outer-product micro-kernel (microkernel.hpp),
// which streams C once; the others stay with Eigen. Merge + unmerge of a
// 4096^2 W, 2 threads, per op, micro-kernel / Eigen: r = 4 2.0-2.4 / 1.7-1.9 ms,
// 8 2.2-2.8 / 2.0-2.4, 16 2.9-3.7 / 3.2-3.7, 32 4.6-5.9 / 5.5-6.5, 64 8.3-9.6 /
// 10.4-12.8, 128 15.5-16.9 / 22.1-23.0 (Eigen's lazy product serves r < 16
// well). MAX_DEPTH 0 disables it.
#ifndef LORA_EIGEN_RANK_UPDATE_MIN_DEPTH
#define LORA_EIGEN_RANK_UPDATE_MIN_DEPTH 16
#endif
#ifndef LORA_EIGEN_RANK_UPDATE_MAX_DEPTH
#define LORA_EIGEN_RANK_UPDATE_MAX_DEPTH 128
#endif
#ifndef LORA_EIGEN_RANK_UPDATE_MIN_ELEMENTS
#define LORA_EIGEN_RANK_UPDATE_MIN_ELEMENTS (1 << 14)
#endif

// ---- Tuning of the NF4 products (backend/eigen/nf4.hpp) ----------------------
// Work (rows x cols elements) below which the kernels stay on one thread: a
// fork/join costs a few microseconds, about a 256 x 256 product.
#ifndef LORA_NF4_PARALLEL_MIN_ELEMENTS
#define LORA_NF4_PARALLEL_MIN_ELEMENTS (1L << 16)
#endif

// How far ahead (bytes of packed codes) the AVX-512 gemv prefetches; 0 = off.
#ifndef LORA_NF4_PREFETCH_BYTES
#define LORA_NF4_PREFETCH_BYTES 512
#endif

// Floats per dequantised tile of W in nf4_gemm for up to 32 tokens (1 MiB: it
// stays in L2 while Eigen packs it); larger batches use 4x this.
#ifndef LORA_NF4_GEMM_TILE_FLOATS
#define LORA_NF4_GEMM_TILE_FLOATS (1L << 18)
#endif

// ---- Tuning of the 16-bit base products (backend/eigen/half.hpp) --------------
// Floats of W widened per tile for n >= 2 (1 MiB, as the NF4 products'; 4x
// above 32 tokens, where Eigen's GEMM repacks X once per tile). A 64 KiB tile
// made the bf16 forward 2-3x slower than fp32 at n = 16 and 256 (4096^2).
#ifndef LORA_HALF_TILE_FLOATS
#define LORA_HALF_TILE_FLOATS (1 << 18)
#endif

// ---- The OpenBLAS hand-off (backend/eigen/blas.hpp, lora::blas) ---------------
// Products smaller than this many multiply-adds (m n k) stay with Eigen: a BLAS
// call's thread start-up is not amortised (2^26: a 4096^2 W against 4 tokens).
#ifndef LORA_BLAS_MIN_WORK
#define LORA_BLAS_MIN_WORK (index_t(1) << 26)
#endif
// ... and so do thin-depth products, such as merge()'s rank-r update W += s B A
// for small r. 4096^2 fp32 update, 2 threads, best of 20 (ms, Eigen / OpenBLAS):
// r = 8 2.1 / 2.7, r = 16 3.2 / 3.0, r = 32 5.6 / 4.4, r = 64 12.2 / 8.5.
#ifndef LORA_BLAS_MIN_DEPTH
#define LORA_BLAS_MIN_DEPTH 32
#endif

// ---- The Thrust backend on CUDA (backend/thrust/backend.hpp) -----------------
// Products at least this large (m n k) go to cuBLAS on CUDA: below it the
// launch and handle overhead dominates and the functor is as fast.
#ifndef LORA_THRUST_CUBLAS_MIN_MNK
#define LORA_THRUST_CUBLAS_MIN_MNK 262144
#endif

// ---- Compile time ---------------------------------------------------------------
// LORA_EXTERN_TEMPLATES: the rank-independent product kernels
// (detail::eigen::product_kernels<float> and <double>) and the SVD of the
// SVD-based inits (detail::svd_kernels<double>) are declared extern, so a
// translation unit that includes lora does not compile them. Exactly one TU
// of the program also defines LORA_INSTANTIATE_TEMPLATES and holds them (the
// CMake target lora::kernels holds them instead as explicit instantiations in
// two TUs that build side by side). Off by default: header-only use needs
// nothing.

namespace lora {
/// Index type for sizes and offsets (signed, like Eigen::Index and PyTorch).
using index_t = long;
}  // namespace lora
