// backend/eigen/microkernel.hpp: the register-blocked outer-product kernel of
// the Eigen backend's own GEMMs (fp32): a tile of up to 12 rows times 32
// columns of accumulators (AVX-512; 3 x 32 with AVX2), per step two vector
// loads of a 32-wide row and 12 broadcasts. PackedMatrix (packed.hpp) runs its
// forward and backward through it, and products.hpp its rank-r updates
// (merge's W += s B A, the backward's dX += s (G B) A: rank_update below) and
// the backward's dX = G W for a few tokens over a plain W (skinny_nn below).
#pragma once

#ifndef LORA_UMBRELLA_INCLUDED
#error "Include <lora/lora.hpp> instead of lora/backend/eigen/microkernel.hpp."
#endif

#include <Eigen/Core>
#include <algorithm>
#include <cstring>
#include <utility>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

#include "../../config.hpp"
#include "skinny.hpp"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace lora::detail::packed {

using S = skinny::simd<float>;
using V = S::type;
/// Floats per panel row: the outputs (W rows) of one tile.
inline constexpr index_t panel = 32;
/// Vectors per panel row of 32 floats (2 with AVX-512).
inline constexpr int vecs = int(panel) / S::width;
/// Tile rows for rows of Vecs vectors: up to 3/4 of the vector registers hold
/// accumulators (AVX-512: 12 x 2 or 16 x 1; AVX2: 3 x 4 of 16). At most 16
/// rows: GCC peels loops of up to 16 trips whole, and a 24-row tile's
/// accumulators stayed in memory (a load, FMA and store per step: half speed).
template <int Vecs>
inline constexpr int rows_for = std::min(16, std::max(1, (skinny::simd_bytes == 64 ? 24 : 12) / Vecs));
/// Tokens (forward) or input columns (backward) per tile of 32-float rows.
inline constexpr int tile_rows = rows_for<vecs>;
/// Depth per block: a tile's broadcast operand (tile_rows x 256 floats, 12 KiB)
/// stays in L1 while a block of panels (16 x 256 x 32 floats, 512 KiB) stays in L2.
inline constexpr index_t depth_block = 256;
inline constexpr index_t panel_block = 16;

/// acc + s * w with a fused multiply-add: the vector extensions' a * b + c is
/// contracted only under -ffp-contract=fast, which ISO -std=c++20 turns off.
LORA_FORCE_INLINE V fma(float s, V w, V acc) {
#if defined(__AVX512F__)  // V is 64 bytes (skinny::simd_bytes)
  return V(_mm512_fmadd_ps(_mm512_set1_ps(s), __m512(w), __m512(acc)));
#elif defined(__AVX__) && defined(__FMA__)  // V is 32 bytes
  return V(_mm256_fmadd_ps(_mm256_set1_ps(s), __m256(w), __m256(acc)));
#else
  return acc + s * w;
#endif
}

/// One step q of tile(): acc[t][:] += b(t, q) * v(q).
template <int M, int Vecs>
LORA_FORCE_INLINE void step(V (&acc)[M][Vecs], const float* __restrict b, index_t bs, index_t bt,
                            const float* __restrict v, index_t vs, index_t q) {
  V w[Vecs];
  for (int u = 0; u < Vecs; ++u) w[u] = S::load(v + q * vs + u * S::width);
  for (int t = 0; t < M; ++t) {
    const float s = b[q * bs + t * bt];
    for (int u = 0; u < Vecs; ++u) acc[t][u] = fma(s, w[u], acc[t][u]);
  }
}

