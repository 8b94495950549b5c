"""What the estimators return, and the statistics every path computes them with (one process, distributed
probes, FSDP2)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


@dataclass
class TraceEstimate:
    """An estimate of ``tr(H)``, as `regops.hessian.trace` returns it (``float(est)`` is the value).

    Args:
        value: the estimate.
        stderr: its standard error (sample standard deviation of the per-probe terms / sqrt(count)); for
            Hutch++ that of the residual Hutchinson part (the sketched part is exact given its subspace).
        num_matvecs: Hessian-vector products used.
        method: ``"hutchinson"``, ``"hutch++"`` or ``"xtrace"``.
        samples: the per-probe terms whose mean is the estimate (Hutchinson: ``v_k^T H v_k``; Hutch++: the
            residual terms, to which the sketched trace is added; XTrace: the exchangeable leave-one-out terms).
        engine: the Hessian-vector product engine that computed it, after any fallback (``"double_backward"``,
            ``"forward_over_reverse"``, ``"loop"`` or ``"finite_difference"``; empty when unknown).
        probe_cap: the most products the method can use for the ``N`` trainable parameters (Hutch++ and XTrace:
            ``2 N``, where the sketch spans the whole space); ``None`` for Hutchinson. ``num_matvecs`` is what ran.
        fd_error: with finite differences, their estimated relative error on ``H v`` (``|D(2h) - D(h)| / 3 |D(h)|``
            on the first probe of each batch, ``D`` the central difference; the largest over batches): for a loss
            smooth at the scale of ``h`` the error of the products is about this large, whatever the stderr says.
            Near kinks (ReLU, hard activations) a step that crosses one changes ``D`` by O(1): a large value flags
            it, though it can then over- or understate the error. ``None`` when an exact engine ran.

    Example::

        >>> w = torch.ones(3, requires_grad=True)
        >>> est = regops.hessian.trace(lambda p: (p[0] ** 2).sum(), [w], num_probes=4)
        >>> est.value, est.method  # tr(2 I) = 6, exact for Rademacher probes
        (6.0, 'hutchinson')
    """

    value: float
    stderr: float
    num_matvecs: int
    method: str = "hutchinson"
    samples: torch.Tensor = field(default_factory=lambda: torch.empty(0), repr=False)
    engine: str = ""
    probe_cap: int | None = None
    fd_error: float | None = None

    @property
    def relative_stderr(self) -> float:
        return self.stderr / abs(self.value) if self.value != 0 else math.inf

    def __float__(self) -> float:
        return float(self.value)


@dataclass
class DiagonalEstimate:
    """Hutchinson estimate of ``diag(H)``, one tensor per parameter (shape and dtype of the parameter).

    ``value`` and ``stderr`` are tuples in the order of ``params``, ``None`` at frozen entries (dicts keyed by
    the names of the trainable params when ``params`` was a dict or a model was given); ``stderr`` is per
    coordinate. ``trace`` is the Hutchinson trace from the same probes.

    Args:
        value: the estimated diagonal.
        stderr: its per-coordinate standard error.
        num_matvecs: Hessian-vector products used.
        trace: the `TraceEstimate` from the same probes.

    Example::

        >>> w = torch.ones(3, requires_grad=True)
        >>> est = regops.hessian.diagonal(lambda p: (p[0] ** 2).sum(), [w], num_probes=4)
        >>> est.value[0], est.trace.value
        (tensor([2., 2., 2.]), 6.0)
    """

    value: tuple[torch.Tensor | None, ...] | dict[str, torch.Tensor]
    stderr: tuple[torch.Tensor | None, ...] | dict[str, torch.Tensor]
    num_matvecs: int
    trace: TraceEstimate


def mean_stderr(samples: torch.Tensor) -> tuple[float, float]:
    """Mean and standard error over dim 0 (float64)."""
    s = samples.double()
    n = s.shape[0]
    mean = s.mean(0)
    if n < 2:
        return mean.item(), math.inf
    return mean.item(), (s.std(0, correction=1) / math.sqrt(n)).item()


def diagonal_stats(diag: torch.Tensor, diag_sq: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and per-coordinate standard error (float64) of ``m`` probes' ``v * Hv`` from their sums
    ``sum_k v * Hv`` and ``sum_k (v * Hv)^2``."""
    mean = diag.double() / m
    if m > 1:
        var = (diag_sq.double() / m - mean * mean).clamp_min(0) * (m / (m - 1))
        err = (var / m).sqrt()
    else:
        err = torch.full_like(mean, math.inf)
    return mean, err


def groups_of(names: Sequence[str], by: str) -> dict[str, list[int]]:
    """Indices of the parameters per key: each parameter (``by="param"``) or each module (``by="module"``: the
    parameters whose names share a prefix before the last dot)."""
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        key = name if by == "param" else (name.rsplit(".", 1)[0] if "." in name else "")
        groups.setdefault(key, []).append(i)
    return groups
