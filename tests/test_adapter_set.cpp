// Named adapters: MultiAdapterLinear (several weighted adapters on one frozen
// base, hot swap under concurrent forwards, merge), AdapterSet (layers by
// module path) and the PEFT combinations (cat, linear, svd), each against a
// plain dense long-double computation written out here.
#include <lora/adapter_set.hpp>

#include <Eigen/Eigenvalues>
#include <catch2/catch.hpp>

#include "support.hpp"
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <new>
#include <string>
#include <thread>
#include <vector>

// Counts every operator new of the program, so a test can assert that a warm
// forward allocates nothing from the C++ heap (snapshot copies, vectors).
// Eigen's scratch goes through malloc and is covered by the workspace
// capacity checks instead.
namespace {

using support::fill;
using support::message_of;
std::atomic<long> g_news{0};
}
// noinline: GCC would otherwise inline free() into call sites of operator
// new and warn (-Wmismatched-new-delete) about the pair it then sees.
#define LORA_TEST_NOINLINE __attribute__((noinline))
LORA_TEST_NOINLINE void* operator new(std::size_t n) {
  g_news.fetch_add(1, std::memory_order_relaxed);
  if (void* p = std::malloc(n ? n : 1)) return p;
  throw std::bad_alloc();
}
LORA_TEST_NOINLINE void* operator new[](std::size_t n) { return ::operator new(n); }
LORA_TEST_NOINLINE void* operator new(std::size_t n, const std::nothrow_t&) noexcept {
  try {
    return ::operator new(n);
  } catch (...) {
    return nullptr;
  }
}
LORA_TEST_NOINLINE void* operator new[](std::size_t n, const std::nothrow_t& t) noexcept {
  return ::operator new(n, t);
}
LORA_TEST_NOINLINE void operator delete(void* p) noexcept { std::free(p); }
LORA_TEST_NOINLINE void operator delete[](void* p) noexcept { std::free(p); }
LORA_TEST_NOINLINE void operator delete(void* p, std::size_t) noexcept { std::free(p); }
LORA_TEST_NOINLINE void operator delete[](void* p, std::size_t) noexcept { std::free(p); }
LORA_TEST_NOINLINE void operator delete(void* p, const std::nothrow_t&) noexcept { std::free(p); }
LORA_TEST_NOINLINE void operator delete[](void* p, const std::nothrow_t&) noexcept { std::free(p); }

namespace {

using lora::Combination;
using lora::index_t;
using lora::LowRankDelta;
using lora::RowMatrix;
using lora::WeightedDelta;
using LD = long double;
using MatL = RowMatrix<LD>;
LowRankDelta<float> random_delta(index_t out, index_t in, index_t r, lora::DeltaOptions o, std::uint64_t seed) {
  LowRankDelta<float> d{out, in, r, o};
  d.init(lora::init::UniformBoth{0.5}, seed);
  return d;
}

/// s for the test's own reference, written out rather than via lora::scale_for.
LD ref_scale(const LowRankDelta<float>& d) {
  const auto& o = d.options();
  const LD base = o.alpha == 0 ? LD(o.user_scale)
                               : (o.rule == lora::Scaling::rslora ? LD(o.alpha) / std::sqrt(LD(d.rank()))
                                                                  : LD(o.alpha) / LD(d.rank()));
  return base * LD(o.multiplier);
}

/// sum_k c_k B_k A_k in long double.
MatL dense_sum(const std::vector<std::pair<const LowRankDelta<float>*, LD>>& terms, index_t out, index_t in) {
  MatL d = MatL::Zero(out, in);
  for (const auto& [delta, c] : terms) d += c * delta->B().cast<LD>() * delta->A().cast<LD>();
  return d;
}

/// Y = X W^T + b + X D^T for a dense effective delta D, and sum |terms| per
/// entry (Higham's bound for any summation order).
struct Reference {
  MatL y, mag;
};
Reference reference_forward(const MatL& W, const std::vector<std::pair<const LowRankDelta<float>*, LD>>& terms,
                            const RowMatrix<float>& X, const Eigen::VectorXf* bias) {
  const MatL x = X.cast<LD>();
  Reference r;
  r.y = x * W.transpose();
  r.mag = x.cwiseAbs() * W.cwiseAbs().transpose();
  for (const auto& [d, c] : terms) {
    const MatL h = x * d->A().cast<LD>().transpose();
    r.y += c * h * d->B().cast<LD>().transpose();
    r.mag += std::fabs(c) * (x.cwiseAbs() * d->A().cast<LD>().cwiseAbs().transpose()) *
             d->B().cast<LD>().cwiseAbs().transpose();
  }
  if (bias) {
    r.y.rowwise() += bias->cast<LD>().transpose();
    r.mag.rowwise() += bias->cast<LD>().cwiseAbs().transpose();
  }
  return r;
}

template <class YM>
void check_close(const YM& Y, const Reference& ref, index_t depth) {
  REQUIRE(Y.rows() == ref.y.rows());
  REQUIRE(Y.cols() == ref.y.cols());
  const LD gamma = 2.0L * LD(depth + 4) * std::numeric_limits<float>::epsilon();
  for (index_t t = 0; t < Y.rows(); ++t)
    for (index_t o = 0; o < Y.cols(); ++o) {
      INFO("t = " << t << ", o = " << o);
      REQUIRE(std::fabs(LD(Y(t, o)) - ref.y(t, o)) <= gamma * ref.mag(t, o) + 1e-30L);
    }
}

LD max_abs(const MatL& m) { return m.cwiseAbs().maxCoeff(); }
// Three adapters of ranks 1, 4, 16 with the three scaling rules and a multiplier.
struct Trio {
  index_t out = 40, in = 64;
  LowRankDelta<float> a = random_delta(40, 64, 1, {.alpha = 3}, 1);
  LowRankDelta<float> b = random_delta(40, 64, 4, {.alpha = 8, .rule = lora::Scaling::rslora}, 2);
  LowRankDelta<float> c = random_delta(40, 64, 16, {.user_scale = 0.25, .multiplier = 1.5}, 3);
};

}  // namespace

