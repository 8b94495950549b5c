"""The mix family against the libraries it replaces: timm's ``Mixup`` (outputs and targets equal for the same draws,
every mode and config), torchvision v2's ``MixUp`` / ``CutMix`` (same seed, same output) and timm's
``mixup_target``."""

from __future__ import annotations

import math
import types

import numpy as np
import pytest
import torch

import regops
from regops.mix import _params as P


# The peers are the reference only in the parity tests: those (and no others) skip when a peer is missing.
@pytest.fixture
def timm_mixup():
    return pytest.importorskip("timm.data.mixup")


@pytest.fixture
def tv2():
    return pytest.importorskip("torchvision.transforms.v2")


class _ScriptedRandom:
    """Stands in for ``numpy.random`` inside timm's mixup module: returns regops' own draws.

    ``rand`` and ``beta`` return the uniform / Beta draws regops made; ``randint(low, high)`` maps regops' next
    uniform draw to ``low + floor(u * (high - low))`` (how regops turns uniforms into integers), so timm's own
    bounds are used and any disagreement about them shows up as a different output.
    """

    def __init__(self, draws: P.Draws, cfg: P.Config, n: int, minmax: bool):
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
    """The draws of the next call: tensors from ``draw``, or batch mode's Python floats from ``draw_on_host`` (kept
    as one-element tensors)."""
    captured = {}
    real, real_host = P.draw, P.draw_on_host

    def spy(cfg, n, device, generator):
        captured["draws"], captured["cfg"] = real(cfg, n, device, generator), cfg
        return captured["draws"]

    def spy_host(cfg, generator):
        draws = real_host(cfg, generator)
        as_tensors = {k: None if v is None else torch.tensor([v], dtype=torch.float64) for k, v in vars(draws).items()}
        # only the lambda the switch picks is drawn; the other (never read by timm) stands in where both are enabled
        pairs = (("lam_mixup", cfg.mixup_alpha, "lam_cutmix"), ("lam_cutmix", cfg.cutmix_alpha, "lam_mixup"))
        for name, alpha, other in pairs:
            if alpha > 0 and as_tensors[name] is None:
                as_tensors[name] = as_tensors[other]
        captured["draws"], captured["cfg"] = P.Draws(**as_tensors), cfg
        return draws

    monkeypatch.setattr(P, "draw", spy)
    monkeypatch.setattr(P, "draw_on_host", spy_host)
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
    shifted = regops.MixParams(params.lam, params.partner, (params.box + 1).clamp(max=9), params.use_cutmix)
    ours_x, _ = mixer(x, y, params=shifted)
    timm_x, _ = _timm_with_draws(monkeypatch, timm_mixup, kwargs, x, y, captured["draws"], captured["cfg"])
    assert not torch.equal(ours_x, timm_x)


def test_multi_label_targets_match_timm(timm_mixup):
    x = torch.randn(4, 3, 5, 5)
    dense = (torch.rand(4, 6) > 0.5).float()
    params = regops.MixParams(
        lam=torch.tensor([0.25, 0.75, 0.75, 0.25], dtype=torch.float64),
        partner=torch.tensor([3, 2, 1, 0]),
        box=torch.zeros(4, 4, dtype=torch.long),
        use_cutmix=torch.zeros(4, dtype=torch.bool),
    )
    _, ours = regops.Mixup(num_classes=6, multi_label=True, mode="pair")(x, dense, params=params)
    lam = torch.tensor([0.25, 0.75, 0.75, 0.25]).unsqueeze(1)
    expected = timm_mixup.mixup_target(dense, 6, lam, 0.1, multi_label=True)
    assert torch.equal(ours, expected)


def test_mixed_targets_equal_timm_mixup_target(timm_mixup):
    y = torch.tensor([3, 1, 4, 1, 5, 9])
    lam = torch.tensor([0.1, 0.9, 0.5, 0.5, 0.9, 0.1]).double()  # float32 values, as timm's per-sample lambdas
    p = regops.MixParams(lam, torch.arange(6).flip(0), torch.zeros(6, 4, dtype=torch.long), torch.zeros(6, dtype=bool))
    mix = regops.MixedBatch(y, y.flip(0), lam.float(), p)
    expected = timm_mixup.mixup_target(y, 10, lam.float().view(-1, 1), 0.1)
    assert torch.equal(regops.mixed_targets(mix, 10, 0.1), expected)


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
