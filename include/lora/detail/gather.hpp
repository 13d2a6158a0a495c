// detail/gather.hpp: what the layers beyond AdaptedLinear need besides the
// backend's products, written once for every backend as LORA_HOST_DEVICE
// functors run by Backend::for_each_index (a loop on the Eigen backend, a
// kernel on Thrust):
//   Strided<T>         element (i, j) at p[i * rs + j * cs] of any backend
//                      matrix or view (strided(m)), or of its transpose
//                      (strided_transposed(m): a column gather is a row gather)
//   IndexList<B>       token ids from the host, checked by the caller, made
//                      visible to the backend's kernels (grouped by value for
//                      a scatter on a parallel backend)
//   gather_rows        dst(i, :) = src(ids[i], :)
//   scatter_add_rows   dst(ids[i], :) += alpha src(i, :), duplicates summed in
//                      position order: deterministic, no atomics
//   add_rows_at        dst(ids[i], :) += src(i, :), the ids distinct
//   copy_strided       dst = src (a transpose, with strided_transposed)
//   for_each_element   f(i, j) over a [rows, cols] index space
// On the Eigen backend one index is one row (the inner loop vectorises); on
// the others one element (a GPU wants many small threads).
#pragma once

#ifndef LORA_UMBRELLA_INCLUDED
#error "Include <lora/lora.hpp> (or <lora/thrust.hpp>) instead of lora/detail/gather.hpp."
#endif

#include <algorithm>
#include <cstdint>
#include <span>
#include <type_traits>
#include <vector>

#include "../backend/eigen/backend.hpp"
#include "../config.hpp"
#include "../error.hpp"

namespace lora::detail {

/// A window of a matrix: element (i, j) at p[i * rs + j * cs]. T const =
/// read-only. Trivially copyable: functors carry it into kernels by value.
template <class T>
struct Strided {
  T* p = nullptr;
  index_t rows = 0, cols = 0, rs = 0, cs = 1;
  LORA_HOST_DEVICE T& operator()(index_t i, index_t j) const { return p[i * rs + j * cs]; }
  /// The same window, read-only.
  template <class U = T>
    requires(!std::is_const_v<U>)
  LORA_HOST_DEVICE operator Strided<const U>() const {  // NOLINT: implicit by design
    return {p, rows, cols, rs, cs};
  }
};

/// Strided window of any backend matrix with storage: an Eigen matrix, Map or
/// block (either storage order), a DeviceMatrix or its view.
template <class M>
auto strided(M&& m) {
  using D = std::remove_cvref_t<M>;
  if constexpr (std::is_base_of_v<Eigen::EigenBase<D>, D>) {
    static_assert(requires { m.data(); m.outerStride(); },
                  "lora: this operand is an Eigen expression without storage; evaluate it into a matrix first");
    using E = std::remove_pointer_t<decltype(m.data())>;
    if constexpr (D::IsRowMajor)
      return Strided<E>{m.data(), m.rows(), m.cols(), m.outerStride(), m.innerStride()};
    else
      return Strided<E>{m.data(), m.rows(), m.cols(), m.innerStride(), m.outerStride()};
  } else {  // Thrust: view(m) is found by argument-dependent lookup
    const auto v = view(m);
    using E = std::remove_pointer_t<decltype(v.data())>;
    return Strided<E>{v.data(), v.rows(), v.cols(), v.stride(), 1};
  }
}
/// The transpose of m as a window: row i is column i of m.
template <class M>
auto strided_transposed(M&& m) {
  auto s = strided(m);
  return decltype(s){s.p, s.cols, s.rows, s.cs, s.rs};
}

/// One index of a row-wise kernel: a whole row on the Eigen backend, one
/// element elsewhere.
template <class B>
inline constexpr bool rows_per_index = std::is_same_v<B, EigenBackend>;

template <class F, bool RowPerIndex>
struct element_fn {
  F f;
  index_t cols;
  LORA_HOST_DEVICE void operator()(index_t q) const {
    if constexpr (RowPerIndex) {
      for (index_t j = 0; j < cols; ++j) f(q, j);
    } else {
      f(q / cols, q % cols);
    }
  }
};

/// f(i, j) for every element of a [rows, cols] index space (each call writes
/// only its own outputs): a row per index on the Eigen backend, an element
/// elsewhere. f is a LORA_HOST_DEVICE functor.
template <class B, class F>
void for_each_element(index_t rows, index_t cols, const F& f) {
  if (rows <= 0 || cols <= 0) return;
  constexpr bool per_row = rows_per_index<B>;
  B::for_each_index(per_row ? rows : rows * cols, element_fn<F, per_row>{f, cols});
}

/// Token ids copied from the host (as index_t) and uploaded once per assign().
/// With `grouped` (what scatter_add_rows needs on a parallel backend) they are
/// also grouped by value: `targets` the distinct ids in ascending order, the
/// positions of targets[u] at `positions[starts[u] .. starts[u + 1])`,
/// ascending. The Eigen backend needs no grouping: its scatter runs over the
/// positions in order, one thread. Grows, never shrinks (reused, it stops
/// allocating on the host).
template <class B>
class IndexList {
  static constexpr bool on_host = std::is_same_v<B, EigenBackend>;

