// detail/random.hpp: a counter-based generator. Element i of a tensor draws from
// hash(seed, stream, i), so the numbers do not depend on thread count, traversal
// order or backend: Eigen on the CPU and Thrust on CUDA/OMP/CPP fill identical
// values. (std:: distributions are not portable across standard libraries.)
#pragma once

#include <cmath>
#include <cstdint>

#include "../config.hpp"
#include "arith.hpp"

namespace lora::detail {

/// splitmix64's finaliser: a bijective 64-bit mix with good avalanche.
LORA_HOST_DEVICE constexpr std::uint64_t mix64(std::uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

/// 64 random bits for counter `i` of stream `stream` under `seed`.
LORA_HOST_DEVICE constexpr std::uint64_t random_bits(std::uint64_t seed, std::uint64_t stream,
                                                     std::uint64_t i) {
  const std::uint64_t key = mix64(seed ^ mix64(stream + 0x9e3779b97f4a7c15ULL));
  return mix64(key + (i + 1) * 0x9e3779b97f4a7c15ULL);
}

/// Uniform in [0, 1) with 53 random bits, exact in double.
LORA_HOST_DEVICE constexpr double to_unit(std::uint64_t bits) {
  return static_cast<double>(bits >> 11) * 0x1.0p-53;
}

}  // namespace lora::detail

namespace lora {

/// U(lo, hi): `fill_random` samples of this distribution.
struct UniformDist {
  double lo = 0.0, hi = 1.0;
  LORA_HOST_DEVICE double sample(std::uint64_t seed, std::uint64_t stream, std::uint64_t i) const {
    return lo + detail::mul_unfused(hi - lo, detail::to_unit(detail::random_bits(seed, stream, i)));
  }
};

/// N(mean, stddev) by Box-Muller on two counters of the same element.
struct NormalDist {
  double mean = 0.0, stddev = 1.0;
  LORA_HOST_DEVICE double sample(std::uint64_t seed, std::uint64_t stream, std::uint64_t i) const {
    // 1 - u keeps log() away from 0.
    const double u1 = 1.0 - detail::to_unit(detail::random_bits(seed, stream, 2 * i));
    const double u2 = detail::to_unit(detail::random_bits(seed, stream, 2 * i + 1));
    const double pi = 3.14159265358979323846;
    // Unfused: the same bits on every backend and optimisation level.
    return mean + detail::mul_unfused(stddev * std::sqrt(-2.0 * std::log(u1)), std::cos(2.0 * pi * u2));
  }
};

}  // namespace lora
