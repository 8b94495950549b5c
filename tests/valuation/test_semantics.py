"""Data valuation called the way a new user does with the README open gives the exact answer or a clear error, never
a plausible wrong number: loss_reduction is required and checked against the loss, results come in dataset order
through shuffling loaders, samplers that skip or repeat examples are refused, and the class dim of the logits is
found from the targets."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import (
    DataLoader,
    IterableDataset,
    RandomSampler,
    Subset,
    SubsetRandomSampler,
    TensorDataset,
)
from torch.utils.data.distributed import DistributedSampler

import regops

F64 = torch.float64


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def _data(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, dtype=F64, generator=g), torch.randint(0, 3, (n,), generator=g)


def _loop_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``[B, P]`` per-example gradients of the per-example cross-entropy, one backward each."""
    params = list(model.parameters())
    rows = []
    for i in range(x.shape[0]):
        gs = torch.autograd.grad(F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]), params)
        rows.append(torch.cat([g.flatten() for g in gs]))
    return torch.stack(rows)


def test_valuation_needs_loss_reduction_and_mean_losses_give_the_per_example_answer():
    """F.cross_entropy is a mean: with batches of 3 and 4, TracIn was 12x / 16x off, GraNd 3x / 4x, the Fisher
    9x / 16x, silently. Now loss_reduction is required (as per_sample_grad_norms), a contradicting value raises,
    and 'mean' gives the per-example loop's numbers."""
    model = _mlp()
    x, y = _data(7, 1)
    train = [(x[:3], y[:3]), (x[3:], y[3:])]
    test = [(x[:4], y[:4])]
    g = _loop_grads(model, x, y)
    ckpt = {k: v.clone() for k, v in model.state_dict().items()}
    calls = {
        "tracin": lambda **k: regops.tracin(model, F.cross_entropy, train, test, [ckpt], 1.0, progress=False, **k),
        "scores": lambda **k: regops.data_scores(model, F.cross_entropy, train, ("grand",), **k),
        "fisher": lambda **k: regops.empirical_fisher_diagonal(model, F.cross_entropy, train, **k),
        "coherence": lambda **k: regops.gradient_coherence(model, F.cross_entropy, train, **k),
        "dots": lambda **k: regops.per_sample_grad_dots(model, F.cross_entropy, train[0], test[0], **k),
    }
    for call in calls.values():
        with pytest.raises(TypeError, match="loss_reduction='sum'"):
            call()
        with pytest.raises(ValueError, match="pass loss_reduction='mean'"):
            call(loss_reduction="sum")
    torch.testing.assert_close(calls["tracin"](loss_reduction="mean"), g @ g[:4].T, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(calls["dots"](loss_reduction="mean"), g[:3] @ g[:4].T, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(calls["scores"](loss_reduction="mean")["grand"], g.norm(dim=1), rtol=1e-12, atol=0)
    fisher = calls["fisher"](loss_reduction="mean")
    torch.testing.assert_close(torch.cat([v.flatten() for v in fisher.values()]), g.square().mean(0))
    coh = calls["coherence"](loss_reduction="mean")
    torch.testing.assert_close(coh.mean_sq_norm, g.square().sum(1).mean())
    # a summed loss with 'sum' is exact too; and logit-only scores need no loss_reduction
    sum_ce = lambda o, t: F.cross_entropy(o, t, reduction="sum")  # noqa: E731
    got = regops.tracin(model, sum_ce, train, test, [ckpt], 1.0, progress=False, loss_reduction="sum")
    torch.testing.assert_close(got, g @ g[:4].T, rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="pass loss_reduction='sum'"):
        regops.data_scores(model, sum_ce, train, ("grand",), loss_reduction="mean")
    assert regops.data_scores(model, F.cross_entropy, train, ("el2n",))["el2n"].shape == (7,)


def _loader(x, y, **kw):
    return DataLoader(TensorDataset(x, y), **kw)


def test_data_scores_follow_dataset_order_through_a_shuffling_loader():
    """A shuffled DataLoader used to give the scores in loader order: pruning dropped the wrong examples."""
    model = _mlp()
    x, y = _data(11, 2)
    g = _loop_grads(model, x, y)
    with torch.no_grad():
        ce = F.cross_entropy(model(x), y, reduction="none")
    samplers = {
        "shuffle": dict(batch_size=3, shuffle=True, generator=torch.Generator().manual_seed(0)),
        "sampler": dict(batch_size=2, sampler=RandomSampler(range(11), generator=torch.Generator().manual_seed(3))),
        "batch_sampler": dict(batch_sampler=[[10, 2, 5], [0, 1], [3, 4, 6, 7, 8, 9]]),
    }
    for name, kw in samplers.items():
        s = regops.data_scores(model, F.cross_entropy, _loader(x, y, **kw), ("grand", "loss"), loss_reduction="mean")
        torch.testing.assert_close(s["grand"], g.norm(dim=1), rtol=1e-12, atol=0, msg=name)
        torch.testing.assert_close(s["loss"], ce, rtol=1e-12, atol=0, msg=name)
    # averaged over seeds: every pass (a new shuffle each) is put back in dataset order before averaging
    loader = _loader(x, y, batch_size=4, shuffle=True)
    avg = regops.data_scores(_mlp, F.cross_entropy, loader, ("grand",), seeds=[0, 1], loss_reduction="mean")
    each = (g.norm(dim=1) + _loop_grads(_mlp(1), x, y).norm(dim=1)) / 2
    torch.testing.assert_close(avg["grand"], each, rtol=1e-12, atol=0)
    # a Subset is in its own order; an IterableDataset (one worker) in its iteration order
    sub = Subset(TensorDataset(x, y), [9, 4, 7])
    s = regops.data_scores(model, F.cross_entropy, DataLoader(sub, batch_size=2, shuffle=True), ("loss",))
    torch.testing.assert_close(s["loss"], ce[[9, 4, 7]])

    class Stream(IterableDataset):
        def __iter__(self):
            return iter(zip(x, y, strict=True))

    s = regops.data_scores(model, F.cross_entropy, DataLoader(Stream(), batch_size=4), ("loss",))
    torch.testing.assert_close(s["loss"], ce)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(batch_size=3, drop_last=True), "visits 9 of the 11"),
        (dict(batch_size=3, sampler=RandomSampler(range(11), replacement=True, num_samples=11)), "times"),
        (dict(batch_size=3, sampler=SubsetRandomSampler([1, 2, 3])), "visits 3 of the 11"),
        (dict(batch_size=3, sampler=DistributedSampler(range(11), num_replicas=2, rank=0)), "DistributedSampler"),
    ],
)
def test_samplers_that_skip_or_repeat_examples_are_refused_with_the_fix(kw, match):
    model = _mlp()
    x, y = _data(11, 3)
    with pytest.raises(ValueError, match=match) as info:
        regops.data_scores(model, F.cross_entropy, _loader(x, y, **kw), ("loss",))
    assert "Subset(dataset, indices)" in str(info.value)


