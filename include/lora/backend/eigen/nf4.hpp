// backend/eigen/nf4.hpp: the CPU products over an NF4 base, W decoded inside
// them and never materialised (the AVX-512 GEMV for one token, a decoded tile
// then Eigen's product for more), the public nf4_gemv / nf4_gemm /
// nf4_gemm_transposed, and quantized_traits<NF4Matrix>, which makes an
// NF4Matrix a base weight of AdaptedLinear (QLoRA) on the Eigen backend.
//
//   lora::nf4_gemv(Wq, x, y);            // y = W x, one token, W never materialised
//   lora::nf4_gemm(Wq, X, Y, 1.f, 1.f);  // Y [n, out] += X [n, in] W^T
//   lora::nf4_gemm_transposed(Wq, G, dX); // dX [n, in] = G [n, out] W (backward)
#pragma once

#ifndef LORA_UMBRELLA_INCLUDED
#error "Include <lora/lora.hpp> instead of lora/backend/eigen/nf4.hpp."
#endif

#include <Eigen/Core>
#include <algorithm>
#include <span>
#include <type_traits>
#include <vector>

#include "../../quant/nf4_matrix.hpp"
#include "backend.hpp"

namespace lora {

namespace detail::nf4k {

// Dot product with 16 partial sums, a pattern compilers turn into one vector
// FMA per 16 floats without -ffast-math.
inline float dot(const float* a, const float* b, index_t n) {
  float acc[16] = {};
  index_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int k = 0; k < 16; ++k) acc[k] += a[i + k] * b[i + k];
  float tail = 0.0f;
  for (; i < n; ++i) tail += a[i] * b[i];
  float sum = 0.0f;
  for (int k = 0; k < 16; ++k) sum += acc[k];
  return sum + tail;
}

// Portable row kernel for any shape: decode each (row, block) segment into a
// small tile and dot it with the matching piece of x.
inline float row_dot_generic(const NF4Matrix& W, index_t r, const float* x, float* tile) {
  constexpr index_t chunk = 256;
  const index_t f0 = r * W.cols();
  const index_t f_end = f0 + W.cols();
  const std::uint8_t* packed = W.packed().data();
  float acc = 0.0f;
  index_t f = f0;
  while (f < f_end) {
    const index_t b = f / W.block_size();
    const index_t seg_end = std::min((b + 1) * W.block_size(), f_end);
    const float s = W.block_scale(b);
    float part = 0.0f;
    for (index_t g = f; g < seg_end; g += chunk) {
      const index_t len = std::min(chunk, seg_end - g);
      decode_run(packed, g, len, 1.0f, tile);
      part += dot(tile, x + (g - f0), len);
    }
    acc += s * part;
    f = seg_end;
  }
  return acc;
}

#if LORA_NF4_AVX512
// Fast path (in % 64 == 0, block_size % 64 == 0): x is pre-permuted per
// 64-element chunk so that a 32-byte load widened to 16-bit lanes yields four
// code vectors by shifting (0, 4, 8, 12 bits) and one permute each, with no
// interleaving. Word L of a chunk holds bytes 2L, 2L+1 = elements 4L..4L+3;
// shift 4k selects element 4L + (k ^ 1). So xp[c*64 + 16k + L] = x[c*64 + 4L + (k^1)].
inline void permute_x64(const float* x, index_t n, float* xp) {
  for (index_t c = 0; c < n; c += 64)
    for (int k = 0; k < 4; ++k)
      for (int L = 0; L < 16; ++L) xp[c + 16 * k + L] = x[c + 4 * L + (k ^ 1)];
}

// Scales of blocks [b_first, b_first + count), computed before the row's FMA
// chain. Double-quantised scales are decoded 16 at a time with gathers: an
// explicit fp32 multiply then add, the same roundings as nf4::decode_scale.
LORA_NF4_AVX512_TARGET inline void row_scales(const NF4Matrix& W, index_t b_first, index_t count, float* out) {
  if (!W.double_quantized()) {
    std::copy_n(W.absmax().data() + b_first, count, out);
    return;
  }
  const std::uint8_t* q8 = W.absmax_q8().data() + b_first;
  const float* map = W.map8().data();
  const float* absmax2 = W.absmax2().data();
  const __m512 offset = _mm512_set1_ps(W.absmax_offset());
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  index_t b = 0;
  for (; b + 16 <= count; b += 16) {
    const __m512i q = _mm512_maskz_cvtepu8_epi32(all16, _mm_loadu_si128(reinterpret_cast<const __m128i*>(q8 + b)));
    const __m512i group = _mm512_maskz_srli_epi32(
        all16, _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(b_first + b)), lane), 8);
    const __m512 m = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), all16, q, map, 4);
    const __m512 a2 = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), all16, group, absmax2, 4);
    __m512 scaled = _mm512_mul_ps(m, a2);
