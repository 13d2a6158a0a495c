// DoRA (lora/dora.hpp): forward, both backward modes (norm detached as PEFT,
// and exact), dropout, merge / unmerge against a long-double dense reference
// that forms W + s B A in the test; the exact gradient against central finite
// differences; PEFT's own numbers (tests/fixtures/dora, scripts/gen_dora_fixtures.py):
// forward, gradients, merged weight and a 3-step AdamW run; 16-bit and NF4
// bases; error cases.
#include <lora/lora.hpp>
#include <lora/dora.hpp>

#include <catch2/catch.hpp>

#include "support.hpp"
#include <cmath>
#include <filesystem>
#include <limits>
#include <string>

#if __has_include(<lora/io/safetensors.hpp>) && __has_include(<nlohmann/json.hpp>)
#include <lora/io/safetensors.hpp>
#define LORA_TEST_HAVE_IO 1
#endif

namespace {

using support::fill;
using support::rel_err;

using lora::index_t;
using lora::RowMatrix;
namespace train = lora::train;
using LM = RowMatrix<long double>;
template <class T>
using Vec = Eigen::Matrix<T, Eigen::Dynamic, 1>;
template <class M>
LM ld(const M& m) {
  return m.template cast<long double>();
}

// The DoRA formulas with V = W + s B A formed, in long double. `mask` [n, in]
// holds the dropout factors (keep / (1 - p) or 0), all ones without dropout.
struct Reference {
  LM Y, V, merged, dA, dB, dX, dA_exact, dB_exact;
  Vec<long double> norm, dm, db;
};

Reference reference(const LM& W, const Vec<long double>* b, const LM& A, const LM& B, const Vec<long double>& m,
                    long double s, const LM& X, const LM& G, const LM& mask) {
  const index_t n = X.rows(), out = W.rows();
  // lazyProduct: coefficient-wise sums, no long-double GEMM kernels to compile.
  const auto mul = [](const LM& x, const LM& y) -> LM { return x.lazyProduct(y); };
  Reference r;
  r.V = W + s * mul(B, A);
  r.norm = r.V.rowwise().norm();
  const Vec<long double> c = m.array() / r.norm.array();
  const LM D = mask.cwiseProduct(X);
  const LM U = mul(D, r.V.transpose());  // (n, out) D W^T + s D A^T B^T
  r.Y = mul(X - D, W.transpose()) + U * c.asDiagonal();
  if (b) r.Y.rowwise() += b->transpose();
  r.merged = c.asDiagonal() * r.V;
  // dL/dm, and dL/dV split into the part through the direction (direct) and
  // through the norm: dn_i / dV_ij = V_ij / n_i, dL/dn_i = -c_i gu_i / n_i.
  const Vec<long double> gu = G.cwiseProduct(U).colwise().sum().transpose();
  r.dm = gu.array() / r.norm.array();
  const LM direct = c.asDiagonal() * mul(G.transpose(), D);  // (out, in)
  const Vec<long double> k = -(c.array() * gu.array()) / (r.norm.array() * r.norm.array());
  const LM through_norm = k.asDiagonal() * r.V;
  r.dA = s * mul(B.transpose(), direct);
  r.dB = s * mul(direct, A.transpose());
  r.dA_exact = s * mul(B.transpose(), direct + through_norm);
  r.dB_exact = s * mul(direct + through_norm, A.transpose());
  const LM GW = mul(G, W), GcV = mul(G * c.asDiagonal(), r.V);
  r.dX = GW + mask.cwiseProduct(GcV - GW);
  r.db = G.colwise().sum().transpose();
  (void)n;
  (void)out;
  return r;
}

template <class Layer>
Reference reference_of(const Layer& layer, const LM& X, const LM& G, const LM& mask) {
  const auto& d = layer.delta();
  const Vec<long double> b = layer.bias().template cast<long double>();
  return reference(ld(layer.base_weight()), layer.has_bias() ? &b : nullptr, ld(d.A()), ld(d.B()),
                   d.magnitude().template cast<long double>(), (long double)d.scale(), X, G, mask);
}

// A double layer, dynamic rank: out 24, in 40, r 5, B != 0, m perturbed from
// the row norms so the row scale matters.
template <class T, int R = lora::dynamic>
auto make_layer(bool bias, std::uint64_t seed, index_t out = 24, index_t in = 40, index_t r = 5) {
  RowMatrix<T> W(out, in);
  fill(W, seed);
  lora::LowRankDelta<T, R> delta{out, in, r, {.alpha = 7.0}};
  fill(delta.A(), seed + 1);
  fill(delta.B(), seed + 2);
  Vec<T> b(bias ? out : 0);
  fill(b, seed + 3);
  lora::DoRALinear layer{std::move(W), std::move(b), std::move(delta)};
  Vec<T> m = layer.magnitude();
  Vec<T> f(out);
  fill(f, seed + 4, 0.7, 1.3);
  layer.delta().set_magnitude(m.cwiseProduct(f));
  return layer;
}

}  // namespace

