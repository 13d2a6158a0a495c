// train/dropout.hpp: dropout on the adapter input (loralib / PEFT placement),
//   Y = X W^T + b + s * (drop(X) A^T) B^T,
// with inverted scaling 1 / (1 - p) and a counter-based mask: element (t, i) of
// step `step` keeps iff to_unit(random_bits(seed, step, t * in + i)) >= p. The
// mask is a pure function of (seed, step, t, i), so it is reproducible, the same
// on every backend and thread count, and backward regenerates it for free.
#pragma once

#ifndef LORA_UMBRELLA_INCLUDED
#error "Include <lora/lora.hpp> instead of lora/train/dropout.hpp."
#endif

#include <cmath>
#include <cstdint>

#include "../detail/random.hpp"
#include "../error.hpp"

namespace lora::train {

/// Dropout probability and seed of one adapted layer, plus its mode. Give each
/// layer its own seed: layers that share an input (W_q, W_v) then draw
/// independent masks, as separate torch.nn.Dropout modules do.
class Dropout {
 public:
  /// p in [0, 1); anything else (negative, >= 1, NaN) throws lora::ValueError.
  explicit Dropout(double p = 0.0, std::uint64_t seed = 0) : p_(p), seed_(seed) {
    if (!(p >= 0.0 && p < 1.0))
      detail::raise<ValueError>("train::Dropout: p = ", p, " must satisfy 0 <= p < 1");
  }

  double p() const { return p_; }
  std::uint64_t seed() const { return seed_; }

  /// Training mode applies the mask; evaluation mode is the identity (PyTorch's
  /// module.train() / module.eval()).
  void train() { training_ = true; }
  void eval() { training_ = false; }
  bool training() const { return training_; }
  /// True when a forward in the current mode drops anything.
  bool active() const { return training_ && p_ > 0.0; }

  /// Whether element (t, i) of an input with `cols` columns survives at `step`:
  /// the reference definition every backend's dropout primitive follows.
  bool keeps(std::uint64_t step, index_t t, index_t i, index_t cols) const {
    return detail::to_unit(detail::random_bits(seed_, step, static_cast<std::uint64_t>(t * cols + i))) >= p_;
  }

 private:
  double p_;
  std::uint64_t seed_;
  bool training_ = true;
};

}  // namespace lora::train
