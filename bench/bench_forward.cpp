// Forward (merged vs unmerged; BM_forward_pair: the two on one buffer of W,
// what the unmerged-overhead ratio should be read from; BM_forward_packed: a
// PackedMatrix base), merge and unmerge at
// in = out = 4096 (LORA_BENCH_DIM: best_time.hpp), fp32, and static vs dynamic rank. Ratios are what to read: every case of one run shares
// the machine's state. Summarise with bench/ratios.py.
// Sweeps for docs/img (bench/plot.sh): BM_sweep_{merged,unmerged,eigen} over
// n = 1..4096 at r = 8 (eigen: plain `Y = X W^T`, Eigen's own product and
// threading), and BM_rsweep_{merged,unmerged} over r = 1..128 at n = 1, 16.
#include <benchmark/benchmark.h>

#include <algorithm>

#include <lora/lora.hpp>

#include "best_time.hpp"

namespace {

const lora::index_t kDim = lora_bench::dim();

const lora::RowMatrix<float>& base_weight() {
  static const lora::RowMatrix<float> W = lora::RowMatrix<float>::Random(kDim, kDim);
  return W;
}

template <int Rank>
auto make_layer(lora::index_t r) {
  lora::AdaptedLinear layer{base_weight(), lora::LowRankDelta<float, Rank>{kDim, kDim, r, {.alpha = 2.0 * double(r)}}};
  layer.delta().init(lora::init::UniformBoth{0.01}, 1);
  return layer;
}

// FLOPs and bytes of one forward: 2 n in out for the base product, plus
// 2 n r (in + out) for the adapter when unmerged; W read once, X, Y, A, B once.
void set_counters(benchmark::State& state, double flops, double bytes) {
  state.counters["GFLOP/s"] = benchmark::Counter(flops, benchmark::Counter::kIsIterationInvariantRate,
                                                 benchmark::Counter::kIs1000);
  state.counters["GB/s"] = benchmark::Counter(bytes, benchmark::Counter::kIsIterationInvariantRate,
                                              benchmark::Counter::kIs1000);
  state.counters["F"] = double(state.range(0)) * 2.0 * kDim / (double(kDim) * kDim);  // adapter FLOP share
}

// The timed loop of every forward case: the fastest call (best_ms) and the
// rate counters (the adapter's flops and bytes only when unmerged).
template <class Layer>
void time_forward(benchmark::State& state, const Layer& layer, lora::index_t r, lora::index_t n, bool merged) {
  const lora::RowMatrix<float> X = lora::RowMatrix<float>::Random(n, kDim);
  lora::RowMatrix<float> Y(n, kDim);
  typename Layer::workspace ws;
  lora_bench::BestTime best;
  for (auto _ : state) {
    best.time([&] {
      layer.forward(X, Y, ws);
      benchmark::DoNotOptimize(Y.data());
      benchmark::ClobberMemory();
    });
  }
  const double base_flops = 2.0 * n * kDim * kDim, adapter_flops = merged ? 0 : 2.0 * n * r * 2 * kDim;
  const double bytes = 4.0 * (kDim * kDim + 2.0 * n * kDim + (merged ? 0 : 2.0 * r * kDim));
  set_counters(state, base_flops + adapter_flops, bytes);
  best.report(state);
}

template <int Rank>
void forward(benchmark::State& state, bool merged) {
  const lora::index_t r = Rank == lora::dynamic ? state.range(0) : Rank, n = state.range(1);
  // Each case owns a fresh copy of W, merged or not, so both states read
  // memory allocated and touched the same way.
  lora::RowMatrix<float> W = base_weight();
  lora::AdaptedLinear layer{Eigen::Map<lora::RowMatrix<float>>(W.data(), kDim, kDim),
                            lora::LowRankDelta<float, Rank>{kDim, kDim, r, {.alpha = 2.0 * double(r)}}};
  layer.delta().init(lora::init::UniformBoth{0.01}, 1);
  if (merged) layer.merge();
  time_forward(state, layer, r, n, merged);
}

// The unmerged forward over a PackedMatrix base (backend/eigen/packed.hpp): W
// packed once for the CPU GEMM kernels; the layer holds only the packed copy.
void BM_forward_packed(benchmark::State& state) {
  const lora::index_t r = state.range(0), n = state.range(1);
  lora::AdaptedLinear layer{lora::PackedMatrix(base_weight()),
                            lora::LowRankDelta<float>{kDim, kDim, r, {.alpha = 2.0 * double(r)}}};
  layer.delta().init(lora::init::UniformBoth{0.01}, 1);
  time_forward(state, layer, r, n, false);
}

void BM_forward_merged(benchmark::State& s) { forward<lora::dynamic>(s, true); }
void BM_forward_unmerged(benchmark::State& s) { forward<lora::dynamic>(s, false); }

template <int Rank>
void BM_forward_static(benchmark::State& s) {
  forward<Rank>(s, false);
}

// Unmerged / merged on ONE buffer of W: each iteration times an unmerged
// forward, merges, times a merged forward and unmerges (merge and unmerge are
// not timed). BM_forward_merged / _unmerged each own a copy of W, and two
// 64 MiB copies can differ by 10-30 % in speed (transparent huge pages, where
// the pages landed), more than the adapter costs. Manual time = the unmerged
// forward; counters: ratio = best unmerged / best merged over the iterations,
// target = 1 + 1.5 F (issue 17), merged_ms, best_ms (the best unmerged).
void BM_forward_pair(benchmark::State& state) {
  const lora::index_t r = state.range(0), n = state.range(1);
  lora::RowMatrix<float> W = base_weight();
  lora::AdaptedLinear layer{Eigen::Map<lora::RowMatrix<float>>(W.data(), kDim, kDim),
                            lora::LowRankDelta<float>{kDim, kDim, r, {.alpha = 2.0 * double(r)}}};
  layer.delta().init(lora::init::UniformBoth{0.01}, 1);
  const lora::RowMatrix<float> X = lora::RowMatrix<float>::Random(n, kDim);
  lora::RowMatrix<float> Y(n, kDim);
  typename decltype(layer)::workspace ws;
  const auto run = [&] {
    layer.forward(X, Y, ws);
    benchmark::DoNotOptimize(Y.data());
    benchmark::ClobberMemory();
  };
  lora_bench::BestTime unmerged, merged;
  for (auto _ : state) {
    const double tu = unmerged.time(run);
    layer.merge();
    merged.time(run);
    layer.unmerge();
    state.SetIterationTime(tu);
  }
  const double F = double(r) * 2.0 * kDim / (double(kDim) * kDim);
  state.counters["ratio"] = unmerged.seconds() / merged.seconds();
  state.counters["target"] = 1 + 1.5 * F;
  state.counters["merged_ms"] = merged.seconds() * 1e3;
  unmerged.report(state);
  state.counters["F"] = F;
}

// merge + unmerge as a pair keeps W unchanged across iterations; each is a
// rank-r update reading and writing W once: 2 out in r flops. safe_merge adds
// one more update pass (the finiteness check).
void merge_unmerge(benchmark::State& state, bool safe) {
  const lora::index_t r = state.range(0);
  lora::RowMatrix<float> W = base_weight();
  lora::AdaptedLinear layer{Eigen::Map<lora::RowMatrix<float>>(W.data(), kDim, kDim),
                            lora::LowRankDelta<float>{kDim, kDim, r, {.alpha = 2.0 * double(r)}}};
  layer.delta().init(lora::init::UniformBoth{0.01}, 2);
  lora_bench::BestTime best;
  for (auto _ : state) {
    best.time([&] {
      if (safe)
        layer.safe_merge();
      else
        layer.merge();
      layer.unmerge();
      benchmark::ClobberMemory();
    });
  }
  const double passes = safe ? 3 : 2;
  set_counters(state, passes * 2.0 * r * kDim * kDim, passes * 2 * 4.0 * kDim * kDim);
  best.report(state);
}

// Plain Eigen, no lora: Y = X W^T with Eigen's own product selection and threading.
void BM_eigen_plain(benchmark::State& state) {
  const lora::index_t n = state.range(1);
  const lora::RowMatrix<float> W = base_weight();
  const lora::RowMatrix<float> X = lora::RowMatrix<float>::Random(n, kDim);
  lora::RowMatrix<float> Y(n, kDim);
  lora_bench::BestTime best;
  for (auto _ : state) {
    best.time([&] {
      Y.noalias() = X * W.transpose();
      benchmark::DoNotOptimize(Y.data());
      benchmark::ClobberMemory();
    });
  }
  set_counters(state, 2.0 * n * kDim * kDim, 4.0 * (kDim * kDim + 2.0 * n * kDim));
  best.report(state);
}

void BM_merge_unmerge(benchmark::State& s) { merge_unmerge(s, false); }
void BM_safe_merge_unmerge(benchmark::State& s) { merge_unmerge(s, true); }

template <int R>
void static_sizes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"r", "n"});
  for (int n : {1, 16}) b->Args({R, n});
  b->Unit(benchmark::kMillisecond)->UseRealTime();
}

}  // namespace

