"""The tracker: a ``TorchFunctionMode`` active during the block that follows the examples through every op and sees
every use of a trainable parameter.

Each tensor gets a tag: a :class:`~regops.per_example._layout.Layout` (it carries examples), a
:class:`~regops.per_example._recipes.Node` (computed from parameters and constants only) or
:class:`~regops.per_example._propagate.Unknown`; untagged tensors are constants. Where a parameter (or a node) meets
tensors with examples, the op is a *use* and is recorded exactly:

* as a call of a rule: ``F.linear`` / ``@`` / ``addmm`` (Linear rule, ghost or instantiate), ``F.embedding``,
  ``F.layer_norm`` / ``F.rms_norm`` / ``F.group_norm``, whatever the examples' arrangement (``[B * T, d]`` rows,
  windows, sequence-first) and whether the weight is the parameter or a slice, view or cast of it;
* as a broadcast: an element-wise op (``x * gamma.reshape(1, -1, 1, 1)``, ``x + pos_embed[:, :T]``, an attention
  bias in ``scaled_dot_product_attention``) takes the node expanded along the examples' dim, so that its gradient
  arrives per example; that gradient is carried back to the parameters through the node (:func:`pushback`);
* recurrent layers (``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN``): unrolled with the module's own weights
  (:mod:`regops.per_example._rnn`);
* any other op on tensors with plain examples: ``vmap`` over the examples of the op's ``vjp``.

A use the tracker cannot attribute (a parameter meeting a tensor whose examples' place is unknown) sends the
micro-batch to the exact whole-model ``torch.func`` path, with the reason. So does a parameter passed to a
``torch.autograd.Function`` (its forward runs without autograd, out of the tracker's view; so do torch.library ops
with their own autograd formula): at the end of each forward the graph is searched for such Functions
(:meth:`Tracker.unseen`); one outside the forward (in the loss) makes the backward refuse (:meth:`Tracker.check_graph`).
"""

from __future__ import annotations

import functools
import types
import weakref
from typing import Any

import torch
from torch.autograd.function import BackwardCFunction
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from regops.per_example import _layout as L
from regops.per_example import _rnn, _uses
from regops.per_example._layout import Layout
from regops.per_example._ops_table import (
    CREATION,
    DIM_READERS,
    MATMULS,
    META,
    POINTWISE,
    REDUCTIONS,
    ROWS,
    VIEWS,
    canonical,
    fname,
)
from regops.per_example._propagate import Unknown, propagate
from regops.per_example._recipes import Node, OpNode, ParamNode

RNN_OPS = frozenset({"lstm", "gru", "rnn_tanh", "rnn_relu"})
NORMS = frozenset({"layer_norm", "rms_norm", "group_norm"})
# The calls that start a backward pass: the graph they run is checked for parameter uses the tracker did not see.
BACKWARDS = (torch.Tensor.backward, torch.autograd.backward, torch.autograd.grad)


