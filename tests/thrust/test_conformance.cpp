// Conformance of the Thrust backend with the Eigen backend. One source, built
// once per Thrust device system: OMP and CPP with the host compiler, CUDA with
// nvcc (test_conformance.cu includes this file). Every operation runs on both
// backends from the same inputs and the results are compared within
// tolerances derived from the inputs' magnitudes:
//   products:      |dev - eigen| <= 2 (k + 2) eps * (|op(A)| |op(B)| + |C|-terms)
//   elementwise:   exact, or 2 eps |value| where both sides round once
//   random init:   bit-identical on OMP/CPP (same libm); 2 ulp on CUDA (its libm)
#include <lora/thrust.hpp>

#if LORA_THRUST_ON_CUDA
#define CATCH_CONFIG_RUNNER
#endif
#include <catch2/catch.hpp>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

namespace {

using lora::index_t;
using EB = lora::eigen_backend;
using TB = lora::thrust_backend;
template <class T>
using Host = lora::RowMatrix<T>;

template <class T>
Host<T> random_host(index_t rows, index_t cols, std::uint64_t seed) {
  Host<T> m(rows, cols);
  EB::fill_random(m, lora::uniform_dist{-1.0, 1.0}, seed, 99);
  return m;
}

/// |got - want| <= 2 (terms + 2) eps * bound, elementwise.
template <class T, class G, class W, class B>
void check_close(const G& got, const W& want, const B& bound, index_t terms) {
  REQUIRE(got.rows() == want.rows());
  REQUIRE(got.cols() == want.cols());
  const double tol = 2.0 * static_cast<double>(terms + 2) * std::numeric_limits<T>::epsilon();
  for (index_t i = 0; i < got.rows(); ++i)
    for (index_t j = 0; j < got.cols(); ++j) {
      INFO("element (" << i << ", " << j << "): " << got(i, j) << " vs " << want(i, j));
      CHECK(std::abs(static_cast<double>(got(i, j)) - static_cast<double>(want(i, j))) <=
            tol * static_cast<double>(bound(i, j)) + 1e-300);
    }
}

template <class M>
bool bit_identical(const M& a, const M& b) {
  return a.rows() == b.rows() && a.cols() == b.cols() &&
         std::memcmp(a.data(), b.data(), sizeof(typename M::Scalar) * static_cast<std::size_t>(a.size())) == 0;
}

struct shape {
  index_t out, in, n;
};
// (96, 80, 40): m n k above LORA_THRUST_CUBLAS_MIN_MNK, so on CUDA it runs cuBLAS.
const shape kShapes[] = {{8, 8, 1}, {13, 7, 5}, {7, 13, 1}, {32, 48, 17}, {5, 4, 3}, {96, 80, 40}};

template <int Rank>
index_t rank_for(const shape& sh) {
  return Rank == lora::dynamic ? std::min<index_t>(3, std::min(sh.out, sh.in)) : Rank;
}

// |X| |W + s B A|^T + |b| computed as sums of absolute terms (the error scale).
template <class T, class Layer>
Host<T> forward_bound(const Layer& host, const Host<T>& X) {
  const T s = std::abs(host.delta().scale());
  Host<T> bound = X.cwiseAbs() * host.base_weight().cwiseAbs().transpose();
  bound += s * (X.cwiseAbs() * host.delta().A().cwiseAbs().transpose()) * host.delta().B().cwiseAbs().transpose();
  if (host.has_bias()) bound.rowwise() += host.bias().cwiseAbs().transpose();
  return bound;
}

}  // namespace

// ---- the layer ------------------------------------------------------------------

TEMPLATE_TEST_CASE_SIG("thrust forward equals eigen forward", "[thrust][forward]", ((class T, int R), T, R),
                       (float, 1), (float, 4), (float, lora::dynamic), (double, 2), (double, lora::dynamic)) {
  const bool with_bias = GENERATE(false, true);
  for (const shape& sh : kShapes) {
    const index_t r = rank_for<R>(sh);
    if (r > std::min(sh.out, sh.in)) continue;
    CAPTURE(sh.out, sh.in, sh.n, r, with_bias);
    const Host<T> W = random_host<T>(sh.out, sh.in, 1), X = random_host<T>(sh.n, sh.in, 2);
    const Eigen::Matrix<T, Eigen::Dynamic, 1> b = random_host<T>(sh.out, 1, 3);
    using Delta = lora::LowRankDelta<T, R>;
    lora::AdaptedLinear host = with_bias ? lora::AdaptedLinear{W, b, Delta{sh.out, sh.in, r, {.alpha = 2.0 * r}}}
                                         : lora::AdaptedLinear{W, Delta{sh.out, sh.in, r, {.alpha = 2.0 * r}}};
    host.delta().init(lora::init::uniform_both{}, 11);
    auto dev = lora::to_device(host);
    static_assert(std::is_same_v<typename decltype(dev)::backend, TB>);
    REQUIRE(dev.has_bias() == with_bias);
    const auto Xd = lora::to_device(X);
    const Host<T> want = host.forward(X);
    const Host<T> bound = forward_bound<T>(host, X);
    const index_t terms = sh.in + r;

    SECTION("unmerged") { check_close<T>(lora::to_host(dev.forward(Xd)), want, bound, terms); }
    SECTION("merged") {
      REQUIRE(dev.merge());
      REQUIRE(dev.merged());
      check_close<T>(lora::to_host(dev.forward(Xd)), want, bound, 2 * terms);
      REQUIRE(dev.unmerge());
      check_close<T>(lora::to_host(dev.forward(Xd)), want, bound, 3 * terms);
    }
    SECTION("into a caller's NaN-filled buffer with a reused workspace") {
      lora::device_matrix<T> Y = lora::to_device(
          Host<T>::Constant(sh.n, sh.out, std::numeric_limits<T>::quiet_NaN()));  // beta = 0 must not read it
      typename decltype(dev)::workspace ws;
      dev.forward(Xd, Y, ws);
      check_close<T>(lora::to_host(Y), want, bound, terms);
      REQUIRE(ws.capacity() == sh.n * r);  // the [n, r] intermediate, nothing else
      dev.forward(Xd, lora::view(Y), ws);  // into a view of the same buffer
      REQUIRE(ws.capacity() == sh.n * r);
      check_close<T>(lora::to_host(Y), want, bound, terms);
    }
#if LORA_THRUST_ON_CUDA
    SECTION("the CUDA fast path (cuBLAS + fused adapter kernel)") {
      lora::device_matrix<T> Y(sh.n, sh.out);
      typename decltype(dev)::workspace ws;
      lora::cuda::forward(dev, Xd, Y, ws);
      check_close<T>(lora::to_host(Y), want, bound, terms);
    }
#endif
  }
}

TEMPLATE_TEST_CASE("thrust: a single token as a vector", "[thrust][forward]", float, double) {
  using T = TestType;
  const index_t out = 9, in = 6;
  const Host<T> W = random_host<T>(out, in, 4);
  lora::AdaptedLinear host{W, lora::LowRankDelta<T, 2>{out, in, {.alpha = 1}}};
  host.delta().init(lora::init::uniform_both{}, 5);
  const Eigen::Matrix<T, Eigen::Dynamic, 1> x = random_host<T>(in, 1, 6);
  const auto dev = lora::to_device(host);
  const lora::device_matrix<T, lora::dynamic, 1> xd = lora::to_device(x);
  const Eigen::Matrix<T, Eigen::Dynamic, 1> want = host.forward(x);
  const Eigen::Matrix<T, Eigen::Dynamic, 1> got = lora::to_host(dev.forward(xd));
  const Host<T> X = x.transpose();
  check_close<T>(got.transpose(), want.transpose(), forward_bound<T>(host, X), in + 2);
}

