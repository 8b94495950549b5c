"""Stochastic trace and diagonal estimators of the loss Hessian: Hutchinson, Hutch++, XTrace."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from regops.distributed import _hook as _dtensor
from regops.hessian import _probes, _sketch
from regops.hessian._hvp import HVP_METHODS, HessianOperator
from regops.hessian._inputs import _operator, _resolve, _user_probes
from regops.hessian._probes import ParamLayout
from regops.hessian._sketch import mean_stderr as _mean_stderr
from regops.reference.hessian import DISTRIBUTIONS, check_distribution

METHODS = ("hutchinson", "hutch++", "xtrace")
DEFAULT_PROBE_BATCH = 16


# ---------------------------------------------------------------------------------------------- results
@dataclass
class TraceEstimate:
    """An estimate of ``tr(H)``.

    Attributes:
        value: the estimate.
        stderr: its standard error (sample standard deviation of the per-probe terms / sqrt(count)); for
            Hutch++ that of the residual Hutchinson part (the sketched part is exact given its subspace).
        num_matvecs: Hessian-vector products used.
        method: ``"hutchinson"``, ``"hutch++"`` or ``"xtrace"``.
        samples: the per-probe terms whose mean is the estimate (Hutchinson: ``v_k^T H v_k``; Hutch++: the
            residual terms, to which the sketched trace is added; XTrace: the exchangeable leave-one-out terms).
        engine: the Hessian-vector product engine that computed it, after any fallback (``"double_backward"``,
            ``"forward_over_reverse"``, ``"loop"`` or ``"finite_difference"``; empty when unknown).
        probe_cap: the most products the method can use for the ``N`` trainable parameters (Hutch++ and XTrace:
            ``2 N``, where the sketch spans the whole space); ``None`` for Hutchinson. ``num_matvecs`` is what ran.
        fd_error: with finite differences, their estimated relative error on ``H v`` (``|D(2h) - D(h)| / 3 |D(h)|``
            on the first probe of each batch, ``D`` the central difference; the largest over batches): for a loss
            smooth at the scale of ``h`` the error of the products is about this large, whatever the stderr says.
            Near kinks (ReLU, hard activations) a step that crosses one changes ``D`` by O(1): a large value flags
            it, though it can then over- or understate the error. ``None`` when an exact engine ran.
    """

    value: float
    stderr: float
    num_matvecs: int
    method: str = "hutchinson"
    samples: torch.Tensor = field(default_factory=lambda: torch.empty(0), repr=False)
    engine: str = ""
    probe_cap: int | None = None
    fd_error: float | None = None

    @property
    def relative_stderr(self) -> float:
        return self.stderr / abs(self.value) if self.value != 0 else math.inf

    def __float__(self) -> float:
        return float(self.value)


@dataclass
class DiagonalEstimate:
    """Hutchinson estimate of ``diag(H)``, one tensor per parameter (shape and dtype of the parameter).

    ``value`` and ``stderr`` are tuples in the order of ``params``, ``None`` at frozen entries (dicts keyed by
    the names of the trainable params when ``params`` was a dict or a model was given); ``stderr`` is per
    coordinate. ``trace`` is the Hutchinson trace from the same probes.
    """

    value: tuple[torch.Tensor | None, ...] | dict[str, torch.Tensor]
    stderr: tuple[torch.Tensor | None, ...] | dict[str, torch.Tensor]
    num_matvecs: int
    trace: TraceEstimate


def _check_common(num_probes, method, distribution, probe_batch, tol, hvp) -> int:
    if isinstance(num_probes, bool) or not isinstance(num_probes, int):
        raise TypeError(f"regops: num_probes must be an int, got {type(num_probes).__name__}")
    if num_probes < 1:
        raise ValueError(f"regops: num_probes must be >= 1, got {num_probes}")
    if method not in METHODS:
        raise ValueError(f"regops: method must be one of {METHODS}, got {method!r}")
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"regops: distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
    if hvp not in HVP_METHODS:
        raise ValueError(f"regops: hvp must be one of {HVP_METHODS}, got {hvp!r}")
    if probe_batch is None:
        # Finite differences run one probe at a time anyway: draw each from the seed when it is needed, so memory
        # holds one probe (and two gradients), not a block of them.
        probe_batch = 1 if hvp == "finite_difference" else min(num_probes, DEFAULT_PROBE_BATCH)
    if isinstance(probe_batch, bool) or not isinstance(probe_batch, int) or probe_batch < 1:
        raise ValueError(f"regops: probe_batch must be an int >= 1, got {probe_batch!r}")
    if tol is not None and (not isinstance(tol, (int, float)) or not tol > 0):
        raise ValueError(f"regops: tol must be a positive number (relative standard error) or None, got {tol!r}")
    return probe_batch


# ---------------------------------------------------------------------------------------------- distributed
@dataclass
class _Dist:
    group: Any = None
    rank: int = 0
    world: int = 1

    @classmethod
    def of(cls, distributed: bool, group: Any) -> _Dist:
        if not distributed:
            return cls()
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("regops: distributed=True needs an initialised torch.distributed process group")
        return cls(group, dist.get_rank(group), dist.get_world_size(group))

    def share(self, start: int, stop: int) -> tuple[int, int]:
        """This rank's contiguous part of probes ``[start, stop)``."""
        n = stop - start
        return start + n * self.rank // self.world, start + n * (self.rank + 1) // self.world

    def broadcast_seed(self, seed: torch.Tensor) -> torch.Tensor:
        if self.world == 1:
            return seed
        import torch.distributed as dist

        src = dist.get_global_rank(self.group, 0) if self.group is not None else 0
        dist.broadcast(seed, src=src, group=self.group)  # seeds live on the CPU: gloo, or NCCL via a copy
        return seed

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(t, group=self.group)
        return t


