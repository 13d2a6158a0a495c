// backend/eigen/half.hpp: 16-bit base weights on the CPU. A frozen W stored as
// Eigen::bfloat16 or Eigen::half (an owned RowMatrix, or an Eigen::Map over
// PyTorch's bf16 / fp16 bytes, no copy) under float adapters: storage scalar
// 16-bit, compute scalar float. Every product reads W in 16 bits and
// accumulates in fp32:
//   n = 1     a GEMV that widens 16 W values per step in registers (AVX-512:
//             bf16 by a 16-bit shift, fp16 by vcvtph2ps), W read once, half the
//             bytes of the fp32 GEMV
//   n >= 2    per thread, tiles of W's rows widened into an L2-sized fp32 buffer,
//             then the fp32 product kernels (skinny / Eigen) on the tile
//   backward  dX = G W through the same tiles; materialise likewise
// The base plugs in as quantized_traits (backend/traits.hpp) like an NF4 base:
// the layer, lora::train and the expressions use it unchanged; merge() cannot
// add into it in place (lora::merge_rounded, merge.hpp, rounds once and reports
// the error).
#pragma once

#ifndef LORA_UMBRELLA_INCLUDED
#error "Include <lora/lora.hpp> instead of lora/backend/eigen/half.hpp."
#endif

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../../adapted_linear.hpp"
#include "backend.hpp"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace lora {

/// 16-bit storage scalars a base weight may have (compute scalar float).
template <class S>
inline constexpr bool is_half_storage_v = std::is_same_v<S, Eigen::bfloat16> || std::is_same_v<S, Eigen::half>;

namespace detail::half {


#if defined(__AVX512F__)
/// 16 values at p widened to fp32 in a register: bf16 is the high half of an
/// fp32 (a 16-bit shift), fp16 converts with vcvtph2ps.
template <class S>
LORA_FORCE_INLINE __m512 load16(const S* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  if constexpr (std::is_same_v<S, Eigen::bfloat16>)
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  else
    return _mm512_cvtph_ps(h);
}
#endif

/// out[0, len) = float(src[0, len)).
template <class S>
inline void widen(const S* src, index_t len, float* out) {
  index_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= len; i += 16) _mm512_storeu_ps(out + i, load16(src + i));
#endif
  for (; i < len; ++i) out[i] = static_cast<float>(src[i]);
}

/// sum_i float(w[i]) x[i], fp32 accumulation.
template <class S>
inline float dot(const S* w, const float* x, index_t len) {
  index_t i = 0;
  float acc = 0.0f;
#if defined(__AVX512F__)
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
  const auto load = [](const S* p) { return load16(p); };
  for (; i + 32 <= len; i += 32) {
    a0 = _mm512_fmadd_ps(load(w + i), _mm512_loadu_ps(x + i), a0);
    a1 = _mm512_fmadd_ps(load(w + i + 16), _mm512_loadu_ps(x + i + 16), a1);
  }
  for (; i + 16 <= len; i += 16) a0 = _mm512_fmadd_ps(load(w + i), _mm512_loadu_ps(x + i), a0);
  acc = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
#endif
  for (; i < len; ++i) acc += static_cast<float>(w[i]) * x[i];
  return acc;
}

