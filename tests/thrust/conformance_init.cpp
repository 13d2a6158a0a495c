// Thrust conformance, part 4: initialisation (random draws, SVD-based) equals eigen's.
#include "conformance.hpp"

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
  SECTION("KaimingZero") {
    host.init(lora::init::KaimingZero{}, 42);
    dev.init(lora::init::KaimingZero{}, 42);
    CHECK(bit_identical(lora::to_host(dev.A()), Host<T>(host.A())));
    CHECK(lora::to_host(dev.B()).cwiseAbs().maxCoeff() == T(0));
  }
  SECTION("gaussian") {
    host.init(lora::init::Gaussian{}, 7);
    dev.init(lora::init::Gaussian{}, 7);
    same(lora::to_host(dev.A()), host.A());
  }
  SECTION("UniformBoth") {
    host.init(lora::init::UniformBoth{0.5}, 9);
    dev.init(lora::init::UniformBoth{0.5}, 9);
    CHECK(bit_identical(lora::to_host(dev.A()), Host<T>(host.A())));
    CHECK(bit_identical(lora::to_host(dev.B()), Host<T>(host.B())));
  }
  SECTION("FromDense through to_host / from_host") {
    const Host<T> dW = random_host<T>(out, r, 20) * random_host<T>(r, in, 21);
    const auto dWd = lora::to_device(dW);
    const auto want = host.init(lora::init::FromDense{dW});
    const auto got = dev.init(lora::init::FromDense{dWd});
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
