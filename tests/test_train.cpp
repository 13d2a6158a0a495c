// Training: gradients against central finite differences (double) and the
// closed form in long double (float), dropout masks, SGD / AdamW against
// hand-computed values and against torch.optim's own results (tests/fixtures/optim),
// clipping, non-finite refusal, memory accounting (including the LoRA paper's
// GPT-3 arithmetic), a short training run, and bit-identical determinism.
#include <lora/lora.hpp>

#include <algorithm>
#include <catch2/catch.hpp>
#include <chrono>
#include <cmath>
#include <cstring>
#include <fstream>
#include <functional>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

namespace {

using lora::index_t;
namespace train = lora::train;

template <class M>
void fill(M& m, std::uint64_t seed) {
  lora::EigenBackend::fill_random(m, lora::UniformDist{-1.0, 1.0}, seed, 77);
}

template <class T, int R>
auto make_layer(index_t out, index_t in, index_t r, std::uint64_t seed) {
  lora::RowMatrix<T> W(out, in);
  fill(W, seed);
  Eigen::Matrix<T, Eigen::Dynamic, 1> b(out);
  fill(b, seed + 1);
  lora::AdaptedLinear layer{std::move(W), std::move(b), lora::LowRankDelta<T, R>{out, in, r, {.alpha = 3.0}}};
  layer.delta().init(lora::init::UniformBoth{}, seed + 2);  // B != 0 so every gradient is non-trivial
  return layer;
}

// L = sum(Y .* C) for a fixed C, so dL/dY = C; in long double.
template <class Layer, class XM, class CM>
long double loss(const Layer& layer, const XM& X, const CM& C, const train::Dropout& drop, std::uint64_t step) {
  using T = typename Layer::scalar;
  lora::RowMatrix<T> Y(X.rows(), layer.out_features());
  train::Tape<Layer> tape;
  train::forward(layer, X, Y, tape, drop, step);
  long double acc = 0;
  for (index_t t = 0; t < Y.rows(); ++t)
    for (index_t o = 0; o < Y.cols(); ++o) acc += (long double)Y(t, o) * C(t, o);
  return acc;
}

// Central difference of `loss` over every element of `param`.
template <class M, class F>
lora::RowMatrix<long double> central_difference(M& param, F&& f, double h) {
  lora::RowMatrix<long double> d(param.rows(), param.cols());
  for (index_t i = 0; i < param.rows(); ++i)
    for (index_t j = 0; j < param.cols(); ++j) {
      const auto keep = param(i, j);
      param(i, j) = keep + h;
      const long double up = f();
      param(i, j) = keep - h;
      const long double down = f();
      param(i, j) = keep;
      d(i, j) = (up - down) / (2 * h);
    }
  return d;
}

// max |a - b| / max |b|
template <class A, class B>
long double relative_error(const A& a, const B& b) {
  long double num = 0, den = 0;
  for (index_t i = 0; i < b.rows(); ++i)
    for (index_t j = 0; j < b.cols(); ++j) {
      num = std::max(num, std::fabs((long double)a(i, j) - (long double)b(i, j)));
      den = std::max(den, std::fabs((long double)b(i, j)));
    }
  return den > 0 ? num / den : num;
}

// The formulas of docs/training.md by plain loops in long double, with the sum of |terms|
// per entry for a rounding bound (as test_core's reference).
struct closed_form {
  lora::RowMatrix<long double> dA, dB, dX, db, dA_mag, dB_mag, dX_mag, db_mag;
};

template <class WM, class AM, class BM, class XM, class GM>
closed_form reference_backward(const WM& W, const AM& A, const BM& B, long double s, const XM& X, const GM& G,
                               const train::Dropout* drop, std::uint64_t step) {
  const index_t n = X.rows(), in = W.cols(), out = W.rows(), r = A.rows();
  using LM = lora::RowMatrix<long double>;
  LM mask = LM::Ones(n, in);
  if (drop)
    for (index_t t = 0; t < n; ++t)
      for (index_t i = 0; i < in; ++i) mask(t, i) = drop->keeps(step, t, i, in) ? 1.0L / (1.0L - drop->p()) : 0.0L;
  LM D(n, in), H = LM::Zero(n, r), Hm = LM::Zero(n, r), GB = LM::Zero(n, r), GBm = LM::Zero(n, r);
  for (index_t t = 0; t < n; ++t)
    for (index_t i = 0; i < in; ++i) D(t, i) = mask(t, i) * X(t, i);
  for (index_t t = 0; t < n; ++t)
    for (index_t k = 0; k < r; ++k) {
      for (index_t i = 0; i < in; ++i) {
        H(t, k) += D(t, i) * A(k, i);
        Hm(t, k) += std::fabs(D(t, i) * A(k, i));
      }
      for (index_t o = 0; o < out; ++o) {
        GB(t, k) += (long double)G(t, o) * B(o, k);
        GBm(t, k) += std::fabs((long double)G(t, o) * B(o, k));
      }
    }
  closed_form c{LM::Zero(r, in), LM::Zero(out, r), LM::Zero(n, in), LM::Zero(out, 1),
                LM::Zero(r, in), LM::Zero(out, r), LM::Zero(n, in), LM::Zero(out, 1)};
  for (index_t o = 0; o < out; ++o)
    for (index_t k = 0; k < r; ++k)
      for (index_t t = 0; t < n; ++t) {
        c.dB(o, k) += s * G(t, o) * H(t, k);
        c.dB_mag(o, k) += std::fabs(s * G(t, o)) * Hm(t, k);
      }
  for (index_t k = 0; k < r; ++k)
    for (index_t i = 0; i < in; ++i)
      for (index_t t = 0; t < n; ++t) {
        c.dA(k, i) += s * GB(t, k) * D(t, i);
        c.dA_mag(k, i) += std::fabs(s * D(t, i)) * GBm(t, k);
      }
  for (index_t t = 0; t < n; ++t)
    for (index_t i = 0; i < in; ++i) {
      long double ad = 0, adm = 0;
      for (index_t o = 0; o < out; ++o) {
        c.dX(t, i) += (long double)G(t, o) * W(o, i);
        c.dX_mag(t, i) += std::fabs((long double)G(t, o) * W(o, i));
      }
      for (index_t k = 0; k < r; ++k) {
        ad += GB(t, k) * A(k, i);
        adm += GBm(t, k) * std::fabs((long double)A(k, i));
      }
      c.dX(t, i) += s * mask(t, i) * ad;
      // Merged layers subtract and re-add the clean delta: count it twice.
      c.dX_mag(t, i) += std::fabs(s) * (mask(t, i) + 2) * adm;
    }
  for (index_t o = 0; o < out; ++o)
    for (index_t t = 0; t < n; ++t) {
      c.db(o, 0) += G(t, o);
      c.db_mag(o, 0) += std::fabs((long double)G(t, o));
    }
  return c;
}

template <class T, class M>
void check_bound(const M& got, const lora::RowMatrix<long double>& ref, const lora::RowMatrix<long double>& mag,
                 index_t terms, const char* what) {
  // Higham's gamma bound for any summation order, 4x headroom, plus the
  // rounding of the inputs to T.
  const long double gamma = 4.0L * (terms + 4) * std::numeric_limits<T>::epsilon();
  for (index_t i = 0; i < ref.rows(); ++i)
    for (index_t j = 0; j < ref.cols(); ++j) {
      INFO(what << "(" << i << ", " << j << "): got " << (long double)got(i, j) << ", closed form " << ref(i, j));
      CHECK(std::fabs(got(i, j) - ref(i, j)) <= gamma * mag(i, j) + 1e-30L);
    }
}

}  // namespace

