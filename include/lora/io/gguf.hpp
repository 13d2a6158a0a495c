// io/gguf.hpp: GGUF files (llama.cpp's format, version 3) and the LoRA adapters in them.
//   GgufFile        the reader: header, every KV value type, tensor infos, a checked layout,
//                   read<T>(name) -> RowMatrix<T> in PyTorch order (F32, F16, BF16, F64, Q8_0)
//   GgufWriter      the writer: the bytes of gguf-py's GGUFWriter for the same KVs and tensors
//   load_gguf_lora / save_gguf_lora: the adapter layout convert_lora_to_gguf.py writes and
//                   llama.cpp's llama-adapter.cpp reads
//   gguf_tensor_name / hf_module_path: llama-style PEFT module paths <-> GGUF tensor names;
//   fold_scale, llama_rope_permute_rows: what a conversion from PEFT must do to B
// docs/io_gguf.md has the layout, the checks and the name table.
#pragma once

#include "../lora.hpp"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <span>
#include <string>
#include <string_view>
#include <system_error>
#include <type_traits>
#include <utility>
#include <variant>
#include <vector>

#if defined(__unix__) || defined(__APPLE__)
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#define LORA_GGUF_MMAP 1
#endif

namespace lora::io {

static_assert(std::endian::native == std::endian::little,
              "lora/io/gguf.hpp reads and writes little-endian GGUF on a little-endian host only");

// ---------------------------------------------------------------- types

/// ggml's tensor types, numbered as in ggml.h / gguf-py's GGMLQuantizationType. All are known
/// (name, block layout) so that any file's layout can be checked; read<T>() decodes F32, F16,
/// BF16, F64 and Q8_0.
// clang-format off
enum class GgmlType : std::uint32_t {
  F32 = 0, F16 = 1, Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q8_1 = 9,
  Q2_K = 10, Q3_K = 11, Q4_K = 12, Q5_K = 13, Q6_K = 14, Q8_K = 15,
  IQ2_XXS = 16, IQ2_XS = 17, IQ3_XXS = 18, IQ1_S = 19, IQ4_NL = 20, IQ3_S = 21, IQ2_S = 22,
  IQ4_XS = 23, I8 = 24, I16 = 25, I32 = 26, I64 = 27, F64 = 28, IQ1_M = 29, BF16 = 30,
  TQ1_0 = 34, TQ2_0 = 35, MXFP4 = 39, NVFP4 = 40, Q1_0 = 41,
};
// clang-format on

/// A ggml type's name and block layout: block_elements values in block_bytes bytes.
struct GgmlTypeInfo {
  const char* name;
  std::uint32_t block_elements;
  std::uint32_t block_bytes;
};

/// The layout of ggml type `id`, or nothing for a number ggml does not define (or removed).
inline std::optional<GgmlTypeInfo> ggml_type_info(std::uint32_t id) {
  constexpr std::uint32_t qk = 256;  // QK_K: super-block of the k-quants
  switch (id) {
    case 0: return GgmlTypeInfo{"F32", 1, 4};
    case 1: return GgmlTypeInfo{"F16", 1, 2};
    case 2: return GgmlTypeInfo{"Q4_0", 32, 2 + 16};
    case 3: return GgmlTypeInfo{"Q4_1", 32, 2 + 2 + 16};
    case 6: return GgmlTypeInfo{"Q5_0", 32, 2 + 4 + 16};
    case 7: return GgmlTypeInfo{"Q5_1", 32, 2 + 2 + 4 + 16};
    case 8: return GgmlTypeInfo{"Q8_0", 32, 2 + 32};
    case 9: return GgmlTypeInfo{"Q8_1", 32, 4 + 4 + 32};
    case 10: return GgmlTypeInfo{"Q2_K", qk, 2 + 2 + qk / 16 + qk / 4};
    case 11: return GgmlTypeInfo{"Q3_K", qk, 2 + qk / 4 + qk / 8 + 12};
    case 12: return GgmlTypeInfo{"Q4_K", qk, 2 + 2 + qk / 2 + 12};
    case 13: return GgmlTypeInfo{"Q5_K", qk, 2 + 2 + qk / 2 + qk / 8 + 12};
    case 14: return GgmlTypeInfo{"Q6_K", qk, 2 + qk / 2 + qk / 4 + qk / 16};
    case 15: return GgmlTypeInfo{"Q8_K", qk, 4 + qk + qk / 8};
    case 16: return GgmlTypeInfo{"IQ2_XXS", qk, 2 + qk / 4};
    case 17: return GgmlTypeInfo{"IQ2_XS", qk, 2 + qk / 4 + qk / 32};
    case 18: return GgmlTypeInfo{"IQ3_XXS", qk, 2 + qk / 4 + qk / 8};
    case 19: return GgmlTypeInfo{"IQ1_S", qk, 2 + qk / 8 + qk / 16};
    case 20: return GgmlTypeInfo{"IQ4_NL", 32, 2 + 16};
    case 21: return GgmlTypeInfo{"IQ3_S", qk, 2 + qk / 4 + qk / 8 + qk / 32 + 4};
    case 22: return GgmlTypeInfo{"IQ2_S", qk, 2 + qk / 4 + qk / 16};
    case 23: return GgmlTypeInfo{"IQ4_XS", qk, 2 + 2 + qk / 2 + qk / 64};
    case 24: return GgmlTypeInfo{"I8", 1, 1};
    case 25: return GgmlTypeInfo{"I16", 1, 2};
    case 26: return GgmlTypeInfo{"I32", 1, 4};
    case 27: return GgmlTypeInfo{"I64", 1, 8};
    case 28: return GgmlTypeInfo{"F64", 1, 8};
    case 29: return GgmlTypeInfo{"IQ1_M", qk, qk / 8 + qk / 16 + qk / 32};
    case 30: return GgmlTypeInfo{"BF16", 1, 2};
    case 34: return GgmlTypeInfo{"TQ1_0", qk, 2 + 4 * 13};
    case 35: return GgmlTypeInfo{"TQ2_0", qk, 2 + 64};
    case 39: return GgmlTypeInfo{"MXFP4", 32, 1 + 16};
    case 40: return GgmlTypeInfo{"NVFP4", 64, 4 + 32};
    case 41: return GgmlTypeInfo{"Q1_0", 128, 2 + 16};
    default: return std::nullopt;
  }
}

/// "Q4_K", "Q4_0_4_4 (removed from ggml)" or "unknown 57": ggml type numbers in messages.
inline std::string ggml_type_name(std::uint32_t id) {
  if (auto t = ggml_type_info(id)) return t->name;
  switch (id) {  // numbers ggml once used; files holding them no longer load anywhere
    case 4: return "Q4_2 (removed from ggml)";
    case 5: return "Q4_3 (removed from ggml)";
    case 31: return "Q4_0_4_4 (removed from ggml)";
    case 32: return "Q4_0_4_8 (removed from ggml)";
    case 33: return "Q4_0_8_8 (removed from ggml)";
    case 36: return "IQ4_NL_4_4 (removed from ggml)";
    case 37: return "IQ4_NL_4_8 (removed from ggml)";
    case 38: return "IQ4_NL_8_8 (removed from ggml)";
    default: return lora::detail::concat("unknown ", id);
  }
}
inline std::string ggml_type_name(GgmlType t) { return ggml_type_name(static_cast<std::uint32_t>(t)); }

/// GGUF metadata value types (gguf.h's gguf_type, gguf-py's GGUFValueType).
// clang-format off
enum class GgufValueType : std::uint32_t {
  UINT8 = 0, INT8 = 1, UINT16 = 2, INT16 = 3, UINT32 = 4, INT32 = 5, FLOAT32 = 6, BOOL = 7,
  STRING = 8, ARRAY = 9, UINT64 = 10, INT64 = 11, FLOAT64 = 12,
};
// clang-format on

/// ggml's short names: "u8", "i8", ..., "str", "arr", "f64".
inline const char* gguf_value_type_name(GgufValueType t) {
  static constexpr const char* names[] = {"u8",   "i8",  "u16", "i16", "u32", "i32", "f32",
                                          "bool", "str", "arr", "u64", "i64", "f64"};
  const auto i = static_cast<std::uint32_t>(t);
  return i < 13 ? names[i] : "unknown";
}

struct GgufValue;

namespace gguf_detail {
template <class T, class V>
struct is_alternative : std::false_type {};
template <class T, class... Ts>
struct is_alternative<T, std::variant<Ts...>> : std::bool_constant<(std::is_same_v<T, Ts> || ...)> {};
}  // namespace gguf_detail

/// A GGUF array: one element type, items of that type (arrays of arrays allowed: gguf-py
/// writes and reads them; ggml's gguf.cpp refuses them).
struct GgufArray {
  GgufValueType element_type = GgufValueType::UINT8;
  std::vector<GgufValue> items;
  bool operator==(const GgufArray& other) const;
};

/// One metadata value. The variant's alternatives are in GGUF's type order, so
/// data.index() is the GgufValueType.
struct GgufValue {
  using variant = std::variant<std::uint8_t, std::int8_t, std::uint16_t, std::int16_t, std::uint32_t, std::int32_t,
                               float, bool, std::string, GgufArray, std::uint64_t, std::int64_t, double>;
  variant data;

