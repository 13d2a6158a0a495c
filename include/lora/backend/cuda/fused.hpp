// backend/cuda/fused.hpp: the CUDA fast path of the LoRA forward (nvcc only).
//   Y  = X W^T                     cuBLAS (row-major by the transposition trick)
//   Y += s (X A^T) B^T             fused kernel: the [n, r] intermediate H stays in
//                                  shared memory, specialised on a static rank
//   Y += b                         Thrust functor
// The fused kernel serves the latency-bound small-n case (decode, n <= 16);
// larger n (or a rank without a compiled kernel) takes two cuBLAS products
// through an [n, r] workspace, where the redundant per-block shrink of the
// fused kernel would cost more than the extra launch.
// fp32, fp64, fp16 and bf16 storage; fp32 accumulation for 16-bit types.
// Like everything in cuda/, it takes raw device pointers or any row-major view
// with data(), rows(), cols() and stride(), never the Thrust backend's types;
// backend/thrust/cuda_hooks.hpp plugs it into ThrustBackend's low-rank hook.
#pragma once

#if !defined(__CUDACC__)
#error "lora/backend/cuda/fused.hpp is compiled by nvcc only."
#endif

#include <cuda_runtime.h>

#include "../../config.hpp"
#include "../../detail/arith.hpp"
#include "../../error.hpp"
#include "../../rank.hpp"
#include "blas.hpp"
#include "runtime.hpp"

