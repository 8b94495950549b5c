"""The Philox stream: known answers, and Triton bit-identical to the reference for any seed, offset and tiling."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from regops._core.philox import STREAM_C3, keep_threshold, philox4x32, random_words

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402
from regops.kernels.philox import random_words as tl_random_words  # noqa: E402

# Random123's known-answer vectors for philox4x32_10.
KAT = [
    ((0, 0, 0, 0), 0, (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, 0xFFFFFFFFFFFFFFFF, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        0x299F31D0A4093822,
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.mark.parametrize("counter,key,expected", KAT)
def test_reference_matches_random123_known_answers(counter, key, expected):
    words = [torch.tensor([c], dtype=torch.int64) for c in counter]
    out = philox4x32(key, *words)
    assert tuple(int(w) for w in out) == expected


def test_products_keep_all_64_bits():
    from regops._core.philox import ROUND_A, ROUND_B, _mul_hi_lo

    words = [0, 1, 2**16 - 1, 2**31 - 1, 2**31, 2**32 - 2, 2**32 - 1, 0x9E3779B9, 0xDEADBEEF]
    gen = torch.Generator().manual_seed(0)
    words += torch.randint(0, 2**32, (2000,), generator=gen).tolist()
    for constant in (ROUND_A, ROUND_B):
        hi, lo = _mul_hi_lo(torch.tensor(words, dtype=torch.int64), constant)
        assert hi.tolist() == [(w * constant) >> 32 for w in words]
        assert lo.tolist() == [(w * constant) & 0xFFFFFFFF for w in words]


def test_word_layout_is_four_words_per_counter():
    seed, offset = 1234, 77
    words = random_words(seed, offset, (10,))
    counters = torch.tensor([offset, offset + 1, offset + 2], dtype=torch.int64)
    zero = torch.zeros_like(counters)
    expected = torch.stack(philox4x32(seed, counters, zero, zero, zero + STREAM_C3), dim=1).reshape(-1)[:10]
    assert torch.equal(words, expected)


def test_negative_seed_uses_twos_complement_bits():
    assert torch.equal(random_words(-1, 5, (8,)), random_words(0xFFFFFFFFFFFFFFFF, 5, (8,)))


def test_keep_threshold_edges():
    assert keep_threshold(0.0) == -1  # every word kept
    assert keep_threshold(1.0) == 2**31 - 1  # no word kept
    assert keep_threshold(0.5) == 2**30 - 1


@triton.jit
def _words_kernel(out_ptr, n, seed, offset, BLOCK: tl.constexpr):
    start = tl.program_id(0).to(tl.int64) * BLOCK
    idx = start + tl.arange(0, BLOCK)
    w = tl_random_words(seed, offset + start // 4, BLOCK)
    tl.store(out_ptr + idx, w.to(tl.int64), mask=idx < n)


def _triton_words(seed: int, offset: int, n: int, block: int) -> torch.Tensor:
    out = torch.empty(n, dtype=torch.int64, device="cuda" if torch.cuda.is_available() else "cpu")
    _words_kernel[(triton.cdiv(n, block),)](out, n, seed, offset, BLOCK=block)
    return out.cpu() & 0xFFFFFFFF


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(min_value=-(2**63), max_value=2**63 - 1),
    offset=st.one_of(st.integers(0, 2**40), st.just(2**32 - 2), st.just(2**62 - 10)),
    n=st.integers(1, 3000),
    block=st.sampled_from([256, 1024, 4096]),
)
def test_triton_words_equal_reference(seed, offset, n, block):
    assert torch.equal(_triton_words(seed, offset, n, block), random_words(seed, offset, (n,)))


def test_stream_is_a_subsequence_torch_never_uses():
    # torch's Philox kernels put the thread index in counter words (c2, c3); ours has c3's top bit set.
    assert STREAM_C3 >= 2**31
