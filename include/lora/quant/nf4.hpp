// quant/nf4.hpp: 4-bit NormalFloat (NF4) storage for frozen base weights, as in
// QLoRA, byte-compatible with bitsandbytes' reference (PyTorch) backend
// (DESIGN.md section 3, docs/nf4.md), plus the fused products y = x W^T that
// decode W on the fly.
//
//   lora::NF4Matrix Wq = lora::NF4Matrix::quantize(W, {.double_quant = true});
//   lora::nf4_gemv(Wq, x, y);            // y = W x, one token, W never materialised
//   lora::nf4_gemm(Wq, X, Y, 1.f, 1.f);  // Y [n, out] += X [n, in] W^T
//   lora::nf4_gemm_transposed(Wq, G, dX); // dX [n, in] = G [n, out] W (backward)
#pragma once

#include <Eigen/Core>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <optional>
#include <span>
#include <type_traits>
#include <vector>

// The AVX-512 kernels are compiled when the target has AVX-512 (-march=native on
// such a machine), and also, with GCC or Clang on x86-64, as functions carrying
// __attribute__((target("avx512f"))) chosen at run time when the CPU has it, so
// a portable build still gets them.
// Define LORA_NF4_DISABLE_SIMD to build only the portable kernels (to test them
// on an AVX-512 machine).
#if defined(LORA_NF4_DISABLE_SIMD)
#define LORA_NF4_AVX512 0
#define LORA_NF4_AVX512_TARGET
#elif defined(__AVX512F__)
#define LORA_NF4_AVX512 1
#define LORA_NF4_AVX512_TARGET
#elif (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#define LORA_NF4_AVX512 1
#define LORA_NF4_AVX512_TARGET __attribute__((target("avx512f")))
#else
#define LORA_NF4_AVX512 0
#define LORA_NF4_AVX512_TARGET
#endif
#if LORA_NF4_AVX512
#include <immintrin.h>
#endif

#include "lora/config.hpp"
#include "lora/error.hpp"
#include "lora/quant/dynamic_map.hpp"
#include "lora/quant/rounding.hpp"

// OpenMP is used only when the translation unit is compiled with it (-fopenmp);
// the pragmas vanish otherwise, so plain builds stay warning-free.
#if defined(_OPENMP)
#define LORA_DETAIL_PRAGMA(x) _Pragma(#x)
#define LORA_NF4_OMP_FOR_IF(cond) LORA_DETAIL_PRAGMA(omp parallel for schedule(static) if (cond))
#else
#define LORA_NF4_OMP_FOR_IF(cond)
#endif

// Work (rows x cols elements) below which the kernels stay on one thread: a
// fork/join costs a few microseconds, about a 256 x 256 product.
#ifndef LORA_NF4_PARALLEL_MIN_ELEMENTS
#define LORA_NF4_PARALLEL_MIN_ELEMENTS (1L << 16)
#endif

// How far ahead (bytes of packed codes) the AVX-512 gemv prefetches; 0 = off.
#ifndef LORA_NF4_PREFETCH_BYTES
#define LORA_NF4_PREFETCH_BYTES 512
#endif

// Floats per dequantised tile of W in nf4_gemm for up to 32 tokens (1 MiB: it
// stays in L2 while Eigen packs it); larger batches use 4x this.
#ifndef LORA_NF4_GEMM_TILE_FLOATS
#define LORA_NF4_GEMM_TILE_FLOATS (1L << 18)
#endif

// The 16 NF4 values (DESIGN.md s3), as one list so the host array and the
// device-callable lookup cannot drift apart.
#define LORA_NF4_CODE_VALUES                                                          \
  -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,           \
      -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,      \
      0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f,               \
      0.33791524171829224f, 0.44070982933044434f, 0.5626170039176941f,                \
      0.7229568362236023f, 1.0f

// Their float32 midpoints (code[k] + code[k+1]) / 2, k = 0..14, exact bits
// (a static_assert below recomputes them).
#define LORA_NF4_THRESHOLD_VALUES                                                     \
  -0x1.b239b0p-1f, -0x1.38a4e0p-1f, -0x1.d70900p-2f, -0x1.5bd4ecp-2f, -0x1.e079d8p-3f, \
      -0x1.1a7178p-3f, -0x1.74f0e2p-5f, 0x1.45f5fep-5f, 0x1.ec90c4p-4f, 0x1.a0cfc0p-3f,  \
      0x1.2b05a8p-2f, 0x1.8ea7f2p-2f, 0x1.00da08p-1f, 0x1.491b5ep-1f, 0x1.b913b4p-1f

