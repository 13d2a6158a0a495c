// A static rank larger than min(out, in) of a fixed-size base cannot work.
#include <lora/lora.hpp>

int main() {
  using W_t = Eigen::Matrix<float, 4, 16, Eigen::RowMajor>;
#ifdef LORA_KO
  lora::AdaptedLinear layer{W_t::Zero().eval(), lora::LowRankDelta<float, 8>{4, 16, 8}};
#else
  lora::AdaptedLinear layer{W_t::Zero().eval(), lora::LowRankDelta<float, 4>{4, 16}};
#endif
  return static_cast<int>(layer.rank()) - 4;
}
