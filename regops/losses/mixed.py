"""MixUp / CutMix losses from index labels and timm's soft-target losses, fused: no ``B x C`` target is built.

* :func:`mix_cross_entropy` computes ``lam CE_s(y_a) + (1 - lam) CE_s(y_b)`` reading the logits once forward and
  once backward with ``O(B)`` extra memory (for more options -- MaxSup, z-loss, decoupled mixup, statistics -- use
  :func:`regops.cross_entropy` with ``mix=``);
* :func:`soft_target_cross_entropy` (timm's ``SoftTargetCrossEntropy``) and :func:`mix_binary_cross_entropy`
  (timm's ``BinaryCrossEntropy`` on ``Mixup``'s targets) likewise.

Float64 logits get float64 math everywhere: targets, lambdas (the float64 draws), class and positive weights,
and the gradient with respect to soft targets.
"""

from __future__ import annotations

from typing import Any

import torch

from regops._core import validate
from regops._core.dtypes import acc_dtype
from regops.losses import ops
from regops.mix import MixedBatch
from regops.mix._params import check_number, check_smoothing

__all__ = ["mix_binary_cross_entropy", "mix_cross_entropy", "soft_target_cross_entropy"]

_REDUCTIONS = ("mean", "sum", "none")


def _check_logits(logits: Any) -> torch.Tensor:
    logits = validate.floating(logits, "logits")
    if logits.dim() != 2:
        raise ValueError(f"regops: logits must be [B, C], got shape {tuple(logits.shape)}")
    return logits


def _reduce(rows: torch.Tensor, reduction: str, denominator: int | None = None) -> torch.Tensor:
    if reduction == "none":
        return rows
    total = rows.sum()
    if reduction == "sum":
        return total
    return total / (denominator if denominator is not None else max(rows.shape[0], 1))


def _lam(mix: MixedBatch, logits: torch.Tensor) -> torch.Tensor:
    """The label weights: float32 (timm's float32 targets), the float64 draws for float64 logits."""
    return mix.params.lam if logits.dtype == torch.float64 else mix.lam


def _check_mix_targets(logits: torch.Tensor, mix: MixedBatch) -> None:
    if not isinstance(mix, MixedBatch):
        raise TypeError(f"regops: mix must be the MixedBatch returned by mix_batch, got {type(mix).__name__}")
    n_classes = logits.shape[1]
    if mix.num_classes is not None and mix.num_classes != n_classes:
        raise ValueError(f"regops: logits have {n_classes} classes but the labels were checked for {mix.num_classes}")
    # (Data-dependent: skipped while tracing under torch.compile; mix_batch checks labels against num_classes.)
    if mix.num_classes is None and mix.target_a.numel() and not torch.compiler.is_compiling():
        low, high = torch.aminmax(mix.target_a)
        if int(low) < 0 or int(high) >= n_classes:
            raise ValueError(f"regops: labels outside [0, {n_classes}): min {int(low)}, max {int(high)}")
    validate.same_device("logits", logits, "mix.target_a", mix.target_a)


