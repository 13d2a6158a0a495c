// 06_multi_adapter_serving: many fine-tunes of one base in one batch.
//
// A toy frozen base (1024 x 1024, fp32) carries 64 adapters of mixed ranks
// (4, 8, 16, 64 by slot: each tenant its own fine-tune). A serving batch of 256
// tokens mixes requests for 1, 8, 32 or 64 distinct adapters; every token
// carries its adapter's slot id (-1 would be the base alone), and one call,
//
//   layer.forward(X, ids, Y, ws);   // Y[t] = X[t] W^T + b + s_k B_k A_k X[t], k = ids[t]
//
// runs the base product once for the batch and each adapter's shrink / expand
// over its own tokens only, ranks unpadded, the adapters spread over the
// threads. For comparison the per-adapter masked loop: the base product, then
// for each adapter its low-rank term over the whole batch with the other
// tokens zeroed (what a framework without per-token gathering does).
//
// Prints a table (time per batch, tokens/s, overhead over the single-adapter
// batch, the loop's time), checks that both give the same outputs, and writes
// <out>/results.csv, <out>/serving.gnuplot and, when gnuplot is installed,
// <out>/serving.png.
//
//   06_multi_adapter_serving [--out ./multi_adapter_out] [--reps 7] [--dim 1024]
#include <lora/adapter_set.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

using lora::index_t;
using lora::RowMatrix;
using Layer = lora::MultiAdapterLinear<RowMatrix<float>>;

struct config {
  std::string out = "multi_adapter_out";
  int reps = 7;
  index_t dim = 1024;
};

config parse(int argc, char** argv) {
  config c;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (i + 1 >= argc) {
      std::fprintf(stderr, "usage: %s [--out DIR] [--reps N] [--dim D]\n", argv[0]);
      std::exit(2);
    }
    const std::string v = argv[++i];
    if (a == "--out")
      c.out = v;
    else if (a == "--reps")
      c.reps = std::max(1, std::atoi(v.c_str()));
    else if (a == "--dim")
      c.dim = std::max<index_t>(64, std::atol(v.c_str()));
    else {
      std::fprintf(stderr, "unknown option %s\n", a.c_str());
      std::exit(2);
    }
  }
  return c;
}

constexpr index_t kTokens = 256;
constexpr index_t kAdapters = 64;
constexpr index_t kRanks[] = {4, 8, 16, 64};

/// Best wall time of `reps` runs of f, in ms (after one warm-up run).
template <class F>
double best_ms(int reps, F&& f) {
  f();
  double best = 1e300;
  for (int i = 0; i < reps; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    f();
    best = std::min(best, std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  }
  return best;
}

struct Row {
  index_t distinct;
  double adapter_mb, gathered_ms, loop_ms, max_diff;
};

}  // namespace

