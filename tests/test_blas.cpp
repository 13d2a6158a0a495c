// The optional OpenBLAS hand-off (backend/eigen/blas.hpp): the guard's decision,
// and every product shape the backend hands over, against long-double loops.
// Built only when CMake finds OpenBLAS, linked with lora::blas, and run with
// LORA_BLAS=on so OpenBLAS is used whatever kernel it picked for the CPU; each
// case checks the call counter, so a silent fall-back to Eigen fails the test.
// A lower work threshold keeps the long-double references quick; the depth
// threshold stays at its default (32).
#define LORA_BLAS_MIN_WORK (index_t(1) << 20)
#include <lora/lora.hpp>

#include <catch2/catch.hpp>

#include <cmath>
#include <limits>
#include <utility>
#include <string>
#include <thread>
#include <vector>

namespace {

using lora::index_t;
using lora::RowMatrix;
namespace train = lora::train;
namespace blas = lora::detail::blas;

template <class M>
void fill(M& m, std::uint64_t seed, double lo = -1.0, double hi = 1.0) {
  lora::EigenBackend::fill_random(m, lora::UniformDist{lo, hi}, seed, 3);
}

std::uint64_t calls() { return blas::call_counter().load(); }

// C = beta C0 + alpha A B in long double; |beta C0| + |alpha| |A| |B| as the scale
// of the rounding bound.
template <class MA, class MB, class MC>
void reference(long double alpha, const MA& a, const MB& b, long double beta, const MC& c0,
               RowMatrix<long double>& c, RowMatrix<long double>& mag) {
  c.resize(a.rows(), b.cols());
  mag.resize(a.rows(), b.cols());
  for (index_t i = 0; i < a.rows(); ++i)
    for (index_t j = 0; j < b.cols(); ++j) {
      long double s = 0, m = 0;
      for (index_t p = 0; p < a.cols(); ++p) {
        s += (long double)a(i, p) * (long double)b(p, j);
        m += std::fabs((long double)a(i, p) * (long double)b(p, j));
      }
      c(i, j) = alpha * s + (beta == 0 ? 0.0L : beta * (long double)c0(i, j));
      mag(i, j) = std::fabs(alpha) * m + (beta == 0 ? 0.0L : std::fabs(beta * (long double)c0(i, j)));
    }
}

// |got - want| <= (k + 2) eps mag: the classic bound for a k-term dot product
// in any summation order.
template <class T, class M>
void check_bound(const M& got, const RowMatrix<long double>& want, const RowMatrix<long double>& mag, index_t k) {
  REQUIRE(got.rows() == want.rows());
  REQUIRE(got.cols() == want.cols());
  const long double eps = std::numeric_limits<T>::epsilon();
  long double worst = 0;
  for (index_t i = 0; i < got.rows(); ++i)
    for (index_t j = 0; j < got.cols(); ++j) {
      const long double err = std::fabs((long double)got(i, j) - want(i, j));
      const long double bound = (k + 2) * eps * mag(i, j) + std::numeric_limits<T>::min();
      worst = std::max(worst, err / bound);
    }
  CHECK(worst <= 1.0L);
}

}  // namespace

TEST_CASE("blas: the guard keeps Eigen when OpenBLAS's kernel is below the compiled ISA") {
  // The case this machine hits: OpenBLAS 0.3.21 does not know the CPU, picks
  // Prescott (SSE3), and the program's Eigen uses AVX-512.
  auto s = blas::decide(true, "Prescott", 3, nullptr);
  CHECK_FALSE(s.active);
  CHECK(s.reason.find("Prescott") != std::string::npos);
  CHECK(s.reason.find("OPENBLAS_CORETYPE") != std::string::npos);
  CHECK(blas::decide(true, "SkylakeX", 3, nullptr).active);
  CHECK(blas::decide(true, "SAPPHIRERAPIDS", 3, nullptr).active);  // names compare case-blind
  CHECK_FALSE(blas::decide(true, "Haswell", 3, nullptr).active);   // AVX2 kernel under AVX-512 Eigen
  CHECK(blas::decide(true, "Haswell", 2, nullptr).active);
  CHECK(blas::decide(true, "Prescott", 1, nullptr).active);  // an SSE build: nothing to lose
  // The environment overrides the guard either way.
  CHECK(blas::decide(true, "Prescott", 3, "on").active);
  CHECK(blas::decide(true, "Prescott", 3, "1").active);
  CHECK_FALSE(blas::decide(true, "SkylakeX", 3, "off").active);
  CHECK_FALSE(blas::decide(true, "SkylakeX", 3, "0").active);
  s = blas::decide(true, "SkylakeX", 3, "yes");
  CHECK_FALSE(s.active);
  CHECK(s.reason.find("LORA_BLAS=yes is not one of") != std::string::npos);
  CHECK_FALSE(blas::decide(false, "", 3, "on").active);  // not compiled in: nothing to turn on
  CHECK(blas::core_isa_level("Zen") == 2);
}

