// adapter_set.hpp: named adapters on a model.
//   MultiAdapterLinear<Base, T>  one frozen base weight, any number of named
//                                LowRankDelta<T> adapters, a weighted active set
//                                swapped while other threads run forward()
//   AdapterSet<Layer>            layers by module path ("model.layers.0.self_attn.q_proj")
//                                and the same adapter operations across all of them
// Backends: a host base (Eigen) or a device one (DeviceMatrix<T>, Thrust, with
// LowRankDelta<T, dynamic, ThrustBackend> adapters; include <lora/thrust.hpp>
// first, and lora::to_device(layer) moves a host layer over). The id planning
// (check, counting sort) runs on the host on both. On the Eigen backend the
// segments' gathers, products and scatter-adds spread over OpenMP threads; on
// Thrust the gathered forward is two fused kernels whatever the number of
// adapters (detail/sgmv.hpp: shrink, expand), and the backward runs the
// segments one after another, the device parallel inside each.
// add_weighted / AdapterSet::add_weighted_adapter (combine.hpp's SVD) are
// host-only: a static_assert says so.
// Hot swap: the active set is an immutable Snapshot held by a shared_ptr slot
// (detail::adapters::SnapshotSlot); a forward loads it once, so it sees the set
// before a swap or after it, never a mix, and the adapters it reads stay alive
// (shared_ptr) even if another thread removes them.
// Per-token adapters (Punica's SGMV semantics on the CPU): every adapter has a
// stable integer slot; forward(X, ids, Y) gives token t the base plus adapter
// ids[t]'s term, with the base product once for the batch and the tokens
// grouped by adapter (a stable counting sort into a GatherWorkspace), mixed
// ranks unpadded; backward(X, ids, G, ...) gives dX and dA_k, dB_k of every
// adapter present (MultiAdapterGradients), PerAdapterOptimizer steps only those.
// docs/adapters.md has the contract and the PEFT correspondence.
#pragma once

#include "lora.hpp"
#include "combine.hpp"
#include "detail/gather.hpp"
#include "detail/sgmv.hpp"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>
#include <initializer_list>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace lora {

namespace detail::adapters {

/// Weighted names as owned strings, from either overload of set_active.
using weighted_names = std::vector<std::pair<std::string, double>>;

inline weighted_names own(std::initializer_list<std::pair<std::string_view, double>> in) {
  weighted_names out;
  out.reserve(in.size());
  for (const auto& [name, w] : in) out.emplace_back(std::string(name), w);
  return out;
}
inline weighted_names own(std::span<const std::pair<std::string, double>> in) {
  return weighted_names(in.begin(), in.end());
}

/// Finite weights and no name twice (a name listed twice would be a silent sum).
inline void check_weighted(const char* where, const weighted_names& in) {
  for (std::size_t i = 0; i < in.size(); ++i) {
    if (!std::isfinite(in[i].second))
      raise<ValueError>(where, ": the weight of adapter '", in[i].first, "' is ", in[i].second, ", not finite");
    for (std::size_t j = 0; j < i; ++j)
      if (in[j].first == in[i].first) raise<ValueError>(where, ": adapter '", in[i].first, "' is listed twice");
  }
}

template <class Names>
std::string join(const Names& names) {
  std::string s;
  for (const auto& n : names) s += (s.empty() ? "" : ", ") + std::string(n);
  return s.empty() ? std::string("(none)") : s;
}

/// A shared_ptr that one thread replaces while others copy it: what
/// std::atomic<std::shared_ptr> provides, and built the same way as
/// libstdc++'s (a lock held for one pointer copy and one reference-count
/// increment; neither side allocates). Not that class itself: libstdc++ 12's
/// load() releases its lock with a relaxed store, so the reader's copy of the
/// pointer and the next writer's store are unordered, a race ThreadSanitizer
/// reports and the memory model confirms. Here the unlock is a release.
template <class S>
class SnapshotSlot {
 public:
  explicit SnapshotSlot(std::shared_ptr<const S> p) : p_(std::move(p)) {}
  SnapshotSlot(const SnapshotSlot&) = delete;
  SnapshotSlot& operator=(const SnapshotSlot&) = delete;

  std::shared_ptr<const S> load() const noexcept {
    lock();
    std::shared_ptr<const S> out = p_;
    unlock();
    return out;
  }
  /// The previous snapshot is released after the lock (its last owner may be
  /// a forward still running with it).
  void store(std::shared_ptr<const S> p) noexcept {
    lock();
    p_.swap(p);
    unlock();
  }

 private:
  void lock() const noexcept {
    // Held for nanoseconds; yield when its holder was preempted (more threads
    // than cores) instead of burning the holder's time slice.
    for (int spins = 0; busy_.test_and_set(std::memory_order_acquire); ++spins)
      while (busy_.test(std::memory_order_relaxed))
        if (++spins > 64) std::this_thread::yield();
  }
  void unlock() const noexcept { busy_.clear(std::memory_order_release); }

  mutable std::atomic_flag busy_;  // C++20: initialised clear
  std::shared_ptr<const S> p_;
};

}  // namespace detail::adapters

template <BaseWeight Base, class T = float>
class MultiAdapterLinear;

namespace detail::adapters {
/// One adapter's tokens in a gathered batch: order[begin, begin + count) of
/// the workspace's token order.
struct Segment {
  index_t slot = 0, begin = 0, count = 0;
  double cost = 0.0;        ///< count * r * (in + out): the scheduling weight
  bool contiguous = false;  ///< rows first .. first + count - 1 of X, in order: viewed, not gathered
};
}  // namespace detail::adapters

/// Scratch of the gathered forward / backward (MultiAdapterLinear::forward(X,
/// ids, Y, ws)): the token order, the segments, and per OpenMP thread the
/// gathered rows and the [m, r] intermediates. Grows, never shrinks: once it
/// has seen a batch's shape, calls of that shape allocate nothing. One per
/// calling thread (a call uses it from inside its own parallel region).
/// B: the layer's backend (where the gathered rows and intermediates live).
template <class T, class B = EigenBackend>
class GatherWorkspace {
 public:
  using Segment = detail::adapters::Segment;

  /// Elements and indices held (all buffers), for no-allocation checks.
  index_t capacity() const {
    index_t n = base_.capacity() + static_cast<index_t>(counts_.capacity() + order_.capacity() +
                                                        segments_.capacity() + schedule_.capacity() + lanes_.capacity());
    for (const Lane& l : lanes_)
      n += l.eval.capacity() + l.saved.capacity() + l.rows[0].capacity() + l.rows[1].capacity();
    if constexpr (!std::is_same_v<B, EigenBackend>) n += B::size(order_device_);
    return n + sgmv_.capacity();
  }
  /// The segments of the last gathered call, in slot order.
  std::span<const Segment> segments() const { return segments_; }
  /// Whether the last call ran segments on several threads.
  bool parallel() const { return parallel_; }

 private:
  template <BaseWeight, class>
  friend class MultiAdapterLinear;
  using workspace = typename B::template workspace<T>;
  struct Lane {
    workspace eval, saved;  // the [m, r] intermediates
    workspace rows[2];      // gathered rows: buffer 0 X, 1 G or Y, 2 dX
    auto matrix(int i, index_t r, index_t cols) { return rows[i / 2].matrix(r, cols, i % 2); }
  };

  workspace base_;                     // the base product's scratch
  std::vector<index_t> counts_, order_;
  std::vector<Segment> segments_;
  std::vector<index_t> schedule_;      // segment indices, costliest first
  std::vector<Lane> lanes_;
  typename B::template vector<index_t> order_device_;  // order_ where the kernels read it (not on Eigen)
  detail::SgmvWorkspace<T, B> sgmv_;                   // the fused forward's table and partial sums (not on Eigen)
  bool parallel_ = false;
};

/// dA_k [r_k, in], dB_k [out, r_k] per adapter slot, and which slots had tokens
/// in the batches since the last non-accumulating backward (present(slot)).
/// Made by MultiAdapterLinear::make_gradients(); a backward allocates the
/// gradients of a slot it has not seen (an adapter added later). Each slot's
/// gradients live behind their own pointer: their addresses never change, so
/// an optimizer may hold them. B: the layer's backend.
template <class T, class B = EigenBackend>
class MultiAdapterGradients {
 public:
  using gradients = LowRankGradients<T, dynamic, B>;

