// Conformance: DoRALinear on the backend under test, against a long-double
// reference that forms V = W + s B A and its row norms (the test alone forms
// [out, in]; the layer never does). The gradients come from dL/dV by the
// chain rule, not from the layer's decomposition:
//   Y = c . (X V^T) + b,  c = m / n,  n_i = ||V_i||
//   dV = (G c)^T X [- diag(c dm / n) V, the exact norm gradient]
//   dA = s B^T dV,  dB = s dV A^T,  dX = (G c) V,  dm_j = sum_t G_tj (X V^T)_tj / n_j
// Tolerance: max |got - want| <= tol max |want| per tensor, tol = 1e-4 for float
// (the norm's identity and the stacked products round differently from the
// formed V; well inside float's 2 (k + 2) eps per element at k = in + r).
#include "conformance.hpp"

#include <lora/dora.hpp>

namespace {

using ref::Dense;
using ref::LD;

template <class M>
Dense dense_of(const M& m) {
  Dense d(m.rows(), m.cols());
  for (index_t i = 0; i < m.rows(); ++i)
    for (index_t j = 0; j < m.cols(); ++j) d(i, j) = static_cast<LD>(m(i, j));
  return d;
}

template <class G>
void check_rel(const G& got, const Dense& want, double tol = 1e-4) {
  REQUIRE(got.rows() == want.rows());
  REQUIRE(got.cols() == want.cols());
  LD scale = 0, err = 0;
  for (index_t i = 0; i < want.rows(); ++i)
    for (index_t j = 0; j < want.cols(); ++j) {
      scale = std::max(scale, std::fabs(want(i, j)));
      err = std::max(err, std::fabs(static_cast<LD>(got(i, j)) - want(i, j)));
    }
  INFO("max error " << static_cast<double>(err) << " against max |want| " << static_cast<double>(scale));
  CHECK(err <= tol * scale);
}

/// The reference of one layer (host tensors) on X, G, with D = the adapter input
/// (X, or drop(X)).
struct DoraRef {
  Dense Y, norm, dA, dB, dm, dX, db, merged;
};

DoraRef dora_ref(const Host<float>& W, const Host<float>& A, const Host<float>& B, LD s, const HostVector<float>& m,
                 const HostVector<float>& bias, const Host<float>& X, const Host<float>& G, const Dense& keep,
                 bool exact) {
  const index_t out = W.rows(), in = W.cols(), r = A.rows(), n = X.rows();
  Dense V(out, in), D(n, in);
  for (index_t i = 0; i < out; ++i)
    for (index_t j = 0; j < in; ++j) {
      LD v = W(i, j);
      for (index_t k = 0; k < r; ++k) v += s * static_cast<LD>(B(i, k)) * A(k, j);
      V(i, j) = v;
    }
  for (index_t t = 0; t < n; ++t)
    for (index_t j = 0; j < in; ++j) D(t, j) = keep(t, j) * static_cast<LD>(X(t, j));
  DoraRef R;
  R.norm = Dense(out, 1);
  std::vector<LD> c(static_cast<std::size_t>(out));
  for (index_t i = 0; i < out; ++i) {
    LD acc = 0;
    for (index_t j = 0; j < in; ++j) acc += V(i, j) * V(i, j);
    R.norm(i, 0) = std::sqrt(acc);
    c[static_cast<std::size_t>(i)] = m(i) / R.norm(i, 0);
  }
  // Y = X W^T - D W^T + c . (D V^T) + b (without dropout D = X: c . (X V^T) + b).
  Dense U(n, out);
  R.Y = Dense(n, out);
  for (index_t t = 0; t < n; ++t)
    for (index_t i = 0; i < out; ++i) {
      LD u = 0, xw = 0;
      for (index_t j = 0; j < in; ++j) {
        u += D(t, j) * V(i, j);
        xw += (static_cast<LD>(X(t, j)) - D(t, j)) * W(i, j);
      }
      U(t, i) = u;
      R.Y(t, i) = xw + c[static_cast<std::size_t>(i)] * u + (bias.size() ? static_cast<LD>(bias(i)) : 0);
    }
  R.merged = Dense(out, in);
  for (index_t i = 0; i < out; ++i)
    for (index_t j = 0; j < in; ++j) R.merged(i, j) = c[static_cast<std::size_t>(i)] * V(i, j);
  // Backward (no dropout in the gradient checks: keep is all ones there).
  R.dm = Dense(out, 1);
  R.db = Dense(out, 1);
  Dense dV(out, in);
  for (index_t i = 0; i < out; ++i) {
    LD acc = 0, gsum = 0;
    for (index_t t = 0; t < n; ++t) {
      acc += static_cast<LD>(G(t, i)) * U(t, i);
      gsum += G(t, i);
    }
    R.dm(i, 0) = acc / R.norm(i, 0);
    R.db(i, 0) = gsum;
    const LD ci = c[static_cast<std::size_t>(i)];
    for (index_t j = 0; j < in; ++j) {
      LD v = 0;
      for (index_t t = 0; t < n; ++t) v += ci * static_cast<LD>(G(t, i)) * D(t, j);
      if (exact) v -= ci * R.dm(i, 0) / R.norm(i, 0) * V(i, j);
      dV(i, j) = v;
    }
  }
  R.dA = Dense(r, in);
  R.dB = Dense(out, r);
  for (index_t k = 0; k < r; ++k)
    for (index_t j = 0; j < in; ++j) {
      LD v = 0;
      for (index_t i = 0; i < out; ++i) v += static_cast<LD>(B(i, k)) * dV(i, j);
      R.dA(k, j) = s * v;
    }
  for (index_t i = 0; i < out; ++i)
    for (index_t k = 0; k < r; ++k) {
      LD v = 0;
      for (index_t j = 0; j < in; ++j) v += dV(i, j) * A(k, j);
      R.dB(i, k) = s * v;
    }
  R.dX = Dense(n, in);
  for (index_t t = 0; t < n; ++t)
    for (index_t j = 0; j < in; ++j) {
      LD v = 0;
      for (index_t i = 0; i < out; ++i) v += c[static_cast<std::size_t>(i)] * static_cast<LD>(G(t, i)) * V(i, j);
      R.dX(t, j) = v;
    }
  return R;
}

Dense ones(index_t rows, index_t cols) {
  Dense d(rows, cols);
  for (index_t i = 0; i < rows; ++i)
    for (index_t j = 0; j < cols; ++j) d(i, j) = 1;
  return d;
}

/// train::forward then train::backward (with dX): Y, dA, dB, dm and dX against R.
template <class Layer, class M, class Tape, class Grads>
void train_step_matches(const Layer& dev, const M& Xd, const M& Gd, Tape& tape, Grads& grads, const DoraRef& R) {
  BMatrix<float> Yd(Xd.rows(), dev.out_features()), dXd(Xd.rows(), dev.in_features());
  lora::train::forward(dev, Xd, Yd, tape);
  check_rel(on_host(Yd), R.Y);
  lora::train::backward(dev, Xd, Gd, tape, grads, dXd);
  check_rel(on_host(grads.dA()), R.dA);
  check_rel(on_host(grads.dB()), R.dB);
  check_rel(on_host(grads.adapter().dm()), R.dm);
  check_rel(on_host(dXd), R.dX);
}

// 130 rows: more than one 64- and 256-row block of the row-norm passes.
constexpr index_t kDoraOut = 130, kDoraIn = 40, kDoraR = 5, kDoraN = 7;

auto make_host_dora(bool bias) {
  lora::LowRankDelta<float> delta{kDoraOut, kDoraIn, kDoraR, {.alpha = 7.0}};
  delta.A() = random_host<float>(kDoraR, kDoraIn, 201);
  delta.B() = random_host<float>(kDoraOut, kDoraR, 202);
  HostVector<float> b = bias ? HostVector<float>(random_host<float>(kDoraOut, 1, 203)) : HostVector<float>();
  lora::DoRALinear layer{random_host<float>(kDoraOut, kDoraIn, 200), std::move(b), std::move(delta)};
  // m away from the initial row norms, so c = m / n is not 1.
  HostVector<float> m = layer.magnitude();
  const Host<float> f = random_host<float>(kDoraOut, 1, 204);
  for (index_t i = 0; i < kDoraOut; ++i) m(i) *= 1.0f + 0.3f * f(i, 0);
  layer.delta().set_magnitude(m);
  return layer;
}

}  // namespace