TEST_CASE("three active adapters (ranks 1, 4, 16) with weights match the dense reference", "[adapters][forward]") {
  Trio t;
  RowMatrix<float> W(t.out, t.in);
  fill(W, 10);
  Eigen::VectorXf bias(t.out);
  fill(bias, 11);
  lora::MultiAdapterLinear<RowMatrix<float>> layer{W, bias};
  layer.add("a", t.a);
  layer.add("b", t.b);
  layer.add("c", t.c);
  CHECK(layer.names() == std::vector<std::string>{"a", "b", "c"});
  layer.set_active({{"a", 0.5}, {"b", -1.25}, {"c", 2.0}});

  const MatL Wl = W.cast<LD>();
  const std::vector<std::pair<const LowRankDelta<float>*, LD>> terms = {
      {&t.a, 0.5L * ref_scale(t.a)}, {&t.b, -1.25L * ref_scale(t.b)}, {&t.c, 2.0L * ref_scale(t.c)}};
  CHECK(ref_scale(t.b) == Approx(4.0));  // 8 / sqrt(4)
  CHECK(ref_scale(t.c) == Approx(0.375));

  for (const index_t n : {1, 3, 17}) {
    CAPTURE(n);
    RowMatrix<float> X(n, t.in);
    fill(X, 20 + n);
    const Reference ref = reference_forward(Wl, terms, X, &bias);
    check_close(layer.forward(X), ref, t.in + 16);

    // A caller's Y full of NaN (overwritten, beta = 0) and a reused workspace:
    // after the first call nothing grows and nothing is allocated.
    RowMatrix<float> Y = RowMatrix<float>::Constant(n, t.out, std::numeric_limits<float>::quiet_NaN());
    decltype(layer)::workspace ws;
    layer.forward(X, Y, ws);
    check_close(Y, ref, t.in + 16);
    CHECK(ws.capacity() == n * 16);  // [n, max r], shared by the three terms
    const long before = g_news.load();
    for (int i = 0; i < 3; ++i) layer.forward(X, Y, ws);
    const long after = g_news.load();
    CHECK(after == before);
    CHECK(ws.capacity() == n * 16);
    check_close(Y, ref, t.in + 16);
  }

  // One token as a vector.
  Eigen::VectorXf x(t.in);
  fill(x, 30);
  const RowMatrix<float> X1 = x.transpose();
  const Eigen::VectorXf y = layer.forward(x);
  check_close(y.transpose(), reference_forward(Wl, terms, X1, &bias), t.in + 16);

  // merged_weight: W + sum_k w_k s_k B_k A_k, dense.
  const MatL M = Wl + dense_sum(terms, t.out, t.in);
  const RowMatrix<float> Mw = layer.merged_weight();
  CHECK(max_abs(Mw.cast<LD>() - M) <= 64 * std::numeric_limits<float>::epsilon() * (1 + max_abs(M)));
}

namespace {
// Each base kind, with the float matrix it dequantises to.
template <class Base>
struct BaseCase;
template <>
struct BaseCase<RowMatrix<float>> {
  RowMatrix<float> base, dense;
  explicit BaseCase(const RowMatrix<float>& W) : base(W), dense(W) {}
};
template <>
struct BaseCase<Eigen::Map<const RowMatrix<float>>> {
  RowMatrix<float> storage;
  Eigen::Map<const RowMatrix<float>> base;
  RowMatrix<float> dense;
  explicit BaseCase(const RowMatrix<float>& W) : storage(W), base(storage.data(), W.rows(), W.cols()), dense(W) {}
};
template <>
struct BaseCase<RowMatrix<Eigen::bfloat16>> {
  RowMatrix<Eigen::bfloat16> base;
  RowMatrix<float> dense;
  explicit BaseCase(const RowMatrix<float>& W) : base(W.cast<Eigen::bfloat16>()), dense(base.cast<float>()) {}
};
template <>
struct BaseCase<lora::NF4Matrix> {
  lora::NF4Matrix base;
  RowMatrix<float> dense;
  explicit BaseCase(const RowMatrix<float>& W)
      : base(lora::NF4Matrix::quantize(W, {.block_size = 64, .double_quant = true})), dense(base.dequantize()) {}
};
}  // namespace

