"""Turning recorded calls and their output gradients into per-example quantities: how the uses of a parameter
combine (the plan), each call's contribution (squared norms, factors or per-example gradients, by the rule's forms),
the squared norms of a micro-batch and the weighted gradient sums of Book-Keeping clipping."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from regops._core.validate import is_dtensor
from regops.per_example import _layout as L
from regops.per_example import _recipes as R
from regops.per_example import _whole
from regops.per_example._calls import _Call, _MicroBatch
from regops.per_example._layout import Layout
from regops.per_example._rules import Factors, _f32, _sq, _wsum, factors_inner
from regops.per_example._vmap import VMAP


def plan(mb: _MicroBatch) -> dict[str, str]:
    """How the uses of each parameter combine: ``single``, ``factors`` (factored inner products), ``regions``
    (disjoint slices: squared norms add) or ``dense`` (per-example gradients summed)."""
    if mb.plan is None:
        plan = {}
        for name, uses in mb.uses.items():
            if len(uses) == 1:
                plan[name] = "single"
            elif all(u.factors for u in uses):
                plan[name] = "factors"
            elif all(u.region is not None for u in uses) and _disjoint([u.region for u in uses]):
                plan[name] = "regions"
            else:
                plan[name] = "dense"
        mb.plan = plan
    return mb.plan


def signals(call: _Call, grad: Any) -> tuple[Any, Any]:
    """The call's saved input and output gradient with the examples first (per row for row rules on rows grouped
    into examples)."""
    if call.entry.layer is VMAP:
        return call.saved, grad
    saved, g = call.saved, grad
    if call.rows:
        return saved, g
    if call.layout_in is not None:
        saved = _first(saved, call.layout_in)
    if call.layout_out is not None and isinstance(g, torch.Tensor):
        g = _first(g, call.layout_out)
    return saved, g


def contribute(rec: Any, call: _Call, grad: Any) -> None:
    """Add one call's per-example contributions, given its output gradient (as autograd delivers it)."""
    if call.fired:
        raise RuntimeError(
            "regops: a recorded forward was backpropagated twice; per-example gradient norms take "
            "exactly one backward pass per forward inside the block"
        )
    call.fired += 1
    mb = rec.mbs[call.mb]
    if mb.fallback:
        call.saved = None
        return
    saved, g = signals(call, grad)
    if isinstance(g, torch.Tensor) and not g.is_contiguous():
        g = g.contiguous()  # one copy here rather than in every reshape of the rule's forms
    if rec.retain_signals:
        call.grad, call.saved = g, saved
    if not rec.norms:
        return
    entry = call.entry
    how = plan(mb)
    device = g.device.type if isinstance(g, torch.Tensor) else "cpu"
    direct = {local: name for local, (name, _) in entry.params.items()}
    want = {local: how.get(name, "single") for local, name in direct.items()}
    for local, node in call.links.items():
        names = list(node.params)
        iso = node.source() is not None
        want[local] = "single" if iso and all(how.get(n) in ("single", "regions") for n in names) else "dense"
    with rec.quiet(device):
        sq, facs, dense, kept = _forms(call, saved, g, want, rec.retain_signals)
    if kept and isinstance(g, torch.Tensor) and 4 * sum(v.numel() for v in kept.values()) <= g.numel():
        call.kept = kept  # small next to the signals: the clipped sums reuse them
    for local, how in want.items():
        if local in call.links:
            node = call.links[local]
            if how == "dense":
                if local in dense:
                    for name, v in R.to_param(node, _f32(dense[local])).items():
                        mb.dense.setdefault(name, []).append(v)
            elif local in sq:
                mb.sq.setdefault(next(iter(node.params)), []).append((sq[local], None))
            continue
        name = direct[local]
        if how == "dense":
            if local in dense:
                mb.dense.setdefault(name, []).append(_f32(dense[local]))
        elif local in sq:
            mb.sq.setdefault(name, []).append((sq[local], facs.get(local)))
    if rec.release_saved:
        call.saved = None  # autograd frees its saved activations as the backward proceeds; so do we


