"""``empirical_fisher_diagonal``: the exact mean of squared per-example gradients, true or sampled labels."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from regops.losses._class_dim import infer_classes_last
from regops.per_example import _forms
from regops.per_example._recorder import check_reduction
from regops.valuation._capture import Captured, capture, logits_of
from regops.valuation._dots import dense_of

LABELS = ("true", "sampled")


def fisher_sums(cap: Captured) -> dict[str, torch.Tensor]:
    """``{parameter name: sum_n grad_n ** 2}`` of one captured batch (a parameter used by one rule call: its rule's
    ``sq_grad_sum``; any other: its per-example gradients summed over the uses)."""
    out: dict[str, torch.Tensor] = {}
    for name, terms in cap.terms.items():
        if len(terms) == 1 and terms[0].call is not None:
            t = terms[0]
            e = t.call.entry
            out[name] = e.layer.sq_grad_sum(e.module, t.call.saved, t.call.grad)[t.local]
        else:
            out[name] = _forms.sq_sum(dense_of(cap, name))
    return out


def _sampler(generator: torch.Generator | None, class_dim: int | None) -> Callable[[Any, Any], torch.Tensor]:
    def sample(outputs: Any, targets: Any) -> torch.Tensor:
        logits = infer_classes_last(logits_of(outputs).detach(), targets, class_dim)
        probs = torch.softmax(logits.reshape(-1, logits.shape[-1]).float(), dim=-1)
        drawn = torch.multinomial(probs, 1, generator=generator).reshape(logits.shape[:-1])
        if isinstance(targets, torch.Tensor) and targets.shape == drawn.shape:
            drawn = torch.where(targets == -100, targets, drawn)  # ignored positions stay ignored
        return drawn

    return sample


def empirical_fisher_diagonal(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    loader: Iterable[tuple[Any, Any]],
    *,
    labels: str = "true",
    loss_reduction: str | None = None,
    generator: torch.Generator | None = None,
    forms: str | Mapping[str, str] | None = None,
    unsupported: str = "error",
    class_dim: int | None = None,
) -> dict[str, torch.Tensor]:
    r"""The diagonal of the empirical Fisher, exactly: ``F_k = \frac1N \sum_{n} (\nabla_{\theta_k} \ell_n)^2``.

    One forward and one backward per batch; ``p.grad`` untouched. Per layer: a Linear on ``[B, d]`` inputs is
    one GEMM ``(G\odot G)^\top (A\odot A)``; a Linear on sequences and a convolution (unfolded patches)
    square each example's gradient tile by tile (``regops::valuation_sq_grad_sum``, the instantiate kernel's
    tiles: no ``B x p x d`` tensor); Embedding sums each example's rows of repeated ids; norms and biases
    their per-example gradients; reused modules and tied parameters their summed per-example gradients.

    Args:
        model, loss_fn: as for `per_sample_grad_dots`.
        loader: an iterable of ``(inputs, targets)`` batches (a DataLoader, a list).
        labels: ``"true"`` (the empirical Fisher, used by EWC / EATA) or ``"sampled"``: targets drawn from
            the model's softmax over the class dim of its logits (an unbiased estimate of the true Fisher's
            diagonal); positions whose target is ``-100`` stay ignored.
        class_dim: for ``labels="sampled"``, where the classes are (as for `data_scores`: ``None`` finds
            it from the targets' shape: last for ``[B, T, V]`` LM logits, dim 1 for ``[B, C, d1, ...]``).
        loss_reduction: required: how ``loss_fn`` combines the examples, ``"sum"`` or ``"mean"``
            (``F.cross_entropy``'s default); the gradients are those of the per-example losses either way (a
            wrong value would scale the diagonal by ``B^2``; where it contradicts the loss, it raises).
        generator: for ``labels="sampled"``.

    Returns:
        ``{parameter name: tensor of the parameter's shape}``, float32 (float64 for a float64 model).

    Example::

        >>> F = torch.nn.functional
        >>> model = torch.nn.Sequential(torch.nn.Linear(20, 32), torch.nn.ReLU(), torch.nn.Linear(32, 5))
        >>> ds = torch.utils.data.TensorDataset(torch.randn(40, 20), torch.randint(0, 5, (40,)))
        >>> loader = torch.utils.data.DataLoader(ds, batch_size=16, shuffle=True)
        >>> old = {n: p.detach().clone() for n, p in model.named_parameters()}
        >>> fisher = regops.empirical_fisher_diagonal(model, F.cross_entropy, loader, loss_reduction="mean")
        >>> ewc = sum((fisher[n] * (p - old[n]) ** 2).sum() for n, p in model.named_parameters())
        >>> fisher["0.weight"].shape
        torch.Size([32, 20])
    """
    check_reduction(loss_reduction)
    if labels not in LABELS:
        raise ValueError(f"regops: labels must be 'true' or 'sampled', got {labels!r}")
    targets_fn = _sampler(generator, class_dim) if labels == "sampled" else None
    total: dict[str, torch.Tensor] = {}
    params: dict[str, nn.Parameter] = {}
    n = 0
    for batch in loader:
        cap = capture(
            model,
            loss_fn,
            batch,
            loss_reduction=loss_reduction,
            forms=forms,
            unsupported=unsupported,
            targets_fn=targets_fn,
        )
        params.update(cap.params)
        for name, value in fisher_sums(cap).items():
            total[name] = value if name not in total else total[name] + value
        n += cap.batch
    if n == 0:
        raise ValueError("regops: the loader yielded no examples")
    out = {}
    for name, p in params.items():
        dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
        v = total.get(name)
        out[name] = torch.zeros(p.shape, dtype=dtype, device=p.device) if v is None else (v / n).reshape(p.shape)
    return out
