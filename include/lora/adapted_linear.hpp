// adapted_linear.hpp: AdaptedLinear<Base, Delta>, a frozen linear layer
// y = x W^T + b adapted by a lora::Adapter (a LowRankDelta, or any other model
// of the concept in adapter.hpp), with merge / unmerge where the adapter is a
// MergeableAdapter.
#pragma once

#ifndef LORA_UMBRELLA_INCLUDED
#error "Include <lora/lora.hpp> (or <lora/thrust.hpp>) instead of lora/adapted_linear.hpp."
#endif

#include <type_traits>
#include <utility>

#include "adapter.hpp"
#include "detail/linear_layer.hpp"
#include "expr/evaluate.hpp"
#include "low_rank_delta.hpp"

namespace lora {

/// A linear layer with a frozen base weight W [out, in], an optional bias [out]
/// and a low-rank delta: Y = X (W + s B A)^T + b.
///
/// Base is the storage of W: an owned backend matrix, or a view of the caller's
/// buffer (`Eigen::Map<const RowMatrix<float>>` over PyTorch-layout bytes), held
/// without copying, or a compressed NF4Matrix (QLoRA: W is decoded inside the
/// products, see <lora/quant/qlora.hpp>). merge() / unmerge() / PiSSA need a
/// writable Base.
///
/// forward() is const and safe to call from several threads on one layer: it
/// only reads W, A, B and allocates the [n, r] intermediate (nothing when the
/// caller passes a workspace).
template <BaseWeight Base, class Delta>
class AdaptedLinear : public detail::LinearForwards<AdaptedLinear<Base, Delta>> {
  static_assert(Adapter<Delta>,
                "lora::AdaptedLinear<Base, Delta>: Delta is not a lora::Adapter; it needs scalar, backend, "
                "gradients, rank_at_compile_time, in/out_features(), rank(), scale(), expression(), "
                "check_consistent(), trainable_parameters(), make_gradients(), for_each_parameter() "
                "(see lora/adapter.hpp and docs/design.md, 'The Adapter concept')");

 public:
  using base_type = Base;
  using delta_type = Delta;
  using scalar = typename Delta::scalar;
  using backend = typename Delta::backend;
  using bias_type = typename backend::template vector<scalar>;
  using workspace = typename backend::template workspace<scalar>;

  static constexpr int in_at_compile_time = weight_traits<Base>::cols;
  static constexpr int out_at_compile_time = weight_traits<Base>::rows;
  static constexpr int rank_at_compile_time = Delta::rank_at_compile_time;
  static constexpr bool base_is_writable = weight_traits<Base>::writable;
  static constexpr bool base_is_quantized = QuantizedMatrix<Base>;
  static constexpr bool delta_is_mergeable = MergeableAdapter<Delta>;

  static_assert(std::is_same_v<typename weight_traits<Base>::scalar, scalar>,
                "lora::AdaptedLinear: the base weight and the delta have different scalar types; "
                "use the same T for both (e.g. RowMatrix<float> with LowRankDelta<float, R>)");
  static_assert(std::is_same_v<typename weight_traits<Base>::backend, backend>,
                "lora::AdaptedLinear: the base weight lives on a different backend than the delta; "
                "move one of them explicitly (see docs/design.md, 'Backends')");
  static_assert(rank_at_compile_time == dynamic || in_at_compile_time == dynamic ||
                    out_at_compile_time == dynamic ||
                    rank_at_compile_time <= (in_at_compile_time < out_at_compile_time ? in_at_compile_time
                                                                                      : out_at_compile_time),
                "lora::AdaptedLinear: the static rank exceeds min(out, in) of the static base weight; "
                "choose Rank <= min(out, in)");

  AdaptedLinear(Base weight, Delta delta) : w_(std::move(weight)), delta_(std::move(delta)) { check_shapes(); }

  AdaptedLinear(Base weight, bias_type bias, Delta delta)
      : w_(std::move(weight)), bias_(std::move(bias)), delta_(std::move(delta)) {
    check_shapes();
    detail::check_bias_length("AdaptedLinear", bias_, out_features());
  }

  index_t in_features() const { return w_.cols(); }
  index_t out_features() const { return w_.rows(); }
  index_t rank() const { return delta_.rank(); }
  bool merged() const { return merged_; }
  bool has_bias() const { return bias_.rows() != 0; }

  const Base& base_weight() const { return w_; }
  /// Writable access for PiSSA and loaders; not for training (W is frozen).
  Base& base_weight()
    requires base_is_writable
  {
    return w_;
  }
  const bias_type& bias() const { return bias_; }
  /// Writable bias, for optimizers when the bias trains (its size must stay [out]).
  bias_type& bias() { return bias_; }
  Delta& delta() { return delta_; }
  const Delta& delta() const { return delta_; }

  // ---- the expressions ----------------------------------------------------------
  /// W alone: the merged layer's effective weight.
  auto base_expression() const { return expr::base_leaf(w_); }
  /// W + s B A with the delta's current scale: the unmerged effective weight.
  auto unmerged_expression() const { return base_expression() + delta_.expression(); }
  /// The effective weight as a lazy expression, whatever the state. When merged,
  /// W already holds the delta, so the delta term carries s = 0 (and evaluators
  /// skip zero-scaled terms). Materialise with expr::materialize(layer.weight()).
  auto weight() const
    requires delta_is_mergeable
  {
    return base_expression() + delta_.expression(merged_ ? scalar(0) : delta_.scale());
  }

