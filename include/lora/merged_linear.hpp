// merged_linear.hpp: MergedLinear<Base, Delta>, loralib's fused projection
// (one frozen W [sum(out_k), in] for q, k and v) with a separate low-rank delta
// on each enabled slice of output rows, and the conversion to and from
// loralib's stacked lora_A [r k, in] / lora_B [out_slice k, r] layout.
// Every backend (slices of Y and G are Backend::middle_cols views); the
// loralib conversion reads and writes host (Eigen) layers.
#pragma once

#include <cstddef>
#include <numeric>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "lora.hpp"

namespace lora {

/// The gradients of a MergedLinear's deltas: one Delta::gradients per enabled
/// slice, in slice order (LoRA: dA_k [r, in], dB_k [out_k, r]).
template <class Delta>
class MergedGradients {
 public:
  using slice_gradients = typename Delta::gradients;

  MergedGradients() = default;
  explicit MergedGradients(std::vector<slice_gradients> slices) : slices_(std::move(slices)) {}

  /// The j-th enabled slice's gradients (j counts enabled slices only).
  slice_gradients& operator[](std::size_t j) { return slices_.at(j); }
  const slice_gradients& operator[](std::size_t j) const { return slices_.at(j); }
  std::size_t size() const { return slices_.size(); }
  void zero() {
    for (auto& g : slices_) g.zero();
  }

 private:
  std::vector<slice_gradients> slices_;
};

/// The deltas of a MergedLinear, one per enabled slice in slice order. It is
/// the layer's `delta_type`, so train::Gradients<MergedLinear> and the
/// optimizers (SGD, AdamW, LoRA+ by ParamRole) take the layer unchanged:
/// for_each_parameter names each tensor "slice<k>.lora_A" / "slice<k>.lora_B",
/// k being the slice's index among all slices.
template <class Delta>
class MergedDeltas {
 public:
  using delta_type = Delta;
  using scalar = typename Delta::scalar;
  using backend = typename Delta::backend;
  using gradients = MergedGradients<Delta>;
  static constexpr int rank_at_compile_time = Delta::rank_at_compile_time;

  MergedDeltas() = default;
  MergedDeltas(std::vector<Delta> deltas, std::vector<index_t> slice_of)
      : deltas_(std::move(deltas)), slice_of_(std::move(slice_of)) {}

  std::size_t size() const { return deltas_.size(); }
  bool empty() const { return deltas_.empty(); }
  /// The j-th enabled slice's delta (j counts enabled slices only); writable
  /// so values can be loaded or trained in place (shapes are checked on use).
  Delta& operator[](std::size_t j) { return deltas_.at(j); }
  const Delta& operator[](std::size_t j) const { return deltas_.at(j); }
  auto begin() { return deltas_.begin(); }
  auto end() { return deltas_.end(); }
  auto begin() const { return deltas_.begin(); }
  auto end() const { return deltas_.end(); }
  /// Which slice (index among all slices) the j-th delta adapts.
  index_t slice_of(std::size_t j) const { return slice_of_.at(j); }

  /// Sum over the deltas of what trains (LoRA: r (in + out_k) each).
  index_t trainable_parameters() const {
    index_t n = 0;
    for (const auto& d : deltas_) n += d.trainable_parameters();
    return n;
  }
  gradients make_gradients() const {
    std::vector<typename Delta::gradients> g;
    g.reserve(deltas_.size());
    for (const auto& d : deltas_) g.push_back(d.make_gradients());
    return gradients(std::move(g));
  }
  /// f(name, role, value, gradient) for every trained tensor, slice by slice.
  template <class F>
  void for_each_parameter(gradients& g, F&& f) {
    if (g.size() != deltas_.size())
      detail::raise<ShapeError>("MergedLinear: gradients hold ", g.size(), " slices, the layer has ", deltas_.size(),
                                 " enabled slices; make them with layer.delta().make_gradients()");
    for (std::size_t j = 0; j < deltas_.size(); ++j)
      deltas_[j].for_each_parameter(g[j], [&](const char* name, ParamRole role, auto& value, auto& grad) {
        const std::string full = "slice" + std::to_string(slice_of_[j]) + "." + name;
        f(full.c_str(), role, value, grad);
      });
  }

