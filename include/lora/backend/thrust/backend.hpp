// backend/thrust/backend.hpp: the Thrust backend, behind the same seam as the
// Eigen backend (same primitives, same BLAS alpha/beta rules: beta == 0 never
// reads the destination). Storage is thrust::device_vector; kernels are the
// functors of kernels.hpp run by thrust::for_each / transform_reduce, so one
// source runs on CUDA (nvcc), OMP and CPP (g++). Under nvcc with the CUDA
// system, products with m n k >= LORA_THRUST_CUBLAS_MIN_MNK go to cuBLAS.
#pragma once

#ifndef LORA_THRUST_UMBRELLA_INCLUDED
#error "Include <lora/thrust.hpp> instead of lora/backend/thrust/backend.hpp."
#endif

#include <thrust/copy.h>
#include <thrust/device_ptr.h>
#include <thrust/execution_policy.h>
#include <thrust/for_each.h>
#include <thrust/iterator/counting_iterator.h>
#include <thrust/system_error.h>
#include <thrust/transform_reduce.h>

#include <cstdint>
#include <type_traits>
#include <utility>

#include "../../config.hpp"
#include "../../error.hpp"
#include "../traits.hpp"
#include "kernels.hpp"
#include "storage.hpp"

#if THRUST_DEVICE_SYSTEM == THRUST_DEVICE_SYSTEM_CUDA
#if !defined(__CUDACC__)
#error "lora/thrust.hpp: THRUST_DEVICE_SYSTEM is CUDA, which needs nvcc; compile this file with nvcc or choose -DTHRUST_DEVICE_SYSTEM=THRUST_DEVICE_SYSTEM_OMP (or _CPP) for a host compiler."
#endif
#include <thrust/system/cuda/execution_policy.h>

#include "../cuda/runtime.hpp"
#define LORA_THRUST_ON_CUDA 1
// Route large products to cuBLAS (set to 0 to test the Thrust functors alone).
#ifndef LORA_THRUST_CUBLAS
#define LORA_THRUST_CUBLAS 1
#endif
#if LORA_THRUST_CUBLAS
#include "../cuda/blas.hpp"
#endif
#else
#define LORA_THRUST_ON_CUDA 0
#undef LORA_THRUST_CUBLAS
#define LORA_THRUST_CUBLAS 0
#endif


namespace lora {

namespace detail {

template <class M>
inline constexpr int static_rows_v = matrix_traits_t<M>::rows;
template <class M>
inline constexpr int static_cols_v = matrix_traits_t<M>::cols;
constexpr int first_static(int a, int b) { return a != dynamic ? a : b; }

/// The execution policy of every lora kernel: the device system's, and on
/// CUDA the thread's current stream without a synchronisation per kernel.
inline auto thrust_policy() {
#if LORA_THRUST_ON_CUDA
  return thrust::cuda::par_nosync.on(cuda::current_stream());
#else
  return thrust::device;
#endif
}

/// Runs f; on CUDA, Thrust's errors become lora::DeviceError naming `what`
/// (CUDA's sticky error is cleared first). On OMP/CPP there are none to map.
template <class F>
decltype(auto) device_call(const char* what, F&& f) {
#if LORA_THRUST_ON_CUDA
  try {
    return std::forward<F>(f)();
  } catch (const thrust::system_error& e) {
    (void)cudaGetLastError();
    raise<DeviceError>(what, " failed: ", e.what());
  }
#else
  (void)what;
  return std::forward<F>(f)();
#endif
}

/// f(i) for i in [0, n) on the device system.
template <class F>
void launch(const char* what, index_t n, const F& f) {
  if (n <= 0) return;
  device_call(what, [&] {
    thrust::for_each(thrust_policy(), thrust::counting_iterator<index_t>(0), thrust::counting_iterator<index_t>(n),
                     f);
  });
}

template <class T>
T read_one(const T* p) {
  T value{};
  device_call("thrust::copy_n (device to host)",
              [&] { thrust::copy_n(thrust::device_pointer_cast(p), 1, &value); });
  return value;
}

template <class M>
inline constexpr bool is_owned_device_matrix_v = false;
template <class T, int R, int C>
inline constexpr bool is_owned_device_matrix_v<DeviceMatrix<T, R, C>> = true;

}  // namespace detail

/// The Thrust backend: device storage and the primitives the evaluators use.
struct ThrustBackend {
  static constexpr const char* name = "thrust";

