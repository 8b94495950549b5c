"""The optim family on DTensor parameters (FSDP2's ``fully_shard``, tensor parallelism): each rank runs the multi-tensor
ops on its local shards. What is global is a sum -- SAM's gradient norm, GSAM's and LookSAM's dots, the norm of a unit
that a placement splits (adaptive gradient clipping), a tensor's sums in AdamP's layer view -- and costs one all-reduce
of a few numbers per step. Every rank's noise is the single-process noise of the elements it holds (the seed is rank
0's, the counters are global element indices)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from regops._core import dtensor as _dtensor


def local(ts: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The local shards (plain tensors pass through)."""
    return [t.to_local() if isinstance(t, DTensor) else t for t in ts]


def _mesh(params: Sequence[torch.Tensor]):
    meshes = [p.device_mesh for p in params if isinstance(p, DTensor)]
    if not meshes or any(m != meshes[0] for m in meshes[1:]):  # equal meshes (one per fully_shard call) are one
        raise NotImplementedError("regops: an optimizer step over DTensors needs every parameter on one device mesh")
    return meshes[0]


def _all_reduce(t: torch.Tensor, mesh, dims: Sequence[int]) -> torch.Tensor:
    for d in dims:
        if mesh.size(d) > 1:
            dist.all_reduce(t, group=mesh.get_group(d))
    return t


def global_sums(per_tensor: torch.Tensor, params: Sequence[torch.Tensor]) -> torch.Tensor:
    """``per_tensor`` (``[n, 3]`` sums over each rank's shards) summed over the tensors and the mesh: a tensor
    replicated along a mesh dim counts on that dim's first coordinate only. One all-reduce of 3 numbers."""
    mesh = _mesh(params)
    coords = mesh.get_coordinate() or [0] * mesh.ndim
    weight = []
    for p in params:
        placements = p.placements if isinstance(p, DTensor) else [Replicate()] * mesh.ndim
        counted = all(c == 0 for c, pl in zip(coords, placements, strict=True) if not isinstance(pl, Shard))
        weight.append(1.0 if counted else 0.0)
    w = torch.tensor(weight, dtype=per_tensor.dtype).to(per_tensor.device, non_blocking=True)
    total = (per_tensor * w[:, None]).sum(0)
    return _all_reduce(total, mesh, range(mesh.ndim))


def reduce_rows(sums: torch.Tensor, params: Sequence[torch.Tensor]) -> torch.Tensor:
    """Row sums (``[R, 3]``, rows along dim 0 of each local shard) completed over the mesh dims whose placement
    splits a row (a vector sharded at all, a matrix sharded along a dim other than 0): one all-reduce per distinct
    set of such dims."""
    mesh = _mesh(params)
    slices: dict[tuple[int, ...], list[tuple[int, int]]] = {}
    base = 0
    for p in params:
        rows = (p.to_local().shape[0] if isinstance(p, DTensor) else p.shape[0]) if p.dim() > 1 else 1
        placements = p.placements if isinstance(p, DTensor) else []
        dims = tuple(k for k, pl in enumerate(placements) if isinstance(pl, Shard) and (p.dim() <= 1 or pl.dim != 0))
        if dims:
            slices.setdefault(dims, []).append((base, base + rows))
        base += rows
    for dims, ranges in slices.items():
        index = torch.cat([torch.arange(a, b) for a, b in ranges]).to(sums.device)
        part = _all_reduce(sums.index_select(0, index), mesh, dims)
        sums = sums.index_copy(0, index, part)
    return sums


def reduce_tensors(sums: torch.Tensor, params: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-tensor sums (``[n, k]`` over each rank's shard) completed over the mesh dims that shard each tensor
    (replicated dims hold the same values and are left out): one all-reduce per distinct set of such dims."""
    mesh = _mesh(params)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, p in enumerate(params):
        placements = p.placements if isinstance(p, DTensor) else []
        dims = tuple(k for k, pl in enumerate(placements) if isinstance(pl, Shard))
        if dims:
            groups.setdefault(dims, []).append(i)
    for dims, idx in groups.items():
        index = torch.tensor(idx, dtype=torch.int64).to(sums.device)
        sums = sums.index_copy(0, index, _all_reduce(sums.index_select(0, index), mesh, dims))
    return sums


def elem_offsets(params: Sequence[torch.Tensor]) -> list[int]:
    """The global row-major index of each shard's first element (noise counters). The shard must be a contiguous
    run of the global tensor: Shard(0) and Replicate placements (FSDP2's)."""
    out = []
    for p in params:
        if not isinstance(p, DTensor):
            out.append(0)
            continue
        if any(not (isinstance(pl, Replicate) or (type(pl) is Shard and pl.dim == 0)) for pl in p.placements):
            raise NotImplementedError(
                f"regops: grad_noise on a DTensor with placements {p.placements}: only Shard(0) and Replicate() "
                "shards are contiguous runs of the parameter (FSDP2's layout)"
            )
        _, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
        out.append(int(offset[0]) * math.prod(p.shape[1:]) if p.dim() else 0)
    return out


def agreed_seed(seed: torch.Tensor, params: Sequence[torch.Tensor]) -> torch.Tensor:
    """The mesh's first rank's seed on every rank (16 bytes): one noise stream even where generators differ."""
    return _dtensor.sync(seed, _mesh(params)).to(seed.device)
