// backend/cuda/nf4.hpp: the CUDA kernel for Y = X W^T over an NF4 weight with
// few tokens (decode, n <= 16), nvcc only. Like everything in cuda/, it knows
// raw device pointers (an nf4::PackedView) and strided views by their data(),
// rows(), cols() and stride(), not the Thrust backend's types;
// backend/thrust/nf4.hpp's quantized_traits<DeviceNF4Matrix>::gemm_nt calls it
// and larger n takes the generic Thrust functor.
//
// With few tokens the product is bound by reading W's codes, so the kernel
// reads them coalesced: one warp per output row, lanes on consecutive packed
// bytes (32-bit words of 8 codes when in % 8 == 0, so each word lies in one
// row and one block), the 16 code values in shared memory, the n tokens'
// partial sums in registers, then a warp-shuffle reduction (fixed order:
// deterministic, no atomics).
#pragma once

#if !defined(__CUDACC__)
#error "lora/backend/cuda/nf4.hpp is compiled by nvcc only."
#endif
#include <cuda_runtime.h>

#include <cstdint>

#include "../../config.hpp"
#include "../../detail/arith.hpp"
#include "../../error.hpp"
#include "../../quant/nf4_format.hpp"
#include "runtime.hpp"

namespace lora::cuda {

namespace device_kernels {

/// Adds the contribution of 2 * BYTES consecutive codes starting at flat element
/// e (all in one block of scale s; only elements in [f0, f_end) count) to acc.
template <int NT>
__device__ __forceinline__ void nf4_accumulate_byte(unsigned byte, index_t e, index_t f0, index_t f_end, float s,
                                                    const float* lut, const float* __restrict__ x, index_t ldx,
                                                    int n, float (&acc)[NT]) {
  const float v0 = lut[byte >> 4] * s, v1 = lut[byte & 15u] * s;  // nf4::decode, same rounding
  const bool has0 = e >= f0, has1 = e + 1 < f_end;
  const index_t c = e - f0;
#pragma unroll
  for (int t = 0; t < NT; ++t) {
    if (t < n) {
      if (has0) acc[t] += v0 * x[t * ldx + c];
      if (has1) acc[t] += v1 * x[t * ldx + c + 1];
    }
  }
}

/// Y (n, nr) = beta Y + alpha X W[r0 : r0 + nr]^T for n <= NT tokens.
/// Block = WARPS rows; warp = one row; lane = every 32nd byte (or word) of it.
/// `static` for the reason given at lora::cuda::device_kernels::fused_adapter.
template <int NT, int WARPS>
static __global__ void __launch_bounds__(WARPS * 32)
    nf4_small_gemm_nt(nf4::PackedView w, index_t r0, index_t nr, const float* __restrict__ x, index_t ldx, int n,
                      float* __restrict__ y, index_t ldy, float alpha, float beta) {
  __shared__ float lut[nf4::num_codes];
  if (threadIdx.x < nf4::num_codes) lut[threadIdx.x] = nf4::code_value(threadIdx.x);
  __syncthreads();

  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  const index_t j = static_cast<index_t>(blockIdx.x) * WARPS + warp;
  if (j >= nr) return;
  const index_t in = w.cols, f0 = (r0 + j) * in, f_end = f0 + in;
  float acc[NT] = {};

  if (in % 8 == 0) {
    // Rows start at a multiple of 8 codes = 4 bytes: aligned 32-bit words,
    // 8 codes each, all in one block (block sizes are multiples of 32).
    const auto* words = reinterpret_cast<const std::uint32_t*>(w.packed) + f0 / 8;
    for (index_t q = lane; q < in / 8; q += 32) {
      const std::uint32_t word = words[q];
      const index_t e = f0 + 8 * q;
      const float s = w.scale(e >> w.shift);
#pragma unroll
      for (int k = 0; k < 4; ++k)  // little endian: byte k holds elements e + 2k, e + 2k + 1
        nf4_accumulate_byte<NT>((word >> (8 * k)) & 255u, e + 2 * k, f0, f_end, s, lut, x, ldx, n, acc);
    }
  } else {
    // Any shape: bytes [f0 / 2, ceil(f_end / 2)); the first and last byte may
    // hold a neighbouring row's code. Both codes of a byte share a block.
    for (index_t k = f0 / 2 + lane; k < (f_end + 1) / 2; k += 32) {
      const index_t e = 2 * k;
      nf4_accumulate_byte<NT>(w.packed[k], e, f0, f_end, w.scale(e >> w.shift), lut, x, ldx, n, acc);
    }
  }

#pragma unroll
  for (int t = 0; t < NT; ++t) {
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) acc[t] += __shfl_xor_sync(0xffffffffu, acc[t], offset);
  }
  if (lane == 0) {
#pragma unroll
    for (int t = 0; t < NT; ++t)
      if (t < n) lora::detail::store(y[t * ldy + j], alpha * acc[t], beta);
  }
}

}  // namespace device_kernels

/// Host handle of the small-n NF4 kernel: can_implement() says whether it takes
/// a shape; run() launches it on the current stream.
struct NF4SmallGemmNT {
  static constexpr int warps_per_block = 8;
  /// Beyond this many tokens the per-warp register tile grows too large; the
  /// generic functor (one row x 4 tokens per thread) takes over.
  static constexpr index_t max_tokens = 16;

  static bool can_implement(index_t n, index_t nr) { return n >= 1 && n <= max_tokens && nr >= 1; }

  /// Y (n, nr) = beta Y + alpha X W[r0 : r0 + nr]^T; X and Y are row-major
  /// float device views (data(), rows(), stride()).
  template <class X, class Y>
  static void run(const nf4::PackedView& w, index_t r0, index_t nr, float alpha, const X& x, float beta,
                  const Y& y) {
    const index_t n = x.rows();
    if (n <= 1) return launch<1>(w, r0, nr, alpha, x, beta, y);
    if (n <= 2) return launch<2>(w, r0, nr, alpha, x, beta, y);
    if (n <= 4) return launch<4>(w, r0, nr, alpha, x, beta, y);
    if (n <= 8) return launch<8>(w, r0, nr, alpha, x, beta, y);
    if (n <= 16) return launch<16>(w, r0, nr, alpha, x, beta, y);
    lora::detail::raise<ValueError>("lora::cuda::NF4SmallGemmNT: ", n, " tokens, at most ", max_tokens);
  }

 private:
  template <int NT, class X, class Y>
  static void launch(const nf4::PackedView& w, index_t r0, index_t nr, float alpha, const X& x, float beta,
                     const Y& y) {
    const unsigned blocks = static_cast<unsigned>((nr + warps_per_block - 1) / warps_per_block);
    device_kernels::nf4_small_gemm_nt<NT, warps_per_block><<<blocks, warps_per_block * 32, 0, current_stream()>>>(
        w, r0, nr, x.data(), x.stride(), static_cast<int>(x.rows()), y.data(), y.stride(), alpha, beta);
    check_launch("lora::cuda::NF4SmallGemmNT<<<>>>", __FILE__, __LINE__);
  }
};

}  // namespace lora::cuda
