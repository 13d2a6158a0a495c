// expr/evaluate.hpp: evaluators, separate from the nodes. Each node kind has one
// evaluator<Node> specialisation with four verbs:
//   apply           Y  = beta Y  + alpha X E^T   (forward: X [n, in], Y [n, out])
//   apply_transposed dX = beta dX + alpha G E    (backward: G [n, out], dX [n, in])
//   assign          D  = beta D  + alpha E      (materialise; merge is assign into W)
//   slice_rows      the same expression over rows [start, start + count)
// apply distributes over sums and re-associates products, so (W + s B A) X^T
// becomes W X^T + s B (A X^T): the [n, r] intermediate, never B A.
#pragma once

#ifndef LORA_UMBRELLA_INCLUDED
#error "Include <lora/lora.hpp> (or <lora/thrust.hpp>) instead of lora/expr/evaluate.hpp."
#endif

#include <algorithm>

#include "nodes.hpp"

namespace lora::expr {

template <class E>
struct evaluator {
  static_assert(sizeof(E) == 0,
                "lora::expr::evaluator: no evaluator for this node type; a new node needs an "
                "evaluator<Node> specialisation (see docs/design.md, 'Adding a node')");
};

template <class E>
using backend_t = typename std::remove_cvref_t<E>::backend;
template <class E>
using scalar_t = typename std::remove_cvref_t<E>::scalar;
template <class E>
using workspace_t = typename backend_t<E>::template workspace<scalar_t<E>>;

/// A workspace whose evaluations keep their intermediates for a backward pass
/// (the training tape's): evaluator<LowRank> leaves H = X A^T in its slot 0,
/// and no evaluator skips a term or takes a fused path that would not leave it.
template <class WS>
struct Recording : WS {
  using WS::WS;
};
template <class WS>
inline constexpr bool is_recording_v = false;
template <class WS>
inline constexpr bool is_recording_v<Recording<WS>> = true;

// ---- the four verbs, dispatching on the node type ------------------------------

namespace verb_detail {
/// The public verbs' checks (the evaluators below trust them): the operand
/// [n, k] against the expression's k, the output [n, m], and no output that
/// shares memory with something a product reads.
template <class E, class In, class Out>
void check_verb(const char* where, const E& e, const In& in, const Out& out, index_t k, index_t m) {
  using B = backend_t<E>;
  if (in.cols() != k || out.rows() != in.rows() || out.cols() != m)
    lora::detail::raise<ShapeError>(where, ": the expression is [", e.rows(), ", ", e.cols(), "], the input is [",
                                     in.rows(), ", ", in.cols(), "] and the output is [", out.rows(), ", ",
                                     out.cols(), "]; need input [n, ", k, "] and output [n, ", m, "]");
  if (B::overlaps(in, out) || e.overlaps(out, true))
    lora::detail::raise<ShapeError>(where, ": the output shares memory with the input or with an operand of "
                                           "the expression; the product cannot run in place");
}
}  // namespace verb_detail

// The workspace's own type reaches the evaluators (not workspace_t<E>&, which
// would drop a recording<> wrapper and with it the training forward's H).
template <Expression E, class X, class Y, class WS>
  requires std::is_base_of_v<workspace_t<E>, WS>
void apply(const E& e, const X& x, Y&& y, scalar_t<E> alpha, scalar_t<E> beta, WS& ws) {
  verb_detail::check_verb("lora::expr::apply", e, x, y, e.cols(), e.rows());  // Y [n, out] = X [n, in] E^T
  evaluator<std::remove_cvref_t<E>>::apply(e, x, y, alpha, beta, ws);
}

template <Expression E, class G, class DX, class WS>
  requires std::is_base_of_v<workspace_t<E>, WS>
void apply_transposed(const E& e, const G& g, DX&& dx, scalar_t<E> alpha, scalar_t<E> beta, WS& ws) {
  verb_detail::check_verb("lora::expr::apply_transposed", e, g, dx, e.rows(), e.cols());  // dX [n, in] = G [n, out] E
  evaluator<std::remove_cvref_t<E>>::apply_transposed(e, g, dx, alpha, beta, ws);
}

template <Expression E, class D>
void assign(D&& dst, const E& e, scalar_t<E> alpha = 1, scalar_t<E> beta = 0) {
  if (dst.rows() != e.rows() || dst.cols() != e.cols())
    lora::detail::raise<ShapeError>("lora::expr::assign: the destination is [", dst.rows(), ", ", dst.cols(),
                                     "] and the expression is [", e.rows(), ", ", e.cols(), "]");
  // dst may be a Dense leaf itself (W += s B A is read element by element),
  // never a factor of a product.
  if (e.overlaps(dst, false))
    lora::detail::raise<ShapeError>("lora::expr::assign: the destination shares memory with a factor of the "
                                     "expression; the product cannot run in place");
  evaluator<std::remove_cvref_t<E>>::assign(dst, e, alpha, beta);
}

template <Expression E>
auto slice_rows(const E& e, index_t start, index_t count) {
  return evaluator<std::remove_cvref_t<E>>::slice_rows(e, start, count);
}

/// A fresh backend matrix holding the expression's value.
template <Expression E>
auto materialize(const E& e) {
  using B = backend_t<E>;
  typename B::template matrix<scalar_t<E>> out;
  B::resize(out, e.rows(), e.cols());
  assign(out, e, scalar_t<E>(1), scalar_t<E>(0));
  return out;
}

/// Where the expression first has a non-finite value: flat row-major index, or
/// -1. Evaluates `rows_per_block` rows at a time into scratch, so checking an
/// [out, in] update costs one [rows_per_block, in] buffer, not a copy of W.
template <Expression E>
index_t first_non_finite(const E& e, index_t rows_per_block = 64) {
  using B = backend_t<E>;
  using T = scalar_t<E>;
  typename B::template matrix<T> block;
  for (index_t start = 0; start < e.rows(); start += rows_per_block) {
    const index_t count = std::min(rows_per_block, e.rows() - start);
    B::resize(block, count, e.cols());
    assign(block, slice_rows(e, start, count), T(1), T(0));
    const index_t bad = BackendOps<B>::first_non_finite(block);
    if (bad >= 0) return start * e.cols() + bad;
  }
  return -1;
}

// ---- one evaluator per node ------------------------------------------------------

template <class M>
struct evaluator<Dense<M>> {
  using node = Dense<M>;
  using B = typename node::backend;
  using T = typename node::scalar;

