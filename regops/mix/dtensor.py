"""MixUp / CutMix on DTensors.

* The draws (partners, lambdas, boxes) are made on every rank from its generator, so each advances as in a
  single process, then the mesh's first rank's draws are broadcast (a few ``[B]`` tensors) so that every rank
  mixes the same way and the returned :class:`regops.MixParams` are the ones applied.
* Mixing pairs samples across the batch, and CutMix boxes are in global pixel coordinates: a shard of the batch
  dim (or, for inputs with >= 3 dims, of the last two dims) is all-gathered along that dim, the mix runs on the
  shard (other dims, e.g. channels, stay sharded: no communication for them), and the result is returned with
  ``x``'s placements (taking the local chunk back costs no communication). Autograd runs through both steps.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor

from regops._core import dtensor as _dtensor
from regops.mix import ops


def sync_draws(x: DTensor, *draws: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The mesh's first rank's ``draws`` on every rank of ``x``'s mesh."""
    return tuple(_dtensor.sync(t, x.device_mesh) for t in draws)


def mix_apply(
    x: DTensor, w_self: torch.Tensor, w_other: torch.Tensor, partner: torch.Tensor, box: torch.Tensor
) -> DTensor:
    """``regops::mix_apply`` on ``x``'s shard, with the batch dim (and the box dims) whole."""
    _dtensor.check(x)
    whole = {0} | ({x.dim() - 2, x.dim() - 1} if x.dim() >= 3 else set())
    mid = _dtensor.gather_dims(x, whole)
    xm = x.redistribute(x.device_mesh, mid) if mid != list(x.placements) else x
    local = ops.mix_apply(xm.to_local(), w_self, w_other, partner, box)
    fmt = torch.channels_last if (local.dim() == 4 and not local.is_contiguous()) else torch.contiguous_format
    stride = torch.empty(tuple(x.shape), device="meta").contiguous(memory_format=fmt).stride()
    y = DTensor.from_local(local, x.device_mesh, mid, shape=x.shape, stride=stride)
    return y.redistribute(x.device_mesh, x.placements) if mid != list(x.placements) else y
