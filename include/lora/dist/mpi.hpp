// dist/mpi.hpp: MpiCommunicator, the MPI model of lora::dist::Communicator
// (host buffers), and MpiSession, an RAII MPI_Init_thread / MPI_Finalize for
// programs and tests. Target lora::mpi (CMake's find_package(MPI)); Debian:
// libopenmpi-dev, run with `mpirun -np N prog` (docs/distributed.md).
//
//   int main(int argc, char** argv) {
//     lora::dist::MpiSession mpi(argc, argv);     // MPI_Init_thread unless already initialised
//     lora::dist::MpiCommunicator world;          // a duplicate of MPI_COMM_WORLD
//     world.all_reduce_sum(std::span(grads));
//   }
//
// The communicator never initialises MPI itself: it refuses (CommError) to be
// built before MPI_Init, so an application that owns MPI keeps owning it. It
// works on a duplicate of the MPI_Comm it is given (MPI_Comm_dup, collective),
// with MPI_ERRORS_RETURN set on the duplicate only: every MPI return code is
// checked and becomes a lora::dist::CommError with MPI_Error_string's text,
// while the caller's communicator keeps its own error handler.
#pragma once

#include <mpi.h>

#include <algorithm>
#include <climits>
#include <cstddef>
#include <span>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "communicator.hpp"

namespace lora::dist {

namespace detail {
/// MPI's own text for an error code (MPI_Error_string), with its class.
inline std::string mpi_error_string(int code) {
  char text[MPI_MAX_ERROR_STRING];
  int len = 0;
  if (MPI_Error_string(code, text, &len) != MPI_SUCCESS) return "unknown MPI error";
  return std::string(text, static_cast<std::size_t>(len));
}

/// Throws CommError naming `where`, the MPI call and MPI's message unless rc is MPI_SUCCESS.
inline void check_mpi(int rc, const char* where, const char* call) {
  if (rc == MPI_SUCCESS) return;
  int cls = rc;
  if (MPI_Error_class(rc, &cls) != MPI_SUCCESS) cls = rc;
  throw CommError(
      lora::detail::concat(where, ": ", call, " failed: ", mpi_error_string(rc), " (MPI error class ", cls, ")"), cls);
}

template <class T>
MPI_Datatype mpi_type() {
  if constexpr (std::is_same_v<T, float>)
    return MPI_FLOAT;
  else
    return MPI_DOUBLE;
}

/// MPI counts are int: longer buffers go in pieces of at most INT_MAX elements.
inline constexpr std::size_t mpi_chunk = static_cast<std::size_t>(INT_MAX);

inline int to_count(const char* where, std::size_t n) {
  if (n > mpi_chunk)
    lora::detail::raise<ShapeError>(where, ": ", n, " elements exceed MPI's int count (", INT_MAX, ")");
  return static_cast<int>(n);
}
}  // namespace detail

/// RAII MPI initialisation: MPI_Init_thread(required) in the constructor,
/// MPI_Finalize in the destructor, both only when MPI was not initialised
/// already (then the session owns nothing). FUNNELED (the default) suits lora:
/// OpenMP threads run the products, the main thread makes every MPI call.
class MpiSession {
 public:
  MpiSession(int& argc, char**& argv, int required = MPI_THREAD_FUNNELED) { init(&argc, &argv, required); }
  explicit MpiSession(int required = MPI_THREAD_FUNNELED) { init(nullptr, nullptr, required); }
  MpiSession(const MpiSession&) = delete;
  MpiSession& operator=(const MpiSession&) = delete;
  ~MpiSession() {
    int finalized = 1;
    if (owns_ && MPI_Finalized(&finalized) == MPI_SUCCESS && !finalized) MPI_Finalize();
  }

  /// Whether this session called MPI_Init_thread (and will finalize).
  bool owns() const { return owns_; }
  /// The thread level MPI provided (MPI_Query_thread when not owned).
  int thread_level() const { return provided_; }

 private:
  void init(int* argc, char*** argv, int required) {
    int initialized = 0;
    detail::check_mpi(MPI_Initialized(&initialized), "MpiSession", "MPI_Initialized");
    if (initialized) {
      detail::check_mpi(MPI_Query_thread(&provided_), "MpiSession", "MPI_Query_thread");
      return;
    }
    // MPI_Init's errors are fatal by MPI's default handler; a return code is
    // still checked for implementations that return.
    detail::check_mpi(MPI_Init_thread(argc, argv, required, &provided_), "MpiSession", "MPI_Init_thread");
    owns_ = true;
    if (provided_ < required) {
      MPI_Finalize();
      owns_ = false;
      throw CommError(
          lora::detail::concat("MpiSession: MPI provides thread level ", provided_, ", ", required, " was required"),
          -1);
    }
  }
  bool owns_ = false;
  int provided_ = MPI_THREAD_SINGLE;
};

/// The MPI model of lora::dist::Communicator over a duplicate of `comm`.
/// Movable, not copyable; the duplicate is freed on destruction (collective,
/// as MPI_Comm_free is: destroy communicators in the same order on every rank).
class MpiCommunicator {
 public:
  explicit MpiCommunicator(MPI_Comm comm = MPI_COMM_WORLD) {
    int initialized = 0;
    detail::check_mpi(MPI_Initialized(&initialized), "MpiCommunicator", "MPI_Initialized");
    if (!initialized)
      throw CommError(
          "MpiCommunicator: MPI is not initialised; create a lora::dist::MpiSession (or call "
          "MPI_Init) before the communicator",
          -1);
    detail::check_mpi(MPI_Comm_dup(comm, &comm_), "MpiCommunicator", "MPI_Comm_dup");
    detail::check_mpi(MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN), "MpiCommunicator", "MPI_Comm_set_errhandler");
    detail::check_mpi(MPI_Comm_rank(comm_, &rank_), "MpiCommunicator", "MPI_Comm_rank");
    detail::check_mpi(MPI_Comm_size(comm_, &size_), "MpiCommunicator", "MPI_Comm_size");
  }
  MpiCommunicator(const MpiCommunicator&) = delete;
  MpiCommunicator& operator=(const MpiCommunicator&) = delete;
  MpiCommunicator(MpiCommunicator&& o) noexcept
      : comm_(std::exchange(o.comm_, MPI_COMM_NULL)), rank_(o.rank_), size_(o.size_), stats_(o.stats_) {}
  MpiCommunicator& operator=(MpiCommunicator&& o) noexcept {
    if (this != &o) {
      release();
      comm_ = std::exchange(o.comm_, MPI_COMM_NULL);
      rank_ = o.rank_;
      size_ = o.size_;
      stats_ = o.stats_;
    }
    return *this;
  }
  ~MpiCommunicator() { release(); }

