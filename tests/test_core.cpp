// Core behaviour: forward against a plain triple-loop reference, merge and
// unmerge, safe_merge, expressions, scaling rules, typed errors, threads.
#include <lora/lora.hpp>

#include <catch2/catch.hpp>
#include <cmath>
#include <cstring>
#include <limits>
#include <thread>
#include <vector>

namespace {

using lora::index_t;

// Deterministic test data in [-1, 1).
template <class M>
void fill(M& m, std::uint64_t seed) {
  lora::EigenBackend::fill_random(m, lora::UniformDist{-1.0, 1.0}, seed, 99);
}

// Reference Y = X (W + s B A)^T + b by plain loops in long double, and the
// sum of |terms| per entry, which bounds the rounding error of any summation
// order (Higham): |err| <= gamma_k * sum|terms| with k the number of terms.
template <class T>
struct reference {
  lora::RowMatrix<long double> y, magnitude;
};

template <class T, class WM, class AM, class BM, class XM>
reference<T> reference_forward(const WM& W, const AM& A, const BM& B, double s, const XM& X,
                               const Eigen::Matrix<T, Eigen::Dynamic, 1>* bias) {
  const index_t n = X.rows(), in = W.cols(), out = W.rows(), r = A.rows();
  reference<T> ref{lora::RowMatrix<long double>::Zero(n, out), lora::RowMatrix<long double>::Zero(n, out)};
  for (index_t t = 0; t < n; ++t)
    for (index_t o = 0; o < out; ++o) {
      long double acc = bias ? (*bias)(o) : 0, mag = bias ? std::fabs((long double)(*bias)(o)) : 0;
      for (index_t i = 0; i < in; ++i) {
        acc += (long double)X(t, i) * W(o, i);
        mag += std::fabs((long double)X(t, i) * W(o, i));
      }
      for (index_t k = 0; k < r; ++k) {
        long double h = 0, hm = 0;
        for (index_t i = 0; i < in; ++i) {
          h += (long double)X(t, i) * A(k, i);
          hm += std::fabs((long double)X(t, i) * A(k, i));
        }
        acc += (long double)s * B(o, k) * h;
        mag += std::fabs((long double)s * B(o, k)) * hm;
      }
      ref.y(t, o) = acc;
      ref.magnitude(t, o) = mag;
    }
  return ref;
}

template <class T, class YM>
void check_against(const YM& Y, const reference<T>& ref, index_t terms) {
  REQUIRE(Y.rows() == ref.y.rows());
  REQUIRE(Y.cols() == ref.y.cols());
  const long double gamma = 2.0L * (terms + 2) * std::numeric_limits<T>::epsilon();
  for (index_t t = 0; t < Y.rows(); ++t)
    for (index_t o = 0; o < Y.cols(); ++o) {
      INFO("t = " << t << ", o = " << o);
      CHECK(std::fabs(Y(t, o) - ref.y(t, o)) <= gamma * ref.magnitude(t, o) + 1e-30L);
    }
}

struct shape {
  index_t out, in, n;
};
const shape kShapes[] = {{8, 8, 1}, {13, 7, 5}, {7, 13, 1}, {32, 48, 17}, {64, 33, 2}, {5, 4, 3}};

template <int Rank>
index_t rank_for(const shape& sh) {
  return Rank == lora::dynamic ? std::min<index_t>(3, std::min(sh.out, sh.in)) : Rank;
}

}  // namespace

