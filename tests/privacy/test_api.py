"""The PrivacyEngine's contract: clear errors for bad arguments and broken steps, evaluation untouched, the
wrapped objects standing in for the originals, the engine's state restored mid-training (training then continues
bit for bit), the Poisson loader's empty batches and shards, virtual steps' splitting, autocast, and training
without Opacus installed (only the accounting needs it)."""

from __future__ import annotations

import io
import re
import sys
from collections import namedtuple
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

import regops
from regops.privacy import BatchMemoryManager, DPDataLoader, DPOptimizer, PrivateModule

ROOT = Path(__file__).resolve().parents[2]


def mlp(dtype: torch.dtype = torch.float64) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7), nn.Tanh(), nn.Linear(7, 3)).to(dtype)


def dataset(n: int = 32, dtype: torch.dtype = torch.float64) -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(n, 5, generator=g).to(dtype), torch.randint(0, 3, (n,), generator=g))


def private(model=None, loader=None, engine=None, **kw):
    model = mlp() if model is None else model
    loader = DataLoader(dataset(), batch_size=4) if loader is None else loader
    engine = regops.PrivacyEngine(accountant="rdp") if engine is None else engine
    kw.setdefault("noise_multiplier", 1.0)
    kw.setdefault("max_grad_norm", 1.0)
    optimizer = kw.pop("optimizer", None) or torch.optim.SGD(model.parameters(), lr=0.1)
    return engine, *engine.make_private(module=model, optimizer=optimizer, data_loader=loader, **kw)


def train_step(model, opt, x, y) -> None:
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()


# ---------------------------------------------------------------------------------------------- arguments
def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="accountant must be one of"):
        regops.PrivacyEngine(accountant="moments")
    with pytest.raises(NotImplementedError, match="secure_mode"):
        regops.PrivacyEngine(secure_mode=True)
    cases = [
        (dict(noise_multiplier=-1.0), ValueError, "noise_multiplier must be"),
        (dict(max_grad_norm=0.0), ValueError, "max_grad_norm must be > 0"),
        (dict(max_grad_norm=[1.0, 1.0]), ValueError, "regops clips per module"),
        (dict(max_grad_norm={"0": 1.0, "1": 1.0, "3": 1.0}), ValueError, "needs clipping='per_layer'"),
        (dict(max_grad_norm={"0": 1.0, "3": 1.0}, clipping="per_layer"), ValueError, r"missing: \['1'\]"),
        (dict(max_grad_norm={"0": 1.0, "1": 1.0, "2": 1.0, "3": 1.0}, clipping="per_layer"), ValueError, "unknown"),
        (dict(clipping="adaptive"), ValueError, "clipping must be one of"),
        (dict(loss_reduction="none"), ValueError, "loss_reduction must be"),
        (dict(batch_first=1), TypeError, "batch_first"),
        (dict(optimizer=torch.optim.SGD(mlp().parameters(), lr=0.1)), ValueError, "not the module's"),
        (dict(loader=DataLoader(dataset(3), batch_sampler=[[0]] * 5)), ValueError, "expected batch size would be 0"),
        (dict(model=nn.Linear(5, 3).requires_grad_(False)), ValueError, "no trainable parameter"),
    ]
    for kw, error, match in cases:
        with pytest.raises(error, match=match):
            private(**kw)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        regops.PrivacyEngine().make_private(
            module=lambda x: x,
            optimizer=torch.optim.SGD(mlp().parameters(), lr=0.1),
            data_loader=DataLoader(dataset(), batch_size=4),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
        )
    engine = regops.PrivacyEngine()
    for delta in (0, 1.5, True):
        with pytest.raises(ValueError, match="delta must be in"):
            engine.get_epsilon(delta)
    model = mlp()
    with pytest.raises(ValueError, match="epochs must be > 0"):
        engine.make_private_with_epsilon(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=DataLoader(dataset(), batch_size=4),
            target_epsilon=1.0,
            target_delta=1e-5,
            epochs=0,
            max_grad_norm=1.0,
        )
    _, _, po, _ = private()
    with pytest.raises(ValueError, match="noise_multiplier must be"):
        po.noise_multiplier = -0.5
    with pytest.raises(ValueError, match="max_grad_norm must be > 0"):
        po.max_grad_norm = 0


