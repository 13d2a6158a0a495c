// 05: a PEFT adapter in and out. Loads an adapter directory saved by Python's PEFT
// (default: tests/fixtures/peft/patterns, rank and alpha patterns over a toy model
// whose base weights are in tests/fixtures/peft/base.safetensors), prints what it
// holds, runs the adapted layers against PEFT's own outputs, merges, and saves the
// adapter again as PEFT (which PeftModel.from_pretrained loads) and as a llama.cpp
// GGUF adapter (each module's scale folded into B), then reads both back.
//
//   05_peft_roundtrip [ADAPTER_DIR [BASE.safetensors]] [--out DIR]
#include <lora/io/convert.hpp>

#include <cstdio>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

namespace fs = std::filesystem;
using lora::RowMatrix;
using namespace lora::io;

namespace {

double max_rel(const RowMatrix<float>& a, const RowMatrix<float>& b) {
  return (a - b).cwiseAbs().maxCoeff() / std::max(1e-30f, b.cwiseAbs().maxCoeff());
}

}  // namespace

int main(int argc, char** argv) try {
  fs::path fixtures = LORA_EXAMPLE_PEFT_DIR;
  fs::path adapter_dir = fixtures / "patterns", base_file = fixtures / "base.safetensors";
  fs::path out = "build/peft_roundtrip";
  std::vector<std::string> positional;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--out") == 0 && i + 1 < argc)
      out = argv[++i];
    else
      positional.emplace_back(argv[i]);
  }
  if (!positional.empty()) adapter_dir = positional[0];
  if (positional.size() > 1) base_file = positional[1];

  // 1. What the adapter holds.
  const PeftAdapter<float> a = load_peft<float>(adapter_dir);
  std::printf("adapter %s (%s): r = %d, lora_alpha = %g, rsLoRA %s, %zu modules\n\n", adapter_dir.string().c_str(),
              a.config.peft_type.c_str(), a.config.r, a.config.lora_alpha, a.config.use_rslora ? "on" : "off",
              a.modules.size());
  std::printf("%-34s %5s %6s %7s %9s %6s %9s\n", "module", "rank", "alpha", "rule", "scale", "dtype", "bytes");
  std::size_t total = 0;
  for (const auto& m : a.modules) {
    const std::size_t bytes = std::size_t(m.A.size() + m.B.size()) * dtype_size(m.stored);
    total += bytes;
    std::printf("%-34s %5ld %6g %7s %9.4f %6s %9zu\n", m.path.c_str(), long(m.rank()), m.options.alpha,
                m.options.rule == lora::Scaling::rslora ? "rslora" : "alpha/r", m.scale(),
                std::string(dtype_name(m.stored)).c_str(), bytes);
  }
  std::printf("%-34s %47zu\n\n", "total", total);

  // 2. The adapted layers: base weights from safetensors, the adapter on top (hot-swappable).
  const SafetensorsFile base = SafetensorsFile::open(base_file);
  lora::AdapterSet<lora::MultiAdapterLinear<RowMatrix<float>>> model;
  for (const auto& m : a.modules) {
    const std::string w = m.path + ".weight", b = m.path + ".bias";
    if (base.contains(b))
      model.insert(m.path, {base.read<float>(w), base.read_vector<float>(b)});
    else
      model.insert(m.path, lora::MultiAdapterLinear<RowMatrix<float>>{base.read<float>(w)});
  }
  add_peft_adapter(model, a, "loaded");
  model.set_active("loaded");

  // PEFT's outputs for the fixture's inputs, when they are next to it.
  const fs::path inputs_file = fixtures / "inputs.safetensors";
  const fs::path ref_file = fixtures / "ref" / (adapter_dir.filename().string() + ".safetensors");
  const bool have_ref = positional.empty() && fs::exists(inputs_file) && fs::exists(ref_file);
  std::printf("%-34s %12s %14s %14s\n", "module", "adapter's", "vs PEFT", "merged vs");
  std::printf("%-34s %12s %14s %14s\n", "", "effect", "(max rel)", "unmerged");
  for (const auto& m : a.modules) {
    RowMatrix<float> x;
    if (have_ref)
      x = SafetensorsFile::open(inputs_file).read<float>("x." + m.path);
    else
      x = RowMatrix<float>::Random(4, model.layer(m.path).in_features());
    auto& layer = model.layer(m.path);
    const RowMatrix<float> y = layer.forward(x);
    model.set_active({});
    const RowMatrix<float> y0 = layer.forward(x);
    model.set_active("loaded");
    // 3. Merged: W + s B A computed once, the same outputs with no adapter cost.
    layer.merge_active();
    const RowMatrix<float> ym = layer.forward(x);
    layer.unmerge();
    std::string vs_peft = "-";
    if (have_ref) {
      char buf[32];
      std::snprintf(buf, sizeof buf, "%.1e", max_rel(y, SafetensorsFile::open(ref_file).read<float>("y." + m.path)));
      vs_peft = buf;
    }
    std::printf("%-34s %11.1f%% %14s %14.1e\n", m.path.c_str(), 100.0 * max_rel(y, y0), vs_peft.c_str(),
                max_rel(ym, y));
  }

  // 4. Out again: PEFT (PeftModel.from_pretrained loads it) and GGUF (llama.cpp's --lora).
  fs::create_directories(out);
  save_peft(a, out / "peft");
  const GgufLoraAdapter g = peft_to_gguf(a, "llama");
  save_gguf_lora(g, out / "adapter.gguf");
  const auto peft_back = load_peft<float>(out / "peft");
  const auto gguf_back = gguf_to_peft<float>(load_gguf_lora(out / "adapter.gguf"));
  double worst_peft = 0, worst_gguf = 0;
  for (const auto& m : a.modules) {
    const RowMatrix<float> d = (m.scale() * m.B.cast<double>() * m.A.cast<double>()).cast<float>();
    const auto delta = [](const PeftModule<float>& p) {
      return RowMatrix<float>((p.scale() * p.B.cast<double>() * p.A.cast<double>()).cast<float>());
    };
    worst_peft = std::max(worst_peft, max_rel(delta(peft_back.module(m.path)), d));
    worst_gguf = std::max(worst_gguf, max_rel(delta(gguf_back.module(m.path)), d));
  }
  std::printf("\nsaved %s (PEFT) and %s (GGUF, alpha %g, per-module scales folded into B)\n",
              (out / "peft").string().c_str(), (out / "adapter.gguf").string().c_str(), g.alpha);
  std::printf("read back: s B A max rel difference %.1e (PEFT), %.1e (GGUF)\n", worst_peft, worst_gguf);
  return 0;
} catch (const lora::Error& e) {
  std::fprintf(stderr, "05_peft_roundtrip: %s\n", e.what());
  return 1;
}
