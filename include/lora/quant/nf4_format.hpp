// quant/nf4_format.hpp: the NF4 format (docs/nf4.md, "Format"): the
// 16 code values and their thresholds, encode / decode of one value, the
// 8-bit map's scale decode, block sizes and bits per parameter, and the
// (AVX-512 where available) decoder of a run of packed codes. No matrix type,
// no products: quant/nf4_matrix.hpp holds NF4Matrix, backend/eigen/nf4.hpp the
// CPU products and backend/thrust/nf4.hpp the device ones.
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


// The 16 NF4 values (docs/nf4.md, "Format"), as one list so the host array and the
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

/// What a device kernel reads of an NF4 weight: pointers into the device's
/// copy of the layout above and the extents, trivially copyable (the Thrust
/// functors and the CUDA kernel take it by value). Scales are decoded per
/// block exactly as NF4Matrix::block_scale does.
struct PackedView {
  const std::uint8_t* packed = nullptr;  // ceil(rows * cols / 2) bytes, even element in the high nibble
  const float* absmax = nullptr;         // plain scales (null when double-quantised)
  const std::uint8_t* q8 = nullptr;      // double quantisation: 8-bit scale codes
  const float* absmax2 = nullptr;        // one per 256 blocks
  const float* map8 = nullptr;           // 256 entries
  float offset = 0.0f;
  index_t rows = 0, cols = 0;
  int shift = 6;  // log2(block_size): block sizes are powers of two
  bool double_quant = false;

  LORA_HOST_DEVICE float scale(index_t b) const {
    return double_quant ? decode_scale(q8[b], map8, absmax2[b / scale_group_size], offset) : absmax[b];
  }
  /// Dequantised flat element f (row-major).
  LORA_HOST_DEVICE float at(index_t f) const { return decode(nibble(packed, f), scale(f >> shift)); }
};

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

}  // namespace lora
