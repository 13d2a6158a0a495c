// This machine's limits, measured in the same run as the cases they bound:
// memory read bandwidth (a STREAM-like sum) from DRAM (1 GiB, beyond any L3
// here) and from L3 (64 MiB: the size of a 4096^2 fp32 W, which stays in this
// machine's 260 MiB L3 between forwards), read+write bandwidth (STREAM scale
// from DRAM, and an in-place update of 64 MiB: merge()'s traffic), and peak
// SGEMM through Eigen and through lora's own packed kernel (the faster is the
// peak). Every case's "percent of limit" in docs/benchmarks.md and
// bench/compare.sh divides by these; every figure is the fastest iteration.
//
// Built a second time with EIGEN_USE_BLAS when LORA_BENCH_BLAS=ON
// (bench/CMakeLists.txt): bench_limits_openblas, bench_limits_blis; there the
// SGEMM case is Eigen's product handed to that BLAS's sgemm.
#include <benchmark/benchmark.h>

#include <Eigen/Core>
#include <lora/lora.hpp>
#include <cstddef>
#include <string>
#include <vector>

#include "best_time.hpp"

#ifdef _OPENMP
#include <omp.h>
#endif

#ifdef LORA_BENCH_OPENBLAS
extern "C" char* openblas_get_corename(void);
extern "C" int openblas_get_num_threads(void);
#endif

