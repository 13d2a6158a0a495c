// MergedLinear (<lora/merged_linear.hpp>): loralib's fused projection with a
// delta per enabled slice. Forward, backward and merge against a plain dense
// long-double reference formed here (W with s_k B_k A_k added into each
// enabled slice's rows), against loralib's own MergedLinear outputs
// (tests/fixtures/loralib, scripts/gen_loralib_fixtures.py), the loralib
// layout round trip, training through lora::train's optimizers, and the typed
// errors.
#include <catch2/catch.hpp>

#include "support.hpp"

#include <lora/merged_linear.hpp>
#include <lora/io/safetensors.hpp>

#include <cmath>
#include <filesystem>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <thread>
#include <vector>

namespace fs = std::filesystem;
using lora::index_t;
using lora::RowMatrix;
using LD = long double;
using RowMatrixLD = RowMatrix<LD>;

namespace {

using support::fill;
using support::rel_err;
using support::message_of;
template <class T, int R>
std::vector<lora::LowRankDelta<T, R>> make_deltas(const std::vector<index_t>& sizes, const std::vector<bool>& mask,
                                                  index_t in, index_t rank, std::uint64_t seed) {
  std::vector<lora::LowRankDelta<T, R>> out;
  for (std::size_t k = 0; k < sizes.size(); ++k)
    if (mask[k]) {
      // A different alpha per slice, so a slice mix-up changes the numbers.
      lora::LowRankDelta<T, R> d(sizes[k], in, rank, {.alpha = 2.0 + static_cast<double>(k)});
      fill(d.A(), seed + 2 * k);
      fill(d.B(), seed + 2 * k + 1);
      out.push_back(std::move(d));
    }
  return out;
}

/// The effective weight in long double: W, plus s_k B_k A_k in each enabled slice's rows.
template <class Layer>
RowMatrixLD dense_weight(const RowMatrixLD& w, const Layer& layer) {
  RowMatrixLD out = w;
  for (std::size_t j = 0; j < layer.deltas().size(); ++j) {
    const auto& d = layer.deltas()[j];
    const index_t k = layer.deltas().slice_of(j);
    out.middleRows(layer.slice_offset(k), layer.slice_size(k)) +=
        static_cast<LD>(d.scale()) * (d.B().template cast<LD>() * d.A().template cast<LD>());
  }
  return out;
}
template <class T>
constexpr double eps = std::numeric_limits<T>::epsilon();

}  // namespace

