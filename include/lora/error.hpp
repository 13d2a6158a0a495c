// error.hpp: the typed exceptions thrown for bad input. Every message names the
// function and the offending values, e.g.
//   "AdaptedLinear::forward: X has 768 columns, expected in_features = 4096".
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace lora {

/// Base class of every exception the library throws.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// A runtime shape mismatch (rows, columns, token count, workspace size).
class ShapeError : public Error {
 public:
  using Error::Error;
};

/// A rank outside 0 < r <= min(in, out), or ranks that do not agree.
class RankError : public Error {
 public:
  using Error::Error;
};

/// A value the operation cannot accept: non-finite numbers, a negative
/// dropout probability, a bad block size.
class ValueError : public Error {
 public:
  using Error::Error;
};

/// Non-finite results refused (safe_merge, optimizer steps with NaN gradients).
class NumericError : public Error {
 public:
  using Error::Error;
};

/// Malformed files or byte buffers (offset and field named in the message).
class FormatError : public Error {
 public:
  using Error::Error;
};

/// Errors reported by a device runtime (CUDA, cuBLAS), with the call named.
class DeviceError : public Error {
 public:
  using Error::Error;
};

namespace detail {
/// Streams every argument into one message: concat("f: ", 3, " rows").
template <class... Args>
std::string concat(Args&&... args) {
  std::ostringstream os;
  (os << ... << std::forward<Args>(args));
  return os.str();
}

template <class E, class... Args>
[[noreturn]] void raise(Args&&... args) {
  throw E(concat(std::forward<Args>(args)...));
}

/// a * b and a + b for sizes (non-negative integers), or a ShapeError naming
/// the operands where the result does not fit: a wrapped size would pass the
/// range checks and address memory that is not there.
template <class I>
I checked_mul(const char* where, I a, I b) {
  I r;
  if (__builtin_mul_overflow(a, b, &r)) raise<ShapeError>(where, ": ", a, " * ", b, " overflows the size type");
  return r;
}
template <class I>
I checked_add(const char* where, I a, I b) {
  I r;
  if (__builtin_add_overflow(a, b, &r)) raise<ShapeError>(where, ": ", a, " + ", b, " overflows the size type");
  return r;
}

/// Throws ValueError naming `name` unless v is finite: every floating-point
/// parameter goes through this, since a range test such as !(v >= 0) lets +Inf
/// through. (v - v is 0 for finite v and NaN otherwise; no <cmath> needed.)
inline void check_finite_parameter(const char* where, const char* name, double v) {
  if (!(v - v == 0.0)) raise<ValueError>(where, ": ", name, " = ", v, " is not finite");
}
/// The same, and v >= 0 (rates, bounds, byte sizes).
inline void check_non_negative_parameter(const char* where, const char* name, double v) {
  if (!(v >= 0.0 && v - v == 0.0)) raise<ValueError>(where, ": ", name, " = ", v, " must be finite and >= 0");
}
}  // namespace detail
}  // namespace lora
