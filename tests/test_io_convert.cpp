// PEFT <-> GGUF conversion and PEFT adapters in an AdapterSet (<lora/io/convert.hpp>),
// against the PEFT fixtures' own outputs (tests/fixtures/peft, scripts/gen_peft_fixtures.py).
#include <catch2/catch.hpp>

#include <lora/io/convert.hpp>

#include <atomic>
#include <filesystem>
#include <string>
#include <vector>

namespace fs = std::filesystem;
using lora::RowMatrix;
using namespace lora::io;

namespace {

const fs::path fixtures = fs::path(LORA_TEST_FIXTURE_DIR) / "peft";
using Layer = lora::MultiAdapterLinear<RowMatrix<float>>;
using Vec = Eigen::VectorXf;

/// A fresh directory under the system's temp dir, removed at scope exit.
struct TempDir {
  fs::path path;
  TempDir() {
    static std::atomic<int> counter{0};
    path = fs::temp_directory_path() / ("lora_convert_" + std::to_string(::getpid()) + "_" + std::to_string(counter++));
    fs::create_directories(path);
  }
  ~TempDir() { fs::remove_all(path); }
};

const std::vector<std::string> linear_paths = {
    "model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj",
    "model.layers.1.self_attn.q_proj", "model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"};

/// The fixture model's linear layers as an AdapterSet over its base weights and biases.
lora::AdapterSet<Layer> fixture_set(const std::vector<std::string>& paths = linear_paths) {
  const auto base = SafetensorsFile::open(fixtures / "base.safetensors");
  lora::AdapterSet<Layer> set;
  for (const auto& p : paths) {
    RowMatrix<float> w = base.read<float>(p + ".weight");
    if (base.contains(p + ".bias"))
      set.insert(p, Layer{std::move(w), base.read_vector<float>(p + ".bias")});
    else
      set.insert(p, Layer{std::move(w)});
  }
  return set;
}

double rel_err(const RowMatrix<float>& got, const RowMatrix<float>& want) {
  REQUIRE(got.rows() == want.rows());
  REQUIRE(got.cols() == want.cols());
  return (got.cast<double>() - want.cast<double>()).norm() / want.cast<double>().norm();
}

/// s B A in double.
Eigen::MatrixXd delta_of(const RowMatrix<float>& B, const RowMatrix<float>& A, double s) {
  return s * B.cast<double>() * A.cast<double>();
}

}  // namespace

TEST_CASE("add_peft_adapter: each PEFT adapter, hot-swapped in one AdapterSet, gives PEFT's outputs",
          "[io][convert]") {
  auto set = fixture_set();
  const auto inputs = SafetensorsFile::open(fixtures / "inputs.safetensors");
  const std::vector<std::string> names = {"plain", "rslora", "patterns"};
  for (const auto& n : names) add_peft_adapter(set, load_peft<float>(fixtures / n), n);
  CHECK(set.adapters().size() == 3);

  for (const auto& n : names) {
    set.set_active(n);
    const auto ref = SafetensorsFile::open(fixtures / "ref" / (n + ".safetensors"));
    int checked = 0;
    for (const auto& p : linear_paths) {
      if (!ref.contains("y." + p)) continue;
      const RowMatrix<float> x = inputs.read<float>("x." + p);
      const RowMatrix<float> y = set.layer(p).forward(x);
      INFO(n << " " << p);
      CHECK(rel_err(y, ref.read<float>("y." + p)) <= 1e-6);
      ++checked;
    }
    CHECK(checked == 6);
  }

  // Two adapters at once: the adapters' contributions add (PEFT's outputs minus the base's).
  set.set_active({{"plain", 1.0}, {"rslora", 1.0}});
  const auto base_ref = SafetensorsFile::open(fixtures / "ref" / "base.safetensors");
  const auto plain = SafetensorsFile::open(fixtures / "ref" / "plain.safetensors");
  const auto rs = SafetensorsFile::open(fixtures / "ref" / "rslora.safetensors");
  for (const auto& p : linear_paths) {
    const RowMatrix<float> x = inputs.read<float>("x." + p);
    const RowMatrix<float> b = base_ref.read<float>("y." + p);
    const RowMatrix<float> want = plain.read<float>("y." + p) + rs.read<float>("y." + p) - b;
    INFO(p);
    CHECK(rel_err(set.layer(p).forward(x), want) <= 1e-5);
  }
}

TEST_CASE("add_peft_adapter refuses what a MultiAdapterLinear cannot hold, and adds nothing", "[io][convert]") {
  auto set = fixture_set();
  const auto refuses = [&](const char* fixture, const char* words) {
    INFO(fixture);
    CHECK_THROWS_WITH(add_peft_adapter(set, load_peft<float>(fixtures / fixture), fixture),
                      Catch::Contains(words));
    CHECK_FALSE(set.contains_adapter(fixture));
  };
  refuses("lora_bias", "lora_B.bias");
  refuses("modules_to_save", "modules_to_save");

  // A module path the set does not have: the modules added before it are removed again.
  auto partial = fixture_set({"model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj"});
  CHECK_THROWS_AS(add_peft_adapter(partial, load_peft<float>(fixtures / "plain")), lora::ValueError);
  CHECK_FALSE(partial.contains_adapter("default"));
  CHECK(partial.layer("model.layers.0.self_attn.q_proj").names().empty());

  add_peft_adapter(set, load_peft<float>(fixtures / "plain"), "p");
  CHECK_THROWS_WITH(add_peft_adapter(set, load_peft<float>(fixtures / "plain"), "p"),
                    Catch::Contains("already in the set"));
}

