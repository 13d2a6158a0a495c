// train/memory.hpp: training-memory accounting, LoRA beside full fine-tuning.
//
// For an adapted layer W [out, in] with rank r (and optional bias [out]):
//   frozen      = out * in                    elements at `precision.frozen` bytes
//   trainable   = r (in + out) (+ out if the bias trains)
//   gradients   = trainable                   at `precision.gradient` bytes
//   optimizer   = states * trainable          at `precision.state` bytes
//                 (AdamW: 2 states, SGD with momentum: 1, plain SGD: 0)
// Full fine-tuning trains every parameter P: weights P at `precision.trainable`,
// gradients P, optimizer states * P. Everything is computed from shapes, so
// GPT-3-sized numbers cost nothing (no allocation); `memory_usage(layer)` reads
// the shapes of a real layer. Activations are not counted: they are the same
// for both and depend on the batch.
#pragma once

#ifndef LORA_UMBRELLA_INCLUDED
#error "Include <lora/lora.hpp> instead of lora/train/memory.hpp."
#endif

#include <cstdint>
#include <initializer_list>
#include <span>
#include <utility>

#include "../config.hpp"
#include "../error.hpp"

namespace lora::train {

/// Bytes per element of each kind of tensor (fractional for quantised bases:
/// NF4 with double quantisation is 4.127 / 8 bytes per frozen weight).
struct Precision {
  double frozen = 4;     ///< frozen base weights
  double trainable = 4;  ///< trained parameters (and every weight under full fine-tuning)
  double gradient = 4;
  double state = 4;  ///< each optimizer state element
  /// fp16 everywhere (the LoRA paper's GPT-3 arithmetic).
  static constexpr Precision fp16() { return {2, 2, 2, 2}; }
  static constexpr Precision fp32() { return {4, 4, 4, 4}; }
};

struct MemoryOptions {
  Precision bytes = {};
  /// Optimizer state tensors per trained parameter: AdamW 2, SGD with momentum 1.
  int optimizer_states = 2;
};

/// Shape of one adapted layer; shape-only accounting needs nothing else.
struct LayerShape {
  index_t out = 0, in = 0, rank = 0;
  bool bias = false;        ///< the layer has a bias [out]
  bool train_bias = false;  ///< ... and it trains with the adapter
};

/// Parameters and bytes under LoRA, with the full fine-tuning figures beside.
struct MemoryReport {
  // LoRA
  std::uint64_t frozen_parameters = 0;
  std::uint64_t trainable_parameters = 0;
  double frozen_bytes = 0, trainable_bytes = 0, gradient_bytes = 0, optimizer_bytes = 0;
  // Full fine-tuning of the same parameters
  std::uint64_t full_parameters = 0;
  double full_weight_bytes = 0, full_gradient_bytes = 0, full_optimizer_bytes = 0;

  double total_bytes() const { return frozen_bytes + trainable_bytes + gradient_bytes + optimizer_bytes; }
  double full_total_bytes() const { return full_weight_bytes + full_gradient_bytes + full_optimizer_bytes; }
  /// Full fine-tuning's trainable parameters over LoRA's.
  double parameter_ratio() const {
    return trainable_parameters ? double(full_parameters) / double(trainable_parameters) : 0.0;
  }
  /// Full fine-tuning's training memory over LoRA's (weights + gradients + state).
  double memory_ratio() const { return total_bytes() > 0 ? full_total_bytes() / total_bytes() : 0.0; }

