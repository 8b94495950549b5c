"""PrivacyEngine against what it replaces: the explicit ``dp_clipping`` loop (bit for bit, noise included, through
the engine's own Poisson loader, empty batches included) and Opacus's ``PrivacyEngine`` (the same batches without
noise: the same parameters after every step, float64 to 1e-12; the same epsilon for the same history; the same
noise multiplier for a target epsilon)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import regops

N, BATCH, CLIP = 64, 8, 2.0  # per-example norms of the task: 1.4 to 3.0, some clipped, some not
RTOL = 1e-12  # float64: a few roundings per step of sums over 8 examples and 3 layers, far below this


def mlp(bias: bool = True) -> nn.Module:
    torch.manual_seed(0)
    if not bias:  # one parameter per module: Opacus's per-parameter bounds are regops' per-module bounds
        return nn.Sequential(nn.Linear(5, 7, bias=False), nn.Tanh(), nn.Linear(7, 3, bias=False)).double()
    return nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7), nn.Tanh(), nn.Linear(7, 3)).double()


def dataset(n: int = N) -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(n, 5, dtype=torch.float64, generator=g), torch.randint(0, 3, (n,), generator=g))


def sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)


def fixed_batches(ds: TensorDataset) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Poisson-like sizes, an empty batch among them."""
    g = torch.Generator().manual_seed(3)
    out = []
    for size in (8, 11, 0, 5, 9, 1):
        idx = torch.randperm(len(ds), generator=g)[:size]
        out.append(ds[idx])
    return out


def explicit_step(model, opt, x, y, *, sigma=0.0, generator=None, expected=BATCH, **clip):
    opt.zero_grad()
    with regops.dp_clipping(
        model,
        clip.pop("max_norm", CLIP),
        loss_reduction="mean",
        noise_multiplier=sigma,
        expected_batch_size=expected,
        generator=generator,
        **clip,
    ):
        if len(x):  # an empty batch: the block with no forward (the noise-only step)
            F.cross_entropy(model(x), y).backward()
    opt.step()


def engine_step(model, opt, x, y):
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()


def assert_same_params(got: nn.Module, want: nn.Module, step: int, exact: bool = True) -> None:
    for (name, a), b in zip(got.named_parameters(), want.parameters(), strict=True):
        if exact:
            assert torch.equal(a, b), f"step {step} {name}: max diff {(a - b).abs().max().item()}"
        else:
            torch.testing.assert_close(a, b, rtol=RTOL, atol=RTOL, msg=f"step {step} {name}")


def opacus_engine(model, accountant="rdp", **kwargs):
    opacus = pytest.importorskip("opacus")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its secure-RNG notice
        engine = opacus.PrivacyEngine(accountant=accountant)
        wrapped = engine.make_private(module=model, optimizer=sgd(model), **kwargs)
    return engine, *wrapped


# ------------------------------------------------------------------------------------ the explicit loop
@pytest.mark.parametrize("sigma", [0.0, 1.3])
def test_equals_the_explicit_dp_clipping_loop_bit_for_bit(sigma):
    ds = dataset()
    model, ref = mlp(), mlp()
    engine = regops.PrivacyEngine(accountant="rdp")
    pm, po, pl = engine.make_private(
        module=model,
        optimizer=sgd(model),
        data_loader=DataLoader(ds, batch_size=BATCH, generator=torch.Generator().manual_seed(2)),
        noise_multiplier=sigma,
        max_grad_norm=CLIP,
        noise_generator=torch.Generator().manual_seed(7),
    )
    assert isinstance(pl, regops.DPDataLoader) and len(pl) == N // BATCH and po.expected_batch_size == BATCH
    ropt, rgen = sgd(ref), torch.Generator().manual_seed(7)
    sizes = []
    for step, (x, y) in enumerate(pl):
        sizes.append(len(x))
        engine_step(pm, po, x, y)
        explicit_step(ref, ropt, x, y, sigma=sigma, generator=rgen)
        assert_same_params(model, ref, step)
    assert len(set(sizes)) > 1  # Poisson batches: sizes vary
    assert engine.history == [(sigma, 1 / len(pl), len(pl))]


