"""Walking a loader in a known order: the dataset index of every example a pass yields.

Functions that return one result per example (data scores, TracIn) give them in dataset order: result ``n``
belongs to ``dataset[n]``, whatever the loader's sampler did. For a ``torch.utils.data.DataLoader`` over a
map-style dataset the indices its sampler (or batch sampler) yields are recorded as the pass runs: the pass
runs on a copy of the loader (same dataset, collate function, workers, generator) whose index sampler wraps the
original one, so the original sampler draws exactly what one epoch of the original loader would. A list or
any other iterable of batches has no sampler: its order is its own. Functions that walk a loader several times
(the Hessian estimators) replay the first pass's batches on the later passes (:class:`ReplayLoader`), so a
shuffling loader still gives every pass the same batches.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch

_FIX = (
    "pass a DataLoader whose sampler visits every example of its dataset exactly once (shuffle=True or False, "
    "no replacement, drop_last=False); for a subset, wrap it: DataLoader(torch.utils.data.Subset(dataset, "
    "indices), ...) (results then follow the subset's order)"
)


def _data_loader_type() -> type | None:
    try:
        from torch.utils.data import DataLoader
    except ImportError:  # pragma: no cover - torch always has it
        return None
    return DataLoader


def _is_data_loader(loader: Any) -> bool:
    cls = _data_loader_type()
    return cls is not None and isinstance(loader, cls)


def _is_iterable_dataset(loader: Any) -> bool:
    from torch.utils.data import IterableDataset

    return isinstance(getattr(loader, "dataset", None), IterableDataset)


class _Recording:
    """An index sampler that passes through what ``inner`` yields and keeps it, in order."""

    def __init__(self, inner: Iterable[Any]) -> None:
        self.inner = inner
        self.seen: list[Any] = []

    def __iter__(self) -> Iterator[Any]:
        for idx in self.inner:
            self.seen.append(idx)
            yield idx

    def __len__(self) -> int:
        return len(self.inner)  # type: ignore[arg-type]


def _copy(loader: Any, index_sampler: Iterable[Any]) -> Any:
    """A DataLoader like ``loader`` (dataset, collation, workers, pinning, generator) drawing its indices from
    ``index_sampler`` (a batch sampler under automatic batching, else a sampler)."""
    from torch.utils.data import DataLoader

    kwargs = dict(
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context,
        generator=loader.generator,
        prefetch_factor=loader.prefetch_factor if loader.num_workers > 0 else None,
        persistent_workers=loader.persistent_workers,
        pin_memory_device=loader.pin_memory_device,
    )
    if hasattr(loader, "in_order"):
        kwargs["in_order"] = loader.in_order
    if loader.batch_sampler is not None:
        return DataLoader(loader.dataset, batch_sampler=index_sampler, **kwargs)
    return DataLoader(loader.dataset, batch_size=None, sampler=index_sampler, **kwargs)


def _sampler_name(loader: Any) -> str:
    sampler = loader.batch_sampler if loader.batch_sampler is not None else loader.sampler
    inner = getattr(sampler, "sampler", None)
    name = type(sampler).__name__
    return f"{name}({type(inner).__name__})" if inner is not None and name == "BatchSampler" else name


def _recordable(loader: Any) -> bool:
    from torch.utils.data import DataLoader

    in_order = getattr(loader, "in_order", True) is not False or loader.num_workers <= 1
    return type(loader).__iter__ is DataLoader.__iter__ and in_order


def _check_recordable(loader: Any, what: str) -> None:
    from torch.utils.data import DataLoader

    if type(loader).__iter__ is not DataLoader.__iter__:
        raise TypeError(
            f"regops: cannot recover the order of {what} (a {type(loader).__name__} with its own __iter__): pass "
            "a torch.utils.data.DataLoader, or a list of (inputs, targets) batches in dataset order"
        )
    if getattr(loader, "in_order", True) is False and loader.num_workers > 1:
        raise ValueError(
            f"regops: {what} has in_order=False with {loader.num_workers} workers: its batches arrive in an order "
            "that cannot be matched to the sampler's indices; pass in_order=True (the default)"
        )


def _as_indices(idx: Any, what: str, loader: Any) -> torch.Tensor:
    t = idx if isinstance(idx, torch.Tensor) else torch.as_tensor(idx if isinstance(idx, (list, tuple)) else [idx])
    if t.dtype.is_floating_point or t.dtype == torch.bool or t.dtype.is_complex:
        raise TypeError(
            f"regops: the sampler of {what} ({_sampler_name(loader)}) yields {t.dtype} keys, not integer indices: "
            "there is no dataset order to return results in; " + _FIX
        )
    return t.reshape(-1).long().cpu()


class IndexedLoader:
    """One pass over ``loader`` yielding ``(batch, indices)``: ``indices`` the ``[b]`` int64 dataset indices of
    the batch's examples (``None`` for a loader without a sampler: a list, a generator, an IterableDataset)."""

    def __init__(self, loader: Iterable[Any], what: str = "the loader") -> None:
        self.loader, self.what = loader, what
        self.indexed = _is_data_loader(loader) and not _is_iterable_dataset(loader)
        if self.indexed:
            _check_recordable(loader, what)
        elif _is_data_loader(loader) and loader.num_workers > 1:
            raise ValueError(
                f"regops: {what} reads an IterableDataset with {loader.num_workers} workers, which interleave their "
                "streams: the examples have no dataset order to return results in; use num_workers <= 1 (results "
                "then follow the dataset's own iteration order)"
            )

    @property
    def size(self) -> int | None:
        """The number of examples of the loader's dataset (``None``: unknown or no sampler)."""
        if not self.indexed:
            return None
        try:
            return len(self.loader.dataset)  # type: ignore[attr-defined]
        except TypeError:
            return None

    def __iter__(self) -> Iterator[tuple[Any, torch.Tensor | None]]:
        if not self.indexed:
            for batch in self.loader:
                yield batch, None
            return
        loader = self.loader
        rec = _Recording(loader.batch_sampler if loader.batch_sampler is not None else loader.sampler)
        for k, batch in enumerate(_copy(loader, rec)):
            yield batch, _as_indices(rec.seen[k], self.what, loader)

    def order(self, indices: list[torch.Tensor | None]) -> torch.Tensor | None:
        """The dataset index of every example of one pass, in pass order (``None`` when the order is the
        loader's own); raises unless the pass visited every example of the dataset exactly once."""
        if not self.indexed or not indices:
            return None
        idx = torch.cat([i for i in indices if i is not None])
        size = self.size if self.size is not None else idx.numel()
        sampler = _sampler_name(self.loader)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= size):
            raise ValueError(
                f"regops: the sampler of {self.what} ({sampler}) yields index {int(idx.max())}, outside its dataset "
                f"of {size} examples"
            )
        counts = torch.bincount(idx, minlength=size)
        repeated = (counts > 1).nonzero()
        if repeated.numel():
            i = int(repeated[0])
            raise ValueError(
                f"regops: the sampler of {self.what} ({sampler}) yields example {i} {int(counts[i])} times (sampling "
                "with replacement, or a DistributedSampler padding its shard): results in dataset order need every "
                "example exactly once; " + _FIX
            )
        if idx.numel() != size:
            raise ValueError(
                f"regops: the sampler of {self.what} ({sampler}) visits {idx.numel()} of the {size} examples of its "
                "dataset (a subset sampler, drop_last=True, or a DistributedSampler shard): results in dataset "
                "order need every example exactly once; " + _FIX
            )
        return idx


