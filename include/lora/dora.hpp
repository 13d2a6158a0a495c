// dora.hpp: DoRA (weight-decomposed low-rank adaptation, Liu et al. 2024) as
// PEFT defines it (use_dora=True), on any backend (Eigen on the CPU, Thrust):
//
//   W' = diag(m / n) (W + s B A),   n_i = ||W_i + s B_i A||   (row norms over in)
//   Y  = X W'^T + b = c . (X W^T + s (X A^T) B^T) + b,  c = m / n  (per output column)
//
// with m [out] trained beside A and B. Neither forward nor backward forms B A or
// anything [out, in]: the squared norms come from
//   n_i^2 = ||W_i||^2 + 2 s B_i . (A W^T)[:, i] + s^2 B_i (A A^T) B_i^T,
// ||W_i||^2 cached at construction (W is frozen) and A W^T [r, out] computed by
// the forward's own base product: the r rows of A are stacked under the n
// tokens, so one product X W^T / A W^T reads W once, as a LoRA forward does.
// The backward stacks likewise (dX's rows and, for the exact norm gradient, r
// more) so it also reads W at most once. The element-wise steps (norms, the
// column scale by m / n, dm) are the functors of detail::dora, run by the
// backend's for_each_index: one source for every backend. docs/dora.md has
// the derivation, accuracy and what is not supported.
#pragma once

#ifndef LORA_UMBRELLA_INCLUDED
#error "Include <lora/lora.hpp> (then <lora/dora.hpp>) instead of including lora/dora.hpp before it."
#endif

#include <Eigen/Core>
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <utility>

#include "adapter.hpp"
#include "backend/eigen/backend.hpp"
#include "detail/gather.hpp"
#include "expr/evaluate.hpp"
#include "low_rank_delta.hpp"
#include "train/dropout.hpp"
#include "train/gradients.hpp"

namespace lora {

/// How train::backward treats the norm n = ||W + s B A||_row:
///   detached  as a constant (PEFT's weight_norm.detach(), the DoRA paper's
///             section 4.3): cheaper, no extra pass over W
///   exact     the true gradient through the norm (dA and dB gain a term; one
///             extra [r, out] x [out, in] product, stacked with dX's)
enum class NormGradient { detached, exact };

struct DoRAOptions {
  NormGradient norm_gradient = NormGradient::detached;
};

namespace detail::dora {

/// out[i] = ||w_i||^2, or ||w_i|| with root: summed in double, rounded once.
template <class T>
struct row_norms_fn {
  Strided<const T> w;
  T* out;
  bool root;
  LORA_HOST_DEVICE void operator()(index_t i) const {
    using std::sqrt;
    double acc = 0.0;
    for (index_t j = 0; j < w.cols; ++j) {
      const double v = static_cast<double>(w(i, j));
      acc += v * v;
    }
    out[i] = static_cast<T>(root ? sqrt(acc) : acc);
  }
};

/// n_i = sqrt(max(0, ||W_i||^2 + 2 s B_i . AW[:, i] + s^2 BM_i . B_i)) and,
/// when m is set, c_i = m_i / n_i. Clamped at 0: rounding can make a
/// (near-)zero row's sum slightly negative.
template <class T>
struct norm_fn {
  const T* wn2;
  Strided<const T> b, aw, bm;  // B [out, r], A W^T [r, out], B A A^T [out, r]
  T s;
  const T* m;
  T* norm;
  T* coef;
  LORA_HOST_DEVICE void operator()(index_t i) const {
    using std::sqrt;
    T cross = T(0), quad = T(0);
    for (index_t k = 0; k < b.cols; ++k) {
      cross += b(i, k) * aw(k, i);
      quad += bm(i, k) * b(i, k);
    }
    const T v = wn2[i] + (T(2) * s) * cross + (s * s) * quad;
    norm[i] = sqrt(v > T(0) ? v : T(0));
    if (m) coef[i] = m[i] / norm[i];
  }
};

/// out_i = m_i / n_i.
template <class T>
struct ratio_fn {
  const T *m, *n;
  T* out;
  LORA_HOST_DEVICE void operator()(index_t i) const { out[i] = m[i] / n[i]; }
};

/// y(t, j) = u(t, j) c_j, or y(t, j) += u(t, j) c_j with add.
template <class T>
struct scale_columns_fn {
  Strided<const T> u;
  Strided<T> y;
  const T* c;
  bool add;
  LORA_HOST_DEVICE void operator()(index_t t, index_t j) const {
    const T uc = u(t, j) * c[j];
    y(t, j) = add ? y(t, j) + uc : uc;
  }
};

/// w(i, j) *= c_i, or /= c_i (merge, unmerge).
template <class T>
struct scale_rows_fn {
  Strided<T> w;
  const T* c;
  bool divide;
  LORA_HOST_DEVICE void operator()(index_t i, index_t j) const { w(i, j) = divide ? w(i, j) / c[i] : w(i, j) * c[i]; }
};

/// dm_j = (sum_t g(t, j) u(t, j)) / n_j.
template <class T>
struct magnitude_grad_fn {
  Strided<const T> g, u;
  const T* norm;
  T* dm;
  LORA_HOST_DEVICE void operator()(index_t j) const {
    T acc = T(0);
    for (index_t t = 0; t < g.rows; ++t) acc += g(t, j) * u(t, j);
    dm[j] = acc / norm[j];
  }
};

/// The exact norm gradient's terms, tw_i = 2 s w_i = -s c_i dm_i / n_i:
///   dB(i, k) += tw_i (AW(k, i) + s BM(i, k)),   Q^T(k, i) = tw_i B(i, k).
template <class T>
struct norm_grad_fn {
  const T *coef, *dm, *norm;
  Strided<const T> aw, bm, b;
  Strided<T> db, qt;
  T s;
  LORA_HOST_DEVICE void operator()(index_t i, index_t k) const {
    const T tw = (T(-1) * s) * (coef[i] * dm[i] / norm[i]);
    db(i, k) += tw * (aw(k, i) + s * bm(i, k));
    qt(k, i) = tw * b(i, k);
  }
};

}  // namespace detail::dora

/// dL/dA [r, in], dL/dB [out, r] and dL/dm [out] of a DoRA layer.
template <class T, int Rank = dynamic, class Backend = EigenBackend>
class DoRAGradients {
 public:
  using vector_type = typename Backend::template vector<T>;
  using low_rank_gradients = LowRankGradients<T, Rank, Backend>;

