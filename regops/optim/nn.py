"""Module helpers of the optim family: BatchNorm statistics kept out of SAM's second forward pass."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


@contextlib.contextmanager
def preserve_bn_stats(model: nn.Module) -> Iterator[None]:
    """Inside the block, BatchNorm layers normalise with the batch as usual but their running statistics come out
    unchanged: a snapshot of ``running_mean``, ``running_var`` and ``num_batches_tracked`` is put back on exit.

    SAM's second forward pass runs at the perturbed weights ``w + e``; its batch statistics should not enter the
    running averages a second time (davda54/sam#17). Exact (a copy back, not a momentum trick), every momentum
    setting, SyncBatchNorm included.

    Args:
        model: the module whose BatchNorm layers (``SyncBatchNorm`` included) keep
            their running statistics.

    Returns:
        A context manager; the statistics are restored when the block exits.

    Example::

        >>> model = torch.nn.Sequential(torch.nn.Linear(10, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 3))
        >>> loss_fn, x, y = torch.nn.functional.cross_entropy, torch.randn(32, 10), torch.randint(0, 3, (32,))
        >>> opt = regops.optim.SAM(model.parameters(), regops.optim.SGD, lr=0.1)
        >>> loss_fn(model(x), y).backward()
        >>> opt.first_step(zero_grad=True)
        >>> stats = model[1].running_mean.clone()
        >>> with regops.optim.preserve_bn_stats(model):  # the second forward leaves the statistics alone
        ...     loss_fn(model(x), y).backward()
        >>> opt.second_step(zero_grad=True)
        >>> torch.equal(stats, model[1].running_mean)
        True
    """
    buffers = []
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats:
            buffers += [b for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]
    saved = [b.clone() for b in buffers]
    try:
        yield
    finally:
        if buffers:
            with torch.no_grad():
                torch._foreach_copy_(buffers, saved)


__all__ = ["preserve_bn_stats"]
