// io/safetensors.hpp: Hugging Face's safetensors format, read zero-copy and
// written byte-for-byte as the Python library writes it.
//
//   auto file = lora::io::SafetensorsFile::open("model.safetensors");      // mmap, checked
//   auto W = file.view<Eigen::bfloat16>("model.layers.0.q_proj.weight");   // Eigen::Map into the mapping
//   lora::RowMatrix<float> A = file.read<float>("...lora_A.weight");       // copy, converted
//
//   lora::io::SafetensorsWriter out;
//   out.set_metadata("format", "pt");
//   out.add("...lora_A.weight", A, lora::io::DType::F32);
//   out.write("adapter_model.safetensors");                                 // temp file + rename
//
// The format: an 8-byte little-endian header length N, N bytes of UTF-8 JSON
//   {"__metadata__": {string: string}, name: {"dtype": "F32", "shape": [2, 3],
//    "data_offsets": [begin, end]}, ...}
// then the data section: each tensor's row-major little-endian bytes at
// [begin, end) of it. The checks are those of the Rust crate's
// Metadata::validate (safetensors/src/tensor.rs): the tensors, sorted by
// offset, cover the data section exactly, with no gap, overlap or trailing
// byte. docs/io_safetensors.md lists every check and the conversions.
//
// Views point into the file's mapping (or the buffer from_bytes owns): they
// stay valid while the SafetensorsFile lives, moves of it included.
#pragma once

#include "../lora.hpp"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <array>
#include <atomic>
#include <bit>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <map>
#include <optional>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#if __has_include(<sys/mman.h>) && __has_include(<sys/stat.h>) && __has_include(<fcntl.h>) && __has_include(<unistd.h>)
#define LORA_IO_HAS_MMAP 1
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#else
#define LORA_IO_HAS_MMAP 0
#endif

namespace lora::io {

/// Element types, spelt as safetensors spells them. (safetensors also has
/// U16, U32, U64, C64, F8_E8M0, F4, F6_*: a file holding one is refused with
/// "unknown dtype".)
enum class DType : std::uint8_t { F64, F32, F16, BF16, I64, I32, I16, I8, U8, BOOL, F8_E4M3, F8_E5M2 };

inline constexpr std::array<DType, 12> all_dtypes{DType::F64, DType::F32, DType::F16,  DType::BF16,
                                                 DType::I64, DType::I32, DType::I16,  DType::I8,
                                                 DType::U8,  DType::BOOL, DType::F8_E4M3, DType::F8_E5M2};

/// "F32", ...; "<invalid DType>" for a value outside the enum.
constexpr std::string_view dtype_name(DType d) {
  switch (d) {
    case DType::F64: return "F64";
    case DType::F32: return "F32";
    case DType::F16: return "F16";
    case DType::BF16: return "BF16";
    case DType::I64: return "I64";
    case DType::I32: return "I32";
    case DType::I16: return "I16";
    case DType::I8: return "I8";
    case DType::U8: return "U8";
    case DType::BOOL: return "BOOL";
    case DType::F8_E4M3: return "F8_E4M3";
    case DType::F8_E5M2: return "F8_E5M2";
  }
  return "<invalid DType>";
}

/// Bytes per element; 0 for a value outside the enum.
constexpr std::size_t dtype_size(DType d) {
  switch (d) {
    case DType::F64: case DType::I64: return 8;
    case DType::F32: case DType::I32: return 4;
    case DType::F16: case DType::BF16: case DType::I16: return 2;
    case DType::I8: case DType::U8: case DType::BOOL: case DType::F8_E4M3: case DType::F8_E5M2: return 1;
  }
  return 0;
}

constexpr std::optional<DType> dtype_from_name(std::string_view name) {
  for (const DType d : all_dtypes)
    if (dtype_name(d) == name) return d;
  return std::nullopt;
}

/// The dtypes read<T> converts from and SafetensorsWriter::add converts to.
constexpr bool is_floating_dtype(DType d) {
  return d == DType::F64 || d == DType::F32 || d == DType::F16 || d == DType::BF16;
}

namespace detail {
template <class>
inline constexpr bool always_false_v = false;

/// Scalars read<T> / add convert between.
template <class T>
inline constexpr bool is_float_scalar_v = std::is_same_v<T, float> || std::is_same_v<T, double> ||
                                          std::is_same_v<T, Eigen::half> || std::is_same_v<T, Eigen::bfloat16>;

template <class T>
constexpr std::string_view type_name() {
  if constexpr (std::is_same_v<T, float>) return "float";
  else if constexpr (std::is_same_v<T, double>) return "double";
  else if constexpr (std::is_same_v<T, Eigen::half>) return "Eigen::half";
  else if constexpr (std::is_same_v<T, Eigen::bfloat16>) return "Eigen::bfloat16";
  else if constexpr (std::is_same_v<T, std::int64_t>) return "std::int64_t";
  else if constexpr (std::is_same_v<T, std::int32_t>) return "std::int32_t";
  else if constexpr (std::is_same_v<T, std::int16_t>) return "std::int16_t";
  else if constexpr (std::is_same_v<T, std::int8_t>) return "std::int8_t";
  else if constexpr (std::is_same_v<T, std::uint8_t>) return "std::uint8_t";
  else return "T";
}
}  // namespace detail

/// The dtype whose bytes are a T: float F32, double F64, Eigen::half F16,
/// Eigen::bfloat16 BF16, std::int64_t / int32_t / int16_t / int8_t / uint8_t
/// I64 / I32 / I16 / I8 / U8. (No bool: a BOOL byte other than 0 or 1 would be
/// an invalid bool; read such tensors through bytes().)
template <class T>
constexpr DType dtype_of() {
  using U = std::remove_cv_t<T>;
  if constexpr (std::is_same_v<U, float>) return DType::F32;
  else if constexpr (std::is_same_v<U, double>) return DType::F64;
  else if constexpr (std::is_same_v<U, Eigen::half>) return DType::F16;
  else if constexpr (std::is_same_v<U, Eigen::bfloat16>) return DType::BF16;
  else if constexpr (std::is_same_v<U, std::int64_t>) return DType::I64;
  else if constexpr (std::is_same_v<U, std::int32_t>) return DType::I32;
  else if constexpr (std::is_same_v<U, std::int16_t>) return DType::I16;
  else if constexpr (std::is_same_v<U, std::int8_t>) return DType::I8;
  else if constexpr (std::is_same_v<U, std::uint8_t>) return DType::U8;
  else
    static_assert(detail::always_false_v<T>,
                  "lora::io::dtype_of<T>: T has no safetensors dtype (float, double, Eigen::half, Eigen::bfloat16, "
                  "std::int64_t, std::int32_t, std::int16_t, std::int8_t, std::uint8_t)");
}

/// One tensor of a file: its header entry, offsets relative to the data section.
struct TensorInfo {
  std::string name;
  DType dtype = DType::F32;
  std::vector<std::int64_t> shape;
  std::uint64_t begin = 0, end = 0;  ///< byte offsets inside the data section

