"""merge_chunk and merge_uniform: the Triton kernel (under the interpreter on CPU) and the C++ CPU kernel are
bit-identical to the reference for every keep rule, combine rule, dtype and chunk offset; opcheck."""

from __future__ import annotations

import pytest
import torch

import regops
from regops._core import dispatch
from regops.merge import ops
from regops.testing import make_tensor

DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
BITS = {torch.float64: torch.int64, torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def _backends():
    out = ["triton"] if dispatch.triton_importable() else []
    if dispatch.why_not("merge_chunk", "cpp", torch.device("cpu")) is None:
        out.append("cpp")
    return out


def _args(K):
    weights = torch.tensor([1.0, 0.5, -2.0][:K], dtype=torch.float64)
    seeds = torch.tensor([[5, 7], [-9, 2**40], [2**62, 3]][:K])
    thresholds = torch.tensor([0.5, 0.7, 1.0][:K], dtype=torch.float64)
    cuts = torch.tensor([10, 3000, 20][:K])
    return weights, seeds, thresholds, cuts, torch.tensor(0.4, dtype=torch.float64)


def _inputs(n, dtype, K=3):
    base = make_tensor((n,), dtype, seed=1)
    deltas = [make_tensor((n,), dtype, seed=2 + k) for k in range(K)]
    deltas[-1][::7] = 0  # zeros: sign 0 never agrees
    base[::5] = -0.0
    return base, deltas


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_merge_chunk_bit_identical(backend, dtype):
    base, deltas = _inputs(3001, dtype)
    args = _args(3)
    for first in (0, 8, 3):
        for keep in ("all", "random", "magnitude"):
            for combine in ("sum", "total", "frequency"):
                for finetuned in (False, True):
                    call = (base, deltas, *args, first, keep, combine, finetuned, True)
                    with regops.use_backend("torch"):
                        expected = ops.merge_chunk(*call)
                    with regops.use_backend(backend):
                        out = ops.merge_chunk(*call)
                    label = f"{first} {keep} {combine} {finetuned}"
                    assert torch.equal(out.view(BITS[dtype]), expected.view(BITS[dtype])), label


@pytest.mark.parametrize("backend", _backends())
def test_merge_uniform_bit_identical(backend):
    seed = torch.tensor([123, 2**33 + 1])
    for first, n in ((0, 1000), (3, 257), (2**40 + 1, 9)):
        with regops.use_backend("torch"):
            expected = ops.merge_uniform(seed, first, n)
        with regops.use_backend(backend):
            out = ops.merge_uniform(seed, first, n)
        assert torch.equal(out, expected)
        assert out.min() >= 0 and out.max() < 1


def test_opcheck():
    base, deltas = _inputs(64, torch.float32, K=2)
    torch.library.opcheck(
        torch.ops.regops.merge_chunk.default, (base, deltas, *_args(2), 4, "random", "total", False, True)
    )
    torch.library.opcheck(torch.ops.regops.merge_uniform.default, (torch.tensor([1, 2]), 0, 16))


def test_reference_rejects_unknown_rules():
    base, deltas = _inputs(8, torch.float32, K=1)
    with regops.use_backend("torch"), pytest.raises(ValueError, match="keep must be one of"):
        ops.merge_chunk(base, deltas, *_args(1), 0, "top", "sum", False, True)
