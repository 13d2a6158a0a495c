// train/optimizers.hpp: SGD (momentum, Nesterov) and AdamW over adapter
// parameters only (A, B and, when it trains, the bias), with LoRA+ (a separate
// learning-rate ratio for B), global-norm gradient clipping, and refusal of
// non-finite gradients (lora::NumericError naming the tensor; nothing updated).
//
// Updates are element-wise functors over contiguous storage ("for each index i:
// update(i)"), run by the backend's for_each_index: the same functors run on
// Thrust's CUDA, OMP and CPP systems.
//
// Arithmetic follows torch.optim's single-tensor path (foreach=False) operation
// by operation, so T = float reproduces torch's float32 results and T = double
// its float64 ones (tests/fixtures/optim; docs/training.md "Optimizers"): the
// scalars torch forms as Python floats (1 - beta, 1 - lr wd, lr / (1 - beta1^t),
// sqrt(1 - beta2^t)) are formed in double and rounded to T once; the tensor
// operations round in T as ATen's CPU kernels do, with ATen's FMAs (fma_rn)
// where its AVX2 / AVX-512 kernels fuse and rounded products (mul_unfused)
// where they do not.
#pragma once

#ifndef LORA_UMBRELLA_INCLUDED
#error "Include <lora/lora.hpp> instead of lora/train/optimizers.hpp."
#endif

#include <cmath>
#include <functional>
#include <initializer_list>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "../config.hpp"
#include "../detail/arith.hpp"
#include "../error.hpp"
#include "gradients.hpp"

namespace lora::train {

/// PyTorch's torch.optim.SGD (dampening 0): g' = c g + wd p; buf = g' on the
/// first step, then momentum buf + g'; p -= lr (nesterov ? g' + momentum buf : buf)
/// (c: the clipping factor).
struct SGDOptions {
  double lr = 1e-2;
  double momentum = 0.0;
  double weight_decay = 0.0;  ///< coupled (L2 in the gradient), as torch.optim.SGD
  bool nesterov = false;
  double max_grad_norm = 0.0;    ///< clip the global gradient norm to this; 0 = off
  double lora_plus_ratio = 1.0;  ///< LoRA+: B's learning rate is lr * ratio (paper: 2^4)
};

/// PyTorch's torch.optim.AdamW (decoupled weight decay, bias-corrected moments).
struct AdamWOptions {
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.01;  ///< decoupled: p *= 1 - lr * weight_decay
  double max_grad_norm = 0.0;
  double lora_plus_ratio = 1.0;
};

/// SGD's element update (_single_tensor_sgd); LORA_HOST_DEVICE so Thrust runs
/// it unchanged. The scalars arrive rounded to T, as ATen rounds them.
template <class T>
struct sgd_update {
  T* p;
  const T* g;
  T* buf;  // null without momentum
  T neg_lr, momentum, weight_decay, grad_scale;
  bool nesterov;
  bool first;  // the buffer's first step: torch starts it as a copy of g'
  LORA_HOST_DEVICE void operator()(index_t i) const {
    using lora::detail::fma_rn;
    using lora::detail::mul_unfused;
    // clip_grad_norm_: grad.mul_(c); skipped at c = 1, where it is exact anyway.
    T d = grad_scale == T(1) ? g[i] : mul_unfused(g[i], grad_scale);
    if (weight_decay != T(0)) d = fma_rn(weight_decay, p[i], d);  // grad.add(param, alpha=wd)
    if (buf) {
      buf[i] = first ? d : mul_unfused(buf[i], momentum) + d;  // buf.mul_(momentum).add_(grad)
      d = nesterov ? fma_rn(momentum, buf[i], d) : buf[i];    // grad.add(buf, alpha=momentum)
    }
    p[i] = fma_rn(neg_lr, d, p[i]);  // param.add_(grad, alpha=-lr)
  }
};

/// AdamW's element update (_single_tensor_adam, decoupled decay), operation by
/// operation; the scalars arrive rounded to T, as ATen rounds them.
template <class T>
struct adamw_update {
  T* p;
  const T* g;
  T* m;
  T* v;
  T decay, one_minus_beta1, beta2, one_minus_beta2, neg_step_size, bias_correction2_sqrt, eps, grad_scale;
  LORA_HOST_DEVICE void operator()(index_t i) const {
    using lora::detail::fma_rn;
    using lora::detail::mul_unfused;
    using std::sqrt;
    const T gi = grad_scale == T(1) ? g[i] : mul_unfused(g[i], grad_scale);  // clip_grad_norm_
    const T pi = mul_unfused(p[i], decay);                                 // param.mul_(1 - lr wd)
    // exp_avg.lerp_(grad, 1 - beta1): ATen's lerp, one FMA from the nearer end.
    const T w = one_minus_beta1, diff = gi - m[i];
    m[i] = w < T(0.5) ? fma_rn(w, diff, m[i]) : fma_rn(w - T(1), diff, gi);
    // exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2): self + (value grad) grad, one FMA.
    v[i] = fma_rn(mul_unfused(one_minus_beta2, gi), gi, mul_unfused(v[i], beta2));
    // denom = (exp_avg_sq.sqrt() / sqrt(bc2)).add_(eps); param.addcdiv_(exp_avg, denom, value=-step_size).
    const T denom = sqrt(v[i]) / bias_correction2_sqrt + eps;
    p[i] = pi + neg_step_size * m[i] / denom;
  }
};

namespace detail {

/// Registration, checks, norms and clipping shared by the optimizers; Derived
/// supplies `states` (state tensors per parameter) and `update(k, grad_scale)`.
template <class T, class Backend>
class OptimizerBase {
 public:
  using scalar = T;
  using backend = Backend;
  using state_vector = typename Backend::template vector<T>;

