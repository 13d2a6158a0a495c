// adapter_set.hpp: named adapters on a model (CPU, Eigen backend).
//   MultiAdapterLinear<Base, T>  one frozen base weight, any number of named
//                                LowRankDelta<T> adapters, a weighted active set
//                                swapped while other threads run forward()
//   AdapterSet<Layer>            layers by module path ("model.layers.0.self_attn.q_proj")
//                                and the same adapter operations across all of them
// Hot swap: the active set is an immutable Snapshot held by a shared_ptr slot
// (detail::adapters::SnapshotSlot); a forward loads it once, so it sees the set
// before a swap or after it, never a mix, and the adapters it reads stay alive
// (shared_ptr) even if another thread removes them.
// docs/adapters.md has the contract and the PEFT correspondence.
#pragma once

#include "lora.hpp"
#include "combine.hpp"

#include <algorithm>
#include <atomic>
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

/// A frozen linear layer Y = X W^T + b with any number of named low-rank
/// adapters, of which a weighted subset is active:
///   Y = X W^T + b + sum_k w_k s_k (X A_k^T) B_k^T
/// (s_k = the adapter's scale: alpha / r or alpha / sqrt(r) or its user scale,
/// times its multiplier; w_k = its weight in the active set).
///
/// Base is any base weight AdaptedLinear accepts: RowMatrix<T>, an
/// Eigen::Map (const or not), RowMatrix<Eigen::bfloat16> / Eigen::half, an
/// NF4Matrix. forward() is const and may run on several threads while one
/// thread calls set_active / set_multiplier / add / remove (see docs/adapters.md,
/// "Hot swap"). merge_active / unmerge write W and need exclusive access.
///
/// A moved-from layer may only be destroyed or assigned to.
template <BaseWeight Base, class T = float>
class MultiAdapterLinear {
 public:
  using base_type = Base;
  using scalar = T;
  using backend = typename weight_traits<Base>::backend;
  using delta_type = LowRankDelta<T, dynamic, backend>;
  using bias_type = typename backend::template vector<T>;
  using workspace = typename backend::template workspace<T>;
  using weighted_names = detail::adapters::weighted_names;

  static constexpr bool base_is_writable = weight_traits<Base>::writable;
  static constexpr bool base_is_quantized = QuantizedMatrix<Base>;

  static_assert(std::is_same_v<typename weight_traits<Base>::scalar, T>,
                "lora::MultiAdapterLinear<Base, T>: the base weight's (compute) scalar is not T; use the same T "
                "(a bf16 / fp16 / NF4 base computes in float)");
  static_assert(std::is_same_v<backend, EigenBackend>,
                "lora::MultiAdapterLinear: CPU (Eigen backend) base weights only");

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

  explicit MultiAdapterLinear(Base weight) : w_(std::move(weight)), s_(std::make_unique<State>()) {}

  MultiAdapterLinear(Base weight, bias_type bias)
      : w_(std::move(weight)), bias_(std::move(bias)), s_(std::make_unique<State>()) {
    if (bias_.rows() != out_features())
      detail::raise<ShapeError>("MultiAdapterLinear: bias has ", bias_.rows(), " entries, expected out_features = ",
                                out_features());
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

  // ---- forward ----------------------------------------------------------------------
  /// Y [n, out] = X [n, in] W^T + b + sum_k w_k s_k (X A_k^T) B_k^T; Y is
  /// overwritten. No allocation once `ws` has held [n, max active r].
  template <Matrix X, Matrix Y>
  void forward(const X& x, Y&& y, workspace& ws) const {
    static_assert(std::is_same_v<scalar_of_t<X>, T>,
                  "lora::MultiAdapterLinear::forward: X has a different scalar type than the layer");
    const char* where = "MultiAdapterLinear::forward";
    if (x.cols() != in_features())
      detail::raise<ShapeError>(where, ": X has ", x.cols(), " columns, expected in_features = ", in_features());
    if (y.rows() != x.rows() || y.cols() != out_features())
      detail::raise<ShapeError>(where, ": Y is [", y.rows(), ", ", y.cols(), "], expected [n, out] = [", x.rows(),
                                ", ", out_features(), "]");
    if (backend::overlaps(x, y))
      detail::raise<ShapeError>(where, ": X and Y share memory; forward cannot run in place");
    // One load: every term below comes from the same active set.
    const std::shared_ptr<const Snapshot> snap = snapshot();
    expr::apply(expr::base_leaf(w_), x, y, T(1), T(0), ws);  // Y = X W^T (merged: W holds the deltas)
    for (const Term& t : snap->terms)
      expr::apply(t.scale * expr::product(t.delta->B(), t.delta->A()), x, y, T(1), T(1), ws);
    if (has_bias()) BackendOps<backend>::add_to_rows(T(1), bias_, y);
  }

  template <Matrix X, Matrix Y>
  void forward(const X& x, Y&& y) const {
    workspace ws;
    forward(x, std::forward<Y>(y), ws);
  }

  /// Returns Y [n, out]; a compile-time column vector x [in] gives y [out].
  template <Matrix X>
  auto forward(const X& x) const {
    if constexpr (matrix_traits_t<X>::vector) {
      bias_type y(out_features());
      forward(backend::as_row(x), backend::as_row(y));
      return y;
    } else {
      typename backend::template matrix<T> y(x.rows(), out_features());
      forward(x, y);
      return y;
    }
  }

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
      return true;
    } else {
      return false;
    }
  }

  bool merged() const {
    std::lock_guard lock(s_->mutex);
    return s_->merged;
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
  struct Entry {
    std::string name;
    std::shared_ptr<delta_type> delta;  // A, B never change after add; the multiplier may
  };
  // Behind a pointer so the layer stays movable (std::mutex and std::atomic are not).
  struct State {
    mutable std::mutex mutex;  // serialises the mutators; forwards never take it
    std::vector<Entry> entries;
    weighted_names active;
    bool merged = false;
    std::vector<Term> merged_terms;  // what merge_active added, for unmerge
    detail::adapters::SnapshotSlot<Snapshot> snapshot{std::make_shared<const Snapshot>()};
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
    s_->entries.push_back({std::move(name), std::make_shared<delta_type>(std::move(delta))});
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

  std::optional<init::SVDReport> add_weighted_impl(std::string new_name, weighted_names weighted, Combination how,
                                                   index_t svd_rank, std::optional<double> svd_clamp) {
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

  std::vector<std::pair<std::string, init::SVDReport>> add_weighted_impl(std::string new_name,
                                                                         weighted_names weighted, Combination how,
                                                                         index_t svd_rank,
                                                                         std::optional<double> svd_clamp) {
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
  }

  std::unique_ptr<std::mutex> mutex_ = std::make_unique<std::mutex>();  // a pointer keeps the set movable
  std::map<std::string, Layer, std::less<>> layers_;  // nodes never move: layer references stay valid
  std::vector<std::string> order_;
};

}  // namespace lora