  /// Slots it has room for (present or not).
  index_t slots() const { return static_cast<index_t>(g_.size()); }
  /// Whether `slot` has gradients allocated.
  bool has(index_t slot) const { return slot >= 0 && slot < slots() && g_[slot] != nullptr; }
  /// Whether `slot` had tokens (its dA, dB are this batch's, or the sum over
  /// the accumulated batches); an absent slot's tensors are stale.
  bool present(index_t slot) const { return has(slot) && tokens_[slot] > 0; }
  /// Tokens of `slot` in those batches.
  index_t tokens(index_t slot) const { return has(slot) ? tokens_[slot] : 0; }
  /// The present slots, ascending.
  std::vector<index_t> present_slots() const {
    std::vector<index_t> out;
    for (index_t k = 0; k < slots(); ++k)
      if (present(k)) out.push_back(k);
    return out;
  }
  gradients& at(index_t slot) { return *checked(slot); }
  const gradients& at(index_t slot) const { return *checked(slot); }
  /// Marks every slot absent (the tensors keep their values; the next
  /// backward overwrites the ones it reaches).
  void clear() { std::ranges::fill(tokens_, index_t(0)); }

  /// The slot's gradients, allocated zero [r, in] / [out, r] when missing.
  gradients& ensure(index_t slot, index_t out, index_t in, index_t rank) {
    if (slot < 0) detail::raise<ValueError>("MultiAdapterGradients::ensure: slot ", slot, " is negative");
    if (slot >= slots()) {
      g_.resize(static_cast<std::size_t>(slot) + 1);
      tokens_.resize(static_cast<std::size_t>(slot) + 1, 0);
    }
    if (!g_[slot]) g_[slot] = std::make_unique<gradients>(out, in, rank);
    return *g_[slot];
  }

 private:
  template <BaseWeight, class>
  friend class MultiAdapterLinear;
  gradients* checked(index_t slot) const {
    if (!has(slot))
      detail::raise<ValueError>("MultiAdapterGradients::at: slot ", slot, " has no gradients (slots 0..",
                                slots() - 1, " allocated; a backward allocates a slot when it first has tokens)");
    return g_[slot].get();
  }
  std::vector<std::unique_ptr<gradients>> g_;
  std::vector<index_t> tokens_;
};

/// A frozen linear layer Y = X W^T + b with any number of named low-rank
/// adapters, of which a weighted subset is active:
///   Y = X W^T + b + sum_k w_k s_k (X A_k^T) B_k^T
/// (s_k = the adapter's scale: alpha / r or alpha / sqrt(r) or its user scale,
/// times its multiplier; w_k = its weight in the active set).
///
/// Base is any base weight AdaptedLinear accepts: RowMatrix<T>, an
/// Eigen::Map (const or not), RowMatrix<Eigen::bfloat16> / Eigen::half, an
/// NF4Matrix; on the device a DeviceMatrix<T> (or its 16-bit / NF4 kinds)
/// under LowRankDelta<T, dynamic, ThrustBackend> adapters. forward() is const
/// and may run on several threads while one thread calls set_active /
/// set_multiplier / add / remove (see docs/adapters.md, "Hot swap").
/// merge_active / unmerge write W and need exclusive access. The gathered
/// calls and PerAdapterOptimizer work on both backends; add_weighted is
/// host-only (combine's SVD).
///
/// A moved-from layer may only be destroyed or assigned to.
template <BaseWeight Base, class T>
class MultiAdapterLinear : public detail::LinearForwards<MultiAdapterLinear<Base, T>> {
 public:
  using base_type = Base;
  using scalar = T;
  using backend = typename weight_traits<Base>::backend;
  using delta_type = LowRankDelta<T, dynamic, backend>;
  using bias_type = typename backend::template vector<T>;
  using workspace = typename backend::template workspace<T>;
  using matrix_type = typename backend::template matrix<T>;
  using weighted_names = detail::adapters::weighted_names;
  using gather_workspace = GatherWorkspace<T, backend>;
  using gradients_type = MultiAdapterGradients<T, backend>;

  static constexpr bool base_is_writable = weight_traits<Base>::writable;
  static constexpr bool base_is_quantized = QuantizedMatrix<Base>;

  static_assert(std::is_same_v<typename weight_traits<Base>::scalar, T>,
                "lora::MultiAdapterLinear<Base, T>: the base weight's (compute) scalar is not T; use the same T "
                "(a bf16 / fp16 / NF4 base computes in float)");

  /// One active adapter as a forward reads it: the factors (kept alive by the
  /// snapshot) and the product w * s, rounded once to T.
  struct Term {
    std::shared_ptr<const delta_type> delta;
    T scale;
  };
  /// The active set, immutable once published.
  struct Snapshot {
    std::vector<Term> terms;
  };
  /// Every slot ever assigned, immutable once published: what the gathered
  /// calls read. A removed adapter's slot keeps its name and a null delta.
  struct Bank {
    struct Slot {
      std::shared_ptr<const delta_type> delta;  ///< null once removed
      T scale;                                  ///< s_k (multiplier included), rounded to T once
      std::string name;
    };
    std::vector<Slot> slots;
    bool merged = false;  ///< W holds the active set: gathered calls refuse
  };

  explicit MultiAdapterLinear(Base weight) : w_(std::move(weight)), s_(std::make_unique<State>()) {}

  MultiAdapterLinear(Base weight, bias_type bias)
      : w_(std::move(weight)), bias_(std::move(bias)), s_(std::make_unique<State>()) {
    detail::check_bias_length("MultiAdapterLinear", bias_, out_features());
  }

  index_t in_features() const { return w_.cols(); }
  index_t out_features() const { return w_.rows(); }
  bool has_bias() const { return bias_.rows() != 0; }
  const Base& base_weight() const { return w_; }
  const bias_type& bias() const { return bias_; }

  // ---- the registry -------------------------------------------------------------
  /// Registers `delta` under `name` (inactive). ShapeError unless it is
  /// [out, in] like the base; ValueError on an empty or duplicate name.
  void add(std::string name, delta_type delta) {
    std::lock_guard lock(s_->mutex);
    add_locked(std::move(name), std::move(delta));
  }

  /// Drops the adapter (and from the active set). Forwards already running
  /// with it finish with it. ValueError when unknown, or merged into W.
  void remove(std::string_view name) {
    std::lock_guard lock(s_->mutex);
    const auto it = find(name, "MultiAdapterLinear::remove");
    if (s_->merged && in_active(name))
      detail::raise<ValueError>("MultiAdapterLinear::remove: adapter '", name,
                                "' is merged into W; unmerge() first");
    std::erase_if(s_->active, [&](const auto& a) { return a.first == name; });
    s_->entries.erase(it);
    if (!s_->merged) publish();
    publish_bank();
  }

  bool contains(std::string_view name) const {
    std::lock_guard lock(s_->mutex);
    return std::ranges::any_of(s_->entries, [&](const Entry& e) { return e.name == name; });
  }

  /// Adapter names, in the order they were added.
  std::vector<std::string> names() const {
    std::lock_guard lock(s_->mutex);
    std::vector<std::string> out;
    for (const Entry& e : s_->entries) out.push_back(e.name);
    return out;
  }

  /// The adapter's factors and options (multiplier included). The reference
  /// lives until the adapter is removed; not to be read while another thread
  /// calls set_multiplier on the same adapter.
  const delta_type& delta(std::string_view name) const {
    std::lock_guard lock(s_->mutex);
    return *find(name, "MultiAdapterLinear::delta")->delta;
  }

  /// The adapter's multiplier (s includes it), for this and every later forward.
  /// ValueError when unknown, not finite, or the adapter is merged into W.
  void set_multiplier(std::string_view name, double m) {
    std::lock_guard lock(s_->mutex);
    const auto it = find(name, "MultiAdapterLinear::set_multiplier");
    if (s_->merged && in_active(name))
      detail::raise<ValueError>("MultiAdapterLinear::set_multiplier: adapter '", name,
                                "' is merged into W; unmerge() first");
    it->delta->set_multiplier(m);  // forwards never read the options, only the snapshot's scale
    if (!s_->merged && in_active(name)) publish();
    publish_bank();
  }