/// out[t][:] = sum over `segments` runs of `depth` steps q of b(t, q) * v(q),
/// v(q) = Vecs vectors (32 floats by default) at v + q * vs (runs follow one
/// another in v; vs = 32 in a packed panel, a row stride in a plain matrix),
/// b(t, q) = b[q * bs + t * bt] (broadcast), b advancing by b_next per run.
/// The accumulators are this function's locals, written out once at fixed
/// indices: held across calls or indexed at run time, GCC kept them in memory
/// and stored all 24 on every step (half speed). One or two rows (a token or
/// two) take 4 or 2 independent chains: with 2 or 4 accumulators the FMA's
/// latency, not its throughput, would bound the stream of W.
template <int M, int Vecs = vecs>
LORA_FORCE_INLINE void tile(const float* __restrict b, index_t bs, index_t bt, index_t b_next,
                            const float* __restrict v, index_t vs, index_t depth, index_t segments,
                            float (&out)[M][Vecs * S::width]) {
  constexpr int C = M == 1 ? 4 : M == 2 ? 2 : 1;
  V acc[C][M][Vecs];
  for (int c = 0; c < C; ++c)
    for (int t = 0; t < M; ++t)
      for (int u = 0; u < Vecs; ++u) acc[c][t][u] = V{};
  for (index_t sg = 0; sg < segments; ++sg, b += b_next, v += depth * vs) {
    index_t q = 0;
    for (; q + C <= depth; q += C)
      for (int c = 0; c < C; ++c) step<M, Vecs>(acc[c], b, bs, bt, v, vs, q + c);
    for (; q < depth; ++q) step<M, Vecs>(acc[0], b, bs, bt, v, vs, q);
  }
  for (int c = 1; c < C; ++c)
    for (int t = 0; t < M; ++t)
      for (int u = 0; u < Vecs; ++u) acc[0][t][u] += acc[c][t][u];
  for (int t = 0; t < M; ++t)
    for (int u = 0; u < Vecs; ++u) std::memcpy(out[t] + u * S::width, &acc[0][t][u], sizeof(V));
}

/// dst[j] = beta dst[j] + alpha src[j] for j < width; beta = 0 does not read
/// dst (NaN there does not leak). Plain loops, not vector types: a whole
/// panel's constant trip count vectorises, and nvcc (whose device pass sees
/// these headers in .cu TUs) stopped with "Internal Compiler Error: unsupported
/// aggregate constant" on the vector-typed form of this update.
LORA_FORCE_INLINE void update_row(float* dst, const float* src, index_t width, float alpha, float beta) {
  if (width == panel) {
    if (beta == 0.0f)
      for (int j = 0; j < int(panel); ++j) dst[j] = alpha * src[j];
    else
      for (int j = 0; j < int(panel); ++j) dst[j] = beta * dst[j] + alpha * src[j];
  } else {
    if (beta == 0.0f)
      for (index_t j = 0; j < width; ++j) dst[j] = alpha * src[j];
    else
      for (index_t j = 0; j < width; ++j) dst[j] = beta * dst[j] + alpha * src[j];
  }
}

/// f.template operator()<M>(offset) over [0, count) in tiles of Rows (12 by
/// default, or 16), the rest in tiles of 8, 4, 2, 1 below it (no padding work
/// for a few tokens).
template <int Rows = tile_rows, class F>
LORA_FORCE_INLINE void for_tiles(index_t count, F&& f) {
  static_assert(Rows <= 16, "the tails below cover up to 15 rows");
  index_t i = 0;
  for (; i + Rows <= count; i += Rows) f.template operator()<Rows>(i);
  if constexpr (Rows > 8)
    if (i + 8 <= count) f.template operator()<8>(i), i += 8;
  if constexpr (Rows > 4)
    if (i + 4 <= count) f.template operator()<4>(i), i += 4;
  if constexpr (Rows > 2)
    if (i + 2 <= count) f.template operator()<2>(i), i += 2;
  if constexpr (Rows > 1)
    if (i + 1 <= count) f.template operator()<1>(i), i += 1;
}

using buffer = std::vector<float, Eigen::aligned_allocator<float>>;

inline float* scratch(buffer& buf, index_t n) {
  if (buf.size() < static_cast<std::size_t>(n)) buf.resize(static_cast<std::size_t>(n));
  return buf.data();
}

