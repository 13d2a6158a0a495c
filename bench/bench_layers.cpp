// The two loralib layers besides Linear, fp32:
//
// AdaptedEmbedding over a 32000 x 4096 table (500 MiB), r = 8 and 64, n = 16
// and 256 token ids (every fourth id repeats the one two places before it, so
// the backward's scatter meets duplicates):
//   BM_embedding_gather           the baseline: copy the n rows (a frozen embedding)
//   BM_embedding_forward          rows + s A[:, ids]^T B^T
//   BM_embedding_forward_merged   the merged layer (rows of E + s (B A)^T: a gather)
//   BM_embedding_backward         dB = s G^T H and the scatter of s (G B) into dA
//                                 (dA [r, 32000] is overwritten, zeros included)
//   GB/s counts the bytes each must move (see embedding_bytes).
//
// MergedLinear as a fused QKV (W [3d, d], LoRA r = 8 on q and v, enable_lora =
// {true, false, true}) against three AdaptedLinear layers (q, k, v; k frozen,
// no adapter) over the same bytes of W, d = 2048 and 4096, n = 16 and 256:
//   BM_qkv_forward   Y = X W^T (+ the q and v terms)
//   BM_qkv_step      forward + backward (dA, dB of q and v, dX)
// Each iteration times the fused call and the separate calls back to back (one
// machine state for both): manual time = fused, counters separate_ms and
// ratio = fused / separate.
#include <lora/lora.hpp>
#include <lora/adapted_embedding.hpp>
#include <lora/merged_linear.hpp>

#include <benchmark/benchmark.h>
#include <chrono>
#include <cstdint>
#include <map>
#include <random>
#include <span>
#include <string>
#include <vector>