TEMPLATE_TEST_CASE_SIG("forward matches the triple-loop reference", "[forward]", ((class T, int R), T, R),
                       (float, 1), (float, 4), (float, lora::dynamic), (double, 2), (double, lora::dynamic)) {
  for (const shape& sh : kShapes) {
    const index_t r = rank_for<R>(sh);
    if (r > std::min(sh.out, sh.in)) continue;
    CAPTURE(sh.out, sh.in, sh.n, r);
    lora::RowMatrix<T> W(sh.out, sh.in), X(sh.n, sh.in);
    fill(W, 1);
    fill(X, 2);
    Eigen::Matrix<T, Eigen::Dynamic, 1> b(sh.out);
    fill(b, 3);
    lora::AdaptedLinear layer{W, b, lora::LowRankDelta<T, R>{sh.out, sh.in, r, {.alpha = 2.0 * r}}};
    layer.delta().init(lora::init::UniformBoth{}, 11);
    REQUIRE(layer.delta().scale() == T(2));
    const auto ref = reference_forward<T>(W, layer.delta().A(), layer.delta().B(), 2.0, X, &b);

    SECTION("unmerged") { check_against<T>(layer.forward(X), ref, sh.in + r); }
    SECTION("merged") {
      REQUIRE(layer.merge());
      REQUIRE(layer.merged());
      check_against<T>(layer.forward(X), ref, sh.in + r);
    }
    SECTION("into a caller's buffer with a reused workspace") {
      lora::RowMatrix<T> Y = lora::RowMatrix<T>::Constant(sh.n, sh.out, std::numeric_limits<T>::quiet_NaN());
      typename decltype(layer)::workspace ws;
      layer.forward(X, Y, ws);  // beta = 0: the NaN already in Y must not leak
      check_against<T>(Y, ref, sh.in + r);
      REQUIRE(ws.capacity() == sh.n * r);  // the [n, r] intermediate, nothing else
      layer.forward(X, Y, ws);
      REQUIRE(ws.capacity() == sh.n * r);
    }
  }
}

TEMPLATE_TEST_CASE("a single token as a vector", "[forward]", float, double) {
  const index_t out = 9, in = 6;
  lora::RowMatrix<TestType> W(out, in);
  fill(W, 4);
  lora::AdaptedLinear layer{W, lora::LowRankDelta<TestType, 2>{out, in, {.alpha = 1}}};
  layer.delta().init(lora::init::UniformBoth{}, 5);
  Eigen::Matrix<TestType, Eigen::Dynamic, 1> x(in);
  fill(x, 6);
  const Eigen::Matrix<TestType, Eigen::Dynamic, 1> y = layer.forward(x);
  const lora::RowMatrix<TestType> X = x.transpose();
  const auto ref = reference_forward<TestType>(W, layer.delta().A(), layer.delta().B(), 0.5, X, nullptr);
  check_against<TestType>(y.transpose(), ref, in + 2);
}

TEMPLATE_TEST_CASE("unmerge(merge(W)) returns W within 4 eps (|W| + |s B A|)", "[merge]", float, double) {
  using T = TestType;
  const index_t out = 31, in = 45, r = 5;
  lora::RowMatrix<T> W(out, in);
  fill(W, 7);
  const lora::RowMatrix<T> original = W;
  lora::AdaptedLinear layer{W, lora::LowRankDelta<T>{out, in, r, {.alpha = 3}}};
  layer.delta().init(lora::init::UniformBoth{}, 8);
  const lora::RowMatrix<T> dW = layer.delta().scale() * (layer.delta().B() * layer.delta().A());
  const lora::RowMatrix<T> absdW =
      (T(0.6) * (layer.delta().B().cwiseAbs() * layer.delta().A().cwiseAbs())).eval();

  REQUIRE(layer.merge());
  REQUIRE_FALSE(layer.merge());  // already merged: nothing happens
  const T eps = std::numeric_limits<T>::epsilon();
  for (index_t i = 0; i < out; ++i)
    for (index_t j = 0; j < in; ++j)
      REQUIRE(std::abs(layer.base_weight()(i, j) - (original(i, j) + dW(i, j))) <=
              2 * r * eps * (std::abs(original(i, j)) + absdW(i, j)));

  // Changing the strength while merged must not change what unmerge subtracts.
  layer.delta().set_multiplier(0.25);
  REQUIRE(layer.unmerge());
  REQUIRE_FALSE(layer.unmerge());
  for (index_t i = 0; i < out; ++i)
    for (index_t j = 0; j < in; ++j)
      REQUIRE(std::abs(layer.base_weight()(i, j) - original(i, j)) <=
              4 * r * eps * (std::abs(original(i, j)) + absdW(i, j)));
}