def _broadcast_seed(dist_: _Dist, seed: torch.Tensor, device: torch.device) -> torch.Tensor:
    if dist_.world == 1:
        return seed
    import torch.distributed as dist

    backend = dist.get_backend(dist_.group)
    if backend == "nccl":
        moved = dist_.broadcast_seed(seed.to(device))
        return moved.cpu()
    return dist_.broadcast_seed(seed)


# ---------------------------------------------------------------------------------------------- Hutchinson
@dataclass
class _HutchinsonState:
    dots: torch.Tensor  # [m, P] per probe, per parameter v^T H v (rows of probes not run yet are zero)
    diag: torch.Tensor  # [N] sum over probes of v * Hv
    diag_sq: torch.Tensor  # [N] sum over probes of (v * Hv)^2
    count: int  # probes done


def _hutchinson(
    op: HessianOperator,
    layout: ParamLayout,
    num_probes: int,
    distribution: str,
    generator: torch.Generator | None,
    tol: float | None,
    stop_metric: Callable[[_HutchinsonState], float],
    dist_: _Dist,
    progress: bool,
    desc: str,
    with_diag: bool,
    supplied: torch.Tensor | None = None,
) -> _HutchinsonState:
    from tqdm.auto import tqdm

    if supplied is None:
        seed = _broadcast_seed(dist_, _probes.draw_seed(layout, num_probes, distribution, generator), layout.device)

    def rows(start: int, k: int) -> tuple[torch.Tensor, ...]:
        if supplied is not None:
            return layout.split(supplied[start : start + k])
        return layout.split(_probes.probe_rows(seed, start, k, layout, distribution))

    acc = torch.float64 if layout.dtype == torch.float64 else torch.float32
    dev = layout.device
    state = _HutchinsonState(
        torch.zeros(num_probes, len(layout.sizes), dtype=acc, device=dev),
        torch.zeros(layout.numel, dtype=acc, device=dev),
        torch.zeros(layout.numel, dtype=acc, device=dev),
        0,
    )
    # Without tol one round covers every probe (one all-reduce); with tol, rounds of probe_batch per rank.
    round_size = num_probes if tol is None else op.probe_batch * dist_.world
    bar = tqdm(total=num_probes, desc=desc, unit="probe", disable=not progress or dist_.rank != 0, leave=False)
    try:
        for round_start in range(0, num_probes, round_size):
            round_stop = min(num_probes, round_start + round_size)
            lo, hi = dist_.share(round_start, round_stop)
            diag = torch.zeros_like(state.diag)
            diag_sq = torch.zeros_like(state.diag_sq)
            for start in range(lo, hi, op.probe_batch):
                k = min(op.probe_batch, hi - start)
                vs = rows(start, k)
                dots, d, dsq = _probes.probe_dot(vs, op.apply(vs), with_diag)
                state.dots[start : start + k] = dots
                if with_diag:
                    diag += d
                    diag_sq += dsq
                if dist_.world == 1:
                    bar.update(k)
            if dist_.world > 1:
                parts = [state.dots[round_start:round_stop].reshape(-1)] + ([diag, diag_sq] if with_diag else [])
                packed = dist_.all_reduce(torch.cat(parts))
                n_dots = (round_stop - round_start) * len(layout.sizes)
                state.dots[round_start:round_stop] = packed[:n_dots].view(round_stop - round_start, -1)
                if with_diag:
                    diag, diag_sq = packed[n_dots : n_dots + layout.numel], packed[n_dots + layout.numel :]
                bar.update(round_stop - round_start)
            state.diag += diag
            state.diag_sq += diag_sq
            state.count = round_stop
            if tol is not None or progress:
                metric = stop_metric(state)
                bar.set_postfix(rel_stderr=f"{metric:.3g}")
                if tol is not None and state.count >= 2 and metric < tol:
                    break
    finally:
        bar.close()
    state.dots = state.dots[: state.count]
    return state