  DoRAGradients() = default;
  DoRAGradients(index_t out, index_t in, index_t rank) : low_rank_(out, in, rank) {
    Backend::resize(dm_, out, 1);
    Backend::fill(dm_, T(0));
  }

  auto& dA() { return low_rank_.dA(); }
  const auto& dA() const { return low_rank_.dA(); }
  auto& dB() { return low_rank_.dB(); }
  const auto& dB() const { return low_rank_.dB(); }
  vector_type& dm() { return dm_; }
  const vector_type& dm() const { return dm_; }
  void zero() {
    low_rank_.zero();
    Backend::fill(dm_, T(0));
  }

 private:
  low_rank_gradients low_rank_;
  vector_type dm_;
};

/// The trained part of a DoRA layer: the low-rank pair (A, B, scale) and the
/// magnitude m [out]. What DoRALinear::delta() returns, what train::Gradients
/// sizes and what the optimizers register (lora_A, lora_B at the LoRA+ ratio,
/// lora_magnitude_vector: PEFT's names).
template <class T, int Rank = dynamic, class Backend = EigenBackend>
class DoRADelta {
  static_assert(std::is_floating_point_v<T>,
                "lora::DoRADelta<T, Rank>: T must be float or double (adapters train in full precision)");

 public:
  using scalar = T;
  using backend = Backend;
  static constexpr int rank_at_compile_time = Rank;
  using low_rank_type = LowRankDelta<T, Rank, Backend>;
  using a_matrix = typename low_rank_type::a_matrix;  // (r, in)
  using b_matrix = typename low_rank_type::b_matrix;  // (out, r)
  using vector_type = typename Backend::template vector<T>;
  using gradients = DoRAGradients<T, Rank, Backend>;

  DoRADelta(low_rank_type low_rank, vector_type magnitude, const char* where = "DoRADelta")
      : low_rank_(std::move(low_rank)), m_(std::move(magnitude)) {
    check_magnitude(where, m_);
  }

  index_t rank() const { return low_rank_.rank(); }
  index_t in_features() const { return low_rank_.in_features(); }
  index_t out_features() const { return low_rank_.out_features(); }
  /// r (in + out) + out.
  index_t trainable_parameters() const { return low_rank_.trainable_parameters() + out_features(); }
  T scale() const { return low_rank_.scale(); }

  a_matrix& A() { return low_rank_.A(); }
  const a_matrix& A() const { return low_rank_.A(); }
  b_matrix& B() { return low_rank_.B(); }
  const b_matrix& B() const { return low_rank_.B(); }
  /// m [out]. Writable so an optimizer trains it in place; set_magnitude
  /// checks a new value (length out, finite).
  vector_type& magnitude() { return m_; }
  const vector_type& magnitude() const { return m_; }
  void set_magnitude(vector_type m) {
    check_magnitude("DoRADelta::set_magnitude", m);
    m_ = std::move(m);
  }
  low_rank_type& low_rank() { return low_rank_; }
  const low_rank_type& low_rank() const { return low_rank_; }

  gradients make_gradients() const { return gradients(out_features(), in_features(), rank()); }
  /// A, B (LoRA+: the up-projection), then m.
  template <class F>
  void for_each_parameter(gradients& g, F&& f) {
    f("lora_A", ParamRole::down, low_rank_.A(), g.dA());
    f("lora_B", ParamRole::up, low_rank_.B(), g.dB());
    f("lora_magnitude_vector", ParamRole::other, m_, g.dm());
  }

  void check_consistent(const char* where) const {
    low_rank_.check_consistent(where);
    if (m_.rows() != out_features())
      detail::raise<ShapeError>(where, ": the magnitude m has ", m_.rows(), " entries, expected out_features = ",
                                 out_features(), "; it was resized");
  }

  /// Initialise A and B (lora::init strategies). m is not touched: call
  /// DoRALinear::reset_magnitude() if B is no longer zero and m should be the
  /// new row norms, as PEFT's update_layer sets it.
  template <class Init>
  auto init(const Init& strategy, std::uint64_t seed = 0) {
    return low_rank_.init(strategy, seed);
  }

 private:
  void check_magnitude(const char* where, const vector_type& m) const {
    if (m.rows() != out_features())
      detail::raise<ShapeError>(where, ": the magnitude m has ", m.rows(), " entries, expected out_features = ",
                                 out_features());
    const index_t bad = Backend::first_non_finite(Backend::data(m), m.rows());
    if (bad >= 0)
      detail::raise<NumericError>(where, ": the magnitude m is not finite at row ", bad, " (value ",
                                   static_cast<double>(Backend::read(Backend::data(m), bad)), ")");
  }

