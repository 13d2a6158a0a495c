// backend/eigen/packed.hpp: PackedMatrix, a frozen fp32 base weight stored once
// in the layout of this backend's own GEMM micro-kernel, and its
// quantized_traits, so it is a base weight of AdaptedLinear like an NF4 one:
//
//   lora::AdaptedLinear layer{lora::PackedMatrix(W), lora::LowRankDelta<float, 8>(out, in)};
//
// Why: from ~128 tokens on the base products are SGEMMs, and Eigen's GEMM packs
// W into its kernel's layout again on every call (64 MiB read and written per
// call at 4096^2) and then runs at ~85 % of MKL's speed on this machine kind.
// A frozen W never changes, so it is packed once here (the layer owns only the
// packed copy: no duplicate of W) and the forward (Y = X W^T) and the
// backward's dX = G W both read it through register-blocked outer-product
// kernels. The figures are in docs/benchmarks.md (issue 17); the packed base is
// opt-in, a plain matrix base keeps the skinny kernels and Eigen's GEMM.
//
// Layout: panels of 32 rows of W (32 outputs); panel p holds, for each input
// column k in turn, the 32 values W[32 p + j, k] (j = 0..31) contiguously, the
// last panel zero-padded. Forward: 32 outputs x MR tokens of accumulators; per
// input column two vector loads from the panel and MR broadcasts of X (packed
// once per call, tokens interleaved by tile). Backward: the same kernel with the roles
// turned: 32 tokens (G^T, packed per call) x MR input columns, the broadcasts
// from the panel (P[p][i][j] over the 32 outputs j of a panel).
//
// Like NF4Matrix it is frozen: merge() into it is refused at compile time;
// merged_weight() / to_dense() return a dense W.
#pragma once

#ifndef LORA_UMBRELLA_INCLUDED
#error "Include <lora/lora.hpp> instead of lora/backend/eigen/packed.hpp."
#endif

#include <Eigen/Core>
#include <algorithm>
#include <cstddef>
#include <cstdlib>
#include <new>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "../../error.hpp"
#include "backend.hpp"
#include "microkernel.hpp"
#include "products.hpp"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace lora {

namespace detail::packed {
/// Storage of a packed W: 64-byte aligned, and from 2 MiB on in 2 MiB-aligned
/// blocks advised for transparent huge pages (Linux; the default "madvise"
/// mode gives them only where asked), asked before the first touch. The
/// kernels walk W panel by panel, 512 KiB apart at in = 4096: with 4 KiB pages
/// every such jump is a TLB miss, and which pages a 64 MiB W got made its
/// speed vary from run to run by up to 2x at 16 tokens.
template <class T>
struct HugePageAllocator {
  using value_type = T;
  HugePageAllocator() = default;
  template <class U>
  HugePageAllocator(const HugePageAllocator<U>&) {}
  T* allocate(std::size_t n) {
    constexpr std::size_t huge = std::size_t(2) << 20, line = 64;
    const std::size_t bytes = std::max<std::size_t>(n * sizeof(T), 1);
    const std::size_t align = bytes >= huge ? huge : line, size = (bytes + align - 1) / align * align;
    void* p = std::aligned_alloc(align, size);
    if (!p) throw std::bad_alloc();
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    if (align == huge) ::madvise(p, size, MADV_HUGEPAGE);  // advice only: failure changes nothing
#endif
    return static_cast<T*>(p);
  }
  void deallocate(T* p, std::size_t) noexcept { std::free(p); }
  template <class U>
  bool operator==(const HugePageAllocator<U>&) const noexcept {
    return true;
  }
};
}  // namespace detail::packed

/// A frozen fp32 weight W [out, in] packed once for the CPU GEMM kernels
/// (see the file comment). Owns its storage; copyable and movable.
class PackedMatrix {
 public:
  using Scalar = float;
  using dense_matrix = RowMatrix<float>;
  /// Rows of W (outputs) per panel: the micro-kernel's width (microkernel.hpp).
  static constexpr index_t panel_rows = detail::packed::panel;

  PackedMatrix() = default;

  /// Packs W [out, in] (any fp32 Eigen matrix or expression; a row-major
  /// matrix or Map is read in place).
  template <class Derived>
  explicit PackedMatrix(const Eigen::MatrixBase<Derived>& w)
      : rows_(w.rows()), cols_(w.cols()), data_(static_cast<std::size_t>(panels() * panel_rows * w.cols())) {
    static_assert(std::is_same_v<typename Derived::Scalar, float>,
                  "lora::PackedMatrix: W must be fp32 (the packed kernels are single precision); use "
                  "W.template cast<float>() or keep a plain matrix base");
    const Eigen::Ref<const dense_matrix, 0, Eigen::OuterStride<>> src(w.derived());
    const index_t count = panels();
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if (count > 1 && !omp_in_parallel())
#endif
    for (index_t p = 0; p < count; ++p) {
      const index_t r = std::min(panel_rows, rows_ - p * panel_rows);
      Eigen::Map<dense_matrix> dst(data_.data() + p * panel_rows * cols_, cols_, panel_rows);  // (in, 32)
      dst.leftCols(r) = src.middleRows(p * panel_rows, r).transpose();
      if (r < panel_rows) dst.rightCols(panel_rows - r).setZero();
    }
  }

