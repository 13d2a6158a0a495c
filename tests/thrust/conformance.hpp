// tests/thrust/conformance.hpp: what every conformance TU shares: the backend
// under test, the independent references and the tolerances.
//
// The conformance suite runs one test source on every entry of CMake's
// LORA_CONFORMANCE_BACKENDS: the Eigen backend (built with
// LORA_CONFORMANCE_BACKEND_EIGEN, no Thrust header), Thrust's CPP and OMP device
// systems (g++), and Thrust on CUDA (nvcc: each conformance_<part>.cu includes
// its .cpp). A test names the backend `BK`, its matrices `BMatrix<T>` and moves
// data with on_backend() / on_host(), so it does not know which entry it is in.
//
// Every result is compared with an independent reference computed from the same
// host inputs (namespace ref: plain long-double loops, no Eigen arithmetic and no
// backend), never with another backend's output, so the Eigen entry can fail
// too. The reference carries, next to each value, the sum of the absolute values
// of its terms, which scales the rounding error of any evaluation order:
//   products:     |got - ref| <= 2 (k + 2) eps * (sum of |terms|), k the longest
//                 chain of roundings (the inner dimensions)
//   elementwise:  the same with k = 1, or exact where one rounding is the answer
//   random draws: the counter-based draw recomputed element by element: bit for
//                 bit, except the Gaussian on CUDA (2 ulp: its libm's log / cos)
//   NF4:          decoded from the raw bytes bit for bit; products against the
//                 dequantised W through the dense references
// Thrust entries also check what must agree across backends: bit-identical random
// fills, dropout masks and SVD factors with the Eigen backend, and its messages.
//
// One TU per part (forward, layer, primitives, init, qlora; the layer kinds dora,
// embedding, merged, multi; half on Thrust only), so that none needs 2 GB of
// compiler memory (g++ -O3) and two build at once on a 2-core machine. nvcc
// compiles the four layer-kind parts as one TU (conformance_layers.cu), so their
// file-local names must not collide.
#pragma once

#if defined(LORA_CONFORMANCE_BACKEND_EIGEN)
#include <lora/lora.hpp>
#else
#include <lora/thrust.hpp>
#endif

#include <catch2/catch.hpp>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

using lora::index_t;
using EB = lora::EigenBackend;
template <class T>
using Host = lora::RowMatrix<T>;
template <class T>
using HostVector = Eigen::Matrix<T, Eigen::Dynamic, 1>;

// ---- the backend under test --------------------------------------------------------
#if defined(LORA_CONFORMANCE_BACKEND_EIGEN)
using BK = lora::EigenBackend;
inline constexpr bool kOnCuda = false;
using BNF4 = lora::NF4Matrix;
template <class T, int Rows = lora::dynamic, int Cols = lora::dynamic>
using BMatrix = lora::RowMatrix<T, Rows, Cols>;

// The backend's memory is the host's: moving there and back is a copy (static
// extents kept, as to_device / to_host keep them).
template <class D>
auto on_backend(const Eigen::DenseBase<D>& x) {
  return lora::RowMatrix<typename D::Scalar, D::RowsAtCompileTime, D::ColsAtCompileTime>(x.derived());
}
template <class X>
  requires(!std::is_base_of_v<Eigen::EigenBase<X>, X>)
X on_backend(const X& x) {  // a layer, a delta, an NF4Matrix
  return x;
}
template <class D>
auto on_host(const Eigen::DenseBase<D>& x) {
  return lora::RowMatrix<typename D::Scalar, D::RowsAtCompileTime, D::ColsAtCompileTime>(x.derived());
}
template <class X>
  requires(!std::is_base_of_v<Eigen::EigenBase<X>, X>)
X on_host(const X& x) {
  return x;
}

// Views of the caller's buffer: Eigen::Map, read-only when T is const.
template <class T>
using MapTarget = std::conditional_t<std::is_const_v<T>, const lora::RowMatrix<std::remove_const_t<T>>,
                                     lora::RowMatrix<T>>;
