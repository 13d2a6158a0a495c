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
// --method dora sweeps DoRA (lora::DoRALinear, PEFT's use_dora=True) instead:
// the same ranks, chosen at run time (one LowRankDelta<float, dynamic>
// instantiation keeps the compile time down). --fused-qkv computes W_q, W_k and
// W_v as one lora::MergedLinear (loralib's fused c_attn: W [3d, d], LoRA on the
// target slices) instead of three AdaptedLinear layers (LoRA only; no dropout).
//
// Then, at rank 8, the ways to fine-tune the same targets side by side: full
// fine-tuning (the target W themselves train), LoRA (fp32 base), LoRA with a
// fused QKV projection (the same math as three layers: its loss must match),
// DoRA, and QLoRA (every base weight in NF4 with double quantisation, fp32
// adapters): the memory each needs, the loss each reaches and its speed. QLoRA's
// base is not the teacher's base (it carries the NF4 rounding), so its floor is
// sigma^2 plus what a rank-8 adapter cannot undo of that rounding (the "NF4
// rounding floor": NF4 base plus the teacher's exact change). Its adapters are
// merged into a dense copy (outputs must agree) and requantised to NF4 (errors
// shown).
//
//   04_train_attention [--method lora|dora] [--fused-qkv] [--targets q,v] [--k 4]
//                      [--steps 400] [--lr 0.01] [--noise 0.05] [--dropout 0]
//                      [--seed 1] [--threads 1] [--full-lr 0.001] [--out ./train_out]
//
// Writes <out>/results.csv, <out>/methods.csv, <out>/loss.csv,
// <out>/loss.gnuplot and, when gnuplot is installed, <out>/loss.png. Exits 1 if
// a rank >= k misses the noise floor (the swept method, and DoRA at rank 8),
// merged outputs differ, QLoRA does not recover most of the teacher's change,
// or the fused-QKV run's final loss differs from three-layer LoRA's by more
// than 1e-4 relative.
#include <lora/lora.hpp>
#include <lora/dora.hpp>
#include <lora/merged_linear.hpp>

#include <array>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <optional>
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
  bool dora = false;       // --method dora: the rank sweep trains DoRA instead of LoRA
  bool fused_qkv = false;  // W_q, W_k, W_v as one MergedLinear in the sweep
};
const char* const kNames[6] = {"q", "k", "v", "o", "up", "down"};
enum { Q, K, V, O, UP, DOWN };

[[noreturn]] void usage(int code) {
  std::printf(
      "usage: 04_train_attention [--method lora|dora] [--fused-qkv] [--targets q,v] [--k 4] [--steps 400]\n"
      "                          [--lr 0.01] [--noise 0.05] [--dropout 0] [--seed 1] [--threads 1]\n"
      "                          [--full-lr 0.001] [--out ./train_out]\n"
      "  --method     adapter of the rank sweep: lora (AdaptedLinear, ranks fixed at compile time) or dora\n"
      "               (DoRALinear, PEFT's use_dora=True; ranks chosen at run time, one instantiation)\n"
      "  --fused-qkv  W_q, W_k, W_v as one MergedLinear [3d, d] (loralib's fused c_attn) in the sweep;\n"
      "               LoRA only, no dropout. The rank-8 table always has a fused-QKV and a DoRA row\n"
      "  --targets    comma-separated projections to adapt, from q,k,v,o,up,down\n"
      "  --k          rank of the teacher's change on each target\n");
  std::exit(code);
}