TEMPLATE_TEST_CASE("mixed bases: forward and merged_weight match the dense reference of the dequantised W",
                   "[adapters][bases]", RowMatrix<float>, Eigen::Map<const RowMatrix<float>>,
                   RowMatrix<Eigen::bfloat16>, lora::NF4Matrix) {
  Trio t;
  RowMatrix<float> W(t.out, t.in);
  fill(W, 40);
  BaseCase<TestType> bc(W);
  lora::MultiAdapterLinear<TestType> layer{bc.base};
  static_assert(decltype(layer)::base_is_writable == std::is_same_v<TestType, RowMatrix<float>>);
  layer.add("a", t.a);
  layer.add("c", t.c);
  layer.add("b", t.b);
  layer.set_active({{"c", -0.75}, {"a", 1.0}, {"b", 0.5}});
  const std::vector<std::pair<const LowRankDelta<float>*, LD>> terms = {
      {&t.c, -0.75L * ref_scale(t.c)}, {&t.a, ref_scale(t.a)}, {&t.b, 0.5L * ref_scale(t.b)}};
  const MatL Wd = bc.dense.template cast<LD>();
  if constexpr (!std::is_same_v<TestType, RowMatrix<float>> && !std::is_same_v<TestType, Eigen::Map<const RowMatrix<float>>>)
    CHECK(max_abs(Wd - W.cast<LD>()) > 0);  // the reference really is the dequantised W
  for (const index_t n : {1, 2, 9}) {
    CAPTURE(n);
    RowMatrix<float> X(n, t.in);
    fill(X, 50 + n);
    check_close(layer.forward(X), reference_forward(Wd, terms, X, nullptr), t.in + 16);
  }
  const MatL M = Wd + dense_sum(terms, t.out, t.in);
  const RowMatrix<float> Mw = layer.merged_weight();
  CHECK(max_abs(Mw.cast<LD>() - M) <= 64 * std::numeric_limits<float>::epsilon() * (1 + max_abs(M)));
}

TEST_CASE("set_active, set_multiplier, remove and re-add change the output accordingly", "[adapters][swap]") {
  Trio t;
  RowMatrix<float> W(t.out, t.in), X(5, t.in);
  fill(W, 60);
  fill(X, 61);
  lora::MultiAdapterLinear<RowMatrix<float>> layer{W};
  const MatL Wl = W.cast<LD>();
  const auto expect = [&](std::vector<std::pair<const LowRankDelta<float>*, LD>> terms) {
    check_close(layer.forward(X), reference_forward(Wl, terms, X, nullptr), t.in + 16);
  };
  expect({});  // no adapter: the base
  layer.add("a", t.a);
  layer.add("b", t.b);
  CHECK(layer.contains("a"));
  CHECK_FALSE(layer.contains("z"));
  expect({});  // added, not active
  layer.set_active("a");
  CHECK(layer.active() == std::vector<std::pair<std::string, double>>{{"a", 1.0}});
  expect({{&t.a, ref_scale(t.a)}});
  layer.set_active("b");
  expect({{&t.b, ref_scale(t.b)}});
  const std::vector<std::pair<std::string, double>> both = {{"a", 2.0}, {"b", -0.5}};
  layer.set_active(both);  // the vector overload
  expect({{&t.a, 2.0L * ref_scale(t.a)}, {&t.b, -0.5L * ref_scale(t.b)}});
  layer.set_multiplier("b", 3.0);
  CHECK(layer.delta("b").multiplier() == 3.0);
  expect({{&t.a, 2.0L * ref_scale(t.a)}, {&t.b, -0.5L * 3 * ref_scale(t.b)}});
  layer.set_multiplier("b", 1.0);
  layer.set_active({});
  expect({});
  layer.set_active(both);

  // Removing an active adapter drops it from the active set; a forward already
  // holding the old snapshot keeps the delta alive.
  const auto held = layer.snapshot();
  layer.remove("a");
  CHECK_FALSE(layer.contains("a"));
  CHECK(layer.active() == std::vector<std::pair<std::string, double>>{{"b", -0.5}});
  expect({{&t.b, -0.5L * ref_scale(t.b)}});
  REQUIRE(held->terms.size() == 2);
  CHECK(held->terms[0].delta->rank() == 1);  // still alive, still A_a
  CHECK(held->terms[0].delta->A() == t.a.A());

  // Re-add under the same name with different factors.
  LowRankDelta<float> a2 = random_delta(t.out, t.in, 2, {.alpha = 1}, 99);
  layer.add("a", a2);
  CHECK(layer.names() == std::vector<std::string>{"b", "a"});
  layer.set_active({{"a", 1.0}, {"b", 1.0}});
  expect({{&a2, ref_scale(a2)}, {&t.b, ref_scale(t.b)}});
  CHECK(layer.delta("a").rank() == 2);
}

TEST_CASE("merge_active folds the active set into W once; unmerge takes it out", "[adapters][merge]") {
  Trio t;
  RowMatrix<float> W(t.out, t.in), X(4, t.in);
  fill(W, 70);
  fill(X, 71);
  Eigen::VectorXf bias(t.out);
  fill(bias, 72);
  const auto run = [&](auto& layer) {
    layer.add("a", t.a);
    layer.add("b", t.b);
    layer.add("c", t.c);
    layer.set_active({{"a", 1.0}, {"c", -2.0}});
    const std::vector<std::pair<const LowRankDelta<float>*, LD>> terms = {{&t.a, ref_scale(t.a)},
                                                                          {&t.c, -2.0L * ref_scale(t.c)}};
    const Reference ref = reference_forward(W.cast<LD>(), terms, X, &bias);
    check_close(layer.forward(X), ref, t.in + 16);
    const RowMatrix<float> before = layer.merged_weight();

    layer.merge_active();
    CHECK(layer.merged());
    CHECK(layer.snapshot()->terms.empty());  // forwards read W alone: no double count
    check_close(layer.forward(X), ref, t.in + 32);
    const RowMatrix<float> during = layer.merged_weight();
    CHECK((during - before).cwiseAbs().maxCoeff() <= 1e-5f * (1 + before.cwiseAbs().maxCoeff()));

    // The active set is frozen; other adapters may still change.
    CHECK_THROWS_AS(layer.set_active("b"), lora::ValueError);
    CHECK_THROWS_AS(layer.set_multiplier("a", 2.0), lora::ValueError);
    CHECK_THROWS_AS(layer.remove("c"), lora::ValueError);
    CHECK_THROWS_WITH(layer.merge_active(), Catch::Contains("already merged (a, c)"));
    layer.set_multiplier("b", 5.0);
    layer.remove("b");
    layer.add("b", t.b);
    check_close(layer.forward(X), ref, t.in + 32);

    CHECK(layer.unmerge());
    CHECK_FALSE(layer.merged());
    CHECK_FALSE(layer.unmerge());
    check_close(layer.forward(X), ref, t.in + 32);
    const RowMatrix<float>& Wnow = layer.base_weight();
    CHECK((Wnow - W).cwiseAbs().maxCoeff() <= 1e-5f * (1 + W.cwiseAbs().maxCoeff()));
    layer.set_active("b");  // unfrozen
  };
  SECTION("owned") {
    lora::MultiAdapterLinear<RowMatrix<float>> layer{W, bias};
    run(layer);
  }
  SECTION("a writable view of the caller's buffer") {
    RowMatrix<float> buffer = W;
    lora::MultiAdapterLinear<Eigen::Map<RowMatrix<float>>> layer{
        Eigen::Map<RowMatrix<float>>(buffer.data(), t.out, t.in), bias};
    run(layer);
    CHECK(&layer.base_weight().coeffRef(0, 0) == buffer.data());
  }
}