  template <class T, int Rows = dynamic, int Cols = dynamic>
  using matrix = DeviceMatrix<T, Rows, Cols>;
  template <class T>
  using vector = DeviceMatrix<T, dynamic, 1>;

  /// Scratch device memory for intermediates ([n, r] in the unmerged forward).
  /// Grows, never shrinks, so a reused workspace stops allocating.
  template <class T>
  class workspace {
   public:
    template <int Cols = dynamic>
    DeviceMatrixView<T, dynamic, Cols> matrix(index_t rows, index_t cols, int slot = 0) {
      auto& buf = slot == 0 ? first_ : second_;
      const index_t need = detail::checked_mul("ThrustBackend::workspace::matrix", rows, cols);
      if (static_cast<index_t>(buf.size()) < need) {
        buf.clear();  // nothing to keep: avoids copying the old contents
        buf.resize(static_cast<std::size_t>(need));
      }
      return {thrust::raw_pointer_cast(buf.data()), rows, cols, cols};
    }
    index_t capacity() const { return static_cast<index_t>(first_.size() + second_.size()); }

   private:
    thrust::device_vector<T> first_, second_;
  };

  template <class M>
  static void resize(M& m, index_t rows, index_t cols) {
    if constexpr (detail::is_owned_device_matrix_v<std::remove_cvref_t<M>>) {
      m.resize(rows, cols);
    } else if (m.rows() != rows || m.cols() != cols) {
      detail::raise<ShapeError>("ThrustBackend::resize: a view is [", m.rows(), ", ", m.cols(),
                                 "] and cannot become [", rows, ", ", cols, "]");
    }
  }

  /// Y = beta Y + alpha X W^T  (X [n, k], W [m, k], Y [n, m])
  template <class T, class X, class W, class Y>
  static void gemm_nt(T alpha, const X& x, const W& w, T beta, Y&& y) {
    const auto xv = view(x);
    const auto wv = view(w);
    const auto yv = view(y);
    check_product("ThrustBackend::gemm_nt", xv.rows(), xv.cols(), wv.cols(), wv.rows(), yv.rows(), yv.cols());
    constexpr int K = detail::first_static(detail::static_cols_v<X>, detail::static_cols_v<W>);
    gemm_impl<K>(false, true, yv.rows(), yv.cols(), xv.cols(), alpha, xv.data(), xv.stride(), wv.data(),
                 wv.stride(), beta, yv.data(), yv.stride());
  }
  /// C = beta C + alpha A B  (A [m, k], B [k, n])
  template <class T, class A, class B, class C>
  static void gemm_nn(T alpha, const A& a, const B& b, T beta, C&& c) {
    const auto av = view(a);
    const auto bv = view(b);
    const auto cv = view(c);
    check_product("ThrustBackend::gemm_nn", av.rows(), av.cols(), bv.rows(), bv.cols(), cv.rows(), cv.cols());
    constexpr int K = detail::first_static(detail::static_cols_v<A>, detail::static_rows_v<B>);
    gemm_impl<K>(false, false, cv.rows(), cv.cols(), av.cols(), alpha, av.data(), av.stride(), bv.data(),
                 bv.stride(), beta, cv.data(), cv.stride());
  }
  /// C = beta C + alpha A^T B  (A [k, m], B [k, n])
  template <class T, class A, class B, class C>
  static void gemm_tn(T alpha, const A& a, const B& b, T beta, C&& c) {
    const auto av = view(a);
    const auto bv = view(b);
    const auto cv = view(c);
    check_product("ThrustBackend::gemm_tn", av.cols(), av.rows(), bv.rows(), bv.cols(), cv.rows(), cv.cols());
    constexpr int K = detail::first_static(detail::static_rows_v<A>, detail::static_rows_v<B>);
    gemm_impl<K>(true, false, cv.rows(), cv.cols(), av.rows(), alpha, av.data(), av.stride(), bv.data(),
                 bv.stride(), beta, cv.data(), cv.stride());
  }

