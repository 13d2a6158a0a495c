// backend/eigen/backend.hpp: the CPU backend. Storage is Eigen's, products go
// through Eigen with noalias(), one statement per product, and the scalars fold
// into the product's alpha so no temporary is made.
#pragma once

#ifndef LORA_UMBRELLA_INCLUDED
#error "Include <lora/lora.hpp> instead of lora/backend/eigen/backend.hpp."
#endif

#include <Eigen/Core>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "../../config.hpp"
#include "../../detail/arith.hpp"
#include "../../detail/random.hpp"
#include "../../error.hpp"
#include "../traits.hpp"
#include "products.hpp"

namespace lora {

/// The Eigen (CPU) backend: storage types and the primitives the evaluators use.
/// Every primitive follows BLAS's alpha/beta convention; beta == 0 overwrites the
/// destination without reading it (NaN in an uninitialised output does not leak).
struct EigenBackend {
  static constexpr const char* name = "eigen";

  template <class T, int Rows = dynamic, int Cols = dynamic>
  using matrix = RowMatrix<T, Rows, Cols>;
  template <class T>
  using vector = Eigen::Matrix<T, Eigen::Dynamic, 1>;

  /// Scratch memory for intermediates ([n, r] in the unmerged forward). Grows,
  /// never shrinks, so a reused workspace stops allocating after the first call.
  template <class T>
  class workspace {
   public:
    template <int Cols = dynamic>
    Eigen::Map<RowMatrix<T, dynamic, Cols>> matrix(index_t rows, index_t cols, int slot = 0) {
      auto& buf = slot == 0 ? first_ : second_;
      const index_t need = detail::checked_mul("EigenBackend::workspace::matrix", rows, cols);
      if (buf.size() < need) buf.resize(need);
      return Eigen::Map<RowMatrix<T, dynamic, Cols>>(buf.data(), rows, cols);
    }
    index_t capacity() const { return first_.size() + second_.size(); }

   private:
    Eigen::Matrix<T, Eigen::Dynamic, 1> first_, second_;
  };

  template <class M>
  static void resize(M& m, index_t rows, index_t cols) {
    m.resize(rows, cols);
  }

  /// Y = beta Y + alpha X W^T  (X [n, k], W [m, k], Y [n, m])
  template <class T, class X, class W, class Y>
  static void gemm_nt(T alpha, const X& x, const W& w, T beta, Y&& y) {
    product<&detail::eigen::product_kernels<T>::gemm_nt>(alpha, x, w, beta, y, [](T al, const X& l, const W& r, T be, auto& d) {
      detail::eigen::gemm_eigen(al, l, r.transpose(), be, d);
    });
  }
  /// C = beta C + alpha A B  (A [m, k], B [k, n])
  template <class T, class A, class B, class C>
  static void gemm_nn(T alpha, const A& a, const B& b, T beta, C&& c) {
    product<&detail::eigen::product_kernels<T>::gemm_nn>(alpha, a, b, beta, c, [](T al, const A& l, const B& r, T be, auto& d) {
      detail::eigen::gemm_eigen(al, l, r, be, d);
    });
  }
  /// C = beta C + alpha A^T B  (A [k, m], B [k, n])
  template <class T, class A, class B, class C>
  static void gemm_tn(T alpha, const A& a, const B& b, T beta, C&& c) {
    product<&detail::eigen::product_kernels<T>::gemm_tn>(alpha, a, b, beta, c, [](T al, const A& l, const B& r, T be, auto& d) {
      detail::eigen::gemm_eigen(al, l.transpose(), r, be, d);
    });
  }

  /// Y = beta Y + alpha X (same shapes)
  template <class T, class X, class Y>
  static void axpby(T alpha, const X& x, T beta, Y&& y) {
    if (beta == T(0))
      y = alpha * x;
    else if (beta == T(1))
      y += alpha * x;
    else
      y = beta * y + alpha * x;
  }

  template <class M, class T>
  static void fill(M&& m, T value) {
    m.setConstant(value);
  }

  template <class Src, class Dst>
  static void copy(const Src& src, Dst&& dst) {
    dst = src;
  }