def test_an_epoch_with_empty_batches_takes_every_noised_step():
    ds = dataset(20)
    model, ref = mlp(), mlp()
    engine = regops.PrivacyEngine(accountant="rdp")
    pm, po, pl = engine.make_private(
        module=model,
        optimizer=sgd(model),
        data_loader=DataLoader(ds, batch_size=1, generator=torch.Generator().manual_seed(0)),
        noise_multiplier=1.0,
        max_grad_norm=CLIP,
        noise_generator=torch.Generator().manual_seed(5),
    )
    ropt, rgen = sgd(ref), torch.Generator().manual_seed(5)
    empty = 0
    for step, (x, y) in enumerate(pl):
        before = [p.detach().clone() for p in model.parameters()]
        engine_step(pm, po, x, y)
        explicit_step(ref, ropt, x, y, sigma=1.0, generator=rgen, expected=1)
        assert_same_params(model, ref, step)
        if len(x) == 0:
            empty += 1
            assert x.shape == (0, 5) and x.dtype == torch.float64 and y.shape == (0,) and y.dtype == torch.int64
            assert all(not torch.equal(a, b) for a, b in zip(model.parameters(), before, strict=True))
    assert step + 1 == 20 and empty >= 3  # rate 1/20 over 20 examples: about a third of the batches are empty
    assert engine.history == [(1.0, 1 / 20, 20)]


def test_virtual_steps_equal_one_block_over_the_physical_batches():
    ds = dataset()
    model, ref = mlp(), mlp()
    engine = regops.PrivacyEngine(accountant="rdp")
    pm, po, pl = engine.make_private(
        module=model,
        optimizer=sgd(model),
        data_loader=DataLoader(ds, batch_size=16, generator=torch.Generator().manual_seed(2)),
        noise_multiplier=0.8,
        max_grad_norm=CLIP,
        noise_generator=torch.Generator().manual_seed(7),
    )
    ropt, rgen = sgd(ref), torch.Generator().manual_seed(7)
    physical: list[tuple[torch.Tensor, torch.Tensor]] = []
    logical = 0
    with regops.privacy.BatchMemoryManager(data_loader=pl, max_physical_batch_size=5, optimizer=po) as loader:
        for x, y in loader:
            assert len(x) <= 5
            physical.append((x, y))
            engine_step(pm, po, x, y)
            if po._is_last_step_skipped:
                continue
            ropt.zero_grad()
            with regops.dp_clipping(
                ref, CLIP, loss_reduction="mean", noise_multiplier=0.8, expected_batch_size=16, generator=rgen
            ):
                for xb, yb in physical:
                    if len(xb):
                        F.cross_entropy(ref(xb), yb).backward()
            ropt.step()
            assert_same_params(model, ref, logical)
            logical += 1
            physical = []
    assert logical == len(pl) and engine.history == [(0.8, 1 / len(pl), len(pl))]


# ------------------------------------------------------------------------------------------------ Opacus
def test_equals_opacus_on_the_same_batches():
    ds = dataset()
    loader = DataLoader(ds, batch_size=BATCH)
    ours, theirs = mlp(), mlp()
    pm, po, _ = regops.PrivacyEngine().make_private(
        module=ours, optimizer=sgd(ours), data_loader=loader, noise_multiplier=0.0, max_grad_norm=CLIP
    )
    _, om, oo, _ = opacus_engine(theirs, data_loader=loader, noise_multiplier=0.0, max_grad_norm=CLIP)
    assert po.expected_batch_size == oo.expected_batch_size
    for step, (x, y) in enumerate(fixed_batches(ds)):
        engine_step(pm, po, x, y)
        engine_step(om, oo, x, y)
        assert_same_params(ours, theirs, step, exact=False)


def test_per_layer_clipping_equals_opacus():
    ds = dataset()
    loader = DataLoader(ds, batch_size=BATCH)
    ours, theirs = mlp(bias=False), mlp(bias=False)
    pm, po, _ = regops.PrivacyEngine().make_private(
        module=ours,
        optimizer=sgd(ours),
        data_loader=loader,
        noise_multiplier=0.0,
        max_grad_norm={"0": 0.8, "2": 0.9},  # module norms 0.55 to 1.16
        clipping="per_layer",
    )
    _, om, oo, _ = opacus_engine(
        theirs, data_loader=loader, noise_multiplier=0.0, max_grad_norm=[0.8, 0.9], clipping="per_layer"
    )
    for step, (x, y) in enumerate(fixed_batches(ds)):
        engine_step(pm, po, x, y)
        engine_step(om, oo, x, y)
        assert_same_params(ours, theirs, step, exact=False)


