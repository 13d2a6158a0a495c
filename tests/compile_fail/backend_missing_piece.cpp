// A backend must provide every required piece (lora/backend/concept.hpp); one
// that lacks gemm_tn is told so by name when a LowRankDelta is built on it.
#include <lora/lora.hpp>

struct my_backend : lora::EigenBackend {
#ifdef LORA_KO
  template <class... Args>
  static void gemm_tn(Args&&...) = delete;  // the piece this backend "forgot"
#endif
};

int main() {
  lora::LowRankDelta<float, 2, my_backend> delta{8, 8};
  return delta.rank() == 2 ? 0 : 1;
}
