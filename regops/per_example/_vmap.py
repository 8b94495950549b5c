"""Per-example gradients by ``torch.func``: ``vmap`` over the examples of the ``vjp`` of a module (its own
parameters, ``unsupported="vmap"``) or of the whole model (every parameter: the exact path for what the fast path
cannot attribute), each example run as a batch of one, in chunks of examples so that memory stays bounded.

The examples of every input and output are where the tracker found them (:mod:`regops.per_example._layout`): a
plain dim, or a structured one (``[B * T, d]`` rows) whose example's rows are sliced out and put back as the rows of
a batch of one. Inputs without examples are passed whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.utils import _pytree as pytree

from regops.per_example._layout import Layout
from regops.per_example._rules import LayerRule

# Bytes of per-example gradients one chunk of the whole-model path may hold (chunk = budget / (4 P) examples).
CHUNK_BYTES = 256 * 2**20


class Split:
    """One tensor's examples: ``batched(t)`` puts them in dim 0 (for ``vmap``), ``one(t_n)`` makes an example's
    slice a batch of one in the tensor's own layout."""

    def __init__(self, layout: Layout) -> None:
        if layout.index is not None:
            raise ValueError("regops: the torch.func path takes inputs and outputs whose examples are in one dim "
                             "(not packed rows)")  # fmt: skip
        self.layout = layout

    def batched(self, t: torch.Tensor) -> torch.Tensor:
        lay = self.layout
        if lay.plain:
            return t.movedim(lay.dim, 0)
        return t.movedim(lay.dim, 0).unflatten(0, (lay.outer, lay.batch, lay.inner)).movedim(1, 0)

    def one(self, t: torch.Tensor) -> torch.Tensor:
        lay = self.layout
        if lay.plain:
            return t.unsqueeze(0).movedim(0, lay.dim)
        return t.flatten(0, 1).movedim(0, lay.dim)


@dataclass
class VmapSaved:
    """What the torch.func path keeps of one call: the forward's arguments, their examples, the outputs'."""

    args: Any  # (args, kwargs) detached
    splits: Any  # the same pytree: Split or None per leaf
    out_splits: list[Split]  # per output leaf that received a gradient
    out_index: list[int]  # those leaves' positions in the flattened output
    batch: int


def per_example_grads(
    module: torch.nn.Module, params: dict[str, torch.Tensor], saved: VmapSaved, grads: list[torch.Tensor], chunk: int
) -> Any:
    """Yields ``(start, {name: [n, *shape]})`` per chunk of ``chunk`` examples: the gradients of
    ``sum_j <output_j(example), grads_j(example)>`` with respect to ``params``."""
    params = {k: p.detach() for k, p in params.items()}
    leaves, spec = pytree.tree_flatten(saved.args)
    split_leaves = pytree.tree_leaves(saved.splits, is_leaf=lambda x: x is None or isinstance(x, Split))
    batched = [s.batched(x) if s is not None else x for x, s in zip(leaves, split_leaves, strict=True)]
    gb = [s.batched(g.detach()) for g, s in zip(grads, saved.out_splits, strict=True)]
    in_dims = [0 if s is not None else None for s in split_leaves]

    def one(p, xs, gs):
        full = [s.one(x) if s is not None else x for x, s in zip(xs, split_leaves, strict=True)]
        args, kwargs = pytree.tree_unflatten(full, spec)

        def f(p):
            out = pytree.tree_leaves(torch.func.functional_call(module, p, args, kwargs))
            return [out[i] for i in saved.out_index]

        _, vjp = torch.func.vjp(f, p)
        return vjp([s.one(g) for g, s in zip(gs, saved.out_splits, strict=True)])[0]

    fn = torch.func.vmap(one, in_dims=(None, in_dims, [0] * len(gb)))
    for s in range(0, saved.batch, chunk):
        xs = [x[s : s + chunk] if d is not None else x for x, d in zip(batched, in_dims, strict=True)]
        gs = [g[s : s + chunk] for g in gb]
        try:
            with torch.enable_grad():
                yield s, fn(params, xs, gs)
        except RuntimeError as e:
            if "random" in str(e):
                raise RuntimeError(
                    f"regops: {type(module).__name__} draws random numbers in its forward (dropout in train mode?): "
                    "the torch.func path cannot replay them, so its per-example gradients would be wrong. Set its "
                    "dropout to 0 (or model.eval()), or register a rule for the module that draws them "
                    "(regops.per_example.register_rule)."
                ) from e
            raise


def chunk_size(params: dict[str, torch.Tensor], batch: int) -> int:
    n = sum(p.numel() for p in params.values()) or 1
    return max(1, min(batch, CHUNK_BYTES // (4 * n)))


class VmapRule(LayerRule):
    """Any module that treats examples independently (``unsupported="vmap"``): per-example gradients of its *own*
    parameters by ``torch.func.vmap`` over ``torch.func.vjp`` of the module (children keep their own rules)."""

    name = "vmap"
    raw_layout = True  # gets the output gradients as autograd delivers them (a list), not batch-first

    def capture(self, module, args, kwargs, label):
        return args, kwargs

    def per_example_grads(self, module, saved: VmapSaved, g):
        params = {k: p for k, p in module._parameters.items() if p is not None and p.requires_grad}
        parts = list(per_example_grads(module, params, saved, g, saved.batch))
        return parts[0][1]


VMAP = VmapRule()
