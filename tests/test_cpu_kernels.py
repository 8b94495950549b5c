"""C++ CPU kernels registered in the regops_cpu namespace (backend "cpp") against the reference: the same bits for
every mask and every elementwise result, the reference's tolerance for reductions; odd sizes, every dtype, offsets
near 2**32."""

from __future__ import annotations

import itertools

import pytest
import torch

import regops
from tests.backends import extension_expected

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
SEEDS_OFFSETS = ((987654321987, 0), (-5, 2**32 - 3), (2**62 + 11, 2**32 - 70))


# Skipped only where the extension cannot be built (no C++ compiler, or REGOPS_BUILD_EXT=0); anywhere else a
# missing or partial regops._C fails every test here (and test_extension_present.py says why).
pytestmark = pytest.mark.skipif(
    extension_expected() is None, reason="no C++ compiler, or REGOPS_BUILD_EXT=0: regops._C is not built here"
)
K = torch.ops.regops_cpu


def _tol(dtype: torch.dtype) -> dict[str, float]:
    return {
        torch.float64: dict(rtol=1e-10, atol=1e-10),
        torch.float32: dict(rtol=2e-5, atol=2e-5),
    }.get(dtype, dict(rtol=2e-2, atol=2e-2))


@pytest.mark.parametrize("dtype", DTYPES)
def test_probe_dot_matches_reference(dtype):
    """Sums of n products in another order than the reference's: each result is held to the float64 value within
    twice the reference's own error plus the rounding bound of an n-term sum in the accumulation dtype
    (eps * sqrt(n) * ||terms||_2 per sum), so a missing or doubled term (of size ~1) always fails."""
    from regops.reference import hessian as href

    gen = torch.Generator().manual_seed(0)
    shapes = [(3,), (70, 65), (5000,)]
    for k, with_diag in itertools.product((1, 4), (True, False)):
        vs = [torch.randint(0, 2, (k, *s), generator=gen).to(dtype) * 2 - 1 for s in shapes]
        hvs = [torch.randn((k, *s), generator=gen).to(dtype) for s in shapes]
        got, want = K.hessian_probe_dot(vs, hvs, with_diag), href.probe_dot(vs, hvs, with_diag)
        exact = href.probe_dot([v.double() for v in vs], [h.double() for h in hvs], with_diag)
        # The largest sum: the dots over the biggest parameter (n terms of |v * hv| <= |hv|).
        n = max(torch.Size(s).numel() for s in shapes)
        norm = max(h.double().reshape(k, -1).norm(dim=1).max().item() for h in hvs)
        for g, e, x in zip(got, want, exact, strict=True):
            assert g.dtype == e.dtype and g.shape == e.shape == x.shape
            if g.numel() == 0:
                continue
            eps = torch.finfo(g.dtype).eps
            bound = 2 * (e.double() - x).abs().max().item() + 4 * eps * n**0.5 * norm
            assert (g.double() - x).abs().max().item() <= bound, (k, with_diag, dtype)


@pytest.mark.parametrize("distribution", ("rademacher", "gaussian"))
@pytest.mark.parametrize("dtype", DTYPES)
def test_hessian_probes_bits_match_reference(distribution, dtype):
    from regops.reference import hessian as href

    cpu = torch.device("cpu")
    for (k, first, n), (seed, offset) in itertools.product(
        ((0, 0, 5), (1, 0, 1), (3, 2, 129), (2, 7, 1001), (1, 2**20 + 3, 4099)), SEEDS_OFFSETS
    ):
        got = K.hessian_probes(seed, offset, first, k, n, distribution, dtype, cpu)
        want = href.probes(seed, offset, first, k, n, distribution, dtype, cpu)
        assert got.shape == want.shape and got.dtype == dtype, (k, first, n)
        assert torch.equal(got, want), (k, first, n, seed, offset)


def test_hessian_probes_gaussian_many_blocks_and_threads_match_reference():
    from regops.reference import hessian as href

    want = href.probes(3, 2**32 - 9, 1, 4, 70001, "gaussian", torch.float32, None)
    threads = torch.get_num_threads()
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            assert torch.equal(K.hessian_probes(3, 2**32 - 9, 1, 4, 70001, "gaussian", torch.float32, None), want)
    finally:
        torch.set_num_threads(threads)


