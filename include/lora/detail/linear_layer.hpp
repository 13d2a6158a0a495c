// linear_layer.hpp: what every linear layer (AdaptedLinear, MergedLinear,
// DoRALinear, MultiAdapterLinear) shares: the run-time shape checks, so every
// layer words an error the same way, and the convenience forwards.
#pragma once

#include <utility>

#include "../backend/traits.hpp"
#include "../config.hpp"
#include "../error.hpp"

namespace lora::detail {

/// The run-time half of a forward's check: X is [n, in], Y is [n, out], and
/// they do not share memory (Backend::overlaps).
template <class Backend, class X, class Y>
void check_linear_io(const char* where, const X& x, const Y& y, index_t in, index_t out) {
  if (x.cols() != in) raise<ShapeError>(where, ": X has ", x.cols(), " columns, expected in_features = ", in);
  if (y.rows() != x.rows() || y.cols() != out)
    raise<ShapeError>(where, ": Y is [", y.rows(), ", ", y.cols(), "], expected [n, out] = [", x.rows(), ", ", out,
                      "]");
  if (Backend::overlaps(x, y)) raise<ShapeError>(where, ": X and Y share memory; forward cannot run in place");
}

/// A bias must have out_features entries. The layers call this when they are
/// built with a bias, and again before each use, because bias() is writable.
template <class V>
void check_bias_length(const char* where, const V& bias, index_t out) {
  if (bias.rows() != out) raise<ShapeError>(where, ": bias has ", bias.rows(), " entries, expected out_features = ", out);
}

/// A delta must be [out, in], the shape of W. The layers check this when they
/// are built, and again before each use, because a factor can be resized
/// through delta().A() or delta().B().
template <class D>
void check_delta_shape(const char* where, const D& delta, index_t out, index_t in) {
  delta.check_consistent(where);
  if (delta.out_features() != out || delta.in_features() != in)
    raise<ShapeError>(where, ": the base weight is [out, in] = [", out, ", ", in, "] but the delta is [",
                      delta.out_features(), ", ", delta.in_features(), "]");
}

/// Moving a layer to another backend (lora::to_device / to_host, through
/// transferred(move)) needs it unmerged: a merged base holds the adapter's term,
/// which the other side could not take out again.
inline void check_movable(const char* where, bool merged) {
  if (merged)
    raise<ValueError>(where, ": the layer is merged; unmerge() it first (a merged base weight cannot be split "
                             "back into base and adapter on the other side)");
}

/// The convenience forwards of a linear layer, written once. There are two:
/// one without a workspace (it makes one per call), and one that returns Y
/// (for a compile-time vector x [in], a vector y [out]). Layer derives from
/// LinearForwards<Layer>, says `using detail::LinearForwards<Layer>::forward;`,
/// and provides forward(x, y, workspace&) with the typedefs backend, scalar
/// and workspace.
template <class Layer>
class LinearForwards {
 public:
  template <Matrix X, Matrix Y>
  void forward(const X& x, Y&& y) const {
    typename Layer::workspace ws;
    self().forward(x, std::forward<Y>(y), ws);
  }

  template <Matrix X>
  auto forward(const X& x) const {
    using backend = typename Layer::backend;
    using scalar = typename Layer::scalar;
    if constexpr (matrix_traits_t<X>::vector) {
      typename backend::template vector<scalar> y(self().out_features());
      forward(backend::as_row(x), backend::as_row(y));
      return y;
    } else {
      typename backend::template matrix<scalar> y;
      backend::resize(y, x.rows(), self().out_features());
      forward(x, y);
      return y;
    }
  }

 private:
  const Layer& self() const { return static_cast<const Layer&>(*this); }
};

}  // namespace lora::detail
