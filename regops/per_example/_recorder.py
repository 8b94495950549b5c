"""The recorder: records every forward use of the tracked parameters and turns output gradients into per-example
squared norms and weighted gradient sums.

Ways in, one bookkeeping:

* modules with a registered rule (:mod:`regops.per_example._layers`): forward hooks keep the layer's input and hook
  its output's gradient; the examples' place in both is the tracker's (:mod:`regops.per_example._tracker`);
* every other use of a tracked parameter is seen op by op by the tracker and recorded here as a rule call, a
  broadcast (the per-example gradient of a tensor computed from parameters, carried back to them) or an op run
  through ``vmap``;
* a micro-batch with a use the tracker cannot attribute runs through ``torch.func`` as a whole
  (:mod:`regops.per_example._whole`).

A call belongs to the micro-batch of the model's forward it ran in (gradient accumulation: several forwards in one
block). A parameter used several times in one micro-batch (tied or reused weights, slices of one weight) gets the
norm of its summed gradient: by factored inner products, as a sum over disjoint slices, or from per-example
gradients.
"""

from __future__ import annotations

import contextlib
import sys
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from regops.per_example import _contrib, _whole
from regops.per_example import _layout as L
from regops.per_example import _recipes as R
from regops.per_example._calls import _Call, _Entry, _MicroBatch, _Use
from regops.per_example._layout import Layout
from regops.per_example._rules import rule_for
from regops.per_example._tracker import Tracker, function_name
from regops.per_example._vmap import VMAP

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


def _check_not_empty(n: int, label: str) -> None:
    if n == 0:
        raise ValueError(
            f"regops: the batch is empty: {label!r} got 0 examples, and there are no per-example gradients to "
            "take. Skip the forward and backward of an empty batch (a dp_clipping block takes it: the step adds "
            "only the noise)"
        )


class _Sink(R.Sink):
    """Where the per-example gradients carried back from a tensor computed from parameters go: micro-batch
    ``index``'s per-example gradients, or a call of the rule of a layer applied to constants."""

    def __init__(self, rec: _Recorder, index: int) -> None:
        self.rec, self.index = rec, index

    def dense(self, name: str, param: nn.Parameter, grads: torch.Tensor) -> None:
        mb = self.rec.mbs[self.index]
        mb.dense.setdefault(name, []).append(grads)
        if self.rec.retain_signals:
            mb.pushed.setdefault(name, []).append(grads)

    def rule(self, node: R.RuleNode, grads: torch.Tensor) -> None:
        call = _Call(node.entry, _expand_examples(node.saved, grads.shape[0]), self.index)
        self.rec.derived.append(call)
        self.rec.contribute(call, grads)