namespace lora {

namespace nf4 {

inline constexpr int num_codes = 16;
inline constexpr float code_values[num_codes] = {LORA_NF4_CODE_VALUES};
inline constexpr float thresholds[num_codes - 1] = {LORA_NF4_THRESHOLD_VALUES};

/// The code of 0.0: the all-zero block and the odd-length padding nibble.
inline constexpr unsigned zero_code = 7;
inline constexpr index_t default_block_size = 64;
inline constexpr index_t min_block_size = 32;
inline constexpr index_t max_block_size = 4096;
/// Block scales per group in double quantisation (each group has one absmax2).
inline constexpr index_t scale_group_size = 256;
/// Floor of the normaliser, so an all-zero block divides by a finite number.
inline constexpr float min_absmax = 1e-38f;

namespace detail {
constexpr bool thresholds_are_midpoints() {
  for (int k = 0; k + 1 < num_codes; ++k)
    if (thresholds[k] != (code_values[k] + code_values[k + 1]) / 2.0f) return false;
  return true;
}
static_assert(thresholds_are_midpoints(), "NF4 thresholds must be the float32 code midpoints");
}  // namespace detail

/// Value of a 4-bit code (only the low 4 bits are read). The table is local so
/// the function also works inside CUDA kernels.
LORA_HOST_DEVICE constexpr float code_value(unsigned code) {
  constexpr float table[num_codes] = {LORA_NF4_CODE_VALUES};
  return table[code & 15u];
}

/// Code of a value already normalised and clamped to [-1, 1]: the number of
/// thresholds it strictly exceeds, so a tie goes to the lower code.
LORA_HOST_DEVICE constexpr unsigned encode(float v) {
  constexpr float t[num_codes - 1] = {LORA_NF4_THRESHOLD_VALUES};
  unsigned code = 0;
  for (int k = 0; k < num_codes - 1; ++k) code += static_cast<unsigned>(v > t[k]);
  return code;
}

/// One dequantised element: code value times its block scale (one fp32 multiply,
/// as bitsandbytes does).
LORA_HOST_DEVICE constexpr float decode(unsigned code, float scale) {
  return code_value(code) * scale;
}

/// Code of flat element i in packed storage: even elements sit in the high
/// nibble of byte i / 2, odd ones in the low nibble.
LORA_HOST_DEVICE constexpr unsigned nibble(const std::uint8_t* packed, index_t i) {
  const unsigned byte = packed[i >> 1];
  return (i & 1) ? (byte & 15u) : (byte >> 4);
}

/// Block scale reconstructed from double quantisation:
/// map8[q] * absmax2 + offset, each operation rounded to fp32 as in bitsandbytes
/// (never fused into an FMA).
LORA_HOST_DEVICE inline float decode_scale(std::uint8_t q, const float* map8, float absmax2,
                                           float offset) {
  return lora::detail::fp32_mul_unfused(map8[q], absmax2) + offset;
}

/// True for the block sizes bitsandbytes accepts: powers of two in [32, 4096].
constexpr bool valid_block_size(index_t b) {
  return b >= min_block_size && b <= max_block_size && (b & (b - 1)) == 0;
}

/// Storage cost in bits per parameter for large matrices: 4 bits of code plus the
/// scales (fp32 absmax per block, or an 8-bit code per block and one fp32 absmax2
/// per 256 blocks). The shared offset and the 256-entry map are not counted.
constexpr double nominal_bits_per_parameter(index_t block_size, bool double_quant) {
  const double b = static_cast<double>(block_size);
  return double_quant ? 4.0 + 8.0 / b + 32.0 / (b * double(scale_group_size)) : 4.0 + 32.0 / b;
}

}  // namespace nf4

namespace detail::nf4k {

/// True when the AVX-512 kernels can run here (decided once).
inline bool cpu_has_avx512() {
#if !LORA_NF4_AVX512
  return false;
#elif defined(__AVX512F__)
  return true;
#else
  static const bool has = __builtin_cpu_supports("avx512f");
  return has;
#endif
}

#if LORA_NF4_AVX512
// Full masks: the maskz_ forms are the same instructions, and they avoid GCC 12's
// false -Wmaybe-uninitialized on the plain intrinsics' undefined pass-through.
inline constexpr __mmask16 all16 = 0xFFFF;

// The 16 code values in one register: _mm512_permutexvar_ps reads the low 4 bits
// of each 32-bit index lane, so a nibble needs no masking once shifted down.
LORA_NF4_AVX512_TARGET inline __m512 lut512() { return _mm512_loadu_ps(nf4::code_values); }

// Decodes 16 bytes (32 elements, natural order) times s.
LORA_NF4_AVX512_TARGET LORA_FORCE_INLINE void decode32_avx512(const std::uint8_t* p, __m512 lut, __m512 vs, float* out) {
  const __m512i bytes = _mm512_maskz_cvtepu8_epi32(all16, _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m512 hi = _mm512_maskz_permutexvar_ps(all16, _mm512_maskz_srli_epi32(all16, bytes, 4), lut);
  const __m512 lo = _mm512_maskz_permutexvar_ps(all16, bytes, lut);
  const __m512i first = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i second = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  _mm512_storeu_ps(out, _mm512_mul_ps(_mm512_permutex2var_ps(hi, first, lo), vs));
  _mm512_storeu_ps(out + 16, _mm512_mul_ps(_mm512_permutex2var_ps(hi, second, lo), vs));
}

// Decodes whole groups of 16 bytes; returns how many bytes it consumed.
LORA_NF4_AVX512_TARGET inline index_t decode_pairs_avx512(const std::uint8_t* p, index_t pairs, float s, float* o) {
  const __m512 lut = lut512();
  const __m512 vs = _mm512_set1_ps(s);
  index_t done = 0;
  for (; done + 16 <= pairs; done += 16) decode32_avx512(p + done, lut, vs, o + 2 * done);
  return done;
}
#endif

// Decodes `len` elements from flat index f on, all in one block of scale s,
// into out (natural order).
inline void decode_run(const std::uint8_t* packed, index_t f, index_t len, float s, float* out) {
  index_t j = 0;
  if (len > 0 && (f & 1)) {  // odd start: the low nibble of a shared byte
    out[0] = nf4::decode(nf4::nibble(packed, f), s);
    j = 1;
  }
  const std::uint8_t* p = packed + (f + j) / 2;  // byte of the next even element
  index_t pairs = (len - j) / 2;
  float* o = out + j;
#if LORA_NF4_AVX512
  if (pairs >= 16 && cpu_has_avx512()) {
    const index_t done = decode_pairs_avx512(p, pairs, s, o);
    pairs -= done;
    p += done;
    o += 2 * done;
  }
#endif
  for (index_t k = 0; k < pairs; ++k) {
    const unsigned byte = p[k];
    o[2 * k] = nf4::code_values[byte >> 4] * s;
    o[2 * k + 1] = nf4::code_values[byte & 15u] * s;
  }
  if ((len - j) & 1) o[2 * pairs] = nf4::decode(p[pairs] >> 4, s);
}

}  // namespace detail::nf4k

/// How to quantise.
struct NF4Options {
  /// Elements per scale block: a power of two in [32, 4096].
  index_t block_size = nf4::default_block_size;
  /// Quantise the block scales again to 8 bits (QLoRA's double quantisation,
  /// bitsandbytes' compress_statistics).
  bool double_quant = false;
  /// 256 ascending values of the 8-bit scale map; empty = the built-in
  /// lora::dynamic_map::signed_values. Pass a bitsandbytes file's
  /// nested_quant_map here to reproduce its bytes exactly.
  std::span<const float> map8 = {};
  /// Double quantisation: use this offset instead of mean(absmax). torch's fp32
  /// mean depends on its vector width and thread count (1-ulp differences), so
  /// reproducing a bitsandbytes file bit for bit takes the file's offset.
  std::optional<float> absmax_offset = {};
};

/// An [out, in] weight matrix in NF4: packed 4-bit codes (flattened row-major,
/// two per byte, even element in the high nibble) and per-block scales, either
/// fp32 absmax or double-quantised. Immutable after construction; all const
/// members are thread-safe.
class NF4Matrix {
 public:
  using dense_matrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

