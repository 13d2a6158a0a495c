// test_io_gguf.cpp: <lora/io/gguf.hpp> against files written by gguf-py (llama.cpp's gguf
// package, scripts/gen_gguf_fixtures.py): every KV type, every decoder, the writer's bytes,
// the LoRA layout of convert_lora_to_gguf.py, the llama name map, fold_scale, the RoPE row
// permutation, and one malformed input per structural check.
#include <lora/io/gguf.hpp>

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include <bit>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include <unistd.h>

#ifndef LORA_TEST_FIXTURE_DIR
#error "define LORA_TEST_FIXTURE_DIR as the path of tests/fixtures"
#endif

namespace {

namespace io = lora::io;
using io::GgmlType;
using io::GgufArray;
using io::GgufValue;
using io::GgufValueType;
using json = nlohmann::json;
using Catch::Matchers::Contains;
using lora::RowMatrix;

std::filesystem::path fixture(const std::string& name) {
  return std::filesystem::path(LORA_TEST_FIXTURE_DIR) / "gguf" / name;
}

const json& expected() {
  static const json j = [] {
    std::ifstream in(fixture("expected.json"));
    return json::parse(in);
  }();
  return j;
}

std::vector<std::byte> file_bytes(const std::filesystem::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::vector<char> c((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::vector<std::byte> out(c.size());
  std::memcpy(out.data(), c.data(), c.size());
  return out;
}

std::vector<float> floats_of(const json& bits) {
  std::vector<float> out;
  for (const auto& b : bits) out.push_back(std::bit_cast<float>(b.get<std::uint32_t>()));
  return out;
}

std::vector<std::uint32_t> bits_of(const float* p, std::size_t n) {
  std::vector<std::uint32_t> out(n);
  for (std::size_t i = 0; i < n; ++i) out[i] = std::bit_cast<std::uint32_t>(p[i]);
  return out;
}

std::vector<std::uint32_t> bits_of(const RowMatrix<float>& m) {
  return bits_of(m.data(), static_cast<std::size_t>(m.size()));
}

RowMatrix<float> matrix_of(const json& bits, const json& shape) {
  const auto v = floats_of(bits);
  RowMatrix<float> m(shape[0].get<lora::index_t>(), shape[1].get<lora::index_t>());
  REQUIRE(static_cast<std::size_t>(m.size()) == v.size());
  std::copy(v.begin(), v.end(), m.data());
  return m;
}

GgufValueType type_from_name(const std::string& n) {
  for (std::uint32_t t = 0; t <= 12; ++t)
    if (n == io::gguf_value_type_name(static_cast<GgufValueType>(t))) return static_cast<GgufValueType>(t);
  FAIL("unknown type name " << n);
  return GgufValueType::UINT8;
}

// The JSON description of a KV value (scripts/gen_gguf_fixtures.py: encode_value) as a GgufValue.
GgufValue value_from_json(const json& j) {
  const std::string t = j["type"];
  if (t == "arr") {
    GgufArray a;
    a.element_type = type_from_name(j["element_type"]);
    for (const auto& item : j["items"]) a.items.push_back(value_from_json(item));
    return GgufValue(std::move(a));
  }
  const json& v = j["value"];
  if (t == "u8") return GgufValue(v.get<std::uint8_t>());
  if (t == "i8") return GgufValue(v.get<std::int8_t>());
  if (t == "u16") return GgufValue(v.get<std::uint16_t>());
  if (t == "i16") return GgufValue(v.get<std::int16_t>());
  if (t == "u32") return GgufValue(v.get<std::uint32_t>());
  if (t == "i32") return GgufValue(v.get<std::int32_t>());
  if (t == "f32") return GgufValue(static_cast<float>(v.get<double>()));
  if (t == "bool") return GgufValue(v.get<bool>());
  if (t == "str") return GgufValue(v.get<std::string>());
  if (t == "u64") return GgufValue(v.get<std::uint64_t>());
  if (t == "i64") return GgufValue(v.get<std::int64_t>());
  if (t == "f64") return GgufValue(v.get<double>());
  FAIL("unknown type " << t);
  return {};
}

GgmlType ggml_type_from_name(const std::string& n) {
  for (auto t : {GgmlType::F32, GgmlType::F16, GgmlType::BF16, GgmlType::Q8_0})
    if (io::ggml_type_name(t) == n) return t;
  FAIL("unexpected ggml type " << n);
  return GgmlType::F32;
}

// The message of the E that f throws (a test failure if it throws nothing or another type).
template <class E, class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const E& e) {
    return e.what();
  } catch (const std::exception& e) {
    FAIL("expected another exception type, got: " << e.what());
  }
  FAIL("no exception thrown");
  return {};
}

// Little-endian byte builder for hand-made files.
struct Bytes {
  std::vector<std::byte> v;
  Bytes& raw(std::string_view s) {
    for (char c : s) v.push_back(static_cast<std::byte>(c));
    return *this;
  }
  template <class T>
  Bytes& put(T x) {
    const auto at = v.size();
    v.resize(at + sizeof(T));
    std::memcpy(v.data() + at, &x, sizeof(T));
    return *this;
  }
  Bytes& u32(std::uint32_t x) { return put(x); }
  Bytes& u64(std::uint64_t x) { return put(x); }
  Bytes& str(std::string_view s) { return u64(s.size()).raw(s); }
  Bytes& zeros(std::size_t n) {
    v.resize(v.size() + n);
    return *this;
  }
  Bytes& header(std::uint64_t n_tensors, std::uint64_t n_kv, std::uint32_t version = 3) {
    return raw("GGUF").u32(version).u64(n_tensors).u64(n_kv);
  }
  // One tensor info: name, dims (ggml order), type, offset.
  Bytes& info(std::string_view name, std::vector<std::uint64_t> ne, std::uint32_t type, std::uint64_t offset) {
    str(name).u32(static_cast<std::uint32_t>(ne.size()));
    for (auto e : ne) u64(e);
    return u32(type).u64(offset);
  }
  std::size_t size() const { return v.size(); }
};

io::GgufFile parse(const Bytes& b) { return io::GgufFile::from_bytes(b.v, "bad.gguf"); }

Eigen::MatrixXd dense(const RowMatrix<float>& m) { return m.cast<double>(); }

}  // namespace

// ------------------------------------------------------------------------------ reader