  low_rank_type low_rank_;
  vector_type m_;
};

template <BaseWeight Base, class T = typename weight_traits<Base>::scalar, int Rank = dynamic>
class DoRALinear;

/// Scratch of DoRALinear's forward and backward, and (inside a train::Tape) the
/// forward's intermediates for the backward. Grows, never shrinks: reused, it
/// stops allocating. Never holds anything [out, in].
template <class T, class Backend = EigenBackend>
class DoRAWorkspace {
 public:
  using vector_type = typename Backend::template vector<T>;
  /// Elements held by every buffer (memory checks).
  index_t capacity() const {
    index_t c = eval_.capacity() + norm_.size() + coef_.size() + dm_.size();
    for (const auto& b : bufs_) c += b.capacity();
    return c;
  }
  /// Tokens of the last forward that recorded here (-1 before any), and
  /// whether it applied dropout.
  index_t tokens() const { return n_; }
  bool dropped() const { return dropped_; }

 private:
  template <BaseWeight, class, int>
  friend class DoRALinear;
  enum slot : int {
    stacked_in,   // (n [+ n] + r, in)  X [, drop(X)], A
    stacked_out,  // (n [+ n] + r, out) X W^T [, drop(X) W^T], A W^T; U = ... + s H B^T in place
    h,            // (n, r) H = D A^T
    aat,          // (r, r) A A^T
    bm,           // (out, r) B A A^T
    stacked_g,    // (n + r [+ n], out) backward: G c, Q^T, G
    stacked_dx,   // (n + r [+ n], in)  backward: the rows of stacked_g times W (+ s B A)
    gb,           // (n + r, r) backward: (G c) B
    count
  };
  auto get(int s, index_t rows, index_t cols) { return bufs_[static_cast<std::size_t>(s)].matrix(rows, cols); }
  std::array<typename Backend::template workspace<T>, count> bufs_;
  typename Backend::template workspace<T> eval_;
  vector_type norm_, coef_;  // (out) n = ||W + s B A||_row and c = m / n of the last forward
  vector_type dm_;           // (out) backward: this batch's dm
  // What the last recorded forward saw (the tape's).
  index_t n_ = -1;
  bool dropped_ = false;
};

/// A frozen linear layer adapted by DoRA. Base is the storage of W [out, in]:
/// an owned RowMatrix<T>, an Eigen::Map (writable or const) over the caller's
/// bytes, a 16-bit RowMatrix<Eigen::bfloat16 / half> or an NF4Matrix (the
/// latter three with T = float; W is decoded inside the products as
/// AdaptedLinear does), or their Thrust counterparts (DeviceMatrix, its views,
/// DeviceNF4Matrix; lora::to_device(layer) moves a host layer). The backend is
/// the base's; m, the bias and the gradients live there too. merge() /
/// unmerge() need a writable dense base.
///
/// forward() is const and thread-safe (each call its own workspace).
template <BaseWeight Base, class T, int Rank>
class DoRALinear : public detail::LinearForwards<DoRALinear<Base, T, Rank>> {
 public:
  using base_type = Base;
  using scalar = T;
  using backend = typename weight_traits<Base>::backend;
  using delta_type = DoRADelta<T, Rank, backend>;
  using low_rank_type = LowRankDelta<T, Rank, backend>;
  using vector_type = typename backend::template vector<T>;
  using bias_type = vector_type;
  using workspace = DoRAWorkspace<T, backend>;

  static constexpr int rank_at_compile_time = Rank;
  static constexpr bool base_is_writable = weight_traits<Base>::writable;
  static constexpr bool base_is_quantized = QuantizedMatrix<Base>;

  static_assert(std::is_same_v<typename weight_traits<Base>::scalar, T>,
                "lora::DoRALinear: the base weight's compute scalar differs from the adapter's; use the same T "
                "(float for bf16 / fp16 / NF4 bases)");

  /// m initialised to the row norms of W + s B A (= ||W_i|| when B = 0), as
  /// PEFT's DoraLinearLayer.update_layer does.
  DoRALinear(Base weight, low_rank_type delta, DoRAOptions options = {})
      : DoRALinear(std::move(weight), bias_type(), std::move(delta), options) {}
  DoRALinear(Base weight, bias_type bias, low_rank_type delta, DoRAOptions options = {})
      : w_(std::move(weight)),
        bias_(std::move(bias)),
        delta_(check_delta(std::move(delta), w_), zeros(w_.rows()), "DoRALinear"),
        options_(options) {
    check_shapes();
    cache_base_norms();
    reset_magnitude();
  }
  /// With a given magnitude (a PEFT checkpoint's lora_magnitude_vector).
  DoRALinear(Base weight, low_rank_type delta, vector_type magnitude, DoRAOptions options = {})
      : DoRALinear(std::move(weight), bias_type(), std::move(delta), std::move(magnitude), options) {}
  DoRALinear(Base weight, bias_type bias, low_rank_type delta, vector_type magnitude, DoRAOptions options = {})
      : w_(std::move(weight)),
        bias_(std::move(bias)),
        delta_(check_delta(std::move(delta), w_), std::move(magnitude), "DoRALinear"),
        options_(options) {
    check_shapes();
    cache_base_norms();
  }

  index_t in_features() const { return w_.cols(); }
  index_t out_features() const { return w_.rows(); }
  index_t rank() const { return delta_.rank(); }
  bool merged() const { return merged_; }
  bool has_bias() const { return bias_.rows() != 0; }

  const Base& base_weight() const { return w_; }
  const bias_type& bias() const { return bias_; }
  bias_type& bias() { return bias_; }
  delta_type& delta() { return delta_; }
  const delta_type& delta() const { return delta_; }
  const vector_type& magnitude() const { return delta_.magnitude(); }
  /// ||W_i||^2, cached at construction (computed in double, rounded once).
  const vector_type& base_squared_norms() const { return wn2_; }