TEMPLATE_TEST_CASE_SIG("backward: dA, dB, dX, db against finite differences and the closed form", "[backward]",
                       ((class T, int R), T, R), (double, 2), (double, lora::dynamic), (float, 3),
                       (float, lora::dynamic)) {
  const index_t out = 7, in = 9, n = 5;
  const index_t r = R == lora::dynamic ? 4 : R;
  auto layer = make_layer<T, R>(out, in, r, 100);
  using Layer = decltype(layer);
  lora::RowMatrix<T> X(n, in), G(n, out);
  fill(X, 200);
  fill(G, 201);
  const std::uint64_t step = 3;
  const bool with_dropout = GENERATE(false, true);
  const bool merged = GENERATE(false, true);
  CAPTURE(with_dropout, merged);
  const train::Dropout drop(with_dropout ? 0.4 : 0.0, 5);
  const lora::RowMatrix<T> W0 = layer.base_weight();

  // Backward in the state under test.
  if (merged) REQUIRE(layer.merge());
  train::Tape<Layer> tape;
  train::Gradients<Layer> grads(layer, layer.has_bias());
  lora::RowMatrix<T> Y(n, out), dX(n, in);
  train::forward(layer, X, Y, tape, drop, step);
  train::backward(layer, X, G, tape, grads, dX);
  REQUIRE(tape.dropped() == with_dropout);
  if (merged) REQUIRE(layer.unmerge());

  if constexpr (std::is_same_v<T, double>) {
    // L is linear in each of A, B, b, X, so the central difference is exact up
    // to rounding: |L| ~ 10, eps 1e-16, h 1e-3 -> ~1e-12 absolute.
    const long double tol = 1e-9;
    const double h = 1e-3;
    auto L = [&] { return loss(layer, X, G, drop, step); };
    CHECK(relative_error(grads.dA(), central_difference(layer.delta().A(), L, h)) < tol);
    CHECK(relative_error(grads.dB(), central_difference(layer.delta().B(), L, h)) < tol);
    CHECK(relative_error(grads.db(), central_difference(layer.bias(), L, h)) < tol);
    CHECK(relative_error(dX, central_difference(X, L, h)) < tol);
  } else {
    const auto c = reference_backward(W0, layer.delta().A(), layer.delta().B(), (long double)layer.delta().scale(),
                                      X, G, with_dropout ? &drop : nullptr, step);
    check_bound<T>(grads.dA(), c.dA, c.dA_mag, out + n, "dA");
    check_bound<T>(grads.dB(), c.dB, c.dB_mag, in + n, "dB");
    check_bound<T>(dX, c.dX, c.dX_mag, out + 2 * r, "dX");
    check_bound<T>(grads.db(), c.db, c.db_mag, n, "db");
  }
}

TEST_CASE("backward: B = 0 at init gives dA = 0 and dB != 0", "[backward]") {
  lora::RowMatrix<float> W(16, 12), X(4, 12), G(4, 16), Y(4, 16);
  fill(W, 1);
  fill(X, 2);
  fill(G, 3);
  lora::AdaptedLinear layer{W, lora::LowRankDelta<float, 4>{16, 12, {.alpha = 8}}};
  layer.delta().init(lora::init::KaimingZero{}, 4);
  train::Tape<decltype(layer)> tape;
  train::Gradients<decltype(layer)> grads(layer, layer.has_bias());
  train::forward(layer, X, Y, tape);
  train::backward(layer, X, G, tape, grads);
  CHECK(grads.dA().cwiseAbs().maxCoeff() == 0.0f);
  CHECK(grads.dB().cwiseAbs().maxCoeff() > 0.0f);
  CHECK_FALSE(grads.has_bias());
}

TEST_CASE("backward: accumulation, dX accumulation, and a tape that stops allocating", "[backward]") {
  auto layer = make_layer<double, 3>(10, 6, 3, 7);
  using Layer = decltype(layer);
  lora::RowMatrix<double> X(8, 6), G(8, 10), Y(8, 10);
  fill(X, 8);
  fill(G, 9);
  train::Tape<Layer> tape;
  train::Gradients<Layer> once(layer, layer.has_bias()), twice(layer, layer.has_bias());
  lora::RowMatrix<double> dX(8, 6), dX2 = lora::RowMatrix<double>::Ones(8, 6);
  train::forward(layer, X, Y, tape);
  train::backward(layer, X, G, tape, once, dX);
  const index_t capacity = tape.capacity();
  CHECK(capacity == 3 * 8 * 3);  // H, G B and the evaluators' G B: [n, r] each, nothing [out, in]
  train::backward(layer, X, G, tape, twice, dX2, {.accumulate = false, .accumulate_dx = true});
  train::backward(layer, X, G, tape, twice, {.accumulate = true});
  CHECK(tape.capacity() == capacity);
  CHECK((twice.dA() - 2 * once.dA()).cwiseAbs().maxCoeff() < 1e-14);
  CHECK((twice.dB() - 2 * once.dB()).cwiseAbs().maxCoeff() < 1e-14);
  CHECK((twice.db() - 2 * once.db()).cwiseAbs().maxCoeff() < 1e-14);
  CHECK((dX2 - dX - lora::RowMatrix<double>::Ones(8, 6)).cwiseAbs().maxCoeff() < 1e-14);
}

TEST_CASE("dropout: counter-based mask, inverted scaling, eval mode, bad p", "[dropout]") {
  const index_t n = 64, in = 128, out = 8;
  lora::RowMatrix<double> X = lora::RowMatrix<double>::Ones(n, in), D(n, in);
  const train::Dropout drop(0.25, 42);
  lora::EigenBackend::dropout(1.0, X, 0.0, D, drop.p(), drop.seed(), 7);
  index_t kept = 0;
  for (index_t t = 0; t < n; ++t)
    for (index_t i = 0; i < in; ++i) {
      REQUIRE(D(t, i) == (drop.keeps(7, t, i, in) ? 1.0 / 0.75 : 0.0));  // exactly 1/(1-p) or 0
      // The definition: element (t, i) is counter t * in + i of (seed, step).
      REQUIRE(drop.keeps(7, t, i, in) ==
              (lora::detail::to_unit(lora::detail::random_bits(42, 7, std::uint64_t(t * in + i))) >= 0.25));
      kept += D(t, i) != 0.0;
    }
  // 8192 Bernoulli(0.75) draws: mean 6144, sd 39; 5 sd either side.
  CHECK(std::abs(kept - 6144) < 200);
  lora::RowMatrix<double> D2(n, in), D3(n, in);
  lora::EigenBackend::dropout(1.0, X, 0.0, D2, drop.p(), drop.seed(), 7);
  lora::EigenBackend::dropout(1.0, X, 0.0, D3, drop.p(), drop.seed(), 8);
  CHECK(D2 == D);
  CHECK(D3 != D);

  SECTION("eval mode and p = 0 are the plain forward, bit for bit") {
    lora::RowMatrix<double> W(out, in), Xr(n, in), Y(n, out);
    fill(W, 1);
    fill(Xr, 2);
    lora::AdaptedLinear layer{W, lora::LowRankDelta<double, 2>{out, in, {.alpha = 4}}};
    layer.delta().init(lora::init::UniformBoth{}, 3);
    train::Tape<decltype(layer)> tape;
    train::Dropout d(0.5, 1);
    train::forward(layer, Xr, Y, tape, d, 0);
    CHECK(tape.dropped());
    CHECK(Y != layer.forward(Xr));
    d.eval();
    train::forward(layer, Xr, Y, tape, d, 0);
    CHECK_FALSE(tape.dropped());
    CHECK(Y == layer.forward(Xr));
    train::forward(layer, Xr, Y, tape, train::Dropout(0.0, 1), 0);
    CHECK(Y == layer.forward(Xr));
  }
  SECTION("p outside [0, 1)") {
    CHECK_THROWS_AS(train::Dropout(1.0), lora::ValueError);
    CHECK_THROWS_WITH(train::Dropout(-0.1), Catch::Contains("p = -0.1 must satisfy 0 <= p < 1"));
    CHECK_THROWS_AS(train::Dropout(std::numeric_limits<double>::quiet_NaN()), lora::ValueError);
    CHECK_NOTHROW(train::Dropout(0.0));
    CHECK_NOTHROW(train::Dropout(0.999));
  }
}