  NF4Matrix() = default;

  /// Quantises `rows x cols` floats stored row-major at `data`.
  /// Throws value_error for a bad block size, a bad map8 or a non-finite value
  /// (its flat index is named), shape_error for a negative extent.
  static NF4Matrix quantize(const float* data, index_t rows, index_t cols,
                            const NF4Options& options = {}) {
    constexpr const char* fn = "NF4Matrix::quantize";
    check_block_size(fn, options.block_size);
    if (rows < 0 || cols < 0)
      lora::detail::raise<shape_error>(fn, ": shape ", rows, " x ", cols, " has a negative extent");
    const index_t n = rows * cols;
    if (n > 0 && data == nullptr)
      lora::detail::raise<value_error>(fn, ": data is null for a ", rows, " x ", cols, " matrix");
    check_finite(fn, data, n, cols);

    NF4Matrix m(rows, cols, options.block_size, options.double_quant);
    m.set_map(fn, options.map8);
    m.packed_.assign(static_cast<std::size_t>((n + 1) / 2), 0);
    std::vector<float> absmax(static_cast<std::size_t>(m.num_blocks()));
    quantize_blocks(data, n, m.block_size_, absmax.data(), m.packed_.data());
    if (m.double_quant_)
      m.compress_scales(absmax, options.absmax_offset);
    else
      m.absmax_ = std::move(absmax);
    return m;
  }

  /// Quantises an Eigen matrix (any expression; it is evaluated row-major first
  /// when its storage is not contiguous row-major).
  static NF4Matrix quantize(const Eigen::Ref<const dense_matrix>& W, const NF4Options& options = {}) {
    if (W.rows() <= 1 || W.outerStride() == W.cols())
      return quantize(W.data(), W.rows(), W.cols(), options);
    const dense_matrix contiguous = W;
    return quantize(contiguous.data(), contiguous.rows(), contiguous.cols(), options);
  }

  /// Wraps existing bytes with fp32 absmax scales (bitsandbytes' quant_state
  /// without compress_statistics). Throws format_error when a size disagrees.
  static NF4Matrix from_parts(index_t rows, index_t cols, index_t block_size,
                              std::span<const std::uint8_t> packed, std::span<const float> absmax) {
    constexpr const char* fn = "NF4Matrix::from_parts";
    NF4Matrix m = checked_shell(fn, rows, cols, block_size, false, packed);
    expect_size(fn, "absmax", absmax.size(), m.num_blocks());
    m.absmax_.assign(absmax.begin(), absmax.end());
    return m;
  }

  /// Wraps existing bytes with double-quantised scales: 8-bit codes per block,
  /// one absmax2 per 256 blocks, the offset, and optionally the file's map.
  static NF4Matrix from_parts(index_t rows, index_t cols, index_t block_size,
                              std::span<const std::uint8_t> packed,
                              std::span<const std::uint8_t> absmax_q8,
                              std::span<const float> absmax2, float offset,
                              std::span<const float> map8 = {}) {
    constexpr const char* fn = "NF4Matrix::from_parts";
    NF4Matrix m = checked_shell(fn, rows, cols, block_size, true, packed);
    expect_size(fn, "absmax_q8", absmax_q8.size(), m.num_blocks());
    expect_size(fn, "absmax2", absmax2.size(), m.num_scale_groups());
    m.set_map(fn, map8);
    m.q8_.assign(absmax_q8.begin(), absmax_q8.end());
    m.absmax2_.assign(absmax2.begin(), absmax2.end());
    m.offset_ = offset;
    return m;
  }

  // ---- shape -------------------------------------------------------------
  index_t rows() const { return rows_; }
  index_t cols() const { return cols_; }
  index_t size() const { return rows_ * cols_; }
  index_t block_size() const { return block_size_; }
  bool double_quantized() const { return double_quant_; }
  index_t num_blocks() const { return (size() + block_size_ - 1) / block_size_; }
  /// Groups of 256 block scales (double quantisation); 0 otherwise.
  index_t num_scale_groups() const {
    return double_quant_ ? (num_blocks() + nf4::scale_group_size - 1) / nf4::scale_group_size : 0;
  }

  // ---- raw storage, in bitsandbytes' layout ------------------------------
  /// ceil(size / 2) bytes; bitsandbytes' packed weight tensor.
  std::span<const std::uint8_t> packed() const { return packed_; }
  /// fp32 absmax per block (state.absmax); empty when double-quantised.
  std::span<const float> absmax() const { return absmax_; }
  /// 8-bit scale codes per block (state.absmax, uint8); empty otherwise.
  std::span<const std::uint8_t> absmax_q8() const { return q8_; }
  /// fp32 absmax per 256 scales (state.state2.absmax); empty otherwise.
  std::span<const float> absmax2() const { return absmax2_; }
  /// Mean of the block absmax subtracted before the 8-bit step (state.offset).
  float absmax_offset() const { return offset_; }
  /// The 256-entry 8-bit map in use (state.state2.code).
  std::span<const float> map8() const { return {map_ptr(), std::size_t(dynamic_map::size)}; }

