// AdaptedEmbedding (<lora/adapted_embedding.hpp>): forward, backward, merge
// against a plain long-double dense reference (table + s (B A)^T, rows
// gathered), finite differences, PEFT's own output on a saved embedding adapter
// (tests/fixtures/peft/embedding, scripts/gen_peft_fixtures.py), loralib's
// Embedding (tests/fixtures/loralib/embedding, scripts/gen_loralib_fixtures.py),
// and the typed errors of bad ids and shapes.
#include <catch2/catch.hpp>

#include "support.hpp"

#include <lora/adapted_embedding.hpp>
#include <lora/io/peft.hpp>

#include <cstdint>
#include <algorithm>
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
/// A delta in PEFT's embedding layout with random A [r, V] and B [dim, r] (both
/// non-zero, unlike PEFT's init, so the term is exercised).
template <class T, int R>
lora::LowRankDelta<T, R> make_delta(index_t dim, index_t vocab, index_t rank, std::uint64_t seed,
                                    lora::DeltaOptions o = {.alpha = 6}) {
  lora::LowRankDelta<T, R> d(dim, vocab, rank, o);
  fill(d.A(), seed);
  fill(d.B(), seed + 1);
  return d;
}

/// The effective table in long double: E + s (B A)^T.
template <class E, class D>
RowMatrixLD dense_table(const E& table, const D& d) {
  const RowMatrixLD a = d.A().template cast<LD>(), b = d.B().template cast<LD>();
  return table.template cast<LD>() + static_cast<LD>(d.scale()) * (b * a).transpose();
}

template <class Id>
RowMatrixLD gather(const RowMatrixLD& full, const std::vector<Id>& ids) {
  RowMatrixLD out(static_cast<index_t>(ids.size()), full.cols());
  for (std::size_t i = 0; i < ids.size(); ++i) out.row(static_cast<index_t>(i)) = full.row(static_cast<index_t>(ids[i]));
  return out;
}
const std::vector<std::int64_t> batch_ids = {0, 5, 3, 5, 12, 0, 5, 12};  // duplicates, first and last of V = 13

}  // namespace