  template <class X, class Y, class WS>
  static void apply(const node& e, const X& x, Y& y, T alpha, T beta, WS&) {
    B::gemm_nt(alpha, x, e.m, beta, y);  // (n, out) = (n, in) (out, in)^T
  }
  template <class G, class DX, class WS>
  static void apply_transposed(const node& e, const G& g, DX& dx, T alpha, T beta, WS&) {
    B::gemm_nn(alpha, g, e.m, beta, dx);  // (n, in) = (n, out) (out, in)
  }
  template <class D>
  static void assign(D& dst, const node& e, T alpha, T beta) {
    B::axpby(alpha, e.m, beta, dst);
  }
  static auto slice_rows(const node& e, index_t start, index_t count) {
    return leaf(B::middle_rows(e.m, start, count));
  }
};

template <class Q>
struct evaluator<Dequantized<Q>> {
  using node = Dequantized<Q>;
  using traits = typename node::traits;
  using T = typename node::scalar;

  template <class X, class Y, class WS>
  static void apply(const node& e, const X& x, Y& y, T alpha, T beta, WS&) {
    traits::gemm_nt(e.q, e.row0, e.nrows, alpha, x, beta, y);  // (n, rows) = (n, in) W[rows]^T
  }
  template <class G, class DX, class WS>
  static void apply_transposed(const node& e, const G& g, DX& dx, T alpha, T beta, WS&) {
    traits::gemm_nn(e.q, e.row0, e.nrows, alpha, g, beta, dx);  // (n, in) = (n, rows) W[rows]
  }
  template <class D>
  static void assign(D& dst, const node& e, T alpha, T beta) {
    traits::assign(e.q, e.row0, e.nrows, alpha, beta, dst);
  }
  static auto slice_rows(const node& e, index_t start, index_t count) {
    return node{{}, e.q, e.row0 + start, count};
  }
};

template <class BM, class AM>
struct evaluator<LowRank<BM, AM>> {
  using node = LowRank<BM, AM>;
  using B = typename node::backend;
  using T = typename node::scalar;
  static constexpr int R = node::rank_at_compile_time;

