"""Running a test body in 2 gloo processes on CPU, with a teardown that cannot abort or hang.

Why: a process that exits while its process group is still referenced (DistributedDataParallel's reducer and
hooks sit in reference cycles, freed only by a later garbage collection, often during interpreter shutdown)
destroys gloo's worker threads while the interpreter is being torn down, which aborts the process ("terminate
called without an active exception", SIGABRT) -- whether it does depends on when the collector happens to run, so
the test failed now and then on a loaded machine. Here every rank (1) rendezvouses through a file (no ports to
collide), with a finite timeout, (2) runs the body, (3) meets the others at a barrier, so no collective is in
flight anywhere, (4) collects garbage, so DDP's references to the group die now, and (5) only then destroys the
group. A body that raises skips the collective teardown (it would wait on a peer that may never come); its
peer fails at the timeout instead of hanging, and mp.spawn reports the first error.
"""

from __future__ import annotations

import gc
import os
import tempfile
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


def run(body: Callable[..., Any], *args: Any, world: int = 2) -> None:
    """Run ``body(rank, *args)`` in ``world`` processes that share an initialised gloo process group."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_entry, args=(body, os.path.join(tmp, "init"), world, args), nprocs=world, join=True)