TEST_CASE("AdaptedEmbedding forward equals the dense reference (static and dynamic rank)", "[embedding]") {
  const index_t V = 13, dim = 7;
  RowMatrix<double> table(V, dim);
  fill(table, 1);

  SECTION("static rank, float") {
    RowMatrix<float> tf = table.cast<float>();
    lora::AdaptedEmbedding emb{tf, make_delta<float, 4>(dim, V, 4, 10)};
    STATIC_REQUIRE(decltype(emb)::rank_at_compile_time == 4);
    const RowMatrixLD ref = gather(dense_table(tf, emb.delta()), batch_ids);
    const RowMatrix<float> y = emb.forward(batch_ids);
    CHECK(rel_err(y, ref) <= 4 * std::numeric_limits<float>::epsilon());
    CHECK(rel_err(y, ref) > 0);  // the reference is independent: float rounding shows
    // The delta term is not negligible: the adapted rows differ from the table's.
    CHECK(rel_err(y, gather(RowMatrixLD(tf.cast<LD>()), batch_ids)) > 0.1);
  }
  SECTION("dynamic rank, double, int64 and int32 ids, workspace, into a block") {
    lora::AdaptedEmbedding emb{table, make_delta<double, lora::dynamic>(dim, V, 3, 20)};
    const RowMatrixLD ref = gather(dense_table(table, emb.delta()), batch_ids);
    CHECK(rel_err(emb.forward(batch_ids), ref) <= 8 * std::numeric_limits<double>::epsilon());

    const std::vector<std::int32_t> ids32(batch_ids.begin(), batch_ids.end());
    CHECK(emb.forward(ids32) == emb.forward(batch_ids));

    decltype(emb)::workspace ws;
    RowMatrix<double> big = RowMatrix<double>::Constant(static_cast<index_t>(batch_ids.size()) + 2, dim, 42.0);
    emb.forward(batch_ids, big.middleRows(1, static_cast<index_t>(batch_ids.size())), ws);
    CHECK(big.row(0).isConstant(42.0));
    CHECK(big.row(big.rows() - 1).isConstant(42.0));
    CHECK(rel_err(RowMatrix<double>(big.middleRows(1, static_cast<index_t>(batch_ids.size()))), ref) <=
          8 * std::numeric_limits<double>::epsilon());
    // the same workspace again, a smaller batch: first and last id alone
    const std::vector<std::int64_t> ends = {V - 1, 0};
    RowMatrix<double> y2(2, dim);
    emb.forward(ends, y2, ws);
    CHECK(rel_err(y2, gather(dense_table(table, emb.delta()), ends)) <= 8 * std::numeric_limits<double>::epsilon());
  }
  SECTION("n = 0") {
    lora::AdaptedEmbedding emb{table, make_delta<double, 2>(dim, V, 2, 30)};
    const RowMatrix<double> y = emb.forward(std::span<const std::int64_t>{});
    CHECK(y.rows() == 0);
    CHECK(y.cols() == dim);
    RowMatrix<double> empty(0, dim);
    emb.forward(std::vector<std::int32_t>{}, empty);
  }
  SECTION("a read-only Map over the caller's table, no copy") {
    const RowMatrix<double> owned = table;
    lora::AdaptedEmbedding emb{Eigen::Map<const RowMatrix<double>>(owned.data(), V, dim),
                               make_delta<double, 3>(dim, V, 3, 40)};
    CHECK(emb.table().data() == owned.data());
    CHECK(rel_err(emb.forward(batch_ids), gather(dense_table(owned, emb.delta()), batch_ids)) <=
          8 * std::numeric_limits<double>::epsilon());
    CHECK(rel_err(emb.merged_table(), dense_table(owned, emb.delta())) <= 8 * std::numeric_limits<double>::epsilon());
  }
  SECTION("multiplier and rslora scale the term as in the delta") {
    auto d = make_delta<double, 3>(dim, V, 3, 50, {.alpha = 4, .rule = lora::Scaling::rslora, .multiplier = 0.5});
    lora::AdaptedEmbedding emb{table, d};
    CHECK(emb.delta().scale() == Approx(0.5 * 4 / std::sqrt(3.0)).epsilon(1e-15));
    CHECK(rel_err(emb.forward(batch_ids), gather(dense_table(table, emb.delta()), batch_ids)) <=
          8 * std::numeric_limits<double>::epsilon());
  }
}

TEST_CASE("AdaptedEmbedding forward is const and thread-safe", "[embedding]") {
  const index_t V = 50, dim = 24;
  RowMatrix<float> table(V, dim);
  fill(table, 2);
  const lora::AdaptedEmbedding emb{table, make_delta<float, 4>(dim, V, 4, 3)};
  std::vector<std::int64_t> ids(300);
  for (std::size_t i = 0; i < ids.size(); ++i) ids[i] = static_cast<std::int64_t>((i * 7) % V);
  const RowMatrix<float> want = emb.forward(ids);
  std::vector<int> ok(4, 0);
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t)
    threads.emplace_back([&, t] {
      bool same = true;
      for (int k = 0; k < 20; ++k) same = same && emb.forward(ids) == want;
      ok[static_cast<std::size_t>(t)] = same ? 1 : 0;
    });
  for (auto& t : threads) t.join();
  CHECK(ok == std::vector<int>(4, 1));
}