namespace {
// One scalar parameter, driven by hand-set gradients: a [1, 1] layer whose A
// is the parameter under test (B's gradient is kept 0).
struct scalar_problem {
  lora::RowMatrix<double> W = lora::RowMatrix<double>::Zero(1, 1);
  lora::AdaptedLinear<lora::RowMatrix<double>, lora::LowRankDelta<double, 1>> layer{
      W, lora::LowRankDelta<double, 1>{1, 1}};
  train::Gradients<decltype(layer)> grads{layer};
  scalar_problem() {
    layer.delta().A()(0, 0) = 1.0;
    layer.delta().B()(0, 0) = 0.0;
  }
};
}  // namespace

TEST_CASE("AdamW and SGD steps match hand-computed values", "[optim]") {
  // Values from the update rules of torch.optim.AdamW / SGD written out by hand
  // in double (p0 = 1, gradients 0.5, -0.25, 1.0).
  const double g[3] = {0.5, -0.25, 1.0};
  SECTION("AdamW: lr 0.1, betas (0.9, 0.999), eps 1e-8, weight decay 0.01") {
    // step 1: p = 1 * (1 - 0.001) - 0.1 * (0.05 / 0.1) / (sqrt(0.00025 / 0.001) + 1e-8) = 0.899000002
    const double expected[3] = {0.8990000019999999, 0.8714672987058462, 0.8047846723763838};
    scalar_problem sp;
    train::AdamW<double> opt({.lr = 0.1, .beta1 = 0.9, .beta2 = 0.999, .eps = 1e-8, .weight_decay = 0.01});
    opt.add(sp.layer, sp.grads, "p");
    for (int t = 0; t < 3; ++t) {
      sp.grads.dA()(0, 0) = g[t];
      opt.step();
      CHECK(sp.layer.delta().A()(0, 0) == Approx(expected[t]).epsilon(1e-14));
      CHECK(sp.layer.delta().B()(0, 0) == 0.0);  // zero gradient, decay of 0 is 0
    }
    CHECK(opt.steps() == 3);
    CHECK(opt.state_elements() == 2 * 2);  // m and v for A [1, 1] and B [1, 1]
  }
  SECTION("SGD: lr 0.1, momentum 0.9, weight decay 0.01 (coupled), plain and Nesterov") {
    const bool nesterov = GENERATE(false, true);
    // plain: buf = 0.9 buf + (g + 0.01 p); p -= 0.1 buf.  step 1: 1 - 0.1 * 0.51 = 0.949
    const double plain[3] = {0.949, 0.927151, 0.8065597489999999};
    const double nest[3] = {0.9031, 0.90757411, 0.6981892081909999};
    scalar_problem sp;
    train::SGD<double> opt({.lr = 0.1, .momentum = 0.9, .weight_decay = 0.01, .nesterov = nesterov});
    opt.add(sp.layer, sp.grads);
    for (int t = 0; t < 3; ++t) {
      sp.grads.dA()(0, 0) = g[t];
      opt.step();
      CHECK(sp.layer.delta().A()(0, 0) == Approx(nesterov ? nest[t] : plain[t]).epsilon(1e-14));
    }
    CHECK(opt.state_elements() == 2);
    CHECK(train::SGD<double>({.lr = 0.1}).states({}) == 0);
  }
}

TEST_CASE("LoRA+ ratio, global-norm clipping, non-finite gradients", "[optim]") {
  auto layer = make_layer<float, 2>(6, 5, 2, 11);
  using Layer = decltype(layer);
  train::Gradients<Layer> grads(layer, layer.has_bias());
  grads.dA().setConstant(0.3f);  // ||g||^2 = 10 * 0.09 + 12 * 0.16 + 6 * 0.04 = 3.06
  grads.dB().setConstant(0.4f);
  grads.db().setConstant(0.2f);
  const lora::RowMatrix<float> A0 = layer.delta().A(), B0 = layer.delta().B();
  const Eigen::VectorXf b0 = layer.bias();

  SECTION("LoRA+: B moves ratio times as far per unit gradient") {
    train::SGD<float> opt({.lr = 0.5, .lora_plus_ratio = 16});
    opt.add(layer, grads, "q");
    CHECK(opt.step() == Approx(std::sqrt(3.06)).epsilon(1e-6));
    CHECK((A0 - layer.delta().A()).maxCoeff() == Approx(0.5f * 0.3f));
    CHECK((B0 - layer.delta().B()).maxCoeff() == Approx(16 * 0.5f * 0.4f));
    CHECK((b0 - layer.bias()).maxCoeff() == Approx(0.5f * 0.2f));
    REQUIRE(opt.parameters().size() == 3);
    CHECK(opt.parameters()[1].name == "q.lora_B");
  }
  SECTION("clipping scales every gradient by max_norm / (norm + 1e-6)") {
    train::SGD<float> opt({.lr = 1.0, .max_grad_norm = 0.5});
    opt.add(layer, grads);
    const double norm = opt.step();
    const double c = 0.5 / (norm + 1e-6);
    CHECK((A0 - layer.delta().A()).maxCoeff() == Approx(c * 0.3).epsilon(1e-5));
    CHECK((B0 - layer.delta().B()).maxCoeff() == Approx(c * 0.4).epsilon(1e-5));
    CHECK(opt.last_grad_norm() == norm);
  }
  SECTION("a NaN or Inf is reported by tensor name and position; nothing moves") {
    train::AdamW<float> opt;
    opt.add(layer, grads, "blocks.0.attn.q");
    grads.dB()(4, 1) = std::numeric_limits<float>::quiet_NaN();
    CHECK_THROWS_AS(opt.step(), lora::NumericError);
    CHECK_THROWS_WITH(opt.step(), Catch::Contains("train::AdamW::step: gradient of 'blocks.0.attn.q.lora_B' is "
                                                  "not finite at row 4, column 1") &&
                                      Catch::Contains("no parameter was updated"));
    grads.dB()(4, 1) = 0.0f;
    grads.db()(5) = std::numeric_limits<float>::infinity();
    CHECK_THROWS_WITH(opt.step(), Catch::Contains("'blocks.0.attn.q.bias'") && Catch::Contains("row 5, column 0"));
    CHECK(layer.delta().A() == A0);
    CHECK(layer.delta().B() == B0);
    CHECK(layer.bias() == b0);
    CHECK(opt.steps() == 0);
  }
  SECTION("finite float gradients near FLT_MAX do not overflow the norm") {
    grads.dA().setConstant(3e38f);
    train::SGD<float> opt({.lr = 0.0});
    opt.add(layer, grads);
    CHECK(std::isfinite(opt.step()));
  }
  SECTION("bad options") {
    CHECK_THROWS_AS(train::AdamW<float>({.beta1 = 1.0}), lora::ValueError);
    CHECK_THROWS_AS(train::SGD<float>({.nesterov = true}), lora::ValueError);
    CHECK_THROWS_AS(train::SGD<float>({.lora_plus_ratio = 0}), lora::ValueError);
  }
}