  NormGradient norm_gradient() const { return options_.norm_gradient; }
  void set_norm_gradient(NormGradient g) { options_.norm_gradient = g; }

  /// m = ||W + s B A||_row with the current A and B (PEFT's initialisation).
  void reset_magnitude() {
    if (merged_) detail::raise<ValueError>("DoRALinear::reset_magnitude: the layer is merged; unmerge() it first");
    workspace ws;
    delta_.magnitude() = weight_norm(ws);
  }

  /// n = ||W + s B A||_row [out] by the identity (B A never formed; reads W
  /// once for A W^T).
  vector_type weight_norm() const {
    workspace ws;
    return weight_norm(ws);
  }

  /// Inference: keep n = ||W + s B A||_row as it is now, so forward() (not
  /// the training forward, which always recomputes it) skips A W^T and runs
  /// X W^T + s (X A^T) B^T as LoRA does, then scales by m / n (m read each
  /// call). Like PEFT's ENABLE_DORA_CACHING in eval mode: valid while A, B
  /// and the scale stay as they are; call again after changing them, or
  /// clear_weight_norm_cache().
  void cache_weight_norm() {
    cached_norm_ = weight_norm();
    norm_cached_ = true;
  }
  void clear_weight_norm_cache() {
    norm_cached_ = false;
    cached_norm_.resize(0);
  }
  bool weight_norm_cached() const { return norm_cached_; }

  auto base_expression() const { return expr::base_leaf(w_); }
  /// W + s B A (the direction before the row scaling), lazily.
  auto unmerged_expression() const { return base_expression() + delta_.low_rank().expression(); }

  // ---- forward ------------------------------------------------------------------
  /// Y [n, out] = c . (X W^T + s (X A^T) B^T) + b, c = m / ||W + s B A||_row
  /// (merged: X W'^T + b). Y is overwritten.
  template <Matrix X, Matrix Y>
  void forward(const X& x, Y&& y, workspace& ws) const {
    check_forward("DoRALinear::forward", x, y);
    if (merged_) {
      expr::apply(base_expression(), x, y, T(1), T(0), ws.eval_);
      if (has_bias()) BackendOps<backend>::add_to_rows(T(1), bias_, y);
    } else if (norm_cached_) {
      // LoRA's forward (no stacking: n is known), then the column scale.
      expr::apply(unmerged_expression(), x, y, T(1), T(0), ws.eval_);  // (n, out) = X (W + s B A)^T
      backend::resize(ws.coef_, out_features(), 1);
      backend::for_each_index(out_features(), detail::dora::ratio_fn<T>{backend::data(delta_.magnitude()),
                                                                        backend::data(cached_norm_),
                                                                        backend::data(ws.coef_)});
      scale_columns(y, ws.coef_, y);
      if (has_bias()) BackendOps<backend>::add_to_rows(T(1), bias_, y);
    } else {
      run_forward(x, y, ws, nullptr, 0);
    }
  }
  /// forward(x, y) (a workspace per call) and forward(x) (returns Y).
  using detail::LinearForwards<DoRALinear>::forward;

  /// Training forward (train::forward calls it): the same computation, its
  /// intermediates left in the tape. With dropout active, PEFT's placement:
  ///   Y = X W^T + b + (c - 1) . (D W^T) + c . s (D A^T) B^T,  D = drop(X)
  /// (X, D and A stacked: still one pass over W).
  template <Matrix X, Matrix Y>
  void forward(const X& x, Y&& y, train::Tape<DoRALinear>& tape, const train::Dropout& drop = train::Dropout{},
               std::uint64_t step = 0) const;

  /// dA, dB, dm (and db when `grads` has it) from G = dL/dY [n, out]; dX when
  /// `dx` is not null. The norm is detached or differentiated as
  /// norm_gradient() says.
  template <Matrix X, Matrix G, class DX>
  void backward(const X& x, const G& g, train::Tape<DoRALinear>& tape, train::Gradients<DoRALinear>& grads, DX* dx,
                train::BackwardOptions options) const;

  template <class X, class Y>
  void check_forward(const char* where, const X& x, const Y& y) const {
    static_assert(std::is_same_v<scalar_of_t<X>, T>,
                  "lora::DoRALinear::forward: X has a different scalar type than the layer; cast it first");
    check_consistent(where);
    detail::check_linear_io<backend>(where, x, y, in_features(), out_features());
  }

  void check_consistent(const char* where) const {
    detail::check_delta_shape(where, delta_, out_features(), in_features());
    if (has_bias()) detail::check_bias_length(where, bias_, out_features());
  }

  // ---- merge --------------------------------------------------------------------
  /// W <- diag(m / n) (W + s B A), n = ||W + s B A||_row formed row block by
  /// row block (exact, as PEFT's get_weight_norm). Keeps m / n and s so
  /// unmerge() inverts exactly what was applied. Refuses (lora::NumericError,
  /// W untouched) when some m_i / n_i is zero or not finite: W could not be
  /// recovered. Returns false when already merged.
  bool merge() {
    require_writable();
    if constexpr (base_is_writable) {
      if (merged_) return false;
      check_consistent("DoRALinear::merge");
      const T s = delta_.scale();
      vector_type coef = merge_coefficients("DoRALinear::merge");
      expr::assign(w_, delta_.low_rank().expression(s), T(1), T(1));  // W += s B A
      scale_rows(w_, coef, false);                                     // W <- diag(m / n) W
      merged_coef_ = std::move(coef);
      merged_scale_ = s;
      merged_ = true;
    }
    return true;
  }
  /// AdaptedLinear's name: merge() already evaluates W + s B A before writing
  /// and refuses non-finite values with W untouched.
  bool safe_merge() { return merge(); }
  /// W <- W / (m / n) - s B A with the m / n and s of merge().
  bool unmerge() {
    require_writable();
    if constexpr (base_is_writable) {
      if (!merged_) return false;
      check_consistent("DoRALinear::unmerge");
      scale_rows(w_, merged_coef_, true);
      expr::assign(w_, delta_.low_rank().expression(merged_scale_), T(-1), T(1));  // W -= s B A
      merged_ = false;
    }
    return true;
  }

