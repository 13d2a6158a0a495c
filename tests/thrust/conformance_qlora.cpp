// Conformance, part 3: QLoRA, an NF4 base on the backend.
#include "conformance.hpp"

// ---- QLoRA: an NF4 base on the backend ---------------------------------------------------
// Dequantised values must match ref::dequantize (the raw bytes decoded element by
// element) bit for bit, and so must NF4Matrix::dequantize(). Products are the dense
// references over deq(W): the NF4 kernels sum in their own order (the host's also
// factor the block scale out of each row's partial sums), so they agree to
// rounding within the dense bound, with deq(W) for W:
//   |got - ref| <= 2 (k + 2) eps * (|X| |deq(W)|^T + |s| |X| |A|^T |B|^T + |b|),  k = in + r
// i.e. a relative tolerance of 2 (k + 2) eps (5.0e-5 at in = 200) of the sum of absolute terms.

namespace {

using HostNF4 = lora::NF4Matrix;

template <int R>
auto make_host_qlora(index_t out, index_t in, index_t r, bool dq, bool bias, index_t block = 64) {
  const Host<float> W = random_host<float>(out, in, 90);
  HostNF4 Wq = HostNF4::quantize(W, {.block_size = block, .double_quant = dq});
  using Delta = lora::LowRankDelta<float, R>;
  Delta delta(out, in, r, {.alpha = 2.0 * double(r)});
  delta.init(lora::init::UniformBoth{}, 91);
  using Layer = lora::AdaptedLinear<HostNF4, Delta>;
  if (bias) return Layer(std::move(Wq), Eigen::VectorXf(random_host<float>(out, 1, 92)), std::move(delta));
  return Layer(std::move(Wq), std::move(delta));
}

// in = 64 / 96 / 256 are multiples of 8 (the CUDA kernel's word path); 7, 67,
// 131, 200 are not, and their 64-blocks span rows; n = 1 and n <= 16 take the
// CUDA kernel under nvcc, n = 17 the functor everywhere.
const shape kQShapes[] = {{8, 64, 1}, {33, 67, 1}, {70, 131, 3}, {13, 7, 5}, {48, 200, 17}, {129, 256, 16}, {40, 96, 2}};

}  // namespace

TEMPLATE_TEST_CASE_SIG("qlora forward equals the reference over deq(W)", "[conformance][qlora]", ((int R), R), 3,
                       lora::dynamic) {
  const bool with_bias = GENERATE(false, true);
  for (const shape& sh : kQShapes) {
    for (const bool dq : {false, true}) {
      CAPTURE(sh.out, sh.in, sh.n, dq, with_bias);
      const auto host = make_host_qlora<R>(sh.out, sh.in, 3, dq, with_bias);
      const auto dev = on_backend(host);
      static_assert(std::is_same_v<typename decltype(dev)::base_type, BNF4>);
      static_assert(std::is_same_v<typename decltype(dev)::backend, BK>);
      static_assert(decltype(dev)::base_is_quantized && !decltype(dev)::base_is_writable);
      REQUIRE(dev.has_bias() == with_bias);
      const Host<float> Wd = ref::dequantize(host.base_weight());
      CHECK(bit_identical(deq_host(dev.base_weight()), Wd));
#if !defined(LORA_CONFORMANCE_BACKEND_EIGEN)
      // The compressed format on the device: the host's bytes, nothing dense.
      CHECK(dev.base_weight().storage_bytes() == host.base_weight().storage_bytes());
      CHECK(dev.base_weight().packed().size() == host.base_weight().packed().size());
#endif

      const Host<float> X = random_host<float>(sh.n, sh.in, 93);
      const auto Xd = on_backend(X);
      const HostVector<float> bias = host.bias();  // empty without one
      const Host<float> A = host.delta().A(), B = host.delta().B();
      const ref::Sum want = ref::forward(Wd, bias, A, B, host.delta().scale(), X);
      const index_t terms = sh.in + 3;
      check_close<float>(on_host(dev.forward(Xd)), want, terms);

      // Into a NaN-filled buffer (beta = 0 must not read it) with a reused workspace.
      BMatrix<float> Y = on_backend(Host<float>::Constant(sh.n, sh.out, std::numeric_limits<float>::quiet_NaN()));
      typename decltype(dev)::workspace ws;
      dev.forward(Xd, Y, ws);
      check_close<float>(on_host(Y), want, terms);
      CHECK((ws.capacity() == sh.n * 3 || (kOnCuda && ws.capacity() == 0)));  // the [n, r] intermediate only: W is never expanded
      dev.forward(Xd, b_view(Y.data(), sh.n, sh.out), ws);
      check_close<float>(on_host(Y), want, terms);

      if (sh.n == 1) {  // one token as a vector
        const HostVector<float> x = X.row(0).transpose();
        const BMatrix<float, lora::dynamic, 1> xd = on_backend(x);
        const HostVector<float> got = on_host(dev.forward(xd));
        check_close<float>(Host<float>(got.transpose()), want, terms);
      }
    }
  }
}

