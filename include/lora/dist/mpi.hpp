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
// while the caller's communicator keeps its own error handler. With a timeout
// (MpiOptions{.timeout = ...}), a collective some rank never joins throws
// lora::dist::CommTimeout instead of hanging (MpiCommunicator: what state
// that leaves).
#pragma once

#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <cstddef>
#include <span>
#include <string>
#include <thread>
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

/// Options of MpiCommunicator.
struct MpiOptions {
  /// 0 (the default): blocking collectives (MPI_Allreduce, ...), which wait as
  /// long as a peer takes. Above 0: every collective is started non-blocking
  /// (MPI_Iallreduce, MPI_Iallgather(v), MPI_Ibcast, MPI_Ibarrier) and polled
  /// with MPI_Test until it completes or this much time has passed since the
  /// call began; then it throws CommTimeout and the communicator is failed
  /// for good (see MpiCommunicator). Pick it well above the slowest step's
  /// imbalance between ranks (seconds to minutes), not near the transfer time.
  /// Give every rank a timeout or none: MPI does not match a non-blocking
  /// collective on one rank with a blocking one on another.
  std::chrono::nanoseconds timeout{0};
};

/// The MPI model of lora::dist::Communicator over a duplicate of `comm`.
/// Movable, not copyable; the duplicate is freed on destruction (collective,
/// as MPI_Comm_free is: destroy communicators in the same order on every rank).
///
/// Failure: with a timeout (MpiOptions), a collective that some rank does not
/// join in time throws CommTimeout on the ranks that wait. MPI cannot cancel a
/// started collective, so it stays pending: MPI may still read and write the
/// caller's buffers if the late rank joins later, and this communicator's
/// sequence of collectives is no longer known to match the other ranks'. The
/// communicator is therefore marked failed(): every later call throws
/// CommError at once, naming the first failure. What a program should do is
/// report the error and end the job (MPI_Abort(native(), code)); keep the
/// buffers alive until then. finish_pending(wait) completes the pending call
/// if the late rank does join (tests use it to shut down cleanly); the
/// communicator stays failed. A rank that exits or crashes is usually seen by
/// mpirun first, which then ends every rank (Open MPI's default): the timeout
/// covers ranks that are alive but never arrive.
class MpiCommunicator {
  using clock = std::chrono::steady_clock;

