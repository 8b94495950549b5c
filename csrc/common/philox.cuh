// Philox4x32-10, the stream shared with regops/reference/philox.py and kernels/philox.py (triton randint4x):
// key (k0, k1) = (seed_lo, seed_hi); counter (c0, c1, c2, c3) = (counter_lo, counter_hi, 0, kStreamC3).
// kStreamC3 has its top bit set: torch's kernels put the thread index in (c2, c3) and never reach it.
// Element i of a call with first counter `offset` takes word i % 4 of counter offset + i / 4.
// One implementation for the CUDA kernels (nvcc) and the C++ CPU kernels (plain host compiler).
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define REGOPS_HD __host__ __device__ __forceinline__
#else
#define REGOPS_HD inline __attribute__((always_inline))
#endif

namespace regops {

constexpr uint32_t kStreamC3 = 0xA5E60001u;  // regops/_core/philox.py STREAM_C3

struct Words4 {
  uint32_t w[4];
};

// High 32 bits of the 64-bit product a * b.
REGOPS_HD uint32_t mul_hi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

REGOPS_HD Words4 philox4x32_10(uint64_t seed, uint64_t counter) {
  uint32_t c0 = static_cast<uint32_t>(counter), c1 = static_cast<uint32_t>(counter >> 32), c2 = 0, c3 = kStreamC3;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#if defined(__CUDACC__)
#pragma unroll
#else
#pragma GCC unroll 10
#endif
  for (int round = 0; round < 10; ++round) {
    const uint32_t hi_b = mul_hi32(0xCD9E8D57u, c2), lo_b = 0xCD9E8D57u * c2;
    const uint32_t hi_a = mul_hi32(0xD2511F53u, c0), lo_a = 0xD2511F53u * c0;
    c0 = hi_b ^ c1 ^ k0;
    c1 = lo_b;
    c2 = hi_a ^ c3 ^ k1;
    c3 = lo_a;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return Words4{{c0, c1, c2, c3}};
}

// Dropout keep decision, as regops.reference.philox.keep_threshold: keep iff (word >> 1) > threshold.
REGOPS_HD bool keep(uint32_t word, int32_t threshold) { return static_cast<int32_t>(word >> 1) > threshold; }

}  // namespace regops