template <class T>
auto b_view(T* p, index_t rows, index_t cols) {
  return Eigen::Map<MapTarget<T>>(p, rows, cols);
}
/// rows x cols elements at p, rows `stride` elements apart (a window of a larger buffer).
template <class T>
auto b_strided_view(T* p, index_t rows, index_t cols, index_t stride) {
  return Eigen::Map<MapTarget<T>, Eigen::Unaligned, Eigen::OuterStride<>>(p, rows, cols, Eigen::OuterStride<>(stride));
}
inline Host<float> deq_host(const BNF4& q) { return q.dequantize(); }
#else
using TB = lora::ThrustBackend;
using BK = TB;
inline constexpr bool kOnCuda = LORA_THRUST_ON_CUDA;
using BNF4 = lora::DeviceNF4Matrix;
template <class T, int Rows = lora::dynamic, int Cols = lora::dynamic>
using BMatrix = lora::DeviceMatrix<T, Rows, Cols>;

template <class X>
auto on_backend(const X& x) -> decltype(lora::to_device(x)) {
  return lora::to_device(x);
}
template <class X>
auto on_host(const X& x) -> decltype(lora::to_host(x)) {
  return lora::to_host(x);
}
template <class T>
auto b_view(T* p, index_t rows, index_t cols) {
  return lora::DeviceMatrixView<T>(p, rows, cols);
}
template <class T>
auto b_strided_view(T* p, index_t rows, index_t cols, index_t stride) {
  return lora::DeviceMatrixView<T>(p, rows, cols, stride);
}
inline Host<float> deq_host(const BNF4& q) { return q.dequantize_to_host(); }
#endif

template <class T>
Host<T> random_host(index_t rows, index_t cols, std::uint64_t seed) {
  Host<T> m(rows, cols);
  EB::fill_random(m, lora::UniformDist{-1.0, 1.0}, seed, 99);  // inputs only; the draw is tested in init
  return m;
}

// ---- independent references ------------------------------------------------------
namespace ref {

using LD = long double;  // 64-bit mantissa: its own rounding is far below float's and double's

/// A dense row-major long-double matrix.
struct Dense {
  Dense() = default;
  Dense(index_t rows, index_t cols) : rows_(rows), cols_(cols), v_(static_cast<std::size_t>(rows * cols), 0.0L) {}
  index_t rows() const { return rows_; }
  index_t cols() const { return cols_; }
  LD& operator()(index_t i, index_t j) { return v_[static_cast<std::size_t>(i * cols_ + j)]; }
  LD operator()(index_t i, index_t j) const { return v_[static_cast<std::size_t>(i * cols_ + j)]; }

