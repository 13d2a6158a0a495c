// QLoRA: AdaptedLinear over an NF4 base. The reference is always the same
// layer over a dense copy of deq(Wq) (itself tested against plain loops in
// test_core / test_train), or plain long-double loops.
// Small gemm tiles so the fused products cross many tile boundaries.
#define LORA_NF4_GEMM_TILE_FLOATS 1024
#include <lora/lora.hpp>

#include <catch2/catch.hpp>

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace {

using lora::index_t;
using lora::NF4Matrix;
using lora::RowMatrix;
namespace train = lora::train;

template <class M>
void fill(M& m, std::uint64_t seed, double lo = -1.0, double hi = 1.0) {
  lora::EigenBackend::fill_random(m, lora::UniformDist{lo, hi}, seed, 7);
}

// A base quantised from random data, and the delta with non-zero B (so the
// adapter term matters in every check).
template <int R>
auto make_qlora(index_t out, index_t in, index_t r, bool double_quant, index_t block = 64, bool bias = false) {
  RowMatrix<float> W(out, in);
  fill(W, 11);
  NF4Matrix Wq = NF4Matrix::quantize(W, {.block_size = block, .double_quant = double_quant});
  lora::LowRankDelta<float, R> delta = [&] {
    if constexpr (R == lora::dynamic)
      return lora::LowRankDelta<float, R>(out, in, r, {.alpha = 2.0 * double(r)});
    else
      return lora::LowRankDelta<float, R>(out, in, {.alpha = 2.0 * double(r)});
  }();
  fill(delta.A(), 12);
  fill(delta.B(), 13, -0.5, 0.5);
  if (bias) {
    Eigen::VectorXf b(out);
    fill(b, 14);
    return lora::AdaptedLinear<NF4Matrix, lora::LowRankDelta<float, R>>(std::move(Wq), std::move(b),
                                                                         std::move(delta));
  }
  return lora::AdaptedLinear<NF4Matrix, lora::LowRankDelta<float, R>>(std::move(Wq), std::move(delta));
}

// The same layer over a dense copy of deq(Wq).
template <class Layer>
auto dense_twin(const Layer& q) {
  using Delta = typename Layer::delta_type;
  RowMatrix<float> W = q.base_weight().dequantize();
  if (q.has_bias()) return lora::AdaptedLinear<RowMatrix<float>, Delta>(std::move(W), q.bias(), q.delta());
  return lora::AdaptedLinear<RowMatrix<float>, Delta>(std::move(W), q.delta());
}

// Max |a - b| / (max |b| + tiny): the fused kernels sum in another order than
// Eigen's dense product, so agreement is to rounding, not bits.
template <class A, class B>
double rel_diff(const A& a, const B& b) {
  REQUIRE(a.rows() == b.rows());
  REQUIRE(a.cols() == b.cols());
  return double((a - b).cwiseAbs().maxCoeff()) / (double(b.cwiseAbs().maxCoeff()) + 1e-30);
}

struct shape {
  index_t out, in, n;
};
// in = 64 / 128 take the AVX-512 path; 67, 131, 200 the generic one with blocks
// spanning rows; n = 1 the gemv, larger n the tiled gemm.
const shape kShapes[] = {{64, 128, 1}, {96, 64, 5}, {33, 67, 1}, {70, 131, 3}, {48, 200, 67}, {129, 256, 16}};

}  // namespace

TEMPLATE_TEST_CASE_SIG("qlora forward equals the dense layer over deq(Wq) and plain loops", "[qlora]",
                       ((int R), R), 3, lora::dynamic) {
  for (const shape& sh : kShapes) {
    for (bool dq : {false, true}) {
      CAPTURE(sh.out, sh.in, sh.n, dq);
      auto layer = make_qlora<R>(sh.out, sh.in, 3, dq, 64, /*bias=*/sh.n % 2 == 1);
      const auto twin = dense_twin(layer);
      RowMatrix<float> X(sh.n, sh.in);
      fill(X, 21);
      RowMatrix<float> Y(sh.n, sh.out), Yd(sh.n, sh.out);
      Y.setConstant(std::numeric_limits<float>::quiet_NaN());  // beta = 0 must not read Y
      layer.forward(X, Y);
      twin.forward(X, Yd);
      CHECK(rel_diff(Y, Yd) < 1e-5);

      // Plain loops in long double over deq(Wq) + s B A.
      const RowMatrix<float> Wd = layer.base_weight().dequantize();
      const auto& A = layer.delta().A();
      const auto& B = layer.delta().B();
      const long double s = layer.delta().scale();
      long double worst = 0, scale_ref = 0;
      for (index_t t = 0; t < sh.n; ++t)
        for (index_t o = 0; o < sh.out; ++o) {
          long double acc = layer.has_bias() ? layer.bias()(o) : 0.0f;
          for (index_t i = 0; i < sh.in; ++i) {
            long double w = Wd(o, i);
            for (index_t k = 0; k < A.rows(); ++k) w += s * B(o, k) * A(k, i);
            acc += w * X(t, i);
          }
          worst = std::max(worst, std::fabs(acc - Y(t, o)));
          scale_ref = std::max(scale_ref, std::fabs(acc));
        }
      CHECK(double(worst / scale_ref) < 1e-5);
    }
  }
}

