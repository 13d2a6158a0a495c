// backend/eigen/skinny.hpp: Y = beta Y + alpha X W^T for few tokens (skinny
// products), W streamed once per group of up to 64 tokens. Eigen's GEMM packs both operands and its micro-
// kernel is shaped for many rows of X; with 2..64 tokens it runs at 20-35% of
// peak. Here each 6-row block of W meets every 4-token block of X in registers
// (the last n % 4 tokens in one narrower block): 24 vector accumulators, 10
// loads per 24 FMAs, dot products along `in`, which is contiguous in both
// operands (PyTorch layout), so nothing is packed. The depth goes in L1-sized
// chunks with the vector accumulators carried between them (not their
// horizontal sums, which made an earlier chunked version 10-20% slower).
#pragma once

#ifndef LORA_UMBRELLA_INCLUDED
#error "Include <lora/lora.hpp> instead of lora/backend/eigen/skinny.hpp."
#endif

#include <Eigen/Core>
#include <algorithm>
#include <cstring>

#include "../../config.hpp"

namespace lora::detail::skinny {

// One SIMD register's worth of T through GCC/Clang vector extensions, sized to
// the widest registers -march enables (a wider vector would be split, and
// passing it by value changes the ABI), so the kernel needs no intrinsics.
#if defined(__AVX512F__)
inline constexpr int simd_bytes = 64;
#elif defined(__AVX__)
inline constexpr int simd_bytes = 32;
#else
inline constexpr int simd_bytes = 16;
#endif

template <class T>
struct simd {
  static constexpr int bytes = simd_bytes;
  static constexpr int width = bytes / int(sizeof(T));
  typedef T type __attribute__((vector_size(bytes)));
  static LORA_FORCE_INLINE type load(const T* p) {
    type v;
    std::memcpy(&v, p, sizeof v);  // an unaligned vector load
    return v;
  }
  static LORA_FORCE_INLINE T sum(type v) {
    T s = 0;
    for (int i = 0; i < width; ++i) s += v[i];
    return s;
  }
};

/// Depth [p0, p1) (whole vectors) of an RB-row x TB-token block, its vector
/// accumulators carried in acc[RB * TB] across calls (zero-started when first).
template <int RB, int TB, class T>
LORA_FORCE_INLINE void chunk(const T* w, index_t ldw, const T* x, index_t ldx, index_t p0, index_t p1, T* carry,
                             bool first) {
  using S = simd<T>;
  using V = typename S::type;
  V acc[RB][TB];
  for (int i = 0; i < RB; ++i)
    for (int j = 0; j < TB; ++j) acc[i][j] = first ? V{} : S::load(carry + (i * TB + j) * S::width);
  for (index_t p = p0; p < p1; p += S::width) {
    V wv[RB];
    for (int i = 0; i < RB; ++i) wv[i] = S::load(w + i * ldw + p);
    for (int j = 0; j < TB; ++j) {
      const V xv = S::load(x + j * ldx + p);
      for (int i = 0; i < RB; ++i) acc[i][j] += wv[i] * xv;
    }
  }
  for (int i = 0; i < RB; ++i)
    for (int j = 0; j < TB; ++j) std::memcpy(carry + (i * TB + j) * S::width, &acc[i][j], sizeof(V));
}

/// y(j, i) = beta y(j, i) + alpha (sum of carry[i][j] + the depth tail [kv, k)).
template <int RB, int TB, class T>
LORA_FORCE_INLINE void finish(const T* w, index_t ldw, const T* x, index_t ldx, index_t kv, index_t k,
                              const T* carry, T alpha, T beta, T* y, index_t ldy) {
  using S = simd<T>;
  for (int i = 0; i < RB; ++i)
    for (int j = 0; j < TB; ++j) {
      T dot = S::sum(S::load(carry + (i * TB + j) * S::width));
      for (index_t q = kv; q < k; ++q) dot += w[i * ldw + q] * x[j * ldx + q];
      T& out = y[j * ldy + i];
      out = beta == T(0) ? alpha * dot : beta * out + alpha * dot;
    }
}

// Depth per chunk: RB rows x 512 floats of W (12 KiB for RB = 6) stay in L1
// while every token block passes over them. Without chunks the 6 rows (96 KiB
// at in = 4096) came from L2 again for each token block, and with X also from
// L2 the kernel was L2-bandwidth bound: 10 L2 loads per 24 FMAs. Measured
// (4096^2, 2 threads, best of 30): n = 16 3.05 -> 2.74 ms, n = 32 6.07 ->
// 5.27, n = 64 11.0 -> 9.5, n = 8 1.91 -> 1.77; 256 and 1024 were no better.
inline constexpr index_t depth_chunk = 512;

/// One block of RB rows of W against all n tokens: blocks of TB tokens, the last
/// n % TB tokens in one narrower block (never one token at a time, which would
/// load W's rows once per token), depth in chunks with the accumulators carried
/// in `carry` ((n / TB + 1) * RB * TB vectors of floats), so the sums are those of the
/// unchunked loop, in the same order.
template <int RB, int TB, class T>
void row_block(const T* w, index_t ldw, const T* x, index_t ldx, index_t n, index_t k, T alpha, T beta, T* y,
               index_t ldy, T* carry) {
  static_assert(TB == 4, "the tails below handle 1..3 leftover tokens");
  constexpr index_t block_floats = RB * TB * simd<T>::width;
  const index_t kv = k - k % simd<T>::width;  // whole vectors; the rest in finish()
  const index_t blocks = n / TB, tail = n % TB, j_tail = blocks * TB;
  T* carry_tail = carry + blocks * block_floats;
  // At least one pass, so a depth below one vector still zeroes the carry.
  for (index_t p0 = 0; p0 == 0 || p0 < kv; p0 += depth_chunk) {
    const index_t p1 = std::min(p0 + depth_chunk, kv);
    const bool first = p0 == 0;
    for (index_t b = 0; b < blocks; ++b)
      chunk<RB, TB>(w, ldw, x + b * TB * ldx, ldx, p0, p1, carry + b * block_floats, first);
    switch (tail) {
      case 3: chunk<RB, 3>(w, ldw, x + j_tail * ldx, ldx, p0, p1, carry_tail, first); break;
      case 2: chunk<RB, 2>(w, ldw, x + j_tail * ldx, ldx, p0, p1, carry_tail, first); break;
      case 1: chunk<RB, 1>(w, ldw, x + j_tail * ldx, ldx, p0, p1, carry_tail, first); break;
      default: break;
    }
  }
  for (index_t b = 0; b < blocks; ++b)
    finish<RB, TB>(w, ldw, x + b * TB * ldx, ldx, kv, k, carry + b * block_floats, alpha, beta, y + b * TB * ldy,
                   ldy);
  switch (tail) {
    case 3: finish<RB, 3>(w, ldw, x + j_tail * ldx, ldx, kv, k, carry_tail, alpha, beta, y + j_tail * ldy, ldy); break;
    case 2: finish<RB, 2>(w, ldw, x + j_tail * ldx, ldx, kv, k, carry_tail, alpha, beta, y + j_tail * ldy, ldy); break;
    case 1: finish<RB, 1>(w, ldw, x + j_tail * ldx, ldx, kv, k, carry_tail, alpha, beta, y + j_tail * ldy, ldy); break;
    default: break;
  }
}

/// Rows [r0, r1) of W against n <= 64 tokens (one token group).
template <class T>
void rows_group(const T* w, index_t ldw, index_t r0, index_t r1, const T* x, index_t ldx, index_t n, index_t k,
                T alpha, T beta, T* y, index_t ldy, T* carry) {
  constexpr int TB = 4;
  index_t i = r0;
  if (n == 2) {  // 8 rows over the whole depth at once: W-read bound, nothing for L1 to keep
    const index_t kv = k - k % simd<T>::width;
    for (; i + 8 <= r1; i += 8) {
      chunk<8, 2>(w + i * ldw, ldw, x, ldx, 0, kv, carry, true);
      finish<8, 2>(w + i * ldw, ldw, x, ldx, kv, k, carry, alpha, beta, y + i, ldy);
    }
  }
  for (; i + 6 <= r1; i += 6) row_block<6, TB>(w + i * ldw, ldw, x, ldx, n, k, alpha, beta, y + i, ldy, carry);
  for (; i + 4 <= r1; i += 4) row_block<4, TB>(w + i * ldw, ldw, x, ldx, n, k, alpha, beta, y + i, ldy, carry);
  for (; i < r1; ++i) row_block<1, TB>(w + i * ldw, ldw, x, ldx, n, k, alpha, beta, y + i, ldy, carry);
}

// Tokens per group: one group's carried accumulators (24 KiB at 64 tokens)
// stay in L1 beside W's chunk. More tokens go in equal groups, each streaming
// W once more; past ~128 tokens Eigen's GEMM is as fast (backend.hpp).
inline constexpr index_t token_group = 64;

/// Rows [r0, r1) of W against all n tokens: y(:, r0:r1) = beta y + alpha X W(r0:r1)^T.
/// Pointers are to row-major storage with the given leading dimensions.
/// 6 rows x 4 tokens: 24 accumulators + 6 W vectors + 1 X vector fill AVX-512's
/// 32 registers (measured 3-8% faster than 4 x 4 for n = 4..64). Two tokens take
/// 8 rows per block over the whole depth (W-bandwidth bound: nothing to reuse
/// from L1). Leftover rows go 4, then 1, at a time.
template <class T>
void rows(const T* w, index_t ldw, index_t r0, index_t r1, const T* x, index_t ldx, index_t n, index_t k,
          T alpha, T beta, T* y, index_t ldy) {
  constexpr index_t TB = 4;
  const index_t groups = (n + token_group - 1) / token_group;
  const index_t per_group = (n + groups - 1) / groups;  // n = 65: 33 + 32, not 64 + 1
  LORA_ASSERT(per_group <= token_group);
  // On the stack (25.5 KiB): forward() allocates nothing but its [n, r]
  // intermediate. Plain T, read and written through memcpy: nvcc, which sees
  // this header in GPU builds, rejects containers of vector types.
  T carry[(token_group / TB + 1) * 6 * TB * simd<T>::width];
  for (index_t t0 = 0; t0 < n; t0 += per_group)
    rows_group(w, ldw, r0, r1, x + t0 * ldx, ldx, std::min(per_group, n - t0), k, alpha, beta, y + t0 * ldy, ldy,
               carry);
}

// ---- few rows times a wide matrix: C = beta C + alpha A B, A [m, k] with m small ----
// Backward's dX = G W for a few tokens (the transposed product of the forward's
// skinny case). Eigen's GEMM packs B (W) for a handful of rows of A. Here a block
// of TB rows x CB vectors of C sits in registers while the depth goes by: one
// row piece of B (CB loads) and TB broadcasts of A per step; B's column panel
// (k x CB vectors, 1 MiB for k = 4096) stays in L2 across the row blocks.

/// Rows [0, TB) of C, columns [0, CB * width): a register block over all k.
template <int TB, int CB, class T>
LORA_FORCE_INLINE void panel_block(const T* a, index_t lda, const T* b, index_t ldb, index_t k, T alpha, T beta,
                                   T* c, index_t ldc) {
  using S = simd<T>;
  using V = typename S::type;
  V acc[TB][CB];
  for (int t = 0; t < TB; ++t)
    for (int q = 0; q < CB; ++q) acc[t][q] = V{};
  for (index_t p = 0; p < k; ++p) {
    V bv[CB];
    for (int q = 0; q < CB; ++q) bv[q] = S::load(b + p * ldb + q * S::width);
    for (int t = 0; t < TB; ++t) {
      const V av = V{} + a[t * lda + p];  // broadcast from memory
      for (int q = 0; q < CB; ++q) acc[t][q] += av * bv[q];
    }
  }
  for (int t = 0; t < TB; ++t)
    for (int q = 0; q < CB; ++q) {
      T* out = c + t * ldc + q * S::width;
      V r = (V{} + alpha) * acc[t][q];
      if (beta != T(0)) r += (V{} + beta) * S::load(out);
      std::memcpy(out, &r, sizeof r);
    }
}

/// All m rows of C, columns [0, CB * width): row blocks of 6, then 4, 2, 1.
template <int CB, class T>
LORA_FORCE_INLINE void panel(const T* a, index_t lda, const T* b, index_t ldb, index_t m, index_t k, T alpha,
                             T beta, T* c, index_t ldc) {
  index_t t = 0;
  for (; t + 6 <= m; t += 6) panel_block<6, CB>(a + t * lda, lda, b, ldb, k, alpha, beta, c + t * ldc, ldc);
  if (t + 4 <= m) {
    panel_block<4, CB>(a + t * lda, lda, b, ldb, k, alpha, beta, c + t * ldc, ldc);
    t += 4;
  }
  if (t + 2 <= m) {
    panel_block<2, CB>(a + t * lda, lda, b, ldb, k, alpha, beta, c + t * ldc, ldc);
    t += 2;
  }
  if (t < m) panel_block<1, CB>(a + t * lda, lda, b, ldb, k, alpha, beta, c + t * ldc, ldc);
}

/// Columns [c0, c1) of C = beta C + alpha A B (row-major, leading dimensions
/// given): 4-vector panels, then single vectors, then a scalar tail.
template <class T>
void columns(const T* a, index_t lda, const T* b, index_t ldb, index_t m, index_t k, T alpha, T beta, T* c,
             index_t ldc, index_t c0, index_t c1) {
  constexpr int W = simd<T>::width;
  // Depth in chunks of 128: a 128 x 4-vector piece of B (32 KiB) stays in L1
  // while every row block of A passes over it; C accumulates across chunks.
  constexpr index_t kc = 128;
  index_t j = c0;
  for (; j + 4 * W <= c1; j += 4 * W)
    for (index_t k0 = 0; k0 < k; k0 += kc)
      panel<4>(a + k0, lda, b + k0 * ldb + j, ldb, m, std::min(kc, k - k0), alpha, k0 == 0 ? beta : T(1), c + j,
               ldc);
  for (; j + W <= c1; j += W) panel<1>(a, lda, b + j, ldb, m, k, alpha, beta, c + j, ldc);
  for (; j < c1; ++j)
    for (index_t t = 0; t < m; ++t) {
      T dot = 0;
      for (index_t p = 0; p < k; ++p) dot += a[t * lda + p] * b[p * ldb + j];
      T& out = c[t * ldc + j];
      out = beta == T(0) ? alpha * dot : beta * out + alpha * dot;
    }
}

/// The operand types the kernel takes: row-major with unit inner stride and
/// direct access (Matrix, Map, row Blocks of them), in memory the kernel can
/// address by pointer and leading dimension.
template <class M>
inline constexpr bool row_major_direct_v =
    (int(M::Flags) & Eigen::DirectAccessBit) && (int(M::Flags) & Eigen::RowMajorBit) &&
    (M::InnerStrideAtCompileTime == 1 || M::InnerStrideAtCompileTime == Eigen::Dynamic);

}  // namespace lora::detail::skinny
