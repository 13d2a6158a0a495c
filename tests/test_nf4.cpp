// test_nf4.cpp: NF4 format (docs/nf4.md), double quantisation, the signed
// dynamic map, bitsandbytes fixtures, and the fused gemv / gemm kernels.
// Needs LORA_TEST_DATA_DIR (the repo's data/) and LORA_TEST_FIXTURE_DIR
// (tests/fixtures) as string macros.
// Tiny gemm tiles (16 rows once in >= 64) so the kernel tests cross many tile
// boundaries; the default (2^18 floats) would fit every test matrix in one tile.
#define LORA_NF4_GEMM_TILE_FLOATS 1024
#include <lora/quant/dynamic_map.hpp>
#include <lora/lora.hpp>

#include <catch2/catch.hpp>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#ifndef LORA_TEST_DATA_DIR
#error "define LORA_TEST_DATA_DIR as the path of the repository's data/ directory"
#endif
#ifndef LORA_TEST_FIXTURE_DIR
#error "define LORA_TEST_FIXTURE_DIR as the path of tests/fixtures"
#endif

namespace {

using lora::index_t;
using lora::NF4Matrix;
using Dense = NF4Matrix::dense_matrix;
using lora::NF4Options;

std::uint32_t bits_of(float f) { return std::bit_cast<std::uint32_t>(f); }

// Uniform in [lo, hi) from the top 24 bits (the standard distributions are not
// reproducible across standard libraries).
struct Rng {
  std::mt19937 g;
  explicit Rng(unsigned seed) : g(seed) {}
  float uniform(float lo, float hi) { return lo + (hi - lo) * float(g() >> 8) * 0x1p-24f; }
};

// Weight-like data: each row has its own scale, so block absmax values differ.
Dense random_weights(index_t rows, index_t cols, unsigned seed) {
  Rng r(seed);
  Dense W(rows, cols);
  for (index_t i = 0; i < rows; ++i) {
    const float scale = r.uniform(0.01f, 0.1f);
    for (index_t j = 0; j < cols; ++j) W(i, j) = scale * r.uniform(-1.0f, 1.0f);
  }
  return W;
}

// Largest distance from a value in [-1, 1] to its nearest code.
template <std::size_t N>
double max_half_gap(const float (&codes)[N]) {
  double h = double(codes[0]) + 1.0;  // values clamped below the lowest code
  for (std::size_t k = 0; k + 1 < N; ++k) h = std::max(h, (double(codes[k + 1]) - codes[k]) / 2.0);
  return std::max(h, 1.0 - double(codes[N - 1]));
}

template <class T>
std::vector<T> read_raw(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  INFO("fixture file " << path);
  REQUIRE(in.good());
  const std::vector<unsigned char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  REQUIRE(bytes.size() % sizeof(T) == 0);
  std::vector<T> out(bytes.size() / sizeof(T));
  // Fixtures are little-endian; assemble explicitly so big-endian hosts work too.
  for (std::size_t i = 0; i < out.size(); ++i) {
    std::conditional_t<sizeof(T) == 4, std::uint32_t, std::uint8_t> v = 0;
    for (std::size_t b = 0; b < sizeof(T); ++b) v |= decltype(v)(bytes[i * sizeof(T) + b]) << (8 * b);
    out[i] = std::bit_cast<T>(v);
  }
  return out;
}

// y_ref = beta * y0 + alpha * X W^T in double, and the bound on fp32 rounding:
// (in + 2) eps |alpha| sum |w x| + 2 eps |beta y0|, the standard dot-product bound.
void check_product(const Dense& Wd, const Dense& X, const Dense& Y0, const Dense& Y, float alpha, float beta) {
  const double eps = std::numeric_limits<float>::epsilon();
  for (index_t t = 0; t < X.rows(); ++t)
    for (index_t o = 0; o < Wd.rows(); ++o) {
      double dot = 0.0, mag = 0.0;
      for (index_t i = 0; i < Wd.cols(); ++i) {
        dot += double(Wd(o, i)) * X(t, i);
        mag += std::fabs(double(Wd(o, i)) * X(t, i));
      }
      const double y0 = beta == 0.0f ? 0.0 : double(Y0(t, o));
      const double ref = double(alpha) * dot + double(beta) * y0;
      const double tol = double(Wd.cols() + 2) * eps * std::fabs(alpha) * mag + 2 * eps * std::fabs(beta * y0) + 1e-30;
      INFO("token " << t << " row " << o << " ref " << ref << " got " << Y(t, o));
      REQUIRE(std::fabs(double(Y(t, o)) - ref) <= tol);
    }
}

}  // namespace

TEST_CASE("nf4: code values and thresholds are docs/nf4.md's bit for bit", "[nf4]") {
  const std::uint32_t code_bits[16] = {0xbf800000, 0xbf3239b1, 0xbf066b30, 0xbeca32a0, 0xbe91a24d, 0xbe3d353f,
                                       0xbdba7871, 0x00000000, 0x3da2faff, 0x3e24cae3, 0x3e7c04dd, 0x3ead033a,
                                       0x3ee1a4b8, 0x3f1007ab, 0x3f3913b3, 0x3f800000};
  const std::uint32_t threshold_bits[15] = {0xbf591cd8, 0xbf1c5270, 0xbeeb8480, 0xbeadea76, 0xbe703cec,
                                            0xbe0d38bc, 0xbd3a7871, 0x3d22faff, 0x3df64862, 0x3e5067e0,
                                            0x3e9582d4, 0x3ec753f9, 0x3f006d04, 0x3f248daf, 0x3f5c89da};
  for (unsigned k = 0; k < 16; ++k) {
    CHECK(bits_of(lora::nf4::code_values[k]) == code_bits[k]);
    CHECK(bits_of(lora::nf4::code_value(k)) == code_bits[k]);
    CHECK(lora::nf4::code_value(k + 16) == lora::nf4::code_value(k));  // only the low nibble counts
  }
  for (int k = 0; k < 15; ++k) {
    volatile float a = lora::nf4::code_values[k], b = lora::nf4::code_values[k + 1];
    const float mid = (a + b) / 2.0f;  // computed at run time in fp32
    CHECK(bits_of(lora::nf4::thresholds[k]) == threshold_bits[k]);
    CHECK(bits_of(mid) == threshold_bits[k]);
    // Exactly at a threshold goes to the lower code; one ulp above, to the upper.
    CHECK(lora::nf4::encode(lora::nf4::thresholds[k]) == unsigned(k));
    CHECK(lora::nf4::encode(std::nextafter(lora::nf4::thresholds[k], 2.0f)) == unsigned(k + 1));
    CHECK(lora::nf4::encode(std::nextafter(lora::nf4::thresholds[k], -2.0f)) == unsigned(k));
  }
  CHECK(lora::nf4::encode(-1.0f) == 0u);
  CHECK(lora::nf4::encode(1.0f) == 15u);
  CHECK(lora::nf4::encode(0.0f) == 7u);
  CHECK(lora::nf4::encode(-0.0f) == 7u);
  CHECK(lora::nf4::decode(15, 2.5f) == 2.5f);
  CHECK(lora::nf4::decode(0, 3.0f) == -3.0f);
}

TEST_CASE("nf4: packing puts the even element in the high nibble", "[nf4]") {
  const float x[3] = {1.0f, -1.0f, 1.0f};  // codes 15, 0, 15 (+ padding 7)
  const NF4Matrix q = NF4Matrix::quantize(x, 1, 3, {.block_size = 32});
  REQUIRE(q.packed().size() == 2);
  CHECK(q.packed()[0] == 0xF0);
  CHECK(q.packed()[1] == 0xF7);  // odd length: the pad nibble is the zero code
  CHECK(q.code(0) == 15u);
  CHECK(q.code(1) == 0u);
  CHECK(q.code(2) == 15u);
  CHECK(lora::nf4::nibble(q.packed().data(), 3) == 7u);
  // Odd columns: element (1, 0) is the low nibble of byte 1.
  const float y[6] = {0.0f, 0.0f, 0.0f, -1.0f, 1.0f, 0.0f};
  const NF4Matrix r = NF4Matrix::quantize(y, 2, 3, {.block_size = 32});
  CHECK(r.packed()[1] == 0x70);
  CHECK(r.coeff(1, 0) == -1.0f);
  CHECK(r.coeff(1, 1) == 1.0f);
}

