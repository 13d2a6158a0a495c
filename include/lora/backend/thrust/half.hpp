// backend/thrust/half.hpp: 16-bit base weights on the Thrust backend, the twin
// of backend/eigen/half.hpp. A frozen W stored as Eigen::bfloat16 or
// Eigen::half in device memory (DeviceMatrix<S>, or a DeviceMatrixView<const S>
// over the caller's buffer) under float adapters: storage scalar 16-bit,
// compute scalar float, W read in 16 bits and every sum in fp32.
//
//   auto gpu = lora::to_device(host_layer);   // AdaptedLinear<RowMatrix<Eigen::bfloat16>, ...>
//   lora::DeviceMatrix<Eigen::bfloat16> W = lora::to_device(W16);   // or just the weight (a byte copy)
//
// The Eigen types, not CUDA's: DeviceMatrix<__nv_bfloat16> stays a plain
// all-bf16 matrix (bf16 adapters and activations, cuBLAS on 16-bit operands),
// while DeviceMatrix<Eigen::bfloat16> is this 16-bit base under fp32 compute,
// exactly as RowMatrix<Eigen::bfloat16> is on the host. Widening is exact
// (Eigen's EIGEN_DEVICE_FUNC conversions under nvcc), so both backends sum the
// same fp32 values and differ only in summation order.
//
// The products are the generic functors of kernels.hpp with a 16-bit operand
// (kernels::gemm<float, K, 4, S, float>, kernels::axpby<float, S>) on every
// device system. Under nvcc with cuBLAS, products with m n k >=
// LORA_THRUST_CUBLAS_MIN_MNK (the dense products' rule) widen tiles of W's rows
// into fp32 scratch and call cuda::gemm on them. That CUDA code has been
// compiled, not run: the machine it was written on has no GPU.
#pragma once

#ifndef LORA_THRUST_UMBRELLA_INCLUDED
#error "Include <lora/thrust.hpp> instead of lora/backend/thrust/half.hpp."
#endif

#include <algorithm>
#include <type_traits>

#include "../../config.hpp"
#include "../../error.hpp"
#include "../eigen/half.hpp"
#include "../traits.hpp"
#include "backend.hpp"
#include "kernels.hpp"
#include "storage.hpp"

// Floats of W widened per tile before a cuBLAS product (CUDA only): 16 MiB
// of scratch, a quarter of a 4096^2 W. Untuned (no GPU to measure on).
#ifndef LORA_THRUST_HALF_TILE_FLOATS
#define LORA_THRUST_HALF_TILE_FLOATS (1 << 22)
#endif

namespace lora {

namespace detail {

template <class M>
struct device_half : std::false_type {};
template <class S, int R, int C>
struct device_half<DeviceMatrix<S, R, C>> : std::bool_constant<is_half_storage_v<S>> {};
template <class T, int R, int C>
struct device_half<DeviceMatrixView<T, R, C>> : std::bool_constant<is_half_storage_v<std::remove_const_t<T>>> {};

/// A 16-bit base on the Thrust backend: DeviceMatrix<S> or a DeviceMatrixView of S.
template <class M>
inline constexpr bool is_device_half_v = device_half<M>::value;

}  // namespace detail

/// A device matrix (owned or a view) of bfloat16 or half is a base weight read
/// in 16 bits with fp32 arithmetic, as RowMatrix<S> is on the host.
template <class M>
struct quantized_traits<M, std::enable_if_t<detail::is_device_half_v<M>>> {
  static constexpr bool known = true;
  using scalar = float;  ///< the compute scalar: adapters, activations, accumulation
  using storage = std::remove_const_t<typename matrix_traits<M>::scalar>;
  using backend = ThrustBackend;
  static constexpr int rows = matrix_traits<M>::rows;
  static constexpr int cols = matrix_traits<M>::cols;

  /// Y [n, nr] = beta Y + alpha X W[r0 : r0 + nr]^T.
  template <class X, class Y>
  static void gemm_nt(const M& q, index_t r0, index_t nr, float alpha, const X& x, float beta, Y& y) {
    const DeviceMatrixView<const storage> w = rows_of("gemm_nt", q, r0, nr);
    const DeviceMatrixView<const float> xv = view(x);
    const DeviceMatrixView<float> yv = view(y);
    if (xv.cols() != w.cols() || yv.rows() != xv.rows() || yv.cols() != nr)
      detail::raise<ShapeError>("quantized_traits<DeviceMatrix<16-bit>>::gemm_nt: X is [", xv.rows(), ", ",
                                 xv.cols(), "] and Y is [", yv.rows(), ", ", yv.cols(), "], expected X [n, ",
                                 w.cols(), "] and Y [n, ", nr, "]");
#if LORA_THRUST_CUBLAS
    if (widened_tiles(w, xv.rows(), [&](index_t t, DeviceMatrixView<const float> wt) {  // wt (tr, in)
          cuda::gemm(false, true, xv.rows(), wt.rows(), wt.cols(), alpha, xv.data(), xv.stride(), wt.data(),
                     wt.stride(), beta, yv.data() + t, yv.stride());
        }))
      return;
#endif
    // op(A) = X (n, in), op(B) = W^T (in, nr): element (p, j) is w[j * stride + p].
    product({xv.data(), xv.stride(), 1}, {w.data(), 1, w.stride()}, yv, w.cols(), alpha, beta);
  }

