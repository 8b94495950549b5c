"""Distributed Hutchinson: probes split across 2 gloo processes on CPU, one all-reduce, the same estimate as
one process with the same seed."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
from torch import nn

import regops
from tests import dist_workers

WORLD = 2


def _problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(12, 5, dtype=torch.float64, generator=g)
    y = torch.randint(0, 3, (12,), generator=g)
    return model, nn.CrossEntropyLoss(), x, y


def _estimates(distributed: bool, seed: int):
    model, crit, x, y = _problem()
    # Only rank 0's generator matters when distributed: its seed is broadcast.
    trace = regops.hessian.trace(
        model,
        crit,
        x,
        y,
        num_probes=37,
        probe_batch=5,
        generator=torch.Generator().manual_seed(seed),
        distributed=distributed,
    )
    per_module = regops.hessian.trace(
        model,
        crit,
        x,
        y,
        num_probes=20,
        by="module",
        generator=torch.Generator().manual_seed(seed + 1),
        distributed=distributed,
    )
    diag = regops.hessian.diagonal(
        model,
        crit,
        x,
        y,
        num_probes=21,
        probe_batch=4,
        generator=torch.Generator().manual_seed(seed + 2),
        distributed=distributed,
    )
    tol = regops.hessian.trace(
        model,
        crit,
        x,
        y,
        num_probes=400,
        probe_batch=4,
        tol=0.15,
        generator=torch.Generator().manual_seed(seed + 3),
        distributed=distributed,
    )
    return {
        "trace": (trace.value, trace.stderr, trace.samples),
        "module": {k: (e.value, e.stderr) for k, e in per_module.items()},
        "diag": ({k: v.clone() for k, v in diag.value.items()}, {k: v.clone() for k, v in diag.stderr.items()}),
        "tol": (tol.value, tol.num_matvecs),
    }


def _worker(rank: int, out_dir: str) -> None:
    # rank 1 gets a different generator seed: the broadcast from rank 0 must win
    result = _estimates(True, 100 if rank == 0 else 999)
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.slow
def test_distributed_estimate_equals_single_process():
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        dist_workers.run(_worker, tmp, world=WORLD)
        results = [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]
    single = _estimates(False, 100)
    for res in results:
        value, stderr, samples = res["trace"]
        assert samples.shape == (37,)
        torch.testing.assert_close(samples, single["trace"][2], rtol=1e-12, atol=1e-12)
        assert value == pytest.approx(single["trace"][0], rel=1e-12)
        assert stderr == pytest.approx(single["trace"][1], rel=1e-10)
        for k, (v, e) in single["module"].items():
            assert res["module"][k][0] == pytest.approx(v, rel=1e-12)
            assert res["module"][k][1] == pytest.approx(e, rel=1e-10)
        for k in single["diag"][0]:
            torch.testing.assert_close(res["diag"][0][k], single["diag"][0][k], rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(res["diag"][1][k], single["diag"][1][k], rtol=1e-8, atol=1e-12)
        # with tol: rounds of probe_batch per rank; stops at a multiple of 2 * 4 probes
        tol_value, tol_matvecs = res["tol"]
        assert tol_matvecs < 400 and tol_matvecs % (WORLD * 4) == 0
        ref = regops.hessian.trace(*_problem(), num_probes=tol_matvecs, generator=torch.Generator().manual_seed(103))
        assert tol_value == pytest.approx(ref.value, rel=1e-12)