  GgufValue() = default;
  // clang-format off
  /// From exactly one of the alternative types (no conversions: 5 is not a u8).
  template <class T>
    requires gguf_detail::is_alternative<std::remove_cvref_t<T>, variant>::value
  GgufValue(T&& v) : data(std::in_place_type<std::remove_cvref_t<T>>, std::forward<T>(v)) {}  // NOLINT
  // clang-format on
  /// A string literal is a string.
  GgufValue(const char* s) : data(std::in_place_type<std::string>, s) {}  // NOLINT

  GgufValueType type() const { return static_cast<GgufValueType>(data.index()); }
  template <class T>
  bool is() const {
    return std::holds_alternative<T>(data);
  }
  /// The value as T; ValueError naming both types when it holds another.
  template <class T>
  const T& as() const {
    if (const T* p = std::get_if<T>(&data)) return *p;
    lora::detail::raise<ValueError>("GgufValue::as: the value is ", gguf_value_type_name(type()),
                                    ", not the type asked for");
  }
  bool operator==(const GgufValue& other) const = default;
};

inline bool GgufArray::operator==(const GgufArray& other) const {
  return element_type == other.element_type && items == other.items;
}

namespace gguf_detail {
// clang-format off
template <class T> struct gguf_type_of;
template <> struct gguf_type_of<std::uint8_t> { static constexpr auto value = GgufValueType::UINT8; };
template <> struct gguf_type_of<std::int8_t> { static constexpr auto value = GgufValueType::INT8; };
template <> struct gguf_type_of<std::uint16_t> { static constexpr auto value = GgufValueType::UINT16; };
template <> struct gguf_type_of<std::int16_t> { static constexpr auto value = GgufValueType::INT16; };
template <> struct gguf_type_of<std::uint32_t> { static constexpr auto value = GgufValueType::UINT32; };
template <> struct gguf_type_of<std::int32_t> { static constexpr auto value = GgufValueType::INT32; };
template <> struct gguf_type_of<float> { static constexpr auto value = GgufValueType::FLOAT32; };
template <> struct gguf_type_of<bool> { static constexpr auto value = GgufValueType::BOOL; };
template <> struct gguf_type_of<std::string> { static constexpr auto value = GgufValueType::STRING; };
template <> struct gguf_type_of<GgufArray> { static constexpr auto value = GgufValueType::ARRAY; };
template <> struct gguf_type_of<std::uint64_t> { static constexpr auto value = GgufValueType::UINT64; };
template <> struct gguf_type_of<std::int64_t> { static constexpr auto value = GgufValueType::INT64; };
template <> struct gguf_type_of<double> { static constexpr auto value = GgufValueType::FLOAT64; };
// clang-format on

inline constexpr std::uint64_t gguf_max_string = std::uint64_t{1} << 30;  // ggml's limits
inline constexpr std::uint64_t gguf_max_array = std::uint64_t{1} << 30;
inline constexpr int gguf_max_array_depth = 16;   // nesting; bounds the recursion
inline constexpr std::size_t gguf_max_name = 64;  // GGML_MAX_NAME, terminator included
inline constexpr std::uint32_t gguf_default_alignment = 32;

/// A name from a file, fit for a message: control bytes escaped, long names cut.
inline std::string printable(std::string_view s) {
  std::string out;
  for (std::size_t i = 0; i < s.size() && i < 96; ++i) {
    const auto c = static_cast<unsigned char>(s[i]);
    if (c < 0x20 || c == 0x7f) {
      static constexpr char hex[] = "0123456789abcdef";
      out += "\\x";
      out += hex[c >> 4];
      out += hex[c & 15];
    } else {
      out += static_cast<char>(c);
    }
  }
  if (s.size() > 96) out += "...";
  return out;
}

// fp16 / bf16 <-> fp32, bit-exact with numpy's astype(float16) (round to nearest even, NaN
// payload truncated but kept a NaN) and ggml's / gguf-py's fp32 -> bf16 (NaN quieted, RNE).
inline float half_to_float(std::uint16_t h) {
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
  const std::uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  if (exp == 0) {  // zero or subnormal: man * 2^-24, exact in float
    const float mag = static_cast<float>(man) * 0x1p-24f;
    return std::bit_cast<float>(sign | std::bit_cast<std::uint32_t>(mag));
  }
  if (exp == 31) return std::bit_cast<float>(sign | 0x7f800000u | (man << 13));
  return std::bit_cast<float>(sign | ((exp + 112) << 23) | (man << 13));
}
inline std::uint32_t shift_right_even(std::uint32_t x, int s) {  // x / 2^s, ties to even
  const std::uint32_t q = x >> s, rem = x & ((1u << s) - 1), half = 1u << (s - 1);
  return q + ((rem > half || (rem == half && (q & 1u))) ? 1u : 0u);
}
inline std::uint16_t float_to_half(float f) {
  const auto x = std::bit_cast<std::uint32_t>(f);
  const auto sign = static_cast<std::uint16_t>((x >> 16) & 0x8000u);
  const std::uint32_t exp = (x >> 23) & 0xffu, man = x & 0x7fffffu;
  if (exp == 0xff) {
    if (man == 0) return static_cast<std::uint16_t>(sign | 0x7c00u);
    std::uint32_t h = 0x7c00u + (man >> 13);
    if (h == 0x7c00u) ++h;  // a NaN whose kept payload is 0 must stay a NaN
    return static_cast<std::uint16_t>(sign | h);
  }
  if (exp == 0) return sign;  // below 2^-126: far under half the smallest fp16 subnormal
  const std::uint32_t full = man | 0x800000u;
  const int he = static_cast<int>(exp) - 127 + 15;
  if (he >= 1) {  // the rounding carry may bump the exponent, up to infinity
    const std::uint32_t bits = (static_cast<std::uint32_t>(he) << 10) + shift_right_even(full, 13) - 1024;
    return static_cast<std::uint16_t>(sign | (bits >= 0x7c00u ? 0x7c00u : bits));
  }
  const int s = 126 - static_cast<int>(exp);  // fp16 subnormal: full * 2^(exp - 150) / 2^-24
  if (s > 25) return sign;
  return static_cast<std::uint16_t>(sign | shift_right_even(full, s));
}
inline float bf16_to_float(std::uint16_t h) { return std::bit_cast<float>(static_cast<std::uint32_t>(h) << 16); }
inline std::uint16_t float_to_bf16(float f) {
  std::uint32_t x = std::bit_cast<std::uint32_t>(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) x = (x & 0xffff0000u) | 0x00400000u;
  return static_cast<std::uint16_t>((std::uint64_t{x} + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

template <class T>
void put(std::vector<std::byte>& out, T v) {
  const auto at = out.size();
  out.resize(at + sizeof(T));
  std::memcpy(out.data() + at, &v, sizeof(T));
}
inline void put_string(std::vector<std::byte>& out, std::string_view s) {
  put<std::uint64_t>(out, s.size());
  const auto at = out.size();
  out.resize(at + s.size());
  if (!s.empty()) std::memcpy(out.data() + at, s.data(), s.size());
}
inline std::uint64_t pad_to(std::uint64_t x, std::uint64_t align) { return (x + align - 1) / align * align; }
}  // namespace gguf_detail

/// One KV as it stands in the file: key, value, and the byte where its key starts.
struct GgufKv {
  std::string key;
  GgufValue value;
  std::uint64_t offset = 0;
};

/// One tensor info. ne is in ggml order (ne[0] is the row length, PyTorch's last dimension).
struct GgufTensorInfo {
  std::string name;
  GgmlType type = GgmlType::F32;
  std::vector<std::uint64_t> ne;
  std::uint64_t offset = 0;       ///< from the start of the data section, as stored
  std::uint64_t file_offset = 0;  ///< from the start of the file
  std::uint64_t n_bytes = 0;
  std::uint64_t info_offset = 0;  ///< where its tensor info starts (for messages)

  std::uint64_t n_elements() const {
    std::uint64_t n = 1;
    for (auto e : ne) n *= e;  // checked when the file was opened
    return n;
  }
  /// PyTorch order: ne reversed.
  std::vector<std::int64_t> shape() const { return {ne.rbegin(), ne.rend()}; }
};

// ---------------------------------------------------------------- reader

/// A GGUF file, parsed and checked when opened; tensor data is decoded on request.
/// open() maps the file (POSIX) or reads it; copies share the bytes. A mapped file must not be
/// truncated by another process while a GgufFile over it lives (the OS would fault the read).
class GgufFile {
 public:
  /// Opens and checks `path`. FormatError for any structural problem (message: the path, the
  /// key or tensor, the byte offset); lora::Error when the file cannot be opened or read.
  static GgufFile open(const std::filesystem::path& path) {
    const std::string label = path.string();
#ifdef LORA_GGUF_MMAP
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) raise_os(label, "cannot open", errno);
    struct stat st {};
    if (::fstat(fd, &st) != 0) {
      const int err = errno;
      ::close(fd);
      raise_os(label, "cannot stat", err);
    }
    if (!S_ISREG(st.st_mode)) {
      ::close(fd);
      lora::detail::raise<Error>(label, ": not a regular file");
    }
    const auto size = static_cast<std::size_t>(st.st_size);
    if (size > 0) {
      void* p = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
      if (p != MAP_FAILED) {
        ::close(fd);  // the mapping keeps the file
        std::shared_ptr<const void> hold(p, [size](const void* q) { ::munmap(const_cast<void*>(q), size); });
        return GgufFile(std::move(hold), static_cast<const std::byte*>(p), size, label);
      }
    }
    ::close(fd);
#endif
    std::ifstream in(path, std::ios::binary);
    if (!in) lora::detail::raise<Error>(label, ": cannot open for reading");
    std::vector<std::byte> bytes;
    in.seekg(0, std::ios::end);
    const auto end = in.tellg();
    in.seekg(0, std::ios::beg);
    if (end < 0) lora::detail::raise<Error>(label, ": cannot determine the file size");
    bytes.resize(static_cast<std::size_t>(end));
    if (!bytes.empty() && !in.read(reinterpret_cast<char*>(bytes.data()), static_cast<std::streamsize>(bytes.size())))
      lora::detail::raise<Error>(label, ": read failed");
    return from_bytes(std::move(bytes), label);
  }

  /// Parses bytes already in memory; `label` names them in messages.
  static GgufFile from_bytes(std::vector<std::byte> bytes, std::string label) {
    auto hold = std::make_shared<std::vector<std::byte>>(std::move(bytes));
    const std::byte* p = hold->data();
    const std::size_t n = hold->size();
    return GgufFile(std::move(hold), p, n, std::move(label));
  }

  const std::string& label() const { return label_; }
  std::uint32_t version() const { return version_; }
  std::uint32_t alignment() const { return alignment_; }
  std::uint64_t data_offset() const { return data_offset_; }  ///< start of the data section
  std::size_t size() const { return size_; }
  std::span<const std::byte> bytes() const { return {data_, size_}; }

  // ---- metadata
  bool has(std::string_view key) const { return key_index_.find(key) != key_index_.end(); }
  const GgufKv* find_kv(std::string_view key) const {
    const auto it = key_index_.find(key);
    return it == key_index_.end() ? nullptr : &kvs_[it->second];
  }
  const GgufValue* find(std::string_view key) const {
    const GgufKv* kv = find_kv(key);
    return kv ? &kv->value : nullptr;
  }
  /// The value of `key`; FormatError naming the file when there is none.
  const GgufValue& value(std::string_view key) const { return kv(key).value; }
  /// The value of `key` as T (exactly that GGUF type: u32 is not read as u64); FormatError
  /// naming the file, the key, both types and the byte offset otherwise.
  template <class T>
  const T& get(std::string_view key) const {
    const GgufKv& e = kv(key);
    if (const T* p = std::get_if<T>(&e.value.data)) return *p;
    lora::detail::raise<FormatError>(
        label_, ": key '", gguf_detail::printable(key), "' is ", gguf_value_type_name(e.value.type()), ", not ",
        gguf_value_type_name(gguf_detail::gguf_type_of<T>::value), " (at byte ", e.offset, ")");
  }
  /// An array of T (element type exactly T) as a vector.
  template <class T>
  std::vector<T> get_array(std::string_view key) const {
    const GgufArray& a = get<GgufArray>(key);
    if (a.element_type != gguf_detail::gguf_type_of<T>::value)
      lora::detail::raise<FormatError>(
          label_, ": key '", gguf_detail::printable(key), "' is an array of ", gguf_value_type_name(a.element_type),
          ", not of ", gguf_value_type_name(gguf_detail::gguf_type_of<T>::value), " (at byte ", kv(key).offset, ")");
    std::vector<T> out;
    out.reserve(a.items.size());
    for (const auto& v : a.items) out.push_back(std::get<T>(v.data));
    return out;
  }
  /// Keys in file order.
  std::vector<std::string> keys() const {
    std::vector<std::string> out;
    out.reserve(kvs_.size());
    for (const auto& e : kvs_) out.push_back(e.key);
    return out;
  }
  const std::vector<GgufKv>& kvs() const { return kvs_; }

  // ---- tensors
  const std::vector<GgufTensorInfo>& tensors() const { return tensors_; }
  bool has_tensor(std::string_view name) const { return tensor_index_.find(name) != tensor_index_.end(); }
  const GgufTensorInfo& tensor(std::string_view name) const {
    const auto it = tensor_index_.find(name);
    if (it == tensor_index_.end())
      lora::detail::raise<FormatError>(label_, ": no tensor named '", gguf_detail::printable(name), "'");
    return tensors_[it->second];
  }
  /// The stored bytes of a tensor (any type), in the file's buffer.
  std::span<const std::byte> tensor_bytes(std::string_view name) const {
    const GgufTensorInfo& t = tensor(name);
    return {data_ + t.file_offset, static_cast<std::size_t>(t.n_bytes)};
  }

  /// A tensor as a row-major matrix in PyTorch order: ggml ne = [cols, rows, ...] gives
  /// [rows, cols]; 1-D is [1, n]; 3-D and 4-D fold the leading dimensions into the rows
  /// ([ne3 * ne2 * ne1, ne0]). Decodes F32, F16, BF16, F64 and Q8_0 (blocks of 32: an fp16
  /// scale d and 32 int8 q, value d * q); other types are a FormatError naming the type.
  template <class T>
  RowMatrix<T> read(std::string_view name) const {
    static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>,
                  "GgufFile::read<T>: T must be float or double");
    const GgufTensorInfo& t = tensor(name);
    std::uint64_t rows = 1;
    for (std::size_t i = 1; i < t.ne.size(); ++i) rows *= t.ne[i];
    RowMatrix<T> out(static_cast<index_t>(rows), static_cast<index_t>(t.ne[0]));
    const std::byte* src = data_ + t.file_offset;
    T* dst = out.data();
    const std::uint64_t n = t.n_elements();
    switch (t.type) {
      case GgmlType::F32:
        for (std::uint64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(load<float>(src + 4 * i));
        break;
      case GgmlType::F64:
        for (std::uint64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(load<double>(src + 8 * i));
        break;
      case GgmlType::F16:
        for (std::uint64_t i = 0; i < n; ++i)
          dst[i] = static_cast<T>(gguf_detail::half_to_float(load<std::uint16_t>(src + 2 * i)));
        break;
      case GgmlType::BF16:
        for (std::uint64_t i = 0; i < n; ++i)
          dst[i] = static_cast<T>(gguf_detail::bf16_to_float(load<std::uint16_t>(src + 2 * i)));
        break;
      case GgmlType::Q8_0:
        for (std::uint64_t b = 0; b < n / 32; ++b) {
          const std::byte* block = src + 34 * b;
          const float d = gguf_detail::half_to_float(load<std::uint16_t>(block));
          for (int k = 0; k < 32; ++k)  // fp16 * int8 is exact in float
            dst[32 * b + k] = static_cast<T>(d * static_cast<float>(static_cast<std::int8_t>(block[2 + k])));
        }
        break;
      default:
        lora::detail::raise<FormatError>(
            label_, ": tensor '", gguf_detail::printable(t.name), "' is ", ggml_type_name(t.type),
            "; read() decodes F32, F16, BF16, F64 and Q8_0 (tensor info at byte ", t.info_offset, ")");
    }
    return out;
  }

 private:
  GgufFile(std::shared_ptr<const void> hold, const std::byte* data, std::size_t size, std::string label)
      : label_(std::move(label)), hold_(std::move(hold)), data_(data), size_(size) {
    parse();
  }

  [[noreturn]] static void raise_os(const std::string& label, const char* what, int err) {
    lora::detail::raise<Error>(label, ": ", what, ": ", std::generic_category().message(err));
  }

  template <class T>
  static T load(const std::byte* p) {
    T v;
    std::memcpy(&v, p, sizeof(T));
    return v;
  }

  const GgufKv& kv(std::string_view key) const {
    const GgufKv* e = find_kv(key);
    if (!e) lora::detail::raise<FormatError>(label_, ": no key '", gguf_detail::printable(key), "'");
    return *e;
  }

  // Every failure: "<label>: <what> at byte <offset>".
  template <class... Args>
  [[noreturn]] void fail(std::uint64_t at, Args&&... args) const {
    lora::detail::raise<FormatError>(label_, ": ", std::forward<Args>(args)..., " at byte ", at);
  }
  std::uint64_t remaining() const { return size_ - pos_; }
  void need(std::uint64_t n, const std::string& ctx, const char* what) const {
    if (n > remaining()) fail(pos_, ctx, ": truncated: ", what, " needs ", n, " bytes, ", remaining(), " remain");
  }
  template <class T>
  T scalar(const std::string& ctx, const char* what) {
    need(sizeof(T), ctx, what);
    T v = load<T>(data_ + pos_);
    pos_ += sizeof(T);
    return v;
  }
  std::string string(const std::string& ctx, const char* what) {
    const std::uint64_t at = pos_;
    const auto n = scalar<std::uint64_t>(ctx, what);
    if (n > gguf_detail::gguf_max_string) fail(at, ctx, ": ", what, " length ", n, " exceeds the 1 GiB limit");
    if (n > remaining())
      fail(at, ctx, ": ", what, " of ", n, " bytes runs past the end (", remaining(), " bytes remain)");
    std::string s(reinterpret_cast<const char*>(data_ + pos_), static_cast<std::size_t>(n));
    pos_ += n;
    return s;
  }
  // The fewest bytes one value of type t can take (arrays: type + count).
  static std::uint64_t min_size(std::uint32_t t) {
    switch (static_cast<GgufValueType>(t)) {
      case GgufValueType::UINT8:
      case GgufValueType::INT8:
      case GgufValueType::BOOL: return 1;
      case GgufValueType::UINT16:
      case GgufValueType::INT16: return 2;
      case GgufValueType::UINT32:
      case GgufValueType::INT32:
      case GgufValueType::FLOAT32: return 4;
      case GgufValueType::STRING:
      case GgufValueType::UINT64:
      case GgufValueType::INT64:
      case GgufValueType::FLOAT64: return 8;
      case GgufValueType::ARRAY: return 12;
    }
    return 1;
  }

  GgufValue value_of(std::uint32_t t, const std::string& ctx, int depth) {
    switch (static_cast<GgufValueType>(t)) {
      case GgufValueType::UINT8: return scalar<std::uint8_t>(ctx, "a u8 value");
      case GgufValueType::INT8: return scalar<std::int8_t>(ctx, "an i8 value");
      case GgufValueType::UINT16: return scalar<std::uint16_t>(ctx, "a u16 value");
      case GgufValueType::INT16: return scalar<std::int16_t>(ctx, "an i16 value");
      case GgufValueType::UINT32: return scalar<std::uint32_t>(ctx, "a u32 value");
      case GgufValueType::INT32: return scalar<std::int32_t>(ctx, "an i32 value");
      case GgufValueType::FLOAT32: return scalar<float>(ctx, "an f32 value");
      case GgufValueType::BOOL: return scalar<std::uint8_t>(ctx, "a bool value") != 0;  // as ggml: non-zero is true
      case GgufValueType::STRING: return string(ctx, "string");
      case GgufValueType::UINT64: return scalar<std::uint64_t>(ctx, "a u64 value");
      case GgufValueType::INT64: return scalar<std::int64_t>(ctx, "an i64 value");
      case GgufValueType::FLOAT64: return scalar<double>(ctx, "an f64 value");
      case GgufValueType::ARRAY: {
        const std::uint64_t at = pos_;
        if (depth >= gguf_detail::gguf_max_array_depth)
          fail(at, ctx, ": arrays nested deeper than ", gguf_detail::gguf_max_array_depth, " levels");
        const auto et = scalar<std::uint32_t>(ctx, "the array element type");
        if (et > 12) fail(at, ctx, ": unknown array element type ", et);
        const std::uint64_t count_at = pos_;
        const auto count = scalar<std::uint64_t>(ctx, "the array length");
        if (count > gguf_detail::gguf_max_array)
          fail(count_at, ctx, ": array length ", count, " exceeds the limit of 2^30 elements");
        if (count > remaining() / min_size(et))  // before reserving: a length cannot outrun the file
          fail(count_at, ctx, ": array of ", count, " ", gguf_value_type_name(static_cast<GgufValueType>(et)),
               " needs at least ", count * min_size(et), " bytes, ", remaining(), " remain");
        GgufArray a;
        a.element_type = static_cast<GgufValueType>(et);
        a.items.reserve(static_cast<std::size_t>(count));
        for (std::uint64_t i = 0; i < count; ++i) a.items.push_back(value_of(et, ctx, depth + 1));
        return a;
      }
    }
    fail(pos_, ctx, ": unknown value type ", t);
  }

  void parse() {
    // header
    need(4, "header", "the magic");
    if (std::memcmp(data_, "GGUF", 4) != 0)
      fail(0, "bad magic '", gguf_detail::printable(std::string_view(reinterpret_cast<const char*>(data_), 4)),
           "' (expected 'GGUF')");
    pos_ = 4;
    version_ = scalar<std::uint32_t>("header", "the version");
    if (version_ != 0 && (version_ & 0xffffu) == 0)
      fail(4, "version field ", version_,
           " (low 16 bits zero) looks byte-swapped: a big-endian GGUF, which this "
           "reader does not read");
    if (version_ == 1) fail(4, "GGUF version 1 (32-bit counts) is not supported; version 2 and 3 are");
    if (version_ != 2 && version_ != 3) fail(4, "unknown GGUF version ", version_, " (2 and 3 are read)");
    const auto n_tensors = scalar<std::uint64_t>("header", "the tensor count");
    const auto n_kv = scalar<std::uint64_t>("header", "the key-value count");
    // A tensor info takes at least 32 bytes, a KV 14: counts that cannot fit are refused
    // before anything is reserved.
    if (n_tensors > remaining() / 32)
      fail(8, "tensor count ", n_tensors, " cannot fit in the ", remaining(), " bytes after the header");
    if (n_kv > remaining() / 14)
      fail(16, "key-value count ", n_kv, " cannot fit in the ", remaining(), " bytes after the header");

    // key-value pairs
    kvs_.reserve(static_cast<std::size_t>(n_kv));
    for (std::uint64_t i = 0; i < n_kv; ++i) {
      const std::uint64_t at = pos_;
      std::string ctx = lora::detail::concat("key #", i);
      std::string key = string(ctx, "key");
      if (key.empty()) fail(at, ctx, " is empty");
      if (const GgufKv* first = find_kv(key))
        fail(at, "duplicate key '", gguf_detail::printable(key), "' (first at byte ", first->offset, ")");
      ctx = lora::detail::concat("key '", gguf_detail::printable(key), "'");
      const std::uint64_t type_at = pos_;
      const auto t = scalar<std::uint32_t>(ctx, "the value type");
      if (t > 12) fail(type_at, ctx, ": unknown value type ", t);
      GgufValue v = value_of(t, ctx, 0);
      key_index_.emplace(key, kvs_.size());
      kvs_.push_back(GgufKv{std::move(key), std::move(v), at});
    }
    alignment_ = gguf_detail::gguf_default_alignment;
    if (const GgufKv* a = find_kv("general.alignment")) {
      if (!a->value.is<std::uint32_t>())
        fail(a->offset, "key 'general.alignment' is ", gguf_value_type_name(a->value.type()), ", must be u32");
      const auto al = a->value.as<std::uint32_t>();
      if (al == 0 || (al & (al - 1)) != 0) fail(a->offset, "key 'general.alignment' = ", al, " is not a power of two");
      alignment_ = al;
    }

    // tensor infos
    tensors_.reserve(static_cast<std::size_t>(n_tensors));
    std::vector<std::uint64_t> offset_field(static_cast<std::size_t>(n_tensors));
    for (std::uint64_t i = 0; i < n_tensors; ++i) {
      GgufTensorInfo t;
      t.info_offset = pos_;
      std::string ctx = lora::detail::concat("tensor #", i);
      t.name = string(ctx, "name");
      if (t.name.empty()) fail(t.info_offset, ctx, " has an empty name");
      if (t.name.size() >= gguf_detail::gguf_max_name)
        fail(t.info_offset, ctx, ": name '", gguf_detail::printable(t.name), "' is ", t.name.size(),
             " bytes, ggml's limit is ", gguf_detail::gguf_max_name - 1);
      if (const auto it = tensor_index_.find(t.name); it != tensor_index_.end())
        fail(t.info_offset, "duplicate tensor name '", gguf_detail::printable(t.name), "' (first at byte ",
             tensors_[it->second].info_offset, ")");
      ctx = lora::detail::concat("tensor '", gguf_detail::printable(t.name), "'");
      const std::uint64_t dims_at = pos_;
      const auto n_dims = scalar<std::uint32_t>(ctx, "n_dims");
      if (n_dims == 0 || n_dims > 4) fail(dims_at, ctx, ": n_dims = ", n_dims, ", must be 1 to 4");
      std::uint64_t product = 1;  // of the non-zero extents: a zero extent must not hide an overflow
      for (std::uint32_t j = 0; j < n_dims; ++j) {
        const std::uint64_t ne_at = pos_;
        const auto e = scalar<std::uint64_t>(ctx, "a dimension");
        if (e > static_cast<std::uint64_t>(INT64_MAX)) fail(ne_at, ctx, ": ne[", j, "] = ", e, " is negative as int64");
        if (e != 0 && __builtin_mul_overflow(product, e, &product))
          fail(ne_at, ctx, ": the element count overflows at ne[", j, "] = ", e);
        t.ne.push_back(e);
      }
      if (product > static_cast<std::uint64_t>(INT64_MAX))
        fail(dims_at, ctx, ": ", product, " elements exceed INT64_MAX");
      const std::uint64_t type_at = pos_;
      const auto type = scalar<std::uint32_t>(ctx, "the ggml type");
      const auto ti = ggml_type_info(type);
      if (!ti) fail(type_at, ctx, ": ggml type ", type, " (", ggml_type_name(type), ") has no known layout");
      t.type = static_cast<GgmlType>(type);
      if (t.ne[0] % ti->block_elements != 0)
        fail(type_at, ctx, ": ", ti->name, " rows of ", t.ne[0], " values are not whole blocks of ",
             ti->block_elements);
      if (__builtin_mul_overflow(t.n_elements() / ti->block_elements, std::uint64_t{ti->block_bytes}, &t.n_bytes))
        fail(type_at, ctx, ": the size in bytes overflows");
      offset_field[static_cast<std::size_t>(i)] = pos_;
      t.offset = scalar<std::uint64_t>(ctx, "the data offset");
      tensor_index_.emplace(t.name, tensors_.size());
      tensors_.push_back(std::move(t));
    }

    // data section: aligned after the infos
    data_offset_ = gguf_detail::pad_to(pos_, alignment_);
    if (!tensors_.empty() && data_offset_ > size_)
      fail(pos_, "the data section would start at byte ", data_offset_, ", past the end of the file (", size_,
           " bytes)");
    const std::uint64_t data_size = data_offset_ <= size_ ? size_ - data_offset_ : 0;
    for (std::size_t i = 0; i < tensors_.size(); ++i) {
      GgufTensorInfo& t = tensors_[i];
      const std::string ctx = lora::detail::concat("tensor '", gguf_detail::printable(t.name), "'");
      if (t.offset % alignment_ != 0)
        fail(offset_field[i], ctx, ": data offset ", t.offset, " is not a multiple of the alignment ", alignment_);
      if (t.offset > data_size || t.n_bytes > data_size - t.offset)
        fail(offset_field[i], ctx, ": data [", t.offset, ", ", t.offset, " + ", t.n_bytes,
             ") runs past the end of the data section (", data_size, " bytes)");
      t.file_offset = data_offset_ + t.offset;
    }
    std::vector<std::size_t> order(tensors_.size());
    for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
    std::sort(order.begin(), order.end(),
              [&](std::size_t a, std::size_t b) { return tensors_[a].offset < tensors_[b].offset; });
    const GgufTensorInfo* prev = nullptr;
    for (std::size_t i : order) {
      const GgufTensorInfo& t = tensors_[i];
      if (t.n_bytes == 0) continue;  // an empty tensor occupies nothing
      if (prev && prev->offset + prev->n_bytes > t.offset)
        fail(offset_field[i], "tensor '", gguf_detail::printable(t.name), "': data [", t.offset, ", ",
             t.offset + t.n_bytes, ") overlaps tensor '", gguf_detail::printable(prev->name), "' [", prev->offset, ", ",
             prev->offset + prev->n_bytes, ")");
      prev = &t;
    }
  }

  std::string label_;
  std::shared_ptr<const void> hold_;
  const std::byte* data_ = nullptr;
  std::size_t size_ = 0;
  std::uint64_t pos_ = 0;  // parse cursor
  std::uint32_t version_ = 0;
  std::uint32_t alignment_ = gguf_detail::gguf_default_alignment;
  std::uint64_t data_offset_ = 0;
  std::vector<GgufKv> kvs_;
  std::map<std::string, std::size_t, std::less<>> key_index_;
  std::vector<GgufTensorInfo> tensors_;
  std::map<std::string, std::size_t, std::less<>> tensor_index_;
};

// ---------------------------------------------------------------- writer

/// Builds a GGUF v3 file in memory. For the same KVs and tensors added in the same order its
/// bytes are those of gguf-py's GGUFWriter (header, KVs, tensor infos, the data section padded
/// to the alignment, each tensor padded to it). Like gguf-py: adding a key again replaces the
/// value where the key first stood; the architecture constructor adds general.architecture
/// first. Unlike gguf-py: empty strings and arrays are written, not dropped, and
/// general.alignment added as a KV sets the alignment (gguf-py only honours
/// add_custom_alignment). Bad input is a ValueError.
class GgufWriter {
 public:
  GgufWriter() = default;
  /// As gguf-py's GGUFWriter(path, arch): general.architecture is the first KV.
  explicit GgufWriter(std::string_view architecture) { add_string("general.architecture", architecture); }

  void add(std::string_view key, GgufValue value) {
    if (key.empty()) lora::detail::raise<ValueError>("GgufWriter::add: empty key");
    check_value(key, value, 0);
    if (key == "general.alignment") {
      if (!value.is<std::uint32_t>())
        lora::detail::raise<ValueError>("GgufWriter::add: general.alignment must be u32, got ",
                                        gguf_value_type_name(value.type()));
      const auto a = value.as<std::uint32_t>();
      if (a == 0 || (a & (a - 1)) != 0)
        lora::detail::raise<ValueError>("GgufWriter::add: general.alignment = ", a, " is not a power of two");
      alignment_ = a;
    }
    for (auto& kv : kvs_)
      if (kv.first == key) {
        kv.second = std::move(value);
        return;
      }
    kvs_.emplace_back(std::string(key), std::move(value));
  }
  void add_uint8(std::string_view key, std::uint8_t v) { add(key, GgufValue(v)); }
  void add_int8(std::string_view key, std::int8_t v) { add(key, GgufValue(v)); }
  void add_uint16(std::string_view key, std::uint16_t v) { add(key, GgufValue(v)); }
  void add_int16(std::string_view key, std::int16_t v) { add(key, GgufValue(v)); }
  void add_uint32(std::string_view key, std::uint32_t v) { add(key, GgufValue(v)); }
  void add_int32(std::string_view key, std::int32_t v) { add(key, GgufValue(v)); }
  void add_float32(std::string_view key, float v) { add(key, GgufValue(v)); }
  void add_uint64(std::string_view key, std::uint64_t v) { add(key, GgufValue(v)); }
  void add_int64(std::string_view key, std::int64_t v) { add(key, GgufValue(v)); }
  void add_float64(std::string_view key, double v) { add(key, GgufValue(v)); }
  void add_bool(std::string_view key, bool v) { add(key, GgufValue(v)); }
  void add_string(std::string_view key, std::string_view v) { add(key, GgufValue(std::string(v))); }
  void add_array(std::string_view key, GgufArray a) { add(key, GgufValue(std::move(a))); }
  /// An array of scalars or strings: the element type is T's.
  template <class T>
  void add_array(std::string_view key, const std::vector<T>& items) {
    GgufArray a;
    a.element_type = gguf_detail::gguf_type_of<T>::value;
    a.items.reserve(items.size());
    for (const T& v : items) a.items.emplace_back(T(v));
    add_array(key, std::move(a));
  }
  /// gguf-py's add_custom_alignment: the KV general.alignment, and the data laid out to it.
  void set_alignment(std::uint32_t alignment) { add_uint32("general.alignment", alignment); }
  std::uint32_t alignment() const { return alignment_; }

  /// A 2-D tensor from a float matrix [rows, cols] (ggml ne [cols, rows]), stored as F32,
  /// F16, BF16 (rounded to nearest even, as gguf-py) or Q8_0 (gguf-py's quantiser; cols a
  /// multiple of 32, finite values).
  template <class Derived>
  void add_tensor(std::string_view name, const Eigen::MatrixBase<Derived>& m, GgmlType stored = GgmlType::F32) {
    static_assert(std::is_same_v<typename Derived::Scalar, float>,
                  "GgufWriter::add_tensor: the matrix must hold float");
    const RowMatrix<float> rm = m;  // row-major, contiguous
    add_tensor(name, {static_cast<std::int64_t>(rm.rows()), static_cast<std::int64_t>(rm.cols())},
               std::span<const float>(rm.data(), static_cast<std::size_t>(rm.size())), stored);
  }
  /// A tensor of 1 to 4 dimensions, `shape` in PyTorch order, `values` row-major.
  void add_tensor(std::string_view name, const std::vector<std::int64_t>& shape, std::span<const float> values,
                  GgmlType stored = GgmlType::F32) {
    const char* where = "GgufWriter::add_tensor";
    std::vector<std::uint64_t> ne(shape.rbegin(), shape.rend());
    for (auto e : shape)
      if (e < 0) lora::detail::raise<ValueError>(where, ": '", name, "' has a negative extent ", e);
    const std::uint64_t n = element_count(where, name, ne);
    if (n != values.size())
      lora::detail::raise<ShapeError>(where, ": '", name, "' has ", values.size(), " values for ", n, " elements");
    std::vector<std::byte> bytes;
    switch (stored) {
      case GgmlType::F32:
        bytes.resize(values.size() * 4);
        if (!values.empty()) std::memcpy(bytes.data(), values.data(), bytes.size());
        break;
      case GgmlType::F16:
        bytes.reserve(values.size() * 2);
        for (float v : values) gguf_detail::put(bytes, gguf_detail::float_to_half(v));
        break;
      case GgmlType::BF16:
        bytes.reserve(values.size() * 2);
        for (float v : values) gguf_detail::put(bytes, gguf_detail::float_to_bf16(v));
        break;
      case GgmlType::Q8_0:
        if (ne[0] % 32 != 0)
          lora::detail::raise<ValueError>(
              where, ": '", name, "': Q8_0 needs rows that are whole blocks of 32; rows have ", ne[0], " values");
        bytes = quantize_q8_0(where, name, values);
        break;
      default:
        lora::detail::raise<ValueError>(where, ": '", name, "': stores F32, F16, BF16 or Q8_0, not ",
                                        ggml_type_name(stored), " (add_tensor_raw takes encoded bytes)");
    }
    add_tensor_raw(name, std::move(ne), stored, std::move(bytes));
  }
  /// A tensor already encoded: ne in ggml order, any known ggml type, bytes of exactly its size.
  void add_tensor_raw(std::string_view name, std::vector<std::uint64_t> ne, GgmlType type,
                      std::vector<std::byte> bytes) {
    const char* where = "GgufWriter::add_tensor_raw";
    if (name.empty()) lora::detail::raise<ValueError>(where, ": empty tensor name");
    if (name.size() >= gguf_detail::gguf_max_name)
      lora::detail::raise<ValueError>(where, ": tensor name '", name, "' is ", name.size(), " bytes, ggml's limit is ",
                                      gguf_detail::gguf_max_name - 1);
    for (const auto& t : tensors_)
      if (t.name == name) lora::detail::raise<ValueError>(where, ": duplicated tensor name '", name, "'");
    const auto ti = ggml_type_info(static_cast<std::uint32_t>(type));
    if (!ti)
      lora::detail::raise<ValueError>(where, ": '", name, "': ggml type ", ggml_type_name(type),
                                      " has no known layout");
    const std::uint64_t n = element_count(where, name, ne);
    if (ne[0] % ti->block_elements != 0)
      lora::detail::raise<ValueError>(where, ": '", name, "': ", ti->name, " rows of ", ne[0],
                                      " are not whole blocks of ", ti->block_elements);
    const std::uint64_t n_bytes = n / ti->block_elements * ti->block_bytes;
    if (bytes.size() != n_bytes)
      lora::detail::raise<ValueError>(where, ": '", name, "': ", bytes.size(), " bytes given, ", ti->name, " of ", n,
                                      " elements takes ", n_bytes);
    tensors_.push_back(Tensor{std::string(name), std::move(ne), type, std::move(bytes)});
  }

  /// The file's bytes.
  std::vector<std::byte> to_bytes() const {
    std::vector<std::byte> out{std::byte{'G'}, std::byte{'G'}, std::byte{'U'}, std::byte{'F'}};
    gguf_detail::put<std::uint32_t>(out, 3);
    gguf_detail::put<std::uint64_t>(out, tensors_.size());
    gguf_detail::put<std::uint64_t>(out, kvs_.size());
    for (const auto& [key, value] : kvs_) {
      gguf_detail::put_string(out, key);
      gguf_detail::put(out, static_cast<std::uint32_t>(value.type()));
      put_value(out, value);
    }
    std::uint64_t offset = 0;
    for (const auto& t : tensors_) {
      gguf_detail::put_string(out, t.name);
      gguf_detail::put<std::uint32_t>(out, static_cast<std::uint32_t>(t.ne.size()));
      for (auto e : t.ne) gguf_detail::put<std::uint64_t>(out, e);
      gguf_detail::put(out, static_cast<std::uint32_t>(t.type));
      gguf_detail::put<std::uint64_t>(out, offset);
      offset += gguf_detail::pad_to(t.bytes.size(), alignment_);
    }
    out.resize(gguf_detail::pad_to(out.size(), alignment_));  // zero padding, as gguf-py's write_padding
    for (const auto& t : tensors_) {
      out.insert(out.end(), t.bytes.begin(), t.bytes.end());
      out.resize(out.size() + (gguf_detail::pad_to(t.bytes.size(), alignment_) - t.bytes.size()));
    }
    return out;
  }

  /// Writes the file: to a temporary name in the same directory, then renamed over `path`, so
  /// no reader ever sees a half-written file. lora::Error naming the path if that fails.
  void write(const std::filesystem::path& path) const {
    const std::vector<std::byte> bytes = to_bytes();
    std::filesystem::path tmp = path;
    tmp += lora::detail::concat(".tmp-", std::random_device{}(), std::random_device{}());
    {
      std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
      if (!out) lora::detail::raise<Error>(path.string(), ": cannot create the temporary file ", tmp.string());
      out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
      out.close();
      if (!out) {
        std::error_code ec;
        std::filesystem::remove(tmp, ec);
        lora::detail::raise<Error>(path.string(), ": writing ", bytes.size(), " bytes to ", tmp.string(), " failed");
      }
    }
    std::error_code ec;
    std::filesystem::rename(tmp, path, ec);
    if (ec) {
      std::error_code ignore;
      std::filesystem::remove(tmp, ignore);
      lora::detail::raise<Error>(path.string(), ": cannot rename the temporary file into place: ", ec.message());
    }
  }

 private:
  struct Tensor {
    std::string name;
    std::vector<std::uint64_t> ne;
    GgmlType type;
    std::vector<std::byte> bytes;
  };

  static std::uint64_t element_count(const char* where, std::string_view name, const std::vector<std::uint64_t>& ne) {
    if (ne.empty() || ne.size() > 4)
      lora::detail::raise<ValueError>(where, ": '", name, "' has ", ne.size(), " dimensions; GGUF holds 1 to 4");
    std::uint64_t n = 1;
    for (auto e : ne) {
      if (e > static_cast<std::uint64_t>(INT64_MAX) || __builtin_mul_overflow(n, e, &n))
        lora::detail::raise<ValueError>(where, ": '", name, "': the element count overflows");
    }
    return n;
  }

  // gguf-py's Q8_0.quantize_blocks in float32: d = max|x| / 127, q = round(x / d) half away
  // from zero, d stored as fp16.
  static std::vector<std::byte> quantize_q8_0(const char* where, std::string_view name, std::span<const float> x) {
    std::vector<std::byte> out;
    out.reserve(x.size() / 32 * 34);
    for (std::size_t b = 0; b < x.size(); b += 32) {
      float amax = 0.0f;
      for (std::size_t k = 0; k < 32; ++k) {
        const float v = x[b + k];
        if (!(v - v == 0.0f))
          lora::detail::raise<ValueError>(where, ": '", name, "': Q8_0 cannot store the non-finite value at index ",
                                          b + k);
        amax = std::max(amax, std::abs(v));
      }
      const float d = amax / 127.0f;
      const float id = d == 0.0f ? 0.0f : 1.0f / d;
      gguf_detail::put(out, gguf_detail::float_to_half(d));
      for (std::size_t k = 0; k < 32; ++k) {
        const float q = std::clamp(std::round(x[b + k] * id), -128.0f, 127.0f);
        out.push_back(static_cast<std::byte>(static_cast<std::int8_t>(q)));
      }
    }
    return out;
  }

  static void check_value(std::string_view key, const GgufValue& v, int depth) {
    if (const auto* s = std::get_if<std::string>(&v.data)) {
      if (s->size() > gguf_detail::gguf_max_string)
        lora::detail::raise<ValueError>("GgufWriter::add: '", key, "': a string over 1 GiB");
    } else if (const auto* a = std::get_if<GgufArray>(&v.data)) {
      if (depth >= gguf_detail::gguf_max_array_depth)
        lora::detail::raise<ValueError>("GgufWriter::add: '", key, "': arrays nested deeper than ",
                                        gguf_detail::gguf_max_array_depth, " levels");
      if (static_cast<std::uint32_t>(a->element_type) > 12)
        lora::detail::raise<ValueError>("GgufWriter::add: '", key, "': unknown array element type");
      if (a->items.size() > gguf_detail::gguf_max_array)
        lora::detail::raise<ValueError>("GgufWriter::add: '", key, "': an array over 2^30 elements");
      for (const auto& item : a->items) {
        if (item.type() != a->element_type)
          lora::detail::raise<ValueError>("GgufWriter::add: '", key, "': an array of ",
                                          gguf_value_type_name(a->element_type), " holds a ",
                                          gguf_value_type_name(item.type()));
        check_value(key, item, depth + 1);
      }
    }
  }

  static void put_value(std::vector<std::byte>& out, const GgufValue& v) {
    std::visit(
        [&out](const auto& x) {
          using T = std::remove_cvref_t<decltype(x)>;
          if constexpr (std::is_same_v<T, std::string>) {
            gguf_detail::put_string(out, x);
          } else if constexpr (std::is_same_v<T, GgufArray>) {
            gguf_detail::put(out, static_cast<std::uint32_t>(x.element_type));
            gguf_detail::put<std::uint64_t>(out, x.items.size());
            for (const auto& item : x.items) put_value(out, item);
          } else if constexpr (std::is_same_v<T, bool>) {
            gguf_detail::put<std::uint8_t>(out, x ? 1 : 0);
          } else {
            gguf_detail::put(out, x);
          }
        },
        v.data);
  }

  std::vector<std::pair<std::string, GgufValue>> kvs_;
  std::vector<Tensor> tensors_;
  std::uint32_t alignment_ = gguf_detail::gguf_default_alignment;
};

// ---------------------------------------------------------------- LoRA adapters

/// One adapted weight: the delta is scale * B A (PyTorch shapes). For token_embd.weight the
/// pair is PEFT's embedding pair (A [r, vocab], B [dim, r]) and the delta to the [vocab, dim]
/// table is its transpose, (B A)^T, as llama.cpp applies it.
struct GgufLoraTensor {
  RowMatrix<float> A;  ///< [r, in]
  RowMatrix<float> B;  ///< [out, r]
  index_t rank() const { return A.rows(); }
};

/// A llama.cpp LoRA adapter (general.type "adapter", adapter.type "lora").
struct GgufLoraAdapter {
  /// adapter.lora.alpha (f32 in the file). 0 (or absent) means scale 1, as llama.cpp.
  double alpha = 0.0;
  /// general.architecture; llama.cpp refuses an adapter whose architecture is not the model's.
  std::string architecture;
  /// Base tensor name ("blk.0.attn_q.weight") -> the pair.
  std::map<std::string, GgufLoraTensor> tensors;
  /// The other string KVs (general.name, ...), written back on save.
  std::map<std::string, std::string> metadata;
  /// adapter.alora.invocation_tokens (activated LoRA), empty when absent.
  std::vector<std::uint32_t> alora_invocation_tokens;
  /// "*_norm.weight" vectors some tools (mergekit-extract-lora) put in adapters; llama.cpp
  /// skips them; kept so a round trip loses nothing. 1-D tensors are [1, n].
  std::map<std::string, RowMatrix<float>> extra_tensors;

  /// The scale llama.cpp applies to B A for `name`: alpha / r with r taken from B (its
  /// lora_b's ne[0]), or 1 when alpha is 0 (llama.cpp computes the same in float).
  double scale(const std::string& name) const {
    const auto it = tensors.find(name);
    if (it == tensors.end()) lora::detail::raise<ValueError>("GgufLoraAdapter::scale: no tensor '", name, "'");
    const auto r = static_cast<double>(it->second.B.cols());
    return alpha != 0.0 ? alpha / r : 1.0;
  }
};

namespace gguf_detail {
inline bool ends_with(std::string_view s, std::string_view suffix) {
  return s.size() >= suffix.size() && s.substr(s.size() - suffix.size()) == suffix;
}
inline bool is_token_embd(std::string_view base) { return ends_with(base, "token_embd.weight"); }
}  // namespace gguf_detail

/// The adapter in a GGUF file, checked as llama.cpp's llama_adapter_lora_init checks it
/// (general.type "adapter", adapter.type "lora", every lora_a with its lora_b, A's rank equal
/// to B's, no tensor of another kind) plus what it assumes: adapter.lora.alpha an f32 and
/// finite, a general.architecture string, 2-D pairs, rank > 0. FormatError naming the file,
/// the key or tensor and the byte offset.
inline GgufLoraAdapter load_gguf_lora(const GgufFile& f) {
  const std::string& label = f.label();
  auto string_kv = [&](const char* key) -> const std::string& {
    const GgufKv* kv = f.find_kv(key);
    if (!kv) lora::detail::raise<FormatError>(label, ": no key '", key, "'; a llama.cpp LoRA adapter has one");
    if (!kv->value.is<std::string>())
      lora::detail::raise<FormatError>(label, ": key '", key, "' is ", gguf_value_type_name(kv->value.type()),
                                       ", must be str (at byte ", kv->offset, ")");
    return kv->value.as<std::string>();
  };
  auto expect = [&](const char* key, const char* want) {
    const std::string& got = string_kv(key);
    if (got != want)
      lora::detail::raise<FormatError>(label, ": key '", key, "' is '", gguf_detail::printable(got), "', expected '",
                                       want, "' (at byte ", f.find_kv(key)->offset, ")");
  };
  expect("general.type", "adapter");
  expect("adapter.type", "lora");

  GgufLoraAdapter out;
  out.architecture = string_kv("general.architecture");
  if (out.architecture.empty())
    lora::detail::raise<FormatError>(label, ": key 'general.architecture' is empty (at byte ",
                                     f.find_kv("general.architecture")->offset, ")");
  if (const GgufKv* kv = f.find_kv("adapter.lora.alpha")) {
    if (!kv->value.is<float>())  // llama.cpp reads it with gguf_get_val_f32, which asserts f32
      lora::detail::raise<FormatError>(label, ": key 'adapter.lora.alpha' is ", gguf_value_type_name(kv->value.type()),
                                       ", must be f32 (at byte ", kv->offset, ")");
    out.alpha = kv->value.as<float>();
    if (!(out.alpha - out.alpha == 0.0))
      lora::detail::raise<FormatError>(label, ": key 'adapter.lora.alpha' = ", out.alpha, " is not finite (at byte ",
                                       kv->offset, ")");
  }
  if (const GgufKv* kv = f.find_kv("adapter.alora.invocation_tokens")) {
    const auto* a = std::get_if<GgufArray>(&kv->value.data);
    if (!a || a->element_type != GgufValueType::UINT32)
      lora::detail::raise<FormatError>(
          label, ": key 'adapter.alora.invocation_tokens' must be an array of u32 (at byte ", kv->offset, ")");
    out.alora_invocation_tokens = f.get_array<std::uint32_t>("adapter.alora.invocation_tokens");
  }
  for (const GgufKv& kv : f.kvs())
    if (kv.value.is<std::string>() && kv.key != "general.architecture" && kv.key != "general.type" &&
        kv.key != "adapter.type")
      out.metadata.emplace(kv.key, kv.value.as<std::string>());

  // Pair the tensors by base name, as llama.cpp does.
  struct Pair {
    const GgufTensorInfo* a = nullptr;
    const GgufTensorInfo* b = nullptr;
  };
  std::map<std::string, Pair> pairs;
  for (const GgufTensorInfo& t : f.tensors()) {
    const bool is_a = gguf_detail::ends_with(t.name, ".lora_a"), is_b = gguf_detail::ends_with(t.name, ".lora_b");
    if (is_a || is_b) {
      const std::string base = t.name.substr(0, t.name.size() - 7);
      if (base.empty())
        lora::detail::raise<FormatError>(label, ": tensor '", t.name, "' names no base tensor (tensor info at byte ",
                                         t.info_offset, ")");
      (is_a ? pairs[base].a : pairs[base].b) = &t;
    } else if (gguf_detail::ends_with(t.name, "_norm.weight")) {
      out.extra_tensors.emplace(t.name, f.read<float>(t.name));
    } else {
      lora::detail::raise<FormatError>(
          label, ": tensor '", gguf_detail::printable(t.name),
          "' has an unexpected suffix (a LoRA adapter holds <name>.lora_a, <name>.lora_b and "
          "*_norm.weight; tensor info at byte ",
          t.info_offset, ")");
    }
  }
  for (const auto& [base, p] : pairs) {
    if (!p.a || !p.b) {
      const GgufTensorInfo* have = p.a ? p.a : p.b;
      lora::detail::raise<FormatError>(label, ": tensor '", gguf_detail::printable(have->name), "' has no ",
                                       p.a ? "lora_b" : "lora_a", " partner '", gguf_detail::printable(base),
                                       p.a ? ".lora_b" : ".lora_a", "' (tensor info at byte ", have->info_offset, ")");
    }
    for (const GgufTensorInfo* t : {p.a, p.b})
      if (t->ne.size() != 2)
        lora::detail::raise<FormatError>(label, ": tensor '", gguf_detail::printable(t->name), "' has ", t->ne.size(),
                                         " dimensions, a LoRA factor has 2 (tensor info at byte ", t->info_offset, ")");
    // ggml ne: lora_a [in, r] (token_embd: [r, vocab], the converter stores A^T), lora_b [r, out].
    const bool embd = gguf_detail::is_token_embd(base);
    const std::uint64_t ra = embd ? p.a->ne[0] : p.a->ne[1], rb = p.b->ne[0];
    if (ra != rb)
      lora::detail::raise<FormatError>(label, ": tensor '", gguf_detail::printable(base), "': rank ", ra, " in ",
                                       p.a->name, " (ne [", p.a->ne[0], ", ", p.a->ne[1], "]) but ", rb, " in ",
                                       p.b->name, " (ne [", p.b->ne[0], ", ", p.b->ne[1], "]) (tensor info at byte ",
                                       p.b->info_offset, ")");
    if (rb == 0)
      lora::detail::raise<FormatError>(label, ": tensor '", gguf_detail::printable(base),
                                       "' has rank 0 (tensor info at byte ", p.b->info_offset, ")");
    GgufLoraTensor t;
    t.A = f.read<float>(p.a->name);
    if (embd) t.A = RowMatrix<float>(t.A.transpose());
    t.B = f.read<float>(p.b->name);
    out.tensors.emplace(base, std::move(t));
  }
  return out;
}
inline GgufLoraAdapter load_gguf_lora(const std::filesystem::path& path) {
  return load_gguf_lora(GgufFile::open(path));
}

/// The writer for an adapter, with the KVs convert_lora_to_gguf.py writes, in its order:
/// general.architecture, general.type = "adapter", adapter.type = "lora", the metadata strings,
/// adapter.lora.alpha (f32), adapter.alora.invocation_tokens (when any),
/// general.quantization_version = 2. Tensors: for each base name in order <name>.lora_a
/// (token_embd: A^T) and <name>.lora_b in `stored` (F32, F16, BF16 or Q8_0; Q8_0 falls back to
/// F16 for a tensor whose rows are not whole blocks of 32, as the converter does), then the
/// extra vectors in F32.
inline GgufWriter gguf_lora_writer(const GgufLoraAdapter& a, GgmlType stored = GgmlType::F32) {
  const char* where = "save_gguf_lora";
  if (stored != GgmlType::F32 && stored != GgmlType::F16 && stored != GgmlType::BF16 && stored != GgmlType::Q8_0)
    lora::detail::raise<ValueError>(where, ": stores F32, F16, BF16 or Q8_0, not ", ggml_type_name(stored));
  if (a.architecture.empty()) lora::detail::raise<ValueError>(where, ": the architecture is empty");
  lora::detail::check_finite_parameter(where, "alpha", a.alpha);
  GgufWriter w(a.architecture);
  w.add_string("general.type", "adapter");
  w.add_string("adapter.type", "lora");
  for (const auto& [key, value] : a.metadata) {
    for (const char* own : {"general.architecture", "general.type", "adapter.type", "adapter.lora.alpha",
                            "adapter.alora.invocation_tokens", "general.quantization_version", "general.alignment"})
      if (key == own)
        lora::detail::raise<ValueError>(where, ": metadata key '", key, "' is written from the adapter's own fields");
    w.add_string(key, value);
  }
  w.add_float32("adapter.lora.alpha", static_cast<float>(a.alpha));
  if (!a.alora_invocation_tokens.empty()) w.add_array("adapter.alora.invocation_tokens", a.alora_invocation_tokens);
  w.add_uint32("general.quantization_version", 2);
  auto type_for = [stored](index_t cols) {
    return stored == GgmlType::Q8_0 && cols % 32 != 0 ? GgmlType::F16 : stored;
  };
  for (const auto& [base, t] : a.tensors) {
    if (base.empty()) lora::detail::raise<ValueError>(where, ": an empty base tensor name");
    if (t.A.rows() <= 0 || t.A.rows() != t.B.cols())
      lora::detail::raise<RankError>(where, ": '", base, "': A is [", t.A.rows(), ", ", t.A.cols(), "] and B [",
                                     t.B.rows(), ", ", t.B.cols(), "]; their ranks must agree and be positive");
    if (t.A.cols() <= 0 || t.B.rows() <= 0)
      lora::detail::raise<ShapeError>(where, ": '", base, "': A [", t.A.rows(), ", ", t.A.cols(), "], B [", t.B.rows(),
                                      ", ", t.B.cols(), "] must have positive extents");
    if (gguf_detail::is_token_embd(base)) {
      const RowMatrix<float> at = t.A.transpose();
      w.add_tensor(base + ".lora_a", at, type_for(at.cols()));
    } else {
      w.add_tensor(base + ".lora_a", t.A, type_for(t.A.cols()));
    }
    w.add_tensor(base + ".lora_b", t.B, type_for(t.B.cols()));
  }
  for (const auto& [name, v] : a.extra_tensors) {
    if (v.rows() == 1)
      w.add_tensor(name, {static_cast<std::int64_t>(v.cols())},
                   std::span<const float>(v.data(), static_cast<std::size_t>(v.size())));
    else
      w.add_tensor(name, v);
  }
  return w;
}

/// Writes the adapter (see gguf_lora_writer) through a temporary file and a rename.
inline void save_gguf_lora(const GgufLoraAdapter& a, const std::filesystem::path& path,
                           GgmlType stored = GgmlType::F32) {
  gguf_lora_writer(a, stored).write(path);
}

/// A GGUF adapter has one alpha for the file; a module whose PEFT scale differs (rsLoRA,
/// rank_pattern / alpha_pattern) gets it folded into B: B' = B * module_scale / file_scale with
/// file_scale = file_alpha / r (1 when file_alpha is 0, as llama.cpp), the factor and the
/// product in double, B' rounded to float once. Then file_scale * B' A = module_scale * B A up
/// to that one rounding of B' (exactly when the factor is a power of two).
inline GgufLoraTensor fold_scale(const RowMatrix<float>& A, const RowMatrix<float>& B, double module_scale,
                                 double file_alpha) {
  const char* where = "fold_scale";
  lora::detail::check_finite_parameter(where, "module_scale", module_scale);
  lora::detail::check_finite_parameter(where, "file_alpha", file_alpha);
  if (A.rows() <= 0 || A.rows() != B.cols())
    lora::detail::raise<RankError>(where, ": A is [", A.rows(), ", ", A.cols(), "] and B [", B.rows(), ", ", B.cols(),
                                   "]; their ranks must agree and be positive");
  const double r = static_cast<double>(A.rows());
  const double file_scale = file_alpha != 0.0 ? file_alpha / r : 1.0;
  const double factor = module_scale / file_scale;
  GgufLoraTensor out{A, RowMatrix<float>(B.rows(), B.cols())};
  for (index_t i = 0; i < B.size(); ++i)
    out.B.data()[i] = static_cast<float>(static_cast<double>(B.data()[i]) * factor);
  return out;
}

/// convert_hf_to_gguf.py's LlamaModel.permute, on rows: for llama-family architectures the
/// converter reorders attn_q / attn_k rows for ggml's RoPE, and on a LoRA pair this moves B's
/// rows only (A is untouched). Rows are [n_head, 2, d] -> [n_head, d, 2]. Pass
/// num_attention_heads for q_proj and num_key_value_heads for k_proj. ShapeError unless
/// rows is a multiple of 2 * n_head.
template <class T>
RowMatrix<T> llama_rope_permute_rows(const RowMatrix<T>& B, index_t n_head, bool inverse = false) {
  if (n_head <= 0 || B.rows() % (2 * n_head) != 0)
    lora::detail::raise<ShapeError>("llama_rope_permute_rows: ", B.rows(),
                                    " rows are not a multiple of 2 * n_head = 2 * ", n_head);
  const index_t d = B.rows() / n_head / 2;
  RowMatrix<T> out(B.rows(), B.cols());
  for (index_t h = 0; h < n_head; ++h)
    for (index_t t = 0; t < 2; ++t)
      for (index_t j = 0; j < d; ++j) {
        const index_t hf = h * 2 * d + t * d + j, gg = h * 2 * d + j * 2 + t;
        if (inverse)
          out.row(hf) = B.row(gg);
        else
          out.row(gg) = B.row(hf);
      }
  return out;
}
/// The inverse: GGUF row order back to Hugging Face's.
template <class T>
RowMatrix<T> llama_rope_unpermute_rows(const RowMatrix<T>& B, index_t n_head) {
  return llama_rope_permute_rows(B, n_head, true);
}

// ---------------------------------------------------------------- llama names

namespace gguf_detail {
struct GgufNamePair {
  std::string_view hf;    // module path, after "model.layers.N." for per-layer entries
  std::string_view gguf;  // after "blk.N." for per-layer entries, without ".weight"
};
inline constexpr GgufNamePair gguf_global_names[] = {
    {"model.embed_tokens", "token_embd"}, {"lm_head", "output"}, {"model.norm", "output_norm"}};
inline constexpr GgufNamePair gguf_layer_names[] = {
    {"self_attn.q_proj", "attn_q"},      {"self_attn.k_proj", "attn_k"},   {"self_attn.v_proj", "attn_v"},
    {"self_attn.o_proj", "attn_output"}, {"mlp.gate_proj", "ffn_gate"},    {"mlp.up_proj", "ffn_up"},
    {"mlp.down_proj", "ffn_down"},       {"input_layernorm", "attn_norm"}, {"post_attention_layernorm", "ffn_norm"}};
// A layer number as the files write it: decimal, no sign, no leading zero.
inline bool is_layer_number(std::string_view s) {
  if (s.empty() || s.size() > 9 || (s.size() > 1 && s[0] == '0')) return false;
  return std::all_of(s.begin(), s.end(), [](char c) { return c >= '0' && c <= '9'; });
}
}  // namespace gguf_detail

/// The GGUF base tensor name of a llama-style Hugging Face / PEFT module path
/// ("model.layers.3.self_attn.q_proj" -> "blk.3.attn_q.weight"); a leading
/// "base_model.model." and a trailing ".weight" are accepted. Nothing for other modules.
inline std::optional<std::string> gguf_tensor_name(std::string_view hf_module_path) {
  std::string_view p = hf_module_path;
  if (p.starts_with("base_model.model.")) p.remove_prefix(17);
  if (gguf_detail::ends_with(p, ".weight")) p.remove_suffix(7);
  for (const auto& e : gguf_detail::gguf_global_names)
    if (p == e.hf) return std::string(e.gguf) + ".weight";
  if (!p.starts_with("model.layers.")) return std::nullopt;
  p.remove_prefix(13);
  const auto dot = p.find('.');
  if (dot == std::string_view::npos || !gguf_detail::is_layer_number(p.substr(0, dot))) return std::nullopt;
  const std::string_view layer = p.substr(0, dot), rest = p.substr(dot + 1);
  for (const auto& e : gguf_detail::gguf_layer_names)
    if (rest == e.hf) return lora::detail::concat("blk.", layer, ".", e.gguf, ".weight");
  return std::nullopt;
}

/// The inverse: "blk.3.attn_q.weight" -> "model.layers.3.self_attn.q_proj" (no
/// "base_model.model." prefix). Nothing for names outside the table.
inline std::optional<std::string> hf_module_path(std::string_view gguf_name) {
  std::string_view p = gguf_name;
  if (!gguf_detail::ends_with(p, ".weight")) return std::nullopt;
  p.remove_suffix(7);
  for (const auto& e : gguf_detail::gguf_global_names)
    if (p == e.gguf) return std::string(e.hf);
  if (!p.starts_with("blk.")) return std::nullopt;
  p.remove_prefix(4);
  const auto dot = p.find('.');
  if (dot == std::string_view::npos || !gguf_detail::is_layer_number(p.substr(0, dot))) return std::nullopt;
  const std::string_view layer = p.substr(0, dot), rest = p.substr(dot + 1);
  for (const auto& e : gguf_detail::gguf_layer_names)
    if (rest == e.gguf) return lora::detail::concat("model.layers.", layer, ".", e.hf);
  return std::nullopt;
}

}  // namespace lora::io
