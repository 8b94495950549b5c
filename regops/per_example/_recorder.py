"""The recorder: sees every forward use of a tracked parameter and turns its output gradient into per-example
contributions.

Two ways in, one bookkeeping:

* modules with a registered rule (:mod:`regops.per_example._layers`): a forward hook captures what the rule
  needs and hooks the output's gradient;
* every other use of a tracked parameter (``F.linear(h, emb.weight)``, ``x @ W.T``, ``weight * h`` in an
  ``LlamaRMSNorm``, ``nn.MultiheadAttention``'s functional projections, ``cls_token.expand(B, ...)``) is
  seen by a ``TorchFunctionMode`` active during the block (:mod:`regops.per_example._functional`), which
  records it as a call of the matching rule, or raises naming the parameter when it cannot be exact.

A call belongs to the micro-batch of the model's forward it ran in (gradient accumulation: several forwards
in one block). A parameter used by several calls of one micro-batch (tied or reused weights) gets the norm of
the summed gradient: by factored inner products when the rules give factors, else from per-example grads.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from regops._core.validate import is_dtensor
from regops.per_example._calls import _Call, _Entry, _MicroBatch
from regops.per_example._functional import ParamUseMode
from regops.per_example._layers import _VMAP, VmapSaved
from regops.per_example._rules import Factors, LayerRule, OneHot, _f32, _sq, factors_inner, rule_for

FORMS = ("auto", "ghost", "instantiate")


LOSS_REDUCTIONS = ("sum", "mean")


_REDUCTION_HELP = (
    "regops: say how your loss combines the examples: loss_reduction='sum' (loss = sum_n loss_n) or 'mean' "
    "(loss = mean over the batch: F.cross_entropy's default); per-example gradients and their norms are rescaled "
    "accordingly"
)


def check_reduction(loss_reduction: Any) -> str:
    """``loss_reduction`` is required wherever per-example gradients are taken from a batch loss: a default would
    silently scale every per-example gradient by the batch size when it is wrong."""
    if loss_reduction is None:
        raise TypeError(_REDUCTION_HELP)
    if loss_reduction not in LOSS_REDUCTIONS:
        raise ValueError(f"regops: loss_reduction must be 'sum' or 'mean', got {loss_reduction!r}")
    return loss_reduction


class _Tap(torch.autograd.Function):
    """Identity on several tensors whose backward hands all their gradients to one callback at once."""

    @staticmethod
    def forward(ctx, fn, *xs):
        ctx.fn = fn
        return tuple(x.view_as(x) for x in xs)

    @staticmethod
    def backward(ctx, *grads):
        ctx.fn(grads)
        return (None, *grads)


def _check_not_empty(n: int, label: str, bd: int) -> None:
    if n == 0:
        raise ValueError(
            f"regops: the batch is empty: layer {label!r} got 0 examples in dim {bd}, and there are no per-example "
            "gradients to take. Skip the forward and backward of an empty batch (dp_clipping: run its block with no "
            "forward, so the step adds only the noise)"
        )


class _Recorder:
    """Records the forward uses of the tracked parameters and turns output gradients into per-example squared
    norms and weighted gradient sums.

    This is the reusable core (also used by the Hessian family): :meth:`attach` / :meth:`detach_forward`,
    :meth:`contribute` turns one call's output gradient into contributions, :meth:`squared_norms` returns one
    ``{model parameter name: [B_k] squared norms}`` per micro-batch, unscaled (as autograd delivered them).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        forms: str | Mapping[str, str] | None = None,
        unsupported: str = "error",
        retain_signals: bool = False,
        hook_outputs: bool = True,
        batch_dim: int = 0,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"regops: model must be a torch.nn.Module, got {type(model).__name__}")
        if unsupported not in ("error", "vmap"):
            raise ValueError(f"regops: unsupported must be 'error' or 'vmap', got {unsupported!r}")
        if isinstance(batch_dim, bool) or batch_dim not in (0, 1):
            raise ValueError(f"regops: batch_dim must be 0 (batch first) or 1 (sequence first), got {batch_dim!r}")
        self.model = model
        self.batch_dim = batch_dim
        self.retain_signals = retain_signals
        self.hook_outputs = hook_outputs
        # One backward per forward without clipping: a call's input is not needed after its contribution.
        self.release_saved = hook_outputs and not retain_signals
        self.params: dict[str, nn.Parameter] = {}
        self.param_names: dict[int, str] = {}
        self.owner: dict[int, str] = {}  # id(param) -> label of the module holding it
        for label, module in model.named_modules(remove_duplicate=True):
            for p in module._parameters.values():
                if p is not None and p.requires_grad and id(p) not in self.owner:
                    self.owner[id(p)] = label
        for name, p in model.named_parameters():
            if p.requires_grad:
                self.params[name] = p
                self.param_names[id(p)] = name
        self.forms_default, self.forms_per = self._parse_forms(forms)
        self.entries = self._discover(model, unsupported)
        self.functional_entries: dict[tuple, _Entry] = {}
        self.calls: list[_Call] = []
        self.mbs: list[_MicroBatch] = []
        self.handles: list[Any] = []
        self.active: dict[int, int] = {}  # id(param) -> depth of running modules whose rule covers it
        self.active_module: dict[int, int] = {}
        self.in_root = 0
        self.enabled = False  # contributions accepted
        self.suspended = False
        self.mode: Any = None

    # -- discovery
    @staticmethod
    def _parse_forms(forms) -> tuple[str, dict[str, str]]:
        if isinstance(forms, str) or forms is None:
            default, per = forms or "auto", {}
        else:
            default, per = "auto", dict(forms)
        for f in [default, *per.values()]:
            if f not in FORMS:
                raise ValueError(f"regops: form must be one of {FORMS}, got {f!r}")
        return default, per

    def _discover(self, model: nn.Module, unsupported: str) -> list[_Entry]:
        per = dict(self.forms_per)
        entries, seen = [], set()
        for label, module in model.named_modules():
            if id(module) in seen:
                continue
            seen.add(id(module))
            own = {
                k: (self.param_names[id(p)], p)
                for k, p in module._parameters.items()
                if p is not None and p.requires_grad
            }
            layer = rule_for(module)
            if isinstance(module, nn.MultiheadAttention) and module.batch_first != (self.batch_dim == 0):
                # Its layout is known: a sequence-first model read batch-first would be silently wrong
                # whenever the sequence length equals the batch size.
                raise ValueError(
                    f"regops: nn.MultiheadAttention {label!r} has batch_first={module.batch_first} but "
                    f"batch_dim={self.batch_dim}: pass batch_dim={0 if module.batch_first else 1} (the batch dim "
                    "of the model's 3-D activations)"
                )
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and layer is None:
                raise ValueError(
                    f"regops: {type(module).__name__} {label!r} (a BatchNorm with its own forward) couples "
                    "examples in train mode; replace it (regops.fix_model) or register a rule for it"
                )
            if not own and layer is None:
                continue
            if layer is None:
                if unsupported != "vmap":
                    continue  # its parameters' uses are seen op by op (functional.py)
                layer = _VMAP
            entries.append(_Entry(label, module, layer, own, per.pop(label, self.forms_default)))
        unknown = set(per) - {label for label, _ in model.named_modules()}
        if unknown:
            raise ValueError(f"regops: forms names unknown modules: {sorted(unknown)}")
        self.forms_per = {k: v for k, v in self.forms_per.items() if k not in per}
        return entries

    # -- hooks
    def attach(self) -> None:
        self.enabled = True
        self.handles.append(self.model.register_forward_pre_hook(self._root_pre_hook))
        self.handles.append(self.model.register_forward_hook(self._root_post_hook))
        for entry in self.entries:
            self.handles.append(entry.module.register_forward_pre_hook(self._pre_hook(entry)))
            self.handles.append(entry.module.register_forward_hook(self._forward_hook(entry), with_kwargs=True))
        self.mode = ParamUseMode(self)
        self.mode.__enter__()

    def detach_forward(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        if self.mode is not None:
            mode, self.mode = self.mode, None
            mode.__exit__(None, None, None)
        self.active.clear()
        self.active_module.clear()

    def close(self) -> None:
        self.detach_forward()
        self.enabled = False

    def _root_pre_hook(self, module, args):
        if self.in_root == 0:
            self.mbs.append(_MicroBatch())
            self.active.clear()
            self.active_module.clear()
        self.in_root += 1

    def _root_post_hook(self, module, args, output):
        self.in_root -= 1

    def current_mb(self) -> int:
        if not self.mbs:  # a tracked submodule called directly, outside the model's forward
            self.mbs.append(_MicroBatch())
        return len(self.mbs) - 1

    def covered(self, p: torch.Tensor) -> bool:
        return self.active.get(id(p), 0) > 0

    def _pre_hook(self, entry: _Entry) -> Callable:
        def hook(module, args):
            self.active_module[id(module)] = self.active_module.get(id(module), 0) + 1
            for _, p in entry.params.values():
                self.active[id(p)] = self.active.get(id(p), 0) + 1

        return hook

    def _forward_hook(self, entry: _Entry) -> Callable:
        def hook(module, args, kwargs, output):
            self.active_module[id(module)] = self.active_module.get(id(module), 1) - 1
            for _, p in entry.params.values():
                self.active[id(p)] = self.active.get(id(p), 1) - 1
            if self.suspended or not torch.is_grad_enabled():
                return None
            label = entry.label or "<root>"
            if entry.layer is _VMAP:
                return self._record_vmap(entry, args, kwargs, output)
            if not isinstance(output, torch.Tensor) or not output.requires_grad:
                return None
            saved = entry.layer.capture(module, args, kwargs, label)
            return self.record(entry, saved, output, label)

        return hook

    def layer_batch_dim(self, layer: LayerRule, output: torch.Tensor) -> int:
        """Torch's layouts: sequence tensors (3+ dims) of token layers follow ``batch_dim``; 2-D tensors and
        convolution / group / batch norm inputs have the batch first."""
        if self.batch_dim and getattr(layer, "seq_layout", True) and output.dim() >= 3:
            return self.batch_dim
        return 0

    def record(
        self,
        entry: _Entry,
        saved: Any,
        output: torch.Tensor,
        label: str,
        batch_dim: int | None = None,
        rows: tuple[int, int] | None = None,
    ) -> torch.Tensor | None:
        """Register one call whose output gradient gives the contributions; returns a replacement output
        when the call's batch of 1 broadcasts over the batch (a shared position embedding)."""
        mb_index = self.current_mb()
        mb = self.mbs[mb_index]
        bd = self.layer_batch_dim(entry.layer, output) if batch_dim is None else batch_dim
        if rows is not None:
            n = rows[1]
        elif output.dim() <= bd:
            raise ValueError(
                f"regops: {label!r} produced an output of shape {tuple(output.shape)} with no batch dimension "
                f"{bd}; per-example gradients need every tracked parameter's use to keep the batch"
            )
        else:
            n = output.shape[bd]
        _check_not_empty(n, label, bd)
        replaced = None
        if mb.batch is not None and n != mb.batch:
            if n == 1 and mb.batch > 1 and rows is None:
                # position ids [1, T] broadcast over the batch: give each example its own copy of the output, so
                # that its gradient arrives per example instead of summed over the batch
                shape = list(output.shape)
                shape[bd] = mb.batch
                replaced = output.expand(shape)
                saved = _expand_batch(saved, bd, mb.batch)
                output = replaced
            else:
                raise ValueError(
                    f"regops: {label!r} saw batch size {n} but earlier layers saw {mb.batch}; per-example "
                    f"gradients need the batch in dim {bd} of every layer (no reshaping the batch into other "
                    "dims; pass batch_dim=1 for sequence-first models), one batch per forward"
                )
        mb.batch = n if mb.batch is None else mb.batch
        if bd and rows is None:
            saved = _move_batch(saved, bd)
        call = _Call(entry, saved, mb_index, bd, rows)
        self.calls.append(call)
        for name, _ in entry.params.values():
            mb.use_count[name] = mb.use_count.get(name, 0) + 1
        if self.hook_outputs:
            output.register_hook(self._grad_hook(call))
        else:
            call.output = output
        return replaced

    def _record_vmap(self, entry: _Entry, args, kwargs, output):
        leaves, spec = pytree.tree_flatten(output)
        tensor_idx = [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor) and x.requires_grad]
        if not tensor_idx:
            return None
        mb_index = self.current_mb()
        mb = self.mbs[mb_index]
        first = leaves[tensor_idx[0]]
        bd = self.batch_dim if (self.batch_dim and first.dim() >= 3) else 0
        n = first.shape[bd] if first.dim() > bd else None
        if n is None or (mb.batch is not None and n != mb.batch):
            raise ValueError(
                f"regops: {entry.label!r} ({type(entry.module).__name__}) returned shape {tuple(first.shape)}: "
                f"no batch of size {mb.batch} in dim {bd}"
            )
        _check_not_empty(n, entry.label, bd)
        mb.batch = n
        call = _Call(entry, VmapSaved(args, dict(kwargs), bd, n), mb_index, bd)
        self.calls.append(call)
        for name, _ in entry.params.values():
            mb.use_count[name] = mb.use_count.get(name, 0) + 1
        zero_like = {i: leaves[i] for i, x in enumerate(leaves) if isinstance(x, torch.Tensor) and i not in tensor_idx}

        def on_grads(grads):
            full = list(leaves)
            for i, g in zip(tensor_idx, grads, strict=True):
                full[i] = g
            for i, x in zero_like.items():
                full[i] = torch.zeros_like(x)
            if self.enabled:
                self.contribute(call, pytree.tree_unflatten(full, spec))

        tapped = _Tap.apply(on_grads, *[leaves[i] for i in tensor_idx])
        new = list(leaves)
        for i, t in zip(tensor_idx, tapped, strict=True):
            new[i] = t
        return pytree.tree_unflatten(new, spec)

    def _grad_hook(self, call: _Call) -> Callable:
        def hook(grad):
            if self.enabled:
                self.contribute(call, grad)
            return None

        return hook

    # -- contributions
    @contextlib.contextmanager
    def quiet(self, device_type: str = "cpu"):
        """Our own computations: not seen by the mode, not autocast (a backward inside autocast would run our
        matmuls in bf16)."""
        prev = self.suspended
        self.suspended = True
        try:
            with torch.autocast(device_type, enabled=False):
                yield
        finally:
            self.suspended = prev

    def reset(self) -> None:
        for mb in self.mbs:
            mb.sq.clear()
            mb.shared.clear()
        for call in self.calls:
            call.fired = 0
            call.grad = None

    def batch_first(self, call: _Call, grad: Any) -> Any:
        if call.entry.layer is _VMAP:
            return grad
        if call.rows is not None:
            t, b = call.rows
            grad = grad.reshape(t, b, *grad.shape[1:])
        if call.batch_dim:
            grad = grad.movedim(call.batch_dim, 0)
        return grad

    def contribute(self, call: _Call, grad: Any) -> None:
        """Add one call's per-example contributions, given its output gradient (as autograd delivers it)."""
        if call.fired:
            raise RuntimeError(
                "regops: a recorded forward was backpropagated twice; per-example gradient norms take "
                "exactly one backward pass per forward inside the block"
            )
        call.fired += 1
        g = self.batch_first(call, grad)
        if isinstance(g, torch.Tensor) and not g.is_contiguous():
            # (a transposed logits gradient, a sequence-first layout): copy once here rather than in every
            # reshape of the rule's forms, factors and weighted sums
            g = g.contiguous()
        if self.retain_signals:
            call.grad = g
        entry, mb = call.entry, self.mbs[call.mb]
        device = next(iter(entry.params.values()))[1].device.type if entry.params else "cpu"
        shared = {local for local, (n, _) in entry.params.items() if mb.use_count.get(n, 0) > 1}
        with self.quiet(device):
            form = entry.form
            if form == "auto":
                form = entry.layer.cost_form(entry.module, call.saved)
            if is_dtensor(call.saved):  # tensor parallelism: partial norms of the shards, all-reduced
                from regops.per_example import dtensor

                sq = dtensor.tp_sq_norms(entry, call.saved, g, form, bool(shared))
            else:
                sq = entry.layer.sq_norms(entry.module, call.saved, g, form)
            facs = entry.layer.factors(entry.module, call.saved, g) if shared else {}
            dense = None
            if any(local not in facs for local in shared):
                dense = entry.layer.per_example_grads(entry.module, call.saved, g)
        for local, value in sq.items():
            name = entry.params[local][0]
            if local not in shared:
                mb.sq[name] = value
            elif local in facs:
                mb.shared.setdefault(name, []).append(("f", value, facs[local]))
        if dense is not None:
            for local in shared:
                if local not in facs and local in dense:
                    mb.shared.setdefault(entry.params[local][0], []).append(("d", _f32(dense[local]), None))
        if self.release_saved and not shared:
            # Autograd frees its saved activations as the backward proceeds; so do we, or the peak grows.
            call.saved = None

    def squared_norms(self) -> list[dict[str, torch.Tensor]]:
        """One ``{name: [B_k]}`` per micro-batch: squared norms of the summed per-example gradients."""
        out = []
        with self.quiet():
            for mb in self.mbs:
                res = dict(mb.sq)
                for name, items in mb.shared.items():
                    res[name] = _shared_sq(items)
                out.append(res)
        return out

    # -- Book-Keeping
    def weighted_grads(self, weights: Callable[[_Call, str], torch.Tensor]) -> dict[str, torch.Tensor]:
        """``sum_n w_n g_n`` per parameter (``weights(call, model param name) -> [B_k]``) from the kept
        signals of every call (all micro-batches)."""
        out: dict[str, torch.Tensor] = {}
        for call in self.calls:
            if call.grad is None:
                continue
            entry = call.entry
            groups: dict[int, tuple[torch.Tensor, list[str]]] = {}
            for local, (name, _) in entry.params.items():
                w = weights(call, name)
                groups.setdefault(id(w), (w, []))[1].append(local)
            for w, locals_ in groups.values():
                with self.quiet(w.device.type):
                    grads = entry.layer.weighted_grads(entry.module, call.saved, call.grad, w)
                for local in locals_:
                    if local in grads:
                        name = entry.params[local][0]
                        out[name] = grads[local] if name not in out else out[name] + grads[local]
        return out


