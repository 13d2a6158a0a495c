// tests/thrust/conformance.hpp: what every conformance TU shares (helpers and
// tolerances). The suite is split into five TUs (forward, layer, primitives,
// init, qlora) so that none needs more than ~1.9 GB of compiler memory (g++
// -O3) and two build at once.
// Conformance of the Thrust backend with the Eigen backend. One source, built
// once per Thrust device system: OMP and CPP with the host compiler, CUDA with
// nvcc (each conformance_<part>.cu includes its .cpp). Every operation runs on both
// backends from the same inputs and the results are compared within
// tolerances derived from the inputs' magnitudes:
//   products:      |dev - eigen| <= 2 (k + 2) eps * (|op(A)| |op(B)| + |C|-terms)
//   elementwise:   exact, or 2 eps |value| where both sides round once
//   random init:   bit-identical on OMP/CPP (same libm); 2 ulp on CUDA (its libm)
#pragma once

#include <lora/thrust.hpp>

#include <catch2/catch.hpp>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

namespace {

using lora::index_t;
using EB = lora::EigenBackend;
using TB = lora::ThrustBackend;
template <class T>
using Host = lora::RowMatrix<T>;

template <class T>
Host<T> random_host(index_t rows, index_t cols, std::uint64_t seed) {
  Host<T> m(rows, cols);
  EB::fill_random(m, lora::UniformDist{-1.0, 1.0}, seed, 99);
  return m;
}

/// |got - want| <= 2 (terms + 2) eps * bound, elementwise.
template <class T, class G, class W, class B>
void check_close(const G& got, const W& want, const B& bound, index_t terms) {
  REQUIRE(got.rows() == want.rows());
  REQUIRE(got.cols() == want.cols());
  const double tol = 2.0 * static_cast<double>(terms + 2) * std::numeric_limits<T>::epsilon();
  for (index_t i = 0; i < got.rows(); ++i)
    for (index_t j = 0; j < got.cols(); ++j) {
      INFO("element (" << i << ", " << j << "): " << got(i, j) << " vs " << want(i, j));
      CHECK(std::abs(static_cast<double>(got(i, j)) - static_cast<double>(want(i, j))) <=
            tol * static_cast<double>(bound(i, j)) + 1e-300);
    }
}

template <class M>
bool bit_identical(const M& a, const M& b) {
  return a.rows() == b.rows() && a.cols() == b.cols() &&
         std::memcmp(a.data(), b.data(), sizeof(typename M::Scalar) * static_cast<std::size_t>(a.size())) == 0;
}

struct shape {
  index_t out, in, n;
};
// (96, 80, 40): m n k above LORA_THRUST_CUBLAS_MIN_MNK, so on CUDA it runs cuBLAS.
const shape kShapes[] = {{8, 8, 1}, {13, 7, 5}, {7, 13, 1}, {32, 48, 17}, {5, 4, 3}, {96, 80, 40}};

template <int Rank>
index_t rank_for(const shape& sh) {
  return Rank == lora::dynamic ? std::min<index_t>(3, std::min(sh.out, sh.in)) : Rank;
}

// |X| |W + s B A|^T + |b| computed as sums of absolute terms (the error scale).
template <class T, class Layer>
Host<T> forward_bound(const Layer& host, const Host<T>& X) {
  const T s = std::abs(host.delta().scale());
  Host<T> bound = X.cwiseAbs() * host.base_weight().cwiseAbs().transpose();
  bound += s * (X.cwiseAbs() * host.delta().A().cwiseAbs().transpose()) * host.delta().B().cwiseAbs().transpose();
  if (host.has_bias()) bound.rowwise() += host.bias().cwiseAbs().transpose();
  return bound;
}

}  // namespace