TEST_CASE("AdaptedEmbedding over bf16 and NF4 tables decodes only the looked-up rows", "[embedding]") {
  const index_t V = 40, dim = 16;
  RowMatrix<float> table(V, dim);
  fill(table, 4);
  const auto d = make_delta<float, 4>(dim, V, 4, 5);
  const std::vector<std::int64_t> ids = {39, 0, 17, 17, 2};

  SECTION("bf16") {
    const RowMatrix<Eigen::bfloat16> t16 = table.cast<Eigen::bfloat16>();
    const RowMatrix<float> widened = t16.cast<float>();
    lora::AdaptedEmbedding e16{t16, d};
    lora::AdaptedEmbedding ef{widened, d};
    STATIC_REQUIRE(decltype(e16)::base_is_quantized);
    CHECK(e16.forward(ids) == ef.forward(ids));  // widening is exact; same products after
    CHECK(e16.merged_table() == ef.merged_table());
    CHECK(rel_err(e16.forward(ids), gather(dense_table(widened, d), ids)) <= 4 * std::numeric_limits<float>::epsilon());
  }
  SECTION("NF4") {
    const lora::NF4Matrix q = lora::NF4Matrix::quantize(table);
    const RowMatrix<float> deq = q.dequantize();
    lora::AdaptedEmbedding eq{q, d};
    lora::AdaptedEmbedding ef{deq, d};
    CHECK(eq.forward(ids) == ef.forward(ids));
    CHECK(eq.merged_table() == ef.merged_table());
    CHECK(rel_err(eq.forward(ids), gather(dense_table(deq, d), ids)) <= 4 * std::numeric_limits<float>::epsilon());
  }
}

TEST_CASE("AdaptedEmbedding backward equals the dense reference and finite differences", "[embedding]") {
  const index_t V = 11, dim = 6;
  RowMatrix<double> table(V, dim);
  fill(table, 6);
  const std::vector<std::int64_t> ids = {3, 10, 3, 0, 3, 7};  // 3 three times: its dA column accumulates
  const index_t n = static_cast<index_t>(ids.size());
  RowMatrix<double> g(n, dim);
  fill(g, 7);

  auto check_layer = [&]<int R>(index_t rank) {
    lora::AdaptedEmbedding emb{table, make_delta<double, R>(dim, V, rank, 8)};
    auto grads = emb.delta().make_gradients();
    fill(grads.dA(), 99);  // overwritten, not accumulated into
    fill(grads.dB(), 98);
    emb.backward(ids, g, grads);

    // Dense reference: L = <G, Y>, Y = onehot(ids) (E + s A^T B^T)
    //   dA = s B^T G^T onehot(ids) -> [r, V],   dB = s G^T onehot(ids) A^T -> [dim, r]
    const LD s = emb.delta().scale();
    RowMatrixLD onehot = RowMatrixLD::Zero(n, V);
    for (index_t i = 0; i < n; ++i) onehot(i, ids[static_cast<std::size_t>(i)]) = 1;
    const RowMatrixLD a = emb.delta().A().template cast<LD>(), b = emb.delta().B().template cast<LD>(),
                      gl = g.cast<LD>();
    const RowMatrixLD da_ref = s * b.transpose() * gl.transpose() * onehot;
    const RowMatrixLD db_ref = s * gl.transpose() * onehot * a.transpose();
    CHECK(rel_err(grads.dA(), da_ref) <= 16 * std::numeric_limits<double>::epsilon());
    CHECK(rel_err(grads.dB(), db_ref) <= 16 * std::numeric_limits<double>::epsilon());
    // Columns of ids outside the batch are exactly zero.
    for (index_t t : {1, 2, 4, 5, 6, 8, 9}) CHECK(grads.dA().col(t).isZero(0.0));
    // Column 3 is the sum of its three occurrences.
    const RowMatrixLD gb = s * gl * b;
    CHECK(static_cast<double>((grads.dA().col(3).template cast<LD>() -
                               (gb.row(0) + gb.row(2) + gb.row(4)).transpose())
                                  .cwiseAbs()
                                  .maxCoeff()) <= 1e-14);

    // Finite differences of L = <G, forward(ids)> (bilinear in A, B: central
    // differences are exact up to rounding).
    const double h = 1e-4;
    auto loss = [&](const auto& layer) { return (layer.forward(ids).array() * g.array()).sum(); };
    double worst = 0;
    for (index_t k = 0; k < rank; ++k)
      for (index_t t = 0; t < V; ++t) {
        auto plus = emb, minus = emb;
        plus.delta().A()(k, t) += h;
        minus.delta().A()(k, t) -= h;
        worst = std::max(worst, std::abs((loss(plus) - loss(minus)) / (2 * h) - grads.dA()(k, t)));
      }
    for (index_t j = 0; j < dim; ++j)
      for (index_t k = 0; k < rank; ++k) {
        auto plus = emb, minus = emb;
        plus.delta().B()(j, k) += h;
        minus.delta().B()(j, k) -= h;
        worst = std::max(worst, std::abs((loss(plus) - loss(minus)) / (2 * h) - grads.dB()(j, k)));
      }
    INFO("max |finite difference - analytic| = " << worst);
    CHECK(worst <= 1e-8);

    // accumulate: a second backward adds the same again
    const RowMatrix<double> da1 = grads.dA(), db1 = grads.dB();
    emb.backward(ids, g, grads, {.accumulate = true});
    CHECK((grads.dA() - 2 * da1).cwiseAbs().maxCoeff() <= 1e-13);
    CHECK((grads.dB() - 2 * db1).cwiseAbs().maxCoeff() <= 1e-13);

    // n = 0: zero gradients (or unchanged when accumulating)
    emb.backward(std::span<const std::int64_t>{}, RowMatrix<double>(0, dim), grads, {.accumulate = true});
    CHECK((grads.dA() - 2 * da1).cwiseAbs().maxCoeff() <= 1e-13);
    emb.backward(std::span<const std::int64_t>{}, RowMatrix<double>(0, dim), grads);
    CHECK(grads.dA().isZero(0.0));
    CHECK(grads.dB().isZero(0.0));
  };
  check_layer.operator()<3>(3);
  check_layer.operator()<lora::dynamic>(2);
}

