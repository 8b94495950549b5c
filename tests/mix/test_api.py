"""The mix family's public functions and classes: the documented distributions (5-sigma, seeded), partners and odd
batches, layouts and dtypes, dense masks, manifold mixup's gradients, in-place mixing, and clear errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import regops
from regops.mix import _params as P
from regops.mix import reference as R


def _example_params(batch: int, height: int, width: int, seed: int = 0) -> regops.MixParams:
    torch.manual_seed(seed)
    return regops.Mixup(mixup_alpha=1.0, cutmix_alpha=1.0, mode="elem", partner="random").sample_params(
        torch.zeros(batch, 1, height, width)
    )


def test_mixup_disabled_and_prob_zero_pass_through():
    x, y = torch.randn(4, 3, 5, 5), torch.tensor([0, 1, 2, 3])
    mixer = regops.Mixup(mixup_alpha=1.0, cutmix_alpha=1.0, num_classes=4, label_smoothing=0.0)
    mixer.mixup_enabled = False
    out, target = mixer(x, y)
    assert torch.equal(out, x) and torch.equal(target, F.one_hot(y, 4).float())
    out, _ = regops.Mixup(prob=0.0, num_classes=4, mode="elem")(x, y)
    assert torch.equal(out, x)


def test_v2_classes_reject_bad_input():
    x = torch.randn(4, 3, 6, 6)
    with pytest.raises(ValueError, match="num_classes must be given"):
        regops.MixUp()(x, torch.arange(4))
    with pytest.raises(ValueError, match="alpha must be > 0"):
        regops.MixUp(alpha=0.0)
    with pytest.raises(ValueError, match="batched input"):
        regops.MixUp(num_classes=5)(x[0], torch.arange(3))


def test_lambda_and_coin_statistics_follow_the_documented_distributions():
    n, alpha = 40000, 0.4
    x = torch.zeros(n, 2)
    gen = torch.Generator().manual_seed(1234)
    _, mix = regops.mix_batch(
        x, torch.zeros(n, dtype=torch.long), mixup_alpha=alpha, mode="elem", prob=0.7, generator=gen
    )
    lam = mix.lam.double()
    mixed = lam != 1.0
    assert abs(mixed.double().mean().item() - 0.7) < 5 * math.sqrt(0.21 / n)
    # Beta(a, a): mean 1/2, variance 1 / (4 (2a + 1)); E|lam - 1/2| checks the shape beyond two moments.
    lam_m = lam[mixed]
    k = lam_m.numel()
    var = 1 / (4 * (2 * alpha + 1))
    assert abs(lam_m.mean().item() - 0.5) < 5 * math.sqrt(var / k)
    assert abs(lam_m.var().item() - var) < 0.01
    cdf_at_quarter = (lam_m < 0.25).double().mean().item()
    expected = _beta_cdf(0.25, alpha)
    assert abs(cdf_at_quarter - expected) < 5 * math.sqrt(expected * (1 - expected) / k)


@pytest.mark.parametrize("alpha", [0.2, 0.8, 1.0, 3.0])
def test_batch_mode_host_draws_follow_the_documented_distributions(alpha):
    """Batch mode on CPU draws its one lambda on the host (Gamma draws by Marsaglia and Tsang): Beta(a, a) still,
    and the same draws for the same seed."""
    n = 40000
    u = P._uniforms(torch.Generator().manual_seed(99))
    lam = torch.tensor([P._beta(alpha, u) for _ in range(n)], dtype=torch.float64)
    var = 1 / (4 * (2 * alpha + 1))
    assert abs(lam.mean().item() - 0.5) < 5 * math.sqrt(var / n)
    assert abs(lam.var().item() - var) < 5 * math.sqrt(1 / 16 / n)  # |lam - 1/2| <= 1/2: 4th moment <= 1/16
    expected = _beta_cdf(0.25, alpha)
    assert abs((lam < 0.25).double().mean().item() - expected) < 5 * math.sqrt(expected * (1 - expected) / n)
    kw = dict(mixup_alpha=alpha, cutmix_alpha=1.0, mode="batch", num_classes=4)
    x, y = torch.randn(5, 3, 8, 8), torch.arange(5) % 4
    first = regops.Mixup(**kw, generator=torch.Generator().manual_seed(3))(x, y)
    again = regops.Mixup(**kw, generator=torch.Generator().manual_seed(3))(x, y)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))


@pytest.mark.parametrize("batch", [1, 6, 7])
@pytest.mark.parametrize("partner", ["flip", "roll", "random"])
def test_batch_mode_host_weights_and_targets_have_the_general_bits(batch, partner):
    """Batch mode on CPU fills the weights and the soft targets from its host draw: the same bits as the general
    formulas (MixParams' weights from lam and the boxes, regops.mix.reference.mixed_one_hot)."""
    gen = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, 3, 6, 6)
    for i in range(40):
        smoothing = (0.0, 0.1, 0.3)[i % 3]
        mixup = regops.Mixup(mixup_alpha=0.7, cutmix_alpha=1.0, mode="batch", num_classes=5, partner=partner,
                             label_smoothing=smoothing, generator=gen)  # fmt: skip
        y = torch.randint(0, 5, (batch,), generator=gen)
        p = mixup.sample_params(x)
        assert p._host is not None
        general = regops.MixParams(lam=p.lam, partner=p.partner, box=p.box, use_cutmix=p.use_cutmix)
        assert general._host is None
        for fast, slow in zip(p.image_weights + p.label_weights, general.image_weights + general.label_weights,
                              strict=True):  # fmt: skip
            assert torch.equal(fast, slow)
        _, soft = mixup(x, y, params=p)
        expected = R.mixed_one_hot(y, y[p.partner], *general.label_weights, 5, smoothing)
        assert torch.equal(soft, expected), (i, p.lam)


