"""Parameters used outside a module with a rule: a ``TorchFunctionMode`` active during the block sees every
torch function that takes a tracked parameter, and records it as a call of the matching rule, exactly:

=====================================================  ====================================================
use                                                    recorded as
=====================================================  ====================================================
``F.linear(x, W, b)``, ``x @ W.T``, ``x @ W``,          :class:`~regops.per_example._layers.LinearRule` (``W``
``torch.addmm(b, x, W)``, ``torch.mm``                 ``[p, d]``, or ``[d, p]`` transposed)
``F.embedding(ids, W)``                                :class:`~regops.per_example._layers.EmbeddingRule`
``F.layer_norm`` / ``F.rms_norm`` / ``F.group_norm``    the norm rules
``x * p``, ``x + p``, ``x - p``, ``p.expand(B, ...)``   :class:`~regops.per_example._layers.ElementwiseRule`
``F.multi_head_attention_forward``                     its projections, in its sequence-first layout
``p.t()``, ``p.T``, ``p.to(dtype)``, ``p.contiguous()``  an alias of ``p`` for the ops above
=====================================================  ====================================================

Any other op whose result carries a tracked parameter's gradient raises, naming the parameter, the op and
the module: a use regops cannot attribute per example is never silently dropped. Ops inside a module whose
rule covers the parameter (a ``Linear``'s own ``F.linear``) are the rule's, and pass through untouched.
The mode also refuses ``F.batch_norm`` with batch statistics (it couples the examples of a batch).
"""

from __future__ import annotations

import functools
import types
import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from regops.per_example._calls import _Entry
from regops.per_example._layers import (
    ElementwiseRule,
    EmbeddingRule,
    GroupNormRule,
    LayerNormRule,
    LinearRule,
    RMSNormRule,
)

_LINEAR = LinearRule()
_LINEAR_T = LinearRule(transposed=True)
_EMBEDDING = EmbeddingRule()
_LAYER_NORM = LayerNormRule()
_RMS_NORM = RMSNormRule()
_GROUP_NORM = GroupNormRule()
_ELEMENTWISE = ElementwiseRule()

_T = torch.Tensor
_TRANSPOSES = {_T.t, torch.t, _T.T.__get__, _T.mT.__get__, _T.transpose, torch.transpose}
_IDENTITIES = {_T.to, _T.type_as, _T.float, _T.double, _T.half, _T.bfloat16, _T.contiguous}
_LINEARS = {F.linear}
_MATMULS = {torch.matmul, _T.matmul, _T.__matmul__, torch.mm, _T.mm}
_ADDMMS = {torch.addmm, _T.addmm}
_MULS = {torch.mul, _T.mul, _T.__mul__, _T.__rmul__, torch.multiply}
_ADDS = {torch.add, _T.add, _T.__add__, _T.__radd__}
_SUBS = {torch.sub, _T.sub, _T.__sub__, torch.subtract}
_RSUBS = {_T.__rsub__}
_EXPANDS = {_T.expand, _T.expand_as, _T.broadcast_to, torch.broadcast_to}


class _Namespace(types.SimpleNamespace):
    """The 'module' of a functional use: the attributes its rule reads (weight, bias, eps, ...)."""