class _Recorder:
    """Records the forward uses of the tracked parameters and turns output gradients into per-example squared norms
    and weighted gradient sums: :meth:`attach` / :meth:`detach_forward`, :meth:`contribute` (one call's output
    gradient), :meth:`squared_norms` (one ``{parameter name: [B_k]}`` per micro-batch, unscaled)."""

    def __init__(
        self,
        model: nn.Module,
        *,
        forms: str | Mapping[str, str] | None = None,
        unsupported: str = "error",
        retain_signals: bool = False,
        hook_outputs: bool = True,
        batch_dim: int = 0,
        norms: bool = True,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"regops: model must be a torch.nn.Module, got {type(model).__name__}")
        if unsupported not in ("error", "vmap"):
            raise ValueError(f"regops: unsupported must be 'error' or 'vmap', got {unsupported!r}")
        if isinstance(batch_dim, bool) or not isinstance(batch_dim, int) or batch_dim < 0:
            raise ValueError(f"regops: batch_dim must be an int >= 0 (the inputs' batch dim), got {batch_dim!r}")
        self.model = model
        self.batch_dim = batch_dim
        self.retain_signals = retain_signals
        self.hook_outputs = hook_outputs
        self.norms = norms
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
        # (module, attribute) -> parameter name: FSDP2 puts other tensors (its unsharded parameters) in these
        # slots while a module runs; see `_adopt`.
        self.slots = {
            (id(module), k): self.param_names[id(p)]
            for module in model.modules()
            for k, p in module._parameters.items()
            if p is not None and id(p) in self.param_names
        }
        self.forms_default, self.forms_per = self._parse_forms(forms)
        self.entries = self._discover(model, unsupported)
        self.functional_entries: dict[tuple, _Entry] = {}
        self.calls: list[_Call] = []
        self.derived: list[_Call] = []  # rule calls of layers applied to constants, made in the backward
        self.mbs: list[_MicroBatch] = []
        self.handles: list[Any] = []
        self.watched: list[tuple[torch.Tensor, Callable]] = []  # (tensor, callback) when not hooking outputs
        # The gradient edges of the hooked tensors, when a list: a backward to them alone fires every hook without
        # computing the parameters' gradients.
        self.edges: list[Any] | None = None
        self.active: dict[int, int] = {}  # id(param) -> depth of running modules whose rule covers it
        self.modes: list[str] = []
        self.in_root = 0
        self.enabled = False  # contributions accepted
        self.suspended = False
        # dp_clipping: a forward of an empty batch runs unrecorded (it adds no examples; under FSDP2 every rank
        # must still run its forward and backward), `empty_forward` while it runs
        self.allow_empty = False
        self.empty_forward = False
        self.tracker: Tracker | None = None
        self.dtensor_ctx: Any = None

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
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and layer is None:
                raise ValueError(
                    f"regops: {type(module).__name__} {label!r} (a BatchNorm with its own forward) couples "
                    "examples in train mode; replace it (regops.fix_model) or register a rule for it"
                )
            if not own and layer is None:
                continue
            if layer is None:
                if unsupported != "vmap" or isinstance(module, (nn.RNNBase,)):
                    continue  # its parameters' uses are seen op by op (the tracker)
                layer = VMAP
            entries.append(_Entry(label, module, layer, own, per.pop(label, self.forms_default)))
        unknown = set(per) - {label for label, _ in model.named_modules()}
        if unknown:
            raise ValueError(f"regops: forms names unknown modules: {sorted(unknown)}")
        return entries

    def form_of(self, label: str) -> str:
        return self.forms_per.get(label, self.forms_default)

    # -- hooks
    def attach(self) -> None:
        self.enabled = True
        self.tracker = Tracker(self)
        model = self.model
        self.handles.append(model.register_forward_pre_hook(self._root_pre_hook, with_kwargs=True))
        self.handles.append(model.register_forward_hook(self._root_post_hook, with_kwargs=True))
        for entry in self.entries:
            self.handles.append(entry.module.register_forward_pre_hook(self._pre_hook(entry), with_kwargs=True))
            self.handles.append(entry.module.register_forward_hook(self._forward_hook(entry), with_kwargs=True))
        self.tracker.__enter__()
        fsdp = sys.modules.get("torch.distributed.fsdp")  # a model can be sharded only once that is imported
        for module in model.modules() if fsdp is not None else ():
            if isinstance(module, fsdp.FSDPModule):  # after FSDP2's own pre-forward hook, which unshards
                self.handles.append(module.register_forward_pre_hook(self._adopt))
        if "torch.distributed.tensor" in sys.modules:  # a tensor can be a DTensor only once that is imported
            from regops.per_example import dtensor

            self.dtensor_ctx = dtensor.carrying(self.tracker)
            self.dtensor_ctx.__enter__()

    def detach_forward(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        if self.dtensor_ctx is not None:
            ctx, self.dtensor_ctx = self.dtensor_ctx, None
            ctx.__exit__(None, None, None)
        if self.tracker is not None:
            tracker, self.tracker = self.tracker, None
            tracker.__exit__(None, None, None)
        self.active.clear()

    def _adopt(self, module: nn.Module, _args: tuple) -> None:
        """FSDP2 runs a module on unsharded parameters that it puts in the module's slots: each is seen as the
        parameter of its slot (by every rule and by the tracker), so modules whose ops the tracker reads one by one
        (``nn.MultiheadAttention``, functional calls) work on a sharded model."""
        for sub in module.modules():
            for k, p in sub._parameters.items():
                name = self.slots.get((id(sub), k))
                if name is None or p is None or id(p) in self.param_names:
                    continue
                self.param_names[id(p)] = name
                self.owner[id(p)] = self.owner[id(self.params[name])]
                self.tracker.adopt(name, p)

    def close(self) -> None:
        self.detach_forward()
        self.enabled = False

    def _begin(self, module: nn.Module, args: tuple, kwargs: dict) -> bool:
        """A forward of the model (or of a tracked module called on its own): a new micro-batch whose examples are
        the inputs' ``batch_dim``. False for an empty batch of the model that `allow_empty` lets run unrecorded."""
        batch = self.tracker.tag_inputs((args, kwargs), self.batch_dim)
        if batch is None:
            raise ValueError(
                f"regops: {type(module).__name__} was called with no tensor input with a batch dim "
                f"{self.batch_dim}; per-example gradients need the examples in the inputs' batch_dim"
            )
        if batch == 0 and self.allow_empty and module is self.model:
            return False
        _check_not_empty(batch, type(module).__name__)
        mb = _MicroBatch()
        self.mbs.append(mb)
        self.active.clear()
        mb.batch = batch
        mb.inputs = (args, kwargs)
        return True

    def _root_pre_hook(self, module, args, kwargs):
        if self.suspended:
            return None
        if self.in_root == 0:
            with torch._C.DisableTorchFunction():  # bookkeeping: shapes and tags, no op for the tracker
                begun = self._begin(module, args, kwargs)
            if not begun:
                self.suspended = self.empty_forward = True
                return None
        self.in_root += 1
        return None

    def _root_post_hook(self, module, args, kwargs, output):
        if self.empty_forward:
            self.suspended = self.empty_forward = False
            return None
        if self.suspended:
            return None
        self.in_root -= 1
        mb = self.mbs[-1]
        if self.in_root == 0 and torch.is_grad_enabled():
            with torch._C.DisableTorchFunction():  # a walk over the graph, no op for the tracker
                unseen = self.tracker.unseen(output)
            for fn, names in unseen:
                function = function_name(fn)
                mb.fallback.append(
                    (sorted(names), f"passed to the torch.autograd.Function {function} (run without autograd)")
                )
                self.tracker.seen_fns.add(fn)  # the torch.func path accounts for it
            if mb.fallback:
                return _whole.tap(self, mb, module, output)
        return None

    def current_mb(self) -> int:
        return len(self.mbs) - 1

    def covered(self, p: torch.Tensor) -> bool:
        return self.active.get(id(p), 0) > 0

    def _pre_hook(self, entry: _Entry) -> Callable:
        def hook(module, args, kwargs):
            if self.suspended:
                return None
            with torch._C.DisableTorchFunction():  # bookkeeping: shapes and tags, no op for the tracker
                if self.in_root == 0 and module is not self.model and not self.modes:
                    self._begin(module, args, kwargs)
                mode = self._mode(entry, args, kwargs)
            self.modes.append(mode)
            if mode != "open":
                for p in entry.held():
                    self.active[id(p)] = self.active.get(id(p), 0) + 1
            return None

        return hook

    def _mode(self, entry: _Entry, args: tuple, kwargs: dict) -> str:
        """``call`` (the input carries examples the rule can read), ``node`` (constant input: the output is a
        tensor computed from parameters), ``open`` (the tracker sees the module's ops one by one)."""
        if entry.layer is VMAP:
            return "call"
        x = args[0] if args else next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)
        if not isinstance(x, torch.Tensor) or not torch.is_grad_enabled():
            return "open"
        tag = self.tracker.tag(x)
        if tag is None:
            return "node"
        if isinstance(tag, Layout) and (not entry.layer.rows or tag.dim == 0):
            return "call"
        return "open"

    def _forward_hook(self, entry: _Entry) -> Callable:
        def hook(module, args, kwargs, output):
            if self.suspended:
                return None
            mode = self.modes.pop()
            if mode != "open":
                for p in entry.held():
                    self.active[id(p)] = self.active.get(id(p), 1) - 1
            if not torch.is_grad_enabled() or mode == "open":
                return None
            if entry.layer is VMAP:
                self.tracker.mark_seen(output, (args, kwargs))
                return self._record_vmap(entry, args, kwargs, output)
            with torch._C.DisableTorchFunction():  # bookkeeping: graph, shapes and tags, no op for the tracker
                return self._record_call(entry, module, args, kwargs, output, mode)

        return hook

    def _record_call(self, entry: _Entry, module: nn.Module, args: tuple, kwargs: dict, output: Any, mode: str):
        """A module's forward whose rule takes the call: its input and output gradient are recorded."""
        self.tracker.mark_seen(output, (args, kwargs))  # the rule accounts for whatever the module does inside
        if not isinstance(output, torch.Tensor) or not output.requires_grad:
            return None
        label = entry.label or "<root>"
        saved = entry.layer.capture(module, args, kwargs, label)
        if mode == "node":
            self.tracker.set_tag(output, R.RuleNode(entry, saved))
            return None
        x = args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
        lay_in, lay_out = self.tracker.tag(x), self.tracker.tag(output)
        if not isinstance(lay_out, Layout):
            how = f"in {type(module).__name__} {label!r}, whose output's examples are not where its input's are"
            self.fallback([name for name, _ in entry.params.values()], how)
            return None
        self._record(entry, saved, output, lay_in, lay_out, {})
        return None

    # -- recording
    def record_use(self, rule, op: str, ns: Any, links: dict, saved: Any, lay_in, output, lay_out) -> _Call | None:
        """A functional use of parameters (or tensors computed from them) by a rule's op."""
        direct = {k: v for k, v in vars(ns).items() if isinstance(v, nn.Parameter) and id(v) in self.param_names}
        links = {k: v for k, v in links.items() if v is not None}
        key = (id(rule), op, *((k, id(v)) for k, v in sorted(direct.items())), *sorted(links))
        entry = self.functional_entries.get(key) if not links else None
        if entry is None:
            names = {k: (self.param_names[id(v)], v) for k, v in direct.items()}
            shown = [n for n, _ in names.values()] + [f"<{sorted(n.params)}>" for n in links.values()]
            label = f"{op}({', '.join(shown)})"
            entry = _Entry(label, ns, rule, names, self.forms_default, functional=True)
            if not links:
                self.functional_entries[key] = entry
        else:
            entry.module = ns
        return self._record(entry, saved, output, lay_in, lay_out, links)

    def _record(self, entry, saved, output, lay_in, lay_out, links) -> _Call:
        mb_index = self.current_mb()
        if mb_index < 0:
            raise ValueError(f"regops: {entry.label!r} ran outside a forward of the model")
        mb = self.mbs[mb_index]
        plain_in = isinstance(lay_in, Layout) and lay_in.plain and lay_in.dim == 0
        plain_out = lay_out is None or (lay_out.plain and lay_out.dim == 0)
        call = _Call(entry, saved, mb_index, None if plain_in else lay_in, None if plain_out else lay_out, links)
        call.rows = entry.layer.rows and not (plain_in and plain_out)
        self.calls.append(call)
        for local, (name, _) in entry.params.items():
            mb.uses.setdefault(name, []).append(_Use(local in entry.layer.factored, None))
        for node in links.values():
            reg = R.region(node)
            for name in node.params:
                mb.uses.setdefault(name, []).append(_Use(False, reg))
        if output is not None:
            self.watch(output, lambda rec, g, call=call: rec.contribute(call, g))
        return call

    def watch(self, t: torch.Tensor, callback: Callable) -> None:
        """``callback(recorder, grad)`` with ``t``'s gradient. The hook holds the recorder weakly: the recorder keeps
        layer inputs that are other layers' hooked outputs, and a strong reference back from a tensor's hook (which
        Python's collector cannot see through) would keep every step's recorder and activations alive."""
        if self.hook_outputs:
            ref = weakref.ref(self)

            def hook(g):
                rec = ref()
                if rec is not None and rec.enabled:
                    callback(rec, g)

            t.register_hook(hook)
            if self.edges is not None:
                self.edges.append(torch.autograd.graph.get_gradient_edge(t))
        else:
            self.watched.append((t, callback))

    def record_broadcast(self, node: R.Node, t: torch.Tensor, tap: torch.Tensor, layout: Layout, broadcast: bool,
                         op: str) -> None:  # fmt: skip
        """A tensor computed from parameters, passed to ``op`` as ``tap`` (``t`` expanded along the examples' dim,
        or ``t`` itself where it already has a row per position): ``tap``'s gradient, summed per example, is the
        per-example gradient of ``t``."""
        index = self.current_mb()
        self._node_uses(self.mbs[index], node)
        shape = tuple(t.shape)

        def on_grad(rec, g):
            rec._broadcast_grad(index, node, shape, g, layout, broadcast)

        self.watch(tap, on_grad)

    def _broadcast_grad(self, index, node, shape, g, layout, broadcast) -> None:
        mb = self.mbs[index]
        if mb.fallback:
            return
        with self.quiet(g.device.type):
            g = g.detach()
            if broadcast:
                per = L.per_example_sum(g, layout).unsqueeze(layout.dim + 1)  # [B, *tap with a 1 at the dim]
            else:
                onehot = torch.nn.functional.one_hot(layout.example_index(g.device), layout.batch).to(g.dtype).T
                view = [layout.batch] + [1] * g.dim()
                view[layout.dim + 1] = layout.size
                per = g.unsqueeze(0) * onehot.reshape(view)
            per = per.reshape(layout.batch, *shape)
            R.pushback(node, per, _Sink(self, index))

    def record_op(self, func, args, kwargs, xs, nodes, out, layout, op: str) -> None:
        """Any op on examples in plain dims and nodes: per-example gradients of the nodes by ``vmap`` of its ``vjp``."""
        index = self.current_mb()
        for _, _, node in nodes:
            self._node_uses(self.mbs[index], node)

        def on_grad(rec, g):
            if rec.mbs[index].fallback:
                return
            with rec.quiet(g.device.type):
                for node, per in _whole.op_grads(func, args, kwargs, xs, nodes, layout, g.detach()):
                    R.pushback(node, per, _Sink(rec, index))

        self.watch(out, on_grad)

    def fallback(self, names: Any, how: str) -> None:
        """A use of parameters ``names`` the fast path cannot attribute: this micro-batch goes through torch.func as a
        whole."""
        names = sorted(set(names))
        if self.in_root == 0:
            raise ValueError(
                f"regops: parameter(s) {names} {how}, outside the model's forward: regops cannot attribute this use "
                "per example, and dropping it would give wrong norms"
            )
        self.mbs[-1].fallback.append((names, how))

    def _node_uses(self, mb: _MicroBatch, node: R.Node) -> None:
        """The uses a tensor computed from parameters makes of them: each layer applied to constants is a use of its
        parameters (its rule's), each parameter read through ops another."""
        for n in R.leaves(node):
            if isinstance(n, R.RuleNode):
                for local, (name, _) in n.entry.params.items():
                    mb.uses.setdefault(name, []).append(_Use(local in n.entry.layer.factored, None))
            else:
                mb.uses.setdefault(n.name, []).append(_Use(False, None))

    # -- the rest of the torch.func module path (unsupported="vmap")
    def _record_vmap(self, entry: _Entry, args, kwargs, output):
        return _whole.record_module(self, entry, args, kwargs, output)

    def check_batch_norm(self, args, kwargs) -> None:
        _whole.check_batch_norm(self.model, args, kwargs)

    # -- contributions
    @contextlib.contextmanager
    def quiet(self, device_type: str = "cpu"):
        """Our own computations: not seen by the tracker, not autocast (a backward inside autocast would run our
        matmuls in bf16)."""
        prev = self.suspended
        self.suspended = True
        try:
            if torch.is_autocast_enabled(device_type):
                with torch.autocast(device_type, enabled=False):
                    yield
            else:  # nothing to turn off (entering autocast costs more than most of what runs inside)
                yield
        finally:
            self.suspended = prev

    def contribute(self, call: _Call, grad: Any) -> None:
        """Add one call's per-example contributions, given its output gradient (as autograd delivers it)."""
        _contrib.contribute(self, call, grad)

    def squared_norms(self) -> list[dict[str, torch.Tensor]]:
        """One ``{name: [B_k]}`` per micro-batch: squared norms of the summed per-example gradients."""
        return _contrib.squared_norms(self)

    def weighted_grads(self, weights: Callable[[int, str], torch.Tensor]) -> _contrib.WeightedGrads:
        """``sum_n w_n g_n`` per parameter (``weights(micro-batch index, parameter name) -> [B_k]``), built per
        parameter when asked for (:class:`regops.per_example._contrib.WeightedGrads`)."""
        return _contrib.WeightedGrads(self, weights)

    def reset(self) -> None:
        for mb in self.mbs:
            mb.sq.clear()
            mb.dense.clear()
            mb.pushed.clear()
            if mb.whole is not None:
                mb.whole.grads = None
        self.derived.clear()
        for call in self.calls:
            call.fired = 0
            call.grad = None
            call.kept = None


def _expand_examples(saved: Any, b: int) -> Any:
    if isinstance(saved, torch.Tensor):
        return saved.unsqueeze(0).expand(b, *saved.shape)
    if isinstance(saved, tuple):
        return tuple(_expand_examples(x, b) for x in saved)
    return saved
