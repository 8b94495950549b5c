"""The per-example engine's operators: the references against brute force, every kernel that has the ops against
the references (odd sizes, non-contiguous inputs, low precision), the grids of huge shapes, opcheck and compile."""

from __future__ import annotations

import pytest
import torch

from regops._core import launch as _launch
from regops.per_example import api as pe
from regops.per_example import reference as ref


# ------------------------------------------------------------------------------------------ norms
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (3, 5, 4, 6), (2, 17, 9, 3), (2, 150, 5, 3)])
def test_reference_forms_agree(shape):
    b, t, d, p = shape
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(b, t, d, generator=gen, dtype=torch.float64)
    g = torch.randn(b, t, p, generator=gen, dtype=torch.float64)
    expected = torch.einsum("btp,btd->bpd", g, a).flatten(1).square().sum(1)
    torch.testing.assert_close(ref.gram_sq_norms(a, g), expected)
    torch.testing.assert_close(ref.instantiate_sq_norms(a, g), expected)
    # non-contiguous views and chunking
    torch.testing.assert_close(ref.gram_sq_norms(a.transpose(1, 2).contiguous().transpose(1, 2), g), expected)


def test_reference_chunking(monkeypatch):
    monkeypatch.setattr(ref, "_CHUNK_BYTES", 64)
    gen = torch.Generator().manual_seed(0)
    a, g = torch.randn(5, 4, 3, generator=gen), torch.randn(5, 4, 2, generator=gen)
    expected = torch.einsum("btp,btd->bpd", g, a).flatten(1).square().sum(1)
    torch.testing.assert_close(ref.gram_sq_norms(a, g), expected)
    torch.testing.assert_close(ref.instantiate_sq_norms(a, g), expected)
    ids = torch.randint(0, 4, (5, 4), generator=gen)
    torch.testing.assert_close(ref.embedding_gram_sq_norms(ids, g, 1), ref.embedding_sq_norms(ids, g, 1))


@pytest.mark.parametrize("padding_idx", [-1, 0])
def test_reference_embedding_forms(padding_idx):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 5, (4, 9), generator=gen)
    g = torch.randn(4, 9, 3, generator=gen, dtype=torch.float64)
    dense = torch.zeros(4, 5, 3, dtype=torch.float64)
    keep = (ids != padding_idx).unsqueeze(-1).double()
    dense.scatter_add_(1, ids.unsqueeze(-1).expand_as(g), g * keep)
    expected = dense.flatten(1).square().sum(1)
    torch.testing.assert_close(ref.embedding_sq_norms(ids, g, padding_idx), expected)
    torch.testing.assert_close(ref.embedding_gram_sq_norms(ids, g, padding_idx), expected)


def test_ops_opcheck_and_compile():
    gen = torch.Generator().manual_seed(0)
    a, g = torch.randn(3, 5, 4, generator=gen), torch.randn(3, 5, 2, generator=gen)
    ids = torch.randint(0, 4, (3, 5), generator=gen)
    torch.library.opcheck(torch.ops.regops.grad_norms_gram, (a, g))
    torch.library.opcheck(torch.ops.regops.grad_norms_instantiate, (a, g))
    torch.library.opcheck(torch.ops.regops.grad_norms_embedding_gram, (ids, g, 0))

    @torch.compile(fullgraph=True, backend="eager")
    def f(a, g, ids):
        return pe.gram_sq_norms(a, g) + pe.instantiate_sq_norms(a, g) + pe.embedding_gram_sq_norms(ids, g, 0)

    expected = 2 * ref.gram_sq_norms(a, g) + ref.embedding_gram_sq_norms(ids, g, 0)
    torch.testing.assert_close(f(a, g, ids), expected)


KERNEL_SHAPES = [(2, 1, 3, 5), (3, 7, 5, 3), (2, 70, 33, 17)]


