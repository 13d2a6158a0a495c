// backend/thrust/nf4.hpp: NF4 base weights on the Thrust backend (QLoRA on the
// device). DeviceNF4Matrix keeps bitsandbytes' compressed layout in device
// memory (4-bit codes, block scales, double-quantised or not); the products
// decode W on the fly in LORA_HOST_DEVICE functors and never hold it in fp32.
//
//   lora::DeviceNF4Matrix Wq = lora::to_device(host_nf4);   // bytes uploaded once
//   lora::AdaptedLinear layer{std::move(Wq), lora::LowRankDelta<float, 8, lora::ThrustBackend>{out, in}};
//   auto gpu = lora::to_device(host_qlora_layer);              // the whole layer
//
// Decoding uses nf4::decode / nf4::decode_scale, the host's roundings, so
// dequantised values are bit-identical to NF4Matrix::dequantize() on every
// device system. Under nvcc, gemm_nt with n <= 16 tokens runs the warp-per-row
// kernel of backend/cuda/nf4.hpp instead of the generic functor.
#pragma once

#ifndef LORA_THRUST_UMBRELLA_INCLUDED
#error "Include <lora/thrust.hpp> instead of lora/backend/thrust/nf4.hpp."
#endif

#include <thrust/copy.h>
#include <thrust/device_vector.h>

#include <bit>
#include <cstdint>
#include <cstring>
#include <span>
#include <utility>
#include <vector>

#include "../../config.hpp"
#include "../../error.hpp"
#include "../../quant/nf4.hpp"
#include "../traits.hpp"
#include "backend.hpp"
#include "kernels.hpp"
#include "storage.hpp"

// Under nvcc: 1 = gemm_nt with few tokens takes the hand-written CUDA kernel,
// 0 = every product takes the Thrust functors (to compare the two).
#ifndef LORA_THRUST_NF4_CUDA_KERNEL
#define LORA_THRUST_NF4_CUDA_KERNEL 1
#endif

namespace lora {

namespace kernels {

/// Y (n, nr) = beta Y + alpha X W[r0 : r0 + nr]^T. Index = one row j of the
/// slice and a tile of TT tokens: the row is decoded once per tile, block by
/// block (one scale per block), in flat order.
template <int TT>
struct nf4_gemm_nt {
  nf4::PackedView w;
  DeviceMatrixView<const float> x;  // (n, in)
  DeviceMatrixView<float> y;        // (n, nr)
  index_t r0, token_tiles;
  float alpha, beta;

  LORA_HOST_DEVICE void operator()(index_t idx) const {
    const index_t j = idx / token_tiles;
    const index_t t0 = (idx % token_tiles) * TT;
    if (t0 + TT <= x.rows()) {
      row<TT>(j, t0);
    } else {
      for (index_t t = t0; t < x.rows(); ++t) row<1>(j, t);
    }
  }

 private:
  template <int W>
  LORA_HOST_DEVICE void row(index_t j, index_t t0) const {
    float acc[W] = {};
    const index_t f0 = (r0 + j) * w.cols, f_end = f0 + w.cols;
    for (index_t f = f0; f < f_end;) {
      const index_t b = f >> w.shift;
      const index_t block_end = (b + 1) << w.shift;
      const index_t seg_end = block_end < f_end ? block_end : f_end;
      const float s = w.scale(b);
      for (; f < seg_end; ++f) {
        const float v = nf4::decode(nf4::nibble(w.packed, f), s);
        LORA_UNROLL
        for (int t = 0; t < W; ++t) acc[t] += v * x(t0 + t, f - f0);
      }
    }
    LORA_UNROLL
    for (int t = 0; t < W; ++t) store(y(t0 + t, j), alpha * acc[t], beta);
  }
};

/// dX (n, in) = beta dX + alpha G (n, nr) W[r0 : r0 + nr]. Index = one column c
/// and a tile of TT tokens (columns fastest: neighbouring indices read
/// neighbouring codes); the column is decoded once per tile, rows in order.
template <int TT>
struct nf4_gemm_nn {
  nf4::PackedView w;
  DeviceMatrixView<const float> g;  // (n, nr)
  DeviceMatrixView<float> dx;       // (n, in)
  index_t r0;
  float alpha, beta;