 private:
  index_t rows_ = 0, cols_ = 0;
  std::vector<LD> v_;
};

/// A reference result: the value and, element by element, the sum of the
/// absolute values of the terms it adds up (the scale of any evaluation's error).
struct Sum {
  Dense value, bound;
  Sum() = default;
  Sum(index_t rows, index_t cols) : value(rows, cols), bound(rows, cols) {}
  index_t rows() const { return value.rows(); }
  index_t cols() const { return value.cols(); }
};

template <class M>
LD at(const M& m, index_t i, index_t j) {
  return static_cast<LD>(m(i, j));
}
inline LD at(const Sum& m, index_t i, index_t j) { return m.value(i, j); }
/// |m(i, j)|, or for a reference operand its own bound (what its terms add up to).
template <class M>
LD mag(const M& m, index_t i, index_t j) {
  return std::fabs(at(m, i, j));
}
inline LD mag(const Sum& m, index_t i, index_t j) { return m.bound(i, j); }

/// alpha op(a) op(b), op(x) = x^T where ta / tb.
template <class A, class B>
Sum product(LD alpha, const A& a, bool ta, const B& b, bool tb) {
  const index_t m = ta ? a.cols() : a.rows(), k = ta ? a.rows() : a.cols(), n = tb ? b.rows() : b.cols();
  REQUIRE((tb ? b.cols() : b.rows()) == k);
  Sum r(m, n);
  for (index_t i = 0; i < m; ++i)
    for (index_t j = 0; j < n; ++j) {
      LD s = 0, t = 0;
      for (index_t p = 0; p < k; ++p) {
        const index_t ai = ta ? p : i, aj = ta ? i : p, bi = tb ? j : p, bj = tb ? p : j;
        s += at(a, ai, aj) * at(b, bi, bj);
        t += mag(a, ai, aj) * mag(b, bi, bj);
      }
      r.value(i, j) = alpha * s;
      r.bound(i, j) = std::fabs(alpha) * t;
    }
  return r;
}

/// x + beta c; c is not read when beta == 0 (BLAS: a NaN-filled output stays out).
template <class C>
Sum plus(Sum x, LD beta, const C& c) {
  if (beta == 0) return x;
  REQUIRE(c.rows() == x.rows());
  REQUIRE(c.cols() == x.cols());
  for (index_t i = 0; i < x.rows(); ++i)
    for (index_t j = 0; j < x.cols(); ++j) {
      x.value(i, j) += beta * at(c, i, j);
      x.bound(i, j) += std::fabs(beta) * mag(c, i, j);
    }
  return x;
}

/// alpha x (elementwise inputs: one term each).
template <class X>
Sum scaled(LD alpha, const X& x) {
  Sum r(x.rows(), x.cols());
  for (index_t i = 0; i < x.rows(); ++i)
    for (index_t j = 0; j < x.cols(); ++j) {
      r.value(i, j) = alpha * at(x, i, j);
      r.bound(i, j) = std::fabs(alpha) * mag(x, i, j);
    }
  return r;
}

// BLAS's products with alpha / beta: C = beta C + alpha op(A) op(B).
template <class A, class B, class C>
Sum gemm_nn(LD alpha, const A& a, const B& b, LD beta, const C& c) {
  return plus(product(alpha, a, false, b, false), beta, c);
}
template <class A, class B, class C>
Sum gemm_nt(LD alpha, const A& a, const B& b, LD beta, const C& c) {
  return plus(product(alpha, a, false, b, true), beta, c);
}
template <class A, class B, class C>
Sum gemm_tn(LD alpha, const A& a, const B& b, LD beta, const C& c) {
  return plus(product(alpha, a, true, b, false), beta, c);
}
/// Y = beta Y + alpha X.
template <class X, class Y>
Sum axpby(LD alpha, const X& x, LD beta, const Y& y) {
  return plus(scaled(alpha, x), beta, y);
}
/// Y[i, :] += alpha v^T for every row (bias add).
template <class V>
Sum add_to_rows(Sum y, LD alpha, const V& v) {
  for (index_t i = 0; i < y.rows(); ++i)
    for (index_t j = 0; j < y.cols(); ++j) {
      y.value(i, j) += alpha * at(v, j, 0);
      y.bound(i, j) += std::fabs(alpha) * mag(v, j, 0);
    }
  return y;
}
/// db [cols] = beta db + alpha * sum over rows of G (bias gradient).
template <class G, class V>
Sum sum_rows(LD alpha, const G& g, LD beta, const V& db) {
  Sum r(g.cols(), 1);
  for (index_t j = 0; j < g.cols(); ++j) {
    for (index_t i = 0; i < g.rows(); ++i) {
      r.value(j, 0) += at(g, i, j);
      r.bound(j, 0) += mag(g, i, j);
    }
    r.value(j, 0) *= alpha;
    r.bound(j, 0) *= std::fabs(alpha);
  }
  return plus(std::move(r), beta, db);
}
/// Rows [start, start + count).
inline Sum middle_rows(const Sum& x, index_t start, index_t count) {
  Sum r(count, x.cols());
  for (index_t i = 0; i < count; ++i)
    for (index_t j = 0; j < x.cols(); ++j) {
      r.value(i, j) = x.value(start + i, j);
      r.bound(i, j) = x.bound(start + i, j);
    }
  return r;
}
/// keep .* x, elementwise (dropout's inverted mask: keep is 0 or 1 / (1 - p)).
template <class X>
Sum masked(const Dense& keep, const X& x) {
  Sum r(x.rows(), x.cols());
  for (index_t i = 0; i < x.rows(); ++i)
    for (index_t j = 0; j < x.cols(); ++j) {
      r.value(i, j) = keep(i, j) * at(x, i, j);
      r.bound(i, j) = keep(i, j) * mag(x, i, j);
    }
  return r;
}

// ---- LoRA, from its definition --------------------------------------------------------
/// The effective weight W + s B A.
template <class W, class A, class B>
Sum merged(const W& w, const A& a, const B& b, LD s) {
  return plus(product(s, b, false, a, false), 1, w);
}
/// Y = X W^T + s (X A^T) B^T + b, from D = X (or drop(X) under dropout) for
/// the adapter's input. An empty bias (0 rows) adds nothing.
template <class W, class V, class A, class B, class X, class D>
Sum forward(const W& w, const V& bias, const A& a, const B& b, LD s, const X& x, const D& d) {
  Sum y = plus(product(1, x, false, w, true), 1, product(s, product(1, d, false, a, true), false, b, true));
  return bias.rows() == 0 ? y : add_to_rows(std::move(y), 1, bias);
}
template <class W, class V, class A, class B, class X>
Sum forward(const W& w, const V& bias, const A& a, const B& b, LD s, const X& x) {
  return forward(w, bias, a, b, s, x, x);
}
/// The backward of forward(): G = dL/dY [n, out], D the adapter's input, keep
/// dropout's mask (all ones without dropout).
struct Gradients {
  Sum dX, dA, dB, db;
};
template <class W, class A, class B, class G, class D>
Gradients backward(const W& w, const A& a, const B& b, LD s, const G& g, const D& d, const Dense& keep) {
  const Sum gb = product(1, g, false, b, false);  // (n, r) = G B
  Gradients r;
  r.dX = plus(product(1, g, false, w, false), 1, masked(keep, product(s, gb, false, a, false)));  // G W + drop'(s G B A)
  r.dA = product(s, gb, true, d, false);                                                          // s (G B)^T D
  r.dB = product(s, g, true, product(1, d, false, a, true), false);                               // s G^T (D A^T)
  r.db = sum_rows(1, g, 0, Dense());                                                              // sum_t G[t, :]
  return r;
}

// ---- the counter-based draws (detail/random.hpp's definition, written out again) --------
inline constexpr std::uint64_t kGolden = 0x9e3779b97f4a7c15ULL;
inline std::uint64_t mix64(std::uint64_t z) {  // splitmix64's finaliser
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}
inline std::uint64_t random_bits(std::uint64_t seed, std::uint64_t stream, std::uint64_t i) {
  return mix64(mix64(seed ^ mix64(stream + kGolden)) + (i + 1) * kGolden);
}
/// 53 bits to [0, 1), exactly.
inline double to_unit(std::uint64_t bits) { return static_cast<double>(bits >> 11) * 0x1.0p-53; }

/// Element (i, j) is U(lo, hi) at counter i * cols + j: lo + (hi - lo) u, the
/// product rounded before the add (never an FMA), then rounded to T.
template <class T>
Host<T> uniform(index_t rows, index_t cols, double lo, double hi, std::uint64_t seed, std::uint64_t stream) {
  Host<T> m(rows, cols);
  for (index_t i = 0; i < rows; ++i)
    for (index_t j = 0; j < cols; ++j) {
      const double u = to_unit(random_bits(seed, stream, static_cast<std::uint64_t>(i * cols + j)));
      m(i, j) = static_cast<T>(lo + lora::detail::mul_unfused(hi - lo, u));
    }
  return m;
}
/// N(mean, stddev) by Box-Muller on counters 2c and 2c + 1 of element c.
template <class T>
Host<T> normal(index_t rows, index_t cols, double mean, double stddev, std::uint64_t seed, std::uint64_t stream) {
  Host<T> m(rows, cols);
  for (index_t i = 0; i < rows; ++i)
    for (index_t j = 0; j < cols; ++j) {
      const auto c = static_cast<std::uint64_t>(i * cols + j);
      const double u1 = 1.0 - to_unit(random_bits(seed, stream, 2 * c));
      const double u2 = to_unit(random_bits(seed, stream, 2 * c + 1));
      const double radius = stddev * std::sqrt(-2.0 * std::log(u1));
      m(i, j) = static_cast<T>(mean + lora::detail::mul_unfused(radius, std::cos(2.0 * 3.14159265358979323846 * u2)));
    }
  return m;
}
/// Inverted dropout's mask: element (t, i) survives iff its draw at counter
/// t * cols + i of (seed, stream) is >= p; kept elements scale by 1 / (1 - p).
inline Dense keep(index_t rows, index_t cols, double p, std::uint64_t seed, std::uint64_t stream) {
  Dense k(rows, cols);
  for (index_t t = 0; t < rows; ++t)
    for (index_t i = 0; i < cols; ++i)
      if (to_unit(random_bits(seed, stream, static_cast<std::uint64_t>(t * cols + i))) >= p) k(t, i) = 1.0L / (1.0L - p);
  return k;
}
/// Y = beta Y + alpha keep .* X (the backends' dropout primitive).
template <class X, class Y>
Sum dropout(LD alpha, const X& x, LD beta, const Y& y, double p, std::uint64_t seed, std::uint64_t stream) {
  return plus(scaled(alpha, masked(keep(x.rows(), x.cols(), p, seed, stream), x)), beta, y);
}

// ---- NF4, from the raw bytes (bitsandbytes' layout) ---------------------------------------
/// code_values[code] * scale (one fp32 multiply), the code in the high nibble of
/// byte f / 2 for even f and the low one for odd f, the scale absmax[b] or
/// map8[q8[b]] * absmax2[b / 256] + offset (fp32, unfused) for block b = f / block.
inline Host<float> dequantize(const lora::NF4Matrix& q) {
  const auto packed = q.packed();
  Host<float> W(q.rows(), q.cols());
  for (index_t f = 0; f < q.size(); ++f) {
    const index_t b = f / q.block_size();
    const float scale =
        q.double_quantized()
            ? lora::detail::mul_unfused(q.map8()[std::size_t(q.absmax_q8()[std::size_t(b)])],
                                        q.absmax2()[std::size_t(b / lora::nf4::scale_group_size)]) +
                  q.absmax_offset()
            : q.absmax()[std::size_t(b)];
    const unsigned byte = packed[std::size_t(f / 2)];
    const unsigned code = f % 2 == 0 ? byte >> 4 : byte & 15u;
    W(f / q.cols(), f % q.cols()) = lora::nf4::code_values[code] * scale;
  }
  return W;
}

// ---- AdamW (PyTorch's torch.optim.AdamW) on one tensor ------------------------------------
/// p <- p (1 - lr wd) - lr / (1 - beta1^t) m / (sqrt(v) / sqrt(1 - beta2^t) + eps),
/// m += (1 - beta1) (g - m), v = beta2 v + (1 - beta2) g^2. The scalars are
/// formed in double and rounded to T once, as torch's Python floats are
/// (train/optimizers.hpp): 1 - beta2 rounded to float is 1.3e-5 away from
/// 1 - float(beta2), so which one is meant matters at float precision. The
/// bound adds |p (1 - lr wd)| and the step taken with the moment's sum of
/// |terms| (m's rounding scale where its terms cancel).
struct AdamW {
  double lr, beta1, beta2, eps, weight_decay;
  Dense m, v, m_abs;
  long t = 0;

