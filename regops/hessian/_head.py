"""Exact Hessian diagonal of a softmax cross-entropy linear head, in one pass and without probes."""

from __future__ import annotations

import torch

from regops._core import validate as _validate
from regops.reference.hessian import softmax_ce_linear_head_diagonal


def linear_head_diagonal(
    features: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    targets: torch.Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    r"""Exact diagonal of the Hessian of ``cross_entropy(features @ weight.T + bias, targets)`` w.r.t. the head.

    The Hessian of softmax cross-entropy w.r.t. the logits is ``diag(p_i) - p_i p_i^T`` (independent of the
    targets, label smoothing included), and the logits are linear in ``(W, b)``, so (``w_i`` = 1/B for a mean)

    .. math:: \operatorname{diag}(H_W) = (P \odot (1-P))^\top \operatorname{diag}(w)\,(F \odot F),\qquad
              \operatorname{diag}(H_b) = \textstyle\sum_i w_i\, p_i \odot (1-p_i)

    one matrix product, no probes and no double backward. The result is differentiable (e.g. to align head
    Hessians across domains, as the Hessian-alignment penalty does) and gradients flow into ``features``,
    ``weight`` and ``bias``.

    Args:
        features: ``[*, d]`` head inputs (leading dimensions are examples), floating point.
        weight: ``[C, d]``; bias: ``[C]`` or ``None``.
        targets: ``[*]`` class indices; only needed to drop examples equal to ``ignore_index``.
        reduction: ``"mean"`` (over the kept examples, as ``F.cross_entropy``) or ``"sum"``.

    Returns:
        ``(diag_W [C, d], diag_b [C] or None)`` in float32 (float64 for float64 inputs).

    Example::

        >>> feats = backbone(x)                         # [B, d]
        >>> dW, db = regops.hessian.linear_head_diagonal(feats, head.weight, head.bias)
        >>> head_trace = dW.sum() + db.sum()
    """
    _validate.floating(features, "features")
    _validate.floating(weight, "weight")
    if weight.dim() != 2 or features.dim() < 1 or features.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"regops: features [*, d] and weight [C, d] must agree on d, got shapes {tuple(features.shape)} and "
            f"{tuple(weight.shape)}"
        )
    if bias is not None:
        _validate.floating(bias, "bias")
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"regops: bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"regops: reduction must be 'mean' or 'sum', got {reduction!r}")
    feats = features.reshape(-1, features.shape[-1])
    logits = torch.nn.functional.linear(feats, weight, bias)
    keep = torch.ones(feats.shape[0], dtype=feats.dtype, device=feats.device)
    if targets is not None:
        _validate.tensor(targets, "targets")
        if targets.numel() != feats.shape[0]:
            raise ValueError(
                f"regops: targets must have one class index per example ({feats.shape[0]}), got shape "
                f"{tuple(targets.shape)}"
            )
        keep = (targets.reshape(-1) != ignore_index).to(feats.dtype)
    weights = keep / keep.sum().clamp_min(1) if reduction == "mean" else keep
    diag_w, diag_b = softmax_ce_linear_head_diagonal(feats, logits, weights)
    return diag_w, (diag_b if bias is not None else None)


def linear_head_trace(
    features: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    targets: torch.Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int = -100,
) -> torch.Tensor:
    """Exact trace of the head Hessian (the sum of :func:`linear_head_diagonal`), a 0-dim tensor.

    Since ``sum_d h_d^2`` factors out, this is ``sum_i w_i (||h_i||^2 + [bias]) (1 - ||p_i||^2)``.

    Example::

        >>> regops.hessian.linear_head_trace(feats, head.weight, head.bias)
    """
    diag_w, diag_b = linear_head_diagonal(
        features, weight, bias, targets=targets, reduction=reduction, ignore_index=ignore_index
    )
    return diag_w.sum() + (diag_b.sum() if diag_b is not None else 0.0)