  /// One trained tensor: value and gradient (contiguous, same size), a name for
  /// messages, and its learning-rate multiplier (LoRA+ for B).
  struct parameter {
    std::string name;
    T* value;
    const T* grad;
    index_t rows, cols;
    double lr_scale;
    /// Updates applied to this tensor: torch keeps the step count (bias
    /// correction, the momentum buffer's start) per parameter.
    long steps = 0;
    /// Whether the value and gradient objects still own the registered
    /// storage: assigning a temporary to one (grads.dA() = ...) swaps its
    /// buffer, and the raw pointers above would then point at freed memory.
    std::function<bool()> unchanged;
  };

  /// Registers the adapter's trained tensors (LoRA: A, and B at lr *
  /// lora_plus_ratio; any lora::Adapter through for_each_parameter) and, when
  /// `grads` has db, the bias. The layer and the gradients are held by address: keep them alive
  /// and in place while the optimizer is used. Train unmerged: while merged, W
  /// holds the old s B A and steps on A and B do not reach the forward.
  template <class Layer>
  void add(Layer& layer, Gradients<Layer>& grads, const std::string& name = "") {
    static_assert(std::is_same_v<typename Layer::scalar, T> && std::is_same_v<typename Layer::backend, Backend>,
                  "lora::train optimizer: the layer's scalar type or backend differs from the optimizer's; "
                  "use e.g. train::AdamW<float> for float layers");
    std::string prefix = name;
    if (prefix.empty()) {
      prefix = "layer";
      prefix += std::to_string(layers_);
    }
    ++layers_;
    layer.check_consistent((std::string(optimizer_name_) + "::add").c_str());
    // A step on a merged layer would change A and B under the s B A that W
    // holds, and unmerge() would then subtract the wrong term.
    merged_layers_.push_back({prefix, [&layer] { return layer.merged(); }});
    layer.delta().for_each_parameter(grads.adapter(), [&](const char* name, ParamRole role, auto& value,
                                                          auto& grad) {
      add_tensor(prefix + "." + name, value, grad, role == ParamRole::up ? lora_plus_ratio_ : 1.0);
    });
    if (grads.has_bias()) add_tensor(prefix + ".bias", layer.bias(), grads.db(), 1.0);
  }