TEST_CASE("GgufFile reads every KV type gguf-py writes, nested arrays included", "[gguf]") {
  const auto f = io::GgufFile::open(fixture("general.gguf"));
  const json& e = expected()["general.gguf"];
  CHECK(f.version() == 3);
  CHECK(f.alignment() == 64);
  CHECK(f.data_offset() % 64 == 0);
  std::vector<std::string> keys;
  for (const auto& kv : e["kvs"]) keys.push_back(kv["key"]);
  CHECK(f.keys() == keys);  // file order
  for (const auto& kv : e["kvs"]) {
    INFO(kv["key"]);
    const GgufValue want = value_from_json(kv);
    REQUIRE(f.has(kv["key"].get<std::string>()));
    CHECK(f.value(kv["key"].get<std::string>()) == want);
    CHECK(f.value(kv["key"].get<std::string>()).type() == want.type());
  }
  // typed access
  CHECK(f.get<std::uint8_t>("test.u8") == 200);
  CHECK(f.get<std::int64_t>("test.i64") == INT64_MIN);
  CHECK(f.get<std::uint64_t>("test.u64") == UINT64_MAX);
  CHECK(f.get<float>("test.f32") == 0.1f);
  CHECK(f.get<double>("test.f64") == 1.0 / 3.0);
  CHECK(f.get<bool>("test.bool"));
  CHECK(f.get<std::string>("test.str") == "h\xc3\xa9llo, GGUF \xe2\x9c\x93");
  CHECK(f.get<std::string>("test.empty_str").empty());
  CHECK(f.get_array<std::string>("test.arr_str") == std::vector<std::string>{"a", "", "ccc"});
  CHECK(f.get_array<bool>("test.arr_bool") == std::vector<bool>{true, false, true});
  CHECK(f.get_array<std::uint64_t>("test.arr_u64") == std::vector<std::uint64_t>{UINT64_MAX, 0});
  const auto& nested = f.get<GgufArray>("test.nested");
  REQUIRE(nested.element_type == GgufValueType::ARRAY);
  REQUIRE(nested.items.size() == 3);
  CHECK(nested.items[2].as<GgufArray>().element_type == GgufValueType::STRING);
  CHECK(nested.items[2].as<GgufArray>().items[1].as<std::string>() == "y");
  const auto& nested2 = f.get<GgufArray>("test.nested2");
  CHECK(nested2.items[1].as<GgufArray>().items[0].as<GgufArray>().items[1].as<std::int32_t>() == 3);
  // wrong type, missing key: FormatError naming file, key, types and offset
  const auto msg = error_of<lora::FormatError>([&] { (void)f.get<std::uint64_t>("general.alignment"); });
  CHECK_THAT(msg, Contains("general.gguf") && Contains("'general.alignment' is u32, not u64") &&
                      Contains("(at byte " + std::to_string(f.find_kv("general.alignment")->offset) + ")"));
  CHECK_THAT(error_of<lora::FormatError>([&] { (void)f.get_array<std::int32_t>("test.arr_u8"); }),
             Contains("an array of u8, not of i32"));
  CHECK_THAT(error_of<lora::FormatError>([&] { (void)f.value("no.such.key"); }),
             Contains("general.gguf: no key 'no.such.key'"));
  CHECK(f.find("no.such.key") == nullptr);
  CHECK_THROWS_AS(f.value("test.u8").as<std::string>(), lora::ValueError);
}

TEST_CASE("GgufFile decodes F32, F16, BF16 and Q8_0 bit-exactly as gguf-py dequantises", "[gguf]") {
  const auto f = io::GgufFile::open(fixture("general.gguf"));
  const json& e = expected()["general.gguf"];
  REQUIRE(f.tensors().size() == e["tensors"].size());
  std::size_t i = 0;
  for (const auto& t : e["tensors"]) {
    INFO(t["name"]);
    const std::string name = t["name"];
    const auto& info = f.tensors()[i++];
    CHECK(info.name == name);
    CHECK(io::ggml_type_name(info.type) == t["type"].get<std::string>());
    CHECK(info.ne == t["ne"].get<std::vector<std::uint64_t>>());
    CHECK(info.shape() == t["shape"].get<std::vector<std::int64_t>>());
    CHECK(info.file_offset == f.data_offset() + info.offset);
    const RowMatrix<float> m = f.read<float>(name);
    // PyTorch order, leading dimensions folded into the rows
    const auto shape = t["shape"].get<std::vector<std::int64_t>>();
    std::int64_t rows = 1;
    for (std::size_t d = 0; d + 1 < shape.size(); ++d) rows *= shape[d];
    CHECK(m.rows() == rows);
    CHECK(m.cols() == shape.back());
    CHECK(bits_of(m) == t["decoded_bits"].get<std::vector<std::uint32_t>>());  // NaN payloads included
    const RowMatrix<double> md = f.read<double>(name);
    for (lora::index_t k = 0; k < m.size(); ++k)
      if (!std::isnan(m.data()[k])) CHECK(md.data()[k] == static_cast<double>(m.data()[k]));
  }
  // the bytes as stored
  CHECK(f.tensor_bytes("q8_0.matrix").size() == 4 * 34);
  CHECK(f.tensor("f32.empty").n_bytes == 0);
  CHECK(f.tensor("f32.empty").offset == f.tensor("f32.after_empty").offset);  // occupies nothing
  CHECK_THAT(error_of<lora::FormatError>([&] { (void)f.read<float>("nope"); }),
             Contains("general.gguf: no tensor named 'nope'"));
}

TEST_CASE("GgufFile refuses to decode types it does not know how to, naming them", "[gguf]") {
  io::GgufWriter w;
  w.add_tensor_raw("q4k", {256, 2}, GgmlType::Q4_K, std::vector<std::byte>(2 * 144));
  w.add_tensor_raw("i8", {3}, GgmlType::I8, std::vector<std::byte>(3));
  const auto f = io::GgufFile::from_bytes(w.to_bytes(), "types.gguf");
  CHECK(f.tensor_bytes("q4k").size() == 288);
  const auto msg = error_of<lora::FormatError>([&] { (void)f.read<float>("q4k"); });
  CHECK_THAT(msg, Contains("types.gguf: tensor 'q4k' is Q4_K") && Contains("at byte 24"));
  CHECK_THAT(error_of<lora::FormatError>([&] { (void)f.read<double>("i8"); }), Contains("'i8' is I8"));
  CHECK(io::ggml_type_name(31) == "Q4_0_4_4 (removed from ggml)");
  CHECK(io::ggml_type_name(99) == "unknown 99");
}

TEST_CASE("GgufFile accepts GGUF version 2 (the same layout)", "[gguf]") {
  io::GgufWriter w("llama");
  w.add_tensor("t", {2}, std::vector<float>{1.5f, -2.0f});
  auto bytes = w.to_bytes();
  bytes[4] = std::byte{2};
  const auto f = io::GgufFile::from_bytes(bytes, "v2.gguf");
  CHECK(f.version() == 2);
  CHECK(f.read<float>("t")(0, 1) == -2.0f);
}