def _trace_rel_stderr(state: _HutchinsonState) -> float:
    mean, err = _mean_stderr(state.dots[: state.count].sum(1))
    return err / abs(mean) if mean != 0 else math.inf


def _diag_rel_stderr(state: _HutchinsonState) -> float:
    m = state.count
    if m < 2:
        return math.inf
    mean = state.diag.double() / m
    var = (state.diag_sq.double() / m - mean * mean).clamp_min(0) * m / (m - 1)
    norm = mean.norm().item()
    return math.sqrt(var.sum().item() / m) / norm if norm > 0 else math.inf


def _warn_tol(tol: float | None, metric: float, count: int, what: str) -> None:
    if tol is not None and not metric < tol:
        warnings.warn(
            f"regops: tol={tol:g} not reached: the {what} has a relative standard error of {metric:.3g} after all "
            f"{count} probes; pass a larger num_probes (the error falls as 1/sqrt(probes): about "
            f"{math.ceil(count * (metric / tol) ** 2) if math.isfinite(metric) else 'many more'} probes for this tol)",
            RuntimeWarning,
            stacklevel=3,
        )


def _group(names: Sequence[str], by: str) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        key = name if by == "param" else (name.rsplit(".", 1)[0] if "." in name else "")
        groups.setdefault(key, []).append(i)
    return groups


def _check_fsdp_options(supplied: torch.Tensor | None, fd_eps: float | None) -> None:
    if supplied is not None or fd_eps is not None:
        raise ValueError("regops: probes= and fd_eps= are not supported for FSDP2-sharded parameters")