  LORA_HOST_DEVICE void operator()(index_t idx) const {
    const index_t c = idx % w.cols;
    const index_t t0 = (idx / w.cols) * TT;
    if (t0 + TT <= g.rows()) {
      column<TT>(c, t0);
    } else {
      for (index_t t = t0; t < g.rows(); ++t) column<1>(c, t);
    }
  }

 private:
  template <int W>
  LORA_HOST_DEVICE void column(index_t c, index_t t0) const {
    float acc[W] = {};
    for (index_t j = 0; j < g.cols(); ++j) {
      const float v = w.at((r0 + j) * w.cols + c);
      LORA_UNROLL
      for (int t = 0; t < W; ++t) acc[t] += g(t0 + t, j) * v;
    }
    LORA_UNROLL
    for (int t = 0; t < W; ++t) store(dx(t0 + t, c), alpha * acc[t], beta);
  }
};

/// D (nr, in) = beta D + alpha W[r0 : r0 + nr], one element per index.
struct nf4_assign {
  nf4::PackedView w;
  DeviceMatrixView<float> d;
  index_t r0;
  float alpha, beta;
  LORA_HOST_DEVICE void operator()(index_t idx) const {
    const index_t i = idx / d.cols(), c = idx % d.cols();
    store(d(i, c), alpha * w.at((r0 + i) * w.cols + c), beta);
  }
};

}  // namespace kernels

/// An [out, in] NF4 weight in device memory, in bitsandbytes' layout: the packed
/// codes and the scales (fp32 absmax, or with double quantisation the 8-bit
/// codes, absmax2 per 256 blocks, the offset and the 256-entry map), so it
/// takes the same 4.127 bits per parameter as on the host. Immutable; built by
/// uploading a host NF4Matrix. Copying copies the device buffers.
class DeviceNF4Matrix {
 public:
  DeviceNF4Matrix() = default;

  /// Uploads the host matrix's bytes (nothing is re-quantised).
  explicit DeviceNF4Matrix(const NF4Matrix& host)
      : rows_(host.rows()),
        cols_(host.cols()),
        block_size_(host.block_size()),
        double_quant_(host.double_quantized()),
        offset_(host.absmax_offset()) {
    detail::device_call("lora::DeviceNF4Matrix (upload)", [&] {
      upload(host.packed(), packed_);
      if (double_quant_) {
        upload(host.absmax_q8(), q8_);
        upload(host.absmax2(), absmax2_);
        upload(host.map8(), map8_);
      } else {
        upload(host.absmax(), absmax_);
      }
    });
  }

  index_t rows() const { return rows_; }
  index_t cols() const { return cols_; }
  index_t size() const { return rows_ * cols_; }
  index_t block_size() const { return block_size_; }
  bool double_quantized() const { return double_quant_; }
  index_t num_blocks() const { return (size() + block_size_ - 1) / block_size_; }
  float absmax_offset() const { return offset_; }

  /// Exact device bytes of codes and scales, counted as NF4Matrix::storage_bytes
  /// counts them (equal to the host matrix's); the 1 KiB map is not counted.
  std::size_t storage_bytes() const {
    const std::size_t scales =
        double_quant_ ? q8_.size() + sizeof(float) * absmax2_.size() + sizeof(float) : sizeof(float) * absmax_.size();
    return packed_.size() + scales;
  }
  double bits_per_parameter() const { return size() > 0 ? 8.0 * double(storage_bytes()) / double(size()) : 0.0; }

  /// Raw device storage, bitsandbytes' names in NF4Matrix's accessors.
  const thrust::device_vector<std::uint8_t>& packed() const { return packed_; }
  const thrust::device_vector<float>& absmax() const { return absmax_; }
  const thrust::device_vector<std::uint8_t>& absmax_q8() const { return q8_; }
  const thrust::device_vector<float>& absmax2() const { return absmax2_; }
  const thrust::device_vector<float>& map8() const { return map8_; }

