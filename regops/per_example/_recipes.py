"""Tensors computed from trainable parameters and constants only, with no example in them (a position embedding
sliced to the sequence length, a relative-position bias looked up from bucket ids, a layer scale reshaped to
broadcast, a weight split into its query/key/value blocks), and how the per-example gradient of such a tensor is
carried back to the parameters it came from.

Each such tensor has a :class:`Node`: a parameter itself (:class:`ParamNode`), a rule's layer applied to constant
data (:class:`RuleNode`: an Embedding of bucket ids; the rule then takes the constant data as every example's
input), or a torch function of other nodes and constants (:class:`OpNode`, replayed under ``torch.func`` to carry
per-example gradients back by ``vmap`` of its ``vjp``). Nothing here looks at sizes: where the examples meet such a
tensor (the tracker sees the op), its per-example gradient is taken from the op's own broadcasting.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils import _pytree as pytree

# Ops that read a parameter's entries without combining them: the per-example gradient of the result has the
# norm of the parameter's (slices, views, permutations, casts); two such reads of disjoint entries add up in norm.
ISO_NAMES = frozenset(
    {
        "view", "reshape", "flatten", "unflatten", "view_as", "reshape_as", "permute", "transpose", "t", "T", "mT",
        "movedim", "moveaxis", "swapaxes", "swapdims", "squeeze", "unsqueeze", "contiguous", "clone", "narrow",
        "select", "__getitem__", "split", "chunk", "unbind", "tensor_split", "split_with_sizes",
        "to", "float", "double", "half", "bfloat16", "type_as", "type",
    }
)  # fmt: skip
CASTS = frozenset({"to", "float", "double", "half", "bfloat16", "type_as", "type", "contiguous", "clone"})
TRANSPOSES = frozenset({"t", "T", "mT", "transpose", "swapaxes", "swapdims"})


class Node:
    """A tensor computed from trainable parameters and constants (no examples)."""

    params: dict[str, torch.nn.Parameter]  # every parameter it depends on, by model name

    def source(self) -> tuple[ParamNode, list[OpNode]] | None:
        """``(parameter, ops)`` if this is a chain of entry-preserving ops (:data:`ISO_NAMES`) of one parameter."""
        return None


class ParamNode(Node):
    def __init__(self, name: str, param: torch.nn.Parameter) -> None:
        self.name, self.param = name, param
        self.params = {name: param}

    def source(self):
        return self, []


class RuleNode(Node):
    """A layer with a rule applied to constant data (no examples): ``module(saved)``."""

    def __init__(self, entry: Any, saved: Any) -> None:
        self.entry, self.saved = entry, saved
        self.params = {name: p for name, p in entry.params.values()}


class OpNode(Node):
    """``func(*args, **kwargs)[index]`` where some tensor arguments are nodes (their values kept for the replay)."""

    def __init__(self, func: Callable, args: tuple, kwargs: dict, index: int | None, inputs: list[tuple[int, Node]]):
        self.func, self.args, self.kwargs, self.index = func, args, kwargs, index
        self.inputs = inputs  # (leaf position in the flattened (args, kwargs), node)
        self.params = {}
        for _, n in inputs:
            self.params.update(n.params)

    def replay(self, values: list[torch.Tensor]) -> torch.Tensor:
        leaves, spec = pytree.tree_flatten((self.args, self.kwargs))
        leaves = list(leaves)
        for (pos, _), v in zip(self.inputs, values, strict=True):
            leaves[pos] = v
        args, kwargs = pytree.tree_unflatten(leaves, spec)
        out = self.func(*args, **kwargs)
        return out[self.index] if self.index is not None else out

    def input_values(self) -> list[torch.Tensor]:
        leaves = pytree.tree_leaves((self.args, self.kwargs))
        return [leaves[pos] for pos, _ in self.inputs]

    def source(self):
        if len(self.inputs) != 1 or op_name(self.func) not in ISO_NAMES:
            return None
        up = self.inputs[0][1].source()
        if up is None:
            return None
        return up[0], [*up[1], self]


def op_name(func: Callable) -> str:
    name = getattr(func, "__name__", "")
    if name == "__get__":  # a property (Tensor.T): its getter's owner name
        name = getattr(getattr(func, "__self__", None), "__name__", name)
    return name


def region(node: Node) -> torch.Tensor | None:
    """The flat indices of the parameter entries a chain of entry-preserving ops reads, in the result's order."""
    chain = node.source()
    if chain is None:
        return None
    param, ops = chain
    idx = torch.arange(param.param.numel(), device=param.param.device).view(param.param.shape)
    for op in ops:
        if op_name(op.func) in CASTS:
            continue
        idx = op.replay([idx])
    return idx


def transposed_alias(node: Node) -> bool | None:
    """For a whole-parameter alias: ``False`` (the parameter up to casts), ``True`` (its 2-D transpose), else
    ``None``."""
    chain = node.source()
    if chain is None:
        return None
    flips = 0
    for op in chain[1]:
        name = op_name(op.func)
        if name in CASTS:
            continue
        if name not in TRANSPOSES or chain[0].param.dim() != 2:
            return None
        flips += 1
    return flips % 2 == 1


# ----------------------------------------------------------------------------------------------- pushback
class Sink:
    """Where per-example gradients carried back to the parameters go (the recorder)."""

    def dense(self, name: str, param: torch.nn.Parameter, grads: torch.Tensor) -> None:
        raise NotImplementedError

    def rule(self, node: RuleNode, grads: torch.Tensor) -> None:
        raise NotImplementedError


def pushback(node: Node, grads: torch.Tensor, sink: Sink) -> None:
    """Carry ``grads`` (``[B, *node's shape]``, one gradient per example) back to the parameters ``node`` depends
    on: a parameter takes them as they are, a rule node hands them to its rule, an op node to its inputs through
    ``vmap`` over the examples of the op's ``vjp``."""
    pending: list[tuple[Node, torch.Tensor]] = [(node, grads)]
    while pending:
        n, g = pending.pop()
        if isinstance(n, ParamNode):
            sink.dense(n.name, n.param, g)
        elif isinstance(n, RuleNode):
            sink.rule(n, g)
        else:
            values = [v.detach() for v in n.input_values()]
            _, vjp_fn = torch.func.vjp(lambda *xs, n=n: n.replay(list(xs)), *values)
            for (_, up), gu in zip(n.inputs, torch.func.vmap(vjp_fn)(g), strict=True):
                pending.append((up, gu))


def leaves(node: Node) -> list[Node]:
    """The parameters and layers-on-constants a node is computed from, once per path (a node read twice is two
    uses)."""
    out, pending = [], [node]
    while pending:
        n = pending.pop()
        if isinstance(n, OpNode):
            pending.extend(up for _, up in n.inputs)
        else:
            out.append(n)
    return out


def to_param(node: Node, grads: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{parameter name: [B, *param.shape]}``: ``grads`` (``[B, *node's shape]``) carried back to the parameters
    (for nodes made of parameters and ops only)."""
    out: dict[str, torch.Tensor] = {}

    class _Collect(Sink):
        def dense(self, name, param, g):
            out[name] = g if name not in out else out[name] + g

        def rule(self, rule_node, g):
            raise RuntimeError("regops: a layer's output used as a weight")  # not produced by the tracker

    pushback(node, grads, _Collect())
    return out
