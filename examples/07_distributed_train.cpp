// 07: LoRA fine-tuning over MPI ranks, data-parallel and tensor-parallel, each
// checked against the same training in one process.
//
// The model: an MLP block y = W2 relu(W1 x + b1) + b2 (in 32 -> hidden 90 ->
// out 24), both projections frozen, a rank-4 LoRA adapter on each. The task: a
// teacher that is the same base with a rank-2 change on each projection; mean
// squared error over a fixed global batch of 48 tokens; AdamW, 120 steps.
// Three runs of the same training:
//   reference        one process, no MPI: SingleProcess, the whole batch
//   data-parallel    every rank holds the whole model and 48 / p tokens; the
//                    adapters' gradients are averaged over ranks
//                    (dist::GradientReducer) before each step
//   tensor-parallel  every rank sees all 48 tokens; W1 is column-parallel
//                    (hidden rows split), W2 row-parallel (hidden columns
//                    split): Megatron's MLP. One all-reduce of [n, out + r]
//                    in forward, one of A1's gradient [r, in] in backward.
// hidden = 90 is not divisible by 4: the first ranks take one more row.
// Prints the losses of the three every 20 steps, the largest relative
// difference from the reference, and the bytes each parallel run handed to
// MPI per step (measured) next to full fine-tuning's (formula).
//
//   mpirun -np 4 build/release/examples/07_distributed_train     (also -np 1, 2)
//   (as root add --allow-run-as-root; more ranks than cores: --oversubscribe)
//
// Exits 1 if a parallel loss differs from the reference by more than 1e-3
// relative at any step. The parallel runs sum in another order (per-rank
// partial sums, then MPI's): float rounding apart at step 0, and AdamW's
// normalised steps carry such differences forward; at 2 and 4 ranks they stay
// near 1e-4 over 120 steps. One rank gives the reference's bits exactly.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <lora/dist/data_parallel.hpp>
#include <lora/dist/mpi.hpp>
#include <lora/dist/tensor_parallel.hpp>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

using T = float;
using lora::index_t;
namespace dist = lora::dist;
namespace train = lora::train;
using Mat = lora::RowMatrix<T>;
using Vec = Eigen::Matrix<T, Eigen::Dynamic, 1>;
constexpr int R = 4;
using Layer = lora::AdaptedLinear<Mat, lora::LowRankDelta<T, R>>;

constexpr index_t in = 32, hidden = 90, out = 24, tokens = 48;
constexpr int steps = 120;

template <class M>
void fill(M& m, double scale, std::uint64_t seed) {
  lora::EigenBackend::fill_random(m, lora::UniformDist{-scale, scale}, seed, 7);
}

// The frozen base, the teacher's targets and the batch: the same on every rank (same seeds).
struct Problem {
  Mat W1, W2, X, target;
  Vec b1, b2;
};

Problem make_problem() {
  Problem p{Mat(hidden, in), Mat(out, hidden), Mat(tokens, in), Mat(tokens, out), Vec(hidden), Vec(out)};
  fill(p.W1, 1.0 / std::sqrt(double(in)), 1);
  fill(p.W2, 1.0 / std::sqrt(double(hidden)), 2);
  fill(p.b1, 0.1, 3);
  fill(p.b2, 0.1, 4);
  fill(p.X, 1.0, 5);
  // Teacher: W + U V with rank 2 on each projection.
  Mat U1(hidden, 2), V1(2, in), U2(out, 2), V2(2, hidden);
  fill(U1, 0.5, 6);
  fill(V1, 0.5, 7);
  fill(U2, 0.5, 8);
  fill(V2, 0.5, 9);
  const Mat T1 = p.W1 + U1 * V1, T2 = p.W2 + U2 * V2;
  const Mat h = ((p.X * T1.transpose()).rowwise() + p.b1.transpose()).cwiseMax(T(0));
  p.target = (h * T2.transpose()).rowwise() + p.b2.transpose();
  return p;
}

// The student layers, before sharding: LoRA alpha = 8 (s = 2), loralib's init.
Layer make_student(const Mat& W, const Vec& b, std::uint64_t seed) {
  Layer l{W, b, lora::LowRankDelta<T, R>{W.rows(), W.cols(), {.alpha = 8.0}}};
  l.delta().init(lora::init::KaimingZero{}, seed);
  return l;
}

