"""``tracin``: TracIn influence over checkpoints, dense or as streamed top-k proponents / opponents."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from regops._loader import IndexedLoader, in_dataset_order
from regops.per_example._recorder import check_reduction
from regops.valuation._capture import Captured, capture
from regops.valuation._dots import summed_dots

Checkpoint = Mapping[str, torch.Tensor] | Callable[[nn.Module], Any]


@dataclass
class TracInTopK:
    """Per test example (in the test set's dataset order), the ``k`` training examples of largest (proponents) and
    smallest (opponents) influence: ``[M, k]`` values (descending / ascending) and their training-set indices
    (dataset indices for a DataLoader, positions for a list of batches). Returned by `tracin` with ``top_k``.

    Args:
        proponents: ``[M, k]`` the largest influences, descending.
        proponent_indices: ``[M, k]`` their training indices.
        opponents: ``[M, k]`` the smallest influences, ascending.
        opponent_indices: ``[M, k]`` their training indices.

    Example::

        >>> top = regops.TracInTopK(torch.ones(2, 1), torch.zeros(2, 1, dtype=torch.long), -torch.ones(2, 1),
        ...                         torch.ones(2, 1, dtype=torch.long))
        >>> top.proponent_indices.shape
        torch.Size([2, 1])
    """

    proponents: torch.Tensor
    proponent_indices: torch.Tensor
    opponents: torch.Tensor
    opponent_indices: torch.Tensor


def _load(model: nn.Module, ckpt: Checkpoint) -> None:
    if callable(ckpt):
        ckpt(model)
    elif isinstance(ckpt, Mapping):
        model.load_state_dict(ckpt)
    else:
        raise TypeError(f"regops: a checkpoint is a state_dict or a callable ckpt(model), got {type(ckpt).__name__}")


def _block(cap: Captured, tests: list[Captured]) -> torch.Tensor:
    """``[b, M]`` total inner products of one training batch with every test batch."""
    return torch.cat([summed_dots(cap, t) for t in tests], 1)


def _merge(vals, idx, block, rows, k, largest):
    """Running top-k over the training axis: ``vals`` / ``idx`` ``[M, k']``, ``block`` ``[b, M]`` whose rows are
    the training examples ``rows`` ``[b]``."""
    cand = torch.cat([vals, block.T], 1)
    cidx = torch.cat([idx, rows.to(block.device).expand(block.shape[1], -1)], 1)
    top, pos = cand.topk(min(k, cand.shape[1]), dim=1, largest=largest)
    return top, cidx.gather(1, pos)


def _capture_tests(model, loss_fn, test: IndexedLoader, kw) -> tuple[list[Captured], torch.Tensor | None]:
    """The test batches of one pass, and the dataset index of each test column (``None``: pass order)."""
    caps, idx = [], []
    for batch, i in test:
        caps.append(capture(model, loss_fn, batch, **kw))
        idx.append(i)
    return caps, test.order(idx)


def _rows_of(index: torch.Tensor | None, offset: int, b: int) -> torch.Tensor:
    return index if index is not None else torch.arange(offset, offset + b)


def tracin(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    train: Iterable[tuple[Any, Any]],
    test: Iterable[tuple[Any, Any]],
    checkpoints: Sequence[Checkpoint],
    lrs: float | Sequence[float],
    *,
    top_k: int | None = None,
    loss_reduction: str | None = None,
    progress: bool = True,
    forms: str | Mapping[str, str] | None = None,
    unsupported: str = "error",
) -> torch.Tensor | TracInTopK:
    r"""TracIn influence (Pruthi et al.), exact, from `per_sample_grad_dots`' per-layer forms:

    .. math:: I(z_i, z'_j) = \sum_c \eta_c \langle \nabla\ell(z_i;\theta_c), \nabla \ell(z'_j;\theta_c)\rangle

    The test batches' layer signals are captured once per checkpoint and reused for every training batch; the
    training batches are streamed. Dense mode (``top_k=None``) loops checkpoints outside and returns the
    ``[N, M]`` matrix. Top-k mode loops training batches outside (test signals of every checkpoint kept,
    each checkpoint reloaded per training batch) and keeps only the running ``k`` best and worst per test
    example: memory ``O(M k + b M)``, never ``N x M``. The model's state is restored at the end.

    Args:
        model, loss_fn, loss_reduction, forms, unsupported: as for `per_sample_grad_dots`.
        train, test: re-iterable loaders of ``(inputs, targets)`` batches (a list ``[(x, y)]`` for one batch).
            Results are in dataset order whatever the samplers do: a DataLoader's sampler indices are recorded
            on every pass (a shuffling loader draws a new order per checkpoint; each pass is put back in
            dataset order), so row ``i`` is ``train.dataset[i]`` and column ``j`` is ``test.dataset[j]``. A
            sampler that skips or repeats examples raises (use ``torch.utils.data.Subset`` for a subset); a list
            of batches is in its own order.
        checkpoints: state_dicts, or callables ``ckpt(model)`` that load a checkpoint into ``model``.
        lrs: the learning rate of each checkpoint (a float for all).
        top_k: ``None`` for the dense matrix, else the number of proponents / opponents per test example.
        progress: a tqdm progress bar over (checkpoint, training batch) steps.

    Returns:
        ``[N, M]`` float32 (float64 for a float64 model) in dataset order, or `TracInTopK`.

    Example::

        >>> F = torch.nn.functional
        >>> model = torch.nn.Sequential(torch.nn.Linear(20, 32), torch.nn.ReLU(), torch.nn.Linear(32, 5))
        >>> train_loader = [(torch.randn(16, 20), torch.randint(0, 5, (16,))) for _ in range(2)]
        >>> test_loader = [(torch.randn(4, 20), torch.randint(0, 5, (4,)))]
        >>> ckpts = [{k: v + 0.01 * e for k, v in model.state_dict().items()} for e in range(3)]  # torch.load(...)
        >>> infl = regops.tracin(model, F.cross_entropy, train_loader, test_loader, ckpts, lrs=[0.1, 0.05, 0.01],
        ...                      loss_reduction="mean")
        >>> infl.shape  # [N_train, M_test]
        torch.Size([32, 4])
        >>> top = regops.tracin(model, F.cross_entropy, train_loader, test_loader, ckpts, 0.1, top_k=10,
        ...                     loss_reduction="mean")
        >>> top.proponent_indices[0].shape  # the 10 most helpful training examples of test example 0
        torch.Size([10])
    """
    from tqdm.auto import tqdm

    check_reduction(loss_reduction)
    checkpoints = list(checkpoints)
    if not checkpoints:
        raise ValueError("regops: tracin needs at least one checkpoint")
    etas = [float(lrs)] * len(checkpoints) if isinstance(lrs, (int, float)) else [float(x) for x in lrs]
    if len(etas) != len(checkpoints):
        raise ValueError(f"regops: {len(etas)} learning rates for {len(checkpoints)} checkpoints")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"regops: top_k must be a positive int or None, got {top_k!r}")
    kw = dict(loss_reduction=loss_reduction, forms=forms, unsupported=unsupported)
    n_train = len(train) if hasattr(train, "__len__") else None
    total = None if n_train is None else n_train * len(checkpoints)
    train_pass, test_pass = IndexedLoader(train, "the training loader"), IndexedLoader(test, "the test loader")
    bar = tqdm(total=total, disable=not progress, desc="tracin", unit="batch")
    original = {k: v.detach().clone() for k, v in model.state_dict().items()}
    try:
        if top_k is None:
            out = None
            for ckpt, eta in zip(checkpoints, etas, strict=True):
                _load(model, ckpt)
                tests, cols = _capture_tests(model, loss_fn, test_pass, kw)
                rows, index = [], []
                for batch, i in train_pass:
                    rows.append(_block(capture(model, loss_fn, batch, **kw), tests) * eta)
                    index.append(i)
                    bar.update(1)
                del tests
                if not rows:
                    raise ValueError("regops: the training loader yielded no batches")
                dense = in_dataset_order(in_dataset_order(torch.cat(rows, 0), train_pass.order(index)), cols, dim=1)
                if out is not None and out.shape != dense.shape:
                    raise ValueError("regops: the training loader changed between checkpoints")
                out = dense if out is None else out + dense
            return out
        tests_by_ckpt = []
        for ckpt in checkpoints:
            _load(model, ckpt)
            tests_by_ckpt.append(_capture_tests(model, loss_fn, test_pass, kw))
        best = worst = best_i = worst_i = None
        offset = 0
        index = []
        for batch, i in train_pass:
            block = None
            for ckpt, eta, (tests, cols) in zip(checkpoints, etas, tests_by_ckpt, strict=True):
                _load(model, ckpt)
                part = in_dataset_order(_block(capture(model, loss_fn, batch, **kw), tests) * eta, cols, dim=1)
                block = part if block is None else block + part
                bar.update(1)
            if best is None:
                m = block.shape[1]
                best = block.new_empty(m, 0)
                worst = block.new_empty(m, 0)
                best_i = torch.empty(m, 0, dtype=torch.long, device=block.device)
                worst_i = best_i
            rows = _rows_of(i, offset, block.shape[0])
            best, best_i = _merge(best, best_i, block, rows, top_k, True)
            worst, worst_i = _merge(worst, worst_i, block, rows, top_k, False)
            offset += block.shape[0]
            index.append(i)
        if best is None:
            raise ValueError("regops: the training loader yielded no batches")
        train_pass.order(index)  # a sampler that skipped or repeated examples: an error, not a partial ranking
        return TracInTopK(best, best_i, worst, worst_i)
    finally:
        bar.close()
        model.load_state_dict(original)