/// The per-thread buffers of forward_panels: the broadcast operand packed per
/// call (tokens, or G's rows in the backward), and one group of panels packed
/// as it comes (512 KiB). One of each per thread, whichever product (forward,
/// backward, plain or packed W) uses it: as locals of each instantiation they
/// were one more copy of up to 16 MiB each.
inline buffer& operand_buffer() {
  thread_local buffer b;
  return b;
}
inline buffer& group_buffer() {
  thread_local buffer b;
  return b;
}

/// dst[q][j] = src[q * ld + j] for `rows` rows q, j < width, zero for
/// width <= j < 32: a 32-wide column panel of a row-major matrix in the
/// micro-kernel's [q][32] layout (the last panel padded).
inline void copy_panel(const float* src, index_t ld, index_t rows, index_t width, float* dst) {
  for (index_t q = 0; q < rows; ++q) {
    std::memcpy(dst + q * panel, src + q * ld, std::size_t(width) * sizeof(float));
    std::fill(dst + q * panel + width, dst + (q + 1) * panel, 0.0f);
  }
}

/// [begin, end) of `count` items in `unit`-aligned shares, share `t` of `nt`.
inline void share(index_t count, index_t unit, int t, int nt, index_t& begin, index_t& end) {
  const index_t units = (count + unit - 1) / unit;
  begin = std::min(count, units * t / nt * unit);
  end = std::min(count, units * (t + 1) / nt * unit);
}

/// Runs f(thread, threads) on every OpenMP thread when the work is worth a
/// parallel region and none is running; else f(0, 1). f splits its loops by
/// (thread, threads) itself and waits with sync(threads): an orphaned `omp
/// for` or barrier would bind to a caller's parallel region (the
/// multi-adapter layer runs products from its threads) and split or block
/// work that is not shared.
template <class F>
void parallel(double flops, F&& f) {
#ifdef _OPENMP
  if (flops >= 1e6 && !omp_in_parallel() && omp_get_max_threads() > 1) {
#pragma omp parallel
    f(omp_get_thread_num(), omp_get_num_threads());
    return;
  }
#endif
  (void)flops;
  f(0, 1);
}

/// The barrier of parallel()'s region; nothing on one thread.
inline void sync(int threads) {
  if (threads > 1) {
#ifdef _OPENMP
#pragma omp barrier
#endif
  }
}

inline void scale_rows(float beta, float* y, index_t ldy, index_t rows, index_t cols) {
  for (index_t t = 0; t < rows; ++t)
    for (index_t c = 0; c < cols; ++c) y[t * ldy + c] = beta == 0.0f ? 0.0f : beta * y[t * ldy + c];
}

