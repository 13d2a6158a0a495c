// Per-token adapters: MultiAdapterLinear's gathered forward(X, ids, Y) and
// backward(X, ids, G, ...), slots, the bank under hot swap, and
// PerAdapterOptimizer. References: a plain long-double computation written out
// here, and each token (or each adapter's rows) through its own AdaptedLinear
// and train::backward.
//
// The bound: every output element is a sum of at most in + r + 2 rounded
// float products and adds (base dot product, shrink, expand, bias), so
// |Y - Y_exact| <= gamma * M with gamma = (in + r + 4) * 2^-24 and M the same
// sum over absolute values (Higham's gamma_n for a dot product); the backward's
// elements likewise with their own depth. Bit-identical cases, where the
// summation order is the same by construction, are checked with ==.
#include <lora/adapter_set.hpp>

#include <catch2/catch.hpp>

#include "support.hpp"
#include <atomic>
#include <cmath>
#include <cstdint>
#include <string>
#include <thread>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

using support::fill;

using lora::index_t;
using lora::LowRankDelta;
using lora::RowMatrix;
using LD = long double;
using MatL = RowMatrix<LD>;
using Layer = lora::MultiAdapterLinear<RowMatrix<float>>;
LowRankDelta<float> random_delta(index_t out, index_t in, index_t r, double alpha, std::uint64_t seed) {
  LowRankDelta<float> d{out, in, r, {.alpha = alpha}};
  d.init(lora::init::UniformBoth{0.5}, seed);
  return d;
}

/// A layer with adapters of mixed ranks; `ranks[k]` becomes slot k, named "a<k>".
struct Fixture {
  index_t in = 72, out = 40;
  RowMatrix<float> W;
  Eigen::VectorXf bias;
  std::vector<LowRankDelta<float>> deltas;  // copies of what the layer holds, by slot
  Layer layer;

  explicit Fixture(std::vector<index_t> ranks, index_t in_ = 72, index_t out_ = 40)
      : in(in_), out(out_), W(make_w(out_, in_)), bias(make_bias(out_)), layer(W, bias) {
    for (std::size_t k = 0; k < ranks.size(); ++k) add(ranks[k], 100 + k);
  }
  index_t add(index_t r, std::uint64_t seed) {
    deltas.push_back(random_delta(out, in, r, 2.0 * static_cast<double>(r) + 1.0, seed));
    const std::string name = "a" + std::to_string(deltas.size() - 1);
    layer.add(name, deltas.back());
    return layer.slot(name);
  }
  static RowMatrix<float> make_w(index_t out, index_t in) {
    RowMatrix<float> w(out, in);
    fill(w, 7);
    return w;
  }
  static Eigen::VectorXf make_bias(index_t out) {
    Eigen::VectorXf b(out);
    fill(b, 8);
    return b;
  }
  RowMatrix<float> input(index_t n, std::uint64_t seed) const {
    RowMatrix<float> x(n, in);
    fill(x, seed);
    return x;
  }
};

/// s_k as the test computes it (alpha / r, the multiplier applied).
LD ref_scale(const LowRankDelta<float>& d) {
  return LD(d.options().alpha) / LD(d.rank()) * LD(d.options().multiplier);
}

/// The exact per-token output (long double) and the magnitude sum M.
void reference(const RowMatrix<float>& W, const Eigen::VectorXf& b, const std::vector<LowRankDelta<float>>& deltas,
               const RowMatrix<float>& X, const std::vector<std::int32_t>& ids, MatL& ref, MatL& mag) {
  const index_t n = X.rows(), out = W.rows(), in = W.cols();
  ref.resize(n, out);
  mag.resize(n, out);
  for (index_t t = 0; t < n; ++t) {
    for (index_t o = 0; o < out; ++o) {
      LD acc = b(o), m = std::abs(LD(b(o)));
      for (index_t i = 0; i < in; ++i) {
        acc += LD(W(o, i)) * LD(X(t, i));
        m += std::abs(LD(W(o, i)) * LD(X(t, i)));
      }
      ref(t, o) = acc;
      mag(t, o) = m;
    }
    if (ids[t] < 0) continue;
    const auto& d = deltas[static_cast<std::size_t>(ids[t])];
    const LD s = ref_scale(d);
    for (index_t q = 0; q < d.rank(); ++q) {
      LD h = 0, hm = 0;
      for (index_t i = 0; i < in; ++i) {
        h += LD(d.A()(q, i)) * LD(X(t, i));
        hm += std::abs(LD(d.A()(q, i)) * LD(X(t, i)));
      }
      for (index_t o = 0; o < out; ++o) {
        ref(t, o) += s * LD(d.B()(o, q)) * h;
        mag(t, o) += std::abs(s * LD(d.B()(o, q))) * hm;
      }
    }
  }
}