TEMPLATE_TEST_CASE("thrust merge / unmerge / safe_merge equal eigen's", "[thrust][merge]", float, double) {
  using T = TestType;
  const index_t out = 130, in = 20, r = 5;  // more rows than one 64-row safe_merge block
  const Host<T> W = random_host<T>(out, in, 7);
  lora::AdaptedLinear host{W, lora::LowRankDelta<T>{out, in, r, {.alpha = 3}}};
  host.delta().init(lora::init::uniform_both{}, 8);
  auto dev = lora::to_device(host);
  const Host<T> bound = W.cwiseAbs() + std::abs(host.delta().scale()) * host.delta().B().cwiseAbs() *
                                           host.delta().A().cwiseAbs();

  SECTION("merge, then unmerge") {
    REQUIRE(host.merge());
    REQUIRE(dev.merge());
    REQUIRE_FALSE(dev.merge());
    check_close<T>(lora::to_host(dev.base_weight()), host.base_weight(), bound, r);
    dev.delta().set_multiplier(0.25);  // unmerge subtracts what merge added
    host.delta().set_multiplier(0.25);
    REQUIRE(dev.unmerge());
    REQUIRE(host.unmerge());
    REQUIRE_FALSE(dev.unmerge());
    check_close<T>(lora::to_host(dev.base_weight()), W, bound, 2 * r);
  }
  SECTION("safe_merge merges finite updates") {
    REQUIRE(dev.safe_merge());
    REQUIRE(host.safe_merge());
    check_close<T>(lora::to_host(dev.base_weight()), host.base_weight(), bound, r);
  }
  SECTION("safe_merge refuses NaN and leaves W bit-identical, with eigen's message") {
    host.delta().B()(100, 1) = std::numeric_limits<T>::quiet_NaN();
    dev.delta().B() = lora::to_device(host.delta().B());
    std::string host_msg, dev_msg;
    try {
      host.safe_merge();
    } catch (const lora::numeric_error& e) {
      host_msg = e.what();
    }
    CHECK_THROWS_AS(dev.safe_merge(), lora::numeric_error);
    try {
      dev.safe_merge();
    } catch (const lora::numeric_error& e) {
      dev_msg = e.what();
    }
    CHECK_THAT(dev_msg, Catch::Contains("not finite at row 100, column 0"));
    CHECK(dev_msg == host_msg);
    CHECK_FALSE(dev.merged());
    CHECK(bit_identical(lora::to_host(dev.base_weight()), W));
  }
  SECTION("safe_merge refuses overflow from finite factors") {
    host.delta().A()(0, 7) = std::numeric_limits<T>::max();
    host.delta().B()(70, 0) = std::numeric_limits<T>::max();
    dev = lora::to_device(host);
    CHECK_THROWS_WITH(dev.safe_merge(), Catch::Contains("row 70, column 7"));
    CHECK(bit_identical(lora::to_host(dev.base_weight()), W));
  }
}

TEST_CASE("thrust: merge writes through a writable view of a device buffer", "[thrust][merge][view]") {
  const index_t out = 6, in = 10;
  lora::device_matrix<float> buffer = lora::to_device(random_host<float>(out, in, 30));
  const Host<float> W = lora::to_host(buffer);
  lora::device_matrix_view<float> Wv(buffer.data(), out, in);  // the caller's buffer, not owned
  lora::AdaptedLinear layer{Wv, lora::LowRankDelta<float, 1, TB>{out, in, {.alpha = 1}}};
  REQUIRE(layer.base_weight().data() == buffer.data());
  TB::fill(layer.delta().A(), 1.0f);
  TB::fill(layer.delta().B(), 2.0f);
  layer.merge();
  const Host<float> merged = lora::to_host(buffer);
  CHECK(merged(1, 3) == Approx(W(1, 3) + 2.0f));
  layer.unmerge();
  CHECK(lora::to_host(buffer)(1, 3) == Approx(W(1, 3)));

  lora::AdaptedLinear read_only{lora::device_matrix_const_view<float>(buffer.data(), out, in),
                                lora::LowRankDelta<float, 1, TB>{out, in}};
  static_assert(!decltype(read_only)::base_is_writable);
  const auto Xd = lora::to_device(random_host<float>(2, in, 31));
  check_close<float>(lora::to_host(read_only.forward(Xd)), (lora::to_host(Xd) * W.transpose()).eval(),
                     (lora::to_host(Xd).cwiseAbs() * W.cwiseAbs().transpose()).eval(), in);
}

TEST_CASE("thrust expressions: apply, apply_transposed, assign, slices", "[thrust][expr]") {
  const index_t out = 12, in = 9, n = 4;
  const Host<double> W = random_host<double>(out, in, 12), X = random_host<double>(n, in, 13),
                     G = random_host<double>(n, out, 14);
  lora::AdaptedLinear host{W, lora::LowRankDelta<double, 3>{out, in, {.alpha = 6}}};
  host.delta().init(lora::init::uniform_both{}, 15);
  const auto dev = lora::to_device(host);
  const auto Xd = lora::to_device(X), Gd = lora::to_device(G);
  const Host<double> dense = W + 2.0 * host.delta().B() * host.delta().A();
  const double tol = 1e-12;
  typename decltype(dev)::workspace ws;

  CHECK((lora::to_host(lora::expr::materialize(dev.weight())) - dense).cwiseAbs().maxCoeff() < tol);
  SECTION("apply_transposed") {
    lora::device_matrix<double> dX(n, in);
    lora::expr::apply_transposed(dev.unmerged_expression(), Gd, dX, 1.0, 0.0, ws);
    CHECK((lora::to_host(dX) - G * dense).cwiseAbs().maxCoeff() < tol);
  }
  SECTION("apply with BLAS alpha and beta") {
    auto Yd = lora::to_device(Host<double>::Ones(n, out));
    lora::expr::apply(dev.weight(), Xd, Yd, 0.5, 2.0, ws);
    const Host<double> expected = 2.0 * Host<double>::Ones(n, out) + 0.5 * X * dense.transpose();
    CHECK((lora::to_host(Yd) - expected).cwiseAbs().maxCoeff() < tol);
  }
  SECTION("slices and first_non_finite") {
    const Host<double> part = lora::to_host(lora::expr::materialize(lora::expr::slice_rows(dev.weight(), 5, 4)));
    CHECK((part - dense.middleRows(5, 4)).cwiseAbs().maxCoeff() < tol);
    CHECK(lora::expr::first_non_finite(dev.weight()) == -1);
  }
}

// ---- init -------------------------------------------------------------------------

