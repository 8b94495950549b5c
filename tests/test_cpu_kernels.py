"""C++ CPU kernels registered in the regops_cpu namespace (backend "cpp") against the reference: the same bits for
every mask and every elementwise result, the reference's tolerance for reductions; odd sizes, every dtype, offsets
near 2**32."""

from __future__ import annotations

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