def test_loader_and_manager_arguments():
    ds = dataset()
    with pytest.raises(ValueError, match="draws its own batches"):
        DPDataLoader(ds, sample_rate=0.1, batch_size=4)
    with pytest.raises(ValueError, match="sample_rate must be in"):
        DPDataLoader(ds, sample_rate=0.0)

    class Stream(IterableDataset):
        def __iter__(self):
            yield torch.zeros(2)

    with pytest.raises(ValueError, match="map-style"):
        DPDataLoader(Stream(), sample_rate=0.1)
    with pytest.raises(RuntimeError, match="process group"):
        DPDataLoader(ds, sample_rate=0.1, distributed=True)
    with pytest.raises(ValueError, match="rank must be"):
        DPDataLoader(ds, sample_rate=0.1, distributed=True, num_replicas=2, rank=2)
    _, _, po, pl = private()
    with pytest.raises(TypeError, match="optimizer returned by PrivacyEngine.make_private"):
        BatchMemoryManager(data_loader=pl, max_physical_batch_size=2, optimizer=po.original_optimizer)
    with pytest.raises(ValueError, match="max_physical_batch_size"):
        BatchMemoryManager(data_loader=pl, max_physical_batch_size=0, optimizer=po)


# ------------------------------------------------------------------------------------------------ the step
def test_broken_steps_raise_and_leave_no_block_open():
    x, y = dataset()[:4]
    _, pm, po, _ = private()
    with pytest.raises(RuntimeError, match="no forward pass"):
        po.step()
    F.cross_entropy(pm(x), y).backward()
    with pytest.raises(ValueError, match="one batch per DP step"):
        pm(x)  # Poisson sampling: a second batch in the same step
    assert no_block_open(po)
    _, pm, po, _ = private(poisson_sampling=False)
    F.cross_entropy(pm(x), y).backward()
    with pytest.raises(ValueError, match="empty batch inside a DP step"):
        pm(x[:0])
    assert no_block_open(po)
    _, pm, po, _ = private(model=mlp(torch.float32))
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(F.cross_entropy(pm(x.float()), y)).backward()
    with pytest.raises(NotImplementedError, match="GradScaler"):
        scaler.step(po)
    assert no_block_open(po)
    bn = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)).double()
    _, pm, po, _ = private(model=bn)
    with pytest.raises(ValueError, match="BatchNorm1d '1' normalises with batch statistics"):
        pm(x)
    assert no_block_open(po)


def no_block_open(po: DPOptimizer) -> bool:
    """The step's block is closed and its recorder's TorchFunctionMode is off the stack."""
    return po._dp_step.block is None and not torch.overrides._get_current_function_mode_stack()


def test_evaluation_runs_the_module_as_it_is():
    x, y = dataset()[:4]
    model = mlp()
    want = model(x)
    _, pm, po, _ = private(model=model)
    with torch.no_grad():
        assert torch.equal(pm(x), want)
    pm.eval()
    assert not model.training
    assert torch.equal(pm(x), want) and no_block_open(po)
    pm.train()
    assert model.training
    F.cross_entropy(pm(x), y).backward()
    assert not no_block_open(po)
    po.zero_grad()  # before step: the step is discarded
    assert no_block_open(po) and all(p.grad is None for p in model.parameters())
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), mlp().parameters(), strict=True))


def test_wrapped_objects_stand_in_for_the_originals():
    model = mlp()
    model.note = "kept"
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    engine, pm, po, pl = private(model=model, optimizer=opt)
    assert isinstance(pm, PrivateModule) and isinstance(po, DPOptimizer) and isinstance(pl, DPDataLoader)
    assert pm._module is model and pm.note == "kept" and po.original_optimizer is opt
    assert list(pm.state_dict()) == [f"_module.{k}" for k in model.state_dict()]
    assert po.param_groups is opt.param_groups and po.state is opt.state and po.defaults is opt.defaults
    assert (po.noise_multiplier, po.max_grad_norm, po.loss_reduction, po.expected_batch_size) == (1.0, 1.0, "mean", 4)
    schedule = torch.optim.lr_scheduler.StepLR(po, step_size=1, gamma=0.5)
    for x, y in pl:
        train_step(pm, po, x, y)
        schedule.step()
    assert opt.param_groups[0]["lr"] == 0.1 * 0.5 ** len(pl)
    assert po.state_dict() == opt.state_dict() and "momentum_buffer" in opt.state[model[0].weight]
    po.noise_multiplier = 2.0  # a noise schedule: the next steps are accounted with the new value
    x, y = next(iter(pl))
    train_step(pm, po, x, y)
    assert engine.history == [(1.0, 1 / 8, 8), (2.0, 1 / 8, 1)]
    # wrapping the wrapped objects again wraps the originals
    _, pm2, po2, _ = private(model=pm, optimizer=po, engine=engine, loader=pl)
    assert pm2._module is model and po2.original_optimizer is opt
    with pytest.warns(UserWarning, match="accounts for another dataset"):
        private(model=pm, optimizer=po, engine=engine)