/// out[k] = sum_i float(w[k * ldw + i]) x[i] for 4 rows at once: four row streams
/// in flight and each x vector loaded once for all of them (one row at a time
/// read W at 25 GB/s where the fp32 GEMV reaches 35, 8192^2 on 2 cores).
template <class S>
inline void dot4(const S* w, index_t ldw, const float* x, index_t len, float* out) {
  index_t i = 0;
  float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#if defined(__AVX512F__)
  const auto load = [](const S* p) { return load16(p); };
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
  for (; i + 16 <= len; i += 16) {
    const __m512 xv = _mm512_loadu_ps(x + i);
    a0 = _mm512_fmadd_ps(load(w + i), xv, a0);
    a1 = _mm512_fmadd_ps(load(w + ldw + i), xv, a1);
    a2 = _mm512_fmadd_ps(load(w + 2 * ldw + i), xv, a2);
    a3 = _mm512_fmadd_ps(load(w + 3 * ldw + i), xv, a3);
  }
  acc[0] = _mm512_reduce_add_ps(a0);
  acc[1] = _mm512_reduce_add_ps(a1);
  acc[2] = _mm512_reduce_add_ps(a2);
  acc[3] = _mm512_reduce_add_ps(a3);
#endif
  for (; i < len; ++i)
    for (int k = 0; k < 4; ++k) acc[k] += static_cast<float>(w[k * ldw + i]) * x[i];
  for (int k = 0; k < 4; ++k) out[k] = acc[k];
}

using fview = eigen::const_view<float>;
using fmut = eigen::mut_view<float>;

/// A 16-bit W as (pointer, rows, cols, row stride).
template <class S>
struct weight_ref {
  const S* data;
  index_t rows, cols, stride;
  const S* row(index_t r) const { return data + r * stride; }
};

template <class S>
thread_local std::vector<float> tile_buffer;

inline index_t tile_rows_for(index_t in, index_t n) {
  const index_t floats = n > 32 ? 4 * index_t(LORA_HALF_TILE_FLOATS) : index_t(LORA_HALF_TILE_FLOATS);
  return std::max<index_t>(16, floats / std::max<index_t>(in, 1));
}

/// Y [n, nr] = beta Y + alpha X W[r0 : r0 + nr]^T.
template <class S>
void gemm_nt(weight_ref<S> w, index_t r0, index_t nr, float alpha, fview x, float beta, fmut y) {
  const index_t n = x.rows(), in = w.cols;
  if (n == 0 || nr == 0) return;
  if (n == 1) {
    eigen::for_row_slices(nr, nr * in, [&](index_t begin, index_t end) {
      const auto finish = [&](index_t r, float d) {
        float& out = y(0, r);
        out = beta == 0.0f ? alpha * d : alpha * d + beta * out;
      };
      index_t r = begin;
      for (; r + 4 <= end; r += 4) {
        float d[4];
        dot4(w.row(r0 + r), w.stride, x.data(), in, d);
        for (int k = 0; k < 4; ++k) finish(r + k, d[k]);
      }
      for (; r < end; ++r) finish(r, dot(w.row(r0 + r), x.data(), in));
    });
    return;
  }
  const index_t tile = tile_rows_for(in, n);
  eigen::for_row_slices(nr, nr * in, [&](index_t begin, index_t end) {
    std::vector<float>& buf = tile_buffer<S>;
    buf.resize(static_cast<std::size_t>(std::min(tile, end - begin) * in));
    for (index_t t = begin; t < end; t += tile) {
      const index_t tr = std::min(tile, end - t);
      for (index_t r = 0; r < tr; ++r) widen(w.row(r0 + t + r), in, buf.data() + r * in);
      const fview wt(buf.data(), tr, in, Eigen::OuterStride<>(in));  // (tr, in) in fp32
      eigen::product_kernels<float>::gemm_nt(alpha, x, wt, beta, eigen::cols_of(y, t, t + tr));
    }
  });
}

/// dX [n, in] = beta dX + alpha G W[r0 : r0 + nr], G [n, nr].
template <class S>
void gemm_nn(weight_ref<S> w, index_t r0, index_t nr, float alpha, fview g, float beta, fmut dx) {
  const index_t in = w.cols;
  if (nr == 0) {
    if (beta == 0.0f) dx.setZero();
    else if (beta != 1.0f) dx *= beta;
    return;
  }
  const index_t tile = tile_rows_for(in, g.rows());
  std::vector<float>& buf = tile_buffer<S>;  // reused across calls, as the forward's: no allocation per step
  buf.resize(static_cast<std::size_t>(std::min(tile, nr) * in));
  for (index_t t = 0; t < nr; t += tile) {
    const index_t tr = std::min(tile, nr - t);
    for (index_t r = 0; r < tr; ++r) widen(w.row(r0 + t + r), in, buf.data() + r * in);
    const fview wt(buf.data(), tr, in, Eigen::OuterStride<>(in));  // (tr, in)
    eigen::product_kernels<float>::gemm_nn(alpha, eigen::cols_of(g, t, t + tr), wt, t == 0 ? beta : 1.0f, dx);
  }
}

}  // namespace detail::half