TEMPLATE_TEST_CASE("thrust init draws eigen's numbers for the same seed", "[thrust][init]", float, double) {
  using T = TestType;
  const index_t out = 33, in = 17, r = 4;
  lora::LowRankDelta<T, lora::dynamic> host(out, in, r, {.alpha = 8});
  lora::LowRankDelta<T, lora::dynamic, TB> dev(out, in, r, {.alpha = 8});
#if LORA_THRUST_ON_CUDA
  const double ulps = 2;  // CUDA's log/cos may differ from glibc's in the last bit
#else
  const double ulps = 0;
#endif
  const auto same = [&](const Host<T>& got, const Host<T>& want) {
    for (index_t i = 0; i < got.size(); ++i)
      REQUIRE(std::abs(got.data()[i] - want.data()[i]) <=
              ulps * std::numeric_limits<T>::epsilon() * std::abs(want.data()[i]));
  };
  SECTION("kaiming_zero") {
    host.init(lora::init::kaiming_zero{}, 42);
    dev.init(lora::init::kaiming_zero{}, 42);
    CHECK(bit_identical(lora::to_host(dev.A()), Host<T>(host.A())));
    CHECK(lora::to_host(dev.B()).cwiseAbs().maxCoeff() == T(0));
  }
  SECTION("gaussian") {
    host.init(lora::init::gaussian{}, 7);
    dev.init(lora::init::gaussian{}, 7);
    same(lora::to_host(dev.A()), host.A());
  }
  SECTION("uniform_both") {
    host.init(lora::init::uniform_both{0.5}, 9);
    dev.init(lora::init::uniform_both{0.5}, 9);
    CHECK(bit_identical(lora::to_host(dev.A()), Host<T>(host.A())));
    CHECK(bit_identical(lora::to_host(dev.B()), Host<T>(host.B())));
  }
  SECTION("from_dense through to_host / from_host") {
    const Host<T> dW = random_host<T>(out, r, 20) * random_host<T>(r, in, 21);
    const auto dWd = lora::to_device(dW);
    const auto want = host.init(lora::init::from_dense{dW});
    const auto got = dev.init(lora::init::from_dense{dWd});
    CHECK(got.kept_energy == Approx(want.kept_energy));
    CHECK(got.kept_energy == Approx(1.0));
    CHECK(bit_identical(lora::to_host(dev.A()), Host<T>(host.A())));  // the same host SVD of the same bytes
    CHECK(bit_identical(lora::to_host(dev.B()), Host<T>(host.B())));
  }
  SECTION("pissa keeps the layer's output") {
    const Host<T> W = random_host<T>(out, in, 22);
    lora::AdaptedLinear hl{W, lora::LowRankDelta<T>{out, in, r, {.alpha = 8}}};
    auto dl = lora::to_device(hl);
    const auto rep = lora::init::pissa(dl);
    lora::init::pissa(hl);
    CHECK(rep.kept_energy > 0.0);
    CHECK(bit_identical(lora::to_host(dl.delta().A()), Host<T>(hl.delta().A())));
    const Host<T> bound = W.cwiseAbs() + 2 * hl.delta().B().cwiseAbs() * hl.delta().A().cwiseAbs();
    check_close<T>(lora::to_host(dl.base_weight()), hl.base_weight(), bound, r);
    const Host<T> effective = lora::to_host(lora::expr::materialize(dl.weight()));
    check_close<T>(effective, W, bound, 2 * r);
  }
}

// ---- primitives, alpha / beta --------------------------------------------------------

namespace {
struct alpha_beta {
  double alpha, beta;
};
const alpha_beta kAlphaBeta[] = {{1, 0}, {0.5, 0}, {1, 1}, {-2, 0.5}, {0, 2}, {1.5, -1}};
}  // namespace

TEMPLATE_TEST_CASE("thrust products follow eigen's alpha / beta", "[thrust][primitives][gemm]", float, double) {
  using T = TestType;
  const index_t m = 7, n = 10, k = 5;
  const Host<T> A = random_host<T>(m, k, 40), At = random_host<T>(k, m, 41), B = random_host<T>(k, n, 42),
                Bt = random_host<T>(n, k, 43), C0 = random_host<T>(m, n, 44);
  const Host<T> nan = Host<T>::Constant(m, n, std::numeric_limits<T>::quiet_NaN());
  for (const alpha_beta ab : kAlphaBeta) {
    const T alpha = static_cast<T>(ab.alpha), beta = static_cast<T>(ab.beta);
    CAPTURE(ab.alpha, ab.beta);
    const Host<T>& start = beta == T(0) ? nan : C0;  // beta == 0 must not read C
    const auto run = [&](auto op_eigen, auto op_thrust, const Host<T>& bound) {
      Host<T> want = start;
      op_eigen(want);
      auto got = lora::to_device(start);
      op_thrust(got);
      check_close<T>(lora::to_host(got), want, bound, k);
    };
    const Host<T> bound = (std::abs(alpha) * (A.cwiseAbs() * B.cwiseAbs())).eval() + std::abs(beta) * C0.cwiseAbs();
    const auto Ad = lora::to_device(A), Atd = lora::to_device(At), Bd = lora::to_device(B), Btd = lora::to_device(Bt);
    SECTION("gemm_nn") {
      run([&](Host<T>& c) { EB::gemm_nn(alpha, A, B, beta, c); },
          [&](auto& c) { TB::gemm_nn(alpha, Ad, Bd, beta, c); }, bound);
    }
    SECTION("gemm_nt") {
      const Host<T> b2 = (std::abs(alpha) * (A.cwiseAbs() * Bt.cwiseAbs().transpose())).eval() +
                         std::abs(beta) * C0.cwiseAbs();
      run([&](Host<T>& c) { EB::gemm_nt(alpha, A, Bt, beta, c); },
          [&](auto& c) { TB::gemm_nt(alpha, Ad, Btd, beta, c); }, b2);
    }
    SECTION("gemm_tn") {
      const Host<T> b2 = (std::abs(alpha) * (At.cwiseAbs().transpose() * B.cwiseAbs())).eval() +
                         std::abs(beta) * C0.cwiseAbs();
      run([&](Host<T>& c) { EB::gemm_tn(alpha, At, B, beta, c); },
          [&](auto& c) { TB::gemm_tn(alpha, Atd, Bd, beta, c); }, b2);
    }
    SECTION("static inner extent and strided views") {
      // Static k (the rank in LoRA's expand): the unrolled functor.
      const lora::device_matrix<T, lora::dynamic, 5> As = lora::to_device(lora::RowMatrix<T, lora::dynamic, 5>(A));
      run([&](Host<T>& c) { EB::gemm_nn(alpha, A, B, beta, c); },
          [&](auto& c) { TB::gemm_nn(alpha, As, Bd, beta, c); }, bound);
      // Operands and result as row windows of larger buffers (row stride > cols).
      const auto wide = lora::to_device(random_host<T>(m + 3, k + 4, 45));
      Host<T> wide_h = lora::to_host(wide);
      const lora::device_matrix_const_view<T> Av(wide.data() + 1 * (k + 4) + 2, m, k, k + 4);
      const Host<T> Ah = wide_h.block(1, 2, m, k);
      const Host<T> b3 = (std::abs(alpha) * (Ah.cwiseAbs() * B.cwiseAbs())).eval() + std::abs(beta) * C0.cwiseAbs();
      Host<T> want = start;
      EB::gemm_nn(alpha, Ah, B, beta, want);
      auto out = lora::to_device(Host<T>::Zero(m + 2, n + 3));
      lora::device_matrix_view<T> Cv(out.data() + (n + 3) + 1, m, n, n + 3);
      TB::from_host(start, Cv);
      TB::gemm_nn(alpha, Av, Bd, beta, Cv);
      check_close<T>(TB::to_host(Cv), want, b3, k);
      const Host<T> out_h = lora::to_host(out);
      CHECK(out_h.row(0).cwiseAbs().maxCoeff() == T(0));  // outside the window: untouched
      CHECK(out_h.col(0).cwiseAbs().maxCoeff() == T(0));
    }
  }
}