TEST_CASE("DoRA forward, norm and merge equal the reference", "[conformance][dora]") {
  const bool bias = GENERATE(false, true);
  const auto host = make_host_dora(bias);
  auto dev = on_backend(host);
  static_assert(std::is_same_v<typename decltype(dev)::backend, BK>);
  const Host<float> W = host.base_weight(), A = host.delta().A(), B = host.delta().B(), X = random_host<float>(kDoraN, kDoraIn, 205);
  const HostVector<float> m = host.magnitude(), b = host.bias();
  const DoraRef R = dora_ref(W, A, B, host.delta().scale(), m, b, X, Host<float>::Zero(kDoraN, kDoraOut), ones(kDoraN, kDoraIn), false);

  // The moved layer holds the host's tensors bit for bit.
  CHECK(bit_identical(on_host(dev.delta().A()), A));
  CHECK(bit_identical(Host<float>(on_host(dev.magnitude())), Host<float>(m)));
  check_rel(on_host(dev.weight_norm()), R.norm);
  const auto Xd = on_backend(X);
  BMatrix<float> Yd(kDoraN, kDoraOut);
  dev.forward(Xd, Yd);
  check_rel(on_host(Yd), R.Y);
  check_rel(on_host(dev.merged_weight()), R.merged);
  SECTION("the cached norm gives the same Y") {
    dev.cache_weight_norm();
    BK::fill(Yd, 0.0f);
    dev.forward(Xd, Yd);
    check_rel(on_host(Yd), R.Y);
  }
  SECTION("merge, unmerge") {
    REQUIRE(dev.merge());
    check_rel(on_host(dev.base_weight()), R.merged);
#if !defined(LORA_CONFORMANCE_BACKEND_EIGEN)
    CHECK_THROWS_WITH(lora::to_host(dev), Catch::Contains("unmerge() it first"));
#endif
    BK::fill(Yd, 0.0f);
    dev.forward(Xd, Yd);  // the merged forward: X W'^T + b
    check_rel(on_host(Yd), R.Y);
    REQUIRE(dev.unmerge());
    check_rel(on_host(dev.base_weight()), dense_of(W));
  }
  SECTION("merge refuses m = 0 (not invertible) and leaves W bit-identical") {
    HostVector<float> m0 = m;
    m0(77) = 0.0f;
    dev.delta().set_magnitude(on_backend(m0));
    try {
      dev.merge();
      FAIL("merge accepted m = 0");
    } catch (const lora::NumericError& e) {
      CHECK_THAT(e.what(), Catch::Contains("at row 77"));
    }
    CHECK_FALSE(dev.merged());
    CHECK(bit_identical(on_host(dev.base_weight()), W));
  }
  SECTION("a non-finite magnitude is refused, naming the row") {
    HostVector<float> mn = m;
    mn(3) = std::numeric_limits<float>::infinity();
    CHECK_THROWS_WITH(dev.delta().set_magnitude(on_backend(mn)), Catch::Contains("not finite at row 3"));
  }
}

