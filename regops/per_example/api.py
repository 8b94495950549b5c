"""The per-example engine's public names: the rule interface and registry (teach regops a layer), and the operators'
functions (the ghost and instantiate forms of per-example squared norms, the cross-batch Gram and the summed squared
gradients), for code that has a layer's activations and output gradients at hand."""

from __future__ import annotations

import torch

from regops.per_example import ops
from regops.per_example._rules import Factors, LayerRule, OneHot, register_rule, registered_rules, rule_for


def gram_sq_norms(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``[B]`` squared norms ``||G_n^T A_n||_F^2`` by the ghost form (a ``[B, T, d]``, g ``[B, T, p]``)."""
    return ops.grad_norms_gram(a, g)


def instantiate_sq_norms(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``[B]`` squared norms ``||G_n^T A_n||_F^2`` by the instantiate form (arguments as the ghost form)."""
    return ops.grad_norms_instantiate(a, g)


def embedding_gram_sq_norms(ids: torch.Tensor, g: torch.Tensor, padding_idx: int = -1) -> torch.Tensor:
    """``[B]`` squared norms of Embedding per-example gradients by the id-equality Gram (ids ``[B, T]``)."""
    return ops.grad_norms_embedding_gram(ids, g, padding_idx)


def cross_gram_dots(a: torch.Tensor, g: torch.Tensor, a2: torch.Tensor, g2: torch.Tensor) -> torch.Tensor:
    r"""``[B, B2]`` per-example weight-gradient inner products ``<G_i^T A_i, G2_j^T A2_j>`` by the cross Gram form
    :math:`\sum_{t,s} (a_{it}\cdot a2_{js})(g_{it}\cdot g2_{js})`, without any ``T x T2`` matrix in memory.

    Args:
        a: ``[B, T, d]`` activations, g: ``[B, T, p]`` output gradients of one batch; a2: ``[B2, T2, d]``,
            g2: ``[B2, T2, p]`` of another. Any float dtype; float32 accumulation (float64 stays float64).

    Example::

        >>> regops.per_example.cross_gram_dots(a, g, a2, g2).shape   # torch.Size([B, B2])
    """
    return ops.valuation_cross_gram(a, g, a2, g2)


def sq_grad_sum(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``[p, d]`` sum over examples of ``(G_i^T A_i) ** 2`` (a ``[B, T, d]``, g ``[B, T, p]``), never holding more
    than a tile of one example's gradient.

    Example::

        >>> regops.per_example.sq_grad_sum(a, g).shape   # torch.Size([p, d])
    """
    return ops.valuation_sq_grad_sum(a, g)


__all__ = [
    "Factors",
    "LayerRule",
    "OneHot",
    "cross_gram_dots",
    "embedding_gram_sq_norms",
    "gram_sq_norms",
    "instantiate_sq_norms",
    "register_rule",
    "registered_rules",
    "rule_for",
    "sq_grad_sum",
]
