// Training step (forward + backward for A, B and X) of one adapted layer,
// in = out = 4096, against the minimal GEMM work it implies: the two dense
// products X W^T (forward) and G W (dX), timed by plain Eigen in the same run,
// interleaved with the step so both see the same machine state. They read the
// layer's own copy of W: a second 64 MiB copy would double the loop's working
// set, which then no longer stays in this machine's shared L3 (measured: the
// step 8.3 -> 12.4 ms at n = 16 with two copies, 9.6 ms with one). The adapter's
// extra FLOPs are 3 r / d of that minimum (0.6% at r = 8, 4.7% at r = 64).
//   counters: ref_ms (the two plain GEMMs), ratio = step / ref (target <= 1.2)
#include <lora/lora.hpp>

#include <benchmark/benchmark.h>
#include <chrono>

namespace {

using lora::index_t;
using Mat = lora::RowMatrix<float>;
namespace train = lora::train;
constexpr index_t kDim = 4096;

template <int R>
void BM_train_step(benchmark::State& state) {
  const index_t n = state.range(0), d = kDim;
  Mat W(d, d), X(n, d), G(n, d), Y(n, d), dX(n, d), Yr(n, d), dXr(n, d);
  lora::EigenBackend::fill_random(W, lora::UniformDist{-0.02, 0.02}, 1, 1);
  lora::EigenBackend::fill_random(X, lora::UniformDist{-1, 1}, 1, 2);
  lora::EigenBackend::fill_random(G, lora::UniformDist{-1, 1}, 1, 3);
  lora::AdaptedLinear layer{W, lora::LowRankDelta<float, R>{d, d, {.alpha = 2.0 * R}}};
  layer.delta().init(lora::init::UniformBoth{0.01}, 4);
  const Mat& Wl = layer.base_weight();
  using Layer = decltype(layer);
  train::Tape<Layer> tape;
  train::Gradients<Layer> grads(layer, layer.has_bias());

  double step_s = 0, ref_s = 0;
  using clock = std::chrono::steady_clock;
  for (auto _ : state) {
    const auto t0 = clock::now();
    train::forward(layer, X, Y, tape);
    train::backward(layer, X, G, tape, grads, dX);
    benchmark::DoNotOptimize(dX.data());
    const auto t1 = clock::now();
    Yr.noalias() = X * Wl.transpose();  // the minimal dense work of the step
    dXr.noalias() = G * Wl;
    benchmark::DoNotOptimize(dXr.data());
    const auto t2 = clock::now();
    const double s = std::chrono::duration<double>(t1 - t0).count();
    step_s += s;
    ref_s += std::chrono::duration<double>(t2 - t1).count();
    state.SetIterationTime(s);
  }
  const double iters = double(state.iterations());
  state.counters["ref_ms"] = 1e3 * ref_s / iters;
  state.counters["ratio"] = step_s / ref_s;
  state.SetLabel("in=out=4096 r=" + std::to_string(R) + " n=" + std::to_string(n));
}

}  // namespace

BENCHMARK_TEMPLATE(BM_train_step, 8)->Arg(16)->Arg(256)->UseManualTime()->Unit(benchmark::kMillisecond);
BENCHMARK_TEMPLATE(BM_train_step, 64)->Arg(16)->Arg(256)->UseManualTime()->Unit(benchmark::kMillisecond);

BENCHMARK_MAIN();