def trace(
    loss_fn: Callable[..., torch.Tensor] | nn.Module,
    params: Any = None,
    *data: Any,
    num_probes: int = 100,
    method: str = "hutchinson",
    distribution: str = "rademacher",
    probe_batch: int | None = None,
    tol: float | None = None,
    generator: torch.Generator | None = None,
    by: str | None = None,
    hvp: str = "auto",
    progress: bool = False,
    distributed: bool = False,
    group: Any = None,
    probes: torch.Tensor | Sequence[torch.Tensor] | Mapping[str, torch.Tensor] | None = None,
    fd_eps: float | None = None,
) -> TraceEstimate | dict[str, TraceEstimate]:
    r"""Estimate the trace of the Hessian of a scalar loss with respect to ``params``.

    .. math:: \operatorname{tr}(H) \approx \frac{1}{m} \sum_{k=1}^{m} v_k^\top H v_k, \qquad
              \mathbb{E}[v v^\top] = I

    Forms:

    * ``trace(loss_fn, params)``: ``params`` is a tensor, a list/tuple or dict of tensors, or a module.
      ``loss_fn(params)`` returns the scalar loss from the tensors it is given (same container: needed for
      ``hvp="forward_over_reverse"``) or ``loss_fn()`` computes it from the tensors it closes over.
    * ``trace(model, criterion, inputs, targets)``: the loss ``criterion(model(inputs), targets)``.
    * ``trace(model, criterion, loader)``: the Hessian of the dataset loss, averaged over the batches
      ``(inputs, targets)`` the loader yields, weighted by batch size (as PyHessian does; the same probes for
      every batch). Model mode is left as it is (PyHessian forces ``eval()``).

    In every form the Hessian is taken with respect to the tensors that require grad; frozen ones
    (``requires_grad=False``) are left out (and still passed, unchanged, to a functional ``loss_fn``). A loss
    that reaches none of them raises ``ValueError``. Parameters of different dtypes keep their own precision
    (each dtype's products are accumulated in float32, float64 for float64). Attention models need no setup:
    the forwards run with ``scaled_dot_product_attention`` on its math backend (the fused kernels have no double
    backward). In train mode, dropout is held at one fixed mask (the one the first forward draws) for every
    probe and every engine: the estimate is the Hessian of the loss at that mask (see :mod:`regops.hessian._hvp`).

    Args:
        num_probes: Hessian-vector products to spend (the budget for every method; >= 1).
        method: ``"hutchinson"``; ``"hutch++"`` (a third of the budget sketches the dominant subspace, exact
            there; error O(1/m) instead of O(1/sqrt(m)) when a few eigenvalues dominate); ``"xtrace"``
            (Hutch++ that reuses every probe for both roles, leaving each out in turn; ``num_probes >= 4``). Both
            take any ``num_probes`` and spend at most ``2 N`` products on ``N`` parameters (a sketch of ``N``
            probes spans everything: the trace is then exact); ``probe_cap`` in the result records the cap.
        distribution: ``"rademacher"`` (lowest variance for Hutchinson) or ``"gaussian"``; probes come from the
            Philox stream (:mod:`regops.reference.hessian`), reproducible from ``generator``'s state.
        probe_batch: probes per batched Hessian-vector product (memory ~ ``probe_batch`` x one backward);
            default ``min(num_probes, 16)``, and 1 for ``hvp="finite_difference"`` (each probe is regenerated from
            the seed when its two gradients are computed).
        tol: stop once the relative standard error ``stderr / |value|`` falls below ``tol`` (Hutchinson only;
            checked after every ``probe_batch`` probes, at least two). If ``num_probes`` run out first, a
            ``RuntimeWarning`` gives the error reached and about how many probes the tol needs.
        generator: a ``torch.Generator`` on the parameters' device type; default torch's default generator.
        by: ``None`` (one estimate), ``"param"`` or ``"module"``: a dict of estimates of the traces of the
            diagonal blocks of ``H`` per parameter / per module (the parameters whose names share a prefix
            before the last dot); they sum to the whole trace. Hutchinson only.
        hvp: ``"auto"``, ``"double_backward"``, ``"forward_over_reverse"``, ``"loop"`` or ``"finite_difference"``
            (see :mod:`regops.hessian._hvp`; vmap failures fall back with a warning; ``"auto"`` falls back to
            finite differences, with a warning, when the model has no double backward).
        progress: show a tqdm progress bar with the running relative standard error.
        distributed: split the probes across the ranks of ``group`` (every rank passes the same arguments and
            its share of nothing else: the same data gives the same Hessian); the seed is broadcast from rank 0
            and the results are combined with one all-reduce (one per round with ``tol``). Every rank returns
            the estimate a single process would compute with the same seed (in train mode, each rank's dropout
            masks come from its own generators). Hutchinson only.
        probes: your own probes instead of Philox ones (Hutchinson only; ``num_probes``, ``distribution`` and
            ``generator`` are then unused): a ``[K, N]`` tensor over the trainable params flattened and
            concatenated in order, or one ``[K, *p.shape]`` tensor per trainable param (a dict by name or a
            sequence). The estimate is unbiased for any probes with ``E[v v^T] = I``.
        fd_eps: the step ``h`` of ``hvp="finite_difference"`` (default ``eps^(1/3)`` of the params' dtype:
            4.9e-3 in float32, 6.1e-6 in float64; the bias is ``O(h^2)``, see :mod:`regops.hessian._hvp`).

    Returns:
        :class:`TraceEstimate` (``value``, ``stderr``, ``num_matvecs``, ``engine``, ``probe_cap``, ``fd_error``)
        or a dict of them (``by``).

    Example::

        >>> model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 3))
        >>> x, y = torch.randn(64, 10), torch.randint(0, 3, (64,))
        >>> est = regops.hessian.trace(model, nn.CrossEntropyLoss(), x, y, num_probes=200, tol=0.01)
        >>> est.value, est.stderr, est.num_matvecs
    """
    problem = _resolve(loss_fn, params, data)
    supplied = None
    if probes is not None:
        if method != "hutchinson" or distributed:
            raise ValueError("regops: probes= needs method='hutchinson' and distributed=False")
        supplied = _user_probes(probes, problem)
        num_probes = supplied.shape[0]
    probe_batch = _check_common(num_probes, method, distribution, probe_batch, tol, hvp)
    if by not in (None, "param", "module"):
        raise ValueError(f"regops: by must be None, 'param' or 'module', got {by!r}")
    if method != "hutchinson" and (by is not None or distributed or tol is not None):
        raise ValueError(f"regops: by, tol and distributed need method='hutchinson' (got method={method!r})")
    if _dtensor.is_dtensor(*problem.params):  # FSDP2: see regops.distributed.hessian
        _check_fsdp_options(supplied, fd_eps)
        args = (loss_fn, problem, num_probes, method, distribution, probe_batch, tol, generator, by, hvp, distributed)
        return _dtensor.forward("hessian", "trace", *args)
    op = _operator(problem, hvp, probe_batch, fd_eps)
    layout = problem.layout
    if method in ("hutch++", "xtrace"):
        sketch = _sketch.hutchpp if method == "hutch++" else _sketch.xtrace
        value, err, samples = sketch(op, layout, num_probes, distribution, generator)
        cap = _sketch.probe_cap(layout)
        return TraceEstimate(value, err, op.num_matvecs, method, samples, op.engine, cap, op.fd_error)
    dist_ = _Dist.of(distributed, group)
    state = _hutchinson(
        op,
        layout,
        num_probes,
        distribution,
        generator,
        tol,
        _trace_rel_stderr,
        dist_,
        progress,
        "hessian trace",
        False,
        supplied,
    )
    matvecs = state.count
    _warn_tol(tol, _trace_rel_stderr(state), state.count, "trace")
    if by is None:
        samples = state.dots.sum(1)
        mean, err = _mean_stderr(samples)
        return TraceEstimate(mean, err, matvecs, "hutchinson", samples, op.engine, None, op.fd_error)
    out = {}
    for key, idx in _group(problem.names, by).items():
        samples = state.dots[:, idx].sum(1)
        mean, err = _mean_stderr(samples)
        out[key] = TraceEstimate(mean, err, matvecs, "hutchinson", samples, op.engine, None, op.fd_error)
    return out


