// PackedMatrix: a frozen fp32 base packed once for the CPU GEMM kernels
// (backend/eigen/packed.hpp). The products are checked against long-double
// loops over the dense W; the layer against the same layer over the dense W.
#include <lora/lora.hpp>

#include <catch2/catch.hpp>

#include <cmath>
#include <limits>
#include <vector>

#include "support.hpp"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

using lora::index_t;
using lora::PackedMatrix;
using lora::RowMatrix;
using Traits = lora::quantized_traits<PackedMatrix>;
namespace train = lora::train;

/// beta Y0 + alpha X W[r0 : r0 + nr]^T in long double.
RowMatrix<long double> ref_nt(const RowMatrix<float>& w, index_t r0, index_t nr, float alpha,
                              const RowMatrix<float>& x, float beta, const RowMatrix<float>& y0) {
  RowMatrix<long double> y(x.rows(), nr);
  for (index_t t = 0; t < x.rows(); ++t)
    for (index_t o = 0; o < nr; ++o) {
      long double s = 0;
      for (index_t c = 0; c < w.cols(); ++c) s += (long double)x(t, c) * w(r0 + o, c);
      y(t, o) = (beta == 0.0f ? 0.0L : (long double)beta * y0(t, o)) + (long double)alpha * s;
    }
  return y;
}

/// beta D0 + alpha G W[r0 : r0 + nr] in long double (with r0 = 0, nr = W's
/// rows: any product beta C0 + alpha A B).
RowMatrix<long double> ref_nn(const RowMatrix<float>& w, index_t r0, index_t nr, float alpha,
                              const RowMatrix<float>& g, float beta, const RowMatrix<float>& d0) {
  RowMatrix<long double> d(g.rows(), w.cols());
  for (index_t t = 0; t < g.rows(); ++t)
    for (index_t c = 0; c < w.cols(); ++c) {
      long double s = 0;
      for (index_t o = 0; o < nr; ++o) s += (long double)g(t, o) * w(r0 + o, c);
      d(t, c) = (beta == 0.0f ? 0.0L : (long double)beta * d0(t, c)) + (long double)alpha * s;
    }
  return d;
}

/// fp32 sums of `depth` products of values in [-1, 1): relative error well
/// under depth * eps; a wrong index or a lost tile gives O(1).
double bound(index_t depth) { return 4.0 * double(std::max<index_t>(depth, 1)) * 6e-8 + 1e-7; }

}  // namespace

TEST_CASE("PackedMatrix packs W into panels of 32 rows and unpacks it exactly", "[packed]") {
  for (const auto& [out, in] : {std::pair<index_t, index_t>{1, 1}, {31, 5}, {32, 7}, {33, 300}, {70, 64}}) {
    RowMatrix<float> W(out, in);
    support::fill(W, 1);
    const PackedMatrix P(W);
    CHECK(P.rows() == out);
    CHECK(P.cols() == in);
    CHECK(P.panels() == (out + 31) / 32);
    CHECK(P.storage_bytes() == std::size_t(P.panels() * 32 * in) * sizeof(float));
    CHECK(P.to_dense() == W);
    CHECK(P(out - 1, in - 1) == W(out - 1, in - 1));
    // The layout the kernels read: W[32 p + j, k] at panel(p)[k * 32 + j], padding zero.
    CHECK(P.panel(0)[(in - 1) * 32 + std::min<index_t>(out, 32) - 1] == W(std::min<index_t>(out, 32) - 1, in - 1));
    if (out % 32 != 0) CHECK(P.panel(P.panels() - 1)[31] == 0.0f);
  }
  // A column-major source and an expression pack the same.
  Eigen::MatrixXf Wc(40, 9);
  support::fill(Wc, 2);
  CHECK(PackedMatrix(Wc).to_dense() == RowMatrix<float>(Wc));
  CHECK(PackedMatrix(2.0f * Wc).to_dense() == RowMatrix<float>(2.0f * Wc));
}

