"""Run a test body in several gloo processes on CPU: no port to pick (a file store in a fresh temp dir), one
deadline for the whole run (stuck processes are killed), one CPU thread per process (the machine may be loaded).

The teardown cannot abort: a process that exits while its process group is still referenced (DDP's reducer and
hooks sit in reference cycles, freed only by a later garbage collection, often during interpreter shutdown)
destroys gloo's worker threads while the interpreter is torn down, which aborts it now and then. So after the
body every rank meets the others at a barrier (no collective in flight anywhere), collects garbage (DDP's
references to the group die now) and only then destroys the group. A body that raises skips the barrier (its
peer would wait on it): the peer fails at the group's timeout and the first error is re-raised."""

from __future__ import annotations

import gc
import multiprocessing
import os
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank: int, body: Callable[..., None], world: int, init_file: str, args: tuple[Any, ...]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timedelta(seconds=90)
    )
    try:
        body(rank, world, *args)
        dist.barrier()
        gc.collect()
    finally:
        dist.destroy_process_group()


# Workers start from a fork server that has imported these once (a fresh interpreter importing torch costs
# seconds on a loaded machine; the server is shared by every run in the session). It never initialises CUDA or
# thread pools, so forking from it is safe, unlike forking the test process itself.
_PRELOAD = ["torch", "torch.distributed.tensor", "torch.distributed.fsdp", "regops"]


def _context():
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    return ctx


def run(body: Callable[..., None], world: int = 2, *args: Any, timeout: float = 180.0) -> None:
    """``body(rank, world, *args)`` in ``world`` new processes; re-raises the first failure in the parent."""
    _context()
    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.start_processes(
            _entry,
            args=(body, world, os.path.join(tmp, "store"), args),
            nprocs=world,
            join=False,
            start_method="forkserver",
        )
        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(timeout=1.0):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"distributed test did not finish within {timeout:.0f} s")
        finally:
            for proc in ctx.processes:
                if proc.is_alive():
                    proc.kill()
                proc.join()


class Checks:
    """Collects failed checks so that one run reports all of them (with the rank)."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.failures: list[str] = []

    def equal(self, name: str, got: torch.Tensor, want: torch.Tensor) -> None:
        if got.shape != want.shape or got.dtype != want.dtype or not torch.equal(got, want):
            diff = (got.double() - want.double()).abs().max().item() if got.shape == want.shape else "shape"
            self.failures.append(f"{name}: not bit-identical (max abs diff {diff})")

    def close(self, name: str, got: torch.Tensor, want: torch.Tensor, rtol: float = 1e-6, atol: float = 1e-9) -> None:
        try:
            torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
        except AssertionError as exc:
            self.failures.append(f"{name}: {str(exc).splitlines()[0:4]}")

    def true(self, name: str, cond: bool) -> None:
        if not cond:
            self.failures.append(name)

    def done(self) -> None:
        if self.failures:
            raise AssertionError(f"rank {self.rank}:\n" + "\n".join(self.failures))


# ---------------------------------------------------------------------------------------------- a shared model
def mlp() -> torch.nn.Module:
    """The float64 MLP (Linear, LayerNorm, Tanh) the FSDP2 tests of several families shard."""
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 3)
    ).double()


def data(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 6, dtype=torch.float64, generator=g), torch.randint(0, 3, (n,), generator=g)


def sharded(world: int) -> torch.nn.Module:
    """:func:`mlp` under FSDP2: every Linear and LayerNorm, then the root, ``fully_shard``-ed."""
    from torch import nn
    from torch.distributed.fsdp import fully_shard

    model = mlp()
    for layer in model:
        if isinstance(layer, (nn.Linear, nn.LayerNorm)):
            fully_shard(layer)
    return fully_shard(model)
