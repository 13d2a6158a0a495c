// backend/thrust/kernels.hpp: the Thrust backend's kernels, written as
// LORA_HOST_DEVICE functors over a flat index space. thrust::for_each over a
// counting_iterator runs them as CUDA kernels under nvcc and as (OpenMP or
// serial) loops under g++, so CI tests the GPU code path on the CPU.
// Every functor holds plain pointers and extents (trivially copyable) and
// writes each output element exactly once: no atomics, so results do not
// depend on the device system or the thread count.
#pragma once

#ifndef LORA_THRUST_UMBRELLA_INCLUDED
#error "Include <lora/thrust.hpp> instead of lora/backend/thrust/kernels.hpp."
#endif

#include <cstdint>
#include <type_traits>

#include "../../config.hpp"
#include "../../detail/arith.hpp"
#include "../../detail/random.hpp"
#include "storage.hpp"

// Unroll hint where the compiler honours it without a warning (nvcc); g++
// unrolls constant trip counts (a static rank) on its own.
#if defined(__CUDACC__)
#define LORA_UNROLL _Pragma("unroll")
#else
#define LORA_UNROLL
#endif

namespace lora::kernels {

// The accumulation type and the BLAS store rule, shared with the CUDA kernels.
using detail::accum_t;
using detail::store;

/// Finite test that also works for 16-bit types (through the accumulator) and
/// needs no <cmath> in device code: v - v is 0 for finite v, NaN otherwise.
template <class T>
LORA_HOST_DEVICE inline bool is_finite(T x) {
  const accum_t<T> v = static_cast<accum_t<T>>(x);
  return v - v == accum_t<T>(0);
}

/// A read-only operand op(M) of a product: element (i, j) = p[i * si + j * sj].
/// A transposition is the same pointer with si and sj swapped.
template <class T>
struct operand {
  const T* p;
  index_t si, sj;
  LORA_HOST_DEVICE accum_t<T> operator()(index_t i, index_t j) const {
    return static_cast<accum_t<T>>(p[i * si + j * sj]);
  }
};

/// C (m, n) = beta C + alpha op(A) (m, k) op(B) (k, n). Index = one register
/// tile of 1 x TJ outputs of a row: op(A)(i, p) is loaded once per p and used
/// TJ times. K is the inner extent when static (the rank in LoRA's expand and
/// merge products), so the p-loop unrolls; the shrink has K = in (dynamic).
/// TB and TC default to T; a 16-bit base under fp32 compute (backend/thrust/
/// half.hpp) sets TB = Eigen::bfloat16 / half and TC = float: B is widened as
/// it is read and the sums stay in accum_t<TC>. With one type the casts are
/// no-ops, so those results are unchanged.
template <class T, int K, int TJ = 4, class TB = T, class TC = T>
struct gemm {
  using A = accum_t<TC>;
  operand<T> a;   // (m, k)
  operand<TB> b;  // (k, n)
  TC* c;          // (m, n), rows ldc apart
  index_t ldc, n, k, tiles_per_row;
  A alpha, beta;

  LORA_HOST_DEVICE void operator()(index_t idx) const {
    const index_t i = idx / tiles_per_row;
    const index_t j0 = (idx % tiles_per_row) * TJ;
    if (j0 + TJ <= n)
      tile<TJ>(i, j0);
    else
      tail(i, j0);
  }