// Merged and unmerged of one size run back to back, so each ratio compares
// neighbours in time on a shared machine.
int register_forward_pairs() {
  for (int r : {1, 8, 64})
    for (int n : {1, 16, 256})
      for (bool merged : {true, false}) {
        const char* name = merged ? "BM_forward_merged" : "BM_forward_unmerged";
        benchmark::RegisterBenchmark(name, merged ? BM_forward_merged : BM_forward_unmerged)
            ->ArgNames({"r", "n"})
            ->Args({r, n})
            ->Unit(benchmark::kMillisecond)
            ->MinWarmUpTime(0.1)
            ->UseRealTime();
      }
  return 0;
}
const int forward_pairs = register_forward_pairs();

// The paired cases (the unmerged / merged ratio) and the packed base.
int register_forward_pair_and_packed() {
  const auto add = [](const char* name, void (*fn)(benchmark::State&), int r, int n, bool manual) {
    auto* b = benchmark::RegisterBenchmark(name, fn)->ArgNames({"r", "n"})->Args({r, n});
    b->Unit(benchmark::kMillisecond)->MinWarmUpTime(0.1);
    if (manual)
      b->UseManualTime();
    else
      b->UseRealTime();
  };
  for (int r : {1, 8, 64})
    for (int n : {1, 16, 256}) add("BM_forward_pair", BM_forward_pair, r, n, true);
  for (int r : {8, 64})
    for (int n : {1, 16, 256}) add("BM_forward_packed", BM_forward_packed, r, n, false);
  return 0;
}
const int forward_pair_and_packed = register_forward_pair_and_packed();

