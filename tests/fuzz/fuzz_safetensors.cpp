// libFuzzer target: any bytes through SafetensorsFile::from_bytes. Bad input
// must give a lora::Error and nothing else (no crash, sanitizer report,
// other exception). Every file it accepts must read, and must survive a
// rewrite through SafetensorsWriter unchanged: same tensors, same bytes.
//   scripts/fuzz --runs 1000000 safetensors
#include <lora/io/safetensors.hpp>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <vector>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  using namespace lora::io;
  std::vector<std::byte> bytes(size);
  if (size) std::memcpy(bytes.data(), data, size);
  std::optional<SafetensorsFile> file;
  try {
    file.emplace(SafetensorsFile::from_bytes(std::move(bytes), "fuzz"));
  } catch (const lora::Error&) {
    return 0;
  }
  const SafetensorsFile& f = *file;
  SafetensorsWriter w;
  for (const auto& [k, v] : f.metadata()) w.set_metadata(k, v);
  for (const TensorInfo& t : f.tensors()) {
    try {
      const lora::RowMatrix<float> m = f.read<float>(t.name);
      if (m.size() != t.numel()) std::abort();
    } catch (const lora::Error&) {
    }
    try {
      const auto v = f.view<Eigen::bfloat16>(t.name);
      if (v.size() != t.numel()) std::abort();
    } catch (const lora::Error&) {
    }
    try {
      (void)f.read_vector<double>(t.name);
    } catch (const lora::Error&) {
    }
    const auto b = f.bytes(t.name);
    if (b.size() != t.end - t.begin) std::abort();
    w.add_raw(t.name, t.dtype, t.shape, b);  // must not throw: the file was valid
  }
  // The rewrite is canonical (sorted, padded); reading it back gives the same tensors.
  const SafetensorsFile g = SafetensorsFile::from_bytes(w.to_bytes(), "rewrite");
  if (g.tensors().size() != f.tensors().size() || g.metadata() != f.metadata()) std::abort();
  for (const TensorInfo& t : f.tensors()) {
    const TensorInfo& u = g.info(t.name);
    const auto a = f.bytes(t.name), b = g.bytes(t.name);
    if (u.dtype != t.dtype || u.shape != t.shape || a.size() != b.size() ||
        (a.size() && std::memcmp(a.data(), b.data(), a.size()) != 0))
      std::abort();
  }
  return 0;
}
