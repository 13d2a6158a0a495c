// bench_dist: distributed LoRA steps at 1 and p ranks (docs/distributed.md,
// "Measured"). Not a Google Benchmark program: every rank must make the same
// collectives in the same order, so the iteration counts are fixed, not tuned
// per rank. Each timed step starts after a barrier; a step's time is the
// slowest rank's, and the printed value is the median over the steps.
//
//   data-parallel   L = 4 adapted layers d x d (d = 1024, r = 16, float, no
//                   bias) in a chain, a global batch of 256 tokens split over
//                   the ranks (strong scaling): forward, backward, the
//                   gradients' all-reduce (dist::GradientReducer, one 25 MiB
//                   bucket), AdamW step. Bytes all-reduced per step, measured
//                   (the communicator's count) vs the formula L r (in + out) 4,
//                   and the time of an all-reduce of the full fine-tuning
//                   gradients (L d^2 floats) for comparison.
//   tensor-parallel one layer in = out = 2048, r = 16, 64 tokens on every
//                   rank: column-parallel and row-parallel, forward alone and
//                   forward + backward (with dX); bytes vs the formulas
//                   (column: backward r in + n in; row: forward n (out + r)).
//   timeout path    (MPI only) the data-parallel gradient all-reduce through a
//                   communicator with a timeout (MPI_Iallreduce + MPI_Test
//                   polling) next to the blocking MPI_Allreduce.
//
// Built with MPI (LORA_BENCH_MPI=1, linking lora::mpi) it runs over
// MPI_COMM_WORLD: `mpirun -np 2 build/.../bench_dist`; without, over
// dist::SingleProcess (one rank).
#include <lora/dist/data_parallel.hpp>
#include <lora/dist/tensor_parallel.hpp>
#if LORA_BENCH_MPI
#include <lora/dist/mpi.hpp>
#endif

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <deque>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

using lora::index_t;
namespace dist = lora::dist;
namespace train = lora::train;
using T = float;
using Mat = lora::RowMatrix<T>;
constexpr int R = 16;
using Layer = lora::AdaptedLinear<Mat, lora::LowRankDelta<T, R>>;
using clock_type = std::chrono::steady_clock;

constexpr int warmup = 3, reps = 15;

void fill(Mat& m, double scale, std::uint64_t seed) {
  lora::EigenBackend::fill_random(m, lora::UniformDist{-scale, scale}, seed, 3);
}

Layer make_layer(index_t out, index_t in, std::uint64_t seed) {
  Mat W(out, in);
  fill(W, 1.0 / std::sqrt(double(in)), seed);
  Layer l{std::move(W), lora::LowRankDelta<T, R>{out, in, {.alpha = 2.0 * R}}};
  l.delta().init(lora::init::UniformBoth{0.01}, seed + 1);
  return l;
}

double ms_since(clock_type::time_point t0) {
  return std::chrono::duration<double, std::milli>(clock_type::now() - t0).count();
}

// The median over steps of the slowest rank's time.
template <class Comm>
double slowest_median(Comm& comm, const std::vector<double>& mine) {
  std::vector<double> all(mine.size() * static_cast<std::size_t>(comm.size()));
  comm.all_gather(std::span<const double>(mine), std::span<double>(all));
  std::vector<double> worst(mine.size(), 0.0);
  for (std::size_t q = 0; q < static_cast<std::size_t>(comm.size()); ++q)
    for (std::size_t i = 0; i < mine.size(); ++i) worst[i] = std::max(worst[i], all[q * mine.size() + i]);
  std::nth_element(worst.begin(), worst.begin() + static_cast<std::ptrdiff_t>(worst.size() / 2), worst.end());
  return worst[worst.size() / 2];
}

// ---- data parallel ---------------------------------------------------------------------

struct DpResult {
  double step_ms, compute_ms, reduce_ms, optim_ms, full_reduce_ms;
  std::uint64_t bytes, formula_bytes, full_bytes;
};

