"""The per-example engine on DTensors.

* The examples follow a tensor into and out of DTensors (``DTensor.from_local``, ``redistribute``, ``to_local``,
  ``full_tensor``: torch methods that are not torch functions, so the tracker would not see them) as long as no
  placement shards the examples' dim.
* Per-example norms of tensor-parallel layers (``ColwiseParallel`` / ``RowwiseParallel`` ``nn.Linear`` and
  ``nn.Embedding``, weights and layer signals DTensors): each rank computes the partial squared norms of its block
  and the partial sums are all-reduced over the mesh dims where the parameter is sharded.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import types
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard

from regops._core import dtensor as _dtensor
from regops._core.dtensor import box
from regops.per_example._layers import EmbeddingRule, LinearRule
from regops.per_example._layout import Layout
from regops.per_example._propagate import Unknown

_active = threading.local()  # the trackers of this thread's blocks, innermost last
_lock = threading.Lock()
_installed: dict[str, Any] = {}  # DTensor's own methods while they are wrapped
_users = [0]


def _carry(src: Any, out: Any, placements: Any) -> None:
    trackers = getattr(_active, "trackers", None)
    if not trackers:
        return
    tracker = trackers[-1]
    tag = tracker.tag(src)
    if isinstance(tag, Layout):
        shards = [p.dim % out.dim() for p in placements or () if isinstance(p, Shard)]
        tracker.set_tag(out, Unknown("a DTensor sharded along the examples' dim") if tag.dim in shards else tag)


def _wrap(name: str, placements_of: Any) -> Any:
    method = _installed[name]

    @functools.wraps(method)
    def wrapped(self_or_local, *args, **kwargs):
        out = method(self_or_local, *args, **kwargs)
        placements = list(placements_of(self_or_local, args, kwargs))
        if isinstance(self_or_local, DTensor):
            placements += list(self_or_local.placements)
        _carry(self_or_local, out, placements)
        return out

    return wrapped


@contextlib.contextmanager
def carrying(tracker: Any) -> Iterator[None]:
    """While a block runs, DTensor conversions keep the examples' tags (see the module docstring)."""
    with _lock:
        if _users[0] == 0:
            _installed["from_local"] = DTensor.from_local
            _installed["redistribute"] = DTensor.redistribute
            _installed["to_local"] = DTensor.to_local
            _installed["full_tensor"] = DTensor.full_tensor
            DTensor.from_local = staticmethod(
                _wrap("from_local", lambda x, a, k: a[1] if len(a) > 1 else k.get("placements"))
            )
            DTensor.redistribute = _wrap("redistribute", lambda x, a, k: a[1] if len(a) > 1 else k.get("placements"))
            DTensor.to_local = _wrap("to_local", lambda x, a, k: ())
            DTensor.full_tensor = _wrap("full_tensor", lambda x, a, k: ())
        _users[0] += 1
    stack = getattr(_active, "trackers", None)
    if stack is None:
        stack = _active.trackers = []
    stack.append(tracker)
    try:
        yield
    finally:
        stack.pop()
        with _lock:
            _users[0] -= 1
            if _users[0] == 0:
                DTensor.from_local = staticmethod(_installed.pop("from_local"))
                for name in ("redistribute", "to_local", "full_tensor"):
                    setattr(DTensor, name, _installed.pop(name))


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


def _tp_blocks(entry: Any, saved: Any, g: Any, shared: bool, weight: Any) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """``(module, input, output gradient)`` for the layer rule, restricted to this rank's shard of ``weight`` (the
    module's weight as the backward saw it; local tensors): for ``nn.Linear`` (ColwiseParallel / RowwiseParallel)
    the matching input and output-gradient columns; for ``nn.Embedding`` sharded over its rows (RowwiseParallel) or
    its columns (ColwiseParallel) the ids made local (ids of rows held elsewhere, and the padding index, become an
    ignored index) and the output-gradient columns of the shard."""
    module = entry.module
    kind = type(entry.layer)
    if kind not in (LinearRule, EmbeddingRule) or getattr(entry.layer, "transposed", False):
        raise NotImplementedError(
            f"regops: per-example norms of tensor-parallel layers are supported for nn.Linear and nn.Embedding "
            f"(ColwiseParallel / RowwiseParallel); got {type(module).__name__} with DTensor inputs"
        )
    if not isinstance(weight, DTensor):
        raise NotImplementedError(
            f"regops: a {type(module).__name__} with DTensor inputs and a plain weight; per-example norms of "
            "tensor-parallel layers need the weight sharded as parallelize_module leaves it"
        )
    if shared:
        raise NotImplementedError("regops: a tensor-parallel weight used by several layers (tied) is not supported")
    _dtensor.check(weight, "weight")
    (p_local, d_local), (p_start, d_start) = box(weight)
    p_full, d_full = weight.shape
    if kind is LinearRule:
        x = _block(saved, d_start, d_local, d_full, "input").detach()
        return module, x, _block(g, p_start, p_local, p_full, "output gradient").detach()
    if isinstance(saved, DTensor):
        _dtensor.check(saved, "ids")
        if any(isinstance(pl, Shard) for pl in saved.placements):
            raise NotImplementedError("regops: a tensor-parallel Embedding's ids must be replicated, got them sharded")
        saved = saved.to_local()
    ignored = p_local  # one past the shard's rows: the rule's padding index
    ids = saved - p_start
    drop = (ids < 0) | (ids >= p_local)
    if module.padding_idx is not None:
        drop |= saved == module.padding_idx
    ids = ids.masked_fill(drop, ignored)
    local = types.SimpleNamespace(weight=weight.to_local(), padding_idx=ignored)
    return local, ids, _block(g, d_start, d_local, d_full, "output gradient").detach()


def tp_sq_norms(entry: Any, saved: Any, g: Any, form: str, shared: bool, weight: Any) -> dict[str, torch.Tensor]:
    """Per-example squared norms of a tensor-parallel ``nn.Linear`` / ``nn.Embedding`` (weight ``[p, d]`` a DTensor,
    sharded on either dim or replicated): each rank computes the squared norms of its block of ``G_n^T A_n`` (the rows /
    columns of its weight shard, from the matching columns of the output gradient / input) and the partial
    sums are all-reduced over the mesh dims where the parameter is sharded (one ``[B]`` all-reduce per sharded
    parameter). A replicated bias's norm is complete on every rank and is not reduced."""
    sq = entry.layer.sq_norms(*_tp_blocks(entry, saved, g, shared, weight), form)
    out = {}
    for local_name, value in sq.items():
        out[local_name] = _all_reduce_sharded(value.contiguous(), getattr(entry.module, local_name))
    return out


def tp_weighted_grads(entry: Any, saved: Any, g: Any, w: torch.Tensor, weight: Any) -> dict[str, torch.Tensor]:
    """``sum_n w_n g_n`` of a tensor-parallel ``nn.Linear``'s / ``nn.Embedding``'s parameters, each rank its shard
    (local tensors in the parameters' local shapes): the weight's block from the matching input and output-gradient
    columns, the bias from the output-gradient columns it owns (all of them for a replicated bias). No
    communication."""
    return entry.layer.weighted_grads(*_tp_blocks(entry, saved, g, False, weight), w)
