"""Per-example norms and DP clipping under FSDP2 over tensor parallelism (gloo, 4 processes on CPU, one process
group for every check): ``parallelize_module`` (ColwiseParallel / RowwiseParallel Linear pairs) on the tp dim of a
2 x 2 ``(dp, tp)`` mesh, then ``fully_shard`` on its dp dim, so weights both shard on one dim are ``_StridedShard``;
each dp rank holds its own examples (the tp ranks of one dp rank the same ones). Norms (total and per parameter)
and noised clipped sums (micro-batches, an MLP and a transformer encoder block) equal one process on the
concatenated batch within float64 rounding, each rank holding FSDP2's shard; the generator advances as in one
process; the noise alone (a step with no forward) is the single-process noise bit for bit. HSDP over tensor
parallelism (a 3-D mesh) too."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import regops
from regops.testing import dp_noise, tolerance
from tests.dist_harness import Checks, run
from tests.grad_norms.test_dtensor import _fsdp_over_tp_checks

DP, TP = 2, 2
LOCAL = 4
TOL = tolerance(torch.float64)
PLAN = ("0", "2", "4", "6")  # Colwise, Rowwise, Colwise, Rowwise


def _mlp() -> nn.Module:
    """Two Colwise + Rowwise pairs with a LayerNorm (replicated over tp) between them; 10 and 4 hidden units:
    10 splits 5 / 5 over tp, then 3 / 2 over dp (uneven FSDP2 shards of the tp blocks)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 6), nn.LayerNorm(6), nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3)
    ).double()


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(DP * LOCAL, 6, dtype=torch.float64, generator=g), torch.randint(0, 3, (DP * LOCAL,), generator=g)


def _sharded(mesh, dp_mesh) -> nn.Module:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    model = _mlp()
    plans = [ColwiseParallel(), RowwiseParallel(), ColwiseParallel(), RowwiseParallel()]
    parallelize_module(model, mesh["tp"], dict(zip(PLAN, plans, strict=True)))
    for layer in model:
        if isinstance(layer, (nn.Linear, nn.LayerNorm)):
            fully_shard(layer, mesh=dp_mesh)
    return fully_shard(model, mesh=dp_mesh)


class _Block(nn.Module):
    """A pre-norm transformer encoder block written for tensor parallelism: q, k, v and the first feed-forward
    Linear column-parallel (each tp rank its heads / hidden units), the output projection and the second
    feed-forward Linear row-parallel; LayerNorms replicated."""

    def __init__(self, d: int = 8, heads: int = 2, hidden: int = 12) -> None:
        super().__init__()
        self.head_dim = d // heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.ff1, self.ff2 = nn.Linear(d, hidden), nn.Linear(hidden, d)

    def forward(self, x):
        b, t, _ = x.shape
        h = self.ln1(x)
        q, k, v = (f(h).view(b, t, -1, self.head_dim).transpose(1, 2) for f in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, -1)
        x = x + self.o(a)
        return x + self.ff2(F.gelu(self.ff1(self.ln2(x))))


def _block() -> nn.Module:
    torch.manual_seed(0)
    return _Block().double()


def _sharded_block(mesh) -> nn.Module:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    model = _block()
    plan = {n: ColwiseParallel() for n in ("q", "k", "v", "ff1")} | {n: RowwiseParallel() for n in ("o", "ff2")}
    parallelize_module(model, mesh["tp"], plan)
    return fully_shard(model, mesh=mesh["dp"])


