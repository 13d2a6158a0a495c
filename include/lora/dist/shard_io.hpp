// dist/shard_io.hpp: this rank's shard of a base weight in a safetensors file,
// without reading the rest of the tensor. Needs lora::io (nlohmann_json); the
// other <lora/dist/...> headers do not include this one.
//
//   auto file = lora::io::SafetensorsFile::open("model.safetensors");   // mmap: nothing read yet
//   const auto s = lora::dist::split(out, world.size(), world.rank());
//   auto Wq = lora::dist::row_shard_view<float>(file, "...q_proj.weight", s);   // column-parallel W
//   const auto c = lora::dist::split(in, world.size(), world.rank());
//   auto Wo = lora::dist::column_shard_view<float>(file, "...o_proj.weight", c); // row-parallel W
//
// A row shard (column-parallel W: output rows [offset, offset + count)) is one
// contiguous byte range of the tensor: an Eigen::Map over it, no copy; the
// kernel reads only those pages of the mapping. A column shard (row-parallel W:
// input columns) is count elements out of every row: an Eigen::Map with an
// outer stride of in, no copy either. AdaptedLinear takes both as its base
// (the products read strided rows directly), read-only: merge() needs a
// writable base, so copy once into an owned RowMatrix<T> where the shard will
// be merged (RowMatrix<T> w = view;). Pages: a column shard touches every row
// of the tensor, so the OS pages in whole 4 KiB pages around each row's slice;
// it reads only its share of the file when count * sizeof(T) spans several pages.
// The dtype must be T's exactly (view<T>'s rule); a bf16 / fp16 base is viewed
// as Eigen::bfloat16 / Eigen::half and converted by the caller.
#pragma once

#include <string_view>

#include "../io/safetensors.hpp"
#include "communicator.hpp"

namespace lora::dist {

/// Output rows [s.offset, s.offset + s.count) of tensor `name` in `source` (an
/// io::SafetensorsFile or a sharded checkpoint: anything with view<T>(name)):
/// a contiguous view into the mapping.
template <class T, class Source>
Eigen::Map<const RowMatrix<T>> row_shard_view(const Source& source, std::string_view name, Shard s) {
  const auto whole = source.template view<T>(name);
  if (s.offset < 0 || s.count < 0 || s.offset + s.count > whole.rows())
    lora::detail::raise<ShapeError>("dist::row_shard_view: rows [", s.offset, ", ", s.offset + s.count, ") of tensor '",
                                    name, "', which has ", whole.rows(), " rows");
  return {whole.data() + s.offset * whole.cols(), s.count, whole.cols()};
}

/// Input columns [s.offset, s.offset + s.count) of tensor `name`: a view with
/// an outer stride of the tensor's column count.
template <class T, class Source>
Eigen::Map<const RowMatrix<T>, 0, Eigen::OuterStride<>> column_shard_view(const Source& source, std::string_view name,
                                                                          Shard s) {
  const auto whole = source.template view<T>(name);
  if (s.offset < 0 || s.count < 0 || s.offset + s.count > whole.cols())
    lora::detail::raise<ShapeError>("dist::column_shard_view: columns [", s.offset, ", ", s.offset + s.count,
                                    ") of tensor '", name, "', which has ", whole.cols(), " columns");
  return {whole.data() + s.offset, whole.rows(), s.count, Eigen::OuterStride<>(whole.cols())};
}

}  // namespace lora::dist
