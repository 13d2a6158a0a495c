// Initialisation: the counter-based RNG, loralib's default, gaussian, the
// truncated-SVD fit of a dense delta (Eckart-Young) and PiSSA.
#include <lora/lora.hpp>

#include <Eigen/SVD>
#include <catch2/catch.hpp>
#include <cmath>

using lora::index_t;

TEST_CASE("mix64 is splitmix64's finaliser (published first output)", "[rng]") {
  // splitmix64 from state 0: first output 0xe220a8397b1dcdaf (Vigna's reference).
  CHECK(lora::detail::mix64(0x9e3779b97f4a7c15ULL) == 0xe220a8397b1dcdafULL);
  // Different streams and counters give different bits; the same ones repeat.
  CHECK(lora::detail::random_bits(1, 0, 0) != lora::detail::random_bits(1, 1, 0));
  CHECK(lora::detail::random_bits(1, 0, 0) != lora::detail::random_bits(2, 0, 0));
  CHECK(lora::detail::random_bits(1, 0, 5) == lora::detail::random_bits(1, 0, 5));
}

TEMPLATE_TEST_CASE("KaimingZero: A ~ U(-1/sqrt(in), 1/sqrt(in)), B = 0", "[init]", float, double) {
  const index_t out = 96, in = 400, r = 32;
  lora::LowRankDelta<TestType> d(out, in, r);
  d.init(lora::init::KaimingZero{}, 42);
  const double bound = 1.0 / std::sqrt(double(in));
  const auto& A = d.A();
  CHECK(A.cwiseAbs().maxCoeff() <= bound);
  CHECK(d.B().isZero(0));
  // Moments of U(-b, b): mean 0, variance b^2 / 3; 12,800 samples give a
  // standard error of the mean of b / sqrt(3 * 12800) ~ 0.005 b.
  const double mean = A.template cast<double>().mean();
  const double var = (A.template cast<double>().array() - mean).square().mean();
  CHECK(std::abs(mean) < 0.03 * bound);
  CHECK(var == Approx(bound * bound / 3).epsilon(0.05));

  lora::LowRankDelta<TestType> again(out, in, r), other(out, in, r);
  again.init(lora::init::KaimingZero{}, 42);
  other.init(lora::init::KaimingZero{}, 43);
  CHECK(again.A() == d.A());  // reproducible
  CHECK(other.A() != d.A());
}

TEST_CASE("the default init leaves the layer equal to its base", "[init]") {
  lora::RowMatrix<float> W = lora::RowMatrix<float>::Random(20, 30), X = lora::RowMatrix<float>::Random(4, 30);
  lora::AdaptedLinear layer{W, lora::LowRankDelta<float, 4>{20, 30, {.alpha = 8}}};
  layer.delta().init(lora::init::KaimingZero{}, 1);
  const lora::RowMatrix<float> base = X * W.transpose();
  CHECK(layer.forward(X) == base);
}

TEST_CASE("gaussian: A ~ N(0, 1/r^2), B = 0", "[init]") {
  const index_t r = 8;
  lora::LowRankDelta<double, r> d(512, 600);
  d.init(lora::init::Gaussian{}, 3);
  const Eigen::ArrayXXd a = d.A().array();
  const double mean = a.mean(), sd = std::sqrt((a - mean).square().mean());
  CHECK(std::abs(mean) < 0.01);          // SE = (1/8) / sqrt(4800) ~ 0.0018
  CHECK(sd == Approx(1.0 / r).epsilon(0.03));
  CHECK(d.B().isZero(0));
}

TEST_CASE("FromDense reproduces a rank-k delta for r >= k", "[init][svd]") {
  const index_t out = 40, in = 30, k = 3;
  const lora::RowMatrix<double> B0 = lora::RowMatrix<double>::Random(out, k);
  const lora::RowMatrix<double> A0 = lora::RowMatrix<double>::Random(k, in);
  const lora::RowMatrix<double> dW = B0 * A0;
  for (index_t r : {3, 5}) {
    lora::LowRankDelta<double> d(out, in, r, {.alpha = 2.0 * r});
    const auto rep = d.init(lora::init::FromDense{dW});
    const lora::RowMatrix<double> approx = d.scale() * d.B() * d.A();
    CHECK((approx - dW).norm() < 1e-10 * dW.norm());
    CHECK(rep.kept_energy == Approx(1.0).margin(1e-12));
    CHECK(rep.singular_values.size() == 30);
  }
}

