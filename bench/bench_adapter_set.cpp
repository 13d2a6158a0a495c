// Named adapters (include/lora/adapter_set.hpp) at in = out = 4096, fp32:
//   BM_swap/r       set_active alternating between two rank-r adapters (a new
//                   snapshot published each time), against
//   BM_memcpy/r     copying one adapter's bytes, r (in + out) * 4: what a swap
//                   that moved the factors into place would cost at least
//   BM_forward_multi/k/n   MultiAdapterLinear with k active rank-16 adapters
//                          (k = 0: the base alone), against
//   BM_forward_single/n    AdaptedLinear with one rank-16 delta
// Ratios are what to read (multi k = 1 over single: the snapshot's cost).
#include <benchmark/benchmark.h>

#include <cstring>
#include <string>
#include <vector>

#include <lora/adapter_set.hpp>

namespace {

constexpr lora::index_t kDim = 4096;
constexpr lora::index_t kRank = 16;

const lora::RowMatrix<float>& base_weight() {
  static const lora::RowMatrix<float> W = lora::RowMatrix<float>::Random(kDim, kDim);
  return W;
}

lora::LowRankDelta<float> make_delta(lora::index_t r, std::uint64_t seed) {
  lora::LowRankDelta<float> d{kDim, kDim, r, {.alpha = 2.0 * double(r)}};
  d.init(lora::init::UniformBoth{0.01}, seed);
  return d;
}

void BM_swap(benchmark::State& state) {
  const lora::index_t r = state.range(0);
  lora::MultiAdapterLinear<Eigen::Map<const lora::RowMatrix<float>>> layer{
      Eigen::Map<const lora::RowMatrix<float>>(base_weight().data(), kDim, kDim)};
  layer.add("a", make_delta(r, 1));
  layer.add("b", make_delta(r, 2));
  bool flip = false;
  for (auto _ : state) {
    layer.set_active(flip ? "a" : "b");
    flip = !flip;
  }
  state.counters["adapter_bytes"] = double(r * (kDim + kDim) * 4);
}

void BM_memcpy(benchmark::State& state) {
  const std::size_t bytes = std::size_t(state.range(0)) * (kDim + kDim) * sizeof(float);
  std::vector<char> src(bytes, 1), dst(bytes, 0);
  for (auto _ : state) {
    std::memcpy(dst.data(), src.data(), bytes);
    benchmark::DoNotOptimize(dst.data());
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(std::int64_t(state.iterations()) * std::int64_t(bytes));
}

void BM_forward_multi(benchmark::State& state) {
  const lora::index_t k = state.range(0), n = state.range(1);
  lora::MultiAdapterLinear<Eigen::Map<const lora::RowMatrix<float>>> layer{
      Eigen::Map<const lora::RowMatrix<float>>(base_weight().data(), kDim, kDim)};
  std::vector<std::pair<std::string, double>> active;
  for (lora::index_t i = 0; i < k; ++i) {
    layer.add("adapter" + std::to_string(i), make_delta(kRank, std::uint64_t(10 + i)));
    active.emplace_back("adapter" + std::to_string(i), 1.0 / double(k));
  }
  layer.set_active(active);
  const lora::RowMatrix<float> X = lora::RowMatrix<float>::Random(n, kDim);
  lora::RowMatrix<float> Y(n, kDim);
  decltype(layer)::workspace ws;
  for (auto _ : state) {
    layer.forward(X, Y, ws);
    benchmark::DoNotOptimize(Y.data());
    benchmark::ClobberMemory();
  }
}

void BM_forward_single(benchmark::State& state) {
  const lora::index_t n = state.range(0);
  lora::AdaptedLinear layer{Eigen::Map<const lora::RowMatrix<float>>(base_weight().data(), kDim, kDim),
                            make_delta(kRank, 10)};
  const lora::RowMatrix<float> X = lora::RowMatrix<float>::Random(n, kDim);
  lora::RowMatrix<float> Y(n, kDim);
  decltype(layer)::workspace ws;
  for (auto _ : state) {
    layer.forward(X, Y, ws);
    benchmark::DoNotOptimize(Y.data());
    benchmark::ClobberMemory();
  }
}

}  // namespace

BENCHMARK(BM_swap)->ArgName("r")->Arg(8)->Arg(64)->Unit(benchmark::kNanosecond);
BENCHMARK(BM_memcpy)->ArgName("r")->Arg(8)->Arg(64)->Unit(benchmark::kNanosecond);
BENCHMARK(BM_forward_single)->ArgName("n")->Arg(1)->Arg(16)->Unit(benchmark::kMicrosecond)->UseRealTime();
BENCHMARK(BM_forward_multi)
    ->ArgNames({"k", "n"})
    ->ArgsProduct({{0, 1, 2, 4}, {1, 16}})
    ->Unit(benchmark::kMicrosecond)
    ->UseRealTime();

BENCHMARK_MAIN();
