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

namespace lora_bench {

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
