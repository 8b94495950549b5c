"""Per-example norms of tensor-parallel layers (``ColwiseParallel`` / ``RowwiseParallel`` ``nn.Linear``, weights and
layer signals DTensors): each rank computes the partial squared norms of its block and the partial sums are
all-reduced over the mesh dims where the parameter is sharded."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard

from regops.distributed import _dtensor
from regops.distributed._dtensor import box
from regops.per_example._layers import LinearRule


def _block(t: Any, start: int, size: int, full: int, name: str) -> torch.Tensor:
    """The columns ``[start, start + size)`` of the last dim of ``t`` (a DTensor or a plain tensor holding either
    all ``full`` columns or exactly that block)."""
    if isinstance(t, DTensor):
        if t.shape[-1] != full:
            raise ValueError(f"regops: the layer's {name} has {t.shape[-1]} features, its weight {full}")
        _, offset = box(t)
        local = t.to_local()
        if local.shape[-1] == size and offset[-1] == start:
            return local
        if local.shape[-1] != full:
            raise NotImplementedError(
                f"regops: the layer's {name} is sharded differently from its weight; per-example norms need them "
                "aligned (the ColwiseParallel / RowwiseParallel layouts)"
            )
        return local.narrow(-1, start, size)
    if t.shape[-1] == size:
        return t
    if t.shape[-1] == full:
        return t.narrow(-1, start, size)
    raise ValueError(f"regops: the layer's {name} has {t.shape[-1]} features, its weight shard {size} of {full}")


def _all_reduce_sharded(sq: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """Sum the partial squared norms of ``param``'s shard over the mesh dims where ``param`` is sharded."""
    if not isinstance(param, DTensor):
        return sq
    for d, placement in enumerate(param.placements):
        if isinstance(placement, Shard):
            dist.all_reduce(sq, group=param.device_mesh.get_group(d))
    return sq


def tp_sq_norms(entry: Any, saved: Any, g: Any, form: str, shared: bool) -> dict[str, torch.Tensor]:
    """Per-example squared norms of a tensor-parallel ``nn.Linear`` (weight ``[p, d]`` a DTensor, sharded on
    either dim or replicated): each rank computes the squared norms of its block of ``G_n^T A_n`` (the rows /
    columns of its weight shard, from the matching columns of the output gradient / input) and the partial
    sums are all-reduced over the mesh dims where the parameter is sharded (one ``[B]`` all-reduce per sharded
    parameter). A replicated bias's norm is complete on every rank and is not reduced."""
    module = entry.module
    weight = module.weight
    if type(entry.layer) is not LinearRule or entry.layer.transposed or not isinstance(weight, DTensor):
        raise NotImplementedError(
            f"regops: per-example norms of tensor-parallel layers are supported for nn.Linear (ColwiseParallel / "
            f"RowwiseParallel); got {type(module).__name__} with DTensor inputs"
        )
    if shared:
        raise NotImplementedError("regops: a tensor-parallel weight used by several layers (tied) is not supported")
    _dtensor.check(weight, "weight")
    (p_local, d_local), (p_start, d_start) = box(weight)
    p_full, d_full = weight.shape
    x = _block(saved, d_start, d_local, d_full, "input").detach()
    gl = _block(g, p_start, p_local, p_full, "output gradient").detach()
    sq = entry.layer.sq_norms(module, x, gl, form)
    out = {}
    for local_name, value in sq.items():
        out[local_name] = _all_reduce_sharded(value.contiguous(), getattr(module, local_name))
    return out