/// A row-major Eigen matrix (owned, Map, Block) of bfloat16 or half is a base
/// weight read in 16 bits with fp32 arithmetic.
template <class M>
struct quantized_traits<M, std::enable_if_t<std::is_base_of_v<Eigen::EigenBase<M>, M> &&
                                            is_half_storage_v<typename M::Scalar>>> {
  static constexpr bool known = true;
  using scalar = float;  ///< the compute scalar: adapters, activations, accumulation
  using storage = typename M::Scalar;
  using backend = EigenBackend;
  static constexpr int rows = M::RowsAtCompileTime;
  static constexpr int cols = M::ColsAtCompileTime;
  static_assert((int(M::Flags) & Eigen::DirectAccessBit) && ((int(M::Flags) & Eigen::RowMajorBit) || cols == 1),
                "lora: a 16-bit base weight must be row-major with direct access (PyTorch layout): "
                "RowMatrix<Eigen::bfloat16> or an Eigen::Map of one");

  template <class X, class Y>
  static void gemm_nt(const M& q, index_t r0, index_t nr, float alpha, const X& x, float beta, Y& y) {
    with_views(x, y, [&](auto xv, auto yv) { detail::half::gemm_nt(ref(q), r0, nr, alpha, xv, beta, yv); });
  }
  template <class G, class DX>
  static void gemm_nn(const M& q, index_t r0, index_t nr, float alpha, const G& g, float beta, DX& dx) {
    with_views(g, dx, [&](auto gv, auto dv) { detail::half::gemm_nn(ref(q), r0, nr, alpha, gv, beta, dv); });
  }
  /// D [nr, in] = beta D + alpha float(W[r0 : r0 + nr]), a row at a time.
  template <class D>
  static void assign(const M& q, index_t r0, index_t nr, float alpha, float beta, D& dst) {
    std::vector<float> row(static_cast<std::size_t>(q.cols()));
    for (index_t r = 0; r < nr; ++r) {
      detail::half::widen(ref(q).row(r0 + r), q.cols(), row.data());
      EigenBackend::axpby(alpha, Eigen::Map<const RowMatrix<float, 1, dynamic>>(row.data(), 1, q.cols()), beta,
                           dst.middleRows(r, 1));
    }
  }
  /// Bytes W occupies (memory accounting).
  static double storage_bytes(const M& q) { return double(q.size()) * double(sizeof(storage)); }

 private:
  static detail::half::weight_ref<storage> ref(const M& q) {
    return {q.data(), q.rows(), q.cols(), q.rows() <= 1 ? q.cols() : q.outerStride()};
  }
  // The kernels take canonical fp32 views; other operands (column-major,
  // strided) go through row-major copies.
  template <class A, class B, class F>
  static void with_views(const A& a, B& b, F&& f) {
    namespace de = detail::eigen;
    using AT = std::remove_cvref_t<A>;
    using BT = std::remove_cvref_t<B>;
    if constexpr (de::viewable_v<AT, float> && de::viewable_v<BT, float>) {
      if (de::fits_view(a) && de::fits_view(b)) return f(de::view<float>(a), de::view_mut<float>(b));
    }
    const RowMatrix<float> ac = a;
    RowMatrix<float> bc = b;
    f(de::view<float>(ac), de::view_mut<float>(bc));
    b = bc;
  }
};

}  // namespace lora