def diagonal(
    loss_fn: Callable[..., torch.Tensor] | nn.Module,
    params: Any = None,
    *data: Any,
    num_probes: int = 100,
    distribution: str = "rademacher",
    probe_batch: int | None = None,
    tol: float | None = None,
    generator: torch.Generator | None = None,
    hvp: str = "auto",
    progress: bool = False,
    distributed: bool = False,
    group: Any = None,
    probes: torch.Tensor | Sequence[torch.Tensor] | Mapping[str, torch.Tensor] | None = None,
    fd_eps: float | None = None,
) -> DiagonalEstimate:
    r"""Hutchinson estimate of the Hessian diagonal, one tensor per parameter.

    .. math:: \operatorname{diag}(H) \approx \frac{1}{m} \sum_k v_k \odot H v_k

    Unbiased for Rademacher and Gaussian probes alike (``E[v_i v_j] = delta_ij``); Rademacher has lower
    variance (``v_i^2 = 1``: the error comes only from off-diagonal entries). The products ``v * Hv`` and their
    per-probe inner products are accumulated in one fused pass over all parameters (``regops::hessian_probe_dot``).

    Forms, ``num_probes``, ``distribution``, ``probe_batch``, ``generator``, ``hvp``, ``progress``,
    ``distributed``, ``probes``, ``fd_eps``, frozen params, dtypes, attention and dropout: as :func:`trace`.
    ``tol``: stop when ``||stderr|| / ||diag||`` falls below it.

    Returns:
        :class:`DiagonalEstimate`: ``value`` and per-coordinate ``stderr`` shaped like the parameters (a dict
        keyed by name of the trainable params for dict params or a model; else a tuple in the order of
        ``params``, ``None`` at frozen entries), ``num_matvecs``, and the Hutchinson ``trace`` of the same
        probes.

    Example::

        >>> est = regops.hessian.diagonal(lambda p: (p[0] ** 4).sum(), [w], num_probes=50)
        >>> est.value[0]   # ~ 12 * w**2
    """
    problem = _resolve(loss_fn, params, data)
    supplied = None
    if probes is not None:
        if distributed:
            raise ValueError("regops: probes= needs distributed=False")
        supplied = _user_probes(probes, problem)
        num_probes = supplied.shape[0]
    probe_batch = _check_common(num_probes, "hutchinson", distribution, probe_batch, tol, hvp)
    if _dtensor.is_dtensor(*problem.params):  # FSDP2: see regops.distributed.hessian
        _check_fsdp_options(supplied, fd_eps)
        args = (loss_fn, problem, num_probes, distribution, probe_batch, tol, generator, hvp, distributed)
        return _dtensor.forward("hessian", "diagonal", *args)
    op = _operator(problem, hvp, probe_batch, fd_eps)
    layout = problem.layout
    dist_ = _Dist.of(distributed, group)
    state = _hutchinson(
        op,
        layout,
        num_probes,
        distribution,
        generator,
        tol,
        _diag_rel_stderr,
        dist_,
        progress,
        "hessian diagonal",
        True,
        supplied,
    )
    m = state.count
    _warn_tol(tol, _diag_rel_stderr(state), m, "diagonal")
    mean = state.diag.double() / m
    if m > 1:
        var = (state.diag_sq.double() / m - mean * mean).clamp_min(0) * (m / (m - 1))
        err = (var / m).sqrt()
    else:
        err = torch.full_like(mean, math.inf)
    values = layout.split(mean[None].to(layout.dtype))
    errors = layout.split(err[None].to(layout.dtype))
    values = tuple(v[0] for v in values)
    errors = tuple(e[0] for e in errors)
    samples = state.dots.sum(1)
    t_mean, t_err = _mean_stderr(samples)
    tr = TraceEstimate(t_mean, t_err, m, "hutchinson", samples, op.engine, None, op.fd_error)
    return DiagonalEstimate(problem.per_param(values), problem.per_param(errors), m, tr)