TEST_CASE("backward rejects bad shapes with the function and the values", "[errors]") {
  auto layer = make_layer<float, 2>(6, 5, 2, 21);
  using Layer = decltype(layer);
  lora::RowMatrix<float> X(4, 5), Y(4, 6), G(4, 6), dX(4, 5);
  fill(X, 1);
  fill(G, 2);
  train::Tape<Layer> tape;
  train::Gradients<Layer> grads(layer, layer.has_bias());
  CHECK_THROWS_WITH(train::backward(layer, X, G, tape, grads),
                    Catch::Contains("AdaptedLinear::backward: the tape is empty"));
  train::forward(layer, X, Y, tape);
  lora::RowMatrix<float> G_bad(3, 5), dX_bad(4, 6), X_bad(3, 5);
  CHECK_THROWS_AS(train::backward(layer, X, G_bad, tape, grads), lora::ShapeError);
  CHECK_THROWS_WITH(train::backward(layer, X, G_bad, tape, grads),
                    Catch::Contains("AdaptedLinear::backward: G is [3, 5], expected [n, out] = [4, 6]"));
  CHECK_THROWS_WITH(train::backward(layer, X, G, tape, grads, dX_bad),
                    Catch::Contains("dX is [4, 6], expected [n, in] = [4, 5]"));
  CHECK_THROWS_WITH(train::backward(layer, X_bad, G, tape, grads),
                    Catch::Contains("X has 3 rows but the tape's forward saw 4 tokens"));
  lora::RowMatrix<float> X_cols(4, 7), Y_bad(4, 5);
  CHECK_THROWS_WITH(train::forward(layer, X_cols, Y, tape),
                    Catch::Contains("X has 7 columns, expected in_features = 5"));
  CHECK_THROWS_WITH(train::forward(layer, X, Y_bad, tape), Catch::Contains("Y is [4, 5], expected [n, out] = [4, 6]"));
  layer.merge();
  CHECK_THROWS_WITH(train::backward(layer, X, G, tape, grads, dX),
                    Catch::Contains("was unmerged in forward and is merged now"));
  layer.unmerge();
  train::Gradients<Layer> no_bias(layer, false);
  CHECK_NOTHROW(train::backward(layer, X, G, tape, no_bias, dX));
  train::AdamW<float> opt;
  lora::RowMatrix<float> wrong(2, 2);
  CHECK_THROWS_WITH(opt.add_tensor("head", layer.delta().A(), wrong),
                    Catch::Contains("train::AdamW::add: 'head' is [2, 5] but its gradient is [2, 2]"));
}

TEST_CASE("memory accounting: known shapes and the LoRA paper's GPT-3 175B arithmetic", "[memory]") {
  SECTION("one 4096 x 4096 projection, r = 8, fp32, AdamW") {
    const auto m = train::memory_usage(train::LayerShape{4096, 4096, 8});
    CHECK(m.frozen_parameters == 4096u * 4096u);
    CHECK(m.trainable_parameters == 8u * 8192u);
    CHECK(m.frozen_bytes == 4.0 * 4096 * 4096);
    CHECK(m.trainable_bytes == 4.0 * 65536);
    CHECK(m.gradient_bytes == 4.0 * 65536);
    CHECK(m.optimizer_bytes == 2 * 4.0 * 65536);
    CHECK(m.full_parameters == 4096u * 4096u);
    CHECK(m.full_total_bytes() == 16.0 * 4096 * 4096);  // weight + gradient + m + v
    CHECK(m.parameter_ratio() == 256.0);
  }
  SECTION("a real layer gives its shape's figures; the optimizer holds what is counted") {
    auto layer = make_layer<float, 4>(48, 32, 4, 31);
    train::Gradients<decltype(layer)> grads(layer, layer.has_bias());
    train::AdamW<float> opt;
    opt.add(layer, grads);
    const auto m = train::memory_usage(layer, {}, /*train_bias=*/true);
    CHECK(m.trainable_parameters == std::uint64_t(opt.parameter_elements()));
    CHECK(m.optimizer_bytes == 4.0 * double(opt.state_elements()));
    CHECK(m.frozen_parameters == 48u * 32u);
    CHECK(m.full_parameters == 48u * 32u + 48u);
    const auto sgd = train::memory_usage(layer, {.optimizer_states = train::SGD<float>::states({.momentum = 0.9})});
    CHECK(sgd.optimizer_bytes == 4.0 * 4 * (48 + 32));
  }
  SECTION("GPT-3 175B: 96 layers, d = 12288, W_q and W_v at r = 4, fp16, Adam") {
    const index_t d = 12288;
    std::vector<train::LayerShape> adapted(2 * 96, train::LayerShape{d, d, 4});
    const train::MemoryOptions fp16{.bytes = train::Precision::fp16(), .optimizer_states = 2};
    const double P = 175e9;  // the paper's parameter count
    const auto m = train::memory_usage(adapted, fp16) + train::other_parameters(std::uint64_t(P) - 192u * d * d, fp16);
    CHECK(m.trainable_parameters == 18874368u);  // 2 * 96 * 4 * (12288 + 12288)
    CHECK(m.full_parameters == std::uint64_t(P));
    CHECK(m.parameter_ratio() == Approx(9272).epsilon(1e-3));  // "about 10,000x"
    // The paper's arithmetic: Adam keeps 2 states per trained parameter, so full
    // fine-tuning holds 3x the fp16 weights, LoRA about 1x:
    const double full = m.full_weight_bytes + m.full_optimizer_bytes;
    const double lora = m.frozen_bytes + m.trainable_bytes + m.optimizer_bytes;
    CHECK(full == Approx(1.05e12));  // "1.2 TB" (the paper's measured figure)
    CHECK(lora == Approx(350.1e9).epsilon(1e-3));  // "350 GB"
    CHECK(full / lora == Approx(3.0).epsilon(2e-3));
    // Counting fp16 gradients as well: 1.4 TB against 350 GB.
    CHECK(m.full_total_bytes() == Approx(1.4e12));
    CHECK(m.memory_ratio() == Approx(4.0).epsilon(2e-3));
  }
  SECTION("bad shapes") {
    CHECK_THROWS_AS(train::memory_usage(train::LayerShape{8, 8, 9}), lora::ShapeError);
    CHECK_THROWS_AS(train::memory_usage(train::LayerShape{8, 8, 2, false, true}), lora::ValueError);
  }
}

namespace {
// Fits a rank-2 change of a frozen [8, 16] layer from 64 noise-free samples
// with AdamW; returns the per-step losses and the final factors.
struct run_result {
  std::vector<double> losses;
  lora::RowMatrix<float> A, B;
};
run_result tiny_training_run(double p, int steps) {
  const index_t out = 8, in = 16, n = 64;
  lora::RowMatrix<float> W(out, in), X(n, in), U(out, 2), V(2, in);
  fill(W, 1);
  fill(X, 2);
  fill(U, 3);
  fill(V, 4);
  const lora::RowMatrix<float> target = X * (W + 0.5f * U * V).transpose();
  lora::AdaptedLinear layer{W, lora::LowRankDelta<float, 2>{out, in, {.alpha = 2}}};
  layer.delta().init(lora::init::KaimingZero{}, 5);
  using Layer = decltype(layer);
  train::Tape<Layer> tape;
  train::Gradients<Layer> grads(layer, layer.has_bias());
  train::AdamW<float> opt({.lr = 0.05, .weight_decay = 0.0});
  opt.add(layer, grads);
  const train::Dropout drop(p, 6);
  lora::RowMatrix<float> Y(n, out), G(n, out);
  run_result r;
  for (int step = 0; step < steps; ++step) {
    train::forward(layer, X, Y, tape, drop, std::uint64_t(step));
    G = (Y - target) * (2.0f / float(n * out));  // d mean((Y - T)^2) / dY
    r.losses.push_back(double((Y - target).squaredNorm()) / double(n * out));
    train::backward(layer, X, G, tape, grads);
    opt.step();
  }
  r.A = layer.delta().A();
  r.B = layer.delta().B();
  return r;
}
}  // namespace

