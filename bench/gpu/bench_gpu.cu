// bench/gpu/bench_gpu.cu: unmerged vs merged LoRA forward against plain cuBLAS
// GEMM on one GPU (run by scripts/gpu-check). Not a Google Benchmark program:
// CUDA events time batches of launches on one stream, which is what the ratio
// table needs, and the binary has no dependency beyond CUDA.
//
//   cublas    Y = X W^T                      one cublasSgemm / cublasGemmEx
//   merged    lora's merged forward          the same product on W + s B A
//   unmerged  lora's unmerged forward        X W^T, then Y += s (X A^T) B^T
//                                            (fused kernel for n <= 16, else two cuBLAS calls)
// Cases: in = out in {4096, 8192}, r in {8, 64}, n in {1, 64, 1024}, fp32 and bf16.
// Targets (docs/design, section 6): unmerged / merged <= 1.05 for n >= 64, <= 1.20 at n = 1.
#include <lora/thrust.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

namespace {

using lora::index_t;
using TB = lora::ThrustBackend;

struct timer {
  cudaEvent_t start, stop;
  timer() {
    LORA_CUDA_CHECK(cudaEventCreate(&start));
    LORA_CUDA_CHECK(cudaEventCreate(&stop));
  }
  ~timer() {
    (void)cudaEventDestroy(start);
    (void)cudaEventDestroy(stop);
  }
  // Mean microseconds per call: the best of 3 batches, each about 20 ms.
  template <class F>
  double time_us(F&& f) {
    for (int i = 0; i < 3; ++i) f();  // warm-up (cuBLAS heuristics, caches)
    LORA_CUDA_CHECK(cudaDeviceSynchronize());
    int reps = 1;
    double best = 1e30;
    for (int batch = 0; batch < 4; ++batch) {
      LORA_CUDA_CHECK(cudaEventRecord(start, lora::cuda::current_stream()));
      for (int i = 0; i < reps; ++i) f();
      LORA_CUDA_CHECK(cudaEventRecord(stop, lora::cuda::current_stream()));
      LORA_CUDA_CHECK(cudaEventSynchronize(stop));
      float ms = 0;
      LORA_CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
      const double per = 1000.0 * ms / reps;
      if (batch == 0) {
        reps = std::clamp(static_cast<int>(20000.0 / std::max(per, 1.0)), 5, 2000);  // next batches ~20 ms
      } else {
        best = std::min(best, per);
      }
    }
    return best;
  }
};

template <class T>
double max_rel_diff(const lora::DeviceMatrix<T>& a, const lora::DeviceMatrix<T>& b) {
  // Compare in fp32 on the host (bf16 has no Eigen scalar here).
  std::vector<T> ha(a.size()), hb(b.size());
  thrust::copy(a.storage().begin(), a.storage().end(), ha.begin());
  thrust::copy(b.storage().begin(), b.storage().end(), hb.begin());
  double diff = 0, scale = 0;
  for (std::size_t i = 0; i < ha.size(); ++i) {
    const double x = static_cast<float>(ha[i]), y = static_cast<float>(hb[i]);
    diff = std::max(diff, std::abs(x - y));
    scale = std::max(scale, std::abs(y));
  }
  return scale > 0 ? diff / scale : diff;
}

template <int R, class T>
void run_case(const char* dtype, index_t dim, index_t n, std::FILE* out) {
  using A = lora::kernels::accum_t<T>;
  const index_t in = dim, outf = dim;
  const double bound = 1.0 / std::sqrt(static_cast<double>(in));
  lora::DeviceMatrix<T> W(outf, in), Wm(outf, in), Ad(R, in), Bd(outf, R), X(n, in), Y(n, outf), Ym(n, outf);
  TB::fill_random(W, lora::UniformDist{-bound, bound}, 1, 0);
  TB::fill_random(Ad, lora::UniformDist{-bound, bound}, 2, 0);
  TB::fill_random(Bd, lora::UniformDist{-0.1, 0.1}, 3, 0);
  TB::fill_random(X, lora::UniformDist{-1.0, 1.0}, 4, 0);
  const A s = A(2);  // alpha = 2 r
  // Merged weight W + s B A (in T, as a merged layer stores it).
  TB::copy(W, Wm);
  lora::cuda::gemm(false, false, outf, in, R, s, Bd.data(), Bd.stride(), Ad.data(), Ad.stride(), A(1), Wm.data(),
                   Wm.stride());
  TB::workspace<T> ws;
  const auto base = [&](const lora::DeviceMatrix<T>& w, lora::DeviceMatrix<T>& y) {
    lora::cuda::gemm(false, true, n, outf, in, A(1), X.data(), X.stride(), w.data(), w.stride(), A(0), y.data(),
                     y.stride());  // (n, out) = (n, in) (out, in)^T
  };
  timer t;
  const double cublas = t.time_us([&] { base(W, Y); });
  const double merged = t.time_us([&] { base(Wm, Ym); });
  const double unmerged = t.time_us([&] {
    base(W, Y);
    lora::cuda::adapter_forward<R, T>(s, X.view(), Ad.view(), Bd.view(), Y.view(), ws);
  });
  LORA_CUDA_CHECK(cudaDeviceSynchronize());
  const double diff = max_rel_diff(Y, Ym);
  const double ratio = unmerged / merged;
  const double target = n >= 64 ? 1.05 : 1.20;
  std::fprintf(out, "| %-4s | %5ld | %3d | %5ld | %10.1f | %10.1f | %10.1f | %6.3f | %8.3f | %6.2f | %-4s | %8.1e |\n", dtype,
               static_cast<long>(dim), R, static_cast<long>(n), cublas, merged, unmerged, ratio, merged / cublas, target,
               ratio <= target ? "ok" : "MISS", diff);
  std::fflush(out);
}

template <class T>
void run_dtype(const char* dtype, std::FILE* out) {
  for (index_t dim : {4096, 8192})
    for (index_t n : {1, 64, 1024}) {
      run_case<8, T>(dtype, dim, n, out);
      run_case<64, T>(dtype, dim, n, out);
    }
}

}  // namespace

int main() {
  if (!lora::cuda::device_available()) {
    std::printf("bench_gpu: no CUDA device present\n");
    return 77;
  }
  cudaDeviceProp prop{};
  LORA_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  std::printf("bench_gpu: %s (sm_%d%d), times in microseconds per forward, best of 3 batches of ~20 ms\n",
              prop.name, prop.major, prop.minor);
  std::printf("ratio = unmerged / merged (target <= 1.05 at n >= 64, <= 1.20 at n = 1); merged/cuBLAS should be ~1;\n"
              "diff = max |unmerged - merged| / max |merged| (rounding only; bf16 ~1e-2)\n\n");
  std::printf("| type | in=out |  r  |   n   | cuBLAS us  | merged us  | unmerged us| ratio  | m/cuBLAS | target | ok?  |   diff   |\n");
  std::printf("|------|-------|-----|-------|------------|------------|------------|--------|----------|--------|------|----------|\n");
  run_dtype<float>("fp32", stdout);
  run_dtype<__nv_bfloat16>("bf16", stdout);
  return 0;
}
