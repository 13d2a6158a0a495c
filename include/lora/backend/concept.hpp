// backend/concept.hpp: what a backend must provide, what it may provide, and
// the generic fallbacks for the rest.
//
//   required   storage: matrix<T, R, C>, vector<T>, workspace<T>, resize
//              views and transfers: middle_rows, as_row, overlaps, to_host, from_host
//              element-wise: fill, axpby, dropout, for_each_index over data()/size()
//              reductions: squared_norm, first_non_finite(ptr, n), read(ptr, i)
//              products (BLAS alpha/beta): gemm_nt, gemm_nn, gemm_tn
//   optional   copy, add_to_rows, sum_rows, first_non_finite(matrix), fill_random:
//              lora::BackendOps<B> calls the backend's own where it has one and
//              a fallback built from the required pieces where not
//              middle_cols(m, start, count) (a view of columns, writable when m
//              is): MergedLinear's slices of Y and G; no fallback
//   hooks      backend_hooks<B> (traits.hpp): fused paths the evaluators take
//              where the backend's flag says so (CUDA's fused LoRA kernel)
// detail::check_backend<B, T>() names the first missing piece in a
// static_assert; LowRankDelta checks its backend with it.
#pragma once

#ifndef LORA_UMBRELLA_INCLUDED
#error "Include <lora/lora.hpp> (or <lora/thrust.hpp>) instead of lora/backend/concept.hpp."
#endif

#include <cstdint>
#include <type_traits>

#include "../config.hpp"
#include "traits.hpp"

