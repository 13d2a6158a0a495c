// Conformance: MultiAdapterLinear (gathered adapters) on the backend under test, against the long-double
// references of conformance.hpp.
#include "conformance.hpp"

#include <lora/adapter_set.hpp>

#include <iterator>
#include <span>
#include <string>

namespace {

using Layer = lora::MultiAdapterLinear<BMatrix<float>>;
using HostLayer = lora::MultiAdapterLinear<Host<float>>;
using HostDelta = lora::LowRankDelta<float>;

// The shape of every test: n tokens of [in] into [out].
constexpr index_t kOut = 13, kIn = 11;

/// One adapter's host factors, as the references read them.
struct Factors {
  Host<float> A, B;
  double alpha;
  HostDelta delta() const { return HostDelta(B, A, {.alpha = alpha}); }
};
Factors factors(index_t r, std::uint64_t seed) {
  return {random_host<float>(r, kIn, seed), random_host<float>(kOut, r, seed + 1), 1.5 * double(r)};
}

/// The host inputs of a layer: W, bias and adapters "a", "b", "c" of ranks 2, 3, 5 (slots 0, 1, 2).
struct Model {
  Host<float> W = random_host<float>(kOut, kIn, 1);
  HostVector<float> bias = random_host<float>(kOut, 1, 2);
  std::vector<Factors> adapters{factors(2, 10), factors(3, 20), factors(5, 30)};

  /// The layer on the backend, built from moved tensors.
  Layer layer() const {
    Layer l(on_backend(W), on_backend(bias));
    const char* names[] = {"a", "b", "c"};
    for (std::size_t k = 0; k < adapters.size(); ++k) l.add(names[k], on_backend(adapters[k].delta()));
    return l;
  }
};

/// The moves of transferred(): each tensor onto the backend under test.
struct OnBackend {
  template <class M>
  auto operator()(const M& m) const {
    return on_backend(m);
  }
};

/// Y per token: the base row X W^T + b, plus s_k (x A_k^T) B_k^T when ids[t] = k >= 0
/// (factors[k] null: a removed slot, never named). Each row with its bound.
ref::Sum gathered_forward_ref(const Model& md, const std::vector<const Factors*>& factors,
                              const std::vector<float>& scales, const Host<float>& X,
                              std::span<const std::int32_t> ids) {
  ref::Sum want = ref::add_to_rows(ref::product(1, X, false, md.W, true), 1, md.bias);
  for (std::size_t k = 0; k < factors.size(); ++k) {
    if (!factors[k]) continue;
    const ref::Sum with_k = ref::forward(md.W, md.bias, factors[k]->A, factors[k]->B, scales[k], X);
    for (index_t t = 0; t < X.rows(); ++t)
      if (ids[t] == static_cast<std::int32_t>(k))
        for (index_t j = 0; j < kOut; ++j) {
          want.value(t, j) = with_k.value(t, j);
          want.bound(t, j) = with_k.bound(t, j);
        }
  }
  return want;
}

/// The bank's s_k (rounded to float once, as the layer uses it), by slot.
std::vector<float> bank_scales(const Layer& l) {
  std::vector<float> s;
  for (const auto& slot : l.bank()->slots) s.push_back(slot.scale);
  return s;
}

void check_gathered_forward(const Layer& l, const Model& md, const std::vector<const Factors*>& factors,
                            const Host<float>& X, const std::vector<std::int32_t>& ids) {
  INFO("ids of " << ids.size() << " tokens");
  const auto Xb = on_backend(X);
  BMatrix<float> Y = on_backend(Host<float>::Constant(X.rows(), kOut, 1e3f));  // overwritten, not read
  Layer::gather_workspace ws;
  l.forward(Xb, std::span<const std::int32_t>(ids), Y, ws);
  check_close<float>(on_host(Y), gathered_forward_ref(md, factors, bank_scales(l), X, ids), kIn + 5);
}

}  // namespace