TEMPLATE_TEST_CASE("thrust elementwise primitives equal eigen's", "[thrust][primitives]", float, double) {
  using T = TestType;
  const index_t rows = 6, cols = 7;
  const Host<T> X = random_host<T>(rows, cols, 50), Y0 = random_host<T>(rows, cols, 51);
  const auto Xd = lora::to_device(X);
  const Host<T> nan = Host<T>::Constant(rows, cols, std::numeric_limits<T>::quiet_NaN());

  SECTION("axpby") {
    for (const alpha_beta ab : kAlphaBeta) {
      const T alpha = static_cast<T>(ab.alpha), beta = static_cast<T>(ab.beta);
      Host<T> want = beta == T(0) ? nan : Y0;
      auto got = lora::to_device(want);
      EB::axpby(alpha, X, beta, want);
      TB::axpby(alpha, Xd, beta, got);
      check_close<T>(lora::to_host(got), want, (X.cwiseAbs() * std::abs(alpha) + Y0.cwiseAbs() * std::abs(beta)).eval(), 1);
      TB::axpby(T(0), got, T(3), got);  // aliased, as the evaluators' scale() does
      EB::axpby(T(0), want, T(3), want);
      check_close<T>(lora::to_host(got), want, (3 * want.cwiseAbs()).eval(), 1);
    }
  }
  SECTION("fill, copy, resize") {
    lora::device_matrix<T> d;
    TB::resize(d, 3, 4);
    TB::fill(d, T(2.5));
    CHECK(lora::to_host(d) == Host<T>::Constant(3, 4, T(2.5)));
    TB::copy(Xd, d);  // an owned destination takes the source's shape
    CHECK(lora::to_host(d) == X);
    lora::device_matrix_view<T> v = d.view();
    CHECK_THROWS_AS(TB::resize(v, 2, 2), lora::shape_error);  // a view cannot resize
    CHECK_THROWS_AS(TB::copy(lora::device_matrix<T>(2, 2), v), lora::shape_error);
    CHECK_THROWS_AS((lora::device_matrix<T, 4, lora::dynamic>(3, 2)), lora::shape_error);
  }
  SECTION("add_to_rows and sum_rows") {
    const Eigen::Matrix<T, Eigen::Dynamic, 1> b = random_host<T>(cols, 1, 52);
    const auto bd = lora::to_device(b);
    Host<T> want = Y0;
    auto got = lora::to_device(Y0);
    EB::add_to_rows(T(0.5), b, want);
    TB::add_to_rows(T(0.5), bd, got);
    check_close<T>(lora::to_host(got), want, (Y0.cwiseAbs() + Host<T>::Ones(rows, cols)).eval(), 1);
    for (const alpha_beta ab : kAlphaBeta) {
      const T alpha = static_cast<T>(ab.alpha), beta = static_cast<T>(ab.beta);
      Eigen::Matrix<T, Eigen::Dynamic, 1> db = b;
      if (beta == T(0)) db.setConstant(std::numeric_limits<T>::quiet_NaN());
      auto dbd = lora::to_device(db);
      EB::sum_rows(alpha, X, beta, db);
      TB::sum_rows(alpha, Xd, beta, dbd);
      const Eigen::Matrix<T, Eigen::Dynamic, 1> bound =
          std::abs(alpha) * X.cwiseAbs().colwise().sum().transpose() + std::abs(beta) * b.cwiseAbs();
      check_close<T>(lora::to_host(dbd), db, bound, rows);
    }
    CHECK_THROWS_AS(TB::add_to_rows(T(1), lora::device_matrix<T, lora::dynamic, 1>(3), got), lora::shape_error);
  }
  SECTION("first_non_finite, element, middle_rows") {
    Host<T> h = X;
    CHECK(TB::first_non_finite(Xd) == -1);
    h(4, 2) = std::numeric_limits<T>::infinity();
    h(5, 6) = std::numeric_limits<T>::quiet_NaN();
    const auto hd = lora::to_device(h);
    CHECK(TB::first_non_finite(hd) == EB::first_non_finite(h));
    CHECK(TB::first_non_finite(hd) == 4 * cols + 2);
    CHECK(TB::element(hd, 3 * cols + 1) == EB::element(h, 3 * cols + 1));
    const auto mid = TB::middle_rows(hd, 1, 2);
    CHECK(lora::to_host(mid) == h.middleRows(1, 2));
    CHECK(TB::first_non_finite(TB::middle_rows(hd, 5, 1)) == 6);
    CHECK(TB::element(mid, cols) == h(2, 0));
    auto md = lora::to_device(h);
    TB::fill(TB::middle_rows(md, 2, 3), T(0));  // writable through the view
    h.middleRows(2, 3).setZero();
    CHECK(bit_identical(lora::to_host(md), h));
    CHECK_THROWS_AS(TB::middle_rows(hd, 5, 2), lora::shape_error);
  }
  SECTION("as_row, overlaps, to_host / from_host of strided views") {
    const lora::device_matrix<T, lora::dynamic, 1> v(5);
    const auto row = TB::as_row(v);
    CHECK(row.rows() == 1);
    CHECK(row.cols() == 5);
    CHECK(TB::overlaps(Xd, Xd));
    CHECK(TB::overlaps(TB::middle_rows(Xd, 0, 3), TB::middle_rows(Xd, 2, 2)));
    CHECK_FALSE(TB::overlaps(TB::middle_rows(Xd, 0, 2), TB::middle_rows(Xd, 2, 2)));
    CHECK_FALSE(TB::overlaps(Xd, v));
    auto big = lora::to_device(Host<T>::Zero(rows, cols + 3));
    lora::device_matrix_view<T> window(big.data() + 1, rows, cols, cols + 3);
    TB::from_host(X, window);
    CHECK(TB::to_host(window) == X);
    CHECK(lora::to_host(big).col(0).cwiseAbs().maxCoeff() == T(0));
    CHECK(lora::to_host(big).col(cols + 1).cwiseAbs().maxCoeff() == T(0));
  }
  SECTION("fill_random is eigen's fill_random") {
    Host<T> want(rows, cols);
    lora::device_matrix<T> got(rows, cols);
    EB::fill_random(want, lora::uniform_dist{-3.0, 2.0}, 77, 5);
    TB::fill_random(got, lora::uniform_dist{-3.0, 2.0}, 77, 5);
    CHECK(bit_identical(lora::to_host(got), want));
  }
  SECTION("workspace") {
    TB::workspace<T> ws;
    auto a = ws.template matrix<3>(4, 3, 0);  // (4, 3), static columns
    static_assert(decltype(a)::cols_at_compile_time == 3);
    auto b = ws.matrix(2, 5, 1);
    CHECK(ws.capacity() == 12 + 10);
    CHECK_FALSE(TB::overlaps(a, b));
    ws.matrix(1, 2, 0);
    CHECK(ws.capacity() == 22);  // grows, never shrinks
  }
}

namespace {
// A training-style update functor: each index touches only its own element.
template <class T>
struct scale_by_index {
  T* x;
  LORA_HOST_DEVICE void operator()(index_t i) const { x[i] = x[i] * static_cast<T>(i + 1); }
};
}  // namespace

