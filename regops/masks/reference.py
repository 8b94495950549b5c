"""The masks family's references: LoRA dropout in pure PyTorch on the shared Philox stream, any device.

``lora_dropout(x, A, p, seed)`` is ``F.linear(dropout(x, p, seed), A)`` with :func:`regops.dropout`'s mask (flat,
row-major element index of ``x``), computed as that composition computes it: the dropped ``x`` rounded to x's
dtype, then the matmul. The reference materialises the dropped copy transiently; the C++ and Triton kernels never
do. The kernels match these within matmul rounding (the mask bits are identical).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from regops.dropout.reference import dropout as _dropout


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def lora_dropout(x: torch.Tensor, A: torch.Tensor, p: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
    """``F.linear(dropout(x), A)``: x ``[..., K]``, A ``[R, K]`` -> ``[..., R]``."""
    return F.linear(_dropout(x, p, seed), A)


def lora_dropout_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    A: torch.Tensor,
    p: torch.Tensor,
    seed: torch.Tensor,
    need_x: bool,
    need_A: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dx, dA)``: ``dx = m * (grad @ A) / (1 - p)``, ``dA = grad^T (m * x) / (1 - p)``; an empty tensor for a
    gradient that is not needed."""
    dx = _dropout(grad @ A, p, seed) if need_x else x.new_empty(0)
    dA = _rows(grad).mT @ _rows(_dropout(x, p, seed)) if need_A else A.new_empty(0)
    return dx, dA