  // ---- element access ----------------------------------------------------
  /// Scale of block b: absmax, or map8[q] * absmax2 + offset.
  float block_scale(index_t b) const {
    return double_quant_ ? nf4::decode_scale(q8_[std::size_t(b)], map_ptr(),
                                             absmax2_[std::size_t(b / nf4::scale_group_size)], offset_)
                         : absmax_[std::size_t(b)];
  }
  /// All block scales (what bitsandbytes hands its 4-bit dequantiser).
  std::vector<float> block_scales() const {
    std::vector<float> s(static_cast<std::size_t>(num_blocks()));
    for (index_t b = 0; b < num_blocks(); ++b) s[std::size_t(b)] = block_scale(b);
    return s;
  }
  /// The 4-bit code of flat element i.
  unsigned code(index_t i) const { return nf4::nibble(packed_.data(), i); }
  /// Dequantised element (r, c).
  float coeff(index_t r, index_t c) const {
    const index_t i = r * cols_ + c;
    return nf4::decode(code(i), block_scale(i / block_size_));
  }

  // ---- dequantisation ----------------------------------------------------
  /// Flat elements [first, first + count) into out (count floats).
  void dequantize_range(index_t first, index_t count, float* out) const {
    if (first < 0 || count < 0 || first + count > size())
      lora::detail::raise<shape_error>("NF4Matrix::dequantize_range: range [", first, ", ",
                                       first + count, ") is outside [0, ", size(), ")");
    index_t f = first;
    const index_t end = first + count;
    while (f < end) {
      const index_t b = f / block_size_;
      const index_t seg_end = std::min((b + 1) * block_size_, end);
      detail::nf4k::decode_run(packed_.data(), f, seg_end - f, block_scale(b), out + (f - first));
      f = seg_end;
    }
  }
  /// Rows [first_row, first_row + count) into out, row-major (count * cols floats).
  void dequantize_rows(index_t first_row, index_t count, float* out) const {
    if (first_row < 0 || count < 0 || first_row + count > rows_)
      lora::detail::raise<shape_error>("NF4Matrix::dequantize_rows: rows [", first_row, ", ",
                                       first_row + count, ") are outside [0, ", rows_, ")");
    dequantize_range(first_row * cols_, count * cols_, out);
  }
  /// The whole matrix into out (size() floats, row-major).
  void dequantize(float* out) const {
    const index_t nb = num_blocks();
    LORA_NF4_OMP_FOR_IF(size() >= LORA_NF4_PARALLEL_MIN_ELEMENTS)
    for (index_t b = 0; b < nb; ++b) {
      const index_t f = b * block_size_;
      detail::nf4k::decode_run(packed_.data(), f, std::min(block_size_, size() - f), block_scale(b), out + f);
    }
  }
  /// The whole matrix as a dense row-major Eigen matrix.
  dense_matrix dequantize() const {
    dense_matrix W(rows_, cols_);
    dequantize(W.data());
    return W;
  }

  // ---- memory accounting -------------------------------------------------
  /// Exact bytes held: packed codes + scales (+ 8-bit codes, absmax2 and the
  /// 4-byte offset when double-quantised). The shared 8-bit map is not counted.
  std::size_t storage_bytes() const {
    const std::size_t scales = double_quant_ ? q8_.size() + 4 * absmax2_.size() + sizeof(float)
                                             : 4 * absmax_.size();
    return packed_.size() + scales;
  }
  /// 8 * storage_bytes() / size(): 4.127 for double quantisation at block 64.
  double bits_per_parameter() const {
    return size() > 0 ? 8.0 * double(storage_bytes()) / double(size()) : 0.0;
  }

 private:
  NF4Matrix(index_t rows, index_t cols, index_t block_size, bool double_quant)
      : rows_(rows), cols_(cols), block_size_(block_size), double_quant_(double_quant) {}

  const float* map_ptr() const { return map8_.empty() ? dynamic_map::signed_values : map8_.data(); }

  static void check_block_size(const char* fn, index_t b) {
    if (!nf4::valid_block_size(b))
      lora::detail::raise<value_error>(fn, ": block_size ", b, " is not a power of two in [",
                                       nf4::min_block_size, ", ", nf4::max_block_size, "]");
  }

  static void expect_size(const char* fn, const char* what, std::size_t got, index_t want) {
    if (static_cast<index_t>(got) != want)
      lora::detail::raise<format_error>(fn, ": ", what, " has ", got, " entries, expected ", want);
  }

  static NF4Matrix checked_shell(const char* fn, index_t rows, index_t cols, index_t block_size,
                                 bool double_quant, std::span<const std::uint8_t> packed) {
    check_block_size(fn, block_size);
    if (rows < 0 || cols < 0)
      lora::detail::raise<shape_error>(fn, ": shape ", rows, " x ", cols, " has a negative extent");
    NF4Matrix m(rows, cols, block_size, double_quant);
    expect_size(fn, "packed", packed.size(), (m.size() + 1) / 2);
    m.packed_.assign(packed.begin(), packed.end());
    return m;
  }

