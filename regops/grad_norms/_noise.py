"""DP-SGD noise from regops' counter-based stream: one Gaussian probe row (:mod:`regops.hessian`'s stream) over
the tracked parameters flattened and concatenated in order. Each element is a function of (seed, its global
index), so a rank holding a shard of a parameter draws exactly its part of the single-process noise."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from regops._core import rng
from regops._core.validate import is_dtensor
from regops.hessian._probes import stream_box_add_
from regops.hessian.reference import stream_words


def noise_seed(params: Mapping[str, torch.Tensor], generator: torch.Generator | None, sharded: bool) -> torch.Tensor:
    """The step's noise seed: the noise is one Gaussian probe row (:mod:`regops.hessian`'s stream) over the
    parameters flattened and concatenated in order, so each element is a function of (seed, its global index)
    and a shard draws exactly its part of the single-process noise."""
    first = next(iter(params.values()))
    numel = sum(p.numel() for p in params.values())
    seed = rng.philox_seed(first.device, stream_words(1, numel, "gaussian"), generator)
    if sharded:
        from regops._core.dtensor import sync

        # the widest mesh: under FSDP2 over tensor parallelism a parameter FSDP2 alone shards (a LayerNorm's) is on
        # its dp mesh, which leaves out the other tensor-parallel ranks
        mesh = max((p.device_mesh for p in params.values() if is_dtensor(p)), key=lambda m: m.size())
        seed = sync(seed, mesh)
    return seed


def add_noise(out: torch.Tensor, seed: torch.Tensor, base: int, shape, offset, std: float) -> torch.Tensor:
    """``out += std * noise`` over the box of ``out``'s shape at ``offset`` of a ``shape`` parameter whose first
    element is noise element ``base`` (drawn in float32, scaled, then rounded to ``out``'s dtype: two roundings,
    the same on every layout), drawn into ``out`` with no buffer where the C++ kernel runs."""
    return stream_box_add_(out, seed, base, shape, offset, std, "gaussian")
