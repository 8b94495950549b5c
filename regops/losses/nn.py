"""The losses family's modules: torch's ``CrossEntropyLoss`` with regops' regularizers (and its linear form), and
the MixUp / CutMix losses as modules (``SoftTargetCrossEntropy`` is timm's drop-in)."""

from __future__ import annotations

import torch

from regops.losses.api import cross_entropy, linear_cross_entropy, mix_cross_entropy, soft_target_cross_entropy
from regops.mix import MixedBatch

__all__ = ["CrossEntropyLoss", "LinearCrossEntropyLoss", "MixCrossEntropy", "SoftTargetCrossEntropy"]


class CrossEntropyLoss(torch.nn.Module):
    """``torch.nn.CrossEntropyLoss`` with regops' fused regularized cross-entropy (`regops.cross_entropy`).

    Takes torch's constructor arguments (``weight``, ``ignore_index``, ``reduction``, ``label_smoothing``; the
    deprecated ``size_average`` / ``reduce`` are rejected) plus regops' own (``maxsup``, ``z_loss``,
    ``confidence_penalty``, ``decoupled``, ``softcap``, ``logit_scale``, ``return_stats``, ``class_dim``). Inputs as
    torch's: ``[N, C]``, ``[C]`` or ``[N, C, d1, ...]`` (classes on dim 1) with index targets, the same rule as
    `regops.cross_entropy`; ``class_dim=-1`` for classes-last logits (``[B, T, V]``). Probability targets go
    to torch's own loss (no regularizers on that path). ``forward(input, target, mix=None, token_weight=None)``.

    Args:
        weight: ``[C]`` class weights (the logits' dtype, or float32 for 16-bit logits).
        size_average: deprecated in torch; must be None.
        ignore_index: the target value whose rows count for nothing.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        label_smoothing: torch's label smoothing.
        maxsup: MaxSup's weight (``z_max - mean z``).
        z_loss: weight of ``lse ** 2``.
        confidence_penalty: weight of the negative entropy.
        decoupled: decoupled label smoothing's weight.
        softcap: cap the logits at ``softcap * tanh(z / softcap)``.
        logit_scale: multiply the logits first.
        return_stats: also return `regops.LossStats`.
        class_dim: where the classes are (default: dim 1, as torch; -1 for classes-last logits).
        reduce: deprecated in torch; must be None.

    Example::

        >>> crit = regops.nn.CrossEntropyLoss(label_smoothing=0.1, z_loss=1e-4)
        >>> logits, labels = torch.randn(8, 10), torch.randint(0, 10, (8,))
        >>> crit(logits, labels).shape
        torch.Size([])
    """

    def __init__(
        self,
        weight: torch.Tensor | None = None,
        size_average: None = None,
        ignore_index: int = -100,
        reduce: None = None,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        *,
        maxsup: float = 0.0,
        z_loss: float = 0.0,
        confidence_penalty: float = 0.0,
        decoupled: float = 0.0,
        softcap: float | None = None,
        logit_scale: float = 1.0,
        return_stats: bool = False,
        class_dim: int | None = None,
    ) -> None:
        super().__init__()
        if size_average is not None or reduce is not None:
            raise ValueError("regops: size_average and reduce are deprecated in torch; use reduction=")
        self.register_buffer("weight", weight)
        self.ignore_index, self.reduction, self.label_smoothing = ignore_index, reduction, label_smoothing
        self.maxsup, self.z_loss, self.confidence_penalty = maxsup, z_loss, confidence_penalty
        self.decoupled, self.softcap, self.logit_scale = decoupled, softcap, logit_scale
        self.return_stats = return_stats
        self.class_dim = class_dim

    def _options(self) -> dict:
        return dict(
            ignore_index=self.ignore_index, reduction=self.reduction, label_smoothing=self.label_smoothing,
            maxsup=self.maxsup, z_loss=self.z_loss, confidence_penalty=self.confidence_penalty,
            decoupled=self.decoupled, softcap=self.softcap, logit_scale=self.logit_scale,
            return_stats=self.return_stats, class_dim=self.class_dim,
        )  # fmt: skip

    def forward(self, input: torch.Tensor, target=None, mix=None, token_weight: torch.Tensor | None = None):
        if isinstance(target, torch.Tensor) and target.is_floating_point():
            if any((self.maxsup, self.z_loss, self.confidence_penalty, self.decoupled, self.return_stats)) or (
                self.softcap is not None or self.logit_scale != 1.0 or mix is not None or token_weight is not None
            ):
                raise ValueError("regops: probability targets take only torch's options; use index labels or mix=")
            if self.class_dim is not None and input.dim() > 2:
                input, target = input.movedim(self.class_dim, 1), target.movedim(self.class_dim, 1)
            return torch.nn.functional.cross_entropy(
                input, target, self.weight, ignore_index=self.ignore_index, reduction=self.reduction,
                label_smoothing=self.label_smoothing,
            )  # fmt: skip
        return cross_entropy(input, target, weight=self.weight, mix=mix, token_weight=token_weight, **self._options())

    def extra_repr(self) -> str:
        opts = {k: v for k, v in self._options().items() if v not in (0.0, None, False, 1.0, "mean", -100)}
        return ", ".join(f"{k}={v}" for k, v in opts.items())


