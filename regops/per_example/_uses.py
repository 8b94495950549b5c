"""Where a parameter (or a tensor computed from parameters) meets tensors with examples: the op becomes a call of a
rule (``F.linear``, ``@``, ``F.embedding``, the norms), a broadcast (element-wise ops, attention masks,
concatenation with the examples) or, for any other op, ``vmap`` over the examples of its ``vjp``."""

from __future__ import annotations

import types
from typing import Any

import torch

from regops.per_example._layers import EmbeddingRule, GroupNormRule, LayerNormRule, LinearRule, RMSNormRule
from regops.per_example._layout import Layout
from regops.per_example._ops_table import BROADCASTING, fname
from regops.per_example._propagate import Unknown, propagate
from regops.per_example._recipes import Node, ParamNode, transposed_alias

_LINEAR, _LINEAR_T = LinearRule(), LinearRule(transposed=True)
_EMBEDDING = EmbeddingRule()
_NORM_RULES = {"layer_norm": LayerNormRule(), "rms_norm": RMSNormRule(), "group_norm": GroupNormRule()}
_BROADCAST_EXTRA = frozenset({"where", "masked_fill", "scaled_dot_product_attention", "cat", "concat", "stack"})


class Namespace(types.SimpleNamespace):
    """The 'module' of a functional use: the attributes its rule reads (weight, bias, eps, ...)."""


class _Shape:
    """Stands for a weight that is not trainable: its shape, no gradient."""

    requires_grad = False

    def __init__(self, shape) -> None:
        self.shape = tuple(shape)


def use(tracker: Any, func, name: str, args: tuple, kwargs: dict, xs: list, nodes: list) -> Any:
    if name in ("linear", "matmul", "mm", "addmm"):
        out = _linear(tracker, func, name, args, kwargs, xs, nodes)
        if out is not NotImplemented:
            return out
    elif name == "embedding":
        return _embedding(tracker, func, args, kwargs, xs, nodes)
    elif name in _NORM_RULES:
        out = _norm(tracker, func, name, args, kwargs, xs, nodes)
        if out is not NotImplemented:
            return out
    if name in BROADCASTING or name in _BROADCAST_EXTRA:
        out = _broadcast(tracker, func, name, args, kwargs, xs, nodes)
        if out is not NotImplemented:
            return out
    return _vmapped(tracker, func, name, args, kwargs, xs, nodes)


def _get(args: tuple, kwargs: dict, names: tuple[str, ...], start: int = 0) -> list:
    return [args[start + i] if start + i < len(args) else kwargs.get(n) for i, n in enumerate(names)]


def _local(tracker: Any, t: Any) -> tuple[Any, Node | None, bool]:
    """``(tensor for the rule, node when it is not a parameter itself, transposed alias)``."""
    tag = tracker.tag(t)
    if not isinstance(tag, Node):
        return t, None, False
    if isinstance(tag, ParamNode):
        return tag.param, None, False
    alias = transposed_alias(tag)
    if alias is None:
        return t, tag, False
    return tag.source()[0].param, None, alias


def _linear(tracker, func, name, args, kwargs, xs, nodes):
    """``F.linear(x, w, b)``; ``x @ w``, ``torch.mm(x, w)``, ``torch.addmm(b, x, w)`` (a ``[d, p]`` weight)."""
    if name == "linear":
        x, w, b = _get(args, kwargs, ("input", "weight", "bias"))
        x_path, as_linear = ("a", 0), True
    elif name == "addmm":
        b, x, w = _get(args, kwargs, ("input", "mat1", "mat2"))
        if kwargs.get("beta", 1) != 1 or kwargs.get("alpha", 1) != 1:
            return NotImplemented
        x_path, as_linear = ("a", 1), False
    else:
        x, w = _get(args, kwargs, ("input", "other"))
        b, x_path, as_linear = None, ("a", 0), False
    if len(xs) != 1 or xs[0][0] != x_path or not isinstance(xs[0][2], Layout):
        return NotImplemented
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or x.dim() < 2 or (b is not None and b.dim() > 1):
        return NotImplemented
    layout = xs[0][2]
    if layout.dim == x.dim() - 1:
        return NotImplemented
    weight, w_node, flip = _local(tracker, w)
    bias, b_node, b_flip = _local(tracker, b) if b is not None else (None, None, False)
    if b_flip:
        return NotImplemented
    if not isinstance(tracker.tag(w), Node):  # an untracked weight: only the bias is a use
        weight = _Shape(w.shape if as_linear else w.t().shape)
        rule = _LINEAR
    else:
        rule = _LINEAR if as_linear != flip else _LINEAR_T
    out = func(*args, **kwargs)
    tracker._tag_all(out, [layout])
    ns = Namespace(weight=weight, bias=bias)
    tracker.rec.record_use(rule, f"{fname(func)}", ns, {"weight": w_node, "bias": b_node}, x, layout, out, layout)
    return out