def test_virtual_steps_and_accumulation_equal_opacus():
    ds = dataset()
    batches = [b for b in fixed_batches(ds) if len(b[0])]
    for poisson in (True, False):
        loader = DataLoader(ds, batch_size=BATCH)
        ours, theirs = mlp(), mlp()
        engine = regops.PrivacyEngine(accountant="rdp")
        pm, po, _ = engine.make_private(
            module=ours,
            optimizer=sgd(ours),
            data_loader=loader,
            noise_multiplier=0.0,
            max_grad_norm=CLIP,
            poisson_sampling=poisson,
        )
        their_engine, om, oo, _ = opacus_engine(
            theirs, data_loader=loader, noise_multiplier=0.0, max_grad_norm=CLIP, poisson_sampling=poisson
        )
        for step, (x, y) in enumerate(batches):
            for model, opt in ((pm, po), (om, oo)):
                parts = list(zip(x.split(3), y.split(3), strict=True))
                if poisson:  # virtual steps: one logical batch in physical pieces
                    for i, (xb, yb) in enumerate(parts):
                        opt.signal_skip_step(i < len(parts) - 1)
                        engine_step(model, opt, xb, yb)
                else:  # gradient accumulation: Opacus divides by expected batch size x forwards
                    opt.zero_grad()
                    for xb, yb in parts:
                        F.cross_entropy(model(xb), yb).backward()
                    opt.step()
            assert_same_params(ours, theirs, step, exact=False)
        assert engine.history == their_engine.accountant.history


@pytest.mark.parametrize("accountant", ["rdp", "prv", "gdp"])
def test_epsilon_equals_opacus_for_the_same_history(accountant):
    ds = dataset()
    loader = DataLoader(ds, batch_size=BATCH)
    ours, theirs = mlp(), mlp()
    engine = regops.PrivacyEngine(accountant=accountant)
    pm, po, _ = engine.make_private(
        module=ours, optimizer=sgd(ours), data_loader=loader, noise_multiplier=1.1, max_grad_norm=CLIP
    )
    their_engine, om, oo, _ = opacus_engine(
        theirs, accountant=accountant, data_loader=loader, noise_multiplier=1.1, max_grad_norm=CLIP
    )
    assert engine.get_epsilon(1e-5) == 0.0
    for x, y in fixed_batches(ds):
        engine_step(pm, po, x, y)
        engine_step(om, oo, x, y)
    assert engine.history == their_engine.accountant.history == [(1.1, 1 / 8, 6)]
    assert engine.get_epsilon(1e-5) == their_engine.get_epsilon(1e-5) > 0


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_make_private_with_epsilon_reaches_the_target_as_opacus(accountant):
    opacus = pytest.importorskip("opacus")
    ds = dataset()
    loader = DataLoader(ds, batch_size=BATCH, generator=torch.Generator().manual_seed(4))
    ours, theirs = mlp(), mlp()
    engine = regops.PrivacyEngine(accountant=accountant)
    target, delta, epochs = 8.0, 1e-3, 2
    pm, po, pl = engine.make_private_with_epsilon(
        module=ours,
        optimizer=sgd(ours),
        data_loader=loader,
        target_epsilon=target,
        target_delta=delta,
        epochs=epochs,
        max_grad_norm=CLIP,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, oo, _ = opacus.PrivacyEngine(accountant=accountant).make_private_with_epsilon(
            module=theirs,
            optimizer=sgd(theirs),
            data_loader=loader,
            target_epsilon=target,
            target_delta=delta,
            epochs=epochs,
            max_grad_norm=CLIP,
        )
    assert po.noise_multiplier == oo.noise_multiplier > 0
    for _ in range(epochs):
        for x, y in pl:
            engine_step(pm, po, x, y)
    eps = engine.get_epsilon(delta)
    assert target - 0.01 <= eps <= target  # Opacus's search: epsilon_tolerance=0.01 below the target
