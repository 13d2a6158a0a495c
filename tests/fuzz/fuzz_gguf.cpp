// fuzz_gguf.cpp: libFuzzer target for <lora/io/gguf.hpp>. Any input must either parse or
// throw a lora::Error; a parsed file must decode every tensor (or refuse its type with a
// lora::Error), survive load_gguf_lora the same way, and re-serialise through GgufWriter into
// a file that parses to the same KVs and tensor bytes (checked by writing it a second time).
// Run: scripts/fuzz --runs 1000000 gguf (seeds: tests/fixtures/**/*.gguf).
#include <lora/io/gguf.hpp>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <vector>

namespace {

lora::io::GgufWriter rebuild(const lora::io::GgufFile& f) {
  lora::io::GgufWriter w;
  for (const auto& kv : f.kvs()) w.add(kv.key, kv.value);
  for (const auto& t : f.tensors()) {
    const auto bytes = f.tensor_bytes(t.name);
    w.add_tensor_raw(t.name, t.ne, t.type, {bytes.begin(), bytes.end()});
  }
  return w;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  std::vector<std::byte> bytes(size);
  if (size) std::memcpy(bytes.data(), data, size);
  std::optional<lora::io::GgufFile> parsed;
  try {
    parsed.emplace(lora::io::GgufFile::from_bytes(std::move(bytes), "fuzz"));
  } catch (const lora::Error&) {
    return 0;  // refused: the expected outcome for most inputs
  }
  const lora::io::GgufFile& f = *parsed;
  double sink = 0;
  for (const auto& t : f.tensors()) {
    try {
      const auto m = f.read<float>(t.name);
      if (m.size() > 0) sink += m.data()[0];
    } catch (const lora::FormatError&) {  // a type read() does not decode
    }
  }
  try {
    const auto a = lora::io::load_gguf_lora(f);
    for (const auto& [name, t] : a.tensors) sink += a.scale(name) + static_cast<double>(t.rank());
  } catch (const lora::Error&) {
  }
  // Round trip, outside any try: what parsed must write, and what was written must parse
  // back to the same KVs and tensor bytes (an exception here is a finding too).
  const auto once = rebuild(f).to_bytes();
  const auto g = lora::io::GgufFile::from_bytes(once, "rebuilt");
  if (rebuild(g).to_bytes() != once) std::abort();
  if (g.kvs().size() != f.kvs().size() || g.tensors().size() != f.tensors().size()) std::abort();
  for (const auto& t : f.tensors()) {
    const auto x = f.tensor_bytes(t.name), y = g.tensor_bytes(t.name);
    if (x.size() != y.size() || (!x.empty() && std::memcmp(x.data(), y.data(), x.size()) != 0)) std::abort();
  }
  if (sink == 12345.678) std::abort();  // keeps the reads
  return 0;
}
