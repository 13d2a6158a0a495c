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
#include "blas.hpp"
#include "skinny.hpp"

#ifdef _OPENMP
#include <omp.h>
#endif

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

/// The Eigen (CPU) backend: storage types and the primitives the evaluators use.
/// Every primitive follows BLAS's alpha/beta convention; beta == 0 overwrites the
/// destination without reading it (NaN in an uninitialised output does not leak).
struct eigen_backend {
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
      if (buf.size() < rows * cols) buf.resize(rows * cols);
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
    using XT = std::remove_cvref_t<X>;
    using WT = std::remove_cvref_t<W>;
    using YT = std::remove_cvref_t<Y>;
    const index_t n = x.rows();
    if constexpr (std::is_same_v<typename XT::Scalar, T> && std::is_same_v<typename WT::Scalar, T> &&
                  detail::skinny::row_major_direct_v<XT> && detail::skinny::row_major_direct_v<WT> &&
                  detail::skinny::row_major_direct_v<YT>) {
      if (n >= LORA_EIGEN_SKINNY_MIN_TOKENS && n <= LORA_EIGEN_SKINNY_MAX_TOKENS &&
          x.cols() >= LORA_EIGEN_SKINNY_MIN_DEPTH && x.innerStride() == 1 && w.innerStride() == 1 &&
          y.innerStride() == 1) {
        for_row_slices(w.rows(), w.size(), [&](index_t begin, index_t end) {
          detail::skinny::rows(w.data(), w.outerStride(), begin, end, x.data(), x.outerStride(), n, x.cols(),
                               alpha, beta, y.data(), y.outerStride());
        });
        return;
      }
    }
    if (n <= LORA_EIGEN_ROW_SPLIT_MAX_TOKENS) {
      for_row_slices(w.rows(), w.size(), [&](index_t begin, index_t end) {
        auto y_slice = y.middleCols(begin, end - begin);                                   // (n, slice)
        gemm_impl(alpha, x, w.middleRows(begin, end - begin).transpose(), beta, y_slice);  // (slice, in)^T
      });
      return;
    }
    gemm_impl(alpha, x, w.transpose(), beta, y);
  }
  /// C = beta C + alpha A B  (A [m, k], B [k, n])
  template <class T, class A, class B, class C>
  static void gemm_nn(T alpha, const A& a, const B& b, T beta, C&& c) {
    using AT = std::remove_cvref_t<A>;
    using BT = std::remove_cvref_t<B>;
    using CT = std::remove_cvref_t<C>;
    if constexpr (std::is_same_v<typename AT::Scalar, T> && std::is_same_v<typename BT::Scalar, T> &&
                  detail::skinny::row_major_direct_v<AT> && detail::skinny::row_major_direct_v<BT> &&
                  detail::skinny::row_major_direct_v<CT>) {
      // A few rows of A times a wide B (backward's dX = G W): C's columns split
      // across threads, a register-blocked panel kernel in each (skinny.hpp).
      const index_t m = a.rows();
      // (A narrow C, such as G B [n, r], stays with Eigen.)
      if (m >= 1 && m <= LORA_EIGEN_PANEL_MAX_ROWS && a.cols() >= LORA_EIGEN_SKINNY_MIN_DEPTH &&
          c.cols() >= LORA_EIGEN_SKINNY_MIN_DEPTH && a.innerStride() == 1 && b.innerStride() == 1 &&
          c.innerStride() == 1) {
        for_row_slices(c.cols(), b.size(), [&](index_t begin, index_t end) {
          detail::skinny::columns(a.data(), a.outerStride(), b.data(), b.outerStride(), m, a.cols(), alpha, beta,
                                  c.data(), c.outerStride(), begin, end);
        });
        return;
      }
    }
    gemm_impl(alpha, a, b, beta, c);
  }
  /// C = beta C + alpha A^T B  (A [k, m], B [k, n])
  template <class T, class A, class B, class C>
  static void gemm_tn(T alpha, const A& a, const B& b, T beta, C&& c) {
    gemm_impl(alpha, a.transpose(), b, beta, c);
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

  /// Fill with samples of `dist` (uniform_dist, normal_dist): element at flat
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
  /// f(begin, end) over contiguous slices of [0, rows): one slice per OpenMP
  /// thread when the operand is large enough to amortise a parallel region and
  /// we are not already inside one; else one call over everything.
  template <class F>
  static void for_row_slices(index_t rows, index_t elements, F&& f) {
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

  template <class T, class A, class B, class C>
  static void gemm_impl(T alpha, const A& a, const B& b, T beta, C& c) {
#ifdef LORA_USE_OPENBLAS
    if (detail::blas::try_gemm(alpha, a, b, beta, c)) return;
#endif
    if (beta == T(0)) {
      c.noalias() = alpha * a * b;
    } else {
      if (beta != T(1)) c *= beta;
      c.noalias() += alpha * a * b;
    }
  }
};

/// Without an explicit Backend argument, LowRankDelta lives on the CPU.
using default_backend = eigen_backend;

/// Every Eigen dense object (Matrix, Map, Block, Ref, Transpose...) is read by
/// the Eigen backend.
template <class M>
struct matrix_traits<M, std::enable_if_t<std::is_base_of_v<Eigen::EigenBase<M>, M>>> {
  static constexpr bool known = true;
  using scalar = typename M::Scalar;
  using backend = eigen_backend;
  static constexpr int rows = M::RowsAtCompileTime;
  static constexpr int cols = M::ColsAtCompileTime;
  static constexpr bool writable =
      (Eigen::internal::traits<M>::Flags & Eigen::LvalueBit) != 0 && !std::is_const_v<M>;
  static constexpr bool vector = M::ColsAtCompileTime == 1;
};

}  // namespace lora
