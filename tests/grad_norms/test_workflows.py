"""DP training workflows: the BatchNorm fix, accumulation within and across blocks, the expected batch size, noise
once per step over micro-batches, empty Poisson batches, the Poisson sampler and the accounting through Opacus."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

import regops
from regops import grad_norms as gn
from regops.testing import dp_noise
from tests.per_example.test_uses import bn_net


def oracle_grads(model, args, y, kwargs=None):
    """Per-example gradients of the summed cross-entropy by torch.func (args batched in dim 0)."""
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    kwargs = kwargs or {}

    def loss_n(p, *a):
        *xs, yn = a
        out = functional_call(model, p, tuple(x.unsqueeze(0) for x in xs), kwargs)
        return F.cross_entropy(out, yn.unsqueeze(0), reduction="sum")

    return vmap(grad(loss_n), in_dims=(None, *[0] * (len(args) + 1)))(params, *args, y)


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def clipped_sum(grads, bound):
    sq = sum(g.flatten(1).square().sum(1) for g in grads.values())
    f = (bound / (sq.sqrt() + 1e-6)).clamp(max=1.0)
    return {k: torch.einsum("b,b...->...", f, g) for k, g in grads.items()}


def test_fix_model_swaps_batchnorm_and_reports():
    model = bn_net()
    fixed, changes = regops.fix_model(model)
    assert [str(c) for c in changes] == ["1: BatchNorm2d(4) -> GroupNorm(4, 4)"]
    assert isinstance(model[1], nn.BatchNorm2d) and isinstance(fixed[1], nn.GroupNorm)  # a copy by default
    assert regops.fix_model(nn.Linear(2, 2))[1] == []
    root, changes = regops.fix_model(nn.BatchNorm1d(48), max_groups=32)
    assert isinstance(root, nn.GroupNorm) and root.num_groups == 16 and len(changes) == 1
    same, _ = regops.fix_model(model, inplace=True)
    assert same is model and isinstance(model[1], nn.GroupNorm)
    with pytest.raises(ValueError, match="max_groups"):
        regops.fix_model(model, max_groups=0)


def test_dp_gradients_accumulate_across_blocks_and_use_expected_batch_size():
    model = mlp()
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(n, 6, generator=gen, dtype=torch.float64) for n in (4, 3)]
    ys = [torch.randint(0, 3, (n,), generator=gen) for n in (4, 3)]
    expected = [clipped_sum(oracle_grads(model, (x,), y), 0.5) for x, y in zip(xs, ys, strict=True)]
    model.zero_grad(set_to_none=True)
    for x, y in zip(xs, ys, strict=True):  # two DP steps' worth of blocks, one optimizer step
        with regops.dp_clipping(model, 0.5, loss_reduction="mean", expected_batch_size=10):
            F.cross_entropy(model(x), y).backward()
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.grad, (expected[0][k] + expected[1][k]) / 10)
    # sum reduction, existing gradient kept, as torch accumulates
    model.zero_grad(set_to_none=True)
    before = {k: torch.ones_like(p) for k, p in model.named_parameters()}
    for k, p in model.named_parameters():
        p.grad = before[k].clone()
    with regops.dp_clipping(model, 0.5, loss_reduction="sum"):
        F.cross_entropy(model(xs[0]), ys[0], reduction="sum").backward()
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.grad, before[k] + expected[0][k])


def test_noise_once_over_micro_batches_and_empty_poisson_batch():
    model = mlp()
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 6, generator=gen, dtype=torch.float64), torch.randint(0, 3, (6,), generator=gen)
    expected = clipped_sum(oracle_grads(model, (x,), y), 0.5)
    model.zero_grad(set_to_none=True)
    with regops.dp_clipping(
        model,
        0.5,
        loss_reduction="mean",
        noise_multiplier=1.3,
        expected_batch_size=8,
        generator=torch.Generator().manual_seed(3),
    ) as clip:
        for i in (0, 3):
            F.cross_entropy(model(x[i : i + 3]), y[i : i + 3]).backward()
    assert clip.total.shape == (6,)
    params = dict(model.named_parameters())
    noises = dp_noise([p.shape for p in params.values()], torch.Generator().manual_seed(3))
    for (k, p), z in zip(params.items(), noises, strict=True):
        z = z.double()
        torch.testing.assert_close(p.grad, (expected[k] + 1.3 * 0.5 * z) / 8, rtol=1e-6, atol=1e-7)
    # an empty batch (Poisson sampling) still takes its step: noise only
    model.zero_grad(set_to_none=True)
    noise = dict(noise_multiplier=1.0, expected_batch_size=8)
    with regops.dp_clipping(model, 0.5, loss_reduction="mean", generator=torch.Generator().manual_seed(4), **noise):
        pass
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    # the empty batch's forward and backward inside the block (every FSDP2 rank runs them): the same step
    noise_only = {k: p.grad for k, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    gen = torch.Generator().manual_seed(4)
    with regops.dp_clipping(model, 0.5, loss_reduction="mean", generator=gen, **noise) as step:
        F.cross_entropy(model(x[:0]), y[:0], reduction="sum").backward()
    assert step.clip_factors.numel() == 0
    for k, p in model.named_parameters():
        assert p.requires_grad
        torch.testing.assert_close(p.grad, noise_only[k], rtol=0, atol=0)
    with pytest.raises(ValueError, match="the batch is empty"):
        with regops.per_sample_grad_norms(model, "mean"):
            model(x[:0])
    with pytest.raises(ValueError, match="expected_batch_size"):
        with regops.dp_clipping(model, 0.5, loss_reduction="mean"):
            pass
    with pytest.raises(ValueError, match="expected_batch_size"):
        regops.dp_clipping(model, 0.5, loss_reduction="mean", expected_batch_size=0)


def test_poisson_batch_sampler():
    s = regops.PoissonBatchSampler(200, 0.05, steps=50, generator=torch.Generator().manual_seed(0))
    batches = list(s)
    again = list(regops.PoissonBatchSampler(200, 0.05, steps=50, generator=torch.Generator().manual_seed(0)))
    assert batches == again and len(batches) == len(s) == 50 and s.expected_batch_size == 10
    sizes = torch.tensor([len(b) for b in batches], dtype=torch.float64)
    assert len(set(sizes.tolist())) > 1  # sizes vary: Poisson, not fixed
    assert all(0 <= i < 200 for b in batches for i in b) and all(b == sorted(set(b)) for b in batches)
    assert abs(sizes.mean().item() - 10) < 5 * (200 * 0.05 * 0.95 / 50) ** 0.5  # 5 sigma
    assert len(regops.PoissonBatchSampler(10, 0.25)) == 4
    with pytest.raises(ValueError, match="sample_rate"):
        regops.PoissonBatchSampler(10, 0.0)


def test_accounting_through_opacus():
    from opacus.accountants import RDPAccountant

    ref = RDPAccountant()
    for _ in range(200):
        ref.step(noise_multiplier=1.1, sample_rate=0.01)
    eps = gn.epsilon(noise_multiplier=1.1, sample_rate=0.01, steps=200, delta=1e-5)
    assert eps == pytest.approx(ref.get_epsilon(1e-5), rel=1e-12)
    acc = regops.PrivacyAccountant("rdp")
    acc.step(1.1, 0.01, steps=200)
    assert acc.steps == 200 and acc.epsilon(1e-5) == pytest.approx(eps, rel=1e-12)
    sigma = gn.noise_multiplier_for(eps, sample_rate=0.01, steps=200, delta=1e-5)
    assert gn.epsilon(sigma, 0.01, 200, 1e-5) <= eps * 1.01 and sigma == pytest.approx(1.1, rel=0.05)
    assert gn.epsilon(1.0, 0.01, 0, 1e-5) == 0.0
    with pytest.raises(ValueError, match="delta"):
        gn.epsilon(1.0, 0.01, 10, 0.0)
    with pytest.raises(ValueError, match="accountant"):
        gn.epsilon(1.0, 0.01, 10, 1e-5, accountant="moments")


def test_accounting_without_opacus_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "opacus.accountants", None)
    with pytest.raises(ImportError, match="pip install opacus"):
        gn.epsilon(1.0, 0.01, 10, 1e-5)


def _recorders_left(make_step, steps: int = 3) -> int:
    """How many of ``steps`` blocks' recorders outlive their step (each step's recorder kept only weakly here)."""
    import gc
    import weakref

    from regops.per_example import _recorder

    refs = []
    init = _recorder._Recorder.__init__

    def counting(self, *args, **kwargs):
        init(self, *args, **kwargs)
        refs.append(weakref.ref(self))

    _recorder._Recorder.__init__ = counting
    try:
        for _ in range(steps):
            make_step()
    finally:
        _recorder._Recorder.__init__ = init
    gc.collect()
    assert len(refs) >= steps, "the steps made no recorder: the check would pass vacuously"
    return sum(r() is not None for r in refs)


def test_no_step_keeps_its_recorder_or_activations_alive():
    """A finished block frees its recorder (and with it the activations it kept): hooks on layer outputs hold it
    weakly. Layers read by rules, ops read one by one (attention), dp_clipping, norms and valuation dots."""
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 12, dropout=0.0, batch_first=True), 1)
    x, y, seq = torch.randn(5, 6), torch.randint(0, 3, (5,)), torch.randn(3, 4, 8)

    def dp_step():
        with regops.dp_clipping(mlp, 1.0, loss_reduction="mean", noise_multiplier=1.0):
            F.cross_entropy(mlp(x), y).backward()

    def attention_step():
        with regops.dp_clipping(enc, 1.0, loss_reduction="mean"):
            enc(seq).square().mean().backward()

    def norms_step():
        with regops.per_sample_grad_norms(mlp, "mean") as norms:
            F.cross_entropy(mlp(x), y).backward()
        assert norms.total.shape == (5,)

    def dots_step():
        regops.per_sample_grad_dots(mlp, F.cross_entropy, (x, y), (x[:2], y[:2]), loss_reduction="mean")

    for step in (dp_step, attention_step, norms_step, dots_step):
        assert _recorders_left(step) == 0, step.__name__
