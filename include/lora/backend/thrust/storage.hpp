// backend/thrust/storage.hpp: device storage for the Thrust backend.
//   DeviceMatrix<T, Rows, Cols>   owning, row-major, thrust::device_vector inside
//   DeviceMatrixView<T>          non-owning, over a raw device pointer with a row
//                                  stride (the caller's buffers); T const = read-only
// Both know their extents (static where given, like RowMatrix<T, Rows, Cols>),
// and give plain pointers to the functors in kernels.hpp.
#pragma once

#ifndef LORA_THRUST_UMBRELLA_INCLUDED
#error "Include <lora/thrust.hpp> instead of lora/backend/thrust/storage.hpp."
#endif

#include <thrust/device_vector.h>

#include <type_traits>
#include <utility>

#include "../../config.hpp"
#include "../../error.hpp"
#include "../traits.hpp"

namespace lora {

struct ThrustBackend;

/// A row-major [rows, cols] window over device memory: element (i, j) lives at
/// data()[i * stride() + j]. Does not own; T = const U gives a read-only view.
/// Trivially copyable, so functors carry it into kernels by value.
template <class T, int Rows = dynamic, int Cols = dynamic>
class DeviceMatrixView {
 public:
  using element_type = T;
  using scalar = std::remove_const_t<T>;
  static constexpr int rows_at_compile_time = Rows;
  static constexpr int cols_at_compile_time = Cols;

  DeviceMatrixView() = default;
  /// A view of `rows` x `cols` elements at `data`, rows `stride` elements apart
  /// (stride = cols when negative: a contiguous matrix).
  LORA_HOST_DEVICE DeviceMatrixView(T* data, index_t rows, index_t cols, index_t stride = -1)
      : data_(data), rows_(rows), cols_(cols), stride_(stride < 0 ? cols : stride) {}
  /// Mutable views convert to read-only ones, and static extents to dynamic ones.
  template <class U, int R, int C>
    requires(std::is_convertible_v<U*, T*> && extents_agree(Rows, R) && extents_agree(Cols, C))
  LORA_HOST_DEVICE DeviceMatrixView(const DeviceMatrixView<U, R, C>& o)  // NOLINT: implicit by design
      : data_(o.data()), rows_(o.rows()), cols_(o.cols()), stride_(o.stride()) {}

  LORA_HOST_DEVICE T* data() const { return data_; }
  LORA_HOST_DEVICE index_t rows() const { return rows_; }
  LORA_HOST_DEVICE index_t cols() const { return cols_; }
  LORA_HOST_DEVICE index_t stride() const { return stride_; }
  LORA_HOST_DEVICE index_t size() const { return rows_ * cols_; }
  LORA_HOST_DEVICE bool contiguous() const { return stride_ == cols_ || rows_ <= 1; }
  /// Device code only on CUDA (the memory is the GPU's); any code on OMP/CPP.
  LORA_HOST_DEVICE T& operator()(index_t i, index_t j) const { return data_[i * stride_ + j]; }

 private:
  T* data_ = nullptr;
  index_t rows_ = 0, cols_ = 0, stride_ = 0;
};

/// Read-only view.
template <class T, int Rows = dynamic, int Cols = dynamic>
using DeviceMatrixConstView = DeviceMatrixView<const T, Rows, Cols>;

/// An owning row-major matrix in the device system's memory (GPU memory on CUDA,
/// host memory on OMP/CPP). Copying copies the data; moving does not.
template <class T, int Rows = dynamic, int Cols = dynamic>
class DeviceMatrix {
 public:
  using scalar = T;
  static constexpr int rows_at_compile_time = Rows;
  static constexpr int cols_at_compile_time = Cols;

  /// Empty, or [Rows, Cols] (zero-filled) when both extents are static.
  DeviceMatrix() : storage_(static_cast<std::size_t>(static_size)) {}
  /// Zero-filled [rows, cols].
  DeviceMatrix(index_t rows, index_t cols) { resize(rows, cols); }
  /// A vector [size] (Cols == 1), like Eigen's VectorX(size).
  explicit DeviceMatrix(index_t size)
    requires(Cols == 1)
  {
    resize(size, 1);
  }

  index_t rows() const { return rows_; }
  index_t cols() const { return cols_; }
  index_t stride() const { return cols_; }
  index_t size() const { return rows_ * cols_; }
  T* data() { return thrust::raw_pointer_cast(storage_.data()); }
  const T* data() const { return thrust::raw_pointer_cast(storage_.data()); }
  thrust::device_vector<T>& storage() { return storage_; }
  const thrust::device_vector<T>& storage() const { return storage_; }

  /// New extents; keeps no values (the contents are unspecified, as Eigen's).
  void resize(index_t rows, index_t cols) {
    if ((Rows != dynamic && rows != Rows) || (Cols != dynamic && cols != Cols) || rows < 0 || cols < 0)
      detail::raise<ShapeError>("DeviceMatrix::resize: [", rows, ", ", cols, "] requested for a matrix with ",
                                 "static extents [", Rows, ", ", Cols, "] (-1 = dynamic)");
    const auto n = static_cast<std::size_t>(detail::checked_mul("DeviceMatrix::resize", rows, cols));
    if (n != storage_.size()) storage_.resize(n);
    rows_ = rows;
    cols_ = cols;
  }

  DeviceMatrixView<T, Rows, Cols> view() { return {data(), rows_, cols_, cols_}; }
  DeviceMatrixView<const T, Rows, Cols> view() const { return {data(), rows_, cols_, cols_}; }
  operator DeviceMatrixView<T, Rows, Cols>() { return view(); }              // NOLINT: implicit by design
  operator DeviceMatrixView<const T, Rows, Cols>() const { return view(); }  // NOLINT

 private:
  static constexpr index_t static_size = Rows != dynamic && Cols != dynamic ? index_t(Rows) * Cols : 0;
  thrust::device_vector<T> storage_;
  index_t rows_ = Rows == dynamic ? 0 : Rows;
  index_t cols_ = Cols == dynamic ? 0 : Cols;
};

/// A view of an owned matrix (or the view itself).
template <class T, int R, int C>
auto view(DeviceMatrix<T, R, C>& m) {
  return m.view();
}
template <class T, int R, int C>
auto view(const DeviceMatrix<T, R, C>& m) {
  return m.view();
}
template <class T, int R, int C>
auto view(const DeviceMatrixView<T, R, C>& v) {
  return v;
}

template <class T, int R, int C>
struct matrix_traits<DeviceMatrix<T, R, C>> {
  static constexpr bool known = true;
  using scalar = T;
  using backend = ThrustBackend;
  static constexpr int rows = R;
  static constexpr int cols = C;
  static constexpr bool writable = true;
  static constexpr bool vector = C == 1;
};

template <class T, int R, int C>
struct matrix_traits<DeviceMatrixView<T, R, C>> {
  static constexpr bool known = true;
  using scalar = std::remove_const_t<T>;
  using backend = ThrustBackend;
  static constexpr int rows = R;
  static constexpr int cols = C;
  static constexpr bool writable = !std::is_const_v<T>;
  static constexpr bool vector = C == 1;
};

}  // namespace lora