TEST_CASE("multi-adapter: gathered forward, mixed ranks", "[conformance][multi]") {
  const Model md;
  const Layer l = md.layer();
  REQUIRE(l.slot_count() == 3);
  const std::vector<const Factors*> factors{&md.adapters[0], &md.adapters[1], &md.adapters[2]};
  const Host<float> X = random_host<float>(9, kIn, 3);
  SECTION("unsorted ids with -1 (gathered segments)") {
    check_gathered_forward(l, md, factors, X, {2, -1, 0, 1, 0, 2, -1, 1, 2});
  }
  SECTION("runs (segments viewed in place)") {
    check_gathered_forward(l, md, factors, X, {0, 0, 1, 1, 1, -1, 2, 2, 2});
  }
  SECTION("all tokens on one adapter") { check_gathered_forward(l, md, factors, X, std::vector<std::int32_t>(9, 1)); }
  SECTION("no adapter at all") { check_gathered_forward(l, md, factors, X, std::vector<std::int32_t>(9, -1)); }
  SECTION("64-bit ids, the adapters' part alone") {
    const std::vector<std::int64_t> ids{1, 2, -1, 2, 0, 0, 1, -1, 2};
    std::vector<std::int32_t> ids32(ids.begin(), ids.end());
    const Host<float> Y0 = random_host<float>(9, kOut, 4);
    BMatrix<float> Y = on_backend(Y0);
    Layer::gather_workspace ws;
    l.add_adapter_terms(on_backend(X), std::span<const std::int64_t>(ids), Y, ws);
    // Y0 + (the full forward - the base and bias): per token Y0 + s_k (x A_k^T) B_k^T.
    ref::Sum want(9, kOut);
    const auto s = bank_scales(l);
    for (std::size_t k = 0; k < 3; ++k) {
      const ref::Sum term = ref::product(s[k], ref::product(1, X, false, md.adapters[k].A, true), false,
                                         md.adapters[k].B, true);
      for (index_t t = 0; t < 9; ++t)
        if (ids[t] == static_cast<std::int64_t>(k))
          for (index_t j = 0; j < kOut; ++j) {
            want.value(t, j) = term.value(t, j);
            want.bound(t, j) = term.bound(t, j);
          }
    }
    check_close<float>(on_host(Y), ref::plus(std::move(want), 1, Y0), 5);
  }
  SECTION("n = 0") {
    BMatrix<float> Y = on_backend(Host<float>(0, kOut));
    l.forward(on_backend(Host<float>(0, kIn)), std::span<const std::int32_t>(), Y);
    CHECK(Y.rows() == 0);
  }
}

TEST_CASE("multi-adapter: plain forward with the active set", "[conformance][multi]") {
  const Model md;
  Layer l = md.layer();
  l.set_multiplier("c", 0.5);
  l.set_active({{"a", 0.75}, {"c", -2.0}});
  const auto snap = l.snapshot();
  REQUIRE(snap->terms.size() == 2);
  const Host<float> X = random_host<float>(6, kIn, 5);
  BMatrix<float> Y(6, kOut);
  Layer::workspace ws;
  l.forward(on_backend(X), Y, ws);
  const ref::Sum want = ref::plus(
      ref::forward(md.W, md.bias, md.adapters[0].A, md.adapters[0].B, snap->terms[0].scale, X), 1,
      ref::product(snap->terms[1].scale, ref::product(1, X, false, md.adapters[2].A, true), false,
                   md.adapters[2].B, true));
  CHECK(snap->terms[1].scale == static_cast<float>(-2.0 * 0.5 * 1.5));  // w * multiplier * alpha / r
  check_close<float>(on_host(Y), want, kIn + 5);
}

