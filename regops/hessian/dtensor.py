"""Hutchinson trace and diagonal of the loss Hessian for a model under FSDP2 (``fully_shard``).

Each rank holds its own batch; the loss is the mean of the ranks' losses (each a mean over its batch: with equal
batch sizes, the mean over the concatenated batch), so ``H = mean_r H_r``: the Hessian of what FSDP2's
reduce-scattered gradient (the mean over the ranks) is the gradient of.

``hvp="auto"`` (the default) and ``"finite_difference"``: no rank ever holds all the parameters.
:mod:`regops.hessian._sharded` computes ``H v`` as central differences of FSDP2's own sharded gradients, each rank
moving only its shards (restored from a copy of them, bit for bit; the user's ``p.grad`` is left as it was). The
probes are the single-process probes (one seed from the generator, which advances as in one process; the mesh's
first rank's seed is broadcast), each rank drawing exactly its shards' elements. ``v^T H v`` is a sum of local dots:
one all-reduce of the ``[probes, params]`` dots per ``probe_batch`` probes; the diagonal's ``v * H v`` never leaves
its rank. So the estimate is the single-process ``hvp="finite_difference"`` estimate with the same generator (the
same probes; values to the rounding of the gradients divided by the step). ``tol``, ``probes=`` (full-size,
sharded by the layout) and ``fd_eps`` work as in one process.

``hvp="double_backward"``, ``"forward_over_reverse"`` or ``"loop"``: exact products on *all-gathered* parameters
(``full_tensor``: every rank holds the whole model, its gradient graph and whole probes), with FSDP2's forward
hooks set aside so autograd sees a plain model; every rank computes ``v^T H_r v``, one all-reduce gives the mean
(the diagonal: one all-reduce of ``H v`` per batch of probes). No ``tol`` or ``probes=`` there.

Hutch++ and XTrace run the single-process algorithm on the mean of the ranks' Hessians (the mesh's first rank's
seed); their sketches are full-size ``[k, N]`` matrices on every rank, so each sharded product's shards are
all-gathered (one all-gather per parameter per product), or, for a second-order ``hvp``, each block of gathered
products is all-reduced and divided by the world size.

Every rank returns the same estimate; diagonal values are DTensors laid out like the parameters.
:func:`regops.hessian.trace` and :func:`regops.hessian.diagonal` forward DTensor parameters here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from regops._core import dtensor as _dtensor
from regops._core.dtypes import acc_dtype
from regops.hessian import _hutchinson, _probes, _sharded, _sketch
from regops.hessian._hvp import HessianOperator
from regops.hessian._probes import ParamLayout
from regops.hessian._results import DiagonalEstimate, TraceEstimate, diagonal_stats, groups_of, mean_stderr


def _fsdp_state_type():
    try:
        from torch.distributed.fsdp._fully_shard._fsdp_state import FSDPState
    except ImportError as exc:  # pragma: no cover - a torch without FSDP2's state where we expect it
        raise NotImplementedError(
            "regops: Hessian estimates under fully_shard need torch's FSDP2 (torch >= 2.6)"
        ) from exc
    return FSDPState


def _is_fsdp_hook(hook: Any, state_type: type) -> bool:
    # the state's bound method, or (modules sharded as a group) a function wrapping it
    for fn in (hook, getattr(hook, "__wrapped__", None)):
        if isinstance(getattr(fn, "__self__", None), state_type):
            return True
    return False


@contextlib.contextmanager
def fsdp_forward_hooks_off(model: nn.Module) -> Iterator[None]:
    """Inside the block, ``model``'s FSDP2 forward hooks (all-gather before, reshard after) do not run; other
    hooks do. Their dicts are restored in their original order on exit."""
    state_type = _fsdp_state_type()
    saved = []
    for module in model.modules():
        for hooks in (module._forward_pre_hooks, module._forward_hooks):
            keys = [k for k, h in hooks.items() if _is_fsdp_hook(h, state_type)]
            if keys:
                saved.append((hooks, list(hooks.items())))
                for k in keys:
                    del hooks[k]
    if not saved and any(isinstance(m, FSDPModule) for m in model.modules()):
        # Without this check a torch that moved its hooks would run the estimate on FSDP's own parameters and
        # silently report a zero Hessian.
        raise NotImplementedError("regops: could not find FSDP2's forward hooks on this model (torch version?)")
    try:
        yield
    finally:
        for hooks, items in saved:
            added = [(k, h) for k, h in hooks.items() if k not in dict(items)]
            hooks.clear()
            hooks.update(items)
            hooks.update(added)


def _check(model: Any, problem: Any, method: str, tol: Any, distributed: bool, hvp: str, supplied: Any) -> DTensor:
    if not isinstance(model, nn.Module) or problem.forwards is None:
        raise NotImplementedError(
            "regops: Hessian estimates with DTensor parameters take the model form, "
            "trace(model, criterion, inputs, targets) or trace(model, criterion, loader) (FSDP2)"
        )
    if method not in ("hutchinson", "hutch++", "xtrace") or distributed:
        raise NotImplementedError(
            "regops: under fully_shard the Hessian estimates take no distributed=True (every rank holds its own "
            "batch and computes every probe)"
        )
    if hvp not in _sharded.SHARDED_HVP and (tol is not None or supplied is not None):
        raise NotImplementedError(
            f"regops: under fully_shard, tol= and probes= run on the sharded finite-difference products "
            f"(hvp='auto' or 'finite_difference'), not on hvp={hvp!r} (which gathers every parameter)"
        )
    params = problem.params
    if not all(isinstance(p, DTensor) for p in params):
        raise NotImplementedError(
            "regops: under fully_shard every trainable parameter must be sharded (a DTensor); FSDP2's ignored "
            "parameters get no reduced gradient"
        )
    mesh = params[0].device_mesh
    for p in params:
        _dtensor.check(p, "a parameter")
        if p.device_mesh != mesh:
            raise NotImplementedError("regops: parameters on several device meshes are not supported")
    if mesh.size() != dist.get_world_size():
        raise NotImplementedError("regops: under fully_shard, the parameters' mesh must span every rank")
    return params[0]


def _sharded_op(model: nn.Module, problem: Any, fd_eps: float | None) -> _sharded.ShardedFD:
    layout = ParamLayout.of(problem.names, problem.params)
    return _sharded.ShardedFD(model, problem.forwards, problem.params, layout, fd_eps)


def _sharded_hutchinson(
    model: nn.Module,
    problem: Any,
    num_probes: int,
    distribution: str,
    probe_batch: int,
    tol: float | None,
    generator: torch.Generator | None,
    supplied: torch.Tensor | None,
    fd_eps: float | None,
    with_diag: bool,
) -> tuple[Any, _sharded.ShardedFD]:
    op = _sharded_op(model, problem, fd_eps)
    try:
        seed = None
        if supplied is None:
            seed = _probes.draw_seed(op.layout, num_probes, distribution, generator)
            seed = _dtensor.sync(seed, problem.params[0].device_mesh)
        state = _sharded.run(op, num_probes, probe_batch, distribution, seed, supplied, tol, with_diag)
    finally:
        op.close()
    metric = _sharded.diag_rel_stderr if with_diag else _sharded.trace_rel_stderr
    if tol is not None:
        # the warning points at the caller of regops.hessian.trace / diagonal (two frames above this one's caller)
        _hutchinson.warn_tol(tol, metric(state), state.count, "diagonal" if with_diag else "trace", 5)
    return state, op


def _full_params(problem: Any) -> tuple[torch.Tensor, ...]:
    return tuple(
        (p.full_tensor() if isinstance(p, DTensor) else p).detach().requires_grad_(True) for p in problem.params
    )


def _estimate(
    model: nn.Module,
    problem: Any,
    num_probes: int,
    distribution: str,
    probe_batch: int,
    generator: torch.Generator | None,
    hvp: str,
    with_diag: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, ParamLayout]:
    """``(dots [m, P], sum_k v*Hv [N], sum_k (v*Hv)^2 [N], layout)`` of the mean of the ranks' Hessians."""
    anchor = next(p for p in problem.params if isinstance(p, DTensor))
    full = _full_params(problem)
    layout = ParamLayout.of(problem.names, full)
    seed = _dtensor.sync(_probes.draw_seed(layout, num_probes, distribution, generator), anchor.device_mesh)
    op = HessianOperator(problem.batches, full, layout, problem.pack, hvp, probe_batch, problem.single)
    world = dist.get_world_size()
    acc = acc_dtype(layout.dtype)
    dots = torch.zeros(num_probes, len(layout.sizes), dtype=acc, device=layout.device)
    diag = torch.zeros(layout.numel if with_diag else 0, dtype=acc, device=layout.device)
    diag_sq = torch.zeros_like(diag)
    with fsdp_forward_hooks_off(model):
        for start in range(0, num_probes, probe_batch):
            k = min(probe_batch, num_probes - start)
            vs = layout.split(_probes.probe_rows(seed, start, k, layout, distribution))
            hvs = op.apply(vs)
            if with_diag:  # the mean of the ranks' H v, exactly: the diagonal's stderr is not linear in H
                flat = layout.cat(hvs)
                dist.all_reduce(flat)
                hvs = layout.split(flat.div_(world))
            d, dg, dsq = _probes.probe_dot(vs, hvs, with_diag)
            dots[start : start + k] = d
            if with_diag:
                diag += dg
                diag_sq += dsq
    if not with_diag:
        dist.all_reduce(dots)  # the one all-reduce of the trace: per-probe, per-parameter v^T H_r v
        dots /= world
    return dots, diag, diag_sq, layout