 private:
  std::vector<Delta> deltas_;
  std::vector<index_t> slice_of_;
};

/// A fused linear layer (loralib's MergedLinear, e.g. GPT-2's c_attn): one
/// frozen base W [out, in] whose rows are cut into slices out = out_0 + out_1
/// + ... (q, k, v), an enable mask choosing which slices are adapted, and one
/// low-rank delta [out_k, in] per enabled slice:
///   Y[:, slice k] = X W[slice k]^T + b[slice k] + s_k (X A_k^T) B_k^T   (enabled k)
///   Y[:, slice k] = X W[slice k]^T + b[slice k]                         (disabled k)
/// The base product X W^T is computed once into all of Y; each enabled slice's
/// term is added into its column range of Y (never B_k A_k, never a zero-padded
/// [out, in] delta as loralib forms).
///
/// Base is W's storage as for AdaptedLinear: an owned RowMatrix<T>, an
/// Eigen::Map (const or writable) over the caller's buffer, a 16-bit
/// RowMatrix<Eigen::bfloat16> / <Eigen::half> or an NF4Matrix (decoded inside
/// the products); on the Thrust backend the bases AdaptedLinear takes there (the
/// conformance suite runs a DeviceMatrix<T>). merge() / unmerge() need a
/// writable dense W; merged_weight() works for every base.
/// lora::to_device(layer) / to_host(layer) move an unmerged layer.
///
/// forward() and backward() are const and safe to call from several threads on
/// one layer: they only read W, the deltas and the bias, and allocate [n, r]
/// scratch (nothing when the caller passes a workspace).
template <BaseWeight Base, class Delta>
class MergedLinear : public detail::LinearForwards<MergedLinear<Base, Delta>> {
  static_assert(MergeableAdapter<Delta>,
                "lora::MergedLinear<Base, Delta>: Delta must be a lora::MergeableAdapter (e.g. "
                "lora::LowRankDelta<T, Rank>), one per enabled slice");

 public:
  using base_type = Base;
  using slice_delta_type = Delta;
  /// What train::Gradients and the optimizers see as the layer's adapter.
  using delta_type = MergedDeltas<Delta>;
  using gradients = MergedGradients<Delta>;
  using scalar = typename Delta::scalar;
  using backend = typename Delta::backend;
  using bias_type = typename backend::template vector<scalar>;
  using matrix_type = typename backend::template matrix<scalar>;
  using workspace = typename backend::template workspace<scalar>;

  static constexpr int in_at_compile_time = weight_traits<Base>::cols;
  static constexpr int out_at_compile_time = weight_traits<Base>::rows;
  static constexpr int rank_at_compile_time = Delta::rank_at_compile_time;
  static constexpr bool base_is_writable = weight_traits<Base>::writable;
  static constexpr bool base_is_quantized = QuantizedMatrix<Base>;

  static_assert(std::is_same_v<typename weight_traits<Base>::scalar, scalar>,
                "lora::MergedLinear: the base weight and the deltas have different (compute) scalar types; use "
                "the same T for both (e.g. RowMatrix<float> with LowRankDelta<float, R>)");
  static_assert(std::is_same_v<typename weight_traits<Base>::backend, backend>,
                "lora::MergedLinear: the base weight lives on a different backend than the deltas");

  /// W [sum(slice_sizes), in]; enable_lora has one flag per slice; `deltas`
  /// has one delta per enabled slice, in slice order, each [slice size, in].
  MergedLinear(Base weight, std::vector<index_t> slice_sizes, std::vector<bool> enable_lora,
               std::vector<Delta> deltas)
      : w_(std::move(weight)), sizes_(std::move(slice_sizes)), enabled_(std::move(enable_lora)) {
    init(std::move(deltas));
  }
  /// The same with a bias [out].
  MergedLinear(Base weight, bias_type bias, std::vector<index_t> slice_sizes, std::vector<bool> enable_lora,
               std::vector<Delta> deltas)
      : w_(std::move(weight)), bias_(std::move(bias)), sizes_(std::move(slice_sizes)),
        enabled_(std::move(enable_lora)) {
    detail::check_bias_length("MergedLinear", bias_, out_features());
    init(std::move(deltas));
  }
  /// Zero-filled deltas of rank `rank` on the enabled slices (as loralib starts
  /// B; initialise A with init::KaimingZero through deltas()[j].init(...)).
  MergedLinear(Base weight, std::vector<index_t> slice_sizes, std::vector<bool> enable_lora, index_t rank,
               DeltaOptions options = {})
    requires std::is_constructible_v<Delta, index_t, index_t, index_t, DeltaOptions>
      : w_(std::move(weight)), sizes_(std::move(slice_sizes)), enabled_(std::move(enable_lora)) {
    check_slices("MergedLinear");
    std::vector<Delta> deltas;
    for (std::size_t k = 0; k < sizes_.size(); ++k)
      if (enabled_[k]) deltas.emplace_back(sizes_[k], in_features(), rank, options);
    init(std::move(deltas));
  }

