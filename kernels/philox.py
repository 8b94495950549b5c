"""Shared Philox helpers: the same stream as regops._core.philox and csrc/philox.cuh."""

import torch
import triton
import triton.language as tl

from regops._core.philox import STREAM_C3 as _STREAM_C3

STREAM_C3 = tl.constexpr(_STREAM_C3)


def seed_tensor(seed: "int | torch.Tensor", offset: int | None, device: torch.device) -> torch.Tensor:
    """The int64 ``[2]`` tensor (key, first counter) a kernel reads through :func:`load_seed`, on ``device``.

    Kernels read the seed from device memory, never as a launch argument: under CUDA-graph capture the launch
    arguments are frozen into the graph, while memory written by the captured seed draw (regops._core.rng) changes on
    every replay, so each replay draws a fresh mask. A tensor ``seed`` is used as is (``offset`` must be None);
    a Python int ``seed`` with ``offset`` is packed into a new tensor (tests, direct launcher calls).
    """
    if isinstance(seed, torch.Tensor):
        if offset is not None:
            raise TypeError("regops: pass either a seed tensor [2] or the ints (seed, offset), not both")
        if seed.dtype != torch.int64 or seed.shape != (2,):
            raise ValueError(
                f"regops: the seed tensor must be int64 of shape [2], got {seed.dtype} {tuple(seed.shape)}"
            )
        if seed.device != device and device.type != "meta":
            seed = seed.to(device, non_blocking=True)
        return seed
    if offset is None:
        raise TypeError("regops: an int seed needs its offset")
    bits = [int(seed) & (2**64 - 1), int(offset) & (2**64 - 1)]
    return torch.tensor([b - 2**64 if b >= 2**63 else b for b in bits], dtype=torch.int64, device=device)


@triton.jit
def load_seed(seed_ptr):
    """(key, first counter) as int64 scalars from an int64 ``[2]`` tensor: 64-bit arithmetic whatever their values
    (a launch argument below 2**31 would be specialised to int32 and its sums could wrap)."""
    return tl.load(seed_ptr), tl.load(seed_ptr + 1)


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