TEST_CASE("nf4: hand-computed blocks, ties, zero blocks and the partial block", "[nf4]") {
  // Block 0 (full, 32): absmax 2, values 2 * t_k so v = x * (1/2) = t_k exactly.
  // Block 1 (partial, 17): absmax 4, values 4 * t_k, so v = x / 4 = t_k.
  std::vector<float> x(49, 0.0f);
  x[0] = 2.0f;
  for (int k = 0; k < 15; ++k) x[std::size_t(1 + k)] = 2.0f * lora::nf4::thresholds[k];
  x[32] = -4.0f;
  for (int k = 0; k < 15; ++k) x[std::size_t(33 + k)] = 4.0f * lora::nf4::thresholds[k];
  x[48] = 4.0f * std::nextafter(lora::nf4::thresholds[14], 2.0f);
  const NF4Matrix q = NF4Matrix::quantize(x.data(), 7, 7, {.block_size = 32});
  REQUIRE(q.num_blocks() == 2);
  CHECK(q.absmax()[0] == 2.0f);
  CHECK(q.absmax()[1] == 4.0f);
  CHECK(q.code(0) == 15u);
  for (int k = 0; k < 15; ++k) {
    CHECK(q.code(1 + k) == unsigned(k));
    CHECK(q.code(33 + k) == unsigned(k));
  }
  for (index_t i = 16; i < 32; ++i) CHECK(q.code(i) == 7u);  // zeros in a non-zero block
  CHECK(q.code(32) == 0u);
  CHECK(q.code(48) == 15u);
  CHECK(q.packed().size() == 25);
  CHECK((q.packed()[24] & 15u) == 7u);  // padding of the odd length

  // All-zero blocks (full and partial, with -0.0): absmax 0, codes 7, dequantise to +0.
  std::vector<float> z(64 + 10, 0.0f);
  z[5] = -0.0f;
  const NF4Matrix qz = NF4Matrix::quantize(z.data(), 2, 37, {.block_size = 64});
  for (float a : qz.absmax()) CHECK(a == 0.0f);
  for (index_t i = 0; i < qz.size(); ++i) CHECK(qz.code(i) == 7u);
  const Dense zd = qz.dequantize();
  for (float v : zd.reshaped()) {
    CHECK(!std::isnan(v));
    CHECK(bits_of(v) == 0u);
  }
  // A tiny block is normalised with max(absmax, 1e-38), not divided by zero;
  // being the partial last block, it stores that divisor as its absmax.
  const float tiny[2] = {1e-45f, -1e-45f};
  const NF4Matrix qt = NF4Matrix::quantize(tiny, 1, 2, {.block_size = 32});
  CHECK(qt.absmax()[0] == 1e-38f);
  CHECK(qt.code(0) == 7u);
  CHECK(qt.code(1) == 7u);
}

TEST_CASE("nf4: a block with a subnormal absmax stores what bitsandbytes stores", "[nf4]") {
  // Hand-derived (bitsandbytes 0.50.2 agrees: fixture sub_tail): values below
  // 1e-38 are normalised by 1e-38, so 2.5e-39 -> v = 0.25 -> code 10 and
  // -1e-39 -> v = -0.1 -> code 6.
  const float pattern[4] = {2.5e-39f, -1e-39f, 5e-40f, 0.0f};
  std::vector<float> x(32 + 16);
  for (std::size_t i = 0; i < 32; ++i) x[i] = 0.25f * float(int(i) - 16) / 16.0f;  // block 0: absmax 1 / 4
  for (std::size_t i = 32; i < x.size(); ++i) x[i] = pattern[i % 4];
  const NF4Matrix q = NF4Matrix::quantize(x.data(), 3, 16, {.block_size = 32});
  REQUIRE(q.num_blocks() == 2);
  // The partial last block stores its divisor 1e-38 (not 2.5e-39), so it
  // dequantises to code * 1e-38 = about x, not 4x too small.
  CHECK(bits_of(q.absmax()[1]) == bits_of(1e-38f));
  const unsigned want[4] = {10u, 6u, 8u, 7u};
  for (index_t i = 32; i < 48; ++i) {
    INFO("element " << i);
    CHECK(q.code(i) == want[i % 4]);
    CHECK(bits_of(q.coeff(i / 16, i % 16)) == bits_of(lora::nf4::code_values[want[i % 4]] * 1e-38f));
  }
  CHECK(std::fabs(q.coeff(2, 0) - 2.5e-39f) < 0.05f * 2.5e-39f);
  // A full block with a subnormal absmax: bitsandbytes stores the absmax as is
  // (with codes normalised by 1e-38); so does this library (docs/nf4.md).
  std::vector<float> full(32);
  for (std::size_t i = 0; i < full.size(); ++i) full[i] = pattern[i % 4];
  const NF4Matrix qf = NF4Matrix::quantize(full.data(), 1, 32, {.block_size = 32});
  CHECK(bits_of(qf.absmax()[0]) == bits_of(2.5e-39f));
  for (index_t i = 0; i < 32; ++i) CHECK(qf.code(i) == want[i % 4]);
}

TEST_CASE("nf4: a double-quantised group of equal scales stores code 0 and absmax2 0", "[nf4][dq]") {
  // bitsandbytes' quantize_4bit(compress_statistics=True) on CPU (its native
  // quantize_blockwise) stores code 0 and absmax2 0 for a group of spread 0
  // (fixture dq_flat_4x64_b64); the scale decodes to map8[0] * 0 + offset.
  for (const index_t blocks : {4, 256, 300}) {
    std::vector<float> x(std::size_t(blocks * 64));
    for (std::size_t i = 0; i < x.size(); ++i) x[i] = i % 2 ? -0.25f : 0.5f;
    const NF4Matrix q = NF4Matrix::quantize(x.data(), blocks, 64, {.block_size = 64, .double_quant = true});
    INFO(blocks << " blocks");
    CHECK(q.absmax_offset() == 0.5f);
    for (std::uint8_t c : q.absmax_q8()) REQUIRE(c == 0u);
    for (float a2 : q.absmax2()) CHECK(bits_of(a2) == 0u);
    for (index_t b = 0; b < q.num_blocks(); ++b) REQUIRE(q.block_scale(b) == 0.5f);
  }
  // One flat group next to one that is not: only the flat one stores 0s.
  std::vector<float> absmax(512, 1.0f);
  for (std::size_t b = 256; b < 512; ++b) absmax[b] = b % 2 ? 2.0f : 0.0f;  // mean 1 = offset
  std::vector<float> x(512 * 32, 0.0f);
  for (std::size_t b = 0; b < 512; ++b) x[b * 32] = absmax[b];
  const NF4Matrix q = NF4Matrix::quantize(x.data(), 512, 32, {.block_size = 32, .double_quant = true});
  REQUIRE(q.absmax_offset() == 1.0f);
  CHECK(q.absmax2()[0] == 0.0f);
  CHECK(q.absmax2()[1] == 1.0f);
  for (std::size_t b = 0; b < 256; ++b) REQUIRE(q.absmax_q8()[b] == 0u);
  for (std::size_t b = 256; b < 512; ++b) REQUIRE(q.absmax_q8()[b] == (b % 2 ? 255u : 0u));
  for (index_t b = 0; b < 256; ++b) REQUIRE(q.block_scale(b) == 1.0f);
  // map8[0] = -0.99297 * 1 + 1: the 8-bit map does not reach -1.
  for (index_t b = 256; b < 512; ++b)
    REQUIRE(q.block_scale(b) == (b % 2 ? 2.0f : lora::dynamic_map::signed_values[0] + 1.0f));
}