  template <class P, class G>
  Sum step(const P& p, const G& g) {
    using T = typename P::Scalar;
    const auto as_t = [](double x) { return static_cast<LD>(static_cast<T>(x)); };
    if (t++ == 0) m = v = m_abs = Dense(p.rows(), p.cols());
    const double bc1 = 1.0 - std::pow(beta1, double(t)), bc2 = 1.0 - std::pow(beta2, double(t));
    const LD w1 = as_t(1.0 - beta1), b2 = as_t(beta2), w2 = as_t(1.0 - beta2);
    const LD step_size = as_t(lr / bc1), bc2_sqrt = as_t(std::sqrt(bc2)), eps_t = as_t(eps);
    const LD decay = as_t(1.0 - lr * weight_decay);
    Sum r(p.rows(), p.cols());
    for (index_t i = 0; i < p.rows(); ++i)
      for (index_t j = 0; j < p.cols(); ++j) {
        const LD gi = at(g, i, j);
        m(i, j) += w1 * (gi - m(i, j));
        m_abs(i, j) = (1.0L - w1) * m_abs(i, j) + w1 * std::fabs(gi);
        v(i, j) = b2 * v(i, j) + w2 * gi * gi;
        const LD denom = std::sqrt(v(i, j)) / bc2_sqrt + eps_t;
        r.value(i, j) = at(p, i, j) * decay - step_size * m(i, j) / denom;
        r.bound(i, j) = std::fabs(at(p, i, j) * decay) + step_size * m_abs(i, j) / denom;
      }
    return r;
  }
};

}  // namespace ref

