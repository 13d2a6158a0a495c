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

/// Specialised for frozen base weights stored in a compressed format (NF4): a
/// base an AdaptedLinear can hold but that no backend reads as a plain matrix.
/// Members: scalar, backend, rows, cols (compile-time or dynamic), and the three
/// products the `expr::Dequantized` evaluator calls over rows [r0, r0 + nr):
///   gemm_nt(q, r0, nr, alpha, X, beta, Y)   Y  = beta Y  + alpha X W[r0:]^T
///   gemm_nn(q, r0, nr, alpha, G, beta, dX)  dX = beta dX + alpha G W[r0:]
///   assign(q, r0, nr, alpha, beta, D)       D  = beta D  + alpha W[r0:]
/// each decoding W on the fly, never holding all of it in full precision.
template <class Q, class Enable = void>
struct quantized_traits {
  static constexpr bool known = false;
};

template <class Q>
using quantized_traits_t = quantized_traits<std::remove_cvref_t<Q>>;

/// A compressed frozen weight (see quantized_traits).
template <class Q>
concept QuantizedMatrix = requires { quantized_traits_t<Q>::known; } && quantized_traits_t<Q>::known;

/// What AdaptedLinear accepts as its base weight W.
template <class W>
concept BaseWeight = Matrix<W> || QuantizedMatrix<W>;

/// The traits of a base weight, plain or compressed; a compressed one is never
/// writable (merge() cannot add into it in place).
template <class W>
struct weight_traits : matrix_traits_t<W> {};
template <QuantizedMatrix W>
struct weight_traits<W> : quantized_traits_t<W> {
  static constexpr bool writable = false;
};

/// Optional fast paths of a backend, declared by a flag and used by the
/// evaluators (a backend without them runs the generic primitives; nothing
/// else changes):
///   low_rank = true and
///   template <int Rank, class T, class X, class A, class B, class Y, class WS>
///   static bool low_rank_apply(T alpha, const X&, const A&, const B&, Y&, WS&);
///     Y += alpha (X A^T) B^T in one fused pass, the [n, r] intermediate kept
///     on chip; returns false where it cannot take the shape (CUTLASS's
///     can_implement), and the evaluator then takes the two products.
/// Specialised for ThrustBackend under nvcc (backend/cuda/fused.hpp). A flag,
/// not a `requires` on the call: nvcc's device pass evaluated such a
/// requires-expression as false where the host pass found it true, so the
/// host launched kernels the device image never got (seen on an H200).
template <class Backend>
struct backend_hooks {
  static constexpr bool low_rank = false;
};

/// Compile-time extents agree when either is dynamic or both are equal.
constexpr bool extents_agree(int a, int b) { return a == dynamic || b == dynamic || a == b; }

}  // namespace lora
