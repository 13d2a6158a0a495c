// Thrust conformance, part 1a: the layer's forward (every scalar / rank, the CUDA
// fused kernel and its hook) and a single token.
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
    host.delta().init(lora::init::UniformBoth{}, 11);
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
      lora::DeviceMatrix<T> Y = lora::to_device(
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
      lora::DeviceMatrix<T> Yf = lora::to_device(Host<T>::Zero(sh.n, sh.out));
      lora::DeviceMatrix<T> Yh = lora::to_device(Host<T>::Zero(sh.n, sh.out));
      lora::DeviceMatrix<T> Yg = lora::to_device(Host<T>::Zero(sh.n, sh.out));
      typename decltype(dev)::workspace ws;
      const auto& d = dev.delta();
      lora::expr::Recording<typename decltype(dev)::workspace> rec;  // recording: never the hook
      lora::expr::apply(d.expression(), Xd, Yg, T(1), T(1), rec);
      // The hook takes the kernel only where it measured faster (16-bit storage).
      const bool hooked = lora::backend_hooks<TB>::template low_rank_apply<R>(d.scale(), Xd, d.A(), d.B(), Yh, ws);
      REQUIRE(hooked == lora::cuda::fused_adapter_preferred_v<T>);
      // The kernel itself, wherever it can take the shape.
      if constexpr (R != lora::dynamic) {
        if (lora::cuda::FusedAdapter<T, R>::can_implement(sh.n, r)) {
          lora::cuda::FusedAdapter<T, R>::run(d.scale(), lora::view(Xd), lora::view(d.A()), lora::view(d.B()),
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
  host.delta().init(lora::init::UniformBoth{}, 5);
  const Eigen::Matrix<T, Eigen::Dynamic, 1> x = random_host<T>(in, 1, 6);
  const auto dev = lora::to_device(host);
  const lora::DeviceMatrix<T, lora::dynamic, 1> xd = lora::to_device(x);
  const Eigen::Matrix<T, Eigen::Dynamic, 1> want = host.forward(x);
  const Eigen::Matrix<T, Eigen::Dynamic, 1> got = lora::to_host(dev.forward(xd));
  const Host<T> X = x.transpose();
  check_close<T>(got.transpose(), want.transpose(), forward_bound<T>(host, X), in + 2);
}
