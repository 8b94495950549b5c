"""The masks family's operators: schemas, fakes, backends and derivatives, each declared once.

``lora_dropout`` saves ``x``, ``A``, the 0-dim ``p`` and the 16-byte seed for backward: nothing of x's size but x
itself (which the following matmul's backward needs anyway); the mask is regenerated from the seed. References:
:mod:`regops.masks.reference`; Triton launchers: :mod:`regops.masks.triton`; C++ kernels: csrc/masks/.
"""

from __future__ import annotations

import torch

from regops._core.ops import declare
from regops.dropout.ops import dropout as _dropout
from regops.masks import reference as ref

TRITON = "regops.masks.triton:"
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _lora_fake(x, A, p, seed):
    return x.new_empty((*x.shape[:-1], A.shape[0]))


lora_dropout = declare(
    "lora_dropout(Tensor x, Tensor A, Tensor p, Tensor seed) -> Tensor",
    reference=ref.lora_dropout,
    triton=TRITON + "lora_dropout",
    triton_dtypes=_DTYPES,
    fake=_lora_fake,
)


def _lora_backward_fake(grad, x, A, p, seed, need_x, need_A):
    return (torch.empty_like(x) if need_x else x.new_empty(0)), (torch.empty_like(A) if need_A else A.new_empty(0))


lora_dropout_backward = declare(
    "lora_dropout_backward(Tensor grad, Tensor x, Tensor A, Tensor p, Tensor seed, bool need_x, bool need_A) "
    "-> (Tensor, Tensor)",
    reference=ref.lora_dropout_backward,
    triton=TRITON + "lora_dropout_backward",
    triton_dtypes=_DTYPES,
    fake=_lora_backward_fake,
)


def _setup(ctx, inputs, output) -> None:
    x, A, p, seed = inputs
    ctx.save_for_backward(x, A, p, seed)


def _backward(ctx, grad):
    x, A, p, seed = ctx.saved_tensors
    need_x, need_A = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if torch.is_grad_enabled():
        # create_graph=True: differentiable ops (the mask product is the dropout op, whose derivative is itself)
        dx = _dropout(grad @ A, p, seed) if need_x else None
        dA = ref._rows(grad).mT @ ref._rows(_dropout(x, p, seed)) if need_A else None
        return dx, dA, None, None
    dx, dA = lora_dropout_backward(grad, x, A, p, seed, need_x, need_A)
    return (dx if need_x else None), (dA if need_A else None), None, None


lora_dropout.register_autograd(_backward, setup_context=_setup)

__all__ = ["lora_dropout", "lora_dropout_backward"]
