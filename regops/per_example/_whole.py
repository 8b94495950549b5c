"""The exact paths through ``torch.func``: the whole model for a micro-batch with a use the fast path cannot attribute
(with a one-line warning that names the uses), a module without a rule under ``unsupported="vmap"``, and a single op
on examples and parameters that no rule covers."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from regops.per_example._calls import _Call, _MicroBatch
from regops.per_example._layout import Layout
from regops.per_example._rules import _f32, _sq, _wsum
from regops.per_example._vmap import Split, VmapSaved, chunk_size, per_example_grads


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


@dataclass
class Whole:
    saved: VmapSaved
    grads: list[torch.Tensor] | None = None


def _splits(rec: Any, tree: Any) -> Any:
    def split(x):
        if not isinstance(x, torch.Tensor):
            return None
        tag = rec.tracker.tag(x) if rec.tracker is not None else None
        return Split(tag) if isinstance(tag, Layout) else None

    return pytree.tree_map(split, tree)


def _out_split(rec: Any, t: torch.Tensor, batch: int) -> Split:
    """Where an output's examples are: where the tracker found them, else the inputs' batch dim (a model's output
    has one row per example there: the loss is taken per example)."""
    tag = rec.tracker.tag(t) if rec.tracker is not None else None
    if isinstance(tag, Layout):
        return Split(tag)
    d = rec.batch_dim
    if t.dim() > d and t.shape[d] == batch:
        return Split(Layout(d, batch))
    raise ValueError(
        f"regops: an output of the model of shape {tuple(t.shape)} has no examples in its dim {d}; the torch.func "
        "path needs every output that reaches the loss to carry the examples"
    )


def _detached(tree: Any) -> Any:
    return pytree.tree_map(lambda x: x.detach() if isinstance(x, torch.Tensor) else x, tree)


def tap(rec: Any, mb: _MicroBatch, module: nn.Module, output: Any) -> Any:
    """End of a forward that needs the torch.func path: keep the inputs, hook the outputs' gradients."""
    owners = {rec.owner.get(id(rec.params[n]), n) or "<root>" for names, _ in mb.fallback for n in names}
    shown = sorted(owners)[:6]
    more = f" and {len(owners) - 6} more" if len(owners) > 6 else ""
    hows = list(dict.fromkeys(how for _, how in mb.fallback))
    also = f" (and {len(hows) - 1} other reasons)" if len(hows) > 1 else ""
    warnings.warn(
        f"regops: per-example gradients of {type(module).__name__} by torch.func over the whole model (exact, slower: "
        f"examples in chunks), because the fast path cannot attribute the uses of {', '.join(shown)}{more}: their "
        f"parameters {hows[0]}{also}",
        stacklevel=3,
    )
    leaves, spec = pytree.tree_flatten(output)
    index = [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor) and x.requires_grad]
    if not index:
        return None
    args = mb.inputs
    saved = VmapSaved(
        _detached(args), _splits(rec, args), [_out_split(rec, leaves[i], mb.batch) for i in index], index, mb.batch
    )
    mb.whole = Whole(saved)
    mb.inputs = None

    def on_grads(grads):
        if rec.enabled:
            mb.whole.grads = [
                g if g is not None else torch.zeros_like(leaves[i]) for g, i in zip(grads, index, strict=True)
            ]

    if rec.edges is not None:  # the tap's backward runs on the way to its inputs
        rec.edges.extend(torch.autograd.graph.get_gradient_edge(leaves[i]) for i in index)
    tapped = _Tap.apply(on_grads, *[leaves[i] for i in index])
    new = list(leaves)
    for i, t in zip(index, tapped, strict=True):
        new[i] = t
    return pytree.tree_unflatten(new, spec)


def _chunks(rec: Any, mb: _MicroBatch):
    whole = mb.whole
    if whole is None or whole.grads is None:
        raise RuntimeError("regops: no backward pass reached the model's outputs inside the block")
    params = dict(rec.params)
    with rec.quiet(whole.grads[0].device.type):
        try:
            yield from per_example_grads(rec.model, params, whole.saved, whole.grads, chunk_size(params, mb.batch))
        except RuntimeError as e:
            if str(e).startswith("regops:"):
                raise
            names, how = mb.fallback[0]
            first = str(e).strip().splitlines()[0]
            raise ValueError(
                f"regops: the fast path cannot attribute parameter(s) {names} {how}, and the model cannot run under "
                f"torch.func, the exact path for such uses ({first}). Write that use with ops regops follows, "
                "register a rule for its module (regops.per_example.register_rule), or freeze the parameters."
            ) from e


def squared_norms(rec: Any, mb: _MicroBatch) -> dict[str, torch.Tensor]:
    out: dict[str, list[torch.Tensor]] = {}
    for _, grads in _chunks(rec, mb):
        for name, g in grads.items():
            out.setdefault(name, []).append(_sq(g))
    return {name: torch.cat(parts) for name, parts in out.items()}


def dense_grads(rec: Any, mb: _MicroBatch) -> dict[str, torch.Tensor]:
    """``{name: [B, *shape]}`` per-example gradients of every parameter (valuation)."""
    out: dict[str, list[torch.Tensor]] = {}
    for _, grads in _chunks(rec, mb):
        for name, g in grads.items():
            out.setdefault(name, []).append(_f32(g))
    return {name: torch.cat(parts) for name, parts in out.items()}