class _RankMean:
    """The mean of the ranks' Hessians as an operator: each block of products all-reduced, divided by the world."""

    def __init__(self, op: HessianOperator) -> None:
        self.op, self.world = op, dist.get_world_size()

    def matmat(self, x: torch.Tensor) -> torch.Tensor:
        hx = self.op.matmat(x)
        dist.all_reduce(hx)
        return hx.div_(self.world)


def _sketched(
    model: nn.Module,
    problem: Any,
    num_probes: int,
    method: str,
    distribution: str,
    probe_batch: int,
    generator: torch.Generator | None,
    hvp: str,
    fd_eps: float | None,
) -> TraceEstimate:
    """Hutch++ or XTrace of the mean of the ranks' Hessians: the single-process algorithm and probes, its
    products sharded finite differences (each product's shards all-gathered: the sketch is full-size) or, for a
    second-order ``hvp``, exact products on the gathered parameters."""
    mesh = problem.params[0].device_mesh
    sketch = _sketch.hutchpp if method == "hutch++" else _sketch.xtrace

    def sync(seed: torch.Tensor) -> torch.Tensor:
        return _dtensor.sync(seed, mesh)

    if hvp in _sharded.SHARDED_HVP:
        op = _sharded_op(model, problem, fd_eps)
        try:
            value, err, samples = sketch(op, op.layout, num_probes, distribution, generator, sync)
        finally:
            op.close()
        cap = _sketch.probe_cap(op.layout)
        return TraceEstimate(value, err, op.num_matvecs, method, samples, "finite_difference", cap, op.fd_error)
    full = _full_params(problem)
    layout = ParamLayout.of(problem.names, full)
    gathered = HessianOperator(problem.batches, full, layout, problem.pack, hvp, probe_batch, problem.single)
    with fsdp_forward_hooks_off(model):
        value, err, samples = sketch(_RankMean(gathered), layout, num_probes, distribution, generator, sync)
    return TraceEstimate(value, err, gathered.num_matvecs, method, samples, gathered.engine, _sketch.probe_cap(layout))


