// 04: fine-tune a small transformer block with LoRA, sweeping the rank at
// compile time.
//
// The model: single-head self-attention (W_q, W_k, W_v, W_o, residual) and an
// MLP (up [2d, d], ReLU, down [d, 2d], biases, residual), every projection an
// AdaptedLinear over a frozen base. The task: the teacher is the same base with
// a known rank-k change on the target projections, plus Gaussian noise of
// standard deviation sigma on its outputs; the loss is the mean squared error,
// so the best reachable loss (the noise floor) is sigma^2. LoRA adapters on the
// targets (default W_q and W_v) train with AdamW for each Rank in {1, 2, 4, 8,
// 16}; ranks >= k must reach the floor (their excess error on held-out data
// falls below 10% of sigma^2), ranks < k cannot. At the end the adapters are
// merged and the merged model must give the same outputs.
//
// Then, at rank 8, three ways to fine-tune the same targets side by side:
// full fine-tuning (the target W themselves train), LoRA (fp32 base) and QLoRA
// (every base weight in NF4 with double quantisation, fp32 adapters): the
// memory each needs and the loss each reaches. QLoRA's base is not the
// teacher's base (it carries the NF4 rounding), so its floor is sigma^2 plus
// what a rank-8 adapter cannot undo of that rounding (the "NF4 rounding floor":
// NF4 base plus the teacher's exact change). Its adapters are merged
// into a dense copy (outputs must agree) and requantised to NF4 (errors shown).
//
//   04_train_attention [--targets q,v] [--k 4] [--steps 400] [--lr 0.01]
//                      [--noise 0.05] [--dropout 0] [--seed 1] [--threads 1]
//                      [--full-lr 0.001] [--out ./train_out]
//
// Writes <out>/results.csv, <out>/methods.csv, <out>/loss.csv,
// <out>/loss.gnuplot and, when gnuplot is installed, <out>/loss.png. Exits 1 if
// a rank >= k misses the noise floor, the merged outputs differ, or QLoRA does
// not recover most of the teacher's change.
#include <lora/lora.hpp>

#include <array>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <type_traits>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

using lora::index_t;
using Mat = lora::RowMatrix<float>;
using Vec = Eigen::VectorXf;
namespace train = lora::train;

// ---- configuration -------------------------------------------------------------
struct config {
  index_t d = 64, seq = 16, batch = 16;  // model width, tokens per sequence, sequences per step
  index_t k = 4;                         // rank of the teacher's change
  int steps = 400;
  double lr = 1e-2, noise = 0.05, dropout = 0.0;
  double full_lr = 1e-3;  // full fine-tuning steps on W itself: a smaller rate (AdamW moves each weight by ~lr)
  std::uint64_t seed = 1;
  // One thread by default: the matrices are [256, 64], where splitting Eigen's
  // GEMM over OpenMP threads costs more than it saves (and spins on a busy machine).
  int threads = 1;
  std::string out = "train_out";
  std::array<bool, 6> targets = {true, false, true, false, false, false};
};
const char* const kNames[6] = {"q", "k", "v", "o", "up", "down"};
enum { Q, K, V, O, UP, DOWN };

[[noreturn]] void usage(int code) {
  std::printf(
      "usage: 04_train_attention [--targets q,v] [--k 4] [--steps 400] [--lr 0.01] [--noise 0.05]\n"
      "                          [--dropout 0] [--seed 1] [--threads 1] [--full-lr 0.001]\n"
      "                          [--out ./train_out]\n"
      "  --targets  comma-separated projections to adapt, from q,k,v,o,up,down\n"
      "  --k        rank of the teacher's change on each target\n");
  std::exit(code);
}

