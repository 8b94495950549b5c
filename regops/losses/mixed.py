"""MixUp / CutMix losses from index labels and soft-target losses (moved here from :mod:`regops.mix`, which
keeps the mixing; every name stays importable from ``regops`` and ``regops.mix``).

* ``regops::mix_cross_entropy`` computes ``lam CE_s(y_a) + (1 - lam) CE_s(y_b)`` reading the logits once forward
  and once backward with ``O(B)`` extra memory (for more options -- MaxSup, z-loss, decoupled mixup, statistics --
  use :func:`regops.cross_entropy` with ``mix=``);
* ``soft_target_cross_entropy`` (timm's ``SoftTargetCrossEntropy``) and ``mix_binary_cross_entropy`` (timm's
  ``BinaryCrossEntropy`` on ``Mixup``'s targets) likewise.

Float64 logits get float64 math everywhere: targets, lambdas (the float64 draws), class and positive weights,
and the gradient with respect to soft targets.
"""

from __future__ import annotations

from typing import Any

import torch

from regops import _backend
from regops._core import validate as _validate
from regops.mix import MixedBatch, _check_number, _check_smoothing
from regops.reference import losses as _ref

__all__ = [
    "MixCrossEntropy",
    "SoftTargetCrossEntropy",
    "mix_binary_cross_entropy",
    "mix_cross_entropy",
    "soft_target_cross_entropy",
]

_backend.register("mix_cross_entropy", torch=_ref.mix_cross_entropy, triton="regops.kernels.losses:mix_cross_entropy")
_backend.register(
    "mix_cross_entropy_backward",
    torch=_ref.mix_cross_entropy_backward,
    triton="regops.kernels.losses:mix_cross_entropy_backward",
)
_backend.register(
    "soft_target_cross_entropy",
    torch=_ref.soft_target_cross_entropy,
    triton="regops.kernels.losses:soft_target_cross_entropy",
)
_backend.register(
    "soft_target_cross_entropy_backward",
    torch=_ref.soft_target_cross_entropy_backward,
    triton="regops.kernels.losses:soft_target_cross_entropy_backward",
)
_backend.register(
    "mix_binary_cross_entropy",
    torch=_ref.mix_binary_cross_entropy,
    triton="regops.kernels.losses:mix_binary_cross_entropy",
)
_backend.register(
    "mix_binary_cross_entropy_backward",
    torch=_ref.mix_binary_cross_entropy_backward,
    triton="regops.kernels.losses:mix_binary_cross_entropy_backward",
)


# ============================================================================================== ops
@torch.library.custom_op("regops::mix_cross_entropy", mutates_args=())
def _mce_op(
    logits: torch.Tensor, target_a: torch.Tensor, target_b: torch.Tensor, lam: torch.Tensor, smoothing: float
) -> tuple[torch.Tensor, torch.Tensor]:
    fn = _backend.implementation("mix_cross_entropy", logits.device)
    return fn(logits.contiguous(), target_a, target_b, lam, smoothing)


@_mce_op.register_fake
def _(logits, target_a, target_b, lam, smoothing):
    n, acc = logits.shape[0], _ref.loss_dtype(logits)
    return logits.new_empty(n, dtype=acc), logits.new_empty(n, dtype=acc)


@torch.library.custom_op("regops::mix_cross_entropy_backward", mutates_args=())
def _mce_backward_op(
    grad: torch.Tensor,
    logits: torch.Tensor,
    lse: torch.Tensor,
    target_a: torch.Tensor,
    target_b: torch.Tensor,
    lam: torch.Tensor,
    smoothing: float,
) -> torch.Tensor:
    fn = _backend.implementation("mix_cross_entropy_backward", logits.device)
    return fn(grad.contiguous(), logits.contiguous(), lse, target_a, target_b, lam, smoothing)


@_mce_backward_op.register_fake
def _(grad, logits, lse, target_a, target_b, lam, smoothing):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _mce_setup(ctx, inputs, output) -> None:
    logits, target_a, target_b, lam, smoothing = inputs
    ctx.smoothing = smoothing
    ctx.save_for_backward(logits, output[1], target_a, target_b, lam)


def _mce_bwd(ctx, grad_loss, grad_lse):
    logits, lse, target_a, target_b, lam = ctx.saved_tensors
    g = _mce_backward_op(grad_loss, logits, lse, target_a, target_b, lam, ctx.smoothing)
    return g, None, None, None, None


_mce_op.register_autograd(_mce_bwd, setup_context=_mce_setup)