  /// The effective weight diag(m / n) (W + s B A) as a dense matrix of the
  /// backend (any base; a merged layer returns a copy of W). The only place
  /// DoRA forms [out, in].
  typename backend::template matrix<T> merged_weight() const {
    check_consistent("DoRALinear::merged_weight");
    if (merged_) return expr::materialize(base_expression());
    const vector_type coef = exact_coefficients();
    auto out = expr::materialize(unmerged_expression());
    scale_rows(out, coef, false);
    return out;
  }

  /// The same layer with each tensor passed through `move` (lora::to_device /
  /// to_host call it): W (owned there), bias, A, B, m; the options kept.
  template <class Move>
  auto transferred(Move move) const {
    constexpr const char* where = "DoRALinear::transferred";
    detail::check_movable(where, merged_);
    check_consistent(where);
    auto w = move(w_);
    using result = DoRALinear<decltype(w), T, Rank>;
    typename result::bias_type bias;
    if (has_bias()) bias = move(bias_);
    typename result::vector_type m = move(delta_.magnitude());
    return result(std::move(w), std::move(bias), move(delta_.low_rank()), std::move(m), options_);
  }

 private:
  static low_rank_type&& check_delta(low_rank_type&& d, const Base& w) {
    detail::check_delta_shape("DoRALinear", d, w.rows(), w.cols());
    return std::move(d);
  }
  void check_shapes() const {
    if (has_bias()) detail::check_bias_length("DoRALinear", bias_, out_features());
  }
  static vector_type zeros(index_t n) {
    vector_type v;
    backend::resize(v, n, 1);
    backend::fill(v, T(0));
    return v;
  }
  /// y = u diag(c) (u may be y), or y += u diag(c) with add.
  template <class U, class Y>
  static void scale_columns(const U& u, const vector_type& c, Y& y, bool add = false) {
    detail::for_each_element<backend>(
        y.rows(), y.cols(), detail::dora::scale_columns_fn<T>{detail::strided(u), detail::strided(y), backend::data(c), add});
  }
  template <class M>
  static void scale_rows(M& w, const vector_type& c, bool divide) {
    detail::for_each_element<backend>(w.rows(), w.cols(),
                                      detail::dora::scale_rows_fn<T>{detail::strided(w), backend::data(c), divide});
  }

  static void require_writable() {
    static_assert(base_is_writable || !base_is_quantized,
                  "lora::DoRALinear: merge()/unmerge() cannot write a compressed or 16-bit base in place; use "
                  "layer.merged_weight() for a dense merged W");
    static_assert(base_is_writable || base_is_quantized,
                  "lora::DoRALinear: merge()/unmerge() write W, but the base weight is read-only (e.g. "
                  "Eigen::Map<const RowMatrix<T>>); wrap the buffer in a writable Eigen::Map<RowMatrix<T>> or let "
                  "the layer own a copy");
  }

  /// ||W_i||^2 once, row block by row block through the base's own decoder
  /// (dense, 16-bit or NF4), accumulated in double.
  void cache_base_norms() {
    backend::resize(wn2_, out_features(), 1);
    block_row_norms(base_expression(), backend::data(wn2_), false);
  }
  /// out[i] = ||E_i||^2 (or ||E_i|| with root) of an [out, in] expression,
  /// formed 256 rows at a time.
  template <class E>
  void block_row_norms(const E& e, T* out, bool root) const {
    const index_t rows = out_features(), block_rows = 256;
    typename backend::template matrix<T> block;
    for (index_t start = 0; start < rows; start += block_rows) {
      const index_t count = std::min(block_rows, rows - start);
      backend::resize(block, count, in_features());
      expr::assign(block, expr::slice_rows(e, start, count), T(1), T(0));
      backend::for_each_index(count, detail::dora::row_norms_fn<T>{detail::strided(std::as_const(block)),
                                                                   out + start, root});
    }
  }

  /// ws.norm_ = n from aw = A W^T [r, out] (and ws.coef_ = m / n with
  /// `with_coef`); leaves B A A^T in the workspace.
  template <class AW>
  void norm_from(const AW& aw, workspace& ws, bool with_coef) const {
    const index_t r = rank(), out = out_features();
    const auto& a = delta_.A();
    const auto& b = delta_.B();
    auto aat = ws.get(workspace::aat, r, r);
    auto bm = ws.get(workspace::bm, out, r);
    backend::gemm_nt(T(1), a, a, T(0), aat);  // (r, r) = (r, in) (r, in)^T
    backend::gemm_nn(T(1), b, aat, T(0), bm);  // (out, r) = (out, r) (r, r)
    backend::resize(ws.norm_, out, 1);
    if (with_coef) backend::resize(ws.coef_, out, 1);
    backend::for_each_index(
        out, detail::dora::norm_fn<T>{backend::data(wn2_), detail::strided(b), detail::strided(aw),
                                      detail::strided(std::as_const(bm)), delta_.scale(),
                                      with_coef ? backend::data(delta_.magnitude()) : nullptr,
                                      backend::data(ws.norm_), with_coef ? backend::data(ws.coef_) : nullptr});
  }