config parse(int argc, char** argv) {
  config c;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--help" || a == "-h") usage(0);
    if (i + 1 >= argc) usage(2);
    const std::string v = argv[++i];
    if (a == "--targets") {
      c.targets.fill(false);
      std::size_t start = 0;
      while (start <= v.size()) {
        const std::size_t comma = std::min(v.find(',', start), v.size());
        const std::string name = v.substr(start, comma - start);
        bool found = false;
        for (int j = 0; j < 6; ++j)
          if (name == kNames[j]) c.targets[j] = found = true;
        if (!found) {
          std::fprintf(stderr, "unknown target '%s'\n", name.c_str());
          usage(2);
        }
        start = comma + 1;
      }
    } else if (a == "--k") c.k = std::stol(v);
    else if (a == "--steps") c.steps = std::stoi(v);
    else if (a == "--lr") c.lr = std::stod(v);
    else if (a == "--noise") c.noise = std::stod(v);
    else if (a == "--dropout") c.dropout = std::stod(v);
    else if (a == "--seed") c.seed = std::stoull(v);
    else if (a == "--threads") c.threads = std::stoi(v);
    else if (a == "--full-lr") c.full_lr = std::stod(v);
    else if (a == "--out") c.out = v;
    else usage(2);
  }
  if (c.k < 1 || c.k > 16 || c.steps < 1) usage(2);
  return c;
}

void random_fill(Mat& m, double lo, double hi, std::uint64_t seed, std::uint64_t stream) {
  lora::EigenBackend::fill_random(m, lora::UniformDist{lo, hi}, seed, stream);
}
void normal_fill(Mat& m, double stddev, std::uint64_t seed, std::uint64_t stream) {
  lora::EigenBackend::fill_random(m, lora::NormalDist{0.0, stddev}, seed, stream);
}

// The frozen base: W [out, in] and b [out] per projection.
struct base_weights {
  std::array<Mat, 6> W;
  std::array<Vec, 6> b;
};
base_weights make_base(const config& c) {
  base_weights base;
  const index_t d = c.d, h = 2 * c.d;
  const index_t shape[6][2] = {{d, d}, {d, d}, {d, d}, {d, d}, {h, d}, {d, h}};
  for (int j = 0; j < 6; ++j) {
    base.W[j].resize(shape[j][0], shape[j][1]);
    // Kaiming-uniform-like, with a gain on W_q and W_k so attention is peaked.
    const double bound = (j == Q || j == K ? 2.0 : 1.0) * std::sqrt(3.0 / double(shape[j][1]));
    random_fill(base.W[j], -bound, bound, c.seed, 100 + j);
    base.b[j] = Vec::Zero(shape[j][0]);
    if (j == UP || j == DOWN) {
      Mat bias(shape[j][0], 1);
      random_fill(bias, -0.1, 0.1, c.seed, 110 + j);
      base.b[j] = bias;
    }
  }
  return base;
}

double mse(const Mat& a, const Mat& b) { return double((a - b).squaredNorm()) / double(a.size()); }

// ---- the model ---------------------------------------------------------------
// The frozen base in the storage the run asks for: fp32, or NF4 (QLoRA).
template <class Base>
Base stored(const Mat& w) {
  if constexpr (std::is_same_v<Base, lora::NF4Matrix>)
    return lora::NF4Matrix::quantize(w, {.double_quant = true});
  else
    return w;
}

enum class tuning { lora, full };

template <int Rank, class Base = Mat>
struct Block {
  using Layer = lora::AdaptedLinear<Base, lora::LowRankDelta<float, Rank>>;
  std::vector<Layer> layer;
  std::array<bool, 6> trained{};
  tuning mode = tuning::lora;
  std::vector<train::Tape<Layer>> tape = std::vector<train::Tape<Layer>>(6);
  std::vector<train::Gradients<Layer>> grad;
  std::vector<train::Dropout> drop;
  std::array<Mat, 6> dW;  // full fine-tuning: dL/dW and dL/db of each target
  std::array<Vec, 6> db;
  typename Layer::workspace ws;
  index_t seq = 0;
  // Activations kept for backward.
  Mat q, k, v, p, o, z, h1, a1, u, y;
  // Gradient buffers.
  Mat dy, du, da1, dh1, dz, dO, dq, dk, dv, dp;