def _beta_cdf(x: float, a: float, steps: int = 200000) -> float:
    """Regularised incomplete beta I_x(a, a) by the midpoint rule on t = x u^(1/a) (smooth integrand)."""
    u = (torch.arange(steps, dtype=torch.float64) + 0.5) / steps
    t = x * u ** (1 / a)
    integral = (x**a / a) * ((1 - t) ** (a - 1)).mean().item()
    return integral / math.exp(2 * math.lgamma(a) - math.lgamma(2 * a))


def test_cutmix_boxes_follow_timm_geometry_and_switch_prob():
    n, height, width = 20000, 32, 24
    x = torch.zeros(n, 1, height, width)
    gen = torch.Generator().manual_seed(7)
    mixer = regops.Mixup(mixup_alpha=1.0, cutmix_alpha=1.0, switch_prob=0.3, mode="elem", generator=gen)
    p = mixer.sample_params(x)
    cut = p.use_cutmix
    assert abs(cut.double().mean().item() - 0.3) < 5 * math.sqrt(0.21 / n)
    box = p.box[cut].double()
    area = (box[:, 1] - box[:, 0]) * (box[:, 3] - box[:, 2])
    # The label weight is exactly the area left to the sample.
    assert torch.equal(p.lam[cut].float(), (1 - area / (height * width)).float())
    # Unclipped boxes of a centre-uniform square with side ratio sqrt(1 - lam), lam ~ U(0, 1): E[area] < E[1 - lam]
    # by exactly the clipped part; centres are uniform, so mean box centre is the image centre.
    cy = (box[:, 0] + box[:, 1]) / 2
    assert abs(cy.mean().item() - height / 2) < 0.3
    frac = area / (height * width)
    assert 0.2 < frac.mean().item() < 0.5
    assert (box[:, 1] <= height).all() and (box[:, 3] <= width).all() and (box >= 0).all()


def test_minmax_boxes_have_uniform_sides_in_range():
    n, height, width = 20000, 20, 30
    gen = torch.Generator().manual_seed(3)
    mixer = regops.Mixup(mixup_alpha=0.0, cutmix_minmax=(0.25, 0.75), mode="elem", generator=gen)
    p = mixer.sample_params(torch.zeros(n, 1, height, width))
    sides_h = (p.box[:, 1] - p.box[:, 0])[p.use_cutmix]
    lo, hi = int(height * 0.25), int(height * 0.75)
    counts = torch.bincount(sides_h - lo, minlength=hi - lo)
    assert sides_h.min() == lo and sides_h.max() == hi - 1 and counts.numel() == hi - lo
    expected = sides_h.numel() / (hi - lo)
    assert ((counts.double() - expected).abs() < 5 * math.sqrt(expected)).all()


def test_draws_follow_torch_manual_seed_and_generators():
    x, y = torch.randn(6, 3, 8, 8), torch.arange(6)
    kw = dict(mixup_alpha=0.5, cutmix_alpha=1.0, mode="elem", partner="random")
    torch.manual_seed(11)
    a, ma = regops.mix_batch(x, y, **kw)
    torch.manual_seed(11)
    b, mb = regops.mix_batch(x, y, **kw)
    assert torch.equal(a, b) and torch.equal(ma.lam, mb.lam)
    c, _ = regops.mix_batch(x, y, generator=torch.Generator().manual_seed(11), **kw)
    d, _ = regops.mix_batch(x, y, generator=torch.Generator().manual_seed(11), **kw)
    assert torch.equal(c, d)


