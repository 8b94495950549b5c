"""Batches taken in chunks of examples, and the chunk size that keeps two batches' signals within a plain step's
memory."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from regops.valuation._capture import Captured, capture, split_batch

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


def _bytes(x: Any, seen: set[tuple[int, torch.device, tuple[int, ...]]]) -> int:
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
        return sum(_bytes(v, seen) for v in x)
    return 0


def signal_bytes(cap: Captured) -> tuple[int, int]:
    """``(all signals, layer inputs)``: bytes a captured batch holds (the rule calls' inputs and output gradients
    and the per-example gradients), and those of the layer inputs alone."""
    seen: set[tuple[int, torch.device, tuple[int, ...]]] = set()
    calls = {id(t.call): t.call for ts in cap.terms.values() for t in ts if t.call is not None}
    inputs = sum(_bytes(c.saved, seen) for c in calls.values())
    rest = sum(_bytes(c.grad, seen) for c in calls.values())
    rest += sum(_bytes(t.dense, seen) for ts in cap.terms.values() for t in ts)
    return inputs + rest, inputs


def _probe(model: nn.Module, loss_fn: Callable[[Any, Any], torch.Tensor], batch: Any, kw: dict) -> tuple[Captured, int]:
    """A capture of ``batch``, and the bytes its forward's autograd graph saved apart from the parameters (what a
    plain forward of the batch keeps for its backward)."""
    params = {p.data_ptr() for p in model.parameters()}
    seen: set[tuple[int, torch.device, tuple[int, ...]]] = set()
    saved = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        if t.data_ptr() not in params:
            saved += _bytes(t, seen)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        cap = capture(model, loss_fn, batch, **kw)
    return cap, saved


def chunk_size(
    model: nn.Module, loss_fn: Callable[[Any, Any], torch.Tensor], train: Any, n_train: int, chunk: int | None, kw: dict
) -> int | None:
    """The number of examples per chunk of both batches, or None to take each batch whole.

    A probe of two training examples gives per example: the signals a capture holds (``s`` bytes: layer inputs
    and output gradients, or per-example gradients), the layer inputs among them (``a``) and what the forward's
    autograd graph saves (``g``, the layer inputs included). A plain forward and backward of the training batch
    holds its parameters' gradients and the saved tensors: ``M = bytes(params) + n_train * g``. Streaming holds a
    test chunk's signals while a training chunk is captured, whose graph and signals share the layer inputs:
    ``c * s + c * (s + g - a)``, kept within ``M``. Chunks need a loss whose per-example losses do not depend on
    the examples beside them (checked on the probe: the batch loss is the declared reduction of its halves)."""
    if n_train < 2:
        return chunk
    probe, g = _probe(model, loss_fn, take(train, 0, 2), kw)
    if not probe.splits:
        if chunk is not None:
            raise ValueError(
                "regops: chunk= needs a loss whose value on a batch is the declared reduction (loss_reduction) of "
                "its values on parts of the batch, so that each example's loss does not depend on its neighbours"
            )
        return None
    if chunk is not None:
        return chunk
    s, a = signal_bytes(probe)
    params = sum(p.numel() * p.element_size() for p in probe.params.values())
    probe_batch = probe.batch
    per_example = (2 * s + g - a) / probe_batch
    del probe
    return max(1, int((params + n_train * g / probe_batch) // max(per_example, 1.0)))