TEST_CASE("qlora forward: single vector, column-major output, workspace, block sizes", "[qlora]") {
  auto layer = make_qlora<4>(40, 96, 4, true, 32);
  const auto twin = dense_twin(layer);
  Eigen::VectorXf x(96);
  fill(x, 31);
  CHECK(rel_diff(layer.forward(x), twin.forward(x)) < 1e-5);

  RowMatrix<float> X(6, 96);
  fill(X, 32);
  Eigen::MatrixXf Ycol(6, 40);  // column-major: goes through a row-major copy
  layer.forward(X, Ycol);
  CHECK(rel_diff(Ycol, twin.forward(X)) < 1e-5);

  typename decltype(layer)::workspace ws;
  RowMatrix<float> Y(6, 40);
  layer.forward(X, Y, ws);
  CHECK(rel_diff(Y, twin.forward(X)) < 1e-5);

  // Blocks longer than a row (4096 > 24 * 160 / 2): every block spans rows.
  RowMatrix<float> X3(3, 160);
  fill(X3, 33);
  for (index_t block : {128, 4096}) {
    CAPTURE(block);
    auto big_blocks = make_qlora<2>(24, 160, 2, block == 4096, block);
    CHECK(rel_diff(big_blocks.forward(X3), dense_twin(big_blocks).forward(X3)) < 1e-5);
    CHECK(rel_diff(big_blocks.forward(X3.topRows(1)), dense_twin(big_blocks).forward(X3.topRows(1))) < 1e-5);
  }
}

TEST_CASE("qlora expressions: slices, materialise, first_non_finite", "[qlora][expr]") {
  auto layer = make_qlora<lora::dynamic>(50, 67, 5, true);
  const auto twin = dense_twin(layer);
  const RowMatrix<float> full = lora::expr::materialize(layer.unmerged_expression());
  const RowMatrix<float> ref = lora::expr::materialize(twin.unmerged_expression());
  CHECK(full == ref);  // dequantise + the same rank-r update: same bits
  CHECK(lora::expr::first_non_finite(layer.unmerged_expression(), 7) == -1);

  RowMatrix<float> X(4, 67);
  fill(X, 41);
  const auto slice = lora::expr::slice_rows(layer.unmerged_expression(), 13, 20);
  RowMatrix<float> Ys(4, 20), G(4, 20), dX(4, 67);
  lora::expr::workspace_t<decltype(slice)> ws;
  lora::expr::apply(slice, X, Ys, 1.0f, 0.0f, ws);
  CHECK(rel_diff(Ys, (X * ref.middleRows(13, 20).transpose()).eval()) < 1e-5);
  fill(G, 42);
  lora::expr::apply_transposed(slice, G, dX, 1.0f, 0.0f, ws);
  CHECK(rel_diff(dX, (G * ref.middleRows(13, 20)).eval()) < 1e-5);
  // alpha / beta on a slice of the base alone.
  RowMatrix<float> D = RowMatrix<float>::Ones(20, 67);
  lora::expr::assign(D, lora::expr::slice_rows(layer.base_expression(), 13, 20), 2.0f, 0.5f);
  const RowMatrix<float> Wd = layer.base_weight().dequantize();
  CHECK(rel_diff(D, (0.5f * RowMatrix<float>::Ones(20, 67) + 2.0f * Wd.middleRows(13, 20)).eval()) < 1e-6);

  // A huge B makes W + s B A overflow: found, with its row and column.
  layer.delta().B()(17, 2) = 3e38f;
  layer.delta().A().row(2).setConstant(4.0f);
  CHECK(lora::expr::first_non_finite(layer.unmerged_expression(), 8) == 17 * 67);
}