@pytest.mark.parametrize("batch", [1, 3, 5, 7])
@pytest.mark.parametrize("mode", ["batch", "pair", "elem"])
def test_odd_batches_flip_partner_leaves_middle_unmixed(batch, mode):
    x, y = torch.randn(batch, 2, 6, 6), torch.arange(batch)
    torch.manual_seed(batch)
    out, mix = regops.mix_batch(x, y, mixup_alpha=1.0, cutmix_alpha=1.0, mode=mode, num_classes=batch)
    mid = batch // 2
    assert torch.equal(mix.params.partner, torch.arange(batch).flip(0))
    assert mix.lam[mid] == 1.0 and torch.equal(out[mid], x[mid])
    expected = R.mix_apply(x, *mix.params.image_weights, mix.params.partner, mix.params.box)
    assert torch.equal(out, expected)
    if mode == "pair":
        assert torch.equal(mix.lam, mix.lam.flip(0))


@pytest.mark.parametrize("mode", ["elem", "pair"])
def test_roll_and_random_partners(mode):
    x, y = torch.randn(7, 2, 4, 4), torch.arange(7)
    torch.manual_seed(0)
    _, mix = regops.mix_batch(x, y, mode=mode, partner="random")
    partner = mix.params.partner
    assert torch.equal(partner.sort().values, torch.arange(7))
    assert torch.equal(mix.target_b, y[partner])
    if mode == "pair":
        assert torch.equal(partner[partner], torch.arange(7))  # a matching: partners of partners
        assert torch.equal(mix.lam, mix.lam[partner])
    else:
        _, rolled = regops.mix_batch(x, y, mode=mode, partner="roll")
        assert torch.equal(rolled.params.partner, torch.arange(7).roll(1))


def test_channels_last_and_uint8_images():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, 10, 12, generator=gen)
    y = torch.arange(6)
    params = regops.Mixup(mixup_alpha=1.0, cutmix_alpha=1.0, mode="elem", num_classes=6).sample_params(x)
    ref, _ = regops.mix_batch(x, y, params=params)
    cl, _ = regops.mix_batch(x.contiguous(memory_format=torch.channels_last), y, params=params)
    assert cl.is_contiguous(memory_format=torch.channels_last) and torch.equal(cl, ref)
    img = (torch.rand(6, 3, 10, 12, generator=gen) * 255).to(torch.uint8)
    out, _ = regops.mix_batch(img, y, params=params)
    assert out.dtype == torch.uint8
    w_self, w_other = params.image_weights
    blend = img.float() * w_self.view(-1, 1, 1, 1) + img[params.partner].float() * w_other.view(-1, 1, 1, 1)
    inside = R.box_mask(params.box, 10, 12)
    expected = torch.where(inside, img[params.partner].float(), blend).round().clamp(0, 255).to(torch.uint8)
    assert torch.equal(out, expected)


def test_input_is_not_modified_and_noncontiguous_input():
    x = torch.randn(4, 3, 8, 16)[..., ::2]
    before = x.clone()
    out, _ = regops.mix_batch(x, torch.arange(4), mixup_alpha=1.0, cutmix_alpha=1.0, mode="elem")
    assert torch.equal(x, before) and out.shape == x.shape


def test_dense_masks_are_mixed_with_the_same_boxes_and_lambdas():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(6, 3, 9, 7, generator=gen)
    soft_mask = torch.rand(6, 1, 9, 7, generator=gen)
    seg = torch.randint(0, 5, (6, 9, 7), generator=gen)
    torch.manual_seed(4)
    out, mix = regops.mix_batch(
        x, torch.arange(6), mixup_alpha=1.0, cutmix_alpha=1.0, mode="elem", masks=[soft_mask, seg]
    )
    p = mix.params
    assert torch.equal(mix.masks[0], R.mix_apply(soft_mask, *p.image_weights, p.partner, p.box))
    inside = R.box_mask(p.box, 9, 7)[:, 0]
    assert torch.equal(mix.masks[1], torch.where(inside, seg[p.partner], seg))
    assert torch.equal(mix.masks_b[1], seg[p.partner]) and mix.masks_b[0] is None
    assert torch.equal(mix.mask_lam, torch.where(p.use_cutmix, 1.0, mix.lam))
    with pytest.raises(ValueError, match="masks must be"):
        regops.mix_batch(x, torch.arange(6), masks=seg[:, :8])