def mix_cross_entropy(
    logits: torch.Tensor, mix: MixedBatch, label_smoothing: float | None = None, reduction: str = "mean"
) -> torch.Tensor:
    r"""Cross-entropy of mixed samples from index labels, fused: never builds a ``B x C`` target.

    .. math:: \ell_b = \lambda_b\,\mathrm{CE}_s(z_b, a_b) + (1-\lambda_b)\,\mathrm{CE}_s(z_b, b_b)
              = \mathrm{lse}(z_b) - (1-s)(\lambda_b z_{b,a_b} + (1-\lambda_b) z_{b,b_b}) - s\,\bar z_b

    with ``CE_s`` the cross-entropy against the one-hot smoothed to ``1 - s + s/C`` / ``s/C`` (as
    ``F.cross_entropy(label_smoothing=s)`` and timm's smoothed targets). Equals
    ``SoftTargetCrossEntropy()(logits, mixup_target(...))``. Forward reads the logits once and keeps the row
    log-sum-exp (``4 B`` bytes) for backward, which reads them once more and writes the gradient.

    Args:
        logits: ``[B, C]`` float32/16, bfloat16 or float64.
        mix: the `MixedBatch` from `mix_batch`.
        label_smoothing: ``s`` in ``[0, 1]``; default ``mix.label_smoothing``.
        reduction: ``'mean'`` (over the batch, as timm), ``'sum'`` or ``'none'`` (float32 ``[B]``).

    Returns:
        The loss: a 0-dim float32 tensor (float64 for float64 logits), or ``[B]`` under ``reduction="none"``.

    Example::

        >>> x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 5))
        >>> x_mixed, mix = regops.mix_batch(x, y, mixup_alpha=0.8, cutmix_alpha=1.0)
        >>> regops.mix_cross_entropy(model(x_mixed), mix, label_smoothing=0.1).backward()
    """
    logits = _check_logits(logits)
    _check_mix_targets(logits, mix)
    if logits.shape[0] != mix.target_a.shape[0]:
        raise ValueError(f"regops: logits have {logits.shape[0]} rows but mix has {mix.target_a.shape[0]} samples")
    s = mix.label_smoothing if label_smoothing is None else check_smoothing(label_smoothing)
    if reduction not in _REDUCTIONS:
        raise ValueError(f"regops: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    rows, _ = ops.mix_cross_entropy(logits, mix.target_a, mix.target_b, _lam(mix, logits), float(s))
    return _reduce(rows, reduction)


def soft_target_cross_entropy(
    logits: torch.Tensor, soft_targets: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    r"""``mean_b sum_c -t_bc log_softmax(z_b)_c`` (timm's ``SoftTargetCrossEntropy``), fused.

    Computed as ``lse(z_b) sum_c t_bc - sum_c t_bc z_bc`` in one read of ``z`` and ``t``; the backward
    (``softmax(z_b) sum_c t_bc - t_b``) reads them once more; no ``log_softmax`` is stored.

    Args:
        logits: ``[B, C]`` float; soft_targets: ``[B, C]`` float (any rows, need not sum to 1; differentiable).
        reduction: ``'mean'`` (over the batch), ``'sum'`` or ``'none'``.

    Returns:
        The loss: a 0-dim tensor, or ``[B]`` under ``reduction="none"``.

    Example::

        >>> images, labels = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 5))
        >>> x, soft = regops.Mixup(cutmix_alpha=1.0, num_classes=5)(images, labels)
        >>> regops.soft_target_cross_entropy(model(x), soft).backward()
    """
    logits = _check_logits(logits)
    soft_targets = validate.floating(soft_targets, "soft_targets")
    if soft_targets.shape != logits.shape:
        raise ValueError(
            f"regops: soft_targets must have the logits' shape {tuple(logits.shape)}, got {tuple(soft_targets.shape)}"
        )
    validate.same_device("logits", logits, "soft_targets", soft_targets)
    if reduction not in _REDUCTIONS:
        raise ValueError(f"regops: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    rows, _ = ops.soft_target_cross_entropy(logits, soft_targets)
    return _reduce(rows, reduction)


def mix_binary_cross_entropy(
    logits: torch.Tensor,
    mix: MixedBatch,
    label_smoothing: float | None = None,
    *,
    target_threshold: float | None = None,
    weight: torch.Tensor | None = None,
    pos_weight: torch.Tensor | float | None = None,
    reduction: str = "mean",
    sum_classes: bool = False,
) -> torch.Tensor:
    r"""Binary cross-entropy with logits against the mixed targets of ``mix``, fused (no ``B x C`` target).

    Equals timm's ``BinaryCrossEntropy(target_threshold, weight, reduction, sum_classes, pos_weight)`` applied to
    ``Mixup``'s dense target ``t = lam y_a + (1 - lam) y_b`` (one-hots smoothed to ``1 - s + s/C`` / ``s/C``;
    ``t`` binarised as ``t > target_threshold`` if given)::

        l_bc = w_c [ (1 - t_bc) z_bc + (1 + (pw_c - 1) t_bc) log(1 + exp(-z_bc)) ]

    Reduction: ``'mean'`` over all ``B C`` elements, ``'sum'``, or with ``sum_classes=True`` the sum over
    classes averaged over the batch (timm's ``sum_classes``).

    Args:
        logits: ``[B, C]`` float. mix: from `mix_batch`. label_smoothing: default ``mix.label_smoothing``.
        weight, pos_weight: per-class ``[C]`` tensors (pos_weight may be a number).

    Returns:
        The loss, a 0-dim tensor (``reduction`` is ``"mean"`` or ``"sum"``).

    Example::

        >>> x_mixed, mix = regops.mix_batch(torch.randn(4, 16), torch.tensor([0, 1, 2, 3]), mixup_alpha=1.0)
        >>> logits = torch.nn.Linear(16, 5)(x_mixed)
        >>> loss = regops.mix_binary_cross_entropy(logits, mix, target_threshold=0.2)
        >>> loss.shape
        torch.Size([])
    """
    logits = _check_logits(logits)
    _check_mix_targets(logits, mix)
    batch, n_classes = logits.shape
    if batch != mix.target_a.shape[0]:
        raise ValueError(f"regops: logits have {batch} rows but mix has {mix.target_a.shape[0]} samples")
    s = mix.label_smoothing if label_smoothing is None else check_smoothing(label_smoothing)
    if reduction not in ("mean", "sum"):
        raise ValueError(f"regops: reduction must be 'mean' or 'sum' for the fused BCE, got {reduction!r}")
    threshold = None if target_threshold is None else check_number(target_threshold, "target_threshold")

    acc = acc_dtype(logits)  # float64 weights stay float64 for float64 logits

    def per_class(t: Any, name: str) -> torch.Tensor | None:
        if t is None:
            return None
        if not isinstance(t, torch.Tensor):  # a Python number: straight to the compute dtype, never via float32
            t = torch.tensor(float(check_number(t, name)), dtype=acc, device=logits.device)
        t = validate.floating(t, name)
        t = t.to(logits.device).to(acc).expand(n_classes).contiguous() if t.numel() == 1 else t.to(acc)
        if t.shape != (n_classes,):
            raise ValueError(f"regops: {name} must be a number or a [C={n_classes}] tensor, got {tuple(t.shape)}")
        return t

    rows = ops.mix_binary_cross_entropy(
        logits,
        mix.target_a,
        mix.target_b,
        _lam(mix, logits),
        float(s),
        threshold,
        per_class(weight, "weight"),
        per_class(pos_weight, "pos_weight"),
    )
    if sum_classes:
        return rows.mean() if reduction == "mean" else rows.sum()
    return _reduce(rows, reduction, denominator=max(batch * n_classes, 1))
