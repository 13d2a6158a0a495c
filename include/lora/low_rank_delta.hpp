// low_rank_delta.hpp: LowRankDelta<T, Rank, Backend>, the trainable pair
// A [r, in], B [out, r] and its scale s, i.e. the update dW = s * B A.
#pragma once

#ifndef LORA_UMBRELLA_INCLUDED
#error "Include <lora/lora.hpp> (or <lora/thrust.hpp>) instead of lora/low_rank_delta.hpp."
#endif

#include <cstdint>
#include <type_traits>
#include <utility>

#include "adapter.hpp"
#include "backend/concept.hpp"
#include "expr/nodes.hpp"
#include "rank.hpp"

namespace lora {

/// dL/dA [r, in] and dL/dB [out, r] of a LowRankDelta (there is no dW: the
/// base is frozen).
template <class T, int Rank = dynamic, class Backend = DefaultBackend>
class LowRankGradients {
 public:
  using a_matrix = typename Backend::template matrix<T, Rank, dynamic>;  // (r, in)
  using b_matrix = typename Backend::template matrix<T, dynamic, Rank>;  // (out, r)
  using gradients = LowRankGradients<T, Rank, Backend>;

  LowRankGradients() = default;
  LowRankGradients(index_t out, index_t in, index_t rank) {
    Backend::resize(da_, rank, in);
    Backend::resize(db_, out, rank);
    zero();
  }
  a_matrix& dA() { return da_; }
  const a_matrix& dA() const { return da_; }
  b_matrix& dB() { return db_; }
  const b_matrix& dB() const { return db_; }
  void zero() {
    Backend::fill(da_, T(0));
    Backend::fill(db_, T(0));
  }

 private:
  a_matrix da_;
  b_matrix db_;
};

template <class T, int Rank = dynamic, class Backend = DefaultBackend>
class LowRankDelta {
  static_assert(std::is_floating_point_v<T>,
                "lora::LowRankDelta<T, Rank>: T must be float or double (adapters train in full "
                "precision; low-precision storage belongs to the base weight)");
  static_assert(detail::check_backend<Backend, T>(),
                "lora::LowRankDelta<T, Rank, Backend>: Backend is not a lora::Backend (the static_assert above "
                "names the missing piece; see lora/backend/concept.hpp)");
  static_assert(is_valid_rank_v<Rank>,
                "lora::LowRankDelta<T, Rank>: Rank must be a positive integer, or lora::dynamic to "
                "choose the rank at run time");

 public:
  using scalar = T;
  using backend = Backend;
  static constexpr int rank_at_compile_time = Rank;
  using a_matrix = typename Backend::template matrix<T, Rank, dynamic>;  // (r, in)
  using b_matrix = typename Backend::template matrix<T, dynamic, Rank>;  // (out, r)
  using gradients = LowRankGradients<T, Rank, Backend>;

  /// Static rank: A and B sized [Rank, in] and [out, Rank], zero-filled.
  LowRankDelta(index_t out, index_t in, DeltaOptions options = {})
    requires(Rank != dynamic)
      : LowRankDelta(out, in, Rank, options) {}

  /// Dynamic rank (or a static one repeated, checked to agree), zero-filled.
  LowRankDelta(index_t out, index_t in, index_t rank, DeltaOptions options = {}) : options_(options) {
    detail::check_rank("LowRankDelta", rank, out, in);
    detail::check_options("LowRankDelta", options_);
    if (Rank != dynamic && rank != Rank)
      detail::raise<RankError>("LowRankDelta: rank ", rank, " given for a static rank of ", Rank,
                                "; use LowRankDelta<T, lora::dynamic> for a run-time rank");
    Backend::resize(a_, rank, in);
    Backend::resize(b_, out, rank);
    Backend::fill(a_, T(0));
    Backend::fill(b_, T(0));
  }

  /// From existing factors (e.g. loaded from a PEFT file): B [out, r], A [r, in].
  LowRankDelta(b_matrix b, a_matrix a, DeltaOptions options = {})
      : a_(std::move(a)), b_(std::move(b)), options_(options) {
    if (b_.cols() != a_.rows())
      detail::raise<ShapeError>("LowRankDelta: B is [", b_.rows(), ", ", b_.cols(), "] and A is [",
                                 a_.rows(), ", ", a_.cols(), "]; B's columns must equal A's rows (the rank)");
    detail::check_rank("LowRankDelta", a_.rows(), b_.rows(), a_.cols());
    detail::check_options("LowRankDelta", options_);
  }

