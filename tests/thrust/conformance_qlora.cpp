// Thrust conformance, part 3: QLoRA, an NF4 base on the device.
#include "conformance.hpp"

// ---- QLoRA: an NF4 base on the device --------------------------------------------------
// The reference is the Eigen QLoRA layer (AdaptedLinear<NF4Matrix, ...>) over the same bytes.
// Dequantised values must match NF4Matrix::dequantize() bit for bit (same decode, same
// roundings). Products sum in another order than the host's NF4 kernels (which also factor
// the block scale out of each row's partial sums), so they agree to rounding within the
// dense cases' bound with deq(W) for W:
//   |dev - eigen| <= 2 (k + 2) eps * (|X| |deq(W)|^T + |s| |X| |A|^T |B|^T + |b|),  k = in + r
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

// |X| |deq(W) + s B A|^T + |b| as sums of absolute terms; `keep` scales the
// adapter term (1 / (1 - p) under dropout).
template <class Layer>
Host<float> qlora_forward_bound(const Layer& host, const Host<float>& X, float keep = 1.0f) {
  const Host<float> Wd = host.base_weight().dequantize();
  const float s = std::abs(host.delta().scale()) * keep;
  Host<float> bound = X.cwiseAbs() * Wd.cwiseAbs().transpose();
  bound += s * (X.cwiseAbs() * host.delta().A().cwiseAbs().transpose()) * host.delta().B().cwiseAbs().transpose();
  if (host.has_bias()) bound.rowwise() += host.bias().cwiseAbs().transpose();
  return bound;
}

// |G| |deq(W) + s B A|: the bound of dX.
template <class Layer>
Host<float> qlora_backward_bound(const Layer& host, const Host<float>& G, float keep = 1.0f) {
  const Host<float> Wd = host.base_weight().dequantize();
  const float s = std::abs(host.delta().scale()) * keep;
  return G.cwiseAbs() * Wd.cwiseAbs() + s * (G.cwiseAbs() * host.delta().B().cwiseAbs()) * host.delta().A().cwiseAbs();
}

// in = 64 / 96 / 256 are multiples of 8 (the CUDA kernel's word path); 7, 67,
// 131, 200 are not, and their 64-blocks span rows; n = 1 and n <= 16 take the
// CUDA kernel under nvcc, n = 17 the functor everywhere.
const shape kQShapes[] = {{8, 64, 1}, {33, 67, 1}, {70, 131, 3}, {13, 7, 5}, {48, 200, 17}, {129, 256, 16}, {40, 96, 2}};

}  // namespace

TEMPLATE_TEST_CASE_SIG("thrust qlora forward equals the eigen qlora layer", "[thrust][qlora]", ((int R), R), 3,
                       lora::dynamic) {
  const bool with_bias = GENERATE(false, true);
  for (const shape& sh : kQShapes) {
    for (const bool dq : {false, true}) {
      CAPTURE(sh.out, sh.in, sh.n, dq, with_bias);
      const auto host = make_host_qlora<R>(sh.out, sh.in, 3, dq, with_bias);
      const auto dev = lora::to_device(host);
      static_assert(std::is_same_v<typename decltype(dev)::base_type, lora::DeviceNF4Matrix>);
      static_assert(std::is_same_v<typename decltype(dev)::backend, TB>);
      static_assert(decltype(dev)::base_is_quantized && !decltype(dev)::base_is_writable);
      REQUIRE(dev.has_bias() == with_bias);
      // The compressed format on the device: the host's bytes, nothing dense.
      CHECK(dev.base_weight().storage_bytes() == host.base_weight().storage_bytes());
      CHECK(dev.base_weight().packed().size() == host.base_weight().packed().size());
      CHECK(bit_identical(dev.base_weight().dequantize_to_host(), host.base_weight().dequantize()));

      const Host<float> X = random_host<float>(sh.n, sh.in, 93);
      const auto Xd = lora::to_device(X);
      const Host<float> want = host.forward(X);
      const Host<float> bound = qlora_forward_bound(host, X);
      const index_t terms = sh.in + 3;
      check_close<float>(lora::to_host(dev.forward(Xd)), want, bound, terms);

      // Into a NaN-filled buffer (beta = 0 must not read it) with a reused workspace.
      lora::DeviceMatrix<float> Y =
          lora::to_device(Host<float>::Constant(sh.n, sh.out, std::numeric_limits<float>::quiet_NaN()));
      typename decltype(dev)::workspace ws;
      dev.forward(Xd, Y, ws);
      check_close<float>(lora::to_host(Y), want, bound, terms);
      CHECK((ws.capacity() == sh.n * 3 || (LORA_THRUST_ON_CUDA && ws.capacity() == 0)));  // the [n, r] intermediate only: W is never expanded
      dev.forward(Xd, lora::view(Y), ws);
      check_close<float>(lora::to_host(Y), want, bound, terms);

      if (sh.n == 1) {  // one token as a vector
        const Eigen::VectorXf x = X.row(0).transpose();
        const lora::DeviceMatrix<float, lora::dynamic, 1> xd = lora::to_device(x);
        const Eigen::VectorXf got = lora::to_host(dev.forward(xd));
        check_close<float>(Host<float>(got.transpose()), Host<float>(host.forward(x).transpose()), bound, terms);
      }
    }
  }
}