TEMPLATE_TEST_CASE("thrust training primitives equal eigen's", "[thrust][primitives][train]", float, double) {
  using T = TestType;
  const Host<T> X = random_host<T>(5, 8, 60);
  Host<T> h = X;
  auto d = lora::to_device(X);
  CHECK(TB::size(d) == EB::size(h));
  EB::for_each_index(EB::size(h), scale_by_index<T>{EB::data(h)});
  TB::for_each_index(TB::size(d), scale_by_index<T>{TB::data(d)});
  CHECK(bit_identical(lora::to_host(d), h));
  CHECK(TB::squared_norm(TB::data(d), TB::size(d)) == Approx(EB::squared_norm(EB::data(h), EB::size(h))).epsilon(1e-14));
  CHECK(TB::first_non_finite(TB::data(d), TB::size(d)) == -1);
  h(3, 5) = std::numeric_limits<T>::quiet_NaN();
  d = lora::to_device(h);
  CHECK(TB::first_non_finite(TB::data(d), TB::size(d)) == EB::first_non_finite(EB::data(h), EB::size(h)));
  CHECK(TB::read(TB::data(d), 7) == EB::read(EB::data(h), 7));
  for (const alpha_beta ab : kAlphaBeta) {
    const T alpha = static_cast<T>(ab.alpha), beta = static_cast<T>(ab.beta);
    Host<T> want = random_host<T>(5, 8, 61);
    auto got = lora::to_device(want);
    EB::dropout(alpha, X, beta, want, 0.3, 123, 4);
    TB::dropout(alpha, lora::to_device(X), beta, got, 0.3, 123, 4);
    CHECK(bit_identical(lora::to_host(got), want));  // the same mask, the same arithmetic
  }
}

// ---- training end to end ---------------------------------------------------------------

TEMPLATE_TEST_CASE("thrust training step (dropout, backward, AdamW) equals eigen's", "[thrust][train]", float, double) {
  // The fine-tuning code is backend-free: the same forward, backward and AdamW
  // run on both backends from the same inputs; dropout masks are identical.
  using T = TestType;
  const index_t out = 24, in = 20, n = 6, r = 3;
  const Host<T> W = random_host<T>(out, in, 80), X = random_host<T>(n, in, 81), G = random_host<T>(n, out, 82);
  lora::AdaptedLinear host{W, lora::LowRankDelta<T>{out, in, r, {.alpha = 6}}};
  host.delta().init(lora::init::uniform_both{}, 83);
  auto dev = lora::to_device(host);
  using HL = decltype(host);
  using DL = decltype(dev);
  const auto Xd = lora::to_device(X), Gd = lora::to_device(G);

  lora::train::Tape<HL> htape;
  lora::train::Tape<DL> dtape;
  lora::train::Gradients<HL> hgrads(host);
  lora::train::Gradients<DL> dgrads(dev);
  lora::train::AdamW<T> hopt({.lr = 1e-2, .weight_decay = 0.01});
  lora::train::AdamW<T, TB> dopt({.lr = 1e-2, .weight_decay = 0.01});
  hopt.add(host, hgrads, "host");
  dopt.add(dev, dgrads, "device");
  const lora::train::Dropout drop(0.25, 5);

  Host<T> Yh(n, out), dXh(n, in);
  lora::device_matrix<T> Yd(n, out), dXd(n, in);
  for (std::uint64_t step = 0; step < 3; ++step) {
    CAPTURE(step);
    lora::train::forward(host, X, Yh, htape, drop, step);
    lora::train::forward(dev, Xd, Yd, dtape, drop, step);
    lora::train::backward(host, X, G, htape, hgrads, dXh);
    lora::train::backward(dev, Xd, Gd, dtape, dgrads, dXd);
    // Magnitude-based bounds: every entry is a short sum of O(1) products.
    const Host<T> ones_y = Host<T>::Constant(n, out, T(4 * in)), ones_x = Host<T>::Constant(n, in, T(4 * out));
    check_close<T>(lora::to_host(Yd), Yh, ones_y, in + r);
    check_close<T>(lora::to_host(dXd), dXh, ones_x, out + r);
    check_close<T>(lora::to_host(dgrads.dA()), Host<T>(hgrads.dA()), Host<T>::Constant(r, in, T(4 * n * out)), n * out);
    check_close<T>(lora::to_host(dgrads.dB()), Host<T>(hgrads.dB()), Host<T>::Constant(out, r, T(4 * n * in)), n * in);
    hopt.step();
    dopt.step();
    // AdamW's normalised step amplifies gradient rounding where g ~ 0, so the
    // parameters are compared at lr-scaled precision.
    const double tol = std::is_same_v<T, float> ? 1e-5 : 1e-12;
    CHECK((lora::to_host(dev.delta().A()) - host.delta().A()).cwiseAbs().maxCoeff() <= tol);
    CHECK((lora::to_host(dev.delta().B()) - host.delta().B()).cwiseAbs().maxCoeff() <= tol);
  }
}

// ---- transfers and errors ----------------------------------------------------------------

TEST_CASE("thrust transfers are explicit and round-trip", "[thrust][transfer]") {
  const Host<float> W = random_host<float>(12, 10, 70);
  const Eigen::VectorXf b = random_host<float>(12, 1, 71);
  lora::AdaptedLinear host{W, b, lora::LowRankDelta<float, 3>{12, 10, {.alpha = 6, .multiplier = 0.5}}};
  host.delta().init(lora::init::uniform_both{}, 72);
  const auto dev = lora::to_device(host);
  const auto back = lora::to_host(dev);
  static_assert(std::is_same_v<typename decltype(back)::backend, EB>);
  CHECK(back.base_weight() == W);
  CHECK(back.bias() == b);
  CHECK(back.delta().A() == host.delta().A());
  CHECK(back.delta().B() == host.delta().B());
  CHECK(back.delta().scale() == host.delta().scale());
  CHECK(back.delta().multiplier() == 0.5);
  host.merge();
  CHECK_THROWS_AS(lora::to_device(host), lora::value_error);
  CHECK_THROWS_WITH(lora::to_device(host), Catch::Contains("the layer is merged; unmerge() it first"));
  const lora::RowMatrix<double, 2, 3> fixed = lora::RowMatrix<double, 2, 3>::Constant(1.5);
  const auto fixed_d = lora::to_device(fixed);
  static_assert(std::is_same_v<decltype(fixed_d), const lora::device_matrix<double, 2, 3>>);
  CHECK(lora::to_host(fixed_d) == fixed);
}

TEST_CASE("thrust: bad input gets eigen's typed errors", "[thrust][errors]") {
  using Catch::Contains;
  using D = lora::LowRankDelta<float, 2, TB>;
  CHECK_THROWS_AS((lora::LowRankDelta<float, lora::dynamic, TB>(8, 4, 5)), lora::rank_error);
  CHECK_THROWS_WITH((lora::LowRankDelta<float, 4, TB>(8, 8, 2)), Contains("rank 2 given for a static rank of 4"));
  lora::device_matrix<float> W(4096, 64);
  CHECK_THROWS_WITH((lora::AdaptedLinear{W, D{64, 64}}),
                    Contains("base weight is [out, in] = [4096, 64] but the delta is [64, 64]"));
  lora::AdaptedLinear layer{W, D{4096, 64}};
  lora::device_matrix<float> X(3, 768), Y(3, 4096);
  CHECK_THROWS_AS(layer.forward(X, Y), lora::shape_error);
  CHECK_THROWS_WITH(layer.forward(X, Y), Contains("AdaptedLinear::forward: X has 768 columns, expected in_features = 64"));
  lora::device_matrix<float> X2(3, 64), Y2(2, 4096);
  CHECK_THROWS_WITH(layer.forward(X2, Y2), Contains("Y is [2, 4096], expected [n, out] = [3, 4096]"));
  CHECK_THROWS_WITH((lora::AdaptedLinear{W, lora::device_matrix<float, lora::dynamic, 1>(10), D{4096, 64}}),
                    Contains("bias has 10 entries, expected out_features = 4096"));
  lora::device_matrix<float> sq(8, 8), XY(2, 8);
  lora::AdaptedLinear square{sq, D{8, 8}};
  CHECK_THROWS_WITH(square.forward(XY, XY), Contains("X and Y share memory"));
  CHECK_THROWS_AS(TB::gemm_nt(1.0f, X, W, 0.0f, Y), lora::shape_error);
}