TEST_CASE("MergedLinear forward equals the dense reference", "[merged_linear]") {
  const index_t in = 12, n = 5;
  SECTION("fused qkv, static rank 4, float, enable {T, F, T}, bias") {
    const std::vector<index_t> sizes = {8, 8, 8};
    const std::vector<bool> mask = {true, false, true};
    RowMatrix<float> w(24, in), x(n, in);
    Eigen::VectorXf b(24);
    fill(w, 1);
    fill(x, 2);
    fill(b, 3);
    lora::MergedLinear layer{w, b, sizes, mask, make_deltas<float, 4>(sizes, mask, in, 4, 10)};
    STATIC_REQUIRE(decltype(layer)::rank_at_compile_time == 4);
    CHECK(layer.deltas().size() == 2);
    CHECK(layer.slice_offset(2) == 16);
    CHECK(layer.slice_delta(2).scale() == 4.0f / 4);  // alpha 2 + k over r
    const RowMatrixLD weff = dense_weight(w.cast<LD>(), layer);
    RowMatrixLD ref = x.cast<LD>() * weff.transpose();
    ref.rowwise() += b.cast<LD>().transpose();
    const RowMatrix<float> y = layer.forward(x);
    // Each output is a sum of in + r products: gamma_(in + r + 2) relative to the sum of |terms| <= max|ref|
    // (inputs are of one magnitude), with a factor 4 of slack.
    CHECK(rel_err(y, ref) <= 4 * (in + 6) * eps<float>);
    // the disabled slice is exactly the base product: differs from the adapted weight there only
    const RowMatrixLD base = x.cast<LD>() * w.cast<LD>().transpose();
    CHECK(rel_err(RowMatrix<float>(y.middleCols(8, 8)), RowMatrixLD(base.middleCols(8, 8).rowwise() +
                                                                     b.segment(8, 8).cast<LD>().transpose())) <=
          4 * (in + 2) * eps<float>);
    CHECK(rel_err(y, RowMatrixLD(base.rowwise() + b.cast<LD>().transpose())) > 0.05);  // the deltas matter
  }
  SECTION("unequal slices, dynamic rank, double, read-only Map, into a block of a larger Y") {
    const std::vector<index_t> sizes = {5, 3, 7};
    const std::vector<bool> mask = {true, true, false};
    RowMatrix<double> w(15, in), x(n, in);
    fill(w, 4);
    fill(x, 5);
    lora::MergedLinear layer{Eigen::Map<const RowMatrix<double>>(w.data(), 15, in), sizes, mask,
                             make_deltas<double, lora::dynamic>(sizes, mask, in, 3, 20)};
    CHECK(layer.base_weight().data() == w.data());
    const RowMatrixLD ref = x.cast<LD>() * dense_weight(w.cast<LD>(), layer).transpose();
    RowMatrix<double> big = RowMatrix<double>::Constant(n, 20, 42.0);
    decltype(layer)::workspace ws;
    layer.forward(x, big.middleCols(2, 15), ws);
    CHECK(big.leftCols(2).isConstant(42.0));
    CHECK(big.rightCols(3).isConstant(42.0));
    CHECK(rel_err(RowMatrix<double>(big.middleCols(2, 15)), ref) <= 4 * (in + 5) * eps<double>);
    // a single token, same workspace
    RowMatrix<double> y1(1, 15);
    layer.forward(x.topRows(1), y1, ws);
    CHECK(rel_err(y1, RowMatrixLD(ref.topRows(1))) <= 4 * (in + 5) * eps<double>);
  }
  SECTION("every slice disabled: the plain linear layer") {
    const std::vector<index_t> sizes = {4, 6};
    RowMatrix<double> w(10, in), x(n, in);
    fill(w, 6);
    fill(x, 7);
    lora::MergedLinear<RowMatrix<double>, lora::LowRankDelta<double>> layer{w, sizes, {false, false}, {}};
    CHECK(layer.deltas().empty());
    CHECK(layer.deltas().trainable_parameters() == 0);
    CHECK(layer.forward(x) == RowMatrix<double>(x * w.transpose()));
    CHECK(layer.merged_weight() == w);
    CHECK(layer.merge());
    CHECK(layer.base_weight() == w);
  }
  SECTION("zero-initialised deltas from the rank constructor start equal to the base") {
    RowMatrix<double> w(9, in), x(n, in);
    fill(w, 8);
    fill(x, 9);
    lora::MergedLinear<RowMatrix<double>, lora::LowRankDelta<double, 2>> layer{w, {3, 3, 3}, {false, true, true}, 2,
                                                                               {.alpha = 16}};
    CHECK(layer.slice_delta(1).rank() == 2);
    CHECK(layer.slice_delta(2).scale() == 8.0);
    CHECK(rel_err(layer.forward(x), RowMatrixLD(x.cast<LD>() * w.cast<LD>().transpose())) <= 4 * in * eps<double>);
  }
}