TEST_CASE("qlora: dequantised values are the raw bytes' decode bit for bit", "[conformance][qlora]") {
  const std::vector<float> other_map = lora::dynamic_map::create_dynamic_map();  // 4 entries differ by 1 ulp
  struct qcase {
    index_t out, in, block;
    bool dq, custom_map;
  };
  const qcase cases[] = {{7, 9, 64, false, false},    {7, 9, 32, true, false},     {33, 67, 64, true, false},
                         {33, 67, 64, true, true},    {24, 160, 4096, true, false}, {24, 160, 128, false, false},
                         {300, 300, 64, true, false}, {5, 1, 32, false, false}};  // 300^2/64 > 256: two 256-groups
  for (const qcase& c : cases) {
    CAPTURE(c.out, c.in, c.block, c.dq, c.custom_map);
    Host<float> W = random_host<float>(c.out, c.in, 94);
    W.row(c.out / 2).setZero();  // all-zero blocks decode to +0
    lora::NF4Options opt{.block_size = c.block, .double_quant = c.dq};
    if (c.custom_map) opt.map8 = other_map;
    const HostNF4 q = HostNF4::quantize(W, opt);
    const BNF4 d = on_backend(q);
    CHECK(d.rows() == c.out);
    CHECK(d.cols() == c.in);
    CHECK(d.block_size() == c.block);
    CHECK(d.double_quantized() == c.dq);
    const Host<float> want = ref::dequantize(q);
    CHECK(bit_identical(Host<float>(q.dequantize()), want));  // the host's decoder, the format's reference
    CHECK(bit_identical(deq_host(d), want));
    CHECK(bit_identical(on_host(d.dequantize()), want));
#if !defined(LORA_CONFORMANCE_BACKEND_EIGEN)
    CHECK(d.storage_bytes() == q.storage_bytes());
    CHECK(d.bits_per_parameter() == q.bits_per_parameter());
    // The bytes come back unchanged (and the map with them).
    const HostNF4 back = lora::to_host(d);
    CHECK(std::ranges::equal(back.packed(), q.packed()));
    CHECK(std::ranges::equal(back.absmax(), q.absmax()));
    CHECK(std::ranges::equal(back.absmax_q8(), q.absmax_q8()));
    CHECK(std::ranges::equal(back.absmax2(), q.absmax2()));
    CHECK(std::ranges::equal(back.map8(), q.map8()));
    CHECK(bit_identical(Host<float>(back.dequantize()), want));
#endif

    // Through the expression node: materialise, and assign with alpha / beta on a slice.
    lora::AdaptedLinear layer{d, lora::LowRankDelta<float, 1, BK>{c.out, c.in}};
    CHECK(bit_identical(on_host(lora::expr::materialize(layer.base_expression())), want));
    if (c.out >= 3) {
      const index_t r0 = 1, nr = c.out - 2;
      const Host<float> ones = Host<float>::Ones(nr, c.in);
      auto D = on_backend(ones);
      lora::expr::assign(D, lora::expr::slice_rows(layer.base_expression(), r0, nr), 2.0f, 0.5f);
      check_close<float>(on_host(D), ref::axpby(2, Host<float>(want.middleRows(r0, nr)), 0.5, ones), 1);
      const Host<float> part = on_host(lora::expr::materialize(lora::expr::slice_rows(layer.base_expression(), r0, nr)));
      CHECK(bit_identical(part, Host<float>(want.middleRows(r0, nr))));
    }
  }
}