TEST_CASE("hot swap: 4 threads forward while a 5th swaps; every output is one whole state, bitwise",
          "[adapters][threads]") {
  const index_t out = 24, in = 16, n = 3;
  RowMatrix<float> W(out, in), X(n, in);
  fill(W, 80);
  fill(X, 81);
  Eigen::VectorXf bias(out);
  fill(bias, 82);
  lora::MultiAdapterLinear<RowMatrix<float>> layer{W, bias};
  const LowRankDelta<float> da = random_delta(out, in, 2, {.alpha = 4}, 83);
  const LowRankDelta<float> db = random_delta(out, in, 5, {.alpha = 2}, 84);
  const LowRankDelta<float> dc = random_delta(out, in, 3, {}, 85);
  layer.add("a", da);
  layer.add("b", db);

  // The states the swapper cycles through, and each one's output computed
  // before any thread starts.
  const std::vector<std::function<void()>> steps = {
      [&] { layer.set_active("a"); },
      [&] { layer.set_active("b"); },
      [&] { layer.set_multiplier("b", 3.0); },
      [&] { layer.set_multiplier("b", 1.0); },
      [&] { layer.set_active({{"a", 0.5}, {"b", 2.0}}); },
      [&] { layer.add("c", dc); },
      [&] { layer.set_active({{"c", 1.0}, {"a", -1.0}}); },
      [&] { layer.remove("c"); },  // active: the set becomes {a: -1}
      [&] { layer.set_active({}); },
  };
  std::vector<RowMatrix<float>> expected{layer.forward(X)};  // the base alone
  for (const auto& step : steps) {
    step();
    expected.push_back(layer.forward(X));
  }
  REQUIRE(layer.active().empty());
  REQUIRE_FALSE(layer.contains("c"));

  std::atomic<bool> stop{false};
  std::atomic<long> forwards{0}, mismatches{0};
  std::vector<std::atomic<long>> seen(expected.size());  // forwards per state
  const auto states_seen = [&] {
    std::size_t k = 0;
    for (const auto& s : seen) k += s.load() > 0;
    return k;
  };
  std::vector<std::thread> workers;
  for (int w = 0; w < 4; ++w)
    workers.emplace_back([&] {
      decltype(layer)::workspace ws;
      RowMatrix<float> Y(n, out);
      while (!stop.load(std::memory_order_relaxed)) {
        layer.forward(X, Y, ws);
        bool found = false;
        for (std::size_t k = 0; k < expected.size() && !found; ++k)
          if (std::memcmp(Y.data(), expected[k].data(), sizeof(float) * std::size_t(Y.size())) == 0) {
            seen[k].fetch_add(1, std::memory_order_relaxed);
            found = true;
          }
        if (!found) mismatches.fetch_add(1);
        forwards.fetch_add(1, std::memory_order_relaxed);
      }
    });
  // At least 300 cycles, and on until the forwards have met most states (with
  // more threads than cores the swapper can sleep through a whole burst of
  // forwards); a time limit keeps a broken swap from hanging the test.
  std::thread swapper([&] {
    const auto start = std::chrono::steady_clock::now();
    for (int cycle = 0; cycle < 300 || forwards.load() < 4000 || states_seen() < 4; ++cycle) {
      for (const auto& step : steps) step();
      if (std::chrono::steady_clock::now() - start > std::chrono::seconds(20)) break;
    }
    stop.store(true);
  });
  swapper.join();
  for (auto& w : workers) w.join();

  CHECK(mismatches.load() == 0);
  const std::size_t states = states_seen();
  INFO("forwards " << forwards.load() << ", distinct states seen " << states);
  CHECK(states >= 2);  // the swaps really happened under the forwards
}