TEST_CASE("Packed products equal long-double loops for every tail of tokens, panels and depth", "[packed]") {
  // Depths across the 256-deep blocks; token counts across the 12-token tiles
  // and their 8/4/2/1 tails; outputs across 32-row panels; alpha and beta. The
  // backward's token panels: one vector (n <= 16 with AVX-512; its columns in
  // tiles of 16, then 8/4/2/1: in = 259 on two threads leaves 131 = 8 x 16 +
  // 2 + 1) or 32 tokens (n = 17, 31, 40).
  for (const index_t in : {index_t(1), index_t(7), index_t(259), index_t(600)})
    for (const index_t out : {index_t(1), index_t(31), index_t(33), index_t(70)})
      for (const index_t n : {index_t(0), index_t(1), index_t(2), index_t(5), index_t(13), index_t(16), index_t(17),
                              index_t(31), index_t(40)}) {
        CAPTURE(n, out, in);
        RowMatrix<float> W(out, in), X(n, in), G(n, out), Y(n, out), D(n, in);
        support::fill(W, 3);
        support::fill(X, 4);
        support::fill(G, 5);
        support::fill(Y, 6);
        support::fill(D, 7);
        const PackedMatrix P(W);
        const RowMatrix<float> Y0 = Y, D0 = D;
        Traits::gemm_nt(P, 0, out, 0.5f, X, 2.0f, Y);
        Traits::gemm_nn(P, 0, out, 0.5f, G, 2.0f, D);
        if (n == 0) continue;
        CHECK(support::rel_err(Y, ref_nt(W, 0, out, 0.5f, X, 2.0f, Y0)) <= bound(in));
        CHECK(support::rel_err(D, ref_nn(W, 0, out, 0.5f, G, 2.0f, D0)) <= bound(out));
      }
}

TEST_CASE("Packed products over a slice of W's rows (MergedLinear's q/k/v) and beta = 0", "[packed]") {
  const index_t out = 100, in = 300, n = 17;
  RowMatrix<float> W(out, in), X(n, in);
  support::fill(W, 8);
  support::fill(X, 9);
  const PackedMatrix P(W);
  for (const auto& [r0, nr] : {std::pair<index_t, index_t>{0, 32}, {5, 20}, {30, 40}, {64, 36}, {99, 1}}) {
    CAPTURE(r0, nr);
    RowMatrix<float> G(n, nr);
    support::fill(G, 10);
    // beta = 0 overwrites: NaN in the destination must not leak through.
    RowMatrix<float> Y = RowMatrix<float>::Constant(n, nr, std::numeric_limits<float>::quiet_NaN());
    RowMatrix<float> D = RowMatrix<float>::Constant(n, in, std::numeric_limits<float>::quiet_NaN());
    Traits::gemm_nt(P, r0, nr, 1.0f, X, 0.0f, Y);
    Traits::gemm_nn(P, r0, nr, 1.0f, G, 0.0f, D);
    CHECK(support::rel_err(Y, ref_nt(W, r0, nr, 1.0f, X, 0.0f, Y)) <= bound(in));
    CHECK(support::rel_err(D, ref_nn(W, r0, nr, 1.0f, G, 0.0f, D)) <= bound(nr));
    RowMatrix<float> rows(nr, in);
    Traits::assign(P, r0, nr, 1.0f, 0.0f, rows);
    CHECK(rows == W.middleRows(r0, nr));
  }
}

TEST_CASE("Packed products take strided and column-major operands, and run inside a parallel region",
          "[packed]") {
  const index_t out = 70, in = 300, n = 40;  // above the threshold of the threaded path
  RowMatrix<float> W(out, in), Xbig(n, in + 5), Ybig(n, out + 3);
  support::fill(W, 11);
  support::fill(Xbig, 12);
  Ybig.setZero();
  const PackedMatrix P(W);
  const auto X = Xbig.leftCols(in);     // a row stride larger than its width
  auto Y = Ybig.rightCols(out);         // likewise, written in place
  Traits::gemm_nt(P, 0, out, 1.0f, X, 0.0f, Y);
  const RowMatrix<float> Xd = X;
  CHECK(support::rel_err(Y, ref_nt(W, 0, out, 1.0f, Xd, 0.0f, RowMatrix<float>(Y))) <= bound(in));
  CHECK(Ybig.leftCols(3).isZero());

  Eigen::MatrixXf Gc(n, out), Dc(n, in);  // column-major: through a row-major copy
  support::fill(Gc, 13);
  Traits::gemm_nn(P, 0, out, 1.0f, Gc, 0.0f, Dc);
  CHECK(support::rel_err(Dc, ref_nn(W, 0, out, 1.0f, RowMatrix<float>(Gc), 0.0f, RowMatrix<float>(Dc))) <=
        bound(out));

  // Inside a parallel region each call runs on its own thread with its own
  // scratch (the multi-adapter layer calls products from its threads).
  std::vector<RowMatrix<float>> outs(4, RowMatrix<float>(n, out));
#ifdef _OPENMP
#pragma omp parallel for num_threads(2)
#endif
  for (int i = 0; i < 4; ++i) Traits::gemm_nt(P, 0, out, float(i + 1), Xd, 0.0f, outs[std::size_t(i)]);
  for (int i = 0; i < 4; ++i)
    CHECK(support::rel_err(outs[std::size_t(i)], ref_nt(W, 0, out, float(i + 1), Xd, 0.0f, outs[0])) <= bound(in));
}