  /// dX [n, in] = beta dX + alpha G W[r0 : r0 + nr], G [n, nr].
  template <class G, class DX>
  static void gemm_nn(const M& q, index_t r0, index_t nr, float alpha, const G& g, float beta, DX& dx) {
    const DeviceMatrixView<const storage> w = rows_of("gemm_nn", q, r0, nr);
    const DeviceMatrixView<const float> gv = view(g);
    const DeviceMatrixView<float> dv = view(dx);
    if (gv.cols() != nr || dv.rows() != gv.rows() || dv.cols() != w.cols())
      detail::raise<ShapeError>("quantized_traits<DeviceMatrix<16-bit>>::gemm_nn: G is [", gv.rows(), ", ",
                                 gv.cols(), "] and dX is [", dv.rows(), ", ", dv.cols(), "], expected G [n, ", nr,
                                 "] and dX [n, ", w.cols(), "]");
#if LORA_THRUST_CUBLAS
    if (widened_tiles(w, gv.rows(), [&](index_t t, DeviceMatrixView<const float> wt) {  // wt (tr, in)
          cuda::gemm(false, false, gv.rows(), wt.cols(), wt.rows(), alpha, gv.data() + t, gv.stride(), wt.data(),
                     wt.stride(), t == 0 ? beta : 1.0f, dv.data(), dv.stride());
        }))
      return;
#endif
    product({gv.data(), gv.stride(), 1}, {w.data(), w.stride(), 1}, dv, nr, alpha, beta);
  }

  /// D [nr, in] = beta D + alpha float(W[r0 : r0 + nr]), one element per index.
  template <class D>
  static void assign(const M& q, index_t r0, index_t nr, float alpha, float beta, D& dst) {
    const DeviceMatrixView<const storage> w = rows_of("assign", q, r0, nr);
    const DeviceMatrixView<float> dv = view(dst);
    if (dv.rows() != nr || dv.cols() != w.cols())
      detail::raise<ShapeError>("quantized_traits<DeviceMatrix<16-bit>>::assign: D is [", dv.rows(), ", ",
                                 dv.cols(), "], expected [", nr, ", ", w.cols(), "]");
    detail::launch("quantized_traits<DeviceMatrix<16-bit>>::assign", dv.size(),
                   kernels::axpby<float, storage>{w, dv, alpha, beta});
  }

  /// Bytes W occupies (memory accounting): 2 per weight.
  static double storage_bytes(const M& q) { return double(q.size()) * double(sizeof(storage)); }

 private:
  /// Rows [r0, r0 + nr) of W as a view (checked).
  static DeviceMatrixView<const storage> rows_of(const char* fn, const M& q, index_t r0, index_t nr) {
    const DeviceMatrixView<const storage> w = view(q);
    if (r0 < 0 || nr < 0 || r0 + nr > w.rows())
      detail::raise<ShapeError>("quantized_traits<DeviceMatrix<16-bit>>::", fn, ": rows [", r0, ", ", r0 + nr,
                                 ") are outside [0, ", w.rows(), ")");
    return {w.data() + r0 * w.stride(), nr, w.cols(), w.stride()};
  }

  /// C (m, n) = beta C + alpha op(A) (m, k) op(B) (k, n), op(B) read in 16 bits.
  static void product(kernels::operand<float> a, kernels::operand<storage> b, DeviceMatrixView<float> c, index_t k,
                      float alpha, float beta) {
    constexpr int TJ = 4;
    const index_t tiles = (c.cols() + TJ - 1) / TJ;
    detail::launch("quantized_traits<DeviceMatrix<16-bit>>::gemm", c.rows() * tiles,
                   kernels::gemm<float, dynamic, TJ, storage, float>{a, b, c.data(), c.stride(), c.cols(), k, tiles,
                                                                       alpha, beta});
  }

#if LORA_THRUST_CUBLAS
  /// When n nr in is at least LORA_THRUST_CUBLAS_MIN_MNK: f(t, wt) for tiles wt
  /// (tr, in) of W's rows [t, t + tr) widened to fp32, in order (gemm_nn
  /// accumulates over them). The scratch is stream-ordered (cudaMallocAsync on
  /// the current stream), so calls on other streams never share it. Returns
  /// false (nothing done) below the threshold. Compiled, never run here.
  template <class F>
  static bool widened_tiles(DeviceMatrixView<const storage> w, index_t n, F&& f) {
    const index_t nr = w.rows(), in = w.cols();
    if (nr == 0 || in == 0 ||
        double(n) * double(nr) * double(in) < static_cast<double>(LORA_THRUST_CUBLAS_MIN_MNK))
      return false;
    const index_t tile = std::min<index_t>(nr, std::max<index_t>(1, index_t(LORA_THRUST_HALF_TILE_FLOATS) / in));
    struct scratch {  // freed on every exit, exceptions included
      float* p = nullptr;
      ~scratch() {
        if (p) (void)cudaFreeAsync(p, cuda::current_stream());
      }
    } buf;
    LORA_CUDA_CHECK(cudaMallocAsync(reinterpret_cast<void**>(&buf.p), sizeof(float) * std::size_t(tile * in),
                                    cuda::current_stream()));
    for (index_t t = 0; t < nr; t += tile) {
      const index_t tr = std::min(tile, nr - t);
      const DeviceMatrixView<float> wt(buf.p, tr, in);
      const DeviceMatrixView<const storage> src(w.data() + t * w.stride(), tr, in, w.stride());
      detail::launch("quantized_traits<DeviceMatrix<16-bit>>: widen W", wt.size(),
                     kernels::axpby<float, storage>{src, wt, 1.0f, 0.0f});
      f(t, wt);
    }
    return true;
  }
#endif
};

}  // namespace lora