TEST_CASE("combine_cat equals the weighted sum of the deltas", "[adapters][combine]") {
  Trio t;
  t.b.set_multiplier(0.5);  // a multiplier is part of s, as PEFT's scale_layer
  const std::vector<WeightedDelta<float>> in = {{t.a, 0.7}, {t.b, -1.5}, {t.c, 2.0}};
  const LowRankDelta<float> cat = lora::combine_cat(in);
  CHECK(cat.rank() == 21);
  CHECK(cat.scale() == 1.0f);
  CHECK(cat.alpha() == 21.0);
  const MatL sum =
      dense_sum({{&t.a, 0.7L * ref_scale(t.a)}, {&t.b, -1.5L * ref_scale(t.b)}, {&t.c, 2.0L * ref_scale(t.c)}},
                t.out, t.in);
  const MatL got = cat.B().cast<LD>() * cat.A().cast<LD>();
  CHECK(max_abs(got - sum) <= 32 * std::numeric_limits<float>::epsilon() * max_abs(sum));
  // The factors are PEFT's: B stacked as given, A scaled by w s.
  CHECK(cat.B().middleCols(1, 4) == t.b.B());
  CHECK(std::fabs(cat.A()(1, 3) - float(-1.5L * ref_scale(t.b) * t.b.A()(0, 3))) <= 1e-6f);
}

TEST_CASE("combine_linear is PEFT's sqrt-weighted factor sum, not the weighted delta sum", "[adapters][combine]") {
  const index_t out = 30, in = 20, r = 4;
  const LowRankDelta<float> d1 = random_delta(out, in, r, {.alpha = 8}, 5);
  const LowRankDelta<float> d2 = random_delta(out, in, r, {.alpha = 2, .rule = lora::Scaling::rslora}, 6);
  const std::vector<WeightedDelta<float>> in2 = {{d1, 0.6}, {d2, -1.5}};
  const LowRankDelta<float> lin = lora::combine_linear(in2);
  CHECK(lin.rank() == r);
  CHECK(lin.scale() == 1.0f);
  // PEFT: weight_with_scaling = w s; A gets sign * sqrt|.|, B gets sqrt|.|.
  const LD c1 = 0.6L * ref_scale(d1), c2 = -1.5L * ref_scale(d2);
  const MatL A = std::sqrt(std::fabs(c1)) * d1.A().cast<LD>() - std::sqrt(std::fabs(c2)) * d2.A().cast<LD>();
  const MatL B = std::sqrt(std::fabs(c1)) * d1.B().cast<LD>() + std::sqrt(std::fabs(c2)) * d2.B().cast<LD>();
  const LD tol = 8 * std::numeric_limits<float>::epsilon();
  CHECK(max_abs(lin.A().cast<LD>() - A) <= tol * max_abs(A));
  CHECK(max_abs(lin.B().cast<LD>() - B) <= tol * max_abs(B));
  // Approximate: the cross terms make it differ from c1 B1 A1 + c2 B2 A2.
  const MatL sum = dense_sum({{&d1, c1}, {&d2, c2}}, out, in);
  CHECK(max_abs(lin.B().cast<LD>() * lin.A().cast<LD>() - sum) > 0.1L * max_abs(sum));
  // One adapter: linear is exact.
  const std::vector<WeightedDelta<float>> one = {{d1, -0.8}};
  const LowRankDelta<float> l1 = lora::combine_linear(one);
  const MatL s1 = dense_sum({{&d1, -0.8L * ref_scale(d1)}}, out, in);
  CHECK(max_abs(l1.B().cast<LD>() * l1.A().cast<LD>() - s1) <= 16 * tol * max_abs(s1));
}