TEST_CASE("DoRA forward and the norm identity against the dense long-double reference", "[dora]") {
  for (bool bias : {true, false}) {
    auto layer = make_layer<double>(bias, 11);
    RowMatrix<double> X(7, 40);
    fill(X, 12);
    const LM ones = LM::Ones(7, 40);
    const Reference ref = reference_of(layer, ld(X), LM::Zero(7, 24), ones);
    // m at construction: PEFT's update_layer, the row norms of W + s B A.
    lora::DoRALinear fresh{layer.base_weight(), layer.bias(), layer.delta().low_rank()};
    CHECK(rel_err(fresh.magnitude(), ref.norm) < 1e-14);
    CHECK(rel_err(layer.weight_norm(), ref.norm) < 1e-14);
    const RowMatrix<double> Y = layer.forward(X);
    CHECK(rel_err(Y, ref.Y) < 1e-14);
    CHECK(rel_err(layer.merged_weight(), ref.merged) < 1e-14);
    // Inference with the norm cached: the same Y; m still read per call.
    layer.cache_weight_norm();
    CHECK(layer.weight_norm_cached());
    CHECK(rel_err(layer.forward(X), ref.Y) < 1e-14);
    Vec<double> m2 = 2 * layer.magnitude();
    layer.delta().set_magnitude(m2);
    RowMatrix<double> Y2 = layer.forward(X);
    if (bias) Y2.rowwise() -= layer.bias().transpose();
    LM Yref2 = ref.Y;
    if (bias) Yref2.rowwise() -= layer.bias().cast<long double>().transpose();
    CHECK(rel_err(Y2, 2 * Yref2) < 1e-14);
    layer.clear_weight_norm_cache();
    RowMatrix<double> Y3 = layer.forward(X);
    if (bias) Y3.rowwise() -= layer.bias().transpose();
    CHECK(rel_err(Y3, 2 * Yref2) < 1e-14);
  }
  // float, static rank: the bound is float rounding over in = 40 terms.
  auto lf = make_layer<float, 4>(true, 21, 24, 40, 4);
  RowMatrix<float> X(3, 40);
  fill(X, 22);
  const Reference ref = reference_of(lf, ld(X), LM::Zero(3, 24), LM::Ones(3, 40));
  CHECK(rel_err(lf.forward(X), ref.Y) < 2e-6);
  CHECK(rel_err(lf.weight_norm(), ref.norm) < 2e-6);
  // B = 0 (the usual start): m = ||W_i|| and the layer is the base layer.
  RowMatrix<float> W(24, 40);
  fill(W, 23);
  lora::LowRankDelta<float, 4> zero_b{24, 40, {.alpha = 7.0}};
  fill(zero_b.A(), 24);
  lora::DoRALinear l0{W, zero_b};
  CHECK(rel_err(l0.magnitude(), W.cast<double>().rowwise().norm()) < 1e-6);
  CHECK(rel_err(l0.forward(X), RowMatrix<double>(X.cast<double>().lazyProduct(W.cast<double>().transpose()))) < 2e-6);
  CHECK(rel_err(l0.base_squared_norms(), W.cast<double>().rowwise().squaredNorm()) < 1e-7);
}

