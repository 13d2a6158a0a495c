// DoRA against LoRA at in = out = 4096, fp32: the inference forward and the
// training step (forward + backward for A, B, m and dX), r = 8 and 64,
// n = 16 and 256. Both layers view one copy of W (64 MiB: two copies would no
// longer share this machine's L3 state, see bench_train.cpp), and each
// iteration times the LoRA call and the DoRA call back to back, so the ratio
// comes from one machine state.
//   manual time: the DoRA call; counters lora_ms (the LoRA call), ratio = DoRA / LoRA
// DoRA's extra work: the r rows of A ride along in the base product
// (r / n more rows: 50 % at r = 8, n = 16, but the same single read of W), the
// [out, r] norm terms, and the column scaling of Y and G. The exact norm
// gradient (BM_dora_step_exact) adds r rows to the backward's product.
#include <lora/lora.hpp>
#include <lora/dora.hpp>

#include <benchmark/benchmark.h>
#include <chrono>
#include <string>

namespace {

using lora::index_t;
using Mat = lora::RowMatrix<float>;
namespace train = lora::train;
constexpr index_t kDim = 4096;
using clock_type = std::chrono::steady_clock;

const Mat& base_weight() {
  static const Mat W = [] {
    Mat w(kDim, kDim);
    lora::EigenBackend::fill_random(w, lora::UniformDist{-0.02, 0.02}, 1, 1);
    return w;
  }();
  return W;
}

template <int R>
auto make_delta() {
  lora::LowRankDelta<float, R> d{kDim, kDim, {.alpha = 2.0 * R}};
  d.init(lora::init::UniformBoth{0.01}, 4);
  return d;
}

// Runs lora_call then dora_call in every iteration, so both see one machine
// state; the manual time is the DoRA call's, lora_ms and ratio the counters.
template <class LoraCall, class DoraCall>
void time_pair(benchmark::State& state, int r, LoraCall&& lora_call, DoraCall&& dora_call) {
  double dora_s = 0, lora_s = 0;
  for (auto _ : state) {
    const auto t0 = clock_type::now();
    lora_call();
    const auto t1 = clock_type::now();
    dora_call();
    const auto t2 = clock_type::now();
    lora_s += std::chrono::duration<double>(t1 - t0).count();
    const double s = std::chrono::duration<double>(t2 - t1).count();
    dora_s += s;
    state.SetIterationTime(s);
  }
  const double iters = double(state.iterations());
  state.counters["lora_ms"] = 1e3 * lora_s / iters;
  state.counters["ratio"] = dora_s / lora_s;
  state.SetLabel("in=out=4096 r=" + std::to_string(r) + " n=" + std::to_string(state.range(0)));
}

template <int R, bool Cached>
void dora_forward(benchmark::State& state) {
  const index_t n = state.range(0);
  const Eigen::Map<const Mat> W(base_weight().data(), kDim, kDim);
  lora::AdaptedLinear lora_layer{W, make_delta<R>()};
  lora::DoRALinear dora_layer{W, make_delta<R>()};
  if (Cached) dora_layer.cache_weight_norm();
  Mat X(n, kDim), Y(n, kDim);
  lora::EigenBackend::fill_random(X, lora::UniformDist{-1, 1}, 1, 2);
  typename decltype(lora_layer)::workspace lws;
  typename decltype(dora_layer)::workspace dws;
  time_pair(
      state, R,
      [&] {
        lora_layer.forward(X, Y, lws);
        benchmark::DoNotOptimize(Y.data());
      },
      [&] {
        dora_layer.forward(X, Y, dws);
        benchmark::DoNotOptimize(Y.data());
      });
}

// The norm recomputed per call (what every training forward does), and cached
// (inference with fixed A, B: PEFT's ENABLE_DORA_CACHING).
template <int R>
void BM_dora_forward(benchmark::State& state) {
  dora_forward<R, false>(state);
}
template <int R>
void BM_dora_forward_cached(benchmark::State& state) {
  dora_forward<R, true>(state);
}

template <int R, lora::NormGradient Mode>
void BM_dora_step(benchmark::State& state) {
  const index_t n = state.range(0);
  const Eigen::Map<const Mat> W(base_weight().data(), kDim, kDim);
  lora::AdaptedLinear lora_layer{W, make_delta<R>()};
  lora::DoRALinear dora_layer{W, make_delta<R>(), lora::DoRAOptions{.norm_gradient = Mode}};
  using LL = decltype(lora_layer);
  using DL = decltype(dora_layer);
  Mat X(n, kDim), G(n, kDim), Y(n, kDim), dX(n, kDim);
  lora::EigenBackend::fill_random(X, lora::UniformDist{-1, 1}, 1, 2);
  lora::EigenBackend::fill_random(G, lora::UniformDist{-1, 1}, 1, 3);
  train::Tape<LL> ltape;
  train::Tape<DL> dtape;
  train::Gradients<LL> lgrads(lora_layer);
  train::Gradients<DL> dgrads(dora_layer);
  time_pair(
      state, R,
      [&] {
        train::forward(lora_layer, X, Y, ltape);
        train::backward(lora_layer, X, G, ltape, lgrads, dX);
        benchmark::DoNotOptimize(dX.data());
      },
      [&] {
        train::forward(dora_layer, X, Y, dtape);
        train::backward(dora_layer, X, G, dtape, dgrads, dX);
        benchmark::DoNotOptimize(dX.data());
      });
}

template <int R>
void BM_dora_step_peft(benchmark::State& state) {
  BM_dora_step<R, lora::NormGradient::detached>(state);
}
template <int R>
void BM_dora_step_exact(benchmark::State& state) {
  BM_dora_step<R, lora::NormGradient::exact>(state);
}

}  // namespace

#define LORA_DORA_CASES(fn)                                                                                   \
  BENCHMARK_TEMPLATE(fn, 8)->Arg(16)->Arg(256)->UseManualTime()->Unit(benchmark::kMillisecond);              \
  BENCHMARK_TEMPLATE(fn, 64)->Arg(16)->Arg(256)->UseManualTime()->Unit(benchmark::kMillisecond)

LORA_DORA_CASES(BM_dora_forward);
LORA_DORA_CASES(BM_dora_forward_cached);
LORA_DORA_CASES(BM_dora_step_peft);
LORA_DORA_CASES(BM_dora_step_exact);

BENCHMARK_MAIN();