  index_t rows() const { return rows_; }
  index_t cols() const { return cols_; }
  index_t size() const { return rows_ * cols_; }
  /// Panels of 32 rows (the last one padded with zeros).
  index_t panels() const { return (rows_ + panel_rows - 1) / panel_rows; }
  /// Panel p: cols() groups of 32 floats, W[32 p + j, k] at [k * 32 + j].
  const float* panel(index_t p) const { return data_.data() + p * panel_rows * cols_; }
  /// Element (r, c) of W (slow: for tests and spot checks).
  float operator()(index_t r, index_t c) const { return panel(r / panel_rows)[c * panel_rows + r % panel_rows]; }

  /// The dense W [out, in] (PyTorch layout).
  dense_matrix to_dense() const {
    dense_matrix w(rows_, cols_);
    for (index_t p = 0; p < panels(); ++p) {
      const index_t r = std::min(panel_rows, rows_ - p * panel_rows);
      w.middleRows(p * panel_rows, r) =
          Eigen::Map<const dense_matrix>(panel(p), cols_, panel_rows).leftCols(r).transpose();
    }
    return w;
  }

  /// Bytes held, padding included (memory accounting).
  std::size_t storage_bytes() const { return data_.size() * sizeof(float); }

 private:
  index_t rows_ = 0, cols_ = 0;
  std::vector<float, detail::packed::HugePageAllocator<float>> data_;
};

namespace detail::packed {

/// Y [n, nr] = beta Y + alpha X W[r0 : r0 + nr]^T; X [n, in] and Y row-major
/// with unit column stride. The panels are read where they are.
inline void gemm_nt(const PackedMatrix& w, index_t r0, index_t nr, float alpha, const float* x, index_t ldx,
                    index_t n, float beta, float* y, index_t ldy) {
  const index_t k = w.cols();
  // One tile of tokens: no depth blocks, so each panel streams from memory in
  // one run (X, at most 12 x in floats, stays in L2 anyway).
  const index_t block = n <= tile_rows ? k : depth_block;
  forward_panels(
      [&](index_t p0, index_t, index_t k0, index_t) { return std::pair<const float*, index_t>(w.panel(p0) + k0 * panel, k * panel); },
      k, r0, nr, block, alpha, x, ldx, n, beta, y, ldy);
}

/// gemm_nn below with the tokens as the vector lanes, Lanes of them per
/// token panel (32: two vectors; one vector's width for a few tokens).
template <int Lanes>
void gemm_nn_lanes(const PackedMatrix& w, index_t r0, index_t nr, float alpha, const float* g, index_t ldg,
                   index_t n, float beta, float* dx, index_t lddx) {
  constexpr int Vecs = Lanes / S::width;
  static_assert(Vecs >= 1 && Lanes % S::width == 0, "token panels are whole vectors");
  const index_t k = w.cols();
  const index_t p_first = r0 / panel, p_last = (r0 + nr + panel - 1) / panel, r1 = r0 + nr;
  constexpr index_t block_panels = depth_block / panel;
  const index_t tps = (n + Lanes - 1) / Lanes;  // panels of Lanes tokens
  const index_t ob_max = std::min(block_panels, p_last - p_first);
  thread_local buffer gbuf, dbuf;
  float* gt = scratch(gbuf, tps * ob_max * panel * Lanes);  // G^T block: [token panel][o][Lanes tokens]
  float* dt = scratch(dbuf, tps * k * Lanes);               // dX^T: [token panel][i][Lanes tokens]

  parallel(2.0 * double(n) * double(nr) * double(k), [&](int th, int nt) {
    index_t ia, ib;
    share(k, rows_for<Vecs>, th, nt, ia, ib);
    for (index_t pb0 = p_first; pb0 < p_last; pb0 += block_panels) {
      const index_t pb1 = std::min(p_last, pb0 + block_panels), depth = (pb1 - pb0) * panel;
      const bool first = pb0 == p_first;
      index_t ta, tb;
      share(tps, 1, th, nt, ta, tb);
      for (index_t tp = ta; tp < tb; ++tp)
        for (index_t t = 0; t < Lanes; ++t) {
          const index_t tok = tp * Lanes + t;
          float* dst = gt + tp * depth * Lanes + t;
          const index_t o0 = pb0 * panel;
          for (index_t q = 0; q < depth; ++q) {
            const index_t o = o0 + q;
            dst[q * Lanes] = tok < n && o >= r0 && o < r1 ? g[tok * ldg + (o - r0)] : 0.0f;
          }
        }
      sync(nt);  // G^T's block is complete
      for_tiles<rows_for<Vecs>>(ib - ia, [&]<int M>(index_t off) {
        const index_t i = ia + off;
        for (index_t tp = 0; tp < tps; ++tp) {
          float out[M][Lanes];  // the block's panels in turn: b(t, j) = P[p][i + t][j]
          tile<M, Vecs>(w.panel(pb0) + i * panel, 1, panel, k * panel, gt + tp * depth * Lanes, Lanes, panel,
                        pb1 - pb0, out);
          for (int t = 0; t < M; ++t) update_row(dt + (tp * k + i + t) * Lanes, out[t], Lanes, 1.0f, first ? 0.0f : 1.0f);
        }
      });
      sync(nt);  // before the next block of G^T is packed
    }
    untranspose<Lanes>(dt, k, n, ia, ib, alpha, beta, dx, lddx);  // dX from dX^T, this thread's columns
  });
}

/// dX [n, in] = beta dX + alpha G W[r0 : r0 + nr]; G [n, nr] and dX row-major
/// with unit column stride. The tokens are the vector lanes: up to one
/// vector's width of tokens (16 with AVX-512) take panels of one vector and
/// tiles of 16 columns, not half-empty panels of 32 (at 16 tokens the 32-lane
/// kernel cost what 32 tokens cost).
inline void gemm_nn(const PackedMatrix& w, index_t r0, index_t nr, float alpha, const float* g, index_t ldg,
                    index_t n, float beta, float* dx, index_t lddx) {
  const index_t k = w.cols();
  if (n == 0 || k == 0) return;
  if (nr == 0) return scale_rows(beta, dx, lddx, n, k);
  if (n <= S::width)
    gemm_nn_lanes<S::width>(w, r0, nr, alpha, g, ldg, n, beta, dx, lddx);
  else
    gemm_nn_lanes<int(panel)>(w, r0, nr, alpha, g, ldg, n, beta, dx, lddx);
}

/// D [nr, in] = beta D + alpha W[r0 : r0 + nr] (row-major D with unit column stride).
inline void assign(const PackedMatrix& w, index_t r0, index_t nr, float alpha, float beta, float* d, index_t ldd) {
  for (index_t r = 0; r < nr; ++r) {
    const index_t o = r0 + r;
    const float* src = w.panel(o / panel) + o % panel;
    float* dst = d + r * ldd;
    for (index_t c = 0; c < w.cols(); ++c)
      dst[c] = (beta == 0.0f ? 0.0f : beta * dst[c]) + alpha * src[c * panel];
  }
}

/// f(view) with a row-major, unit-column-stride view of m: m itself where it
/// has that layout, else a row-major copy (written back when `write`).
template <class M, class F>
void with_view(M& m, bool write, F&& f) {
  using Plain = std::remove_cvref_t<M>;
  if constexpr (eigen::viewable_v<Plain, float>) {
    if (eigen::fits_view(m)) {
      f(m.data(), eigen::row_stride(m));
      return;
    }
  }
  RowMatrix<float> tmp = m;
  f(tmp.data(), tmp.cols() > 0 ? tmp.cols() : index_t(1));
  if constexpr (!std::is_const_v<std::remove_reference_t<M>>)
    if (write) m = tmp;
}

}  // namespace detail::packed

