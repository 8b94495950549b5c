"""regops.optim against what it replaces, in float64: torch's AdamW and SGD; each regularizer against its formula
(an extra loss term through autograd, Grokfast's and timm's gradient filters, the written-out update); SAM, ASAM,
GSAM and LookSAM against the reference SAM implementation and the papers' formulas; GradScaler's skip."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import regops
from regops.optim import reference as ref
from regops.testing import ReferenceSAM

STEPS = 5
F64 = dict(rtol=1e-12, atol=1e-14)  # float64, 5 steps: torch fuses some multiply-adds (an ulp per operation)


def _model(seed: int = 0, bn: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Linear(5, 7), nn.BatchNorm1d(7) if bn else nn.Tanh(), nn.Tanh(), nn.Linear(7, 3)]
    return nn.Sequential(*layers).double()


def _data(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, 5, generator=g, dtype=torch.float64), torch.randn(16, 3, generator=g, dtype=torch.float64)


def _loss(model: nn.Module, x, y) -> torch.Tensor:
    return ((model(x) - y) ** 2).mean()


def _train(model, opt, steps=STEPS, extra=None, before_step=None):
    dtype = next(model.parameters()).dtype
    x, y = (t.to(dtype) for t in _data())
    for t in range(steps):
        opt.zero_grad()
        loss = _loss(model, x[t % 2 :: 2], y[t % 2 :: 2])
        if extra is not None:
            loss = loss + extra(model)
        loss.backward()
        if before_step is not None:
            before_step(model)
        opt.step()
    return [p.detach() for p in model.parameters()]


def _close(got, want, **tol):
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, **(tol or F64))


# ------------------------------------------------------------------------------------------------ drop-ins
@pytest.mark.parametrize(
    "kw", [{}, {"amsgrad": True}, {"maximize": True, "weight_decay": 0.1}, {"betas": (0.8, 0.9), "eps": 1e-6}]
)
def test_adamw_equals_torch_adamw_over_5_steps(kw):
    want = _train(m := _model(), torch.optim.AdamW(m.parameters(), lr=1e-2, **kw))
    got = _train(m := _model(), regops.optim.AdamW(m.parameters(), lr=1e-2, **kw))
    _close(got, want)


@pytest.mark.parametrize(
    "kw",
    [{}, {"momentum": 0.9}, {"momentum": 0.9, "nesterov": True, "weight_decay": 0.01},
     {"momentum": 0.5, "dampening": 0.3, "maximize": True}],
)  # fmt: skip
def test_sgd_equals_torch_sgd_over_5_steps(kw):
    want = _train(m := _model(), torch.optim.SGD(m.parameters(), lr=0.1, **kw))
    got = _train(m := _model(), regops.optim.SGD(m.parameters(), lr=0.1, **kw))
    _close(got, want)


def test_adamw_float32_stays_within_an_ulp_per_step_of_torch():
    want = _train(m := _model().float(), torch.optim.AdamW(m.parameters(), lr=1e-2))
    got = _train(m := _model().float(), regops.optim.AdamW(m.parameters(), lr=1e-2))
    _close(got, want, rtol=1e-5, atol=1e-6)


def test_adamw_state_matches_torch_state():
    m1, m2 = _model(), _model()
    o1, o2 = torch.optim.AdamW(m1.parameters(), lr=1e-2), regops.optim.AdamW(m2.parameters(), lr=1e-2)
    _train(m1, o1), _train(m2, o2)
    for p1, p2 in zip(m1.parameters(), m2.parameters(), strict=True):
        s1, s2 = o1.state[p1], o2.state[p2]
        assert float(s2["step"]) == float(s1["step"]) == STEPS
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(s2[key], s1[key], **F64)


# ------------------------------------------------------------------------------------------------ regularizers
WD = 0.3


def _anchor_model():
    """A fine-tuning start: the anchors are the model's initial values moved away a little."""
    m = _model()
    anchors = [p.detach() + 0.05 * torch.randn_like(p, dtype=torch.float64) for p in m.parameters()]
    return m, anchors


def test_l2sp_is_the_gradient_of_the_penalty():
    m, anchors = _anchor_model()
    penalty = lambda model: WD / 2 * sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchors, strict=True))  # noqa: E731
    want = _train(m, torch.optim.Adam(m.parameters(), lr=1e-2), extra=penalty)
    m, _ = _anchor_model()
    got = _train(m, regops.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=WD, decay="l2sp", anchor=anchors))
    _close(got, want, rtol=1e-10, atol=1e-12)