  /// Product of the shape (1 for a 0-D tensor); ShapeError if it overflows
  /// (never for a TensorInfo from a SafetensorsFile: open() checked it).
  std::int64_t numel() const {
    std::int64_t n = 1;
    for (const std::int64_t d : shape) n = lora::detail::checked_mul("TensorInfo::numel", n, d);
    return n;
  }
  std::uint64_t size_bytes() const { return end - begin; }
};

namespace detail {

/// The Rust crate's Dtype order (declaration order, increasing alignment): its
/// writer sorts tensors by this, descending, then by name.
constexpr int safetensors_rank(DType d) {
  switch (d) {
    case DType::BOOL: return 0;
    case DType::U8: return 4;
    case DType::I8: return 5;
    case DType::F8_E5M2: return 6;
    case DType::F8_E4M3: return 7;
    case DType::I16: return 11;
    case DType::F16: return 13;
    case DType::BF16: return 14;
    case DType::I32: return 15;
    case DType::F32: return 17;
    case DType::F64: return 19;
    case DType::I64: return 20;
  }
  return -1;
}

/// The Rust crate's MAX_HEADER_SIZE.
inline constexpr std::uint64_t max_header_bytes = 100'000'000;

/// Index of the first byte that is not valid UTF-8 (overlong forms, surrogates
/// and code points above U+10FFFF included), or n.
inline std::size_t utf8_invalid_at(const unsigned char* s, std::size_t n) {
  std::size_t i = 0;
  while (i < n) {
    const unsigned c = s[i];
    if (c < 0x80) {
      ++i;
      continue;
    }
    std::size_t len;
    unsigned lo = 0x80, hi = 0xBF;  // range of the second byte
    if (c >= 0xC2 && c <= 0xDF) len = 2;
    else if (c >= 0xE0 && c <= 0xEF) {
      len = 3;
      if (c == 0xE0) lo = 0xA0;
      if (c == 0xED) hi = 0x9F;  // no surrogates
    } else if (c >= 0xF0 && c <= 0xF4) {
      len = 4;
      if (c == 0xF0) lo = 0x90;
      if (c == 0xF4) hi = 0x8F;  // <= U+10FFFF
    } else
      return i;
    if (n - i < len) return i;
    if (s[i + 1] < lo || s[i + 1] > hi) return i;
    for (std::size_t k = 2; k < len; ++k)
      if (s[i + k] < 0x80 || s[i + k] > 0xBF) return i;
    i += len;
  }
  return n;
}
inline bool valid_utf8(std::string_view s) {
  return utf8_invalid_at(reinterpret_cast<const unsigned char*>(s.data()), s.size()) == s.size();
}

inline std::string shape_string(const std::vector<std::int64_t>& shape) {
  std::string s = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(shape[i]);
  }
  return s + "]";
}

inline std::string dtype_list() {
  std::string s;
  for (const DType d : all_dtypes) {
    if (!s.empty()) s += ", ";
    s += dtype_name(d);
  }
  return s;
}

// ---- little-endian element access (memcpy: the data may be unaligned) -------
template <class U>
inline U load_le(const std::byte* p) {
  U u;
  std::memcpy(&u, p, sizeof(U));
  if constexpr (std::endian::native == std::endian::big && sizeof(U) > 1) {
    auto* b = reinterpret_cast<unsigned char*>(&u);
    std::reverse(b, b + sizeof(U));
  }
  return u;
}
template <class U>
inline void store_le(std::byte* p, U u) {
  if constexpr (std::endian::native == std::endian::big && sizeof(U) > 1) {
    auto* b = reinterpret_cast<unsigned char*>(&u);
    std::reverse(b, b + sizeof(U));
  }
  std::memcpy(p, &u, sizeof(U));
}

/// The unsigned integer with T's bytes.
template <class T>
using bits_t = std::conditional_t<sizeof(T) == 8, std::uint64_t,
                                  std::conditional_t<sizeof(T) == 4, std::uint32_t, std::uint16_t>>;

template <class T>
inline T load_scalar(const std::byte* p) {
  return std::bit_cast<T>(load_le<bits_t<T>>(p));
}
template <class T>
inline void store_scalar(std::byte* p, T v) {
  store_le<bits_t<T>>(p, std::bit_cast<bits_t<T>>(v));
}

/// d rounded to float toward zero, with the last bit set when inexact (round
/// to odd). A 16-bit format rounding that float to nearest even then gets the
/// same bits as rounding d once: float keeps more than 2 bits beyond bf16's 8
/// and fp16's 11. (double -> float -> 16 bits with two nearest-even roundings
/// is off by one unit at ties: PyTorch's f64 -> bf16 does that.)
inline float to_float_round_odd(double d) {
  float f = static_cast<float>(d);
  if (d != d || static_cast<double>(f) == d) return f;  // NaN, or exact
  if (std::fabs(static_cast<double>(f)) > std::fabs(d)) f = std::nextafter(f, 0.0f);  // inf -> FLT_MAX too
  return std::bit_cast<float>(std::bit_cast<std::uint32_t>(f) | 1u);
}

/// v as a To, rounded once to nearest even (NaN stays NaN, overflow gives inf).
template <class To, class From>
inline To convert(From v) {
  if constexpr (std::is_same_v<To, From>) {
    return v;
  } else if constexpr (std::is_same_v<From, double>) {
    if constexpr (std::is_same_v<To, float>) return static_cast<float>(v);
    else return To(to_float_round_odd(v));
  } else {
    const float f = static_cast<float>(v);  // exact: From is float, half or bfloat16
    if constexpr (std::is_same_v<To, float>) return f;
    else if constexpr (std::is_same_v<To, double>) return static_cast<double>(f);
    else return To(f);
  }
}

/// out[0, n) = the n elements of dtype src at p, converted to T.
template <class T>
inline void decode(DType src, const std::byte* p, std::size_t n, T* out) {
  if (src == dtype_of<T>() && std::endian::native == std::endian::little) {
    if (n) std::memcpy(out, p, n * sizeof(T));
    return;
  }
  const auto run = [&]<class S>() {
    for (std::size_t i = 0; i < n; ++i) out[i] = convert<T>(load_scalar<S>(p + i * sizeof(S)));
  };
  switch (src) {
    case DType::F64: run.template operator()<double>(); break;
    case DType::F32: run.template operator()<float>(); break;
    case DType::F16: run.template operator()<Eigen::half>(); break;
    case DType::BF16: run.template operator()<Eigen::bfloat16>(); break;
    default: LORA_ASSERT(false && "decode: not a floating dtype");
  }
}

/// The JSON of a string as serde_json writes it: only '"', '\\' and control
/// characters escaped, lower-case \u00xx, no ASCII escaping (nlohmann's dump
/// does the same). s must be valid UTF-8.
inline std::string json_string(const std::string& s) { return nlohmann::json(s).dump(); }

// ---- header parsing ----------------------------------------------------------

/// A char iterator that counts how far the JSON lexer has read, so a key can
/// be reported at its byte offset (nlohmann's callbacks carry no position).
struct CountingIterator {
  using iterator_category = std::forward_iterator_tag;
  using value_type = char;
  using difference_type = std::ptrdiff_t;
  using pointer = const char*;
  using reference = const char&;
  const char* p = nullptr;
  std::size_t* consumed = nullptr;
  reference operator*() const { return *p; }
  CountingIterator& operator++() {
    ++p;
    ++*consumed;
    return *this;
  }
  CountingIterator operator++(int) {
    CountingIterator t = *this;
    ++*this;
    return t;
  }
  friend bool operator==(const CountingIterator& a, const CountingIterator& b) { return a.p == b.p; }
};

/// Parses text (which starts at file offset `base`) as JSON, refusing
/// duplicate keys at any depth; records where each top-level key ends.
inline nlohmann::json parse_json_strict(const std::string& where, const char* text, std::size_t size,
                                        std::uint64_t base, std::map<std::string, std::uint64_t>* key_offsets) {
  using json = nlohmann::json;
  std::size_t consumed = 0;
  struct Open {
    std::set<std::string> keys;
    std::string name;  // the key this object is the value of ("" at the top)
  };
  std::vector<Open> open;
  std::string last_key;
  const json::parser_callback_t cb = [&](int depth, json::parse_event_t event, json& parsed) {
    switch (event) {
      case json::parse_event_t::object_start:
        open.push_back({{}, depth == 0 ? std::string() : last_key});
        break;
      case json::parse_event_t::object_end:
        if (!open.empty()) open.pop_back();
        break;
      case json::parse_event_t::key: {
        const std::string& k = parsed.get_ref<const std::string&>();
        if (!open.empty() && !open.back().keys.insert(k).second)
          lora::detail::raise<FormatError>(where, ": duplicate key '", k, "'",
                                           open.back().name.empty() ? " in the header" : " in the entry of '",
                                           open.back().name, open.back().name.empty() ? "" : "'",
                                           " (ending at file offset ", base + consumed, ")");
        if (depth == 1 && key_offsets) key_offsets->emplace(k, base + consumed);
        last_key = k;
        break;
      }
      default:
        break;
    }
    return true;
  };
  try {
    return json::parse(CountingIterator{text, &consumed}, CountingIterator{text + size, &consumed}, cb);
  } catch (const json::parse_error& e) {
    const std::uint64_t at = base + (e.byte > 0 ? e.byte - 1 : 0);
    lora::detail::raise<FormatError>(where, ": not valid JSON at file offset ", at, ": ", e.what());
  } catch (const json::exception& e) {  // a number out of range, ...
    lora::detail::raise<FormatError>(where, ": not valid JSON near file offset ", base + consumed, ": ", e.what());
  }
}

/// A JSON value as a non-negative integer ("-0" included), or nullopt.
inline std::optional<std::uint64_t> json_uint(const nlohmann::json& v) {
  if (v.is_number_unsigned()) return v.get<std::uint64_t>();
  if (v.is_number_integer() && v.get<std::int64_t>() == 0) return 0;
  return std::nullopt;
}
inline std::string json_why_not_uint(const nlohmann::json& v) {
  if (v.is_number_integer()) return v.dump() + " is negative";
  if (v.is_number_float()) return v.dump() + " is not an integer";
  return std::string("is a JSON ") + v.type_name() + ", not an integer";
}

/// Owns a read-only POSIX mapping.
class Mapping {
 public:
  Mapping() = default;
  Mapping(void* addr, std::size_t len) : addr_(addr), len_(len) {}
  Mapping(Mapping&& o) noexcept : addr_(std::exchange(o.addr_, nullptr)), len_(std::exchange(o.len_, 0)) {}
  Mapping& operator=(Mapping&& o) noexcept {
    if (this != &o) {
      release();
      addr_ = std::exchange(o.addr_, nullptr);
      len_ = std::exchange(o.len_, 0);
    }
    return *this;
  }
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;
  ~Mapping() { release(); }
  const std::byte* data() const { return static_cast<const std::byte*>(addr_); }