// Sweeps: the cases of one point run back to back.
int register_sweeps() {
  const auto add = [](const char* name, void (*fn)(benchmark::State&), int r, int n) {
    benchmark::RegisterBenchmark(name, fn)->ArgNames({"r", "n"})->Args({r, n})->Unit(benchmark::kMillisecond)->UseRealTime();
  };
  for (int n : {1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096}) {
    add("BM_sweep_merged", BM_forward_merged, 8, n);
    add("BM_sweep_unmerged", BM_forward_unmerged, 8, n);
    add("BM_sweep_eigen", BM_eigen_plain, 8, n);
  }
  for (int n : {1, 16})
    for (int r : {1, 2, 4, 8, 16, 32, 64, 128}) {
      add("BM_rsweep_merged", BM_forward_merged, r, n);
      add("BM_rsweep_unmerged", BM_forward_unmerged, r, n);
    }
  return 0;
}
const int sweeps = register_sweeps();
BENCHMARK(BM_merge_unmerge)->ArgName("r")->Arg(1)->Arg(8)->Arg(64)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_safe_merge_unmerge)->ArgName("r")->Arg(8)->Unit(benchmark::kMillisecond)->UseRealTime();

// Static vs dynamic rank, r in {1, 2, 4, 8, 16}: the dynamic cases are
// BM_forward_unmerged_dynamic with the same args.
#define LORA_STATIC_DYNAMIC(R)                                                   \
  BENCHMARK(BM_forward_static<R>)->Apply(static_sizes<R>);                       \
  BENCHMARK(BM_forward_unmerged)->Name("BM_forward_dynamic/r" #R)->Apply(static_sizes<R>);
LORA_STATIC_DYNAMIC(1)
LORA_STATIC_DYNAMIC(2)
LORA_STATIC_DYNAMIC(4)
LORA_STATIC_DYNAMIC(8)
LORA_STATIC_DYNAMIC(16)

BENCHMARK_MAIN();
