// peft_dora.hpp: PEFT DoRA adapters (use_dora=True) as lora::DoRALinear layers,
// and DoRA layers back into PEFT modules for save_peft.
//   auto a = lora::io::load_peft<float>("dora-adapter");              // reads lora_magnitude_vector
//   auto layer = lora::io::make_peft_dora(a.module("model.layers.0.self_attn.q_proj"), W, b);
//   lora::io::save_peft(lora::io::make_peft_adapter<float>({lora::io::to_peft_module("q_proj", layer)}), "out");
#pragma once

#include "../lora.hpp"
#include "../dora.hpp"
#include "peft.hpp"

#include <string>
#include <utility>

namespace lora::io {

/// The DoRA layer of a loaded PEFT module over its frozen base weight W [out, in]
/// (nn.Linear's layout: for a Conv1D / fan_in_fan_out model pass the stored
/// weight transposed) and the base layer's bias (empty: none). m, A, B and PEFT's
/// exact scale come from the module. ValueError naming the module where it has
/// no magnitude (use_dora = false: build an AdaptedLinear from module.delta()),
/// is an embedding, or has a lora_B bias (DoRA with lora_bias is not modelled);
/// ShapeError where W is not [out, in] of the module.
template <BaseWeight Base, class T>
DoRALinear<Base, T, dynamic> make_peft_dora(const PeftModule<T>& m, Base w,
                                            typename DoRALinear<Base, T, dynamic>::bias_type bias = {},
                                            DoRAOptions options = {}) {
  constexpr const char* where = "make_peft_dora";
  if (!m.magnitude)
    lora::detail::raise<ValueError>(where, ": module '", m.path,
                                    "' has no DoRA magnitude (use_dora = false); it is a LoRA module: "
                                    "lora::AdaptedLinear{W, bias, module.delta()}");
  if (m.embedding)
    lora::detail::raise<ValueError>(where, ": module '", m.path, "' is an embedding; DoRALinear is a linear layer");
  if (m.bias)
    lora::detail::raise<ValueError>(where, ": module '", m.path,
                                    "' has a lora_B bias (lora_bias = true), which DoRALinear does not model");
  if (w.rows() != m.B.rows() || w.cols() != m.A.cols())
    lora::detail::raise<ShapeError>(where, ": module '", m.path, "': W is [", w.rows(), ", ", w.cols(),
                                    "] but the adapter is [out, in] = [", m.B.rows(), ", ", m.A.cols(), "]");
  return DoRALinear<Base, T, dynamic>(std::move(w), std::move(bias), m.delta(), *m.magnitude, options);
}

/// A PeftModule from a DoRA layer: A, B, PEFT's alpha for its scale (as
/// to_peft_module of a LowRankDelta) and the magnitude m.
template <class Base, class T, int R>
PeftModule<T> to_peft_module(std::string path, const DoRALinear<Base, T, R>& layer) {
  PeftModule<T> m = to_peft_module(std::move(path), layer.delta().low_rank());
  m.magnitude = layer.magnitude();
  return m;
}

}  // namespace lora::io