void check_bound(const RowMatrix<float>& Y, const MatL& ref, const MatL& mag, index_t depth) {
  const LD gamma = LD(depth + 4) * LD(std::ldexp(1.0, -24));
  LD worst = 0;
  for (index_t t = 0; t < Y.rows(); ++t)
    for (index_t o = 0; o < Y.cols(); ++o) {
      const LD err = std::abs(LD(Y(t, o)) - ref(t, o));
      CHECK(err <= gamma * mag(t, o));
      worst = std::max(worst, err / (gamma * mag(t, o)));
    }
  INFO("worst error / bound = " << static_cast<double>(worst));
}

RowMatrix<float> per_token_adapted(const Fixture& f, const RowMatrix<float>& X, const std::vector<std::int32_t>& ids) {
  RowMatrix<float> Y(X.rows(), f.out);
  lora::AdaptedLinear base{f.W, f.bias, LowRankDelta<float>{f.out, f.in, 1}};  // B = 0: the base alone
  for (index_t t = 0; t < X.rows(); ++t) {
    const auto x = X.middleRows(t, 1);
    if (ids[t] < 0) {
      Y.row(t) = base.forward(x);
    } else {
      lora::AdaptedLinear layer{f.W, f.bias, f.deltas[static_cast<std::size_t>(ids[t])]};
      Y.row(t) = layer.forward(x);
    }
  }
  return Y;
}

std::span<const std::int32_t> span_of(const std::vector<std::int32_t>& v) { return v; }

}  // namespace

TEST_CASE("slots: given in add order, never reused; the bank follows add / remove / set_multiplier",
          "[multi][slots]") {
  Fixture f({4, 8, 2});
  CHECK(f.layer.slot("a0") == 0);
  CHECK(f.layer.slot("a1") == 1);
  CHECK(f.layer.slot("a2") == 2);
  CHECK(f.layer.slot_count() == 3);
  CHECK_THROWS_AS(f.layer.slot("nope"), lora::ValueError);
  auto before = f.layer.bank();
  f.layer.remove("a1");
  auto after = f.layer.bank();
  REQUIRE(after->slots.size() == 3);
  CHECK(after->slots[1].delta == nullptr);
  CHECK(after->slots[1].name == "a1");
  CHECK(before->slots[1].delta != nullptr);  // an earlier bank keeps the removed adapter alive
  // The other adapters are the same objects: nothing reallocated.
  CHECK(after->slots[0].delta == before->slots[0].delta);
  CHECK(after->slots[2].delta == before->slots[2].delta);
  f.layer.add("a1", f.deltas[1]);  // the name again: a new slot
  CHECK(f.layer.slot("a1") == 3);
  CHECK(f.layer.slot_count() == 4);
  f.layer.set_multiplier("a0", 0.5);
  CHECK(f.layer.bank()->slots[0].scale == static_cast<float>(lora::scale_for(f.layer.delta("a0").options(), 4)));
  CHECK(f.layer.bank()->slots[0].scale == 0.5f * 9.0f / 4.0f);
}

