"""The losses against the functions they replace: torch's F.cross_entropy (weights, smoothing, reductions, the
class dim of [N, C, d1, ...] inputs), Liger-Kernel's z-loss and smoothing, timm's SoftTargetCrossEntropy,
mixup_target and BinaryCrossEntropy; the class-dim traps (a [B, T, V] call without class_dim raises rather than
giving another loss) and float64 weights in the mixed BCE."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import regops
from tests.losses.helpers import F64, data, grad_of


# The peers are the reference only in the parity tests: those (and no others) skip when a peer is missing.
@pytest.fixture
def timm_mixup():
    return pytest.importorskip("timm.data.mixup")


@pytest.fixture
def timm_loss():
    return pytest.importorskip("timm.loss")


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_matches_torch_cross_entropy(dtype, smoothing):
    x, y, g = data(n=12, k=10, seed=6, dtype=dtype)
    y[[1, 5]] = -100
    w = torch.rand(10, generator=g).to(dtype)
    for kw in ({}, {"weight": w}):
        for reduction in ("mean", "sum", "none"):
            ours = regops.cross_entropy(x, y, label_smoothing=smoothing, reduction=reduction, **kw)
            ref = F.cross_entropy(x, y, label_smoothing=smoothing, reduction=reduction, **kw)
            torch.testing.assert_close(ours, ref.to(ours.dtype))
            gy = torch.randn_like(ref)
            torch.testing.assert_close(grad_of((ours * gy).sum(), x), grad_of((ref * gy).sum(), x))


def test_matches_liger_definitions_of_z_loss_and_smoothing():
    """Liger-Kernel: loss = (1-eps) nll + eps * (lse - mean z)  (smooth_loss = sum(-eps/V z) + eps lse), plus
    z_loss = lse_square_scale * lse^2 per non-ignored row, "mean" dividing both by the non-ignored count."""
    x, y, _ = data(n=10, k=12, seed=7)
    y[0] = -100
    eps, zs = 0.1, 1e-2
    lse = torch.logsumexp(x, 1)
    keep = y != -100
    ys = y.clamp(min=0)
    nll = lse - x.gather(1, ys[:, None])[:, 0]
    smooth = (-(eps / 12) * x).sum(1) + eps * lse
    liger = torch.where(keep, (1 - eps) * nll + smooth + zs * lse**2, 0.0).sum() / keep.sum()
    ours = regops.cross_entropy(x, y, label_smoothing=eps, z_loss=zs)
    torch.testing.assert_close(ours, liger, rtol=0, atol=1e-12)
    torch.testing.assert_close(grad_of(ours, x), grad_of(liger, x), rtol=0, atol=1e-12)


def test_mixed_targets_match_timm_soft_target_cross_entropy():
    timm_loss = pytest.importorskip("timm.loss")
    x, y, g = data(n=8, k=10, seed=8, dtype=torch.float32)
    _, mix = regops.mix_batch(torch.randn(8, 3, 8, 8, generator=g), y, mixup_alpha=1.0, cutmix_alpha=1.0,
                              mode="elem", label_smoothing=0.1, generator=g)  # fmt: skip
    dense = regops.mixed_targets(mix, 10)  # timm's mixup_target (tested equal in test_mix.py)
    ref = timm_loss.SoftTargetCrossEntropy()(x, dense)
    ours = regops.cross_entropy(x, mix=mix)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(grad_of(ours, x), grad_of(ref, x))


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("mode", ["batch", "elem"])
def test_mix_cross_entropy_equals_dense_soft_target_loss(mode, smoothing, timm_mixup, timm_loss):
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 3, 6, 6, generator=gen), torch.randint(0, 50, (8,), generator=gen)
    torch.manual_seed(1)
    _, mix = regops.mix_batch(x, y, mixup_alpha=0.8, cutmix_alpha=1.0, mode=mode, num_classes=50)
    z = torch.randn(8, 50, generator=gen, requires_grad=True)
    loss = regops.mix_cross_entropy(z, mix, label_smoothing=smoothing)
    (g,) = torch.autograd.grad(loss, z)
    dense = timm_mixup.mixup_target(y, 50, mix.lam.view(-1, 1), smoothing)
    z2 = z.detach().clone().requires_grad_()
    ref = timm_loss.SoftTargetCrossEntropy()(z2, dense)
    (g2,) = torch.autograd.grad(ref, z2)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g, g2, rtol=1e-5, atol=1e-7)
    # The lam of the loss and the dense target's rows agree with index labels and F.cross_entropy.
    per_row = regops.mix_cross_entropy(z, mix, label_smoothing=smoothing, reduction="none")
    expected = mix.lam * F.cross_entropy(z, mix.target_a, reduction="none", label_smoothing=smoothing) + (
        1 - mix.lam
    ) * F.cross_entropy(z, mix.target_b, reduction="none", label_smoothing=smoothing)
    torch.testing.assert_close(per_row, expected, rtol=1e-5, atol=1e-6)


def test_soft_target_cross_entropy_equals_timm(timm_loss):
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(6, 40, generator=gen, requires_grad=True)
    t = torch.softmax(torch.randn(6, 40, generator=gen), 1).requires_grad_()
    loss = regops.soft_target_cross_entropy(z, t)
    gz, gt = torch.autograd.grad(loss, (z, t))
    z2, t2 = z.detach().clone().requires_grad_(), t.detach().clone().requires_grad_()
    ref = timm_loss.SoftTargetCrossEntropy()(z2, t2)
    rz, rt = torch.autograd.grad(ref, (z2, t2))
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(gz, rz)
    torch.testing.assert_close(gt, rt)
    assert torch.allclose(regops.SoftTargetCrossEntropy()(z, t), ref)


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(target_threshold=0.2),
        dict(sum_classes=True),
        dict(reduction="sum", pos_weight=2.0),
        dict(weight="rand", pos_weight="rand"),
    ],
)
def test_mix_binary_cross_entropy_equals_timm(kw, timm_loss):
    gen = torch.Generator().manual_seed(0)
    classes = 30
    y = torch.randint(0, classes, (8,), generator=gen)
    torch.manual_seed(2)
    _, mix = regops.mix_batch(torch.zeros(8, 1, 4, 4), y, mixup_alpha=1.0, cutmix_alpha=1.0, mode="elem")
    kw = {k: (torch.rand(classes, generator=gen) * 2 if v == "rand" else v) for k, v in kw.items()}
    z = torch.randn(8, classes, generator=gen, requires_grad=True)
    loss = regops.mix_binary_cross_entropy(z, mix, 0.1, **kw)
    (g,) = torch.autograd.grad(loss, z)
    dense = regops.mixed_targets(mix, classes, 0.1)
    z2 = z.detach().clone().requires_grad_()
    ref = timm_loss.BinaryCrossEntropy(**kw)(z2, dense)
    (g2,) = torch.autograd.grad(ref, z2)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g, g2, rtol=1e-5, atol=1e-7)


@pytest.mark.ops("cross_entropy", "cross_entropy_backward")
def test_cross_entropy_reads_classes_in_dim_1_as_torch_does(kernel_target):
    """[N, C, L] logits with C == L: classes in dim 1, as torch reads them (classes last is a different loss)."""
    _, device = kernel_target
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 4, dtype=torch.float32, generator=g).to(device).requires_grad_()
    y = torch.randint(0, 4, (2, 4), generator=g).to(device)
    for loss_fn in (regops.cross_entropy, regops.nn.CrossEntropyLoss()):
        ours = loss_fn(x, y)
        ref = F.cross_entropy(x, y)
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(torch.autograd.grad(ours, x)[0], torch.autograd.grad(ref, x)[0])
    # classes last needs saying so; without it a [B, T, V] call raises and says how to write it
    lm = torch.randn(2, 3, 5, generator=g).to(device)
    t = torch.randint(0, 5, (2, 3), generator=g).to(device)
    with pytest.raises(ValueError, match="class_dim=-1"):
        regops.cross_entropy(lm, t)
    with pytest.raises(ValueError, match="class_dim=-1"):
        regops.nn.CrossEntropyLoss()(lm, t)
    want = F.cross_entropy(lm.transpose(1, 2), t, label_smoothing=0.1)
    torch.testing.assert_close(regops.cross_entropy(lm, t, class_dim=-1, label_smoothing=0.1), want)
    torch.testing.assert_close(regops.nn.CrossEntropyLoss(label_smoothing=0.1, class_dim=-1)(lm, t), want)


def test_cross_entropy_segmentation_and_unbatched_shapes_match_torch():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 4, 5, dtype=F64, generator=g, requires_grad=True)
    y = torch.randint(0, 3, (2, 4, 5), generator=g)
    y[0, 0, 0] = -100
    w = torch.rand(3, dtype=F64, generator=g) + 0.5
    for reduction in ("mean", "sum", "none"):
        ours = regops.cross_entropy(x, y, weight=w, label_smoothing=0.1, reduction=reduction)
        ref = F.cross_entropy(x, y, weight=w, label_smoothing=0.1, reduction=reduction)
        torch.testing.assert_close(ours, ref)
        gy = torch.randn_like(ref)
        torch.testing.assert_close(torch.autograd.grad(ours, x, gy)[0], torch.autograd.grad(ref, x, gy)[0])
    _, stats = regops.cross_entropy(x, y, return_stats=True)
    assert stats.loss.shape == y.shape
    z = torch.randn(5, dtype=F64, generator=g)
    torch.testing.assert_close(regops.cross_entropy(z, torch.tensor(2)), F.cross_entropy(z, torch.tensor(2)))
    # an explicit class_dim anywhere
    torch.testing.assert_close(regops.cross_entropy(x.movedim(1, 3), y, class_dim=3), F.cross_entropy(x, y))


def test_symmetric_kl_of_3d_logits_needs_a_class_dim():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(2, 4, 4, dtype=F64, generator=g), torch.randn(2, 4, 4, dtype=F64, generator=g)
    with pytest.raises(ValueError, match="needs class_dim"):
        regops.symmetric_kl(a, b)
    pa, pb = a.log_softmax(1), b.log_softmax(1)
    want = (0.5 * ((pa.exp() - pb.exp()) * (pa - pb)).sum(1)).mean()
    torch.testing.assert_close(regops.symmetric_kl(a, b, class_dim=1), want)
    torch.testing.assert_close(regops.symmetric_kl(a.transpose(1, 2), b.transpose(1, 2), class_dim=-1), want)


@pytest.mark.ops("mix_binary_cross_entropy", "mix_binary_cross_entropy_backward")
def test_mix_binary_cross_entropy_keeps_float64_weights(kernel_target):
    """A Python-number pos_weight goes to float64 directly (through a float32 tensor it would be 1.6e-9 off)."""
    _, device = kernel_target
    g = torch.Generator().manual_seed(0)
    b, c = 6, 5
    y = torch.randint(0, c, (b,), generator=g).to(device)
    images = torch.randn(b, 3, dtype=F64, generator=g).to(device)
    _, mix = regops.mix_batch(images, y, mixup_alpha=0.8, num_classes=c)
    z = torch.randn(b, c, dtype=F64, generator=g)
    lam = mix.params.lam.double().cpu()[:, None]
    ta, tb = F.one_hot(mix.target_a.cpu(), c).double(), F.one_hot(mix.target_b.cpu(), c).double()
    t = lam * ta + (1 - lam) * tb
    w = torch.rand(c, dtype=F64, generator=g) + 0.1
    for kw in (dict(pos_weight=1 / 3), dict(weight=w, pos_weight=1 / 7), dict(pos_weight=w)):
        on_device = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
        got = regops.mix_binary_cross_entropy(z.to(device), mix, label_smoothing=0.0, **on_device)
        pw = kw["pos_weight"]
        pw = torch.tensor(pw, dtype=F64) if isinstance(pw, float) else pw
        want = F.binary_cross_entropy_with_logits(z, t, kw.get("weight"), pos_weight=pw)
        assert got.dtype == F64
        torch.testing.assert_close(got.cpu(), want, rtol=1e-14, atol=1e-15)