  // `weights` as the base; adapters of rank Rank on `targets` (tuning::lora),
  // or the targets' W themselves trained (tuning::full, adapters off).
  Block(const base_weights& weights, const config& c, const std::array<bool, 6>& targets, tuning how = tuning::lora)
      : trained(targets), mode(how), seq(c.seq) {
    for (int j = 0; j < 6; ++j) {
      const index_t out = weights.W[j].rows(), in = weights.W[j].cols();
      // alpha = 2 r (s = 2), PEFT-style default init (A kaiming, B = 0). Frozen
      // projections carry s = 0, so the evaluators skip their (empty) adapter.
      const bool adapted = targets[j] && how == tuning::lora;
      layer.emplace_back(stored<Base>(weights.W[j]), weights.b[j],
                         lora::LowRankDelta<float, Rank>{out, in, {.alpha = 2.0 * Rank, .multiplier = adapted ? 1.0 : 0.0}});
      if (how == tuning::full && targets[j]) {
        dW[j] = Mat::Zero(out, in);
        db[j] = Vec::Zero(out);
      }
      layer.back().delta().init(lora::init::KaimingZero{}, c.seed * 1000 + std::uint64_t(j));
      grad.emplace_back(layer.back(), false);
      drop.emplace_back(c.dropout, c.seed * 1000 + 500 + std::uint64_t(j));
    }
  }

  // One projection: the training forward on targets, the inference forward elsewhere.
  void project(int j, const Mat& x, Mat& out, bool training, std::uint64_t step) {
    out.resize(x.rows(), layer[j].out_features());
    if (trained[j] && training && mode == tuning::lora)
      train::forward(layer[j], x, out, tape[j], drop[j], step);
    else
      layer[j].forward(x, out, ws);
  }
  // dX (if wanted) and, on targets, dA and dB of one projection.
  void project_back(int j, const Mat& x, const Mat& g, Mat* dx, bool accumulate_dx = false) {
    if (trained[j] && mode == tuning::full) {
      dW[j].noalias() = g.transpose() * x;  // (out, in)
      db[j] = g.colwise().sum().transpose();
    }
    if (trained[j] && mode == tuning::lora) {
      if (dx)
        train::backward(layer[j], x, g, tape[j], grad[j], *dx, {.accumulate_dx = accumulate_dx});
      else
        train::backward(layer[j], x, g, tape[j], grad[j]);
    } else if (dx) {
      lora::expr::apply_transposed(layer[j].base_expression(), g, *dx, 1.0f, accumulate_dx ? 1.0f : 0.0f, ws);
    }
  }

  // X [n, d] -> Y [n, d]; n = sequences * seq.
  const Mat& forward(const Mat& x, bool training = false, std::uint64_t step = 0) {
    const index_t n = x.rows(), d = x.cols();
    project(Q, x, q, training, step);
    project(K, x, k, training, step);
    project(V, x, v, training, step);
    p.resize(n, seq);
    o.resize(n, d);
    const float c = 1.0f / std::sqrt(float(d));
    for (index_t s0 = 0; s0 < n; s0 += seq) {  // softmax(Q K^T / sqrt(d)) V per sequence
      auto P = p.middleRows(s0, seq);
      P.noalias() = c * q.middleRows(s0, seq) * k.middleRows(s0, seq).transpose();
      for (index_t t = 0; t < seq; ++t) {
        auto row = P.row(t);
        row = (row.array() - row.maxCoeff()).exp();
        row /= row.sum();
      }
      o.middleRows(s0, seq).noalias() = P * v.middleRows(s0, seq);
    }
    project(O, o, z, training, step);
    h1 = x + z;
    project(UP, h1, a1, training, step);
    u = a1.cwiseMax(0.0f);
    project(DOWN, u, y, training, step);
    y += h1;
    return y;
  }

  // Gradients of every target adapter from dL/dY (X is the network input: no dX).
  void backward(const Mat& x, const Mat& g) {
    const index_t n = x.rows(), d = x.cols();
    du.resize(n, u.cols());
    project_back(DOWN, u, g, &du);
    da1 = du.cwiseProduct((a1.array() > 0.0f).matrix().cast<float>());
    dh1 = g;
    project_back(UP, h1, da1, &dh1, /*accumulate_dx=*/true);
    dO.resize(n, d);
    project_back(O, o, dh1, &dO);
    dq.resize(n, d);
    dk.resize(n, d);
    dv.resize(n, d);
    dp.resize(n, seq);
    const float c = 1.0f / std::sqrt(float(d));
    for (index_t s0 = 0; s0 < n; s0 += seq) {
      const auto P = p.middleRows(s0, seq);
      auto dP = dp.middleRows(s0, seq);
      dv.middleRows(s0, seq).noalias() = P.transpose() * dO.middleRows(s0, seq);
      dP.noalias() = dO.middleRows(s0, seq) * v.middleRows(s0, seq).transpose();
      for (index_t t = 0; t < seq; ++t) {  // softmax backward: dS = P .* (dP - <dP, P>)
        const float inner = dP.row(t).dot(P.row(t));
        dP.row(t) = P.row(t).cwiseProduct((dP.row(t).array() - inner).matrix());
      }
      dq.middleRows(s0, seq).noalias() = c * dP * k.middleRows(s0, seq);
      dk.middleRows(s0, seq).noalias() = c * dP.transpose() * q.middleRows(s0, seq);
    }
    project_back(Q, x, dq, nullptr);
    project_back(K, x, dk, nullptr);
    project_back(V, x, dv, nullptr);
  }
};