TEST_CASE("DoRA backward, norm detached (PEFT) and exact, against the reference", "[dora]") {
  for (bool bias : {true, false})
    for (auto mode : {lora::NormGradient::detached, lora::NormGradient::exact}) {
      auto layer = make_layer<double>(bias, 31);
      layer.set_norm_gradient(mode);
      RowMatrix<double> X(6, 40), G(6, 24);
      fill(X, 32);
      fill(G, 33);
      const Reference ref = reference_of(layer, ld(X), ld(G), LM::Ones(6, 40));
      train::Tape<decltype(layer)> tape;
      train::Gradients<decltype(layer)> grads(layer, bias);
      RowMatrix<double> Y(6, 24), dX(6, 40);
      train::forward(layer, X, Y, tape);
      CHECK(rel_err(Y, ref.Y) < 1e-14);
      train::backward(layer, X, G, tape, grads, dX);
      const bool exact = mode == lora::NormGradient::exact;
      CHECK(rel_err(grads.dA(), exact ? ref.dA_exact : ref.dA) < 1e-13);
      CHECK(rel_err(grads.dB(), exact ? ref.dB_exact : ref.dB) < 1e-13);
      CHECK(rel_err(grads.adapter().dm(), ref.dm) < 1e-13);
      CHECK(rel_err(dX, ref.dX) < 1e-13);
      if (bias) CHECK(rel_err(grads.db(), ref.db) < 1e-14);
      // Without dX (exact: the Q^T rows alone through W), then accumulation.
      const RowMatrix<double> dA1 = grads.dA(), dB1 = grads.dB();
      const Vec<double> dm1 = grads.adapter().dm();
      train::backward(layer, X, G, tape, grads, train::BackwardOptions{.accumulate = true});
      CHECK(rel_err(grads.dA(), 2 * dA1) < 1e-14);
      CHECK(rel_err(grads.dB(), 2 * dB1) < 1e-14);
      CHECK(rel_err(grads.adapter().dm(), 2 * dm1) < 1e-14);
      RowMatrix<double> dX2 = dX;
      train::backward(layer, X, G, tape, grads, dX2, train::BackwardOptions{.accumulate_dx = true});
      CHECK(rel_err(dX2, 2 * dX) < 1e-14);
    }
  // float, static rank.
  auto lf = make_layer<float, 4>(true, 41, 24, 40, 4);
  lf.set_norm_gradient(lora::NormGradient::exact);
  RowMatrix<float> X(4, 40), G(4, 24), Y(4, 24), dX(4, 40);
  fill(X, 42);
  fill(G, 43);
  const Reference ref = reference_of(lf, ld(X), ld(G), LM::Ones(4, 40));
  train::Tape<decltype(lf)> tape;
  train::Gradients<decltype(lf)> grads(lf);
  train::forward(lf, X, Y, tape);
  train::backward(lf, X, G, tape, grads, dX);
  CHECK(rel_err(grads.dA(), ref.dA_exact) < 1e-5);
  CHECK(rel_err(grads.dB(), ref.dB_exact) < 1e-5);
  CHECK(rel_err(grads.adapter().dm(), ref.dm) < 1e-5);
  CHECK(rel_err(dX, ref.dX) < 1e-5);
  // The tape holds nothing [out, in]: X|A and G c|Q^T stacked against in and
  // out, H and (G c) B, A A^T, B A A^T, the norm, m / n and dm, and the
  // evaluator's [n + r, r] scratch.
  const index_t n = 4, r = 4, in = 40, out = 24;
  CHECK(tape.capacity() == 2 * (n + r) * (in + out) + 2 * n * r + r * r + out * r + 3 * out + (n + r) * r);
}