class ParamUseMode(TorchFunctionMode):
    """Sees every torch function call during the block; see the module docstring."""

    def __init__(self, rec: Any) -> None:
        super().__init__()
        self.rec = rec
        self.ids = {id(p): p for p in rec.params.values()}
        self.aliases: dict[int, tuple[weakref.ref, torch.Tensor, bool]] = {}  # id -> (ref, param, transposed)
        self.layout: list[tuple[int, int]] = []  # (T, B) inside F.multi_head_attention_forward

    # -- lookup
    def _param(self, x: Any) -> tuple[torch.Tensor, bool] | None:
        """``(param, transposed)`` if ``x`` is a tracked parameter or an alias of one."""
        if not isinstance(x, torch.Tensor):
            return None
        p = self.ids.get(id(x))
        if p is x:
            return p, False
        a = self.aliases.get(id(x))
        if a is not None and a[0]() is x:
            return a[1], a[2]
        return None

    def _hits(self, args: tuple, kwargs: dict) -> list[torch.Tensor]:
        out = []
        for a in (*args, *kwargs.values()):
            if isinstance(a, (list, tuple)):
                out.extend(h[0] for h in map(self._param, a) if h is not None)
            else:
                h = self._param(a)
                if h is not None:
                    out.append(h[0])
        return out

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        rec = self.rec
        if rec.suspended:
            return func(*args, **kwargs)
        if func is F.batch_norm:
            _check_batch_norm(rec.model, args, kwargs)
        if func is F.multi_head_attention_forward:
            return self._mha(func, args, kwargs)
        hits = self._hits(args, kwargs)
        if not hits or not torch.is_grad_enabled() or all(rec.covered(p) for p in hits):
            return func(*args, **kwargs)
        out = func(*args, **kwargs)
        if any(out is p for p in hits):
            return out  # requires_grad_() and other in-place ops on the parameter itself: no use
        if not any(isinstance(t, torch.Tensor) and t.requires_grad for t in pytree_leaves(out)):
            return out  # metadata (shape, dtype), detach(), no_grad: nothing reaches the parameter's gradient
        try:
            return self._handle(func, args, kwargs, out)
        except _Unsupported as e:
            names = sorted({rec.param_names[id(p)] for p in hits})
            owners = sorted({rec.owner.get(id(p), "?") or "<root>" for p in hits})
            raise ValueError(
                f"regops: parameter(s) {names} (of module {owners}) used by {_name(func)}{e}: regops cannot "
                "attribute this use per example, and dropping it would give wrong norms. Use F.linear / @ / "
                "elementwise * + - / F.embedding / a norm function on the parameter itself, register a rule "
                "for the module (regops.per_example.register_rule), pass unsupported='vmap' (exact when the "
                "module treats examples independently), or freeze the parameter."
            ) from None

    # -- handlers
    def _handle(self, func, args, kwargs, out):
        if func in _TRANSPOSES or func in _IDENTITIES:
            return self._alias(func, args, kwargs, out)
        if func in _LINEARS:
            x, w, b = _get(args, kwargs, ("input", "weight", "bias"), (None, None, None))
            return self._linear(func, x, w, b, out, transposed_use=False)
        if func in _MATMULS:
            x, w = _get(args, kwargs, ("input", "other"), (None, None))
            if self._param(x) is not None:
                raise _Unsupported(" as the left operand (W @ x)")
            return self._linear(func, x, w, None, out, transposed_use=True)
        if func in _ADDMMS:
            b, x, w = _get(args, kwargs, ("input", "mat1", "mat2"), (None, None, None))
            beta, alpha = kwargs.get("beta", 1), kwargs.get("alpha", 1)
            if beta != 1 or alpha != 1 or self._param(x) is not None:
                raise _Unsupported(" with alpha/beta or as mat1")
            return self._linear(func, x, w, b, out, transposed_use=True)
        if func is F.embedding:
            ids, w = _get(args, kwargs, ("input", "weight"), (None, None))
            pad, max_norm = _get(args, kwargs, ("padding_idx", "max_norm"), (None, None), start=2)
            sgbf = _get(args, kwargs, ("scale_grad_by_freq",), (False,), start=5)[0]
            if max_norm is not None or self._param(ids) is not None:
                raise _Unsupported(" with max_norm (renormalises the weight in place)")
            p, t = self._require(w)
            if t:
                raise _Unsupported(" on a transposed weight")
            if pad is not None and pad < 0:
                pad += p.shape[0]
            ns = _Namespace(weight=p, padding_idx=pad, scale_grad_by_freq=sgbf)
            entry = self._entry(_EMBEDDING, "F.embedding", ns, weight=p)
            saved = _EMBEDDING.capture(ns, (ids,), {}, entry.label)
            return self._record(entry, saved, out)
        if func is F.layer_norm or func is F.rms_norm or func is F.group_norm:
            return self._norm(func, args, kwargs, out)
        if func in _MULS or func in _ADDS or func in _SUBS or func in _RSUBS:
            return self._elementwise(func, args, kwargs, out)
        if func in _EXPANDS:
            p, t = self._require(args[0])
            return self._broadcast(func, p, None, "add", out)
        raise _Unsupported("")

    def _require(self, x) -> tuple[torch.Tensor, bool]:
        h = self._param(x)
        if h is None:
            raise _Unsupported(" on an argument that is not a tracked parameter")
        return h

    def _alias(self, func, args, kwargs, out):
        p, t = self._require(args[0])
        if not isinstance(out, torch.Tensor):
            raise _Unsupported("")
        if func in _TRANSPOSES:
            if p.dim() != 2:
                raise _Unsupported(" (a transpose of a parameter that is not a matrix)")
            t = not t
        elif out.shape != args[0].shape:
            raise _Unsupported("")
        self.aliases[id(out)] = (weakref.ref(out), p, t)
        return out

    def _entry(self, rule, op: str, ns: _Namespace, **params: torch.Tensor | None) -> _Entry:
        rec = self.rec
        tracked = {k: v for k, v in params.items() if v is not None and id(v) in rec.param_names}
        key = (id(rule), op, *((k, id(v)) for k, v in tracked.items()))
        entry = rec.functional_entries.get(key)
        if entry is None:
            names = {k: (rec.param_names[id(v)], v) for k, v in tracked.items()}
            label = f"{op}({', '.join(n for n, _ in names.values())})"
            form = rec.forms_default
            entry = _Entry(label, ns, rule, names, form, functional=True)
            rec.functional_entries[key] = entry
        else:
            entry.module = ns
        return entry

    def _record(self, entry: _Entry, saved, out, batch_dim=None, rows=None):
        replaced = self.rec.record(entry, saved, out, entry.label, batch_dim=batch_dim, rows=rows)
        return out if replaced is None else replaced

    def _linear(self, func, x, w, b, out, transposed_use: bool):
        """``F.linear(x, w, b)`` (``transposed_use=False``) or ``x @ w + b`` (True)."""
        hw, hb = self._param(w), self._param(b)
        if hb is not None and hb[1]:
            raise _Unsupported(" (a transposed bias)")
        if self._param(x) is not None:
            raise _Unsupported(" as the input")
        if not isinstance(x, torch.Tensor) or x.dim() < 2:
            raise _Unsupported(" on an input without a batch dimension")
        weight, transposed = (hw[0], hw[1]) if hw is not None else (None, False)
        if weight is None:  # only the bias is tracked: a bias rule on the output gradient
            ns = _Namespace(weight=_Shape(w.shape if not transposed_use else w.t().shape), bias=hb[0])
        else:
            ns = _Namespace(weight=weight, bias=hb[0] if hb else None)
        # W's orientation as a Linear weight [p, d]: F.linear takes it as is, x @ W takes its transpose
        rule = _LINEAR_T if (transposed != transposed_use) else _LINEAR
        if weight is None:
            rule = _LINEAR
        entry = self._entry(rule, _name(func), ns, weight=weight, bias=hb[0] if hb else None)
        if self.layout:
            t, b_ = self.layout[-1]
            if x.dim() == 3:
                return self._record(entry, x, out, batch_dim=1)
            if x.dim() == 2 and x.shape[0] == t * b_:
                saved = x.reshape(t, b_, x.shape[-1]).movedim(1, 0)
                return self._record(entry, saved, out, batch_dim=1, rows=(t, b_))
            raise _Unsupported(" inside MultiheadAttention on an input of unexpected shape")
        return self._record(entry, x, out)

    def _norm(self, func, args, kwargs, out):
        x = args[0]
        if func is F.group_norm:
            groups, w, b, eps = _get(args, kwargs, ("num_groups", "weight", "bias", "eps"), (None, None, None, 1e-5), 1)
            ns = _Namespace(num_groups=groups, eps=eps)
            rule, op = _GROUP_NORM, "F.group_norm"
        elif func is F.layer_norm:
            shape, w, b, eps = _get(
                args, kwargs, ("normalized_shape", "weight", "bias", "eps"), (None, None, None, 1e-5), 1
            )
            ns = _Namespace(normalized_shape=tuple(shape), eps=eps)
            rule, op = _LAYER_NORM, "F.layer_norm"
        else:
            shape, w, eps = _get(args, kwargs, ("normalized_shape", "weight", "eps"), (None, None, None), 1)
            b = None
            ns = _Namespace(normalized_shape=tuple(shape), eps=eps)
            rule, op = _RMS_NORM, "F.rms_norm"
        hw, hb = self._param(w), self._param(b)
        if (hw and hw[1]) or (hb and hb[1]) or self._param(x) is not None:
            raise _Unsupported("")
        ns.weight = hw[0] if hw else None
        ns.bias = hb[0] if hb else None
        entry = self._entry(rule, op, ns, weight=ns.weight, bias=ns.bias)
        bd = 0 if func is F.group_norm else None
        return self._record(entry, x, out, batch_dim=bd)

    def _elementwise(self, func, args, kwargs, out):
        a, b = _get(args, kwargs, ("input", "other"), (None, None))
        if kwargs.get("alpha", 1) != 1:
            raise _Unsupported(" with alpha")
        ha, hb = self._param(a), self._param(b)
        if (ha is None) == (hb is None):
            raise _Unsupported(" on two parameters (or a parameter and itself)")
        (p, t), x = (ha, b) if ha is not None else (hb, a)
        if t:
            raise _Unsupported(" on a transposed parameter")
        if func in _MULS:
            op = "mul"
        elif func in _ADDS:
            op = "add"
        elif func in _SUBS:
            op = "sub" if hb is not None else "add"  # x - p, or p - x
        else:  # __rsub__(self=a, other=b) = b - a
            op = "sub" if ha is not None else "add"
        if not isinstance(x, torch.Tensor):
            raise _Unsupported(" with a number: the result has no batch dimension")
        return self._broadcast(func, p, x if op == "mul" else None, op, out)

    def _broadcast(self, func, p, x, op, out):
        """``out = op(x, p)`` broadcast: the per-example gradient of ``p`` sums the output gradient (times
        ``x`` for a product) over the dims ``p`` is broadcast along."""
        if not isinstance(out, torch.Tensor):
            raise _Unsupported("")
        rec = self.rec
        bd = rec.layer_batch_dim(_ELEMENTWISE, out)
        if out.dim() <= bd:
            raise _Unsupported(" on a result without a batch dimension")
        full = [1] * (out.dim() - p.dim()) + list(p.shape)
        if full[bd] != 1:
            raise _Unsupported(f" with the parameter spanning the batch dim {bd}")
        rest_p = full[:bd] + full[bd + 1 :]
        rest_o = list(out.shape[:bd]) + list(out.shape[bd + 1 :])
        dims = tuple(i + 1 for i, (sp, so) in enumerate(zip(rest_p, rest_o, strict=True)) if sp == 1 and so != 1)
        xs = x.expand(out.shape) if x is not None else None
        ns = _Namespace(weight=p)
        entry = self._entry(_ELEMENTWISE, _name(func), ns, weight=p)
        return self._record(entry, (xs, op, dims), out, batch_dim=bd)

    def _mha(self, func, args, kwargs):
        """Run torch's own ``multi_head_attention_forward`` with this mode seeing its projections: they are
        ``F.linear`` calls on the sequence-first ``[T, B, E]`` input and on the ``[T * B, E]`` attention output."""
        hits = self._hits(args, kwargs)
        if not hits or not torch.is_grad_enabled() or all(self.rec.covered(p) for p in hits):
            return func(*args, **kwargs)
        query = args[0] if args else kwargs["query"]
        if query.dim() != 3:
            raise ValueError("regops: nn.MultiheadAttention on an unbatched input (2-D query) has no batch dimension")
        self.layout.append((query.shape[0], query.shape[1]))
        try:
            with self:
                return _mha_body()(*args, **kwargs)
        finally:
            self.layout.pop()