  index_t in_features() const { return w_.cols(); }
  index_t out_features() const { return w_.rows(); }
  bool merged() const { return merged_; }
  bool has_bias() const { return bias_.rows() != 0; }

  /// Number of slices (enabled or not), their sizes, first rows and the mask.
  index_t slice_count() const { return static_cast<index_t>(sizes_.size()); }
  const std::vector<index_t>& slice_sizes() const { return sizes_; }
  const std::vector<bool>& enable_lora() const { return enabled_; }
  index_t slice_offset(index_t k) const { return offsets_.at(static_cast<std::size_t>(k)); }
  index_t slice_size(index_t k) const { return sizes_.at(static_cast<std::size_t>(k)); }
  bool slice_enabled(index_t k) const { return enabled_.at(static_cast<std::size_t>(k)); }

  const Base& base_weight() const { return w_; }
  /// Writable access for loaders; not for training (W is frozen).
  Base& base_weight()
    requires base_is_writable
  {
    return w_;
  }
  const bias_type& bias() const { return bias_; }
  /// Writable bias, for optimizers when the bias trains (its size must stay [out]).
  bias_type& bias() { return bias_; }
  /// All deltas (the enabled slices', in order); also under the name delta(),
  /// which is what train::Gradients and the optimizers call.
  delta_type& deltas() { return deltas_; }
  const delta_type& deltas() const { return deltas_; }
  delta_type& delta() { return deltas_; }
  const delta_type& delta() const { return deltas_; }
  /// The delta of slice k (index among all slices); ValueError when slice k is
  /// not enabled or does not exist.
  Delta& slice_delta(index_t k) { return deltas_[delta_index("MergedLinear::slice_delta", k)]; }
  const Delta& slice_delta(index_t k) const { return deltas_[delta_index("MergedLinear::slice_delta", k)]; }

  /// W alone, as an expression (the merged layer's effective weight).
  auto base_expression() const { return expr::base_leaf(w_); }
  /// Rows of slice k of W, as an expression (a view, or an NF4 row range).
  auto slice_base_expression(index_t k) const {
    return expr::slice_rows(base_expression(), slice_offset(k), slice_size(k));
  }

  // ---- forward ------------------------------------------------------------------
  /// Y [n, out] = X W^T + b, then Y[:, slice k] += s_k (X A_k^T) B_k^T for each
  /// enabled slice (skipped when merged: W holds the terms). Y is overwritten.
  template <Matrix X, Matrix Y>
  void forward(const X& x, Y&& y, workspace& ws) const {
    check_forward("MergedLinear::forward", x, y);
    expr::apply(base_expression(), x, y, scalar(1), scalar(0), ws);  // (n, out) = (n, in) (out, in)^T, once
    if (!merged_)
      for (std::size_t j = 0; j < deltas_.size(); ++j)  // (n, out_k) += s_k (X A_k^T) B_k^T
        expr::apply(deltas_[j].expression(), x, backend::middle_cols(y, offset_of(j), size_of(j)), scalar(1),
                    scalar(1), ws);
    if (has_bias()) BackendOps<backend>::add_to_rows(scalar(1), bias_, y);
  }
  /// forward(x, y) (a workspace per call) and forward(x) (returns Y [n, out]).
  using detail::LinearForwards<MergedLinear>::forward;

