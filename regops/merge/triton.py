"""The merge family's Triton launchers: each takes its op's arguments and returns its results, bit-identical to
:mod:`regops.merge.reference`. The kernels are in ``regops.kernels.merge``; every launch goes through
:func:`regops._core.launch.launch`. The K deltas are passed as a table of data pointers."""

from __future__ import annotations

import torch
import triton

from regops._core.launch import launch
from regops._core.philox import keep_threshold
from regops._core.validate import probability_value
from regops.kernels import merge as K

_KEEP = {"all": 0, "random": 1, "magnitude": 2}
_COMBINE = {"sum": 0, "total": 1, "frequency": 2}


def _block(t: torch.Tensor) -> int:
    return 8192 if t.device.type == "cpu" else 1024  # the interpreter pays per program instance


def merge_chunk(
    base: torch.Tensor,
    deltas: list[torch.Tensor],
    weights: torch.Tensor,
    seeds: torch.Tensor,
    thresholds: torch.Tensor,
    cuts: torch.Tensor,
    density: torch.Tensor,
    first: int,
    keep: str,
    combine: str,
    finetuned: bool,
    rescale: bool,
) -> torch.Tensor:
    out = torch.empty_like(base)
    n = base.numel()
    if n == 0:
        return out
    if any(d.dtype != base.dtype or d.numel() != n for d in deltas):
        raise ValueError("regops: merge_chunk needs deltas of the base's dtype and size")
    dev = base.device
    dens = probability_value(density, "density")
    table = torch.tensor([d.data_ptr() for d in deltas], dtype=torch.int64).to(dev, non_blocking=True)
    scale = torch.tensor([1.0 / dens if (rescale and keep == "random") else 1.0], dtype=torch.float64).to(dev)
    block = _block(base)
    launch(
        K.merge_chunk_kernel, (triton.cdiv(n, block),),
        base, table, weights.to(dev, torch.float64), seeds.to(dev), thresholds.to(dev, torch.float64),
        cuts.to(dev), scale, out, n, len(deltas), first, keep_threshold(1.0 - dens),
        device=dev, KEEP=_KEEP[keep], COMBINE=_COMBINE[combine], FINETUNED=finetuned, ALIGNED=first % 4 == 0,
        BLOCK=block, num_warps=4, enable_fp_fusion=False,
    )  # fmt: skip
    return out


def merge_uniform(seed: torch.Tensor, first: int, n: int) -> torch.Tensor:
    out = torch.empty(n, dtype=torch.float64, device=seed.device)
    if n:
        block = _block(seed)
        launch(K.merge_uniform_kernel, (triton.cdiv(n, block),), seed, out, n, first, device=seed.device, BLOCK=block,
               num_warps=4)  # fmt: skip
    return out