TEST_CASE("DoRA backward, detached and exact norm gradient, equals the reference", "[conformance][dora]") {
  const bool exact = GENERATE(false, true);
  const auto host = make_host_dora(true);
  auto dev = on_backend(host);
  dev.set_norm_gradient(exact ? lora::NormGradient::exact : lora::NormGradient::detached);
  const Host<float> W = host.base_weight(), A = host.delta().A(), B = host.delta().B();
  const Host<float> X = random_host<float>(kDoraN, kDoraIn, 206), G = random_host<float>(kDoraN, kDoraOut, 207);
  const DoraRef R = dora_ref(W, A, B, host.delta().scale(), host.magnitude(), host.bias(), X, G, ones(kDoraN, kDoraIn), exact);

  const auto Xd = on_backend(X), Gd = on_backend(G);
  lora::train::Tape<decltype(dev)> tape;
  lora::train::Gradients<decltype(dev)> grads(dev, true);
  train_step_matches(dev, Xd, Gd, tape, grads, R);
  check_rel(on_host(grads.db()), R.db);
  // Accumulation adds the same gradients again.
  lora::train::backward(dev, Xd, Gd, tape, grads, lora::train::BackwardOptions{.accumulate = true});
  Dense dA2 = R.dA, dm2 = R.dm;
  for (index_t k = 0; k < kDoraR; ++k)
    for (index_t j = 0; j < kDoraIn; ++j) dA2(k, j) *= 2;
  for (index_t i = 0; i < kDoraOut; ++i) dm2(i, 0) *= 2;
  check_rel(on_host(grads.dA()), dA2);
  check_rel(on_host(grads.adapter().dm()), dm2);
}

