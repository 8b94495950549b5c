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

import torch
from torch.distributed.tensor import DTensor, Partial

from regops._core.dtensor import contiguous_strides


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
