// Thrust conformance, part 1b: merge / unmerge / safe_merge, views, expressions.
#include "conformance.hpp"

// ---- the layer (merge, expressions) ----------------------------------------------

TEMPLATE_TEST_CASE("thrust merge / unmerge / safe_merge equal eigen's", "[thrust][merge]", float, double) {
  using T = TestType;
  const index_t out = 130, in = 20, r = 5;  // more rows than one 64-row safe_merge block
  const Host<T> W = random_host<T>(out, in, 7);
  lora::AdaptedLinear host{W, lora::LowRankDelta<T>{out, in, r, {.alpha = 3}}};
  host.delta().init(lora::init::UniformBoth{}, 8);
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
    } catch (const lora::NumericError& e) {
      host_msg = e.what();
    }
    CHECK_THROWS_AS(dev.safe_merge(), lora::NumericError);
    try {
      dev.safe_merge();
    } catch (const lora::NumericError& e) {
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
  lora::DeviceMatrix<float> buffer = lora::to_device(random_host<float>(out, in, 30));
  const Host<float> W = lora::to_host(buffer);
  lora::DeviceMatrixView<float> Wv(buffer.data(), out, in);  // the caller's buffer, not owned
  lora::AdaptedLinear layer{Wv, lora::LowRankDelta<float, 1, TB>{out, in, {.alpha = 1}}};
  REQUIRE(layer.base_weight().data() == buffer.data());
  TB::fill(layer.delta().A(), 1.0f);
  TB::fill(layer.delta().B(), 2.0f);
  layer.merge();
  const Host<float> merged = lora::to_host(buffer);
  CHECK(merged(1, 3) == Approx(W(1, 3) + 2.0f));
  layer.unmerge();
  CHECK(lora::to_host(buffer)(1, 3) == Approx(W(1, 3)));

  lora::AdaptedLinear read_only{lora::DeviceMatrixConstView<float>(buffer.data(), out, in),
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
  host.delta().init(lora::init::UniformBoth{}, 15);
  const auto dev = lora::to_device(host);
  const auto Xd = lora::to_device(X), Gd = lora::to_device(G);
  const Host<double> dense = W + 2.0 * host.delta().B() * host.delta().A();
  const double tol = 1e-12;
  typename decltype(dev)::workspace ws;

  CHECK((lora::to_host(lora::expr::materialize(dev.weight())) - dense).cwiseAbs().maxCoeff() < tol);
  SECTION("apply_transposed") {
    lora::DeviceMatrix<double> dX(n, in);
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