def test_loaders_whose_order_cannot_be_recovered_are_refused():
    model = _mlp()
    x, y = _data(6, 3)

    class Stream(IterableDataset):
        def __iter__(self):
            return iter(zip(x, y, strict=True))

    with pytest.raises(ValueError, match="num_workers <= 1"):
        regops.data_scores(model, F.cross_entropy, DataLoader(Stream(), batch_size=2, num_workers=2), ("loss",))

    class Prefetching(DataLoader):
        def __iter__(self):
            return iter(list(super().__iter__()))

    with pytest.raises(TypeError, match="its own __iter__"):
        regops.data_scores(model, F.cross_entropy, Prefetching(TensorDataset(x, y), batch_size=2), ("loss",))


def test_tracin_dense_and_top_k_in_dataset_order_with_shuffling_loaders():
    model = _mlp()
    x, y = _data(9, 4)
    xt, yt = _data(5, 5)
    ckpts = [{k: v + 0.05 * i for k, v in model.state_dict().items()} for i in range(2)]
    etas = [0.5, 0.25]
    expected = 0
    for c, eta in zip(ckpts, etas, strict=True):
        model.load_state_dict(c)
        expected = expected + eta * _loop_grads(model, x, y) @ _loop_grads(model, xt, yt).T
    train = _loader(x, y, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(1))
    test = _loader(xt, yt, batch_size=2, shuffle=True, generator=torch.Generator().manual_seed(2))
    kw = dict(progress=False, loss_reduction="mean")
    dense = regops.tracin(model, F.cross_entropy, train, test, ckpts, etas, **kw)
    torch.testing.assert_close(dense, expected, rtol=1e-10, atol=1e-12)
    top = regops.tracin(model, F.cross_entropy, train, test, ckpts, etas, top_k=3, **kw)
    vals, idx = expected.T.topk(3, dim=1)
    torch.testing.assert_close(top.proponents, vals, rtol=1e-10, atol=1e-12)
    assert torch.equal(top.proponent_indices, idx)
    with pytest.raises(ValueError, match="visits 8 of the 9"):
        regops.tracin(model, F.cross_entropy, _loader(x, y, batch_size=4, drop_last=True), test, ckpts, etas, **kw)


def test_data_scores_find_the_class_dim_from_the_targets():
    """Segmentation-style [B, C, L] logits (classes in dim 1, as F.cross_entropy) and LM-style [B, T, V]."""
    torch.manual_seed(0)
    conv = nn.Conv1d(2, 3, 1).double()  # [B, 2, L] -> [B, C=3, L]
    x = torch.randn(4, 2, 5, dtype=F64)
    y = torch.randint(0, 3, (4, 5))
    s = regops.data_scores(conv, F.cross_entropy, [(x, y)], ("loss",))
    with torch.no_grad():
        want = F.cross_entropy(conv(x), y, reduction="none").sum(1)
    torch.testing.assert_close(s["loss"], want)
    square = nn.Conv1d(2, 3, 1).double()
    with pytest.raises(ValueError, match="class_dim=1 or class_dim=-1"):
        batch = (torch.randn(4, 2, 3, dtype=F64), torch.zeros(4, 3).long())
        regops.data_scores(square, F.cross_entropy, [batch], ("loss",))
