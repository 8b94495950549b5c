"""MixUp / CutMix: parity with timm and torchvision for the same draws, distributions, kernels vs references,
manifold-mixup gradients, fused losses vs dense targets, opcheck, torch.compile, bad input."""

from __future__ import annotations

import math
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import regops
from regops import mix as M
from regops.reference import mix as R

MIXED_LOSS_OPS = tuple(
    f"{name}{part}"
    for name in ("mix_cross_entropy", "soft_target_cross_entropy", "mix_binary_cross_entropy")
    for part in ("", "_backward")
)


# The peers are the reference only in the parity tests: those (and no others) skip when a peer is missing.
@pytest.fixture
def timm_mixup():
    return pytest.importorskip("timm.data.mixup")


@pytest.fixture
def timm_loss():
    return pytest.importorskip("timm.loss")


@pytest.fixture
def tv2():
    return pytest.importorskip("torchvision.transforms.v2")


# ============================================================================================ timm parity
class _ScriptedRandom:
    """Stands in for ``numpy.random`` inside timm's mixup module: returns regops' own draws.

    ``rand`` and ``beta`` return the uniform / Beta draws regops made; ``randint(low, high)`` maps regops' next
    uniform draw to ``low + floor(u * (high - low))`` (how regops turns uniforms into integers), so timm's own
    bounds are used and any disagreement about them shows up as a different output.
    """

    def __init__(self, draws: M._Draws, cfg: M._Config, n: int, minmax: bool):
        def arr(t):
            return None if t is None else t.double().cpu().numpy()

        both = cfg.mixup_alpha > 0 and cfg.cutmix_alpha > 0
        self.rands = ([arr(draws.switch)] if both else []) + [arr(draws.apply)]
        if cfg.mode == "batch":  # timm: prob coin first, then the switch coin
            self.rands = [arr(draws.apply)] + ([arr(draws.switch)] if both else [])
        self.betas = {cfg.mixup_alpha: arr(draws.lam_mixup), cfg.cutmix_alpha: arr(draws.lam_cutmix)}
        # randint order per mixed CutMix sample: (h, w, y, x) for min/max boxes, (y, x) for alpha boxes.
        u = {k: arr(getattr(draws, k)) for k in ("u_y", "u_x", "u_h", "u_w")}
        self.int_streams = (["u_h", "u_w", "u_y", "u_x"] if minmax else ["u_y", "u_x"], u)
        self.mode = cfg.mode
        self.sample = 0
        self.int_calls = 0

    def rand(self, *size):
        value = self.rands.pop(0)
        return value[0] if not size else value[: size[0]]  # pair mode asks for B // 2

    def beta(self, a, b, size=None):
        value = self.betas[a]
        return value[0] if size is None else value[:size]

    def set_sample(self, i):
        self.sample, self.int_calls = i, 0

    def randint(self, low, high, size=None):
        names, u = self.int_streams
        name = names[self.int_calls % len(names)]
        self.int_calls += 1
        sample = 0 if self.mode == "batch" else self.sample
        return int(low + math.floor(u[name][sample] * (high - low)))