#if defined(__GNUC__)
    __asm__("" : "+v"(scaled));  // keep the product rounded (see quant/rounding.hpp)
#endif
    _mm512_storeu_ps(out + b, _mm512_add_ps(scaled, offset));
  }
  for (; b < count; ++b) out[b] = W.block_scale(b_first + b);
}

LORA_NF4_AVX512_TARGET inline float row_dot_avx512(const NF4Matrix& W, index_t r, const float* xp, float* scales) {
  const __m512 lut = lut512();
  const index_t in = W.cols();
  const index_t f0 = r * in;
  const int shift = std::countr_zero(static_cast<std::uint64_t>(W.block_size()));
  const index_t b_first = f0 >> shift;
  const index_t b_count = ((f0 + in - 1) >> shift) - b_first + 1;
  row_scales(W, b_first, b_count, scales);
  const std::uint8_t* p = W.packed().data() + f0 / 2;
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();  // two chains hide FMA latency
  for (index_t j = 0; j < in; j += 64) {
    // Codes stream from memory once: ask for them LORA_NF4_PREFETCH_BYTES ahead,
    // more than the out-of-order window covers on its own.
    if (LORA_NF4_PREFETCH_BYTES > 0 && (j & 127) == 0)
      _mm_prefetch(reinterpret_cast<const char*>(reinterpret_cast<std::uintptr_t>(p + j / 2) + LORA_NF4_PREFETCH_BYTES),
                   _MM_HINT_T0);  // integer arithmetic: the address may lie past the end (prefetch never faults)
    const __m512i w = _mm512_maskz_cvtepu16_epi32(all16, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + j / 2)));
    const float* xc = xp + j;
    const __m512 c0 = _mm512_mul_ps(_mm512_maskz_permutexvar_ps(all16, w, lut), _mm512_loadu_ps(xc));
    const __m512 c1 = _mm512_mul_ps(_mm512_maskz_permutexvar_ps(all16, _mm512_maskz_srli_epi32(all16, w, 4), lut), _mm512_loadu_ps(xc + 16));
    const __m512 c2 = _mm512_fmadd_ps(_mm512_maskz_permutexvar_ps(all16, _mm512_maskz_srli_epi32(all16, w, 8), lut), _mm512_loadu_ps(xc + 32), c0);
    const __m512 c3 = _mm512_fmadd_ps(_mm512_maskz_permutexvar_ps(all16, _mm512_maskz_srli_epi32(all16, w, 12), lut), _mm512_loadu_ps(xc + 48), c1);
    const __m512 s = _mm512_set1_ps(scales[((f0 + j) >> shift) - b_first]);
    if ((j & 64) == 0)
      acc0 = _mm512_fmadd_ps(s, _mm512_add_ps(c2, c3), acc0);
    else
      acc1 = _mm512_fmadd_ps(s, _mm512_add_ps(c2, c3), acc1);
  }
  alignas(64) float lanes[16];  // once per row; _mm512_reduce_add_ps trips GCC 12's warning
  _mm512_store_ps(lanes, _mm512_add_ps(acc0, acc1));
  float sum = 0.0f;
  for (float v : lanes) sum += v;
  return sum;
}
#endif

// Per-thread scratch that only grows (no allocation per call once warm).
inline float* scratch(std::vector<float>& buf, index_t n) {
  if (buf.size() < static_cast<std::size_t>(n)) buf.resize(static_cast<std::size_t>(n));
  return buf.data();
}

}  // namespace detail::nf4k

