// Conformance, part 1a: the layer's forward (every scalar / rank, merged and
// unmerged, into views; the CUDA fused kernel and its hook) and a single token,
// against ref::forward.
#include "conformance.hpp"

// ---- the layer ------------------------------------------------------------------

TEMPLATE_TEST_CASE_SIG("forward equals the reference", "[conformance][forward]", ((class T, int R), T, R),
                       (float, 1), (float, 4), (float, lora::dynamic), (double, 2), (double, lora::dynamic)) {
  const bool with_bias = GENERATE(false, true);
  for (const shape& sh : kShapes) {
    const index_t r = rank_for<R>(sh);
    if (r > std::min(sh.out, sh.in)) continue;
    CAPTURE(sh.out, sh.in, sh.n, r, with_bias);
    const Host<T> W = random_host<T>(sh.out, sh.in, 1), X = random_host<T>(sh.n, sh.in, 2);
    const HostVector<T> b = random_host<T>(sh.out, 1, 3);
    using Delta = lora::LowRankDelta<T, R>;
    lora::AdaptedLinear host = with_bias ? lora::AdaptedLinear{W, b, Delta{sh.out, sh.in, r, {.alpha = 2.0 * r}}}
                                         : lora::AdaptedLinear{W, Delta{sh.out, sh.in, r, {.alpha = 2.0 * r}}};
    host.delta().init(lora::init::UniformBoth{}, 11);
    auto dev = on_backend(host);
    static_assert(std::is_same_v<typename decltype(dev)::backend, BK>);
    REQUIRE(dev.has_bias() == with_bias);
    const auto Xd = on_backend(X);
    const ref::Sum want = ref::forward(W, with_bias ? b : HostVector<T>(), Host<T>(host.delta().A()),
                                       Host<T>(host.delta().B()), host.delta().scale(), X);
    const index_t terms = sh.in + r;

    SECTION("unmerged") { check_close<T>(on_host(dev.forward(Xd)), want, terms); }
    SECTION("merged") {
      REQUIRE(dev.merge());
      REQUIRE(dev.merged());
      check_close<T>(on_host(dev.forward(Xd)), want, 2 * terms);
      REQUIRE(dev.unmerge());
      check_close<T>(on_host(dev.forward(Xd)), want, 3 * terms);
    }
    SECTION("into a caller's NaN-filled buffer with a reused workspace") {
      BMatrix<T> Y = on_backend(Host<T>::Constant(sh.n, sh.out, std::numeric_limits<T>::quiet_NaN()));  // beta = 0 must not read it
      typename decltype(dev)::workspace ws;
      dev.forward(Xd, Y, ws);
      check_close<T>(on_host(Y), want, terms);
      // The [n, r] intermediate, nothing else (none where CUDA's fused kernel keeps it on chip).
      const auto used = ws.capacity();
      REQUIRE((used == sh.n * r || (kOnCuda && used == 0)));
      dev.forward(Xd, b_view(Y.data(), sh.n, sh.out), ws);  // into a view of the same buffer
      REQUIRE(ws.capacity() == used);
      check_close<T>(on_host(Y), want, terms);
    }
#if !defined(LORA_CONFORMANCE_BACKEND_EIGEN) && LORA_THRUST_ON_CUDA
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
      // The kernel itself, wherever it can take the shape: against the two
      // products and against s (X A^T) B^T.
      if constexpr (R != lora::dynamic) {
        if (lora::cuda::FusedAdapter<T, R>::can_implement(sh.n, r)) {
          lora::cuda::FusedAdapter<T, R>::run(d.scale(), lora::view(Xd), lora::view(d.A()), lora::view(d.B()),
                                               lora::view(Yf));
          check_close<T>(lora::to_host(Yf), lora::to_host(Yg), forward_bound<T>(host, X), r);
          const ref::Sum adapter = ref::product(d.scale(), ref::product(1, X, false, Host<T>(host.delta().A()), true),
                                                false, Host<T>(host.delta().B()), true);
          check_close<T>(lora::to_host(Yf), adapter, r);
        }
      }
    }
#endif
  }
}

TEMPLATE_TEST_CASE("a single token as a vector", "[conformance][forward]", float, double) {
  using T = TestType;
  const index_t out = 9, in = 6;
  const Host<T> W = random_host<T>(out, in, 4);
  lora::AdaptedLinear host{W, lora::LowRankDelta<T, 2>{out, in, {.alpha = 1}}};
  host.delta().init(lora::init::UniformBoth{}, 5);
  const HostVector<T> x = random_host<T>(in, 1, 6);
  const auto dev = on_backend(host);
  const BMatrix<T, lora::dynamic, 1> xd = on_backend(x);
  const HostVector<T> got = on_host(dev.forward(xd));
  const Host<T> X = x.transpose();
  const ref::Sum want =
      ref::forward(W, HostVector<T>(), Host<T>(host.delta().A()), Host<T>(host.delta().B()), host.delta().scale(), X);
  check_close<T>(got.transpose(), want, in + 2);
}
