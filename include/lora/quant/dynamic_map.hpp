// quant/dynamic_map.hpp: bitsandbytes' signed "dynamic" 8-bit code map, the
// 256 values NF4 double quantisation stores block scales with (docs/nf4.md, "Double quantisation").
//
// The map is data: the float32 bit patterns below are copied from
// data/bnb_dynamic_map_signed.tsv and a test checks that they still agree.
// create_dynamic_map() rebuilds the map the way bitsandbytes does; it is kept
// to document the construction, not to produce the table, because the values
// bitsandbytes gets depend on how the local torch build rounds linspace (see
// docs/nf4.md, "How the dynamic map is built").
#pragma once

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <vector>

#include "lora/config.hpp"
#include "lora/error.hpp"
#include "lora/quant/rounding.hpp"

namespace lora::dynamic_map {

/// Number of codes in the 8-bit map.
inline constexpr int size = 256;

/// float32 bit patterns of create_dynamic_map(signed=True, max_exponent_bits=7,
/// total_bits=8), ascending; index = the stored 8-bit code.
inline constexpr std::uint32_t signed_bits[size] = {
    0xbf7e3333u, 0xbf7a9999u, 0xbf770000u, 0xbf736666u, 0xbf6fccccu, 0xbf6c3333u, 0xbf68999au, 0xbf650000u,  // 0
    0xbf616666u, 0xbf5dccccu, 0xbf5a3333u, 0xbf569999u, 0xbf530000u, 0xbf4f6666u, 0xbf4bccccu, 0xbf483333u,  // 8
    0xbf44999au, 0xbf410000u, 0xbf3d6667u, 0xbf39cccdu, 0xbf363334u, 0xbf32999au, 0xbf2f0000u, 0xbf2b6667u,  // 16
    0xbf27cccdu, 0xbf243333u, 0xbf20999au, 0xbf1d0000u, 0xbf196666u, 0xbf15cccdu, 0xbf123334u, 0xbf0e999au,  // 24
    0xbf0b0000u, 0xbf076666u, 0xbf03cccdu, 0xbf003333u, 0xbef93334u, 0xbef20000u, 0xbeeaccccu, 0xbee3999au,  // 32
    0xbedc6666u, 0xbed53332u, 0xbece0000u, 0xbec6ccccu, 0xbebf999au, 0xbeb86666u, 0xbeb13332u, 0xbeaa0000u,  // 40
    0xbea2ccccu, 0xbe9b999au, 0xbe946666u, 0xbe8d3334u, 0xbe860000u, 0xbe7d999au, 0xbe6f3334u, 0xbe60cccdu,  // 48
    0xbe526666u, 0xbe440000u, 0xbe359999u, 0xbe273333u, 0xbe18cccdu, 0xbe0a6666u, 0xbdf80000u, 0xbddb3334u,  // 56
    0xbdc9eb85u, 0xbdc428f5u, 0xbdbe6667u, 0xbdb8a3d7u, 0xbdb2e148u, 0xbdad1eb8u, 0xbda75c28u, 0xbda1999au,  // 64
    0xbd9bd70au, 0xbd96147bu, 0xbd9051ebu, 0xbd8a8f5du, 0xbd84cccdu, 0xbd7e147au, 0xbd728f5du, 0xbd670a3du,  // 72
    0xbd5b851fu, 0xbd500000u, 0xbd447ae1u, 0xbd38f5c3u, 0xbd2d70a3u, 0xbd21eb85u, 0xbd166667u, 0xbd0ae147u,  // 80
    0xbcfeb852u, 0xbce7ae13u, 0xbcd0a3d7u, 0xbcb9999au, 0xbca28f5cu, 0xbc8b851fu, 0xbc68f5c3u, 0xbc3ae148u,  // 88
    0xbc1f3b64u, 0xbc160418u, 0xbc0ccccdu, 0xbc039581u, 0xbbf4bc6au, 0xbbe24dd3u, 0xbbcfdf3bu, 0xbbbd70a4u,  // 96
    0xbbab020du, 0xbb989374u, 0xbb8624ddu, 0xbb676c8au, 0xbb428f5cu, 0xbb1db22du, 0xbaf1a9fcu, 0xbaa7ef9du,  // 104
    0xba7765ffu, 0xba59e83eu, 0xba3c6a80u, 0xba1eecc1u, 0xba016f01u, 0xb9c7e283u, 0xb98ce705u, 0xb923d70bu,  // 112
    0xb8ba1f4bu, 0xb88aefb3u, 0xb8378034u, 0xb7b24206u, 0xb70205ffu, 0xb65a1a94u, 0xb513a3b7u, 0x00000000u,  // 120
    0x3513a3b7u, 0x365a1a94u, 0x370205ffu, 0x37b24206u, 0x38378034u, 0x388aefb3u, 0x38ba1f4bu, 0x3923d70bu,  // 128
    0x398ce705u, 0x39c7e283u, 0x3a016f01u, 0x3a1eecc1u, 0x3a3c6a80u, 0x3a59e83eu, 0x3a7765ffu, 0x3aa7ef9du,  // 136
    0x3af1a9fcu, 0x3b1db22du, 0x3b428f5cu, 0x3b676c8au, 0x3b8624ddu, 0x3b989374u, 0x3bab020du, 0x3bbd70a4u,  // 144
    0x3bcfdf3bu, 0x3be24dd3u, 0x3bf4bc6au, 0x3c039581u, 0x3c0ccccdu, 0x3c160418u, 0x3c1f3b64u, 0x3c3ae148u,  // 152
    0x3c68f5c3u, 0x3c8b851fu, 0x3ca28f5cu, 0x3cb9999au, 0x3cd0a3d7u, 0x3ce7ae13u, 0x3cfeb852u, 0x3d0ae147u,  // 160
    0x3d166667u, 0x3d21eb85u, 0x3d2d70a3u, 0x3d38f5c3u, 0x3d447ae1u, 0x3d500000u, 0x3d5b851fu, 0x3d670a3du,  // 168
    0x3d728f5du, 0x3d7e147au, 0x3d84cccdu, 0x3d8a8f5du, 0x3d9051ebu, 0x3d96147bu, 0x3d9bd70au, 0x3da1999au,  // 176
    0x3da75c28u, 0x3dad1eb8u, 0x3db2e148u, 0x3db8a3d7u, 0x3dbe6667u, 0x3dc428f5u, 0x3dc9eb85u, 0x3ddb3334u,  // 184
    0x3df80000u, 0x3e0a6666u, 0x3e18cccdu, 0x3e273333u, 0x3e359999u, 0x3e440000u, 0x3e526666u, 0x3e60cccdu,  // 192
    0x3e6f3334u, 0x3e7d999au, 0x3e860000u, 0x3e8d3334u, 0x3e946666u, 0x3e9b999au, 0x3ea2ccccu, 0x3eaa0000u,  // 200
    0x3eb13332u, 0x3eb86666u, 0x3ebf999au, 0x3ec6ccccu, 0x3ece0000u, 0x3ed53332u, 0x3edc6666u, 0x3ee3999au,  // 208
    0x3eeaccccu, 0x3ef20000u, 0x3ef93334u, 0x3f003333u, 0x3f03cccdu, 0x3f076666u, 0x3f0b0000u, 0x3f0e999au,  // 216
    0x3f123334u, 0x3f15cccdu, 0x3f196666u, 0x3f1d0000u, 0x3f20999au, 0x3f243333u, 0x3f27cccdu, 0x3f2b6667u,  // 224
    0x3f2f0000u, 0x3f32999au, 0x3f363334u, 0x3f39cccdu, 0x3f3d6667u, 0x3f410000u, 0x3f44999au, 0x3f483333u,  // 232
    0x3f4bccccu, 0x3f4f6666u, 0x3f530000u, 0x3f569999u, 0x3f5a3333u, 0x3f5dccccu, 0x3f616666u, 0x3f650000u,  // 240
    0x3f68999au, 0x3f6c3333u, 0x3f6fccccu, 0x3f736666u, 0x3f770000u, 0x3f7a9999u, 0x3f7e3333u, 0x3f800000u,  // 248
};

namespace detail {
struct float_table {
  float v[size];
};
struct threshold_table {
  float v[size - 1];
};

constexpr float_table make_signed_values() {
  float_table t{};
  for (int i = 0; i < size; ++i) t.v[i] = std::bit_cast<float>(signed_bits[i]);
  return t;
}
inline constexpr float_table signed_values_table = make_signed_values();

// float32 midpoints: the quantiser picks the nearest code, ties to the lower
// one, by counting the midpoints a value strictly exceeds.
constexpr threshold_table make_signed_thresholds() {
  threshold_table t{};
  for (int i = 0; i + 1 < size; ++i)
    t.v[i] = (signed_values_table.v[i] + signed_values_table.v[i + 1]) / 2.0f;
  return t;
}
inline constexpr threshold_table signed_thresholds_table = make_signed_thresholds();
}  // namespace detail

/// The 256 map values as floats (host-side; device code receives the map as a
/// pointer, the way bitsandbytes passes its `code` tensor).
inline constexpr const float (&signed_values)[size] = detail::signed_values_table.v;

/// The 255 float32 midpoints (values[k] + values[k+1]) / 2 used to quantise.
inline constexpr const float (&signed_thresholds)[size - 1] = detail::signed_thresholds_table.v;

/// Nearest code of a value already normalised to [-1, 1] (ties to the lower
/// code): the number of `thresholds` strictly below `v`. `thresholds` holds
/// `count` ascending values. Binary search, so 8 comparisons for 255 midpoints.
LORA_HOST_DEVICE inline int encode(float v, const float* thresholds, int count = size - 1) {
  int lo = 0, hi = count;  // answer in [lo, hi]
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (thresholds[mid] < v)
      lo = mid + 1;
    else
      hi = mid;
  }
  return lo;
}