TEST_CASE("nf4: dequantise(quantise(x)) error is at most half the largest code gap times absmax", "[nf4]") {
  const double h = max_half_gap(lora::nf4::code_values);
  CHECK(h == Approx(0.1519035995006561).epsilon(1e-7));  // (code[1] - code[0]) / 2
  struct Case { index_t rows, cols, bs; };
  for (const Case c : {Case{1, 1, 32}, Case{3, 5, 32}, Case{7, 33, 64}, Case{16, 257, 128}, Case{4, 1000, 4096},
                       Case{64, 64, 64}}) {
    const Dense W = random_weights(c.rows, c.cols, unsigned(c.rows * 1000 + c.cols));
    const NF4Matrix q = NF4Matrix::quantize(W, {.block_size = c.bs});
    const Dense D = q.dequantize();
    for (index_t i = 0; i < q.size(); ++i) {
      const float a = q.absmax()[std::size_t(i / c.bs)];
      const double err = std::fabs(double(W.data()[i]) - D.data()[i]);
      INFO("shape " << c.rows << " x " << c.cols << " block " << c.bs << " element " << i);
      REQUIRE(err <= h * a * (1 + 1e-6) + 1e-30);
    }
  }
}

TEST_CASE("nf4: double quantisation reconstructs block scales within the 8-bit bound", "[nf4][dq]") {
  const double h8 = max_half_gap(lora::dynamic_map::signed_values);
  for (const index_t bs : {32, 64}) {
    const Dense W = random_weights(37, 1100, unsigned(bs));  // 40700 elements: 636 / 1272 blocks, partial groups
    const NF4Matrix plain = NF4Matrix::quantize(W, {.block_size = bs});
    const NF4Matrix dq = NF4Matrix::quantize(W, {.block_size = bs, .double_quant = true});
    REQUIRE(dq.double_quantized());
    REQUIRE(dq.absmax().empty());
    REQUIRE(dq.absmax_q8().size() == std::size_t(dq.num_blocks()));
    REQUIRE(dq.num_scale_groups() == (dq.num_blocks() + 255) / 256);
    CHECK(dq.packed().size() == plain.packed().size());
    for (std::size_t i = 0; i < plain.packed().size(); ++i) REQUIRE(dq.packed()[i] == plain.packed()[i]);
    double mean = 0.0;
    for (float a : plain.absmax()) mean += a;
    mean /= double(plain.num_blocks());
    CHECK(dq.absmax_offset() == Approx(mean).epsilon(1e-6));
    const double eps = std::numeric_limits<float>::epsilon();
    for (index_t b = 0; b < dq.num_blocks(); ++b) {
      const double a = plain.absmax()[std::size_t(b)];
      const double a2 = dq.absmax2()[std::size_t(b / 256)];
      const double tol = a2 * h8 * (1 + 1e-6) + 2 * eps * (a2 + std::fabs(dq.absmax_offset()) + a);
      INFO("block " << b);
      REQUIRE(std::fabs(dq.block_scale(b) - a) <= tol);
    }
  }
}

TEST_CASE("nf4: storage is 4.127 bits per parameter with double quantisation at block 64", "[nf4]") {
  CHECK(lora::nf4::nominal_bits_per_parameter(64, true) == 4.126953125);
  CHECK(lora::nf4::nominal_bits_per_parameter(64, false) == 4.5);
  const Dense W = random_weights(1024, 4096, 7);
  const NF4Matrix q = NF4Matrix::quantize(W, {.double_quant = true});
  // codes + 1 byte per block + 4 bytes per 256 blocks + the 4-byte offset
  CHECK(q.storage_bytes() == std::size_t(1024 * 4096 / 2 + 65536 + 4 * 256 + 4));
  CHECK(q.bits_per_parameter() == Approx(4.126953125).margin(1e-5));
  CHECK(std::round(q.bits_per_parameter() * 1000) / 1000 == 4.127);
  const NF4Matrix p = NF4Matrix::quantize(W);
  CHECK(p.bits_per_parameter() == 4.5);
}

TEST_CASE("nf4: dequantize_rows and dequantize_range agree with the whole matrix", "[nf4]") {
  const Dense W = random_weights(9, 37, 3);  // odd columns: rows start on odd elements
  const NF4Matrix q = NF4Matrix::quantize(W, {.block_size = 32, .double_quant = true});
  const Dense D = q.dequantize();
  for (index_t r0 = 0; r0 < 9; ++r0)
    for (index_t cnt = 0; r0 + cnt <= 9; cnt += 2) {
      std::vector<float> out(std::size_t(cnt * 37));
      q.dequantize_rows(r0, cnt, out.data());
      for (index_t i = 0; i < cnt * 37; ++i) REQUIRE(bits_of(out[std::size_t(i)]) == bits_of(D.data()[r0 * 37 + i]));
    }
  for (index_t first : {0, 1, 31, 32, 33, 100, 332}) {
    const index_t cnt = std::min<index_t>(101, q.size() - first);
    std::vector<float> out(static_cast<std::size_t>(cnt));
    q.dequantize_range(first, cnt, out.data());
    for (index_t i = 0; i < cnt; ++i) REQUIRE(bits_of(out[std::size_t(i)]) == bits_of(D.data()[first + i]));
  }
  for (index_t r = 0; r < 9; ++r)
    for (index_t c = 0; c < 37; ++c) REQUIRE(q.coeff(r, c) == D(r, c));
}

TEST_CASE("nf4: fused gemv and gemm equal dequantise-then-multiply", "[nf4][kernels]") {
  struct Case { index_t out, in, bs; bool dq; };
  const Case cases[] = {{1, 64, 64, false},   {7, 33, 32, false},   {13, 130, 64, true}, {64, 128, 64, false},
                        {33, 192, 64, true},  {17, 320, 64, false}, {9, 256, 128, true}, {3, 100, 32, false},
                        {8, 256, 256, false}, {5, 96, 32, true},    {11, 1, 32, false}};
  const float ab[][2] = {{1.0f, 0.0f}, {0.5f, 2.0f}, {-1.5f, 1.0f}};
  for (const Case& c : cases) {
    const Dense W = random_weights(c.out, c.in, unsigned(c.out * 31 + c.in));
    const NF4Matrix q = NF4Matrix::quantize(W, {.block_size = c.bs, .double_quant = c.dq});
    const Dense Wd = q.dequantize();
    for (index_t n = 1; n <= 17; ++n) {
      const Dense X = random_weights(n, c.in, unsigned(n + 100));
      const Dense Y0 = random_weights(n, c.out, unsigned(n + 200));
      for (const auto& p : ab) {
        INFO("out " << c.out << " in " << c.in << " block " << c.bs << " dq " << c.dq << " n " << n << " alpha "
                    << p[0] << " beta " << p[1]);
        Dense Y = Y0;
        lora::nf4_gemm(q, X, Y, p[0], p[1]);
        check_product(Wd, X, Y0, Y, p[0], p[1]);
        if (n == 1) {
          Eigen::VectorXf y = Y0.row(0).transpose();
          const Eigen::VectorXf x = X.row(0).transpose();
          lora::nf4_gemv(q, x, y, p[0], p[1]);
          check_product(Wd, X, Y0, y.transpose(), p[0], p[1]);
        }
      }
    }
  }
}