  // ---- backward -------------------------------------------------------------------
  /// From X [n, in] (the forward's input) and G = dL/dY [n, out], per enabled
  /// slice k with G_k = G[:, slice k] (a column block, no copy) and H_k = X A_k^T:
  ///   dB_k = s_k G_k^T H_k   [out_k, r]      dA_k = s_k (G_k B_k)^T X   [r, in]
  /// (the delta's own backward, on G_k), and
  ///   dX = G W + sum_k s_k (G_k B_k) A_k   [n, in]   (G W' when merged)
  ///   db = sum over tokens of G                       (train::Gradients with a trained bias)
  /// options.accumulate adds into the gradients, options.accumulate_dx into dX
  /// (X feeding several layers). No dropout (loralib's lora_dropout = 0).
  /// H_k is recomputed here (n r in multiply-adds per slice) rather than kept
  /// from the forward, so the forward stays a plain const call.
  template <Matrix X, Matrix G, Matrix DX>
  void backward(const X& x, const G& g, gradients& grads, DX&& dx, workspace& ws,
                train::BackwardOptions options = {}) const {
    backward_impl(x, g, grads, static_cast<bias_type*>(nullptr), &dx, ws, options);
  }
  template <Matrix X, Matrix G, Matrix DX>
  void backward(const X& x, const G& g, gradients& grads, DX&& dx, train::BackwardOptions options = {}) const {
    workspace ws;
    backward_impl(x, g, grads, static_cast<bias_type*>(nullptr), &dx, ws, options);
  }
  /// dA_k, dB_k only (the first layer of a network needs no dX).
  template <Matrix X, Matrix G>
  void backward(const X& x, const G& g, gradients& grads, train::BackwardOptions options = {}) const {
    workspace ws;
    backward_impl(x, g, grads, static_cast<bias_type*>(nullptr), static_cast<matrix_type*>(nullptr), ws, options);
  }
  /// The same into train::Gradients<MergedLinear> (what optimizer.add(layer,
  /// grads) registers), with db when it trains.
  template <Matrix X, Matrix G, Matrix DX>
  void backward(const X& x, const G& g, train::Gradients<MergedLinear>& grads, DX&& dx,
                train::BackwardOptions options = {}) const {
    workspace ws;
    backward_impl(x, g, grads.adapter(), grads.has_bias() ? &grads.db() : nullptr, &dx, ws, options);
  }
  template <Matrix X, Matrix G>
  void backward(const X& x, const G& g, train::Gradients<MergedLinear>& grads,
                train::BackwardOptions options = {}) const {
    workspace ws;
    backward_impl(x, g, grads.adapter(), grads.has_bias() ? &grads.db() : nullptr,
                  static_cast<matrix_type*>(nullptr), ws, options);
  }

  // ---- merge ----------------------------------------------------------------------
  /// W[slice k] += s_k B_k A_k for each enabled slice. Returns false when
  /// already merged. Remembers each s_k so unmerge() subtracts what was added.
  bool merge() {
    require_writable();
    if (merged_) return false;
    check_consistent("MergedLinear::merge");
    merged_scales_.clear();
    for (std::size_t j = 0; j < deltas_.size(); ++j) {
      merged_scales_.push_back(deltas_[j].scale());
      expr::assign(backend::middle_rows(w_, offset_of(j), size_of(j)), deltas_[j].expression(merged_scales_[j]),
                   scalar(1), scalar(1));  // (out_k, in) += s_k B_k A_k
    }
    merged_ = true;
    return true;
  }
  /// W[slice k] -= s_k B_k A_k with the s_k of merge(). Returns false when not merged.
  bool unmerge() {
    require_writable();
    if (!merged_) return false;
    check_consistent("MergedLinear::unmerge");
    for (std::size_t j = 0; j < deltas_.size(); ++j)
      expr::assign(backend::middle_rows(w_, offset_of(j), size_of(j)), deltas_[j].expression(merged_scales_[j]),
                   scalar(-1), scalar(1));
    merged_ = false;
    return true;
  }
  /// merge() that first checks every enabled slice's W[slice k] + s_k B_k A_k
  /// block by block and throws lora::NumericError (W bit-identical) when an
  /// entry would be NaN or Inf.
  bool safe_merge() {
    require_writable();
    if (merged_) return false;
    check_consistent("MergedLinear::safe_merge");
    for (std::size_t j = 0; j < deltas_.size(); ++j) {
      const index_t k = deltas_.slice_of(j);
      const index_t bad = expr::first_non_finite(slice_base_expression(k) + deltas_[j].expression());
      if (bad >= 0)
        detail::raise<NumericError>("MergedLinear::safe_merge: W + s*B*A of slice ", k, " (s = ", deltas_[j].scale(),
                                     ") is not finite at row ", offset_of(j) + bad / in_features(), ", column ",
                                     bad % in_features(), "; W was left unchanged");
    }
    return merge();
  }
  /// The effective weight [out, in], dense (the backend's matrix), for any
  /// base (16-bit / NF4 decoded): W with s_k B_k A_k added into each enabled
  /// slice's rows; W alone when merged (it holds the terms).
  matrix_type merged_weight() const {
    check_consistent("MergedLinear::merged_weight");
    matrix_type out = expr::materialize(base_expression());
    if (!merged_)
      for (std::size_t j = 0; j < deltas_.size(); ++j)
        expr::assign(backend::middle_rows(out, offset_of(j), size_of(j)), deltas_[j].expression(), scalar(1),
                     scalar(1));
    return out;
  }

