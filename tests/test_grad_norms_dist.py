"""Per-example norms and DP clipping under DistributedDataParallel: gloo, 2 processes on CPU."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

import regops
from tests import dist_workers

WORLD = 2
LOCAL_BATCH = 4


def _data(batch: int):
    gen = torch.Generator().manual_seed(123)
    x = torch.randn(batch, 6, dtype=torch.float64, generator=gen)
    y = torch.randint(0, 3, (batch,), generator=gen)
    return x, y


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 3)).double()


def _per_example_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_n(p, xn, yn):
        return F.cross_entropy(functional_call(model, p, (xn.unsqueeze(0),)), yn.unsqueeze(0), reduction="sum")

    return vmap(grad(loss_n), in_dims=(None, 0, 0))(params, x, y)


def _worker(rank: int) -> None:
    x_all, y_all = _data(WORLD * LOCAL_BATCH)
    local = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    model = _model()
    ddp = nn.parallel.DistributedDataParallel(model)
    with regops.per_sample_grad_norms(ddp, "mean", retain_signals=True) as norms:
        F.cross_entropy(ddp(x_all[local]), y_all[local]).backward()

    # norms are per local example
    grads = _per_example_grads(_model(), x_all, y_all)
    for name, g in grads.items():
        got = norms.per_param[f"module.{name}"]
        torch.testing.assert_close(got, g[local].flatten(1).norm(dim=1), msg=name)

    # clipped gradients: (sum over all ranks' examples of clipped grads) / (global batch), on every rank
    max_norm = 0.3
    regops.clip_per_sample_(norms, max_norm=max_norm)
    total = torch.stack([g.flatten(1).square().sum(1) for g in grads.values()]).sum(0).sqrt()
    factor = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for name, p in model.named_parameters():
        want = torch.einsum("b,b...->...", factor, grads[name]) / (WORLD * LOCAL_BATCH)
        torch.testing.assert_close(p.grad, want, msg=name)

    # noise is drawn once, on rank 0 (whatever the other ranks' generators), then averaged like the grads;
    # clipping adds to what p.grad held before the block, as torch's backward does, so start from none
    ddp.zero_grad(set_to_none=True)
    with regops.per_sample_grad_norms(ddp, "mean", retain_signals=True) as norms:
        F.cross_entropy(ddp(x_all[local]), y_all[local]).backward()
    regops.clip_per_sample_(norms, 0.3, noise_multiplier=1.0, generator=torch.Generator().manual_seed(rank))
    gen0 = torch.Generator().manual_seed(0)
    for name, p in model.named_parameters():
        want = torch.einsum("b,b...->...", factor, grads[name]) / (WORLD * LOCAL_BATCH)
        noise = torch.randn(p.shape, generator=gen0, dtype=torch.float32).double() * 0.3 / LOCAL_BATCH / WORLD
        torch.testing.assert_close(p.grad, want + noise, msg=name)


def test_ddp_norms_and_clipping_two_processes():
    dist_workers.run(_worker, world=WORLD)
