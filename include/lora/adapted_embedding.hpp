// adapted_embedding.hpp: AdaptedEmbedding<Base, Delta>, a frozen embedding
// table [num_embeddings, dim] adapted by a LowRankDelta in PEFT's embedding
// layout (lora_embedding_A [r, num_embeddings], lora_embedding_B [dim, r]):
// the row of token t is table[t] + s * B A[:, t]. Forward gathers rows of the
// table and columns of A; it never forms B A and never multiplies by a one-hot
// matrix. Eigen (CPU) backend.
#pragma once

#include <cstdint>
#include <span>
#include <type_traits>
#include <utility>

#include "lora.hpp"

namespace lora {

/// An embedding layer with a frozen table E [num_embeddings, dim] and a
/// low-rank delta whose A is [r, num_embeddings] and B is [dim, r]
/// (`LowRankDelta<T, R>{dim, num_embeddings, options}`, or PEFT's factors as
/// loaded): Y[i] = E[ids[i]] + s * (B A[:, ids[i]])^T. The delta thus has
/// out_features = dim and in_features = num_embeddings, and s B A is the
/// transpose of the table's update, as in PEFT's get_delta_weight.
///
/// Base is the table's storage: an owned RowMatrix<T>, an Eigen::Map (const or
/// writable) over the caller's buffer, a 16-bit RowMatrix<Eigen::bfloat16> /
/// Map of one (rows widened to float), or an NF4Matrix (each looked-up row
/// decoded on its own). merge() / unmerge() need a writable dense table.
///
/// forward() and backward() are const and safe to call from several threads on
/// one layer: they only read E, A, B and allocate [n, r] scratch (nothing when
/// the caller passes a workspace). Ids are validated before anything is
/// written: an id outside [0, num_embeddings) throws lora::ValueError naming
/// the id and its position, and Y / the gradients are left untouched.
template <BaseWeight Base, class Delta>
class AdaptedEmbedding {
  static_assert(LowRankFactors<Delta>,
                "lora::AdaptedEmbedding<Base, Delta>: Delta must be a low-rank pair with A() and B() "
                "(e.g. lora::LowRankDelta<T, Rank>{dim, num_embeddings, options})");
  static_assert(std::is_same_v<typename Delta::backend, EigenBackend>,
                "lora::AdaptedEmbedding: only the Eigen (CPU) backend is supported");

 public:
  using base_type = Base;
  using delta_type = Delta;
  using scalar = typename Delta::scalar;
  using backend = typename Delta::backend;
  using gradients = typename Delta::gradients;
  /// An embedding has no bias; the type exists so train::Gradients and the
  /// optimizers take this layer as they take an AdaptedLinear.
  using bias_type = typename backend::template vector<scalar>;
  using workspace = typename backend::template workspace<scalar>;

  static constexpr int num_embeddings_at_compile_time = weight_traits<Base>::rows;
  static constexpr int dim_at_compile_time = weight_traits<Base>::cols;
  static constexpr int rank_at_compile_time = Delta::rank_at_compile_time;
  static constexpr bool base_is_writable = weight_traits<Base>::writable;
  static constexpr bool base_is_quantized = QuantizedMatrix<Base>;

  static_assert(std::is_same_v<typename weight_traits<Base>::scalar, scalar>,
                "lora::AdaptedEmbedding: the table and the delta have different (compute) scalar types; "
                "use the same T for both (e.g. RowMatrix<float> with LowRankDelta<float, R>)");
  static_assert(std::is_same_v<typename weight_traits<Base>::backend, backend>,
                "lora::AdaptedEmbedding: the table lives on a different backend than the delta");

  AdaptedEmbedding(Base table, Delta delta) : table_(std::move(table)), delta_(std::move(delta)) {
    check_consistent("AdaptedEmbedding");
  }

  index_t num_embeddings() const { return table_.rows(); }
  index_t embedding_dim() const { return table_.cols(); }
  /// The delta's view of the shape: in = num_embeddings, out = dim.
  index_t in_features() const { return num_embeddings(); }
  index_t out_features() const { return embedding_dim(); }
  index_t rank() const { return delta_.rank(); }
  bool merged() const { return merged_; }
  bool has_bias() const { return false; }