def test_ewc_is_the_gradient_of_the_fisher_weighted_penalty():
    m, anchors = _anchor_model()
    fisher = [torch.rand_like(a) for a in anchors]

    def penalty(model):
        return (
            WD / 2 * sum((f * (p - a) ** 2).sum() for p, a, f in zip(model.parameters(), anchors, fisher, strict=True))
        )

    want = _train(m, torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), extra=penalty)
    m, _ = _anchor_model()
    opt = regops.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=WD, decay="ewc", anchor=anchors,
                           fisher=fisher)  # fmt: skip
    _close(_train(m, opt), want, rtol=1e-10, atol=1e-12)


def test_l2sp_anchors_default_to_the_initial_parameters():
    m = _model()
    init = [p.detach().clone() for p in m.parameters()]
    penalty = lambda model: WD / 2 * sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), init, strict=True))  # noqa: E731
    want = _train(m, torch.optim.SGD(m.parameters(), lr=0.1), extra=penalty)
    m = _model()
    _close(_train(m, regops.optim.SGD(m.parameters(), lr=0.1, weight_decay=WD, decay="l2sp")), want, rtol=1e-10,
           atol=1e-12)  # fmt: skip


def test_cautious_decay_follows_its_formula():
    """AdamW with cautious weight decay written out per parameter: ``w <- w (1 - lr wd [u w >= 0]) - lr u``."""
    b1, b2, eps, lr = 0.9, 0.999, 1e-8, 1e-2
    m = _model()
    state = {p: (torch.zeros_like(p), torch.zeros_like(p)) for p in m.parameters()}
    x, y = _data()
    for t in range(1, STEPS + 1):
        for p in m.parameters():
            p.grad = None
        _loss(m, x[(t - 1) % 2 :: 2], y[(t - 1) % 2 :: 2]).backward()
        with torch.no_grad():
            for p in m.parameters():
                mom, sq = state[p]
                mom.mul_(b1).add_(p.grad, alpha=1 - b1)
                sq.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                u = (mom / (1 - b1**t)) / ((sq / (1 - b2**t)).sqrt() + eps)
                mask = (u * p >= 0).to(p.dtype)
                p.mul_(1 - lr * WD * mask).sub_(lr * u)
    want = [p.detach() for p in m.parameters()]
    m = _model()
    got = _train(m, regops.optim.AdamW(m.parameters(), lr=lr, weight_decay=WD, decay="cautious"))
    _close(got, want, rtol=1e-10, atol=1e-12)


def test_grokfast_equals_the_ema_gradient_filter():
    """Grokfast's gradfilter_ema (ironjr/grokfast) before torch's AdamW."""
    alpha, lamb = 0.9, 2.0
    ema = {}

    def gradfilter_ema(model):
        for n, p in model.named_parameters():
            ema[n] = ema[n] * alpha + p.grad.detach() * (1 - alpha) if n in ema else p.grad.detach().clone()
            p.grad.data = p.grad.data + ema[n] * lamb

    m = _model()
    want = _train(m, torch.optim.AdamW(m.parameters(), lr=1e-2), before_step=gradfilter_ema)
    m = _model()
    got = _train(m, regops.optim.AdamW(m.parameters(), lr=1e-2, grokfast=(alpha, lamb)))
    _close(got, want, rtol=1e-10, atol=1e-12)


def test_clip_coord_equals_clamping_the_gradient():
    def clamp(model):
        for p in model.parameters():
            p.grad.clamp_(-0.05, 0.05)

    m = _model()
    want = _train(m, torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), before_step=clamp)
    m = _model()
    _close(_train(m, regops.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, clip_coord=0.05)), want)


@pytest.mark.parametrize("clip", [0.01, 0.2])
def test_agc_equals_timms_adaptive_clip_grad(clip):
    agc = pytest.importorskip("timm.utils.agc")
    m = _model()
    want = _train(m, torch.optim.SGD(m.parameters(), lr=0.1), before_step=lambda mm: agc.adaptive_clip_grad(
        mm.parameters(), clip_factor=clip))  # fmt: skip
    m = _model()
    _close(_train(m, regops.optim.SGD(m.parameters(), lr=0.1, agc=clip)), want, rtol=1e-10, atol=1e-12)


def test_grad_noise_is_annealed_gaussian_noise_from_the_philox_stream():
    """SGD with noise: every step adds sigma_t z, sigma_t^2 = eta / (1 + t)^gamma, z the stream of (seed, parameter,
    element); the seed is drawn from the generator like every regops seed."""
    eta, gamma = 0.3, 0.55
    gen = torch.Generator().manual_seed(3)
    m = _model()
    opt = regops.optim.SGD(m.parameters(), lr=0.1, grad_noise=(eta, gamma), generator=gen)
    x, y = _data()
    replay = torch.Generator().manual_seed(3)
    for t in range(3):
        opt.zero_grad()
        _loss(m, x, y).backward()
        want = []
        seed = regops._core.rng.philox_seed(torch.device("cpu"), 0, replay)
        sigma = ref.f32((eta / (1.0 + t) ** gamma) ** 0.5)
        for k, p in enumerate(m.parameters()):
            noise = (ref.gaussian_noise(seed, k, 0, p.numel()).reshape(p.shape) * sigma).double()  # float32 product
            want.append(p.detach() - 0.1 * (p.grad + noise))
        opt.step()
        _close([p.detach() for p in m.parameters()], want)