  vector_type weight_norm(workspace& ws) const {
    check_consistent("DoRALinear::weight_norm");
    // Merged, W holds diag(m / n) (W + s B A): its norms are not n.
    if (merged_) detail::raise<ValueError>("DoRALinear::weight_norm: the layer is merged; unmerge() it first");
    const index_t r = rank(), out = out_features();
    auto aw = ws.get(workspace::stacked_out, r, out);
    expr::apply(base_expression(), delta_.A(), aw, T(1), T(0), ws.eval_);  // (r, out) = (r, in) (out, in)^T
    norm_from(std::as_const(aw), ws, false);
    return ws.norm_;
  }

  /// m / ||W + s B A||_row with the norm from the formed rows (merge's).
  vector_type exact_coefficients() const {
    const index_t out = out_features();
    vector_type norm, coef;
    backend::resize(norm, out, 1);
    backend::resize(coef, out, 1);
    block_row_norms(unmerged_expression(), backend::data(norm), true);
    backend::for_each_index(
        out, detail::dora::ratio_fn<T>{backend::data(delta_.magnitude()), backend::data(norm), backend::data(coef)});
    return coef;
  }
  vector_type merge_coefficients(const char* where) const {
    vector_type coef = exact_coefficients();
    const auto host = backend::to_host(coef);  // (out, 1), checked on the host
    for (index_t i = 0; i < host.rows(); ++i)
      if (!std::isfinite(host(i, 0)) || host(i, 0) == T(0))
        detail::raise<NumericError>(where, ": m / ||W + s B A|| is ", static_cast<double>(host(i, 0)), " at row ", i,
                                     " (m = ", static_cast<double>(backend::read(backend::data(delta_.magnitude()), i)),
                                     "); merging could not be undone, W was left unchanged");
    return coef;
  }

  /// The one forward: stacks X [, drop(X)], A; one base product; the norm;
  /// Y. `drop` null or inactive: no dropout.
  template <class X, class Y>
  void run_forward(const X& x, Y& y, workspace& ws, const train::Dropout* drop, std::uint64_t step) const {
    using B = backend;
    const index_t n = x.rows(), r = rank(), in = in_features(), out = out_features();
    const bool dropped = drop != nullptr && drop->active();
    const index_t nd = dropped ? n : 0;  // rows of drop(X)
    const T s = delta_.scale();
    auto z = ws.get(workspace::stacked_in, n + nd + r, in);
    BackendOps<B>::copy(x, B::middle_rows(z, 0, n));
    if (dropped) B::dropout(T(1), x, T(0), B::middle_rows(z, n, n), drop->p(), drop->seed(), step);
    BackendOps<B>::copy(delta_.A(), B::middle_rows(z, n + nd, r));
    auto p = ws.get(workspace::stacked_out, n + nd + r, out);
    expr::apply(base_expression(), z, p, T(1), T(0), ws.eval_);  // (n + nd + r, out) = Z W^T: W read once
    norm_from(B::middle_rows(std::as_const(p), n + nd, r), ws, true);

    const auto d = B::middle_rows(std::as_const(z), nd, n);  // (n, in) the adapter input: drop(X) or X
    auto h = ws.get(workspace::h, n, r);
    B::gemm_nt(T(1), d, delta_.A(), T(0), h);  // (n, r) = (n, in) (r, in)^T
    auto u = B::middle_rows(p, nd, n);  // (n, out) D W^T, then U = D W^T + s H B^T
    if (dropped) {                      // Y = X W^T - D W^T, before U gains its low-rank term
      BackendOps<B>::copy(B::middle_rows(std::as_const(p), 0, n), y);
      B::axpby(T(-1), u, T(1), y);
    }
    B::gemm_nt(s, h, delta_.B(), T(1), u);  // (n, out) += s (n, r) (out, r)^T
    scale_columns(u, ws.coef_, y, dropped);  // Y (+)= c . U
    if (has_bias()) BackendOps<B>::add_to_rows(T(1), bias_, y);
    ws.n_ = n;
    ws.dropped_ = dropped;
  }

  Base w_;
  bias_type bias_;
  delta_type delta_;
  vector_type wn2_;  // ||W_i||^2
  DoRAOptions options_;
  bool merged_ = false;
  T merged_scale_ = T(0);
  vector_type merged_coef_;
  bool norm_cached_ = false;
  vector_type cached_norm_;  // (out) cache_weight_norm()'s n
};

// The vectors (bias, m) are the delta's backend's: deduced from the delta.
template <class Base, class T, int R, class B>
DoRALinear(Base, LowRankDelta<T, R, B>, DoRAOptions = {}) -> DoRALinear<Base, T, R>;
template <class Base, class T, int R, class B>
DoRALinear(Base, typename B::template vector<T>, LowRankDelta<T, R, B>, DoRAOptions = {}) -> DoRALinear<Base, T, R>;
template <class Base, class T, int R, class B>
DoRALinear(Base, LowRankDelta<T, R, B>, typename B::template vector<T>, DoRAOptions = {}) -> DoRALinear<Base, T, R>;
template <class Base, class T, int R, class B>
DoRALinear(Base, typename B::template vector<T>, LowRankDelta<T, R, B>, typename B::template vector<T>,
           DoRAOptions = {}) -> DoRALinear<Base, T, R>;

/// The dense merged weight diag(m / n) (W + s B A) of a DoRA layer.
template <class Base, class T, int R>
auto merged_weight(const DoRALinear<Base, T, R>& layer) {
  return layer.merged_weight();
}

}  // namespace lora

