// train/gradients.hpp: the training forward and the backward of AdaptedLinear.
//
//   forward   Y = X W^T + b + s * (D A^T) B^T,  D = drop(X), H = D A^T kept in the tape
//   backward  G = dL/dY [n, out]:
//             dB = s G^T H                         [out, r]
//             dA = s (G B)^T D                     [r, in]
//             dX = G W + s drop'((G B) A)          [n, in]  (the mask again, 1/(1-p))
//             db = sum over tokens of G            [out]    (when the bias trains)
// W is frozen: no dW is ever allocated or computed. The dense part of dX is the
// transposed application of the same expression the forward uses (W + s B A
// unmerged, W merged), through expr::apply_transposed.
//
// Memory: the tape holds the [n, r] intermediates H and G B and the evaluators'
// [n, r] scratch; with dropout on, also drop(X) and one [n, in] scratch. Never
// anything [out, in]. A tape reused across steps stops allocating.
#pragma once

#ifndef LORA_UMBRELLA_INCLUDED
#error "Include <lora/lora.hpp> instead of lora/train/gradients.hpp."
#endif

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "../error.hpp"
#include "../expr/evaluate.hpp"
#include "dropout.hpp"

namespace lora::train {

/// dL/dA [r, in], dL/dB [out, r] and, when the bias trains, dL/db [out] of one
/// adapted layer. There is deliberately no dW: the base weight is frozen.
template <class Layer>
class Gradients {
 public:
  using scalar = typename Layer::scalar;
  using backend = typename Layer::backend;
  using a_matrix = typename Layer::delta_type::a_matrix;  // (r, in)
  using b_matrix = typename Layer::delta_type::b_matrix;  // (out, r)
  using bias_type = typename Layer::bias_type;            // (out)

  /// Zero-filled gradients shaped like the layer's adapter. `train_bias`
  /// (default: whether the layer has a bias) adds db.
  explicit Gradients(const Layer& layer) : Gradients(layer, layer.has_bias()) {}
  Gradients(const Layer& layer, bool train_bias) {
    if (train_bias && !layer.has_bias())
      lora::detail::raise<value_error>("train::Gradients: train_bias requested but the layer has no bias");
    backend::resize(da_, layer.rank(), layer.in_features());
    backend::resize(db_mat_, layer.out_features(), layer.rank());
    if (train_bias) backend::resize(dbias_, layer.out_features(), 1);
    zero();
  }

  a_matrix& dA() { return da_; }
  const a_matrix& dA() const { return da_; }
  b_matrix& dB() { return db_mat_; }
  const b_matrix& dB() const { return db_mat_; }
  /// Empty when the bias is frozen.
  bias_type& db() { return dbias_; }
  const bias_type& db() const { return dbias_; }
  bool has_bias() const { return backend::size(dbias_) != 0; }

  void zero() {
    backend::fill(da_, scalar(0));
    backend::fill(db_mat_, scalar(0));
    if (has_bias()) backend::fill(dbias_, scalar(0));
  }

 private:
  a_matrix da_;
  b_matrix db_mat_;
  bias_type dbias_;
};

template <class Layer>
class Tape;
template <class Layer, class X, class Y>
void forward(const Layer& layer, const X& x, Y&& y, Tape<Layer>& tape, const Dropout& drop = Dropout{},
             std::uint64_t step = 0);
namespace detail {
template <class Layer, class X, class G, class DX>
void backward_impl(const Layer&, const X&, const G&, Tape<Layer>&, Gradients<Layer>&, DX*, bool, bool);
}

/// What train::forward leaves for train::backward (H = drop(X) A^T, drop(X),
/// the dropout step), plus the scratch both use. One tape per layer and
/// forward call in flight; reuse it across steps so it stops allocating.
template <class Layer>
class Tape {
 public:
  using workspace = typename Layer::workspace;

  /// Tokens seen by the last forward, or -1 before any.
  index_t tokens() const { return n_; }
  /// Whether the last forward applied dropout.
  bool dropped() const { return dropped_; }
  /// Elements the tape holds (all buffers), for memory checks.
  index_t capacity() const { return small_.capacity() + wide_.capacity() + eval_.capacity(); }

 private:
  template <class L, class X, class Y>
  friend void forward(const L&, const X&, Y&&, Tape<L>&, const Dropout&, std::uint64_t);
  template <class L, class X, class G, class DX>
  friend void detail::backward_impl(const L&, const X&, const G&, Tape<L>&, Gradients<L>&, DX*, bool, bool);