  /// The same layer with each tensor (W, bias, each delta) replaced by
  /// move(tensor): what lora::to_device(layer) / to_host(layer) call (the
  /// moved layer owns its W). ValueError when merged (W holds the deltas' terms then).
  template <class Move>
  auto transferred(Move move) const {
    constexpr const char* where = "MergedLinear::transferred";
    detail::check_movable(where, merged_);
    check_consistent(where);
    auto w = move(w_);
    using moved_delta = decltype(move(deltas_[0]));
    std::vector<moved_delta> deltas;
    deltas.reserve(deltas_.size());
    for (const Delta& d : deltas_) deltas.push_back(move(d));
    using result = MergedLinear<decltype(w), moved_delta>;
    if (has_bias()) return result(std::move(w), move(bias_), sizes_, enabled_, std::move(deltas));
    return result(std::move(w), sizes_, enabled_, std::move(deltas));
  }

  /// Throws lora::ShapeError when a delta is no longer [out_k, in] or the bias
  /// no longer [out] (a tensor resized through a writable accessor). Every
  /// entry point calls it first.
  void check_consistent(const char* where) const {
    if (deltas_.size() != delta_slices_.size())
      detail::raise<ShapeError>(where, ": the layer has ", delta_slices_.size(), " enabled slices but ",
                                 deltas_.size(), " deltas");
    for (std::size_t j = 0; j < deltas_.size(); ++j) {
      const Delta& d = deltas_[j];
      d.check_consistent(where);
      if (d.out_features() != size_of(j) || d.in_features() != in_features())
        detail::raise<ShapeError>(where, ": the delta of slice ", delta_slices_[j], " is [out, in] = [",
                                   d.out_features(), ", ", d.in_features(), "], expected [", size_of(j), ", ",
                                   in_features(), "] (slice ", delta_slices_[j], " is rows [", offset_of(j), ", ",
                                   offset_of(j) + size_of(j), ") of W [", out_features(), ", ", in_features(), "])");
    }
    if (has_bias()) detail::check_bias_length(where, bias_, out_features());
  }

  /// The shape check of forward: X [n, in], Y [n, out], no overlap.
  template <class X, class Y>
  void check_forward(const char* where, const X& x, const Y& y) const {
    static_assert(extents_agree(matrix_traits_t<X>::cols, in_at_compile_time),
                  "lora::MergedLinear::forward: X has a static column count different from W's static "
                  "in_features; X must be [n, in]");
    static_assert(extents_agree(matrix_traits_t<Y>::cols, out_at_compile_time),
                  "lora::MergedLinear::forward: Y has a static column count different from W's static "
                  "out_features; Y must be [n, out]");
    static_assert(std::is_same_v<scalar_of_t<X>, scalar> && std::is_same_v<scalar_of_t<Y>, scalar>,
                  "lora::MergedLinear::forward: X or Y has a different scalar type than the layer; cast it first");
    check_consistent(where);
    detail::check_linear_io<backend>(where, x, y, in_features(), out_features());
  }

 private:
  void check_slices(const char* where) const {
    if (enabled_.size() != sizes_.size())
      detail::raise<ShapeError>(where, ": enable_lora has ", enabled_.size(), " flags but there are ",
                                 sizes_.size(), " slices; give one flag per slice");
    if (sizes_.empty()) detail::raise<ShapeError>(where, ": no slices; give at least one slice size");
    index_t total = 0;
    for (std::size_t k = 0; k < sizes_.size(); ++k) {
      if (sizes_[k] <= 0)
        detail::raise<ShapeError>(where, ": slice ", k, " has size ", sizes_[k], "; slice sizes must be positive");
      total = detail::checked_add(where, total, sizes_[k]);
    }
    if (total != out_features())
      detail::raise<ShapeError>(where, ": the slice sizes sum to ", total, " but W has out_features = ",
                                 out_features(), " rows (W is [", out_features(), ", ", in_features(), "])");
  }