namespace {

// The argument of the bandwidth cases is the buffer's size in MiB.
std::size_t floats_of(const benchmark::State& state) { return std::size_t(state.range(0)) << 18; }

// The buffers of the bandwidth limits: 2 MiB-aligned and advised for
// transparent huge pages, the best case for a streaming read (a limit must not
// be beaten by a lora kernel whose buffer happened to land better: on the Intel
// host the same 64 MiB sum read 52 GB/s from a std::vector, 56-58 aligned,
// 58.6 with huge pages): PackedMatrix's allocator.
using Buffer = std::vector<float, lora::detail::packed::HugePageAllocator<float>>;

// The sum of one thread's slice as 8 interleaved streams (the slice cut in 8
// contiguous parts, read in lockstep), 16 lanes each: enough adds in flight
// that the loop waits on memory only, and 8 streams for the prefetchers, as
// the n = 1 forward's GEMV reads several rows of W at once. Eigen's
// two-accumulator reduction read 42 GB/s from L3 and one stream in 128 lanes
// 53 GB/s; both were below the n = 1 forward's own pass over W (55-56 GB/s),
// so no limit. Eight streams: 56-57 GB/s on the same host. BM_stream_read
// alternates 8 and 16 streams and keeps the faster: measured in one process
// with the n = 1 forward, 8 / 16 streams 58.5-59.4 / 58.5-60.8 GB/s, the
// forward 57.7-58.3 (in separate programs of one run the forward came out at
// 101-102 % of the 8-stream figure).
template <std::size_t streams>
float slice_sum(const float* p, std::size_t n) {
  constexpr std::size_t lanes = 16;
  const std::size_t per = n / streams / lanes * lanes;  // each stream's length
  float acc[streams][lanes] = {};
  for (std::size_t i = 0; i < per; i += lanes)
    for (std::size_t s = 0; s < streams; ++s)
#pragma omp simd
      for (std::size_t k = 0; k < lanes; ++k) acc[s][k] += p[s * per + i + k];
  float total = 0.0f;
  for (std::size_t s = 0; s < streams; ++s)
    for (std::size_t k = 0; k < lanes; ++k) total += acc[s][k];
  for (std::size_t i = streams * per; i < n; ++i) total += p[i];
  return total;
}

// Each limit's rate comes from its fastest iteration (best_time.hpp): the
// statistic of the lora cases it bounds.
// Sum: reads only. Each thread sums its own contiguous slice (slice_sum), so
// the loop is bound by memory, not by the latency of one chain of adds (a
// plain `omp simd` reduction measured 9.5 GB/s here, a fifth of the L3's
// bandwidth). The buffer is first touched by the same split that reads it.
void BM_stream_read(benchmark::State& state) {
  const std::size_t count = floats_of(state);
  Buffer a(count);
#pragma omp parallel for schedule(static)
  for (std::size_t i = 0; i < count; ++i) a[i] = 1.0f;
  lora_bench::BestTime best;
  bool wide = false;
  for (auto _ : state) {
    wide = !wide;
    best.time([&] {
      float total = 0.0f;
#pragma omp parallel reduction(+ : total)
      {
#ifdef _OPENMP
        const std::size_t t = std::size_t(omp_get_thread_num()), nt = std::size_t(omp_get_num_threads());
#else
        const std::size_t t = 0, nt = 1;
#endif
        const std::size_t begin = count * t / nt, end = count * (t + 1) / nt;
        total += wide ? slice_sum<16>(a.data() + begin, end - begin) : slice_sum<8>(a.data() + begin, end - begin);
      }
      benchmark::DoNotOptimize(total);
    });
  }
  best.report_rate(state, "GB/s", 4.0 * double(count));
}

// Scale b = 3 a: one read and one write stream.
void BM_stream_scale(benchmark::State& state) {
  const std::size_t count = floats_of(state);
  Buffer a(count), b(count);
#pragma omp parallel for schedule(static)
  for (std::size_t i = 0; i < count; ++i) a[i] = 1.0f, b[i] = 0.0f;
  lora_bench::BestTime best;
  for (auto _ : state) {
    best.time([&] {
#pragma omp parallel for schedule(static)
      for (std::size_t i = 0; i < count; ++i) b[i] = 3.0f * a[i];
      benchmark::ClobberMemory();
    });
  }
  best.report_rate(state, "GB/s", 8.0 * double(count));
}

// In-place update a = a * c + d: W's traffic in merge() (read and write the
// same buffer once). c, d keep the values bounded over many iterations.
void BM_stream_update(benchmark::State& state) {
  const std::size_t count = floats_of(state);
  Buffer a(count);
#pragma omp parallel for schedule(static)
  for (std::size_t i = 0; i < count; ++i) a[i] = 1.0f;
  lora_bench::BestTime best;
  for (auto _ : state) {
    best.time([&] {
#pragma omp parallel for simd schedule(static)
      for (std::size_t i = 0; i < count; ++i) a[i] = a[i] * 0.5f + 0.5f;
      benchmark::ClobberMemory();
    });
  }
  best.report_rate(state, "GB/s", 8.0 * double(count));
}

// Peak SGEMM: a large square product, the best Eigen (or, built with
// EIGEN_USE_BLAS, the linked BLAS) does on this machine.
void BM_sgemm_peak(benchmark::State& state) {
  const Eigen::Index d = state.range(0);
  Eigen::MatrixXf a = Eigen::MatrixXf::Random(d, d), b = Eigen::MatrixXf::Random(d, d), c(d, d);
  lora_bench::BestTime best;
  for (auto _ : state) {
    best.time([&] {
      c.noalias() = a * b;
      benchmark::DoNotOptimize(c.data());
    });
  }
  best.report_rate(state, "GFLOP/s", 2.0 * double(d) * double(d) * double(d));
}

// The n = 256 forward's shape: X [256, 4096] times W^T, W [4096, 4096] row-major.
void BM_sgemm_forward_shape(benchmark::State& state) {
  using Row = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  const Eigen::Index n = state.range(0), d = 4096;
  Row x = Row::Random(n, d), w = Row::Random(d, d), y(n, d);
  lora_bench::BestTime best;
  for (auto _ : state) {
    best.time([&] {
      y.noalias() = x * w.transpose();
      benchmark::DoNotOptimize(y.data());
    });
  }
  best.report_rate(state, "GFLOP/s", 2.0 * double(n) * double(d) * double(d));
}

#ifndef LORA_BENCH_BLAS_NAME
// lora's own SGEMM, Y = X W^T through a PackedMatrix (the packed base's
// forward kernel, backend/eigen/packed.hpp): part of the peak, since a peak that
// a lora kernel beats bounds nothing. Reported under the same names with a
// _packed suffix; bench/compare_report.py takes the faster of the two.
void BM_sgemm_packed(benchmark::State& state) {
  using Row = lora::RowMatrix<float>;
  const Eigen::Index n = state.range(0), d = state.range(1);
  const Row x = Row::Random(n, d);
  const lora::PackedMatrix w(Row::Random(d, d));
  Row y(n, d);
  lora_bench::BestTime best;
  for (auto _ : state) {
    best.time([&] {
      lora::quantized_traits<lora::PackedMatrix>::gemm_nt(w, 0, d, 1.0f, x, 0.0f, y);
      benchmark::DoNotOptimize(y.data());
    });
  }
  best.report_rate(state, "GFLOP/s", 2.0 * double(n) * double(d) * double(d));
}
#endif

int add_context() {
#ifdef LORA_BENCH_BLAS_NAME
  std::string blas = LORA_BENCH_BLAS_NAME;
#ifdef LORA_BENCH_OPENBLAS
  blas += std::string(" (core ") + openblas_get_corename() + ", " + std::to_string(openblas_get_num_threads()) +
          " threads)";
#endif
#else
  const std::string blas = "eigen";
#endif
  benchmark::AddCustomContext("gemm", blas);
#ifdef _OPENMP
  benchmark::AddCustomContext("omp_threads", std::to_string(omp_get_max_threads()));
#endif
  return 0;
}
const int context_added = add_context();

}  // namespace

// Buffer sizes in MiB: 1024 is beyond any L3 here (DRAM), 64 is a 4096 x 4096
// fp32 W, which this machine's 260 MiB L3 holds (n = 1 forwards read W from L3).
BENCHMARK(BM_stream_read)->Name("BM_dram_read")->ArgName("MiB")->Arg(1024)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_stream_scale)->Name("BM_dram_scale")->ArgName("MiB")->Arg(1024)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_stream_read)->Name("BM_l3_read")->ArgName("MiB")->Arg(64)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_stream_update)->Name("BM_l3_update")->ArgName("MiB")->Arg(64)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_sgemm_peak)->ArgName("d")->Arg(2048)->Arg(4096)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_sgemm_forward_shape)->ArgName("n")->Arg(256)->Unit(benchmark::kMillisecond)->UseRealTime();
#ifndef LORA_BENCH_BLAS_NAME
BENCHMARK(BM_sgemm_packed)->Name("BM_sgemm_peak_packed")->ArgNames({"n", "d"})->Args({2048, 2048})->Args({4096, 4096})
    ->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_sgemm_packed)->Name("BM_sgemm_forward_shape_packed")->ArgNames({"n", "d"})->Args({256, 4096})
    ->Unit(benchmark::kMillisecond)->UseRealTime();
#endif

BENCHMARK_MAIN();
