// 02: a compile-time sweep over ranks. For each static Rank: trainable
// parameters, how well a rank-Rank adapter fits a known delta (truncated SVD,
// Eckart-Young), and merged vs unmerged forward time.
#include <lora/lora.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>

namespace {

const lora::index_t d = 1024, n = 16;

// Best of several repetitions, in microseconds.
template <class F>
double time_us(F&& f) {
  double best = 1e300;
  for (int rep = 0; rep < 15; ++rep) {
    const auto t0 = std::chrono::steady_clock::now();
    f();
    best = std::min(best, std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count());
  }
  return best;
}

}  // namespace

int main() {
  // A known delta: rank 8 with a decaying spectrum (sigma_i = 2^-i), plus a
  // small full-rank tail, so ranks below 8 leave a measurable error.
  const lora::index_t k = 8;
  lora::LowRankDelta<double, k> truth{d, d, {.alpha = double(k)}};
  truth.init(lora::init::UniformBoth{}, 7);
  for (lora::index_t i = 0; i < k; ++i) truth.B().col(i) *= std::pow(0.5, double(i));
  const lora::RowMatrix<float> dW =
      (truth.B() * truth.A() + 1e-4 * lora::RowMatrix<double>::Random(d, d)).cast<float>();
  const lora::RowMatrix<float> W = lora::RowMatrix<float>::Random(d, d);
  const lora::RowMatrix<float> X = lora::RowMatrix<float>::Random(n, d);

  std::printf("W [%ld x %ld], X [%ld x %ld], known delta of rank %ld (+ noise)\n", d, d, n, d, k);
  std::printf("%6s %12s %10s %14s %13s %13s %9s\n", "rank", "trainable", "% of W", "rel. error", "unmerged us",
              "merged us", "ratio");
  lora::for_each_rank<1, 2, 4, 8, 16, 32>([&]<int R>() {
    lora::AdaptedLinear layer{W, lora::LowRankDelta<float, R>{d, d, {.alpha = 2.0 * R}}};
    const auto fit = layer.delta().init(lora::init::FromDense{dW});

    lora::RowMatrix<float> Y(n, d);
    typename decltype(layer)::workspace ws;
    const double unmerged = time_us([&] { layer.forward(X, Y, ws); });
    layer.merge();
    const double merged = time_us([&] { layer.forward(X, Y, ws); });

    std::printf("%6d %12ld %9.3f%% %14.3e %13.1f %13.1f %9.3f\n", R, layer.delta().trainable_parameters(),
                100.0 * double(layer.delta().trainable_parameters()) / double(d * d),
                std::sqrt(std::max(0.0, 1.0 - fit.kept_energy)), unmerged, merged, unmerged / merged);
  });
  std::printf("rel. error = ||dW - s B A||_F / ||dW||_F = sqrt(1 - kept energy); ranks >= %ld reach the noise.\n", k);
  return 0;
}
