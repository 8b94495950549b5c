"""The recorder's bookkeeping records: a tracked use (an entry), one forward call of it, one micro-batch."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from regops.per_example._rules import LayerRule


@dataclass
class _Entry:
    label: str
    module: Any  # the nn.Module, or a namespace holding the parameters of a functional use
    layer: LayerRule
    params: dict[str, tuple[str, nn.Parameter]]  # local name -> (model name, parameter)
    form: str
    functional: bool = False


@dataclass
class _Call:
    entry: _Entry
    saved: Any
    mb: int  # index of the micro-batch (model forward) the call ran in
    batch_dim: int = 0  # where the batch is in the output (moved to dim 0 before the rule sees it)
    rows: tuple[int, int] | None = None  # output rows flattened as (T, B) (MultiheadAttention's out-proj)
    output: torch.Tensor | None = None  # kept only when the caller asks for output gradients directly
    grad: Any = None  # batch-first output gradient, kept for Book-Keeping clipping
    fired: int = 0


@dataclass
class _MicroBatch:
    batch: int | None = None
    use_count: dict[str, int] = field(default_factory=dict)
    sq: dict[str, torch.Tensor] = field(default_factory=dict)  # parameters used once: [B] squared norms
    shared: dict[str, list[tuple[str, Any, Any]]] = field(default_factory=dict)  # ("f", sq, Factors) | ("d", grad)