train::AdamWOptions adamw() { return {.lr = 0.01, .weight_decay = 0.0}; }

struct Run {
  std::vector<double> loss;          // global loss before each step
  std::uint64_t bytes_per_step = 0;  // handed to the communicator (MPI payload)
  double ms_per_step = 0;
};

// Data-parallel training (with SingleProcess: the reference). Each rank's loss
// is the mean over its equal share of the batch, so the average over ranks of
// the gradients (GradientReducer's default) is the whole batch's gradient.
template <class Comm>
Run train_data_parallel(Comm& comm, const Problem& pb) {
  const dist::Shard mine = dist::split(tokens, comm.size(), comm.rank());
  const Mat X = pb.X.middleRows(mine.offset, mine.count), target = pb.target.middleRows(mine.offset, mine.count);
  const index_t n = mine.count;
  Layer l1 = make_student(pb.W1, pb.b1, 11), l2 = make_student(pb.W2, pb.b2, 12);
  train::Gradients<Layer> g1(l1), g2(l2);
  train::Tape<Layer> t1, t2;
  train::AdamW<T> opt(adamw());
  opt.add(l1, g1, "mlp.up");
  opt.add(l2, g2, "mlp.down");
  dist::GradientReducer<T, Comm> reducer(comm);

  Run run;
  Mat z(n, hidden), h(n, hidden), y(n, out), g(n, out), dh(n, hidden);
  const auto start = std::chrono::steady_clock::now();
  for (int step = 0; step < steps; ++step) {
    train::forward(l1, X, z, t1);
    h = z.cwiseMax(T(0));
    train::forward(l2, h, y, t2);
    const Mat e = y - target;
    std::vector<double> loss{e.squaredNorm() / double(n * out)};  // this rank's mean
    g = (T(2) / T(n * out)) * e;
    train::backward(l2, h, g, t2, g2, dh);
    dh = (z.array() > T(0)).select(dh, T(0));  // through the ReLU
    train::backward(l1, X, dh, t1, g1);

    const auto before = comm.stats().all_reduce_bytes;
    reducer.reduce(opt);  // every rank now holds the whole batch's gradient
    run.bytes_per_step = comm.stats().all_reduce_bytes - before;
    opt.step();

    comm.all_reduce_sum(std::span<double>(loss));  // for the printout only
    run.loss.push_back(loss[0] / comm.size());
  }
  run.ms_per_step = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count() / steps;
  return run;
}

// Tensor-parallel training: the same students, sharded (Megatron's MLP).
template <class Comm>
Run train_tensor_parallel(Comm& comm, const Problem& pb) {
  const Layer full1 = make_student(pb.W1, pb.b1, 11), full2 = make_student(pb.W2, pb.b2, 12);
  const dist::Shard hs = dist::split(hidden, comm.size(), comm.rank());
  dist::ColumnParallelLinear up(comm, dist::column_shard(full1, hs), hidden);            // W1, B1 rows; A1 whole
  dist::RowParallelLinear down(comm, dist::row_shard(full2, hs), hidden, full2.bias());  // W2, A2 columns; B2 whole
  train::Gradients<Layer> g1(up.local()), g2(down.local());
  train::Tape<Layer> t1;
  typename dist::RowParallelLinear<Layer, Comm>::Tape t2;
  train::AdamW<T> opt(adamw());
  opt.add(up.local(), g1, "mlp.up");
  opt.add(down.local(), g2, "mlp.down");

  Run run;
  Mat z(tokens, hs.count), h(tokens, hs.count), y(tokens, out), g(tokens, out), dh(tokens, hs.count);
  const auto start = std::chrono::steady_clock::now();
  for (int step = 0; step < steps; ++step) {
    const auto before = comm.stats().all_reduce_bytes;
    up.train_forward(pb.X, z, t1);  // [n, hidden_q], no communication
    h = z.cwiseMax(T(0));
    down.train_forward(h, y, t2);  // one all-reduce of [n, out + r]
    const Mat e = y - pb.target;   // the same on every rank
    run.loss.push_back(e.squaredNorm() / double(tokens * out));
    g = (T(2) / T(tokens * out)) * e;
    down.backward(h, g, t2, g2, dh);  // dB2 (same everywhere), dA2_q, dH_q: no communication
    dh = (z.array() > T(0)).select(dh, T(0));
    up.backward(pb.X, dh, t1, g1);  // dB1_q local, dA1 all-reduced
    run.bytes_per_step = comm.stats().all_reduce_bytes - before;
    opt.step();  // replicated A1, B2 get the same gradient bits on every rank: they stay in sync
  }
  run.ms_per_step = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count() / steps;
  return run;
}