/// C [m, n] = beta C + alpha A [m, k] B [k, n] for a small depth k (a rank-k
/// update: merge's W += s B A, the backward's dX += s (G B) A; and, A
/// transposed, the backward's dB = s G^T H), B and C row-major with unit
/// column stride, A (i, q) = a[i a_row + q a_col] (a row-major A: a_col = 1;
/// the transpose of a row-major [k, m]: a_row = 1). B is packed per call into 32-wide panels (k x n
/// floats, per thread that calls); A's rows are the broadcasts. Every element
/// of C is read and written once, so the update streams C at its bandwidth
/// (Eigen's GEMM, shaped for a deep product, re-packs and runs at 1.4-1.8x that).
inline void rank_update(index_t m, index_t n, index_t k, float alpha, const float* a, index_t a_row, index_t a_col,
                        const float* b, index_t ldb, float beta, float* c, index_t ldc) {
  if (m == 0 || n == 0) return;
  if (k == 0) return scale_rows(beta, c, ldc, m, n);
  const index_t panels = (n + panel - 1) / panel;
  thread_local buffer bbuf;
  float* bp = scratch(bbuf, panels * k * panel);  // bp[p][q][j] = B[q][32 p + j], zero past n
  parallel(2.0 * double(m) * double(n) * double(k), [&](int th, int nt) {
    index_t pa, pb;
    share(panels, 1, th, nt, pa, pb);
    for (index_t p = pa; p < pb; ++p) {
      const index_t c0 = p * panel;
      copy_panel(b + c0, ldb, k, std::min(panel, n - c0), bp + p * k * panel);
    }
    sync(nt);  // B is packed
    index_t ra, rb;
    share(m, tile_rows, th, nt, ra, rb);  // this thread's rows of C
    // A packed B up to 1 MiB stays in L2 whole: each tile then walks its rows
    // of C left to right in one pass (sequential streams, as merge wants);
    // larger ones go in blocks of panel_block panels.
    const index_t block = k * n <= (index_t(1) << 18) ? panels : panel_block;
    for (index_t p0 = 0; p0 < panels; p0 += block) {
      const index_t p1 = std::min(panels, p0 + block);
      for_tiles(rb - ra, [&]<int M>(index_t off) {
        const index_t r0 = ra + off;
        for (index_t p = p0; p < p1; ++p) {
          float out[M][panel];
          tile<M>(a + r0 * a_row, a_col, a_row, 0, bp + p * k * panel, panel, k, 1, out);
          const index_t c0 = p * panel, width = std::min(panel, n - c0);
          for (int t = 0; t < M; ++t) update_row(c + (r0 + t) * ldc + c0, out[t], width, alpha, beta);
        }
      });
    }
  });
}

/// Y [n, nr] = beta Y + alpha X W[r0 : r0 + nr]^T through the micro-kernel
/// (X [n, k] and Y row-major, unit column stride), W's rows as 32-row panels:
/// panels(p0, p1, k0, kc) gives panels [p0, p1) over depth [k0, k0 + kc) as
/// (pointer to panel p0's block, floats from one panel's block to the next),
/// each block laid out [q][32]. X is packed once per call ([tile][q][12]);
/// then each thread takes its share of panels, in depth blocks of `block`
/// and groups of panel_block panels that stay in L2 while every token tile
/// passes over them. PackedMatrix (packed.hpp) passes its stored panels; a
/// plain W packs each group as it comes (gemm_nt_plain below).
template <class Panels>
void forward_panels(Panels&& panels, index_t k, index_t r0, index_t nr, index_t block, float alpha, const float* x,
                    index_t ldx, index_t n, float beta, float* y, index_t ldy) {
  if (n == 0 || nr == 0) return;
  if (k == 0) return scale_rows(beta, y, ldy, n, nr);
  const index_t p_first = r0 / panel, p_last = (r0 + nr + panel - 1) / panel, r1 = r0 + nr;
  const index_t tiles = (n + tile_rows - 1) / tile_rows;
  float* xp = scratch(operand_buffer(), tiles * tile_rows * k);  // X as [tile][q][tile_rows], zero rows past n

  parallel(2.0 * double(n) * double(nr) * double(k), [&](int th, int nt) {
    index_t ta, tb;
    share(tiles, 1, th, nt, ta, tb);
    for (index_t tt = ta; tt < tb; ++tt)
      for (index_t t = 0; t < tile_rows; ++t) {
        const index_t row = tt * tile_rows + t;
        float* dst = xp + tt * tile_rows * k + t;
        if (row < n) {
          const float* src = x + row * ldx;
          for (index_t q = 0; q < k; ++q) dst[q * tile_rows] = src[q];
        } else {
          for (index_t q = 0; q < k; ++q) dst[q * tile_rows] = 0.0f;
        }
      }
    sync(nt);  // X is packed; from here on the threads never wait
    index_t pa, pb;
    share(p_last - p_first, 1, th, nt, pa, pb);
    pa += p_first;
    pb += p_first;
    for (index_t k0 = 0; k0 < k; k0 += block) {
      const index_t kc = std::min(block, k - k0);
      const bool first = k0 == 0;
      for (index_t p0 = pa; p0 < pb; p0 += panel_block) {
        const index_t p1 = std::min(pb, p0 + panel_block);
        const auto [base, stride] = panels(p0, p1, k0, kc);
        for (index_t tt = 0; tt < tiles; ++tt) {
          const index_t rows = std::min<index_t>(tile_rows, n - tt * tile_rows);
          const float* xt = xp + tt * tile_rows * k + k0 * tile_rows;
          for (index_t p = p0; p < p1; ++p) {
            const float* wp = base + (p - p0) * stride;
            const index_t o0 = p * panel, lo = std::max(r0, o0), hi = std::min(r1, o0 + panel);
            for_tiles(rows, [&]<int M>(index_t off) {
              float out[M][panel];
              tile<M>(xt + off, tile_rows, 1, 0, wp, panel, kc, 1, out);
              // Columns [lo, hi) of the panel (all 32 but at a slice's edges);
              // the first depth block applies beta, the later ones add.
              for (int t = 0; t < M; ++t)
                update_row(y + (tt * tile_rows + off + t) * ldy + (lo - r0), out[t] + (lo - o0), hi - lo, alpha,
                           first ? beta : 1.0f);
            });
          }
        }
      }
    }
  });
}