  void init(std::vector<Delta> deltas) {
    check_slices("MergedLinear");
    index_t off = 0;
    for (std::size_t k = 0; k < sizes_.size(); ++k) {
      offsets_.push_back(off);
      if (enabled_[k]) delta_slices_.push_back(static_cast<index_t>(k));
      off += sizes_[k];
    }
    if (deltas.size() != delta_slices_.size())
      detail::raise<ShapeError>("MergedLinear: ", deltas.size(), " deltas given for ", delta_slices_.size(),
                                 " enabled slices; give one delta per enabled slice, in slice order");
    deltas_ = delta_type(std::move(deltas), delta_slices_);
    check_consistent("MergedLinear");
  }

  std::size_t delta_index(const char* where, index_t k) const {
    if (k < 0 || k >= slice_count())
      detail::raise<ValueError>(where, ": slice ", k, " does not exist (the layer has ", slice_count(), " slices)");
    for (std::size_t j = 0; j < delta_slices_.size(); ++j)
      if (delta_slices_[j] == k) return j;
    detail::raise<ValueError>(where, ": slice ", k, " is not enabled (enable_lora[", k, "] = false); it has no delta");
  }
  index_t offset_of(std::size_t j) const { return offsets_[static_cast<std::size_t>(delta_slices_[j])]; }
  index_t size_of(std::size_t j) const { return sizes_[static_cast<std::size_t>(delta_slices_[j])]; }

  template <class X, class G, class DB, class DX>
  void backward_impl(const X& x, const G& g, gradients& grads, DB* db, DX* dx, workspace& ws,
                     train::BackwardOptions options) const {
    static_assert(std::is_same_v<scalar_of_t<X>, scalar> && std::is_same_v<scalar_of_t<G>, scalar>,
                  "lora::MergedLinear::backward: X or G has a different scalar type than the layer; cast it first");
    constexpr const char* where = "MergedLinear::backward";
    check_consistent(where);
    const index_t n = x.rows();
    if (x.cols() != in_features())
      detail::raise<ShapeError>(where, ": X has ", x.cols(), " columns, expected in_features = ", in_features());
    if (g.rows() != n || g.cols() != out_features())
      detail::raise<ShapeError>(where, ": G is [", g.rows(), ", ", g.cols(), "], expected [n, out] = [", n, ", ",
                                 out_features(), "]");
    if (grads.size() != deltas_.size())
      detail::raise<ShapeError>(where, ": gradients hold ", grads.size(), " slices, the layer has ", deltas_.size(),
                                 " enabled slices; make them with layer.delta().make_gradients()");
    for (std::size_t j = 0; j < deltas_.size(); ++j) {
      const auto& gj = grads[j];
      const Delta& d = deltas_[j];
      if constexpr (requires { gj.dA(); gj.dB(); }) {
        if (gj.dA().rows() != d.rank() || gj.dA().cols() != in_features() || gj.dB().rows() != size_of(j) ||
            gj.dB().cols() != d.rank())
          detail::raise<ShapeError>(where, ": gradients of slice ", delta_slices_[j], " are dA [", gj.dA().rows(),
                                     ", ", gj.dA().cols(), "], dB [", gj.dB().rows(), ", ", gj.dB().cols(),
                                     "], expected dA [r, in] = [", d.rank(), ", ", in_features(),
                                     "], dB [out_k, r] = [", size_of(j), ", ", d.rank(), "]");
      }
    }
    if (db && db->rows() != out_features())
      detail::raise<ShapeError>(where, ": db has ", db->rows(), " entries, expected out = ", out_features());
    if (dx) {
      if (dx->rows() != n || dx->cols() != in_features())
        detail::raise<ShapeError>(where, ": dX is [", dx->rows(), ", ", dx->cols(), "], expected [n, in] = [", n,
                                   ", ", in_features(), "]");
      if (backend::overlaps(g, *dx) || backend::overlaps(x, *dx))
        detail::raise<ShapeError>(where, ": dX shares memory with X or G");
    }

    const scalar beta = options.accumulate ? scalar(1) : scalar(0);
    for (std::size_t j = 0; j < deltas_.size(); ++j) {
      const auto gk = backend::middle_cols(g, offset_of(j), size_of(j));  // (n, out_k): a view of G
      deltas_[j].record(x, ws);                                 // slot 0: H_k = X A_k^T (n, r)
      deltas_[j].backward(gk, x, ws, grads[j], beta);           // dA_k, dB_k (slot 1: G_k B_k)
    }
    if (db) BackendOps<backend>::sum_rows(scalar(1), g, beta, *db);  // (out) = sum_t G[t, :]
    if (dx) {
      const scalar beta_dx = options.accumulate_dx ? scalar(1) : scalar(0);
      expr::apply_transposed(base_expression(), g, *dx, scalar(1), beta_dx, ws);  // (n, in) = (n, out) (out, in)
      if (!merged_)
        for (std::size_t j = 0; j < deltas_.size(); ++j)  // (n, in) += s_k (G_k B_k) A_k
          expr::apply_transposed(deltas_[j].expression(), backend::middle_cols(g, offset_of(j), size_of(j)), *dx,
                                 scalar(1), scalar(1), ws);
    }
  }