namespace lora::train {

/// The tape of a DoRA layer: the forward's stacked products, H, the norm and
/// m / n, kept for backward. One tape per layer and forward in flight.
template <class Base, class T, int R>
class Tape<DoRALinear<Base, T, R>> {
 public:
  index_t tokens() const { return ws_.tokens(); }
  bool dropped() const { return ws_.dropped(); }
  index_t capacity() const { return ws_.capacity(); }

 private:
  friend class DoRALinear<Base, T, R>;
  typename DoRALinear<Base, T, R>::workspace ws_;
  const void* layer_ = nullptr;
  double p_ = 0.0;
  std::uint64_t seed_ = 0, step_ = 0;
};

/// train::forward for a DoRA layer (the generic one's signature; this overload
/// is the more specialised).
template <class Base, class T, int R, class X, class Y>
void forward(const DoRALinear<Base, T, R>& layer, const X& x, Y&& y, Tape<DoRALinear<Base, T, R>>& tape,
             const Dropout& drop = Dropout{}, std::uint64_t step = 0) {
  layer.forward(x, std::forward<Y>(y), tape, drop, step);
}

template <class Base, class T, int R, class X, class G, class DX>
void backward(const DoRALinear<Base, T, R>& layer, const X& x, const G& g, Tape<DoRALinear<Base, T, R>>& tape,
              Gradients<DoRALinear<Base, T, R>>& grads, DX&& dx, BackwardOptions options = {}) {
  layer.backward(x, g, tape, grads, &dx, options);
}

template <class Base, class T, int R, class X, class G>
void backward(const DoRALinear<Base, T, R>& layer, const X& x, const G& g, Tape<DoRALinear<Base, T, R>>& tape,
              Gradients<DoRALinear<Base, T, R>>& grads, BackwardOptions options = {}) {
  layer.backward(x, g, tape, grads, static_cast<std::nullptr_t*>(nullptr), options);
}

}  // namespace lora::train