  // ---- the active set -------------------------------------------------------------
  /// One adapter active at weight 1.
  void set_active(std::string_view name) { set_active({{name, 1.0}}); }
  /// Several, each with a weight multiplying its scale; {} = the base alone.
  void set_active(std::initializer_list<std::pair<std::string_view, double>> weighted) {
    set_active_impl(detail::adapters::own(weighted));
  }
  void set_active(std::span<const std::pair<std::string, double>> weighted) {
    set_active_impl(detail::adapters::own(weighted));
  }

  /// The active names and weights, in the order given to set_active.
  weighted_names active() const {
    std::lock_guard lock(s_->mutex);
    return s_->active;
  }

  /// The active set a forward starting now would use (an atomic load).
  std::shared_ptr<const Snapshot> snapshot() const { return s_->snapshot.load(); }

  // ---- slots: per-token adapter ids -------------------------------------------------
  /// The adapter's slot, its id in a gathered batch. Slots are given in the
  /// order of add() (0, 1, 2, ...) and never reused: a removed adapter's slot
  /// stays dead (ids naming it are refused), and adding the name again gives a
  /// new slot. ValueError when unknown.
  index_t slot(std::string_view name) const {
    std::lock_guard lock(s_->mutex);
    return find(name, "MultiAdapterLinear::slot")->slot;
  }
  /// Slots assigned so far (live and dead): ids run over [-1, slot_count()).
  index_t slot_count() const {
    std::lock_guard lock(s_->mutex);
    return static_cast<index_t>(s_->slot_names.size());
  }
  /// The bank a gathered call starting now would use (an atomic load).
  std::shared_ptr<const Bank> bank() const { return s_->bank.load(); }

  /// The adapter in `slot`, writable, for training (PerAdapterOptimizer): the
  /// pointer keeps it alive after a remove. Writing A or B while any forward
  /// runs is a race (as with AdaptedLinear): train between forwards, not
  /// during them. ValueError for an unknown or removed slot.
  std::shared_ptr<delta_type> trainable_delta(index_t slot) {
    std::lock_guard lock(s_->mutex);
    for (const Entry& e : s_->entries)
      if (e.slot == slot) return e.delta;
    detail::raise<ValueError>("MultiAdapterLinear::trainable_delta: slot ", slot, " holds no adapter (slots 0..",
                              static_cast<index_t>(s_->slot_names.size()) - 1, ")");
  }

  /// Zero gradients for every live adapter, by slot.
  gradients_type make_gradients() const {
    gradients_type g;
    std::lock_guard lock(s_->mutex);
    for (const Entry& e : s_->entries) g.ensure(e.slot, out_features(), in_features(), e.delta->rank());
    return g;
  }

  // ---- gathered forward --------------------------------------------------------------
  /// Y [n, out] = X W^T + b + s_k (X[t] A_k^T) B_k^T per token t, k = ids[t]
  /// (-1: the base alone); the active set plays no part. Y is overwritten.
  /// ids are checked first (ShapeError unless n of them; ValueError naming
  /// the token and the id for one out of range or naming a removed slot; Y is
  /// then untouched); ValueError while merged. The base product runs once for
  /// the batch; the adapters' terms per segment of tokens (on a device, two
  /// fused kernels for all of them; docs/adapters.md, "Per-token adapters").
  /// No allocation once `ws` has seen the shape.
  template <Matrix X, Matrix Y>
  void forward(const X& x, std::span<const std::int32_t> ids, Y&& y, gather_workspace& ws) const {
    gathered_forward(x, ids, y, ws, true);
  }
  template <Matrix X, Matrix Y>
  void forward(const X& x, std::span<const std::int64_t> ids, Y&& y, gather_workspace& ws) const {
    gathered_forward(x, ids, y, ws, true);
  }
  template <Matrix X, Matrix Y>
  void forward(const X& x, std::span<const std::int32_t> ids, Y&& y) const {
    gather_workspace ws;
    gathered_forward(x, ids, y, ws, true);
  }
  template <Matrix X, Matrix Y>
  void forward(const X& x, std::span<const std::int64_t> ids, Y&& y) const {
    gather_workspace ws;
    gathered_forward(x, ids, y, ws, true);
  }

  /// Only the adapters' part: Y += s_k (X[t] A_k^T) B_k^T per token (no base,
  /// no bias), for a caller that computes the base product elsewhere. Same
  /// checks as the gathered forward.
  template <Matrix X, Matrix Y>
  void add_adapter_terms(const X& x, std::span<const std::int32_t> ids, Y&& y, gather_workspace& ws) const {
    gathered_forward(x, ids, y, ws, false);
  }
  template <Matrix X, Matrix Y>
  void add_adapter_terms(const X& x, std::span<const std::int64_t> ids, Y&& y, gather_workspace& ws) const {
    gathered_forward(x, ids, y, ws, false);
  }

  // ---- gathered backward --------------------------------------------------------------
  /// For G = dL/dY [n, out] of a gathered forward over (X, ids): every present
  /// adapter's dB_k = s_k G_k^T (X_k A_k^T), dA_k = s_k (G_k B_k)^T X_k
  /// (G_k, X_k: its tokens' rows) into `grads`, and dX = G W + s_k (G_k B_k) A_k
  /// per token. Not accumulating: `grads` first marks every slot absent.
  /// Accumulating: present slots add, others start. The base is frozen (no
  /// dW); the bias is frozen here too. Same id checks as forward.
  template <Matrix X, Matrix G, Matrix DX>
  void backward(const X& x, std::span<const std::int32_t> ids, const G& g, gradients_type& grads, DX&& dx,
                gather_workspace& ws, train::BackwardOptions options = {}) const {
    gathered_backward(x, ids, g, grads, &dx, ws, options);
  }
  template <Matrix X, Matrix G, Matrix DX>
  void backward(const X& x, std::span<const std::int64_t> ids, const G& g, gradients_type& grads, DX&& dx,
                gather_workspace& ws, train::BackwardOptions options = {}) const {
    gathered_backward(x, ids, g, grads, &dx, ws, options);
  }
  /// dA_k, dB_k only (the first layer needs no dX).
  template <Matrix X, Matrix G>
  void backward(const X& x, std::span<const std::int32_t> ids, const G& g, gradients_type& grads,
                gather_workspace& ws, train::BackwardOptions options = {}) const {
    gathered_backward(x, ids, g, grads, static_cast<matrix_type*>(nullptr), ws, options);
  }
  template <Matrix X, Matrix G>
  void backward(const X& x, std::span<const std::int64_t> ids, const G& g, gradients_type& grads,
                gather_workspace& ws, train::BackwardOptions options = {}) const {
    gathered_backward(x, ids, g, grads, static_cast<matrix_type*>(nullptr), ws, options);
  }

  // ---- forward ----------------------------------------------------------------------
  /// Y [n, out] = X [n, in] W^T + b + sum_k w_k s_k (X A_k^T) B_k^T; Y is
  /// overwritten. No allocation once `ws` has held [n, max active r].
  template <Matrix X, Matrix Y>
  void forward(const X& x, Y&& y, workspace& ws) const {
    static_assert(std::is_same_v<scalar_of_t<X>, T>,
                  "lora::MultiAdapterLinear::forward: X has a different scalar type than the layer");
    detail::check_linear_io<backend>("MultiAdapterLinear::forward", x, y, in_features(), out_features());
    // One load: every term below comes from the same active set.
    const std::shared_ptr<const Snapshot> snap = snapshot();
    expr::apply(expr::base_leaf(w_), x, y, T(1), T(0), ws);  // Y = X W^T (merged: W holds the deltas)
    for (const Term& t : snap->terms)
      expr::apply(t.scale * expr::product(t.delta->B(), t.delta->A()), x, y, T(1), T(1), ws);
    if (has_bias()) BackendOps<backend>::add_to_rows(T(1), bias_, y);
  }

  /// forward(x, y) (a workspace per call) and forward(x) (returns Y [n, out];
  /// a compile-time column vector x [in] gives y [out]).
  using detail::LinearForwards<MultiAdapterLinear>::forward;

  /// The effective weight, dense: W (dequantised) + sum of the active deltas.
  typename backend::template matrix<T> merged_weight() const {
    auto m = expr::materialize(expr::base_leaf(w_));
    const std::shared_ptr<const Snapshot> snap = snapshot();
    for (const Term& t : snap->terms) expr::assign(m, t.scale * expr::product(t.delta->B(), t.delta->A()), T(1), T(1));
    return m;
  }

