"""The public classes' contract: exports, clear errors for bad arguments, state dicts (torch's AdamW state loads into
ours and back; SAM checkpoints its persistent buffers), named parameters with a Fisher dict, LR schedulers,
non-contiguous parameters, zero_grad, and the multi-tensor pass (a few dispatcher calls whatever the tensor count)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import regops


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def _step(model, opt, seed=1):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(8, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()


def test_exports():
    assert set(regops.optim.__all__) == {"SAM", "GSAM", "LookSAM", "AdamW", "SGD", "preserve_bn_stats"}
    assert regops.optim.AdamW._step_supports_amp_scaling and regops.optim.SAM._step_supports_amp_scaling


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(decay="l1"), "decay must be one of"),
        (dict(decay="ewc"), "needs fisher"),
        (dict(grokfast=(1.5, 2.0)), "grokfast"),
        (dict(grokfast=0.9), "grokfast must be a pair"),
        (dict(grad_noise=(-1.0, 0.55)), "grad_noise"),
        (dict(clip_coord=0.0), "clip_coord must be positive"),
        (dict(agc=-1.0), "agc"),
        (dict(lr=-1.0), "learning rate"),
        (dict(betas=(1.0, 0.9)), "betas"),
        (dict(differentiable=True), "differentiable"),
        (dict(decay="l2sp", anchor=[torch.zeros(2)]), "anchor has 1 tensors for 4 parameters"),
        (dict(adamp=(0.0, 0.1)), "delta must be positive"),
        (dict(adamp=dict(delta=float("nan"))), "delta must be positive"),
        (dict(adamp=(0.1, -0.5)), "wd_ratio must be >= 0"),
        (dict(adamp=dict(wd_ratio=float("inf"))), "wd_ratio must be >= 0"),
        (dict(adamp=(0.1, 0.1, 0.0)), "eps must be positive"),
        (dict(adamp=0.1), "adamp must be True"),
        (dict(adamp=(0.1,)), "adamp must be True"),
        (dict(adamp=("a", 0.1)), "adamp must be True"),
        (dict(adamp=dict(ratio=0.1)), "got the keys \\['ratio'\\]"),
        (dict(adamp=True, decay="l2sp"), "adamp with decay='l2sp'"),
        (dict(adamp=True, decay="coupled"), "adamp with decay='coupled'"),
    ],
)
def test_bad_arguments_are_clear_errors(kw, match):
    with pytest.raises((ValueError, TypeError, NotImplementedError), match=match):
        regops.optim.AdamW(_model().parameters(), **kw)


def test_adamp_refuses_a_decay_in_the_gradient_at_construction_and_at_the_step():
    m = _model()
    with pytest.raises(ValueError, match="adamp with decay='coupled'.*use decay='decoupled'"):
        regops.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4, adamp=True)
    opt = regops.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, adamp=True)  # coupled without a decay: fine
    _step(m, opt)
    opt.param_groups[0]["weight_decay"] = 1e-4
    with pytest.raises(ValueError, match="adamp with decay='coupled'"):
        _step(m, opt)


def test_adamp_spellings_normalise_to_one_option():
    groups = [regops.optim.AdamW(_model().parameters(), adamp=a).param_groups[0]["adamp"]
              for a in (True, (0.1, 0.1), (0.1, 0.1, 1e-8), dict(delta=0.1), dict(wd_ratio=0.1, eps=1e-8))]  # fmt: skip
    assert groups == [(0.1, 0.1, 1e-8)] * 5
    assert regops.optim.AdamW(_model().parameters(), adamp=False).param_groups[0]["adamp"] is None
    assert regops.optim.SGD(_model().parameters(), adamp=(0.2, 0.5)).param_groups[0]["adamp"] == (0.2, 0.5, 1e-8)


def test_sam_errors():
    params = list(_model().parameters())
    with pytest.raises(ValueError, match="rho"):
        regops.optim.SAM(params, regops.optim.SGD, rho=-0.1, lr=0.1)
    with pytest.raises(TypeError, match="optimizer class"):
        regops.optim.SAM(params, torch.optim.SGD(params, lr=0.1))
    opt = regops.optim.SAM(params, regops.optim.SGD, lr=0.1)
    with pytest.raises(RuntimeError, match="first_step"):
        opt.second_step()
    with pytest.raises(RuntimeError, match="closure"):
        opt.step()
    with pytest.raises(ValueError, match="k >= 1"):
        regops.optim.LookSAM(params, regops.optim.SGD, k=0, lr=0.1)


def test_ewc_with_a_fisher_dict_by_parameter_name():
    model = _model()
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (4,), generator=g))]
    fisher = regops.empirical_fisher_diagonal(model, F.cross_entropy, batches, loss_reduction="mean")
    opt = regops.optim.AdamW(model.named_parameters(), lr=1e-2, weight_decay=0.5, decay="ewc", fisher=fisher)
    for (name, p), state in zip(model.named_parameters(), (opt.state[p] for p in model.parameters()), strict=True):
        assert torch.equal(state["fisher"], fisher[name]) and torch.equal(state["anchor"], p.detach())
    _step(model, opt)
    with pytest.raises(ValueError, match="named_parameters"):
        regops.optim.AdamW(model.parameters(), decay="ewc", fisher=fisher)


def test_torch_adamw_state_dict_loads_and_continues_identically():
    m1, m2 = _model(), _model()
    o1 = torch.optim.AdamW(m1.parameters(), lr=1e-2)
    _step(m1, o1)
    m2.load_state_dict(m1.state_dict())
    o2 = regops.optim.AdamW(m2.parameters(), lr=1e-2)
    o2.load_state_dict(copy.deepcopy(o1.state_dict()))  # (loading shares the tensors, as torch's does)
    for _ in range(3):
        _step(m1, o1), _step(m2, o2)
    for a, b in zip(m1.parameters(), m2.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    back = torch.optim.AdamW(m1.parameters(), lr=1e-2)
    back.load_state_dict(copy.deepcopy(o2.state_dict()))  # and ours loads into torch's
    assert float(back.state[next(m1.parameters())]["step"]) == 4


def test_regularizer_options_survive_a_state_dict_round_trip():
    m = _model()
    opt = regops.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, decay="l2sp", weight_decay=0.1, grokfast=(0.9, 1.0))
    _step(m, opt)
    sd = opt.state_dict()
    fresh = regops.optim.SGD(m.parameters(), lr=0.1)
    fresh.load_state_dict(sd)
    assert fresh.param_groups[0]["decay"] == "l2sp" and fresh.param_groups[0]["grokfast"] == (0.9, 1.0)
    assert "anchor" in fresh.state[next(m.parameters())]
    _step(m, fresh)
    opt = regops.optim.AdamW(m.parameters(), lr=0.1, adamp=(0.2, 0.3))
    _step(m, opt)
    fresh = regops.optim.AdamW(m.parameters(), lr=0.1)
    fresh.load_state_dict(opt.state_dict())
    assert fresh.param_groups[0]["adamp"] == (0.2, 0.3, 1e-8)


def test_sam_state_dict_keeps_looksams_buffer_and_the_base_state():
    def run(opt, model, steps):
        g = torch.Generator().manual_seed(9)
        for _ in range(steps):
            x, y = torch.randn(8, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g)
            closure = lambda x=x, y=y: F.cross_entropy(model(x), y).backward()  # noqa: E731
            closure()
            opt.step(closure)
            opt.zero_grad()

    m1 = _model()
    o1 = regops.optim.LookSAM(m1.parameters(), regops.optim.AdamW, k=2, lr=1e-2)
    run(o1, m1, 3)
    sd = copy.deepcopy(o1.state_dict())
    assert sd["sam_passes"] == 3 and all(set(s) == {"gv"} for s in sd["sam_state"].values())
    m2 = _model()
    m2.load_state_dict(m1.state_dict())
    o2 = regops.optim.LookSAM(m2.parameters(), regops.optim.AdamW, k=2, lr=1e-2)
    o2.load_state_dict(sd)
    run(o1, m1, 2), run(o2, m2, 2)
    for a, b in zip(m1.parameters(), m2.parameters(), strict=True):
        assert torch.equal(a, b)


def test_lr_scheduler_changes_the_step():
    m1, m2 = _model(), _model()
    o1, o2 = torch.optim.SGD(m1.parameters(), lr=0.5), regops.optim.SGD(m2.parameters(), lr=0.5)
    s1, s2 = torch.optim.lr_scheduler.StepLR(o1, 1, 0.1), torch.optim.lr_scheduler.StepLR(o2, 1, 0.1)
    for _ in range(3):
        _step(m1, o1), _step(m2, o2)
        s1.step(), s2.step()
    for a, b in zip(m1.parameters(), m2.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_tensor_lr_is_read_on_the_device():
    m1, m2 = _model(), _model()
    o1 = regops.optim.AdamW(m1.parameters(), lr=torch.tensor(0.01, dtype=torch.float64))
    o2 = regops.optim.AdamW(m2.parameters(), lr=0.01)
    _step(m1, o1), _step(m2, o2)
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters(), strict=True))


def test_non_contiguous_parameters():
    conv1 = nn.Conv2d(3, 4, 3).double().to(memory_format=torch.channels_last)
    conv2 = nn.Conv2d(3, 4, 3).double()
    conv2.load_state_dict(conv1.state_dict())
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    for conv, opt_cls in ((conv1, regops.optim.AdamW), (conv2, torch.optim.AdamW)):
        opt = opt_cls(conv.parameters(), lr=1e-2)
        conv(x).square().mean().backward()
        opt.step()
    assert conv1.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(conv1.weight, conv2.weight, rtol=1e-12, atol=1e-14)


def test_zero_grad_sets_none_and_params_without_grads_keep_their_state():
    m = _model()
    opt = regops.optim.AdamW(m.parameters(), lr=1e-2)
    last = m[2].weight
    last.requires_grad_(False)
    _step(m, opt)
    opt.zero_grad()
    assert last not in opt.state and all(p.grad is None for p in m.parameters())


class _Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("n_tensors", [10, 200])
def test_one_pass_whatever_the_number_of_tensors(n_tensors):
    """A SAM step over n tensors dispatches a fixed number of ops (the loop it replaces: a few per tensor)."""
    params = [torch.randn(16, dtype=torch.float64, requires_grad=True) for _ in range(n_tensors)]
    opt = regops.optim.SAM(params, regops.optim.AdamW, lr=1e-3)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.first_step()  # warm: states exist
    opt.second_step()
    with _Count() as count:
        opt.first_step()
        opt.second_step()
    assert count.calls < 40


@pytest.mark.parametrize("kw", [dict(grokfast=(0.9, 1.0)), dict(adamp=(0.9, 0.1))], ids=["grokfast", "adamp"])
def test_optimizer_step_under_torch_compile_matches_eager(kw):
    m1, m2 = _model(), _model()
    o1 = regops.optim.AdamW(m1.parameters(), lr=1e-2, **kw)
    o2 = regops.optim.AdamW(m2.parameters(), lr=1e-2, **kw)
    compiled = torch.compile(o2.step)
    for _ in range(2):
        for m, step in ((m1, o1.step), (m2, compiled)):
            g = torch.Generator().manual_seed(1)
            x, y = torch.randn(8, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g)
            m.zero_grad()
            F.cross_entropy(m(x), y).backward()
            step()
    for a, b in zip(m1.parameters(), m2.parameters(), strict=True):
        assert torch.equal(a, b)