TEMPLATE_TEST_CASE_SIG("qlora backward: dX through deq(W), dA, dB, db equal the reference", "[conformance][qlora][train]",
                       ((int R), R), 4, lora::dynamic) {
  const double p = GENERATE(0.0, 0.25);
  for (const shape& sh : {shape{48, 64, 1}, shape{37, 131, 9}, shape{64, 128, 32}}) {
    CAPTURE(sh.out, sh.in, sh.n, p);
    const index_t r = 4;
    const auto host = make_host_qlora<R>(sh.out, sh.in, r, true, true);
    auto dev = on_backend(host);
    using DL = decltype(dev);
    const Host<float> X = random_host<float>(sh.n, sh.in, 95), G = random_host<float>(sh.n, sh.out, 96);
    const auto Xd = on_backend(X), Gd = on_backend(G);
    const lora::train::Dropout drop(p, 9);
    lora::train::Tape<DL> dtape;
    lora::train::Gradients<DL> dgrads(dev, dev.has_bias());
    BMatrix<float> Yd(sh.n, sh.out), dXd(sh.n, sh.in);
    lora::train::forward(dev, Xd, Yd, dtape, drop, 2);
    lora::train::backward(dev, Xd, Gd, dtape, dgrads, dXd);

    const Host<float> Wd = ref::dequantize(host.base_weight());
    const Host<float> A = host.delta().A(), B = host.delta().B();
    const float s = host.delta().scale();
    // D = drop(X) with step 2's mask (all kept when p = 0).
    const ref::Dense keep = ref::keep(sh.n, sh.in, p, drop.seed(), 2);
    const ref::Sum D = ref::masked(keep, X);
    check_close<float>(on_host(Yd), ref::forward(Wd, HostVector<float>(host.bias()), A, B, s, X, D), sh.in + r);
    const ref::Gradients want = ref::backward(Wd, A, B, s, G, D, keep);
    check_close<float>(on_host(dXd), want.dX, sh.out + r);
    check_close<float>(on_host(dgrads.dB()), want.dB, sh.n + sh.in);
    check_close<float>(on_host(dgrads.dA()), want.dA, sh.n + sh.out);
    check_close<float>(on_host(dgrads.db()), want.db, sh.n);
  }
}

TEST_CASE("qlora expressions: slices, materialise, first_non_finite", "[conformance][qlora][expr]") {
  auto host = make_host_qlora<lora::dynamic>(50, 67, 5, true, false);
  auto dev = on_backend(host);
  const Host<float> Wd = ref::dequantize(host.base_weight());
  const ref::Sum dense = ref::merged(Wd, Host<float>(host.delta().A()), Host<float>(host.delta().B()), host.delta().scale());
  check_close<float>(on_host(lora::expr::materialize(dev.unmerged_expression())), dense, 5);
  check_close<float>(on_host(lora::expr::materialize(dev.weight())), dense, 5);
  CHECK(lora::expr::first_non_finite(dev.unmerged_expression(), 7) == -1);

  const Host<float> X = random_host<float>(4, 67, 97), G = random_host<float>(4, 20, 98);
  const auto Xd = on_backend(X), Gd = on_backend(G);
  const auto dslice = lora::expr::slice_rows(dev.unmerged_expression(), 13, 20);
  lora::expr::workspace_t<decltype(dslice)> dws;
  const Host<float> Y0 = random_host<float>(4, 20, 99), dX0 = random_host<float>(4, 67, 100);
  auto Yd = on_backend(Y0), dXd = on_backend(dX0);
  const ref::Sum sliced = ref::middle_rows(dense, 13, 20);
  lora::expr::apply(dslice, Xd, Yd, 0.5f, 2.0f, dws);  // BLAS alpha / beta through the slice
  check_close<float>(on_host(Yd), ref::gemm_nt(0.5, X, sliced, 2.0, Y0), 67 + 5);
  lora::expr::apply_transposed(dslice, Gd, dXd, 1.0f, 0.0f, dws);
  check_close<float>(on_host(dXd), ref::gemm_nn(1, G, sliced, 0, dX0), 20 + 5);

  // A huge B makes W + s B A overflow: the first non-finite flat index is row 17's first.
  host.delta().B()(17, 2) = 3e38f;
  host.delta().A().row(2).setConstant(4.0f);
  dev.delta().B() = on_backend(host.delta().B());
  dev.delta().A() = on_backend(host.delta().A());
  CHECK(lora::expr::first_non_finite(dev.unmerged_expression(), 8) == 17 * 67);

#if !defined(LORA_CONFORMANCE_BACKEND_EIGEN)
  CHECK(lora::expr::first_non_finite(host.unmerged_expression(), 8) == 17 * 67);  // the same index as Eigen's
  // The layer moves back with its bytes.
  const auto back = lora::to_host(dev);
  static_assert(std::is_same_v<typename decltype(back)::base_type, HostNF4>);
  CHECK(std::ranges::equal(back.base_weight().packed(), host.base_weight().packed()));
  CHECK(std::ranges::equal(back.base_weight().absmax_q8(), host.base_weight().absmax_q8()));
#endif
}

