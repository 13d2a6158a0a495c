// dist/tensor_parallel.hpp: tensor-parallel LoRA layers, Megatron-LM's
// sharding of the frozen base with PEFT's (and S-LoRA's) placement of A and B.
// p ranks, rank q holds shard q of the split rule dist::split (the first
// n % p ranks take one more row or column).
//
// Column-parallel (Megatron's ColumnParallelLinear; W_q, W_k, W_v, up/gate):
//   W [out, in] and B [out, r] split by output rows, A [r, in] replicated, the
//   bias split with W. Rank q: Y_q [n, out_q] = X W_q^T + s (X A^T) B_q^T + b_q,
//   the layer's own forward, no communication. Backward from G_q [n, out_q]:
//   dB_q = s G_q^T H local; dA = s sum_q (G_q B_q)^T X and
//   dX = sum_q (G_q W_q + s (G_q B_q) A): one all-reduce of [r, in] (+ [n, in]
//   when dX is asked for), in one call. The full Y by all_gather when asked.
// Row-parallel (RowParallelLinear; W_o, down): W [out, in] and A [r, in] split
//   by input columns, B [out, r] replicated, the bias whole (added once, after
//   the reduction). Rank q sees X_q [n, in_q] (the previous column-parallel
//   layer's output, or a slice of X). Forward: the partial X_q W_q^T [n, out]
//   and the intermediate X_q A_q^T [n, r] are summed over ranks in ONE
//   all-reduce of n (out + r) values (S-LoRA's fused exchange), then
//   Y = sum + s H B^T + b. Backward from the replicated G [n, out]:
//   dB = s G^T H (identical on every rank), dA_q = s (G B)^T X_q and
//   dX_q = G W_q + s (G B) A_q local: no communication.
// Merge and unmerge are per shard: W_q += s B_q A (column), W_q += s B A_q (row).
//
// Both wrap an ordinary AdaptedLinear (the shard) and call its expressions and
// the backend's products: the kernels are the single-process ones. Host
// buffers only (the communicator moves std::span of host memory).
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <type_traits>
#include <utility>
#include <vector>

#include "../lora.hpp"
#include "communicator.hpp"

