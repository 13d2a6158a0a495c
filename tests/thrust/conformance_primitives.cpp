// Thrust conformance, part 2: primitives with alpha / beta, training end to end,
// transfers and typed errors.
#include "conformance.hpp"

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
      const lora::DeviceMatrix<T, lora::dynamic, 5> As = lora::to_device(lora::RowMatrix<T, lora::dynamic, 5>(A));
      run([&](Host<T>& c) { EB::gemm_nn(alpha, A, B, beta, c); },
          [&](auto& c) { TB::gemm_nn(alpha, As, Bd, beta, c); }, bound);
      // Operands and result as row windows of larger buffers (row stride > cols).
      const auto wide = lora::to_device(random_host<T>(m + 3, k + 4, 45));
      Host<T> wide_h = lora::to_host(wide);
      const lora::DeviceMatrixConstView<T> Av(wide.data() + 1 * (k + 4) + 2, m, k, k + 4);
      const Host<T> Ah = wide_h.block(1, 2, m, k);
      const Host<T> b3 = (std::abs(alpha) * (Ah.cwiseAbs() * B.cwiseAbs())).eval() + std::abs(beta) * C0.cwiseAbs();
      Host<T> want = start;
      EB::gemm_nn(alpha, Ah, B, beta, want);
      auto out = lora::to_device(Host<T>::Zero(m + 2, n + 3));
      lora::DeviceMatrixView<T> Cv(out.data() + (n + 3) + 1, m, n, n + 3);
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
    lora::DeviceMatrix<T> d;
    TB::resize(d, 3, 4);
    TB::fill(d, T(2.5));
    CHECK(lora::to_host(d) == Host<T>::Constant(3, 4, T(2.5)));
    TB::copy(Xd, d);  // an owned destination takes the source's shape
    CHECK(lora::to_host(d) == X);
    lora::DeviceMatrixView<T> v = d.view();
    CHECK_THROWS_AS(TB::resize(v, 2, 2), lora::ShapeError);  // a view cannot resize
    CHECK_THROWS_AS(TB::copy(lora::DeviceMatrix<T>(2, 2), v), lora::ShapeError);
    CHECK_THROWS_AS((lora::DeviceMatrix<T, 4, lora::dynamic>(3, 2)), lora::ShapeError);
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
    CHECK_THROWS_AS(TB::add_to_rows(T(1), lora::DeviceMatrix<T, lora::dynamic, 1>(3), got), lora::ShapeError);
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
    CHECK_THROWS_AS(TB::middle_rows(hd, 5, 2), lora::ShapeError);
  }
  SECTION("as_row, overlaps, to_host / from_host of strided views") {
    const lora::DeviceMatrix<T, lora::dynamic, 1> v(5);
    const auto row = TB::as_row(v);
    CHECK(row.rows() == 1);
    CHECK(row.cols() == 5);
    CHECK(TB::overlaps(Xd, Xd));
    CHECK(TB::overlaps(TB::middle_rows(Xd, 0, 3), TB::middle_rows(Xd, 2, 2)));
    CHECK_FALSE(TB::overlaps(TB::middle_rows(Xd, 0, 2), TB::middle_rows(Xd, 2, 2)));
    CHECK_FALSE(TB::overlaps(Xd, v));
    auto big = lora::to_device(Host<T>::Zero(rows, cols + 3));
    lora::DeviceMatrixView<T> window(big.data() + 1, rows, cols, cols + 3);
    TB::from_host(X, window);
    CHECK(TB::to_host(window) == X);
    CHECK(lora::to_host(big).col(0).cwiseAbs().maxCoeff() == T(0));
    CHECK(lora::to_host(big).col(cols + 1).cwiseAbs().maxCoeff() == T(0));
  }
  SECTION("fill_random is eigen's fill_random") {
    Host<T> want(rows, cols);
    lora::DeviceMatrix<T> got(rows, cols);
    EB::fill_random(want, lora::UniformDist{-3.0, 2.0}, 77, 5);
    TB::fill_random(got, lora::UniformDist{-3.0, 2.0}, 77, 5);
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
  host.delta().init(lora::init::UniformBoth{}, 83);
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
  lora::DeviceMatrix<T> Yd(n, out), dXd(n, in);
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
  host.delta().init(lora::init::UniformBoth{}, 72);
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
  CHECK_THROWS_AS(lora::to_device(host), lora::ValueError);
  CHECK_THROWS_WITH(lora::to_device(host), Catch::Contains("the layer is merged; unmerge() it first"));
  const lora::RowMatrix<double, 2, 3> fixed = lora::RowMatrix<double, 2, 3>::Constant(1.5);
  const auto fixed_d = lora::to_device(fixed);
  static_assert(std::is_same_v<decltype(fixed_d), const lora::DeviceMatrix<double, 2, 3>>);
  CHECK(lora::to_host(fixed_d) == fixed);
}

TEST_CASE("thrust: bad input gets eigen's typed errors", "[thrust][errors]") {
  using Catch::Contains;
  using D = lora::LowRankDelta<float, 2, TB>;
  CHECK_THROWS_AS((lora::LowRankDelta<float, lora::dynamic, TB>(8, 4, 5)), lora::RankError);
  CHECK_THROWS_WITH((lora::LowRankDelta<float, 4, TB>(8, 8, 2)), Contains("rank 2 given for a static rank of 4"));
  lora::DeviceMatrix<float> W(4096, 64);
  CHECK_THROWS_WITH((lora::AdaptedLinear{W, D{64, 64}}),
                    Contains("base weight is [out, in] = [4096, 64] but the delta is [64, 64]"));
  lora::AdaptedLinear layer{W, D{4096, 64}};
  lora::DeviceMatrix<float> X(3, 768), Y(3, 4096);
  CHECK_THROWS_AS(layer.forward(X, Y), lora::ShapeError);
  CHECK_THROWS_WITH(layer.forward(X, Y), Contains("AdaptedLinear::forward: X has 768 columns, expected in_features = 64"));
  lora::DeviceMatrix<float> X2(3, 64), Y2(2, 4096);
  CHECK_THROWS_WITH(layer.forward(X2, Y2), Contains("Y is [2, 4096], expected [n, out] = [3, 4096]"));
  CHECK_THROWS_WITH((lora::AdaptedLinear{W, lora::DeviceMatrix<float, lora::dynamic, 1>(10), D{4096, 64}}),
                    Contains("bias has 10 entries, expected out_features = 4096"));
  lora::DeviceMatrix<float> sq(8, 8), XY(2, 8);
  lora::AdaptedLinear square{sq, D{8, 8}};
  CHECK_THROWS_WITH(square.forward(XY, XY), Contains("X and Y share memory"));
  CHECK_THROWS_AS(TB::gemm_nt(1.0f, X, W, 0.0f, Y), lora::ShapeError);
}
