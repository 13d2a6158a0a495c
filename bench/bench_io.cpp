// bench_io: loading a 4096^2 fp16 base weight (safetensors) and 32 PEFT adapters
// (r = 16, fp32) into one MultiAdapterLinear, the C++ side of bench/compare_io.py
// (which writes the files and times PEFT's load of the same ones):
//   bench/compare_io.py --make build/io_bench
//   LORA_BENCH_IO_DIR=build/io_bench build/release/bench/bench_io
//   bench/compare_io.py --time build/io_bench
// BM_load_view: the base is a zero-copy view of the mapped file (what a user
//   does); BM_load_touch: the same, then every base byte read once, which is what
//   Python's load_file does (it copies the file into a tensor), for a like-for-like
//   figure; BM_forward_first: the view load plus one n = 1 forward.
#include <benchmark/benchmark.h>

#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <string>

#include <lora/adapter_set.hpp>
#include <lora/io/peft.hpp>
#include <lora/io/safetensors.hpp>

namespace {

constexpr int adapters = 32;

std::filesystem::path data_dir() {
  const char* d = std::getenv("LORA_BENCH_IO_DIR");
  return d ? std::filesystem::path(d) : std::filesystem::path();
}

template <class F>
void load(benchmark::State& state, F&& after) {
  const auto dir = data_dir();
  if (dir.empty() || !std::filesystem::exists(dir / "base.safetensors")) {
    state.SkipWithError("set LORA_BENCH_IO_DIR to a directory made by bench/compare_io.py --make");
    return;
  }
  for (auto _ : state) {
    auto file = lora::io::SafetensorsFile::open(dir / "base.safetensors");
    lora::MultiAdapterLinear<Eigen::Map<const lora::RowMatrix<Eigen::half>>> layer{
        file.view<Eigen::half>("layer.weight")};
    for (int k = 0; k < adapters; ++k) {
      const std::string name = (k < 10 ? "adapter_0" : "adapter_") + std::to_string(k);
      auto a = lora::io::load_peft<float>(dir / name);
      layer.add(name, a.module("layer").delta());
    }
    after(layer);
    benchmark::DoNotOptimize(layer);
  }
}

void BM_load_view(benchmark::State& state) {
  load(state, [](auto&) {});
}

void BM_load_touch(benchmark::State& state) {
  load(state, [](auto& layer) {
    const auto& w = layer.base_weight();
    const auto* p = reinterpret_cast<const std::uint64_t*>(w.data());
    std::uint64_t acc = 0;
    for (std::size_t i = 0; i < static_cast<std::size_t>(w.size()) / 4; ++i) acc ^= p[i];
    benchmark::DoNotOptimize(acc);
  });
}

void BM_forward_first(benchmark::State& state) {
  load(state, [](auto& layer) {
    layer.set_active("adapter_00");
    Eigen::Matrix<float, 1, Eigen::Dynamic> x = Eigen::Matrix<float, 1, Eigen::Dynamic>::Ones(layer.in_features());
    auto y = layer.forward(x);
    benchmark::DoNotOptimize(y.data());
  });
}

}  // namespace

BENCHMARK(BM_load_view)->Unit(benchmark::kMillisecond)->MinTime(1.0);
BENCHMARK(BM_load_touch)->Unit(benchmark::kMillisecond)->MinTime(1.0);
BENCHMARK(BM_forward_first)->Unit(benchmark::kMillisecond)->MinTime(1.0);
BENCHMARK_MAIN();
