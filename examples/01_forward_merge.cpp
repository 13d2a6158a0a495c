// 01: wrap a PyTorch-layout weight without copying, adapt it with a rank-8
// LoRA delta, run the unmerged forward, merge, and check both agree.
#include <lora/lora.hpp>

#include <cstdio>
#include <vector>

int main() {
  const lora::index_t out = 256, in = 512, n = 4;

  // The caller's bytes, row-major [out, in] as in a PyTorch state dict.
  std::vector<float> bytes(out * in);
  for (std::size_t i = 0; i < bytes.size(); ++i) bytes[i] = 0.001f * static_cast<float>(i % 997) - 0.5f;
  Eigen::Map<lora::RowMatrix<float>> W(bytes.data(), out, in);

  lora::AdaptedLinear layer{W, lora::LowRankDelta<float, 8>{out, in, {.alpha = 16}}};
  layer.delta().init(lora::init::KaimingZero{}, /*seed=*/42);
  layer.delta().B().setConstant(0.01f);  // pretend it trained a little

  lora::RowMatrix<float> X = lora::RowMatrix<float>::Random(n, in);
  const lora::RowMatrix<float> unmerged = layer.forward(X);  // X W^T + s (X A^T) B^T, B A never formed

  layer.merge();  // W += s B A, written into the caller's bytes
  const lora::RowMatrix<float> merged = layer.forward(X);
  layer.unmerge();

  std::printf("layer [%ld x %ld], rank %ld, scale %.2f, trainable %ld of %ld parameters (%.2f%%)\n",
              out, in, layer.rank(), static_cast<double>(layer.delta().scale()),
              layer.delta().trainable_parameters(), out * in,
              100.0 * double(layer.delta().trainable_parameters()) / double(out * in));
  std::printf("max |merged - unmerged| = %.3g\n", static_cast<double>((merged - unmerged).cwiseAbs().maxCoeff()));
  return (merged - unmerged).cwiseAbs().maxCoeff() < 1e-4f ? 0 : 1;
}