  const Base& table() const { return table_; }
  const bias_type& bias() const { return no_bias_; }
  bias_type& bias() { return no_bias_; }
  Delta& delta() { return delta_; }
  const Delta& delta() const { return delta_; }

  // ---- forward ------------------------------------------------------------------
  /// Y [n, dim] = E[ids] + s * A[:, ids]^T B^T. Y is overwritten.
  template <Matrix Y>
  void forward(std::span<const std::int64_t> ids, Y&& y, workspace& ws) const {
    forward_impl(ids, y, ws);
  }
  template <Matrix Y>
  void forward(std::span<const std::int32_t> ids, Y&& y, workspace& ws) const {
    forward_impl(ids, y, ws);
  }
  template <Matrix Y>
  void forward(std::span<const std::int64_t> ids, Y&& y) const {
    workspace ws;
    forward_impl(ids, y, ws);
  }
  template <Matrix Y>
  void forward(std::span<const std::int32_t> ids, Y&& y) const {
    workspace ws;
    forward_impl(ids, y, ws);
  }
  /// Returns Y [n, dim].
  RowMatrix<scalar> forward(std::span<const std::int64_t> ids) const { return forward_alloc(ids); }
  RowMatrix<scalar> forward(std::span<const std::int32_t> ids) const { return forward_alloc(ids); }

  // ---- backward -------------------------------------------------------------------
  /// From G = dL/dY [n, dim] (no dX: ids are discrete; the table is frozen):
  ///   dB [dim, r] = s G^T A[:, ids]^T
  ///   dA [r, num_embeddings]: column ids[i] += s (G B)[i]^T, duplicates accumulating;
  ///   columns of ids not in the batch are zero (or kept, with options.accumulate).
  /// options.accumulate adds into grads instead of overwriting (accumulate_dx has
  /// no meaning here).
  template <Matrix G>
  void backward(std::span<const std::int64_t> ids, const G& g, gradients& grads, workspace& ws,
                train::BackwardOptions options = {}) const {
    backward_impl(ids, g, grads, ws, options);
  }
  template <Matrix G>
  void backward(std::span<const std::int32_t> ids, const G& g, gradients& grads, workspace& ws,
                train::BackwardOptions options = {}) const {
    backward_impl(ids, g, grads, ws, options);
  }
  template <Matrix G>
  void backward(std::span<const std::int64_t> ids, const G& g, gradients& grads,
                train::BackwardOptions options = {}) const {
    workspace ws;
    backward_impl(ids, g, grads, ws, options);
  }
  template <Matrix G>
  void backward(std::span<const std::int32_t> ids, const G& g, gradients& grads,
                train::BackwardOptions options = {}) const {
    workspace ws;
    backward_impl(ids, g, grads, ws, options);
  }
  /// The same into train::Gradients<AdaptedEmbedding> (what optimizer.add(layer, grads) registers).
  template <Matrix G>
  void backward(std::span<const std::int64_t> ids, const G& g, train::Gradients<AdaptedEmbedding>& grads,
                train::BackwardOptions options = {}) const {
    workspace ws;
    backward_impl(ids, g, grads.adapter(), ws, options);
  }
  template <Matrix G>
  void backward(std::span<const std::int32_t> ids, const G& g, train::Gradients<AdaptedEmbedding>& grads,
                train::BackwardOptions options = {}) const {
    workspace ws;
    backward_impl(ids, g, grads.adapter(), ws, options);
  }

  // ---- merge ----------------------------------------------------------------------
  /// E += s (B A)^T = s A^T B^T. Returns false when already merged. Remembers s
  /// so unmerge() subtracts what was added even if the multiplier changes.
  bool merge() {
    require_writable();
    if (merged_) return false;
    check_consistent("AdaptedEmbedding::merge");
    merged_scale_ = delta_.scale();
    add_delta_into(table_, merged_scale_);
    merged_ = true;
    return true;
  }
  /// E -= s (B A)^T with the s used by merge(). Returns false when not merged.
  bool unmerge() {
    require_writable();
    if (!merged_) return false;
    check_consistent("AdaptedEmbedding::unmerge");
    add_delta_into(table_, -merged_scale_);
    merged_ = false;
    return true;
  }
  /// The effective table E + s (B A)^T [num_embeddings, dim], dense, for any
  /// base (a 16-bit / NF4 table decoded); E alone when merged (it holds the delta).
  RowMatrix<scalar> merged_table() const {
    check_consistent("AdaptedEmbedding::merged_table");
    RowMatrix<scalar> out(num_embeddings(), embedding_dim());
    if constexpr (QuantizedMatrix<Base>) {
      quantized_traits_t<Base>::assign(table_, 0, num_embeddings(), scalar(1), scalar(0), out);
    } else {
      out = table_;
    }
    if (!merged_) add_delta_into(out, delta_.scale());
    return out;
  }

