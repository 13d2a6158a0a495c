// Conformance: AdaptedEmbedding on the backend under test, against the long-double
// references of conformance.hpp.
#include "conformance.hpp"

#include <lora/adapted_embedding.hpp>

namespace {

/// Rows ids[i] of m (an exact copy: a gather rounds nothing).
Host<float> embedding_rows(const Host<float>& m, const std::vector<std::int64_t>& ids) {
  Host<float> out(static_cast<index_t>(ids.size()), m.cols());
  for (std::size_t i = 0; i < ids.size(); ++i) out.row(static_cast<index_t>(i)) = m.row(static_cast<index_t>(ids[i]));
  return out;
}

}  // namespace

TEST_CASE("AdaptedEmbedding forward, backward, merge equal the reference", "[conformance][embedding]") {
  using T = float;
  const index_t vocab = 130, dim = 20, r = 5;  // 130 rows: more than one 64- or 128-thread block
  const Host<T> E = random_host<T>(vocab, dim, 41);
  lora::AdaptedEmbedding host{E, lora::LowRankDelta<T>{dim, vocab, r, {.alpha = 3}}};
  host.delta().init(lora::init::UniformBoth{}, 42);  // B non-zero: the term shows
  auto dev = on_backend(host);
  const Host<T> A = host.delta().A(), B = host.delta().B();
  const ref::LD s = host.delta().scale();

  // Duplicates (7 three times, 0 and 129 twice), the first and the last id.
  std::vector<std::int64_t> ids = {0, 129, 7, 7, 64, 0, 100, 7, 129};
  for (std::int64_t i = 0; i < 60; ++i) ids.push_back((i * i * 7 + 3) % vocab);
  const auto n = static_cast<index_t>(ids.size());
  const std::span<const std::int64_t> id_span(ids);
  const Host<T> H = embedding_rows(Host<T>(A.transpose()), ids);  // (n, r) = A[:, ids]^T
  // Y = E[ids] + s H B^T
  const ref::Sum y_ref = ref::gemm_nt(s, H, B, 1, embedding_rows(E, ids));

  SECTION("forward: returned, into Y with a reused workspace, int32 ids") {
    check_close<T>(on_host(dev.forward(id_span)), y_ref, r);
    decltype(dev)::workspace ws;
    BMatrix<T> y = on_backend(Host<T>::Constant(n, dim, 42.0f));
    dev.forward(id_span, y, ws);
    check_close<T>(on_host(y), y_ref, r);
    const std::vector<std::int32_t> ends = {0, 129};  // ids[0], ids[1]: a smaller batch, the same workspace
    BMatrix<T> y2 = on_backend(Host<T>::Zero(2, dim));
    dev.forward(std::span<const std::int32_t>(ends), y2, ws);
    check_close<T>(on_host(y2), ref::middle_rows(y_ref, 0, 2), r);
  }

  SECTION("backward: dB, dA scattered with duplicates summed, accumulate") {
    const Host<T> G = random_host<T>(n, dim, 43);
    // dA [r, vocab] = s (G B)^T onehot(ids): column t sums (G B)[i] over ids[i] = t.
    Host<T> onehot = Host<T>::Zero(n, vocab);
    for (index_t i = 0; i < n; ++i) onehot(i, static_cast<index_t>(ids[static_cast<std::size_t>(i)])) = 1;
    const ref::Sum gb = ref::product(1, G, false, B, false);
    const ref::Sum da_ref = ref::product(s, gb, true, onehot, false);
    const ref::Sum db_ref = ref::gemm_tn(s, G, H, 0, ref::Dense());
    const index_t terms = dim + n;  // G B's chain, then the duplicates' sum

    auto grads = dev.delta().make_gradients();
    const BMatrix<T> Gd = on_backend(G);
    dev.backward(id_span, Gd, grads);
    check_close<T>(on_host(grads.dA()), da_ref, terms);
    check_close<T>(on_host(grads.dB()), db_ref, n);
    index_t absent = 0;  // an id not in the batch: its column gets no term
    while (std::find(ids.begin(), ids.end(), absent) != ids.end()) ++absent;
    REQUIRE(absent < vocab);
    CHECK(on_host(grads.dA()).col(absent).isZero());

    dev.backward(id_span, Gd, grads, lora::train::BackwardOptions{.accumulate = true});
    check_close<T>(on_host(grads.dA()), ref::plus(da_ref, 1, da_ref), terms + 1);
    check_close<T>(on_host(grads.dB()), ref::plus(db_ref, 1, db_ref), n + 1);
  }

  SECTION("an id out of range: ValueError naming it and its position, Y untouched") {
    BMatrix<T> y = on_backend(Host<T>::Constant(3, dim, 42.0f));
    const std::vector<std::int64_t> bad = {3, 130, 5};
    CHECK_THROWS_AS(dev.forward(std::span<const std::int64_t>(bad), y), lora::ValueError);
    CHECK_THROWS_WITH(dev.forward(std::span<const std::int64_t>(bad), y),
                      Catch::Contains("id 130 at position 1 is outside [0, num_embeddings = 130)"));
    CHECK((on_host(y).array() == 42.0f).all());
    const std::vector<std::int32_t> negative = {-1};
    BMatrix<T> y1 = on_backend(Host<T>::Constant(1, dim, 42.0f));
    CHECK_THROWS_WITH(dev.forward(std::span<const std::int32_t>(negative), y1), Catch::Contains("id -1 at position 0"));
    CHECK((on_host(y1).array() == 42.0f).all());
    auto grads = dev.delta().make_gradients();
    BK::fill(grads.dA(), 5.0f);
    CHECK_THROWS_AS(dev.backward(std::span<const std::int64_t>(bad), on_backend(Host<T>::Zero(3, dim)), grads),
                    lora::ValueError);
    CHECK((on_host(grads.dA()).array() == 5.0f).all());
  }

  SECTION("merge, unmerge, merged_table, moves") {
    const ref::Sum merged = ref::plus(ref::product(s, A, true, B, true), 1, E);  // E + s A^T B^T
    check_close<T>(on_host(dev.merged_table()), merged, r);
    REQUIRE(dev.merge());
    REQUIRE_FALSE(dev.merge());
    check_close<T>(on_host(dev.table()), merged, r);
    check_close<T>(on_host(dev.merged_table()), merged, r);
    // Merged, forward gathers rows of E + s (B A)^T: the reference with the merge's bound.
    check_close<T>(on_host(dev.forward(id_span)), y_ref.value, y_ref.bound, r + 1);
    CHECK_THROWS_WITH(dev.transferred([](const auto& m) { return m; }), Catch::Contains("unmerge() it first"));
    dev.delta().set_multiplier(0.25);  // unmerge subtracts what merge added
    REQUIRE(dev.unmerge());
    REQUIRE_FALSE(dev.unmerge());
    check_close<T>(on_host(dev.table()), E, merged.bound, 2 * r);
    // Back to the host: the tensors as they are, bit for bit.
    const auto back = on_host(on_backend(host));
    CHECK(bit_identical(Host<T>(back.table()), E));
    CHECK(bit_identical(Host<T>(back.delta().A()), A));
    CHECK(bit_identical(Host<T>(back.delta().B()), B));
    CHECK(back.delta().scale() == host.delta().scale());
  }
}