namespace lora::dist {

namespace detail {
template <class Layer>
void check_host_layer() {
  static_assert(std::is_same_v<typename Layer::backend, EigenBackend>,
                "lora::dist tensor-parallel layers move host buffers; use an Eigen-backend AdaptedLinear "
                "(device buffers need a CUDA-aware transport: docs/distributed.md, 'NCCL')");
}

/// Sums the gradients of the replicated adapter tensors (role `role`) and,
/// when `extra` is not null, one more [rows, cols] block (dX), in one all-reduce.
template <class Comm, class Layer, class Grads, class Extra>
void reduce_replicated(Comm& comm, Layer& layer, Grads& grads, ParamRole role, Extra* extra,
                       std::vector<typename Layer::scalar>& buf) {
  using T = typename Layer::scalar;
  std::size_t total = 0;
  layer.delta().for_each_parameter(grads.adapter(), [&](const char*, ParamRole r, auto&, auto& g) {
    if (r == role) total += static_cast<std::size_t>(g.size());
  });
  if constexpr (!std::is_same_v<Extra, std::nullptr_t>) total += static_cast<std::size_t>(extra->size());
  buf.resize(total);
  std::size_t at = 0;
  const auto pack = [&](auto& m) {
    Eigen::Map<RowMatrix<T>>(buf.data() + at, m.rows(), m.cols()) = m;
    at += static_cast<std::size_t>(m.size());
  };
  const auto unpack = [&](auto& m) {
    m = Eigen::Map<const RowMatrix<T>>(buf.data() + at, m.rows(), m.cols());
    at += static_cast<std::size_t>(m.size());
  };
  layer.delta().for_each_parameter(grads.adapter(), [&](const char*, ParamRole r, auto&, auto& g) {
    if (r == role) pack(g);
  });
  if constexpr (!std::is_same_v<Extra, std::nullptr_t>) pack(*extra);
  comm.all_reduce_sum(std::span<T>(buf));
  at = 0;
  layer.delta().for_each_parameter(grads.adapter(), [&](const char*, ParamRole r, auto&, auto& g) {
    if (r == role) unpack(g);
  });
  if constexpr (!std::is_same_v<Extra, std::nullptr_t>) unpack(*extra);
}
}  // namespace detail

// ---- building shards from a whole layer -------------------------------------------

/// The column-parallel shard `s` of a whole (unmerged) LoRA layer, as an owned
/// layer: W, B and the bias rows [s.offset, s.offset + s.count), A whole.
template <class Base, class T, int R>
AdaptedLinear<RowMatrix<T>, LowRankDelta<T, R>> column_shard(const AdaptedLinear<Base, LowRankDelta<T, R>>& full,
                                                             Shard s) {
  constexpr const char* where = "dist::column_shard";
  if (full.merged()) lora::detail::raise<ValueError>(where, ": the layer is merged; shard it unmerged");
  if (s.offset < 0 || s.count < 1 || s.offset + s.count > full.out_features())
    lora::detail::raise<ShapeError>(where, ": rows [", s.offset, ", ", s.offset + s.count,
                                    ") are not a non-empty part of out_features = ", full.out_features());
  using D = LowRankDelta<T, R>;
  RowMatrix<T> w = full.base_weight().middleRows(s.offset, s.count);
  D delta(typename D::b_matrix(full.delta().B().middleRows(s.offset, s.count)), typename D::a_matrix(full.delta().A()),
          full.delta().options());
  if (!full.has_bias()) return {std::move(w), std::move(delta)};
  return {std::move(w), typename EigenBackend::template vector<T>(full.bias().segment(s.offset, s.count)),
          std::move(delta)};
}

/// The row-parallel shard `s` of a whole (unmerged) LoRA layer, as an owned
/// layer: W and A columns [s.offset, s.offset + s.count), B whole, no bias
/// (give the bias to RowParallelLinear, which adds it once).
template <class Base, class T, int R>
AdaptedLinear<RowMatrix<T>, LowRankDelta<T, R>> row_shard(const AdaptedLinear<Base, LowRankDelta<T, R>>& full,
                                                          Shard s) {
  constexpr const char* where = "dist::row_shard";
  if (full.merged()) lora::detail::raise<ValueError>(where, ": the layer is merged; shard it unmerged");
  if (s.offset < 0 || s.count < 1 || s.offset + s.count > full.in_features())
    lora::detail::raise<ShapeError>(where, ": columns [", s.offset, ", ", s.offset + s.count,
                                    ") are not a non-empty part of in_features = ", full.in_features());
  using D = LowRankDelta<T, R>;
  RowMatrix<T> w = full.base_weight().middleCols(s.offset, s.count);
  D delta(typename D::b_matrix(full.delta().B()), typename D::a_matrix(full.delta().A().middleCols(s.offset, s.count)),
          full.delta().options());
  return {std::move(w), std::move(delta)};
}

// ---- column-parallel ------------------------------------------------------------------

/// A column-parallel LoRA layer: this rank's shard (an AdaptedLinear over
/// W_q [out_q, in], B_q [out_q, r], the whole A) and the group's communicator.
template <class Layer, Communicator Comm>
class ColumnParallelLinear {
 public:
  using layer_type = Layer;
  using scalar = typename Layer::scalar;

  /// `out_features`: the whole layer's; the shard must have split(out_features,
  /// size, rank).count rows. The communicator is held by address.
  ColumnParallelLinear(Comm& comm, Layer shard, index_t out_features)
      : comm_(&comm), layer_(std::move(shard)), out_(out_features) {
    detail::check_host_layer<Layer>();
    const Shard s = shard_of();
    if (layer_.out_features() != s.count)
      lora::detail::raise<ShapeError>("dist::ColumnParallelLinear: rank ", comm.rank(), " of ", comm.size(),
                                      " should hold rows [", s.offset, ", ", s.offset + s.count,
                                      ") of out = ", out_features, " (", s.count, " rows) but its shard has ",
                                      layer_.out_features());
  }

