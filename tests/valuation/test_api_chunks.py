"""per_sample_grad_dots in chunks: the streamed result equals the whole batches' within the rounding of the sums,
the chunks are used and released, and the chosen chunk keeps the peak within a plain step's."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import regops
from regops.valuation import _dots
from tests.valuation.test_api import _OutputShapes, mean_ce, model_and_data, rel_close, sum_ce


def _spy(monkeypatch) -> list[int]:
    """The batch size of every capture per_sample_grad_dots makes."""
    sizes: list[int] = []
    capture = _dots.capture

    def spy(model, loss_fn, batch, **kw):
        sizes.append(batch[1].shape[0])
        return capture(model, loss_fn, batch, **kw)

    monkeypatch.setattr(_dots, "capture", spy)
    return sizes


def _rounding(model, loss, train, test, reduction: str) -> torch.Tensor:
    """Twice the rounding bound of a dot product of per-example gradients, eps sqrt(P) |g_i| |g'_j| (the bound the
    zoo test holds float64 dots to against the per-example loop, tests/valuation/test_api.py): chunks change only
    the order of the sums (rows of the layers' GEMMs, pairs of the dots), so both results lie within it of the
    exact products."""
    n1 = regops.per_sample_grad_dots(model, loss, train, train, loss_reduction=reduction).diagonal().sqrt()
    n2 = regops.per_sample_grad_dots(model, loss, test, test, loss_reduction=reduction).diagonal().sqrt()
    p = sum(t.numel() for t in model.parameters() if t.requires_grad)
    return 2 * torch.finfo(n1.dtype).eps * p**0.5 * n1[:, None] * n2[None, :]


def _assert_within(got, expected, bound):
    err = (got - expected).abs()
    assert (err <= bound).all(), (err / bound).max()


@pytest.mark.parametrize("kind", ["mlp", "transformer", "cnn"])
@pytest.mark.parametrize("blocks", [None, "param", "module"])
def test_streamed_dots_equal_whole_batches(kind, blocks, monkeypatch):
    model, x, y = model_and_data(kind, 5, 1)
    _, x2, y2 = model_and_data(kind, 3, 2)
    train, test = (x, y), (x2, y2)
    whole = regops.per_sample_grad_dots(model, mean_ce, train, test, loss_reduction="mean", blocks=blocks, chunk=5)
    sizes = _spy(monkeypatch)
    got = regops.per_sample_grad_dots(model, mean_ce, train, test, loss_reduction="mean", blocks=blocks, chunk=2)
    # the probe (the loss on its halves), then each test chunk (1, 2), the training chunks (1, 2, 2) against it
    assert sizes == [2, 1, 1, 2, 2, 2, 1, 2, 2], sizes
    monkeypatch.undo()
    bound = _rounding(model, mean_ce, train, test, "mean")
    if blocks is None:
        assert got.shape == (5, 3) and got.dtype == torch.float64
        _assert_within(got, whole, bound)
    else:
        assert list(got) == list(whole)
        for name in whole:
            _assert_within(got[name], whole[name], bound)
    assert all(p.grad is None for p in model.parameters())


def test_streamed_same_batch_reuses_the_diagonal_chunks(monkeypatch):
    """``test is train``: each diagonal pair of chunks is one capture used on both sides, so the diagonal stays
    the squared per-example norm; the rest equals the whole batch's."""
    model, x, y = model_and_data("transformer", 4, 3)
    batch = (x, y)
    whole = regops.per_sample_grad_dots(model, sum_ce, batch, batch, loss_reduction="sum", chunk=4)
    sizes = _spy(monkeypatch)
    got = regops.per_sample_grad_dots(model, sum_ce, batch, batch, loss_reduction="sum", chunk=2)
    assert sizes == [2, 2, 2, 2, 2], sizes  # the probe; chunk 0, then 1 against it; chunk 1, then 0 against it
    monkeypatch.undo()
    _assert_within(got, whole, _rounding(model, sum_ce, batch, batch, "sum"))
    with regops.per_sample_grad_norms(model, "sum") as norms:
        sum_ce(model(x), y).backward()
    rel_close(got.diagonal(), norms.total**2, 1e-10)


def test_streamed_chunks_compute_no_parameter_gradient():
    """The streamed captures stop at the layers' outputs too (chunk sizes 1 and 2 differ from every weight dim)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(7, 11), nn.ReLU(), nn.Linear(11, 13), nn.ReLU(), nn.Linear(13, 3)).double()
    x, y = torch.randn(5, 7, dtype=torch.float64), torch.randint(0, 3, (5,))
    x2, y2 = torch.randn(4, 7, dtype=torch.float64), torch.randint(0, 3, (4,))
    weights = {tuple(p.shape) for p in model.parameters() if p.dim() == 2}
    with _OutputShapes() as plain:
        mean_ce(model(x), y).backward()
    assert weights <= plain.shapes
    model.zero_grad(set_to_none=True)
    with _OutputShapes() as seen:
        regops.per_sample_grad_dots(model, mean_ce, (x, y), (x2, y2), loss_reduction="mean", chunk=2)
    assert not weights & seen.shapes, weights & seen.shapes
    assert all(p.grad is None for p in model.parameters())


class _Tokens(nn.Module):
    """Activations of 256 tokens per example against a few thousand parameters: a batch's signals outweigh its
    parameters' gradients, as in a transformer, and the whole batches' dots take more than the forms' scratch."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.fc1, self.fc2 = nn.Embedding(50, 32), nn.Linear(32, 128), nn.Linear(128, 32)
        self.head = nn.Linear(32, 3)

    def forward(self, ids):
        h = self.emb(ids)
        return self.head((h + self.fc2(F.gelu(self.fc1(h)))).mean(1))


def test_default_chunk_keeps_the_peak_within_a_plain_step(monkeypatch):
    """The bar: peak memory within 1.2x that of a plain forward and backward of the training batch (the whole
    batches take several times that here, so the check sees a chunk chosen too large); the result equals the
    whole batches' within the float32 rounding bound."""
    from benchmarks.harness import peak_memory

    torch.manual_seed(0)
    model = _Tokens()
    gen = torch.Generator().manual_seed(0)
    train = (torch.randint(0, 50, (32, 256), generator=gen), torch.randint(0, 3, (32,), generator=gen))
    test = (torch.randint(0, 50, (24, 256), generator=gen), torch.randint(0, 3, (24,), generator=gen))
    cpu = torch.device("cpu")

    def plain():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(train[0]), train[1]).backward()

    def dots(chunk=None):
        return regops.per_sample_grad_dots(model, F.cross_entropy, train, test, loss_reduction="mean", chunk=chunk)

    peak_memory(plain, cpu)  # the profiler's first session misses blocks allocated before it
    model.zero_grad(set_to_none=True)  # else the measured step frees the gradients before it makes them again
    bar = 1.2 * peak_memory(plain, cpu)
    model.zero_grad(set_to_none=True)
    whole_peak = peak_memory(lambda: dots(32), cpu)
    peak = peak_memory(dots, cpu)
    assert whole_peak > bar and peak <= bar, (whole_peak / bar, peak / bar)
    sizes = _spy(monkeypatch)
    got = dots()
    monkeypatch.undo()
    assert len(sizes) > 4 and max(sizes[2:]) < 24, sizes  # two probes, then chunks smaller than either batch
    _assert_within(got, dots(32), _rounding(model, F.cross_entropy, train, test, "mean"))