# ------------------------------------------------------------------------------------------------ GradScaler
def _amp_run(opt_cls, inf_at: int, **kw):
    m = _model()
    opt = opt_cls(m.parameters(), **kw)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
    x, y = _data()
    for t in range(STEPS):
        opt.zero_grad()
        scaler.scale(_loss(m, x, y)).backward()
        if t == inf_at:
            next(m.parameters()).grad[0, 0] = float("inf")
        scaler.step(opt)
        scaler.update()
    return m, opt, scaler


@pytest.mark.parametrize("inf_at", [0, 2])
def test_gradscaler_inf_skips_the_step_exactly_as_torch(inf_at):
    m1, o1, s1 = _amp_run(torch.optim.AdamW, inf_at, lr=1e-2)
    m2, o2, s2 = _amp_run(regops.optim.AdamW, inf_at, lr=1e-2)
    assert s2.get_scale() == s1.get_scale()
    _close(list(m2.parameters()), list(m1.parameters()))
    for p1, p2 in zip(m1.parameters(), m2.parameters(), strict=True):
        assert float(o2.state[p2]["step"]) == float(o1.state[p1]["step"]) == STEPS - 1
        torch.testing.assert_close(o2.state[p2]["exp_avg_sq"], o1.state[p1]["exp_avg_sq"], **F64)


# ------------------------------------------------------------------------------------------------ SAM family
def _sam_groups(m, adaptive):
    first, *rest = list(m.parameters())
    return [{"params": [first], "rho": 0.1, "adaptive": adaptive}, {"params": rest}]


def _sam_train(opt, m, steps=3, bn=False):
    x, y = _data()
    for t in range(steps):
        xb, yb = x[t % 2 :: 2], y[t % 2 :: 2]
        _loss(m, xb, yb).backward()
        opt.first_step(zero_grad=True)
        _loss(m, xb, yb).backward()
        opt.second_step(zero_grad=True)
    return [p.detach() for p in m.parameters()]


SAM_BASES = {
    "torch SGD": (torch.optim.SGD, torch.optim.SGD, dict(lr=0.1, momentum=0.9)),
    "regops SGD (fused restore)": (torch.optim.SGD, regops.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-3)),
    "regops AdamW (fused restore)": (torch.optim.AdamW, regops.optim.AdamW, dict(lr=1e-2)),
}


@pytest.mark.parametrize("adaptive", [False, True], ids=["SAM", "ASAM"])
@pytest.mark.parametrize("bases", list(SAM_BASES))
def test_sam_equals_the_reference_sam_over_3_steps(adaptive, bases):
    ref_base, base, kw = SAM_BASES[bases]
    m = _model()
    want = _sam_train(ReferenceSAM(_sam_groups(m, adaptive), ref_base, rho=0.05, adaptive=adaptive, **kw), m)
    m = _model()
    got = _sam_train(regops.optim.SAM(_sam_groups(m, adaptive), base, rho=0.05, adaptive=adaptive, **kw), m)
    _close(got, want, rtol=1e-10, atol=1e-10)


def test_sam_step_with_closure_equals_first_and_second_step():
    x, y = _data()
    m = _model()
    want = _sam_train(regops.optim.SAM(m.parameters(), regops.optim.SGD, lr=0.1), m, steps=2)
    m = _model()
    opt = regops.optim.SAM(m.parameters(), regops.optim.SGD, lr=0.1)
    for t in range(2):
        closure = lambda t=t: _loss(m, x[t % 2 :: 2], y[t % 2 :: 2]).backward()  # noqa: E731
        closure()
        opt.step(closure)
        opt.zero_grad()
    _close([p.detach() for p in m.parameters()], want)


def test_gsam_follows_its_formula():
    alpha, rho, lr = 0.3, 0.05, 0.1
    x, y = _data()
    m = _model()
    for t in range(3):
        xb, yb = x[t % 2 :: 2], y[t % 2 :: 2]
        params = list(m.parameters())
        g = [p.detach().clone() for p in torch.autograd.grad(_loss(m, xb, yb), params)]
        gn = torch.sqrt(sum((gi**2).sum() for gi in g))
        old = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, gi in zip(params, g, strict=True):
                p.add_(gi * (rho / (gn + 1e-12)))
        gs = torch.autograd.grad(_loss(m, xb, yb), params)
        sn = torch.sqrt(sum((gi**2).sum() for gi in gs))
        cos = sum((a * b).sum() for a, b in zip(g, gs, strict=True)) / (gn * sn + 1e-12)
        with torch.no_grad():
            for p, o, gi, si in zip(params, old, g, gs, strict=True):
                p.copy_(o - lr * (si - alpha * (gi - cos * gn * si / (sn + 1e-12))))
    want = [p.detach() for p in m.parameters()]
    m = _model()
    got = _sam_train(regops.optim.GSAM(m.parameters(), regops.optim.SGD, rho=rho, alpha=alpha, lr=lr), m)
    _close(got, want, rtol=1e-10, atol=1e-10)