/// dst[(p - p0) kc 32 + 32 q + j] = W[32 p + j, k0 + q] for panels [p0, p1)
/// and depth [k0, k0 + kc) of a row-major W [m, *], zero past row m: one
/// group of panels in the micro-kernel's layout. Whole vector-square blocks go
/// through Eigen's register transpose (16 x 16 with AVX-512); a plain loop
/// did the whole of a 4096^2 W in 14 ms, 40 % of the product it feeds.
inline void pack_panels(const float* w, index_t ldw, index_t m, index_t p0, index_t p1, index_t k0, index_t kc,
                        float* dst) {
  for (index_t p = p0; p < p1; ++p) {
    float* d = dst + (p - p0) * kc * panel;
    const index_t rows = std::min<index_t>(panel, m - p * panel);
    index_t j0 = 0;
#if defined(EIGEN_VECTORIZE_SSE)  // not in nvcc's passes (EIGEN_GPUCC), where Eigen's packets are scalars
// A packet type (__m512) as a template argument drops its alignment
// attribute, which is what Eigen's own kernels do too (they silence it alike).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wignored-attributes"
    using P = Eigen::internal::packet_traits<float>::type;
    constexpr int L = Eigen::internal::unpacket_traits<P>::size;
    for (; j0 + L <= rows; j0 += L) {
      index_t q0 = 0;
      for (; q0 + L <= kc; q0 += L) {
        Eigen::internal::PacketBlock<P, L> b;
        for (int i = 0; i < L; ++i) b.packet[i] = Eigen::internal::ploadu<P>(w + (p * panel + j0 + i) * ldw + k0 + q0);
        Eigen::internal::ptranspose(b);
        for (int i = 0; i < L; ++i) Eigen::internal::pstoreu(d + (q0 + i) * panel + j0, b.packet[i]);
      }
      for (index_t q = q0; q < kc; ++q)
        for (index_t j = j0; j < j0 + L; ++j) d[q * panel + j] = w[(p * panel + j) * ldw + k0 + q];
    }
#pragma GCC diagnostic pop
#endif
    for (index_t q = 0; q < kc; ++q)
      for (index_t j = j0; j < panel; ++j) d[q * panel + j] = j < rows ? w[(p * panel + j) * ldw + k0 + q] : 0.0f;
  }
}

