"""``per_sample_grad_dots``: exact pairwise per-example gradient inner products between two batches."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from regops._core.dtypes import acc_dtype
from regops.per_example import _forms
from regops.per_example._recorder import check_reduction
from regops.valuation._capture import Captured, capture
from regops.valuation._chunks import batch_size, bounds, chunk_size, take

BLOCKS = (None, "param", "module")


def dense_of(cap: Captured, name: str) -> torch.Tensor:
    """``[B, *shape]`` per-example gradients of one parameter, summed over its uses."""
    total = None
    for t in cap.terms.get(name, []):
        if t.dense is not None:
            v = t.dense
        else:
            e = t.call.entry
            v = e.layer.per_example_grads(e.module, t.call.saved, t.call.grad)[t.local]
        v = v.to(acc_dtype(v))
        total = v if total is None else total + v
    return total


def _one_rule(cap: Captured, name: str) -> str | None:
    """The label of the one layer whose rule calls make every use of ``name`` (None: other uses too)."""
    labels = {t.call.entry.label if t.call is not None else None for t in cap.terms.get(name, [])}
    return labels.pop() if len(labels) == 1 and None not in labels else None


def pair_dots(
    cap1: Captured, cap2: Captured, emit: Callable[[str, torch.Tensor], None] | None = None
) -> dict[str, torch.Tensor]:
    """``{parameter name: [B1, B2]}`` inner products between the per-example gradients of two captured batches;
    with ``emit``, each parameter's block is handed to ``emit(name, block)`` as soon as it is complete instead
    (and ``{}`` returned), so that a caller summing them never holds more than one at a time.

    A parameter used only by calls of one layer sums the rule's ``grad_dots`` over every pair of those calls (a
    reused layer: the cross terms between calls included); any other parameter (tied across layers, read through
    slices, the torch.func path) is handled with its per-example gradients summed over its uses."""
    out: dict[str, torch.Tensor] = {}
    emit = emit or out.__setitem__
    done: dict[tuple[int, int], dict[str, torch.Tensor]] = {}  # a pair of calls' blocks, until each is used
    dtype, emitted = None, set()
    for name in cap1.terms:
        label = _one_rule(cap1, name)
        total = None
        if label is not None and label == _one_rule(cap2, name):
            for t1 in cap1.terms[name]:
                for t2 in cap2.terms.get(name, []):
                    key = (id(t1.call), id(t2.call))
                    if key not in done:
                        e, c1, c2 = t1.call.entry, t1.call, t2.call
                        form = e.form if e.form != "auto" else e.layer.dots_form(e.module, c1.saved, c2.saved)
                        done[key] = e.layer.grad_dots(e.module, c1.saved, c1.grad, c2.saved, c2.grad, form)
                    v = done[key].pop(t1.local)
                    if not done[key]:
                        del done[key]
                    total = v if total is None else total + v
        else:
            d1, d2 = dense_of(cap1, name), dense_of(cap2, name)
            if d1 is not None and d2 is not None:
                total = _forms.flat_dots(d1, d2)
        if total is not None:
            dtype = dtype or total.dtype
            emitted.add(name)
            emit(name, total)
    # Parameters the loss did not reach have zero per-example gradients.
    p0 = next(iter(cap1.params.values()))
    for name in cap1.params:
        if name not in emitted:
            emit(name, torch.zeros(cap1.batch, cap2.batch, dtype=dtype or acc_dtype(p0), device=p0.device))
    return out


def summed_dots(cap1: Captured, cap2: Captured, blocks: str | None = None):
    """The ``[B1, B2]`` inner products summed over all parameters (``blocks=None``), per module (``"module"``) or
    not at all (``"param"``). The sums are taken as the blocks come (:func:`pair_dots`' ``emit``): at most one
    parameter's block is held besides the sums."""
    if blocks == "param":
        return pair_dots(cap1, cap2)
    owner = {n: m for m, names in cap1.owners().items() for n in names} if blocks == "module" else {}
    sums: dict[str | None, torch.Tensor] = {}

    def add(name: str, block: torch.Tensor) -> None:
        key = owner.get(name)
        sums[key] = block if key not in sums else sums[key] + block

    pair_dots(cap1, cap2, add)
    if blocks == "module":
        return {m: sums[m] for m in cap1.owners()}
    return sums[None]


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
    chunk: int | None = None,
) -> torch.Tensor | dict[str, torch.Tensor]:
    r"""Exact inner products between the per-example gradients of a training batch and of a test batch.

    .. math:: D_{ij} = \big\langle \nabla_\theta \ell(z_i),\, \nabla_\theta \ell(z'_j) \big\rangle
              = \sum_k \big\langle \nabla_{\theta_k} \ell(z_i),\, \nabla_{\theta_k} \ell(z'_j) \big\rangle

    over the trainable parameters of the tracked layers, from one forward and one backward per batch, without
    building the ``B x P`` per-example gradients where a cheaper exact form exists. Per layer (chosen by cost
    as the per-example norms do, or by ``forms``): a Linear on ``[B, d]`` inputs uses
    ``(a_i\cdot a'_j)(g_i\cdot g'_j)``; on sequences the cross Gram (ghost) form
    ``\sum_{t,s}(a_{it}\cdot a'_{js})(g_{it}\cdot g'_{js})`` (a tiled Triton kernel on GPU, no
    ``T x T'`` matrix in memory) or the instantiated gradients; Conv the same on unfolded patches; Embedding
    the id-equality Gram; norms and biases their small per-example gradients. ``p.grad`` is not touched.

    Args:
        model: as for `regops.per_sample_grad_norms` (Linear, Conv1d/2d/3d, Embedding, LayerNorm,
            GroupNorm, RMSNorm, registered rules, shared modules; ``unsupported="vmap"`` for other modules).
            Examples must be independent (no BatchNorm in train mode).
        loss_fn: ``loss_fn(model_outputs, targets) -> scalar`` batch loss.
        train: ``(inputs, targets)`` with ``B`` examples (``inputs`` a tensor, a tuple of positional
            arguments or a dict of keyword arguments); test: ``(inputs, targets)`` with ``B2`` examples.
        loss_reduction: required, as for `regops.per_sample_grad_norms`: ``"sum"`` (the loss is
            ``\sum_i \ell_i``) or ``"mean"`` (``\frac1B\sum_i\ell_i``: ``F.cross_entropy``'s default);
            either way ``D`` is between the gradients of the per-example losses ``\ell_i``. A wrong value
            would scale every entry by ``B``: where the loss can be evaluated on parts of the batch (tensor
            outputs and targets), a value that contradicts the loss raises.
        blocks: ``None`` for the ``[B, B2]`` total, ``"param"`` for ``{parameter name: [B, B2]}``, ``"module"``
            for ``{module name: [B, B2]}``.
        forms: ``"auto"``, ``"ghost"``, ``"instantiate"`` or ``{module name: form}``.
        unsupported: ``"error"`` or ``"vmap"`` (as for the norms).
        chunk: examples per chunk of both batches. ``None`` (default) chooses it so that the signals held at
            once stay within what a plain forward and backward of the training batch holds (its parameters'
            gradients and layer inputs, measured on two examples): each test chunk is captured once and the
            training batch streamed past it chunk by chunk (one more forward and backward of the training batch
            per extra test chunk); both batches are taken whole when they fit. Chunks need batches whose tensors
            all have the examples along dim 0 and a loss that is the sum or mean of per-example losses (checked
            on its halves); otherwise the batches are taken whole. The result is the same up to the order of
            floating-point sums.

    Returns:
        ``[B, B2]`` float32 (float64 for a float64 model), or a dict of them (``blocks``). With
        ``test is train`` the diagonal is ``per_sample_grad_norms(...).total ** 2``.

    Example::

        >>> F = torch.nn.functional
        >>> model = torch.nn.Sequential(torch.nn.Linear(20, 32), torch.nn.ReLU(), torch.nn.Linear(32, 5))
        >>> x_train, y_train = torch.randn(16, 20), torch.randint(0, 5, (16,))
        >>> x_test, y_test = torch.randn(4, 20), torch.arange(4)
        >>> d = regops.per_sample_grad_dots(model, F.cross_entropy, (x_train, y_train), (x_test, y_test),
        ...                                 loss_reduction="mean")
        >>> d.shape  # [B_train, B_test]
        torch.Size([16, 4])
        >>> best = d.argmax(0)  # the most aligned training example of each test example
    """
    check_reduction(loss_reduction)
    if blocks not in BLOCKS:
        raise ValueError(f"regops: blocks must be None, 'param' or 'module', got {blocks!r}")
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"regops: chunk must be a positive int or None, got {chunk!r}")
    kw = dict(loss_reduction=loss_reduction, forms=forms, unsupported=unsupported)
    n1, n2 = batch_size(train), batch_size(test)
    if n1 is not None and n2 is not None:
        chunk = chunk_size(model, loss_fn, train, n1, chunk, kw)
        if chunk is not None and chunk < max(n1, n2):
            return _streamed(model, loss_fn, train, test, (n1, n2), chunk, blocks, kw)
    elif chunk is not None:
        raise ValueError("regops: chunk= needs batches whose tensors all have the examples along dim 0")
    cap1 = capture(model, loss_fn, train, **kw)
    cap2 = cap1 if test is train else capture(model, loss_fn, test, **kw)
    return summed_dots(cap1, cap2, blocks)


def _streamed(model, loss_fn, train, test, sizes: tuple[int, int], chunk: int, blocks: str | None, kw: dict):
    """:func:`summed_dots` of the two batches taken ``chunk`` examples at a time: each test chunk captured once,
    the training chunks captured in turn against it, every capture released before the next."""
    rows, cols = bounds(sizes[0], chunk), bounds(sizes[1], chunk)
    same = test is train
    out: dict[str | None, torch.Tensor] = {}
    for j0, j1 in cols:
        cap2 = capture(model, loss_fn, take(test, j0, j1), **kw)
        for i0, i1 in rows:
            cap1 = cap2 if same and (i0, i1) == (j0, j1) else capture(model, loss_fn, take(train, i0, i1), **kw)
            part = summed_dots(cap1, cap2, blocks)
            del cap1
            for key, block in (part.items() if isinstance(part, dict) else [(None, part)]):
                if key not in out:
                    out[key] = block.new_empty(sizes)
                out[key][i0:i1, j0:j1] = block
            del part, block
        del cap2
    return out if blocks is not None else out[None]