TEST_CASE("gathered forward: mixed ranks, unsorted ids, -1, against the exact result and per-token AdaptedLinear",
          "[multi][forward]") {
  Fixture f({1, 3, 8, 16, 5});
  const std::vector<std::int32_t> ids{3, -1, 0, 3, 4, 1, 1, -1, 2, 0, 4, 3, 2, 2, -1, 1, 0, 4, 3, 3};
  const index_t n = static_cast<index_t>(ids.size());
  const RowMatrix<float> X = f.input(n, 21);
  RowMatrix<float> Y(n, f.out);
  Layer::gather_workspace ws;
  f.layer.forward(X, span_of(ids), Y, ws);
  MatL ref, mag;
  reference(f.W, f.bias, f.deltas, X, ids, ref, mag);
  check_bound(Y, ref, mag, f.in + 16);
  // Per-token AdaptedLinear: both within the bound of the exact result, so
  // within twice of each other.
  const RowMatrix<float> Yt = per_token_adapted(f, X, ids);
  check_bound(Yt, ref, mag, f.in + 16);
  const LD gamma2 = 2 * LD(f.in + 20) * LD(std::ldexp(1.0, -24));
  for (index_t t = 0; t < n; ++t)
    for (index_t o = 0; o < f.out; ++o) CHECK(std::abs(LD(Y(t, o)) - LD(Yt(t, o))) <= gamma2 * mag(t, o));
  // The segments: one per adapter present, in slot order, tokens in order.
  const auto segs = ws.segments();
  REQUIRE(segs.size() == 5);
  CHECK(segs[3].slot == 3);
  CHECK(segs[3].count == 5);
  CHECK_FALSE(segs[3].contiguous);
  // A std::vector converts to the span; int64 ids give the same bits.
  RowMatrix<float> Yv(n, f.out);
  f.layer.forward(X, ids, Yv, ws);
  CHECK(Yv == Y);
  const std::vector<std::int64_t> ids64(ids.begin(), ids.end());
  RowMatrix<float> Y64(n, f.out);
  f.layer.forward(X, std::span<const std::int64_t>(ids64), Y64);
  CHECK(Y64 == Y);
  // A second call of the same shape allocates nothing in the workspace.
  const index_t cap = ws.capacity();
  f.layer.forward(X, span_of(ids), Y, ws);
  CHECK(ws.capacity() == cap);
}

TEST_CASE("gathered forward: ids all equal is AdaptedLinear::forward on the batch, bit for bit", "[multi][forward]") {
  Fixture f({4, 8});
  for (const index_t n : {1, 5, 37}) {
    const RowMatrix<float> X = f.input(n, 30 + static_cast<std::uint64_t>(n));
    const std::vector<std::int32_t> ids(static_cast<std::size_t>(n), 1);
    RowMatrix<float> Y(n, f.out);
    f.layer.forward(X, span_of(ids), Y);
    lora::AdaptedLinear ref{f.W, f.bias, f.deltas[1]};
    CHECK(Y == ref.forward(X));
  }
}

TEST_CASE("gathered forward: sorted runs are viewed in place and equal AdaptedLinear on those rows' adapter terms",
          "[multi][forward]") {
  Fixture f({2, 6, 3});
  const std::vector<std::int32_t> ids{0, 0, 0, 2, 2, -1, 1, 1, 1, 1};
  const index_t n = static_cast<index_t>(ids.size());
  const RowMatrix<float> X = f.input(n, 44);
  RowMatrix<float> Y(n, f.out);
  Layer::gather_workspace ws;
  f.layer.forward(X, span_of(ids), Y, ws);
  for (const auto& sg : ws.segments()) CHECK(sg.contiguous);
  MatL ref, mag;
  reference(f.W, f.bias, f.deltas, X, ids, ref, mag);
  check_bound(Y, ref, mag, f.in + 6);
  // The adapter part alone (add_adapter_terms into zeros) equals each
  // adapter's term over its rows, computed by the library's own expression.
  RowMatrix<float> Z = RowMatrix<float>::Zero(n, f.out);
  f.layer.add_adapter_terms(X, span_of(ids), Z, ws);
  RowMatrix<float> E = RowMatrix<float>::Zero(n, f.out);
  lora::EigenBackend::workspace<float> ews;
  const index_t starts[] = {0, 6, 3}, counts[] = {3, 4, 2};
  for (int k = 0; k < 3; ++k)
    lora::expr::apply(f.deltas[k].expression(), X.middleRows(starts[k], counts[k]),
                      E.middleRows(starts[k], counts[k]), 1.0f, 1.0f, ews);
  CHECK(Z == E);
}