template <class Comm>
DpResult data_parallel(Comm& comm, Comm& reduce_comm) {
  constexpr index_t d = 1024, N = 256;
  constexpr int L = 4;
  const dist::Shard mine = dist::split(N, comm.size(), comm.rank());
  const index_t n = mine.count;
  Mat Xg(N, d), Gg(N, d);
  fill(Xg, 1.0, 101);
  fill(Gg, 1e-3, 102);
  const Mat X = Xg.middleRows(mine.offset, n), G = Gg.middleRows(mine.offset, n);

  std::deque<Layer> layers;
  std::deque<train::Tape<Layer>> tapes;
  std::deque<train::Gradients<Layer>> grads;
  train::AdamW<T> opt({.lr = 1e-4, .weight_decay = 0.0});
  for (int l = 0; l < L; ++l) {
    layers.push_back(make_layer(d, d, 200 + 10 * l));
    tapes.emplace_back();
    grads.emplace_back(layers.back());
    opt.add(layers.back(), grads.back(), "layer" + std::to_string(l));
  }
  dist::GradientReducer<T, Comm> reducer(reduce_comm);
  std::vector<Mat> acts(L + 1, Mat(n, d));
  acts[0] = X;
  Mat g(n, d), dx(n, d);

  std::vector<double> step, compute, reduce, optim;
  std::uint64_t bytes = 0;
  for (int it = 0; it < warmup + reps; ++it) {
    comm.barrier();
    const auto t0 = clock_type::now();
    for (int l = 0; l < L; ++l) train::forward(layers[l], acts[l], acts[l + 1], tapes[l]);
    g = G;
    for (int l = L - 1; l >= 0; --l) {
      if (l > 0) {
        train::backward(layers[l], acts[l], g, tapes[l], grads[l], dx);
        g.swap(dx);
      } else {
        train::backward(layers[l], acts[l], g, tapes[l], grads[l]);
      }
    }
    const double c = ms_since(t0);
    comm.barrier();  // the all-reduce's time without the wait for a slower rank (that stays in the step)
    const auto t1 = clock_type::now();
    const auto before = reduce_comm.stats().all_reduce_bytes;
    reducer.reduce(opt);
    bytes = reduce_comm.stats().all_reduce_bytes - before;
    const double rd = ms_since(t1);
    const auto t2 = clock_type::now();
    opt.step();
    const double o = ms_since(t2);
    if (it < warmup) continue;
    step.push_back(ms_since(t0));
    compute.push_back(c);
    reduce.push_back(rd);
    optim.push_back(o);
  }

  // What full fine-tuning would all-reduce: every W's gradient, L d^2 floats.
  std::vector<T> full(static_cast<std::size_t>(L * d * d), T(1));
  std::vector<double> full_ms;
  for (int it = 0; it < warmup + reps; ++it) {
    comm.barrier();
    const auto t0 = clock_type::now();
    reduce_comm.all_reduce_sum(std::span<T>(full));
    if (it >= warmup) full_ms.push_back(ms_since(t0));
  }
  return {slowest_median(comm, step),
          slowest_median(comm, compute),
          slowest_median(comm, reduce),
          slowest_median(comm, optim),
          slowest_median(comm, full_ms),
          bytes,
          std::uint64_t(L) * R * (d + d) * sizeof(T),
          full.size() * sizeof(T)};
}

// ---- tensor parallel -------------------------------------------------------------------

struct TpResult {
  double fwd_ms, step_ms;
  std::uint64_t fwd_bytes, step_bytes, formula_fwd, formula_step;
};

constexpr index_t tp_dim = 2048, tp_tokens = 64;

/// Times a tensor-parallel layer's training forward and forward + backward
/// over warmup + reps steps (a barrier before each), with the bytes each
/// all-reduced; fills the measured half of a TpResult.
template <class Comm, class Forward, class Backward>
TpResult time_tp(Comm& comm, Forward&& forward, Backward&& backward) {
  std::vector<double> fwd, step;
  std::uint64_t fb = 0, sb = 0;
  for (int it = 0; it < warmup + reps; ++it) {
    comm.barrier();
    const auto before = comm.stats().all_reduce_bytes;
    const auto t0 = clock_type::now();
    forward();
    const double f = ms_since(t0);
    fb = comm.stats().all_reduce_bytes - before;
    backward();
    const double s = ms_since(t0);
    sb = comm.stats().all_reduce_bytes - before;
    if (it < warmup) continue;
    fwd.push_back(f);
    step.push_back(s);
  }
  return {slowest_median(comm, fwd), slowest_median(comm, step), fb, sb, 0, 0};
}

template <class Comm>
TpResult column_parallel(Comm& comm) {
  const index_t d = tp_dim, n = tp_tokens;
  const Layer full = make_layer(d, d, 300);
  const dist::Shard sh = dist::split(d, comm.size(), comm.rank());
  dist::ColumnParallelLinear cp(comm, dist::column_shard(full, sh), d);
  Mat X(n, d), G(n, d), Y(n, sh.count), dX(n, d);
  fill(X, 1.0, 301);
  fill(G, 1.0, 302);
  const Mat Gq = G.middleCols(sh.offset, sh.count);
  train::Tape<Layer> tape;
  train::Gradients<Layer> grads(cp.local());
  TpResult res = time_tp(comm, [&] { cp.train_forward(X, Y, tape); }, [&] { cp.backward(X, Gq, tape, grads, dX); });
  res.formula_step = std::uint64_t(R * d + n * d) * sizeof(T);  // the forward moves nothing
  return res;
}

