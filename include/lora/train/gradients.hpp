// train/gradients.hpp: the training forward and the backward of AdaptedLinear,
// over any lora::Adapter (adapter.hpp).
//
//   forward   Y = X W^T + b + E(D),  D = drop(X); for LoRA E(D) = s (D A^T) B^T,
//             H = D A^T kept in the tape
//   backward  G = dL/dY [n, out]:
//             the adapter's gradients (LoRA: dB = s G^T H, dA = s (G B)^T D)
//             dX = G W + drop'(dE/dD^T G)         [n, in]  (the mask again, 1/(1-p))
//             db = sum over tokens of G            [out]    (when the bias trains)
// W is frozen: no dW is ever allocated or computed. The forward is the
// inference forward's evaluator call (expr::apply on the same expression) with
// the tape's recording workspace, where the adapter's evaluator leaves its
// intermediate; the dense part of dX is the transposed application of the same
// expression (W + s B A unmerged, W merged), through expr::apply_transposed.
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

/// The gradients of one adapted layer: the adapter's own (LoRA: dA [r, in],
/// dB [out, r]) and, when the bias trains, db [out]. There is deliberately no
/// dW: the base weight is frozen.
template <class Layer>
class Gradients {
 public:
  using scalar = typename Layer::scalar;
  using backend = typename Layer::backend;
  using adapter_gradients = typename Layer::delta_type::gradients;
  using bias_type = typename Layer::bias_type;  // (out)

  /// Zero-filled gradients shaped like the layer's adapter. `train_bias` adds
  /// db; off by default, as PEFT's bias = "none" and as train::memory_usage
  /// assumes (one default for both: a trained bias is always asked for).
  explicit Gradients(const Layer& layer, bool train_bias = false) : adapter_(layer.delta().make_gradients()) {
    if (train_bias && !layer.has_bias())
      lora::detail::raise<ValueError>("train::Gradients: train_bias requested but the layer has no bias");
    if (train_bias) backend::resize(dbias_, layer.out_features(), 1);
    zero();
  }

  /// What the adapter's backward fills (and its optimizer registration reads).
  adapter_gradients& adapter() { return adapter_; }
  const adapter_gradients& adapter() const { return adapter_; }
  /// LoRA's names, for adapters whose gradients have them.
  decltype(auto) dA()
    requires requires(adapter_gradients& g) { g.dA(); }
  {
    return adapter_.dA();
  }
  decltype(auto) dA() const
    requires requires(const adapter_gradients& g) { g.dA(); }
  {
    return adapter_.dA();
  }
  decltype(auto) dB()
    requires requires(adapter_gradients& g) { g.dB(); }
  {
    return adapter_.dB();
  }
  decltype(auto) dB() const
    requires requires(const adapter_gradients& g) { g.dB(); }
  {
    return adapter_.dB();
  }
  /// Empty when the bias is frozen.
  bias_type& db() { return dbias_; }
  const bias_type& db() const { return dbias_; }
  bool has_bias() const { return backend::size(dbias_) != 0; }

  void zero() {
    adapter_.zero();
    if (has_bias()) backend::fill(dbias_, scalar(0));
  }

 private:
  adapter_gradients adapter_;
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
  index_t capacity() const { return saved_.capacity() + wide_.capacity() + eval_.capacity(); }

 private:
  template <class L, class X, class Y>
  friend void forward(const L&, const X&, Y&&, Tape<L>&, const Dropout&, std::uint64_t);
  template <class L, class X, class G, class DX>
  friend void detail::backward_impl(const L&, const X&, const G&, Tape<L>&, Gradients<L>&, DX*, bool, bool);

  expr::Recording<workspace> saved_;  // the adapter's intermediates (LoRA: slot 0 H, slot 1 G B)
  workspace wide_;                    // slot 0: drop(X) (n, in); slot 1: dE/dD^T G (n, in); dropout only
  workspace eval_;                    // the expression evaluators' scratch
  const void* layer_ = nullptr;  // whose forward recorded it: one tape per layer
  index_t n_ = -1;
  bool dropped_ = false;
  bool merged_ = false;
  double p_ = 0.0;
  std::uint64_t seed_ = 0, step_ = 0;
};