namespace lora {

template <BaseWeight Base, class T, int Rank>
template <Matrix X, Matrix Y>
void DoRALinear<Base, T, Rank>::forward(const X& x, Y&& y, train::Tape<DoRALinear>& tape, const train::Dropout& drop,
                                        std::uint64_t step) const {
  check_forward("DoRALinear::forward (train)", x, y);
  // Training a merged layer would need W's own norms and W + s B A back; PEFT
  // trains unmerged too (and the optimizers refuse a merged layer).
  if (merged_)
    detail::raise<ValueError>("DoRALinear::forward (train): the layer is merged; unmerge() it before training");
  tape.layer_ = this;
  tape.p_ = drop.p();
  tape.seed_ = drop.seed();
  tape.step_ = step;
  run_forward(x, y, tape.ws_, &drop, step);
}

// Backward, with c = m / n, U = D W^T + s H B^T (the forward's unscaled term),
// H = D A^T, D the adapter input (X, or drop(X)):
//   Y = c . U + b [+ X W^T - D W^T with dropout]
//   dm_i = sum_t G_ti U_ti / n_i
//   dB = s (G c)^T H            dA = s ((G c) B)^T D
//   dX = (G c) (W + s B A)      [dropout: G W + mask . ((G c) (W + s B A) - G W)]
// exact norm gradient, N_i = n_i^2, dL/dN_i = w_i = -c_i dm_i / (2 n_i):
//   dB += diag(2 s w) (W A^T + s B A A^T)
//   dA += Q^T (W + s B A),  Q = diag(2 s w) B
// The rows (G c), Q^T, G are stacked so W is read once.
template <BaseWeight Base, class T, int Rank>
template <Matrix X, Matrix G, class DX>
void DoRALinear<Base, T, Rank>::backward(const X& x, const G& g, train::Tape<DoRALinear>& tape,
                                         train::Gradients<DoRALinear>& grads, DX* dx,
                                         train::BackwardOptions options) const {
  using B = backend;
  constexpr const char* where = "DoRALinear::backward";
  static_assert(std::is_same_v<scalar_of_t<G>, T>,
                "lora::train::backward: G has a different scalar type than the layer; cast it first");
  static_assert(std::is_same_v<scalar_of_t<X>, T>,
                "lora::train::backward: X has a different scalar type than the layer; cast it first");
  check_consistent(where);
  auto& ws = tape.ws_;
  const index_t n = x.rows(), r = rank(), in = in_features(), out = out_features();
  if (x.cols() != in) detail::raise<ShapeError>(where, ": X has ", x.cols(), " columns, expected in_features = ", in);
  if (ws.n_ < 0) detail::raise<ValueError>(where, ": the tape is empty; call train::forward with it first");
  if (tape.layer_ != this)
    detail::raise<ValueError>(where, ": the tape holds another layer's forward; use one tape per layer");
  if (ws.n_ != n)
    detail::raise<ShapeError>(where, ": X has ", n, " rows but the tape's forward saw ", ws.n_, " tokens");
  if (merged_) detail::raise<ValueError>(where, ": the layer was merged after its training forward");
  if (g.rows() != n || g.cols() != out)
    detail::raise<ShapeError>(where, ": G is [", g.rows(), ", ", g.cols(), "], expected [n, out] = [", n, ", ", out,
                               "]");
  auto& ag = grads.adapter();
  if (ag.dA().rows() != r || ag.dA().cols() != in || ag.dB().rows() != out || ag.dB().cols() != r ||
      ag.dm().rows() != out)
    detail::raise<ShapeError>(where, ": gradients are dA [", ag.dA().rows(), ", ", ag.dA().cols(), "], dB [",
                               ag.dB().rows(), ", ", ag.dB().cols(), "], dm [", ag.dm().rows(),
                               "], expected dA [r, in] = [", r, ", ", in, "], dB [out, r] = [", out, ", ", r,
                               "], dm [out] = [", out, "]");
  if (grads.has_bias() && grads.db().rows() != out)
    detail::raise<ShapeError>(where, ": db has ", grads.db().rows(), " entries, expected out = ", out);
  if constexpr (!std::is_same_v<DX, std::nullptr_t>) {
    if (dx->rows() != n || dx->cols() != in)
      detail::raise<ShapeError>(where, ": dX is [", dx->rows(), ", ", dx->cols(), "], expected [n, in] = [", n, ", ",
                                 in, "]");
    if (B::overlaps(g, *dx)) detail::raise<ShapeError>(where, ": G and dX share memory");
  }
  constexpr bool want_dx = !std::is_same_v<DX, std::nullptr_t>;
  const bool exact = options_.norm_gradient == NormGradient::exact;
  const bool dropped = ws.dropped_;
  const index_t nd = dropped ? n : 0;
  const T s = delta_.scale();
  const T beta = options.accumulate ? T(1) : T(0);

  const auto z = ws.get(workspace::stacked_in, n + nd + r, in);
  const auto d = B::middle_rows(z, nd, n);  // (n, in) X or drop(X)
  const auto p = ws.get(workspace::stacked_out, n + nd + r, out);
  const auto u = B::middle_rows(p, nd, n);      // (n, out) U
  const auto aw = B::middle_rows(p, n + nd, r);  // (r, out) A W^T
  const auto h = ws.get(workspace::h, n, r);
  const index_t q_rows = exact ? r : 0, g_rows = (want_dx && dropped) ? n : 0;
  auto sg = ws.get(workspace::stacked_g, n + q_rows + g_rows, out);
  auto gc = B::middle_rows(sg, 0, n);  // (n, out) G c
  scale_columns(g, ws.coef_, gc);

  // dm (fresh, before accumulation: the exact term needs it alone).
  B::resize(ws.dm_, out, 1);
  B::for_each_index(out, detail::dora::magnitude_grad_fn<T>{detail::strided(g), detail::strided(u),
                                                            B::data(ws.norm_), B::data(ws.dm_)});
  B::axpby(T(1), ws.dm_, beta, ag.dm());

  auto gb = ws.get(workspace::gb, n, r);
  B::gemm_nn(T(1), gc, delta_.B(), T(0), gb);  // (n, r) = (n, out) (out, r)
  B::gemm_tn(s, gc, h, beta, ag.dB());         // (out, r) = s (G c)^T H
  B::gemm_tn(s, gb, d, beta, ag.dA());         // (r, in) = s ((G c) B)^T D

  if (exact) {  // dB += diag(2 s w) (A W^T)^T + s B A A^T), Q^T = (diag(2 s w) B)^T
    const auto bm = ws.get(workspace::bm, out, r);
    detail::for_each_element<B>(
        out, r,
        detail::dora::norm_grad_fn<T>{B::data(ws.coef_), B::data(ws.dm_), B::data(ws.norm_), detail::strided(aw),
                                      detail::strided(bm), detail::strided(delta_.B()), detail::strided(ag.dB()),
                                      detail::strided(B::middle_rows(sg, n, r)), s});
  }
  if (grads.has_bias()) BackendOps<B>::sum_rows(T(1), g, beta, grads.db());
  if (!want_dx && !exact) return;
  if (g_rows) BackendOps<B>::copy(g, B::middle_rows(sg, n + q_rows, n));  // dropout: X's own path sees W alone

  // One pass over W for every stacked row: R = S W, then + s (S B) A on the rows
  // that see W + s B A (G c, Q^T; not G of the dropout path).
  const index_t row0 = want_dx ? 0 : n;
  const index_t rows = (want_dx ? n : 0) + q_rows + g_rows, lr_rows = (want_dx ? n : 0) + q_rows;
  auto sdx = ws.get(workspace::stacked_dx, n + q_rows + g_rows, in);
  const auto sg_rows = B::middle_rows(std::as_const(sg), row0, rows);
  expr::apply_transposed(base_expression(), sg_rows, B::middle_rows(sdx, row0, rows), T(1), T(0),
                         ws.eval_);  // (rows, in) = (rows, out) (out, in)
  expr::apply_transposed(delta_.low_rank().expression(), B::middle_rows(std::as_const(sg), row0, lr_rows),
                         B::middle_rows(sdx, row0, lr_rows), T(1), T(1), ws.eval_);  // += s (S B) A
  if (exact) B::axpby(T(1), B::middle_rows(std::as_const(sdx), n, r), T(1), ag.dA());
  if constexpr (want_dx) {
    const T beta_dx = options.accumulate_dx ? T(1) : T(0);
    auto dgc = B::middle_rows(sdx, 0, n);  // (n, in) (G c) (W + s B A)
    if (!dropped) {
      B::axpby(T(1), dgc, beta_dx, *dx);
    } else {
      const auto dg = B::middle_rows(std::as_const(sdx), n + q_rows, n);  // (n, in) G W
      B::axpby(T(-1), dg, T(1), dgc);
      B::axpby(T(1), dg, beta_dx, *dx);
      B::dropout(T(1), dgc, T(1), *dx, tape.p_, tape.seed_, tape.step_);  // the forward's mask
    }
  }
}

}  // namespace lora