TEST_CASE("thrust qlora: dequantised device values are NF4Matrix::dequantize() bit for bit", "[thrust][qlora]") {
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
    const lora::DeviceNF4Matrix d = lora::to_device(q);
    CHECK(d.rows() == c.out);
    CHECK(d.cols() == c.in);
    CHECK(d.block_size() == c.block);
    CHECK(d.double_quantized() == c.dq);
    CHECK(d.storage_bytes() == q.storage_bytes());
    CHECK(d.bits_per_parameter() == q.bits_per_parameter());
    const Host<float> want = q.dequantize();
    CHECK(bit_identical(d.dequantize_to_host(), want));
    CHECK(bit_identical(lora::to_host(d.dequantize()), want));

    // The bytes come back unchanged (and the map with them).
    const HostNF4 back = lora::to_host(d);
    CHECK(std::ranges::equal(back.packed(), q.packed()));
    CHECK(std::ranges::equal(back.absmax(), q.absmax()));
    CHECK(std::ranges::equal(back.absmax_q8(), q.absmax_q8()));
    CHECK(std::ranges::equal(back.absmax2(), q.absmax2()));
    CHECK(std::ranges::equal(back.map8(), q.map8()));
    CHECK(bit_identical(Host<float>(back.dequantize()), want));

    // Through the expression node: materialise, and assign with alpha / beta on a slice.
    lora::AdaptedLinear layer{d, lora::LowRankDelta<float, 1, TB>{c.out, c.in}};
    CHECK(bit_identical(lora::to_host(lora::expr::materialize(layer.base_expression())), want));
    if (c.out >= 3) {
      const index_t r0 = 1, nr = c.out - 2;
      auto D = lora::to_device(Host<float>::Ones(nr, c.in));
      lora::expr::assign(D, lora::expr::slice_rows(layer.base_expression(), r0, nr), 2.0f, 0.5f);
      const Host<float> expected = (0.5f * Host<float>::Ones(nr, c.in) + 2.0f * want.middleRows(r0, nr)).eval();
      check_close<float>(lora::to_host(D), expected, (0.5f + 2.0f * want.middleRows(r0, nr).cwiseAbs().array()).matrix().eval(), 1);
      const Host<float> part = lora::to_host(lora::expr::materialize(lora::expr::slice_rows(layer.base_expression(), r0, nr)));
      CHECK(bit_identical(part, Host<float>(want.middleRows(r0, nr))));
    }
  }
}

TEMPLATE_TEST_CASE_SIG("thrust qlora backward: dX through deq(W), dA, dB, db equal eigen's", "[thrust][qlora][train]",
                       ((int R), R), 4, lora::dynamic) {
  const double p = GENERATE(0.0, 0.25);
  for (const shape& sh : {shape{48, 64, 1}, shape{37, 131, 9}, shape{64, 128, 32}}) {
    CAPTURE(sh.out, sh.in, sh.n, p);
    const index_t r = 4;
    auto host = make_host_qlora<R>(sh.out, sh.in, r, true, true);
    auto dev = lora::to_device(host);
    using HL = decltype(host);
    using DL = decltype(dev);
    const Host<float> X = random_host<float>(sh.n, sh.in, 95), G = random_host<float>(sh.n, sh.out, 96);
    const auto Xd = lora::to_device(X), Gd = lora::to_device(G);
    const lora::train::Dropout drop(p, 9);
    lora::train::Tape<HL> htape;
    lora::train::Tape<DL> dtape;
    lora::train::Gradients<HL> hgrads(host);
    lora::train::Gradients<DL> dgrads(dev);
    Host<float> Yh(sh.n, sh.out), dXh(sh.n, sh.in);
    lora::DeviceMatrix<float> Yd(sh.n, sh.out), dXd(sh.n, sh.in);
    lora::train::forward(host, X, Yh, htape, drop, 2);
    lora::train::forward(dev, Xd, Yd, dtape, drop, 2);
    lora::train::backward(host, X, G, htape, hgrads, dXh);
    lora::train::backward(dev, Xd, Gd, dtape, dgrads, dXd);

    const float keep = static_cast<float>(1.0 / (1.0 - p));
    const float s = std::abs(host.delta().scale()) * keep;
    const auto& A = host.delta().A();
    const auto& B = host.delta().B();
    check_close<float>(lora::to_host(Yd), Yh, qlora_forward_bound(host, X, keep), sh.in + r);
    check_close<float>(lora::to_host(dXd), dXh, qlora_backward_bound(host, G, keep), sh.out + r);
    // dB = s G^T (D A^T), dA = s (G B)^T D, db = sum_t G[t, :]; D = drop(X).
    const Host<float> bdB = s * (G.cwiseAbs().transpose() * (X.cwiseAbs() * A.cwiseAbs().transpose()));
    const Host<float> bdA = s * ((G.cwiseAbs() * B.cwiseAbs()).transpose() * X.cwiseAbs());
    const Eigen::VectorXf bdb = G.cwiseAbs().colwise().sum().transpose();
    check_close<float>(lora::to_host(dgrads.dB()), Host<float>(hgrads.dB()), bdB, sh.n + sh.in);
    check_close<float>(lora::to_host(dgrads.dA()), Host<float>(hgrads.dA()), bdA, sh.n + sh.out);
    check_close<float>(lora::to_host(dgrads.db()), hgrads.db(), bdb, sh.n);
  }
}

