"""The rule interface: how a layer turns (its saved input, its output gradient) into per-example squared norms,
per-example gradients, weighted gradient sums and the inner products of data valuation, and the registry that maps
module types to rules (`register_rule`, `rule_for`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from regops._core.dtypes import acc_dtype
from regops.per_example import _forms


def _sq(x: torch.Tensor) -> torch.Tensor:
    """Per-example squared norm of ``[B, ...]``, accumulated in float32 (float64 stays float64)."""
    if x.dim() <= 1:
        return _f32(x).square()
    # One reduction kernel that upcasts as it reads: no temporary as large as x (x.square() would make one).
    return torch.linalg.vector_norm(x.reshape(x.shape[0], -1), dim=1, dtype=acc_dtype(x)).square()


def _f32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _sum_f32(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``x.sum(dim)`` accumulated and returned in float32 (float64 stays float64): a bias gradient summed over tokens
    in bf16 would be rounded to bf16 before its norm is taken."""
    return x.sum(dim, dtype=acc_dtype(x))


def _wsum(w: torch.Tensor, per_example: torch.Tensor) -> torch.Tensor:
    """``sum_n w_n x_n`` of ``[B, ...]`` per-example tensors."""
    return torch.tensordot(w.to(per_example.dtype), per_example, dims=([0], [0]))