TEST_CASE("multi-adapter: removed and re-added adapters, refused ids", "[conformance][multi]") {
  const Model md;
  Layer l = md.layer();
  l.remove("b");
  const Factors b2 = factors(4, 40);  // "b" again, another rank: a new slot
  l.add("b", on_backend(b2.delta()));
  REQUIRE(l.slot("b") == 3);
  REQUIRE(l.slot_count() == 4);
  const std::vector<const Factors*> factors{&md.adapters[0], nullptr, &md.adapters[2], &b2};
  const Host<float> X = random_host<float>(7, kIn, 6);
  check_gathered_forward(l, md, factors, X, {3, 0, -1, 3, 2, 0, 3});

  const Host<float> Y0 = Host<float>::Constant(7, kOut, 7.0f);
  BMatrix<float> Y = on_backend(Y0);
  const auto refused = [&](std::vector<std::int32_t> ids, const char* what) {
    const auto call = [&] { l.forward(on_backend(X), std::span<const std::int32_t>(ids), Y); };
    CHECK_THROWS_AS(call(), lora::ValueError);
    CHECK_THROWS_WITH(call(), Catch::Matchers::Contains(what));
    CHECK(bit_identical(on_host(Y), Y0));  // checked before anything is written
  };
  refused({0, 0, 2, 3, 0, 4, 0}, "token 5 has adapter id 4");
  refused({0, -2, 2, 3, 0, 0, 0}, "token 1 has adapter id -2");
  refused({0, 0, 2, 1, 0, 0, 0}, "token 3 has adapter id 1, the slot of adapter 'b', which was removed");
}

TEST_CASE("multi-adapter: gathered backward", "[conformance][multi]") {
  const Model md;
  const Layer l = md.layer();
  const index_t n = 10;
  const std::vector<std::int32_t> ids{2, 0, -1, 2, 2, 0, -1, 2, 1, 1};  // slot 1 a run, the others gathered
  const Host<float> X = random_host<float>(n, kIn, 7), G = random_host<float>(n, kOut, 8);
  const auto Xb = on_backend(X), Gb = on_backend(G);
  auto grads = l.make_gradients();
  BMatrix<float> dX = on_backend(Host<float>::Constant(n, kIn, 1e3f));  // overwritten
  Layer::gather_workspace ws;
  l.backward(Xb, std::span<const std::int32_t>(ids), Gb, grads, dX, ws);

  const auto s = bank_scales(l);
  ref::Sum dx_want = ref::product(1, G, false, md.W, false);  // -1 tokens: G W alone
  for (index_t k = 0; k < 3; ++k) {
    INFO("slot " << k);
    std::vector<index_t> rows;
    for (index_t t = 0; t < n; ++t)
      if (ids[t] == k) rows.push_back(t);
    REQUIRE(grads.present(k));
    CHECK(grads.tokens(k) == static_cast<index_t>(rows.size()));
    Host<float> Xk(static_cast<index_t>(rows.size()), kIn), Gk(static_cast<index_t>(rows.size()), kOut);
    for (std::size_t i = 0; i < rows.size(); ++i) {
      Xk.row(static_cast<index_t>(i)) = X.row(rows[i]);
      Gk.row(static_cast<index_t>(i)) = G.row(rows[i]);
    }
    const Factors& f = md.adapters[std::size_t(k)];
    const ref::Gradients want =
        ref::backward(md.W, f.A, f.B, s[std::size_t(k)], Gk, Xk, ref::keep(Xk.rows(), kIn, 0.0, 0, 0));
    check_close<float>(on_host(grads.at(k).dA()), want.dA, n + kOut);
    check_close<float>(on_host(grads.at(k).dB()), want.dB, n + kIn);
    for (std::size_t i = 0; i < rows.size(); ++i)
      for (index_t j = 0; j < kIn; ++j) {
        dx_want.value(rows[i], j) = want.dX.value(static_cast<index_t>(i), j);
        dx_want.bound(rows[i], j) = want.dX.bound(static_cast<index_t>(i), j);
      }
  }
  check_close<float>(on_host(dX), dx_want, kOut + 5);

  SECTION("PerAdapterOptimizer: SGD steps the present adapters only") {
    Layer trained = md.layer();
    const std::vector<std::int32_t> ids2{2, 0, -1, 2, 0, 0, -1, 2, 2, 0};  // slot 1 absent
    auto g2 = trained.make_gradients();
    trained.backward(Xb, std::span<const std::int32_t>(ids2), Gb, g2, ws);
    lora::PerAdapterOptimizer<Layer, lora::train::SGD<float, BK>> opt(trained, g2, {.lr = 0.25});
    CHECK(opt.step() == 2);
    const auto neg_lr = static_cast<ref::LD>(-0.25f);
    for (index_t k : {0, 2}) {
      const Factors& f = md.adapters[std::size_t(k)];
      // p + (-lr) g, one rounding (fma).
      check_close<float>(on_host(trained.delta(k == 0 ? "a" : "c").A()),
                         ref::axpby(neg_lr, on_host(g2.at(k).dA()), 1, f.A), 1);
      check_close<float>(on_host(trained.delta(k == 0 ? "a" : "c").B()),
                         ref::axpby(neg_lr, on_host(g2.at(k).dB()), 1, f.B), 1);
    }
    CHECK(bit_identical(on_host(trained.delta("b").A()), md.adapters[1].A));
  }
  SECTION("without dX: the same gradients") {
    auto grads2 = l.make_gradients();
    l.backward(Xb, std::span<const std::int32_t>(ids), Gb, grads2, ws);
    for (index_t k = 0; k < 3; ++k) {
      CHECK(bit_identical(on_host(grads2.at(k).dA()), on_host(grads.at(k).dA())));
      CHECK(bit_identical(on_host(grads2.at(k).dB()), on_host(grads.at(k).dB())));
    }
  }
}