TEST_CASE("peft_to_gguf folds each module's PEFT scale into B; gguf_to_peft gives the same deltas back",
          "[io][convert]") {
  // rank_pattern / alpha_pattern and rsLoRA: per-module scales a single GGUF alpha cannot express.
  for (const char* fixture : {"patterns", "rslora", "plain"}) {
    INFO(fixture);
    const auto a = load_peft<float>(fixtures / fixture);
    const GgufLoraAdapter g = peft_to_gguf(a, "llama");
    CHECK(g.alpha == a.config.lora_alpha);
    REQUIRE(g.tensors.size() == a.modules.size());
    for (const auto& m : a.modules) {
      const std::string name = *gguf_tensor_name(m.path);
      const GgufLoraTensor& t = g.tensors.at(name);
      const Eigen::MatrixXd want = delta_of(m.B, m.A, m.scale());
      const Eigen::MatrixXd got = delta_of(t.B, t.A, g.scale(name));
      INFO(m.path << " -> " << name << ", PEFT scale " << m.scale() << ", file scale " << g.scale(name));
      CHECK((got - want).norm() <= 1e-6 * want.norm());
    }

    // Through a file and back: the same module paths and deltas, and a config PEFT can read.
    TempDir dir;
    save_gguf_lora(g, dir.path / "a.gguf");
    const PeftAdapter<float> back = gguf_to_peft<float>(load_gguf_lora(dir.path / "a.gguf"));
    REQUIRE(back.modules.size() == a.modules.size());
    for (const auto& m : a.modules) {
      const auto& b = back.module(m.path);
      const Eigen::MatrixXd want = delta_of(m.B, m.A, m.scale());
      CHECK((delta_of(b.B, b.A, b.scale()) - want).norm() <= 1e-6 * want.norm());
    }
    save_peft(back, dir.path / "peft");  // refuses a config that does not describe the modules
    const auto again = load_peft<float>(dir.path / "peft");
    for (const auto& m : back.modules) CHECK(again.module(m.path).scale() == Approx(m.scale()).epsilon(1e-12));
  }
}

TEST_CASE("peft_to_gguf permutes q / k rows for llama.cpp's RoPE, gguf_to_peft undoes it", "[io][convert]") {
  const auto make = [](std::string path, lora::index_t out, lora::index_t in, lora::index_t r, float seed) {
    PeftModule<float> m;
    m.path = std::move(path);
    m.A = RowMatrix<float>(r, in);
    m.B = RowMatrix<float>(out, r);
    for (lora::index_t i = 0; i < m.A.size(); ++i) m.A.data()[i] = seed + 0.01f * float(i);
    for (lora::index_t i = 0; i < m.B.size(); ++i) m.B.data()[i] = -seed + 0.03f * float(i);
    m.options = {.alpha = 2.0 * double(r)};
    return m;
  };
  std::vector<PeftModule<float>> mods;
  mods.push_back(make("model.layers.0.self_attn.q_proj", 16, 16, 2, 1.0f));
  mods.push_back(make("model.layers.0.self_attn.k_proj", 8, 16, 2, 2.0f));
  mods.push_back(make("model.layers.0.self_attn.v_proj", 8, 16, 2, 3.0f));
  const auto a = make_peft_adapter(std::move(mods));
  const LlamaHeads heads{.n_head = 4, .n_head_kv = 2};
  const GgufLoraAdapter g = peft_to_gguf(a, "llama", heads);
  // Every module's scale is the file's (alpha / r), so B is permuted, not rescaled.
  const auto& q = a.module("model.layers.0.self_attn.q_proj");
  const auto& k = a.module("model.layers.0.self_attn.k_proj");
  const auto& v = a.module("model.layers.0.self_attn.v_proj");
  CHECK(g.tensors.at("blk.0.attn_q.weight").B == llama_rope_permute_rows(q.B, 4));
  CHECK(g.tensors.at("blk.0.attn_k.weight").B == llama_rope_permute_rows(k.B, 2));
  CHECK(g.tensors.at("blk.0.attn_v.weight").B == v.B);
  CHECK(g.tensors.at("blk.0.attn_q.weight").B != q.B);  // the permutation moved rows

  const auto back = gguf_to_peft<float>(g, heads);
  CHECK(back.module(q.path).B == q.B);
  CHECK(back.module(k.path).B == k.B);
  CHECK(back.module(v.path).A == v.A);
}

TEST_CASE("peft_to_gguf refuses what a GGUF LoRA adapter cannot carry, by name", "[io][convert]") {
  CHECK_THROWS_WITH(peft_to_gguf(load_peft<float>(fixtures / "fan_in_fan_out"), "gpt2"),
                    Catch::Contains("attn.c_attn") && Catch::Contains("no GGUF tensor name"));
  CHECK_THROWS_WITH(peft_to_gguf(load_peft<float>(fixtures / "lora_bias"), "llama"),
                    Catch::Contains("lora_B.bias"));
  CHECK_THROWS_WITH(peft_to_gguf(load_peft<float>(fixtures / "modules_to_save"), "llama"),
                    Catch::Contains("full tensor"));
  GgufLoraAdapter g;
  g.tensors["blk.0.unknown_thing.weight"] = {RowMatrix<float>::Ones(1, 4), RowMatrix<float>::Ones(4, 1)};
  CHECK_THROWS_WITH(gguf_to_peft<float>(g), Catch::Contains("blk.0.unknown_thing.weight"));
}