TEST_CASE("a short training run fits a rank-2 change", "[training]") {
  const auto t0 = std::chrono::steady_clock::now();
  const auto r = tiny_training_run(0.0, 300);
  const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  INFO("initial loss " << r.losses.front() << ", final " << r.losses.back() << ", " << ms << " ms");
  CHECK(r.losses.front() > 0.1);
  CHECK(r.losses.back() < 1e-4);  // noise-free: the loss goes to rounding level
}

TEST_CASE("the same seed gives bit-identical training", "[training][determinism]") {
  const double p = GENERATE(0.0, 0.1);
  const auto a = tiny_training_run(p, 40), b = tiny_training_run(p, 40);
  CHECK(a.losses == b.losses);
  CHECK(a.A == b.A);
  CHECK(a.B == b.B);
}

// ---- the Adapter concept: a second model plugs in without a core change --------

namespace {

// LoRA-FA (Zhang et al. 2023): A is a frozen random projection, only B trains.
// Everything here is the concept's contract (lora/adapter.hpp); nothing in the
// layer, lora::train or the optimizers knows this type.
template <class T>
class FrozenADelta {
 public:
  using scalar = T;
  using backend = lora::EigenBackend;
  static constexpr int rank_at_compile_time = lora::dynamic;
  struct gradients {
    lora::RowMatrix<T> db;  // (out, r): no dA, A does not train
    void zero() { db.setZero(); }
  };

  FrozenADelta(lora::RowMatrix<T> b, lora::RowMatrix<T> a, T s) : b_(std::move(b)), a_(std::move(a)), s_(s) {}

  index_t in_features() const { return a_.cols(); }
  index_t out_features() const { return b_.rows(); }
  index_t rank() const { return a_.rows(); }
  T scale() const { return s_; }
  auto expression() const { return expression(s_); }
  auto expression(T s) const { return s * lora::expr::product(b_, a_); }
  void check_consistent(const char* where) const {
    if (b_.cols() != a_.rows()) lora::detail::raise<lora::ShapeError>(where, ": B and A disagree on the rank");
  }
  index_t trainable_parameters() const { return b_.size(); }
  gradients make_gradients() const { return {lora::RowMatrix<T>::Zero(b_.rows(), b_.cols())}; }
  template <class F>
  void for_each_parameter(gradients& g, F&& f) {
    f("lora_B", lora::ParamRole::up, b_, g.db);
  }
  template <class D, class WS>
  void record(const D& d, WS& saved) const {
    auto h = saved.matrix(d.rows(), rank(), 0);  // (n, r) = D A^T
    backend::gemm_nt(T(1), d, a_, T(0), h);
  }
  template <class G, class D, class WS>
  void backward(const G& g, const D&, WS& saved, gradients& grads, T beta) const {
    auto h = saved.matrix(g.rows(), rank(), 0);  // left there by the forward
    backend::gemm_tn(s_, g, h, beta, grads.db);  // (out, r) = s G^T H
  }
  const lora::RowMatrix<T>& A() const { return a_; }
  lora::RowMatrix<T>& B() { return b_; }
  const lora::RowMatrix<T>& B() const { return b_; }

 private:
  lora::RowMatrix<T> b_, a_;
  T s_;
};

static_assert(lora::Adapter<FrozenADelta<float>> && lora::MergeableAdapter<FrozenADelta<float>>);
static_assert(lora::Adapter<lora::LowRankDelta<float, 8>> && lora::LowRankFactors<lora::LowRankDelta<float, 8>>);
static_assert(!lora::Adapter<lora::RowMatrix<float>>);

template <class G>
constexpr bool has_dA = requires(G& g) { g.dA(); };

}  // namespace

TEST_CASE("Adapter concept: a frozen-A (LoRA-FA) delta trains through AdaptedLinear, train:: and SGD",
          "[adapter][backward][optim]") {
  const index_t out = 23, in = 31, r = 3, n = 7;
  auto twin = make_layer<double, lora::dynamic>(out, in, r, 11);  // LowRankDelta with the same A, B, s
  FrozenADelta<double> fa(twin.delta().B(), twin.delta().A(), twin.delta().scale());
  lora::AdaptedLinear layer{twin.base_weight(), twin.bias(), std::move(fa)};
  using Layer = decltype(layer);
  using Twin = decltype(twin);
  lora::RowMatrix<double> X(n, in), C(n, out);
  fill(X, 5);
  fill(C, 6);

  // Inference and merge go through the same evaluators: the same bits as the twin.
  const lora::RowMatrix<double> Y = layer.forward(X), Yt = twin.forward(X);
  CHECK(Y == Yt);
  REQUIRE(layer.merge());
  CHECK((lora::expr::materialize(layer.weight()) - lora::expr::materialize(twin.weight())).cwiseAbs().maxCoeff() <
        1e-14);
  REQUIRE(layer.unmerge());
  CHECK((layer.base_weight() - twin.base_weight()).cwiseAbs().maxCoeff() < 1e-14);
  layer.base_weight() = twin.base_weight();  // W + d - d is W only to rounding

  for (const double p : {0.0, 0.25}) {
    const train::Dropout drop{p, 99};
    train::Tape<Layer> tape;
    train::Tape<Twin> ttape;
    train::Gradients<Layer> grads(layer, layer.has_bias());
    train::Gradients<Twin> tgrads(twin, twin.has_bias());
    static_assert(!has_dA<train::Gradients<Layer>> && has_dA<train::Gradients<Twin>>, "a frozen A has no gradient");
    lora::RowMatrix<double> Yf(n, out), Ytf(n, out), dX(n, in), dXt(n, in);
    train::forward(layer, X, Yf, tape, drop, 3);
    train::forward(twin, X, Ytf, ttape, drop, 3);
    CHECK(Yf == Ytf);
    train::backward(layer, X, C, tape, grads, dX);
    train::backward(twin, X, C, ttape, tgrads, dXt);
    CHECK(grads.adapter().db == tgrads.dB());  // dB does not depend on whether A trains
    CHECK(grads.db() == tgrads.db());
    CHECK(dX == dXt);
    // And against central differences of the loss in B (independent of the twin).
    const lora::RowMatrix<double> b = layer.delta().B();
    const auto fd = central_difference(layer.delta().B(), [&] { return loss(layer, X, C, drop, 3); }, 1e-5);
    CHECK((fd.cast<double>() - grads.adapter().db).cwiseAbs().maxCoeff() < 1e-6);
    CHECK(layer.delta().B() == b);
  }

  // SGD through for_each_parameter: B moves exactly as the twin's B, A stays.
  train::Tape<Layer> tape;
  train::Tape<Twin> ttape;
  train::Gradients<Layer> grads(layer, false);
  train::Gradients<Twin> tgrads(twin, false);
  lora::RowMatrix<double> Yf(n, out);
  train::forward(layer, X, Yf, tape);
  train::forward(twin, X, Yf, ttape);
  train::backward(layer, X, C, tape, grads);
  train::backward(twin, X, C, ttape, tgrads);
  train::SGD<double> sgd({.lr = 0.1, .momentum = 0.9, .lora_plus_ratio = 4.0}), tsgd({.lr = 0.1, .momentum = 0.9, .lora_plus_ratio = 4.0});
  sgd.add(layer, grads, "fa");
  tsgd.add(twin, tgrads, "twin");
  REQUIRE(sgd.parameters().size() == 1);
  CHECK(sgd.parameters()[0].name == "fa.lora_B");
  CHECK(sgd.parameters()[0].lr_scale == 4.0);
  const lora::RowMatrix<double> a_before = layer.delta().A();
  sgd.step();
  tsgd.step();
  CHECK(layer.delta().B() == twin.delta().B());
  CHECK(layer.delta().A() == a_before);

  // Memory accounting counts what trains: out * r, not r (in + out).
  const auto m = train::memory_usage(layer);
  const auto mt = train::memory_usage(twin);
  CHECK(m.trainable_bytes == double(out * r) * 4);
  CHECK(mt.trainable_bytes == double(r * (in + out)) * 4);
}

