// dist/data_parallel.hpp: data-parallel LoRA training. Every rank holds the
// whole model and a slice of the global batch; after backward, the gradients of
// every tensor registered with the rank's optimizer (LoRA's A and B, a trained
// bias, any add_tensor) are averaged over ranks in one fused buffer, bucketed
// (one all-reduce per bucket, as PyTorch DDP's 25 MiB buckets), and every rank
// then takes the same optimizer step.
//
//   lora::dist::MpiCommunicator world;
//   lora::dist::GradientReducer<float, lora::dist::MpiCommunicator> reducer(world);
//   auto drop = lora::dist::rank_dropout(lora::train::Dropout(0.1, seed), world.rank());
//   ... train::forward / train::backward on this rank's slice ...
//   const double norm = reducer.reduce(optimizer).grad_norm;   // global norm, after the reduction
//   optimizer.step();                                           // max_grad_norm clips by that norm
//
// What moves per step: r (in + out) values per adapted layer (plus a trained
// bias), i.e. optimizer.parameter_elements() * sizeof(T) bytes, in
// ceil(that / bucket_bytes) calls; full fine-tuning moves out * in per layer.
// docs/distributed.md has the formula and the Llama / GPT-3 numbers.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <span>
#include <type_traits>
#include <vector>

#include "../lora.hpp"  // first: the umbrella every lora header expects
#include "../detail/random.hpp"
#include "communicator.hpp"

namespace lora::dist {

/// Options of GradientReducer.
struct DataParallelOptions {
  /// Bytes per all-reduce call (PyTorch DDP's default bucket_cap_mb = 25).
  /// Gradients are packed in registration order; a tensor larger than a bucket
  /// spans several. At least one element per bucket.
  std::size_t bucket_bytes = std::size_t(25) << 20;
  /// Divide the summed gradients by the number of ranks: the gradient of the
  /// mean loss over the global batch when every rank's loss is the mean over an
  /// equal share of it. With unequal shares, scale each rank's loss by
  /// local_tokens / global_tokens and set average = false.
  bool average = true;
};

/// What GradientReducer::reduce did.
struct ReduceReport {
  /// The global L2 norm of every registered gradient after the reduction: every
  /// rank holds the same gradients then, so the norm the optimizer's clipping
  /// computes locally (optimizer.grad_norm()) is already the global one.
  double grad_norm = 0.0;
  index_t elements = 0;     ///< gradient elements reduced
  int buckets = 0;          ///< all-reduce calls made
  std::uint64_t bytes = 0;  ///< payload bytes handed to the communicator
};

/// Averages (or sums) every gradient registered with an optimizer over the
/// communicator's ranks, through one reused buffer of at most bucket_bytes.
template <CommScalar T, Communicator Comm>
class GradientReducer {
 public:
  explicit GradientReducer(Comm& comm, DataParallelOptions options = {}) : comm_(&comm), options_(options) {
    if (options_.bucket_bytes < sizeof(T))
      lora::detail::raise<ValueError>("dist::GradientReducer: bucket_bytes = ", options_.bucket_bytes,
                                      " holds no element of ", sizeof(T), " bytes");
  }

  const DataParallelOptions& options() const { return options_; }

  /// Reduces the gradients of every parameter registered with `optimizer`
  /// (train::SGD, train::AdamW: anything with parameters() and grad_norm()).
  /// Every rank must register the same tensors in the same order (the same
  /// model code does). Throws ValueError if a tensor was replaced after add()
  /// (as optimizer.step() would), CommError if the transport fails.
  template <class Optimizer>
  ReduceReport reduce(Optimizer& optimizer) {
    static_assert(std::is_same_v<typename Optimizer::scalar, T>,
                  "lora::dist::GradientReducer<T>: the optimizer's scalar type differs from T; use "
                  "GradientReducer<float, Comm> for train::AdamW<float>");
    const auto& params = optimizer.parameters();
    for (const auto& p : params)
      if (!p.unchanged())
        lora::detail::raise<ValueError>("dist::GradientReducer::reduce: '", p.name,
                                        "' or its gradient was resized or replaced after it was registered; "
                                        "nothing was reduced");
    const index_t cap = static_cast<index_t>(options_.bucket_bytes / sizeof(T));
    index_t total = 0;
    for (const auto& p : params) total += p.rows * p.cols;
    buffer_.resize(static_cast<std::size_t>(std::min(cap, total)));

    ReduceReport report;
    report.elements = total;
    index_t fill = 0;
    segments_.clear();
    for (std::size_t k = 0; k < params.size(); ++k) {
      // The optimizer keeps a const pointer because a step only reads the
      // gradient; the storage is the caller's train::Gradients (never const),
      // which the reduction overwrites in place.
      T* const g = const_cast<T*>(params[k].grad);
      const index_t n = params[k].rows * params[k].cols;
      for (index_t off = 0; off < n;) {
        const index_t take = std::min(n - off, cap - fill);
        std::copy(g + off, g + off + take, buffer_.data() + fill);
        segments_.push_back({g + off, take, fill});
        fill += take;
        off += take;
        if (fill == cap) flush(fill, report);
      }
    }
    if (fill > 0) flush(fill, report);
    report.grad_norm = optimizer.grad_norm();
    return report;
  }

 private:
  struct Segment {
    T* grad;
    index_t count, at;  // elements, and where they sit in the bucket
  };

  void flush(index_t& fill, ReduceReport& report) {
    const std::span<T> bucket(buffer_.data(), static_cast<std::size_t>(fill));
    comm_->all_reduce_sum(bucket);
    if (options_.average && comm_->size() > 1) {
      // A division, not a multiply by 1/p: exact whenever the sum / p is
      // representable, the same bits on every rank.
      const T p = static_cast<T>(comm_->size());
      for (T& v : bucket) v /= p;
    }
    for (const Segment& s : segments_) std::copy_n(buffer_.data() + s.at, s.count, s.grad);
    ++report.buckets;
    report.bytes += bucket.size_bytes();
    segments_.clear();
    fill = 0;
  }

  Comm* comm_;
  DataParallelOptions options_;
  std::vector<T> buffer_;
  std::vector<Segment> segments_;
};

/// The dropout seed of data-parallel rank `rank`: seed ^ mix64(rank), with
/// mix64 splitmix64's bijective finaliser. Rank 0 keeps `seed` (mix64(0) = 0),
/// so a 1-rank run draws the single-process masks bit for bit; distinct ranks
/// get distinct seeds (mix64 is a bijection), hence independent counter-based
/// streams, and the same rank always draws the same masks. The masks of a
/// p-rank run therefore differ from a 1-process run over the same global batch:
/// with dropout on, losses agree in distribution, not bit for bit.
inline std::uint64_t rank_seed(std::uint64_t seed, int rank) {
  if (rank < 0) lora::detail::raise<ValueError>("dist::rank_seed: rank ", rank, " is negative");
  return seed ^ lora::detail::mix64(static_cast<std::uint64_t>(rank));
}

/// `drop` with its seed replaced by rank_seed(seed, rank); p and the mode kept.
inline train::Dropout rank_dropout(const train::Dropout& drop, int rank) {
  train::Dropout d(drop.p(), rank_seed(drop.seed(), rank));
  if (!drop.training()) d.eval();
  return d;
}

}  // namespace lora::dist