TEST_CASE("gathered forward: ids all -1, n = 0, all distinct", "[multi][forward]") {
  Fixture f({4, 8, 1, 2, 16, 3, 5});
  {  // all -1: the base and bias alone, the plain forward with nothing active, bit for bit
    const RowMatrix<float> X = f.input(9, 50);
    const std::vector<std::int32_t> ids(9, -1);
    RowMatrix<float> Y(9, f.out), Yb(9, f.out);
    Layer::gather_workspace ws;
    f.layer.forward(X, span_of(ids), Y, ws);
    CHECK(ws.segments().empty());
    f.layer.set_active({});
    f.layer.forward(X, Yb);
    CHECK(Y == Yb);
  }
  {  // n = 0
    const RowMatrix<float> X(0, f.in);
    RowMatrix<float> Y(0, f.out);
    const std::vector<std::int32_t> ids;
    CHECK_NOTHROW(f.layer.forward(X, span_of(ids), Y));
  }
  {  // every token its own adapter, reversed
    const std::vector<std::int32_t> ids{6, 5, 4, 3, 2, 1, 0};
    const RowMatrix<float> X = f.input(7, 51);
    RowMatrix<float> Y(7, f.out);
    Layer::gather_workspace ws;
    f.layer.forward(X, span_of(ids), Y, ws);
    CHECK(ws.segments().size() == 7);
    MatL ref, mag;
    reference(f.W, f.bias, f.deltas, X, ids, ref, mag);
    check_bound(Y, ref, mag, f.in + 16);
  }
}

TEST_CASE("gathered forward: a static-rank adapter gives the same bits as its AdaptedLinear<..., LowRankDelta<float, 4>>",
          "[multi][forward]") {
  Fixture f({8});
  LowRankDelta<float, 4> st{f.out, f.in, {.alpha = 6}};
  st.init(lora::init::UniformBoth{0.5}, 77);
  f.layer.add("static4", LowRankDelta<float>{st.B(), st.A(), st.options()});
  const std::vector<std::int32_t> ids(11, static_cast<std::int32_t>(f.layer.slot("static4")));
  const RowMatrix<float> X = f.input(11, 52);
  RowMatrix<float> Y(11, f.out);
  f.layer.forward(X, span_of(ids), Y);
  lora::AdaptedLinear ref{f.W, f.bias, st};
  CHECK(Y == ref.forward(X));
}

TEST_CASE("gathered forward: removed and re-added adapters; errors name the token and the id, Y untouched",
          "[multi][errors]") {
  Fixture f({4, 8, 2});
  f.layer.remove("a1");
  const RowMatrix<float> X = f.input(6, 60);
  RowMatrix<float> Y = RowMatrix<float>::Constant(6, f.out, 123.0f);
  const RowMatrix<float> sentinel = Y;
  auto message = [&](const std::vector<std::int32_t>& ids) -> std::string {
    try {
      f.layer.forward(X, span_of(ids), Y);
    } catch (const lora::ValueError& e) {
      return e.what();
    }
    return "no error";
  };
  const std::string removed = message({0, 2, -1, 1, 0, 0});
  CHECK_THAT(removed, Catch::Contains("token 3") && Catch::Contains("id 1") && Catch::Contains("'a1'") &&
                          Catch::Contains("removed"));
  const std::string range = message({0, 2, 9, 0, 0, 0});
  CHECK_THAT(range, Catch::Contains("token 2") && Catch::Contains("id 9") && Catch::Contains("slots 0..2"));
  const std::string negative = message({0, 0, 0, 0, -2, 0});
  CHECK_THAT(negative, Catch::Contains("token 4") && Catch::Contains("id -2"));
  CHECK(Y == sentinel);
  const std::vector<std::int32_t> short_ids{0, 0};
  CHECK_THROWS_AS(f.layer.forward(X, span_of(short_ids), Y), lora::ShapeError);
  CHECK(Y == sentinel);
  // Re-added under its name: a new slot; the old id stays refused.
  f.layer.add("a1", f.deltas[1]);
  const std::int32_t s1 = static_cast<std::int32_t>(f.layer.slot("a1"));
  CHECK(s1 == 3);
  f.deltas.push_back(f.deltas[1]);  // the reference's slot 3
  const std::vector<std::int32_t> ids{0, s1, -1, s1, 2, 0};
  f.layer.forward(X, span_of(ids), Y);
  MatL ref, mag;
  reference(f.W, f.bias, f.deltas, X, ids, ref, mag);
  check_bound(Y, ref, mag, f.in + 8);
  CHECK_THAT(message({0, 1, 0, 0, 0, 0}), Catch::Contains("token 1") && Catch::Contains("removed"));
  // Merged: refused (W would hold the active set for every token).
  f.layer.set_active("a0");
  f.layer.merge_active();
  CHECK_THAT(message({0, 0, 0, 0, 0, 0}), Catch::Contains("merged"));
  f.layer.unmerge();
  CHECK_NOTHROW(f.layer.forward(X, span_of(ids), Y));
}