def test_state_round_trip_continues_bit_for_bit():
    ds = dataset()

    def start(seed: int, state=None):
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
        loader = DataLoader(ds, batch_size=4, generator=torch.Generator().manual_seed(seed))
        engine, pm, po, pl = private(
            model=model, optimizer=opt, loader=loader, noise_generator=torch.Generator().manual_seed(seed)
        )
        if state is not None:
            buffer = io.BytesIO(state)
            engine.load_checkpoint(path=buffer, module=pm, optimizer=po)
        return engine, pm, po, pl

    def epoch(pm, po, pl) -> None:
        for x, y in pl:
            train_step(pm, po, x, y)

    engine, pm, po, pl = start(2)
    epoch(pm, po, pl)
    buffer = io.BytesIO()
    engine.save_checkpoint(path=buffer, module=pm, optimizer=po)
    epoch(pm, po, pl)
    want = [p.detach().clone() for p in pm.parameters()]

    restored, rm, ro, rl = start(99, buffer.getvalue())  # other seeds: the state decides
    assert restored.history == [(1.0, 1 / 8, 8)]
    epoch(rm, ro, rl)
    assert all(torch.equal(p, q) for p, q in zip(rm.parameters(), want, strict=True))
    assert restored.history == engine.history == [(1.0, 1 / 8, 16)]

    with pytest.raises(ValueError, match="'gdp' accountant"):
        restored.load_state_dict({**engine.state_dict(), "accountant": "gdp"})
    with pytest.raises(RuntimeError, match="call make_private before load_state_dict"):
        regops.PrivacyEngine(accountant="rdp").load_state_dict(engine.state_dict())


def test_autocast_bf16_equals_the_explicit_loop():
    ds = dataset(dtype=torch.float32)
    model, ref = mlp(torch.float32), mlp(torch.float32)
    _, pm, po, pl = private(
        model=model,
        loader=DataLoader(ds, batch_size=4, generator=torch.Generator().manual_seed(2)),
        noise_generator=torch.Generator().manual_seed(3),
    )
    ropt, rgen = torch.optim.SGD(ref.parameters(), lr=0.1), torch.Generator().manual_seed(3)
    for x, y in pl:
        po.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(pm(x), y)
        loss.backward()
        po.step()
        ropt.zero_grad()
        with regops.dp_clipping(
            ref, 1.0, loss_reduction="mean", noise_multiplier=1.0, expected_batch_size=4, generator=rgen
        ):
            if len(x):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss = F.cross_entropy(ref(x), y)
                loss.backward()
        ropt.step()
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), ref.parameters(), strict=True))


def test_training_needs_opacus_only_for_accounting(monkeypatch):
    monkeypatch.setitem(sys.modules, "opacus.accountants", None)
    engine, pm, po, pl = private()
    for x, y in pl:
        train_step(pm, po, x, y)
    assert engine.history == [(1.0, 1 / 8, 8)]
    with pytest.raises(ImportError, match="pip install opacus"):
        engine.get_epsilon(1e-5)


# ------------------------------------------------------------------------------------------------ loading
Pair = namedtuple("Pair", ["image", "label"])


class Structured(Dataset):
    def __len__(self) -> int:
        return 10

    def __getitem__(self, i: int):
        return {"x": torch.full((3, 2), float(i)), "ids": torch.arange(4) + i, "pair": Pair(torch.zeros(2), i)}