  Layer& local() { return layer_; }
  const Layer& local() const { return layer_; }
  /// This rank's rows of W, B, Y.
  Shard shard_of() const { return split(out_, comm_->size(), comm_->rank()); }
  index_t in_features() const { return layer_.in_features(); }
  index_t out_features() const { return out_; }
  Comm& communicator() const { return *comm_; }

  /// Y_q [n, out_q] = X W_q^T + s (X A^T) B_q^T + b_q: no communication.
  template <Matrix X, Matrix Y>
  void forward(const X& x, Y&& y_local) const {
    layer_.forward(x, std::forward<Y>(y_local));
  }

  /// Y [n, out] from every rank's Y_q [n, out_q] (one all_gather_v of n out values).
  template <class YL, class Y>
  void gather_output(const YL& y_local, Y&& y) {
    const index_t n = y_local.rows(), p = comm_->size();
    if (y_local.cols() != layer_.out_features() || y.rows() != n || y.cols() != out_)
      lora::detail::raise<ShapeError>("dist::ColumnParallelLinear::gather_output: Y_local is [", y_local.rows(), ", ",
                                      y_local.cols(), "] and Y is [", y.rows(), ", ", y.cols(), "], expected [n, ",
                                      layer_.out_features(), "] and [n, ", out_, "]");
    std::vector<index_t> counts(static_cast<std::size_t>(p));
    for (int q = 0; q < p; ++q) counts[static_cast<std::size_t>(q)] = n * split(out_, static_cast<int>(p), q).count;
    send_.resize(static_cast<std::size_t>(y_local.size()));
    Eigen::Map<RowMatrix<scalar>>(send_.data(), n, y_local.cols()) = y_local;
    recv_.resize(static_cast<std::size_t>(n * out_));
    comm_->all_gather_v(std::span<const scalar>(send_), std::span<scalar>(recv_), std::span<const index_t>(counts));
    // The gathered blocks are rank-major [n, out_q] each; Y's columns interleave them.
    std::size_t at = 0;
    for (int q = 0; q < p; ++q) {
      const Shard s = split(out_, static_cast<int>(p), q);
      y.middleCols(s.offset, s.count) = Eigen::Map<const RowMatrix<scalar>>(recv_.data() + at, n, s.count);
      at += static_cast<std::size_t>(n * s.count);
    }
  }

  /// The training forward of the shard (train::forward): Y_q, and the tape for
  /// backward. Dropout: pass the same Dropout on every rank of the group (X
  /// and A are replicated, so the mask must be too).
  template <class X, class Y>
  void train_forward(const X& x, Y&& y_local, train::Tape<Layer>& tape, const train::Dropout& drop = train::Dropout{},
                     std::uint64_t step = 0) const {
    train::forward(layer_, x, std::forward<Y>(y_local), tape, drop, step);
  }

  /// dB_q, db_q (local) and dA (summed over ranks) from G_q = dL/dY_q [n, out_q].
  template <class X, class G>
  void backward(const X& x, const G& g_local, train::Tape<Layer>& tape, train::Gradients<Layer>& grads) {
    train::backward(layer_, x, g_local, tape, grads);
    detail::reduce_replicated(*comm_, layer_, grads, ParamRole::down, static_cast<std::nullptr_t*>(nullptr), buf_);
  }
  /// The same, and dX [n, in] = sum_q dX_q, reduced in the same call as dA.
  template <class X, class G, class DX>
  void backward(const X& x, const G& g_local, train::Tape<Layer>& tape, train::Gradients<Layer>& grads, DX&& dx) {
    train::backward(layer_, x, g_local, tape, grads, dx);
    detail::reduce_replicated(*comm_, layer_, grads, ParamRole::down, &dx, buf_);
  }

  /// W_q += s B_q A (per shard, no communication); as AdaptedLinear::merge.
  bool merge() { return layer_.merge(); }
  bool unmerge() { return layer_.unmerge(); }

