// Distributed LoRA (lora::dist): run as one process and under mpirun at 2 and
// 3 ranks (tests/mpi/CMakeLists.txt); MPI starts before Catch's main (below). Every rank runs every test case; each
// check is first combined over ranks (worst value, MPI_MAX), so all ranks
// assert the same thing and a failure on one rank cannot leave the others
// waiting in a collective.
//
// References are dense long-double computations of the whole (unsharded)
// layer. A float or double result and the reference differ by at most
// gamma_k * (the same sum over |terms|), gamma_k = k u / (1 - k u), k the
// length of the longest chain of roundings; two computations that sum in a
// different order (p partial sums, then MPI's sum) differ by at most twice
// that, which is the bound every comparison below uses.
#include <catch2/catch.hpp>
#include <lora/dist/data_parallel.hpp>
#include <lora/dist/mpi.hpp>
#include <lora/dist/tensor_parallel.hpp>
#if LORA_DIST_TEST_IO
#include <lora/dist/shard_io.hpp>
#endif

#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <set>
#include <string>
#include <vector>

namespace {

using lora::index_t;
namespace dist = lora::dist;
namespace train = lora::train;
template <class T>
using Mat = lora::RowMatrix<T>;
using LMat = lora::RowMatrix<long double>;

}  // namespace