TEST_CASE("combine_svd is the best rank-r approximation of the weighted sum", "[adapters][combine]") {
  const index_t out = 36, in = 28;
  const LowRankDelta<float> d1 = random_delta(out, in, 3, {.alpha = 6}, 7);
  const LowRankDelta<float> d2 = random_delta(out, in, 4, {.alpha = 4}, 8);
  const std::vector<WeightedDelta<float>> ws = {{d1, 1.0}, {d2, -0.4}};
  const MatL D = dense_sum({{&d1, ref_scale(d1)}, {&d2, -0.4L * ref_scale(d2)}}, out, in);  // true rank 7

  // Independently: eigen-decomposition of D^T D (long double): sigma_i^2 and V.
  const Eigen::SelfAdjointEigenSolver<MatL> eig(D.transpose() * D);
  std::vector<LD> sigma2(eig.eigenvalues().data(), eig.eigenvalues().data() + in);  // ascending
  std::reverse(sigma2.begin(), sigma2.end());
  LD total = 0;
  for (LD s : sigma2) total += std::max(s, LD(0));

  for (const index_t r : {1, 3, 5}) {
    CAPTURE(r);
    const lora::SVDCombination<float> res = lora::combine_svd(ws, r);
    CHECK(res.delta.rank() == r);
    CHECK(res.delta.scale() == 1.0f);
    LD kept = 0;
    for (index_t i = 0; i < r; ++i) kept += sigma2[std::size_t(i)];
    CHECK(res.report.kept_energy == Approx(double(kept / total)).epsilon(1e-9));
    CHECK(res.report.residual_norm == Approx(double(std::sqrt(total - kept))).epsilon(1e-6));
    REQUIRE(res.report.singular_values.size() == std::size_t(std::min(out, in)));
    for (index_t i = 0; i < 7; ++i)
      CHECK(res.report.singular_values[std::size_t(i)] == Approx(double(std::sqrt(sigma2[std::size_t(i)]))).epsilon(1e-9));
    // Eckart-Young: the best rank-r approximation is D V_r V_r^T.
    const MatL Vr = eig.eigenvectors().rightCols(r);
    const MatL best = D * Vr * Vr.transpose();
    const MatL got = res.delta.B().cast<LD>() * res.delta.A().cast<LD>();
    CHECK(max_abs(got - best) <= 1e-5L * max_abs(D));
    CHECK(std::sqrt((D - got).squaredNorm()) == Approx(res.report.residual_norm).epsilon(1e-4));
    // PEFT's split: A = V_r^T (orthonormal rows), all of S on B.
    const MatL AAt = res.delta.A().cast<LD>() * res.delta.A().cast<LD>().transpose();
    CHECK(max_abs(AAt - MatL::Identity(r, r)) <= 1e-6L);
  }
  // rank >= the true rank reproduces the sum; rank 0 = the largest input rank (4).
  for (const index_t r : {7, 12}) {
    const auto res = lora::combine_svd(ws, r);
    const MatL got = res.delta.B().cast<LD>() * res.delta.A().cast<LD>();
    CHECK(max_abs(got - D) <= 1e-6L * max_abs(D));
    CHECK(res.report.kept_energy == Approx(1.0).epsilon(1e-12));
  }
  CHECK(lora::combine_svd(ws).delta.rank() == 4);

  SECTION("clamp: PEFT's quantile of the factors' entries, both clamped to [-hi, hi]") {
    const auto plain = lora::combine_svd(ws, 3);
    const auto clamped = lora::combine_svd(ws, 3, 0.9);
    std::vector<double> all;
    for (index_t i = 0; i < plain.delta.B().size(); ++i) all.push_back(plain.delta.B().data()[i]);
    for (index_t i = 0; i < plain.delta.A().size(); ++i) all.push_back(plain.delta.A().data()[i]);
    std::sort(all.begin(), all.end());
    const double pos = 0.9 * double(all.size() - 1);
    const auto lo = std::size_t(pos);
    const double hi = all[lo] + (all[lo + 1] - all[lo]) * (pos - double(lo));  // torch.quantile, linear
    int clipped = 0;
    const auto check = [&](const RowMatrix<float>& p, const RowMatrix<float>& c) {
      for (index_t i = 0; i < p.size(); ++i) {
        const double expect = std::min(std::max(double(p.data()[i]), -hi), hi);
        CHECK(std::fabs(c.data()[i] - expect) <= 1e-5 * (1 + std::fabs(expect)));
        clipped += std::fabs(double(p.data()[i])) > hi * (1 + 1e-5);
      }
    };
    check(plain.delta.B(), clamped.delta.B());
    check(plain.delta.A(), clamped.delta.A());
    CHECK(clipped > 0);
  }
}

TEST_CASE("add_weighted on a layer: the combination is added as a new, inactive adapter", "[adapters][combine]") {
  Trio t;
  RowMatrix<float> W(t.out, t.in), X(3, t.in);
  fill(W, 90);
  fill(X, 91);
  lora::MultiAdapterLinear<RowMatrix<float>> layer{W};
  layer.add("a", t.a);
  layer.add("b", t.b);
  layer.add("c", t.c);
  CHECK_FALSE(layer.add_weighted("mix", {{"a", 0.5}, {"b", 1.0}, {"c", -1.0}}, Combination::cat));
  CHECK(layer.contains("mix"));
  CHECK(layer.active().empty());
  CHECK(layer.delta("mix").rank() == 21);
  layer.set_active("mix");
  const std::vector<std::pair<const LowRankDelta<float>*, LD>> terms = {
      {&t.a, 0.5L * ref_scale(t.a)}, {&t.b, ref_scale(t.b)}, {&t.c, -ref_scale(t.c)}};
  const Reference ref = reference_forward(W.cast<LD>(), terms, X, nullptr);
  check_close(layer.forward(X), ref, t.in + 24);
  // The same output as the three adapters active with those weights.
  layer.set_active({{"a", 0.5}, {"b", 1.0}, {"c", -1.0}});
  check_close(layer.forward(X), ref, t.in + 24);

  const auto rep = layer.add_weighted("svd", {{"a", 0.5}, {"b", 1.0}, {"c", -1.0}}, Combination::svd, 21);
  REQUIRE(rep);
  CHECK(rep->kept_energy == Approx(1.0));
  CHECK(layer.delta("svd").rank() == 21);
  // One adapter: linear whatever was asked (PEFT), so svd_rank is ignored.
  CHECK_FALSE(layer.add_weighted("solo", {{"c", 2.0}}, Combination::svd, 2));
  CHECK(layer.delta("solo").rank() == 16);
  CHECK_THROWS_AS(layer.add_weighted("lin", {{"a", 1.0}, {"b", 1.0}}, Combination::linear), lora::RankError);
  CHECK_FALSE(layer.contains("lin"));
}