  index_t rank() const { return a_.rows(); }
  index_t in_features() const { return a_.cols(); }
  index_t out_features() const { return b_.rows(); }
  /// r (in + out): what trains, and what gradients and optimizer state scale with.
  index_t trainable_parameters() const { return rank() * (in_features() + out_features()); }

  /// A [r, in]. Writable so values can be loaded or trained in place; its shape
  /// must stay [r, in] (checked where it is used).
  a_matrix& A() { return a_; }
  const a_matrix& A() const { return a_; }
  /// B [out, r].
  b_matrix& B() { return b_; }
  const b_matrix& B() const { return b_; }

  const DeltaOptions& options() const { return options_; }
  double alpha() const { return options_.alpha; }
  Scaling rule() const { return options_.rule; }
  double multiplier() const { return options_.multiplier; }
  /// Adapter strength applied on top of the Scaling rule (0 disables it).
  void set_multiplier(double m) {
    detail::check_finite_parameter("LowRankDelta::set_multiplier", "multiplier", m);
    options_.multiplier = m;
  }

  /// s = alpha / r (or alpha / sqrt(r), or the user scale when alpha == 0),
  /// times the multiplier.
  T scale() const { return static_cast<T>(scale_for(options_, rank())); }

  /// The lazy expression s * B A (nothing is computed).
  auto expression() const { return expression(scale()); }
  /// The same at a given scale (merge records s; a merged layer's weight()
  /// carries its delta at s = 0).
  auto expression(T s) const { return s * expr::product(b_, a_); }

  // ---- the Adapter concept's training side (adapter.hpp) --------------------------
  gradients make_gradients() const { return gradients(out_features(), in_features(), rank()); }
  /// A, then B (LoRA+ trains B, the up-projection, at lr * ratio).
  template <class F>
  void for_each_parameter(gradients& g, F&& f) {
    f("lora_A", ParamRole::down, a_, g.dA());
    f("lora_B", ParamRole::up, b_, g.dB());
  }
  /// H = D A^T (n, r) into slot 0 of `saved`: what expr::apply of expression()
  /// leaves there, for a forward that did not evaluate the term.
  template <class D, class WS>
  void record(const D& d, WS& saved) const {
    auto h = saved.template matrix<Rank>(d.rows(), rank(), 0);  // (n, r)
    Backend::gemm_nt(T(1), d, a_, T(0), h);                      // (n, r) = (n, in) (r, in)^T
  }
  /// grads = beta grads + (dA, dB) from G = dL/dY [n, out], the adapter's input
  /// D [n, in] and H = D A^T left in slot 0 of `saved`; slot 1 takes G B.
  ///   dB = s G^T H   [out, r]        dA = s (G B)^T D   [r, in]
  template <class G, class D, class WS>
  void backward(const G& g, const D& d, WS& saved, gradients& grads, T beta) const {
    const index_t n = g.rows(), r = rank();
    if (grads.dA().rows() != r || grads.dA().cols() != in_features() || grads.dB().rows() != out_features() ||
        grads.dB().cols() != r)
      detail::raise<ShapeError>("AdaptedLinear::backward: gradients are dA [", grads.dA().rows(), ", ",
                                 grads.dA().cols(), "], dB [", grads.dB().rows(), ", ", grads.dB().cols(),
                                 "], expected dA [r, in] = [", r, ", ", in_features(), "], dB [out, r] = [",
                                 out_features(), ", ", r, "]");
    const T s = scale();
    auto h = saved.template matrix<Rank>(n, r, 0);   // (n, r) = D A^T, from the forward
    auto gb = saved.template matrix<Rank>(n, r, 1);  // (n, r) = G B
    Backend::gemm_nn(T(1), g, b_, T(0), gb);
    Backend::gemm_tn(s, g, h, beta, grads.dB());   // (out, r) = s G^T H
    Backend::gemm_tn(s, gb, d, beta, grads.dA());  // (r, in) = s (G B)^T D
  }

  /// Shape check used by every entry point that reads A and B.
  void check_consistent(const char* where) const {
    if (b_.cols() != a_.rows() || (Rank != dynamic && a_.rows() != Rank))
      detail::raise<ShapeError>(where, ": B is [", b_.rows(), ", ", b_.cols(), "] and A is [", a_.rows(),
                                 ", ", a_.cols(), "]; B's columns must equal A's rows (the rank)");
  }

  /// Initialise the factors: `delta.init(init::KaimingZero{}, seed)`; see
  /// init.hpp for the strategies. Returns what the strategy reports.
  template <class Init>
  auto init(const Init& strategy, std::uint64_t seed = 0) {
    return strategy.initialize(*this, seed);
  }

 private:
  a_matrix a_;
  b_matrix b_;
  DeltaOptions options_;
};

}  // namespace lora