 private:
  void release() {
#if LORA_IO_HAS_MMAP
    if (addr_) ::munmap(addr_, len_);
#endif
    addr_ = nullptr;
  }
  void* addr_ = nullptr;
  std::size_t len_ = 0;
};

}  // namespace detail

/// A safetensors file, read-only: opened and fully checked once, then every
/// accessor is const and thread-safe. Movable, not copyable.
class SafetensorsFile {
 public:
  /// Maps the file (POSIX mmap, read-only, private; elsewhere the file is read
  /// into memory) and checks its header. I/O failures throw lora::Error naming
  /// the path, bad contents lora::FormatError. Changing the file while it is
  /// mapped is undefined (SIGBUS on truncation), as for every mmap reader.
  static SafetensorsFile open(const std::filesystem::path& file) {
    SafetensorsFile f;
    f.label_ = file.string();
#if LORA_IO_HAS_MMAP
    const int fd = ::open(file.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) lora::detail::raise<Error>("safetensors '", f.label_, "': cannot open: ", std::strerror(errno));
    struct stat st {};
    if (::fstat(fd, &st) != 0) {
      const int err = errno;
      ::close(fd);
      lora::detail::raise<Error>("safetensors '", f.label_, "': cannot stat: ", std::strerror(err));
    }
    if (!S_ISREG(st.st_mode)) {
      ::close(fd);
      lora::detail::raise<Error>("safetensors '", f.label_, "': not a regular file");
    }
    const auto size = static_cast<std::size_t>(st.st_size);
    if (size > 0) {
      void* addr = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
      const int err = errno;
      ::close(fd);  // the mapping keeps the file
      if (addr == MAP_FAILED) lora::detail::raise<Error>("safetensors '", f.label_, "': cannot mmap: ", std::strerror(err));
      f.mapping_ = detail::Mapping(addr, size);
      f.base_ = f.mapping_.data();
    } else {
      ::close(fd);
    }
    f.size_ = size;
#else
    std::ifstream in(file, std::ios::binary);
    if (!in) lora::detail::raise<Error>("safetensors '", f.label_, "': cannot open");
    in.seekg(0, std::ios::end);
    const auto size = static_cast<std::size_t>(in.tellg());
    in.seekg(0);
    f.owned_.resize(size);
    if (size && !in.read(reinterpret_cast<char*>(f.owned_.data()), static_cast<std::streamsize>(size)))
      lora::detail::raise<Error>("safetensors '", f.label_, "': cannot read");
    f.base_ = f.owned_.data();
    f.size_ = size;
#endif
    f.parse();
    return f;
  }

