"""The built-in rules: Linear (and Hugging Face's Conv1D), Conv1d/2d/3d, Embedding, LayerNorm, RMSNorm, GroupNorm,
BatchNorm in eval mode, a parameter combined elementwise with a batched tensor, and the torch.func fallback."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from regops.per_example import _forms
from regops.per_example import reference as _ref
from regops.per_example._rules import (
    Factors,
    LayerRule,
    OneHot,
    _common,
    _f32,
    _requires,
    _sq,
    _sum_f32,
    register_rule,
)
from regops.per_example.ops import grad_norms_embedding_gram, grad_norms_gram, grad_norms_instantiate


def _choose(t: int, p: int, d: int) -> str:
    """fastDP's rule: the Gram costs ~2 T^2 per example against p d for the instantiated gradient."""
    return "ghost" if 2 * t * t <= p * d else "instantiate"


def _weight_sq(a: torch.Tensor, g: torch.Tensor, form: str) -> torch.Tensor:
    """``||G_n^T A_n||^2`` for ``a`` ``[B, T, d]``, ``g`` ``[B, T, p]`` by ``form``."""
    if a.shape[1] == 1:  # rank one: ||a||^2 ||g||^2, O(B (d + p))
        return _sq(a) * _sq(g)
    if form == "ghost":
        return grad_norms_gram(a, g)
    return grad_norms_instantiate(a, g)


