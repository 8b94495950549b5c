"""Per-layer rules: how each supported layer type turns (its saved input, its output gradient) into
per-example squared norms, per-example gradients and weighted gradient sums."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from regops.grad_norms.ops import embedding_gram_sq_norms, gram_sq_norms, instantiate_sq_norms
from regops.reference import grad_norms as _ref


# ----------------------------------------------------------------------------------------------- layers
def _sq(x: torch.Tensor) -> torch.Tensor:
    """Per-example squared norm of ``[B, ...]``, accumulated in float32 (float64 stays float64)."""
    if x.dim() <= 1:
        return _f32(x).square()
    # One reduction kernel that upcasts as it reads: no temporary as large as x (x.square() would make one).
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return torch.linalg.vector_norm(x.reshape(x.shape[0], -1), dim=1, dtype=dtype).square()


def _f32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _sum_f32(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``x.sum(dim)`` accumulated and returned in float32 (float64 stays float64): a bias gradient summed over tokens
    in bf16 would be rounded to bf16 before its norm is taken."""
    return x.sum(dim, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)


def _wsum(w: torch.Tensor, per_example: torch.Tensor) -> torch.Tensor:
    """``sum_n w_n x_n`` of ``[B, ...]`` per-example tensors."""
    return torch.tensordot(w.to(per_example.dtype), per_example, dims=([0], [0]))