TEMPLATE_TEST_CASE_SIG("qlora backward: dX through deq(Wq), dA and dB as over the dense twin", "[qlora][train]",
                       ((int R), R), 4, lora::dynamic) {
  for (const shape& sh : {shape{48, 64, 1}, shape{37, 131, 9}, shape{64, 128, 32}}) {
    CAPTURE(sh.out, sh.in, sh.n);
    auto layer = make_qlora<R>(sh.out, sh.in, 4, true, 64, true);
    auto twin = dense_twin(layer);
    RowMatrix<float> X(sh.n, sh.in), G(sh.n, sh.out);
    fill(X, 51);
    fill(G, 52);
    const train::Dropout drop(0.25, 9);
    auto run = [&](auto& l, RowMatrix<float>& Y, RowMatrix<float>& dX, auto& grads) {
      train::Tape<std::remove_reference_t<decltype(l)>> tape;
      train::forward(l, X, Y, tape, drop, 2);
      train::backward(l, X, G, tape, grads, dX);
    };
    RowMatrix<float> Y(sh.n, sh.out), Yd(sh.n, sh.out), dX(sh.n, sh.in), dXd(sh.n, sh.in);
    train::Gradients<decltype(layer)> g(layer, layer.has_bias());
    train::Gradients<decltype(twin)> gd(twin, twin.has_bias());
    run(layer, Y, dX, g);
    run(twin, Yd, dXd, gd);
    CHECK(rel_diff(Y, Yd) < 1e-5);
    CHECK(rel_diff(dX, dXd) < 1e-5);
    // dA, dB, db read X, G, A, B only: the base's format cannot change them.
    CHECK(g.dA() == gd.dA());
    CHECK(g.dB() == gd.dB());
    CHECK(g.db() == gd.db());
  }
}

TEST_CASE("qlora training: AdamW steps follow the dense twin; loss falls", "[qlora][train]") {
  auto layer = make_qlora<4>(32, 64, 4, true);
  layer.delta().init(lora::init::KaimingZero{}, 3);
  auto twin = dense_twin(layer);
  // Teacher: the dense twin plus a rank-2 change the adapter can learn.
  RowMatrix<float> U(32, 2), V(2, 64), X(64, 64);
  fill(U, 61);
  fill(V, 62);
  fill(X, 63);
  const RowMatrix<float> T = twin.forward(X) + 0.3f * X * (U * V).transpose();
  auto fit = [&](auto& l) {
    using Layer = std::remove_reference_t<decltype(l)>;
    train::Tape<Layer> tape;
    train::Gradients<Layer> grads(l, l.has_bias());
    train::AdamW<float> opt({.lr = 0.02});
    opt.add(l, grads);
    RowMatrix<float> Y(64, 32);
    float first = 0, last = 0;
    for (int step = 0; step < 60; ++step) {
      train::forward(l, X, Y, tape, train::Dropout(0.0, 0), std::uint64_t(step));
      const RowMatrix<float> Gr = (Y - T) / float(Y.rows());
      last = 0.5f * (Y - T).squaredNorm() / float(Y.rows());
      if (step == 0) first = last;
      train::backward(l, X, Gr, tape, grads);
      opt.step();
    }
    return std::pair{first, last};
  };
  const auto [q_first, q_last] = fit(layer);
  const auto [d_first, d_last] = fit(twin);
  CHECK(q_last < 0.05f * q_first);
  CHECK(q_first == Approx(d_first).epsilon(1e-5));
  CHECK(q_last == Approx(d_last).epsilon(1e-2));
  CHECK(rel_diff(layer.delta().B(), twin.delta().B()) < 1e-3);
}

