"""The recorder: forward hooks on the tracked layers, output-gradient hooks, per-example contributions."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from regops.grad_norms.layers import _VMAP, SUPPORTED, LayerRule, _f32, _layer_for, _sq

FORMS = ("auto", "ghost", "instantiate")


# ----------------------------------------------------------------------------------------------- recorder
@dataclass
class _Entry:
    label: str
    module: nn.Module
    layer: LayerRule
    params: dict[str, tuple[str, nn.Parameter]]  # local name -> (model name, parameter)
    form: str


@dataclass
class _Call:
    entry: _Entry
    saved: Any
    output: torch.Tensor | None = None  # kept only when the caller asks for output gradients directly
    grad: torch.Tensor | None = None  # kept for Book-Keeping clipping
    fired: int = 0


@dataclass
class _Results:
    sq: dict[str, torch.Tensor] = field(default_factory=dict)  # model param name -> [B]
    dense: dict[str, torch.Tensor] = field(default_factory=dict)  # shared params: per-example grads


class _Recorder:
    """Records the supported layers' forward calls and turns output gradients into per-example squared norms.

    This is the reusable core (also used by the Hessian family): :meth:`attach` / :meth:`detach` the forward
    hooks, :meth:`contribute` turns one call's output gradient into per-parameter contributions, and
    :meth:`squared_norms` returns ``{model parameter name: [B] float32}`` squared per-example norms of the
    gradients delivered since the last :meth:`reset`, unscaled (as autograd delivered them).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        forms: str | Mapping[str, str] | None = None,
        unsupported: str = "error",
        retain_signals: bool = False,
        hook_outputs: bool = True,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"regops: model must be a torch.nn.Module, got {type(model).__name__}")
        if unsupported not in ("error", "vmap"):
            raise ValueError(f"regops: unsupported must be 'error' or 'vmap', got {unsupported!r}")
        self.model = model
        self.retain_signals = retain_signals
        self.hook_outputs = hook_outputs
        # One backward per forward (the context manager) without clipping: a call's input is not needed after
        # its contribution. Several backward passes (per_sample_squared_norms) or Book-Keeping keep it.
        self.release_saved = hook_outputs and not retain_signals
        self.entries = self._discover(model, forms, unsupported)
        self.calls: list[_Call] = []
        self.batch: int | None = None
        self.results = _Results()
        self.use_count: dict[str, int] = {}
        self.handles: list[Any] = []
        self.active = False
        self.suspended = False

    # -- discovery
    @staticmethod
    def _discover(model: nn.Module, forms, unsupported: str) -> list[_Entry]:
        names = {id(p): n for n, p in model.named_parameters()}
        if isinstance(forms, str) or forms is None:
            default, per = forms or "auto", {}
        else:
            default, per = "auto", dict(forms)
        for f in [default, *per.values()]:
            if f not in FORMS:
                raise ValueError(f"regops: form must be one of {FORMS}, got {f!r}")
        entries, seen = [], set()
        for label, module in model.named_modules():
            if id(module) in seen:
                continue
            seen.add(id(module))
            own = {k: (names[id(p)], p) for k, p in module._parameters.items() if p is not None and p.requires_grad}
            if not own:
                continue
            layer = _layer_for(module)
            if layer is None:
                if unsupported == "vmap":
                    layer = _VMAP
                else:
                    raise ValueError(
                        f"regops: per-example gradient norms do not support module {label or '<root>'!r} "
                        f"({type(module).__name__}) with trainable parameters {sorted(own)}; supported: "
                        f"{SUPPORTED}. Freeze those parameters, or pass unsupported='vmap' to compute this "
                        "module's per-example gradients exactly with torch.func (valid when the module "
                        "treats the examples of a batch independently)."
                    )
            entries.append(_Entry(label, module, layer, own, per.pop(label, default)))
        if per:
            raise ValueError(f"regops: forms names unknown or parameter-free modules: {sorted(per)}")
        return entries

    # -- hooks
    def attach(self) -> None:
        self.active = True
        for entry in self.entries:
            self.handles.append(entry.module.register_forward_hook(self._forward_hook(entry), with_kwargs=True))

    def detach_forward(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def close(self) -> None:
        self.detach_forward()
        self.active = False

    def _forward_hook(self, entry: _Entry) -> Callable:
        def hook(module, args, kwargs, output):
            if self.suspended or not isinstance(output, torch.Tensor) or not output.requires_grad:
                return None
            saved = entry.layer.capture(module, args, kwargs, entry.label or "<root>")
            first = saved[0] if isinstance(saved, tuple) else saved
            batch = first.shape[0] if isinstance(first, torch.Tensor) else None
            if batch is not None and self.batch is not None and batch != self.batch:
                raise ValueError(
                    f"regops: {type(module).__name__} {entry.label!r} saw batch size {batch} but earlier "
                    f"layers saw {self.batch}; per-example gradients need dim 0 to be the batch in every "
                    "layer (no reshaping the batch into other dims), one batch per forward"
                )
            self.batch = batch if self.batch is None else self.batch
            call = _Call(entry, saved)
            self.calls.append(call)
            for name, _ in entry.params.values():
                self.use_count[name] = self.use_count.get(name, 0) + 1
            if self.hook_outputs:
                output.register_hook(self._grad_hook(call))
            else:
                call.output = output
            return None

        return hook

    def _grad_hook(self, call: _Call) -> Callable:
        def hook(grad):
            if self.active:
                self.contribute(call, grad)
            return None

        return hook

    # -- contributions
    def reset(self) -> None:
        self.results = _Results()
        for call in self.calls:
            call.fired = 0
            call.grad = None

    def contribute(self, call: _Call, grad: torch.Tensor) -> None:
        """Add one forward call's per-example contributions, given its output gradient."""
        if call.fired:
            raise RuntimeError(
                "regops: a recorded forward was backpropagated twice; per-example gradient norms take "
                "exactly one backward pass per forward inside the block"
            )
        call.fired += 1
        if self.retain_signals:
            call.grad = grad
        entry, res = call.entry, self.results
        shared = [n for n, _ in entry.params.values() if self.use_count.get(n, 0) > 1]
        if len(shared) < len(entry.params):
            form = entry.form
            if form == "auto":
                form = entry.layer.cost_form(entry.module, call.saved)
            self.suspended = True
            try:
                sq = entry.layer.sq_norms(entry.module, call.saved, grad, form)
            finally:
                self.suspended = False
            for local, value in sq.items():
                name = entry.params[local][0]
                if name not in shared:
                    res.sq[name] = value
        if shared:
            self.suspended = True
            try:
                grads = entry.layer.per_example_grads(entry.module, call.saved, grad)
            finally:
                self.suspended = False
            for local, value in grads.items():
                name = entry.params[local][0]
                if name in shared:
                    value = _f32(value)
                    res.dense[name] = value if name not in res.dense else res.dense[name] + value
        if self.release_saved:
            # Autograd frees its saved activations as the backward proceeds; so do we, or the peak grows.
            call.saved = None

    def squared_norms(self) -> dict[str, torch.Tensor]:
        out = dict(self.results.sq)
        for name, dense in self.results.dense.items():
            out[name] = _sq(dense)
        return out

    # -- Book-Keeping
    def weighted_grads(self, weights: Callable[[_Entry, str], torch.Tensor]) -> dict[str, torch.Tensor]:
        """``sum_n w_n g_n`` per parameter (``weights(entry, param name) -> [B]``) from the kept signals."""
        out: dict[str, torch.Tensor] = {}
        for call in self.calls:
            if call.grad is None:
                continue
            entry = call.entry
            # Per-layer clipping gives all parameters of a module the same weights; flat clipping one weight.
            w = weights(entry, next(iter(entry.params.values()))[0])
            self.suspended = True
            try:
                grads = entry.layer.weighted_grads(entry.module, call.saved, call.grad, w)
            finally:
                self.suspended = False
            for local, value in grads.items():
                name = entry.params[local][0]
                out[name] = value if name not in out else out[name] + value
        return out
