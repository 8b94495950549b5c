"""The recorder's records: a tracked use site (an entry), one forward call of it, one micro-batch."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from regops.per_example._layout import Layout
from regops.per_example._rules import LayerRule


@dataclass
class _Entry:
    label: str
    module: Any  # the nn.Module, or a namespace holding the tensors of a functional use
    layer: LayerRule
    params: dict[str, tuple[str, nn.Parameter]]  # local name -> (model name, parameter) of the parameters it holds
    form: str
    functional: bool = False

    def held(self) -> list[Any]:
        """The tensors in the module's parameter slots now: the parameters, or FSDP2's unsharded ones while it runs
        the module."""
        if self.functional:
            return [p for _, p in self.params.values()]
        return [t for k in self.params if (t := self.module._parameters.get(k)) is not None]


@dataclass
class _Call:
    entry: _Entry
    saved: Any  # what the rule needs (the layer input), as the forward had it
    mb: int  # index of the micro-batch (model forward) the call ran in
    layout_in: Layout | None = None  # the examples in ``saved`` (None: batch first, plain)
    layout_out: Layout | None = None  # the examples in the output gradient (None: batch first, plain)
    links: dict[str, Any] = field(default_factory=dict)  # local name -> Node, for locals computed from parameters
    output: Any = None  # kept only when the caller asks for output gradients directly
    grad: Any = None  # batch-first output gradient, kept for Book-Keeping clipping and valuation
    kept: dict[str, torch.Tensor] | None = None  # per-example gradients the norms formed, for the clipped sums
    fired: int = 0
    rows: bool = False  # saved and grad are per row (a row rule on rows grouped into examples afterwards)
    tp_weight: Any = None  # a tensor-parallel layer's weight as its backward saw it (FSDP2 reshards it after)


@dataclass
class _Use:
    """One use of a parameter in a micro-batch, as the plan for combining several uses needs it."""

    factors: bool  # the use gives its per-example gradient as factors U^T V of the parameter itself
    region: torch.Tensor | None  # the parameter entries it reads (a slice or view of it); None: not known


@dataclass
class _MicroBatch:
    batch: int | None = None
    inputs: Any = None  # the model's (args, kwargs), kept for the torch.func path
    uses: dict[str, list[_Use]] = field(default_factory=dict)
    plan: dict[str, str] | None = None
    sq: dict[str, list[tuple[torch.Tensor, Any]]] = field(default_factory=dict)  # (sq [B], Factors or None)
    dense: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # per-example gradients [B, *shape]
    pushed: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # those carried back (no call holds them)
    fallback: list[str] = field(default_factory=list)  # why this micro-batch needs the torch.func path
    whole: Any = None  # the torch.func path's record