def probes(
    params: Any,
    num_probes: int,
    *,
    distribution: str = "rademacher",
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, ...]:
    """The probes the estimators use: ``num_probes`` Philox probes per parameter, ``[num_probes, *p.shape]``.

    All parameters' probes are drawn in one kernel launch; the same generator state gives the same probes on
    every backend (the Triton kernel reproduces the reference bit for bit). Rademacher entries are +-1; Gaussian
    entries are standard normal (float32 Box-Muller, rounded to the parameter dtype). To reproduce an estimator's
    probes, pass the tensors it differentiates: a module gives its parameters that require grad, as the
    estimators take them; from a list, leave out the frozen ones yourself.

    Example::

        >>> g = torch.Generator().manual_seed(0)
        >>> (v,) = regops.hessian.probes([w], 8, generator=g)   # [8, *w.shape]
    """
    if isinstance(num_probes, bool) or not isinstance(num_probes, int) or num_probes < 1:
        raise ValueError(f"regops: num_probes must be an int >= 1, got {num_probes!r}")
    check_distribution(distribution)
    if isinstance(params, nn.Module):  # as the estimators: the parameters that require grad
        params = [p for p in params.parameters() if p.requires_grad]
    if isinstance(params, torch.Tensor):
        params = [params]
    params = list(params.values()) if isinstance(params, Mapping) else list(params)
    if not params or not all(isinstance(p, torch.Tensor) and p.is_floating_point() for p in params):
        raise TypeError("regops: params must be a non-empty list of floating-point tensors")
    layout = ParamLayout.of([str(i) for i in range(len(params))], params)
    seed = _probes.draw_seed(layout, num_probes, distribution, generator)
    return layout.split(_probes.probe_rows(seed, 0, num_probes, layout, distribution))