double max_relative_difference(const Mat& a, const Mat& b) {
  return double((a - b).cwiseAbs().maxCoeff()) / double(b.cwiseAbs().maxCoeff());
}

struct run_stats {
  std::vector<double> losses;
  double final_loss = 0, eval_excess = 0, steps_per_s = 0;
};

// Trains `student` towards the noisy teacher with AdamW (learning rate decaying
// linearly to 0), a fresh batch every step; returns the losses, the mean of the
// last 20 and the excess error on held-out data.
template <class Student>
run_stats fit(Student& student, Block<1>& teacher, const config& c, double lr, const Mat& x_eval, const Mat& y_eval,
              const std::string& label) {
  train::AdamW<float> opt({.lr = lr, .weight_decay = 0.0});
  for (int j = 0; j < 6; ++j) {
    if (!student.trained[j]) continue;
    if (student.mode == tuning::lora) {
      opt.add(student.layer[j], student.grad[j], kNames[j]);
    } else if constexpr (Student::Layer::base_is_writable) {
      opt.add_tensor(std::string(kNames[j]) + ".weight", student.layer[j].base_weight(), student.dW[j]);
      opt.add_tensor(std::string(kNames[j]) + ".bias", student.layer[j].bias(), student.db[j]);
    }
  }
  const index_t n = c.batch * c.seq;
  run_stats res;
  Mat x(n, c.d), noise(n, c.d), target, g;
  const auto t0 = std::chrono::steady_clock::now();
  for (int step = 0; step < c.steps; ++step) {
    // A fresh batch every step: the loss then measures generalisation.
    normal_fill(x, 1.0, c.seed, 1000 + std::uint64_t(step));
    normal_fill(noise, c.noise, c.seed, 500000 + std::uint64_t(step));
    target = teacher.forward(x) + noise;
    const Mat& y = student.forward(x, /*training=*/true, std::uint64_t(step));
    res.losses.push_back(mse(y, target));
    g = (y - target) * (2.0f / float(y.size()));  // d mean((Y - T)^2) / dY
    student.backward(x, g);
    // Linear decay of the learning rate to 0 lands the fit on the floor.
    opt.set_lr(lr * (1.0 - double(step) / double(c.steps)));
    opt.step();
    if ((step + 1) % 100 == 0 || step + 1 == c.steps)
      std::printf("  %-18s step %4d  loss %.4e\n", label.c_str(), step + 1, res.losses.back());
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  res.steps_per_s = c.steps / seconds;
  const index_t tail = std::min<index_t>(20, c.steps);
  for (index_t i = c.steps - tail; i < c.steps; ++i) res.final_loss += res.losses[i] / double(tail);
  res.eval_excess = mse(student.forward(x_eval), y_eval);  // eval mode: no dropout
  return res;
}

// Training memory of a block (fp32, AdamW): adapted projections through
// train::memory_usage (an NF4 base counts its exact bytes), every other
// projection frozen under LoRA and trained under full fine-tuning.
template <class Student>
train::MemoryReport memory_of(const Student& student) {
  train::MemoryReport mem;
  for (int j = 0; j < 6; ++j) {
    const auto& l = student.layer[j];
    if (student.trained[j] && student.mode == tuning::lora) {
      mem += train::memory_usage(l);
      continue;
    }
    const std::uint64_t params = std::uint64_t(l.out_features() * l.in_features() + l.bias().size());
    train::MemoryReport frozen = train::other_parameters(params);
    if constexpr (Student::Layer::base_is_quantized)
      frozen.frozen_bytes = double(l.base_weight().storage_bytes()) + 4.0 * double(l.bias().size());
    mem += frozen;
  }
  return mem;
}

struct rank_result {
  int rank;
  run_stats run;
  std::uint64_t trainable;
  double lora_bytes, full_bytes;
  bool reached;
};

struct method_result {
  std::string name;
  run_stats run;
  std::uint64_t trainable;
  double bytes;
};

}  // namespace