/// bitsandbytes' native CPU quantize_blockwise (libbitsandbytes_cpu, csrc/cpu_ops.cpp,
/// 0.50.x; what quantize_4bit(compress_statistics=True) runs for the scales on CPU) does not
/// pick the nearest code of a value: it snaps the value to one of 65536 bins and takes the
/// nearest code of the bin's centre (a table built once per map). docs/nf4.md, "Double
/// quantisation", says how often that differs from the nearest code.
inline constexpr int native_bins = 65536;

/// Bin of x * (1 / absmax) (the product, unclamped): clamp to [-1, 1], then
/// trunc(fma((v + 1) * 0.5, 65535, 0.5)). A NaN (0 * inf, when 1 / absmax overflowed) goes to
/// bin 0, as x86's float-to-int conversion gives there.
inline int native_bin(float v) {
  if (!(v == v)) return 0;
  v = v < -1.0f ? -1.0f : (v > 1.0f ? 1.0f : v);
  // (v + 1) * 0.5 is exact after the rounded add (a multiple of 2^-25). bitsandbytes' build
  // fuses the rest into an fma; rounding the product first gives the same bin for every such
  // value (checked exhaustively), so the choice only mirrors the source.
  return static_cast<int>(std::fma((v + 1.0f) * 0.5f, float(native_bins - 1), 0.5f));
}

