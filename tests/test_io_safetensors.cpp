// Safetensors read / write (<lora/io/safetensors.hpp>) against files written by
// Python's safetensors (scripts/gen_safetensors_fixtures.py): exact values,
// exact conversions, zero-copy views, our writer's bytes equal to Python's,
// sharded checkpoints, and one malformed input per structural check.
#include <catch2/catch.hpp>

#include <lora/io/safetensors.hpp>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>

namespace fs = std::filesystem;
using lora::RowMatrix;
using lora::io::DType;
using lora::io::SafetensorsFile;
using lora::io::SafetensorsWriter;
using lora::io::ShardedSafetensors;
using json = nlohmann::json;

namespace {

fs::path fixture(const std::string& name) { return fs::path(LORA_TEST_FIXTURE_DIR) / "safetensors" / name; }

std::vector<std::byte> file_bytes(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  REQUIRE(in);
  std::vector<char> c((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::vector<std::byte> b(c.size());
  std::memcpy(b.data(), c.data(), c.size());
  return b;
}

const json& expected() {
  static const json e = [] {
    std::ifstream in(fixture("expected.json"));
    REQUIRE(in);
    return json::parse(in);
  }();
  return e;
}

double hexval(const json& s) { return std::strtod(s.get<std::string>().c_str(), nullptr); }

/// Decodes element i of a tensor's bytes to double, independently of the reader.
double element(DType d, std::span<const std::byte> b, std::size_t i) {
  switch (d) {
    case DType::F64: { double v; std::memcpy(&v, b.data() + 8 * i, 8); return v; }
    case DType::F32: { float v; std::memcpy(&v, b.data() + 4 * i, 4); return v; }
    case DType::F16: { std::uint16_t u; std::memcpy(&u, b.data() + 2 * i, 2); return double(Eigen::numext::bit_cast<Eigen::half>(u)); }
    case DType::BF16: { std::uint16_t u; std::memcpy(&u, b.data() + 2 * i, 2); return double(Eigen::numext::bit_cast<Eigen::bfloat16>(u)); }
    default: FAIL("not a float dtype"); return 0;
  }
}

bool is_nan_source(const json& hex) { return std::isnan(hexval(hex)); }

bool same(double a, double b) { return (std::isnan(a) && std::isnan(b)) || (a == b && std::signbit(a) == std::signbit(b)); }

template <class S>
std::uint32_t bits(S v) {
  if constexpr (sizeof(S) == 2) return Eigen::numext::bit_cast<std::uint16_t>(v);
  else if constexpr (sizeof(S) == 4) return std::bit_cast<std::uint32_t>(v);
}

/// A file from a header text and a data section of data_len bytes 0, 1, 2, ...
std::vector<std::byte> make_file(const std::string& header, std::size_t data_len) {
  std::vector<std::byte> b(8 + header.size() + data_len);
  const std::uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) b[i] = std::byte((n >> (8 * i)) & 0xff);
  std::memcpy(b.data() + 8, header.data(), header.size());
  for (std::size_t i = 0; i < data_len; ++i) b[8 + header.size() + i] = std::byte(i & 0xff);
  return b;
}

std::string message_of(std::vector<std::byte> bytes) {
  try {
    (void)SafetensorsFile::from_bytes(std::move(bytes), "case.safetensors");
  } catch (const lora::FormatError& e) {
    return e.what();
  }
  return "(no FormatError)";
}

/// Each test gets a fresh directory under the system's temp dir.
struct TempDir {
  fs::path path;
  TempDir() {
    std::random_device rd;
    path = fs::temp_directory_path() / ("lora_st_" + std::to_string(rd()) + std::to_string(rd()));
    fs::create_directories(path);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  std::vector<std::string> entries() const {
    std::vector<std::string> v;
    for (const auto& e : fs::directory_iterator(path)) v.push_back(e.path().filename().string());
    std::sort(v.begin(), v.end());
    return v;
  }
};

bool points_into(const void* p, std::span<const std::byte> range) {
  const auto* b = static_cast<const std::byte*>(p);
  return b >= range.data() && b < range.data() + range.size();
}

/// Re-adds every tensor of f to a writer (matrices through add / add_vector,
/// the rest raw), in reverse order to show the writer sorts.
SafetensorsWriter rewrite(const SafetensorsFile& f) {
  SafetensorsWriter w;
  for (const auto& [k, v] : f.metadata()) w.set_metadata(k, v);
  const auto& ts = f.tensors();
  for (auto it = ts.rbegin(); it != ts.rend(); ++it) {
    const auto& t = *it;
    const auto dense = [&]<class T>() {
      if (t.shape.size() == 2) w.add(t.name, f.read<T>(t.name), t.dtype);
      else if (t.shape.size() == 1) w.add_vector(t.name, f.read_vector<T>(t.name), t.dtype);
      else w.add_raw(t.name, t.dtype, t.shape, f.bytes(t.name));
    };
    switch (t.dtype) {
      case DType::F64: dense.template operator()<double>(); break;
      case DType::F32: dense.template operator()<float>(); break;
      case DType::F16: dense.template operator()<Eigen::half>(); break;
      case DType::BF16: dense.template operator()<Eigen::bfloat16>(); break;
      default: w.add_raw(t.name, t.dtype, t.shape, f.bytes(t.name));
    }
  }
  return w;
}

DType dtype_of_torch(const std::string& s) {
  static const std::map<std::string, DType> m{
      {"float64", DType::F64}, {"float32", DType::F32}, {"float16", DType::F16}, {"bfloat16", DType::BF16},
      {"int64", DType::I64},   {"int32", DType::I32},   {"int16", DType::I16},   {"int8", DType::I8},
      {"uint8", DType::U8},    {"bool", DType::BOOL},   {"float8_e4m3fn", DType::F8_E4M3},
      {"float8_e5m2", DType::F8_E5M2}};
  return m.at(s);
}

}  // namespace

TEST_CASE("dtype names, sizes, dtype_of", "[io][safetensors]") {
  for (const DType d : lora::io::all_dtypes) CHECK(lora::io::dtype_from_name(lora::io::dtype_name(d)) == d);
  CHECK(lora::io::dtype_name(DType::F8_E4M3) == "F8_E4M3");
  CHECK(lora::io::dtype_name(DType::BOOL) == "BOOL");
  CHECK(lora::io::dtype_size(DType::F64) == 8);
  CHECK(lora::io::dtype_size(DType::BF16) == 2);
  CHECK(lora::io::dtype_size(DType::F8_E5M2) == 1);
  CHECK_FALSE(lora::io::dtype_from_name("U32").has_value());
  CHECK_FALSE(lora::io::dtype_from_name("f32").has_value());
  static_assert(lora::io::dtype_of<float>() == DType::F32 && lora::io::dtype_of<double>() == DType::F64);
  static_assert(lora::io::dtype_of<Eigen::half>() == DType::F16 && lora::io::dtype_of<Eigen::bfloat16>() == DType::BF16);
  static_assert(lora::io::dtype_of<std::int32_t>() == DType::I32 && lora::io::dtype_of<const std::uint8_t>() == DType::U8);
}

TEST_CASE("reads Python's files: header, metadata, values exact", "[io][safetensors]") {
  for (const std::string file : {"basic", "numpy", "convert"}) {
    CAPTURE(file);
    const auto f = SafetensorsFile::open(fixture(file + ".safetensors"));
    CHECK(f.label() == fixture(file + ".safetensors").string());
    const json& exp = expected()[file];
    CHECK(f.tensors().size() == exp.size());
    if (file == "numpy") CHECK(f.metadata().empty());
    else CHECK(f.metadata() == std::map<std::string, std::string>{{"format", "pt"}});
    // Sorted by offset, and tiling the data section.
    std::uint64_t at = 0;
    for (const auto& t : f.tensors()) {
      CHECK(t.begin == at);
      at = t.end;
    }
    CHECK(f.data_offset() + at == f.file_bytes().size());
    CHECK(f.data_offset() % 8 == 0);

    for (auto it = exp.begin(); it != exp.end(); ++it) {
      const std::string& name = it.key();
      CAPTURE(name);
      REQUIRE(f.contains(name));
      const auto& t = f.info(name);
      CHECK(t.name == name);
      CHECK(t.dtype == dtype_of_torch((*it)["dtype"]));
      CHECK(t.shape == (*it)["shape"].get<std::vector<std::int64_t>>());
      CHECK(t.size_bytes() == std::uint64_t(t.numel()) * lora::io::dtype_size(t.dtype));
      const auto b = f.bytes(name);
      CHECK(b.size() == t.size_bytes());
      if (!lora::io::is_floating_dtype(t.dtype)) continue;
      const auto& values = (*it)["values"];
      REQUIRE(values.size() == std::size_t(t.numel()));
      for (std::size_t i = 0; i < values.size(); ++i) REQUIRE(same(element(t.dtype, b, i), hexval(values[i])));
      // read<double> is exact from every float dtype; read<float> exact from F32 / F16 / BF16.
      const auto non_unit = std::count_if(t.shape.begin(), t.shape.end(), [](auto d) { return d != 1; });
      if (non_unit <= 1) {
        const Eigen::VectorXd vd = f.read_vector<double>(name);
        const Eigen::VectorXf vf = f.read_vector<float>(name);
        REQUIRE(vd.size() == t.numel());
        for (Eigen::Index i = 0; i < vd.size(); ++i) {
          REQUIRE(same(vd(i), hexval(values[i])));
          REQUIRE(same(vf(i), double(static_cast<float>(hexval(values[i])))));
        }
      }
      if (t.shape.size() <= 2 || name == "conv" || name == "batched") {
        const RowMatrix<double> md = f.read<double>(name);
        const RowMatrix<float> mf = f.read<float>(name);
        REQUIRE(md.size() == t.numel());
        for (Eigen::Index i = 0; i < md.size(); ++i) {
          REQUIRE(same(md.data()[i], hexval(values[i])));
          if (t.dtype != DType::F64) REQUIRE(same(mf.data()[i], hexval(values[i])));
        }
      }
    }
  }
}

TEST_CASE("integer and fp8 tensors: views and bytes", "[io][safetensors]") {
  const auto f = SafetensorsFile::open(fixture("basic.safetensors"));
  const json& exp = expected()["basic"];
  const auto ids = f.view<std::int64_t>("ids");
  REQUIRE(ids.rows() == 1);
  REQUIRE(ids.cols() == 4);
  for (int i = 0; i < 4; ++i) CHECK(ids(0, i) == exp["ids"]["values"][i].get<std::int64_t>());
  const auto counts = f.view<std::int32_t>("counts");
  CHECK(counts(1, 0) == 3);
  CHECK(counts(1, 1) == 2147483647);
  CHECK(f.view<std::int16_t>("shorts")(0, 0) == -32768);
  CHECK(f.view<std::int8_t>("bytes_i8")(0, 0) == -128);
  CHECK(f.view<std::uint8_t>("bytes_u8")(0, 2) == 255);
  for (const std::string name : {"fp8_e4m3", "fp8_e5m2"}) {
    const auto b = f.bytes(name);
    const auto want = exp[name]["bytes"].get<std::vector<int>>();
    REQUIRE(b.size() == want.size());
    for (std::size_t i = 0; i < b.size(); ++i) CHECK(int(b[i]) == want[i]);
  }
  CHECK(f.info("mask").dtype == DType::BOOL);
  CHECK(int(f.bytes("mask")[1]) == 0);
  // Converting reads take float dtypes only.
  for (const std::string name : {"ids", "fp8_e4m3", "mask"}) {
    try {
      (void)f.read<float>(name);
      FAIL("read<float> of " << name << " did not throw");
    } catch (const lora::FormatError& e) {
      const std::string m = e.what();
      CHECK_THAT(m, Catch::Contains("basic.safetensors") && Catch::Contains("'" + name + "'") &&
                        Catch::Contains("converts from F64, F32, F16 and BF16"));
    }
  }
}

TEST_CASE("views are zero copy, shaped, and refuse what they cannot be", "[io][safetensors]") {
  auto f = SafetensorsFile::open(fixture("basic.safetensors"));
  const auto all = f.file_bytes();

  const auto w = f.view<float>("w_f32");
  CHECK(w.rows() == 3);
  CHECK(w.cols() == 5);
  CHECK(static_cast<const void*>(w.data()) == f.bytes("w_f32").data());
  CHECK(points_into(w.data(), all));
  CHECK(w(0, 2) == f.read<float>("w_f32")(0, 2));

  const auto bias = f.view<float>("b_f32");
  CHECK((bias.rows() == 1 && bias.cols() == 5));
  const auto sc = f.view<float>("scalar");
  CHECK((sc.rows() == 1 && sc.cols() == 1 && sc(0, 0) == 2.5f));
  const auto empty = f.view<float>("empty");
  CHECK((empty.rows() == 0 && empty.cols() == 3));
  CHECK((f.read<float>("empty").rows() == 0 && f.read<float>("empty").cols() == 3));
  const auto conv = f.view<float>("conv");  // [4, 3, 1, 1] -> [4, 3]
  CHECK((conv.rows() == 4 && conv.cols() == 3));
  const auto batched = f.view<float>("batched");  // [1, 2, 3] -> [2, 3]
  CHECK((batched.rows() == 2 && batched.cols() == 3));
  CHECK(batched(1, 2) == float(hexval(expected()["basic"]["batched"]["values"][5])));
  const auto col = f.view<float>("col_f32");
  CHECK((col.rows() == 4 && col.cols() == 1));
  CHECK(f.read_vector<float>("col_f32").size() == 4);

  const auto expect_error = [&](auto&& fn, std::vector<std::string> words) {
    try {
      fn();
      FAIL("no FormatError");
    } catch (const lora::FormatError& e) {
      const std::string m = e.what();
      CAPTURE(m);
      CHECK_THAT(m, Catch::Contains("basic.safetensors"));
      for (const auto& word : words) CHECK_THAT(m, Catch::Contains(word));
    }
  };
  expect_error([&] { (void)f.view<float>("w_bf16"); }, {"'w_bf16'", "BF16", "F32", "view<float>", "read<float>"});
  expect_error([&] { (void)f.view<double>("w_f32"); }, {"'w_f32'", "F32", "F64", "read<double>"});
  expect_error([&] { (void)f.view<float>("cube"); }, {"'cube'", "[2, 2, 2]"});
  expect_error([&] { (void)f.read<float>("cube"); }, {"'cube'", "[2, 2, 2]", "read<T>"});
  expect_error([&] { (void)f.read_vector<float>("w_f32"); }, {"'w_f32'", "[3, 5]", "read_vector<float>"});
  expect_error([&] { (void)f.info("nope"); }, {"'nope'", "no tensor"});
  expect_error([&] { (void)f.view<float>("nope"); }, {"'nope'"});
  CHECK_FALSE(f.contains("nope"));

  // Moving the file keeps every view valid: the mapping does not move.
  const auto wb = f.view<Eigen::bfloat16>("w_bf16");
  SafetensorsFile moved = std::move(f);
  CHECK(moved.view<Eigen::bfloat16>("w_bf16").data() == wb.data());
  CHECK(float(wb(32, 18)) == moved.read<float>("w_bf16")(32, 18));
}

TEST_CASE("a bf16 view is the frozen base of an AdaptedLinear, no copy", "[io][safetensors]") {
  const auto f = SafetensorsFile::open(fixture("basic.safetensors"));
  const Eigen::Map<const RowMatrix<Eigen::bfloat16>> W = f.view<Eigen::bfloat16>("w_bf16");  // [33, 19]
  lora::LowRankDelta<float, 4> delta{33, 19, {.alpha = 8}};
  std::mt19937 rng(5);
  std::uniform_real_distribution<float> u(-1, 1);
  for (Eigen::Index i = 0; i < delta.A().size(); ++i) delta.A().data()[i] = u(rng);
  for (Eigen::Index i = 0; i < delta.B().size(); ++i) delta.B().data()[i] = u(rng);
  lora::AdaptedLinear layer{W, delta};
  CHECK(static_cast<const void*>(&layer.base_weight().coeffRef(0, 0)) == f.bytes("w_bf16").data());
  RowMatrix<float> X(5, 19);
  for (Eigen::Index i = 0; i < X.size(); ++i) X.data()[i] = u(rng);
  const RowMatrix<float> Y = layer.forward(X);
  // Dense reference in double from the file's exact values.
  const RowMatrix<double> Wd = f.read<double>("w_bf16");
  const RowMatrix<double> ref = X.cast<double>() * (Wd + double(delta.scale()) * delta.B().cast<double>() *
                                                             delta.A().cast<double>()).transpose();
  CHECK((Y.cast<double>() - ref).cwiseAbs().maxCoeff() <= 1e-5 * (1 + ref.cwiseAbs().maxCoeff()));
}

TEST_CASE("misaligned data: view refuses and names read<T>, read copies", "[io][safetensors]") {
  // A header whose length is not a multiple of 8 (Python never writes one):
  // the data section starts at an odd offset.
  std::string header = R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
  while ((8 + header.size()) % 4 != 1) header += ' ';
  auto bytes = make_file(header, 8);
  const float vals[2] = {1.5f, -2.25f};
  std::memcpy(bytes.data() + 8 + header.size(), vals, 8);
  const auto f = SafetensorsFile::from_bytes(std::move(bytes), "odd.safetensors");
  try {
    (void)f.view<float>("a");
    FAIL("misaligned view did not throw");
  } catch (const lora::FormatError& e) {
    const std::string m = e.what();
    CHECK_THAT(m, Catch::Contains("odd.safetensors") && Catch::Contains("'a'") && Catch::Contains("aligned") &&
                      Catch::Contains("read<float>") && Catch::Contains("file offset " + std::to_string(8 + header.size())));
  }
  const RowMatrix<float> a = f.read<float>("a");
  CHECK(a(0, 0) == 1.5f);
  CHECK(a(0, 1) == -2.25f);
}

TEST_CASE("conversions: bits equal torch / numpy / the rational reference", "[io][safetensors]") {
  const auto f = SafetensorsFile::open(fixture("convert.safetensors"));
  const json& c = expected()["convert"];
  const auto check_read = [&]<class T>(const std::string& src, const std::string& key) {
    CAPTURE(src, key);
    const auto want = c[src][key].get<std::vector<std::uint32_t>>();
    const auto got = f.read_vector<T>(src);
    REQUIRE(std::size_t(got.size()) == want.size());
    const auto m = f.read<T>(src);  // [1, n]: same conversion
    for (std::size_t i = 0; i < want.size(); ++i) {
      CAPTURE(i, c[src]["values"][i].get<std::string>());
      if (is_nan_source(c[src]["values"][i])) {  // NaN bits differ between peers (torch: 0xffff); NaN it must be
        CHECK(std::isnan(double(got(i))));
        continue;
      }
      CHECK(bits(got(i)) == want[i]);
      CHECK(bits(m(0, i)) == want[i]);
    }
  };
  check_read.template operator()<Eigen::bfloat16>("src_f32", "to_bf16");
  check_read.template operator()<Eigen::half>("src_f32", "to_f16");
  check_read.template operator()<float>("src_f64", "to_f32");
  check_read.template operator()<Eigen::half>("src_f64", "to_f16");
  check_read.template operator()<Eigen::bfloat16>("src_f64", "to_bf16");
  check_read.template operator()<Eigen::bfloat16>("src_f16", "to_bf16");
  check_read.template operator()<Eigen::half>("src_bf16", "to_f16");
  // The double-rounding traps differ from torch's f64 -> bf16 (f64 -> f32 -> bf16):
  const auto ours = c["src_f64"]["to_bf16"].get<std::vector<int>>();
  const auto torchs = c["src_f64"]["torch_to_bf16"].get<std::vector<int>>();
  CHECK(ours != torchs);

  // The writer rounds the same way: add_vector(source, stored) gives the same bits.
  const auto check_write = [&]<class S>(const std::string& src, const std::string& key, DType stored) {
    CAPTURE(src, key);
    SafetensorsWriter w;
    w.add_vector("v", f.read_vector<S>(src), stored);
    const auto back = SafetensorsFile::from_bytes(w.to_bytes());
    const auto b = back.bytes("v");
    const auto want = c[src][key].get<std::vector<std::uint32_t>>();
    const std::size_t es = lora::io::dtype_size(stored);
    REQUIRE(b.size() == want.size() * es);
    for (std::size_t i = 0; i < want.size(); ++i) {
      CAPTURE(i);
      if (is_nan_source(c[src]["values"][i])) {
        CHECK(std::isnan(element(stored, b, i)));
        continue;
      }
      std::uint32_t got = 0;
      std::memcpy(&got, b.data() + i * es, es);
      CHECK(got == want[i]);
    }
  };
  check_write.template operator()<float>("src_f32", "to_bf16", DType::BF16);
  check_write.template operator()<float>("src_f32", "to_f16", DType::F16);
  check_write.template operator()<double>("src_f64", "to_f32", DType::F32);
  check_write.template operator()<double>("src_f64", "to_f16", DType::F16);
  check_write.template operator()<double>("src_f64", "to_bf16", DType::BF16);
  check_write.template operator()<Eigen::half>("src_f16", "to_bf16", DType::BF16);
  check_write.template operator()<Eigen::bfloat16>("src_bf16", "to_f16", DType::F16);
}

TEST_CASE("writer: bytes equal Python's for the same tensors and metadata", "[io][safetensors]") {
  for (const std::string file : {"basic.safetensors", "numpy.safetensors", "convert.safetensors",
                                 "sharded/model-00001-of-00002.safetensors",
                                 "sharded/model-00002-of-00002.safetensors"}) {
    CAPTURE(file);
    const auto f = SafetensorsFile::open(fixture(file));
    const SafetensorsWriter w = rewrite(f);
    const auto ours = w.to_bytes();
    const auto python = file_bytes(fixture(file));
    REQUIRE(ours.size() == python.size());
    CHECK(std::memcmp(ours.data(), python.data(), ours.size()) == 0);
    if (ours != python) {  // show the headers
      const auto n = f.data_offset();
      WARN(std::string(reinterpret_cast<const char*>(ours.data()) + 8, n - 8));
    }
    // write() produces the same file, and leaves nothing else in the directory.
    TempDir dir;
    const fs::path out = dir.path / "out.safetensors";
    w.write(out);
    CHECK(file_bytes(out) == python);
    CHECK(dir.entries() == std::vector<std::string>{"out.safetensors"});
  }
}

TEST_CASE("writer: round trips, storage orders, expressions", "[io][safetensors]") {
  RowMatrix<float> m(3, 4);
  for (Eigen::Index i = 0; i < m.size(); ++i) m.data()[i] = 0.1f * float(i) - 0.37f;
  const Eigen::MatrixXf col = m;  // column-major, same values
  Eigen::VectorXd v(5);
  v << 1, -2, 3.5, 1e-3, 7;

  SafetensorsWriter w;
  w.set_metadata("format", "pt");
  w.set_metadata("note", "tab\there \"quoted\" \xc3\xbc");
  w.add("row", m, DType::F32);
  w.add("col", col, DType::F32);
  w.add("twice", 2 * m, DType::F64);  // an expression
  w.add("prod", m * col.transpose(), DType::F32);
  w.add("t", m.transpose(), DType::F32);
  w.add("bf", m, DType::BF16);
  w.add("h", m.cast<double>(), DType::F16);
  w.add_vector("v", v, DType::F64);
  w.add_vector("vrow", v.transpose(), DType::F32);
  const std::int32_t ints[3] = {1, -2, 3};
  w.add_raw("ints", DType::I32, {3, 1}, std::as_bytes(std::span(ints)));
  w.add_raw("empty", DType::F16, {0, 7}, {});
  CHECK(w.size() == 11);
  CHECK(w.contains("bf"));

  const auto f = SafetensorsFile::from_bytes(w.to_bytes(), "roundtrip");
  CHECK(f.metadata() == w.metadata());
  CHECK(f.read<float>("row") == m);
  CHECK(f.read<float>("col") == m);
  CHECK(f.bytes("col").size() == f.bytes("row").size());
  CHECK(std::memcmp(f.bytes("col").data(), f.bytes("row").data(), f.bytes("row").size()) == 0);
  CHECK(f.read<double>("twice") == (2 * m).cast<double>());
  const RowMatrix<float> prod = m * col.transpose();
  CHECK(f.read<float>("prod") == prod);
  CHECK(f.read<float>("t") == RowMatrix<float>(m.transpose()));
  CHECK(f.info("t").shape == std::vector<std::int64_t>{4, 3});
  CHECK(f.read<Eigen::bfloat16>("bf") == m.cast<Eigen::bfloat16>());  // Eigen's cast rounds to nearest even too
  CHECK(f.read<Eigen::half>("h") == m.cast<Eigen::half>());           // float values: one rounding either way
  CHECK(f.read_vector<double>("v") == v);
  CHECK(f.info("v").shape == std::vector<std::int64_t>{5});
  CHECK(f.read_vector<float>("vrow") == v.cast<float>());
  CHECK(f.view<std::int32_t>("ints")(2, 0) == 3);
  CHECK(f.info("empty").shape == std::vector<std::int64_t>{0, 7});
  CHECK(f.info("empty").size_bytes() == 0);

  // Errors: named, typed, nothing added.
  CHECK_THROWS_AS(w.add("row", m, DType::F32), lora::ValueError);
  CHECK_THROWS_AS(w.add("i", m, DType::I32), lora::ValueError);
  CHECK_THROWS_AS(w.add("__metadata__", m, DType::F32), lora::ValueError);
  CHECK_THROWS_AS(w.add("bad\xff", m, DType::F32), lora::ValueError);
  CHECK_THROWS_AS(w.add_vector("mat", m, DType::F32), lora::ShapeError);
  CHECK_THROWS_AS(w.add_raw("short", DType::F32, {2, 2}, std::as_bytes(std::span(ints))), lora::ShapeError);
  CHECK_THROWS_AS(w.add_raw("neg", DType::F32, {-1}, {}), lora::ShapeError);
  CHECK_THROWS_AS(w.set_metadata("k", "\xc0\xaf"), lora::ValueError);
  try {
    w.add_raw("short", DType::F32, {2, 2}, std::as_bytes(std::span(ints)));
  } catch (const lora::ShapeError& e) {
    CHECK_THAT(std::string(e.what()), Catch::Contains("'short'") && Catch::Contains("12 bytes") &&
                                          Catch::Contains("needs 16"));
  }
  CHECK(w.size() == 11);

  // An empty writer is a valid empty file ("{}" and 6 spaces).
  const auto empty = SafetensorsWriter().to_bytes();
  CHECK(empty.size() == 16);
  CHECK(SafetensorsFile::from_bytes(empty).tensors().empty());
}

TEST_CASE("writer: write() replaces whole files and fails cleanly", "[io][safetensors]") {
  TempDir dir;
  SafetensorsWriter w;
  w.add("a", RowMatrix<float>::Constant(2, 2, 1.0f), DType::F32);
  const fs::path out = dir.path / "model.safetensors";
  {
    std::ofstream old(out);
    old << "old contents";
  }
  w.write(out);
  CHECK(file_bytes(out) == w.to_bytes());
  CHECK(dir.entries() == std::vector<std::string>{"model.safetensors"});

  // Overwrite while a SafetensorsFile maps it: the mapping keeps the old inode.
  const auto open_file = SafetensorsFile::open(out);
  const auto view = open_file.view<float>("a");
  SafetensorsWriter w2;
  w2.add("b", RowMatrix<float>::Constant(1, 3, 2.0f), DType::F32);
  w2.write(out);
  CHECK(view(1, 1) == 1.0f);
  CHECK(SafetensorsFile::open(out).contains("b"));

  // A missing directory: lora::Error naming the path, no file anywhere.
  const fs::path missing = dir.path / "no_such_dir" / "out.safetensors";
  try {
    w.write(missing);
    FAIL("write into a missing directory did not throw");
  } catch (const lora::Error& e) {
    CHECK_THAT(std::string(e.what()), Catch::Contains(missing.string()));
  }
  CHECK_FALSE(fs::exists(missing));
  CHECK_FALSE(fs::exists(missing.parent_path()));
  // The target is a directory: the rename fails, the temporary file is removed.
  fs::create_directory(dir.path / "adir");
  CHECK_THROWS_AS(w.write(dir.path / "adir"), lora::Error);
  CHECK(dir.entries() == std::vector<std::string>{"adir", "model.safetensors"});
  CHECK(fs::is_empty(dir.path / "adir"));

  // Opening: I/O errors are lora::Error naming the path.
  try {
    (void)SafetensorsFile::open(missing);
    FAIL("open of a missing file did not throw");
  } catch (const lora::Error& e) {
    CHECK_THAT(std::string(e.what()), Catch::Contains(missing.string()));
  }
  CHECK_THROWS_AS(SafetensorsFile::open(dir.path / "adir"), lora::Error);
  // An empty file is a FormatError, not a failed mmap.
  { std::ofstream(dir.path / "empty.safetensors"); }
  CHECK_THROWS_AS(SafetensorsFile::open(dir.path / "empty.safetensors"), lora::FormatError);
}

TEST_CASE("sharded checkpoints: index, lookups across shards", "[io][safetensors]") {
  const auto s = ShardedSafetensors::open(fixture("sharded/model.safetensors.index.json"));
  const json& exp = expected()["sharded"];
  std::vector<std::string> names;
  for (auto it = exp.begin(); it != exp.end(); ++it) names.push_back(it.key());
  CHECK(s.names() == names);  // sorted
  CHECK(s.shards().size() == 2);
  CHECK(s.metadata()["total_size"] == 296);
  for (const auto& name : names) {
    CAPTURE(name);
    CHECK(s.contains(name));
    const auto& t = s.info(name);
    CHECK(t.dtype == dtype_of_torch(exp[name]["dtype"]));
    const RowMatrix<double> m = s.read<double>(name);
    for (Eigen::Index i = 0; i < m.size(); ++i) CHECK(same(m.data()[i], hexval(exp[name]["values"][i])));
  }
  const auto w1 = s.view<Eigen::bfloat16>("model.layers.1.q_proj.weight");
  CHECK((w1.rows() == 6 && w1.cols() == 4));
  const auto& shard = s.file_of("model.layers.1.q_proj.weight");
  CHECK_THAT(shard.label(), Catch::Contains("model-00002-of-00002.safetensors"));
  CHECK(points_into(w1.data(), shard.file_bytes()));
  CHECK(s.read_vector<float>("model.layers.0.q_proj.bias").size() == 6);
  CHECK_FALSE(s.contains("nope"));
  try {
    (void)s.info("nope");
    FAIL("no throw");
  } catch (const lora::FormatError& e) {
    CHECK_THAT(std::string(e.what()), Catch::Contains("model.safetensors.index.json") && Catch::Contains("'nope'"));
  }
}

TEST_CASE("sharded checkpoints: malformed indexes", "[io][safetensors]") {
  TempDir dir;
  fs::copy_file(fixture("sharded/model-00001-of-00002.safetensors"), dir.path / "a.safetensors");
  const auto index_error = [&](const std::string& text, std::vector<std::string> words, bool format = true) {
    CAPTURE(text);
    const fs::path p = dir.path / "model.safetensors.index.json";
    { std::ofstream(p) << text; }
    try {
      (void)ShardedSafetensors::open(p);
      FAIL("no throw");
    } catch (const lora::FormatError& e) {
      CHECK(format);
      const std::string m = e.what();
      CAPTURE(m);
      CHECK_THAT(m, Catch::Contains("model.safetensors.index.json") || Catch::Contains("missing.safetensors"));
      for (const auto& w : words) CHECK_THAT(m, Catch::Contains(w));
    } catch (const lora::Error& e) {
      CHECK_FALSE(format);
      const std::string m = e.what();
      for (const auto& w : words) CHECK_THAT(m, Catch::Contains(w));
    }
  };
  index_error(R"({"metadata": {}})", {"weight_map"});
  index_error(R"([1])", {"not an object"});
  index_error(R"({"weight_map": [1]})", {"weight_map", "array"});
  index_error(R"({"weight_map": {"model.embed.weight": 3}})", {"'model.embed.weight'", "not a file name"});
  index_error(R"({"weight_map": {"x": "a.safetensors"}})", {"'x'", "no such tensor", "a.safetensors"});
  index_error(R"({"weight_map": {"model.embed.weight": "../a.safetensors"}})", {"'../a.safetensors'", "inside"});
  index_error(R"({"weight_map": {"model.embed.weight": "/etc/passwd"}})", {"inside"});
  index_error(R"({"weight_map": {"model.embed.weight": "a.safetensors", "model.embed.weight": "a.safetensors"}})",
              {"duplicate key 'model.embed.weight'"});
  index_error(R"({"weight_map": {"model.embed.weight": "missing.safetensors"}})", {"missing.safetensors"}, false);
  index_error(R"({"weight_map": )", {"not valid JSON"});
  // A valid one over the copied shard.
  { std::ofstream(dir.path / "ok.json") << R"({"weight_map": {"model.embed.weight": "a.safetensors"}})"; }
  const auto s = ShardedSafetensors::open(dir.path / "ok.json");
  CHECK(s.names() == std::vector<std::string>{"model.embed.weight"});
  CHECK(s.read<float>("model.embed.weight").rows() == 5);
}

TEST_CASE("malformed files: one FormatError per structural check", "[io][safetensors]") {
  struct Case {
    const char* what;
    std::vector<std::byte> bytes;
    std::vector<std::string> words;  // each must be in the message, with the label
  };
  const auto raw = [](std::initializer_list<int> v) {
    std::vector<std::byte> b;
    for (int x : v) b.push_back(std::byte(x));
    return b;
  };
  const auto with_length = [](std::uint64_t n, std::size_t total) {
    std::vector<std::byte> b(total, std::byte{' '});
    for (int i = 0; i < 8; ++i) b[i] = std::byte((n >> (8 * i)) & 0xff);
    return b;
  };
  // Entry "w" at header offset 1: its key ends at file offset 8 + 4 = 12.
  const auto one = [](const std::string& entry, std::size_t data) { return make_file("{\"w\":" + entry + "}", data); };
  const std::vector<Case> cases = {
      {"shorter than 8 bytes", raw({1, 2, 3, 4, 5}), {"5 bytes", "offset 0"}},
      {"header length above 100 MB", with_length(100'000'001, 16), {"100000001", "exceeds", "100000000", "offset 0"}},
      {"header length beyond the file", with_length(100, 18), {"100", "runs past the end of the file", "offset 0"}},
      {"invalid UTF-8", make_file("{\"w\xff\":1}", 0), {"not valid UTF-8", "file offset 11"}},
      {"invalid UTF-8 (overlong)", make_file("{\"\xc0\xaf\":1}", 0), {"not valid UTF-8", "file offset 10"}},
      {"invalid JSON", make_file("{\"w\": }", 0), {"not valid JSON", "file offset 14"}},
      {"empty header", make_file("", 0), {"not valid JSON", "file offset 8"}},
      {"header not an object", make_file("[1,2]", 0), {"array", "not a JSON object"}},
      {"entry not an object", one("3", 0), {"tensor 'w'", "number", "not a JSON object", "file offset 12"}},
      {"missing dtype", one(R"({"shape":[1],"data_offsets":[0,4]})", 4), {"tensor 'w'", "no \"dtype\"", "file offset 12"}},
      {"missing shape", one(R"({"dtype":"F32","data_offsets":[0,4]})", 4), {"tensor 'w'", "no \"shape\"", "file offset 12"}},
      {"missing data_offsets", one(R"({"dtype":"F32","shape":[1]})", 4), {"tensor 'w'", "no \"data_offsets\"", "file offset 12"}},
      {"dtype not a string", one(R"({"dtype":4,"shape":[1],"data_offsets":[0,4]})", 4), {"tensor 'w'", "dtype is a JSON number"}},
      {"unknown dtype", one(R"({"dtype":"U32","shape":[1],"data_offsets":[0,4]})", 4), {"tensor 'w'", "unknown dtype \"U32\"", "file offset 12"}},
      {"negative shape", one(R"({"dtype":"F32","shape":[2,-1],"data_offsets":[0,4]})", 4), {"tensor 'w'", "shape[1] -1 is negative", "file offset 12"}},
      {"non-integer shape", one(R"({"dtype":"F32","shape":[2.5],"data_offsets":[0,4]})", 4), {"tensor 'w'", "shape[0] 2.5 is not an integer"}},
      {"string shape", one(R"({"dtype":"F32","shape":["2"],"data_offsets":[0,4]})", 4), {"tensor 'w'", "shape[0] is a JSON string"}},
      {"shape not an array", one(R"({"dtype":"F32","shape":2,"data_offsets":[0,4]})", 4), {"tensor 'w'", "not an array"}},
      {"element count overflow", one(R"({"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,4]})", 4), {"tensor 'w'", "overflows", "file offset 12"}},
      {"byte size overflow", one(R"({"dtype":"F32","shape":[4611686018427387904],"data_offsets":[0,4]})", 4), {"tensor 'w'", "byte size overflows"}},
      {"huge dim", one(R"({"dtype":"U8","shape":[18446744073709551615],"data_offsets":[0,4]})", 4), {"tensor 'w'", "overflows"}},
      {"data_offsets not two", one(R"({"dtype":"F32","shape":[1],"data_offsets":[0]})", 4), {"tensor 'w'", "not two integers"}},
      {"data_offsets not integers", one(R"({"dtype":"F32","shape":[1],"data_offsets":[0,"4"]})", 4), {"tensor 'w'", "data_offsets[1] is a JSON string"}},
      {"data_offsets negative", one(R"({"dtype":"F32","shape":[1],"data_offsets":[-4,0]})", 4), {"tensor 'w'", "data_offsets[0] -4 is negative"}},
      {"data_offsets reversed", one(R"({"dtype":"F32","shape":[1],"data_offsets":[8,4]})", 8), {"tensor 'w'", "[8, 4)", "not ordered"}},
      {"size != numel * dtype size", one(R"({"dtype":"F32","shape":[2],"data_offsets":[0,4]})", 4), {"tensor 'w'", "hold 4 bytes", "needs 8", "file offset 12"}},
      {"end beyond the data section", one(R"({"dtype":"F32","shape":[2],"data_offsets":[0,8]})", 4), {"tensor 'w'", "past the end of the data section", "4 bytes"}},
      {"overlap", make_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})", 12), {"tensor 'b'", "overlap tensor 'a'"}},
      {"gap", make_file(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}})", 12), {"gap", "[4, 8)", "before tensor 'b'", "contiguously"}},
      {"first tensor not at 0", one(R"({"dtype":"F32","shape":[1],"data_offsets":[4,8]})", 8), {"gap", "[0, 4)", "before tensor 'w'"}},
      {"trailing bytes", one(R"({"dtype":"F32","shape":[1],"data_offsets":[0,4]})", 8), {"trailing bytes", "cover 4", "is 8 bytes"}},
      {"duplicate tensor", make_file(R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})", 4), {"duplicate key 'w'", "in the header"}},
      {"duplicate field", one(R"({"dtype":"F32","dtype":"F16","shape":[1],"data_offsets":[0,4]})", 4), {"duplicate key 'dtype'", "entry of 'w'"}},
      {"__metadata__ value not a string", make_file(R"({"__metadata__":{"a":1}})", 0), {"__metadata__ value of 'a'", "number", "strings only", "file offset 23"}},
      {"__metadata__ not an object", make_file(R"({"__metadata__":["a"]})", 0), {"__metadata__", "array", "not an object"}},
  };
  for (const auto& c : cases) {
    CAPTURE(c.what);
    const std::string m = message_of(c.bytes);
    CAPTURE(m);
    CHECK_THAT(m, Catch::Contains("safetensors 'case.safetensors'"));
    for (const auto& w : c.words) CHECK_THAT(m, Catch::Contains(w));
  }

  // Accepted edge cases: an empty file of tensors, null metadata, an empty
  // tensor sharing its offset, padding spaces, unknown entry fields (as serde).
  CHECK(SafetensorsFile::from_bytes(make_file("{}", 0)).tensors().empty());
  CHECK(SafetensorsFile::from_bytes(make_file(R"({"__metadata__":null})", 0)).metadata().empty());
  const auto edge = SafetensorsFile::from_bytes(make_file(
      R"(  {"e":{"dtype":"F32","shape":[0],"data_offsets":[0,0]},"w":{"dtype":"U8","shape":[2],"data_offsets":[0,2],"x":{"y":[1]}}}   )",
      2));
  CHECK(edge.tensors().size() == 2);
  CHECK(edge.tensors()[0].name == "e");
  CHECK(edge.view<std::uint8_t>("w")(0, 1) == 1);
}