TEST_CASE("AdaptedLinear over a PackedMatrix equals the layer over the dense W: forward, backward, merged W",
          "[packed]") {
  const index_t out = 70, in = 300, r = 4;
  RowMatrix<float> W(out, in), bias(1, out);
  support::fill(W, 14, -0.1, 0.1);
  lora::LowRankDelta<float, lora::dynamic> delta(out, in, r, {.alpha = 8.0});
  support::fill(delta.A(), 15);
  support::fill(delta.B(), 16);
  lora::AdaptedLinear packed{PackedMatrix(W), delta};
  lora::AdaptedLinear dense{W, delta};
  static_assert(!decltype(packed)::base_is_writable, "a packed base is frozen");

  for (const index_t n : {index_t(1), index_t(12), index_t(45)}) {
    CAPTURE(n);
    RowMatrix<float> X(n, in), G(n, out), Yp(n, out), Yd(n, out), dXp(n, in), dXd(n, in);
    support::fill(X, 17);
    support::fill(G, 18);
    packed.forward(X, Yp);
    dense.forward(X, Yd);
    CHECK(support::rel_err(Yp, Yd) <= bound(in));

    train::Tape<decltype(packed)> tp;
    train::Tape<decltype(dense)> td;
    train::Gradients<decltype(packed)> gp(packed, false);
    train::Gradients<decltype(dense)> gd(dense, false);
    train::forward(packed, X, Yp, tp);
    train::forward(dense, X, Yd, td);
    train::backward(packed, X, G, tp, gp, dXp);
    train::backward(dense, X, G, td, gd, dXd);
    CHECK(support::rel_err(dXp, dXd) <= bound(out));
    CHECK(support::rel_err(gp.dA(), gd.dA()) <= bound(n * out));
    CHECK(support::rel_err(gp.dB(), gd.dB()) <= bound(n * in));
  }
  const RowMatrix<float> merged = lora::merged_weight(packed);
  CHECK(support::rel_err(merged, lora::merged_weight(dense)) <= 1e-6);
  // Memory accounting counts the packed bytes: 96 rows (3 panels) of 300, not 70.
  CHECK(train::memory_usage(packed).frozen_bytes == 96.0 * 300 * 4);
  CHECK(train::memory_usage(dense).frozen_bytes == 70.0 * 300 * 4);
}

TEST_CASE("Rank updates C = beta C + alpha A B through the outer-product micro-kernel", "[packed][rank_update]") {
  // Depths 16..128 (LORA_EIGEN_RANK_UPDATE_{MIN,MAX}_DEPTH) take the
  // micro-kernel when C is large enough (merge's W += s B A, the backward's
  // dX += s (G B) A); the others stay with Eigen. Both must match the
  // long-double product.
  for (const index_t k : {index_t(8), index_t(16), index_t(17), index_t(37), index_t(128), index_t(129)})
    for (const index_t m : {index_t(1), index_t(13), index_t(200), index_t(203)})  // 203: 12-row tiles, 8 + 2 + 1
      for (const index_t n : {index_t(33), index_t(130), index_t(600)}) {
        CAPTURE(m, n, k);
        RowMatrix<float> A(m, k), B(k, n), C(m, n);
        support::fill(A, 19);
        support::fill(B, 20);
        support::fill(C, 21);
        const RowMatrix<float> C0 = C;
        lora::EigenBackend::gemm_nn(0.5f, A, B, 2.0f, C);
        CHECK(support::rel_err(C, ref_nn(B, 0, k, 0.5f, A, 2.0f, C0)) <= bound(k + 2));
      }
  // beta = 0 overwrites (NaN does not leak), into a strided block of a wider matrix.
  RowMatrix<float> A(300, 20), B(20, 100), big = RowMatrix<float>::Constant(300, 110, std::nanf(""));
  support::fill(A, 22);
  support::fill(B, 23);
  auto C = big.middleCols(5, 100);
  lora::EigenBackend::gemm_nn(1.0f, A, B, 0.0f, C);
  CHECK(support::rel_err(C, RowMatrix<float>(A * B)) <= bound(20));
  CHECK(big.leftCols(5).array().isNaN().all());
  CHECK(big.rightCols(5).array().isNaN().all());
}