class LinearRule(LayerRule):
    """``y = x W^T + b`` (``transposed=False``, torch's Linear, ``W`` ``[p, d]``) or ``y = x W + b``
    (``transposed=True``, Hugging Face's Conv1D, ``W`` ``[d, p]``); any number of middle dims (tokens)."""

    name = "Linear"
    factored = ("weight",)

    def __init__(self, transposed: bool = False) -> None:
        self.transposed = transposed

    def _ag(self, module: Any, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b = x.shape[0]
        return _common(x.reshape(b, -1, x.shape[-1]), g.reshape(b, -1, g.shape[-1]))

    def cost_form(self, module: Any, x: torch.Tensor) -> str:
        t = math.prod(x.shape[1:-1])
        return _choose(t, module.weight.shape[0], module.weight.shape[1])

    def sq_norms(self, module, x, g, form):
        return self.sq_norms_keeping(module, x, g, form)[0]

    def sq_norms_keeping(self, module, x, g, form):
        out, kept = {}, {}
        g_sq = None  # ||g_n||^2 of a [B, p] output gradient: the rank-one weight norm's factor and the bias norm
        if _requires(module.weight):
            a, gg = self._ag(module, x, g)
            if a.shape[1] == 1 and gg.dtype == g.dtype:
                g_sq = _sq(gg)
                out["weight"] = _sq(a) * g_sq
            else:
                out["weight"] = _weight_sq(a, gg, form)
        if _requires(module.bias):
            if g.dim() == 2:
                out["bias"] = _sq(g) if g_sq is None else g_sq
            else:
                g_sum = _sum_f32(g.reshape(g.shape[0], -1, g.shape[-1]), 1)
                out["bias"] = _sq(g_sum)
                if g_sum.dtype == g.dtype:  # the sum weighted_grads takes (in g's dtype)
                    kept["bias"] = g_sum
        return out, kept

    def per_example_grads(self, module, x, g):
        a, gg = self._ag(module, x, g)
        out = {}
        if _requires(module.weight):
            out["weight"] = torch.bmm(a.transpose(1, 2), gg) if self.transposed else torch.bmm(gg.transpose(1, 2), a)
        if _requires(module.bias):
            out["bias"] = gg.sum(1)
        return out

    def weighted_grads(self, module, x, g, w, kept=None):
        a, gg = self._ag(module, x, g)
        out = {}
        if _requires(module.weight):
            # sum_n w_n G_n^T A_n: weight the narrower of the two (an LM head's G is [B, T, vocab])
            if a.shape[-1] <= gg.shape[-1]:
                a = a * w.to(a.dtype)[:, None, None]
            else:
                gg = gg * w.to(gg.dtype)[:, None, None]
            a2, g2 = a.reshape(-1, a.shape[-1]), gg.reshape(-1, gg.shape[-1])
            out["weight"] = a2.t().mm(g2) if self.transposed else g2.t().mm(a2)
        if _requires(module.bias):
            if kept and "bias" in kept:
                g_sum = kept["bias"]
            else:
                g_sum = g if g.dim() == 2 else g.reshape(g.shape[0], -1, g.shape[-1]).sum(1)
            out["bias"] = torch.tensordot(w.to(g_sum.dtype), g_sum, dims=([0], [0]))
        return out

    # -- data valuation (regops.per_example._forms)
    def grad_dots(self, module, x, g, x2, g2, form):
        return _forms.linear_grad_dots(module, x, g, x2, g2, form)

    def sq_grad_sum(self, module, x, g):
        return _forms.linear_sq_grad_sum(module, x, g, self.transposed)

    def dots_form(self, module, x, x2):
        return _forms.linear_dots_form(module, x, x2)

    def factors(self, module, x, g) -> dict[str, Factors]:
        """The weight's per-example gradient as ``U^T V`` (``G^T A``, or ``A^T G`` when transposed)."""
        if not _requires(module.weight):
            return {}
        a, gg = self._ag(module, x, g)
        return {"weight": Factors(a, gg) if self.transposed else Factors(gg, a)}


class ConvRule(LayerRule):
    name = "Conv"
    rows = True

    def min_dim(self, module):
        return len(module.kernel_size) + 2

    def _g(self, module, g):
        b = g.shape[0]
        return g.reshape(b, module.groups, module.out_channels // module.groups, -1)

    def cost_form(self, module, x):
        nd = len(module.kernel_size)
        t = _forms.conv_out_positions(module, x.shape[2:])
        d = (module.in_channels // module.groups) * math.prod(module.kernel_size)
        del nd
        return _choose(t, module.out_channels // module.groups, d)

    def sq_norms(self, module, x, g, form):
        out = {}
        if module.weight.requires_grad:
            a = _forms.conv_patches(module, x)  # [B, G, D, T]
            gg = self._g(module, g)  # [B, G, O, T]
            b, groups = a.shape[:2]
            a2 = a.reshape(b * groups, a.shape[2], a.shape[3]).transpose(1, 2)
            g2 = gg.reshape(b * groups, gg.shape[2], gg.shape[3]).transpose(1, 2)
            out["weight"] = _weight_sq(a2, g2, form).reshape(b, groups).sum(1)
        if module.bias is not None and module.bias.requires_grad:
            out["bias"] = _sq(_sum_f32(g.reshape(g.shape[0], g.shape[1], -1), 2))
        return out

    def per_example_grads(self, module, x, g):
        out = {}
        if module.weight.requires_grad:
            a = _forms.conv_patches(module, x)
            gg = self._g(module, g)
            grad = torch.einsum("bgot,bgdt->bgod", gg, a.to(gg.dtype))
            out["weight"] = grad.reshape(g.shape[0], *module.weight.shape)
        if module.bias is not None and module.bias.requires_grad:
            out["bias"] = g.reshape(g.shape[0], g.shape[1], -1).sum(2)
        return out

    def weighted_grads(self, module, x, g, w):
        nd = len(module.kernel_size)
        gw = g * w.to(g.dtype).reshape(-1, *([1] * (g.dim() - 1)))
        out = {}
        if module.weight.requires_grad:
            mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
            pad = module._reversed_padding_repeated_twice
            xp = F.pad(x, pad, mode=mode) if any(pad) else x
            out["weight"] = torch.ops.aten.convolution_backward(
                gw,
                xp.to(gw.dtype),
                module.weight.to(gw.dtype),
                None,
                list(module.stride),
                [0] * nd,
                list(module.dilation),
                False,
                [0] * nd,
                module.groups,
                [False, True, False],
            )[1]
        if module.bias is not None and module.bias.requires_grad:
            out["bias"] = gw.transpose(0, 1).reshape(gw.shape[1], -1).sum(1)
        return out

    # -- data valuation (regops.per_example._forms)
    def grad_dots(self, module, x, g, x2, g2, form):
        return _forms.conv_grad_dots(module, x, g, x2, g2, form)

    def sq_grad_sum(self, module, x, g):
        return _forms.conv_sq_grad_sum(module, x, g)

    def dots_form(self, module, x, x2):
        return _forms.conv_dots_form(module, x, x2)


class EmbeddingRule(LayerRule):
    name = "Embedding"
    factored = ("weight",)

    def min_dim(self, module):
        return 1

    def capture(self, module, args, kwargs, label):
        if getattr(module, "scale_grad_by_freq", False):
            raise ValueError(
                f"regops: Embedding {label!r} has scale_grad_by_freq=True: its gradient depends on the whole "
                "batch, so per-example gradients are not defined"
            )
        return super().capture(module, args, kwargs, label)

    def _ig(self, ids, g):
        b = ids.shape[0]
        return ids.reshape(b, -1), g.reshape(b, -1, g.shape[-1])

    def _pad(self, module):
        pad = getattr(module, "padding_idx", None)
        return -1 if pad is None else int(pad)

    def factors(self, module, ids, g):
        i2, g2 = self._ig(ids, g)
        return {"weight": Factors(OneHot(i2, module.weight.shape[0], self._pad(module)), g2)}

    def cost_form(self, module, ids):
        # The instantiate form only touches the rows of ids present in the example (O(T d)).
        return "instantiate"

    def sq_norms(self, module, ids, g, form):
        i2, g2 = self._ig(ids, g)
        if form == "ghost":
            return {"weight": grad_norms_embedding_gram(i2, g2, self._pad(module))}
        return {"weight": _ref.embedding_sq_norms(i2, g2, self._pad(module))}

    def _rows(self, module, ids, g):
        i2, g2 = self._ig(ids, g)
        flat_ids, rows = i2.reshape(-1), g2.reshape(-1, g2.shape[-1])
        keep = None
        if self._pad(module) >= 0:
            keep = flat_ids != self._pad(module)
        return i2, g2, flat_ids, rows, keep

    def per_example_grads(self, module, ids, g):
        i2, g2, _, _, _ = self._rows(module, ids, g)
        b = i2.shape[0]
        grad = g2.new_zeros(b, module.weight.shape[0], g2.shape[-1])
        gsrc = g2
        if self._pad(module) >= 0:
            gsrc = g2 * (i2 != self._pad(module)).unsqueeze(-1).to(g2.dtype)
        grad.scatter_add_(1, i2.unsqueeze(-1).expand_as(g2), gsrc)
        return {"weight": grad}

    def weighted_grads(self, module, ids, g, w):
        i2, g2, flat_ids, rows, keep = self._rows(module, ids, g)
        rows = (g2 * w.to(g2.dtype)[:, None, None]).reshape(-1, g2.shape[-1])
        if keep is not None:
            flat_ids, rows = flat_ids[keep], rows[keep]
        grad = rows.new_zeros(module.weight.shape[0], rows.shape[-1])
        return {"weight": grad.index_add_(0, flat_ids, rows)}

    # -- data valuation (regops.per_example._forms): the id-equality cross Gram, never a B x V x d gradient
    def grad_dots(self, module, ids, g, ids2, g2, form):
        return _forms.embedding_grad_dots(module, ids, g, ids2, g2, form)

    def sq_grad_sum(self, module, ids, g):
        return _forms.embedding_sq_grad_sum(module, ids, g)

    def dots_form(self, module, ids, ids2):
        return "ghost"


class _NormRule(LayerRule):
    """LayerNorm / RMSNorm / GroupNorm: per-example grads of weight and bias from the normalized input."""

    def _xhat(self, module, x):
        raise NotImplementedError

    def _reduce(self, module, t):
        raise NotImplementedError

    def sq_norms_keeping(self, module, x, g, form):
        grads = self.per_example_grads(module, x, g)
        return {k: _sq(v) for k, v in grads.items()}, grads

    def per_example_grads(self, module, x, g):
        out = {}
        weight = getattr(module, "weight", None)
        bias = getattr(module, "bias", None)
        if _requires(weight):
            xhat = self._xhat(module, _f32(x))  # a fresh tensor: multiply in place, no second temporary
            out["weight"] = self._reduce(module, xhat.mul_(_f32(g)))
        if _requires(bias):
            out["bias"] = self._reduce(module, _f32(g))
        return out


class LayerNormRule(_NormRule):
    name = "LayerNorm"

    def min_dim(self, module):
        return len(module.normalized_shape) + 1

    def _xhat(self, module, x):
        return F.layer_norm(x, module.normalized_shape, eps=module.eps)

    def _reduce(self, module, t):
        k = len(module.normalized_shape)
        return t.reshape(t.shape[0], -1, *t.shape[t.dim() - k :]).sum(1)


class RMSNormRule(LayerNormRule):
    name = "RMSNorm"

    def _xhat(self, module, x):
        return F.rms_norm(x, module.normalized_shape, eps=module.eps)


class GroupNormRule(_NormRule):
    name = "GroupNorm"
    rows = True

    def _xhat(self, module, x):
        return F.group_norm(x, module.num_groups, eps=module.eps)

    def _reduce(self, module, t):
        return t.reshape(t.shape[0], t.shape[1], -1).sum(2)


class BatchNormRule(GroupNormRule):
    """BatchNorm in eval mode: it normalises with the running statistics, so examples are independent and
    ``y = xhat * w + b`` with ``xhat = (x - mean_run) / sqrt(var_run + eps)``. In train mode it couples the
    examples of a batch (per-example gradients are not defined): :meth:`capture` refuses it."""

    name = "BatchNorm"

    def capture(self, module, args, kwargs, label):
        _check_batchnorm_eval(module, label)
        return super().capture(module, args, kwargs, label)

    def _xhat(self, module, x):
        shape = (1, -1) + (1,) * (x.dim() - 2)
        mean = module.running_mean.to(x.dtype).reshape(shape)
        inv = torch.rsqrt(module.running_var.to(x.dtype) + module.eps).reshape(shape)
        return (x - mean) * inv


def _check_batchnorm_eval(module: nn.Module, label: str) -> None:
    if module.training or module.running_mean is None:
        raise ValueError(
            f"regops: {type(module).__name__} {label!r} normalises with batch statistics (train mode or "
            "track_running_stats=False), which couples the examples of a batch: per-example gradients are not "
            "defined. Replace it with GroupNorm (regops.fix_model(model) does it and reports the "
            "swaps), or put it in eval mode (model.eval() or module.eval(): running statistics)."
        )


for _cls, _rule in [
    (nn.Linear, LinearRule()),
    (nn.Conv1d, ConvRule()),
    (nn.Conv2d, ConvRule()),
    (nn.Conv3d, ConvRule()),
    (nn.Embedding, EmbeddingRule()),
    (nn.LayerNorm, LayerNormRule()),
    (nn.GroupNorm, GroupNormRule()),
    (nn.RMSNorm, RMSNormRule()),
    (nn.modules.batchnorm._BatchNorm, BatchNormRule()),
    ("transformers.pytorch_utils.Conv1D", LinearRule(transposed=True)),
]:
    register_rule(_cls, _rule)
SUPPORTED = "Linear, Conv1d/2d/3d, Embedding, LayerNorm, GroupNorm, RMSNorm, BatchNorm (eval), HF Conv1D"