double worst_relative(const Run& a, const Run& ref) {
  double w = 0;
  for (std::size_t i = 0; i < ref.loss.size(); ++i) w = std::max(w, std::fabs(a.loss[i] - ref.loss[i]) / ref.loss[i]);
  return w;
}

}  // namespace

int main(int argc, char** argv) {
  dist::MpiSession mpi(argc, argv);
#ifdef _OPENMP
  omp_set_num_threads(1);  // ranks share the cores; the products here are small
#endif
  dist::MpiCommunicator world;
  const int p = world.size();
  const bool root = world.rank() == 0;
  const Problem pb = make_problem();

  dist::SingleProcess one;
  const Run ref = train_data_parallel(one, pb);  // every rank computes it: cheap, no transfer
  const Run dp = train_data_parallel(world, pb);
  const Run tp = train_tensor_parallel(world, pb);
  const double dp_err = worst_relative(dp, ref), tp_err = worst_relative(tp, ref);

  if (root) {
    std::printf("MLP %ld -> %ld -> %ld, LoRA r = %d on both projections, %ld tokens, AdamW, %d steps, %d rank%s\n", in,
                hidden, out, R, tokens, steps, p, p == 1 ? "" : "s");
    std::printf("%6s %14s %14s %14s\n", "step", "reference", "data-par.", "tensor-par.");
    for (int s = 0; s < steps; s += 20)
      std::printf("%6d %14.6e %14.6e %14.6e\n", s, ref.loss[s], dp.loss[s], tp.loss[s]);
    std::printf("%6d %14.6e %14.6e %14.6e\n", steps - 1, ref.loss.back(), dp.loss.back(), tp.loss.back());
    std::printf("largest |loss - reference| / reference over all steps: data-parallel %.2e, tensor-parallel %.2e\n",
                dp_err, tp_err);

    // Per step, payload handed to MPI (bytes of the buffers; a ring all-reduce
    // sends about 2 (p - 1) / p of that per rank). Full fine-tuning: W1, b1, W2, b2.
    const double f = sizeof(T), lora_params = R * (in + hidden) + R * (hidden + out);
    const double full_params = hidden * in + hidden + out * hidden + out;
    std::printf("\ncommunication per step (payload bytes per rank):\n");
    std::printf("  data-parallel   LoRA %8.0f measured (formula r (in + hidden) + r (hidden + out) = %.0f values)\n",
                double(dp.bytes_per_step), lora_params);
    std::printf("                  full fine-tuning %8.0f (every W and b: %.0f values), %.1fx more\n", full_params * f,
                full_params, full_params * f / double(dp.bytes_per_step));
    std::printf("  tensor-parallel LoRA %8.0f measured (forward n (out + r) = %ld, backward r in = %ld values)\n",
                double(tp.bytes_per_step), tokens * (out + R), R * in);
    std::printf("                  full fine-tuning %8.0f (forward n out = %ld values: W's gradients stay local)\n",
                double(tokens * out) * f, tokens * out);
    if (p == 1) std::printf("  (1 rank: MPI still runs every collective, on one process)\n");
    std::printf("time per step: reference %.3f ms, data-parallel %.3f ms, tensor-parallel %.3f ms\n", ref.ms_per_step,
                dp.ms_per_step, tp.ms_per_step);
  }
  const bool ok = dp_err <= 1e-3 && tp_err <= 1e-3 && ref.loss.back() < 0.1 * ref.loss.front();
  if (root) std::printf("%s\n", ok ? "losses match the single-process run" : "MISMATCH");
  return ok ? 0 : 1;
}