TEST_CASE("MergedLinear over bf16 and NF4 bases equals the layer over the decoded base", "[merged_linear]") {
  const index_t in = 64, n = 3;
  const std::vector<index_t> sizes = {16, 32, 16};
  const std::vector<bool> mask = {true, false, true};
  RowMatrix<float> w(64, in), x(n, in);
  fill(w, 30);
  fill(x, 31);
  const auto deltas = make_deltas<float, 4>(sizes, mask, in, 4, 32);
  SECTION("bf16") {
    const RowMatrix<Eigen::bfloat16> w16 = w.cast<Eigen::bfloat16>();
    const RowMatrix<float> widened = w16.cast<float>();
    lora::MergedLinear l16{w16, sizes, mask, deltas};
    lora::MergedLinear lf{widened, sizes, mask, deltas};
    STATIC_REQUIRE(decltype(l16)::base_is_quantized);
    CHECK(rel_err(l16.forward(x), RowMatrixLD(lf.forward(x).cast<LD>())) <= 8 * in * eps<float>);
    CHECK(l16.merged_weight() == lf.merged_weight());
  }
  SECTION("NF4") {
    const lora::NF4Matrix q = lora::NF4Matrix::quantize(w);
    const RowMatrix<float> deq = q.dequantize();
    lora::MergedLinear lq{q, sizes, mask, deltas};
    lora::MergedLinear lf{deq, sizes, mask, deltas};
    CHECK(rel_err(lq.forward(x), RowMatrixLD(lf.forward(x).cast<LD>())) <= 8 * in * eps<float>);
    CHECK(lq.merged_weight() == lf.merged_weight());
    // dX through the NF4 base
    RowMatrix<float> g(n, 64), dxq(n, in), dxf(n, in);
    fill(g, 33);
    auto gq = lq.delta().make_gradients();
    auto gf = lf.delta().make_gradients();
    lq.backward(x, g, gq, dxq);
    lf.backward(x, g, gf, dxf);
    CHECK(rel_err(dxq, RowMatrixLD(dxf.cast<LD>())) <= 8 * 64 * eps<float>);
    CHECK(gq[1].dA() == gf[1].dA());
  }
}

TEST_CASE("MergedLinear forward is const and thread-safe", "[merged_linear]") {
  const index_t in = 16;
  const std::vector<index_t> sizes = {8, 8, 8};
  const std::vector<bool> mask = {true, true, true};
  RowMatrix<float> w(24, in), x(40, in);
  fill(w, 40);
  fill(x, 41);
  const lora::MergedLinear layer{w, sizes, mask, make_deltas<float, 4>(sizes, mask, in, 4, 42)};
  const RowMatrix<float> want = layer.forward(x);
  std::vector<int> ok(4, 0);
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t)
    threads.emplace_back([&, t] {
      bool same = true;
      for (int k = 0; k < 20; ++k) same = same && layer.forward(x) == want;
      ok[static_cast<std::size_t>(t)] = same ? 1 : 0;
    });
  for (auto& t : threads) t.join();
  CHECK(ok == std::vector<int>(4, 1));
}