TEST_CASE("DoRA exact gradient against central finite differences (double)", "[dora]") {
  for (double p : {0.0, 0.3}) {
    auto layer = make_layer<double>(true, 51, 10, 14, 3);
    layer.set_norm_gradient(lora::NormGradient::exact);
    RowMatrix<double> X(4, 14), G(4, 10), Y(4, 10), dX(4, 14);
    fill(X, 52);
    fill(G, 53);
    train::Dropout drop(p, 99);
    const std::uint64_t step = 5;
    train::Tape<decltype(layer)> tape;
    train::Gradients<decltype(layer)> grads(layer, true);
    train::forward(layer, X, Y, tape, drop, step);
    train::backward(layer, X, G, tape, grads, dX);
    const auto loss = [&] {
      RowMatrix<double> y(4, 10);
      train::Tape<decltype(layer)> t;
      train::forward(layer, X, y, t, drop, step);
      return (long double)(y.cwiseProduct(G)).sum();
    };
    const auto fd = [&](auto& param) {
      RowMatrix<double> d(param.rows(), param.cols());
      const double h = 1e-6;
      for (index_t i = 0; i < param.rows(); ++i)
        for (index_t j = 0; j < param.cols(); ++j) {
          const double keep = param(i, j);
          param(i, j) = keep + h;
          const long double up = loss();
          param(i, j) = keep - h;
          const long double down = loss();
          param(i, j) = keep;
          d(i, j) = double((up - down) / (2 * h));
        }
      return d;
    };
    CHECK(rel_err(grads.dA(), fd(layer.delta().A())) < 1e-7);
    CHECK(rel_err(grads.dB(), fd(layer.delta().B())) < 1e-7);
    CHECK(rel_err(grads.adapter().dm(), fd(layer.delta().magnitude())) < 1e-7);
    CHECK(rel_err(grads.db(), fd(layer.bias())) < 1e-7);
    CHECK(rel_err(dX, fd(X)) < 1e-7);
  }
}

TEST_CASE("DoRA with dropout follows PEFT's placement", "[dora]") {
  for (auto mode : {lora::NormGradient::detached, lora::NormGradient::exact}) {
    auto layer = make_layer<double>(true, 61);
    layer.set_norm_gradient(mode);
    RowMatrix<double> X(5, 40), G(5, 24), Y(5, 24), dX(5, 40);
    fill(X, 62);
    fill(G, 63);
    train::Dropout drop(0.25, 7);
    const std::uint64_t step = 3;
    LM mask(5, 40);
    for (index_t t = 0; t < 5; ++t)
      for (index_t i = 0; i < 40; ++i) mask(t, i) = drop.keeps(step, t, i, 40) ? 1.0L / 0.75L : 0.0L;
    const Reference ref = reference_of(layer, ld(X), ld(G), mask);
    train::Tape<decltype(layer)> tape;
    train::Gradients<decltype(layer)> grads(layer);
    train::forward(layer, X, Y, tape, drop, step);
    CHECK(tape.dropped());
    CHECK(rel_err(Y, ref.Y) < 1e-14);
    train::backward(layer, X, G, tape, grads, dX);
    const bool exact = mode == lora::NormGradient::exact;
    CHECK(rel_err(grads.dA(), exact ? ref.dA_exact : ref.dA) < 1e-13);
    CHECK(rel_err(grads.dB(), exact ? ref.dB_exact : ref.dB) < 1e-13);
    CHECK(rel_err(grads.adapter().dm(), ref.dm) < 1e-13);
    CHECK(rel_err(dX, ref.dX) < 1e-13);
    // Evaluation mode: the plain forward.
    drop.eval();
    train::forward(layer, X, Y, tape, drop, step);
    CHECK_FALSE(tape.dropped());
    CHECK(rel_err(Y, layer.forward(X)) < 1e-15);
  }
}