  template <class X, class Y, class WS>
  static void apply(const node& e, const X& x, Y& y, T alpha, T beta, WS& ws) {
    // A backend's fused shrink + expand (the CUDA kernel), where it takes the
    // shape; never while recording, which needs H in the workspace.
    if constexpr (!is_recording_v<WS> && backend_hooks<B>::low_rank) {
      if (beta == T(1) && backend_hooks<B>::template low_rank_apply<R>(alpha, x, e.a, e.b, y, ws)) return;
    }
    auto h = ws.template matrix<R>(x.rows(), e.rank());  // (n, r), the only intermediate
    B::gemm_nt(T(1), x, e.a, T(0), h);                   // shrink: (n, r) = (n, in) (r, in)^T
    B::gemm_nt(alpha, h, e.b, beta, y);                  // expand: (n, out) += (n, r) (out, r)^T
  }
  template <class G, class DX, class WS>
  static void apply_transposed(const node& e, const G& g, DX& dx, T alpha, T beta, WS& ws) {
    auto t = ws.template matrix<R>(g.rows(), e.rank());  // (n, r) = G B
    B::gemm_nn(T(1), g, e.b, T(0), t);
    B::gemm_nn(alpha, t, e.a, beta, dx);  // (n, in) += (n, r) (r, in)
  }
  template <class D>
  static void assign(D& dst, const node& e, T alpha, T beta) {
    B::gemm_nn(alpha, e.b, e.a, beta, dst);  // rank-r update: (out, in) += (out, r) (r, in)
  }
  static auto slice_rows(const node& e, index_t start, index_t count) {
    return product(B::middle_rows(e.b, start, count), e.a);
  }
};

template <class E>
struct evaluator<Scaled<E>> {
  using node = Scaled<E>;
  using B = typename node::backend;
  using T = typename node::scalar;

  // A zero scale contributes nothing: skip the inner products entirely (the
  // merged layer's weight() carries its delta with s = 0), unless a training
  // forward records the intermediates its backward reads.
  template <class X, class Y, class WS>
  static void apply(const node& e, const X& x, Y& y, T alpha, T beta, WS& ws) {
    if (e.s == T(0) && !is_recording_v<WS>)
      scale(y, beta);
    else
      evaluator<E>::apply(e.inner, x, y, alpha * e.s, beta, ws);
  }
  template <class G, class DX, class WS>
  static void apply_transposed(const node& e, const G& g, DX& dx, T alpha, T beta, WS& ws) {
    if (e.s == T(0))
      scale(dx, beta);
    else
      evaluator<E>::apply_transposed(e.inner, g, dx, alpha * e.s, beta, ws);
  }
  template <class D>
  static void assign(D& dst, const node& e, T alpha, T beta) {
    if (e.s == T(0))
      scale(dst, beta);
    else
      evaluator<E>::assign(dst, e.inner, alpha * e.s, beta);
  }
  static auto slice_rows(const node& e, index_t start, index_t count) {
    return e.s * evaluator<E>::slice_rows(e.inner, start, count);
  }

 private:
  template <class D>
  static void scale(D& d, T beta) {
    if (beta == T(0))
      B::fill(d, T(0));
    else if (beta != T(1))
      B::axpby(T(0), d, beta, d);
  }
};

template <class L, class R>
struct evaluator<Sum<L, R>> {
  using node = Sum<L, R>;
  using T = typename node::scalar;

  // (L + R) applied = L applied, then R accumulated: dst = a + P becomes
  // dst = a; dst += P, so no temporary holds either term.
  template <class X, class Y, class WS>
  static void apply(const node& e, const X& x, Y& y, T alpha, T beta, WS& ws) {
    evaluator<L>::apply(e.lhs, x, y, alpha, beta, ws);
    evaluator<R>::apply(e.rhs, x, y, alpha, T(1), ws);
  }
  template <class G, class DX, class WS>
  static void apply_transposed(const node& e, const G& g, DX& dx, T alpha, T beta, WS& ws) {
    evaluator<L>::apply_transposed(e.lhs, g, dx, alpha, beta, ws);
    evaluator<R>::apply_transposed(e.rhs, g, dx, alpha, T(1), ws);
  }
  template <class D>
  static void assign(D& dst, const node& e, T alpha, T beta) {
    evaluator<L>::assign(dst, e.lhs, alpha, beta);
    evaluator<R>::assign(dst, e.rhs, alpha, T(1));
  }
  static auto slice_rows(const node& e, index_t start, index_t count) {
    return evaluator<L>::slice_rows(e.lhs, start, count) + evaluator<R>::slice_rows(e.rhs, start, count);
  }
};

}  // namespace lora::expr