TEST_CASE("DoRA training forward with dropout equals the reference on the same mask", "[conformance][dora]") {
  const auto host = make_host_dora(true);
  const auto dev = on_backend(host);
  const Host<float> W = host.base_weight(), A = host.delta().A(), B = host.delta().B(), X = random_host<float>(kDoraN, kDoraIn, 208);
  const double p = 0.3;
  const std::uint64_t seed = 5, step = 2;  // the mask is counter-based: (seed, stream = step)
  const DoraRef R = dora_ref(W, A, B, host.delta().scale(), host.magnitude(), host.bias(), X,
                             Host<float>::Zero(kDoraN, kDoraOut), ref::keep(kDoraN, kDoraIn, p, seed, step), false);
  lora::train::Tape<std::remove_const_t<decltype(dev)>> tape;
  BMatrix<float> Yd(kDoraN, kDoraOut);
  lora::train::forward(dev, on_backend(X), Yd, tape, lora::train::Dropout(p, seed), step);
  CHECK(tape.dropped());
  check_rel(on_host(Yd), R.Y);
}

TEST_CASE("DoRA over an NF4 base: forward and backward against the reference over deq(W)", "[conformance][dora][nf4]") {
  const Host<float> W = random_host<float>(kDoraOut, kDoraIn, 210);
  lora::NF4Matrix Wq = lora::NF4Matrix::quantize(W, {.block_size = 64});
  const Host<float> Wd = ref::dequantize(Wq);  // from the raw bytes
  lora::LowRankDelta<float> delta{kDoraOut, kDoraIn, kDoraR, {.alpha = 7.0}};
  delta.A() = random_host<float>(kDoraR, kDoraIn, 211);
  delta.B() = random_host<float>(kDoraOut, kDoraR, 212);
  const lora::DoRALinear host{std::move(Wq), std::move(delta)};
  auto dev = on_backend(host);
  static_assert(decltype(dev)::base_is_quantized && std::is_same_v<typename decltype(dev)::backend, BK>);
  dev.set_norm_gradient(lora::NormGradient::exact);
  const Host<float> A = host.delta().A(), B = host.delta().B();
  const Host<float> X = random_host<float>(kDoraN, kDoraIn, 213), G = random_host<float>(kDoraN, kDoraOut, 214);
  const DoraRef R = dora_ref(Wd, A, B, host.delta().scale(), host.magnitude(), HostVector<float>(), X, G,
                             ones(kDoraN, kDoraIn), true);
  // m starts as the row norms of deq(W) + s B A (PEFT's initialisation).
  check_rel(on_host(dev.magnitude()), R.norm);
  const auto Xd = on_backend(X), Gd = on_backend(G);
  lora::train::Tape<decltype(dev)> tape;
  lora::train::Gradients<decltype(dev)> grads(dev);
  train_step_matches(dev, Xd, Gd, tape, grads, R);
  check_rel(on_host(dev.merged_weight()), R.merged);
}
