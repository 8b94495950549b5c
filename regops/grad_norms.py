"""Per-example gradient norms from the ordinary backward pass, and DP-SGD clipping built on them.

How it works: forward hooks on the supported layers keep a reference to each layer's input (the tensor that
autograd already saves for the weight gradient) and put a hook on the layer's output; when the ordinary
backward reaches that output, the hook gets the output gradient ``G`` and computes each example's squared
gradient norm for the layer's parameters from ``(A, G)`` without building the ``B x P`` per-example gradients:

* Linear / Conv (unfolded): ``||G_n^T A_n||_F^2`` by the ghost (Gram) form ``<A_n A_n^T, G_n G_n^T>`` or the
  instantiate form, chosen per layer by cost (ghost iff ``2 T^2 <= p d``, as fastDP) or by ``forms=``;
  2-D inputs (``T = 1``) use ``||a_n||^2 ||g_n||^2``.
* Embedding: the rows of repeated ids are summed (``instantiate``) or the id-equality Gram is used
  (``ghost``).
* LayerNorm / GroupNorm / RMSNorm and every bias: the per-example gradients are small and are built directly.

DP-SGD clipping (:func:`clip_per_sample_`) reuses the stored ``(A, G)`` with the clip factors (Book-Keeping),
so the clipped sum needs no second backward pass.

The kernel-backed pieces are the ``regops::grad_norms_gram``, ``regops::grad_norms_instantiate`` and
``regops::grad_norms_embedding_gram`` operators (reference in :mod:`regops.reference.grad_norms`, Triton
kernels in ``regops.kernels.grad_norms``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from regops import _backend
from regops.reference import grad_norms as _ref

__all__ = ["DPClipping", "PerSampleGradNorms", "clip_per_sample_", "dp_clipping", "per_sample_grad_norms"]

FORMS = ("auto", "ghost", "instantiate")
LOSS_REDUCTIONS = ("sum", "mean")

# ----------------------------------------------------------------------------------------------- operators
_backend.register("grad_norms_gram", torch=_ref.gram_sq_norms, triton="regops.kernels.grad_norms:gram_sq_norms")
_backend.register(
    "grad_norms_instantiate",
    torch=_ref.instantiate_sq_norms,
    triton="regops.kernels.grad_norms:instantiate_sq_norms",
)
_backend.register(
    "grad_norms_embedding_gram",
    torch=_ref.embedding_gram_sq_norms,
    triton="regops.kernels.grad_norms:embedding_gram_sq_norms",
)


def _norm_dtype(*ts: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


@torch.library.custom_op("regops::grad_norms_gram", mutates_args=())
def _gram_op(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return _backend.implementation("grad_norms_gram", a.device)(a, g)


@_gram_op.register_fake
def _(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return a.new_empty(a.shape[0], dtype=_norm_dtype(a, g))


@torch.library.custom_op("regops::grad_norms_instantiate", mutates_args=())
def _instantiate_op(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return _backend.implementation("grad_norms_instantiate", a.device)(a, g)


@_instantiate_op.register_fake
def _(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return a.new_empty(a.shape[0], dtype=_norm_dtype(a, g))


@torch.library.custom_op("regops::grad_norms_embedding_gram", mutates_args=())
def _embedding_gram_op(ids: torch.Tensor, g: torch.Tensor, padding_idx: int) -> torch.Tensor:
    return _backend.implementation("grad_norms_embedding_gram", g.device)(ids, g, padding_idx)


@_embedding_gram_op.register_fake
def _(ids: torch.Tensor, g: torch.Tensor, padding_idx: int) -> torch.Tensor:
    return g.new_empty(g.shape[0], dtype=_norm_dtype(g))


def _not_differentiable(ctx, grad):  # norms are statistics of a backward pass, not part of a graph
    raise RuntimeError("regops: per-example gradient norm operators are not differentiable")


for _op in (_gram_op, _instantiate_op):
    _op.register_autograd(_not_differentiable, setup_context=lambda ctx, inputs, output: None)
_embedding_gram_op.register_autograd(_not_differentiable, setup_context=lambda ctx, inputs, output: None)


def gram_sq_norms(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``[B]`` squared norms ``||G_n^T A_n||_F^2`` by the ghost form (a ``[B, T, d]``, g ``[B, T, p]``)."""
    return _gram_op(a, g)


