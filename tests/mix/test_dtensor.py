"""Mixing on DTensors (gloo, 2 processes on CPU): every rank uses the first rank's draws, partners pair samples
across the batch and CutMix boxes are in global pixels, so the full tensor of the result equals the
single-process result for the same generator, bit for bit, whatever the placements; gradients of manifold
mixup match."""

from __future__ import annotations

import torch

import regops
from tests.dist_harness import Checks, run

SEED = 100


def _gens(rank: int):
    """(this rank's generator, a copy of rank 0's): ranks deliberately disagree."""
    return torch.Generator().manual_seed(SEED + rank), torch.Generator().manual_seed(SEED)


def _body(rank: int, world: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    c = Checks(rank)
    mesh = init_device_mesh("cpu", (world,))
    data = torch.Generator().manual_seed(1)
    images = torch.randn(6, 3, 5, 4, generator=data)
    labels = torch.arange(6) % 3
    kw = dict(mixup_alpha=0.8, cutmix_alpha=1.0, mode="elem", switch_prob=0.5)
    want, mix0 = regops.mix_batch(images, labels, generator=_gens(0)[1], **kw)
    for pl in [[Shard(d)] for d in range(4)] + [[Replicate()]]:
        got, mix = regops.mix_batch(distribute_tensor(images, mesh, pl), labels, generator=_gens(rank)[0], **kw)
        c.true(f"mix_batch {pl}: DTensor with x's placements", isinstance(got, DTensor) and got.placements == tuple(pl))
        c.equal(f"mix_batch {pl}: value", got.full_tensor(), want)
        c.equal(f"mix_batch {pl}: partners", mix.params.partner, mix0.params.partner)
        c.equal(f"mix_batch {pl}: boxes", mix.params.box, mix0.params.box)
        c.equal(f"mix_batch {pl}: lam", mix.lam, mix0.lam)
    mixup_kw = dict(mixup_alpha=0.8, cutmix_alpha=1.0, mode="pair", num_classes=3)
    want_x, want_y = regops.Mixup(**mixup_kw, generator=_gens(0)[1])(images, labels)
    got_x, got_y = regops.Mixup(**mixup_kw, generator=_gens(rank)[0])(
        distribute_tensor(images, mesh, [Shard(0)]), labels
    )
    c.equal("Mixup images", got_x.full_tensor(), want_x)
    c.equal("Mixup soft targets", got_y, want_y)
    # mix0's boxes are in the images' 5 x 4 pixels: h is at least that large (and 5 wide: uneven shards of dim 3)
    h = torch.randn(6, 4, 5, 5, dtype=torch.float64, generator=data)
    for pl in ([Shard(0)], [Shard(1)], [Shard(3)]):
        h0 = h.clone().requires_grad_()
        hd = distribute_tensor(h, mesh, pl).requires_grad_()
        want = regops.manifold_mix(h0, mix0)
        got = regops.manifold_mix(hd, mix0)
        c.equal(f"manifold_mix {pl}", got.full_tensor(), want.detach())
        (want * h).sum().backward()
        (got * distribute_tensor(h, mesh, pl)).sum().backward()
        c.close(f"manifold_mix {pl}: grad", hd.grad.full_tensor(), h0.grad, rtol=1e-12, atol=1e-12)
    c.done()


def test_mixing_on_dtensors_two_processes():
    run(_body, 2)