TEMPLATE_TEST_CASE("gathered forward over a bf16 and an NF4 base", "[multi][bases]", RowMatrix<Eigen::bfloat16>,
                   lora::NF4Matrix) {
  const index_t in = 128, out = 48;
  RowMatrix<float> W0(out, in);
  fill(W0, 70);
  TestType base = [&] {
    if constexpr (std::is_same_v<TestType, lora::NF4Matrix>)
      return lora::NF4Matrix::quantize(W0, {.block_size = 64, .double_quant = true});
    else
      return TestType(W0.cast<Eigen::bfloat16>());
  }();
  RowMatrix<float> W;  // what the base holds, in float
  if constexpr (std::is_same_v<TestType, lora::NF4Matrix>)
    W = base.dequantize();
  else
    W = base.template cast<float>();
  Eigen::VectorXf b(out);
  fill(b, 71);
  lora::MultiAdapterLinear<TestType> layer{std::move(base), b};
  std::vector<LowRankDelta<float>> deltas;
  for (index_t r : {2, 8, 4}) {
    deltas.push_back(random_delta(out, in, r, 4.0, 72 + static_cast<std::uint64_t>(r)));
    layer.add("d" + std::to_string(r), deltas.back());
  }
  const std::vector<std::int32_t> ids{2, 0, 1, 1, -1, 2, 0, 0, 1, 2, 2, -1};
  const index_t n = static_cast<index_t>(ids.size());
  RowMatrix<float> X(n, in);
  fill(X, 73);
  RowMatrix<float> Y(n, out);
  layer.forward(X, span_of(ids), Y);
  MatL ref, mag;
  reference(W, b, deltas, X, ids, ref, mag);
  check_bound(Y, ref, mag, in + 8);
}

TEST_CASE("gathered backward: dA_k, dB_k bit-identical to train::backward on each adapter's rows; dX exact to the bound",
          "[multi][backward]") {
  Fixture f({3, 8, 1, 5});
  const std::vector<std::int32_t> ids{1, 3, 1, -1, 0, 1, 3, 0, 1, -1, 3, 1, 0, 0};  // slot 2 absent
  const index_t n = static_cast<index_t>(ids.size());
  const RowMatrix<float> X = f.input(n, 80);
  RowMatrix<float> G(n, f.out);
  fill(G, 81);
  auto grads = f.layer.make_gradients();
  RowMatrix<float> dX(n, f.in);
  Layer::gather_workspace ws;
  f.layer.backward(X, span_of(ids), G, grads, dX, ws);
  CHECK(grads.present_slots() == std::vector<index_t>{0, 1, 3});
  CHECK_FALSE(grads.present(2));
  CHECK(grads.tokens(1) == 5);
  for (index_t k : {0, 1, 3}) {
    std::vector<index_t> rows;
    for (index_t t = 0; t < n; ++t)
      if (ids[t] == k) rows.push_back(t);
    const index_t m = static_cast<index_t>(rows.size());
    RowMatrix<float> Xk(m, f.in), Gk(m, f.out), Yk(m, f.out);
    for (index_t i = 0; i < m; ++i) {
      Xk.row(i) = X.row(rows[i]);
      Gk.row(i) = G.row(rows[i]);
    }
    lora::AdaptedLinear layer{f.W, f.bias, f.deltas[static_cast<std::size_t>(k)]};
    lora::train::Tape<decltype(layer)> tape;
    lora::train::Gradients<decltype(layer)> g(layer);
    lora::train::forward(layer, Xk, Yk, tape);
    lora::train::backward(layer, Xk, Gk, tape, g);
    CHECK(grads.at(k).dA() == g.dA());
    CHECK(grads.at(k).dB() == g.dB());
  }
  // dX = G W + s_k (G B_k) A_k per token, against long double.
  const LD eps = LD(std::ldexp(1.0, -24));
  for (index_t t = 0; t < n; ++t)
    for (index_t i = 0; i < f.in; ++i) {
      LD acc = 0, mag = 0;
      for (index_t o = 0; o < f.out; ++o) {
        acc += LD(G(t, o)) * LD(f.W(o, i));
        mag += std::abs(LD(G(t, o)) * LD(f.W(o, i)));
      }
      if (ids[t] >= 0) {
        const auto& d = f.deltas[static_cast<std::size_t>(ids[t])];
        const LD s = ref_scale(d);
        for (index_t q = 0; q < d.rank(); ++q) {
          LD gb = 0, gbm = 0;
          for (index_t o = 0; o < f.out; ++o) {
            gb += LD(G(t, o)) * LD(d.B()(o, q));
            gbm += std::abs(LD(G(t, o)) * LD(d.B()(o, q)));
          }
          acc += s * gb * LD(d.A()(q, i));
          mag += std::abs(s * LD(d.A()(q, i))) * gbm;
        }
      }
      CHECK(std::abs(LD(dX(t, i)) - acc) <= LD(f.out + 8 + 4) * eps * mag);
    }
  // Without dX: the same gradients.
  auto grads2 = f.layer.make_gradients();
  f.layer.backward(X, span_of(ids), G, grads2, ws);
  for (index_t k : {0, 1, 3}) CHECK(grads2.at(k).dA() == grads.at(k).dA());
}