TEST_CASE("nf4: nf4_gemm_transposed equals G times the dequantised W", "[nf4][kernels]") {
  const double eps = std::numeric_limits<float>::epsilon();
  for (const index_t out : {1, 7, 70}) {
    const Dense W = random_weights(out, 45, unsigned(out));
    const NF4Matrix q = NF4Matrix::quantize(W, {.block_size = 32, .double_quant = true});
    const Dense Wd = q.dequantize();
    for (const index_t n : {1, 5}) {
      const Dense G = random_weights(n, out, 3);
      const Dense dX0 = random_weights(n, 45, 4);
      Dense dX = dX0;
      lora::nf4_gemm_transposed(q, G, dX, 2.0f, 0.5f);
      for (index_t t = 0; t < n; ++t)
        for (index_t i = 0; i < 45; ++i) {
          double ref = 0.5 * dX0(t, i), mag = std::fabs(0.5 * dX0(t, i));
          for (index_t o = 0; o < out; ++o) {
            ref += 2.0 * double(G(t, o)) * Wd(o, i);
            mag += std::fabs(2.0 * double(G(t, o)) * Wd(o, i));
          }
          REQUIRE(std::fabs(dX(t, i) - ref) <= double(out + 3) * eps * mag + 1e-30);
        }
    }
  }
  Dense G(2, 6), dX(2, 44);
  const NF4Matrix q = NF4Matrix::quantize(random_weights(7, 45, 1), {.block_size = 32});
  CHECK_THROWS_WITH(lora::nf4_gemm_transposed(q, G, dX), Catch::Contains("G has 6 columns, expected W.rows() = 7"));
  Dense G7(2, 7);
  CHECK_THROWS_WITH(lora::nf4_gemm_transposed(q, G7, dX), Catch::Contains("dX is 2 x 44, expected 2 x 45"));
}

TEST_CASE("nf4: kernels on a matrix large enough to run in parallel", "[nf4][kernels]") {
  // 300 x 320 = 96000 elements, above LORA_NF4_PARALLEL_MIN_ELEMENTS: the OpenMP
  // loops run when built with -fopenmp; in = 320 takes the AVX-512 path when built for it.
  for (const bool dq : {false, true}) {
    const Dense W = random_weights(300, 320, 11);
    const NF4Matrix q = NF4Matrix::quantize(W, {.double_quant = dq});
    const Dense Wd = q.dequantize();
    for (const index_t n : {1, 3, 40}) {
      const Dense X = random_weights(n, 320, unsigned(n));
      const Dense Y0 = random_weights(n, 300, unsigned(n + 1));
      Dense Y = Y0;
      lora::nf4_gemm(q, X, Y, 0.75f, -0.5f);
      check_product(Wd, X, Y0, Y, 0.75f, -0.5f);
    }
  }
}

TEST_CASE("nf4: gemv with beta = 0 ignores NaN in y; empty matrices are fine", "[nf4][kernels]") {
  const Dense W = random_weights(4, 64, 1);
  const NF4Matrix q = NF4Matrix::quantize(W);
  std::vector<float> x(64, 1.0f), y(4, std::numeric_limits<float>::quiet_NaN());
  lora::nf4_gemv(q, x, y);
  for (float v : y) CHECK(std::isfinite(v));
  const NF4Matrix e = NF4Matrix::quantize(nullptr, 0, 5);
  CHECK(e.num_blocks() == 0);
  CHECK(e.storage_bytes() == 0);
  std::vector<float> x5(5, 1.0f);
  lora::nf4_gemv(e, x5, std::span<float>{});
  const NF4Matrix ed = NF4Matrix::quantize(nullptr, 0, 0, {.double_quant = true});
  CHECK(ed.absmax_offset() == 0.0f);
}

TEST_CASE("nf4: bad input throws typed errors that name the values", "[nf4][errors]") {
  const std::vector<float> x(96, 0.5f);
  for (const index_t bs : {48, 16, 8192, 0, -64}) {
    const std::string msg = "NF4Matrix::quantize: block_size " + std::to_string(bs) +
                            " is not a power of two in [32, 4096]";
    CHECK_THROWS_AS(NF4Matrix::quantize(x.data(), 2, 48, {.block_size = bs}), lora::ValueError);
    CHECK_THROWS_WITH(NF4Matrix::quantize(x.data(), 2, 48, {.block_size = bs}), msg);
  }
  std::vector<float> bad = x;
  bad[50] = std::numeric_limits<float>::quiet_NaN();
  CHECK_THROWS_AS(NF4Matrix::quantize(bad.data(), 2, 48), lora::ValueError);
  CHECK_THROWS_WITH(NF4Matrix::quantize(bad.data(), 2, 48),
                    Catch::Contains("NF4Matrix::quantize: non-finite value nan at flat index 50 (row 1, column 2)"));
  bad[50] = 0.0f;
  bad[3] = -std::numeric_limits<float>::infinity();
  CHECK_THROWS_WITH(NF4Matrix::quantize(bad.data(), 2, 48), Catch::Contains("-inf at flat index 3"));
  CHECK_THROWS_AS(NF4Matrix::quantize(x.data(), -1, 3), lora::ShapeError);

  const NF4Matrix q = NF4Matrix::quantize(x.data(), 2, 48);
  std::vector<float> y(2), x47(47), y3(3);
  CHECK_THROWS_AS(lora::nf4_gemv(q, x47, y), lora::ShapeError);
  CHECK_THROWS_WITH(lora::nf4_gemv(q, x47, y), Catch::Contains("nf4_gemv: x has 47 elements, expected W.cols() = 48"));
  CHECK_THROWS_WITH(lora::nf4_gemv(q, std::span<const float>(x.data(), 48), y3),
                    Catch::Contains("nf4_gemv: y has 3 elements, expected W.rows() = 2"));
  Dense X(4, 47), Y(4, 2), X48(4, 48), Y3(3, 2);
  CHECK_THROWS_AS(lora::nf4_gemm(q, X, Y), lora::ShapeError);
  CHECK_THROWS_WITH(lora::nf4_gemm(q, X, Y), Catch::Contains("nf4_gemm: X has 47 columns, expected W.cols() = 48"));
  CHECK_THROWS_WITH(lora::nf4_gemm(q, X48, Y3), Catch::Contains("nf4_gemm: Y is 3 x 2, expected 4 x 2"));
  std::vector<float> out(200);
  CHECK_THROWS_AS(q.dequantize_rows(1, 2, out.data()), lora::ShapeError);
  CHECK_THROWS_WITH(q.dequantize_rows(1, 2, out.data()), Catch::Contains("2 rows from row 1 are outside [0, 2)"));

  const std::vector<std::uint8_t> packed(48);
  const std::vector<float> absmax(3);
  CHECK_NOTHROW(NF4Matrix::from_parts(2, 48, 32, packed, absmax));
  CHECK_THROWS_AS(NF4Matrix::from_parts(2, 48, 32, std::span(packed).first(47), absmax), lora::FormatError);
  CHECK_THROWS_WITH(NF4Matrix::from_parts(2, 48, 32, std::span(packed).first(47), absmax),
                    Catch::Contains("packed has 47 entries, expected 48"));
  CHECK_THROWS_WITH(NF4Matrix::from_parts(2, 48, 64, packed, absmax), Catch::Contains("absmax has 3 entries, expected 2"));
  const std::vector<float> short_map(255, 0.0f);
  CHECK_THROWS_WITH(NF4Matrix::quantize(x.data(), 2, 48, {.double_quant = true, .map8 = short_map}),
                    Catch::Contains("map8 has 255 entries, expected 256"));
  std::vector<float> unsorted(lora::dynamic_map::signed_values, lora::dynamic_map::signed_values + 256);
  std::swap(unsorted[10], unsorted[11]);
  CHECK_THROWS_AS(NF4Matrix::quantize(x.data(), 2, 48, {.double_quant = true, .map8 = unsorted}), lora::ValueError);
}