TEST_CASE("multi-adapter: transferred keeps names, slots and the active set", "[conformance][multi]") {
  const Model md;
  HostLayer host(md.W, md.bias);
  host.add("a", md.adapters[0].delta());
  host.add("gone", md.adapters[1].delta());
  host.add("c", md.adapters[2].delta());
  host.remove("gone");
  host.set_multiplier("c", 3.0);
  host.set_active({{"c", 0.5}});

  const Layer l = host.transferred(OnBackend{});
  CHECK(l.names() == std::vector<std::string>{"a", "c"});
  CHECK(l.slot_count() == 3);
  CHECK(l.slot("c") == 2);
  CHECK(l.active() == host.active());
  CHECK(l.snapshot()->terms.at(0).scale == host.snapshot()->terms.at(0).scale);
  const std::vector<const Factors*> factors{&md.adapters[0], nullptr, &md.adapters[2]};
  check_gathered_forward(l, md, factors, random_host<float>(5, kIn, 9), {2, 0, -1, 2, 0});
  CHECK(bank_scales(l)[2] == static_cast<float>(3.0 * 1.5));

#if !defined(LORA_CONFORMANCE_BACKEND_EIGEN)
  // lora::to_device / to_host go through transferred().
  const auto back = lora::to_host(lora::to_device(host));
  CHECK(back.slot_count() == 3);
  CHECK(bit_identical(back.delta("c").A(), host.delta("c").A()));
#endif

  host.merge_active();
  CHECK_THROWS_AS(host.transferred(OnBackend{}), lora::ValueError);
  CHECK_THROWS_WITH(host.transferred(OnBackend{}), Catch::Matchers::Contains("merged"));
}