TEST_CASE("AdaptedEmbedding trains with the library's optimizers", "[embedding]") {
  const index_t V = 9, dim = 5;
  RowMatrix<float> table(V, dim);
  fill(table, 11);
  lora::AdaptedEmbedding emb{table, make_delta<float, 2>(dim, V, 2, 12)};
  lora::train::Gradients<decltype(emb)> grads(emb);
  lora::train::SGD<float> opt({.lr = 0.1});
  opt.add(emb, grads, "embed");
  const std::vector<std::int32_t> ids = {1, 4, 4};
  RowMatrix<float> g(3, dim);
  fill(g, 13);
  const RowMatrix<float> a0 = emb.delta().A(), b0 = emb.delta().B();
  emb.backward(ids, g, grads);
  opt.step();
  CHECK((emb.delta().A() - (a0 - 0.1f * grads.dA())).cwiseAbs().maxCoeff() <= 1e-6f);
  CHECK((emb.delta().B() - (b0 - 0.1f * grads.dB())).cwiseAbs().maxCoeff() <= 1e-6f);
  CHECK(emb.delta().A().col(0) == a0.col(0));  // an id outside the batch: no gradient, no step
  CHECK(emb.delta().A().col(4) != a0.col(4));
  // The optimizer refuses to step a merged layer, as for AdaptedLinear.
  emb.merge();
  CHECK_THROWS_AS(opt.step(), lora::Error);
}

