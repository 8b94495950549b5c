"""The Hutchinson loop of :func:`regops.hessian.trace` and :func:`regops.hessian.diagonal`: blocks of Philox
probes (or the user's), their Hessian-vector products, the fused accumulation, early stopping on a relative
standard error, and probes split across the ranks of a process group."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from regops._core.dtypes import acc_dtype
from regops.hessian import _probes
from regops.hessian._hvp import HessianOperator
from regops.hessian._probes import ParamLayout
from regops.hessian._results import mean_stderr


@dataclass
class Dist:
    """The process group probes are split across (``distributed=True``), or one process."""

    group: Any = None
    rank: int = 0
    world: int = 1

    @classmethod
    def of(cls, distributed: bool, group: Any) -> Dist:
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
        """The group's first rank's seed, in place (on the parameters' device, where the probes are drawn)."""
        if self.world == 1:
            return seed
        import torch.distributed as dist

        src = dist.get_global_rank(self.group, 0) if self.group is not None else 0
        dist.broadcast(seed, src=src, group=self.group)
        return seed

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(t, group=self.group)
        return t


@dataclass
class State:
    dots: torch.Tensor  # [m, P] per probe, per parameter v^T H v (rows of probes not run yet are zero)
    diag: torch.Tensor  # [N] sum over probes of v * Hv
    diag_sq: torch.Tensor  # [N] sum over probes of (v * Hv)^2
    count: int  # probes done


def run(
    op: HessianOperator,
    layout: ParamLayout,
    num_probes: int,
    distribution: str,
    generator: torch.Generator | None,
    tol: float | None,
    stop_metric: Callable[[State], float],
    dist_: Dist,
    progress: bool,
    desc: str,
    with_diag: bool,
    supplied: torch.Tensor | None = None,
) -> State:
    """Probes ``0 .. num_probes - 1`` (this rank's share of each round), accumulated; stops early once
    ``stop_metric`` falls below ``tol``."""
    from tqdm.auto import tqdm

    if supplied is None:
        seed = dist_.broadcast_seed(_probes.draw_seed(layout, num_probes, distribution, generator))

    def rows(start: int, k: int) -> tuple[torch.Tensor, ...]:
        if supplied is not None:
            return layout.split(supplied[start : start + k])
        return layout.split(_probes.probe_rows(seed, start, k, layout, distribution))

    acc = acc_dtype(layout.dtype)
    dev = layout.device
    state = State(
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


def trace_rel_stderr(state: State) -> float:
    mean, err = mean_stderr(state.dots[: state.count].sum(1))
    return err / abs(mean) if mean != 0 else math.inf


def diag_rel_stderr(state: State, reduce: Callable[[torch.Tensor], Any] | None = None) -> float:
    """The diagonal's relative standard error, ``|stderr| / |mean|`` over its entries; ``reduce`` sums the two
    per-entry sums over the ranks when each holds a shard of the diagonal."""
    m = state.count
    if m < 2:
        return math.inf
    mean = state.diag.double() / m
    var = (state.diag_sq.double() / m - mean * mean).clamp_min(0) * m / (m - 1)
    sums = torch.stack([var.sum(), mean.square().sum()])
    if reduce is not None:
        reduce(sums)
    norm = math.sqrt(sums[1].item())
    return math.sqrt(sums[0].item() / m) / norm if norm > 0 else math.inf


def warn_tol(tol: float | None, metric: float, count: int, what: str, stacklevel: int = 3) -> None:
    """A ``RuntimeWarning`` (at the caller of the public function) when ``tol`` was not reached."""
    if tol is not None and not metric < tol:
        warnings.warn(
            f"regops: tol={tol:g} not reached: the {what} has a relative standard error of {metric:.3g} after all "
            f"{count} probes; pass a larger num_probes (the error falls as 1/sqrt(probes): about "
            f"{math.ceil(count * (metric / tol) ** 2) if math.isfinite(metric) else 'many more'} probes for this tol)",
            RuntimeWarning,
            stacklevel=stacklevel,
        )
