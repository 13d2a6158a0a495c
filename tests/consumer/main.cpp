// Checks one forward against a dense product: the package works as installed,
// with the kernels compiled once in lora::kernels (LORA_EXTERN_TEMPLATES).
#include <lora/lora.hpp>

#include <cstdio>

int main() {
  lora::RowMatrix<float> W = lora::RowMatrix<float>::Random(32, 24);
  lora::AdaptedLinear layer{W, lora::LowRankDelta<float, 4>{32, 24, {.alpha = 8}}};
  layer.delta().init(lora::init::UniformBoth{}, 7);
  lora::RowMatrix<float> X = lora::RowMatrix<float>::Random(5, 24);
  const lora::RowMatrix<float> Y = layer.forward(X);
  const lora::RowMatrix<float> dense = X * (W + 2.0f * layer.delta().B() * layer.delta().A()).transpose();
  const float err = (Y - dense).cwiseAbs().maxCoeff();
  std::printf("max |Y - dense| = %g\n", err);
  if (err > 1e-4f) return 1;
#ifndef LORA_EXTERN_TEMPLATES
  std::printf("lora::kernels did not define LORA_EXTERN_TEMPLATES\n");
  return 1;
#endif
  std::printf("consumer ok (lora %s)\n", LORA_VERSION_STRING);
  return 0;
}