def in_dataset_order(values: torch.Tensor, order: torch.Tensor | None, dim: int = 0) -> torch.Tensor:
    """``values`` (one entry per example along ``dim``, in pass order) rearranged so entry ``n`` is ``dataset[n]``'s."""
    if order is None:
        return values
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel())
    return values.index_select(dim, inverse.to(values.device))


class ReplayLoader:
    """Re-iterable view of ``loader`` whose every pass yields the batches of its first pass.

    A shuffling DataLoader (or any sampler) draws its order once; later passes fetch the same index batches
    again, so an estimate that walks the data several times sees one fixed sequence of batches. Loaders
    without a sampler (lists, IterableDatasets) and DataLoaders whose order cannot be recorded (a subclass with
    its own ``__iter__``, ``in_order=False`` with workers) are iterated as they are.
    """

    def __init__(self, loader: Iterable[Any]) -> None:
        self.loader = loader
        self.replay = _is_data_loader(loader) and not _is_iterable_dataset(loader) and _recordable(loader)
        self.batches: list[list[Any]] | None = None

    def __iter__(self) -> Iterator[Any]:
        if not self.replay:
            yield from self.loader
            return
        if self.batches is None:
            index_sampler = self.loader.batch_sampler if self.loader.batch_sampler is not None else self.loader.sampler
            rec = _Recording(index_sampler)
            yield from _copy(self.loader, rec)
            self.batches = rec.seen
            return
        yield from _copy(self.loader, list(self.batches))