  /// Y[i, :] += alpha * b^T for every row i (bias add).
  template <class T, class Y, class V>
  static void add_to_rows(T alpha, const V& b, Y&& y) {
    y.rowwise() += alpha * b.transpose();
  }

  /// db = beta db + alpha * sum over rows of G (bias gradient).
  template <class T, class G, class V>
  static void sum_rows(T alpha, const G& g, T beta, V&& db) {
    if (beta == T(0))
      db = alpha * g.colwise().sum().transpose();
    else
      db = beta * db + alpha * g.colwise().sum().transpose();
  }

  /// Flat row-major index of the first non-finite element, or -1.
  template <class M>
  static index_t first_non_finite(const M& m) {
    for (index_t i = 0; i < m.rows(); ++i)
      for (index_t j = 0; j < m.cols(); ++j)
        if (!std::isfinite(m(i, j))) return i * m.cols() + j;
    return -1;
  }

  /// Element (flat row-major index) read back for error messages.
  template <class M>
  static auto element(const M& m, index_t flat) {
    return m(flat / m.cols(), flat % m.cols());
  }

  /// Rows [start, start + count) as a view, writable when m is.
  template <class M>
  static auto middle_rows(M&& m, index_t start, index_t count) {
    return m.middleRows(start, count);
  }
  /// Columns [start, start + count) as a view, writable when m is.
  template <class M>
  static auto middle_cols(M&& m, index_t start, index_t count) {
    return m.middleCols(start, count);
  }

  /// Fill with samples of `dist` (UniformDist, NormalDist): element at flat
  /// row-major index i draws counter i of (seed, stream), as every backend does.
  template <class M, class Dist>
  static void fill_random(M&& m, const Dist& dist, std::uint64_t seed, std::uint64_t stream) {
    using T = typename std::remove_cvref_t<M>::Scalar;
    const index_t cols = m.cols();
    for (index_t i = 0; i < m.rows(); ++i)
      for (index_t j = 0; j < cols; ++j)
        m(i, j) = static_cast<T>(dist.sample(seed, stream, static_cast<std::uint64_t>(i * cols + j)));
  }

  /// A compile-time vector [k] seen as one row [1, k] (a single token).
  template <class V>
  static auto as_row(V&& v) {
    return v.transpose();
  }

  /// True when both operands have storage and their byte ranges intersect.
  template <class A, class B>
  static bool overlaps(const A& a, const B& b) {
    if constexpr (requires { a.data(); a.rowStride(); b.data(); b.rowStride(); }) {
      if (a.size() == 0 || b.size() == 0) return false;
      const auto last = [](const auto& m) {  // one past the last element, strides included
        return m.data() + (m.rows() - 1) * m.rowStride() + (m.cols() - 1) * m.colStride() + 1;
      };
      const auto* a0 = reinterpret_cast<const char*>(a.data());
      const auto* b0 = reinterpret_cast<const char*>(b.data());
      const auto* a1 = reinterpret_cast<const char*>(last(a));
      const auto* b1 = reinterpret_cast<const char*>(last(b));
      return a0 < b1 && b0 < a1;
    } else {
      return false;
    }
  }

  /// Host copies for host-only algorithms (SVD): identity here, a transfer on GPU.
  template <class M>
  static RowMatrix<typename std::remove_cvref_t<M>::Scalar> to_host(const M& m) {
    return m;
  }
  template <class H, class M>
  static void from_host(const H& host, M&& m) {
    m = host;
  }

  // ---- training primitives (train/: dropout, optimizers, gradient norms) ------
  // Optimizer state and updates work on contiguous storage as "for each index i:
  // update(i)" functors, so a Thrust backend runs the same functors with
  // thrust::for_each over a counting_iterator.