namespace {

using lora::index_t;
using Mat = lora::RowMatrix<float>;
namespace train = lora::train;
using clock_type = std::chrono::steady_clock;

// ---- AdaptedEmbedding ------------------------------------------------------------
constexpr index_t kVocab = 32000, kEmbDim = 4096;

Mat& table() {
  static Mat t = [] {
    Mat m(kVocab, kEmbDim);
    lora::EigenBackend::fill_random(m, lora::UniformDist{-1, 1}, 1, 1);
    return m;
  }();
  return t;
}

std::vector<std::int64_t> make_ids(index_t n) {
  std::mt19937_64 rng{static_cast<std::uint64_t>(n)};
  std::uniform_int_distribution<std::int64_t> pick(0, kVocab - 1);
  std::vector<std::int64_t> ids(static_cast<std::size_t>(n));
  for (std::size_t i = 0; i < ids.size(); ++i) ids[i] = (i % 4 == 3) ? ids[i - 2] : pick(rng);
  return ids;
}

// One layer type for every case (a writable view: the merged case merges).
using Embedding = lora::AdaptedEmbedding<Eigen::Map<Mat>, lora::LowRankDelta<float>>;

Embedding make_embedding(index_t r) {
  Embedding e{Eigen::Map<Mat>(table().data(), kVocab, kEmbDim),
              lora::LowRankDelta<float>{kEmbDim, kVocab, r, {.alpha = 2.0 * double(r)}}};
  e.delta().init(lora::init::UniformBoth{0.01}, 2);
  return e;
}

// Bytes an implementation must move: rows read and written (2 n dim), plus for
// the adapter B [dim, r] and the n gathered columns of A; the backward reads G
// and B, writes dB and all of dA (r x 32000, overwritten).
void set_bytes(benchmark::State& state, double bytes) {
  state.counters["GB/s"] =
      benchmark::Counter(bytes, benchmark::Counter::kIsIterationInvariantRate, benchmark::Counter::kIs1000);
}

void BM_embedding_gather(benchmark::State& state) {
  const index_t n = state.range(0);
  const auto ids = make_ids(n);
  const Mat& t = table();
  Mat y(n, kEmbDim);
  for (auto _ : state) {
    for (index_t i = 0; i < n; ++i) y.row(i) = t.row(ids[static_cast<std::size_t>(i)]);
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  set_bytes(state, 4.0 * 2 * double(n) * kEmbDim);
}

void embedding_forward(benchmark::State& state, bool merged) {
  const index_t r = state.range(0), n = state.range(1);
  const auto ids = make_ids(n);
  Embedding e = make_embedding(r);
  if (merged) e.merge();  // the shared table gains s (B A)^T until unmerge() below
  Mat y(n, kEmbDim);
  Embedding::workspace ws;
  const std::span<const std::int64_t> s(ids);
  for (auto _ : state) {
    e.forward(s, y, ws);
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  if (merged) e.unmerge();
  set_bytes(state, 4.0 * (2 * double(n) * kEmbDim + (merged ? 0.0 : double(kEmbDim) * r + double(n) * r)));
}
void BM_embedding_forward(benchmark::State& state) { embedding_forward(state, false); }
void BM_embedding_forward_merged(benchmark::State& state) { embedding_forward(state, true); }

void BM_embedding_backward(benchmark::State& state) {
  const index_t r = state.range(0), n = state.range(1);
  const auto ids = make_ids(n);
  const Embedding e = make_embedding(r);
  Mat g(n, kEmbDim);
  lora::EigenBackend::fill_random(g, lora::UniformDist{-1, 1}, 1, 3);
  auto grads = e.delta().make_gradients();
  Embedding::workspace ws;
  const std::span<const std::int64_t> s(ids);
  for (auto _ : state) {
    e.backward(s, g, grads, ws);
    benchmark::DoNotOptimize(grads.dA().data());
    benchmark::ClobberMemory();
  }
  set_bytes(state, 4.0 * (double(n) * kEmbDim + 2.0 * kEmbDim * r + double(r) * kVocab + double(n) * r));
}

// ---- MergedLinear (fused QKV) vs three AdaptedLinear --------------------------------
constexpr int kRank = 8;
using Delta = lora::LowRankDelta<float, kRank>;
using View = Eigen::Map<const Mat>;
using Fused = lora::MergedLinear<View, Delta>;
using Separate = lora::AdaptedLinear<View, Delta>;

// W [3d, d] = [W_q; W_k; W_v], one copy per d (shared by both variants).
const Mat& qkv_weight(index_t d) {
  static std::map<index_t, Mat> cache;
  auto it = cache.find(d);
  if (it == cache.end()) {
    Mat w(3 * d, d);
    lora::EigenBackend::fill_random(w, lora::UniformDist{-0.02, 0.02}, 1, 4);
    it = cache.emplace(d, std::move(w)).first;
  }
  return it->second;
}

Delta make_delta(index_t d, std::uint64_t seed, bool adapted = true) {
  Delta delta{d, d, {.alpha = 2.0 * kRank, .multiplier = adapted ? 1.0 : 0.0}};
  delta.init(lora::init::UniformBoth{0.01}, seed);
  return delta;
}

struct QKV {
  index_t d, n;
  Fused fused;
  Separate q, k, v;  // k: s = 0, the evaluators skip its adapter (a frozen projection)
  Mat x, y3, yq, yk, yv, g3, gq, gk, gv, dx;
  QKV(index_t d_, index_t n_)
      : d(d_), n(n_),
        fused(View(qkv_weight(d).data(), 3 * d, d), {d, d, d}, {true, false, true},
              std::vector<Delta>{make_delta(d, 5), make_delta(d, 7)}),
        q(View(qkv_weight(d).data(), d, d), make_delta(d, 5)),
        k(View(qkv_weight(d).data() + d * d, d, d), make_delta(d, 6, false)),
        v(View(qkv_weight(d).data() + 2 * d * d, d, d), make_delta(d, 7)),
        x(n, d), y3(n, 3 * d), yq(n, d), yk(n, d), yv(n, d), g3(n, 3 * d), dx(n, d) {
    lora::EigenBackend::fill_random(x, lora::UniformDist{-1, 1}, 1, 8);
    lora::EigenBackend::fill_random(g3, lora::UniformDist{-1, 1}, 1, 9);
    gq = g3.leftCols(d);  // the separate layers get contiguous copies, as in a model
    gk = g3.middleCols(d, d);
    gv = g3.rightCols(d);
  }
};

// Runs the fused call then the separate calls in every iteration, so both see
// one machine state; the manual time is the fused call's, separate_ms and
// ratio (fused / separate) the counters.
template <class FusedCall, class SeparateCall>
void time_pair(benchmark::State& state, FusedCall&& fused_call, SeparateCall&& separate_call) {
  double fused_s = 0, separate_s = 0;
  for (auto _ : state) {
    const auto t0 = clock_type::now();
    fused_call();
    const auto t1 = clock_type::now();
    separate_call();
    const auto t2 = clock_type::now();
    const double f = std::chrono::duration<double>(t1 - t0).count();
    fused_s += f;
    separate_s += std::chrono::duration<double>(t2 - t1).count();
    state.SetIterationTime(f);
  }
  const double iters = double(state.iterations());
  state.counters["separate_ms"] = 1e3 * separate_s / iters;
  state.counters["ratio"] = fused_s / separate_s;
  state.SetLabel("d=" + std::to_string(state.range(0)) + " n=" + std::to_string(state.range(1)) +
                 " r=8 on q,v");
}

void BM_qkv_forward(benchmark::State& state) {
  QKV m(state.range(0), state.range(1));
  Fused::workspace fws;
  Separate::workspace sws;
  time_pair(
      state,
      [&] {
        m.fused.forward(m.x, m.y3, fws);
        benchmark::DoNotOptimize(m.y3.data());
      },
      [&] {
        m.q.forward(m.x, m.yq, sws);
        m.k.forward(m.x, m.yk, sws);
        m.v.forward(m.x, m.yv, sws);
        benchmark::DoNotOptimize(m.yv.data());
      });
}

void BM_qkv_step(benchmark::State& state) {
  QKV m(state.range(0), state.range(1));
  Fused::workspace fws;
  Separate::workspace sws;
  auto fgrads = m.fused.delta().make_gradients();
  train::Tape<Separate> tq, tv;
  train::Gradients<Separate> grads_q(m.q), grads_v(m.v);
  time_pair(
      state,
      [&] {
        m.fused.forward(m.x, m.y3, fws);
        m.fused.backward(m.x, m.g3, fgrads, m.dx, fws);  // recomputes X A_k^T (no tape)
        benchmark::DoNotOptimize(m.dx.data());
      },
      [&] {
        train::forward(m.q, m.x, m.yq, tq);
        m.k.forward(m.x, m.yk, sws);
        train::forward(m.v, m.x, m.yv, tv);
        train::backward(m.q, m.x, m.gq, tq, grads_q, m.dx);
        lora::expr::apply_transposed(m.k.base_expression(), m.gk, m.dx, 1.0f, 1.0f, sws);  // dX += G_k W_k
        train::backward(m.v, m.x, m.gv, tv, grads_v, m.dx, {.accumulate_dx = true});
        benchmark::DoNotOptimize(m.dx.data());
      });
}

}  // namespace

BENCHMARK(BM_embedding_gather)->ArgName("n")->Arg(16)->Arg(256);
BENCHMARK(BM_embedding_forward)->ArgNames({"r", "n"})->ArgsProduct({{8, 64}, {16, 256}});
BENCHMARK(BM_embedding_forward_merged)->ArgNames({"r", "n"})->ArgsProduct({{8}, {16, 256}});
BENCHMARK(BM_embedding_backward)->ArgNames({"r", "n"})->ArgsProduct({{8, 64}, {16, 256}});
BENCHMARK(BM_qkv_forward)
    ->ArgNames({"d", "n"})
    ->ArgsProduct({{2048, 4096}, {16, 256}})
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK(BM_qkv_step)
    ->ArgNames({"d", "n"})
    ->ArgsProduct({{2048, 4096}, {16, 256}})
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond);

BENCHMARK_MAIN();
