// PEFT adapter import / export (<lora/io/peft.hpp>) against adapters written by
// PEFT itself (tests/fixtures/peft, scripts/gen_peft_fixtures.py): every module's
// forward and the whole tiny model's output equal PEFT's, save_peft writes
// PEFT's bytes, and every malformed input is a typed error naming what is wrong.
#include <catch2/catch.hpp>

#include <lora/io/peft_dora.hpp>

#include <atomic>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <random>
#include <set>
#include <string>
#include <vector>

namespace fs = std::filesystem;
using lora::RowMatrix;
using lora::io::DType;
using lora::io::PeftAdapter;
using lora::io::PeftConfig;
using lora::io::PeftModule;
using lora::io::SafetensorsFile;
using lora::io::SafetensorsWriter;
using VectorXf = Eigen::Matrix<float, Eigen::Dynamic, 1>;

namespace {

const fs::path fixture_dir = fs::path(LORA_TEST_FIXTURE_DIR) / "peft";
constexpr const char* prefix = "base_model.model.";

const SafetensorsFile& base_file() {
  static const SafetensorsFile f = SafetensorsFile::open(fixture_dir / "base.safetensors");
  return f;
}
const SafetensorsFile& inputs_file() {
  static const SafetensorsFile f = SafetensorsFile::open(fixture_dir / "inputs.safetensors");
  return f;
}

std::string read_text(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  REQUIRE(in);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}
std::vector<char> read_bytes(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  REQUIRE(in);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

/// A fresh directory under the system's temp dir, removed at scope exit.
struct TempDir {
  fs::path path;
  explicit TempDir(const std::string& tag) {
    static std::atomic<int> counter{0};
    static const unsigned run = std::random_device{}();
    path = fs::temp_directory_path() /
           ("lora_test_peft_" + tag + "_" + std::to_string(run) + "_" + std::to_string(counter++));
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
};

/// max |got - ref| / max |ref|.
double rel_err(const RowMatrix<float>& got, const RowMatrix<float>& ref) {
  REQUIRE(got.rows() == ref.rows());
  REQUIRE(got.cols() == ref.cols());
  const double scale = ref.cwiseAbs().maxCoeff();
  REQUIRE(scale > 0);
  return (got - ref).cwiseAbs().maxCoeff() / scale;
}

std::vector<std::int64_t> ids() {
  const auto v = inputs_file().view<std::int64_t>("ids");
  return {v.data(), v.data() + v.size()};
}

bool is_conv1d(const std::string& path) { return path.ends_with("c_attn"); }

/// The base module's weight [out, in] and bias [out]; transformers' Conv1D stores
/// its weight [in, out] (PEFT's fan_in_fan_out). A modules_to_save copy in the
/// adapter replaces both, as PEFT's load does.
std::pair<RowMatrix<float>, VectorXf> base_params(const PeftAdapter<float>& a, const std::string& path) {
  RowMatrix<float> w = base_file().read<float>(path + ".weight");
  if (is_conv1d(path)) w = RowMatrix<float>(w.transpose());
  VectorXf b = base_file().contains(path + ".bias") ? base_file().read_vector<float>(path + ".bias")
                                                    : VectorXf(VectorXf::Zero(w.rows()));
  const std::string key = prefix + path;
  if (auto it = a.saved.find(key + ".weight"); it != a.saved.end()) w = it->second;
  if (auto it = a.saved.find(key + ".bias"); it != a.saved.end()) b = it->second.row(0).transpose();
  return {w, b};
}

/// A Linear / Conv1D module's forward: AdaptedLinear over the base weight with the
/// loaded delta; PEFT's lora_B bias enters scaled, next to the base bias.
RowMatrix<float> linear_forward(const PeftAdapter<float>& a, const std::string& path, const RowMatrix<float>& x) {
  auto [w, b] = base_params(a, path);
  if (!a.contains(path)) {
    RowMatrix<float> y = x * w.transpose();
    y.rowwise() += b.transpose();
    return y;
  }
  const PeftModule<float>& m = a.module(path);
  if (m.magnitude) {  // DoRA (use_dora): the base bias stays outside the normalised product
    RowMatrix<float> y(x.rows(), w.rows());
    lora::io::make_peft_dora(m, w, b).forward(x, y);
    return y;
  }
  lora::AdaptedLinear layer{w, VectorXf(b + m.bias_delta()), m.delta()};
  return layer.forward(x);
}

/// The embedding's output for `ids`, computed densely: table[id] + s * (B A)[:, id]
/// (A [r, num_embeddings], B [dim, r] as PEFT stores them).
RowMatrix<float> embedding_forward(const PeftAdapter<float>& a, const std::vector<std::int64_t>& tokens) {
  const std::string path = "model.embed_tokens";
  const RowMatrix<float> table = base_file().read<float>(path + ".weight");
  RowMatrix<float> out(static_cast<Eigen::Index>(tokens.size()), table.cols());
  for (std::size_t i = 0; i < tokens.size(); ++i) out.row(static_cast<Eigen::Index>(i)) = table.row(tokens[i]);
  if (!a.contains(path)) return out;
  const PeftModule<float>& m = a.module(path);
  REQUIRE(m.embedding);
  const float s = static_cast<float>(m.scale());
  for (std::size_t i = 0; i < tokens.size(); ++i) {
    const Eigen::Index t = tokens[i];
    // A^T[t] B^T: the token's row of A^T (its column of A) through B.
    for (Eigen::Index j = 0; j < out.cols(); ++j) {
      double acc = 0;
      for (Eigen::Index k = 0; k < m.rank(); ++k) acc += double(m.A(k, t)) * double(m.B(j, k));
      out(static_cast<Eigen::Index>(i), j) += s * static_cast<float>(acc);
    }
  }
  return out;
}

RowMatrix<float> tanh_of(const RowMatrix<float>& x) { return x.array().tanh().matrix(); }

/// The fixture model (scripts/gen_peft_fixtures.py, Tiny.forward) with the adapter.
RowMatrix<float> model_forward(const PeftAdapter<float>& a) {
  RowMatrix<float> h = linear_forward(a, "model.in_proj", embedding_forward(a, ids()));
  for (int l = 0; l < 2; ++l) {
    const std::string p = "model.layers." + std::to_string(l);
    RowMatrix<float> att = linear_forward(a, p + ".self_attn.q_proj", h) + linear_forward(a, p + ".attn.c_attn", h);
    RowMatrix<float> u = linear_forward(a, p + ".mlp.up_proj", tanh_of(att));
    h += linear_forward(a, p + ".mlp.down_proj", tanh_of(u));
  }
  return linear_forward(a, "score", h);
}

struct Case {
  std::string name;       // ref/<name>.safetensors
  std::string dir;        // adapter dir under fixtures/peft
  std::string adapter;    // adapter name to load
  std::string peft_file;  // PEFT's adapter_model.safetensors with the same tensors
};

const std::vector<Case>& cases() {
  static const std::vector<Case> all = {
      {"plain", "plain", "default", "plain"},
      {"rslora", "rslora", "default", "rslora"},
      {"patterns", "patterns", "default", "patterns"},
      {"lora_bias", "lora_bias", "default", "lora_bias"},
      {"modules_to_save", "modules_to_save", "default", "modules_to_save"},
      {"fp16", "fp16", "default", "fp16"},
      {"bf16", "bf16", "default", "bf16"},
      {"named", "named", "alt", "named/alt"},
      {"plain", "named_keys", "default", "plain"},  // PEFT's own save of these tensors is plain's
      {"embedding", "embedding", "default", "embedding"},
      {"fan_in_fan_out", "fan_in_fan_out", "default", "fan_in_fan_out"},
      {"alpha0", "alpha0", "default", "alpha0"},
      {"dora", "dora", "default", "dora"},
  };
  return all;
}

/// Calls f and requires an exception of type E whose message has every word.
template <class E>
void require_error(const std::function<void()>& f, const std::vector<std::string>& words) {
  try {
    f();
  } catch (const E& e) {
    const std::string msg = e.what();
    INFO("message: " << msg);
    for (const auto& w : words) CHECK(msg.find(w) != std::string::npos);
    return;
  } catch (const std::exception& e) {
    FAIL("wrong exception type: " << e.what());
  }
  FAIL("no exception; expected one with: " << (words.empty() ? std::string() : words.front()));
}

}  // namespace

TEST_CASE("PEFT fixtures: every module and the whole model equal PEFT's forward", "[io][peft]") {
  for (const Case& c : cases()) {
    SECTION(c.dir) {
      const auto a = lora::io::load_peft<float>(fixture_dir / c.dir, c.adapter);
      const SafetensorsFile ref = SafetensorsFile::open(fixture_dir / "ref" / (c.name + ".safetensors"));
      CHECK(a.name == c.adapter);
      CHECK(std::is_sorted(a.modules.begin(), a.modules.end(),
                           [](const auto& x, const auto& y) { return x.path < y.path; }));
      std::set<std::string> ref_paths, got_paths;
      for (const auto& t : ref.tensors())
        if (t.name.starts_with("y.") && t.name != "y.score") ref_paths.insert(t.name.substr(2));
      for (const auto& m : a.modules) got_paths.insert(m.path);
      CHECK(got_paths == ref_paths);  // no module dropped or invented

      for (const std::string& path : ref_paths) {
        INFO(c.dir << ": " << path);
        const RowMatrix<float> want = ref.read<float>("y." + path);
        if (a.module(path).embedding) {
          CHECK(rel_err(embedding_forward(a, ids()), want) <= 1e-6);
        } else {
          const RowMatrix<float> x = inputs_file().read<float>("x." + path);
          CHECK(rel_err(linear_forward(a, path, x), want) <= 1e-6);
        }
      }
      if (ref.contains("y.score")) {
        const RowMatrix<float> x = inputs_file().read<float>("x.score");
        CHECK(rel_err(linear_forward(a, "score", x), ref.read<float>("y.score")) <= 1e-6);
      }
      INFO(c.dir << ": whole model");
      CHECK(rel_err(model_forward(a), ref.read<float>("model")) <= 1e-6);
    }
  }
}

TEST_CASE("PEFT fixtures: scales, ranks and options as PEFT computes them", "[io][peft]") {
  const auto plain = lora::io::load_peft<float>(fixture_dir / "plain");
  REQUIRE(plain.modules.size() == 6);
  for (const auto& m : plain.modules) {
    CHECK(m.rank() == 4);
    CHECK(m.scale() == 2.0);  // 8 / 4
    CHECK(m.stored == DType::F32);
    CHECK_FALSE(m.bias);
    CHECK(m.A.cols() == m.delta().in_features());
  }
  CHECK(plain.module("model.layers.0.mlp.up_proj").A.rows() == 4);
  CHECK(plain.module("model.layers.0.mlp.up_proj").A.cols() == 7);
  CHECK(plain.module("model.layers.0.mlp.up_proj").B.rows() == 11);

  const auto rs = lora::io::load_peft<float>(fixture_dir / "rslora");
  for (const auto& m : rs.modules) {
    CHECK(m.options.rule == lora::Scaling::rslora);
    CHECK(m.scale() == Approx(3.0).epsilon(1e-15));  // 6 / sqrt(4)
  }

  const auto p = lora::io::load_peft<float>(fixture_dir / "patterns");
  // rank_pattern {"model.layers.0.self_attn.q_proj": 2, "up_proj": 3, "layers\.1\..*down_proj": 6},
  // alpha_pattern {"q_proj": 3, "model.layers.1.mlp.up_proj": 16}, r = 4, alpha = 8.
  const std::map<std::string, std::pair<int, double>> want = {
      {"model.layers.0.self_attn.q_proj", {2, 3.0 / 2}}, {"model.layers.1.self_attn.q_proj", {4, 3.0 / 4}},
      {"model.layers.0.mlp.up_proj", {3, 8.0 / 3}},      {"model.layers.1.mlp.up_proj", {3, 16.0 / 3}},
      {"model.layers.0.mlp.down_proj", {4, 8.0 / 4}},    {"model.layers.1.mlp.down_proj", {6, 8.0 / 6}},
  };
  for (const auto& [path, rs_] : want) {
    INFO(path);
    CHECK(p.module(path).rank() == rs_.first);
    CHECK(p.config.rank_for(path) == rs_.first);
    CHECK(p.module(path).scale() == rs_.second);
  }

  const auto z = lora::io::load_peft<float>(fixture_dir / "alpha0");
  for (const auto& m : z.modules) {
    CHECK(m.options.alpha == 0.0);
    CHECK(m.options.user_scale == 0.0);
    CHECK(m.scale() == 0.0);
    CHECK(m.delta().scale() == 0.0f);
  }
  // Scale 0: the adapted model is the base model (PEFT's own output says so too).
  const SafetensorsFile base_ref = SafetensorsFile::open(fixture_dir / "ref" / "base.safetensors");
  CHECK(rel_err(model_forward(z), base_ref.read<float>("model")) <= 1e-6);

  const auto f16 = lora::io::load_peft<float>(fixture_dir / "fp16");
  const auto b16 = lora::io::load_peft<double>(fixture_dir / "bf16");
  for (const auto& m : f16.modules) CHECK(m.stored == DType::F16);
  for (const auto& m : b16.modules) CHECK(m.stored == DType::BF16);

  const auto lb = lora::io::load_peft<float>(fixture_dir / "lora_bias");
  for (const auto& m : lb.modules) {
    REQUIRE(m.bias);
    CHECK(m.bias->size() == m.B.rows());
    CHECK(m.bias_delta().isApprox(*m.bias * 2.0f));
  }
  CHECK(lb.config.lora_bias);

  const auto fan = lora::io::load_peft<float>(fixture_dir / "fan_in_fan_out");
  CHECK(fan.config.fan_in_fan_out);
  // A and B keep the nn.Linear layout; only the base weight is stored [in, out].
  CHECK(fan.module("model.layers.0.attn.c_attn").A.cols() == 13);
  CHECK(fan.module("model.layers.0.attn.c_attn").B.rows() == 7);
  CHECK(base_file().info("model.layers.0.attn.c_attn.weight").shape == std::vector<std::int64_t>{13, 7});
}

TEST_CASE("PEFT fixtures: 16-bit adapters within the dtype's rounding of PEFT's 16-bit forward", "[io][peft]") {
  // PEFT's from_pretrained upcasts a 16-bit adapter onto an fp32 base (the y. refs,
  // matched to 1e-6 above); y16 is the forward with A and B kept in 16 bits, where
  // PEFT also rounds x and x A^T to 16 bits.
  for (const auto& [name, eps] : {std::pair<std::string, double>{"fp16", std::ldexp(1.0, -11)},
                                  std::pair<std::string, double>{"bf16", std::ldexp(1.0, -8)}}) {
    const auto a = lora::io::load_peft<float>(fixture_dir / name);
    const SafetensorsFile ref = SafetensorsFile::open(fixture_dir / "ref" / (name + ".safetensors"));
    for (const auto& m : a.modules) {
      const RowMatrix<float> x = inputs_file().read<float>("x." + m.path);
      const RowMatrix<float> y = linear_forward(a, m.path, x);
      const RowMatrix<float> y16 = ref.read<float>("y16." + m.path);
      // The adapter's term is what the 16-bit arithmetic touches.
      const auto [w, b] = base_params(a, m.path);
      RowMatrix<float> base_y = x * w.transpose();
      base_y.rowwise() += b.transpose();
      const double term = (y - base_y).cwiseAbs().maxCoeff();
      const double err = (y - y16).cwiseAbs().maxCoeff();
      INFO(name << " " << m.path << ": |y - y16| = " << err << ", adapter term " << term);
      CHECK(err > 0);                // PEFT's 16-bit forward does round
      CHECK(err <= 8 * eps * term);  // x, x A^T and the product each rounded once (measured: 1.3 eps, 1.2 eps)
    }
  }
}

TEST_CASE("PEFT fixtures: the embedding LoRA, by hand and through delta()", "[io][peft]") {
  const auto a = lora::io::load_peft<float>(fixture_dir / "embedding");
  const auto& m = a.module("model.embed_tokens");
  CHECK(m.embedding);
  CHECK(m.A.rows() == 3);
  CHECK(m.A.cols() == 17);  // lora_embedding_A [r, num_embeddings]
  CHECK(m.B.rows() == 5);   // lora_embedding_B [dim, r]
  CHECK(m.B.cols() == 3);
  CHECK(m.scale() == Approx(5.0 / 3).epsilon(1e-15));
  // s B A is [dim, num_embeddings]: its transpose is the table's update.
  const auto d = m.delta();
  const RowMatrix<float> update = lora::expr::materialize(d.expression()).transpose();
  const RowMatrix<float> table = base_file().read<float>("model.embed_tokens.weight");
  const auto tokens = ids();
  RowMatrix<float> via_delta(static_cast<Eigen::Index>(tokens.size()), table.cols());
  for (std::size_t i = 0; i < tokens.size(); ++i)
    via_delta.row(static_cast<Eigen::Index>(i)) = table.row(tokens[i]) + update.row(tokens[i]);
  const SafetensorsFile ref = SafetensorsFile::open(fixture_dir / "ref" / "embedding.safetensors");
  CHECK(rel_err(via_delta, ref.read<float>("y.model.embed_tokens")) <= 1e-6);
  CHECK(rel_err(embedding_forward(a, tokens), ref.read<float>("y.model.embed_tokens")) <= 1e-6);
}

TEST_CASE("PEFT fixtures: adapter names and modules_to_save", "[io][peft]") {
  // PEFT saves an adapter not named "default" under dir/<name>/.
  const auto alt = lora::io::load_peft<float>(fixture_dir / "named", "alt");
  CHECK(alt.modules.size() == 6);
  const auto alt_direct = lora::io::load_peft<float>(fixture_dir / "named" / "alt", "alt");
  CHECK(alt_direct.modules.size() == 6);
  require_error<lora::FormatError>([] { (void)lora::io::load_peft<float>(fixture_dir / "named"); },
                                   {"adapter_config.json", "named", "default"});

  // Keys still carrying the adapter name load as that adapter, as in PEFT.
  const auto plain = lora::io::load_peft<float>(fixture_dir / "plain");
  const auto nk = lora::io::load_peft<float>(fixture_dir / "named_keys");
  REQUIRE(nk.modules.size() == plain.modules.size());
  for (std::size_t i = 0; i < nk.modules.size(); ++i) {
    CHECK(nk.modules[i].path == plain.modules[i].path);
    CHECK(nk.modules[i].A == plain.modules[i].A);
    CHECK(nk.modules[i].B == plain.modules[i].B);
  }
  require_error<lora::FormatError>([] { (void)lora::io::load_peft<float>(fixture_dir / "named_keys", "other"); },
                                   {"adapter_model.safetensors", "lora_A.default.weight", "'default'", "'other'"});

  const auto mts = lora::io::load_peft<float>(fixture_dir / "modules_to_save");
  CHECK(mts.config.modules_to_save == std::vector<std::string>{"score"});
  REQUIRE(mts.saved.size() == 2);
  CHECK(mts.saved.at("base_model.model.score.weight").rows() == 3);
  CHECK(mts.saved.at("base_model.model.score.weight").cols() == 13);
  CHECK(mts.saved.at("base_model.model.score.bias").rows() == 1);
  CHECK(mts.saved_shape.at("base_model.model.score.bias") == std::vector<std::int64_t>{3});
  // The saved copy differs from the base (the fixture perturbed it).
  CHECK((mts.saved.at("base_model.model.score.weight") - base_file().read<float>("score.weight")).norm() > 0.1);

  require_error<lora::ValueError>([&] { (void)plain.module("model.layers.0.mlp.gate_proj"); },
                                  {"gate_proj", "default"});
}

TEST_CASE("PEFT fixtures: save_peft writes PEFT's bytes, and reloads equal", "[io][peft]") {
  const char* export_root = std::getenv("LORA_PEFT_EXPORT_DIR");  // for gen_peft_fixtures.py --check-export
  for (const Case& c : cases()) {
    SECTION(c.dir) {
      const auto a = lora::io::load_peft<float>(fixture_dir / c.dir, c.adapter);
      TempDir tmp("save_" + c.dir);
      const DType stored = a.modules.front().stored;
      lora::io::save_peft(a, tmp.path, stored);
      CHECK(read_bytes(tmp.path / "adapter_model.safetensors") ==
            read_bytes(fixture_dir / c.peft_file / "adapter_model.safetensors"));
      // Nothing else is left behind (the temporary files were renamed).
      CHECK(std::distance(fs::directory_iterator(tmp.path), fs::directory_iterator()) == 2);

      const auto b = lora::io::load_peft<float>(tmp.path);
      REQUIRE(b.modules.size() == a.modules.size());
      for (std::size_t i = 0; i < a.modules.size(); ++i) {
        const auto &x = a.modules[i], &y = b.modules[i];
        INFO(x.path);
        CHECK(x.path == y.path);
        CHECK(x.A == y.A);
        CHECK(x.B == y.B);
        CHECK(x.embedding == y.embedding);
        CHECK(x.scale() == y.scale());
        CHECK(x.options.rule == y.options.rule);
        CHECK(bool(x.bias) == bool(y.bias));
        if (x.bias && y.bias) CHECK(*x.bias == *y.bias);
        CHECK(bool(x.magnitude) == bool(y.magnitude));
        if (x.magnitude && y.magnitude) CHECK(*x.magnitude == *y.magnitude);
        CHECK(b.config.rank_for(x.path) == a.config.rank_for(x.path));
        CHECK(b.config.alpha_for(x.path) == a.config.alpha_for(x.path));
      }
      CHECK(b.saved == a.saved);
      CHECK(b.saved_shape == a.saved_shape);
      CHECK(b.config.to_json() == a.config.to_json());
      CHECK(rel_err(model_forward(b), model_forward(a)) == 0.0);

      // The config keeps PEFT's keys (peft_version, auto_mapping, ...) and says
      // inference_mode, as save_pretrained does.
      const auto j = nlohmann::json::parse(read_text(tmp.path / "adapter_config.json"));
      const auto peft_j = nlohmann::json::parse(read_text(fixture_dir / c.peft_file / "adapter_config.json"));
      CHECK(j == peft_j);

      if (export_root) {
        const fs::path out = fs::path(export_root) / c.dir;
        fs::remove_all(out);
        lora::io::save_peft(a, out, stored);
      }
    }
  }
}

TEST_CASE("PEFT: to_peft_module and make_peft_adapter from trained deltas", "[io][peft]") {
  lora::LowRankDelta<float, 4> d1{7, 13, {.alpha = 16}};
  d1.init(lora::init::KaimingZero{}, 1);
  d1.B().setRandom();
  lora::LowRankDelta<float> d2{11, 7, 3, {.alpha = 0, .user_scale = 0.5}};
  d2.A().setRandom();
  d2.B().setRandom();
  lora::LowRankDelta<float, 4> d3{13, 11, {.alpha = 16, .multiplier = 0.25}};
  d3.A().setRandom();
  d3.B().setRandom();

  auto m1 = lora::io::to_peft_module("model.layers.0.self_attn.q_proj", d1);
  auto m2 = lora::io::to_peft_module("model.layers.0.mlp.up_proj", d2);
  auto m3 = lora::io::to_peft_module("model.layers.0.mlp.down_proj", d3);
  CHECK(m1.options.alpha == 16);  // alpha and rule kept
  CHECK(m1.scale() == d1.scale());
  CHECK(m2.options.alpha == 1.5);  // user scale 0.5 -> alpha 0.5 * 3
  CHECK(m2.scale() == Approx(0.5).epsilon(1e-15));
  CHECK(m3.scale() == Approx(1.0).epsilon(1e-15));  // 16 / 4 * 0.25 folded into alpha 4

  lora::LowRankDelta<float, 2> zero{5, 5, {.alpha = 8, .multiplier = 0}};
  CHECK(lora::io::to_peft_module("z", zero).options.user_scale == 0.0);
  CHECK(lora::io::to_peft_module("z", zero).scale() == 0.0);

  auto a = lora::io::make_peft_adapter<float>({m3, m1, m2});
  CHECK(a.modules.front().path == "model.layers.0.mlp.down_proj");  // sorted
  CHECK(a.config.r == 4);
  CHECK(a.config.rank_pattern.size() == 1);
  TempDir tmp("make");
  lora::io::save_peft(a, tmp.path);
  const auto b = lora::io::load_peft<float>(tmp.path);
  const RowMatrix<float> x = RowMatrix<float>::Random(3, 13);
  const RowMatrix<float> w1 = RowMatrix<float>::Random(7, 13);
  lora::AdaptedLinear orig{w1, d1};
  lora::AdaptedLinear back{w1, b.module("model.layers.0.self_attn.q_proj").delta()};
  CHECK(rel_err(back.forward(x), orig.forward(x)) <= 1e-7);
  CHECK(b.module("model.layers.0.mlp.up_proj").scale() == Approx(0.5).epsilon(1e-15));
  CHECK(b.module("model.layers.0.mlp.up_proj").rank() == 3);
  CHECK(b.module("model.layers.0.mlp.down_proj").scale() == Approx(1.0).epsilon(1e-15));

  // Mixed rules cannot be one PEFT adapter.
  lora::LowRankDelta<float, 2> rs{5, 5, {.alpha = 8, .rule = lora::Scaling::rslora}};
  require_error<lora::ValueError>(
      [&] { (void)lora::io::make_peft_adapter<float>({m1, lora::io::to_peft_module("x.rs", rs)}); },
      {"x.rs", "use_rslora"});

  // save_peft refuses a config that does not describe the modules.
  auto bad = a;
  bad.config.rank_pattern.clear();
  require_error<lora::ValueError>([&] { lora::io::save_peft(bad, tmp.path / "bad"); }, {"up_proj", "rank 3", "r = 4"});
  bad = a;
  bad.config.lora_alpha = 3;
  require_error<lora::ValueError>([&] { lora::io::save_peft(bad, tmp.path / "bad"); }, {"up_proj", "PEFT scale"});
  bad = a;
  bad.config.target_modules = std::vector<std::string>{"q_proj"};
  require_error<lora::ValueError>([&] { lora::io::save_peft(bad, tmp.path / "bad"); }, {"target_modules"});
  require_error<lora::ValueError>([&] { lora::io::save_peft(a, tmp.path / "bad", DType::I32); }, {"I32"});
  CHECK_FALSE(fs::exists(tmp.path / "bad" / "adapter_model.safetensors"));
}

TEST_CASE("PEFT: make_peft_adapter rebuilds a config that gives PEFT's outputs", "[io][peft]") {
  // The fixtures' modules with their config thrown away: make_peft_adapter must
  // find r, lora_alpha, rank_pattern / alpha_pattern, use_rslora, lora_bias and
  // target_modules again, so that the saved adapter computes PEFT's outputs.
  const char* export_root = std::getenv("LORA_PEFT_EXPORT_DIR");
  for (const std::string name : {"patterns", "rslora", "lora_bias", "embedding", "fan_in_fan_out", "alpha0"}) {
    SECTION(name) {
      const auto a = lora::io::load_peft<float>(fixture_dir / name);
      const auto rebuilt = lora::io::make_peft_adapter<float>(a.modules);
      CHECK(rebuilt.config.raw.empty());
      TempDir tmp("rebuilt_" + name);
      lora::io::save_peft(rebuilt, tmp.path);
      const auto b = lora::io::load_peft<float>(tmp.path);
      REQUIRE(b.modules.size() == a.modules.size());
      for (std::size_t i = 0; i < a.modules.size(); ++i) {
        INFO(a.modules[i].path);
        CHECK(b.modules[i].rank() == a.modules[i].rank());
        CHECK(b.modules[i].scale() == Approx(a.modules[i].scale()).epsilon(1e-15));
      }
      const SafetensorsFile ref = SafetensorsFile::open(fixture_dir / "ref" / (name + ".safetensors"));
      CHECK(rel_err(model_forward(b), ref.read<float>("model")) <= 1e-6);
      if (export_root) lora::io::save_peft(rebuilt, fs::path(export_root) / (name + "_rebuilt"));
    }
  }
}

TEST_CASE("PEFT: save_peft leaves no partial file when a write fails", "[io][peft]") {
  const auto a = lora::io::load_peft<float>(fixture_dir / "plain");
  TempDir tmp("atomic");
  // A directory where the config goes: the rename fails after the weights were written.
  fs::create_directories(tmp.path / "adapter_config.json" / "x");
  require_error<lora::Error>([&] { lora::io::save_peft(a, tmp.path); }, {"adapter_config.json"});
  for (const auto& e : fs::directory_iterator(tmp.path))
    CHECK(e.path().filename().string().find(".tmp") == std::string::npos);
}

// ---- malformed inputs ------------------------------------------------------------

namespace {

/// plain's tensors as (key -> matrix), and a writer that stores them (F32).
std::map<std::string, RowMatrix<float>> plain_tensors() {
  const SafetensorsFile f = SafetensorsFile::open(fixture_dir / "plain" / "adapter_model.safetensors");
  std::map<std::string, RowMatrix<float>> out;
  for (const auto& t : f.tensors()) out.emplace(t.name, f.read<float>(t.name));
  return out;
}

const std::string q0 = std::string(prefix) + "model.layers.0.self_attn.q_proj";
const std::string up0 = std::string(prefix) + "model.layers.0.mlp.up_proj";

std::string plain_config() { return read_text(fixture_dir / "plain" / "adapter_config.json"); }

std::string edit_config(const std::string& text, const std::function<void(nlohmann::ordered_json&)>& f) {
  auto j = nlohmann::ordered_json::parse(text);
  f(j);
  return j.dump(2);
}

void write_adapter(const fs::path& dir, const std::string& config,
                   const std::map<std::string, RowMatrix<float>>& tensors,
                   const std::function<void(SafetensorsWriter&)>& extra = {}) {
  fs::create_directories(dir);
  std::ofstream(dir / "adapter_config.json", std::ios::binary) << config;
  SafetensorsWriter w;
  w.set_metadata("format", "pt");
  for (const auto& [k, v] : tensors) w.add(k, v, DType::F32);
  if (extra) extra(w);
  w.write(dir / "adapter_model.safetensors");
}

}  // namespace

TEST_CASE("PEFT: malformed adapters are typed errors naming file, key and problem", "[io][peft]") {
  TempDir tmp("bad");
  int n = 0;
  // Writes the adapter, loads it, requires E with every word (and the file's path).
  auto expect = [&]<class E>(const std::string& config, const std::map<std::string, RowMatrix<float>>& tensors,
                             std::vector<std::string> words,
                             const std::function<void(SafetensorsWriter&)>& extra = {}) {
    const fs::path dir = tmp.path / ("case" + std::to_string(n++));
    write_adapter(dir, config, tensors, extra);
    words.push_back(dir.string());
    require_error<E>([&] { (void)lora::io::load_peft<float>(dir); }, words);
  };
  const std::string cfg = plain_config();

  SECTION("lora_A without lora_B, and the reverse") {
    auto t = plain_tensors();
    t.erase(up0 + ".lora_B.weight");
    expect.operator()<lora::FormatError>(cfg, t, {"adapter_model.safetensors", up0 + ".lora_A.weight", "lora_B"});
    t = plain_tensors();
    t.erase(up0 + ".lora_A.weight");
    expect.operator()<lora::FormatError>(cfg, t, {up0 + ".lora_B.weight", "no matching lora_A"});
  }
  SECTION("rank mismatch between A and B") {
    auto t = plain_tensors();
    t[up0 + ".lora_B.weight"] = RowMatrix<float>::Ones(11, 3);
    expect.operator()<lora::RankError>(cfg, t, {"rank mismatch", up0 + ".lora_A.weight", "r = 4", "r = 3"});
  }
  SECTION("tensor rank disagrees with r / rank_pattern") {
    expect.operator()<lora::RankError>(edit_config(cfg, [](auto& j) { j["r"] = 8; }), plain_tensors(),
                                       {"model.layers.0.mlp.down_proj", "rank 4", "r = 8", "adapter_config.json"});
    expect.operator()<lora::RankError>(edit_config(cfg, [](auto& j) { j["rank_pattern"] = {{"up_proj", 2}}; }),
                                       plain_tensors(), {"model.layers.0.mlp.up_proj", "rank_pattern['up_proj']"});
  }
  SECTION("non-float dtype") {
    auto t = plain_tensors();
    t.erase(up0 + ".lora_A.weight");
    std::vector<std::byte> raw(4 * 7 * 4);
    expect.operator()<lora::FormatError>(cfg, t, {up0 + ".lora_A.weight", "I32"}, [&](SafetensorsWriter& w) {
      w.add_raw(up0 + ".lora_A.weight", DType::I32, {4, 7}, raw);
    });
  }
  SECTION("a key that is not PEFT's") {
    auto t = plain_tensors();
    t["lora_unet_down_blocks_0.lora_down.weight"] = RowMatrix<float>::Ones(2, 2);
    expect.operator()<lora::FormatError>(cfg, t, {"lora_unet_down_blocks_0.lora_down.weight", "base_model.model."});
  }
  SECTION("DoRA magnitude vector in a LoRA (use_dora = false) adapter, or under a malformed key") {
    auto t = plain_tensors();
    t[q0 + ".lora_magnitude_vector"] = RowMatrix<float>::Ones(1, 7);
    expect.operator()<lora::FormatError>(cfg, t, {"lora_magnitude_vector", "use_dora = false"});
    t.erase(q0 + ".lora_magnitude_vector");
    t[q0 + ".lora_magnitude_vector.x.y"] = RowMatrix<float>::Ones(1, 7);
    expect.operator()<lora::FormatError>(cfg, t, {"lora_magnitude_vector.x.y", "lora_magnitude_vector[.<adapter>].weight"});
  }
  SECTION("another LoRA variant's tensor") {
    auto t = plain_tensors();
    t[q0 + ".lora_diag.weight"] = RowMatrix<float>::Ones(1, 4);
    expect.operator()<lora::ValueError>(cfg, t, {"lora_diag", "LoRA variant"});
  }
  SECTION("adapter name inside a key: another adapter's, or twice the same parameter") {
    auto t = plain_tensors();
    t[q0 + ".lora_A.other.weight"] = t.at(q0 + ".lora_A.weight");
    t.erase(q0 + ".lora_A.weight");
    expect.operator()<lora::FormatError>(cfg, t, {q0 + ".lora_A.other.weight", "'other'", "'default'"});
    t = plain_tensors();
    t[q0 + ".lora_A.default.weight"] = t.at(q0 + ".lora_A.weight");
    expect.operator()<lora::FormatError>(cfg, t, {q0 + ".lora_A.weight", q0 + ".lora_A.default.weight", "same"});
  }
  SECTION("lora_B.bias against lora_bias") {
    auto t = plain_tensors();
    expect.operator()<lora::FormatError>(cfg, t, {q0 + ".lora_B.bias", "lora_bias = false"}, [&](SafetensorsWriter& w) {
      w.add_vector(q0 + ".lora_B.bias", VectorXf::Ones(7), DType::F32);
    });
    const std::string with_bias = edit_config(cfg, [](auto& j) { j["lora_bias"] = true; });
    expect.operator()<lora::FormatError>(with_bias, t, {"no lora_B.bias", "lora_bias = true"});
    const std::string b = read_text(fixture_dir / "lora_bias" / "adapter_config.json");
    const SafetensorsFile f = SafetensorsFile::open(fixture_dir / "lora_bias" / "adapter_model.safetensors");
    std::map<std::string, RowMatrix<float>> tb;
    for (const auto& ti : f.tensors())
      if (ti.name.ends_with(".weight")) tb.emplace(ti.name, f.read<float>(ti.name));
    expect.operator()<lora::ShapeError>(b, tb, {q0 + ".lora_B.bias", "[5]", "[7]"}, [&](SafetensorsWriter& w) {
      for (const auto& ti : f.tensors())
        if (ti.name.ends_with(".bias"))
          w.add_vector(ti.name, ti.name.starts_with(q0) ? VectorXf(VectorXf::Ones(5)) : f.read_vector<float>(ti.name),
                       DType::F32);
    });
    t[q0 + ".lora_A.bias"] = RowMatrix<float>::Ones(1, 4);
    expect.operator()<lora::FormatError>(cfg, t, {q0 + ".lora_A.bias", "lora_A has no bias"});
  }
  SECTION("shapes: 1-D factor, empty factor, 3-D saved tensor") {
    auto t = plain_tensors();
    t.erase(q0 + ".lora_A.weight");
    expect.operator()<lora::FormatError>(cfg, t, {q0 + ".lora_A.weight", "[52]", "2 dimensions"},
                                         [&](SafetensorsWriter& w) {
                                           w.add_vector(q0 + ".lora_A.weight", VectorXf::Ones(52), DType::F32);
                                         });
    t = plain_tensors();
    t[q0 + ".lora_A.weight"] = RowMatrix<float>(0, 13);
    t[q0 + ".lora_B.weight"] = RowMatrix<float>(7, 0);
    expect.operator()<lora::FormatError>(cfg, t, {"[0, 13]", "empty"});
    t = plain_tensors();
    std::vector<std::byte> raw(2 * 2 * 2 * 4);
    expect.operator()<lora::FormatError>(cfg, t, {"base_model.model.conv.weight", "3 dimensions"},
                                         [&](SafetensorsWriter& w) {
                                           w.add_raw("base_model.model.conv.weight", DType::F32, {2, 2, 2}, raw);
                                         });
  }
  SECTION("a module the config does not target") {
    expect.operator()<lora::FormatError>(
        edit_config(cfg, [](auto& j) { j["target_modules"] = {"q_proj"}; }), plain_tensors(),
        {"model.layers.0.mlp.down_proj", "target_modules"});
  }
  SECTION("unsupported options in the config") {
    // use_dora without the magnitudes, and magnitudes without use_dora.
    expect.operator()<lora::FormatError>(edit_config(cfg, [](auto& j) { j["use_dora"] = true; }), plain_tensors(),
                                         {"lora_magnitude_vector", "use_dora = true"});
    {
      const auto t = plain_tensors();
      const Eigen::Index out = t.at(q0 + ".lora_B.weight").rows();
      // m on every module; q0's of length `len`.
      auto add_m = [&](Eigen::Index len) {
        return [&, len](SafetensorsWriter& w) {
          for (const auto& [k, v] : t)
            if (k.ends_with(".lora_B.weight")) {
              const std::string mod = k.substr(0, k.size() - std::string(".lora_B.weight").size());
              w.add_vector(mod + ".lora_magnitude_vector", VectorXf::Ones(mod == q0 ? len : v.rows()), DType::F32);
            }
        };
      };
      expect.operator()<lora::FormatError>(cfg, t, {"lora_magnitude_vector", "use_dora = false"}, add_m(out));
      expect.operator()<lora::ShapeError>(edit_config(cfg, [](auto& j) { j["use_dora"] = true; }), t,
                                          {"lora_magnitude_vector", "expected [" + std::to_string(out) + "]"},
                                          add_m(out + 1));
    }
    // An embedding cannot have lora_bias in PEFT.
    const std::string e = edit_config(read_text(fixture_dir / "embedding" / "adapter_config.json"),
                                      [](auto& j) { j["lora_bias"] = true; });
    const SafetensorsFile f = SafetensorsFile::open(fixture_dir / "embedding" / "adapter_model.safetensors");
    std::map<std::string, RowMatrix<float>> te;
    for (const auto& ti : f.tensors()) te.emplace(ti.name, f.read<float>(ti.name));
    expect.operator()<lora::ValueError>(e, te, {"lora_bias", "model.embed_tokens"});
    // An embedding factor without its partner.
    te.erase(std::string(prefix) + "model.embed_tokens.lora_embedding_B");
    expect.operator()<lora::FormatError>(read_text(fixture_dir / "embedding" / "adapter_config.json"), te,
                                         {"lora_embedding_A", "lora_embedding_B"});
  }
  SECTION("VeLoRA's projection buffer is skipped: its forward is plain LoRA's") {
    const fs::path dir = tmp.path / "velora";
    write_adapter(dir, edit_config(cfg, [](auto& j) { j["velora_config"] = {{"num_groups", 4}}; }), plain_tensors(),
                  [&](SafetensorsWriter& w) {
                    w.add_vector(q0 + ".lora_velora_embed", VectorXf::Ones(4), DType::F32);
                  });
    const auto a = lora::io::load_peft<float>(dir);
    CHECK(a.modules.size() == 6);
    CHECK(a.saved.empty());
  }
}

TEST_CASE("PEFT: missing files, pickle weights, DoRA fixture, garbage", "[io][peft]") {
  TempDir tmp("files");
  require_error<lora::FormatError>([&] { (void)lora::io::load_peft<float>(tmp.path); },
                                   {"adapter_config.json", tmp.path.string()});
  std::ofstream(tmp.path / "adapter_config.json") << plain_config();
  require_error<lora::FormatError>([&] { (void)lora::io::load_peft<float>(tmp.path); },
                                   {"adapter_model.safetensors", tmp.path.string()});
  std::ofstream(tmp.path / "adapter_model.bin") << "PK\x03\x04 pickle";
  require_error<lora::FormatError>([&] { (void)lora::io::load_peft<float>(tmp.path); },
                                   {"adapter_model.bin", "pickle", "safe_serialization"});
  std::ofstream(tmp.path / "adapter_model.safetensors") << "garbage!";
  require_error<lora::FormatError>([&] { (void)lora::io::load_peft<float>(tmp.path); },
                                   {"adapter_model.safetensors"});
  std::ofstream(tmp.path / "adapter_config.json") << "{\"peft_type\": \"LORA\", \"r\": }";
  require_error<lora::FormatError>([&] { (void)lora::io::load_peft<float>(tmp.path); },
                                   {"adapter_config.json", "malformed JSON", "byte"});
  // DoRA loads (the forward is checked with the fixtures), but is refused where
  // only additive LoRA fits, and make_peft_dora refuses a plain LoRA module.
  const auto dora = lora::io::load_peft<float>(fixture_dir / "dora");
  REQUIRE(dora.config.use_dora);
  for (const auto& m : dora.modules) CHECK(m.magnitude);
  const auto plain = lora::io::load_peft<float>(fixture_dir / "plain");
  const auto& pm = plain.modules.front();
  require_error<lora::ValueError>(
      [&] { (void)lora::io::make_peft_dora(pm, RowMatrix<float>(RowMatrix<float>::Zero(pm.B.rows(), pm.A.cols()))); },
      {pm.path, "no DoRA magnitude", "AdaptedLinear"});
  const auto& dm = dora.modules.front();
  require_error<lora::ShapeError>(
      [&] { (void)lora::io::make_peft_dora(dm, RowMatrix<float>(RowMatrix<float>::Zero(dm.B.rows() + 1, dm.A.cols()))); },
      {dm.path, "[out, in]"});
}

TEST_CASE("PeftConfig::parse: wrong types are FormatError naming the key, unsupported options ValueError",
          "[io][peft]") {
  struct Row {
    std::string json;
    bool format;  // FormatError, else ValueError
    std::vector<std::string> words;
  };
  const std::vector<Row> rows = {
      {"{", true, {"cfg.json", "malformed JSON", "byte 2"}},
      {"[1, 2]", true, {"cfg.json", "array", "object"}},
      {"{\"peft_type\": \"LORA\", \"lora_alpha\": 1e400}", true, {"cfg.json", "malformed JSON", "1e400"}},
      {"{\"r\": 8}", true, {"cfg.json", "peft_type"}},
      {"{\"peft_type\": 5}", true, {"'peft_type'", "string"}},
      {"{\"peft_type\": \"VERA\"}", false, {"'VERA'", "only LORA"}},
      {"{\"peft_type\": \"LOHA\"}", false, {"'LOHA'"}},
      {"{\"peft_type\": \"LORA\", \"r\": \"8\"}", true, {"'r'", "integer", "string"}},
      {"{\"peft_type\": \"LORA\", \"r\": 2.5}", true, {"'r'", "integer"}},
      {"{\"peft_type\": \"LORA\", \"r\": true}", true, {"'r'", "boolean"}},
      {"{\"peft_type\": \"LORA\", \"r\": null}", true, {"'r'", "null"}},
      {"{\"peft_type\": \"LORA\", \"r\": 0}", false, {"r = 0", "positive"}},
      {"{\"peft_type\": \"LORA\", \"r\": -3}", false, {"r = -3"}},
      {"{\"peft_type\": \"LORA\", \"r\": 99999999999}", false, {"too large"}},
      {"{\"peft_type\": \"LORA\", \"lora_alpha\": \"16\"}", true, {"'lora_alpha'", "number"}},
      {"{\"peft_type\": \"LORA\", \"use_rslora\": \"yes\"}", true, {"'use_rslora'", "true or false"}},
      {"{\"peft_type\": \"LORA\", \"fan_in_fan_out\": 1}", true, {"'fan_in_fan_out'"}},
      {"{\"peft_type\": \"LORA\", \"target_modules\": 5}", true, {"'target_modules'", "list of strings"}},
      {"{\"peft_type\": \"LORA\", \"target_modules\": [\"q\", 1]}", true, {"'target_modules'", "number"}},
      {"{\"peft_type\": \"LORA\", \"target_modules\": \"q(\"}", false, {"target_modules", "q("}},
      {"{\"peft_type\": \"LORA\", \"modules_to_save\": \"score\"}", true, {"'modules_to_save'", "characters"}},
      {"{\"peft_type\": \"LORA\", \"rank_pattern\": []}", true, {"'rank_pattern'", "object"}},
      {"{\"peft_type\": \"LORA\", \"rank_pattern\": {\"q\": \"4\"}}", true, {"rank_pattern['q']", "integer"}},
      {"{\"peft_type\": \"LORA\", \"rank_pattern\": {\"q\": 0}}", false, {"rank_pattern['q']", "positive"}},
      {"{\"peft_type\": \"LORA\", \"rank_pattern\": {\"q(\": 4}}", false, {"rank_pattern", "'q('"}},
      {"{\"peft_type\": \"LORA\", \"rank_pattern\": {\"(a)\\\\1\": 4}}", false, {"rank_pattern", "back-reference"}},
      {"{\"peft_type\": \"LORA\", \"rank_pattern\": {\"(?P<n>q)\": 4}}", false, {"rank_pattern", "(?P<n>q)"}},
      {"{\"peft_type\": \"LORA\", \"alpha_pattern\": {\"q\": [1]}}", true, {"alpha_pattern['q']", "number"}},
      {"{\"peft_type\": \"LORA\", \"bias\": \"some\"}", false, {"bias = 'some'"}},
      {"{\"peft_type\": \"LORA\", \"bias\": 1}", true, {"'bias'"}},
      {"{\"peft_type\": \"LORA\", \"init_lora_weights\": 3}", true, {"'init_lora_weights'"}},
      {"{\"peft_type\": \"LORA\", \"init_lora_weights\": \"pissa_niter_4\"}", false, {"pissa_niter_4", "base weights"}},
      {"{\"peft_type\": \"LORA\", \"init_lora_weights\": \"olora\"}", false, {"olora"}},
      {"{\"peft_type\": \"LORA\", \"init_lora_weights\": \"loftq\"}", false, {"loftq"}},
      {"{\"peft_type\": \"LORA\", \"init_lora_weights\": \"corda\"}", false, {"corda"}},
      {"{\"peft_type\": \"LORA\", \"use_qalora\": true}", false, {"use_qalora"}},
      {"{\"peft_type\": \"LORA\", \"layer_replication\": [[0, 2]]}", false, {"layer_replication"}},
      {"{\"peft_type\": \"LORA\", \"alora_invocation_tokens\": [1, 2]}", false, {"alora_invocation_tokens"}},
      {"{\"peft_type\": \"LORA\", \"trainable_token_indices\": [1]}", false, {"trainable_token_indices"}},
      {"{\"peft_type\": \"LORA\", \"target_parameters\": [\"experts.w\"]}", false, {"target_parameters"}},
      {"{\"peft_type\": \"LORA\", \"use_bdlora\": {\"nblocks\": 2}}", false, {"use_bdlora"}},
      {"{\"peft_type\": \"LORA\", \"arrow_config\": {}}", false, {"arrow_config"}},
      {"{\"peft_type\": \"LORA\", \"kasa_config\": {}}", false, {"kasa_config"}},
      {"{\"peft_type\": \"LORA\", \"monteclora_config\": {}}", false, {"monteclora_config"}},
      {"{\"peft_type\": \"LORA\", \"layers_pattern\": \"layers\"}", false, {"layers_pattern", "layers_to_transform"}},
      {"{\"peft_type\": \"LORA\", \"target_modules\": \".*q\", \"layers_to_transform\": [0]}", false,
       {"layers_to_transform", "string"}},
      {"{\"peft_type\": \"LORA\", \"layers_to_transform\": \"0\"}", true, {"'layers_to_transform'"}},
      {std::string(100, '[') + std::string(100, ']'), true, {"nested deeper"}},
      {"{\"peft_type\": \"LORA\", \"x\": " + std::string(100, '[') + std::string(100, ']') + "}", true,
       {"nested deeper"}},
  };
  for (const Row& row : rows) {
    INFO(row.json);
    if (row.format)
      require_error<lora::FormatError>([&] { (void)PeftConfig::parse(row.json, "cfg.json"); }, row.words);
    else
      require_error<lora::ValueError>([&] { (void)PeftConfig::parse(row.json, "cfg.json"); }, row.words);
  }

  // What does not change the forward is read or ignored: unknown keys, nulls,
  // PEFT's bookkeeping, VeLoRA, an empty target_parameters list.
  const auto c = PeftConfig::parse(
      R"({"peft_type": "LORA", "r": 16, "lora_alpha": 32.5, "future_option": {"a": [1, 2]}, "task_type": null,
          "lora_dropout": 0.1, "velora_config": {"num_groups": 4}, "target_parameters": [], "use_dora": false,
          "megatron_config": {"x": 1}, "runtime_config": {"ephemeral_gpu_offload": true}, "eva_config": {},
          "target_modules": null, "bias": "lora_only", "init_lora_weights": "gaussian", "r": 12,
          "alora_invocation_tokens": [], "layer_replication": [], "use_qalora": false, "arrow_config": null})",
      "ok.json");
  CHECK(c.r == 12);  // a repeated key: the last value wins, as in Python's json
  CHECK(c.lora_alpha == 32.5);
  CHECK(c.bias == "lora_only");
  CHECK_FALSE(c.target_modules);
  CHECK(c.targets("anything.at_all"));
  CHECK(c.options_for("m").alpha == 32.5);
  CHECK(c.options_for("m").rule == lora::Scaling::standard);
  const auto reparsed = PeftConfig::parse(c.to_json(), "again.json");
  CHECK(reparsed.to_json() == c.to_json());
  CHECK(nlohmann::json::parse(c.to_json())["future_option"] == nlohmann::json::parse(R"({"a": [1, 2]})"));
}