int main(int argc, char** argv) {
  const config c = parse(argc, argv);
  const index_t dim = c.dim;
  int threads = 1;
#ifdef _OPENMP
  threads = omp_get_max_threads();
#endif

  RowMatrix<float> W(dim, dim);
  lora::EigenBackend::fill_random(W, lora::UniformDist{-0.03, 0.03}, 1, 0);
  Eigen::VectorXf bias(dim);
  lora::EigenBackend::fill_random(bias, lora::UniformDist{-0.1, 0.1}, 2, 0);
  Layer layer{W, bias};
  for (index_t k = 0; k < kAdapters; ++k) {
    const index_t r = kRanks[k % 4];
    lora::LowRankDelta<float> d{dim, dim, r, {.alpha = 2.0 * double(r)}};
    d.init(lora::init::UniformBoth{0.02}, 100 + static_cast<std::uint64_t>(k));
    layer.add("tenant" + std::to_string(k), std::move(d));
  }
  RowMatrix<float> X(kTokens, dim);
  lora::EigenBackend::fill_random(X, lora::UniformDist{-1.0, 1.0}, 3, 0);

  std::printf("base %ld x %ld fp32, %ld adapters of ranks 4/8/16/64, batches of %ld tokens, %d thread(s)\n\n",
              static_cast<long>(dim), static_cast<long>(dim), static_cast<long>(kAdapters),
              static_cast<long>(kTokens), threads);

  std::vector<Row> rows;
  Layer::gather_workspace ws;
  lora::EigenBackend::workspace<float> lws;
  RowMatrix<float> Y(kTokens, dim), Yl(kTokens, dim), Xm(kTokens, dim);
  const auto bank = layer.bank();
  for (const index_t distinct : {1, 8, 32, 64}) {
    // Requests of 256 / D tokens each, interleaved as a scheduler would pack
    // them (token t belongs to request t % D). D = 1 uses a rank-16 adapter.
    std::vector<std::int32_t> ids(kTokens);
    for (index_t t = 0; t < kTokens; ++t) ids[t] = static_cast<std::int32_t>(distinct == 1 ? 2 : t % distinct);
    std::vector<std::int32_t> present;
    for (const auto id : ids)
      if (std::find(present.begin(), present.end(), id) == present.end()) present.push_back(id);
    double bytes = 0;
    for (const auto id : present) bytes += double(kRanks[id % 4]) * double(2 * dim) * sizeof(float);

    const double g_ms = best_ms(c.reps, [&] { layer.forward(X, std::span<const std::int32_t>(ids), Y, ws); });
    const double l_ms = best_ms(c.reps, [&] {
      lora::expr::apply(lora::expr::base_leaf(layer.base_weight()), X, Yl, 1.0f, 0.0f, lws);
      for (const auto id : present) {
        for (index_t t = 0; t < kTokens; ++t)
          if (ids[t] == id)
            Xm.row(t) = X.row(t);
          else
            Xm.row(t).setZero();
        const auto& s = bank->slots[id];
        lora::expr::apply(s.scale * lora::expr::product(s.delta->B(), s.delta->A()), Xm, Yl, 1.0f, 1.0f, lws);
      }
      Yl.rowwise() += bias.transpose();
    });
    const double diff = (Y - Yl).cwiseAbs().maxCoeff();
    rows.push_back({distinct, bytes / 1e6, g_ms, l_ms, diff});
  }

  const double base_ms = rows.front().gathered_ms;
  std::printf("%9s %11s %12s %12s %10s %14s %10s %10s\n", "adapters", "adapter MB", "gathered ms", "tokens/s",
              "overhead", "masked loop ms", "loop/gath", "max |diff|");
  bool ok = true;
  for (const Row& r : rows) {
    std::printf("%9ld %11.2f %12.3f %12.0f %9.2fx %14.3f %9.2fx %10.2e\n", static_cast<long>(r.distinct),
                r.adapter_mb, r.gathered_ms, kTokens / (r.gathered_ms / 1e3), r.gathered_ms / base_ms, r.loop_ms,
                r.loop_ms / r.gathered_ms, r.max_diff);
    if (!(r.max_diff < 1e-3)) ok = false;
  }
  std::printf("\noverhead = time of the batch over the single-adapter batch (same base product); the masked loop\n"
              "runs every adapter over the whole batch, so it grows with the number of adapters.\n");

  namespace fs = std::filesystem;
  fs::create_directories(c.out);
  {
    std::ofstream f(fs::path(c.out) / "results.csv");
    f << "distinct_adapters,adapter_mb,gathered_ms,tokens_per_s,overhead,masked_loop_ms,loop_over_gathered\n";
    for (const Row& r : rows)
      f << r.distinct << ',' << r.adapter_mb << ',' << r.gathered_ms << ',' << kTokens / (r.gathered_ms / 1e3) << ','
        << r.gathered_ms / base_ms << ',' << r.loop_ms << ',' << r.loop_ms / r.gathered_ms << '\n';
  }
  {
    std::ofstream f(fs::path(c.out) / "serving.gnuplot");
    f << "set terminal pngcairo size 900,560\nset output 'serving.png'\nset datafile separator ','\n"
         "set key top left\nset logscale x 2\nset xrange [0.8:80]\nset xtics (1, 8, 32, 64)\nset xlabel 'distinct adapters in the "
         "batch of 256 tokens'\nset ylabel 'ms per batch'\nset yrange [0:*]\n"
         "set title 'Per-token adapters over a "
      << dim << "^2 base (ranks 4/8/16/64, " << threads << " threads)'\n"
      << "plot 'results.csv' using 1:3 skip 1 with linespoints lw 2 title 'gathered forward (base once + segments)', "
         "'results.csv' using 1:6 skip 1 with linespoints lw 2 title 'per-adapter masked loop'\n";
  }
  const std::string dir = fs::path(c.out).string();
  if (std::system("command -v gnuplot > /dev/null 2>&1") == 0 &&
      std::system(("cd '" + dir + "' && gnuplot serving.gnuplot").c_str()) == 0)
    std::printf("wrote %s/results.csv, serving.gnuplot and serving.png\n", dir.c_str());
  else
    std::printf("wrote %s/results.csv and serving.gnuplot; plot with: cd %s && gnuplot serving.gnuplot\n",
                dir.c_str(), dir.c_str());
  if (!ok) std::printf("FAILED: the gathered forward and the masked loop disagree\n");
  return ok ? 0 : 1;
}