class Tracker(TorchFunctionMode):
    """Sees every torch function call during the block; see the module docstring."""

    def __init__(self, rec: Any) -> None:
        super().__init__()
        self.rec = rec
        self.tags: dict[int, tuple[weakref.ref, Any]] = {}
        self.param_nodes = {id(p): ParamNode(name, p) for name, p in rec.params.items()}
        # The autograd nodes made by ops and rule calls that used parameters in the tracker's view (the engine's
        # own Functions among them): a Function outside these is one the tracker never saw.
        self.seen_fns: set = set()

    def adopt(self, name: str, t: torch.Tensor) -> None:
        """``t`` stands for the parameter ``name`` from now on (FSDP2's unsharded parameter in its slot)."""
        self.param_nodes[id(t)] = ParamNode(name, t)

    # -- tags
    def tag(self, t: Any) -> Any:
        if not isinstance(t, torch.Tensor):
            return None
        node = self.param_nodes.get(id(t))
        if node is not None and node.param is t:
            return None if self.rec.covered(t) else node
        entry = self.tags.get(id(t))
        if entry is not None and entry[0]() is t:
            return entry[1]
        return None

    def set_tag(self, t: torch.Tensor, tag: Any) -> None:
        if tag is None:
            self.tags.pop(id(t), None)
        else:
            self.tags[id(t)] = (weakref.ref(t), tag)

    def tag_inputs(self, tree: Any, batch_dim: int) -> int | None:
        """Tag the model's inputs: every tensor whose ``batch_dim`` has the batch size ``B`` (that of the first
        tensor with a ``batch_dim``) carries the examples there; tensors of size 1 there broadcast. Returns ``B``."""
        batch = None
        leaves = pytree.tree_leaves(tree, is_leaf=_is_packed)
        for leaf in leaves:
            if _is_packed(leaf):
                sizes = self._tag_packed(leaf)
                batch = sizes if batch is None else batch
        for leaf in leaves:
            if isinstance(leaf, torch.Tensor) and leaf.dim() > batch_dim and self.tag(leaf) is None:
                if batch is None:
                    batch = leaf.shape[batch_dim]
                if leaf.shape[batch_dim] == batch:
                    self.set_tag(leaf, Layout(batch_dim, batch))
        return batch

    def _tag_packed(self, p: Any) -> int:
        """A PackedSequence input: its rows are time-major, the first ``batch_sizes[t]`` sequences (in sorted order)
        at step ``t``."""
        sizes = p.batch_sizes.tolist()
        order = p.sorted_indices.cpu() if p.sorted_indices is not None else torch.arange(sizes[0])
        index = torch.cat([order[:s] for s in sizes])
        self.set_tag(p.data, Layout(0, sizes[0], index=index))
        return sizes[0]

    # -- the mode
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        rec = self.rec
        if rec.suspended:
            return func(*args, **kwargs)
        if func in BACKWARDS:
            self.check_graph(args[0] if args else next(iter(kwargs.values()), None))
        name = canonical(func)
        if name in META:
            return func(*args, **kwargs)
        if name == "batch_norm":
            rec.check_batch_norm(args, kwargs)
        found = self._found(args, kwargs)
        if name == "multi_head_attention_forward" or (found and _opens(func, name)):
            return self._open(func, args, kwargs)
        if not found:
            return func(*args, **kwargs)
        if name in RNN_OPS and any(isinstance(tag, Node) for _, _, tag in found) and torch.is_grad_enabled():
            return self.mark_seen(_rnn.run(self, func, name, args, kwargs, found), (args, kwargs))
        if name == "_pack_padded_sequence" or name == "_pad_packed_sequence":
            return self._packing(func, name, args, kwargs, found)
        nodes = [(p, t, tag) for p, t, tag in found if isinstance(tag, Node)] if torch.is_grad_enabled() else []
        xs = [(p, t, tag) for p, t, tag in found if not isinstance(tag, Node)]  # without gradients nodes are constants
        if name in CREATION:
            return func(*args, **kwargs)
        if not nodes:
            out = func(*args, **kwargs)
            self._tag_all(out, propagate(name, args, kwargs, xs, out))
            return out
        if not xs:
            return self.mark_seen(self._node_op(func, args, kwargs, found), (args, kwargs))
        return self.mark_seen(self._use(func, name, args, kwargs, xs, nodes), (args, kwargs))

    def _found(self, args: tuple, kwargs: dict) -> list:
        found = []
        for i, a in enumerate(args):
            if isinstance(a, torch.Tensor):
                tag = self.tag(a)
                if tag is not None:
                    found.append((("a", i), a, tag))
            elif isinstance(a, (list, tuple)):
                for j, b in enumerate(a):
                    tag = self.tag(b)
                    if tag is not None:
                        found.append((("a", i, j), b, tag))
        for k, a in kwargs.items():
            tag = self.tag(a)
            if tag is not None:
                found.append((("k", k), a, tag))
        return found

    def _tag_all(self, out: Any, tags: list) -> None:
        if isinstance(out, torch.Tensor):
            outs = [out]
        else:
            outs = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        for t, tag in zip(outs, tags, strict=False):
            self.set_tag(t, tag)

    # -- parameters and constants only: a recipe node
    def _node_op(self, func, args, kwargs, found):
        out = func(*args, **kwargs)
        if canonical(func) in ("detach", "requires_grad_") or not _requires_grad(out):
            return out
        leaves = pytree.tree_leaves((args, kwargs))
        ids = {id(t): tag for _, t, tag in found}
        inputs = [(i, ids[id(x)]) for i, x in enumerate(leaves) if isinstance(x, torch.Tensor) and id(x) in ids]
        detached = pytree.tree_map(lambda x: x.detach() if isinstance(x, torch.Tensor) else x, (args, kwargs))
        if isinstance(out, torch.Tensor):
            self.set_tag(out, OpNode(func, *detached, None, inputs))
        elif isinstance(out, (tuple, list)):
            for k, o in enumerate(out):
                if isinstance(o, torch.Tensor):
                    self.set_tag(o, OpNode(func, *detached, k, inputs))
        return out

    # -- a parameter (node) meets examples
    def _use(self, func, name, args, kwargs, xs, nodes):
        rec = self.rec
        unknown = [tag for _, _, tag in xs if isinstance(tag, Unknown)]
        if unknown:
            names = [n for _, _, tag in nodes for n in tag.params]
            why = unknown[0].why
            rec.fallback(names, f"used by {fname(func)} on a tensor whose examples' place is unknown ({why})")
            out = func(*args, **kwargs)
            self._tag_all(out, [unknown[0]] * 8)
            return out
        return _uses.use(self, func, name, args, kwargs, xs, nodes)

    # -- parameter uses hidden from the tracker
    def mark_seen(self, out: Any, inputs: Any) -> Any:
        """Record the autograd nodes between ``out`` and ``inputs`` (those of one op or rule call the tracker saw
        using parameters) as seen; returns ``out``."""
        if torch.is_grad_enabled():
            stop = {t.grad_fn for t in _tensor_leaves(inputs) if t.grad_fn is not None}
            stack = [t.grad_fn for t in _tensor_leaves(out) if t.grad_fn is not None]
            while stack:
                fn = stack.pop()
                if fn in stop or fn in self.seen_fns:
                    continue
                self.seen_fns.add(fn)
                stack.extend(f for f, _ in fn.next_functions if f is not None)
        return out

    def unseen(self, roots: Any) -> list[tuple[Any, set]]:
        """The ``torch.autograd.Function`` nodes in the graph of ``roots`` that the tracker did not see and that are
        passed a tracked parameter (or a tensor computed from parameters), with those parameters' names."""
        fns = [t.grad_fn for t in _tensor_leaves(roots) if t.grad_fn is not None]
        if not fns:
            return []
        nodes = {}
        for ref, tag in list(self.tags.values()):
            t = ref()
            if isinstance(tag, Node) and t is not None and t.grad_fn is not None:
                nodes[t.grad_fn] = tag
        found, visited, stack = [], set(), fns
        while stack:
            fn = stack.pop()
            if fn in visited:
                continue
            visited.add(fn)
            nexts = [f for f, _ in fn.next_functions if f is not None]
            stack.extend(nexts)
            if not isinstance(fn, BackwardCFunction) or fn in self.seen_fns:
                continue
            names = set()
            for f in nexts:
                node = self.param_nodes.get(id(getattr(f, "variable", None)))
                if node is not None and node.param is f.variable:
                    names |= set(node.params)
                elif f in nodes:
                    names |= set(nodes[f].params)
            if names:
                found.append((fn, names))
        return found

    def check_graph(self, roots: Any) -> None:
        """Refuse a backward whose graph passes parameters to a ``torch.autograd.Function`` that neither the tracker
        saw nor a forward of the model sent to the torch.func path (one in the loss): that use has no per-example
        record, and norms that leave it out are wrong."""
        for fn, names in self.unseen(roots):
            raise RuntimeError(
                f"regops: parameter(s) {sorted(names)} are passed to the torch.autograd.Function {function_name(fn)} "
                "outside the model's forward; its forward runs without autograd, so regops cannot see that use, and "
                "per-example norms without it would be wrong. Use the parameters through torch operations inside "
                "the model"
            )

    # -- functions that call torch functions in Python: run their body with the tracker seeing inside
    def _open(self, func, args, kwargs):
        with self:
            return _body(func)(*args, **kwargs)

    def _packing(self, func, name, args, kwargs, found):
        out = func(*args, **kwargs)
        layout = found[0][2] if found[0][0] == ("a", 0) else None
        if not isinstance(layout, Layout):
            self._tag_all(out, [Unknown(name)] * 2)
            return out
        if name == "_pack_padded_sequence":  # input [T, B, *] (or [B, T, *]), rows time-major per step
            batch_first = bool(args[2] if len(args) > 2 else kwargs.get("batch_first", False))
            if layout.dim != (0 if batch_first else 1):
                self._tag_all(out, [Unknown("packs along a dim without the examples")])
                return out
            order = layout.example_index()
            index = torch.cat([order[:s] for s in out[1].tolist()])
            self.set_tag(out[0], L.normalized(Layout(0, layout.batch, index=index)))
            return out
        batch_sizes = args[1] if len(args) > 1 else kwargs["batch_sizes"]
        batch_first = bool(args[2] if len(args) > 2 else kwargs.get("batch_first", False))
        order = layout.example_index()[: int(batch_sizes[0])]  # step 0 has every sequence, in sorted order
        self.set_tag(out[0], L.normalized(Layout(0 if batch_first else 1, layout.batch, index=order)))
        return out


