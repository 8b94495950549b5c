"""The masks family's modules: a LoRA linear layer with fused LoRA dropout, and the twin of PEFT's LoRA
``Linear`` (swapped in by :func:`regops.patch`, which changes only how the adapters' dropout is computed)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from regops._core.modules import RuntimeProbability, swaps
from regops.masks import api

__all__ = ["LoRALinear", "PeftLoRALinear"]


class LoRALinear(RuntimeProbability, torch.nn.Module):
    r"""A linear layer with a LoRA adapter whose dropout is fused into the down-projection.

    .. math:: y = x W^\top + b + s\, B\, \mathrm{lora\_dropout}(x, A, p), \qquad s = \alpha / r\ (\alpha/\sqrt r
        \text{ with } \mathtt{use\_rslora})

    ``weight``/``bias`` are the (frozen) base layer's, ``lora_A [r, in]`` (Kaiming-uniform) and ``lora_B [out, r]``
    (zeros) the trainable factors, as PEFT initialises them. `regops.lora_dropout` applies
    `regops.dropout`'s mask while ``x`` is multiplied by ``A``: no dropped copy of ``x``, only a seed saved.
    ``p`` is a runtime value under ``torch.compile``.

    Args:
        in_features: the input size.
        out_features: the output size.
        r: the adapter's rank.
        lora_alpha: ``alpha`` of the scaling ``s``.
        lora_dropout: the drop probability ``p`` of the adapter's input.
        bias: the base layer has a bias.
        use_rslora: scale by ``alpha / sqrt(r)``.
        device: where the parameters live.
        dtype: the parameters' dtype.

    Example::

        >>> q_proj = torch.nn.Linear(32, 32)
        >>> layer = regops.nn.LoRALinear.from_linear(q_proj, r=4, lora_alpha=8, lora_dropout=0.05)
        >>> layer(torch.randn(2, 32)).shape
        torch.Size([2, 32])
        >>> merged = layer.merged()  # a torch.nn.Linear with W + s B A
        >>> type(merged).__name__
        'Linear'
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int = 8,
        lora_alpha: float = 8.0,
        lora_dropout: float = 0.0,
        bias: bool = True,
        use_rslora: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"regops: r must be a positive int, got {r!r}")
        factory = {"device": device, "dtype": dtype}
        self.in_features, self.out_features, self.r = in_features, out_features, r
        self.lora_alpha, self.use_rslora = lora_alpha, use_rslora
        self.scaling = lora_alpha / (math.sqrt(r) if use_rslora else r)
        self.p = lora_dropout
        self.weight = torch.nn.Parameter(torch.empty(out_features, in_features, **factory), requires_grad=False)
        self.bias = torch.nn.Parameter(torch.zeros(out_features, **factory), requires_grad=False) if bias else None
        self.lora_A = torch.nn.Parameter(torch.empty(r, in_features, **factory))
        self.lora_B = torch.nn.Parameter(torch.zeros(out_features, r, **factory))
        torch.nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        torch.nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, r: int = 8, lora_alpha: float = 8.0, lora_dropout: float = 0.0,
                    use_rslora: bool = False) -> LoRALinear:  # fmt: skip
        """A LoRA layer around ``linear``'s weight and bias (shared, frozen), with a fresh adapter."""
        w = linear.weight
        new = cls(linear.in_features, linear.out_features, r, lora_alpha, lora_dropout, linear.bias is not None,
                  use_rslora, device=w.device, dtype=w.dtype)  # fmt: skip
        new.weight = linear.weight
        new.weight.requires_grad_(False)
        if linear.bias is not None:
            new.bias = linear.bias
            new.bias.requires_grad_(False)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = api.lora_dropout(x, self.lora_A, self._probability(), self.training)
        return F.linear(x, self.weight, self.bias) + F.linear(h, self.lora_B) * self.scaling

    def merged(self) -> torch.nn.Linear:
        """A ``torch.nn.Linear`` with the adapter merged: ``W + s B A`` (the adapter's dropout is training-only)."""
        out = torch.nn.Linear(self.in_features, self.out_features, self.bias is not None,
                              device=self.weight.device, dtype=self.weight.dtype)  # fmt: skip
        with torch.no_grad():
            out.weight.copy_(self.weight + (self.lora_B @ self.lora_A) * self.scaling)
            if self.bias is not None:
                out.bias.copy_(self.bias)
        return out

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, r={self.r}, lora_alpha={self.lora_alpha}, p={self.p}"


