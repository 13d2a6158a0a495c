// init.hpp: seeded, reproducible initialisation strategies for LowRankDelta and
// any adapter made of factors A [r, in], B [out, r] (lora::LowRankFactors).
//   delta.init(init::KaimingZero{}, seed)   loralib / PEFT default
//   delta.init(init::Gaussian{}, seed)       PEFT init_lora_weights="gaussian"
//   delta.init(init::FromDense{dW})         best rank-r fit of a dense delta
//   init::pissa(layer)                       PiSSA: top-r triplets of W, residual base
// Random draws are counter-based (detail/random.hpp): the same seed gives the
// same factors on every backend and thread count.
#pragma once

#ifndef LORA_UMBRELLA_INCLUDED
#error "Include <lora/lora.hpp> instead of lora/init.hpp."
#endif

#include <cmath>
#include <cstdint>
#include <vector>

#include "adapter.hpp"
#include "detail/random.hpp"
#include "detail/svd.hpp"
#include "error.hpp"

namespace lora::init {

/// Streams keep A's and B's draws independent under one seed.
inline constexpr std::uint64_t stream_A = 0xA;
inline constexpr std::uint64_t stream_B = 0xB;

/// loralib / PEFT default: A ~ U(-1/sqrt(in), 1/sqrt(in)) (kaiming-uniform with
/// a = sqrt(5)), B = 0, so the adapted layer starts equal to its base.
struct KaimingZero {
  template <LowRankFactors Delta>  // a pair A [r, in], B [out, r] (adapter.hpp)
  void initialize(Delta& d, std::uint64_t seed) const {
    using B = typename Delta::backend;
    using T = typename Delta::scalar;
    const double bound = 1.0 / std::sqrt(static_cast<double>(d.in_features()));
    BackendOps<B>::fill_random(d.A(), UniformDist{-bound, bound}, seed, stream_A);
    B::fill(d.B(), T(0));
  }
};

/// PEFT's "gaussian": A ~ N(0, (1/r)^2) (stddev 1/r), B = 0.
struct Gaussian {
  template <LowRankFactors Delta>  // a pair A [r, in], B [out, r] (adapter.hpp)
  void initialize(Delta& d, std::uint64_t seed) const {
    using B = typename Delta::backend;
    using T = typename Delta::scalar;
    BackendOps<B>::fill_random(d.A(), NormalDist{0.0, 1.0 / static_cast<double>(d.rank())}, seed, stream_A);
    B::fill(d.B(), T(0));
  }
};

/// Both factors random (tests, benchmarks, synthetic deltas): A and B ~ U(-b, b).
struct UniformBoth {
  double bound = 1.0;
  template <LowRankFactors Delta>  // a pair A [r, in], B [out, r] (adapter.hpp)
  void initialize(Delta& d, std::uint64_t seed) const {
    using B = typename Delta::backend;
    lora::detail::check_non_negative_parameter("init::UniformBoth", "bound", bound);
    BackendOps<B>::fill_random(d.A(), UniformDist{-bound, bound}, seed, stream_A);
    BackendOps<B>::fill_random(d.B(), UniformDist{-bound, bound}, seed, stream_B);
  }
};

/// What an SVD-based initialisation kept.
struct SVDReport {
  /// sum of the kept squared singular values / sum of all of them (1 when the
  /// delta has rank <= r; 0 for an all-zero delta).
  double kept_energy = 0.0;
  /// Frobenius norm of what was left out: sqrt(sum_{i > r} sigma_i^2), the
  /// Eckart-Young error of the best rank-r approximation.
  double residual_norm = 0.0;
  /// All singular values, descending.
  std::vector<double> singular_values;
};

namespace svd_detail {
/// The report of keeping the top r of the singular values sv (descending).
inline SVDReport report(const Eigen::VectorXd& sv, index_t r) {
  SVDReport rep;
  rep.singular_values.assign(sv.data(), sv.data() + sv.size());
  double total = 0.0, kept = 0.0;
  for (index_t i = 0; i < sv.size(); ++i) {
    total += sv[i] * sv[i];
    if (i < r) kept += sv[i] * sv[i];
  }
  rep.kept_energy = total > 0.0 ? kept / total : 0.0;
  rep.residual_norm = std::sqrt(std::max(0.0, total - kept));
  return rep;
}

/// Splits M (host, [out, in]) into the top-r factors with s B A = U_r S_r V_r^T:
/// B = U_r sqrt(S_r / s), A = sqrt(S_r / s) V_r^T (PiSSA's symmetric split).
template <class Delta, class HostMatrix>
SVDReport factor_top_r(Delta& d, const HostMatrix& m) {
  using B = typename Delta::backend;
  using T = typename Delta::scalar;
  const index_t r = d.rank();
  const double s = static_cast<double>(d.scale());
  if (s == 0.0)
    lora::detail::raise<ValueError>("init: an SVD initialisation needs a non-zero scale s (alpha = ",
                                     d.alpha(), ", multiplier = ", d.multiplier(), ")");
  const Eigen::MatrixXd md = m.template cast<double>();
  const auto [sv, u, v] = lora::detail::svd_kernels<double>::top(md, r);

  SVDReport rep = report(sv, r);

  const Eigen::VectorXd root = (sv.head(r) / s).cwiseSqrt();
  const Eigen::MatrixXd b_host = u * root.asDiagonal();              // (out, r)
  const Eigen::MatrixXd a_host = root.asDiagonal() * v.transpose();  // (r, in)
  B::from_host(b_host.cast<T>(), d.B());
  B::from_host(a_host.cast<T>(), d.A());
  return rep;
}
}  // namespace svd_detail

/// The best rank-r factorisation of a dense delta dW [out, in] (Eckart-Young):
/// afterwards s B A is the truncated SVD of dW. Reports the kept energy.
template <class M>
struct FromDense {
  const M& delta;

