"""A differentiable Hutchinson trace estimate to add to a training loss."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from regops.hessian import _probes
from regops.hessian._hvp import NOT_A_FUNCTION_OF_PARAMS, LossHVP, check_loss
from regops.hessian._inputs import _check_params
from regops.reference.hessian import check_distribution


def trace_penalty(
    loss: torch.Tensor,
    params: Any,
    num_probes: int = 1,
    *,
    distribution: str = "rademacher",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    r"""Differentiable Hutchinson estimate of ``tr(H)`` of ``loss`` w.r.t. ``params``, to add to a training loss.

    .. math:: P = \frac{1}{K} \sum_{k=1}^{K} v_k^\top \nabla^2 L\, v_k,\qquad \mathbb{E}[P] = \operatorname{tr}(H)

    The Hessian-vector products are built with ``create_graph=True`` and batched over the ``K`` probes, so
    ``P.backward()`` gives an unbiased estimate of ``grad tr(H)`` (a third derivative, through the fused
    ``regops::hessian_probe_dot``). Cost per step: about one extra forward+backward of the backward graph per
    probe batch. Probes are Philox probes from ``generator``. The loss is the one you computed, so dropout keeps
    that forward's mask; in an attention model compute it under :func:`regops.hessian.twice_differentiable`
    (the fused attention kernels have no double backward).

    Args:
        loss: the scalar loss, computed with a graph from ``params``.
        params: the tensors the curvature is taken with respect to: a module or ``model.parameters()`` (frozen
            parameters left out, as in every estimator), or a tensor, list, tuple or dict of tensors that all
            require grad (one that does not raises: a penalty has no gradient to give it). A loss that reaches
            none of them raises.
        num_probes: probes ``K`` (1 is the usual per-step choice).

    Returns:
        A 0-dim tensor with a graph to ``params``.

    Example::

        >>> loss = F.cross_entropy(model(x), y)
        >>> (loss + 1e-3 * regops.hessian.trace_penalty(loss, model)).backward()
    """
    if isinstance(num_probes, bool) or not isinstance(num_probes, int) or num_probes < 1:
        raise ValueError(f"regops: num_probes must be an int >= 1, got {num_probes!r}")
    check_distribution(distribution)
    loss = check_loss(loss)
    _check_listed(params)
    spec = _check_params(params)
    if not loss.requires_grad:
        raise ValueError(NOT_A_FUNCTION_OF_PARAMS)
    layout = _probes.ParamLayout.of(spec.names, spec.tensors)
    seed = _probes.draw_seed(layout, num_probes, distribution, generator)
    vs = layout.split(_probes.probe_rows(seed, 0, num_probes, layout, distribution))
    engine = LossHVP(lambda: loss, spec.tensors, None, "double_backward", create_graph=True)
    try:
        hvs = engine(vs)
    except RuntimeError as exc:
        if "scaled_dot_product" in str(exc) or "attention" in str(exc):
            raise RuntimeError(
                f"regops: the loss's graph has no double backward ({str(exc).splitlines()[0][:160]}); compute the "
                "loss under `with regops.hessian.twice_differentiable():` (attention on its math backend)"
            ) from exc
        raise
    dots, _, _ = _probes.probe_dot(vs, hvs, with_diag=False)
    return dots.sum(1).mean().to(loss.dtype)


def _check_listed(params: Any) -> None:
    """Tensors listed one by one are the ones the penalty is meant for: a frozen one among them is a mistake
    (a module or ``model.parameters()`` leaves its frozen parameters out instead)."""
    if isinstance(params, torch.Tensor):
        named = [("params", params)]
    elif isinstance(params, Mapping):
        named = [(f"params[{k!r}]", v) for k, v in params.items()]
    elif isinstance(params, (list, tuple)) and not isinstance(params, nn.Module):
        named = [(f"params[{i}]", v) for i, v in enumerate(params)]
    else:
        return
    for name, t in named:
        if isinstance(t, torch.Tensor) and not t.requires_grad:
            raise ValueError(
                f"regops: {name} (shape {tuple(t.shape)}) does not require grad: trace_penalty differentiates the "
                "trace with respect to the tensors it is given, and this one would be silently left out. Call "
                "requires_grad_() on it, leave it out of params, or pass the module (or model.parameters()) to "
                "skip frozen parameters"
            )