  workspace small_;  // slot 0: H (n, r); slot 1: G B (n, r) or X A^T
  workspace wide_;   // slot 0: drop(X) (n, in); slot 1: (G B) A (n, in); dropout only
  workspace eval_;   // the expression evaluators' (n, r) scratch
  index_t n_ = -1;
  bool dropped_ = false;
  bool merged_ = false;
  double p_ = 0.0;
  std::uint64_t seed_ = 0, step_ = 0;
};

/// Options of train::backward.
struct backward_options {
  /// Add into dA, dB, db instead of overwriting them (gradient accumulation
  /// over micro-batches).
  bool accumulate = false;
  /// Add into dX instead of overwriting it (one input feeding several layers,
  /// e.g. X -> W_q, W_k, W_v).
  bool accumulate_dx = false;
};

namespace detail {
template <class Layer, class X>
void check_input(const char* where, const Layer& layer, const X& x) {
  static_assert(std::is_same_v<scalar_of_t<X>, typename Layer::scalar>,
                "lora::train: X has a different scalar type than the layer; cast it first");
  layer.delta().check_consistent(where);
  if (x.cols() != layer.in_features())
    lora::detail::raise<shape_error>(where, ": X has ", x.cols(), " columns, expected in_features = ",
                                     layer.in_features());
}
}  // namespace detail

/// Training forward: Y [n, out] = X W^T + b + s * (drop(X) A^T) B^T, recording
/// in `tape` what backward needs. `drop` in eval mode (or p = 0) is the plain
/// forward. `step` selects the dropout mask (same step, same mask). In the
/// merged state W already holds s B A, so with dropout the clean delta is taken
/// out again: Y = X W'^T + s ((D - X) A^T) B^T.
template <class Layer, class X, class Y>
void forward(const Layer& layer, const X& x, Y&& y, Tape<Layer>& tape, const Dropout& drop,
             std::uint64_t step) {
  using B = typename Layer::backend;
  using T = typename Layer::scalar;
  constexpr int R = Layer::rank_at_compile_time;
  constexpr const char* where = "AdaptedLinear::forward (train)";
  detail::check_input(where, layer, x);
  if (y.rows() != x.rows() || y.cols() != layer.out_features())
    lora::detail::raise<shape_error>(where, ": Y is [", y.rows(), ", ", y.cols(), "], expected [n, out] = [",
                                     x.rows(), ", ", layer.out_features(), "]");
  if (B::overlaps(x, y)) lora::detail::raise<shape_error>(where, ": X and Y share memory");

  const index_t n = x.rows(), r = layer.rank(), in = layer.in_features();
  const T s = layer.delta().scale();
  const auto& a = layer.delta().A();
  const auto& b = layer.delta().B();
  auto h = tape.small_.template matrix<R>(n, r, 0);  // (n, r)

  tape.n_ = n;
  tape.dropped_ = drop.active();
  tape.merged_ = layer.merged();
  tape.p_ = drop.p();
  tape.seed_ = drop.seed();
  tape.step_ = step;

  if (!tape.dropped_) {
    // Unmerged: exactly the inference forward's association, with H kept.
    // Merged: X W'^T, and H only for dB.
    expr::apply(layer.base_expression(), x, y, T(1), T(0), tape.eval_);  // (n, out) = X W^T
    B::gemm_nt(T(1), x, a, T(0), h);                                      // (n, r) = X A^T
    if (!tape.merged_) B::gemm_nt(s, h, b, T(1), y);                      // (n, out) += s H B^T
  } else {
    auto d = tape.wide_.matrix(n, in, 0);                            // (n, in) = drop(X)
    B::dropout(T(1), x, T(0), d, drop.p(), drop.seed(), step);
    expr::apply(layer.base_expression(), x, y, T(1), T(0), tape.eval_);  // (n, out) = X W^T
    B::gemm_nt(T(1), d, a, T(0), h);                                      // (n, r) = D A^T
    if (tape.merged_) {
      auto hx = tape.small_.template matrix<R>(n, r, 1);  // (n, r) = X A^T, the delta W' holds
      B::gemm_nt(T(1), x, a, T(0), hx);
      B::gemm_nt(-s, hx, b, T(1), y);
    }
    B::gemm_nt(s, h, b, T(1), y);  // (n, out) += s H B^T
  }
  if (layer.has_bias()) B::add_to_rows(T(1), layer.bias(), y);
}

namespace detail {
/// Backward of the last train::forward on `tape`: dA, dB (and db when `grads`
/// has it) from G = dL/dY [n, out], and dX [n, in] when `dx` is not null.
template <class Layer, class X, class G, class DX>
void backward_impl(const Layer& layer, const X& x, const G& g, Tape<Layer>& tape, Gradients<Layer>& grads,
                   DX* dx, bool accumulate, bool accumulate_dx) {
  using B = typename Layer::backend;
  using T = typename Layer::scalar;
  constexpr int R = Layer::rank_at_compile_time;
  constexpr const char* where = "AdaptedLinear::backward";
  static_assert(std::is_same_v<scalar_of_t<G>, T>,
                "lora::train::backward: G has a different scalar type than the layer; cast it first");
  detail::check_input(where, layer, x);
  const index_t n = x.rows(), r = layer.rank(), in = layer.in_features(), out = layer.out_features();
  if (tape.n_ < 0)
    lora::detail::raise<value_error>(where, ": the tape is empty; call train::forward with it first");
  if (tape.n_ != n)
    lora::detail::raise<shape_error>(where, ": X has ", n, " rows but the tape's forward saw ", tape.n_,
                                     " tokens");
  if (tape.merged_ != layer.merged())
    lora::detail::raise<value_error>(where, ": the layer was ", tape.merged_ ? "merged" : "unmerged",
                                     " in forward and is ", layer.merged() ? "merged" : "unmerged", " now");
  if (g.rows() != n || g.cols() != out)
    lora::detail::raise<shape_error>(where, ": G is [", g.rows(), ", ", g.cols(), "], expected [n, out] = [",
                                     n, ", ", out, "]");
  if (grads.dA().rows() != r || grads.dA().cols() != in || grads.dB().rows() != out || grads.dB().cols() != r)
    lora::detail::raise<shape_error>(where, ": gradients are dA [", grads.dA().rows(), ", ", grads.dA().cols(),
                                     "], dB [", grads.dB().rows(), ", ", grads.dB().cols(),
                                     "], expected dA [r, in] = [", r, ", ", in, "], dB [out, r] = [", out, ", ", r,
                                     "]");
  if (grads.has_bias() && grads.db().rows() != out)
    lora::detail::raise<shape_error>(where, ": db has ", grads.db().rows(), " entries, expected out = ", out);
  if constexpr (!std::is_same_v<DX, std::nullptr_t>) {
    if (dx->rows() != n || dx->cols() != in)
      lora::detail::raise<shape_error>(where, ": dX is [", dx->rows(), ", ", dx->cols(),
                                       "], expected [n, in] = [", n, ", ", in, "]");
    if (B::overlaps(g, *dx)) lora::detail::raise<shape_error>(where, ": G and dX share memory");
  }

  const T s = layer.delta().scale();
  const T beta = accumulate ? T(1) : T(0);
  const auto& a = layer.delta().A();
  const auto& b = layer.delta().B();
  auto h = tape.small_.template matrix<R>(n, r, 0);   // (n, r) = D A^T from forward
  auto gb = tape.small_.template matrix<R>(n, r, 1);  // (n, r) = G B
  B::gemm_nn(T(1), g, b, T(0), gb);
  B::gemm_tn(s, g, h, beta, grads.dB());  // (out, r) = s G^T H
  if (tape.dropped_)
    B::gemm_tn(s, gb, tape.wide_.matrix(n, in, 0), beta, grads.dA());  // (r, in) = s (G B)^T D
  else
    B::gemm_tn(s, gb, x, beta, grads.dA());  // (r, in) = s (G B)^T X
  if (grads.has_bias()) B::sum_rows(T(1), g, beta, grads.db());  // (out) = sum_t G[t, :]

  if constexpr (!std::is_same_v<DX, std::nullptr_t>) {
    const T beta_dx = accumulate_dx ? T(1) : T(0);
    if (!tape.dropped_) {
      // dX = G (W + s B A): the same expression as the forward, transposed.
      if (tape.merged_)
        expr::apply_transposed(layer.base_expression(), g, *dx, T(1), beta_dx, tape.eval_);
      else
        expr::apply_transposed(layer.unmerged_expression(), g, *dx, T(1), beta_dx, tape.eval_);
    } else {
      // Dense part through W (W' when merged, which then carries a clean s B A
      // to take out), adapter part through the forward's mask.
      expr::apply_transposed(layer.base_expression(), g, *dx, T(1), beta_dx, tape.eval_);
      auto gba = tape.wide_.matrix(n, in, 1);  // (n, in) = (G B) A
      B::gemm_nn(T(1), gb, a, T(0), gba);
      if (tape.merged_) B::axpby(-s, gba, T(1), *dx);
      B::dropout(s, gba, T(1), *dx, tape.p_, tape.seed_, tape.step_);
    }
  }
}
}  // namespace detail

/// dA, dB (and db) from G = dL/dY, plus dX = dL/dX [n, in] for stacked layers.
template <class Layer, class X, class G, class DX>
void backward(const Layer& layer, const X& x, const G& g, Tape<Layer>& tape, Gradients<Layer>& grads, DX&& dx,
              backward_options options = {}) {
  detail::backward_impl(layer, x, g, tape, grads, &dx, options.accumulate, options.accumulate_dx);
}

/// dA, dB (and db) only: the first layer of a network needs no dX.
template <class Layer, class X, class G>
void backward(const Layer& layer, const X& x, const G& g, Tape<Layer>& tape, Gradients<Layer>& grads,
              backward_options options = {}) {
  detail::backward_impl(layer, x, g, tape, grads, static_cast<std::nullptr_t*>(nullptr), options.accumulate, false);
}

}  // namespace lora::train