  /// Y = beta Y + alpha X (same shapes; X may be Y)
  template <class T, class X, class Y>
  static void axpby(T alpha, const X& x, T beta, Y&& y) {
    using S = scalar_of_t<Y>;
    const auto xv = view(x);
    const auto yv = view(y);
    check_same("ThrustBackend::axpby", xv, yv);
    using A = kernels::accum_t<S>;
    detail::launch("ThrustBackend::axpby", yv.size(),
                   kernels::axpby<S>{xv, yv, static_cast<A>(alpha), static_cast<A>(beta)});
  }

  template <class M, class T>
  static void fill(M&& m, T value) {
    using S = scalar_of_t<M>;
    const auto mv = view(m);
    detail::launch("ThrustBackend::fill", mv.size(), kernels::fill<S>{mv, static_cast<S>(value)});
  }

  /// dst = src; an owned dst takes src's shape, a view must already have it.
  template <class Src, class Dst>
  static void copy(const Src& src, Dst&& dst) {
    using S = scalar_of_t<Dst>;
    const auto sv = view(src);
    resize(dst, sv.rows(), sv.cols());
    const auto dv = view(dst);
    detail::launch("ThrustBackend::copy", dv.size(), kernels::copy<S>{sv, dv});
  }

  /// Y[i, :] += alpha * b^T for every row i (bias add); b is [cols, 1].
  template <class T, class Y, class V>
  static void add_to_rows(T alpha, const V& b, Y&& y) {
    using S = scalar_of_t<Y>;
    const auto bv = view(b);
    const auto yv = view(y);
    if (bv.cols() != 1 || bv.rows() != yv.cols())
      detail::raise<ShapeError>("ThrustBackend::add_to_rows: b is [", bv.rows(), ", ", bv.cols(),
                                 "], expected a vector of ", yv.cols(), " entries");
    detail::launch("ThrustBackend::add_to_rows", yv.size(),
                   kernels::add_to_rows<S>{bv, yv, static_cast<kernels::accum_t<S>>(alpha)});
  }

  /// db = beta db + alpha * sum over rows of G (bias gradient).
  template <class T, class G, class V>
  static void sum_rows(T alpha, const G& g, T beta, V&& db) {
    using S = scalar_of_t<V>;
    using A = kernels::accum_t<S>;
    const auto gv = view(g);
    if constexpr (detail::is_owned_device_matrix_v<std::remove_cvref_t<V>>)
      if (beta == T(0)) resize(db, gv.cols(), 1);
    const auto dv = view(db);
    if (dv.cols() != 1 || dv.rows() != gv.cols())
      detail::raise<ShapeError>("ThrustBackend::sum_rows: db is [", dv.rows(), ", ", dv.cols(),
                                 "], expected a vector of ", gv.cols(), " entries");
    detail::launch("ThrustBackend::sum_rows", gv.cols(),
                   kernels::sum_rows<S>{gv, dv, static_cast<A>(alpha), static_cast<A>(beta)});
  }