namespace {

/// A wider layer for the fused device path (detail/sgmv.hpp): in = 600 columns
/// (3 k-chunks of the shrink, the last partial), out = 83 (not a multiple of
/// the expand's 4 columns per index), adapters of ranks 4, 8, 16, 64 and 80 at
/// slots 0..4 (80: above every rank a GPU kernel would specialise).
struct WideModel {
  static constexpr index_t out = 83, in = 600;
  static constexpr index_t ranks[] = {4, 8, 16, 64, 80};
  Host<float> W = random_host<float>(out, in, 101);
  HostVector<float> bias = random_host<float>(out, 1, 102);
  std::vector<Host<float>> A, B;
  WideModel() {
    for (std::size_t k = 0; k < std::size(ranks); ++k) {
      A.push_back(random_host<float>(ranks[k], in, 110 + 2 * k));
      B.push_back(random_host<float>(out, ranks[k], 111 + 2 * k));
    }
  }
  Layer layer() const {
    Layer l(on_backend(W), on_backend(bias));
    for (std::size_t k = 0; k < A.size(); ++k)
      l.add("w" + std::to_string(k), on_backend(HostDelta(B[k], A[k], {.alpha = 0.5 + double(k)})));
    return l;
  }
  /// `want` plus, per token t with ids[t] = k >= 0, s_k (x_t A_k^T) B_k^T.
  ref::Sum plus_terms(ref::Sum want, const std::vector<float>& s, const Host<float>& X,
                      std::span<const std::int32_t> ids) const {
    for (std::size_t k = 0; k < A.size(); ++k) {
      if (std::find(ids.begin(), ids.end(), static_cast<std::int32_t>(k)) == ids.end()) continue;
      const ref::Sum term = ref::product(s[k], ref::product(1, X, false, A[k], true), false, B[k], true);
      for (index_t t = 0; t < X.rows(); ++t)
        if (ids[t] == static_cast<std::int32_t>(k))
          for (index_t j = 0; j < out; ++j) {
            want.value(t, j) += term.value(t, j);
            want.bound(t, j) += term.bound(t, j);
          }
    }
    return want;
  }
  /// The gathered forward's reference: X W^T + b plus each token's term.
  ref::Sum forward(const std::vector<float>& s, const Host<float>& X, std::span<const std::int32_t> ids) const {
    return plus_terms(ref::add_to_rows(ref::product(1, X, false, W, true), 1, bias), s, X, ids);
  }
  // The longest chain of roundings: the base's in, the rank's, the scale, the adds.
  static constexpr index_t depth = in + 80 + 5;
};

}  // namespace

TEST_CASE("multi-adapter: gathered forward, wide layer, ranks 4 to 80", "[conformance][multi]") {
  const WideModel md;
  const Layer l = md.layer();
  const auto s = bank_scales(l);
  Layer::gather_workspace ws;
  const auto run = [&](const Host<float>& X, const std::vector<std::int32_t>& ids) {
    INFO("ids of " << ids.size() << " tokens");
    BMatrix<float> Y = on_backend(Host<float>::Constant(X.rows(), WideModel::out, 1e3f));  // overwritten
    l.forward(on_backend(X), std::span<const std::int32_t>(ids), Y, ws);
    check_close<float>(on_host(Y), md.forward(s, X, ids), WideModel::depth);
  };
  const Host<float> X = random_host<float>(12, WideModel::in, 103);
  SECTION("every rank, interleaved ids with -1") {
    run(X, {3, 0, -1, 4, 1, 2, 3, 0, 4, -1, 2, 1});
    // The same shape again: on a device the workspace holds what it needs (on
    // Eigen the OpenMP lanes' scratch depends on which lane took which segment).
    const index_t held = ws.capacity();
    run(X, {4, 4, 0, -1, 1, 3, 3, 2, -1, 0, 1, 2});
#if !defined(LORA_CONFORMANCE_BACKEND_EIGEN)
    CHECK(ws.capacity() == held);
#else
    (void)held;
#endif
    // A smaller batch after a larger one: no stale token entries.
    run(X.topRows(3), {-1, 2, -1});
  }
  SECTION("one token per adapter (decode)") { run(X.topRows(5), {2, 4, 0, 3, 1}); }
  SECTION("all tokens on the rank-80 adapter") { run(X, std::vector<std::int32_t>(12, 4)); }
  SECTION("no adapter at all") { run(X, std::vector<std::int32_t>(12, -1)); }
  SECTION("n = 0") { run(X.topRows(0), {}); }
  SECTION("the adapters' part alone") {
    const std::vector<std::int32_t> ids{1, 4, -1, 0, 3, 3, 2, 4, -1, 0, 2, 1};
    const Host<float> Y0 = random_host<float>(12, WideModel::out, 104);
    BMatrix<float> Y = on_backend(Y0);
    l.add_adapter_terms(on_backend(X), std::span<const std::int32_t>(ids), Y, ws);
    check_close<float>(on_host(Y), md.plus_terms(ref::scaled(1, Y0), s, X, ids), WideModel::depth);
  }
}