  /// Throws lora::ShapeError when the delta is not [out, in] = [dim,
  /// num_embeddings] (at construction, or after a factor was resized through
  /// delta().A() / B()). Every entry point calls it first.
  void check_consistent(const char* where) const {
    delta_.check_consistent(where);
    if (delta_.out_features() != embedding_dim() || delta_.in_features() != num_embeddings())
      detail::raise<ShapeError>(where, ": the table is [num_embeddings, dim] = [", num_embeddings(), ", ",
                                 embedding_dim(), "] but the delta is [out, in] = [", delta_.out_features(), ", ",
                                 delta_.in_features(), "]; an embedding delta must be [dim, num_embeddings] = [",
                                 embedding_dim(), ", ", num_embeddings(),
                                 "] (A = lora_embedding_A [r, num_embeddings], B = lora_embedding_B [dim, r])");
  }

 private:
  template <class Id>
  void check_ids(const char* where, std::span<const Id> ids) const {
    const index_t n_emb = num_embeddings();
    for (std::size_t i = 0; i < ids.size(); ++i)
      if (ids[i] < 0 || static_cast<index_t>(ids[i]) >= n_emb)
        detail::raise<ValueError>(where, ": id ", static_cast<long long>(ids[i]), " at position ", i,
                                   " is outside [0, num_embeddings = ", n_emb, ")");
  }

  template <class Id, class Y>
  void forward_impl(std::span<const Id> ids, Y& y, workspace& ws) const {
    static_assert(extents_agree(matrix_traits_t<Y>::cols, dim_at_compile_time),
                  "lora::AdaptedEmbedding::forward: Y has a static column count different from the table's "
                  "static dim; Y must be [n, dim]");
    static_assert(std::is_same_v<scalar_of_t<Y>, scalar>,
                  "lora::AdaptedEmbedding::forward: Y has a different scalar type than the layer");
    constexpr const char* where = "AdaptedEmbedding::forward";
    check_consistent(where);
    const index_t n = static_cast<index_t>(ids.size());
    if (y.rows() != n || y.cols() != embedding_dim())
      detail::raise<ShapeError>(where, ": Y is [", y.rows(), ", ", y.cols(), "], expected [n, dim] = [", n, ", ",
                                 embedding_dim(), "]");
    if constexpr (!QuantizedMatrix<Base>) {
      if (backend::overlaps(table_, y))
        detail::raise<ShapeError>(where, ": Y shares memory with the table; forward cannot run in place");
    }
    check_ids(where, ids);
    if (n == 0) return;
    for (index_t i = 0; i < n; ++i) copy_row(static_cast<index_t>(ids[static_cast<std::size_t>(i)]), y, i);
    if (merged_) return;  // the table already holds s (B A)^T
    auto h = gather_a(ids, ws, 0);                     // (n, r) = A[:, ids]^T
    backend::gemm_nt(delta_.scale(), h, delta_.B(), scalar(1), y);  // (n, dim) += s H B^T
  }

  template <class Id>
  RowMatrix<scalar> forward_alloc(std::span<const Id> ids) const {
    RowMatrix<scalar> y(static_cast<index_t>(ids.size()), embedding_dim());
    workspace ws;
    forward_impl(ids, y, ws);
    return y;
  }