def instantiate_sq_norms(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``[B]`` squared norms ``||G_n^T A_n||_F^2`` by the instantiate form (arguments as the ghost form)."""
    return _instantiate_op(a, g)


def embedding_gram_sq_norms(ids: torch.Tensor, g: torch.Tensor, padding_idx: int = -1) -> torch.Tensor:
    """``[B]`` squared norms of Embedding per-example gradients by the id-equality Gram (ids ``[B, T]``)."""
    return _embedding_gram_op(ids, g, padding_idx)


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


def _wsum(w: torch.Tensor, per_example: torch.Tensor) -> torch.Tensor:
    """``sum_n w_n x_n`` of ``[B, ...]`` per-example tensors."""
    return torch.tensordot(w.to(per_example.dtype), per_example, dims=([0], [0]))


class _Layer:
    """How one supported layer type turns (its saved input, its output gradient) into per-example quantities.

    ``saved`` is whatever :meth:`capture` returned for one forward call. All methods get the output gradient
    ``g`` as autograd delivers it (for ``loss_reduction="mean"`` it carries ``1/B``; the caller rescales).
    """

    name = "layer"

    def capture(self, module: nn.Module, args: tuple, label: str) -> Any:
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
        return 2

    def sq_norms(self, module: nn.Module, saved: Any, g: torch.Tensor, form: str) -> dict[str, torch.Tensor]:
        return {k: _sq(v) for k, v in self.per_example_grads(module, saved, g).items()}

    def per_example_grads(self, module: nn.Module, saved: Any, g: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def weighted_grads(
        self, module: nn.Module, saved: Any, g: torch.Tensor, w: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """``sum_n w_n * (per-example gradient of example n)`` for each parameter (Book-Keeping)."""
        return {k: _wsum(w, v) for k, v in self.per_example_grads(module, saved, g).items()}

    def cost_form(self, module: nn.Module, saved: Any) -> str:
        return "instantiate"


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


class _LinearLayer(_Layer):
    name = "Linear"

    def _ag(self, module: nn.Linear, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b = x.shape[0]
        return x.reshape(b, -1, x.shape[-1]), g.reshape(b, -1, g.shape[-1])

    def cost_form(self, module: nn.Linear, x: torch.Tensor) -> str:
        t = math.prod(x.shape[1:-1])
        return _choose(t, module.out_features, module.in_features)

    def sq_norms(self, module, x, g, form):
        out = {}
        if module.weight.requires_grad:
            a, gg = self._ag(module, x, g)
            out["weight"] = _weight_sq(a, gg, form)
        if module.bias is not None and module.bias.requires_grad:
            out["bias"] = _sq(g if g.dim() == 2 else g.reshape(g.shape[0], -1, g.shape[-1]).sum(1))
        return out

    def per_example_grads(self, module, x, g):
        a, gg = self._ag(module, x, g)
        out = {}
        if module.weight.requires_grad:
            out["weight"] = torch.bmm(gg.transpose(1, 2), a)
        if module.bias is not None and module.bias.requires_grad:
            out["bias"] = gg.sum(1)
        return out

    def weighted_grads(self, module, x, g, w):
        a, gg = self._ag(module, x, g)
        gw = gg * w.to(gg.dtype)[:, None, None]
        out = {}
        if module.weight.requires_grad:
            out["weight"] = gw.reshape(-1, gw.shape[-1]).t().mm(a.reshape(-1, a.shape[-1]).to(gw.dtype))
        if module.bias is not None and module.bias.requires_grad:
            out["bias"] = gw.sum((0, 1))
        return out


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


class _ConvLayer(_Layer):
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
            out["bias"] = _sq(g.reshape(g.shape[0], g.shape[1], -1).sum(2))
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


def _conv_out_positions(module, spatial) -> int:
    pad = module._reversed_padding_repeated_twice
    t = 1
    for i, size in enumerate(spatial):
        j = len(spatial) - 1 - i  # the reversed padding list starts with the last dim
        total = size + pad[2 * j] + pad[2 * j + 1]
        k_eff = module.dilation[i] * (module.kernel_size[i] - 1) + 1
        t *= max(0, (total - k_eff) // module.stride[i] + 1)
    return t


class _EmbeddingLayer(_Layer):
    name = "Embedding"

    def min_dim(self, module):
        return 1

    def capture(self, module, args, label):
        if module.scale_grad_by_freq:
            raise ValueError(
                f"regops: Embedding {label!r} has scale_grad_by_freq=True: its gradient depends on the whole "
                "batch, so per-example gradients are not defined"
            )
        return super().capture(module, args, label)

    def _ig(self, ids, g):
        b = ids.shape[0]
        return ids.reshape(b, -1), g.reshape(b, -1, g.shape[-1])

    def _pad(self, module):
        return -1 if module.padding_idx is None else int(module.padding_idx)

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
        if module.padding_idx is not None:
            keep = flat_ids != self._pad(module)
        return i2, g2, flat_ids, rows, keep

    def per_example_grads(self, module, ids, g):
        i2, g2, _, _, _ = self._rows(module, ids, g)
        b = i2.shape[0]
        grad = g2.new_zeros(b, module.num_embeddings, g2.shape[-1])
        gsrc = g2
        if module.padding_idx is not None:
            gsrc = g2 * (i2 != self._pad(module)).unsqueeze(-1).to(g2.dtype)
        grad.scatter_add_(1, i2.unsqueeze(-1).expand_as(g2), gsrc)
        return {"weight": grad}

    def weighted_grads(self, module, ids, g, w):
        i2, g2, flat_ids, rows, keep = self._rows(module, ids, g)
        rows = (g2 * w.to(g2.dtype)[:, None, None]).reshape(-1, g2.shape[-1])
        if keep is not None:
            flat_ids, rows = flat_ids[keep], rows[keep]
        grad = rows.new_zeros(module.num_embeddings, rows.shape[-1])
        return {"weight": grad.index_add_(0, flat_ids, rows)}


class _NormLayer(_Layer):
    """LayerNorm / RMSNorm / GroupNorm: per-example grads of weight and bias from the normalized input."""

    def _xhat(self, module, x):
        raise NotImplementedError

    def _reduce(self, module, t):
        raise NotImplementedError

    def per_example_grads(self, module, x, g):
        out = {}
        weight = getattr(module, "weight", None)
        bias = getattr(module, "bias", None)
        if weight is not None and weight.requires_grad:
            xhat = self._xhat(module, _f32(x))  # a fresh tensor: multiply in place, no second temporary
            out["weight"] = self._reduce(module, xhat.mul_(_f32(g)))
        if bias is not None and bias.requires_grad:
            out["bias"] = self._reduce(module, _f32(g))
        return out


class _LayerNormLayer(_NormLayer):
    name = "LayerNorm"

    def min_dim(self, module):
        return len(module.normalized_shape) + 1

    def _xhat(self, module, x):
        return F.layer_norm(x, module.normalized_shape, eps=module.eps)

    def _reduce(self, module, t):
        k = len(module.normalized_shape)
        return t.reshape(t.shape[0], -1, *t.shape[t.dim() - k :]).sum(1)


class _RMSNormLayer(_LayerNormLayer):
    name = "RMSNorm"

    def _xhat(self, module, x):
        return F.rms_norm(x, module.normalized_shape, eps=module.eps)


class _GroupNormLayer(_NormLayer):
    name = "GroupNorm"

    def _xhat(self, module, x):
        return F.group_norm(x, module.num_groups, eps=module.eps)

    def _reduce(self, module, t):
        return t.reshape(t.shape[0], t.shape[1], -1).sum(2)


class _VmapLayer(_Layer):
    """Any module that treats examples independently: per-example gradients of its *own* parameters by
    ``torch.func.vmap`` over ``torch.func.vjp`` of the module (children keep their own handlers)."""

    name = "vmap"

    def capture(self, module, args, label):
        for a in args:
            if isinstance(a, torch.Tensor) and a.dim() == 0:
                raise ValueError(f"regops: {type(module).__name__} {label!r} got a 0-d tensor input")
        return args

    def per_example_grads(self, module, args, g):
        params = {k: p.detach() for k, p in module._parameters.items() if p is not None and p.requires_grad}
        in_dims = tuple(0 if isinstance(a, torch.Tensor) else None for a in args)

        def one(a_n, g_n):
            def f(p):
                batched = tuple(x.unsqueeze(0) if isinstance(x, torch.Tensor) else x for x in a_n)
                return torch.func.functional_call(module, p, batched)

            _, vjp = torch.func.vjp(f, params)
            return vjp(g_n.unsqueeze(0))[0]

        detached = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
        with torch.enable_grad():
            return torch.func.vmap(one, in_dims=(in_dims, 0))(detached, g.detach())


_LAYERS: list[tuple[type, _Layer]] = [
    (nn.Linear, _LinearLayer()),
    (nn.Conv1d, _ConvLayer()),
    (nn.Conv2d, _ConvLayer()),
    (nn.Conv3d, _ConvLayer()),
    (nn.Embedding, _EmbeddingLayer()),
    (nn.LayerNorm, _LayerNormLayer()),
    (nn.GroupNorm, _GroupNormLayer()),
]
if hasattr(nn, "RMSNorm"):
    _LAYERS.append((nn.RMSNorm, _RMSNormLayer()))
_VMAP = _VmapLayer()
SUPPORTED = "Linear, Conv1d/2d/3d, Embedding, LayerNorm, GroupNorm, RMSNorm"


def _layer_for(module: nn.Module) -> _Layer | None:
    for cls, layer in _LAYERS:
        # A subclass that overrides forward may compute something else: not ours to interpret.
        if isinstance(module, cls) and type(module).forward is cls.forward:
            return layer
    return None


# ----------------------------------------------------------------------------------------------- recorder
@dataclass
class _Entry:
    label: str
    module: nn.Module
    layer: _Layer
    params: dict[str, tuple[str, nn.Parameter]]  # local name -> (model name, parameter)
    form: str


@dataclass
class _Call:
    entry: _Entry
    saved: Any
    output: torch.Tensor | None = None  # kept only when the caller asks for output gradients directly
    grad: torch.Tensor | None = None  # kept for Book-Keeping clipping
    fired: int = 0


@dataclass
class _Results:
    sq: dict[str, torch.Tensor] = field(default_factory=dict)  # model param name -> [B]
    dense: dict[str, torch.Tensor] = field(default_factory=dict)  # shared params: per-example grads


class _Recorder:
    """Records the supported layers' forward calls and turns output gradients into per-example squared norms.

    This is the reusable core (also used by the Hessian family): :meth:`attach` / :meth:`detach` the forward
    hooks, :meth:`contribute` turns one call's output gradient into per-parameter contributions, and
    :meth:`squared_norms` returns ``{model parameter name: [B] float32}`` squared per-example norms of the
    gradients delivered since the last :meth:`reset`, unscaled (as autograd delivered them).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        forms: str | Mapping[str, str] | None = None,
        unsupported: str = "error",
        retain_signals: bool = False,
        hook_outputs: bool = True,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"regops: model must be a torch.nn.Module, got {type(model).__name__}")
        if unsupported not in ("error", "vmap"):
            raise ValueError(f"regops: unsupported must be 'error' or 'vmap', got {unsupported!r}")
        self.model = model
        self.retain_signals = retain_signals
        self.hook_outputs = hook_outputs
        # One backward per forward (the context manager) without clipping: a call's input is not needed after
        # its contribution. Several backward passes (per_sample_squared_norms) or Book-Keeping keep it.
        self.release_saved = hook_outputs and not retain_signals
        self.entries = self._discover(model, forms, unsupported)
        self.calls: list[_Call] = []
        self.batch: int | None = None
        self.results = _Results()
        self.use_count: dict[str, int] = {}
        self.handles: list[Any] = []
        self.active = False
        self.suspended = False

    # -- discovery
    @staticmethod
    def _discover(model: nn.Module, forms, unsupported: str) -> list[_Entry]:
        names = {id(p): n for n, p in model.named_parameters()}
        if isinstance(forms, str) or forms is None:
            default, per = forms or "auto", {}
        else:
            default, per = "auto", dict(forms)
        for f in [default, *per.values()]:
            if f not in FORMS:
                raise ValueError(f"regops: form must be one of {FORMS}, got {f!r}")
        entries, seen = [], set()
        for label, module in model.named_modules():
            if id(module) in seen:
                continue
            seen.add(id(module))
            own = {k: (names[id(p)], p) for k, p in module._parameters.items() if p is not None and p.requires_grad}
            if not own:
                continue
            layer = _layer_for(module)
            if layer is None:
                if unsupported == "vmap":
                    layer = _VMAP
                else:
                    raise ValueError(
                        f"regops: per-example gradient norms do not support module {label or '<root>'!r} "
                        f"({type(module).__name__}) with trainable parameters {sorted(own)}; supported: "
                        f"{SUPPORTED}. Freeze those parameters, or pass unsupported='vmap' to compute this "
                        "module's per-example gradients exactly with torch.func (valid when the module "
                        "treats the examples of a batch independently)."
                    )
            entries.append(_Entry(label, module, layer, own, per.pop(label, default)))
        if per:
            raise ValueError(f"regops: forms names unknown or parameter-free modules: {sorted(per)}")
        return entries

    # -- hooks
    def attach(self) -> None:
        self.active = True
        for entry in self.entries:
            self.handles.append(entry.module.register_forward_hook(self._forward_hook(entry)))

    def detach_forward(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def close(self) -> None:
        self.detach_forward()
        self.active = False

    def _forward_hook(self, entry: _Entry) -> Callable:
        def hook(module, args, output):
            if self.suspended or not isinstance(output, torch.Tensor) or not output.requires_grad:
                return None
            saved = entry.layer.capture(module, args, entry.label or "<root>")
            first = saved[0] if isinstance(saved, tuple) else saved
            batch = first.shape[0] if isinstance(first, torch.Tensor) else None
            if batch is not None and self.batch is not None and batch != self.batch:
                raise ValueError(
                    f"regops: {type(module).__name__} {entry.label!r} saw batch size {batch} but earlier "
                    f"layers saw {self.batch}; per-example gradients need dim 0 to be the batch in every "
                    "layer (no reshaping the batch into other dims), one batch per forward"
                )
            self.batch = batch if self.batch is None else self.batch
            call = _Call(entry, saved)
            self.calls.append(call)
            for name, _ in entry.params.values():
                self.use_count[name] = self.use_count.get(name, 0) + 1
            if self.hook_outputs:
                output.register_hook(self._grad_hook(call))
            else:
                call.output = output
            return None

        return hook

    def _grad_hook(self, call: _Call) -> Callable:
        def hook(grad):
            if self.active:
                self.contribute(call, grad)
            return None

        return hook

    # -- contributions
    def reset(self) -> None:
        self.results = _Results()
        for call in self.calls:
            call.fired = 0
            call.grad = None

    def contribute(self, call: _Call, grad: torch.Tensor) -> None:
        """Add one forward call's per-example contributions, given its output gradient."""
        if call.fired:
            raise RuntimeError(
                "regops: a recorded forward was backpropagated twice; per-example gradient norms take "
                "exactly one backward pass per forward inside the block"
            )
        call.fired += 1
        if self.retain_signals:
            call.grad = grad
        entry, res = call.entry, self.results
        shared = [n for n, _ in entry.params.values() if self.use_count.get(n, 0) > 1]
        if len(shared) < len(entry.params):
            form = entry.form
            if form == "auto":
                form = entry.layer.cost_form(entry.module, call.saved)
            self.suspended = True
            try:
                sq = entry.layer.sq_norms(entry.module, call.saved, grad, form)
            finally:
                self.suspended = False
            for local, value in sq.items():
                name = entry.params[local][0]
                if name not in shared:
                    res.sq[name] = value
        if shared:
            self.suspended = True
            try:
                grads = entry.layer.per_example_grads(entry.module, call.saved, grad)
            finally:
                self.suspended = False
            for local, value in grads.items():
                name = entry.params[local][0]
                if name in shared:
                    value = _f32(value)
                    res.dense[name] = value if name not in res.dense else res.dense[name] + value
        if self.release_saved:
            # Autograd frees its saved activations as the backward proceeds; so do we, or the peak grows.
            call.saved = None

    def squared_norms(self) -> dict[str, torch.Tensor]:
        out = dict(self.results.sq)
        for name, dense in self.results.dense.items():
            out[name] = _sq(dense)
        return out

    # -- Book-Keeping
    def weighted_grads(self, weights: Callable[[_Entry, str], torch.Tensor]) -> dict[str, torch.Tensor]:
        """``sum_n w_n g_n`` per parameter (``weights(entry, param name) -> [B]``) from the kept signals."""
        out: dict[str, torch.Tensor] = {}
        for call in self.calls:
            if call.grad is None:
                continue
            entry = call.entry
            # Per-layer clipping gives all parameters of a module the same weights; flat clipping one weight.
            w = weights(entry, next(iter(entry.params.values()))[0])
            self.suspended = True
            try:
                grads = entry.layer.weighted_grads(entry.module, call.saved, call.grad, w)
            finally:
                self.suspended = False
            for local, value in grads.items():
                name = entry.params[local][0]
                out[name] = value if name not in out else out[name] + value
        return out


# ----------------------------------------------------------------------------------------------- public API
class PerSampleGradNorms:
    """Context manager recording per-example gradient norms of ``model`` during one forward + backward.

    Use :func:`per_sample_grad_norms` to create it. After the backward:

    * ``total``: ``[B]`` float32, ``||grad_theta loss_n||_2`` over all trainable parameters;
    * ``per_param``: ``{parameter name: [B]}`` per-example norms of each parameter's gradient;
    * ``per_param_sq``: the same, squared;
    * ``per_module``: ``{module name: [B]}`` over each module's parameters.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_reduction: str = "sum",
        *,
        forms: str | Mapping[str, str] | None = None,
        unsupported: str = "error",
        retain_signals: bool = False,
    ) -> None:
        if loss_reduction not in LOSS_REDUCTIONS:
            raise ValueError(f"regops: loss_reduction must be 'sum' or 'mean', got {loss_reduction!r}")
        self.loss_reduction = loss_reduction
        self._rec = _Recorder(model, forms=forms, unsupported=unsupported, retain_signals=retain_signals)
        self._params = {name: p for e in self._rec.entries for name, p in e.params.values()}
        self._received: set[str] = set()
        self._post_handles: list[Any] = []
        self._cache: dict[str, torch.Tensor] | None = None
        self._used = False

    def __enter__(self) -> PerSampleGradNorms:
        if self._used:
            raise RuntimeError("regops: a PerSampleGradNorms block can be entered once; create a new one per batch")
        self._used = True
        self._rec.attach()
        for name, p in self._params.items():
            self._post_handles.append(p.register_post_accumulate_grad_hook(self._received_hook(name)))
        return self

    def _received_hook(self, name: str) -> Callable:
        def hook(p):
            self._received.add(name)

        return hook

    def __exit__(self, *exc) -> None:
        self._rec.detach_forward()
        for h in self._post_handles:
            h.remove()
        self._post_handles.clear()
        if not self._rec.retain_signals:
            # Later backward passes through this graph are not ours; free the saved activations.
            self._rec.active = False
            for call in self._rec.calls:
                call.saved = None

    # -- results
    @property
    def batch_size(self) -> int:
        if self._rec.batch is None:
            raise RuntimeError(
                "regops: no forward pass of a tracked layer was recorded; run the model's forward (and the "
                "backward) inside the `with regops.per_sample_grad_norms(model) as norms:` block"
            )
        return self._rec.batch

    @property
    def per_param_sq(self) -> dict[str, torch.Tensor]:
        """``{parameter name: [B]}`` squared per-example gradient norms (float32; float64 models: float64)."""
        sq = self._rec.squared_norms()
        missing = sorted(n for n in self._received if n not in sq)
        if missing:
            raise RuntimeError(
                f"regops: parameters {missing} received gradients but their modules' forward was not "
                "called on this batch (a parameter used outside its module's forward, e.g. tied "
                "functionally, cannot be tracked); per-example norms would be wrong"
            )
        b = self.batch_size
        if not sq and self._rec.calls and all(not c.fired for c in self._rec.calls):
            raise RuntimeError("regops: no backward pass reached the tracked layers inside the block")
        scale = float(b * b) if self.loss_reduction == "mean" else 1.0
        out = {}
        for name, p in self._params.items():
            v = sq.get(name)
            if v is None:
                v = torch.zeros(b, dtype=torch.float32, device=p.device)
            out[name] = v * scale if scale != 1.0 else v
        return out

    @property
    def per_param(self) -> dict[str, torch.Tensor]:
        """``{parameter name: [B]}`` per-example gradient norms."""
        return {k: v.sqrt() for k, v in self.per_param_sq.items()}

    @property
    def per_module(self) -> dict[str, torch.Tensor]:
        """``{module name: [B]}`` per-example norms of the gradient of each tracked module's parameters."""
        sq = self.per_param_sq
        return {e.label: torch.stack([sq[n] for n, _ in e.params.values()]).sum(0).sqrt() for e in self._rec.entries}

    @property
    def total(self) -> torch.Tensor:
        """``[B]`` per-example gradient norms over all tracked parameters."""
        sq = self.per_param_sq
        devices = {v.device for v in sq.values()}
        dev = next(iter(devices))
        return torch.stack([v.to(dev) for v in sq.values()]).sum(0).sqrt()


def per_sample_grad_norms(
    model: nn.Module,
    loss_reduction: str = "sum",
    *,
    forms: str | Mapping[str, str] | None = None,
    unsupported: str = "error",
    retain_signals: bool = False,
) -> PerSampleGradNorms:
    r"""Per-example gradient norms of ``model``'s trainable parameters, from the ordinary backward pass.

    Run the forward and the backward of one batch inside the block; ``p.grad`` receives the ordinary summed
    gradient as usual, and the returned object then holds, for each example ``n`` of the batch,

    .. math:: \text{total}_n = \Big\|\nabla_\theta \ell_n\Big\|_2,\qquad
              \text{per\_param}[k]_n = \big\|\nabla_{\theta_k} \ell_n\big\|_2 ,

    where the loss is :math:`\sum_n \ell_n` (``loss_reduction="sum"``) or :math:`\frac1B \sum_n \ell_n`
    (``"mean"``). Norms are float32 ``[B]`` tensors (float64 for a float64 model); low-precision activations
    (bf16/fp16, autocast) are accumulated in float32.

    Args:
        model: built from Linear (2-D or N-D inputs), Conv1d/2d/3d (any stride, padding, padding_mode,
            dilation, groups), Embedding (``padding_idx``; not ``scale_grad_by_freq``), LayerNorm, GroupNorm,
            RMSNorm, with or without biases, and parameter-free modules. Frozen parameters are skipped. Dim 0
            of every layer's input is the batch. A module or parameter used several times (weight tying, a
            layer applied twice) is handled exactly by summing its per-example gradients before the norm.
        loss_reduction: how the loss combines the examples, ``"sum"`` or ``"mean"`` (over dim 0).
        forms: ``"auto"`` (per layer by cost: ghost iff ``2 T^2 <= p d``), ``"ghost"``, ``"instantiate"``,
            or a dict ``{module name: form}``.
        unsupported: ``"error"`` (default) raises for a module of another type with trainable parameters;
            ``"vmap"`` computes that module's per-example gradients with ``torch.func`` (exact when the module
            treats examples independently; costs ``B x`` its parameter count in memory).
        retain_signals: keep the layer inputs and output gradients after the backward, as needed by
            :func:`clip_per_sample_`.

    Example::

        >>> with regops.per_sample_grad_norms(model, loss_reduction="mean") as norms:
        ...     loss = F.cross_entropy(model(x), y)
        ...     loss.backward()
        >>> norms.total.shape          # torch.Size([B])
        >>> norms.per_param["0.weight"]
    """
    return PerSampleGradNorms(
        model, loss_reduction, forms=forms, unsupported=unsupported, retain_signals=retain_signals
    )


def clip_per_sample_(
    norms: PerSampleGradNorms,
    max_norm: float | Mapping[str, float],
    *,
    noise_multiplier: float = 0.0,
    generator: torch.Generator | None = None,
    per_layer: bool = False,
    eps: float = 1e-6,
) -> torch.Tensor:
    r"""DP-SGD: overwrite each tracked ``p.grad`` with the sum of per-example gradients clipped to
    ``max_norm``, plus Gaussian noise, from the one backward pass recorded by ``norms`` (Book-Keeping).

    .. math:: p.\mathrm{grad} = \frac1s\Big(\sum_n c_n \nabla_p \ell_n + \mathcal N(0, \sigma^2 C^2 I)\Big),
              \qquad c_n = \min\Big(1, \frac{C}{\|\nabla \ell_n\| + \epsilon}\Big),

    with ``s = B`` for ``loss_reduction="mean"`` and ``1`` for ``"sum"``. Flat clipping uses the norm over all
    tracked parameters; ``per_layer=True`` clips each module's parameters to its own bound (``max_norm`` a
    float or ``{module name: bound}``) and draws noise with ``C = sqrt(sum of squared bounds)``.
    Under ``DistributedDataParallel`` (process group initialised, world size > 1) the clipped gradients are
    averaged across ranks (as DDP averages) and the noise is drawn on rank 0 only.

    Args:
        norms: a finished block created with ``per_sample_grad_norms(model, ..., retain_signals=True)``.
        max_norm: clipping bound ``C > 0``.
        noise_multiplier: ``sigma >= 0``.
        generator: ``torch.Generator`` for the noise (on the parameters' device type).
        per_layer: clip per module instead of over all parameters.
        eps: added to the norms in the clip factor.

    Returns:
        ``[B]`` clip factors ``c_n`` (flat) or ``[L, B]`` (per layer, modules in ``norms.per_module`` order).

    Example::

        >>> with regops.per_sample_grad_norms(model, "mean", retain_signals=True) as norms:
        ...     F.cross_entropy(model(x), y).backward()
        >>> regops.clip_per_sample_(norms, max_norm=1.0, noise_multiplier=1.1)
        >>> opt.step()
    """
    if not isinstance(norms, PerSampleGradNorms):
        raise TypeError(f"regops: norms must come from regops.per_sample_grad_norms, got {type(norms).__name__}")
    rec = norms._rec
    if not rec.retain_signals:
        raise ValueError(
            "regops: clip_per_sample_ needs the layer signals: create the block with "
            "per_sample_grad_norms(model, ..., retain_signals=True)"
        )
    if isinstance(noise_multiplier, bool) or not noise_multiplier >= 0:
        raise ValueError(f"regops: noise_multiplier must be >= 0, got {noise_multiplier}")
    entries = rec.entries
    if isinstance(max_norm, Mapping):
        if not per_layer:
            raise ValueError("regops: a per-module max_norm mapping needs per_layer=True")
        unknown = set(max_norm) - {e.label for e in entries}
        if unknown:
            raise ValueError(f"regops: max_norm names unknown tracked modules: {sorted(unknown)}")
        bounds = {e.label: float(max_norm[e.label]) for e in entries}
    else:
        bounds = {e.label: float(max_norm) for e in entries}
    if any(not (c > 0) for c in bounds.values()):
        raise ValueError("regops: max_norm must be > 0")

    sq = norms.per_param_sq
    b = norms.batch_size
    if per_layer:
        factors = {}
        for e in entries:
            layer_norm = torch.stack([sq[n] for n, _ in e.params.values()]).sum(0).sqrt()
            factors[e.label] = (bounds[e.label] / (layer_norm + eps)).clamp(max=1.0)
        sensitivity = math.sqrt(sum(c * c for c in bounds.values()))
        stacked = torch.stack([factors[e.label] for e in entries]) if entries else torch.empty(0, b)
    else:
        c = next(iter(bounds.values())) if bounds else 1.0
        total = norms.total
        flat = (c / (total + eps)).clamp(max=1.0)
        factors = {e.label: flat for e in entries}
        sensitivity = c
        stacked = flat

    def weights(entry: _Entry, name: str) -> torch.Tensor:
        # Signals of a "mean" loss carry 1/B: the weights c_n then give (sum_n c_n g_n) / B directly.
        return factors[entry.label]

    grads = rec.weighted_grads(weights)
    scale = 1.0 / b if norms.loss_reduction == "mean" else 1.0
    dist = _distributed_world(norms)
    rank = torch.distributed.get_rank() if dist > 1 else 0
    for name, p in norms._params.items():
        value = grads.get(name)
        new = torch.zeros_like(p) if value is None else value.to(p.dtype)
        if noise_multiplier > 0 and rank == 0:
            noise = torch.randn(p.shape, generator=generator, device=p.device, dtype=torch.float32)
            std = noise_multiplier * sensitivity * scale
            if new.dtype == torch.float32:  # `new` is a fresh tensor of ours: add in place
                new.add_(noise, alpha=std)
            else:
                new = new + (noise * std).to(p.dtype)
        if dist > 1:
            torch.distributed.all_reduce(new)
            new.div_(dist)
        if p.grad is None:
            p.grad = new.detach()
        else:
            p.grad.copy_(new)
    return stacked


def _distributed_world(norms: PerSampleGradNorms) -> int:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return 1
    if not isinstance(norms._rec.model, nn.parallel.DistributedDataParallel):
        return 1
    return torch.distributed.get_world_size()


class DPClipping(PerSampleGradNorms):
    """A :class:`PerSampleGradNorms` block that ends with :func:`clip_per_sample_` (see :func:`dp_clipping`)."""

    def __init__(self, model: nn.Module, loss_reduction: str, clip_args: dict[str, Any], **kwargs: Any) -> None:
        super().__init__(model, loss_reduction, retain_signals=True, **kwargs)
        self._clip_args = clip_args
        self._frozen: list[nn.Parameter] = []
        self._pre_handles: list[Any] = []
        self.clip_factors: torch.Tensor | None = None

    def _skippable(self) -> list[tuple[nn.Module, nn.Parameter]]:
        """Linear / Conv weights used by one module: their autograd gradient would be overwritten anyway."""
        owners: dict[int, int] = {}
        for e in self._rec.entries:
            for _, p in e.params.values():
                owners[id(p)] = owners.get(id(p), 0) + 1
        out = []
        for e in self._rec.entries:
            if isinstance(e.layer, (_LinearLayer, _ConvLayer)) and "weight" in e.params:
                w = e.params["weight"][1]
                if owners[id(w)] == 1:
                    out.append((e.module, w))
        return out

    def __enter__(self) -> DPClipping:
        super().__enter__()
        if _distributed_world(self) > 1:
            return self  # DDP reduces every parameter's gradient: leave autograd as it is
        # The weight leaves requires_grad only while its module runs forward: the graph then has no edge to it,
        # so autograd never computes its gradient, while the norms (computed in backward) still see it trainable.
        for module, weight in self._skippable():
            self._frozen.append(weight)
            self._pre_handles.append(module.register_forward_pre_hook(_freeze_weight))
            self._pre_handles.append(module.register_forward_hook(_thaw_weight))
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        for h in self._pre_handles:
            h.remove()
        self._pre_handles.clear()
        for weight in self._frozen:
            weight.requires_grad_(True)
        self._frozen.clear()
        super().__exit__(exc_type, exc, tb)
        if exc_type is None:
            self.clip_factors = clip_per_sample_(self, **self._clip_args)


def _thaw_weight(module: nn.Module, args: tuple, output: Any) -> None:
    module.weight.requires_grad_(True)


def _freeze_weight(module: nn.Module, args: tuple) -> tuple | None:
    """Freeze the weight for this forward. With no trainable bias the output would then leave the graph: make
    the input require grad so the output gradient still reaches the recorder (autograd computes the input
    gradient instead of the weight gradient, at the same cost)."""
    if not torch.is_grad_enabled():
        return None
    module.weight.requires_grad_(False)
    bias = getattr(module, "bias", None)
    if bias is not None and bias.requires_grad:
        return None
    x = args[0] if args else None
    if isinstance(x, torch.Tensor) and x.is_floating_point() and not x.requires_grad:
        return (x.detach().requires_grad_(True), *args[1:])
    return None


def dp_clipping(
    model: nn.Module,
    max_norm: float | Mapping[str, float],
    *,
    loss_reduction: str = "mean",
    noise_multiplier: float = 0.0,
    generator: torch.Generator | None = None,
    per_layer: bool = False,
    forms: str | Mapping[str, str] | None = None,
    unsupported: str = "error",
) -> DPClipping:
    r"""DP-SGD step in one block: run the forward and backward inside; on exit every tracked ``p.grad`` holds
    the clipped, noised sum of :func:`clip_per_sample_` (divided by ``B`` for ``loss_reduction="mean"``).

    Since the clipped gradients are rebuilt from the recorded signals (Book-Keeping), autograd is spared the
    Linear/Conv weight gradients it would otherwise compute and throw away: inside the block those weights
    have ``requires_grad=False`` (restored on exit; not under DDP, which needs every gradient). The object
    also holds the norms (``total``, ``per_param``) and, after the block, ``clip_factors``.

    Example::

        >>> with regops.dp_clipping(model, max_norm=1.0, noise_multiplier=1.1, generator=g):
        ...     F.cross_entropy(model(x), y).backward()
        >>> opt.step()
    """
    bounds = list(max_norm.values()) if isinstance(max_norm, Mapping) else [max_norm]
    if any(isinstance(c, bool) or not isinstance(c, (int, float)) or not c > 0 for c in bounds):
        raise ValueError(f"regops: max_norm must be > 0, got {max_norm!r}")
    if (
        isinstance(noise_multiplier, bool)
        or not isinstance(noise_multiplier, (int, float))
        or not noise_multiplier >= 0
    ):
        raise ValueError(f"regops: noise_multiplier must be >= 0, got {noise_multiplier!r}")
    clip_args = dict(max_norm=max_norm, noise_multiplier=noise_multiplier, generator=generator, per_layer=per_layer)
    return DPClipping(model, loss_reduction, clip_args, forms=forms, unsupported=unsupported)


# --------------------------------------------------------------------------------------------- reusable core
def per_sample_squared_norms(
    model: nn.Module,
    forward: Callable[[], torch.Tensor],
    signals: Callable[[torch.Tensor], Iterable[torch.Tensor]] | Iterable[torch.Tensor],
    *,
    forms: str | Mapping[str, str] | None = None,
    unsupported: str = "error",
) -> list[dict[str, torch.Tensor]]:
    r"""Per-example squared gradient norms of pseudo-losses ``<output_n, s_n>``: one forward, a backward each.

    Runs ``output = forward()`` once with the recorder attached, then for every signal ``s`` (same shape as
    ``output``; from ``signals(output)`` if a callable) computes, without touching ``p.grad`` and without
    computing any parameter gradient,

    .. math:: r_s[k]_n = \Big\|\frac{\partial\langle \mathrm{output}_n, s_n\rangle}{\partial\theta_k}\Big\|^2

    for every tracked parameter name ``k`` and example ``n`` (float32 ``[B]``). It shares its recorder with
    :func:`per_sample_grad_norms`; the exact Gauss-Newton trace, for one, is
    ``sum_c sum_k r_{s_c}[k]`` with ``s_c = `` the columns of a square root of the loss Hessian.

    Example::

        >>> from regops.grad_norms import per_sample_squared_norms
        >>> eye = torch.eye(10)   # one pseudo-loss per output coordinate c: <output_n, e_c>
        >>> sq = per_sample_squared_norms(model, lambda: model(x), lambda o: [eye[c].expand_as(o) for c in range(10)])
        >>> sq[3]["fc.weight"].shape   # torch.Size([B]): ||d output_n[3] / d fc.weight||^2 per example
    """
    rec = _Recorder(model, forms=forms, unsupported=unsupported, hook_outputs=False)
    rec.attach()
    try:
        output = forward()
    finally:
        rec.detach_forward()
    if not isinstance(output, torch.Tensor):
        raise TypeError(f"regops: forward() must return a tensor, got {type(output).__name__}")
    calls = [c for c in rec.calls if c.output is not None]
    names = [n for e in rec.entries for n, _ in e.params.values()]
    params = {n: p for e in rec.entries for n, p in e.params.values()}
    results = []
    try:
        for s in signals(output) if callable(signals) else signals:
            rec.reset()
            if calls:
                grads = torch.autograd.grad(output, [c.output for c in calls], s, retain_graph=True, allow_unused=True)
                for call, g in zip(calls, grads, strict=True):
                    if g is not None:
                        rec.contribute(call, g)
            sq = rec.squared_norms()
            b = rec.batch or output.shape[0]
            results.append({n: sq.get(n, torch.zeros(b, dtype=torch.float32, device=params[n].device)) for n in names})
    finally:
        rec.close()
        for c in rec.calls:
            c.output = None
    return results