  /// Parses a whole file held in memory; the SafetensorsFile owns the bytes
  /// (their address does not change when it is moved).
  static SafetensorsFile from_bytes(std::vector<std::byte> bytes, std::string label = "<memory>") {
    SafetensorsFile f;
    f.label_ = std::move(label);
    f.owned_ = std::move(bytes);
    f.base_ = f.owned_.data();
    f.size_ = f.owned_.size();
    f.parse();
    return f;
  }

  SafetensorsFile(SafetensorsFile&&) noexcept = default;
  SafetensorsFile& operator=(SafetensorsFile&&) noexcept = default;
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  /// The path (or from_bytes' label): every message names it.
  const std::string& label() const { return label_; }
  /// "__metadata__" (string -> string, as the format requires); empty if absent.
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  /// Every tensor, sorted by begin offset (then end, then name).
  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  bool contains(std::string_view name) const { return index_.find(name) != index_.end(); }

  /// FormatError naming the file and the tensor if there is no such tensor.
  const TensorInfo& info(std::string_view name) const {
    const auto it = index_.find(name);
    if (it == index_.end())
      lora::detail::raise<FormatError>(where(), ": no tensor named '", name, "' (the file has ", tensors_.size(),
                                       " tensors)");
    return tensors_[it->second];
  }

  /// The tensor's bytes in the file (row-major, little-endian), no copy.
  std::span<const std::byte> bytes(std::string_view name) const {
    const TensorInfo& t = info(name);
    return {data_section() + t.begin, static_cast<std::size_t>(t.end - t.begin)};
  }

  /// The whole file (or buffer).
  std::span<const std::byte> file_bytes() const { return {base_, size_}; }
  /// File offset of the data section (8 + header length).
  std::uint64_t data_offset() const { return data_start_; }

  /// The tensor as a [rows, cols] matrix over the file's bytes: no copy. The
  /// dtype must be exactly dtype_of<T>() and the data aligned for T (files
  /// written by safetensors always are), else FormatError suggesting read<T>.
  /// Shapes: 2-D [d0, d1]; 1-D [n] as [1, n]; 0-D as [1, 1]; N-D when every dim
  /// after the first two is 1 ([out, in, 1, 1] -> [out, in]) or every dim
  /// before the last two is 1 ([1, rows, cols] -> [rows, cols]); else
  /// FormatError. Valid while this SafetensorsFile lives.
  template <class T>
  Eigen::Map<const RowMatrix<T>> view(std::string_view name) const {
    constexpr DType want = dtype_of<T>();
    const TensorInfo& t = info(name);
    if (t.dtype != want)
      lora::detail::raise<FormatError>(where(), ": tensor '", t.name, "' is ", dtype_name(t.dtype), ", view<",
                                       detail::type_name<T>(), "> needs ", dtype_name(want),
                                       " exactly (a view cannot convert); use read<", detail::type_name<T>(),
                                       "> to copy and convert");
    if constexpr (std::endian::native != std::endian::little && sizeof(T) > 1)
      lora::detail::raise<FormatError>(where(), ": tensor '", t.name, "': a big-endian host cannot view ",
                                       "little-endian data; use read<", detail::type_name<T>(), ">");
    const auto [rows, cols] = matrix_extent(t, "view");
    const std::byte* p = data_section() + t.begin;
    if (rows * cols > 0 && reinterpret_cast<std::uintptr_t>(p) % alignof(T) != 0)
      lora::detail::raise<FormatError>(where(), ": tensor '", t.name, "' starts at file offset ", data_start_ + t.begin,
                                       ", not aligned to ", alignof(T), " bytes for ", detail::type_name<T>(),
                                       " (a writer that does not pad the header or order tensors by alignment);",
                                       " use read<", detail::type_name<T>(), "> to copy it");
    return {reinterpret_cast<const T*>(p), rows, cols};
  }

  /// A copy as a [rows, cols] matrix (shapes as view), converted from any of
  /// F64 / F32 / F16 / BF16 to T, rounding once to nearest even.
  template <class T>
  RowMatrix<T> read(std::string_view name) const {
    static_assert(detail::is_float_scalar_v<T>,
                  "SafetensorsFile::read<T>: T must be float, double, Eigen::half or Eigen::bfloat16 "
                  "(integer tensors: view<T> or bytes())");
    const TensorInfo& t = info(name);
    check_convertible<T>(t, "read");
    const auto [rows, cols] = matrix_extent(t, "read");
    RowMatrix<T> out(rows, cols);
    detail::decode<T>(t.dtype, data_section() + t.begin, static_cast<std::size_t>(rows * cols), out.data());
    return out;
  }

