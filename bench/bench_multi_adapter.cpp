// Per-token adapters (MultiAdapterLinear::forward(X, ids, Y), include/lora/adapter_set.hpp)
// at in = out = 4096, fp32, n = 256 tokens, D distinct adapters in the batch
// (D = 1, 8, 32, 64), 256 / D tokens each, at r = 16 or mixed ranks (4, 8, 16,
// 64 by slot). Args: {D, mixed (0/1), shuffled (0: each adapter's tokens one
// contiguous run, as requests arrive; 1: interleaved t % D, the worst case)}.
//   BM_gathered_forward     the whole forward: base product once + segments
//   BM_gathered_low_rank    the adapters' part alone (add_adapter_terms); its
//                           counter adapter_GBps = adapter bytes read / time
//   BM_masked_loop_forward  the per-adapter loop: base product, then for each
//                           adapter its term over the whole batch with the
//                           other tokens masked to zero (D full-batch low-rank
//                           products), what a framework without gathering does
//   BM_masked_loop_low_rank the loop's adapters' part alone
//   BM_read_bandwidth/MiB   a plain threaded sum over a buffer of that size:
//                           the machine's read bandwidth to compare with
// Ratios to read: each D over D = 1 (the target: D = 32 <= 1.5x), and the
// loop over the gathered path at the same D.
#include <benchmark/benchmark.h>

#include <numeric>
#include <vector>

#include <lora/adapter_set.hpp>