TEST_CASE("gathered backward: accumulation over batches; absent slots start fresh", "[multi][backward]") {
  Fixture f({2, 4, 3});
  const std::vector<std::int32_t> ids1{0, 0, 1, 0}, ids2{2, 1, 1, 2, 1};
  const RowMatrix<float> X1 = f.input(4, 90), X2 = f.input(5, 91);
  RowMatrix<float> G1(4, f.out), G2(5, f.out);
  fill(G1, 92);
  fill(G2, 93);
  auto a = f.layer.make_gradients(), b = f.layer.make_gradients(), acc = f.layer.make_gradients();
  Layer::gather_workspace ws;
  f.layer.backward(X1, span_of(ids1), G1, a, ws);
  f.layer.backward(X2, span_of(ids2), G2, b, ws);
  f.layer.backward(X1, span_of(ids1), G1, acc, ws);
  f.layer.backward(X2, span_of(ids2), G2, acc, ws, {.accumulate = true});
  CHECK(acc.present_slots() == std::vector<index_t>{0, 1, 2});
  CHECK(acc.tokens(1) == 4);
  CHECK(acc.at(0).dA() == a.at(0).dA());  // only in the first batch
  CHECK(acc.at(2).dB() == b.at(2).dB());  // only in the second: overwritten, not added to stale values
  const RowMatrix<float> sum = a.at(1).dA() + b.at(1).dA();
  CHECK(acc.at(1).dA().isApprox(sum, 1e-6f));
  // Not accumulating: the earlier slots become absent.
  f.layer.backward(X2, span_of(ids2), G2, acc, ws);
  CHECK(acc.present_slots() == std::vector<index_t>{1, 2});
}

TEST_CASE("PerAdapterOptimizer: only adapters with tokens step", "[multi][train]") {
  Fixture f({2, 4, 3});
  auto grads = f.layer.make_gradients();
  lora::PerAdapterOptimizer<Layer, lora::train::AdamW<float>> opt(f.layer, grads, {.lr = 1e-2});
  const std::vector<std::int32_t> ids{0, 2, 2, 0, -1};
  const RowMatrix<float> X = f.input(5, 100);
  RowMatrix<float> G(5, f.out);
  fill(G, 101);
  const RowMatrix<float> A1 = f.layer.delta("a1").A(), B1 = f.layer.delta("a1").B();
  const RowMatrix<float> A0 = f.layer.delta("a0").A();
  Layer::gather_workspace ws;
  f.layer.backward(X, span_of(ids), G, grads, ws);
  CHECK(opt.step() == 2);
  CHECK(f.layer.delta("a1").A() == A1);  // absent: untouched
  CHECK(f.layer.delta("a1").B() == B1);
  CHECK(f.layer.delta("a0").A() != A0);
  CHECK(opt.optimizer(0).parameters()[0].steps == 1);
  CHECK(opt.optimizer(1).parameters()[0].steps == 0);
  // The same step as an AdamW over that adapter alone.
  lora::AdaptedLinear solo{f.W, f.bias, f.deltas[2]};
  lora::train::Gradients<decltype(solo)> sg(solo);
  sg.dA() = grads.at(2).dA();
  sg.dB() = grads.at(2).dB();
  lora::train::AdamW<float> adam({.lr = 1e-2});
  adam.add(solo, sg);
  adam.step();
  CHECK(f.layer.delta("a2").A() == solo.delta().A());
  CHECK(f.layer.delta("a2").B() == solo.delta().B());
  // An adapter added later: sync() registers it.
  const index_t s3 = f.add(5, 102);
  opt.sync();
  const std::vector<std::int32_t> ids3{static_cast<std::int32_t>(s3), 1};
  const RowMatrix<float> X3 = f.input(2, 103);
  RowMatrix<float> G3(2, f.out);
  fill(G3, 104);
  f.layer.backward(X3, span_of(ids3), G3, grads, ws);
  CHECK(opt.step() == 2);
  CHECK(opt.optimizer(s3).parameters()[0].steps == 1);
  CHECK(opt.optimizer(0).parameters()[0].steps == 1);
}