/// Options of train::backward.
struct BackwardOptions {
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
  layer.check_consistent(where);
  if (x.cols() != layer.in_features())
    lora::detail::raise<ShapeError>(where, ": X has ", x.cols(), " columns, expected in_features = ",
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
  layer.check_forward("AdaptedLinear::forward (train)", x, y);

  const index_t n = x.rows(), in = layer.in_features();
  const auto& delta = layer.delta();

  tape.layer_ = &layer;
  tape.n_ = n;
  tape.dropped_ = drop.active();
  tape.merged_ = layer.merged();
  tape.p_ = drop.p();
  tape.seed_ = drop.seed();
  tape.step_ = step;

  if (!tape.dropped_) {
    if (!tape.merged_) {
      // The inference forward's call; the adapter's evaluator leaves its
      // intermediate (H = X A^T) in the recording workspace.
      expr::apply(layer.unmerged_expression(), x, y, T(1), T(0), tape.saved_);
    } else {
      // X W'^T, and the adapter's intermediate only for its gradients.
      expr::apply(layer.base_expression(), x, y, T(1), T(0), tape.eval_);
      delta.record(x, tape.saved_);
    }
  } else {
    auto d = tape.wide_.matrix(n, in, 0);  // (n, in) = drop(X)
    B::dropout(T(1), x, T(0), d, drop.p(), drop.seed(), step);
    expr::apply(layer.base_expression(), x, y, T(1), T(0), tape.eval_);  // (n, out) = X W^T
    // Merged: W' holds the clean term, which comes out again.
    if (tape.merged_) expr::apply(delta.expression(), x, y, T(-1), T(1), tape.eval_);
    expr::apply(delta.expression(), d, y, T(1), T(1), tape.saved_);  // (n, out) += E(D), recorded
  }
  if (layer.has_bias()) BackendOps<B>::add_to_rows(T(1), layer.bias(), y);
}

namespace detail {
/// Backward of the last train::forward on `tape`: dA, dB (and db when `grads`
/// has it) from G = dL/dY [n, out], and dX [n, in] when `dx` is not null.
template <class Layer, class X, class G, class DX>
void backward_impl(const Layer& layer, const X& x, const G& g, Tape<Layer>& tape, Gradients<Layer>& grads,
                   DX* dx, bool accumulate, bool accumulate_dx) {
  using B = typename Layer::backend;
  using T = typename Layer::scalar;
  constexpr const char* where = "AdaptedLinear::backward";
  static_assert(std::is_same_v<scalar_of_t<G>, T>,
                "lora::train::backward: G has a different scalar type than the layer; cast it first");
  detail::check_input(where, layer, x);
  const index_t n = x.rows(), in = layer.in_features(), out = layer.out_features();
  if (tape.n_ < 0)
    lora::detail::raise<ValueError>(where, ": the tape is empty; call train::forward with it first");
  if (tape.layer_ != &layer)
    lora::detail::raise<ValueError>(where, ": the tape holds another layer's forward; use one tape per layer "
                                           "(its intermediates belong to the layer that recorded them)");
  if (tape.n_ != n)
    lora::detail::raise<ShapeError>(where, ": X has ", n, " rows but the tape's forward saw ", tape.n_,
                                     " tokens");
  if (tape.merged_ != layer.merged())
    lora::detail::raise<ValueError>(where, ": the layer was ", tape.merged_ ? "merged" : "unmerged",
                                     " in forward and is ", layer.merged() ? "merged" : "unmerged", " now");
  if (g.rows() != n || g.cols() != out)
    lora::detail::raise<ShapeError>(where, ": G is [", g.rows(), ", ", g.cols(), "], expected [n, out] = [",
                                     n, ", ", out, "]");
  if (grads.has_bias() && grads.db().rows() != out)
    lora::detail::raise<ShapeError>(where, ": db has ", grads.db().rows(), " entries, expected out = ", out);
  if constexpr (!std::is_same_v<DX, std::nullptr_t>) {
    if (dx->rows() != n || dx->cols() != in)
      lora::detail::raise<ShapeError>(where, ": dX is [", dx->rows(), ", ", dx->cols(),
                                       "], expected [n, in] = [", n, ", ", in, "]");
    if (B::overlaps(g, *dx)) lora::detail::raise<ShapeError>(where, ": G and dX share memory");
  }

  const T beta = accumulate ? T(1) : T(0);
  const auto& delta = layer.delta();
  if (tape.dropped_)
    delta.backward(g, tape.wide_.matrix(n, in, 0), tape.saved_, grads.adapter(), beta);  // input drop(X)
  else
    delta.backward(g, x, tape.saved_, grads.adapter(), beta);
  if (grads.has_bias()) BackendOps<B>::sum_rows(T(1), g, beta, grads.db());  // (out) = sum_t G[t, :]

  if constexpr (!std::is_same_v<DX, std::nullptr_t>) {
    const T beta_dx = accumulate_dx ? T(1) : T(0);
    if (!tape.dropped_) {
      // dX = G (W + s B A): the same expression as the forward, transposed.
      if (tape.merged_)
        expr::apply_transposed(layer.base_expression(), g, *dx, T(1), beta_dx, tape.eval_);
      else
        expr::apply_transposed(layer.unmerged_expression(), g, *dx, T(1), beta_dx, tape.eval_);
    } else {
      // Dense part through W (W' when merged, which then carries a clean term
      // to take out), adapter part through the forward's mask.
      expr::apply_transposed(layer.base_expression(), g, *dx, T(1), beta_dx, tape.eval_);
      auto ge = tape.wide_.matrix(n, in, 1);  // (n, in) = G dE/dD (LoRA: s (G B) A)
      expr::apply_transposed(delta.expression(), g, ge, T(1), T(0), tape.eval_);
      if (tape.merged_) B::axpby(T(-1), ge, T(1), *dx);
      B::dropout(T(1), ge, T(1), *dx, tape.p_, tape.seed_, tape.step_);
    }
  }
}
}  // namespace detail

/// dA, dB (and db) from G = dL/dY, plus dX = dL/dX [n, in] for stacked layers.
template <class Layer, class X, class G, class DX>
void backward(const Layer& layer, const X& x, const G& g, Tape<Layer>& tape, Gradients<Layer>& grads, DX&& dx,
              BackwardOptions options = {}) {
  detail::backward_impl(layer, x, g, tape, grads, &dx, options.accumulate, options.accumulate_dx);
}

/// dA, dB (and db) only: the first layer of a network needs no dX.
template <class Layer, class X, class G>
void backward(const Layer& layer, const X& x, const G& g, Tape<Layer>& tape, Gradients<Layer>& grads,
              BackwardOptions options = {}) {
  detail::backward_impl(layer, x, g, tape, grads, static_cast<std::nullptr_t*>(nullptr), options.accumulate, false);
}

}  // namespace lora::train
