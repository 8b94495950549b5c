"""DTensor plumbing shared by the distributed ops: a shard's box in the global tensor, seeds that agree on every
rank of a mesh, auxiliary tensors brought to a shard's layout, and the way back to a DTensor."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from regops._core import rng as _rng


def contiguous_strides(shape) -> list[int]:
    """Row-major strides (in elements) of ``shape``."""
    strides, acc = [], 1
    for s in reversed(list(shape)):
        strides.append(acc)
        acc *= int(s)
    return strides[::-1]


def check(x: DTensor, name: str = "x") -> None:
    """Only plain ``Shard(d)`` and ``Replicate()`` placements describe a box of the global tensor."""
    for pl in x.placements:
        if not (type(pl) is Shard or isinstance(pl, Replicate)):
            raise NotImplementedError(
                f"regops: {name} has placement {pl}; regops ops on DTensors take Shard(dim) and Replicate() "
                f"placements (redistribute a Partial DTensor first)"
            )


def box(x: DTensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(local_shape, global_offset)``: this rank holds ``x[o_0 : o_0 + L_0, ...]`` of the global tensor."""
    check(x)
    return placed_box(x.shape, x.device_mesh, x.placements)


def placed_box(shape, mesh, placements) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """:func:`box` of a ``shape`` tensor laid out on ``mesh`` with ``placements`` (``Shard(d)`` / ``Replicate()``)."""
    local_shape, offset = compute_local_shape_and_global_offset(shape, mesh, placements)
    return tuple(local_shape), tuple(offset)


def layout(x: DTensor, word_strides: Sequence[int]) -> list[int]:
    """``[base, *word_strides]`` of this rank's shard (see ``global_mask_apply`` in :mod:`regops.dropout.reference`)."""
    _, offset = box(x)
    return [sum(o * w for o, w in zip(offset, word_strides, strict=True)), *word_strides]


def sync(t: torch.Tensor, mesh) -> torch.Tensor:
    """``t`` as held by the mesh's first rank (coordinate 0 on every mesh dim), on every rank of the mesh.

    Every rank draws from its own generator (so each advances identically); the broadcast makes the draws agree
    even where the ranks' generators do not. Collective over the mesh: every rank must call it.
    """
    if mesh.size() == 1:
        return t
    dtype = t.dtype
    buf = t.to(device=mesh.device_type, dtype=torch.uint8 if dtype == torch.bool else dtype).contiguous()
    for d in range(mesh.ndim):
        if mesh.size(d) > 1:
            dist.broadcast(buf, group=mesh.get_group(d), group_src=0)
    return buf.to(device=t.device, dtype=dtype)


def seed(x: DTensor, n_words: int, generator: torch.Generator | None) -> torch.Tensor:
    """The call's Philox key and first counter (int64 ``[2]`` on the CPU), the same on every rank of the mesh.

    ``n_words`` counts the words of the *global* call, so the generator advances as in a single process.
    """
    return sync(_rng.philox_seed(x.device, n_words, generator), x.device_mesh)


def to_dtensor(local: torch.Tensor, like: DTensor, placements=None) -> DTensor:
    """Wrap a shard computed for ``like``'s box (``like``'s placements unless given; contiguous global strides)."""
    return DTensor.from_local(
        local,
        like.device_mesh,
        placements if placements is not None else like.placements,
        shape=like.shape,
        stride=tuple(contiguous_strides(like.shape)),
    )


def local_like(t: torch.Tensor | None, x: DTensor, name: str) -> torch.Tensor | None:
    """The shard of ``t`` (same global shape as ``x``) that matches ``x``'s shard, differentiably."""
    if t is None:
        return None
    if not isinstance(t, DTensor):
        raise TypeError(f"regops: x is a DTensor, so {name} must be a DTensor on the same mesh, got a plain tensor")
    if t.device_mesh != x.device_mesh:
        raise ValueError(f"regops: {name} is on a different device mesh than x")
    check(t, name)
    if tuple(t.placements) != tuple(x.placements):
        t = t.redistribute(x.device_mesh, x.placements)
    return t.to_local()


def local_columns(t: torch.Tensor | None, x: DTensor, name: str) -> torch.Tensor | None:
    """The slice of a ``[H]`` parameter (DTensor or plain, replicated) matching the last dim of ``x``'s shard.

    Its gradient is this shard's contribution: a sum over the ranks that hold different parts of ``x``
    (``Partial`` on mesh dims where ``x`` is sharded), the same on ranks holding replicas.
    """
    if t is None:
        return None
    mesh = x.device_mesh
    replicate = [Replicate()] * mesh.ndim
    if isinstance(t, DTensor):
        if t.device_mesh != mesh:
            raise ValueError(f"regops: {name} is on a different device mesh than x")
        check(t, name)
        full = t.redistribute(mesh, replicate) if any(not isinstance(p, Replicate) for p in t.placements) else t
    else:
        full = DTensor.from_local(t, mesh, replicate)
    grad_placements = [Partial() if isinstance(p, Shard) else Replicate() for p in x.placements]
    local = full.to_local(grad_placements=grad_placements)
    shape, offset = box(x)
    return local.narrow(0, offset[-1], shape[-1])


def gather_dims(x: DTensor, dims: set[int]) -> list:
    """``x``'s placements with every ``Shard`` on one of ``dims`` replaced by ``Replicate()``."""
    return [Replicate() if isinstance(p, Shard) and p.dim % x.dim() in dims else p for p in x.placements]
