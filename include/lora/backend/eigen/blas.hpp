// backend/eigen/blas.hpp: optional hand-off of large products to OpenBLAS.
//
// Opt in with -DLORA_USE_OPENBLAS and -lopenblas (CMake: link lora::blas). The
// Eigen backend then gives every product with at least LORA_BLAS_MIN_WORK
// multiply-adds and a depth of at least LORA_BLAS_MIN_DEPTH to cblas_?gemm: the
// forward for more than 128 tokens, backward's dX for more than 32, merge() for
// r >= 32. The skinny paths (few tokens) keep lora's own kernels, faster there.
// Measured on a 2-core AVX-512 Xeon, 4096^2 fp32 (docs/benchmarks.md): SGEMM
// through OpenBLAS 0.3.21 runs at 290-298 GFLOP/s, Eigen 3.4's own at 232-251.
//
// A guard decides once, at the first large product: OpenBLAS is used only when
// the kernel it picked for this CPU uses at least the vector ISA this program
// was compiled for. OpenBLAS 0.3.21 does not know some newer Xeons and falls back
// to its "Prescott" (SSE3) kernel, 4x slower than Eigen's AVX-512 GEMM; then the
// products stay with Eigen (set OPENBLAS_CORETYPE=SkylakeX to fix OpenBLAS).
// LORA_BLAS=off / on in the environment overrides the guard; lora::blas_info()
// says what was decided and why.
#pragma once

#ifndef LORA_UMBRELLA_INCLUDED
#error "Include <lora/lora.hpp> instead of lora/backend/eigen/blas.hpp."
#endif

#include <Eigen/Core>
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cctype>
#include <limits>
#include <mutex>
#include <cstdlib>
#include <string>
#include <string_view>
#include <type_traits>

#include "../../config.hpp"

#ifdef LORA_USE_OPENBLAS
#include <cblas.h>
#endif

#ifdef _OPENMP
#include <omp.h>
#endif