// ---- QLoRA: an NF4 base on the device --------------------------------------------------
// The reference is the Eigen QLoRA layer (AdaptedLinear<NF4Matrix, ...>) over the same bytes.
// Dequantised values must match NF4Matrix::dequantize() bit for bit (same decode, same
// roundings). Products sum in another order than the host's NF4 kernels (which also factor
// the block scale out of each row's partial sums), so they agree to rounding within the
// dense cases' bound with deq(W) for W:
//   |dev - eigen| <= 2 (k + 2) eps * (|X| |deq(W)|^T + |s| |X| |A|^T |B|^T + |b|),  k = in + r
// i.e. a relative tolerance of 2 (k + 2) eps (5.0e-5 at in = 200) of the sum of absolute terms.

namespace {

using HostNF4 = lora::NF4Matrix;

template <int R>
auto make_host_qlora(index_t out, index_t in, index_t r, bool dq, bool bias, index_t block = 64) {
  const Host<float> W = random_host<float>(out, in, 90);
  HostNF4 Wq = HostNF4::quantize(W, {.block_size = block, .double_quant = dq});
  using Delta = lora::LowRankDelta<float, R>;
  Delta delta(out, in, r, {.alpha = 2.0 * double(r)});
  delta.init(lora::init::uniform_both{}, 91);
  using Layer = lora::AdaptedLinear<HostNF4, Delta>;
  if (bias) return Layer(std::move(Wq), Eigen::VectorXf(random_host<float>(out, 1, 92)), std::move(delta));
  return Layer(std::move(Wq), std::move(delta));
}

// |X| |deq(W) + s B A|^T + |b| as sums of absolute terms; `keep` scales the
// adapter term (1 / (1 - p) under dropout).
template <class Layer>
Host<float> qlora_forward_bound(const Layer& host, const Host<float>& X, float keep = 1.0f) {
  const Host<float> Wd = host.base_weight().dequantize();
  const float s = std::abs(host.delta().scale()) * keep;
  Host<float> bound = X.cwiseAbs() * Wd.cwiseAbs().transpose();
  bound += s * (X.cwiseAbs() * host.delta().A().cwiseAbs().transpose()) * host.delta().B().cwiseAbs().transpose();
  if (host.has_bias()) bound.rowwise() += host.bias().cwiseAbs().transpose();
  return bound;
}

// |G| |deq(W) + s B A|: the bound of dX.
template <class Layer>
Host<float> qlora_backward_bound(const Layer& host, const Host<float>& G, float keep = 1.0f) {
  const Host<float> Wd = host.base_weight().dequantize();
  const float s = std::abs(host.delta().scale()) * keep;
  return G.cwiseAbs() * Wd.cwiseAbs() + s * (G.cwiseAbs() * host.delta().B().cwiseAbs()) * host.delta().A().cwiseAbs();
}

// in = 64 / 96 / 256 are multiples of 8 (the CUDA kernel's word path); 7, 67,
// 131, 200 are not, and their 64-blocks span rows; n = 1 and n <= 16 take the
// CUDA kernel under nvcc, n = 17 the functor everywhere.
const shape kQShapes[] = {{8, 64, 1}, {33, 67, 1}, {70, 131, 3}, {13, 7, 5}, {48, 200, 17}, {129, 256, 16}, {40, 96, 2}};

}  // namespace

TEMPLATE_TEST_CASE_SIG("thrust qlora forward equals the eigen qlora layer", "[thrust][qlora]", ((int R), R), 3,
                       lora::dynamic) {
  const bool with_bias = GENERATE(false, true);
  for (const shape& sh : kQShapes) {
    for (const bool dq : {false, true}) {
      CAPTURE(sh.out, sh.in, sh.n, dq, with_bias);
      const auto host = make_host_qlora<R>(sh.out, sh.in, 3, dq, with_bias);
      const auto dev = lora::to_device(host);
      static_assert(std::is_same_v<typename decltype(dev)::base_type, lora::device_nf4_matrix>);
      static_assert(std::is_same_v<typename decltype(dev)::backend, TB>);
      static_assert(decltype(dev)::base_is_quantized && !decltype(dev)::base_is_writable);
      REQUIRE(dev.has_bias() == with_bias);
      // The compressed format on the device: the host's bytes, nothing dense.
      CHECK(dev.base_weight().storage_bytes() == host.base_weight().storage_bytes());
      CHECK(dev.base_weight().packed().size() == host.base_weight().packed().size());
      CHECK(bit_identical(dev.base_weight().dequantize_to_host(), host.base_weight().dequantize()));

      const Host<float> X = random_host<float>(sh.n, sh.in, 93);
      const auto Xd = lora::to_device(X);
      const Host<float> want = host.forward(X);
      const Host<float> bound = qlora_forward_bound(host, X);
      const index_t terms = sh.in + 3;
      check_close<float>(lora::to_host(dev.forward(Xd)), want, bound, terms);

      // Into a NaN-filled buffer (beta = 0 must not read it) with a reused workspace.
      lora::device_matrix<float> Y =
          lora::to_device(Host<float>::Constant(sh.n, sh.out, std::numeric_limits<float>::quiet_NaN()));
      typename decltype(dev)::workspace ws;
      dev.forward(Xd, Y, ws);
      check_close<float>(lora::to_host(Y), want, bound, terms);
      CHECK(ws.capacity() == sh.n * 3);  // the [n, r] intermediate only: W is never expanded
      dev.forward(Xd, lora::view(Y), ws);
      check_close<float>(lora::to_host(Y), want, bound, terms);

      if (sh.n == 1) {  // one token as a vector
        const Eigen::VectorXf x = X.row(0).transpose();
        const lora::device_matrix<float, lora::dynamic, 1> xd = lora::to_device(x);
        const Eigen::VectorXf got = lora::to_host(dev.forward(xd));
        check_close<float>(Host<float>(got.transpose()), Host<float>(host.forward(x).transpose()), bound, terms);
      }
    }
  }
}