TEST_CASE("DoRA merge / unmerge, writable and read-only bases", "[dora]") {
  auto layer = make_layer<double>(true, 71);
  RowMatrix<double> X(3, 40);
  fill(X, 72);
  const Reference ref = reference_of(layer, ld(X), LM::Zero(3, 24), LM::Ones(3, 40));
  const RowMatrix<double> W0 = layer.base_weight();
  const RowMatrix<double> Y0 = layer.forward(X);
  CHECK(layer.merge());
  CHECK_FALSE(layer.merge());
  CHECK(layer.merged());
  CHECK(rel_err(layer.base_weight(), ref.merged) < 1e-14);
  CHECK(rel_err(layer.merged_weight(), ref.merged) < 1e-14);
  CHECK(rel_err(layer.forward(X), Y0) < 1e-14);
  // Training a merged layer is refused.
  train::Tape<decltype(layer)> tape;
  RowMatrix<double> Y(3, 24);
  CHECK_THROWS_AS(train::forward(layer, X, Y, tape), lora::ValueError);
  CHECK(layer.unmerge());
  CHECK_FALSE(layer.unmerge());
  CHECK(rel_err(layer.base_weight(), W0) < 1e-14);
  CHECK(rel_err(layer.forward(X), Y0) < 1e-14);

  // A writable Map over the caller's buffer; a const Map gives merged_weight().
  RowMatrix<float> buf(24, 40);
  fill(buf, 73);
  lora::LowRankDelta<float, 4> d{24, 40, {.alpha = 7.0}};
  fill(d.A(), 74);
  fill(d.B(), 75);
  Eigen::Map<const RowMatrix<float>> cview(buf.data(), 24, 40);
  lora::DoRALinear ro{cview, d};
  const RowMatrix<float> merged_ro = ro.merged_weight();
  const RowMatrix<float> keep = buf;
  Eigen::Map<RowMatrix<float>> view(buf.data(), 24, 40);
  lora::DoRALinear rw{view, d};
  REQUIRE(rw.merge());
  CHECK(rel_err(buf, merged_ro) < 1e-6);
  REQUIRE(rw.unmerge());
  CHECK(rel_err(buf, keep) < 1e-6);

  // m_i = 0 could not be undone: refused, W untouched.
  const RowMatrix<double> W1 = layer.base_weight();
  Vec<double> m = layer.magnitude();
  m(4) = 0;
  layer.delta().set_magnitude(m);
  CHECK_THROWS_AS(layer.merge(), lora::NumericError);
  CHECK_THROWS_WITH(layer.safe_merge(), Catch::Contains("DoRALinear::merge: m / ||W + s B A|| is 0 at row 4"));
  CHECK_FALSE(layer.merged());
  CHECK(layer.base_weight() == W1);
}

TEST_CASE("DoRA over 16-bit and NF4 bases", "[dora]") {
  RowMatrix<float> W(24, 64);
  fill(W, 81);
  lora::LowRankDelta<float, 4> d{24, 64, {.alpha = 8.0}};
  fill(d.A(), 82);
  fill(d.B(), 83);
  RowMatrix<float> X(5, 64), G(5, 24);
  fill(X, 84);
  fill(G, 85);
  const auto check = [&](const auto& base, const RowMatrix<float>& decoded) {
    lora::DoRALinear layer{base, d};
    lora::DoRALinear dense{decoded, d};
    CHECK(rel_err(layer.base_squared_norms(), dense.base_squared_norms()) < 1e-6);
    CHECK(rel_err(layer.magnitude(), dense.magnitude()) < 1e-6);
    CHECK(rel_err(layer.forward(X), dense.forward(X)) < 1e-5);
    CHECK(rel_err(layer.merged_weight(), dense.merged_weight()) < 1e-6);
    layer.set_norm_gradient(lora::NormGradient::exact);
    dense.set_norm_gradient(lora::NormGradient::exact);
    RowMatrix<float> Y(5, 24), dX1(5, 64), dX2(5, 64);
    train::Tape<decltype(layer)> t1;
    train::Tape<decltype(dense)> t2;
    train::Gradients<decltype(layer)> g1(layer);
    train::Gradients<decltype(dense)> g2(dense);
    train::forward(layer, X, Y, t1);
    train::backward(layer, X, G, t1, g1, dX1);
    train::forward(dense, X, Y, t2);
    train::backward(dense, X, G, t2, g2, dX2);
    CHECK(rel_err(g1.dA(), g2.dA()) < 1e-5);
    CHECK(rel_err(g1.dB(), g2.dB()) < 1e-5);
    CHECK(rel_err(g1.adapter().dm(), g2.adapter().dm()) < 1e-5);
    CHECK(rel_err(dX1, dX2) < 1e-5);
  };
  const RowMatrix<Eigen::bfloat16> Wb = W.cast<Eigen::bfloat16>();
  check(Wb, Wb.cast<float>());
  const lora::NF4Matrix Wq = lora::NF4Matrix::quantize(W);
  check(Wq, Wq.dequantize());
}

