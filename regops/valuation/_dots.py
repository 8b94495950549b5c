"""``per_sample_grad_dots``: exact pairwise per-example gradient inner products between two batches."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from regops.per_example import _forms
from regops.per_example._recorder import check_reduction
from regops.valuation._capture import Captured, capture

BLOCKS = (None, "param", "module")


def _owners(cap: Captured) -> dict[str, list[tuple[str, str]]]:
    """``{parameter name: [(module label, local name), ...]}`` (several modules: a tied parameter)."""
    owners: dict[str, list[tuple[str, str]]] = {}
    for e in cap.entries:
        for local, (name, _) in e.params.items():
            owners.setdefault(name, []).append((e.label, local))
    return owners


def _summed_grads(cap: Captured, uses: list[tuple[str, str]]) -> torch.Tensor | None:
    """Per-example gradients ``[B, *shape]`` of one parameter summed over all its recorded uses."""
    entries = {e.label: e for e in cap.entries}
    calls = cap.by_entry()
    total = None
    for label, local in uses:
        e = entries[label]
        for saved, g in calls[label]:
            v = e.layer.per_example_grads(e.module, saved, g)[local]
            v = v.to(_forms.acc_dtype(v))
            total = v if total is None else total + v
    return total


def pair_dots(cap1: Captured, cap2: Captured) -> dict[str, torch.Tensor]:
    """``{parameter name: [B1, B2]}`` inner products between the per-example gradients of two captured batches.

    A parameter of one module sums the rule's ``grad_dots`` over every pair of that module's calls (a reused
    layer: the cross terms between calls included); a parameter shared by several modules (weight tying) is
    handled with its per-example gradients summed over the uses."""
    owners = _owners(cap1)
    calls1, calls2 = cap1.by_entry(), cap2.by_entry()
    out: dict[str, torch.Tensor] = {}
    for e in cap1.entries:
        single = {local for local, (name, _) in e.params.items() if len(owners[name]) == 1}
        for s1, g1 in calls1[e.label]:
            for s2, g2 in calls2.get(e.label, []):
                form = e.form if e.form != "auto" else e.layer.dots_form(e.module, s1, s2)
                for local, value in e.layer.grad_dots(e.module, s1, g1, s2, g2, form).items():
                    if local in single:
                        name = e.params[local][0]
                        out[name] = value if name not in out else out[name] + value
    for name, uses in owners.items():
        if len(uses) > 1:
            d1, d2 = _summed_grads(cap1, uses), _summed_grads(cap2, uses)
            if d1 is not None and d2 is not None:
                out[name] = _forms.flat_dots(d1, d2)
    # Parameters the loss did not reach have zero per-example gradients.
    dtype = next((v.dtype for v in out.values()), _dtype_of(cap1))
    device = next(p.device for e in cap1.entries for _, p in e.params.values())
    for name in owners:
        if name not in out:
            out[name] = torch.zeros(cap1.batch, cap2.batch, dtype=dtype, device=device)
    return out


def _dtype_of(cap: Captured) -> torch.dtype:
    p = next(p for e in cap.entries for _, p in e.params.values())
    return torch.float64 if p.dtype == torch.float64 else torch.float32


def combine(per_param: dict[str, torch.Tensor], cap: Captured, blocks: str | None):
    if blocks == "param":
        return per_param
    if blocks == "module":
        return {e.label: torch.stack([per_param[n] for n, _ in e.params.values()]).sum(0) for e in cap.entries}
    return torch.stack(list(per_param.values())).sum(0)


def per_sample_grad_dots(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    train: tuple[Any, Any],
    test: tuple[Any, Any],
    *,
    loss_reduction: str | None = None,
    blocks: str | None = None,
    forms: str | Mapping[str, str] | None = None,
    unsupported: str = "error",
) -> torch.Tensor | dict[str, torch.Tensor]:
    r"""Exact inner products between the per-example gradients of a training batch and of a test batch.

    .. math:: D_{ij} = \big\langle \nabla_\theta \ell(z_i),\, \nabla_\theta \ell(z'_j) \big\rangle
              = \sum_k \big\langle \nabla_{\theta_k} \ell(z_i),\, \nabla_{\theta_k} \ell(z'_j) \big\rangle

    over the trainable parameters of the tracked layers, from one forward and one backward per batch, without
    building the ``B x P`` per-example gradients where a cheaper exact form exists. Per layer (chosen by cost
    as the per-example norms do, or by ``forms``): a Linear on ``[B, d]`` inputs uses
    :math:`(a_i\cdot a'_j)(g_i\cdot g'_j)`; on sequences the cross Gram (ghost) form
    :math:`\sum_{t,s}(a_{it}\cdot a'_{js})(g_{it}\cdot g'_{js})` (a tiled Triton kernel on GPU, no
    ``T x T'`` matrix in memory) or the instantiated gradients; Conv the same on unfolded patches; Embedding
    the id-equality Gram; norms and biases their small per-example gradients. ``p.grad`` is not touched.

    Args:
        model: as for :func:`regops.per_sample_grad_norms` (Linear, Conv1d/2d/3d, Embedding, LayerNorm,
            GroupNorm, RMSNorm, registered rules, shared modules; ``unsupported="vmap"`` for other modules).
            Examples must be independent (no BatchNorm in train mode).
        loss_fn: ``loss_fn(model_outputs, targets) -> scalar`` batch loss.
        train: ``(inputs, targets)`` with ``B`` examples (``inputs`` a tensor, a tuple of positional
            arguments or a dict of keyword arguments); test: ``(inputs, targets)`` with ``B2`` examples.
        loss_reduction: required, as for :func:`regops.per_sample_grad_norms`: ``"sum"`` (the loss is
            :math:`\sum_i \ell_i`) or ``"mean"`` (:math:`\frac1B\sum_i\ell_i`: ``F.cross_entropy``'s default);
            either way ``D`` is between the gradients of the per-example losses :math:`\ell_i`. A wrong value
            would scale every entry by ``B``: where the loss can be evaluated on parts of the batch (tensor
            outputs and targets), a value that contradicts the loss raises.
        blocks: ``None`` for the ``[B, B2]`` total, ``"param"`` for ``{parameter name: [B, B2]}``, ``"module"``
            for ``{module name: [B, B2]}``.
        forms: ``"auto"``, ``"ghost"``, ``"instantiate"`` or ``{module name: form}``.
        unsupported: ``"error"`` or ``"vmap"`` (as for the norms).

    Returns:
        ``[B, B2]`` float32 (float64 for a float64 model), or a dict of them (``blocks``). With
        ``test is train`` the diagonal is ``per_sample_grad_norms(...).total ** 2``.

    Example::

        >>> d = regops.per_sample_grad_dots(model, F.cross_entropy, (x_train, y_train), (x_test, y_test),
        ...                                 loss_reduction="mean")
        >>> d.shape                                   # [B_train, B_test]
        >>> d.argmax(0)                               # the most aligned training example of each test example
    """
    check_reduction(loss_reduction)
    if blocks not in BLOCKS:
        raise ValueError(f"regops: blocks must be None, 'param' or 'module', got {blocks!r}")
    kw = dict(loss_reduction=loss_reduction, forms=forms, unsupported=unsupported)
    cap1 = capture(model, loss_fn, train, **kw)
    cap2 = cap1 if test is train else capture(model, loss_fn, test, **kw)
    return combine(pair_dots(cap1, cap2), cap1, blocks)