 private:
  Comm* comm_;
  Layer layer_;
  index_t out_;
  std::vector<scalar> send_, recv_, buf_;
};

// ---- row-parallel -------------------------------------------------------------------------

/// A row-parallel LoRA layer: this rank's shard (an AdaptedLinear over
/// W_q [out, in_q], A_q [r, in_q], the whole B, no bias), the whole bias and
/// the group's communicator.
template <class Layer, Communicator Comm>
class RowParallelLinear {
  static_assert(LowRankFactors<typename Layer::delta_type>,
                "lora::dist::RowParallelLinear: the adapter must have factors A and B (a LowRankDelta): the "
                "row-parallel forward sums the shrink X_q A_q^T over ranks before the expand by B");

 public:
  using layer_type = Layer;
  using scalar = typename Layer::scalar;
  using bias_type = typename Layer::bias_type;
  using workspace = typename Layer::workspace;

  /// What train_forward leaves for backward: the reduced H = X A^T [n, r].
  class Tape {
   public:
    index_t tokens() const { return n_; }

   private:
    friend class RowParallelLinear;
    std::vector<scalar> buf_;  // [n, out] partial sums, then [n, r] H: one all-reduce
    workspace saved_, eval_;
    const void* layer_ = nullptr;
    index_t n_ = -1;
  };

  /// `in_features`: the whole layer's; the shard must have split(in_features,
  /// size, rank).count columns and no bias (pass the whole bias here: it is
  /// added once, after the reduction, as Megatron does).
  RowParallelLinear(Comm& comm, Layer shard, index_t in_features, bias_type bias = {})
      : comm_(&comm), layer_(std::move(shard)), in_(in_features), bias_(std::move(bias)) {
    detail::check_host_layer<Layer>();
    constexpr const char* where = "dist::RowParallelLinear";
    if (layer_.has_bias())
      lora::detail::raise<ValueError>(where,
                                      ": the shard has a bias; pass it as the bias argument instead (every "
                                      "rank would add it, p times in the sum)");
    if (bias_.size() != 0 && bias_.size() != layer_.out_features())
      lora::detail::raise<ShapeError>(where, ": the bias has ", bias_.size(),
                                      " entries, expected out = ", layer_.out_features());
    const Shard s = shard_of();
    if (layer_.in_features() != s.count)
      lora::detail::raise<ShapeError>(where, ": rank ", comm.rank(), " of ", comm.size(), " should hold columns [",
                                      s.offset, ", ", s.offset + s.count, ") of in = ", in_features, " (", s.count,
                                      " columns) but its shard has ", layer_.in_features());
  }

  Layer& local() { return layer_; }
  const Layer& local() const { return layer_; }
  const bias_type& bias() const { return bias_; }
  bool has_bias() const { return bias_.size() != 0; }
  /// This rank's columns of W, A, X.
  Shard shard_of() const { return split(in_, comm_->size(), comm_->rank()); }
  index_t in_features() const { return in_; }
  index_t out_features() const { return layer_.out_features(); }
  Comm& communicator() const { return *comm_; }

  /// This rank's columns of a whole X [n, in]: a view, no copy.
  template <class X>
  auto local_input(const X& x) const {
    const Shard s = shard_of();
    return x.middleCols(s.offset, s.count);
  }

  /// Y [n, out] = sum_q X_q W_q^T + s (sum_q X_q A_q^T) B^T + b, from this
  /// rank's X_q [n, in_q]: one all-reduce of n (out + r) values (n out merged).
  template <Matrix X, Matrix Y>
  void forward(const X& x_local, Y&& y) {
    Tape tape;
    forward_impl("dist::RowParallelLinear::forward", x_local, y, tape);
  }

  /// The forward, keeping the reduced H in `tape` for backward. Unmerged only;
  /// no adapter dropout (a mask over X_q would have to follow the whole X's
  /// element numbering: not implemented).
  template <Matrix X, Matrix Y>
  void train_forward(const X& x_local, Y&& y, Tape& tape) {
    constexpr const char* where = "dist::RowParallelLinear::train_forward";
    if (layer_.merged()) lora::detail::raise<ValueError>(where, ": the layer is merged; unmerge() it to train");
    forward_impl(where, x_local, y, tape);
    tape.layer_ = this;
  }