TEST_CASE("AdaptedEmbedding merge / unmerge / merged_table", "[embedding]") {
  const index_t V = 13, dim = 7;
  RowMatrix<float> table(V, dim);
  fill(table, 21);
  const RowMatrix<float> original = table;
  lora::AdaptedEmbedding emb{table, make_delta<float, 3>(dim, V, 3, 22)};
  const RowMatrixLD ref = dense_table(original, emb.delta());
  const RowMatrix<float> before = emb.forward(batch_ids);
  CHECK(rel_err(emb.merged_table(), ref) <= 4 * std::numeric_limits<float>::epsilon());

  CHECK(emb.merge());
  CHECK(emb.merged());
  CHECK_FALSE(emb.merge());
  CHECK(rel_err(emb.table(), ref) <= 4 * std::numeric_limits<float>::epsilon());
  CHECK(rel_err(emb.forward(batch_ids), gather(ref, batch_ids)) <= 4 * std::numeric_limits<float>::epsilon());
  CHECK((emb.forward(batch_ids) - before).cwiseAbs().maxCoeff() <= 4 * std::numeric_limits<float>::epsilon() * 4);
  CHECK(emb.merged_table() == emb.table());  // merged: the table already holds the delta
  // unmerge subtracts the s of merge() even if the multiplier changed meanwhile
  emb.delta().set_multiplier(3.0);
  CHECK(emb.unmerge());
  CHECK_FALSE(emb.unmerge());
  CHECK_FALSE(emb.merged());
  const double restore = (emb.table() - original).cwiseAbs().maxCoeff();
  INFO("max |unmerged table - original| = " << restore);
  CHECK(restore <= 4 * std::numeric_limits<float>::epsilon() * original.cwiseAbs().maxCoeff() * 4);

  SECTION("a writable Map: merge writes the caller's buffer") {
    RowMatrix<float> buf = original;
    lora::AdaptedEmbedding m{Eigen::Map<RowMatrix<float>>(buf.data(), V, dim), make_delta<float, 3>(dim, V, 3, 22)};
    m.merge();
    CHECK(rel_err(buf, ref) <= 4 * std::numeric_limits<float>::epsilon());
  }
}

TEST_CASE("AdaptedEmbedding equals PEFT's embedding LoRA on the saved fixture", "[embedding][peft]") {
  const fs::path dir = fs::path(LORA_TEST_FIXTURE_DIR) / "peft";
  const auto adapter = lora::io::load_peft<float>(dir / "embedding");
  const auto& m = adapter.module("model.embed_tokens");
  REQUIRE(m.embedding);
  const auto base = lora::io::SafetensorsFile::open(dir / "base.safetensors");
  const auto inputs = lora::io::SafetensorsFile::open(dir / "inputs.safetensors");
  const auto ref = lora::io::SafetensorsFile::open(dir / "ref" / "embedding.safetensors");
  const auto ids_view = inputs.view<std::int64_t>("ids");
  const std::vector<std::int64_t> ids(ids_view.data(), ids_view.data() + ids_view.size());
  const RowMatrix<float> want = ref.read<float>("y.model.embed_tokens");
  const RowMatrixLD want_ld = want.cast<LD>();

  // The table viewed in place in the file's mapping; the delta as PEFT stores it.
  lora::AdaptedEmbedding emb{base.view<float>("model.embed_tokens.weight"), m.delta()};
  CHECK(emb.num_embeddings() == 17);
  CHECK(emb.embedding_dim() == 5);
  CHECK(emb.rank() == 3);
  const double err = rel_err(emb.forward(ids), want_ld);
  INFO("rel err vs PEFT = " << err);
  CHECK(err <= 1e-6);
  // A static rank over the same factors gives the same output.
  lora::AdaptedEmbedding emb3{base.read<float>("model.embed_tokens.weight"),
                              lora::LowRankDelta<float, 3>(m.B, m.A, m.options)};
  CHECK(rel_err(emb3.forward(ids), want_ld) <= 1e-6);
  // The adapter is not a no-op on these ids (so the check can fail).
  RowMatrix<float> plain(static_cast<index_t>(ids.size()), 5);
  const RowMatrix<float> t = base.read<float>("model.embed_tokens.weight");
  for (std::size_t i = 0; i < ids.size(); ++i) plain.row(static_cast<index_t>(i)) = t.row(ids[i]);
  CHECK(rel_err(plain, want_ld) > 1e-3);
  // merged: the same to rounding
  CHECK(emb3.merge());
  CHECK(rel_err(emb3.forward(ids), want_ld) <= 1e-6);
}