TEST_CASE("Many-token products over a plain fp32 W go through the micro-kernel, W packed per call", "[packed][forward]") {
  // n from LORA_EIGEN_MICROKERNEL_MIN_TOKENS (72: the skinny kernel's tokens
  // end below it) and W at least 256 x 256 (LORA_EIGEN_MICROKERNEL_MIN_SIZE),
  // one tile of 12 tokens short at 200: 300 rows are 9 whole panels and one
  // of 12 rows; depth 531 is two 256-deep blocks and one of 19, whose 16-wide
  // register-transposed blocks leave a 3-column tail. alpha, beta, beta = 0
  // over NaN, and Y a column block of a wider matrix.
  const index_t m = 300, k = 531;
  RowMatrix<float> W(m, k);
  support::fill(W, 31);
  for (const index_t n : {index_t(LORA_EIGEN_MICROKERNEL_MIN_TOKENS), index_t(129), index_t(200)})
    for (const float beta : {0.0f, 2.0f}) {
      CAPTURE(n, beta);
      RowMatrix<float> X(n, k), big(n, m + 7);
      support::fill(X, 32);
      support::fill(big, 33);
      if (beta == 0.0f) big.setConstant(std::nanf(""));
      const RowMatrix<float> Y0 = big.middleCols(3, m);
      auto Y = big.middleCols(3, m);
      lora::EigenBackend::gemm_nt(0.5f, X, W, beta, Y);
      CHECK(support::rel_err(Y, ref_nt(W, 0, m, 0.5f, X, beta, Y0)) <= bound(k));
      if (beta == 0.0f) {
        CHECK(big.leftCols(3).array().isNaN().all());
        CHECK(big.rightCols(4).array().isNaN().all());
      }
    }
  // Past 1024 tokens the rows go in chunks of 1024 (W packed again for each).
  RowMatrix<float> W2(256, 256), X2(1030, 256), Y2(1030, 256), Z2 = RowMatrix<float>::Zero(1030, 256);
  support::fill(W2, 34);
  support::fill(X2, 35);
  lora::EigenBackend::gemm_nt(1.0f, X2, W2, 0.0f, Y2);
  CHECK(support::rel_err(Y2, ref_nt(W2, 0, 256, 1.0f, X2, 0.0f, Z2)) <= bound(256));
}

TEST_CASE("dX = G W past 32 rows over a plain fp32 W goes through the micro-kernel, W copied into panels per call",
          "[packed][backward]") {
  // G with more rows than the panel kernel's 32 (LORA_EIGEN_PANEL_MAX_ROWS)
  // over W at least 256 x 256 (LORA_EIGEN_MICROKERNEL_MIN_SIZE). W [531, 300]:
  // depth 531 is two 256-deep blocks and one of 19; 300 columns are 9 whole
  // panels and one of 12 (zero-padded in the copy). 33 rows are two 12-row
  // tiles, one of 8 and one of 1. alpha, beta, beta = 0 over NaN, G and dX
  // column blocks of wider matrices.
  const index_t k = 531, n = 300;
  RowMatrix<float> W(k, n);
  support::fill(W, 36);
  for (const index_t m : {index_t(33), index_t(200)})
    for (const float beta : {0.0f, 2.0f}) {
      CAPTURE(m, beta);
      RowMatrix<float> gbig(m, k + 5), big(m, n + 7);
      support::fill(gbig, 37);
      support::fill(big, 38);
      if (beta == 0.0f) big.setConstant(std::nanf(""));
      const RowMatrix<float> G = gbig.middleCols(2, k), D0 = big.middleCols(3, n);
      auto D = big.middleCols(3, n);
      lora::EigenBackend::gemm_nn(0.5f, gbig.middleCols(2, k), W, beta, D);
      CHECK(support::rel_err(D, ref_nn(W, 0, k, 0.5f, G, beta, D0)) <= bound(k));
      if (beta == 0.0f) {
        CHECK(big.leftCols(3).array().isNaN().all());
        CHECK(big.rightCols(4).array().isNaN().all());
      }
    }
  // Past 1024 rows G goes in chunks of 1024.
  RowMatrix<float> W2(256, 256), G2(1030, 256), D2(1030, 256), Z2 = RowMatrix<float>::Zero(1030, 256);
  support::fill(W2, 39);
  support::fill(G2, 40);
  lora::EigenBackend::gemm_nn(1.0f, G2, W2, 0.0f, D2);
  CHECK(support::rel_err(D2, ref_nn(W2, 0, 256, 1.0f, G2, 0.0f, Z2)) <= bound(256));
}