/// forward_panels over panels that pack(p0, p1, k0, kc, dst) writes into the
/// per-thread group buffer as each group comes (a plain operand packed per
/// call), in chunks of 1024 tokens, which bound the packed copy of X.
template <class Pack>
void forward_packing(Pack&& pack, index_t k, index_t m, float alpha, const float* x, index_t ldx, index_t n,
                     float beta, float* y, index_t ldy) {
  constexpr index_t chunk = 1024;
  for (index_t t0 = 0; t0 < n; t0 += chunk)
    forward_panels(
        [&](index_t p0, index_t p1, index_t k0, index_t kc) {
          float* dst = scratch(group_buffer(), panel_block * depth_block * panel);
          pack(p0, p1, k0, kc, dst);
          return std::pair<const float*, index_t>(dst, kc * panel);
        },
        k, 0, m, depth_block, alpha, x + t0 * ldx, ldx, std::min(chunk, n - t0), beta, y + t0 * ldy, ldy);
}

/// Y [n, m] = beta Y + alpha X W^T for a plain row-major W [m, k] and many
/// tokens: forward_panels with each group of panels packed as it comes (each
/// element of W once per 1024 tokens, into a per-thread buffer of 512 KiB that
/// stays in L2 while every token tile uses it; chunks of 1024 tokens bound the
/// packed copy of X). Eigen's GEMM packs W too, and its kernel ran slower
/// (4096^2, 2 threads, one process interleaved: n = 129 / 256 / 512 / 1024
/// 1.15 / 1.25 / 1.14 / 0.96-1.08x; 8192^2, n = 256: 1.17x).
inline void gemm_nt_plain(const float* w, index_t ldw, index_t m, index_t k, float alpha, const float* x,
                          index_t ldx, index_t n, float beta, float* y, index_t ldy) {
  forward_packing(
      [&](index_t p0, index_t p1, index_t k0, index_t kc, float* dst) { pack_panels(w, ldw, m, p0, p1, k0, kc, dst); },
      k, m, alpha, x, ldx, n, beta, y, ldy);
}

/// D [n, c0 : c1] = beta D + alpha (the same columns of S^T), S^T held in
/// panels of Lanes rows ([panel][c][Lanes], `cols` columns per panel): the
/// write-out of PackedMatrix's backward (packed.hpp), whose accumulators hold
/// dX transposed. Blocks of 16 columns: reads within one 2 KiB block, writes
/// 16 contiguous floats per row.
/// (Row by row, every read of a row was another cache line of S^T.)
template <int Lanes>
void untranspose(const float* s, index_t cols, index_t n, index_t c0, index_t c1, float alpha, float beta, float* d,
                 index_t ldd) {
  constexpr index_t cb = 16;
  for (index_t tp = 0; tp * Lanes < n; ++tp) {
    const index_t lanes = std::min<index_t>(Lanes, n - tp * Lanes);
    for (index_t b0 = c0; b0 < c1; b0 += cb) {
      const index_t b1 = std::min(c1, b0 + cb);
      for (index_t j = 0; j < lanes; ++j) {
        float* row = d + (tp * Lanes + j) * ldd;
        const float* src = s + tp * cols * Lanes + j;
        if (beta == 0.0f)
          for (index_t c = b0; c < b1; ++c) row[c] = alpha * src[c * Lanes];
        else
          for (index_t c = b0; c < b1; ++c) row[c] = beta * row[c] + alpha * src[c * Lanes];
      }
    }
  }
}

/// C [m, n] = beta C + alpha A [m, k] B [k, n] for many rows m over a plain
/// row-major B (the backward's dX = G W past skinny_nn's tokens): the forward's
/// loop with B's columns as its outputs, forward_panels(A, B^T). A panel of
/// B^T is 32 contiguous floats of each of B's rows, so each group is packed by
/// row copies (copy_panel, no transpose), once per 1024 rows of A. Eigen's
/// GEMM against it (4096^2, 2 threads, one process, interleaved): m = 33 / 64 / 128 / 256 /
/// 1024: 12.6 / 13.9 / 23.6 / 35.6 / 155 ms against 9.9 / 11.5 / 18.9 / 34.0 /
/// 150; 8192^2, m = 256: 162 against 135.
inline void gemm_nn_plain(index_t m, index_t n, index_t k, float alpha, const float* a, index_t lda,
                          const float* b, index_t ldb, float beta, float* c, index_t ldc) {
  forward_packing(
      [&](index_t p0, index_t p1, index_t k0, index_t kc, float* dst) {
        for (index_t p = p0; p < p1; ++p)
          copy_panel(b + k0 * ldb + p * panel, ldb, kc, std::min(panel, n - p * panel), dst + (p - p0) * kc * panel);
      },
      k, n, alpha, a, lda, m, beta, c, ldc);
}