TEST_CASE("merge writes through a writable view of the caller's buffer", "[merge][view]") {
  const index_t out = 6, in = 10;
  std::vector<float> bytes(out * in);  // PyTorch layout: row-major [out, in]
  for (std::size_t i = 0; i < bytes.size(); ++i) bytes[i] = 0.01f * static_cast<float>(i);
  Eigen::Map<lora::RowMatrix<float>> W(bytes.data(), out, in);
  lora::AdaptedLinear layer{W, lora::LowRankDelta<float, 1>{out, in, {.alpha = 1}}};
  REQUIRE(layer.base_weight().data() == bytes.data());  // no copy
  layer.delta().A().setConstant(1.0f);
  layer.delta().B().setConstant(2.0f);
  layer.merge();
  CHECK(bytes[0] == Approx(2.0f));
  CHECK(bytes[13] == Approx(0.13f + 2.0f));
  layer.unmerge();
  CHECK(bytes[13] == Approx(0.13f));
}

TEST_CASE("a read-only view serves forward without copying", "[view]") {
  const index_t out = 4, in = 3;
  const std::vector<double> bytes = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12};
  Eigen::Map<const lora::RowMatrix<double>> W(bytes.data(), out, in);
  lora::AdaptedLinear layer{W, lora::LowRankDelta<double>{out, in, 1}};
  REQUIRE(layer.base_weight().data() == bytes.data());
  lora::RowMatrix<double> X(1, in);
  X << 1, 0, -1;
  const lora::RowMatrix<double> Y = layer.forward(X);  // B = 0: the base alone
  CHECK(Y(0, 0) == -2.0);
  CHECK(Y(0, 3) == -2.0);
  static_assert(!decltype(layer)::base_is_writable);
}

TEST_CASE("safe_merge refuses non-finite results and leaves W bit-identical", "[merge][safe]") {
  const index_t out = 130, in = 20;  // more rows than one 64-row check block
  lora::RowMatrix<float> W(out, in);
  fill(W, 9);
  lora::AdaptedLinear layer{W, lora::LowRankDelta<float, 2>{out, in, {.alpha = 2}}};
  layer.delta().init(lora::init::UniformBoth{}, 10);
  const lora::RowMatrix<float> before = layer.base_weight();

  SECTION("NaN in B") {
    layer.delta().B()(100, 1) = std::numeric_limits<float>::quiet_NaN();
    CHECK_THROWS_AS(layer.safe_merge(), lora::NumericError);
    CHECK_THROWS_WITH(layer.safe_merge(), Catch::Contains("not finite at row 100, column 0") &&
                                              Catch::Contains("W was left unchanged"));
  }
  SECTION("overflow from finite factors") {
    layer.delta().A()(0, 7) = 3e38f;
    layer.delta().B()(70, 0) = 3e38f;
    CHECK_THROWS_WITH(layer.safe_merge(), Catch::Contains("row 70, column 7"));
  }
  CHECK_FALSE(layer.merged());
  CHECK(std::memcmp(before.data(), layer.base_weight().data(), sizeof(float) * out * in) == 0);
}

TEST_CASE("safe_merge merges finite updates", "[merge][safe]") {
  lora::RowMatrix<double> W = lora::RowMatrix<double>::Ones(3, 3);
  lora::AdaptedLinear layer{W, lora::LowRankDelta<double, 1>{3, 3, {.alpha = 1}}};
  layer.delta().A().setConstant(2);
  layer.delta().B().setConstant(3);
  REQUIRE(layer.safe_merge());
  CHECK(layer.base_weight()(2, 1) == 7.0);
}

