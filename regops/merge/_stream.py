"""Streaming a merge over a state dict: tensor by tensor, chunk by chunk, with constant extra memory.

Per tensor the engine holds the K deltas' flat views (no copies of contiguous tensors), one chunk of results and
a few chunk-sized temporaries; it never stacks the K deltas. Random masks are keyed by (the call's seed, the
tensor's name, the delta's index) and counted by global element index; magnitude trims are exact top-k
thresholds found by a streamed radix select. So the chunk size changes nothing but speed and memory.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from regops._core.dtypes import acc_dtype
from regops.merge import ops
from regops.merge import reference as ref

CHUNK = 1 << 20  # elements per chunk (a multiple of 4: chunks start on a Philox counter)
_M64 = (1 << 64) - 1


@dataclass(frozen=True)
class Plan:
    """What a merge does to every tensor (see :func:`regops.merge.reference.merge_chunk`)."""

    keep: str  # "all" | "random" | "magnitude" | "della"
    combine: str  # "sum" | "total" | "frequency"
    weights: tuple[float, ...]
    density: float = 1.0
    epsilon: float = 0.0
    rescale: bool = True
    finetuned: bool = False


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def stream_key(call_key: int, name: str, k: int) -> int:
    """The Philox key of delta ``k`` of tensor ``name`` (int64): independent streams for every tensor and delta,
    the same whatever the order or the subset of tensors merged."""
    h = int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")
    z = _splitmix64(_splitmix64((call_key & _M64) ^ h) ^ (k + 1))
    return z - (1 << 64) if z >= 1 << 63 else z


def _chunk(t: torch.Tensor, start: int, end: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return t[start:end].to(device=device, dtype=dtype, non_blocking=True)


def _deltas(b: torch.Tensor, ds: list[torch.Tensor], finetuned: bool) -> Iterator[torch.Tensor]:
    cd = acc_dtype(b)
    for d in ds:
        yield d.to(cd) - b.to(cd) if finetuned else d.to(cd)


# ------------------------------------------------------------------------------------------------ magnitude trim
def _bits_dtype(cd: torch.dtype) -> tuple[torch.dtype, int]:
    return (torch.int64, 4) if cd == torch.float64 else (torch.int32, 2)


def magnitude_threshold(
    base: torch.Tensor, delta: torch.Tensor, plan: Plan, chunk: int, device: torch.device, dtype: torch.dtype
) -> tuple[float, int]:
    """``(t, cut)`` such that ``|d| > t or (|d| == t and index < cut)`` keeps exactly ``int(density * n)`` entries
    of ``d`` (the largest magnitudes; ties at ``t`` in index order), found by a radix select over the bit
    patterns of the magnitudes, 16 bits per streamed pass: memory O(chunk), never a sort of the tensor."""
    n = base.numel()
    k = int(plan.density * n)
    if k <= 0:
        return math.inf, 0
    cd = acc_dtype(torch.empty(0, dtype=dtype))
    bits_dtype, digits = _bits_dtype(cd)

    def magnitude_bits() -> Iterator[tuple[int, torch.Tensor]]:
        for start in range(0, n, chunk):
            end = min(n, start + chunk)
            b = _chunk(base, start, end, device, dtype)
            (d,) = _deltas(b, [_chunk(delta, start, end, device, dtype)], plan.finetuned)
            yield start, d.abs().view(bits_dtype)

    prefix, remaining = 0, k
    for level in range(digits):
        shift = 16 * (digits - 1 - level)
        hist = torch.zeros(1 << 16, dtype=torch.int64, device=device)
        for _, bits in magnitude_bits():
            if level:
                bits = bits[(bits >> (shift + 16)) == prefix]
            hist += torch.bincount(((bits >> shift) & 0xFFFF).to(torch.int64), minlength=1 << 16)
        from_top = hist.flip(0).cumsum(0)
        j = int(torch.searchsorted(from_top, torch.tensor([remaining], device=device)).item())
        remaining -= int(from_top[j - 1].item()) if j else 0
        prefix = (prefix << 16) | (0xFFFF - j)
    signed = prefix - (1 << 64) if bits_dtype == torch.int64 and prefix >= 1 << 63 else prefix
    t = torch.tensor([signed], dtype=bits_dtype).view(cd).item()
    seen = 0
    for start, bits in magnitude_bits():
        eq = bits == signed
        count = int(eq.sum().item())
        if seen + count >= remaining:
            return t, start + int(eq.nonzero()[remaining - seen - 1].item()) + 1
        seen += count
    raise AssertionError("regops: the radix select lost its threshold")


# ------------------------------------------------------------------------------------------------ one tensor
def merge_tensor(
    name: str,
    base: torch.Tensor,
    deltas: list[torch.Tensor],
    plan: Plan,
    call_key: int,
    call_offset: int,
    write: Callable[[int, int, torch.Tensor], None],
    chunk: int = CHUNK,
) -> None:
    """Merge one tensor chunk by chunk; ``write(start, end, merged_chunk)`` stores each result."""
    device = base.device
    dtype = base.dtype
    for d in deltas:
        dtype = torch.promote_types(dtype, d.dtype)
    base_f = base.reshape(-1)
    ds = [d.reshape(-1) for d in deltas]
    n, K = base_f.numel(), len(ds)
    weights = torch.tensor(plan.weights, dtype=torch.float64)
    keys = [stream_key(call_key, name, k) for k in range(K)]
    seeds = torch.tensor([[key, call_offset] for key in keys], dtype=torch.int64, device=device)
    thresholds = torch.zeros(K, dtype=torch.float64)
    cuts = torch.zeros(K, dtype=torch.int64)
    density = torch.tensor(plan.density, dtype=torch.float64)
    keep = plan.keep
    if keep == "magnitude" and plan.density < 1.0:
        for k, d in enumerate(ds):
            thresholds[k], cuts[k] = magnitude_threshold(base_f, d, plan, chunk, device, dtype)
    elif keep == "magnitude" or (keep == "random" and plan.density >= 1.0):
        keep = "all"
    if keep == "della":
        _merge_della(base_f, ds, plan, seeds, weights, thresholds, cuts, density, chunk, dtype, base.shape, write)
        return
    for start in range(0, n, chunk):
        end = min(n, start + chunk)
        b = _chunk(base_f, start, end, device, dtype)
        dc = [_chunk(d, start, end, device, dtype) for d in ds]
        merged = ops.merge_chunk(b, dc, weights, seeds, thresholds, cuts, density, start, keep, plan.combine,
                                 plan.finetuned, plan.rescale)  # fmt: skip
        write(start, end, merged)


def _merge_della(base_f, ds, plan, seeds, weights, thresholds, cuts, density, chunk, dtype, shape, write) -> None:
    """DELLA: each delta's rows (dim 0; one row for a 1-D tensor) ranked by magnitude, entries kept with
    probability ``q`` rising with their rank (:func:`regops.merge.reference.della_probabilities`), survivors
    scaled by ``1/q``; then the combine of the plan on the kept values."""
    n = base_f.numel()
    cols = n // shape[0] if len(shape) >= 2 and shape[0] else max(n, 1)
    rows_per_chunk = max(1, chunk // max(cols, 1))
    cd = acc_dtype(torch.empty(0, dtype=dtype))
    device = base_f.device
    for start in range(0, n, rows_per_chunk * cols):
        end = min(n, start + rows_per_chunk * cols)
        b = _chunk(base_f, start, end, device, dtype).to(cd)
        kept = []
        for k, d in enumerate(_deltas(b, [_chunk(x, start, end, device, dtype) for x in ds], plan.finetuned)):
            q = ref.della_probabilities(d.abs().reshape(-1, cols), plan.density, plan.epsilon).reshape(-1)
            u = ops.merge_uniform(seeds[k], start, end - start)
            factor = (u < q).to(torch.float64) / (q if plan.rescale else 1.0)
            kept.append(d * factor.to(cd))
        merged = ops.merge_chunk(b, kept, weights, seeds, thresholds, cuts, density, start, "all", plan.combine,
                                 False, False)  # fmt: skip
        write(start, end, merged)