TEST_CASE("MergedLinear backward equals the dense reference", "[merged_linear]") {
  const index_t in = 10, n = 6;
  auto check = [&]<class T, int R>(const std::vector<index_t>& sizes, const std::vector<bool>& mask, index_t rank,
                                   double tol) {
    index_t out = 0;
    for (index_t s : sizes) out += s;
    RowMatrix<T> w(out, in), x(n, in), g(n, out);
    Eigen::Matrix<T, Eigen::Dynamic, 1> b(out);
    fill(w, 50);
    fill(x, 51);
    fill(g, 52);
    fill(b, 53);
    lora::MergedLinear layer{w, b, sizes, mask, make_deltas<T, R>(sizes, mask, in, rank, 54)};
    lora::train::Gradients<decltype(layer)> grads(layer, /*train_bias=*/true);
    RowMatrix<T> dx(n, in);
    fill(dx, 55);  // overwritten
    layer.backward(x, g, grads, dx);

    // L = <G, Y>: dA_k = s_k (G_k B_k)^T X, dB_k = s_k G_k^T X A_k^T, dX = G W_eff, db = sum_t G[t]
    const RowMatrixLD xl = x.template cast<LD>(), gl = g.template cast<LD>();
    const RowMatrixLD weff = dense_weight(w.template cast<LD>(), layer);
    CHECK(rel_err(dx, RowMatrixLD(gl * weff)) <= tol);
    CHECK(rel_err(grads.db(), RowMatrixLD(gl.colwise().sum().transpose())) <= tol);
    for (std::size_t j = 0; j < layer.deltas().size(); ++j) {
      const auto& d = layer.deltas()[j];
      const index_t k = layer.deltas().slice_of(j);
      const LD s = d.scale();
      const RowMatrixLD gk = gl.middleCols(layer.slice_offset(k), layer.slice_size(k));
      const RowMatrixLD a = d.A().template cast<LD>(), bm = d.B().template cast<LD>();
      INFO("slice " << k);
      CHECK(rel_err(grads.adapter()[j].dA(), RowMatrixLD(s * (gk * bm).transpose() * xl)) <= tol);
      CHECK(rel_err(grads.adapter()[j].dB(), RowMatrixLD(s * gk.transpose() * xl * a.transpose())) <= tol);
    }

    // accumulate / accumulate_dx add the same again
    const auto first = grads.adapter();
    const RowMatrix<T> dx1 = dx;
    layer.backward(x, g, grads, dx, {.accumulate = true, .accumulate_dx = true});
    CHECK(rel_err(dx, RowMatrixLD(2 * gl * weff)) <= tol);
    for (std::size_t j = 0; j < layer.deltas().size(); ++j) {
      CHECK(rel_err(grads.adapter()[j].dA(), RowMatrixLD(2 * first[j].dA().template cast<LD>())) <= tol);
      CHECK(rel_err(grads.adapter()[j].dB(), RowMatrixLD(2 * first[j].dB().template cast<LD>())) <= tol);
    }
    // without dX, into the adapter's gradients alone, own workspace: the same gradients
    auto plain = layer.delta().make_gradients();
    layer.backward(x, g, plain);
    for (std::size_t j = 0; j < layer.deltas().size(); ++j) CHECK(plain[j].dA() == first[j].dA());

    // merged: the same gradients, dX through W' (to rounding)
    auto mg = layer.delta().make_gradients();
    RowMatrix<T> dxm(n, in);
    layer.merge();
    layer.backward(x, g, mg, dxm);
    CHECK(rel_err(dxm, RowMatrixLD(gl * weff)) <= tol);
    for (std::size_t j = 0; j < layer.deltas().size(); ++j) CHECK(rel_err(mg[j].dB(), RowMatrixLD(first[j].dB().template cast<LD>())) <= tol);
  };
  SECTION("float, static rank, fused qkv {T, F, T}") {
    check.operator()<float, 4>({8, 8, 8}, {true, false, true}, 4, 4 * (in + 8) * eps<float>);
  }
  SECTION("double, dynamic rank, unequal slices {T, T, F, T}") {
    check.operator()<double, lora::dynamic>({5, 3, 7, 4}, {true, true, false, true}, 2, 4 * (in + 8) * eps<double>);
  }
}

TEST_CASE("MergedLinear merge / unmerge / safe_merge / merged_weight", "[merged_linear]") {
  const index_t in = 12, n = 4;
  const std::vector<index_t> sizes = {6, 2, 6};
  const std::vector<bool> mask = {true, false, true};
  RowMatrix<float> w(14, in), x(n, in);
  fill(w, 60);
  fill(x, 61);
  const RowMatrix<float> original = w;
  lora::MergedLinear layer{w, sizes, mask, make_deltas<float, 4>(sizes, mask, in, 4, 62)};
  const RowMatrixLD ref = dense_weight(original.cast<LD>(), layer);
  const RowMatrix<float> before = layer.forward(x);
  CHECK(rel_err(layer.merged_weight(), ref) <= 4 * 6 * eps<float>);
  CHECK(rel_err(lora::merged_weight(layer), ref) <= 4 * 6 * eps<float>);

  CHECK(layer.safe_merge());
  CHECK(layer.merged());
  CHECK_FALSE(layer.merge());
  CHECK(rel_err(layer.base_weight(), ref) <= 4 * 6 * eps<float>);
  CHECK(layer.base_weight().middleRows(6, 2) == original.middleRows(6, 2));  // the disabled slice is untouched
  CHECK(layer.merged_weight() == layer.base_weight());
  CHECK(rel_err(layer.forward(x), RowMatrixLD(before.cast<LD>())) <= 4 * (in + 6) * eps<float>);
  // unmerge subtracts the s_k of merge even if a multiplier changed meanwhile
  layer.deltas()[1].set_multiplier(3.0);
  CHECK(layer.unmerge());
  CHECK_FALSE(layer.unmerge());
  CHECK(rel_err(layer.base_weight(), RowMatrixLD(original.cast<LD>())) <= 8 * 6 * eps<float>);

  SECTION("safe_merge refuses a non-finite result and leaves W bit-identical") {
    const RowMatrix<float> keep = layer.base_weight();
    layer.deltas()[1].B()(3, 0) = std::numeric_limits<float>::infinity();
    const std::string msg = message_of([&] { layer.safe_merge(); });
    CHECK_THAT(msg, Catch::Contains("MergedLinear::safe_merge") && Catch::Contains("slice 2") &&
                        Catch::Contains("row 11"));
    CHECK_THROWS_AS(layer.safe_merge(), lora::NumericError);
    CHECK(layer.base_weight() == keep);
    CHECK_FALSE(layer.merged());
  }
  SECTION("a writable Map: merge writes the caller's buffer") {
    RowMatrix<float> buf = original;
    lora::MergedLinear m{Eigen::Map<RowMatrix<float>>(buf.data(), 14, in), sizes, mask,
                         make_deltas<float, 4>(sizes, mask, in, 4, 62)};
    m.merge();
    CHECK(rel_err(buf, ref) <= 4 * 6 * eps<float>);
  }
}