namespace lora::cuda {

using lora::detail::accum_t;

namespace device_kernels {

/// One block: TOK tokens x THREADS output columns.
///  1. shrink: H[t, k] = X[t, :] . A[k, :] for the block's tokens, KC ranks per
///     pass: every thread takes the columns i = tid, tid + THREADS, ... of all
///     KC rows of A (coalesced, KC independent loads in flight per step), then
///     a shuffle reduction per warp and a fixed-order sum over the warps
///     (deterministic, no atomics) into shared memory;
///  2. expand: thread o keeps B[o, :] (r values) in registers and adds
///     alpha * H[t, :] . B[o, :] to Y[t, o] for the block's tokens.
/// Every block over the same tokens recomputes the (L2-resident) shrink, so no
/// second launch and no global round trip for H. (A first version gave each
/// warp whole rows of A: one dependent load chain of in / 32 steps per rank,
/// 2.4-5.9x the merged forward at n = 1 on an H200; docs/gpu.md.)
///
/// `static`: internal linkage, so every TU that instantiates the kernel keeps its
/// own host stub bound to its own device image. With external linkage the
/// linker keeps one TU's stub for all, and a launch from another TU failed with
/// cudaErrorInvalidDeviceFunction on an H200 once the conformance suite was
/// split into several .cu files (CCCL hides its kernels for the same reason).
template <class T, int R, int TOK, int THREADS>
static __global__ void __launch_bounds__(THREADS)
    fused_adapter(const T* __restrict__ x, index_t ldx, const T* __restrict__ a, index_t lda,
                  const T* __restrict__ b, index_t ldb, T* __restrict__ y, index_t ldy, index_t n, index_t in,
                  index_t out, accum_t<T> alpha) {
  using A = accum_t<T>;
  constexpr int warps = THREADS / 32;
  constexpr int KC = R < 8 ? R : 8;  // ranks per shrink pass: TOK * KC accumulators per thread
  __shared__ A h[TOK][R];            // (TOK, r)
  __shared__ A part[warps][TOK][KC];
  const index_t t0 = static_cast<index_t>(blockIdx.y) * TOK;
  const int tokens = static_cast<int>(n - t0 < TOK ? n - t0 : TOK);
  const int tid = static_cast<int>(threadIdx.x), warp = tid / 32, lane = tid % 32;

  for (int k0 = 0; k0 < R; k0 += KC) {
    A acc[TOK][KC];
#pragma unroll
    for (int t = 0; t < TOK; ++t)
#pragma unroll
      for (int kk = 0; kk < KC; ++kk) acc[t][kk] = A(0);
#pragma unroll 4
    for (index_t i = tid; i < in; i += THREADS) {  // unrolled: 4 steps of loads in flight
      A xv[TOK];
#pragma unroll
      for (int t = 0; t < TOK; ++t) xv[t] = t < tokens ? static_cast<A>(x[(t0 + t) * ldx + i]) : A(0);
#pragma unroll
      for (int kk = 0; kk < KC; ++kk) {
        if (k0 + kk >= R) break;
        const A av = static_cast<A>(a[(k0 + kk) * lda + i]);
#pragma unroll
        for (int t = 0; t < TOK; ++t) acc[t][kk] += av * xv[t];
      }
    }
#pragma unroll
    for (int t = 0; t < TOK; ++t)
#pragma unroll
      for (int kk = 0; kk < KC; ++kk) {
        A v = acc[t][kk];
#pragma unroll
        for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
        if (lane == 0) part[warp][t][kk] = v;
      }
    __syncthreads();
    if (tid < TOK * KC) {
      const int t = tid / KC, kk = tid % KC;
      A v = 0;
      for (int w = 0; w < warps; ++w) v += part[w][t][kk];
      if (k0 + kk < R) h[t][k0 + kk] = v;
    }
    __syncthreads();
  }

  const index_t o = static_cast<index_t>(blockIdx.x) * THREADS + threadIdx.x;
  if (o >= out) return;
  A bo[R];  // B[o, :] (r) in registers
#pragma unroll
  for (int k = 0; k < R; ++k) bo[k] = static_cast<A>(b[o * ldb + k]);
#pragma unroll
  for (int t = 0; t < TOK; ++t) {
    if (t >= tokens) break;
    A acc = 0;
#pragma unroll
    for (int k = 0; k < R; ++k) acc += h[t][k] * bo[k];
    T& dst = y[(t0 + t) * ldy + o];
    dst = static_cast<T>(static_cast<A>(dst) + alpha * acc);
  }
}

}  // namespace device_kernels

/// The fused kernel's host handle (CUTLASS style): can_implement() says whether
/// the fast path takes a shape; callers fall back otherwise.
template <class T, int Rank>
struct FusedAdapter {
  static constexpr int tokens_per_block = 4;
  static constexpr int threads = 256;
  /// Beyond this many tokens the redundant shrink outweighs the saved launch.
  static constexpr index_t max_tokens = 16;

  /// Above this rank every block's redundant shrink reads r x in of A from L2
  /// and the kernel loses to the two cuBLAS products (H200, n = 1, 4096^2:
  /// r = 64 fused 127 us against the merged forward's 23; docs/gpu.md).
  static constexpr int max_rank = 16;

  static bool can_implement(index_t n, index_t rank) {
    return Rank != dynamic && rank == Rank && Rank <= max_rank && n <= max_tokens;
  }