  /// What the kernels carry.
  nf4::PackedView device_view() const {
    nf4::PackedView v;
    v.packed = thrust::raw_pointer_cast(packed_.data());
    v.absmax = double_quant_ ? nullptr : thrust::raw_pointer_cast(absmax_.data());
    v.q8 = double_quant_ ? thrust::raw_pointer_cast(q8_.data()) : nullptr;
    v.absmax2 = double_quant_ ? thrust::raw_pointer_cast(absmax2_.data()) : nullptr;
    v.map8 = double_quant_ ? thrust::raw_pointer_cast(map8_.data()) : nullptr;
    v.offset = offset_;
    v.rows = rows_;
    v.cols = cols_;
    v.shift = std::countr_zero(static_cast<std::uint64_t>(block_size_));
    v.double_quant = double_quant_;
    return v;
  }

  /// The dense fp32 matrix on the device (only when asked: 8x the memory).
  DeviceMatrix<float> dequantize() const;
  /// The dequantised matrix copied to the host (tests, debugging); bit-identical
  /// to NF4Matrix::dequantize() of the uploaded matrix.
  NF4Matrix::dense_matrix dequantize_to_host() const { return ThrustBackend::to_host(dequantize()); }

  /// The bytes back as a host NF4Matrix (the same bytes that were uploaded).
  NF4Matrix to_host() const {
    const auto packed = download(packed_);
    if (!double_quant_) return NF4Matrix::from_parts(rows_, cols_, block_size_, packed, download(absmax_));
    const auto map = download(map8_);
    // The built-in map stays "built-in" on the host (no private copy).
    const bool builtin = std::memcmp(map.data(), dynamic_map::signed_values, sizeof(float) * map.size()) == 0;
    return NF4Matrix::from_parts(rows_, cols_, block_size_, packed, download(q8_), download(absmax2_), offset_,
                                 builtin ? std::span<const float>{} : std::span<const float>(map));
  }

 private:
  template <class T>
  static void upload(std::span<const T> host, thrust::device_vector<T>& dev) {
    dev.resize(host.size());
    if (!host.empty()) thrust::copy_n(host.data(), host.size(), dev.begin());
  }
  template <class T>
  static std::vector<T> download(const thrust::device_vector<T>& dev) {
    std::vector<T> host(dev.size());
    detail::device_call("lora::DeviceNF4Matrix (download)", [&] {
      if (!host.empty()) thrust::copy_n(dev.begin(), dev.size(), host.data());
    });
    return host;
  }

  index_t rows_ = 0, cols_ = 0, block_size_ = nf4::default_block_size;
  bool double_quant_ = false;
  float offset_ = 0.0f;
  thrust::device_vector<std::uint8_t> packed_;
  thrust::device_vector<float> absmax_;
  thrust::device_vector<std::uint8_t> q8_;
  thrust::device_vector<float> absmax2_;
  thrust::device_vector<float> map8_;
};

/// Host NF4 -> device NF4 (the bytes, not re-quantised). With it, to_device /
/// to_host of a whole QLoRA AdaptedLinear work as for a dense base.
inline DeviceNF4Matrix to_device(const NF4Matrix& host) { return DeviceNF4Matrix(host); }
inline NF4Matrix to_host(const DeviceNF4Matrix& dev) { return dev.to_host(); }

}  // namespace lora

#if LORA_THRUST_ON_CUDA && LORA_THRUST_NF4_CUDA_KERNEL
#include "../cuda/nf4.hpp"
#endif

namespace lora {

/// QLoRA on the Thrust backend: the `dequantized` node's products over a
/// DeviceNF4Matrix, as quantized_traits<NF4Matrix> does on the host.
template <>
struct quantized_traits<DeviceNF4Matrix> {
  static constexpr bool known = true;
  using scalar = float;
  using backend = ThrustBackend;
  static constexpr int rows = dynamic;
  static constexpr int cols = dynamic;
  /// Tokens per register tile in the functors.
  static constexpr int token_tile = 4;

