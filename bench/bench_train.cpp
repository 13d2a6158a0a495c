// Training step (forward + backward for A, B and X) of one adapted layer,
// in = out = 4096 (LORA_BENCH_DIM: best_time.hpp), against the minimal GEMM work it implies: the two dense
// products X W^T (forward) and G W (dX), timed by plain Eigen in the same run,
// interleaved with the step so both see the same machine state. They read the
// layer's own copy of W: a second 64 MiB copy would double the loop's working
// set, which then no longer stays in this machine's shared L3 (measured: the
// step 8.3 -> 12.4 ms at n = 16 with two copies, 9.6 ms with one). The adapter's
// extra FLOPs are 3 r / d of that minimum (0.6% at r = 8, 4.7% at r = 64).
// BM_train_step_packed: the same over a PackedMatrix base, against the two
// packed products.
//   counters: ref_ms (the two plain GEMMs), ratio = step / ref (target <= 1.2),
//   best_ms (the fastest step: what bench/compare_report.py reads)
#include <lora/lora.hpp>

#include <benchmark/benchmark.h>
#include <chrono>
#include <cstddef>
#include <type_traits>

#include "best_time.hpp"

namespace {

using lora::index_t;
using Mat = lora::RowMatrix<float>;
namespace train = lora::train;
const index_t kDim = lora_bench::dim();

// The step of `layer` against `ref(X, G, Yr, dXr)`, the two base products alone
// on the layer's own weight (no second 64 MiB copy in the loop's working set);
// without a reference (nullptr) the steps run back to back, as compare_torch.py
// times PyTorch's.
template <class Layer, class Ref = std::nullptr_t>
void train_step(benchmark::State& state, Layer& layer, Ref&& reference = nullptr) {
  constexpr bool with_reference = !std::is_null_pointer_v<std::remove_cvref_t<Ref>>;
  const index_t n = state.range(0), d = kDim;
  Mat X(n, d), G(n, d), Y(n, d), dX(n, d), Yr(n, d), dXr(n, d);
  lora::EigenBackend::fill_random(X, lora::UniformDist{-1, 1}, 1, 2);
  lora::EigenBackend::fill_random(G, lora::UniformDist{-1, 1}, 1, 3);
  train::Tape<Layer> tape;
  train::Gradients<Layer> grads(layer, layer.has_bias());

  double step_s = 0, ref_s = 0;
  lora_bench::BestTime best, ref;
  const auto step = [&] {
    train::forward(layer, X, Y, tape);
    train::backward(layer, X, G, tape, grads, dX);
    benchmark::DoNotOptimize(dX.data());
  };
  for (auto _ : state) {
    if constexpr (with_reference) {
      ref_s += ref.time([&] {
        reference(X, G, Yr, dXr);
        benchmark::DoNotOptimize(dXr.data());
      });
      // An untimed step first: a training loop runs its steps back to back, and
      // Eigen's GEMM in the reference leaves the caches to its own buffers (a
      // step timed right after it: n = 4 6.2 ms, back to back 3.3 ms).
      step();
    }
    const double s = best.time(step);
    step_s += s;
    state.SetIterationTime(s);
  }
  if constexpr (with_reference) {
    const double iters = double(state.iterations());
    state.counters["ref_ms"] = 1e3 * ref_s / iters;
    state.counters["ratio"] = step_s / ref_s;
  }
  best.report(state);  // the fastest step (best_time.hpp)
  state.SetLabel("in=out=" + std::to_string(kDim) + " r=" + std::to_string(layer.rank()) + " n=" + std::to_string(n));
}

Mat base_weight() {
  Mat W(kDim, kDim);
  lora::EigenBackend::fill_random(W, lora::UniformDist{-0.02, 0.02}, 1, 1);
  return W;
}

template <int R>
auto make_layer() {
  lora::AdaptedLinear layer{base_weight(), lora::LowRankDelta<float, R>{kDim, kDim, {.alpha = 2.0 * R}}};
  layer.delta().init(lora::init::UniformBoth{0.01}, 4);
  return layer;
}

template <int R>
void BM_train_step(benchmark::State& state) {
  auto layer = make_layer<R>();
  const Mat& W = layer.base_weight();
  train_step(state, layer, [&](const Mat& X, const Mat& G, Mat& Yr, Mat& dXr) {
    Yr.noalias() = X * W.transpose();  // the minimal dense work of the step, plain Eigen
    dXr.noalias() = G * W;
  });
}

// The same step over a PackedMatrix base (backend/eigen/packed.hpp); its
// reference is the two packed products alone (ratio: what the adapter adds).
template <int R>
void BM_train_step_packed(benchmark::State& state) {
  lora::AdaptedLinear layer{lora::PackedMatrix(base_weight()),
                            lora::LowRankDelta<float, R>{kDim, kDim, {.alpha = 2.0 * R}}};
  layer.delta().init(lora::init::UniformBoth{0.01}, 4);
  using Traits = lora::quantized_traits<lora::PackedMatrix>;
  const lora::PackedMatrix& P = layer.base_weight();
  train_step(state, layer, [&](const Mat& X, const Mat& G, Mat& Yr, Mat& dXr) {
    Traits::gemm_nt(P, 0, kDim, 1.0f, X, 0.0f, Yr);
    Traits::gemm_nn(P, 0, kDim, 1.0f, G, 0.0f, dXr);
  });
}

// The sweep's step, back to back with no reference between steps: at a few
// tokens Eigen's plain GEMM (the reference) takes 30-40 ms and leaves the caches
// to its own buffers, and even after an untimed step the timed one ran
// 3.6-5.1 ms at n = 4 (this host), against 3.3 back to back.
template <int R>
void BM_train_sweep(benchmark::State& state) {
  auto layer = make_layer<R>();
  train_step(state, layer);
}

}  // namespace

// At least a second per case after a warm-up (first-touch page faults of the
// tape and gradients): at n = 256 compare.sh's 0.2 s gave 2-3 steps, and the
// best of so few moved by 30 % between runs.
void step_timing(benchmark::internal::Benchmark* b) {
  b->UseManualTime()->Unit(benchmark::kMillisecond)->MinWarmUpTime(0.2)->MinTime(1.0);
}
void step_sizes(benchmark::internal::Benchmark* b) { step_timing(b->Arg(16)->Arg(256)); }
BENCHMARK_TEMPLATE(BM_train_step, 8)->Apply(step_sizes);
BENCHMARK_TEMPLATE(BM_train_step, 64)->Apply(step_sizes);
BENCHMARK_TEMPLATE(BM_train_step_packed, 8)->Apply(step_sizes);
BENCHMARK_TEMPLATE(BM_train_step_packed, 64)->Apply(step_sizes);
// The sweep (compare.sh with LORA_BENCH_SWEEP=1; left out of its default run):
// r = 8 from one token to 4096, and r = 1 and 128 at 16 and 256 tokens.
const int train_sweep = [] {
  step_timing(benchmark::RegisterBenchmark("BM_train_sweep<1>", BM_train_sweep<1>)->Arg(16)->Arg(256));
  step_timing(benchmark::RegisterBenchmark("BM_train_sweep<8>", BM_train_sweep<8>)->Arg(1)->Arg(4)->Arg(64)->Arg(1024)->Arg(4096));
  step_timing(benchmark::RegisterBenchmark("BM_train_sweep<128>", BM_train_sweep<128>)->Arg(16)->Arg(256));
  return 0;
}();

BENCHMARK_MAIN();
