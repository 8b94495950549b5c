"""One batch through the per-example recorder: the tracked layers' inputs and the per-example-loss gradients of
their outputs, from one forward and one ``torch.autograd.grad`` (``p.grad`` is never touched)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from regops.per_example._calls import _Call, _Entry
from regops.per_example._recorder import _Recorder

Batch = tuple[Any, Any]


@dataclass
class Captured:
    """The recorded calls of one batch, with detached inputs and per-example-loss output gradients."""

    rec: _Recorder
    calls: list[tuple[_Call, torch.Tensor]]  # calls the loss reached: (call, output gradient)
    batch: int
    logits: torch.Tensor | None  # detached, when asked
    targets: Any
    param_grads: dict[str, torch.Tensor] = field(default_factory=dict)  # sum_n grad_n, when asked
    scale: float = 1.0  # per-example-loss gradient / delivered gradient

    @property
    def use_count(self) -> dict[str, int]:
        return self.rec.mbs[0].use_count

    @property
    def entries(self) -> list[_Entry]:
        return self.rec.all_entries()

    def by_entry(self) -> dict[str, list[tuple[Any, torch.Tensor]]]:
        out: dict[str, list[tuple[Any, torch.Tensor]]] = {e.label: [] for e in self.rec.all_entries()}
        for call, g in self.calls:
            out[call.entry.label].append((call.saved, g))
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
) -> None:
    """Check ``loss_reduction`` against the loss itself where that is cheap and unambiguous: with tensor outputs
    and targets whose dim 0 is the batch the layers saw (``B >= 2``), the batch loss of a sum is the sum of the
    losses of its two halves, that of a mean their size-weighted mean. A loss that matches the other reduction and
    not the declared one raises; one that matches neither (a per-token mean over sequences of different lengths)
    is left alone."""
    if not (isinstance(outputs, torch.Tensor) and isinstance(targets, torch.Tensor)):
        return
    b = batch
    if b < 2 or outputs.dim() == 0 or outputs.shape[0] != b or targets.dim() == 0 or targets.shape[0] != b:
        return
    k = b // 2
    try:
        first, second = _halves_loss(loss_fn, outputs.detach(), targets, k)
    except Exception:  # a loss that cannot take a part of the batch: nothing to check
        return
    if not (isinstance(first, torch.Tensor) and isinstance(second, torch.Tensor)):
        return
    whole, first, second = (t.detach().double().reshape(()) for t in (loss, first, second))
    as_sum = first + second
    as_mean = (k * first + (b - k) * second) / b
    rtol = 1e-8 if loss.dtype == torch.float64 else 1e-3
    scale = first.abs() + second.abs() + whole.abs()
    is_sum = bool((whole - as_sum).abs() <= rtol * scale)
    is_mean = bool((whole - as_mean).abs() <= rtol * scale)
    if is_sum == is_mean:
        return
    found = "sum" if is_sum else "mean"
    if found != loss_reduction:
        what = "the sum" if is_sum else "the size-weighted mean"
        raise ValueError(
            f"regops: loss_reduction={loss_reduction!r}, but loss_fn returns the {found} over the batch (its value on "
            f"a batch is {what} of its values on the two halves); pass loss_reduction={found!r}, or every "
            f"per-example gradient would be off by a factor of the batch size"
        )


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


class _SignalRecorder(_Recorder):
    """The per-example recorder (module rules, functional parameter uses, torch.func fallback, batch_dim), keeping
    each call's batch-first output gradient instead of turning it into norms. Its tensor hooks are put on the
    outputs in the forward, so a layer output modified in place later (ReLU(inplace=True), a residual ``+=``)
    still gets the gradient of the value the layer produced."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.signals: dict[int, tuple[Any, Any]] = {}  # id(call) -> (batch-first gradient, raw gradient)
        self.hooked: list[tuple[_Call, torch.Tensor, int]] = []  # (call, hooked output, its version then)

    def record(self, entry, saved, output, label, batch_dim=None, rows=None):
        replaced = super().record(entry, saved, output, label, batch_dim=batch_dim, rows=rows)
        hooked = output if replaced is None else replaced  # the tensor whose hook gives this call's gradient
        self.hooked.append((self.calls[-1], hooked, hooked._version))
        return replaced

    def contribute(self, call: _Call, grad: Any) -> None:
        if id(call) in self.signals:
            raise RuntimeError("regops: a recorded forward was backpropagated twice")
        self.signals[id(call)] = (self.batch_first(call, grad), grad)

    def all_entries(self) -> list[_Entry]:
        return [*self.entries, *self.functional_entries.values()]


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
) -> Captured:
    """Run ``loss_fn(model(inputs), targets)`` once and get every tracked call's output gradient of the
    per-example losses (``loss_reduction="mean"``: the delivered gradient times ``B``)."""
    inputs, targets = split_batch(batch)
    rec = _SignalRecorder(model, forms=forms, unsupported=unsupported)
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
            verify_reduction(loss_fn, outputs, targets, loss, loss_reduction, rec.mbs[0].batch)
            params = dict(rec.params)
            # One backward that reaches every recorded use, computing no weight gradient where it can: the
            # hooked outputs themselves, and for an output modified in place since (its current version's
            # gradient is not the one we need) or a torch.func call, the parameters of that call's module.
            direct = {id(c) for c, t, v in rec.hooked if t._version == v}
            drive = [t for c, t, v in rec.hooked if id(c) in direct]
            via = {id(p): p for c in rec.calls if id(c) not in direct for _, p in c.entry.params.values()}
            wanted = list(params.values()) if param_grads else []
            wanted += drive + [p for k, p in via.items() if not param_grads]
            grads = torch.autograd.grad(loss, wanted, allow_unused=True) if wanted else ()
        finally:
            rec.close()
    b = rec.mbs[0].batch
    scale = float(b) if loss_reduction == "mean" else 1.0
    out_calls = []
    for call in rec.calls:
        sig = rec.signals.get(id(call))
        call.saved = _detach(call.saved)
        if sig is not None:
            g = sig[0]
            out_calls.append((call, g * scale if scale != 1.0 else g))
    pg = {}
    if param_grads:
        for (name, p), g in zip(params.items(), grads[: len(params)], strict=True):
            g = torch.zeros_like(p) if g is None else g.detach()
            pg[name] = g * scale if scale != 1.0 else g
    kept = logits_of(outputs).detach() if keep_outputs else None
    return Captured(rec, out_calls, b, kept, targets, pg, scale)
