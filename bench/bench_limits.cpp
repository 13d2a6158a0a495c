// This machine's limits, measured in the same run as the cases they bound:
// memory read bandwidth (a STREAM-like sum over a buffer far larger than the
// caches), read+write bandwidth (STREAM scale), and peak SGEMM through Eigen.
// Every case's "percent of limit" in docs/benchmarks.md divides by these.
#include <benchmark/benchmark.h>

#include <Eigen/Core>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

constexpr std::size_t kFloats = std::size_t(1) << 26;  // 256 MiB: beyond any L3 here

// Sum: reads only. `simd` lets the float reduction vectorise (several partial
// sums per thread), so the loop is bound by memory, not by add latency.
void BM_stream_read(benchmark::State& state) {
  std::vector<float> a(kFloats, 1.0f);
  for (auto _ : state) {
    float total = 0.0f;
#pragma omp parallel for simd reduction(+ : total) schedule(static)
    for (std::size_t i = 0; i < kFloats; ++i) total += a[i];
    benchmark::DoNotOptimize(total);
  }
  state.counters["GB/s"] = benchmark::Counter(4.0 * kFloats, benchmark::Counter::kIsIterationInvariantRate,
                                              benchmark::Counter::kIs1000);
}

// Scale b = 3 a: one read and one write stream, the traffic of merge().
void BM_stream_scale(benchmark::State& state) {
  std::vector<float> a(kFloats, 1.0f), b(kFloats, 0.0f);
  for (auto _ : state) {
#pragma omp parallel for schedule(static)
    for (std::size_t i = 0; i < kFloats; ++i) b[i] = 3.0f * a[i];
    benchmark::ClobberMemory();
  }
  state.counters["GB/s"] = benchmark::Counter(8.0 * kFloats, benchmark::Counter::kIsIterationInvariantRate,
                                              benchmark::Counter::kIs1000);
}

// Peak SGEMM: a large square product, the best Eigen does on this machine.
void BM_sgemm_peak(benchmark::State& state) {
  const Eigen::Index d = state.range(0);
  Eigen::MatrixXf a = Eigen::MatrixXf::Random(d, d), b = Eigen::MatrixXf::Random(d, d), c(d, d);
  for (auto _ : state) {
    c.noalias() = a * b;
    benchmark::DoNotOptimize(c.data());
  }
  state.counters["GFLOP/s"] = benchmark::Counter(2.0 * d * d * d, benchmark::Counter::kIsIterationInvariantRate,
                                                 benchmark::Counter::kIs1000);
}

}  // namespace

BENCHMARK(BM_stream_read)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_stream_scale)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_sgemm_peak)->Arg(2048)->Arg(4096)->Unit(benchmark::kMillisecond)->UseRealTime();

BENCHMARK_MAIN();
