// bench_nf4.cpp: NF4 fused products against fp32 Eigen, quantise / dequantise
// throughput, and the QLoRA layer (AdaptedLinear over NF4) against the same
// LoRA layer over fp32 W. Each case is labelled with its sizes; counters:
//   GB/s    bytes the kernel must read (weights + scales + activations), per second
//   GFLOP/s 2 * n * out * in per second (products only)
// Build: g++ -std=c++20 -O3 -march=native -DNDEBUG [-fopenmp] -Iinclude
//        -isystem /usr/include/eigen3 bench/bench_nf4.cpp -lbenchmark -lpthread
#include <lora/lora.hpp>

#include <benchmark/benchmark.h>

#include <algorithm>
#include <cstdint>
#include <vector>
#include <random>
#include <string>
#include <type_traits>

namespace {

using lora::index_t;
using lora::NF4Matrix;
using Dense = NF4Matrix::dense_matrix;

Dense random_matrix(index_t rows, index_t cols, unsigned seed) {
  std::mt19937 g(seed);
  Dense M(rows, cols);
  for (index_t i = 0; i < M.size(); ++i) M.data()[i] = 0.02f * (float(g() >> 8) * 0x1p-23f - 1.0f);
  return M;
}

void set_counters(benchmark::State& state, double bytes, double flops) {
  state.counters["GB/s"] = benchmark::Counter(bytes * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  if (flops > 0)
    state.counters["GFLOP/s"] = benchmark::Counter(flops * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}

// Args: {out (= in), n tokens}
void BM_fp32_eigen(benchmark::State& state) {
  const index_t d = state.range(0), n = state.range(1);
  const Dense W = random_matrix(d, d, 1);
  const Dense X = random_matrix(n, d, 2);
  Dense Y(n, d);
  Eigen::VectorXf x = X.row(0).transpose(), y(d);
  for (auto _ : state) {
    if (n == 1)
      y.noalias() = W * x;  // GEMV, W row-major
    else
      Y.noalias() = X * W.transpose();
    benchmark::DoNotOptimize(y.data());
    benchmark::DoNotOptimize(Y.data());
    benchmark::ClobberMemory();
  }
  set_counters(state, 4.0 * double(d) * d + 4.0 * 2 * n * d, 2.0 * n * d * d);
  state.SetLabel(std::to_string(d) + "x" + std::to_string(d) + " n=" + std::to_string(n));
}

// Args: {out (= in), n tokens, double quantisation 0/1}
void BM_nf4(benchmark::State& state) {
  const index_t d = state.range(0), n = state.range(1);
  const bool dq = state.range(2) != 0;
  const NF4Matrix W = NF4Matrix::quantize(random_matrix(d, d, 1), {.double_quant = dq});
  const Dense X = random_matrix(n, d, 2);
  Dense Y(n, d);
  for (auto _ : state) {
    lora::nf4_gemm(W, X, Y);  // n == 1 runs nf4_gemv
    benchmark::DoNotOptimize(Y.data());
    benchmark::ClobberMemory();
  }
  set_counters(state, double(W.storage_bytes()) + 4.0 * 2 * n * d, 2.0 * n * d * d);
  state.SetLabel(std::to_string(d) + "x" + std::to_string(d) + " n=" + std::to_string(n) + (dq ? " dq" : " fp32-absmax") + " block64");
}

void BM_nf4_quantize(benchmark::State& state) {
  const index_t d = state.range(0);
  const Dense W = random_matrix(d, d, 1);
  for (auto _ : state) {
    NF4Matrix q = NF4Matrix::quantize(W, {.double_quant = true});
    benchmark::DoNotOptimize(q.packed().data());
  }
  set_counters(state, 4.0 * double(d) * d, 0);
  state.SetLabel(std::to_string(d) + "x" + std::to_string(d) + " dq block64 (GB/s of fp32 input)");
}

void BM_nf4_dequantize(benchmark::State& state) {
  const index_t d = state.range(0);
  const NF4Matrix q = NF4Matrix::quantize(random_matrix(d, d, 1), {.double_quant = true});
  Dense out(d, d);
  for (auto _ : state) {
    q.dequantize(out.data());
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  set_counters(state, 4.0 * double(d) * d, 0);
  state.SetLabel(std::to_string(d) + "x" + std::to_string(d) + " dq block64 (GB/s of fp32 output)");
}

// Args: {out (= in), n tokens, rank, base: 0 = fp32 (LoRA), 1 = NF4 with double quantisation (QLoRA)}.
// The whole unmerged forward Y = X (W + s B A)^T through AdaptedLinear.
void BM_layer(benchmark::State& state) {
  const index_t d = state.range(0), n = state.range(1), r = state.range(2);
  const bool nf4 = state.range(3) != 0;
  lora::LowRankDelta<float, lora::dynamic> delta(d, d, r, {.alpha = 2.0 * double(r)});
  delta.A() = random_matrix(r, d, 3);
  delta.B() = random_matrix(d, r, 4);
  const Dense X = random_matrix(n, d, 2);
  Dense Y(n, d);
  auto run = [&](const auto& layer) {
    typename std::remove_cvref_t<decltype(layer)>::workspace ws;
    for (auto _ : state) {
      layer.forward(X, Y, ws);
      benchmark::DoNotOptimize(Y.data());
      benchmark::ClobberMemory();
    }
    return double(lora::train::memory_usage(layer).frozen_bytes);
  };
  const double w_bytes = nf4 ? run(lora::AdaptedLinear(NF4Matrix::quantize(random_matrix(d, d, 1), {.double_quant = true}), delta))
                             : run(lora::AdaptedLinear(random_matrix(d, d, 1), delta));
  set_counters(state, w_bytes + 4.0 * (2 * n * d + 2 * r * d), 2.0 * n * d * (d + 2 * r));
  state.SetLabel(std::to_string(d) + "x" + std::to_string(d) + " n=" + std::to_string(n) + " r=" + std::to_string(r) +
                 (nf4 ? " QLoRA (NF4 dq)" : " LoRA (fp32)"));
}

// With --benchmark_repetitions, "min" is the least disturbed run on a shared machine.
double min_of(const std::vector<double>& v) { return *std::min_element(v.begin(), v.end()); }

}  // namespace

BENCHMARK(BM_fp32_eigen)->Args({4096, 1})->Args({8192, 1})->Args({4096, 16})->Args({4096, 256})->Unit(benchmark::kMillisecond)->UseRealTime()->ComputeStatistics("min", min_of);
BENCHMARK(BM_nf4)->Args({4096, 1, 1})->Args({8192, 1, 1})->Args({4096, 16, 1})->Args({4096, 256, 1})->Args({4096, 1, 0})->Unit(benchmark::kMillisecond)->UseRealTime()->ComputeStatistics("min", min_of);
BENCHMARK(BM_nf4_quantize)->Arg(4096)->Unit(benchmark::kMillisecond)->UseRealTime()->ComputeStatistics("min", min_of);
BENCHMARK(BM_nf4_dequantize)->Arg(4096)->Unit(benchmark::kMillisecond)->UseRealTime()->ComputeStatistics("min", min_of);

BENCHMARK(BM_layer)->ArgsProduct({{4096}, {1, 16, 256}, {16}, {0, 1}})->Unit(benchmark::kMillisecond)->UseRealTime()->ComputeStatistics("min", min_of);

BENCHMARK_MAIN();
