// support.hpp: the helpers the layer tests share. They are kept independent of
// the library: the random fill uses the standard library's generator, not
// lora's, and the error measure is computed in long double.
#pragma once

#include <Eigen/Core>
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <exception>
#include <random>
#include <string>

namespace support {

/// Uniform entries in [lo, hi), from std::mt19937_64(seed).
template <class M>
void fill(M& m, std::uint64_t seed, double lo = -1.0, double hi = 1.0) {
  std::mt19937_64 gen(seed);
  std::uniform_real_distribution<double> dist(lo, hi);
  for (Eigen::Index i = 0; i < m.rows(); ++i)
    for (Eigen::Index j = 0; j < m.cols(); ++j) m(i, j) = static_cast<typename M::Scalar>(dist(gen));
}

/// max |got - ref| / max |ref|, in long double (max |got - ref| when ref is 0).
template <class A, class B>
double rel_err(const A& got, const B& ref) {
  REQUIRE(got.rows() == ref.rows());
  REQUIRE(got.cols() == ref.cols());
  long double num = 0, den = 0;
  for (Eigen::Index i = 0; i < ref.rows(); ++i)
    for (Eigen::Index j = 0; j < ref.cols(); ++j) {
      const auto g = static_cast<long double>(got(i, j)), r = static_cast<long double>(ref(i, j));
      num = std::max(num, std::fabs(g - r));
      den = std::max(den, std::fabs(r));
    }
  return static_cast<double>(den > 0 ? num / den : num);
}

/// The what() of the exception f() throws, or "(no exception)".
template <class F>
std::string message_of(F&& f) {
  try {
    f();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "(no exception)";
}

}  // namespace support
