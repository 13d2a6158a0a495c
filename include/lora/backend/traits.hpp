// backend/traits.hpp: what the backend-free layers (LowRankDelta, AdaptedLinear,
// expression nodes) may ask of a matrix type. Each backend specialises
// matrix_traits for its own types; nothing above the seam names Eigen or Thrust.
#pragma once

#include <type_traits>

#include "../config.hpp"
#include "../rank.hpp"

namespace lora {

/// Specialised by each backend for the matrix types it accepts. Members:
///   using scalar;               element type
///   using backend;              the backend whose primitives evaluate it
///   static constexpr int rows;  compile-time rows or lora::dynamic
///   static constexpr int cols;  compile-time columns or lora::dynamic
///   static constexpr bool writable;  can be assigned to (merge needs this)
///   static constexpr bool vector;    a compile-time column vector (one token)
template <class M, class Enable = void>
struct matrix_traits {
  static constexpr bool known = false;
};

template <class M>
using matrix_traits_t = matrix_traits<std::remove_cvref_t<M>>;

/// A type some backend knows how to read as a matrix.
template <class M>
concept Matrix = requires { matrix_traits_t<M>::known; } && matrix_traits_t<M>::known;

template <class M>
using scalar_of_t = typename matrix_traits_t<M>::scalar;
template <class M>
using backend_of_t = typename matrix_traits_t<M>::backend;

/// Compile-time extents agree when either is dynamic or both are equal.
constexpr bool extents_agree(int a, int b) { return a == dynamic || b == dynamic || a == b; }

}  // namespace lora