  // Finds the first non-finite value in chunks, so the common all-finite case
  // is a vectorised pass.
  static void check_finite(const char* fn, const float* x, index_t n, index_t cols) {
    constexpr index_t chunk = 1024;
    constexpr float big = std::numeric_limits<float>::max();
    for (index_t c0 = 0; c0 < n; c0 += chunk) {
      const index_t c1 = std::min(n, c0 + chunk);
      bool bad = false;
      for (index_t i = c0; i < c1; ++i) bad |= !(std::fabs(x[i]) <= big);
      if (!bad) continue;
      for (index_t i = c0; i < c1; ++i)
        if (!(std::fabs(x[i]) <= big))
          lora::detail::raise<value_error>(fn, ": non-finite value ", x[i], " at flat index ", i,
                                           " (row ", i / cols, ", column ", i % cols, ")");
    }
  }

  void set_map(const char* fn, std::span<const float> map8) {
    if (map8.empty()) return;
    if (map8.size() != std::size_t(dynamic_map::size))
      lora::detail::raise<value_error>(fn, ": map8 has ", map8.size(), " entries, expected ",
                                       dynamic_map::size);
    for (std::size_t k = 0; k < map8.size(); ++k) {
      if (!std::isfinite(map8[k]) || (k > 0 && map8[k] < map8[k - 1]))
        lora::detail::raise<value_error>(fn, ": map8[", k, "] = ", map8[k],
                                         " is not finite and ascending");
    }
    map8_.assign(map8.begin(), map8.end());
  }

  // max |x| with 16 running maxima (exact in any order; one chain would
  // serialise on the max latency).
  static float abs_max(const float* x, index_t n) {
    float m[16] = {};
    index_t j = 0;
    for (; j + 16 <= n; j += 16)
      for (int k = 0; k < 16; ++k) {
        const float a = std::fabs(x[j + k]);
        m[k] = m[k] < a ? a : m[k];
      }
    float r = 0.0f;
    for (; j < n; ++j) r = std::max(r, std::fabs(x[j]));
    for (float v : m) r = std::max(r, v);
    return r;
  }

  // clamp to [-1, 1] by value (std::clamp returns a reference, which keeps GCC
  // from vectorising the loop).
  static float clamp_unit(float v) {
    v = v < -1.0f ? -1.0f : v;
    return v > 1.0f ? 1.0f : v;
  }

  // Normalises and encodes every block (DESIGN.md s3): absmax in fp32, full
  // blocks times 1/a, the partial last block divided by a, clamp, count.
  static void quantize_blocks(const float* x, index_t n, index_t bs, float* absmax, std::uint8_t* packed) {
    const index_t nb = (n + bs - 1) / bs;
    LORA_NF4_OMP_FOR_IF(n >= LORA_NF4_PARALLEL_MIN_ELEMENTS)
    for (index_t b = 0; b < nb; ++b) {
      const index_t begin = b * bs;
      const index_t len = std::min(bs, n - begin);
      const float* xb = x + begin;
      const float amax = abs_max(xb, len);
      absmax[b] = amax;
      const float a = std::max(amax, nf4::min_absmax);
      // Normalised values, then codes as 15 passes of "count the thresholds
      // exceeded" (same rule as nf4::encode): simple loops that vectorise.
      float v[nf4::max_block_size];
      std::uint8_t codes[nf4::max_block_size + 1];
      if (len == bs) {
        const float inv = 1.0f / a;
        for (index_t j = 0; j < len; ++j) v[j] = clamp_unit(xb[j] * inv);
      } else {
        for (index_t j = 0; j < len; ++j) v[j] = clamp_unit(xb[j] / a);
      }
      for (index_t j = 0; j < len; ++j) codes[j] = 0;
      for (int k = 0; k < nf4::num_codes - 1; ++k) {
        const float t = nf4::thresholds[k];
        for (index_t j = 0; j < len; ++j) codes[j] = static_cast<std::uint8_t>(codes[j] + (v[j] > t ? 1 : 0));
      }
      codes[len] = nf4::zero_code;  // pad of an odd length (only the last block can be odd)
      // Blocks start at even elements (bs is even), so each owns whole bytes.
      std::uint8_t* pb = packed + begin / 2;
      for (index_t j = 0; j < (len + 1) / 2; ++j)
        pb[j] = static_cast<std::uint8_t>((codes[2 * j] << 4) | codes[2 * j + 1]);
    }
  }

  // Double quantisation: offset = mean(absmax); (absmax - offset) in groups of
  // 256 with the same normalise / clamp / nearest-code rule on the 8-bit map.
  void compress_scales(const std::vector<float>& absmax, std::optional<float> offset) {
    const index_t nb = static_cast<index_t>(absmax.size());
    // Mean as "sum, then divide by the count" like torch's CPU mean, but with the
    // sum accumulated in double: deterministic for any thread count, and the
    // correctly rounded fp32 sum for any realistic block count.
    double sum = 0.0;
    for (float a : absmax) sum += a;
    offset_ = offset ? *offset : nb > 0 ? static_cast<float>(sum) / static_cast<float>(nb) : 0.0f;

    const float* map = map_ptr();
    float mid[dynamic_map::size - 1];
    for (int k = 0; k + 1 < dynamic_map::size; ++k) mid[k] = (map[k] + map[k + 1]) / 2.0f;

    const index_t ng = num_scale_groups();
    q8_.assign(static_cast<std::size_t>(nb), 0);
    absmax2_.assign(static_cast<std::size_t>(ng), 0.0f);
    std::vector<float> s(static_cast<std::size_t>(nf4::scale_group_size));
    for (index_t g = 0; g < ng; ++g) {
      const index_t begin = g * nf4::scale_group_size;
      const index_t len = std::min(nf4::scale_group_size, nb - begin);
      float amax = 0.0f;
      for (index_t j = 0; j < len; ++j) {
        s[std::size_t(j)] = absmax[std::size_t(begin + j)] - offset_;
        amax = std::max(amax, std::fabs(s[std::size_t(j)]));
      }
      absmax2_[std::size_t(g)] = amax;
      const float a = std::max(amax, nf4::min_absmax);
      const float inv = 1.0f / a;
      const bool full = len == nf4::scale_group_size;
      for (index_t j = 0; j < len; ++j) {
        const float v = full ? s[std::size_t(j)] * inv : s[std::size_t(j)] / a;
        q8_[std::size_t(begin + j)] = static_cast<std::uint8_t>(dynamic_map::encode(clamp_unit(v), mid));
      }
    }
  }