TEST_CASE("a recording workspace keeps H = X A^T through expr::apply, also at scale 0", "[adapter][backward]") {
  // The training forward's contract (adapter.hpp): evaluating the adapter's
  // expression with the tape's recording workspace leaves H in slot 0, and a
  // zero scale is not skipped there (it is for inference).
  auto layer = make_layer<float, 3>(17, 29, 3, 5);
  lora::RowMatrix<float> X(4, 29), Y = lora::RowMatrix<float>::Zero(4, 17);
  fill(X, 6);
  const lora::RowMatrix<float> H = X * layer.delta().A().transpose();
  for (const double m : {1.0, 0.0}) {
    layer.delta().set_multiplier(m);
    lora::expr::Recording<lora::EigenBackend::workspace<float>> rec;
    rec.matrix<3>(4, 3, 0).setConstant(std::numeric_limits<float>::quiet_NaN());  // what a skip would leave
    lora::expr::apply(layer.unmerged_expression(), X, Y, 1.0f, 0.0f, rec);
    const auto h = rec.matrix<3>(4, 3, 0);
    CHECK((h - H).cwiseAbs().maxCoeff() <= 64 * std::numeric_limits<float>::epsilon() * H.cwiseAbs().maxCoeff());
    // Inference skips the zero-scaled term and needs no scratch at all.
    lora::EigenBackend::workspace<float> plain;
    lora::expr::apply(layer.unmerged_expression(), X, Y, 1.0f, 0.0f, plain);
    CHECK(plain.capacity() == (m == 0.0 ? 0 : 4 * 3));
  }
}

TEST_CASE("optimizers refuse NaN and infinite hyperparameters, naming each", "[optim][errors]") {
  constexpr double inf = std::numeric_limits<double>::infinity(), nan = std::numeric_limits<double>::quiet_NaN();
  for (const double bad : {inf, nan}) {
    CAPTURE(bad);
    CHECK_THROWS_WITH(train::SGD<float>({.lr = bad}), Catch::Contains("lr = "));
    CHECK_THROWS_WITH(train::SGD<float>({.lr = 0.1, .momentum = bad}), Catch::Contains("momentum = "));
    CHECK_THROWS_WITH(train::SGD<float>({.lr = 0.1, .weight_decay = bad}), Catch::Contains("weight_decay = "));
    CHECK_THROWS_WITH(train::AdamW<float>({.lr = bad}), Catch::Contains("lr = "));
    CHECK_THROWS_WITH(train::AdamW<float>({.eps = bad}), Catch::Contains("eps = "));
    CHECK_THROWS_WITH(train::AdamW<float>({.weight_decay = bad}), Catch::Contains("weight_decay = "));
    CHECK_THROWS_WITH(train::AdamW<float>({.lora_plus_ratio = bad}), Catch::Contains("lora_plus_ratio = "));
    CHECK_THROWS_WITH(train::AdamW<float>({.max_grad_norm = bad}), Catch::Contains("max_grad_norm = "));
    train::AdamW<float> adam;
    CHECK_THROWS_AS(adam.set_lr(bad), lora::ValueError);
    train::SGD<float> sgd({.lr = 0.1});
    CHECK_THROWS_WITH(sgd.set_lr(bad), Catch::Contains("must be finite"));
  }
  CHECK_THROWS_AS(train::AdamW<float>({.lr = inf}), lora::ValueError);
}

TEST_CASE("a delta refuses a NaN or infinite alpha, scale or multiplier", "[errors]") {
  constexpr double inf = std::numeric_limits<double>::infinity(), nan = std::numeric_limits<double>::quiet_NaN();
  using D = lora::LowRankDelta<float>;
  for (const double bad : {inf, -inf, nan}) {
    CAPTURE(bad);
    CHECK_THROWS_WITH(D(8, 6, 2, {.alpha = bad}), Catch::Contains("alpha = ") && Catch::Contains("not finite"));
    CHECK_THROWS_WITH(D(8, 6, 2, {.user_scale = bad}), Catch::Contains("user_scale = "));
    CHECK_THROWS_WITH(D(8, 6, 2, {.multiplier = bad}), Catch::Contains("multiplier = "));
    CHECK_THROWS_AS(D(lora::RowMatrix<float>::Zero(8, 2), lora::RowMatrix<float>::Zero(2, 6), {.alpha = bad}),
                    lora::ValueError);
    D d(8, 6, 2, {.alpha = 4});
    CHECK_THROWS_AS(d.set_multiplier(bad), lora::ValueError);
    CHECK(d.multiplier() == 1.0);  // unchanged
    CHECK_THROWS_WITH(d.init(lora::init::UniformBoth{bad}, 1), Catch::Contains("bound = "));
    lora::RowMatrix<float> dW = lora::RowMatrix<float>::Ones(8, 6);
    dW(3, 4) = static_cast<float>(bad);
    CHECK_THROWS_WITH(d.init(lora::init::FromDense{dW}, 0), Catch::Contains("delta(3, 4) = "));
  }
}

TEST_CASE("memory accounting refuses NaN, infinite or negative byte sizes", "[memory][errors]") {
  lora::AdaptedLinear layer{lora::RowMatrix<float>::Zero(8, 6), lora::LowRankDelta<float>{8, 6, 2}};
  for (const double bad : {std::numeric_limits<double>::quiet_NaN(), std::numeric_limits<double>::infinity(), -1.0}) {
    CAPTURE(bad);
    train::MemoryOptions o;
    o.bytes.state = bad;
    CHECK_THROWS_WITH(train::memory_usage(layer, o), Catch::Contains("bytes.state = "));
  }
}

TEST_CASE("memory accounting of huge shapes refuses to wrap", "[memory][errors]") {
  const index_t huge = index_t(1) << 33;
  CHECK_THROWS_AS(train::memory_usage(train::LayerShape{huge, huge, 8}), lora::ShapeError);
  const auto ok = train::memory_usage(train::LayerShape{1 << 20, 1 << 20, 8});
  CHECK(ok.frozen_parameters == std::uint64_t(1) << 40);
}

