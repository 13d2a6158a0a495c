// quant/qlora.hpp: QLoRA, an AdaptedLinear over a frozen NF4 base.
//
//   lora::NF4Matrix Wq = lora::NF4Matrix::quantize(W, {.double_quant = true});
//   lora::AdaptedLinear layer(std::move(Wq), lora::LowRankDelta<float, 8>(out, in, {.alpha = 16}));
//   layer.forward(X, Y);                       // Y = X (deq(Wq) + s B A)^T, W decoded on the fly
//   lora::train::backward(layer, X, G, tape, grads, &dX);  // dX through deq(Wq); dA, dB in float
//   auto W = lora::merged_weight(layer);       // dense deq(Wq) + s B A
//   auto m = lora::merge_to_nf4(layer);        // requantised, with m.max_abs_error, m.mean_abs_error
//
// quantized_traits<NF4Matrix> plugs the fused NF4 products into the
// expression templates' `dequantized` node; nothing else in the library knows
// about NF4.
#pragma once

#ifndef LORA_UMBRELLA_INCLUDED
#error "Include <lora/lora.hpp> instead of lora/quant/qlora.hpp."
#endif

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <utility>
#include <vector>

#include "../adapted_linear.hpp"
#include "../backend/eigen/backend.hpp"
#include "nf4.hpp"

namespace lora {

template <>
struct quantized_traits<NF4Matrix> {
  static constexpr bool known = true;
  using scalar = float;
  using backend = eigen_backend;
  static constexpr int rows = dynamic;
  static constexpr int cols = dynamic;

  /// Y [n, nr] = beta Y + alpha X W[r0 : r0 + nr]^T.
  template <class X, class Y>
  static void gemm_nt(const NF4Matrix& q, index_t r0, index_t nr, float alpha, const X& x, float beta, Y& y) {
    with_row_major(y, [&](auto&& out) { detail::nf4k::gemm_rows<float>(q, r0, nr, x, out, alpha, beta); });
  }
  /// dX [n, in] = beta dX + alpha G W[r0 : r0 + nr], G [n, nr].
  template <class G, class DX>
  static void gemm_nn(const NF4Matrix& q, index_t r0, index_t nr, float alpha, const G& g, float beta, DX& dx) {
    with_row_major(dx, [&](auto&& out) { detail::nf4k::gemm_transposed_rows<float>(q, r0, nr, g, out, alpha, beta); });
  }
  /// D [nr, in] = beta D + alpha W[r0 : r0 + nr], a tile of rows at a time.
  template <class D>
  static void assign(const NF4Matrix& q, index_t r0, index_t nr, float alpha, float beta, D& dst) {
    const index_t in = q.cols();
    if (nr == 0 || in == 0) return;
    const index_t tile_rows = std::max<index_t>(1, (index_t(1) << 16) / in);
    thread_local std::vector<float> buf;
    float* tile = detail::nf4k::scratch(buf, std::min(tile_rows, nr) * in);
    for (index_t off = 0; off < nr; off += tile_rows) {
      const index_t tr = std::min(tile_rows, nr - off);
      q.dequantize_rows(r0 + off, tr, tile);
      eigen_backend::axpby(alpha, Eigen::Map<const NF4Matrix::dense_matrix>(tile, tr, in), beta,
                           dst.middleRows(off, tr));
    }
  }

 private:
  // The kernels write row-major memory with unit inner stride; any other
  // destination (a column-major Eigen matrix) goes through a row-major copy.
  template <class M, class F>
  static void with_row_major(M& m, F&& f) {
    if constexpr (std::is_constructible_v<detail::nf4k::dense_ref<>, M&>) {
      f(detail::nf4k::dense_ref<>(m));
    } else {
      NF4Matrix::dense_matrix tmp = m;
      f(detail::nf4k::dense_ref<>(tmp));
      m = tmp;
    }
  }
};

/// The layer's effective weight as a dense matrix: W + s B A, or deq(Wq) + s B A
/// over an NF4 base (the same roundings as merging a dense copy of deq(Wq)).
template <class Base, class Delta>
auto merged_weight(const AdaptedLinear<Base, Delta>& layer) {
  return expr::materialize(layer.weight());
}

/// What merge_to_nf4 returns: the requantised weight and how far its decoded
/// values are from the exact merged weight deq(Wq) + s B A.
struct nf4_merge_result {
  NF4Matrix weight;
  double max_abs_error = 0;   ///< max |deq(weight) - (deq(Wq) + s B A)|
  double mean_abs_error = 0;  ///< mean of the same
  double rms_error = 0;       ///< root mean square of the same
  index_t worst_row = 0, worst_col = 0;  ///< where the max is
};

/// Folds the adapter into an NF4 base: dequantise, add s B A, requantise (same
/// block size and double quantisation as the base unless `options` says
/// otherwise), and report the error against the exact merged weight. Needs one
/// dense [out, in] float buffer while it runs. Throws value_error when W + s B A
/// is not finite (nothing is returned then).
template <class Delta>
nf4_merge_result merge_to_nf4(const AdaptedLinear<NF4Matrix, Delta>& layer, std::optional<NF4Options> options = {}) {
  const NF4Matrix& base = layer.base_weight();
  const NF4Options opt = options ? *options : NF4Options{base.block_size(), base.double_quantized(), base.map8()};
  const NF4Matrix::dense_matrix exact = merged_weight(layer);
  nf4_merge_result r{NF4Matrix::quantize(exact, opt)};  // checks finiteness, names the index
  const index_t out = exact.rows(), in = exact.cols();
  if (out * in == 0) return r;
  std::vector<float> row(static_cast<std::size_t>(in));
  double sum = 0, sum_sq = 0;
  for (index_t i = 0; i < out; ++i) {
    r.weight.dequantize_rows(i, 1, row.data());
    for (index_t j = 0; j < in; ++j) {
      const double e = std::fabs(double(row[std::size_t(j)]) - double(exact(i, j)));
      sum += e;
      sum_sq += e * e;
      if (e > r.max_abs_error) {
        r.max_abs_error = e;
        r.worst_row = i;
        r.worst_col = j;
      }
    }
  }
  const double count = double(out) * double(in);
  r.mean_abs_error = sum / count;
  r.rms_error = std::sqrt(sum_sq / count);
  return r;
}

}  // namespace lora