template <class Comm>
TpResult row_parallel(Comm& comm) {
  const index_t d = tp_dim, n = tp_tokens;
  const Layer full = make_layer(d, d, 400);
  const dist::Shard sh = dist::split(d, comm.size(), comm.rank());
  dist::RowParallelLinear rp(comm, dist::row_shard(full, sh), d);
  Mat X(n, d), G(n, d), Y(n, d), dXq(n, sh.count);
  fill(X, 1.0, 401);
  fill(G, 1.0, 402);
  const Mat Xq = rp.local_input(X);
  typename dist::RowParallelLinear<Layer, Comm>::Tape tape;
  train::Gradients<Layer> grads(rp.local());
  TpResult res = time_tp(comm, [&] { rp.train_forward(Xq, Y, tape); }, [&] { rp.backward(Xq, G, tape, grads, dXq); });
  res.formula_fwd = res.formula_step = std::uint64_t(n * (d + R)) * sizeof(T);
  return res;
}

template <class Comm>
void run(Comm& comm, Comm& reduce_comm, const char* transport) {
  const bool root = comm.rank() == 0;
  int threads = 1;
#ifdef _OPENMP
  threads = omp_get_max_threads();
#endif
  const DpResult dp = data_parallel(comm, reduce_comm);
  const TpResult col = column_parallel(comm), row = row_parallel(comm);
  if (!root) return;
  std::printf("bench_dist: %d rank(s) over %s, %d OpenMP thread(s) per rank; median of %d steps, slowest rank\n",
              comm.size(), transport, threads, reps);
  std::printf("data-parallel  L=4 x [1024,1024] r=%d float, 256 tokens global (%ld per rank)\n", R,
              static_cast<long>(dist::split(256, comm.size(), 0).count));
  std::printf("  step %.2f ms: fwd+bwd %.2f, then (after a barrier) all-reduce %.3f, AdamW %.3f\n", dp.step_ms,
              dp.compute_ms, dp.reduce_ms, dp.optim_ms);
  std::printf("  all-reduced %llu bytes/step (formula L r (in+out) 4 = %llu)%s\n",
              static_cast<unsigned long long>(dp.bytes), static_cast<unsigned long long>(dp.formula_bytes),
              dp.bytes == dp.formula_bytes ? ", equal" : ", DIFFERENT");
  std::printf("  full fine-tuning's gradients (%llu bytes): all-reduce %.3f ms\n",
              static_cast<unsigned long long>(dp.full_bytes), dp.full_reduce_ms);
  const auto tp = [&](const char* name, const TpResult& t) {
    std::printf("%s  [2048,2048] r=%d, 64 tokens: forward %.3f ms, forward+backward %.3f ms; "
                "all-reduced forward %llu (formula %llu), step %llu (formula %llu) bytes\n",
                name, R, t.fwd_ms, t.step_ms, static_cast<unsigned long long>(t.fwd_bytes),
                static_cast<unsigned long long>(t.formula_fwd), static_cast<unsigned long long>(t.step_bytes),
                static_cast<unsigned long long>(t.formula_step));
  };
  tp("column-parallel", col);
  tp("row-parallel   ", row);
}

}  // namespace

int main(int argc, char** argv) {
#if LORA_BENCH_MPI
  dist::MpiSession mpi(argc, argv);
  dist::MpiCommunicator world;
  run(world, world, "MPI (blocking collectives)");
  {
    using namespace std::chrono_literals;
    // The same data-parallel step with the gradient all-reduce on a timed
    // communicator: MPI_Iallreduce polled by MPI_Test (the failure-detecting path).
    dist::MpiCommunicator timed(MPI_COMM_WORLD, {.timeout = 60s});
    const DpResult dp = data_parallel(world, timed);
    if (world.rank() == 0)
      std::printf("timeout path (60 s): data-parallel step %.2f ms, gradient all-reduce %.3f ms, "
                  "full fine-tuning's %.3f ms\n",
                  dp.step_ms, dp.reduce_ms, dp.full_reduce_ms);
  }
#else
  (void)argc;
  (void)argv;
  dist::SingleProcess one;
  run(one, one, "SingleProcess (no MPI)");
#endif
  return 0;
}