def _is_packed(x: Any) -> bool:
    return isinstance(x, torch.nn.utils.rnn.PackedSequence)


def function_name(fn: Any) -> str:
    """The name of the ``torch.autograd.Function`` (or torch.library op) behind an autograd node."""
    return getattr(fn, "_forward_cls", type(fn)).__qualname__


def _tensor_leaves(tree: Any) -> list[torch.Tensor]:
    # The common shapes (a tensor; tuples, lists and dicts of tensors and scalars) without pytree's generic walk.
    if isinstance(tree, torch.Tensor):
        return [tree]
    out: list[torch.Tensor] = []
    stack = [tree]
    while stack:
        x = stack.pop()
        if isinstance(x, torch.Tensor):
            out.append(x)
        elif type(x) in (tuple, list):
            stack.extend(reversed(x))
        elif type(x) is dict:
            stack.extend(reversed(list(x.values())))
        elif not isinstance(x, (int, float, bool, str, type(None))):
            out.extend(t for t in pytree.tree_leaves(x) if isinstance(t, torch.Tensor))
    return out


def _requires_grad(out: Any) -> bool:
    return any(isinstance(t, torch.Tensor) and t.requires_grad for t in pytree.tree_leaves(out))


def _param_names(nodes: list) -> str:
    names = sorted({n for _, _, tag in nodes for n in tag.params})
    return f"parameter(s) {names}"


# Functions the tracker follows as they are, never opened.
KNOWN = frozenset(
    POINTWISE
    | NORMS
    | DIM_READERS.keys()
    | REDUCTIONS
    | VIEWS
    | MATMULS
    | ROWS
    | {"embedding", "pad", "scaled_dot_product_attention", "batch_norm", "one_hot"}
)


def _opens(func, name: str) -> bool:
    """A function of torch.nn.functional written in Python around other torch functions (not one the tracker
    knows): its body is run with the tracker seeing the functions it calls."""
    if name in KNOWN:
        return False
    return isinstance(func, types.FunctionType) and getattr(func, "__module__", "") == "torch.nn.functional"


@functools.cache
def _body(func):
    """A copy of a torch function written in Python that skips its own ``__torch_function__`` dispatch (it is
    called from the tracker's handler, with the tracker re-entered to see the functions inside)."""
    g = dict(func.__globals__)
    g["has_torch_function"] = lambda *a, **k: False
    g["has_torch_function_unary"] = lambda *a, **k: False
    g["has_torch_function_variadic"] = lambda *a, **k: False
    body = types.FunctionType(func.__code__, g, func.__name__, func.__defaults__, func.__closure__)
    body.__kwdefaults__ = func.__kwdefaults__
    return body
