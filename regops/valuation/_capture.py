"""One batch through the per-example recorder: the tracked layers' inputs and the per-example-loss gradients of
their outputs, from one forward and one ``torch.autograd.grad`` (``p.grad`` is never touched)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from regops._core.dtypes import acc_dtype
from regops.per_example import _layout as L
from regops.per_example import _recipes as R
from regops.per_example._calls import _Call
from regops.per_example._recorder import _Recorder
from regops.per_example._whole import dense_grads

Batch = tuple[Any, Any]


@dataclass
class Term:
    """One use of a parameter in a captured batch: a rule call (``call``, ``local``: the rule's gradient forms
    apply) or per-example gradients ``dense`` ``[B, *shape]``."""

    call: _Call | None = None
    local: str = ""
    dense: torch.Tensor | None = None


@dataclass
class Captured:
    """One batch's per-example gradient signals: every use of every parameter, per-example-loss scaled."""

    rec: _Recorder
    terms: dict[str, list[Term]]  # parameter name -> its uses
    batch: int
    logits: torch.Tensor | None  # detached, when asked
    targets: Any
    param_grads: dict[str, torch.Tensor] = field(default_factory=dict)  # sum_n grad_n, when asked
    scale: float = 1.0  # per-example-loss gradient / delivered gradient
    sq_norms: torch.Tensor | None = None  # [B] squared per-example gradient norms, when asked
    splits: bool = False  # the batch loss is the declared reduction of the losses of its halves (checked)

    @property
    def params(self) -> dict[str, nn.Parameter]:
        return self.rec.params

    def owners(self) -> dict[str, list[str]]:
        """``{module label: [parameter names]}`` of the modules holding the tracked parameters."""
        out: dict[str, list[str]] = {}
        for name, p in self.rec.params.items():
            out.setdefault(self.rec.owner.get(id(p), ""), []).append(name)
        return out


def _halves_loss(loss_fn: Callable[[Any, Any], torch.Tensor], outputs: Any, targets: Any, k: int):
    with torch.no_grad():
        return loss_fn(outputs[:k], targets[:k]), loss_fn(outputs[k:], targets[k:])


def verify_reduction(
    loss_fn: Callable[[Any, Any], torch.Tensor],
    outputs: Any,
    targets: Any,
    loss: torch.Tensor,
    loss_reduction: str,
    batch: int,
) -> bool:
    """Check ``loss_reduction`` against the loss itself where that is cheap and unambiguous: with tensor outputs
    and targets whose dim 0 is the batch the layers saw (``B >= 2``), the batch loss of a sum is the sum of the
    losses of its two halves, that of a mean their size-weighted mean. A loss that matches the other reduction and
    not the declared one raises; one that matches neither (a per-token mean over sequences of different lengths)
    is left alone. Returns whether the loss was found to be the declared reduction (the per-example losses do not
    depend on which examples share the batch)."""
    if not (isinstance(outputs, torch.Tensor) and isinstance(targets, torch.Tensor)):
        return False
    b = batch
    if b < 2 or outputs.dim() == 0 or outputs.shape[0] != b or targets.dim() == 0 or targets.shape[0] != b:
        return False
    k = b // 2
    try:
        first, second = _halves_loss(loss_fn, outputs.detach(), targets, k)
    except Exception:  # a loss that cannot take a part of the batch: nothing to check
        return False
    if not (isinstance(first, torch.Tensor) and isinstance(second, torch.Tensor)):
        return False
    whole, first, second = (t.detach().double().reshape(()) for t in (loss, first, second))
    as_sum = first + second
    as_mean = (k * first + (b - k) * second) / b
    rtol = 1e-8 if loss.dtype == torch.float64 else 1e-3
    scale = first.abs() + second.abs() + whole.abs()
    is_sum = bool((whole - as_sum).abs() <= rtol * scale)
    is_mean = bool((whole - as_mean).abs() <= rtol * scale)
    if is_sum == is_mean:
        return False
    found = "sum" if is_sum else "mean"
    if found != loss_reduction:
        what = "the sum" if is_sum else "the size-weighted mean"
        raise ValueError(
            f"regops: loss_reduction={loss_reduction!r}, but loss_fn returns the {found} over the batch (its value on "
            f"a batch is {what} of its values on the two halves); pass loss_reduction={found!r}, or every "
            f"per-example gradient would be off by a factor of the batch size"
        )
    return True


def split_batch(batch: Any, what: str = "batch") -> Batch:
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise TypeError(
            f"regops: each {what} must be an (inputs, targets) pair (a tuple or list of two), got "
            f"{type(batch).__name__}{'' if not isinstance(batch, (tuple, list)) else f' of length {len(batch)}'}"
        )
    return batch[0], batch[1]


def call_model(model: nn.Module, inputs: Any) -> Any:
    """``model(*inputs)`` for a tuple, ``model(**inputs)`` for a dict, else ``model(inputs)``."""
    if isinstance(inputs, tuple):
        return model(*inputs)
    if isinstance(inputs, Mapping):
        return model(**inputs)
    return model(inputs)