def test_empty_batches_keep_the_structure_shapes_and_dtypes():
    loader = DPDataLoader(Structured(), sample_rate=0.05, steps=30, generator=torch.Generator().manual_seed(0))
    batches = list(loader)
    empty = [b for b in batches if len(b["x"]) == 0]
    full = [b for b in batches if len(b["x"])]
    assert len(batches) == 30 and empty and full
    for b in empty:
        assert b["x"].shape == (0, 3, 2) and b["x"].dtype == torch.float32
        assert b["ids"].shape == (0, 4) and b["ids"].dtype == torch.int64
        assert isinstance(b["pair"], Pair) and b["pair"].image.shape == (0, 2) and b["pair"].label.shape == (0,)
    assert full[0]["x"].shape[1:] == (3, 2) and isinstance(full[0]["pair"], Pair)
    # sequence-first batches: the batch is dim 1 (1-D tensors: dim 0)
    seq = DPDataLoader(
        TensorDataset(torch.zeros(10, 6)),
        sample_rate=0.01,
        steps=5,
        collate_fn=lambda rows: (torch.stack([r[0] for r in rows], 1), torch.zeros(len(rows))),
        batch_first=False,
        generator=torch.Generator().manual_seed(0),
    )
    shapes = {(tuple(a.shape), tuple(b.shape)) for a, b in seq}
    assert ((6, 0), (0,)) in shapes
    with pytest.raises(TypeError, match="cannot make an empty batch holding a str"):
        DPDataLoader([("a", 1)] * 4, sample_rate=0.5)


def test_distributed_shards_split_the_single_process_batch():
    ds = TensorDataset(torch.arange(50))

    def batches(**kw) -> list[list[int]]:
        loader = DPDataLoader(ds, sample_rate=0.1, steps=12, generator=torch.Generator().manual_seed(4), **kw)
        return [b[0].tolist() for b in loader]

    single = batches()
    shards = [batches(distributed=True, num_replicas=3, rank=r) for r in range(3)]
    for step, whole in enumerate(single):
        parts = [shard[step] for shard in shards]
        assert sorted(i for part in parts for i in part) == whole
        assert all(i % 3 == r for r, part in enumerate(parts) for i in part)
    assert any(len(shard[s]) == 0 for shard in shards for s in range(12))  # empty shares are yielded too


def test_batch_memory_manager_splits_batches_and_signals_their_ends():
    ds = TensorDataset(torch.arange(40).double().unsqueeze(1).expand(40, 5).contiguous(), torch.zeros(40).long())
    _, _, po, pl = private(loader=DataLoader(ds, batch_size=10, generator=torch.Generator().manual_seed(1)))
    again = DPDataLoader.from_data_loader(DataLoader(ds, batch_size=10), generator=torch.Generator().manual_seed(1))
    logical = [x[:, 0].tolist() for x, _ in again]
    with BatchMemoryManager(data_loader=pl, max_physical_batch_size=3, optimizer=po) as physical:
        assert len(physical) == 14  # Opacus's estimate: ceil(4 steps x 10 examples in expectation / 3)
        pieces = [x[:, 0].tolist() for x, _ in physical]
    ends = [not skip for skip in po._step_skip_queue]
    assert len(ends) == len(pieces) and sum(ends) == len(logical) == 4
    rebuilt, current = [], []
    for piece, end in zip(pieces, ends, strict=True):
        current.append(piece)
        if end:
            sizes = [len(p) for p in current]
            assert max(sizes) <= 3 and max(sizes) - min(sizes) <= 1  # as equal as possible (np.array_split's)
            rebuilt.append([i for p in current for i in p])
            current = []
    assert rebuilt == logical


# ------------------------------------------------------------------------------------------- the documents
def _python_block(path: Path, after: str) -> str:
    text = path.read_text()
    return re.findall(r"```python\n(.*?)```", text[text.index(after) :], re.S)[0]


@pytest.mark.parametrize(
    "path, after",
    [("docs/per-example.md", "## DP-SGD with Opacus's interface"), ("docs/privacy.md", "## The Opacus tutorial")],
)
def test_the_documented_loops_run(path, after, capsys):
    pytest.importorskip("opacus")
    torch.manual_seed(0)
    exec(compile(_python_block(ROOT / path, after), path, "exec"), {"__name__": "doc"})
    printed = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in printed] == ["epoch 0", "epoch 1"]
    assert all(0 < float(line.rsplit("epsilon ", 1)[1]) < 60 for line in printed)