  index_t rows_ = 0;
  index_t cols_ = 0;
  index_t block_size_ = nf4::default_block_size;
  bool double_quant_ = false;
  std::vector<std::uint8_t> packed_;  // (size + 1) / 2
  std::vector<float> absmax_;         // num_blocks, plain scales
  std::vector<std::uint8_t> q8_;      // num_blocks, double quantisation
  std::vector<float> absmax2_;        // num_scale_groups
  float offset_ = 0.0f;
  std::vector<float> map8_;  // empty: the built-in map
};

namespace detail::nf4k {

// Dot product with 16 partial sums, a pattern compilers turn into one vector
// FMA per 16 floats without -ffast-math.
inline float dot(const float* a, const float* b, index_t n) {
  float acc[16] = {};
  index_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int k = 0; k < 16; ++k) acc[k] += a[i + k] * b[i + k];
  float tail = 0.0f;
  for (; i < n; ++i) tail += a[i] * b[i];
  float sum = 0.0f;
  for (int k = 0; k < 16; ++k) sum += acc[k];
  return sum + tail;
}

// Portable row kernel for any shape: decode each (row, block) segment into a
// small tile and dot it with the matching piece of x.
inline float row_dot_generic(const NF4Matrix& W, index_t r, const float* x, float* tile) {
  constexpr index_t chunk = 256;
  const index_t f0 = r * W.cols();
  const index_t f_end = f0 + W.cols();
  const std::uint8_t* packed = W.packed().data();
  float acc = 0.0f;
  index_t f = f0;
  while (f < f_end) {
    const index_t b = f / W.block_size();
    const index_t seg_end = std::min((b + 1) * W.block_size(), f_end);
    const float s = W.block_scale(b);
    float part = 0.0f;
    for (index_t g = f; g < seg_end; g += chunk) {
      const index_t len = std::min(chunk, seg_end - g);
      decode_run(packed, g, len, 1.0f, tile);
      part += dot(tile, x + (g - f0), len);
    }
    acc += s * part;
    f = seg_end;
  }
  return acc;
}

#if LORA_NF4_AVX512
// Fast path (in % 64 == 0, block_size % 64 == 0): x is pre-permuted per
// 64-element chunk so that a 32-byte load widened to 16-bit lanes yields four
// code vectors by shifting (0, 4, 8, 12 bits) and one permute each, with no
// interleaving. Word L of a chunk holds bytes 2L, 2L+1 = elements 4L..4L+3;
// shift 4k selects element 4L + (k ^ 1). So xp[c*64 + 16k + L] = x[c*64 + 4L + (k^1)].
inline void permute_x64(const float* x, index_t n, float* xp) {
  for (index_t c = 0; c < n; c += 64)
    for (int k = 0; k < 4; ++k)
      for (int L = 0; L < 16; ++L) xp[c + 16 * k + L] = x[c + 4 * L + (k ^ 1)];
}

// Scales of blocks [b_first, b_first + count), computed before the row's FMA
// chain. Double-quantised scales are decoded 16 at a time with gathers: an
// explicit fp32 multiply then add, the same roundings as nf4::decode_scale.
LORA_NF4_AVX512_TARGET inline void row_scales(const NF4Matrix& W, index_t b_first, index_t count, float* out) {
  if (!W.double_quantized()) {
    std::copy_n(W.absmax().data() + b_first, count, out);
    return;
  }
  const std::uint8_t* q8 = W.absmax_q8().data() + b_first;
  const float* map = W.map8().data();
  const float* absmax2 = W.absmax2().data();
  const __m512 offset = _mm512_set1_ps(W.absmax_offset());
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  index_t b = 0;
  for (; b + 16 <= count; b += 16) {
    const __m512i q = _mm512_maskz_cvtepu8_epi32(all16, _mm_loadu_si128(reinterpret_cast<const __m128i*>(q8 + b)));
    const __m512i group = _mm512_maskz_srli_epi32(
        all16, _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(b_first + b)), lane), 8);
    const __m512 m = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), all16, q, map, 4);
    const __m512 a2 = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), all16, group, absmax2, 4);
    __m512 scaled = _mm512_mul_ps(m, a2);
#if defined(__GNUC__)
    __asm__("" : "+v"(scaled));  // keep the product rounded (see quant/rounding.hpp)
#endif
    _mm512_storeu_ps(out + b, _mm512_add_ps(scaled, offset));
  }
  for (; b < count; ++b) out[b] = W.block_scale(b_first + b);
}