TEST_CASE("AdapterSet: layers by module path, adapters by name across them", "[adapters][set]") {
  using Layer = lora::MultiAdapterLinear<RowMatrix<float>>;
  const std::vector<std::string> paths = {"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
                                          "model.layers.0.mlp.up_proj"};
  const index_t shapes[3][2] = {{32, 24}, {16, 24}, {40, 24}};
  lora::AdapterSet<Layer> set;
  std::vector<RowMatrix<float>> Ws;
  for (int i = 0; i < 3; ++i) {
    Ws.emplace_back(shapes[i][0], shapes[i][1]);
    fill(Ws.back(), 100 + std::uint64_t(i));
    set.insert(paths[std::size_t(i)], Layer{Ws.back()});
  }
  CHECK(set.paths() == paths);
  CHECK(set.layer(paths[1]).out_features() == 16);

  // "x" covers q and v, "y" covers v and up (ranks differ per module).
  const LowRankDelta<float> xq = random_delta(32, 24, 4, {.alpha = 8}, 110), xv = random_delta(16, 24, 2, {.alpha = 8}, 111);
  const LowRankDelta<float> yv = random_delta(16, 24, 3, {.alpha = 3}, 112), yu = random_delta(40, 24, 6, {.alpha = 3}, 113);
  set.add_adapter("x", paths[0], xq);
  set.add_adapter("x", paths[1], xv);
  set.add_adapter("y", paths[1], yv);
  set.add_adapter("y", paths[2], yu);
  CHECK(set.adapters() == std::vector<std::string>{"x", "y"});
  CHECK(set.paths_of("x") == std::vector<std::string>{paths[0], paths[1]});
  CHECK(set.paths_of("y") == std::vector<std::string>{paths[1], paths[2]});

  CHECK_THROWS_WITH(set.add_adapter("x", "model.layers.9.q_proj", xq),
                    Catch::Contains("no layer at module path 'model.layers.9.q_proj'"));
  CHECK_THROWS_AS(set.add_adapter("z", paths[1], xq), lora::ShapeError);
  CHECK_THROWS_WITH(set.add_adapter("z", paths[1], xq), Catch::Contains(paths[1]));
  CHECK_THROWS_AS(set.add_adapter("x", paths[0], xq), lora::ValueError);
  CHECK_THROWS_AS(set.insert(paths[0], Layer{Ws[0]}), lora::ValueError);

  RowMatrix<float> X(2, 24);
  fill(X, 120);
  const auto expect = [&](int i, std::vector<std::pair<const LowRankDelta<float>*, LD>> terms) {
    check_close(set.layer(paths[std::size_t(i)]).forward(X), reference_forward(Ws[std::size_t(i)].cast<LD>(), terms, X, nullptr), 40);
  };
  set.set_active({{"x", 1.0}, {"y", -0.5}});
  expect(0, {{&xq, ref_scale(xq)}});
  expect(1, {{&xv, ref_scale(xv)}, {&yv, -0.5L * ref_scale(yv)}});
  expect(2, {{&yu, -0.5L * ref_scale(yu)}});
  set.set_active("y");
  expect(0, {});  // q has no "y": its base alone
  expect(1, {{&yv, ref_scale(yv)}});
  set.set_multiplier("y", 2.0);
  expect(2, {{&yu, 2.0L * ref_scale(yu)}});
  set.set_multiplier("y", 1.0);
  CHECK_THROWS_AS(set.set_active("nope"), lora::ValueError);
  expect(1, {{&yv, ref_scale(yv)}});  // a failed swap changed nothing

  SECTION("add_weighted_adapter: cat across layers, a layer missing one adapter combines the rest") {
    const auto reps = set.add_weighted_adapter("xy", {{"x", 2.0}, {"y", 0.5}}, Combination::cat);
    CHECK(reps.empty());
    CHECK(set.paths_of("xy") == paths);
    CHECK(set.layer(paths[0]).delta("xy").rank() == 4);
    CHECK(set.layer(paths[1]).delta("xy").rank() == 5);
    CHECK(set.layer(paths[2]).delta("xy").rank() == 6);
    set.set_active("xy");
    expect(0, {{&xq, 2.0L * ref_scale(xq)}});
    expect(1, {{&xv, 2.0L * ref_scale(xv)}, {&yv, 0.5L * ref_scale(yv)}});
    expect(2, {{&yu, 0.5L * ref_scale(yu)}});
  }
  SECTION("add_weighted_adapter: svd rank defaults to the largest rank over all layers") {
    const auto reps = set.add_weighted_adapter("s", {{"x", 1.0}, {"y", 1.0}}, Combination::svd);
    REQUIRE(reps.size() == 3);
    for (const auto& p : paths) CHECK(set.layer(p).delta("s").rank() == 6);
    CHECK(reps[0].first == paths[0]);
    CHECK(reps[0].second.kept_energy == Approx(1.0));  // 4 <= 6: exact
    set.set_active("s");
    expect(1, {{&xv, ref_scale(xv)}, {&yv, ref_scale(yv)}});
  }
  SECTION("add_weighted_adapter: a module covered by none of them gets nothing") {
    set.add_weighted_adapter("onlyx", {{"x", 0.5}}, Combination::svd);  // one adapter: linear
    CHECK(set.paths_of("onlyx") == std::vector<std::string>{paths[0], paths[1]});
    CHECK(set.layer(paths[0]).delta("onlyx").rank() == 4);
  }
  SECTION("add_weighted_adapter: linear with mixed ranks at a path is a RankError naming it, nothing added") {
    CHECK_THROWS_WITH(set.add_weighted_adapter("lin", {{"x", 1.0}, {"y", 1.0}}, Combination::linear),
                      Catch::Contains(paths[1]));
    CHECK_FALSE(set.contains_adapter("lin"));
  }
  SECTION("remove_adapter removes from every layer; re-add works") {
    set.remove_adapter("y");
    CHECK(set.adapters() == std::vector<std::string>{"x"});
    CHECK(set.paths_of("y").empty());
    CHECK(set.layer(paths[1]).active().empty());
    expect(1, {});
    CHECK_THROWS_AS(set.remove_adapter("y"), lora::ValueError);
    set.add_adapter("y", paths[0], random_delta(32, 24, 1, {}, 130));
    CHECK(set.paths_of("y") == std::vector<std::string>{paths[0]});
  }
}