  template <class Id, class G>
  void backward_impl(std::span<const Id> ids, const G& g, gradients& grads, workspace& ws,
                     train::BackwardOptions options) const {
    static_assert(std::is_same_v<scalar_of_t<G>, scalar>,
                  "lora::AdaptedEmbedding::backward: G has a different scalar type than the layer");
    constexpr const char* where = "AdaptedEmbedding::backward";
    check_consistent(where);
    const index_t n = static_cast<index_t>(ids.size()), r = rank();
    if (g.rows() != n || g.cols() != embedding_dim())
      detail::raise<ShapeError>(where, ": G is [", g.rows(), ", ", g.cols(), "], expected [n, dim] = [", n, ", ",
                                 embedding_dim(), "]");
    if (grads.dA().rows() != r || grads.dA().cols() != num_embeddings() || grads.dB().rows() != embedding_dim() ||
        grads.dB().cols() != r)
      detail::raise<ShapeError>(where, ": gradients are dA [", grads.dA().rows(), ", ", grads.dA().cols(), "], dB [",
                                 grads.dB().rows(), ", ", grads.dB().cols(), "], expected dA [r, num_embeddings] = [",
                                 r, ", ", num_embeddings(), "], dB [dim, r] = [", embedding_dim(), ", ", r, "]");
    check_ids(where, ids);
    const scalar beta = options.accumulate ? scalar(1) : scalar(0);
    if (!options.accumulate) grads.zero();
    if (n == 0) return;
    const scalar s = delta_.scale();
    auto h = gather_a(ids, ws, 0);                          // (n, r) = A[:, ids]^T
    auto gb = ws.template matrix<rank_at_compile_time>(n, r, 1);  // (n, r) = G B
    backend::gemm_nn(scalar(1), g, delta_.B(), scalar(0), gb);
    backend::gemm_tn(s, g, h, beta, grads.dB());  // (dim, r) = s G^T H
    // dA is [r, num_embeddings] but only the batch's columns get a term: a
    // scatter-add, O(n r), instead of s (G B)^T onehot(ids).
    auto& da = grads.dA();
    for (index_t i = 0; i < n; ++i)
      da.col(static_cast<index_t>(ids[static_cast<std::size_t>(i)])) += s * gb.row(i).transpose();
  }

  /// H [n, r] with H[i] = A[:, ids[i]]^T, in workspace slot `slot`.
  template <class Id>
  auto gather_a(std::span<const Id> ids, workspace& ws, int slot) const {
    const index_t n = static_cast<index_t>(ids.size());
    auto h = ws.template matrix<rank_at_compile_time>(n, rank(), slot);
    const auto& a = delta_.A();
    for (index_t i = 0; i < n; ++i) h.row(i) = a.col(static_cast<index_t>(ids[static_cast<std::size_t>(i)])).transpose();
    return h;
  }

  /// Y[i] = E[t], widening a 16-bit row or decoding one NF4 row.
  template <class Y>
  void copy_row(index_t t, Y& y, index_t i) const {
    if constexpr (QuantizedMatrix<Base> && !Matrix<Base>) {
      auto row = y.middleRows(i, 1);
      quantized_traits_t<Base>::assign(table_, t, 1, scalar(1), scalar(0), row);
    } else {
      y.row(i) = table_.row(t).template cast<scalar>();
    }
  }

  /// M [num_embeddings, dim] += s A^T B^T (= s (B A)^T): one rank-r update
  /// pass. B^T [r, dim] is copied (small) so the product kernels read it row-major.
  template <class M>
  void add_delta_into(M& m, scalar s) const {
    const RowMatrix<scalar> bt = delta_.B().transpose();
    backend::gemm_tn(s, delta_.A(), bt, scalar(1), m);
  }

  static void require_writable() {
    static_assert(base_is_writable || !base_is_quantized,
                  "lora::AdaptedEmbedding: merge()/unmerge() cannot add into a compressed (NF4) or 16-bit "
                  "table in place; use layer.merged_table() for a dense merged table");
    static_assert(base_is_writable || base_is_quantized,
                  "lora::AdaptedEmbedding: merge()/unmerge() write the table, but it is read-only (e.g. "
                  "Eigen::Map<const RowMatrix<T>>); wrap the buffer in a writable Eigen::Map<RowMatrix<T>> "
                  "or let the layer own a copy");
  }

  Base table_;
  Delta delta_;
  bias_type no_bias_;
  bool merged_ = false;
  scalar merged_scale_ = scalar(0);
};

template <class Base, class Delta>
AdaptedEmbedding(Base, Delta) -> AdaptedEmbedding<Base, Delta>;

}  // namespace lora