  MemoryReport& operator+=(const MemoryReport& o) {
    frozen_parameters += o.frozen_parameters;
    trainable_parameters += o.trainable_parameters;
    frozen_bytes += o.frozen_bytes;
    trainable_bytes += o.trainable_bytes;
    gradient_bytes += o.gradient_bytes;
    optimizer_bytes += o.optimizer_bytes;
    full_parameters += o.full_parameters;
    full_weight_bytes += o.full_weight_bytes;
    full_gradient_bytes += o.full_gradient_bytes;
    full_optimizer_bytes += o.full_optimizer_bytes;
    return *this;
  }
  friend MemoryReport operator+(MemoryReport a, const MemoryReport& b) { return a += b; }
};

namespace detail {
inline MemoryReport account(std::uint64_t frozen, std::uint64_t trainable, std::uint64_t full,
                             const MemoryOptions& o) {
  if (o.optimizer_states < 0)
    lora::detail::raise<ValueError>("train::memory_usage: optimizer_states = ", o.optimizer_states,
                                     " must be >= 0");
  const Precision& b = o.bytes;
  for (const auto& [name, v] : {std::pair{"bytes.frozen", b.frozen}, {"bytes.trainable", b.trainable},
                                {"bytes.gradient", b.gradient}, {"bytes.state", b.state}})
    lora::detail::check_non_negative_parameter("train::memory_usage", name, v);
  const double states = o.optimizer_states;
  MemoryReport r;
  r.frozen_parameters = frozen;
  r.trainable_parameters = trainable;
  r.frozen_bytes = double(frozen) * b.frozen;
  r.trainable_bytes = double(trainable) * b.trainable;
  r.gradient_bytes = double(trainable) * b.gradient;
  r.optimizer_bytes = double(trainable) * states * b.state;
  r.full_parameters = full;
  r.full_weight_bytes = double(full) * b.trainable;
  r.full_gradient_bytes = double(full) * b.gradient;
  r.full_optimizer_bytes = double(full) * states * b.state;
  return r;
}
}  // namespace detail

/// One adapted layer, from its shape alone.
inline MemoryReport memory_usage(const LayerShape& s, const MemoryOptions& o = {}) {
  if (s.out <= 0 || s.in <= 0 || s.rank <= 0 || s.rank > (s.out < s.in ? s.out : s.in))
    lora::detail::raise<ShapeError>("train::memory_usage: shape [out, in] = [", s.out, ", ", s.in, "] with rank ",
                                     s.rank, " needs positive extents and 0 < r <= min(out, in)");
  if (s.train_bias && !s.bias)
    lora::detail::raise<ValueError>("train::memory_usage: train_bias without a bias");
  constexpr const char* fn = "train::memory_usage";
  const auto out = std::uint64_t(s.out), in = std::uint64_t(s.in), r = std::uint64_t(s.rank);
  const std::uint64_t bias = s.bias ? out : 0;
  // Shapes, not allocations: nothing stops out * in from wrapping but a check.
  const std::uint64_t weights = lora::detail::checked_mul(fn, out, in);
  const std::uint64_t full = lora::detail::checked_add(fn, weights, bias);
  const std::uint64_t lora_params = lora::detail::checked_mul(fn, r, in + out);  // in + out < 2^64: both < 2^63
  return detail::account(weights + (s.train_bias ? 0 : bias), lora_params + (s.train_bias ? bias : 0), full, o);
}

/// A set of adapted layers (e.g. 96 x {W_q, W_v}).
inline MemoryReport memory_usage(std::span<const LayerShape> layers, const MemoryOptions& o = {}) {
  MemoryReport total;
  for (const auto& s : layers) total += memory_usage(s, o);
  return total;
}
inline MemoryReport memory_usage(std::initializer_list<LayerShape> layers, const MemoryOptions& o = {}) {
  return memory_usage(std::span<const LayerShape>(layers.begin(), layers.size()), o);
}

/// Parameters the adapters do not touch (embeddings, W_k, the MLPs...): frozen
/// under LoRA, trained under full fine-tuning.
inline MemoryReport other_parameters(std::uint64_t count, const MemoryOptions& o = {}) {
  return detail::account(count, 0, count, o);
}

/// The shape of a real AdaptedLinear (read, nothing allocated).
template <class Layer>
  requires requires(const Layer& l) { l.delta().rank(); }
LayerShape shape_of(const Layer& layer, bool train_bias = false) {
  return {layer.out_features(), layer.in_features(), layer.rank(), layer.has_bias(), train_bias && layer.has_bias()};
}

namespace detail {
/// Exact bytes of a compressed or 16-bit base: its own storage_bytes(), or its traits'.
template <class W>
double stored_bytes(const W& w) {
  if constexpr (requires { w.storage_bytes(); })
    return double(w.storage_bytes());
  else
    return quantized_traits_t<W>::storage_bytes(w);
}
}  // namespace detail

/// One real layer, any lora::Adapter: its trainable_parameters() train (LoRA:
/// r (in + out)). A compressed (NF4) base counts its exact storage bytes
/// (codes and scales) instead of `precision.frozen` per weight.
template <class Layer>
  requires requires(const Layer& l) { l.delta().trainable_parameters(); }
MemoryReport memory_usage(const Layer& layer, const MemoryOptions& o = {}, bool train_bias = false) {
  const auto out = std::uint64_t(layer.out_features()), in = std::uint64_t(layer.in_features());
  const std::uint64_t bias = layer.has_bias() ? out : 0;
  train_bias = train_bias && layer.has_bias();
  MemoryReport r = detail::account(out * in + (train_bias ? 0 : bias),
                                    std::uint64_t(layer.delta().trainable_parameters()) + (train_bias ? bias : 0),
                                    out * in + bias, o);
  if constexpr (Layer::base_is_quantized)
    r.frozen_bytes += detail::stored_bytes(layer.base_weight()) -
                      double(layer.out_features()) * double(layer.in_features()) * o.bytes.frozen;
  return r;
}

}  // namespace lora::train
