// backend/thrust/transfer.hpp: explicit moves between host (Eigen) and device
// (Thrust) storage. Nothing in the library copies across behind the caller's
// back: forward on a device layer needs device inputs, and these are the calls
// that make them.
//   auto Wd = lora::to_device(W);          // RowMatrix<T> -> DeviceMatrix<T>
//   auto W2 = lora::to_host(Wd);           // DeviceMatrix<T> -> RowMatrix<T>
//   auto gpu = lora::to_device(layer);     // a whole AdaptedLinear / LowRankDelta, or
//                                          // any layer with transferred(move)
#pragma once

#ifndef LORA_THRUST_UMBRELLA_INCLUDED
#error "Include <lora/thrust.hpp> instead of lora/backend/thrust/transfer.hpp."
#endif

#include <utility>

#include "backend.hpp"

namespace lora {

/// Host -> device copy of any Eigen dense object (matrix, Map, block,
/// expression); static extents carry over.
template <class Derived>
auto to_device(const Eigen::DenseBase<Derived>& host) {
  using T = typename Derived::Scalar;
  DeviceMatrix<T, Derived::RowsAtCompileTime, Derived::ColsAtCompileTime> d;
  ThrustBackend::from_host(host.derived(), d);
  return d;
}

/// Device -> host copy; static extents carry over.
template <class T, int R, int C>
RowMatrix<T, R, C> to_host(const DeviceMatrix<T, R, C>& d) {
  return ThrustBackend::to_host(d);
}
template <class T, int R, int C>
RowMatrix<std::remove_const_t<T>, R, C> to_host(const DeviceMatrixView<T, R, C>& d) {
  return ThrustBackend::to_host(d);
}

/// A LowRankDelta moved to the device (A, B and the scale options).
template <class T, int Rank>
LowRankDelta<T, Rank, ThrustBackend> to_device(const LowRankDelta<T, Rank, EigenBackend>& d) {
  d.check_consistent("lora::to_device");
  return LowRankDelta<T, Rank, ThrustBackend>(to_device(d.B()), to_device(d.A()), d.options());
}
/// A LowRankDelta moved back to the host.
template <class T, int Rank>
LowRankDelta<T, Rank, EigenBackend> to_host(const LowRankDelta<T, Rank, ThrustBackend>& d) {
  d.check_consistent("lora::to_host");
  return LowRankDelta<T, Rank, EigenBackend>(to_host(d.B()), to_host(d.A()), d.options());
}

namespace detail {
/// Moves W, the bias and the delta with `move`; the new layer owns its W.
template <class Layer, class Move>
auto move_layer(const char* where, const Layer& layer, Move move) {
  check_movable(where, layer.merged());
  auto w = move(layer.base_weight());
  auto delta = move(layer.delta());
  using result = AdaptedLinear<decltype(w), decltype(delta)>;
  if (layer.has_bias()) return result(std::move(w), move(layer.bias()), std::move(delta));
  return result(std::move(w), std::move(delta));
}
}  // namespace detail

/// An unmerged AdaptedLinear moved to the device: W (owned there, even when
/// the host layer viewed the caller's buffer), bias and delta.
template <class Base, class T, int Rank>
auto to_device(const AdaptedLinear<Base, LowRankDelta<T, Rank, EigenBackend>>& layer) {
  return detail::move_layer("lora::to_device", layer, [](const auto& m) { return to_device(m); });
}
/// An unmerged device AdaptedLinear moved back to the host.
template <class Base, class T, int Rank>
auto to_host(const AdaptedLinear<Base, LowRankDelta<T, Rank, ThrustBackend>>& layer) {
  return detail::move_layer("lora::to_host", layer, [](const auto& m) { return to_host(m); });
}

namespace detail {
/// The moves handed to a layer's transferred(move): each tensor (matrix,
/// vector, LowRankDelta) through the overloads above. Defined after them, so
/// the call inside finds them all.
struct to_device_fn {
  template <class M>
  auto operator()(const M& m) const {
    return to_device(m);
  }
};
struct to_host_fn {
  template <class M>
  auto operator()(const M& m) const {
    return to_host(m);
  }
};
}  // namespace detail

/// Any other layer kind (DoRALinear, AdaptedEmbedding, MergedLinear,
/// MultiAdapterLinear) rebuilds itself from moved tensors with
/// `layer.transferred(move)`; these are the two moves. Include <lora/thrust.hpp>
/// before the layer's header.
template <class Layer>
  requires requires(const Layer& l) { l.transferred(detail::to_device_fn{}); }
auto to_device(const Layer& layer) {
  return layer.transferred(detail::to_device_fn{});
}
template <class Layer>
  requires requires(const Layer& l) { l.transferred(detail::to_host_fn{}); }
auto to_host(const Layer& layer) {
  return layer.transferred(detail::to_host_fn{});
}

}  // namespace lora