TEST_CASE("thrust qlora: dequantised device values are NF4Matrix::dequantize() bit for bit", "[thrust][qlora]") {
  const std::vector<float> other_map = lora::dynamic_map::create_dynamic_map();  // 4 entries differ by 1 ulp
  struct qcase {
    index_t out, in, block;
    bool dq, custom_map;
  };
  const qcase cases[] = {{7, 9, 64, false, false},    {7, 9, 32, true, false},     {33, 67, 64, true, false},
                         {33, 67, 64, true, true},    {24, 160, 4096, true, false}, {24, 160, 128, false, false},
                         {300, 300, 64, true, false}, {5, 1, 32, false, false}};  // 300^2/64 > 256: two 256-groups
  for (const qcase& c : cases) {
    CAPTURE(c.out, c.in, c.block, c.dq, c.custom_map);
    Host<float> W = random_host<float>(c.out, c.in, 94);
    W.row(c.out / 2).setZero();  // all-zero blocks decode to +0
    lora::NF4Options opt{.block_size = c.block, .double_quant = c.dq};
    if (c.custom_map) opt.map8 = other_map;
    const HostNF4 q = HostNF4::quantize(W, opt);
    const lora::device_nf4_matrix d = lora::to_device(q);
    CHECK(d.rows() == c.out);
    CHECK(d.cols() == c.in);
    CHECK(d.block_size() == c.block);
    CHECK(d.double_quantized() == c.dq);
    CHECK(d.storage_bytes() == q.storage_bytes());
    CHECK(d.bits_per_parameter() == q.bits_per_parameter());
    const Host<float> want = q.dequantize();
    CHECK(bit_identical(d.dequantize_to_host(), want));
    CHECK(bit_identical(lora::to_host(d.dequantize()), want));

    // The bytes come back unchanged (and the map with them).
    const HostNF4 back = lora::to_host(d);
    CHECK(std::ranges::equal(back.packed(), q.packed()));
    CHECK(std::ranges::equal(back.absmax(), q.absmax()));
    CHECK(std::ranges::equal(back.absmax_q8(), q.absmax_q8()));
    CHECK(std::ranges::equal(back.absmax2(), q.absmax2()));
    CHECK(std::ranges::equal(back.map8(), q.map8()));
    CHECK(bit_identical(Host<float>(back.dequantize()), want));

    // Through the expression node: materialise, and assign with alpha / beta on a slice.
    lora::AdaptedLinear layer{d, lora::LowRankDelta<float, 1, TB>{c.out, c.in}};
    CHECK(bit_identical(lora::to_host(lora::expr::materialize(layer.base_expression())), want));
    if (c.out >= 3) {
      const index_t r0 = 1, nr = c.out - 2;
      auto D = lora::to_device(Host<float>::Ones(nr, c.in));
      lora::expr::assign(D, lora::expr::slice_rows(layer.base_expression(), r0, nr), 2.0f, 0.5f);
      const Host<float> expected = (0.5f * Host<float>::Ones(nr, c.in) + 2.0f * want.middleRows(r0, nr)).eval();
      check_close<float>(lora::to_host(D), expected, (0.5f + 2.0f * want.middleRows(r0, nr).cwiseAbs().array()).matrix().eval(), 1);
      const Host<float> part = lora::to_host(lora::expr::materialize(lora::expr::slice_rows(layer.base_expression(), r0, nr)));
      CHECK(bit_identical(part, Host<float>(want.middleRows(r0, nr))));
    }
  }
}

TEMPLATE_TEST_CASE_SIG("thrust qlora backward: dX through deq(W), dA, dB, db equal eigen's", "[thrust][qlora][train]",
                       ((int R), R), 4, lora::dynamic) {
  const double p = GENERATE(0.0, 0.25);
  for (const shape& sh : {shape{48, 64, 1}, shape{37, 131, 9}, shape{64, 128, 32}}) {
    CAPTURE(sh.out, sh.in, sh.n, p);
    const index_t r = 4;
    auto host = make_host_qlora<R>(sh.out, sh.in, r, true, true);
    auto dev = lora::to_device(host);
    using HL = decltype(host);
    using DL = decltype(dev);
    const Host<float> X = random_host<float>(sh.n, sh.in, 95), G = random_host<float>(sh.n, sh.out, 96);
    const auto Xd = lora::to_device(X), Gd = lora::to_device(G);
    const lora::train::Dropout drop(p, 9);
    lora::train::Tape<HL> htape;
    lora::train::Tape<DL> dtape;
    lora::train::Gradients<HL> hgrads(host);
    lora::train::Gradients<DL> dgrads(dev);
    Host<float> Yh(sh.n, sh.out), dXh(sh.n, sh.in);
    lora::device_matrix<float> Yd(sh.n, sh.out), dXd(sh.n, sh.in);
    lora::train::forward(host, X, Yh, htape, drop, 2);
    lora::train::forward(dev, Xd, Yd, dtape, drop, 2);
    lora::train::backward(host, X, G, htape, hgrads, dXh);
    lora::train::backward(dev, Xd, Gd, dtape, dgrads, dXd);

    const float keep = static_cast<float>(1.0 / (1.0 - p));
    const float s = std::abs(host.delta().scale()) * keep;
    const auto& A = host.delta().A();
    const auto& B = host.delta().B();
    check_close<float>(lora::to_host(Yd), Yh, qlora_forward_bound(host, X, keep), sh.in + r);
    check_close<float>(lora::to_host(dXd), dXh, qlora_backward_bound(host, G, keep), sh.out + r);
    // dB = s G^T (D A^T), dA = s (G B)^T D, db = sum_t G[t, :]; D = drop(X).
    const Host<float> bdB = s * (G.cwiseAbs().transpose() * (X.cwiseAbs() * A.cwiseAbs().transpose()));
    const Host<float> bdA = s * ((G.cwiseAbs() * B.cwiseAbs()).transpose() * X.cwiseAbs());
    const Eigen::VectorXf bdb = G.cwiseAbs().colwise().sum().transpose();
    check_close<float>(lora::to_host(dgrads.dB()), Host<float>(hgrads.dB()), bdB, sh.n + sh.in);
    check_close<float>(lora::to_host(dgrads.dA()), Host<float>(hgrads.dA()), bdA, sh.n + sh.out);
    check_close<float>(lora::to_host(dgrads.db()), hgrads.db(), bdb, sh.n);
  }
}

TEST_CASE("thrust qlora expressions: slices, materialise, first_non_finite", "[thrust][qlora][expr]") {
  auto host = make_host_qlora<lora::dynamic>(50, 67, 5, true, false);
  auto dev = lora::to_device(host);
  const Host<float> Wd = host.base_weight().dequantize();
  const Host<float> ref = lora::expr::materialize(host.unmerged_expression());
  const Host<float> dense_bound =
      Wd.cwiseAbs() + std::abs(host.delta().scale()) * host.delta().B().cwiseAbs() * host.delta().A().cwiseAbs();
  check_close<float>(lora::to_host(lora::expr::materialize(dev.unmerged_expression())), ref, dense_bound, 5);
  check_close<float>(lora::to_host(lora::expr::materialize(dev.weight())), ref, dense_bound, 5);
  CHECK(lora::expr::first_non_finite(dev.unmerged_expression(), 7) == -1);

  const Host<float> X = random_host<float>(4, 67, 97), G = random_host<float>(4, 20, 98);
  const auto Xd = lora::to_device(X), Gd = lora::to_device(G);
  const auto hslice = lora::expr::slice_rows(host.unmerged_expression(), 13, 20);
  const auto dslice = lora::expr::slice_rows(dev.unmerged_expression(), 13, 20);
  lora::expr::workspace_t<decltype(hslice)> hws;
  lora::expr::workspace_t<decltype(dslice)> dws;
  const Host<float> Y0 = random_host<float>(4, 20, 99), dX0 = random_host<float>(4, 67, 100);
  Host<float> Yh = Y0, dXh = dX0;
  auto Yd = lora::to_device(Y0), dXd = lora::to_device(dX0);
  lora::expr::apply(hslice, X, Yh, 0.5f, 2.0f, hws);  // BLAS alpha / beta through the slice
  lora::expr::apply(dslice, Xd, Yd, 0.5f, 2.0f, dws);
  const Host<float> sref = ref.middleRows(13, 20);
  check_close<float>(lora::to_host(Yd), Yh, (0.5f * X.cwiseAbs() * dense_bound.middleRows(13, 20).transpose() +
                                             2.0f * Y0.cwiseAbs()).eval(), 67 + 5);
  lora::expr::apply_transposed(hslice, G, dXh, 1.0f, 0.0f, hws);
  lora::expr::apply_transposed(dslice, Gd, dXd, 1.0f, 0.0f, dws);
  check_close<float>(lora::to_host(dXd), dXh, (G.cwiseAbs() * dense_bound.middleRows(13, 20)).eval(), 20 + 5);
  CHECK((lora::to_host(dXd) - G * sref).cwiseAbs().maxCoeff() < 1e-4f * (G.cwiseAbs() * sref.cwiseAbs()).maxCoeff());

  // A huge B makes W + s B A overflow: the same flat index on both backends.
  host.delta().B()(17, 2) = 3e38f;
  host.delta().A().row(2).setConstant(4.0f);
  dev.delta().B() = lora::to_device(host.delta().B());
  dev.delta().A() = lora::to_device(host.delta().A());
  CHECK(lora::expr::first_non_finite(host.unmerged_expression(), 8) == 17 * 67);
  CHECK(lora::expr::first_non_finite(dev.unmerged_expression(), 8) == 17 * 67);

  // The layer moves back with its bytes.
  const auto back = lora::to_host(dev);
  static_assert(std::is_same_v<typename decltype(back)::base_type, HostNF4>);
  CHECK(std::ranges::equal(back.base_weight().packed(), host.base_weight().packed()));
  CHECK(std::ranges::equal(back.base_weight().absmax_q8(), host.base_weight().absmax_q8()));
}