  /// Any other trainable tensor (a DoRA magnitude, a head) with its gradient.
  template <class V, class G>
  void add_tensor(const std::string& name, V& value, G& grad, double lr_scale = 1.0) {
    if (value.rows() != grad.rows() || value.cols() != grad.cols())
      lora::detail::raise<ShapeError>(optimizer_name_, "::add: '", name, "' is [", value.rows(), ", ",
                                       value.cols(), "] but its gradient is [", grad.rows(), ", ", grad.cols(),
                                       "]");
    T* const v = Backend::data(value);
    const T* const g = Backend::data(grad);
    for (const auto& p : params_)
      if (p.value == v)
        lora::detail::raise<ValueError>(optimizer_name_, "::add: '", name, "' is the tensor already registered as '",
                                         p.name, "'; registering it twice would update it twice per step");
    const index_t rows = value.rows(), cols = value.cols();
    params_.push_back({name, v, g, rows, cols, lr_scale, 0, [&value, &grad, v, g, rows, cols] {
                         return Backend::data(value) == v && Backend::data(grad) == g && value.rows() == rows &&
                                value.cols() == cols && grad.rows() == rows && grad.cols() == cols;
                       }});
    const index_t size = value.rows() * value.cols();
    for (int k = 0; k < states_; ++k) {
      state_vector st;
      Backend::resize(st, size, 1);
      Backend::fill(st, T(0));
      state_.push_back(std::move(st));
    }
  }

  const std::vector<parameter>& parameters() const { return params_; }
  /// Elements of trained parameters and of optimizer state (memory accounting).
  index_t parameter_elements() const {
    index_t n = 0;
    for (const auto& p : params_) n += p.rows * p.cols;
    return n;
  }
  index_t state_elements() const {
    index_t n = 0;
    for (const auto& s : state_) n += Backend::size(s);
    return n;
  }
  /// Steps taken so far.
  long steps() const { return step_; }
  /// The global gradient norm seen by the last step (before clipping).
  double last_grad_norm() const { return last_norm_; }

  /// The global L2 norm over every registered gradient. Throws
  /// lora::NumericError naming the first tensor with a NaN or Inf.
  double grad_norm() const {
    double total = 0.0;
    for (const auto& p : params_) {
      const index_t size = p.rows * p.cols;
      const double sq = Backend::squared_norm(p.grad, size);
      if (!std::isfinite(sq)) {
        const index_t bad = Backend::first_non_finite(p.grad, size);
        if (bad >= 0)
          lora::detail::raise<NumericError>(optimizer_name_, "::step: gradient of '", p.name,
                                             "' is not finite at row ", bad / p.cols, ", column ", bad % p.cols,
                                             " (value ", static_cast<double>(Backend::read(p.grad, bad)),
                                             "); no parameter was updated");
        lora::detail::raise<NumericError>(optimizer_name_, "::step: the squared norm of the gradient of '",
                                           p.name, "' overflows; no parameter was updated");
      }
      total += sq;
    }
    return std::sqrt(total);
  }

 protected:
  OptimizerBase(const char* name, int states, double lora_plus_ratio, double max_grad_norm)
      : optimizer_name_(name), states_(states), lora_plus_ratio_(lora_plus_ratio), max_grad_norm_(max_grad_norm) {
    lora::detail::check_finite_parameter(name, "lora_plus_ratio", lora_plus_ratio);
    lora::detail::check_finite_parameter(name, "max_grad_norm", max_grad_norm);
    if (!(lora_plus_ratio > 0.0) || !(max_grad_norm >= 0.0))
      lora::detail::raise<ValueError>(name, ": lora_plus_ratio = ", lora_plus_ratio,
                                       " must be > 0 and max_grad_norm = ", max_grad_norm, " must be >= 0");
  }