def _timm_with_draws(monkeypatch, timm_mixup, kwargs, x, y, draws, cfg):
    """Run timm's Mixup on (x, y) with NumPy replaced by regops' draws."""
    scripted = _ScriptedRandom(draws, cfg, x.shape[0], kwargs.get("cutmix_minmax") is not None)
    fake_np = types.SimpleNamespace(**{k: getattr(np, k) for k in dir(np) if not k.startswith("__")})
    fake_np.random = scripted
    monkeypatch.setattr(timm_mixup, "np", fake_np)
    real_bbox = timm_mixup.cutmix_bbox_and_lam
    calls = {"i": 0}
    order = list(range(x.shape[0] // 2)) if cfg.mode == "pair" else list(range(x.shape[0]))

    def bbox_for_next_sample(*args, **kw):
        # timm calls this once per mixed CutMix sample, in batch order; point the scripted randint at it.
        if cfg.mode != "batch":
            while True:
                i = order[calls["i"]]
                calls["i"] += 1
                if expected_cut[i]:
                    break
            scripted.set_sample(i)
        return real_bbox(*args, **kw)

    lam_np, use_cut = _timm_mixed_samples(draws, cfg)
    expected_cut = use_cut & (lam_np != 1.0)
    monkeypatch.setattr(timm_mixup, "cutmix_bbox_and_lam", bbox_for_next_sample)
    mixer = timm_mixup.Mixup(**kwargs)
    return mixer(x.clone(), y)


def _timm_mixed_samples(draws, cfg):
    """Which draws timm mixes with CutMix (lam before correction), from the same coins."""
    apply = draws.apply.cpu().numpy() < cfg.prob
    if cfg.mixup_alpha > 0 and cfg.cutmix_alpha > 0:
        use_cut = draws.switch.cpu().numpy() < cfg.switch_prob
        lam = np.where(use_cut, draws.lam_cutmix.cpu().numpy(), draws.lam_mixup.cpu().numpy())
    elif cfg.mixup_alpha > 0:
        use_cut, lam = np.zeros(apply.shape, bool), draws.lam_mixup.cpu().numpy()
    else:
        use_cut, lam = np.ones(apply.shape, bool), draws.lam_cutmix.cpu().numpy()
    if cfg.mode != "batch":
        lam = lam.astype(np.float32)
    return np.where(apply, lam, 1.0), use_cut


def _capture_draws(monkeypatch):
    captured = {}
    real = M._draw

    def spy(cfg, n, device, generator):
        captured["draws"], captured["cfg"] = real(cfg, n, device, generator), cfg
        return captured["draws"]

    monkeypatch.setattr(M, "_draw", spy)
    return captured


TIMM_CONFIGS = [
    dict(mixup_alpha=0.8, cutmix_alpha=0.0),
    dict(mixup_alpha=0.0, cutmix_alpha=1.0),
    dict(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5),
    dict(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, correct_lam=False),
    dict(mixup_alpha=0.8, cutmix_minmax=(0.2, 0.8)),
    dict(mixup_alpha=0.4, cutmix_alpha=1.0, prob=0.6, label_smoothing=0.0),
]


@pytest.mark.parametrize("mode", ["batch", "pair", "elem"])
@pytest.mark.parametrize("cfg_index", range(len(TIMM_CONFIGS)))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mixup_equals_timm_for_the_same_draws(monkeypatch, mode, cfg_index, seed, timm_mixup):
    kwargs = dict(TIMM_CONFIGS[cfg_index], mode=mode, num_classes=10)
    kwargs.setdefault("label_smoothing", 0.1)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 3, 13, 11, generator=gen)
    y = torch.randint(0, 10, (8,), generator=gen)
    captured = _capture_draws(monkeypatch)
    torch.manual_seed(seed)
    ours_x, ours_t = regops.Mixup(**kwargs)(x, y)
    timm_x, timm_t = _timm_with_draws(monkeypatch, timm_mixup, kwargs, x, y, captured["draws"], captured["cfg"])
    assert torch.equal(ours_x, timm_x)
    assert torch.equal(ours_t, timm_t)


def test_timm_parity_check_can_fail(monkeypatch, timm_mixup):
    """The parity harness notices a wrong box: shift regops' box and the comparison fails."""
    kwargs = dict(mixup_alpha=0.0, cutmix_alpha=1.0, mode="elem", num_classes=10)
    x, y = torch.randn(6, 2, 9, 9), torch.arange(6)
    captured = _capture_draws(monkeypatch)
    torch.manual_seed(3)
    mixer = regops.Mixup(**kwargs)
    params = mixer.sample_params(x)
    shifted = M.MixParams(params.lam, params.partner, (params.box + 1).clamp(max=9), params.use_cutmix)
    ours_x, _ = mixer(x, y, params=shifted)
    timm_x, _ = _timm_with_draws(monkeypatch, timm_mixup, kwargs, x, y, captured["draws"], captured["cfg"])
    assert not torch.equal(ours_x, timm_x)


def test_mixup_disabled_and_prob_zero_pass_through():
    x, y = torch.randn(4, 3, 5, 5), torch.tensor([0, 1, 2, 3])
    mixer = regops.Mixup(mixup_alpha=1.0, cutmix_alpha=1.0, num_classes=4, label_smoothing=0.0)
    mixer.mixup_enabled = False
    out, target = mixer(x, y)
    assert torch.equal(out, x) and torch.equal(target, F.one_hot(y, 4).float())
    out, _ = regops.Mixup(prob=0.0, num_classes=4, mode="elem")(x, y)
    assert torch.equal(out, x)


def test_multi_label_targets_match_timm(timm_mixup):
    x = torch.randn(4, 3, 5, 5)
    dense = (torch.rand(4, 6) > 0.5).float()
    params = M.MixParams(
        lam=torch.tensor([0.25, 0.75, 0.75, 0.25], dtype=torch.float64),
        partner=torch.tensor([3, 2, 1, 0]),
        box=torch.zeros(4, 4, dtype=torch.long),
        use_cutmix=torch.zeros(4, dtype=torch.bool),
    )
    _, ours = regops.Mixup(num_classes=6, multi_label=True, mode="pair")(x, dense, params=params)
    lam = torch.tensor([0.25, 0.75, 0.75, 0.25]).unsqueeze(1)
    expected = timm_mixup.mixup_target(dense, 6, lam, 0.1, multi_label=True)
    assert torch.equal(ours, expected)


# ============================================================================================ torchvision v2


@pytest.mark.parametrize("cls", ["MixUp", "CutMix"])
@pytest.mark.parametrize("seed", [0, 1, 5])
def test_v2_classes_equal_torchvision_with_the_same_seed(cls, seed, tv2):
    gen = torch.Generator().manual_seed(100 + seed)
    x = torch.randn(5, 3, 12, 10, generator=gen)
    y = torch.randint(0, 7, (5,), generator=gen)
    torch.manual_seed(seed)
    tv_x, tv_y = getattr(tv2, cls)(alpha=0.7, num_classes=7)(x, y)
    torch.manual_seed(seed)
    ours_x, ours_y = getattr(regops, cls)(alpha=0.7, num_classes=7)(x, y)
    assert torch.equal(ours_x, tv_x)
    assert torch.equal(ours_y, tv_y)


def test_v2_probability_labels_and_dict_input(tv2):
    gen = torch.Generator().manual_seed(7)
    x, soft = torch.randn(4, 3, 6, 6, generator=gen), torch.softmax(torch.randn(4, 5, generator=gen), 1)
    torch.manual_seed(0)
    tv_out = tv2.CutMix(num_classes=5)({"image": x, "labels": soft})
    torch.manual_seed(0)
    ours = regops.CutMix(num_classes=5)({"image": x, "labels": soft})
    assert torch.equal(ours["image"], tv_out["image"]) and torch.equal(ours["labels"], tv_out["labels"])


def test_v2_classes_reject_bad_input():
    x = torch.randn(4, 3, 6, 6)
    with pytest.raises(ValueError, match="num_classes must be given"):
        regops.MixUp()(x, torch.arange(4))
    with pytest.raises(ValueError, match="alpha must be > 0"):
        regops.MixUp(alpha=0.0)
    with pytest.raises(ValueError, match="batched input"):
        regops.MixUp(num_classes=5)(x[0], torch.arange(3))


# ============================================================================================ distributions
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


# ============================================================================================ batch shapes
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


def test_large_sample_path_equals_chunked_path(monkeypatch):
    """The reference mixes large samples one at a time and small ones in chunks: both give the same bits."""
    gen = torch.Generator().manual_seed(8)
    p = _example_params(6, 7, 9, seed=4)
    args = (*p.image_weights, p.partner, p.box)
    for dtype in (torch.float32, torch.bfloat16, torch.float64, torch.uint8):
        x = torch.randn(6, 3, 7, 9, generator=gen)
        x = (x.abs() * 60).to(dtype) if dtype == torch.uint8 else x.to(dtype)
        chunked = R.mix_apply(x, *args)
        monkeypatch.setattr(R, "_CHUNK", 1)
        one_by_one = R.mix_apply(x, *args)
        monkeypatch.undo()
        assert torch.equal(chunked, one_by_one)


# ============================================================================================ kernels vs reference
def _example_params(batch: int, height: int, width: int, seed: int = 0) -> M.MixParams:
    torch.manual_seed(seed)
    return regops.Mixup(mixup_alpha=1.0, cutmix_alpha=1.0, mode="elem", partner="random").sample_params(
        torch.zeros(batch, 1, height, width)
    )


@pytest.mark.ops("mix_apply", "mix_apply_backward")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.uint8])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "3d", "2d"])
def test_mix_kernel_matches_reference(kernel_target, dtype, layout):
    _, device = kernel_target
    shapes = {"nchw": (5, 3, 7, 9), "channels_last": (5, 3, 7, 9), "3d": (5, 7, 9), "2d": (5, 33)}
    shape = shapes[layout]
    height, width = (1, 33) if layout == "2d" else shape[-2:]
    gen = torch.Generator().manual_seed(1)
    x = (
        (torch.rand(shape, generator=gen) * 255).to(dtype)
        if dtype == torch.uint8
        else torch.randn(shape, generator=gen)
    )
    x = x.to(device=device, dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    p = _example_params(5, height, width)
    if layout == "2d":
        p = M.MixParams(p.lam, p.partner, torch.zeros_like(p.box), torch.zeros_like(p.use_cutmix))
    args = [t.to(device) for t in (*p.image_weights, p.partner, p.box)]
    out = M._mix_apply_op(x, *args)
    with regops.use_backend("torch"):
        ref = M._mix_apply_op(x.cpu(), *[a.cpu() for a in args])
    assert out.stride() == ref.stride()
    assert torch.equal(out.cpu(), ref)
    if dtype.is_floating_point:
        grad = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
        gk = M._mix_apply_backward_op(grad, *args)
        with regops.use_backend("torch"):
            gr = M._mix_apply_backward_op(grad.cpu(), *[a.cpu() for a in args])
        assert torch.equal(gk.cpu(), gr)


@pytest.mark.ops(*MIXED_LOSS_OPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_cols", [1, 37, 300])
def test_loss_kernels_match_reference(kernel_target, dtype, n_cols):
    _, device = kernel_target
    gen = torch.Generator().manual_seed(n_cols)
    rows = 5
    z = (3 * torch.randn(rows, n_cols, generator=gen)).to(device=device, dtype=dtype)
    ta = torch.randint(0, n_cols, (rows,), generator=gen).to(device)
    tb = torch.randint(0, n_cols, (rows,), generator=gen).to(device)
    tb[0] = ta[0]
    lam = torch.rand(rows, generator=gen).to(device)
    g = torch.randn(rows, generator=gen).to(device)
    soft = torch.rand(rows, n_cols, generator=gen).to(device=device, dtype=dtype)
    w, pw = torch.rand(n_cols, generator=gen).to(device), (3 * torch.rand(n_cols, generator=gen)).to(device)
    tol = dict(rtol=2e-5, atol=2e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    cases = [
        (
            "mix_cross_entropy",
            (z, ta, tb, lam, 0.1),
            lambda out: ("mix_cross_entropy_backward", (g, z, out[1], ta, tb, lam, 0.1)),
        ),
        (
            "soft_target_cross_entropy",
            (z, soft),
            lambda out: ("soft_target_cross_entropy_backward", (g, z, out[1], soft)),
        ),
        (
            "mix_binary_cross_entropy",
            (z, ta, tb, lam, 0.1, 0.2, w, pw),
            lambda out: ("mix_binary_cross_entropy_backward", (g, z, ta, tb, lam, 0.1, 0.2, w, pw)),
        ),
        (
            "mix_binary_cross_entropy",
            (z, ta, tb, lam, 0.0, None, None, None),
            lambda out: ("mix_binary_cross_entropy_backward", (g, z, ta, tb, lam, 0.0, None, None, None)),
        ),
    ]
    for name, args, backward in cases:
        kernel_out = regops._backend.implementation(name, device)(*args)
        cpu = [a.cpu() if isinstance(a, torch.Tensor) else a for a in args]
        ref_out = getattr(R, name)(*cpu)
        for k, r in zip(
            kernel_out if isinstance(kernel_out, tuple) else [kernel_out],
            ref_out if isinstance(ref_out, tuple) else [ref_out],
            strict=True,
        ):
            torch.testing.assert_close(k.cpu(), r, **tol)
        bname, bargs = backward(ref_out if isinstance(ref_out, tuple) else None)
        bargs = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in bargs)
        kb = regops._backend.implementation(bname, device)(*bargs)
        rb = getattr(R, bname)(*[a.cpu() if isinstance(a, torch.Tensor) else a for a in bargs])
        torch.testing.assert_close(kb.cpu().float(), rb.float(), **tol)


# ============================================================================================ manifold mixup
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
    mixup_only = M.MixParams(p.lam, p.partner, torch.zeros_like(p.box), torch.zeros_like(p.use_cutmix))
    h2 = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: regops.manifold_mix(t, mixup_only), (h2,))


@pytest.mark.ops("mix_apply", "mix_apply_backward")
def test_manifold_mix_kernel_gradients(kernel_target):
    _, device = kernel_target
    p = _example_params(4, 3, 5, seed=5)
    p = M.MixParams(*(t.to(device) for t in (p.lam, p.partner, p.box, p.use_cutmix)))
    h = torch.randn(4, 2, 3, 5, device=device, requires_grad=True)
    (gk,) = torch.autograd.grad((regops.manifold_mix(h, p) ** 2).sum(), h)
    with regops.use_backend("torch"):
        (gr,) = torch.autograd.grad((regops.manifold_mix(h, p) ** 2).sum(), h)
    torch.testing.assert_close(gk, gr)


# ============================================================================================ losses
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


def test_mix_cross_entropy_gradcheck_and_low_precision():
    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, 7, (5,), generator=gen)
    _, mix = regops.mix_batch(torch.zeros(5, 2), y, mixup_alpha=1.0, mode="elem", generator=gen)
    z = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: regops.mix_cross_entropy(t, mix, 0.1), (z,), atol=1e-5)
    zb = z.detach().bfloat16().requires_grad_()
    loss = regops.mix_cross_entropy(zb, mix, 0.1)
    (g,) = torch.autograd.grad(loss, zb)
    assert g.dtype == torch.bfloat16
    ref = regops.mix_cross_entropy(zb.detach().double().requires_grad_(), mix, 0.1)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)