LORA_NF4_AVX512_TARGET inline float row_dot_avx512(const NF4Matrix& W, index_t r, const float* xp, float* scales) {
  const __m512 lut = lut512();
  const index_t in = W.cols();
  const index_t f0 = r * in;
  const int shift = std::countr_zero(static_cast<std::uint64_t>(W.block_size()));
  const index_t b_first = f0 >> shift;
  const index_t b_count = ((f0 + in - 1) >> shift) - b_first + 1;
  row_scales(W, b_first, b_count, scales);
  const std::uint8_t* p = W.packed().data() + f0 / 2;
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();  // two chains hide FMA latency
  for (index_t j = 0; j < in; j += 64) {
    // Codes stream from memory once: ask for them LORA_NF4_PREFETCH_BYTES ahead,
    // more than the out-of-order window covers on its own.
    if (LORA_NF4_PREFETCH_BYTES > 0 && (j & 127) == 0)
      _mm_prefetch(reinterpret_cast<const char*>(reinterpret_cast<std::uintptr_t>(p + j / 2) + LORA_NF4_PREFETCH_BYTES),
                   _MM_HINT_T0);  // integer arithmetic: the address may lie past the end (prefetch never faults)
    const __m512i w = _mm512_maskz_cvtepu16_epi32(all16, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + j / 2)));
    const float* xc = xp + j;
    const __m512 c0 = _mm512_mul_ps(_mm512_maskz_permutexvar_ps(all16, w, lut), _mm512_loadu_ps(xc));
    const __m512 c1 = _mm512_mul_ps(_mm512_maskz_permutexvar_ps(all16, _mm512_maskz_srli_epi32(all16, w, 4), lut), _mm512_loadu_ps(xc + 16));
    const __m512 c2 = _mm512_fmadd_ps(_mm512_maskz_permutexvar_ps(all16, _mm512_maskz_srli_epi32(all16, w, 8), lut), _mm512_loadu_ps(xc + 32), c0);
    const __m512 c3 = _mm512_fmadd_ps(_mm512_maskz_permutexvar_ps(all16, _mm512_maskz_srli_epi32(all16, w, 12), lut), _mm512_loadu_ps(xc + 48), c1);
    const __m512 s = _mm512_set1_ps(scales[((f0 + j) >> shift) - b_first]);
    if ((j & 64) == 0)
      acc0 = _mm512_fmadd_ps(s, _mm512_add_ps(c2, c3), acc0);
    else
      acc1 = _mm512_fmadd_ps(s, _mm512_add_ps(c2, c3), acc1);
  }
  alignas(64) float lanes[16];  // once per row; _mm512_reduce_add_ps trips GCC 12's warning
  _mm512_store_ps(lanes, _mm512_add_ps(acc0, acc1));
  float sum = 0.0f;
  for (float v : lanes) sum += v;
  return sum;
}
#endif

// Per-thread scratch that only grows (no allocation per call once warm).
inline float* scratch(std::vector<float>& buf, index_t n) {
  if (buf.size() < static_cast<std::size_t>(n)) buf.resize(static_cast<std::size_t>(n));
  return buf.data();
}

}  // namespace detail::nf4k

namespace detail::nf4k {

// The kernels work on rows [r0, r0 + nr) of W, so expression slices (the
// QLoRA node's slice_rows) reuse them; the public functions pass all rows.

inline void gemv_rows(const NF4Matrix& W, index_t r0, index_t nr, const float* x, float* y, float alpha,
                      float beta) {
  [[maybe_unused]] const index_t in = W.cols();
  [[maybe_unused]] const bool parallel = nr * in >= LORA_NF4_PARALLEL_MIN_ELEMENTS;
  const index_t r_end = r0 + nr;
  const auto finish = [&](index_t r, float acc) {
    float& out = y[r - r0];
    out = beta == 0.0f ? alpha * acc : alpha * acc + beta * out;
  };
#if LORA_NF4_AVX512
  if (in % 64 == 0 && W.block_size() % 64 == 0 && cpu_has_avx512()) {
    thread_local std::vector<float> xbuf;
    float* xp = scratch(xbuf, in);
    permute_x64(x, in, xp);
    LORA_NF4_OMP_FOR_IF(parallel)
    for (index_t r = r0; r < r_end; ++r) {
      thread_local std::vector<float> sbuf;
      float* scales = scratch(sbuf, in / nf4::min_block_size + 2);
      finish(r, row_dot_avx512(W, r, xp, scales));
    }
    return;
  }
#endif
  // Generic path (any shape; and every shape without AVX-512): tile decode + dot.
  LORA_NF4_OMP_FOR_IF(parallel)
  for (index_t r = r0; r < r_end; ++r) {
    thread_local std::vector<float> tbuf;
    float* tile = scratch(tbuf, 256);
    finish(r, row_dot_generic(W, r, x, tile));
  }
}

// The products below are templates on the scalar (only float exists) so
// that their Eigen products are compiled where they are used, not by every TU
// that includes <lora/lora.hpp>: a non-template inline function's body is
// instantiated even when nothing calls it (1.3 s of compile time here).
template <class T>
using dense_t = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <class T = float>
using dense_ref = Eigen::Ref<dense_t<T>>;
template <class T = float>
using const_dense_ref = Eigen::Ref<const dense_t<T>>;

// Y [n, nr] = beta Y + alpha X W[r0:r0+nr]^T.
template <class T>
void gemm_rows(const NF4Matrix& W, index_t r0, index_t nr, const const_dense_ref<T>& X, dense_ref<T> Y, T alpha,
               T beta) {
  const index_t n = X.rows();
  const index_t in = W.cols();
  if (n == 0 || nr == 0) return;
  if (n == 1) {
    gemv_rows(W, r0, nr, X.data(), Y.data(), alpha, beta);
    return;
  }
  if (beta == 0.0f)
    Y.setZero();
  else if (beta != 1.0f)
    Y *= beta;
  if (in == 0) return;
  // Each tile's product repacks X, so larger batches take 4x taller tiles (a 4 MiB
  // tile, out of L2 but still cheaper than repacking a large X 4x as often).
  const index_t tile_floats = n > 32 ? 4 * LORA_NF4_GEMM_TILE_FLOATS : LORA_NF4_GEMM_TILE_FLOATS;
  const index_t tile_rows = std::clamp<index_t>(tile_floats / in, 16, 4096);
  const index_t tiles = (nr + tile_rows - 1) / tile_rows;
  LORA_NF4_OMP_FOR_IF(tiles > 1 && nr * in >= LORA_NF4_PARALLEL_MIN_ELEMENTS)
  for (index_t t = 0; t < tiles; ++t) {
    thread_local std::vector<float> tbuf;
    const index_t off = t * tile_rows;
    const index_t tr = std::min(tile_rows, nr - off);
    float* tile = scratch(tbuf, tr * in);
    W.dequantize_rows(r0 + off, tr, tile);
    const Eigen::Map<const dense_t<T>> Wt(tile, tr, in);            // (tr, in)
    Y.middleCols(off, tr).noalias() += alpha * X * Wt.transpose();  // (n, tr)
  }
}

// dX [n, in] = beta dX + alpha G W[r0:r0+nr], G [n, nr].
template <class T>
void gemm_transposed_rows(const NF4Matrix& W, index_t r0, index_t nr, const const_dense_ref<T>& G, dense_ref<T> dX,
                          T alpha, T beta) {
  if (beta == 0.0f)
    dX.setZero();
  else if (beta != 1.0f)
    dX *= beta;
  const index_t in = W.cols();
  if (G.rows() == 0 || nr == 0 || in == 0) return;
  const index_t tile_rows = std::clamp<index_t>(LORA_NF4_GEMM_TILE_FLOATS / in, 16, 1024);
  thread_local std::vector<float> tbuf;
  float* tile = scratch(tbuf, std::min(tile_rows, nr) * in);
  for (index_t off = 0; off < nr; off += tile_rows) {
    const index_t tr = std::min(tile_rows, nr - off);
    W.dequantize_rows(r0 + off, tr, tile);
    const Eigen::Map<const dense_t<T>> Wt(tile, tr, in);  // (tr, in)
    dX.noalias() += alpha * G.middleCols(off, tr) * Wt;   // (n, in)
  }
}

}  // namespace detail::nf4k