def _forms(call, saved, g, want, keep):
    """``(squared norms, factors, per-example gradients, kept)`` of one call; ``keep``: also the per-example
    gradients the rule forms on the way to the norms that the clipped sums would form again."""
    entry = call.entry
    layer, module = entry.layer, entry.module
    sq, facs, dense, kept = {}, {}, {}, {}
    if call.rows:  # per-row gradients, summed per example
        rows = layer.per_example_grads(module, saved, g)
        lay = call.layout_out or call.layout_in
        grads = {k: L.per_example_sum(v, lay.at(0)) for k, v in rows.items()}
        return {k: _sq(v) for k, v in grads.items()}, {}, grads, grads if keep else {}
    if any(w != "dense" for w in want.values()):
        form = entry.form
        if form == "auto":
            form = layer.cost_form(module, saved)
        if is_dtensor(saved):  # tensor parallelism: partial norms of the shards, all-reduced
            from regops.per_example import dtensor

            call.tp_weight = module.weight
            sq = dtensor.tp_sq_norms(entry, saved, g, form, any(w == "factors" for w in want.values()), module.weight)
        elif keep:
            sq, kept = layer.sq_norms_keeping(module, saved, g, form)
        else:
            sq = layer.sq_norms(module, saved, g, form)
    if any(w == "factors" for w in want.values()):
        facs = layer.factors(module, saved, g)
    missing = [k for k, w in want.items() if w == "dense" or (w == "factors" and k not in facs)]
    if missing:
        dense = layer.per_example_grads(module, saved, g)
        for k in missing:
            want[k] = "dense"
    return sq, facs, dense, kept


def squared_norms(rec: Any) -> list[dict[str, torch.Tensor]]:
    """One ``{name: [B_k]}`` per micro-batch: squared norms of the summed per-example gradients."""
    out = []
    with rec.quiet():
        for mb in rec.mbs:
            if mb.fallback:
                out.append(_whole.squared_norms(rec, mb))
                continue
            res = {}
            for name in set(mb.sq) | set(mb.dense):
                items, dense = mb.sq.get(name, []), mb.dense.get(name, [])
                if dense and items:
                    raise RuntimeError(f"regops: internal error: {name!r} has uses of both kinds")
                if dense:
                    res[name] = _sq(sum(_f32(d) for d in dense))
                elif len(items) > 1 and all(f is not None for _, f in items):
                    res[name] = _shared_sq(items)
                else:
                    res[name] = sum(s for s, _ in items)
            out.append(res)
    return out