def _embedding(tracker, func, args, kwargs, xs, nodes):
    ids, w = _get(args, kwargs, ("input", "weight"))
    pad, max_norm = _get(args, kwargs, ("padding_idx", "max_norm"), start=2)
    scale = _get(args, kwargs, ("scale_grad_by_freq",), start=5)[0]
    names = sorted({n for _, _, tag in nodes for n in tag.params})
    if max_norm is not None:
        raise ValueError(f"regops: parameter(s) {names} used by F.embedding with max_norm: it renormalises the "
                         "weight in place inside the forward, which has no per-example gradient")  # fmt: skip
    if scale:
        raise ValueError(f"regops: parameter(s) {names} used by an Embedding with scale_grad_by_freq=True: its "
                         "gradient depends on the whole batch, so per-example gradients are not defined")  # fmt: skip
    if len(xs) != 1 or xs[0][0] != ("a", 0) or not isinstance(xs[0][2], Layout):
        return _vmapped(tracker, func, "embedding", args, kwargs, xs, nodes)
    weight, node, flip = _local(tracker, w)
    if flip:
        return _vmapped(tracker, func, "embedding", args, kwargs, xs, nodes)
    if pad is not None and pad < 0:
        pad += w.shape[0]
    layout = xs[0][2]
    out = func(*args, **kwargs)
    tracker._tag_all(out, [layout])
    ns = Namespace(weight=weight, padding_idx=pad, scale_grad_by_freq=False)
    tracker.rec.record_use(_EMBEDDING, "F.embedding", ns, {"weight": node}, ids, layout, out, layout)
    return out


def _norm(tracker, func, name, args, kwargs, xs, nodes):
    if name == "group_norm":
        x, groups, w, b, eps = _get(args, kwargs, ("input", "num_groups", "weight", "bias", "eps"))
        ns = Namespace(num_groups=groups, eps=1e-5 if eps is None else eps)
    else:
        fields = ("input", "normalized_shape", "weight") + (("bias", "eps") if name == "layer_norm" else ("eps",))
        got = _get(args, kwargs, fields)
        x, shape, w = got[:3]
        b = got[3] if name == "layer_norm" else None
        eps = got[-1]
        ns = Namespace(normalized_shape=(shape,) if isinstance(shape, int) else tuple(shape), eps=eps)
        if eps is None:
            ns.eps = 1e-5 if name == "layer_norm" else None
    if len(xs) != 1 or xs[0][0] != ("a", 0) or not isinstance(xs[0][2], Layout):
        return NotImplemented
    layout = xs[0][2]
    out = func(*args, **kwargs)
    tags = propagate(name, args, kwargs, xs, out)
    if not isinstance(tags[0], Layout):
        tracker.rec.fallback(_names(nodes), f"used by F.{name} on examples it normalizes across")
        tracker._tag_all(out, tags)
        return out
    tracker._tag_all(out, tags)
    weight, w_node, w_flip = _local(tracker, w) if w is not None else (None, None, False)
    bias, b_node, b_flip = _local(tracker, b) if b is not None else (None, None, False)
    if w_flip or b_flip:
        tracker.rec.fallback(_names(nodes), f"used transposed by F.{name}")
        return out
    ns.weight, ns.bias = weight, bias
    tracker.rec.record_use(_NORM_RULES[name], f"F.{name}", ns, {"weight": w_node, "bias": b_node}, x, layout, out,
                           tags[0])  # fmt: skip
    return out


