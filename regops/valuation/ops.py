"""The kernel-backed operators of data valuation: ``regops::valuation_cross_gram`` (per-example gradient inner
products between two batches by the cross Gram form) and ``regops::valuation_sq_grad_sum`` (summed squared
per-example weight gradients), reference in :mod:`regops.reference.valuation`, Triton kernels in
``regops.kernels.valuation``, registered as torch.library custom ops with fake impls."""

from __future__ import annotations

import torch

from regops import _backend
from regops.reference import valuation as _ref

_backend.register("valuation_cross_gram", torch=_ref.cross_gram_dots, triton="regops.kernels.valuation:cross_gram_dots")
_backend.register("valuation_sq_grad_sum", torch=_ref.sq_grad_sum, triton="regops.kernels.valuation:sq_grad_sum")


def _out_dtype(*ts: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


@torch.library.custom_op("regops::valuation_cross_gram", mutates_args=())
def _cross_gram_op(a: torch.Tensor, g: torch.Tensor, a2: torch.Tensor, g2: torch.Tensor) -> torch.Tensor:
    return _backend.implementation("valuation_cross_gram", a.device)(a, g, a2, g2)


@_cross_gram_op.register_fake
def _(a: torch.Tensor, g: torch.Tensor, a2: torch.Tensor, g2: torch.Tensor) -> torch.Tensor:
    return a.new_empty(a.shape[0], a2.shape[0], dtype=_out_dtype(a, g, a2, g2))


@torch.library.custom_op("regops::valuation_sq_grad_sum", mutates_args=())
def _sq_grad_sum_op(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return _backend.implementation("valuation_sq_grad_sum", a.device)(a, g)


@_sq_grad_sum_op.register_fake
def _(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return a.new_empty(g.shape[2], a.shape[2], dtype=_out_dtype(a, g))


def _not_differentiable(ctx, grad):  # statistics of a backward pass, not part of a graph
    raise RuntimeError("regops: data valuation operators are not differentiable")


for _op in (_cross_gram_op, _sq_grad_sum_op):
    _op.register_autograd(_not_differentiable, setup_context=lambda ctx, inputs, output: None)


def cross_gram_dots(a: torch.Tensor, g: torch.Tensor, a2: torch.Tensor, g2: torch.Tensor) -> torch.Tensor:
    r"""``[B, B2]`` per-example weight-gradient inner products ``<G_i^T A_i, G2_j^T A2_j>`` by the cross Gram form
    :math:`\sum_{t,s} (a_{it}\cdot a2_{js})(g_{it}\cdot g2_{js})`, without any ``T x T2`` matrix in memory.

    Args:
        a: ``[B, T, d]`` activations, g: ``[B, T, p]`` output gradients of one batch; a2: ``[B2, T2, d]``,
            g2: ``[B2, T2, p]`` of another. Any float dtype; float32 accumulation (float64 stays float64).

    Example::

        >>> regops.valuation.cross_gram_dots(a, g, a2, g2).shape   # torch.Size([B, B2])
    """
    return _cross_gram_op(a, g, a2, g2)


def sq_grad_sum(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``[p, d]`` sum over examples of ``(G_i^T A_i) ** 2`` (a ``[B, T, d]``, g ``[B, T, p]``), never holding more
    than a tile of one example's gradient.

    Example::

        >>> regops.valuation.sq_grad_sum(a, g).shape   # torch.Size([p, d])
    """
    return _sq_grad_sum_op(a, g)