TEST_CASE("qlora merge: dense merged weight is exact; requantised with an error report", "[qlora][merge]") {
  SECTION("merged_weight equals merging a dense copy of deq(Wq), bit for bit") {
    auto layer = make_qlora<lora::dynamic>(45, 130, 6, true);
    auto twin = dense_twin(layer);
    const RowMatrix<float> Wm = lora::merged_weight(layer);
    REQUIRE(twin.merge());
    CHECK(Wm == twin.base_weight());
  }
  SECTION("merge_to_nf4: errors reported as measured, within the quantisation bound") {
    for (bool dq : {false, true}) {
      CAPTURE(dq);
      auto layer = make_qlora<8>(64, 96, 8, dq);
      const RowMatrix<float> exact = lora::merged_weight(layer);
      const lora::NF4MergeResult m = lora::merge_to_nf4(layer);
      CHECK(m.weight.block_size() == 64);
      CHECK(m.weight.double_quantized() == dq);
      const RowMatrix<float> back = m.weight.dequantize();
      const Eigen::ArrayXXd err = (back.cast<double>() - exact.cast<double>()).array().abs();
      Eigen::Index wr = 0, wc = 0;
      CHECK(m.max_abs_error == err.maxCoeff(&wr, &wc));
      CHECK(m.worst_row == wr);
      CHECK(m.worst_col == wc);
      CHECK(m.mean_abs_error == Approx(err.mean()).epsilon(1e-9));
      CHECK(m.rms_error == Approx(std::sqrt(err.square().mean())).epsilon(1e-9));
      // Per block, codes are chosen with the true absmax a and decoded with the
      // stored scale a' (a' = a without double quantisation):
      // |c a' - x| <= |c| |a' - a| + |c a - x| <= |a' - a| + half the largest code gap * a.
      const double half_gap = (1.0 - 0.6961928009986877) / 2;  // the widest gap: codes 0 and 1
      const float* e = exact.data();
      for (index_t b = 0; b < m.weight.num_blocks(); ++b) {
        double amax = 0, worst = 0;
        for (index_t i = b * 64; i < std::min<index_t>((b + 1) * 64, exact.size()); ++i) {
          amax = std::max(amax, std::fabs(double(e[i])));
          worst = std::max(worst, std::fabs(double(back.data()[i]) - double(e[i])));
        }
        const double stored = m.weight.block_scale(b);
        CHECK(worst <= std::fabs(stored - amax) + half_gap * amax * (1 + 1e-6));
        if (!dq) CHECK(stored == amax);
      }
    }
  }
  SECTION("a zero adapter (B = 0) requantises to the same bytes without double quantisation") {
    auto layer = make_qlora<2>(16, 128, 2, false);
    layer.delta().B().setZero();
    const auto m = lora::merge_to_nf4(layer);
    CHECK(m.max_abs_error == 0.0);
    const auto p0 = layer.base_weight().packed(), p1 = m.weight.packed();
    CHECK(std::equal(p0.begin(), p0.end(), p1.begin(), p1.end()));
  }
  SECTION("other options; non-finite merged weight refused") {
    auto layer = make_qlora<2>(16, 128, 2, true);
    const auto m = lora::merge_to_nf4(layer, lora::NF4Options{.block_size = 128});
    CHECK(m.weight.block_size() == 128);
    CHECK_FALSE(m.weight.double_quantized());
    layer.delta().B()(3, 1) = std::numeric_limits<float>::infinity();
    CHECK_THROWS_AS(lora::merge_to_nf4(layer), lora::NumericError);  // like safe_merge and merge_rounded
    CHECK_THROWS_WITH(lora::merge_to_nf4(layer), Catch::Contains("lora::merge_to_nf4: W + s*B*A is inf at row 3"));
  }
}

TEST_CASE("qlora memory: the frozen base counts its NF4 bytes", "[qlora][memory]") {
  auto layer = make_qlora<8>(256, 512, 8, true);
  const auto r = train::memory_usage(layer);
  CHECK(r.frozen_bytes == double(layer.base_weight().storage_bytes()));
  CHECK(r.frozen_bytes < 256.0 * 512 * 4.13 / 8);
  CHECK(r.trainable_parameters == 8u * (256 + 512));
  const auto dense = train::memory_usage(dense_twin(layer));
  CHECK(dense.frozen_bytes == 256.0 * 512 * 4);
  CHECK(r.trainable_bytes == dense.trainable_bytes);
}

TEST_CASE("qlora errors: shapes are checked and named", "[qlora][errors]") {
  RowMatrix<float> W(16, 64);
  fill(W, 71);
  NF4Matrix Wq = NF4Matrix::quantize(W);
  CHECK_THROWS_WITH((lora::AdaptedLinear(Wq, lora::LowRankDelta<float, 2>(16, 32))),
                    Catch::Contains("base weight is [out, in] = [16, 64] but the delta is [16, 32]"));
  lora::AdaptedLinear layer(std::move(Wq), lora::LowRankDelta<float, 2>(16, 64));
  RowMatrix<float> X(3, 63), Y(3, 16);
  CHECK_THROWS_WITH(layer.forward(X, Y), Catch::Contains("X has 63 columns, expected in_features = 64"));
  RowMatrix<float> X2(3, 64), Y2(2, 16);
  CHECK_THROWS_AS(layer.forward(X2, Y2), lora::ShapeError);
  static_assert(decltype(layer)::base_is_quantized && !decltype(layer)::base_is_writable);
}