config parse(int argc, char** argv) {
  config c;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--help" || a == "-h") usage(0);
    if (a == "--fused-qkv") {
      c.fused_qkv = true;
      continue;
    }
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
    } else if (a == "--method") {
      if (v != "lora" && v != "dora") {
        std::fprintf(stderr, "unknown method '%s' (lora or dora)\n", v.c_str());
        usage(2);
      }
      c.dora = v == "dora";
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
  // MergedLinear's slices carry LoRA deltas and no dropout (loralib's lora_dropout = 0).
  if (c.fused_qkv && (c.dora || c.dropout > 0)) {
    std::fprintf(stderr, "--fused-qkv needs --method lora and --dropout 0\n");
    usage(2);
  }
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

template <class>
inline constexpr bool is_dora = false;
template <class B, class T, int R>
inline constexpr bool is_dora<lora::DoRALinear<B, T, R>> = true;

// W_q, W_k, W_v fused (--fused-qkv): one base [3d, d], a LoRA delta on each
// target slice. A run-time rank: one instantiation for every rank.
using FusedQKV = lora::MergedLinear<Mat, lora::LowRankDelta<float, lora::dynamic>>;

// One projection of `rank` (alpha = 2 r, so s = 2); frozen ones carry s = 0,
// so the evaluators skip their (empty) adapter.
template <class Layer>
Layer make_projection(const Mat& w, const Vec& b, index_t rank, bool adapted) {
  const lora::DeltaOptions options{.alpha = 2.0 * double(rank), .multiplier = adapted ? 1.0 : 0.0};
  lora::LowRankDelta<float, Layer::rank_at_compile_time> delta{w.rows(), w.cols(), rank, options};
  if constexpr (is_dora<Layer>)
    return Layer(w, b, std::move(delta));  // m = ||W_i|| (B = 0), as PEFT initialises it
  else
    return Layer(stored<typename Layer::base_type>(w), b, std::move(delta));
}

template <class L>
struct BlockOf {
  using Layer = L;
  // Full fine-tuning steps on W in place: an AdaptedLinear over a writable dense base.
  static constexpr bool can_train_base = !is_dora<Layer> && Layer::base_is_writable;
  std::vector<Layer> layer;
  std::array<bool, 6> trained{};  // projections of `layer` that train (fused: Q, K, V live in qkv)
  tuning mode = tuning::lora;
  std::vector<train::Tape<Layer>> tape = std::vector<train::Tape<Layer>>(6);
  std::vector<train::Gradients<Layer>> grad;
  std::vector<train::Dropout> drop;
  std::array<Mat, 6> dW;  // full fine-tuning: dL/dW and dL/db of each target
  std::array<Vec, 6> db;
  typename Layer::workspace ws;
  lora::EigenBackend::workspace<float> ews;  // the frozen projections' dX (DoRA's workspace is its own type)
  std::optional<FusedQKV> qkv;
  std::optional<train::Gradients<FusedQKV>> qkv_grad;
  index_t seq = 0;
  // Activations kept for backward.
  Mat q, k, v, p, o, z, h1, a1, u, y, qkv_y;
  // Gradient buffers.
  Mat dy, du, da1, dh1, dz, dO, dq, dk, dv, dp, dqkv;

  // `weights` as the base; adapters of rank `rank` on `targets` (tuning::lora),
  // or the targets' W themselves trained (tuning::full, adapters off). `fused`:
  // Q, K, V as one MergedLinear (LoRA on the targets among them).
  BlockOf(const base_weights& weights, const config& c, const std::array<bool, 6>& targets, index_t rank,
          tuning how = tuning::lora, bool fused = false)
      : trained(targets), mode(how), seq(c.seq) {
    for (int j = 0; j < 6; ++j) {
      const index_t out = weights.W[j].rows(), in = weights.W[j].cols();
      const bool adapted = targets[j] && how == tuning::lora && !(fused && j <= V);
      layer.push_back(make_projection<Layer>(weights.W[j], weights.b[j], rank, adapted));
      if (how == tuning::full && targets[j]) {
        dW[j] = Mat::Zero(out, in);
        db[j] = Vec::Zero(out);
      }
      layer.back().delta().init(lora::init::KaimingZero{}, c.seed * 1000 + std::uint64_t(j));
      // A frozen DoRA projection (s = 0, m = n = ||W_i||): keep its norm, so its
      // forward is X W^T scaled by m / n = 1, not a norm recomputation per call.
      if constexpr (is_dora<Layer>)
        if (!adapted) layer.back().cache_weight_norm();
      grad.emplace_back(layer.back(), false);
      drop.emplace_back(c.dropout, c.seed * 1000 + 500 + std::uint64_t(j));
    }
    if (fused) {
      const index_t d = c.d;
      Mat w(3 * d, d);
      w << weights.W[Q], weights.W[K], weights.W[V];
      Vec b(3 * d);
      b << weights.b[Q], weights.b[K], weights.b[V];
      const std::vector<bool> enable = {targets[Q], targets[K], targets[V]};
      std::vector<lora::LowRankDelta<float, lora::dynamic>> deltas;
      for (int j = Q; j <= V; ++j)
        if (targets[j]) deltas.emplace_back(d, d, rank, lora::DeltaOptions{.alpha = 2.0 * double(rank)});
      qkv.emplace(std::move(w), std::move(b), std::vector<index_t>{d, d, d}, enable, std::move(deltas));
      // The same A as the three-layer block's (seeded by the projection's index).
      for (std::size_t j = 0; j < qkv->deltas().size(); ++j)
        qkv->deltas()[j].init(lora::init::KaimingZero{}, c.seed * 1000 + std::uint64_t(qkv->deltas().slice_of(j)));
      qkv_grad.emplace(*qkv);
      trained[Q] = trained[K] = trained[V] = false;
    }
  }

  // The trained tensors: adapters (LoRA / DoRA), or W and b (full fine-tuning).
  void add_to(train::AdamW<float>& opt) {
    for (int j = 0; j < 6; ++j) {
      if (!trained[j]) continue;
      if (mode == tuning::lora) {
        opt.add(layer[j], grad[j], kNames[j]);
      } else if constexpr (can_train_base) {
        opt.add_tensor(std::string(kNames[j]) + ".weight", layer[j].base_weight(), dW[j]);
        opt.add_tensor(std::string(kNames[j]) + ".bias", layer[j].bias(), db[j]);
      }
    }
    if (qkv && !qkv->deltas().empty()) opt.add(*qkv, *qkv_grad, "qkv");
  }

  // Merges every trained adapter into its base weight.
  void merge_targets() {
    for (int j = 0; j < 6; ++j)
      if (trained[j] && mode == tuning::lora) layer[j].merge();
    if (qkv) qkv->merge();
  }

  // One projection: the training forward on targets, the inference forward elsewhere.
  void project(int j, const Mat& x, Mat& out, bool training, std::uint64_t step) {
    out.resize(x.rows(), layer[j].out_features());
    if (trained[j] && training && mode == tuning::lora)
      train::forward(layer[j], x, out, tape[j], drop[j], step);
    else
      layer[j].forward(x, out, ws);
  }
  // dX (if wanted) and, on targets, the adapter's gradients of one projection.
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
      // Frozen: W alone (s = 0; a frozen DoRA projection scales by m / n = 1).
      lora::expr::apply_transposed(layer[j].base_expression(), g, *dx, 1.0f, accumulate_dx ? 1.0f : 0.0f, ews);
    }
  }

  // X [n, d] -> Y [n, d]; n = sequences * seq.
  const Mat& forward(const Mat& x, bool training = false, std::uint64_t step = 0) {
    const index_t n = x.rows(), d = x.cols();
    if (qkv) {  // one product for Q, K and V; MergedLinear has no tape (its backward recomputes X A_k^T)
      qkv_y.resize(n, 3 * d);
      qkv->forward(x, qkv_y, ews);
      q = qkv_y.leftCols(d);
      k = qkv_y.middleCols(d, d);
      v = qkv_y.rightCols(d);
    } else {
      project(Q, x, q, training, step);
      project(K, x, k, training, step);
      project(V, x, v, training, step);
    }
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
    if (qkv) {
      if (qkv->deltas().empty()) return;
      dqkv.resize(n, 3 * d);
      dqkv << dq, dk, dv;
      qkv->backward(x, dqkv, *qkv_grad);
      return;
    }
    project_back(Q, x, dq, nullptr);
    project_back(K, x, dk, nullptr);
    project_back(V, x, dv, nullptr);
  }

  // Training memory (fp32, AdamW): adapted projections through
  // train::memory_usage (an NF4 base counts its exact bytes, DoRA its m),
  // every other projection frozen under LoRA and trained under full fine-tuning.
  train::MemoryReport memory() const {
    train::MemoryReport mem;
    for (int j = 0; j < 6; ++j) {
      if (qkv && j <= V) continue;  // counted with the fused layer
      const auto& l = layer[j];
      if (trained[j] && mode == tuning::lora) {
        mem += train::memory_usage(l);
        continue;
      }
      const std::uint64_t params = std::uint64_t(l.out_features() * l.in_features() + l.bias().size());
      train::MemoryReport frozen = train::other_parameters(params);
      if constexpr (Layer::base_is_quantized)
        frozen.frozen_bytes = double(l.base_weight().storage_bytes()) + 4.0 * double(l.bias().size());
      mem += frozen;
    }
    if (qkv) mem += train::memory_usage(*qkv);
    return mem;
  }
};