  // ---- merge ----------------------------------------------------------------------
  /// W += sum of the active deltas; the active set is then frozen (set_active,
  /// and set_multiplier / remove of a merged adapter, throw ValueError) until
  /// unmerge(). ValueError when already merged. Needs a writable dense base and
  /// no concurrent forward (it writes W).
  void merge_active() {
    require_writable();
    if constexpr (base_is_writable) {  // only the static_assert's sentence otherwise
      std::lock_guard lock(s_->mutex);
      if (s_->merged)
        detail::raise<ValueError>("MultiAdapterLinear::merge_active: already merged (",
                                  detail::adapters::join(active_names()), "); unmerge() first");
      const std::shared_ptr<const Snapshot> snap = snapshot();
      for (const Term& t : snap->terms)
        expr::assign(w_, t.scale * expr::product(t.delta->B(), t.delta->A()), T(1), T(1));
      s_->merged_terms = snap->terms;
      s_->merged = true;
      s_->snapshot.store(std::make_shared<const Snapshot>());  // W holds them now
      publish_bank();
    }
  }

  /// W -= exactly what merge_active added (the same scales). Returns false when
  /// not merged. Same exclusivity as merge_active.
  bool unmerge() {
    require_writable();
    if constexpr (base_is_writable) {
      std::lock_guard lock(s_->mutex);
      if (!s_->merged) return false;
      for (const Term& t : s_->merged_terms)
        expr::assign(w_, t.scale * expr::product(t.delta->B(), t.delta->A()), T(-1), T(1));
      s_->merged_terms.clear();
      s_->merged = false;
      publish();
      publish_bank();
      return true;
    } else {
      return false;
    }
  }

  bool merged() const {
    std::lock_guard lock(s_->mutex);
    return s_->merged;
  }

  // ---- moving between host and device ---------------------------------------------
  /// The same layer rebuilt from move(tensor) for W, the bias and every
  /// adapter (lora::to_device / lora::to_host call it): the same names, slots
  /// (removed ones stay dead), multipliers and active set. ValueError while
  /// merged (a merged W cannot be split back into base and deltas).
  template <class Move>
  auto transferred(Move move) const {
    std::lock_guard lock(s_->mutex);
    if (s_->merged)
      detail::raise<ValueError>("MultiAdapterLinear::transferred: the layer is merged (",
                                detail::adapters::join(active_names()), "); unmerge() it first");
    auto w = move(w_);
    using Out = MultiAdapterLinear<decltype(w), T>;
    Out out = has_bias() ? Out(std::move(w), move(bias_)) : Out(std::move(w));
    out.s_->slot_names = s_->slot_names;
    for (const Entry& e : s_->entries)
      out.s_->entries.push_back({e.name, std::make_shared<typename Out::delta_type>(move(*e.delta)), e.slot});
    out.s_->active = s_->active;
    out.publish();
    out.publish_bank();
    return out;
  }

  // ---- combinations -------------------------------------------------------------
  /// PEFT's add_weighted_adapter on this layer: combines the named adapters
  /// (see combine.hpp) and adds the result, inactive, as `new_name`. A single
  /// adapter always combines as linear (PEFT does the same). svd_rank 0 = the
  /// largest input rank. Returns the SVD report for Combination::svd.
  std::optional<init::SVDReport> add_weighted(std::string new_name,
                                              std::initializer_list<std::pair<std::string_view, double>> weighted,
                                              Combination how, index_t svd_rank = 0,
                                              std::optional<double> svd_clamp = {}) {
    return add_weighted_impl(std::move(new_name), detail::adapters::own(weighted), how, svd_rank, svd_clamp);
  }
  std::optional<init::SVDReport> add_weighted(std::string new_name,
                                              std::span<const std::pair<std::string, double>> weighted,
                                              Combination how, index_t svd_rank = 0,
                                              std::optional<double> svd_clamp = {}) {
    return add_weighted_impl(std::move(new_name), detail::adapters::own(weighted), how, svd_rank, svd_clamp);
  }

 private:
  template <BaseWeight, class>
  friend class MultiAdapterLinear;  // transferred() fills the other backend's registry

  struct Entry {
    std::string name;
    std::shared_ptr<delta_type> delta;  // A, B never change after add (except by training); the multiplier may
    index_t slot = 0;
  };
  // Behind a pointer so the layer stays movable (std::mutex and std::atomic are not).
  struct State {
    mutable std::mutex mutex;  // serialises the mutators; forwards never take it
    std::vector<Entry> entries;
    weighted_names active;
    bool merged = false;
    std::vector<Term> merged_terms;  // what merge_active added, for unmerge
    detail::adapters::SnapshotSlot<Snapshot> snapshot{std::make_shared<const Snapshot>()};
    std::vector<std::string> slot_names;  // by slot, removed ones included: slots are never reused
    detail::adapters::SnapshotSlot<Bank> bank{std::make_shared<const Bank>()};
  };

  typename std::vector<Entry>::iterator find(std::string_view name, const char* where) const {
    const auto it = std::ranges::find_if(s_->entries, [&](const Entry& e) { return e.name == name; });
    if (it == s_->entries.end())
      detail::raise<ValueError>(where, ": no adapter named '", name, "' (adapters: ", detail::adapters::join(names_locked()),
                                ")");
    return it;
  }
  std::vector<std::string_view> names_locked() const {
    std::vector<std::string_view> out;
    for (const Entry& e : s_->entries) out.push_back(e.name);
    return out;
  }
  std::vector<std::string_view> active_names() const {
    std::vector<std::string_view> out;
    for (const auto& a : s_->active) out.push_back(a.first);
    return out;
  }
  bool in_active(std::string_view name) const {
    return std::ranges::any_of(s_->active, [&](const auto& a) { return a.first == name; });
  }

  void add_locked(std::string name, delta_type delta) {
    const char* where = "MultiAdapterLinear::add";
    if (name.empty()) detail::raise<ValueError>(where, ": the adapter name is empty");
    if (std::ranges::any_of(s_->entries, [&](const Entry& e) { return e.name == name; }))
      detail::raise<ValueError>(where, ": an adapter named '", name, "' already exists; remove() it first");
    delta.check_consistent(where);
    if (delta.out_features() != out_features() || delta.in_features() != in_features())
      detail::raise<ShapeError>(where, ": adapter '", name, "' is [out, in] = [", delta.out_features(), ", ",
                                delta.in_features(), "] but the base weight is [", out_features(), ", ",
                                in_features(), "]");
    const auto slot = static_cast<index_t>(s_->slot_names.size());
    s_->slot_names.push_back(name);
    s_->entries.push_back({std::move(name), std::make_shared<delta_type>(std::move(delta)), slot});
    publish_bank();
  }

  /// Builds the bank (every slot's delta and s_k) and makes it the one
  /// gathered calls load. Caller holds the mutex.
  void publish_bank() {
    auto bank = std::make_shared<Bank>();
    bank->slots.resize(s_->slot_names.size());
    for (std::size_t k = 0; k < s_->slot_names.size(); ++k) bank->slots[k] = {nullptr, T(0), s_->slot_names[k]};
    for (const Entry& e : s_->entries)
      bank->slots[e.slot] = {e.delta, static_cast<T>(scale_for(e.delta->options(), e.delta->rank())), e.name};
    bank->merged = s_->merged;
    s_->bank.store(std::move(bank));
  }

  void set_active_impl(weighted_names weighted) {
    const char* where = "MultiAdapterLinear::set_active";
    detail::adapters::check_weighted(where, weighted);
    std::lock_guard lock(s_->mutex);
    if (s_->merged)
      detail::raise<ValueError>(where, ": the layer is merged (", detail::adapters::join(active_names()),
                                "); unmerge() first");
    for (const auto& a : weighted) find(a.first, where);
    s_->active = std::move(weighted);
    publish();
  }

  /// Builds the snapshot of the current active set and makes it the one
  /// forwards load (the only place that allocates for a swap). Caller holds
  /// the mutex.
  void publish() {
    auto snap = std::make_shared<Snapshot>();
    snap->terms.reserve(s_->active.size());
    for (const auto& [name, w] : s_->active) {
      const Entry& e = *find(name, "MultiAdapterLinear::publish");
      const double s = w * scale_for(e.delta->options(), e.delta->rank());
      snap->terms.push_back({e.delta, static_cast<T>(s)});
    }
    s_->snapshot.store(std::move(snap));
  }