namespace detail::nf4k {

// The kernels work on rows [r0, r0 + nr) of W, so expression slices (the
// QLoRA node's slice_rows) reuse them; the public functions pass all rows.

inline void gemv_rows(const NF4Matrix& W, index_t r0, index_t nr, const float* x, float* y, float alpha,
                      float beta) {
  [[maybe_unused]] const index_t in = W.cols();
  [[maybe_unused]] const bool parallel = nr * in >= LORA_NF4_PARALLEL_MIN_ELEMENTS;
  const index_t r_end = r0 + nr;
  const auto finish = [&](index_t r, float acc) {
    float& out = y[r - r0];
    out = beta == 0.0f ? alpha * acc : alpha * acc + beta * out;
  };
#if LORA_NF4_AVX512
  if (in % 64 == 0 && W.block_size() % 64 == 0 && cpu_has_avx512()) {
    thread_local std::vector<float> xbuf;
    float* xp = scratch(xbuf, in);
    permute_x64(x, in, xp);
    LORA_NF4_OMP_FOR_IF(parallel)
    for (index_t r = r0; r < r_end; ++r) {
      thread_local std::vector<float> sbuf;
      float* scales = scratch(sbuf, in / nf4::min_block_size + 2);
      finish(r, row_dot_avx512(W, r, xp, scales));
    }
    return;
  }
#endif
  // Generic path (any shape; and every shape without AVX-512): tile decode + dot.
  LORA_NF4_OMP_FOR_IF(parallel)
  for (index_t r = r0; r < r_end; ++r) {
    thread_local std::vector<float> tbuf;
    float* tile = scratch(tbuf, 256);
    finish(r, row_dot_generic(W, r, x, tile));
  }
}

// The products below are templates on the scalar (only float exists) so
// that their Eigen products are compiled where they are used, not by every TU
// that includes <lora/lora.hpp>: a non-template inline function's body is
// instantiated even when nothing calls it (1.3 s of compile time here).
template <class T>
using dense_t = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <class T = float>
using dense_ref = Eigen::Ref<dense_t<T>>;
template <class T = float>
using const_dense_ref = Eigen::Ref<const dense_t<T>>;

// Y [n, nr] = beta Y + alpha X W[r0:r0+nr]^T.
template <class T>
void gemm_rows(const NF4Matrix& W, index_t r0, index_t nr, const const_dense_ref<T>& X, dense_ref<T> Y, T alpha,
               T beta) {
  const index_t n = X.rows();
  const index_t in = W.cols();
  if (n == 0 || nr == 0) return;
  if (n == 1) {
    gemv_rows(W, r0, nr, X.data(), Y.data(), alpha, beta);
    return;
  }
  if (beta == 0.0f)
    Y.setZero();
  else if (beta != 1.0f)
    Y *= beta;
  if (in == 0) return;
  // Each tile's product repacks X, so larger batches take 4x taller tiles (a 4 MiB
  // tile, out of L2 but still cheaper than repacking a large X 4x as often).
  const index_t tile_floats = n > 32 ? 4 * LORA_NF4_GEMM_TILE_FLOATS : LORA_NF4_GEMM_TILE_FLOATS;
  const index_t tile_rows = std::clamp<index_t>(tile_floats / in, 16, 4096);
  const index_t tiles = (nr + tile_rows - 1) / tile_rows;
  LORA_NF4_OMP_FOR_IF(tiles > 1 && nr * in >= LORA_NF4_PARALLEL_MIN_ELEMENTS)
  for (index_t t = 0; t < tiles; ++t) {
    thread_local std::vector<float> tbuf;
    const index_t off = t * tile_rows;
    const index_t tr = std::min(tile_rows, nr - off);
    float* tile = scratch(tbuf, tr * in);
    W.dequantize_rows(r0 + off, tr, tile);
    const Eigen::Map<const dense_t<T>> Wt(tile, tr, in);            // (tr, in)
    Y.middleCols(off, tr).noalias() += alpha * X * Wt.transpose();  // (n, tr)
  }
}

// dX [n, in] = beta dX + alpha G W[r0:r0+nr], G [n, nr].
template <class T>
void gemm_transposed_rows(const NF4Matrix& W, index_t r0, index_t nr, const const_dense_ref<T>& G, dense_ref<T> dX,
                          T alpha, T beta) {
  if (beta == 0.0f)
    dX.setZero();
  else if (beta != 1.0f)
    dX *= beta;
  const index_t in = W.cols();
  if (G.rows() == 0 || nr == 0 || in == 0) return;
  const index_t tile_rows = std::clamp<index_t>(LORA_NF4_GEMM_TILE_FLOATS / in, 16, 1024);
  thread_local std::vector<float> tbuf;
  float* tile = scratch(tbuf, std::min(tile_rows, nr) * in);
  for (index_t off = 0; off < nr; off += tile_rows) {
    const index_t tr = std::min(tile_rows, nr - off);
    W.dequantize_rows(r0 + off, tr, tile);
    const Eigen::Map<const dense_t<T>> Wt(tile, tr, in);  // (tr, in)
    dX.noalias() += alpha * G.middleCols(off, tr) * Wt;   // (n, in)
  }
}

}  // namespace detail::nf4k

