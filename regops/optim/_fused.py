"""``regops.optim.AdamW`` and ``regops.optim.SGD``: torch's optimizers as one multi-tensor pass, plus regularizers
composed into the same pass (decay modes, Grokfast, annealed noise, coordinate-wise and adaptive clipping, AdamP's
radial projection)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch

from regops._core import rng
from regops._core.validate import is_dtensor
from regops.optim import _adamp, ops
from regops.optim import reference as ref

DECAYS = ("coupled", "decoupled", "cautious", "l2sp", "ewc")
_EXTRA_DEFAULTS = {"grokfast": None, "grad_noise": None, "clip_coord": None, "agc": None, "adamp": None}


def _pair(value: Any, name: str, check: Callable[[float, float], bool], what: str) -> tuple[float, float] | None:
    if value is None:
        return None
    try:
        a, b = (float(v) for v in value)
    except (TypeError, ValueError):
        raise TypeError(f"regops: {name} must be a pair of numbers {what}, got {value!r}") from None
    if not check(a, b):
        raise ValueError(f"regops: {name} must be {what}, got {value!r}")
    return a, b


def check_extras(group: dict[str, Any]) -> None:
    """Validate (and normalise in place) the regularizer options of a parameter group."""
    decay = group["decay"]
    if decay not in DECAYS:
        raise ValueError(f"regops: decay must be one of {DECAYS}, got {decay!r}")
    group["grokfast"] = _pair(group["grokfast"], "grokfast", lambda a, l: 0 <= a < 1, "(alpha in [0, 1), lamb)")
    noise_ok = lambda eta, gamma: eta >= 0 and gamma >= 0
    group["grad_noise"] = _pair(group["grad_noise"], "grad_noise", noise_ok, "(eta >= 0, gamma >= 0)")
    clip = group["clip_coord"]
    if clip is not None and not float(clip) > 0:
        raise ValueError(f"regops: clip_coord must be positive, got {clip!r}")
    agc = group["agc"]
    if agc is not None:
        agc = (agc, 1e-3) if isinstance(agc, (int, float)) else agc
        group["agc"] = _pair(agc, "agc", lambda c, e: c > 0 and e >= 0, "clip > 0 or (clip > 0, eps >= 0)")
    group["adamp"] = _adamp.options(group["adamp"])
    _adamp.check_decay(group)


def _aligned(spec: Any, group: dict[str, Any], name: str) -> list[torch.Tensor | None]:
    """``spec`` (a sequence aligned with the group's parameters, or a mapping by parameter name or parameter) as one
    entry per parameter."""
    params = group["params"]
    if isinstance(spec, Mapping):
        names = group.get("param_names")
        if all(isinstance(k, str) for k in spec):
            if names is None:
                raise ValueError(
                    f"regops: {name} is keyed by parameter names: pass the parameters as model.named_parameters() "
                    f"(or {name} as a list aligned with the parameters)"
                )
            return [spec.get(n) for n in names]
        return [spec.get(p) for p in params]
    values = list(spec)
    if len(values) != len(params):
        raise ValueError(f"regops: {name} has {len(values)} tensors for {len(params)} parameters")
    return values


def _buffer(value: torch.Tensor, p: torch.Tensor, name: str) -> torch.Tensor:
    if tuple(value.shape) != tuple(p.shape):
        raise ValueError(f"regops: {name} of shape {tuple(value.shape)} for a parameter of shape {tuple(p.shape)}")
    return value.detach().to(device=p.device, dtype=p.dtype).clone(memory_format=torch.contiguous_format)


class FusedOptimizer(torch.optim.Optimizer):
    """What AdamW and SGD share: the state, the regularizer options and the step as one ``regops::optim_step`` call
    per device. ``step`` honours ``grad_scale``/``found_inf`` (arguments, or the attributes GradScaler sets)."""

    _step_supports_amp_scaling = True
    method = "adam"

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any], generator: torch.Generator | None) -> None:
        if defaults.pop("differentiable", False):
            raise NotImplementedError("regops: differentiable=True is not supported (the step is one fused kernel)")
        defaults.update(fused=True)  # steps live on the parameters' device (torch's rule for fused optimizers)
        self._generator = generator
        self._hyper_cache: dict[tuple, tuple[tuple, torch.Tensor]] = {}
        self._ready: dict[torch.Tensor, list[str]] = {}  # parameters whose state holds the step's buffers
        self._scratch: dict[tuple, torch.Tensor] = {}  # adamp's update buffers (regops.optim._adamp)
        super().__init__(params, defaults)
        # copied into the state of the groups given; a group added later anchors at its parameters' values
        self.defaults.update(anchor=None, fisher=None)

    # ------------------------------------------------------------------------------------------ groups and state
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        anchor = param_group.pop("anchor", self.defaults.get("anchor"))
        fisher = param_group.pop("fisher", self.defaults.get("fisher"))
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group.pop("anchor", None)
        group.pop("fisher", None)
        check_extras(group)
        if group["decay"] in ("l2sp", "ewc"):
            anchors = _aligned(anchor, group, "anchor") if anchor is not None else [None] * len(group["params"])
            for p, a in zip(group["params"], anchors, strict=True):
                self.state[p]["anchor"] = _buffer(a if a is not None else p, p, "anchor")
        if group["decay"] == "ewc":
            if fisher is None:
                raise ValueError("regops: decay='ewc' needs fisher= (e.g. regops.empirical_fisher_diagonal(...))")
            for p, f in zip(group["params"], _aligned(fisher, group, "fisher"), strict=True):
                if f is None:
                    raise ValueError("regops: fisher has no entry for one of the parameters")
                self.state[p]["fisher"] = _buffer(f, p, "fisher")

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._ready, self._scratch = {}, {}
        for group in self.param_groups:
            for key, value in self._group_defaults().items():
                group.setdefault(key, value)
            group["fused"] = True

    def _group_defaults(self) -> dict[str, Any]:
        return {"decay": self.defaults["decay"], "maximize": False, "foreach": None, "capturable": False,
                **_EXTRA_DEFAULTS}  # fmt: skip

    def _state_names(self, group: dict[str, Any]) -> list[str]:
        raise NotImplementedError

    def _buffer_names(self, group: dict[str, Any], names: list[str]) -> list[str]:
        """Every per-parameter buffer of the group's step: one list object per distinct set (``_init_state``
        recognises a prepared state by it)."""
        key = (*names, "grokfast_ema") if group["grokfast"] is not None else tuple(names)
        return self.__dict__.setdefault("_buffer_sets", {}).setdefault(key, list(key))

    def _init_state(self, p: torch.Tensor, names: list[str]) -> dict[str, Any]:
        """The state of ``p`` with every buffer in ``names``, contiguous (the kernels' layout); loaded states (torch's
        keep the parameter's memory format) are made contiguous once."""
        state = self.state[p]
        if self._ready.get(p) is names:  # checked since the state was last loaded, with the same buffers
            return state
        if "step" not in state:
            # torch's SGD keeps no count: a loaded momentum buffer means the steps have begun
            started = "momentum_buffer" in state
            state["step"] = torch.full((), float(started), dtype=torch.float32, device=_device(p))
        for name in names:
            if name not in state:
                state[name] = torch.zeros_like(p, memory_format=torch.contiguous_format)
            elif not _local(state[name]).is_contiguous():
                state[name] = state[name].contiguous()
        self._ready[p] = names
        return state

    def _hyper(self, group: dict[str, Any], device: torch.device) -> torch.Tensor:
        """The group's hyper-parameters as one float64 device tensor (rebuilt only when a value changes)."""
        gf = group["grokfast"] or (0.0, 0.0)
        noise = group["grad_noise"] or (0.0, 0.0)
        values = (*self._base_hyper(group), group["weight_decay"], *gf, *noise, float(group["clip_coord"] or 0.0))
        values += tuple(group["adamp"] or ())  # H_ADAMP_*: read by the projection only
        if any(isinstance(v, torch.Tensor) for v in values):  # a tensor lr: read on the device, never synced
            return torch.stack([torch.as_tensor(v, dtype=torch.float64).to(device).reshape(()) for v in values])
        key = (id(group), str(device))
        hit = self._hyper_cache.get(key)
        if hit is None or hit[0] != values:
            hit = self._hyper_cache[key] = (values, torch.tensor(values, dtype=torch.float64, device=device))
        return hit[1]

    def _base_hyper(self, group: dict[str, Any]) -> tuple:
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(
        self,
        closure: Callable[[], Any] | None = None,
        *,
        grad_scale: torch.Tensor | None = None,
        found_inf: torch.Tensor | None = None,
    ) -> Any:
        """One step for every parameter with a gradient.

        Args:
            closure: re-evaluates the model and returns the loss (optional).
            grad_scale, found_inf: GradScaler's scale and inf flag (device tensors): gradients are divided by the
                scale in the kernel, and a nonzero ``found_inf`` skips the step (parameters, states and step counts
                unchanged) without a host synchronisation. ``GradScaler.step(optimizer)`` passes them.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = grad_scale if grad_scale is not None else getattr(self, "grad_scale", None)
        found_inf = found_inf if found_inf is not None else getattr(self, "found_inf", None)
        for group in self.param_groups:
            self.group_step(group, grad_scale, found_inf)
        return loss

    def group_step(
        self,
        group: dict[str, Any],
        grad_scale: torch.Tensor | None,
        found_inf: torch.Tensor | None,
        restore: Mapping[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        """The step of one parameter group. ``restore``: parameter -> the values to start from (SAM's unperturbed
        parameters, read in the same pass)."""
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        sharded = is_dtensor(*group["params"])
        for p in group["params"]:
            if p.grad is not None:
                if p.grad.is_sparse:
                    raise RuntimeError("regops: sparse gradients are not supported")
                by_device.setdefault(_device(p) if sharded else p.device, []).append(p)
        for device, params in by_device.items():
            self._device_step(group, params, device, grad_scale, found_inf, restore)

    def _device_step(self, group, params, device, grad_scale, found_inf, restore) -> None:
        names = self._state_names(group)
        buffers = self._buffer_names(group, names)
        states = [self._init_state(p, buffers) for p in params]
        lists = [[s[name] for s in states] for name in names] + [[] for _ in range(3 - len(names))]
        decay = group["decay"]
        ema = [s["grokfast_ema"] for s in states] if group["grokfast"] is not None else []
        anchors = [s["anchor"] for s in states] if decay in ("l2sp", "ewc") else []
        fishers = [s["fisher"] for s in states] if decay == "ewc" else []
        restored = [restore.get(p, p) for p in params] if restore else []
        sharded = is_dtensor(*params)
        local = _dtensor().local if sharded else _dense  # parameters: a non-contiguous one is updated in a copy
        buffer = _dtensor().local if sharded else _same  # states: contiguous already (_init_state)
        ps, gs = local(params), [g.contiguous() for g in local([p.grad for p in params])]
        seed, offsets = None, [0] * len(params)
        if group["grad_noise"] is not None and group["grad_noise"][0] > 0:
            seed = rng.philox_seed(device, sum(p.numel() for p in params), self._generator)
            if sharded:  # every rank draws the same noise for the elements it holds
                seed, offsets = _dtensor().agreed_seed(seed, params), _dtensor().elem_offsets(params)
        ws = local(restored) if restored else ps
        sums = row_scales = None
        if group["agc"] is not None or group["adamp"] is not None:  # one pass of row sums serves both
            sums = ops.dots(gs, ws, [], True)
        if group["agc"] is not None:
            row_scales = self._agc_scales(group, sums, params, grad_scale)
        method = self.method if self.method == "adam" or not group.get("nesterov") else "nesterov"
        hyper = self._hyper(group, device)
        args = [
            ps, gs, *(buffer(x) for x in lists), [s["step"] for s in states], buffer(ema), buffer(anchors),
            buffer(fishers), local(restored), row_scales, hyper, self._ids_of(params), offsets,
            method, decay if decay != "coupled" or group["weight_decay"] != 0 else "none", group["maximize"],
            group["clip_coord"] is not None, seed, grad_scale, found_inf,
        ]  # fmt: skip
        if group["adamp"] is not None:
            _adamp.check_decay(group)
            _adamp.step(args, ws, sums, params, grad_scale, found_inf, self._scratch)
        else:
            ops.step(*args)
        if not sharded:
            for p, d in zip(params, ps, strict=True):
                if d is not p:  # a non-contiguous parameter was updated in a contiguous copy
                    p.copy_(d)

    def _agc_scales(self, group, sums, params, grad_scale) -> torch.Tensor:
        """Adaptive gradient clipping's factor per unit (row along dim 0; whole tensor for vectors), timm's rule:
        ``max = clip * max(|w_row|, eps)``, factor ``1`` where ``|g_row| < max`` else ``max / max(|g_row|, 1e-6)``.
        ``sums``: the row sums of (gradient, weights) of :func:`ops.dots`."""
        clip, eps = group["agc"]
        sums = _dtensor().reduce_rows(sums, params) if is_dtensor(*params) else sums
        gnorm = sums[:, 0].sqrt()
        if grad_scale is not None:
            gnorm = gnorm / grad_scale.to(gnorm)
        max_norm = sums[:, 2].sqrt().clamp(min=eps) * clip
        return torch.where(gnorm < max_norm, torch.ones_like(gnorm), max_norm / gnorm.clamp(min=1e-6))

    def _ids_of(self, params: list[torch.Tensor]) -> list[int]:
        """A fixed index per parameter (its position over the groups): the noise stream of the parameter."""
        ids = getattr(self, "_ids", None)
        if ids is None or len(ids) != sum(len(g["params"]) for g in self.param_groups):
            ids = self._ids = {p: k for k, p in enumerate(p for g in self.param_groups for p in g["params"])}
            if len(ids) > ref.MAX_PARAM_ID:
                raise ValueError(f"regops: grad_noise supports up to {ref.MAX_PARAM_ID} parameter tensors")
        return [ids[p] for p in params]


def _dtensor():
    """The DTensor paths (imported on first use: importing them imports torch.distributed.tensor)."""
    from regops.optim import dtensor

    return dtensor


def _device(p: torch.Tensor) -> torch.device:
    return p.to_local().device if is_dtensor(p) else p.device


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if is_dtensor(t) else t


def _same(ts: list[torch.Tensor]) -> list[torch.Tensor]:
    return ts


def _dense(ts: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [t if t.is_contiguous() else t.contiguous() for t in ts]


_EXTRAS_DOC = """    decay: the weight decay's form: ``"decoupled"`` (AdamW's ``w *= 1 - lr wd``), ``"coupled"``
            (``g += wd w``: torch's Adam and SGD), ``"cautious"`` (decoupled, only where the update and ``w``
            agree in sign: ``w -= lr wd [u w >= 0] w``), ``"l2sp"`` (``g += wd (w - anchor)``: the gradient of
            ``wd/2 ||w - anchor||^2``; ``anchor`` defaults to the parameters at construction) or ``"ewc"``
            (``g += wd F (w - anchor)``, ``F`` = ``fisher``).
        anchor, fisher: tensors aligned with the parameters, or a mapping by parameter name (parameters given as
            ``model.named_parameters()``; ``regops.empirical_fisher_diagonal`` returns one) or by parameter.
        grokfast: ``(alpha, lamb)``: ``ema = alpha ema + (1 - alpha) g`` (``ema`` starts at the first gradient),
            ``g += lamb ema`` (one buffer per parameter).
        grad_noise: ``(eta, gamma)``: ``g += N(0, eta / (1 + t)^gamma)``, ``t`` the steps taken before, from
            regops' Philox stream (``generator``), indexed by (parameter, element): the same noise sharded or not,
            on every backend.
        clip_coord: ``c``: ``g = clamp(g, -c, c)``.
        agc: ``clip`` or ``(clip, eps)``: adaptive gradient clipping (NFNets, timm's ``adaptive_clip_grad``) per
            unit (row along dim 0; the whole tensor for vectors), ``eps`` 1e-3 by default.
        adamp: ``True``, ``(delta, wd_ratio)``, ``(delta, wd_ratio, eps)`` or a dict with those keys (defaults
            0.1, 0.1, 1e-8): AdamP's and SGDP's radial projection (Heo et al., ICLR 2021) on every parameter of two
            or more dims. With ``w`` the weights and ``g`` the gradient as given (unscaled, before agc, clipping,
            Grokfast and noise: the test is whether the loss is scale-invariant in ``w``), channel-wise first (rows
            along dim 0, ``d`` the row's size), then layer-wise (``d = w.numel()``): where every
            ``|cos(g, w)| < delta / sqrt(d)`` (``cos = g.w / (max(|g|, eps) max(|w|, eps))``), the update ``u``
            (Adam's ``m_hat / (sqrt(v_hat) + eps)``; SGD's momentum, Nesterov or plain direction) loses its radial
            part, ``u -= w_n (w_n . u)`` per row or for the whole tensor with ``w_n = w / (|w| + eps)``, and the
            decoupled decay is scaled by ``wd_ratio``. Decided on the device per tensor (no host
            synchronisation); the update is rounded to the parameters' dtype before the projection.
            ``AdamW(adamp=...)`` is AdamP (its ``nesterov=False``; pass AdamW's ``eps`` here if you change it).
            ``SGD(adamp=..., decay="decoupled")`` is SGDP with SGDP's ``weight_decay / (1 - momentum)`` and
            ``dampening=0`` (torch's first momentum is the gradient); the momentum buffer itself is not projected
            (the paper's algorithm). Refused with an error: ``decay="l2sp"`` and ``"ewc"``, and ``"coupled"`` with
            a nonzero ``weight_decay``: a decay added to the gradient points along ``w``, and the projection would
            remove it; use ``decay="decoupled"`` (or ``"cautious"``, whose mask then reads the projected update).
            DTensor parameters (FSDP2) work: row and tensor sums are completed over the mesh (Shard(0) rows are
            whole on a rank; a tensor's sums cost one all-reduce of a few numbers per step).
        generator: the ``torch.Generator`` of ``grad_noise`` (default: torch's default generator).

    Order: unscale (``grad_scale``), ``maximize``, agc, clip_coord, grokfast, noise, coupled decay, the update, the
    radial projection (adamp), the decoupled decay. ``step(grad_scale=, found_inf=)`` follows torch's fused
    optimizers (``GradScaler.step`` passes them): an inf skips the step on the device, with no host
    synchronisation. The step counts, hyper-parameters and the noise seed are device tensors (CUDA-graph
    capturable); parameters may be DTensors (FSDP2), each rank updating its shards. Every regularizer is
    keyword-only, also per parameter group.
"""


class AdamW(FusedOptimizer):
    __doc__ = (
        """Drop-in for ``torch.optim.AdamW`` (same arguments, same state, same results to an ulp per operation) as
    one multi-tensor pass per step: the C++ CPU kernel, or one Triton launch over all the parameters on a GPU.

    ``lr`` may be a tensor (read on the device). ``foreach``, ``fused`` and ``capturable`` are accepted (the step
    is always fused and capturable); ``differentiable=True`` is not supported.

    Example::

        >>> model = torch.nn.Linear(10, 3)
        >>> opt = regops.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05, grokfast=(0.98, 2.0))
        >>> loss = model(torch.randn(4, 10)).square().mean()
        >>> loss.backward()
        >>> opt.step()
        >>> opt.zero_grad()

    Args:
        params: parameters, ``named_parameters()`` or parameter groups.
        lr: the learning rate (a number or a tensor).
        betas: the moment coefficients.
        eps: added to the denominator.
        weight_decay: the decay's weight ``wd``.
        amsgrad: AMSGrad's maximum of the second moments.
        maximize: ascend instead.
        foreach: accepted, as torch's.
        capturable: accepted, as torch's.
        differentiable: only False.
        fused: accepted, as torch's.
    """
        + _EXTRAS_DOC
    )

    method = "adam"

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        decay: str = "decoupled",
        anchor: Any = None,
        fisher: Any = None,
        grokfast: tuple[float, float] | None = None,
        grad_noise: tuple[float, float] | None = None,
        clip_coord: float | None = None,
        agc: float | tuple[float, float] | None = None,
        adamp: bool | tuple[float, ...] | dict[str, float] | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        if isinstance(lr, float) and not 0.0 <= lr or isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError(f"regops: invalid learning rate: {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"regops: invalid epsilon value: {eps}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"regops: invalid betas: {betas}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"regops: invalid weight_decay value: {weight_decay}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
                        foreach=foreach, capturable=capturable, differentiable=differentiable, decay=decay,
                        anchor=anchor, fisher=fisher, grokfast=grokfast, grad_noise=grad_noise, clip_coord=clip_coord,
                        agc=agc, adamp=adamp)  # fmt: skip
        super().__init__(params, defaults, generator)

    def _group_defaults(self) -> dict[str, Any]:
        return {**super()._group_defaults(), "amsgrad": False}

    def _state_names(self, group: dict[str, Any]) -> list[str]:
        return ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if group["amsgrad"] else [])

    def _base_hyper(self, group: dict[str, Any]) -> tuple:
        b1, b2 = group["betas"]
        return (group["lr"], float(b1), float(b2), float(group["eps"]))


class SGD(FusedOptimizer):
    __doc__ = (
        """Drop-in for ``torch.optim.SGD`` (same arguments, same state, same results to an ulp per operation) as one
    multi-tensor pass per step. ``weight_decay`` is torch's coupled L2 unless ``decay`` says otherwise.

    Example::

        >>> model = torch.nn.Linear(10, 3)
        >>> opt = regops.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, agc=0.01)
        >>> model(torch.randn(4, 10)).square().mean().backward()
        >>> opt.step()

    Args:
        params: parameters, ``named_parameters()`` or parameter groups.
        lr: the learning rate (a number or a tensor).
        momentum: the momentum factor.
        dampening: momentum's dampening.
        weight_decay: the decay's weight ``wd``.
        nesterov: Nesterov momentum.
        maximize: ascend instead.
        foreach: accepted, as torch's.
        differentiable: only False.
        fused: accepted, as torch's.
    """
        + _EXTRAS_DOC
    )

    method = "sgd"

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | torch.Tensor = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
        decay: str = "coupled",
        anchor: Any = None,
        fisher: Any = None,
        grokfast: tuple[float, float] | None = None,
        grad_noise: tuple[float, float] | None = None,
        clip_coord: float | None = None,
        agc: float | tuple[float, float] | None = None,
        adamp: bool | tuple[float, ...] | dict[str, float] | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        if isinstance(lr, float) and lr < 0.0:
            raise ValueError(f"regops: invalid learning rate: {lr}")
        if momentum < 0.0:
            raise ValueError(f"regops: invalid momentum value: {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"regops: invalid weight_decay value: {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("regops: Nesterov momentum requires a momentum and zero dampening")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
                        maximize=maximize, foreach=foreach, differentiable=differentiable, decay=decay, anchor=anchor,
                        fisher=fisher, grokfast=grokfast, grad_noise=grad_noise, clip_coord=clip_coord,
                        agc=agc, adamp=adamp)  # fmt: skip
        super().__init__(params, defaults, generator)

    def _group_defaults(self) -> dict[str, Any]:
        return {**super()._group_defaults(), "nesterov": False}

    def _state_names(self, group: dict[str, Any]) -> list[str]:
        return ["momentum_buffer"] if group["momentum"] != 0 else []

    def _base_hyper(self, group: dict[str, Any]) -> tuple:
        return (group["lr"], float(group["momentum"]), float(group["dampening"]), 0.0)