  // ---- the gathered calls ------------------------------------------------------------
  using Segment = detail::adapters::Segment;
  static constexpr bool on_eigen = std::is_same_v<backend, EigenBackend>;
  using Lane = typename gather_workspace::Lane;

  /// Every id -1 or a live slot of `bank`, n of them; throws before anything
  /// is written.
  template <class Id>
  static void check_ids(const char* where, const Bank& bank, std::span<const Id> ids, index_t n) {
    if (static_cast<index_t>(ids.size()) != n)
      detail::raise<ShapeError>(where, ": ids has ", ids.size(), " entries but X has ", n,
                                " rows (one adapter id per token)");
    if (bank.merged)
      detail::raise<ValueError>(where, ": the layer is merged (W holds its active set, which every token "
                                       "would then get); unmerge() first");
    const auto slots = static_cast<long long>(bank.slots.size());
    for (index_t t = 0; t < n; ++t) {
      const auto id = static_cast<long long>(ids[t]);
      if (id == -1) continue;
      if (id < -1 || id >= slots)
        detail::raise<ValueError>(where, ": token ", t, " has adapter id ", id, ", which is not a slot (slots 0..",
                                  slots - 1, "; -1 = the base alone)");
      if (!bank.slots[id].delta)
        detail::raise<ValueError>(where, ": token ", t, " has adapter id ", id, ", the slot of adapter '",
                                  bank.slots[id].name, "', which was removed (slots are never reused)");
    }
  }

  /// Groups the tokens by slot: a stable counting sort into ws.order_, one
  /// segment per slot with tokens (slot order), and the schedule (costliest
  /// first). O(n + slots); allocates only when the workspace grows.
  template <class Id>
  void plan(const char* where, std::span<const Id> ids, const Bank& bank, gather_workspace& ws) const {
    const auto n = static_cast<index_t>(ids.size());
    const auto slots = static_cast<index_t>(bank.slots.size());
    auto& counts = ws.counts_;
    auto& order = ws.order_;
    counts.assign(static_cast<std::size_t>(slots) + 1, 0);
    for (const Id id : ids)
      if (id >= 0) ++counts[static_cast<std::size_t>(id) + 1];
    for (index_t k = 0; k < slots; ++k) counts[k + 1] += counts[k];  // counts[k]: where slot k starts
    order.resize(static_cast<std::size_t>(n));
    for (index_t t = 0; t < n; ++t)
      if (ids[t] >= 0) order[counts[ids[t]]++] = t;  // stable: tokens keep their order within a slot
    // Now counts[k] is where slot k ends, so slot k starts at counts[k - 1].
    ws.segments_.clear();
    const double width = static_cast<double>(in_features() + out_features());
    for (index_t k = 0; k < slots; ++k) {
      const index_t begin = k == 0 ? 0 : counts[k - 1], count = counts[k] - begin;
      if (count == 0) continue;
      const delta_type& d = *bank.slots[k].delta;
      d.check_consistent(where);  // training could have resized a factor
      if (d.out_features() != out_features() || d.in_features() != in_features())
        detail::raise<ShapeError>(where, ": adapter '", bank.slots[k].name, "' is now [", d.out_features(), ", ",
                                  d.in_features(), "], the layer [", out_features(), ", ", in_features(), "]");
      bool contiguous = true;
      for (index_t i = 1; i < count && contiguous; ++i) contiguous = order[begin + i] == order[begin] + i;
      ws.segments_.push_back({k, begin, count, static_cast<double>(count) * static_cast<double>(d.rank()) * width,
                              contiguous});
    }
    ws.schedule_.resize(ws.segments_.size());
    for (std::size_t i = 0; i < ws.schedule_.size(); ++i) ws.schedule_[i] = static_cast<index_t>(i);
    std::sort(ws.schedule_.begin(), ws.schedule_.end(), [&](index_t a, index_t b) {
      const Segment &sa = ws.segments_[a], &sb = ws.segments_[b];
      return sa.cost != sb.cost ? sa.cost > sb.cost : sa.slot < sb.slot;
    });
  }

  /// f(segment, lane) for every planned segment. A segment with more than
  /// half of the total cost (the whole batch's single one, say) runs first
  /// on its own, so its products may use the threaded kernels as a plain
  /// forward does; the others are spread over the OpenMP threads, costliest
  /// first, each thread taking the next when done. Inside that region the
  /// library's kernels run single-threaded (they check omp_in_parallel, and
  /// Eigen's GEMM omp_get_num_threads), so nothing is oversubscribed.
  /// Segments write disjoint rows of Y / dX and disjoint slots' gradients.
  template <class F>
  static void run_segments(gather_workspace& ws, F&& f) {
    const auto count = static_cast<index_t>(ws.segments_.size());
    ws.parallel_ = false;
    if (count == 0) return;
    if (ws.lanes_.empty()) ws.lanes_.resize(1);
    double total = 0.0;
    for (const Segment& sg : ws.segments_) total += sg.cost;
    index_t first = 0;
    if (count == 1 || ws.segments_[ws.schedule_[0]].cost * 2.0 > total) {
      f(ws.segments_[ws.schedule_[0]], ws.lanes_[0]);
      first = 1;
    }
    int threads = 1;
#ifdef _OPENMP
    // Not on a device backend: there segments run in turn, each parallel inside.
    if (on_eigen && !omp_in_parallel())
      threads = static_cast<int>(std::min<index_t>(omp_get_max_threads(), count - first));
#endif
    if (threads <= 1) {
      for (index_t i = first; i < count; ++i) f(ws.segments_[ws.schedule_[i]], ws.lanes_[0]);
      return;
    }
#ifdef _OPENMP
    if (ws.lanes_.size() < static_cast<std::size_t>(threads)) ws.lanes_.resize(static_cast<std::size_t>(threads));
    ws.parallel_ = true;
    std::exception_ptr error;  // an exception may not leave a parallel region
#pragma omp parallel num_threads(threads)
    {
      Lane& lane = ws.lanes_[static_cast<std::size_t>(omp_get_thread_num())];
#pragma omp for schedule(dynamic, 1)
      for (index_t i = first; i < count; ++i) {
        try {
          f(ws.segments_[ws.schedule_[i]], lane);
        } catch (...) {
#pragma omp critical(lora_gathered_error)
          if (!error) error = std::current_exception();
        }
      }
    }
    if (error) std::rethrow_exception(error);
#endif
  }

  /// The token order as the segment kernels read it: the workspace's host
  /// array on Eigen; elsewhere uploaded once per call (the tokens that have an
  /// adapter, when some segment has to be gathered).
  static const index_t* kernel_order(gather_workspace& ws) {
    if constexpr (on_eigen) {
      return ws.order_.data();
    } else {
      const bool gathers = std::ranges::any_of(ws.segments_, [](const Segment& sg) { return !sg.contiguous; });
      if (!gathers) return nullptr;
      const Segment& last = ws.segments_.back();  // slot order: the last ends the tokens with an adapter
      backend::from_host(Eigen::Map<const Eigen::Matrix<index_t, Eigen::Dynamic, 1>>(ws.order_.data(),
                                                                                   last.begin + last.count),
                         ws.order_device_);
      return backend::data(ws.order_device_);
    }
  }

  /// A segment's tokens gathered: dst(i, :) = src(idx[i], :).
  template <class S, class D>
  static void gather_segment(const S& src, const index_t* idx, D&& dst) {
    detail::gather_rows<backend>(detail::strided(src), idx, detail::strided(dst));
  }
  /// A segment's rows added back to its tokens: dst(idx[i], :) += src(i, :).
  template <class S, class D>
  static void scatter_add_segment(const S& src, const index_t* idx, D&& dst) {
    detail::add_rows_at<backend>(detail::strided(src), idx, detail::strided(dst));
  }