def _block_checks(c: Checks, mesh, rank: int, dp: int) -> None:
    """The encoder block: norms and noised clipping equal one process on the concatenated batches."""
    x = torch.randn(DP * 3, 5, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    mine = slice(dp * 3, (dp + 1) * 3)
    model, ref = _sharded_block(mesh), _block()
    with regops.per_sample_grad_norms(model, "mean") as norms:
        model(x[mine]).square().mean().backward()
    with regops.per_sample_grad_norms(ref, "mean") as ref_norms:
        ref(x).square().mean().backward()
    c.true("block: the layers' rules, no torch.func fallback", not any(mb.fallback for mb in norms._rec.mbs))
    c.close("block norms total", norms.total, ref_norms.total[mine], **TOL)
    for name, want in ref_norms.per_param.items():
        c.close(f"block norms {name}", norms.per_param[name], want[mine], **TOL)
    model, ref = _sharded_block(mesh), _block()
    gen = torch.Generator().manual_seed(5 + 1000 * rank)
    with regops.dp_clipping(model, 0.05, loss_reduction="mean", noise_multiplier=1.3, generator=gen):
        model(x[mine]).square().mean().backward()
    gen = torch.Generator().manual_seed(5)
    with regops.dp_clipping(ref, 0.05, loss_reduction="mean", noise_multiplier=1.3, generator=gen):
        ref(x).square().mean().backward()
    _check_grads(c, "block dp_clipping", model, ref)


def _check_grads(c: Checks, label: str, model: nn.Module, ref: nn.Module, exact: bool = False) -> None:
    from torch.distributed.tensor import DTensor

    want = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        g = p.grad
        ok = isinstance(g, DTensor) and g.placements == p.placements and g.to_local().shape == p.to_local().shape
        c.true(f"{label} {name}: the gradient is laid out like the parameter", ok)
        if ok:
            if exact:
                c.equal(f"{label} {name}", g.full_tensor(), want[name].grad)
            else:
                c.close(f"{label} {name}", g.full_tensor(), want[name].grad, **TOL)


def _hsdp_checks(c: Checks, rank: int, x: torch.Tensor, y: torch.Tensor) -> None:
    """HSDP over tensor parallelism (a 3-D ``(replicate, shard, tp)`` mesh, FSDP2's dims first): each replica
    group its own examples; norms and noised clipping equal one process, gradients laid out like the parameters."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (DP, 1, TP), mesh_dim_names=("rep", "shard", "tp"))
    rep = mesh["rep"].get_local_rank()
    mine = slice(rep * LOCAL, (rep + 1) * LOCAL)
    model, ref = _sharded(mesh, mesh["rep", "shard"]), _mlp()
    c.true(f"HSDP over TP: a 3-D layout ({model[0].weight.placements})", model[0].weight.device_mesh.ndim == 3)
    with regops.per_sample_grad_norms(model, "mean") as norms:
        F.cross_entropy(model(x[mine]), y[mine]).backward()
    with regops.per_sample_grad_norms(ref, "mean") as ref_norms:
        F.cross_entropy(ref(x), y).backward()
    c.close("HSDP over TP norms", norms.total, ref_norms.total[mine], **TOL)
    model, ref = _sharded(mesh, mesh["rep", "shard"]), _mlp()
    gen = torch.Generator().manual_seed(5 + 1000 * rank)
    with regops.dp_clipping(model, 0.4, loss_reduction="mean", noise_multiplier=1.3, generator=gen):
        F.cross_entropy(model(x[mine]), y[mine]).backward()
    gen = torch.Generator().manual_seed(5)
    with regops.dp_clipping(ref, 0.4, loss_reduction="mean", noise_multiplier=1.3, generator=gen):
        F.cross_entropy(ref(x), y).backward()
    _check_grads(c, "HSDP over TP dp_clipping", model, ref)


def _body(rank: int, world: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.placement_types import _StridedShard

    c = Checks(rank)
    mesh = init_device_mesh("cpu", (DP, TP), mesh_dim_names=("dp", "tp"))
    dp = mesh["dp"].get_local_rank()
    x, y = _data()
    mine = slice(dp * LOCAL, (dp + 1) * LOCAL)

    # norms: the tp-local blocks' partial norms summed over tp only, each dp rank its own examples
    model = _sharded(mesh, mesh["dp"])
    strided = [n for n, p in model.named_parameters() if isinstance(p.placements[0], _StridedShard)]
    c.true(f"the layout has _StridedShard weights ({strided})", "0.weight" in strided and "4.bias" in strided)
    with regops.per_sample_grad_norms(model, "mean") as norms:
        F.cross_entropy(model(x[mine]), y[mine]).backward()
    ref = _mlp()
    with regops.per_sample_grad_norms(ref, "mean") as ref_norms:
        F.cross_entropy(ref(x), y).backward()
    c.close("norms total", norms.total, ref_norms.total[mine], **TOL)
    for name, want in ref_norms.per_param.items():
        c.close(f"norms {name}", norms.per_param[name], want[mine], **TOL)

    # noised clipping (rank 0's generator decides), with micro-batches: one process on the concatenated batch
    for sigma, micro in ((1.3, 1), (1.3, 2)):
        model, ref = _sharded(mesh, mesh["dp"]), _mlp()
        gen = torch.Generator().manual_seed(5 + 1000 * rank)
        with regops.dp_clipping(model, 0.4, loss_reduction="mean", noise_multiplier=sigma, generator=gen):
            for xs, ys in zip(x[mine].chunk(micro), y[mine].chunk(micro), strict=True):
                F.cross_entropy(model(xs), ys).backward()
        with regops.dp_clipping(
            ref, 0.4, loss_reduction="mean", noise_multiplier=sigma, generator=torch.Generator().manual_seed(5)
        ):
            for xs, ys in zip(x.chunk(DP * micro), y.chunk(DP * micro), strict=True):
                F.cross_entropy(ref(xs), ys).backward()
        _check_grads(c, f"dp_clipping sigma={sigma} micro={micro}", model, ref)
        own = torch.Generator().manual_seed(5 + 1000 * rank)
        dp_noise([p.shape for p in ref.parameters()], own)
        c.true("the generator advanced by one noise draw", torch.equal(gen.get_state(), own.get_state()))

    # the noise alone (an empty step), bit for bit: each rank draws FSDP2's shard of the tp block at its global
    # offset; the mean over dp divides it by 2 (exact), as one process with noise_multiplier / 2
    model, ref = _sharded(mesh, mesh["dp"]), _mlp()
    gen = torch.Generator().manual_seed(9 + 1000 * rank)
    with regops.dp_clipping(
        model, 0.4, loss_reduction="mean", noise_multiplier=1.3, expected_batch_size=8, generator=gen
    ):
        pass
    with regops.dp_clipping(
        ref, 0.4, loss_reduction="mean", noise_multiplier=1.3 / DP, expected_batch_size=8,
        generator=torch.Generator().manual_seed(9),
    ):  # fmt: skip
        pass
    _check_grads(c, "the noise of an empty step", model, ref, exact=True)

    _block_checks(c, mesh, rank, dp)

    _hsdp_checks(c, rank, x, y)
    _fsdp_over_tp_checks(c, rank, world, ((DP, TP),))  # the shared MLP, its LayerNorm after a gathered Colwise
    c.done()


def test_fsdp2_over_tensor_parallel_norms_and_clipping_four_processes():
    run(_body, DP * TP)