namespace {
using InvLayer = lora::AdaptedLinear<lora::RowMatrix<float>, lora::LowRankDelta<float>>;
InvLayer invariant_layer() {
  const index_t out = 12, in = 9, r = 3;
  InvLayer layer{lora::RowMatrix<float>::Random(out, in), Eigen::VectorXf::Random(out),
                 lora::LowRankDelta<float>{out, in, r, {.alpha = 6}}};
  layer.delta().init(lora::init::UniformBoth{}, 5);
  return layer;
}
}  // namespace

TEST_CASE("a factor or bias resized through its accessor is caught by every entry point", "[invariants][errors]") {
  using M = lora::RowMatrix<float>;
  const M X = M::Random(4, 9), G = M::Random(4, 12);
  // Each way of breaking the layer through a writable accessor.
  const std::vector<std::pair<const char*, std::function<void(InvLayer&)>>> breaks = {
      {"A wider", [](InvLayer& l) { l.delta().A().conservativeResize(3, 14); }},
      {"A taller (rank)", [](InvLayer& l) { l.delta().A().conservativeResize(4, 9); }},
      {"B taller", [](InvLayer& l) { l.delta().B().conservativeResize(20, 3); }},
      {"B narrower (rank)", [](InvLayer& l) { l.delta().B().conservativeResize(12, 2); }},
      {"bias shorter", [](InvLayer& l) { l.bias().conservativeResize(5); }},
  };
  for (const auto& [what, breaker] : breaks) {
    CAPTURE(what);
    InvLayer layer = invariant_layer();
    train::Tape<InvLayer> tape;
    M Y(4, 12), dX(4, 9);
    train::forward(layer, X, Y, tape);  // a good forward first, so backward has a tape
    breaker(layer);
    CHECK_THROWS_AS(layer.forward(X), lora::ShapeError);
    CHECK_THROWS_AS(train::forward(layer, X, Y, tape), lora::ShapeError);
    train::Gradients<InvLayer> grads(invariant_layer(), true);
    CHECK_THROWS_AS(train::backward(layer, X, G, tape, grads, dX), lora::ShapeError);
    CHECK_THROWS_AS(layer.merge(), lora::ShapeError);
    CHECK_THROWS_AS(layer.safe_merge(), lora::ShapeError);
    CHECK_THROWS_AS(lora::merged_weight(layer), lora::ShapeError);
    train::SGD<float> sgd;
    CHECK_THROWS_AS(sgd.add(layer, grads), lora::ShapeError);
  }
  // unmerge after a resize while merged: W would be corrected by the wrong term.
  InvLayer layer = invariant_layer();
  REQUIRE(layer.merge());
  layer.delta().A().conservativeResize(3, 14);
  CHECK_THROWS_AS(layer.unmerge(), lora::ShapeError);
}

TEST_CASE("optimizers detect replaced gradient storage, double registration and merged layers", "[invariants][errors]") {
  using M = lora::RowMatrix<float>;
  const M X = M::Random(4, 9), G = M::Random(4, 12);
  InvLayer layer = invariant_layer();
  train::Gradients<InvLayer> grads(layer, layer.has_bias());
  train::Tape<InvLayer> tape;
  M Y(4, 12);
  train::forward(layer, X, Y, tape);
  train::backward(layer, X, G, tape, grads);

  SECTION("assigning a temporary swaps the gradient's buffer: step refuses and updates nothing") {
    train::AdamW<float> opt;
    opt.add(layer, grads);
    const M A_before = layer.delta().A();
    M fresh = M::Zero(3, 9);
    grads.dA() = std::move(fresh);  // same shape, but Eigen's move assignment swaps the buffers
    CHECK_THROWS_WITH(opt.step(), Catch::Contains("'layer0.lora_A' or its gradient was resized or replaced"));
    CHECK(layer.delta().A() == A_before);
  }
  SECTION("assigning into the same storage is fine") {
    train::SGD<float> opt({.lr = 0.1});
    opt.add(layer, grads);
    grads.dA().setZero();
    const M A_before = layer.delta().A();
    CHECK_NOTHROW(opt.step());
    CHECK(layer.delta().A() == A_before);  // zero gradient, no decay: unchanged
    CHECK(layer.delta().B() != invariant_layer().delta().B());
  }
  SECTION("a layer registered twice would be updated twice per step") {
    train::SGD<float> opt;
    opt.add(layer, grads);
    CHECK_THROWS_WITH(opt.add(layer, grads), Catch::Contains("already registered as 'layer0.lora_A'"));
  }
  SECTION("stepping a merged layer would leave W wrong after unmerge") {
    train::SGD<float> opt;
    opt.add(layer, grads, "q_proj");
    REQUIRE(layer.merge());
    CHECK_THROWS_WITH(opt.step(), Catch::Contains("q_proj is merged"));
    REQUIRE(layer.unmerge());
    CHECK_NOTHROW(opt.step());
  }
  SECTION("one tape used for two layers") {
    InvLayer other = invariant_layer();
    train::forward(other, X, Y, tape);  // the tape now holds other's intermediates
    CHECK_THROWS_WITH(train::backward(layer, X, G, tape, grads), Catch::Contains("another layer's forward"));
  }
}

// ---- torch.optim parity: tests/fixtures/optim, written by scripts/gen_optim_fixtures.py
// from torch's single-tensor AdamW / SGD on A [2, 4] (lr) and B [4, 2] (lr * ratio).
namespace {

struct OptimCase {
  std::string name, optimizer, sqrt, lr;
  double beta1 = 0, beta2 = 0, eps = 0, weight_decay = 0, momentum = 0;
  int nesterov = 0;
  double max_grad_norm = 0, lora_plus_ratio = 1;
};

std::string optim_fixture(const std::string& file) { return std::string(LORA_TEST_FIXTURE_DIR) + "/optim/" + file; }

std::vector<OptimCase> read_optim_manifest() {
  std::ifstream in(optim_fixture("manifest.txt"));
  REQUIRE(in.good());
  std::vector<OptimCase> cases;
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty() || line[0] == '#') continue;
    std::istringstream s(line);
    OptimCase c;
    std::string b1, b2, eps, wd, mom, mx, ratio;
    s >> c.name >> c.optimizer >> c.sqrt >> c.lr >> b1 >> b2 >> eps >> wd >> mom >> c.nesterov >> mx >> ratio;
    REQUIRE(!s.fail());
    // stod is correctly rounded, and the manifest holds Python's round-trip repr.
    c.beta1 = std::stod(b1), c.beta2 = std::stod(b2), c.eps = std::stod(eps), c.weight_decay = std::stod(wd);
    c.momentum = std::stod(mom), c.max_grad_norm = std::stod(mx), c.lora_plus_ratio = std::stod(ratio);
    cases.push_back(c);
  }
  return cases;
}

template <class T>
std::vector<T> read_raw(const std::string& file, std::size_t n) {
  std::ifstream in(optim_fixture(file), std::ios::binary);
  INFO(file);
  REQUIRE(in.good());
  std::vector<T> v(n);
  in.read(reinterpret_cast<char*>(v.data()), static_cast<std::streamsize>(n * sizeof(T)));
  REQUIRE(in.gcount() == static_cast<std::streamsize>(n * sizeof(T)));
  REQUIRE(in.peek() == std::char_traits<char>::eof());
  return v;
}

// The run of one fixture case: per step, the largest |ours - torch| over the
// 16 parameters, whether all 16 are bit-identical, and the norms.
struct OptimRun {
  std::vector<double> max_diff, max_abs_param;
  std::vector<bool> identical;
  std::vector<double> norm;
};