class LayerRule:
    """How one layer type turns (its saved input, its output gradient) into per-example quantities.

    A rule is a stateless object registered for a module type with :func:`register_rule`. The recorder calls:

    * :meth:`capture` in the module's forward hook: returns what the rule needs later (``saved``; usually the
      input tensor, kept by reference: autograd saves it anyway);
    * in the backward, with ``g`` the gradient of the module's output as autograd delivers it (for
      ``loss_reduction="mean"`` it carries ``1/B``; the caller rescales), batch in dim 0:
      :meth:`sq_norms` (``{local param name: [B]}`` squared norms, the fast path),
      :meth:`per_example_grads` (``{local param name: [B, *param.shape]}``; used for shared parameters and
      as the fallback of the two others) and :meth:`weighted_grads` (``sum_n w_n grad_n``, Book-Keeping
      clipping and data scores);
    * :meth:`cost_form` to pick ``"ghost"`` or ``"instantiate"`` for ``forms="auto"``;
    * optionally :meth:`factors`, for parameters shared by several calls.

    Local parameter names are the module's own (``"weight"``, ``"bias"``). Only :meth:`per_example_grads`
    must be written; the defaults derive the others from it. Rules return float32 (float64 for float64
    inputs) and must not modify their inputs.
    """

    name = "layer"

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
        from regops.valuation import forms

        return forms.dense_dots(self.per_example_grads(module, saved, g), self.per_example_grads(module, saved2, g2))

    def sq_grad_sum(self, module: nn.Module, saved: Any, g: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{local name: sum_n grad_n ** 2}`` (``param.shape``), the empirical Fisher diagonal's sum."""
        from regops.valuation import forms

        return forms.default_sq_grad_sum(self, module, saved, g)

    def dots_form(self, module: nn.Module, saved: Any, saved2: Any) -> str:
        """``"ghost"`` or ``"instantiate"``: the cheaper form of :meth:`grad_dots` for this pair of calls."""
        return "instantiate"

    def factors(self, module: nn.Module, saved: Any, g: torch.Tensor) -> dict[str, Factors]:
        """Optional: ``{local name: Factors}`` for the parameters whose per-example gradient is ``U_n^T V_n``.
        Lets a parameter used by several calls (tied weights) get exact norms without per-example gradients;
        parameters left out fall back to :meth:`per_example_grads`."""
        return {}


def _choose(t: int, p: int, d: int) -> str:
    """fastDP's rule: the Gram costs ~2 T^2 per example against p d for the instantiated gradient."""
    return "ghost" if 2 * t * t <= p * d else "instantiate"


def _weight_sq(a: torch.Tensor, g: torch.Tensor, form: str) -> torch.Tensor:
    """``||G_n^T A_n||^2`` for ``a`` ``[B, T, d]``, ``g`` ``[B, T, p]`` by ``form``."""
    if a.shape[1] == 1:  # rank one: ||a||^2 ||g||^2, O(B (d + p))
        return _sq(a) * _sq(g)
    if form == "ghost":
        return gram_sq_norms(a, g)
    return instantiate_sq_norms(a, g)


def _common(a: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``a`` and ``g`` in one dtype: theirs if they agree, else float32 (float64 if either is float64).
    Autocast hands a layer an fp32 input and a bf16 output gradient; matmuls need one dtype."""
    if a.dtype == g.dtype:
        return a, g
    dtype = torch.float64 if torch.float64 in (a.dtype, g.dtype) else torch.float32
    return a.to(dtype), g.to(dtype)


def _requires(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.requires_grad


class Factors:
    """A per-example gradient in factored form ``grad_n = U_n^T V_n`` (``U`` ``[B, T, p]``, ``V`` ``[B, T, d]``;
    either may be a :class:`OneHot`). Two uses of one parameter (tied weights) meet through
    ``<U_n^T V_n, U'_n^T V'_n> = sum((U_n U'_n^T) * (V_n V'_n^T))`` without building either gradient."""

    def __init__(self, u: Any, v: Any) -> None:
        self.u, self.v = u, v


class OneHot:
    """The one-hot rows of token ids ``[B, T]`` over ``num`` classes (``pad``: ids with a zero row; -1: none)."""

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


class LinearRule(LayerRule):
    """``y = x W^T + b`` (``transposed=False``, torch's Linear, ``W`` ``[p, d]``) or ``y = x W + b``
    (``transposed=True``, Hugging Face's Conv1D, ``W`` ``[d, p]``); any number of middle dims (tokens)."""

    name = "Linear"

    def __init__(self, transposed: bool = False) -> None:
        self.transposed = transposed

    def _ag(self, module: Any, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b = x.shape[0]
        return _common(x.reshape(b, -1, x.shape[-1]), g.reshape(b, -1, g.shape[-1]))

    def cost_form(self, module: Any, x: torch.Tensor) -> str:
        t = math.prod(x.shape[1:-1])
        return _choose(t, module.weight.shape[0], module.weight.shape[1])

    def sq_norms(self, module, x, g, form):
        out = {}
        if _requires(module.weight):
            a, gg = self._ag(module, x, g)
            out["weight"] = _weight_sq(a, gg, form)
        if _requires(module.bias):
            out["bias"] = _sq(g if g.dim() == 2 else _sum_f32(g.reshape(g.shape[0], -1, g.shape[-1]), 1))
        return out

    def per_example_grads(self, module, x, g):
        a, gg = self._ag(module, x, g)
        out = {}
        if _requires(module.weight):
            out["weight"] = torch.bmm(a.transpose(1, 2), gg) if self.transposed else torch.bmm(gg.transpose(1, 2), a)
        if _requires(module.bias):
            out["bias"] = gg.sum(1)
        return out

    def weighted_grads(self, module, x, g, w):
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
            g_sum = g.reshape(g.shape[0], -1, g.shape[-1]).sum(1)
            out["bias"] = torch.tensordot(w.to(g_sum.dtype), g_sum, dims=([0], [0]))
        return out

    # -- data valuation (regops.valuation.forms)
    def grad_dots(self, module, x, g, x2, g2, form):
        from regops.valuation import forms

        return forms.linear_grad_dots(module, x, g, x2, g2, form)

    def sq_grad_sum(self, module, x, g):
        from regops.valuation import forms

        return forms.linear_sq_grad_sum(module, x, g, self.transposed)

    def dots_form(self, module, x, x2):
        from regops.valuation import forms

        return forms.linear_dots_form(module, x, x2)

    def factors(self, module, x, g) -> dict[str, Factors]:
        """The weight's per-example gradient as ``U^T V`` (``G^T A``, or ``A^T G`` when transposed)."""
        if not _requires(module.weight):
            return {}
        a, gg = self._ag(module, x, g)
        return {"weight": Factors(a, gg) if self.transposed else Factors(gg, a)}


def _conv_patches(module: nn.modules.conv._ConvNd, x: torch.Tensor) -> torch.Tensor:
    """Unfold ``x`` ``[B, C, *S]`` to ``[B, groups, C/groups * prod(k), T]`` (T = output positions)."""
    nd = len(module.kernel_size)
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    pad = module._reversed_padding_repeated_twice
    if any(pad):
        x = F.pad(x, pad, mode=mode)
    for i in range(nd):
        k, s, dil = module.kernel_size[i], module.stride[i], module.dilation[i]
        x = x.unfold(2 + i, dil * (k - 1) + 1, s)
        if dil > 1:
            x = x[..., ::dil]
    b, c = x.shape[:2]
    # x: [B, C, *S_out, *k] -> [B, C, *k, *S_out]
    perm = [0, 1, *range(2 + nd, 2 + 2 * nd), *range(2, 2 + nd)]
    x = x.permute(perm)
    t = math.prod(x.shape[2 + nd :])
    return x.reshape(b, module.groups, (c // module.groups) * math.prod(module.kernel_size), t)


class ConvRule(LayerRule):
    name = "Conv"

    def min_dim(self, module):
        return len(module.kernel_size) + 2

    def _g(self, module, g):
        b = g.shape[0]
        return g.reshape(b, module.groups, module.out_channels // module.groups, -1)

    def cost_form(self, module, x):
        nd = len(module.kernel_size)
        t = _conv_out_positions(module, x.shape[2:])
        d = (module.in_channels // module.groups) * math.prod(module.kernel_size)
        del nd
        return _choose(t, module.out_channels // module.groups, d)

    def sq_norms(self, module, x, g, form):
        out = {}
        if module.weight.requires_grad:
            a = _conv_patches(module, x)  # [B, G, D, T]
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
            a = _conv_patches(module, x)
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

    # -- data valuation (regops.valuation.forms)
    def grad_dots(self, module, x, g, x2, g2, form):
        from regops.valuation import forms

        return forms.conv_grad_dots(module, x, g, x2, g2, form)

    def sq_grad_sum(self, module, x, g):
        from regops.valuation import forms

        return forms.conv_sq_grad_sum(module, x, g)

    def dots_form(self, module, x, x2):
        from regops.valuation import forms

        return forms.conv_dots_form(module, x, x2)


def _conv_out_positions(module, spatial) -> int:
    pad = module._reversed_padding_repeated_twice
    t = 1
    for i, size in enumerate(spatial):
        j = len(spatial) - 1 - i  # the reversed padding list starts with the last dim
        total = size + pad[2 * j] + pad[2 * j + 1]
        k_eff = module.dilation[i] * (module.kernel_size[i] - 1) + 1
        t *= max(0, (total - k_eff) // module.stride[i] + 1)
    return t


class EmbeddingRule(LayerRule):
    name = "Embedding"

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
            return {"weight": embedding_gram_sq_norms(i2, g2, self._pad(module))}
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

    # -- data valuation (regops.valuation.forms): the id-equality cross Gram, never a B x V x d gradient
    def grad_dots(self, module, ids, g, ids2, g2, form):
        from regops.valuation import forms

        return forms.embedding_grad_dots(module, ids, g, ids2, g2, form)

    def sq_grad_sum(self, module, ids, g):
        from regops.valuation import forms

        return forms.embedding_sq_grad_sum(module, ids, g)

    def dots_form(self, module, ids, ids2):
        return "ghost"


class _NormRule(LayerRule):
    """LayerNorm / RMSNorm / GroupNorm: per-example grads of weight and bias from the normalized input."""

    def _xhat(self, module, x):
        raise NotImplementedError

    def _reduce(self, module, t):
        raise NotImplementedError

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
            "defined. Replace it with GroupNorm (regops.grad_norms.fix_model(model) does it and reports the "
            "swaps), or put it in eval mode (model.eval() or module.eval(): running statistics)."
        )


class ElementwiseRule(LayerRule):
    """A parameter ``p`` combined elementwise with a batched tensor, with broadcasting: ``y = x * p``
    (``op="mul"``), ``y = x + p`` / ``p + x`` (``"add"``), ``x - p`` (``"sub"``), or ``y = p`` broadcast to the
    batch (``"expand"``: ``p.expand(B, ...)``). Used for the functional uses the recorder sees (an
    ``LlamaRMSNorm``-style ``weight * h``, ViT position embeddings and class tokens, layer scales).

    ``saved`` is ``(x or None, op, reduce dims)``; ``x`` is broadcast to the output and batch-first."""

    name = "elementwise"

    def per_example_grads(self, module, saved, g):
        x, op, dims = saved
        t = _f32(g)
        if op == "mul":
            t = t * _f32(x)
        elif op == "sub":
            t = -t
        if dims:
            t = t.sum(dims, keepdim=True)
        return {"weight": t.reshape(g.shape[0], *module.weight.shape)}


class VmapSaved:
    """What :class:`VmapRule` keeps of one call: the forward's arguments, where the batch is, its size."""

    def __init__(self, args: tuple, kwargs: dict[str, Any], batch_dim: int, batch: int) -> None:
        self.args, self.kwargs, self.batch_dim, self.batch = args, kwargs, batch_dim, batch


class VmapRule(LayerRule):
    """Any module that treats examples independently: per-example gradients of its *own* parameters by
    ``torch.func.vmap`` over ``torch.func.vjp`` of the module (children keep their own rules).

    Positional and keyword tensor arguments whose ``batch_dim`` has the batch size are split per example,
    the others (masks, shared tables) are passed whole; buffers are the module's own; the output may be a
    tensor or any tuple / list / dict of them. Exact when the module treats examples independently; a
    random op inside (dropout in train mode) cannot be replayed and raises."""

    name = "vmap"
    raw_layout = True  # gets the output gradients as autograd delivers them (a pytree), not batch-first

    def capture(self, module, args, kwargs, label):
        return args, kwargs

    def per_example_grads(self, module, saved: VmapSaved, g):
        from torch.utils import _pytree as pytree

        params = {k: p.detach() for k, p in module._parameters.items() if p is not None and p.requires_grad}
        bd, batch = saved.batch_dim, saved.batch

        def dim_of(x):
            batched = isinstance(x, torch.Tensor) and x.dim() > bd and x.shape[bd] == batch
            return bd if batched else None

        detach = lambda x: x.detach() if isinstance(x, torch.Tensor) else x  # noqa: E731
        args, kwargs = pytree.tree_map(detach, (saved.args, saved.kwargs))
        in_dims = pytree.tree_map(dim_of, (args, kwargs))
        g = pytree.tree_map(detach, g)
        g_dims = pytree.tree_map(dim_of, g)
        if any(d is None for d in pytree.tree_leaves(g_dims)):
            raise ValueError(
                f"regops: {type(module).__name__}: an output has no batch of size {batch} in dim {bd}; the vmap "
                "path needs every output of the module to be batched"
            )

        def one(ak_n, g_n):
            def unsq(x, d):
                return x.unsqueeze(bd) if d is not None else x

            a_n, k_n = pytree.tree_map(unsq, ak_n, in_dims)

            def f(p):
                return torch.func.functional_call(module, p, a_n, k_n)

            _, vjp = torch.func.vjp(f, params)
            return vjp(pytree.tree_map(lambda t: t.unsqueeze(bd), g_n))[0]

        try:
            with torch.enable_grad():
                return torch.func.vmap(one, in_dims=(in_dims, g_dims))((args, kwargs), g)
        except RuntimeError as e:
            if "random" in str(e):
                raise RuntimeError(
                    f"regops: {type(module).__name__} draws random numbers in its forward (dropout in train "
                    "mode?): the vmap path cannot replay them, so its per-example gradients would be wrong. "
                    "Set its dropout to 0 or register a rule for it (regops.grad_norms.register_rule)."
                ) from e
            raise


_RULES: dict[type | str, LayerRule] = {}


def register_rule(module_type: type | str, rule: LayerRule) -> None:
    """Teach regops a layer: ``rule`` computes the per-example quantities of every ``module_type`` instance
    (subclasses too, unless they override ``forward``). ``module_type`` is a class, or its dotted name
    (``"transformers.pytorch_utils.Conv1D"``: matched without importing the package). A later registration
    for the same type replaces the earlier one.

    Example::

        >>> class ScaleRule(regops.grad_norms.LayerRule):
        ...     def per_example_grads(self, module, x, g):   # y = x * module.s, s of shape [d], x [B, T, d]
        ...         return {"s": (g * x).reshape(x.shape[0], -1, x.shape[-1]).sum(1)}
        >>> regops.grad_norms.register_rule(Scale, ScaleRule())
    """
    if isinstance(module_type, str):
        if "." not in module_type:
            raise ValueError(f"regops: a dotted class name like 'package.module.Class' is needed, got {module_type!r}")
    elif not isinstance(module_type, type) or not issubclass(module_type, nn.Module):
        raise TypeError(f"regops: register_rule needs an nn.Module subclass or its dotted name, got {module_type!r}")
    if not isinstance(rule, LayerRule):
        raise TypeError(f"regops: rule must be a regops.grad_norms.LayerRule, got {type(rule).__name__}")
    _RULES[module_type] = rule


def rule_for(module: nn.Module) -> LayerRule | None:
    """The registered rule of ``module`` (most derived registered type first), or None."""
    for cls in type(module).__mro__:
        rule = _RULES.get(cls) or _RULES.get(f"{cls.__module__}.{cls.__qualname__}")
        if rule is not None:
            # A subclass that overrides forward may compute something else: not ours to interpret.
            return rule if type(module).forward is cls.forward else None
    return None


def registered_rules() -> dict[type | str, LayerRule]:
    """A copy of the registry ``{module type or dotted name: rule}``."""
    return dict(_RULES)


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
_VMAP = VmapRule()
SUPPORTED = "Linear, Conv1d/2d/3d, Embedding, LayerNorm, GroupNorm, RMSNorm, BatchNorm (eval), HF Conv1D"


def _layer_for(module: nn.Module) -> LayerRule | None:
    return rule_for(module)
