"""Vocabulary-parallel ``regops.cross_entropy`` (gloo, 2 and 3 processes on CPU, float64): logits sharded over the
class dim (uneven shards: V = 7 over 2 and 3 ranks) give ``F.cross_entropy``'s loss and gradient on the full
logits (``regops.cross_entropy``'s for the options torch lacks); the gradient is a DTensor with the logits'
placements; logits sharded over the rows too (7 rows over 2 and 3 ranks, 2-D meshes) take the whole batch's targets;
no rank holds a tensor of the full logits' size; what is not supported raises."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import regops
from tests.dist_harness import Checks, run

N, V = 6, 7
# float64, a few terms per row: the sharded sums differ from the single-process ones by rounding only
TOL = dict(rtol=1e-12, atol=1e-12)


def _data(shape, seed: int) -> torch.Tensor:
    return torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) * 3


def _labels(shape, seed: int) -> torch.Tensor:
    y = torch.randint(0, V, shape, generator=torch.Generator().manual_seed(seed))
    y.view(-1)[1::4] = -100
    return y


def _compare(c: Checks, mesh, label: str, x: torch.Tensor, class_dim: int, ours, want, placements=None):
    """``ours(logits)`` on ``x`` sharded over ``class_dim`` vs ``want(logits)`` on the full ``x``: loss and grad."""
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    placements = placements or [Shard(class_dim)]
    xd = distribute_tensor(x, mesh, placements).requires_grad_()
    loss = ours(xd)
    xr = x.clone().requires_grad_()
    ref = want(xr)
    up = _data(ref.shape, 99) if ref.dim() else torch.tensor(1.0, dtype=torch.float64)
    if isinstance(loss, DTensor):  # reduction="none" of logits sharded over dim 0: the rows, sharded likewise
        rows_placed = [Shard(0) if p == Shard(0) else Replicate() for p in placements]
        c.true(f"{label}: per-row losses placed like the rows", tuple(loss.placements) == tuple(rows_placed))
        loss = loss.full_tensor()
    else:
        c.true(f"{label}: the loss is a plain tensor", type(loss) is torch.Tensor)
    c.close(f"{label} loss", loss, ref, **TOL)
    (loss * up).sum().backward()
    (ref * up).sum().backward()
    ok = isinstance(xd.grad, DTensor) and tuple(xd.grad.placements) == tuple(placements)
    c.true(f"{label}: the gradient is a DTensor placed like the logits, got {type(xd.grad)}", ok)
    if ok:
        c.close(f"{label} grad", xd.grad.full_tensor(), xr.grad, **TOL)


def _torch_cases(c: Checks, mesh) -> None:
    x, y = _data((N, V), 1), _labels((N,), 2)
    w = torch.rand(V, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) + 0.5
    options = [
        {},
        {"weight": w},
        {"label_smoothing": 0.2},
        {"weight": w, "label_smoothing": 0.3},
    ]
    for reduction in ("none", "mean", "sum"):
        for kw in options:
            kw = {**kw, "reduction": reduction}
            _compare(
                c, mesh, f"[N, V] {sorted(kw)} {reduction}", x, 1,
                lambda t, kw=kw: regops.cross_entropy(t, y, **kw), lambda t, kw=kw: F.cross_entropy(t, y, **kw),
            )  # fmt: skip
    # [B, V, T] (F.cross_entropy's class dim 1) and [B, T, V] with class_dim=-1
    x3, y3 = _data((2, V, 3), 4), _labels((2, 3), 5)
    for reduction in ("none", "mean"):
        _compare(
            c, mesh, f"[B, V, T] {reduction}", x3, 1,
            lambda t, r=reduction: regops.cross_entropy(t, y3, reduction=r, label_smoothing=0.1, weight=w),
            lambda t, r=reduction: F.cross_entropy(t, y3, reduction=r, label_smoothing=0.1, weight=w),
        )  # fmt: skip
    xl = _data((2, 3, V), 6)
    _compare(
        c, mesh, "[B, T, V] class_dim=-1", xl, 2,
        lambda t: regops.cross_entropy(t, y3, class_dim=-1, label_smoothing=0.1),
        lambda t: F.cross_entropy(t.flatten(0, 1), y3.flatten(), label_smoothing=0.1),
    )  # fmt: skip


def _regops_cases(c: Checks, mesh) -> None:
    """Options F.cross_entropy lacks: against regops.cross_entropy on the full logits."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    x, y = _data((N, V), 7), _labels((N,), 8)
    w = torch.rand(V, dtype=torch.float64, generator=torch.Generator().manual_seed(9)) + 0.5
    tw = torch.rand(N, dtype=torch.float64, generator=torch.Generator().manual_seed(10))
    idx = torch.randint(0, V, (N, 3), generator=torch.Generator().manual_seed(11))
    probs = torch.rand(N, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(12)).softmax(1)
    wd = distribute_tensor(w, mesh, [Shard(0)])
    labels = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(18))
    _, mix = regops.mix_batch(
        torch.zeros(N, 2), labels, mixup_alpha=1.0, mode="elem", generator=torch.Generator().manual_seed(19)
    )
    cases = {
        "z_loss": ({"z_loss": 1e-2}, y),
        "maxsup": ({"maxsup": 0.2, "weight": w}, y),
        "confidence": ({"confidence_penalty": 0.3, "label_smoothing": 0.1}, y),
        "scale+softcap": ({"logit_scale": 0.7, "softcap": 3.0, "z_loss": 1e-3}, y),
        "scale": ({"logit_scale": 1.5}, y),
        "token_weight": ({"token_weight": tw, "weight": w, "label_smoothing": 0.2}, y),
        "sparse targets": ({"weight": w, "label_smoothing": 0.1, "z_loss": 1e-2}, (idx, probs)),
        "mix": ({"mix": mix, "label_smoothing": 0.1, "z_loss": 1e-2, "weight": w}, None),
        "everything": (
            {"weight": w, "label_smoothing": 0.1, "maxsup": 0.1, "z_loss": 1e-2, "confidence_penalty": 0.2},
            y,
        ),
    }
    for name, (kw, target) in cases.items():
        for reduction in ("none", "mean"):
            kw = {**kw, "reduction": reduction}
            _compare(
                c, mesh, f"{name} {reduction}", x, 1,
                lambda t, kw=kw, tg=target: regops.cross_entropy(t, tg, **kw),
                lambda t, kw=kw, tg=target: regops.cross_entropy(t, tg, **kw),
            )  # fmt: skip
    # class weights sharded like the classes; replicated logits (every rank computes the whole loss)
    _compare(
        c, mesh, "DTensor weight", x, 1,
        lambda t: regops.cross_entropy(t, y, weight=wd, label_smoothing=0.2),
        lambda t: F.cross_entropy(t, y, weight=w, label_smoothing=0.2),
    )  # fmt: skip
    _compare(
        c, mesh, "Replicate logits", x, 1,
        lambda t: regops.cross_entropy(t, y, label_smoothing=0.2, maxsup=0.1),
        lambda t: regops.cross_entropy(t, y, label_smoothing=0.2, maxsup=0.1),
        placements=[Replicate()],
    )  # fmt: skip
    # more ranks than some shards have columns: V = 2 over 3 ranks leaves one rank without a column
    x2, y2 = _data((N, 2), 13), torch.tensor([0, 1, 1, 0, -100, 1])
    _compare(
        c, mesh, "V=2", x2, 1,
        lambda t: regops.cross_entropy(t, y2, label_smoothing=0.2, maxsup=0.1),
        lambda t: regops.cross_entropy(t, y2, label_smoothing=0.2, maxsup=0.1),
    )  # fmt: skip