TEST_CASE("MergedLinear trains with lora::train's optimizers", "[merged_linear]") {
  const index_t in = 8, n = 3;
  const std::vector<index_t> sizes = {4, 4, 4};
  const std::vector<bool> mask = {true, false, true};
  RowMatrix<float> w(12, in), x(n, in), g(n, 12);
  fill(w, 70);
  fill(x, 71);
  fill(g, 72);
  lora::MergedLinear layer{w, sizes, mask, make_deltas<float, 2>(sizes, mask, in, 2, 73)};
  lora::train::Gradients<decltype(layer)> grads(layer);
  lora::train::SGD<float> opt({.lr = 0.1, .lora_plus_ratio = 2.0});
  opt.add(layer, grads, "qkv");
  REQUIRE(opt.parameters().size() == 4);
  CHECK(opt.parameters()[0].name == "qkv.slice0.lora_A");
  CHECK(opt.parameters()[3].name == "qkv.slice2.lora_B");
  CHECK(opt.parameters()[3].lr_scale == 2.0);
  const RowMatrix<float> a0 = layer.slice_delta(2).A(), b0 = layer.slice_delta(2).B();
  layer.backward(x, g, grads);
  opt.step();
  CHECK((layer.slice_delta(2).A() - (a0 - 0.1f * grads.adapter()[1].dA())).cwiseAbs().maxCoeff() <= 1e-6f);
  CHECK((layer.slice_delta(2).B() - (b0 - 0.2f * grads.adapter()[1].dB())).cwiseAbs().maxCoeff() <= 1e-6f);
  layer.merge();
  CHECK_THROWS_AS(opt.step(), lora::Error);  // no steps on a merged layer, as for AdaptedLinear
}