// ---- tolerances ---------------------------------------------------------------------

/// |got - want| <= 2 (terms + 2) eps * bound, elementwise.
template <class T, class G, class W, class B>
void check_close(const G& got, const W& want, const B& bound, index_t terms) {
  REQUIRE(got.rows() == want.rows());
  REQUIRE(got.cols() == want.cols());
  const double tol = 2.0 * static_cast<double>(terms + 2) * std::numeric_limits<T>::epsilon();
  for (index_t i = 0; i < got.rows(); ++i)
    for (index_t j = 0; j < got.cols(); ++j) {
      INFO("element (" << i << ", " << j << "): " << got(i, j) << " vs " << static_cast<double>(want(i, j)));
      CHECK(std::abs(static_cast<double>(got(i, j)) - static_cast<double>(want(i, j))) <=
            tol * static_cast<double>(bound(i, j)) + 1e-300);
    }
}
/// Against a reference, with its own sum of |terms| as the bound.
template <class T, class G>
void check_close(const G& got, const ref::Sum& want, index_t terms) {
  check_close<T>(got, want.value, want.bound, terms);
}

template <class M>
bool bit_identical(const M& a, const M& b) {
  return a.rows() == b.rows() && a.cols() == b.cols() &&
         std::memcmp(a.data(), b.data(), sizeof(typename M::Scalar) * static_cast<std::size_t>(a.size())) == 0;
}

struct shape {
  index_t out, in, n;
};
// (96, 80, 40): m n k above LORA_THRUST_CUBLAS_MIN_MNK, so on CUDA it runs cuBLAS.
const shape kShapes[] = {{8, 8, 1}, {13, 7, 5}, {7, 13, 1}, {32, 48, 17}, {5, 4, 3}, {96, 80, 40}};

template <int Rank>
index_t rank_for(const shape& sh) {
  return Rank == lora::dynamic ? std::min<index_t>(3, std::min(sh.out, sh.in)) : Rank;
}

// |X| |W + s B A|^T + |b| computed as sums of absolute terms (the error scale),
// with Eigen on the host (ref::forward carries the same bound in long double).
template <class T, class Layer>
Host<T> forward_bound(const Layer& host, const Host<T>& X) {
  const T s = std::abs(host.delta().scale());
  Host<T> bound = X.cwiseAbs() * host.base_weight().cwiseAbs().transpose();
  bound += s * (X.cwiseAbs() * host.delta().A().cwiseAbs().transpose()) * host.delta().B().cwiseAbs().transpose();
  if (host.has_bias()) bound.rowwise() += host.bias().cwiseAbs().transpose();
  return bound;
}

}  // namespace
