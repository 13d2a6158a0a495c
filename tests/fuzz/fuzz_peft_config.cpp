// libFuzzer target: PeftConfig::parse on arbitrary bytes, then the pattern and
// target rules on a few module paths, and a to_json round trip. Anything but a
// lora::Error (a crash, a sanitizer report, another exception) is a bug.
#include <lora/io/peft.hpp>

#include <cstddef>
#include <cstdint>
#include <string_view>

namespace {
constexpr const char* paths[] = {
    "model.layers.0.self_attn.q_proj", "model.layers.11.mlp.down_proj", "model.embed_tokens", "q_proj",
    "transformer.h.3.attn.c_attn",    "score",                          "a+b",                "",
};
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  try {
    const auto c = lora::io::PeftConfig::parse(text, "fuzz");
    for (const char* p : paths) {
      (void)c.rank_for(p);
      (void)c.alpha_for(p);
      (void)c.targets(p);
      const lora::DeltaOptions o = c.options_for(p);
      if (c.rank_for(p) <= 0 || (o.alpha == 0.0 && o.user_scale != 0.0)) __builtin_trap();
    }
    // What PEFT would read back from what we write: the same scalars.
    const auto again = lora::io::PeftConfig::parse(c.to_json(), "fuzz-roundtrip");
    if (again.r != c.r || again.lora_alpha != c.lora_alpha || again.use_rslora != c.use_rslora ||
        again.lora_bias != c.lora_bias || again.bias != c.bias || again.rank_pattern.size() > c.rank_pattern.size())
      __builtin_trap();
  } catch (const lora::Error&) {
  }
  return 0;
}