TEST_CASE("thrust qlora expressions: slices, materialise, first_non_finite", "[thrust][qlora][expr]") {
  auto host = make_host_qlora<lora::dynamic>(50, 67, 5, true, false);
  auto dev = lora::to_device(host);
  const Host<float> Wd = host.base_weight().dequantize();
  const Host<float> ref = lora::expr::materialize(host.unmerged_expression());
  const Host<float> dense_bound =
      Wd.cwiseAbs() + std::abs(host.delta().scale()) * host.delta().B().cwiseAbs() * host.delta().A().cwiseAbs();
  check_close<float>(lora::to_host(lora::expr::materialize(dev.unmerged_expression())), ref, dense_bound, 5);
  check_close<float>(lora::to_host(lora::expr::materialize(dev.weight())), ref, dense_bound, 5);
  CHECK(lora::expr::first_non_finite(dev.unmerged_expression(), 7) == -1);

  const Host<float> X = random_host<float>(4, 67, 97), G = random_host<float>(4, 20, 98);
  const auto Xd = lora::to_device(X), Gd = lora::to_device(G);
  const auto hslice = lora::expr::slice_rows(host.unmerged_expression(), 13, 20);
  const auto dslice = lora::expr::slice_rows(dev.unmerged_expression(), 13, 20);
  lora::expr::workspace_t<decltype(hslice)> hws;
  lora::expr::workspace_t<decltype(dslice)> dws;
  const Host<float> Y0 = random_host<float>(4, 20, 99), dX0 = random_host<float>(4, 67, 100);
  Host<float> Yh = Y0, dXh = dX0;
  auto Yd = lora::to_device(Y0), dXd = lora::to_device(dX0);
  lora::expr::apply(hslice, X, Yh, 0.5f, 2.0f, hws);  // BLAS alpha / beta through the slice
  lora::expr::apply(dslice, Xd, Yd, 0.5f, 2.0f, dws);
  const Host<float> sref = ref.middleRows(13, 20);
  check_close<float>(lora::to_host(Yd), Yh, (0.5f * X.cwiseAbs() * dense_bound.middleRows(13, 20).transpose() +
                                             2.0f * Y0.cwiseAbs()).eval(), 67 + 5);
  lora::expr::apply_transposed(hslice, G, dXh, 1.0f, 0.0f, hws);
  lora::expr::apply_transposed(dslice, Gd, dXd, 1.0f, 0.0f, dws);
  check_close<float>(lora::to_host(dXd), dXh, (G.cwiseAbs() * dense_bound.middleRows(13, 20)).eval(), 20 + 5);
  CHECK((lora::to_host(dXd) - G * sref).cwiseAbs().maxCoeff() < 1e-4f * (G.cwiseAbs() * sref.cwiseAbs()).maxCoeff());

  // A huge B makes W + s B A overflow: the same flat index on both backends.
  host.delta().B()(17, 2) = 3e38f;
  host.delta().A().row(2).setConstant(4.0f);
  dev.delta().B() = lora::to_device(host.delta().B());
  dev.delta().A() = lora::to_device(host.delta().A());
  CHECK(lora::expr::first_non_finite(host.unmerged_expression(), 8) == 17 * 67);
  CHECK(lora::expr::first_non_finite(dev.unmerged_expression(), 8) == 17 * 67);

  // The layer moves back with its bytes.
  const auto back = lora::to_host(dev);
  static_assert(std::is_same_v<typename decltype(back)::base_type, HostNF4>);
  CHECK(std::ranges::equal(back.base_weight().packed(), host.base_weight().packed()));
  CHECK(std::ranges::equal(back.base_weight().absmax_q8(), host.base_weight().absmax_q8()));
}

