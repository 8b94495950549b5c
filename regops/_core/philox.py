"""Philox4x32-10 in torch integer arithmetic, bit-identical to ``triton.language.randint4x`` and csrc/philox.cuh.

The stream: key ``(k0, k1) = (seed & 0xFFFFFFFF, seed >> 32)``; counter ``(c0, c1, c2, c3) = (c & 0xFFFFFFFF,
c >> 32, 0, STREAM_C3)`` for a 64-bit counter ``c``.

Why ``c3 = STREAM_C3``: torch's own Philox kernels draw from the same generator state (seed, offset) with
counter ``(offset / 4 + k, subsequence)``, the 64-bit subsequence ``(c2, c3)`` being the CUDA thread index, and
torch.compile's Triton RNG uses ``(offset, 0, 0)``. Both keep ``c3`` below ``2**31`` (a thread index of
``2**63`` does not exist), so a stream whose ``c3`` has its top bit set never meets a word torch draws, whatever
offsets the two use. One counter gives four 32-bit words. Word ``i`` of a call with
first counter ``offset`` is word ``i % 4`` of counter ``offset + i // 4`` -- a function of the element's logical
index only, never of how a kernel tiles the work.

All values are held in int64 tensors in ``[0, 2**32)``. The 64-bit product of two such words is formed with one
int64 multiply, which wraps (two's complement) and so keeps all 64 bits: the low word is ``prod & M``, the high
word ``(prod >> 32) & M``. The known-answer tests (all-ones words included) check this bit for bit.
"""

from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF
ROUND_A = 0xD2511F53
ROUND_B = 0xCD9E8D57
KEY_A = 0x9E3779B9
KEY_B = 0xBB67AE85
N_ROUNDS = 10
# Top bit set: a Philox subsequence torch's kernels never use (see the module docstring).
STREAM_C3 = 0xA5E6_0001


def _mul_hi_lo(a: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of ``a * b`` for ``a`` in [0, 2**32) and a 32-bit constant ``b``."""
    product = a * b  # wraps in int64; the bits are those of the exact 64-bit product
    return (product >> 32) & _M32, product & _M32


def philox4x32(
    seed: int, c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor, n_rounds: int = N_ROUNDS
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox4x32 with key ``seed`` (64-bit, any sign: its two's-complement bits) on int64 counter words."""
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    for _ in range(n_rounds):
        hi_b, lo_b = _mul_hi_lo(c2, ROUND_B)
        hi_a, lo_a = _mul_hi_lo(c0, ROUND_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + KEY_A) & _M32, (k1 + KEY_B) & _M32
    return c0, c1, c2, c3


def counter_words(seed: int, counters: torch.Tensor) -> torch.Tensor:
    """The four 32-bit words (int64, last dim 4) of regops' stream at 64-bit ``counters`` (int64, any shape)."""
    zero = torch.zeros_like(counters)
    return torch.stack(philox4x32(seed, counters & _M32, (counters >> 32) & _M32, zero, zero + STREAM_C3), dim=-1)


def random_words(seed: int, offset: int, shape: tuple[int, ...] | torch.Size, device=None) -> torch.Tensor:
    """The call's 32-bit words for every element of ``shape`` (row-major logical index), as int64."""
    n = 1
    for s in shape:
        n *= int(s)
    counters = offset + torch.arange((n + 3) // 4, dtype=torch.int64, device=device)
    words = counter_words(seed, counters)
    return words.reshape(-1)[:n].reshape(shape)


def keep_threshold(p: float) -> int:
    """Integer threshold ``t`` such that an element is kept iff ``(word >> 1) > t``: P(keep) = 1 - p to 2**-31."""
    return int(p * 2**31) - 1


def keep_mask(seed: int, offset: int, shape: tuple[int, ...] | torch.Size, p: float, device=None) -> torch.Tensor:
    """Boolean keep-mask of a dropout call with drop probability ``p``."""
    return (random_words(seed, offset, shape, device) >> 1) > keep_threshold(p)