  /// A copy of a vector: any shape with at most one dim other than 1 ([n],
  /// [n, 1], [1, n], [], ...); converted as read.
  template <class T>
  Eigen::Matrix<T, Eigen::Dynamic, 1> read_vector(std::string_view name) const {
    static_assert(detail::is_float_scalar_v<T>,
                  "SafetensorsFile::read_vector<T>: T must be float, double, Eigen::half or Eigen::bfloat16");
    const TensorInfo& t = info(name);
    check_convertible<T>(t, "read_vector");
    const auto non_unit = std::count_if(t.shape.begin(), t.shape.end(), [](std::int64_t d) { return d != 1; });
    if (non_unit > 1)
      lora::detail::raise<FormatError>(where(), ": tensor '", t.name, "' has shape ", detail::shape_string(t.shape),
                                       "; read_vector<", detail::type_name<T>(),
                                       "> needs at most one dim other than 1 (use read<", detail::type_name<T>(),
                                       "> for a matrix)");
    const std::int64_t n = t.numel();
    Eigen::Matrix<T, Eigen::Dynamic, 1> out(n);
    detail::decode<T>(t.dtype, data_section() + t.begin, static_cast<std::size_t>(n), out.data());
    return out;
  }

 private:
  SafetensorsFile() = default;

  std::string where() const { return "safetensors '" + label_ + "'"; }
  const std::byte* data_section() const { return base_ + data_start_; }

  template <class T>
  void check_convertible(const TensorInfo& t, const char* fn) const {
    if (!is_floating_dtype(t.dtype))
      lora::detail::raise<FormatError>(where(), ": tensor '", t.name, "' is ", dtype_name(t.dtype), "; ", fn, "<",
                                       detail::type_name<T>(), "> converts from F64, F32, F16 and BF16 only",
                                       " (integer and fp8 tensors: view<T> or bytes())");
  }

  std::pair<Eigen::Index, Eigen::Index> matrix_extent(const TensorInfo& t, const char* fn) const {
    const auto& s = t.shape;
    const std::size_t n = s.size();
    if (n == 0) return {1, 1};
    if (n == 1) return {1, s[0]};
    const auto one = [](std::int64_t d) { return d == 1; };
    if (std::all_of(s.begin() + 2, s.end(), one)) return {s[0], s[1]};
    if (std::all_of(s.begin(), s.end() - 2, one)) return {s[n - 2], s[n - 1]};
    lora::detail::raise<FormatError>(where(), ": tensor '", t.name, "' has shape ", detail::shape_string(s), "; ", fn,
                                     "<T> takes 0-D, 1-D (as [1, n]) and 2-D tensors, and N-D ones whose dims after "
                                     "the first two ([out, in, 1, 1]) or before the last two ([1, rows, cols]) are 1");
  }

  void parse() {
    using lora::detail::raise;
    using json = nlohmann::json;
    const std::string w = where();
    if (size_ < 8)
      raise<FormatError>(w, ": the file is ", size_, " bytes, shorter than the 8-byte header length at offset 0");
    const auto n = detail::load_le<std::uint64_t>(base_);
    if (n > detail::max_header_bytes)
      raise<FormatError>(w, ": the header length ", n, " (file offset 0) exceeds safetensors' limit of ",
                         detail::max_header_bytes, " bytes");
    if (n > size_ - 8)
      raise<FormatError>(w, ": the header length ", n, " (file offset 0) runs past the end of the file (",
                         size_, " bytes: at most ", size_ - 8, " header bytes)");
    data_start_ = 8 + n;
    const auto* header = reinterpret_cast<const char*>(base_ + 8);
    const std::size_t bad = detail::utf8_invalid_at(reinterpret_cast<const unsigned char*>(header), n);
    if (bad != n) raise<FormatError>(w, ": the header is not valid UTF-8 at file offset ", 8 + bad);

    std::map<std::string, std::uint64_t> key_at;
    const json root = detail::parse_json_strict(w + ": header", header, n, 8, &key_at);
    if (!root.is_object())
      raise<FormatError>(w, ": the header (file offsets 8 to ", data_start_, ") is a JSON ", root.type_name(),
                         ", not a JSON object");

    const std::uint64_t data_len = size_ - data_start_;
    for (auto it = root.begin(); it != root.end(); ++it) {
      const std::string& key = it.key();
      const json& v = it.value();
      const std::string at = lora::detail::concat(" (header entry ending at file offset ", key_at[key], ")");
      if (key == "__metadata__") {
        if (v.is_null()) continue;  // serde reads null as "no metadata"
        if (!v.is_object())
          raise<FormatError>(w, ": __metadata__", at, " is a JSON ", v.type_name(), ", not an object of strings");
        for (auto m = v.begin(); m != v.end(); ++m) {
          if (!m.value().is_string())
            raise<FormatError>(w, ": __metadata__ value of '", m.key(), "'", at, " is a JSON ", m.value().type_name(),
                               "; the format allows strings only");
          metadata_.emplace(m.key(), m.value().get<std::string>());
        }
        continue;
      }
      const std::string tw = w + ": tensor '" + key + "'" + at;
      if (!v.is_object()) raise<FormatError>(tw, " is a JSON ", v.type_name(), ", not a JSON object");
      for (const char* field : {"dtype", "shape", "data_offsets"})
        if (!v.contains(field)) raise<FormatError>(tw, " has no \"", field, "\"");
      TensorInfo t;
      t.name = key;
      const json& dt = v["dtype"];
      if (!dt.is_string()) raise<FormatError>(tw, ": dtype is a JSON ", dt.type_name(), ", not a string");
      const auto dtype = dtype_from_name(dt.get_ref<const std::string&>());
      if (!dtype)
        raise<FormatError>(tw, ": unknown dtype ", dt.dump(), " (this reader knows ", detail::dtype_list(), ")");
      t.dtype = *dtype;

      const json& shape = v["shape"];
      if (!shape.is_array()) raise<FormatError>(tw, ": shape is a JSON ", shape.type_name(), ", not an array");
      std::uint64_t numel = 1;
      for (std::size_t i = 0; i < shape.size(); ++i) {
        const auto d = detail::json_uint(shape[i]);
        if (!d) raise<FormatError>(tw, ": shape[", i, "] ", detail::json_why_not_uint(shape[i]));
        if (*d > std::uint64_t(std::numeric_limits<std::int64_t>::max()) ||
            __builtin_mul_overflow(numel, *d, &numel) ||
            numel > std::uint64_t(std::numeric_limits<std::int64_t>::max()))
          raise<FormatError>(tw, ": shape ", shape.dump(), ": the element count overflows 63 bits");
        t.shape.push_back(static_cast<std::int64_t>(*d));
      }
      std::uint64_t nbytes = 0;
      if (__builtin_mul_overflow(numel, std::uint64_t(dtype_size(t.dtype)), &nbytes))
        raise<FormatError>(tw, ": shape ", shape.dump(), " of ", dtype_name(t.dtype),
                           ": the byte size overflows 64 bits");

      const json& off = v["data_offsets"];
      if (!off.is_array() || off.size() != 2)
        raise<FormatError>(tw, ": data_offsets is ", off.dump(), ", not two integers [begin, end]");
      for (std::size_t i = 0; i < 2; ++i)
        if (!detail::json_uint(off[i]))
          raise<FormatError>(tw, ": data_offsets[", i, "] ", detail::json_why_not_uint(off[i]));
      t.begin = *detail::json_uint(off[0]);
      t.end = *detail::json_uint(off[1]);
      const std::string range = lora::detail::concat("data_offsets [", t.begin, ", ", t.end, ")");
      if (t.end < t.begin) raise<FormatError>(tw, ": ", range, " are not ordered (begin > end)");
      if (t.end - t.begin != nbytes)
        raise<FormatError>(tw, ": ", range, " hold ", t.end - t.begin, " bytes, but shape ",
                           detail::shape_string(t.shape), " of ", dtype_name(t.dtype), " needs ", nbytes);
      if (t.end > data_len)
        raise<FormatError>(tw, ": ", range, " run past the end of the data section (", data_len,
                           " bytes, file offsets ", data_start_, " to ", size_, "): the tensor would end at file offset ",
                           data_start_ + t.end);
      tensors_.push_back(std::move(t));
    }

    // The Rust crate's validate(): sorted by offsets, the tensors tile the data
    // section from 0 to its end.
    std::sort(tensors_.begin(), tensors_.end(), [](const TensorInfo& a, const TensorInfo& b) {
      return std::tie(a.begin, a.end, a.name) < std::tie(b.begin, b.end, b.name);
    });
    std::uint64_t covered = 0;
    const TensorInfo* prev = nullptr;
    for (const TensorInfo& t : tensors_) {
      if (t.begin > covered)
        raise<FormatError>(w, ": gap: data section bytes [", covered, ", ", t.begin, ") (file offset ",
                           data_start_ + covered, ") belong to no tensor, before tensor '", t.name,
                           "'; safetensors requires the tensors to cover the data section contiguously");
      if (t.begin < covered)
        raise<FormatError>(w, ": tensor '", t.name, "' data_offsets [", t.begin, ", ", t.end, ") (file offset ",
                           data_start_ + t.begin, ") overlap tensor '", prev->name, "' [", prev->begin, ", ",
                           prev->end, ")");
      covered = t.end;
      prev = &t;
    }
    if (covered != data_len)
      raise<FormatError>(w, ": the data section is ", data_len, " bytes but the tensors cover ", covered,
                         ": trailing bytes from file offset ", data_start_ + covered,
                         "; safetensors requires the tensors to cover the data section exactly");
    for (std::size_t i = 0; i < tensors_.size(); ++i) index_.emplace(tensors_[i].name, i);
  }