TEST_CASE("errors: typed, with the name, path or value in the message", "[adapters][errors]") {
  Trio t;
  RowMatrix<float> W(t.out, t.in);
  fill(W, 140);
  lora::MultiAdapterLinear<RowMatrix<float>> layer{W};
  layer.add("a", t.a);
  layer.add("b", t.b);
  const LowRankDelta<float> wrong = random_delta(t.out + 1, t.in, 2, {}, 141);
  const std::vector<WeightedDelta<float>> mixed = {{t.a, 1.0}, {t.b, 1.0}};
  const std::vector<WeightedDelta<float>> nan_w = {{t.a, std::nan("")}};
  const std::vector<WeightedDelta<float>> inf_w = {{t.a, 1.0}, {t.b, std::numeric_limits<double>::infinity()}};
  const std::vector<WeightedDelta<float>> shapes = {{t.a, 1.0}, {wrong, 1.0}};
  const std::vector<WeightedDelta<float>> none;
  const std::vector<WeightedDelta<float>> big = {{t.c, 1.0}, {t.c, 1.0}, {t.c, 1.0}};  // 48 > min(40, 64)
  RowMatrix<float> X(2, t.in), Xbad(2, t.in + 1), Y(2, t.out), Ybad(3, t.out);
  fill(X, 142);

  struct Case {
    const char* what;
    std::function<void()> f;
    int type;  // 0 ValueError, 1 ShapeError, 2 RankError
    const char* needle;
  };
  const std::vector<Case> cases = {
      {"unknown name: set_active", [&] { layer.set_active("zzz"); }, 0, "no adapter named 'zzz' (adapters: a, b)"},
      {"unknown name: remove", [&] { layer.remove("zzz"); }, 0, "'zzz'"},
      {"unknown name: delta", [&] { (void)layer.delta("zzz"); }, 0, "'zzz'"},
      {"unknown name: set_multiplier", [&] { layer.set_multiplier("zzz", 1.0); }, 0, "'zzz'"},
      {"unknown name: add_weighted", [&] { layer.add_weighted("n", {{"zzz", 1.0}}, Combination::cat); }, 0, "'zzz'"},
      {"duplicate add", [&] { layer.add("a", t.a); }, 0, "'a' already exists"},
      {"duplicate add_weighted", [&] { layer.add_weighted("b", {{"a", 1.0}}, Combination::cat); }, 0, "'b' already exists"},
      {"empty name", [&] { layer.add("", t.a); }, 0, "empty"},
      {"shape mismatch", [&] { layer.add("w", wrong); }, 1, "[41, 64]"},
      {"bias length", [&] { lora::MultiAdapterLinear<RowMatrix<float>>(W, Eigen::VectorXf(3)); }, 1, "bias has 3"},
      {"non-finite weight: set_active", [&] { layer.set_active({{"a", std::nan("")}}); }, 0, "not finite"},
      {"weight listed twice", [&] { layer.set_active({{"a", 1.0}, {"a", 2.0}}); }, 0, "listed twice"},
      {"non-finite multiplier", [&] { layer.set_multiplier("a", INFINITY); }, 0, "multiplier"},
      {"non-finite weight: combine", [&] { (void)lora::combine_cat(nan_w); }, 0, "weight 0 = nan"},
      {"infinite weight: combine", [&] { (void)lora::combine_svd(inf_w); }, 0, "weight 1 = inf"},
      {"rank mismatch for linear", [&] { (void)lora::combine_linear(mixed); }, 2, "delta 1 has rank 4"},
      {"shape mismatch in a combination", [&] { (void)lora::combine_cat(shapes); }, 1, "delta 1 is [out, in] = [41, 64]"},
      {"empty combination", [&] { (void)lora::combine_svd(none); }, 0, "no adapters"},
      {"cat rank over min(out, in)", [&] { (void)lora::combine_cat(big); }, 2, "sum to 48 > min(out, in) = 40"},
      {"svd rank over min(out, in)", [&] { (void)lora::combine_svd(mixed, 41); }, 2, "rank 41"},
      {"svd clamp outside [0, 1]", [&] { (void)lora::combine_svd(mixed, 2, 1.5); }, 0, "clamp = 1.5"},
      {"forward: X columns", [&] { layer.forward(Xbad, Y); }, 1, "X has 65 columns"},
      {"forward: Y shape", [&] { layer.forward(X, Ybad); }, 1, "Y is [3, 40]"},
      {"forward: X and Y overlap",
       [&] {
         RowMatrix<float> buf(2, t.in);
         layer.forward(buf, Eigen::Map<RowMatrix<float>>(buf.data(), 2, t.out));
       },
       1, "share memory"},
      {"merge while merged",
       [&] {
         lora::MultiAdapterLinear<RowMatrix<float>> m{W};
         m.add("a", t.a);
         m.set_active("a");
         m.merge_active();
         m.merge_active();
       },
       0, "already merged (a)"},
      {"set_active while merged",
       [&] {
         lora::MultiAdapterLinear<RowMatrix<float>> m{W};
         m.add("a", t.a);
         m.merge_active();
         m.set_active("a");
       },
       0, "merged"},
  };
  for (const Case& c : cases) {
    INFO(c.what);
    const std::string msg = message_of(c.f);
    INFO(msg);
    switch (c.type) {
      case 0: CHECK_THROWS_AS(c.f(), lora::ValueError); break;
      case 1: CHECK_THROWS_AS(c.f(), lora::ShapeError); break;
      default: CHECK_THROWS_AS(c.f(), lora::RankError); break;
    }
    CHECK(msg.find(c.needle) != std::string::npos);
  }
  // Nothing above changed the layer.
  CHECK(layer.names() == std::vector<std::string>{"a", "b"});
  CHECK(layer.active().empty());
}