TEST_CASE("scale rules: alpha / r, rsLoRA, user scale, multiplier", "[scale]") {
  using D = lora::LowRankDelta<float>;
  CHECK(D(16, 16, 4, {.alpha = 8}).scale() == 2.0f);
  CHECK(D(16, 16, 4, {.alpha = 8, .rule = lora::Scaling::rslora}).scale() == 4.0f);
  CHECK(D(16, 16, 4).scale() == 1.0f);  // alpha = 0: the user scale, 1 by default
  CHECK(D(16, 16, 4, {.alpha = 0, .user_scale = 0.75}).scale() == 0.75f);
  D d(16, 16, 8, {.alpha = 16, .multiplier = 0.5});
  CHECK(d.scale() == 1.0f);
  d.set_multiplier(0);
  CHECK(d.scale() == 0.0f);
  CHECK(d.trainable_parameters() == 8 * 32);
  CHECK(lora::LowRankDelta<double, 3>(10, 20).trainable_parameters() == 90);
}

TEST_CASE("the effective weight is a lazy expression W + s B A", "[expr]") {
  const index_t out = 12, in = 9, n = 4;
  lora::RowMatrix<double> W(out, in), X(n, in), G(n, out);
  fill(W, 12);
  fill(X, 13);
  fill(G, 14);
  lora::AdaptedLinear layer{W, lora::LowRankDelta<double, 3>{out, in, {.alpha = 6}}};
  layer.delta().init(lora::init::UniformBoth{}, 15);
  const lora::RowMatrix<double> dense = W + 2.0 * layer.delta().B() * layer.delta().A();

  const lora::RowMatrix<double> materialised = lora::expr::materialize(layer.weight());
  CHECK((materialised - dense).cwiseAbs().maxCoeff() < 1e-14);

  typename decltype(layer)::workspace ws;
  SECTION("apply_transposed gives G (W + s B A), the backward dX") {
    lora::RowMatrix<double> dX(n, in);
    lora::expr::apply_transposed(layer.unmerged_expression(), G, dX, 1.0, 0.0, ws);
    CHECK((dX - G * dense).cwiseAbs().maxCoeff() < 1e-13);
  }
  SECTION("alpha and beta follow BLAS") {
    lora::RowMatrix<double> Y = lora::RowMatrix<double>::Ones(n, out);
    lora::expr::apply(layer.weight(), X, Y, 0.5, 2.0, ws);
    const lora::RowMatrix<double> expected = 2.0 * lora::RowMatrix<double>::Ones(n, out) + 0.5 * X * dense.transpose();
    CHECK((Y - expected).cwiseAbs().maxCoeff() < 1e-13);
  }
  SECTION("slices of rows") {
    const lora::RowMatrix<double> part = lora::expr::materialize(lora::expr::slice_rows(layer.weight(), 5, 4));
    CHECK((part - dense.middleRows(5, 4)).cwiseAbs().maxCoeff() < 1e-14);
  }
  SECTION("merged: W already holds the delta, the expression still equals W + s B A") {
    layer.merge();
    const lora::RowMatrix<double> m = lora::expr::materialize(layer.weight());
    CHECK((m - dense).cwiseAbs().maxCoeff() < 1e-14);
    CHECK((lora::expr::materialize(layer.base_expression()) - dense).cwiseAbs().maxCoeff() < 1e-14);
  }
  SECTION("expressions compose by hand") {
    using lora::expr::leaf;
    using lora::expr::product;
    const auto e = leaf(W) + 2.0 * product(layer.delta().B(), layer.delta().A()) + (-1.0) * leaf(W);
    const lora::RowMatrix<double> only_delta = lora::expr::materialize(e);
    CHECK((only_delta - (dense - W)).cwiseAbs().maxCoeff() < 1e-14);
    CHECK(lora::expr::first_non_finite(e) == -1);
  }
}

