"""Hessian-vector products of a model under FSDP2 from its own sharded gradients, and the Hutchinson loop on them.

``H v ~ (g(theta + h v) - g(theta - h v)) / 2h`` with ``g`` the gradient FSDP2 itself computes: each rank moves
only its shards of the parameters (in place: FSDP2 all-gathers them module by module in the forward), runs the
model's forward and ``backward()`` (FSDP2 reduce-scatters the gradients, the mean over the ranks: the gradient of
the mean of the ranks' losses) and differences its gradient shards. No rank ever holds more than its shards plus
the modules FSDP2 has gathered. A rank's part of probe ``k`` is exactly its shards' elements of the single-process
probe row ``k`` (entries are functions of (seed, probe, global parameter index)), so ``v^T H v`` is a sum of local
dots (one all-reduce of the ``[probes, params]`` dots per batch of probes) and ``v * H v`` stays sharded.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from regops._core import dtensor as _dtensor
from regops._core.dtypes import acc_dtype
from regops.hessian import _hutchinson, _probes
from regops.hessian._context import FixedRNG
from regops.hessian._hutchinson import State, trace_rel_stderr
from regops.hessian._hvp import NOT_A_FUNCTION_OF_PARAMS, check_loss, default_fd_step
from regops.hessian._probes import ParamLayout
from regops.hessian.reference import row_stride

SHARDED_HVP = ("auto", "finite_difference")  # hvp= values that run here; the others gather the parameters


def _fsdp_modules(model: torch.nn.Module) -> list[Any]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def _param_group(module: Any) -> Any:
    return module._get_fsdp_state()._fsdp_param_group


class ShardedFD:
    """Central differences of FSDP2's sharded gradients of ``model``'s loss, one probe at a time.

    ``params``: the trainable parameters (DTensors, in the layout's order). The user's ``p.grad`` and every
    parameter are as they were when :meth:`close` returns (the shards are restored from a copy, bit for bit).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        forwards: Callable[[], Any],
        params: Sequence[DTensor],
        layout: ParamLayout,
        fd_step: float | None,
    ) -> None:
        self.model, self.params, self.layout = model, tuple(params), layout
        self.h = fd_step if fd_step is not None else default_fd_step(self.params)
        if not (math.isfinite(self.h) and self.h > 0):
            raise ValueError(f"regops: the finite-difference step must be a positive number, got {self.h!r}")
        self.boxes = [_dtensor.box(p) for p in self.params]
        self.bases = [sum(layout.sizes[:i]) for i in range(len(self.params))]
        self.locals = [p.to_local() for p in self.params]
        self.local_sizes = [t.numel() for t in self.locals]
        self.batches = self._batches(forwards)
        self.rngs = [FixedRNG(layout.device) for _ in self.batches]
        self.num_matvecs = 0
        self.fd_error: float | None = None
        self._checked = False
        self._user_grads = [p.grad for p in self.params]
        modules = _fsdp_modules(model)
        groups = [g for g in map(_param_group, modules) if g is not None]
        self._sync = [(g, g.reduce_grads, g.gradient_divide_factor) for g in groups]
        for g in groups:  # gradients reduce-scattered, as a mean over the ranks, during the estimate
            g.reduce_grads, g.gradient_divide_factor = True, None
        for module in modules:
            module.reshard()  # the next forward gathers the shards as this engine sets them
        self._saved = [t.detach().clone() for t in self.locals]

    def _batches(self, forwards: Callable[[], Any]) -> list[tuple[Callable[[], torch.Tensor], float]]:
        """The rank's batches with their loss scales ``w_b / sum w``: the reduced gradient is then the mean over
        the ranks of each rank's batch-weighted mean gradient. Every rank must hold as many batches (each runs
        FSDP2's collectives)."""
        batches = list(forwards())
        counts = torch.tensor([len(batches), -len(batches)], dtype=torch.int64)
        dist.all_reduce(counts, op=dist.ReduceOp.MAX)
        if counts[0] != -counts[1]:
            raise ValueError(
                f"regops: under fully_shard every rank must give as many batches (each runs FSDP2's collectives): "
                f"between {-int(counts[1])} and {int(counts[0])} here"
            )
        total = sum(w for _, w in batches)
        if not batches or total == 0.0:
            raise ValueError("regops: no data: the batches were empty")
        return [(fn, w / total) for fn, w in batches]

    # ------------------------------------------------------------------ probes, this rank's part
    def probe(self, seed: torch.Tensor, row: int, distribution: str) -> list[torch.Tensor]:
        """This rank's shards of single-process probe row ``row``, bit for bit (drawn in the layout's common
        dtype and cast to each parameter's, as :meth:`ParamLayout.split` does)."""
        stride = row_stride(self.layout.numel, distribution)
        return [
            _probes.stream_box(seed, row * stride + base, p.shape, shape, offset, distribution, self.layout.dtype).to(
                p.dtype
            )
            for p, base, (shape, offset) in zip(self.params, self.bases, self.boxes, strict=True)
        ]

    def shard(self, rows: torch.Tensor) -> list[torch.Tensor]:
        """``[K, N]`` full probe rows -> per parameter ``[K, *local_shape]``, this rank's shards."""
        out = []
        for part, (shape, offset) in zip(self.layout.split(rows), self.boxes, strict=True):
            for d, (o, n) in enumerate(zip(offset, shape, strict=True)):
                part = part.narrow(d + 1, o, n)
            out.append(part.contiguous())
        return out

    # ------------------------------------------------------------------ products
    def _gradient_at(self, step: float, v: Sequence[torch.Tensor]) -> list[torch.Tensor | None]:
        """This rank's shards of ``grad L(theta + step v)`` (``None``: no gradient reaches the parameter)."""
        with torch.no_grad():
            for t, s, vi in zip(self.locals, self._saved, v, strict=True):
                t.copy_(s + step * vi)
        for p in self.params:
            p.grad = None
        for index, (fn, scale) in enumerate(self.batches):
            with torch.enable_grad(), self.rngs[index]():
                loss = check_loss(fn())
            if not loss.requires_grad:
                raise ValueError(NOT_A_FUNCTION_OF_PARAMS)
            (loss if scale == 1.0 else loss * scale).backward()
        grads = [None if p.grad is None else p.grad.to_local() for p in self.params]
        for p in self.params:
            p.grad = None
        if not self._checked:
            if all(g is None for g in grads):
                raise ValueError(NOT_A_FUNCTION_OF_PARAMS)
            self._checked = True
        return grads

    def _central(self, h: float, v: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        plus = self._gradient_at(h, v)
        minus = self._gradient_at(-h, v)
        # in place on the gradient shards (no other buffer), the same rounding as (a - b) / 2h
        return [
            torch.zeros_like(vi) if a is None or b is None else a.sub_(b).div_(2.0 * h).to(vi.dtype)
            for a, b, vi in zip(plus, minus, v, strict=True)
        ]

    def apply(self, v: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """This rank's shards of ``H v`` for this rank's shards of one probe ``v``."""
        self.num_matvecs += 1
        hv = self._central(self.h, v)
        if self.fd_error is None:
            # Richardson, as the single-process engine: |D(2h) - D(h)| / 3 estimates D(h)'s error (norms summed
            # over the ranks' shards; one extra pair of gradients, on the first probe)
            hv2 = self._central(2.0 * self.h, v)
            sums = torch.zeros(2, dtype=torch.float64)
            for a, b in zip(hv, hv2, strict=True):
                sums[0] += (a.double() - b.double()).square().sum()
                sums[1] += a.double().square().sum()
            dist.all_reduce(sums)
            diff, norm = float(sums[0]), float(sums[1])
            self.fd_error = math.sqrt(diff) / 3.0 / math.sqrt(norm) if norm > 0 else (0.0 if diff == 0 else math.inf)
        return hv

    def full(self, local: Sequence[torch.Tensor]) -> torch.Tensor:
        """Per-parameter shards -> the full ``[N]`` vector on every rank (an all-gather per parameter)."""
        parts = [
            _dtensor.to_dtensor(t.contiguous(), p).full_tensor().reshape(-1).to(self.layout.dtype)
            for t, p in zip(local, self.params, strict=True)
        ]
        return torch.cat(parts)

    def matmat(self, x: torch.Tensor) -> torch.Tensor:
        """``[K, N] -> [K, N]`` full rows on every rank (Hutch++ and XTrace, whose sketches are full-size)."""
        shards = self.shard(x)
        return torch.stack([self.full(self.apply([s[j] for s in shards])) for j in range(x.shape[0])])

    def close(self) -> None:
        """Shards, gradients and FSDP2's reduction settings back to what they were."""
        with torch.no_grad():
            for t, s in zip(self.locals, self._saved, strict=True):
                t.copy_(s)
        for p, g in zip(self.params, self._user_grads, strict=True):
            p.grad = g
        for g, reduce, factor in self._sync:
            g.reduce_grads, g.gradient_divide_factor = reduce, factor
        self._saved = []


def _agree(stop: bool) -> bool:
    """Every rank stops together (the metrics agree up to the all-reduce's rounding; take the cautious rank's)."""
    flag = torch.tensor([1 if stop else 0], dtype=torch.int64)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def diag_rel_stderr(state: State) -> float:
    """:func:`regops.hessian._hutchinson.diag_rel_stderr` of the sharded diagonal (its two sums all-reduced)."""
    return _hutchinson.diag_rel_stderr(state, dist.all_reduce)


def run(
    op: ShardedFD,
    num_probes: int,
    probe_batch: int,
    distribution: str,
    seed: torch.Tensor | None,
    supplied: torch.Tensor | None,
    tol: float | None,
    with_diag: bool,
) -> State:
    """Probes ``0 .. num_probes - 1`` one at a time, their local dots all-reduced per block of ``probe_batch``;
    ``diag`` / ``diag_sq`` are this rank's shards' elements. With ``tol``, stops after the first block whose
    relative standard error is below it (as one process does with the same ``probe_batch``)."""
    layout = op.layout
    acc = acc_dtype(layout.dtype)
    n_local = sum(op.local_sizes) if with_diag else 0
    state = State(
        torch.zeros(num_probes, len(layout.sizes), dtype=acc, device=layout.device),
        torch.zeros(n_local, dtype=acc, device=layout.device),
        torch.zeros(n_local, dtype=acc, device=layout.device),
        0,
    )
    metric = diag_rel_stderr if with_diag else trace_rel_stderr
    for start in range(0, num_probes, probe_batch):
        k = min(probe_batch, num_probes - start)
        block = torch.zeros(k, len(layout.sizes), dtype=acc, device=layout.device)
        rows = op.shard(supplied[start : start + k]) if supplied is not None else None
        for j in range(k):
            v = [r[j] for r in rows] if rows is not None else op.probe(seed, start + j, distribution)
            hv = op.apply(v)
            d, dg, dsq = _probes.probe_dot([t[None] for t in v], [t[None] for t in hv], with_diag)
            block[j] = d[0]
            if with_diag:
                state.diag += dg
                state.diag_sq += dsq
        dist.all_reduce(block)  # per-probe, per-parameter v^T H v: the sum of the ranks' local dots
        state.dots[start : start + k] = block
        state.count = start + k
        if tol is not None and state.count >= 2 and _agree(metric(state) < tol):
            break
    state.dots = state.dots[: state.count]
    return state
