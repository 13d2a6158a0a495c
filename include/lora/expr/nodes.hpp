// expr/nodes.hpp: the expression nodes of the effective weight W + s * B A.
// A node only holds its operands (leaves by const&, sub-expressions and views by
// value) and checks shapes; it computes nothing. Evaluation lives in
// expr/evaluate.hpp, one evaluator per node kind, so a new node (DoRA's row
// scaling, an NF4 base) is one node + one evaluator and nothing else changes.
#pragma once

#ifndef LORA_UMBRELLA_INCLUDED
#error "Include <lora/lora.hpp> (or <lora/thrust.hpp>) instead of lora/expr/nodes.hpp."
#endif

#include <type_traits>
#include <utility>

#include "../backend/traits.hpp"
#include "../error.hpp"

namespace lora::expr {

/// Tag base of every node; `Expression` is the concept the evaluators accept.
struct NodeBase {};

template <class E>
concept Expression = std::is_base_of_v<NodeBase, std::remove_cvref_t<E>>;

/// How a leaf is held: an lvalue by const reference (no copy of W), a
/// temporary view (Map, Block) by value.
template <class M>
using leaf_storage_t = std::conditional_t<std::is_lvalue_reference_v<M>,
                                          const std::remove_reference_t<M>&, std::remove_cvref_t<M>>;

/// A dense matrix leaf, [rows, cols]: the base weight W.
template <class M>
struct Dense : NodeBase {
  using matrix_type = std::remove_cvref_t<M>;
  using scalar = scalar_of_t<matrix_type>;
  using backend = backend_of_t<matrix_type>;
  static constexpr int rows_at_compile_time = matrix_traits<matrix_type>::rows;
  static constexpr int cols_at_compile_time = matrix_traits<matrix_type>::cols;

  M m;

  index_t rows() const { return m.rows(); }
  index_t cols() const { return m.cols(); }
  /// Whether `other` shares memory with a leaf the evaluators read; Dense
  /// leaves count only when `dense` (assign reads them element by element,
  /// so dst may be W itself; a product may not write into its operand).
  template <class O>
  bool overlaps(const O& other, bool dense) const {
    return dense && backend::overlaps(m, other);
  }
};

/// A compressed base weight (an NF4Matrix), rows [row0, row0 + nrows): QLoRA's
/// frozen W. Held by reference; evaluated by quantized_traits<Q>'s fused
/// products, so W is decoded inside them and never materialised.
template <class Q>
struct Dequantized : NodeBase {
  using traits = quantized_traits<Q>;
  using scalar = typename traits::scalar;
  using backend = typename traits::backend;
  static constexpr int rows_at_compile_time = dynamic;  // a slice has fewer rows
  static constexpr int cols_at_compile_time = traits::cols;

  const Q& q;
  index_t row0 = 0;
  index_t nrows = 0;

  index_t rows() const { return nrows; }
  index_t cols() const { return q.cols(); }
  /// Compressed storage of its own type: no float operand can alias it.
  template <class O>
  bool overlaps(const O&, bool) const {
    return false;
  }
};

/// The product B A of a rank-r pair, B [out, r], A [r, in]. Never formed by
/// apply(); only assign() (merge) multiplies B by A.
template <class BM, class AM>
struct LowRank : NodeBase {
  using b_type = std::remove_cvref_t<BM>;
  using a_type = std::remove_cvref_t<AM>;
  using scalar = scalar_of_t<b_type>;
  using backend = backend_of_t<b_type>;
  static_assert(std::is_same_v<scalar, scalar_of_t<a_type>>,
                "lora::expr::LowRank: B and A must have the same scalar type");
  static_assert(extents_agree(matrix_traits<b_type>::cols, matrix_traits<a_type>::rows),
                "lora::expr::LowRank: B has a static column count that differs from A's static "
                "row count; both are the rank r (B is [out, r], A is [r, in])");
  static constexpr int rank_at_compile_time =
      matrix_traits<b_type>::cols != dynamic ? matrix_traits<b_type>::cols : matrix_traits<a_type>::rows;
  static constexpr int rows_at_compile_time = matrix_traits<b_type>::rows;
  static constexpr int cols_at_compile_time = matrix_traits<a_type>::cols;