TEST_CASE("typed errors name the function and the values", "[errors]") {
  using Catch::Contains;
  SECTION("ranks") {
    CHECK_THROWS_AS(lora::LowRankDelta<float>(8, 4, 5), lora::RankError);
    CHECK_THROWS_WITH(lora::LowRankDelta<float>(8, 4, 5),
                      Contains("LowRankDelta: rank 5 must satisfy 0 < r <= min(out, in) = 4"));
    CHECK_THROWS_WITH(lora::LowRankDelta<float>(8, 4, 0), Contains("rank 0"));
    CHECK_THROWS_WITH((lora::LowRankDelta<float, 4>(8, 8, 2)),
                      Contains("rank 2 given for a static rank of 4"));
    CHECK_THROWS_AS((lora::LowRankDelta<float, 16>(8, 32)), lora::RankError);
    CHECK_THROWS_AS(lora::LowRankDelta<float>(0, 4, 1), lora::ShapeError);
    CHECK_THROWS_AS(lora::LowRankDelta<float>(8, 4, 5), lora::Error);  // common base
  }
  SECTION("shapes") {
    lora::RowMatrix<float> W = lora::RowMatrix<float>::Zero(4096, 64);
    CHECK_THROWS_WITH((lora::AdaptedLinear{W, lora::LowRankDelta<float, 2>{64, 64}}),
                      Contains("base weight is [out, in] = [4096, 64] but the delta is [64, 64]"));
    lora::AdaptedLinear layer{W, lora::LowRankDelta<float, 2>{4096, 64}};
    lora::RowMatrix<float> X(3, 768), Y(3, 4096);
    CHECK_THROWS_AS(layer.forward(X, Y), lora::ShapeError);
    CHECK_THROWS_WITH(layer.forward(X, Y),
                      Contains("AdaptedLinear::forward: X has 768 columns, expected in_features = 64"));
    lora::RowMatrix<float> X2(3, 64), Y2(2, 4096);
    CHECK_THROWS_WITH(layer.forward(X2, Y2), Contains("Y is [2, 4096], expected [n, out] = [3, 4096]"));
    Eigen::VectorXf bias(10);
    CHECK_THROWS_WITH((lora::AdaptedLinear{W, bias, lora::LowRankDelta<float, 2>{4096, 64}}),
                      Contains("bias has 10 entries, expected out_features = 4096"));
    layer.delta().A().resize(2, 63);  // a user broke the factor's shape
    CHECK_THROWS_AS(layer.forward(X2, layer.forward(X2)), lora::ShapeError);
  }
  SECTION("in-place forward is refused") {
    lora::RowMatrix<float> W = lora::RowMatrix<float>::Identity(8, 8);
    lora::AdaptedLinear layer{W, lora::LowRankDelta<float, 2>{8, 8}};
    lora::RowMatrix<float> XY = lora::RowMatrix<float>::Ones(2, 8);
    CHECK_THROWS_WITH(layer.forward(XY, XY), Contains("X and Y share memory"));
  }
  SECTION("factor shapes") {
    CHECK_THROWS_WITH(lora::LowRankDelta<double>(lora::RowMatrix<double>(5, 2), lora::RowMatrix<double>(3, 7)),
                      Contains("B is [5, 2] and A is [3, 7]"));
  }
}

TEST_CASE("forward is const and safe from several threads", "[threads]") {
  const index_t out = 40, in = 56, n = 9;
  lora::RowMatrix<float> W(out, in), X(n, in);
  fill(W, 16);
  fill(X, 17);
  const lora::AdaptedLinear layer = [&] {
    lora::AdaptedLinear l{W, lora::LowRankDelta<float, 4>{out, in, {.alpha = 8}}};
    l.delta().init(lora::init::UniformBoth{}, 18);
    return l;
  }();
  const lora::RowMatrix<float> expected = layer.forward(X);
  std::vector<lora::RowMatrix<float>> results(4);
  std::vector<std::thread> threads;
  for (auto& r : results)
    threads.emplace_back([&] {
      for (int rep = 0; rep < 20; ++rep) r = layer.forward(X);
    });
  for (auto& t : threads) t.join();
  for (const auto& r : results) CHECK(r == expected);  // same inputs, same kernel: bit-identical
}

