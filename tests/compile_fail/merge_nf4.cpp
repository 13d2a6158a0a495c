// merge() adds into W in place: over an NF4 base it must not compile, and the
// message must name the two functions that merge a QLoRA layer.
#include <lora/lora.hpp>

int main() {
  const lora::RowMatrix<float> W = lora::RowMatrix<float>::Zero(8, 64);
  lora::AdaptedLinear layer{lora::NF4Matrix::quantize(W), lora::LowRankDelta<float, 2>{8, 64}};
#ifdef LORA_KO
  layer.merge();
#else
  const lora::RowMatrix<float> merged = lora::merged_weight(layer);
  if (merged.rows() != 8) return 1;
#endif
  return layer.merged() ? 1 : 0;
}
