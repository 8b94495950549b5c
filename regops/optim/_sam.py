"""Sharpness-aware minimization as multi-tensor passes: SAM and ASAM, GSAM and LookSAM, around any base optimizer
(regops' AdamW and SGD fuse the restore into their step)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import torch

from regops._core.validate import is_dtensor
from regops.optim import ops
from regops.optim._fused import FusedOptimizer

_EPS = 1e-12  # the reference SAM's: scale = rho / (||g|| + 1e-12)


def _dtensor():
    """The DTensor paths (imported on first use: importing them imports torch.distributed.tensor)."""
    from regops.optim import dtensor

    return dtensor


def _device(p: torch.Tensor) -> torch.device:
    return p.to_local().device if is_dtensor(p) else p.device


class SAM(torch.optim.Optimizer):
    r"""Sharpness-aware minimization (Foret et al. 2021) around a base optimizer; ASAM (Kwon et al. 2021) with
    ``adaptive=True``. A drop-in for the widely used SAM class (davda54/sam): ``first_step``, ``second_step``,
    ``step(closure)``, per-group ``rho`` and ``adaptive``.

    First step: ``e = \rho\, T^2 g / (\lVert T g \rVert + 10^{-12})`` with ``T = |w|`` for ASAM, else 1,
    the norm over every parameter of every group; ``w += e`` after keeping ``w``. Second step: the base optimizer
    steps from the kept ``w`` with the gradient taken at ``w + e``.

    What differs from a loop over the parameters: the global norm is one multi-tensor reduction on the device (no
    host synchronisation; under FSDP2 one all-reduce of a scalar), the perturbation is one multi-tensor pass, and
    with ``regops.optim.AdamW``/``SGD`` as base the restore is read inside the base step's own pass. Restoring is
    exact (the kept parameters are copied back, not ``w + e - e``).

    GradScaler: ``first_step(grad_scaler=scaler)`` (or ``grad_scale=``) unscales in the kernels; a non-finite norm
    (an inf or NaN gradient) skips the perturbation, and the second step is skipped too, on the device, as torch's
    fused optimizers skip. ``scaler.step(optimizer)`` runs the second step (``step()`` without a closure after a
    first step)::

        scaler.scale(loss_fn(model(x), y)).backward()
        opt.first_step(zero_grad=True, grad_scaler=scaler)
        with regops.optim.preserve_bn_stats(model):
            scaler.scale(loss_fn(model(x), y)).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()

    DDP: the first backward may run under ``model.no_sync()`` (each rank perturbs by its own gradient, as in the
    SAM paper's m-sharpness); FSDP2 (DTensor parameters): each rank perturbs its shards, the norm is one all-reduce.

    Args:
        params: parameters or parameter groups.
        base_optimizer: the optimizer class (``regops.optim.SGD``, ``torch.optim.SGD``, ...), built on the same
            parameter groups with ``**kwargs``.
        rho: the neighbourhood radius (>= 0).
        adaptive: ASAM.
        **kwargs: the base optimizer's arguments (``lr``, ``momentum``, ...).

    Example::

        >>> model, loss_fn = torch.nn.Linear(10, 3), torch.nn.functional.cross_entropy
        >>> x, y = torch.randn(32, 10), torch.randint(0, 3, (32,))
        >>> opt = regops.optim.SAM(model.parameters(), regops.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
        >>> loss_fn(model(x), y).backward()
        >>> opt.first_step(zero_grad=True)
        >>> loss_fn(model(x), y).backward()
        >>> opt.second_step(zero_grad=True)
    """

    _step_supports_amp_scaling = True
    _keeps_grads = False  # the variant needs the first gradient in the second step

    def __init__(
        self,
        params: Iterable[Any],
        base_optimizer: type[torch.optim.Optimizer],
        rho: float = 0.05,
        adaptive: bool = False,
        **kwargs: Any,
    ) -> None:
        if not rho >= 0.0:
            raise ValueError(f"regops: invalid rho, should be non-negative: {rho}")
        if not (isinstance(base_optimizer, type) and issubclass(base_optimizer, torch.optim.Optimizer)):
            raise TypeError(f"regops: base_optimizer must be an optimizer class, got {base_optimizer!r}")
        super().__init__(params, dict(rho=rho, adaptive=adaptive, **self._variant_defaults(), **kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)
        self._pending = False  # a first step awaits its second
        self._first_inf: torch.Tensor | None = None
        self._passes = 0  # steps taken (LookSAM's schedule)

    def _variant_defaults(self) -> dict[str, Any]:
        return {}

    @property
    def needs_second_pass(self) -> bool:
        """Whether this step perturbs (so the loop must run a second forward and backward)."""
        return True

    # ------------------------------------------------------------------------------------------ steps
    def _with_grads(self) -> dict[torch.device, list[tuple[torch.Tensor, dict[str, Any]]]]:
        """The parameters with a gradient, per device."""
        out: dict[torch.device, list[tuple[torch.Tensor, dict[str, Any]]]] = {}
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    out.setdefault(_device(p) if self._sharded else p.device, []).append((p, group))
        return out

    def _local(self, ts: list[torch.Tensor]) -> list[torch.Tensor]:
        """The local shards of DTensors (plain tensors as they are)."""
        return _dtensor().local(ts) if self._sharded else ts

    def _note_sharded(self) -> None:
        """Whether the parameters are DTensors, looked up once per step."""
        self._sharded = is_dtensor(*(p for g in self.param_groups for p in g["params"]))

    def _buffer(self, p: torch.Tensor, name: str) -> torch.Tensor:
        state = self.state[p]
        if name not in state:
            state[name] = torch.empty_like(p, memory_format=torch.contiguous_format)
        return state[name]

    def _global_sums(self, a, b, w, params) -> torch.Tensor:
        """``[sum (|w| a)^2, sum a b, sum b^2]`` over every tensor (every rank's shards)."""
        per_tensor = ops.dots(self._local(a), self._local(b), self._local(w), False)
        return _dtensor().global_sums(per_tensor, params) if self._sharded else per_tensor.sum(0)

    @torch.no_grad()
    def first_step(
        self,
        zero_grad: bool = False,
        *,
        grad_scale: torch.Tensor | None = None,
        found_inf: torch.Tensor | None = None,
        grad_scaler: Any = None,
    ) -> None:
        """Keep ``w`` and move to ``w + e``. ``grad_scaler``/``grad_scale``: the gradients are scaled (AMP); then
        ``zero_grad`` zeroes them in place and keeps non-finite entries as NaN, so that the scaler sees a first-pass
        overflow in the second gradient. ``found_inf``: a nonzero value skips this step and the second one."""
        if grad_scaler is not None and grad_scale is None and grad_scaler.is_enabled():
            grad_scale = grad_scaler._get_scale_async()
        self._note_sharded()
        self._pending, self._first_inf = True, None
        if self.needs_second_pass:
            self._perturb(grad_scale, found_inf)
        if zero_grad and grad_scale is not None:
            # Zero in place, keeping an overflow as NaN (0 * inf): the second backward adds to it, so GradScaler
            # sees the first pass's overflow too and backs off (the step itself is skipped either way).
            grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
            if grads:
                torch._foreach_mul_(self._local(grads), 0.0)
        elif zero_grad:
            self.zero_grad()

    def _perturb(self, grad_scale: torch.Tensor | None, found_inf: torch.Tensor | None) -> None:
        by_device = self._with_grads()
        if not by_device:
            return
        sums = []
        for items in by_device.values():
            for adaptive in (False, True):
                ps = [p for p, g in items if bool(g["adaptive"]) == adaptive]
                if ps:
                    sums.append(self._global_sums([p.grad for p in ps], [], ps if adaptive else [], ps)[0])
        first = next(iter(by_device))
        sq = torch.stack([s.to(first) for s in sums]).sum() if len(sums) > 1 else sums[0]
        if grad_scale is not None:
            gs = grad_scale.to(sq)
            sq = sq / (gs * gs)
        norm = sq.sqrt()
        inf = ~torch.isfinite(norm)
        if found_inf is not None:
            inf = inf | (found_inf.to(inf.device) != 0)
        self._first_inf = inf.to(torch.float32)
        for device, items in by_device.items():
            scales = self._rhos(items, norm.dtype, device) / (norm.to(device) + _EPS)
            if grad_scale is not None:
                scales = scales / grad_scale.to(scales)
            inf_d = self._first_inf.to(device)
            for adaptive in (False, True):
                idx = [k for k, (_, g) in enumerate(items) if bool(g["adaptive"]) == adaptive]
                if not idx:
                    continue
                ps = [items[k][0] for k in idx]
                olds = [self._buffer(p, "old_p") for p in ps]
                keep = [self._buffer(p, self._grad_buffer) for p in ps] if self._keeps_grads else []
                sc = scales if len(idx) == len(items) else scales[torch.tensor(idx, device=device)]
                grads = [p.grad for p in ps]
                local = self._local
                ops.sam_perturb(local(ps), local(grads), local(olds), local(keep), sc, adaptive, inf_d)
                for p in ps:
                    self.state[p]["perturbed"] = True

    _grad_buffer = "old_g"

    def _rhos(self, items, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Each tensor's group ``rho`` as a device tensor, rebuilt only when a value changes."""
        values = tuple(float(g["rho"]) for _, g in items)
        cache = self.__dict__.setdefault("_rho_cache", {})
        hit = cache.get((device, dtype))
        if hit is None or hit[0] != values:
            hit = cache[(device, dtype)] = (values, torch.tensor(values, dtype=dtype, device=device))
        return hit[1]

    @torch.no_grad()
    def second_step(
        self, zero_grad: bool = False, *, grad_scale: torch.Tensor | None = None, found_inf: torch.Tensor | None = None
    ) -> None:
        """Back to the kept ``w``, then the base optimizer's step with the current (second) gradient.
        ``grad_scale``/``found_inf`` (or the attributes GradScaler sets) as for torch's fused optimizers."""
        if not self._pending:
            raise RuntimeError("regops: SAM.second_step() needs a first_step() before it")
        self._note_sharded()
        grad_scale = grad_scale if grad_scale is not None else getattr(self, "grad_scale", None)
        found_inf = found_inf if found_inf is not None else getattr(self, "found_inf", None)
        skip = self._first_inf
        if found_inf is not None:
            skip = found_inf if skip is None else (skip.to(found_inf.device) + found_inf)
        self._adjust_grads()
        restore = {p: st["old_p"] for p, st in self.state.items() if st.pop("perturbed", False)}
        if isinstance(self.base_optimizer, FusedOptimizer):
            for group in self.param_groups:
                self.base_optimizer.group_step(group, grad_scale, skip, restore)
            for p, old in restore.items():
                if p.grad is None:
                    p.copy_(old)
        else:
            self._restore(restore)
            self._base_step(grad_scale, skip)
        self._pending, self._first_inf = False, None
        self._passes += 1
        if zero_grad:
            self.zero_grad()

    def _adjust_grads(self) -> None:
        """The variant's change of the second gradient (GSAM, LookSAM)."""

    def _restore(self, restore: dict[torch.Tensor, torch.Tensor]) -> None:
        if restore:
            params = list(restore)
            torch._foreach_copy_(self._local(params), self._local([restore[p] for p in params]))

    def _base_step(self, grad_scale: torch.Tensor | None, skip: torch.Tensor | None) -> None:
        base = self.base_optimizer
        if getattr(base, "_step_supports_amp_scaling", False):  # torch's fused optimizers: skip on the device
            base.grad_scale, base.found_inf = grad_scale, skip
            try:
                base.step()
            finally:
                del base.grad_scale, base.found_inf
            return
        if skip is not None and bool(skip.item() != 0):  # a plain optimizer: GradScaler's host-side skip
            return
        if grad_scale is not None:
            grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
            torch._foreach_div_(self._local(grads), grad_scale.to(grads[0].device) if grads else grad_scale)
        base.step()

    @torch.no_grad()
    def step(
        self,
        closure: Callable[[], Any] | None = None,
        *,
        grad_scale: torch.Tensor | None = None,
        found_inf: torch.Tensor | None = None,
    ) -> Any:
        """With a closure (a full forward and backward): first step, closure, second step. Without one, the second
        step of a pending first step (``GradScaler.step(optimizer)``)."""
        grad_scale = grad_scale if grad_scale is not None else getattr(self, "grad_scale", None)
        found_inf = found_inf if found_inf is not None else getattr(self, "found_inf", None)
        if closure is None:
            if not self._pending:
                raise RuntimeError(
                    "regops: SAM.step() needs a closure that runs the forward and backward, or a first_step() before "
                    "it (then step() is the second step, as GradScaler.step(optimizer) calls it)"
                )
            self.second_step(grad_scale=grad_scale, found_inf=found_inf)
            return None
        closure = torch.enable_grad()(closure)
        second = self.needs_second_pass
        self.first_step(zero_grad=second, grad_scale=grad_scale, found_inf=found_inf)
        loss = None
        found_second = None
        if second:
            loss = closure()
            if grad_scale is not None:  # the second gradient's own infs (GradScaler only saw the first's)
                found_second = _non_finite(self.param_groups, grad_scale.device)
        self.second_step(grad_scale=grad_scale, found_inf=found_second)
        return loss

    # ------------------------------------------------------------------------------------------ checkpoints
    _persistent: tuple[str, ...] = ()

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict, plus the variant's persistent buffers (the kept parameters of an
        unfinished step are not saved: save between steps)."""
        sd = self.base_optimizer.state_dict()
        own = super().state_dict()["state"]
        sd["sam_state"] = {
            k: {n: v for n, v in st.items() if n in self._persistent}
            for k, st in own.items()
            if any(n in self._persistent for n in st)
        }
        sd["sam_passes"] = self._passes
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        own = state_dict.pop("sam_state", {})
        self._passes = int(state_dict.pop("sam_passes", 0))
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups
        params = [p for g in self.param_groups for p in g["params"]]
        self.state = defaultdict(dict)
        for k, st in own.items():
            p = params[int(k)]
            self.state[p] = {n: v if is_dtensor(v) else v.to(device=p.device, dtype=p.dtype) for n, v in st.items()}
        self._pending, self._first_inf = False, None


def _non_finite(groups, device: torch.device) -> torch.Tensor:
    """1.0 where any gradient holds an inf or NaN (one multi-tensor check on the device), else 0.0."""
    found = torch.zeros((), dtype=torch.float32, device=device)
    grads = [p.grad for g in groups for p in g["params"] if p.grad is not None]
    if grads:
        one = torch.ones((), dtype=torch.float32, device=device)
        grads = _dtensor().local(grads) if is_dtensor(*grads) else grads
        torch._amp_foreach_non_finite_check_and_unscale_(grads, found, one)
    return found


class GSAM(SAM):
    r"""Surrogate-gap guided SAM (Zhuang et al. 2022): the second gradient ``g_s`` loses ``alpha`` times the part of
    the first gradient ``g`` orthogonal to it (global dots: one reduction and one pass):

    .. math:: g_s \leftarrow g_s - \alpha \left(g - \cos(g, g_s) \frac{\lVert g \rVert}{\lVert g_s \rVert + 10^{-12}}
        g_s\right), \qquad \cos(g, g_s) = \frac{g \cdot g_s}{\lVert g \rVert \lVert g_s \rVert + 10^{-12}}

    ``rho`` may follow a schedule (change ``group["rho"]``).

    Args:
        params: parameters or parameter groups.
        base_optimizer: the optimizer class, built on the same parameter groups with ``**kw``.
        rho: the neighbourhood radius (>= 0).
        alpha: the weight of the removed orthogonal part.
        adaptive: ASAM's scaling.
        **kw: the base optimizer's arguments.

    Example::

        >>> model, loss_fn = torch.nn.Linear(10, 3), torch.nn.functional.cross_entropy
        >>> x, y = torch.randn(32, 10), torch.randint(0, 3, (32,))
        >>> opt = regops.optim.GSAM(model.parameters(), regops.optim.SGD, rho=0.05, alpha=0.1, lr=0.1)
        >>> loss_fn(model(x), y).backward()
        >>> opt.first_step(zero_grad=True)
        >>> loss_fn(model(x), y).backward()
        >>> opt.second_step(zero_grad=True)
    """

    _keeps_grads = True

    def __init__(self, params, base_optimizer, rho: float = 0.05, alpha: float = 0.1, adaptive: bool = False, **kw):
        self._alpha = float(alpha)
        super().__init__(params, base_optimizer, rho=rho, adaptive=adaptive, **kw)

    def _variant_defaults(self) -> dict[str, Any]:
        return {"gsam_alpha": self._alpha}

    def _adjust_grads(self) -> None:
        for items in self._with_grads().values():
            ps = [p for p, _ in items if "old_g" in self.state[p] and self.state[p].get("perturbed")]
            if not ps:
                continue
            d = self._global_sums([p.grad for p in ps], [self.state[p]["old_g"] for p in ps], [], ps)
            new_norm, old_norm = d[0].sqrt(), d[2].sqrt()
            cosine = d[1] / (new_norm * old_norm + _EPS)
            for group in self.param_groups:
                mine = [p for p in ps if any(p is q for q in group["params"])]
                if mine:
                    alpha = float(group["gsam_alpha"])
                    k = 1.0 + alpha * cosine * old_norm / (new_norm + _EPS)
                    coeffs = torch.stack([k, torch.full_like(k, -alpha)])
                    ops.axpby(
                        self._local([p.grad for p in mine]), self._local([self.state[p]["old_g"] for p in mine]), coeffs
                    )


class LookSAM(SAM):
    r"""LookSAM (Liu et al. 2022): SAM's second pass every ``k`` steps only. On those steps it keeps
    ``g_v = g_s - \frac{g_s \cdot g}{\lVert g \rVert^2} g`` (the part of the SAM gradient orthogonal to the
    plain one); on the others the plain gradient gains ``alpha * ||g|| / (||g_v|| + 1e-8) * g_v`` (global norms,
    one reduction and one pass). One extra buffer per parameter (``gv``).

    The loop: ``step(closure)`` runs the closure only when needed; with ``first_step``/``second_step`` check
    `needs_second_pass` before the second forward and backward.

    Args:
        params: parameters or parameter groups.
        base_optimizer: the optimizer class, built on the same parameter groups with ``**kw``.
        rho: the neighbourhood radius (>= 0).
        k: the second pass runs every ``k`` steps.
        alpha: the weight of ``g_v`` on the other steps.
        adaptive: ASAM's scaling.
        **kw: the base optimizer's arguments.

    Example::

        >>> model, loss_fn = torch.nn.Linear(10, 3), torch.nn.functional.cross_entropy
        >>> x, y = torch.randn(32, 10), torch.randint(0, 3, (32,))
        >>> opt = regops.optim.LookSAM(model.parameters(), regops.optim.SGD, k=2, lr=0.1)
        >>> for step in range(4):
        ...     loss_fn(model(x), y).backward()
        ...     opt.first_step(zero_grad=True)
        ...     if opt.needs_second_pass:
        ...         loss_fn(model(x), y).backward()
        ...     opt.second_step(zero_grad=True)
    """

    _keeps_grads = True
    _grad_buffer = "gv"
    _persistent = ("gv",)

    def __init__(self, params, base_optimizer, rho: float = 0.05, k: int = 5, alpha: float = 0.7, adaptive=False, **kw):
        if int(k) < 1:
            raise ValueError(f"regops: LookSAM needs k >= 1, got {k}")
        self.k, self.alpha = int(k), float(alpha)
        super().__init__(params, base_optimizer, rho=rho, adaptive=adaptive, **kw)

    @property
    def needs_second_pass(self) -> bool:
        return self._passes % self.k == 0

    def _adjust_grads(self) -> None:
        for items in self._with_grads().values():
            ps = [p for p, _ in items if "gv" in self.state[p]]
            if not ps:
                continue
            grads, gv = [p.grad for p in ps], [self.state[p]["gv"] for p in ps]
            if self.needs_second_pass:  # gv holds the first gradient g: it becomes g_v
                d = self._global_sums(grads, gv, [], ps)
                keep = (self._first_inf == 0).to(d) if self._first_inf is not None else torch.ones_like(d[0])
                coeffs = torch.stack([-(d[1] / d[2].clamp(min=torch.finfo(d.dtype).tiny)) * keep, keep])
                ops.axpby(self._local(gv), self._local(grads), coeffs)
            else:
                d = self._global_sums(grads, gv, [], ps)
                scale = self.alpha * d[0].sqrt() / (d[2].sqrt() + 1e-8)
                ops.axpby(self._local(grads), self._local(gv), torch.stack([torch.ones_like(scale), scale]))