  template <class X, class Y>
  void check_gathered(const char* where, const X& x, const Y& y, index_t y_cols, const char* y_name) const {
    if (x.cols() != in_features())
      detail::raise<ShapeError>(where, ": X has ", x.cols(), " columns, expected in_features = ", in_features());
    if (y.rows() != x.rows() || y.cols() != y_cols)
      detail::raise<ShapeError>(where, ": ", y_name, " is [", y.rows(), ", ", y.cols(), "], expected [", x.rows(),
                                ", ", y_cols, "]");
  }

  template <class X, class Y, class Id>
  void gathered_forward(const X& x, std::span<const Id> ids, Y& y, gather_workspace& ws, bool with_base) const {
    static_assert(std::is_same_v<scalar_of_t<X>, T> && std::is_same_v<scalar_of_t<Y>, T>,
                  "lora::MultiAdapterLinear::forward: X or Y has a different scalar type than the layer");
    const char* where = with_base ? "MultiAdapterLinear::forward (gathered)" : "MultiAdapterLinear::add_adapter_terms";
    check_gathered(where, x, y, out_features(), "Y");
    if (backend::overlaps(x, y))
      detail::raise<ShapeError>(where, ": X and Y share memory; forward cannot run in place");
    // One load: every adapter and scale below comes from the same bank.
    const std::shared_ptr<const Bank> bank = s_->bank.load();
    check_ids(where, *bank, ids, x.rows());
    plan(where, ids, *bank, ws);
    if (x.rows() == 0) return;
    if (with_base) expr::apply(expr::base_leaf(w_), x, y, T(1), T(0), ws.base_);  // Y = X W^T, the whole batch
    if constexpr (on_eigen) {
      const index_t* order = kernel_order(ws);
      run_segments(ws, [&](const Segment& sg, Lane& lane) {
        const typename Bank::Slot& sl = bank->slots[sg.slot];
        const auto term = sl.scale * expr::product(sl.delta->B(), sl.delta->A());
        const index_t m = sg.count, first = ws.order_[sg.begin];
        if (sg.contiguous) {  // AdaptedLinear::forward's own call on these rows
          expr::apply(term, backend::middle_rows(x, first, m), backend::middle_rows(y, first, m), T(1), T(1),
                      lane.eval);
        } else {
          auto xg = lane.matrix(0, m, in_features());
          auto yg = lane.matrix(1, m, out_features());
          gather_segment(x, order + sg.begin, xg);
          expr::apply(term, xg, yg, T(1), T(0), lane.eval);  // shrink X_k A_k^T, expand s_k H B_k^T
          scatter_add_segment(yg, order + sg.begin, y);
        }
      });
    } else {  // a device: two fused kernels for every adapter present, no gather (detail/sgmv.hpp)
      auto& fused = ws.sgmv_;
      fused.reset(x.rows());
      for (const Segment& sg : ws.segments_) {
        const typename Bank::Slot& sl = bank->slots[sg.slot];
        fused.add(detail::strided(sl.delta->A()), detail::strided(sl.delta->B()), sl.scale,
                  std::span<const index_t>(ws.order_).subspan(static_cast<std::size_t>(sg.begin),
                                                              static_cast<std::size_t>(sg.count)));
      }
      fused.run(detail::strided(x), detail::strided(y));  // Y += s_k (X[t] A_k^T) B_k^T per token
    }
    if (with_base && has_bias()) BackendOps<backend>::add_to_rows(T(1), bias_, y);
  }

  template <class X, class G, class DX, class Id>
  void gathered_backward(const X& x, std::span<const Id> ids, const G& g, gradients_type& grads, DX* dx,
                         gather_workspace& ws, train::BackwardOptions options) const {
    static_assert(std::is_same_v<scalar_of_t<X>, T> && std::is_same_v<scalar_of_t<G>, T>,
                  "lora::MultiAdapterLinear::backward: X or G has a different scalar type than the layer");
    const char* where = "MultiAdapterLinear::backward (gathered)";
    check_gathered(where, x, g, out_features(), "G");
    if (dx) {
      static_assert(std::is_same_v<scalar_of_t<DX>, T>,
                    "lora::MultiAdapterLinear::backward: dX has a different scalar type than the layer");
      check_gathered(where, x, *dx, in_features(), "dX");
      if (backend::overlaps(g, *dx) || backend::overlaps(x, *dx))
        detail::raise<ShapeError>(where, ": dX shares memory with X or G");
    }
    const std::shared_ptr<const Bank> bank = s_->bank.load();
    check_ids(where, *bank, ids, x.rows());
    plan(where, ids, *bank, ws);
    if (!options.accumulate) grads.clear();
    // Gradients allocated here, before the threads: each segment then writes
    // only its own slot's tensors (a slot has one segment).
    for (const Segment& sg : ws.segments_) {
      const index_t r = bank->slots[sg.slot].delta->rank();
      auto& gk = grads.ensure(sg.slot, out_features(), in_features(), r);
      if (gk.dA().rows() != r || gk.dA().cols() != in_features() || gk.dB().rows() != out_features() ||
          gk.dB().cols() != r)
        detail::raise<ShapeError>(where, ": the gradients of slot ", sg.slot, " are dA [", gk.dA().rows(), ", ",
                                  gk.dA().cols(), "], dB [", gk.dB().rows(), ", ", gk.dB().cols(),
                                  "], the adapter is rank ", r, " over [", out_features(), ", ", in_features(), "]");
    }
    if (dx) expr::apply_transposed(expr::base_leaf(w_), g, *dx, T(1), options.accumulate_dx ? T(1) : T(0), ws.base_);
    if (x.rows() == 0) return;
    const index_t* order = kernel_order(ws);
    run_segments(ws, [&](const Segment& sg, Lane& lane) {
      const typename Bank::Slot& sl = bank->slots[sg.slot];
      const delta_type& d = *sl.delta;
      auto& gk = *grads.g_[sg.slot];
      const T s = sl.scale, beta = grads.tokens_[sg.slot] > 0 ? T(1) : T(0);  // accumulate onto earlier batches
      const index_t m = sg.count, first = ws.order_[sg.begin], r = d.rank();
      auto h = lane.saved.matrix(m, r, 0);   // (m, r) = X_k A^T, what the forward's shrink computed
      auto gb = lane.saved.matrix(m, r, 1);  // (m, r) = G_k B
      // LowRankDelta::backward's products, in its order, with the bank's s_k.
      const auto grads_of = [&](const auto& xs, const auto& gs) {
        backend::gemm_nt(T(1), xs, d.A(), T(0), h);
        backend::gemm_nn(T(1), gs, d.B(), T(0), gb);
        backend::gemm_tn(s, gs, h, beta, gk.dB());   // (out, r) = s G_k^T H
        backend::gemm_tn(s, gb, xs, beta, gk.dA());  // (r, in) = s (G_k B)^T X_k
      };
      if (sg.contiguous) {
        grads_of(backend::middle_rows(x, first, m), backend::middle_rows(g, first, m));
        if (dx) backend::gemm_nn(s, gb, d.A(), T(1), backend::middle_rows(*dx, first, m));  // dX_k += s (G_k B) A
      } else {
        auto xg = lane.matrix(0, m, in_features());
        auto gg = lane.matrix(1, m, out_features());
        gather_segment(x, order + sg.begin, xg);
        gather_segment(g, order + sg.begin, gg);
        grads_of(xg, gg);
        if (dx) {
          auto dxg = lane.matrix(2, m, in_features());
          backend::gemm_nn(s, gb, d.A(), T(0), dxg);
          scatter_add_segment(dxg, order + sg.begin, *dx);
        }
      }
    });
    for (const Segment& sg : ws.segments_) grads.tokens_[sg.slot] += sg.count;
  }

  std::optional<init::SVDReport> add_weighted_impl(std::string new_name, weighted_names weighted, Combination how,
                                                   index_t svd_rank, std::optional<double> svd_clamp) {
    static_assert(on_eigen,
                  "lora::MultiAdapterLinear::add_weighted: combine() (and its SVD) runs on the host only; combine "
                  "on a host layer and move the result with lora::to_device");
    if constexpr (on_eigen) {  // only the static_assert's sentence otherwise
      const char* where = "MultiAdapterLinear::add_weighted";
      detail::adapters::check_weighted(where, weighted);
      std::lock_guard lock(s_->mutex);
      if (std::ranges::any_of(s_->entries, [&](const Entry& e) { return e.name == new_name; }))
        detail::raise<ValueError>(where, ": an adapter named '", new_name, "' already exists");
      std::vector<WeightedDelta<T>> in;
      for (const auto& [name, w] : weighted) in.push_back({*find(name, where)->delta, w});
      if (in.size() == 1) how = Combination::linear;
      Combined<T> c = combine(std::span<const WeightedDelta<T>>(in), how, svd_rank, svd_clamp);
      add_locked(std::move(new_name), std::move(c.delta));
      return std::move(c.report);
    } else {
      return {};
    }
  }

