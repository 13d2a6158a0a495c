// backend/eigen/products.hpp: the three products of the Eigen backend, written
// once per scalar type over canonical views.
//
// Why canonical views: every distinct operand type (a static-rank
// Matrix<float, 8, Dynamic>, a Map of the workspace, a Block of W) used to
// instantiate Eigen's GEMM/GEMV machinery again, ~9 s of compile time per
// static rank. Here every row-major operand with unit column stride is seen as
// the same Map<const RowMatrix<T>, OuterStride<>>, so a TU that sweeps eight
// static ranks instantiates the products once per T. The rank-specific code is
// what stays in the evaluators: the small [n, r] loops and the shapes.
//
// LORA_EXTERN_TEMPLATES (config.hpp) declares product_kernels<float> and
// <double> extern, so a TU does not compile them at all; one TU of the
// program defines LORA_INSTANTIATE_TEMPLATES too and holds them.
#pragma once

#ifndef LORA_UMBRELLA_INCLUDED
#error "Include <lora/lora.hpp> instead of lora/backend/eigen/products.hpp."
#endif

#include <Eigen/Core>
#include <type_traits>

#include "../../config.hpp"
#include "blas.hpp"
#include "microkernel.hpp"
#include "skinny.hpp"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace lora {

namespace detail {
// Eigen rejects RowMajor for a single column (and ColMajor for a single row);
// the bytes are the same either way, so pick whichever Eigen accepts.
constexpr int eigen_row_major_options(int rows, int cols) {
  return (cols == 1 && rows != 1) ? Eigen::ColMajor : Eigen::RowMajor;
}
}  // namespace detail

/// Row-major dynamic matrix: PyTorch / PEFT / safetensors byte layout.
template <class T, int Rows = dynamic, int Cols = dynamic>
using RowMatrix = Eigen::Matrix<T, Rows, Cols, detail::eigen_row_major_options(Rows, Cols)>;

