"""One batch through the grad_norms recorder: the tracked layers' inputs and the per-example-loss gradients of
their outputs, from one forward and one ``torch.autograd.grad`` (``p.grad`` is never touched)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from regops.grad_norms.layers import ConvRule, EmbeddingRule, LinearRule, _NormRule
from regops.grad_norms.recorder import _Call, _Entry, _Recorder

LOSS_REDUCTIONS = ("sum", "mean")
# Rules whose module touches each of its parameters through exactly one autograd edge per call.
_ONE_EDGE_RULES = (LinearRule, ConvRule, EmbeddingRule, _NormRule)

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

    @property
    def entries(self) -> list[_Entry]:
        return self.rec.entries

    def by_entry(self) -> dict[str, list[tuple[Any, torch.Tensor]]]:
        out: dict[str, list[tuple[Any, torch.Tensor]]] = {e.label: [] for e in self.rec.entries}
        for call, g in self.calls:
            out[call.entry.label].append((call.saved, g))
        return out


def check_reduction(loss_reduction: str) -> None:
    if loss_reduction not in LOSS_REDUCTIONS:
        raise ValueError(f"regops: loss_reduction must be 'sum' or 'mean', got {loss_reduction!r}")


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


def _check_uses(loss: torch.Tensor, rec: _Recorder) -> None:
    """A parameter reached by autograd through more edges than its module was called (e.g. ``F.linear(h,
    emb.weight)`` for a tied head, or a submodule's weight used by its parent's forward) has a gradient the
    recorder does not see: refuse instead of returning silently wrong numbers."""
    tracked = {
        id(p): name for e in rec.entries if isinstance(e.layer, _ONE_EDGE_RULES) for name, p in e.params.values()
    }
    if not tracked or loss.grad_fn is None:
        return
    edges: dict[str, int] = {}
    seen: set[Any] = set()
    stack = [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        for nxt, _ in node.next_functions:
            if nxt is None:
                continue
            var = getattr(nxt, "variable", None)
            if var is not None and id(var) in tracked:
                name = tracked[id(var)]
                edges[name] = edges.get(name, 0) + 1
            elif nxt not in seen:
                stack.append(nxt)
    bad = sorted(n for n, k in edges.items() if k > rec.use_count.get(n, 0))
    if bad:
        raise ValueError(
            f"regops: parameters {bad} are used outside their module's forward (e.g. tied functionally with "
            "F.linear, or read by a parent module); their per-example gradients cannot be recorded, and inner "
            "products, scores or Fisher diagonals would be wrong. Use the module itself (a shared nn.Linear / "
            "nn.Embedding is fine), or freeze those parameters."
        )


def capture(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    batch: Any,
    *,
    loss_reduction: str = "sum",
    forms: str | Mapping[str, str] | None = None,
    unsupported: str = "error",
    targets_fn: Callable[[Any, Any], Any] | None = None,
    param_grads: bool = False,
    keep_outputs: bool = False,
) -> Captured:
    """Run ``loss_fn(model(inputs), targets)`` once and get every tracked call's output gradient of the
    per-example losses (``loss_reduction="mean"``: the delivered gradient times ``B``)."""
    inputs, targets = split_batch(batch)
    rec = _Recorder(model, forms=forms, unsupported=unsupported, hook_outputs=False)
    # Output gradients come from tensor hooks put on each output in the forward, before any later in-place op
    # (ReLU(inplace=True), `out += identity`) can change it: a hook registered before an in-place
    # modification receives the gradient of the value the layer produced; autograd.grad of the modified
    # tensor would return the gradient of the modified value instead.
    versions: dict[int, int] = {}
    hook_grads: dict[int, torch.Tensor] = {}
    handles = []

    def watch(module, args, kwargs, output):  # runs after the recorder's hook on the same module
        call = rec.calls[-1] if rec.calls else None
        if call is None or call.output is not output or id(call) in versions:
            return None
        versions[id(call)] = output._version

        def store(g, key=id(call)):
            hook_grads[key] = g

        output.register_hook(store)
        return None

    with torch.enable_grad():
        rec.attach()
        try:
            for e in rec.entries:
                handles.append(e.module.register_forward_hook(watch, with_kwargs=True))
            outputs = call_model(model, inputs)
        finally:
            rec.close()
            for h in handles:
                h.remove()
        if targets_fn is not None:
            targets = targets_fn(outputs, targets)
        loss = loss_fn(outputs, targets)
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            raise ValueError("regops: loss_fn(outputs, targets) must return a scalar tensor (the batch loss)")
        calls = [c for c in rec.calls if c.output is not None]
        if rec.batch is None:
            raise RuntimeError("regops: the forward reached no tracked layer with trainable parameters")
        _check_uses(loss, rec)
        params = {n: p for e in rec.entries for n, p in e.params.values()} if param_grads else {}
        # Drive one backward to every recorded output; an output modified in place is reached through its
        # module's parameters instead (its current version's gradient is not the one we need).
        drive = [c.output for c in calls if c.output._version == versions.get(id(c))]
        for c in calls:
            if c.output._version != versions.get(id(c)):
                drive.extend(p for _, p in c.entry.params.values())
        wanted = list(params.values()) + drive
        grads = torch.autograd.grad(loss, wanted, allow_unused=True) if wanted else ()
    b = rec.batch
    scale = float(b) if loss_reduction == "mean" else 1.0
    out_calls = []
    for call in calls:
        call.output = None
        call.saved = _detach(call.saved)
        g = hook_grads.get(id(call))
        if g is not None:
            out_calls.append((call, g * scale if scale != 1.0 else g))
    pg = {}
    for (name, p), g in zip(params.items(), grads[: len(params)], strict=True):
        g = torch.zeros_like(p) if g is None else g.detach()
        pg[name] = g * scale if scale != 1.0 else g
    kept = logits_of(outputs).detach() if keep_outputs else None
    return Captured(rec, out_calls, b, kept, targets, pg)