TEST_CASE("dynamic map: the embedded table equals data/bnb_dynamic_map_signed.tsv", "[nf4][map]") {
  std::ifstream in(std::string(LORA_TEST_DATA_DIR) + "/bnb_dynamic_map_signed.tsv");
  REQUIRE(in.good());
  std::string line;
  int count = 0;
  while (std::getline(in, line)) {
    if (line.empty() || line[0] == '#') continue;
    std::istringstream fields(line);
    int index = -1;
    std::string value, bits;
    fields >> index >> value >> bits;
    REQUIRE(index == count);
    const auto parsed = std::uint32_t(std::stoul(bits, nullptr, 16));
    CHECK(lora::dynamic_map::signed_bits[index] == parsed);
    CHECK(bits_of(std::stof(value)) == parsed);  // the shortest repr column agrees too
    ++count;
  }
  CHECK(count == 256);
  for (int k = 0; k + 1 < 256; ++k) {
    CHECK(lora::dynamic_map::signed_values[k] < lora::dynamic_map::signed_values[k + 1]);
    volatile float a = lora::dynamic_map::signed_values[k], b = lora::dynamic_map::signed_values[k + 1];
    CHECK(bits_of(lora::dynamic_map::signed_thresholds[k]) == bits_of((a + b) / 2.0f));
  }
  CHECK(lora::dynamic_map::signed_values[255] == 1.0f);
  CHECK(lora::dynamic_map::signed_values[127] == 0.0f);
}

TEST_CASE("dynamic map: the construction reproduces the table to 1 ulp in exactly 4 entries", "[nf4][map]") {
  // See create_dynamic_map(): torch.linspace's last bits depend on the torch build.
  const std::vector<float> built = lora::dynamic_map::create_dynamic_map(true, 7, 8);
  REQUIRE(built.size() == 256);
  int differing = 0;
  long max_ulps = 0;
  for (int k = 0; k < 256; ++k) {
    const long d = std::labs(long(bits_of(built[std::size_t(k)])) - long(lora::dynamic_map::signed_bits[k]));
    differing += d != 0;
    max_ulps = std::max(max_ulps, d);
  }
  CHECK(differing == 4);
  CHECK(max_ulps == 1);
  const std::vector<float> unsigned_map = lora::dynamic_map::create_dynamic_map(false, 7, 8);
  REQUIRE(unsigned_map.size() == 256);
  CHECK(std::is_sorted(unsigned_map.begin(), unsigned_map.end()));
  CHECK(unsigned_map.front() == 0.0f);
  CHECK(unsigned_map.back() == 1.0f);
  CHECK_THROWS_AS(lora::dynamic_map::create_dynamic_map(true, 9, 8), lora::ValueError);
  // encode: ties at a midpoint go to the lower code.
  for (int k = 0; k < 255; k += 17)
    CHECK(lora::dynamic_map::encode(lora::dynamic_map::signed_thresholds[k], lora::dynamic_map::signed_thresholds) ==
          k);
}

// Bytes from bitsandbytes' reference backend, or its public API where the
// manifest's source column says "api" (dq_flat_4x64_b64).
TEST_CASE("nf4: bytes match bitsandbytes' reference backend (tests/fixtures/nf4)", "[nf4][fixtures]") {
  const std::string dir = std::string(LORA_TEST_FIXTURE_DIR) + "/nf4/";
  std::ifstream manifest(dir + "manifest.txt");
  REQUIRE(manifest.good());
  std::string line;
  int cases = 0, exact_offsets = 0;
  while (std::getline(manifest, line)) {
    if (line.empty() || line[0] == '#') continue;
    std::istringstream fields(line);
    std::string name, map_name;
    index_t rows = 0, cols = 0, bs = 0;
    int dq = 0;
    fields >> name >> rows >> cols >> bs >> dq >> map_name;
    INFO("fixture " << name);
    const auto input = read_raw<float>(dir + name + ".in.f32");
    const auto packed = read_raw<std::uint8_t>(dir + name + ".packed.u8");
    const auto expected = read_raw<float>(dir + name + ".out.f32");
    REQUIRE(index_t(input.size()) == rows * cols);
    REQUIRE(expected.size() == input.size());

    std::vector<float> map8, offset;
    if (dq) {
      map8 = read_raw<float>(dir + name + ".map8.f32");
      offset = read_raw<float>(dir + name + ".offset.f32");
      REQUIRE(offset.size() == 1);
    }
    if (map_name == "tsv") {  // the file's map is the built-in one: use the default
      for (int k = 0; k < 256; ++k) REQUIRE(bits_of(map8[std::size_t(k)]) == lora::dynamic_map::signed_bits[k]);
    }
    const std::span<const float> map_option = map_name == "tsv" ? std::span<const float>{} : map8;
    // Our own offset (a correctly rounded mean) is within an ulp of torch's.
    if (dq) {
      const NF4Matrix own = NF4Matrix::quantize(input.data(), rows, cols,
                                                {.block_size = bs, .double_quant = true, .map8 = map_option});
      const long ulps = std::labs(long(bits_of(own.absmax_offset())) - long(bits_of(offset[0])));
      CHECK(ulps <= 1);
      exact_offsets += ulps == 0;
    }
    // With the file's offset, every byte and scale must match.
    const NF4Matrix q = NF4Matrix::quantize(
        input.data(), rows, cols,
        {.block_size = bs, .double_quant = dq != 0, .map8 = map_option,
         .absmax_offset = dq ? std::optional<float>(offset[0]) : std::nullopt});
    REQUIRE(q.packed().size() == packed.size());
    for (std::size_t i = 0; i < packed.size(); ++i) {
      INFO("byte " << i);
      REQUIRE(q.packed()[i] == packed[i]);
    }
    NF4Matrix parts;
    if (dq) {
      const auto q8 = read_raw<std::uint8_t>(dir + name + ".q8.u8");
      const auto absmax2 = read_raw<float>(dir + name + ".absmax2.f32");
      CHECK(bits_of(q.absmax_offset()) == bits_of(offset[0]));
      REQUIRE(q.absmax_q8().size() == q8.size());
      for (std::size_t b = 0; b < q8.size(); ++b) {
        INFO("scale code " << b);
        REQUIRE(q.absmax_q8()[b] == q8[b]);
      }
      REQUIRE(q.absmax2().size() == absmax2.size());
      for (std::size_t g = 0; g < absmax2.size(); ++g) CHECK(bits_of(q.absmax2()[g]) == bits_of(absmax2[g]));
      parts = NF4Matrix::from_parts(rows, cols, bs, packed, q8, absmax2, offset[0], map8);
    } else {
      const auto absmax = read_raw<float>(dir + name + ".absmax.f32");
      REQUIRE(q.absmax().size() == absmax.size());
      for (std::size_t b = 0; b < absmax.size(); ++b) {
        INFO("block " << b);
        // Documented divergence: bitsandbytes stores max(absmax, 1e-38) for an
        // all-zero *partial* last block; we store 0 (both dequantise to 0).
        if (name == "zero_tail" && b + 1 == absmax.size()) {
          CHECK(q.absmax()[b] == 0.0f);
          CHECK(absmax[b] == 1e-38f);
          continue;
        }
        CHECK(bits_of(q.absmax()[b]) == bits_of(absmax[b]));
      }
      parts = NF4Matrix::from_parts(rows, cols, bs, packed, absmax);
    }
    // Dequantised values bit for bit, from our quantisation and from their bytes.
    std::vector<float> ours(input.size()), theirs(input.size());
    q.dequantize(ours.data());
    parts.dequantize(theirs.data());
    for (std::size_t i = 0; i < expected.size(); ++i) {
      INFO("element " << i);
      REQUIRE(bits_of(ours[i]) == bits_of(expected[i]));
      REQUIRE(bits_of(theirs[i]) == bits_of(expected[i]));
    }
    ++cases;
  }
  CHECK(cases == 17);
  // torch's fp32 cascade sum rounds differently from our double sum in 2 of
  // the 5 double-quant fixtures (by one ulp, checked above).
  CHECK(exact_offsets == 3);
}