  static void require_writable() {
    static_assert(base_is_writable || !base_is_quantized,
                  "lora::MultiAdapterLinear: merge_active()/unmerge() cannot add into a compressed (NF4) or "
                  "16-bit base in place; use layer.merged_weight() for a dense merged W");
    static_assert(base_is_writable || base_is_quantized,
                  "lora::MultiAdapterLinear: merge_active()/unmerge() write W, but the base weight is read-only "
                  "(e.g. Eigen::Map<const RowMatrix<T>>); wrap the buffer in a writable "
                  "Eigen::Map<RowMatrix<T>> or let the layer own a copy");
  }

  Base w_;
  bias_type bias_;
  std::unique_ptr<State> s_;
};

/// One lora::train optimizer (train::AdamW<T>, train::SGD<T>) per adapter
/// slot of a MultiAdapterLinear, over that adapter's A and B (B at lr *
/// lora_plus_ratio, as the optimizers' add() does), so that step() updates
/// only the adapters that had tokens in the gathered backward
/// (grads.present(slot)): an absent adapter gets no step, no weight decay, no
/// moment update and no step count, exactly as if it had not been trained
/// this iteration. Each adapter's clipping (max_grad_norm) is over its own
/// gradients: tenants are independent models. The layer, the gradients and
/// this object are held by address; the adapters by shared_ptr (a removed
/// adapter's optimizer keeps it alive until sync() drops it).
template <class Layer, class Opt>
class PerAdapterOptimizer {
 public:
  using options_type = std::remove_cvref_t<decltype(std::declval<const Opt&>().options())>;
  using scalar = typename Layer::scalar;

  /// Registers every adapter that has gradients in `grads` (make_gradients()
  /// gives all live ones).
  PerAdapterOptimizer(Layer& layer, typename Layer::gradients_type& grads, options_type options = {})
      : layer_(&layer), grads_(&grads), options_(options) {
    sync();
  }

  /// Registers adapters added since (and allocates their gradients); drops
  /// the optimizers of removed ones.
  void sync() {
    const auto bank = layer_->bank();
    const auto slots = static_cast<index_t>(bank->slots.size());
    if (static_cast<index_t>(opts_.size()) < slots) opts_.resize(static_cast<std::size_t>(slots));
    for (index_t k = 0; k < slots; ++k) {
      auto& o = opts_[static_cast<std::size_t>(k)];
      if (!bank->slots[k].delta) {
        o = {};
        continue;
      }
      if (o.opt) continue;
      o.delta = layer_->trainable_delta(k);
      auto& g = grads_->ensure(k, layer_->out_features(), layer_->in_features(), o.delta->rank());
      o.opt = std::make_unique<Opt>(options_);
      const std::string& name = bank->slots[k].name;
      o.opt->add_tensor(name + ".lora_A", o.delta->A(), g.dA(), 1.0);
      o.opt->add_tensor(name + ".lora_B", o.delta->B(), g.dB(), options_.lora_plus_ratio);
    }
  }

  /// One step of every adapter present in the gradients; returns how many
  /// stepped. ValueError while the layer is merged (W holds the old s B A), or
  /// when a present slot was never registered (call sync() after add()).
  index_t step() {
    if (layer_->merged())
      detail::raise<ValueError>("PerAdapterOptimizer::step: the layer is merged; unmerge() it before training");
    const auto bank = layer_->bank();
    index_t stepped = 0;
    for (index_t k = 0; k < grads_->slots(); ++k) {
      if (!grads_->present(k)) continue;
      const bool registered = k < static_cast<index_t>(opts_.size()) && opts_[static_cast<std::size_t>(k)].opt;
      // An adapter removed (and dropped by sync()) after its backward: nothing to step.
      if (!registered && k < static_cast<index_t>(bank->slots.size()) && !bank->slots[k].delta) continue;
      if (!registered)
        detail::raise<ValueError>("PerAdapterOptimizer::step: slot ", k,
                                  " has gradients but no optimizer; call sync() after adding adapters");
      opts_[static_cast<std::size_t>(k)].opt->step();
      ++stepped;
    }
    return stepped;
  }

  /// The optimizer of `slot` (its steps, last_grad_norm, set_lr); ValueError
  /// when none.
  Opt& optimizer(index_t slot) {
    if (slot < 0 || slot >= static_cast<index_t>(opts_.size()) || !opts_[static_cast<std::size_t>(slot)].opt)
      detail::raise<ValueError>("PerAdapterOptimizer::optimizer: slot ", slot, " has no optimizer");
    return *opts_[static_cast<std::size_t>(slot)].opt;
  }
  /// The learning rate of every adapter (schedules).
  void set_lr(double lr) {
    options_.lr = lr;
    for (auto& o : opts_)
      if (o.opt) o.opt->set_lr(lr);
  }

 private:
  struct PerSlot {
    std::shared_ptr<typename Layer::delta_type> delta;  // keeps the registered A, B alive
    std::unique_ptr<Opt> opt;
  };
  Layer* layer_;
  typename Layer::gradients_type* grads_;
  options_type options_;
  std::vector<PerSlot> opts_;
};

/// Layers by module path, and adapter operations across all of them by name.
/// A module an adapter does not cover simply has no delta there. Set-wide
/// operations are serialised among themselves and validate everything before
/// changing any layer; each layer swaps atomically for its own forwards, but a
/// forward through several layers during a set-wide swap may see some layers
/// before it and some after (docs/adapters.md, "Hot swap").
/// insert() is setup: not concurrent with anything else. A moved-from set may
/// only be destroyed or assigned to.
template <class Layer>
class AdapterSet {
 public:
  using layer_type = Layer;
  using scalar = typename Layer::scalar;
  using delta_type = typename Layer::delta_type;
  using weighted_names = detail::adapters::weighted_names;

  AdapterSet() = default;

  /// Adds a layer under its module path; ValueError on an empty or duplicate path.
  Layer& insert(std::string path, Layer layer) {
    std::lock_guard lock(*mutex_);
    if (path.empty()) detail::raise<ValueError>("AdapterSet::insert: the module path is empty");
    if (layers_.contains(path))
      detail::raise<ValueError>("AdapterSet::insert: a layer at '", path, "' already exists");
    order_.push_back(path);
    return layers_.emplace(std::move(path), std::move(layer)).first->second;
  }

  Layer& layer(std::string_view path) { return at(path, "AdapterSet::layer"); }
  const Layer& layer(std::string_view path) const { return at(path, "AdapterSet::layer"); }
  bool contains_path(std::string_view path) const { return layers_.find(path) != layers_.end(); }
  /// Module paths, in insertion order.
  const std::vector<std::string>& paths() const { return order_; }
  std::size_t size() const { return order_.size(); }

  /// Adapter names over all layers, in the order of first appearance (paths in
  /// insertion order, names in each layer's order).
  std::vector<std::string> adapters() const {
    std::vector<std::string> out;
    for (const std::string& p : order_)
      for (std::string& n : layers_.find(p)->second.names())
        if (std::ranges::find(out, n) == out.end()) out.push_back(std::move(n));
    return out;
  }
  bool contains_adapter(std::string_view name) const {
    return std::ranges::any_of(order_, [&](const std::string& p) { return layers_.find(p)->second.contains(name); });
  }
  /// The module paths `name` covers, in insertion order.
  std::vector<std::string> paths_of(std::string_view name) const {
    std::vector<std::string> out;
    for (const std::string& p : order_)
      if (layers_.find(p)->second.contains(name)) out.push_back(p);
    return out;
  }

