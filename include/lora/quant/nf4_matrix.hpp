// quant/nf4_matrix.hpp: NF4Matrix, a frozen [out, in] weight stored in 4-bit
// NormalFloat with bitsandbytes' bytes (codes, absmax or double-quantised
// scales): quantise, decode rows, storage. The products live with the backends
// (backend/eigen/nf4.hpp, backend/thrust/nf4.hpp).
#pragma once

#include "lora/quant/nf4_format.hpp"

namespace lora {

/// How double quantisation picks the 8-bit code of a block scale (docs/nf4.md,
/// "Double quantisation").
enum class ScaleRounding {
  /// The nearest map value, ties to the lower code: bitsandbytes' reference (PyTorch)
  /// backend, and the more accurate choice.
  nearest,
  /// bitsandbytes' native CPU quantize_blockwise (0.50), byte for byte: the value is snapped
  /// to one of 65536 bins first (about 0.2% of the codes differ from nearest, each scale by at
  /// most 2 / 65535 of absmax2 more), 1 / absmax2 without the 1e-38 floor.
  bitsandbytes_native,
};

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
  /// Double quantisation: the 8-bit rounding rule. bitsandbytes_native reproduces the bytes
  /// of bitsandbytes' public quantize_4bit(compress_statistics=True) on CPU.
  ScaleRounding scale_rounding = ScaleRounding::nearest;
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
  /// Throws ValueError for a bad block size, a bad map8 or a non-finite value
  /// (its flat index is named), ShapeError for a negative extent.
  static NF4Matrix quantize(const float* data, index_t rows, index_t cols,
                            const NF4Options& options = {}) {
    constexpr const char* fn = "NF4Matrix::quantize";
    check_block_size(fn, options.block_size);
    if (rows < 0 || cols < 0)
      lora::detail::raise<ShapeError>(fn, ": shape ", rows, " x ", cols, " has a negative extent");
    const index_t n = checked_size(fn, rows, cols, options.block_size);
    if (n > 0 && data == nullptr)
      lora::detail::raise<ValueError>(fn, ": data is null for a ", rows, " x ", cols, " matrix");
    check_finite(fn, data, n, cols);

    NF4Matrix m(rows, cols, options.block_size, options.double_quant);
    m.set_map(fn, options.map8);
    m.packed_.assign(static_cast<std::size_t>((n + 1) / 2), 0);
    std::vector<float> absmax(static_cast<std::size_t>(m.num_blocks()));
    quantize_blocks(data, n, m.block_size_, absmax.data(), m.packed_.data());
    if (m.double_quant_)
      m.compress_scales(absmax, options.absmax_offset, options.scale_rounding);
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
  /// without compress_statistics). Throws FormatError when a size disagrees.
  static NF4Matrix from_parts(index_t rows, index_t cols, index_t block_size,
                              std::span<const std::uint8_t> packed, std::span<const float> absmax) {
    constexpr const char* fn = "NF4Matrix::from_parts";
    NF4Matrix m = checked_shell(fn, rows, cols, block_size, false, packed);
    expect_size(fn, "absmax", absmax.size(), m.num_blocks());
    check_scales(fn, "absmax", absmax);
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
    check_scales(fn, "absmax2", absmax2);
    lora::detail::check_finite_parameter(fn, "offset", offset);
    m.q8_.assign(absmax_q8.begin(), absmax_q8.end());
    m.absmax2_.assign(absmax2.begin(), absmax2.end());
    m.offset_ = offset;
    m.check_scale_range(fn);
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
    // Written so that nothing overflows: first + count could wrap past size().
    if (first < 0 || count < 0 || first > size() || count > size() - first)
      lora::detail::raise<ShapeError>("NF4Matrix::dequantize_range: ", count, " elements from ", first,
                                       " are outside [0, ", size(), ")");
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
    if (first_row < 0 || count < 0 || first_row > rows_ || count > rows_ - first_row)
      lora::detail::raise<ShapeError>("NF4Matrix::dequantize_rows: ", count, " rows from row ", first_row,
                                       " are outside [0, ", rows_, ")");
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
      lora::detail::raise<ValueError>(fn, ": block_size ", b, " is not a power of two in [",
                                       nf4::min_block_size, ", ", nf4::max_block_size, "]");
  }

  /// rows * cols, checked so that it and the block arithmetic on it (n + block
  /// size) stay inside index_t.
  static index_t checked_size(const char* fn, index_t rows, index_t cols, index_t block_size) {
    const index_t n = lora::detail::checked_mul(fn, rows, cols);
    (void)lora::detail::checked_add(fn, n, block_size);
    return n;
  }

  static void expect_size(const char* fn, const char* what, std::size_t got, index_t want) {
    if (static_cast<index_t>(got) != want)
      lora::detail::raise<FormatError>(fn, ": ", what, " has ", got, " entries, expected ", want);
  }

  static NF4Matrix checked_shell(const char* fn, index_t rows, index_t cols, index_t block_size,
                                 bool double_quant, std::span<const std::uint8_t> packed) {
    check_block_size(fn, block_size);
    if (rows < 0 || cols < 0)
      lora::detail::raise<ShapeError>(fn, ": shape ", rows, " x ", cols, " has a negative extent");
    const index_t n = checked_size(fn, rows, cols, block_size);
    NF4Matrix m(rows, cols, block_size, double_quant);
    expect_size(fn, "packed", packed.size(), n / 2 + n % 2);
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
          lora::detail::raise<ValueError>(fn, ": non-finite value ", x[i], " at flat index ", i,
                                           " (row ", i / cols, ", column ", i % cols, ")");
    }
  }

