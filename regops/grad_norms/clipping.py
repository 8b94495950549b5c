"""DP-SGD clipping by Book-Keeping: ``clip_per_sample_`` and the ``dp_clipping`` block."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from regops.grad_norms.layers import ConvRule, LinearRule
from regops.grad_norms.norms import PerSampleGradNorms
from regops.grad_norms.recorder import _Entry


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
            if isinstance(e.layer, (LinearRule, ConvRule)) and "weight" in e.params:
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