// ---- 16-bit bases: bf16 / fp16 storage, fp32 compute -----------------------------------

namespace {

// Long-double reference of X (W16 + s B A)^T + b over the 16-bit values, and
// the sum of |terms| (the scale of fp32 accumulation error).
template <class W16, class Layer>
void reference16(const W16& W, const Layer& layer, const RowMatrix<float>& X, RowMatrix<long double>& y,
                 RowMatrix<long double>& mag) {
  const index_t n = X.rows(), out = W.rows(), in = W.cols(), r = layer.rank();
  const long double s = layer.delta().scale();
  y.setZero(n, out);
  mag.setZero(n, out);
  for (index_t t = 0; t < n; ++t)
    for (index_t o = 0; o < out; ++o) {
      long double acc = layer.has_bias() ? layer.bias()(o) : 0, m = std::fabs(acc);
      for (index_t i = 0; i < in; ++i) {
        const long double term = (long double)X(t, i) * (long double)static_cast<float>(W(o, i));
        acc += term;
        m += std::fabs(term);
      }
      for (index_t k = 0; k < r; ++k) {
        long double h = 0, hm = 0;
        for (index_t i = 0; i < in; ++i) {
          h += (long double)X(t, i) * layer.delta().A()(k, i);
          hm += std::fabs((long double)X(t, i) * layer.delta().A()(k, i));
        }
        acc += s * h * layer.delta().B()(o, k);
        m += std::fabs(s * layer.delta().B()(o, k)) * hm;
      }
      y(t, o) = acc;
      mag(t, o) = m;
    }
}

}  // namespace