def test_manifold_mix_gradients_reach_both_partners_and_gradcheck():
    p = _example_params(4, 3, 5, seed=2)
    h = torch.randn(4, 2, 3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: regops.manifold_mix(t, p), (h,))
    out = regops.manifold_mix(h, p)
    (grad,) = torch.autograd.grad(out.sum(), h)
    w_self, w_other = p.image_weights
    inside = R.box_mask(p.box, 3, 5).double()
    expected = (1 - inside) * w_self.double().view(-1, 1, 1, 1)
    other = inside + (1 - inside) * w_other.double().view(-1, 1, 1, 1)
    expected = expected.expand(4, 2, 3, 5).clone().index_add_(0, p.partner, other.expand(4, 2, 3, 5))
    torch.testing.assert_close(grad, expected)
    mixup_only = regops.MixParams(p.lam, p.partner, torch.zeros_like(p.box), torch.zeros_like(p.use_cutmix))
    h2 = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: regops.manifold_mix(t, mixup_only), (h2,))


def test_bad_input_raises_clear_errors():
    x, y = torch.randn(4, 3, 8, 8), torch.arange(4)
    with pytest.raises(TypeError, match="integer class indices"):
        regops.mix_batch(x, y.float())
    with pytest.raises(ValueError, match=r"shape \[4\]"):
        regops.mix_batch(x, y[:3])
    with pytest.raises(ValueError, match="outside"):
        regops.mix_batch(x, torch.tensor([0, 1, 2, 10]), num_classes=10)
    with pytest.raises(ValueError, match="outside"):
        regops.Mixup(num_classes=3)(x, y)
    with pytest.raises(ValueError, match="both 0"):
        regops.mix_batch(x, y, mixup_alpha=0.0, cutmix_alpha=0.0)
    with pytest.raises(ValueError, match=">= 0"):
        regops.Mixup(mixup_alpha=-1.0)
    with pytest.raises(ValueError, match="cutmix_minmax"):
        regops.Mixup(cutmix_minmax=(0.8, 0.2))
    with pytest.raises(ValueError, match="cutmix_minmax"):
        regops.Mixup(cutmix_minmax=(0.2,))
    with pytest.raises(ValueError, match="empty box-size range"):
        regops.mix_batch(torch.randn(4, 3, 2, 2), y, cutmix_minmax=(0.1, 0.3))
    with pytest.raises(ValueError, match="mode must be"):
        regops.Mixup(mode="pairs")
    with pytest.raises(ValueError, match="pair"):
        regops.Mixup(mode="pair", partner="roll")
    with pytest.raises(TypeError, match="uint8"):
        regops.mix_batch(x.int(), y)
    with pytest.raises(ValueError, match=">= 3 dims"):
        regops.mix_batch(torch.randn(4, 5), y, cutmix_alpha=1.0)
    with pytest.raises(TypeError, match="generator"):
        regops.mix_batch(x, y, generator="seed")
    with pytest.raises(ValueError, match="multi-label"):
        regops.Mixup(multi_label=True, num_classes=4)(x, y)


def test_mixed_targets_rejects_labels_outside_num_classes():
    y = torch.tensor([0, 3, 9, 1])
    _, mix = regops.mix_batch(torch.randn(4, 3, 4, 4), y, mixup_alpha=1.0)
    assert regops.mixed_targets(mix, 10).shape == (4, 10)
    with pytest.raises(ValueError, match="outside"):
        regops.mixed_targets(mix, 9)
    mix.target_b[0] = -1
    with pytest.raises(ValueError, match="outside"):
        regops.mixed_targets(mix, 10)
    with pytest.raises(TypeError, match="MixedBatch"):
        regops.mixed_targets(None, 10)


def test_inplace_mixup_mixes_x_like_timm():
    torch.manual_seed(0)
    x = torch.randn(6, 3, 8, 8)
    y = torch.randint(0, 10, (6,))
    mixup = regops.Mixup(mixup_alpha=1.0, cutmix_alpha=1.0, mode="elem", num_classes=10)
    params = mixup.sample_params(x)
    expected, soft = mixup(x, y, params)  # default: x untouched, a new tensor
    x_in = x.clone()
    out, soft_inplace = mixup(x_in, y, params, inplace=True)
    assert out is x_in and torch.equal(x_in, expected) and torch.equal(soft, soft_inplace)
    x_ctor = x.clone()
    regops.Mixup(mixup_alpha=1.0, cutmix_alpha=1.0, mode="elem", num_classes=10, inplace=True)(x_ctor, y, params)
    assert torch.equal(x_ctor, expected)  # code ported from timm that ignores the returned x still trains on mixed x
    x_fn = x.clone()
    out, _ = regops.mix_batch(x_fn, y, params=params, inplace=True)
    assert out is x_fn and torch.equal(x_fn, expected)
    with pytest.raises(ValueError, match="requires grad"):
        regops.mix_batch(x.clone().requires_grad_(), y, params=params, inplace=True)
