"""Per-example clipping under FSDP2 (``torch.distributed.fsdp.fully_shard``).

Under FSDP2 every layer runs on the all-gathered (unsharded) weights, so the recorded activations and output
gradients are the full ones and the per-example norms of each rank's own examples are over the whole model:
no extra communication. The clipped sum of a rank's examples is a full-size gradient; it is averaged over the
ranks of the parameter's mesh and written with the parameter's placements in one reduce-scatter (the same
communication FSDP2 does for a normal backward), so ``p.grad`` is a DTensor like the one FSDP2 would write.
The noise is a function of (seed, global element index): every rank draws only its shard's elements of the
single-process noise (rank 0's seed), scaled by ``1 / world`` like the average, after the reduce-scatter.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, Partial

from regops._core.dtensor import box, contiguous_strides
from regops.grad_norms._noise import add_noise


def average_into(full: torch.Tensor, p: DTensor, noise: tuple[torch.Tensor, int, float] | None = None) -> DTensor:
    """``mean over the ranks of p's mesh of full`` (a full-size plain tensor on every rank, divided in place: the
    caller's own), laid out like ``p``,
    plus ``std / world`` times this shard's part of the noise when ``noise = (seed, base, std)`` (``base``: the
    noise index of ``p``'s first element)."""
    mesh = p.device_mesh
    if isinstance(full, DTensor):
        raise NotImplementedError(
            "regops: per-example clipping of tensor-parallel (DTensor) layers is not supported; FSDP2 "
            "(fully_shard) and DistributedDataParallel are"
        )
    if tuple(full.shape) != tuple(p.shape):
        raise ValueError(f"regops: a gradient of shape {tuple(full.shape)} for a parameter of shape {tuple(p.shape)}")
    part = DTensor.from_local(
        full.div_(mesh.size()) if full.is_contiguous() else (full / mesh.size()).contiguous(),
        mesh,
        [Partial()] * mesh.ndim,
        shape=p.shape,
        stride=tuple(contiguous_strides(p.shape)),
    )
    out = part.redistribute(mesh, p.placements).detach()
    if noise is not None:
        seed, base, std = noise
        local = out.to_local()
        local_shape, offset = box(p)
        if tuple(local_shape) != tuple(local.shape):
            raise RuntimeError(f"regops: the shard box {tuple(local_shape)} is not the local gradient's shape")
        add_noise(local, seed, base, p.shape, offset, std / mesh.size())
        out = DTensor.from_local(local, mesh, p.placements, shape=p.shape, stride=out.stride())
    return out