TEST_CASE("DoRA parameters register with the optimizers", "[dora]") {
  auto layer = make_layer<float, 4>(true, 91, 6, 8, 4);
  train::Gradients<decltype(layer)> grads(layer, true);
  train::AdamW<float> opt;
  opt.add(layer, grads, "proj");
  REQUIRE(opt.parameters().size() == 4);
  CHECK(opt.parameters()[0].name == "proj.lora_A");
  CHECK(opt.parameters()[1].name == "proj.lora_B");
  CHECK(opt.parameters()[2].name == "proj.lora_magnitude_vector");
  CHECK(opt.parameters()[3].name == "proj.bias");
  CHECK(opt.parameter_elements() == 4 * (8 + 6) + 6 + 6);
  CHECK(layer.delta().trainable_parameters() == 4 * (8 + 6) + 6);
  // A step moves m.
  const Vec<float> m0 = layer.magnitude();
  grads.adapter().dm().setConstant(1.0f);
  opt.step();
  CHECK((layer.magnitude() - m0).cwiseAbs().minCoeff() > 0);
  // A merged layer is refused by the optimizer as by AdaptedLinear.
  REQUIRE(layer.merge());
  CHECK_THROWS_AS(opt.step(), lora::ValueError);
}

TEST_CASE("DoRA errors name the function and the values", "[dora]") {
  RowMatrix<double> W(6, 8);
  fill(W, 101);
  lora::LowRankDelta<double> d{6, 8, 2, {.alpha = 2.0}};
  CHECK_THROWS_AS((lora::DoRALinear{W, d, Vec<double>(Vec<double>::Ones(5))}), lora::ShapeError);
  Vec<double> bad = Vec<double>::Ones(6);
  bad(2) = std::numeric_limits<double>::quiet_NaN();
  CHECK_THROWS_AS((lora::DoRALinear{W, d, bad}), lora::NumericError);
  bad(2) = std::numeric_limits<double>::infinity();
  CHECK_THROWS_WITH((lora::DoRALinear{W, d, bad}), Catch::Contains("not finite at row 2"));
  CHECK_THROWS_AS((lora::DoRALinear{W, lora::LowRankDelta<double>{7, 8, 2}}), lora::ShapeError);
  CHECK_THROWS_AS((lora::DoRALinear{W, Vec<double>(Vec<double>::Ones(3)), d}), lora::ShapeError);

  lora::DoRALinear layer{W, d};
  CHECK_THROWS_AS(layer.delta().set_magnitude(Vec<double>::Ones(7)), lora::ShapeError);
  RowMatrix<double> X(3, 7), Y(3, 6), X8(3, 8), Ybad(2, 6);
  CHECK_THROWS_WITH(layer.forward(X, Y), Catch::Contains("DoRALinear::forward: X has 7 columns"));
  CHECK_THROWS_AS(layer.forward(X8, Ybad), lora::ShapeError);

  train::Tape<decltype(layer)> tape;
  train::Gradients<decltype(layer)> grads(layer);
  RowMatrix<double> G(3, 6), Gbad(3, 5);
  CHECK_THROWS_WITH(train::backward(layer, X8, G, tape, grads), Catch::Contains("the tape is empty"));
  train::forward(layer, X8, Y, tape);
  CHECK_THROWS_AS(train::backward(layer, X8, Gbad, tape, grads), lora::ShapeError);
  lora::DoRALinear other{W, d};
  CHECK_THROWS_AS(train::backward(other, X8, G, tape, grads), lora::ValueError);
  // A resized magnitude is caught before it is read.
  layer.delta().magnitude().resize(4);
  CHECK_THROWS_WITH(layer.forward(X8, Y), Catch::Contains("the magnitude m has 4 entries"));
}

