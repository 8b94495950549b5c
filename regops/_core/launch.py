"""The one way regops launches a Triton kernel: on the tensor's device, on its current stream, within CUDA's
grid limits.

Every launcher calls ``launch(kernel, grid, *args, device=t.device, **meta)`` instead of ``kernel[grid](...)``:

* the launch runs under a device guard, so a tensor on ``cuda:1`` is processed on ``cuda:1`` (and on that
  device's current stream) whatever device is current;
* the grid is checked against CUDA's limits (x < 2**31, y and z <= 65535): a launcher whose grid could pass
  them must fold the extra blocks into x or loop inside the kernel; an oversized grid is a clear error here,
  never a failed launch on a GPU the CPU tests cannot see;
* :func:`recording` captures the grids instead of launching, so tests can check the grids a launcher computes
  for huge shapes (meta tensors) without a GPU and without allocating them.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

# CUDA's limits on a grid's x, y and z dimensions (blocks).
MAX_GRID = (2**31 - 1, 65535, 65535)


class GridTooLargeError(RuntimeError):
    """A launcher computed a grid beyond CUDA's limits."""


@dataclass
class Launch:
    kernel: str
    grid: tuple[int, ...]
    meta: dict[str, Any]


_recorder: list[list[Launch]] = []


def check_grid(grid: tuple[int, ...], kernel_name: str = "kernel") -> tuple[int, ...]:
    grid = tuple(int(g) for g in grid)
    if not 1 <= len(grid) <= 3:
        raise GridTooLargeError(f"regops: {kernel_name} grid {grid} must have 1 to 3 dimensions")
    for axis, (size, limit) in enumerate(zip(grid, MAX_GRID, strict=False)):
        if size > limit:
            raise GridTooLargeError(
                f"regops: {kernel_name} grid {grid} exceeds CUDA's limit of {limit} blocks in dimension {'xyz'[axis]}"
            )
    return grid


def launch(kernel, grid: tuple[int, ...], *args: Any, device: torch.device, **meta: Any) -> None:
    """``kernel[grid](*args, **meta)`` on ``device`` (guarded) after checking ``grid`` against CUDA's limits."""
    name = getattr(getattr(kernel, "fn", kernel), "__name__", "kernel")
    grid = check_grid(grid, name)
    if _recorder:
        _recorder[-1].append(Launch(name, grid, meta))
        return
    if any(g == 0 for g in grid):
        return
    if device.type == "cuda":
        with torch.cuda.device(device):
            kernel[grid](*args, **meta)
    else:
        kernel[grid](*args, **meta)


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (each GPU its own: a mixed machine must not size grids for the
    first one); a nominal 132 (an H100) for meta tensors, so recorded grids are those of a large GPU."""
    if device.type != "cuda":
        return 132
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@contextlib.contextmanager
def recording() -> Iterator[list[Launch]]:
    """Inside the block, launches are recorded (kernel name, grid, meta-parameters) and not run.

    >>> with recording() as launches:
    ...     dropout(torch.empty(2**32, device="meta"), 0.1, seed, offset)
    >>> launches[0].grid
    """
    launches: list[Launch] = []
    _recorder.append(launches)
    try:
        yield launches
    finally:
        _recorder.pop()
