// dist/communicator.hpp: the Communicator concept, what lora's distributed
// helpers (data_parallel.hpp, tensor_parallel.hpp) ask of a transport, and
// SingleProcess, the trivial model (one rank; every collective is a copy or
// nothing), so the same code runs unchanged without MPI.
//
//   lora::dist::SingleProcess one;                 // no MPI needed
//   lora::dist::MpiCommunicator world;             // <lora/dist/mpi.hpp>, target lora::mpi
//
// A model provides, for T = float and double (host buffers):
//   rank(), size()                               this process's index, the group's size
//   all_reduce_sum(std::span<T> x)               x = sum over ranks, in place
//   all_gather(std::span<const T> mine, std::span<T> all)
//                                                all = concatenation over ranks (equal counts)
//   all_gather_v(mine, all, std::span<const index_t> counts)
//                                                the same with counts[q] elements from rank q
//   broadcast(std::span<T> x, int root)          x = root's x
//   barrier()
// Failures throw lora::dist::CommError carrying the transport's own message
// (MPI_Error_string) and code; a collective that does not complete within a
// model's timeout (MpiCommunicator's MpiOptions::timeout) throws CommTimeout,
// a CommError. Every model counts what it moved (stats()).
#pragma once

#include <algorithm>
#include <chrono>
#include <concepts>
#include <cstdint>
#include <span>
#include <string>
#include <type_traits>
#include <utility>

#include "../config.hpp"
#include "../error.hpp"

namespace lora::dist {

/// A failed collective or transport call: the message names the lora function,
/// the transport call and the transport's own error string; code() is the
/// transport's error code (MPI's error class value; -1 for errors lora detects
/// itself, such as a root out of range in SingleProcess).
class CommError : public Error {
 public:
  CommError(const std::string& what, int code) : Error(what), code_(code) {}
  int code() const noexcept { return code_; }

 private:
  int code_;
};

/// A collective that did not complete within the communicator's timeout: a
/// rank that never joined it (stuck, deadlocked elsewhere, or dead without the
/// launcher noticing). The message names the lora function, the element
/// count, the timeout and the calling rank; code() is -1 (lora detected it).
/// The collective stays pending inside the transport (MPI cannot cancel one),
/// so the communicator that threw is marked failed: see MpiCommunicator.
class CommTimeout : public CommError {
 public:
  CommTimeout(const std::string& operation, std::size_t elements, std::chrono::nanoseconds timeout, int rank, int size)
      : CommError(lora::detail::concat(operation, ": ", elements, " elements not complete after the timeout of ",
                                       std::chrono::duration<double>(timeout).count(), " s on rank ", rank, " of ",
                                       size, "; another rank did not join the collective in time"),
                  -1),
        operation_(operation),
        elements_(elements),
        timeout_(timeout),
        rank_(rank) {}
  const std::string& operation() const noexcept { return operation_; }
  std::size_t elements() const noexcept { return elements_; }
  std::chrono::nanoseconds timeout() const noexcept { return timeout_; }
  int rank() const noexcept { return rank_; }