def weighted_grads(rec: Any, mb: _MicroBatch, index: int, weights: Any) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for start, grads in _chunks(rec, mb):
        for name, g in grads.items():
            w = weights(index, name)[start : start + g.shape[0]]
            v = _wsum(w, g)
            out[name] = v if name not in out else out[name] + v
    return out


# ----------------------------------------------------------------------------------------------- unsupported="vmap"
def record_module(rec: Any, entry: Any, args: tuple, kwargs: dict, output: Any) -> Any:
    """A module without a rule under ``unsupported="vmap"``: its own parameters' per-example gradients by torch.func
    from its inputs (examples where the tracker found them) and its outputs' gradients."""
    leaves, spec = pytree.tree_flatten(output)
    index = [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor) and x.requires_grad]
    if not index:
        return None
    mb_index = rec.current_mb()
    mb = rec.mbs[mb_index]
    saved = VmapSaved(
        _detached((args, kwargs)),
        _splits(rec, (args, kwargs)),
        [_out_split(rec, leaves[i], mb.batch) for i in index],
        index,
        mb.batch,
    )
    call = rec._record(entry, saved, None, None, None, {})
    zero_like = {i: leaves[i] for i in index}

    def on_grads(grads):
        if rec.enabled:
            rec.contribute(
                call,
                [g if g is not None else torch.zeros_like(zero_like[i]) for g, i in zip(grads, index, strict=True)],
            )

    if rec.edges is not None:  # the tap's backward runs on the way to its inputs
        rec.edges.extend(torch.autograd.graph.get_gradient_edge(leaves[i]) for i in index)
    tapped = _Tap.apply(on_grads, *[leaves[i] for i in index])
    new = list(leaves)
    for i, t in zip(index, tapped, strict=True):
        new[i] = t
    return pytree.tree_unflatten(new, spec)


# ----------------------------------------------------------------------------------------------- one op
def op_grads(func, args, kwargs, xs, nodes, layout: Layout, g: torch.Tensor):
    """Per-example gradients ``[B, *shape]`` of the node arguments of ``func(*args, **kwargs)`` (examples in plain
    dims of ``xs`` and of the result), each example's slice run as a batch of one."""
    leaves, spec = pytree.tree_flatten((args, kwargs))
    pos = {id(t): i for i, t in enumerate(leaves) if isinstance(t, torch.Tensor)}
    x_pos = [(pos[id(t)], tag.dim) for _, t, tag in xs]
    n_pos = [pos[id(t)] for _, t, _ in nodes]
    base = [x.detach() if isinstance(x, torch.Tensor) else x for x in leaves]

    def one(p_values, x_values, g_n):
        full = list(base)
        for (i, d), x in zip(x_pos, x_values, strict=True):
            full[i] = x.unsqueeze(d)
        a, k = pytree.tree_unflatten(full, spec)

        def f(*ps):
            for i, p in zip(n_pos, ps, strict=True):
                full[i] = p
            a, k = pytree.tree_unflatten(full, spec)
            return func(*a, **k)

        del a, k
        _, vjp = torch.func.vjp(f, *p_values)
        return vjp(g_n.unsqueeze(layout.dim))

    p_values = [base[i] for i in n_pos]
    x_values = [base[i] for i, _ in x_pos]
    in_dims = (None, [d for _, d in x_pos], layout.dim)
    with torch.enable_grad():
        grads = torch.func.vmap(one, in_dims=in_dims)(p_values, x_values, g)
    return [(node, gr) for (_, _, node), gr in zip(nodes, grads, strict=True)]


# ----------------------------------------------------------------------------------------------- BatchNorm
def check_batch_norm(model: nn.Module, args: tuple, kwargs: dict) -> None:
    names = ("running_mean", "running_var", "weight", "bias", "training")
    got = [args[1 + i] if 1 + i < len(args) else kwargs.get(n) for i, n in enumerate(names)]
    running_mean, _, weight, _, training = got
    if training or running_mean is None:
        raise ValueError(
            f"regops: {_batch_norm_names(model, running_mean, weight)} normalises with batch statistics (train "
            "mode, or track_running_stats=False), which couples the examples of a batch: per-example gradients are "
            "not defined (with or without its own parameters). Call model.eval() before the block (BatchNorm then "
            "normalises with its running statistics; one built with track_running_stats=False has none), or "
            "replace it with GroupNorm: `model, changes = regops.fix_model(model)` does it and reports each swap."
        )


def _batch_norm_names(model: nn.Module, running_mean: Any, weight: Any) -> str:
    """The BatchNorm module(s) of ``model`` a functional ``F.batch_norm`` call belongs to, for error messages."""
    bns = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    own = [
        (n, m)
        for n, m in bns
        if (running_mean is not None and m.running_mean is running_mean) or (weight is not None and m.weight is weight)
    ]
    found = own or [(n, m) for n, m in bns if m.training or m.running_mean is None]
    if not found:
        return "F.batch_norm (called outside a BatchNorm module)"
    return ", ".join(f"{type(m).__name__} {n or '<root>'!r}" for n, m in found[:4]) + (
        f" and {len(found) - 4} more" if len(found) > 4 else ""
    )


__all__ = ["Whole", "_Call"]
