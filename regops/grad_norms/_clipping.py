"""DP-SGD clipping by Book-Keeping: ``clip_per_sample_`` and the ``dp_clipping`` block."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from regops._core.validate import is_dtensor
from regops.grad_norms._noise import add_noise, noise_seed
from regops.grad_norms._norms import PerSampleGradNorms
from regops.per_example._layers import ConvRule, LinearRule
from regops.per_example._recorder import check_reduction


def clip_per_sample_(
    norms: PerSampleGradNorms,
    max_norm: float | Mapping[str, float],
    *,
    noise_multiplier: float = 0.0,
    generator: torch.Generator | None = None,
    per_layer: bool = False,
    eps: float = 1e-6,
    expected_batch_size: int | None = None,
) -> torch.Tensor:
    r"""DP-SGD: set each tracked ``p.grad`` to its value before the block plus the sum of per-example
    gradients clipped to ``max_norm``, plus Gaussian noise, from the backward pass(es) recorded by ``norms``
    (Book-Keeping: no second backward).

    .. math:: p.\mathrm{grad} \mathrel{+}= \frac1s\Big(\sum_n c_n \nabla_p \ell_n
              + \mathcal N(0, \sigma^2 C^2 I)\Big),
              \qquad c_n = \min\Big(1, \frac{C}{\|\nabla \ell_n\| + \epsilon}\Big),

    over every example ``n`` of the block (all micro-batches), with ``s = expected_batch_size`` (DP-SGD's
    normalisation, which the privacy accounting assumes; Opacus divides by it too) or, when it is not given,
    the number of examples recorded, for ``loss_reduction="mean"``; ``s = 1`` for ``"sum"``. The gradient of
    the block's own backward is replaced; what ``p.grad`` held before the block is kept (accumulation across
    blocks works as in torch). Flat clipping uses the norm over all tracked parameters; ``per_layer=True``
    clips the parameters of each module (``norms.per_module``) to its own bound (``max_norm`` a float or
    ``{module name: bound}``) and draws noise with ``C = sqrt(sum of squared bounds)``. The noise is regops'
    Gaussian stream over the parameters flattened and concatenated (each element a function of one seed drawn
    from ``generator`` and its index), in float32. Under ``DistributedDataParallel`` the clipped gradients are
    averaged across ranks and the noise is drawn on rank 0 only; under FSDP2 each rank draws its shard of the
    single-process noise (rank 0's seed).

    Args:
        norms: a finished block created with ``per_sample_grad_norms(model, ..., retain_signals=True)``.
        max_norm: clipping bound ``C > 0``.
        noise_multiplier: ``sigma >= 0``.
        generator: ``torch.Generator`` for the noise (on the parameters' device type).
        per_layer: clip per module instead of over all parameters.
        eps: added to the norms in the clip factor.
        expected_batch_size: for ``"mean"``: the expected number of examples per step (``q * N`` under Poisson
            sampling), used instead of the realised count.

    Returns:
        ``[N]`` clip factors ``c_n`` (flat) or ``[L, N]`` (per layer, modules in ``norms.per_module`` order).

    Example::

        >>> F = torch.nn.functional
        >>> model = torch.nn.Sequential(torch.nn.Linear(20, 32), torch.nn.ReLU(), torch.nn.Linear(32, 5))
        >>> x, y = torch.randn(16, 20), torch.randint(0, 5, (16,))
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> with regops.per_sample_grad_norms(model, "mean", retain_signals=True) as norms:
        ...     F.cross_entropy(model(x), y).backward()
        >>> factors = regops.clip_per_sample_(norms, max_norm=1.0, noise_multiplier=1.1)
        >>> opt.step()
        >>> factors.shape, bool((factors <= 1).all())
        (torch.Size([16]), True)
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
    if expected_batch_size is not None and (
        isinstance(expected_batch_size, bool) or not isinstance(expected_batch_size, int) or expected_batch_size <= 0
    ):
        raise ValueError(f"regops: expected_batch_size must be a positive int, got {expected_batch_size!r}")
    groups = norms.module_groups()
    if isinstance(max_norm, Mapping):
        if not per_layer:
            raise ValueError("regops: a per-module max_norm mapping needs per_layer=True")
        unknown = set(max_norm) - set(groups)
        if unknown:
            raise ValueError(f"regops: max_norm names unknown tracked modules: {sorted(unknown)}")
        missing = set(groups) - set(max_norm)
        if missing:
            raise ValueError(f"regops: max_norm has no bound for modules {sorted(missing)}")
        bounds = {m: float(max_norm[m]) for m in groups}
    else:
        bounds = {m: float(max_norm) for m in groups}
    if any(not (c > 0) for c in bounds.values()):
        raise ValueError("regops: max_norm must be > 0")

    has_batch = any(mb.batch is not None for mb in rec.mbs)
    n_total = norms.batch_size if has_batch else 0
    if norms.loss_reduction == "mean":
        if expected_batch_size is None and n_total == 0:
            raise ValueError("regops: an empty batch with loss_reduction='mean' needs expected_batch_size")
        s = float(expected_batch_size if expected_batch_size is not None else n_total)
    else:
        s = 1.0
    offsets, start = [], 0
    for mb in rec.mbs:
        offsets.append(start)
        start += mb.batch or 0

    group_of = {n: m for m, names in groups.items() for n in names}
    if n_total == 0:
        factors: dict[str, torch.Tensor] = {}
        stacked = torch.empty(0)
        sensitivity = math.sqrt(sum(c * c for c in bounds.values())) if per_layer else next(iter(bounds.values()), 1.0)
    elif per_layer:
        sq = norms.per_param_sq
        factors = {}
        for m, names in groups.items():
            layer_norm = torch.stack([sq[n] for n in names]).sum(0).sqrt()
            factors[m] = (bounds[m] / (layer_norm + eps)).clamp(max=1.0)
        sensitivity = math.sqrt(sum(c * c for c in bounds.values()))
        stacked = torch.stack(list(factors.values())) if factors else torch.empty(0, n_total)
    else:
        c = next(iter(bounds.values())) if bounds else 1.0
        flat = (c / (norms.total + eps)).clamp(max=1.0)
        factors = {m: flat for m in groups}
        sensitivity = c
        stacked = flat

    sliced: dict[tuple[int, int], torch.Tensor] = {}

    def weights(index: int, name: str) -> torch.Tensor:
        # The weights carry the normalisation 1/s (no pass over the sums to divide them). Signals of a "mean"
        # loss carry 1/B_k: multiplying by B_k gives the per-example gradients of the micro-batch.
        key = (id(factors[group_of[name]]), index)
        w = sliced.get(key)
        if w is None:
            mb = rec.mbs[index]
            w = factors[group_of[name]][offsets[index] : offsets[index] + mb.batch]
            scale = (float(mb.batch) if norms.loss_reduction == "mean" else 1.0) / s
            if scale != 1.0:
                w = w * scale
            sliced[key] = w
        return w

    grads = rec.weighted_grads(weights) if n_total else None
    before = getattr(norms, "_grad_before", {})
    dist, tensor_parallel = _parallelism(norms)
    rank = torch.distributed.get_rank() if dist > 1 else 0
    params = norms._params
    sharded = (dist > 1 or tensor_parallel) and is_dtensor(*params.values())
    std = noise_multiplier * sensitivity / s
    # Under FSDP2 every rank draws (its generator advances as in one process) and rank 0's seed is used (under
    # tensor parallelism too: every rank adds its shards' part); under DDP rank 0 alone draws and adds the noise.
    seed = (
        noise_seed(params, generator, sharded) if noise_multiplier > 0 and params and (sharded or rank == 0) else None
    )
    base = 0
    for name, p in params.items():
        value = grads.pop(name) if grads is not None else None  # one full-size sum at a time
        if dist > 1 and is_dtensor(p) and _fsdp_over_tp(p):
            # FSDP2 over tensor parallelism: this rank's tensor-parallel block, averaged over FSDP2's dims
            from regops.grad_norms import dtensor

            noise = None if seed is None else (seed, base, std)
            p.grad = dtensor.fsdp_tensor_parallel_grad(value, p, noise, before.get(name))
            base += p.numel()
            continue
        if tensor_parallel and is_dtensor(p):  # this rank's shard of the sum: noised, wrapped, no communication
            from regops.grad_norms import dtensor

            noise = None if seed is None else (seed, base, std)
            p.grad = dtensor.tensor_parallel_grad(value, p, noise, before.get(name))
            base += p.numel()
            continue
        # a fresh tensor of ours (the sum was built for this call): scaled and noised in place
        new = torch.zeros(p.shape, dtype=p.dtype, device=p.device) if value is None else value.to(p.dtype)
        del value
        if is_dtensor(p):  # FSDP2: averaged over the mesh into p's placements (one reduce-scatter)
            from regops.grad_norms import dtensor

            # the noise of the average is the single-process noise / the ranks averaged over; each adds its shard
            new = dtensor.average_into(new, p, None if seed is None else (seed, base, std))
        else:
            if seed is not None and rank == 0:
                add_noise(new, seed, base, p.shape, [0] * p.dim(), std)
            if dist > 1:
                torch.distributed.all_reduce(new)
                new.div_(dist)
        base += p.numel()
        prev = before.get(name)
        p.grad = new.detach() if prev is None else prev + new.detach()
    return stacked


def _fsdp_over_tp(p: torch.Tensor) -> bool:
    from regops.grad_norms import dtensor

    return dtensor.fsdp_dims_over_tp(p) > 0


def _parallelism(norms: PerSampleGradNorms) -> tuple[int, bool]:
    """``(world, tensor_parallel)``: how many ranks' clipped sums are averaged (FSDP2 and DDP: each rank its own
    batch), and whether the parameters are tensor-parallel DTensors (``parallelize_module`` without FSDP2: every rank
    sees the same batch, nothing is averaged)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return 1, False
    if is_dtensor(*norms._params.values()):
        from torch.distributed.fsdp import FSDPModule

        if any(isinstance(m, FSDPModule) for m in norms._rec.model.modules()):
            return torch.distributed.get_world_size(), False
        return 1, True
    if isinstance(norms._rec.model, nn.parallel.DistributedDataParallel):
        return torch.distributed.get_world_size(), False
    return 1, False


class DPClipping(PerSampleGradNorms):
    """A `PerSampleGradNorms` block that ends with `clip_per_sample_` (create it with `dp_clipping`).

    Args:
        model: the model whose trainable parameters are tracked.
        loss_reduction: ``"sum"`` or ``"mean"``.
        clip_args: the keyword arguments of `clip_per_sample_` applied on exit.
        **kwargs: the other keyword arguments of `per_sample_grad_norms`.

    Example::

        >>> model = torch.nn.Linear(4, 2)
        >>> with regops.dp_clipping(model, max_norm=1.0, loss_reduction="sum") as step:
        ...     model(torch.randn(3, 4)).sum().backward()
        >>> isinstance(step, regops.DPClipping), step.clip_factors.shape
        (True, torch.Size([3]))
    """

    def __init__(self, model: nn.Module, loss_reduction: str, clip_args: dict[str, Any], **kwargs: Any) -> None:
        super().__init__(model, loss_reduction, retain_signals=True, **kwargs)
        self._rec.allow_empty = True
        self._clip_args = clip_args
        self._freezer: _Freezer | None = None
        self.clip_factors: torch.Tensor | None = None

    def _skippable(self) -> list[nn.Module]:
        """Linear / Conv modules with a tracked weight: its autograd gradient would be overwritten anyway. A tied
        weight too (an LM head sharing the embedding): it is frozen only while the head's own forward runs, its
        other uses keep their (cheap) autograd gradient, and the clipped sum is rebuilt from every use's signals."""
        return [
            e.module for e in self._rec.entries if isinstance(e.layer, (LinearRule, ConvRule)) and "weight" in e.params
        ]

    def __enter__(self) -> DPClipping:
        super().__enter__()  # sets p.grad apart: the clipped sum is added to it on exit (torch's accumulation)
        # Under FSDP2 the skipped gradients are skipped on every rank (an empty batch runs in the block too), so
        # FSDP2 reduce-scatters the same parameters everywhere: the clipped sum is the only weight gradient formed.
        # DDP all-reduces every parameter's gradient, except in forwards under its no_sync() (the private model's).
        model = self._rec.model
        ddp = model if isinstance(model, nn.parallel.DistributedDataParallel) else None
        self._freezer = _Freezer(self._rec, self._skippable(), ddp)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._freezer is not None:
            self._freezer.close()
        super().__exit__(exc_type, exc, tb)
        if exc_type is None:
            self.clip_factors = clip_per_sample_(self, **self._clip_args)
        else:
            for name, p in self._params.items():
                p.grad = self._grad_before.get(name)


class _Freezer:
    """A weight leaves ``requires_grad`` only while its module runs forward: the graph then has no edge to it, so
    autograd never computes its gradient, while the norms (computed in backward) still see it trainable. The
    tensors frozen are those in the module's slots when it runs (under FSDP2, its unsharded parameters), thawed
    when it returns. Not in the recorder's own forwards (the torch.func path runs the model on functional
    parameters)."""

    def __init__(self, rec: Any, modules: list[nn.Module], ddp: nn.parallel.DistributedDataParallel | None) -> None:
        self.rec, self.ddp = rec, ddp
        self.running: dict[int, list[torch.Tensor]] = {}  # id(module) -> what its running forward froze
        self.handles = []
        for module in modules:
            self.handles.append(module.register_forward_pre_hook(self._freeze))
            self.handles.append(module.register_forward_hook(self._thaw))

    def _off(self) -> bool:
        if self.ddp is not None and self.ddp.require_backward_grad_sync:
            return True
        return not torch.is_grad_enabled() or (self.rec.suspended and not self.rec.empty_forward)

    def _freeze(self, module: nn.Module, args: tuple) -> tuple | None:
        """Freeze the weight, and a trainable bias when the input carries the output into the graph (its clipped
        sum is rebuilt from the same signals: autograd is spared one pass over the output gradient). With neither
        a trainable bias nor an input requiring grad the output would leave the graph: make the input require grad
        so the output gradient still reaches the recorder (autograd computes the input gradient instead of the
        weight gradient, at the same cost)."""
        if self._off():
            return None
        frozen = self.running.setdefault(id(module), [])
        weight, bias = module.weight, getattr(module, "bias", None)
        x = args[0] if args else None
        with torch._C.DisableTorchFunction():  # flags only: nothing for the tracker to follow
            if weight.requires_grad:
                weight.requires_grad_(False)
                frozen.append(weight)
            if bias is not None and bias.requires_grad:
                if isinstance(x, torch.Tensor) and x.requires_grad and id(bias) in self.rec.param_names:
                    bias.requires_grad_(False)
                    frozen.append(bias)
                return None
            needs_grad = isinstance(x, torch.Tensor) and x.is_floating_point() and not x.requires_grad
        # the tracker follows the examples into the new input
        return (x.detach().requires_grad_(True), *args[1:]) if needs_grad else None

    def _thaw(self, module: nn.Module, args: tuple, output: Any) -> None:
        with torch._C.DisableTorchFunction():  # flags only: nothing for the tracker to follow
            for t in self.running.pop(id(module), ()):
                t.requires_grad_(True)

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        with torch._C.DisableTorchFunction():
            for frozen in self.running.values():  # a forward that raised
                for t in frozen:
                    t.requires_grad_(True)
        self.running.clear()


def dp_clipping(
    model: nn.Module,
    max_norm: float | Mapping[str, float],
    *,
    loss_reduction: str | None = None,
    noise_multiplier: float = 0.0,
    generator: torch.Generator | None = None,
    per_layer: bool = False,
    expected_batch_size: int | None = None,
    forms: str | Mapping[str, str] | None = None,
    unsupported: str = "error",
    batch_dim: int = 0,
) -> DPClipping:
    r"""DP-SGD step in one block: run the forward(s) and backward(s) inside (several micro-batches
    accumulate, like Opacus's virtual steps); on exit every tracked ``p.grad`` is its value before the block
    plus the clipped, noised sum of `clip_per_sample_` over all the block's examples, noise added once
    (divided by ``expected_batch_size``, or the number of examples, for ``loss_reduction="mean"``).

    Since the clipped gradients are rebuilt from the recorded signals (Book-Keeping), autograd is spared the
    Linear/Conv weight gradients it would otherwise compute and throw away: those weights leave
    ``requires_grad`` while their module runs forward (under FSDP2: its unsharded weights, so FSDP2 has nothing to
    reduce-scatter for them; under DDP only in forwards under ``no_sync()``, as the private model runs them: DDP's
    all-reduce carries every parameter). A batch of 0 examples may run inside the block (under FSDP2 every rank
    runs its forward and backward): it adds only the noise. The object also holds the norms (``total``,
    ``per_param``) and, after the block, ``clip_factors``.

    Args:
        model: the model whose trainable parameters are tracked.
        max_norm: clipping bound ``C > 0`` (or ``{module name: bound}`` with ``per_layer``).
        loss_reduction: ``"sum"`` or ``"mean"`` (required).
        noise_multiplier: ``sigma >= 0``.
        generator: ``torch.Generator`` for the noise (on the parameters' device type).
        per_layer: clip per module instead of over all parameters.
        expected_batch_size: for ``"mean"``: the expected number of examples per step.
        forms: as `per_sample_grad_norms`.
        unsupported: as `per_sample_grad_norms`.
        batch_dim: as `per_sample_grad_norms`.

    Returns:
        A context manager (`DPClipping`); on exit ``p.grad`` holds the clipped, noised gradient sum.

    Example::

        >>> F = torch.nn.functional
        >>> model = torch.nn.Sequential(torch.nn.Linear(20, 32), torch.nn.ReLU(), torch.nn.Linear(32, 5))
        >>> x, y = torch.randn(16, 20), torch.randint(0, 5, (16,))
        >>> opt, g = torch.optim.SGD(model.parameters(), lr=0.1), torch.Generator().manual_seed(0)
        >>> micro_batches = [(x[:8], y[:8]), (x[8:], y[8:])]
        >>> with regops.dp_clipping(model, max_norm=1.0, loss_reduction="mean", noise_multiplier=1.1,
        ...                         expected_batch_size=16, generator=g):
        ...     for xb, yb in micro_batches:
        ...         F.cross_entropy(model(xb), yb).backward()
        >>> opt.step()
    """
    check_reduction(loss_reduction)
    bounds = list(max_norm.values()) if isinstance(max_norm, Mapping) else [max_norm]
    if any(isinstance(c, bool) or not isinstance(c, (int, float)) or not c > 0 for c in bounds):
        raise ValueError(f"regops: max_norm must be > 0, got {max_norm!r}")
    if (
        isinstance(noise_multiplier, bool)
        or not isinstance(noise_multiplier, (int, float))
        or not noise_multiplier >= 0
    ):
        raise ValueError(f"regops: noise_multiplier must be >= 0, got {noise_multiplier!r}")
    if expected_batch_size is not None and (
        isinstance(expected_batch_size, bool) or not isinstance(expected_batch_size, int) or expected_batch_size <= 0
    ):
        raise ValueError(f"regops: expected_batch_size must be a positive int, got {expected_batch_size!r}")
    clip_args = dict(
        max_norm=max_norm,
        noise_multiplier=noise_multiplier,
        generator=generator,
        per_layer=per_layer,
        expected_batch_size=expected_batch_size,
    )
    return DPClipping(model, loss_reduction, clip_args, forms=forms, unsupported=unsupported, batch_dim=batch_dim)