TEST_CASE("NF4: non-finite or negative scales and offsets are refused, naming the field", "[nf4][errors]") {
  constexpr float inf = std::numeric_limits<float>::infinity(), nan = std::numeric_limits<float>::quiet_NaN();
  const std::vector<std::uint8_t> packed(48);
  for (const float bad : {nan, inf, -1.0f}) {
    CAPTURE(bad);
    const std::vector<float> absmax = {1.0f, bad, 2.0f};
    CHECK_THROWS_AS(NF4Matrix::from_parts(2, 48, 32, packed, absmax), lora::ValueError);
    CHECK_THROWS_WITH(NF4Matrix::from_parts(2, 48, 32, packed, absmax), Catch::Contains("absmax[1] = "));
  }
  const std::vector<std::uint8_t> q8(3, 200);
  const std::vector<float> absmax2 = {0.5f};
  CHECK_NOTHROW(NF4Matrix::from_parts(2, 48, 32, packed, q8, absmax2, 0.25f));
  for (const float bad : {nan, inf, -inf}) {
    CAPTURE(bad);
    CHECK_THROWS_WITH(NF4Matrix::from_parts(2, 48, 32, packed, q8, absmax2, bad),
                      Catch::Contains("offset = ") && Catch::Contains("not finite"));
    CHECK_THROWS_WITH(NF4Matrix::from_parts(2, 48, 32, packed, q8, std::vector<float>{bad}, 0.25f),
                      Catch::Contains("absmax2[0] = "));
  }
  // Finite parts whose float reconstruction map8[q] * absmax2 + offset overflows.
  const float big = std::numeric_limits<float>::max();
  CHECK_THROWS_WITH(NF4Matrix::from_parts(2, 48, 32, packed, q8, std::vector<float>{big}, big),
                    Catch::Contains("beyond the float range"));
  const NF4Matrix ok = NF4Matrix::from_parts(2, 48, 32, packed, q8, std::vector<float>{big / 4}, big / 4);
  const Dense w = ok.dequantize();
  CHECK(w.allFinite());
}

TEST_CASE("NF4: quantising blocks near the float limit keeps every scale finite", "[nf4][errors]") {
  // 2 x 4096 values at +-3e38: the float sum of 128 block maxima overflows; the
  // offset (their mean) must not become Inf.
  Dense x(2, 4096);
  for (index_t i = 0; i < x.size(); ++i) x.data()[i] = (i % 3 == 0 ? -3e38f : 3e38f) * (0.5f + 0.5f * float(i % 7) / 6);
  const NF4Matrix q = NF4Matrix::quantize(x.data(), 2, 4096, {.double_quant = true});
  CHECK(std::isfinite(q.absmax_offset()));
  const Dense w = q.dequantize();
  REQUIRE(w.allFinite());
  // Every element within one NF4 step of its block's scale (the quantiser's own
  // error bound is about half a code gap of the block absmax, here <= 3e38).
  CHECK(((w - x).cwiseAbs().maxCoeff()) <= 0.25 * 3e38);
  CHECK_THROWS_WITH(NF4Matrix::quantize(x.data(), 2, 4096, {.double_quant = true, .absmax_offset = -3e38f}),
                    Catch::Contains("overflows float"));
  CHECK_THROWS_WITH(NF4Matrix::quantize(x.data(), 2, 4096, {.double_quant = true, .absmax_offset = std::numeric_limits<float>::quiet_NaN()}),
                    Catch::Contains("absmax_offset = "));
}

TEST_CASE("NF4: sizes and ranges that overflow index_t are refused, not wrapped", "[nf4][errors]") {
  const index_t huge = index_t(1) << 32;  // 2^32 x 2^32 wraps a 64-bit signed size
  const std::vector<std::uint8_t> none;
  const std::vector<float> no_scales;
  CHECK_THROWS_AS(NF4Matrix::from_parts(huge, huge, 64, none, no_scales), lora::ShapeError);
  CHECK_THROWS_WITH(NF4Matrix::from_parts(huge, huge, 64, none, no_scales),
                    Catch::Contains("4294967296 * 4294967296 overflows"));
  const float x = 1.0f;
  CHECK_THROWS_AS(NF4Matrix::quantize(&x, huge, huge), lora::ShapeError);
  const index_t max = std::numeric_limits<index_t>::max();
  CHECK_THROWS_AS(NF4Matrix::quantize(&x, 1, max), lora::ShapeError);  // n + block size would wrap

  std::vector<float> w(2 * 64, 0.5f), out(64);
  const NF4Matrix q = NF4Matrix::quantize(w.data(), 2, 64);
  // first + count wraps to a negative number that passed the old check.
  CHECK_THROWS_WITH(q.dequantize_range(10, max - 5, out.data()), Catch::Contains("are outside [0, 128)"));
  CHECK_THROWS_AS(q.dequantize_rows(1, max, out.data()), lora::ShapeError);
  q.dequantize_range(64, 64, out.data());
  CHECK(out[63] == q.coeff(1, 63));
}

// ---------------------------------------------------------------------------
// The 8-bit rule of bitsandbytes' native CPU quantiser (ScaleRounding::bitsandbytes_native).

TEST_CASE("dynamic map: the native CPU rule snaps to 65536 bins, then takes the nearest code", "[nf4][dq]") {
  namespace dm = lora::dynamic_map;
  CHECK(dm::native_bin(-1.0f) == 0);
  CHECK(dm::native_bin(1.0f) == 65535);
  CHECK(dm::native_bin(-7.0f) == 0);  // clamped
  CHECK(dm::native_bin(std::numeric_limits<float>::infinity()) == 65535);
  CHECK(dm::native_bin(std::numeric_limits<float>::quiet_NaN()) == 0);  // 0 * inf in bitsandbytes
  CHECK(dm::native_bin(0.0f) == 32768);  // fma(0.5, 65535, 0.5) = 32768 exactly
  CHECK(dm::native_bin_centre(0) == -1.0f);
  CHECK(dm::native_bin_centre(65535) == 1.0f);
  CHECK(bits_of(dm::native_bin_centre(32768)) == bits_of(65536.0f / 65535.0f - 1.0f));
  // v = 0 is code 127 (the map's 0) when rounded to nearest, but its bin's centre
  // 1.5259e-5 is nearest to the map's 2.1e-5 (code 131): a scale equal to the
  // offset moves by 2.1e-5 * absmax2 under the native rule.
  CHECK(dm::encode(0.0f, dm::signed_thresholds) == 127);
  CHECK(dm::encode_native(0.0f, dm::signed_thresholds) == 131);
  CHECK(dm::encode_native(-1.0f, dm::signed_thresholds) == 0);
  CHECK(dm::encode_native(1.0f, dm::signed_thresholds) == 255);
  // Away from 0 the two agree except near a midpoint: every code's own value maps to itself.
  int same = 0;
  for (int k = 0; k < dm::size; ++k) same += dm::encode_native(dm::signed_values[k], dm::signed_thresholds) == k;
  CHECK(same >= 240);
  // Never more than 2 / 65535 farther from v than the nearest code (bin half-width 1 / 65535).
  Rng r(7);
  for (int i = 0; i < 200000; ++i) {
    const float v = r.uniform(-1.0f, 1.0f) * (i % 2 ? 1.0f : 1e-3f);
    const double near = std::fabs(double(dm::signed_values[dm::encode(v, dm::signed_thresholds)]) - v);
    const double nat = std::fabs(double(dm::signed_values[dm::encode_native(v, dm::signed_thresholds)]) - v);
    INFO("v " << v);
    REQUIRE(nat >= near);
    REQUIRE(nat - near <= 2.0 / 65535 + 1e-7);
  }
}

