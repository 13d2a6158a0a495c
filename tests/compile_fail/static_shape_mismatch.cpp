// A fixed-size base weight [8, 16] fed a fixed-size X with 12 columns: the
// mismatch is known at compile time and must be reported then.
#include <lora/lora.hpp>

int main() {
  using W_t = Eigen::Matrix<float, 8, 16, Eigen::RowMajor>;
  lora::AdaptedLinear layer{W_t::Zero().eval(), lora::LowRankDelta<float, 2>{8, 16}};
#ifdef LORA_KO
  Eigen::Matrix<float, 3, 12, Eigen::RowMajor> X = Eigen::Matrix<float, 3, 12, Eigen::RowMajor>::Zero();
#else
  Eigen::Matrix<float, 3, 16, Eigen::RowMajor> X = Eigen::Matrix<float, 3, 16, Eigen::RowMajor>::Zero();
#endif
  lora::RowMatrix<float> Y(3, 8);
  layer.forward(X, Y);
  return Y.norm() == 0.0f ? 0 : 1;
}