template <class T>
OptimRun run_optim_case(const OptimCase& c, const std::vector<T>& init, const std::vector<T>& grads,
                        const std::vector<T>& expected, const std::vector<double>& lrs) {
  constexpr index_t out = 4, in = 4, r = 2, n_a = r * in, n = n_a + out * r;
  lora::AdaptedLinear layer{lora::RowMatrix<T>(lora::RowMatrix<T>::Zero(out, in)),
                            lora::LowRankDelta<T, lora::dynamic>{out, in, r}};
  using Layer = decltype(layer);
  auto& A = layer.delta().A();  // (r, in)
  auto& B = layer.delta().B();  // (out, r)
  for (index_t k = 0; k < n_a; ++k) A(k / in, k % in) = init[std::size_t(k)];
  for (index_t k = 0; k < n - n_a; ++k) B(k / r, k % r) = init[std::size_t(n_a + k)];
  train::Gradients<Layer> g(layer, false);
  auto run = [&](auto& opt) {
    opt.add(layer, g, "l");
    OptimRun res;
    for (std::size_t t = 0; t < lrs.size(); ++t) {
      const T* gt = grads.data() + t * n;
      for (index_t k = 0; k < n_a; ++k) g.dA()(k / in, k % in) = gt[k];
      for (index_t k = 0; k < n - n_a; ++k) g.dB()(k / r, k % r) = gt[n_a + k];
      opt.set_lr(lrs[t]);
      res.norm.push_back(opt.step());
      const T* want = expected.data() + t * n;
      double diff = 0, big = 0;
      bool same = true;
      for (index_t k = 0; k < n; ++k) {
        const T got = k < n_a ? A(k / in, k % in) : B((k - n_a) / r, (k - n_a) % r);
        same = same && std::memcmp(&got, &want[k], sizeof(T)) == 0;
        diff = std::max(diff, std::abs(double(got) - double(want[k])));
        big = std::max(big, std::abs(double(want[k])));
      }
      res.max_diff.push_back(diff);
      res.max_abs_param.push_back(big);
      res.identical.push_back(same);
    }
    return res;
  };
  if (c.optimizer == "adamw") {
    train::AdamW<T> opt({.lr = lrs[0], .beta1 = c.beta1, .beta2 = c.beta2, .eps = c.eps,
                         .weight_decay = c.weight_decay, .max_grad_norm = c.max_grad_norm,
                         .lora_plus_ratio = c.lora_plus_ratio});
    return run(opt);
  }
  REQUIRE(c.optimizer == "sgd");
  train::SGD<T> opt({.lr = lrs[0], .momentum = c.momentum, .weight_decay = c.weight_decay,
                     .nesterov = c.nesterov != 0, .max_grad_norm = c.max_grad_norm,
                     .lora_plus_ratio = c.lora_plus_ratio});
  return run(opt);
}

}  // namespace

TEMPLATE_TEST_CASE("AdamW and SGD match torch.optim step by step (tests/fixtures/optim)", "[optim][fixtures]", float,
                   double) {
  using T = TestType;
  constexpr std::size_t steps = 12, n = 16;
  const std::string sfx = sizeof(T) == 4 ? "f32" : "f64";
  const auto init = read_raw<T>("init." + sfx, n);
  const auto grads = read_raw<T>("grads." + sfx, steps * n);
  const auto cases = read_optim_manifest();
  REQUIRE(cases.size() == 14);
  for (const auto& c : cases) {
    INFO(c.name << " (" << sfx << ")");
    const std::vector<double> lrs =
        c.lr == "schedule" ? read_raw<double>(c.name + ".lr.f64", steps) : std::vector<double>(steps, std::stod(c.lr));
    const auto expected = read_raw<T>(c.name + "." + sfx, steps * n);
    const auto norms = c.max_grad_norm > 0 ? read_raw<T>(c.name + ".norm." + sfx, steps) : std::vector<T>{};
    const OptimRun run = run_optim_case<T>(c, init, grads, expected, lrs);
    // Bits are expected while every operation is torch's: everywhere with an
    // IEEE sqrt (SGD has none; the _ieee AdamW runs replace MKL's), and with
    // clipping until torch's float reduction rounds the norm differently from
    // ours (a double sum rounded once).
    bool exact = c.sqrt != "torch";
    for (std::size_t t = 0; t < steps; ++t) {
      INFO("step " << t + 1);
      if (!norms.empty()) {
        // torch sums the squares in T, tensor by tensor: at most an ulp or two away.
        CHECK(std::abs(run.norm[t] - double(norms[t])) <= 4 * std::numeric_limits<T>::epsilon() * run.norm[t]);
        exact = exact && static_cast<T>(run.norm[t]) == norms[t];
      }
      if (exact) {
        CHECK(run.identical[t]);
      } else {
        // Each step may round p differently once (an ulp of max(1, |p|)),
        // through torch's 1-ulp-off sqrt or a clip factor an ulp apart.
        const double ulp = std::numeric_limits<T>::epsilon() * std::max(1.0, run.max_abs_param[t]);
        CHECK(run.max_diff[t] <= double(t + 1) * ulp);
      }
    }
  }
}

TEST_CASE("a tensor added after some steps counts its own steps, as torch's per-parameter state", "[optim]") {
  // torch keeps `step` (AdamW's bias correction) and the momentum buffer per
  // parameter: a late tensor's first update is the first update of a fresh optimizer.
  lora::RowMatrix<double> x(1, 3), gx(1, 3), y(1, 3), gy(1, 3), z(1, 3), gz(1, 3);
  x << 0.5, -1.0, 2.0;
  gx << 0.1, 0.2, -0.3;
  y << 1.0, -0.5, 0.25;
  gy << -0.7, 0.4, 0.9;
  z = y;
  gz = gy;
  SECTION("AdamW") {
    train::AdamW<double> opt({.lr = 0.1}), fresh({.lr = 0.1});
    opt.add_tensor("x", x, gx);
    opt.step();
    opt.step();
    opt.add_tensor("y", y, gy);
    opt.step();
    fresh.add_tensor("z", z, gz);
    fresh.step();
    CHECK(y == z);
    CHECK(opt.parameters()[0].steps == 3);
    CHECK(opt.parameters()[1].steps == 1);
  }
  SECTION("SGD with momentum") {
    train::SGD<double> opt({.lr = 0.1, .momentum = 0.9, .nesterov = true}),
        fresh({.lr = 0.1, .momentum = 0.9, .nesterov = true});
    opt.add_tensor("x", x, gx);
    opt.step();
    opt.add_tensor("y", y, gy);
    opt.step();
    opt.step();
    fresh.add_tensor("z", z, gz);
    fresh.step();
    fresh.step();
    CHECK(y == z);
  }
}

TEST_CASE("the bias is frozen unless asked for, in gradients and memory accounting alike", "[memory]") {
  using M = lora::RowMatrix<float>;
  lora::AdaptedLinear layer{M(M::Random(8, 6)), Eigen::VectorXf::Random(8), lora::LowRankDelta<float>{8, 6, 2}};
  using L = decltype(layer);
  train::Gradients<L> frozen(layer), trained(layer, true);
  CHECK_FALSE(frozen.has_bias());
  CHECK(trained.has_bias());
  CHECK(trained.db().rows() == 8);
  // The same default on both sides: the bias counts as frozen, 8 (out) more trainable when it trains.
  const auto m = train::memory_usage(layer), mb = train::memory_usage(layer, {}, true);
  CHECK(m.trainable_parameters == 2u * (8 + 6));
  CHECK(mb.trainable_parameters == m.trainable_parameters + 8);
  train::SGD<float> opt;
  opt.add(layer, frozen);
  CHECK(opt.parameter_elements() == 2 * (8 + 6));  // A and B, no bias
}
