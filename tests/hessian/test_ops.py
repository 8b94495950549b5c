"""The hessian family's operators against their references: the probes bit for bit on every backend (Triton under
the interpreter, the C++ CPU kernel), whatever the tiling, seed or offset; the fused accumulation within the
rounding of its sums; opcheck, gradcheck and torch.compile of both ops; the estimators on each backend.

Every random draw is seeded, so every statistical assertion is deterministic.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

import regops
from regops._core import dispatch
from regops.hessian import ops
from regops.hessian import reference as ref

DIST = ("rademacher", "gaussian")
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
SEEDS_OFFSETS = ((987654321987, 0), (-5, 2**32 - 3), (2**62 + 11, 2**32 - 70))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny matrices: one thread avoids OpenMP spin-waiting when the machine is shared.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def seed_of(key: int, offset: int, device="cpu") -> torch.Tensor:
    return torch.tensor([key, offset], dtype=torch.int64, device=device)


# ---------------------------------------------------------------------------------------------- probes
@pytest.mark.ops("hessian_probes", backends=("triton",))
@pytest.mark.parametrize("distribution", DIST)
@pytest.mark.parametrize("dtype", DTYPES)
def test_probe_kernel_bit_identical_to_reference(kernel_target, distribution, dtype):
    _, device = kernel_target
    from regops.hessian import triton as T

    for numel in (1, 63, 1000, 4097):
        expected = ref.probes(seed_of(-1234567890123, 99), 5, 3, numel, distribution, dtype)
        got = T.probes(seed_of(-1234567890123, 99, device), 5, 3, numel, distribution, dtype, block=2048)
        assert torch.equal(got.cpu(), expected), (numel, (got.cpu().float() - expected.float()).abs().max())


@pytest.mark.ops("hessian_probes", backends=("triton",))
@pytest.mark.parametrize("distribution", DIST)
def test_probe_rows_do_not_depend_on_tiling_or_chunking(kernel_target, distribution):
    _, device = kernel_target
    from regops.hessian import triton as T

    whole = ref.probes(seed_of(7, 3), 0, 6, 1000, distribution, torch.float32)
    parts = torch.cat([ref.probes(seed_of(7, 3), s, 2, 1000, distribution, torch.float32) for s in (0, 2, 4)])
    assert torch.equal(whole, parts)
    for block in (128, 512, 4096):
        got = T.probes(seed_of(7, 3, device), 0, 6, 1000, distribution, torch.float32, block=block)
        assert torch.equal(got.cpu(), whole), block


@pytest.mark.ops("hessian_probes")
@pytest.mark.parametrize("distribution", DIST)
@pytest.mark.parametrize("dtype", DTYPES)
def test_probe_op_bits_match_reference_at_any_seed_and_offset(kernel_target, distribution, dtype):
    _, device = kernel_target
    for (k, first, n), (key, offset) in itertools.product(
        ((0, 0, 5), (1, 0, 1), (3, 2, 129), (2, 7, 1001), (1, 2**20 + 3, 4099)), SEEDS_OFFSETS
    ):
        got = ops.hessian_probes(seed_of(key, offset, device), first, k, n, distribution, dtype)
        want = ref.probes(seed_of(key, offset), first, k, n, distribution, dtype)
        assert got.shape == want.shape and got.dtype == dtype and got.device == device, (k, first, n)
        assert torch.equal(got.cpu(), want), (k, first, n, key, offset)


@pytest.mark.ops("hessian_probes", backends=("cpp",))
def test_probe_op_gaussian_many_blocks_and_threads_match_reference(kernel_target):
    want = ref.probes(seed_of(3, 2**32 - 9), 1, 4, 70001, "gaussian", torch.float32)
    threads = torch.get_num_threads()
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            assert torch.equal(ops.hessian_probes(seed_of(3, 2**32 - 9), 1, 4, 70001, "gaussian", torch.float32), want)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.ops("hessian_probes", backends=("cpp",))
def test_probe_op_runs_cpp_and_checks_input(kernel_target, monkeypatch):
    seed = seed_of(11, 2**32 - 5)
    got = ops.hessian_probes(seed, 1, 3, 77, "gaussian", torch.float64)
    with regops.use_backend("torch"):
        want = ops.hessian_probes(seed, 1, 3, 77, "gaussian", torch.float64)
    assert torch.equal(got, want)
    monkeypatch.delenv("REGOPS_BACKEND", raising=False)
    with regops.use_backend(None):
        assert dispatch.choose("hessian_probes", torch.device("cpu")) == "cpp"
        assert dispatch.choose("hessian_probe_dot", torch.device("cpu"), torch.float32) == "cpp"
        assert torch.equal(ops.hessian_probes(seed, 1, 3, 77, "gaussian", torch.float64), want)
    torch.library.opcheck(torch.ops.regops.hessian_probes, (seed, 0, 2, 130, "rademacher", torch.float32))
    fn = torch.compile(
        lambda s: torch.ops.regops.hessian_probes(s, 1, 3, 77, "gaussian", torch.float64),
        fullgraph=True,
        backend="eager",
    )
    assert torch.equal(fn(seed), want)
    with pytest.raises(RuntimeError, match="distribution must be one of"):
        ops.hessian_probes(seed, 0, 1, 4, "uniform", torch.float32)
    with pytest.raises(RuntimeError, match="unsupported dtype"):
        ops.hessian_probes(seed, 0, 1, 4, "gaussian", torch.int32)
    with pytest.raises(RuntimeError, match="seed must be a contiguous int64 tensor of 2 elements"):
        ops.hessian_probes(seed.to(torch.int32), 0, 1, 4, "gaussian", torch.float32)


@pytest.mark.ops("hessian_probes")
def test_probe_op_through_backend_and_public_probes(kernel_target):
    _, device = kernel_target
    w = torch.zeros(7, 9, device=device, requires_grad=True)
    b = torch.zeros(5, device=device, requires_grad=True)
    for distribution in DIST:
        got = regops.hessian.probes([w, b], 4, distribution=distribution, generator=gen(3))
        with regops.use_backend("torch"):
            expected = regops.hessian.probes([w.cpu(), b.cpu()], 4, distribution=distribution, generator=gen(3))
        for g_, e_ in zip(got, expected, strict=True):
            assert torch.equal(g_.cpu(), e_)
        assert got[0].shape == (4, 7, 9) and got[1].shape == (4, 5)


@pytest.mark.ops("hessian_stream_add_")
@pytest.mark.parametrize("distribution", DIST)
@pytest.mark.parametrize("dtype", DTYPES)
def test_stream_add_adds_the_scaled_stream_elements(kernel_target, distribution, dtype):
    """out += scale * elements start .. of probe row 0, drawn in float32, scaled in float32, rounded to out's dtype
    and added in it: the bits of that composition, at starts inside and across counters and blocks."""
    _, device = kernel_target
    for (start, n), (key, offset) in itertools.product(
        ((0, 1), (3, 5), (61, 7), (63, 130), (2047, 2050), (4097, 9000)), SEEDS_OFFSETS
    ):
        base = torch.randn(n, generator=gen(n)).to(dtype)
        row = ref.probes(seed_of(key, offset), 0, 1, start + n, distribution, torch.float32)[0, start : start + n]
        want = base.clone().add_((row * 0.37).to(dtype))
        out = base.to(device)
        ops.hessian_stream_add_(out, seed_of(key, offset, device), start, 0.37, distribution)
        assert torch.equal(out.cpu(), want), (start, n, key, offset, (out.cpu().double() - want.double()).abs().max())


@pytest.mark.ops("hessian_stream_add_", backends=("cpp",))
def test_stream_add_writes_views_in_place_on_any_thread_count(kernel_target):
    seed = seed_of(5, 2**32 - 9)
    buf = torch.zeros(3, 70001)
    want = buf.clone()
    want[1] += ref.probes(seed, 0, 1, 170001, "gaussian", torch.float32)[0, 100000:170001] * 2.5
    threads = torch.get_num_threads()
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            got = buf.clone()
            version = got._version
            ops.hessian_stream_add_(got[1], seed, 100000, 2.5, "gaussian")  # a view: written in place
            assert torch.equal(got, want) and got._version > version
    finally:
        torch.set_num_threads(threads)
    torch.library.opcheck(torch.ops.regops.hessian_stream_add_, (torch.zeros(9), seed, 3, 0.5, "gaussian"))
    with pytest.raises(RuntimeError, match="out must be contiguous"):
        ops.hessian_stream_add_(torch.zeros(4, 4).t(), seed, 0, 1.0, "gaussian")
    with pytest.raises(RuntimeError, match="distribution must be one of"):
        ops.hessian_stream_add_(torch.zeros(4), seed, 0, 1.0, "uniform")


def test_probe_statistics():
    (r,) = regops.hessian.probes([torch.zeros(200_000)], 1, generator=gen(0))
    assert set(r.unique().tolist()) == {-1.0, 1.0}
    assert abs(r.mean().item()) < 5 / math.sqrt(r.numel())
    (z,) = regops.hessian.probes([torch.zeros(200_000)], 1, distribution="gaussian", generator=gen(0))
    z = z.double().flatten()
    n = z.numel()
    assert abs(z.mean().item()) < 5 / math.sqrt(n)
    assert abs(z.var().item() - 1.0) < 5 * math.sqrt(2 / n)  # unit variance: E[v v^T] = I
    assert abs((z**4).mean().item() - 3.0) < 5 * math.sqrt(96 / n)
    # Kolmogorov-Smirnov distance to N(0, 1)
    zs, _ = z.sort()
    cdf = 0.5 * (1 + torch.erf(zs / math.sqrt(2)))
    ecdf = torch.arange(1, n + 1, dtype=torch.float64) / n
    assert (cdf - ecdf).abs().max().item() < 1.7 / math.sqrt(n)
    # neighbours (the cos and sin halves of one Box-Muller pair) are uncorrelated
    assert abs((z[0::2] * z[1::2]).mean().item()) < 5 / math.sqrt(n / 2)


def test_gaussian_transform_accuracy():
    k = torch.arange(1, (1 << 24) + 1, 97)
    exact = torch.log(k.double() * 2.0**-24)
    assert ((ref.log_unit(k).double() - exact).abs() <= 4e-7 * exact.abs().clamp_min(1)).all()
    k0 = k - 1
    c, s = ref.cos_sin_two_pi(k0)
    x = 2 * math.pi * k0.double() * 2.0**-24
    assert (c.double() - torch.cos(x)).abs().max() < 3e-7
    assert (s.double() - torch.sin(x)).abs().max() < 3e-7


def test_probes_reproducible_from_generator():
    w = torch.zeros(50)
    a = regops.hessian.probes([w], 3, generator=gen(11))
    b = regops.hessian.probes([w], 3, generator=gen(11))
    c = regops.hessian.probes([w], 3, generator=gen(12))
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0])
    torch.manual_seed(5)
    d = regops.hessian.probes([w], 3)
    torch.manual_seed(5)
    assert torch.equal(d[0], regops.hessian.probes([w], 3)[0])


# ---------------------------------------------------------------------------------------------- fused accumulation
@pytest.mark.ops("hessian_probe_dot", backends=("triton",))
@pytest.mark.parametrize("with_diag", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_probe_dot_kernel_matches_reference(kernel_target, dtype, with_diag):
    _, device = kernel_target
    from regops.hessian import triton as T

    shapes = [(1,), (7, 9), (1000,), (4097,)]
    g = gen(0)
    k = 3
    # probes as views of one [K, N] buffer (row stride N), products as separate contiguous tensors
    flat = torch.randn(k, sum(math.prod(s) for s in shapes), generator=g).to(dtype)
    vs = [c.reshape(k, *s) for c, s in zip(flat.split([math.prod(s) for s in shapes], 1), shapes, strict=True)]
    hvs = [torch.randn(k, *s, generator=g).to(dtype) for s in shapes]
    expected = ref.probe_dot(vs, hvs, with_diag)
    got = T.probe_dot([v.to(device) for v in vs], [h.to(device) for h in hvs], with_diag, block=1024)
    tol = {"rtol": 1e-10, "atol": 1e-10} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-4}
    for a, b in zip(got, expected, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a.cpu(), b, **tol)


@pytest.mark.ops("hessian_probe_dot")
@pytest.mark.parametrize("dtype", DTYPES)
def test_probe_dot_op_matches_reference(kernel_target, dtype):
    """Sums of n products in another order than the reference's: each result is held to the float64 value within
    twice the reference's own error plus the rounding bound of an n-term sum in the accumulation dtype
    (eps * sqrt(n) * ||terms||_2 per sum), so a missing or doubled term (of size ~1) always fails."""
    _, device = kernel_target
    g = gen(0)
    shapes = [(3,), (70, 65), (5000,)]
    for k, with_diag in itertools.product((1, 4), (True, False)):
        vs = [torch.randint(0, 2, (k, *s), generator=g).to(dtype) * 2 - 1 for s in shapes]
        hvs = [torch.randn((k, *s), generator=g).to(dtype) for s in shapes]
        got = ops.hessian_probe_dot([v.to(device) for v in vs], [h.to(device) for h in hvs], with_diag)
        want = ref.probe_dot(vs, hvs, with_diag)
        exact = ref.probe_dot([v.double() for v in vs], [h.double() for h in hvs], with_diag)
        # The largest sum: the dots over the biggest parameter (n terms of |v * hv| <= |hv|).
        n = max(torch.Size(s).numel() for s in shapes)
        norm = max(h.double().reshape(k, -1).norm(dim=1).max().item() for h in hvs)
        for out, e, x in zip(got, want, exact, strict=True):
            out = out.cpu()
            assert out.dtype == e.dtype and out.shape == e.shape == x.shape
            if out.numel() == 0:
                continue
            eps = torch.finfo(out.dtype).eps
            bound = 2 * (e.double() - x).abs().max().item() + 4 * eps * n**0.5 * norm
            assert (out.double() - x).abs().max().item() <= bound, (k, with_diag, dtype)


def test_probe_dot_reference_definition():
    v = torch.tensor([[1.0, -1.0, 1.0], [-1.0, -1.0, 1.0]], dtype=torch.float64)
    hv = torch.tensor([[2.0, 3.0, 4.0], [5.0, 6.0, 7.0]], dtype=torch.float64)
    dots, diag, diag_sq = ref.probe_dot([v[:, :2], v[:, 2:]], [hv[:, :2], hv[:, 2:]])
    assert dots.tolist() == [[-1.0, 4.0], [-11.0, 7.0]]
    assert diag.tolist() == [-3.0, -9.0, 11.0]
    assert diag_sq.tolist() == [29.0, 45.0, 65.0]


def test_ops_opcheck_gradcheck_and_compile():
    seed = seed_of(123, 4)
    for distribution in DIST:
        torch.library.opcheck(ops.hessian_probes.overload, (seed, 2, 3, 17, distribution, torch.float32))
    vs = [torch.randn(3, 4, 3, dtype=torch.float64, requires_grad=True), torch.randn(3, 5, dtype=torch.float64)]
    hvs = [torch.randn(3, 4, 3, dtype=torch.float64, requires_grad=True) for _ in range(1)]
    hvs.append(torch.randn(3, 5, dtype=torch.float64, requires_grad=True))
    for with_diag in (True, False):
        torch.library.opcheck(ops.hessian_probe_dot.overload, (vs, hvs, with_diag))
    assert torch.autograd.gradcheck(
        lambda a, b, c: ops.hessian_probe_dot([a, vs[1]], [b, c], True), (vs[0], hvs[0], hvs[1])
    )

    def f(s, h0, h1):
        p = ops.hessian_probes(s, 0, 3, 17, "rademacher", torch.float64)
        dots, diag, _ = ops.hessian_probe_dot([p[:, :12], p[:, 12:17]], [h0, h1], True)
        return dots.sum() + diag.sum()

    h0, h1 = torch.randn(3, 12, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(seed, h0, h1), f(seed, h0, h1))


@pytest.mark.ops("hessian_probes", "hessian_probe_dot")
def test_estimators_on_each_backend_match_the_reference(kernel_target):
    _, device = kernel_target
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(device)
    x, y = torch.randn(8, 4, device=device), torch.randint(0, 3, (8,), device=device)
    crit = nn.CrossEntropyLoss()
    for distribution in DIST:
        got = regops.hessian.diagonal(model, crit, x, y, num_probes=6, distribution=distribution, generator=gen(1))
        with regops.use_backend("torch"):
            exp = regops.hessian.diagonal(
                model.cpu(), crit, x.cpu(), y.cpu(), num_probes=6, distribution=distribution, generator=gen(1)
            )
            model.to(device)
        assert got.trace.value == pytest.approx(exp.trace.value, rel=1e-5)
        for name in exp.value:
            torch.testing.assert_close(got.value[name].cpu(), exp.value[name], rtol=1e-5, atol=1e-6)