  BM b;
  AM a;

  LowRank(BM b_, AM a_) : b(std::forward<BM>(b_)), a(std::forward<AM>(a_)) {
    if (b.cols() != a.rows())
      detail::raise<ShapeError>("lora::expr::LowRank: B is [", b.rows(), ", ", b.cols(), "] and A is [",
                                 a.rows(), ", ", a.cols(), "]; B's columns must equal A's rows (the rank)");
  }
  index_t rows() const { return b.rows(); }
  index_t cols() const { return a.cols(); }
  template <class O>
  bool overlaps(const O& other, bool) const {
    return backend::overlaps(b, other) || backend::overlaps(a, other);
  }
  index_t rank() const { return a.rows(); }
};

/// s * E.
template <class E>
struct Scaled : NodeBase {
  using scalar = typename E::scalar;
  using backend = typename E::backend;
  static constexpr int rows_at_compile_time = E::rows_at_compile_time;
  static constexpr int cols_at_compile_time = E::cols_at_compile_time;

  scalar s;
  E inner;

  index_t rows() const { return inner.rows(); }
  index_t cols() const { return inner.cols(); }
  template <class O>
  bool overlaps(const O& other, bool dense) const {
    return inner.overlaps(other, dense);
  }
};

/// L + R, same shape.
template <class L, class R>
struct Sum : NodeBase {
  using scalar = typename L::scalar;
  using backend = typename L::backend;
  static_assert(std::is_same_v<scalar, typename R::scalar>,
                "lora::expr::Sum: both terms must have the same scalar type (convert one with .cast<T>())");
  static_assert(extents_agree(L::rows_at_compile_time, R::rows_at_compile_time) &&
                    extents_agree(L::cols_at_compile_time, R::cols_at_compile_time),
                "lora::expr::Sum: the terms have different static shapes; both must be [out, in]");
  static constexpr int rows_at_compile_time =
      L::rows_at_compile_time != dynamic ? L::rows_at_compile_time : R::rows_at_compile_time;
  static constexpr int cols_at_compile_time =
      L::cols_at_compile_time != dynamic ? L::cols_at_compile_time : R::cols_at_compile_time;

  L lhs;
  R rhs;

  Sum(L l, R r) : lhs(std::move(l)), rhs(std::move(r)) {
    if (lhs.rows() != rhs.rows() || lhs.cols() != rhs.cols())
      detail::raise<ShapeError>("lora::expr::Sum: terms are [", lhs.rows(), ", ", lhs.cols(), "] and [",
                                 rhs.rows(), ", ", rhs.cols(), "]; both must have the same shape");
  }
  index_t rows() const { return lhs.rows(); }
  index_t cols() const { return lhs.cols(); }
  template <class O>
  bool overlaps(const O& other, bool dense) const {
    return lhs.overlaps(other, dense) || rhs.overlaps(other, dense);
  }
};

// ---- builders --------------------------------------------------------------

/// Leaf over a matrix (held by const& when an lvalue, by value when a view).
template <Matrix M>
auto leaf(M&& m) {
  return Dense<leaf_storage_t<M&&>>{{}, std::forward<M>(m)};
}

/// The leaf of a base weight: `dense` over a matrix, `dequantized` over a
/// compressed one.
template <BaseWeight W>
auto base_leaf(const W& w) {
  if constexpr (QuantizedMatrix<W>)
    return Dequantized<W>{{}, w, 0, w.rows()};
  else
    return leaf(w);
}

/// The product B A of a rank-r pair (B [out, r], A [r, in]).
template <Matrix BM, Matrix AM>
auto product(BM&& b, AM&& a) {
  return LowRank<leaf_storage_t<BM&&>, leaf_storage_t<AM&&>>(std::forward<BM>(b), std::forward<AM>(a));
}

template <Expression E>
auto operator*(typename std::remove_cvref_t<E>::scalar s, E&& e) {
  return Scaled<std::remove_cvref_t<E>>{{}, s, std::forward<E>(e)};
}

template <Expression L, Expression R>
auto operator+(L&& l, R&& r) {
  return Sum<std::remove_cvref_t<L>, std::remove_cvref_t<R>>(std::forward<L>(l), std::forward<R>(r));
}

}  // namespace lora::expr