class LinearCrossEntropyLoss(CrossEntropyLoss):
    """`regops.linear_cross_entropy` as a module: ``loss = crit(hidden, weight, target, bias=None)``.

    Same options as `CrossEntropyLoss` (``weight`` here is the class weight; the classifier's weight is
    an argument of ``forward``, e.g. ``model.lm_head.weight``). The ``[rows, V]`` logits are never built.

    Args:
        weight: ``[V]`` class weights (not the classifier's weight, which ``forward`` takes).
        size_average: deprecated in torch; must be None.
        ignore_index: the target value whose rows count for nothing.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        label_smoothing: torch's label smoothing.
        maxsup: MaxSup's weight.
        z_loss: weight of ``lse ** 2``.
        confidence_penalty: weight of the negative entropy.
        decoupled: decoupled label smoothing's weight.
        softcap: cap the logits at ``softcap * tanh(z / softcap)``.
        logit_scale: multiply the logits first.
        return_stats: also return `regops.LossStats`.
        class_dim: None or -1 (the linear form is classes-last).
        reduce: deprecated in torch; must be None.

    Example::

        >>> crit = regops.nn.LinearCrossEntropyLoss(ignore_index=-100, z_loss=1e-4)
        >>> hidden, lm_head, input_ids = torch.randn(2, 6, 16), torch.nn.Linear(16, 50), torch.randint(0, 50, (2, 6))
        >>> crit(hidden[:, :-1], lm_head.weight, input_ids[:, 1:]).shape
        torch.Size([])
    """

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, target=None, bias=None, mix=None, token_weight=None):
        opts = self._options()
        if opts.pop("class_dim") not in (None, -1):
            raise ValueError("regops: the linear form's logits are classes-last by construction (class_dim=-1)")
        return linear_cross_entropy(
            hidden, weight, target, bias, class_weight=self.weight, mix=mix, token_weight=token_weight, **opts
        )  # fmt: skip


class MixCrossEntropy(torch.nn.Module):
    """Module form of `mix_cross_entropy`: ``MixCrossEntropy(label_smoothing)(logits, mix)``.

    Args:
        label_smoothing: smoothing of each one-hot target (default: the value ``mix`` was drawn with).
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Example::

        >>> x, mix = regops.mix_batch(torch.randn(4, 16), torch.tensor([0, 1, 2, 3]), mixup_alpha=1.0)
        >>> regops.nn.MixCrossEntropy(label_smoothing=0.1)(torch.nn.Linear(16, 5)(x), mix).shape
        torch.Size([])
    """

    def __init__(self, label_smoothing: float | None = None, reduction: str = "mean") -> None:
        super().__init__()
        self.label_smoothing, self.reduction = label_smoothing, reduction

    def forward(self, logits: torch.Tensor, mix: MixedBatch) -> torch.Tensor:
        return mix_cross_entropy(logits, mix, self.label_smoothing, self.reduction)


class SoftTargetCrossEntropy(torch.nn.Module):
    """Drop-in for ``timm.loss.SoftTargetCrossEntropy`` backed by `soft_target_cross_entropy`.

    Takes no arguments (``forward`` takes the logits ``[B, C]`` and the soft targets ``[B, C]``).

    Example::

        >>> soft = torch.tensor([[0.7, 0.3], [0.0, 1.0]])
        >>> regops.nn.SoftTargetCrossEntropy()(torch.zeros(2, 2), soft)  # log 2
        tensor(0.6931)
    """

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return soft_target_cross_entropy(x, target)