def _broadcast(tracker, func, name, args, kwargs, xs, nodes):
    """The node arguments expanded along the examples' dim of the result (broadcasting gives the same values); the
    expanded tensors' gradients are then per example."""
    if any(not isinstance(tag, Layout) for _, _, tag in xs):
        return NotImplemented
    shapes = [t.shape for _, t, _ in xs] + [t.shape for _, t, _ in nodes]
    if name in ("cat", "concat", "stack"):
        return _concat(tracker, func, name, args, kwargs, xs, nodes)
    if name == "scaled_dot_product_attention":
        q, k, v = _get(args, kwargs, ("query", "key", "value"))
        mask = _get(args, kwargs, ("attn_mask",), start=3)[0]
        out_shape = tuple(torch.broadcast_shapes(q.shape[:-2], k.shape[:-2])) + (q.shape[-2], k.shape[-2])
        del mask, v
    else:
        try:
            out_shape = tuple(torch.broadcast_shapes(*shapes))
        except RuntimeError:
            return NotImplemented
    probe = propagate(name, args, kwargs, xs, torch.empty(out_shape, device="meta"))[0]
    if not isinstance(probe, Layout):
        return NotImplemented
    new_args, new_kwargs = list(args), dict(kwargs)
    taps = []
    for path, t, node in nodes:
        pd = probe.dim - (len(out_shape) - t.dim())
        view = t.reshape((1,) * max(0, -pd) + tuple(t.shape)) if pd < 0 else t
        pd = max(pd, 0)
        size = out_shape[probe.dim]
        if view.shape[pd] not in (1, size):
            return NotImplemented
        shape = list(view.shape)
        shape[pd] = size
        expanded = view.expand(shape) if view.shape[pd] == 1 else view.view_as(view)
        taps.append((node, t, expanded, probe.at(pd), view.shape[pd] == 1))
        _put(new_args, new_kwargs, path, expanded)
    out = func(*new_args, **new_kwargs)
    tracker._tag_all(out, propagate(name, args, kwargs, xs, out))
    for node, t, expanded, layout, broadcast in taps:
        tracker.rec.record_broadcast(node, t, expanded, layout, broadcast, f"{fname(func)}")
    return out


def _concat(tracker, func, name, args, kwargs, xs, nodes):
    seq = list(args[0] if args else kwargs["tensors"])
    out = func(*args, **kwargs)
    tags = propagate(name, args, kwargs, xs, out)
    if not isinstance(tags[0], Layout):
        return NotImplemented
    layout = tags[0]
    dim = int(args[1] if len(args) > 1 else kwargs.get("dim", 0))
    taps = []
    for path, t, node in nodes:
        d = layout.dim if name != "stack" else layout.dim - (1 if layout.dim > dim % (t.dim() + 1) else 0)
        aliased = t.view_as(t)
        seq[path[2]] = aliased
        taps.append((node, t, aliased, layout.at(d)))
    new_args = (seq, *args[1:]) if args else args
    new_kwargs = dict(kwargs) if args else {**kwargs, "tensors": seq}
    out = func(*new_args, **new_kwargs)
    tracker._tag_all(out, [layout])
    for node, t, aliased, lay in taps:
        tracker.rec.record_broadcast(node, t, aliased, lay, False, f"torch.{name}")
    return out


def _put(args: list, kwargs: dict, path: tuple, value: Any) -> None:
    if path[0] == "k":
        kwargs[path[1]] = value
    elif len(path) == 2:
        args[path[1]] = value
    else:
        seq = list(args[path[1]])
        seq[path[2]] = value
        args[path[1]] = type(args[path[1]])(seq)


def _vmapped(tracker, func, name, args, kwargs, xs, nodes):
    """Any other op: per-example gradients of its node arguments by ``vmap`` over the examples of its ``vjp``
    (each example's slice run as a batch of one), where the examples are plain in every input and the result."""
    rec = tracker.rec
    out = func(*args, **kwargs)
    tags = propagate(name, args, kwargs, xs, out)
    tracker._tag_all(out, tags)
    ok = isinstance(out, torch.Tensor) and tags and isinstance(tags[0], Layout) and tags[0].plain
    ok = ok and all(isinstance(tag, Layout) and tag.plain for _, _, tag in xs)
    if not ok:
        why = tags[0].why if tags and isinstance(tags[0], Unknown) else "examples not in one plain dim"
        rec.fallback(_names(nodes), f"used by {fname(func)} ({why})")
        return out
    rec.record_op(func, args, kwargs, xs, nodes, out, tags[0], fname(func))
    return out


def _names(nodes: list) -> list[str]:
    return sorted({n for _, _, tag in nodes for n in tag.params})
