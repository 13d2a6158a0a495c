// Conformance, part 2: the backend's primitives with alpha / beta (against the
// reference loops), training end to end (against ref::forward / backward /
// AdamW), transfers and typed errors.
#include "conformance.hpp"

// ---- primitives, alpha / beta --------------------------------------------------------

namespace {
struct alpha_beta {
  double alpha, beta;
};
const alpha_beta kAlphaBeta[] = {{1, 0}, {0.5, 0}, {1, 1}, {-2, 0.5}, {0, 2}, {1.5, -1}};
}  // namespace

TEMPLATE_TEST_CASE("products follow BLAS's alpha / beta", "[conformance][primitives][gemm]", float, double) {
  using T = TestType;
  const index_t m = 7, n = 10, k = 5;
  const Host<T> A = random_host<T>(m, k, 40), At = random_host<T>(k, m, 41), B = random_host<T>(k, n, 42),
                Bt = random_host<T>(n, k, 43), C0 = random_host<T>(m, n, 44);
  const Host<T> nan = Host<T>::Constant(m, n, std::numeric_limits<T>::quiet_NaN());
  for (const alpha_beta ab : kAlphaBeta) {
    const T alpha = static_cast<T>(ab.alpha), beta = static_cast<T>(ab.beta);
    CAPTURE(ab.alpha, ab.beta);
    const Host<T>& start = beta == T(0) ? nan : C0;  // beta == 0 must not read C
    const auto run = [&](auto op, const ref::Sum& want) {
      auto got = on_backend(start);
      op(got);
      check_close<T>(on_host(got), want, k);
    };
    const auto Ad = on_backend(A), Atd = on_backend(At), Bd = on_backend(B), Btd = on_backend(Bt);
    SECTION("gemm_nn") {
      run([&](auto& c) { BK::gemm_nn(alpha, Ad, Bd, beta, c); }, ref::gemm_nn(alpha, A, B, beta, C0));
    }
    SECTION("gemm_nt") {
      run([&](auto& c) { BK::gemm_nt(alpha, Ad, Btd, beta, c); }, ref::gemm_nt(alpha, A, Bt, beta, C0));
    }
    SECTION("gemm_tn") {
      run([&](auto& c) { BK::gemm_tn(alpha, Atd, Bd, beta, c); }, ref::gemm_tn(alpha, At, B, beta, C0));
    }
    SECTION("static inner extent and strided views") {
      // Static k (the rank in LoRA's expand): the unrolled functor.
      const auto As = on_backend(lora::RowMatrix<T, lora::dynamic, 5>(A));
      static_assert(lora::matrix_traits_t<decltype(As)>::cols == 5);
      run([&](auto& c) { BK::gemm_nn(alpha, As, Bd, beta, c); }, ref::gemm_nn(alpha, A, B, beta, C0));
      // Operands and result as row windows of larger buffers (row stride > cols).
      const auto wide = on_backend(random_host<T>(m + 3, k + 4, 45));
      const Host<T> wide_h = on_host(wide);
      const auto Av = b_strided_view(wide.data() + 1 * (k + 4) + 2, m, k, k + 4);
      const Host<T> Ah = wide_h.block(1, 2, m, k);
      auto out = on_backend(Host<T>::Zero(m + 2, n + 3));
      auto Cv = b_strided_view(out.data() + (n + 3) + 1, m, n, n + 3);
      BK::from_host(start, Cv);
      BK::gemm_nn(alpha, Av, Bd, beta, Cv);
      check_close<T>(BK::to_host(Cv), ref::gemm_nn(alpha, Ah, B, beta, C0), k);
      const Host<T> out_h = on_host(out);
      CHECK(out_h.row(0).cwiseAbs().maxCoeff() == T(0));  // outside the window: untouched
      CHECK(out_h.col(0).cwiseAbs().maxCoeff() == T(0));
    }
  }
}