/// y = beta * y + alpha * W x for one token: W [out, in] in NF4, x [in], y [out].
/// W is decoded block by block inside the dot products and never materialised.
/// beta == 0 overwrites y without reading it (BLAS convention). Rows run in
/// parallel when compiled with OpenMP. Throws shape_error on a size mismatch.
inline void nf4_gemv(const NF4Matrix& W, std::span<const float> x, std::span<float> y, float alpha = 1.0f,
                     float beta = 0.0f) {
  if (static_cast<index_t>(x.size()) != W.cols())
    lora::detail::raise<shape_error>("nf4_gemv: x has ", x.size(), " elements, expected W.cols() = ", W.cols());
  if (static_cast<index_t>(y.size()) != W.rows())
    lora::detail::raise<shape_error>("nf4_gemv: y has ", y.size(), " elements, expected W.rows() = ", W.rows());
  detail::nf4k::gemv_rows(W, 0, W.rows(), x.data(), y.data(), alpha, beta);
}

/// Eigen vectors: y = beta * y + alpha * W x.
template <class T = float>  // a template only to defer compiling it (see detail::nf4k::dense_t)
void nf4_gemv(const NF4Matrix& W, const std::type_identity_t<Eigen::Ref<const Eigen::Matrix<T, Eigen::Dynamic, 1>>>& x,
              std::type_identity_t<Eigen::Ref<Eigen::Matrix<T, Eigen::Dynamic, 1>>> y, float alpha = 1.0f,
              float beta = 0.0f) {
  nf4_gemv(W, std::span<const float>(x.data(), std::size_t(x.size())),
           std::span<float>(y.data(), std::size_t(y.size())), alpha, beta);
}

/// Y = beta * Y + alpha * X W^T for a batch: X [n, in] and Y [n, out], both
/// row-major (each token contiguous). A tile of W's rows at a time is dequantised
/// into a per-thread buffer (1 MiB, 4 MiB above 32 tokens) and multiplied with Eigen; n == 1 goes
/// to nf4_gemv. beta == 0 overwrites Y. Throws shape_error on a size mismatch.
template <class T = float>  // a template only to defer compiling it (see detail::nf4k::dense_t)
void nf4_gemm(const NF4Matrix& W, const std::type_identity_t<detail::nf4k::const_dense_ref<T>>& X,
              std::type_identity_t<detail::nf4k::dense_ref<T>> Y, float alpha = 1.0f, float beta = 0.0f) {
  if (X.cols() != W.cols())
    lora::detail::raise<shape_error>("nf4_gemm: X has ", X.cols(), " columns, expected W.cols() = ", W.cols());
  if (Y.rows() != X.rows() || Y.cols() != W.rows())
    lora::detail::raise<shape_error>("nf4_gemm: Y is ", Y.rows(), " x ", Y.cols(), ", expected ", X.rows(),
                                     " x ", W.rows(), " (X.rows() x W.rows())");
  detail::nf4k::gemm_rows<T>(W, 0, W.rows(), X, Y, alpha, beta);
}

/// dX = beta * dX + alpha * G W, the product the backward pass needs through a
/// frozen NF4 base: G [n, out] and dX [n, in], both row-major. Same row tiles as
/// nf4_gemm; the tiles run in order (each adds into all of dX), Eigen may thread
/// the products. beta == 0 overwrites dX. Throws shape_error on a size mismatch.
template <class T = float>  // a template only to defer compiling it (see detail::nf4k::dense_t)
void nf4_gemm_transposed(const NF4Matrix& W, const std::type_identity_t<detail::nf4k::const_dense_ref<T>>& G,
                         std::type_identity_t<detail::nf4k::dense_ref<T>> dX, float alpha = 1.0f,
                         float beta = 0.0f) {
  if (G.cols() != W.rows())
    lora::detail::raise<shape_error>("nf4_gemm_transposed: G has ", G.cols(), " columns, expected W.rows() = ",
                                     W.rows());
  if (dX.rows() != G.rows() || dX.cols() != W.cols())
    lora::detail::raise<shape_error>("nf4_gemm_transposed: dX is ", dX.rows(), " x ", dX.cols(), ", expected ",
                                     G.rows(), " x ", W.cols(), " (G.rows() x W.cols())");
  detail::nf4k::gemm_transposed_rows<T>(W, 0, W.rows(), G, dX, alpha, beta);
}

}  // namespace lora