@torch.library.custom_op("regops::soft_target_cross_entropy", mutates_args=())
def _stce_op(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    fn = _backend.implementation("soft_target_cross_entropy", logits.device)
    return fn(logits.contiguous(), target.contiguous())


@_stce_op.register_fake
def _(logits, target):
    n, acc = logits.shape[0], _ref.loss_dtype(logits)
    return logits.new_empty(n, dtype=acc), logits.new_empty((n, 2), dtype=acc)


@torch.library.custom_op("regops::soft_target_cross_entropy_backward", mutates_args=())
def _stce_backward_op(
    grad: torch.Tensor, logits: torch.Tensor, stats: torch.Tensor, target: torch.Tensor
) -> torch.Tensor:
    fn = _backend.implementation("soft_target_cross_entropy_backward", logits.device)
    return fn(grad.contiguous(), logits.contiguous(), stats, target.contiguous())


@_stce_backward_op.register_fake
def _(grad, logits, stats, target):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _stce_setup(ctx, inputs, output) -> None:
    logits, target = inputs
    ctx.save_for_backward(logits, output[1], target)


def _stce_bwd(ctx, grad_loss, grad_stats):
    logits, stats, target = ctx.saved_tensors
    grad_logits = grad_target = None
    if ctx.needs_input_grad[0]:
        grad_logits = _stce_backward_op(grad_loss, logits, stats, target)
    if ctx.needs_input_grad[1]:  # d/dt of -sum t log_softmax(z) = lse(z) - z
        grad_target = ((stats[:, :1] - logits.to(stats.dtype)) * grad_loss.unsqueeze(1)).to(target.dtype)
    return grad_logits, grad_target


_stce_op.register_autograd(_stce_bwd, setup_context=_stce_setup)


@torch.library.custom_op("regops::mix_binary_cross_entropy", mutates_args=())
def _mbce_op(
    logits: torch.Tensor,
    target_a: torch.Tensor,
    target_b: torch.Tensor,
    lam: torch.Tensor,
    smoothing: float,
    threshold: float | None,
    weight: torch.Tensor | None,
    pos_weight: torch.Tensor | None,
) -> torch.Tensor:
    fn = _backend.implementation("mix_binary_cross_entropy", logits.device)
    return fn(logits.contiguous(), target_a, target_b, lam, smoothing, threshold, weight, pos_weight)


@_mbce_op.register_fake
def _(logits, target_a, target_b, lam, smoothing, threshold, weight, pos_weight):
    return logits.new_empty(logits.shape[0], dtype=_ref.loss_dtype(logits))


@torch.library.custom_op("regops::mix_binary_cross_entropy_backward", mutates_args=())
def _mbce_backward_op(
    grad: torch.Tensor,
    logits: torch.Tensor,
    target_a: torch.Tensor,
    target_b: torch.Tensor,
    lam: torch.Tensor,
    smoothing: float,
    threshold: float | None,
    weight: torch.Tensor | None,
    pos_weight: torch.Tensor | None,
) -> torch.Tensor:
    fn = _backend.implementation("mix_binary_cross_entropy_backward", logits.device)
    return fn(
        grad.contiguous(),
        logits.contiguous(),
        target_a,
        target_b,
        lam,
        smoothing,
        threshold,
        weight,
        pos_weight,
    )


@_mbce_backward_op.register_fake
def _(grad, logits, target_a, target_b, lam, smoothing, threshold, weight, pos_weight):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _mbce_setup(ctx, inputs, output) -> None:
    logits, target_a, target_b, lam, smoothing, threshold, weight, pos_weight = inputs
    ctx.smoothing, ctx.threshold = smoothing, threshold
    ctx.has_weight, ctx.has_pos_weight = weight is not None, pos_weight is not None
    saved = [logits, target_a, target_b, lam]
    saved += [weight] if weight is not None else []
    saved += [pos_weight] if pos_weight is not None else []
    ctx.save_for_backward(*saved)


def _mbce_bwd(ctx, grad):
    logits, target_a, target_b, lam, *rest = ctx.saved_tensors
    weight = rest.pop(0) if ctx.has_weight else None
    pos_weight = rest.pop(0) if ctx.has_pos_weight else None
    g = _mbce_backward_op(grad, logits, target_a, target_b, lam, ctx.smoothing, ctx.threshold, weight, pos_weight)
    return g, None, None, None, None, None, None, None


_mbce_op.register_autograd(_mbce_bwd, setup_context=_mbce_setup)


# ============================================================================================== API
_REDUCTIONS = ("mean", "sum", "none")


def _check_logits(logits: Any, batch: int | None = None) -> torch.Tensor:
    logits = _validate.floating(logits, "logits")
    if logits.dim() != 2:
        raise ValueError(f"regops: logits must be [B, C], got shape {tuple(logits.shape)}")
    if batch is not None and logits.shape[0] != batch:
        raise ValueError(f"regops: logits have {logits.shape[0]} rows but the mixed batch has {batch} samples")
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
    _validate.same_device("logits", logits, "mix.target_a", mix.target_a)


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
        mix: the :class:`MixedBatch` from :func:`mix_batch`.
        label_smoothing: ``s`` in ``[0, 1]``; default ``mix.label_smoothing``.
        reduction: ``'mean'`` (over the batch, as timm), ``'sum'`` or ``'none'`` (float32 ``[B]``).

    Example::

        >>> x_mixed, mix = regops.mix_batch(x, y, mixup_alpha=0.8, cutmix_alpha=1.0)
        >>> regops.mix_cross_entropy(model(x_mixed), mix, label_smoothing=0.1).backward()
    """
    logits = _check_logits(logits)
    _check_mix_targets(logits, mix)
    if logits.shape[0] != mix.target_a.shape[0]:
        raise ValueError(f"regops: logits have {logits.shape[0]} rows but mix has {mix.target_a.shape[0]} samples")
    s = mix.label_smoothing if label_smoothing is None else _check_smoothing(label_smoothing)
    if reduction not in _REDUCTIONS:
        raise ValueError(f"regops: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    rows, _ = _mce_op(logits, mix.target_a, mix.target_b, _lam(mix, logits), float(s))
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

    Example::

        >>> x, soft = regops.Mixup(cutmix_alpha=1.0)(images, labels)
        >>> regops.soft_target_cross_entropy(model(x), soft).backward()
    """
    logits = _check_logits(logits)
    soft_targets = _validate.floating(soft_targets, "soft_targets")
    if soft_targets.shape != logits.shape:
        raise ValueError(
            f"regops: soft_targets must have the logits' shape {tuple(logits.shape)}, got {tuple(soft_targets.shape)}"
        )
    _validate.same_device("logits", logits, "soft_targets", soft_targets)
    if reduction not in _REDUCTIONS:
        raise ValueError(f"regops: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    rows, _ = _stce_op(logits, soft_targets)
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
        logits: ``[B, C]`` float. mix: from :func:`mix_batch`. label_smoothing: default ``mix.label_smoothing``.
        weight, pos_weight: per-class ``[C]`` tensors (pos_weight may be a number).

    Example::

        >>> loss = regops.mix_binary_cross_entropy(model(x_mixed), mix, target_threshold=0.2)
    """
    logits = _check_logits(logits)
    _check_mix_targets(logits, mix)
    batch, n_classes = logits.shape
    if batch != mix.target_a.shape[0]:
        raise ValueError(f"regops: logits have {batch} rows but mix has {mix.target_a.shape[0]} samples")
    s = mix.label_smoothing if label_smoothing is None else _check_smoothing(label_smoothing)
    if reduction not in ("mean", "sum"):
        raise ValueError(f"regops: reduction must be 'mean' or 'sum' for the fused BCE, got {reduction!r}")
    threshold = None if target_threshold is None else _check_number(target_threshold, "target_threshold")

    acc = _ref.loss_dtype(logits)  # float64 weights stay float64 for float64 logits

    def per_class(t: Any, name: str) -> torch.Tensor | None:
        if t is None:
            return None
        if not isinstance(t, torch.Tensor):  # a Python number: straight to the compute dtype, never via float32
            t = torch.tensor(float(_check_number(t, name)), dtype=acc, device=logits.device)
        t = _validate.floating(t, name)
        t = t.to(logits.device).to(acc).expand(n_classes).contiguous() if t.numel() == 1 else t.to(acc)
        if t.shape != (n_classes,):
            raise ValueError(f"regops: {name} must be a number or a [C={n_classes}] tensor, got {tuple(t.shape)}")
        return t

    rows = _mbce_op(
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


class MixCrossEntropy(torch.nn.Module):
    """Module form of :func:`mix_cross_entropy`: ``MixCrossEntropy(label_smoothing)(logits, mix)``."""

    def __init__(self, label_smoothing: float | None = None, reduction: str = "mean") -> None:
        super().__init__()
        self.label_smoothing, self.reduction = label_smoothing, reduction

    def forward(self, logits: torch.Tensor, mix: MixedBatch) -> torch.Tensor:
        return mix_cross_entropy(logits, mix, self.label_smoothing, self.reduction)


class SoftTargetCrossEntropy(torch.nn.Module):
    """Drop-in for ``timm.loss.SoftTargetCrossEntropy`` backed by :func:`soft_target_cross_entropy`."""

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return soft_target_cross_entropy(x, target)