@pytest.mark.ops("grad_norms_gram", "grad_norms_instantiate", "grad_norms_embedding_gram")
@pytest.mark.parametrize("shape", KERNEL_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_kernels_match_reference(kernel_target, shape, dtype, poison_empty):
    _, device = kernel_target
    b, t, d, p = shape
    gen = torch.Generator().manual_seed(sum(shape))
    a64 = torch.randn(b, t, d, generator=gen, dtype=torch.float64)
    g64 = torch.randn(b, t, p, generator=gen, dtype=torch.float64)
    # a transposed (non-contiguous) view of the activations, as the unfolded convolutions give
    a = a64.to(dtype).transpose(1, 2).contiguous().transpose(1, 2).to(device)
    g = g64.to(dtype).to(device)
    exact = ref.gram_sq_norms(a64, g64)
    ref_lowp = ref.gram_sq_norms(a.cpu(), g.cpu()).double()
    for got in (pe.gram_sq_norms(a, g), pe.instantiate_sq_norms(a, g)):
        assert got.dtype == torch.float32 and got.shape == (b,)
        if dtype == torch.float32:
            torch.testing.assert_close(got.double().cpu(), exact, rtol=1e-5, atol=1e-5)
        else:  # inputs are exactly representable; only fp32 accumulation order differs from the reference
            torch.testing.assert_close(got.double().cpu(), ref_lowp, rtol=1e-5, atol=1e-5)
    ids = torch.randint(0, 5, (b, t), generator=gen).to(device)
    got = pe.embedding_gram_sq_norms(ids, g, 2)
    torch.testing.assert_close(
        got.double().cpu(), ref.embedding_sq_norms(ids.cpu(), g.cpu(), 2).double(), rtol=1e-5, atol=1e-5
    )


@pytest.mark.ops("grad_norms_gram", "grad_norms_instantiate")
def test_kernels_zero_size(kernel_target):
    _, device = kernel_target
    a, g = torch.randn(0, 4, 3, device=device), torch.randn(0, 4, 2, device=device)
    assert pe.gram_sq_norms(a, g).shape == (0,)
    assert pe.instantiate_sq_norms(a, g).shape == (0,)


# ------------------------------------------------------------------------------------------ valuation
@pytest.mark.ops("valuation_cross_gram", "valuation_sq_grad_sum")
@pytest.mark.parametrize("shape", [(3, 70, 5, 9, 4, 13), (2, 1, 3, 17, 3, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dots_kernels_match_reference(kernel_target, shape, dtype, poison_empty):
    _, device = kernel_target
    b, t, d, p, b2, t2 = shape
    gen = torch.Generator().manual_seed(sum(shape))
    a64, g64 = (
        torch.randn(b, t, d, generator=gen, dtype=torch.float64),
        torch.randn(b, t, p, generator=gen, dtype=torch.float64),
    )
    a264, g264 = (
        torch.randn(b2, t2, d, generator=gen, dtype=torch.float64),
        torch.randn(b2, t2, p, generator=gen, dtype=torch.float64),
    )
    # exactly representable inputs; a transposed (non-contiguous) view as unfolded convolutions give
    a64, g64, a264, g264 = (v.to(dtype).double() for v in (a64, g64, a264, g264))
    a = a64.to(dtype).transpose(1, 2).contiguous().transpose(1, 2).to(device)
    g, a2, g2 = (v.to(dtype).to(device) for v in (g64, a264, g264))
    got = pe.cross_gram_dots(a, g, a2, g2)
    assert got.dtype == torch.float32 and got.shape == (b, b2)
    w, w2 = torch.einsum("btp,btd->bpd", g64, a64), torch.einsum("btp,btd->bpd", g264, a264)
    torch.testing.assert_close(got.double().cpu(), w.flatten(1) @ w2.flatten(1).T, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ref.cross_gram_dots(a64, g64, a264, g264), w.flatten(1) @ w2.flatten(1).T)
    sq = pe.sq_grad_sum(a, g)
    assert sq.shape == (p, d) and sq.dtype == torch.float32
    torch.testing.assert_close(sq.double().cpu(), w.square().sum(0), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ref.sq_grad_sum(a64, g64), w.square().sum(0))


def test_kernel_grid_folds_huge_pair_counts():
    """B x B2 pairs beyond CUDA's grid x limit are launched in row groups, each within the limit."""
    pytest.importorskip("triton")
    from regops.per_example import triton as kv

    a, g = torch.empty(70000, 2, 4, device="meta"), torch.empty(70000, 2, 3, device="meta")
    with _launch.recording() as launches:
        kv.valuation_cross_gram(a, g, a, g)
    assert len(launches) >= 3 and sum(launch.grid[0] for launch in launches) == 70000 * 70000
    assert all(launch.grid[0] <= _launch.MAX_GRID[0] for launch in launches)


def test_dots_ops_opcheck_and_compile():
    gen = torch.Generator().manual_seed(0)
    a, g = torch.randn(3, 5, 4, generator=gen), torch.randn(3, 5, 2, generator=gen)
    a2, g2 = torch.randn(2, 4, 4, generator=gen), torch.randn(2, 4, 2, generator=gen)
    torch.library.opcheck(torch.ops.regops.valuation_cross_gram, (a, g, a2, g2))
    torch.library.opcheck(torch.ops.regops.valuation_sq_grad_sum, (a, g))

    @torch.compile(fullgraph=True, backend="eager")
    def f(a, g, a2, g2):
        return pe.cross_gram_dots(a, g, a2, g2).sum() + pe.sq_grad_sum(a, g).sum()

    torch.testing.assert_close(f(a, g, a2, g2), ref.cross_gram_dots(a, g, a2, g2).sum() + ref.sq_grad_sum(a, g).sum())
    with pytest.raises(ValueError, match="feature sizes"):
        pe.cross_gram_dots(a, g, a2[..., :3], g2)
