"""The hessian family's GPU paths at LLM scale, checked without a GPU: the probe and accumulation grids for 10**9
parameters stay within CUDA's limits (recorded on meta tensors, not launched), the probe kernel reads its seed from
memory at run time (what a CUDA-graph replay rewrites), and the accumulation is deterministic, copies nothing on a
repeated step and says so clearly when new tensors meet CUDA-graph capture."""

from __future__ import annotations

import pytest
import torch

from regops.hessian import reference as ref

pytest.importorskip("triton")

from regops._core.launch import MAX_GRID, recording  # noqa: E402
from regops.hessian import triton as T  # noqa: E402

needs_interpreter = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the interpreter on CPU tensors")
KEY = -1234567890123


def _x(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g)


def _within_limits(launches) -> None:
    assert launches, "nothing was recorded"
    for launch in launches:
        assert all(g <= limit for g, limit in zip(launch.grid, MAX_GRID, strict=False)), launch


def test_probe_grids_for_a_billion_parameters():
    seed = torch.empty(2, dtype=torch.int64, device="meta")
    with recording() as launches:
        T.probes(seed, 0, 16, 10**9, "gaussian", torch.bfloat16)
        T.probes(seed, 0, 70_000, 1000, "rademacher", torch.float32)  # probes past grid y: chunked
        sizes = [2**24] * 59 + [10**9 - 59 * 2**24]
        vs = [torch.empty(4, n, dtype=torch.bfloat16, device="meta") for n in sizes]
        T.probe_dot(vs, vs, True)
    _within_limits(launches)
    probe_grids = [launch.grid for launch in launches if launch.kernel == "probes_kernel"]
    assert probe_grids[0] == (-(-ref.row_stride(10**9, "gaussian") // 1024), 16)
    assert sum(g[1] for g in probe_grids[1:]) == 70_000
    assert any(launch.kernel == "segment_sum_kernel" for launch in launches)


@needs_interpreter
def test_probe_kernel_reads_the_seed_from_memory_at_run_time():
    """What a CUDA-graph replay does: the same launch arguments (the same seed tensor), new contents."""
    seed = torch.tensor([KEY, 11])
    first = T.probes(seed, 0, 2, 100, "rademacher", torch.float32)
    seed.copy_(torch.tensor([5, 6]))  # in place, as the captured RNG kernel rewrites it
    second = T.probes(seed, 0, 2, 100, "rademacher", torch.float32)
    assert not torch.equal(first, second)
    assert torch.equal(first, ref.probes(torch.tensor([KEY, 11]), 0, 2, 100, "rademacher", torch.float32))
    assert torch.equal(second, ref.probes(torch.tensor([5, 6]), 0, 2, 100, "rademacher", torch.float32))


@needs_interpreter
def test_probe_dot_is_deterministic_and_reuses_its_tables(monkeypatch):
    vs = [_x((3, 5000), seed=1), _x((3, 7), seed=2)]
    hs = [_x((3, 5000), seed=3), _x((3, 7), seed=4)]
    first = T.probe_dot(vs, hs, True, block=1024)
    # a step under CUDA-graph capture: the tables for these tensors exist, so nothing is copied and it runs
    monkeypatch.setattr(T, "_capturing", lambda device: True)
    again = T.probe_dot(vs, hs, True, block=1024)
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a, b)  # fixed summation order: bitwise the same
    expected = ref.probe_dot(vs, hs, True)
    for a, b in zip(first, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)
    with pytest.raises(RuntimeError, match="CUDA-graph capture"):
        T.probe_dot([v.clone() for v in vs], hs, True, block=1024)  # new tensors under capture