#ifdef LORA_TEST_HAVE_IO
TEST_CASE("DoRA reproduces PEFT (use_dora=True): forward, gradients, merge, AdamW", "[dora][peft]") {
  namespace fs = std::filesystem;
  const fs::path dir = fs::path(LORA_TEST_FIXTURE_DIR) / "dora";
  using M = RowMatrix<float>;
  for (const char* name : {"bias", "nobias", "rslora"}) {
    SECTION(name) {
      const auto f = lora::io::SafetensorsFile::open(dir / (std::string(name) + ".safetensors"));
      const bool rslora = std::string(name) == "rslora", bias = std::string(name) != "nobias";
      const auto vec = [&](const std::string& key) -> Vec<float> {
        const M v = f.read<float>(key);
        return Eigen::Map<const Vec<float>>(v.data(), v.size());
      };
      const M W = f.read<float>("W"), X = f.read<float>("x"), G = f.read<float>("g");
      lora::LowRankDelta<float, 4> delta{12, 16,
                                         {.alpha = 8.0, .rule = rslora ? lora::Scaling::rslora : lora::Scaling::standard}};
      delta.A() = f.read<float>("A");
      delta.B() = f.read<float>("B");
      const Vec<float> b = bias ? vec("b") : Vec<float>();
      // PEFT's initial magnitude: the row norms of W + s B A (B != 0 here).
      lora::DoRALinear layer{W, b, delta};
      CHECK(rel_err(layer.magnitude(), vec("m_init")) < 1e-6);
      layer.delta().set_magnitude(vec("m"));

      M Y(5, 12), dX(5, 16);
      train::Tape<decltype(layer)> tape;
      train::Gradients<decltype(layer)> grads(layer);
      train::forward(layer, X, Y, tape);
      CHECK(rel_err(Y, f.read<float>("y")) < 1e-6);
      // A checkpoint's magnitude given at construction: the same layer.
      const lora::DoRALinear loaded{W, b, delta, vec("m")};
      CHECK(loaded.forward(X) == layer.forward(X));
      train::backward(layer, X, G, tape, grads, dX);
      CHECK(rel_err(grads.dA(), f.read<float>("dA")) < 1e-5);
      CHECK(rel_err(grads.dB(), f.read<float>("dB")) < 1e-5);
      CHECK(rel_err(grads.adapter().dm(), vec("dm")) < 1e-5);
      CHECK(rel_err(dX, f.read<float>("dx")) < 1e-5);
      CHECK(rel_err(layer.merged_weight(), f.read<float>("merged")) < 1e-6);

      layer.set_norm_gradient(lora::NormGradient::exact);
      train::backward(layer, X, G, tape, grads);
      CHECK(rel_err(grads.dA(), f.read<float>("exact.dA")) < 1e-5);
      CHECK(rel_err(grads.dB(), f.read<float>("exact.dB")) < 1e-5);
      CHECK(rel_err(grads.adapter().dm(), vec("exact.dm")) < 1e-5);
      layer.set_norm_gradient(lora::NormGradient::detached);

      // torch.optim.AdamW (foreach=False) on A, B, m, three steps.
      const auto meta = [&](const char* key) { return std::stod(f.metadata().at(key)); };
      train::AdamW<float> opt({.lr = meta("lr"),
                               .beta1 = meta("beta1"),
                               .beta2 = meta("beta2"),
                               .eps = meta("eps"),
                               .weight_decay = meta("weight_decay")});
      opt.add(layer, grads);
      for (int step = 1; step <= 3; ++step) {
        train::forward(layer, X, Y, tape);
        train::backward(layer, X, G, tape, grads);
        opt.step();
        const std::string p = "adamw.step" + std::to_string(step) + ".";
        CHECK(rel_err(layer.delta().A(), f.read<float>(p + "A")) < 1e-5);
        CHECK(rel_err(layer.delta().B(), f.read<float>(p + "B")) < 1e-5);
        CHECK(rel_err(layer.magnitude(), vec(p + "m")) < 1e-5);
      }
    }
  }
}
#endif
