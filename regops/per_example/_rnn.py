"""Recurrent layers (``nn.LSTM``, ``nn.GRU``, ``nn.RNN``; one or several layers, either layout, bidirectional,
packed sequences): exact per-example gradients without replacing the user's module.

Torch runs a recurrence as one fused op whose weights' per-step uses are hidden. The tracker replaces that op by
the same recurrence written out with the module's own weights: per layer and direction, the input projection of
every step at once (``x W_ih^T + b_ih``: one Linear call over all steps, examples wherever the input has them,
packed rows included) and the recurrence over the steps (an autograd Function whose backward recomputes the steps
and hands the gradients of every step's ``h W_hh^T + b_hh`` to one more Linear call, over all steps). Both calls get
ghost or instantiate norms like any Linear; the recurrence's outputs equal torch's to rounding.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from regops.per_example._layers import LinearRule
from regops.per_example._layout import Layout

_LINEAR = LinearRule()


def _cell(kind: str, gi: torch.Tensor, gh: torch.Tensor, h: torch.Tensor, c: torch.Tensor | None):
    if kind == "lstm":
        i, f, g, o = (gi + gh).chunk(4, -1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c
    if kind == "gru":
        ir, iz, inn = gi.chunk(3, -1)
        hr, hz, hn = gh.chunk(3, -1)
        r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
        n = torch.tanh(inn + r * hn)
        return (1 - z) * n + z * h, None
    return (torch.tanh if kind == "rnn_tanh" else torch.relu)(gi + gh), None


def _unroll(kind, sizes, reverse, gi, h0, c0, w_hh, b_hh, keep=False):
    """The recurrence over ``len(sizes)`` steps; step ``t`` updates the first ``sizes[t]`` rows (packed sequences:
    sorted by length) from ``gi``'s rows ``[offset_t, offset_t + sizes[t])``. Returns the outputs (rows in step
    order), the final state, the state before every step (rows in step order) and, with ``keep``, every step's
    ``h W_hh^T + b_hh``."""
    offsets = [0]
    for s in sizes:
        offsets.append(offsets[-1] + s)
    steps = range(len(sizes) - 1, -1, -1) if reverse else range(len(sizes))
    h, c = h0, c0
    outs, prevs, ghs, cs = [None] * len(sizes), [None] * len(sizes), [None] * len(sizes), [None] * len(sizes)
    for t in steps:
        n = sizes[t]
        if reverse and n > h.shape[0]:  # sequences that end at this step start from the initial state
            h = torch.cat([h, h0[h.shape[0] : n]])
            c = torch.cat([c, c0[c.shape[0] : n]]) if c is not None else None
        hp = h[:n]
        gh = F.linear(hp, w_hh, b_hh)
        new_h, new_c = _cell(kind, gi[offsets[t] : offsets[t + 1]], gh, hp, c[:n] if c is not None else None)
        outs[t], prevs[t] = new_h, hp
        if keep:
            ghs[t] = gh
        if reverse:
            h, c = new_h, new_c
        else:
            h = torch.cat([new_h, h[n:]]) if n < h.shape[0] else new_h
            if c is not None:
                c = torch.cat([new_c, c[n:]]) if n < c.shape[0] else new_c
        cs[t] = new_c
    return torch.cat(outs), h, c, torch.cat(prevs), ghs


class _Recurrence(torch.autograd.Function):
    """One layer and direction of the recurrence; its backward recomputes the steps and hands the gradients of the
    steps' hidden projections to ``on_steps``."""

    @staticmethod
    def forward(ctx, spec, gi, h0, c0, w_hh, b_hh):
        kind, sizes, reverse, _ = spec
        out, h, c, prevs, _ = _unroll(kind, sizes, reverse, gi, h0, c0, w_hh, b_hh)
        ctx.spec = spec
        ctx.save_for_backward(gi, h0, c0, w_hh, b_hh)
        ctx.mark_non_differentiable(prevs)
        return out, h, c if c is not None else h.new_zeros(0), prevs

    @staticmethod
    def backward(ctx, g_out, g_h, g_c, _):
        kind, sizes, reverse, on_steps = ctx.spec
        saved = ctx.saved_tensors
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(t.requires_grad) if t is not None else None for t in saved]
            gi, h0, c0, w_hh, b_hh = leaves
            out, h, c, _, ghs = _unroll(kind, sizes, reverse, gi, h0, c0, w_hh, b_hh, keep=True)
            inputs = [t for t in leaves if t is not None and t.requires_grad]
            outputs, grads = [out, h], [g_out, g_h]
            if c is not None:
                outputs.append(c)
                grads.append(g_c)
            steps = [g for g in ghs if g is not None]
            got = torch.autograd.grad(outputs, inputs + steps, grads, allow_unused=True)
        # ghs is indexed by step, whatever the direction: the rows in step order, as gi's and the saved states'
        step_grads = got[len(inputs) :]
        on_steps(torch.cat([torch.zeros_like(s) if g is None else g for s, g in zip(steps, step_grads, strict=True)]))
        it = iter(got[: len(inputs)])
        return (None, *[next(it) if t is not None and t.requires_grad else None for t in leaves])