/// C [m, n] = beta C + alpha A [m, k] B [k, n] for a few rows m (up to a few
/// dozen) and a deep k: the backward's dX = G W over a plain row-major W, read
/// in place. Each thread owns a share of C's 32-wide column panels; the depth
/// goes in blocks of 32 rows of B, each panel of which (32 x 32 floats) meets
/// every tile of A's rows before the next. A's slice of the block is packed
/// transposed (the broadcasts). The block is short because B's rows are a
/// power-of-two stride apart in the usual shapes and so share L1 and L2 sets:
/// measured at 4096^2, 2 threads, n = 16: depth blocks of 64 / 128 rows 4.0 /
/// 5.0-6.0 ms, 32 rows 2.9 ms (the panel kernel this replaces: 4.6-5.6 ms).
/// C's tiles are read and written once per block (~10 % of the FMAs' time).
/// 16 rows go as two tiles of 8, not 12 + 4 (a 4-row tile is load-bound).
/// A (i, q) = a[i a_row + q a_col] as in rank_update (the backward's
/// dA = s (G B)^T X takes A transposed).
inline void skinny_nn(index_t m, index_t n, index_t k, float alpha, const float* a, index_t a_row, index_t a_col,
                      const float* b, index_t ldb, float beta, float* c, index_t ldc) {
  constexpr index_t kc = 32;
  if (m == 0 || n == 0) return;
  if (k == 0) return scale_rows(beta, c, ldc, m, n);
  const index_t panels = (n + panel - 1) / panel, whole = n / panel;
  parallel(2.0 * double(m) * double(n) * double(k), [&](int th, int nt) {
    index_t pa, pb;
    share(panels, 1, th, nt, pa, pb);
    thread_local buffer abuf;
    float* at = scratch(abuf, kc * m);  // at[q * m + t] = A[t][o0 + q]
    alignas(64) float pad[kc * panel];  // the last, partial panel, zero past n
    for (index_t o0 = 0; o0 < k; o0 += kc) {
      const index_t depth = std::min(kc, k - o0);
      const float bt = o0 == 0 ? beta : 1.0f;
      for (index_t t = 0; t < m; ++t)
        for (index_t q = 0; q < depth; ++q) at[q * m + t] = a[t * a_row + (o0 + q) * a_col];
      for (index_t p = pa; p < pb; ++p) {
        const index_t c0 = p * panel, width = std::min(panel, n - c0);
        const float* v = b + o0 * ldb + c0;
        index_t vs = ldb;
        if (p >= whole) {
          copy_panel(v, ldb, depth, width, pad);
          v = pad, vs = panel;
        }
        auto run = [&]<int M>(index_t off) {
          float out[M][panel];
          tile<M>(at + off, m, 1, 0, v, vs, depth, 1, out);
          for (int t = 0; t < M; ++t) update_row(c + (off + t) * ldc + c0, out[t], width, alpha, bt);
        };
        index_t i = 0;
        if constexpr (tile_rows == 12) {
          for (; m - i > 16 || m - i == 12; i += 12) run.template operator()<12>(i);
          if (m - i == 16) {
            run.template operator()<8>(i);
            run.template operator()<8>(i + 8);
            i = m;
          }
        }
        for_tiles(m - i, [&]<int M>(index_t off) { run.template operator()<M>(i + off); });
      }
    }
  });
}

}  // namespace lora::detail::packed