def logits_of(outputs: Any) -> torch.Tensor:
    """The logits of a model output: the tensor itself or its ``.logits`` (Hugging Face outputs)."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    logits = getattr(outputs, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    raise TypeError(f"regops: need logits: the model returned {type(outputs).__name__} (no tensor, no .logits)")


def _detach(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.detach()
    if isinstance(x, tuple):
        return tuple(_detach(v) for v in x)
    return x


def capture(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    batch: Any,
    *,
    loss_reduction: str,
    forms: str | Mapping[str, str] | None = None,
    unsupported: str = "error",
    targets_fn: Callable[[Any, Any], Any] | None = None,
    param_grads: bool = False,
    keep_outputs: bool = False,
    norms: bool = False,
) -> Captured:
    """Run ``loss_fn(model(inputs), targets)`` once and get every use's signals of the per-example losses
    (``loss_reduction="mean"``: the delivered gradients times ``B``), from one ``torch.autograd.grad`` (``p.grad`` is
    never touched)."""
    inputs, targets = split_batch(batch)
    rec = _Recorder(model, forms=forms, unsupported=unsupported, retain_signals=True, norms=norms)
    if not param_grads:
        rec.edges = []
    with torch.enable_grad():
        rec.attach()
        try:
            outputs = call_model(model, inputs)
        finally:
            rec.detach_forward()
        try:
            if targets_fn is not None:
                targets = targets_fn(outputs, targets)
            loss = loss_fn(outputs, targets)
            if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
                raise ValueError("regops: loss_fn(outputs, targets) must return a scalar tensor (the batch loss)")
            if len(rec.mbs) != 1 or rec.mbs[0].batch is None:
                raise RuntimeError("regops: the forward reached no tracked parameter (or ran the model twice)")
            splits = verify_reduction(loss_fn, outputs, targets, loss, loss_reduction, rec.mbs[0].batch)
            # One backward through every recorded use (their hooks take the signals), p.grad is never touched.
            # The parameters' gradients come with it when asked (gradient_coherence's sum); otherwise the backward
            # stops at the hooked tensors: no parameter gradient is computed or held.
            params = list(rec.params.values())
            if param_grads:
                grads = torch.autograd.grad(loss, params, allow_unused=True) if params else ()
            elif rec.edges:
                torch.autograd.grad(loss, rec.edges, allow_unused=True)
        finally:
            rec.close()
    b = rec.mbs[0].batch
    scale = float(b) if loss_reduction == "mean" else 1.0
    terms = _terms(rec, scale)
    pg = {}
    if param_grads:
        for (name, p), g in zip(rec.params.items(), grads, strict=True):
            g = torch.zeros_like(p) if g is None else g.detach()
            pg[name] = g * scale if scale != 1.0 else g
    sq = None
    if norms:
        per = rec.squared_norms()[0]
        p0 = next(iter(rec.params.values()))
        sq = torch.zeros(b, dtype=acc_dtype(p0), device=p0.device)
        for v in per.values():
            sq = sq + v.to(sq.dtype)
        sq = sq * scale**2
    kept = logits_of(outputs).detach() if keep_outputs else None
    return Captured(rec, terms, b, kept, targets, pg, scale, sq, splits)


def _terms(rec: _Recorder, scale: float) -> dict[str, list[Term]]:
    """Every use of every parameter, per-example-loss scaled: rule calls where the rule's forms apply directly
    (a parameter of the rule's layer), per-example gradients otherwise."""
    mb = rec.mbs[0]
    terms: dict[str, list[Term]] = {}
    if mb.fallback:
        for name, g in dense_grads(rec, mb).items():
            terms.setdefault(name, []).append(Term(dense=g * scale if scale != 1.0 else g))
        return terms
    for call in [*rec.calls, *rec.derived]:
        if call.grad is None:
            continue
        if scale != 1.0:
            call.grad = call.grad * scale if isinstance(call.grad, torch.Tensor) else [g * scale for g in call.grad]
        entry = call.entry
        call.saved = _detach(call.saved)
        if call.rows or call.links:
            with rec.quiet():
                per = entry.layer.per_example_grads(entry.module, call.saved, call.grad)
                lay = call.layout_out or call.layout_in
                if call.rows:
                    per = {k: L.per_example_sum(v, lay.at(0)) for k, v in per.items()}
            for local, (name, _) in entry.params.items():
                if local in per:
                    terms.setdefault(name, []).append(Term(dense=per[local]))
            for local, node in call.links.items():
                if local in per:
                    for name, v in R.to_param(node, per[local]).items():
                        terms.setdefault(name, []).append(Term(dense=v))
            continue
        for local, (name, _) in entry.params.items():
            terms.setdefault(name, []).append(Term(call=call, local=local))
    for name, dense in mb.pushed.items():
        for g in dense:
            terms.setdefault(name, []).append(Term(dense=g * scale if scale != 1.0 else g))
    return terms
