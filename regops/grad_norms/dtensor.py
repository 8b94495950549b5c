"""Per-example clipping under FSDP2 (``torch.distributed.fsdp.fully_shard``) and tensor parallelism.

Under FSDP2 every layer runs on the all-gathered (unsharded) weights, so the recorded activations and output
gradients are the full ones and the per-example norms of each rank's own examples are over the whole model:
no extra communication. The clipped sum of a rank's examples is a full-size gradient; it is averaged over the
ranks of the parameter's mesh and written with the parameter's placements in one reduce-scatter (the same
communication FSDP2 does for a normal backward), so ``p.grad`` is a DTensor like the one FSDP2 would write.
The noise is a function of (seed, global element index): every rank draws only its shard's elements of the
single-process noise (rank 0's seed), scaled by ``1 / world`` like the average, after the reduce-scatter.

Under tensor parallelism (``parallelize_module``: ColwiseParallel / RowwiseParallel ``nn.Linear`` and
``nn.Embedding``) every rank sees the same batch and holds shards of the weights: each builds its shards of the
clipped sum from the matching columns of the layer's input and output gradient (an Embedding's rows: the tokens
it holds) and adds its shards' part of the same noise; no communication.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
from torch.distributed.tensor.placement_types import _StridedShard

from regops._core.dtensor import box, contiguous_strides, placed_box
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
    full = full.div_(mesh.size()) if full.is_contiguous() else (full / mesh.size()).contiguous()
    local_shape, offset = box(p)
    if full.device.type == "cpu":
        # gloo reduce-scatters through a full-size copy of its input: summing in place and copying this rank's box
        # out holds half as much (the same bytes move: gloo's reduce-scatter all-reduces)
        for dim in range(mesh.ndim):
            torch.distributed.all_reduce(full, group=mesh.get_group(dim))
        local = full[tuple(slice(o, o + n) for o, n in zip(offset, local_shape, strict=True))].clone()
    else:
        part = DTensor.from_local(
            full, mesh, [Partial()] * mesh.ndim, shape=p.shape, stride=tuple(contiguous_strides(p.shape))
        )
        local = part.redistribute(mesh, p.placements).to_local()
    if tuple(local_shape) != tuple(local.shape):
        raise RuntimeError(f"regops: the shard box {tuple(local_shape)} is not the local gradient's shape")
    if noise is not None:
        seed, base, std = noise
        add_noise(local, seed, base, p.shape, offset, std / mesh.size())
    return DTensor.from_local(local, mesh, p.placements, shape=p.shape, stride=tuple(contiguous_strides(p.shape)))


def _local_sum(local: torch.Tensor | None, local_shape, p: DTensor, placements) -> torch.Tensor:
    """This rank's clipped sum in ``p``'s dtype, contiguous (zeros for ``None``: no contribution), checked against
    the local shape ``placements`` give it."""
    if local is None:
        return torch.zeros(local_shape, dtype=p.dtype, device=p.to_local().device)
    if tuple(local.shape) != tuple(local_shape):
        raise RuntimeError(
            f"regops: the clipped sum's block {tuple(local.shape)} is not {tuple(placements)}'s local shape "
            f"{tuple(local_shape)}"
        )
    return local.to(p.dtype).contiguous()


def tensor_parallel_grad(
    local: torch.Tensor | None, p: DTensor, noise: tuple[torch.Tensor, int, float] | None, before: Any
) -> DTensor:
    """The clipped sum of a tensor-parallel parameter from this rank's shard of it (``None``: no contribution),
    noised with the shard's part of the single-process noise (``noise = (seed, base, std)``), as a DTensor with
    ``p``'s placements, added to the gradient ``before`` the block."""
    local_shape, offset = box(p)
    local = _local_sum(local, local_shape, p, p.placements)
    if noise is not None:
        seed, base, std = noise
        add_noise(local, seed, base, p.shape, offset, std)
    grad = DTensor.from_local(local, p.device_mesh, p.placements, shape=p.shape, stride=p.stride()).detach()
    return grad if before is None else before + grad


def fsdp_dims_over_tp(p: DTensor) -> int:
    """How many leading mesh dims of ``p`` are FSDP2's when FSDP2 shards it over tensor-parallel shards (FSDP2 lays
    such a parameter out on the concatenation of its mesh and the tensor-parallel one: HSDP's ``Replicate()``, its
    ``Shard`` / ``_StridedShard``, then the tensor-parallel placements); 0 for any other parameter. From the layout
    alone, so a step with no forward (the noise only) finds it too."""
    for d, placement in enumerate(p.placements):
        if isinstance(placement, (Shard, _StridedShard)):
            return d + 1 if d + 1 < p.device_mesh.ndim else 0
    return 0


def fsdp_tensor_parallel_grad(
    local: torch.Tensor | None, p: DTensor, noise: tuple[torch.Tensor, int, float] | None, before: Any
) -> DTensor:
    """FSDP2 over tensor parallelism (:func:`fsdp_dims_over_tp`): ``local`` is this rank's clipped sum (its own
    examples) of its tensor-parallel block of the parameter (the block FSDP2 unshards it to: ``p``'s
    tensor-parallel placements). Averaged over FSDP2's mesh dims (in place), noised with the block's part of the
    single-process noise (``std / world``, as :func:`average_into`), then laid out like ``p`` (each rank keeps its
    rows of the block: no communication)."""
    mesh = p.device_mesh
    fsdp_dims = fsdp_dims_over_tp(p)
    block = [Replicate()] * fsdp_dims + list(p.placements[fsdp_dims:])
    local_shape, offset = placed_box(p.shape, mesh, block)
    local = _local_sum(local, local_shape, p, p.placements[fsdp_dims:])
    world = 1
    for d in range(fsdp_dims):
        world *= mesh.size(d)
    local.div_(world)
    for d in range(fsdp_dims):
        torch.distributed.all_reduce(local, group=mesh.get_group(d))
    if noise is not None:
        seed, base, std = noise
        add_noise(local, seed, base, p.shape, offset, std / world)
    strides = tuple(contiguous_strides(p.shape))
    grad = DTensor.from_local(local, mesh, block, shape=p.shape, stride=strides).redistribute(mesh, p.placements)
    grad = grad.detach()
    return grad if before is None else before + grad