  /// Checks every gradient, then returns the clipping factor applied to all of
  /// them: min(1, max_norm / (norm + 1e-6)), as torch.nn.utils.clip_grad_norm_.
  /// torch forms it in T as (1 / (norm + 1e-6)) * max_norm (Tensor.__rtruediv__
  /// is reciprocal() * other); so do we, from the double norm rounded to T
  /// (torch sums the squares in T, which can round the norm an ulp apart).
  T begin_step() {
    for (const auto& [name, merged] : merged_layers_)
      if (merged())
        lora::detail::raise<ValueError>(optimizer_name_, "::step: ", name,
                                         " is merged; unmerge() it before training (W holds the old s B A)");
    for (const auto& p : params_)
      if (!p.unchanged())
        lora::detail::raise<ValueError>(optimizer_name_, "::step: '", p.name,
                                         "' or its gradient was resized or replaced after add(); it must keep ",
                                         "its storage (assign into it, e.g. grads.dA().setZero(), or add() again "
                                         "to a new optimizer); no parameter was updated");
    last_norm_ = grad_norm();
    ++step_;
    if (max_grad_norm_ > 0.0 && last_norm_ > 0.0) {
      const T norm = static_cast<T>(last_norm_);
      // A float norm past FLT_MAX: torch's factor would be 0 and zero every
      // gradient; the double formula still scales them to max_norm.
      if (!std::isfinite(norm)) return static_cast<T>(max_grad_norm_ / (last_norm_ + 1e-6));
      const T coef = (T(1) / (norm + static_cast<T>(1e-6))) * static_cast<T>(max_grad_norm_);
      if (coef < T(1)) return coef;
    }
    return T(1);
  }
  T* state(std::size_t param, int k) { return Backend::data(state_[param * states_ + k]); }

  const char* optimizer_name_;
  int states_;
  double lora_plus_ratio_, max_grad_norm_;
  std::vector<parameter> params_;
  std::vector<std::pair<std::string, std::function<bool()>>> merged_layers_;
  std::vector<state_vector> state_;
  long step_ = 0;
  int layers_ = 0;
  double last_norm_ = 0.0;
};

}  // namespace detail

/// SGD with momentum over adapter parameters. `opt.add(layer, grads)`, then
/// after each backward `opt.step()`.
template <class T, class Backend = DefaultBackend>
class SGD : public detail::OptimizerBase<T, Backend> {
  using base = detail::OptimizerBase<T, Backend>;

 public:
  explicit SGD(SGDOptions o = {})
      : base("train::SGD", o.momentum != 0.0 ? 1 : 0, o.lora_plus_ratio, o.max_grad_norm), o_(o) {
    for (const auto& [name, v] : {std::pair{"lr", o.lr}, {"momentum", o.momentum}, {"weight_decay", o.weight_decay}})
      lora::detail::check_finite_parameter("train::SGD", name, v);
    if (!(o.lr >= 0.0) || !(o.momentum >= 0.0) || !(o.weight_decay >= 0.0) || (o.nesterov && o.momentum == 0.0))
      lora::detail::raise<ValueError>("train::SGD: lr = ", o.lr, ", momentum = ", o.momentum,
                                       ", weight_decay = ", o.weight_decay,
                                       " must be >= 0 (and Nesterov needs momentum > 0)");
  }
  /// State tensors per parameter (memory accounting): 1 with momentum, else 0.
  static int states(const SGDOptions& o) { return o.momentum != 0.0 ? 1 : 0; }
  const SGDOptions& options() const { return o_; }
  /// Learning-rate schedules set the rate between steps.
  void set_lr(double lr) {
    lora::detail::check_non_negative_parameter((std::string(this->optimizer_name_) + "::set_lr").c_str(), "lr", lr);
    o_.lr = lr;
  }