  /// The primitive: adapter `name`'s delta at module `path`. ValueError for an
  /// unknown path or a name already at that path; ShapeError (naming the path)
  /// unless the delta is [out, in] of that layer.
  void add_adapter(std::string name, std::string_view path, delta_type delta) {
    std::lock_guard lock(*mutex_);
    const char* where = "AdapterSet::add_adapter";
    Layer& l = at(path, where);
    if (delta.out_features() != l.out_features() || delta.in_features() != l.in_features())
      detail::raise<ShapeError>(where, ": adapter '", name, "' at '", path, "' is [out, in] = [", delta.out_features(),
                                ", ", delta.in_features(), "] but the layer is [", l.out_features(), ", ",
                                l.in_features(), "]");
    if (l.contains(name)) detail::raise<ValueError>(where, ": adapter '", name, "' already exists at '", path, "'");
    l.add(std::move(name), std::move(delta));
  }

  /// Removes `name` from every layer it covers. ValueError when no layer has it
  /// or a layer has it merged into W.
  void remove_adapter(std::string_view name) {
    std::lock_guard lock(*mutex_);
    const char* where = "AdapterSet::remove_adapter";
    require_known(name, where);
    require_not_merged(name, where);
    for (const std::string& p : order_) {
      Layer& l = layers_.find(p)->second;
      if (l.contains(name)) l.remove(name);
    }
  }

  /// The active set of every layer: each layer activates the listed adapters
  /// it has. Every name must be known to some layer; {} = the bases alone.
  void set_active(std::string_view name) { set_active({{name, 1.0}}); }
  void set_active(std::initializer_list<std::pair<std::string_view, double>> weighted) {
    set_active_impl(detail::adapters::own(weighted));
  }
  void set_active(std::span<const std::pair<std::string, double>> weighted) {
    set_active_impl(detail::adapters::own(weighted));
  }

  /// The multiplier of `name` in every layer it covers.
  void set_multiplier(std::string_view name, double m) {
    std::lock_guard lock(*mutex_);
    const char* where = "AdapterSet::set_multiplier";
    require_known(name, where);
    detail::check_finite_parameter(where, "multiplier", m);
    require_not_merged(name, where);
    for (const std::string& p : order_) {
      Layer& l = layers_.find(p)->second;
      if (l.contains(name)) l.set_multiplier(name, m);
    }
  }

  /// PEFT's add_weighted_adapter across the model: at every path covered by at
  /// least one of the listed adapters, the ones present there are combined with
  /// their weights (the others skipped, as PEFT does) and added as `new_name`;
  /// a path covered by none gets nothing. One listed adapter combines as linear.
  /// svd: rank svd_rank, 0 = the largest rank of the listed adapters over all
  /// layers (PEFT's svd_rank = None), capped at each layer's min(out, in).
  /// Everything is computed before any layer changes. Returns (path, report)
  /// for svd, nothing otherwise.
  std::vector<std::pair<std::string, init::SVDReport>> add_weighted_adapter(
      std::string new_name, std::initializer_list<std::pair<std::string_view, double>> weighted, Combination how,
      index_t svd_rank = 0, std::optional<double> svd_clamp = {}) {
    return add_weighted_impl(std::move(new_name), detail::adapters::own(weighted), how, svd_rank, svd_clamp);
  }
  std::vector<std::pair<std::string, init::SVDReport>> add_weighted_adapter(
      std::string new_name, std::span<const std::pair<std::string, double>> weighted, Combination how,
      index_t svd_rank = 0, std::optional<double> svd_clamp = {}) {
    return add_weighted_impl(std::move(new_name), detail::adapters::own(weighted), how, svd_rank, svd_clamp);
  }

 private:
  template <class Self>
  static auto& at(Self& self, std::string_view path, const char* where) {
    const auto it = self.layers_.find(path);
    if (it == self.layers_.end()) detail::raise<ValueError>(where, ": no layer at module path '", path, "'");
    return it->second;
  }
  Layer& at(std::string_view path, const char* where) { return at(*this, path, where); }
  const Layer& at(std::string_view path, const char* where) const { return at(*this, path, where); }
  void require_known(std::string_view name, const char* where) const {
    if (!contains_adapter(name))
      detail::raise<ValueError>(where, ": no layer has an adapter named '", name, "' (adapters: ",
                                detail::adapters::join(adapters()), ")");
  }
  /// A layer with `name` merged into W cannot change it (checked up front so a
  /// set-wide operation fails before touching any layer).
  void require_not_merged(std::string_view name, const char* where) const {
    for (const std::string& p : order_) {
      const Layer& l = layers_.find(p)->second;
      if (l.merged() && std::ranges::any_of(l.active(), [&](const auto& a) { return a.first == name; }))
        detail::raise<ValueError>(where, ": adapter '", name, "' is merged into W at '", p, "'; unmerge() first");
    }
  }

  void set_active_impl(weighted_names weighted) {
    std::lock_guard lock(*mutex_);
    const char* where = "AdapterSet::set_active";
    detail::adapters::check_weighted(where, weighted);
    for (const auto& a : weighted) require_known(a.first, where);
    for (const std::string& p : order_)
      if (layers_.find(p)->second.merged())
        detail::raise<ValueError>(where, ": the layer at '", p, "' is merged; unmerge() first");
    for (const std::string& p : order_) {
      Layer& l = layers_.find(p)->second;
      weighted_names here;
      for (const auto& a : weighted)
        if (l.contains(a.first)) here.push_back(a);
      l.set_active(std::span<const std::pair<std::string, double>>(here));
    }
  }

  static constexpr bool host_adapters = std::is_same_v<delta_type, LowRankDelta<scalar, dynamic, EigenBackend>>;

  std::vector<std::pair<std::string, init::SVDReport>> add_weighted_impl(std::string new_name,
                                                                         weighted_names weighted, Combination how,
                                                                         index_t svd_rank,
                                                                         std::optional<double> svd_clamp) {
    static_assert(host_adapters,
                  "lora::AdapterSet::add_weighted_adapter: combine() (and its SVD) runs on host (Eigen) adapters "
                  "only; combine on a host model and move the layers with lora::to_device");
    if constexpr (host_adapters) {  // only the static_assert's sentence otherwise
      std::lock_guard lock(*mutex_);
      const char* where = "AdapterSet::add_weighted_adapter";
      detail::adapters::check_weighted(where, weighted);
      if (weighted.empty()) detail::raise<ValueError>(where, ": no adapters to combine");
      if (new_name.empty()) detail::raise<ValueError>(where, ": the adapter name is empty");
      if (contains_adapter(new_name))
        detail::raise<ValueError>(where, ": an adapter named '", new_name, "' already exists");
      for (const auto& a : weighted) require_known(a.first, where);
      if (weighted.size() == 1) how = Combination::linear;  // PEFT: one adapter can only be linear
      if (how == Combination::svd && svd_rank == 0)
        for (const std::string& p : order_) {
          const Layer& l = layers_.find(p)->second;
          for (const auto& a : weighted)
            if (l.contains(a.first)) svd_rank = std::max(svd_rank, l.delta(a.first).rank());
        }

      std::vector<std::pair<std::string, Combined<scalar>>> made;
      for (const std::string& p : order_) {
        const Layer& l = layers_.find(p)->second;
        std::vector<WeightedDelta<scalar>> in;
        for (const auto& a : weighted)
          if (l.contains(a.first)) in.push_back({l.delta(a.first), a.second});
        if (in.empty()) continue;
        const index_t rank = std::min(svd_rank, std::min(l.out_features(), l.in_features()));
        try {
          made.emplace_back(p, combine(std::span<const WeightedDelta<scalar>>(in), how, rank, svd_clamp));
        } catch (const RankError& e) {
          detail::raise<RankError>(where, ": at '", p, "': ", e.what());
        } catch (const ShapeError& e) {
          detail::raise<ShapeError>(where, ": at '", p, "': ", e.what());
        } catch (const ValueError& e) {
          detail::raise<ValueError>(where, ": at '", p, "': ", e.what());
        }
      }
      std::vector<std::pair<std::string, init::SVDReport>> reports;
      for (auto& [p, c] : made) {
        if (c.report) reports.emplace_back(p, std::move(*c.report));
        layers_.find(p)->second.add(new_name, std::move(c.delta));
      }
      return reports;
    } else {
      return {};
    }
  }

  std::unique_ptr<std::mutex> mutex_ = std::make_unique<std::mutex>();  // a pointer keeps the set movable
  std::map<std::string, Layer, std::less<>> layers_;  // nodes never move: layer references stay valid
  std::vector<std::string> order_;
};

}  // namespace lora