TEST_CASE("for_each_rank visits the ranks in order at compile time", "[rank]") {
  std::vector<int> seen;
  lora::index_t params = 0;
  lora::for_each_rank<1, 2, 4, 8>([&]<int R>() {
    static_assert(R > 0);
    lora::LowRankDelta<float, R> d{16, 32};
    STATIC_REQUIRE(decltype(d)::rank_at_compile_time == R);
    seen.push_back(R);
    params += d.trainable_parameters();
  });
  CHECK(seen == std::vector<int>{1, 2, 4, 8});
  CHECK(params == (1 + 2 + 4 + 8) * 48);
}

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {
// A rank-r layer [out, in] on two OpenMP threads, and for each token count n
// its inputs X and the reference forward, handed to check(layer, X, ref).
template <class T, class F>
void for_token_counts(index_t out, index_t in, index_t r, std::uint64_t seed, std::initializer_list<index_t> ns,
                      F&& check) {
#ifdef _OPENMP
  omp_set_num_threads(2);
#endif
  lora::RowMatrix<T> W(out, in);
  fill(W, seed);
  lora::AdaptedLinear layer{W, lora::LowRankDelta<T>{out, in, r, {.alpha = 2.0 * double(r)}}};
  layer.delta().init(lora::init::UniformBoth{}, seed + 1);
  for (index_t n : ns) {
    CAPTURE(n);
    lora::RowMatrix<T> X(n, in);
    fill(X, seed + 2 + n);
    check(layer, X, reference_forward<T>(W, layer.delta().A(), layer.delta().B(), 2.0, X, nullptr));
  }
}
}  // namespace

TEMPLATE_TEST_CASE("row-split (threaded) products match the reference", "[forward][threads]", float, double) {
  // W has >= 2^18 elements and an odd row count, so the OpenMP row split runs
  // (when built with OpenMP) with uneven slices; n crosses the split limit.
  using T = TestType;
  const index_t in = 389, r = 5;
  // 131: past the skinny kernel, Eigen's GEMM
  for_token_counts<T>(701, in, r, 21, {1, 2, 3, 6, 7, 64, 65, 131}, [&](const auto& layer, const auto& X, const auto& ref) {
    check_against<T>(layer.forward(X), ref, in + r);
    if (X.rows() == 1) {
      const Eigen::Matrix<T, Eigen::Dynamic, 1> x = X.row(0).transpose();
      check_against<T>(layer.forward(x).transpose(), ref, in + r);
    }
  });
}

TEMPLATE_TEST_CASE("skinny products with the depth in several chunks match the reference", "[forward][threads]",
                   float, double) {
  // in = 1100: two full 512-deep chunks of the skinny kernel, a partial one and
  // a 12-element tail that is not a whole vector; out = 251: row blocks of 6,
  // then 4, then single rows, split unevenly across threads (W >= 2^18
  // elements); n covers whole 4-token blocks, every tail, n = 2's 8-row path
  // and uneven token groups (65..128: two groups).
  using T = TestType;
  const index_t in = 1100, r = 3;
  for_token_counts<T>(251, in, r, 31, {2, 3, 4, 5, 6, 7, 17, 64, 65, 101, 128},
                      [&](const auto& layer, const auto& X, const auto& ref) {
                        check_against<T>(layer.forward(X), ref, in + r);
                        lora::RowMatrix<T> Y =
                            lora::RowMatrix<T>::Constant(X.rows(), layer.out_features(), std::numeric_limits<T>::quiet_NaN());
                        layer.forward(X, Y);  // beta = 0 must not read Y
                        check_against<T>(Y, ref, in + r);
                      });
}