def _common(a: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``a`` and ``g`` in one dtype: theirs if they agree, else float32 (float64 if either is float64).
    Autocast hands a layer an fp32 input and a bf16 output gradient; matmuls need one dtype."""
    if a.dtype == g.dtype:
        return a, g
    dtype = acc_dtype(a, g)
    return a.to(dtype), g.to(dtype)


def _requires(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.requires_grad


class Factors:
    """A per-example gradient in factored form ``grad_n = U_n^T V_n`` (``U`` ``[B, T, p]``, ``V`` ``[B, T, d]``;
    either may be a `OneHot`). Two uses of one parameter (tied weights) meet through
    ``<U_n^T V_n, U'_n^T V'_n> = sum((U_n U'_n^T) * (V_n V'_n^T))`` without building either gradient.

    Args:
        u: ``[B, T, p]`` tensor (the output gradients) or a `OneHot`.
        v: ``[B, T, d]`` tensor (the inputs) or a `OneHot`.

    Example::

        >>> f = regops.per_example.Factors(torch.randn(2, 3, 4), torch.randn(2, 3, 5))
        >>> f.u.shape, f.v.shape
        (torch.Size([2, 3, 4]), torch.Size([2, 3, 5]))
    """

    def __init__(self, u: Any, v: Any) -> None:
        self.u, self.v = u, v


class OneHot:
    """The one-hot rows of token ids over ``num`` classes, a factor of an embedding's gradient never built dense.

    Args:
        ids: ``[B, T]`` integer ids.
        num: the number of classes (rows of the table).
        pad: an id whose one-hot row is zero (-1: none).

    Example::

        >>> rows = regops.per_example.OneHot(torch.tensor([[0, 2]]), num=3)
        >>> rows.num
        3
    """

    def __init__(self, ids: torch.Tensor, num: int, pad: int = -1) -> None:
        self.ids, self.num, self.pad = ids, num, pad


def _gram(x: Any, y: Any, dtype: torch.dtype) -> torch.Tensor:
    """``X_n Y_n^T`` per example, ``[B, T_x, T_y]``, for dense or one-hot factors."""
    if isinstance(x, OneHot) and isinstance(y, OneHot):
        out = (x.ids[:, :, None] == y.ids[:, None, :]).to(dtype)
        if x.pad >= 0:
            out = out * (x.ids != x.pad).to(dtype)[:, :, None]
        return out
    if isinstance(x, OneHot):
        return _gram(y, x, dtype).transpose(1, 2)
    if isinstance(y, OneHot):  # X_n[s, ids_t]
        idx = y.ids.clamp(0, x.shape[-1] - 1)[:, None, :].expand(x.shape[0], x.shape[1], y.ids.shape[1])
        out = x.to(dtype).gather(2, idx)
        if y.pad >= 0:
            out = out * (y.ids != y.pad).to(dtype)[:, None, :]
        return out
    return torch.bmm(x.to(dtype), y.to(dtype).transpose(1, 2))


def factors_inner(f1: Factors, f2: Factors, dtype: torch.dtype) -> torch.Tensor:
    """``[B]`` inner products ``<grad_n, grad'_n>`` of two factored per-example gradients of one parameter."""
    return (_gram(f1.u, f2.u, dtype) * _gram(f1.v, f2.v, dtype)).sum((1, 2))


class LayerRule:
    """How one layer type turns (its saved input, its output gradient) into per-example quantities.

    A rule is a stateless object registered for a module type with `register_rule`. The recorder calls:

    * `capture` in the module's forward hook: returns what the rule needs later (``saved``; usually the
      input tensor, kept by reference: autograd saves it anyway);
    * in the backward, with ``g`` the gradient of the module's output as autograd delivers it (for
      ``loss_reduction="mean"`` it carries ``1/B``; the caller rescales), batch in dim 0:
      `sq_norms` (``{local param name: [B]}`` squared norms, the fast path),
      `per_example_grads` (``{local param name: [B, *param.shape]}``; used for shared parameters and
      as the fallback of the two others) and `weighted_grads` (``sum_n w_n grad_n``, Book-Keeping
      clipping and data scores);
    * `cost_form` to pick ``"ghost"`` or ``"instantiate"`` for ``forms="auto"``;
    * optionally `factors`, for parameters shared by several calls.

    Local parameter names are the module's own (``"weight"``, ``"bias"``). Only `per_example_grads`
    must be written; the defaults derive the others from it. Rules return float32 (float64 for float64
    inputs) and must not modify their inputs.

    Takes no arguments: subclass it and override the methods above.

    Example::

        >>> class ScaleRule(regops.per_example.LayerRule):
        ...     def per_example_grads(self, module, x, g):  # y = x * module.s
        ...         return {"s": (g * x).reshape(x.shape[0], -1, x.shape[-1]).sum(1)}
        >>> ScaleRule().cost_form(None, None)
        'instantiate'
    """

    name = "layer"
    factored: tuple[str, ...] = ()  # locals whose per-example gradient `factors` gives
    rows = False  # True: the rule reads its input's leading dim as rows of a batch (convolutions, group norms)

    def capture(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], label: str) -> Any:
        """What the backward needs from one forward call (default: the first positional tensor)."""
        x = args[0] if args else None
        if not isinstance(x, torch.Tensor) or x.dim() < self.min_dim(module):
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(
                f"regops: {type(module).__name__} {label!r} got an input of shape {shape} with no batch "
                f"dimension; per-example gradient norms need inputs of at least {self.min_dim(module)} dims "
                "whose dim 0 is the batch"
            )
        return x

    def min_dim(self, module: nn.Module) -> int:
        """Fewest input dims with a batch dim (a Linear's ``[B, d]``: 2)."""
        return 2

    def sq_norms(self, module: nn.Module, saved: Any, g: torch.Tensor, form: str) -> dict[str, torch.Tensor]:
        """``{local name: [B]}`` squared per-example gradient norms by ``form``."""
        return {k: _sq(v) for k, v in self.per_example_grads(module, saved, g).items()}

    def sq_norms_keeping(
        self, module: nn.Module, saved: Any, g: torch.Tensor, form: str
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """`sq_norms`, and the per-example gradients it formed on the way that `weighted_grads` would form again
        (``{local name: [B, *param.shape]}``, with ``sum_n w_n kept_n`` bit for bit its `weighted_grads` entry):
        Book-Keeping clipping keeps the small ones instead of forming them twice. A rule that keeps some of its
        locals only is given them back as ``weighted_grads(..., kept=...)``. Default: `sq_norms`, none kept."""
        return self.sq_norms(module, saved, g, form), {}

    def per_example_grads(self, module: nn.Module, saved: Any, g: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{local name: [B, *param.shape]}`` per-example gradients."""
        raise NotImplementedError

    def weighted_grads(
        self, module: nn.Module, saved: Any, g: torch.Tensor, w: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """``{local name: sum_n w_n * grad_n}`` for ``w`` ``[B]`` (Book-Keeping)."""
        return {k: _wsum(w, v) for k, v in self.per_example_grads(module, saved, g).items()}

    def cost_form(self, module: nn.Module, saved: Any) -> str:
        """``"ghost"`` or ``"instantiate"``: the cheaper form for this call."""
        return "instantiate"

    # -- data valuation (regops.valuation): inner products between two calls' per-example gradients and the
    # summed squared per-example gradients (empirical Fisher diagonal). Defaults derive from per_example_grads.
    def grad_dots(
        self, module: nn.Module, saved: Any, g: torch.Tensor, saved2: Any, g2: torch.Tensor, form: str
    ) -> dict[str, torch.Tensor]:
        """``{local name: [B, B2]}`` inner products ``<grad_i, grad2_j>`` of two recorded calls' examples."""
        return _forms.dense_dots(self.per_example_grads(module, saved, g), self.per_example_grads(module, saved2, g2))

    def sq_grad_sum(self, module: nn.Module, saved: Any, g: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{local name: sum_n grad_n ** 2}`` (``param.shape``), the empirical Fisher diagonal's sum."""
        return _forms.default_sq_grad_sum(self, module, saved, g)

    def dots_form(self, module: nn.Module, saved: Any, saved2: Any) -> str:
        """``"ghost"`` or ``"instantiate"``: the cheaper form of `grad_dots` for this pair of calls."""
        return "instantiate"

    def factors(self, module: nn.Module, saved: Any, g: torch.Tensor) -> dict[str, Factors]:
        """Optional: ``{local name: Factors}`` for the parameters whose per-example gradient is ``U_n^T V_n``.
        Lets a parameter used by several calls (tied weights) get exact norms without per-example gradients;
        parameters left out fall back to `per_example_grads`."""
        return {}


_RULES: dict[type | str, LayerRule] = {}


def register_rule(module_type: type | str, rule: LayerRule) -> None:
    """Teach regops a layer: ``rule`` computes the per-example quantities of every ``module_type`` instance
    (subclasses too, unless they override ``forward``). ``module_type`` is a class, or its dotted name
    (``"transformers.pytorch_utils.Conv1D"``: matched without importing the package). A later registration
    for the same type replaces the earlier one.

    Args:
        module_type: an ``nn.Module`` subclass, or its dotted name.
        rule: a `LayerRule` instance.

    Returns:
        None.

    Example::

        >>> class Scale(torch.nn.Module):  # y = x * s, s of shape [d], x [B, T, d]
        ...     def __init__(self, d):
        ...         super().__init__()
        ...         self.s = torch.nn.Parameter(torch.ones(d))
        ...     def forward(self, x):
        ...         return x * self.s
        >>> class ScaleRule(regops.per_example.LayerRule):
        ...     def per_example_grads(self, module, x, g):
        ...         return {"s": (g * x).reshape(x.shape[0], -1, x.shape[-1]).sum(1)}
        >>> regops.per_example.register_rule(Scale, ScaleRule())
        >>> model = torch.nn.Sequential(Scale(3), torch.nn.Linear(3, 1))
        >>> x, y = torch.randn(4, 3), torch.randn(4, 1)
        >>> with regops.per_sample_grad_norms(model, loss_reduction="sum") as norms:
        ...     torch.nn.functional.mse_loss(model(x), y, reduction="sum").backward()
        >>> norms.total.shape
        torch.Size([4])
    """
    if isinstance(module_type, str):
        if "." not in module_type:
            raise ValueError(f"regops: a dotted class name like 'package.module.Class' is needed, got {module_type!r}")
    elif not isinstance(module_type, type) or not issubclass(module_type, nn.Module):
        raise TypeError(f"regops: register_rule needs an nn.Module subclass or its dotted name, got {module_type!r}")
    if not isinstance(rule, LayerRule):
        raise TypeError(f"regops: rule must be a regops.per_example.LayerRule, got {type(rule).__name__}")
    _RULES[module_type] = rule


def rule_for(module: nn.Module) -> LayerRule | None:
    """The registered rule of ``module`` (most derived registered type first).

    Args:
        module: an ``nn.Module`` instance.

    Returns:
        Its `LayerRule`, or None (also for a subclass that overrides ``forward``).

    Example::

        >>> type(regops.per_example.rule_for(torch.nn.Linear(2, 3))).__name__
        'LinearRule'
    """
    for cls in type(module).__mro__:
        rule = _RULES.get(cls) or _RULES.get(f"{cls.__module__}.{cls.__qualname__}")
        if rule is not None:
            # A subclass that overrides forward may compute something else: not ours to interpret.
            return rule if type(module).forward is cls.forward else None
    return None


def registered_rules() -> dict[type | str, LayerRule]:
    """The registered rules.

    Takes no arguments.

    Returns:
        A copy of the registry ``{module type or dotted name: rule}``.

    Example::

        >>> torch.nn.Linear in regops.per_example.registered_rules()
        True
    """
    return dict(_RULES)