  static void require_writable() {
    static_assert(base_is_writable || !base_is_quantized,
                  "lora::MergedLinear: merge()/unmerge()/safe_merge() cannot add into a compressed (NF4) or "
                  "16-bit base in place; use layer.merged_weight() for a dense merged W");
    static_assert(base_is_writable || base_is_quantized,
                  "lora::MergedLinear: merge()/unmerge()/safe_merge() write W, but the base weight is read-only "
                  "(e.g. Eigen::Map<const RowMatrix<T>>); wrap the buffer in a writable Eigen::Map<RowMatrix<T>> "
                  "or let the layer own a copy");
  }

  Base w_;
  bias_type bias_;
  std::vector<index_t> sizes_;
  std::vector<bool> enabled_;
  std::vector<index_t> offsets_;       // first row of each slice
  std::vector<index_t> delta_slices_;  // slice index of each delta
  delta_type deltas_;
  bool merged_ = false;
  std::vector<scalar> merged_scales_;
};

/// The dense effective weight of a MergedLinear (layer.merged_weight()).
template <class Base, class Delta>
auto merged_weight(const MergedLinear<Base, Delta>& layer) {
  return layer.merged_weight();
}

// ---- loralib's layout -------------------------------------------------------------
//
// loralib.MergedLinear(in, out, r, lora_alpha, enable_lora=[e_0, ..., e_{m-1}])
// cuts W [out, in] into m equal slices of d = out / m rows and stores, for the
// K = sum(e) enabled slices together,
//   lora_A [r K, in]    lora_B [d K, r]
// Its merge_AB is conv1d(lora_A[None], lora_B[..., None], groups=K): output
// channel o (group j = o / d) reads input channels [j r, (j + 1) r), so
//   delta_w[o, :] = sum_{c < r} lora_B[o, c] lora_A[j r + c, :],
// i.e. the j-th enabled slice (the j-th True in enable_lora) has
//   A_j = lora_A[j r : (j + 1) r, :]   [r, in]
//   B_j = lora_B[j d : (j + 1) d, :]   [d, r]
// and zero_pad scatters the K d rows of delta_w into the enabled slices' rows of
// W (slice k = the j-th enabled one covers rows [k d, (k + 1) d)). scaling is
// lora_alpha / r for every slice. fan_in_fan_out = True (GPT-2's Conv1D) only
// transposes W (stored [in, out]); lora_A and lora_B keep the layout above, so
// the caller transposes W and nothing else.
namespace loralib {

/// loralib's slices: m equal slices of out / m rows (ShapeError unless m divides out).
inline std::vector<index_t> slice_sizes(index_t out_features, index_t slices) {
  if (slices <= 0 || out_features <= 0 || out_features % slices != 0)
    detail::raise<ShapeError>("loralib::slice_sizes: out_features = ", out_features, " is not divisible by ",
                               slices, " slices (len(enable_lora)); loralib requires equal slices");
  return std::vector<index_t>(static_cast<std::size_t>(slices), out_features / slices);
}

/// The deltas of loralib's MergedLinear from its lora_A [r K, in] and lora_B
/// [d K, r] (K = enabled slices, d = out_features / len(enable_lora)), one per
/// enabled slice in order, with s = lora_alpha / r (DeltaOptions{.alpha =
/// lora_alpha}). The factors are copied.
template <class T, int Rank = dynamic, class LA, class LB>
std::vector<LowRankDelta<T, Rank>> merged_deltas(const LA& lora_A, const LB& lora_B, const std::vector<bool>& enable_lora,
                                                 index_t out_features, double lora_alpha) {
  constexpr const char* where = "loralib::merged_deltas";
  const index_t m = static_cast<index_t>(enable_lora.size());
  if (m == 0) detail::raise<ShapeError>(where, ": enable_lora is empty");
  const index_t d = slice_sizes(out_features, m)[0];
  index_t k_enabled = 0;
  for (bool e : enable_lora) k_enabled += e ? 1 : 0;
  if (k_enabled == 0) {
    if (lora_A.size() != 0 || lora_B.size() != 0)
      detail::raise<ShapeError>(where, ": enable_lora has no True entry but lora_A is [", lora_A.rows(), ", ",
                                 lora_A.cols(), "] and lora_B is [", lora_B.rows(), ", ", lora_B.cols(),
                                 "]; loralib creates no factors then");
    return {};
  }
  const index_t r = lora_B.cols();
  if (r <= 0 || lora_A.rows() != r * k_enabled || lora_B.rows() != d * k_enabled)
    detail::raise<ShapeError>(where, ": lora_A is [", lora_A.rows(), ", ", lora_A.cols(), "] and lora_B is [",
                               lora_B.rows(), ", ", lora_B.cols(), "]; with ", k_enabled, " enabled slices of ", d,
                               " rows expected lora_A [r * ", k_enabled, ", in] and lora_B [", d, " * ", k_enabled,
                               ", r] = [", d * k_enabled, ", r] (r = lora_B's columns = ", r, ")");
  if (Rank != dynamic && r != Rank)
    detail::raise<RankError>(where, ": the factors have rank ", r, " but the delta type has static rank ", Rank);
  std::vector<LowRankDelta<T, Rank>> out;
  out.reserve(static_cast<std::size_t>(k_enabled));
  for (index_t j = 0; j < k_enabled; ++j) {
    typename LowRankDelta<T, Rank>::a_matrix a = lora_A.middleRows(j * r, r).template cast<T>();  // (r, in)
    typename LowRankDelta<T, Rank>::b_matrix b = lora_B.middleRows(j * d, d).template cast<T>();  // (d, r)
    out.emplace_back(std::move(b), std::move(a), DeltaOptions{.alpha = lora_alpha});
  }
  return out;
}

/// loralib's stacked factors of a layer built that way.
template <class T>
struct MergedFactors {
  RowMatrix<T> lora_A;  // (r K, in)
  RowMatrix<T> lora_B;  // (d K, r)
};

/// The inverse of merged_deltas: stacks the layer's deltas into lora_A / lora_B.
/// ShapeError unless the slices are equal (loralib's) and all deltas share one
/// rank; the scale is not stored (loralib keeps lora_alpha in its config).
template <class Base, class Delta>
MergedFactors<typename Delta::scalar> merged_factors(const MergedLinear<Base, Delta>& layer) {
  static_assert(std::is_same_v<typename Delta::backend, EigenBackend>,
                "lora::loralib::merged_factors: loralib's layout is built on the host; move the layer there "
                "first (lora::to_host(layer))");
  using T = typename Delta::scalar;
  constexpr const char* where = "loralib::merged_factors";
  layer.check_consistent(where);
  const index_t d = layer.slice_size(0);
  for (index_t k = 0; k < layer.slice_count(); ++k)
    if (layer.slice_size(k) != d)
      detail::raise<ShapeError>(where, ": slice ", k, " has ", layer.slice_size(k), " rows and slice 0 has ", d,
                                 "; loralib's layout needs equal slices");
  const auto& ds = layer.deltas();
  const index_t kn = static_cast<index_t>(ds.size());
  const index_t r = kn > 0 ? ds[0].rank() : 0;
  for (std::size_t j = 0; j < ds.size(); ++j)
    if (ds[j].rank() != r)
      detail::raise<ShapeError>(where, ": the delta of slice ", ds.slice_of(j), " has rank ", ds[j].rank(),
                                 " and the first has rank ", r, "; loralib's layout needs one rank");
  MergedFactors<T> f{RowMatrix<T>(r * kn, layer.in_features()), RowMatrix<T>(d * kn, r)};
  for (index_t j = 0; j < kn; ++j) {
    f.lora_A.middleRows(j * r, r) = ds[static_cast<std::size_t>(j)].A();
    f.lora_B.middleRows(j * d, d) = ds[static_cast<std::size_t>(j)].B();
  }
  return f;
}

}  // namespace loralib

}  // namespace lora