  /// Y [n, nr] = beta Y + alpha X W[r0 : r0 + nr]^T.
  template <class X, class Y>
  static void gemm_nt(const DeviceNF4Matrix& q, index_t r0, index_t nr, float alpha, const X& x, float beta, Y& y) {
    const DeviceMatrixView<const float> xv = view(x);
    const DeviceMatrixView<float> yv = view(y);
    check_rows("gemm_nt", q, r0, nr);
    if (xv.cols() != q.cols() || yv.rows() != xv.rows() || yv.cols() != nr)
      detail::raise<ShapeError>("quantized_traits<DeviceNF4Matrix>::gemm_nt: X is [", xv.rows(), ", ", xv.cols(),
                                 "] and Y is [", yv.rows(), ", ", yv.cols(), "], expected X [n, ", q.cols(),
                                 "] and Y [n, ", nr, "]");
#if LORA_THRUST_ON_CUDA && LORA_THRUST_NF4_CUDA_KERNEL
    if (cuda::NF4SmallGemmNT::can_implement(xv.rows(), nr)) {
      cuda::NF4SmallGemmNT::run(q.device_view(), r0, nr, alpha, xv, beta, yv);
      return;
    }
#endif
    gemm_nt_functor(q, r0, nr, alpha, xv, beta, yv);
  }

  /// dX [n, in] = beta dX + alpha G W[r0 : r0 + nr], G [n, nr].
  template <class G, class DX>
  static void gemm_nn(const DeviceNF4Matrix& q, index_t r0, index_t nr, float alpha, const G& g, float beta,
                      DX& dx) {
    const DeviceMatrixView<const float> gv = view(g);
    const DeviceMatrixView<float> dv = view(dx);
    check_rows("gemm_nn", q, r0, nr);
    if (gv.cols() != nr || dv.rows() != gv.rows() || dv.cols() != q.cols())
      detail::raise<ShapeError>("quantized_traits<DeviceNF4Matrix>::gemm_nn: G is [", gv.rows(), ", ", gv.cols(),
                                 "] and dX is [", dv.rows(), ", ", dv.cols(), "], expected G [n, ", nr,
                                 "] and dX [n, ", q.cols(), "]");
    const index_t tiles = (gv.rows() + token_tile - 1) / token_tile;
    detail::launch("quantized_traits<DeviceNF4Matrix>::gemm_nn", tiles * q.cols(),
                   kernels::nf4_gemm_nn<token_tile>{q.device_view(), gv, dv, r0, alpha, beta});
  }

  /// D [nr, in] = beta D + alpha W[r0 : r0 + nr].
  template <class D>
  static void assign(const DeviceNF4Matrix& q, index_t r0, index_t nr, float alpha, float beta, D& dst) {
    const DeviceMatrixView<float> dv = view(dst);
    check_rows("assign", q, r0, nr);
    if (dv.rows() != nr || dv.cols() != q.cols())
      detail::raise<ShapeError>("quantized_traits<DeviceNF4Matrix>::assign: D is [", dv.rows(), ", ", dv.cols(),
                                 "], expected [", nr, ", ", q.cols(), "]");
    detail::launch("quantized_traits<DeviceNF4Matrix>::assign", dv.size(),
                   kernels::nf4_assign{q.device_view(), dv, r0, alpha, beta});
  }

  /// gemm_nt through the generic functor on every system (CUDA included), so
  /// tests can compare the CUDA kernel with it.
  static void gemm_nt_functor(const DeviceNF4Matrix& q, index_t r0, index_t nr, float alpha,
                              DeviceMatrixView<const float> x, float beta, DeviceMatrixView<float> y) {
    const index_t tiles = (x.rows() + token_tile - 1) / token_tile;
    detail::launch("quantized_traits<DeviceNF4Matrix>::gemm_nt", nr * tiles,
                   kernels::nf4_gemm_nt<token_tile>{q.device_view(), x, y, r0, tiles, alpha, beta});
  }

 private:
  static void check_rows(const char* fn, const DeviceNF4Matrix& q, index_t r0, index_t nr) {
    if (r0 < 0 || nr < 0 || r0 + nr > q.rows())
      detail::raise<ShapeError>("quantized_traits<DeviceNF4Matrix>::", fn, ": rows [", r0, ", ", r0 + nr,
                                 ") are outside [0, ", q.rows(), ")");
  }
};

inline DeviceMatrix<float> DeviceNF4Matrix::dequantize() const {
  DeviceMatrix<float> d(rows_, cols_);
  quantized_traits<DeviceNF4Matrix>::assign(*this, 0, rows_, 1.0f, 0.0f, d);
  return d;
}

}  // namespace lora
