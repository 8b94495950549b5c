// Philox4x32-10, the stream shared with regops/reference/philox.py and kernels/philox.py (triton randint4x):
// key (k0, k1) = (seed_lo, seed_hi); counter (c0, c1, c2, c3) = (counter_lo, counter_hi, 0, kStreamC3).
// kStreamC3 has its top bit set: torch's kernels put the thread index in (c2, c3) and never reach it.
// Element i of a call with first counter `offset` takes word i % 4 of counter offset + i / 4.
#pragma once
#include <cstdint>

namespace regops {

constexpr uint32_t kStreamC3 = 0xA5E60001u;  // regops/reference/philox.py STREAM_C3

struct Words4 {
  uint32_t w[4];
};

__device__ __forceinline__ Words4 philox4x32_10(uint64_t seed, uint64_t counter) {
  uint32_t c0 = static_cast<uint32_t>(counter), c1 = static_cast<uint32_t>(counter >> 32), c2 = 0, c3 = kStreamC3;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    const uint32_t hi_b = __umulhi(0xCD9E8D57u, c2), lo_b = 0xCD9E8D57u * c2;
    const uint32_t hi_a = __umulhi(0xD2511F53u, c0), lo_a = 0xD2511F53u * c0;
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
__device__ __forceinline__ bool keep(uint32_t word, int32_t threshold) {
  return static_cast<int32_t>(word >> 1) > threshold;
}

}  // namespace regops