 private:
  std::string operation_;
  std::size_t elements_;
  std::chrono::nanoseconds timeout_;
  int rank_;
};

/// The element types every model reduces and moves (adapter gradients and
/// activations: float or double).
template <class T>
concept CommScalar = std::same_as<T, float> || std::same_as<T, double>;

/// What a model has moved since construction or the last reset: calls and
/// payload bytes per collective, counted once per call on the calling rank (the
/// size of the buffer handed to it, not the bytes on the wire: a ring
/// all-reduce sends 2 (p - 1) / p times the payload per rank; docs/distributed.md).
struct CommStats {
  std::uint64_t all_reduce_calls = 0, all_reduce_bytes = 0;
  std::uint64_t all_gather_calls = 0, all_gather_bytes = 0;  ///< bytes: the gathered result
  std::uint64_t broadcast_calls = 0, broadcast_bytes = 0;
  std::uint64_t barrier_calls = 0;
};

/// A transport for lora's distributed helpers (see the file comment).
template <class C>
concept Communicator = requires(C& c, const C& cc, std::span<float> f, std::span<double> d, std::span<const float> cf,
                                std::span<const double> cd, std::span<const index_t> counts, int root) {
  { cc.rank() } -> std::convertible_to<int>;
  { cc.size() } -> std::convertible_to<int>;
  c.all_reduce_sum(f);
  c.all_reduce_sum(d);
  c.all_gather(cf, f);
  c.all_gather(cd, d);
  c.all_gather_v(cf, f, counts);
  c.all_gather_v(cd, d, counts);
  c.broadcast(f, root);
  c.broadcast(d, root);
  c.barrier();
  { cc.stats() } -> std::convertible_to<CommStats>;
};

namespace detail {
/// The shape checks shared by the models, before any transport call: the
/// gathered buffer must hold exactly what the ranks send.
inline void check_gather(const char* where, std::size_t mine, std::size_t all, int size) {
  if (all != mine * static_cast<std::size_t>(size))
    lora::detail::raise<ShapeError>(where, ": the result buffer has ", all, " elements, expected ", mine,
                                    " per rank x ", size, " ranks = ", mine * static_cast<std::size_t>(size));
}
inline void check_gather_v(const char* where, std::size_t mine, std::size_t all, std::span<const index_t> counts,
                           int rank, int size) {
  if (counts.size() != static_cast<std::size_t>(size))
    lora::detail::raise<ShapeError>(where, ": ", counts.size(), " counts given for ", size, " ranks");
  std::size_t total = 0;
  for (const index_t c : counts) {
    if (c < 0) lora::detail::raise<ShapeError>(where, ": a negative count (", c, ")");
    total += static_cast<std::size_t>(c);
  }
  if (static_cast<std::size_t>(counts[static_cast<std::size_t>(rank)]) != mine)
    lora::detail::raise<ShapeError>(where, ": rank ", rank, " sends ", mine, " elements but counts[", rank,
                                    "] = ", counts[static_cast<std::size_t>(rank)]);
  if (all != total)
    lora::detail::raise<ShapeError>(where, ": the result buffer has ", all, " elements, the counts sum to ", total);
}
}  // namespace detail

/// One process, no transport: rank 0 of 1. all_reduce_sum and barrier do
/// nothing, all_gather copies, broadcast checks the root. Results are
/// bit-identical to code that has no communicator at all (tests/mpi).
class SingleProcess {
 public:
  int rank() const { return 0; }
  int size() const { return 1; }

  template <CommScalar T>
  void all_reduce_sum(std::span<T> x) {
    ++stats_.all_reduce_calls;
    stats_.all_reduce_bytes += x.size_bytes();
  }
  template <CommScalar T>
  void all_gather(std::span<const std::type_identity_t<T>> mine, std::span<T> all) {
    detail::check_gather("SingleProcess::all_gather", mine.size(), all.size(), 1);
    std::copy(mine.begin(), mine.end(), all.begin());
    ++stats_.all_gather_calls;
    stats_.all_gather_bytes += all.size_bytes();
  }
  template <CommScalar T>
  void all_gather_v(std::span<const std::type_identity_t<T>> mine, std::span<T> all, std::span<const index_t> counts) {
    detail::check_gather_v("SingleProcess::all_gather_v", mine.size(), all.size(), counts, 0, 1);
    std::copy(mine.begin(), mine.end(), all.begin());
    ++stats_.all_gather_calls;
    stats_.all_gather_bytes += all.size_bytes();
  }
  template <CommScalar T>
  void broadcast(std::span<T> x, int root) {
    if (root != 0)
      throw CommError(lora::detail::concat("SingleProcess::broadcast: root ", root,
                                           " is not a rank of a 1-process group (valid: 0)"),
                      -1);
    ++stats_.broadcast_calls;
    stats_.broadcast_bytes += x.size_bytes();
  }
  void barrier() { ++stats_.barrier_calls; }

  const CommStats& stats() const { return stats_; }
  void reset_stats() { stats_ = {}; }

 private:
  CommStats stats_;
};

static_assert(Communicator<SingleProcess>);

/// A contiguous part [offset, offset + count) of `n` rows or columns.
struct Shard {
  index_t offset = 0, count = 0;
  friend bool operator==(const Shard&, const Shard&) = default;
};

/// The split rule of every sharded dimension: `n` items over `parts` ranks,
/// in rank order, the first n % parts ranks taking one more (numpy's
/// array_split; Megatron requires n % parts == 0, lora does not).
inline Shard split(index_t n, int parts, int index) {
  if (n < 0 || parts < 1 || index < 0 || index >= parts)
    lora::detail::raise<ValueError>("dist::split: cannot split ", n, " items into ", parts, " parts and take part ",
                                    index, " (need n >= 0, parts >= 1, 0 <= index < parts)");
  const index_t base = n / parts, extra = n % parts, i = index;
  return {i * base + std::min(i, extra), base + (i < extra ? 1 : 0)};
}

}  // namespace lora::dist
