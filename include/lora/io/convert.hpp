// convert.hpp: PEFT adapters to and from llama.cpp's GGUF, and into an AdapterSet.
//
//   auto a = lora::io::load_peft<float>("adapter_dir");
//   lora::io::save_gguf_lora(lora::io::peft_to_gguf(a, "llama", {.n_head = 32, .n_head_kv = 8}), "a.gguf");
//   lora::io::add_peft_adapter(model, a);        // model: lora::AdapterSet<MultiAdapterLinear<...>>
//
// A GGUF adapter has one alpha for the whole file and llama.cpp applies alpha / r per
// tensor; PEFT's per-module scale (rsLoRA, rank_pattern, alpha_pattern) is therefore
// folded into B (fold_scale), the step Python converters get wrong. docs/io_gguf.md.
#pragma once

#include "../adapter_set.hpp"
#include "gguf.hpp"
#include "peft.hpp"

#include <optional>
#include <string>
#include <utility>

namespace lora::io {

/// Attention head counts of a llama-family model. llama.cpp's converter reorders the
/// rows of attn_q / attn_k for its RoPE, so their B factors must be permuted the same
/// way; 0 (the default) leaves every row where it is (models without that reordering).
struct LlamaHeads {
  index_t n_head = 0;     ///< num_attention_heads (attn_q)
  index_t n_head_kv = 0;  ///< num_key_value_heads (attn_k); 0: n_head
};

namespace detail::conversion {
inline index_t heads_for(std::string_view gguf_name, const LlamaHeads& h) {
  if (h.n_head <= 0) return 0;
  if (gguf_name.ends_with("attn_q.weight")) return h.n_head;
  if (gguf_name.ends_with("attn_k.weight")) return h.n_head_kv > 0 ? h.n_head_kv : h.n_head;
  return 0;
}
}  // namespace detail::conversion

/// The GGUF form of a PEFT adapter: one tensor pair per module, named by the llama map
/// (gguf_tensor_name), alpha = `file_alpha` (default: the config's lora_alpha, as
/// convert_lora_to_gguf.py writes it) with each module's exact PEFT scale folded into B.
/// ValueError naming the module or key for what GGUF cannot carry: a module path with no
/// GGUF name, lora_B.bias (lora_bias), and full tensors (modules_to_save, trained biases).
template <class T>
GgufLoraAdapter peft_to_gguf(const PeftAdapter<T>& a, std::string architecture, LlamaHeads heads = {},
                             std::optional<double> file_alpha = {}) {
  const char* where = "peft_to_gguf";
  if (!a.saved.empty())
    lora::detail::raise<ValueError>(where, ": adapter '", a.name, "' (", a.config.label, ") holds the full tensor '",
                                    a.saved.begin()->first,
                                    "' (modules_to_save or a trained bias); a GGUF LoRA adapter has no place for it");
  GgufLoraAdapter g;
  g.architecture = std::move(architecture);
  g.alpha = file_alpha.value_or(a.config.lora_alpha);
  for (const PeftModule<T>& m : a.modules) {
    const std::optional<std::string> name = gguf_tensor_name(m.path);
    if (!name)
      lora::detail::raise<ValueError>(where, ": module '", m.path,
                                      "' has no GGUF tensor name (only llama-style paths are mapped; docs/io_gguf.md)");
    if (m.bias)
      lora::detail::raise<ValueError>(where, ": module '", m.path,
                                      "' has lora_B.bias (lora_bias = true), which a GGUF LoRA adapter cannot hold");
    if (m.magnitude)
      lora::detail::raise<ValueError>(where, ": module '", m.path,
                                      "' is DoRA (use_dora, lora_magnitude_vector), which a GGUF LoRA adapter cannot "
                                      "hold (llama.cpp has no DoRA)");
    RowMatrix<float> b = m.B.template cast<float>();
    if (const index_t h = detail::conversion::heads_for(*name, heads)) b = llama_rope_permute_rows(b, h);
    g.tensors.emplace(*name, fold_scale(m.A.template cast<float>(), b, m.scale(), g.alpha));
  }
  return g;
}

/// The PEFT form of a GGUF adapter: module paths from the llama map (hf_module_path),
/// each module at llama.cpp's scale alpha / r (an alpha of 0, llama.cpp's "scale 1",
/// becomes alpha = r), q / k rows put back in PyTorch order when `heads` is given, and a
/// config that says so (make_peft_adapter: the most common rank and alpha, patterns for
/// the others). ValueError naming the tensor for a GGUF name with no module path.
template <class T = float>
PeftAdapter<T> gguf_to_peft(const GgufLoraAdapter& g, LlamaHeads heads = {}, std::string name = "default") {
  std::vector<PeftModule<T>> modules;
  for (const auto& [tensor, pair] : g.tensors) {
    std::optional<std::string> path = hf_module_path(tensor);
    if (!path)
      lora::detail::raise<ValueError>("gguf_to_peft: GGUF tensor '", tensor,
                                      "' has no module path (only llama-style names are mapped; docs/io_gguf.md)");
    PeftModule<T> m;
    m.path = std::move(*path);
    m.A = pair.A.template cast<T>();
    RowMatrix<float> b = pair.B;
    if (const index_t h = detail::conversion::heads_for(tensor, heads)) b = llama_rope_unpermute_rows(b, h);
    m.B = b.template cast<T>();
    m.options = {.alpha = g.alpha != 0.0 ? g.alpha : static_cast<double>(pair.rank())};
    m.embedding = tensor.ends_with("token_embd.weight");
    modules.push_back(std::move(m));
  }
  return make_peft_adapter(std::move(modules), PeftConfig{}, std::move(name));
}

/// Adds every module of a PEFT adapter to the layer of the same path in `set`, as adapter
/// `name` (default: the adapter's own name). All or nothing: on any error the modules
/// already added are removed again. ValueError naming the module or key for what a
/// MultiAdapterLinear cannot represent (an embedding module, lora_B.bias, full tensors
/// that replace base parameters); the set's own errors for an unknown path or a shape
/// mismatch.
template <class Layer, class T>
void add_peft_adapter(AdapterSet<Layer>& set, const PeftAdapter<T>& a, std::optional<std::string> name = {}) {
  const char* where = "add_peft_adapter";
  const std::string n = name.value_or(a.name);
  if (!a.saved.empty())
    lora::detail::raise<ValueError>(where, ": adapter '", a.name, "' (", a.config.label, ") replaces the parameter '",
                                    a.saved.begin()->first, "' (modules_to_save or a trained bias); load it into the "
                                    "base model yourself, an AdapterSet only holds low-rank deltas");
  for (const PeftModule<T>& m : a.modules) {
    if (m.embedding)
      lora::detail::raise<ValueError>(where, ": module '", m.path,
                                      "' is an embedding LoRA; an AdapterSet holds linear layers");
    if (m.bias)
      lora::detail::raise<ValueError>(where, ": module '", m.path,
                                      "' has lora_B.bias (lora_bias = true); MultiAdapterLinear has no per-adapter bias");
    if (m.magnitude)
      lora::detail::raise<ValueError>(where, ": module '", m.path,
                                      "' is DoRA (use_dora); a MultiAdapterLinear holds additive LoRA deltas "
                                      "(lora::io::make_peft_dora builds the DoRA layer)");
  }
  if (set.contains_adapter(n)) lora::detail::raise<ValueError>(where, ": adapter '", n, "' is already in the set");
  try {
    for (const PeftModule<T>& m : a.modules) {
      using delta_type = typename Layer::delta_type;
      using S = typename delta_type::scalar;
      set.add_adapter(n, m.path, delta_type(m.B.template cast<S>(), m.A.template cast<S>(), m.options));
    }
  } catch (...) {
    if (set.contains_adapter(n)) set.remove_adapter(n);
    throw;
  }
}

}  // namespace lora::io