  template <LowRankFactors Delta>  // a pair A [r, in], B [out, r] (adapter.hpp)
  SVDReport initialize(Delta& d, std::uint64_t /*seed*/) const {
    if (delta.rows() != d.out_features() || delta.cols() != d.in_features())
      lora::detail::raise<ShapeError>("init::FromDense: delta is [", delta.rows(), ", ", delta.cols(),
                                       "], expected [out, in] = [", d.out_features(), ", ",
                                       d.in_features(), "]");
    const auto host = Delta::backend::to_host(delta);
    for (index_t i = 0; i < host.rows(); ++i)  // an SVD of NaN gives NaN factors, not an error
      for (index_t j = 0; j < host.cols(); ++j)
        if (!std::isfinite(static_cast<double>(host(i, j))))
          lora::detail::raise<ValueError>("init::FromDense: delta(", i, ", ", j, ") = ", host(i, j),
                                           " is not finite");
    return svd_detail::factor_top_r(d, host);
  }
};
template <class M>
FromDense(const M&) -> FromDense<M>;

/// PiSSA: the adapter takes W's top-r singular triplets and the base keeps the
/// residual, W <- W - s B A, so the layer's output is unchanged. Needs a writable
/// base weight and an unmerged layer.
template <class Layer>
SVDReport pissa(Layer& layer) {
  using B = typename Layer::backend;
  using T = typename Layer::scalar;
  static_assert(Layer::base_is_writable,
                "lora::init::pissa: the base weight is read-only; PiSSA rewrites W as its residual, so "
                "construct the layer over an owned matrix or a writable Eigen::Map<RowMatrix<T>>");
  if (layer.merged())
    lora::detail::raise<ValueError>("init::pissa: the layer is merged; unmerge() it first");
  layer.check_consistent("init::pissa");
  SVDReport rep = svd_detail::factor_top_r(layer.delta(), B::to_host(layer.base_weight()));
  expr::assign(layer.base_weight(), layer.delta().expression(), T(-1), T(1));  // W -= s B A
  return rep;
}

}  // namespace lora::init