class WeightedGrads:
    """``sum_n w_n g_n`` per parameter (``weights(micro-batch index, parameter name) -> [B_k]``) from the kept
    signals of every call and the per-example gradients carried back (all micro-batches), built when asked for
    (:meth:`pop`): a caller that takes the parameters one at a time holds one full-size sum at a time, plus the
    other parameters' parts of the call it last computed. A call's contributions are computed once; a parameter's
    are added in call order, then micro-batch order (the whole-model fallback is computed up front)."""

    def __init__(self, rec: Any, weights: Callable[[int, str], torch.Tensor]) -> None:
        self.rec, self.weights = rec, weights
        self.calls = [*rec.calls, *rec.derived]
        self.sources: dict[str, list[Any]] = {}
        self.pending: dict[tuple[Any, str], list[torch.Tensor]] = {}  # computed, not yet asked for
        for i, call in enumerate(self.calls):
            if call.grad is None or rec.mbs[call.mb].fallback:
                continue
            names = [name for name, _ in call.entry.params.values()]
            names += [name for node in call.links.values() for name in node.params]
            for name in dict.fromkeys(names):
                self.sources.setdefault(name, []).append(i)
        for index, mb in enumerate(rec.mbs):
            if mb.fallback:
                for name, v in _whole.weighted_grads(rec, mb, index, weights).items():
                    self.sources.setdefault(name, []).append(("whole", index))
                    self.pending[(("whole", index), name)] = [v]
                continue
            for name, dense in mb.pushed.items():
                for j in range(len(dense)):
                    self.sources.setdefault(name, []).append(("pushed", index, j))

    def names(self) -> list[str]:
        return list(self.sources)

    def pop(self, name: str) -> torch.Tensor | None:
        """The sum for ``name`` (``None`` if nothing contributes to it); asked for once."""
        total = None
        for src in self.sources.pop(name, []):
            if (src, name) not in self.pending:
                self._compute(src)
            for v in self.pending.pop((src, name), []):  # a rule may return no gradient for a parameter
                total = v if total is None else total + v
        return total

    def _compute(self, src: Any) -> None:
        if isinstance(src, tuple):  # ("pushed", micro-batch, j)
            _, index, j = src
            for name, dense in self.rec.mbs[index].pushed.items():
                if j < len(dense):
                    self.pending[(src, name)] = [_wsum(self.weights(index, name), dense[j])]
            return
        call = self.calls[src]
        rec, mb, entry = self.rec, call.mb, call.entry
        out: dict[str, list[torch.Tensor]] = {}
        groups: dict[int, tuple[torch.Tensor, list[str]]] = {}
        locals_ = [(local, [name]) for local, (name, _) in entry.params.items()]
        locals_ += [(local, list(node.params)) for local, node in call.links.items()]
        for local, names in locals_:
            w = self.weights(mb, names[0])
            groups.setdefault(id(w), (w, []))[1].append(local)
        for w, locs in groups.values():
            with rec.quiet(w.device.type):
                kept = call.kept
                if kept and all(local in kept for local in locs):
                    grads = {local: _wsum(w, kept[local]) for local in locs}
                elif call.rows:
                    lay = call.layout_out or call.layout_in
                    rows = entry.layer.per_example_grads(entry.module, call.saved, call.grad)
                    grads = {k: _wsum(w, L.per_example_sum(v, lay.at(0))) for k, v in rows.items()}
                elif is_dtensor(call.saved):  # tensor parallelism: each rank its parameters' shards
                    from regops.per_example import dtensor

                    weight = entry.module.weight if call.tp_weight is None else call.tp_weight
                    grads = dtensor.tp_weighted_grads(entry, call.saved, call.grad, w, weight)
                elif kept:
                    grads = entry.layer.weighted_grads(entry.module, call.saved, call.grad, w, kept=kept)
                else:
                    grads = entry.layer.weighted_grads(entry.module, call.saved, call.grad, w)
            for local in locs:
                if local not in grads:
                    continue
                if local in call.links:
                    for name, v in R.to_param(call.links[local], grads[local][None]).items():
                        out.setdefault(name, []).append(v[0])
                else:
                    out.setdefault(entry.params[local][0], []).append(grads[local])
        for name, vs in out.items():
            self.pending[(src, name)] = vs


def _first(t: Any, layout: Layout) -> Any:
    if not isinstance(t, torch.Tensor):
        return t
    if layout.plain:
        return t.movedim(layout.dim, 0)
    return L.batch_first(t, layout)


def _disjoint(regions: list[torch.Tensor]) -> bool:
    flat = torch.cat([r.reshape(-1).cpu() for r in regions])
    return flat.unique().numel() == flat.numel()


def _shared_sq(items: list[tuple[torch.Tensor, Factors]]) -> torch.Tensor:
    """``||sum_i grad_i||^2`` per example from the uses' factored gradients."""
    total = sum(sq for sq, _ in items)
    dtype = total.dtype
    for i in range(len(items)):
        for j in range(i):
            total = total + 2 * factors_inner(items[i][1], items[j][1], dtype)
    return total