def _row_cases(c: Checks, mesh, world: int) -> None:
    """Logits sharded over the rows (alone, or with the classes on a second mesh dim): targets of the whole batch."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard

    x, y = _data((N + 1, V), 20), _labels((N + 1,), 21)  # 7 rows: uneven over 2 and 3 ranks
    w = torch.rand(V, dtype=torch.float64, generator=torch.Generator().manual_seed(22)) + 0.5
    for reduction in ("none", "mean", "sum"):
        kw = {"reduction": reduction, "weight": w, "label_smoothing": 0.2}
        _compare(
            c, mesh, f"Shard(0) {reduction}", x, 0,
            lambda t, kw=kw: regops.cross_entropy(t, y, **kw), lambda t, kw=kw: F.cross_entropy(t, y, **kw),
        )  # fmt: skip
    x3, y3 = _data((2, V, 3), 23), _labels((2, 3), 24)  # 2 samples over 3 ranks: one rank has no row
    _compare(
        c, mesh, "[B, V, T] Shard(0)", x3, 0,
        lambda t: regops.cross_entropy(t, y3, z_loss=1e-2), lambda t: regops.cross_entropy(t, y3, z_loss=1e-2),
    )  # fmt: skip
    tw = torch.rand(N + 1, dtype=torch.float64, generator=torch.Generator().manual_seed(25))
    kw = {"weight": w, "label_smoothing": 0.1, "maxsup": 0.1, "z_loss": 1e-2, "token_weight": tw}
    for shape in ((world, 1), (1, world)):
        mesh2 = init_device_mesh("cpu", shape)
        for reduction in ("none", "mean"):
            _compare(
                c, mesh2, f"2-D mesh {shape} {reduction}", x, 1,
                lambda t, r=reduction: regops.cross_entropy(t, y, reduction=r, **kw),
                lambda t, r=reduction: regops.cross_entropy(t, y, reduction=r, **kw),
                placements=[Shard(0), Shard(1)],
            )  # fmt: skip
        _compare(
            c, mesh2, f"2-D mesh {shape} classes only", x, 1,
            lambda t: regops.cross_entropy(t, y, **kw), lambda t: regops.cross_entropy(t, y, **kw),
            placements=[Replicate(), Shard(1)],
        )  # fmt: skip


def _local_only(c: Checks, mesh, world: int) -> None:
    """Every plain tensor any op produces during forward and backward is smaller than the full logits."""
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    n, v = 8, 96
    sizes: list[int] = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            sizes.extend(t.numel() for t in tree_leaves(out) if type(t) is torch.Tensor)
            return out

    xd = distribute_tensor(_data((n, v), 14), mesh, [Shard(1)]).requires_grad_()
    y = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(15))
    with Record():
        regops.cross_entropy(xd, y, label_smoothing=0.1, z_loss=1e-3).backward()
    c.true(f"largest local tensor {max(sizes)} is the shard's {n * v // world}", max(sizes) == n * v // world)
    c.true("the gradient is sharded", isinstance(xd.grad, DTensor))


def _refusals(c: Checks, mesh, world: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Shard, distribute_tensor

    x, y = _data((N, V), 16), _labels((N,), 17)
    xd = distribute_tensor(x, mesh, [Shard(1)])
    mesh2 = init_device_mesh("cpu", (1, world))
    cases = [
        ("Partial", DTensor.from_local(x, mesh, [Partial()]), {}, "Partial"),
        ("2-D mesh both", distribute_tensor(x, mesh2, [Shard(1), Shard(1)]), {}, "one mesh dim"),
        ("return_stats", xd, {"return_stats": True}, "return_stats"),
        ("decoupled", xd, {"decoupled": 0.1}, "decoupled"),
    ]
    for name, logits, kw, match in cases:
        try:
            regops.cross_entropy(logits, y, **kw)
        except NotImplementedError as exc:
            c.true(f"{name}: message {exc}", match in str(exc))
        else:
            c.true(f"{name}: no NotImplementedError", False)


def _body(rank: int, world: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    c = Checks(rank)
    _torch_cases(c, mesh)
    _regops_cases(c, mesh)
    _row_cases(c, mesh, world)
    _local_only(c, mesh, world)
    _refusals(c, mesh, world)
    c.done()


@pytest.mark.parametrize("world", [2, 3])
def test_vocab_parallel_cross_entropy(world):
    run(_body, world)


def _linear_body(rank: int, world: int) -> None:
    """Vocabulary-parallel ``linear_cross_entropy``: the classifier's rows sharded (V = 7 over 2 and 3 ranks),
    hidden plain or a Replicate() DTensor, in one block and in blocks of 2 rows; against the single-process form
    and ``F.cross_entropy`` of the full logits."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    from regops.losses import dtensor as losses_dtensor

    mesh = init_device_mesh("cpu", (world,))
    c = Checks(rank)
    hid = 5
    h, y = _data((2, 3, hid), 30), _labels((2, 3), 31)
    w, b = _data((V, hid), 32), _data((V,), 33)
    cw = torch.rand(V, dtype=torch.float64, generator=torch.Generator().manual_seed(34)) + 0.5
    cases = {
        "plain": {},
        "smoothing + class weight": {"label_smoothing": 0.2, "class_weight": cw},
        "everything": {"label_smoothing": 0.1, "maxsup": 0.1, "z_loss": 1e-2, "confidence_penalty": 0.2},
        "softcap": {"logit_scale": 0.7, "softcap": 3.0},
    }
    for block in (losses_dtensor.BLOCK_NUMBERS, 2 * V):
        losses_dtensor.BLOCK_NUMBERS = block
        for name, kw in cases.items():
            for reduction in ("none", "mean", "sum"):
                label = f"{name} {reduction} block {block}"
                wd = distribute_tensor(w, mesh, [Shard(0)]).requires_grad_()
                bd = distribute_tensor(b, mesh, [Shard(0)]).requires_grad_()
                hd = h.clone().requires_grad_()
                loss = regops.linear_cross_entropy(hd, wd, y, bd, reduction=reduction, **kw)
                hr, wr, br = (t.clone().requires_grad_() for t in (h, w, b))
                ref = regops.linear_cross_entropy(hr, wr, y, br, reduction=reduction, **kw)
                c.true(f"{label}: a plain loss", type(loss) is torch.Tensor)
                c.close(f"{label} loss", loss, ref, **TOL)
                up = _data(ref.shape, 35) if ref.dim() else torch.tensor(1.5, dtype=torch.float64)
                (loss * up).sum().backward()
                (ref * up).sum().backward()
                c.close(f"{label} d hidden", hd.grad, hr.grad, **TOL)
                ok = isinstance(wd.grad, DTensor) and tuple(wd.grad.placements) == (Shard(0),)
                c.true(f"{label}: d weight sharded like the weight", ok)
                if ok:
                    c.close(f"{label} d weight", wd.grad.full_tensor(), wr.grad, **TOL)
                    c.close(f"{label} d bias", bd.grad.full_tensor(), br.grad, **TOL)
    losses_dtensor.BLOCK_NUMBERS = 1 << 24
    # an LM head under ColwiseParallel, hidden a Replicate() DTensor, against F.cross_entropy of the full logits
    head = torch.nn.Linear(hid, V, dtype=torch.float64)
    with torch.no_grad():
        head.weight.copy_(w)
        head.bias.copy_(b)
    parallelize_module(head, mesh, ColwiseParallel())
    hd = distribute_tensor(h, mesh, [Replicate()]).requires_grad_()
    loss = regops.linear_cross_entropy(hd, head.weight, y, head.bias, label_smoothing=0.1)
    hr, wr, br = (t.clone().requires_grad_() for t in (h, w, b))
    ref = F.cross_entropy((hr @ wr.T + br).flatten(0, 1), y.flatten(), label_smoothing=0.1)
    c.close("ColwiseParallel loss", loss, ref, **TOL)
    loss.backward()
    ref.backward()
    c.true("d hidden a replicated DTensor", isinstance(hd.grad, DTensor) and hd.grad.placements == (Replicate(),))
    c.close("ColwiseParallel d hidden", hd.grad.full_tensor(), hr.grad, **TOL)
    c.close("ColwiseParallel d weight", head.weight.grad.full_tensor(), wr.grad, **TOL)
    c.close("ColwiseParallel d bias", head.bias.grad.full_tensor(), br.grad, **TOL)
    # refusals
    wd = distribute_tensor(w, mesh, [Shard(1)])
    for name, args, kw, exc, match in [
        ("Shard(1) weight", (h, wd, y), {}, NotImplementedError, "Shard(0)"),
        ("plain weight", (distribute_tensor(h, mesh, [Replicate()]), w, y), {}, NotImplementedError, "plain weight"),
        ("return_stats", (h, distribute_tensor(w, mesh, [Shard(0)]), y), {"return_stats": True},
         NotImplementedError, "return_stats"),
        ("plain bias", (h, distribute_tensor(w, mesh, [Shard(0)]), y, b), {}, ValueError, "bias"),
    ]:  # fmt: skip
        try:
            regops.linear_cross_entropy(*args, **kw)
        except exc as e:
            c.true(f"{name}: message {e}", match in str(e))
        else:
            c.true(f"{name}: no {exc.__name__}", False)
    c.done()


@pytest.mark.parametrize("world", [2, 3])
def test_vocab_parallel_linear_cross_entropy(world):
    run(_linear_body, world)
