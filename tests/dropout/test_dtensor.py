"""The dropout family on DTensors (gloo, 2 processes on CPU): the full tensor of the result equals the
single-process result for the same generator, bit for bit, whatever the placements (Shard on any dim, uneven,
Replicate); ranks whose generators disagree use the first rank's draws; every rank's generator advances as in a
single process; gradients match."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import regops
from tests.dist_harness import Checks, run

P = 0.3
SEED = 100


def _gens(rank: int):
    """(this rank's generator, a copy of rank 0's, a copy of this rank's): ranks deliberately disagree."""
    return (
        torch.Generator().manual_seed(SEED + rank),
        torch.Generator().manual_seed(SEED),
        torch.Generator().manual_seed(SEED + rank),
    )


def _placements(ndim: int):
    from torch.distributed.tensor import Replicate, Shard

    return [[Shard(d)] for d in range(ndim)] + [[Replicate()]]


def _check_op(c: Checks, mesh, rank, name, fn, x, *, grad=True, exact=True, extra=(), placements=None) -> None:
    """``fn(x, *extra, generator=g)`` on every placement of ``x`` against the single-process call.

    ``extra``: tensors distributed like ``x`` (residuals). Checks the values, the placements, the generator's
    advance and (``grad``) the gradient of a weighted sum with respect to ``x`` and each extra."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    cw = torch.randn(x.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(7))
    for pl in placements or _placements(x.dim()):
        g, g0, g_own = _gens(rank)
        xs = [x, *extra]
        leaves = [t.detach().clone().requires_grad_(grad) for t in xs]
        want = fn(*leaves, generator=g0)
        fn(*[t.detach() for t in xs], generator=g_own)  # this rank's generator, advanced by a single-process call
        dts = [distribute_tensor(t.detach(), mesh, pl).requires_grad_(grad) for t in xs]
        got = fn(*dts, generator=g)
        label = f"{name} {pl}"
        c.true(f"{label}: result is a DTensor", isinstance(got, DTensor))
        if not isinstance(got, DTensor):
            continue
        c.true(f"{label}: placements {got.placements}", tuple(got.placements) == tuple(pl))
        c.true(f"{label}: generator advanced as in one process", torch.equal(g.get_state(), g_own.get_state()))
        (c.equal if exact else c.close)(f"{label}: value", got.full_tensor(), want.detach())
        if grad:
            (want * cw).sum().backward()
            (got * distribute_tensor(cw, mesh, pl)).sum().backward()
            for i, (leaf, dt) in enumerate(zip(leaves, dts, strict=True)):
                c.close(f"{label}: grad {i}", dt.grad.full_tensor(), leaf.grad, rtol=1e-12, atol=1e-12)


def _check_bitmask(c: Checks, mesh, rank, x, placements, *, transpose=False) -> None:
    """``mask_mode="bitmask"``, forward and backward bit for bit against one process; autograd saves this shard's
    packed mask (``ceil(local numel / 8)`` bytes), not the seed. ``transpose``: the DTensor (and the plain input)
    is a transposed view, so the shards are non-contiguous."""
    from torch.distributed.tensor import distribute_tensor

    view = (lambda t: t.transpose(0, 1)) if transpose else (lambda t: t)  # noqa: E731
    cw = torch.randn(view(x).shape, dtype=x.dtype, generator=torch.Generator().manual_seed(7))
    for pl in placements:
        g, g0, g_own = _gens(rank)
        leaf = x.detach().clone().requires_grad_()
        want = regops.dropout(view(leaf), P, generator=g0, mask_mode="bitmask")
        regops.dropout(view(x), P, generator=g_own, mask_mode="bitmask")
        dt = distribute_tensor(x, mesh, pl).requires_grad_()
        saved: list[torch.Tensor] = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t, saved=saved: saved.append(t) or t, lambda t: t):
            got = regops.dropout(view(dt), P, generator=g, mask_mode="bitmask")
        label = f"bitmask {x.dtype} {pl}{' transposed' if transpose else ''} on {mesh.size()} ranks"
        c.true(f"{label}: generator advanced as in one process", torch.equal(g.get_state(), g_own.get_state()))
        c.equal(f"{label}: value", got.full_tensor(), want.detach())
        c.true(f"{label}: local strides {got.to_local().stride()} vs {got.stride()}", got.to_local().is_contiguous())
        masks = [t for t in saved if t.dtype == torch.uint8]
        n_local = got.to_local().numel()
        c.true(
            f"{label}: saves the local bitmask ({[(t.dtype, tuple(t.shape)) for t in saved]})",
            len(masks) == 1 and masks[0].numel() == (n_local + 7) // 8,
        )
        (want * cw).sum().backward()
        (got * distribute_tensor(cw, mesh, got.placements)).sum().backward()
        c.equal(f"{label}: grad", dt.grad.full_tensor(), leaf.grad)


def _body(rank: int, world: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    c = Checks(rank)
    mesh = init_device_mesh("cpu", (world,))
    data = torch.Generator().manual_seed(1)
    x32 = torch.randn(5, 7, 3, generator=data)  # every dim uneven over 2 ranks
    x64 = x32.double()

    # the bar: dropout of a Shard(0) DTensor, bit for bit; every placement in float64, the Triton kernel
    drop = lambda t, generator: regops.dropout(t, P, generator=generator)  # noqa: E731
    _check_op(c, mesh, rank, "dropout f32", drop, x32, placements=[[Shard(0)], [Replicate()]])
    _check_op(c, mesh, rank, "dropout f64", drop, x64)
    with regops.use_backend("triton"):  # the Triton kernel (interpreted here) on the shards
        _check_op(c, mesh, rank, "dropout triton", drop, x32, placements=[[Shard(1)], [Replicate()]])
    # the mask saved packed: the same values and gradients as one process's bitmask dropout, every placement
    bitmask = lambda t, generator: regops.dropout(t, P, generator=generator, mask_mode="bitmask")  # noqa: E731
    _check_op(c, mesh, rank, "dropout bitmask f32", bitmask, x32, placements=[[Shard(0)], [Shard(2)], [Replicate()]])
    _check_op(c, mesh, rank, "dropout bitmask f64", bitmask, x64)
    _check_bitmask(c, mesh, rank, x32, [[Shard(1)], [Replicate()]])
    _check_bitmask(c, mesh, rank, x32, [[Shard(0)]], transpose=True)
    xd = distribute_tensor(x32, mesh, [Shard(1)])
    out = regops.dropout(xd, P, inplace=True, generator=_gens(0)[1], mask_mode="bitmask")
    c.true("bitmask inplace returns x", out is xd)
    c.equal("bitmask inplace value", xd.full_tensor(), regops.dropout(x32, P, generator=_gens(0)[1]))
    # the default generator: torch.manual_seed(same) on every rank gives the single-process mask
    torch.manual_seed(3)
    want = regops.dropout(x32, P)
    torch.manual_seed(3)
    got = regops.dropout(distribute_tensor(x32, mesh, [Shard(1)]), P)
    c.equal("dropout default generator", got.full_tensor(), want)
    # inplace: x itself holds the result
    xd = distribute_tensor(x32, mesh, [Shard(0)])
    out = regops.dropout(xd, P, inplace=True, generator=_gens(0)[1])
    c.true("inplace returns x", out is xd)
    c.equal("inplace value", xd.full_tensor(), regops.dropout(x32, P, generator=_gens(0)[1]))
    # a 2-D mesh (1 x world): boxes from both mesh dims, the seed broadcast along each
    mesh2 = init_device_mesh("cpu", (1, world), mesh_dim_names=("dp", "tp"))
    two_d = [[Shard(0), Shard(1)], [Replicate(), Shard(2)], [Shard(1), Replicate()]]
    _check_op(c, mesh2, rank, "dropout 2-D mesh", drop, x64, placements=two_d)
    _check_op(c, mesh2, rank, "dropout bitmask 2-D mesh", bitmask, x64, placements=two_d)

    # masks shared along dims, channel dropout, drop path, multi-sample, nested
    shared = lambda t, generator: regops.shared_dropout(t, P, dims=-1, generator=generator)  # noqa: E731
    _check_op(c, mesh, rank, "shared_dropout", shared, x64)
    img = torch.randn(3, 5, 4, 2, dtype=torch.float64, generator=data)
    _check_op(c, mesh, rank, "dropout2d", lambda t, generator: regops.dropout2d(t, P, generator=generator), img)
    _check_op(c, mesh, rank, "drop_path", lambda t, generator: regops.drop_path(t, P, generator=generator), x64)
    res = torch.randn(x64.shape, dtype=torch.float64, generator=data)
    _check_op(
        c, mesh, rank, "drop_path_add",
        lambda t, r, generator: regops.drop_path_add(t, r, P, scale_by_keep=False, generator=generator),
        x64, extra=(res,),
    )  # fmt: skip
    _check_op(
        c, mesh, rank, "multi_sample_dropout",
        lambda t, generator: regops.multi_sample_dropout(t, P, 3, generator=generator), x64,
    )  # fmt: skip
    _check_op(
        c, mesh, rank, "nested_dropout", lambda t, generator: regops.nested_dropout(t, P, 1, generator=generator), x64
    )

    # fused: bias (plain, replicated parameter) + residual; LayerNorm needs whole rows (a last-dim shard is gathered)
    bias = torch.randn(3, dtype=torch.float64, generator=data)
    bda = lambda t, r, generator: regops.bias_dropout_add(t, bias, r, P, generator=generator)  # noqa: E731
    _check_op(c, mesh, rank, "bias_dropout_add", bda, x64, extra=(res,))
    weight = torch.randn(3, dtype=torch.float64, generator=data)
    daln = lambda t, r, generator: regops.dropout_add_layer_norm(t, r, weight, bias, P, generator=generator)  # noqa: E731
    _check_op(c, mesh, rank, "dropout_add_layer_norm", daln, x64, extra=(res,), exact=False)

    # parameter gradients (bias / weight summed over the ranks holding other rows)
    for pl in ([Shard(0)], [Shard(2)], [Replicate()]):
        for fn in ("bda", "daln"):
            b0, w0 = bias.clone().requires_grad_(), weight.clone().requires_grad_()
            b1, w1 = bias.clone().requires_grad_(), weight.clone().requires_grad_()
            if fn == "bda":
                want = regops.bias_dropout_add(x64, b0, res, P, generator=_gens(0)[1])
                got = regops.bias_dropout_add(
                    distribute_tensor(x64, mesh, pl), b1, distribute_tensor(res, mesh, pl), P, generator=_gens(0)[1]
                )
                params = ((b0, b1),)
            else:
                want = regops.dropout_add_layer_norm(x64, res, w0, b0, P, generator=_gens(0)[1])
                got = regops.dropout_add_layer_norm(
                    distribute_tensor(x64, mesh, pl), distribute_tensor(res, mesh, pl), w1, b1, P, generator=_gens(0)[1]
                )
                params = ((b0, b1), (w0, w1))
            (want * x64).sum().backward()
            (got * distribute_tensor(x64, mesh, pl)).sum().backward()
            for i, (ref, mine) in enumerate(params):
                c.close(f"{fn} {pl} parameter grad {i}", mine.grad, ref.grad, rtol=1e-12, atol=1e-12)

    # composes with torch's DTensor ops
    out = F.relu(regops.dropout(distribute_tensor(x64, mesh, [Shard(0)]), P, generator=_gens(0)[1]))
    c.equal("composes with torch ops", out.full_tensor(), F.relu(regops.dropout(x64, P, generator=_gens(0)[1])))

    # clear errors
    for name, call in (
        ("plain residual", lambda: regops.bias_dropout_add(distribute_tensor(x64, mesh, [Shard(0)]), None, res, P)),
    ):
        try:
            call()
            c.failures.append(f"{name}: no error")
        except (NotImplementedError, TypeError) as exc:
            c.true(f"{name}: message names regops", "regops" in str(exc))
    c.done()


def test_dropout_family_on_dtensors_two_processes():
    run(_body, 2)


def _three_ranks_body(rank: int, world: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard

    c = Checks(rank)
    mesh = init_device_mesh("cpu", (world,))
    x = torch.randn(7, 5, 4, generator=torch.Generator().manual_seed(2))  # 7 and 5 split 3/3/1 and 2/2/1
    _check_bitmask(c, mesh, rank, x, [[Shard(0)], [Shard(1)], [Replicate()]])
    _check_bitmask(c, mesh, rank, x, [[Shard(1)]], transpose=True)
    with regops.use_backend("triton"):
        _check_bitmask(c, mesh, rank, x, [[Shard(1)]])
    c.done()


def test_bitmask_dropout_on_dtensors_three_processes():
    """mask_mode="bitmask" on 3 ranks: uneven and non-contiguous shards, replicas, the Triton kernels."""
    run(_three_ranks_body, 3)
