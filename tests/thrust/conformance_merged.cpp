// Conformance: MergedLinear (fused QKV) on the backend under test, against the long-double
// references of conformance.hpp.
#include "conformance.hpp"

#include <lora/merged_linear.hpp>

TEST_CASE("MergedLinear forward, backward, merge equal the reference", "[conformance][merged]") {
  using T = float;
  // 130 rows in three slices (the middle one not adapted), so kernels cross blocks.
  const index_t in = 24, n = 9, r = 4;
  const std::vector<index_t> sizes = {40, 50, 40};
  const std::vector<bool> enable = {true, false, true};
  const Host<T> W = random_host<T>(130, in, 51);
  const HostVector<T> bias = random_host<T>(130, 1, 52);
  // A different scale per enabled slice, so a slice mix-up changes the numbers.
  std::vector<lora::LowRankDelta<T>> deltas;
  deltas.emplace_back(40, in, r, lora::DeltaOptions{.alpha = 3});
  deltas.emplace_back(40, in, r, lora::DeltaOptions{.alpha = 6});
  deltas[0].init(lora::init::UniformBoth{}, 53);
  deltas[1].init(lora::init::UniformBoth{}, 54);
  lora::MergedLinear host{W, bias, sizes, enable, std::move(deltas)};
  auto dev = on_backend(host);
  const Host<T> X = random_host<T>(n, in, 55);
  const BMatrix<T> Xd = on_backend(X);

  // Per slice k (rows [off, off + size) of W): the slice's A_k, B_k, s_k, zero
  // factors (no term) for a disabled slice.
  struct Slice {
    index_t off, size;
    Host<T> W, A, B;
    HostVector<T> b;
    ref::LD s;
  };
  std::vector<Slice> slices;
  for (index_t k = 0, j = 0; k < 3; ++k) {
    const index_t off = host.slice_offset(k), size = host.slice_size(k);
    Slice sl{off, size, W.middleRows(off, size), Host<T>::Zero(r, in), Host<T>::Zero(size, r),
             bias.segment(off, size), 0};
    if (host.slice_enabled(k)) {
      const auto& d = host.deltas()[static_cast<std::size_t>(j++)];
      sl.A = d.A();
      sl.B = d.B();
      sl.s = d.scale();
    }
    slices.push_back(sl);
  }

  SECTION("forward: each slice's columns, the bias included") {
    const BMatrix<T> y = dev.forward(Xd);
    const Host<T> yh = on_host(y);
    for (const Slice& sl : slices)
      check_close<T>(Host<T>(yh.middleCols(sl.off, sl.size)), ref::forward(sl.W, sl.b, sl.A, sl.B, sl.s, X),
                     in + r + 1);
  }

  SECTION("backward: dA_k, dB_k of the enabled slices, dX over all slices") {
    const Host<T> G = random_host<T>(n, 130, 56);
    auto grads = dev.delta().make_gradients();
    BMatrix<T> dx = on_backend(Host<T>::Constant(n, in, 7.0f));
    dev.backward(Xd, on_backend(G), grads, dx);
    ref::Dense keep(n, in);
    for (index_t i = 0; i < n; ++i)
      for (index_t c = 0; c < in; ++c) keep(i, c) = 1;
    ref::Sum dx_ref(n, in);
    for (index_t k = 0, j = 0; k < 3; ++k) {
      const Slice& sl = slices[static_cast<std::size_t>(k)];
      const Host<T> Gk = G.middleCols(sl.off, sl.size);
      const ref::Gradients want = ref::backward(sl.W, sl.A, sl.B, sl.s, Gk, X, keep);
      dx_ref = ref::plus(std::move(dx_ref), 1, want.dX);
      if (!host.slice_enabled(k)) continue;
      const auto& gj = grads[static_cast<std::size_t>(j++)];
      check_close<T>(on_host(gj.dA()), want.dA, n + sl.size);
      check_close<T>(on_host(gj.dB()), want.dB, n + in);
    }
    check_close<T>(on_host(dx), dx_ref, 130 + 3 * r);
  }

  SECTION("merge, unmerge, merged_weight, moves") {
    ref::Sum merged(130, in);  // W, plus s_k B_k A_k in the enabled slices' rows
    for (const Slice& sl : slices) {
      const ref::Sum part = ref::merged(sl.W, sl.A, sl.B, sl.s);
      for (index_t i = 0; i < sl.size; ++i)
        for (index_t c = 0; c < in; ++c) {
          merged.value(sl.off + i, c) = part.value(i, c);
          merged.bound(sl.off + i, c) = part.bound(i, c);
        }
    }
    check_close<T>(on_host(dev.merged_weight()), merged, r);
    REQUIRE(dev.merge());
    REQUIRE_FALSE(dev.merge());
    const Host<T> w_merged = on_host(dev.base_weight());
    check_close<T>(w_merged, merged, r);
    CHECK(bit_identical(Host<T>(w_merged.middleRows(40, 50)), Host<T>(W.middleRows(40, 50))));
    // Merged, forward is X W'^T + b: the reference with the merge's rounding added.
    const Host<T> yh = on_host(dev.forward(Xd));
    for (const Slice& sl : slices)
      check_close<T>(Host<T>(yh.middleCols(sl.off, sl.size)), ref::forward(sl.W, sl.b, sl.A, sl.B, sl.s, X),
                     in + 2 * r + 1);
    CHECK_THROWS_WITH(dev.transferred([](const auto& m) { return m; }), Catch::Contains("unmerge() it first"));
    dev.deltas()[0].set_multiplier(0.25);  // unmerge subtracts what merge added
    REQUIRE(dev.unmerge());
    REQUIRE_FALSE(dev.unmerge());
    check_close<T>(on_host(dev.base_weight()), W, merged.bound, 2 * r);
    // Back to the host: the tensors as they are, bit for bit.
    const auto back = on_host(on_backend(host));
    CHECK(bit_identical(Host<T>(back.base_weight()), W));
    CHECK(bit_identical(HostVector<T>(back.bias()), bias));
    REQUIRE(back.deltas().size() == 2);
    CHECK(back.enable_lora() == enable);
    CHECK(back.slice_sizes() == sizes);
    for (std::size_t j = 0; j < 2; ++j) {
      CHECK(bit_identical(Host<T>(back.deltas()[j].A()), Host<T>(host.deltas()[j].A())));
      CHECK(bit_identical(Host<T>(back.deltas()[j].B()), Host<T>(host.deltas()[j].B())));
      CHECK(back.deltas()[j].scale() == host.deltas()[j].scale());
    }
  }
}
