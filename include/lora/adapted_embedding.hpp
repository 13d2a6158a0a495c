// adapted_embedding.hpp: AdaptedEmbedding<Base, Delta>, a frozen embedding
// table [num_embeddings, dim] adapted by a LowRankDelta in PEFT's embedding
// layout (lora_embedding_A [r, num_embeddings], lora_embedding_B [dim, r]):
// the row of token t is table[t] + s * B A[:, t]. Forward gathers rows of the
// table and columns of A; it never forms B A and never multiplies by a one-hot
// matrix. One code path for every backend: the row gather, the column gather
// of A and the scatter into dA are detail::gather_rows / scatter_add_rows
// (detail/gather.hpp), the rest the backend's products.
#pragma once

#include <cstdint>
#include <span>
#include <type_traits>
#include <utility>

#include "lora.hpp"
#include "detail/gather.hpp"

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
/// decoded on its own); on the Thrust backend a DeviceMatrix<T> or a
/// DeviceMatrixView (dense tables only). merge() / unmerge() need a writable
/// dense table. lora::to_device(layer) / to_host(layer) move an unmerged layer.
///
/// Ids are host memory (std::span) on every backend: they are validated there
/// before anything is written (an id outside [0, num_embeddings) throws
/// lora::ValueError naming the id and its position, and Y / the gradients are
/// left untouched), then grouped and made visible to the backend's kernels in
/// the workspace (detail::IndexList).
///
/// forward() and backward() are const and safe to call from several threads on
/// one layer: they only read E, A, B and allocate [n, r] scratch and the id
/// list (nothing once a reused workspace has grown, on the Eigen backend).
template <BaseWeight Base, class Delta>
class AdaptedEmbedding {
  static_assert(LowRankFactors<Delta>,
                "lora::AdaptedEmbedding<Base, Delta>: Delta must be a low-rank pair with A() and B() "
                "(e.g. lora::LowRankDelta<T, Rank>{dim, num_embeddings, options})");
  static_assert(std::is_same_v<typename Delta::backend, EigenBackend> || !QuantizedMatrix<Base>,
                "lora::AdaptedEmbedding: a compressed (NF4) or 16-bit table is supported on the Eigen (CPU) "
                "backend only; on the device use a dense DeviceMatrix<T> table (e.g. "
                "lora::to_device(RowMatrix<T>(nf4_table.dequantize())))");

 public:
  using base_type = Base;
  using delta_type = Delta;
  using scalar = typename Delta::scalar;
  using backend = typename Delta::backend;
  using gradients = typename Delta::gradients;
  /// An embedding has no bias; the type exists so train::Gradients and the
  /// optimizers take this layer as they take an AdaptedLinear.
  using bias_type = typename backend::template vector<scalar>;
  using matrix_type = typename backend::template matrix<scalar>;
  /// The backend's product scratch ([n, r] in two slots) and the batch's ids
  /// as its kernels read them. Reuse one across calls to stop allocating.
  class workspace : public backend::template workspace<scalar> {
   public:
    detail::IndexList<backend> ids;
  };

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
  /// Returns Y [n, dim] (the backend's matrix).
  matrix_type forward(std::span<const std::int64_t> ids) const { return forward_alloc(ids); }
  matrix_type forward(std::span<const std::int32_t> ids) const { return forward_alloc(ids); }

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
  /// The effective table E + s (B A)^T [num_embeddings, dim], dense (the
  /// backend's matrix), for any base (a 16-bit / NF4 table decoded); E alone
  /// when merged (it holds the delta).
  matrix_type merged_table() const {
    check_consistent("AdaptedEmbedding::merged_table");
    matrix_type out;
    backend::resize(out, num_embeddings(), embedding_dim());
    if constexpr (QuantizedMatrix<Base>) {
      quantized_traits_t<Base>::assign(table_, 0, num_embeddings(), scalar(1), scalar(0), out);
    } else {
      BackendOps<backend>::copy(table_, out);
    }
    if (!merged_) add_delta_into(out, delta_.scale());
    return out;
  }

  /// The same layer with each tensor (table, delta) replaced by move(tensor):
  /// what lora::to_device(layer) / to_host(layer) call (the moved layer owns
  /// its table). ValueError when merged (the table holds the delta then).
  template <class Move>
  auto transferred(Move move) const {
    constexpr const char* where = "AdaptedEmbedding::transferred";
    detail::check_movable(where, merged_);
    check_consistent(where);
    auto table = move(table_);
    auto delta = move(delta_);
    return AdaptedEmbedding<decltype(table), decltype(delta)>(std::move(table), std::move(delta));
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
    ws.ids.assign(ids);
    if constexpr (QuantizedMatrix<Base>) {  // Eigen only (class static_assert): decode row by row
      for (index_t i = 0; i < n; ++i) copy_row(ws.ids.host()[static_cast<std::size_t>(i)], y, i);
    } else {
      detail::gather_rows(detail::strided(table_), ws.ids, detail::strided(y));  // (n, dim) = E[ids]
    }
    if (merged_) return;  // the table already holds s (B A)^T
    auto h = gather_a(ws, 0);                                         // (n, r) = A[:, ids]^T
    backend::gemm_nt(delta_.scale(), h, delta_.B(), scalar(1), y);  // (n, dim) += s H B^T
  }

  template <class Id>
  matrix_type forward_alloc(std::span<const Id> ids) const {
    matrix_type y;
    backend::resize(y, static_cast<index_t>(ids.size()), embedding_dim());
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
    ws.ids.assign(ids, /*grouped=*/true);  // the dA scatter sums repeated ids
    auto h = gather_a(ws, 0);                                     // (n, r) = A[:, ids]^T
    auto gb = ws.template matrix<rank_at_compile_time>(n, r, 1);  // (n, r) = G B
    backend::gemm_nn(scalar(1), g, delta_.B(), scalar(0), gb);
    backend::gemm_tn(s, g, h, beta, grads.dB());  // (dim, r) = s G^T H
    // dA is [r, num_embeddings] but only the batch's columns get a term: a
    // scatter-add into dA^T's rows, O(n r), instead of s (G B)^T onehot(ids).
    detail::scatter_add_rows(s, detail::strided(gb), ws.ids, detail::strided_transposed(grads.dA()));
  }

  /// H [n, r] with H[i] = A[:, ids[i]]^T (rows of A^T), in workspace slot `slot`.
  auto gather_a(workspace& ws, int slot) const {
    auto h = ws.template matrix<rank_at_compile_time>(ws.ids.size(), rank(), slot);
    detail::gather_rows(detail::strided_transposed(delta_.A()), ws.ids, detail::strided(h));
    return h;
  }

  /// Y[i] = E[t], widening a 16-bit row or decoding one NF4 row (Eigen backend).
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
    typename backend::template matrix<scalar, rank_at_compile_time, dynamic> bt;
    backend::resize(bt, rank(), embedding_dim());
    detail::copy_strided<backend>(detail::strided_transposed(delta_.B()), detail::strided(bt));
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