  /// One update of every registered parameter. Returns the global gradient
  /// norm before clipping.
  double step() {
    const T c = this->begin_step();
    for (std::size_t k = 0; k < this->params_.size(); ++k) {
      auto& p = this->params_[k];
      const sgd_update<T> f{p.value,
                            p.grad,
                            this->states_ ? this->state(k, 0) : nullptr,
                            static_cast<T>(-(o_.lr * p.lr_scale)),
                            static_cast<T>(o_.momentum),
                            static_cast<T>(o_.weight_decay),
                            c,
                            o_.nesterov,
                            p.steps == 0};
      Backend::for_each_index(p.rows * p.cols, f);
      ++p.steps;
    }
    return this->last_norm_;
  }

 private:
  SGDOptions o_;
};

/// AdamW over adapter parameters; with lora_plus_ratio != 1 it is LoRA+.
template <class T, class Backend = DefaultBackend>
class AdamW : public detail::OptimizerBase<T, Backend> {
  using base = detail::OptimizerBase<T, Backend>;

 public:
  explicit AdamW(AdamWOptions o = {}) : base("train::AdamW", 2, o.lora_plus_ratio, o.max_grad_norm), o_(o) {
    for (const auto& [name, v] : {std::pair{"lr", o.lr}, {"beta1", o.beta1}, {"beta2", o.beta2}, {"eps", o.eps},
                                  {"weight_decay", o.weight_decay}})
      lora::detail::check_finite_parameter("train::AdamW", name, v);
    if (!(o.lr >= 0.0) || !(o.beta1 >= 0.0 && o.beta1 < 1.0) || !(o.beta2 >= 0.0 && o.beta2 < 1.0) ||
        !(o.eps > 0.0) || !(o.weight_decay >= 0.0))
      lora::detail::raise<ValueError>("train::AdamW: lr = ", o.lr, ", beta1 = ", o.beta1, ", beta2 = ", o.beta2,
                                       ", eps = ", o.eps, ", weight_decay = ", o.weight_decay,
                                       ": need lr, weight_decay >= 0, betas in [0, 1), eps > 0");
  }
  /// State tensors per parameter: the first and second moments.
  static int states(const AdamWOptions& = {}) { return 2; }
  const AdamWOptions& options() const { return o_; }
  /// Learning-rate schedules set the rate between steps.
  void set_lr(double lr) {
    lora::detail::check_non_negative_parameter((std::string(this->optimizer_name_) + "::set_lr").c_str(), "lr", lr);
    o_.lr = lr;
  }

  /// One update of every registered parameter. Returns the global gradient
  /// norm before clipping.
  double step() {
    const T c = this->begin_step();
    for (std::size_t k = 0; k < this->params_.size(); ++k) {
      auto& p = this->params_[k];
      // Python floats in torch, rounded to T where they meet a tensor.
      const double t = static_cast<double>(++p.steps);
      const double bc1 = 1.0 - std::pow(o_.beta1, t), bc2 = 1.0 - std::pow(o_.beta2, t);
      const double lr = o_.lr * p.lr_scale;
      // The product is rounded before the subtraction, as in Python (no FMA).
      const double decay = 1.0 - lora::detail::mul_unfused(lr, o_.weight_decay);
      const adamw_update<T> f{p.value,
                              p.grad,
                              this->state(k, 0),
                              this->state(k, 1),
                              static_cast<T>(decay),
                              static_cast<T>(1.0 - o_.beta1),
                              static_cast<T>(o_.beta2),
                              static_cast<T>(1.0 - o_.beta2),
                              static_cast<T>(-(lr / bc1)),
                              static_cast<T>(std::pow(bc2, 0.5)),  // Python's bc2 ** 0.5 is libm pow
                              static_cast<T>(o_.eps),
                              c};
      Backend::for_each_index(p.rows * p.cols, f);
    }
    return this->last_norm_;
  }

 private:
  AdamWOptions o_;
};

}  // namespace lora::train
