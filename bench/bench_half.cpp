// bench_half.cpp: the LoRA layer's forward over a bf16 / fp16 base (16-bit
// storage, fp32 compute) against the same layer over an fp32 base, r = 8,
// unmerged, n = 1 / 16 / 256 on 4096^2 and 8192^2. The two run interleaved per
// case (fp32 then bf16 then fp16, one Google Benchmark family each); compare
// them within one run. Counter GB/s: W's bytes per second.
//   build/release/bench/bench_half --benchmark_repetitions=5 --benchmark_report_aggregates_only=true
#include <lora/lora.hpp>

#include <benchmark/benchmark.h>

#include <string>

namespace {

using lora::index_t;

template <class S>
void BM_forward(benchmark::State& state) {
  const index_t d = state.range(0), n = state.range(1);
  lora::RowMatrix<float> W32(d, d), X(n, d), Y(n, d);
  lora::EigenBackend::fill_random(W32, lora::UniformDist{-0.02, 0.02}, 1, 0);
  lora::EigenBackend::fill_random(X, lora::UniformDist{-1.0, 1.0}, 2, 0);
  const lora::RowMatrix<S> W = W32.cast<S>();
  lora::AdaptedLinear layer{W, lora::LowRankDelta<float, 8>{d, d, {.alpha = 16}}};
  layer.delta().init(lora::init::UniformBoth{0.01}, 3);
  typename decltype(layer)::workspace ws;
  for (auto _ : state) {
    layer.forward(X, Y, ws);
    benchmark::DoNotOptimize(Y.data());
    benchmark::ClobberMemory();
  }
  state.counters["GB/s"] =
      benchmark::Counter(double(sizeof(S)) * double(d) * double(d) * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  state.SetLabel(std::to_string(d) + "x" + std::to_string(d) + " n=" + std::to_string(n) + " r=8");
}

void cases(benchmark::internal::Benchmark* b) {
  for (const int d : {4096, 8192})
    for (const int n : {1, 16, 256}) b->Args({d, n});
  b->Unit(benchmark::kMillisecond)->UseRealTime();
}

BENCHMARK(BM_forward<float>)->Apply(cases);
BENCHMARK(BM_forward<Eigen::bfloat16>)->Apply(cases);
BENCHMARK(BM_forward<Eigen::half>)->Apply(cases);

}  // namespace

BENCHMARK_MAIN();
