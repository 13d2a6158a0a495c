// Thrust conformance, part 1: the layer (forward, merge, expressions) and init.
#include "conformance.hpp"

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
      // The [n, r] intermediate, nothing else (none where CUDA's fused kernel keeps it on chip).
      const auto used = ws.capacity();
      REQUIRE((used == sh.n * r || (LORA_THRUST_ON_CUDA && used == 0)));
      dev.forward(Xd, lora::view(Y), ws);  // into a view of the same buffer
      REQUIRE(ws.capacity() == used);
      check_close<T>(lora::to_host(Y), want, bound, terms);
    }
#if LORA_THRUST_ON_CUDA
    SECTION("the CUDA fused adapter kernel and the hook layer.forward takes, against the two products") {
      lora::device_matrix<T> Yf = lora::to_device(Host<T>::Zero(sh.n, sh.out));
      lora::device_matrix<T> Yh = lora::to_device(Host<T>::Zero(sh.n, sh.out));
      lora::device_matrix<T> Yg = lora::to_device(Host<T>::Zero(sh.n, sh.out));
      typename decltype(dev)::workspace ws;
      const auto& d = dev.delta();
      lora::expr::recording<typename decltype(dev)::workspace> rec;  // recording: never the hook
      lora::expr::apply(d.expression(), Xd, Yg, T(1), T(1), rec);
      // The hook takes the kernel only where it measured faster (16-bit storage).
      const bool hooked = lora::backend_hooks<TB>::template low_rank_apply<R>(d.scale(), Xd, d.A(), d.B(), Yh, ws);
      REQUIRE(hooked == lora::cuda::fused_adapter_preferred_v<T>);
      // The kernel itself, wherever it can take the shape.
      if constexpr (R != lora::dynamic) {
        if (lora::cuda::fused_adapter<T, R>::can_implement(sh.n, r)) {
          lora::cuda::fused_adapter<T, R>::run(d.scale(), lora::view(Xd), lora::view(d.A()), lora::view(d.B()),
                                               lora::view(Yf));
          check_close<T>(lora::to_host(Yf), lora::to_host(Yg), forward_bound<T>(host, X), r);
        }
      }
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