template <>
struct quantized_traits<PackedMatrix> {
  static constexpr bool known = true;
  using scalar = float;
  using backend = EigenBackend;
  static constexpr int rows = dynamic;
  static constexpr int cols = dynamic;

  /// Y [n, nr] = beta Y + alpha X W[r0 : r0 + nr]^T.
  template <class X, class Y>
  static void gemm_nt(const PackedMatrix& q, index_t r0, index_t nr, float alpha, const X& x, float beta, Y& y) {
    detail::packed::with_view(x, false, [&](const float* xd, index_t ldx) {
      detail::packed::with_view(y, true, [&](float* yd, index_t ldy) {
        detail::packed::gemm_nt(q, r0, nr, alpha, xd, ldx, x.rows(), beta, yd, ldy);
      });
    });
  }
  /// dX [n, in] = beta dX + alpha G W[r0 : r0 + nr], G [n, nr].
  template <class G, class DX>
  static void gemm_nn(const PackedMatrix& q, index_t r0, index_t nr, float alpha, const G& g, float beta, DX& dx) {
    detail::packed::with_view(g, false, [&](const float* gd, index_t ldg) {
      detail::packed::with_view(dx, true, [&](float* dd, index_t ldd) {
        detail::packed::gemm_nn(q, r0, nr, alpha, gd, ldg, g.rows(), beta, dd, ldd);
      });
    });
  }
  /// D [nr, in] = beta D + alpha W[r0 : r0 + nr].
  template <class D>
  static void assign(const PackedMatrix& q, index_t r0, index_t nr, float alpha, float beta, D& dst) {
    detail::packed::with_view(dst, true, [&](float* d, index_t ldd) { detail::packed::assign(q, r0, nr, alpha, beta, d, ldd); });
  }
  static double storage_bytes(const PackedMatrix& q) { return double(q.storage_bytes()); }
};

}  // namespace lora