namespace {

using lora::index_t;
using lora::RowMatrix;
constexpr index_t kDim = 4096;
constexpr index_t kTokens = 256;
constexpr index_t kAdapters = 64;
constexpr index_t kMixed[] = {4, 8, 16, 64};

using Layer = lora::MultiAdapterLinear<Eigen::Map<const RowMatrix<float>>>;

const RowMatrix<float>& base_weight() {
  static const RowMatrix<float> W = RowMatrix<float>::Random(kDim, kDim) * 0.02f;
  return W;
}
const RowMatrix<float>& input() {
  static const RowMatrix<float> X = RowMatrix<float>::Random(kTokens, kDim);
  return X;
}

index_t rank_of(index_t slot, bool mixed) { return mixed ? kMixed[slot % 4] : 16; }

/// 64 adapters over the shared base (built once per rank mode).
Layer& layer(bool mixed) {
  static Layer* layers[2] = {nullptr, nullptr};
  Layer*& l = layers[mixed ? 1 : 0];
  if (!l) {
    l = new Layer(Eigen::Map<const RowMatrix<float>>(base_weight().data(), kDim, kDim));
    for (index_t k = 0; k < kAdapters; ++k) {
      const index_t r = rank_of(k, mixed);
      lora::LowRankDelta<float> d{kDim, kDim, r, {.alpha = 2.0 * double(r)}};
      d.init(lora::init::UniformBoth{0.01}, 100 + static_cast<std::uint64_t>(k));
      l->add("tenant" + std::to_string(k), std::move(d));
    }
  }
  return *l;
}

/// 256 ids over D adapters. With mixed ranks, D = 1 takes slot 2 (r = 16), so
/// the single-adapter baseline is the same adapter in both modes; D > 1 take
/// slots 0..D-1 (every rank equally often).
std::vector<std::int32_t> make_ids(index_t distinct, bool shuffled) {
  std::vector<std::int32_t> ids(kTokens);
  const index_t per = kTokens / distinct;
  for (index_t t = 0; t < kTokens; ++t) {
    const index_t k = shuffled ? t % distinct : t / per;
    ids[t] = static_cast<std::int32_t>(distinct == 1 ? 2 : k);
  }
  return ids;
}

/// r (in + out) * 4 bytes of every adapter present.
double adapter_bytes(const std::vector<std::int32_t>& ids, bool mixed) {
  std::vector<bool> seen(kAdapters, false);
  double bytes = 0;
  for (const auto id : ids)
    if (!seen[id]) {
      seen[id] = true;
      bytes += double(rank_of(id, mixed)) * double(2 * kDim) * sizeof(float);
    }
  return bytes;
}

void label(benchmark::State& state) {
  state.SetLabel(std::string(state.range(1) ? "mixed r" : "r=16") + (state.range(2) ? ", interleaved" : ", runs"));
}

void BM_gathered_forward(benchmark::State& state) {
  const bool mixed = state.range(1) != 0;
  const auto ids = make_ids(state.range(0), state.range(2) != 0);
  Layer& l = layer(mixed);
  RowMatrix<float> Y(kTokens, kDim);
  Layer::gather_workspace ws;
  for (auto _ : state) {
    l.forward(input(), std::span<const std::int32_t>(ids), Y, ws);
    benchmark::DoNotOptimize(Y.data());
  }
  state.counters["tokens_per_s"] = benchmark::Counter(double(kTokens), benchmark::Counter::kIsIterationInvariantRate);
  label(state);
}

void BM_gathered_low_rank(benchmark::State& state) {
  const bool mixed = state.range(1) != 0;
  const auto ids = make_ids(state.range(0), state.range(2) != 0);
  Layer& l = layer(mixed);
  RowMatrix<float> Y = RowMatrix<float>::Zero(kTokens, kDim);
  Layer::gather_workspace ws;
  for (auto _ : state) {
    l.add_adapter_terms(input(), std::span<const std::int32_t>(ids), Y, ws);
    benchmark::DoNotOptimize(Y.data());
  }
  state.counters["adapter_GBps"] =
      benchmark::Counter(adapter_bytes(ids, mixed) / 1e9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["adapter_MB"] = adapter_bytes(ids, mixed) / 1e6;
  label(state);
}

/// The per-adapter loop: for each adapter present, X with the other tokens
/// zeroed, then its term over all 256 rows.
void masked_loop(const Layer& l, const std::vector<std::int32_t>& ids, RowMatrix<float>& Xm, RowMatrix<float>& Y,
                 lora::EigenBackend::workspace<float>& ws) {
  const auto bank = l.bank();
  std::vector<bool> seen(kAdapters, false);
  for (const auto id : ids) {
    if (seen[id]) continue;
    seen[id] = true;
    for (index_t t = 0; t < kTokens; ++t)
      if (ids[t] == id)
        Xm.row(t) = input().row(t);
      else
        Xm.row(t).setZero();
    const auto& slot = bank->slots[id];
    lora::expr::apply(slot.scale * lora::expr::product(slot.delta->B(), slot.delta->A()), Xm, Y, 1.0f, 1.0f, ws);
  }
}

void BM_masked_loop_forward(benchmark::State& state) {
  const bool mixed = state.range(1) != 0;
  const auto ids = make_ids(state.range(0), state.range(2) != 0);
  Layer& l = layer(mixed);
  RowMatrix<float> Y(kTokens, kDim), Xm(kTokens, kDim);
  lora::EigenBackend::workspace<float> ws;
  for (auto _ : state) {
    lora::expr::apply(lora::expr::base_leaf(l.base_weight()), input(), Y, 1.0f, 0.0f, ws);
    masked_loop(l, ids, Xm, Y, ws);
    benchmark::DoNotOptimize(Y.data());
  }
  state.counters["tokens_per_s"] = benchmark::Counter(double(kTokens), benchmark::Counter::kIsIterationInvariantRate);
  label(state);
}

void BM_masked_loop_low_rank(benchmark::State& state) {
  const bool mixed = state.range(1) != 0;
  const auto ids = make_ids(state.range(0), state.range(2) != 0);
  Layer& l = layer(mixed);
  RowMatrix<float> Y = RowMatrix<float>::Zero(kTokens, kDim), Xm(kTokens, kDim);
  lora::EigenBackend::workspace<float> ws;
  for (auto _ : state) {
    masked_loop(l, ids, Xm, Y, ws);
    benchmark::DoNotOptimize(Y.data());
  }
  state.counters["adapter_GBps"] =
      benchmark::Counter(adapter_bytes(ids, mixed) / 1e9, benchmark::Counter::kIsIterationInvariantRate);
  label(state);
}

void BM_read_bandwidth(benchmark::State& state) {
  const index_t n = state.range(0) * (1 << 20) / index_t(sizeof(float));
  std::vector<float> buf(static_cast<std::size_t>(n), 1.0f);
  const float* p = buf.data();
  for (auto _ : state) {
    float total = 0;
    // 16 independent sums per block of 64: vectorised and not bound by the
    // latency of one dependent add chain, so the loop runs at the read limit.
#pragma omp parallel for reduction(+ : total) schedule(static)
    for (index_t b = 0; b < n / 64; ++b) {
      float acc[16] = {};
      for (int j = 0; j < 64; j += 16)
        for (int l = 0; l < 16; ++l) acc[l] += p[b * 64 + j + l];
      float s = 0;
      for (int l = 0; l < 16; ++l) s += acc[l];
      total += s;
    }
    benchmark::DoNotOptimize(total);
  }
  state.counters["GBps"] =
      benchmark::Counter(double(n) * sizeof(float) / 1e9, benchmark::Counter::kIsIterationInvariantRate);
}

void sweep(benchmark::internal::Benchmark* b) {
  for (const int shuffled : {0, 1})
    for (const int mixed : {0, 1})
      for (const int d : {1, 8, 32, 64}) {
        if (d == 1 && shuffled) continue;  // one adapter: the same batch either way
        b->Args({d, mixed, shuffled});
      }
  b->Unit(benchmark::kMillisecond)->UseRealTime();
}

}  // namespace

BENCHMARK(BM_gathered_forward)->Apply(sweep);
BENCHMARK(BM_gathered_low_rank)->Apply(sweep);
BENCHMARK(BM_masked_loop_forward)->Apply(sweep);
BENCHMARK(BM_masked_loop_low_rank)->Apply(sweep);
// 2 MiB: one r = 16 adapter at D = 8; 33.5 MiB: 64 of them; 12 MiB: ~L3.
BENCHMARK(BM_read_bandwidth)->Arg(2)->Arg(12)->Arg(34)->Arg(128)->Unit(benchmark::kMicrosecond)->UseRealTime();

BENCHMARK_MAIN();