 public:
  explicit MpiCommunicator(MPI_Comm comm = MPI_COMM_WORLD, MpiOptions options = {}) {
    set_timeout(options.timeout);
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
  MpiCommunicator(MpiCommunicator&& o) noexcept { take(o); }
  MpiCommunicator& operator=(MpiCommunicator&& o) noexcept {
    if (this != &o) {
      release();
      take(o);
    }
    return *this;
  }
  ~MpiCommunicator() { release(); }

  int rank() const { return rank_; }
  int size() const { return size_; }
  /// The duplicate communicator, for calls lora does not wrap.
  MPI_Comm native() const { return comm_; }

  /// The per-call timeout (0: none, blocking collectives). Whether it is 0
  /// must agree on every rank for each call: MPI never matches a non-blocking
  /// collective with a blocking one. The positive values may differ per rank.
  std::chrono::nanoseconds timeout() const { return timeout_; }
  void set_timeout(std::chrono::nanoseconds timeout) {
    if (timeout.count() < 0)
      lora::detail::raise<ValueError>("MpiCommunicator::set_timeout: ", timeout.count(),
                                      " ns is negative (0 means no timeout)");
    timeout_ = timeout;
  }
  /// Whether a collective timed out on this rank (then every call throws).
  bool failed() const { return !failure_.empty(); }
  /// Whether the collective that timed out is still pending in MPI.
  bool pending() const { return pending_ != MPI_REQUEST_NULL; }
  /// Polls the pending collective for up to `wait`: true once it has completed
  /// (or none is pending), false if it still has not. The buffers it used are
  /// then free again; the communicator stays failed.
  bool finish_pending(std::chrono::nanoseconds wait) {
    const auto deadline = clock::now() + wait;
    for (int polls = 0; pending_ != MPI_REQUEST_NULL; ++polls) {
      int done = 0;
      detail::check_mpi(MPI_Test(&pending_, &done, MPI_STATUS_IGNORE), "MpiCommunicator::finish_pending", "MPI_Test");
      if (done) break;  // MPI_Test has set pending_ to MPI_REQUEST_NULL
      if (clock::now() >= deadline) return false;
      pause(polls);
    }
    return true;
  }

  /// x = sum of x over ranks, in place (MPI_Allreduce with MPI_IN_PLACE;
  /// MPI_Iallreduce under a timeout).
  /// Every rank receives the same bits: MPI's collectives combine in one order
  /// for all ranks (the standard's advice; Open MPI and MPICH follow it).
  template <CommScalar T>
  void all_reduce_sum(std::span<T> x) {
    constexpr const char* where = "MpiCommunicator::all_reduce_sum";
    check_usable(where);
    const auto deadline = clock::now() + timeout_;
    for (std::size_t off = 0; off < x.size(); off += detail::mpi_chunk) {
      const std::size_t n = std::min(detail::mpi_chunk, x.size() - off);
      if (timeout_.count() == 0) {
        detail::check_mpi(
            MPI_Allreduce(MPI_IN_PLACE, x.data() + off, static_cast<int>(n), detail::mpi_type<T>(), MPI_SUM, comm_),
            where, "MPI_Allreduce");
      } else {
        MPI_Request req = MPI_REQUEST_NULL;
        detail::check_mpi(MPI_Iallreduce(MPI_IN_PLACE, x.data() + off, static_cast<int>(n), detail::mpi_type<T>(),
                                         MPI_SUM, comm_, &req),
                          where, "MPI_Iallreduce");
        wait(req, where, x.size(), deadline);
      }
    }
    ++stats_.all_reduce_calls;
    stats_.all_reduce_bytes += x.size_bytes();
  }

  /// all = [rank 0's mine, rank 1's mine, ...] (every rank sends mine.size()).
  template <CommScalar T>
  void all_gather(std::span<const std::type_identity_t<T>> mine, std::span<T> all) {
    constexpr const char* where = "MpiCommunicator::all_gather";
    check_usable(where);
    dist::detail::check_gather(where, mine.size(), all.size(), size_);
    const int n = detail::to_count(where, mine.size());
    detail::to_count(where, all.size());
    const auto deadline = clock::now() + timeout_;
    if (timeout_.count() == 0) {
      detail::check_mpi(
          MPI_Allgather(mine.data(), n, detail::mpi_type<T>(), all.data(), n, detail::mpi_type<T>(), comm_), where,
          "MPI_Allgather");
    } else {
      MPI_Request req = MPI_REQUEST_NULL;
      detail::check_mpi(
          MPI_Iallgather(mine.data(), n, detail::mpi_type<T>(), all.data(), n, detail::mpi_type<T>(), comm_, &req),
          where, "MPI_Iallgather");
      wait(req, where, all.size(), deadline);
    }
    ++stats_.all_gather_calls;
    stats_.all_gather_bytes += all.size_bytes();
  }

  /// all = [rank 0's counts[0] elements, rank 1's counts[1], ...].
  template <CommScalar T>
  void all_gather_v(std::span<const std::type_identity_t<T>> mine, std::span<T> all, std::span<const index_t> counts) {
    constexpr const char* where = "MpiCommunicator::all_gather_v";
    check_usable(where);
    dist::detail::check_gather_v(where, mine.size(), all.size(), counts, rank_, size_);
    // Members, not locals: a non-blocking call reads them until it completes,
    // which after a timeout is later than this function's return.
    counts_.resize(static_cast<std::size_t>(size_));
    displs_.resize(static_cast<std::size_t>(size_));
    std::size_t off = 0;
    for (std::size_t q = 0; q < counts_.size(); ++q) {
      counts_[q] = detail::to_count(where, static_cast<std::size_t>(counts[q]));
      displs_[q] = detail::to_count(where, off);
      off += static_cast<std::size_t>(counts[q]);
    }
    const int n = detail::to_count(where, mine.size());
    const auto deadline = clock::now() + timeout_;
    if (timeout_.count() == 0) {
      detail::check_mpi(MPI_Allgatherv(mine.data(), n, detail::mpi_type<T>(), all.data(), counts_.data(),
                                       displs_.data(), detail::mpi_type<T>(), comm_),
                        where, "MPI_Allgatherv");
    } else {
      MPI_Request req = MPI_REQUEST_NULL;
      detail::check_mpi(MPI_Iallgatherv(mine.data(), n, detail::mpi_type<T>(), all.data(), counts_.data(),
                                        displs_.data(), detail::mpi_type<T>(), comm_, &req),
                        where, "MPI_Iallgatherv");
      wait(req, where, all.size(), deadline);
    }
    ++stats_.all_gather_calls;
    stats_.all_gather_bytes += all.size_bytes();
  }

  /// x = root's x. A root outside [0, size) is MPI's error (MPI_ERR_ROOT),
  /// surfaced as CommError with MPI's text on every rank that passed it.
  template <CommScalar T>
  void broadcast(std::span<T> x, int root) {
    constexpr const char* where = "MpiCommunicator::broadcast";
    check_usable(where);
    const auto deadline = clock::now() + timeout_;
    std::size_t off = 0;
    do {  // at least one call, so an empty buffer still has its root checked
      const std::size_t n = std::min(detail::mpi_chunk, x.size() - off);
      if (timeout_.count() == 0) {
        detail::check_mpi(MPI_Bcast(x.data() + off, static_cast<int>(n), detail::mpi_type<T>(), root, comm_), where,
                          "MPI_Bcast");
      } else {
        MPI_Request req = MPI_REQUEST_NULL;
        detail::check_mpi(MPI_Ibcast(x.data() + off, static_cast<int>(n), detail::mpi_type<T>(), root, comm_, &req),
                          where, "MPI_Ibcast");
        wait(req, where, x.size(), deadline);
      }
      off += n;
    } while (off < x.size());
    ++stats_.broadcast_calls;
    stats_.broadcast_bytes += x.size_bytes();
  }

  void barrier() {
    constexpr const char* where = "MpiCommunicator::barrier";
    check_usable(where);
    if (timeout_.count() == 0) {
      detail::check_mpi(MPI_Barrier(comm_), where, "MPI_Barrier");
    } else {
      const auto deadline = clock::now() + timeout_;
      MPI_Request req = MPI_REQUEST_NULL;
      detail::check_mpi(MPI_Ibarrier(comm_, &req), where, "MPI_Ibarrier");
      wait(req, where, 0, deadline);
    }
    ++stats_.barrier_calls;
  }

  const CommStats& stats() const { return stats_; }
  void reset_stats() { stats_ = {}; }

 private:
  void check_usable(const char* where) const {
    if (failed())
      throw CommError(lora::detail::concat(where, ": this communicator failed earlier (", failure_,
                                           "); a collective may still be pending, so no further call is made: end "
                                           "the job (MPI_Abort(native(), code))"),
                      -1);
  }

  /// Busy polling first (a collective usually completes within microseconds),
  /// then short sleeps, so that a waiting rank leaves its core to a late peer
  /// on an oversubscribed machine.
  static void pause(int polls) {
    if (polls >= 1000) std::this_thread::sleep_for(std::chrono::microseconds(50));
  }

  /// Polls `req` with MPI_Test (which also drives MPI's progress) until it
  /// completes or `deadline` passes; then keeps it as pending_, marks the
  /// communicator failed and throws CommTimeout.
  void wait(MPI_Request& req, const char* where, std::size_t elements, clock::time_point deadline) {
    for (int polls = 0;; ++polls) {
      int done = 0;
      detail::check_mpi(MPI_Test(&req, &done, MPI_STATUS_IGNORE), where, "MPI_Test");
      if (done) return;
      if (clock::now() >= deadline) break;
      pause(polls);
    }
    pending_ = std::exchange(req, MPI_REQUEST_NULL);
    CommTimeout error(where, elements, timeout_, rank_, size_);
    failure_ = error.what();
    throw error;
  }

  void take(MpiCommunicator& o) noexcept {
    comm_ = std::exchange(o.comm_, MPI_COMM_NULL);
    pending_ = std::exchange(o.pending_, MPI_REQUEST_NULL);
    rank_ = o.rank_;
    size_ = o.size_;
    timeout_ = o.timeout_;
    stats_ = o.stats_;
    failure_ = std::move(o.failure_);
    counts_ = std::move(o.counts_);
    displs_ = std::move(o.displs_);
  }

  void release() noexcept {
    int finalized = 1;
    if (comm_ != MPI_COMM_NULL && MPI_Finalized(&finalized) == MPI_SUCCESS && !finalized) {
      int done = 1;
      if (pending_ != MPI_REQUEST_NULL && MPI_Test(&pending_, &done, MPI_STATUS_IGNORE) != MPI_SUCCESS) done = 0;
      // A collective still pending holds the communicator: freeing it under
      // that call is not safe in every MPI, so a failed one is left to exit.
      if (done) MPI_Comm_free(&comm_);
    }
    comm_ = MPI_COMM_NULL;
    pending_ = MPI_REQUEST_NULL;
  }

  MPI_Comm comm_ = MPI_COMM_NULL;
  MPI_Request pending_ = MPI_REQUEST_NULL;  // a collective that timed out, until it completes
  int rank_ = 0, size_ = 1;
  std::chrono::nanoseconds timeout_{0};
  CommStats stats_;
  std::string failure_;                // the CommTimeout's message; empty while usable
  std::vector<int> counts_, displs_;  // all_gather_v's arrays, alive while a call is pending
};

static_assert(Communicator<MpiCommunicator>);

}  // namespace lora::dist
