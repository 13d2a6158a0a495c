// detail/sgmv.hpp: the gathered low-rank forward of MultiAdapterLinear on a
// device backend (Punica's BGMV: every token indexes its own adapter), two
// kernels per call whatever the number of distinct adapters:
//   shrink   partial[t][j][c] = sum over chunk c's columns i of X[t, i] A_k[j, i]
//            (k = token t's adapter; one index per (token, j < r_max, chunk))
//   expand   Y[t, o] += s_k sum_{j < r_k} (sum_c partial[t][j][c]) B_k[o, j]
//            (one index per token and `sgmv_outputs` columns o of Y)
// instead of a gather, two products and a scatter-add per adapter present.
// The k-chunks split the shrink's long inner dimension over more threads (a
// decode batch has few tokens); chunk c takes the columns c, c + C, c + 2C, ...
// so that neighbouring indices read neighbouring elements of X and A_k (the
// reads of a warp coalesce on a GPU). The partial sums are added in chunk order
// and each Y element is written by one index: no atomics, the same bits on
// every thread count. Sums run in accum_t<T> (fp32 for 16-bit types).
// No static-rank specialisation: the expand's rank loop is the outer one (one
// partial sum and `sgmv_outputs` accumulators live in registers, whatever the
// rank), and the shrink has no rank loop, so one instantiation per scalar type
// serves every rank (docs/adapters.md, "On the Thrust backend").
// Host side: SgmvWorkspace collects the batch's adapters (a table of their
// factors' windows and scales) and each token's table entry (-1 = base only),
// uploads both in one transfer, and keeps the partial sums; it grows, never
// shrinks. Empty on the Eigen backend, which keeps its per-segment path.
#pragma once

#ifndef LORA_UMBRELLA_INCLUDED
#error "Include <lora/lora.hpp> (or <lora/thrust.hpp>) instead of lora/detail/sgmv.hpp."
#endif

#include <algorithm>
#include <cstring>
#include <span>
#include <type_traits>
#include <vector>

#include "../config.hpp"
#include "../error.hpp"
#include "arith.hpp"
#include "gather.hpp"

namespace lora::detail {

/// Columns of X per k-chunk of the shrink, and the most chunks (untuned: no
/// GPU measured them yet; docs/adapters.md).
inline constexpr index_t sgmv_chunk_columns = 256;
inline constexpr index_t sgmv_max_chunks = 32;
/// Columns of Y per expand index: the partial sums of a rank are added once
/// for this many outputs.
inline constexpr index_t sgmv_outputs = 4;

/// k-chunks of the shrink for `in` columns: ceil(in / 256) in [1, 32].
inline index_t sgmv_chunks(index_t in) {
  return std::clamp<index_t>((in + sgmv_chunk_columns - 1) / sgmv_chunk_columns, 1, sgmv_max_chunks);
}

/// One adapter of a batch as the kernels read it.
template <class T>
struct SgmvAdapter {
  Strided<const T> a;  // A_k (r_k, in)
  Strided<const T> b;  // B_k (out, r_k)
  double scale;        // s_k (a T, held exactly)
};

/// The table travels as index_t words in the same upload as the tokens'
/// entries (the backend uploads arithmetic arrays), and is read back with a
/// memcpy (no type punning).
template <class T>
inline constexpr index_t sgmv_entry_words = static_cast<index_t>(sizeof(SgmvAdapter<T>) / sizeof(index_t));

template <class T>
LORA_HOST_DEVICE inline SgmvAdapter<T> sgmv_entry(const index_t* table, index_t u) {
  static_assert(std::is_trivially_copyable_v<SgmvAdapter<T>> && sizeof(SgmvAdapter<T>) % sizeof(index_t) == 0,
                "lora::detail::SgmvAdapter must be a whole number of index_t words");
  SgmvAdapter<T> e;  // trivially copyable (Strided's member initialisers only make it non-trivial to construct)
  std::memcpy(static_cast<void*>(&e), table + u * sgmv_entry_words<T>, sizeof e);
  return e;
}

/// partial[(t r_max + j) C + c] for every (t, j, c) whose token has an adapter
/// of rank > j; the others are left unwritten (the expand never reads them).
template <class T>
struct sgmv_shrink_fn {
  using A = accum_t<T>;
  Strided<const T> x;    // (n, in)
  const index_t* table;  // the batch's adapters
  const index_t* entry;  // (n): token t's adapter in the table, -1 = none
  A* partial;            // (n, r_max, chunks)
  index_t rmax, chunks;
  LORA_HOST_DEVICE void operator()(index_t q) const {
    const index_t c = q % chunks, j = (q / chunks) % rmax, t = q / (chunks * rmax);
    const index_t u = entry[t];
    if (u < 0) return;
    const SgmvAdapter<T> k = sgmv_entry<T>(table, u);
    if (j >= k.a.rows) return;
    A acc = 0;
    for (index_t i = c; i < x.cols; i += chunks) acc += static_cast<A>(x(t, i)) * static_cast<A>(k.a(j, i));
    partial[q] = acc;
  }
};

/// Y[t, o] += s_k h[t, :] . B_k[o, :] for o = p, p + spread, ..., sgmv_outputs of
/// them, h[t, j] the chunks' partial sums added in chunk order.
template <class T>
struct sgmv_expand_fn {
  using A = accum_t<T>;
  Strided<T> y;  // (n, out)
  const index_t* table;
  const index_t* entry;
  const A* partial;  // (n, r_max, chunks)
  index_t rmax, chunks, spread;
  LORA_HOST_DEVICE void operator()(index_t q) const {
    const index_t t = q / spread, p = q % spread;
    const index_t u = entry[t];
    if (u < 0) return;
    const SgmvAdapter<T> k = sgmv_entry<T>(table, u);
    const index_t outs = (y.cols - p + spread - 1) / spread;  // outputs of this index that exist
    A acc[sgmv_outputs] = {};
    const A* ht = partial + t * rmax * chunks;
    for (index_t j = 0; j < k.a.rows; ++j) {
      A h = 0;
      for (index_t c = 0; c < chunks; ++c) h += ht[j * chunks + c];
      // A constant trip count keeps acc in registers; the guard drops the outputs past `out`.
      for (index_t o = 0; o < sgmv_outputs; ++o)
        if (o < outs) acc[o] += h * static_cast<A>(k.b(p + o * spread, j));
    }
    const auto s = static_cast<A>(k.scale);
    for (index_t o = 0; o < sgmv_outputs; ++o)
      if (o < outs) {
        T& dst = y(t, p + o * spread);
        dst = static_cast<T>(static_cast<A>(dst) + s * acc[o]);
      }
  }
};

/// The host side of the fused gathered forward (see the file comment): fill
/// with reset() and add(), then run(). One per GatherWorkspace.
template <class T, class B>
class SgmvWorkspace {
 public:
  /// Elements and indices held, host and device.
  index_t capacity() const {
    return words_.capacity() + partial_.capacity() +
           static_cast<index_t>(table_.capacity() * sgmv_entry_words<T> + entry_.capacity() + host_.capacity());
  }