/// y = beta * y + alpha * W x for one token: W [out, in] in NF4, x [in], y [out].
/// W is decoded block by block inside the dot products and never materialised.
/// beta == 0 overwrites y without reading it (BLAS convention). Rows run in
/// parallel when compiled with OpenMP. Throws ShapeError on a size mismatch.
inline void nf4_gemv(const NF4Matrix& W, std::span<const float> x, std::span<float> y, float alpha = 1.0f,
                     float beta = 0.0f) {
  if (static_cast<index_t>(x.size()) != W.cols())
    lora::detail::raise<ShapeError>("nf4_gemv: x has ", x.size(), " elements, expected W.cols() = ", W.cols());
  if (static_cast<index_t>(y.size()) != W.rows())
    lora::detail::raise<ShapeError>("nf4_gemv: y has ", y.size(), " elements, expected W.rows() = ", W.rows());
  // y is written while x is still being read.
  if (!x.empty() && !y.empty() && x.data() < y.data() + y.size() && y.data() < x.data() + x.size())
    lora::detail::raise<ShapeError>("nf4_gemv: x and y share memory; the product cannot run in place");
  detail::nf4k::gemv_rows(W, 0, W.rows(), x.data(), y.data(), alpha, beta);
}

/// Eigen vectors: y = beta * y + alpha * W x.
template <class T = float>  // a template only to defer compiling it (see detail::nf4k::dense_t)
void nf4_gemv(const NF4Matrix& W, const std::type_identity_t<Eigen::Ref<const Eigen::Matrix<T, Eigen::Dynamic, 1>>>& x,
              std::type_identity_t<Eigen::Ref<Eigen::Matrix<T, Eigen::Dynamic, 1>>> y, float alpha = 1.0f,
              float beta = 0.0f) {
  nf4_gemv(W, std::span<const float>(x.data(), std::size_t(x.size())),
           std::span<float>(y.data(), std::size_t(y.size())), alpha, beta);
}

/// Y = beta * Y + alpha * X W^T for a batch: X [n, in] and Y [n, out], both
/// row-major (each token contiguous). A tile of W's rows at a time is dequantised
/// into a per-thread buffer (1 MiB, 4 MiB above 32 tokens) and multiplied with Eigen; n == 1 goes
/// to nf4_gemv. beta == 0 overwrites Y. Throws ShapeError on a size mismatch.
template <class T = float>  // a template only to defer compiling it (see detail::nf4k::dense_t)
void nf4_gemm(const NF4Matrix& W, const std::type_identity_t<detail::nf4k::const_dense_ref<T>>& X,
              std::type_identity_t<detail::nf4k::dense_ref<T>> Y, float alpha = 1.0f, float beta = 0.0f) {
  if (X.cols() != W.cols())
    lora::detail::raise<ShapeError>("nf4_gemm: X has ", X.cols(), " columns, expected W.cols() = ", W.cols());
  if (Y.rows() != X.rows() || Y.cols() != W.rows())
    lora::detail::raise<ShapeError>("nf4_gemm: Y is ", Y.rows(), " x ", Y.cols(), ", expected ", X.rows(),
                                     " x ", W.rows(), " (X.rows() x W.rows())");
  if (EigenBackend::overlaps(X, Y))
    lora::detail::raise<ShapeError>("nf4_gemm: X and Y share memory; the product cannot run in place");
  detail::nf4k::gemm_rows<T>(W, 0, W.rows(), X, Y, alpha, beta);
}

