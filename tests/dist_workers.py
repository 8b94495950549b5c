"""Running a test body in 2 gloo processes on CPU, with a teardown that cannot abort or hang.

Why: a process that exits while its process group is still referenced (DistributedDataParallel's reducer and
hooks sit in reference cycles, freed only by a later garbage collection, often during interpreter shutdown)
destroys gloo's worker threads while the interpreter is being torn down, which aborts the process ("terminate
called without an active exception", SIGABRT) -- whether it does depends on when the collector happens to run, so
the test failed now and then on a loaded machine. Here every rank (1) rendezvouses through a file (no ports to
collide), with a finite timeout, (2) runs the body, (3) meets the others at a barrier, so no collective is in
flight anywhere, (4) collects garbage, so DDP's references to the group die now, and (5) only then destroys the
group. A body that raises skips the collective teardown (it would wait on a peer that may never come); its
peer fails at the timeout instead of hanging, and the first error is re-raised. The whole run has a deadline:
processes still alive then are killed and the test fails with a TimeoutError.
"""

from __future__ import annotations

import gc
import os
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch.distributed as dist
import torch.multiprocessing as mp

TIMEOUT_S = 300


def _entry(rank: int, body: Callable[..., Any], init_file: str, world: int, args: tuple) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timedelta(seconds=TIMEOUT_S)
    )
    body(rank, *args)
    dist.barrier()
    gc.collect()
    dist.destroy_process_group()


def run(body: Callable[..., Any], *args: Any, world: int = 2, deadline_s: float = 2 * TIMEOUT_S) -> None:
    """Run ``body(rank, *args)`` in ``world`` processes that share an initialised gloo process group; fails when
    they have not all finished within ``deadline_s``."""
    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.start_processes(
            _entry, args=(body, os.path.join(tmp, "init"), world, args), nprocs=world, join=False, start_method="spawn"
        )
        deadline = time.monotonic() + deadline_s
        try:
            while not ctx.join(timeout=1.0):  # re-raises the first rank's error
                if time.monotonic() > deadline:
                    raise TimeoutError(f"distributed test did not finish within {deadline_s:.0f} s")
        finally:
            for proc in ctx.processes:
                if proc.is_alive():
                    proc.kill()
                proc.join()
