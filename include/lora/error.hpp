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
class error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// A runtime shape mismatch (rows, columns, token count, workspace size).
class shape_error : public error {
 public:
  using error::error;
};

/// A rank outside 0 < r <= min(in, out), or ranks that do not agree.
class rank_error : public error {
 public:
  using error::error;
};

/// A value the operation cannot accept: non-finite numbers, a negative
/// dropout probability, a bad block size.
class value_error : public error {
 public:
  using error::error;
};

/// Non-finite results refused (safe_merge, optimizer steps with NaN gradients).
class numeric_error : public error {
 public:
  using error::error;
};

/// Malformed files or byte buffers (offset and field named in the message).
class format_error : public error {
 public:
  using error::error;
};

/// Errors reported by a device runtime (CUDA, cuBLAS), with the call named.
class device_error : public error {
 public:
  using error::error;
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
}  // namespace detail
}  // namespace lora
