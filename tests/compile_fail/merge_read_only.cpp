// merge() writes W: over a read-only view it must not compile.
#include <lora/lora.hpp>

#include <vector>

int main() {
  std::vector<float> bytes(8 * 8, 0.0f);
#ifdef LORA_KO
  Eigen::Map<const lora::RowMatrix<float>> W(bytes.data(), 8, 8);
#else
  Eigen::Map<lora::RowMatrix<float>> W(bytes.data(), 8, 8);
#endif
  lora::AdaptedLinear layer{W, lora::LowRankDelta<float, 2>{8, 8}};
  layer.merge();
  return layer.merged() ? 0 : 1;
}