  /// Flat row-major index of the first non-finite element, or -1.
  template <class M>
  static index_t first_non_finite(const M& m) {
    using S = scalar_of_t<M>;
    const DeviceMatrixView<const S> mv = view(m);
    const index_t none = mv.size();
    if (none == 0) return -1;
    const index_t first = detail::device_call("ThrustBackend::first_non_finite", [&] {
      return thrust::transform_reduce(detail::thrust_policy(), thrust::counting_iterator<index_t>(0),
                                      thrust::counting_iterator<index_t>(none),
                                      kernels::non_finite_index<S>{mv, none}, none, kernels::min_index{});
    });
    return first == none ? -1 : first;
  }

  /// Element (flat row-major index) read back to the host for error messages.
  template <class M>
  static auto element(const M& m, index_t flat) {
    const auto mv = view(m);
    return detail::read_one(mv.data() + (flat / mv.cols()) * mv.stride() + flat % mv.cols());
  }

  /// Rows [start, start + count) as a view, writable when m is.
  template <class M>
  static auto middle_rows(M&& m, index_t start, index_t count) {
    const auto mv = view(m);
    using E = typename decltype(mv)::element_type;
    if (start < 0 || count < 0 || start + count > mv.rows())
      detail::raise<ShapeError>("ThrustBackend::middle_rows: rows [", start, ", ", start + count,
                                 ") of a matrix with ", mv.rows(), " rows");
    return DeviceMatrixView<E, dynamic, detail::static_cols_v<M>>{mv.data() + start * mv.stride(), count,
                                                                     mv.cols(), mv.stride()};
  }
  /// Columns [start, start + count) as a view (m's row stride kept), writable when m is.
  template <class M>
  static auto middle_cols(M&& m, index_t start, index_t count) {
    const auto mv = view(m);
    using E = typename decltype(mv)::element_type;
    if (start < 0 || count < 0 || start + count > mv.cols())
      detail::raise<ShapeError>("ThrustBackend::middle_cols: columns [", start, ", ", start + count,
                                 ") of a matrix with ", mv.cols(), " columns");
    return DeviceMatrixView<E, detail::static_rows_v<M>, dynamic>{mv.data() + start, mv.rows(), count, mv.stride()};
  }

  /// Fill with samples of `dist`: element at flat row-major index i draws
  /// counter i of (seed, stream), as every backend does.
  template <class M, class Dist>
  static void fill_random(M&& m, const Dist& dist, std::uint64_t seed, std::uint64_t stream) {
    using S = scalar_of_t<M>;
    const auto mv = view(m);
    detail::launch("ThrustBackend::fill_random", mv.size(), kernels::fill_random<S, Dist>{mv, dist, seed, stream});
  }

  /// A compile-time vector [k] seen as one row [1, k] (a single token).
  template <class V>
  static auto as_row(V&& v) {
    const auto vv = view(v);
    using E = typename decltype(vv)::element_type;
    if (vv.cols() != 1 || (vv.rows() > 1 && vv.stride() != 1))
      detail::raise<ShapeError>("ThrustBackend::as_row: expected a contiguous vector, got [", vv.rows(), ", ",
                                 vv.cols(), "] with row stride ", vv.stride());
    return DeviceMatrixView<E>{vv.data(), 1, vv.rows(), vv.rows()};
  }

  /// True when both operands have storage and their byte ranges intersect.
  template <class A, class B>
  static bool overlaps(const A& a, const B& b) {
    const auto av = view(a);
    const auto bv = view(b);
    if (av.size() == 0 || bv.size() == 0) return false;
    const auto bytes = [](const auto& m) {  // [first, one past last), strides included
      const auto* first = reinterpret_cast<const char*>(m.data());
      const auto* last = reinterpret_cast<const char*>(m.data() + (m.rows() - 1) * m.stride() + m.cols());
      return std::pair{first, last};
    };
    const auto [a0, a1] = bytes(av);
    const auto [b0, b1] = bytes(bv);
    return a0 < b1 && b0 < a1;
  }