TEST_CASE("blas: this test runs with the hand-off active") {
  const auto& s = lora::blas_info();
  INFO(s.reason);
  REQUIRE(s.compiled);
  REQUIRE(s.active);  // CTest sets LORA_BLAS=on
  CHECK(!s.core.empty());
}

TEMPLATE_TEST_CASE("blas: backend products of every layout, odd sizes, alpha and beta", "", float, double) {
  using T = TestType;
  using eb = lora::EigenBackend;
  // Depth >= LORA_BLAS_MIN_DEPTH and m n k >= LORA_BLAS_MIN_WORK, all odd.
  // n above the skinny kernel's token limit, so gemm_nt reaches OpenBLAS too.
  const index_t n = GENERATE(as<index_t>{}, LORA_EIGEN_SKINNY_MAX_TOKENS + 3, 300), in = 259, out = 263;
  const auto [alpha, beta] = GENERATE(std::pair{T(1), T(0)}, std::pair{T(-0.75), T(0.5)}, std::pair{T(1), T(1)});
  CAPTURE(n, alpha, beta);
  RowMatrix<long double> want, mag;

  SECTION("gemm_nt: Y = beta Y + alpha X W^T into a column block of a wider Y") {
    RowMatrix<T> X(n, in), W(out, in), big(n, out + 9);
    fill(X, 1);
    fill(W, 2);
    fill(big, 3);
    if (beta == T(0)) big.setConstant(std::numeric_limits<T>::quiet_NaN());  // beta = 0 must not read Y
    const RowMatrix<T> y0 = big.middleCols(4, out);
    const auto before = calls();
    eb::gemm_nt(alpha, X, W, beta, big.middleCols(4, out));
    CHECK(calls() == before + 1);
    reference(alpha, X, W.transpose(), beta, y0, want, mag);
    check_bound<T>(big.middleCols(4, out), want, mag, in);
    if (beta != T(0)) {  // the columns around the block are untouched
      const RowMatrix<T> left = big.leftCols(4);
      RowMatrix<T> again(n, out + 9);
      fill(again, 3);
      CHECK(left == again.leftCols(4));
      CHECK(big.rightCols(5) == again.rightCols(5));
    }
  }
  SECTION("gemm_nn: C = beta C + alpha A B, A a row block of a taller matrix") {
    RowMatrix<T> Abig(n + 5, out), B(out, in), C(n, in);
    fill(Abig, 4);
    fill(B, 5);
    fill(C, 6);
    const auto A = Abig.middleRows(2, n);
    const RowMatrix<T> c0 = C;
    const auto before = calls();
    eb::gemm_nn(alpha, A, B, beta, C);
    CHECK(calls() == before + 1);
    reference(alpha, A, B, beta, c0, want, mag);
    check_bound<T>(C, want, mag, out);
  }
  SECTION("gemm_tn: C = beta C + alpha A^T B (A transposed for cblas)") {
    RowMatrix<T> A(in, n), B(in, out), C(n, out);
    fill(A, 7);
    fill(B, 8);
    fill(C, 9);
    const RowMatrix<T> c0 = C;
    const auto before = calls();
    eb::gemm_tn(alpha, A, B, beta, C);
    CHECK(calls() == before + 1);
    reference(alpha, A.transpose(), B, beta, c0, want, mag);
    check_bound<T>(C, want, mag, in);
  }
}

TEST_CASE("blas: small, thin-depth and column-major products stay with Eigen") {
  using eb = lora::EigenBackend;
  RowMatrix<float> X(40, 256), W(256, 64), Y(40, 64);  // m n k = 655,360 < LORA_BLAS_MIN_WORK
  fill(X, 1);
  fill(W, 2);
  auto before = calls();
  eb::gemm_nn(1.0f, X, W, 0.0f, Y);
  CHECK(calls() == before);
  CHECK(std::abs(Y(39, 63) - X.row(39).dot(W.col(63))) < 1e-4f);
  RowMatrix<float> B(4096, 8), A(8, 4096), D(4096, 4096);  // merge's rank-8 update: depth 8 < 32
  fill(B, 3);
  fill(A, 4);
  D.setZero();
  before = calls();
  eb::gemm_nn(1.0f, B, A, 1.0f, D);
  CHECK(calls() == before);
  CHECK(std::abs(D(17, 33) - B.row(17).dot(A.col(33))) < 1e-5f);
  Eigen::MatrixXf Ccol(300, 1029);  // column-major destination: Eigen
  RowMatrix<float> P(300, 1031), Q(1031, 1029);
  fill(P, 5);
  fill(Q, 6);
  before = calls();
  eb::gemm_nn(1.0f, P, Q, 0.0f, Ccol);
  CHECK(calls() == before);
  CHECK(std::abs(Ccol(299, 1028) - P.row(299).dot(Q.col(1028))) < 1e-3f);
}