#ifdef _OPENMP
TEST_CASE("gathered forward and backward: the segment threads give the single-thread bits", "[multi][threads]") {
  Fixture f({4, 8, 16, 2, 6, 3, 12, 5}, 300, 260);  // depth >= 256: the skinny kernels too
  std::vector<std::int32_t> ids;
  for (int t = 0; t < 64; ++t) ids.push_back(static_cast<std::int32_t>((t * 5) % 9) - 1);
  const index_t n = static_cast<index_t>(ids.size());
  const RowMatrix<float> X = f.input(n, 110);
  RowMatrix<float> G(n, f.out);
  fill(G, 111);
  const int saved = omp_get_max_threads();
  RowMatrix<float> Y1(n, f.out), Y2(n, f.out), dX1(n, f.in), dX2(n, f.in);
  auto g1 = f.layer.make_gradients(), g2 = f.layer.make_gradients();
  Layer::gather_workspace ws1, ws2;
  omp_set_num_threads(1);
  f.layer.forward(X, span_of(ids), Y1, ws1);
  f.layer.backward(X, span_of(ids), G, g1, dX1, ws1);
  CHECK_FALSE(ws1.parallel());
  omp_set_num_threads(2);
  f.layer.forward(X, span_of(ids), Y2, ws2);
  CHECK(ws2.parallel());
  f.layer.backward(X, span_of(ids), G, g2, dX2, ws2);
  omp_set_num_threads(saved);
  CHECK(Y1 == Y2);
  CHECK(dX1 == dX2);
  for (index_t k = 0; k < 8; ++k) {
    CHECK(g1.at(k).dA() == g2.at(k).dA());
    CHECK(g1.at(k).dB() == g2.at(k).dB());
  }
  MatL ref, mag;
  reference(f.W, f.bias, f.deltas, X, ids, ref, mag);
  check_bound(Y2, ref, mag, f.in + 16);
}
#endif

TEST_CASE("gathered forwards under concurrent hot swap see one bank each", "[multi][hotswap]") {
  Fixture f({4, 8, 2});
  const std::vector<std::int32_t> ids{0, 1, 2, 1, 0, -1, 2, 2, 1, 0, 1, 1};
  const index_t n = static_cast<index_t>(ids.size());
  const RowMatrix<float> X = f.input(n, 120);
  // The two states the swapper alternates between (a1's multiplier 1 or 0.25);
  // it also adds and removes an adapter the ids never name.
  RowMatrix<float> Ya(n, f.out), Yb(n, f.out);
  f.layer.forward(X, span_of(ids), Ya);
  f.layer.set_multiplier("a1", 0.25);
  f.layer.forward(X, span_of(ids), Yb);
  f.layer.set_multiplier("a1", 1.0);
  REQUIRE(Ya != Yb);
  std::atomic<bool> stop{false};
  std::atomic<int> bad{0}, runs{0};
  std::vector<std::thread> threads;
  for (int i = 0; i < 4; ++i)
    threads.emplace_back([&] {
      Layer::gather_workspace ws;
      RowMatrix<float> Y(n, f.out);
      while (!stop.load()) {
        f.layer.forward(X, span_of(ids), Y, ws);
        if (Y != Ya && Y != Yb) bad.fetch_add(1);
        runs.fetch_add(1);
      }
    });
  for (int i = 0; i < 300; ++i) {
    f.layer.set_multiplier("a1", i % 2 ? 0.25 : 1.0);
    f.layer.add("tmp", f.deltas[2]);
    f.layer.remove("tmp");
  }
  while (runs.load() < 40) std::this_thread::yield();
  stop.store(true);
  for (auto& t : threads) t.join();
  CHECK(bad.load() == 0);
  CHECK(f.layer.slot_count() == 303);  // every add took a new slot
}