def trace(
    model: Any,
    problem: Any,
    num_probes: int,
    method: str,
    distribution: str,
    probe_batch: int,
    tol: float | None,
    generator: torch.Generator | None,
    by: str | None,
    hvp: str,
    distributed: bool,
    supplied: torch.Tensor | None = None,
    fd_eps: float | None = None,
) -> TraceEstimate | dict[str, TraceEstimate]:
    """:func:`regops.hessian.trace` for a model under FSDP2 (arguments checked by the caller)."""
    _check(model, problem, method, tol, distributed, hvp, supplied)
    if method != "hutchinson":
        return _sketched(model, problem, num_probes, method, distribution, probe_batch, generator, hvp, fd_eps)
    engine, fd_error = hvp, None
    if hvp in _sharded.SHARDED_HVP:
        state, op = _sharded_hutchinson(
            model, problem, num_probes, distribution, probe_batch, tol, generator, supplied, fd_eps, False
        )
        dots, engine, fd_error = state.dots, "finite_difference", op.fd_error
    else:
        dots, _, _, _ = _estimate(model, problem, num_probes, distribution, probe_batch, generator, hvp, False)
    m = dots.shape[0]
    if by is None:
        mean, err = mean_stderr(dots.sum(1))
        return TraceEstimate(mean, err, m, "hutchinson", dots.sum(1), engine, None, fd_error)
    out = {}
    for key, idx in groups_of(problem.names, by).items():
        samples = dots[:, idx].sum(1)
        mean, err = mean_stderr(samples)
        out[key] = TraceEstimate(mean, err, m, "hutchinson", samples, engine, None, fd_error)
    return out