def test_chunks_only_where_examples_are_independent():
    model, x, y = model_and_data("mlp", 4, 0)

    def scaled(out, t):  # neither the sum nor the mean of per-example losses: an example's loss depends on B
        return F.cross_entropy(out, t, reduction="sum") / out.shape[0] ** 0.5

    whole = regops.per_sample_grad_dots(model, scaled, (x, y), (x, y), loss_reduction="sum", chunk=4)
    got = regops.per_sample_grad_dots(model, scaled, (x, y), (x, y), loss_reduction="sum")
    assert torch.equal(got, whole)  # taken whole, the same computation
    with pytest.raises(ValueError, match="declared reduction"):
        regops.per_sample_grad_dots(model, scaled, (x, y), (x, y), loss_reduction="sum", chunk=2)
    for bad in (0, True, 2.0):
        with pytest.raises(ValueError, match="chunk must be a positive int"):
            regops.per_sample_grad_dots(model, mean_ce, (x, y), (x, y), loss_reduction="mean", chunk=bad)


def test_chunks_need_the_examples_along_dim_0():
    """An input tensor without the examples along dim 0 (a shared offset here) cannot be cut into chunks: taken
    whole by default, an error with chunk=."""

    class Shifted(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(7, 3)

        def forward(self, x, offset):
            return self.fc(x + offset)

    torch.manual_seed(0)
    model = Shifted().double()
    x, offset, y = torch.randn(5, 7, dtype=torch.float64), torch.randn(7, dtype=torch.float64), torch.arange(5) % 3
    batch = ((x, offset), y)
    got = regops.per_sample_grad_dots(model, mean_ce, batch, batch, loss_reduction="mean")
    shifted = (x + offset, y)  # the same Linear on the shifted inputs, in chunks
    expected = regops.per_sample_grad_dots(model.fc, mean_ce, shifted, shifted, loss_reduction="mean", chunk=2)
    assert got.shape == (5, 5)
    with pytest.raises(ValueError, match="examples along dim 0"):
        regops.per_sample_grad_dots(model, mean_ce, batch, batch, loss_reduction="mean", chunk=2)
    _assert_within(got, expected, _rounding(model.fc, mean_ce, shifted, shifted, "mean"))