TEST_CASE("AdaptedEmbedding equals loralib's Embedding on the saved fixture", "[embedding][loralib]") {
  // loralib.Embedding(11, 6, r=3, lora_alpha=5) with random table, A and B
  // (scripts/gen_loralib_fixtures.py): lora_A [r, num_embeddings], lora_B [dim, r],
  // the layout AdaptedEmbedding takes as is.
  const auto f = lora::io::SafetensorsFile::open(fs::path(LORA_TEST_FIXTURE_DIR) / "loralib" / "embedding.safetensors");
  const auto ids_view = f.view<std::int64_t>("ids");
  const std::vector<std::int64_t> ids(ids_view.data(), ids_view.data() + ids_view.size());
  REQUIRE(ids == std::vector<std::int64_t>{3, 0, 10, 3, 7, 0, 3, 10});  // duplicates and both boundary ids
  const double alpha = std::stod(f.metadata().at("lora_alpha"));
  const RowMatrix<float> table = f.read<float>("weight"), g = f.read<float>("g");
  const auto want = [&](const char* name) { return RowMatrixLD(f.read<float>(name).cast<LD>()); };

  auto check = [&]<int R>() {
    lora::AdaptedEmbedding emb{table, lora::LowRankDelta<float, R>(f.read<float>("lora_B"), f.read<float>("lora_A"),
                                                                   {.alpha = alpha})};
    CHECK(emb.num_embeddings() == 11);
    CHECK(emb.embedding_dim() == 6);
    CHECK(emb.delta().scale() == Approx(5.0 / 3.0));  // loralib's scaling = lora_alpha / r

    const double ey = rel_err(emb.forward(ids), want("y"));
    INFO("forward rel err vs loralib = " << ey);
    CHECK(ey <= 1e-5);
    CHECK(rel_err(gather(RowMatrixLD(table.cast<LD>()), ids), want("y")) > 1e-3);  // the delta shows

    auto grads = emb.delta().make_gradients();
    emb.backward(ids, g, grads);
    const double ea = rel_err(grads.dA(), want("grad_lora_A")), eb = rel_err(grads.dB(), want("grad_lora_B"));
    INFO("dA rel err = " << ea << ", dB rel err = " << eb);
    CHECK(ea <= 1e-5);
    CHECK(eb <= 1e-5);
    // Ids 3 (three times), 0 and 10 (twice) accumulate; ids not in the batch get exactly zero, as in torch.
    const RowMatrix<float> ta = f.read<float>("grad_lora_A");
    for (index_t t : {1, 2, 4, 5, 6, 8, 9}) {
      CHECK(grads.dA().col(t).isZero(0.0f));
      CHECK(ta.col(t).isZero(0.0f));
    }
    CHECK_FALSE(ta.col(3).isZero(0.0f));

    // loralib's model.eval() merges (weight += (B A)^T * scaling)
    const double et = rel_err(emb.merged_table(), want("merged_weight"));
    INFO("merged table rel err = " << et);
    CHECK(et <= 1e-5);
    CHECK(emb.merge());
    CHECK(rel_err(emb.table(), want("merged_weight")) <= 1e-5);
    CHECK(rel_err(emb.forward(ids), want("y_merged")) <= 1e-5);
  };
  check.operator()<3>();
  check.operator()<lora::dynamic>();
}

