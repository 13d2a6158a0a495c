// adapter.hpp: the Adapter concept, what AdaptedLinear, lora::train, the
// optimizers and memory accounting may ask of the trainable part of a layer.
// LowRankDelta is the first model; docs/design.md ("The Adapter concept") walks
// through a second one (LoRA-FA, A frozen), which tests/test_adapter.cpp plugs
// in without a change here or in the layer.
#pragma once

#ifndef LORA_UMBRELLA_INCLUDED
#error "Include <lora/lora.hpp> (or <lora/thrust.hpp>) instead of lora/adapter.hpp."
#endif

#include <concepts>
#include <type_traits>

#include "config.hpp"
#include "expr/nodes.hpp"

namespace lora {

/// Which optimizer group a trained tensor belongs to: LoRA+ trains the
/// up-projection B at lr * ratio, everything else at lr.
enum class ParamRole { down, up, other };

namespace detail {
/// A stand-in for the functor of for_each_parameter in the concept check.
struct ParameterProbe {
  template <class V, class G>
  void operator()(const char*, ParamRole, V&, G&) const {}
};
}  // namespace detail

/// An adapter: the trainable term `E(X)` that AdaptedLinear adds to `X W^T`.
///  - types `scalar`, `backend`, `gradients` (what backward fills; zero());
///    `rank_at_compile_time` (a static rank or lora::dynamic);
///  - shape: in_features(), out_features(), rank();
///  - scale() and expression(): the term as a lazy expression node at the
///    current scale (s B A for LoRA), evaluated by the expression evaluators;
///  - check_consistent(where): throws lora::ShapeError if its tensors were
///    resized out of shape;
///  - trainable_parameters(), make_gradients() (zero-filled, shaped like the
///    trained tensors) and for_each_parameter(grads, f), which calls
///    f(name, role, value, gradient) for each trained tensor (optimizers);
///  - the training pair: record(D, saved) leaves in the workspace `saved` what
///    backward needs for adapter input D when the forward did not evaluate
///    the term (a merged layer); backward(G, D, saved, grads, beta) sets
///    grads = beta grads + dL/d(parameters). A forward that evaluates
///    expression() with `saved` as its workspace leaves the same intermediates
///    there (evaluator<LowRank> keeps H = D A^T in slot 0).
template <class D>
concept Adapter =
    requires { typename D::scalar; typename D::backend; typename D::gradients; } &&
    std::is_same_v<std::remove_cv_t<decltype(D::rank_at_compile_time)>, int> &&
    requires(const D& d, D& md, typename D::gradients& g, const char* where) {
      { d.in_features() } -> std::convertible_to<index_t>;
      { d.out_features() } -> std::convertible_to<index_t>;
      { d.rank() } -> std::convertible_to<index_t>;
      { d.scale() } -> std::convertible_to<typename D::scalar>;
      { d.expression() } -> expr::Expression;
      { d.trainable_parameters() } -> std::convertible_to<index_t>;
      { d.make_gradients() } -> std::same_as<typename D::gradients>;
      d.check_consistent(where);
      g.zero();
      md.for_each_parameter(g, detail::ParameterProbe{});
    };

/// An adapter whose term can be added into a writable base weight and taken
/// out again: expression(s) is the term at scale s (merge records s, so
/// unmerge subtracts exactly what was added).
template <class D>
concept MergeableAdapter = Adapter<D> && requires(const D& d, typename D::scalar s) {
  { d.expression(s) } -> expr::Expression;
};

/// An adapter made of a pair of factors A [r, in] and B [out, r]: what the
/// initialisation strategies (lora::init) write.
template <class D>
concept LowRankFactors = Adapter<D> && requires(D& d) {
  d.A();
  d.B();
};

}  // namespace lora
