// Philox words of an arbitrary range of a call's flat element indices, for kernels that work on chunks (row
// chunks of a matmul operand, chunks of a tensor being merged): element i takes word i % 4 of counter
// offset + i / 4, the stream of regops._core.philox, whatever the chunk boundaries.
#pragma once
#include <algorithm>
#include <cstdint>

#include "common/cpu_common.h"

namespace regops {
namespace cpu {

// words[j] = the word of element start + j, for j < len.
inline void range_words(uint64_t seed, uint64_t offset, int64_t start, int64_t len, uint32_t* __restrict__ words) {
  alignas(64) uint32_t block[kBlockElems];
  int64_t j = 0;
  while (j < len) {
    const int64_t e = start + j;
    const int64_t b = e / kBlockElems;
    philox_block(seed, offset + static_cast<uint64_t>(b * kBlockCounters), block);
    const int64_t from = e - b * kBlockElems;
    const int64_t n = std::min(kBlockElems - from, len - j);
    std::copy(block + from, block + from + n, words + j);
    j += n;
  }
}

}  // namespace cpu
}  // namespace regops