TEST_CASE("AdaptedEmbedding errors", "[embedding][errors]") {
  const index_t V = 13, dim = 7;
  RowMatrix<float> table(V, dim);
  fill(table, 31);
  lora::AdaptedEmbedding emb{table, make_delta<float, 3>(dim, V, 3, 32)};
  RowMatrix<float> y = RowMatrix<float>::Constant(4, dim, 7.0f);
  const RowMatrix<float> y0 = y;

  struct Case {
    std::string name;
    std::function<void()> f;
    std::vector<std::string> needles;
    bool value_error;
  };
  const std::vector<Case> cases = {
      {"id -1 at position 0", [&] { emb.forward(std::vector<std::int64_t>{-1, 2, 3, 4}, y); },
       {"AdaptedEmbedding::forward", "id -1", "position 0", "num_embeddings = 13"}, true},
      {"id == num_embeddings at position 2", [&] { emb.forward(std::vector<std::int64_t>{0, 1, 13, 4}, y); },
       {"id 13", "position 2", "[0, num_embeddings = 13)"}, true},
      {"int32 id out of range", [&] { emb.forward(std::vector<std::int32_t>{0, 1, 2, 1000}, y); },
       {"id 1000", "position 3"}, true},
      {"huge int64 id", [&] { emb.forward(std::vector<std::int64_t>{0, 1, 2, std::int64_t(1) << 40}, y); },
       {"id 1099511627776", "position 3"}, true},
      {"Y too few rows", [&] {
         RowMatrix<float> small(3, dim);
         emb.forward(std::vector<std::int64_t>{0, 1, 2, 3}, small);
       },
       {"AdaptedEmbedding::forward", "Y is [3, 7]", "expected [n, dim] = [4, 7]"}, false},
      {"Y wrong columns", [&] {
         RowMatrix<float> wide(4, dim + 1);
         emb.forward(std::vector<std::int64_t>{0, 1, 2, 3}, wide);
       },
       {"Y is [4, 8]", "[4, 7]"}, false},
      {"backward: id out of range", [&] {
         auto gr = emb.delta().make_gradients();
         emb.backward(std::vector<std::int64_t>{0, 13}, RowMatrix<float>(RowMatrix<float>::Zero(2, dim)), gr);
       },
       {"AdaptedEmbedding::backward", "id 13", "position 1"}, true},
      {"backward: G wrong shape", [&] {
         auto gr = emb.delta().make_gradients();
         emb.backward(std::vector<std::int64_t>{0, 1}, RowMatrix<float>(RowMatrix<float>::Zero(3, dim)), gr);
       },
       {"G is [3, 7]", "expected [n, dim] = [2, 7]"}, false},
      {"backward: gradients of another shape", [&] {
         lora::LowRankGradients<float, 3> gr(dim, V + 1, 3);
         emb.backward(std::vector<std::int64_t>{0, 1}, RowMatrix<float>(RowMatrix<float>::Zero(2, dim)), gr);
       },
       {"dA [3, 14]", "expected dA [r, num_embeddings] = [3, 13]"}, false},
      {"delta transposed (linear layout)", [&] { lora::AdaptedEmbedding bad{table, make_delta<float, 3>(V, dim, 3, 1)}; },
       {"AdaptedEmbedding", "table is [num_embeddings, dim] = [13, 7]", "delta is [out, in] = [13, 7]",
        "[dim, num_embeddings] = [7, 13]"},
       false},
      {"delta of another vocabulary", [&] { lora::AdaptedEmbedding bad{table, make_delta<float, 3>(dim, V - 1, 3, 1)}; },
       {"[13, 7]", "delta is [out, in] = [7, 12]"}, false},
  };
  for (const auto& c : cases) {
    INFO(c.name);
    const std::string msg = message_of(c.f);
    INFO(msg);
    for (const auto& needle : c.needles) CHECK(msg.find(needle) != std::string::npos);
    if (c.value_error)
      CHECK_THROWS_AS(c.f(), lora::ValueError);
    else
      CHECK_THROWS_AS(c.f(), lora::ShapeError);
    CHECK(y == y0);  // nothing half-written
  }

  SECTION("a factor resized after construction") {
    emb.delta().A().resize(3, V + 2);
    CHECK_THROWS_WITH(emb.forward(std::vector<std::int64_t>{0}),
                      Catch::Contains("AdaptedEmbedding::forward") && Catch::Contains("delta is [out, in] = [7, 15]"));
    CHECK_THROWS_AS(emb.merged_table(), lora::ShapeError);
    CHECK_THROWS_AS(emb.merge(), lora::ShapeError);
    CHECK(emb.table() == table);
  }
}