int main(int argc, char** argv) {
  const config c = parse(argc, argv);
#ifdef _OPENMP
  if (c.threads > 0) omp_set_num_threads(c.threads);
  const int threads = omp_get_max_threads();
#else
  const int threads = 1;
#endif
  const index_t n = c.batch * c.seq, d = c.d;
  const double floor = c.noise * c.noise;

  // The frozen base, and the teacher: the same base with a rank-k change on the
  // target projections (singular values 1.0 .. 0.5, relative to a unit-norm row).
  const base_weights base = make_base(c);
  base_weights teacher_w = base;
  for (int j = 0; j < 6; ++j) {
    if (!c.targets[j]) continue;
    const index_t out = base.W[j].rows(), in = base.W[j].cols();
    Mat U(out, c.k), Vt(c.k, in);
    normal_fill(U, 1.0 / std::sqrt(double(out)), c.seed, 200 + j);
    normal_fill(Vt, 1.0 / std::sqrt(double(in)), c.seed, 210 + j);
    for (index_t i = 0; i < c.k; ++i) U.col(i) *= float(1.0 - 0.5 * double(i) / double(c.k));
    teacher_w.W[j] += 1.5f * U * Vt;
  }
  Block<1> teacher(teacher_w, c, {});  // no adapters: the changed weights, frozen

  // Held-out data for the excess error (noise-free teacher outputs).
  Mat x_eval(4 * n, d);
  normal_fill(x_eval, 1.0, c.seed, 300);
  const Mat y_eval = teacher.forward(x_eval);

  std::string targets;
  for (int j = 0; j < 6; ++j)
    if (c.targets[j]) {
      if (!targets.empty()) targets += ',';
      targets += kNames[j];
    }
  std::printf("LoRA fine-tuning of an attention + MLP block: d = %ld, %ld sequences x %ld tokens per step, "
              "%d steps, AdamW lr %.3g, dropout %.2f, %d thread(s)\n",
              d, c.batch, c.seq, c.steps, c.lr, c.dropout, threads);
  std::printf("targets: %s; teacher = base + rank-%ld change on each target; noise sigma = %.3g, floor sigma^2 = %.3g\n",
              targets.c_str(), c.k, c.noise, floor);

  std::vector<rank_result> results;
  bool ok = true;
  double MergeErrorReport = 0.0;
  lora::for_each_rank<1, 2, 4, 8, 16>([&]<int R>() {
    Block<R> student(base, c, c.targets);
    rank_result res{R, fit(student, teacher, c, c.lr, x_eval, y_eval, "rank " + std::to_string(R)), 0, 0, 0,
                     false};
    res.reached = res.run.eval_excess <= 0.1 * floor;
    if (R >= c.k && !res.reached) ok = false;

    // Merge every adapter into its base weight: the merged model must agree.
    const Mat y_unmerged = student.forward(x_eval);
    for (int j = 0; j < 6; ++j)
      if (c.targets[j]) student.layer[j].merge();
    const Mat y_merged = student.forward(x_eval);
    MergeErrorReport = std::max(MergeErrorReport, max_relative_difference(y_merged, y_unmerged));

    const train::MemoryReport mem = memory_of(student);
    res.trainable = mem.trainable_parameters;
    res.lora_bytes = mem.total_bytes();
    res.full_bytes = mem.full_total_bytes();
    results.push_back(res);
  });

  // ---- full fine-tuning vs LoRA vs QLoRA at rank 8 ---------------------------------
  constexpr int kCompareRank = 8;
  std::printf("\nfull fine-tuning (every W and b) vs LoRA vs QLoRA (NF4 base, double quantisation), rank %d:\n",
              kCompareRank);
  std::vector<method_result> methods;
  {
    Block<1> untuned(base, c, {});
    const double excess = mse(untuned.forward(x_eval), y_eval);
    methods.push_back({"frozen base (no tuning)", {{}, excess + floor, excess, 0}, 0, memory_of(untuned).frozen_bytes});
  }
  {
    Block<1> full(base, c, {true, true, true, true, true, true}, tuning::full);
    const run_stats run = fit(full, teacher, c, c.full_lr, x_eval, y_eval, "full fine-tuning");
    const train::MemoryReport mem = memory_of(full);
    methods.push_back({"full fine-tuning", run, mem.full_parameters, mem.full_total_bytes()});
  }
  for (const auto& r : results)
    if (r.rank == kCompareRank) methods.push_back({"LoRA", r.run, r.trainable, r.lora_bytes});
  double qlora_merge_error = 0, requant_excess = 0, nf4_floor_excess = 0, requant_max_error = 0, requant_mean_error = 0;
  {
    Block<kCompareRank, lora::NF4Matrix> student(base, c, c.targets);
    const run_stats run = fit(student, teacher, c, c.lr, x_eval, y_eval, "QLoRA rank 8");
    const train::MemoryReport mem = memory_of(student);
    methods.push_back({"QLoRA (NF4 base)", run, mem.trainable_parameters, mem.total_bytes()});
    // Dense merge (deq(Wq) + s B A) must give the QLoRA outputs; requantising
    // the merged targets to NF4 costs one more rounding, shown as its error.
    base_weights merged = base, requantised = base;
    for (int j = 0; j < 6; ++j) {
      merged.W[j] = lora::merged_weight(student.layer[j]);
      requantised.W[j] = merged.W[j];
      if (c.targets[j]) {
        const lora::NF4MergeResult m = lora::merge_to_nf4(student.layer[j]);
        requantised.W[j] = m.weight.dequantize();
        requant_max_error = std::max(requant_max_error, m.max_abs_error);
        requant_mean_error = std::max(requant_mean_error, m.mean_abs_error);
      }
    }
    const Mat y_qlora = student.forward(x_eval);
    Block<1> dense_merged(merged, c, {}), nf4_merged(requantised, c, {});
    qlora_merge_error = max_relative_difference(dense_merged.forward(x_eval), y_qlora);
    requant_excess = mse(nf4_merged.forward(x_eval), y_eval);
    // What NF4 rounding alone costs: the NF4 base (deq(Wq) everywhere) with the
    // teacher's exact change on the targets. QLoRA must get that close (its
    // adapters may also undo some rounding on the targets).
    base_weights nf4_floor = base;
    for (int j = 0; j < 6; ++j) {
      nf4_floor.W[j] = student.layer[j].base_weight().dequantize();
      if (c.targets[j]) nf4_floor.W[j] += teacher_w.W[j] - base.W[j];
    }
    Block<1> floor_model(nf4_floor, c, {});
    nf4_floor_excess = mse(floor_model.forward(x_eval), y_eval);
    if (run.eval_excess > 1.1 * nf4_floor_excess + 0.1 * floor) ok = false;
  }

  // ---- report -------------------------------------------------------------------
  std::printf("\n%5s %12s %14s %10s %10s %13s %13s %8s %s\n", "rank", "final loss", "excess (eval)", "steps/s",
              "trainable", "LoRA KiB", "full FT KiB", "ratio", "floor");
  for (const auto& r : results)
    std::printf("%5d %12.4e %14.3e %10.1f %10llu %13.1f %13.1f %7.2fx %s\n", r.rank, r.run.final_loss,
                r.run.eval_excess, r.run.steps_per_s, static_cast<unsigned long long>(r.trainable), r.lora_bytes / 1024, r.full_bytes / 1024,
                r.full_bytes / r.lora_bytes, r.reached ? "reached" : (r.rank >= c.k ? "MISSED" : "not reached"));
  std::printf("noise floor sigma^2 = %.3e; 'reached' = eval excess <= 0.1 sigma^2 = %.3e\n", floor, 0.1 * floor);
  std::printf("merged vs unmerged outputs: max relative difference %.3e\n", MergeErrorReport);
  if (MergeErrorReport > 1e-5) ok = false;

  const double full_bytes = methods[1].bytes;
  std::printf("\n%-24s %10s %14s %12s %14s %8s %10s\n", "method", "trainable", "train KiB", "final loss",
              "excess (eval)", "steps/s", "vs full");
  for (const auto& m : methods)
    std::printf("%-24s %10llu %14.1f %12.4e %14.3e %8.1f %9.2fx\n", m.name.c_str(),
                static_cast<unsigned long long>(m.trainable), m.bytes / 1024, m.run.final_loss, m.run.eval_excess,
                m.run.steps_per_s, full_bytes / m.bytes);
  std::printf("train KiB: weights (frozen or trained) + gradients + AdamW's two states, fp32; the frozen "
              "base's row is its weights alone\n");
  std::printf("NF4 rounding floor (NF4 base + the teacher's exact change on the targets): eval excess %.3e\n",
              nf4_floor_excess);
  std::printf("QLoRA merged into a dense copy vs QLoRA outputs: max relative difference %.3e\n",
              qlora_merge_error);
  std::printf("QLoRA merged and requantised to NF4: max |error| %.3e, mean |error| %.3e (worst target); "
              "eval excess %.3e\n", requant_max_error, requant_mean_error, requant_excess);
  if (qlora_merge_error > 1e-5) ok = false;

  // ---- files ---------------------------------------------------------------------
  namespace fs = std::filesystem;
  fs::create_directories(c.out);
  {
    std::ofstream f(fs::path(c.out) / "results.csv");
    f << "rank,final_loss,eval_excess,steps_per_s,trainable_params,lora_train_bytes,full_ft_train_bytes,"
         "memory_ratio,reached_floor\n";
    for (const auto& r : results)
      f << r.rank << ',' << r.run.final_loss << ',' << r.run.eval_excess << ',' << r.run.steps_per_s << ','
        << r.trainable << ',' << r.lora_bytes << ',' << r.full_bytes << ',' << r.full_bytes / r.lora_bytes << ','
        << (r.reached ? 1 : 0) << '\n';
  }
  {
    std::ofstream f(fs::path(c.out) / "methods.csv");
    f << "method,trainable_params,train_bytes,final_loss,eval_excess,steps_per_s\n";
    for (const auto& m : methods)
      f << '"' << m.name << "\"," << m.trainable << ',' << m.bytes << ',' << m.run.final_loss << ','
        << m.run.eval_excess << ',' << m.run.steps_per_s << '\n';
  }
  {
    std::ofstream f(fs::path(c.out) / "loss.csv");
    f << "step";
    for (const auto& r : results) f << ",rank " << r.rank;
    f << '\n';
    for (int s = 0; s < c.steps; ++s) {
      f << s + 1;
      for (const auto& r : results) f << ',' << r.run.losses[s];
      f << '\n';
    }
  }
  {
    std::ofstream f(fs::path(c.out) / "loss.gnuplot");
    f << "set terminal pngcairo size 900,560\nset output 'loss.png'\nset datafile separator ','\n"
         "set key autotitle columnhead\nset logscale y\nset xlabel 'step'\nset ylabel 'training loss (MSE)'\n"
         "set title 'LoRA on "
      << targets << ", teacher change of rank " << c.k << "'\n";
    f << "plot for [i=2:" << results.size() + 1 << "] 'loss.csv' using 1:i with lines lw 2, " << floor
      << " title 'noise floor' dashtype 2 lc rgb 'black'\n";
  }
  const std::string dir = fs::path(c.out).string();
  if (std::system("command -v gnuplot > /dev/null 2>&1") == 0 &&
      std::system(("cd '" + dir + "' && gnuplot loss.gnuplot").c_str()) == 0)
    std::printf("wrote %s/results.csv, loss.csv, loss.gnuplot and loss.png\n", dir.c_str());
  else
    std::printf("wrote %s/results.csv, loss.csv and loss.gnuplot; plot with: cd %s && gnuplot loss.gnuplot\n",
                dir.c_str(), dir.c_str());

  if (!ok)
    std::printf("FAILED: a rank >= k missed the noise floor, merged outputs differ, or QLoRA missed the NF4 "
                "rounding floor\n");
  return ok ? 0 : 1;
}
