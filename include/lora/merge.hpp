// merge.hpp: merged copies of a layer's weight where merge() cannot add into
// the base in place: merged_weight (dense, exact), merge_to_nf4 (requantised
// NF4, with its error) and merge_rounded (one rounding to a 16-bit base's
// storage, with its error).
#pragma once

#ifndef LORA_UMBRELLA_INCLUDED
#error "Include <lora/lora.hpp> instead of lora/merge.hpp."
#endif

#include <cmath>
#include <optional>
#include <vector>

#include "adapted_linear.hpp"
#include "backend/eigen/half.hpp"
#include "quant/nf4_matrix.hpp"

namespace lora {

/// The layer's effective weight as a dense matrix: W + s B A, or deq(Wq) + s B A
/// over an NF4 base (the same roundings as merging a dense copy of deq(Wq)).
template <class Base, class Delta>
auto merged_weight(const AdaptedLinear<Base, Delta>& layer) {
  layer.check_consistent("lora::merged_weight");
  return expr::materialize(layer.weight());
}

/// How far a merged weight stored in a lossy format is from the exact merged
/// weight W + s B A: the statistics of |stored - exact| and where the max is.
struct MergeErrorReport {
  double max_abs_error = 0;   ///< max |stored - (W + s B A)|
  double mean_abs_error = 0;  ///< mean of the same
  double rms_error = 0;       ///< root mean square of the same
  index_t worst_row = 0, worst_col = 0;  ///< where the max is
};

/// What merge_to_nf4 returns: the requantised weight and its error against the
/// exact merged weight deq(Wq) + s B A.
struct NF4MergeResult : MergeErrorReport {
  NF4Matrix weight;
};

/// What merge_rounded returns: W + s B A rounded once to the base's 16-bit
/// storage, and its error against the exact (fp32) merged weight.
template <class S>
struct RoundedMergeResult : MergeErrorReport {
  RowMatrix<S> weight;
};

namespace detail {
/// Fills `e` from the exact merged weight and the stored one, read back a row
/// at a time by row(i, out) (out: `exact.cols()` floats).
template <class Exact, class Row>
void measure_merge_error(MergeErrorReport& e, const Exact& exact, Row&& row) {
  const index_t out = exact.rows(), in = exact.cols();
  if (out * in == 0) return;
  std::vector<float> buf(static_cast<std::size_t>(in));
  double sum = 0, sum_sq = 0;
  for (index_t i = 0; i < out; ++i) {
    row(i, buf.data());
    for (index_t j = 0; j < in; ++j) {
      const double d = std::fabs(double(buf[std::size_t(j)]) - double(exact(i, j)));
      sum += d;
      sum_sq += d * d;
      if (d > e.max_abs_error) {
        e.max_abs_error = d;
        e.worst_row = i;
        e.worst_col = j;
      }
    }
  }
  const double count = double(out) * double(in);
  e.mean_abs_error = sum / count;
  e.rms_error = std::sqrt(sum_sq / count);
}
}  // namespace detail

/// Folds the adapter into an NF4 base: dequantise, add s B A, requantise (same
/// block size and double quantisation as the base unless `options` says
/// otherwise), and report the error against the exact merged weight. Needs one
/// dense [out, in] float buffer while it runs. Throws ValueError when W + s B A
/// is not finite (nothing is returned then).
template <class Delta>
NF4MergeResult merge_to_nf4(const AdaptedLinear<NF4Matrix, Delta>& layer, std::optional<NF4Options> options = {}) {
  const NF4Matrix& base = layer.base_weight();
  const NF4Options opt = options ? *options : NF4Options{base.block_size(), base.double_quantized(), base.map8()};
  const NF4Matrix::dense_matrix exact = merged_weight(layer);
  // Named here, not by the quantiser it calls; one vectorised pass, then the
  // position only when there is something to report.
  if (!exact.allFinite()) {
    const index_t bad = EigenBackend::first_non_finite(exact.data(), exact.size());
    detail::raise<NumericError>("lora::merge_to_nf4: W + s*B*A is ", exact.data()[bad], " at row ",
                                 bad / exact.cols(), ", column ", bad % exact.cols(), "; nothing was quantised");
  }
  NF4MergeResult r;
  r.weight = NF4Matrix::quantize(exact, opt);
  detail::measure_merge_error(r, exact, [&](index_t i, float* out) { r.weight.dequantize_rows(i, 1, out); });
  return r;
}

/// Folds the adapter into a 16-bit (bf16 / fp16) base: W + s B A in fp32,
/// rounded once to the storage type, with the rounding error reported (as
/// merge_to_nf4 does for NF4). Throws NumericError when W + s B A is not
/// finite, or not finite once rounded (beyond the 16-bit range); nothing is
/// returned then. A device layer's (Thrust backend) merged weight is copied to
/// the host and the result is a host matrix (lora::to_device uploads it).
template <class Base, class Delta>
  requires is_half_storage_v<typename quantized_traits_t<Base>::storage>
auto merge_rounded(const AdaptedLinear<Base, Delta>& layer) {
  using S = typename quantized_traits_t<Base>::storage;
  using B = typename AdaptedLinear<Base, Delta>::backend;
  const RowMatrix<float> exact = [&] {
    if constexpr (std::is_same_v<B, EigenBackend>)
      return merged_weight(layer);
    else
      return B::to_host(merged_weight(layer));
  }();
  RoundedMergeResult<S> r;
  r.weight = exact.template cast<S>();
  detail::measure_merge_error(r, exact, [&](index_t i, float* out) {
    for (index_t j = 0; j < exact.cols(); ++j) {
      out[j] = static_cast<float>(r.weight(i, j));
      if (!std::isfinite(exact(i, j)) || !std::isfinite(out[j]))
        detail::raise<NumericError>("lora::merge_rounded: W + s*B*A is ", exact(i, j), " at row ", i, ", column ",
                                     j, (std::isfinite(exact(i, j)) ? " (beyond the 16-bit range once rounded)" : ""),
                                     "; nothing was merged");
    }
  });
  return r;
}

}  // namespace lora