namespace {

// MPI for the whole binary: MPI_Init during static initialisation (before
// Catch's main, tests/catch_main.cpp, shared with every other test binary, so
// no second copy of Catch's implementation is compiled), MPI_Finalize at exit.
// mpirun fails the run when any rank exits non-zero.
struct MpiForTests {
  lora::dist::MpiSession session;
  lora::dist::MpiCommunicator world;  // freed before MPI_Finalize (declared after the session)
};
MpiForTests& mpi_for_tests() {
  static MpiForTests m;
  return m;
}
[[maybe_unused]] const bool mpi_started = (mpi_for_tests(), true);

dist::MpiCommunicator& world() { return mpi_for_tests().world; }

// The worst value over ranks: every rank then checks the same number.
double global_max(double v) {
  MPI_Allreduce(MPI_IN_PLACE, &v, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  return v;
}

template <class M>
void fill(M& m, std::uint64_t seed) {
  lora::EigenBackend::fill_random(m, lora::UniformDist{-1.0, 1.0}, seed, 77);
}

template <class T>
long double gamma_k(index_t k) {
  const long double u = std::numeric_limits<T>::epsilon() / 2;
  return k * u / (1 - k * u);
}

template <class M>
LMat as_long(const M& m) {
  return m.template cast<long double>();
}

// max |a - e| / bound over the elements (0 where both are 0); <= 1 passes.
template <class A, class E, class Bnd>
double worst(const A& a, const E& e, const Bnd& bound) {
  REQUIRE(a.rows() == e.rows());
  REQUIRE(a.cols() == e.cols());
  long double w = 0;
  for (index_t i = 0; i < a.rows(); ++i)
    for (index_t j = 0; j < a.cols(); ++j) {
      const long double d = std::fabs((long double)a(i, j) - (long double)e(i, j));
      if (d == 0) continue;
      w = std::max(w, bound(i, j) > 0 ? d / bound(i, j) : std::numeric_limits<long double>::infinity());
    }
  return static_cast<double>(w);
}

template <class T, int R>
auto make_layer(index_t out, index_t in, index_t r, std::uint64_t seed) {
  Mat<T> W(out, in);
  fill(W, seed);
  Eigen::Matrix<T, Eigen::Dynamic, 1> b(out);
  fill(b, seed + 1);
  lora::AdaptedLinear layer{std::move(W), std::move(b), lora::LowRankDelta<T, R>{out, in, r, {.alpha = 3.0}}};
  layer.delta().init(lora::init::UniformBoth{}, seed + 2);  // B != 0: every gradient is non-trivial
  return layer;
}

// Plain loops in long double: the references, compiled once (Eigen's
// long-double products would instantiate a GEMM per expression shape).
LMat mm(const LMat& a, const LMat& b) {
  LMat c = LMat::Zero(a.rows(), b.cols());
  for (index_t i = 0; i < a.rows(); ++i)
    for (index_t k = 0; k < a.cols(); ++k)
      for (index_t j = 0; j < b.cols(); ++j) c(i, j) += a(i, k) * b(k, j);
  return c;
}
LMat tr(const LMat& a) { return a.transpose(); }

// The whole layer in long double (values), and for each result the sum of the
// |terms| that bounds its rounding error (bounds).
struct Reference {
  LMat Y, dA, dB, dX, db, Wm;  // forward, gradients (db as a column), merged W
  LMat aY, aA, aB, aX, adb, aW, aYm;
};

Reference reference(const LMat& W, const LMat& A, const LMat& B, const LMat& bias_row, const LMat& X, const LMat& G,
                    long double s) {
  Reference r;
  const LMat aW = W.cwiseAbs(), aA = A.cwiseAbs(), aB = B.cwiseAbs(), aX = X.cwiseAbs(), aG = G.cwiseAbs();
  r.Y = mm(X, tr(W)) + s * mm(mm(X, tr(A)), tr(B));
  r.Y.rowwise() += bias_row.row(0);
  r.aY = mm(aX, tr(aW)) + s * mm(mm(aX, tr(aA)), tr(aB));
  r.aY.rowwise() += bias_row.row(0).cwiseAbs();
  const LMat GB = mm(G, B), aGB = mm(aG, aB);
  r.dA = s * mm(tr(GB), X);  // (r, in)
  r.aA = s * mm(tr(aGB), aX);
  r.dB = s * mm(tr(G), mm(X, tr(A)));  // (out, r)
  r.aB = s * mm(tr(aG), mm(aX, tr(aA)));
  r.dX = mm(G, W) + s * mm(GB, A);  // (n, in)
  r.aX = mm(aG, aW) + s * mm(aGB, aA);
  r.db = tr(G.colwise().sum());  // (out, 1)
  r.adb = tr(aG.colwise().sum());
  r.Wm = W + s * mm(B, A);  // (out, in)
  r.aW = aW + s * mm(aB, aA);
  r.aYm = r.aY + mm(aX, tr(r.aW));
  return r;
}

template <class Layer>
Reference reference(const Layer& l, const LMat& X, const LMat& G) {
  LMat bias = LMat::Zero(1, l.out_features());
  if (l.has_bias()) bias = tr(as_long(l.bias()));
  return reference(as_long(l.base_weight()), as_long(l.delta().A()), as_long(l.delta().B()), bias, X, G,
                   l.delta().scale());
}

}  // namespace

// ---- the single-process model and the split rule ------------------------------------------

TEST_CASE("split: the first n % p ranks take one more, in rank order", "[dist]") {
  CHECK(dist::split(10, 3, 0) == dist::Shard{0, 4});
  CHECK(dist::split(10, 3, 1) == dist::Shard{4, 3});
  CHECK(dist::split(10, 3, 2) == dist::Shard{7, 3});
  CHECK(dist::split(7, 2, 1) == dist::Shard{4, 3});
  CHECK(dist::split(2, 3, 2) == dist::Shard{2, 0});
  CHECK(dist::split(8, 4, 3) == dist::Shard{6, 2});
  CHECK_THROWS_AS(dist::split(5, 0, 0), lora::ValueError);
  CHECK_THROWS_AS(dist::split(5, 2, 2), lora::ValueError);
}

TEST_CASE("SingleProcess: rank 0 of 1, collectives copy or do nothing", "[dist]") {
  dist::SingleProcess one;
  CHECK(one.rank() == 0);
  CHECK(one.size() == 1);
  std::vector<double> x{1.5, -2.0, 3.25};
  one.all_reduce_sum(std::span<double>(x));
  CHECK(x == std::vector<double>{1.5, -2.0, 3.25});
  std::vector<float> mine{1, 2}, all(2), bad(3);
  one.all_gather(std::span<const float>(mine), std::span<float>(all));
  CHECK(all == mine);
  CHECK_THROWS_AS(one.all_gather(std::span<const float>(mine), std::span<float>(bad)), lora::ShapeError);
  const std::vector<index_t> counts{2};
  one.all_gather_v(std::span<const float>(mine), std::span<float>(all), std::span<const index_t>(counts));
  CHECK(all == mine);
  one.broadcast(std::span<double>(x), 0);
  try {
    one.broadcast(std::span<double>(x), 1);
    FAIL("no CommError");
  } catch (const dist::CommError& e) {
    CHECK(e.code() == -1);
    CHECK(std::string(e.what()).find("root 1") != std::string::npos);
  }
  one.barrier();
  CHECK(one.stats().all_reduce_calls == 1);
  CHECK(one.stats().all_reduce_bytes == 3 * sizeof(double));
  CHECK(one.stats().all_gather_calls == 2);
  CHECK(one.stats().broadcast_calls == 1);
  CHECK(one.stats().barrier_calls == 1);
}

TEST_CASE("SingleProcess: data- and column-parallel results are bit-identical to no communicator", "[dist]") {
  const index_t out = 6, in = 5, r = 2, n = 4;
  auto full = make_layer<float, lora::dynamic>(out, in, r, 11);
  Mat<float> X(n, in), G(n, out);
  fill(X, 12);
  fill(G, 13);

  // No communicator: the layer's own training calls.
  Mat<float> Y(n, out), dX(n, in);
  train::Tape<decltype(full)> tape;
  train::Gradients<decltype(full)> grads(full, true);
  train::forward(full, X, Y, tape);
  train::backward(full, X, G, tape, grads, dX);

  // Column-parallel over one process: the shard is the whole layer.
  dist::SingleProcess one;
  dist::ColumnParallelLinear cp(one, dist::column_shard(full, dist::split(out, 1, 0)), out);
  using Shard = std::remove_cvref_t<decltype(cp.local())>;
  Mat<float> Yc(n, out), dXc(n, in);
  train::Tape<Shard> tc;
  train::Gradients<Shard> gc(cp.local(), true);
  cp.train_forward(X, Yc, tc);
  cp.backward(X, G, tc, gc, dXc);
  CHECK(Yc == Y);
  CHECK(dXc == dX);
  CHECK(gc.dA() == grads.dA());
  CHECK(gc.dB() == grads.dB());
  CHECK(gc.db() == grads.db());

  // Data-parallel reduction over one process leaves every bit in place.
  train::AdamW<float> opt;
  opt.add(full, grads);
  const Mat<float> dA = grads.dA(), dB = grads.dB();
  dist::GradientReducer<float, dist::SingleProcess> reducer(one);
  const auto rep = reducer.reduce(opt);
  CHECK(grads.dA() == dA);
  CHECK(grads.dB() == dB);
  CHECK(rep.grad_norm == opt.grad_norm());
  CHECK(rep.elements == r * (in + out) + out);
  CHECK(rep.buckets == 1);
}

// ---- the MPI model ------------------------------------------------------------------------

namespace {
// Every collective of `w` against exact values (small integers and halves).
void check_collectives(dist::MpiCommunicator& w) {
  const int p = w.size(), q = w.rank();
  w.reset_stats();
  std::vector<double> x{double(q), 1.0, 0.5 * q};
  w.all_reduce_sum(std::span<double>(x));
  const double sum_q = p * (p - 1) / 2.0;  // exact: small integers and halves
  double bad = (x[0] != sum_q) + (x[1] != p) + (x[2] != 0.5 * sum_q);

  std::vector<float> mine{float(q), float(10 * q)}, all(2 * static_cast<std::size_t>(p));
  w.all_gather(std::span<const float>(mine), std::span<float>(all));
  for (int k = 0; k < p; ++k) bad += (all[2 * k] != k) + (all[2 * k + 1] != 10 * k);

  // Uneven counts: rank k sends k + 1 values k, k, ...
  std::vector<index_t> counts;
  for (int k = 0; k < p; ++k) counts.push_back(k + 1);
  std::vector<double> mv(static_cast<std::size_t>(q + 1), double(q)), av(static_cast<std::size_t>(p * (p + 1) / 2));
  w.all_gather_v(std::span<const double>(mv), std::span<double>(av), std::span<const index_t>(counts));
  std::size_t at = 0;
  for (int k = 0; k < p; ++k)
    for (int j = 0; j <= k; ++j) bad += av[at++] != k;

  std::vector<float> b{q == p - 1 ? 7.5f : -1.0f, 2.0f};
  w.broadcast(std::span<float>(b), p - 1);
  bad += (b[0] != 7.5f) + (b[1] != 2.0f);
  w.barrier();
  CHECK(global_max(bad) == 0);
  CHECK(w.stats().all_reduce_calls == 1);
  CHECK(w.stats().all_reduce_bytes == 3 * sizeof(double));
  CHECK(w.stats().all_gather_calls == 2);
  CHECK(w.stats().broadcast_bytes == 2 * sizeof(float));
  CHECK(w.stats().barrier_calls == 1);
  // A wrong buffer is refused before MPI is called (the same on every rank).
  CHECK_THROWS_AS(w.all_gather(std::span<const float>(mine), std::span<float>(all).first(1)), lora::ShapeError);
}
}  // namespace

TEST_CASE("MpiCommunicator: collectives over the world", "[dist][mpi]") { check_collectives(world()); }

TEST_CASE("MpiCommunicator with a timeout: the non-blocking collectives give the same results", "[dist][mpi]") {
  using namespace std::chrono_literals;
  // Generous: nothing here is late, the timeout only selects the MPI_I* + MPI_Test path.
  dist::MpiCommunicator timed(MPI_COMM_WORLD, {.timeout = 60s});
  CHECK(timed.timeout() == 60s);
  check_collectives(timed);
  // MPI's own errors still arrive as CommError (MPI_Ibcast checks the root),
  // and do not fail the communicator: nothing was started.
  std::vector<double> x{1.0};
  int code = 0;
  try {
    timed.broadcast(std::span<double>(x), timed.size());
  } catch (const dist::CommError& e) {
    code = e.code();
    INFO(e.what());
    CHECK(std::string(e.what()).find("MpiCommunicator::broadcast: MPI_Ibcast failed: ") == 0);
  }
  CHECK(global_max(code == MPI_ERR_ROOT ? 0 : 1) == 0);
  CHECK_FALSE(timed.failed());
  timed.barrier();
  CHECK_THROWS_AS(timed.set_timeout(-1ms), lora::ValueError);
}

TEST_CASE("MpiCommunicator: a rank that does not join in time is a CommTimeout on the others, not a hang",
          "[dist][mpi]") {
  using namespace std::chrono_literals;
  // The "failing" rank (the last) joins the all-reduce only after every other
  // rank has timed out and told it so: the order is fixed by messages, not by
  // sleeps, so the test cannot race. Its late arrival then completes the
  // pending collective, and the job shuts down normally. CTest's TIMEOUT is the
  // backstop should a timeout not fire. At 1 rank only the polling path runs.
  const int p = world().size(), q = world().rank(), late = p - 1, tag = 15;
  constexpr auto limit = 200ms;
  dist::MpiCommunicator timed(MPI_COMM_WORLD, {.timeout = limit});
  std::vector<double> x{1.0, double(q), 0.5};
  const std::vector<double> sum{double(p), p * (p - 1) / 2.0, 0.5 * p};  // exact
  double bad = 0;
  if (q != late) {
    std::string what;
    const auto t0 = std::chrono::steady_clock::now();
    try {
      timed.all_reduce_sum(std::span<double>(x));
      bad += 1;  // completed without the late rank: impossible
    } catch (const dist::CommTimeout& e) {
      what = e.what();
      bad += (e.operation() != "MpiCommunicator::all_reduce_sum") + (e.elements() != 3) + (e.timeout() != limit) +
             (e.rank() != q) + (e.code() != -1);
    }
    bad += std::chrono::steady_clock::now() - t0 < limit;
    INFO(what);
    CHECK(what.find("MpiCommunicator::all_reduce_sum: 3 elements not complete after the timeout of 0.2 s on rank " +
                    std::to_string(q) + " of " + std::to_string(p)) == 0);
    bad += !timed.failed() + !timed.pending();
    // Every later call throws at once, naming the first failure; MPI is not called.
    std::string later;
    try {
      timed.barrier();
    } catch (const dist::CommTimeout&) {
      later = "a second timeout";
    } catch (const dist::CommError& e) {
      later = e.what();
    }
    INFO(later);
    CHECK(later.find("MpiCommunicator::barrier: this communicator failed earlier (" + what) == 0);
    int token = 1;
    MPI_Send(&token, 1, MPI_INT, late, tag, MPI_COMM_WORLD);
    // The late rank's arrival completes the pending call: MPI wrote the sum into x.
    bad += !timed.finish_pending(30s);
    bad += timed.pending() + !timed.failed();
  } else {
    for (int k = 0; k < p - 1; ++k) {
      int token = 0;
      MPI_Recv(&token, 1, MPI_INT, MPI_ANY_SOURCE, tag, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
    }
    timed.set_timeout(30s);  // the others are polling already
    timed.all_reduce_sum(std::span<double>(x));
    bad += timed.failed();
  }
  bad += x != sum;
  INFO("rank " << q << " of " << p);
  CHECK(bad == 0);
  CHECK(global_max(bad) == 0);
}

TEST_CASE("MpiCommunicator: a failing MPI call is a CommError with MPI's own message", "[dist][mpi]") {
  auto& w = world();
  std::vector<double> x{1.0};
  std::string what;
  int code = 0;
  try {
    w.broadcast(std::span<double>(x), w.size());  // no such root, on every rank
  } catch (const dist::CommError& e) {
    what = e.what();
    code = e.code();
  }
  char text[MPI_MAX_ERROR_STRING];
  int len = 0;
  MPI_Error_string(MPI_ERR_ROOT, text, &len);
  INFO(what);
  CHECK(code == MPI_ERR_ROOT);
  CHECK(what.find("MpiCommunicator::broadcast: MPI_Bcast failed: ") == 0);
  CHECK(what.find(std::string(text, static_cast<std::size_t>(len))) != std::string::npos);
  CHECK(global_max(code == MPI_ERR_ROOT ? 0 : 1) == 0);
  // The communicator is still usable afterwards.
  w.barrier();
}

// ---- data parallel ------------------------------------------------------------------------

TEST_CASE("data-parallel gradients equal the single-process gradients over the concatenated batch", "[dist][mpi]") {
  using T = float;
  auto& w = world();
  const int p = w.size(), q = w.rank();
  const index_t out = 9, in = 7, r = 3, N = 12;  // N: 2 x 6 and 3 x 4 tokens
  auto layer = make_layer<T, 3>(out, in, r, 21);
  Mat<T> X(N, in), C(N, out);
  fill(X, 22);
  fill(C, 23);

  // The reference: L = mean over the global batch of sum_o C .* Y, so G = C / N.
  const Reference ref = reference(layer, as_long(X), as_long(C) / N);
  // Chains: tokens (N) + out or in (the inner products) + p (MPI's sum) + the
  // divisions by n_q and p + the scale.
  const index_t k = N + out + in + p + 4;
  const long double g2 = 2 * gamma_k<T>(k);
  // This rank's share; its loss is the mean over its own tokens (G_q = C_q / n_q).
  const dist::Shard mine = dist::split(N, p, q);
  const Mat<T> Xq = X.middleRows(mine.offset, mine.count);
  const Mat<T> Gq = C.middleRows(mine.offset, mine.count) / T(mine.count);
  Mat<T> Yq(mine.count, out);
  train::Tape<decltype(layer)> tape;
  train::Gradients<decltype(layer)> grads(layer, true);
  train::forward(layer, Xq, Yq, tape);
  train::backward(layer, Xq, Gq, tape, grads);
  train::SGD<T> opt({.lr = 0.1});
  opt.add(layer, grads);

  // Buckets of 16 floats: r (in + out) + out = 57 elements, 4 calls.
  w.reset_stats();
  dist::GradientReducer<T, dist::MpiCommunicator> reducer(w, {.bucket_bytes = 16 * sizeof(T)});
  const auto rep = reducer.reduce(opt);
  CHECK(rep.elements == 57);
  CHECK(rep.buckets == 4);
  CHECK(w.stats().all_reduce_calls == 4);
  CHECK(w.stats().all_reduce_bytes == 57 * sizeof(T));
  CHECK(rep.bytes == 57 * sizeof(T));

  const auto compare = [&](const auto& g) {
    return std::max(
        {worst(g.dA(), ref.dA, g2 * ref.aA), worst(g.dB(), ref.dB, g2 * ref.aB), worst(g.db(), ref.db, g2 * ref.adb)});
  };
  const double e = compare(grads);
  INFO("worst |error| / bound over dA, dB, db: " << e);
  CHECK(global_max(e) <= 1.0);

  // The single-process computation over the whole batch, in T, is within the same bound.
  Mat<T> Y(N, out);
  train::Tape<decltype(layer)> t1;
  train::Gradients<decltype(layer)> g1(layer, true);
  train::forward(layer, X, Y, t1);
  const Mat<T> G1 = C / T(N);
  train::backward(layer, X, G1, t1, g1);
  // (Each is within g2 |terms| / 2 of the reference, so within g2 |terms| of each other.)
  const double e1 = std::max({worst(grads.dA(), g1.dA(), g2 * ref.aA), worst(grads.dB(), g1.dB(), g2 * ref.aB),
                              worst(grads.db(), g1.db(), g2 * ref.adb)});
  CHECK(compare(g1) <= 1.0);
  CHECK(global_max(e1) <= 1.0);

  // Every rank holds the same bits, and so the same global norm.
  Mat<T> gathered(p, r * in);
  w.all_gather(std::span<const T>(grads.dA().data(), static_cast<std::size_t>(r * in)),
               std::span<T>(gathered.data(), static_cast<std::size_t>(p * r * in)));
  double differ = 0;
  for (int k2 = 1; k2 < p; ++k2) differ += gathered.row(k2) != gathered.row(0);
  std::vector<double> norms(static_cast<std::size_t>(p));
  w.all_gather(std::span<const double>(&rep.grad_norm, 1), std::span<double>(norms));
  for (double v : norms) differ += v != norms[0];
  CHECK(global_max(differ) == 0);
  const long double ref_norm = std::sqrt(ref.dA.squaredNorm() + ref.dB.squaredNorm() + ref.db.squaredNorm());
  CHECK(std::fabs(rep.grad_norm - ref_norm) <= 4 * gamma_k<T>(k) * ref_norm);
}

TEST_CASE("rank_seed: distinct deterministic dropout streams per rank, rank 0 keeps the seed", "[dist]") {
  const std::uint64_t seed = 1234;
  CHECK(dist::rank_seed(seed, 0) == seed);
  std::set<std::uint64_t> seen;
  for (int k = 0; k < 64; ++k) seen.insert(dist::rank_seed(seed, k));
  CHECK(seen.size() == 64);
  CHECK(dist::rank_seed(seed, 5) == dist::rank_seed(seed, 5));
  const auto d = dist::rank_dropout(train::Dropout(0.5, seed), 3);
  CHECK(d.p() == 0.5);
  CHECK(d.seed() == dist::rank_seed(seed, 3));
  // Different ranks draw different masks over the same positions.
  int same = 0;
  const auto d0 = dist::rank_dropout(train::Dropout(0.5, seed), 0);
  for (index_t i = 0; i < 256; ++i) same += d.keeps(0, 0, i, 256) == d0.keeps(0, 0, i, 256);
  CHECK(same < 200);
  CHECK_THROWS_AS(dist::rank_seed(seed, -1), lora::ValueError);
}

// ---- tensor parallel ----------------------------------------------------------------------

TEMPLATE_TEST_CASE_SIG("column-parallel forward, backward and merge equal the unsharded layer", "[dist][mpi]",
                       ((int R), R), 2, lora::dynamic) {
  using T = double;
  auto& w = world();
  const int p = w.size();
  // out = 7: uneven at p = 2 and 3. r = 2: each shard keeps r <= its rows (the
  // shard is a LowRankDelta, whose rank check applies to it).
  const index_t out = 7, in = 5, r = 2, n = 4;
  auto full = make_layer<T, R>(out, in, r, 31);
  Mat<T> X(n, in), G(n, out);
  fill(X, 32);
  fill(G, 33);
  const dist::Shard sh = dist::split(out, p, w.rank());
  dist::ColumnParallelLinear cp(w, dist::column_shard(full, sh), out);
  using Shard = std::remove_cvref_t<decltype(cp.local())>;
  CHECK(cp.shard_of() == sh);
  CHECK(cp.local().out_features() == sh.count);

  const Reference ref = reference(full, as_long(X), as_long(G));
  const index_t k = n + out + in + r + p + 3;  // the longest chain (backward); the forward's is shorter
  const long double g2 = 2 * gamma_k<T>(k);
  const auto rows = [&](const LMat& m) { return LMat(m.middleRows(sh.offset, sh.count)); };
  const auto cols = [&](const LMat& m) { return LMat(m.middleCols(sh.offset, sh.count)); };

  // Forward: no communication; the full Y by all_gather.
  w.reset_stats();
  Mat<T> Yq(n, sh.count), Yfull(n, out);
  train::Tape<Shard> tape;
  cp.train_forward(X, Yq, tape);
  CHECK(w.stats().all_reduce_calls == 0);
  cp.gather_output(Yq, Yfull);
  CHECK(w.stats().all_gather_calls == 1);
  double e = std::max(worst(Yq, cols(ref.Y), g2 * cols(ref.aY)), worst(Yfull, ref.Y, g2 * ref.aY));

  // Backward: dB_q, db_q local; dA and dX summed in one all-reduce.
  train::Gradients<Shard> grads(cp.local(), true);
  Mat<T> dX(n, in);
  cp.backward(X, G.middleCols(sh.offset, sh.count), tape, grads, dX);
  CHECK(w.stats().all_reduce_calls == 1);
  CHECK(w.stats().all_reduce_bytes == (r * in + n * in) * sizeof(T));
  e = std::max({e, worst(grads.dA(), ref.dA, g2 * ref.aA), worst(dX, ref.dX, g2 * ref.aX),
                worst(grads.dB(), rows(ref.dB), g2 * rows(ref.aB)),
                worst(grads.db(), rows(ref.db), g2 * rows(ref.adb))});

  // Merge per shard: W_q + s B_q A equals the whole merged W's rows; the merged
  // forward gives the same Y; unmerge restores W_q.
  const Mat<T> Wq = cp.local().base_weight();
  CHECK(cp.merge());
  e = std::max(e, worst(cp.local().base_weight(), rows(ref.Wm), g2 * rows(ref.aW)));
  Mat<T> Ym(n, sh.count);
  cp.forward(X, Ym);
  e = std::max(e, worst(Ym, cols(ref.Y), g2 * cols(ref.aYm)));
  CHECK(cp.unmerge());
  e = std::max(e, worst(cp.local().base_weight(), Wq, LMat(2 * g2 * rows(ref.aW))));
  INFO("worst |error| / bound on rank " << w.rank() << ": " << e);
  CHECK(global_max(e) <= 1.0);

  // The replicated A's gradient is the same bits on every rank.
  Mat<T> gathered(p, r * in);
  w.all_gather(std::span<const T>(grads.dA().data(), static_cast<std::size_t>(r * in)),
               std::span<T>(gathered.data(), static_cast<std::size_t>(p * r * in)));
  double differ = 0;
  for (int q = 1; q < p; ++q) differ += gathered.row(q) != gathered.row(0);
  CHECK(global_max(differ) == 0);
}

TEMPLATE_TEST_CASE_SIG("row-parallel forward, backward and merge equal the unsharded layer", "[dist][mpi]",
                       ((int R), R), 2, lora::dynamic) {
  using T = double;
  auto& w = world();
  const int p = w.size();
  const index_t out = 5, in = 7, r = 2, n = 4;  // in = 7: uneven at p = 2 and 3 (r <= every shard's columns)
  auto full = make_layer<T, R>(out, in, r, 41);
  Mat<T> X(n, in), G(n, out);
  fill(X, 42);
  fill(G, 43);
  const dist::Shard sh = dist::split(in, p, w.rank());
  dist::RowParallelLinear rp(w, dist::row_shard(full, sh), in, full.bias());
  using Shard = std::remove_cvref_t<decltype(rp.local())>;
  CHECK(rp.shard_of() == sh);
  const auto Xq = rp.local_input(X);  // a view of this rank's columns
  CHECK(Xq.data() == X.data() + sh.offset);

  const Reference ref = reference(full, as_long(X), as_long(G));
  const index_t k = n + out + in + r + p + 3;
  const long double g2 = 2 * gamma_k<T>(k);
  const auto cols = [&](const LMat& m) { return LMat(m.middleCols(sh.offset, sh.count)); };

  // Forward: one all-reduce of n (out + r) values.
  w.reset_stats();
  Mat<T> Yr(n, out);
  typename dist::RowParallelLinear<Shard, dist::MpiCommunicator>::Tape tape;
  rp.train_forward(Xq, Yr, tape);
  CHECK(w.stats().all_reduce_calls == 1);
  CHECK(w.stats().all_reduce_bytes == n * (out + r) * sizeof(T));
  double e = worst(Yr, ref.Y, g2 * ref.aY);

  // Backward: no communication.
  train::Gradients<Shard> grads(rp.local());
  Mat<T> dXq(n, sh.count);
  rp.backward(Xq, G, tape, grads, dXq);
  CHECK(w.stats().all_reduce_calls == 1);
  e = std::max({e, worst(grads.dB(), ref.dB, g2 * ref.aB), worst(grads.dA(), cols(ref.dA), g2 * cols(ref.aA)),
                worst(dXq, cols(ref.dX), g2 * cols(ref.aX))});

  // Merge per shard: W_q + s B A_q; the merged forward reduces only [n, out].
  CHECK(rp.merge());
  e = std::max(e, worst(rp.local().base_weight(), cols(ref.Wm), g2 * cols(ref.aW)));
  w.reset_stats();
  Mat<T> Ym(n, out);
  rp.forward(Xq, Ym);
  CHECK(w.stats().all_reduce_bytes == n * out * sizeof(T));
  e = std::max(e, worst(Ym, ref.Y, g2 * ref.aYm));
  CHECK_THROWS_AS(rp.train_forward(Xq, Ym, tape), lora::ValueError);  // merged: no training
  CHECK(rp.unmerge());
  INFO("worst |error| / bound on rank " << w.rank() << ": " << e);
  CHECK(global_max(e) <= 1.0);

  // The replicated B's gradient is the same bits on every rank.
  Mat<T> gathered(p, out * r);
  w.all_gather(std::span<const T>(grads.dB().data(), static_cast<std::size_t>(out * r)),
               std::span<T>(gathered.data(), static_cast<std::size_t>(p * out * r)));
  double differ = 0;
  for (int q = 1; q < p; ++q) differ += gathered.row(q) != gathered.row(0);
  CHECK(global_max(differ) == 0);
}

TEST_CASE("tensor-parallel layers refuse shards that do not follow the split rule", "[dist][mpi]") {
  auto& w = world();
  auto full = make_layer<double, lora::dynamic>(7, 5, 2, 51);
  const int p = w.size();
  // The shard of another rank count (p + 1): wrong row count somewhere; every rank checks its own.
  int refused = 0;
  try {
    dist::ColumnParallelLinear cp(w, dist::column_shard(full, dist::split(7, p + 1, 0)), 7);
  } catch (const lora::ShapeError&) {
    refused = 1;
  }
  CHECK(global_max(refused) == 1);
  // A row-parallel shard carrying a bias would add it p times.
  CHECK_THROWS_AS(dist::RowParallelLinear(w, full, 7), lora::ValueError);
}

#if LORA_DIST_TEST_IO
TEST_CASE("shard views of a safetensors base weight, without a copy", "[dist][io]") {
  auto& w = world();
  const int p = w.size();
  const index_t out = 7, in = 5;
  Mat<float> W(out, in);
  fill(W, 61);
  lora::io::SafetensorsWriter writer;
  writer.add("layer.weight", W, lora::io::DType::F32);
  const auto file = lora::io::SafetensorsFile::from_bytes(writer.to_bytes());
  const auto whole = file.view<float>("layer.weight");
  const dist::Shard rs = dist::split(out, p, w.rank()), cs = dist::split(in, p, w.rank());

  const auto rows = dist::row_shard_view<float>(file, "layer.weight", rs);
  CHECK(rows.data() == whole.data() + rs.offset * in);  // into the file's bytes
  CHECK(Mat<float>(rows) == W.middleRows(rs.offset, rs.count));
  const auto cols = dist::column_shard_view<float>(file, "layer.weight", cs);
  CHECK(cols.data() == whole.data() + cs.offset);
  CHECK(cols.outerStride() == in);
  CHECK(Mat<float>(cols) == W.middleCols(cs.offset, cs.count));

  // The strided view is an AdaptedLinear base as it is: the same forward as an owned copy.
  lora::AdaptedLinear viewed{cols, lora::LowRankDelta<float, 1>{out, cs.count}};
  lora::AdaptedLinear owned{Mat<float>(cols), lora::LowRankDelta<float, 1>{out, cs.count}};
  viewed.delta().init(lora::init::UniformBoth{}, 62);
  owned.delta().init(lora::init::UniformBoth{}, 62);
  Mat<float> X(3, cs.count);
  fill(X, 63);
  CHECK(viewed.forward(X) == owned.forward(X));

  CHECK_THROWS_AS(dist::row_shard_view<float>(file, "layer.weight", {5, 3}), lora::ShapeError);
  CHECK_THROWS_AS(dist::column_shard_view<float>(file, "layer.weight", {4, 2}), lora::ShapeError);
}
#endif
