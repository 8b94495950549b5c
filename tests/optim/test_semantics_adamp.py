"""``adamp=`` of regops' AdamW and SGD against the published AdamP and SGDP (Heo et al., ICLR 2021), in float64: the
papers' formulas written out per tensor, and the authors' package (``adamp``) where it is installed. The model has
a convolution before a BatchNorm (scale-invariant per output channel), a linear layer before a LayerNorm
(scale-invariant as a whole) and an ordinary head: the tests check that the formula projects the first two (the
channel and the layer view) and not the head, so an optimizer without the projection fails them."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import regops

STEPS = 5
TOL = dict(rtol=1e-10, atol=1e-12)
DELTA, RATIO, EPS = 0.1, 0.1, 1e-8


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(2, 4, 3, bias=False), nn.BatchNorm2d(4)
        self.lin, self.ln = nn.Linear(16, 6, bias=False), nn.LayerNorm(6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.bn(self.conv(x))).flatten(1)
        return self.head(torch.tanh(self.ln(self.lin(h))))


# the view each weight's projection takes at every step (the test's premise: the formula projects these)
EXPECTED_VIEWS = {"conv.weight": "channel", "lin.weight": "layer", "head.weight": None}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return _Net().double()


def _batches():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(STEPS, 8, 2, 4, 4, generator=g, dtype=torch.float64)
    return x, torch.randn(STEPS, 8, 3, generator=g, dtype=torch.float64)


def _grads(model: nn.Module, t: int) -> None:
    x, y = _batches()
    model.zero_grad()
    F.mse_loss(model(x[t]), y[t]).backward()


def _train(model: nn.Module, opt) -> list[torch.Tensor]:
    for t in range(STEPS):
        _grads(model, t)
        opt.step()
    return [p.detach() for p in model.parameters()]


def _project(w, g, u):
    """The paper's projection: channel view, then layer view; the first whose every |cos(g, w)| is below
    delta / sqrt(row size) takes the radial part of u off. Returns (u, decay ratio, view)."""
    for rows, view in ((w.shape[0], "channel"), (1, "layer")):
        wv, gv, uv = w.reshape(rows, -1), g.reshape(rows, -1), u.reshape(rows, -1)
        cos = F.cosine_similarity(gv, wv, dim=1, eps=EPS).abs()
        if cos.max() < DELTA / math.sqrt(wv.shape[1]):
            unit = wv / (wv.norm(dim=1, keepdim=True) + EPS)
            return (uv - unit * (unit * uv).sum(1, keepdim=True)).reshape(u.shape), RATIO, view
    return u, 1.0, None


def _formula(model: nn.Module, update, wd_scale: float = 1.0) -> tuple[list[torch.Tensor], dict[str, list]]:
    """``STEPS`` steps of ``p *= 1 - lr wd ratio wd_scale; p -= lr u'`` with ``u' = _project(u)`` for weights of
    two or more dims, ``u = update(name, g, t)``; returns the parameters and the views taken."""
    views: dict[str, list] = {n: [] for n, _ in model.named_parameters()}
    for t in range(STEPS):
        _grads(model, t)
        for name, p in model.named_parameters():
            g, p = p.grad, p.detach()
            u, ratio, view = update(name, g, t + 1), 1.0, None
            if p.dim() > 1:
                u, ratio, view = _project(p, g, u)
            views[name].append(view)
            p.mul_(1 - LR * WD * ratio * wd_scale).sub_(LR * u)
    return [p.detach() for p in model.parameters()], views


LR, WD = 1e-2, 0.1


def _adamp_formula(model, betas=(0.9, 0.999), eps=EPS):
    b1, b2 = betas
    m, v = {}, {}

    def update(name, g, t):
        m[name] = b1 * m.get(name, 0) + (1 - b1) * g
        v[name] = b2 * v.get(name, 0) + (1 - b2) * g * g
        return (m[name] / (1 - b1**t)) / ((v[name] / (1 - b2**t)).sqrt() + eps)

    return _formula(model, update)


def _sgdp_formula(model, momentum, nesterov, buf):

    def update(name, g, t):
        b = buf[name] = momentum * buf.get(name, 0) + g  # the buffer itself is never projected
        return g + momentum * b if nesterov else b

    return _formula(model, update, wd_scale=1 / (1 - momentum))


def _check_views(views):
    for name, want in EXPECTED_VIEWS.items():
        assert views[name] == [want] * STEPS, f"{name}: the formula took the views {views[name]}"
    assert all(all(v is None for v in views[n]) for n in views if n not in EXPECTED_VIEWS)  # vectors


def _differs(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return any((x - y).abs().max() > 1e-6 for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("adamp", [True, (DELTA, RATIO), dict(delta=DELTA, wd_ratio=RATIO, eps=EPS)], ids=str)
def test_adamw_adamp_equals_the_adamp_formula_over_5_steps(adamp):
    want, views = _adamp_formula(_model())
    _check_views(views)
    got = _train(m := _model(), regops.optim.AdamW(m.parameters(), lr=LR, weight_decay=WD, adamp=adamp))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, **TOL)
    plain = _train(m := _model(), regops.optim.AdamW(m.parameters(), lr=LR, weight_decay=WD))
    assert _differs(plain, want)  # the projection changes the result: this test sees it


@pytest.mark.parametrize("momentum, nesterov", [(0.9, False), (0.9, True), (0.0, False)])
def test_sgd_adamp_equals_the_sgdp_formula_over_5_steps(momentum, nesterov):
    buf = {}
    want, views = _sgdp_formula(_model(), momentum, nesterov, buf)
    _check_views(views)
    m = _model()
    opt = regops.optim.SGD(m.parameters(), lr=LR, momentum=momentum, nesterov=nesterov, decay="decoupled",
                           weight_decay=WD / (1 - momentum), adamp=True)  # fmt: skip
    got = _train(m, opt)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, **TOL)
    if momentum:  # the buffer is the gradients' momentum, never projected
        torch.testing.assert_close(opt.state[m.conv.weight]["momentum_buffer"], buf["conv.weight"], **TOL)


def test_adamw_adamp_with_amsgrad_and_cautious_decay_composes():
    """AMSGrad's denominator and the cautious mask (read from the projected update) around the projection."""
    model = _model()
    vmax, m, v = {}, {}, {}
    b1, b2 = 0.9, 0.999

    def update(name, g, t):
        m[name] = b1 * m.get(name, 0) + (1 - b1) * g
        v[name] = b2 * v.get(name, 0) + (1 - b2) * g * g
        vmax[name] = torch.maximum(vmax.get(name, v[name]), v[name])
        return (m[name] / (1 - b1**t)) / ((vmax[name] / (1 - b2**t)).sqrt() + EPS)

    for t in range(STEPS):
        _grads(model, t)
        for name, p in model.named_parameters():
            g, p = p.grad, p.detach()
            u, ratio = update(name, g, t + 1), 1.0
            if p.dim() > 1:
                u, ratio, _ = _project(p, g, u)
            p.copy_(torch.where(u * p >= 0, p * (1 - LR * WD * ratio), p) - LR * u)
    want = [p.detach() for p in model.parameters()]
    o = regops.optim.AdamW((mm := _model()).parameters(), lr=LR, weight_decay=WD, amsgrad=True, decay="cautious",
                           adamp=True)  # fmt: skip
    for a, b in zip(_train(mm, o), want, strict=True):
        torch.testing.assert_close(a, b, **TOL)


