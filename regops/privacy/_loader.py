"""Data loading for DP-SGD: Poisson batches (:class:`regops.PoissonBatchSampler`) whose empty draws still come out
as batches (tensors with 0 examples, of the right trailing shapes and dtypes), sharded across ranks without
changing the sampling the privacy analysis assumes, and split into physical batches for virtual steps."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, IterableDataset, Sampler
from torch.utils.data._utils.collate import default_collate

from regops.grad_norms import PoissonBatchSampler
from regops.privacy._step import DPOptimizer, is_fsdp


def _empty_like(batch: Any, batch_dim: int) -> Any:
    """``batch`` (a collated batch) with 0 examples: tensors keep their trailing shapes, dtypes and devices."""
    if isinstance(batch, torch.Tensor):
        shape = list(batch.shape)
        if shape:
            shape[batch_dim if batch.dim() > batch_dim else 0] = 0
        return batch.new_empty(shape)
    if isinstance(batch, Mapping):
        return {k: _empty_like(v, batch_dim) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(_empty_like(v, batch_dim) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_empty_like(v, batch_dim) for v in batch)
    # Anything else would put data in a batch that has no examples.
    raise TypeError(
        f"regops: cannot make an empty batch holding a {type(batch).__name__}: an empty Poisson batch is built from "
        "tensors, dicts, lists and tuples only; make the collate function return tensors"
    )


class CollateWithEmpty:
    """The user's collate function, except that an empty list of examples gives an empty batch shaped like the
    collated first example of the dataset (computed once, when the loader is built)."""

    def __init__(self, collate_fn: Callable[[list[Any]], Any], dataset: Dataset, batch_dim: int) -> None:
        self.collate_fn = collate_fn
        self.batch_dim = batch_dim
        self.one = collate_fn([dataset[0]])
        _empty_like(self.one, batch_dim)  # an unsupported batch type fails now, not at the first empty batch

    def __call__(self, examples: list[Any]) -> Any:
        if len(examples) == 0:
            return _empty_like(self.one, self.batch_dim)
        return self.collate_fn(examples)


class ShardedPoissonSampler(Sampler[list[int]]):
    """One rank's share of the single-process Poisson batches: each step draws the whole dataset's batch (every
    example independently with rate ``q``, the sampling the accounting assumes) and keeps the indices
    ``i % num_replicas == rank`` (``DistributedSampler``'s shards, unshuffled). With the same generator state on
    every rank, the ranks' batches are exactly the single-process batch, split; a rank's share may be empty (it
    is still yielded, so that every rank takes every step)."""

    def __init__(self, sampler: PoissonBatchSampler, num_replicas: int, rank: int) -> None:
        if isinstance(num_replicas, bool) or not isinstance(num_replicas, int) or num_replicas <= 0:
            raise ValueError(f"regops: num_replicas must be a positive int, got {num_replicas!r}")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < num_replicas:
            raise ValueError(f"regops: rank must be an int in [0, {num_replicas}), got {rank!r}")
        self.sampler = sampler
        self.num_replicas = num_replicas
        self.rank = rank

    @property
    def sample_rate(self) -> float:
        return self.sampler.sample_rate

    @property
    def generator(self) -> torch.Generator | None:
        return self.sampler.generator

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[list[int]]:
        w, r = self.num_replicas, self.rank
        for batch in self.sampler:
            yield [i for i in batch if i % w == r]


def _distributed_shard(data_loader: DataLoader | None) -> tuple[int, int]:
    sampler = getattr(data_loader, "sampler", None)
    if isinstance(sampler, torch.utils.data.DistributedSampler):
        return sampler.num_replicas, sampler.rank
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise RuntimeError("regops: distributed=True needs an initialized torch.distributed process group")
    return torch.distributed.get_world_size(), torch.distributed.get_rank()


class DPDataLoader(DataLoader):
    """A ``DataLoader`` drawing Poisson batches: each example of ``dataset`` joins each step's batch independently
    with probability ``sample_rate`` (`regops.PoissonBatchSampler`), so batch sizes vary around
    ``sample_rate * len(dataset)``, and a batch may be empty: it comes out as tensors with 0 examples in the batch
    dim and the trailing shapes and dtypes of the collated first example (the DP step must still happen, adding
    only the noise), where torch's default collate would fail.

    ``distributed=True``: each rank yields its shard (``i % world == rank``) of the single-process batch, empty
    shares included (`ShardedPoissonSampler`); give every rank the same ``generator`` state and the union
    of the ranks' batches is the single-process batch.

    Args:
        dataset: a map-style dataset.
        sample_rate: ``q`` in (0, 1].
        steps: batches per pass; default ``round(1 / q)``.
        collate_fn: as ``DataLoader``'s (default ``default_collate``).
        generator: ``torch.Generator`` of the draws (also the ``DataLoader``'s, as in Opacus).
        distributed: shard the batches across the ranks of ``torch.distributed``.
        batch_first: the batch is dim 0 of the collated tensors (``False``: dim 1, 1-D tensors dim 0).
        **kwargs: other ``DataLoader`` arguments (``num_workers``, ``pin_memory``, ...).

    Example::

        >>> dataset = torch.utils.data.TensorDataset(torch.randn(1000, 4), torch.randint(0, 2, (1000,)))
        >>> g = torch.Generator().manual_seed(0)
        >>> loader = regops.DPDataLoader(dataset, sample_rate=250 / len(dataset), generator=g)
        >>> len(loader)  # steps per pass: 1 / q
        4
        >>> train_loader = torch.utils.data.DataLoader(dataset, batch_size=100)
        >>> loader = regops.DPDataLoader.from_data_loader(train_loader)  # q = 1 / len(train_loader)
        >>> loader.sample_rate
        0.1
    """

    def __init__(
        self,
        dataset: Dataset,
        *,
        sample_rate: float,
        steps: int | None = None,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        generator: torch.Generator | None = None,
        distributed: bool = False,
        batch_first: bool = True,
        num_replicas: int | None = None,
        rank: int | None = None,
        **kwargs: Any,
    ) -> None:
        if isinstance(dataset, IterableDataset):
            raise ValueError("regops: Poisson sampling needs a map-style dataset (len and indexing), not an iterable")
        conflicting = sorted(set(kwargs) & {"batch_size", "shuffle", "sampler", "batch_sampler", "drop_last"})
        if conflicting:
            raise ValueError(f"regops: DPDataLoader draws its own batches; {conflicting} do not apply")
        poisson = PoissonBatchSampler(len(dataset), sample_rate, steps=steps, generator=generator)
        batch_sampler: Sampler[list[int]] = poisson
        if distributed:
            if num_replicas is None or rank is None:
                num_replicas, rank = _distributed_shard(None)
            batch_sampler = ShardedPoissonSampler(poisson, num_replicas, rank)
        self.sample_rate = float(sample_rate)
        self.distributed = bool(distributed)
        super().__init__(
            dataset,
            batch_sampler=batch_sampler,
            collate_fn=CollateWithEmpty(collate_fn or default_collate, dataset, 0 if batch_first else 1),
            generator=generator,
            **kwargs,
        )

    @classmethod
    def from_data_loader(
        cls,
        data_loader: DataLoader,
        *,
        generator: torch.Generator | None = None,
        distributed: bool = False,
        batch_first: bool = True,
    ) -> DPDataLoader:
        """The Poisson version of ``data_loader``: rate ``1 / len(data_loader)`` (the same expected batch size),
        ``len(data_loader)`` steps per pass, its dataset, collate function and worker settings; the draws use
        ``generator`` (default: ``data_loader.generator``). Under ``distributed=True`` a ``DistributedSampler``
        of ``data_loader`` gives the shard (``num_replicas``, ``rank``), else ``torch.distributed`` does."""
        if isinstance(data_loader.dataset, IterableDataset):
            raise ValueError("regops: Poisson sampling needs a map-style dataset (len and indexing), not an iterable")
        steps = len(data_loader)
        num_replicas, rank = _distributed_shard(data_loader) if distributed else (None, None)
        return cls(
            data_loader.dataset,
            sample_rate=1 / steps,
            steps=steps,
            collate_fn=data_loader.collate_fn,
            generator=generator if generator is not None else data_loader.generator,
            distributed=distributed,
            batch_first=batch_first,
            num_replicas=num_replicas,
            rank=rank,
            **_worker_settings(data_loader),
        )


def _worker_settings(data_loader: DataLoader) -> dict[str, Any]:
    return dict(
        num_workers=data_loader.num_workers,
        pin_memory=data_loader.pin_memory,
        timeout=data_loader.timeout,
        worker_init_fn=data_loader.worker_init_fn,
        multiprocessing_context=data_loader.multiprocessing_context,
        prefetch_factor=data_loader.prefetch_factor,
        persistent_workers=data_loader.persistent_workers,
    )


class SplittingSampler(Sampler[list[int]]):
    """Splits each batch of ``sampler`` into physical batches of at most ``max_batch_size`` (as equal as possible)
    and tells the optimizer which of them end a logical batch (``signal_skip_step``)."""

    def __init__(self, sampler: Sampler[list[int]], max_batch_size: int, optimizer: DPOptimizer) -> None:
        self.sampler = sampler
        self.max_batch_size = max_batch_size
        self.optimizer = optimizer

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.sampler:
            batch = list(batch)
            parts = max(1, math.ceil(len(batch) / self.max_batch_size))
            small, extra = divmod(len(batch), parts)
            start = 0
            for j in range(parts):
                end = start + small + (1 if j < extra else 0)
                self.optimizer.signal_skip_step(do_skip=j < parts - 1)
                yield batch[start:end]
                start = end

    def __len__(self) -> int:
        if isinstance(self.sampler, BatchSampler) and self.sampler.batch_size is not None:
            expected = self.sampler.batch_size
        elif isinstance(self.sampler, (PoissonBatchSampler, ShardedPoissonSampler)):
            inner = self.sampler if isinstance(self.sampler, PoissonBatchSampler) else self.sampler.sampler
            share = 1 if isinstance(self.sampler, PoissonBatchSampler) else self.sampler.num_replicas
            expected = inner.sample_rate * inner.num_samples / share
        else:
            return len(self.sampler)
        return math.ceil(len(self.sampler) * expected / self.max_batch_size)


class BatchMemoryManager:
    """Virtual steps: iterate over physical batches of at most ``max_physical_batch_size`` examples while the DP
    step (clipping over the whole logical batch, noise once, one optimizer update, one accounting step) happens
    once per logical batch of ``data_loader``. Same use as Opacus's ``BatchMemoryManager``: call
    ``optimizer.step()`` and ``optimizer.zero_grad()`` after every physical batch as usual; the optimizer skips
    the ones that do not end their logical batch.

    Under DDP each rank splits its own share (the ranks may run different numbers of physical batches). Not
    available under FSDP2 (its forward and backward are collectives: every rank would have to run the same number
    of physical batches).

    Args:
        data_loader: the loader returned by `regops.PrivacyEngine.make_private` (its batches are logical ones).
        max_physical_batch_size: the most examples in one forward and backward.
        optimizer: the `DPOptimizer` returned by ``make_private``.

    Example::

        >>> F = torch.nn.functional
        >>> model = torch.nn.Sequential(torch.nn.Linear(20, 32), torch.nn.ReLU(), torch.nn.Linear(32, 5))
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> dataset = torch.utils.data.TensorDataset(torch.randn(256, 20), torch.randint(0, 5, (256,)))
        >>> train_loader = torch.utils.data.DataLoader(dataset, batch_size=64)
        >>> privacy_engine = regops.PrivacyEngine()
        >>> model, optimizer, train_loader = privacy_engine.make_private(
        ...     module=model, optimizer=optimizer, data_loader=train_loader, noise_multiplier=1.1, max_grad_norm=1.0)
        >>> manager = regops.privacy.BatchMemoryManager
        >>> with manager(data_loader=train_loader, max_physical_batch_size=16, optimizer=optimizer) as physical:
        ...     for x, y in physical:
        ...         optimizer.zero_grad()
        ...         F.cross_entropy(model(x), y).backward()
        ...         optimizer.step()
    """

    def __init__(self, *, data_loader: DataLoader, max_physical_batch_size: int, optimizer: DPOptimizer) -> None:
        if not isinstance(optimizer, DPOptimizer):
            raise TypeError(
                "regops: BatchMemoryManager needs the optimizer returned by PrivacyEngine.make_private, got "
                f"{type(optimizer).__name__}"
            )
        if (
            isinstance(max_physical_batch_size, bool)
            or not isinstance(max_physical_batch_size, int)
            or max_physical_batch_size <= 0
        ):
            raise ValueError(f"regops: max_physical_batch_size must be a positive int, got {max_physical_batch_size!r}")
        if data_loader.batch_sampler is None:
            raise ValueError("regops: BatchMemoryManager splits the batches of a loader with a batch sampler")
        if is_fsdp(optimizer._dp_step.module):
            raise NotImplementedError(
                "regops: virtual steps under FSDP2 are not supported: every rank would have to run the same number "
                "of physical batches (FSDP2's forward and backward are collectives)"
            )
        self.data_loader = data_loader
        self.max_physical_batch_size = max_physical_batch_size
        self.optimizer = optimizer

    def __enter__(self) -> DataLoader:
        loader = self.data_loader
        return DataLoader(
            loader.dataset,
            batch_sampler=SplittingSampler(loader.batch_sampler, self.max_physical_batch_size, self.optimizer),
            collate_fn=loader.collate_fn,
            generator=loader.generator,
            **_worker_settings(loader),
        )

    def __exit__(self, *exc: Any) -> None:
        return None
