"""Batches taken in chunks of examples, and the bytes a captured batch holds (what the chunk size is chosen from,
in :func:`regops.valuation._dots.chunk_size`)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from regops.valuation._capture import Captured, split_batch

_LEAVES = (type(None), bool, int, float, str)  # non-tensor inputs passed whole to every chunk


def batch_size(batch: Any) -> int | None:
    """The number of examples of ``(inputs, targets)`` when every tensor in it has them along dim 0 (inputs a
    tensor, a tuple or a dict of tensors and plain scalars; targets a tensor); None when the batch cannot be
    taken in chunks."""
    inputs, targets = split_batch(batch)
    if not isinstance(targets, torch.Tensor) or targets.dim() == 0:
        return None
    n = targets.shape[0]
    values = inputs.values() if isinstance(inputs, Mapping) else inputs if isinstance(inputs, tuple) else (inputs,)
    for v in values:
        if isinstance(v, torch.Tensor):
            if v.dim() == 0 or v.shape[0] != n:
                return None
        elif not isinstance(v, _LEAVES):
            return None
    return n


def take(batch: Any, start: int, stop: int) -> tuple[Any, Any]:
    """Examples ``start:stop`` of a batch :func:`batch_size` accepts (views, no copy)."""
    inputs, targets = split_batch(batch)

    def cut(v: Any) -> Any:
        return v[start:stop] if isinstance(v, torch.Tensor) else v

    if isinstance(inputs, Mapping):
        inputs = {k: cut(v) for k, v in inputs.items()}
    elif isinstance(inputs, tuple):
        inputs = tuple(cut(v) for v in inputs)
    else:
        inputs = cut(inputs)
    return inputs, targets[start:stop]


def bounds(n: int, chunk: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of ``ceil(n / chunk)`` chunks of sizes differing by at most one."""
    parts = math.ceil(n / chunk)
    edges = [n * k // parts for k in range(parts + 1)]
    return list(zip(edges[:-1], edges[1:], strict=True))


def tensor_bytes(x: Any, seen: set[tuple[int, torch.device, tuple[int, ...]]]) -> int:
    """Bytes of the distinct tensors in ``x`` (tensors, tuples, lists, dicts) not in ``seen`` yet: their own
    elements, not their storages' (a chunk's inputs are views of the whole batch)."""
    if isinstance(x, torch.Tensor):
        key = (x.data_ptr(), x.device, tuple(x.shape))
        if key in seen:
            return 0
        seen.add(key)
        return x.numel() * x.element_size()
    if isinstance(x, Mapping):
        x = list(x.values())
    if isinstance(x, (tuple, list)):
        return sum(tensor_bytes(v, seen) for v in x)
    return 0


def signal_bytes(cap: Captured) -> tuple[int, int]:
    """``(all signals, layer inputs)``: bytes a captured batch holds (the rule calls' inputs and output gradients
    and the per-example gradients), and those of the layer inputs alone."""
    seen: set[tuple[int, torch.device, tuple[int, ...]]] = set()
    calls = {id(t.call): t.call for ts in cap.terms.values() for t in ts if t.call is not None}
    inputs = sum(tensor_bytes(c.saved, seen) for c in calls.values())
    rest = sum(tensor_bytes(c.grad, seen) for c in calls.values())
    rest += sum(tensor_bytes(t.dense, seen) for ts in cap.terms.values() for t in ts)
    return inputs + rest, inputs
