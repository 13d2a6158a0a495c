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
//   04_train_attention [--targets q,v] [--k 4] [--steps 400] [--lr 0.01]
//                      [--noise 0.05] [--dropout 0] [--seed 1] [--threads 1]
//                      [--out ./train_out]
//
// Writes <out>/results.csv, <out>/loss.csv, <out>/loss.gnuplot and, when
// gnuplot is installed, <out>/loss.png. Exits 1 if a rank >= k misses the
// noise floor or the merged outputs differ.
#include <lora/lora.hpp>

#include <array>
#include <chrono>
#include <cmath>
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
using Mat = lora::RowMatrix<float>;
using Vec = Eigen::VectorXf;
namespace train = lora::train;

// ---- configuration -------------------------------------------------------------
struct config {
  index_t d = 64, seq = 16, batch = 16;  // model width, tokens per sequence, sequences per step
  index_t k = 4;                         // rank of the teacher's change
  int steps = 400;
  double lr = 1e-2, noise = 0.05, dropout = 0.0;
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
      "                          [--dropout 0] [--seed 1] [--threads 1] [--out ./train_out]\n"
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
    else if (a == "--out") c.out = v;
    else usage(2);
  }
  if (c.k < 1 || c.k > 16 || c.steps < 1) usage(2);
  return c;
}