  std::string label_;
  std::vector<std::byte> owned_;
  detail::Mapping mapping_;
  const std::byte* base_ = nullptr;
  std::size_t size_ = 0;
  std::uint64_t data_start_ = 0;
  std::map<std::string, std::string> metadata_;
  std::vector<TensorInfo> tensors_;
  std::map<std::string, std::size_t, std::less<>> index_;
};

/// Builds a safetensors file in memory, then writes it in the Python
/// library's byte order: tensors sorted by dtype alignment (descending, the
/// Rust crate's Dtype order) then name, compact JSON with "__metadata__"
/// first (keys sorted; omitted when empty), the header padded with spaces to a
/// multiple of 8. For the same tensors and at most one metadata key (Python's
/// metadata dict is a Rust HashMap: its key order is random) the bytes equal
/// safetensors.torch.save_file's.
class SafetensorsWriter {
 public:
  void set_metadata(std::string key, std::string value) {
    if (!detail::valid_utf8(key) || !detail::valid_utf8(value))
      lora::detail::raise<ValueError>("SafetensorsWriter::set_metadata: key or value of '", key,
                                      "' is not valid UTF-8 (the header is JSON)");
    metadata_[std::move(key)] = std::move(value);
  }

  /// m as a 2-D [rows, cols] tensor of dtype `stored` (F64, F32, F16 or BF16),
  /// copied in row-major order whatever m's storage order, each value rounded
  /// once to nearest even.
  template <class Derived>
  void add(std::string name, const Eigen::DenseBase<Derived>& m, DType stored) {
    add_dense("SafetensorsWriter::add", std::move(name), m, stored, {m.rows(), m.cols()});
  }

  /// v (one row or one column) as a 1-D [n] tensor, converted as add.
  template <class Derived>
  void add_vector(std::string name, const Eigen::DenseBase<Derived>& v, DType stored) {
    if (v.rows() != 1 && v.cols() != 1)
      lora::detail::raise<ShapeError>("SafetensorsWriter::add_vector: '", name, "' is ", v.rows(), " x ", v.cols(),
                                      ", not a row or a column");
    add_dense("SafetensorsWriter::add_vector", std::move(name), v, stored, {v.size()});
  }

  /// Bytes as they are (row-major, little-endian), any dtype and rank;
  /// ShapeError unless bytes.size() == numel(shape) * dtype_size(dtype).
  void add_raw(std::string name, DType dtype, std::vector<std::int64_t> shape, std::span<const std::byte> bytes) {
    const char* fn = "SafetensorsWriter::add_raw";
    check_entry(fn, name, dtype);
    std::uint64_t numel = 1;
    for (const std::int64_t d : shape) {
      if (d < 0) lora::detail::raise<ShapeError>(fn, ": '", name, "' has shape ", detail::shape_string(shape),
                                                   " with a negative dim");
      numel = lora::detail::checked_mul(fn, numel, std::uint64_t(d));
    }
    const std::uint64_t want = lora::detail::checked_mul(fn, numel, std::uint64_t(dtype_size(dtype)));
    if (bytes.size() != want)
      lora::detail::raise<ShapeError>(fn, ": '", name, "' has ", bytes.size(), " bytes, but shape ",
                                      detail::shape_string(shape), " of ", dtype_name(dtype), " needs ", want);
    entries_.push_back({std::move(name), dtype, std::move(shape), std::vector<std::byte>(bytes.begin(), bytes.end())});
  }