namespace lora {

/// What the optional OpenBLAS hand-off decided (see backend/eigen/blas.hpp).
struct BlasStatus {
  bool compiled = false;  ///< built with LORA_USE_OPENBLAS
  bool active = false;    ///< large products go to OpenBLAS
  std::string core;       ///< OpenBLAS's kernel for this CPU ("SkylakeX", "Prescott", ...)
  std::string reason;     ///< one sentence: why active or not
};

namespace detail::blas {

/// Whether this translation unit hands large products to OpenBLAS (LORA_USE_OPENBLAS).
#ifdef LORA_USE_OPENBLAS
inline constexpr bool linked = true;
#else
inline constexpr bool linked = false;
#endif

/// The vector ISA level of an OpenBLAS x86 kernel name: 3 = AVX-512, 2 = AVX2,
/// 1 = older (SSE / AVX1). Non-x86 names count as 3 (the guard does not apply).
inline int core_isa_level(std::string_view core) {
  std::string lower;
  for (char c : core) lower += static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  for (std::string_view avx512 : {"skylakex", "cooperlake", "sapphirerapids"})
    if (lower == avx512) return 3;
  for (std::string_view avx2 : {"haswell", "zen", "excavator"})
    if (lower == avx2) return 2;
#if defined(__x86_64__) || defined(__i386__)
  return 1;
#else
  return 3;
#endif
}

/// The ISA level this translation unit's Eigen kernels were compiled for.
inline constexpr int compiled_isa_level() {
#if defined(__AVX512F__)
  return 3;
#elif defined(__AVX2__) && defined(__FMA__)
  return 2;
#else
  return 1;
#endif
}

/// The decision, given the core name, the compiled ISA and the LORA_BLAS
/// environment value (nullptr when unset). Pure, so tests can drive it.
inline BlasStatus decide(bool compiled, std::string core, int compiled_isa, const char* env) {
  BlasStatus s;
  s.compiled = compiled;
  s.core = std::move(core);
  if (!compiled) {
    s.reason = "built without LORA_USE_OPENBLAS: every product uses Eigen";
    return s;
  }
  const std::string_view mode = env ? env : "";
  if (mode == "off" || mode == "0") {
    s.reason = "LORA_BLAS=" + std::string(mode) + ": every product uses Eigen";
    return s;
  }
  if (mode == "on" || mode == "1") {
    s.active = true;
    s.reason = "LORA_BLAS=" + std::string(mode) + ": large products use OpenBLAS (" + s.core + ")";
    return s;
  }
  if (!mode.empty()) {
    s.reason = "LORA_BLAS=" + std::string(mode) + " is not one of on, off, 1, 0: every product uses Eigen";
    return s;
  }
  const int level = core_isa_level(s.core);
  if (level < compiled_isa) {
    static constexpr const char* names[] = {"", "SSE/AVX", "AVX2", "AVX-512"};
    s.reason = "OpenBLAS picked the " + s.core + " kernel (" + names[level] + ") but this program's Eigen uses " +
               names[compiled_isa] + ": large products stay with Eigen (set OPENBLAS_CORETYPE, e.g. SkylakeX)";
    return s;
  }
  s.active = true;
  s.reason = "large products use OpenBLAS (" + s.core + ")";
  return s;
}

inline const BlasStatus& status() {
#ifdef LORA_USE_OPENBLAS
  static const BlasStatus s = decide(true, openblas_get_corename(), compiled_isa_level(), std::getenv("LORA_BLAS"));
#else
  static const BlasStatus s = decide(false, "", compiled_isa_level(), nullptr);
#endif
  return s;
}

/// Products handed to OpenBLAS so far in this process (tests and benchmarks
/// read it to know which path ran).
inline std::atomic<std::uint64_t>& call_counter() {
  static std::atomic<std::uint64_t> n{0};
  return n;
}

#ifdef LORA_USE_OPENBLAS
/// A dense operand as cblas sees it in row-major terms: pointer, leading
/// dimension, transposed or not. Only unit inner stride qualifies.
template <class M>
struct operand {
  static constexpr bool direct = (int(M::Flags) & Eigen::DirectAccessBit) != 0;
  static constexpr bool row_major = (int(M::Flags) & Eigen::RowMajorBit) != 0;
};

/// C = beta C + alpha A B through cblas when it qualifies (float or double,
/// direct storage with unit inner stride, row-major C, large enough, the guard
/// says yes, not inside a parallel region, no other thread in OpenBLAS);
/// returns false to let Eigen do it.
template <class T, class A, class B, class C>
bool try_gemm(T alpha, const A& a, const B& b, T beta, C& c) {
  using AT = std::remove_cvref_t<A>;
  using BT = std::remove_cvref_t<B>;
  using CT = std::remove_cvref_t<C>;
  if constexpr (!(std::is_same_v<T, float> || std::is_same_v<T, double>) ||
                !std::is_same_v<typename AT::Scalar, T> || !std::is_same_v<typename BT::Scalar, T> ||
                !std::is_same_v<typename CT::Scalar, T> || !operand<AT>::direct || !operand<BT>::direct ||
                !operand<CT>::direct || !operand<CT>::row_major) {
    return false;
  } else {
    const index_t m = c.rows(), n = c.cols(), k = a.cols();
    if (k < LORA_BLAS_MIN_DEPTH || m * n * k < LORA_BLAS_MIN_WORK) return false;
    constexpr index_t int_max = std::numeric_limits<int>::max();  // cblas takes int sizes
    if (m > int_max || n > int_max || k > int_max) return false;
    if (a.innerStride() != 1 || b.innerStride() != 1 || c.innerStride() != 1) return false;
    // A single row or column reports an outer stride Eigen never uses; cblas
    // checks ld >= the row length, so pass that instead.
    const auto ld = [](const auto& x, bool row_major) {
      const index_t len = row_major ? x.cols() : x.rows();
      return (row_major ? x.rows() : x.cols()) == 1 ? std::max<index_t>(len, 1) : x.outerStride();
    };
#ifdef _OPENMP
    if (omp_in_parallel()) return false;
#endif
    if (!status().active) return false;
    // One product in OpenBLAS at a time: AdaptedLinear::forward is documented as
    // safe to call from several application threads, and OpenBLAS's thread
    // safety under concurrent callers has varied between releases (and would
    // oversubscribe the cores anyway). A caller that finds it busy uses Eigen.
    static std::mutex busy;
    const std::unique_lock<std::mutex> lock(busy, std::try_to_lock);
    if (!lock.owns_lock()) return false;
    const auto ta = operand<AT>::row_major ? CblasNoTrans : CblasTrans;
    const auto tb = operand<BT>::row_major ? CblasNoTrans : CblasTrans;
    if (std::max({ld(a, operand<AT>::row_major), ld(b, operand<BT>::row_major), ld(c, true)}) > int_max) return false;
    const auto lda = static_cast<int>(ld(a, operand<AT>::row_major));
    const auto ldb = static_cast<int>(ld(b, operand<BT>::row_major));
    const auto ldc = static_cast<int>(ld(c, true));
    if constexpr (std::is_same_v<T, float>)
      cblas_sgemm(CblasRowMajor, ta, tb, int(m), int(n), int(k), alpha, a.data(), lda, b.data(), ldb, beta,
                  c.data(), ldc);
    else
      cblas_dgemm(CblasRowMajor, ta, tb, int(m), int(n), int(k), alpha, a.data(), lda, b.data(), ldb, beta,
                  c.data(), ldc);
    call_counter().fetch_add(1, std::memory_order_relaxed);
    return true;
  }
}
#endif

}  // namespace detail::blas

/// Whether large products go to OpenBLAS in this program, and why.
inline const BlasStatus& blas_info() { return detail::blas::status(); }

}  // namespace lora
