"""Per-example data scores (GraNd, EL2N, loss, entropy, margin) and gradient coherence from one pass."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from regops._loader import IndexedLoader, in_dataset_order
from regops.losses._class_dim import infer_classes_last
from regops.per_example._recorder import check_reduction
from regops.valuation._capture import (
    call_model,
    capture,
    logits_of,
    split_batch,
)

SCORES = ("grand", "el2n", "loss", "entropy", "margin")


def logit_scores(
    logits: torch.Tensor, targets: torch.Tensor, which: Sequence[str], class_dim: int | None = None
) -> dict[str, torch.Tensor]:
    """``{score: [B]}`` from logits ``[B, C]`` (targets ``[B]``) or with positions: ``[B, T, V]`` (targets
    ``[B, T]``), ``[B, C, d1, ...]`` (targets ``[B, d1, ...]``; the class dim found from the targets, see
    ``infer_classes_last``; ``-100`` ignored): EL2N ``||softmax - onehot||_2`` (over all positions), loss
    (cross-entropy summed over positions), entropy of the softmax and margin ``z_y - max_{c != y} z_c`` (means
    over the positions)."""
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    z = infer_classes_last(logits.detach(), targets, class_dim).to(dtype)
    if z.dim() >= 2 and targets.shape == z.shape[:-1]:
        z, y = z.reshape(z.shape[0], -1, z.shape[-1]), targets.reshape(z.shape[0], -1)
    else:
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


def _scores_once(model, loss_fn, loader: IndexedLoader, which, kw, class_dim) -> dict[str, torch.Tensor]:
    """``{score: [N]}`` of one pass over ``loader``, in dataset order."""
    out: dict[str, list[torch.Tensor]] = {s: [] for s in which}
    logit_which = [s for s in which if s != "grand"]
    index = []
    for batch, i in loader:
        index.append(i)
        if "grand" in which:
            cap = capture(model, loss_fn, batch, keep_outputs=bool(logit_which), norms=True, **kw)
            out["grand"].append(cap.sq_norms.sqrt())
            logits, targets = cap.logits, cap.targets
        else:
            inputs, targets = split_batch(batch)
            with torch.no_grad():
                logits = logits_of(call_model(model, inputs))
        if logit_which:
            for k, v in logit_scores(logits, targets, logit_which, class_dim).items():
                out[k].append(v)
    if not index:
        raise ValueError("regops: the loader yielded no examples")
    order = loader.order(index)
    return {k: in_dataset_order(torch.cat(v), order) for k, v in out.items()}


def data_scores(
    model: nn.Module | Callable[[int], nn.Module],
    loss_fn: Callable[[Any, Any], torch.Tensor],
    loader: Iterable[tuple[Any, Any]],
    scores: Sequence[str] = SCORES,
    *,
    seeds: Sequence[int] | None = None,
    train_fn: Callable[[nn.Module], Any] | None = None,
    loss_reduction: str | None = None,
    forms: str | Mapping[str, str] | None = None,
    unsupported: str = "error",
    class_dim: int | None = None,
) -> dict[str, torch.Tensor]:
    r"""Per-example data-pruning scores over a dataset, in dataset order ("Deep Learning on a Data Diet").

    * ``grand``: ``\|\nabla_\theta \ell_n\|_2``, from the one-backward per-example norms;
    * ``el2n``: ``\|\mathrm{softmax}(z_n) - \mathrm{onehot}(y_n)\|_2`` (sequences: over all tokens);
    * ``loss``: cross-entropy of the logits (summed over tokens); ``entropy``: of the softmax; ``margin``:
      ``z_{y} - \max_{c\ne y} z_c`` (sequences: means over the tokens; targets ``-100`` are ignored).

    Every score depends on its example only, so it is independent of the loader's batch size (examples must
    be independent: no BatchNorm in train mode). ``p.grad`` is untouched.

    Args:
        model: a model, or with ``seeds`` a factory ``model(seed) -> nn.Module``: the scores are averaged over
            the initialisations, as the paper does (GraNd / EL2N at initialisation or after ``train_fn``).
        loss_fn: ``loss_fn(outputs, targets) -> scalar`` batch loss (GraNd's gradient); the other scores read
            the logits (the output tensor or its ``.logits``) and integer class targets.
        loader: a re-iterable of ``(inputs, targets)`` batches. Scores come back in dataset order: score ``n`` is
            ``loader.dataset[n]``'s for a DataLoader (its sampler's indices are recorded on every pass, so a
            shuffling loader works; a sampler that skips or repeats examples raises: use
            ``torch.utils.data.Subset`` for a subset), the position in the iteration for a list of batches.
        scores: any of ``("grand", "el2n", "loss", "entropy", "margin")``.
        seeds: initialisation seeds for the factory.
        train_fn: ``train_fn(model)`` run before scoring each initialisation (e.g. a few epochs, as EL2N uses).
        loss_reduction: required with ``"grand"`` (how ``loss_fn`` combines the examples, as for
            `per_sample_grad_dots`); unused by the other scores.
        forms: as for `per_sample_grad_dots`.
        unsupported: as for `per_sample_grad_dots`.
        class_dim: the class dim of the logits. ``None``: dim 1 of ``[B, C]``; for more dims, the one the
            targets leave out (``[B, T, V]`` with ``[B, T]`` targets: last, as language models; ``[B, C, H, W]``
            with ``[B, H, W]``: dim 1, as ``F.cross_entropy``), an error when both fit.

    Returns:
        ``{score: [N]}`` float32 (float64 for a float64 model), ``N`` examples in dataset order.

    Example::

        >>> F = torch.nn.functional
        >>> ds = torch.utils.data.TensorDataset(torch.randn(40, 20), torch.randint(0, 5, (40,)))
        >>> loader = torch.utils.data.DataLoader(ds, batch_size=16, shuffle=True)
        >>> def make_model(seed):
        ...     torch.manual_seed(seed)
        ...     return torch.nn.Sequential(torch.nn.Linear(20, 32), torch.nn.ReLU(), torch.nn.Linear(32, 5))
        >>> s = regops.data_scores(make_model, F.cross_entropy, loader, ("grand", "el2n"), seeds=range(2),
        ...                        loss_reduction="mean")
        >>> keep = s["el2n"].argsort(descending=True)[: len(s["el2n"]) // 2]  # the hardest half
        >>> s["grand"].shape, keep.shape
        (torch.Size([40]), torch.Size([20]))
    """
    which = tuple(scores)
    bad = [s for s in which if s not in SCORES]
    if bad or not which:
        raise ValueError(f"regops: unknown scores {bad}; choose from {SCORES}")
    if "grand" in which or loss_reduction is not None:
        check_reduction(loss_reduction)
    passes = IndexedLoader(loader)
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
        parts = _scores_once(m, loss_fn, passes, which, kw, class_dim)
        for k, cat in parts.items():
            if k in total and total[k].shape != cat.shape:
                raise ValueError("regops: the loader yielded a different number of examples on a second pass")
            total[k] = cat if k not in total else total[k] + cat
        count += 1
    return {k: v / count for k, v in total.items()} if count > 1 else total


@dataclass
class GradientCoherence:
    r"""Statistics of the per-example gradients ``g_1..g_N`` of a dataset.

    * ``coherence``: ``\alpha = \|\bar g\|^2 / \overline{\|g\|^2}`` with ``\bar g = \frac1N\sum g_n``
      (1 when all gradients agree, about ``1/N`` when they are orthogonal);
    * ``cov_trace``: ``\mathrm{tr}\,\Sigma = \frac1N\sum_n\|g_n - \bar g\|^2 = \overline{\|g\|^2} - \|\bar g\|^2``;
    * ``mean_sq_norm`` ``\overline{\|g\|^2}``, ``sq_norm_of_mean`` ``\|\bar g\|^2``, ``n``.

    Args:
        coherence: 0-dim tensor.
        cov_trace: 0-dim tensor.
        mean_sq_norm: 0-dim tensor.
        sq_norm_of_mean: 0-dim tensor.
        n: the number of examples.

    Example::

        >>> g = regops.GradientCoherence(torch.tensor(0.5), torch.tensor(1.0), torch.tensor(2.0), torch.tensor(1.0), 8)
        >>> float(g.coherence), g.n
        (0.5, 8)
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
    loss_reduction: str | None = None,
    forms: str | Mapping[str, str] | None = None,
    unsupported: str = "error",
) -> GradientCoherence:
    r"""Gradient coherence ("On the Generalization Mystery in Deep Learning") and the trace of the gradient
    covariance, from one forward and one backward per batch: ``\sum_n \|g_n\|^2`` from the per-example
    norms and ``\sum_n g_n`` from the same backward (``p.grad`` untouched). ``loss_reduction`` is required
    (how ``loss_fn`` combines the examples, as for `per_sample_grad_dots`); ``forms``, ``unsupported``: as
    there. The statistics are sums over the examples: the loader's order does not matter.

    Args:
        model: the module whose trainable parameters' per-example gradients are taken.
        loss_fn: ``loss_fn(outputs, targets)``, a loss over the batch (``F.cross_entropy``).
        loader: an iterable of ``(inputs, targets)`` batches (a ``DataLoader`` or a list).
        loss_reduction: ``"mean"`` or ``"sum"``: how ``loss_fn`` combines the examples (required).
        forms: per-layer ``"ghost"`` or ``"instantiate"`` forms, as `per_sample_grad_dots`.
        unsupported: what to do with a module without a rule, as `per_sample_grad_dots`.

    Returns:
        `GradientCoherence` with the ``coherence`` and ``cov_trace`` statistics (0-dim tensors).

    Example::

        >>> F = torch.nn.functional
        >>> model = torch.nn.Sequential(torch.nn.Linear(20, 32), torch.nn.ReLU(), torch.nn.Linear(32, 5))
        >>> ds = torch.utils.data.TensorDataset(torch.randn(40, 20), torch.randint(0, 5, (40,)))
        >>> loader = torch.utils.data.DataLoader(ds, batch_size=16, shuffle=True)
        >>> c = regops.gradient_coherence(model, F.cross_entropy, loader, loss_reduction="mean")
        >>> 0 <= float(c.coherence) <= 1, c.n
        (True, 40)
    """
    check_reduction(loss_reduction)
    kw = dict(loss_reduction=loss_reduction, forms=forms, unsupported=unsupported)
    sum_sq = None
    grad_sum: dict[str, torch.Tensor] = {}
    n = 0
    for batch in loader:
        cap = capture(model, loss_fn, batch, param_grads=True, norms=True, **kw)
        sq = cap.sq_norms.sum()
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