TEST_CASE("PeftConfig: rank_pattern / alpha_pattern and target selection follow PEFT (patterns.json)",
          "[io][peft]") {
  const auto table = nlohmann::json::parse(read_text(fixture_dir / "patterns.json"));
  int n = 0;
  for (const auto& row : table["get_pattern_key"]) {
    // Both pattern dicts, in PEFT's order, with distinct values per key.
    nlohmann::ordered_json j = {{"peft_type", "LORA"}, {"r", 1000}, {"lora_alpha", 0.5}};
    nlohmann::ordered_json rp = nlohmann::ordered_json::object(), ap = nlohmann::ordered_json::object();
    int v = 1;
    std::map<std::string, int> value_of;
    for (const auto& k : row["patterns"]) {
      value_of[k.get<std::string>()] = v;
      rp[k.get<std::string>()] = v;
      ap[k.get<std::string>()] = v + 0.25;
      ++v;
    }
    j["rank_pattern"] = rp;
    j["alpha_pattern"] = ap;
    const auto c = PeftConfig::parse(j.dump(), "patterns.json");
    const std::string path = row["path"];
    INFO(row.dump());
    if (row["key"].is_null()) {
      CHECK(c.rank_pattern_key(path) == nullptr);
      CHECK(c.rank_for(path) == 1000);
      CHECK(c.alpha_for(path) == 0.5);
    } else {
      const std::string key = row["key"];
      REQUIRE(c.rank_pattern_key(path) != nullptr);
      CHECK(*c.rank_pattern_key(path) == key);
      CHECK(c.rank_for(path) == value_of[key]);
      CHECK(c.alpha_for(path) == value_of[key] + 0.25);
    }
    ++n;
  }
  CHECK(n >= 25);
  n = 0;
  for (const auto& row : table["check_target_module_exists"]) {
    INFO(row.dump());
    const auto c = PeftConfig::parse(row["config"].dump(), "patterns.json");
    CHECK(c.targets(row["path"].get<std::string>()) == row["targets"].get<bool>());
    ++n;
  }
  CHECK(n >= 25);
}
