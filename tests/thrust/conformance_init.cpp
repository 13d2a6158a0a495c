// Conformance, part 4: initialisation. Random draws against the counter-based
// draw recomputed element by element (ref::uniform / ref::normal); SVD-based
// inits against what they promise (s B A reproduces a rank-r delta; PiSSA
// keeps the layer's weight).
#include "conformance.hpp"

// ---- init -------------------------------------------------------------------------

TEMPLATE_TEST_CASE("init draws the counter-based numbers for the seed", "[conformance][init]", float, double) {
  using T = TestType;
  const index_t out = 33, in = 17, r = 4;
  lora::LowRankDelta<T, lora::dynamic, BK> dev(out, in, r, {.alpha = 8});
  const double s = 8.0 / r;
  // CUDA's log / cos may differ from glibc's in the last bit (the Gaussian only).
  const double ulps = kOnCuda ? 2 : 0;
  const auto same = [&](const Host<T>& got, const Host<T>& want) {
    for (index_t i = 0; i < got.size(); ++i)
      REQUIRE(std::abs(got.data()[i] - want.data()[i]) <=
              ulps * std::numeric_limits<T>::epsilon() * std::abs(want.data()[i]));
  };
#if !defined(LORA_CONFORMANCE_BACKEND_EIGEN)
  lora::LowRankDelta<T, lora::dynamic> host(out, in, r, {.alpha = 8});  // the Eigen backend's, for bit identity
#endif
  using lora::init::stream_A;
  using lora::init::stream_B;
  SECTION("KaimingZero") {
    dev.init(lora::init::KaimingZero{}, 42);
    const double bound = 1.0 / std::sqrt(static_cast<double>(in));
    CHECK(bit_identical(on_host(dev.A()), ref::uniform<T>(r, in, -bound, bound, 42, stream_A)));
    CHECK(on_host(dev.B()).cwiseAbs().maxCoeff() == T(0));
#if !defined(LORA_CONFORMANCE_BACKEND_EIGEN)
    host.init(lora::init::KaimingZero{}, 42);
    CHECK(bit_identical(on_host(dev.A()), Host<T>(host.A())));
#endif
  }
  SECTION("gaussian") {
    dev.init(lora::init::Gaussian{}, 7);
    same(on_host(dev.A()), ref::normal<T>(r, in, 0.0, 1.0 / r, 7, stream_A));
    CHECK(on_host(dev.B()).cwiseAbs().maxCoeff() == T(0));
#if !defined(LORA_CONFORMANCE_BACKEND_EIGEN)
    host.init(lora::init::Gaussian{}, 7);
    same(on_host(dev.A()), host.A());
#endif
  }
  SECTION("UniformBoth") {
    dev.init(lora::init::UniformBoth{0.5}, 9);
    CHECK(bit_identical(on_host(dev.A()), ref::uniform<T>(r, in, -0.5, 0.5, 9, stream_A)));
    CHECK(bit_identical(on_host(dev.B()), ref::uniform<T>(out, r, -0.5, 0.5, 9, stream_B)));
#if !defined(LORA_CONFORMANCE_BACKEND_EIGEN)
    host.init(lora::init::UniformBoth{0.5}, 9);
    CHECK(bit_identical(on_host(dev.A()), Host<T>(host.A())));
    CHECK(bit_identical(on_host(dev.B()), Host<T>(host.B())));
#endif
  }
  SECTION("FromDense through to_host / from_host") {
    const Host<T> dW = random_host<T>(out, r, 20) * random_host<T>(r, in, 21);  // rank r
    const auto dWd = on_backend(dW);
    const auto got = dev.init(lora::init::FromDense{dWd});
    CHECK(got.kept_energy == Approx(1.0));
    // s B A is the truncated SVD of dW, i.e. dW itself: the factors' rounding
    // to T (r terms) plus the SVD's backward error, a few eps ||dW||_F per entry
    // (double), hence (out + in) eps ||dW||_F.
    const Host<T> A = on_host(dev.A()), B = on_host(dev.B());
    const ref::Sum sBA = ref::product(s, B, false, A, false);
    ref::Dense bound = sBA.bound;
    const double frobenius = dW.template cast<double>().norm();
    for (index_t i = 0; i < out; ++i)
      for (index_t j = 0; j < in; ++j) bound(i, j) += frobenius;
    check_close<T>(dW, sBA.value, bound, out + in + r);
#if !defined(LORA_CONFORMANCE_BACKEND_EIGEN)
    const auto want = host.init(lora::init::FromDense{dW});
    CHECK(got.kept_energy == Approx(want.kept_energy));
    CHECK(bit_identical(A, Host<T>(host.A())));  // the same host SVD of the same bytes
    CHECK(bit_identical(B, Host<T>(host.B())));
#endif
  }
  SECTION("pissa keeps the layer's output") {
    const Host<T> W = random_host<T>(out, in, 22);
    lora::AdaptedLinear hl{W, lora::LowRankDelta<T>{out, in, r, {.alpha = 8}}};
    auto dl = on_backend(hl);
    const auto rep = lora::init::pissa(dl);
    CHECK(rep.kept_energy > 0.0);
    // W <- W - s B A with the factors it chose, and the effective weight is W again.
    const Host<T> A = on_host(dl.delta().A()), B = on_host(dl.delta().B());
    const ref::Sum residual = ref::merged(W, A, B, -s);
    check_close<T>(on_host(dl.base_weight()), residual, r);
    const Host<T> effective = on_host(lora::expr::materialize(dl.weight()));
    check_close<T>(effective, W, residual.bound, 2 * r);
#if !defined(LORA_CONFORMANCE_BACKEND_EIGEN)
    lora::init::pissa(hl);
    CHECK(bit_identical(A, Host<T>(hl.delta().A())));
#endif
  }
}