  /// A batch of n tokens, none with an adapter yet.
  void reset(index_t n) {
    table_.clear();
    entry_.assign(static_cast<std::size_t>(n), -1);
    rmax_ = 0;
  }
  /// Adapter (A_k, B_k, s_k) for `tokens` (rows of X; each token in one add()).
  void add(Strided<const T> a, Strided<const T> b, T scale, std::span<const index_t> tokens) {
    const auto u = static_cast<index_t>(table_.size());
    table_.push_back({a, b, static_cast<double>(scale)});
    for (const index_t t : tokens) entry_[static_cast<std::size_t>(t)] = u;
    rmax_ = std::max(rmax_, a.rows);
  }

  /// Y += s_k (X[t] A_k^T) B_k^T for every token t with an adapter k: one
  /// upload, then the shrink and the expand kernels.
  void run(Strided<const T> x, Strided<T> y) {
    const auto n = static_cast<index_t>(entry_.size());
    LORA_ASSERT(x.rows == n && y.rows == n);
    if (table_.empty() || n == 0 || rmax_ == 0) return;
    const auto words = static_cast<index_t>(table_.size()) * sgmv_entry_words<T>;
    host_.resize(static_cast<std::size_t>(words + n));
    std::memcpy(host_.data(), table_.data(), table_.size() * sizeof(SgmvAdapter<T>));
    std::copy(entry_.begin(), entry_.end(), host_.begin() + words);
    auto device = words_.matrix(words + n, 1);  // [table | entries]
    B::from_host(Eigen::Map<const Eigen::Matrix<index_t, Eigen::Dynamic, 1>>(host_.data(), words + n), device);
    const index_t* table = device.data();
    const index_t* entry = table + words;

    const index_t chunks = sgmv_chunks(x.cols);
    auto part = partial_.matrix(checked_mul("lora::detail::SgmvWorkspace::run", n, rmax_), chunks);
    B::for_each_index(n * rmax_ * chunks, sgmv_shrink_fn<T>{x, table, entry, part.data(), rmax_, chunks});
    const index_t spread = (y.cols + sgmv_outputs - 1) / sgmv_outputs;
    if (spread == 0) return;
    B::for_each_index(n * spread, sgmv_expand_fn<T>{y, table, entry, part.data(), rmax_, chunks, spread});
  }

 private:
  std::vector<SgmvAdapter<T>> table_;  // the batch's adapters
  std::vector<index_t> entry_;         // by token: its table entry, -1 = none
  std::vector<index_t> host_;          // the upload: table words, then entries
  typename B::template workspace<index_t> words_;
  typename B::template workspace<accum_t<T>> partial_;
  index_t rmax_ = 0;
};

/// The Eigen backend runs its segments (adapter_set.hpp): nothing held.
template <class T>
class SgmvWorkspace<T, EigenBackend> {
 public:
  index_t capacity() const { return 0; }
};

}  // namespace lora::detail