def test_looksam_follows_its_formula():
    k, alpha, rho, lr = 2, 0.7, 0.05, 0.1
    x, y = _data()
    m = _model()
    gv = None
    for t in range(5):
        xb, yb = x[t % 2 :: 2], y[t % 2 :: 2]
        params = list(m.parameters())
        g = [p.detach().clone() for p in torch.autograd.grad(_loss(m, xb, yb), params)]
        gn = torch.sqrt(sum((gi**2).sum() for gi in g))
        if t % k == 0:
            old = [p.detach().clone() for p in params]
            with torch.no_grad():
                for p, gi in zip(params, g, strict=True):
                    p.add_(gi * (rho / (gn + 1e-12)))
            gs = torch.autograd.grad(_loss(m, xb, yb), params)
            c = sum((a * b).sum() for a, b in zip(gs, g, strict=True)) / gn**2
            gv = [si - c * gi for si, gi in zip(gs, g, strict=True)]
            upd = gs
            with torch.no_grad():
                for p, o in zip(params, old, strict=True):
                    p.copy_(o)
        else:
            vn = torch.sqrt(sum((v**2).sum() for v in gv))
            upd = [gi + alpha * gn / (vn + 1e-8) * v for gi, v in zip(g, gv, strict=True)]
        with torch.no_grad():
            for p, u in zip(params, upd, strict=True):
                p.sub_(lr * u)
    want = [p.detach() for p in m.parameters()]
    m = _model()
    opt = regops.optim.LookSAM(m.parameters(), regops.optim.SGD, rho=rho, k=k, alpha=alpha, lr=lr)
    for t in range(5):
        xb, yb = x[t % 2 :: 2], y[t % 2 :: 2]
        closure = lambda xb=xb, yb=yb: _loss(m, xb, yb).backward()  # noqa: E731
        closure()
        opt.step(closure)
        opt.zero_grad()
    _close([p.detach() for p in m.parameters()], want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("base", [regops.optim.SGD, torch.optim.SGD])
def test_sam_with_gradscaler_skips_both_passes_on_an_inf(base):
    m = _model()
    opt = regops.optim.SAM(m.parameters(), base, lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    x, y = _data()
    before = [p.detach().clone() for p in m.parameters()]
    scaler.scale(_loss(m, x, y)).backward()
    next(m.parameters()).grad[0, 0] = float("inf")
    opt.first_step(zero_grad=True, grad_scaler=scaler)
    assert all(torch.equal(p, b) for p, b in zip(m.parameters(), before, strict=True))  # not perturbed
    scaler.scale(_loss(m, x, y)).backward()
    scaler.step(opt)
    scaler.update()
    assert all(torch.equal(p, b) for p, b in zip(m.parameters(), before, strict=True))  # not stepped
    assert all(float(s.get("step", 0)) == 0 for s in opt.base_optimizer.state.values())
    assert scaler.get_scale() == 2.0**7  # the scaler saw the inf
    opt.zero_grad()
    # the next, clean step unscales in the kernels: the step of SAM without a scaler
    scaler.scale(_loss(m, x, y)).backward()
    opt.first_step(zero_grad=True, grad_scaler=scaler)
    scaler.scale(_loss(m, x, y)).backward()
    scaler.step(opt)
    m2 = _model()
    plain = regops.optim.SAM(m2.parameters(), base, lr=0.1, momentum=0.9)
    _loss(m2, x, y).backward()
    plain.first_step(zero_grad=True)
    _loss(m2, x, y).backward()
    plain.second_step()
    _close([p.detach() for p in m.parameters()], [p.detach() for p in m2.parameters()], rtol=1e-12, atol=1e-13)


def test_preserve_bn_stats_keeps_the_running_statistics():
    m = _model(bn=True)
    bn = m[1]
    x, y = _data()
    _loss(m, x, y).backward()
    saved = (bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone())
    with regops.optim.preserve_bn_stats(m):
        _loss(m, x * 3, y).backward()
    assert torch.equal(bn.running_mean, saved[0]) and torch.equal(bn.running_var, saved[1])
    assert int(bn.num_batches_tracked) == int(saved[2])