  /// dB = s G^T H (the same on every rank) and dA_q = s (G B)^T X_q from the
  /// replicated G = dL/dY [n, out]: no communication.
  template <class X, class G>
  void backward(const X& x_local, const G& g, Tape& tape, train::Gradients<Layer>& grads) {
    backward_impl(x_local, g, tape, grads, static_cast<std::nullptr_t*>(nullptr));
  }
  /// The same, and dX_q [n, in_q] = G W_q + s (G B) A_q (this rank's columns of dX).
  template <class X, class G, class DX>
  void backward(const X& x_local, const G& g, Tape& tape, train::Gradients<Layer>& grads, DX&& dx_local) {
    backward_impl(x_local, g, tape, grads, &dx_local);
  }

  /// W_q += s B A_q (per shard, no communication); as AdaptedLinear::merge.
  bool merge() { return layer_.merge(); }
  bool unmerge() { return layer_.unmerge(); }

 private:
  using B = typename Layer::backend;

  template <class X, class Y>
  void forward_impl(const char* where, const X& x, Y& y, Tape& tape) {
    layer_.check_forward(where, x, y);
    const index_t n = x.rows(), out = out_features(), r = layer_.rank();
    const bool merged = layer_.merged();
    tape.buf_.resize(static_cast<std::size_t>(n * out + (merged ? 0 : n * r)));
    Eigen::Map<RowMatrix<scalar>> part(tape.buf_.data(), n, out);
    Eigen::Map<RowMatrix<scalar>> h(tape.buf_.data() + n * out, n, merged ? 0 : r);
    expr::apply(layer_.base_expression(), x, part, scalar(1), scalar(0), tape.eval_);  // (n, out) = X_q W_q^T
    if (!merged) B::gemm_nt(scalar(1), x, layer_.delta().A(), scalar(0), h);           // (n, r) = X_q A_q^T
    comm_->all_reduce_sum(std::span<scalar>(tape.buf_));                               // both, one call
    y = part;
    if (!merged) B::gemm_nt(layer_.delta().scale(), h, layer_.delta().B(), scalar(1), y);  // (n, out) += s H B^T
    if (has_bias()) B::add_to_rows(scalar(1), bias_, y);
    tape.n_ = n;
  }

  template <class X, class G, class DX>
  void backward_impl(const X& x, const G& g, Tape& tape, train::Gradients<Layer>& grads, DX* dx) {
    constexpr const char* where = "dist::RowParallelLinear::backward";
    if (tape.layer_ != this || tape.n_ != x.rows())
      lora::detail::raise<ValueError>(where, ": the tape does not hold this layer's train_forward of ", x.rows(),
                                      " tokens (it holds ", tape.n_, "); call train_forward first");
    if (layer_.merged()) lora::detail::raise<ValueError>(where, ": the layer was merged after train_forward");
    const index_t n = x.rows(), out = out_features(), r = layer_.rank();
    if (g.rows() != n || g.cols() != out)
      lora::detail::raise<ShapeError>(where, ": G is [", g.rows(), ", ", g.cols(), "], expected [n, out] = [", n, ", ",
                                      out, "]");
    if (grads.has_bias())
      lora::detail::raise<ValueError>(where, ": the row-parallel bias is frozen (db would be sum_t G on every rank)");
    // The delta's own backward reads H from slot 0 of its workspace.
    tape.saved_.template matrix<Layer::rank_at_compile_time>(n, r, 0) =
        Eigen::Map<const RowMatrix<scalar>>(tape.buf_.data() + n * out, n, r);
    layer_.delta().backward(g, x, tape.saved_, grads.adapter(), scalar(0));  // dB = s G^T H, dA_q = s (G B)^T X_q
    if constexpr (!std::is_same_v<DX, std::nullptr_t>)
      expr::apply_transposed(layer_.unmerged_expression(), g, *dx, scalar(1), scalar(0),
                             tape.eval_);  // G (W_q + s B A_q)
  }

  Comm* comm_;
  Layer layer_;
  index_t in_;
  bias_type bias_;
};

}  // namespace lora::dist
