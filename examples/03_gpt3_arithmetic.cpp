// 03: the LoRA paper's parameter arithmetic for one GPT-3 175B projection,
// d_model = 12,288: a full [d, d] weight against rank 1 and 2 adapters.
#include <lora/lora.hpp>

#include <cstdio>

template <int R>
void report(lora::index_t d) {
  // Built for real (A and B allocated), so the count is the library's, not a formula's.
  lora::LowRankDelta<float, R> delta{d, d, {.alpha = 2.0 * R}};
  const double full = double(d) * double(d);
  const double lora_params = double(delta.trainable_parameters());  // r (in + out)
  std::printf("  r = %d: %10.0f trainable parameters, %8.0fx fewer than %.0f; adapter %.1f KiB in fp32\n", R,
              lora_params, full / lora_params, full, lora_params * 4 / 1024);
}

int main() {
  const lora::index_t d = 12288;
  std::printf("GPT-3 175B, one %ld x %ld projection (W_q or W_v):\n", d, d);
  lora::for_each_rank<1, 2>([&]<int R>() { report<R>(d); });
  // Whole model, as in the paper: 96 layers, W_q and W_v adapted, r = 4.
  const double full_model = 175e9, per_layer = 2.0 * 4 * (d + d);
  std::printf("Whole model, 96 layers, W_q and W_v, r = 4: %.2f M trainable parameters, %.0fx fewer than 175B\n",
              96 * per_layer / 1e6, full_model / (96 * per_layer));
  return 0;
}