template <int Rank, class Base = Mat>
using Block = BlockOf<lora::AdaptedLinear<Base, lora::LowRankDelta<float, Rank>>>;
// DoRA with a run-time rank: one instantiation serves every rank of the sweep.
using DoRABlock = BlockOf<lora::DoRALinear<Mat, float, lora::dynamic>>;

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
  student.add_to(opt);
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
  Block<1> teacher(teacher_w, c, {}, 1);  // no adapters: the changed weights, frozen

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
  std::printf("%s fine-tuning of an attention + MLP block: d = %ld, %ld sequences x %ld tokens per step, "
              "%d steps, AdamW lr %.3g, dropout %.2f, %d thread(s)\n",
              c.dora ? "DoRA" : "LoRA", d, c.batch, c.seq, c.steps, c.lr, c.dropout, threads);
  std::printf("targets: %s; teacher = base + rank-%ld change on each target; noise sigma = %.3g, floor sigma^2 = %.3g\n",
              targets.c_str(), c.k, c.noise, floor);

  const std::string swept = c.dora ? "DoRA" : (c.fused_qkv ? "LoRA, fused QKV" : "LoRA");
  std::vector<rank_result> results;
  bool ok = true;
  double merge_error = 0.0;
  // Trains `student` (rank R), checks the floor, merges its adapters (the merged
  // model must agree) and measures its memory.
  const auto train_and_merge = [&](auto& student, int R, const std::string& label) {
    rank_result res{R, fit(student, teacher, c, c.lr, x_eval, y_eval, label), 0, 0, 0, false};
    res.reached = res.run.eval_excess <= 0.1 * floor;
    const Mat y_unmerged = student.forward(x_eval);
    student.merge_targets();
    const Mat y_merged = student.forward(x_eval);
    merge_error = std::max(merge_error, max_relative_difference(y_merged, y_unmerged));
    const train::MemoryReport mem = student.memory();
    res.trainable = mem.trainable_parameters;
    res.lora_bytes = mem.total_bytes();
    res.full_bytes = mem.full_total_bytes();
    return res;
  };
  if (!c.dora) {
    lora::for_each_rank<1, 2, 4, 8, 16>([&]<int R>() {
      Block<R> student(base, c, c.targets, R, tuning::lora, c.fused_qkv);
      results.push_back(train_and_merge(student, R, (c.fused_qkv ? "fused rank " : "rank ") + std::to_string(R)));
    });
  } else {
    for (const int R : {1, 2, 4, 8, 16}) {
      DoRABlock student(base, c, c.targets, R);
      results.push_back(train_and_merge(student, R, "DoRA rank " + std::to_string(R)));
    }
  }
  for (const auto& r : results)
    if (r.rank >= c.k && !r.reached) ok = false;

  // ---- full fine-tuning vs LoRA vs DoRA vs QLoRA at rank 8 -------------------------
  constexpr int kCompareRank = 8;
  std::printf("\nfull fine-tuning (every W and b) vs LoRA (three layers, fused QKV) vs DoRA vs QLoRA (NF4 base, "
              "double quantisation), rank %d:\n", kCompareRank);
  const auto from_sweep = [&]() -> const rank_result& {
    for (const auto& r : results)
      if (r.rank == kCompareRank) return r;
    std::abort();  // the sweep has rank 8
  };
  const auto row = [](const std::string& name, const rank_result& r) {
    return method_result{name, r.run, r.trainable, r.lora_bytes};
  };
  std::vector<method_result> methods;
  {
    Block<1> untuned(base, c, {}, 1);
    const double excess = mse(untuned.forward(x_eval), y_eval);
    methods.push_back({"frozen base (no tuning)", {{}, excess + floor, excess, 0}, 0, untuned.memory().frozen_bytes});
  }
  {
    Block<1> full(base, c, {true, true, true, true, true, true}, 1, tuning::full);
    const run_stats run = fit(full, teacher, c, c.full_lr, x_eval, y_eval, "full fine-tuning");
    const train::MemoryReport mem = full.memory();
    methods.push_back({"full fine-tuning", run, mem.full_parameters, mem.full_total_bytes()});
  }
  // LoRA with three layers, LoRA with a fused QKV and DoRA: the sweep's rank-8
  // run where it trained that method, a run of its own otherwise.
  const std::size_t lora_row = methods.size();
  if (!c.dora && !c.fused_qkv) {
    methods.push_back(row("LoRA", from_sweep()));
  } else {
    Block<kCompareRank> student(base, c, c.targets, kCompareRank);
    methods.push_back(row("LoRA", train_and_merge(student, kCompareRank, "LoRA rank 8")));
  }
  std::size_t fused_row = 0;  // 0: not run (dropout on)
  if (c.fused_qkv) {
    fused_row = methods.size();
    methods.push_back(row("LoRA, fused QKV (MergedLinear)", from_sweep()));
  } else if (c.dropout == 0) {
    Block<kCompareRank> student(base, c, c.targets, kCompareRank, tuning::lora, /*fused=*/true);
    fused_row = methods.size();
    methods.push_back(row("LoRA, fused QKV (MergedLinear)", train_and_merge(student, kCompareRank, "fused rank 8")));
  }
  bool dora_reached = true;
  {
    const rank_result r = [&] {
      if (c.dora) return from_sweep();
      DoRABlock student(base, c, c.targets, kCompareRank);
      return train_and_merge(student, kCompareRank, "DoRA rank 8");
    }();
    dora_reached = r.reached;
    methods.push_back(row("DoRA", r));
  }
  if (kCompareRank >= c.k && !dora_reached) ok = false;  // the floor criterion of the sweep
  double qlora_merge_error = 0, requant_excess = 0, nf4_floor_excess = 0, requant_max_error = 0, requant_mean_error = 0;
  {
    Block<kCompareRank, lora::NF4Matrix> student(base, c, c.targets, kCompareRank);
    const run_stats run = fit(student, teacher, c, c.lr, x_eval, y_eval, "QLoRA rank 8");
    const train::MemoryReport mem = student.memory();
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
    Block<1> dense_merged(merged, c, {}, 1), nf4_merged(requantised, c, {}, 1);
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
    Block<1> floor_model(nf4_floor, c, {}, 1);
    nf4_floor_excess = mse(floor_model.forward(x_eval), y_eval);
    if (run.eval_excess > 1.1 * nf4_floor_excess + 0.1 * floor) ok = false;
  }

  // ---- report -------------------------------------------------------------------
  std::printf("\n%s rank sweep:\n%5s %12s %14s %10s %10s %13s %13s %8s %s\n", swept.c_str(), "rank", "final loss",
              "excess (eval)", "steps/s", "trainable", c.dora ? "DoRA KiB" : "LoRA KiB", "full FT KiB", "ratio",
              "floor");
  for (const auto& r : results)
    std::printf("%5d %12.4e %14.3e %10.1f %10llu %13.1f %13.1f %7.2fx %s\n", r.rank, r.run.final_loss,
                r.run.eval_excess, r.run.steps_per_s, static_cast<unsigned long long>(r.trainable), r.lora_bytes / 1024, r.full_bytes / 1024,
                r.full_bytes / r.lora_bytes, r.reached ? "reached" : (r.rank >= c.k ? "MISSED" : "not reached"));
  std::printf("noise floor sigma^2 = %.3e; 'reached' = eval excess <= 0.1 sigma^2 = %.3e\n", floor, 0.1 * floor);
  std::printf("merged vs unmerged outputs (every LoRA, fused-QKV and DoRA run): max relative difference %.3e\n",
              merge_error);
  if (merge_error > 1e-5) ok = false;

  const double full_bytes = methods[1].bytes, lora_speed = methods[lora_row].run.steps_per_s;
  std::printf("\n%-31s %10s %14s %12s %14s %8s %9s %10s\n", "method", "trainable", "train KiB", "final loss",
              "excess (eval)", "steps/s", "vs LoRA", "mem vs full");
  for (const auto& m : methods) {
    char speed[32] = "-";
    if (m.run.steps_per_s > 0) std::snprintf(speed, sizeof speed, "%.2fx", m.run.steps_per_s / lora_speed);
    std::printf("%-31s %10llu %14.1f %12.4e %14.3e %8.1f %9s %9.2fx\n", m.name.c_str(),
                static_cast<unsigned long long>(m.trainable), m.bytes / 1024, m.run.final_loss, m.run.eval_excess,
                m.run.steps_per_s, speed, full_bytes / m.bytes);
  }
  std::printf("train KiB: weights (frozen or trained) + gradients + AdamW's two states, fp32 (DoRA: with m); the "
              "frozen base's row is its weights alone. vs LoRA: steps/s over three-layer LoRA's\n");
  if (fused_row) {
    // Same math, same data and the same initial A: only the rounding of the
    // products differs (one [n, 3d] base product, run-time vs static rank), and
    // the loss is a mean over 20 steps of 16 x 16 x 64 terms: measured 6e-8
    // relative, so 1e-4 leaves room for other compilers and ISAs and still
    // catches a slice that trains wrongly (a lost v delta costs ~10x).
    const method_result& f = methods[fused_row];
    const method_result& l = methods[lora_row];
    const double rel = std::abs(f.run.final_loss - l.run.final_loss) / l.run.final_loss;
    std::printf("fused QKV vs three layers: final loss relative difference %.3e (bound 1e-4), eval excess %.3e vs "
                "%.3e\n", rel, f.run.eval_excess, l.run.eval_excess);
    if (!(rel <= 1e-4)) ok = false;
  } else {
    std::printf("fused QKV: not run (MergedLinear has no dropout)\n");
  }
  if (!dora_reached && kCompareRank >= c.k) std::printf("DoRA at rank %d MISSED the noise floor\n", kCompareRank);
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
         "set title '"
      << swept << " on "
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
    std::printf("FAILED: a rank >= k (or DoRA at rank 8) missed the noise floor, merged outputs differ, QLoRA "
                "missed the NF4 rounding floor, or fused QKV's loss left three-layer LoRA's\n");
  return ok ? 0 : 1;
}