 private:
  template <int W>
  LORA_HOST_DEVICE void tile(index_t i, index_t j0) const {
    A acc[W] = {};
    const index_t kk = K == dynamic ? k : K;
    LORA_UNROLL
    for (index_t p = 0; p < kk; ++p) {
      const A av = static_cast<A>(a(i, p));
      LORA_UNROLL
      for (int t = 0; t < W; ++t) acc[t] += av * static_cast<A>(b(p, j0 + t));
    }
    LORA_UNROLL
    for (int t = 0; t < W; ++t) store(c[i * ldc + j0 + t], alpha * acc[t], beta);
  }
  LORA_HOST_DEVICE void tail(index_t i, index_t j0) const {
    for (index_t j = j0; j < n; ++j) {
      A acc = 0;
      const index_t kk = K == dynamic ? k : K;
      for (index_t p = 0; p < kk; ++p) acc += static_cast<A>(a(i, p)) * static_cast<A>(b(p, j));
      store(c[i * ldc + j], alpha * acc, beta);
    }
  }
};

/// Y = beta Y + alpha X, elementwise over (rows, cols); X may be Y itself.
/// TX (default T) lets X have another element type, read through accum_t<T>
/// (a 16-bit base widened into an fp32 destination).
template <class T, class TX = T>
struct axpby {
  using A = accum_t<T>;
  DeviceMatrixView<const TX> x;
  DeviceMatrixView<T> y;
  A alpha, beta;
  LORA_HOST_DEVICE void operator()(index_t idx) const {
    const index_t i = idx / y.cols(), j = idx % y.cols();
    store(y(i, j), alpha * static_cast<A>(x(i, j)), beta);
  }
};

template <class T>
struct fill {
  DeviceMatrixView<T> m;
  T value;
  LORA_HOST_DEVICE void operator()(index_t idx) const { m(idx / m.cols(), idx % m.cols()) = value; }
};

template <class T>
struct copy {
  DeviceMatrixView<const T> src;
  DeviceMatrixView<T> dst;
  LORA_HOST_DEVICE void operator()(index_t idx) const {
    const index_t i = idx / dst.cols(), j = idx % dst.cols();
    dst(i, j) = src(i, j);
  }
};

/// Y[i, :] += alpha b^T (bias add); b is a [cols, 1] vector.
template <class T>
struct add_to_rows {
  using A = accum_t<T>;
  DeviceMatrixView<const T> b;
  DeviceMatrixView<T> y;
  A alpha;
  LORA_HOST_DEVICE void operator()(index_t idx) const {
    const index_t i = idx / y.cols(), j = idx % y.cols();
    y(i, j) = static_cast<T>(static_cast<A>(y(i, j)) + alpha * static_cast<A>(b(j, 0)));
  }
};

/// db[j] = beta db[j] + alpha sum_i G[i, j]; one index per column, rows summed
/// in order (deterministic).
template <class T>
struct sum_rows {
  using A = accum_t<T>;
  DeviceMatrixView<const T> g;
  DeviceMatrixView<T> db;  // (cols, 1)
  A alpha, beta;
  LORA_HOST_DEVICE void operator()(index_t j) const {
    A acc = 0;
    for (index_t i = 0; i < g.rows(); ++i) acc += static_cast<A>(g(i, j));
    store(db(j, 0), alpha * acc, beta);
  }
};

/// Maps a flat index to itself when that element is not finite, to `none`
/// otherwise; a min-reduction then finds the first one.
template <class T>
struct non_finite_index {
  DeviceMatrixView<const T> m;
  index_t none;
  LORA_HOST_DEVICE index_t operator()(index_t idx) const {
    return is_finite(m(idx / m.cols(), idx % m.cols())) ? none : idx;
  }
};

template <class T>
struct non_finite_flat {
  const T* x;
  index_t none;
  LORA_HOST_DEVICE index_t operator()(index_t i) const { return is_finite(x[i]) ? none : i; }
};

struct min_index {
  LORA_HOST_DEVICE index_t operator()(index_t a, index_t b) const { return a < b ? a : b; }
};

/// x[i]^2 in double (gradient norms).
template <class T>
struct squared {
  const T* x;
  LORA_HOST_DEVICE double operator()(index_t i) const {
    const double v = static_cast<double>(static_cast<accum_t<T>>(x[i]));
    return v * v;
  }
};

struct plus_double {
  LORA_HOST_DEVICE double operator()(double a, double b) const { return a + b; }
};

/// Element at flat row-major index i draws counter i: the same numbers as the
/// Eigen backend's loop, whatever the order the indices run in.
template <class T, class Dist>
struct fill_random {
  DeviceMatrixView<T> m;
  Dist dist;
  std::uint64_t seed, stream;
  LORA_HOST_DEVICE void operator()(index_t idx) const {
    m(idx / m.cols(), idx % m.cols()) =
        static_cast<T>(dist.sample(seed, stream, static_cast<std::uint64_t>(idx)));
  }
};

/// Inverted dropout with the counter-based mask of EigenBackend::dropout:
/// keep(t, i) = to_unit(random_bits(seed, stream, t * cols + i)) >= p.
template <class T>
struct dropout {
  using A = accum_t<T>;
  DeviceMatrixView<const T> x;
  DeviceMatrixView<T> y;
  A alpha, beta;
  T kept;  // alpha / (1 - p), computed in T as EigenBackend does
  double p;
  std::uint64_t seed, stream;
  LORA_HOST_DEVICE void operator()(index_t idx) const {
    const index_t t = idx / x.cols(), i = idx % x.cols();
    const bool keep = detail::to_unit(detail::random_bits(seed, stream, static_cast<std::uint64_t>(idx))) >= p;
    // Unfused products: EigenBackend::dropout computes the same bits.
    const T v = keep ? static_cast<T>(detail::mul_unfused(static_cast<A>(kept), static_cast<A>(x(t, i)))) : T(0);
    y(t, i) = beta == A(0) ? v : static_cast<T>(detail::mul_unfused(beta, static_cast<A>(y(t, i))) + static_cast<A>(v));
  }
};

}  // namespace lora::kernels