TEST_CASE("loralib layout: merged_deltas / merged_factors", "[merged_linear][loralib]") {
  const index_t in = 6, d = 4, r = 2;
  // enable {T, F, T}: K = 2 enabled slices; lora_A [r K, in], lora_B [d K, r]
  RowMatrix<double> la(r * 2, in), lb(d * 2, r);
  fill(la, 80);
  fill(lb, 81);
  const auto deltas = lora::loralib::merged_deltas<double>(la, lb, {true, false, true}, 3 * d, 8.0);
  REQUIRE(deltas.size() == 2);
  // slice j reads rows [j r, (j + 1) r) of lora_A and [j d, (j + 1) d) of lora_B; s = alpha / r
  CHECK(deltas[1].A() == la.middleRows(2, 2));
  CHECK(deltas[1].B() == lb.middleRows(4, 4));
  CHECK(deltas[0].scale() == 4.0);
  RowMatrix<double> w(3 * d, in);
  fill(w, 82);
  lora::MergedLinear layer{w, lora::loralib::slice_sizes(3 * d, 3), {true, false, true}, deltas};
  const auto f = lora::loralib::merged_factors(layer);
  CHECK(f.lora_A == la);
  CHECK(f.lora_B == lb);
  // static rank
  const auto d2 = lora::loralib::merged_deltas<float, 2>(la.cast<float>(), lb.cast<float>(), {true, false, true},
                                                          3 * d, 8.0);
  STATIC_REQUIRE(std::is_same_v<std::remove_cvref_t<decltype(d2[0])>, lora::LowRankDelta<float, 2>>);
  CHECK(d2[1].B() == lb.middleRows(4, 4).cast<float>());
  // loralib's delta, dense: conv1d(lora_A, lora_B, groups = K) zero-padded into the enabled rows
  RowMatrixLD delta = RowMatrixLD::Zero(3 * d, in);
  for (index_t o = 0; o < 2 * d; ++o) {
    const index_t j = o / d, row = (j == 0 ? 0 : 2 * d) + o % d;
    for (index_t c = 0; c < r; ++c) delta.row(row) += (LD)lb(o, c) * la.row(j * r + c).cast<LD>();
  }
  CHECK(rel_err(layer.merged_weight(), RowMatrixLD(w.cast<LD>() + 4 * delta)) <= 16 * eps<double>);
  // no slice enabled: no factors
  CHECK(lora::loralib::merged_deltas<double>(RowMatrix<double>(0, in), RowMatrix<double>(0, r), {false, false}, 8, 1.0)
            .empty());
}

TEST_CASE("MergedLinear equals loralib's MergedLinear on the saved fixtures", "[merged_linear][loralib]") {
  const fs::path dir = fs::path(LORA_TEST_FIXTURE_DIR) / "loralib";
  for (const char* name : {"merged_tft", "merged_ttt", "merged_tft_fifo", "merged_ttt_fifo"}) {
    INFO(name);
    const auto file = lora::io::SafetensorsFile::open(dir / (std::string(name) + ".safetensors"));
    const auto& meta = file.metadata();
    const std::string mask_s = meta.at("enable_lora");
    std::vector<bool> mask;
    for (char c : mask_s) mask.push_back(c == '1');
    const bool fifo = meta.at("fan_in_fan_out") == "1";
    const double alpha = std::stod(meta.at("lora_alpha"));
    const index_t r = std::stol(meta.at("r"));
    REQUIRE(r == 4);

    // loralib keeps W transposed ([in, out]) with fan_in_fan_out; ours is [out, in].
    RowMatrix<float> w = file.read<float>("weight");
    if (fifo) w = RowMatrix<float>(w.transpose());
    const Eigen::VectorXf b = file.read_vector<float>("bias");
    const RowMatrix<float> x = file.read<float>("x"), g = file.read<float>("g");
    const index_t out = w.rows(), in = w.cols();
    CHECK(out == 24);
    CHECK(in == 12);
    const auto sizes = lora::loralib::slice_sizes(out, static_cast<index_t>(mask.size()));
    lora::MergedLinear layer{w, b, sizes, mask,
                             lora::loralib::merged_deltas<float, 4>(file.view<float>("lora_A"),
                                                                    file.view<float>("lora_B"), mask, out, alpha)};
    const auto close = [](const RowMatrix<float>& got, const RowMatrix<float>& want) {
      return rel_err(got, RowMatrixLD(want.cast<LD>()));
    };
    const RowMatrix<float> want_y = file.read<float>("y");
    const double ey = close(layer.forward(x), want_y);
    INFO("forward rel err " << ey);
    CHECK(ey <= 1e-5);

    lora::train::Gradients<decltype(layer)> grads(layer, true);
    RowMatrix<float> dx(x.rows(), in);
    layer.backward(x, g, grads, dx);
    const double ex = close(dx, file.read<float>("grad_x"));
    INFO("dX rel err " << ex);
    CHECK(ex <= 1e-5);
    CHECK(rel_err(grads.db(), RowMatrixLD(file.read_vector<float>("grad_bias").cast<LD>())) <= 1e-5);
    // dA, dB back in loralib's stacked layout: the same mapping as the factors
    RowMatrix<float> da(file.info("lora_A").shape[0], in), db(file.info("lora_B").shape[0], r);
    const index_t d = sizes[0];
    for (std::size_t j = 0; j < layer.deltas().size(); ++j) {
      da.middleRows(static_cast<index_t>(j) * r, r) = grads.adapter()[j].dA();
      db.middleRows(static_cast<index_t>(j) * d, d) = grads.adapter()[j].dB();
    }
    const double ea = close(da, file.read<float>("grad_lora_A")), eb = close(db, file.read<float>("grad_lora_B"));
    INFO("dA rel err " << ea << ", dB rel err " << eb);
    CHECK(ea <= 1e-5);
    CHECK(eb <= 1e-5);

    // loralib's merged weight after model.eval() (merge_weights = True), in its storage layout
    RowMatrix<float> want_w = file.read<float>("merged_weight");
    if (fifo) want_w = RowMatrix<float>(want_w.transpose());
    const double ew = close(layer.merged_weight(), want_w);
    INFO("merged weight rel err " << ew);
    CHECK(ew <= 1e-5);
    CHECK(layer.merge());
    CHECK(close(layer.base_weight(), want_w) <= 1e-5);
    CHECK(close(layer.forward(x), file.read<float>("y_merged")) <= 1e-5);
    // the factors go back to loralib's tensors exactly
    const auto f = lora::loralib::merged_factors(layer);
    CHECK(f.lora_A == file.read<float>("lora_A"));
    CHECK(f.lora_B == file.read<float>("lora_B"));
    // the fixture can fail: the deltas change the output
    CHECK(close(RowMatrix<float>(x * w.transpose()), want_y) > 1e-3);
  }
}