def _shared_sq(items: list[tuple[str, Any, Any]]) -> torch.Tensor:
    """``||sum_i grad_i||^2`` per example from the calls' items: factored inner products when every call has
    factors, else the summed per-example gradients."""
    if all(kind == "f" for kind, _, _ in items):
        total = sum(sq for _, sq, _ in items)
        dtype = total.dtype
        for i in range(len(items)):
            for j in range(i):
                total = total + 2 * factors_inner(items[i][2], items[j][2], dtype)
        return total
    dense = None
    for kind, value, f in items:
        g = _factors_dense(f) if kind == "f" else value
        dense = g if dense is None else dense + g
    return _sq(dense)


def _factors_dense(f: Factors) -> torch.Tensor:
    """``U^T V`` per example, ``[B, p, d]``."""
    v = _f32(f.v)
    if isinstance(f.u, OneHot):
        out = v.new_zeros(v.shape[0], f.u.num, v.shape[-1])
        if f.u.pad >= 0:
            v = v * (f.u.ids != f.u.pad).to(v.dtype)[..., None]
        return out.scatter_add_(1, f.u.ids[..., None].expand_as(v), v)
    u = _f32(f.u)
    if u.dtype != v.dtype:
        u, v = u.double(), v.double()
    return torch.bmm(u.transpose(1, 2), v)


def _move_batch(saved: Any, bd: int) -> Any:
    if isinstance(saved, torch.Tensor):
        return saved.movedim(bd, 0) if saved.dim() > bd else saved
    if isinstance(saved, tuple) and saved and isinstance(saved[0], torch.Tensor):
        return (_move_batch(saved[0], bd), *saved[1:])
    return saved


def _expand_batch(saved: Any, bd: int, batch: int) -> Any:
    if isinstance(saved, torch.Tensor):
        if saved.dim() > bd and saved.shape[bd] == 1:
            shape = list(saved.shape)
            shape[bd] = batch
            return saved.expand(shape)
        return saved
    if isinstance(saved, tuple) and saved and isinstance(saved[0], torch.Tensor):
        return (_expand_batch(saved[0], bd, batch), *saved[1:])
    return saved