TEMPLATE_TEST_CASE("16-bit base: forward, backward, expressions against long-double references", "[half][qlora]",
                   Eigen::bfloat16, Eigen::half) {
  using S = TestType;
  const float eps = std::numeric_limits<float>::epsilon();
  // bf16 keeps 8 significant bits, fp16 11: one rounding of W costs u |W|.
  const double u16 = std::is_same_v<S, Eigen::bfloat16> ? 1.0 / 256 : 1.0 / 2048;
  for (const index_t in : {37, 300}) {  // a vector tail; several 16-wide steps and a tail
    const index_t out = 53, r = 4;
    RowMatrix<float> W(out, in);
    fill(W, 21);
    const RowMatrix<S> W16 = W.cast<S>();
    Eigen::VectorXf b(out);
    fill(b, 22);
    lora::LowRankDelta<float, 4> delta{out, in, {.alpha = 8}};
    fill(delta.A(), 23);
    fill(delta.B(), 24, -0.5, 0.5);
    // A view over the caller's 16-bit bytes, as PyTorch lays them out: no copy.
    const Eigen::Map<const RowMatrix<S>> view(W16.data(), out, in);
    lora::AdaptedLinear layer{view, b, delta};
    static_assert(decltype(layer)::base_is_quantized && !decltype(layer)::base_is_writable);
    CHECK(&layer.base_weight().coeffRef(0, 0) == W16.data());
    lora::AdaptedLinear dense{W, b, delta};  // the fp32 W before rounding

    for (const index_t n : {1, 2, 7, 33, 150}) {  // GEMV, skinny kernel, Eigen GEMM
      CAPTURE(in, n);
      RowMatrix<float> X(n, in);
      fill(X, 25 + n);
      RowMatrix<long double> y, mag;
      reference16(W16, layer, X, y, mag);
      const RowMatrix<float> Y = layer.forward(X);
      const double k = double(in + r + 2);
      for (index_t t = 0; t < n; ++t)
        for (index_t o = 0; o < out; ++o)
          REQUIRE(std::fabs((long double)Y(t, o) - y(t, o)) <= 2 * k * eps * mag(t, o) + 1e-30);
      // Against the fp32 W: the bound implied by one 16-bit rounding of W.
      const RowMatrix<float> Yd = dense.forward(X);
      for (index_t t = 0; t < n; ++t)
        for (index_t o = 0; o < out; ++o)
          REQUIRE(std::fabs(double(Y(t, o)) - double(Yd(t, o))) <= (u16 + 4 * k * eps) * double(mag(t, o)));

      // Backward: dX = G (W16 + s B A), dA, dB through the same tape machinery.
      RowMatrix<float> G(n, out), dX(n, in), Yt(n, out);
      fill(G, 40 + n);
      train::Tape<decltype(layer)> tape;
      train::Gradients<decltype(layer)> grads(layer, layer.has_bias());
      train::forward(layer, X, Yt, tape);
      CHECK((Yt - Y).cwiseAbs().maxCoeff() <= 4 * k * eps * float(mag.maxCoeff()));
      train::backward(layer, X, G, tape, grads, dX);
      const RowMatrix<float> W16f = W16.template cast<float>();
      lora::AdaptedLinear twin{W16f, b, delta};  // an fp32 layer holding exactly the 16-bit values
      train::Tape<decltype(twin)> ttape;
      train::Gradients<decltype(twin)> tgrads(twin, twin.has_bias());
      RowMatrix<float> dXt(n, in), Ytt(n, out);
      train::forward(twin, X, Ytt, ttape);
      train::backward(twin, X, G, ttape, tgrads, dXt);
      const RowMatrix<long double> dX_ref =
          G.cast<long double>() * (W16f.cast<long double>() +
                                   (long double)delta.scale() * delta.B().cast<long double>() *
                                       delta.A().cast<long double>());
      const RowMatrix<long double> dX_mag =
          G.cast<long double>().cwiseAbs() *
          (W16f.cast<long double>().cwiseAbs() + std::fabs((long double)delta.scale()) *
                                                     delta.B().cast<long double>().cwiseAbs() *
                                                     delta.A().cast<long double>().cwiseAbs());
      const double kd = double(out + r + 2);
      for (index_t t = 0; t < n; ++t)
        for (index_t i = 0; i < in; ++i)
          REQUIRE(std::fabs((long double)dX(t, i) - dX_ref(t, i)) <= 2 * kd * eps * dX_mag(t, i) + 1e-30);
      // dA, dB do not involve W: the fp32 twin's, to rounding of the shared H.
      CHECK((grads.dB() - tgrads.dB()).cwiseAbs().maxCoeff() <= 1e-4f * (1 + tgrads.dB().cwiseAbs().maxCoeff()));
      CHECK((grads.dA() - tgrads.dA()).cwiseAbs().maxCoeff() <= 1e-4f * (1 + tgrads.dA().cwiseAbs().maxCoeff()));
      CHECK((grads.db() - tgrads.db()).cwiseAbs().maxCoeff() == 0);
    }

    // The expressions: materialise W16 + s B A, rows of it, first_non_finite.
    const RowMatrix<float> Wm = lora::merged_weight(layer);
    const RowMatrix<float> want = W16.template cast<float>() + delta.scale() * delta.B() * delta.A();
    CHECK((Wm - want).cwiseAbs().maxCoeff() <= 8 * eps * (1 + want.cwiseAbs().maxCoeff()));
    CHECK(lora::expr::first_non_finite(layer.unmerged_expression()) == -1);

    // merge_rounded: one rounding to the storage type, its error reported.
    const auto m = lora::merge_rounded(layer);
    static_assert(std::is_same_v<std::remove_cvref_t<decltype(m.weight)>, RowMatrix<S>>);
    const RowMatrix<float> back = m.weight.template cast<float>();
    CHECK(m.max_abs_error == Approx((back - Wm).cwiseAbs().maxCoeff()).epsilon(1e-6));
    CHECK(m.max_abs_error <= u16 * Wm.cwiseAbs().maxCoeff());
    CHECK(m.rms_error <= m.max_abs_error);
    CHECK(std::fabs(back(m.worst_row, m.worst_col) - Wm(m.worst_row, m.worst_col)) == Approx(m.max_abs_error));

    // Memory accounting counts 2 bytes per base weight.
    const auto mem = train::memory_usage(layer);
    CHECK(mem.frozen_bytes == double(out * in) * 2 + double(out) * 4);  // W in 16 bits, the frozen bias in fp32
  }
}

TEST_CASE("16-bit base: merge_rounded refuses values beyond fp16's range", "[half][errors]") {
  RowMatrix<Eigen::half> W = RowMatrix<float>::Constant(3, 4, 60000.0f).cast<Eigen::half>();
  lora::LowRankDelta<float, 1> delta{3, 4};
  delta.A().setConstant(1);
  delta.B().setConstant(10000);
  lora::AdaptedLinear layer{W, delta};
  CHECK_THROWS_AS(lora::merge_rounded(layer), lora::NumericError);
  CHECK_THROWS_WITH(lora::merge_rounded(layer), Catch::Contains("beyond the 16-bit range once rounded") &&
                                                    Catch::Contains("row 0, column 0"));
}