TEST_CASE("thrust qlora: bad input gets the eigen qlora layer's typed errors", "[thrust][qlora][errors]") {
  const Host<float> W = random_host<float>(16, 64, 101);
  const HostNF4 Wq = HostNF4::quantize(W);
  const lora::device_nf4_matrix Wd = lora::to_device(Wq);
  const auto message = [](auto&& f) -> std::string {
    try {
      f();
    } catch (const lora::shape_error& e) {
      return e.what();
    }
    return "no shape_error";
  };
  const std::string hctor = message([&] { (void)lora::AdaptedLinear(Wq, lora::LowRankDelta<float, 2>(16, 32)); });
  const std::string dctor = message([&] { (void)lora::AdaptedLinear(Wd, lora::LowRankDelta<float, 2, TB>(16, 32)); });
  CHECK_THAT(dctor, Catch::Contains("base weight is [out, in] = [16, 64] but the delta is [16, 32]"));
  CHECK(dctor == hctor);

  const lora::AdaptedLinear host(Wq, lora::LowRankDelta<float, 2>(16, 64));
  const lora::AdaptedLinear dev(Wd, lora::LowRankDelta<float, 2, TB>(16, 64));
  Host<float> X(3, 63), Y(3, 16), X2(3, 64), Y2(2, 16);
  lora::device_matrix<float> Xd(3, 63), Yd(3, 16), X2d(3, 64), Y2d(2, 16);
  const std::string hx = message([&] { host.forward(X, Y); }), dx = message([&] { dev.forward(Xd, Yd); });
  CHECK_THAT(dx, Catch::Contains("X has 63 columns, expected in_features = 64"));
  CHECK(dx == hx);
  const std::string hy = message([&] { host.forward(X2, Y2); }), dy = message([&] { dev.forward(X2d, Y2d); });
  CHECK_THAT(dy, Catch::Contains("Y is [2, 16], expected [n, out] = [3, 16]"));
  CHECK(dy == hy);

  // The primitives check their own operands (rows of the slice, shapes).
  using QT = lora::quantized_traits<lora::device_nf4_matrix>;
  lora::device_matrix<float> Ys(3, 10), D(10, 64), G(3, 10), dX(3, 64);
  CHECK_THROWS_AS(QT::gemm_nt(Wd, 0, 10, 1.0f, Xd, 0.0f, Ys), lora::shape_error);  // X has 63 columns
  CHECK_THROWS_WITH(QT::gemm_nt(Wd, 10, 10, 1.0f, X2d, 0.0f, Ys), Catch::Contains("rows [10, 20) are outside [0, 16)"));
  CHECK_THROWS_AS(QT::gemm_nn(Wd, 0, 10, 1.0f, G, 0.0f, Yd), lora::shape_error);
  CHECK_THROWS_AS(QT::assign(Wd, 0, 9, 1.0f, 0.0f, D), lora::shape_error);
  QT::gemm_nn(Wd, 6, 10, 1.0f, G, 0.0f, dX);  // the right shapes go through

  // Memory accounting counts the NF4 bytes on the device as on the host.
  CHECK(lora::train::memory_usage(dev).frozen_bytes == lora::train::memory_usage(host).frozen_bytes);
}

#if LORA_THRUST_ON_CUDA && LORA_THRUST_NF4_CUDA_KERNEL
TEST_CASE("thrust qlora (CUDA): the small-n kernel equals the generic functor", "[thrust][qlora][cuda]") {
  using QT = lora::quantized_traits<lora::device_nf4_matrix>;
  for (const shape& sh : {shape{37, 64, 1}, shape{37, 67, 2}, shape{129, 256, 3}, shape{65, 131, 8},
                          shape{300, 200, 13}, shape{96, 4096, 16}}) {
    for (const bool dq : {false, true}) {
      CAPTURE(sh.out, sh.in, sh.n, dq);
      REQUIRE(lora::cuda::nf4_gemm_nt_small::can_implement(sh.n, sh.out));
      const HostNF4 q = HostNF4::quantize(random_host<float>(sh.out, sh.in, 102), {.double_quant = dq});
      const lora::device_nf4_matrix d = lora::to_device(q);
      const Host<float> X = random_host<float>(sh.n, sh.in, 103), Y0 = random_host<float>(sh.n, sh.out - 3, 104);
      const auto Xd = lora::to_device(X);
      const Host<float> Wd = q.dequantize();
      const Host<float> bound = (0.5f * X.cwiseAbs() * Wd.middleRows(2, sh.out - 3).cwiseAbs().transpose() +
                                 1.5f * Y0.cwiseAbs()).eval();
      auto kernel = lora::to_device(Y0), functor = lora::to_device(Y0);
      QT::gemm_nt(d, 2, sh.out - 3, 0.5f, Xd, 1.5f, kernel);  // a slice, with alpha / beta
      QT::gemm_nt_functor(d, 2, sh.out - 3, 0.5f, Xd.view(), 1.5f, functor.view());
      check_close<float>(lora::to_host(kernel), lora::to_host(functor), bound, sh.in);
      const Host<float> want = (1.5f * Y0 + 0.5f * X * Wd.middleRows(2, sh.out - 3).transpose()).eval();
      check_close<float>(lora::to_host(kernel), want, bound, sh.in);
    }
  }
}
#endif

#if LORA_THRUST_ON_CUDA
// No device (CI, this session's machines): say so and report a CTest skip.
int main(int argc, char* argv[]) {
  if (!lora::cuda::device_available()) {
    std::printf("test_conformance (CUDA): no CUDA device present; skipping (built and linked only)\n");
    return 77;  // SKIP_RETURN_CODE
  }
  return Catch::Session().run(argc, argv);
}
#endif