  int rank() const { return rank_; }
  int size() const { return size_; }
  /// The duplicate communicator, for calls lora does not wrap.
  MPI_Comm native() const { return comm_; }

  /// x = sum of x over ranks, in place (MPI_Allreduce with MPI_IN_PLACE).
  /// Every rank receives the same bits: MPI's collectives combine in one order
  /// for all ranks (the standard's advice; Open MPI and MPICH follow it).
  template <CommScalar T>
  void all_reduce_sum(std::span<T> x) {
    for (std::size_t off = 0; off < x.size(); off += detail::mpi_chunk) {
      const std::size_t n = std::min(detail::mpi_chunk, x.size() - off);
      detail::check_mpi(
          MPI_Allreduce(MPI_IN_PLACE, x.data() + off, static_cast<int>(n), detail::mpi_type<T>(), MPI_SUM, comm_),
          "MpiCommunicator::all_reduce_sum", "MPI_Allreduce");
    }
    ++stats_.all_reduce_calls;
    stats_.all_reduce_bytes += x.size_bytes();
  }

  /// all = [rank 0's mine, rank 1's mine, ...] (every rank sends mine.size()).
  template <CommScalar T>
  void all_gather(std::span<const std::type_identity_t<T>> mine, std::span<T> all) {
    constexpr const char* where = "MpiCommunicator::all_gather";
    dist::detail::check_gather(where, mine.size(), all.size(), size_);
    const int n = detail::to_count(where, mine.size());
    detail::to_count(where, all.size());
    detail::check_mpi(MPI_Allgather(mine.data(), n, detail::mpi_type<T>(), all.data(), n, detail::mpi_type<T>(), comm_),
                      where, "MPI_Allgather");
    ++stats_.all_gather_calls;
    stats_.all_gather_bytes += all.size_bytes();
  }

  /// all = [rank 0's counts[0] elements, rank 1's counts[1], ...].
  template <CommScalar T>
  void all_gather_v(std::span<const std::type_identity_t<T>> mine, std::span<T> all, std::span<const index_t> counts) {
    constexpr const char* where = "MpiCommunicator::all_gather_v";
    dist::detail::check_gather_v(where, mine.size(), all.size(), counts, rank_, size_);
    std::vector<int> cnt(static_cast<std::size_t>(size_)), displ(static_cast<std::size_t>(size_));
    std::size_t off = 0;
    for (std::size_t q = 0; q < cnt.size(); ++q) {
      cnt[q] = detail::to_count(where, static_cast<std::size_t>(counts[q]));
      displ[q] = detail::to_count(where, off);
      off += static_cast<std::size_t>(counts[q]);
    }
    detail::check_mpi(MPI_Allgatherv(mine.data(), detail::to_count(where, mine.size()), detail::mpi_type<T>(),
                                     all.data(), cnt.data(), displ.data(), detail::mpi_type<T>(), comm_),
                      where, "MPI_Allgatherv");
    ++stats_.all_gather_calls;
    stats_.all_gather_bytes += all.size_bytes();
  }

  /// x = root's x. A root outside [0, size) is MPI's error (MPI_ERR_ROOT),
  /// surfaced as CommError with MPI's text on every rank that passed it.
  template <CommScalar T>
  void broadcast(std::span<T> x, int root) {
    std::size_t off = 0;
    do {  // at least one call, so an empty buffer still has its root checked
      const std::size_t n = std::min(detail::mpi_chunk, x.size() - off);
      detail::check_mpi(MPI_Bcast(x.data() + off, static_cast<int>(n), detail::mpi_type<T>(), root, comm_),
                        "MpiCommunicator::broadcast", "MPI_Bcast");
      off += n;
    } while (off < x.size());
    ++stats_.broadcast_calls;
    stats_.broadcast_bytes += x.size_bytes();
  }

  void barrier() {
    detail::check_mpi(MPI_Barrier(comm_), "MpiCommunicator::barrier", "MPI_Barrier");
    ++stats_.barrier_calls;
  }

  const CommStats& stats() const { return stats_; }
  void reset_stats() { stats_ = {}; }

 private:
  void release() noexcept {
    int finalized = 1;
    if (comm_ != MPI_COMM_NULL && MPI_Finalized(&finalized) == MPI_SUCCESS && !finalized) MPI_Comm_free(&comm_);
    comm_ = MPI_COMM_NULL;
  }

  MPI_Comm comm_ = MPI_COMM_NULL;
  int rank_ = 0, size_ = 1;
  CommStats stats_;
};

static_assert(Communicator<MpiCommunicator>);

}  // namespace lora::dist
