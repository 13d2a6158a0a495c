// rank.hpp: lora::dynamic, compile-time rank checks, the scaling rules and the
// compile-time rank sweep helper.
#pragma once

#include <cmath>
#include <type_traits>

#include "config.hpp"
#include "error.hpp"

namespace lora {

/// Rank (or extent) chosen at run time, as Eigen::Dynamic.
inline constexpr int dynamic = -1;

/// True when a static rank is usable: positive, or lora::dynamic.
template <int Rank>
inline constexpr bool is_valid_rank_v = Rank > 0 || Rank == dynamic;

/// How alpha turns into the scale s applied to B A.
enum class Scaling {
  standard,  ///< s = alpha / r (LoRA paper, loralib, PEFT default)
  rslora,    ///< s = alpha / sqrt(r) (rank-stabilised LoRA, PEFT use_rslora)
};

/// Scale options of a LowRankDelta. Designated-initialiser friendly:
/// `LowRankDelta<float, 8>{out, in, {.alpha = 16}}`.
struct DeltaOptions {
  /// LoRA alpha. 0 (the default) means "s = user_scale" (llama.cpp convention),
  /// so a default-constructed adapter has s = 1.
  double alpha = 0.0;
  Scaling rule = Scaling::standard;
  /// Used as s when alpha == 0.
  double user_scale = 1.0;
  /// Runtime multiplier applied on top of the rule (adapter strength, PEFT's
  /// scale_layer / llama.cpp's --lora-scaled).
  double multiplier = 1.0;
};

namespace detail {
/// alpha, user_scale and multiplier must be finite: a NaN or Inf scale would
/// make every forward NaN with no error.
inline void check_options(const char* where, const DeltaOptions& o) {
  check_finite_parameter(where, "alpha", o.alpha);
  check_finite_parameter(where, "user_scale", o.user_scale);
  check_finite_parameter(where, "multiplier", o.multiplier);
}
}  // namespace detail

/// s for a given rank and options; the single place the rule is written down.
inline double scale_for(const DeltaOptions& o, index_t rank) {
  double base = o.user_scale;
  if (o.alpha != 0.0) {
    base = o.rule == Scaling::rslora ? o.alpha / std::sqrt(static_cast<double>(rank))
                                     : o.alpha / static_cast<double>(rank);
  }
  return base * o.multiplier;
}

/// Run `f.template operator()<R>()` for every R in Rs, in order. With a C++20
/// template lambda: `for_each_rank<1, 2, 4>([&]<int R> { ... });`
template <int... Rs, class F>
constexpr void for_each_rank(F&& f) {
  static_assert(((Rs > 0) && ...), "lora::for_each_rank: every rank must be a positive integer");
  (f.template operator()<Rs>(), ...);
}

namespace detail {
/// Runtime rank check shared by every constructor that takes a rank.
inline void check_rank(const char* where, index_t rank, index_t out, index_t in) {
  if (out <= 0 || in <= 0)
    raise<ShapeError>(where, ": shape [out, in] = [", out, ", ", in,
                       "] must have positive extents");
  const index_t limit = out < in ? out : in;
  if (rank <= 0 || rank > limit)
    raise<RankError>(where, ": rank ", rank, " must satisfy 0 < r <= min(out, in) = ", limit,
                      " for shape [out, in] = [", out, ", ", in, "]");
}
}  // namespace detail
}  // namespace lora