  /// A host copy (RowMatrix) for host-only algorithms (SVD) and for users.
  template <class M>
  static RowMatrix<scalar_of_t<M>> to_host(const M& m) {
    using S = scalar_of_t<M>;
    const DeviceMatrixView<const S> mv = view(m);
    RowMatrix<S> host(mv.rows(), mv.cols());
    if (mv.size() == 0) return host;
    if (mv.contiguous()) {
      detail::device_call("thrust::copy_n (device to host)", [&] {
        thrust::copy_n(thrust::device_pointer_cast(mv.data()), mv.size(), host.data());
      });
    } else {  // gather the rows into one contiguous block first: one transfer
      DeviceMatrix<S> packed(mv.rows(), mv.cols());
      copy(mv, packed);
      detail::device_call("thrust::copy_n (device to host)", [&] {
        thrust::copy_n(packed.storage().begin(), packed.size(), host.data());
      });
    }
    return host;
  }
  /// m = host (any Eigen expression); an owned m takes host's shape.
  template <class H, class M>
  static void from_host(const H& host, M&& m) {
    using S = scalar_of_t<M>;
    using HT = std::remove_cvref_t<H>;
    // A host vector of S (the per-call id and table uploads of the gathered
    // layers): copied straight from its memory, no host temporary per call.
    if constexpr ((HT::RowsAtCompileTime == 1 || HT::ColsAtCompileTime == 1) && std::is_same_v<typename HT::Scalar, S> &&
                  (int(HT::Flags) & Eigen::DirectAccessBit) != 0) {
      if (host.innerStride() == 1) {
        resize(m, host.rows(), host.cols());
        const auto mv = view(m);
        if (mv.size() == 0) return;
        if (mv.contiguous()) {
          detail::device_call("thrust::copy_n (host to device)", [&] {
            thrust::copy_n(host.data(), host.size(), thrust::device_pointer_cast(mv.data()));
          });
          return;
        }
      }
    }
    // Evaluates expressions (casts, products); the source's static extents are
    // kept (a dynamic copy of a fixed 2x3 made GCC 12 warn about Eigen's packet loop).
    const RowMatrix<S, HT::RowsAtCompileTime, HT::ColsAtCompileTime> h = host;
    resize(m, h.rows(), h.cols());
    const auto mv = view(m);
    if (mv.size() == 0) return;
    if (mv.contiguous()) {
      detail::device_call("thrust::copy_n (host to device)", [&] {
        thrust::copy_n(h.data(), h.size(), thrust::device_pointer_cast(mv.data()));
      });
    } else {
      DeviceMatrix<S> packed(h.rows(), h.cols());
      detail::device_call("thrust::copy_n (host to device)",
                          [&] { thrust::copy_n(h.data(), h.size(), packed.storage().begin()); });
      copy(packed, mv);
    }
  }

  // ---- training primitives (mirroring EigenBackend's) ------------------------

