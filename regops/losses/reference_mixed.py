"""Reference MixUp / CutMix losses from index labels (``lam``, ``y_a``, ``y_b``) and dense soft targets.

CPU path, test oracle and benchmark baseline of :func:`regops.mix_cross_entropy`,
:func:`regops.soft_target_cross_entropy` and :func:`regops.mix_binary_cross_entropy`; row blocks as
:mod:`regops.losses.reference`. Float64 logits get float64 math throughout (targets, lambdas, weights); otherwise
float32, with the mixed targets rounded as timm's dense float32 targets.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from regops._core.dtypes import acc_dtype
from regops.losses.reference import row_chunks, softmax_into
from regops.mix.reference import mixed_one_hot


def mix_cross_entropy(
    logits: torch.Tensor, target_a: torch.Tensor, target_b: torch.Tensor, lam: torch.Tensor, smoothing: float
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Per-row ``lam * CE_s(z, a) + (1 - lam) * CE_s(z, b)`` and the row log-sum-exp (float32 ``[B]``; float64
    for float64 logits).

    .. math:: \ell_b = \mathrm{lse}(z_b) - (1-s)\,(\lambda_b z_{b,a} + (1-\lambda_b) z_{b,b'}) - s\,\bar z_b

    (``CE_s``: cross-entropy against the one-hot smoothed to ``1 - s + s/C`` / ``s/C``; ``\bar z``: the row mean.)
    Computed from ``log_softmax`` over row blocks of at most ``_CHUNK`` elements.
    """
    n, c = logits.shape
    acc = acc_dtype(logits)
    loss = torch.empty(n, dtype=acc, device=logits.device)
    lse = torch.empty(n, dtype=acc, device=logits.device)
    lam = lam.to(acc)
    for rows in row_chunks(n, c):
        z = logits[rows].to(acc)
        logp = torch.log_softmax(z, dim=1)
        a, b = target_a[rows].view(-1, 1), target_b[rows].view(-1, 1)
        lpa, lpb = logp.gather(1, a).squeeze(1), logp.gather(1, b).squeeze(1)
        lr = lam[rows]
        row = (lr * lpa + (1.0 - lr) * lpb) * -(1.0 - smoothing)
        if smoothing:
            row -= smoothing * logp.mean(dim=1)
        loss[rows] = row
        lse[rows] = z.gather(1, a).squeeze(1) - lpa
    return loss, lse


def mix_cross_entropy_backward(
    grad: torch.Tensor,
    logits: torch.Tensor,
    lse: torch.Tensor,
    target_a: torch.Tensor,
    target_b: torch.Tensor,
    lam: torch.Tensor,
    smoothing: float,
) -> torch.Tensor:
    """``grad[b] * (softmax(z_b) - s/C - (1-s) (lam_b e_a + (1-lam_b) e_b))`` in logits' dtype.

    (``softmax(z_b) = exp(z_b - lse_b)``; the CPU path recomputes it with ``softmax`` straight into the output.)
    """
    n, c = logits.shape
    acc = acc_dtype(logits)
    out = torch.empty_like(logits, memory_format=torch.contiguous_format)
    g = grad.to(acc)
    lam = lam.to(acc)
    for rows in row_chunks(n, c):
        p = softmax_into(out[rows], logits[rows].to(acc))
        gr = g[rows]
        if smoothing:  # p * g - (s / C) g in one pass
            torch.addcmul((-(smoothing / c) * gr).view(-1, 1), p, gr.view(-1, 1), out=p)
        else:
            p.mul_(gr.view(-1, 1))
        lr = lam[rows]
        p.scatter_add_(1, target_a[rows].view(-1, 1), (-(1.0 - smoothing) * lr * gr).view(-1, 1))
        p.scatter_add_(1, target_b[rows].view(-1, 1), (-(1.0 - smoothing) * (1.0 - lr) * gr).view(-1, 1))
        if p.data_ptr() != out[rows].data_ptr():
            out[rows] = p
    return out