namespace detail::eigen {

/// The one operand type of the products: a row-major [rows, cols] view with
/// unit column stride and any row stride.
template <class T>
using const_view = Eigen::Map<const RowMatrix<T>, Eigen::Unaligned, Eigen::OuterStride<>>;
template <class T>
using mut_view = Eigen::Map<RowMatrix<T>, Eigen::Unaligned, Eigen::OuterStride<>>;

/// Operands a canonical view can address (Matrix, Map, Block, the transpose of
/// a vector, ...; not a column-major matrix) with scalar T.
template <class M, class T>
inline constexpr bool viewable_v =
    std::is_same_v<typename M::Scalar, T> && (int(M::Flags) & Eigen::DirectAccessBit) != 0 &&
    ((int(M::Flags) & Eigen::RowMajorBit) != 0 || M::ColsAtCompileTime == 1 || M::RowsAtCompileTime == 1);

/// Whether this operand's layout fits a view at run time: a unit step between
/// the columns of a row (only a Map with an inner stride lacks it).
template <class M>
bool fits_view(const M& m) {
  return m.cols() <= 1 || m.rows() == 0 || m.colStride() == 1;
}

/// The row stride of a fitting operand (one row: any value >= cols).
template <class M>
index_t row_stride(const M& m) {
  return m.rows() <= 1 ? (m.cols() > 0 ? m.cols() : index_t(1)) : m.rowStride();
}

template <class T, class M>
const_view<T> view(const M& m) {
  return const_view<T>(m.data(), m.rows(), m.cols(), Eigen::OuterStride<>(row_stride(m)));
}
template <class T, class M>
mut_view<T> view_mut(M& m) {
  return mut_view<T>(m.data(), m.rows(), m.cols(), Eigen::OuterStride<>(row_stride(m)));
}

/// Rows [begin, end) of a view, as a view (not a Block: one operand type).
template <class V>
V rows_of(V v, index_t begin, index_t end) {
  return V(v.data() + begin * v.outerStride(), end - begin, v.cols(), Eigen::OuterStride<>(v.outerStride()));
}
/// Columns [begin, end) of a view, as a view.
template <class V>
V cols_of(V v, index_t begin, index_t end) {
  return V(v.data() + begin, v.rows(), end - begin, Eigen::OuterStride<>(v.outerStride()));
}

/// f(begin, end) over contiguous slices of [0, rows): one slice per OpenMP
/// thread when the operand is large enough to amortise a parallel region and
/// we are not already inside one; else one call over everything.
template <class F>
void for_row_slices(index_t rows, index_t elements, F&& f) {
#ifdef _OPENMP
  if (elements >= LORA_EIGEN_ROW_SPLIT_MIN_ELEMENTS && !omp_in_parallel() && omp_get_max_threads() > 1) {
#pragma omp parallel
    {
      const index_t t = omp_get_thread_num(), nt = omp_get_num_threads();
      const index_t begin = rows * t / nt, end = rows * (t + 1) / nt;
      if (end > begin) f(begin, end);
    }
    return;
  }
#endif
  (void)elements;
  f(index_t(0), rows);
}

/// c = beta c + alpha (a b), one Eigen product statement (OpenBLAS first when
/// lora::blas is linked and takes the shape). Also the generic path for
/// operands no view can address.
template <class T, class A, class B, class C>
void gemm_eigen(T alpha, const A& a, const B& b, T beta, C&& c) {
#ifdef LORA_USE_OPENBLAS
  if (blas::try_gemm(alpha, a, b, beta, c)) return;
#endif
  if (beta == T(0)) {
    c.noalias() = alpha * a * b;
  } else {
    if (beta != T(1)) c *= beta;
    c.noalias() += alpha * a * b;
  }
}

/// The products over canonical views, once per scalar type.
template <class T>
struct product_kernels {
  using cv = const_view<T>;
  using mv = mut_view<T>;
  /// y = beta y + alpha x w^T  (x [n, k], w [m, k], y [n, m])
  static void gemm_nt(T alpha, cv x, cv w, T beta, mv y);
  /// c = beta c + alpha a b  (a [m, k], b [k, n])
  static void gemm_nn(T alpha, cv a, cv b, T beta, mv c);
  /// c = beta c + alpha a^T b  (a [k, m], b [k, n])
  static void gemm_tn(T alpha, cv a, cv b, T beta, mv c);
};

// Defined outside the class (not implicitly inline), so an extern template
// declaration keeps a TU from instantiating them.
template <class T>
void product_kernels<T>::gemm_nt(T alpha, cv x, cv w, T beta, mv y) {
  const index_t n = x.rows(), k = x.cols();
  // fp32 over a large W: lora's micro-kernel (microkernel.hpp, gemm_nt_plain)
  // from LORA_EIGEN_MICROKERNEL_MIN_TOKENS tokens, the skinny kernel below them.
  // (With OpenBLAS linked, which is tried first, the skinny kernel keeps all
  // its tokens: its limit was measured against that hand-off.)
  const bool micro = std::is_same_v<T, float> && w.rows() >= LORA_EIGEN_MICROKERNEL_MIN_SIZE &&
                     k >= LORA_EIGEN_MICROKERNEL_MIN_SIZE;
  const index_t skinny_max = micro && !blas::linked
                                 ? std::min<index_t>(LORA_EIGEN_SKINNY_MAX_TOKENS, LORA_EIGEN_MICROKERNEL_MIN_TOKENS - 1)
                                 : LORA_EIGEN_SKINNY_MAX_TOKENS;
  if (n >= LORA_EIGEN_SKINNY_MIN_TOKENS && n <= skinny_max && k >= LORA_EIGEN_SKINNY_MIN_DEPTH) {
    for_row_slices(w.rows(), w.size(), [&](index_t begin, index_t end) {
      skinny::rows(w.data(), w.outerStride(), begin, end, x.data(), x.outerStride(), n, k, alpha, beta, y.data(),
                   y.outerStride());
    });
    return;
  }
  if (n <= LORA_EIGEN_ROW_SPLIT_MAX_TOKENS) {
    // Each thread streams its own slice of W's rows through a single-threaded
    // Eigen kernel, with no packing barrier.
    for_row_slices(w.rows(), w.size(), [&](index_t begin, index_t end) {
      gemm_eigen(alpha, x, rows_of(w, begin, end).transpose(), beta, cols_of(y, begin, end));  // (n, slice)
    });
    return;
  }
  // Many tokens over a large fp32 W: lora's micro-kernel, W packed as it goes
  // (microkernel.hpp, gemm_nt_plain); OpenBLAS first where the user linked it.
  if constexpr (std::is_same_v<T, float>) {
    if (micro) {
#ifdef LORA_USE_OPENBLAS
      if (blas::try_gemm(alpha, x, w.transpose(), beta, y)) return;
#endif
      packed::gemm_nt_plain(w.data(), w.outerStride(), w.rows(), k, alpha, x.data(), x.outerStride(), n, beta,
                            y.data(), y.outerStride());
      return;
    }
  }
  gemm_eigen(alpha, x, w.transpose(), beta, y);  // (n, m) = (n, k) (m, k)^T
}

template <class T>
void product_kernels<T>::gemm_nn(T alpha, cv a, cv b, T beta, mv c) {
  const index_t m = a.rows();
  if constexpr (std::is_same_v<T, float>) {
    // A few rows of a (tokens) with a or c wide: the panel kernel, b read in
    // place (microkernel.hpp, skinny_nn). That is the backward's dX = G W, its
    // dX += s (G B) A (a rank update of a few rows, for which rank_update's
    // per-call pack of A cost as much again), and G B for r >= 32. 4096^2,
    // 16 tokens, 2 threads, one process, previous path / panel kernel, ms:
    // dX += s (G B) A r = 8 / 32 / 64 / 128: 0.016 / 0.067 / 0.130 / 0.251
    // against 0.011 / 0.020 / 0.040 / 0.076; G B r = 32 / 64 / 128 (Eigen):
    // 0.110 / 0.191 / 0.285 against 0.057 / 0.073 / 0.126 (r = 8: Eigen's
    // 0.048 beats 0.082, so a c narrower than a panel stays with Eigen).
    if (m >= 1 && m <= LORA_EIGEN_PANEL_MAX_ROWS && c.cols() >= packed::panel &&
        (a.cols() >= LORA_EIGEN_SKINNY_MIN_DEPTH || c.cols() >= LORA_EIGEN_SKINNY_MIN_DEPTH)) {
      packed::skinny_nn(m, c.cols(), a.cols(), alpha, a.data(), a.outerStride(), 1, b.data(), b.outerStride(), beta,
                        c.data(), c.outerStride());
      return;
    }
    // A shallow product into a large c (a rank-r update: merge's W += s B A,
    // the backward's dX += s (G B) A past those tokens): the outer-product
    // micro-kernel streams c once (microkernel.hpp).
    if (a.cols() >= LORA_EIGEN_RANK_UPDATE_MIN_DEPTH && a.cols() <= LORA_EIGEN_RANK_UPDATE_MAX_DEPTH &&
        m * c.cols() >= LORA_EIGEN_RANK_UPDATE_MIN_ELEMENTS) {
#ifdef LORA_USE_OPENBLAS
      if (blas::try_gemm(alpha, a, b, beta, c)) return;  // the user's opt-in hand-off first, where its guard takes it
#endif
      packed::rank_update(m, c.cols(), a.cols(), alpha, a.data(), a.outerStride(), 1, b.data(), b.outerStride(), beta,
                          c.data(), c.outerStride());
      return;
    }
  }
  // Double: a few rows of a times a wide b (backward's dX = G W): c's columns
  // split across threads, a register-blocked kernel in each. (A narrow c, such
  // as G B [n, r], stays with Eigen.)
  if (m >= 1 && m <= LORA_EIGEN_PANEL_MAX_ROWS && a.cols() >= LORA_EIGEN_SKINNY_MIN_DEPTH &&
      c.cols() >= LORA_EIGEN_SKINNY_MIN_DEPTH) {
    for_row_slices(c.cols(), b.size(), [&](index_t begin, index_t end) {
      skinny::columns(a.data(), a.outerStride(), b.data(), b.outerStride(), m, a.cols(), alpha, beta, c.data(),
                      c.outerStride(), begin, end);
    });
    return;
  }
  // More rows over a large fp32 b (dX = G W past those tokens): the micro-
  // kernel with b's rows copied into panels per call (microkernel.hpp,
  // gemm_nn_plain); OpenBLAS first where the user linked it.
  if constexpr (std::is_same_v<T, float>) {
    if (a.cols() >= LORA_EIGEN_MICROKERNEL_MIN_SIZE && c.cols() >= LORA_EIGEN_MICROKERNEL_MIN_SIZE) {
#ifdef LORA_USE_OPENBLAS
      if (blas::try_gemm(alpha, a, b, beta, c)) return;
#endif
      packed::gemm_nn_plain(m, c.cols(), a.cols(), alpha, a.data(), a.outerStride(), b.data(), b.outerStride(), beta,
                            c.data(), c.outerStride());
      return;
    }
  }
  gemm_eigen(alpha, a, b, beta, c);
}

template <class T>
void product_kernels<T>::gemm_tn(T alpha, cv a, cv b, T beta, mv c) {
  // c [m, n] = a^T b, a [k, m]. The backward's adapter gradients: dA = s (G B)^T X
  // (a few rows m = r of a wide c; panel kernel, reading X in place) and
  // dB = s G^T H (a shallow product, depth = tokens: a rank update), with A
  // transposed by strides. 4096^2, 2 threads, Eigen / lora: dA r = 8, 16..1024
  // tokens 2.1-3.2x; dB r = 8..64, 16..128 tokens 1.1-2.4x.
  if constexpr (std::is_same_v<T, float>) {
    const index_t m = a.cols(), k = a.rows();
    if (m >= 1 && m <= LORA_EIGEN_PANEL_MAX_ROWS && k >= 1 && c.cols() >= LORA_EIGEN_SKINNY_MIN_DEPTH) {
      packed::skinny_nn(m, c.cols(), k, alpha, a.data(), 1, a.outerStride(), b.data(), b.outerStride(), beta,
                        c.data(), c.outerStride());
      return;
    }
    if (k >= LORA_EIGEN_RANK_UPDATE_MIN_DEPTH && k <= LORA_EIGEN_RANK_UPDATE_MAX_DEPTH &&
        m * c.cols() >= LORA_EIGEN_RANK_UPDATE_MIN_ELEMENTS) {
#ifdef LORA_USE_OPENBLAS
      if (blas::try_gemm(alpha, a.transpose(), b, beta, c)) return;  // as gemm_nn's rank updates
#endif
      packed::rank_update(m, c.cols(), k, alpha, a.data(), 1, a.outerStride(), b.data(), b.outerStride(), beta,
                          c.data(), c.outerStride());
      return;
    }
  }
  gemm_eigen(alpha, a.transpose(), b, beta, c);
}

#if defined(LORA_EXTERN_TEMPLATES) && !defined(LORA_INSTANTIATE_TEMPLATES)
extern template struct product_kernels<float>;
extern template struct product_kernels<double>;
#elif defined(LORA_INSTANTIATE_TEMPLATES)
template struct product_kernels<float>;
template struct product_kernels<double>;
#endif

}  // namespace detail::eigen
}  // namespace lora