/// dX = beta * dX + alpha * G W, the product the backward pass needs through a
/// frozen NF4 base: G [n, out] and dX [n, in], both row-major. Same row tiles as
/// nf4_gemm; the tiles run in order (each adds into all of dX), Eigen may thread
/// the products. beta == 0 overwrites dX. Throws ShapeError on a size mismatch.
template <class T = float>  // a template only to defer compiling it (see detail::nf4k::dense_t)
void nf4_gemm_transposed(const NF4Matrix& W, const std::type_identity_t<detail::nf4k::const_dense_ref<T>>& G,
                         std::type_identity_t<detail::nf4k::dense_ref<T>> dX, float alpha = 1.0f,
                         float beta = 0.0f) {
  if (G.cols() != W.rows())
    lora::detail::raise<ShapeError>("nf4_gemm_transposed: G has ", G.cols(), " columns, expected W.rows() = ",
                                     W.rows());
  if (dX.rows() != G.rows() || dX.cols() != W.cols())
    lora::detail::raise<ShapeError>("nf4_gemm_transposed: dX is ", dX.rows(), " x ", dX.cols(), ", expected ",
                                     G.rows(), " x ", W.cols(), " (G.rows() x W.cols())");
  if (EigenBackend::overlaps(G, dX))
    lora::detail::raise<ShapeError>("nf4_gemm_transposed: G and dX share memory; the product cannot run in place");
  detail::nf4k::gemm_transposed_rows<T>(W, 0, W.rows(), G, dX, alpha, beta);
}

template <>
struct quantized_traits<NF4Matrix> {
  static constexpr bool known = true;
  using scalar = float;
  using backend = EigenBackend;
  static constexpr int rows = dynamic;
  static constexpr int cols = dynamic;

  /// Y [n, nr] = beta Y + alpha X W[r0 : r0 + nr]^T.
  template <class X, class Y>
  static void gemm_nt(const NF4Matrix& q, index_t r0, index_t nr, float alpha, const X& x, float beta, Y& y) {
    with_row_major(y, [&](auto&& out) { detail::nf4k::gemm_rows<float>(q, r0, nr, x, out, alpha, beta); });
  }
  /// dX [n, in] = beta dX + alpha G W[r0 : r0 + nr], G [n, nr].
  template <class G, class DX>
  static void gemm_nn(const NF4Matrix& q, index_t r0, index_t nr, float alpha, const G& g, float beta, DX& dx) {
    with_row_major(dx, [&](auto&& out) { detail::nf4k::gemm_transposed_rows<float>(q, r0, nr, g, out, alpha, beta); });
  }
  /// D [nr, in] = beta D + alpha W[r0 : r0 + nr], a tile of rows at a time.
  template <class D>
  static void assign(const NF4Matrix& q, index_t r0, index_t nr, float alpha, float beta, D& dst) {
    const index_t in = q.cols();
    if (nr == 0 || in == 0) return;
    const index_t tile_rows = std::max<index_t>(1, (index_t(1) << 16) / in);
    thread_local std::vector<float> buf;
    float* tile = detail::nf4k::scratch(buf, std::min(tile_rows, nr) * in);
    for (index_t off = 0; off < nr; off += tile_rows) {
      const index_t tr = std::min(tile_rows, nr - off);
      q.dequantize_rows(r0 + off, tr, tile);
      EigenBackend::axpby(alpha, Eigen::Map<const NF4Matrix::dense_matrix>(tile, tr, in), beta,
                           dst.middleRows(off, tr));
    }
  }

 private:
  // The kernels write row-major memory with unit inner stride; any other
  // destination (a column-major Eigen matrix) goes through a row-major copy.
  template <class M, class F>
  static void with_row_major(M& m, F&& f) {
    if constexpr (std::is_constructible_v<detail::nf4k::dense_ref<>, M&>) {
      f(detail::nf4k::dense_ref<>(m));
    } else {
      NF4Matrix::dense_matrix tmp = m;
      f(detail::nf4k::dense_ref<>(tmp));
      m = tmp;
    }
  }
};

}  // namespace lora
