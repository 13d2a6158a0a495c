// bench/best_time.hpp: the fastest iteration of a benchmark loop, reported as
// counter best_ms (or as a rate). That is the statistic compare_torch.py reports
// for PyTorch (its best of several calls), so bench/compare_report.py compares
// like with like. Google Benchmark's own time is the mean over the iterations,
// which on a shared machine includes time slices lost to other processes (5-40 %
// here): compared with PyTorch's best call it understated lora in every earlier
// side-by-side table, and a mean-based limit read a best-based case as "above
// the limit".
#pragma once

#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>

namespace lora_bench {

/// in = out of the layer benchmarks (bench_forward, bench_train): 4096, or
/// LORA_BENCH_DIM (bench/compare.sh passes it; 8192 for a W past the L3 of
/// most hosts). A value that is not a whole number from 64 to 65536 stops the
/// program with a message rather than benchmarking something else.
inline long dim() {
  const char* s = std::getenv("LORA_BENCH_DIM");
  if (s == nullptr || *s == '\0') return 4096;
  char* end = nullptr;
  const long d = std::strtol(s, &end, 10);
  if (*end != '\0' || d < 64 || d > 65536) {
    std::fprintf(stderr, "LORA_BENCH_DIM=%s: expected a whole number from 64 to 65536\n", s);
    std::exit(2);
  }
  return d;
}

class BestTime {
 public:
  /// Runs f once, keeps the fastest time; returns this call's seconds.
  template <class F>
  double time(F&& f) {
    const auto t0 = std::chrono::steady_clock::now();
    f();
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best_ = std::min(best_, s);
    return s;
  }
  double seconds() const { return best_; }
  /// counters["best_ms"] = the fastest iteration in milliseconds.
  void report(benchmark::State& state) const { state.counters["best_ms"] = best_ * 1e3; }
  /// counters[name] = work per second at the fastest iteration (GB/s: bytes; GFLOP/s: flops).
  void report_rate(benchmark::State& state, const char* name, double work) const {
    state.counters[name] = work / best_;
  }

 private:
  double best_ = 1e30;
};

}  // namespace lora_bench