TEST_CASE("FromDense meets the Eckart-Young error for r < k", "[init][svd]") {
  const index_t out = 25, in = 35;
  const lora::RowMatrix<double> dW = lora::RowMatrix<double>::Random(out, in);  // full rank 25
  const Eigen::JacobiSVD<Eigen::MatrixXd> ref(dW);  // independent reference SVD
  const Eigen::VectorXd sv = ref.singularValues();
  for (index_t r : {1, 4, 10}) {
    lora::LowRankDelta<float> d(out, in, r, {.alpha = 16});
    const auto rep = d.init(lora::init::FromDense{dW.cast<float>().eval()});
    const Eigen::MatrixXd approx = d.scale() * (d.B().cast<double>() * d.A().cast<double>());
    const double err = (dW - approx).norm(), best = std::sqrt(sv.tail(sv.size() - r).squaredNorm());
    CHECK(err == Approx(best).epsilon(1e-4));  // float factors
    CHECK(rep.residual_norm == Approx(best).epsilon(1e-5));
    CHECK(rep.kept_energy == Approx(sv.head(r).squaredNorm() / sv.squaredNorm()).epsilon(1e-5));
  }
}

TEST_CASE("PiSSA: residual base + adapter reproduces W", "[init][pissa]") {
  const index_t out = 30, in = 22, r = 4, n = 6;
  lora::RowMatrix<double> W = lora::RowMatrix<double>::Random(out, in);
  const lora::RowMatrix<double> original = W, X = lora::RowMatrix<double>::Random(n, in);
  lora::AdaptedLinear layer{W, lora::LowRankDelta<double, r>{out, in, {.alpha = 8}}};
  const auto rep = lora::init::pissa(layer);
  const lora::RowMatrix<double> rebuilt = layer.base_weight() + layer.delta().scale() * layer.delta().B() * layer.delta().A();
  CHECK((rebuilt - original).cwiseAbs().maxCoeff() < 1e-12);
  CHECK((layer.forward(X) - X * original.transpose()).cwiseAbs().maxCoeff() < 1e-12);
  // A = sqrt(S_r / s) V_r^T, so A A^T = diag(S_r / s).
  const Eigen::JacobiSVD<Eigen::MatrixXd> ref(original);
  const Eigen::MatrixXd AAt = layer.delta().A() * layer.delta().A().transpose();
  for (index_t i = 0; i < r; ++i) CHECK(AAt(i, i) == Approx(ref.singularValues()(i) / 2.0));
  CHECK(rep.kept_energy == Approx(ref.singularValues().head(r).squaredNorm() / ref.singularValues().squaredNorm()));
  // The residual holds the rest of the spectrum.
  CHECK(layer.base_weight().norm() == Approx(std::sqrt(ref.singularValues().tail(in - r).squaredNorm())));

  layer.merge();
  CHECK_THROWS_WITH(lora::init::pissa(layer), Catch::Contains("unmerge() it first"));
}

TEST_CASE("SVD inits reject bad input", "[init][errors]") {
  lora::LowRankDelta<float> d(10, 12, 2, {.alpha = 4});
  const lora::RowMatrix<float> wrong = lora::RowMatrix<float>::Zero(12, 10);
  CHECK_THROWS_WITH(d.init(lora::init::FromDense{wrong}),
                    Catch::Contains("init::FromDense: delta is [12, 10], expected [out, in] = [10, 12]"));
  d.set_multiplier(0);
  const lora::RowMatrix<float> right = lora::RowMatrix<float>::Ones(10, 12);
  CHECK_THROWS_AS(d.init(lora::init::FromDense{right}), lora::ValueError);
}
