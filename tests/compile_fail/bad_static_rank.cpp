// Built twice: as-is it must compile; with LORA_KO it must fail with the
// static_assert about the rank.
#include <lora/lora.hpp>

int main() {
#ifdef LORA_KO
  lora::LowRankDelta<float, 0> delta{8, 8};  // rank 0 is not a rank
#else
  lora::LowRankDelta<float, 4> delta{8, 8};
#endif
  return static_cast<int>(delta.rank()) - 4 + (delta.rank() > 0 ? 0 : 1);
}
