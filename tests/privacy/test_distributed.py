"""PrivacyEngine on torch's parallel engines (gloo, 2 processes on CPU): a DDP or FSDP2 model with the per-rank
loader of a ``DistributedSampler`` takes the same steps as one process with the whole batch (the ranks' Poisson
shares are the single-process batch, split; the noise is rank 0's draw), empty local batches and virtual steps
with different numbers of physical batches per rank included."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import regops
from tests.dist_harness import Checks, run

N, CLIP = 40, 2.0
RTOL = 1e-12  # float64: the ranks' sums added in another order than one process's


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7), nn.Tanh(), nn.Linear(7, 3)).double()


def _dataset() -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(N, 5, dtype=torch.float64, generator=g), torch.randint(0, 3, (N,), generator=g))


def _fsdp() -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    model = _mlp()
    for layer in model:
        if isinstance(layer, (nn.Linear, nn.LayerNorm)):
            fully_shard(layer)
    return fully_shard(model)


def _step(model, opt, x, y) -> None:
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()


def _full(p: torch.Tensor) -> torch.Tensor:
    return p.full_tensor() if hasattr(p, "full_tensor") else p


def _compare(c: Checks, label: str, got: nn.Module, want: nn.Module) -> None:
    for (name, a), b in zip(got.named_parameters(), want.parameters(), strict=True):
        c.close(f"{label} {name}", _full(a).detach(), b.detach(), rtol=RTOL, atol=RTOL)


def _body(rank: int, world: int) -> None:
    c = Checks(rank)
    ds = _dataset()
    for kind, sigma, physical in (("ddp", 0.0, None), ("ddp", 1.3, None), ("ddp", 0.7, 1), ("fsdp2", 1.3, None)):
        label = f"{kind} sigma={sigma} physical={physical}"
        # one example per rank per batch in expectation: local batches are often empty, on one rank or both
        shard = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=False)
        # each rank its own seed: make_private gives every rank rank 0's sampling state
        local = DataLoader(ds, batch_size=1, sampler=shard, generator=torch.Generator().manual_seed(2 + 1000 * rank))
        model = nn.parallel.DistributedDataParallel(_mlp()) if kind == "ddp" else _fsdp()
        opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
        engine = regops.PrivacyEngine(accountant="rdp")
        pm, po, pl = engine.make_private(
            module=model,
            optimizer=opt,
            data_loader=local,
            noise_multiplier=sigma,
            max_grad_norm=CLIP,
            noise_generator=torch.Generator().manual_seed(7),
        )
        single = _mlp()
        ref_engine = regops.PrivacyEngine(accountant="rdp")
        rm, ro, rl = ref_engine.make_private(
            module=single,
            optimizer=torch.optim.SGD(single.parameters(), lr=0.2, momentum=0.9),
            data_loader=DataLoader(ds, batch_size=world, generator=torch.Generator().manual_seed(2)),
            noise_multiplier=sigma,
            max_grad_norm=CLIP,
            noise_generator=torch.Generator().manual_seed(7),
        )
        c.true(f"{label}: same rate and expected batch size", (len(pl), po.expected_batch_size) == (len(rl), 2))
        sizes = []
        if physical is None:
            for step, ((x, y), (xs, ys)) in enumerate(zip(pl, rl, strict=True)):
                sizes.append(len(x))
                _step(pm, po, x, y)
                _step(rm, ro, xs, ys)
                _compare(c, f"{label} step {step}", model, single)
        else:
            with regops.privacy.BatchMemoryManager(
                data_loader=pl, max_physical_batch_size=physical, optimizer=po
            ) as pieces:
                for x, y in pieces:
                    sizes.append(len(x))
                    _step(pm, po, x, y)
            for xs, ys in rl:
                _step(rm, ro, xs, ys)
            _compare(c, label, model, single)
        c.true(f"{label}: an empty local batch happened ({sizes})", 0 in sizes)
        c.true(f"{label}: history {engine.history}", engine.history == ref_engine.history == [(sigma, 0.05, 20)])
        # in the step, before optimizer.step(): autograd formed no Linear weight gradient (DDP under no_sync(),
        # FSDP2 on every rank alike), the clipped sum will be the only one
        po.zero_grad()
        F.cross_entropy(pm(ds.tensors[0][:3]), ds.tensors[1][:3]).backward()
        inner = model.module if kind == "ddp" else model
        formed = [n for n, m in inner.named_modules() if isinstance(m, nn.Linear) and m.weight.grad is not None]
        c.true(f"{label}: no autograd weight gradient ({formed})", not formed)
        po.zero_grad()
    c.done()


def test_ddp_and_fsdp2_steps_equal_one_process_two_ranks():
    run(_body, 2, timeout=400.0)