  bool contains(std::string_view name) const {
    return std::any_of(entries_.begin(), entries_.end(), [&](const Entry& e) { return e.name == name; });
  }
  std::size_t size() const { return entries_.size(); }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

  /// The whole file.
  std::vector<std::byte> to_bytes() const {
    const std::vector<const Entry*> order = ordered();
    const std::string header = make_header(order);
    std::size_t total = 8 + header.size();
    for (const Entry* e : order) total += e->data.size();
    std::vector<std::byte> out(total);
    detail::store_le<std::uint64_t>(out.data(), header.size());
    std::memcpy(out.data() + 8, header.data(), header.size());
    std::size_t at = 8 + header.size();
    for (const Entry* e : order) {
      if (!e->data.empty()) std::memcpy(out.data() + at, e->data.data(), e->data.size());
      at += e->data.size();
    }
    return out;
  }

  /// Writes a temporary file in the same directory, then renames it onto
  /// `file` (an existing file, mapped or not, is replaced whole, never
  /// truncated). On failure throws lora::Error naming the path, and leaves no
  /// temporary file behind. (No fsync: a crash may lose the new file, not
  /// corrupt the old one.)
  void write(const std::filesystem::path& file) const {
    namespace fs = std::filesystem;
    const std::string fn = "SafetensorsWriter::write: '" + file.string() + "'";
    if (!file.has_filename()) lora::detail::raise<Error>(fn, ": the path has no file name");
    const std::vector<const Entry*> order = ordered();
    const std::string header = make_header(order);

    const fs::path dir = file.has_parent_path() ? file.parent_path() : fs::path(".");
    static std::atomic<std::uint64_t> counter{0};
    const auto stamp = static_cast<std::uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count());
    fs::path tmp;
    std::FILE* f = nullptr;
    for (int attempt = 0; attempt < 100 && !f; ++attempt) {
      tmp = dir / lora::detail::concat(".", file.filename().string(), ".tmp",
                                       (stamp ^ (reinterpret_cast<std::uintptr_t>(this) << 16)) + ++counter);
      f = std::fopen(tmp.c_str(), "wbx");  // x: exclusive, never someone else's file
      if (!f && errno != EEXIST) break;
    }
    if (!f)
      lora::detail::raise<Error>(fn, ": cannot create a temporary file in '", dir.string(), "': ",
                                 std::strerror(errno));
    const auto put = [&](const void* p, std::size_t n) { return n == 0 || std::fwrite(p, 1, n, f) == n; };
    std::byte len[8];
    detail::store_le<std::uint64_t>(len, header.size());
    bool ok = put(len, 8) && put(header.data(), header.size());
    for (const Entry* e : order) ok = ok && put(e->data.data(), e->data.size());
    const int write_errno = errno;
    ok = (std::fclose(f) == 0) && ok;
    const int err = ok ? 0 : (errno ? errno : write_errno);
    std::error_code ec;
    if (ok) fs::rename(tmp, file, ec);
    if (!ok || ec) {
      std::error_code ignored;
      fs::remove(tmp, ignored);
      lora::detail::raise<Error>(fn, ": ", ok ? "cannot rename the temporary file onto it: " + ec.message()
                                            : std::string("cannot write: ") + std::strerror(err));
    }
  }

 private:
  struct Entry {
    std::string name;
    DType dtype;
    std::vector<std::int64_t> shape;
    std::vector<std::byte> data;
  };

  void check_entry(const char* fn, const std::string& name, DType dtype) const {
    if (dtype_size(dtype) == 0)
      lora::detail::raise<ValueError>(fn, ": '", name, "': dtype value ", int(dtype), " is not a DType");
    if (name == "__metadata__")
      lora::detail::raise<ValueError>(fn, ": a tensor cannot be named __metadata__ (the format's metadata key)");
    if (!detail::valid_utf8(name))
      lora::detail::raise<ValueError>(fn, ": tensor name '", name, "' is not valid UTF-8 (the header is JSON)");
    if (contains(name)) lora::detail::raise<ValueError>(fn, ": tensor '", name, "' was already added");
  }

  template <class Derived>
  void add_dense(const char* fn, std::string name, const Eigen::DenseBase<Derived>& m, DType stored,
                 std::vector<std::int64_t> shape) {
    using S = typename Derived::Scalar;
    static_assert(detail::is_float_scalar_v<S>,
                  "SafetensorsWriter::add: the scalar must be float, double, Eigen::half or Eigen::bfloat16 "
                  "(other data: add_raw)");
    check_entry(fn, name, stored);
    if (!is_floating_dtype(stored))
      lora::detail::raise<ValueError>(fn, ": '", name, "': stored dtype ", dtype_name(stored),
                                      " is not F64, F32, F16 or BF16 (other dtypes: add_raw)");
    // Products and other expressions are evaluated once; matrices and maps are read in place.
    const typename Eigen::internal::nested_eval<Derived, 1>::type ev(m.derived());
    const Eigen::Index rows = m.rows(), cols = m.cols();
    const std::size_t es = dtype_size(stored);
    std::vector<std::byte> data(static_cast<std::size_t>(rows * cols) * es);
    const auto run = [&]<class D>() {
      std::byte* p = data.data();
      for (Eigen::Index i = 0; i < rows; ++i)
        for (Eigen::Index j = 0; j < cols; ++j, p += sizeof(D)) detail::store_scalar<D>(p, detail::convert<D>(S(ev.coeff(i, j))));
    };
    switch (stored) {
      case DType::F64: run.template operator()<double>(); break;
      case DType::F32: run.template operator()<float>(); break;
      case DType::F16: run.template operator()<Eigen::half>(); break;
      default: run.template operator()<Eigen::bfloat16>(); break;
    }
    entries_.push_back({std::move(name), stored, std::move(shape), std::move(data)});
  }

  std::vector<const Entry*> ordered() const {
    std::vector<const Entry*> order;
    for (const Entry& e : entries_) order.push_back(&e);
    std::sort(order.begin(), order.end(), [](const Entry* a, const Entry* b) {
      const int ra = detail::safetensors_rank(a->dtype), rb = detail::safetensors_rank(b->dtype);
      return ra != rb ? ra > rb : a->name < b->name;  // std::string compares bytes as unsigned, as Rust does
    });
    return order;
  }

  std::string make_header(const std::vector<const Entry*>& order) const {
    std::string h = "{";
    if (!metadata_.empty()) {
      h += "\"__metadata__\":{";
      bool first = true;
      for (const auto& [k, v] : metadata_) {
        if (!first) h += ',';
        h += detail::json_string(k);
        h += ':';
        h += detail::json_string(v);
        first = false;
      }
      h += "}";
    }
    std::uint64_t offset = 0;
    for (const Entry* e : order) {
      if (h.size() > 1) h += ",";
      h += detail::json_string(e->name) + ":{\"dtype\":\"" + std::string(dtype_name(e->dtype)) + "\",\"shape\":[";
      for (std::size_t i = 0; i < e->shape.size(); ++i) {
        if (i) h += ',';
        h += std::to_string(e->shape[i]);
      }
      h += "],\"data_offsets\":[";
      h += std::to_string(offset);
      h += ',';
      offset += e->data.size();
      h += std::to_string(offset);
      h += "]}";
    }
    h += "}";
    h.resize((h.size() + 7) / 8 * 8, ' ');  // the data section starts 8-aligned
    if (h.size() > detail::max_header_bytes)
      lora::detail::raise<ValueError>("SafetensorsWriter: the header is ", h.size(), " bytes, above safetensors' limit of ",
                                      detail::max_header_bytes);
    return h;
  }

  std::vector<Entry> entries_;
  std::map<std::string, std::string> metadata_;
};