namespace {

// One line of tests/fixtures/nf4/adv/manifest.txt (format in its header).
struct AdvCase {
  std::string name;
  index_t rows = 0, cols = 0, bs = 0;
  int plain = 0, dq = 0;
  std::string api_plain, api_dq, q8_diffs, note;
  bool has_note(const std::string& key) const { return note.find(key) != std::string::npos; }
};

std::vector<AdvCase> read_adv_manifest(const std::string& dir) {
  std::ifstream in(dir + "manifest.txt");
  REQUIRE(in.good());
  std::vector<AdvCase> out;
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty() || line[0] == '#') continue;
    std::istringstream f(line);
    AdvCase c;
    f >> c.name >> c.rows >> c.cols >> c.bs >> c.plain >> c.dq >> c.api_plain >> c.api_dq >> c.q8_diffs >> c.note;
    REQUIRE(!f.fail());
    out.push_back(c);
  }
  return out;
}

// "3,7,12" -> {3, 7, 12}; "none" / "-" -> {}.
std::vector<std::size_t> parse_indices(const std::string& list) {
  std::vector<std::size_t> out;
  if (list == "none" || list == "-") return out;
  std::istringstream f(list);
  std::string item;
  while (std::getline(f, item, ',')) out.push_back(std::stoul(item));
  return out;
}

// Groups of spread 0, from the note "flat_groups=0,2".
std::vector<std::size_t> flat_groups_of(const AdvCase& c) {
  const auto at = c.note.find("flat_groups=");
  if (at == std::string::npos) return {};
  const std::string rest = c.note.substr(at + 12);
  return parse_indices(rest.substr(0, rest.find(';')));
}

// The public API's file for a key where it differs, else the reference backend's.
template <class T>
std::vector<T> read_api(const std::string& dir, const std::string& name, const std::string& key) {
  const std::string api = dir + name + ".api." + key;
  return read_raw<T>(std::filesystem::exists(api) ? api : dir + name + "." + key);
}

void require_same_bits(const std::vector<float>& ours, const std::vector<float>& theirs, const char* what) {
  REQUIRE(ours.size() == theirs.size());
  for (std::size_t i = 0; i < ours.size(); ++i) {
    INFO(what << " element " << i << ": ours " << ours[i] << ", bitsandbytes " << theirs[i]);
    REQUIRE(bits_of(ours[i]) == bits_of(theirs[i]));
  }
}

std::vector<float> dequantized(const NF4Matrix& q) {
  std::vector<float> out(std::size_t(q.size()));
  q.dequantize(out.data());
  return out;
}

}  // namespace