namespace lora {

namespace detail {
struct IndexProbe {
  void operator()(index_t) const {}
};
}  // namespace detail

/// The pieces every backend provides (see the file comment); T is the scalar
/// it is checked for.
template <class B, class T = float>
concept Backend = requires {
  B::name;
  typename B::template matrix<T>;
  typename B::template vector<T>;
  typename B::template workspace<T>;
} && requires(typename B::template matrix<T>& m, const typename B::template matrix<T>& c,
              typename B::template vector<T>& v, typename B::template workspace<T>& ws, T s, T* p, const T* cp,
              index_t i) {
  B::resize(m, i, i);
  ws.matrix(i, i, 0);
  B::middle_rows(m, i, i);
  B::as_row(v);
  { B::overlaps(c, m) } -> std::convertible_to<bool>;
  B::from_host(B::to_host(c), m);
  B::fill(m, s);
  B::axpby(s, c, s, m);
  B::dropout(s, c, s, m, 0.5, std::uint64_t(0), std::uint64_t(0));
  B::data(m);
  { B::size(c) } -> std::convertible_to<index_t>;
  B::for_each_index(i, detail::IndexProbe{});
  { B::squared_norm(cp, i) } -> std::convertible_to<double>;
  { B::first_non_finite(cp, i) } -> std::convertible_to<index_t>;
  { B::read(cp, i) } -> std::convertible_to<T>;
  B::gemm_nt(s, c, c, s, m);
  B::gemm_nn(s, c, c, s, m);
  B::gemm_tn(s, c, c, s, m);
};

namespace detail {
/// One static_assert per required piece, so a backend under construction is
/// told what it lacks in a sentence. Returns true when everything is there.
template <class B, class T>
constexpr bool check_backend() {
  using M = typename B::template matrix<T>;
  static_assert(requires { B::name; }, "lora backend: missing `static constexpr const char* name`");
  static_assert(requires { typename B::template matrix<T>; typename B::template vector<T>; },
                "lora backend: missing the storage templates `matrix<T, Rows, Cols>` and `vector<T>`");
  static_assert(requires(typename B::template workspace<T>& ws, index_t i) { ws.matrix(i, i, 0); },
                "lora backend: missing `workspace<T>` with `matrix(rows, cols, slot)` (scratch for [n, r])");
  static_assert(requires(M& m, index_t i) { B::resize(m, i, i); }, "lora backend: missing resize(m, rows, cols)");
  static_assert(requires(M& m, index_t i) { B::middle_rows(m, i, i); },
                "lora backend: missing middle_rows(m, start, count) (a view of rows)");
  static_assert(requires(typename B::template vector<T>& v) { B::as_row(v); },
                "lora backend: missing as_row(v) (a vector as one token [1, k])");
  static_assert(requires(const M& a, M& b) { B::overlaps(a, b); },
                "lora backend: missing overlaps(a, b) (aliasing refusal)");
  static_assert(requires(const M& m, M& d) { B::to_host(m); B::from_host(B::to_host(m), d); },
                "lora backend: missing to_host(m) / from_host(host, m) (host-only algorithms: the SVD)");
  static_assert(requires(M& m, T s) { B::fill(m, s); }, "lora backend: missing fill(m, value)");
  static_assert(requires(const M& x, M& y, T s) { B::axpby(s, x, s, y); },
                "lora backend: missing axpby(alpha, X, beta, Y) (Y = beta Y + alpha X)");
  static_assert(requires(const M& x, M& y, T s) { B::dropout(s, x, s, y, 0.5, std::uint64_t(0), std::uint64_t(0)); },
                "lora backend: missing dropout(alpha, X, beta, Y, p, seed, stream) (the counter-based mask)");
  static_assert(requires(M& m, const M& c, index_t i) {
    B::data(m);
    B::size(c);
    B::for_each_index(i, IndexProbe{});
  }, "lora backend: missing data(m), size(m) and for_each_index(n, f) (optimizer updates)");
  static_assert(requires(const T* p, index_t i) {
    B::squared_norm(p, i);
    B::first_non_finite(p, i);
    B::read(p, i);
  }, "lora backend: missing the reductions squared_norm(p, n), first_non_finite(p, n) and read(p, i)");
  static_assert(requires(const M& a, M& c, T s) { B::gemm_nt(s, a, a, s, c); },
                "lora backend: missing gemm_nt(alpha, X, W, beta, Y) (Y = beta Y + alpha X W^T)");
  static_assert(requires(const M& a, M& c, T s) { B::gemm_nn(s, a, a, s, c); },
                "lora backend: missing gemm_nn(alpha, A, B, beta, C) (C = beta C + alpha A B)");
  static_assert(requires(const M& a, M& c, T s) { B::gemm_tn(s, a, a, s, c); },
                "lora backend: missing gemm_tn(alpha, A, B, beta, C) (C = beta C + alpha A^T B)");
  return Backend<B, T>;
}
}  // namespace detail

/// The optional pieces: the backend's own where it has one, otherwise a
/// fallback made of required pieces (correct, not tuned).
template <class B>
struct BackendOps {
  /// dst = src (same shape).
  template <class Src, class Dst>
  static void copy(const Src& src, Dst&& dst) {
    if constexpr (requires { B::copy(src, dst); })
      B::copy(src, dst);
    else
      B::axpby(scalar_of_t<Dst>(1), src, scalar_of_t<Dst>(0), dst);
  }
  /// Y[i, :] += alpha b^T for every row i: Y += alpha 1 b^T.
  template <class T, class V, class Y>
  static void add_to_rows(T alpha, const V& b, Y&& y) {
    if constexpr (requires { B::add_to_rows(alpha, b, y); }) {
      B::add_to_rows(alpha, b, y);
    } else {
      typename B::template matrix<T> ones;  // (n, 1)
      B::resize(ones, y.rows(), 1);
      B::fill(ones, T(1));
      B::gemm_nn(alpha, ones, B::as_row(b), T(1), y);  // (n, out) += (n, 1) (1, out)
    }
  }
  /// db = beta db + alpha sum over rows of G: db^T = alpha 1^T G + beta db^T.
  template <class T, class G, class V>
  static void sum_rows(T alpha, const G& g, T beta, V&& db) {
    if constexpr (requires { B::sum_rows(alpha, g, beta, db); }) {
      B::sum_rows(alpha, g, beta, db);
    } else {
      typename B::template matrix<T> ones;  // (n, 1)
      B::resize(ones, g.rows(), 1);
      B::fill(ones, T(1));
      B::gemm_tn(alpha, ones, g, beta, B::as_row(db));  // (1, out) = (n, 1)^T (n, out)
    }
  }
  /// Flat row-major index of the first non-finite element of a matrix, or -1.
  template <class M>
  static index_t first_non_finite(const M& m) {
    if constexpr (requires { B::first_non_finite(m); }) {
      return B::first_non_finite(m);
    } else {
      const auto host = B::to_host(m);
      for (index_t i = 0; i < host.rows(); ++i)
        for (index_t j = 0; j < host.cols(); ++j)
          if (!(host(i, j) - host(i, j) == 0)) return i * host.cols() + j;  // NaN or Inf
      return -1;
    }
  }
  /// Counter-based draws (detail/random.hpp): element i (flat row-major) is
  /// counter i of (seed, stream), whichever backend fills it.
  template <class M, class Dist>
  static void fill_random(M&& m, const Dist& dist, std::uint64_t seed, std::uint64_t stream) {
    if constexpr (requires { B::fill_random(m, dist, seed, stream); }) {
      B::fill_random(m, dist, seed, stream);
    } else {
      using T = scalar_of_t<M>;
      auto host = B::to_host(m);
      for (index_t i = 0; i < host.rows(); ++i)
        for (index_t j = 0; j < host.cols(); ++j)
          host(i, j) = static_cast<T>(dist.sample(seed, stream, static_cast<std::uint64_t>(i * host.cols() + j)));
      B::from_host(host, m);
    }
  }
};

}  // namespace lora
