// backend/eigen/skinny.hpp: Y = beta Y + alpha X W^T for few tokens (skinny
// products), W streamed once. Eigen's GEMM packs both operands and its micro-
// kernel is shaped for many rows of X; with 2..64 tokens it runs at 20-35% of
// peak. Here each 6-row block of W meets every 4-token block of X in registers
// (the last n % 4 tokens in one narrower block): 24 vector accumulators, 10
// loads per 24 FMAs, dot products along `in`, which is contiguous in both
// operands (PyTorch layout), so nothing is packed.
#pragma once

#ifndef LORA_UMBRELLA_INCLUDED
#error "Include <lora/lora.hpp> instead of lora/backend/eigen/skinny.hpp."
#endif

#include <Eigen/Core>
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

/// acc[i][j] = dot(w row i, x row j) over k elements, for RB rows of W and TB
/// tokens, then y(j, i) = beta y(j, i) + alpha acc[i][j].
template <int RB, int TB, class T>
LORA_FORCE_INLINE void block(const T* w, index_t ldw, const T* x, index_t ldx, index_t k, T alpha, T beta,
                             T* y, index_t ldy) {
  using S = simd<T>;
  using V = typename S::type;
  V acc[RB][TB];
  for (int i = 0; i < RB; ++i)
    for (int j = 0; j < TB; ++j) acc[i][j] = V{};
  index_t p = 0;
  for (; p + S::width <= k; p += S::width) {
    V wv[RB];
    for (int i = 0; i < RB; ++i) wv[i] = S::load(w + i * ldw + p);
    for (int j = 0; j < TB; ++j) {
      const V xv = S::load(x + j * ldx + p);
      for (int i = 0; i < RB; ++i) acc[i][j] += wv[i] * xv;
    }
  }
  for (int i = 0; i < RB; ++i)
    for (int j = 0; j < TB; ++j) {
      T dot = S::sum(acc[i][j]);
      for (index_t q = p; q < k; ++q) dot += w[i * ldw + q] * x[j * ldx + q];  // the k % width tail
      T& out = y[j * ldy + i];
      out = beta == T(0) ? alpha * dot : beta * out + alpha * dot;
    }
}

/// One block of RB rows of W, depth [0, k), against all n tokens in blocks of
/// TB, the last n % TB tokens in one narrower block (never one token at a time,
/// which would load W's rows once per token).
template <int RB, int TB, class T>
LORA_FORCE_INLINE void row_block(const T* w, index_t ldw, const T* x, index_t ldx, index_t n, index_t k, T alpha,
                                 T beta, T* y, index_t ldy) {
  index_t j = 0;
  for (; j + TB <= n; j += TB) block<RB, TB>(w, ldw, x + j * ldx, ldx, k, alpha, beta, y + j * ldy, ldy);
  static_assert(TB == 4, "the tail below handles 1..3 leftover tokens");
  switch (n - j) {
    case 3: block<RB, 3>(w, ldw, x + j * ldx, ldx, k, alpha, beta, y + j * ldy, ldy); break;
    case 2: block<RB, 2>(w, ldw, x + j * ldx, ldx, k, alpha, beta, y + j * ldy, ldy); break;
    case 1: block<RB, 1>(w, ldw, x + j * ldx, ldx, k, alpha, beta, y + j * ldy, ldy); break;
    default: break;
  }
}

/// Rows [r0, r1) of W against all n tokens: y(:, r0:r1) = beta y + alpha X W(r0:r1)^T.
/// Pointers are to row-major storage with the given leading dimensions.
/// 6 rows x 4 tokens: 24 accumulators + 6 W vectors + 1 X vector fill AVX-512's
/// 32 registers (measured 3-8% faster than 4 x 4 for n = 4..64). Two tokens take
/// 8 rows per block (W-bandwidth bound). Leftover rows go 4, then 1, at a time.
/// (Cutting the depth into L1-sized chunks was tried: each chunk then pays the
/// horizontal sums again, and it measured 10-20% slower for n = 4..32.)
template <class T>
void rows(const T* w, index_t ldw, index_t r0, index_t r1, const T* x, index_t ldx, index_t n, index_t k,
          T alpha, T beta, T* y, index_t ldy) {
  constexpr int TB = 4;
  index_t i = r0;
  if (n == 2)
    for (; i + 8 <= r1; i += 8) block<8, 2>(w + i * ldw, ldw, x, ldx, k, alpha, beta, y + i, ldy);
  for (; i + 6 <= r1; i += 6) row_block<6, TB>(w + i * ldw, ldw, x, ldx, n, k, alpha, beta, y + i, ldy);
  for (; i + 4 <= r1; i += 4) row_block<4, TB>(w + i * ldw, ldw, x, ldx, n, k, alpha, beta, y + i, ldy);
  for (; i < r1; ++i) row_block<1, TB>(w + i * ldw, ldw, x, ldx, n, k, alpha, beta, y + i, ldy);
}

/// The operand types the kernel takes: row-major with unit inner stride and
/// direct access (Matrix, Map, row Blocks of them), in memory the kernel can
/// address by pointer and leading dimension.
template <class M>
inline constexpr bool row_major_direct_v =
    (int(M::Flags) & Eigen::DirectAccessBit) && (int(M::Flags) & Eigen::RowMajorBit) &&
    (M::InnerStrideAtCompileTime == 1 || M::InnerStrideAtCompileTime == Eigen::Dynamic);

}  // namespace lora::detail::skinny