TEST_CASE("blas: AdaptedLinear forward and backward through OpenBLAS match plain loops") {
  const index_t in = 259, out = 263, r = 8;
  const index_t n = GENERATE(as<index_t>{}, LORA_EIGEN_SKINNY_MAX_TOKENS + 3, 300);
  CAPTURE(n);
  RowMatrix<float> W(out, in);
  fill(W, 10, -0.05, 0.05);
  Eigen::VectorXf b(out);
  fill(b, 11);
  lora::LowRankDelta<float> delta(out, in, r, {.alpha = 16.0});
  fill(delta.A(), 12);
  fill(delta.B(), 13, -0.5, 0.5);
  lora::AdaptedLinear layer(W, b, delta);
  RowMatrix<float> X(n, in), G(n, out), Y(n, out), dX(n, in);
  fill(X, 14);
  fill(G, 15);

  const auto before = calls();
  layer.forward(X, Y);
  CHECK(calls() > before);  // X W^T went to OpenBLAS (n > the skinny kernel's token limit)
  // Reference: X (W + s B A)^T + b, the effective weight formed in long double.
  const long double s = layer.delta().scale();
  RowMatrix<long double> Weff = W.cast<long double>() + s * (delta.B().cast<long double>() * delta.A().cast<long double>());
  RowMatrix<long double> want, mag;
  RowMatrix<long double> bias_rows = b.cast<long double>().transpose().replicate(n, 1);
  reference(1.0L, X.cast<long double>().eval(), Weff.transpose().eval(), 1.0L, bias_rows, want, mag);
  check_bound<float>(Y, want, mag, in + 2 * r);

  using Layer = decltype(layer);
  train::Tape<Layer> tape;
  train::Gradients<Layer> grads(layer, layer.has_bias());
  train::forward(layer, X, Y, tape);
  const auto mid = calls();
  train::backward(layer, X, G, tape, grads, dX);
  CHECK(calls() > mid);  // dX = G W went to OpenBLAS (more than 32 token rows)
  reference(1.0L, G.cast<long double>().eval(), Weff, 0.0L, RowMatrix<long double>(), want, mag);
  check_bound<float>(dX, want, mag, out + 2 * r);
}

TEST_CASE("blas: merge() and unmerge() at rank >= 32 go through OpenBLAS") {
  const index_t in = 259, out = 263, r = 33;
  RowMatrix<float> W(out, in);
  fill(W, 20);
  lora::LowRankDelta<float> delta(out, in, r, {.alpha = 8.0});
  fill(delta.A(), 21);
  fill(delta.B(), 22);
  lora::AdaptedLinear layer(W, delta);
  const auto before = calls();
  REQUIRE(layer.merge());
  CHECK(calls() == before + 1);
  const long double s = layer.delta().scale();
  RowMatrix<long double> want, mag;
  reference(s, delta.B().cast<long double>().eval(), delta.A().cast<long double>().eval(), 1.0L,
            W.cast<long double>().eval(), want, mag);
  check_bound<float>(layer.base_weight(), want, mag, r);
  REQUIRE(layer.unmerge());
  CHECK(calls() == before + 2);
  // W + dW - dW: two roundings of |W| + |dW| each.
  const float worst = (layer.base_weight() - W).cwiseAbs().maxCoeff();
  CHECK(worst <= 4 * std::numeric_limits<float>::epsilon() * (W.cwiseAbs().maxCoeff() + float(mag.maxCoeff())));
}

TEST_CASE("blas: forward from several application threads at once stays correct") {
  // One thread holds OpenBLAS, the others fall back to Eigen; every result must
  // meet the same bound.
  const index_t in = 259, out = 263, n = LORA_EIGEN_SKINNY_MAX_TOKENS + 3, r = 4;
  RowMatrix<float> W(out, in);
  fill(W, 30);
  lora::LowRankDelta<float> delta(out, in, r, {.alpha = 4.0});
  fill(delta.A(), 31);
  fill(delta.B(), 32);
  const lora::AdaptedLinear layer(W, delta);
  RowMatrix<float> X(n, in);
  fill(X, 33);
  const long double s = layer.delta().scale();
  RowMatrix<long double> Weff = W.cast<long double>() + s * (delta.B().cast<long double>() * delta.A().cast<long double>());
  RowMatrix<long double> want, mag;
  reference(1.0L, X.cast<long double>().eval(), Weff.transpose().eval(), 0.0L, RowMatrix<long double>(), want, mag);

  constexpr int threads = 4, reps = 8;
  std::vector<RowMatrix<float>> Y(threads, RowMatrix<float>(n, out));
  std::vector<std::thread> pool;
  const auto before = calls();
  for (int t = 0; t < threads; ++t)
    pool.emplace_back([&, t] {
      for (int i = 0; i < reps; ++i) layer.forward(X, Y[t]);
    });
  for (auto& th : pool) th.join();
  CHECK(calls() > before);
  for (int t = 0; t < threads; ++t) check_bound<float>(Y[t], want, mag, in + 2 * r);
}
