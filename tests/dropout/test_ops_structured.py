"""Structured dropout family: drop path, shared/channel masks, nested, multi-sample, bitmask mode."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import regops
from regops._core.philox import keep_mask
from regops.dropout.reference import dropout_scale, multi_sample_counters, pack_bits, unpack_bits
from regops.testing import assert_close, make_tensor

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
SEED = torch.tensor([4321, 99])


def _p(v: float) -> torch.Tensor:
    """The ops take p as a 0-dim float64 tensor (a runtime value under torch.compile)."""
    return torch.tensor(v, dtype=torch.float64)


def _reference(fn, *args):
    with regops.use_backend("torch"):
        return fn(*args)


def _saved(fn):
    sizes = []

    def pack(t):
        sizes.append((t.numel() * t.element_size(), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sizes


# ------------------------------------------------------------------------------------------------ drop path
@pytest.mark.ops("scale_rows_add")
@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (7, 5), (5, 3, 67)], ids=str)
def test_drop_path_kernel_matches_reference(kernel_target, dtype, shape):
    _, device = kernel_target
    x, r = make_tensor(shape, dtype, device, seed=1), make_tensor(shape, dtype, device, seed=2)
    for res in (r, None):
        for sbk in (True, False):
            out = torch.ops.regops.drop_path(x, res, _p(0.4), sbk, SEED)
            ref = _reference(
                torch.ops.regops.drop_path, x.cpu(), None if res is None else res.cpu(), _p(0.4), sbk, SEED
            )
            assert torch.equal(out.cpu(), ref)


def test_drop_path_one_draw_per_sample_like_timm():
    x = make_tensor((64, 3, 5), requires_grad=True)
    y = torch.ops.regops.drop_path(x, None, _p(0.3), True, SEED)
    keep = keep_mask(4321, 99, (64,), 0.3)
    expected = x.detach() * torch.where(keep, dropout_scale(0.3), 0.0)[:, None, None]
    assert torch.equal(y, expected)
    y2 = torch.ops.regops.drop_path(x, None, _p(0.3), False, SEED)
    assert torch.equal(y2, x.detach() * keep[:, None, None])
    (dx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    assert torch.equal(dx, torch.where(keep, dropout_scale(0.3), 0.0)[:, None, None].expand_as(x))
    x = torch.ones(4, 3)
    assert regops.drop_path(x, 0.5, training=False) is x and regops.drop_path(x, 0.0) is x


def test_drop_path_statistics():
    y = regops.drop_path(torch.ones(20000, 2), 0.3, training=True, generator=torch.Generator().manual_seed(8))
    kept = (y[:, 0] != 0).double().mean().item()
    assert abs(kept - 0.7) < 5 * math.sqrt(0.21 / 20000)
    assert torch.equal(y[:, 0], y[:, 1])


def test_drop_path_module_parity_with_timm():
    timm_layers = pytest.importorskip("timm.layers")
    ours, theirs = regops.nn.DropPath(0.25, scale_by_keep=False), timm_layers.DropPath(0.25, scale_by_keep=False)
    assert repr(ours) == repr(theirs) and ours.state_dict() == theirs.state_dict()
    x = torch.randn(3, 4)
    assert ours.eval()(x) is x
    out = regops.nn.DropPath(0.5).train()(torch.ones(100, 3))
    assert set(out.unique().tolist()) <= {0.0, 2.0}


def test_drop_path_add_fused_grads_saved_and_compile():
    x, r = make_tensor((6, 10), requires_grad=True, seed=1), make_tensor((6, 10), requires_grad=True, seed=2)
    gen = torch.Generator().manual_seed(11)
    y, sizes = _saved(lambda: regops.drop_path_add(x, r, 0.5, training=True, generator=gen))
    assert sum(s for s, _ in sizes) <= 64
    # each sample is exactly r (dropped) or r + x / (1 - p) (kept); with this seed both happen
    dropped = (y == r).all(1)
    kept = (y == r + x * 2).all(1)
    assert torch.equal(dropped, ~kept) and dropped.any() and kept.any(), (dropped, kept)
    g = make_tensor((6, 10), seed=3)
    dx, dr = torch.autograd.grad(y, (x, r), g)
    assert torch.equal(dr, g)
    assert torch.equal(dx, g * torch.where(kept, 2.0, 0.0)[:, None])
    torch.testing.assert_close(regops.drop_path_add(x, r, 0.5, training=False), x + r)
    assert torch.autograd.gradcheck(
        lambda a, b: torch.ops.regops.drop_path(a, b, _p(0.5), True, SEED), (x.double(), r.double())
    )
    torch.library.opcheck(torch.ops.regops.drop_path, (x, r, _p(0.5), True, SEED))
    torch.library.opcheck(torch.ops.regops.drop_path, (x, None, _p(0.5), False, SEED))
    torch._dynamo.reset()
    f = torch.compile(lambda a, b: regops.drop_path_add(a * 1, b, 0.5, True), fullgraph=True)
    xs, rs = make_tensor((64, 10), seed=4), make_tensor((64, 10), seed=5)
    torch.manual_seed(12)
    out = f(xs, rs)
    # compiled: every sample is exactly the residual or the residual plus the doubled input, and both occur
    dropped, kept = (out == rs).all(1), (out == rs + xs * 2).all(1)
    assert torch.equal(dropped, ~kept) and dropped.any() and kept.any(), (dropped, kept)


def test_drop_path_bad_inputs():
    with pytest.raises(ValueError, match="batch dimension"):
        regops.drop_path(torch.tensor(1.0), 0.1)
    with pytest.raises(ValueError, match="residual must match"):
        regops.drop_path_add(torch.randn(2, 3), torch.randn(2, 4), 0.1)
    with pytest.raises(ValueError, match=r"drop_prob must be in \[0, 1\]"):
        regops.drop_path(torch.randn(2, 3), -0.1)


# ------------------------------------------------------------------------------------------------ shared masks
@pytest.mark.ops("dropout")
def test_shared_dropout_kernel_matches_reference(kernel_target):
    _, device = kernel_target
    for dtype in DTYPES:
        x = make_tensor((3, 5, 67), dtype, device)
        out = torch.ops.regops.shared_dropout(x, _p(0.3), [3, 1, 67], SEED)
        assert torch.equal(out.cpu(), _reference(torch.ops.regops.shared_dropout, x.cpu(), _p(0.3), [3, 1, 67], SEED))


def test_shared_dropout_mask_is_the_dropout_mask_of_the_reduced_shape():
    x = make_tensor((4, 6, 8), torch.float64)
    y = torch.ops.regops.shared_dropout(x, _p(0.4), [4, 1, 8], SEED)
    keep = keep_mask(4321, 99, (4, 1, 8), 0.4)
    assert torch.equal(y, x * torch.where(keep, dropout_scale(0.4), 0.0))
    tokens = regops.shared_dropout(torch.ones(2, 50, 16), 0.5, dims=-1)  # token dropout
    assert torch.equal(tokens, tokens[..., :1].expand_as(tokens))
    features = regops.shared_dropout(torch.ones(2, 50, 16), 0.5, dims=1)  # feature dropout
    assert torch.equal(features, features[:, :1].expand_as(features))


@pytest.mark.parametrize(
    ("fn", "torch_fn", "shape"),
    [
        (regops.dropout1d, F.dropout1d, (4, 6, 9)),
        (regops.dropout1d, F.dropout1d, (6, 9)),
        (regops.dropout2d, F.dropout2d, (4, 6, 3, 3)),
        (regops.dropout3d, F.dropout3d, (4, 6, 2, 2, 2)),
        (regops.dropout3d, F.dropout3d, (6, 2, 2, 2)),
    ],
)
def test_channel_dropout_has_torch_structure(fn, torch_fn, shape):
    x = torch.ones(shape)
    ours, theirs = fn(x, 0.5), torch_fn(x, 0.5)
    lead = 2 if len(shape) in (3, 4, 5) and shape[0] == 4 else 1
    for y in (ours, theirs):  # constant over each channel's spatial extent
        flat = y.reshape(*shape[:lead], -1)
        assert torch.equal(flat, flat[..., :1].expand_as(flat))
    assert set(ours.unique().tolist()) <= {0.0, 2.0}
    assert fn(x, 0.5, training=False) is x


def test_channel_dropout_grads_opcheck_errors():
    x = make_tensor((3, 4, 5), torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: torch.ops.regops.shared_dropout(t, _p(0.5), [3, 4, 1], SEED), (x,))
    torch.library.opcheck(torch.ops.regops.shared_dropout, (x.float(), _p(0.5), [3, 4, 1], SEED))
    with pytest.raises(RuntimeError, match="dropout1d: Expected 2D or 3D input"):
        regops.dropout1d(torch.randn(2, 3, 4, 5), 0.5)
    with pytest.raises(ValueError, match="dims must be ints"):
        regops.shared_dropout(torch.randn(2, 3), 0.5, dims=2)
    with pytest.warns(UserWarning, match="Received a 3D input to dropout2d"):
        regops.dropout2d(torch.randn(2, 3, 4), 0.5)
    y = torch.ones(8, 4, 3)
    out = regops.dropout1d(y, 0.5, inplace=True)
    assert out is y and set(y.unique().tolist()) <= {0.0, 2.0}


def test_patch_covers_channel_dropout_and_timm_drop_path():
    timm_layers = pytest.importorskip("timm.layers")
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 1),
        torch.nn.Dropout2d(0.2),
        torch.nn.Dropout3d(0.1, inplace=True),
        torch.nn.Dropout1d(0.3),
        timm_layers.DropPath(0.1, scale_by_keep=False),
        torch.nn.AlphaDropout(0.1),
    )
    originals = list(model)
    handle = regops.patch(model)
    assert len(handle) == 4
    kinds = [type(m) for m in model]
    assert kinds[1:5] == [regops.nn.Dropout2d, regops.nn.Dropout3d, regops.nn.Dropout1d, regops.nn.DropPath]
    assert model[2].inplace and model[4].drop_prob == 0.1 and model[4].scale_by_keep is False
    assert isinstance(model[1], torch.nn.Dropout2d)
    assert model[:3](torch.randn(2, 3, 4, 4)).shape == (2, 4, 4, 4)
    assert model[3](torch.randn(2, 4, 5)).shape == (2, 4, 5) and model[4](torch.randn(2, 4)).shape == (2, 4)
    handle.revert()
    assert list(model) == originals


# ------------------------------------------------------------------------------------------------ nested dropout
def test_nested_dropout_keeps_a_geometric_prefix():
    p, batch, units = 0.1, 4000, 64
    y = regops.nested_dropout(torch.ones(batch, units), p, generator=torch.Generator().manual_seed(13))
    kept = (y != 0).sum(1)
    assert torch.equal(y != 0, torch.arange(units)[None, :] < kept[:, None])  # a prefix per sample
    assert kept.min().item() >= 1
    # the exact law of min(b, units), b ~ Geometric(p): P(k) = (1-p)^(k-1) p, the rest of the mass at k = units
    k = torch.arange(1, units + 1, dtype=torch.float64)
    law = (1 - p) ** (k - 1) * p
    law[-1] = (1 - p) ** (units - 1)
    mean, var = (k * law).sum().item(), (k.square() * law).sum().item() - (k * law).sum().item() ** 2
    assert abs(kept.double().mean().item() - mean) < 5 * math.sqrt(var / batch)  # 5 sigma
    assert abs((kept == 1).double().mean().item() - p) < 5 * math.sqrt(p * (1 - p) / batch)


def test_nested_dropout_dim_grads_opcheck_errors():
    x = make_tensor((5, 7, 3), torch.float64, requires_grad=True)
    y = torch.ops.regops.nested_dropout(x, _p(0.3), 1, SEED)
    assert torch.equal((y != 0).any(2), (y != 0).all(2))
    assert torch.autograd.gradcheck(lambda t: torch.ops.regops.nested_dropout(t, _p(0.3), 1, SEED), (x,))
    torch.library.opcheck(torch.ops.regops.nested_dropout, (x.float(), _p(0.3), 2, SEED))
    with pytest.raises(ValueError, match="non-batch dimension"):
        regops.nested_dropout(x, 0.3, dim=0)
    with pytest.raises(ValueError, match="nested_dropout needs"):
        regops.nested_dropout(torch.randn(5), 0.3)


# ------------------------------------------------------------------------------------------------ multi-sample
@pytest.mark.ops("multi_sample_dropout_mean")
@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_multi_sample_kernel_matches_reference_and_mean_of_masks(kernel_target, dtype):
    _, device = kernel_target
    x = make_tensor((3, 1001), dtype, device)
    out = torch.ops.regops.multi_sample_dropout_mean(x, _p(0.3), 5, SEED)
    ref = _reference(torch.ops.regops.multi_sample_dropout_mean, x.cpu(), _p(0.3), 5, SEED)
    assert torch.equal(out.cpu(), ref)
    step = multi_sample_counters(x.numel())
    masks = [keep_mask(4321, 99 + k * step, x.shape, 0.3).double() for k in range(5)]
    expected = x.cpu().double() * torch.stack(masks).mean(0) / 0.7
    assert_close(out.cpu(), expected, rtol=1e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-6, atol=1e-3)


def test_multi_sample_module_linear_and_generic_heads():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 3).double()
    feats = make_tensor((4, 16), torch.float64, requires_grad=True)
    msd = regops.nn.MultiSampleDropout(head, num_samples=4, p=0.5)
    torch.manual_seed(1)
    fast = msd(feats)
    torch.manual_seed(1)
    generic = regops.nn.MultiSampleDropout(head, num_samples=4, p=0.5, linear_head=False)(feats)
    torch.testing.assert_close(fast, generic)  # the same K masks, linear head: identical means
    g_fast = torch.autograd.grad(fast.sum(), feats)[0]
    g_gen = torch.autograd.grad(generic.sum(), feats)[0]
    torch.testing.assert_close(g_fast, g_gen)
    target = torch.tensor([0, 1, 2, 0])
    torch.manual_seed(2)
    loss = msd.loss(feats, target, F.cross_entropy)
    torch.manual_seed(2)
    from regops.dropout._multi_sample import multi_sample_seeds

    _, seeds = multi_sample_seeds(feats, 4)
    manual = torch.stack([F.cross_entropy(head(torch.ops.regops.dropout(feats, _p(0.5), s)), target) for s in seeds])
    torch.testing.assert_close(loss, manual.mean())
    assert torch.equal(msd.eval()(feats), head(feats))


def test_multi_sample_memory_grads_opcheck():
    x = torch.randn(64, 256, requires_grad=True)
    y, sizes = _saved(lambda: regops.multi_sample_dropout(x, 0.5, 8))
    assert sum(s for s, _ in sizes) <= 64
    xd = make_tensor((3, 7), torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: torch.ops.regops.multi_sample_dropout_mean(t, _p(0.5), 3, SEED), (xd,))
    torch.library.opcheck(torch.ops.regops.multi_sample_dropout_mean, (xd.float(), _p(0.5), 3, SEED))
    with pytest.raises(ValueError, match="num_samples"):
        regops.multi_sample_dropout(x, 0.5, 0)
    with pytest.raises(ValueError, match="num_samples"):
        regops.nn.MultiSampleDropout(torch.nn.Identity(), num_samples=0)


# ------------------------------------------------------------------------------------------------ bitmask mode
@pytest.mark.ops("dropout_bitmask", "apply_bitmask")
@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bitmask_kernel_matches_reference(kernel_target, dtype):
    _, device = kernel_target
    for n in (1, 63, 1000, 4097):
        x = make_tensor((n,), dtype, device)
        y, bits = torch.ops.regops.dropout_bitmask(x, _p(0.3), SEED)
        y_ref, bits_ref = _reference(torch.ops.regops.dropout_bitmask, x.cpu(), _p(0.3), SEED)
        assert torch.equal(y.cpu(), y_ref) and torch.equal(bits.cpu(), bits_ref) and bits.numel() == (n + 7) // 8
        assert torch.equal(y.cpu(), _reference(torch.ops.regops.dropout, x.cpu(), _p(0.3), SEED))
        g = make_tensor((n,), dtype, device, seed=3)
        out = torch.ops.regops.apply_bitmask(g, bits, _p(0.5))
        assert torch.equal(out.cpu(), _reference(torch.ops.regops.apply_bitmask, g.cpu(), bits.cpu(), _p(0.5)))


def test_bitmask_pack_roundtrip_saved_bytes_and_grads():
    keep = torch.rand(1001) > 0.5
    assert torch.equal(unpack_bits(pack_bits(keep), 1001), keep)
    x = torch.randn(1 << 16, requires_grad=True)
    torch.manual_seed(3)
    y, sizes = _saved(lambda: regops.dropout(x, 0.2, mask_mode="bitmask"))
    assert sizes == [((1 << 16) // 8, torch.uint8), (8, torch.float64)]  # the bits and the 0-dim p
    torch.manual_seed(3)
    y_re = regops.dropout(x, 0.2)
    assert torch.equal(y, y_re)
    (dx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    (dx_re,) = torch.autograd.grad(y_re, x, torch.ones_like(y))
    assert torch.equal(dx, dx_re)
    xd = make_tensor((5, 7), torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: torch.ops.regops.dropout_bitmask(t, _p(0.4), SEED)[0], (xd,))
    assert torch.autograd.gradgradcheck(lambda t: torch.ops.regops.dropout_bitmask(t, _p(0.4), SEED)[0], (xd,))
    torch.library.opcheck(torch.ops.regops.dropout_bitmask, (xd.float(), _p(0.4), SEED))
    with pytest.raises(ValueError, match="mask_mode"):
        regops.dropout(x, 0.2, mask_mode="bool")


def test_bitmask_compile_fullgraph():
    torch._dynamo.reset()
    f = torch.compile(lambda t: regops.dropout(t * 2, 0.5, mask_mode="bitmask"), fullgraph=True)
    x = torch.randn(100, requires_grad=True)
    y = f(x)
    y.sum().backward()
    assert torch.equal(x.grad != 0, y != 0)