TEMPLATE_TEST_CASE("few-row products C = A B (backward's dX = G W) match the reference", "[backward][threads]",
                   float, double) {
  // B [389, 701] has >= 2^18 elements, so C's 701 columns split over threads
  // unevenly; depth 389 >= the kernels' minimum and not a multiple of their
  // depth blocks (fp32: 32, double: 128); 701 columns leave a partial 32-wide
  // panel (fp32) and 4-vector, 1-vector and scalar tails (double); m crosses
  // every tile height (fp32: 12, 16 as 8 + 8, 28 as 12 + 8 + 8, the 4/2/1
  // tails; double: 6/4/2/1 row blocks) and the kernels' limit (32).
#ifdef _OPENMP
  omp_set_num_threads(2);
#endif
  using T = TestType;
  const index_t k = 389, n = 701;
  lora::RowMatrix<T> B(k, n);
  fill(B, 41);
  for (index_t m : {1, 2, 3, 5, 7, 13, 16, 28, 32, 33}) {
    for (T beta : {T(0), T(1), T(-0.5)}) {
      CAPTURE(m, beta);
      lora::RowMatrix<T> A(m, k), C(m, n);
      fill(A, 42 + m);
      fill(C, 43);
      const lora::RowMatrix<T> C0 = C;
      if (beta == T(0)) C.setConstant(std::numeric_limits<T>::quiet_NaN());  // beta = 0 must not read C
      const T alpha = T(0.75);
      lora::EigenBackend::gemm_nn(alpha, A, B, beta, C);
      const long double gamma = 2.0L * (k + 2) * std::numeric_limits<T>::epsilon();
      long double worst = 0;
      for (index_t i = 0; i < m; ++i)
        for (index_t j = 0; j < n; ++j) {
          long double acc = beta == T(0) ? 0.0L : (long double)beta * C0(i, j);
          long double mag = std::fabs(acc);
          for (index_t p = 0; p < k; ++p) {
            acc += (long double)alpha * A(i, p) * B(p, j);
            mag += std::fabs((long double)alpha * A(i, p) * B(p, j));
          }
          worst = std::max(worst, std::fabs(C(i, j) - acc) / (gamma * mag + 1e-30L));
        }
      CHECK(worst <= 1.0L);
    }
  }
}

// ---- the backend concept: optional pieces fall back to required ones ------------

namespace {
// The Eigen backend with every optional piece hidden, so BackendOps<> takes
// the fallbacks (built from gemm, fill, to_host...).
struct minimal_backend : lora::EigenBackend {
  template <class... Args>
  static void copy(Args&&...) = delete;
  template <class... Args>
  static void add_to_rows(Args&&...) = delete;
  template <class... Args>
  static void sum_rows(Args&&...) = delete;
  template <class M>
  static index_t first_non_finite(const M&) = delete;
  using lora::EigenBackend::first_non_finite;  // the pointer form is required
  template <class... Args>
  static void fill_random(Args&&...) = delete;
};
static_assert(lora::Backend<lora::EigenBackend, float> && lora::Backend<lora::EigenBackend, double>);
static_assert(lora::Backend<minimal_backend, float>, "only optional pieces are missing");
template <class B>
constexpr bool has_own_pieces = requires(lora::RowMatrix<float>& m, Eigen::VectorXf& v) {
  B::fill_random(m, lora::UniformDist{}, 1u, 1u);
  B::add_to_rows(1.0f, v, m);
  B::sum_rows(1.0f, m, 0.0f, v);
  B::copy(m, m);
  { B::first_non_finite(m) } -> std::same_as<index_t>;
};
static_assert(has_own_pieces<lora::EigenBackend> && !has_own_pieces<minimal_backend>);
}  // namespace

TEMPLATE_TEST_CASE("BackendOps: the fallbacks of optional pieces equal the Eigen backend's own", "[backend]", float,
                   double) {
  using T = TestType;
  using full = lora::BackendOps<lora::EigenBackend>;
  using minimal = lora::BackendOps<minimal_backend>;
  const index_t n = 5, out = 7;
  lora::RowMatrix<T> a(n, out), b(n, out);
  full::fill_random(a, lora::UniformDist{-1.0, 1.0}, 3, 4);
  minimal::fill_random(b, lora::UniformDist{-1.0, 1.0}, 3, 4);
  CHECK(a == b);  // the same counter-based draws, bit for bit
  lora::RowMatrix<T> c(n, out);
  minimal::copy(a, c);
  CHECK(c == a);
  Eigen::Matrix<T, Eigen::Dynamic, 1> bias(out), db_full(out), db_min(out);
  fill(bias, 8);
  lora::RowMatrix<T> y1 = a, y2 = a;
  full::add_to_rows(T(0.5), bias, y1);
  minimal::add_to_rows(T(0.5), bias, y2);
  CHECK((y1 - y2).cwiseAbs().maxCoeff() <= 2 * std::numeric_limits<T>::epsilon());
  db_full.setConstant(1);
  db_min.setConstant(1);
  full::sum_rows(T(2), a, T(3), db_full);
  minimal::sum_rows(T(2), a, T(3), db_min);
  CHECK((db_full - db_min).cwiseAbs().maxCoeff() <= 16 * std::numeric_limits<T>::epsilon());
  CHECK(minimal::first_non_finite(a) == -1);
  a(3, 2) = std::numeric_limits<T>::infinity();
  CHECK(minimal::first_non_finite(a) == 3 * out + 2);
  CHECK(full::first_non_finite(a) == 3 * out + 2);
}