def _allocation_sizes(fn) -> list[int]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return [e.nbytes() for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and e.nbytes() > 0]


def test_mix_cross_entropy_allocates_no_b_by_c_tensor_but_the_gradient():
    batch, classes = 512, 32768  # B x C is twice the reference's row block
    y = torch.randint(0, classes, (batch,))
    _, mix = regops.mix_batch(torch.zeros(batch, 2), y, mixup_alpha=1.0, mode="elem")
    z = torch.randn(batch, classes, requires_grad=True)
    bxc = batch * classes * 4
    forward_allocs = _allocation_sizes(lambda: regops.mix_cross_entropy(z, mix, 0.1))
    assert max(forward_allocs) <= bxc // 2
    loss = regops.mix_cross_entropy(z, mix, 0.1)
    backward_allocs = _allocation_sizes(lambda: torch.autograd.grad(loss, z))
    assert sum(1 for a in backward_allocs if a > bxc // 2) == 1  # the gradient itself


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


def test_mixed_targets_equal_timm_mixup_target(timm_mixup):
    y = torch.tensor([3, 1, 4, 1, 5, 9])
    lam = torch.tensor([0.1, 0.9, 0.5, 0.5, 0.9, 0.1]).double()  # float32 values, as timm's per-sample lambdas
    p = M.MixParams(lam, torch.arange(6).flip(0), torch.zeros(6, 4, dtype=torch.long), torch.zeros(6, dtype=bool))
    mix = M.MixedBatch(y, y.flip(0), lam.float(), p)
    expected = timm_mixup.mixup_target(y, 10, lam.float().view(-1, 1), 0.1)
    assert torch.equal(regops.mixed_targets(mix, 10, 0.1), expected)


# ============================================================================================ opcheck / compile
def _op_samples():
    p = _example_params(4, 3, 5, seed=1)
    x = torch.randn(4, 2, 3, 5, requires_grad=True)
    z = torch.randn(4, 9, requires_grad=True)
    ta, tb, lam = torch.tensor([0, 3, 8, 1]), torch.tensor([1, 8, 3, 0]), torch.rand(4)
    soft = torch.rand(4, 9, requires_grad=True)
    w = torch.rand(9)
    return [
        (torch.ops.regops.mix_apply.default, (x, *p.image_weights, p.partner, p.box)),
        (
            torch.ops.regops.mix_apply.default,
            (x.detach().contiguous(memory_format=torch.channels_last), *p.image_weights, p.partner, p.box),
        ),
        (torch.ops.regops.mix_cross_entropy.default, (z, ta, tb, lam, 0.1)),
        (torch.ops.regops.soft_target_cross_entropy.default, (z, soft)),
        (torch.ops.regops.mix_binary_cross_entropy.default, (z, ta, tb, lam, 0.1, 0.3, w, None)),
        (torch.ops.regops.mix_binary_cross_entropy.default, (z, ta, tb, lam, 0.0, None, None, w)),
    ]


@pytest.mark.parametrize("index", range(6))
def test_opcheck(index):
    op, args = _op_samples()[index]
    torch.library.opcheck(op, args)


def test_compile_fullgraph():
    p = _example_params(4, 6, 6, seed=3)
    w_self, w_other = p.image_weights
    ta, tb, lam = torch.tensor([0, 3, 8, 1]), torch.tensor([1, 8, 3, 0]), torch.rand(4)
    mix = M.MixedBatch(ta, tb, lam, p)

    def step(x, z):
        mixed = M._mix_apply_op(x, w_self, w_other, p.partner, p.box)
        return mixed.sum() + regops.mix_cross_entropy(z, mix, 0.1) + regops.soft_target_cross_entropy(z, z.softmax(1))

    x = torch.randn(4, 3, 6, 6, requires_grad=True)
    z = torch.randn(4, 9, requires_grad=True)
    eager = step(x, z)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(x, z)
    torch.testing.assert_close(compiled, eager)
    gx, gz = torch.autograd.grad(compiled, (x, z))
    ex, ez = torch.autograd.grad(step(x, z), (x, z))
    torch.testing.assert_close(gx, ex)
    torch.testing.assert_close(gz, ez)


# ============================================================================================ bad input
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
    _, mix = regops.mix_batch(x, y, num_classes=4)
    with pytest.raises(ValueError, match="classes"):
        regops.mix_cross_entropy(torch.randn(4, 5), mix)
    with pytest.raises(ValueError, match="rows"):
        regops.mix_cross_entropy(torch.randn(3, 4), mix)
    with pytest.raises(TypeError, match="MixedBatch"):
        regops.mix_cross_entropy(torch.randn(4, 4), y)
    with pytest.raises(ValueError, match="shape"):
        regops.soft_target_cross_entropy(torch.randn(4, 4), torch.rand(4, 5))
    with pytest.raises(ValueError, match="reduction"):
        regops.mix_binary_cross_entropy(torch.randn(4, 4), mix, reduction="none")
    with pytest.raises(ValueError, match="pos_weight"):
        regops.mix_binary_cross_entropy(torch.randn(4, 4), mix, pos_weight=torch.ones(3))
    with pytest.raises(ValueError, match="multi-label"):
        regops.Mixup(multi_label=True, num_classes=4)(x, y)


# ============================================================================================ issue-11 items
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