  /// Block scales read from a file: finite and >= 0 (a negative scale would
  /// flip the block's signs, NaN / Inf would decode to NaN).
  static void check_scales(const char* fn, const char* what, std::span<const float> s) {
    for (std::size_t k = 0; k < s.size(); ++k)
      if (!(s[k] >= 0.0f && s[k] <= std::numeric_limits<float>::max()))
        lora::detail::raise<ValueError>(fn, ": ", what, "[", k, "] = ", s[k], " is not a finite scale >= 0");
  }

  /// Every reconstructed scale map8[q] * absmax2 + offset must be a finite
  /// float, or whole blocks would decode to Inf / NaN with no error.
  void check_scale_range(const char* fn) const {
    const float* map = map_ptr();
    const double map_max = std::max(std::fabs(double(map[0])), std::fabs(double(map[dynamic_map::size - 1])));
    for (std::size_t g = 0; g < absmax2_.size(); ++g)
      if (map_max * double(absmax2_[g]) + std::fabs(double(offset_)) > double(std::numeric_limits<float>::max()))
        lora::detail::raise<ValueError>(fn, ": absmax2[", g, "] = ", absmax2_[g], " with offset ", offset_,
                                         " reconstructs block scales beyond the float range");
  }

  void set_map(const char* fn, std::span<const float> map8) {
    if (map8.empty()) return;
    if (map8.size() != std::size_t(dynamic_map::size))
      lora::detail::raise<ValueError>(fn, ": map8 has ", map8.size(), " entries, expected ",
                                       dynamic_map::size);
    for (std::size_t k = 0; k < map8.size(); ++k) {
      if (!std::isfinite(map8[k]) || (k > 0 && map8[k] < map8[k - 1]))
        lora::detail::raise<ValueError>(fn, ": map8[", k, "] = ", map8[k],
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

  // Normalises and encodes every block (docs/nf4.md, "Format"): absmax in fp32, full
  // blocks times 1/a, the partial last block divided by a, clamp, count.
  static void quantize_blocks(const float* x, index_t n, index_t bs, float* absmax, std::uint8_t* packed) {
    const index_t nb = (n + bs - 1) / bs;
    LORA_NF4_OMP_FOR_IF(n >= LORA_NF4_PARALLEL_MIN_ELEMENTS)
    for (index_t b = 0; b < nb; ++b) {
      const index_t begin = b * bs;
      const index_t len = std::min(bs, n - begin);
      const float* xb = x + begin;
      const float amax = abs_max(xb, len);
      const float a = std::max(amax, nf4::min_absmax);
      // A full block stores its absmax as is (bitsandbytes does, even when it
      // is below 1e-38); the partial last block stores the divisor a, as
      // bitsandbytes does, so that code * absmax is what was normalised. An
      // all-zero partial block still stores 0 (docs/nf4.md, divergences).
      absmax[b] = len == bs || amax == 0.0f ? amax : a;
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
  // 256 with the same normalise / clamp / nearest-code rule on the 8-bit map, or
  // bitsandbytes' native CPU rule.
  void compress_scales(const std::vector<float>& absmax, std::optional<float> offset, ScaleRounding rounding) {
    const index_t nb = static_cast<index_t>(absmax.size());
    // Mean as "sum, then divide by the count" like torch's CPU mean, but with the
    // sum accumulated in double: deterministic for any thread count, and the
    // correctly rounded fp32 sum for any realistic block count.
    // A float sum beyond FLT_MAX (blocks near the float limit) would make the
    // offset Inf and every scale NaN: then the mean is taken in double.
    double sum = 0.0;
    for (float a : absmax) sum += a;
    if (offset) lora::detail::check_finite_parameter("NF4Matrix::quantize", "absmax_offset", *offset);
    const float fsum = static_cast<float>(sum);
    offset_ = offset ? *offset
              : nb == 0 ? 0.0f
              : fsum <= std::numeric_limits<float>::max() ? fsum / static_cast<float>(nb)
                                                          : static_cast<float>(sum / static_cast<double>(nb));

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
        if (!(std::fabs(s[std::size_t(j)]) <= std::numeric_limits<float>::max()))
          lora::detail::raise<ValueError>("NF4Matrix::quantize: block ", begin + j, "'s absmax ",
                                           absmax[std::size_t(begin + j)], " minus the offset ", offset_,
                                           " overflows float; choose a smaller absmax_offset");
        amax = std::max(amax, std::fabs(s[std::size_t(j)]));
      }
      absmax2_[std::size_t(g)] = amax;
      // A group whose scales all equal the offset (spread 0) stores code 0 and
      // absmax2 0, as bitsandbytes' native quantize_blockwise does (its
      // PyTorch reference backend would store 127, the map's 0). Both decode
      // to the offset: map8[0] * 0 + offset.
      if (amax == 0.0f) continue;  // q8_ is already 0
      if (rounding == ScaleRounding::bitsandbytes_native) {
        // No floor: 1 / amax is inf below 2^-128, as in bitsandbytes; x * inf clamps to +-1
        // and 0 * inf (NaN) takes bin 0, as there.
        const float inv_native = 1.0f / amax;
        for (index_t j = 0; j < len; ++j)
          q8_[std::size_t(begin + j)] =
              static_cast<std::uint8_t>(dynamic_map::encode_native(s[std::size_t(j)] * inv_native, mid));
        continue;
      }
      const float a = std::max(amax, nf4::min_absmax);
      const float inv = 1.0f / a;
      const bool full = len == nf4::scale_group_size;
      // Like the 4-bit partial block: bitsandbytes' reference backend stores the partial last
      // group's divisor max(amax, 1e-38), so map8[q] * absmax2 is what was normalised (a full
      // group keeps its absmax as is, bitsandbytes' quirk; docs/nf4.md).
      if (!full) absmax2_[std::size_t(g)] = a;
      for (index_t j = 0; j < len; ++j) {
        const float v = full ? s[std::size_t(j)] * inv : s[std::size_t(j)] / a;
        q8_[std::size_t(begin + j)] = static_cast<std::uint8_t>(dynamic_map::encode(clamp_unit(v), mid));
      }
    }
    check_scale_range("NF4Matrix::quantize");
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

}  // namespace lora
