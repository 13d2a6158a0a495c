// combine.hpp: PEFT's add_weighted_adapter combinations as free functions on
// deltas (CPU, Eigen backend). Each input k is a delta s_k B_k A_k with a
// weight w_k; c_k = w_k s_k (s_k with the delta's multiplier, as PEFT's
// `scaling` after scale_layer). Every result has alpha = r, standard rule, so
// its scale is exactly 1 and the factors carry everything:
//   combine_cat     A = [c_1 A_1; ...; c_K A_K], B = [B_1 ... B_K], r = sum r_k
//                   exact: s B A = sum_k c_k B_k A_k
//   combine_linear  A = sum_k sgn(c_k) sqrt|c_k| A_k, B = sum_k sqrt|c_k| B_k,
//                   r = the common rank; NOT the weighted sum of the deltas
//                   (its B A has the cross terms sqrt|c_j c_k| B_j A_k)
//   combine_svd     B = U_r S_r, A = V_r^T of the truncated SVD of the dense
//                   sum_k c_k B_k A_k (double), with the kept energy reported
// docs/adapters.md, "Combinations", lists where this follows PEFT and where not.
#pragma once

#include "lora.hpp"

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <optional>
#include <ranges>
#include <span>
#include <utility>
#include <vector>

namespace lora {

/// How add_weighted combines adapters (PEFT's combination_type cat / linear / svd).
enum class Combination { cat, linear, svd };

/// One input of a combination: a delta and its weight (may be negative).
template <class T>
struct WeightedDelta {
  const LowRankDelta<T>& delta;
  double weight = 1.0;
};

/// What combine_svd returns: the delta and what the truncation kept (kept
/// energy and residual of the truncated SVD, before any clamp).
template <class T>
struct SVDCombination {
  LowRankDelta<T> delta;
  init::SVDReport report;
};

/// What combine() returns: the delta, and for Combination::svd the report.
template <class T>
struct Combined {
  LowRankDelta<T> delta;
  std::optional<init::SVDReport> report;
};

namespace detail::combine {

/// Checks the inputs (non-empty, finite weights, one shape) and returns
/// c_k = w_k * s_k in double (one rounding less than T(w) * scale()).
template <class T>
std::vector<double> coefficients(const char* where, std::span<const WeightedDelta<T>> in) {
  if (in.empty()) raise<ValueError>(where, ": no adapters to combine");
  std::vector<double> c;
  c.reserve(in.size());
  const index_t out = in[0].delta.out_features(), cols = in[0].delta.in_features();
  for (std::size_t k = 0; k < in.size(); ++k) {
    const LowRankDelta<T>& d = in[k].delta;
    d.check_consistent(where);
    if (d.out_features() != out || d.in_features() != cols)
      raise<ShapeError>(where, ": delta ", k, " is [out, in] = [", d.out_features(), ", ", d.in_features(),
                        "] but delta 0 is [", out, ", ", cols, "]; combined deltas must have one shape");
    if (!std::isfinite(in[k].weight))
      raise<ValueError>(where, ": weight ", k, " = ", in[k].weight, " is not finite");
    const double ck = in[k].weight * scale_for(d.options(), d.rank());
    if (!std::isfinite(ck))
      raise<ValueError>(where, ": weight ", k, " times the delta's scale is ", ck, ", not finite");
    c.push_back(ck);
  }
  return c;
}

/// The result's options: alpha = r under the standard rule, so s = r / r = 1
/// exactly (PEFT sets r = lora_alpha = new_rank).
inline DeltaOptions unit_scale(index_t r) { return {.alpha = static_cast<double>(r), .rule = Scaling::standard}; }

/// torch.quantile(v, q) (linear interpolation between the two nearest ranks).
inline double quantile(std::vector<double> v, double q) {
  std::sort(v.begin(), v.end());
  const double pos = q * static_cast<double>(v.size() - 1);
  const std::size_t lo = static_cast<std::size_t>(std::floor(pos));
  const std::size_t hi = std::min(lo + 1, v.size() - 1);
  return v[lo] + (v[hi] - v[lo]) * (pos - static_cast<double>(lo));
}

/// A contiguous range of WeightedDelta<T> (a std::vector, an array): the
/// overloads below deduce T from it, which a std::span parameter cannot.
template <class R>
concept WeightedRange = std::ranges::contiguous_range<R> && requires {
  typename std::ranges::range_value_t<R>;
  std::declval<std::ranges::range_value_t<R>&>().delta.rank();
};

}  // namespace detail::combine

/// PEFT "cat": factors stacked, each A_k scaled by c_k = w_k s_k; exact (the
/// result's B A is sum_k c_k B_k A_k to rounding), rank = sum of the ranks.
/// RankError when that sum exceeds min(out, in) (LowRankDelta's bound; PEFT
/// allows it): combine_svd at rank min(out, in) is then exact too.
template <class T>
LowRankDelta<T> combine_cat(std::span<const WeightedDelta<T>> in) {
  const char* where = "lora::combine_cat";
  const std::vector<double> c = detail::combine::coefficients(where, in);
  const index_t out = in[0].delta.out_features(), cols = in[0].delta.in_features();
  index_t r = 0;
  for (const auto& wd : in) r = detail::checked_add(where, r, wd.delta.rank());
  const index_t limit = std::min(out, cols);
  if (r > limit)
    detail::raise<RankError>(where, ": the ranks sum to ", r, " > min(out, in) = ", limit,
                             "; a LowRankDelta cannot hold it (combine_svd with rank ", limit, " is exact)");
  RowMatrix<T> a(r, cols), b(out, r);
  index_t off = 0;
  for (std::size_t k = 0; k < in.size(); ++k) {
    const LowRankDelta<T>& d = in[k].delta;
    a.middleRows(off, d.rank()) = (d.A().template cast<double>() * c[k]).template cast<T>();
    b.middleCols(off, d.rank()) = d.B();
    off += d.rank();
  }
  return LowRankDelta<T>(std::move(b), std::move(a), detail::combine::unit_scale(r));
}

/// PEFT "linear": A = sum_k sgn(c_k) sqrt|c_k| A_k, B = sum_k sqrt|c_k| B_k
/// (the sign on A only). Approximate: B A = sum_{j,k} ... has cross terms, so
/// it is not the weighted sum of the deltas unless K = 1. Every rank must be
/// equal (RankError otherwise), as PEFT requires.
template <class T>
LowRankDelta<T> combine_linear(std::span<const WeightedDelta<T>> in) {
  const char* where = "lora::combine_linear";
  const std::vector<double> c = detail::combine::coefficients(where, in);
  const index_t r = in[0].delta.rank();
  for (std::size_t k = 1; k < in.size(); ++k)
    if (in[k].delta.rank() != r)
      detail::raise<RankError>(where, ": delta ", k, " has rank ", in[k].delta.rank(), " but delta 0 has rank ", r,
                               "; linear needs one rank (use cat or svd for mixed ranks)");
  Eigen::MatrixXd a = Eigen::MatrixXd::Zero(r, in[0].delta.in_features());
  Eigen::MatrixXd b = Eigen::MatrixXd::Zero(in[0].delta.out_features(), r);
  for (std::size_t k = 0; k < in.size(); ++k) {
    const double root = std::sqrt(std::fabs(c[k]));
    // sgn(0) = +1, as PEFT's `1 if weight_with_scaling >= 0 else -1`.
    a += (c[k] >= 0 ? root : -root) * in[k].delta.A().template cast<double>();
    b += root * in[k].delta.B().template cast<double>();
  }
  return LowRankDelta<T>(b.cast<T>(), a.cast<T>(), detail::combine::unit_scale(r));
}

/// PEFT "svd": the dense sum D = sum_k c_k B_k A_k (double), its SVD, and
/// B = U_r S_r, A = V_r^T (all of S on B, as PEFT). rank 0 means the largest
/// input rank (PEFT's svd_rank = None). clamp (PEFT's svd_clamp, in [0, 1]):
/// hi = torch.quantile of the entries of B and A together, both clamped to
/// [-hi, hi]. The report describes the truncation before the clamp.
/// Memory: one [out, in] double matrix and its SVD.
template <class T>
SVDCombination<T> combine_svd(std::span<const WeightedDelta<T>> in, index_t rank = 0,
                              std::optional<double> clamp = {}) {
  const char* where = "lora::combine_svd";
  const std::vector<double> c = detail::combine::coefficients(where, in);
  const index_t out = in[0].delta.out_features(), cols = in[0].delta.in_features();
  if (rank == 0)
    for (const auto& wd : in) rank = std::max(rank, wd.delta.rank());
  const index_t limit = std::min(out, cols);
  if (rank <= 0 || rank > limit)
    detail::raise<RankError>(where, ": rank ", rank, " must satisfy 0 < r <= min(out, in) = ", limit);
  if (clamp && !(*clamp >= 0.0 && *clamp <= 1.0))
    detail::raise<ValueError>(where, ": clamp = ", *clamp, " must be a quantile in [0, 1]");

  Eigen::MatrixXd dense = Eigen::MatrixXd::Zero(out, cols);
  for (std::size_t k = 0; k < in.size(); ++k)
    dense.noalias() += c[k] * (in[k].delta.B().template cast<double>() * in[k].delta.A().template cast<double>());
  for (index_t j = 0; j < cols; ++j)  // an SVD of NaN gives NaN factors, not an error
    for (index_t i = 0; i < out; ++i)
      if (!std::isfinite(dense(i, j)))
        detail::raise<ValueError>(where, ": the weighted sum is ", dense(i, j), " at row ", i, ", column ", j,
                                  "; a factor is not finite or the sum overflows");

  const auto [sv, u, v] = detail::svd_kernels<double>::top(dense, rank);
  init::SVDReport rep = init::svd_detail::report(sv, rank);

  Eigen::MatrixXd b = u * sv.head(rank).asDiagonal();  // (out, r)
  Eigen::MatrixXd a = v.transpose();                   // (r, in)
  if (clamp) {
    std::vector<double> all(b.data(), b.data() + b.size());
    all.insert(all.end(), a.data(), a.data() + a.size());
    const double hi = detail::combine::quantile(std::move(all), *clamp), lo = -hi;
    // torch.clamp(x, lo, hi) = min(max(x, lo), hi), also when lo > hi.
    const auto clip = [lo, hi](double x) { return std::min(std::max(x, lo), hi); };
    b = b.unaryExpr(clip);
    a = a.unaryExpr(clip);
  }
  return {LowRankDelta<T>(b.cast<T>(), a.cast<T>(), detail::combine::unit_scale(rank)), std::move(rep)};
}

/// One entry point for the three: svd_rank and svd_clamp are read by svd only.
template <class T>
Combined<T> combine(std::span<const WeightedDelta<T>> in, Combination how, index_t svd_rank = 0,
                    std::optional<double> svd_clamp = {}) {
  switch (how) {
    case Combination::cat:
      return {combine_cat(in), std::nullopt};
    case Combination::linear:
      return {combine_linear(in), std::nullopt};
    case Combination::svd: {
      SVDCombination<T> s = combine_svd(in, svd_rank, svd_clamp);
      return {std::move(s.delta), std::move(s.report)};
    }
  }
  detail::raise<ValueError>("lora::combine: unknown Combination ", static_cast<int>(how));
}

template <detail::combine::WeightedRange R>
auto combine_cat(const R& in) {
  return combine_cat(std::span<const std::ranges::range_value_t<R>>(in));
}
template <detail::combine::WeightedRange R>
auto combine_linear(const R& in) {
  return combine_linear(std::span<const std::ranges::range_value_t<R>>(in));
}
template <detail::combine::WeightedRange R>
auto combine_svd(const R& in, index_t rank = 0, std::optional<double> clamp = {}) {
  return combine_svd(std::span<const std::ranges::range_value_t<R>>(in), rank, clamp);
}
template <detail::combine::WeightedRange R>
auto combine(const R& in, Combination how, index_t svd_rank = 0, std::optional<double> svd_clamp = {}) {
  return combine(std::span<const std::ranges::range_value_t<R>>(in), how, svd_rank, svd_clamp);
}

}  // namespace lora