 public:
  /// ids must already be checked (0 <= id < the gathered matrix's rows).
  template <class Id>
  void assign(std::span<const Id> ids, bool grouped = false) {
    const auto n = ids.size();
    host_ids_.resize(n);
    for (std::size_t i = 0; i < n; ++i) host_ids_[i] = static_cast<index_t>(ids[i]);
    grouped_ = grouped;
    if constexpr (!on_host) {
      upload(host_ids_, ids_);
      if (grouped) group();
    }
  }
  bool grouped() const { return grouped_; }
  index_t size() const { return static_cast<index_t>(host_ids_.size()); }
  index_t distinct() const { return static_cast<index_t>(host_targets_.size()); }
  std::span<const index_t> host() const { return host_ids_; }
  /// The arrays as the backend's kernels read them.
  const index_t* ids() const { return pick(host_ids_, ids_); }
  const index_t* positions() const { return pick(host_pos_, pos_); }
  const index_t* targets() const { return pick(host_targets_, targets_); }
  const index_t* starts() const { return pick(host_starts_, starts_); }

 private:
  using device_vector = typename B::template vector<index_t>;
  static void upload(const std::vector<index_t>& h, device_vector& d) {
    B::from_host(Eigen::Map<const Eigen::Matrix<index_t, Eigen::Dynamic, 1>>(h.data(), static_cast<index_t>(h.size())),
                 d);
  }
  static const index_t* pick(const std::vector<index_t>& h, const device_vector& d) {
    if constexpr (std::is_same_v<B, EigenBackend>) {
      (void)d;
      return h.data();
    } else {
      return h.empty() ? nullptr : B::data(d);
    }
  }
  /// A stable sort of the positions by id (ids are arbitrary, not bounded by a
  /// small table, so a comparison sort rather than a counting sort), then uploaded.
  void group() {
    const std::size_t n = host_ids_.size();
    host_pos_.resize(n);
    for (std::size_t i = 0; i < n; ++i) host_pos_[i] = static_cast<index_t>(i);
    std::stable_sort(host_pos_.begin(), host_pos_.end(),
                     [&](index_t a, index_t b) { return host_ids_[a] < host_ids_[b]; });
    host_targets_.clear();
    host_starts_.clear();
    for (std::size_t k = 0; k < n; ++k) {
      const index_t id = host_ids_[host_pos_[k]];
      if (host_targets_.empty() || host_targets_.back() != id) {
        host_targets_.push_back(id);
        host_starts_.push_back(static_cast<index_t>(k));
      }
    }
    host_starts_.push_back(static_cast<index_t>(n));
    upload(host_pos_, pos_);
    upload(host_targets_, targets_);
    upload(host_starts_, starts_);
  }
  std::vector<index_t> host_ids_, host_pos_, host_targets_, host_starts_;  // pos.. only when grouped
  device_vector ids_, pos_, targets_, starts_;                              // unused on the Eigen backend
  bool grouped_ = false;
};

template <class T, bool RowPerIndex>
struct gather_rows_fn {
  Strided<const T> src;
  Strided<T> dst;
  const index_t* ids;
  LORA_HOST_DEVICE void operator()(index_t q) const {
    if constexpr (RowPerIndex) {
      const index_t s = ids[q];
      for (index_t j = 0; j < dst.cols; ++j) dst(q, j) = src(s, j);
    } else {
      const index_t i = q / dst.cols, j = q % dst.cols;
      dst(i, j) = src(ids[i], j);
    }
  }
};

/// One element of a grouped scatter: target u's column j gains its terms in
/// position order.
template <class T>
struct scatter_add_rows_fn {
  Strided<const T> src;
  Strided<T> dst;
  const index_t *targets, *starts, *positions;
  T alpha;
  LORA_HOST_DEVICE void operator()(index_t q) const {
    const index_t u = q / dst.cols, j = q % dst.cols;
    T acc = dst(targets[u], j);
    for (index_t k = starts[u]; k < starts[u + 1]; ++k) acc += alpha * src(positions[k], j);
    dst(targets[u], j) = acc;
  }
};

/// dst(idx[i], :) += src(i, :) where no index repeats (a segment's rows added
/// back to their tokens' rows): each element written by one index, no atomics.
template <class T, bool RowPerIndex>
struct add_rows_at_fn {
  Strided<const T> src;
  Strided<T> dst;
  const index_t* idx;
  T alpha;
  LORA_HOST_DEVICE void operator()(index_t q) const {
    if constexpr (RowPerIndex) {
      for (index_t j = 0; j < src.cols; ++j) dst(idx[q], j) += alpha * src(q, j);
    } else {
      const index_t i = q / src.cols, j = q % src.cols;
      dst(idx[i], j) += alpha * src(i, j);
    }
  }
};

template <class T>
struct copy_fn {
  Strided<const T> src;
  Strided<T> dst;
  LORA_HOST_DEVICE void operator()(index_t i, index_t j) const { dst(i, j) = src(i, j); }
};
/// dst = src between any two windows of one shape: with src a
/// strided_transposed window, a transpose on any backend.
template <class B, class S, class T>
void copy_strided(Strided<S> src, Strided<T> dst) {
  static_assert(std::is_same_v<std::remove_const_t<S>, T>, "lora::detail::copy_strided: src and dst scalars differ");
  LORA_ASSERT(src.rows == dst.rows && src.cols == dst.cols);
  for_each_element<B>(dst.rows, dst.cols, copy_fn<T>{src, dst});
}

/// dst(i, :) = src(ids[i], :) for every row i of dst; ids are backend-visible
/// (IndexList::ids(), or a device copy of the caller's).
template <class B, class S, class T>
void gather_rows(Strided<S> src, const index_t* ids, Strided<T> dst) {
  static_assert(std::is_same_v<std::remove_const_t<S>, T>, "lora::detail::gather_rows: src and dst scalars differ");
  LORA_ASSERT(dst.cols == src.cols);
  if (dst.rows == 0 || dst.cols == 0) return;
  constexpr bool per_row = rows_per_index<B>;
  B::for_each_index(per_row ? dst.rows : dst.rows * dst.cols, gather_rows_fn<T, per_row>{src, dst, ids});
}
template <class B, class S, class T>
void gather_rows(Strided<S> src, const IndexList<B>& ids, Strided<T> dst) {
  LORA_ASSERT(dst.rows == ids.size());
  gather_rows<B>(src, ids.ids(), dst);
}

/// dst(ids[i], :) += src(i, :) for every row i of src, the ids distinct
/// (scatter_add_rows sums repeated ones).
template <class B, class S, class T>
void add_rows_at(Strided<S> src, const index_t* ids, Strided<T> dst) {
  static_assert(std::is_same_v<std::remove_const_t<S>, T>, "lora::detail::add_rows_at: src and dst scalars differ");
  LORA_ASSERT(dst.cols == src.cols);
  if (src.rows == 0 || src.cols == 0) return;
  constexpr bool per_row = rows_per_index<B>;
  B::for_each_index(per_row ? src.rows : src.rows * src.cols, add_rows_at_fn<T, per_row>{src, dst, ids, T(1)});
}

/// dst(ids[i], :) += alpha src(i, :) for i < ids.size(); rows named several
/// times receive their terms in position order (the same sums on every
/// backend and thread count).
template <class B, class S, class T>
void scatter_add_rows(T alpha, Strided<S> src, const IndexList<B>& ids, Strided<T> dst) {
  static_assert(std::is_same_v<std::remove_const_t<S>, T>, "lora::detail::scatter_add_rows: src and dst scalars differ");
  LORA_ASSERT(src.rows == ids.size() && dst.cols == src.cols);
  if (ids.size() == 0 || dst.cols == 0) return;
  if constexpr (rows_per_index<B>) {  // Eigen: one thread, positions in order
    B::for_each_index(src.rows, add_rows_at_fn<T, true>{src, dst, ids.ids(), alpha});
  } else {
    if (!ids.grouped())
      raise<ValueError>("lora::detail::scatter_add_rows: the ids were assigned without grouping (assign(ids, true))");
    B::for_each_index(ids.distinct() * dst.cols, scatter_add_rows_fn<T>{src, dst, ids.targets(), ids.starts(),
                                                                        ids.positions(), alpha});
  }
}

}  // namespace lora::detail