def run(tracker: Any, func: Callable, name: str, args: tuple, kwargs: dict, found: list) -> Any:
    rec = tracker.rec
    second = args[1] if len(args) > 1 else None
    packed = isinstance(second, torch.Tensor) and second.dim() == 1 and not second.is_floating_point()
    if packed:
        x, batch_sizes, hx, params, has_bias, layers, dropout, train, bidirectional = args[:9]
        batch_first = False
    else:
        x, hx, params, has_bias, layers, dropout, train, bidirectional, batch_first = args[:9]
    layout = tracker.tag(x)
    per = (4 if has_bias else 2) * (2 if bidirectional else 1)
    dims = 2 if bidirectional else 1
    want_dim = 0 if (packed or batch_first) else 1
    if not isinstance(layout, Layout) or layout.dim != want_dim or len(params) != per * layers:
        why = "its input's examples are not in its batch dim" if isinstance(layout, Layout) else "unknown examples"
        if len(params) != per * layers:
            why = "a projection (proj_size) has no rule"
        rec.fallback([n for _, _, t in found for n in getattr(t, "params", {})], f"used by torch.{name} ({why})")
        return func(*args, **kwargs)
    hs = list(hx) if isinstance(hx, (tuple, list)) else [hx]
    h0_all = hs[0]
    c0_all = hs[1] if name == "lstm" else None
    with tracker:
        seq = x if packed or not batch_first else x.transpose(0, 1)  # [T, N, D] or packed rows [R, D]
    if packed:
        sizes = [int(s) for s in batch_sizes.tolist()]
        rows_layout = tracker.tag(seq)
        state_layout = Layout(0, layout.batch, index=rows_layout.example_index()[: sizes[0]])
    else:
        t_steps, n = seq.shape[0], seq.shape[1]
        sizes = [n] * t_steps
        rows_layout = Layout(0, layout.batch, layout.inner, layout.outer * t_steps, layout.index)
        state_layout = layout.at(0)
        if layout.index is not None:
            rows_layout = Layout(0, layout.batch, index=layout.index.repeat(t_steps))
    h_out, c_out = [], []
    for layer in range(layers):
        outs = []
        for d in range(dims):
            k = (layer * dims + d) * (4 if has_bias else 2)
            w_ih, w_hh = params[k], params[k + 1]
            b_ih, b_hh = (params[k + 2], params[k + 3]) if has_bias else (None, None)
            flat = seq.reshape(-1, seq.shape[-1]) if not packed else seq
            with tracker:
                tracker.set_tag(flat, rows_layout) if not packed else None
                gi = F.linear(flat, w_ih, b_ih)
            h0 = h0_all[layer * dims + d]
            c0 = c0_all[layer * dims + d] if c0_all is not None else None
            out, h, c = _recur(tracker, name, sizes, d == 1, gi, h0, c0, w_hh, b_hh, rows_layout)
            tracker.set_tag(out, rows_layout)
            tracker.set_tag(h, state_layout)
            if c is not None:
                tracker.set_tag(c, state_layout)
            outs.append(out)
            h_out.append(h)
            c_out.append(c)
        with tracker:
            seq = torch.cat(outs, -1) if dims == 2 else outs[0]
            if dropout and train and layer < layers - 1:
                seq = F.dropout(seq, dropout, True)
            if not packed:
                seq = seq.reshape(len(sizes), sizes[0], -1)
    with tracker:
        tracker.set_tag(seq, rows_layout if packed else layout.at(1))
        output = seq if packed or not batch_first else seq.transpose(0, 1)
        h_n = torch.stack(h_out)
        if name == "lstm":
            return output, h_n, torch.stack(c_out)
        return output, h_n


def _recur(tracker, kind, sizes, reverse, gi, h0, c0, w_hh, b_hh, rows_layout):
    """One layer and direction: the recurrence, and the Linear call of its hidden weights over all steps."""
    rec = tracker.rec
    call = {}

    def on_steps(g):
        if rec.enabled and "call" in call:
            rec.contribute(call["call"], g)

    with rec.quiet(gi.device.type):
        spec = (kind, sizes, reverse, on_steps)
        c_in = c0 if c0 is not None else None
        out, h, c, prevs = _Recurrence.apply(spec, gi, h0, c_in, w_hh, b_hh)
    if w_hh.requires_grad or (b_hh is not None and b_hh.requires_grad):
        from regops.per_example._uses import Namespace

        ns = Namespace(weight=w_hh, bias=b_hh)
        call["call"] = rec.record_use(_LINEAR, f"{kind}.hidden", ns, {}, prevs, rows_layout, None, rows_layout)
    return out, h, (c if kind == "lstm" else None)