TEST_CASE("thrust qlora: bad input gets the eigen qlora layer's typed errors", "[thrust][qlora][errors]") {
  const Host<float> W = random_host<float>(16, 64, 101);
  const HostNF4 Wq = HostNF4::quantize(W);
  const lora::DeviceNF4Matrix Wd = lora::to_device(Wq);
  const auto message = [](auto&& f) -> std::string {
    try {
      f();
    } catch (const lora::ShapeError& e) {
      return e.what();
    }
    return "no ShapeError";
  };
  const std::string hctor = message([&] { (void)lora::AdaptedLinear(Wq, lora::LowRankDelta<float, 2>(16, 32)); });
  const std::string dctor = message([&] { (void)lora::AdaptedLinear(Wd, lora::LowRankDelta<float, 2, TB>(16, 32)); });
  CHECK_THAT(dctor, Catch::Contains("base weight is [out, in] = [16, 64] but the delta is [16, 32]"));
  CHECK(dctor == hctor);

  const lora::AdaptedLinear host(Wq, lora::LowRankDelta<float, 2>(16, 64));
  const lora::AdaptedLinear dev(Wd, lora::LowRankDelta<float, 2, TB>(16, 64));
  Host<float> X(3, 63), Y(3, 16), X2(3, 64), Y2(2, 16);
  lora::DeviceMatrix<float> Xd(3, 63), Yd(3, 16), X2d(3, 64), Y2d(2, 16);
  const std::string hx = message([&] { host.forward(X, Y); }), dx = message([&] { dev.forward(Xd, Yd); });
  CHECK_THAT(dx, Catch::Contains("X has 63 columns, expected in_features = 64"));
  CHECK(dx == hx);
  const std::string hy = message([&] { host.forward(X2, Y2); }), dy = message([&] { dev.forward(X2d, Y2d); });
  CHECK_THAT(dy, Catch::Contains("Y is [2, 16], expected [n, out] = [3, 16]"));
  CHECK(dy == hy);

  // The primitives check their own operands (rows of the slice, shapes).
  using QT = lora::quantized_traits<lora::DeviceNF4Matrix>;
  lora::DeviceMatrix<float> Ys(3, 10), D(10, 64), G(3, 10), dX(3, 64);
  CHECK_THROWS_AS(QT::gemm_nt(Wd, 0, 10, 1.0f, Xd, 0.0f, Ys), lora::ShapeError);  // X has 63 columns
  CHECK_THROWS_WITH(QT::gemm_nt(Wd, 10, 10, 1.0f, X2d, 0.0f, Ys), Catch::Contains("rows [10, 20) are outside [0, 16)"));
  CHECK_THROWS_AS(QT::gemm_nn(Wd, 0, 10, 1.0f, G, 0.0f, Yd), lora::ShapeError);
  CHECK_THROWS_AS(QT::assign(Wd, 0, 9, 1.0f, 0.0f, D), lora::ShapeError);
  QT::gemm_nn(Wd, 6, 10, 1.0f, G, 0.0f, dX);  // the right shapes go through

  // Memory accounting counts the NF4 bytes on the device as on the host.
  CHECK(lora::train::memory_usage(dev).frozen_bytes == lora::train::memory_usage(host).frozen_bytes);
}

#if LORA_THRUST_ON_CUDA && LORA_THRUST_NF4_CUDA_KERNEL
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
      const Host<float> Wd = q.dequantize();
      const Host<float> bound = (0.5f * X.cwiseAbs() * Wd.middleRows(2, sh.out - 3).cwiseAbs().transpose() +
                                 1.5f * Y0.cwiseAbs()).eval();
      auto kernel = lora::to_device(Y0), functor = lora::to_device(Y0);
      QT::gemm_nt(d, 2, sh.out - 3, 0.5f, Xd, 1.5f, kernel);  // a slice, with alpha / beta
      QT::gemm_nt_functor(d, 2, sh.out - 3, 0.5f, Xd.view(), 1.5f, functor.view());
      check_close<float>(lora::to_host(kernel), lora::to_host(functor), bound, sh.in);
      const Host<float> want = (1.5f * Y0 + 0.5f * X * Wd.middleRows(2, sh.out - 3).transpose()).eval();
      check_close<float>(lora::to_host(kernel), want, bound, sh.in);
    }
  }
}
#endif