  /// Pointer to the contiguous device storage of an owned matrix or vector.
  template <class M>
  static auto data(M&& m) {
    return m.data();
  }
  /// Number of elements.
  template <class M>
  static index_t size(const M& m) {
    return m.size();
  }
  /// f(i) for every i in [0, n) on the device system; f must be a
  /// LORA_HOST_DEVICE functor (the optimizers' updates are). Each index writes
  /// only its own element, so the result does not depend on the order.
  template <class F>
  static void for_each_index(index_t n, F f) {
    detail::launch("ThrustBackend::for_each_index", n, f);
  }
  /// sum of x[i]^2 over [0, n) in double (x is device memory).
  template <class T>
  static double squared_norm(const T* x, index_t n) {
    if (n <= 0) return 0.0;
    return detail::device_call("ThrustBackend::squared_norm", [&] {
      return thrust::transform_reduce(detail::thrust_policy(), thrust::counting_iterator<index_t>(0),
                                      thrust::counting_iterator<index_t>(n), kernels::squared<T>{x}, 0.0,
                                      kernels::plus_double{});
    });
  }
  /// Index of the first non-finite element of x[0, n), or -1.
  template <class T>
  static index_t first_non_finite(const T* x, index_t n) {
    if (n <= 0) return -1;
    const index_t first = detail::device_call("ThrustBackend::first_non_finite", [&] {
      return thrust::transform_reduce(detail::thrust_policy(), thrust::counting_iterator<index_t>(0),
                                      thrust::counting_iterator<index_t>(n), kernels::non_finite_flat<T>{x, n}, n,
                                      kernels::min_index{});
    });
    return first == n ? -1 : first;
  }
  /// x[i] read back to the host (error messages).
  template <class T>
  static T read(const T* x, index_t i) {
    return detail::read_one(x + i);
  }
  /// Inverted dropout with EigenBackend::dropout's counter-based mask:
  ///   Y = beta Y + alpha * keep(t, i) / (1 - p) * X   (X, Y [n, cols])
  template <class T, class X, class Y>
  static void dropout(T alpha, const X& x, T beta, Y&& y, double p, std::uint64_t seed, std::uint64_t stream) {
    using S = scalar_of_t<Y>;
    using A = kernels::accum_t<S>;
    const auto xv = view(x);
    const auto yv = view(y);
    check_same("ThrustBackend::dropout", xv, yv);
    const S kept = static_cast<S>(alpha) / static_cast<S>(1.0 - p);
    detail::launch("ThrustBackend::dropout", yv.size(),
                   kernels::dropout<S>{xv, yv, static_cast<A>(alpha), static_cast<A>(beta), kept, p, seed, stream});
  }

 private:
  static void check_product(const char* where, index_t am, index_t ak, index_t bk, index_t bn, index_t cm,
                            index_t cn) {
    if (ak != bk || am != cm || bn != cn)
      detail::raise<ShapeError>(where, ": op(A) is [", am, ", ", ak, "], op(B) is [", bk, ", ", bn,
                                 "] and C is [", cm, ", ", cn, "]; need C [m, n] = op(A) [m, k] op(B) [k, n]");
  }
  template <class X, class Y>
  static void check_same(const char* where, const X& x, const Y& y) {
    if (x.rows() != y.rows() || x.cols() != y.cols())
      detail::raise<ShapeError>(where, ": X is [", x.rows(), ", ", x.cols(), "] and Y is [", y.rows(), ", ",
                                 y.cols(), "]; both must have the same shape");
  }

  /// Row-major C (m, n) = beta C + alpha op(A) op(B), op(A) (m, k), op(B) (k, n);
  /// A, B, C are stored with rows lda, ldb, ldc elements apart.
  template <int K, class T, class S>
  static void gemm_impl(bool ta, bool tb, index_t m, index_t n, index_t k, T alpha, const S* a, index_t lda,
                        const S* b, index_t ldb, T beta, S* c, index_t ldc) {
    if (m == 0 || n == 0) return;
#if LORA_THRUST_CUBLAS
    if constexpr (cuda::blas_type_v<S>) {
      if (k > 0 && static_cast<double>(m) * static_cast<double>(n) * static_cast<double>(k) >=
                       static_cast<double>(LORA_THRUST_CUBLAS_MIN_MNK)) {
        cuda::gemm(ta, tb, m, n, k, kernels::accum_t<S>(alpha), a, lda, b, ldb, kernels::accum_t<S>(beta), c, ldc);
        return;
      }
    }
#endif
    using A = kernels::accum_t<S>;
    constexpr int TJ = 4;
    const index_t tiles = (n + TJ - 1) / TJ;
    const kernels::gemm<S, K, TJ> f{{a, ta ? 1 : lda, ta ? lda : 1},
                                    {b, tb ? 1 : ldb, tb ? ldb : 1},
                                    c,
                                    ldc,
                                    n,
                                    k,
                                    tiles,
                                    static_cast<A>(alpha),
                                    static_cast<A>(beta)};
    detail::launch("ThrustBackend::gemm", m * tiles, f);
  }
};

}  // namespace lora