class _Unsupported(Exception):
    pass


class _Shape:
    """Stands for an untracked weight: its shape, no gradient."""

    requires_grad = False

    def __init__(self, shape) -> None:
        self.shape = tuple(shape)


def _check_batch_norm(model: torch.nn.Module, args, kwargs) -> None:
    names = ("running_mean", "running_var", "weight", "bias", "training")
    running_mean, _, weight, _, training = _get(args, kwargs, names, (None,) * 4 + (False,), start=1)
    if training or running_mean is None:
        raise ValueError(
            f"regops: {_batch_norm_names(model, running_mean, weight)} normalises with batch statistics (train "
            "mode, or track_running_stats=False), which couples the examples of a batch: per-example gradients are "
            "not defined (with or without its own parameters). Call model.eval() before the block (BatchNorm then "
            "normalises with its running statistics; one built with track_running_stats=False has none), or "
            "replace it with GroupNorm: `model, changes = regops.fix_model(model)` does it and reports each swap."
        )


def _batch_norm_names(model: torch.nn.Module, running_mean: Any, weight: Any) -> str:
    """The BatchNorm module(s) of ``model`` a functional ``F.batch_norm`` call belongs to, for error messages."""
    bns = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
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


def _get(args: tuple, kwargs: dict, names: tuple[str, ...], defaults: tuple, start: int = 0) -> list:
    out = []
    for i, (name, default) in enumerate(zip(names, defaults, strict=True)):
        j = start + i
        out.append(args[j] if j < len(args) else kwargs.get(name, default))
    return out


def _name(func) -> str:
    name = getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func)
    module = getattr(func, "__module__", None) or ""
    if module.startswith("torch.nn.functional") or name in ("linear",):
        return f"F.{getattr(func, '__name__', name)}"
    if "Tensor" in name or module == "torch._tensor":
        return f"Tensor.{getattr(func, '__name__', name)}"
    return f"torch.{getattr(func, '__name__', name)}"


def pytree_leaves(x: Any) -> list:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [y for v in x for y in pytree_leaves(v)]
    return []


@functools.lru_cache(maxsize=1)
def _mha_body():
    """A copy of ``F.multi_head_attention_forward`` that skips its own ``__torch_function__`` dispatch (it is
    called from this mode's handler, with the mode re-entered to see the projections inside)."""
    f = F.multi_head_attention_forward
    g = dict(f.__globals__)
    g["has_torch_function"] = lambda *a, **k: False
    body = types.FunctionType(f.__code__, g, f.__name__, f.__defaults__, f.__closure__)
    body.__kwdefaults__ = f.__kwdefaults__
    return body