def test_hessian_probes_op_runs_cpp_and_checks_input(monkeypatch):
    monkeypatch.delenv("REGOPS_BACKEND", raising=False)
    seed = torch.tensor([11, 2**32 - 5])
    got = torch.ops.regops.hessian_probes(seed, 1, 3, 77, "gaussian", torch.float64, torch.device("cpu"))
    with regops.use_backend("torch"):
        want = torch.ops.regops.hessian_probes(seed, 1, 3, 77, "gaussian", torch.float64, torch.device("cpu"))
    assert torch.equal(got, want)
    torch.library.opcheck(torch.ops.regops.hessian_probes, (seed, 0, 2, 130, "rademacher", torch.float32, "cpu"))
    fn = torch.compile(
        lambda s: torch.ops.regops.hessian_probes(s, 1, 3, 77, "gaussian", torch.float64, "cpu"),
        fullgraph=True,
        backend="eager",
    )
    assert torch.equal(fn(seed), want)
    with pytest.raises(RuntimeError, match="distribution must be one of"):
        K.hessian_probes(0, 0, 0, 1, 4, "uniform", torch.float32, None)
    with pytest.raises(RuntimeError, match="unsupported dtype"):
        K.hessian_probes(0, 0, 0, 1, 4, "gaussian", torch.int32, None)
    with pytest.raises(RuntimeError, match="device must be the CPU"):
        K.hessian_probes(0, 0, 0, 1, 4, "gaussian", torch.float32, torch.device("meta"))


# ----------------------------------------------------------------------------------------------- mix_apply
def _mix_args(shape, dtype, gen, channels_last=False):
    b = shape[0]
    if dtype == torch.uint8:
        x = (torch.rand(shape, generator=gen) * 300).to(dtype)
    else:
        x = torch.randn(shape, generator=gen).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    ws = torch.rand(b, generator=gen)
    wo = 1 - ws
    wo[::2] = 0.0  # partner not read
    ws[1::3] = 1.0
    partner = torch.randperm(b, generator=gen)
    height, width = (1, shape[-1]) if len(shape) == 2 else shape[-2:]
    y0 = torch.randint(0, height + 1, (b,), generator=gen)
    c0 = torch.randint(0, width + 1, (b,), generator=gen)
    y1 = y0 + (torch.rand(b, generator=gen) * (height + 1 - y0)).long()
    c1 = c0 + (torch.rand(b, generator=gen) * (width + 1 - c0)).long()
    return x, ws, wo, partner, torch.stack((y0, y1, c0, c1), dim=1)


@pytest.mark.parametrize("dtype", (*DTYPES, torch.uint8))
def test_mix_apply_bits_match_reference(dtype):
    from regops.reference import mix as mref

    gen = torch.Generator().manual_seed(5)
    cases = [((5, 7), False), ((3, 2, 5, 6), False), ((2, 5, 4), False), ((1, 1, 1, 1), False)]
    cases += [((6, 3, 40, 41), False), ((300, 3, 5, 7), False), ((4, 3, 9, 11), True), ((3, 5, 6, 7), True)]
    for shape, channels_last in cases:
        args = _mix_args(shape, dtype, gen, channels_last)
        got, want = K.mix_apply(*args), mref.mix_apply(*args)
        assert got.dtype == dtype and got.stride() == want.stride(), shape
        assert torch.equal(got, want), (shape, channels_last)


def test_mix_apply_does_not_read_an_unused_partner_and_checks_input():
    x = torch.randn(4, 3, 5, 5)
    x[1] = float("nan")
    ws, wo = torch.full((4,), 0.5), torch.zeros(4)
    partner, box = torch.tensor([1, 0, 3, 2]), torch.zeros(4, 4, dtype=torch.long)
    assert not K.mix_apply(x, ws, wo, partner, box)[0].isnan().any()
    with pytest.raises(RuntimeError, match=r"partner\[0\] = 4 is not in \[0, 4\)"):
        K.mix_apply(x, ws, wo, torch.tensor([4, 0, 3, 2]), box)
    bad_box = box.clone()
    bad_box[2] = torch.tensor([0, 6, 1, 2])
    with pytest.raises(RuntimeError, match="outside the"):
        K.mix_apply(x, ws, wo, partner, bad_box)
    with pytest.raises(RuntimeError, match="unsupported dtype"):
        K.mix_apply(x.to(torch.int32), ws, wo, partner, box)


def test_mix_apply_op_runs_cpp_with_gradient_opcheck_and_compile(monkeypatch):
    monkeypatch.delenv("REGOPS_BACKEND", raising=False)
    x, ws, wo, partner, box = _mix_args((5, 3, 6, 7), torch.float32, torch.Generator().manual_seed(2))
    op = torch.ops.regops.mix_apply
    xg = x.clone().requires_grad_()
    y = op(xg, ws, wo, partner, box)
    y.backward(torch.ones_like(y))
    with regops.use_backend("torch"):
        xr = x.clone().requires_grad_()
        y_ref = op(xr, ws, wo, partner, box)
        y_ref.backward(torch.ones_like(y_ref))
    assert torch.equal(y, y_ref) and torch.equal(xg.grad, xr.grad)
    torch.library.opcheck(K.mix_apply, (x, ws, wo, partner, box))
    torch.library.opcheck(op, (x, ws, wo, partner, box))
    fn = torch.compile(lambda t: op(t, ws, wo, partner, box), fullgraph=True, backend="eager")
    assert torch.equal(fn(x), y_ref)
