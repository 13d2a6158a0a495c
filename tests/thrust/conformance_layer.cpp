// Conformance, part 1b: merge / unmerge / safe_merge, views of the caller's
// buffer, expressions, against ref::merged and the dense references.
#include "conformance.hpp"

// ---- the layer (merge, expressions) ----------------------------------------------

TEMPLATE_TEST_CASE("merge / unmerge / safe_merge equal the reference", "[conformance][merge]", float, double) {
  using T = TestType;
  const index_t out = 130, in = 20, r = 5;  // more rows than one 64-row safe_merge block
  const Host<T> W = random_host<T>(out, in, 7);
  lora::AdaptedLinear host{W, lora::LowRankDelta<T>{out, in, r, {.alpha = 3}}};
  host.delta().init(lora::init::UniformBoth{}, 8);
  auto dev = on_backend(host);
  const Host<T> A = host.delta().A(), B = host.delta().B();
  const ref::Sum merged = ref::merged(W, A, B, host.delta().scale());

  SECTION("merge, then unmerge") {
    REQUIRE(dev.merge());
    REQUIRE_FALSE(dev.merge());
    check_close<T>(on_host(dev.base_weight()), merged, r);
    dev.delta().set_multiplier(0.25);  // unmerge subtracts what merge added
    REQUIRE(dev.unmerge());
    REQUIRE_FALSE(dev.unmerge());
    check_close<T>(on_host(dev.base_weight()), W, merged.bound, 2 * r);
  }
  SECTION("safe_merge merges finite updates") {
    REQUIRE(dev.safe_merge());
    check_close<T>(on_host(dev.base_weight()), merged, r);
  }
  SECTION("safe_merge refuses NaN and leaves W bit-identical") {
    Host<T> B_nan = B;
    B_nan(100, 1) = std::numeric_limits<T>::quiet_NaN();
    dev.delta().B() = on_backend(B_nan);
    std::string dev_msg;
    CHECK_THROWS_AS(dev.safe_merge(), lora::NumericError);
    try {
      dev.safe_merge();
    } catch (const lora::NumericError& e) {
      dev_msg = e.what();
    }
    CHECK_THAT(dev_msg, Catch::Contains("not finite at row 100, column 0"));
#if !defined(LORA_CONFORMANCE_BACKEND_EIGEN)
    std::string host_msg;  // the Eigen backend's message, word for word
    host.delta().B() = B_nan;
    try {
      host.safe_merge();
    } catch (const lora::NumericError& e) {
      host_msg = e.what();
    }
    CHECK(dev_msg == host_msg);
#endif
    CHECK_FALSE(dev.merged());
    CHECK(bit_identical(on_host(dev.base_weight()), W));
  }
  SECTION("safe_merge refuses overflow from finite factors") {
    host.delta().A()(0, 7) = std::numeric_limits<T>::max();
    host.delta().B()(70, 0) = std::numeric_limits<T>::max();
    dev = on_backend(host);
    CHECK_THROWS_WITH(dev.safe_merge(), Catch::Contains("row 70, column 7"));
    CHECK(bit_identical(on_host(dev.base_weight()), W));
  }
}

TEST_CASE("merge writes through a writable view of the caller's buffer", "[conformance][merge][view]") {
  const index_t out = 6, in = 10;
  BMatrix<float> buffer = on_backend(random_host<float>(out, in, 30));
  const Host<float> W = on_host(buffer);
  auto Wv = b_view(buffer.data(), out, in);  // the caller's buffer, not owned
  lora::AdaptedLinear layer{Wv, lora::LowRankDelta<float, 1, BK>{out, in, {.alpha = 1}}};
  REQUIRE(layer.base_weight().data() == buffer.data());
  BK::fill(layer.delta().A(), 1.0f);
  BK::fill(layer.delta().B(), 2.0f);
  layer.merge();
  const Host<float> merged = on_host(buffer);
  CHECK(merged(1, 3) == Approx(W(1, 3) + 2.0f));
  layer.unmerge();
  CHECK(on_host(buffer)(1, 3) == Approx(W(1, 3)));

  lora::AdaptedLinear read_only{b_view(std::as_const(buffer).data(), out, in), lora::LowRankDelta<float, 1, BK>{out, in}};
  static_assert(!decltype(read_only)::base_is_writable);
  const Host<float> X = random_host<float>(2, in, 31);
  const ref::Sum want = ref::forward(W, HostVector<float>(), on_host(read_only.delta().A()),
                                     on_host(read_only.delta().B()), read_only.delta().scale(), X);
  check_close<float>(on_host(read_only.forward(on_backend(X))), want, in + 1);
}

TEST_CASE("expressions: apply, apply_transposed, assign, slices", "[conformance][expr]") {
  const index_t out = 12, in = 9, n = 4, r = 3;
  const Host<double> W = random_host<double>(out, in, 12), X = random_host<double>(n, in, 13),
                     G = random_host<double>(n, out, 14);
  lora::AdaptedLinear host{W, lora::LowRankDelta<double, 3>{out, in, {.alpha = 6}}};
  host.delta().init(lora::init::UniformBoth{}, 15);
  const auto dev = on_backend(host);
  const auto Xd = on_backend(X), Gd = on_backend(G);
  const ref::Sum dense = ref::merged(W, Host<double>(host.delta().A()), Host<double>(host.delta().B()), 2.0);
  typename decltype(dev)::workspace ws;

  check_close<double>(on_host(lora::expr::materialize(dev.weight())), dense, r);
  SECTION("apply_transposed") {
    BMatrix<double> dX(n, in);
    lora::expr::apply_transposed(dev.unmerged_expression(), Gd, dX, 1.0, 0.0, ws);
    check_close<double>(on_host(dX), ref::gemm_nn(1, G, dense, 0, ref::Dense()), out + r);
  }
  SECTION("apply with BLAS alpha and beta") {
    const Host<double> ones = Host<double>::Ones(n, out);
    auto Yd = on_backend(ones);
    lora::expr::apply(dev.weight(), Xd, Yd, 0.5, 2.0, ws);
    check_close<double>(on_host(Yd), ref::gemm_nt(0.5, X, dense, 2.0, ones), in + r + 1);
  }
  SECTION("slices and first_non_finite") {
    const Host<double> part = on_host(lora::expr::materialize(lora::expr::slice_rows(dev.weight(), 5, 4)));
    check_close<double>(part, ref::middle_rows(dense, 5, 4), r);
    CHECK(lora::expr::first_non_finite(dev.weight()) == -1);
  }
}
