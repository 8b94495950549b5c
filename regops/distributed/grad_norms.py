"""Per-example clipping under FSDP2 (``torch.distributed.fsdp.fully_shard``).

Under FSDP2 every layer runs on the all-gathered (unsharded) weights, so the recorded activations and output
gradients are the full ones and the per-example norms of each rank's own examples are over the whole model:
no extra communication. The clipped sum of a rank's examples is a full-size gradient; it is averaged over the
ranks of the parameter's mesh and written with the parameter's placements in one reduce-scatter (the same
communication FSDP2 does for a normal backward), so ``p.grad`` is a DTensor like the one FSDP2 would write.
As under DDP, noise is drawn on rank 0 only (full size, from its generator: the single-process draw for the
same generator state) before the average.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Partial, Shard

from regops._core import dtensor as _dtensor
from regops._core.dtensor import box, contiguous_strides


def average_into(full: torch.Tensor, p: DTensor) -> DTensor:
    """``mean over the ranks of p's mesh of full`` (a full-size plain tensor on every rank), laid out like ``p``."""
    mesh = p.device_mesh
    if isinstance(full, DTensor):
        raise NotImplementedError(
            "regops: per-example clipping of tensor-parallel (DTensor) layers is not supported; FSDP2 "
            "(fully_shard) and DistributedDataParallel are"
        )
    if tuple(full.shape) != tuple(p.shape):
        raise ValueError(f"regops: a gradient of shape {tuple(full.shape)} for a parameter of shape {tuple(p.shape)}")
    part = DTensor.from_local(
        (full / mesh.size()).contiguous(),
        mesh,
        [Partial()] * mesh.ndim,
        shape=p.shape,
        stride=tuple(contiguous_strides(p.shape)),
    )
    return part.redistribute(mesh, p.placements).detach()


# ----------------------------------------------------------------------------------------------- tensor parallel
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
    from regops.grad_norms.layers import LinearRule

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
