// detail/svd.hpp: the one SVD the library runs (host, double): the
// SVD-based initialisations (init::FromDense, init::pissa) and
// combine_svd's truncation. Behind one class template so that
// LORA_EXTERN_TEMPLATES keeps Eigen's BDCSVD out of every TU but the one that
// holds it (LORA_INSTANTIATE_TEMPLATES, or lora::kernels' explicit
// instantiation): BDCSVD<MatrixXd> alone took 40 s to compile at -O3 (50 s
// under the sanitizers), in each TU that called it.
#pragma once

#ifndef LORA_UMBRELLA_INCLUDED
#error "Include <lora/lora.hpp> instead of lora/detail/svd.hpp."
#endif

#include <Eigen/Core>
#include <Eigen/SVD>

#include "../config.hpp"

namespace lora::detail {

template <class Scalar>
struct svd_kernels {
  using matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>;
  using vector = Eigen::Matrix<Scalar, Eigen::Dynamic, 1>;
  /// m = U diag(sv) V^T: all singular values (descending), and the first r
  /// columns of U and V (r <= min(rows, cols)).
  struct result {
    vector sv;
    matrix u, v;
  };
  static result top(const matrix& m, index_t r);
};

// Defined outside the class (not implicitly inline), so an extern template
// declaration keeps a TU from instantiating it.
template <class Scalar>
typename svd_kernels<Scalar>::result svd_kernels<Scalar>::top(const matrix& m, index_t r) {
  // BDCSVD is exact to rounding and fast for the large matrices LoRA adapts.
  const Eigen::BDCSVD<matrix> svd(m, Eigen::ComputeThinU | Eigen::ComputeThinV);
  return {svd.singularValues(), svd.matrixU().leftCols(r), svd.matrixV().leftCols(r)};
}

#if defined(LORA_EXTERN_TEMPLATES) && !defined(LORA_INSTANTIATE_TEMPLATES)
extern template struct svd_kernels<double>;
#elif defined(LORA_INSTANTIATE_TEMPLATES)
template struct svd_kernels<double>;
#endif

}  // namespace lora::detail
