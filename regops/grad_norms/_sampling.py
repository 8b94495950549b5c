"""Poisson sampling of batches: the sampling DP-SGD's privacy accounting assumes (each example joins each
step's batch independently with probability ``q``), so batch sizes vary around ``q * N``."""

from __future__ import annotations

from collections.abc import Iterator

import torch


class PoissonBatchSampler(torch.utils.data.Sampler):
    """Yields ``steps`` batches of indices of ``range(num_samples)``, each example in each batch independently
    with probability ``sample_rate``. Use it as a ``DataLoader``'s ``batch_sampler``; divide by
    `expected_batch_size` (``dp_clipping(..., expected_batch_size=...)``), not the realised size.

    A batch may be empty: the DP step must still happen (noise only): run the ``dp_clipping`` block without a
    forward, or skip nothing.

    Args:
        num_samples: dataset size ``N``.
        sample_rate: ``q`` in (0, 1].
        steps: batches per epoch; default ``round(1 / q)`` (one pass in expectation).
        generator: ``torch.Generator`` for reproducible draws.

    Example::

        >>> ds = torch.utils.data.TensorDataset(torch.randn(1000, 4), torch.randint(0, 2, (1000,)))
        >>> sampler = regops.PoissonBatchSampler(len(ds), sample_rate=64 / len(ds))
        >>> loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler)
        >>> len(loader), sampler.expected_batch_size
        (16, 64)
    """

    def __init__(
        self, num_samples: int, sample_rate: float, steps: int | None = None, generator: torch.Generator | None = None
    ) -> None:
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples <= 0:
            raise ValueError(f"regops: num_samples must be a positive int, got {num_samples!r}")
        if not 0 < sample_rate <= 1:
            raise ValueError(f"regops: sample_rate must be in (0, 1], got {sample_rate!r}")
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0):
            raise ValueError(f"regops: steps must be a positive int, got {steps!r}")
        self.num_samples = num_samples
        self.sample_rate = float(sample_rate)
        self.steps = steps if steps is not None else max(1, round(1 / self.sample_rate))
        self.generator = generator

    @property
    def expected_batch_size(self) -> int:
        return max(1, round(self.sample_rate * self.num_samples))

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            keep = torch.rand(self.num_samples, generator=self.generator) < self.sample_rate
            yield keep.nonzero().flatten().tolist()