void random_fill(Mat& m, double lo, double hi, std::uint64_t seed, std::uint64_t stream) {
  lora::eigen_backend::fill_random(m, lora::uniform_dist{lo, hi}, seed, stream);
}
void normal_fill(Mat& m, double stddev, std::uint64_t seed, std::uint64_t stream) {
  lora::eigen_backend::fill_random(m, lora::normal_dist{0.0, stddev}, seed, stream);
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

// ---- the model ---------------------------------------------------------------
template <int Rank>
using Layer = lora::AdaptedLinear<Mat, lora::LowRankDelta<float, Rank>>;

template <int Rank>
struct Block {
  std::vector<Layer<Rank>> layer;
  std::array<bool, 6> trained{};
  std::vector<train::Tape<Layer<Rank>>> tape = std::vector<train::Tape<Layer<Rank>>>(6);
  std::vector<train::Gradients<Layer<Rank>>> grad;
  std::vector<train::Dropout> drop;
  typename Layer<Rank>::workspace ws;
  index_t seq = 0;
  // Activations kept for backward.
  Mat q, k, v, p, o, z, h1, a1, u, y;
  // Gradient buffers.
  Mat dy, du, da1, dh1, dz, dO, dq, dk, dv, dp;

  // `weights` as the frozen base; adapters of rank Rank on `targets`.
  Block(const base_weights& weights, const config& c, const std::array<bool, 6>& targets) : trained(targets), seq(c.seq) {
    for (int j = 0; j < 6; ++j) {
      const index_t out = weights.W[j].rows(), in = weights.W[j].cols();
      // alpha = 2 r (s = 2), PEFT-style default init (A kaiming, B = 0). Frozen
      // projections carry s = 0, so the evaluators skip their (empty) adapter.
      layer.emplace_back(weights.W[j], weights.b[j],
                         lora::LowRankDelta<float, Rank>{out, in, {.alpha = 2.0 * Rank, .multiplier = targets[j] ? 1.0 : 0.0}});
      layer.back().delta().init(lora::init::kaiming_zero{}, c.seed * 1000 + std::uint64_t(j));
      grad.emplace_back(layer.back(), false);
      drop.emplace_back(c.dropout, c.seed * 1000 + 500 + std::uint64_t(j));
    }
  }

  // One projection: the training forward on targets, the inference forward elsewhere.
  void project(int j, const Mat& x, Mat& out, bool training, std::uint64_t step) {
    out.resize(x.rows(), layer[j].out_features());
    if (trained[j] && training)
      train::forward(layer[j], x, out, tape[j], drop[j], step);
    else
      layer[j].forward(x, out, ws);
  }
  // dX (if wanted) and, on targets, dA and dB of one projection.
  void project_back(int j, const Mat& x, const Mat& g, Mat* dx, bool accumulate_dx = false) {
    if (trained[j]) {
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

double mse(const Mat& a, const Mat& b) { return double((a - b).squaredNorm()) / double(a.size()); }

struct rank_result {
  int rank;
  double final_loss, eval_excess, steps_per_s;
  std::uint64_t trainable;
  double lora_bytes, full_bytes;
  bool reached;
  std::vector<double> losses;
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
  double merge_error = 0.0;
  lora::for_each_rank<1, 2, 4, 8, 16>([&]<int R>() {
    Block<R> student(base, c, c.targets);
    train::AdamW<float> opt({.lr = c.lr, .weight_decay = 0.0});
    for (int j = 0; j < 6; ++j)
      if (c.targets[j]) opt.add(student.layer[j], student.grad[j], kNames[j]);

    rank_result res{R, 0, 0, 0, 0, 0, 0, false, {}};
    Mat x(n, d), noise(n, d), target, g;
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
      opt.set_lr(c.lr * (1.0 - double(step) / double(c.steps)));
      opt.step();
      if ((step + 1) % 100 == 0 || step + 1 == c.steps)
        std::printf("  rank %2d  step %4d  loss %.4e\n", R, step + 1, res.losses.back());
    }
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    res.steps_per_s = c.steps / seconds;
    const index_t tail = std::min<index_t>(20, c.steps);
    for (index_t i = c.steps - tail; i < c.steps; ++i) res.final_loss += res.losses[i] / double(tail);

    const Mat y_unmerged = student.forward(x_eval);  // eval mode: no dropout
    res.eval_excess = mse(y_unmerged, y_eval);
    res.reached = res.eval_excess <= 0.1 * floor;
    if (R >= c.k && !res.reached) ok = false;

    // Merge every adapter into its base weight: the merged model must agree.
    for (int j = 0; j < 6; ++j)
      if (c.targets[j]) student.layer[j].merge();
    const Mat y_merged = student.forward(x_eval);
    const double err = double((y_merged - y_unmerged).cwiseAbs().maxCoeff()) /
                       double(y_unmerged.cwiseAbs().maxCoeff());
    merge_error = std::max(merge_error, err);

    // Memory: adapted projections + every other projection (frozen here,
    // trained under full fine-tuning); fp32, AdamW.
    train::memory_report mem;
    std::uint64_t others = 0;
    for (int j = 0; j < 6; ++j) {
      if (c.targets[j])
        mem += train::memory_usage(student.layer[j]);
      else
        others += std::uint64_t(student.layer[j].base_weight().size() + student.layer[j].bias().size());
    }
    mem += train::other_parameters(others);
    res.trainable = mem.trainable_parameters;
    res.lora_bytes = mem.total_bytes();
    res.full_bytes = mem.full_total_bytes();
    results.push_back(res);
  });

  // ---- report -------------------------------------------------------------------
  std::printf("\n%5s %12s %14s %10s %10s %13s %13s %8s %s\n", "rank", "final loss", "excess (eval)", "steps/s",
              "trainable", "LoRA KiB", "full FT KiB", "ratio", "floor");
  for (const auto& r : results)
    std::printf("%5d %12.4e %14.3e %10.1f %10llu %13.1f %13.1f %7.2fx %s\n", r.rank, r.final_loss, r.eval_excess,
                r.steps_per_s, static_cast<unsigned long long>(r.trainable), r.lora_bytes / 1024, r.full_bytes / 1024,
                r.full_bytes / r.lora_bytes, r.reached ? "reached" : (r.rank >= c.k ? "MISSED" : "not reached"));
  std::printf("noise floor sigma^2 = %.3e; 'reached' = eval excess <= 0.1 sigma^2 = %.3e\n", floor, 0.1 * floor);
  std::printf("merged vs unmerged outputs: max relative difference %.3e\n", merge_error);
  if (merge_error > 1e-5) ok = false;

  // ---- files ---------------------------------------------------------------------
  namespace fs = std::filesystem;
  fs::create_directories(c.out);
  {
    std::ofstream f(fs::path(c.out) / "results.csv");
    f << "rank,final_loss,eval_excess,steps_per_s,trainable_params,lora_train_bytes,full_ft_train_bytes,"
         "memory_ratio,reached_floor\n";
    for (const auto& r : results)
      f << r.rank << ',' << r.final_loss << ',' << r.eval_excess << ',' << r.steps_per_s << ',' << r.trainable << ','
        << r.lora_bytes << ',' << r.full_bytes << ',' << r.full_bytes / r.lora_bytes << ',' << (r.reached ? 1 : 0)
        << '\n';
  }
  {
    std::ofstream f(fs::path(c.out) / "loss.csv");
    f << "step";
    for (const auto& r : results) f << ",rank " << r.rank;
    f << '\n';
    for (int s = 0; s < c.steps; ++s) {
      f << s + 1;
      for (const auto& r : results) f << ',' << r.losses[s];
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

  if (!ok) std::printf("FAILED: a rank >= k missed the noise floor, or the merged outputs differ\n");
  return ok ? 0 : 1;
}