TEST_CASE("the public expression verbs check shapes and refuse outputs that alias a product's operands",
          "[expr][errors]") {
  using M = lora::RowMatrix<float>;
  const index_t out = 6, in = 5, n = 3;
  lora::AdaptedLinear layer{M(M::Random(out, in)), lora::LowRankDelta<float, 2>{out, in, {.alpha = 2}}};
  layer.delta().init(lora::init::UniformBoth{}, 3);
  const auto e = layer.unmerged_expression();
  lora::EigenBackend::workspace<float> ws;
  M X = M::Random(n, in), Y(n, out), G = M::Random(n, out), dX(n, in);
  // The verbs against a dense reference, so the checks do not break them.
  lora::expr::apply(e, X, Y, 1.0f, 0.0f, ws);
  const M dense = layer.base_weight() + layer.delta().scale() * layer.delta().B() * layer.delta().A();
  CHECK((Y - X * dense.transpose()).cwiseAbs().maxCoeff() < 1e-5f);

  M wrong_y(n, out + 1), wrong_x(n, in + 2), wrong_dx(n + 1, in);
  CHECK_THROWS_WITH(lora::expr::apply(e, X, wrong_y, 1.0f, 0.0f, ws),
                    Catch::Contains("lora::expr::apply: the expression is [6, 5]"));
  CHECK_THROWS_AS(lora::expr::apply(e, wrong_x, Y, 1.0f, 0.0f, ws), lora::ShapeError);
  CHECK_THROWS_AS(lora::expr::apply_transposed(e, G, wrong_dx, 1.0f, 0.0f, ws), lora::ShapeError);
  M wrong_dst(out, in + 1);
  CHECK_THROWS_WITH(lora::expr::assign(wrong_dst, e), Catch::Contains("the destination is [6, 6]"));

  // Aliasing: an output over the input, or over a factor the product reads.
  M buf = M::Random(n, out + in);
  CHECK_THROWS_WITH(lora::expr::apply(e, buf.leftCols(in), buf.rightCols(out), 1.0f, 0.0f, ws),
                    Catch::Contains("shares memory"));
  M big = M::Random(out, in + 2);  // B in its first 2 columns, the destination in the rest
  CHECK_THROWS_WITH(lora::expr::assign(big.rightCols(in), lora::expr::product(big.leftCols(2), layer.delta().A())),
                    Catch::Contains("shares memory with a factor"));
  // W itself may be the destination of an assign (merge is W += s B A).
  M W = layer.base_weight();
  const M expected = W + 0.5f * layer.delta().B() * layer.delta().A();
  lora::expr::assign(W, lora::expr::leaf(W) + 0.5f * lora::expr::product(layer.delta().B(), layer.delta().A()), 1.0f,
                     0.0f);
  CHECK((W - expected).cwiseAbs().maxCoeff() < 1e-5f);

  // A workspace asked for more elements than index_t holds refuses instead of wrapping.
  CHECK_THROWS_WITH(ws.matrix(index_t(1) << 40, index_t(1) << 40), Catch::Contains("overflows"));

  // nf4 products: y over x.
  std::vector<float> w(2 * 64, 0.25f), v(128, 1.0f);
  const lora::NF4Matrix q = lora::NF4Matrix::quantize(w.data(), 2, 64);
  CHECK_THROWS_WITH(lora::nf4_gemv(q, std::span<const float>(v.data(), 64), std::span<float>(v.data() + 63, 2)),
                    Catch::Contains("x and y share memory"));
}
