"""Hessian estimates of a model under FSDP2 from its own sharded gradients (gloo, 2 and 3 processes on CPU): the
default ``hvp`` runs central differences of the reduce-scattered gradients, each rank moving only its shards, and
gives the single-process ``hvp="finite_difference"`` estimate on the concatenated batch with the same generator:
the same probes bit for bit, values within the float64 rounding of the two gradient computations divided by the
step. Uneven shards (rows 8, 5 and 2 over 3 ranks: one rank holds none of the last layer), a frozen parameter,
the user's gradients and parameters untouched, ``tol``, ``probes=``, ``fd_eps=`` and the sketches."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import regops
from regops.hessian._hvp import default_fd_step
from tests.dist_harness import Checks, run

LOCAL = 4
PROBES = 5
# Both sides difference gradients that agree to the rounding of their sums (float64, a few hundred terms of O(1)
# each: <= 256 eps relative); the central difference divides that by the step h (6.1e-6): a bound on H v and on
# every dot and diagonal entry built from it (all O(1) here).
H = default_fd_step([torch.zeros((), dtype=torch.float64)])
RTOL = 256 * torch.finfo(torch.float64).eps / H


def _model(frozen: bool = False) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(6, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 5), nn.Tanh(), nn.Linear(5, 2)
    ).double()
    if frozen:
        model[1].weight.requires_grad_(False)
    return model


def _data(n: int):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 6, dtype=torch.float64, generator=g), torch.randint(0, 2, (n,), generator=g)


def _sharded(frozen: bool = False) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    model = _model(frozen)
    for layer in model:
        if isinstance(layer, (nn.Linear, nn.LayerNorm)):
            fully_shard(layer)
    return fully_shard(model)


def _gen(seed: int = 3) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _body(rank: int, world: int) -> None:
    from torch.distributed.tensor import DTensor

    c = Checks(rank)
    x, y = _data(world * LOCAL)
    mine = slice(rank * LOCAL, (rank + 1) * LOCAL)
    loss = nn.CrossEntropyLoss()
    model = _sharded()
    F.cross_entropy(model(x[mine]), y[mine]).backward()  # the user's gradients, to be left as they are
    grads = {n: p.grad for n, p in model.named_parameters()}
    grad_values = {n: g.to_local().clone() for n, g in grads.items()}
    values = {n: p.to_local().clone() for n, p in model.named_parameters()}

    def single(fn, frozen=False, **kw):
        return fn(_model(frozen), loss, x, y, hvp="finite_difference", **kw)

    # trace: rank 1's generator differs (rank 0's seed wins) and advances as in one process
    gen = _gen(3 + 100 * rank)
    got = regops.hessian.trace(model, loss, x[mine], y[mine], num_probes=PROBES, generator=gen)
    want = single(regops.hessian.trace, num_probes=PROBES, generator=_gen())
    c.close("trace samples", got.samples, want.samples, rtol=RTOL, atol=RTOL)
    c.close("trace", torch.tensor(got.value), torch.tensor(want.value), rtol=RTOL, atol=RTOL)
    c.true(f"trace engine {got.engine}", got.engine == "finite_difference" and got.num_matvecs == PROBES)
    c.true(f"fd_error {got.fd_error} vs {want.fd_error}", got.fd_error is not None and got.fd_error < 1e-6)
    own = _gen(3 + 100 * rank)
    regops.hessian.probes(_model(), PROBES, generator=own)
    c.true("generator advanced as in one process", torch.equal(gen.get_state(), own.get_state()))

    # the user's gradients (the same objects, the same values) and the parameters, bit for bit
    for n, p in model.named_parameters():
        c.true(f"{n}: the user's gradient object", p.grad is grads[n])
        c.equal(f"{n}: the user's gradient", p.grad.to_local(), grad_values[n])
        c.equal(f"{n}: restored", p.to_local(), values[n])

    # the same probes as one process, bit for bit: the user's full-size probes give the same samples exactly
    full = regops.hessian.probes(_model(), PROBES, generator=_gen())
    mine_probes = regops.hessian.trace(model, loss, x[mine], y[mine], probes=list(full))
    c.equal("probes= vs the generator's probes", mine_probes.samples, got.samples)
    flat = torch.cat([v.reshape(PROBES, -1) for v in full], 1)
    mine_flat = regops.hessian.trace(model, loss, x[mine], y[mine], probes=flat)
    c.equal("probes= [K, N]", mine_flat.samples, got.samples)

    # by module, fd_eps, diagonal (DTensors laid out like the parameters, uneven and empty shards)
    got = regops.hessian.trace(model, loss, x[mine], y[mine], num_probes=PROBES, generator=_gen(), by="module")
    want = single(regops.hessian.trace, num_probes=PROBES, generator=_gen(), by="module")
    c.true("by module: keys", set(got) == set(want))
    for key in want:
        c.close(f"by module {key}", torch.tensor(got[key].value), torch.tensor(want[key].value), rtol=RTOL, atol=RTOL)
    got = regops.hessian.trace(model, loss, x[mine], y[mine], num_probes=3, generator=_gen(), fd_eps=1e-4)
    want = single(regops.hessian.trace, num_probes=3, generator=_gen(), fd_eps=1e-4)
    rtol_eps = 256 * torch.finfo(torch.float64).eps / 1e-4
    c.close("fd_eps", got.samples, want.samples, rtol=rtol_eps, atol=rtol_eps)
    got = regops.hessian.diagonal(model, loss, x[mine], y[mine], num_probes=PROBES, generator=_gen())
    want = single(regops.hessian.diagonal, num_probes=PROBES, generator=_gen())
    params = dict(model.named_parameters())
    for name in want.value:
        v, e = got.value[name], got.stderr[name]
        ok = isinstance(v, DTensor) and v.placements == params[name].placements and v.shape == params[name].shape
        c.true(f"diagonal {name}: laid out like the parameter", ok)
        if ok:
            c.close(f"diagonal {name}", v.full_tensor(), want.value[name], rtol=RTOL, atol=RTOL)
            # the stderr is a difference of sums of squares: the values' rounding, relative to |v*Hv|
            c.close(f"diagonal stderr {name}", e.full_tensor(), want.stderr[name], rtol=RTOL, atol=8 * RTOL)
    c.close("diagonal trace", got.trace.samples, want.trace.samples, rtol=RTOL, atol=RTOL)

    # tol: blocks of probe_batch probes, the same stopping point as one process
    for fn, tol in ((regops.hessian.trace, 0.2), (regops.hessian.diagonal, 0.5)):
        kw = dict(num_probes=200, probe_batch=3, tol=tol)
        got = fn(model, loss, x[mine], y[mine], generator=_gen(7), **kw)
        want = single(fn, generator=_gen(7), **kw)
        got_tr, want_tr = (got, want) if fn is regops.hessian.trace else (got.trace, want.trace)
        c.true(f"{fn.__name__} tol: {got_tr.num_matvecs} probes", got_tr.num_matvecs == want_tr.num_matvecs < 200)
        c.close(f"{fn.__name__} tol", got_tr.samples, want_tr.samples, rtol=RTOL, atol=RTOL)

    # Hutch++ and XTrace on sharded products, below and at the probe cap
    for method, m in (("hutch++", 9), ("xtrace", 8)):
        got = regops.hessian.trace(model, loss, x[mine], y[mine], num_probes=m, method=method, generator=_gen())
        want = single(regops.hessian.trace, num_probes=m, method=method, generator=_gen())
        c.close(f"{method} {m}", torch.tensor(got.value), torch.tensor(want.value), rtol=1e3 * RTOL, atol=1e3 * RTOL)
        c.true(f"{method}: products", (got.num_matvecs, got.engine) == (want.num_matvecs, "finite_difference"))

    # a loader: two batches per rank (the mean over the ranks of each rank's batch-weighted mean: the concatenated
    # batch); ranks that give different numbers of batches are refused on every rank
    halves = [(x[mine][:2], y[mine][:2]), (x[mine][2:], y[mine][2:])]
    got = regops.hessian.trace(model, loss, halves, num_probes=3, generator=_gen())
    want = single(regops.hessian.trace, num_probes=3, generator=_gen())
    c.close("loader", got.samples, want.samples, rtol=RTOL, atol=RTOL)
    try:
        regops.hessian.trace(model, loss, halves[: 1 + (rank == 0)], num_probes=3)
        c.failures.append("uneven batch counts: no error")
    except ValueError as exc:
        c.true(f"uneven batch counts: {exc}", "as many batches" in str(exc))

    # a frozen parameter: left out, unchanged, no gradient
    frozen = _sharded(frozen=True)
    got = regops.hessian.trace(frozen, loss, x[mine], y[mine], num_probes=PROBES, generator=_gen(), by="param")
    want = single(regops.hessian.trace, frozen=True, num_probes=PROBES, generator=_gen(), by="param")
    c.true(f"frozen: keys {sorted(got)}", set(got) == set(want) and "1.weight" not in got)
    for key in want:
        c.close(f"frozen {key}", torch.tensor(got[key].value), torch.tensor(want[key].value), rtol=RTOL, atol=RTOL)
    c.true("frozen: no gradient", frozen[1].weight.grad is None and not frozen[1].weight.requires_grad)

    # training goes on afterwards with FSDP2's gradients
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x[mine]), y[mine]).backward()
    c.true("FSDP2 gradients after the estimate", all(isinstance(p.grad, DTensor) for p in model.parameters()))
    c.done()


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_finite_differences_equal_one_process(world):
    run(_body, world)


def test_fsdp2_hessian_trace_holds_a_shard_per_rank():
    """Peak RSS growth of ``hessian.trace`` (sharded finite differences, one probe and the error estimate's second
    pair) on each of 2 and of 3 FSDP2 ranks: at most 0.7x the same call in one process, and within the model's
    ``6 P / world + 4 L`` (8 x Linear(512): ``P`` = 8 MiB, ``L`` = 1 MiB; rows split unevenly over 3 ranks), which
    the path that gathers every parameter (about ``4 P`` on every rank) exceeds."""
    from benchmarks.fsdp_memory import measure

    mib, p_mib, l_mib = 2**20, 8.03, 1.0
    one = measure(1, 8, 512, 8, "hessian_trace")[0]["growth"]
    assert one > 4 * p_mib * mib, f"one process grew by {one / mib:.1f} MiB: its products alone are 4 x 8 MiB"
    for world in (2, 3):
        ranks = [r["growth"] / mib for r in measure(world, 8, 512, 8, "hessian_trace")]
        bound = 6 * p_mib / world + 4 * l_mib
        assert max(ranks) <= min(0.7 * one / mib, bound), f"{world} ranks grew by {ranks} MiB vs {one / mib:.1f}"