TEMPLATE_TEST_CASE("elementwise primitives equal the reference loops", "[conformance][primitives]", float, double) {
  using T = TestType;
  const index_t rows = 6, cols = 7;
  const Host<T> X = random_host<T>(rows, cols, 50), Y0 = random_host<T>(rows, cols, 51);
  const auto Xd = on_backend(X);
  const Host<T> nan = Host<T>::Constant(rows, cols, std::numeric_limits<T>::quiet_NaN());

  SECTION("axpby") {
    for (const alpha_beta ab : kAlphaBeta) {
      const T alpha = static_cast<T>(ab.alpha), beta = static_cast<T>(ab.beta);
      auto got = on_backend(beta == T(0) ? nan : Y0);
      BK::axpby(alpha, Xd, beta, got);
      const ref::Sum want = ref::axpby(alpha, X, beta, Y0);
      check_close<T>(on_host(got), want, 1);
      BK::axpby(T(0), got, T(3), got);  // aliased, as the evaluators' scale() does
      check_close<T>(on_host(got), ref::scaled(3, want), 2);
    }
  }
  SECTION("fill, copy, resize") {
    BMatrix<T> d;
    BK::resize(d, 3, 4);
    BK::fill(d, T(2.5));
    CHECK(on_host(d) == Host<T>::Constant(3, 4, T(2.5)));
    BK::copy(Xd, d);  // an owned destination takes the source's shape
    CHECK(on_host(d) == X);
#if !defined(LORA_CONFORMANCE_BACKEND_EIGEN)  // Eigen asserts these (debug builds) instead of throwing
    lora::DeviceMatrixView<T> v = d.view();
    CHECK_THROWS_AS(TB::resize(v, 2, 2), lora::ShapeError);  // a view cannot resize
    CHECK_THROWS_AS(TB::copy(lora::DeviceMatrix<T>(2, 2), v), lora::ShapeError);
    CHECK_THROWS_AS((lora::DeviceMatrix<T, 4, lora::dynamic>(3, 2)), lora::ShapeError);
#endif
  }
  SECTION("add_to_rows and sum_rows") {
    const HostVector<T> b = random_host<T>(cols, 1, 52);
    const auto bd = on_backend(b);
    auto got = on_backend(Y0);
    BK::add_to_rows(T(0.5), bd, got);
    check_close<T>(on_host(got), ref::add_to_rows(ref::scaled(1, Y0), 0.5, b), 1);
    for (const alpha_beta ab : kAlphaBeta) {
      const T alpha = static_cast<T>(ab.alpha), beta = static_cast<T>(ab.beta);
      HostVector<T> db = b;
      if (beta == T(0)) db.setConstant(std::numeric_limits<T>::quiet_NaN());
      auto dbd = on_backend(db);
      BK::sum_rows(alpha, Xd, beta, dbd);
      check_close<T>(on_host(dbd), ref::sum_rows(alpha, X, beta, b), rows);
    }
#if !defined(LORA_CONFORMANCE_BACKEND_EIGEN)
    CHECK_THROWS_AS(TB::add_to_rows(T(1), lora::DeviceMatrix<T, lora::dynamic, 1>(3), got), lora::ShapeError);
#endif
  }
  SECTION("first_non_finite, element, middle_rows") {
    Host<T> h = X;
    CHECK(BK::first_non_finite(Xd) == -1);
    h(4, 2) = std::numeric_limits<T>::infinity();
    h(5, 6) = std::numeric_limits<T>::quiet_NaN();
    const auto hd = on_backend(h);
    CHECK(BK::first_non_finite(hd) == 4 * cols + 2);
    CHECK(BK::element(hd, 3 * cols + 1) == h(3, 1));
    const auto mid = BK::middle_rows(hd, 1, 2);
    CHECK(on_host(mid) == h.middleRows(1, 2));
    CHECK(BK::first_non_finite(BK::middle_rows(hd, 5, 1)) == 6);
    CHECK(BK::element(mid, cols) == h(2, 0));
    auto md = on_backend(h);
    BK::fill(BK::middle_rows(md, 2, 3), T(0));  // writable through the view
    h.middleRows(2, 3).setZero();
    CHECK(bit_identical(on_host(md), h));
#if !defined(LORA_CONFORMANCE_BACKEND_EIGEN)
    CHECK_THROWS_AS(TB::middle_rows(hd, 5, 2), lora::ShapeError);
#endif
  }
  SECTION("as_row, overlaps, to_host / from_host of strided views") {
    const BMatrix<T, lora::dynamic, 1> v(5);
    const auto row = BK::as_row(v);
    CHECK(row.rows() == 1);
    CHECK(row.cols() == 5);
    CHECK(BK::overlaps(Xd, Xd));
    CHECK(BK::overlaps(BK::middle_rows(Xd, 0, 3), BK::middle_rows(Xd, 2, 2)));
    CHECK_FALSE(BK::overlaps(BK::middle_rows(Xd, 0, 2), BK::middle_rows(Xd, 2, 2)));
    CHECK_FALSE(BK::overlaps(Xd, v));
    auto big = on_backend(Host<T>::Zero(rows, cols + 3));
    auto window = b_strided_view(big.data() + 1, rows, cols, cols + 3);
    BK::from_host(X, window);
    CHECK(BK::to_host(window) == X);
    CHECK(on_host(big).col(0).cwiseAbs().maxCoeff() == T(0));
    CHECK(on_host(big).col(cols + 1).cwiseAbs().maxCoeff() == T(0));
  }
  SECTION("fill_random draws the counter-based numbers") {
    BMatrix<T> got(rows, cols);
    BK::fill_random(got, lora::UniformDist{-3.0, 2.0}, 77, 5);
    CHECK(bit_identical(on_host(got), ref::uniform<T>(rows, cols, -3.0, 2.0, 77, 5)));
#if !defined(LORA_CONFORMANCE_BACKEND_EIGEN)
    Host<T> eigen(rows, cols);  // and the Eigen backend's, bit for bit
    EB::fill_random(eigen, lora::UniformDist{-3.0, 2.0}, 77, 5);
    CHECK(bit_identical(on_host(got), eigen));
#endif
  }
  SECTION("workspace") {
    typename BK::template workspace<T> ws;
    auto a = ws.template matrix<3>(4, 3, 0);  // (4, 3), static columns
    static_assert(lora::matrix_traits_t<decltype(a)>::cols == 3);
    auto b = ws.matrix(2, 5, 1);
    CHECK(ws.capacity() == 12 + 10);
    CHECK_FALSE(BK::overlaps(a, b));
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

TEMPLATE_TEST_CASE("training primitives equal the reference loops", "[conformance][primitives][train]", float, double) {
  using T = TestType;
  const index_t rows = 5, cols = 8;
  const Host<T> X = random_host<T>(rows, cols, 60);
  Host<T> h = X;
  for (index_t i = 0; i < h.size(); ++i) h.data()[i] = X.data()[i] * static_cast<T>(i + 1);  // one rounding each
  auto d = on_backend(X);
  CHECK(BK::size(d) == rows * cols);
  BK::for_each_index(BK::size(d), scale_by_index<T>{BK::data(d)});
  CHECK(bit_identical(on_host(d), h));
  ref::LD squares = 0;
  for (index_t i = 0; i < h.size(); ++i) squares += ref::LD(h.data()[i]) * ref::LD(h.data()[i]);
  // Accumulated in double: 40 positive terms, relative error <= 40 * 2^-53.
  CHECK(BK::squared_norm(BK::data(d), BK::size(d)) == Approx(static_cast<double>(squares)).epsilon(1e-14));
  CHECK(BK::first_non_finite(BK::data(d), BK::size(d)) == -1);
  h(3, 5) = std::numeric_limits<T>::quiet_NaN();
  d = on_backend(h);
  CHECK(BK::first_non_finite(BK::data(d), BK::size(d)) == 3 * cols + 5);
  CHECK(BK::read(BK::data(d), 7) == h(0, 7));
  const ref::Dense keep = ref::keep(rows, cols, 0.3, 123, 4);
  for (const alpha_beta ab : kAlphaBeta) {
    CAPTURE(ab.alpha, ab.beta);
    const T alpha = static_cast<T>(ab.alpha), beta = static_cast<T>(ab.beta);
    const Host<T> Y0 = random_host<T>(rows, cols, 61);
    auto got = on_backend(Y0);
    BK::dropout(alpha, on_backend(X), beta, got, 0.3, 123, 4);
    const Host<T> got_h = on_host(got);
    check_close<T>(got_h, ref::dropout(alpha, X, beta, Y0, 0.3, 123, 4), 2);
    if (beta == T(0) && alpha != T(0)) {  // the mask itself: dropped elements are exactly 0
      for (index_t t = 0; t < rows; ++t)
        for (index_t i = 0; i < cols; ++i) CHECK((got_h(t, i) == T(0)) == (keep(t, i) == 0));
    }
#if !defined(LORA_CONFORMANCE_BACKEND_EIGEN)
    Host<T> eigen = Y0;  // the same mask and the same arithmetic as the Eigen backend
    EB::dropout(alpha, X, beta, eigen, 0.3, 123, 4);
    CHECK(bit_identical(got_h, eigen));
#endif
  }
}

// ---- training end to end ---------------------------------------------------------------

TEMPLATE_TEST_CASE("training step (dropout, backward, AdamW) equals the reference", "[conformance][train]", float,
                   double) {
  // The fine-tuning code is backend-free: forward with dropout, backward and
  // AdamW, three steps. Each step is checked against the references computed
  // from the parameters and gradients the backend had at that step.
  using T = TestType;
  const index_t out = 24, in = 20, n = 6, r = 3;
  const Host<T> W = random_host<T>(out, in, 80), X = random_host<T>(n, in, 81), G = random_host<T>(n, out, 82);
  lora::AdaptedLinear host{W, lora::LowRankDelta<T>{out, in, r, {.alpha = 6}}};
  host.delta().init(lora::init::UniformBoth{}, 83);
  auto dev = on_backend(host);
  using DL = decltype(dev);
  const auto Xd = on_backend(X), Gd = on_backend(G);
  const T s = dev.delta().scale();

  lora::train::Tape<DL> dtape;
  lora::train::Gradients<DL> dgrads(dev, dev.has_bias());
  const lora::train::AdamWOptions options{.lr = 1e-2, .weight_decay = 0.01};
  lora::train::AdamW<T, BK> dopt(options);
  dopt.add(dev, dgrads, "device");
  ref::AdamW adam_A{options.lr, options.beta1, options.beta2, options.eps, options.weight_decay, {}, {}, {}, 0};
  ref::AdamW adam_B = adam_A;
  const lora::train::Dropout drop(0.25, 5);
#if !defined(LORA_CONFORMANCE_BACKEND_EIGEN)
  // The whole trajectory also against the Eigen backend's.
  using HL = decltype(host);
  lora::train::Tape<HL> htape;
  lora::train::Gradients<HL> hgrads(host, host.has_bias());
  lora::train::AdamW<T> hopt(options);
  hopt.add(host, hgrads, "host");
  Host<T> Yh(n, out), dXh(n, in);
#endif

  BMatrix<T> Yd(n, out), dXd(n, in);
  for (std::uint64_t step = 0; step < 3; ++step) {
    CAPTURE(step);
    const Host<T> A = on_host(dev.delta().A()), B = on_host(dev.delta().B());  // this step's parameters
    lora::train::forward(dev, Xd, Yd, dtape, drop, step);
    lora::train::backward(dev, Xd, Gd, dtape, dgrads, dXd);
    const ref::Dense keep = ref::keep(n, in, drop.p(), drop.seed(), step);  // the mask of this step
    const ref::Sum D = ref::masked(keep, X);
    check_close<T>(on_host(Yd), ref::forward(W, HostVector<T>(), A, B, s, X, D), in + r);
    const ref::Gradients want = ref::backward(W, A, B, s, G, D, keep);
    check_close<T>(on_host(dXd), want.dX, out + r);
    const Host<T> dA = on_host(dgrads.dA()), dB = on_host(dgrads.dB());
    check_close<T>(dA, want.dA, n + out);
    check_close<T>(dB, want.dB, n + in);
    dopt.step();
    // A handful of roundings per update on top of the moments' (three steps).
    check_close<T>(on_host(dev.delta().A()), adam_A.step(A, dA), 16);
    check_close<T>(on_host(dev.delta().B()), adam_B.step(B, dB), 16);
#if !defined(LORA_CONFORMANCE_BACKEND_EIGEN)
    lora::train::forward(host, X, Yh, htape, drop, step);
    lora::train::backward(host, X, G, htape, hgrads, dXh);
    hopt.step();
    // AdamW's normalised step amplifies gradient rounding where g ~ 0, so the
    // two trajectories are compared at lr-scaled precision.
    const double tol = std::is_same_v<T, float> ? 1e-5 : 1e-12;
    CHECK((on_host(dev.delta().A()) - host.delta().A()).cwiseAbs().maxCoeff() <= tol);
    CHECK((on_host(dev.delta().B()) - host.delta().B()).cwiseAbs().maxCoeff() <= tol);
#endif
  }
}

// ---- transfers and errors ----------------------------------------------------------------

#if !defined(LORA_CONFORMANCE_BACKEND_EIGEN)
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
#endif

TEST_CASE("bad input gets the typed errors", "[conformance][errors]") {
  using Catch::Contains;
  using D = lora::LowRankDelta<float, 2, BK>;
  CHECK_THROWS_AS((lora::LowRankDelta<float, lora::dynamic, BK>(8, 4, 5)), lora::RankError);
  CHECK_THROWS_WITH((lora::LowRankDelta<float, 4, BK>(8, 8, 2)), Contains("rank 2 given for a static rank of 4"));
  BMatrix<float> W(4096, 64);
  CHECK_THROWS_WITH((lora::AdaptedLinear{W, D{64, 64}}),
                    Contains("base weight is [out, in] = [4096, 64] but the delta is [64, 64]"));
  lora::AdaptedLinear layer{W, D{4096, 64}};
  BMatrix<float> X(3, 768), Y(3, 4096);
  CHECK_THROWS_AS(layer.forward(X, Y), lora::ShapeError);
  CHECK_THROWS_WITH(layer.forward(X, Y), Contains("AdaptedLinear::forward: X has 768 columns, expected in_features = 64"));
  BMatrix<float> X2(3, 64), Y2(2, 4096);
  CHECK_THROWS_WITH(layer.forward(X2, Y2), Contains("Y is [2, 4096], expected [n, out] = [3, 4096]"));
  CHECK_THROWS_WITH((lora::AdaptedLinear{W, BMatrix<float, lora::dynamic, 1>(10), D{4096, 64}}),
                    Contains("bias has 10 entries, expected out_features = 4096"));
  BMatrix<float> sq(8, 8), XY(2, 8);
  lora::AdaptedLinear square{sq, D{8, 8}};
  CHECK_THROWS_WITH(square.forward(XY, XY), Contains("X and Y share memory"));
#if !defined(LORA_CONFORMANCE_BACKEND_EIGEN)  // the Eigen backend's products assert shapes instead
  CHECK_THROWS_AS(TB::gemm_nt(1.0f, X, W, 0.0f, Y), lora::ShapeError);
#endif
}