_PEFT_TWINS: dict[type, type] = {}


@swaps("peft.tuners.lora.layer:Linear")
class PeftLoRALinear:
    """The regops twin of PEFT's LoRA ``Linear`` (``peft.tuners.lora.layer.Linear``), made by `regops.patch`.

    A subclass of PEFT's class built on first use (so PEFT is imported only by code that already uses it): it
    shares the original's adapters, base layer, hooks and state, and every PEFT method keeps working (merge,
    unmerge, set_adapter, saving). Only the forward of plain LoRA adapters changes: ``lora_B(lora_A(dropout(x)))``
    becomes ``lora_B(regops.lora_dropout(x, lora_A.weight, p))``, which gives PEFT's result with
    `regops.dropout`'s mask and neither creates nor saves a dropped copy of ``x`` per adapter. Anything else
    (merged or disabled adapters, ``adapter_names`` batches, DoRA and other variants, a ``lora_A`` with hooks, a
    dropout that is not ``torch.nn.Dropout`` or ``Identity``) runs PEFT's own forward unchanged.

    Takes no arguments: `regops.patch` (through ``from_module``) makes one from a PEFT layer.

    Example::

        >>> import peft
        >>> net = torch.nn.Sequential(torch.nn.Linear(16, 16))
        >>> model = peft.get_peft_model(net, peft.LoraConfig(r=4, target_modules=["0"], lora_dropout=0.1))
        >>> handle = regops.patch(model)
        >>> isinstance(model.base_model.model[0], regops.nn.PeftLoRALinear)
        True
        >>> model(torch.randn(2, 16)).shape
        torch.Size([2, 16])
    """

    @classmethod
    def from_module(cls, module: torch.nn.Module) -> torch.nn.Module:
        twin = _PEFT_TWINS.get(type(module))
        if twin is None:
            twin = _PEFT_TWINS[type(module)] = type("LoRALinear", (cls, type(module)), {})
        new = twin.__new__(twin)
        new.__dict__.update(module.__dict__)  # parameters, submodules, hooks and adapter state shared
        return new

    def _fusable(self, kwargs: dict[str, Any]) -> bool:
        if self.disable_adapters or self.merged or kwargs.get("adapter_names") is not None:
            return False
        for name in self.active_adapters:
            if name not in self.lora_A.keys():
                continue
            a, drop = self.lora_A[name], self.lora_dropout[name]
            if name in self.lora_variant or not isinstance(drop, _DROPOUTS) or not isinstance(a, torch.nn.Linear):
                return False
            if a.bias is not None or a._forward_hooks or a._forward_pre_hooks or _global_hooks():
                return False
        return True

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not self._fusable(kwargs):
            return super().forward(x, *args, **kwargs)
        self._check_forward_args(x, *args, **kwargs)
        for key in _variant_kwarg_keys():
            kwargs.pop(key, None)
        kwargs.pop("adapter_names", None)
        result = self.base_layer(x, *args, **kwargs)
        result_dtype = result.dtype
        for name in self.active_adapters:
            if name not in self.lora_A.keys():
                continue
            a, b, drop = self.lora_A[name], self.lora_B[name], self.lora_dropout[name]
            x = self._cast_input_dtype(x, a.weight.dtype)
            p = drop.p if isinstance(drop, torch.nn.Dropout) else 0.0
            h = api.lora_dropout(x, a.weight, p, drop.training)
            result = result + b(h) * self.scaling[name]
        return result.to(result_dtype)


def _variant_kwarg_keys() -> tuple[str, ...]:
    from peft.tuners.lora import layer  # imported already: the twin exists only for PEFT's modules

    return tuple(getattr(layer, "VARIANT_KWARG_KEYS", ()))


def _global_hooks() -> bool:
    return bool(torch.nn.modules.module._global_forward_hooks or torch.nn.modules.module._global_forward_pre_hooks)


_DROPOUTS = (torch.nn.Dropout, torch.nn.Identity)
