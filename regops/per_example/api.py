"""The per-example engine's public names: the rule interface and registry (teach regops a layer), and the operators'
functions (the ghost and instantiate forms of per-example squared norms, the cross-batch Gram and the summed squared
gradients), for code that has a layer's activations and output gradients at hand."""

from __future__ import annotations

import torch

from regops.per_example import ops
from regops.per_example._rules import Factors, LayerRule, OneHot, register_rule, registered_rules, rule_for


def gram_sq_norms(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Per-example squared gradient norms of a linear map by the ghost (Gram) form.

    ``||G_n^T A_n||_F^2 = <A_n A_n^T, G_n G_n^T>``: cheaper than building the gradient when ``2 T^2 <= p d``.

    Args:
        a: ``[B, T, d]`` the layer's inputs (activations), any float dtype.
        g: ``[B, T, p]`` the gradients of the layer's outputs, the dtype of ``a``.

    Returns:
        ``[B]`` squared norms, float32 (float64 for float64 inputs).

    Example::

        >>> a, g = torch.randn(4, 3, 5), torch.randn(4, 3, 2)
        >>> norms = regops.per_example.gram_sq_norms(a, g)
        >>> torch.allclose(norms, torch.einsum("btp,btd->bpd", g, a).square().sum((1, 2)), rtol=1e-4)
        True
    """
    return ops.grad_norms_gram(a, g)


def instantiate_sq_norms(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Per-example squared gradient norms ``||G_n^T A_n||_F^2`` of a linear map, building each ``[p, d]`` gradient.

    Args:
        a: ``[B, T, d]`` the layer's inputs (activations), any float dtype.
        g: ``[B, T, p]`` the gradients of the layer's outputs, the dtype of ``a``.

    Returns:
        ``[B]`` squared norms, float32 (float64 for float64 inputs).

    Example::

        >>> regops.per_example.instantiate_sq_norms(torch.randn(4, 3, 5), torch.randn(4, 3, 2)).shape
        torch.Size([4])
    """
    return ops.grad_norms_instantiate(a, g)


def embedding_gram_sq_norms(ids: torch.Tensor, g: torch.Tensor, padding_idx: int = -1) -> torch.Tensor:
    """Per-example squared gradient norms of an embedding table by the id-equality Gram (repeated ids summed).

    Args:
        ids: ``[B, T]`` integer token ids.
        g: ``[B, T, e]`` the gradients of the looked-up rows, float.
        padding_idx: an id whose rows get no gradient (-1: none).

    Returns:
        ``[B]`` squared norms, float32 (float64 for float64 gradients).

    Example::

        >>> ids, g = torch.tensor([[1, 1], [2, 3]]), torch.ones(2, 2, 4)
        >>> regops.per_example.embedding_gram_sq_norms(ids, g)  # a repeated id sums its rows: 2 * 2 * 4
        tensor([16.,  8.])
    """
    return ops.grad_norms_embedding_gram(ids, g, padding_idx)


def cross_gram_dots(a: torch.Tensor, g: torch.Tensor, a2: torch.Tensor, g2: torch.Tensor) -> torch.Tensor:
    r"""``[B, B2]`` per-example weight-gradient inner products ``<G_i^T A_i, G2_j^T A2_j>`` by the cross Gram form
    ``\sum_{t,s} (a_{it}\cdot a2_{js})(g_{it}\cdot g2_{js})``, without any ``T x T2`` matrix in memory.

    Args:
        a: ``[B, T, d]`` activations of one batch, any float dtype.
        g: ``[B, T, p]`` its output gradients.
        a2: ``[B2, T2, d]`` activations of another batch.
        g2: ``[B2, T2, p]`` its output gradients.

    Returns:
        ``[B, B2]`` inner products, float32 accumulation (float64 stays float64).

    Example::

        >>> a, g, a2, g2 = torch.randn(4, 3, 5), torch.randn(4, 3, 2), torch.randn(6, 7, 5), torch.randn(6, 7, 2)
        >>> regops.per_example.cross_gram_dots(a, g, a2, g2).shape
        torch.Size([4, 6])
    """
    return ops.valuation_cross_gram(a, g, a2, g2)


def sq_grad_sum(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The sum over examples of the squared per-example gradients ``(G_i^T A_i) ** 2`` of a linear map, never
    holding more than a tile of one example's gradient (the empirical Fisher diagonal's sum).

    Args:
        a: ``[B, T, d]`` the layer's inputs, any float dtype.
        g: ``[B, T, p]`` the gradients of its outputs.

    Returns:
        ``[p, d]`` (the weight's shape), float32 (float64 for float64 inputs).

    Example::

        >>> regops.per_example.sq_grad_sum(torch.randn(4, 3, 5), torch.randn(4, 3, 2)).shape
        torch.Size([2, 5])
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