  // ---- forward ------------------------------------------------------------------
  /// Y [n, out] = X [n, in] (W + s B A)^T + b. Y is overwritten (beta = 0).
  template <Matrix X, Matrix Y>
  void forward(const X& x, Y&& y, workspace& ws) const {
    check_forward("AdaptedLinear::forward", x, y);
    // Merged and unmerged: the same evaluator call on different expressions.
    if (merged_)
      expr::apply(base_expression(), x, y, scalar(1), scalar(0), ws);
    else
      expr::apply(unmerged_expression(), x, y, scalar(1), scalar(0), ws);
    if (has_bias()) BackendOps<backend>::add_to_rows(scalar(1), bias_, y);
  }

  /// forward(x, y) (a workspace per call) and forward(x) (returns Y [n, out];
  /// a compile-time column vector x [in] is one token and gives a vector [out]).
  using detail::LinearForwards<AdaptedLinear>::forward;

  /// The one shape check of every forward, inference and training: X [n, in],
  /// Y [n, out], same scalar, no overlap; static extents at compile time.
  template <class X, class Y>
  void check_forward(const char* where, const X& x, const Y& y) const {
    static_assert(extents_agree(matrix_traits_t<X>::cols, in_at_compile_time),
                  "lora::AdaptedLinear::forward: X has a static column count different from the base "
                  "weight's static in_features; X must be [n, in]");
    static_assert(extents_agree(matrix_traits_t<Y>::cols, out_at_compile_time),
                  "lora::AdaptedLinear::forward: Y has a static column count different from the base "
                  "weight's static out_features; Y must be [n, out]");
    static_assert(std::is_same_v<scalar_of_t<X>, scalar>,
                  "lora::AdaptedLinear::forward: X has a different scalar type than the layer; cast it "
                  "with .template cast<T>() first");
    check_consistent(where);
    detail::check_linear_io<backend>(where, x, y, in_features(), out_features());
  }

  /// Throws lora::ShapeError when a tensor reachable through a writable
  /// accessor (delta().A(), delta().B(), bias()) no longer has the layer's
  /// shape. Every entry point that reads them calls this first, so a resized
  /// factor is an error, never a read past the end of a buffer.
  void check_consistent(const char* where) const {
    detail::check_delta_shape(where, delta_, out_features(), in_features());
    if (has_bias()) detail::check_bias_length(where, bias_, out_features());
  }

  // ---- merge ----------------------------------------------------------------------
  /// W += s B A (an assignment of the delta expression into W). Returns false
  /// when already merged (nothing done). Remembers s so unmerge() subtracts
  /// exactly what was added even if the multiplier changes meanwhile.
  bool merge() {
    require_writable();
    if (merged_) return false;
    check_consistent("AdaptedLinear::merge");
    merged_scale_ = delta_.scale();
    expr::assign(w_, delta_.expression(merged_scale_), scalar(1), scalar(1));  // W += s B A
    merged_ = true;
    return true;
  }

  /// W -= s B A with the s used by merge(). Returns false when not merged.
  bool unmerge() {
    require_writable();
    if (!merged_) return false;
    check_consistent("AdaptedLinear::unmerge");
    expr::assign(w_, delta_.expression(merged_scale_), scalar(-1), scalar(1));  // W -= s B A
    merged_ = false;
    return true;
  }

  /// merge() that first evaluates W + s B A block by block and refuses (throws
  /// lora::NumericError, W bit-identical) when any entry would be NaN or Inf.
  /// Costs a second rank-r update pass, never a copy of W.
  bool safe_merge() {
    require_writable();
    if (merged_) return false;
    check_consistent("AdaptedLinear::safe_merge");
    const index_t bad = expr::first_non_finite(unmerged_expression());
    if (bad >= 0)
      detail::raise<NumericError>("AdaptedLinear::safe_merge: W + s*B*A (s = ", delta_.scale(),
                                   ") is not finite at row ", bad / in_features(), ", column ",
                                   bad % in_features(), "; W was left unchanged");
    return merge();
  }

 private:
  static void require_writable() {
    static_assert(delta_is_mergeable,
                  "lora::AdaptedLinear: merge()/unmerge()/safe_merge() need a lora::MergeableAdapter (one whose "
                  "expression(s) can be added into W); keep this adapter unmerged");
    static_assert(base_is_writable || !base_is_quantized,
                  "lora::AdaptedLinear: merge()/unmerge()/safe_merge() cannot add into a compressed (NF4), "
                  "16-bit or packed base in place; use lora::merged_weight(layer) for a dense merged W, or "
                  "lora::merge_to_nf4(layer) to requantise W + s*B*A with an error report (a 16-bit "
                  "bf16 / fp16 base: lora::merge_rounded(layer) rounds once and reports the error; a "
                  "lora::PackedMatrix base: lora::PackedMatrix(lora::merged_weight(layer)) packs the merged W)");
    static_assert(base_is_writable || base_is_quantized,
                  "lora::AdaptedLinear: merge()/unmerge()/safe_merge() write W, but the base weight is "
                  "read-only (e.g. Eigen::Map<const RowMatrix<T>>); wrap the buffer in a writable "
                  "Eigen::Map<RowMatrix<T>> or let the layer own a copy");
  }
  void check_shapes() const { detail::check_delta_shape("AdaptedLinear", delta_, out_features(), in_features()); }

  Base w_;
  bias_type bias_;
  Delta delta_;
  bool merged_ = false;
  scalar merged_scale_ = scalar(0);
};

template <class Base, class Delta>
AdaptedLinear(Base, Delta) -> AdaptedLinear<Base, Delta>;
template <class Base, class Bias, class Delta>
AdaptedLinear(Base, Bias, Delta) -> AdaptedLinear<Base, Delta>;

}  // namespace lora
