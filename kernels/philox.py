"""Shared Philox helpers: the same stream as regops.reference.philox and csrc/philox.cuh."""

import triton
import triton.language as tl

from regops.reference.philox import STREAM_C3 as _STREAM_C3

STREAM_C3 = tl.constexpr(_STREAM_C3)


@triton.jit
def counter_words(seed, counters):
    """The four uint32 words of regops' stream at int64 ``counters``: Philox counter (lo, hi, 0, STREAM_C3)."""
    counters = counters.to(tl.int64)
    lo = counters.to(tl.uint32)
    hi = (counters >> 32).to(tl.uint32)
    zero = lo * 0
    return tl.philox(seed, lo, hi, zero, zero + STREAM_C3)


@triton.jit
def random_words(seed, first_counter, BLOCK: tl.constexpr):
    """BLOCK uint32 words for consecutive elements starting at element ``4 * first_counter``.

    Element ``4 * c + j`` takes word ``j`` of counter ``c``: one Philox evaluation feeds four elements.
    """
    counters = first_counter + tl.arange(0, BLOCK // 4).to(tl.int64)
    r0, r1, r2, r3 = counter_words(seed, counters)
    # join(join(r0, r2), join(r1, r3))[k, m, n] = r_{2m+n}[k]; row-major flattening gives index 4k + 2m + n.
    return tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), [BLOCK])


@triton.jit
def keep_mask(seed, first_counter, threshold, BLOCK: tl.constexpr):
    """Dropout keep-mask for BLOCK elements: keep iff (word >> 1) > threshold (see keep_threshold)."""
    words = random_words(seed, first_counter, BLOCK)
    return (words >> 1).to(tl.int32, bitcast=True) > threshold