def soft_target_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Per-row ``-sum_c t_c log_softmax(z)_c = lse(z) sum_c t_c - sum_c t_c z_c`` and the row statistics the
    backward needs, ``[B, 2] = (lse(z), sum_c t_c)`` (float32; float64 for float64 logits)."""
    n, c = logits.shape
    acc = acc_dtype(logits)
    loss = torch.empty(n, dtype=acc, device=logits.device)
    stats = torch.empty(n, 2, dtype=acc, device=logits.device)
    for rows in row_chunks(n, c):
        z = logits[rows].to(acc)
        t = target[rows].to(acc)
        first = z[:, :1]
        lse_r = (first - torch.log_softmax(z, dim=1)[:, :1]).squeeze(1)  # one fused row op, no logsumexp temps
        t_sum = t.sum(dim=1)
        dot = torch.bmm(t.unsqueeze(1), z.unsqueeze(2)).view(-1)  # row dot products, no B x C temporary
        loss[rows] = lse_r * t_sum - dot
        stats[rows, 0] = lse_r
        stats[rows, 1] = t_sum
    return loss, stats


def soft_target_cross_entropy_backward(
    grad: torch.Tensor, logits: torch.Tensor, stats: torch.Tensor, target: torch.Tensor
) -> torch.Tensor:
    """Gradient w.r.t. the logits: ``grad[b] * (softmax(z_b) * sum_c t_bc - t_b)`` in logits' dtype."""
    n, c = logits.shape
    acc = acc_dtype(logits)
    out = torch.empty_like(logits, memory_format=torch.contiguous_format)
    g = grad.to(acc)
    for rows in row_chunks(n, c):
        t = target[rows].to(acc)
        p = softmax_into(out[rows], logits[rows].to(acc))
        p.mul_(stats[rows, 1].view(-1, 1)).sub_(t).mul_(g[rows].view(-1, 1))
        if p.data_ptr() != out[rows].data_ptr():
            out[rows] = p
    return out


def _bce_targets(
    rows: slice,
    n_cols: int,
    target_a: torch.Tensor,
    target_b: torch.Tensor,
    lam: torch.Tensor,
    smoothing: float,
    threshold: float | None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The mixed smoothed one-hot targets of ``rows``: float32 as timm's dense targets; float64 (from the float64
    lambdas) for float64 logits."""
    if dtype == torch.float64:
        off = smoothing / n_cols
        on = 1.0 - smoothing + off
        lam_r = lam[rows].double().view(-1, 1)
        shape = (lam_r.shape[0], n_cols)
        ya = torch.full(shape, off, dtype=dtype, device=lam.device).scatter_(1, target_a[rows].view(-1, 1), on)
        yb = torch.full(shape, off, dtype=dtype, device=lam.device).scatter_(1, target_b[rows].view(-1, 1), on)
        t = ya * lam_r + yb * (1.0 - lam_r)
    else:
        lam_r = lam[rows].float()
        t = mixed_one_hot(target_a[rows], target_b[rows], lam_r, 1.0 - lam_r, n_cols, smoothing)
    if threshold is not None:
        t = t.gt(threshold).to(t.dtype)
    return t


def mix_binary_cross_entropy(
    logits: torch.Tensor,
    target_a: torch.Tensor,
    target_b: torch.Tensor,
    lam: torch.Tensor,
    smoothing: float,
    threshold: float | None,
    weight: torch.Tensor | None,
    pos_weight: torch.Tensor | None,
) -> torch.Tensor:
    """Per-row sums over classes of ``binary_cross_entropy_with_logits(z, t, weight, pos_weight)`` (float32 ``[B]``),
    ``t`` = the mixed smoothed one-hot of :func:`mixed_one_hot` (``w_self = lam``), optionally thresholded."""
    n, c = logits.shape
    acc = acc_dtype(logits)
    loss = torch.empty(n, dtype=acc, device=logits.device)
    w = None if weight is None else weight.to(acc)
    pw = None if pos_weight is None else pos_weight.to(acc)
    for rows in row_chunks(n, c):
        t = _bce_targets(rows, c, target_a, target_b, lam, smoothing, threshold, acc)
        z = logits[rows].to(acc)
        loss[rows] = F.binary_cross_entropy_with_logits(z, t, w, pos_weight=pw, reduction="none").sum(dim=1)
    return loss


def mix_binary_cross_entropy_backward(
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
    """``grad[b] * w_c * ((1 - t) - (1 + (pw_c - 1) t) * sigmoid(-z))`` in logits' dtype."""
    n, c = logits.shape
    acc = acc_dtype(logits)
    out = torch.empty_like(logits, memory_format=torch.contiguous_format)
    g = grad.to(acc)
    for rows in row_chunks(n, c):
        t = _bce_targets(rows, c, target_a, target_b, lam, smoothing, threshold, acc)
        z = logits[rows].to(acc)
        lw = 1.0 if pos_weight is None else 1.0 + (pos_weight.to(acc) - 1.0) * t
        d = (1.0 - t) - lw * torch.sigmoid(-z)
        if weight is not None:
            d = d * weight.to(acc)
        out[rows] = d * g[rows].view(-1, 1)
    return out