  /// Pointer to the contiguous storage of an owned matrix or vector.
  template <class M>
  static auto data(M&& m) {
    return m.data();
  }
  /// Number of elements.
  template <class M>
  static index_t size(const M& m) {
    return m.size();
  }
  /// f(i) for every i in [0, n). Sequential: the order and the result do not
  /// depend on the thread count (determinism), and these loops are O(r (in + out)).
  template <class F>
  static void for_each_index(index_t n, F f) {
    for (index_t i = 0; i < n; ++i) f(i);
  }
  /// sum of x[i]^2 over [0, n), accumulated in double so float gradients up to
  /// FLT_MAX cannot overflow; a non-finite element makes the sum non-finite.
  template <class T>
  static double squared_norm(const T* x, index_t n) {
    double acc = 0.0;
    for (index_t i = 0; i < n; ++i) acc += static_cast<double>(x[i]) * static_cast<double>(x[i]);
    return acc;
  }
  /// Index of the first non-finite element of x[0, n), or -1.
  template <class T>
  static index_t first_non_finite(const T* x, index_t n) {
    for (index_t i = 0; i < n; ++i)
      if (!std::isfinite(x[i])) return i;
    return -1;
  }
  /// x[i] read back to the host (error messages).
  template <class T>
  static T read(const T* x, index_t i) {
    return x[i];
  }
  /// Inverted dropout with a counter-based mask:
  ///   Y = beta Y + alpha * keep(t, i) / (1 - p) * X   (X, Y [n, cols])
  /// keep(t, i) = (to_unit(random_bits(seed, stream, t * cols + i)) >= p), so the
  /// mask depends only on (seed, stream, t, i): every backend and thread count
  /// draws the same one, and backward regenerates it instead of storing it.
  template <class T, class X, class Y>
  static void dropout(T alpha, const X& x, T beta, Y&& y, double p, std::uint64_t seed, std::uint64_t stream) {
    const index_t cols = x.cols();
    const T kept = alpha / static_cast<T>(1.0 - p);
    for (index_t t = 0; t < x.rows(); ++t)
      for (index_t i = 0; i < cols; ++i) {
        const bool keep = detail::to_unit(detail::random_bits(seed, stream, static_cast<std::uint64_t>(t * cols + i))) >= p;
        // Unfused products: Thrust's functor computes the same bits.
        const T v = keep ? detail::mul_unfused(kept, T(x(t, i))) : T(0);
        y(t, i) = beta == T(0) ? v : detail::mul_unfused(beta, T(y(t, i))) + v;
      }
  }

 private:
  /// Every product goes to product_kernels<T> over canonical views (compiled
  /// once per T, whatever the operands' static extents); operands no view can
  /// address (column-major, strided columns) take one generic Eigen product.
  template <auto Kernel, class T, class L, class R, class D, class Generic>
  static void product(T alpha, const L& l, const R& r, T beta, D& d, Generic generic) {
    namespace de = detail::eigen;
    using LT = std::remove_cvref_t<L>;
    using RT = std::remove_cvref_t<R>;
    using DT = std::remove_cvref_t<D>;
    if constexpr (de::viewable_v<LT, T> && de::viewable_v<RT, T> && de::viewable_v<DT, T>) {
      if (de::fits_view(l) && de::fits_view(r) && de::fits_view(d)) {
        Kernel(alpha, de::view<T>(l), de::view<T>(r), beta, de::view_mut<T>(d));
      } else {  // a Map with an inner stride: through contiguous copies, same kernel
        const RowMatrix<T> lc = l, rc = r;
        RowMatrix<T> dc(d.rows(), d.cols());
        if (beta != T(0)) dc = d;
        Kernel(alpha, de::view<T>(lc), de::view<T>(rc), beta, de::view_mut<T>(dc));
        d = dc;
      }
    } else {
      generic(alpha, l, r, beta, d);
    }
  }
};

/// Without an explicit Backend argument, LowRankDelta lives on the CPU.
using DefaultBackend = EigenBackend;

/// Every Eigen dense object (Matrix, Map, Block, Ref, Transpose...) is read by
/// the Eigen backend.
template <class M>
struct matrix_traits<M, std::enable_if_t<std::is_base_of_v<Eigen::EigenBase<M>, M>>> {
  static constexpr bool known = true;
  using scalar = typename M::Scalar;
  using backend = EigenBackend;
  static constexpr int rows = M::RowsAtCompileTime;
  static constexpr int cols = M::ColsAtCompileTime;
  static constexpr bool writable =
      (Eigen::internal::traits<M>::Flags & Eigen::LvalueBit) != 0 && !std::is_const_v<M>;
  static constexpr bool vector = M::ColsAtCompileTime == 1;
};

}  // namespace lora
