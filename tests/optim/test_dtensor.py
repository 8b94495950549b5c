"""regops.optim under FSDP2 (``fully_shard``; gloo, 2 processes on CPU): every rank updates its shards and the global
sums cost one all-reduce, so a SAM step (SGD and AdamW bases, ASAM), GSAM, and AdamW with adaptive clipping and
gradient noise give the parameters of one process with the whole batch. Under DDP the first backward may skip the
gradient sync and the ranks still stay identical. With AdamP's projection (``adamp=``) on a model with
scale-invariant weights (per row and as a whole), AdamW and SGD decide and project as one process: the row and
tensor sums are completed over the mesh."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import regops
from tests.dist_harness import Checks, run

LOCAL = 4
TOL = dict(rtol=1e-10, atol=1e-12)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    # a 5-row layer splits unevenly over 2 ranks; the biases are vectors (adaptive clipping all-reduces them)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()


class _RowNormed(nn.Linear):
    """A linear layer of unit rows: its weight is scale-invariant per row (AdamP's channel view)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight / self.weight.norm(dim=1, keepdim=True), self.bias)


def _normed() -> nn.Module:
    torch.manual_seed(0)
    # before the LayerNorm, the 5-row weight is scale-invariant as a whole (AdamP's layer view: a global sum)
    layers = [nn.Linear(6, 5, bias=False), nn.LayerNorm(5), nn.Tanh(), _RowNormed(5, 4), nn.Tanh(), nn.Linear(4, 3)]
    return nn.Sequential(*layers).double()


def _data(n: int):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 6, dtype=torch.float64, generator=g), torch.randint(0, 3, (n,), generator=g)


def _sharded(build=_mlp) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    model = build()
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    return fully_shard(model)


def _sam_steps(model, opt, batches):
    for xb, yb in batches:
        F.cross_entropy(model(xb), yb).backward()
        opt.first_step(zero_grad=True)
        F.cross_entropy(model(xb), yb).backward()
        opt.second_step(zero_grad=True)


def _plain_steps(model, opt, batches):
    for xb, yb in batches:
        F.cross_entropy(model(xb), yb).backward()
        opt.step()
        opt.zero_grad()


CASES = {
    "SAM(SGD)": (_sam_steps, lambda ps: regops.optim.SAM(ps, regops.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)),
    "ASAM(AdamW)": (_sam_steps, lambda ps: regops.optim.SAM(ps, regops.optim.AdamW, rho=0.5, adaptive=True, lr=1e-2)),
    "GSAM(SGD)": (_sam_steps, lambda ps: regops.optim.GSAM(ps, regops.optim.SGD, rho=0.1, alpha=0.3, lr=0.1)),
    "SAM(torch SGD)": (_sam_steps, lambda ps: regops.optim.SAM(ps, torch.optim.SGD, rho=0.1, lr=0.1)),
    "AdamW agc noise": (
        _plain_steps,
        lambda ps: regops.optim.AdamW(
            ps, lr=1e-2, agc=0.05, grad_noise=(0.01, 0.55), generator=torch.Generator().manual_seed(4)
        ),
    ),
}
ADAMP_CASES = {
    "AdamW adamp agc": (
        _plain_steps,
        lambda ps: regops.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, adamp=True, agc=0.5),
    ),
    "SGD adamp nesterov": (
        _plain_steps,
        lambda ps: regops.optim.SGD(
            ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.1, decay="decoupled", adamp=True
        ),
    ),
}


def _projected(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[float]:
    """The decay ratio AdamP's projection gives each weight of ``_normed()`` for the gradient of (x, y)."""
    from regops.optim import reference as ref

    F.cross_entropy(model(x), y).backward()
    out = [float(ref.radial_projection(p.detach(), p.grad, p.grad, 0.1, 0.1, 1e-8)[1]) for p in model.parameters()]
    model.zero_grad()
    return out


def _body(rank: int, world: int) -> None:
    c = Checks(rank)
    steps, n = 2, world * LOCAL
    x, y = _data(steps * n)
    whole = [(x[t * n : (t + 1) * n], y[t * n : (t + 1) * n]) for t in range(steps)]
    # each rank its share of every step's batch; FSDP2 averages the ranks' gradients: the whole batch's mean
    mine = [(xb[rank * LOCAL : (rank + 1) * LOCAL], yb[rank * LOCAL : (rank + 1) * LOCAL]) for xb, yb in whole]
    # the premise of the adamp cases: AdamP projects the weights before the LayerNorm and the row-normed one only
    c.true("adamp projects", _projected(_normed(), *whole[0]) == [0.1, 1.0, 1.0, 0.1, 1.0, 1.0, 1.0])
    cases = [(n, loop, make, _mlp) for n, (loop, make) in CASES.items()]
    cases += [(n, loop, make, _normed) for n, (loop, make) in ADAMP_CASES.items()]
    for name, loop, make, build in cases:
        single = build()
        loop(single, make(single.parameters()), whole)
        model = _sharded(build)
        loop(model, make(model.parameters()), mine)
        for (n_, p), q in zip(model.named_parameters(), single.parameters(), strict=True):
            c.close(f"{name} {n_}", p.full_tensor(), q.detach(), **TOL)
    c.done()


def test_fsdp2_steps_equal_one_process():
    run(_body, 2, timeout=300.0)


def _ddp_body(rank: int, world: int) -> None:
    """DDP with the first backward under no_sync (each rank perturbs by its own gradient, SAM's m-sharpness): the
    second gradients are averaged and the restore is exact, so the ranks stay identical."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    c = Checks(rank)
    x, y = _data(world * LOCAL)
    model = DistributedDataParallel(_mlp())
    opt = regops.optim.SAM(model.parameters(), regops.optim.AdamW, rho=0.1, lr=1e-2)
    mine = slice(rank * LOCAL, (rank + 1) * LOCAL)
    for _ in range(2):
        with model.no_sync():
            F.cross_entropy(model(x[mine]), y[mine]).backward()
        opt.first_step(zero_grad=True)
        F.cross_entropy(model(x[mine]), y[mine]).backward()
        opt.second_step(zero_grad=True)
    for n_, p in model.named_parameters():
        other = p.detach().clone()
        dist.broadcast(other, src=0)
        c.equal(f"ddp {n_}: ranks agree", p.detach(), other)
    c.done()


def test_ddp_sam_without_sync_in_the_first_pass_keeps_ranks_identical():
    run(_ddp_body, 2, timeout=300.0)