def _like(value: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """A full tensor (the same on every rank) laid out like parameter ``p`` (no communication)."""
    if not isinstance(p, DTensor):
        return value
    shape, offset = _dtensor.box(p)
    local = value
    for d, (o, n) in enumerate(zip(offset, shape, strict=True)):
        local = local.narrow(d, o, n)
    return _shard_of(local, p)


def _shard_of(local: torch.Tensor, p: DTensor) -> DTensor:
    """This rank's shard of a parameter-shaped result (computed locally) as a DTensor laid out like ``p``."""
    return DTensor.from_local(local.contiguous(), p.device_mesh, p.placements, shape=p.shape, stride=p.stride())


def diagonal(
    model: Any,
    problem: Any,
    num_probes: int,
    distribution: str,
    probe_batch: int,
    tol: float | None,
    generator: torch.Generator | None,
    hvp: str,
    distributed: bool,
    supplied: torch.Tensor | None = None,
    fd_eps: float | None = None,
) -> DiagonalEstimate:
    """:func:`regops.hessian.diagonal` for a model under FSDP2: values and stderrs laid out like the parameters."""
    _check(model, problem, "hutchinson", tol, distributed, hvp, supplied)
    if hvp in _sharded.SHARDED_HVP:
        state, op = _sharded_hutchinson(
            model, problem, num_probes, distribution, probe_batch, tol, generator, supplied, fd_eps, True
        )
        m, layout, dots = state.count, op.layout, state.dots
        mean, err = diagonal_stats(state.diag, state.diag_sq, m)
        values, errors = [], []
        for vals, out in ((mean, values), (err, errors)):
            chunks = vals.to(layout.dtype).split(op.local_sizes)
            for chunk, p, (shape, _) in zip(chunks, problem.params, op.boxes, strict=True):
                out.append(_shard_of(chunk.to(p.dtype).reshape(shape), p))
        engine, fd_error = "finite_difference", op.fd_error
    else:
        dots, diag, diag_sq, layout = _estimate(
            model, problem, num_probes, distribution, probe_batch, generator, hvp, True
        )
        m = num_probes
        mean, err = diagonal_stats(diag, diag_sq, m)
        params = problem.params
        values = [_like(v[0], p) for v, p in zip(layout.split(mean[None].to(layout.dtype)), params, strict=True)]
        errors = [_like(e[0], p) for e, p in zip(layout.split(err[None].to(layout.dtype)), params, strict=True)]
        engine, fd_error = hvp, None
    samples = dots.sum(1)
    t_mean, t_err = mean_stderr(samples)
    tr = TraceEstimate(t_mean, t_err, m, "hutchinson", samples, engine, None, fd_error)
    if problem.keyed:
        return DiagonalEstimate(
            dict(zip(problem.names, values, strict=True)), dict(zip(problem.names, errors, strict=True)), m, tr
        )
    return DiagonalEstimate(tuple(values), tuple(errors), m, tr)