/// A checkpoint split over several files: model.safetensors.index.json
///   {"metadata": {...}, "weight_map": {tensor: shard file}}
/// Every shard is opened (mapped and checked) by open(), once, and every
/// tensor of the weight map is checked to be in its shard: errors surface at
/// open, and the accessors are const and thread-safe. Shard paths are
/// relative to the index's directory and may not leave it.
class ShardedSafetensors {
 public:
  static ShardedSafetensors open(const std::filesystem::path& index_json) {
    using lora::detail::raise;
    using json = nlohmann::json;
    ShardedSafetensors s;
    s.label_ = index_json.string();
    const std::string w = "safetensors index '" + s.label_ + "'";
    std::ifstream in(index_json, std::ios::binary);
    if (!in) raise<Error>(w, ": cannot open: ", std::strerror(errno));
    std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    if (in.bad()) raise<Error>(w, ": cannot read");
    const std::size_t bad = detail::utf8_invalid_at(reinterpret_cast<const unsigned char*>(text.data()), text.size());
    if (bad != text.size()) raise<FormatError>(w, ": not valid UTF-8 at file offset ", bad);
    const json root = detail::parse_json_strict(w, text.data(), text.size(), 0, nullptr);
    if (!root.is_object()) raise<FormatError>(w, ": is a JSON ", root.type_name(), ", not an object");
    if (root.contains("metadata")) {
      const json& m = root["metadata"];
      if (!m.is_object() && !m.is_null())
        raise<FormatError>(w, ": \"metadata\" is a JSON ", m.type_name(), ", not an object");
      if (m.is_object()) s.metadata_ = m;
    }
    if (!root.contains("weight_map")) raise<FormatError>(w, ": no \"weight_map\"");
    const json& map = root["weight_map"];
    if (!map.is_object()) raise<FormatError>(w, ": \"weight_map\" is a JSON ", map.type_name(), ", not an object");
    const std::filesystem::path dir = index_json.parent_path();
    std::map<std::string, std::size_t> shard_index;
    for (auto it = map.begin(); it != map.end(); ++it) {
      if (!it.value().is_string())
        raise<FormatError>(w, ": weight_map entry of tensor '", it.key(), "' is a JSON ", it.value().type_name(),
                           ", not a file name");
      const std::string& shard = it.value().get_ref<const std::string&>();
      const std::filesystem::path rel(shard);
      const bool escapes = shard.empty() || rel.is_absolute() || rel.has_root_name() ||
                           std::any_of(rel.begin(), rel.end(), [](const auto& c) { return c == ".."; });
      if (escapes)
        raise<FormatError>(w, ": tensor '", it.key(), "' is mapped to '", shard,
                           "', not a path inside the index's directory");
      auto [pos, inserted] = shard_index.emplace(shard, s.shards_.size());
      if (inserted) s.shards_.push_back(SafetensorsFile::open(dir / rel));
      const SafetensorsFile& f = s.shards_[pos->second];
      if (!f.contains(it.key()))
        raise<FormatError>(w, ": tensor '", it.key(), "' is mapped to shard '", f.label(),
                           "', which has no such tensor");
      s.where_.emplace(it.key(), pos->second);
    }
    return s;
  }

  const std::string& label() const { return label_; }
  /// The index's "metadata" as written (transformers: {"total_size": N}, a number).
  const nlohmann::json& metadata() const { return metadata_; }
  /// The opened shards, in order of first appearance in the weight map.
  const std::vector<SafetensorsFile>& shards() const { return shards_; }

  bool contains(std::string_view name) const { return where_.find(name) != where_.end(); }
  /// The shard holding the tensor; FormatError naming the index if none does.
  const SafetensorsFile& file_of(std::string_view name) const {
    const auto it = where_.find(name);
    if (it == where_.end())
      lora::detail::raise<FormatError>("safetensors index '", label_, "': no tensor named '", name,
                                       "' in the weight map (", where_.size(), " tensors)");
    return shards_[it->second];
  }
  const TensorInfo& info(std::string_view name) const { return file_of(name).info(name); }
  template <class T>
  Eigen::Map<const RowMatrix<T>> view(std::string_view name) const {
    return file_of(name).template view<T>(name);
  }
  template <class T>
  RowMatrix<T> read(std::string_view name) const {
    return file_of(name).template read<T>(name);
  }
  template <class T>
  Eigen::Matrix<T, Eigen::Dynamic, 1> read_vector(std::string_view name) const {
    return file_of(name).template read_vector<T>(name);
  }
  /// Every tensor of the weight map, sorted.
  std::vector<std::string> names() const {
    std::vector<std::string> out;
    for (const auto& [name, shard] : where_) out.push_back(name);
    return out;
  }

 private:
  std::string label_;
  nlohmann::json metadata_ = nlohmann::json::object();
  std::vector<SafetensorsFile> shards_;
  std::map<std::string, std::size_t, std::less<>> where_;
};

}  // namespace lora::io