TEST_CASE("qlora: bad input gets the typed errors", "[conformance][qlora][errors]") {
  const Host<float> W = random_host<float>(16, 64, 101);
  const HostNF4 Wq = HostNF4::quantize(W);
  const BNF4 Wd = on_backend(Wq);
  const auto message = [](auto&& f) -> std::string {
    try {
      f();
    } catch (const lora::ShapeError& e) {
      return e.what();
    }
    return "no ShapeError";
  };
  const std::string dctor = message([&] { (void)lora::AdaptedLinear(Wd, lora::LowRankDelta<float, 2, BK>(16, 32)); });
  CHECK_THAT(dctor, Catch::Contains("base weight is [out, in] = [16, 64] but the delta is [16, 32]"));

  const lora::AdaptedLinear dev(Wd, lora::LowRankDelta<float, 2, BK>(16, 64));
  BMatrix<float> Xd(3, 63), Yd(3, 16), X2d(3, 64), Y2d(2, 16);
  const std::string dx = message([&] { dev.forward(Xd, Yd); });
  CHECK_THAT(dx, Catch::Contains("X has 63 columns, expected in_features = 64"));
  const std::string dy = message([&] { dev.forward(X2d, Y2d); });
  CHECK_THAT(dy, Catch::Contains("Y is [2, 16], expected [n, out] = [3, 16]"));

#if !defined(LORA_CONFORMANCE_BACKEND_EIGEN)
  // The Eigen QLoRA layer's messages, word for word.
  const std::string hctor = message([&] { (void)lora::AdaptedLinear(Wq, lora::LowRankDelta<float, 2>(16, 32)); });
  CHECK(dctor == hctor);
  const lora::AdaptedLinear host(Wq, lora::LowRankDelta<float, 2>(16, 64));
  Host<float> X(3, 63), Y(3, 16), X2(3, 64), Y2(2, 16);
  CHECK(dx == message([&] { host.forward(X, Y); }));
  CHECK(dy == message([&] { host.forward(X2, Y2); }));

  // The primitives check their own operands (rows of the slice, shapes).
  using QT = lora::quantized_traits<lora::DeviceNF4Matrix>;
  lora::DeviceMatrix<float> Ys(3, 10), D(10, 64), G(3, 10), dX(3, 64);
  CHECK_THROWS_AS(QT::gemm_nt(Wd, 0, 10, 1.0f, Xd, 0.0f, Ys), lora::ShapeError);  // X has 63 columns
  CHECK_THROWS_WITH(QT::gemm_nt(Wd, 10, 10, 1.0f, X2d, 0.0f, Ys), Catch::Contains("rows [10, 20) are outside [0, 16)"));
  CHECK_THROWS_AS(QT::gemm_nn(Wd, 0, 10, 1.0f, G, 0.0f, Yd), lora::ShapeError);
  CHECK_THROWS_AS(QT::assign(Wd, 0, 9, 1.0f, 0.0f, D), lora::ShapeError);
  QT::gemm_nn(Wd, 6, 10, 1.0f, G, 0.0f, dX);  // the right shapes go through
#endif

  // Memory accounting counts the NF4 bytes exactly (no bias: nothing else is frozen).
  CHECK(lora::train::memory_usage(dev).frozen_bytes == static_cast<double>(Wq.storage_bytes()));
}

#if !defined(LORA_CONFORMANCE_BACKEND_EIGEN) && LORA_THRUST_ON_CUDA && LORA_THRUST_NF4_CUDA_KERNEL
TEST_CASE("thrust qlora (CUDA): the small-n kernel equals the generic functor", "[thrust][qlora][cuda]") {
  using QT = lora::quantized_traits<lora::DeviceNF4Matrix>;
  for (const shape& sh : {shape{37, 64, 1}, shape{37, 67, 2}, shape{129, 256, 3}, shape{65, 131, 8},
                          shape{300, 200, 13}, shape{96, 4096, 16}}) {
    for (const bool dq : {false, true}) {
      CAPTURE(sh.out, sh.in, sh.n, dq);
      REQUIRE(lora::cuda::NF4SmallGemmNT::can_implement(sh.n, sh.out));
      const HostNF4 q = HostNF4::quantize(random_host<float>(sh.out, sh.in, 102), {.double_quant = dq});
      const lora::DeviceNF4Matrix d = lora::to_device(q);
      const Host<float> X = random_host<float>(sh.n, sh.in, 103), Y0 = random_host<float>(sh.n, sh.out - 3, 104);
      const auto Xd = lora::to_device(X);
      const Host<float> Wd = Host<float>(ref::dequantize(q).middleRows(2, sh.out - 3));
      const ref::Sum want = ref::gemm_nt(0.5, X, Wd, 1.5, Y0);
      auto kernel = lora::to_device(Y0), functor = lora::to_device(Y0);
      QT::gemm_nt(d, 2, sh.out - 3, 0.5f, Xd, 1.5f, kernel);  // a slice, with alpha / beta
      QT::gemm_nt_functor(d, 2, sh.out - 3, 0.5f, Xd.view(), 1.5f, functor.view());
      check_close<float>(lora::to_host(kernel), lora::to_host(functor), want.bound, sh.in);
      check_close<float>(lora::to_host(kernel), want, sh.in);
      check_close<float>(lora::to_host(functor), want, sh.in);
    }
  }
}
#endif
