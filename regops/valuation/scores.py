"""Per-example data scores (GraNd, EL2N, loss, entropy, margin) and gradient coherence from one pass."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from regops.grad_norms.recorder import _Recorder
from regops.valuation.capture import Captured, call_model, capture, check_reduction, logits_of, split_batch

SCORES = ("grand", "el2n", "loss", "entropy", "margin")


def _sq_norms(cap: Captured) -> torch.Tensor:
    """``[B]`` squared per-example gradient norms through the recorder's own path (the norms' code)."""
    rec = cap.rec
    for call in rec.calls:
        sig = rec.signals.get(id(call))
        if sig is not None:
            _Recorder.contribute(rec, call, sig[1])
    sq = rec.squared_norms()[0]
    p = next(iter(rec.params.values()))
    dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
    if not sq:
        return torch.zeros(cap.batch, dtype=dtype, device=p.device)
    return torch.stack([v.to(dtype) for v in sq.values()]).sum(0) * cap.scale**2


def logit_scores(logits: torch.Tensor, targets: torch.Tensor, which: Sequence[str]) -> dict[str, torch.Tensor]:
    """``{score: [B]}`` from logits ``[B, C]`` (targets ``[B]``) or ``[B, T, V]`` (targets ``[B, T]``; ``-100``
    ignored): EL2N ``||softmax - onehot||_2`` (over all tokens), loss (cross-entropy summed over tokens),
    entropy of the softmax and margin ``z_y - max_{c != y} z_c`` (means over the tokens)."""
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    z = logits.detach().to(dtype)
    if z.dim() == 2:
        z, y = z[:, None], targets[:, None]
    else:
        y = targets
    if y.shape != z.shape[:-1]:
        raise ValueError(f"regops: targets {tuple(targets.shape)} do not match logits {tuple(logits.shape)}")
    valid = y != -100
    yc = y.clamp(min=0)
    logp = torch.log_softmax(z, -1)
    p = logp.exp()
    count = valid.sum(1).clamp(min=1).to(dtype)
    out = {}
    if "el2n" in which:
        err = p - F.one_hot(yc, z.shape[-1]).to(dtype)
        out["el2n"] = (err.square().sum(-1) * valid).sum(1).sqrt()
    if "loss" in which:
        out["loss"] = (-logp.gather(-1, yc[..., None])[..., 0] * valid).sum(1)
    if "entropy" in which:
        out["entropy"] = (-(p * logp).sum(-1) * valid).sum(1) / count
    if "margin" in which:
        zy = z.gather(-1, yc[..., None])[..., 0]
        other = z.scatter(-1, yc[..., None], float("-inf")).amax(-1)
        out["margin"] = ((zy - other) * valid).sum(1) / count
    return out


def _scores_once(model, loss_fn, loader, which, kw) -> dict[str, list[torch.Tensor]]:
    out: dict[str, list[torch.Tensor]] = {s: [] for s in which}
    logit_which = [s for s in which if s != "grand"]
    for batch in loader:
        if "grand" in which:
            cap = capture(model, loss_fn, batch, keep_outputs=bool(logit_which), **kw)
            out["grand"].append(_sq_norms(cap).sqrt())
            logits, targets = cap.logits, cap.targets
        else:
            inputs, targets = split_batch(batch)
            with torch.no_grad():
                logits = logits_of(call_model(model, inputs))
        if logit_which:
            for k, v in logit_scores(logits, targets, logit_which).items():
                out[k].append(v)
    return out


def data_scores(
    model: nn.Module | Callable[[int], nn.Module],
    loss_fn: Callable[[Any, Any], torch.Tensor],
    loader: Iterable[tuple[Any, Any]],
    scores: Sequence[str] = SCORES,
    *,
    seeds: Sequence[int] | None = None,
    train_fn: Callable[[nn.Module], Any] | None = None,
    loss_reduction: str = "sum",
    forms: str | Mapping[str, str] | None = None,
    unsupported: str = "error",
) -> dict[str, torch.Tensor]:
    r"""Per-example data-pruning scores over a dataset, in the loader's order ("Deep Learning on a Data Diet").

    * ``grand``: :math:`\|\nabla_\theta \ell_n\|_2`, from the one-backward per-example norms;
    * ``el2n``: :math:`\|\mathrm{softmax}(z_n) - \mathrm{onehot}(y_n)\|_2` (sequences: over all tokens);
    * ``loss``: cross-entropy of the logits (summed over tokens); ``entropy``: of the softmax; ``margin``:
      :math:`z_{y} - \max_{c\ne y} z_c` (sequences: means over the tokens; targets ``-100`` are ignored).

    Every score depends on its example only, so it is independent of the loader's batch size (examples must
    be independent: no BatchNorm in train mode). ``p.grad`` is untouched.

    Args:
        model: a model, or with ``seeds`` a factory ``model(seed) -> nn.Module``: the scores are averaged over
            the initialisations, as the paper does (GraNd / EL2N at initialisation or after ``train_fn``).
        loss_fn: ``loss_fn(outputs, targets) -> scalar`` batch loss (GraNd's gradient); the other scores read
            the logits (the output tensor or its ``.logits``) and integer class targets.
        loader: a re-iterable of ``(inputs, targets)`` batches, unshuffled (``DataLoader(shuffle=False)``).
        scores: any of ``("grand", "el2n", "loss", "entropy", "margin")``.
        seeds: initialisation seeds for the factory. train_fn: ``train_fn(model)`` run before scoring each
            initialisation (e.g. a few epochs, as EL2N uses).
        loss_reduction, forms, unsupported: as for :func:`per_sample_grad_dots`.

    Returns:
        ``{score: [N]}`` float32 (float64 for a float64 model), ``N`` examples in loader order.

    Example::

        >>> s = regops.data_scores(lambda seed: make_model(seed), F.cross_entropy, loader, ("grand", "el2n"),
        ...                        seeds=range(4), train_fn=lambda m: train(m, epochs=1))
        >>> keep = s["el2n"].argsort(descending=True)[: len(s["el2n"]) // 2]   # the hardest half
    """
    check_reduction(loss_reduction)
    which = tuple(scores)
    bad = [s for s in which if s not in SCORES]
    if bad or not which:
        raise ValueError(f"regops: unknown scores {bad}; choose from {SCORES}")
    kw = dict(loss_reduction=loss_reduction, forms=forms, unsupported=unsupported)
    if seeds is None:
        if not isinstance(model, nn.Module):
            raise TypeError("regops: pass an nn.Module, or a factory model(seed) together with seeds=")
        models: Iterable[nn.Module] = [model]
        if train_fn is not None:
            train_fn(model)
    else:
        if isinstance(model, nn.Module) or not callable(model):
            raise TypeError("regops: with seeds=, model must be a factory model(seed) -> nn.Module")
        seeds = list(seeds)
        if not seeds:
            raise ValueError("regops: seeds is empty")

        def make():
            for seed in seeds:
                m = model(seed)
                if train_fn is not None:
                    train_fn(m)
                yield m

        models = make()
    total: dict[str, torch.Tensor] = {}
    count = 0
    for m in models:
        parts = _scores_once(m, loss_fn, loader, which, kw)
        for k, v in parts.items():
            if not v:
                raise ValueError("regops: the loader yielded no examples")
            cat = torch.cat(v)
            if k in total and total[k].shape != cat.shape:
                raise ValueError("regops: the loader yielded a different number of examples on a second pass")
            total[k] = cat if k not in total else total[k] + cat
        count += 1
    return {k: v / count for k, v in total.items()} if count > 1 else total


@dataclass
class GradientCoherence:
    r"""Statistics of the per-example gradients :math:`g_1..g_N` of a dataset.

    * ``coherence``: :math:`\alpha = \|\bar g\|^2 / \overline{\|g\|^2}` with :math:`\bar g = \frac1N\sum g_n`
      (1 when all gradients agree, about ``1/N`` when they are orthogonal);
    * ``cov_trace``: :math:`\mathrm{tr}\,\Sigma = \frac1N\sum_n\|g_n - \bar g\|^2 = \overline{\|g\|^2} - \|\bar g\|^2`;
    * ``mean_sq_norm`` :math:`\overline{\|g\|^2}`, ``sq_norm_of_mean`` :math:`\|\bar g\|^2`, ``n``.
    """

    coherence: torch.Tensor
    cov_trace: torch.Tensor
    mean_sq_norm: torch.Tensor
    sq_norm_of_mean: torch.Tensor
    n: int


def gradient_coherence(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    loader: Iterable[tuple[Any, Any]],
    *,
    loss_reduction: str = "sum",
    forms: str | Mapping[str, str] | None = None,
    unsupported: str = "error",
) -> GradientCoherence:
    r"""Gradient coherence ("On the Generalization Mystery in Deep Learning") and the trace of the gradient
    covariance, from one forward and one backward per batch: :math:`\sum_n \|g_n\|^2` from the per-example
    norms and :math:`\sum_n g_n` from the same backward (``p.grad`` untouched).

    Example::

        >>> c = regops.gradient_coherence(model, F.cross_entropy, loader)
        >>> float(c.coherence), float(c.cov_trace)
    """
    check_reduction(loss_reduction)
    kw = dict(loss_reduction=loss_reduction, forms=forms, unsupported=unsupported)
    sum_sq = None
    grad_sum: dict[str, torch.Tensor] = {}
    n = 0
    for batch in loader:
        cap = capture(model, loss_fn, batch, param_grads=True, **kw)
        sq = _sq_norms(cap).sum()
        sum_sq = sq if sum_sq is None else sum_sq + sq
        for k, g in cap.param_grads.items():
            g = g.to(sq.dtype)
            grad_sum[k] = g if k not in grad_sum else grad_sum[k] + g
        n += cap.batch
    if n == 0:
        raise ValueError("regops: the loader yielded no examples")
    mean_sq = sum_sq / n
    sq_mean = sum(v.square().sum() for v in grad_sum.values()) / (n * n)
    return GradientCoherence(sq_mean / mean_sq, mean_sq - sq_mean, mean_sq, sq_mean, n)