/// Centre of bin i as bitsandbytes computes it: fl(fl(2 i) / 65535) - 1.
inline float native_bin_centre(int i) { return float(2 * i) / float(native_bins - 1) - 1.0f; }

/// Code the native CPU quantiser stores for v = x * (1 / absmax): the nearest code of its bin's
/// centre (ties to the lower code; `thresholds` as for encode).
inline int encode_native(float v, const float* thresholds, int count = size - 1) {
  return encode(native_bin_centre(native_bin(v)), thresholds, count);
}

/// bitsandbytes' create_dynamic_map(signed, max_exponent_bits, total_bits),
/// computed in float32: for i = 0 .. max_exponent_bits-1, the means of adjacent
/// points of linspace(0.1, 1, 2^(i + non_sign_bits - max_exponent_bits) + 1)
/// (one more power of two when unsigned) times 10^(i - max_exponent_bits + 1),
/// with both signs when signed; then 0 and 1, zero padding to 2^total_bits,
/// and an ascending sort.
///
/// linspace follows ATen's CPU kernel as built for AVX2 (8-float vectors):
/// each vector starts at `start + step * idx` (contracted to one FMA by the
/// compiler there) and its lanes add `j * step` (rounded product, then sum);
/// the second half counts back from `end`. That reproduces the shipped table
/// except 4 entries that differ by 1 ulp (tests/test_nf4.cpp checks exactly
/// this); a torch build with other vector widths gets other last bits.
inline std::vector<float> create_dynamic_map(bool is_signed = true, int max_exponent_bits = 7,
                                             int total_bits = 8) {
  if (total_bits < 2 || total_bits > 16 || max_exponent_bits < 1 ||
      max_exponent_bits > total_bits - 1)
    lora::detail::raise<ValueError>("dynamic_map::create_dynamic_map: max_exponent_bits ",
                                     max_exponent_bits, " and total_bits ", total_bits,
                                     " need 1 <= max_exponent_bits < total_bits <= 16");
  // Rounded fp32 products that the compiler may not fuse with the adds below.
  const auto mul = [](float a, float b) { return lora::detail::fp32_mul_unfused(a, b); };
  const auto linspace = [&](int steps) {
    std::vector<float> out(static_cast<std::size_t>(steps));
    const float start = 0.1f, end = 1.0f;
    const float step = (end - start) / static_cast<float>(steps - 1);
    const int halfway = steps / 2;
    const auto scalar = [&](int idx) {
      return idx < halfway ? start + mul(step, float(idx))
                           : end - mul(step, float(steps - idx - 1));
    };
    constexpr int lanes = 8;
    int idx = 0;
    for (; idx + lanes <= steps; idx += lanes) {
      const float base = idx < halfway ? std::fma(step, float(idx), start)
                                       : std::fma(-step, float(steps - idx - 1), end);
      for (int j = 0; j < lanes; ++j) out[std::size_t(idx + j)] = base + mul(float(j), step);
    }
    for (; idx < steps; ++idx) out[std::size_t(idx)] = scalar(idx);
    return out;
  };

  std::vector<float> data;
  const int non_sign_bits = total_bits - 1;
  const int additional_items = (1 << (non_sign_bits - max_exponent_bits)) - 1;
  const auto add_decade = [&](int i, int fraction_items) {
    const std::vector<float> b = linspace(fraction_items);
    // bitsandbytes multiplies a float32 tensor by the Python float 10**e;
    // ATen rounds that scalar to float32 first.
    const float scale = static_cast<float>(std::pow(10.0, double(i - (max_exponent_bits - 1))));
    for (std::size_t k = 0; k + 1 < b.size(); ++k) {
      const float mean = (b[k] + b[k + 1]) / 2.0f;
      data.push_back(mul(scale, mean));
      if (is_signed) data.push_back(-mul(scale, mean));
    }
  };
  int i = 0;
  for (; i < max_exponent_bits; ++i)
    add_decade(i, is_signed ? (1 << (i + non_sign_bits - max_exponent_bits)) + 1
                            : (1 << (i + non_sign_bits - max_exponent_bits + 1)) + 1);
  if (additional_items > 0) add_decade(i - 1, additional_items + 1);
  data.push_back(0.0f);
  data.push_back(1.0f);
  data.resize(std::size_t(1) << total_bits, 0.0f);
  std::sort(data.begin(), data.end());
  return data;
}

}  // namespace lora::dynamic_map
