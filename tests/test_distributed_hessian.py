"""Hessian trace and diagonal of a model under FSDP2 (gloo, 2 processes on CPU): each rank with its own batch,
the estimate equals the single-process estimate on the concatenated batch (mean loss) for the same generator."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from dist_harness import Checks, run
from dist_harness import data as _data
from dist_harness import mlp as _mlp
from dist_harness import sharded as _sharded
from torch import nn

import regops

LOCAL = 4
PROBES = 6


def _body(rank: int, world: int) -> None:
    from torch.distributed.tensor import DTensor

    c = Checks(rank)
    x, y = _data(world * LOCAL)
    mine = slice(rank * LOCAL, (rank + 1) * LOCAL)
    model = _sharded(world)
    F.cross_entropy(model(x[mine]), y[mine]).backward()  # a training step first: FSDP2 initialised
    loss = nn.CrossEntropyLoss()

    def single(fn, **kw):
        return fn(_mlp(), loss, x, y, num_probes=PROBES, generator=torch.Generator().manual_seed(3), **kw)

    # the bar: trace with a fixed generator (ranks' generators disagree: rank 0's seed is used)
    for hvp in ("auto", "double_backward"):
        gen = torch.Generator().manual_seed(3 + 100 * rank)
        got = regops.hessian.trace(model, loss, x[mine], y[mine], num_probes=PROBES, generator=gen, hvp=hvp)
        want = single(regops.hessian.trace, hvp=hvp)
        c.close(f"trace hvp={hvp}", torch.tensor(got.value), torch.tensor(want.value), rtol=1e-6)
        c.close(f"trace hvp={hvp} samples", got.samples, want.samples, rtol=1e-6)
        own = torch.Generator().manual_seed(3 + 100 * rank)
        regops.hessian.trace(_mlp(), loss, x, y, num_probes=PROBES, generator=own, hvp=hvp)
        c.true(f"trace hvp={hvp}: generator advanced as in one process", torch.equal(gen.get_state(), own.get_state()))
    got = regops.hessian.trace(
        model, loss, x[mine], y[mine], num_probes=PROBES, generator=torch.Generator().manual_seed(3), by="module"
    )
    want = single(regops.hessian.trace, by="module")
    c.true("trace by module: keys", set(got) == set(want))
    for key in want:
        c.close(f"trace by module {key}", torch.tensor(got[key].value), torch.tensor(want[key].value), rtol=1e-6)

    # diagonal: values and stderrs laid out like the parameters
    got = regops.hessian.diagonal(
        model, loss, x[mine], y[mine], num_probes=PROBES, generator=torch.Generator().manual_seed(3)
    )
    want = single(regops.hessian.diagonal)
    params = dict(model.named_parameters())
    for name, value in want.value.items():
        mine_v, mine_e = got.value[name], got.stderr[name]
        ok = isinstance(mine_v, DTensor) and mine_v.placements == params[name].placements
        c.true(f"diagonal {name}: laid out like the parameter", ok)
        if ok:
            c.close(f"diagonal {name}", mine_v.full_tensor(), value, rtol=1e-6, atol=1e-12)
            c.close(f"diagonal stderr {name}", mine_e.full_tensor(), want.stderr[name], rtol=1e-6, atol=1e-12)
    c.close("diagonal trace", torch.tensor(got.trace.value), torch.tensor(want.trace.value), rtol=1e-6)

    # the model trains as before afterwards (FSDP2's hooks are back), and unsupported forms say so
    before = [h for m in model.modules() for h in m._forward_pre_hooks.values()]
    F.cross_entropy(model(x[mine]), y[mine]).backward()
    c.true("FSDP2 gradients after the estimate", all(isinstance(p.grad, DTensor) for p in model.parameters()))
    c.true("hooks restored", before == [h for m in model.modules() for h in m._forward_pre_hooks.values()] and before)
    try:
        regops.hessian.trace(model, loss, x[mine], y[mine], num_probes=4, method="hutch++")
        c.failures.append("hutch++ under fully_shard: no error")
    except NotImplementedError as exc:
        c.true("hutch++: clear error", "regops" in str(exc))
    c.done()


def test_hessian_trace_and_diagonal_under_fsdp2_two_processes():
    run(_body, 2)