  /// Y (n, out) += alpha (X A^T) B^T on the current stream (row-major device
  /// views of T: X [n, in], A [r, in], B [out, r], Y [n, out]).
  template <class X, class A, class B, class Y>
  static void run(accum_t<T> alpha, const X& x, const A& a, const B& b, const Y& y) {
    if constexpr (Rank != dynamic) {
      if (x.rows() == 0 || y.cols() == 0) return;
      const dim3 grid(static_cast<unsigned>((y.cols() + threads - 1) / threads),
                      static_cast<unsigned>((x.rows() + tokens_per_block - 1) / tokens_per_block));
      device_kernels::fused_adapter<T, Rank, tokens_per_block, threads><<<grid, threads, 0, current_stream()>>>(
          x.data(), x.stride(), a.data(), a.stride(), b.data(), b.stride(), y.data(), y.stride(), x.rows(),
          x.cols(), y.cols(), alpha);
      check_launch("lora::cuda::FusedAdapter<<<>>>", __FILE__, __LINE__);
    } else {
      lora::detail::raise<ValueError>("lora::cuda::FusedAdapter: needs a static rank");
    }
  }
};

namespace adapter_detail {
template <class X, class A, class B, class Y>
void check_adapter(const X& x, const A& a, const B& b, const Y& y) {
  if (a.cols() != x.cols() || b.cols() != a.rows() || y.rows() != x.rows() || y.cols() != b.rows())
    lora::detail::raise<ShapeError>("lora::cuda::adapter_forward: X is [", x.rows(), ", ", x.cols(), "], A is [",
                                     a.rows(), ", ", a.cols(), "], B is [", b.rows(), ", ", b.cols(), "], Y is [",
                                     y.rows(), ", ", y.cols(), "]; need X [n, in], A [r, in], B [out, r], Y [n, out]");
}
}  // namespace adapter_detail

/// Where the fused kernel is the faster way (measured on an H200, n = 1, r = 8,
/// adapter term alone: bf16 4096^2 fused 6.2 us against ~20 us for the two
/// cuBLAS products; fp32 fused 12.6 us (4096^2) and 22 us (8192^2) against
/// 9-11 us for the two products): 16-bit storage. fp32 / fp64 take cuBLAS.
/// Every block recomputes the shrink, reading r x in of A from L2; a split-K
/// shrink over the whole GPU is the next step (docs/gpu.md).
template <class T>
inline constexpr bool fused_adapter_preferred_v = !std::is_same_v<T, float> && !std::is_same_v<T, double>;

/// The fused kernel alone, where it is preferred (fused_adapter_preferred_v)
/// and takes the shape: Rank static (or a runtime rank of 8 or 16) <=
/// FusedAdapter::max_rank and n <= FusedAdapter::max_tokens. Returns false
/// (nothing done) otherwise.
template <int Rank = dynamic, class T, class X, class A, class B, class Y>
bool try_fused_adapter(accum_t<T> s, const X& x, const A& a, const B& b, const Y& y) {
  const index_t n = x.rows(), r = a.rows();
  if constexpr (!fused_adapter_preferred_v<T>) {
    return false;
  } else if constexpr (Rank != dynamic) {
    if (!FusedAdapter<T, Rank>::can_implement(n, r)) return false;
    FusedAdapter<T, Rank>::run(s, x, a, b, y);
    return true;
  } else {
    bool done = false;
    for_each_rank<8, 16>([&]<int R>() {
      if (!done && FusedAdapter<T, R>::can_implement(n, r)) {
        FusedAdapter<T, R>::run(s, x, a, b, y);
        done = true;
      }
    });
    return done;
  }
}

/// Y (n, out) += s (X A^T) B^T, the adapter term of the unmerged forward: the
/// fused kernel where try_fused_adapter takes it, otherwise shrink and expand
/// through cuBLAS with the [n, r] intermediate in ws.matrix(n, r), in T.
template <int Rank = dynamic, class T, class X, class A, class B, class Y, class WS>
void adapter_forward(accum_t<T> s, const X& x, const A& a, const B& b, const Y& y, WS& ws) {
  adapter_detail::check_adapter(x, a, b, y);
  const index_t n = x.rows(), r = a.rows();
  if (try_fused_adapter<Rank, T>(s, x, a, b, y)) return;
  auto h = ws.matrix(n, r);                                                                      // (n, r)
  gemm(false, true, n, r, x.cols(), accum_t<T>(1), x.data(), x.stride(), a.data(), a.stride(),  // H = X A^T
       accum_t<T>(0), h.data(), h.stride());
  gemm(false, true, n, y.cols(), r, s, h.data(), h.stride(), b.data(), b.stride(), accum_t<T>(1),  // Y += s H B^T
       y.data(), y.stride());
}

}  // namespace lora::cuda
