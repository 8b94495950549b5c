"""The mix family's operator: ``regops::mix_apply`` mixes every sample with its partner (blend outside its box,
paste inside) in one pass for every mode, and ``regops::mix_apply_backward`` is the same pass transposed.

References: :mod:`regops.mix.reference`; Triton launchers: :mod:`regops.mix.triton`; C++ and CUDA kernels:
csrc/mix/. The ops keep a channels_last batch channels_last (:func:`regops.mix.reference.memory_format`), so their
backends take strided tensors as they are (``contiguous=False``) and lay them out themselves.
"""

from __future__ import annotations

import torch

from regops._core.ops import declare
from regops.mix import reference as ref

TRITON = "regops.mix.triton:"


def _mixed_like(x: torch.Tensor, *args) -> torch.Tensor:
    return torch.empty_like(x, memory_format=ref.memory_format(x))


mix_apply = declare(
    "mix_apply(Tensor x, Tensor w_self, Tensor w_other, Tensor partner, Tensor box) -> Tensor",
    reference=ref.mix_apply,
    triton=TRITON + "mix_apply",
    fake=_mixed_like,
    contiguous=False,
)
mix_apply_backward = declare(
    "mix_apply_backward(Tensor grad, Tensor w_self, Tensor w_other, Tensor partner, Tensor box) -> Tensor",
    reference=ref.mix_apply_backward,
    triton=TRITON + "mix_apply_backward",
    fake=_mixed_like,
    contiguous=False,
)


def _save_parameters(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs[1:])


def _backward(ctx, grad):
    """The mix is linear in ``x``: its gradient is the transposed mix (reaching both partners)."""
    return mix_apply_backward(grad, *ctx.saved_tensors), None, None, None, None


def _backward_backward(ctx, grad):
    """The transpose of the transposed mix is the mix (``partner`` a permutation)."""
    return mix_apply(grad, *ctx.saved_tensors), None, None, None, None


mix_apply.register_autograd(_backward, setup_context=_save_parameters)
mix_apply_backward.register_autograd(_backward_backward, setup_context=_save_parameters)

__all__ = ["mix_apply", "mix_apply_backward"]