TEST_CASE("GgufFile::open reports files it cannot open by path", "[gguf]") {
  const auto dir = std::filesystem::temp_directory_path() / ("lora_gguf_open_" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  CHECK_THAT(error_of<lora::Error>([&] { (void)io::GgufFile::open(dir / "missing.gguf"); }),
             Contains("missing.gguf: cannot open"));
  CHECK_THAT(error_of<lora::Error>([&] { (void)io::GgufFile::open(dir); }), Contains("not a regular file"));
  {  // a file cut inside the tensor infos: a FormatError naming the path
    auto bytes = file_bytes(fixture("general.gguf"));
    bytes.resize(700);
    std::ofstream out(dir / "cut.gguf", std::ios::binary);
    out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  }
  CHECK_THAT(error_of<lora::FormatError>([&] { (void)io::GgufFile::open(dir / "cut.gguf"); }),
             Contains((dir / "cut.gguf").string()) && Contains("at byte"));
  std::ofstream(dir / "empty.gguf").close();
  CHECK_THAT(error_of<lora::FormatError>([&] { (void)io::GgufFile::open(dir / "empty.gguf"); }),
             Contains("truncated: the magic needs 4 bytes, 0 remain at byte 0"));
  std::filesystem::remove_all(dir);
}

TEST_CASE("Every truncation of a valid file before its last tensor byte is a FormatError", "[gguf]") {
  for (const char* name : {"general.gguf", "lora_mixed.gguf"}) {
    const auto bytes = file_bytes(fixture(name));
    const auto full = io::GgufFile::from_bytes(bytes, name);
    std::uint64_t end = full.data_offset();
    for (const auto& t : full.tensors()) end = std::max(end, t.file_offset + t.n_bytes);
    for (std::size_t n = 0; n < end; ++n) {
      std::vector<std::byte> cut(bytes.begin(), bytes.begin() + static_cast<std::ptrdiff_t>(n));
      INFO(name << " cut at " << n);
      CHECK_THAT(error_of<lora::FormatError>([&] { (void)io::GgufFile::from_bytes(cut, "cut"); }),
                 Contains("cut: ") && Contains(" at byte "));
    }
    // the trailing padding is not data: a file without it still reads
    std::vector<std::byte> trimmed(bytes.begin(), bytes.begin() + static_cast<std::ptrdiff_t>(end));
    CHECK(io::GgufFile::from_bytes(trimmed, "trimmed").tensors().size() == full.tensors().size());
  }
}

TEST_CASE("Malformed GGUF: each structural check is a FormatError naming label, field and byte", "[gguf]") {
  struct Case {
    const char* what;
    Bytes bytes;
    std::vector<std::string> words;
  };
  const std::uint64_t big = std::uint64_t{1} << 62;
  auto kv_u8 = [](Bytes b, std::string_view key) { return b.str(key).u32(0).put<std::uint8_t>(1); };
  auto nested = [] {
    Bytes b = Bytes{}.header(0, 1).str("a").u32(9);
    for (int i = 0; i < 17; ++i) b.u32(9).u64(1);
    return b.u32(0).u64(1).put<std::uint8_t>(0);
  };
  // one tensor "t" after a header without KVs: name at 24, n_dims at 33, ne[0] at 37
  std::vector<Case> cases = {
      {"empty", Bytes{}, {"bad.gguf: header: truncated: the magic needs 4 bytes, 0 remain at byte 0"}},
      {"bad magic", Bytes{}.raw("GGUX").u32(3).u64(0).u64(0), {"bad magic 'GGUX' (expected 'GGUF') at byte 0"}},
      {"version 1", Bytes{}.header(0, 0, 1), {"GGUF version 1", "not supported", "at byte 4"}},
      {"version 7", Bytes{}.header(0, 0, 7), {"unknown GGUF version 7", "at byte 4"}},
      {"big-endian", Bytes{}.header(0, 0, 0x03000000u), {"byte-swapped", "big-endian", "at byte 4"}},
      {"truncated header",
       Bytes{}.raw("GGUF").u32(3).u32(0),
       {"header: truncated: the tensor count needs 8 bytes, 4 remain at byte 8"}},
      {"tensor count absurd", Bytes{}.header(big, 0), {"tensor count 4611686018427387904 cannot fit", "at byte 8"}},
      {"kv count absurd", Bytes{}.header(0, big), {"key-value count 4611686018427387904 cannot fit", "at byte 16"}},
      {"key past the end",
       Bytes{}.header(0, 1).u64(1000).raw("abcdefghijklmn"),
       {"key #0: key of 1000 bytes runs past the end (14 bytes remain) at byte 24"}},
      {"key length absurd",
       Bytes{}.header(0, 1).u64(std::uint64_t{1} << 40).zeros(14),
       {"key #0: key length 1099511627776 exceeds the 1 GiB limit at byte 24"}},
      {"empty key", Bytes{}.header(0, 1).str("").u32(0).put<std::uint8_t>(1).zeros(8), {"key #0 is empty at byte 24"}},
      {"duplicate key",
       kv_u8(kv_u8(Bytes{}.header(0, 2), "a"), "a"),
       {"duplicate key 'a' (first at byte 24) at byte 38"}},
      {"unknown value type",
       Bytes{}.header(0, 1).str("a").u32(13).zeros(8),
       {"key 'a': unknown value type 13 at byte 33"}},
      {"truncated value",
       Bytes{}.header(0, 1).str("a").u32(4).zeros(2),
       {"key 'a': truncated: a u32 value needs 4 bytes, 2 remain at byte 37"}},
      {"string value past the end",
       Bytes{}.header(0, 1).str("a").u32(8).u64(100).raw("xy"),
       {"key 'a': string of 100 bytes runs past the end (2 bytes remain) at byte 37"}},
      {"array longer than the file",
       Bytes{}.header(0, 1).str("a").u32(9).u32(4).u64(std::uint64_t{1} << 29).zeros(16),
       {"key 'a': array of 536870912 u32 needs at least 2147483648 bytes, 16 remain at byte 41"}},
      {"array over the element limit",
       Bytes{}.header(0, 1).str("a").u32(9).u32(0).u64(std::uint64_t{1} << 31),
       {"key 'a': array length 2147483648 exceeds the limit of 2^30 elements at byte 41"}},
      {"array element type",
       Bytes{}.header(0, 1).str("a").u32(9).u32(20).u64(1).zeros(8),
       {"key 'a': unknown array element type 20 at byte 37"}},
      {"nested too deep", nested(), {"key 'a': arrays nested deeper than 16 levels at byte 229"}},
      {"alignment type",
       Bytes{}.header(0, 1).str("general.alignment").u32(10).u64(64),
       {"key 'general.alignment' is u64, must be u32 at byte 24"}},
      {"alignment value",
       Bytes{}.header(0, 1).str("general.alignment").u32(4).u32(48),
       {"key 'general.alignment' = 48 is not a power of two at byte 24"}},
      {"empty tensor name",
       Bytes{}.header(1, 0).info("", {4}, 0, 0).zeros(32),
       {"tensor #0 has an empty name at byte 24"}},
      {"tensor name too long",
       Bytes{}.header(1, 0).info(std::string(64, 'n'), {4}, 0, 0).zeros(32),
       {"tensor #0: name", "is 64 bytes, ggml's limit is 63 at byte 24"}},
      {"n_dims 0",
       Bytes{}.header(1, 0).info("t", {}, 0, 0).zeros(32),
       {"tensor 't': n_dims = 0, must be 1 to 4 at byte 33"}},
      {"n_dims 5",
       Bytes{}.header(1, 0).info("t", {1, 1, 1, 1, 1}, 0, 0).zeros(32),
       {"tensor 't': n_dims = 5, must be 1 to 4 at byte 33"}},
      {"tensor name past the end",
       Bytes{}.header(1, 0).u64(100).zeros(30),
       {"tensor #0: name of 100 bytes runs past the end (30 bytes remain) at byte 24"}},
      {"ne negative",
       Bytes{}.header(1, 0).info("t", {std::uint64_t{1} << 63}, 0, 0).zeros(32),
       {"tensor 't': ne[0] = 9223372036854775808 is negative as int64 at byte 37"}},
      {"ne product overflows",
       Bytes{}.header(1, 0).info("t", {std::uint64_t{1} << 32, std::uint64_t{1} << 32}, 0, 0).zeros(32),
       {"tensor 't': the element count overflows at ne[1] = 4294967296 at byte 45"}},
      {"ne product past INT64_MAX",
       Bytes{}.header(1, 0).info("t", {std::uint64_t{1} << 62, 2}, 0, 0).zeros(32),
       {"tensor 't': 9223372036854775808 elements exceed INT64_MAX at byte 33"}},
      {"unknown ggml type",
       Bytes{}.header(1, 0).info("t", {4}, 99, 0).zeros(32),
       {"tensor 't': ggml type 99 (unknown 99) has no known layout at byte 45"}},
      {"removed ggml type",
       Bytes{}.header(1, 0).info("t", {4}, 31, 0).zeros(32),
       {"ggml type 31 (Q4_0_4_4 (removed from ggml)) has no known layout at byte 45"}},
      {"partial block",
       Bytes{}.header(1, 0).info("t", {33}, 8, 0).zeros(64),
       {"tensor 't': Q8_0 rows of 33 values are not whole blocks of 32 at byte 45"}},
      {"byte size overflows",
       Bytes{}.header(1, 0).info("t", {big}, 0, 0).zeros(32),
       {"tensor 't': the size in bytes overflows at byte 45"}},
      {"offset not aligned",
       Bytes{}.header(1, 0).info("t", {4}, 0, 4).zeros(7 + 64),
       {"tensor 't': data offset 4 is not a multiple of the alignment 32 at byte 49"}},
      {"data past the end",
       Bytes{}.header(1, 0).info("t", {4}, 0, 0).zeros(7 + 8),
       {"tensor 't': data [0, 0 + 16) runs past the end of the data section (8 bytes) at byte 49"}},
      {"data offset past the end",
       Bytes{}.header(1, 0).info("t", {4}, 0, 1u << 20).zeros(7 + 64),
       {"tensor 't': data [1048576, 1048576 + 16)", "(64 bytes) at byte 49"}},
      {"data section past the end",
       Bytes{}.header(1, 0).info("t", {4}, 0, 0),
       {"the data section would start at byte 64, past the end of the file (57 bytes) at byte 57"}},
      {"overlapping tensors",
       Bytes{}.header(2, 0).info("a", {16}, 0, 0).info("b", {4}, 0, 32).zeros(128),
       {"tensor 'b': data [32, 48) overlaps tensor 'a' [0, 64) at byte 82"}},
      {"duplicate tensor",
       Bytes{}.header(2, 0).info("a", {4}, 0, 0).info("a", {4}, 0, 32).zeros(128),
       {"duplicate tensor name 'a' (first at byte 24) at byte 57"}},
  };
  for (const auto& c : cases) {
    INFO(c.what);
    const auto msg = error_of<lora::FormatError>([&] { (void)parse(c.bytes); });
    CHECK_THAT(msg, Contains("bad.gguf: "));
    for (const auto& w : c.words) CHECK_THAT(msg, Contains(w));
  }
  // Sanity: the builders make valid files when nothing is wrong.
  CHECK(parse(Bytes{}.header(2, 0).info("a", {8}, 0, 0).info("b", {4}, 0, 32).zeros(7 + 64)).tensors().size() == 2);
  CHECK(parse(kv_u8(Bytes{}.header(0, 1), "a")).get<std::uint8_t>("a") == 1);
}

// ------------------------------------------------------------------------------ writer

TEST_CASE("GgufWriter writes gguf-py's bytes for the same KVs and tensors", "[gguf]") {
  SECTION("general.gguf from its values") {
    const json& e = expected()["general.gguf"];
    io::GgufWriter w;  // gguf-py's writer with arch "" adds no architecture
    for (const auto& kv : e["kvs"]) w.add(kv["key"].get<std::string>(), value_from_json(kv));
    CHECK(w.alignment() == 64);
    for (const auto& t : e["tensors"]) {
      const auto values = floats_of(t["source_bits"]);
      w.add_tensor(t["name"].get<std::string>(), t["shape"].get<std::vector<std::int64_t>>(), values,
                   ggml_type_from_name(t["type"]));
    }
    CHECK(w.to_bytes() == file_bytes(fixture("general.gguf")));
  }
  SECTION("every fixture rebuilt from what GgufFile read") {
    for (const char* name : {"general.gguf", "lora_mixed.gguf", "lora_f16.gguf", "lora_q8_0.gguf"}) {
      INFO(name);
      const auto f = io::GgufFile::open(fixture(name));
      io::GgufWriter w;
      for (const auto& kv : f.kvs()) w.add(kv.key, kv.value);
      for (const auto& t : f.tensors()) {
        const auto span = f.tensor_bytes(t.name);
        w.add_tensor_raw(t.name, t.ne, t.type, {span.begin(), span.end()});
      }
      CHECK(w.to_bytes() == file_bytes(fixture(name)));
    }
  }
  SECTION("a key added again keeps its place, as gguf-py's dict") {
    io::GgufWriter w("llama");
    w.add_uint32("a", 1);
    w.add_string("b", "x");
    w.add_uint32("a", 2);
    const auto f = io::GgufFile::from_bytes(w.to_bytes(), "w");
    CHECK(f.keys() == std::vector<std::string>{"general.architecture", "a", "b"});
    CHECK(f.get<std::uint32_t>("a") == 2);
  }
  SECTION("values convert only from their own types") {
    CHECK(GgufValue(5).type() == GgufValueType::INT32);
    CHECK(GgufValue(5u).type() == GgufValueType::UINT32);
    CHECK(GgufValue(std::uint8_t{5}).type() == GgufValueType::UINT8);
    CHECK(GgufValue("s").type() == GgufValueType::STRING);
    CHECK(GgufValue(true).type() == GgufValueType::BOOL);
    CHECK(GgufValue(1.5f).type() == GgufValueType::FLOAT32);
    CHECK(GgufValue(1.5).type() == GgufValueType::FLOAT64);
  }
  SECTION("empty strings and arrays are written (gguf-py drops them)") {
    io::GgufWriter w;
    w.add_string("s", "");
    w.add_array("a", std::vector<std::int32_t>{});
    const auto f = io::GgufFile::from_bytes(w.to_bytes(), "w");
    CHECK(f.get<std::string>("s").empty());
    CHECK(f.get<GgufArray>("a").element_type == GgufValueType::INT32);
    CHECK(f.get<GgufArray>("a").items.empty());
  }
}

TEST_CASE("GgufWriter::write goes through a temporary file and a rename", "[gguf]") {
  const auto dir = std::filesystem::temp_directory_path() / ("lora_gguf_write_" + std::to_string(::getpid()));
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  io::GgufWriter w("llama");
  w.add_tensor("t", {3}, std::vector<float>{1, 2, 3});
  w.write(dir / "a.gguf");
  w.write(dir / "a.gguf");  // over an existing file
  CHECK(file_bytes(dir / "a.gguf") == w.to_bytes());
  std::size_t files = 0;
  for (const auto& entry : std::filesystem::directory_iterator(dir)) {
    (void)entry;
    ++files;
  }
  CHECK(files == 1);  // no temporary left behind
  CHECK_THAT(error_of<lora::Error>([&] { w.write(dir / "no_such_dir" / "b.gguf"); }), Contains("b.gguf"));
  CHECK_FALSE(std::filesystem::exists(dir / "no_such_dir"));
  std::filesystem::remove_all(dir);
}

TEST_CASE("GgufWriter refuses what a GGUF reader would refuse", "[gguf]") {
  io::GgufWriter w;
  CHECK_THROWS_AS(w.add_uint8("", 1), lora::ValueError);
  CHECK_THAT(error_of<lora::ValueError>([&] { w.set_alignment(48); }), Contains("48 is not a power of two"));
  CHECK_THAT(error_of<lora::ValueError>([&] { w.add_uint64("general.alignment", 64); }), Contains("must be u32"));
  GgufArray mixed{GgufValueType::INT32, {GgufValue(std::int32_t{1}), GgufValue(std::string("x"))}};
  CHECK_THAT(error_of<lora::ValueError>([&] { w.add_array("m", mixed); }), Contains("an array of i32 holds a str"));
  const std::vector<float> v(33, 1.0f);
  CHECK_THAT(error_of<lora::ValueError>([&] { w.add_tensor("q", {33}, v, GgmlType::Q8_0); }),
             Contains("whole blocks of 32"));
  std::vector<float> nan(32, 0.0f);
  nan[3] = std::nanf("");
  CHECK_THAT(error_of<lora::ValueError>([&] { w.add_tensor("q", {32}, nan, GgmlType::Q8_0); }), Contains("non-finite"));
  CHECK_THROWS_AS(w.add_tensor("s", {2, 3}, v), lora::ShapeError);
  CHECK_THAT(error_of<lora::ValueError>(
                 [&] { w.add_tensor("k", {32}, std::span<const float>(v).subspan(0, 32), GgmlType::Q4_K); }),
             Contains("stores F32, F16, BF16 or Q8_0"));
  CHECK_THROWS_AS(w.add_tensor(std::string(64, 'n'), {1}, std::span<const float>(v).subspan(0, 1)), lora::ValueError);
  CHECK_THROWS_AS(w.add_tensor("", {1}, std::span<const float>(v).subspan(0, 1)), lora::ValueError);
  CHECK_THROWS_AS(w.add_tensor("five", {1, 1, 1, 1, 1}, std::span<const float>(v).subspan(0, 1)), lora::ValueError);
  w.add_tensor("t", {1}, std::span<const float>(v).subspan(0, 1));
  CHECK_THAT(error_of<lora::ValueError>([&] { w.add_tensor("t", {1}, std::span<const float>(v).subspan(0, 1)); }),
             Contains("duplicated tensor name 't'"));
  CHECK_THAT(error_of<lora::ValueError>([&] { w.add_tensor_raw("r", {4}, GgmlType::F16, std::vector<std::byte>(7)); }),
             Contains("7 bytes given, F16 of 4 elements takes 8"));
}

TEST_CASE("fp16 and bf16 conversions: every fp16 value, and agreement with Eigen's rounding", "[gguf]") {
  namespace gd = io::gguf_detail;
  for (std::uint32_t h = 0; h < 65536; ++h) {
    const auto h16 = static_cast<std::uint16_t>(h);
    const float f = gd::half_to_float(h16);
    const float eigen = static_cast<float>(Eigen::numext::bit_cast<Eigen::half>(h16));
    if (std::isnan(eigen)) {
      CHECK(std::isnan(f));
      CHECK(gd::float_to_half(f) == h16);  // payload round-trips (numpy keeps it)
    } else {
      CHECK(std::bit_cast<std::uint32_t>(f) == std::bit_cast<std::uint32_t>(eigen));
      CHECK(gd::float_to_half(f) == h16);
    }
  }
  // numpy keeps a signalling NaN a NaN by setting the lowest bit (0x7f800001 -> 0x7c01).
  CHECK(gd::float_to_half(std::bit_cast<float>(0x7f800001u)) == 0x7c01);
  CHECK(gd::float_to_half(std::bit_cast<float>(0x7fa00000u)) == 0x7d00);
  std::mt19937 rng(11);
  int checked = 0;
  for (int i = 0; i < 300000; ++i) {
    const float x = std::bit_cast<float>(static_cast<std::uint32_t>(rng()));
    if (std::isnan(x)) continue;
    ++checked;
    const auto want_h = Eigen::numext::bit_cast<std::uint16_t>(Eigen::half(x));
    const auto want_b = Eigen::numext::bit_cast<std::uint16_t>(Eigen::bfloat16(x));
    if (gd::float_to_half(x) != want_h || gd::float_to_bf16(x) != want_b) {
      FAIL("x bits " << std::bit_cast<std::uint32_t>(x));
    }
  }
  CHECK(checked > 290000);
  CHECK(gd::float_to_bf16(std::bit_cast<float>(0x7f800001u)) == 0x7fc0);  // ggml quiets a NaN
}

// ------------------------------------------------------------------------------ LoRA

TEST_CASE("load_gguf_lora reads the layout convert_lora_to_gguf.py writes", "[gguf]") {
  for (const char* name : {"lora_mixed.gguf", "lora_f16.gguf", "lora_q8_0.gguf"}) {
    INFO(name);
    const json& e = expected()[name];
    const auto a = io::load_gguf_lora(fixture(name));
    CHECK(a.alpha == e["alpha"].get<double>());
    CHECK(a.architecture == e["architecture"].get<std::string>());
    CHECK(a.metadata == std::map<std::string, std::string>{{"general.name", e["name"].get<std::string>()}});
    CHECK(a.alora_invocation_tokens.empty());
    REQUIRE(a.tensors.size() == e["tensors"].size());
    for (const auto& [base, t] : e["tensors"].items()) {
      INFO(base);
      REQUIRE(a.tensors.count(base) == 1);
      const auto& got = a.tensors.at(base);
      CHECK(got.rank() == t["rank"].get<lora::index_t>());
      CHECK(got.A.rows() == t["A_shape"][0].get<lora::index_t>());
      CHECK(got.A.cols() == t["A_shape"][1].get<lora::index_t>());
      CHECK(got.B.rows() == t["B_shape"][0].get<lora::index_t>());
      CHECK(bits_of(got.A) == t["A_bits"].get<std::vector<std::uint32_t>>());
      CHECK(bits_of(got.B) == t["B_bits"].get<std::vector<std::uint32_t>>());
      CHECK(a.scale(base) == t["scale"].get<double>());
      CHECK(io::hf_module_path(base) == t["module"].get<std::string>());
    }
    REQUIRE(a.extra_tensors.count("blk.1.ffn_norm.weight") == 1);
    CHECK(bits_of(a.extra_tensors.at("blk.1.ffn_norm.weight")) ==
          e["extra"]["blk.1.ffn_norm.weight"].get<std::vector<std::uint32_t>>());
  }
  const auto a = io::load_gguf_lora(fixture("lora_mixed.gguf"));
  CHECK(a.scale("blk.0.attn_q.weight") == 4.0);  // 16 / 4
  CHECK(a.scale("blk.1.ffn_up.weight") == 2.0);  // 16 / 8
  CHECK_THROWS_AS(a.scale("blk.9.attn_q.weight"), lora::ValueError);
  io::GgufLoraAdapter no_alpha = a;
  no_alpha.alpha = 0;
  CHECK(no_alpha.scale("blk.0.attn_q.weight") == 1.0);  // llama.cpp: alpha 0 -> the user's scale alone
}

TEST_CASE("The attn_q / attn_k B rows are in the converter's RoPE order", "[gguf]") {
  const json& e = expected()["lora_mixed.gguf"]["tensors"];
  const auto a = io::load_gguf_lora(fixture("lora_mixed.gguf"));
  for (const char* base : {"blk.0.attn_q.weight", "blk.0.attn_k.weight"}) {
    INFO(base);
    const json& t = e[base];
    const auto n_head = t["n_head"].get<lora::index_t>();
    const RowMatrix<float> hf = matrix_of(t["B_hf_bits"], t["B_shape"]);
    const RowMatrix<float> permuted = matrix_of(t["B_permuted_bits"], t["B_shape"]);
    CHECK(bits_of(a.tensors.at(base).B) == bits_of(permuted));  // stored F32: exact
    CHECK(bits_of(io::llama_rope_permute_rows(hf, n_head)) == bits_of(permuted));
    CHECK(bits_of(io::llama_rope_unpermute_rows(permuted, n_head)) == bits_of(hf));
    CHECK(bits_of(hf) != bits_of(permuted));  // the permutation is not the identity here
  }
  CHECK_THROWS_AS(io::llama_rope_permute_rows(RowMatrix<float>(10, 2), 2), lora::ShapeError);
  CHECK_THROWS_AS(io::llama_rope_permute_rows(RowMatrix<float>(8, 2), 0), lora::ShapeError);
}

TEST_CASE("save_gguf_lora writes the converter's bytes for --outtype f16 and q8_0", "[gguf]") {
  for (auto [name, type] : {std::pair{"lora_f16.gguf", GgmlType::F16}, std::pair{"lora_q8_0.gguf", GgmlType::Q8_0}}) {
    INFO(name);
    const auto a = io::load_gguf_lora(fixture(name));
    CHECK(io::gguf_lora_writer(a, type).to_bytes() == file_bytes(fixture(name)));
  }
}

TEST_CASE("save_gguf_lora / load_gguf_lora round trip", "[gguf]") {
  io::GgufLoraAdapter a;
  a.alpha = 12;
  a.architecture = "llama";
  a.metadata["general.name"] = "round trip";
  a.alora_invocation_tokens = {7, 8, 9};
  std::mt19937 rng(3);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  auto random = [&](lora::index_t r, lora::index_t c) {
    RowMatrix<float> m(r, c);
    for (lora::index_t i = 0; i < m.size(); ++i) m.data()[i] = u(rng);
    return m;
  };
  a.tensors["blk.0.attn_v.weight"] = {random(3, 37), random(11, 3)};
  a.tensors["blk.2.ffn_down.weight"] = {random(5, 64), random(7, 5)};
  a.tensors["token_embd.weight"] = {random(2, 9), random(6, 2)};
  a.extra_tensors["blk.0.attn_norm.weight"] = random(1, 6);
  const auto dir = std::filesystem::temp_directory_path() / ("lora_gguf_rt_" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);

  io::save_gguf_lora(a, dir / "a.gguf");
  const auto f = io::GgufFile::open(dir / "a.gguf");
  CHECK(f.keys() == std::vector<std::string>{"general.architecture", "general.type", "adapter.type", "general.name",
                                             "adapter.lora.alpha", "adapter.alora.invocation_tokens",
                                             "general.quantization_version"});
  CHECK(f.get<float>("adapter.lora.alpha") == 12.0f);
  CHECK(f.get<std::uint32_t>("general.quantization_version") == 2);
  CHECK(f.tensor("blk.0.attn_v.weight.lora_a").ne == std::vector<std::uint64_t>{37, 3});  // ggml [in, r]
  CHECK(f.tensor("blk.0.attn_v.weight.lora_b").ne == std::vector<std::uint64_t>{3, 11});  // ggml [r, out]
  CHECK(f.tensor("token_embd.weight.lora_a").ne == std::vector<std::uint64_t>{2, 9});     // A^T: [r, vocab]
  CHECK(f.tensor("token_embd.weight.lora_b").ne == std::vector<std::uint64_t>{2, 6});
  CHECK(f.tensor("blk.0.attn_norm.weight").ne == std::vector<std::uint64_t>{6});
  const auto b = io::load_gguf_lora(f);
  CHECK(b.alpha == a.alpha);
  CHECK(b.metadata == a.metadata);
  CHECK(b.alora_invocation_tokens == a.alora_invocation_tokens);
  for (const auto& [name, t] : a.tensors) {
    CHECK(bits_of(b.tensors.at(name).A) == bits_of(t.A));
    CHECK(bits_of(b.tensors.at(name).B) == bits_of(t.B));
  }
  CHECK(bits_of(b.extra_tensors.at("blk.0.attn_norm.weight")) == bits_of(a.extra_tensors.at("blk.0.attn_norm.weight")));

  // 16-bit storage rounds each value once, to nearest even (Eigen's conversions as reference)
  for (GgmlType type : {GgmlType::F16, GgmlType::BF16}) {
    const auto c = io::load_gguf_lora(io::GgufFile::from_bytes(io::gguf_lora_writer(a, type).to_bytes(), "mem"));
    for (const auto& [name, t] : a.tensors)
      for (lora::index_t i = 0; i < t.B.size(); ++i) {
        const float x = t.B.data()[i];
        const float want =
            type == GgmlType::F16 ? static_cast<float>(Eigen::half(x)) : static_cast<float>(Eigen::bfloat16(x));
        CHECK(c.tensors.at(name).B.data()[i] == want);
      }
  }
  // Q8_0 where rows are whole blocks (ffn_down's A: 64 = 2 blocks), F16 elsewhere. Error per value:
  // half a step, d / 2, plus d's own fp16 rounding (relative 2^-11) times |q| <= 127.
  const auto q = io::load_gguf_lora(io::GgufFile::from_bytes(io::gguf_lora_writer(a, GgmlType::Q8_0).to_bytes(), "q"));
  const auto qf = io::GgufFile::from_bytes(io::gguf_lora_writer(a, GgmlType::Q8_0).to_bytes(), "q");
  CHECK(qf.tensor("blk.2.ffn_down.weight.lora_a").type == GgmlType::Q8_0);
  CHECK(qf.tensor("blk.2.ffn_down.weight.lora_b").type == GgmlType::F16);
  const auto& A = a.tensors.at("blk.2.ffn_down.weight").A;
  const auto& Aq = q.tensors.at("blk.2.ffn_down.weight").A;
  for (lora::index_t r = 0; r < A.rows(); ++r)
    for (lora::index_t blk = 0; blk < 2; ++blk) {
      const float d = A.row(r).segment(32 * blk, 32).cwiseAbs().maxCoeff() / 127.0f;
      const float err = (A.row(r).segment(32 * blk, 32) - Aq.row(r).segment(32 * blk, 32)).cwiseAbs().maxCoeff();
      CHECK(err <= d * (0.5f + 127 * 0x1p-11f) * 1.001f);
      CHECK(err > 0.0f);
    }
  std::filesystem::remove_all(dir);
}

TEST_CASE("load_gguf_lora refuses what llama.cpp refuses, naming file, key or tensor and byte", "[gguf]") {
  auto base = [](std::string_view type = "adapter", std::string_view adapter = "lora") {
    io::GgufWriter w("llama");
    w.add_string("general.type", type);
    w.add_string("adapter.type", adapter);
    w.add_float32("adapter.lora.alpha", 8.0f);
    return w;
  };
  const std::vector<float> v(64, 0.5f);
  auto pair = [&](io::GgufWriter& w, const std::string& name, std::int64_t r_a, std::int64_t r_b) {
    w.add_tensor(name + ".lora_a", {r_a, 3}, std::span<const float>(v).subspan(0, static_cast<std::size_t>(3 * r_a)));
    w.add_tensor(name + ".lora_b", {5, r_b}, std::span<const float>(v).subspan(0, static_cast<std::size_t>(5 * r_b)));
  };
  struct Case {
    const char* what;
    io::GgufWriter w;
    std::vector<std::string> words;
  };
  std::vector<Case> cases;
  cases.push_back(
      {"general.type model", base("model"), {"key 'general.type' is 'model', expected 'adapter' (at byte 69)"}});
  cases.push_back({"adapter.type", base("adapter", "ia3"), {"key 'adapter.type' is 'ia3', expected 'lora'"}});
  {
    io::GgufWriter w;
    w.add_string("general.type", "adapter");
    w.add_string("adapter.type", "lora");
    cases.push_back({"no architecture", w, {"no key 'general.architecture'"}});
  }
  {
    io::GgufWriter w("llama");
    w.add_string("adapter.type", "lora");
    cases.push_back({"no general.type", w, {"no key 'general.type'"}});
  }
  {
    io::GgufWriter w = base();
    w.add_float64("adapter.lora.alpha", 8.0);
    cases.push_back({"alpha f64", w, {"key 'adapter.lora.alpha' is f64, must be f32 (at byte"}});
  }
  {
    io::GgufWriter w = base();
    w.add_float32("adapter.lora.alpha", std::numeric_limits<float>::infinity());
    cases.push_back({"alpha inf", w, {"'adapter.lora.alpha' = inf is not finite"}});
  }
  {
    io::GgufWriter w = base();
    w.add_array("adapter.alora.invocation_tokens", std::vector<std::int32_t>{1, 2});
    cases.push_back({"alora type", w, {"'adapter.alora.invocation_tokens' must be an array of u32"}});
  }
  {
    io::GgufWriter w = base();
    w.add_tensor("blk.0.attn_q.weight.lora_a", {2, 3}, std::span<const float>(v).subspan(0, 6));
    cases.push_back({"lora_a alone",
                     w,
                     {"tensor 'blk.0.attn_q.weight.lora_a' has no lora_b partner 'blk.0.attn_q.weight.lora_b' "
                      "(tensor info at byte"}});
  }
  {
    io::GgufWriter w = base();
    w.add_tensor("blk.0.attn_q.weight.lora_b", {5, 2}, std::span<const float>(v).subspan(0, 10));
    cases.push_back({"lora_b alone", w, {"'blk.0.attn_q.weight.lora_b' has no lora_a partner"}});
  }
  {
    io::GgufWriter w = base();
    pair(w, "blk.0.attn_q.weight", 2, 3);
    cases.push_back({"rank mismatch",
                     w,
                     {"tensor 'blk.0.attn_q.weight': rank 2 in blk.0.attn_q.weight.lora_a (ne [3, 2]) but 3 in "
                      "blk.0.attn_q.weight.lora_b (ne [3, 5])",
                      "(tensor info at byte"}});
  }
  {
    io::GgufWriter w = base();
    pair(w, "blk.0.attn_q.weight", 0, 0);
    cases.push_back({"rank 0", w, {"'blk.0.attn_q.weight' has rank 0"}});
  }
  {
    io::GgufWriter w = base();
    w.add_tensor("blk.0.attn_q.weight", {2, 3}, std::span<const float>(v).subspan(0, 6));
    cases.push_back({"not a LoRA tensor", w, {"tensor 'blk.0.attn_q.weight' has an unexpected suffix"}});
  }
  {
    io::GgufWriter w = base();
    w.add_tensor("blk.0.attn_q.weight.lora_a", {1, 2, 3}, std::span<const float>(v).subspan(0, 6));
    w.add_tensor("blk.0.attn_q.weight.lora_b", {5, 2}, std::span<const float>(v).subspan(0, 10));
    cases.push_back({"3-D factor", w, {"'blk.0.attn_q.weight.lora_a' has 3 dimensions, a LoRA factor has 2"}});
  }
  {
    io::GgufWriter w = base();
    w.add_tensor(".lora_a", {2, 3}, std::span<const float>(v).subspan(0, 6));
    cases.push_back({"no base name", w, {"tensor '.lora_a' names no base tensor"}});
  }
  for (auto& c : cases) {
    INFO(c.what);
    const auto f = io::GgufFile::from_bytes(c.w.to_bytes(), "adapter.gguf");
    const auto msg = error_of<lora::FormatError>([&] { (void)io::load_gguf_lora(f); });
    CHECK_THAT(msg, Contains("adapter.gguf: "));
    for (const auto& w : c.words) CHECK_THAT(msg, Contains(w));
  }
  {  // and a valid one built the same way loads
    io::GgufWriter w = base();
    pair(w, "blk.0.attn_q.weight", 2, 2);
    const auto a = io::load_gguf_lora(io::GgufFile::from_bytes(w.to_bytes(), "ok"));
    CHECK(a.scale("blk.0.attn_q.weight") == 4.0);
  }
}

TEST_CASE("save_gguf_lora refuses adapters llama.cpp could not load", "[gguf]") {
  io::GgufLoraAdapter a;
  a.architecture = "llama";
  a.alpha = 4;
  a.tensors["x.weight"] = {RowMatrix<float>::Ones(2, 3), RowMatrix<float>::Ones(4, 3)};
  CHECK_THAT(error_of<lora::RankError>([&] { (void)io::gguf_lora_writer(a); }), Contains("ranks must agree"));
  a.tensors["x.weight"].B = RowMatrix<float>::Ones(4, 2);
  CHECK_NOTHROW(io::gguf_lora_writer(a));
  a.metadata["adapter.lora.alpha"] = "9";
  CHECK_THROWS_AS(io::gguf_lora_writer(a), lora::ValueError);
  a.metadata.clear();
  CHECK_THROWS_AS(io::gguf_lora_writer(a, GgmlType::Q4_K), lora::ValueError);
  a.alpha = std::nan("");
  CHECK_THROWS_AS(io::gguf_lora_writer(a), lora::ValueError);
  a.alpha = 4;
  a.architecture.clear();
  CHECK_THROWS_AS(io::gguf_lora_writer(a), lora::ValueError);
}

// ------------------------------------------------------------------------------ names

TEST_CASE("llama name map: PEFT module paths <-> GGUF base tensor names (gguf-py's TensorNameMap)", "[gguf]") {
  const json& pairs = expected()["name_map"];
  REQUIRE(pairs.size() == 3 + 4 * 9);
  for (const auto& p : pairs) {
    const std::string hf = p[0], gg = p[1];
    INFO(hf);
    CHECK(io::gguf_tensor_name(hf) == gg);
    CHECK(io::gguf_tensor_name("base_model.model." + hf) == gg);
    CHECK(io::gguf_tensor_name(hf + ".weight") == gg);
    CHECK(io::hf_module_path(gg) == hf);
  }
  CHECK(io::gguf_tensor_name("model.layers.3.self_attn.q_proj") == "blk.3.attn_q.weight");
  CHECK(io::gguf_tensor_name("base_model.model.lm_head") == "output.weight");
  CHECK(io::hf_module_path("blk.17.ffn_down.weight") == "model.layers.17.mlp.down_proj");
  for (const char* bad : {"", "model.layers.x.self_attn.q_proj", "model.layers.03.self_attn.q_proj",
                          "model.layers.-1.mlp.up_proj", "model.layers.3.self_attn.q_proj.lora_A",
                          "model.layers.3.mlp.experts.0.up_proj", "model.layers.3", "model.layers..mlp.up_proj",
                          "model.layers.1234567890.mlp.up_proj", "base_model.model.", "model.embed_tokens.bias"})
    CHECK_FALSE(io::gguf_tensor_name(bad).has_value());
  for (const char* bad : {"", "blk.3.attn_q", "blk.3.attn_q.bias", "blk.x.attn_q.weight", "blk.03.attn_q.weight",
                          "blk.3.attn_q.weight.lora_a", "output.bias", "blk.3.ffn_gate_exps.weight"})
    CHECK_FALSE(io::hf_module_path(bad).has_value());
}

TEST_CASE("fold_scale puts a module's own scale into B under the file's alpha", "[gguf]") {
  std::mt19937 rng(5);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  auto random = [&](lora::index_t r, lora::index_t c) {
    RowMatrix<float> m(r, c);
    for (lora::index_t i = 0; i < m.size(); ++i) m.data()[i] = u(rng);
    return m;
  };
  const RowMatrix<float> A = random(8, 21), B = random(13, 8);
  const Eigen::MatrixXd BA = dense(B) * dense(A);
  const Eigen::MatrixXd magnitude = dense(B).cwiseAbs() * dense(A).cwiseAbs();

  SECTION("alpha_pattern: a power-of-two factor is exact") {
    const double module_scale = 32.0 / 8.0, file_alpha = 16.0;  // alpha 32 for this module, 16 in the file
    const auto t = io::fold_scale(A, B, module_scale, file_alpha);
    CHECK(bits_of(t.A) == bits_of(A));
    const Eigen::MatrixXd got = (file_alpha / 8.0) * (dense(t.B) * dense(t.A));
    CHECK((got - module_scale * BA).cwiseAbs().maxCoeff() == 0.0);
  }
  SECTION("rsLoRA: alpha / sqrt(r), within one float rounding of B'") {
    const double module_scale = 16.0 / std::sqrt(8.0), file_alpha = 16.0;
    const auto t = io::fold_scale(A, B, module_scale, file_alpha);
    const Eigen::MatrixXd got = (file_alpha / 8.0) * (dense(t.B) * dense(t.A));
    const Eigen::MatrixXd err = (got - module_scale * BA).cwiseAbs();
    const Eigen::MatrixXd bound = (module_scale * 0x1p-24) * magnitude;
    CHECK((err.array() <= bound.array() * 1.0000001).all());
    // without folding, llama.cpp would apply 2 instead of 5.66: far outside that bound
    const Eigen::MatrixXd unfolded = ((file_alpha / 8.0) * BA - module_scale * BA).cwiseAbs();
    CHECK(unfolded.maxCoeff() > 1000 * bound.maxCoeff());
  }
  SECTION("file alpha 0: llama.cpp's scale is 1") {
    const auto t = io::fold_scale(A, B, 0.75, 0.0);
    const Eigen::MatrixXd got = dense(t.B) * dense(t.A);
    CHECK(((got - 0.75 * BA).cwiseAbs().array() <= (0.75 * 0x1p-24 * magnitude).array() * 1.0000001).all());
  }
  SECTION("errors") {
    CHECK_THROWS_AS(io::fold_scale(A, random(13, 7), 1.0, 16.0), lora::RankError);
    CHECK_THROWS_AS(io::fold_scale(A, B, std::nan(""), 16.0), lora::ValueError);
    CHECK_THROWS_AS(io::fold_scale(A, B, 1.0, INFINITY), lora::ValueError);
  }
}