def test_gradscaler_scale_and_inf_with_adamp():
    """The cosine reads the unscaled gradient; an inf skips everything (parameters, states, step counts)."""
    m1, m2 = _model(), _model()
    o1 = regops.optim.AdamW(m1.parameters(), lr=LR, weight_decay=WD, adamp=True)
    o2 = regops.optim.AdamW(m2.parameters(), lr=LR, weight_decay=WD, adamp=True)
    for t in range(3):
        _grads(m1, t)
        o1.step()
        _grads(m2, t)
        for p in m2.parameters():
            p.grad.mul_(1024.0)
        before = [p.detach().clone() for p in m2.parameters()]
        o2.step(grad_scale=torch.tensor(1024.0), found_inf=torch.tensor(1.0))  # skipped
        assert all(torch.equal(a, b) for a, b in zip(m2.parameters(), before, strict=True))
        o2.step(grad_scale=torch.tensor(1024.0), found_inf=torch.tensor(0.0))
    for a, b in zip(m2.parameters(), m1.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert float(o2.state[m2.conv.weight]["step"]) == 3


# ------------------------------------------------------------------------------------------------ the package
def test_adamw_adamp_equals_the_adamp_package():
    adamp = pytest.importorskip("adamp")
    want = _train(m := _model(), adamp.AdamP(m.parameters(), lr=LR, weight_decay=WD, delta=DELTA, wd_ratio=RATIO))
    got = _train(m := _model(), regops.optim.AdamW(m.parameters(), lr=LR, weight_decay=WD, adamp=True))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, **TOL)


# The package's SGDP without Nesterov projects its stored momentum buffer in place (its update aliases the
# buffer); the paper's algorithm and regops keep the buffer unprojected, so the package is compared where the two
# agree: Nesterov (a fresh update) and no momentum (a buffer that is not carried over).
@pytest.mark.parametrize("momentum, nesterov", [(0.9, True), (0.0, False)])
def test_sgd_adamp_equals_the_sgdp_package(momentum, nesterov):
    adamp = pytest.importorskip("adamp")
    kw = dict(lr=LR, momentum=momentum, nesterov=nesterov)
    want = _train(m := _model(), adamp.SGDP(m.parameters(), weight_decay=WD, **kw))
    m = _model()
    got = _train(m, regops.optim.SGD(m.parameters(), weight_decay=WD / (1 - momentum), decay="decoupled",
                                     adamp=True, **kw))  # fmt: skip
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, **TOL)