TEST_CASE("MergedLinear errors", "[merged_linear][errors]") {
  const index_t in = 6;
  const std::vector<index_t> sizes = {4, 4, 4};
  const std::vector<bool> mask = {true, false, true};
  RowMatrix<float> w(12, in);
  fill(w, 90);
  using Layer = lora::MergedLinear<RowMatrix<float>, lora::LowRankDelta<float, 2>>;
  const auto good = make_deltas<float, 2>(sizes, mask, in, 2, 91);
  Layer layer{w, sizes, mask, good};
  RowMatrix<float> y = RowMatrix<float>::Constant(3, 12, 7.0f);
  const RowMatrix<float> y0 = y;
  RowMatrix<float> x(3, in);
  fill(x, 92);

  struct Case {
    std::string name;
    std::function<void()> f;
    std::vector<std::string> needles;
    int kind;  // 0 ShapeError, 1 ValueError, 2 RankError
  };
  const std::vector<Case> cases = {
      {"slice sizes do not sum to W's rows", [&] { Layer bad{w, {4, 4, 5}, mask, good}; },
       {"MergedLinear", "slice sizes sum to 13", "out_features = 12"}, 0},
      {"negative slice", [&] { Layer bad{w, {8, -2, 6}, mask, good}; }, {"slice 1 has size -2"}, 0},
      {"mask length mismatch", [&] { Layer bad{w, sizes, {true, false}, good}; },
       {"enable_lora has 2 flags", "3 slices"}, 0},
      {"too few deltas", [&] { Layer bad{w, sizes, {true, true, true}, good}; },
       {"2 deltas given for 3 enabled slices"}, 0},
      {"a delta of the wrong shape", [&] {
         auto d = good;
         d[1] = lora::LowRankDelta<float, 2>(5, in, 2);
         Layer bad{w, sizes, mask, d};
       },
       {"the delta of slice 2 is [out, in] = [5, 6]", "expected [4, 6]", "rows [8, 12)"}, 0},
      {"bias of the wrong size", [&] { Layer bad{w, Eigen::VectorXf::Zero(11), sizes, mask, good}; },
       {"bias has 11 entries", "out_features = 12"}, 0},
      {"X wrong columns", [&] { layer.forward(RowMatrix<float>(3, in + 1), y); }, {"MergedLinear::forward", "X has 7"}, 0},
      {"Y wrong shape", [&] {
         RowMatrix<float> small(3, 11);
         layer.forward(x, small);
       },
       {"Y is [3, 11]", "expected [n, out] = [3, 12]"}, 0},
      {"G wrong shape", [&] {
         auto gr = layer.delta().make_gradients();
         layer.backward(x, RowMatrix<float>(3, 10), gr);
       },
       {"MergedLinear::backward", "G is [3, 10]"}, 0},
      {"dX wrong shape", [&] {
         auto gr = layer.delta().make_gradients();
         RowMatrix<float> dx(3, in + 2);
         layer.backward(x, RowMatrix<float>(3, 12), gr, dx);
       },
       {"dX is [3, 8]", "expected [n, in] = [3, 6]"}, 0},
      {"gradients of another layer", [&] {
         lora::MergedGradients<lora::LowRankDelta<float, 2>> gr;
         layer.backward(x, RowMatrix<float>(3, 12), gr);
       },
       {"gradients hold 0 slices", "2 enabled slices"}, 0},
      {"slice_delta of a disabled slice", [&] { layer.slice_delta(1); }, {"slice 1 is not enabled"}, 1},
      {"slice_delta out of range", [&] { layer.slice_delta(3); }, {"slice 3 does not exist"}, 1},
      {"loralib: lora_A of the wrong shape", [&] {
         lora::loralib::merged_deltas<float>(RowMatrix<float>(3, in), RowMatrix<float>(8, 2), mask, 12, 1.0);
       },
       {"loralib::merged_deltas", "lora_A is [3, 6]", "lora_B [4 * 2, r] = [8, r]"}, 0},
      {"loralib: lora_B of the wrong shape", [&] {
         lora::loralib::merged_deltas<float>(RowMatrix<float>(4, in), RowMatrix<float>(12, 2), mask, 12, 1.0);
       },
       {"lora_B is [12, 2]"}, 0},
      {"loralib: out not divisible", [&] {
         lora::loralib::merged_deltas<float>(RowMatrix<float>(4, in), RowMatrix<float>(8, 2), {true, true}, 9, 1.0);
       },
       {"out_features = 9 is not divisible by 2"}, 0},
      {"loralib: static rank mismatch", [&] {
         lora::loralib::merged_deltas<float, 3>(RowMatrix<float>(4, in), RowMatrix<float>(8, 2), mask, 12, 1.0);
       },
       {"rank 2", "static rank 3"}, 2},
      {"loralib: factors with nothing enabled", [&] {
         lora::loralib::merged_deltas<float>(RowMatrix<float>(2, in), RowMatrix<float>(4, 2), {false, false, false}, 12,
                                             1.0);
       },
       {"no True entry"}, 0},
      {"loralib: unequal slices have no stacked layout", [&] {
         lora::MergedLinear l{w, {4, 8}, {true, false}, make_deltas<float, 2>({4, 8}, {true, false}, in, 2, 1)};
         lora::loralib::merged_factors(l);
       },
       {"slice 1 has 8 rows", "equal slices"}, 0},
  };
  for (const auto& c : cases) {
    INFO(c.name);
    const std::string msg = message_of(c.f);
    INFO(msg);
    for (const auto& needle : c.needles) CHECK(msg.find(needle) != std::string::npos);
    if (c.kind == 0)
      CHECK_THROWS_AS(c.f(), lora::ShapeError);
    else if (c.kind == 1)
      CHECK_THROWS_AS(c.f(), lora::ValueError);
    else
      CHECK_THROWS_AS(c.f(), lora::RankError);
    CHECK(y == y0);  // nothing half-written
  }
  SECTION("a factor resized after construction") {
    layer.deltas()[0].A().resize(2, in + 1);
    CHECK_THROWS_WITH(layer.forward(x, y), Catch::Contains("MergedLinear::forward") &&
                                               Catch::Contains("the delta of slice 0 is [out, in] = [4, 7]"));
    CHECK_THROWS_AS(layer.merge(), lora::ShapeError);
    CHECK(layer.base_weight() == w);
    CHECK(y == y0);
  }
}
