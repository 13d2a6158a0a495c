// backend/thrust/cuda_hooks.hpp: ThrustBackend's optional hooks on the CUDA
// system (backend/traits.hpp). The evaluator of s B A asks low_rank_apply
// first, so layer.forward on a CUDA device takes the fused kernel of
// backend/cuda/fused.hpp where it is the faster way, with no second API.
// The dependency runs one way: thrust/ knows cuda/, cuda/ takes raw views.
#pragma once

#ifndef LORA_THRUST_UMBRELLA_INCLUDED
#error "Include <lora/thrust.hpp> instead of lora/backend/thrust/cuda_hooks.hpp."
#endif

#include "../cuda/fused.hpp"
#include "backend.hpp"
#include "storage.hpp"

namespace lora {

template <>
struct backend_hooks<ThrustBackend> {
  static constexpr bool low_rank = true;
  template <int Rank, class T, class X, class A, class B, class Y, class WS>
  static bool low_rank_apply(T alpha, const X& x, const A& a, const B& b, Y& y, WS&) {
    using S = scalar_of_t<Y>;
    const DeviceMatrixView<const S> xv = view(x), av = view(a), bv = view(b);
    const DeviceMatrixView<S> yv = view(y);
    return cuda::try_fused_adapter<Rank, S>(static_cast<detail::accum_t<S>>(alpha), xv, av, bv, yv);
  }
};

}  // namespace lora