TEST_CASE("C = beta C + alpha A^T B (the adapter's dA and dB) through lora's kernels, A transposed by strides",
          "[packed][gemm_tn]") {
  // A [k, m], so C [m, n] = A^T B. Up to 32 rows of C over a wide B (dA =
  // s (G B)^T X: the panel kernel) for any depth; more rows at depths 16..128
  // (dB = s G^T H: a rank update); the rest stays with Eigen. A is a column
  // block of a wider matrix (its row stride is not m).
  for (const index_t m : {index_t(1), index_t(8), index_t(29), index_t(200), index_t(603)})
    for (const index_t k : {index_t(1), index_t(17), index_t(128), index_t(300)})
      for (const index_t n : {index_t(33), index_t(260)}) {
        CAPTURE(m, k, n);
        RowMatrix<float> abig(k, m + 3), B(k, n), C(m, n);
        support::fill(abig, 41);
        support::fill(B, 42);
        support::fill(C, 43);
        const RowMatrix<float> A = abig.middleCols(1, m), C0 = C;
        lora::EigenBackend::gemm_tn(0.5f, abig.middleCols(1, m), B, 2.0f, C);
        CHECK(support::rel_err(C, ref_nn(B, 0, k, 0.5f, A.transpose(), 2.0f, C0)) <= bound(k + 2));
      }
  // beta = 0 overwrites (NaN does not leak), both kernels, C a column block.
  for (const index_t m : {index_t(8), index_t(300)}) {
    CAPTURE(m);
    RowMatrix<float> A(64, m), B(64, 300), big = RowMatrix<float>::Constant(m, 310, std::nanf(""));
    support::fill(A, 44);
    support::fill(B, 45);
    auto C = big.middleCols(5, 300);
    lora::EigenBackend::gemm_tn(1.0f, A, B, 0.0f, C);
    CHECK(support::rel_err(C, RowMatrix<float>(A.transpose() * B)) <= bound(64));
    CHECK(big.leftCols(5).array().isNaN().all());
    CHECK(big.rightCols(5).array().isNaN().all());
  }
}

TEST_CASE("A few rows of A times B through the panel kernel, B in place: G B for r >= 32 and dX += s (G B) A",
          "[packed][skinny_nn]") {
  // Up to 32 rows (LORA_EIGEN_PANEL_MAX_ROWS) with A deep and C narrow (G B:
  // 48 and 130 columns, a partial panel) or A shallow and C wide (the rank-r
  // update dX += s (G B) A: depth 8 .. 129 over 300 columns), strided A and C,
  // beta = 0 over NaN and beta = 2, against a long-double product.
  struct shape {
    index_t k, n;
  };
  for (const shape sh : {shape{300, 32}, shape{300, 48}, shape{300, 130}, shape{8, 300}, shape{37, 300},
                         shape{129, 300}})
    for (const index_t m : {index_t(1), index_t(16), index_t(29)})
      for (const float beta : {0.0f, 2.0f}) {
        const index_t k = sh.k, n = sh.n;
        CAPTURE(m, k, n, beta);
        RowMatrix<float> Abig(m, k + 4), B(k, n), big(m, n + 6);
        support::fill(Abig, 40);
        support::fill(B, 41);
        support::fill(big, 42);
        if (beta == 0.0f) big.setConstant(std::nanf(""));
        const auto A = Abig.middleCols(1, k);
        auto C = big.middleCols(2, n);
        const RowMatrix<float> C0 = C;
        lora::EigenBackend::gemm_nn(0.5f, A, B, beta, C);
        CHECK(support::rel_err(C, ref_nn(B, 0, k, 0.5f, A, beta, C0)) <= bound(k + 2));
        if (beta == 0.0f) {
          CHECK(big.leftCols(2).array().isNaN().all());
          CHECK(big.rightCols(4).array().isNaN().all());
        }
      }
}
