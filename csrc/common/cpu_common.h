// Shared pieces of the C++ CPU kernels (csrc/cpu_*.cpp): the dropout parameters computed exactly as the
// reference computes them, Philox words for a block of counters in a loop the compiler vectorizes, and the
// per-ISA clones of the hot loops.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>

#include "common/op_args.h"
#include "common/philox.cuh"

// Hot loops are compiled once per x86-64 level (v4: AVX-512 with DQ/BW/VL; v3: AVX2, FMA, BMI2; the baseline) and
// picked at load time (GNU ifunc): one portable binary that still uses wide integer multiplies where the CPU has
// them (AVX-512F alone lacks the 64-bit lane multiplies and shuffles the Philox rounds and conversions need). Integer math and single
// float multiplies/adds only (-ffp-contract=off in the build), so every clone gives the same bits.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define REGOPS_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define REGOPS_CPU_CLONES
#endif

namespace regops {
namespace cpu {

using regops::dropout_scale;
using regops::keep_threshold;

// Counters per block: 64 elements, 8 bitmask bytes; the unit of the vectorized Philox loop.
constexpr int64_t kBlockCounters = 16;
constexpr int64_t kBlockElems = 4 * kBlockCounters;

inline void check_p(double p, const char* op) {
  TORCH_CHECK_VALUE(p >= 0.0 && p <= 1.0, "regops::", op, ": p must be in [0, 1], got ", p);
}

// words[4 * j + k] = word k of counter first + j, for j < kBlockCounters (always a whole block: the caller
// ignores words past its end).
void philox_block(uint64_t seed, uint64_t first, uint32_t* __restrict__ words);

// Multipliers of a block: m[i] = keep(words[i]) ? scale : 0, as float (the dropout mask times its scale).
REGOPS_HD void block_multipliers(const uint32_t* __restrict__ words, int32_t threshold, float scale,
                                 float* __restrict__ m) {
  for (int64_t i = 0; i < kBlockElems; ++i) m[i] = keep(words[i], threshold) ? scale : 0.0f;
}

template <typename T>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};

// Dispatch over the four floating dtypes with the element type T.
#define REGOPS_CPU_FLOATING(dtype, op, ...)                                  \
  [&] {                                                                      \
    switch (dtype) {                                                         \
      case at::kFloat: {                                                     \
        using T = float;                                                     \
        return __VA_ARGS__();                                                \
      }                                                                      \
      case at::kDouble: {                                                    \
        using T = double;                                                    \
        return __VA_ARGS__();                                                \
      }                                                                      \
      case at::kHalf: {                                                      \
        using T = c10::Half;                                                 \
        return __VA_ARGS__();                                                \
      }                                                                      \
      case at::kBFloat16: {                                                  \
        using T = c10::BFloat16;                                             \
        return __VA_ARGS__();                                                \
      }                                                                      \
      default:                                                               \
        TORCH_CHECK(false, "regops_cpu::", op, ": unsupported dtype ", dtype, \
                    " (float32, float64, float16, bfloat16)");                \
    }                                                                        \
  }()

// Parallel chunks of whole blocks of counters: about 256K elements per task, so that small calls stay on one
// thread and the work split never depends on the thread count (results do not either).
constexpr int64_t kGrainBlocks = 4096;

}  // namespace cpu
}  // namespace regops