// Thresholds (exact after a power-of-two absmax) and one ulp either side, every block
// size, zero and -0.0 blocks, FLT_MAX and 1e30, subnormal blocks, equal-absmax and
// spread-0 groups, odd lengths, and scales crafted to round differently under the
// native rule; with and without double quantisation (scripts/gen_nf4_fixtures.py).
TEST_CASE("nf4: adversarial fixtures match bitsandbytes' bytes (tests/fixtures/nf4/adv)", "[nf4][fixtures][adv]") {
  const std::string dir = std::string(LORA_TEST_FIXTURE_DIR) + "/nf4/adv/";
  const auto cases = read_adv_manifest(dir);
  const auto map8 = read_raw<float>(dir + "map8.f32");
  REQUIRE(map8.size() == 256);
  int plain_cases = 0, dq_cases = 0, native_diffs = 0, exact_offsets = 0, finite_overflows = 0;
  long max_offset_ulps = 0;
  std::set<index_t> block_sizes;
  for (const AdvCase& c : cases) {
    INFO("fixture " << c.name);
    const auto input = read_raw<float>(dir + c.name + ".in.f32");
    const auto packed = read_raw<std::uint8_t>(dir + c.name + ".packed.u8");
    REQUIRE(index_t(input.size()) == c.rows * c.cols);
    block_sizes.insert(c.bs);
    // The unquantised absmax (lora's own), for the zero-tail divergence and the bound below.
    const NF4Matrix plain = NF4Matrix::quantize(input.data(), c.rows, c.cols, {.block_size = c.bs});
    REQUIRE(plain.packed().size() == packed.size());
    for (std::size_t i = 0; i < packed.size(); ++i) {
      INFO("byte " << i);
      REQUIRE(plain.packed()[i] == packed[i]);
    }
    // Blocks where lora's absmax differs from bitsandbytes': only an all-zero partial last
    // block (bitsandbytes stores 1e-38, lora 0), documented; their elements dequantise to
    // zero either way, perhaps -0.0 there.
    std::vector<bool> zero_tail_block(std::size_t(plain.num_blocks()), false);
    if (c.has_note("zero_tail")) zero_tail_block.back() = true;
    const auto in_zero_tail = [&](std::size_t i) { return zero_tail_block[i / std::size_t(c.bs)]; };
    const auto require_out = [&](const std::vector<float>& ours, const std::vector<float>& theirs, const char* what) {
      REQUIRE(ours.size() == theirs.size());
      for (std::size_t i = 0; i < ours.size(); ++i) {
        INFO(what << " element " << i << ": ours " << ours[i] << ", bitsandbytes " << theirs[i]);
        if (in_zero_tail(i)) {
          REQUIRE(ours[i] == 0.0f);
          REQUIRE(theirs[i] == 0.0f);
        } else {
          REQUIRE(bits_of(ours[i]) == bits_of(theirs[i]));
        }
      }
    };

    if (c.plain) {
      ++plain_cases;
      CHECK(c.api_plain == "same");  // the public API stores the reference backend's bytes
      const auto absmax = read_raw<float>(dir + c.name + ".absmax.f32");
      const auto out = read_raw<float>(dir + c.name + ".out.f32");
      REQUIRE(absmax.size() == plain.absmax().size());
      for (std::size_t b = 0; b < absmax.size(); ++b) {
        INFO("block " << b);
        if (zero_tail_block[b]) {
          CHECK(plain.absmax()[b] == 0.0f);
          CHECK(absmax[b] == 1e-38f);
        } else {
          CHECK(bits_of(plain.absmax()[b]) == bits_of(absmax[b]));
        }
      }
      require_out(dequantized(plain), out, "plain");
      require_same_bits(dequantized(NF4Matrix::from_parts(c.rows, c.cols, c.bs, packed, absmax)), out, "plain parts");
    }
    if (!c.dq) continue;
    ++dq_cases;
    const auto offset = read_raw<float>(dir + c.name + ".dq.offset.f32");
    REQUIRE(offset.size() == 1);
    const auto q8_ref = read_raw<std::uint8_t>(dir + c.name + ".dq.q8.u8");
    const auto a2_ref = read_raw<float>(dir + c.name + ".dq.absmax2.f32");
    const auto out_ref = read_raw<float>(dir + c.name + ".dq.out.f32");
    const auto q8_api = read_api<std::uint8_t>(dir, c.name, "dq.q8.u8");
    const auto a2_api = read_api<float>(dir, c.name, "dq.absmax2.f32");
    const auto out_api = read_api<float>(dir, c.name, "dq.out.f32");
    REQUIRE(q8_ref.size() == std::size_t(plain.num_blocks()));
    REQUIRE(q8_api.size() == q8_ref.size());
    if (c.has_note("sum_overflow")) {
      // torch's fp32 sum of the block maxima overflows: bitsandbytes' offset is inf and its
      // scales NaN; lora takes the mean in double and stays finite, or, where a scale would
      // decode past FLT_MAX, throws a ValueError; it refuses bitsandbytes' offset.
      CHECK(std::isinf(offset[0]));
      CHECK(std::any_of(out_ref.begin(), out_ref.end(), [](float v) { return std::isnan(v); }));
      CHECK(std::any_of(out_api.begin(), out_api.end(), [](float v) { return std::isnan(v); }));
      const NF4Options opt{.block_size = c.bs, .double_quant = true, .map8 = map8};
      if (c.has_note("scale_overflow")) {
        CHECK_THROWS_WITH(NF4Matrix::quantize(input.data(), c.rows, c.cols, opt),
                          Catch::Contains("absmax2[0] = ") && Catch::Contains("beyond the float range"));
      } else {
        const NF4Matrix own = NF4Matrix::quantize(input.data(), c.rows, c.cols, opt);
        CHECK(std::isfinite(own.absmax_offset()));
        for (float v : dequantized(own)) REQUIRE(std::isfinite(v));
        ++finite_overflows;
      }
      CHECK_THROWS_AS(NF4Matrix::quantize(input.data(), c.rows, c.cols,
                                          {.block_size = c.bs, .double_quant = true, .map8 = map8,
                                           .absmax_offset = offset[0]}),
                      lora::ValueError);
      continue;
    }
    const NF4Matrix own = NF4Matrix::quantize(input.data(), c.rows, c.cols,
                                              {.block_size = c.bs, .double_quant = true, .map8 = map8});
    if (!c.has_note("zero_tail")) {
      // torch's fp32 cascade sum is not correctly rounded: up to 2 ulps here (dq_native_b32).
      const long ulps = std::labs(long(bits_of(own.absmax_offset())) - long(bits_of(offset[0])));
      CHECK(ulps <= 2);
      exact_offsets += ulps == 0;
      max_offset_ulps = std::max(max_offset_ulps, ulps);
    }
    // Indices whose absmax lora stores differently (zero tail): their s = absmax - offset
    // differs, so their 8-bit code may too.
    const auto differs_by_absmax = [&](std::size_t b) { return zero_tail_block[b]; };
    const auto flat = flat_groups_of(c);
    const auto is_flat = [&](std::size_t b) { return std::find(flat.begin(), flat.end(), b / 256) != flat.end(); };

    // Default rounding (nearest): the reference backend's bytes, except spread-0 groups
    // (codes 0 and absmax2 0, the public API's bytes there).
    const NF4Matrix qn = NF4Matrix::quantize(input.data(), c.rows, c.cols,
                                             {.block_size = c.bs, .double_quant = true, .map8 = map8,
                                              .absmax_offset = offset[0]});
    for (std::size_t b = 0; b < q8_ref.size(); ++b) {
      INFO("nearest, scale code " << b);
      if (differs_by_absmax(b)) continue;
      if (is_flat(b)) {
        REQUIRE(q8_ref[b] == 127u);
        REQUIRE(qn.absmax_q8()[b] == 0u);
        REQUIRE(q8_api[b] == 0u);
      } else {
        REQUIRE(qn.absmax_q8()[b] == q8_ref[b]);
      }
    }
    REQUIRE(qn.absmax2().size() == a2_ref.size());
    for (std::size_t g = 0; g < a2_ref.size(); ++g) {
      INFO("nearest, absmax2 " << g);
      const bool is_partial = g + 1 == a2_ref.size() && q8_ref.size() % 256 != 0;
      if (std::find(flat.begin(), flat.end(), g) != flat.end()) {
        CHECK(bits_of(qn.absmax2()[g]) == 0u);
        CHECK(a2_ref[g] == (is_partial ? 1e-38f : 0.0f));
        CHECK(bits_of(a2_api[g]) == 0u);
      } else {
        CHECK(bits_of(qn.absmax2()[g]) == bits_of(a2_ref[g]));
      }
    }
    require_out(dequantized(qn), out_ref, "nearest");
    require_out(dequantized(NF4Matrix::from_parts(c.rows, c.cols, c.bs, packed, q8_ref, a2_ref, offset[0], map8)),
                out_ref, "reference parts");

    // ScaleRounding::bitsandbytes_native: the public API's bytes, every code.
    const NF4Matrix qa = NF4Matrix::quantize(
        input.data(), c.rows, c.cols,
        {.block_size = c.bs, .double_quant = true, .map8 = map8, .absmax_offset = offset[0],
         .scale_rounding = lora::ScaleRounding::bitsandbytes_native});
    for (std::size_t b = 0; b < q8_api.size(); ++b) {
      INFO("native, scale code " << b);
      if (!differs_by_absmax(b)) REQUIRE(qa.absmax_q8()[b] == q8_api[b]);
    }
    for (std::size_t g = 0; g < a2_api.size(); ++g) {
      INFO("native, absmax2 " << g);
      CHECK(bits_of(qa.absmax2()[g]) == bits_of(a2_api[g]));
    }
    require_out(dequantized(qa), out_api, "native");
    require_out(dequantized(NF4Matrix::from_parts(c.rows, c.cols, c.bs, packed, q8_api, a2_api, offset[0], map8)),
                out_api, "public API parts");

    // The documented difference: the listed indices, and only those, differ between the
    // reference backend and the public API outside spread-0 groups; where absmax2 is a
    // normal float the native code is never nearer, and at most 2 / 65535 (of absmax2) farther.
    std::vector<std::size_t> diffs;
    for (std::size_t b = 0; b < q8_ref.size(); ++b)
      if (q8_ref[b] != q8_api[b] && !is_flat(b)) diffs.push_back(b);
    CHECK(diffs == parse_indices(c.q8_diffs));
    for (std::size_t b : diffs) {
      const std::size_t g = b / 256;
      if (differs_by_absmax(b) || !(a2_ref[g] >= 1e-38f) || a2_ref[g] != a2_api[g]) continue;
      const bool full = (g + 1) * 256 <= q8_ref.size();
      const float s = plain.absmax()[b] - offset[0];
      const double v = full ? double(s * (1.0f / a2_ref[g])) : double(s / a2_ref[g]);
      const double near = std::fabs(double(map8[q8_ref[b]]) - v), nat = std::fabs(double(map8[q8_api[b]]) - v);
      INFO("scale code " << b << ": v " << v << ", nearest " << int(q8_ref[b]) << ", native " << int(q8_api[b]));
      CHECK(nat >= near);
      CHECK(nat - near <= 2.0 / 65535 + 1e-7);
      ++native_diffs;
    }
  }
  CHECK(plain_cases == 18);
  CHECK(dq_cases == 20);
  CHECK(finite_overflows == 1);
  CHECK(block_sizes == std::set<index_t>{32, 64, 128, 256, 512, 1024, 2048, 4096});
  CHECK(native_diffs == 20);  // dq_native_b32's crafted scales
  CHECK(exact_offsets == 14);  // of 16: huge_1e30_b64 (1 ulp) and dq_native_b32 (2) differ
  CHECK(max_offset_ulps == 2);
}

TEST_CASE("nf4: a partial double-quant group with a subnormal spread stores its divisor 1e-38", "[nf4][dq]") {
  // Four blocks of 32 with absmax 1e-39 apart around 2e-39: spread 1e-39 < 1e-38. The
  // reference backend divides that (partial) group by 1e-38 and stores 1e-38, so the
  // decoded scales are map8[q] * 1e-38 + offset, about the true ones.
  const float a[4] = {2e-39f, 3e-39f, 1e-39f, 2e-39f};
  std::vector<float> x(4 * 32, 0.0f);
  for (std::size_t b = 0; b < 4; ++b) x[b * 32] = a[b];
  const NF4Matrix q = NF4Matrix::quantize(x.data(), 4, 32, {.block_size = 32, .double_quant = true});
  REQUIRE(q.absmax2().size() == 1);
  CHECK(q.absmax2()[0] == 1e-38f);
  for (index_t b = 0; b < 4; ++b) {
    INFO("block " << b);
    CHECK(std::fabs(q.block_scale(b) - a[b]) <= 0.01f * 1e-38f);
  }
  // The native rule keeps the spread itself and divides by it (no floor).
  const NF4Matrix n = NF4Matrix::quantize(x.data(), 4, 32,
                                          {.block_size = 32, .double_quant = true,
                                           .scale_rounding = lora::ScaleRounding::bitsandbytes_native});
  const float off = n.absmax_offset();
  CHECK(n.absmax2()[0] == std::max(std::fabs(3e-39f - off), std::fabs(1e-39f - off)));
  CHECK(n.absmax2()[0] < 1e-38f);
}
